/* The floor of the dispatcher's job: the same work as `sockshare serve`'s dispatcher on
 * the benchmark's path (accept, least-conn, acknowledged handoff, no sniffing), in plain
 * C with no interpreter. Used by benchmarks/serve.py (configuration `c-dispatcher`,
 * docs/perf-dispatcher.md "The floor: the same job in C"). A benchmark program, not a
 * server: it has none of the dispatcher's other duties (re-dispatch, restarts,
 * migration, reload, control socket).
 *
 *   dispatcher LISTEN_FD CHANNEL_FD WORKERS
 *
 * LISTEN_FD: a listening TCP socket (inherited). CHANNEL_FD: a UNIX stream socket bound
 * to the channel's path, not yet listening: this process calls listen(), so that the
 * workers' SO_PEERCRED check of the listener names it. Real sockshare workers connect to
 * it (`python -m sockshare.server.worker --app serve_app:handle --channel PATH --id N`).
 * Prints `ready channel` on stdout once it listens, `ready <port>` once WORKERS workers
 * have done the handshake and sent their `{"ev":"hello"}` report; on SIGTERM/SIGINT
 * prints its counters on stderr and exits.
 *
 * Per worker channel: the HELLO exchange (checked against SO_PEERCRED, same uid only),
 * then the worker's frames: ACCEPT (our copies are closed), REJECT (closed as well: no
 * re-dispatch here, counted), CONTROL reports (`closed` lowers the worker's count,
 * `hello` makes it eligible, `fds` full/not full, `draining`/`fatal` retire it; others
 * ignored), BYE (retired), anything else ends the channel. A channel that ends closes
 * every copy still unanswered on it.
 *
 * The loop: epoll (level-triggered) on the listener and the channels. A listener event
 * is a burst: accept4 until EAGAIN (at most BURST), each connection's worker chosen as
 * sockshare's LeastConnections does from our own counts, its metadata written (the same
 * JSON as the Python dispatcher's), then one HANDOFF frame [ACK] per worker with its
 * descriptors (SCM_RIGHTS), one sendmsg each. A frame the socket does not take whole
 * waits in that worker's queue (the worker is not chosen until it is written); the
 * listener pauses while no worker can take a connection. Everything is bounded: BURST
 * connections a burst, TABLE unanswered handoffs (a connection that finds its slot
 * still taken is closed and counted as dropped), INBUF bytes of a worker's frames.
 *
 * CDISP_LINGER_US=N (an experiment, default 0): sleep N microseconds at the start of
 * each burst, so that more connections arrive and go in one frame per worker.
 *
 * Frames and HELLO come from the project's C peer (examples/c/sockshare_peer.c, its
 * codec only: the I/O here is non-blocking and one recvmsg per readable event).
 */
#define _GNU_SOURCE
#include "sockshare_peer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXW 16
#define BURST 64                 /* connections per burst (the Python sender: 64 a frame) */
#define TABLE 65536              /* unanswered handoffs (power of two) */
#define INBUF 65536              /* a worker's unread frames; its payloads must fit */
#define META_MAX 256             /* one connection's metadata */
#define FRAME_MAX (SS_HEADER_SIZE + 2 + BURST * (SS_ENTRY_SIZE + META_MAX))
#define LISTENER_TAG (-1)
#define CHANLISTEN_TAG (-2)

enum wstate { W_FREE, W_HANDSHAKE, W_UP, W_READY, W_RETIRED };

struct worker {
    int fd;
    enum wstate state;
    int id;            /* from the HELLO name "worker:N" */
    uint32_t pid;
    long load;         /* handed over and not yet closed/rejected */
    int full;          /* {"ev":"fds","full":true} */
    uint8_t in[INBUF];
    size_t inlen;
    /* a frame the socket did not take whole (fds: still to go with its first byte) */
    uint8_t out[FRAME_MAX];
    size_t outlen;
    int outfds[BURST], noutfds;
    /* this burst */
    int n;
    int fds[BURST];
    uint8_t frame[FRAME_MAX];
    size_t size;       /* bytes of frame used (header and count included) */
};

struct pending {
    uint64_t hid;      /* 0: free */
    int fd;
    int w;
};

