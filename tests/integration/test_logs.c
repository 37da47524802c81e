/* test_logs.c -- eplbd's log over real connections (docs/deploy.md "Logs"):
 * a server started with --log-format json --log-level debug is called from
 * this process (Register, AttachWeights with shm buffers, GetPlacement of
 * an unknown model with a hostile id, a Rebalance that moves weights and
 * commits, failing Rebalances, RecordLoad with an automatic rebalance);
 * then every line of its stderr is parsed as JSON, strictly (json_flat.h,
 * and Python's json module as a second opinion), and the call lines carry
 * what the client was answered.  Text mode: one line per call, a hostile
 * id cannot forge a line.  --log-format yaml is refused at start. */
#include "eplbd_harness.h"

#include <fcntl.h>
#include <math.h>
#include <sys/mman.h>

#include "../rpc/json_flat.h"
#include "eplb/v1/eplb.upb.h"

enum { L = 2, N = 4, P = 6, G = 2, B = 256 /* bytes per expert */, MAX_LINES = 256 };

/* A hostile model id: a quote, a newline that would start a forged text
 * line, control bytes, a multi-byte character.  (Bytes that are not UTF-8
 * never reach a handler: upb refuses such a proto3 string, so that request
 * is logged as malformed, without a model id; the U+FFFD replacement is
 * tested in tests/rpc/test_log.c.) */
static const char hostile[] = "evil\"\n2026-01-01T00:00:00.000Z info Forged OK\x01\x7f\xc3\xa9";
#define HOSTILE_LEN (sizeof hostile - 1)
static const char not_utf8[] = "bad\xff\n";

static jf_object lines[MAX_LINES];
static size_t num_lines;
static char log_buf[1 << 20];

/* Parse every line of the server's log: each must be one strict JSON object. */
static void parse_log(const eplbd_proc *p) {
    char path[256];
    snprintf(path, sizeof path, "%s/eplbd.log", p->dir);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f);
    size_t len = fread(log_buf, 1, sizeof log_buf - 1, f);
    fclose(f);
    cr_assert_lt(len, sizeof log_buf - 1, "log too large for the test");
    log_buf[len] = '\0';
    cr_assert_gt(len, 0);
    cr_assert_eq(log_buf[len - 1], '\n', "the log does not end with a whole line");
    num_lines = 0;
    for (char *at = log_buf; at < log_buf + len;) {
        char *nl = memchr(at, '\n', (size_t)(log_buf + len - at));
        cr_assert_lt(num_lines, MAX_LINES);
        cr_assert_leq((size_t)(nl - at), 4095);
        jf_object *o = &lines[num_lines++];
        cr_assert_eq(jf_parse(at, (size_t)(nl - at), o), 0, "log line %zu is not JSON (%s): %.*s", num_lines,
                     o->error, (int)(nl - at), at);
        cr_assert_not_null(jf_str(o, "ts"), "line %zu has no ts", num_lines);
        const char *lv = jf_str(o, "level");
        cr_assert(lv && (!strcmp(lv, "debug") || !strcmp(lv, "info") || !strcmp(lv, "warn") || !strcmp(lv, "error")),
                  "line %zu: level", num_lines);
        cr_assert(jf_str(o, "event") || jf_str(o, "msg"), "line %zu has neither event nor msg", num_lines);
        at = nl + 1;
    }
    /* A second parser's opinion: Python's json (strict: no control bytes
     * in strings) on the file decoded as strict UTF-8. */
    if (access("/usr/bin/python3", X_OK) == 0) {
        char cmd[512];
        snprintf(cmd, sizeof cmd,
                 "/usr/bin/python3 -c 'import json,sys\n"
                 "for n, l in enumerate(open(sys.argv[1], encoding=\"utf-8\", errors=\"strict\", newline=\"\\n\")):\n"
                 "    o = json.loads(l)\n"
                 "    assert isinstance(o, dict), n\n' '%s'",
                 path);
        cr_assert_eq(system(cmd), 0, "python3 json.loads refused a line of %s", path);
    }
}

