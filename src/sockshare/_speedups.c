/* sockshare._speedups: optional compiled hot paths of the dispatcher and the channel.
 *
 * Every function here has a pure-Python twin that stays the reference (and what Windows
 * and any build without a C compiler run); sockshare._fast picks one or the other, and
 * SOCKSHARE_PURE_PYTHON=1 forces the Python ones. Nothing here changes the wire: the
 * frames are the ones docs/protocol.md describes (tests/vectors check both paths).
 *
 *   accept_many(lfd, budget, fd_high) -> (list[(fd, address)], status)
 *       accept4(SOCK_CLOEXEC) until EAGAIN, `budget` connections, or an accepted
 *       descriptor >= fd_high; status 0 (EAGAIN or budget), -1 (fd_high reached: the
 *       last item is that descriptor), or the errno that stopped it (EMFILE, ENFILE,
 *       ENOBUFS, ...). Connections aborted before accept (ECONNABORTED) are skipped.
 *   handoff_frame(flags, items) -> bytes
 *       one HANDOFF frame (header, count, entries) for items of
 *       (id: int, kind: bytes[4], meta: bytes, data: bytes); sizes are the caller's checks.
 *   send_fds(fd, data, fds) -> int
 *       one sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL) of `data` with `fds` as SCM_RIGHTS.
 *   recv_fds(fd, bufsize, flags) -> (bytes, list[int], msg_flags)
 *       one recvmsg(MSG_CMSG_CLOEXEC | flags) with room for 253 descriptors.
 *   accept_ids(payload) -> list[int]
 *       the ids of an ACCEPT payload (count, then u64 ids), strictly sized.
 *   close_fds(fds) -> None
 *       close every descriptor of a list, ignoring errors.
 *   dispatch_burst(lfd, budget, fd_high, seq, hid, last, prefix, mid, end, kind, flags,
 *                  now, workers) -> (frames, accepted, status, last_fd, last, seq, hid)
 *       the dispatcher's whole burst (sockshare.server._listeners): accept as
 *       accept_many does, write each connection's metadata (prefix, the "<pid>.<seq>"
 *       number, mid, host, port, end: the JSON of the Python path), choose its worker
 *       as LeastConnections does from workers [(id, load, room, raw dict)], register
 *       it in that worker's dict (hid -> (fd, meta, now, b"")) and pack one HANDOFF frame
 *       per worker: frames are [(worker index, frame, fds, count)].
 *   dispatch_sniffed(... the same ..., workers, max_head, max_meta, max_payload, pending)
 *                    -> (frames, placed, status, last_fd, last, seq, hid, left)
 *       dispatch_burst for a listener that sniffs the HTTP Host: each connection's first
 *       max_head bytes peeked (MSG_PEEK), parsed by http_head; a whole, plain HTTP/1.x
 *       head is read (exactly its bytes) and travels as the handoff's pre-read data
 *       (registered as hid -> (fd, meta, now, head)), the request's protocol, method,
 *       path, version and host written into the metadata after the client address as
 *       the Python sniffer's result would be (end: the rest, ',"route":...}'). The
 *       others (nothing queued yet, TLS, anything http_head leaves to Python, metadata
 *       over max_meta) are not touched and come back in left as (fd, address, 0), for
 *       the Python sniffer, or (fd, address, -1) when nothing was queued yet (the caller
 *       may give it again in `pending`); one whose head failed while it was read as (fd,
 *       address, errno). `pending`: [(fd, address)] of earlier bursts' -1s, tried first
 *       (they count in the budget; the call owns their descriptors: each comes back in a
 *       frame or in left, or is closed if the call raises). No frame grows past
 *       max_payload (the caller's budget sees to it).
 *   http_head(buf, max_size) -> (method, target, version, host, length) | None
 *       the C HTTP head parser alone (a subset of _sniff.parse_http_head, which stays
 *       the reference): None where it leaves the bytes to the Python parser.
 *   recv_answers(fd, bufsize, raw, max_payload) -> (settled, closed, controls, rest, fds,
 *                                                  flags)
 *       the dispatcher's read of a worker channel on the compiled path: one recvmsg
 *       (MSG_DONTWAIT) as recv_fds; when it brought no descriptors and no cut, the
 *       leading whole ACCEPT frames whose ids are all in `raw` (none twice) are settled
 *       as settle_accepts does (`settled`: how many handoffs), and the whole CONTROL
 *       frames after them come back in `controls` if nothing else follows: each the
 *       dict json.loads would make of a worker's report of closed connections written
 *       as its encoder writes it ({"ev":"closed","n":N[,"active":A]}), else the payload;
 *       `rest` is what is left for the Python decoder (from the first frame not taken,
 *       or all of it), with the message's `fds` and `flags` as recv_fds returns them;
 *       `closed` is the sum of the reports' counts when `controls` are all reports of
 *       closed connections and `rest` is empty, else -1.
 *       An empty read (the peer closed) comes back as rest b"" with nothing settled.
 *   settle_accepts(payload, raw) -> (closed, other ids)
 *       an ACCEPT payload: the ids found in `raw` are removed and their descriptors
 *       closed; the others come back for the ordinary tickets.
 *   send_single(fd, sock, flags, hid, meta, data, max_payload, close) -> 1 | 0 | -1 | bytes
 *       the channel's one-socket send (ChannelState.single_frame + one sendmsg): the
 *       metadata dict encoded as json.dumps would (plain types), the frame packed and
 *       written with sock's descriptor; 1 it went (and, with close, sock closed as
 *       socket.close() does), 0 the socket is full, the rest of a frame that started,
 *       or -1: the Python path must do this one (and say what is wrong).
 *   recv_batch(fd, bufsize, flags, max_msgs, single, sockcls, blocking, max_payload,
 *              handoff_cls, answer) -> (handoffs, acked, [(data, fds, msg_flags)])
 *       the channel's receive: one recvmmsg; while `single`, each message that is one
 *       whole one-socket HANDOFF frame becomes a Handoff with a checked socket (as
 *       sockshare.backends._fds.checked_socket); from the first that is not, the
 *       messages come back as they are, in order, descriptors open.
 *   new_slots(cls, *values) -> object
 *       an object of a slots dataclass (Ticket, Handoff) with its slots set in order,
 *       without running the generated __init__.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#define MAX_FDS 253

/* b"": the pre-read data of a compiled handoff that has none */
static PyObject *empty_bytes;

static PyObject *
make_address(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[INET6_ADDRSTRLEN + 64];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        /* as CPython's socket module: getnameinfo(NI_NUMERICHOST) (a scope as %iface) */
        int rc = getnameinfo((const struct sockaddr *)ss, len, host, sizeof host, NULL, 0,
                             NI_NUMERICHOST);
        if (rc != 0) {
            PyErr_Format(PyExc_OSError, "getnameinfo: %s", gai_strerror(rc));
            return NULL;
        }
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                             (unsigned int)ntohl(a->sin6_flowinfo),
                             (unsigned int)a->sin6_scope_id);
    }
    /* AF_UNIX and anything else: the callers use the address of TCP listeners only */
    return PyUnicode_FromString("");
}

/* accept4(SOCK_CLOEXEC) the next connection of `lfd`: its descriptor; -1 when there is
 * none to take now (*status stays 0 for EAGAIN, else the errno that stopped it: EMFILE,
 * ENFILE, ENOBUFS, ...), -2 when a signal handler raised. Connections aborted before
 * accept (ECONNABORTED) are skipped, EINTR retried. */
static int
accept_next(int lfd, struct sockaddr_storage *ss, socklen_t *len, int *status)
{
    for (;;) {
        int fd;
        *len = sizeof *ss;
        Py_BEGIN_ALLOW_THREADS
        fd = accept4(lfd, (struct sockaddr *)ss, len, SOCK_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (fd >= 0)
            return fd;
        int e = errno;
        if (e == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -2;
            continue;
        }
        if (e == ECONNABORTED)
            continue;
        if (e != EAGAIN && e != EWOULDBLOCK)
            *status = e;
        return -1;
    }
}

static PyObject *
accept_many(PyObject *self, PyObject *args)
{
    int lfd, budget, fd_high;
    if (!PyArg_ParseTuple(args, "iii:accept_many", &lfd, &budget, &fd_high))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    int status = 0;
    while (budget > 0) {
        struct sockaddr_storage ss;
        socklen_t len;
        int fd = accept_next(lfd, &ss, &len, &status);
        if (fd == -2)
            goto fail;
        if (fd < 0)
            break;
        PyObject *addr = make_address(&ss, len);
        PyObject *item = addr == NULL ? NULL : Py_BuildValue("(iN)", fd, addr);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            close(fd);
            goto fail;
        }
        Py_DECREF(item);
        budget--;
        if (fd >= fd_high) {
            status = -1;
            break;
        }
    }
    return Py_BuildValue("(Ni)", out, status);
fail:
    /* never leave a descriptor behind: close what this call accepted */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(out); i++) {
        PyObject *it = PyList_GET_ITEM(out, i);
        close((int)PyLong_AsLong(PyTuple_GET_ITEM(it, 0)));
    }
    Py_DECREF(out);
    return NULL;
}

static inline void put16(unsigned char *p, unsigned int v) { p[0] = v >> 8; p[1] = v; }
static inline void put32(unsigned char *p, unsigned long v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline void put64(unsigned char *p, unsigned long long v)
{
    put32(p, (unsigned long)(v >> 32));
    put32(p + 4, (unsigned long)(v & 0xffffffffULL));
}

static PyObject *
handoff_frame(PyObject *self, PyObject *args)
{
    int flags;
    PyObject *items;
    if (!PyArg_ParseTuple(args, "iO!:handoff_frame", &flags, &PyList_Type, &items))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (n < 1 || n > MAX_FDS) {
        PyErr_Format(PyExc_ValueError, "a HANDOFF frame has 1..%d entries, not %zd", MAX_FDS, n);
        return NULL;
    }
    if (flags < 0 || flags > 255) {
        PyErr_SetString(PyExc_ValueError, "flags is one byte");
        return NULL;
    }
    Py_ssize_t size = 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 4 || !PyLong_Check(PyTuple_GET_ITEM(it, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(it, 1)) || PyBytes_GET_SIZE(PyTuple_GET_ITEM(it, 1)) != 4
            || !PyBytes_Check(PyTuple_GET_ITEM(it, 2)) || !PyBytes_Check(PyTuple_GET_ITEM(it, 3))) {
            PyErr_SetString(PyExc_TypeError,
                            "items are (id: int, kind: 4 bytes, meta: bytes, data: bytes)");
            return NULL;
        }
        size += 20 + PyBytes_GET_SIZE(PyTuple_GET_ITEM(it, 2))
                + PyBytes_GET_SIZE(PyTuple_GET_ITEM(it, 3));
    }
    if (size > 0xffffffffLL) {
        PyErr_SetString(PyExc_OverflowError, "frame too large");
        return NULL;
    }
    PyObject *frame = PyBytes_FromStringAndSize(NULL, 12 + size);
    if (frame == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
    p[0] = 'S'; p[1] = 'S'; p[2] = 1; p[3] = 0x20; p[4] = (unsigned char)flags;
    p[5] = (unsigned char)n; p[6] = 0; p[7] = 0;
    put32(p + 8, (unsigned long)size);
    put16(p + 12, (unsigned int)n);
    p += 14;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        unsigned long long hid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(it, 0));
        if (hid == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(frame);
            return NULL;
        }
        PyObject *kind = PyTuple_GET_ITEM(it, 1), *meta = PyTuple_GET_ITEM(it, 2),
                 *data = PyTuple_GET_ITEM(it, 3);
        Py_ssize_t lm = PyBytes_GET_SIZE(meta), ld = PyBytes_GET_SIZE(data);
        put64(p, hid);
        memcpy(p + 8, PyBytes_AS_STRING(kind), 4);
        put32(p + 12, (unsigned long)lm);
        put32(p + 16, (unsigned long)ld);
        p += 20;
        memcpy(p, PyBytes_AS_STRING(meta), lm);
        p += lm;
        memcpy(p, PyBytes_AS_STRING(data), ld);
        p += ld;
    }
    return frame;
}