static struct worker W[MAXW];
static int nworkers_expected;
static struct pending table[TABLE];
static int epfd, lfd, cfd, listener_on = 1;
static long last_pick = -1;
static uint64_t next_hid = 1;
static char pidstr[16];
static volatile sig_atomic_t stopping;
static struct timespec linger;   /* CDISP_LINGER_US: wait before each burst (experiment) */
static struct {
    unsigned long long accepted, acked, rejected, dropped, closed_reports, wakeups, bursts,
        frames, queued_frames, accept_calls, unknown_acks, reads, sleeps;
} st;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static int ep_set(int op, int fd, uint32_t events, int tag)
{
    struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)(int64_t)tag};
    return epoll_ctl(epfd, op, fd, &ev);
}

static int eligible(const struct worker *w)
{
    return w->state == W_READY && !w->full && w->outlen == 0;
}

/* pause the listener while nobody can take a connection, resume when one can */
static void update_listener(void)
{
    int any = 0;
    for (int i = 0; i < MAXW; i++) any |= eligible(&W[i]);
    if (any != listener_on) {
        if (ep_set(EPOLL_CTL_MOD, lfd, any ? EPOLLIN : 0, LISTENER_TAG) < 0) perror("epoll_ctl");
        listener_on = any;
    }
}

static void drop_worker(int i, const char *why)
{
    struct worker *w = &W[i];
    if (w->state == W_FREE) return;
    fprintf(stderr, "c-dispatcher: worker %d (pid %u) channel ends: %s\n", w->id, w->pid, why);
    epoll_ctl(epfd, EPOLL_CTL_DEL, w->fd, NULL);
    close(w->fd);
    for (size_t s = 0; s < TABLE; s++)     /* its unanswered handoffs: ours, closed */
        if (table[s].hid && table[s].w == i) {
            close(table[s].fd);
            table[s].hid = 0;
            st.dropped++;
        }
    memset(w, 0, offsetof(struct worker, in));
    w->fd = -1;
    w->state = W_FREE;
    update_listener();
}

/* write what the socket takes; 0 all written, 1 some left (wait for EPOLLOUT), -1 error */
static int write_out(int i, const uint8_t *buf, size_t len, const int *fds, int nfds)
{
    struct worker *w = &W[i];
    union {
        char buf[CMSG_SPACE(BURST * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
    }
    ssize_t n;
    do n = sendmsg(w->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    size_t sent = n < 0 ? 0 : (size_t)n;
    if (sent == len) return 0;
    if (buf != w->out) memcpy(w->out, buf + sent, len - sent);
    else memmove(w->out, buf + sent, len - sent);
    w->outlen = len - sent;
    w->noutfds = sent ? 0 : nfds;          /* the fds went with the first byte, or not */
    if (!sent && nfds && fds != w->outfds) memcpy(w->outfds, fds, nfds * sizeof(int));
    st.queued_frames++;
    if (ep_set(EPOLL_CTL_MOD, w->fd, EPOLLIN | EPOLLOUT, i) < 0) return -1;
    return 1;
}

static void flush_out(int i)
{
    struct worker *w = &W[i];
    size_t len = w->outlen;
    w->outlen = 0;
    int r = write_out(i, w->out, len, w->outfds, w->noutfds);
    if (r < 0) { drop_worker(i, "sendmsg failed"); return; }
    if (r == 0) {
        w->noutfds = 0;
        ep_set(EPOLL_CTL_MOD, w->fd, EPOLLIN, i);
        update_listener();
    }
}

/* sockshare's LeastConnections: the least loaded; among equals the first whose id is
 * after the last pick, else the first */
static int least_conn(void)
{
    int best = -1, after = -1;
    for (int i = 0; i < MAXW; i++) {
        if (!eligible(&W[i])) continue;
        if (best < 0 || W[i].load < W[best].load) {
            best = i;
            after = W[i].id > last_pick ? i : -1;
        } else if (W[i].load == W[best].load && after < 0 && W[i].id > last_pick) {
            after = i;
        }
    }
    int pick = after >= 0 ? after : best;
    if (pick >= 0) last_pick = W[pick].id;
    return pick;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int k = 7; k >= 0; k--) { p[k] = (uint8_t)v; v >>= 8; }
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int k = 3; k >= 0; k--) { p[k] = (uint8_t)v; v >>= 8; }
}

static void on_listener(void)
{
    int used[MAXW], nused = 0;
    st.bursts++;
    if (linger.tv_nsec) {   /* let more connections arrive */
        nanosleep(&linger, NULL);
        st.sleeps++;
    }
    for (int count = 0; count < BURST; count++) {
        struct sockaddr_storage ss;
        socklen_t slen = sizeof ss;
        st.accept_calls++;
        int fd = accept4(lfd, (struct sockaddr *)&ss, &slen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) { count--; continue; }
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED)
                perror("accept4");
            break;
        }
        st.accepted++;
        int i = least_conn();
        struct pending *p = &table[next_hid & (TABLE - 1)];
        if (i < 0 || p->hid) {   /* (the listener is paused when nobody has room) */
            close(fd);
            st.dropped++;
            continue;
        }
        struct worker *w = &W[i];
        if (w->n == 0) {
            used[nused++] = i;
            w->size = SS_HEADER_SIZE + 2;
        }
        char host[INET6_ADDRSTRLEN] = "?";
        int port = 0;
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            port = ntohs(a->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
            port = ntohs(a->sin6_port);
        }
        uint64_t hid = next_hid++;
        uint8_t *e = w->frame + w->size;
        /* the Python dispatcher's metadata, the same JSON (sockshare.server._listeners) */
        int mlen = snprintf((char *)e + SS_ENTRY_SIZE, META_MAX,
                            "{\"handoff_id\":\"%s.%llu\",\"listener\":\"main\",\"client\":"
                            "[\"%s\",%d],\"route\":\"default\",\"pool\":\"default\"}",
                            pidstr, (unsigned long long)hid, host, port);
        if (mlen < 0 || mlen >= META_MAX) mlen = 2, memcpy(e + SS_ENTRY_SIZE, "{}", 2);
        put64(e, hid);
        e[8] = ss.ss_family == AF_INET6 ? SS_FAMILY_INET6 : SS_FAMILY_INET;
        e[9] = SS_TYPE_STREAM;
        e[10] = 0;
        e[11] = 6;
        put32(e + 12, (uint32_t)mlen);
        put32(e + 16, 0);
        w->size += SS_ENTRY_SIZE + (size_t)mlen;
        w->fds[w->n++] = fd;
        w->load++;
        *p = (struct pending){.hid = hid, .fd = fd, .w = i};
    }
    for (int k = 0; k < nused; k++) {
        int i = used[k];
        struct worker *w = &W[i];
        ss_header_put(w->frame, SS_HANDOFF, SS_FLAG_ACK, (uint8_t)w->n,
                      (uint32_t)(w->size - SS_HEADER_SIZE));
        w->frame[SS_HEADER_SIZE] = (uint8_t)(w->n >> 8);
        w->frame[SS_HEADER_SIZE + 1] = (uint8_t)w->n;
        st.frames++;
        int r = write_out(i, w->frame, w->size, w->fds, w->n);
        w->n = 0;
        if (r < 0) drop_worker(i, "sendmsg failed");
    }
    update_listener();
}

