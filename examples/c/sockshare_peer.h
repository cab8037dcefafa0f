/*
 * sockshare_peer.h - a small C peer for the sockshare handoff channel, protocol v1.
 *
 * Two layers:
 *   - a codec (no I/O): the 12-byte frame header and the HELLO, HANDOFF, ACCEPT,
 *     REJECT and ERROR payloads. Every integer on the wire is unsigned big-endian.
 *   - a channel connection (Linux/POSIX): recvmsg/sendmsg with SCM_RIGHTS,
 *     MSG_CMSG_CLOEXEC, an MSG_CTRUNC check, the HELLO handshake with SO_PEERCRED.
 *
 * Descriptor ownership: a received frame owns its descriptors (ss_frame.fds) until the
 * caller takes one (sets the slot to -1); ss_frame_release() closes whatever is left.
 * On any error the connection closes every descriptor it holds: nothing leaks.
 *
 * Tested against the Python reference (tests/test_peers.py) and the shared vectors
 * (tests/vectors/frames.json, checked by vectors.c).
 */
#ifndef SOCKSHARE_PEER_H
#define SOCKSHARE_PEER_H

#include <stddef.h>
#include <stdint.h>

#define SS_HEADER_SIZE 12
#define SS_VERSION 1
#define SS_MAX_PAYLOAD (1u << 20) /* default and upper bound of a frame's payload */
#define SS_HANDSHAKE_MAX 4096u    /* payload limit while waiting for the peer's HELLO */
#define SS_MAX_FDS 253            /* SCM_MAX_FD: descriptors in one frame */
#define SS_MAX_META 16384         /* metadata (JSON) of one handoff entry */
#define SS_MAX_DATA 65536         /* pre-read data of one handoff entry */
#define SS_MAX_REASON 1024        /* REJECT reason, bytes (cut on a UTF-8 boundary) */
#define SS_MAX_ERROR_TEXT 4094    /* ERROR text, bytes: the payload fits SS_HANDSHAKE_MAX */
#define SS_ENTRY_SIZE 20          /* u64 id, u8 family, u8 type, u16 proto, u32, u32 */

enum ss_frame_type {
    SS_HELLO = 0x01,
    SS_ERROR = 0x02,
    SS_BYE = 0x03,
    SS_CLAIM = 0x10, /* token import frames: not used on a channel */
    SS_GRANT = 0x11,
    SS_DONE = 0x12,
    SS_HANDOFF = 0x20,
    SS_ACCEPT = 0x21,
    SS_REJECT = 0x22,
    SS_CONTROL = 0x30
};

#define SS_FLAG_ACK 0x01 /* HANDOFF: the sender waits for ACCEPT/REJECT */
#define SS_FLAG_WSA 0x02 /* HANDOFF: Windows blobs instead of fds (never on POSIX) */

#define SS_ROLE_SENDER 1
#define SS_ROLE_RECEIVER 2
#define SS_ROLE_BOTH 3

#define SS_FEATURE_SCM 0x1 /* descriptors travel as SCM_RIGHTS */
#define SS_FEATURE_WSA 0x2
#define SS_FEATURE_ACK 0x4 /* understands FLAG_ACK / ACCEPT / REJECT */

/* portable socket kind codes (the wire never carries OS numbers) */
#define SS_FAMILY_INET 1
#define SS_FAMILY_INET6 2
#define SS_FAMILY_UNIX 3
#define SS_TYPE_STREAM 1
#define SS_TYPE_DGRAM 2
#define SS_TYPE_SEQPACKET 3

/* ERROR frame codes */
enum ss_error_code {
    SS_CODE_BAD_TOKEN = 1,
    SS_CODE_WRONG_PROCESS = 2,
    SS_CODE_CONSUMED = 3,
    SS_CODE_EXPIRED = 4,
    SS_CODE_RELEASED = 5,
    SS_CODE_PROTOCOL = 6,
    SS_CODE_REFUSED = 7,
    SS_CODE_LIMIT = 8,
    SS_CODE_INTERNAL = 9,
    SS_CODE_SHUTTING_DOWN = 10
};

/* Results: SS_OK or a negative code. The first group are protocol errors by the peer
 * (ss_is_protocol_error); their ss_reason() strings are the vector file's reasons. */