static int
fds_from_list(PyObject *list, int *fds, Py_ssize_t *nfds)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(list);
    if (n > MAX_FDS) {
        PyErr_Format(PyExc_ValueError, "at most %d descriptors a message, not %zd", MAX_FDS, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(list, i));
        if (fd == -1 && PyErr_Occurred())
            return -1;
        if (fd < 0 || fd > 0x7fffffffL) {
            PyErr_Format(PyExc_ValueError, "bad descriptor %ld", fd);
            return -1;
        }
        fds[i] = (int)fd;
    }
    *nfds = n;
    return 0;
}

/* one sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL) of `len` bytes with the descriptors `fds`
 * as SCM_RIGHTS, again on EINTR: bytes sent, 0 if the socket is full (EAGAIN), -1 with
 * an exception set */
static Py_ssize_t
sendmsg_fds(int sfd, const void *data, size_t len, const int *fds, Py_ssize_t nfds)
{
    union {
        char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {(void *)data, len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        memset(&ctl, 0, CMSG_SPACE(sizeof(int) * nfds));
        msg.msg_control = ctl.space;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    for (;;) {
        ssize_t sent;
        Py_BEGIN_ALLOW_THREADS
        sent = sendmsg(sfd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        Py_END_ALLOW_THREADS
        if (sent >= 0)
            return sent;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static PyObject *
send_fds(PyObject *self, PyObject *args)
{
    int sfd;
    Py_buffer buf;
    PyObject *fdlist;
    if (!PyArg_ParseTuple(args, "iy*O:send_fds", &sfd, &buf, &fdlist))
        return NULL;
    int fds[MAX_FDS];
    Py_ssize_t nfds = 0, sent = -1;
    PyObject *seq = PySequence_Fast(fdlist, "fds must be a sequence of ints");
    if (seq != NULL && fds_from_list(seq, fds, &nfds) == 0) {
        if (nfds > 0 && buf.len == 0)
            PyErr_SetString(PyExc_ValueError, "descriptors must travel with at least one data byte");
        else if ((sent = sendmsg_fds(sfd, buf.buf, (size_t)buf.len, fds, nfds)) == 0 && buf.len > 0) {
            errno = EAGAIN;
            PyErr_SetFromErrno(PyExc_OSError);   /* (BlockingIOError) */
            sent = -1;
        }
    }
    Py_XDECREF(seq);
    PyBuffer_Release(&buf);
    return sent < 0 ? NULL : PyLong_FromSsize_t(sent);
}

/* close every descriptor of a list of ints (the error paths: never leave one behind) */
static void
close_fd_list(PyObject *list)
{
    if (list == NULL)
        return;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++)
        close((int)PyLong_AsLong(PyList_GET_ITEM(list, i)));
    PyErr_Clear();
}

/* close the SCM_RIGHTS descriptors of a received message, from control message `from` on
 * (NULL: all of them), skipping the first `skip` of that one */
static void
close_message_fds_from(struct msghdr *msg, struct cmsghdr *from, size_t skip)
{
    for (struct cmsghdr *c = from != NULL ? from : CMSG_FIRSTHDR(msg); c != NULL;
         c = CMSG_NXTHDR(msg, c), skip = 0) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t j = skip; j < n; j++) {
            int fd;
            memcpy(&fd, (int *)CMSG_DATA(c) + j, sizeof fd);
            close(fd);
        }
    }
}

static void
close_message_fds(struct msghdr *msg)
{
    close_message_fds_from(msg, NULL, 0);
}

/* the SCM_RIGHTS descriptors of a received message, as a new list of ints; on failure
 * every one of them is closed and NULL returned */
static PyObject *
fds_of_message(struct msghdr *msg)
{
    PyObject *fds = PyList_New(0);
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *p = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, p + i, sizeof fd);
            PyObject *o = fds == NULL ? NULL : PyLong_FromLong(fd);
            if (o == NULL || PyList_Append(fds, o) < 0) {
                Py_XDECREF(o);
                close_message_fds_from(msg, c, i);   /* this one and the rest */
                if (fds != NULL) {
                    PyObject *et, *ev, *tb;
                    PyErr_Fetch(&et, &ev, &tb);
                    close_fd_list(fds);
                    PyErr_Restore(et, ev, tb);
                    Py_DECREF(fds);
                }
                return NULL;
            }
            Py_DECREF(o);
        }
    }
    return fds;
}

static PyObject *
recv_fds(PyObject *self, PyObject *args)
{
    int sfd, flags;
    Py_ssize_t bufsize;
    if (!PyArg_ParseTuple(args, "ini:recv_fds", &sfd, &bufsize, &flags))
        return NULL;
    if (bufsize <= 0) {
        PyErr_SetString(PyExc_ValueError, "bufsize must be positive");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, bufsize);
    if (data == NULL)
        return NULL;
    union {
        char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {PyBytes_AS_STRING(data), (size_t)bufsize};
    struct msghdr msg;
    ssize_t got;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.space;
        msg.msg_controllen = sizeof ctl.space;
        Py_BEGIN_ALLOW_THREADS
        got = recvmsg(sfd, &msg, MSG_CMSG_CLOEXEC | flags);
        Py_END_ALLOW_THREADS
        if (got >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(data);
            return NULL;
        }
    }
    if (got < 0) {
        Py_DECREF(data);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *fds = fds_of_message(&msg);
    if (fds == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    if (got != bufsize && _PyBytes_Resize(&data, got) < 0) {
        close_fd_list(fds);
        Py_DECREF(fds);
        return NULL;
    }
    return Py_BuildValue("(NNi)", data, fds, msg.msg_flags);
}

/* -- objects of slots classes (the dataclasses Handoff and Ticket) ------------------- */

/* where each of a slots class's __slots__ lives in its objects, found once per class */
#define SLOTS_MAX 16
typedef struct {
    PyTypeObject *cls;   /* (a strong reference) */
    Py_ssize_t n;
    Py_ssize_t offset[SLOTS_MAX];
} slots_t;
static slots_t slot_layouts[4];

static slots_t *
slots_of(PyObject *cls)
{
    for (int i = 0; i < 4; i++)
        if (slot_layouts[i].cls == (PyTypeObject *)cls)
            return &slot_layouts[i];
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "a class with __slots__");
        return NULL;
    }
    int free_ = -1;
    for (int i = 0; i < 4 && free_ < 0; i++)
        if (slot_layouts[i].cls == NULL)
            free_ = i;
    PyObject *names = PyObject_GetAttrString(cls, "__slots__");
    if (names == NULL)
        return NULL;
    slots_t lay = {NULL, 0, {0}};
    if (free_ < 0 || !PyTuple_Check(names) || PyTuple_GET_SIZE(names) > SLOTS_MAX
        || ((PyTypeObject *)cls)->tp_base != &PyBaseObject_Type) {
        Py_DECREF(names);
        PyErr_SetString(PyExc_TypeError, "new_slots: a class of its own __slots__ (a tuple) only");
        return NULL;
    }
    lay.n = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < lay.n; i++) {
        PyObject *d = PyDict_GetItemWithError(((PyTypeObject *)cls)->tp_dict, PyTuple_GET_ITEM(names, i));
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type
            || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(names);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "new_slots: a slot that is not an object member");
            return NULL;
        }
        lay.offset[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    Py_DECREF(names);
    Py_INCREF(cls);
    lay.cls = (PyTypeObject *)cls;
    slot_layouts[free_] = lay;
    return &slot_layouts[free_];
}

/* a new object of the slots class `cls`, its slots set in order to `values` (as many as
 * it has): what its dataclass __init__ does, without running it */
static PyObject *
slots_new(PyObject *cls, PyObject *const *values, Py_ssize_t n)
{
    slots_t *lay = slots_of(cls);
    if (lay == NULL)
        return NULL;
    if (n != lay->n)
        return PyErr_Format(PyExc_TypeError, "new_slots: %zd values for %zd slots", n, lay->n);
    PyObject *o = lay->cls->tp_alloc(lay->cls, 0);
    if (o == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(values[i]);
        *(PyObject **)((char *)o + lay->offset[i]) = values[i];
    }
    return o;
}

/* new_slots(cls, *values) -> object */
static PyObject *
new_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "new_slots(cls, *values)");
        return NULL;
    }
    return slots_new(args[0], args + 1, nargs - 1);
}

/* -- the channel's receive hot path ------------------------------------------------ */

#define MAX_META (16 * 1024)
#define MAX_DATA (64 * 1024)
#define SINGLE_MIN 34          /* frame header + count + one entry header */
#define BATCH_MAX 32           /* messages one recv_batch call reads */
#define BATCH_SLOT 2048        /* bytes each message after the first has room for (the
                                * buffers stay under glibc's mmap threshold) */

/* what sockshare.backends._fds.checked_socket needs, looked up once */
static PyObject *sock_family_get, *sock_type_get;   /* _socket.socket's C getters */
static PyObject *sock_proto_get, *sock_close;   /* (and _socket.socket.close) */
static PyObject *str_io_refs, *str_closed, *str_setblocking, *str_detach, *str_fileno;
static PyObject *long_zero;

