<?php
/*
 * sockshare.php - a PHP peer for the sockshare handoff channel, protocol v1.
 *
 * Needs PHP >= 8.1 CLI on Linux with ext/sockets (socket_sendmsg/socket_recvmsg) and
 * ext/posix (posix_getuid). Two layers, like the C example:
 *
 *   Codec       the 12-byte frame header and the HELLO, HANDOFF, ACCEPT, REJECT and
 *               ERROR payloads (pack/unpack, big-endian), with every check of the
 *               Python reference; errors are ProtocolError with the reason codes of
 *               tests/vectors/frames.json.
 *   Connection  a UNIX stream connection: recvmsg with MSG_CMSG_CLOEXEC and a
 *               MSG_CTRUNC check, descriptors queued and handed to the frame whose
 *               first byte they came with, sendmsg with SCM_RIGHTS on a frame's first
 *               byte, the HELLO handshake (the listener's pid/uid checked with
 *               SO_PASSCRED), and every held descriptor closed on any error.
 *
 * PHP specifics (more in README.md):
 *   - received descriptors come back as Socket objects (sockets) or stream resources
 *     (anything else); Frame::release() closes whatever the caller did not take;
 *   - socket_sendmsg() in PHP 8.0 .. 8.x (before php-src PR #22338) sends the wrong
 *     descriptor for a *Socket object* in SCM_RIGHTS (fd 0 instead of the socket):
 *     Connection::sendFrame() therefore always sends socket_export_stream() streams,
 *     which every version handles right;
 *   - handoff ids are u64 on the wire; PHP ints are signed 64-bit, so ids above
 *     PHP_INT_MAX appear negative here (the same bits; format them with %u);
 *   - PHP has no SO_PEERCRED; SCM_CREDENTIALS (SO_PASSCRED) gives the same check.
 */

declare(strict_types=1);

namespace Sockshare;

const HEADER_SIZE = 12;
const VERSION = 1;
const MAX_PAYLOAD = 1 << 20;
const HANDSHAKE_MAX = 4096;
const MAX_FDS = 253;
const MAX_META = 16384;
const MAX_DATA = 65536;
const MAX_REASON = 1024;
const MAX_ERROR_TEXT = 4094;
const ENTRY_SIZE = 20;

const HELLO = 0x01;
const ERROR = 0x02;
const BYE = 0x03;
const HANDOFF = 0x20;
const ACCEPT = 0x21;
const REJECT = 0x22;
const CONTROL = 0x30;
const KNOWN_TYPES = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21, 0x22, 0x30];

const FLAG_ACK = 0x01;
const FLAG_WSA = 0x02;
const ROLE_SENDER = 1;
const ROLE_RECEIVER = 2;
const FEATURE_SCM = 0x1;
const FEATURE_ACK = 0x4;

const FAMILY_INET = 1;
const FAMILY_INET6 = 2;
const FAMILY_UNIX = 3;
const TYPE_STREAM = 1;
const TYPE_DGRAM = 2;
const TYPE_SEQPACKET = 3;
/** portable type code => the OS's SO_TYPE value */
const OS_TYPES = [TYPE_STREAM => SOCK_STREAM, TYPE_DGRAM => SOCK_DGRAM, TYPE_SEQPACKET => SOCK_SEQPACKET];
const FAMILIES = [FAMILY_INET, FAMILY_INET6, FAMILY_UNIX];

const CODE_PROTOCOL = 6;
const CODE_REFUSED = 7;

/** The peer broke the protocol. $reason is a code of tests/vectors/frames.json. */
final class ProtocolError extends \RuntimeException
{
    public function __construct(public readonly string $reason, string $message, public readonly string $layer = 'frame')
    {
        parent::__construct("$reason: $message");
    }
}

/** The peer sent an ERROR frame. */
final class PeerError extends \RuntimeException
{
}

/** The peer closed the connection between two frames. */
final class Closed extends \RuntimeException
{
}

/** Nothing arrived (or could be sent) in time; the connection is still usable. */
final class Timeout extends \RuntimeException
{
}

/** A system call failed. */
final class SystemError extends \RuntimeException
{
}

