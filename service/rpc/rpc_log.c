/* rpc_log.c -- the log sink.  Each line is built in a local buffer and
 * written with one fwrite, which stdio locks per call, so lines from worker
 * threads logging at once stay whole; a line is at most RPC_LOG_LINE_MAX - 1
 * bytes with its newline (4095, under PIPE_BUF, so lines from processes
 * sharing a pipe do not interleave either).
 *
 * Building a line never produces a broken one, whatever the bytes it is
 * given (a model id or a message may quote a hostile client):
 *  - every fixed piece goes in whole or not at all (put);
 *  - a string goes in escaped, cut at a character boundary, and always
 *    closed (put_json_str); an escape sequence is never split;
 *  - TAIL bytes at the end are kept for what closes the line (in JSON
 *    `,"truncated":true}` and the newline), so the closing brace always
 *    fits and a cut line says it was cut.
 * JSON is valid and UTF-8 (bytes that are not UTF-8 become U+FFFD); a text
 * line holds no control byte, so it cannot be split or forge another line.
 *
 * Cost: one clock_gettime, a gmtime_r, a few snprintf and one fwrite per
 * line (docs/benchmarks.md has the numbers). */
#include "rpc_log.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Room kept at the end of a line for what closes it: in JSON
 * `,"truncated":true` (17) `}` `\n` NUL; in text " [truncated]" (12) `\n`
 * NUL. */
#define TAIL 24

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
bool rpc_log_enabled(rpc_log_level level) {
    return (int)level >= atomic_load_explicit(&log_level, memory_order_relaxed);
}

const char *rpc_status_name(int code) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return code >= 0 && code <= 16 ? names[code] : "UNKNOWN";
}

/* ---- escaping ------------------------------------------------------------ */

/* Length of the valid UTF-8 sequence at s (1-4), or 0 if it is not one
 * (overlong forms, surrogates and code points above U+10FFFF are not). */
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

size_t rpc_utf8_trim_tail(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    for (size_t back = 1; back <= 3 && back <= len; back++) {
        unsigned c = s[len - back];
        if ((c & 0xC0) == 0x80)
            continue; /* a continuation byte: look further back for its lead */
        if (c >= 0xC2 && c <= 0xF4 && utf8_len(s + len - back, back) == 0)
            return len - back; /* a lead byte whose sequence was cut */
        break;
    }
    return len;
}

/* Escape s[0, len) as a JSON string body into buf[at, cap - 1), NUL at the
 * end; stops before a piece that does not fit (never splits one).  Returns
 * the new length; *consumed: input bytes taken. */
static size_t json_escape(char *buf, size_t at, size_t cap, const char *str, size_t len, size_t *consumed) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    if (cap == 0 || at >= cap) {
        *consumed = 0;
        return at;
    }
    while (i < len) {
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
            /* U+2028/U+2029 are valid JSON but end a line for JavaScript
             * and some log viewers: escaped. */
            if (adv == 3 && c == 0xE2 && s[i + 1] == 0x80 && (s[i + 2] == 0xA8 || s[i + 2] == 0xA9)) {
                snprintf(esc, sizeof esc, "\\u%04x", s[i + 2] == 0xA8 ? 0x2028u : 0x2029u);
                piece = esc;
                plen = 6;
            }
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
    buf[at] = '\0';
    *consumed = i;
    return at;
}

size_t rpc_json_escape(char *buf, size_t at, size_t cap, const char *s, size_t len) {
    size_t consumed;
    return json_escape(buf, at, cap, s, len, &consumed);
}

typedef enum text_mode {
    TEXT_ID,     /* printable ASCII but space and backslash as is, the rest \xNN */
    TEXT_MSG,    /* UTF-8 and spaces as is; control bytes and non-UTF-8 \xNN */
    TEXT_QUOTED, /* TEXT_MSG, and '"' and '\\' backslashed (inside "...") */
} text_mode;

/* The text-line counterpart of json_escape: never writes a control byte,
 * so a hostile value cannot end the line. */
