/* test_metrics.c -- --metrics-listen: /metrics scraped over a real TCP
 * connection from this (separate) process, parsed strictly as the text
 * exposition format 0.0.4, checked against what the gRPC calls did; the
 * responder's answers to bad requests and to slow or idle clients; off by
 * default; a bad address refuses the start. */
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include "eplbd_harness.h"
#include "../../service/rpc/rpc_metrics.h" /* the label escaper (header-only) */

/* ---- a plain HTTP client ---------------------------------------------------- */

typedef struct http_target {
    int family;
    char host[64];
    int port;
} http_target;

static int http_connect(const http_target *t) {
    int fd = socket(t->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    struct timeval tv = { .tv_sec = harness_slow() ? 60 : 10 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc;
    if (t->family == AF_INET6) {
        struct sockaddr_in6 sa = { .sin6_family = AF_INET6, .sin6_port = htons((uint16_t)t->port) };
        cr_assert_eq(inet_pton(AF_INET6, t->host, &sa.sin6_addr), 1);
        rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    } else {
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)t->port) };
        cr_assert_eq(inet_pton(AF_INET, t->host, &sa.sin_addr), 1);
        rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    }
    cr_assert_eq(rc, 0, "connect %s:%d: %s", t->host, t->port, strerror(errno));
    return fd;
}

typedef struct http_answer {
    int status;
    char *head;         /* status line and headers (malloc'd) */
    char *body;         /* malloc'd, NUL-terminated */
    size_t body_len;
    long content_length; /* -1 when absent */
} http_answer;

static void http_answer_free(http_answer *a) {
    free(a->head);
    free(a->body);
    memset(a, 0, sizeof *a);
}

/* Send raw bytes, read the answer to EOF, split it. */
static http_answer http_raw(const http_target *t, const char *req, size_t req_len) {
    int fd = http_connect(t);
    for (size_t off = 0; off < req_len;) {
        ssize_t n = send(fd, req + off, req_len - off, MSG_NOSIGNAL);
        cr_assert_gt(n, 0, "send: %s", strerror(errno));
        off += (size_t)n;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    for (;;) {
        if (len + 4096 > cap)
            cr_assert_not_null(buf = realloc(buf, cap *= 2));
        ssize_t n = recv(fd, buf + len, cap - len - 1, 0);
        cr_assert_geq(n, 0, "recv: %s", strerror(errno));
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    http_answer a = { .content_length = -1 };
    char *end = strstr(buf, "\r\n\r\n");
    cr_assert_not_null(end, "no header end in %zu bytes: %.200s", len, buf);
    size_t hl = (size_t)(end - buf);
    a.head = strndup(buf, hl);
    a.body_len = len - hl - 4;
    a.body = malloc(a.body_len + 1);
    memcpy(a.body, end + 4, a.body_len);
    a.body[a.body_len] = '\0';
    free(buf);
    cr_assert_eq(sscanf(a.head, "HTTP/1.1 %d", &a.status), 1, "status line: %.80s", a.head);
    const char *cl = strstr(a.head, "\r\nContent-Length:");
    if (cl)
        a.content_length = strtol(cl + 17, NULL, 10);
    return a;
}

static http_answer http_request(const http_target *t, const char *method, const char *path) {
    char req[512];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: x\r\nUser-Agent: test_metrics\r\n\r\n", method, path);
    return http_raw(t, req, (size_t)n);
}

/* ---- a strict exposition parser --------------------------------------------- */

typedef struct sample {
    char name[128];
    char labels[512]; /* as written between the braces ("" for none) */
    double value;
} sample;

typedef struct family_type {
    char name[128];
    char type[16];
    int samples;
} family_type;

typedef struct scrape {
    sample *s;
    size_t n;
    family_type f[128];
    size_t nf;
} scrape;

static int name_ok(const char *p, size_t n, int colon_ok) {
    if (n == 0 || isdigit((unsigned char)p[0]))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)p[i]) || p[i] == '_' || (colon_ok && p[i] == ':')))
            return 0;
    return 1;
}

static family_type *family_of(scrape *sc, const char *name) {
    for (size_t i = 0; i < sc->nf; i++)
        if (strcmp(sc->f[i].name, name) == 0)
            return &sc->f[i];
    return NULL;
}

