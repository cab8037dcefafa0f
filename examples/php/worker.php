<?php
/*
 * worker.php - a sockshare channel receiver in PHP (the twin of examples/c/worker.c).
 *
 *     php worker.php CHANNEL_PATH
 *
 * Connects to a listening channel, handshakes, then for every handed-off socket:
 *   - metadata {"reject": true}: closes its copy and answers REJECT (the sender keeps
 *     the connection);
 *   - otherwise answers ACCEPT (the connection is ours from then on), writes
 *     "PHP worker <pid> got <n> pre-read bytes: <data>; meta route=<route>\n", echoes
 *     one line read from the socket, and closes it.
 * ACCEPT/REJECT are only sent when the HANDOFF asked for them (FLAG_ACK).
 *
 * stdout: "ready pid=<pid> fds=<n>" after the handshake and "bye fds=<n>" at the end
 * (descriptors held, so a test can see that none leaked). Exit status: 0 after BYE or
 * an orderly close, 1 on a protocol or system error (stderr, and an ERROR frame to the
 * peer), 3 when nothing arrives for 60 s.
 */

declare(strict_types=1);

require __DIR__ . '/sockshare.php';

use Sockshare\Closed;
use Sockshare\Codec;
use Sockshare\Connection;
use Sockshare\Frame;
use Sockshare\PeerError;
use Sockshare\ProtocolError;
use Sockshare\Timeout;

const IDLE_TIMEOUT = 60.0;
const CLIENT_TIMEOUT = 10.0;

function out(string $line): void
{
    fwrite(STDOUT, $line . "\n");
    fflush(STDOUT);
}

/** Write everything (the socket may be O_NONBLOCK: that flag is shared with the sender). */
function write_all(Socket $s, string $data): bool
{
    while ($data !== '') {
        $n = @socket_send($s, $data, strlen($data), MSG_NOSIGNAL | MSG_DONTWAIT);
        if ($n === false) {
            $err = socket_last_error($s);
            socket_clear_error($s);
            $r = [];
            $w = [$s];
            $e = null;
            if ($err !== SOCKET_EAGAIN || @socket_select($r, $w, $e, (int) CLIENT_TIMEOUT) < 1) {
                return false;
            }
            continue;
        }
        $data = substr($data, $n);
    }
    return true;
}

/** One line (with its "\n"), or what came before EOF; null on timeout or error. */
function read_line(Socket $s): ?string
{
    $line = '';
    while (!str_ends_with($line, "\n") && strlen($line) < 4096) {
        $r = [$s];
        $w = [];
        $e = null;
        if (@socket_select($r, $w, $e, (int) CLIENT_TIMEOUT) < 1) {
            return null;
        }
        $buf = '';
        $n = @socket_recv($s, $buf, 1, MSG_DONTWAIT);
        if ($n === false) {
            if (socket_last_error($s) === SOCKET_EAGAIN) {
                socket_clear_error($s);
                continue;
            }
            return null;
        }
        if ($n === 0) {
            break;
        }
        $line .= $buf;
    }
    return $line;
}

/** @param array{id:int, meta:string, data:string} $e */
function serve(Socket $s, array $e, ?array $meta): void
{
    $route = is_array($meta) && is_string($meta['route'] ?? null) ? $meta['route'] : '-';
    $reply = sprintf("PHP worker %d got %d pre-read bytes: %s; meta route=%s\n", getmypid(), strlen($e['data']), $e['data'], $route);
    if (!write_all($s, $reply) || ($line = read_line($s)) === null || !write_all($s, $line)) {
        fprintf(STDERR, "worker.php: client of handoff %u went away\n", $e['id']);
    }
    socket_close($s);
}

