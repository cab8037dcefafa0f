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
 *       it in that worker's dict (hid -> (fd, meta, now)) and pack one HANDOFF frame per
 *       worker: frames are [(worker index, frame, fds, count)].
 *   settle_accepts(payload, raw) -> (closed, other ids)
 *       an ACCEPT payload: the ids found in `raw` are removed and their descriptors
 *       closed; the others come back for the ordinary tickets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#define MAX_FDS 253

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
        socklen_t len = sizeof ss;
        int fd;
        Py_BEGIN_ALLOW_THREADS
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (fd < 0) {
            int e = errno;
            if (e == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto fail;
                continue;
            }
            if (e == ECONNABORTED)
                continue;
            if (e != EAGAIN && e != EWOULDBLOCK)
                status = e;
            break;
        }
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

static PyObject *
send_fds(PyObject *self, PyObject *args)
{
    int sfd;
    Py_buffer buf;
    PyObject *fdlist;
    if (!PyArg_ParseTuple(args, "iy*O:send_fds", &sfd, &buf, &fdlist))
        return NULL;
    int fds[MAX_FDS];
    Py_ssize_t nfds = 0;
    PyObject *seq = PySequence_Fast(fdlist, "fds must be a sequence of ints");
    if (seq == NULL || fds_from_list(seq, fds, &nfds) < 0) {
        Py_XDECREF(seq);
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_DECREF(seq);
    if (nfds > 0 && buf.len == 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "descriptors must travel with at least one data byte");
        return NULL;
    }
    union {
        char space[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {buf.buf, (size_t)buf.len};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        memset(&ctl, 0, sizeof ctl);
        msg.msg_control = ctl.space;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t sent;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        sent = sendmsg(sfd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        Py_END_ALLOW_THREADS
        if (sent >= 0 || errno != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buf);
            return NULL;
        }
    }
    PyBuffer_Release(&buf);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromSsize_t(sent);
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
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        goto fail_close;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *p = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, p + i, sizeof fd);
            PyObject *o = PyLong_FromLong(fd);
            if (o == NULL || PyList_Append(fds, o) < 0) {
                Py_XDECREF(o);
                /* close this one and the rest of the message's; the list's below */
                for (size_t j = i; j < n; j++) {
                    memcpy(&fd, p + j, sizeof fd);
                    close(fd);
                }
                goto fail_close;
            }
            Py_DECREF(o);
        }
    }
    if (got != bufsize && _PyBytes_Resize(&data, got) < 0) {
        data = NULL;
        goto fail_close;
    }
    return Py_BuildValue("(NNi)", data, fds, msg.msg_flags);
fail_close:
    if (fds != NULL) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++)
            close((int)PyLong_AsLong(PyList_GET_ITEM(fds, i)));
        Py_DECREF(fds);
    }
    Py_XDECREF(data);
    return NULL;
}

static PyObject *
accept_ids(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)b.buf;
    if (b.len < 2) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected 2", b.len);
    }
    Py_ssize_t count = ((Py_ssize_t)p[0] << 8) | p[1];
    if (b.len != 2 + 8 * count) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected %zd",
                            b.len, 2 + 8 * count);
    }
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *q = p + 2 + 8 * i;
        unsigned long long v = 0;
        for (int k = 0; k < 8; k++)
            v = (v << 8) | q[k];
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
    int worker;
    unsigned long long hid;
    PyObject *meta;     /* bytes, owned */
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

