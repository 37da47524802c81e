/* rpc_metrics_http.c -- the /metrics responder: a minimal HTTP/1.x server
 * on one thread (rpc_metrics.h has the contract).
 *
 * Why one poll() thread and not a thread per connection: a scrape is tiny
 * and rare (every 15-60 s), so one thread is plenty, and multiplexing makes
 * the hostile cases cheap and bounded -- a client that connects and sends
 * nothing costs a slot and is dropped at its deadline (or earlier, when a
 * new connection needs its slot), never a blocked thread.  Every socket is
 * non-blocking; every send is MSG_NOSIGNAL (a client that went away is an
 * EPIPE, never a SIGPIPE).  The request is only parsed far enough to route
 * it: request line, and the end of the header block.
 *
 * What the thread may block on: rendering, i.e. the registry's lock (read)
 * and each model's pub_lock, held by others only for copies; a stat() of
 * the database file.  It never takes an op_lock. */
#define _GNU_SOURCE /* accept4, pipe2 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "rpc_log.h"
#include "rpc_metrics.h"

#define HTTP_MAX_CONNS 32
#define HTTP_HEADER_MAX 8192        /* a request's header block; more: 431 */
#define HTTP_READ_MS 5000           /* from accept to the end of the headers */
#define HTTP_WRITE_MS 10000         /* to take the whole answer */
#define HTTP_LINGER_MS 1000         /* reading what the client still sends after the answer */
#define HTTP_LINGER_BYTES (64 << 10)

enum conn_phase { CONN_FREE, CONN_READ, CONN_WRITE, CONN_LINGER };

typedef struct http_conn {
    int fd;
    enum conn_phase phase;
    double accepted_ms, deadline_ms;
    char in[HTTP_HEADER_MAX + 1];
    size_t in_len;
    char *out;            /* the whole answer, headers and body (malloc'd) */
    size_t out_len, out_off, lingered;
} http_conn;

struct rpc_metrics_http {
    rpc_metrics *m;
    int listen_fd;
    int wake[2];          /* stop writes wake[1]; the loop polls wake[0] */
    pthread_t thread;
    double accept_paused_until_ms; /* out of descriptors: stop polling the listener a while */
    http_conn conns[HTTP_MAX_CONNS];
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int rpc_metrics_http_parse(const char *listen, char *host, size_t host_len, int *port) {
    const char *colon, *h = listen;
    size_t hn;
    if (listen[0] == '[') {
        const char *close = strchr(listen, ']');
        if (!close || close[1] != ':')
            return -1;
        h = listen + 1;
        hn = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(listen, ':');
        if (!colon)
            return -1;
        hn = (size_t)(colon - listen);
        if (memchr(listen, ':', hn)) /* an IPv6 address wants brackets */
            return -1;
    }
    if (hn == 0 || hn >= host_len)
        return -1;
    const char *p = colon + 1;
    if (*p == '\0' || strlen(p) > 5)
        return -1;
    long v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
    }
    if (v > 65535)
        return -1;
    memcpy(host, h, hn);
    host[hn] = '\0';
    *port = (int)v;
    return 0;
}

static void conn_close(http_conn *c) {
    if (c->phase == CONN_FREE)
        return;
    close(c->fd);
    free(c->out);
    c->out = NULL;
    c->fd = -1;
    c->phase = CONN_FREE;
}

/* Queue an answer: status line, headers, and the body unless head_only. */
static void conn_answer(http_conn *c, int code, const char *reason, const char *extra_headers,
                        const char *content_type, const char *body, size_t body_len, int head_only) {
    char head[512];
    int hn = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%sConnection: close\r\n\r\n",
                      code, reason, content_type, body_len, extra_headers);
    size_t n = (size_t)hn + (head_only ? 0 : body_len);
    free(c->out);
    c->out = malloc(n);
    if (!c->out) {
        conn_close(c); /* out of memory: drop the connection, keep serving */
        return;
    }
    memcpy(c->out, head, (size_t)hn);
    if (!head_only)
        memcpy(c->out + hn, body, body_len);
    c->out_len = n;
    c->out_off = 0;
    c->phase = CONN_WRITE;
    c->deadline_ms = now_ms() + HTTP_WRITE_MS;
}

static void conn_error(http_conn *c, int code, const char *reason, const char *extra, const char *text) {
    conn_answer(c, code, reason, extra, "text/plain; charset=utf-8", text, strlen(text), 0);
}

