/*
 * sender.c - hand one TCP connection to a sockshare channel receiver, in C.
 *
 *     sender CHANNEL_PATH
 *
 * Listens on 127.0.0.1 (an ephemeral port, printed as "port <n>"), accepts one
 * client, reads its first line, connects to the channel at CHANNEL_PATH, handshakes
 * and sends a HANDOFF with FLAG_ACK: the socket, metadata {"from":"c"} and the line it
 * read as pre-read data. Then it waits for the answer:
 *   ACCEPT  -> closes its copy, prints "accepted <id>";
 *   REJECT  -> keeps the connection, tells the client "C sender kept it: <reason>",
 *              prints "rejected <reason>";
 *   the channel breaks first -> the same as a reject ("returned").
 * Ends with BYE and "done fds=<n>". Exit 0 on any of the three outcomes, 1 on errors.
 */
#define _GNU_SOURCE
#include "sockshare_peer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define TIMEOUT_MS 20000

static const char META[] = "{\"from\":\"c\"}";

static int fail(const char *what)
{
    fprintf(stderr, "sender: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Read until the first '\n' (or EOF). Whatever was read is pre-read data. */
static ssize_t read_first_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    while (n < cap && !memchr(buf, '\n', n)) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        int r = poll(&pf, 1, TIMEOUT_MS);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        ssize_t k = recv(fd, buf + n, cap - n, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return -1;
        if (k == 0) break;
        n += (size_t)k;
    }
    return (ssize_t)n;
}

static void tell_client(int fd, const char *reason, size_t len)
{
    char msg[1200];
    int n = snprintf(msg, sizeof msg, "C sender kept it: %.*s\n", (int)len, reason);
    if (send(fd, msg, (size_t)n, MSG_NOSIGNAL) < 0)
        fprintf(stderr, "sender: client gone: %s\n", strerror(errno));
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CHANNEL_PATH\n", argv[0]);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t salen = sizeof sa;
    if (lfd < 0) return fail("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 8) < 0 ||
        getsockname(lfd, (struct sockaddr *)&sa, &salen) < 0)
        return fail("listen on 127.0.0.1");
    printf("port %d\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct pollfd pf = {.fd = lfd, .events = POLLIN};
    if (poll(&pf, 1, TIMEOUT_MS) <= 0) {
        fprintf(stderr, "sender: no client within %d ms\n", TIMEOUT_MS);
        return 1;
    }
    int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    close(lfd);
    if (cfd < 0) return fail("accept");
    static char pre[SS_MAX_DATA];
    ssize_t npre = read_first_line(cfd, pre, sizeof pre);
    if (npre < 0) {
        close(cfd);
        return fail("reading the client's first line");
    }

    struct ss_conn c;
    int r = ss_connect_unix(&c, argv[1], 5000);
    if (r == SS_OK) r = ss_handshake(&c, SS_ROLE_SENDER, "c-sender", 5000);
    if (r != SS_OK) {
        fprintf(stderr, "sender: handshake failed (%s): %s\n", ss_reason(r), c.err);
        ss_close(&c);
        close(cfd);
        return 1;
    }

    int proto = 0;
    socklen_t plen = sizeof proto;
    getsockopt(cfd, SOL_SOCKET, SO_PROTOCOL, &proto, &plen);
    struct ss_entry e = {.id = 1, .family = SS_FAMILY_INET, .type = SS_TYPE_STREAM,
                         .proto = (uint16_t)proto, .meta = (const uint8_t *)META,
                         .meta_len = sizeof META - 1, .data = (const uint8_t *)pre,
                         .data_len = (uint32_t)npre};
    static uint8_t payload[2 + SS_ENTRY_SIZE + sizeof META + SS_MAX_DATA];
    size_t len;
    r = ss_handoff_encode(&e, 1, payload, sizeof payload, &len);
    if (r == SS_OK) r = ss_send_frame(&c, SS_HANDOFF, SS_FLAG_ACK, payload, len, &cfd, 1, 5000);
    if (r != SS_OK) {
        fprintf(stderr, "sender: sending the handoff failed (%s): %s\n", ss_reason(r), c.err);
        ss_close(&c);
        close(cfd);
        return 1;
    }

    /* until the answer, the connection is still ours too (FLAG_ACK) */
    int status = 0, answered = 0;
    while (!answered) {
        struct ss_frame f;
        r = ss_recv_frame(&c, &f, TIMEOUT_MS);
        if (r != SS_OK) {
            const char *why = r == SS_E_CLOSED ? "the receiver went away" : c.err;
            printf("returned %s\n", why);
            tell_client(cfd, why, strlen(why));
            status = r == SS_E_CLOSED ? 0 : 1;
            break;
        }
        if (f.nfds) {
            r = SS_E_FDS_ON_WRONG_FRAME; /* we asked for nothing: a receiver sends no fds */
        } else if (f.h.type == SS_ACCEPT) {
            uint64_t ids[SS_MAX_FDS];
            size_t n;
            r = ss_accept_decode(f.payload, f.h.length, ids, SS_MAX_FDS, &n);
            for (size_t i = 0; r == SS_OK && i < n && i < SS_MAX_FDS; i++) {
                if (ids[i] != e.id) {
                    r = SS_E_UNEXPECTED; /* an answer to a handoff that is not pending */
                } else {
                    close(cfd);
                    cfd = -1;
                    answered = 1;
                    printf("accepted %llu\n", (unsigned long long)e.id);
                }
            }
        } else if (f.h.type == SS_REJECT) {
            uint64_t id;
            const uint8_t *reason;
            size_t rlen;
            r = ss_reject_decode(f.payload, f.h.length, &id, &reason, &rlen);
            if (r == SS_OK && id != e.id) r = SS_E_UNEXPECTED;
            if (r == SS_OK) {
                answered = 1;
                printf("rejected %.*s\n", (int)rlen, (const char *)reason);
                tell_client(cfd, (const char *)reason, rlen);
            }
        } else if (f.h.type == SS_BYE) {
            r = SS_E_CLOSED;
        } else if (f.h.type != SS_CONTROL) {
            r = SS_E_UNEXPECTED;
        }
        ss_frame_release(&f);
        if (r != SS_OK) {
            if (ss_is_protocol_error(r)) ss_send_error(&c, SS_CODE_PROTOCOL, ss_reason(r));
            printf("returned %s\n", ss_reason(r));
            tell_client(cfd, ss_reason(r), strlen(ss_reason(r)));
            status = r == SS_E_CLOSED ? 0 : 1;
            break;
        }
    }
    fflush(stdout);
    if (!c.failed) ss_send_frame(&c, SS_BYE, 0, NULL, 0, NULL, 0, 1000);
    if (cfd >= 0) close(cfd);
    ss_close(&c);
    printf("done fds=%d\n", ss_count_fds());
    return status;
}
