/* test_log.c -- the log sink (rpc_log.c): JSON escaping, line building and
 * truncation, the text form's one-line guarantee, levels, and the core's
 * trace hook.  Lines are captured by pointing fd 2 at a file and parsed
 * with a strict JSON parser (json_flat.h). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eplb_trace.h"
#include "json_flat.h"
#include "rpc_log.h"

/* ---- capturing stderr ------------------------------------------------------ */

typedef struct capture {
    int saved;
    char path[64];
} capture;

static void cap_begin(capture *c) {
    fflush(stderr);
    snprintf(c->path, sizeof c->path, "/tmp/eplb-test-log-XXXXXX");
    int fd = mkstemp(c->path);
    cr_assert_geq(fd, 0);
    c->saved = dup(2);
    cr_assert_geq(c->saved, 0);
    cr_assert_eq(dup2(fd, 2), 2);
    close(fd);
}

/* What was written since cap_begin (malloc'd, NUL-terminated). */
static char *cap_end(capture *c, size_t *len) {
    fflush(stderr);
    dup2(c->saved, 2);
    close(c->saved);
    FILE *f = fopen(c->path, "rb");
    cr_assert_not_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    unlink(c->path);
    *len = (size_t)n;
    return buf;
}

/* The output holds exactly one line: parse it into o (JSON mode). */
static void one_json_line(const char *out, size_t len, jf_object *o) {
    cr_assert_gt(len, 0, "nothing was logged");
    cr_assert_eq(out[len - 1], '\n', "the line does not end with a newline");
    cr_assert_eq(memchr(out, '\n', len), out + len - 1, "more than one line: %s", out);
    cr_assert_leq(len, RPC_LOG_LINE_MAX - 1, "line of %zu bytes", len);
    cr_assert_eq(jf_parse(out, len - 1, o), 0, "not JSON (%s): %.300s", o->error, out);
}

/* The decoded JSON string that rpc_json_escape makes of s (uncut). */
static char *decoded(const char *s, size_t len, size_t *out_len) {
    size_t cap = len * 6 + 32;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    memcpy(buf, "{\"k\":\"", 6);
    size_t at = rpc_json_escape(buf, 6, cap - 3, s, len);
    memcpy(buf + at, "\"}", 3);
    static jf_object o;
    cr_assert_eq(jf_parse(buf, at + 2, &o), 0, "%s: %s", o.error, buf);
    free(buf);
    const jf_field *f = jf_get(&o, "k");
    char *r = malloc(f->len + 1);
    memcpy(r, f->str, f->len + 1);
    *out_len = f->len;
    return r;
}

static void setup(void) {
    rpc_log_set_level(RPC_LOG_DEBUG);
    rpc_log_set_format(RPC_LOG_JSON);
    eplb_trace_set(NULL);
}

TestSuite(log, .init = setup);

/* ---- rpc_json_escape --------------------------------------------------------- */

Test(log, escape_table) {
    static const struct {
        const char *in;
        size_t len;
        const char *want;
    } cases[] = {
        { "plain", 5, "plain" },
        { "a\"b\\c", 5, "a\\\"b\\\\c" },
        { "\n\r\t", 3, "\\n\\r\\t" },
        { "\x01\x1f\x7f", 3, "\\u0001\\u001f\\u007f" },
        { "a\0b", 3, "a\\u0000b" },
        { "\xc3\xa9\xe2\x82\xac\xf0\x9d\x84\x9e", 9, "\xc3\xa9\xe2\x82\xac\xf0\x9d\x84\x9e" }, /* é € 𝄞 */
        { "\xff", 1, "\xef\xbf\xbd" },
        { "\xc0\x80", 2, "\xef\xbf\xbd\xef\xbf\xbd" },             /* overlong NUL */
        { "\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" }, /* a surrogate */
        { "\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" }, /* > U+10FFFF */
        { "x\xe2\x82", 3, "x\xef\xbf\xbd\xef\xbf\xbd" },            /* cut sequence at the end */
        { "\xe2\x80\xa8\xe2\x80\xa9", 6, "\\u2028\\u2029" },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char buf[128];
        size_t n = rpc_json_escape(buf, 0, sizeof buf, cases[k].in, cases[k].len);
        cr_assert_eq(n, strlen(cases[k].want), "case %zu: length %zu", k, n);
        cr_assert_str_eq(buf, cases[k].want, "case %zu", k);
    }
}