enum ss_result {
    SS_OK = 0,
    SS_E_BAD_MAGIC = -1,
    SS_E_BAD_VERSION = -2,
    SS_E_UNKNOWN_TYPE = -3,
    SS_E_RESERVED = -4,
    SS_E_TOO_LARGE = -5,
    SS_E_TOO_MANY_FDS = -6,
    SS_E_MISSING_FDS = -7,
    SS_E_TRUNCATED = -8,
    SS_E_BAD_LENGTH = -9,
    SS_E_TRAILING = -10,
    SS_E_UNKNOWN_KIND = -11,
    SS_E_OVER_LIMITS = -12,
    SS_E_BAD_UTF8 = -13,
    SS_E_FD_COUNT = -14,
    SS_E_FDS_ON_WRONG_FRAME = -15,
    SS_E_STRAY_FDS = -16,      /* descriptors arrived with no frame to carry them */
    SS_E_CTRUNC = -17,         /* the kernel truncated the descriptors (MSG_CTRUNC) */
    SS_E_UNEXPECTED = -18,     /* a frame type that makes no sense here */
    SS_E_WRONG_SOCKET = -19,   /* a received fd is not the socket type its entry says */
    SS_E_PEER_CRED = -20,      /* HELLO pid/uid differ from the kernel's SO_PEERCRED */
    SS_E_NO_ENTRIES = -21,     /* a HANDOFF frame with an entry count of 0 */
    SS_E_LAST_PROTOCOL = -21,
    /* not the peer's fault, or not an error of the stream */
    SS_E_PEER_ERROR = -30,     /* the peer sent an ERROR frame (ss_conn.err has it) */
    SS_E_CLOSED = -31,         /* the peer closed the connection between two frames */
    SS_E_TIMEOUT = -32,        /* nothing arrived / could be sent in time (retryable) */
    SS_E_SYS = -33,            /* a system call failed: see errno / ss_conn.err */
    SS_E_NOMEM = -34,
    SS_E_SPACE = -35           /* output buffer too small, or a local limit exceeded */
};

const char *ss_reason(int result);   /* "bad-magic", ... (tests/vectors/frames.json) */
int ss_is_protocol_error(int result);

/* --- codec ------------------------------------------------------------------------- */

struct ss_header {
    uint8_t type;
    uint8_t flags;
    uint8_t nfds;
    uint32_t length;
};

/* Check and parse 12 header bytes against this receiver's payload limit. */
int ss_header_parse(const uint8_t *raw, uint32_t max_payload, struct ss_header *out);
void ss_header_put(uint8_t *out, uint8_t type, uint8_t flags, uint8_t nfds, uint32_t length);

struct ss_hello {
    uint8_t version; /* 1 */
    uint8_t role;
    uint32_t features;
    uint32_t pid;
    uint32_t uid;
    uint32_t max_payload;
    const uint8_t *name; /* UTF-8, at most 255 bytes; the rest of the payload */
    size_t name_len;
};

struct ss_entry {
    uint64_t id;
    uint8_t family; /* SS_FAMILY_* */
    uint8_t type;   /* SS_TYPE_* */
    uint16_t proto;
    const uint8_t *meta; /* JSON text, UTF-8; may be empty */
    uint32_t meta_len;
    const uint8_t *data; /* bytes the sender already read from the connection */
    uint32_t data_len;
};

/* Encoders write the payload only (no header) into out[cap] and set *len.
 * Decoders check everything the Python reference checks; pointers point into p. */
int ss_hello_encode(const struct ss_hello *h, uint8_t *out, size_t cap, size_t *len);
int ss_hello_decode(const uint8_t *p, size_t n, struct ss_hello *out);
int ss_handoff_encode(const struct ss_entry *e, size_t count, uint8_t *out, size_t cap,
                      size_t *len);
/* Validates the whole payload; stores the first min(count, cap) entries in out. */
int ss_handoff_decode(const uint8_t *p, size_t n, struct ss_entry *out, size_t cap,
                      size_t *count);
int ss_accept_encode(const uint64_t *ids, size_t count, uint8_t *out, size_t cap,
                     size_t *len);