static PyObject *
dispatch_burst(PyObject *self, PyObject *args)
{
    int lfd, budget, fd_high, flags;
    unsigned long long seq, hid;
    long last;
    Py_buffer prefix, mid, end, kind;
    double now;
    PyObject *wlist;
    if (!PyArg_ParseTuple(args, "iiiKKly*y*y*y*idO!:dispatch_burst", &lfd, &budget, &fd_high,
                          &seq, &hid, &last, &prefix, &mid, &end, &kind, &flags, &now,
                          &PyList_Type, &wlist))
        return NULL;
    PyObject *result = NULL;
    conn_t *conns = NULL;
    worker_t *w = NULL;
    Py_ssize_t nconn = 0, nw = PyList_GET_SIZE(wlist);
    int status = 0, registered = 0;
    long last_fd = -1;
    if (kind.len != 4 || budget < 0 || budget > MAX_FDS || nw < 1 || nw > 1024) {
        PyErr_SetString(PyExc_ValueError, "dispatch_burst: bad arguments");
        goto out;
    }
    w = PyMem_Calloc((size_t)nw, sizeof *w);
    conns = PyMem_Calloc((size_t)(budget > 0 ? budget : 1), sizeof *conns);
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
    /* accept and place */
    while (nconn < budget) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd;
        Py_BEGIN_ALLOW_THREADS
        fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
        Py_END_ALLOW_THREADS
        if (fd < 0) {
            int e = errno;
            if (e == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    goto out;
                continue;
            }
            if (e == ECONNABORTED)
                continue;
            if (e != EAGAIN && e != EWOULDBLOCK)
                status = e;
            break;
        }
        conn_t *c = &conns[nconn++];
        c->fd = fd;
        char host[INET6_ADDRSTRLEN + 64];
        int port;
        if (ss.ss_family == AF_INET) {
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
        memcpy(m, end.buf, end.len);
        c->hid = hid++;
        seq++;
        int pick = least_conn(w, (int)nw, &last);
        if (pick < 0) {   /* (the caller keeps budget <= the room of all workers) */
            PyErr_SetString(PyExc_RuntimeError, "dispatch_burst: no worker has room");
            goto out;
        }
        c->worker = pick;
        w[pick].load++;
        w[pick].room--;
        w[pick].count++;
        w[pick].size += 20 + mlen;
        if (fd >= fd_high) {
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
    /* register each connection in its worker's channel (hid -> (fd, meta, sent)), then
     * one frame per worker */
    PyObject *when = PyFloat_FromDouble(now);
    if (when == NULL)
        goto out;
    for (Py_ssize_t i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        PyObject *key = PyLong_FromUnsignedLongLong(c->hid);
        PyObject *val = key == NULL ? NULL : Py_BuildValue("(iOO)", c->fd, c->meta, when);
        if (val == NULL || PyDict_SetItem(w[c->worker].raw, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(when);
            goto out;
        }
        Py_DECREF(key);
        Py_DECREF(val);
        registered = (int)i + 1;
    }
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
            put32(p + 12, (unsigned long)lm);
            put32(p + 16, 0);
            memcpy(p + 20, PyBytes_AS_STRING(c->meta), lm);
            p += 20 + lm;
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
    result = Py_BuildValue("(NniliKK)", frames, nconn, status, last_fd, last, seq, hid);
out:
    if (result == NULL) {
        /* never leave a descriptor behind nor a registration: undo this burst */
        for (Py_ssize_t i = 0; i < nconn; i++) {
            if (i < registered) {
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
    }
    if (conns != NULL)
        for (Py_ssize_t i = 0; i < nconn; i++)
            Py_XDECREF(conns[i].meta);
    PyMem_Free(conns);
    PyMem_Free(w);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&mid);
    PyBuffer_Release(&end);
    PyBuffer_Release(&kind);
    return result;
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
    const unsigned char *p = (const unsigned char *)b.buf;
    if (b.len < 2) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected 2", b.len);
    }
    Py_ssize_t count = ((Py_ssize_t)p[0] << 8) | p[1];
    if (b.len != 2 + 8 * count) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "ACCEPT payload has %zd bytes, expected %zd",
                            b.len, 2 + 8 * count);
    }
    PyObject *rest = PyList_New(0);
    if (rest == NULL) {
        PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t closed = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *q = p + 2 + 8 * i;
        unsigned long long v = 0;
        for (int k = 0; k < 8; k++)
            v = (v << 8) | q[k];
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

static PyMethodDef methods[] = {
    {"dispatch_burst", dispatch_burst, METH_VARARGS,
     "dispatch_burst(lfd, budget, fd_high, seq, hid, last, prefix, mid, end, kind, flags, now, "
     "workers) -> (frames, accepted, status, last_fd, last, seq, hid)"},
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
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_FDS", MAX_FDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