Test(log, escape_appends_and_respects_cap) {
    char buf[16] = "abc";
    cr_assert_eq(rpc_json_escape(buf, 3, sizeof buf, "\"x", 2), 6);
    cr_assert_str_eq(buf, "abc\\\"x");
    /* No room at all: nothing written, nothing moved. */
    memcpy(buf, "0123456789", 11);
    cr_assert_eq(rpc_json_escape(buf, 10, 10, "y", 1), 10);
    cr_assert_eq(rpc_json_escape(buf, 4, 0, "y", 1), 4);
    cr_assert_str_eq(buf, "0123456789");
    /* A piece that does not fit is left out whole: "\u0001" needs 6 + NUL. */
    cr_assert_eq(rpc_json_escape(buf, 0, 6, "\x01", 1), 0);
    cr_assert_str_eq(buf, "");
    cr_assert_eq(rpc_json_escape(buf, 0, 7, "\x01", 1), 6);
}

/* Every cap cuts at a piece boundary: the result is a prefix of the whole
 * escape, valid inside quotes, and no shorter than it must be. */
Test(log, escape_cut_never_splits) {
    const char in[] = "a\"\\\n\x01\xc3\xa9\xff\xe2\x82\xac\xe2\x80\xa8\xf0\x9d\x84\x9e\x7f" "b\xed\xa0\x80" "c";
    size_t len = sizeof in - 1;
    char full[256], buf[256], wrapped[300];
    size_t full_len = rpc_json_escape(full, 0, sizeof full, in, len);
    for (size_t cap = 1; cap <= full_len + 2; cap++) {
        memset(buf, 'Z', sizeof buf);
        size_t n = rpc_json_escape(buf, 0, cap, in, len);
        cr_assert_lt(n, cap, "cap %zu", cap);
        cr_assert_eq(buf[n], '\0', "cap %zu: not terminated", cap);
        cr_assert_eq(memcmp(buf, full, n), 0, "cap %zu: not a prefix", cap);
        if (n < full_len)
            cr_assert_geq(n + 7, cap, "cap %zu: stopped at %zu, early", cap, n);
        int w = snprintf(wrapped, sizeof wrapped, "{\"k\":\"%s\"}", buf);
        jf_object o;
        cr_assert_eq(jf_parse(wrapped, (size_t)w, &o), 0, "cap %zu: %s: %s", cap, o.error, wrapped);
    }
}

/* ---- whole lines --------------------------------------------------------------- */

/* Messages of every length around the line limit, of every kind of byte
 * (6-byte escapes, 3-byte replacements, multi-byte characters): each is
 * one valid JSON line, whole or cut with "truncated":true, and its msg is
 * a prefix of the whole message. */
Test(log, json_line_any_message) {
    static const char *const units[] = { "\x01", "\"", "\xff", "\xc3\xa9", "\xe2\x82\xac", "a",
                                         "\xe2\x80\xa8", "\x01\xc3\xa9\xff\"z" };
    for (size_t u = 0; u < sizeof units / sizeof units[0]; u++) {
        size_t ul = strlen(units[u]);
        for (size_t target = 500; target <= 4600; target += 137) {
            size_t reps = target / ul + 1;
            char *msg = malloc(reps * ul + 1);
            for (size_t i = 0; i < reps; i++)
                memcpy(msg + i * ul, units[u], ul);
            msg[reps * ul] = '\0';
            size_t want_len;
            char *want = decoded(msg, reps * ul, &want_len);
            capture c;
            cap_begin(&c);
            rpc_log(RPC_LOG_INFO, "%s", msg);
            size_t len;
            char *out = cap_end(&c, &len);
            static jf_object o;
            one_json_line(out, len, &o);
            cr_assert_str_eq(jf_str(&o, "level"), "info");
            cr_assert_not_null(jf_str(&o, "ts"));
            const jf_field *m = jf_get(&o, "msg");
            cr_assert(m && m->type == JF_STRING, "unit %zu x %zu: no msg", u, reps);
            const jf_field *t = jf_get(&o, "truncated");
            cr_assert_leq(m->len, want_len);
            cr_assert_eq(memcmp(m->str, want, m->len), 0, "unit %zu x %zu: msg is not a prefix", u, reps);
            if (m->len < want_len)
                cr_assert(t && t->type == JF_TRUE, "unit %zu x %zu: cut without \"truncated\"", u, reps);
            else
                cr_assert_null(t, "unit %zu x %zu: whole but \"truncated\"", u, reps);
            free(out);
            free(want);
            free(msg);
        }
    }
}

