/* One spectator's share of a frame in one call: RTP headers, SRTP, one sendmmsg.
 *
 * rtp_fanout.py's pure-Python loop costs a Python round trip per packet per spectator (pack the
 * header, concatenate, pylibsrtp's protect wrapper, the transport's sendto) and a syscall per packet.
 * Here a frame's packets for one spectator are written into one buffer, protected in place by the
 * spectator's own libsrtp session (the very session aiortc negotiated, reached through pylibsrtp's
 * function pointer: nothing is linked against libsrtp here) and handed to the kernel in one
 * sendmmsg(2), without the GIL. Optional: without a C compiler the package installs without it and
 * rtp_fanout.py's Python loop is used (see FanoutSend in rtp_fanout.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <netinet/udp.h>
#include <sys/socket.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103  /* Linux >= 4.18; older headers lack the name */
#endif

#define MAX_PACKETS 64   /* a frame larger than this is sent in several batches */
#define SLOT 2048        /* header (<= 20) + payload (<= 1300) + SRTP trailer (<= 148) */
#define MAX_DATAGRAMS (MAX_PACKETS + 1)  /* a batch's packets and, now and then, a sender report */

typedef int (*protect_fn)(void *ctx, void *packet, int *length);

static protect_fn srtp_protect;
static __thread unsigned char slots[MAX_DATAGRAMS][SLOT];
/* UDP GSO: a run of equal-sized datagrams (the last may be shorter) goes down the stack as one buffer
 * and is cut into datagrams at the end (by the NIC, or late in software): the stack is walked once per
 * run instead of once per packet. The caller keeps the flag per spectator: a route that refuses it (an
 * old kernel, a path whose MTU is smaller than a segment) turns it off for that spectator only. */