/* The header block is complete in c->in: route the request line. */
static void conn_route(rpc_metrics_http *h, http_conn *c) {
    char *line = c->in;
    size_t n = strcspn(line, "\r\n");
    line[n] = '\0';
    char *sp1 = strchr(line, ' ');
    char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2 || strchr(sp2 + 1, ' ') || sp1 == line || sp2 == sp1 + 1) {
        conn_error(c, 400, "Bad Request", "", "malformed request line\n");
        return;
    }
    *sp1 = *sp2 = '\0';
    const char *method = line, *target = sp1 + 1, *version = sp2 + 1;
    if (strncmp(version, "HTTP/1.", 7) != 0 || (version[7] != '0' && version[7] != '1') || version[8]) {
        conn_error(c, strncmp(version, "HTTP/", 5) == 0 ? 505 : 400,
                   strncmp(version, "HTTP/", 5) == 0 ? "HTTP Version Not Supported" : "Bad Request", "",
                   "HTTP/1.0 or HTTP/1.1 only\n");
        return;
    }
    int head = strcmp(method, "HEAD") == 0;
    if (!head && strcmp(method, "GET") != 0) {
        conn_error(c, 405, "Method Not Allowed", "Allow: GET, HEAD\r\n", "GET or HEAD /metrics\n");
        return;
    }
    if (strcmp(target, "/metrics") != 0 && strncmp(target, "/metrics?", 9) != 0) {
        conn_error(c, 404, "Not Found", "", "eplbd serves /metrics only\n");
        return;
    }
    char *body;
    size_t len;
    if (rpc_metrics_render(h->m, &body, &len) != 0) {
        conn_error(c, 500, "Internal Server Error", "", "out of memory rendering the metrics\n");
        return;
    }
    conn_answer(c, 200, "OK", "", "text/plain; version=0.0.4; charset=utf-8", body, len, head);
    free(body);
}

static void conn_read(rpc_metrics_http *h, http_conn *c) {
    for (;;) {
        if (c->phase == CONN_LINGER) {
            char sink[4096];
            ssize_t got = recv(c->fd, sink, sizeof sink, MSG_DONTWAIT);
            if (got > 0 && (c->lingered += (size_t)got) < HTTP_LINGER_BYTES)
                continue;
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                return;
            conn_close(c); /* EOF, error, or enough discarded */
            return;
        }
        size_t room = HTTP_HEADER_MAX - c->in_len;
        ssize_t got = room ? recv(c->fd, c->in + c->in_len, room, MSG_DONTWAIT) : 0;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (got <= 0 && room) {
            conn_close(c); /* went away before a whole request */
            return;
        }
        size_t scan_from = c->in_len > 3 ? c->in_len - 3 : 0;
        c->in_len += (size_t)got;
        c->in[c->in_len] = '\0';
        /* NUL bytes end the strings below early, which can only make the
         * request look malformed: fine. */
        for (size_t i = scan_from; i < c->in_len; i++) {
            if ((c->in[i] == '\n' && i >= 1 && c->in[i - 1] == '\n') ||
                (c->in[i] == '\n' && i >= 3 && memcmp(c->in + i - 3, "\r\n\r\n", 4) == 0)) {
                conn_route(h, c);
                return;
            }
        }
        if (c->in_len == HTTP_HEADER_MAX) {
            conn_error(c, 431, "Request Header Fields Too Large", "", "request header block over 8192 bytes\n");
            return;
        }
    }
}

static void conn_write(http_conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t put = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (put < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (put <= 0) {
            conn_close(c);
            return;
        }
        c->out_off += (size_t)put;
    }
    /* All sent: half-close, then read what the client still sends, so that
     * closing with unread bytes does not reset the connection before the
     * client has read the answer (an oversized request, a body). */
    free(c->out);
    c->out = NULL;
    shutdown(c->fd, SHUT_WR);
    c->phase = CONN_LINGER;
    c->lingered = 0;
    c->deadline_ms = now_ms() + HTTP_LINGER_MS;
}

static void accept_one(rpc_metrics_http *h) {
    int fd = accept4(h->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        /* Out of descriptors: the pending connection stays readable, so
         * polling it again at once would spin; look again in 100 ms.
         * EAGAIN, or a connection that went away: nothing to do. */
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
            h->accept_paused_until_ms = now_ms() + 100;
        return;
    }
    http_conn *slot = NULL, *oldest = NULL;
    for (int i = 0; i < HTTP_MAX_CONNS && !slot; i++) {
        http_conn *c = &h->conns[i];
        if (c->phase == CONN_FREE)
            slot = c;
        else if (!oldest || c->accepted_ms < oldest->accepted_ms)
            oldest = c;
    }
    if (!slot) { /* every slot held: the oldest has had the most time */
        conn_close(oldest);
        slot = oldest;
    }
    slot->fd = fd;
    slot->phase = CONN_READ;
    slot->in_len = 0;
    slot->accepted_ms = now_ms();
    slot->deadline_ms = slot->accepted_ms + HTTP_READ_MS;
}