static const char *status_name(int code) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return code >= 0 && code <= 16 ? names[code] : "UNKNOWN";
}

static bool field_is(const jf_object *o, const char *key, const char *want) {
    const char *v = jf_str(o, key);
    return v && strcmp(v, want) == 0;
}

/* The call lines of method with status; model_id compared as decoded bytes
 * (NULL: any). */
static size_t find_calls(const char *method, const char *status, const char *id, size_t id_len,
                         const jf_object **out, size_t max) {
    size_t n = 0;
    for (size_t i = 0; i < num_lines; i++) {
        const jf_object *o = &lines[i];
        if (!field_is(o, "event", "call") || !field_is(o, "method", method) || !field_is(o, "status", status))
            continue;
        if (id) {
            const jf_field *f = jf_get(o, "model_id");
            if (!f || f->len != id_len || memcmp(f->str, id, id_len) != 0)
                continue;
        }
        if (n < max)
            out[n] = o;
        n++;
    }
    return n;
}

static const jf_object *one_call(const char *method, const char *status, const char *id) {
    const jf_object *o[4];
    size_t n = find_calls(method, status, id, id ? strlen(id) : 0, o, 4);
    cr_assert_eq(n, 1, "%zu call lines of %s %s (model %s)", n, method, status, id ? id : "-");
    return o[0];
}

static size_t count_events(const char *event, const char *key, const char *value) {
    size_t n = 0;
    for (size_t i = 0; i < num_lines; i++)
        if (field_is(&lines[i], "event", event) && (!key || field_is(&lines[i], key, value)))
            n++;
    return n;
}

static double num(const jf_object *o, const char *key) {
    bool ok;
    double v = jf_num(o, key, &ok);
    cr_assert(ok, "no number %s", key);
    return v;
}

static void common_fields(const jf_object *o, int code, const char *message) {
    cr_assert_eq(num(o, "code"), code);
    cr_assert_geq(num(o, "duration_ms"), 0);
    cr_assert(field_is(o, "level", code ? "warn" : "info"));
    cr_assert_not_null(jf_str(o, "peer"));
    if (code)
        cr_assert(field_is(o, "message", message), "message %s, the client got %s", jf_str(o, "message"), message);
    else
        cr_assert_null(jf_get(o, "message"));
}

/* ---- the engine's buffers ---------------------------------------------------- */

static char shm_names[G][64];
static unsigned char *shm_base[G];
static const size_t shm_size = (size_t)L * (P / G) * B;

static void buffers_create(void) {
    for (int g = 0; g < G; g++) {
        snprintf(shm_names[g], sizeof shm_names[g], "/eplb-logs-%d-%d", (int)getpid(), g);
        shm_unlink(shm_names[g]);
        int fd = shm_open(shm_names[g], O_RDWR | O_CREAT | O_EXCL, 0600);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ftruncate(fd, (off_t)shm_size), 0);
        shm_base[g] = mmap(NULL, shm_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        cr_assert_neq(shm_base[g], MAP_FAILED);
        memset(shm_base[g], g + 1, shm_size);
    }
}

static void buffers_destroy(void) {
    for (int g = 0; g < G; g++) {
        munmap(shm_base[g], shm_size);
        shm_unlink(shm_names[g]);
    }
}

