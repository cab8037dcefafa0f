/*
 * sockshare_peer.c - codec and channel connection for the sockshare handoff protocol.
 * See sockshare_peer.h. Linux first (MSG_CMSG_CLOEXEC, SO_PEERCRED); no dependencies.
 */
#define _GNU_SOURCE
#include "sockshare_peer.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* --- results ------------------------------------------------------------------------ */

const char *ss_reason(int r)
{
    switch (r) {
    case SS_OK: return "ok";
    case SS_E_BAD_MAGIC: return "bad-magic";
    case SS_E_BAD_VERSION: return "bad-version";
    case SS_E_UNKNOWN_TYPE: return "unknown-type";
    case SS_E_RESERVED: return "reserved-not-zero";
    case SS_E_TOO_LARGE: return "payload-too-large";
    case SS_E_TOO_MANY_FDS: return "too-many-fds";
    case SS_E_MISSING_FDS: return "missing-fds";
    case SS_E_TRUNCATED: return "truncated-frame";
    case SS_E_BAD_LENGTH: return "bad-length";
    case SS_E_TRAILING: return "trailing-bytes";
    case SS_E_UNKNOWN_KIND: return "unknown-kind";
    case SS_E_OVER_LIMITS: return "entry-over-limits";
    case SS_E_BAD_UTF8: return "bad-utf8";
    case SS_E_FD_COUNT: return "fd-count-mismatch";
    case SS_E_FDS_ON_WRONG_FRAME: return "fds-on-wrong-frame";
    case SS_E_STRAY_FDS: return "stray-fds";
    case SS_E_CTRUNC: return "fds-truncated";
    case SS_E_UNEXPECTED: return "unexpected-frame";
    case SS_E_WRONG_SOCKET: return "wrong-socket";
    case SS_E_PEER_CRED: return "peer-credentials";
    case SS_E_NO_ENTRIES: return "no-entries";
    case SS_E_PEER_ERROR: return "peer-error";
    case SS_E_CLOSED: return "closed";
    case SS_E_TIMEOUT: return "timeout";
    case SS_E_SYS: return "system-error";
    case SS_E_NOMEM: return "no-memory";
    case SS_E_SPACE: return "no-space";
    default: return "unknown-error";
    }
}

int ss_is_protocol_error(int r)
{
    return r < 0 && r >= SS_E_LAST_PROTOCOL;
}

/* --- big-endian helpers ----------------------------------------------------------- */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}

/* --- header --------------------------------------------------------------------------- */

static int known_type(uint8_t t)
{
    switch (t) {
    case SS_HELLO: case SS_ERROR: case SS_BYE: case SS_CLAIM: case SS_GRANT: case SS_DONE:
    case SS_HANDOFF: case SS_ACCEPT: case SS_REJECT: case SS_CONTROL:
        return 1;
    default:
        return 0;
    }
}

int ss_header_parse(const uint8_t *raw, uint32_t max_payload, struct ss_header *out)
{
    /* the checks in the order of the Python reference, so both report the same reason */
    if (raw[0] != 'S' || raw[1] != 'S') return SS_E_BAD_MAGIC;
    if (raw[2] != SS_VERSION) return SS_E_BAD_VERSION;
    if (!known_type(raw[3])) return SS_E_UNKNOWN_TYPE;
    if (raw[6] != 0 || raw[7] != 0) return SS_E_RESERVED;
    out->type = raw[3];
    out->flags = raw[4];
    out->nfds = raw[5];
    out->length = get32(raw + 8);
    if (out->length > max_payload) return SS_E_TOO_LARGE;
    if (out->nfds > SS_MAX_FDS) return SS_E_TOO_MANY_FDS;
    return SS_OK;
}

void ss_header_put(uint8_t *out, uint8_t type, uint8_t flags, uint8_t nfds, uint32_t length)
{
    out[0] = 'S';
    out[1] = 'S';
    out[2] = SS_VERSION;
    out[3] = type;
    out[4] = flags;
    out[5] = nfds;
    out[6] = 0;
    out[7] = 0;
    put32(out + 8, length);
}

/* --- UTF-8 ------------------------------------------------------------------------------- */