/** Close a received descriptor, whatever PHP wrapped it in. */
function close_fd(mixed $fd): void
{
    if ($fd instanceof \Socket) {
        @socket_close($fd);
    } elseif (is_resource($fd)) {
        @fclose($fd);
    }
}

/**
 * errno of the last failed call on $sock, cleared. socket_sendmsg()/socket_recvmsg()
 * record it only globally, the other functions on the socket: look at both.
 */
function last_error(\Socket $sock): int
{
    $err = socket_last_error($sock) ?: socket_last_error();
    socket_clear_error($sock);
    socket_clear_error();
    return $err;
}

/** Descriptors this process holds (entries of /proc/self/fd). */
function fd_count(): int
{
    $n = 0;
    foreach (scandir('/proc/self/fd') ?: [] as $f) {
        if ($f[0] !== '.') {
            $n++;
        }
    }
    return $n - 1; // not scandir's own descriptor
}

final class Codec
{
    public static function utf8Valid(string $s): bool
    {
        return $s === '' || preg_match('//u', $s) === 1;
    }

    /** $s cut to at most $limit bytes on a UTF-8 character boundary. */
    public static function utf8Cut(string $s, int $limit): string
    {
        if (strlen($s) <= $limit) {
            return $s;
        }
        $cut = $limit;
        while ($cut > 0 && (ord($s[$cut]) & 0xC0) === 0x80) {
            $cut--;
        }
        return substr($s, 0, $cut);
    }

    public static function header(int $type, int $flags, int $nfds, int $length): string
    {
        return pack('a2CCCCnN', 'SS', VERSION, $type, $flags, $nfds, 0, $length);
    }

    /** @return array{type:int, flags:int, nfds:int, length:int} */
    public static function parseHeader(string $raw, int $maxPayload): array
    {
        $h = unpack('a2magic/Cversion/Ctype/Cflags/Cnfds/nreserved/Nlength', $raw);
        // the order of the checks is the Python reference's: the same reason for the same bytes
        if ($h['magic'] !== 'SS') {
            throw new ProtocolError('bad-magic', 'the peer does not speak sockshare');
        }
        if ($h['version'] !== VERSION) {
            throw new ProtocolError('bad-version', "frame of protocol version {$h['version']}");
        }
        if (!in_array($h['type'], KNOWN_TYPES, true)) {
            throw new ProtocolError('unknown-type', sprintf('unknown frame type 0x%02x', $h['type']));
        }
        if ($h['reserved'] !== 0) {
            throw new ProtocolError('reserved-not-zero', 'reserved header bytes are not zero');
        }
        if ($h['length'] > $maxPayload) {
            throw new ProtocolError('payload-too-large', "frame announces {$h['length']} payload bytes; the limit is $maxPayload");
        }
        if ($h['nfds'] > MAX_FDS) {
            throw new ProtocolError('too-many-fds', "frame announces {$h['nfds']} descriptors");
        }
        return ['type' => $h['type'], 'flags' => $h['flags'], 'nfds' => $h['nfds'], 'length' => $h['length']];
    }

    private static function need(string $p, int $n, string $what): void
    {
        if (strlen($p) < $n) {
            throw new ProtocolError('bad-length', "$what payload has " . strlen($p) . " bytes, expected $n", 'payload');
        }
    }

    private static function text(string $raw, string $what): string
    {
        if (!self::utf8Valid($raw)) {
            throw new ProtocolError('bad-utf8', "$what is not valid UTF-8", 'payload');
        }
        return $raw;
    }

    /** @param array{version?:int, role:int, features:int, pid:int, uid:int, max_payload:int, name:string} $h */
    public static function encodeHello(array $h): string
    {
        if (strlen($h['name']) > 255) {
            throw new \LengthException('a HELLO name is at most 255 bytes');
        }
        return pack('CCNNNN', $h['version'] ?? 1, $h['role'], $h['features'], $h['pid'], $h['uid'], $h['max_payload']) . $h['name'];
    }

