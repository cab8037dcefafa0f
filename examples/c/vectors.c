/*
 * vectors.c - check the C codec and connection against tests/vectors/frames.json.
 *
 *     vectors [PATH/TO/frames.json]
 *
 * For every vector: (1) the codec alone: decode the bytes (header, payload, the
 * descriptor count rules) and compare with the vector's frame/fields, or with its
 * error reason and layer; re-encode valid vectors from their fields and compare bytes;
 * (2) the connection: send the bytes over a socketpair with the vector's number of
 * real descriptors on the first byte, receive with ss_recv_frame, and check the same
 * outcome and that no descriptor is left open. Prints one line per vector; exit 1 if
 * any check failed.
 */
#define _GNU_SOURCE
#include "sockshare_peer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int failures;
static const char *current;

static void failf(const char *fmt, ...)
{
    va_list ap;
    fprintf(stdout, "FAIL %s: ", current);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    failures++;
}

/* --- reading the vector file ------------------------------------------------------------- */

struct val {
    const char *p;
    size_t n;
};

static int member(struct val obj, const char *key, struct val *out)
{
    return ss_json_member(obj.p, obj.n, key, &out->p, &out->n) == 1;
}

static struct val need(struct val obj, const char *key)
{
    struct val v = {"null", 4};
    if (!member(obj, key, &v)) failf("vector has no \"%s\"", key);
    return v;
}

static long long num(struct val v)
{
    return strtoll(v.p, NULL, 10);
}

static uint64_t u64str(struct val v) /* a u64 written as a JSON string of digits */
{
    return v.n >= 2 && v.p[0] == '"' ? strtoull(v.p + 1, NULL, 10) : 0;
}

static int is_true(struct val v)
{
    return v.n == 4 && memcmp(v.p, "true", 4) == 0;
}

static int same_str(struct val v, const char *s) /* v is a JSON string without escapes */
{
    return v.n == strlen(s) + 2 && v.p[0] == '"' && memcmp(v.p + 1, s, strlen(s)) == 0;
}

static int hexdigit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* a JSON string of hex digits -> malloc'd bytes */
static uint8_t *unhex(struct val v, size_t *len)
{
    *len = 0;
    if (v.n < 2 || v.p[0] != '"' || (v.n - 2) % 2) return NULL;
    uint8_t *out = malloc((v.n - 2) / 2 + 1);
    for (size_t i = 0; out && i + 1 < v.n - 1; i += 2) {
        int hi = hexdigit(v.p[1 + i]), lo = hexdigit(v.p[2 + i]);
        if (hi < 0 || lo < 0) {
            free(out);
            return NULL;
        }
        out[(*len)++] = (uint8_t)(hi << 4 | lo);
    }
    return out;
}

static int bytes_eq_hex(const uint8_t *p, size_t n, struct val hex)
{
    size_t len;
    uint8_t *want = unhex(hex, &len);
    int eq = want && len == n && (n == 0 || memcmp(p, want, n) == 0);
    free(want);
    return eq;
}

/* --- the decoding procedure of the vector file ------------------------------------------- */

/* Decode a whole frame's payload by type and apply the descriptor rules. When fields
 * is given (a valid vector), compare the decoded values with it. */
