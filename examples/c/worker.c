/*
 * worker.c - a sockshare channel receiver in C.
 *
 *     worker CHANNEL_PATH
 *
 * Connects to a listening channel (a Python `sockshare.Channel.listen(path)`, say),
 * handshakes, then for every handed-off socket:
 *   - metadata {"reject": true}: closes its copy and answers REJECT (the sender keeps
 *     the connection);
 *   - otherwise answers ACCEPT (the sender closes its copy: the connection is ours),
 *     writes "C worker <pid> got <n> pre-read bytes: <data>; meta route=<route>\n",
 *     echoes one line read from the socket, and closes it.
 * ACCEPT/REJECT are only sent when the HANDOFF asked for them (FLAG_ACK).
 *
 * stdout: "ready pid=<pid> fds=<n>" after the handshake, "bye fds=<n>" at the end
 * (n: descriptors held, so a test can see that none leaked). Exit status: 0 after BYE
 * or an orderly close, 1 on a protocol or system error (reported on stderr, and to the
 * peer as an ERROR frame), 3 when nothing arrives for 60 s.
 */
#define _GNU_SOURCE
#include "sockshare_peer.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define IDLE_TIMEOUT_MS 60000
#define CLIENT_TIMEOUT_MS 10000

/* --- serving one client (plain POSIX; the socket may be O_NONBLOCK: the flag lives in
 *     the open file description, which we share with the sender) ------------------- */

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            if (poll(&pf, 1, CLIENT_TIMEOUT_MS) <= 0) return -1;
            continue;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One line (up to and with '\n', or what came before EOF), at most cap bytes. */
static ssize_t read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    while (n < cap) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int r = poll(&pf, 1, CLIENT_TIMEOUT_MS);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        ssize_t k = recv(fd, buf + n, 1, MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return -1;
        }
        if (k == 0) break;
        if (buf[n++] == '\n') break;
    }
    return (ssize_t)n;
}

static void route_of(const struct ss_entry *e, char *out, size_t cap)
{
    const char *v;
    size_t vl;
    snprintf(out, cap, "-");
    if (ss_json_member((const char *)e->meta, e->meta_len, "route", &v, &vl) == 1 && vl >= 2 &&
        v[0] == '"')
        snprintf(out, cap, "%.*s", (int)(vl - 2), v + 1); /* escapes are left as they are */
}

static int wants_reject(const struct ss_entry *e)
{
    const char *v;
    size_t vl;
    return ss_json_member((const char *)e->meta, e->meta_len, "reject", &v, &vl) == 1 &&
           vl == 4 && memcmp(v, "true", 4) == 0;
}

static void serve(int fd, const struct ss_entry *e)
{
    char head[128], route[256], tail[300], line[4096];
    route_of(e, route, sizeof route);
    int hn = snprintf(head, sizeof head, "C worker %d got %u pre-read bytes: ", (int)getpid(),
                      e->data_len);
    int tn = snprintf(tail, sizeof tail, "; meta route=%s\n", route);
    size_t n = (size_t)hn + e->data_len + (size_t)tn; /* both fit their buffers */
    char *reply = malloc(n);
    if (!reply) {
        close(fd);
        return;
    }
    memcpy(reply, head, (size_t)hn);
    memcpy(reply + hn, e->data, e->data_len);
    memcpy(reply + hn + e->data_len, tail, (size_t)tn);
    ssize_t k;
    if (write_all(fd, reply, n) < 0 || (k = read_line(fd, line, sizeof line)) < 0 ||
        write_all(fd, line, (size_t)k) < 0)
        fprintf(stderr, "worker: client of handoff %llu went away\n",
                (unsigned long long)e->id);
    free(reply);
    close(fd);
}

/* --- one HANDOFF frame -------------------------------------------------------------- */