static int on_control(int i, const char *json, size_t n)
{
    struct worker *w = &W[i];
    const char *v;
    size_t vl;
    if (ss_json_member(json, n, "ev", &v, &vl) != 1) return 0;   /* not a report: ignored */
#define IS(s) (vl == sizeof(s) - 1 && memcmp(v, s, vl) == 0)
    if (IS("\"closed\"")) {
        long k = 1;
        if (ss_json_member(json, n, "n", &v, &vl) == 1) {
            char num[24];
            if (vl == 0 || vl >= sizeof num) return -1;
            memcpy(num, v, vl);
            num[vl] = 0;
            char *endp;
            k = strtol(num, &endp, 10);
            if (*endp || k < 0) return -1;
        }
        w->load -= k;
        st.closed_reports++;
    } else if (IS("\"hello\"")) {
        if (w->state == W_UP) w->state = W_READY;
    } else if (IS("\"fds\"")) {
        w->full = ss_json_member(json, n, "full", &v, &vl) == 1 && vl == 4 &&
                  memcmp(v, "true", 4) == 0;
    } else if (IS("\"draining\"") || IS("\"fatal\"")) {
        w->state = W_RETIRED;
    }
#undef IS
    update_listener();
    return 0;
}

static int on_accept_frame(int i, const uint8_t *p, size_t n)
{
    if (n < 2) return -1;
    size_t cnt = (size_t)p[0] << 8 | p[1];
    if (n != 2 + 8 * cnt) return -1;
    for (size_t k = 0; k < cnt; k++) {
        const uint8_t *q = p + 2 + 8 * k;
        uint64_t hid = 0;
        for (int b = 0; b < 8; b++) hid = hid << 8 | q[b];
        struct pending *e = &table[hid & (TABLE - 1)];
        if (e->hid != hid || e->w != i) { st.unknown_acks++; continue; }
        close(e->fd);
        e->hid = 0;
        st.acked++;
    }
    return 0;
}