function on_handoff(Connection $c, Frame $f): void
{
    $entries = Codec::decodeHandoff($f->payload);
    if (count($entries) !== count($f->fds)) {
        throw new ProtocolError('fd-count-mismatch', 'HANDOFF lists ' . count($entries) . ' sockets but carries ' . count($f->fds) . ' fds', 'channel');
    }
    if ($f->flags & Sockshare\FLAG_WSA) {
        throw new ProtocolError('unexpected-frame', 'Windows handoff on a UNIX channel');
    }
    // check every descriptor before acting on any: a bad frame is refused whole
    foreach ($entries as $i => $e) {
        $fd = $f->fds[$i];
        $type = $fd instanceof Socket ? @socket_get_option($fd, SOL_SOCKET, SO_TYPE) : false;
        if ($type !== Sockshare\OS_TYPES[$e['type']]) {
            throw new ProtocolError('wrong-socket', "descriptor of handoff {$e['id']} is not the socket its entry says", 'channel');
        }
    }
    $ack = ($f->flags & Sockshare\FLAG_ACK) !== 0;
    $accepted = [];
    $metas = [];
    foreach ($entries as $i => $e) {
        $metas[$i] = $e['meta'] === '' ? [] : json_decode($e['meta'], true);
        if (!is_array($metas[$i]) || ($metas[$i]['reject'] ?? false) !== true) {
            $accepted[] = $e['id'];
            continue;
        }
        Sockshare\close_fd($f->take($i)); // our copy; the sender's stays open
        out(sprintf('rejected %u', $e['id']));
        if ($ack) {
            $c->sendFrame(Sockshare\REJECT, 0, Codec::encodeReject($e['id'], 'the metadata asked for a reject'));
        }
    }
    if ($ack && $accepted) {
        // one ACCEPT for all of them: the sockets are ours from here on
        $c->sendFrame(Sockshare\ACCEPT, 0, Codec::encodeAccept($accepted));
    }
    $served = 0;
    foreach ($entries as $i => $e) {
        if ($f->fds[$i] !== null) {
            serve($f->take($i), $e, $metas[$i]);
            $served++;
            out(sprintf('served %u', $e['id']));
        }
    }
    if ($served > 0 && getenv('SOCKSHARE_WORKER_ID') !== false) {
        // under `sockshare serve --worker-cmd`: report the closes, so that least-conn and
        // --max-conns count this worker's open connections right
        $c->sendFrame(Sockshare\CONTROL, 0, json_encode(['ev' => 'closed', 'n' => $served]));
    }
}

function main(array $argv): int
{
    if (count($argv) !== 2) {
        fwrite(STDERR, "usage: php worker.php CHANNEL_PATH\n");
        return 2;
    }
    try {
        $c = Connection::connectUnix($argv[1]);
    } catch (Throwable $e) {
        fwrite(STDERR, "worker.php: {$e->getMessage()}\n");
        return 1;
    }
    try {
        $c->handshake(Sockshare\ROLE_RECEIVER, 'php-worker');
    } catch (Throwable $e) {
        fwrite(STDERR, 'worker.php: handshake failed: ' . $e->getMessage() . "\n");
        $c->close();
        return 1;
    }
    out(sprintf('ready pid=%d fds=%d peer=%d', getmypid(), Sockshare\fd_count(), $c->peer['pid']));
    $status = 0;
    for (;;) {
        try {
            $f = $c->recvFrame(IDLE_TIMEOUT);
        } catch (Closed) {
            break;
        } catch (Timeout) {
            fwrite(STDERR, "worker.php: idle for " . IDLE_TIMEOUT . " s, giving up\n");
            $status = 3;
            break;
        } catch (ProtocolError $e) {
            fwrite(STDERR, "worker.php: {$e->getMessage()}\n");
            $c->sendError(Sockshare\CODE_PROTOCOL, 'PHP worker: ' . $e->getMessage());
            $status = 1;
            break;
        } catch (Throwable $e) {
            fwrite(STDERR, "worker.php: {$e->getMessage()}\n");
            $status = 1;
            break;
        }
        try {
            if ($f->type === Sockshare\HANDOFF) {
                on_handoff($c, $f);
            } elseif ($f->type === Sockshare\BYE) {
                break;
            } elseif ($f->type === Sockshare\CONTROL) {
                if ($f->fds) {
                    throw new ProtocolError('fds-on-wrong-frame', 'CONTROL frame with descriptors', 'channel');
                }
            } elseif ($f->type === Sockshare\ERROR) {
                $err = Codec::decodeError($f->payload);
                throw new PeerError("the peer reported error {$err['code']}: {$err['text']}");
            } else {
                throw new ProtocolError('unexpected-frame', sprintf('unexpected frame type 0x%02x', $f->type));
            }
        } catch (ProtocolError $e) {
            fwrite(STDERR, "worker.php: {$e->getMessage()}\n");
            $c->sendError(Sockshare\CODE_PROTOCOL, 'PHP worker: ' . $e->getMessage());
            $status = 1;
            break;
        } catch (Throwable $e) {
            fwrite(STDERR, "worker.php: {$e->getMessage()}\n");
            $status = 1;
            break;
        } finally {
            $f->release(); // closes any descriptor not taken
        }
    }
    // every received descriptor is closed by now (served, rejected or released)
    out(sprintf('bye fds=%d', Sockshare\fd_count()));
    $c->close();
    return $status;
}

exit(main($argv));