static size_t text_escape(char *buf, size_t at, size_t cap, const char *str, size_t len, text_mode mode,
                          size_t *consumed) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    if (cap == 0 || at >= cap) {
        *consumed = 0;
        return at;
    }
    while (i < len) {
        char esc[8];
        const char *piece = (const char *)s + i;
        size_t plen = 1, adv = 1;
        unsigned c = s[i];
        bool plain;
        if (mode == TEXT_ID) {
            plain = c > 0x20 && c < 0x7F && c != '\\';
        } else if (c >= 0x80) {
            plain = (adv = utf8_len(s + i, len - i)) != 0;
            plen = adv ? adv : 1;
            adv = plen;
        } else {
            plain = c >= 0x20 && c != 0x7F && !(mode == TEXT_QUOTED && (c == '"' || c == '\\'));
        }
        if (!plain) {
            if (mode == TEXT_QUOTED && (c == '"' || c == '\\')) {
                esc[0] = '\\';
                esc[1] = (char)c;
                plen = 2;
            } else {
                snprintf(esc, sizeof esc, "\\x%02x", c);
                plen = 4;
            }
            piece = esc;
            adv = 1;
        }
        if (at + plen >= cap)
            break;
        memcpy(buf + at, piece, plen);
        at += plen;
        i += adv;
    }
    buf[at] = '\0';
    *consumed = i;
    return at;
}

/* ---- line building ----------------------------------------------------- */

typedef struct line {
    char buf[RPC_LOG_LINE_MAX];
    size_t len;  /* invariant: len <= RPC_LOG_LINE_MAX - TAIL, buf[len] == '\0' */
    bool json;
    bool cut;    /* something did not fit: the line says "truncated" */
} line;

#define LINE_END (RPC_LOG_LINE_MAX - TAIL) /* where content must end */