static int
socket_api(void)
{
    if (sock_type_get != NULL)
        return 0;
    PyObject *mod = PyImport_ImportModule("_socket");
    if (mod == NULL)
        return -1;
    PyObject *cls = PyObject_GetAttrString(mod, "socket");
    Py_DECREF(mod);
    if (cls == NULL)
        return -1;
    PyObject *dict = ((PyTypeObject *)cls)->tp_dict;
    PyObject *fam = PyDict_GetItemString(dict, "family"), *typ = PyDict_GetItemString(dict, "type"),
             *pro = PyDict_GetItemString(dict, "proto");
    Py_DECREF(cls);
    if (fam == NULL || typ == NULL || pro == NULL || Py_TYPE(fam)->tp_descr_get == NULL
        || Py_TYPE(typ)->tp_descr_get == NULL || Py_TYPE(pro)->tp_descr_get == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_socket.socket has no family/type getters");
        return -1;
    }
    str_io_refs = PyUnicode_InternFromString("_io_refs");
    str_closed = PyUnicode_InternFromString("_closed");
    str_setblocking = PyUnicode_InternFromString("setblocking");
    str_detach = PyUnicode_InternFromString("detach");
    str_fileno = PyUnicode_InternFromString("fileno");
    long_zero = PyLong_FromLong(0);
    if (!str_io_refs || !str_closed || !str_setblocking || !str_detach || !str_fileno || !long_zero)
        return -1;
    Py_INCREF(fam);
    Py_INCREF(typ);
    Py_INCREF(pro);
    sock_proto_get = pro;
    sock_close = PyDict_GetItemString(dict, "close");
    if (sock_close == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_socket.socket has no close");
        return -1;
    }
    Py_INCREF(sock_close);
    sock_family_get = fam;
    sock_type_get = typ;
    return 0;
}

static long
sock_get_long(PyObject *getter, PyObject *sock)
{
    PyObject *v = Py_TYPE(getter)->tp_descr_get(getter, sock, (PyObject *)Py_TYPE(sock));
    if (v == NULL)
        return -1;
    long r = PyLong_AsLong(v);
    Py_DECREF(v);
    return r;
}

/* the portable family/type codes of the wire (sockshare.protocol._messages) */
static int family_of_code(int c) { return c == 1 ? AF_INET : c == 2 ? AF_INET6 : c == 3 ? AF_UNIX : -1; }
static int type_of_code(int c) { return c == 1 ? SOCK_STREAM : c == 2 ? SOCK_DGRAM : c == 3 ? SOCK_SEQPACKET : -1; }
static int code_of_family(long f) { return f == AF_INET ? 1 : f == AF_INET6 ? 2 : f == AF_UNIX ? 3 : -1; }
static int code_of_type(long t)
{
    t &= 0xf;   /* (SOCK_NONBLOCK/SOCK_CLOEXEC may be or-ed in) */
    return t == SOCK_STREAM ? 1 : t == SOCK_DGRAM ? 2 : t == SOCK_SEQPACKET ? 3 : -1;
}

/* checked_socket in C, for the fast form of sockshare.backends._fds._wrap: a `cls`
 * (socket.socket) object for the received `fd` whose family/type the kernel gives
 * (getsockname, SO_TYPE: what the constructor asks anyway) and which must be the
 * claimed ones, put in `blocking` mode (-1: left as it is). NULL with no exception set
 * when anything is not as claimed or fails: `fd` is then left open for the Python path,
 * which does it again and says what is wrong. */
static PyObject *
adopt_socket(PyTypeObject *cls, int fd, int family, int type, int proto, int blocking)
{
    PyObject *sock = NULL, *args = Py_BuildValue("(iiii)", -1, -1, proto, fd);
    if (args == NULL)
        goto fallback;
    sock = cls->tp_new(cls, args, NULL);
    if (sock == NULL)
        goto fallback;
    if (cls->tp_base->tp_init(sock, args, NULL) < 0) {
        Py_CLEAR(args);
        goto detach;   /* (its descriptor is -1 unless a late step failed: detach anyway) */
    }
    Py_CLEAR(args);
    if (sock_get_long(sock_family_get, sock) != family || sock_get_long(sock_type_get, sock) != type
        || PyObject_SetAttr(sock, str_io_refs, long_zero) < 0
        || PyObject_SetAttr(sock, str_closed, Py_False) < 0)
        goto detach;
    if (blocking >= 0) {
        PyObject *r = PyObject_CallMethodOneArg(sock, str_setblocking, blocking ? Py_True : Py_False);
        if (r == NULL)
            goto detach;
        Py_DECREF(r);
    }
    return sock;
detach:
    PyErr_Clear();
    {
        PyObject *r = PyObject_CallMethodNoArgs(sock, str_detach);
        if (r == NULL) {   /* cannot happen; never let the object close the caller's fd */
            PyErr_Clear();
            Py_DECREF(sock);   /* (leaks nothing: the Python path closes fd once) */
            return NULL;
        }
        Py_DECREF(r);
    }
fallback:
    Py_XDECREF(sock);
    PyErr_Clear();
    return NULL;
}

static inline unsigned long get32(const unsigned char *p)
{
    return ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) | ((unsigned long)p[2] << 8) | p[3];
}

/* One received message as a Handoff, when it is exactly one whole one-socket HANDOFF
 * frame with its one descriptor (ChannelState.receive_single's test) and the socket is
 * what it claims. NULL with no exception: not one (the message goes the Python way). */
static PyObject *
single_handoff(const unsigned char *p, Py_ssize_t got, int fd, Py_ssize_t max_payload,
               PyTypeObject *sockcls, int blocking, PyObject *handoff_cls, PyObject *answer)
{
    if (got < SINGLE_MIN || p[0] != 'S' || p[1] != 'S' || p[2] != 1 || p[3] != 0x20 || p[4] > 1
        || p[5] != 1 || p[6] != 0 || p[7] != 0)
        return NULL;
    unsigned long length = get32(p + 8), mlen = get32(p + 26), dlen = get32(p + 30);
    unsigned int count = ((unsigned int)p[12] << 8) | p[13];
    if (count != 1 || (unsigned long)got != 12 + length || length != 22 + mlen + dlen
        || mlen > MAX_META || dlen > MAX_DATA || (Py_ssize_t)length > max_payload)
        return NULL;
    int family = family_of_code(p[22]), type = type_of_code(p[23]);
    if (family < 0 || type < 0)
        return NULL;
    unsigned long long hid = ((unsigned long long)get32(p + 14) << 32) | get32(p + 18);
    PyObject *sock = adopt_socket(sockcls, fd, family, type, ((int)p[24] << 8) | p[25], blocking);
    if (sock == NULL)
        return NULL;
    /* Handoff(id, socket, data, raw_meta, acked, _answer), answered False, _meta None */
    PyObject *argv[8];
    argv[0] = PyLong_FromUnsignedLongLong(hid);
    argv[1] = sock;
    argv[2] = PyBytes_FromStringAndSize((const char *)p + SINGLE_MIN + mlen, (Py_ssize_t)dlen);
    argv[3] = PyBytes_FromStringAndSize((const char *)p + SINGLE_MIN, (Py_ssize_t)mlen);
    argv[4] = p[4] ? Py_True : Py_False;
    argv[5] = answer;
    argv[6] = Py_False;
    argv[7] = Py_None;
    PyObject *h = NULL;
    if (argv[0] != NULL && argv[2] != NULL && argv[3] != NULL)
        h = slots_new(handoff_cls, argv, 8);
    Py_XDECREF(argv[0]);
    Py_XDECREF(argv[2]);
    Py_XDECREF(argv[3]);
    if (h == NULL) {   /* (memory): give the descriptor back to the Python path */
        PyObject *r = PyObject_CallMethodNoArgs(sock, str_detach);
        Py_XDECREF(r);
        PyErr_Clear();
    }
    Py_DECREF(sock);
    return h;
}

/* recv_batch(fd, bufsize, flags, max_msgs, single, sockcls, blocking, max_payload,
 *            handoff_cls, answer) -> (handoffs, acked, messages)
 * One recvmmsg(MSG_CMSG_CLOEXEC | flags; MSG_WAITFORONE unless flags has MSG_DONTWAIT)
 * of up to max_msgs messages from a SOCK_STREAM channel: the first with room for
 * bufsize bytes, the others BATCH_SLOT. While `single` (the decoder is idle), each
 * message that is one whole one-socket HANDOFF frame becomes a Handoff (handoffs, of
 * which `acked` are acknowledged ones); from the first that is not, the messages come
 * back as (data, fds, msg_flags), in order, for the Python decoder. */