static double parse_value(const char *v, size_t line) {
    if (strcmp(v, "+Inf") == 0)
        return INFINITY;
    if (strcmp(v, "-Inf") == 0)
        return -INFINITY;
    if (strcmp(v, "NaN") == 0)
        return NAN;
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    cr_assert(end != v && *end == '\0' && errno == 0, "line %zu: bad value '%s'", line, v);
    cr_assert(!isinf(d) && !isnan(d), "line %zu: spell non-finite values +Inf/-Inf/NaN, got '%s'", line, v);
    return d;
}

/* Parse body (the whole exposition); every problem fails the test. */
static scrape parse_exposition(const char *body) {
    scrape sc = { 0 };
    size_t cap = 1024;
    sc.s = calloc(cap, sizeof *sc.s);
    size_t len = strlen(body);
    cr_assert_gt(len, 0);
    cr_assert_eq(body[len - 1], '\n', "the exposition must end with a newline");
    size_t lineno = 0;
    for (const char *p = body; *p; lineno++) {
        const char *nl = strchr(p, '\n');
        size_t n = (size_t)(nl - p);
        char line[2048];
        cr_assert_lt(n, sizeof line, "line %zu too long", lineno);
        memcpy(line, p, n);
        line[n] = '\0';
        p = nl + 1;
        cr_assert_gt(n, 0, "line %zu is empty", lineno);
        if (line[0] == '#') {
            char kw[8], fname[128], rest[1024] = "";
            if (sscanf(line, "# %7s %127s %1023[^\n]", kw, fname, rest) >= 2 &&
                (strcmp(kw, "HELP") == 0 || strcmp(kw, "TYPE") == 0)) {
                cr_assert(name_ok(fname, strlen(fname), 1), "line %zu: bad family name %s", lineno, fname);
                if (strcmp(kw, "TYPE") == 0) {
                    cr_assert(strcmp(rest, "counter") == 0 || strcmp(rest, "gauge") == 0 ||
                                  strcmp(rest, "histogram") == 0 || strcmp(rest, "summary") == 0 ||
                                  strcmp(rest, "untyped") == 0, "line %zu: type '%s'", lineno, rest);
                    cr_assert_null(family_of(&sc, fname), "line %zu: second TYPE for %s", lineno, fname);
                    cr_assert_lt(sc.nf, 128);
                    snprintf(sc.f[sc.nf].name, sizeof sc.f[0].name, "%s", fname);
                    snprintf(sc.f[sc.nf++].type, sizeof sc.f[0].type, "%s", rest);
                } else {
                    cr_assert_gt(strlen(rest), 0, "line %zu: HELP without text", lineno);
                }
            }
            continue; /* any other comment */
        }
        /* name{labels} value */
        sample sm = { 0 };
        size_t nn = strcspn(line, "{ ");
        cr_assert(name_ok(line, nn, 1), "line %zu: bad metric name: %s", lineno, line);
        cr_assert_lt(nn, sizeof sm.name);
        memcpy(sm.name, line, nn);
        const char *q = line + nn;
        if (*q == '{') {
            const char *l0 = ++q;
            while (*q != '}') {
                size_t ln = strcspn(q, "=");
                cr_assert(name_ok(q, ln, 0), "line %zu: bad label name", lineno);
                q += ln;
                cr_assert_eq(q[0], '=', "line %zu", lineno);
                cr_assert_eq(q[1], '"', "line %zu: label value not quoted", lineno);
                q += 2;
                while (*q != '"') {
                    cr_assert_neq(*q, '\0', "line %zu: unterminated label value", lineno);
                    if (*q == '\\') {
                        cr_assert(q[1] == '\\' || q[1] == '"' || q[1] == 'n', "line %zu: bad escape \\%c", lineno,
                                  q[1]);
                        q++;
                    }
                    q++;
                }
                q++;
                cr_assert(*q == ',' || *q == '}', "line %zu: after a label: '%c'", lineno, *q);
                if (*q == ',')
                    q++;
            }
            cr_assert_lt((size_t)(q - l0), sizeof sm.labels);
            memcpy(sm.labels, l0, (size_t)(q - l0));
            q++;
        }
        cr_assert_eq(*q, ' ', "line %zu: no value", lineno);
        sm.value = parse_value(q + 1, lineno);
        /* Its family has a TYPE, given before it. */
        family_type *f = family_of(&sc, sm.name);
        if (!f) {
            char base[128];
            snprintf(base, sizeof base, "%s", sm.name);
            char *suffix = strrchr(base, '_');
            if (suffix && (!strcmp(suffix, "_bucket") || !strcmp(suffix, "_sum") || !strcmp(suffix, "_count"))) {
                *suffix = '\0';
                f = family_of(&sc, base);
                cr_assert(f && (!strcmp(f->type, "histogram") || (!strcmp(f->type, "summary") &&
                                                                 strcmp(suffix + 1, "bucket") != 0)),
                          "line %zu: %s has no histogram family", lineno, sm.name);
            }
        }
        cr_assert_not_null(f, "line %zu: sample %s has no TYPE line before it", lineno, sm.name);
        f->samples++;
        for (size_t i = 0; i < sc.n; i++)
            cr_assert(strcmp(sc.s[i].name, sm.name) || strcmp(sc.s[i].labels, sm.labels),
                      "line %zu: duplicate series %s{%s}", lineno, sm.name, sm.labels);
        if (sc.n == cap)
            cr_assert_not_null(sc.s = realloc(sc.s, (cap *= 2) * sizeof *sc.s));
        sc.s[sc.n++] = sm;
    }
    return sc;
}

