<?php
/*
 * vectors.php - check the PHP codec and connection against tests/vectors/frames.json
 * (the twin of examples/c/vectors.c).
 *
 *     php vectors.php [PATH/TO/frames.json]
 *
 * For every vector: the codec alone (decode and compare with frame/fields, or with
 * the error reason and layer; re-encode valid vectors), then the connection: the bytes
 * over a socketpair with the vector's number of real descriptors on the first byte,
 * received with Connection::recvFrame(), and no descriptor left open afterwards.
 * One line per vector; exit 1 if any check failed.
 */

declare(strict_types=1);

require __DIR__ . '/sockshare.php';

use Sockshare\Codec;
use Sockshare\Connection;
use Sockshare\ProtocolError;

$failures = 0;
$current = '';

function failf(string $msg): void
{
    global $failures, $current;
    echo "FAIL $current: $msg\n";
    $failures++;
}

/** A u64 written as a decimal string -> the PHP int with the same 64 bits. */
function u64(string $dec): int
{
    $hi = 0;
    $lo = 0;
    foreach (str_split($dec) as $d) {
        $lo = $lo * 10 + (int) $d;
        $hi = ($hi * 10 + ($lo >> 32)) & 0xFFFFFFFF;
        $lo &= 0xFFFFFFFF;
    }
    return ($hi << 32) | $lo;
}

function u64str(int $v): string
{
    return sprintf('%u', $v);
}

/** Decode a frame's payload by type; with $fields, compare. Returns nothing or throws. */
function check_payload(array $h, string $p, int $nfds, ?array $fields): void
{
    switch ($h['type']) {
        case Sockshare\HELLO:
            $got = Codec::decodeHello($p);
            if ($fields !== null) {
                foreach (['version', 'role', 'features', 'pid', 'uid', 'max_payload'] as $k) {
                    if ($got[$k] !== $fields[$k]) {
                        failf("HELLO $k differs");
                    }
                }
                if (bin2hex($got['name']) !== $fields['name_hex']) {
                    failf('HELLO name differs');
                }
            }
            break;
        case Sockshare\HANDOFF:
            $entries = Codec::decodeHandoff($p);
            if (count($entries) !== $nfds) {
                throw new ProtocolError('fd-count-mismatch', 'entries vs descriptors', 'channel');
            }
            foreach ($fields === null ? [] : $entries as $i => $e) {
                $want = $fields['entries'][$i];
                if (u64str($e['id']) !== $want['id'] || $e['family'] !== $want['family'] || $e['type'] !== $want['type']
                    || $e['proto'] !== $want['proto'] || bin2hex($e['meta']) !== $want['meta_hex']
                    || bin2hex($e['data']) !== $want['data_hex']) {
                    failf("HANDOFF entry $i differs");
                }
            }
            return;
        case Sockshare\ACCEPT:
            $ids = Codec::decodeAccept($p);
            if ($fields !== null && array_map('u64str', $ids) !== $fields['ids']) {
                failf('ACCEPT ids differ');
            }
            break;
        case Sockshare\REJECT:
            $r = Codec::decodeReject($p);
            if ($fields !== null && (u64str($r['id']) !== $fields['id'] || bin2hex($r['reason']) !== $fields['reason_hex'])) {
                failf('REJECT fields differ');
            }
            break;
        case Sockshare\ERROR:
            $e = Codec::decodeError($p);
            if ($fields !== null && ($e['code'] !== $fields['code'] || bin2hex($e['text']) !== $fields['text_hex'])) {
                failf('ERROR fields differ');
            }
            break;
    }
    if ($nfds) {
        throw new ProtocolError('fds-on-wrong-frame', 'descriptors on a frame other than HANDOFF', 'channel');
    }
}

/** The decoding procedure of the file, with the codec only. */
function codec_run(array $v, ?array &$h): void
{
    $raw = hex2bin($v['hex']);
    if (strlen($raw) < Sockshare\HEADER_SIZE) {
        throw new ProtocolError($v['eof'] ? 'truncated-frame' : 'incomplete', 'short header');
    }
    $h = Codec::parseHeader(substr($raw, 0, Sockshare\HEADER_SIZE), $v['max_payload']);
    if ($h['nfds'] > $v['fds']) {
        throw new ProtocolError('missing-fds', 'descriptors missing');
    }
    if (strlen($raw) < Sockshare\HEADER_SIZE + $h['length']) {
        throw new ProtocolError($v['eof'] ? 'truncated-frame' : 'incomplete', 'short payload');
    }
    check_payload($h, substr($raw, Sockshare\HEADER_SIZE), $h['nfds'], $v['valid'] ? $v['fields'] : null);
}