static PyObject *
recv_batch(PyObject *self, PyObject *args)
{
    int sfd, flags, nmax, single, blocking;
    Py_ssize_t bufsize, max_payload;
    PyObject *sockcls, *handoff_cls, *answer;
    if (!PyArg_ParseTuple(args, "iniipOinOO:recv_batch", &sfd, &bufsize, &flags, &nmax, &single,
                          &sockcls, &blocking, &max_payload, &handoff_cls, &answer))
        return NULL;
    if (bufsize <= 0 || nmax < 1 || nmax > BATCH_MAX) {
        PyErr_SetString(PyExc_ValueError, "recv_batch: bad bufsize or max_msgs");
        return NULL;
    }
    if (sockcls == Py_None)
        single = 0;
    else if (!PyType_Check(sockcls) || ((PyTypeObject *)sockcls)->tp_base == NULL)
        return PyErr_Format(PyExc_TypeError, "recv_batch: sockcls is a socket class or None");
    if (single && socket_api() < 0)
        return NULL;
    typedef union {
        char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl_t;
    size_t total = (size_t)bufsize + (size_t)(nmax - 1) * BATCH_SLOT;
    char *buf = PyMem_Malloc(total);
    ctl_t *ctl = PyMem_Malloc(sizeof(ctl_t) * (size_t)nmax);
    struct mmsghdr *mm = PyMem_Calloc((size_t)nmax, sizeof *mm);
    struct iovec *iov = PyMem_Malloc(sizeof *iov * (size_t)nmax);
    PyObject *result = NULL, *hs = NULL, *raw = NULL;
    int got = 0, acked = 0, i = 0;
    if (buf == NULL || ctl == NULL || mm == NULL || iov == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    int rflags = MSG_CMSG_CLOEXEC | flags | (flags & MSG_DONTWAIT ? 0 : MSG_WAITFORONE);
    for (;;) {
        char *b = buf;
        for (int i = 0; i < nmax; i++) {
            iov[i].iov_base = b;
            iov[i].iov_len = i == 0 ? (size_t)bufsize : BATCH_SLOT;
            b += iov[i].iov_len;
            memset(&mm[i], 0, sizeof mm[i]);
            mm[i].msg_hdr.msg_iov = &iov[i];
            mm[i].msg_hdr.msg_iovlen = 1;
            mm[i].msg_hdr.msg_control = ctl[i].space;
            mm[i].msg_hdr.msg_controllen = sizeof ctl[i].space;
        }
        Py_BEGIN_ALLOW_THREADS
        got = recvmmsg(sfd, mm, (unsigned int)nmax, rflags, NULL);
        Py_END_ALLOW_THREADS
        if (got >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            got = 0;
            goto out;
        }
    }
    if (got < 0) {
        got = 0;
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    /* the end of the stream reads as empty messages: one is enough */
    for (int i = 0; i < got; i++)
        if (mm[i].msg_len == 0) {
            for (int j = i + 1; j < got; j++)   /* (never carries descriptors; to be sure) */
                close_message_fds(&mm[j].msg_hdr);
            got = i + 1;
            break;
        }
    hs = PyList_New(0);
    raw = PyList_New(0);
    if (hs == NULL || raw == NULL)
        goto fail;
    for (; i < got && single; i++) {
        struct msghdr *m = &mm[i].msg_hdr;
        struct cmsghdr *c = CMSG_FIRSTHDR(m);
        if (m->msg_flags & (MSG_CTRUNC | MSG_TRUNC) || c == NULL || c->cmsg_level != SOL_SOCKET
            || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int))
            || CMSG_NXTHDR(m, c) != NULL)
            break;
        int fd;
        memcpy(&fd, CMSG_DATA(c), sizeof fd);
        PyObject *h = single_handoff((const unsigned char *)iov[i].iov_base, (Py_ssize_t)mm[i].msg_len,
                                     fd, max_payload, (PyTypeObject *)sockcls, blocking, handoff_cls,
                                     answer);
        if (h == NULL)
            break;
        if (PyList_Append(hs, h) < 0) {
            Py_DECREF(h);   /* (its socket closes its descriptor) */
            i++;
            goto fail;
        }
        acked += ((const unsigned char *)iov[i].iov_base)[4] != 0;
        Py_DECREF(h);
    }
    for (; i < got; i++) {
        struct msghdr *m = &mm[i].msg_hdr;
        PyObject *fds = fds_of_message(m);
        PyObject *data = fds == NULL ? NULL
                         : PyBytes_FromStringAndSize(iov[i].iov_base, (Py_ssize_t)mm[i].msg_len);
        PyObject *item = data == NULL ? NULL : Py_BuildValue("(OOi)", data, fds, m->msg_flags);
        if (item == NULL || PyList_Append(raw, item) < 0) {
            if (fds != NULL) {
                close_fd_list(fds);
                Py_DECREF(fds);
            }
            Py_XDECREF(data);
            Py_XDECREF(item);
            i++;
            goto fail;
        }
        Py_DECREF(fds);
        Py_DECREF(data);
        Py_DECREF(item);
    }
    result = Py_BuildValue("(OiO)", hs, acked, raw);
    goto out;
fail:
    /* never leave a descriptor behind: the messages not taken, and those listed */
    for (; i < got; i++)
        close_message_fds(&mm[i].msg_hdr);
    if (raw != NULL) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(raw); k++)
            close_fd_list(PyTuple_GET_ITEM(PyList_GET_ITEM(raw, k), 1));
        PyErr_Restore(et, ev, tb);
    }
out:
    Py_XDECREF(hs);
    Py_XDECREF(raw);
    PyMem_Free(buf);
    PyMem_Free(ctl);
    PyMem_Free(mm);
    PyMem_Free(iov);
    return result;
}

/* -- the channel's send hot path --------------------------------------------------- */

/* a growable byte buffer that starts on the stack */
typedef struct {
    unsigned char *p;
    size_t len, cap;
    unsigned char *stack;
} buf_t;

static int
buf_room(buf_t *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap * 2 > b->len + more ? b->cap * 2 : b->len + more;
    unsigned char *n = b->p == b->stack ? PyMem_Malloc(cap) : PyMem_Realloc(b->p, cap);
    if (n == NULL)
        return -1;
    if (b->p == b->stack)
        memcpy(n, b->p, b->len);
    b->p = n;
    b->cap = cap;
    return 0;
}

static int
buf_put(buf_t *b, const void *s, size_t n)
{
    if (buf_room(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static int
json_str(buf_t *b, PyObject *s)
{
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (buf_room(b, (size_t)n * 12 + 2) < 0)   /* the worst case: a surrogate pair each */
        return -1;
    unsigned char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') {
            *o++ = (unsigned char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '\\': *o++ = '\\'; continue;
        case '"': *o++ = '"'; continue;
        case '\b': *o++ = 'b'; continue;
        case '\f': *o++ = 'f'; continue;
        case '\n': *o++ = 'n'; continue;
        case '\r': *o++ = 'r'; continue;
        case '\t': *o++ = 't'; continue;
        }
        if (c >= 0x10000) {   /* a surrogate pair, as json.encoder.encode_basestring_ascii */
            Py_UCS4 v = c - 0x10000, hi = 0xd800 | ((v >> 10) & 0x3ff);
            *o++ = 'u';
            *o++ = hex[(hi >> 12) & 0xf]; *o++ = hex[(hi >> 8) & 0xf];
            *o++ = hex[(hi >> 4) & 0xf]; *o++ = hex[hi & 0xf];
            *o++ = '\\';
            c = 0xdc00 | (v & 0x3ff);
        }
        *o++ = 'u';
        *o++ = hex[(c >> 12) & 0xf]; *o++ = hex[(c >> 8) & 0xf];
        *o++ = hex[(c >> 4) & 0xf]; *o++ = hex[c & 0xf];
    }
    *o++ = '"';
    b->len = (size_t)(o - b->p);
    return 0;
}

/* JSON of `o` as json.dumps(o, separators=(",", ":")) writes it, for the plain types
 * only (exact dict with str keys, list, tuple, str, int, True/False/None): 1 if
 * written, 0 if `o` holds anything else (the caller's Python path encodes, or says why
 * it cannot), -1 on an error (memory) */
static int
json_value(buf_t *b, PyObject *o, int depth)
{
    if (depth > 32)
        return 0;
    if (PyUnicode_CheckExact(o))
        return json_str(b, o) < 0 ? -1 : 1;
    if (o == Py_None)
        return buf_put(b, "null", 4) < 0 ? -1 : 1;
    if (o == Py_True)
        return buf_put(b, "true", 4) < 0 ? -1 : 1;
    if (o == Py_False)
        return buf_put(b, "false", 5) < 0 ? -1 : 1;
    if (PyLong_CheckExact(o)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow)
            return 0;
        char num[32];
        int n = snprintf(num, sizeof num, "%lld", v);
        return buf_put(b, num, (size_t)n) < 0 ? -1 : 1;
    }
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        if (buf_put(b, "[", 1) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i > 0 && buf_put(b, ",", 1) < 0)
                return -1;
            int r = json_value(b, PySequence_Fast_GET_ITEM(o, i), depth + 1);
            if (r <= 0)
                return r;
            if (n != PySequence_Fast_GET_SIZE(o))
                return 0;   /* (changed under us: let Python say) */
        }
        return buf_put(b, "]", 1) < 0 ? -1 : 1;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t pos = 0, i = 0;
        PyObject *k, *v;
        if (buf_put(b, "{", 1) < 0)
            return -1;
        while (PyDict_Next(o, &pos, &k, &v)) {
            if (!PyUnicode_CheckExact(k))
                return 0;
            if ((i++ > 0 && buf_put(b, ",", 1) < 0) || json_str(b, k) < 0 || buf_put(b, ":", 1) < 0)
                return -1;
            Py_INCREF(v);
            int r = json_value(b, v, depth + 1);
            Py_DECREF(v);
            if (r <= 0)
                return r;
        }
        return buf_put(b, "}", 1) < 0 ? -1 : 1;
    }
    return 0;
}

/* socket.socket.close of socket.py for an object of its fast form: _closed, and the
 * descriptor closed unless makefile() objects still use it */
static int
sock_release(PyObject *sock)
{
    if (PyObject_SetAttr(sock, str_closed, Py_True) < 0)
        return -1;
    PyObject *refs = PyObject_GetAttr(sock, str_io_refs);
    if (refs == NULL)
        return -1;
    long n = PyLong_AsLong(refs);
    Py_DECREF(refs);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n > 0)
        return 0;
    PyObject *r = PyObject_CallOneArg(sock_close, sock);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* send_single(fd, sock, flags, hid, meta, data, max_payload, close) -> int
 * ChannelState.single_frame's frame for `sock` (its kind from the kernel's family, type
 * and protocol, as SocketKind.code_of), written with its descriptor in one non-blocking
 * sendmsg: 1 (it went), 0 (the socket is full, nothing went) or the bytes of the frame
 * that did not go yet (it has started: the caller finishes it). `meta` is None, encoded
 * JSON (bytes), or a dict encoded here as the Python path would (plain types only).
 * Nothing is sent and -1 comes back when the Python path must do it (and say what is
 * wrong): a kind the wire has no code for, metadata this encoder does not take, sizes
 * over the limits (MAX_META, MAX_DATA, `max_payload`). With `close`, a socket whose
 * frame went whole is closed as socket.close() does (a fire-and-forget handoff). */