static int check_payload(const struct ss_header *h, const uint8_t *p, size_t n, int nfds,
                         struct val *fields, const char **layer)
{
    int r = SS_OK;
    *layer = "payload";
    switch (h->type) {
    case SS_HELLO: {
        struct ss_hello hello;
        r = ss_hello_decode(p, n, &hello);
        if (r == SS_OK && fields) {
            if (hello.version != num(need(*fields, "version")) ||
                hello.role != num(need(*fields, "role")) ||
                hello.features != num(need(*fields, "features")) ||
                hello.pid != num(need(*fields, "pid")) || hello.uid != num(need(*fields, "uid")) ||
                hello.max_payload != num(need(*fields, "max_payload")) ||
                !bytes_eq_hex(hello.name, hello.name_len, need(*fields, "name_hex")))
                failf("HELLO fields differ");
        }
        break;
    }
    case SS_HANDOFF: {
        static struct ss_entry e[SS_MAX_FDS];
        size_t count;
        r = ss_handoff_decode(p, n, e, SS_MAX_FDS, &count);
        if (r != SS_OK) break;
        *layer = "channel";
        if (count != (size_t)nfds) return SS_E_FD_COUNT;
        if (fields) {
            struct val entries = need(*fields, "entries"), ev;
            if ((long long)count != num(need(*fields, "count"))) failf("HANDOFF count differs");
            for (size_t i = 0; i < count && i < SS_MAX_FDS; i++) {
                if (ss_json_index(entries.p, entries.n, i, &ev.p, &ev.n) != 1) {
                    failf("entry %zu missing in the file", i);
                    break;
                }
                if (e[i].id != u64str(need(ev, "id")) || e[i].family != num(need(ev, "family")) ||
                    e[i].type != num(need(ev, "type")) || e[i].proto != num(need(ev, "proto")) ||
                    !bytes_eq_hex(e[i].meta, e[i].meta_len, need(ev, "meta_hex")) ||
                    !bytes_eq_hex(e[i].data, e[i].data_len, need(ev, "data_hex")))
                    failf("HANDOFF entry %zu differs", i);
            }
        }
        return SS_OK;
    }
    case SS_ACCEPT: {
        uint64_t ids[64];
        size_t count;
        r = ss_accept_decode(p, n, ids, 64, &count);
        if (r == SS_OK && fields) {
            struct val list = need(*fields, "ids"), iv;
            if ((long long)count != num(need(*fields, "count"))) failf("ACCEPT count differs");
            for (size_t i = 0; i < count && i < 64; i++)
                if (ss_json_index(list.p, list.n, i, &iv.p, &iv.n) != 1 || ids[i] != u64str(iv))
                    failf("ACCEPT id %zu differs", i);
        }
        break;
    }
    case SS_REJECT: {
        uint64_t id;
        const uint8_t *reason;
        size_t rlen;
        r = ss_reject_decode(p, n, &id, &reason, &rlen);
        if (r == SS_OK && fields &&
            (id != u64str(need(*fields, "id")) ||
             !bytes_eq_hex(reason, rlen, need(*fields, "reason_hex"))))
            failf("REJECT fields differ");
        break;
    }
    case SS_ERROR: {
        uint16_t code;
        const uint8_t *text;
        size_t tlen;
        r = ss_error_decode(p, n, &code, &text, &tlen);
        if (r == SS_OK && fields &&
            (code != num(need(*fields, "code")) ||
             !bytes_eq_hex(text, tlen, need(*fields, "text_hex"))))
            failf("ERROR fields differ");
        break;
    }
    default:
        break;
    }
    if (r != SS_OK) return r;
    *layer = "channel";
    if (h->type != SS_HANDOFF && nfds) return SS_E_FDS_ON_WRONG_FRAME;
    return SS_OK;
}

static int codec_run(const uint8_t *raw, size_t n, int fds, uint32_t max, int eof,
                     struct ss_header *h, struct val *fields, const char **layer)
{
    *layer = "frame";
    if (n < SS_HEADER_SIZE) return eof ? SS_E_TRUNCATED : SS_E_SPACE;
    int r = ss_header_parse(raw, max, h);
    if (r != SS_OK) return r;
    if (h->nfds > fds) return SS_E_MISSING_FDS;
    if (n < SS_HEADER_SIZE + (size_t)h->length) return eof ? SS_E_TRUNCATED : SS_E_SPACE;
    if (n > SS_HEADER_SIZE + (size_t)h->length) return SS_E_SPACE; /* one frame per vector */
    return check_payload(h, raw + SS_HEADER_SIZE, h->length, h->nfds, fields, layer);
}

