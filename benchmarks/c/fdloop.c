/* Baseline for benchmarks/channel.py: the cost of moving descriptors with a plain
 * sendmsg/recvmsg loop in C, one or K descriptors per message.
 *
 *   fdloop N K      -> forks; the parent sends N descriptors, K per sendmsg, over a
 *                      socketpair; the child receives them and closes each one.
 *                      Prints the elapsed seconds from first send to last close.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fdloop N K\n");
        return 2;
    }
    long n = atol(argv[1]);
    int k = atoi(argv[2]);
    if (n <= 0 || k <= 0 || k > 253) return 2;
    int sv[2], done[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(done)) return 1;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    double t0 = now();
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        char buf[4096];
        char cbuf[CMSG_SPACE(253 * sizeof(int))];
        long got = 0;
        while (got < n) {
            struct iovec iov = {buf, sizeof buf};
            struct msghdr m = {0};
            m.msg_iov = &iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf;
            m.msg_controllen = sizeof cbuf;
            ssize_t r = recvmsg(sv[1], &m, MSG_CMSG_CLOEXEC);
            if (r <= 0) return 1;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
                int cnt = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                int *fds = (int *)CMSG_DATA(c);
                for (int i = 0; i < cnt; i++) close(fds[i]);
                got += cnt;
            }
        }
        double el = now() - t0;
        if (write(done[1], &el, sizeof el) != sizeof el) return 1;
        return 0;
    }
    close(sv[1]);
    int fds[253];
    for (int i = 0; i < k; i++) fds[i] = fd;
    char cbuf[CMSG_SPACE(253 * sizeof(int))];
    char byte = 'x';
    for (long sent = 0; sent < n; sent += k) {
        int cnt = (n - sent) < k ? (int)(n - sent) : k;
        struct iovec iov = {&byte, 1};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = CMSG_SPACE(cnt * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(cnt * sizeof(int));
        memcpy(CMSG_DATA(c), fds, cnt * sizeof(int));
        if (sendmsg(sv[0], &m, 0) != 1) return 1;
    }
    double el;
    if (read(done[0], &el, sizeof el) != sizeof el) return 1;
    waitpid(pid, NULL, 0);
    printf("%.6f\n", el);
    return 0;
}