static PyObject *
send_single(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyLong_Check(args[0]) || !PyLong_Check(args[2]) || !PyLong_Check(args[3])
        || !PyBytes_Check(args[5]) || !PyLong_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "send_single(fd: int, sock, flags: int, hid: int, meta, "
                                         "data: bytes, max_payload: int, close: bool)");
        return NULL;
    }
    int close_after = PyObject_IsTrue(args[7]);
    if (close_after < 0)
        return NULL;
    if (socket_api() < 0)
        return NULL;
    int sfd = (int)PyLong_AsLong(args[0]);
    PyObject *sock = args[1], *meta = args[4], *data = args[5];
    long flags = PyLong_AsLong(args[2]);
    unsigned long long hid = PyLong_AsUnsignedLongLong(args[3]);
    Py_ssize_t max_payload = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyObject_TypeCheck(sock, (PyTypeObject *)PyDescr_TYPE(sock_family_get)))
        return PyLong_FromLong(-1);   /* not a socket: the Python path says so */
    long family = sock_get_long(sock_family_get, sock), type = sock_get_long(sock_type_get, sock),
         proto = sock_get_long(sock_proto_get, sock);
    if (PyErr_Occurred())
        return NULL;
    int fc = code_of_family(family), tc = code_of_type(type);
    Py_ssize_t ld = PyBytes_GET_SIZE(data);
    if (fc < 0 || tc < 0 || proto < 0 || proto > 0xffff || ld > MAX_DATA)
        return PyLong_FromLong(-1);
    unsigned char stack[1024];
    buf_t b = {stack, SINGLE_MIN, sizeof stack, stack};
    PyObject *result = NULL;
    if (PyBytes_CheckExact(meta)) {
        if (buf_put(&b, PyBytes_AS_STRING(meta), (size_t)PyBytes_GET_SIZE(meta)) < 0)
            goto nomem;
    } else if (PyDict_CheckExact(meta)) {
        int r = json_value(&b, meta, 0);
        if (r < 0)
            goto nomem;
        if (r == 0) {
            result = PyLong_FromLong(-1);
            goto out;
        }
    } else if (meta != Py_None) {
        result = PyLong_FromLong(-1);
        goto out;
    }
    size_t lm = b.len - SINGLE_MIN;
    if (lm > MAX_META || (Py_ssize_t)(22 + lm + (size_t)ld) > max_payload) {
        result = PyLong_FromLong(-1);
        goto out;
    }
    if (buf_put(&b, PyBytes_AS_STRING(data), (size_t)ld) < 0)
        goto nomem;
    PyObject *fdobj = PyObject_CallMethodNoArgs(sock, str_fileno);
    long fd = fdobj == NULL ? -1 : PyLong_AsLong(fdobj);
    Py_XDECREF(fdobj);
    if (PyErr_Occurred())
        goto out;
    unsigned char *p = b.p;
    p[0] = 'S'; p[1] = 'S'; p[2] = 1; p[3] = 0x20; p[4] = (unsigned char)flags;
    p[5] = 1; p[6] = 0; p[7] = 0;
    put32(p + 8, (unsigned long)(b.len - 12));
    put16(p + 12, 1);
    put64(p + 14, hid);
    p[22] = (unsigned char)fc; p[23] = (unsigned char)tc;
    put16(p + 24, (unsigned int)proto);
    put32(p + 26, (unsigned long)lm);
    put32(p + 30, (unsigned long)ld);
    int one = (int)fd;
    Py_ssize_t sent = sendmsg_fds(sfd, p, b.len, &one, 1);
    if (sent == (Py_ssize_t)b.len) {
        if (close_after && sock_release(sock) < 0)
            goto out;
        result = PyLong_FromLong(1);
    }
    else if (sent == 0)
        result = PyLong_FromLong(0);
    else if (sent > 0)   /* the rest of a frame that has started: the caller finishes it */
        result = PyBytes_FromStringAndSize((const char *)p + sent, (Py_ssize_t)b.len - sent);
    goto out;
nomem:
    PyErr_NoMemory();
out:
    if (b.p != b.stack)
        PyMem_Free(b.p);
    return result;
}

/* the number of ids of an ACCEPT payload (count, then that many u64), strictly sized;
 * -1 with ValueError (and `b` released) if it is not one */
static Py_ssize_t
accept_count(Py_buffer *b)
{
    const unsigned char *p = (const unsigned char *)b->buf;
    if (b->len < 2) {
        PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected 2", b->len);
        PyBuffer_Release(b);
        return -1;
    }
    Py_ssize_t count = ((Py_ssize_t)p[0] << 8) | p[1];
    if (b->len != 2 + 8 * count) {
        PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected %zd", b->len,
                     2 + 8 * count);
        PyBuffer_Release(b);
        return -1;
    }
    return count;
}

/* the i-th id of an ACCEPT payload that accept_count checked */
static unsigned long long
accept_id(const Py_buffer *b, Py_ssize_t i)
{
    const unsigned char *q = (const unsigned char *)b->buf + 2 + 8 * i;
    return ((unsigned long long)get32(q) << 32) | get32(q + 4);
}

static PyObject *
accept_ids(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = accept_count(&b);
    if (count < 0)
        return NULL;
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long v = accept_id(&b, i);
        PyObject *o = PyLong_FromUnsignedLongLong(v);
        if (o == NULL) {
            Py_DECREF(out);
            PyBuffer_Release(&b);
            return NULL;
        }
        PyList_SET_ITEM(out, i, o);
    }
    PyBuffer_Release(&b);
    return out;
}

static PyObject *
close_fds(PyObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "close_fds takes a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (fd == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (fd >= 0 && fd <= 0x7fffffffL)
            close((int)fd);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}


/* -- the HTTP Host sniffer of the compiled path ----------------------------------------
 *
 * A subset of sockshare.server._sniff.parse_http_head (until="headers"), which stays the
 * reference: what this accepts, the Python parser accepts with the same result (tested
 * against it on the parser tests' inputs and fuzzed); everything else -- an incomplete
 * head, anything malformed, an absolute-form target, an IPv6 literal Host, several Host
 * lines, HTTP/0.x or 2.x, TLS -- it leaves to the Python sniffer, which then does the
 * whole job and says what is wrong. */

typedef struct {
    Py_ssize_t method_len;      /* the method: buf[0:method_len] */
    Py_ssize_t target_off, target_len;
    int minor;                  /* HTTP/1.<minor> */
    Py_ssize_t host_off, host_len;   /* the host as it will be written (before lowercasing);
                                        host_len -1: none (JSON null) */
    Py_ssize_t length;          /* the whole head, blank line included */
} http_head_t;

/* RFC 9110 tchar */
static const unsigned char tchar_set[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

/* _sniff._NAME: RFC 3986 reg-name characters */
static int
name_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || (c != 0 && strchr("-._~%!$&'()*+,;=", c) != NULL);
}

static int
lower_eq(const unsigned char *p, const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != (unsigned char)s[i])
            return 0;
    }
    return 1;
}

/* 1: a complete head as parse_http_head returns it; 0: leave it to Python */
static int
http_head(const unsigned char *b, Py_ssize_t n, http_head_t *h)
{
    Py_ssize_t i = 0;
    while (i < n && tchar_set[b[i]])
        i++;
    if (i == 0 || i >= n || b[i] != ' ')
        return 0;
    h->method_len = i++;
    h->target_off = i;
    while (i < n && b[i] >= 0x21 && b[i] <= 0x7e)
        i++;
    h->target_len = i - h->target_off;
    if (h->target_len == 0 || i + 9 > n || memcmp(b + i, " HTTP/1.", 8) != 0
        || b[i + 8] < '0' || b[i + 8] > '9')
        return 0;
    h->minor = b[i + 8] - '0';
    i += 9;
    if (i < n && b[i] == '\r')
        i++;
    if (i >= n || b[i] != '\n')
        return 0;
    i++;
    /* an absolute-form target ([Hh][Tt][Tt][Pp][Ss]?://): its authority is the host */
    const unsigned char *t = b + h->target_off;
    Py_ssize_t tl = h->target_len;
    if ((tl >= 7 && lower_eq(t, "http://", 7)) || (tl >= 8 && lower_eq(t, "https://", 8)))
        return 0;
    Py_ssize_t hv = -1, hvend = -1;
    for (;;) {
        if (i < n && b[i] == '\n') {
            i++;
            break;
        }
        if (i + 1 < n && b[i] == '\r' && b[i + 1] == '\n') {
            i += 2;
            break;
        }
        Py_ssize_t start = i;
        while (i < n && tchar_set[b[i]])
            i++;
        if (i == start || i >= n || b[i] != ':')
            return 0;
        int is_host = i - start == 4 && lower_eq(b + start, "host", 4);
        i++;
        Py_ssize_t vstart = i;
        while (i < n && (b[i] == '\t' || (b[i] >= 0x20 && b[i] != 0x7f)))
            i++;
        Py_ssize_t vend = i;
        if (i < n && b[i] == '\r')
            i++;
        if (i >= n || b[i] != '\n')
            return 0;
        i++;
        if (is_host) {
            if (hv >= 0)
                return 0;   /* several Host lines: Python says so */
            hv = vstart;
            hvend = vend;
        }
    }
    h->length = i;
    h->host_len = -1;
    if (hv >= 0) {
        while (hv < hvend && (b[hv] == ' ' || b[hv] == '\t'))
            hv++;
        while (hvend > hv && (b[hvend - 1] == ' ' || b[hvend - 1] == '\t'))
            hvend--;
        if (hvend > hv) {
            Py_ssize_t j = hv;
            while (j < hvend && name_char(b[j]))
                j++;
            Py_ssize_t name_end = j;
            if (j < hvend) {
                if (b[j] != ':')
                    return 0;   /* an IPv6 literal, or invalid: Python */
                for (j++; j < hvend; j++)
                    if (b[j] < '0' || b[j] > '9')
                        return 0;
            }
            Py_ssize_t len = name_end - hv;
            if (len > 1 && b[name_end - 1] == '.')
                len--;
            if (len < 1 || len > 255)
                return 0;
            h->host_off = hv;
            h->host_len = len;
        }
    }
    return 1;
}

/* the JSON of a target (VCHAR only): '"' and '\\' escaped as json.dumps escapes them */
static Py_ssize_t
json_target_len(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t len = n;
    for (Py_ssize_t i = 0; i < n; i++)
        len += p[i] == '"' || p[i] == '\\';
    return len;
}

static char *
put_json_target(char *m, const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] == '"' || p[i] == '\\')
            *m++ = '\\';
        *m++ = (char)p[i];
    }
    return m;
}

static const char SNIFF_A[] = "],\"protocol\":\"http\",\"method\":\"";
static const char SNIFF_B[] = "\",\"path\":\"";
static const char SNIFF_C[] = "\",\"version\":\"HTTP/1.";
static const char SNIFF_D[] = "\",\"host\":";

/* the length of json.dumps(sniffed meta, separators=(",", ":")): {"protocol":"http",...} */
static Py_ssize_t
sniff_meta_len(const unsigned char *b, const http_head_t *h)
{
    return (Py_ssize_t)(sizeof SNIFF_A - 1 - 1) + h->method_len + (Py_ssize_t)(sizeof SNIFF_B - 1)
           + json_target_len(b + h->target_off, h->target_len) + (Py_ssize_t)(sizeof SNIFF_C - 1)
           + 1 + (Py_ssize_t)(sizeof SNIFF_D - 1) + (h->host_len < 0 ? 4 : h->host_len + 2) + 1;
}

/* http_head(buf, max_size) -> (method, target, version, host, length) | None: the C
 * parser on its own, for the tests that hold it to parse_http_head */