static rpc_call_facts hostile_facts(void) {
    rpc_call_facts f = { 0 };
    for (size_t i = 0; i < EPLB_MODEL_NAME_MAX; i++)
        f.model_id[i] = "\x01\"\n\xff"[i % 4];
    f.model_id[EPLB_MODEL_NAME_MAX] = '\0';
    return f;
}

/* The worst case of every bounded field at once: status, code, duration
 * and the rebalance numbers still fit, and the line is valid. */
Test(log, json_call_line_worst_case) {
    rpc_call_facts f = hostile_facts();
    f.rebalance = true;
    f.committed = true;
    f.balancedness_before = 0.5;
    f.balancedness_after = NAN;
    f.experts_moved = 17;
    f.bytes_moved = UINT64_MAX;
    f.compute_ms = INFINITY;
    f.epoch = 42;
    char method[128], message[EPLB_ERROR_MSG_MAX], peer[600];
    memset(method, 0x01, sizeof method - 1);
    method[sizeof method - 1] = '\0';
    memset(message, 0x02, sizeof message - 1);
    message[sizeof message - 1] = '\0';
    memset(peer, '"', sizeof peer - 1);
    peer[sizeof peer - 1] = '\0';
    rpc_call_record rec = { .method = method, .code = 3, .message = message, .duration_ms = 1.25,
                            .client_gone = true, .peer = peer, .facts = &f };
    capture c;
    cap_begin(&c);
    rpc_log_call(&rec);
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    bool ok;
    cr_assert_str_eq(jf_str(&o, "level"), "warn");
    cr_assert_str_eq(jf_str(&o, "event"), "call");
    cr_assert_str_eq(jf_str(&o, "status"), "INVALID_ARGUMENT");
    cr_assert_eq(jf_num(&o, "code", &ok), 3);
    cr_assert(ok);
    cr_assert_float_eq(jf_num(&o, "duration_ms", &ok), 1.25, 1e-9);
    cr_assert(ok);
    cr_assert_eq(jf_get(&o, "client_gone")->type, JF_TRUE);
    cr_assert_eq(jf_num(&o, "epoch", &ok), 42);
    cr_assert_float_eq(jf_num(&o, "balancedness_before", &ok), 0.5, 1e-9);
    cr_assert_eq(jf_get(&o, "balancedness_after")->type, JF_NULL, "NaN is null");
    cr_assert_eq(jf_get(&o, "compute_ms")->type, JF_NULL, "infinity is null");
    cr_assert_str_eq(jf_get(&o, "bytes_moved")->raw, "18446744073709551615");
    cr_assert_eq(jf_num(&o, "experts_moved", &ok), 17);
    /* The model id, byte for byte (0xff as U+FFFD). */
    size_t want_len;
    char *want = decoded(f.model_id, EPLB_MODEL_NAME_MAX, &want_len);
    const jf_field *id = jf_get(&o, "model_id");
    cr_assert(id && id->len == want_len && memcmp(id->str, want, want_len) == 0, "model_id differs");
    cr_assert_eq(jf_get(&o, "method")->len, sizeof method - 1);
    /* 127 + 128 + 512 + 599 bytes, mostly 6-byte escapes: cut, and says so. */
    cr_assert_eq(jf_get(&o, "truncated")->type, JF_TRUE);
    free(want);
    free(out);
}