static int on_reject_frame(int i, const uint8_t *p, size_t n)
{
    uint64_t hid;
    const uint8_t *reason;
    size_t rlen;
    if (ss_reject_decode(p, n, &hid, &reason, &rlen) != SS_OK) return -1;
    struct pending *e = &table[hid & (TABLE - 1)];
    if (e->hid != hid || e->w != i) { st.unknown_acks++; return 0; }
    close(e->fd);            /* (no re-dispatch in this benchmark program) */
    e->hid = 0;
    W[i].load--;
    st.rejected++;
    return 0;
}

static int on_hello(int i, const uint8_t *p, size_t n)
{
    struct worker *w = &W[i];
    struct ss_hello h;
    if (ss_hello_decode(p, n, &h) != SS_OK || h.version != 1 ||
        (h.features & (SS_FEATURE_SCM | SS_FEATURE_ACK)) != (SS_FEATURE_SCM | SS_FEATURE_ACK) ||
        h.max_payload < FRAME_MAX) {   /* (descriptors, answers, room for our frames) */
        fprintf(stderr, "c-dispatcher: a HELLO this program cannot serve\n");
        return -1;
    }
    struct ucred cred;
    socklen_t clen = sizeof cred;
    if (getsockopt(w->fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0 ||
        (uint32_t)cred.pid != h.pid || cred.uid != getuid() || h.uid != cred.uid) {
        fprintf(stderr, "c-dispatcher: HELLO says pid %u uid %u, the kernel pid %d uid %u\n",
                h.pid, h.uid, (int)cred.pid, (unsigned)cred.uid);
        return -1;
    }
    w->pid = h.pid;
    if (h.name_len > 7 && memcmp(h.name, "worker:", 7) == 0)
        for (size_t k = 7; k < h.name_len && k < 16 && h.name[k] >= '0' && h.name[k] <= '9'; k++)
            w->id = w->id * 10 + (h.name[k] - '0');
    static const char name[] = "c-dispatcher";
    struct ss_hello me = {.version = 1, .role = SS_ROLE_BOTH,
                          .features = SS_FEATURE_SCM | SS_FEATURE_ACK,
                          .pid = (uint32_t)getpid(), .uid = (uint32_t)getuid(),
                          .max_payload = INBUF - SS_HEADER_SIZE,
                          .name = (const uint8_t *)name, .name_len = sizeof name - 1};
    uint8_t buf[SS_HEADER_SIZE + 64];
    size_t len;
    if (ss_hello_encode(&me, buf + SS_HEADER_SIZE, sizeof buf - SS_HEADER_SIZE, &len) != SS_OK)
        return -1;
    ss_header_put(buf, SS_HELLO, 0, 0, (uint32_t)len);
    if (send(w->fd, buf, SS_HEADER_SIZE + len, MSG_NOSIGNAL | MSG_DONTWAIT) !=
        (ssize_t)(SS_HEADER_SIZE + len))
        return -1;   /* (a new socket's buffer is empty: it takes 30 bytes at once) */
    w->state = W_UP;
    return 0;
}

static void on_readable(int i)
{
    struct worker *w = &W[i];
    union {
        char buf[CMSG_SPACE(SS_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = w->in + w->inlen, .iov_len = INBUF - w->inlen};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t n;
    st.reads++;
    do n = recvmsg(w->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    int stray = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t j = 0; j < k; j++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + j * sizeof fd, sizeof fd);
            close(fd);
            stray = 1;
        }
    }
    if (n < 0) { drop_worker(i, "recvmsg failed"); return; }
    if (n == 0) { drop_worker(i, "end of file"); return; }
    if (stray || (msg.msg_flags & MSG_CTRUNC)) {
        drop_worker(i, "descriptors from a worker (migrations are not handled here)");
        return;
    }
    w->inlen += (size_t)n;
    size_t off = 0;
    while (w->inlen - off >= SS_HEADER_SIZE) {
        struct ss_header h;
        uint32_t limit = w->state == W_HANDSHAKE ? SS_HANDSHAKE_MAX : INBUF - SS_HEADER_SIZE;
        if (ss_header_parse(w->in + off, limit, &h) != SS_OK || h.nfds) {
            drop_worker(i, "bad frame");
            return;
        }
        if (w->inlen - off < SS_HEADER_SIZE + (size_t)h.length) break;
        const uint8_t *p = w->in + off + SS_HEADER_SIZE;
        int r = 0;
        if (w->state == W_HANDSHAKE) r = h.type == SS_HELLO ? on_hello(i, p, h.length) : -1;
        else if (h.type == SS_ACCEPT) r = on_accept_frame(i, p, h.length);
        else if (h.type == SS_REJECT) r = on_reject_frame(i, p, h.length);
        else if (h.type == SS_CONTROL) r = on_control(i, (const char *)p, h.length);
        else if (h.type == SS_BYE) w->state = W_RETIRED;
        else r = -1;
        if (r < 0) {
            drop_worker(i, "unexpected frame");
            return;
        }
        off += SS_HEADER_SIZE + h.length;
    }
    memmove(w->in, w->in + off, w->inlen - off);
    w->inlen -= off;
}

static void on_channel_listener(void)
{
    int fd = accept4(cfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    for (int i = 0; i < MAXW; i++) {
        if (W[i].state != W_FREE) continue;
        memset(&W[i], 0, offsetof(struct worker, in));
        W[i].fd = fd;
        W[i].state = W_HANDSHAKE;
        if (ep_set(EPOLL_CTL_ADD, fd, EPOLLIN, i) < 0) break;
        return;
    }
    fprintf(stderr, "c-dispatcher: no room for another worker\n");
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: dispatcher LISTEN_FD CHANNEL_FD WORKERS\n");
        return 2;
    }
    lfd = atoi(argv[1]);
    cfd = atoi(argv[2]);
    nworkers_expected = atoi(argv[3]);
    if (nworkers_expected < 1 || nworkers_expected > MAXW) return 2;
    snprintf(pidstr, sizeof pidstr, "%d", (int)getpid());
    const char *lg = getenv("CDISP_LINGER_US");
    long linger_us = lg ? atol(lg) : 0;
    if (linger_us > 0 && linger_us < 1000000) linger.tv_nsec = linger_us * 1000;
    struct sockaddr_storage ss;
    socklen_t slen = sizeof ss;
    if (getsockname(lfd, (struct sockaddr *)&ss, &slen) < 0) { perror("listener"); return 1; }
    int port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    struct sigaction sa = {.sa_handler = on_signal};   /* no SA_RESTART: epoll_wait returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < MAXW; i++) W[i].fd = -1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (listen(cfd, 64) < 0) { perror("listen (channel)"); return 1; }
    printf("ready channel\n");
    fflush(stdout);
    int fl = fcntl(lfd, F_GETFL);
    if (fl < 0 || fcntl(lfd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK) < 0) {
        perror("fcntl");
        return 1;
    }
    if (epfd < 0 || ep_set(EPOLL_CTL_ADD, lfd, EPOLLIN, LISTENER_TAG) < 0 ||
        ep_set(EPOLL_CTL_ADD, cfd, EPOLLIN, CHANLISTEN_TAG) < 0) {
        perror("epoll");
        return 1;
    }
    listener_on = 1;
    update_listener();   /* paused until a worker is ready */
    int announced = 0;
    struct epoll_event evs[64];
    while (!stopping) {
        int n = epoll_wait(epfd, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        st.wakeups++;
        for (int k = 0; k < n; k++) {
            int tag = (int)(int64_t)evs[k].data.u64;
            if (tag == LISTENER_TAG) on_listener();
            else if (tag == CHANLISTEN_TAG) on_channel_listener();
            else {
                if ((evs[k].events & EPOLLOUT) && W[tag].state != W_FREE && W[tag].outlen)
                    flush_out(tag);
                if ((evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && W[tag].state != W_FREE)
                    on_readable(tag);
            }
        }
        if (!announced) {
            int ready = 0;
            for (int i = 0; i < MAXW; i++) ready += W[i].state == W_READY;
            if (ready >= nworkers_expected) {
                printf("ready %d\n", port);
                fflush(stdout);
                announced = 1;
            }
        }
    }
    long open = 0;
    for (size_t s = 0; s < TABLE; s++) open += table[s].hid != 0;
    for (int i = 0; i < MAXW; i++)
        if (W[i].state != W_FREE)
            fprintf(stderr, "c-dispatcher: worker %d (pid %u): count %ld at exit\n", W[i].id,
                    W[i].pid, W[i].load);
    fprintf(stderr, "c-dispatcher: accepted %llu acked %llu rejected %llu dropped %llu "
            "unknown-answers %llu unanswered %ld; wake-ups %llu bursts %llu accept4 %llu "
            "frames %llu (queued %llu) recvmsg %llu nanosleep %llu closed-reports %llu\n",
            st.accepted, st.acked, st.rejected, st.dropped, st.unknown_acks, open, st.wakeups,
            st.bursts, st.accept_calls, st.frames, st.queued_frames, st.reads, st.sleeps,
            st.closed_reports);
    return 0;
}