/* Encode a valid vector's fields with the C encoders (header included). */
static uint8_t *encode_fields(struct val frame, struct val fields, size_t *len)
{
    static uint8_t out[SS_HEADER_SIZE + 200000];
    uint8_t *p = out + SS_HEADER_SIZE;
    size_t cap = sizeof out - SS_HEADER_SIZE, plen = 0;
    int type = (int)num(need(frame, "type")), r = SS_OK;
    size_t l1 = 0, l2 = 0;
    uint8_t *b1 = NULL, *b2 = NULL;
    switch (type) {
    case SS_HELLO: {
        b1 = unhex(need(fields, "name_hex"), &l1);
        struct ss_hello h = {.version = (uint8_t)num(need(fields, "version")),
                             .role = (uint8_t)num(need(fields, "role")),
                             .features = (uint32_t)num(need(fields, "features")),
                             .pid = (uint32_t)num(need(fields, "pid")),
                             .uid = (uint32_t)num(need(fields, "uid")),
                             .max_payload = (uint32_t)num(need(fields, "max_payload")),
                             .name = b1, .name_len = l1};
        r = ss_hello_encode(&h, p, cap, &plen);
        break;
    }
    case SS_HANDOFF: {
        static struct ss_entry e[8];
        static uint8_t *bufs[16];
        struct val entries = need(fields, "entries"), ev;
        size_t count = (size_t)num(need(fields, "count")), nb = 0;
        if (count > 8) return NULL; /* more than this checker was made for */
        for (size_t i = 0; i < count; i++) {
            ss_json_index(entries.p, entries.n, i, &ev.p, &ev.n);
            size_t ml, dl;
            bufs[nb++] = unhex(need(ev, "meta_hex"), &ml);
            bufs[nb++] = unhex(need(ev, "data_hex"), &dl);
            e[i] = (struct ss_entry){.id = u64str(need(ev, "id")),
                                     .family = (uint8_t)num(need(ev, "family")),
                                     .type = (uint8_t)num(need(ev, "type")),
                                     .proto = (uint16_t)num(need(ev, "proto")),
                                     .meta = bufs[nb - 2], .meta_len = (uint32_t)ml,
                                     .data = bufs[nb - 1], .data_len = (uint32_t)dl};
        }
        r = ss_handoff_encode(e, count, p, cap, &plen);
        for (size_t i = 0; i < nb; i++) free(bufs[i]);
        break;
    }
    case SS_ACCEPT: {
        uint64_t ids[64];
        struct val list = need(fields, "ids"), iv;
        size_t count = (size_t)num(need(fields, "count"));
        if (count > 64) return NULL;
        for (size_t i = 0; i < count; i++) {
            ss_json_index(list.p, list.n, i, &iv.p, &iv.n);
            ids[i] = u64str(iv);
        }
        r = ss_accept_encode(ids, count, p, cap, &plen);
        break;
    }
    case SS_REJECT:
        b1 = unhex(need(fields, "reason_hex"), &l1);
        r = ss_reject_encode(u64str(need(fields, "id")), (const char *)b1, l1, p, cap, &plen);
        break;
    case SS_ERROR:
        b2 = unhex(need(fields, "text_hex"), &l2);
        r = ss_error_encode((uint16_t)num(need(fields, "code")), (const char *)b2, l2, p, cap,
                            &plen);
        break;
    default:
        break;
    }
    free(b1);
    free(b2);
    if (r != SS_OK) return NULL;
    ss_header_put(out, (uint8_t)type, (uint8_t)num(need(frame, "flags")),
                  (uint8_t)num(need(frame, "nfds")), (uint32_t)plen);
    *len = SS_HEADER_SIZE + plen;
    return out;
}

/* --- the connection: real bytes and real descriptors over a socketpair ------------------- */