    /** @return array{version:int, role:int, features:int, pid:int, uid:int, max_payload:int, name:string} */
    public static function decodeHello(string $p): array
    {
        self::need($p, 18, 'HELLO');
        if (strlen($p) > 18 + 255) {
            throw new ProtocolError('bad-length', 'HELLO payload has ' . strlen($p) . ' bytes, expected at most ' . (18 + 255) . ' (a name of 255 bytes)', 'payload');
        }
        $h = unpack('Cversion/Crole/Nfeatures/Npid/Nuid/Nmax_payload', $p);
        $h['name'] = self::text(substr($p, 18), 'HELLO name');
        return $h;
    }

    /**
     * @param list<array{id:int, family:int, type:int, proto:int, meta:string, data:string}> $entries
     */
    public static function encodeHandoff(array $entries): string
    {
        $out = pack('n', count($entries));
        foreach ($entries as $e) {
            if (strlen($e['meta']) > MAX_META || strlen($e['data']) > MAX_DATA) {
                throw new \LengthException('handoff metadata or data over the limits');
            }
            $out .= pack('JCCnNN', $e['id'], $e['family'], $e['type'], $e['proto'], strlen($e['meta']), strlen($e['data']))
                . $e['meta'] . $e['data'];
        }
        return $out;
    }

    /** @return list<array{id:int, family:int, type:int, proto:int, meta:string, data:string}> */
    public static function decodeHandoff(string $p): array
    {
        self::need($p, 2, 'HANDOFF');
        $count = unpack('n', $p)[1];
        if ($count === 0) {
            throw new ProtocolError('no-entries', 'HANDOFF frame with no entries', 'payload');
        }
        $pos = 2;
        $n = strlen($p);
        $out = [];
        for ($i = 0; $i < $count; $i++) {
            self::need($p, $pos + ENTRY_SIZE, 'HANDOFF entry');
            $e = unpack('Jid/Cfamily/Ctype/nproto/Nmeta_len/Ndata_len', $p, $pos);
            $pos += ENTRY_SIZE;
            if ($e['meta_len'] > MAX_META || $e['data_len'] > MAX_DATA) {
                throw new ProtocolError('entry-over-limits', "handoff entry with {$e['meta_len']} metadata / {$e['data_len']} data bytes is over the limits", 'payload');
            }
            self::need($p, $pos + $e['meta_len'] + $e['data_len'], 'HANDOFF entry body');
            $e['meta'] = substr($p, $pos, $e['meta_len']);
            $e['data'] = substr($p, $pos + $e['meta_len'], $e['data_len']);
            $pos += $e['meta_len'] + $e['data_len'];
            if (!in_array($e['family'], FAMILIES, true) || !isset(OS_TYPES[$e['type']])) {
                throw new ProtocolError('unknown-kind', "unknown socket family/type codes {$e['family']}/{$e['type']}", 'payload');
            }
            unset($e['meta_len'], $e['data_len']);
            $out[] = $e;
        }
        if ($pos !== $n) {
            throw new ProtocolError('trailing-bytes', 'HANDOFF frame has ' . ($n - $pos) . ' trailing bytes', 'payload');
        }
        return $out;
    }

    /** @param list<int> $ids */
    public static function encodeAccept(array $ids): string
    {
        return pack('n', count($ids)) . pack('J*', ...$ids);
    }

    /** @return list<int> */
    public static function decodeAccept(string $p): array
    {
        self::need($p, 2, 'ACCEPT');
        $count = unpack('n', $p)[1];
        if (strlen($p) !== 2 + 8 * $count) {
            throw new ProtocolError('bad-length', 'ACCEPT payload has ' . strlen($p) . ' bytes, expected ' . (2 + 8 * $count), 'payload');
        }
        return $count ? array_values(unpack("J$count", $p, 2)) : [];
    }

    public static function encodeReject(int $id, string $reason): string
    {
        return pack('J', $id) . self::utf8Cut($reason, MAX_REASON);
    }

    /** @return array{id:int, reason:string} */
    public static function decodeReject(string $p): array
    {
        self::need($p, 8, 'REJECT');
        return ['id' => unpack('J', $p)[1], 'reason' => self::text(substr($p, 8), 'REJECT reason')];
    }

    public static function encodeError(int $code, string $text): string
    {
        return pack('n', $code) . self::utf8Cut($text, MAX_ERROR_TEXT);
    }