function encode_fields(array $frame, array $f): string
{
    $p = match ($frame['type']) {
        Sockshare\HELLO => Codec::encodeHello(['version' => $f['version'], 'role' => $f['role'], 'features' => $f['features'],
            'pid' => $f['pid'], 'uid' => $f['uid'], 'max_payload' => $f['max_payload'], 'name' => hex2bin($f['name_hex'])]),
        Sockshare\HANDOFF => Codec::encodeHandoff(array_map(fn ($e) => ['id' => u64($e['id']), 'family' => $e['family'],
            'type' => $e['type'], 'proto' => $e['proto'], 'meta' => hex2bin($e['meta_hex']), 'data' => hex2bin($e['data_hex'])],
            $f['entries'])),
        Sockshare\ACCEPT => Codec::encodeAccept(array_map('u64', $f['ids'])),
        Sockshare\REJECT => Codec::encodeReject(u64($f['id']), hex2bin($f['reason_hex'])),
        Sockshare\ERROR => Codec::encodeError($f['code'], hex2bin($f['text_hex'])),
        default => '',
    };
    return Codec::header($frame['type'], $frame['flags'], $frame['nfds'], strlen($p)) . $p;
}

/** The same bytes through a real connection, with real descriptors. */
function io_run(array $v): void
{
    $before = Sockshare\fd_count();
    socket_create_pair(AF_UNIX, SOCK_STREAM, 0, $pair);
    [$a, $b] = $pair;
    $socks = [];
    for ($i = 0; $i < $v['fds']; $i++) {
        $socks[] = socket_create(AF_UNIX, SOCK_STREAM, 0);
    }
    $msg = ['iov' => [hex2bin($v['hex'])]];
    if ($socks) {
        $msg['control'] = [['level' => SOL_SOCKET, 'type' => SCM_RIGHTS, 'data' => array_map('socket_export_stream', $socks)]];
    }
    if (socket_sendmsg($a, $msg, 0) !== strlen(hex2bin($v['hex']))) {
        failf('sendmsg failed');
    }
    foreach ($socks as $s) {
        socket_close($s); // the copies in flight are the receiver's
    }
    if ($v['eof']) {
        socket_shutdown($a, 1);
    }
    $c = new Connection($b);
    $c->maxPayload = $v['max_payload'];
    $reason = 'ok';
    $layer = 'frame';
    try {
        $f = $c->recvFrame(1.0);
        try {
            $h = ['type' => $f->type, 'flags' => $f->flags, 'nfds' => count($f->fds), 'length' => strlen($f->payload)];
            foreach ($f->fds as $fd) {
                if (!($fd instanceof Socket) || socket_get_option($fd, SOL_SOCKET, SO_TYPE) !== SOCK_STREAM) {
                    failf('connection: a received descriptor is not the socket sent');
                }
            }
            check_payload($h, $f->payload, count($f->fds), null);
            if ($v['valid'] && bin2hex(Codec::header($f->type, $f->flags, count($f->fds), strlen($f->payload)) . $f->payload) !== $v['hex']) {
                failf('connection: frame differs');
            }
        } finally {
            $f->release();
        }
        if ($v['eof']) {
            try {
                $c->recvFrame(1.0);
            } catch (Sockshare\Closed) {
            }
        }
    } catch (ProtocolError $e) {
        $reason = $e->reason;
        $layer = $e->layer;
    } catch (Throwable $e) {
        $reason = get_class($e) . ': ' . $e->getMessage();
    }
    $want = $v['valid'] ? 'ok at frame' : "{$v['reason']} at {$v['layer']}";
    if ($v['valid'] ? $reason !== 'ok' : "$reason at $layer" !== $want) {
        failf("connection: got $reason at $layer, want $want");
    }
    $c->close();
    socket_close($a);
    $after = Sockshare\fd_count();
    if ($after !== $before) {
        failf("connection: $before descriptors before, $after after");
    }
}

$path = $argv[1] ?? __DIR__ . '/../../tests/vectors/frames.json';
$doc = json_decode((string) file_get_contents($path), true, 64, JSON_BIGINT_AS_STRING | JSON_THROW_ON_ERROR);
$total = 0;
foreach ($doc['vectors'] as $v) {
    $current = $v['name'];
    $before = $failures;
    $total++;
    try {
        codec_run($v, $h);
        if (!$v['valid']) {
            failf("codec: decoded, want {$v['reason']} at {$v['layer']}");
        } elseif ($h !== ['type' => $v['frame']['type'], 'flags' => $v['frame']['flags'], 'nfds' => $v['frame']['nfds'], 'length' => $v['frame']['length']]) {
            failf('codec: header fields differ');
        } elseif (bin2hex(encode_fields($v['frame'], $v['fields'])) !== $v['hex']) {
            failf('codec: encoding differs');
        }
    } catch (ProtocolError $e) {
        if ($v['valid'] || $e->reason !== $v['reason'] || $e->layer !== $v['layer']) {
            failf("codec: got {$e->reason} at {$e->layer}" . ($v['valid'] ? '' : ", want {$v['reason']} at {$v['layer']}"));
        }
    }
    io_run($v);
    if ($failures === $before) {
        echo "ok   {$v['name']}\n";
    }
}
echo "$total vectors, $failures failures\n";
exit($failures || !$total ? 1 : 0);