static void *http_main(void *arg) {
    rpc_metrics_http *h = arg;
    struct pollfd fds[HTTP_MAX_CONNS + 2];
    int idx[HTTP_MAX_CONNS + 2];
    for (;;) {
        double now = now_ms(), next = now + 1000;
        int n = 0;
        fds[n++] = (struct pollfd){ .fd = h->wake[0], .events = POLLIN };
        /* A negative fd is ignored by poll(): the listener while paused. */
        fds[n++] = (struct pollfd){ .fd = now < h->accept_paused_until_ms ? -1 : h->listen_fd, .events = POLLIN };
        if (now < h->accept_paused_until_ms && h->accept_paused_until_ms < next)
            next = h->accept_paused_until_ms;
        for (int i = 0; i < HTTP_MAX_CONNS; i++) {
            http_conn *c = &h->conns[i];
            if (c->phase == CONN_FREE)
                continue;
            if (c->deadline_ms <= now) {
                conn_close(c); /* too slow: dropped without an answer */
                continue;
            }
            if (c->deadline_ms < next)
                next = c->deadline_ms;
            idx[n] = i;
            fds[n++] = (struct pollfd){ .fd = c->fd, .events = c->phase == CONN_WRITE ? POLLOUT : POLLIN };
        }
        int timeout = (int)(next - now) + 1;
        if (poll(fds, (nfds_t)n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            rpc_log(RPC_LOG_ERROR, "metrics: poll: %s; the metrics listener stops", strerror(errno));
            break;
        }
        if (fds[0].revents)
            break; /* rpc_metrics_http_stop */
        for (int k = 2; k < n; k++) {
            http_conn *c = &h->conns[idx[k]];
            if (!fds[k].revents || c->phase == CONN_FREE)
                continue;
            if (c->phase == CONN_WRITE)
                conn_write(c);
            else
                conn_read(h, c);
            if (c->phase == CONN_WRITE) /* routed just now: try to send at once */
                conn_write(c);
        }
        if (fds[1].revents & POLLIN)
            for (int k = 0; k < 8 && now_ms() >= h->accept_paused_until_ms; k++)
                accept_one(h);
    }
    return NULL;
}

eplb_status rpc_metrics_http_start(const char *addr, rpc_metrics *m, rpc_metrics_http **out, char *bound,
                                   size_t bound_len, eplb_error *err) {
    *out = NULL;
    char host[256], port_s[8];
    int port;
    if (rpc_metrics_http_parse(addr, host, sizeof host, &port) != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "--metrics-listen wants host:port (e.g. 127.0.0.1:9100, 0.0.0.0:9100 or [::1]:9100), "
                              "got '%s'", addr);
    snprintf(port_s, sizeof port_s, "%d", port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV }, *res = NULL;
    int gai = getaddrinfo(host, port_s, &hints, &res);
    if (gai != 0)
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "cannot listen for metrics on %s: %s", addr,
                              gai_strerror(gai));
    int fd = -1, why = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            why = errno;
            continue;
        }
        /* Rebinding over TIME_WAIT after a restart; Linux still refuses a
         * port another socket listens on. */
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
            why = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "cannot listen for metrics on %s: %s", addr,
                              strerror(why ? why : EADDRNOTAVAIL));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char ip[INET6_ADDRSTRLEN] = "?";
    int bound_port = port;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6) {
            const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
            inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
            bound_port = ntohs(s6->sin6_port);
        } else {
            const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;
            inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
            bound_port = ntohs(s4->sin_port);
        }
    }
    snprintf(bound, bound_len, ss.ss_family == AF_INET6 ? "http://[%s]:%d/metrics" : "http://%s:%d/metrics", ip,
             bound_port);

    rpc_metrics_http *h = calloc(1, sizeof *h);
    if (!h) {
        close(fd);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory starting the metrics listener");
    }
    h->m = m;
    h->listen_fd = fd;
    for (int i = 0; i < HTTP_MAX_CONNS; i++)
        h->conns[i].fd = -1;
    if (pipe2(h->wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        int e = errno;
        close(fd);
        free(h);
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "metrics listener: pipe: %s", strerror(e));
    }
    int rc = pthread_create(&h->thread, NULL, http_main, h);
    if (rc != 0) {
        close(fd);
        close(h->wake[0]);
        close(h->wake[1]);
        free(h);
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "metrics listener: cannot start its thread: %s", strerror(rc));
    }
    *out = h;
    return EPLB_OK;
}

void rpc_metrics_http_stop(rpc_metrics_http *h) {
    if (!h)
        return;
    ssize_t w;
    do
        w = write(h->wake[1], "x", 1);
    while (w < 0 && errno == EINTR);
    pthread_join(h->thread, NULL);
    for (int i = 0; i < HTTP_MAX_CONNS; i++)
        conn_close(&h->conns[i]);
    close(h->listen_fd);
    close(h->wake[0]);
    close(h->wake[1]);
    free(h);
}