    /** @return array{code:int, text:string} */
    public static function decodeError(string $p): array
    {
        self::need($p, 2, 'ERROR');
        return ['code' => unpack('n', $p)[1], 'text' => self::text(substr($p, 2), 'ERROR text')];
    }
}

/** One received frame. It owns $fds (Socket objects or streams) until they are taken. */
final class Frame
{
    /** @param list<mixed> $fds */
    public function __construct(
        public readonly int $type,
        public readonly int $flags,
        public readonly string $payload,
        public array $fds,
    ) {
    }

    /** Take descriptor $i: the caller owns it from now on. */
    public function take(int $i): mixed
    {
        $fd = $this->fds[$i];
        $this->fds[$i] = null;
        return $fd;
    }

    /** Close every descriptor not taken. */
    public function release(): void
    {
        foreach ($this->fds as $i => $fd) {
            close_fd($fd);
            $this->fds[$i] = null;
        }
    }
}

final class Connection
{
    public int $maxPayload = MAX_PAYLOAD;
    public int $peerMaxPayload = MAX_PAYLOAD;
    /** @var array<string, int|string> the peer's HELLO */
    public array $peer = [];
    private string $buf = '';
    /** @var list<mixed> received descriptors no frame has claimed yet */
    private array $fdq = [];
    /** @var array{type:int, flags:int, nfds:int, length:int}|null */
    private ?array $pending = null;
    /** @var list<mixed> */
    private array $pendingFds = [];
    private ?\Throwable $failed = null;
    /** @var array{pid:int, uid:int}|null credentials of the last message (SO_PASSCRED) */
    private ?array $lastCreds = null;

    public function __construct(public readonly \Socket $sock)
    {
    }

    public static function connectUnix(string $path): self
    {
        $sock = socket_create(AF_UNIX, SOCK_STREAM, 0);
        if ($sock === false) {
            throw new SystemError('socket: ' . socket_strerror(socket_last_error()));
        }
        // credentials of every message we receive: the handshake checks the listener's
        socket_set_option($sock, SOL_SOCKET, SO_PASSCRED, 1);
        if (!@socket_connect($sock, $path)) {
            $err = socket_strerror(socket_last_error($sock));
            socket_close($sock);
            throw new SystemError("connect $path: $err");
        }
        return new self($sock);
    }

    /** The connecting side: send our HELLO, read the listener's HELLO (or ERROR). */
    public function handshake(int $role, string $name, float $timeout = 5.0): void
    {
        $hello = Codec::encodeHello([
            'role' => $role, 'features' => FEATURE_SCM | FEATURE_ACK, 'pid' => getmypid(),
            'uid' => posix_getuid(), 'max_payload' => $this->maxPayload, 'name' => $name,
        ]);
        $this->sendFrame(HELLO, 0, $hello, [], $timeout);
        $limit = $this->maxPayload;
        $this->maxPayload = min(HANDSHAKE_MAX, $limit);
        try {
            $f = $this->recvFrame($timeout);
        } finally {
            $this->maxPayload = $limit;
        }
        $creds = $this->lastCreds;
        socket_set_option($this->sock, SOL_SOCKET, SO_PASSCRED, 0);
        if ($f->fds) {
            $f->release();
            $this->fail(new ProtocolError('fds-on-wrong-frame', "the peer's first frame carried descriptors", 'channel'));
        }
        if ($f->type === ERROR) {
            $e = Codec::decodeError($f->payload);
            $this->fail(new PeerError("the listener refused us (error {$e['code']}): {$e['text']}"));
        }
        if ($f->type !== HELLO) {
            $this->fail(new ProtocolError('unexpected-frame', sprintf('expected HELLO, got frame type 0x%02x', $f->type)));
        }
        try {
            $this->peer = Codec::decodeHello($f->payload);
        } catch (ProtocolError $e) {
            $this->fail($e);
        }
        if ($this->peer['version'] !== 1) {
            $this->fail(new ProtocolError('bad-version', "the peer speaks protocol {$this->peer['version']}"));
        }
        if (!($this->peer['features'] & FEATURE_SCM)) {
            $this->fail(new ProtocolError('unexpected-frame', 'the peer does not pass descriptors'));
        }
        if ($creds !== null && ($creds['pid'] !== $this->peer['pid'] || $creds['uid'] !== $this->peer['uid'])) {
            $this->sendError(CODE_REFUSED, 'HELLO pid/uid do not match the kernel\'s');
            $this->fail(new ProtocolError('peer-credentials', "HELLO says pid {$this->peer['pid']} uid {$this->peer['uid']}, the kernel says pid {$creds['pid']} uid {$creds['uid']}"));
        }
        $this->peerMaxPayload = min((int) $this->peer['max_payload'], MAX_PAYLOAD);
    }