Test(log, json_call_line_ok_rebalance) {
    rpc_call_facts f = { 0 };
    strcpy(f.model_id, "kimi-k2.5");
    f.rebalance = true;
    f.committed = true;
    f.balancedness_before = 0.61;
    f.balancedness_after = 0.93;
    f.experts_moved = 5;
    f.bytes_moved = 4096;
    f.epoch = 3;
    rpc_call_record rec = { .method = "Rebalance", .code = 0, .message = "", .duration_ms = 0.5,
                            .peer = "ipv4:127.0.0.1:5000", .facts = &f };
    capture c;
    cap_begin(&c);
    rpc_log_call(&rec);
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    bool ok;
    cr_assert_str_eq(jf_str(&o, "level"), "info");
    cr_assert_str_eq(jf_str(&o, "method"), "Rebalance");
    cr_assert_str_eq(jf_str(&o, "model_id"), "kimi-k2.5");
    cr_assert_str_eq(jf_str(&o, "status"), "OK");
    cr_assert_str_eq(jf_str(&o, "peer"), "ipv4:127.0.0.1:5000");
    cr_assert_eq(jf_get(&o, "committed")->type, JF_TRUE);
    cr_assert_float_eq(jf_num(&o, "balancedness_after", &ok), 0.93, 1e-9);
    cr_assert_eq(jf_num(&o, "bytes_moved", &ok), 4096);
    cr_assert_null(jf_get(&o, "message"), "no message when OK");
    cr_assert_null(jf_get(&o, "truncated"));
    cr_assert_null(jf_get(&o, "client_gone"));
    free(out);
}

/* RecordLoad's automatic rebalance: committed, without numbers it does not have. */
Test(log, json_call_line_auto_rebalance) {
    rpc_call_facts f = { 0 };
    strcpy(f.model_id, "m");
    f.rebalance = true;
    f.committed = true;
    f.epoch = 1;
    rpc_call_record rec = { .method = "RecordLoad", .code = 0, .message = "", .facts = &f };
    capture c;
    cap_begin(&c);
    rpc_log_call(&rec);
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    cr_assert_eq(jf_get(&o, "auto_rebalance")->type, JF_TRUE);
    cr_assert_eq(jf_get(&o, "committed")->type, JF_TRUE);
    cr_assert_null(jf_get(&o, "balancedness_before"));
    cr_assert_null(jf_get(&o, "bytes_moved"));
    free(out);
}

/* Text: a hostile model id or message cannot end the line or forge one. */
Test(log, text_call_line_is_one_line) {
    rpc_log_set_format(RPC_LOG_TEXT);
    rpc_call_facts f = { 0 };
    strcpy(f.model_id, "m\n2026-12-01T00:00:00.000Z info Forged OK \x1b[2J\xff");
    rpc_call_record rec = { .method = "GetPlacement", .code = 5,
                            .message = "model 'm\n2026-12-01T00:00:00.000Z info x' \r\x1b[2J\xff\xc3\xa9 not found",
                            .duration_ms = 0.1, .facts = &f };
    capture c;
    cap_begin(&c);
    rpc_log_call(&rec);
    rpc_log(RPC_LOG_WARN, "free text\nwith a newline\x7f");
    size_t len;
    char *out = cap_end(&c, &len);
    int lines = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)out[i];
        if (ch == '\n')
            lines++;
        else
            cr_assert(ch >= 0x20 && ch != 0x7f, "control byte 0x%02x at %zu: %s", ch, i, out);
    }
    cr_assert_eq(lines, 2, "%s", out);
    cr_assert_not_null(strstr(out, " warn GetPlacement NOT_FOUND "), "%s", out);
    cr_assert_not_null(strstr(out, "model=m\\x0a2026-12-01T00:00:00.000Z\\x20info"), "%s", out);
    cr_assert_not_null(strstr(out, "\xc3\xa9 not found"), "UTF-8 kept in messages: %s", out);
    cr_assert_not_null(strstr(out, "\\xff"), "%s", out);
    cr_assert_not_null(strstr(out, "free text\\x0awith a newline\\x7f\n"), "%s", out);
    free(out);
}

Test(log, text_long_message_cut) {
    rpc_log_set_format(RPC_LOG_TEXT);
    char *msg = malloc(6001);
    for (size_t i = 0; i < 6000; i += 2)
        memcpy(msg + i, "\xc3\xa9", 2);
    msg[6000] = '\0';
    capture c;
    cap_begin(&c);
    rpc_log(RPC_LOG_ERROR, "%s", msg);
    size_t len;
    char *out = cap_end(&c, &len);
    cr_assert_leq(len, RPC_LOG_LINE_MAX - 1);
    cr_assert_eq(memchr(out, '\n', len), out + len - 1);
    cr_assert_not_null(strstr(out, "\xc3\xa9 [truncated]\n"), "cut at a character boundary: %s", out + len - 40);
    cr_assert_null(strstr(out, "\\x"), "a cut character is not escaped");
    free(out);
    free(msg);
}