static int on_handoff(struct ss_conn *c, struct ss_frame *f)
{
    static struct ss_entry e[SS_MAX_FDS];
    size_t count;
    int r = ss_handoff_decode(f->payload, f->h.length, e, SS_MAX_FDS, &count);
    if (r != SS_OK) return r;
    if (count != (size_t)f->nfds) return SS_E_FD_COUNT;
    if (f->h.flags & SS_FLAG_WSA) return SS_E_UNEXPECTED;
    /* check every descriptor before acting on any: a bad frame is refused whole */
    for (size_t i = 0; i < count; i++) {
        int type = -1;
        socklen_t len = sizeof type;
        if (getsockopt(f->fds[i], SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
            type != ss_os_type(e[i].type))
            return SS_E_WRONG_SOCKET;
    }
    int ack = f->h.flags & SS_FLAG_ACK;
    uint64_t accepted[SS_MAX_FDS];
    size_t naccepted = 0;
    uint8_t buf[8 + SS_MAX_REASON];
    size_t len;
    for (size_t i = 0; i < count; i++) {
        if (!wants_reject(&e[i])) {
            accepted[naccepted++] = e[i].id;
            continue;
        }
        close(f->fds[i]); /* our copy; the sender's stays open */
        f->fds[i] = -1;
        printf("rejected %llu\n", (unsigned long long)e[i].id);
        if (ack) {
            const char *why = "the metadata asked for a reject";
            ss_reject_encode(e[i].id, why, strlen(why), buf, sizeof buf, &len);
            r = ss_send_frame(c, SS_REJECT, 0, buf, len, NULL, 0, 5000);
            if (r != SS_OK) return r;
        }
    }
    if (ack && naccepted) {
        /* one ACCEPT for all of them: the sockets are ours from here on */
        uint8_t abuf[2 + 8 * SS_MAX_FDS];
        ss_accept_encode(accepted, naccepted, abuf, sizeof abuf, &len);
        r = ss_send_frame(c, SS_ACCEPT, 0, abuf, len, NULL, 0, 5000);
        if (r != SS_OK) return r;
    }
    fflush(stdout);
    unsigned served = 0;
    for (size_t i = 0; i < count; i++) {
        if (f->fds[i] < 0) continue;
        int fd = f->fds[i];
        f->fds[i] = -1; /* taken: serve() closes it */
        serve(fd, &e[i]);
        served++;
        printf("served %llu\n", (unsigned long long)e[i].id);
        fflush(stdout);
    }
    if (served && getenv("SOCKSHARE_WORKER_ID")) {
        /* under `sockshare serve --worker-cmd`: report the closes, so that least-conn
         * and --max-conns count this worker's open connections right */
        char report[64];
        int n = snprintf(report, sizeof report, "{\"ev\":\"closed\",\"n\":%u}", served);
        r = ss_send_frame(c, SS_CONTROL, 0, (const uint8_t *)report, (size_t)n, NULL, 0, 5000);
        if (r != SS_OK) return r;
    }
    return SS_OK;
}

int main(int argc, char **argv)
{
    struct ss_conn c;
    struct ss_frame f;
    int r, status = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: %s CHANNEL_PATH\n", argv[0]);
        return 2;
    }
    r = ss_connect_unix(&c, argv[1], 5000);
    if (r == SS_OK) r = ss_handshake(&c, SS_ROLE_RECEIVER, "c-worker", 5000);
    if (r != SS_OK) {
        fprintf(stderr, "worker: handshake failed (%s): %s\n", ss_reason(r), c.err);
        ss_close(&c);
        return 1;
    }
    printf("ready pid=%d fds=%d peer=%u\n", (int)getpid(), ss_count_fds(), c.peer.pid);
    fflush(stdout);
    for (;;) {
        r = ss_recv_frame(&c, &f, IDLE_TIMEOUT_MS);
        if (r == SS_E_CLOSED) break;
        if (r == SS_E_TIMEOUT) {
            fprintf(stderr, "worker: idle for %d ms, giving up\n", IDLE_TIMEOUT_MS);
            status = 3;
            break;
        }
        if (r == SS_OK) {
            c.err[0] = '\0';
            switch (f.h.type) {
            case SS_HANDOFF:
                r = on_handoff(&c, &f);
                break;
            case SS_BYE:
                r = 1; /* done */
                break;
            case SS_CONTROL: /* server control messages: nothing for this worker */
                r = f.nfds ? SS_E_FDS_ON_WRONG_FRAME : SS_OK;
                break;
            case SS_ERROR: {
                uint16_t code;
                const uint8_t *text;
                size_t tlen;
                r = ss_error_decode(f.payload, f.h.length, &code, &text, &tlen);
                if (r == SS_OK) {
                    fprintf(stderr, "worker: the peer reported error %u: %.*s\n", code,
                            (int)tlen, (const char *)text);
                    r = SS_E_PEER_ERROR;
                }
                break;
            }
            default: /* HELLO again, ACCEPT/REJECT for handoffs we never sent, ... */
                r = SS_E_UNEXPECTED;
            }
            ss_frame_release(&f); /* closes any descriptor not taken */
            if (r == 1) break;
            if (r == SS_OK) continue;
        }
        if (r != SS_E_PEER_ERROR) {
            fprintf(stderr, "worker: %s%s%s\n", ss_reason(r), c.err[0] ? ": " : "", c.err);
            if (ss_is_protocol_error(r)) {
                char text[600];
                snprintf(text, sizeof text, "C worker: %s %s", ss_reason(r), c.err);
                ss_send_error(&c, SS_CODE_PROTOCOL, text);
            }
        }
        status = 1;
        break;
    }
    /* every received descriptor is closed by now (served, rejected or released) */
    printf("bye fds=%d\n", ss_count_fds());
    ss_close(&c);
    return status;
}