    /** The next complete frame; Timeout leaves the connection usable, anything else fails it. */
    public function recvFrame(?float $timeout = null): Frame
    {
        if ($this->failed !== null) {
            throw $this->failed;
        }
        $deadline = $timeout === null ? null : microtime(true) + $timeout;
        for (;;) {
            if ($this->pending === null && strlen($this->buf) >= HEADER_SIZE) {
                try {
                    $h = Codec::parseHeader(substr($this->buf, 0, HEADER_SIZE), $this->maxPayload);
                } catch (ProtocolError $e) {
                    $this->fail($e);
                }
                if (count($this->fdq) < $h['nfds']) {
                    $this->fail(new ProtocolError('missing-fds', "frame announces {$h['nfds']} descriptors but " . count($this->fdq) . ' arrived'));
                }
                // the frame's descriptors came with its first byte: they head the queue
                $this->pendingFds = array_splice($this->fdq, 0, $h['nfds']);
                $this->pending = $h;
            }
            if ($this->pending !== null && strlen($this->buf) >= HEADER_SIZE + $this->pending['length']) {
                $h = $this->pending;
                $f = new Frame($h['type'], $h['flags'], substr($this->buf, HEADER_SIZE, $h['length']), $this->pendingFds);
                $this->buf = substr($this->buf, HEADER_SIZE + $h['length']);
                $this->pending = null;
                $this->pendingFds = [];
                return $f;
            }
            if ($this->pending === null && $this->buf === '' && $this->fdq) {
                $this->fail(new ProtocolError('stray-fds', count($this->fdq) . ' descriptors arrived with no frame'));
            }
            $this->read($deadline);
        }
    }