typedef union {
    char buffer[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} control_t;

static int refuses_gso(int error) {
    return error == EIO || error == EINVAL || error == ENOPROTOOPT || error == EOPNOTSUPP || error == EMSGSIZE;
}

/* Send datagrams vectors[0..count) to one address in one sendmmsg; with *gso each run of equal-sized
 * datagrams among the first `runs` is one message (the rest, a sender report, go alone). Returns the
 * datagrams the kernel took; *error is the errno that stopped it (0 when all were taken). A message
 * refused for its GSO is sent again without, and *gso cleared. */
static Py_ssize_t send_datagrams(int fd, const Py_buffer *address, struct iovec *vectors, Py_ssize_t count,
                                 Py_ssize_t runs, int *gso, int *error) {
    struct mmsghdr messages[MAX_DATAGRAMS];
    control_t controls[MAX_DATAGRAMS];
    Py_ssize_t first[MAX_DATAGRAMS + 1];
    Py_ssize_t offset = 0;  /* datagrams already taken by the kernel */
    *error = 0;
    while (offset < count) {
        int n_messages = 0;
        for (Py_ssize_t i = offset; i < count;) {
            Py_ssize_t j = i + 1;
            size_t segment = vectors[i].iov_len, total = segment;
            while (*gso && j < runs && vectors[j].iov_len <= segment && total + vectors[j].iov_len <= 65000) {
                total += vectors[j].iov_len;
                if (vectors[j++].iov_len < segment)
                    break;  /* a shorter datagram ends a run */
            }
            struct msghdr *m = &messages[n_messages].msg_hdr;
            memset(&messages[n_messages], 0, sizeof messages[n_messages]);
            m->msg_name = address->buf;
            m->msg_namelen = (socklen_t)address->len;
            m->msg_iov = &vectors[i];
            m->msg_iovlen = (size_t)(j - i);
            if (j - i > 1) {
                m->msg_control = controls[n_messages].buffer;
                m->msg_controllen = sizeof controls[n_messages].buffer;
                struct cmsghdr *c = CMSG_FIRSTHDR(m);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t size = (uint16_t)segment;
                memcpy(CMSG_DATA(c), &size, sizeof size);
            }
            first[n_messages++] = i;
            i = j;
        }
        first[n_messages] = count;
        int done = 0;
        while (done < n_messages) {
            int n = sendmmsg(fd, messages + done, (unsigned int)(n_messages - done), 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                *error = errno;
                break;
            }
            done += n;
        }
        offset = first[done];
        if (!*error)
            break;
        if (messages[done].msg_hdr.msg_iovlen > 1 && refuses_gso(*error)) {
            *gso = 0;  /* this route takes no GSO: the rest again, one datagram per message */
            *error = 0;
            continue;
        }
        break;
    }
    return offset;
}

static PyObject *set_protect(PyObject *self, PyObject *arg) {
    void *address = PyLong_AsVoidPtr(arg);
    if (address == NULL && PyErr_Occurred())
        return NULL;
    srtp_protect = (protect_fn)address;
    Py_RETURN_NONE;
}

/* sockaddr(host, port) -> bytes: an IPv4 or IPv6 socket address, computed once per path. */
static PyObject *sockaddr(PyObject *self, PyObject *args) {
    const char *host;
    int port;
    if (!PyArg_ParseTuple(args, "si", &host, &port))
        return NULL;
    struct sockaddr_in v4 = {0};
    if (inet_pton(AF_INET, host, &v4.sin_addr) == 1) {
        v4.sin_family = AF_INET;
        v4.sin_port = htons((uint16_t)port);
        return PyBytes_FromStringAndSize((const char *)&v4, sizeof v4);
    }
    struct sockaddr_in6 v6 = {0};
    if (inet_pton(AF_INET6, host, &v6.sin6_addr) == 1) {
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons((uint16_t)port);
        return PyBytes_FromStringAndSize((const char *)&v6, sizeof v6);
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
    return NULL;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

/* send_frame(fd, sockaddr, srtp, payloads, payload_type, seq, timestamp, ssrc, ast, gso[, rtcp])
 *   -> (packets sent, payload bytes sent, errno, gso)
 * ast: the abs-send-time extension word (id, length and value), or -1 for a plain 12-byte header.
 * gso: whether to try UDP GSO for this spectator; the answer's gso is False once its route refused it.
 * rtcp: an already protected RTCP compound (the spectator's sender report, about once a second), sent
 * after the frame's packets in the same sendmmsg instead of a syscall of its own; not counted.
 * Fewer packets than given come with the errno that stopped them: EAGAIN/ENOBUFS when the socket's
 * buffer is full (the caller skips to a keyframe, as for a backed-up transport), anything else a
 * failing route (the rest of the frame is lost, as a network would lose it). Nothing raises for it. */
static PyObject *send_frame(PyObject *self, PyObject *args) {
    int fd, payload_type;
    Py_buffer address;
    unsigned long long srtp;
    PyObject *payloads;
    unsigned int seq;
    unsigned long timestamp, ssrc;
    long long ast;
    int gso;
    PyObject *rtcp = Py_None;
    if (!PyArg_ParseTuple(args, "iy*KO!iIkkLp|O", &fd, &address, &srtp, &PyList_Type, &payloads, &payload_type,
                          &seq, &timestamp, &ssrc, &ast, &gso, &rtcp))
        return NULL;
    if (rtcp != Py_None && (!PyBytes_Check(rtcp) || PyBytes_GET_SIZE(rtcp) > SLOT)) {
        PyBuffer_Release(&address);
        PyErr_SetString(PyExc_ValueError, "rtcp must be bytes of at most one MTU, or None");
        return NULL;
    }
    if (srtp_protect == NULL) {
        PyBuffer_Release(&address);
        PyErr_SetString(PyExc_RuntimeError, "set_protect() was not called");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    Py_ssize_t sent = 0, octets = 0;
    int error = 0;
    struct iovec vectors[MAX_DATAGRAMS];
    Py_ssize_t sizes[MAX_PACKETS];  /* payload bytes of each datagram of the batch */
    int header_size = ast >= 0 ? 20 : 12;
    for (Py_ssize_t base = 0; base < count && !error; base += MAX_PACKETS) {
        Py_ssize_t batch = count - base < MAX_PACKETS ? count - base : MAX_PACKETS;
        /* Copy under the GIL (the payloads are Python bytes); protect and send without it. */
        for (Py_ssize_t i = 0; i < batch; i++) {
            PyObject *payload = PyList_GET_ITEM(payloads, base + i);
            if (!PyBytes_Check(payload) || PyBytes_GET_SIZE(payload) > SLOT - header_size - 160) {
                PyBuffer_Release(&address);
                PyErr_SetString(PyExc_ValueError, "payloads must be bytes of at most one MTU");
                return NULL;
            }
            Py_ssize_t size = PyBytes_GET_SIZE(payload);
            unsigned char *p = slots[i];
            int marker = base + i == count - 1;
            p[0] = ast >= 0 ? 0x90 : 0x80;
            p[1] = (unsigned char)(payload_type | (marker ? 0x80 : 0));
            p[2] = (unsigned char)((seq + base + i) >> 8);
            p[3] = (unsigned char)(seq + base + i);
            put32(p + 4, (uint32_t)timestamp);
            put32(p + 8, (uint32_t)ssrc);
            if (ast >= 0) {
                p[12] = 0xBE; p[13] = 0xDE; p[14] = 0; p[15] = 1;  /* RFC 8285 one-byte, 1 word */
                put32(p + 16, (uint32_t)ast);
            }
            memcpy(p + header_size, PyBytes_AS_STRING(payload), size);
            vectors[i].iov_len = header_size + size;
            sizes[i] = size;
        }
        Py_ssize_t datagrams = batch;
        if (rtcp != Py_None && base + batch == count) {  /* the last batch carries the sender report */
            memcpy(slots[batch], PyBytes_AS_STRING(rtcp), PyBytes_GET_SIZE(rtcp));
            vectors[batch].iov_base = slots[batch];
            vectors[batch].iov_len = PyBytes_GET_SIZE(rtcp);
            datagrams++;
        }
        int protected_ok = 1;
        Py_ssize_t done = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < batch; i++) {
            int length = (int)vectors[i].iov_len;
            if (srtp_protect((void *)(uintptr_t)srtp, slots[i], &length) != 0) {
                protected_ok = 0;
                break;
            }
            vectors[i].iov_base = slots[i];
            vectors[i].iov_len = length;
        }
        if (protected_ok) {
            done = send_datagrams(fd, &address, vectors, datagrams, batch, &gso, &error);
            if (done > batch)
                done = batch;  /* the sender report went too: not a packet of the frame */
        }
        Py_END_ALLOW_THREADS
        if (!protected_ok) {
            PyBuffer_Release(&address);
            PyErr_SetString(PyExc_RuntimeError, "SRTP protect failed");
            return NULL;
        }
        sent += done;
        for (Py_ssize_t i = 0; i < done; i++)
            octets += sizes[i];
    }
    PyBuffer_Release(&address);
    return Py_BuildValue("nniO", sent, octets, error, gso ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"set_protect", set_protect, METH_O, "Use this srtp_protect (a C function pointer, as an int)."},
    {"sockaddr", sockaddr, METH_VARARGS, "sockaddr(host, port) -> the packed socket address."},
    {"send_frame", send_frame, METH_VARARGS,
     "send_frame(fd, sockaddr, srtp, payloads, payload_type, seq, timestamp, ssrc, ast, gso[, rtcp])"
     " -> (packets, octets, errno, gso)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastsend", NULL, -1, methods};

/* API: what rtp_fanout.py checks before using a build (3: send_frame takes gso, an optional rtcp, and
 * answers (packets, octets, errno, gso)). */
PyMODINIT_FUNC PyInit__fastsend(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "API", 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