static void scrape_free(scrape *sc) { free(sc->s); }

/* The value of name{labels}, or NAN when the series is absent. */
static double val(const scrape *sc, const char *name, const char *labels) {
    for (size_t i = 0; i < sc->n; i++)
        if (!strcmp(sc->s[i].name, name) && !strcmp(sc->s[i].labels, labels))
            return sc->s[i].value;
    return NAN;
}

/* Every histogram: buckets in ascending le, cumulative counts that never
 * decrease, +Inf == _count, _sum >= 0 and > 0 once something was counted. */
static int check_histograms(const scrape *sc) {
    int checked = 0;
    for (size_t f = 0; f < sc->nf; f++) {
        if (strcmp(sc->f[f].type, "histogram"))
            continue;
        char bname[160], cname[160], sname[160];
        snprintf(bname, sizeof bname, "%s_bucket", sc->f[f].name);
        snprintf(cname, sizeof cname, "%s_count", sc->f[f].name);
        snprintf(sname, sizeof sname, "%s_sum", sc->f[f].name);
        for (size_t i = 0; i < sc->n; i++) {
            if (strcmp(sc->s[i].name, cname))
                continue;
            const char *series = sc->s[i].labels; /* method="..." */
            double count = sc->s[i].value, sum = val(sc, sname, series), last_le = -INFINITY, last = 0;
            int buckets = 0, inf = 0;
            size_t sl = strlen(series);
            for (size_t k = 0; k < sc->n; k++) {
                const sample *b = &sc->s[k];
                if (strcmp(b->name, bname) || strncmp(b->labels, series, sl) || strncmp(b->labels + sl, ",le=\"", 5))
                    continue;
                double le = strcmp(b->labels + sl + 5, "+Inf\"") == 0 ? INFINITY : strtod(b->labels + sl + 5, NULL);
                cr_assert_gt(le, last_le, "%s{%s}: le out of order", bname, b->labels);
                cr_assert_geq(b->value, last, "%s{%s}: bucket decreases", bname, b->labels);
                last_le = le;
                last = b->value;
                inf += isinf(le);
                buckets++;
            }
            cr_assert_gt(buckets, 1, "%s{%s}: no buckets", sc->f[f].name, series);
            cr_assert_eq(inf, 1, "%s{%s}: no +Inf bucket", sc->f[f].name, series);
            cr_assert(isinf(last_le), "%s{%s}: +Inf is not the last bucket", sc->f[f].name, series);
            cr_assert_eq(last, count, "%s{%s}: +Inf %g != _count %g", sc->f[f].name, series, last, count);
            cr_assert(!isnan(sum) && sum >= 0, "%s{%s}: _sum %g", sc->f[f].name, series, sum);
            if (count > 0)
                cr_assert_gt(sum, 0, "%s{%s}: %g calls took no time", sc->f[f].name, series, count);
            checked++;
        }
    }
    return checked;
}

/* ---- the server ------------------------------------------------------------- */

static eplbd_proc srv;
static eplb_client *client;
static http_target metrics;