static void io_run(const uint8_t *raw, size_t n, int nfds, uint32_t max, int eof, int valid,
                   const char *want_reason, const char *want_layer)
{
    int before = ss_count_fds(), sv[2], fds[SS_MAX_FDS + 1];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        failf("socketpair: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < nfds; i++) fds[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    union {
        char buf[CMSG_SPACE((SS_MAX_FDS + 1) * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = (void *)raw, .iov_len = n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) ss_attach_fds(&msg, control.buf, sizeof control.buf, fds, nfds);
    if (sendmsg(sv[0], &msg, MSG_NOSIGNAL) != (ssize_t)n) failf("sendmsg: %s", strerror(errno));
    for (int i = 0; i < nfds; i++) close(fds[i]); /* the copies in flight are the receiver's */
    if (eof) shutdown(sv[0], SHUT_WR);

    struct ss_conn c;
    struct ss_frame f;
    ss_conn_init(&c, sv[1], max);
    int r = ss_recv_frame(&c, &f, 1000);
    const char *layer = "frame";
    if (r == SS_OK) {
        if (f.nfds) { /* the received descriptors must be real ones */
            int type;
            socklen_t tl = sizeof type;
            if (getsockopt(f.fds[0], SOL_SOCKET, SO_TYPE, &type, &tl) < 0 || type != SOCK_STREAM)
                failf("connection: received descriptor is not the socket sent");
        }
        r = check_payload(&f.h, f.payload, f.h.length, f.nfds, NULL, &layer);
        if (r == SS_OK && valid && (f.h.length + SS_HEADER_SIZE != n ||
                                    (f.h.length && memcmp(f.payload, raw + SS_HEADER_SIZE,
                                                          f.h.length))))
            failf("connection: payload differs");
        if (r == SS_OK && eof) {
            struct ss_frame g;
            r = ss_recv_frame(&c, &g, 1000); /* the orderly end after the frame */
            if (r == SS_E_CLOSED) r = SS_OK;
        }
        ss_frame_release(&f);
    }
    if (valid && r != SS_OK) failf("connection: %s (%s)", ss_reason(r), c.err);
    if (!valid && (strcmp(ss_reason(r), want_reason) || strcmp(layer, want_layer)))
        failf("connection: got %s at %s, want %s at %s", ss_reason(r), layer, want_reason,
              want_layer);
    ss_close(&c);
    close(sv[0]);
    int after = ss_count_fds();
    if (after != before) failf("connection: %d descriptors before, %d after", before, after);
}

/* --- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "../../tests/vectors/frames.json";
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "vectors: cannot open %s: %s\n", path, strerror(errno));
        return 2;
    }
    static char text[4 << 20];
    size_t tn = fread(text, 1, sizeof text, fp);
    fclose(fp);
    struct val doc = {text, tn}, vectors, v;
    current = "(file)";
    if (!member(doc, "vectors", &vectors)) {
        fprintf(stderr, "vectors: %s has no \"vectors\" list\n", path);
        return 2;
    }
    int total = 0;
    for (size_t i = 0; ss_json_index(vectors.p, vectors.n, i, &v.p, &v.n) == 1; i++) {
        static char name[128];
        struct val nv = need(v, "name");
        snprintf(name, sizeof name, "%.*s", (int)(nv.n - 2), nv.p + 1);
        current = name;
        int before = failures, valid = is_true(need(v, "valid")), eof = is_true(need(v, "eof"));
        int nfds = (int)num(need(v, "fds"));
        uint32_t max = (uint32_t)num(need(v, "max_payload"));
        size_t n;
        uint8_t *raw = unhex(need(v, "hex"), &n);
        struct ss_header h;
        const char *layer;
        total++;
        if (!raw) {
            failf("bad hex");
            continue;
        }
        if (valid) {
            struct val frame = need(v, "frame"), fields = need(v, "fields");
            int r = codec_run(raw, n, nfds, max, eof, &h, &fields, &layer);
            if (r != SS_OK) failf("codec: %s at %s", ss_reason(r), layer);
            else if (h.type != num(need(frame, "type")) || h.flags != num(need(frame, "flags")) ||
                     h.nfds != num(need(frame, "nfds")) || h.length != num(need(frame, "length")))
                failf("codec: header fields differ");
            size_t elen;
            uint8_t *enc = encode_fields(frame, fields, &elen);
            if (!enc || elen != n || memcmp(enc, raw, n)) failf("codec: encoding differs");
            io_run(raw, n, nfds, max, eof, 1, "", "");
        } else {
            struct val reason = need(v, "reason"), lv = need(v, "layer");
            int r = codec_run(raw, n, nfds, max, eof, &h, NULL, &layer);
            if (r == SS_OK || !same_str(reason, ss_reason(r)) || !same_str(lv, layer))
                failf("codec: got %s at %s, want %.*s at %.*s", ss_reason(r), layer,
                      (int)reason.n, reason.p, (int)lv.n, lv.p);
            char want_reason[64], want_layer[16];
            snprintf(want_reason, sizeof want_reason, "%.*s", (int)reason.n - 2, reason.p + 1);
            snprintf(want_layer, sizeof want_layer, "%.*s", (int)lv.n - 2, lv.p + 1);
            io_run(raw, n, nfds, max, eof, 0, want_reason, want_layer);
        }
        free(raw);
        if (failures == before) printf("ok   %s\n", name);
    }
    printf("%d vectors, %d failures\n", total, failures);
    return failures ? 1 : (total ? 0 : 1);
}