/* Append formatted text whole, or nothing (and mark the line cut). */
static void put(line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(line *l, const char *fmt, ...) {
    size_t avail = LINE_END - l->len;
    va_list ap;
    va_start(ap, fmt);
    /* avail + 1: the NUL may go into the tail. */
    int n = vsnprintf(l->buf + l->len, avail + 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n > avail) {
        l->buf[l->len] = '\0';
        l->cut = true;
        return;
    }
    l->len += (size_t)n;
}

/* ,"key":"escaped s" -- cut at a character boundary if it does not all
 * fit, and always closed; nothing at all if not even the key fits. */
static void put_json_str(line *l, const char *key, const char *s, size_t len) {
    size_t before = l->len;
    put(l, ",\"%s\":\"", key);
    if (l->len == before || l->len + 1 > LINE_END) { /* key did not fit, or no room for the quote */
        l->len = before;
        l->buf[before] = '\0';
        l->cut = true;
        return;
    }
    size_t consumed;
    /* cap LINE_END: content ends at LINE_END - 1 at most, the quote fits. */
    l->len = json_escape(l->buf, l->len, LINE_END, s, len, &consumed);
    if (consumed < len)
        l->cut = true;
    l->buf[l->len++] = '"';
    l->buf[l->len] = '\0';
}

/* Text: s escaped by mode, cut at a character boundary. */
static void put_text(line *l, const char *s, size_t len, text_mode mode) {
    size_t consumed;
    l->len = text_escape(l->buf, l->len, LINE_END + 1, s, len, mode, &consumed);
    if (consumed < len)
        l->cut = true;
}

/* A number field: JSON has no NaN or infinity, so those are null. */
static void put_json_f(line *l, const char *key, double v, int prec) {
    if (isfinite(v))
        put(l, ",\"%s\":%.*f", key, prec, v);
    else
        put(l, ",\"%s\":null", key);
}

static void put_stamp(line *l, rpc_log_level level) {
    char stamp[32];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    if (l->json)
        put(l, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\"", stamp, ts.tv_nsec / 1000000, level_names[level]);
    else
        put(l, "%s.%03ldZ %s ", stamp, ts.tv_nsec / 1000000, level_names[level]);
}

static void line_start(line *l, rpc_log_level level) {
    l->len = 0;
    l->buf[0] = '\0';
    l->cut = false;
    l->json = atomic_load_explicit(&log_format, memory_order_relaxed) == RPC_LOG_JSON;
    put_stamp(l, level);
}

/* Close the line (in the room TAIL kept) and write it. */
static void emit(line *l) {
    const char *end = l->json ? (l->cut ? ",\"truncated\":true}\n" : "}\n") : (l->cut ? " [truncated]\n" : "\n");
    size_t n = strlen(end);
    memcpy(l->buf + l->len, end, n + 1);
    l->len += n;
    fwrite(l->buf, 1, l->len, stderr);
}

/* ---- entry points --------------------------------------------------------- */

void rpc_log(rpc_log_level level, const char *fmt, ...) {
    if (!rpc_log_enabled(level))
        return;
    char msg[RPC_LOG_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t len = n < 0 ? 0 : (size_t)n;
    bool cut = len >= sizeof msg;
    if (cut)
        len = rpc_utf8_trim_tail(msg, sizeof msg - 1);
    line l;
    line_start(&l, level);
    if (l.json)
        put_json_str(&l, "msg", msg, len);
    else
        put_text(&l, msg, len, TEXT_MSG);
    l.cut |= cut;
    emit(&l);
}

/* A text value: bare when it is a plain token, else "quoted". */
static void put_text_value(line *l, const char *s) {
    bool bare = *s != '\0';
    for (const char *p = s; *p && bare; p++)
        bare = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
               strchr("_.:/+-", *p) != NULL;
    if (bare) {
        put_text(l, s, strlen(s), TEXT_ID);
        return;
    }
    put(l, "\"");
    put_text(l, s, strlen(s), TEXT_QUOTED);
    put(l, "\"");
}

static void put_fields(line *l, const eplb_trace_field *f, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const char *k = f[i].key;
        switch (f[i].type) {
        case EPLB_TF_STR:
            if (l->json) {
                put_json_str(l, k, f[i].v.s ? f[i].v.s : "", f[i].v.s ? strlen(f[i].v.s) : 0);
            } else {
                put(l, " %s=", k);
                put_text_value(l, f[i].v.s ? f[i].v.s : "");
            }
            break;
        case EPLB_TF_U64:
            put(l, l->json ? ",\"%s\":%llu" : " %s=%llu", k, (unsigned long long)f[i].v.u);
            break;
        case EPLB_TF_I64:
            put(l, l->json ? ",\"%s\":%lld" : " %s=%lld", k, (long long)f[i].v.i);
            break;
        case EPLB_TF_F64:
            /* %.9g: a balancedness keeps its digits, a time its microseconds. */
            if (!l->json)
                put(l, " %s=%.9g", k, f[i].v.f);
            else if (isfinite(f[i].v.f))
                put(l, ",\"%s\":%.9g", k, f[i].v.f);
            else
                put(l, ",\"%s\":null", k);
            break;
        case EPLB_TF_BOOL:
            put(l, l->json ? ",\"%s\":%s" : " %s=%s", k, f[i].v.b ? "true" : "false");
            break;
        }
    }
}

void rpc_log_event(rpc_log_level level, const char *event, const char *model_id, const eplb_trace_field *fields,
                   size_t num_fields) {
    if (!rpc_log_enabled(level))
        return;
    line l;
    line_start(&l, level);
    if (l.json) {
        put_json_str(&l, "event", event, strlen(event));
        if (model_id)
            put_json_str(&l, "model_id", model_id, strlen(model_id));
    } else {
        put_text(&l, event, strlen(event), TEXT_ID);
        if (model_id) {
            put(&l, " model=");
            put_text(&l, model_id, strlen(model_id), TEXT_ID);
        }
    }
    put_fields(&l, fields, num_fields);
    emit(&l);
}

void rpc_log_trace(const char *event, const char *model_id, const eplb_trace_field *fields, size_t num_fields) {
    rpc_log_event(RPC_LOG_DEBUG, event, model_id, fields, num_fields);
}

/* RecordLoad's facts say an automatic rebalance committed, but not its
 * numbers (the registry does not report them): those are left out rather
 * than logged as zeros. */
static bool facts_have_numbers(const rpc_call_record *rec) { return strcmp(rec->method, "RecordLoad") != 0; }

void rpc_log_call(const rpc_call_record *rec) {
    rpc_log_level level = rec->code == 0 ? RPC_LOG_INFO : RPC_LOG_WARN;
    if (!rpc_log_enabled(level))
        return;
    const rpc_call_facts *f = rec->facts;
    const char *method = rec->method ? rec->method : "?";
    const char *message = rec->message ? rec->message : "";
    /* model_id is a fixed array: bounded even if a handler forgot the NUL. */
    size_t id_len = strnlen(f->model_id, sizeof f->model_id);
    bool numbers = f->rebalance && facts_have_numbers(rec);
    line l;
    line_start(&l, level);
    if (l.json) {
        /* Fixed fields first: method and model_id are bounded (127 and
         * 128 bytes, 6x escaped at worst), so status, code, duration and
         * the rebalance numbers always fit; only peer and message can be
         * cut. */
        put(&l, ",\"event\":\"call\"");
        put_json_str(&l, "method", method, strlen(method));
        if (id_len)
            put_json_str(&l, "model_id", f->model_id, id_len);
        put(&l, ",\"status\":\"%s\",\"code\":%d", rpc_status_name(rec->code), rec->code);
        put_json_f(&l, "duration_ms", rec->duration_ms, 3);
        if (rec->client_gone)
            put(&l, ",\"client_gone\":true");
        if (f->epoch)
            put(&l, ",\"epoch\":%llu", (unsigned long long)f->epoch);
        if (f->rebalance && !numbers)
            put(&l, ",\"auto_rebalance\":true,\"committed\":%s", f->committed ? "true" : "false");
        if (numbers) {
            put(&l, ",\"committed\":%s", f->committed ? "true" : "false");
            put_json_f(&l, "balancedness_before", f->balancedness_before, 6);
            put_json_f(&l, "balancedness_after", f->balancedness_after, 6);
            put(&l, ",\"experts_moved\":%llu,\"bytes_moved\":%llu", (unsigned long long)f->experts_moved,
                (unsigned long long)f->bytes_moved);
            put_json_f(&l, "compute_ms", f->compute_ms, 3);
            put_json_f(&l, "move_ms", f->move_ms, 3);
        }
        if (rec->peer)
            put_json_str(&l, "peer", rec->peer, strlen(rec->peer));
        if (message[0])
            put_json_str(&l, "message", message, strlen(message));
    } else {
        put_text(&l, method, strlen(method), TEXT_ID);
        put(&l, " %s %.2fms", rpc_status_name(rec->code), rec->duration_ms);
        if (id_len) {
            put(&l, " model=");
            put_text(&l, f->model_id, id_len, TEXT_ID);
        }
        if (f->epoch)
            put(&l, " epoch=%llu", (unsigned long long)f->epoch);
        if (f->rebalance && !numbers)
            put(&l, " auto-rebalance%s", f->committed ? "" : " (not committed)");
        if (numbers)
            put(&l, " balancedness=%.4f->%.4f%s moved=%llu slots/%llu bytes compute=%.2fms move=%.2fms",
                f->balancedness_before, f->balancedness_after, f->committed ? "" : " (not committed)",
                (unsigned long long)f->experts_moved, (unsigned long long)f->bytes_moved, f->compute_ms,
                f->move_ms);
        if (rec->client_gone)
            put(&l, " (client gone)");
        if (message[0]) {
            /* A message may quote client bytes: escaped, on one line. */
            put(&l, ": ");
            put_text(&l, message, strlen(message), TEXT_MSG);
        }
    }
    emit(&l);
}