static void attach(eplb_client *c, upb_Arena *a) {
    eplb_v1_AttachWeightsRequest *r = eplb_v1_AttachWeightsRequest_new(a);
    eplb_v1_AttachWeightsRequest_set_model_id(r, upb_StringView_FromString("m"));
    eplb_v1_AttachWeightsRequest_set_kind(r, eplb_v1_BUFFER_KIND_SHM);
    for (int g = 0; g < G; g++)
        eplb_v1_RankBuffer_set_shm_name(eplb_v1_AttachWeightsRequest_add_ranks(r, a),
                                        upb_StringView_FromString(shm_names[g]));
    for (int l = 0; l < L; l++) {
        eplb_v1_ExpertTensor *et = eplb_v1_LayerWeights_add_tensors(eplb_v1_AttachWeightsRequest_add_layers(r, a), a);
        eplb_v1_ExpertTensor_set_name(et, upb_StringView_FromString("w13"));
        eplb_v1_ExpertTensor_set_bytes_per_expert(et, B);
        for (int g = 0; g < G; g++) {
            eplb_v1_TensorLayout *tl = eplb_v1_ExpertTensor_add_ranks(et, a);
            eplb_v1_TensorLayout_set_offset(tl, (uint64_t)l * (P / G) * B);
            eplb_v1_TensorLayout_set_stride(tl, B);
        }
    }
    size_t len;
    char *bytes = eplb_v1_AttachWeightsRequest_serialize(r, a, &len), msg[512];
    cr_assert_eq(harness_rpc(c, "AttachWeights", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "%s", msg);
}

/* ---- requests ----------------------------------------------------------------- */

static void register_model(eplb_client *c, upb_Arena *a, const char *name, uint32_t step_interval) {
    eplb_v1_RegisterModelRequest *r = harness_moe_request(a, name, L, N, P, G);
    if (step_interval) {
        eplb_v1_ParallelConfig *pc = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
        eplb_v1_ParallelConfig_set_auto_rebalance(pc, true);
        eplb_v1_ParallelConfig_set_step_interval(pc, step_interval);
    }
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len), msg[512];
    cr_assert_eq(harness_rpc(c, "RegisterModel", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "%s", msg);
}

/* GetPlacement of raw model_id bytes, encoded by hand (field 1, length
 * delimited) so that no encoder can refuse or fix them. */
static int get_raw(eplb_client *c, upb_Arena *a, const char *id, size_t n, char *msg, size_t msglen) {
    char req[256];
    cr_assert_lt(n, 128);
    req[0] = 0x0a;
    req[1] = (char)n;
    memcpy(req + 2, id, n);
    return harness_rpc(c, "GetPlacement", req, n + 2, a, NULL, NULL, msg, msglen);
}

/* Skewed load: expert 3 is hot in both layers, so a rebalance replicates
 * it and moves slots. */
static int rebalance(eplb_client *c, upb_Arena *a, const char *id, int64_t expected_epoch,
                     const eplb_v1_RebalanceResponse **out, char *msg, size_t msglen) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString(id));
    if (expected_epoch >= 0)
        eplb_v1_RebalanceRequest_set_expected_epoch(req, (uint64_t)expected_epoch);
    int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(req, L * P, a);
    static const int64_t row[P] = { 10, 20, 15, 1000, 5, 8 };
    for (int l = 0; l < L; l++)
        memcpy(load + l * P, row, sizeof row);
    size_t len, blen = 0;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len), *body = NULL;
    int st = harness_rpc(c, "Rebalance", bytes, len, a, &body, &blen, msg, msglen);
    if (st == 0 && out) {
        *out = eplb_v1_RebalanceResponse_parse(body, blen, a);
        cr_assert_not_null(*out);
    }
    return st;
}

static int record_load(eplb_client *c, upb_Arena *a, const char *id, bool *rebalanced) {
    eplb_v1_RecordLoadRequest *req = eplb_v1_RecordLoadRequest_new(a);
    eplb_v1_RecordLoadRequest_set_model_id(req, upb_StringView_FromString(id));
    int64_t *load = eplb_v1_RecordLoadRequest_resize_physical_load(req, L * P, a);
    for (int i = 0; i < L * P; i++)
        load[i] = i % P == 2 ? 900 : 10;
    size_t len, blen = 0;
    char *bytes = eplb_v1_RecordLoadRequest_serialize(req, a, &len), *body = NULL, msg[512];
    int st = harness_rpc(c, "RecordLoad", bytes, len, a, &body, &blen, msg, sizeof msg);
    cr_assert_eq(st, 0, "%s", msg);
    *rebalanced = eplb_v1_RecordLoadResponse_rebalanced(eplb_v1_RecordLoadResponse_parse(body, blen, a));
    return st;
}