/* Where the startup log says the metrics are ("metrics on http://H:P/metrics"). */
static http_target metrics_target(const eplbd_proc *p) {
    cr_assert(eplbd_wait_log(p, "metrics on http://", 5000), "no metrics line in the log");
    static char log[1 << 16];
    const char *at = strstr(eplbd_log(p, log, sizeof log), "metrics on http://") + 18;
    http_target t = { .family = AF_INET };
    if (*at == '[') {
        t.family = AF_INET6;
        cr_assert_eq(sscanf(at, "[%63[^]]]:%d/metrics", t.host, &t.port), 2, "%.80s", at);
    } else {
        cr_assert_eq(sscanf(at, "%63[^:]:%d/metrics", t.host, &t.port), 2, "%.80s", at);
    }
    cr_assert_gt(t.port, 0);
    return t;
}

static void start_with(const char *listen) {
    memset(&srv, 0, sizeof srv);
    srv.extra[0] = "--metrics-listen";
    srv.extra[1] = listen;
    eplbd_suite_start(&srv, &client);
    metrics = metrics_target(&srv);
}

static void setup(void) { start_with("127.0.0.1:0"); }
static void teardown(void) { eplbd_suite_stop(&srv, client); }

static scrape scrape_now(void) {
    http_answer a = http_request(&metrics, "GET", "/metrics");
    cr_assert_eq(a.status, 200, "%s", a.head);
    cr_assert_not_null(strstr(a.head, "Content-Type: text/plain; version=0.0.4; charset=utf-8"), "%s", a.head);
    cr_assert_eq(a.content_length, (long)a.body_len);
    scrape sc = parse_exposition(a.body);
    http_answer_free(&a);
    cr_assert_gt(check_histograms(&sc), 0);
    return sc;
}

/* A call's counters move on the server's CQ thread just after its status
 * was sent, so a client that scrapes at once can be a moment early: wait
 * (bounded) until name{labels} reaches want.  The caller then asserts the
 * exact value on a fresh scrape, so overshooting still fails. */
static void settle(const char *name, const char *labels, double want) {
    int limit_ms = harness_slow() ? 30000 : 3000;
    for (double t0 = harness_now_ms(); harness_now_ms() - t0 < limit_ms; usleep(5000)) {
        scrape sc = scrape_now();
        double v = val(&sc, name, labels);
        scrape_free(&sc);
        if (v >= want)
            return;
    }
}

static int call(const char *method, const char *bytes, size_t len, upb_Arena *a, char **body, size_t *blen) {
    return harness_rpc(client, method, bytes, len, a, body, blen, NULL, 0);
}

static int get_placement(upb_Arena *a, const char *id) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    return call("GetPlacement", bytes, len, a, NULL, NULL);
}

static void register_model(upb_Arena *a, const char *name) {
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(harness_moe_request(a, name, 2, 4, 6, 2), a, &len);
    cr_assert_eq(call("RegisterModel", bytes, len, a, NULL, NULL), 0);
}

static const int64_t load[12] = { 90, 132, 40, 61, 0, 0, 20, 107, 104, 64, 0, 0 };

TestSuite(metrics, .init = setup, .fini = teardown, .timeout = 120);

