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
#include <sys/socket.h>

#define MAX_PACKETS 64   /* a frame larger than this is sent in several batches */
#define SLOT 2048        /* header (<= 20) + payload (<= 1300) + SRTP trailer (<= 148) */

typedef int (*protect_fn)(void *ctx, void *packet, int *length);

static protect_fn srtp_protect;
static __thread unsigned char slots[MAX_PACKETS][SLOT];

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

/* send_frame(fd, sockaddr, srtp, payloads, payload_type, seq, timestamp, ssrc, ast)
 *   -> (packets sent, payload bytes sent)
 * ast: the abs-send-time extension word (id, length and value), or -1 for a plain 12-byte header.
 * Fewer packets than given means the socket's buffer is full (EAGAIN): the caller skips to a
 * keyframe, as it does when a transport backs up. Other socket errors raise OSError. */
static PyObject *send_frame(PyObject *self, PyObject *args) {
    int fd, payload_type;
    Py_buffer address;
    unsigned long long srtp;
    PyObject *payloads;
    unsigned int seq;
    unsigned long timestamp, ssrc;
    long long ast;
    if (!PyArg_ParseTuple(args, "iy*KO!iIkkL", &fd, &address, &srtp, &PyList_Type, &payloads, &payload_type,
                          &seq, &timestamp, &ssrc, &ast))
        return NULL;
    if (srtp_protect == NULL) {
        PyBuffer_Release(&address);
        PyErr_SetString(PyExc_RuntimeError, "set_protect() was not called");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads);
    Py_ssize_t sent = 0, octets = 0;
    int error = 0;
    struct mmsghdr messages[MAX_PACKETS];
    struct iovec vectors[MAX_PACKETS];
    int header_size = ast >= 0 ? 20 : 12;
    for (Py_ssize_t base = 0; base < count && !error; base += MAX_PACKETS) {
        Py_ssize_t batch = count - base < MAX_PACKETS ? count - base : MAX_PACKETS;
        Py_ssize_t batch_octets = 0;
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
            batch_octets += size;
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
            memset(&messages[i], 0, sizeof messages[i]);
            messages[i].msg_hdr.msg_name = address.buf;
            messages[i].msg_hdr.msg_namelen = (socklen_t)address.len;
            messages[i].msg_hdr.msg_iov = &vectors[i];
            messages[i].msg_hdr.msg_iovlen = 1;
        }
        while (protected_ok && done < batch) {
            int n = sendmmsg(fd, messages + done, (unsigned int)(batch - done), 0);
            if (n < 0) {
                if (errno != EINTR) {
                    error = errno;
                    break;
                }
                continue;
            }
            done += n;
        }
        Py_END_ALLOW_THREADS
        if (!protected_ok) {
            PyBuffer_Release(&address);
            PyErr_SetString(PyExc_RuntimeError, "SRTP protect failed");
            return NULL;
        }
        sent += done;
        octets += done == batch ? batch_octets : 0;  /* exact only when whole (the rare partial: approximate) */
    }
    PyBuffer_Release(&address);
    if (error && error != EAGAIN && error != EWOULDBLOCK && error != ENOBUFS) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("nn", sent, octets);
}

static PyMethodDef methods[] = {
    {"set_protect", set_protect, METH_O, "Use this srtp_protect (a C function pointer, as an int)."},
    {"sockaddr", sockaddr, METH_VARARGS, "sockaddr(host, port) -> the packed socket address."},
    {"send_frame", send_frame, METH_VARARGS,
     "send_frame(fd, sockaddr, srtp, payloads, payload_type, seq, timestamp, ssrc, ast) -> (packets, octets)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastsend", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastsend(void) { return PyModule_Create(&module); }