Test(log, event_fields) {
    eplb_trace_field f[] = {
        EPLB_TF_S("phase", "gather"),
        EPLB_TF_S("reason", "two words \"quoted\"\n"),
        EPLB_TF_U("layer", 7),
        EPLB_TF_I("delta", -3),
        EPLB_TF_F("ms", 1.5),
        EPLB_TF_F("nan", NAN),
        EPLB_TF_B("retried", true),
        EPLB_TF_S("empty", ""),
    };
    capture c;
    cap_begin(&c);
    rpc_log_event(RPC_LOG_DEBUG, "move_layer", "m\"1", f, EPLB_TRACE_N(f));
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    bool ok;
    cr_assert_str_eq(jf_str(&o, "level"), "debug");
    cr_assert_str_eq(jf_str(&o, "event"), "move_layer");
    cr_assert_str_eq(jf_str(&o, "model_id"), "m\"1");
    cr_assert_str_eq(jf_str(&o, "phase"), "gather");
    cr_assert_str_eq(jf_str(&o, "reason"), "two words \"quoted\"\n");
    cr_assert_eq(jf_num(&o, "layer", &ok), 7);
    cr_assert_eq(jf_num(&o, "delta", &ok), -3);
    cr_assert_float_eq(jf_num(&o, "ms", &ok), 1.5, 1e-9);
    cr_assert_eq(jf_get(&o, "nan")->type, JF_NULL);
    cr_assert_eq(jf_get(&o, "retried")->type, JF_TRUE);
    cr_assert_str_eq(jf_str(&o, "empty"), "");
    free(out);

    rpc_log_set_format(RPC_LOG_TEXT);
    cap_begin(&c);
    rpc_log_event(RPC_LOG_DEBUG, "move_layer", "m\"1", f, EPLB_TRACE_N(f));
    out = cap_end(&c, &len);
    cr_assert_not_null(strstr(out, " debug move_layer model=m\"1 phase=gather reason=\"two words \\\"quoted\\\"\\x0a\" "
                                   "layer=7 delta=-3 ms=1.5 nan=nan retried=true empty=\"\"\n"),
                       "%s", out);
    free(out);
}

/* Fields after the line is full: each left out whole (a number is never
 * half written, a string never left open), whatever room was left. */
Test(log, event_overflow_any_room) {
    char *big = malloc(4200);
    memset(big, 'a', 4199);
    big[4199] = '\0';
    char esc[64];
    memset(esc, 0x01, sizeof esc - 1);
    esc[sizeof esc - 1] = '\0';
    for (size_t k = 3900; k <= 4100; k++) {
        big[k] = '\0';
        eplb_trace_field f[] = {
            /* "first" leaves every room from none to ~200 bytes for
             * "count" and the rest, "second" fills what is left. */
            EPLB_TF_S("first", big),
            EPLB_TF_U("count", UINT64_MAX),
            EPLB_TF_I("neg", INT64_MIN),
            EPLB_TF_F("ms", 123456.789),
            EPLB_TF_B("flag", false),
            EPLB_TF_S("second", esc),
            EPLB_TF_S("third", "x"),
        };
        for (int fmt = 0; fmt < 2; fmt++) {
            rpc_log_set_format(fmt ? RPC_LOG_JSON : RPC_LOG_TEXT);
            capture c;
            cap_begin(&c);
            rpc_log_event(RPC_LOG_INFO, "overflow", "m", f, EPLB_TRACE_N(f));
            size_t len;
            char *out = cap_end(&c, &len);
            cr_assert_leq(len, RPC_LOG_LINE_MAX - 1, "k %zu: %zu bytes", k, len);
            cr_assert_eq(memchr(out, '\n', len), out + len - 1, "k %zu: not one line", k);
            if (fmt) {
                static jf_object o;
                one_json_line(out, len, &o);
                cr_assert_eq(jf_get(&o, "truncated")->type, JF_TRUE, "k %zu", k);
                const jf_field *ms = jf_get(&o, "ms");
                if (ms)
                    cr_assert_str_eq(ms->raw, "123456.789", "k %zu: a number cut", k);
                const jf_field *cnt = jf_get(&o, "count");
                if (cnt)
                    cr_assert_str_eq(cnt->raw, "18446744073709551615", "k %zu: a number cut", k);
                const jf_field *neg = jf_get(&o, "neg");
                if (neg)
                    cr_assert_str_eq(neg->raw, "-9223372036854775808", "k %zu: a number cut", k);
            } else {
                cr_assert_eq(memcmp(out + len - 13, " [truncated]\n", 13), 0, "k %zu: %s", k, out + len - 40);
            }
            free(out);
        }
        big[k] = 'a';
    }
    free(big);
}

