/* Load generator for benchmarks/serve.py: short HTTP connections to 127.0.0.1 only.
 *
 *   loadgen PORT N C TIMEOUT
 *
 * Opens N connections in total to 127.0.0.1:PORT, at most C at a time, from one thread
 * with epoll. Each connection: non-blocking connect, send one small HTTP/1.1 request
 * ("Connection: close"), read until the server closes, then close with SO_LINGER 0 (a
 * reset: no TIME_WAIT piles up on either side over many runs). The response must start
 * with "HTTP/1.1 200" and carry an "X-Worker: <pid>" header; connections are counted per
 * pid. Anything else is an error: connect failed, reset / read error, bad response, or
 * still unfinished after TIMEOUT seconds (the whole run stops then).
 *
 * The target address is fixed: the host is always 127.0.0.1; only the port is given.
 * N <= 10,000,000, C <= 4096, TIMEOUT <= 600 s.
 *
 * Prints one JSON object on stdout:
 *   {"ok": n, "errors": {"connect": a, "reset": b, "bad": c, "timeout": d},
 *    "elapsed": seconds from the first connect to the last close,
 *    "cpu": this process's user+system seconds, "workers": {"<pid>": count, ...}}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_N 10000000L
#define MAX_C 4096
#define MAX_TIMEOUT 600.0
#define MAX_PIDS 64
#define BUF 1024

enum { IDLE, CONNECTING, READING };

struct conn {
    int fd;
    int state;
    int len;
    char buf[BUF];
};

static const char REQUEST[] =
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: sockshare-loadgen\r\n"
    "Connection: close\r\n\r\n";

static long pids[MAX_PIDS], counts[MAX_PIDS];
static int npids;
static long ok, e_connect, e_reset, e_bad, e_timeout, other_pid;
static long started, finished, n_total;
static int epfd;
static struct sockaddr_in target;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void count_pid(long pid) {
    for (int i = 0; i < npids; i++) {
        if (pids[i] == pid) {
            counts[i]++;
            return;
        }
    }
    if (npids < MAX_PIDS) {
        pids[npids] = pid;
        counts[npids++] = 1;
    } else {
        other_pid++;
    }
}

static void finish(struct conn *c) {
    static const struct linger rst = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
    close(c->fd); /* also removes it from the epoll set */
    c->fd = -1;
    c->state = IDLE;
    finished++;
}

static void judge(struct conn *c) {
    c->buf[c->len < BUF ? c->len : BUF - 1] = '\0';
    if (c->len < 12 || memcmp(c->buf, "HTTP/1.1 200", 12) != 0) {
        e_bad++;
        return;
    }
    const char *p = strstr(c->buf, "\r\nX-Worker: ");
    if (p == NULL) {
        e_bad++;
        return;
    }
    char *end;
    long pid = strtol(p + 12, &end, 10);
    if (end == p + 12 || pid <= 0) {
        e_bad++;
        return;
    }
    count_pid(pid);
    ok++;
}

static void start(struct conn *c) {
    for (;;) {
        if (started >= n_total) return;
        started++;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            e_connect++;
            finished++;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        c->len = 0;
        int rc = connect(fd, (struct sockaddr *)&target, sizeof target);
        if (rc < 0 && errno != EINPROGRESS) {
            e_connect++;
            finish(c);
            continue;
        }
        c->state = CONNECTING;
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            e_connect++;
            finish(c);
            continue;
        }
        return;
    }
}

static void on_event(struct conn *c, unsigned events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
            e_connect++;
            finish(c);
            return;
        }
        ssize_t sent = send(c->fd, REQUEST, sizeof REQUEST - 1, MSG_NOSIGNAL);
        if (sent != (ssize_t)(sizeof REQUEST - 1)) { /* 90 bytes into an empty buffer */
            e_reset++;
            finish(c);
            return;
        }
        c->state = READING;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
            e_reset++;
            finish(c);
        }
        return;
    }
    (void)events;
    for (;;) {
        char tmp[BUF];
        char *dst = c->len < BUF - 1 ? c->buf + c->len : tmp;
        size_t room = c->len < BUF - 1 ? (size_t)(BUF - 1 - c->len) : sizeof tmp;
        ssize_t r = recv(c->fd, dst, room, 0);
        if (r > 0) {
            if (dst != tmp) c->len += (int)r;
            continue;
        }
        if (r == 0) {
            judge(c);
            finish(c);
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        e_reset++;
        finish(c);
        return;
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: loadgen PORT N C TIMEOUT  (the host is always 127.0.0.1)\n");
        return 2;
    }
    long port = atol(argv[1]);
    n_total = atol(argv[2]);
    long conc = atol(argv[3]);
    double timeout = atof(argv[4]);
    if (port < 1 || port > 65535 || n_total < 1 || n_total > MAX_N || conc < 1 || conc > MAX_C ||
        !(timeout > 0 && timeout <= MAX_TIMEOUT)) {
        fprintf(stderr, "loadgen: argument out of range\n");
        return 2;
    }
    if (conc > n_total) conc = n_total;
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* 127.0.0.1, never anything else */

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        perror("epoll_create1");
        return 1;
    }
    struct conn *conns = calloc((size_t)conc, sizeof *conns);
    struct epoll_event *evs = calloc((size_t)conc, sizeof *evs);
    if (conns == NULL || evs == NULL) return 1;

    double t0 = now();
    double deadline = t0 + timeout;
    for (long i = 0; i < conc; i++) {
        conns[i].fd = -1;
        start(&conns[i]);
    }
    while (finished < n_total) {
        if (now() > deadline) break;
        int n = epoll_wait(epfd, evs, (int)conc, 100);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            on_event(c, evs[i].events);
            if (c->state == IDLE) start(c);
        }
    }
    double elapsed = now() - t0;
    for (long i = 0; i < conc; i++) {
        if (conns[i].state != IDLE) {
            e_timeout++;
            finish(&conns[i]);
        }
    }
    e_timeout += n_total - started; /* never started: the deadline came first */

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    printf("{\"ok\": %ld, \"errors\": {\"connect\": %ld, \"reset\": %ld, \"bad\": %ld, "
           "\"timeout\": %ld}, \"elapsed\": %.6f, \"cpu\": %.6f, \"workers\": {",
           ok, e_connect, e_reset, e_bad, e_timeout, elapsed, cpu);
    for (int i = 0; i < npids; i++) printf("%s\"%ld\": %ld", i ? ", " : "", pids[i], counts[i]);
    if (other_pid) printf("%s\"other\": %ld", npids ? ", " : "", other_pid);
    printf("}}\n");
    close(epfd);
    free(conns);
    free(evs);
    return 0;
}