    private function read(?float $deadline): void
    {
        $msg = [
            'name' => [],
            'buffer_size' => 65536,
            'controllen' => socket_cmsg_space(SOL_SOCKET, SCM_RIGHTS, MAX_FDS) + socket_cmsg_space(SOL_SOCKET, SCM_CREDENTIALS),
        ];
        for (;;) {
            $n = @socket_recvmsg($this->sock, $msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
            if ($n !== false) {
                break;
            }
            $err = last_error($this->sock);
            if ($err !== SOCKET_EAGAIN && $err !== SOCKET_EINTR) {
                $this->fail(new SystemError('recvmsg: ' . socket_strerror($err)));
            }
            $this->wait(false, $deadline);
        }
        $got = [];
        foreach ($msg['control'] ?? [] as $cm) {
            if ($cm['level'] === SOL_SOCKET && $cm['type'] === SCM_RIGHTS) {
                foreach ($cm['data'] as $fd) {
                    $got[] = $fd;
                }
            } elseif ($cm['level'] === SOL_SOCKET && $cm['type'] === SCM_CREDENTIALS) {
                $this->lastCreds = ['pid' => $cm['data']['pid'], 'uid' => $cm['data']['uid']];
            }
        }
        if (($msg['flags'] ?? 0) & MSG_CTRUNC) {
            array_map(__NAMESPACE__ . '\close_fd', $got);
            $this->fail(new ProtocolError('fds-truncated', 'the kernel truncated the descriptors of a message (' . count($got) . ' arrived): at the fd limit (ulimit -n)?'));
        }
        array_push($this->fdq, ...$got);
        if (count($this->fdq) > 3 * MAX_FDS) {
            $this->fail(new ProtocolError('stray-fds', 'descriptors arrived that no frame claims'));
        }
        $data = $msg['iov'][0] ?? '';
        if ($n === 0 || $data === '') {
            if ($this->buf !== '' || $this->pending !== null) {
                $this->fail(new ProtocolError('truncated-frame', 'the peer closed the connection in the middle of a frame (' . strlen($this->buf) . ' bytes of it received)'));
            }
            if ($this->fdq) {
                $this->fail(new ProtocolError('stray-fds', 'the peer closed the connection leaving stray descriptors'));
            }
            $this->fail(new Closed('the peer closed the connection'));
        }
        $this->buf .= $data;
    }

    private function wait(bool $write, ?float $deadline): void
    {
        for (;;) {
            $left = $deadline === null ? null : max(0.0, $deadline - microtime(true));
            $r = $write ? [] : [$this->sock];
            $w = $write ? [$this->sock] : [];
            $e = null;
            $sec = $left === null ? null : (int) $left;
            $usec = $left === null ? 0 : (int) (($left - (int) $left) * 1e6);
            $ready = @socket_select($r, $w, $e, $sec, $usec);
            if ($ready > 0) {
                return;
            }
            if ($ready === 0) {
                throw new Timeout($write ? 'the peer does not read' : 'nothing arrived in time');
            }
            if (socket_last_error() !== SOCKET_EINTR) {
                $this->fail(new SystemError('select: ' . socket_strerror(socket_last_error())));
            }
        }
    }

    /**
     * Send one frame. $fds (Socket objects or streams) ride with its first byte.
     * @param list<mixed> $fds
     */
    public function sendFrame(int $type, int $flags, string $payload, array $fds = [], float $timeout = 5.0): void
    {
        if ($this->failed !== null) {
            throw $this->failed;
        }
        if (strlen($payload) > $this->peerMaxPayload || count($fds) > MAX_FDS) {
            throw new \LengthException('frame over the peer\'s limits');
        }
        $frame = Codec::header($type, $flags, count($fds), strlen($payload)) . $payload;
        $control = [];
        if ($fds) {
            // streams, not Socket objects: see the note at the top of this file
            $streams = array_map(fn ($fd) => $fd instanceof \Socket ? socket_export_stream($fd) : $fd, $fds);
            $control = [['level' => SOL_SOCKET, 'type' => SCM_RIGHTS, 'data' => $streams]];
        }
        $deadline = microtime(true) + $timeout;
        while ($frame !== '') {
            $message = ['iov' => [$frame]];
            if ($control) {
                $message['control'] = $control;
            }
            $n = @socket_sendmsg($this->sock, $message, MSG_NOSIGNAL | MSG_DONTWAIT);
            if ($n === false) {
                $err = last_error($this->sock);
                if ($err !== SOCKET_EAGAIN && $err !== SOCKET_EINTR) {
                    $this->fail(new SystemError('sendmsg: ' . socket_strerror($err)));
                }
                try {
                    $this->wait(true, $deadline);
                } catch (Timeout $t) {
                    $this->fail(new SystemError('the peer does not read'));
                }
                continue;
            }
            $frame = (string) substr($frame, $n);
            $control = []; // the descriptors travelled with the first byte: never again
        }
    }

    /** Best effort: tell the peer why we give up. */
    public function sendError(int $code, string $text): void
    {
        try {
            $failed = $this->failed;
            $this->failed = null;
            $this->sendFrame(ERROR, 0, Codec::encodeError($code, $text), [], 1.0);
        } catch (\Throwable) {
        } finally {
            $this->failed ??= $failed;
        }
    }

    private function fail(\Throwable $e): never
    {
        // the stream cannot be resynchronised: drop every descriptor we hold
        if (!($e instanceof Timeout)) {
            array_map(__NAMESPACE__ . '\close_fd', $this->fdq);
            array_map(__NAMESPACE__ . '\close_fd', $this->pendingFds);
            $this->fdq = [];
            $this->pendingFds = [];
            $this->pending = null;
            $this->failed = $e;
        }
        throw $e;
    }

    public function close(): void
    {
        array_map(__NAMESPACE__ . '\close_fd', $this->fdq);
        array_map(__NAMESPACE__ . '\close_fd', $this->pendingFds);
        $this->fdq = [];
        $this->pendingFds = [];
        @socket_close($this->sock);
    }
}
