/* The fan-out load client in C: N WebSockets on one epoll, each subscribed to one prediction, each
 * socket's terminal `update` timestamped as it arrives. Built and run by bench/native.py (the `live`
 * suite's fan-out row); plain C and libc, nothing else.
 *
 *   fanout --host 127.0.0.1 --port 8080 --sockets 1000 [--timeout 120]
 *
 * It opens every socket (the HTTP Upgrade handshake, one after another), prints {"ready": N}, reads a
 * prediction id from stdin, sends each socket {"op":"subscribe","prediction_id":ID} (a masked text frame,
 * as RFC 6455 requires of a client) and reads them all through one epoll until every socket has had its
 * prediction's terminal state. It prints {"subscribed": N} once every socket has had its `subscribed`
 * snapshot (whoever drives it may let the prediction finish then), and last one JSON line: for each
 * socket whose terminal state came as an `update` (a push; a `subscribed` snapshot that is already
 * terminal is not one) its delay in seconds from the prediction's completion, by two clocks:
 *
 *   delays         the wall clock (CLOCK_REALTIME) read right after the recv(2) that completed the frame
 *   kernel_delays  the kernel's receive timestamp of the last segment that recv(2) returned
 *                  (SO_TIMESTAMPING, software, also CLOCK_REALTIME): on loopback it is taken as the
 *                  server's send(2) hands the segment to the loopback device, so no time this client spends
 *                  on other sockets is in it (empty when the kernel gives none)
 *
 * The completion is the `done_at` the model put in its result (bench/push_model.py stamps it with
 * time.time(), full precision, as predict_batch returns), else the record's `completed_at` (1 ms).
 *
 * Frames may come split over reads, several in one read, fragmented (continuation frames, with control
 * frames between the fragments): each socket keeps a buffer of what it has read and one of the message
 * being assembled. A ping is answered with a pong; a close frame or EOF before the terminal state counts
 * the socket as `closed`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <linux/net_tstamp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SO_TIMESTAMPING
#define SO_TIMESTAMPING 37
#endif
#ifndef SCM_TIMESTAMPING
#define SCM_TIMESTAMPING SO_TIMESTAMPING
#endif

enum { PENDING, PUSHED, SNAPSHOT, CLOSED, FAILED };

typedef struct {
    unsigned char *data;
    size_t len, cap;
} buffer;

typedef struct {
    int fd;
    int state;
    int subscribed;  /* its `subscribed` snapshot came */
    buffer in;       /* bytes read, not yet parsed into frames */
    buffer message;  /* a fragmented message's payload so far */
    int in_message;  /* a data frame without FIN came: continuation frames follow */
    int binary;      /* the message being read is binary (ignored: the server's are text) */
    double delay, kernel_delay;
    int has_kernel;
} conn;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("fanout: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void reserve(buffer *b, size_t more) {
    if (b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data)
        die("out of memory");
    b->cap = cap;
}

static void append(buffer *b, const void *src, size_t n) {
    reserve(b, n);
    memcpy(b->data + b->len, src, n);
    b->len += n;
}

static double seconds(const struct timespec *ts) { return (double)ts->tv_sec + ts->tv_nsec / 1e9; }