int ss_utf8_valid(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) { k = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { k = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { k = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= k) return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((p[i + j] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (p[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0; /* overlong, out of range, surrogate */
        i += k + 1;
    }
    return 1;
}

/* length of the longest prefix of s[n] that is at most limit bytes and ends on a
 * character boundary (s is assumed valid UTF-8) */
static size_t utf8_cut(const char *s, size_t n, size_t limit)
{
    if (n <= limit) return n;
    size_t cut = limit;
    while (cut > 0 && ((uint8_t)s[cut] & 0xC0) == 0x80) cut--;
    return cut;
}

/* --- kinds -------------------------------------------------------------------------------- */

int ss_os_family(uint8_t code)
{
    switch (code) {
    case SS_FAMILY_INET: return AF_INET;
    case SS_FAMILY_INET6: return AF_INET6;
    case SS_FAMILY_UNIX: return AF_UNIX;
    default: return -1;
    }
}

int ss_os_type(uint8_t code)
{
    switch (code) {
    case SS_TYPE_STREAM: return SOCK_STREAM;
    case SS_TYPE_DGRAM: return SOCK_DGRAM;
    case SS_TYPE_SEQPACKET: return SOCK_SEQPACKET;
    default: return -1;
    }
}

int ss_family_code(int f)
{
    return f == AF_INET ? SS_FAMILY_INET : f == AF_INET6 ? SS_FAMILY_INET6
         : f == AF_UNIX ? SS_FAMILY_UNIX : -1;
}

int ss_type_code(int t)
{
    return t == SOCK_STREAM ? SS_TYPE_STREAM : t == SOCK_DGRAM ? SS_TYPE_DGRAM
         : t == SOCK_SEQPACKET ? SS_TYPE_SEQPACKET : -1;
}

/* --- payloads ----------------------------------------------------------------------------- */

#define HELLO_FIXED 18

int ss_hello_encode(const struct ss_hello *h, uint8_t *out, size_t cap, size_t *len)
{
    if (h->name_len > 255) return SS_E_SPACE;
    if (cap < HELLO_FIXED + h->name_len) return SS_E_SPACE;
    out[0] = h->version;
    out[1] = h->role;
    put32(out + 2, h->features);
    put32(out + 6, h->pid);
    put32(out + 10, h->uid);
    put32(out + 14, h->max_payload);
    if (h->name_len) memcpy(out + HELLO_FIXED, h->name, h->name_len);
    *len = HELLO_FIXED + h->name_len;
    return SS_OK;
}

int ss_hello_decode(const uint8_t *p, size_t n, struct ss_hello *out)
{
    if (n < HELLO_FIXED || n > HELLO_FIXED + 255) return SS_E_BAD_LENGTH; /* name <= 255 */
    out->version = p[0];
    out->role = p[1];
    out->features = get32(p + 2);
    out->pid = get32(p + 6);
    out->uid = get32(p + 10);
    out->max_payload = get32(p + 14);
    out->name = p + HELLO_FIXED;
    out->name_len = n - HELLO_FIXED;
    if (!ss_utf8_valid(out->name, out->name_len)) return SS_E_BAD_UTF8;
    return SS_OK;
}

int ss_handoff_encode(const struct ss_entry *e, size_t count, uint8_t *out, size_t cap,
                      size_t *len)
{
    size_t pos = 2;
    if (count > 0xFFFF || cap < 2) return SS_E_SPACE;
    put16(out, (uint16_t)count);
    for (size_t i = 0; i < count; i++) {
        if (e[i].meta_len > SS_MAX_META || e[i].data_len > SS_MAX_DATA) return SS_E_SPACE;
        if (ss_os_family(e[i].family) < 0 || ss_os_type(e[i].type) < 0) return SS_E_SPACE;
        size_t need = SS_ENTRY_SIZE + (size_t)e[i].meta_len + e[i].data_len;
        if (cap - pos < need) return SS_E_SPACE;
        put64(out + pos, e[i].id);
        out[pos + 8] = e[i].family;
        out[pos + 9] = e[i].type;
        put16(out + pos + 10, e[i].proto);
        put32(out + pos + 12, e[i].meta_len);
        put32(out + pos + 16, e[i].data_len);
        pos += SS_ENTRY_SIZE;
        if (e[i].meta_len) memcpy(out + pos, e[i].meta, e[i].meta_len);
        pos += e[i].meta_len;
        if (e[i].data_len) memcpy(out + pos, e[i].data, e[i].data_len);
        pos += e[i].data_len;
    }
    *len = pos;
    return SS_OK;
}

int ss_handoff_decode(const uint8_t *p, size_t n, struct ss_entry *out, size_t cap,
                      size_t *count)
{
    if (n < 2) return SS_E_BAD_LENGTH;
    size_t cnt = get16(p), pos = 2;
    if (cnt == 0) return SS_E_NO_ENTRIES; /* 1..253 entries: 0 is a protocol error */
    for (size_t i = 0; i < cnt; i++) {
        struct ss_entry e;
        if (n - pos < SS_ENTRY_SIZE) return SS_E_BAD_LENGTH;
        e.id = get64(p + pos);
        e.family = p[pos + 8];
        e.type = p[pos + 9];
        e.proto = get16(p + pos + 10);
        e.meta_len = get32(p + pos + 12);
        e.data_len = get32(p + pos + 16);
        pos += SS_ENTRY_SIZE;
        if (e.meta_len > SS_MAX_META || e.data_len > SS_MAX_DATA) return SS_E_OVER_LIMITS;
        if (n - pos < (size_t)e.meta_len + e.data_len) return SS_E_BAD_LENGTH;
        e.meta = p + pos;
        e.data = p + pos + e.meta_len;
        pos += (size_t)e.meta_len + e.data_len;
        if (ss_os_family(e.family) < 0 || ss_os_type(e.type) < 0) return SS_E_UNKNOWN_KIND;
        if (i < cap) out[i] = e;
    }
    if (pos != n) return SS_E_TRAILING;
    *count = cnt;
    return SS_OK;
}

int ss_accept_encode(const uint64_t *ids, size_t count, uint8_t *out, size_t cap, size_t *len)
{
    if (count > 0xFFFF || cap < 2 + 8 * count) return SS_E_SPACE;
    put16(out, (uint16_t)count);
    for (size_t i = 0; i < count; i++) put64(out + 2 + 8 * i, ids[i]);
    *len = 2 + 8 * count;
    return SS_OK;
}

int ss_accept_decode(const uint8_t *p, size_t n, uint64_t *ids, size_t cap, size_t *count)
{
    if (n < 2) return SS_E_BAD_LENGTH;
    size_t cnt = get16(p);
    if (n != 2 + 8 * cnt) return SS_E_BAD_LENGTH; /* an exact size */
    for (size_t i = 0; i < cnt && i < cap; i++) ids[i] = get64(p + 2 + 8 * i);
    *count = cnt;
    return SS_OK;
}

/* REJECT and ERROR: a fixed field at the start, then UTF-8 text (cut at a character
 * boundary to max bytes when encoding) to the end of the payload. */
static int text_encode(size_t at, const char *text, size_t text_len, size_t max, uint8_t *out,
                       size_t cap, size_t *len)
{
    text_len = utf8_cut(text, text_len, max);
    if (cap < at + text_len) return SS_E_SPACE;
    if (text_len) memcpy(out + at, text, text_len);
    *len = at + text_len;
    return SS_OK;
}

static int text_decode(const uint8_t *p, size_t n, size_t at, const uint8_t **text,
                       size_t *text_len)
{
    if (n < at) return SS_E_BAD_LENGTH;
    if (!ss_utf8_valid(p + at, n - at)) return SS_E_BAD_UTF8;
    *text = p + at;
    *text_len = n - at;
    return SS_OK;
}

int ss_reject_encode(uint64_t id, const char *reason, size_t reason_len, uint8_t *out,
                     size_t cap, size_t *len)
{
    int r = text_encode(8, reason, reason_len, SS_MAX_REASON, out, cap, len);
    if (r == SS_OK) put64(out, id);
    return r;
}

int ss_reject_decode(const uint8_t *p, size_t n, uint64_t *id, const uint8_t **reason,
                     size_t *reason_len)
{
    int r = text_decode(p, n, 8, reason, reason_len);
    if (r == SS_OK) *id = get64(p);
    return r;
}

int ss_error_encode(uint16_t code, const char *text, size_t text_len, uint8_t *out,
                    size_t cap, size_t *len)
{
    int r = text_encode(2, text, text_len, SS_MAX_ERROR_TEXT, out, cap, len);
    if (r == SS_OK) put16(out, code);
    return r;
}

int ss_error_decode(const uint8_t *p, size_t n, uint16_t *code, const uint8_t **text,
                    size_t *text_len)
{
    int r = text_decode(p, n, 2, text, text_len);
    if (r == SS_OK) *code = get16(p);
    return r;
}

/* --- a very small JSON reader (enough for metadata and the vector file) -------------- */

static const char *json_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static const char *json_string_end(const char *p, const char *end)
{
    /* p at the opening quote; returns just past the closing quote, or NULL */
    for (p++; p < end; p++) {
        if (*p == '\\') {
            if (++p >= end) return NULL;
        } else if (*p == '"') {
            return p + 1;
        } else if ((unsigned char)*p < 0x20) {
            return NULL;
        }
    }
    return NULL;
}

static const char *json_value_end(const char *p, const char *end, int depth)
{
    if (depth > 64 || p >= end) return NULL;
    if (*p == '"') return json_string_end(p, end);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        p = json_ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (object) {
                if (p >= end || *p != '"') return NULL;
                p = json_string_end(p, end);
                if (!p) return NULL;
                p = json_ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p = json_ws(p + 1, end);
            }
            p = json_value_end(p, end, depth + 1);
            if (!p) return NULL;
            p = json_ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = json_ws(p + 1, end);
        }
    }
    /* number or literal: a run of the characters they are made of */
    const char *start = p;
    while (p < end && (strchr("+-.0123456789eE", *p) || (*p >= 'a' && *p <= 'z'))) p++;
    return p > start ? p : NULL;
}

int ss_json_member(const char *json, size_t n, const char *key, const char **val,
                   size_t *val_len)
{
    const char *end = json + n, *p = json_ws(json, end);
    size_t klen = strlen(key);
    if (p >= end || *p != '{') return -1;
    p = json_ws(p + 1, end);
    if (p < end && *p == '}') return 0;
    for (;;) {
        if (p >= end || *p != '"') return -1;
        const char *k = p + 1, *q = json_string_end(p, end);
        if (!q) return -1;
        size_t this_len = (size_t)(q - 1 - k);
        p = json_ws(q, end);
        if (p >= end || *p != ':') return -1;
        p = json_ws(p + 1, end);
        const char *v = p, *ve = json_value_end(p, end, 1);
        if (!ve) return -1;
        if (this_len == klen && memcmp(k, key, klen) == 0) {
            *val = v;
            *val_len = (size_t)(ve - v);
            return 1;
        }
        p = json_ws(ve, end);
        if (p >= end) return -1;
        if (*p == '}') return 0;
        if (*p != ',') return -1;
        p = json_ws(p + 1, end);
    }
}

int ss_json_index(const char *json, size_t n, size_t index, const char **val, size_t *val_len)
{
    const char *end = json + n, *p = json_ws(json, end);
    if (p >= end || *p != '[') return -1;
    p = json_ws(p + 1, end);
    if (p < end && *p == ']') return 0;
    for (size_t i = 0;; i++) {
        const char *v = p, *ve = json_value_end(p, end, 1);
        if (!ve) return -1;
        if (i == index) {
            *val = v;
            *val_len = (size_t)(ve - v);
            return 1;
        }
        p = json_ws(ve, end);
        if (p >= end) return -1;
        if (*p == ']') return 0;
        if (*p != ',') return -1;
        p = json_ws(p + 1, end);
    }
}

/* --- connection --------------------------------------------------------------------------- */

static void close_all(int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (fds[i] >= 0) close(fds[i]);
        fds[i] = -1;
    }
}

void ss_frame_release(struct ss_frame *f)
{
    free(f->payload);
    f->payload = NULL;
    close_all(f->fds, (size_t)f->nfds);
    f->nfds = 0;
}

static int conn_fail(struct ss_conn *c, int r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    if (r != SS_E_TIMEOUT && r != SS_E_SPACE) {
        /* the stream cannot be resynchronised: drop every descriptor we hold */
        c->failed = r;
        close_all(c->fdq, c->nfdq);
        c->nfdq = 0;
        if (c->have_pending) close_all(c->pending_fds, c->pending.nfds);
        c->have_pending = 0;
    }
    return r;
}

void ss_conn_init(struct ss_conn *c, int fd, uint32_t max_payload)
{
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->max_payload = max_payload ? max_payload : SS_MAX_PAYLOAD;
    c->peer_max_payload = SS_MAX_PAYLOAD;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int remaining(long long deadline)
{
    if (deadline < 0) return -1;
    long long left = deadline - now_ms();
    return left < 0 ? 0 : (int)left;
}

static int wait_fd(int fd, short events, long long deadline)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int r = poll(&p, 1, remaining(deadline));
        if (r > 0) return SS_OK;
        if (r == 0) return SS_E_TIMEOUT;
        if (errno != EINTR) return SS_E_SYS;
    }
}