int ss_accept_decode(const uint8_t *p, size_t n, uint64_t *ids, size_t cap, size_t *count);
int ss_reject_encode(uint64_t id, const char *reason, size_t reason_len, uint8_t *out,
                     size_t cap, size_t *len);
int ss_reject_decode(const uint8_t *p, size_t n, uint64_t *id, const uint8_t **reason,
                     size_t *reason_len);
int ss_error_encode(uint16_t code, const char *text, size_t text_len, uint8_t *out,
                    size_t cap, size_t *len);
int ss_error_decode(const uint8_t *p, size_t n, uint16_t *code, const uint8_t **text,
                    size_t *text_len);
int ss_utf8_valid(const uint8_t *p, size_t n);

/* Map an SS_FAMILY_* / SS_TYPE_* code to the OS value and back (-1: unknown). */
int ss_os_family(uint8_t code);
int ss_os_type(uint8_t code);
int ss_family_code(int os_family);
int ss_type_code(int os_type);

/* Smallest JSON reader: the value of member `key` of the top-level object in
 * json[n] (raw text, e.g. `true` or `"/chat"` with its quotes). 1 found, 0 not found,
 * -1 not a well-formed object. ss_json_index does the same for an array element. */
int ss_json_member(const char *json, size_t n, const char *key, const char **val,
                   size_t *val_len);
int ss_json_index(const char *json, size_t n, size_t index, const char **val,
                  size_t *val_len);

/* --- channel connection -------------------------------------------------------------- */

struct ss_frame {
    struct ss_header h;
    uint8_t *payload; /* malloc'd, h.length bytes (NULL when 0) */
    int fds[SS_MAX_FDS];
    int nfds;
};

/* Free the payload and close every descriptor still >= 0 in f->fds. */
void ss_frame_release(struct ss_frame *f);

#define SS_FDQ_MAX (3 * SS_MAX_FDS)

struct ss_conn {
    int fd;
    uint32_t max_payload;      /* what we accept (sent in our HELLO) */
    uint32_t peer_max_payload; /* what the peer accepts (from its HELLO) */
    struct ss_hello peer;      /* peer.name points into peer_name */
    uint8_t peer_name[256];
    uint8_t *buf;
    size_t len, cap;
    int fdq[SS_FDQ_MAX]; /* received descriptors no frame has claimed yet (FIFO) */
    size_t nfdq;
    int have_pending; /* header of the frame being assembled was parsed */
    struct ss_header pending;
    int pending_fds[SS_MAX_FDS];
    int failed; /* a protocol or system error: the stream cannot go on */
    char err[512];
};

/* Take over a connected UNIX stream socket (no handshake). */
void ss_conn_init(struct ss_conn *c, int fd, uint32_t max_payload);
/* Connect to a listening channel at a filesystem path. */
int ss_connect_unix(struct ss_conn *c, const char *path, int timeout_ms);
/* As the connecting side: send our HELLO, read the listener's HELLO (or ERROR),
 * check it against SO_PEERCRED. */
int ss_handshake(struct ss_conn *c, uint8_t role, const char *name, int timeout_ms);
/* Next complete frame. SS_E_TIMEOUT leaves the connection usable; other errors fail it
 * (every held descriptor is closed). timeout_ms < 0: wait forever. */
int ss_recv_frame(struct ss_conn *c, struct ss_frame *f, int timeout_ms);
/* Send one frame; fds ride with its first byte. */
int ss_send_frame(struct ss_conn *c, uint8_t type, uint8_t flags, const uint8_t *payload,
                  size_t len, const int *fds, int nfds, int timeout_ms);
/* Best effort: tell the peer why we give up (ERROR frame). */
void ss_send_error(struct ss_conn *c, uint16_t code, const char *text);
/* Close the socket and every descriptor the connection still holds. */
void ss_close(struct ss_conn *c);

/* Attach nfds descriptors to msg as one SCM_RIGHTS message, in the caller's control
 * buffer (control_size >= CMSG_SPACE(nfds * sizeof(int)), aligned for a cmsghdr). */
struct msghdr;
void ss_attach_fds(struct msghdr *msg, void *control, size_t control_size, const int *fds,
                   int nfds);

/* Descriptors this process holds (entries of /proc/self/fd), -1 if unknown. */
int ss_count_fds(void);

#endif