static PyObject *
http_head_py(PyObject *self, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t max_size;
    if (!PyArg_ParseTuple(args, "y*n:http_head", &b, &max_size))
        return NULL;
    http_head_t h;
    Py_ssize_t n = b.len < max_size ? b.len : max_size;
    const unsigned char *p = b.buf;
    PyObject *out;
    if (n < 0 || !http_head(p, n, &h)) {
        out = Py_NewRef(Py_None);
    } else {
        char host[256];
        for (Py_ssize_t i = 0; i < h.host_len; i++) {
            unsigned char c = p[h.host_off + i];
            host[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
        }
        PyObject *hs = h.host_len < 0 ? Py_NewRef(Py_None)
                       : PyUnicode_DecodeASCII(host, h.host_len, "strict");
        out = hs == NULL ? NULL : Py_BuildValue(
            "(s#s#NNn)", p, h.method_len, p + h.target_off, h.target_len,
            PyUnicode_FromFormat("HTTP/1.%d", h.minor), hs, h.length);
    }
    PyBuffer_Release(&b);
    return out;
}


/* -- the dispatcher's whole accept-and-hand-over burst ------------------------------- */

typedef struct {
    long id;
    long load;
    long room;
    PyObject *raw;      /* the channel's dict of compiled handoffs in flight (borrowed) */
    Py_ssize_t count;   /* connections given to it in this burst */
    Py_ssize_t size;    /* their frame payload bytes, count field included */
} worker_t;

typedef struct {
    int fd;
    int worker;         /* its worker's index; -1: left to Python (see dispatch_sniffed) */
    unsigned long long hid;
    PyObject *meta;     /* bytes, owned */
    PyObject *data;     /* bytes read from it (the HTTP head), owned; NULL: none */
    PyObject *addr;     /* a connection left to Python: its address, owned */
    int err;            /* ... and the errno that failed reading its head (0: not read) */
} conn_t;

/* LeastConnections of sockshare.server._policy, the same choice: the least loaded; among
 * equals the first (in list order) whose id is after the last pick, else the first */
static int
least_conn(worker_t *w, int n, long *last)
{
    int best = -1, after = -1;
    for (int i = 0; i < n; i++) {
        if (w[i].room <= 0)
            continue;
        if (best < 0 || w[i].load < w[best].load) {
            best = i;
            after = w[i].id > *last ? i : -1;
        } else if (w[i].load == w[best].load && after < 0 && w[i].id > *last) {
            after = i;
        }
    }
    int pick = after >= 0 ? after : best;
    if (pick >= 0)
        *last = w[pick].id;
    return pick;
}

/* dispatch_burst, and with max_head > 0 dispatch_sniffed: each accepted connection's
 * HTTP head peeked, parsed (http_head), read and sent along as pre-read data, its
 * request in the metadata; the connections it cannot sniff at once are returned to the
 * caller with their addresses (left: [(fd, address, errno)]) */
static PyObject *
dispatch_core(PyObject *args, const char *fmt, int sniffing)
{
    int lfd, budget, fd_high, flags;
    unsigned long long seq, hid;
    long last;
    Py_buffer prefix, mid, end, kind;
    double now;
    PyObject *wlist;
    Py_ssize_t max_head = 0, max_meta = 0, max_payload = 0;
    PyObject *pending = NULL;
    Py_ssize_t npend = 0, ip = 0;   /* the pending connections, and how many are taken */
    if (sniffing) {
        if (!PyArg_ParseTuple(args, fmt, &lfd, &budget, &fd_high, &seq, &hid, &last, &prefix,
                              &mid, &end, &kind, &flags, &now, &PyList_Type, &wlist,
                              &max_head, &max_meta, &max_payload, &PyList_Type, &pending))
            return NULL;
        npend = PyList_GET_SIZE(pending);
    } else if (!PyArg_ParseTuple(args, fmt, &lfd, &budget, &fd_high, &seq, &hid, &last, &prefix,
                                 &mid, &end, &kind, &flags, &now, &PyList_Type, &wlist)) {
        return NULL;
    }
    unsigned char *peek = NULL;
    PyObject *result = NULL;
    conn_t *conns = NULL;
    worker_t *w = NULL;
    Py_ssize_t nconn = 0, nw = PyList_GET_SIZE(wlist);
    int status = 0, registered = 0;
    long last_fd = -1;
    if (kind.len != 4 || budget < 0 || budget > MAX_FDS || nw < 1 || nw > 1024
        || (sniffing && (max_head < 16 || max_head > (1 << 20) || max_meta < 64
                         || max_payload < 64))) {
        PyErr_SetString(PyExc_ValueError, "dispatch_burst: bad arguments");
        goto out;
    }
    if (sniffing && (peek = PyMem_Malloc((size_t)max_head)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    w = PyMem_Calloc((size_t)nw, sizeof *w);
    conns = PyMem_Calloc((size_t)(budget + npend > 0 ? budget + npend : 1), sizeof *conns);
    if (w == NULL || conns == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nw; i++) {
        PyObject *it = PyList_GET_ITEM(wlist, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 4 || !PyDict_Check(PyTuple_GET_ITEM(it, 3))) {
            PyErr_SetString(PyExc_TypeError, "workers are (id, load, room, raw dict)");
            goto out;
        }
        w[i].id = PyLong_AsLong(PyTuple_GET_ITEM(it, 0));
        w[i].load = PyLong_AsLong(PyTuple_GET_ITEM(it, 1));
        w[i].room = PyLong_AsLong(PyTuple_GET_ITEM(it, 2));
        w[i].raw = PyTuple_GET_ITEM(it, 3);
        w[i].size = 2;
        if (PyErr_Occurred())
            goto out;
    }
    /* accept and place (first the pending connections of earlier bursts, if any) */
    while (nconn < budget) {
        struct sockaddr_storage ss;
        socklen_t len = 0;
        PyObject *paddr = NULL;   /* a pending connection's address (borrowed) */
        int fd;
        if (ip < npend) {
            PyObject *it = PyList_GET_ITEM(pending, ip);
            if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 2
                || !PyTuple_Check(PyTuple_GET_ITEM(it, 1))
                || PyTuple_GET_SIZE(PyTuple_GET_ITEM(it, 1)) < 2
                || !PyUnicode_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(it, 1), 0))) {
                PyErr_SetString(PyExc_TypeError, "pending are (fd, (host, port, ...))");
                goto out;
            }
            long pfd = PyLong_AsLong(PyTuple_GET_ITEM(it, 0));
            if (pfd < 0 || pfd > 0x7fffffffL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a pending descriptor out of range");
                goto out;
            }
            ip++;
            fd = (int)pfd;
            paddr = PyTuple_GET_ITEM(it, 1);
        } else {
            fd = accept_next(lfd, &ss, &len, &status);
            if (fd == -2)
                goto out;
            if (fd < 0)
                break;
        }
        conn_t *c = &conns[nconn++];
        c->fd = fd;
        http_head_t head = {0};
        Py_ssize_t got = 0;
        if (sniffing) {
            /* the head is usually queued already: one peek, then exactly its bytes */
            int e = 0;
            do {
                Py_BEGIN_ALLOW_THREADS
                got = recv(fd, peek, (size_t)max_head, MSG_PEEK | MSG_DONTWAIT);
                Py_END_ALLOW_THREADS
                e = got < 0 ? errno : 0;
            } while (got < 0 && e == EINTR);
            if (got <= 0 || !http_head(peek, got, &head)
                || sniff_meta_len(peek, &head) > max_meta) {
                c->worker = -1;   /* for the Python sniffer (which says what is wrong) */
                /* -1: nothing queued yet (the caller may try it again in a later burst) */
                c->err = got < 0 && (e == EAGAIN || e == EWOULDBLOCK) ? -1 : 0;
                c->addr = paddr != NULL ? Py_NewRef(paddr) : make_address(&ss, len);
                if (c->addr == NULL)
                    goto out;
                if (paddr == NULL && fd >= fd_high) {
                    status = -1;
                    last_fd = fd;
                    break;
                }
                continue;
            }
        }
        char host[INET6_ADDRSTRLEN + 64];
        int port;
        if (paddr != NULL) {   /* (a pending one: its address as accept_many gave it) */
            Py_ssize_t hl;
            const char *h = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(paddr, 0), &hl);
            long pl = PyLong_AsLong(PyTuple_GET_ITEM(paddr, 1));
            if (h == NULL || (pl == -1 && PyErr_Occurred()))
                goto out;
            if (hl >= (Py_ssize_t)sizeof host || memchr(h, '"', (size_t)hl) != NULL
                || memchr(h, '\\', (size_t)hl) != NULL || pl < 0 || pl > 65535) {
                PyErr_SetString(PyExc_ValueError, "a pending address that is not an IP address");
                goto out;
            }
            memcpy(host, h, (size_t)hl);
            host[hl] = 0;
            port = (int)pl;
        } else if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            port = ntohs(a->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            if (getnameinfo((struct sockaddr *)&ss, len, host, sizeof host, NULL, 0, NI_NUMERICHOST) != 0)
                inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
            port = ntohs(a->sin6_port);
        } else {
            PyErr_SetString(PyExc_ValueError, "dispatch_burst takes TCP listeners only");
            goto out;
        }
        char num[32];
        int numlen = snprintf(num, sizeof num, "%llu", seq);
        char portbuf[16];
        int portlen = snprintf(portbuf, sizeof portbuf, "%d", port);
        size_t hostlen = strlen(host);
        Py_ssize_t mlen = prefix.len + numlen + mid.len + (Py_ssize_t)hostlen + 2 + portlen + end.len;
        if (sniffing)   /* ],"protocol":...,"host":... (sniff_meta_len less its braces) */
            mlen += sniff_meta_len(peek, &head) - 2 + 2;
        c->meta = PyBytes_FromStringAndSize(NULL, mlen);
        if (c->meta == NULL)
            goto out;
        char *m = PyBytes_AS_STRING(c->meta);
        memcpy(m, prefix.buf, prefix.len); m += prefix.len;
        memcpy(m, num, numlen); m += numlen;
        memcpy(m, mid.buf, mid.len); m += mid.len;
        memcpy(m, host, hostlen); m += hostlen;
        *m++ = '"'; *m++ = ',';
        memcpy(m, portbuf, portlen); m += portlen;
        if (sniffing) {
            memcpy(m, SNIFF_A, sizeof SNIFF_A - 1); m += sizeof SNIFF_A - 1;
            memcpy(m, peek, head.method_len); m += head.method_len;
            memcpy(m, SNIFF_B, sizeof SNIFF_B - 1); m += sizeof SNIFF_B - 1;
            m = put_json_target(m, peek + head.target_off, head.target_len);
            memcpy(m, SNIFF_C, sizeof SNIFF_C - 1); m += sizeof SNIFF_C - 1;
            *m++ = (char)('0' + head.minor);
            memcpy(m, SNIFF_D, sizeof SNIFF_D - 1); m += sizeof SNIFF_D - 1;
            if (head.host_len < 0) {
                memcpy(m, "null", 4); m += 4;
            } else {
                *m++ = '"';
                for (Py_ssize_t i = 0; i < head.host_len; i++) {
                    unsigned char ch = peek[head.host_off + i];
                    *m++ = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
                }
                *m++ = '"';
            }
            /* end is the rest after the client address: ,"route":...} */
            memcpy(m, end.buf, end.len);
            /* the head: read exactly what was peeked (queued, so one recv takes it) */
            c->data = PyBytes_FromStringAndSize(NULL, head.length);
            if (c->data == NULL)
                goto out;
            char *d = PyBytes_AS_STRING(c->data);
            Py_ssize_t have = 0;
            while (have < head.length) {
                Py_ssize_t r;
                Py_BEGIN_ALLOW_THREADS
                r = recv(fd, d + have, (size_t)(head.length - have), MSG_DONTWAIT);
                Py_END_ALLOW_THREADS
                if (r > 0) {
                    have += r;
                } else if (r < 0 && errno == EINTR) {
                    continue;
                } else {
                    c->err = r == 0 ? ECONNRESET : errno;
                    break;
                }
            }
            if (c->err != 0) {   /* it failed mid-way: the Python path refuses it */
                Py_CLEAR(c->meta);
                Py_CLEAR(c->data);
                c->worker = -1;
                c->addr = paddr != NULL ? Py_NewRef(paddr) : make_address(&ss, len);
                if (c->addr == NULL)
                    goto out;
                if (paddr == NULL && fd >= fd_high) {
                    status = -1;
                    last_fd = fd;
                    break;
                }
                continue;
            }
            mlen += head.length;   /* (the frame's size below counts the data too) */
        } else {
            memcpy(m, end.buf, end.len);
        }
        c->hid = hid++;
        seq++;
        int pick = least_conn(w, (int)nw, &last);
        if (pick < 0) {   /* (the caller keeps budget <= the room of all workers) */
            PyErr_SetString(PyExc_RuntimeError, "dispatch_burst: no worker has room");
            goto out;
        }
        if (sniffing && w[pick].size + 20 + mlen > max_payload) {
            /* (the caller keeps budget x the largest entry within the frame limit) */
            PyErr_SetString(PyExc_RuntimeError, "dispatch_sniffed: a frame over max_payload");
            goto out;
        }
        c->worker = pick;
        w[pick].load++;
        w[pick].room--;
        w[pick].count++;
        w[pick].size += 20 + mlen;
        if (paddr == NULL && fd >= fd_high) {
            status = -1;
            last_fd = fd;
            break;
        }
        int anyroom = 0;
        for (Py_ssize_t i = 0; i < nw; i++)
            anyroom |= w[i].room > 0;
        if (!anyroom)
            break;
    }
    /* the pending connections not taken (no room, or over the budget): back as they came */
    for (; ip < npend; ip++) {
        PyObject *it = PyList_GET_ITEM(pending, ip);
        conn_t *c = &conns[nconn];
        long pfd = PyTuple_Check(it) && PyTuple_GET_SIZE(it) == 2
                   ? PyLong_AsLong(PyTuple_GET_ITEM(it, 0)) : -1;
        if (pfd < 0 || pfd > 0x7fffffffL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "pending are (fd, (host, port, ...))");
            goto out;
        }
        c->fd = (int)pfd;
        c->worker = -1;
        c->err = -1;
        c->addr = Py_NewRef(PyTuple_GET_ITEM(it, 1));
        nconn++;
    }
    /* register each connection in its worker's channel (hid -> (fd, meta, sent, data)),
     * then one frame per worker */
    PyObject *when = PyFloat_FromDouble(now);
    if (when == NULL)
        goto out;
    Py_ssize_t placed = 0;
    for (Py_ssize_t i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        registered = (int)i;
        if (c->worker < 0)
            continue;
        placed++;
        PyObject *key = PyLong_FromUnsignedLongLong(c->hid);
        PyObject *val = key == NULL ? NULL : Py_BuildValue(
            "(iOOO)", c->fd, c->meta, when, c->data != NULL ? c->data : empty_bytes);
        if (val == NULL || PyDict_SetItem(w[c->worker].raw, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(when);
            goto out;
        }
        Py_DECREF(key);
        Py_DECREF(val);
    }
    registered = (int)nconn;
    Py_DECREF(when);
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        goto out;
    for (Py_ssize_t k = 0; k < nw; k++) {
        if (w[k].count == 0)
            continue;
        PyObject *frame = PyBytes_FromStringAndSize(NULL, 12 + w[k].size);
        PyObject *fds = PyList_New(w[k].count);
        if (frame == NULL || fds == NULL) {
            Py_XDECREF(frame);
            Py_XDECREF(fds);
            Py_DECREF(frames);
            goto out;
        }
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(frame);
        p[0] = 'S'; p[1] = 'S'; p[2] = 1; p[3] = 0x20; p[4] = (unsigned char)flags;
        p[5] = (unsigned char)w[k].count; p[6] = 0; p[7] = 0;
        put32(p + 8, (unsigned long)w[k].size);
        put16(p + 12, (unsigned int)w[k].count);
        p += 14;
        Py_ssize_t j = 0;
        for (Py_ssize_t i = 0; i < nconn; i++) {
            conn_t *c = &conns[i];
            if (c->worker != k)
                continue;
            Py_ssize_t lm = PyBytes_GET_SIZE(c->meta);
            put64(p, c->hid);
            memcpy(p + 8, kind.buf, 4);
            Py_ssize_t ld = c->data != NULL ? PyBytes_GET_SIZE(c->data) : 0;
            put32(p + 12, (unsigned long)lm);
            put32(p + 16, (unsigned long)ld);
            memcpy(p + 20, PyBytes_AS_STRING(c->meta), lm);
            if (ld)
                memcpy(p + 20 + lm, PyBytes_AS_STRING(c->data), ld);
            p += 20 + lm + ld;
            PyList_SET_ITEM(fds, j++, PyLong_FromLong(c->fd));
        }
        PyObject *item = Py_BuildValue("(nNNn)", k, frame, fds, w[k].count);
        if (item == NULL || PyList_Append(frames, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(frames);
            goto out;
        }
        Py_DECREF(item);
    }
    if (!sniffing) {
        result = Py_BuildValue("(NniliKK)", frames, placed, status, last_fd, last, seq, hid);
    } else {
        PyObject *left = PyList_New(0);
        for (Py_ssize_t i = 0; left != NULL && i < nconn; i++) {
            conn_t *c = &conns[i];
            if (c->worker >= 0)
                continue;
            PyObject *item = Py_BuildValue("(iOi)", c->fd, c->addr, c->err);
            if (item == NULL || PyList_Append(left, item) < 0)
                Py_CLEAR(left);
            Py_XDECREF(item);
        }
        if (left == NULL) {
            Py_DECREF(frames);
            goto out;
        }
        result = Py_BuildValue("(NniliKKN)", frames, placed, status, last_fd, last, seq, hid,
                               left);
    }
out:
    if (result == NULL) {
        /* never leave a descriptor behind nor a registration: undo this burst */
        for (Py_ssize_t i = 0; i < nconn; i++) {
            if (i < registered && conns[i].worker >= 0) {
                PyObject *key = PyLong_FromUnsignedLongLong(conns[i].hid);
                if (key != NULL) {
                    PyObject *et, *ev, *tb;
                    PyErr_Fetch(&et, &ev, &tb);
                    if (PyDict_DelItem(w[conns[i].worker].raw, key) < 0)
                        PyErr_Clear();
                    PyErr_Restore(et, ev, tb);
                    Py_DECREF(key);
                }
            }
            close(conns[i].fd);
        }
        /* and the pending ones not reached: they were this call's to hand back */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        for (; ip < npend; ip++) {
            PyObject *it = PyList_GET_ITEM(pending, ip);
            long pfd = PyTuple_Check(it) && PyTuple_GET_SIZE(it) >= 1
                       && PyLong_Check(PyTuple_GET_ITEM(it, 0))
                       ? PyLong_AsLong(PyTuple_GET_ITEM(it, 0)) : -1;
            PyErr_Clear();
            if (pfd >= 0 && pfd <= 0x7fffffffL)
                close((int)pfd);
        }
        PyErr_Restore(et, ev, tb);
    }
    if (conns != NULL)
        for (Py_ssize_t i = 0; i < nconn; i++) {
            Py_XDECREF(conns[i].meta);
            Py_XDECREF(conns[i].data);
            Py_XDECREF(conns[i].addr);
        }
    PyMem_Free(peek);
    PyMem_Free(conns);
    PyMem_Free(w);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&mid);
    PyBuffer_Release(&end);
    PyBuffer_Release(&kind);
    return result;
}