Test(metrics, counters_and_histograms_move_with_calls) {
    scrape before = scrape_now();
    upb_Arena *a = upb_Arena_New();
    for (int i = 0; i < 3; i++)
        cr_assert_eq(get_placement(a, "no-such-model"), 5 /* NOT_FOUND */);
    /* A path the server does not know counts as method="unknown". */
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(client, "/eplb.v1.ExpertBalancer/NoSuchMethod", "", 0, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 12 /* UNIMPLEMENTED */);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    const char *nf = "method=\"GetPlacement\",code=\"NOT_FOUND\"";
    settle("eplbd_rpc_calls_total", nf, 3);
    settle("eplbd_rpc_calls_total", "method=\"unknown\",code=\"UNIMPLEMENTED\"", 1);
    settle("eplbd_rpc_duration_seconds_count", "method=\"GetPlacement\"",
           val(&before, "eplbd_rpc_duration_seconds_count", "method=\"GetPlacement\"") + 3);
    scrape after = scrape_now();
    double b = val(&before, "eplbd_rpc_calls_total", nf);
    cr_assert_eq(isnan(b) ? 0 : b, 0);
    cr_assert_eq(val(&after, "eplbd_rpc_calls_total", nf), 3);
    cr_assert_eq(val(&after, "eplbd_rpc_calls_total", "method=\"unknown\",code=\"UNIMPLEMENTED\""), 1);
    cr_assert_eq(val(&after, "eplbd_rpc_duration_seconds_count", "method=\"GetPlacement\"") -
                     val(&before, "eplbd_rpc_duration_seconds_count", "method=\"GetPlacement\""), 3);
    cr_assert_gt(val(&after, "eplbd_rpc_duration_seconds_sum", "method=\"GetPlacement\""), 0);
    /* Nothing else moved. */
    cr_assert_eq(val(&after, "eplbd_rpc_calls_total", "method=\"Rebalance\",code=\"OK\""), 0);
    cr_assert_eq(val(&after, "eplbd_up", ""), 1);
    cr_assert_eq(val(&after, "eplbd_serving", ""), 1);
    cr_assert_eq(val(&after, "eplbd_models", ""), 0);
    cr_assert_gt(val(&after, "eplbd_start_time_seconds", ""), 1.7e9);
    cr_assert_eq(val(&after, "eplbd_build_info", "version=\"0.1.0\""), 1);
    scrape_free(&before);
    scrape_free(&after);
}

Test(metrics, model_gauges_follow_register_rebalance_and_record_load) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m");
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    memcpy(eplb_v1_RebalanceRequest_resize_physical_load(req, 12, a), load, sizeof load);
    size_t len, blen = 0;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len), *body = NULL;
    cr_assert_eq(call("Rebalance", bytes, len, a, &body, &blen), 0);
    eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_parse(body, blen, a);
    cr_assert_not_null(resp);
    cr_assert(eplb_v1_RebalanceResponse_committed(resp));
    for (int i = 0; i < 2; i++) {
        eplb_v1_RecordLoadRequest *rl = eplb_v1_RecordLoadRequest_new(a);
        eplb_v1_RecordLoadRequest_set_model_id(rl, upb_StringView_FromString("m"));
        memcpy(eplb_v1_RecordLoadRequest_resize_physical_load(rl, 12, a), load, sizeof load);
        bytes = eplb_v1_RecordLoadRequest_serialize(rl, a, &len);
        cr_assert_eq(call("RecordLoad", bytes, len, a, NULL, NULL), 0);
    }

    settle("eplbd_rpc_calls_total", "method=\"RecordLoad\",code=\"OK\"", 2);
    settle("eplbd_rpc_duration_seconds_count", "method=\"Rebalance\"", 1);
    scrape sc = scrape_now();
    const char *m = "model_id=\"m\"";
    cr_assert_eq(val(&sc, "eplbd_models", ""), 1);
    cr_assert_eq(val(&sc, "eplbd_model_epoch", m), 1);
    /* 17 significant digits: the same double the Rebalance answered. */
    cr_assert_eq(val(&sc, "eplbd_model_balancedness_before", m), eplb_v1_RebalanceResponse_balancedness_before(resp));
    cr_assert_eq(val(&sc, "eplbd_model_balancedness_after", m), eplb_v1_RebalanceResponse_balancedness_after(resp));
    cr_assert_eq(val(&sc, "eplbd_model_last_experts_moved", m), (double)eplb_v1_RebalanceResponse_experts_moved(resp));
    cr_assert_eq(val(&sc, "eplbd_model_rebalances_total", m), 1);
    cr_assert_eq(val(&sc, "eplbd_model_rebalance_failures_total", m), 0);
    cr_assert_eq(val(&sc, "eplbd_model_passes_recorded_total", m), 2);
    cr_assert_eq(val(&sc, "eplbd_model_bytes_moved_total", m), 0);
    cr_assert_eq(val(&sc, "eplbd_model_last_bytes_moved", m), 0);
    cr_assert_eq(val(&sc, "eplbd_model_weights_attached", m), 0);
    cr_assert_eq(val(&sc, "eplbd_model_state", "model_id=\"m\",state=\"IDLE\""), 1);
    cr_assert_eq(val(&sc, "eplbd_model_state", "model_id=\"m\",state=\"NEEDS_RELOAD\""), 0);
    cr_assert_eq(val(&sc, "eplbd_model_info", "model_id=\"m\",role=\"main\",main_model_id=\"\""), 1);
    cr_assert_gt(val(&sc, "eplbd_database_bytes", ""), 0); /* a file database */
    cr_assert_eq(val(&sc, "eplbd_rpc_calls_total", "method=\"RecordLoad\",code=\"OK\""), 2);
    cr_assert_eq(val(&sc, "eplbd_rpc_duration_seconds_count", "method=\"Rebalance\""), 1);
    scrape_free(&sc);

    /* A stale epoch is refused: the RPC counter moves, the model's do not. */
    eplb_v1_RebalanceRequest_set_expected_epoch(req, 0);
    bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    cr_assert_eq(call("Rebalance", bytes, len, a, NULL, NULL), 10 /* ABORTED */);
    settle("eplbd_rpc_calls_total", "method=\"Rebalance\",code=\"ABORTED\"", 1);
    sc = scrape_now();
    cr_assert_eq(val(&sc, "eplbd_rpc_calls_total", "method=\"Rebalance\",code=\"ABORTED\""), 1);
    cr_assert_eq(val(&sc, "eplbd_model_rebalances_total", m), 1);
    cr_assert_eq(val(&sc, "eplbd_model_rebalance_failures_total", m), 0);
    cr_assert_eq(val(&sc, "eplbd_model_epoch", m), 1);
    scrape_free(&sc);
    upb_Arena_Free(a);
}