int ss_connect_unix(struct ss_conn *c, const char *path, int timeout_ms)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    ss_conn_init(c, -1, SS_MAX_PAYLOAD);
    if (strlen(path) >= sizeof sa.sun_path)
        return conn_fail(c, SS_E_SPACE, "socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return conn_fail(c, SS_E_SYS, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        if (errno != EINPROGRESS && errno != EAGAIN) {
            int e = errno;
            close(fd);
            errno = e;
            return conn_fail(c, SS_E_SYS, "connect %s: %s", path, strerror(e));
        }
        /* a UNIX connect only waits when the backlog is full */
        long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
        int r = wait_fd(fd, POLLOUT, deadline), err = 0;
        socklen_t len = sizeof err;
        if (r == SS_OK && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
            c->fd = fd;
            return SS_OK;
        }
        close(fd);
        return conn_fail(c, r == SS_E_TIMEOUT ? SS_E_TIMEOUT : SS_E_SYS, "connect %s: %s",
                         path, r == SS_E_TIMEOUT ? "timed out" : strerror(err ? err : errno));
    }
    c->fd = fd;
    return SS_OK;
}

/* One recvmsg: bytes into the buffer, descriptors into the queue. */
static int conn_read(struct ss_conn *c, long long deadline)
{
    union {
        char buf[CMSG_SPACE(SS_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    if (c->cap - c->len < 65536) {
        size_t ncap = c->len + 65536;
        uint8_t *nb = realloc(c->buf, ncap);
        if (!nb) return conn_fail(c, SS_E_NOMEM, "out of memory");
        c->buf = nb;
        c->cap = ncap;
    }
    struct iovec iov = {.iov_base = c->buf + c->len, .iov_len = c->cap - c->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    ssize_t n;
    for (;;) {
        n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n >= 0) break;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return conn_fail(c, SS_E_SYS, "recvmsg: %s", strerror(errno));
        int r = wait_fd(c->fd, POLLIN, deadline);
        if (r == SS_E_TIMEOUT) return conn_fail(c, r, "nothing arrived in time");
        if (r != SS_OK) return conn_fail(c, r, "poll: %s", strerror(errno));
    }
    /* collect every descriptor first, so that every error path below can close them */
    int got[SS_MAX_FDS];
    size_t ngot = 0, dropped = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *d = CMSG_DATA(cm);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, d + i * sizeof fd, sizeof fd);
            if (ngot < SS_MAX_FDS) got[ngot++] = fd;
            else { close(fd); dropped++; }
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        close_all(got, ngot);
        return conn_fail(c, SS_E_CTRUNC, "the kernel truncated the descriptors of a message "
                         "(%zu arrived): at the fd limit (ulimit -n)?", ngot);
    }
    if (dropped || c->nfdq + ngot > SS_FDQ_MAX) {
        close_all(got, ngot);
        return conn_fail(c, SS_E_STRAY_FDS, "descriptors arrived that no frame claims");
    }
    memcpy(c->fdq + c->nfdq, got, ngot * sizeof(int));
    c->nfdq += ngot;
    c->len += (size_t)n;
    if (n == 0) {
        if (c->len || c->have_pending)
            return conn_fail(c, SS_E_TRUNCATED, "the peer closed the connection in the middle "
                             "of a frame (%zu bytes of it received)", c->len);
        if (c->nfdq)
            return conn_fail(c, SS_E_STRAY_FDS, "the peer closed the connection leaving %zu "
                             "stray fds", c->nfdq);
        return conn_fail(c, SS_E_CLOSED, "the peer closed the connection");
    }
    return SS_OK;
}

int ss_recv_frame(struct ss_conn *c, struct ss_frame *f, int timeout_ms)
{
    long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    memset(f, 0, sizeof *f);
    if (c->failed) return c->failed;
    for (;;) {
        if (!c->have_pending && c->len >= SS_HEADER_SIZE) {
            int r = ss_header_parse(c->buf, c->max_payload, &c->pending);
            if (r != SS_OK)
                return conn_fail(c, r, "bad frame header: %s", ss_reason(r));
            if (c->nfdq < c->pending.nfds)
                return conn_fail(c, SS_E_MISSING_FDS, "frame announces %u descriptors but %zu "
                                 "arrived", c->pending.nfds, c->nfdq);
            /* the frame's descriptors came with its first byte: they head the queue */
            memcpy(c->pending_fds, c->fdq, c->pending.nfds * sizeof(int));
            memmove(c->fdq, c->fdq + c->pending.nfds, (c->nfdq - c->pending.nfds) * sizeof(int));
            c->nfdq -= c->pending.nfds;
            c->have_pending = 1;
        }
        if (c->have_pending && c->len >= SS_HEADER_SIZE + (size_t)c->pending.length) {
            size_t flen = SS_HEADER_SIZE + (size_t)c->pending.length;
            f->h = c->pending;
            if (f->h.length) {
                f->payload = malloc(f->h.length);
                if (!f->payload) return conn_fail(c, SS_E_NOMEM, "out of memory");
                memcpy(f->payload, c->buf + SS_HEADER_SIZE, f->h.length);
            }
            memcpy(f->fds, c->pending_fds, f->h.nfds * sizeof(int));
            f->nfds = f->h.nfds;
            memmove(c->buf, c->buf + flen, c->len - flen);
            c->len -= flen;
            c->have_pending = 0;
            return SS_OK;
        }
        if (!c->have_pending && c->len == 0 && c->nfdq)
            return conn_fail(c, SS_E_STRAY_FDS, "%zu descriptors arrived with no frame",
                             c->nfdq);
        int r = conn_read(c, deadline);
        if (r != SS_OK) return r;
    }
}

int ss_send_frame(struct ss_conn *c, uint8_t type, uint8_t flags, const uint8_t *payload,
                  size_t len, const int *fds, int nfds, int timeout_ms)
{
    uint8_t head[SS_HEADER_SIZE];
    union {
        char buf[CMSG_SPACE(SS_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    if (c->failed) return c->failed;
    if (nfds < 0 || nfds > SS_MAX_FDS || len > c->peer_max_payload)
        return conn_fail(c, SS_E_SPACE, "frame over the peer's limits (%zu bytes, %d fds)",
                         len, nfds);
    ss_header_put(head, type, flags, (uint8_t)nfds, (uint32_t)len);
    struct iovec iov[2] = {{.iov_base = head, .iov_len = sizeof head},
                           {.iov_base = (void *)payload, .iov_len = len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    if (nfds) ss_attach_fds(&msg, control.buf, sizeof control.buf, fds, nfds);
    size_t total = sizeof head + len, sent = 0;
    while (sent < total) {
        ssize_t n = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return conn_fail(c, SS_E_SYS, "sendmsg: %s", strerror(errno));
            int r = wait_fd(c->fd, POLLOUT, deadline);
            if (r != SS_OK) return conn_fail(c, r == SS_E_TIMEOUT ? SS_E_SYS : r,
                                             "the peer does not read");
            continue;
        }
        sent += (size_t)n;
        /* the descriptors travelled with the first byte: never again */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        while (n > 0 && msg.msg_iovlen) {
            size_t step = (size_t)n < msg.msg_iov->iov_len ? (size_t)n : msg.msg_iov->iov_len;
            msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + step;
            msg.msg_iov->iov_len -= step;
            n -= (ssize_t)step;
            if (msg.msg_iov->iov_len == 0) {
                msg.msg_iov++;
                msg.msg_iovlen--;
            }
        }
    }
    return SS_OK;
}

void ss_send_error(struct ss_conn *c, uint16_t code, const char *text)
{
    uint8_t buf[2 + SS_MAX_ERROR_TEXT];
    size_t len;
    if (c->fd < 0) return;
    if (ss_error_encode(code, text, strlen(text), buf, sizeof buf, &len) != SS_OK) return;
    int failed = c->failed;
    c->failed = 0; /* the stream is dead for reading, but we may still write to it */
    ss_send_frame(c, SS_ERROR, 0, buf, len, NULL, 0, 1000);
    if (!c->failed) c->failed = failed;
}

int ss_handshake(struct ss_conn *c, uint8_t role, const char *name, int timeout_ms)
{
    uint8_t buf[HELLO_FIXED + 255];
    size_t len;
    struct ss_hello me = {.version = 1, .role = role, .features = SS_FEATURE_SCM | SS_FEATURE_ACK,
                          .pid = (uint32_t)getpid(), .uid = (uint32_t)getuid(),
                          .max_payload = c->max_payload, .name = (const uint8_t *)name,
                          .name_len = strlen(name)};
    int r = ss_hello_encode(&me, buf, sizeof buf, &len);
    if (r != SS_OK) return conn_fail(c, r, "HELLO name too long");
    /* the connecting side speaks first; the listener answers HELLO or ERROR */
    r = ss_send_frame(c, SS_HELLO, 0, buf, len, NULL, 0, timeout_ms);
    if (r != SS_OK) return r;
    uint32_t limit = c->max_payload;
    c->max_payload = SS_HANDSHAKE_MAX < limit ? SS_HANDSHAKE_MAX : limit;
    struct ss_frame f;
    r = ss_recv_frame(c, &f, timeout_ms);
    c->max_payload = limit;
    if (r != SS_OK) return r;
    if (f.nfds) {
        ss_frame_release(&f);
        return conn_fail(c, SS_E_FDS_ON_WRONG_FRAME, "the peer's first frame carried fds");
    }
    if (f.h.type == SS_ERROR) {
        uint16_t code;
        const uint8_t *text;
        size_t tlen;
        r = ss_error_decode(f.payload, f.h.length, &code, &text, &tlen);
        if (r == SS_OK)
            conn_fail(c, SS_E_PEER_ERROR, "the listener refused us (error %u): %.*s", code,
                      (int)tlen, (const char *)text);
        else
            conn_fail(c, r, "malformed ERROR frame");
        ss_frame_release(&f);
        return r == SS_OK ? SS_E_PEER_ERROR : r;
    }
    if (f.h.type != SS_HELLO) {
        ss_frame_release(&f);
        return conn_fail(c, SS_E_UNEXPECTED, "expected HELLO, got frame type 0x%02x", f.h.type);
    }
    r = ss_hello_decode(f.payload, f.h.length, &c->peer);
    if (r != SS_OK) {
        ss_frame_release(&f);
        return conn_fail(c, r, "malformed HELLO: %s", ss_reason(r));
    }
    memcpy(c->peer_name, c->peer.name, c->peer.name_len);
    c->peer.name = c->peer_name;
    ss_frame_release(&f);
    if (c->peer.version != 1)
        return conn_fail(c, SS_E_BAD_VERSION, "the peer speaks protocol %u", c->peer.version);
    if (!(c->peer.features & SS_FEATURE_SCM))
        return conn_fail(c, SS_E_UNEXPECTED, "the peer does not pass descriptors (features "
                         "0x%x)", c->peer.features);
    struct ucred cred;
    socklen_t clen = sizeof cred;
    if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0)
        return conn_fail(c, SS_E_SYS, "SO_PEERCRED: %s", strerror(errno));
    if ((uint32_t)cred.pid != c->peer.pid || (uint32_t)cred.uid != c->peer.uid) {
        ss_send_error(c, SS_CODE_REFUSED, "HELLO pid/uid do not match the kernel's");
        return conn_fail(c, SS_E_PEER_CRED, "HELLO says pid %u uid %u, the kernel says pid %d "
                         "uid %u", c->peer.pid, c->peer.uid, (int)cred.pid, (unsigned)cred.uid);
    }
    c->peer_max_payload = c->peer.max_payload < SS_MAX_PAYLOAD ? c->peer.max_payload
                                                               : SS_MAX_PAYLOAD;
    return SS_OK;
}

void ss_close(struct ss_conn *c)
{
    close_all(c->fdq, c->nfdq);
    c->nfdq = 0;
    if (c->have_pending) close_all(c->pending_fds, c->pending.nfds);
    c->have_pending = 0;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
}

void ss_attach_fds(struct msghdr *msg, void *control, size_t control_size, const int *fds,
                   int nfds)
{
    memset(control, 0, control_size);
    msg->msg_control = control;
    msg->msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    struct cmsghdr *cm = CMSG_FIRSTHDR(msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
}

int ss_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* not the directory's own descriptor */
}