TestSuite(logs, .timeout = 300);

Test(logs, json_lines_of_real_calls) {
    eplbd_proc s = { 0 };
    s.extra[0] = "--log-format";
    s.extra[1] = "json";
    s.extra[2] = "--log-level";
    s.extra[3] = "debug";
    s.extra[4] = "--backend";
    s.extra[5] = "cpu";
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    cr_assert_not_null(c);
    upb_Arena *a = upb_Arena_New();
    char msg_hostile[512], msg_epoch[512], msg_unknown[512];

    register_model(c, a, "m", 0);
    buffers_create();
    attach(c, a);
    int st_hostile = get_raw(c, a, hostile, HOSTILE_LEN, msg_hostile, sizeof msg_hostile);
    cr_assert_neq(st_hostile, 0);
    char msg_utf8[512];
    int st_utf8 = get_raw(c, a, not_utf8, sizeof not_utf8 - 1, msg_utf8, sizeof msg_utf8);
    cr_assert_eq(st_utf8, 3, "%s", msg_utf8);
    const eplb_v1_RebalanceResponse *resp = NULL;
    char msg[512];
    cr_assert_eq(rebalance(c, a, "m", 0, &resp, msg, sizeof msg), 0, "%s", msg);
    cr_assert(eplb_v1_RebalanceResponse_committed(resp));
    cr_assert_gt(eplb_v1_RebalanceResponse_bytes_moved(resp), 0, "the example should move weights");
    int st_epoch = rebalance(c, a, "m", 0, NULL, msg_epoch, sizeof msg_epoch); /* stale epoch now */
    cr_assert_neq(st_epoch, 0);
    int st_unknown = rebalance(c, a, "nope", -1, NULL, msg_unknown, sizeof msg_unknown);
    cr_assert_eq(st_unknown, 5, "NOT_FOUND: %s", msg_unknown);
    register_model(c, a, "auto", 2);
    bool rebalanced = true;
    record_load(c, a, "auto", &rebalanced);
    cr_assert_not(rebalanced);
    record_load(c, a, "auto", &rebalanced);
    cr_assert(rebalanced, "the second pass should trigger the automatic rebalance");

    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);
    buffers_destroy();
    parse_log(&s);

    /* One call line per call, with what the client was answered. */
    const jf_object *o = one_call("RegisterModel", "OK", "m");
    common_fields(o, 0, NULL);
    common_fields(one_call("AttachWeights", "OK", "m"), 0, NULL);

    /* The hostile id, byte for byte. */
    const jf_object *h[2];
    size_t nh = find_calls("GetPlacement", status_name(st_hostile), hostile, HOSTILE_LEN, h, 2);
    cr_assert_eq(nh, 1, "the hostile GetPlacement's line (model_id as sent)");
    common_fields(h[0], st_hostile, msg_hostile);
    /* Not UTF-8: refused by the decoder, logged as such, without a model id. */
    nh = find_calls("GetPlacement", "INVALID_ARGUMENT", NULL, 0, h, 2);
    cr_assert_geq(nh, 1);
    size_t malformed = 0;
    for (size_t i = 0; i < num_lines; i++)
        if (field_is(&lines[i], "event", "call") && field_is(&lines[i], "message", msg_utf8)) {
            malformed++;
            cr_assert_null(jf_get(&lines[i], "model_id"));
        }
    cr_assert_eq(malformed, 1);

    /* The committed Rebalance: its numbers are the response's. */
    const jf_object *r[2];
    size_t nr = find_calls("Rebalance", "OK", "m", 1, r, 2);
    cr_assert_eq(nr, 1);
    o = r[0];
    common_fields(o, 0, NULL);
    cr_assert_eq(jf_get(o, "committed")->type, JF_TRUE);
    cr_assert_float_eq(num(o, "balancedness_before"), eplb_v1_RebalanceResponse_balancedness_before(resp), 1e-6);
    cr_assert_float_eq(num(o, "balancedness_after"), eplb_v1_RebalanceResponse_balancedness_after(resp), 1e-6);
    cr_assert_eq((uint64_t)num(o, "bytes_moved"), eplb_v1_RebalanceResponse_bytes_moved(resp));
    cr_assert_eq((uint64_t)num(o, "experts_moved"), eplb_v1_RebalanceResponse_experts_moved(resp));
    cr_assert_eq((uint64_t)num(o, "epoch"), eplb_v1_Placement_epoch(eplb_v1_RebalanceResponse_placement(resp)));
    cr_assert_geq(num(o, "compute_ms"), 0);
    cr_assert_geq(num(o, "move_ms"), 0);

    /* The failing ones: status, code and the message the client got. */
    o = one_call("Rebalance", status_name(st_epoch), "m");
    common_fields(o, st_epoch, msg_epoch);
    cr_assert_null(jf_get(o, "balancedness_before"), "no plan, no numbers");
    o = one_call("Rebalance", "NOT_FOUND", "nope");
    common_fields(o, 5, msg_unknown);

    /* RecordLoad: the pass that rebalanced says so; an info event too. */
    const jf_object *rl[3];
    cr_assert_eq(find_calls("RecordLoad", "OK", "auto", 4, rl, 3), 2);
    size_t autos = 0;
    for (int i = 0; i < 2; i++)
        if (jf_get(rl[i], "auto_rebalance")) {
            autos++;
            cr_assert_eq(jf_get(rl[i], "committed")->type, JF_TRUE);
            cr_assert_eq(num(rl[i], "epoch"), 1);
        }
    cr_assert_eq(autos, 1);
    cr_assert_eq(count_events("auto_rebalance", "level", "info"), 1);

    /* Debug: the request, the plan and every step of the weight move. */
    cr_assert_eq(count_events("rebalance_request", "model_id", "m"), 2);
    cr_assert_eq(count_events("rebalance_request", "load", "request"), 3);
    cr_assert_geq(count_events("rebalance_plan", "model_id", "m"), 1);
    cr_assert_eq(count_events("move_start", "model_id", "m"), 1);
    static const char *const steps[][2] = {
        { "IDLE", "STAGED" }, { "STAGED", "MOVING" }, { "MOVING", "COMMITTED" }, { "COMMITTED", "IDLE" },
    };
    size_t at = 0;
    for (size_t k = 0; k < 4; k++) {
        while (at < num_lines && !(field_is(&lines[at], "event", "move_state") &&
                                   field_is(&lines[at], "from", steps[k][0]) && field_is(&lines[at], "to", steps[k][1])))
            at++;
        cr_assert_lt(at, num_lines, "no move_state %s -> %s (in order)", steps[k][0], steps[k][1]);
    }
    double scattered = 0;
    size_t layers = 0;
    for (size_t i = 0; i < num_lines; i++)
        if (field_is(&lines[i], "event", "move_layer") && field_is(&lines[i], "model_id", "m")) {
            layers++;
            scattered += num(&lines[i], "bytes_scattered");
            cr_assert_geq(num(&lines[i], "gather_ms"), 0);
            cr_assert_geq(num(&lines[i], "slots_changed"), 0);
        }
    cr_assert_eq(layers, L);
    cr_assert_eq((uint64_t)scattered, eplb_v1_RebalanceResponse_bytes_moved(resp), "per-layer bytes add up");
    cr_assert_eq(count_events("move_done", "status", "OK"), 1);
    /* Free-text lines are JSON too. */
    size_t msgs = 0;
    for (size_t i = 0; i < num_lines; i++)
        msgs += jf_str(&lines[i], "msg") && strstr(jf_str(&lines[i], "msg"), "listening on") != NULL;
    cr_assert_eq(msgs, 1);

    upb_Arena_Free(a);
    eplbd_cleanup(&s);
}

