/* rpc_metrics.h -- eplbd's Prometheus metrics: per-method call counters and
 * latency histograms fed by the server's on_call observer, and the text
 * exposition (format 0.0.4) of those, of every model's published state and
 * activity counters (eplb_registry_list) and of the process.
 *
 * Cost: rpc_metrics_on_call runs on a CQ thread once per finished call; it
 * takes no lock (a few relaxed atomic increments after a scan of ~10
 * method names; docs/benchmarks.md has the measured ns).  Rendering takes
 * the registry's lock (read) and each entry's pub_lock, briefly, through
 * eplb_registry_list: it never waits for an operation on a model.
 *
 * Metric names and labels are a contract for dashboards and alerts; they
 * are listed in docs/deploy.md ("Metrics").  Served over HTTP by
 * rpc_metrics_http.c (--metrics-listen). */
#ifndef RPC_METRICS_H
#define RPC_METRICS_H

#include <stdbool.h>
#include <stddef.h>

#include "rpc_handlers.h"

struct rpc_call_record;

typedef struct rpc_metrics rpc_metrics;

/* A metrics object for ctx (its registry and serving flag are read at each
 * render; ctx must outlive it).  db_path: the SQLite file whose size (with
 * its -wal) is reported, or ":memory:"/NULL for none.  NULL when out of
 * memory. */
rpc_metrics *rpc_metrics_new(rpc_context *ctx, const char *db_path, const char *version);
void rpc_metrics_free(rpc_metrics *m);

/* rpc_context's on_call: count one finished call (arg is the rpc_metrics).
 * Lock-free; never blocks. */
void rpc_metrics_on_call(void *arg, const struct rpc_call_record *rec);

/* The whole exposition as text into *out (malloc'd, NUL-terminated, *len
 * bytes without the NUL).  -1 (nothing allocated) when out of memory. */
int rpc_metrics_render(rpc_metrics *m, char **out, size_t *len);

/* ---- the HTTP responder (rpc_metrics_http.c) -------------------------------
 * --metrics-listen host:port: GET or HEAD /metrics (any query string) -> 200
 * with the exposition; other paths 404, other methods 405, a malformed
 * request 400, a header block over 8 KiB 431; one request per connection
 * (Connection: close).  One thread multiplexes up to 32 connections with
 * poll(); each must send its request within 5 s and take the answer within
 * 10 s, and when all 32 are taken the oldest unfinished request is dropped,
 * so slow or idle clients cannot keep a scrape out. */
typedef struct rpc_metrics_http rpc_metrics_http;

/* Split "host:port" / "[v6]:port" (port 0-65535, host non-empty) into its
 * parts; 0 if well formed, else -1. */
int rpc_metrics_http_parse(const char *listen, char *host, size_t host_len, int *port);

/* Bind (exclusive: no SO_REUSEPORT) and start the responder thread.  On
 * success *bound is the URL served ("http://127.0.0.1:9100/metrics", the
 * real port when 0 was asked).  On error *out is NULL and err names the
 * address and why. */
eplb_status rpc_metrics_http_start(const char *listen, rpc_metrics *m, rpc_metrics_http **out, char *bound,
                                   size_t bound_len, eplb_error *err);

/* Close the listener and every connection, join the thread, free. NULL ok. */
void rpc_metrics_http_stop(rpc_metrics_http *h);

/* Append s as a Prometheus label value body (no quotes) to buf[at..cap):
 * backslash, double quote and newline escaped as \\ \" \n; a byte that is
 * not part of valid UTF-8 becomes U+FFFD, so any input gives a parseable
 * exposition.  Stops at a character boundary when cap is reached (always
 * NUL-terminates when cap > at).  Returns the new length. */
static inline size_t rpc_metrics_escape_label(char *buf, size_t at, size_t cap, const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    if (cap == 0 || at >= cap)
        return at;
    while (*p) {
        char tmp[4];
        size_t n = 0, adv = 1;
        unsigned c = p[0];
        if (c == '\\' || c == '"') {
            tmp[0] = '\\', tmp[1] = (char)c, n = 2;
        } else if (c == '\n') {
            tmp[0] = '\\', tmp[1] = 'n', n = 2;
        } else if (c < 0x80) {
            tmp[0] = (char)c, n = 1;
        } else {
            /* Length of a well-formed UTF-8 sequence starting here, or 0. */
            size_t want = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
            size_t k = 1;
            while (want && k < want && (p[k] & 0xC0) == 0x80)
                k++;
            int ok = want && k == want && !(c == 0xE0 && p[1] < 0xA0) && !(c == 0xED && p[1] > 0x9F) &&
                     !(c == 0xF0 && p[1] < 0x90) && !(c == 0xF4 && p[1] > 0x8F);
            if (ok) {
                for (size_t i = 0; i < want && i < sizeof tmp; i++) /* want <= 4; said for gcc -O3 */
                    tmp[i] = (char)p[i];
                n = adv = want;
            } else {
                tmp[0] = (char)0xEF, tmp[1] = (char)0xBF, tmp[2] = (char)0xBD, n = 3; /* U+FFFD */
            }
        }
        if (at + n >= cap)
            break;
        for (size_t i = 0; i < n; i++)
            buf[at++] = tmp[i];
        p += adv;
    }
    buf[at] = '\0';
    return at;
}

#endif