static PyObject *
dispatch_burst(PyObject *self, PyObject *args)
{
    return dispatch_core(args, "iiiKKly*y*y*y*idO!:dispatch_burst", 0);
}

static PyObject *
dispatch_sniffed(PyObject *self, PyObject *args)
{
    return dispatch_core(args, "iiiKKly*y*y*y*idO!nnnO!:dispatch_sniffed", 1);
}

/* ACCEPT of compiled handoffs: pop each id from `raw` (hid -> (fd, meta, sent)), close
 * its descriptor; returns (how many, the ids that were not there: ordinary tickets) */
static PyObject *
settle_accepts(PyObject *self, PyObject *args)
{
    Py_buffer b;
    PyObject *raw;
    if (!PyArg_ParseTuple(args, "y*O!:settle_accepts", &b, &PyDict_Type, &raw))
        return NULL;
    Py_ssize_t count = accept_count(&b);
    if (count < 0)
        return NULL;
    PyObject *rest = PyList_New(0);
    if (rest == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t closed = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long v = accept_id(&b, i);
        PyObject *key = PyLong_FromUnsignedLongLong(v);
        if (key == NULL)
            goto fail;
        PyObject *val = PyDict_GetItemWithError(raw, key);   /* borrowed */
        if (val == NULL) {
            if (PyErr_Occurred() || PyList_Append(rest, key) < 0) {
                Py_DECREF(key);
                goto fail;
            }
            Py_DECREF(key);
            continue;
        }
        long fd = PyTuple_Check(val) && PyTuple_GET_SIZE(val) >= 1
                  ? PyLong_AsLong(PyTuple_GET_ITEM(val, 0)) : -1;
        if (PyDict_DelItem(raw, key) < 0) {
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(key);
        if (fd >= 0)
            close((int)fd);
        PyErr_Clear();
        closed++;
    }
    PyBuffer_Release(&b);
    return Py_BuildValue("(nN)", closed, rest);
fail:
    PyBuffer_Release(&b);
    Py_DECREF(rest);
    return NULL;
}

/* one ACCEPT payload of compiled handoffs only: every id in `raw` (hid -> (fd, meta,
 * sent)), none twice; then each is removed and its descriptor closed. 1 settled (*n
 * their number), 0 not such a payload (nothing changed: the Python path decides), -1 an
 * error raised. */
static int
settle_if_all_raw(const unsigned char *p, Py_ssize_t len, PyObject *raw, Py_ssize_t *n)
{
    if (len < 2)
        return 0;
    Py_ssize_t count = ((Py_ssize_t)p[0] << 8) | p[1];
    if (len != 2 + 8 * count || count > 256)
        return 0;
    unsigned long long ids[256];
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *q = p + 2 + 8 * i;
        ids[i] = ((unsigned long long)get32(q) << 32) | get32(q + 4);
        for (Py_ssize_t j = 0; j < i; j++)
            if (ids[j] == ids[i])
                return 0;
        PyObject *key = PyLong_FromUnsignedLongLong(ids[i]);
        if (key == NULL)
            return -1;
        int has = PyDict_Contains(raw, key);
        Py_DECREF(key);
        if (has <= 0)
            return has;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyLong_FromUnsignedLongLong(ids[i]);
        if (key == NULL)
            return -1;
        PyObject *val = PyDict_GetItemWithError(raw, key);   /* borrowed */
        long fd = val != NULL && PyTuple_Check(val) && PyTuple_GET_SIZE(val) >= 1
                  ? PyLong_AsLong(PyTuple_GET_ITEM(val, 0)) : -1;
        if (fd == -1)
            PyErr_Clear();
        Py_XINCREF(val);   /* (alive until its descriptor is closed) */
        int rc = val != NULL ? PyDict_DelItem(raw, key) : 0;
        Py_DECREF(key);
        Py_XDECREF(val);
        if (rc < 0)
            return -1;
        if (fd >= 0)
            close((int)fd);
        (*n)++;
    }
    return 1;
}

