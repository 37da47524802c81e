/* rpc_log.c -- the log sink.  Each line is built in a local buffer and
 * written with one fputs, which stdio locks per call, so lines from worker
 * threads logging at once stay whole.  A line is at most RPC_LOG_LINE_MAX
 * bytes: longer messages are cut (at a character boundary in JSON). */
#include "rpc_log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define RPC_LOG_LINE_MAX 2048

static atomic_int log_level = RPC_LOG_INFO;
static atomic_int log_format = RPC_LOG_TEXT;
static const char *const level_names[] = { "debug", "info", "warn", "error" };
static const char *const format_names[] = { "text", "json" };

int rpc_log_level_parse(const char *s) {
    for (int i = 0; i < 4; i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

int rpc_log_format_parse(const char *s) {
    for (int i = 0; i < 2; i++)
        if (strcmp(s, format_names[i]) == 0)
            return i;
    return -1;
}

void rpc_log_set_level(rpc_log_level level) { atomic_store(&log_level, (int)level); }
void rpc_log_set_format(rpc_log_format format) { atomic_store(&log_format, (int)format); }
bool rpc_log_enabled(rpc_log_level level) { return (int)level >= atomic_load(&log_level); }

const char *rpc_status_name(int code) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return code >= 0 && code <= 16 ? names[code] : "UNKNOWN";
}

/* ---- line building ----------------------------------------------------- */

typedef struct line {
    char buf[RPC_LOG_LINE_MAX];
    size_t len;
} line;

static void put(line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(line *l, const char *fmt, ...) {
    if (l->len >= sizeof l->buf - 1)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(l->buf + l->len, sizeof l->buf - l->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    l->len += (size_t)n < sizeof l->buf - l->len ? (size_t)n : sizeof l->buf - l->len - 1;
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 if it is not one. */
static size_t utf8_len(const unsigned char *s, size_t left) {
    unsigned c = s[0];
    size_t n;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (left < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

size_t rpc_json_escape(char *buf, size_t at, size_t cap, const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    if (cap == 0)
        return at;
    for (size_t i = 0; i < len;) {
        char esc[8];
        const char *piece;
        size_t plen, adv = 1;
        unsigned c = s[i];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            piece = esc;
            plen = 2;
        } else if (c == '\n' || c == '\r' || c == '\t') {
            esc[0] = '\\';
            esc[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
            piece = esc;
            plen = 2;
        } else if (c < 0x20 || c == 0x7F) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            piece = esc;
            plen = 6;
        } else if (c < 0x80) {
            piece = (const char *)s + i;
            plen = 1;
        } else if ((adv = utf8_len(s + i, len - i)) != 0) {
            piece = (const char *)s + i;
            plen = adv;
        } else {
            piece = "\xEF\xBF\xBD"; /* U+FFFD for a byte that is not UTF-8 */
            plen = 3;
            adv = 1;
        }
        if (at + plen >= cap)
            break;
        memcpy(buf + at, piece, plen);
        at += plen;
        i += adv;
    }
    buf[at < cap ? at : cap - 1] = '\0';
    return at;
}

static void put_json_str(line *l, const char *key, const char *s, size_t len) {
    put(l, ",\"%s\":\"", key);
    l->len = rpc_json_escape(l->buf, l->len, sizeof l->buf - 16, s, len);
    put(l, "\"");
}

static void put_stamp(line *l, rpc_log_level level, bool json) {
    char stamp[32];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    if (json)
        put(l, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\"", stamp, ts.tv_nsec / 1000000, level_names[level]);
    else
        put(l, "%s.%03ldZ %s ", stamp, ts.tv_nsec / 1000000, level_names[level]);
}

static void emit(line *l, bool json) {
    if (json) {
        /* Room for the closing brace is kept by every put_json_str. */
        if (l->len > sizeof l->buf - 3)
            l->len = sizeof l->buf - 3;
        l->buf[l->len++] = '}';
    }
    l->buf[l->len++] = '\n';
    l->buf[l->len] = '\0';
    fputs(l->buf, stderr);
}

void rpc_log(rpc_log_level level, const char *fmt, ...) {
    if (!rpc_log_enabled(level))
        return;
    char msg[RPC_LOG_LINE_MAX - 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    bool json = atomic_load(&log_format) == RPC_LOG_JSON;
    line l = { .len = 0 };
    put_stamp(&l, level, json);
    if (json)
        put_json_str(&l, "msg", msg, strlen(msg));
    else
        put(&l, "%s", msg);
    emit(&l, json);
}

/* Text form of a raw model id: printable ASCII as is, the rest as \xNN, so
 * a hostile name cannot forge a second line. */
static void put_text_id(line *l, const char *s) {
    for (; *s && l->len < sizeof l->buf - 8; s++) {
        unsigned char c = (unsigned char)*s;
        if (c > 0x20 && c < 0x7F && c != '\\')
            l->buf[l->len++] = (char)c;
        else
            put(l, "\\x%02x", c);
    }
    l->buf[l->len] = '\0';
}

void rpc_log_call(const rpc_call_record *rec) {
    rpc_log_level level = rec->code == 0 ? RPC_LOG_INFO : RPC_LOG_WARN;
    if (!rpc_log_enabled(level))
        return;
    const rpc_call_facts *f = rec->facts;
    bool json = atomic_load(&log_format) == RPC_LOG_JSON;
    line l = { .len = 0 };
    put_stamp(&l, level, json);
    if (json) {
        put(&l, ",\"event\":\"call\"");
        put_json_str(&l, "method", rec->method, strlen(rec->method));
        if (f->model_id[0])
            put_json_str(&l, "model_id", f->model_id, strlen(f->model_id));
        put(&l, ",\"status\":\"%s\",\"code\":%d,\"duration_ms\":%.3f", rpc_status_name(rec->code), rec->code,
            rec->duration_ms);
        if (rec->client_gone)
            put(&l, ",\"client_gone\":true");
        if (f->epoch)
            put(&l, ",\"epoch\":%llu", (unsigned long long)f->epoch);
        if (f->rebalance)
            put(&l,
                ",\"committed\":%s,\"balancedness_before\":%.6f,\"balancedness_after\":%.6f,"
                "\"experts_moved\":%llu,\"bytes_moved\":%llu,\"compute_ms\":%.3f,\"move_ms\":%.3f",
                f->committed ? "true" : "false", f->balancedness_before, f->balancedness_after,
                (unsigned long long)f->experts_moved, (unsigned long long)f->bytes_moved, f->compute_ms,
                f->move_ms);
        if (rec->peer)
            put_json_str(&l, "peer", rec->peer, strlen(rec->peer));
        if (rec->message && rec->message[0])
            put_json_str(&l, "message", rec->message, strlen(rec->message));
    } else {
        put(&l, "%s %s %.2fms", rec->method, rpc_status_name(rec->code), rec->duration_ms);
        if (f->model_id[0]) {
            put(&l, " model=");
            put_text_id(&l, f->model_id);
        }
        if (f->epoch)
            put(&l, " epoch=%llu", (unsigned long long)f->epoch);
        if (f->rebalance)
            put(&l, " balancedness=%.4f->%.4f%s moved=%llu slots/%llu bytes compute=%.2fms move=%.2fms",
                f->balancedness_before, f->balancedness_after, f->committed ? "" : " (not committed)",
                (unsigned long long)f->experts_moved, (unsigned long long)f->bytes_moved, f->compute_ms,
                f->move_ms);
        if (rec->client_gone)
            put(&l, " (client gone)");
        if (rec->message && rec->message[0]) {
            /* A message may quote client bytes: keep it on one line. */
            put(&l, ": ");
            for (const char *m = rec->message; *m && l.len < sizeof l.buf - 2; m++)
                l.buf[l.len++] = (*m == '\n' || *m == '\r') ? ' ' : *m;
            l.buf[l.len] = '\0';
        }
    }
    emit(&l, json);
}
