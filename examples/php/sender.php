<?php
/*
 * sender.php - hand one TCP connection to a sockshare channel receiver, in PHP
 * (the twin of examples/c/sender.c).
 *
 *     php sender.php CHANNEL_PATH
 *
 * Listens on 127.0.0.1 (an ephemeral port, printed as "port <n>"), accepts one
 * client, reads its first line, connects to the channel at CHANNEL_PATH, handshakes
 * and sends a HANDOFF with FLAG_ACK: the socket, metadata {"from":"php"} and the line
 * it read as pre-read data. Then it waits for the answer:
 *   ACCEPT  -> closes its copy, prints "accepted <id>";
 *   REJECT  -> keeps the connection, tells the client "PHP sender kept it: <reason>",
 *              prints "rejected <reason>";
 *   the channel breaks first -> the same as a reject ("returned").
 * Ends with BYE and "done fds=<n>". Exit 0 on any of the three outcomes, 1 on errors.
 */

declare(strict_types=1);

require __DIR__ . '/sockshare.php';

use Sockshare\Closed;
use Sockshare\Codec;
use Sockshare\Connection;
use Sockshare\ProtocolError;

const TIMEOUT = 20;

function out(string $line): void
{
    fwrite(STDOUT, $line . "\n");
    fflush(STDOUT);
}

/** Read until the first "\n" (or EOF). Whatever was read is pre-read data. */
function read_first_line(Socket $s): ?string
{
    $data = '';
    while (!str_contains($data, "\n") && strlen($data) < Sockshare\MAX_DATA) {
        $r = [$s];
        $w = [];
        $e = null;
        if (@socket_select($r, $w, $e, TIMEOUT) < 1) {
            return null;
        }
        $buf = '';
        $n = @socket_recv($s, $buf, Sockshare\MAX_DATA - strlen($data), 0);
        if ($n === false) {
            return null;
        }
        if ($n === 0) {
            break;
        }
        $data .= $buf;
    }
    return $data;
}

function tell_client(Socket $s, string $reason): void
{
    @socket_send($s, "PHP sender kept it: $reason\n", strlen("PHP sender kept it: $reason\n"), MSG_NOSIGNAL);
}

function main(array $argv): int
{
    if (count($argv) !== 2) {
        fwrite(STDERR, "usage: php sender.php CHANNEL_PATH\n");
        return 2;
    }
    $l = socket_create(AF_INET, SOCK_STREAM, SOL_TCP);
    socket_set_option($l, SOL_SOCKET, SO_REUSEADDR, 1);
    if (!socket_bind($l, '127.0.0.1', 0) || !socket_listen($l, 8) || !socket_getsockname($l, $addr, $port)) {
        fwrite(STDERR, 'sender.php: listen: ' . socket_strerror(socket_last_error()) . "\n");
        return 1;
    }
    out("port $port");
    $r = [$l];
    $w = [];
    $e = null;
    if (@socket_select($r, $w, $e, TIMEOUT) < 1) {
        fwrite(STDERR, "sender.php: no client within " . TIMEOUT . " s\n");
        return 1;
    }
    $client = socket_accept($l);
    socket_close($l);
    $pre = $client === false ? null : read_first_line($client);
    if ($pre === null) {
        fwrite(STDERR, "sender.php: no first line from the client\n");
        return 1;
    }

    try {
        $c = Connection::connectUnix($argv[1]);
    } catch (Throwable $e) {
        fwrite(STDERR, "sender.php: {$e->getMessage()}\n");
        socket_close($client);
        return 1;
    }
    $id = 1;
    $status = 0;
    try {
        $c->handshake(Sockshare\ROLE_SENDER, 'php-sender');
        $payload = Codec::encodeHandoff([[
            'id' => $id, 'family' => Sockshare\FAMILY_INET, 'type' => Sockshare\TYPE_STREAM,
            'proto' => SOL_TCP, 'meta' => '{"from":"php"}', 'data' => $pre,
        ]]);
        $c->sendFrame(Sockshare\HANDOFF, Sockshare\FLAG_ACK, $payload, [$client]);
        // until the answer the connection is still ours too (FLAG_ACK)
        for ($answered = false; !$answered;) {
            $f = $c->recvFrame((float) TIMEOUT);
            try {
                if ($f->fds) {
                    throw new ProtocolError('fds-on-wrong-frame', 'a receiver sent descriptors', 'channel');
                }
                if ($f->type === Sockshare\ACCEPT) {
                    foreach (Codec::decodeAccept($f->payload) as $aid) {
                        if ($aid !== $id) {
                            throw new ProtocolError('unexpected-frame', "ACCEPT of handoff $aid, which is not pending");
                        }
                        socket_close($client);
                        $client = null;
                        $answered = true;
                        out("accepted $id");
                    }
                } elseif ($f->type === Sockshare\REJECT) {
                    $rej = Codec::decodeReject($f->payload);
                    if ($rej['id'] !== $id) {
                        throw new ProtocolError('unexpected-frame', "REJECT of handoff {$rej['id']}, which is not pending");
                    }
                    $answered = true;
                    out("rejected {$rej['reason']}");
                    tell_client($client, $rej['reason']);
                } elseif ($f->type === Sockshare\BYE) {
                    throw new Closed('the receiver ended the channel');
                } elseif ($f->type !== Sockshare\CONTROL) {
                    throw new ProtocolError('unexpected-frame', sprintf('unexpected frame type 0x%02x', $f->type));
                }
            } finally {
                $f->release();
            }
        }
        $c->sendFrame(Sockshare\BYE, 0, '');
    } catch (Closed $e) {
        out("returned {$e->getMessage()}");
        if ($client !== null) {
            tell_client($client, $e->getMessage());
        }
    } catch (Throwable $e) {
        if ($e instanceof ProtocolError) {
            $c->sendError(Sockshare\CODE_PROTOCOL, 'PHP sender: ' . $e->getMessage());
        }
        fwrite(STDERR, "sender.php: {$e->getMessage()}\n");
        out("returned {$e->getMessage()}");
        if ($client !== null) {
            tell_client($client, $e->getMessage());
        }
        $status = 1;
    }
    if ($client !== null) {
        socket_close($client);
    }
    $c->close();
    out(sprintf('done fds=%d', Sockshare\fd_count()));
    return $status;
}

exit(main($argv));