/* a JSON integer as the workers' encoder writes it (no sign, no leading zero, at most
 * 15 digits) at p[*i..len): its value, *i past it; -1 if there is none */
static long long
json_count(const unsigned char *p, Py_ssize_t len, Py_ssize_t *i)
{
    Py_ssize_t j = *i;
    long long v = 0;
    while (j < len && p[j] >= '0' && p[j] <= '9' && j - *i < 15)
        v = v * 10 + (p[j++] - '0');
    if (j == *i || (p[*i] == '0' && j - *i > 1) || (j < len && p[j] >= '0' && p[j] <= '9'))
        return -1;
    *i = j;
    return v;
}

/* the workers' report of closed connections, in the exact form their encoder writes:
 * {"ev":"closed","n":N} or {"ev":"closed","n":N,"active":A}: the dict json.loads would
 * make of it; NULL without an error for any other payload (json.loads reads it) */
static PyObject *
closed_report(const unsigned char *p, Py_ssize_t len)
{
    static const char head[] = "{\"ev\":\"closed\",\"n\":";
    static const char mid[] = ",\"active\":";
    const Py_ssize_t hl = sizeof head - 1, ml = sizeof mid - 1;
    if (len < hl + 2 || memcmp(p, head, hl) != 0 || p[len - 1] != '}')
        return NULL;
    Py_ssize_t i = hl;
    long long n = json_count(p, len - 1, &i), a = -1;
    if (n < 0)
        return NULL;
    if (i != len - 1) {
        if (len - 1 - i < ml + 1 || memcmp(p + i, mid, ml) != 0)
            return NULL;
        i += ml;
        a = json_count(p, len - 1, &i);
        if (a < 0 || i != len - 1)
            return NULL;
    }
    if (a < 0)
        return Py_BuildValue("{s:s,s:L}", "ev", "closed", "n", n);
    return Py_BuildValue("{s:s,s:L,s:L}", "ev", "closed", "n", n, "active", a);
}

/* the channel's read of the dispatcher's compiled path: one recvmsg; the leading
 * ACCEPT frames of compiled handoffs settled in C, the CONTROL frames after them cut
 * out, the rest given back (see the module's docstring, recv_answers) */
static PyObject *
recv_answers(PyObject *self, PyObject *args)
{
    int sfd;
    Py_ssize_t bufsize, max_payload;
    PyObject *raw;
    if (!PyArg_ParseTuple(args, "inO!n:recv_answers", &sfd, &bufsize, &PyDict_Type, &raw,
                          &max_payload))
        return NULL;
    PyObject *rargs = Py_BuildValue("(ini)", sfd, bufsize, (int)MSG_DONTWAIT);
    if (rargs == NULL)
        return NULL;
    PyObject *got = recv_fds(self, rargs);
    Py_DECREF(rargs);
    if (got == NULL)
        return NULL;
    PyObject *data = PyTuple_GET_ITEM(got, 0), *fds = PyTuple_GET_ITEM(got, 1);
    int mflags = (int)PyLong_AsLong(PyTuple_GET_ITEM(got, 2));
    Py_ssize_t size = PyBytes_GET_SIZE(data), pos = 0, settled = 0;
    PyObject *controls = PyList_New(0), *result = NULL;
    if (controls == NULL)
        goto done;
    if (PyList_GET_SIZE(fds) > 0 || (mflags & (MSG_CTRUNC | MSG_TRUNC)) || size == 0)
        goto rest;   /* descriptors, a cut, the end: all of it to the Python path */
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    /* a whole frame at `at` with a plain header (no descriptors) of type `type`: its
     * payload length, else -1 */
#define PLAIN(at, type) \
    (size - (at) >= 12 && d[(at)] == 'S' && d[(at) + 1] == 'S' && d[(at) + 2] == 1 \
     && d[(at) + 3] == (type) && d[(at) + 5] == 0 && d[(at) + 6] == 0 && d[(at) + 7] == 0 \
     && (Py_ssize_t)get32(d + (at) + 8) <= max_payload \
     && (Py_ssize_t)get32(d + (at) + 8) <= size - (at) - 12 \
     ? (Py_ssize_t)get32(d + (at) + 8) : (Py_ssize_t)-1)
    for (;;) {   /* the ACCEPTs first, as the workers write them */
        Py_ssize_t len = PLAIN(pos, 0x21);
        if (len < 0)
            break;
        int rc = settle_if_all_raw(d + pos + 12, len, raw, &settled);
        if (rc < 0)
            goto done;
        if (rc == 0)
            break;
        pos += 12 + len;
    }
    Py_ssize_t controls_at = pos;
    long long closed = 0;   /* the sum of the reports of closed connections, -1: others */
    for (;;) {   /* then the reports: taken out only if nothing else follows them */
        Py_ssize_t len = PLAIN(pos, 0x30);
        if (len < 0)
            break;
        PyObject *payload = closed_report(d + pos + 12, len);
        if (payload != NULL && closed >= 0)
            closed += PyLong_AsLongLong(PyDict_GetItemString(payload, "n"));
        if (payload == NULL && !PyErr_Occurred()) {
            closed = -1;
            payload = PyBytes_FromStringAndSize((const char *)d + pos + 12, len);
        }
        if (payload == NULL || PyList_Append(controls, payload) < 0) {
            Py_XDECREF(payload);
            goto done;
        }
        Py_DECREF(payload);
        pos += 12 + len;
    }
    if (pos == size) {
        result = Py_BuildValue("(nLOy#Oi)", settled, closed, controls, "", (Py_ssize_t)0, fds,
                               mflags);
        goto done;
    }
    if (PyList_SetSlice(controls, 0, PyList_GET_SIZE(controls), NULL) < 0)
        goto done;
    if (controls_at > 0) {
        PyObject *tail = PyBytes_FromStringAndSize((const char *)d + controls_at,
                                                   size - controls_at);
        if (tail == NULL)
            goto done;
        result = Py_BuildValue("(nLONOi)", settled, (long long)-1, controls, tail, fds, mflags);
        goto done;
    }
#undef PLAIN
rest:
    result = Py_BuildValue("(nLOOOi)", settled, (long long)-1, controls, data, fds, mflags);
done:
    if (result == NULL && PyList_GET_SIZE(fds) > 0) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        close_fd_list(fds);
        PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(controls);
    Py_DECREF(got);
    return result;
}

static PyMethodDef methods[] = {
    {"dispatch_sniffed", dispatch_sniffed, METH_VARARGS,
     "dispatch_sniffed(lfd, budget, fd_high, seq, hid, last, prefix, mid, end, kind, flags, now, "
     "workers, max_head, max_meta, max_payload, pending) -> (frames, placed, status, last_fd, "
     "last, seq, hid, left)"},
    {"http_head", http_head_py, METH_VARARGS,
     "http_head(buf, max_size) -> (method, target, version, host, length) or None"},
    {"dispatch_burst", dispatch_burst, METH_VARARGS,
     "dispatch_burst(lfd, budget, fd_high, seq, hid, last, prefix, mid, end, kind, flags, now, "
     "workers) -> (frames, accepted, status, last_fd, last, seq, hid)"},
    {"recv_answers", recv_answers, METH_VARARGS,
     "recv_answers(fd, bufsize, raw, max_payload) -> (settled, closed, controls, rest, fds, flags)"},
    {"settle_accepts", settle_accepts, METH_VARARGS,
     "settle_accepts(payload, raw) -> (closed, other ids)"},
    {"accept_many", accept_many, METH_VARARGS,
     "accept_many(lfd, budget, fd_high) -> (list of (fd, address), status)"},
    {"handoff_frame", handoff_frame, METH_VARARGS,
     "handoff_frame(flags, items) -> bytes: one HANDOFF frame"},
    {"send_fds", send_fds, METH_VARARGS,
     "send_fds(fd, data, fds) -> int: one non-blocking sendmsg with SCM_RIGHTS"},
    {"recv_fds", recv_fds, METH_VARARGS,
     "recv_fds(fd, bufsize, flags) -> (data, fds, msg_flags): one close-on-exec recvmsg"},
    {"recv_batch", recv_batch, METH_VARARGS,
     "recv_batch(fd, bufsize, flags, max_msgs, single, sockcls, blocking, max_payload, handoff_cls, "
     "answer) -> (handoffs, acked, [(data, fds, msg_flags)]): one recvmmsg"},
    {"send_single", (PyCFunction)(void (*)(void))send_single, METH_FASTCALL,
     "send_single(fd, sock, flags, hid, meta, data, max_payload, close) -> 1, 0, -1 or bytes: one "
     "one-socket HANDOFF frame"},
    {"new_slots", (PyCFunction)(void (*)(void))new_slots, METH_FASTCALL,
     "new_slots(cls, *values) -> an object of the slots class cls, its slots set in order"},
    {"accept_ids", accept_ids, METH_O, "accept_ids(payload) -> list[int]"},
    {"close_fds", close_fds, METH_O, "close_fds(fds) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sockshare._speedups",
    "Optional compiled hot paths of sockshare (see sockshare._fast).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_FDS", MAX_FDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