/* At info (the default) no debug event is written, not even from the core. */
Test(logs, info_level_has_no_debug_events) {
    eplbd_proc s = { 0 };
    s.extra[0] = "--log-format";
    s.extra[1] = "json";
    s.extra[2] = "--backend";
    s.extra[3] = "cpu";
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    upb_Arena *a = upb_Arena_New();
    register_model(c, a, "m", 0);
    buffers_create();
    attach(c, a);
    const eplb_v1_RebalanceResponse *resp = NULL;
    char msg[512];
    cr_assert_eq(rebalance(c, a, "m", -1, &resp, msg, sizeof msg), 0, "%s", msg);
    cr_assert_gt(eplb_v1_RebalanceResponse_bytes_moved(resp), 0);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);
    buffers_destroy();
    parse_log(&s);
    for (size_t i = 0; i < num_lines; i++)
        cr_assert_not(field_is(&lines[i], "level", "debug"), "a debug line at info: %s", jf_str(&lines[i], "event"));
    one_call("Rebalance", "OK", "m");
    upb_Arena_Free(a);
    eplbd_cleanup(&s);
}

/* Text: one line per call, and a hostile id does not start a second one. */
Test(logs, text_lines_cannot_be_forged) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    upb_Arena *a = upb_Arena_New();
    char msg[512];
    int st = get_raw(c, a, hostile, HOSTILE_LEN, msg, sizeof msg);
    cr_assert_neq(st, 0);
    register_model(c, a, "m", 0);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);
    const char *log = eplbd_log(&s, log_buf, sizeof log_buf);
    size_t len = strlen(log), gets = 0, registers = 0;
    cr_assert_gt(len, 0);
    for (const char *at = log; *at;) {
        const char *nl = strchr(at, '\n');
        cr_assert_not_null(nl, "the log ends without a newline");
        /* Every line starts with the server's own stamp, never the forged one. */
        cr_assert(at[0] == '2' && at[4] == '-' && at[10] == 'T' && at[23] == 'Z' && at[24] == ' ', "%.*s",
                  (int)(nl - at), at);
        cr_assert_neq(strncmp(at, "2026-01-01T00:00:00.000Z", 24), 0, "a forged line: %.*s", (int)(nl - at), at);
        for (const char *p = at; p < nl; p++)
            cr_assert((unsigned char)*p >= 0x20 && *p != 0x7f, "a control byte in: %.*s", (int)(nl - at), at);
        if (strstr(at, " GetPlacement ") && strstr(at, " GetPlacement ") < nl) {
            gets++;
            const char *m =
                strstr(at, "model=evil\"\\x0a2026-01-01T00:00:00.000Z\\x20info\\x20Forged\\x20OK\\x01\\x7f\\xc3\\xa9");
            cr_assert(m && m < nl, "the id is escaped on its line: %.*s", (int)(nl - at), at);
        }
        if (strstr(at, " RegisterModel OK ") && strstr(at, " RegisterModel OK ") < nl)
            registers++;
        at = nl + 1;
    }
    cr_assert_eq(gets, 1);
    cr_assert_eq(registers, 1);
    upb_Arena_Free(a);
    eplbd_cleanup(&s);
}

Test(logs, unknown_format_is_refused_at_start) {
    eplbd_proc s = { 0 };
    s.extra[0] = "--log-format";
    s.extra[1] = "yaml";
    eplbd_tmpdir(&s);
    int status = 0;
    cr_assert_eq(eplbd_try_start(&s, &status), 0, "eplbd started with --log-format yaml");
    cr_assert_eq(status, 2);
    char buf[4096];
    cr_assert_not_null(strstr(eplbd_log(&s, buf, sizeof buf), "eplbd: --log-format wants text or json, got 'yaml'"),
                       "%s", buf);
    eplbd_cleanup(&s);
}