Test(metrics, bad_requests_get_clear_answers_and_change_nothing) {
    http_answer a = http_request(&metrics, "GET", "/nope");
    cr_assert_eq(a.status, 404);
    http_answer_free(&a);
    a = http_request(&metrics, "POST", "/metrics");
    cr_assert_eq(a.status, 405);
    cr_assert_not_null(strstr(a.head, "Allow: GET, HEAD"), "%s", a.head);
    http_answer_free(&a);
    a = http_raw(&metrics, "garbage\r\n\r\n", 11);
    cr_assert_eq(a.status, 400);
    http_answer_free(&a);
    a = http_raw(&metrics, "GET /metrics HTTP/2.0\r\n\r\n", 25);
    cr_assert_eq(a.status, 505);
    http_answer_free(&a);
    /* A header block over 8 KiB. */
    size_t big = 12000;
    char *req = malloc(big + 64);
    int n = snprintf(req, 64, "GET /metrics HTTP/1.1\r\nX-Big: ");
    memset(req + n, 'a', big);
    memcpy(req + n + big, "\r\n\r\n", 4);
    a = http_raw(&metrics, req, (size_t)n + big + 4);
    cr_assert_eq(a.status, 431, "%s", a.head);
    http_answer_free(&a);
    free(req);
    /* Binary junk with NULs. */
    char junk[300];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (char)(i * 7);
    memcpy(junk + sizeof junk - 4, "\r\n\r\n", 4);
    a = http_raw(&metrics, junk, sizeof junk);
    cr_assert_eq(a.status, 400);
    http_answer_free(&a);
    /* HEAD: the headers of a GET, no body; a query string is ignored. */
    a = http_request(&metrics, "HEAD", "/metrics");
    cr_assert_eq(a.status, 200);
    cr_assert_gt(a.content_length, 1000);
    cr_assert_eq(a.body_len, 0);
    http_answer_free(&a);
    a = http_request(&metrics, "GET", "/metrics?name[]=eplbd_up");
    cr_assert_eq(a.status, 200);
    http_answer_free(&a);
    /* HTTP/1.0 works too. */
    a = http_raw(&metrics, "GET /metrics HTTP/1.0\r\n\r\n", 25);
    cr_assert_eq(a.status, 200);
    http_answer_free(&a);
    /* Still serving, both ways. */
    scrape sc = scrape_now();
    cr_assert_eq(val(&sc, "eplbd_up", ""), 1);
    scrape_free(&sc);
    upb_Arena *ar = upb_Arena_New();
    cr_assert_eq(get_placement(ar, "x"), 5);
    upb_Arena_Free(ar);
}