Test(log, levels) {
    rpc_call_facts f = { 0 };
    rpc_call_record ok_rec = { .method = "Health", .code = 0, .message = "", .facts = &f };
    rpc_call_record bad_rec = { .method = "Health", .code = 14, .message = "draining", .facts = &f };
    rpc_log_set_level(RPC_LOG_WARN);
    cr_assert_not(rpc_log_enabled(RPC_LOG_INFO));
    cr_assert(rpc_log_enabled(RPC_LOG_ERROR));
    capture c;
    cap_begin(&c);
    rpc_log_call(&ok_rec);
    rpc_log(RPC_LOG_INFO, "not shown");
    rpc_log_trace("move_state", "m", NULL, 0);
    rpc_log_call(&bad_rec);
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    cr_assert_str_eq(jf_str(&o, "status"), "UNAVAILABLE");
    cr_assert_str_eq(jf_str(&o, "message"), "draining");
    free(out);
}

Test(log, trace_hook) {
    eplb_trace_field f[] = { EPLB_TF_S("from", "IDLE"), EPLB_TF_S("to", "STAGED") };
    cr_assert_not(eplb_trace_on(), "off by default");
    capture c;
    cap_begin(&c);
    eplb_trace("move_state", "m", f, 2); /* no hook: nothing */
    eplb_trace_set(rpc_log_trace);
    cr_assert(eplb_trace_on());
    eplb_trace("move_state", "m", f, 2);
    eplb_trace_set(NULL);
    cr_assert_not(eplb_trace_on());
    eplb_trace("move_state", "m", f, 2);
    size_t len;
    char *out = cap_end(&c, &len);
    static jf_object o;
    one_json_line(out, len, &o);
    cr_assert_str_eq(jf_str(&o, "event"), "move_state");
    cr_assert_str_eq(jf_str(&o, "from"), "IDLE");
    cr_assert_str_eq(jf_str(&o, "to"), "STAGED");
    free(out);
}

Test(log, parse_names) {
    cr_assert_eq(rpc_log_format_parse("text"), RPC_LOG_TEXT);
    cr_assert_eq(rpc_log_format_parse("json"), RPC_LOG_JSON);
    cr_assert_eq(rpc_log_format_parse("yaml"), -1);
    cr_assert_eq(rpc_log_format_parse("JSON"), -1);
    cr_assert_eq(rpc_log_format_parse(""), -1);
    cr_assert_eq(rpc_log_level_parse("debug"), RPC_LOG_DEBUG);
    cr_assert_eq(rpc_log_level_parse("trace"), -1);
    cr_assert_str_eq(rpc_status_name(16), "UNAUTHENTICATED");
    cr_assert_str_eq(rpc_status_name(17), "UNKNOWN");
    cr_assert_str_eq(rpc_status_name(-1), "UNKNOWN");
}

/* The parser this file trusts refuses what it should (else the tests
 * above could pass on broken lines). */
Test(log, parser_is_strict) {
    static const char *const bad[] = {
        "{\"a\":\"x\ny\"}", "{\"a\":\"\\x41\"}", "{\"a\":\"\xff\"}", "{\"a\":\"\\ud800\"}", "{\"a\":01}",
        "{\"a\":1,}", "{\"a\":1}x", "{\"a\":1,\"a\":2}", "{\"a\":\"unterminated}", "{\"a\":[1]}",
        "{\"a\":nul}", "{\"a\":1.}", "{\"a\":\"\xc0\x80\"}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        jf_object o;
        cr_assert_neq(jf_parse(bad[i], strlen(bad[i]), &o), 0, "accepted %s", bad[i]);
    }
    jf_object o;
    const char *good = " {\"a\":\"\\ud834\\udd1e\\u00e9\\/\",\"b\":-0.5e+3,\"c\":null,\"d\":false} ";
    cr_assert_eq(jf_parse(good, strlen(good), &o), 0, "%s", o.error);
    cr_assert_str_eq(jf_str(&o, "a"), "\xf0\x9d\x84\x9e\xc3\xa9/");
}