static void write_all(int fd, const void *src, size_t n) {
    const char *p = src;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("send: %s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
}

/* A client frame: FIN set, `opcode`, masked with a fresh key (RFC 6455 section 5.3). */
static size_t client_frame(unsigned char *out, int opcode, const unsigned char *payload, size_t n) {
    size_t at = 0;
    out[at++] = 0x80 | (unsigned char)opcode;
    if (n < 126) {
        out[at++] = 0x80 | (unsigned char)n;
    } else if (n < 65536) {
        out[at++] = 0x80 | 126;
        out[at++] = (unsigned char)(n >> 8);
        out[at++] = (unsigned char)n;
    } else {
        out[at++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            out[at++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    unsigned char mask[4];
    if (getrandom(mask, sizeof mask, 0) != sizeof mask)
        die("getrandom: %s", strerror(errno));
    memcpy(out + at, mask, 4);
    at += 4;
    for (size_t i = 0; i < n; i++)
        out[at + i] = payload[i] ^ mask[i % 4];
    return at + n;
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *found;
    int err = getaddrinfo(host, port, &hints, &found);
    if (err)
        die("%s:%s: %s", host, port, gai_strerror(err));
    int fd = -1;
    for (struct addrinfo *a = found; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0)
            continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd < 0)
        die("connect %s:%s: %s", host, port, strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* The Upgrade handshake, blocking. Whatever the server sent after its headers stays in c->in. (The
 * Sec-WebSocket-Accept digest is not checked: the server is ours, and a 101 is all this needs.) */
static void handshake(conn *c, const char *host, const char *port) {
    unsigned char key_bytes[16];
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char key[25];
    if (getrandom(key_bytes, sizeof key_bytes, 0) != sizeof key_bytes)
        die("getrandom: %s", strerror(errno));
    for (int i = 0, o = 0; i < 16; i += 3) {
        uint32_t v = (uint32_t)key_bytes[i] << 16;
        if (i + 1 < 16)
            v |= (uint32_t)key_bytes[i + 1] << 8;
        if (i + 2 < 16)
            v |= key_bytes[i + 2];
        key[o++] = b64[(v >> 18) & 63];
        key[o++] = b64[(v >> 12) & 63];
        key[o++] = i + 1 < 16 ? b64[(v >> 6) & 63] : '=';
        key[o++] = i + 2 < 16 ? b64[v & 63] : '=';
    }
    key[24] = 0;
    char request[512];
    int n = snprintf(request, sizeof request,
                     "GET /ws HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     host, port, key);
    write_all(c->fd, request, (size_t)n);
    for (;;) {
        reserve(&c->in, 4096);
        ssize_t r = recv(c->fd, c->in.data + c->in.len, c->in.cap - c->in.len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            die("closed during the WebSocket handshake");
        c->in.len += (size_t)r;
        unsigned char *end = memmem(c->in.data, c->in.len, "\r\n\r\n", 4);
        if (!end)
            continue;
        unsigned char *eol = memmem(c->in.data, c->in.len, "\r\n", 2);
        if (!memmem(c->in.data, (size_t)(eol - c->in.data), " 101 ", 5))
            die("upgrade refused: %.*s", (int)(eol - c->in.data), (char *)c->in.data);
        size_t head = (size_t)(end + 4 - c->in.data);
        memmove(c->in.data, c->in.data + head, c->in.len - head);
        c->in.len -= head;
        return;
    }
}

/* The number after `"key":` in a JSON text (no nesting awareness: the keys looked for are unique). */
static int number_after(const unsigned char *text, size_t n, const char *key, double *out) {
    size_t k = strlen(key);
    const unsigned char *at = memmem(text, n, key, k);
    if (!at)
        return 0;
    char digits[64];
    size_t i = 0, from = (size_t)(at - text) + k;
    while (from + i < n && i < sizeof digits - 1 && strchr("0123456789.eE+-", text[from + i])) {
        digits[i] = (char)text[from + i];
        i++;
    }
    digits[i] = 0;
    char *end;
    *out = strtod(digits, &end);
    return i > 0 && *end == 0;
}

/* "completed_at":"2026-11-28T10:02:14.397Z" as seconds since the epoch. */
static int completed_at(const unsigned char *text, size_t n, double *out) {
    static const char key[] = "\"completed_at\":\"";
    const unsigned char *at = memmem(text, n, key, sizeof key - 1);
    if (!at)
        return 0;
    char stamp[32] = {0};
    size_t from = (size_t)(at - text) + sizeof key - 1;
    if (from + 24 > n)
        return 0;
    memcpy(stamp, text + from, 24);
    struct tm tm = {0};
    int ms;
    if (sscanf(stamp, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &ms) != 7)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    *out = (double)timegm(&tm) + ms / 1000.0;
    return 1;
}

static int starts(const unsigned char *text, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && memcmp(text, prefix, k) == 0;
}

static int stamp_from_done_at = 1; /* every terminal update so far carried `done_at` */
static int snapshots = 0, sockets_open = 0; /* sockets that had their snapshot, of all */

/* One whole text message: is it this socket's terminal state? (`type` is the message's first key, and the
 * record's `status` the first `status` in it: the server's encoding, orjson, adds no spaces.) */
static void on_message(conn *c, const unsigned char *text, size_t n, double now, double kernel, int has_kernel) {
    int update = starts(text, n, "{\"type\":\"update\"");
    int snapshot = starts(text, n, "{\"type\":\"subscribed\"");
    if (starts(text, n, "{\"type\":\"error\"")) {
        fprintf(stderr, "fanout: the server answered %.*s\n", (int)(n < 300 ? n : 300), (const char *)text);
        c->state = FAILED;
        return;
    }
    if (!update && !snapshot)
        return;
    if (snapshot && !c->subscribed) {
        c->subscribed = 1;
        if (++snapshots == sockets_open) { /* every subscribe answered: whoever drives us may finish it now */
            printf("{\"subscribed\": %d}\n", snapshots);
            fflush(stdout);
        }
    }
    static const char key[] = "\"status\":\"";
    const unsigned char *at = memmem(text, n, key, sizeof key - 1);
    if (!at)
        return;
    const unsigned char *status = at + sizeof key - 1;
    size_t rest = n - (size_t)(status - text);
    if (!(starts(status, rest, "succeeded\"") || starts(status, rest, "failed\"") || starts(status, rest, "canceled\"")))
        return;
    if (snapshot) { /* finished before this socket subscribed: not a push */
        c->state = SNAPSHOT;
        return;
    }
    double done;
    if (!number_after(text, n, "\"done_at\":", &done)) {
        stamp_from_done_at = 0;
        if (!completed_at(text, n, &done))
            die("a terminal update with neither done_at nor completed_at: %.*s", (int)(n < 300 ? n : 300), text);
    }
    c->state = PUSHED;
    c->delay = now - done;
    c->has_kernel = has_kernel;
    c->kernel_delay = kernel - done;
}

/* Parse the whole frames in c->in (what remains is a partial frame, kept for the next read). */
static void on_frames(conn *c, double now, double kernel, int has_kernel) {
    size_t at = 0;
    while (c->state == PENDING) {
        unsigned char *p = c->in.data + at;
        size_t avail = c->in.len - at, head = 2;
        if (avail < 2)
            break;
        int fin = p[0] & 0x80, opcode = p[0] & 0x0f, masked = p[1] & 0x80;
        uint64_t n = p[1] & 0x7f;
        if (n == 126) {
            head = 4;
            if (avail < head)
                break;
            n = ((uint64_t)p[2] << 8) | p[3];
        } else if (n == 127) {
            head = 10;
            if (avail < head)
                break;
            n = 0;
            for (int i = 0; i < 8; i++)
                n = (n << 8) | p[2 + i];
        }
        if (masked)
            head += 4; /* a server must not mask; if one does, unmask */
        if (avail < head || avail - head < n)
            break;
        unsigned char *payload = p + head;
        if (masked)
            for (uint64_t i = 0; i < n; i++)
                payload[i] ^= p[head - 4 + i % 4];
        at += head + (size_t)n;
        if (opcode == 0x8) { /* close */
            c->state = CLOSED;
        } else if (opcode == 0x9) { /* ping: the pong carries its payload */
            unsigned char pong[14 + 125];
            if (n <= 125) {
                size_t len = client_frame(pong, 0xA, payload, (size_t)n);
                (void)!send(c->fd, pong, len, MSG_NOSIGNAL | MSG_DONTWAIT); /* a full buffer: skip this pong */
            }
        } else if (opcode == 0xA) { /* pong */
        } else if (opcode == 0x0 || opcode == 0x1 || opcode == 0x2) {
            if (opcode != 0x0) {
                c->message.len = 0;
                c->binary = opcode == 0x2;
                c->in_message = 1;
            } else if (!c->in_message) {
                die("a continuation frame outside a message");
            }
            if (fin && c->message.len == 0) { /* unfragmented (or all before it empty): no copy */
                c->in_message = 0;
                if (!c->binary)
                    on_message(c, payload, (size_t)n, now, kernel, has_kernel);
            } else {
                append(&c->message, payload, (size_t)n);
                if (fin) {
                    c->in_message = 0;
                    if (!c->binary)
                        on_message(c, c->message.data, c->message.len, now, kernel, has_kernel);
                    c->message.len = 0;
                }
            }
        } else {
            die("unknown opcode %d", opcode);
        }
    }
    memmove(c->in.data, c->in.data + at, c->in.len - at);
    c->in.len -= at;
}

/* One recv(2) into c->in, with the wall clock right after it and the kernel's receive stamp.
 * Returns the bytes read, 0 at EOF, -1 when nothing was there. */
static ssize_t read_some(conn *c, double *now, double *kernel, int *has_kernel) {
    reserve(&c->in, 65536);
    struct iovec iov = {.iov_base = c->in.data + c->in.len, .iov_len = c->in.cap - c->in.len};
    union {
        char buf[CMSG_SPACE(sizeof(struct scm_timestamping)) * 2];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t r = recvmsg(c->fd, &msg, 0);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* first, before anything is done with what came */
    *now = seconds(&ts);
    if (r < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? -1 : 0;
    *has_kernel = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPING) {
            struct scm_timestamping stamps;
            memcpy(&stamps, CMSG_DATA(cm), sizeof stamps);
            if (stamps.ts[0].tv_sec) {
                *kernel = seconds(&stamps.ts[0]);
                *has_kernel = 1;
            }
        }
    }
    c->in.len += (size_t)r;
    return r;
}

static void print_delays(const char *name, conn *conns, int n, int kernel) {
    printf("\"%s\":[", name);
    int first = 1;
    for (int i = 0; i < n; i++) {
        if (conns[i].state != PUSHED || (kernel && !conns[i].has_kernel))
            continue;
        printf(first ? "%.9f" : ",%.9f", kernel ? conns[i].kernel_delay : conns[i].delay);
        first = 0;
    }
    printf("]");
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = NULL;
    int sockets = 1000;
    double timeout = 120;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host"))
            host = argv[i + 1];
        else if (!strcmp(argv[i], "--port"))
            port = argv[i + 1];
        else if (!strcmp(argv[i], "--sockets"))
            sockets = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--timeout"))
            timeout = atof(argv[i + 1]);

        else
            die("unknown option %s", argv[i]);
    }
    if (!port || sockets < 1)
        die("usage: fanout --host HOST --port PORT --sockets N [--timeout SECONDS]");

    struct rlimit files; /* a socket is a descriptor: as many as the hard limit allows */
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    conn *conns = calloc((size_t)sockets, sizeof *conns);
    if (!conns)
        die("out of memory");
    int stamping = SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE;
    for (int i = 0; i < sockets; i++) {
        conns[i].fd = connect_to(host, port);
        setsockopt(conns[i].fd, SOL_SOCKET, SO_TIMESTAMPING, &stamping, sizeof stamping); /* best effort */
        handshake(&conns[i], host, port);
    }
    sockets_open = sockets;
    printf("{\"ready\": %d}\n", sockets);
    fflush(stdout);

    char pid[256];
    if (!fgets(pid, sizeof pid, stdin))
        die("no prediction id on stdin");
    pid[strcspn(pid, "\r\n")] = 0;
    unsigned char text[400], frame[420];
    int n = snprintf((char *)text, sizeof text, "{\"op\":\"subscribe\",\"prediction_id\":\"%s\"}", pid);
    size_t len = client_frame(frame, 0x1, text, (size_t)n);

    int ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));
    for (int i = 0; i < sockets; i++) {
        write_all(conns[i].fd, frame, len);
        fcntl(conns[i].fd, F_SETFL, fcntl(conns[i].fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev))
            die("epoll_ctl: %s", strerror(errno));
    }
    /* The subscribed snapshot (or anything else) may have come with the 101: parse it first. */
    int pending = sockets;
    for (int i = 0; i < sockets; i++) {
        on_frames(&conns[i], 0, 0, 0);
        if (conns[i].state != PENDING) {
            epoll_ctl(ep, EPOLL_CTL_DEL, conns[i].fd, NULL);
            pending--;
        }
    }

    struct timespec start, t;
    clock_gettime(CLOCK_MONOTONIC, &start);
    struct epoll_event events[1024];
    while (pending > 0) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        double left = timeout - (seconds(&t) - seconds(&start));
        if (left <= 0)
            break;
        int ready = epoll_wait(ep, events, 1024, (int)(left * 1000) + 1);
        if (ready < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < ready; e++) {
            conn *c = events[e].data.ptr;
            double now = 0, kernel = 0;
            int has_kernel = 0;
            ssize_t r = read_some(c, &now, &kernel, &has_kernel);
            if (r < 0)
                continue;
            if (r == 0)
                c->state = CLOSED;
            else
                on_frames(c, now, kernel, has_kernel);
            if (c->state != PENDING) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                pending--;
            }
        }
    }

    int counts[5] = {0};
    for (int i = 0; i < sockets; i++)
        counts[conns[i].state]++;
    printf("{\"sockets\":%d,\"pushed\":%d,\"snapshots\":%d,\"closed\":%d,\"errors\":%d,\"timed_out\":%d,"
           "\"stamp\":\"%s\",",
           sockets, counts[PUSHED], counts[SNAPSHOT], counts[CLOSED], counts[FAILED], counts[PENDING],
           stamp_from_done_at ? "done_at" : "completed_at");
    print_delays("delays", conns, sockets, 0);
    printf(",");
    print_delays("kernel_delays", conns, sockets, 1);
    printf("}\n");
    for (int i = 0; i < sockets; i++)
        close(conns[i].fd);
    return 0;
}