Test(metrics, idle_and_slow_clients_do_not_block_a_scrape) {
    /* One that sends nothing, one that sends half a request, then more
     * idle connections than the responder has slots. */
    enum { IDLE = 40 };
    int fds[IDLE + 1];
    for (int i = 0; i < IDLE; i++)
        fds[i] = http_connect(&metrics);
    fds[IDLE] = http_connect(&metrics);
    cr_assert_gt(send(fds[IDLE], "GET /metr", 9, MSG_NOSIGNAL), 0);
    usleep(100000);
    double t0 = harness_now_ms();
    scrape sc = scrape_now();
    double took = harness_now_ms() - t0;
    cr_assert_lt(took, harness_slow() ? 20000 : 2000, "a scrape behind idle clients took %.0f ms", took);
    scrape_free(&sc);
    /* The idle ones are dropped (at the latest after the 5 s read limit):
     * each sees EOF, never an answer. */
    struct timeval tv = { .tv_sec = harness_slow() ? 60 : 10 };
    char c;
    setsockopt(fds[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t got = recv(fds[0], &c, 1, 0);
    cr_assert(got == 0 || (got < 0 && errno == ECONNRESET), "an idle client got %zd (%s)", got, strerror(errno));
    for (int i = 0; i <= IDLE; i++)
        close(fds[i]);
}

/* Listening TCP sockets the process holds (its fds matched against
 * /proc/net/tcp and tcp6 in state 0A). */
static int listening_sockets(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    cr_assert_not_null(d);
    unsigned long inodes[256];
    int ni = 0;
    struct dirent *de;
    while ((de = readdir(d)) && ni < 256) {
        char link[300], target[64];
        snprintf(link, sizeof link, "%s/%s", path, de->d_name);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = '\0';
            unsigned long ino;
            if (sscanf(target, "socket:[%lu]", &ino) == 1)
                inodes[ni++] = ino;
        }
    }
    closedir(d);
    int listening = 0;
    const char *tables[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    for (int t = 0; t < 2; t++) {
        FILE *f = fopen(tables[t], "r");
        if (!f)
            continue;
        char line[512];
        while (fgets(line, sizeof line, f)) {
            unsigned st;
            unsigned long ino;
            if (sscanf(line, " %*d: %*s %*s %x %*s %*s %*s %*s %*s %lu", &st, &ino) != 2 || st != 0x0A)
                continue;
            for (int i = 0; i < ni; i++)
                listening += inodes[i] == ino;
        }
        fclose(f);
    }
    return listening;
}

Test(metrics, the_listener_is_one_more_listening_socket) {
    cr_assert_eq(listening_sockets(srv.pid), 2); /* gRPC and /metrics */
}

Test(metrics, drain_time_calls_are_counted_and_serving_drops) {
    /* Separate server: a Rebalance held 1.5 s in its handler. */
    eplbd_suite_stop(&srv, client);
    memset(&srv, 0, sizeof srv);
    srv.extra[0] = "--metrics-listen";
    srv.extra[1] = "127.0.0.1:0";
    srv.extra[2] = "--test-handler-delay-ms";
    srv.extra[3] = "Rebalance:1500";
    eplbd_suite_start(&srv, &client);
    metrics = metrics_target(&srv);
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m");
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    memcpy(eplb_v1_RebalanceRequest_resize_physical_load(req, 12, a), load, sizeof load);
    size_t len;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    /* A at 0 s and B at 0.8 s both sleep 1.5 s in their handler; SIGTERM
     * at 1 s.  A finishes during the drain while B still runs, so the
     * listener is still up to show that A was counted. */
    harness_call ca, cb;
    harness_call_start(&ca, client, "/eplb.v1.ExpertBalancer/Rebalance", bytes, len, call_timeout_ms());
    usleep(800000);
    harness_call_start(&cb, client, "/eplb.v1.ExpertBalancer/Rebalance", bytes, len, call_timeout_ms());
    usleep(200000);
    kill(srv.pid, SIGTERM);
    cr_assert(eplbd_wait_log(&srv, "draining", 5000));
    scrape sc = scrape_now(); /* the gRPC listener is closed; /metrics still answers */
    cr_assert_eq(val(&sc, "eplbd_serving", ""), 0);
    if (!harness_slow()) /* A is still asleep (under valgrind it may be done) */
        cr_assert_eq(val(&sc, "eplbd_rpc_calls_total", "method=\"Rebalance\",code=\"OK\""), 0);
    scrape_free(&sc);
    harness_call_join(&ca);
    cr_assert_eq(ca.status, 0, "%s", ca.message);
    /* on_call runs just after the answer is sent: allow it a moment. */
    double seen = 0;
    for (int i = 0; i < (harness_slow() ? 250 : 25) && seen < 1; i++) {
        sc = scrape_now();
        seen = val(&sc, "eplbd_rpc_calls_total", "method=\"Rebalance\",code=\"OK\"");
        cr_assert_eq(val(&sc, "eplbd_serving", ""), 0);
        scrape_free(&sc);
        if (seen < 1)
            usleep(10000);
    }
    cr_assert_eq(seen, 1, "the Rebalance that finished while draining was not counted");
    harness_call_join(&cb);
    cr_assert_eq(cb.status, 0, "%s", cb.message);
    int rc = eplbd_wait(&srv, harness_slow() ? 120000 : 20000);
    cr_assert_eq(rc, 0);
    upb_Arena_Free(a);
    /* teardown stops a server: start a fresh one for it */
    eplb_client_close(client);
    eplbd_cleanup(&srv);
    start_with("127.0.0.1:0");
}

/* ---- listening addresses ------------------------------------------------------ */

TestSuite(metrics_listen, .timeout = 120);

Test(metrics_listen, ipv6_loopback) {
    start_with("[::1]:0");
    cr_assert_eq(metrics.family, AF_INET6);
    cr_assert_str_eq(metrics.host, "::1");
    scrape sc = scrape_now();
    cr_assert_eq(val(&sc, "eplbd_up", ""), 1);
    scrape_free(&sc);
    eplbd_suite_stop(&srv, client);
}

Test(metrics_listen, off_by_default) {
    memset(&srv, 0, sizeof srv);
    eplbd_suite_start(&srv, &client);
    cr_assert_eq(listening_sockets(srv.pid), 1); /* gRPC only */
    static char log[1 << 16];
    cr_assert_null(strstr(eplbd_log(&srv, log, sizeof log), "metrics on"));
    eplbd_suite_stop(&srv, client);
}

static void assert_refused(const char *listen, int want_rc, const char *want) {
    memset(&srv, 0, sizeof srv);
    eplbd_tmpdir(&srv);
    srv.extra[0] = "--metrics-listen";
    srv.extra[1] = listen;
    int rc = 0;
    cr_assert_not(eplbd_try_start(&srv, &rc), "eplbd started with --metrics-listen %s", listen);
    cr_assert_eq(rc, want_rc, "--metrics-listen %s: exit %d", listen, rc);
    static char log[1 << 16];
    cr_assert_not_null(strstr(eplbd_log(&srv, log, sizeof log), want), "--metrics-listen %s: %s", listen, log);
    eplbd_cleanup(&srv);
}

Test(metrics_listen, bad_addresses_refuse_the_start) {
    const char *bad[] = { "nonsense", "127.0.0.1", "127.0.0.1:", ":9100", "127.0.0.1:65536", "127.0.0.1:x",
                          "::1:9100", "[::1]9100" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_refused(bad[i], 2, "--metrics-listen wants host:port");
    assert_refused("192.0.2.1:9100", 1, "cannot listen for metrics on 192.0.2.1:9100"); /* not ours */

    /* A port in use (another process listens there). */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    cr_assert_eq(listen(fd, 1), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    char addr[64], want[128];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ntohs(sa.sin_port));
    snprintf(want, sizeof want, "cannot listen for metrics on %s: Address already in use", addr);
    assert_refused(addr, 1, want);
    close(fd);
}

/* ---- the label escaper ---------------------------------------------------- */

Test(metrics_text, label_values_are_escaped_and_valid_utf8) {
    char buf[128];
    rpc_metrics_escape_label(buf, 0, sizeof buf, "a\\b\"c\nd");
    cr_assert_str_eq(buf, "a\\\\b\\\"c\\nd");
    rpc_metrics_escape_label(buf, 0, sizeof buf, "caf\xc3\xa9 \xff\xc3 \xe2\x82\xac \xed\xa0\x80");
    cr_assert_str_eq(buf, "caf\xc3\xa9 \xef\xbf\xbd\xef\xbf\xbd \xe2\x82\xac \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    /* Truncation never splits an escape or a character. */
    size_t n = rpc_metrics_escape_label(buf, 0, 4, "ab\"");
    cr_assert_eq(n, 2);
    cr_assert_str_eq(buf, "ab");
    n = rpc_metrics_escape_label(buf, 0, 4, "a\xe2\x82\xac");
    cr_assert_eq(n, 1);
}
