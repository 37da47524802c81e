/* test_server.c -- RegisterModel, GetPlacement and Health over a real gRPC
 * connection to a separate eplbd process; restart; malformed input. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"
#include "grpc/health/v1/health.upb.h"

static eplbd_proc srv;
static eplb_client *client;

static void start(void) { eplbd_suite_start(&srv, &client); }

static void stop(void) { eplbd_suite_stop(&srv, client); }

/* The server is stopped at the end of each test body, not in .fini:
 * Criterion ignores a failed assertion in .fini, and the stop asserts a
 * clean exit at SIGTERM (valgrind and sanitizer verdicts). */
TestSuite(server, .init = start, .timeout = 300);

/* ---- request builders --------------------------------------------------- */

static eplb_v1_ModelHandle *moe_handle(upb_Arena *a, const char *arch, uint32_t layers) {
    eplb_v1_ModelHandle *h = eplb_v1_ModelHandle_new(a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString(arch));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, layers);
    eplb_v1_MoeSpec_set_num_logical_experts(m, 4);
    eplb_v1_MoeSpec_set_num_physical_experts(m, 6);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, 3);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, 2);
    return h;
}

static eplb_v1_ModelHandle *wrap(upb_Arena *a, const char *arch, eplb_v1_ModelHandle *inner) {
    eplb_v1_ModelHandle *h = eplb_v1_ModelHandle_new(a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString(arch));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_SUPPORTS_MULTIMODAL, a);
    if (inner)
        eplb_v1_ModelHandle_set_language_model(h, inner);
    return h;
}

static eplb_v1_RegisterModelRequest *register_request(upb_Arena *a, const char *name, eplb_v1_ModelHandle *h) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_RegisterModelRequest_set_model(r, h);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, 2);
    return r;
}

/* Call and parse: returns the status; *resp_bytes for the caller's parse. */
static int call(const char *method, const char *req, size_t len, eplb_call_result *r) {
    char path[128];
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(client, path, req, len, call_timeout_ms(), r), 0);
    return r->status;
}

static eplb_v1_RegisterModelResponse *do_register(upb_Arena *a, eplb_v1_RegisterModelRequest *req, int expect,
                                                  eplb_call_result *r) {
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(req, a, &len);
    int st = call("RegisterModel", bytes, len, r);
    cr_assert_eq(st, expect, "RegisterModel: %s: %s", eplb_grpc_status_name(st), r->message);
    if (st != 0)
        return NULL;
    eplb_v1_RegisterModelResponse *resp = eplb_v1_RegisterModelResponse_parse(r->body, r->body_len, a);
    cr_assert_not_null(resp);
    return resp;
}

static eplb_v1_Placement *get_placement(upb_Arena *a, const char *id, int expect, eplb_call_result *r) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    int st = call("GetPlacement", bytes, len, r);
    cr_assert_eq(st, expect, "GetPlacement: %s: %s", eplb_grpc_status_name(st), r->message);
    return st == 0 ? eplb_v1_Placement_parse(r->body, r->body_len, a) : NULL;
}

static int sv_eq(upb_StringView v, const char *s) {
    return v.size == strlen(s) && memcmp(v.data, s, v.size) == 0;
}

static void check_initial_placement(const eplb_v1_Placement *p, uint32_t layers) {
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    cr_assert_eq(eplb_v1_Placement_num_layers(p), layers);
    cr_assert_eq(eplb_v1_Placement_num_physical_experts(p), 6);
    cr_assert_eq(eplb_v1_Placement_num_logical_experts(p), 4);
    cr_assert_eq(eplb_v1_Placement_num_valid_physical_experts(p), 6);
    size_t n;
    const int32_t *p2l = eplb_v1_Placement_physical_to_logical(p, &n);
    cr_assert_eq(n, 6 * layers);
    const int32_t row[] = { 0, 1, 2, 3, 0, 1 };
    for (uint32_t l = 0; l < layers; l++)
        cr_assert_arr_eq(p2l + 6 * l, row, sizeof row);
    const int32_t *cnt = eplb_v1_Placement_logical_replica_count(p, &n);
    cr_assert_eq(n, 4 * layers);
    cr_assert_eq(cnt[0], 2);
    cr_assert_eq(cnt[3], 1);
}

/* ---- tests ---------------------------------------------------------------- */

Test(server, health_check_serving_and_unknown_service) {
    upb_Arena *a = upb_Arena_New();
    grpc_health_v1_HealthCheckRequest *req = grpc_health_v1_HealthCheckRequest_new(a);
    size_t len;
    char *bytes = grpc_health_v1_HealthCheckRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(client, "/grpc.health.v1.Health/Check", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 0, "%s", r.message);
    grpc_health_v1_HealthCheckResponse *resp = grpc_health_v1_HealthCheckResponse_parse(r.body, r.body_len, a);
    cr_assert_eq(grpc_health_v1_HealthCheckResponse_status(resp), grpc_health_v1_HealthCheckResponse_SERVING);
    eplb_call_result_free(&r);

    grpc_health_v1_HealthCheckRequest_set_service(req, upb_StringView_FromString("eplb.v1.ExpertBalancer"));
    bytes = grpc_health_v1_HealthCheckRequest_serialize(req, a, &len);
    cr_assert_eq(eplb_client_call(client, "/grpc.health.v1.Health/Check", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 0);
    eplb_call_result_free(&r);

    grpc_health_v1_HealthCheckRequest_set_service(req, upb_StringView_FromString("no.such.Service"));
    bytes = grpc_health_v1_HealthCheckRequest_serialize(req, a, &len);
    cr_assert_eq(eplb_client_call(client, "/grpc.health.v1.Health/Check", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 5 /* NOT_FOUND */);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, register_wrapped_moe_then_get_placement) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    eplb_v1_RegisterModelRequest *req = register_request(
        a, "kimi", wrap(a, "KimiK25ForConditionalGeneration", moe_handle(a, "DeepseekV3ForCausalLM", 3)));
    eplb_v1_RegisterModelRequest_set_include_placement(req, true); /* off by default */
    eplb_v1_RegisterModelResponse *resp = do_register(a, req, 0, &r);
    cr_assert(eplb_v1_RegisterModelResponse_registered(resp));
    cr_assert(sv_eq(eplb_v1_RegisterModelResponse_model_id(resp), "kimi"));
    cr_assert(sv_eq(eplb_v1_RegisterModelResponse_resolved_path(resp), "KimiK25ForConditionalGeneration.language_model"));
    check_initial_placement(eplb_v1_RegisterModelResponse_placement(resp), 3);
    eplb_call_result_free(&r);

    eplb_v1_Placement *p = get_placement(a, "kimi", 0, &r);
    check_initial_placement(p, 3);
    cr_assert(sv_eq(eplb_v1_Placement_model_id(p), "kimi"));
    size_t n;
    eplb_v1_Placement_logical_to_physical(p, &n);
    cr_assert_eq(n, 0, "log2phy is sent only when asked for");
    eplb_call_result_free(&r);

    eplb_v1_GetPlacementRequest *req2 = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req2, upb_StringView_FromString("kimi"));
    eplb_v1_GetPlacementRequest_set_include_logical_to_physical(req2, true);
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req2, a, &len);
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0);
    p = eplb_v1_Placement_parse(r.body, r.body_len, a);
    const int32_t *l2p = eplb_v1_Placement_logical_to_physical(p, &n);
    cr_assert_eq(eplb_v1_Placement_max_replicas(p), 2);
    cr_assert_eq(n, 3 * 4 * 2);
    const int32_t want[] = { 0, 4, 1, 5, 2, -1, 3, -1 };
    cr_assert_arr_eq(l2p, want, sizeof want);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, speculator_wrapper_is_unwrapped) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    do_register(a, register_request(a, "kimi", wrap(a, "KimiK25ForConditionalGeneration",
                                                    moe_handle(a, "DeepseekV3ForCausalLM", 3))), 0, &r);
    eplb_call_result_free(&r);
    eplb_v1_RegisterModelRequest *spec = register_request(
        a, "kimi-eagle",
        wrap(a, "EagleKimiK25", wrap(a, "KimiK25ForConditionalGeneration", moe_handle(a, "DeepseekV3MTP", 1))));
    eplb_v1_RegisterModelRequest_set_role(spec, eplb_v1_MODEL_ROLE_SPECULATOR);
    eplb_v1_RegisterModelRequest_set_main_model_id(spec, upb_StringView_FromString("kimi"));
    eplb_v1_RegisterModelResponse *resp = do_register(a, spec, 0, &r);
    cr_assert(eplb_v1_RegisterModelResponse_registered(resp));
    cr_assert(sv_eq(eplb_v1_RegisterModelResponse_resolved_path(resp), "EagleKimiK25.language_model.language_model"));
    eplb_call_result_free(&r);

    /* A drafter whose EP configuration differs from its main model's. */
    eplb_v1_ModelHandle *other = moe_handle(a, "DeepseekV3MTP", 1);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(other, a);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, 0);
    eplb_v1_MoeSpec_set_num_physical_experts(m, 4);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, 2);
    spec = register_request(a, "kimi-other", other);
    eplb_v1_RegisterModelRequest_set_role(spec, eplb_v1_MODEL_ROLE_SPECULATOR);
    eplb_v1_RegisterModelRequest_set_main_model_id(spec, upb_StringView_FromString("kimi"));
    do_register(a, spec, 9 /* FAILED_PRECONDITION */, &r);
    cr_assert_not_null(strstr(r.message, "num_redundant_experts 0 differs from main model kimi (2)"), "%s", r.message);
    eplb_call_result_free(&r);
    get_placement(a, "kimi-other", 5, &r);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, not_moe_disabled_and_dummy_are_not_registered) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    eplb_v1_ModelHandle *llama = eplb_v1_ModelHandle_new(a);
    eplb_v1_ModelHandle_set_architecture(llama, upb_StringView_FromString("LlamaForCausalLM"));
    eplb_v1_RegisterModelResponse *resp =
        do_register(a, register_request(a, "llava", wrap(a, "LlavaForConditionalGeneration", llama)), 0, &r);
    cr_assert_not(eplb_v1_RegisterModelResponse_registered(resp));
    upb_StringView reason = eplb_v1_RegisterModelResponse_reason(resp);
    cr_assert_not_null(strstr(reason.data, "not a Mixture-of-Experts"), "%.*s", (int)reason.size, reason.data);
    cr_assert_not(eplb_v1_RegisterModelResponse_has_placement(resp));
    eplb_call_result_free(&r);

    eplb_v1_RegisterModelRequest *req = register_request(a, "off", moe_handle(a, "DeepseekV3ForCausalLM", 2));
    eplb_v1_ParallelConfig_set_enable_eplb(eplb_v1_RegisterModelRequest_mutable_parallel(req, a), false);
    resp = do_register(a, req, 0, &r);
    cr_assert_not(eplb_v1_RegisterModelResponse_registered(resp));
    eplb_call_result_free(&r);

    req = register_request(a, "dummy", moe_handle(a, "DeepseekV3ForCausalLM", 2));
    eplb_v1_RegisterModelRequest_set_load_dummy_weights(req, true);
    resp = do_register(a, req, 0, &r);
    cr_assert_not(eplb_v1_RegisterModelResponse_registered(resp));
    eplb_call_result_free(&r);

    const char *ids[] = { "llava", "off", "dummy" };
    for (int i = 0; i < 3; i++) {
        get_placement(a, ids[i], 5, &r);
        eplb_call_result_free(&r);
    }
    upb_Arena_Free(a);
    stop();
}

Test(server, invalid_metadata_is_invalid_argument_and_changes_nothing) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    eplb_v1_ModelHandle *lm = moe_handle(a, "DeepseekV3ForCausalLM", 2);
    eplb_v1_MoeSpec_set_num_physical_experts(eplb_v1_ModelHandle_mutable_moe(lm, a), 8);
    do_register(a, register_request(a, "bad", wrap(a, "KimiK25ForConditionalGeneration", lm)), 3, &r);
    cr_assert_str_eq(r.message,
                     "model.language_model.moe.num_physical_experts 8 != num_logical_experts 4 + num_redundant_experts 2");
    eplb_call_result_free(&r);
    get_placement(a, "bad", 5, &r);
    eplb_call_result_free(&r);

    /* Too deep: nine wrappers around the MoE handle. */
    eplb_v1_ModelHandle *h = moe_handle(a, "Moe", 2);
    for (int i = 0; i < 9; i++)
        h = wrap(a, "W", h);
    do_register(a, register_request(a, "deep", h), 3, &r);
    cr_assert_not_null(strstr(r.message, "more than 8 wrapper levels"), "%s", r.message);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, duplicate_name_idempotent_or_already_exists) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    eplb_v1_RegisterModelRequest *req = register_request(a, "ds", moe_handle(a, "DeepseekV3ForCausalLM", 2));
    do_register(a, req, 0, &r);
    eplb_call_result_free(&r);
    eplb_v1_RegisterModelResponse *resp = do_register(a, req, 0, &r);
    cr_assert(eplb_v1_RegisterModelResponse_registered(resp));
    cr_assert(sv_eq(eplb_v1_RegisterModelResponse_reason(resp), "already registered; placement kept at epoch 0"));
    eplb_call_result_free(&r);
    do_register(a, register_request(a, "ds", moe_handle(a, "DeepseekV3ForCausalLM", 5)), 6, &r);
    cr_assert_not_null(strstr(r.message, "num_moe_layers 2 (registered) != 5"), "%s", r.message);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, malformed_bytes_and_unknown_methods) {
    static const char garbage[] = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0f";
    eplb_call_result r;
    const char *methods[] = { "RegisterModel", "GetPlacement" };
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(call(methods[i], garbage, sizeof garbage - 1, &r), 3, "%s: %s", methods[i], r.message);
        cr_assert_not_null(strstr(r.message, "is not a valid eplb.v1."), "%s", r.message);
        eplb_call_result_free(&r);
    }
    cr_assert_eq(eplb_client_call(client, "/eplb.v1.ExpertBalancer/NoSuchMethod", "", 0, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 12 /* UNIMPLEMENTED */);
    cr_assert_not_null(strstr(r.message, "unknown method /eplb.v1.ExpertBalancer/NoSuchMethod"), "%s", r.message);
    eplb_call_result_free(&r);
    cr_assert_eq(eplb_client_call(client, "/other.Service/Method", "x", 1, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 12);
    eplb_call_result_free(&r);

    /* Still serving after all that. */
    upb_Arena *a = upb_Arena_New();
    do_register(a, register_request(a, "ds", moe_handle(a, "DeepseekV3ForCausalLM", 2)), 0, &r);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, bad_model_name_and_missing_model) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    do_register(a, register_request(a, "has space", moe_handle(a, "X", 2)), 3, &r);
    cr_assert_not_null(strstr(r.message, "model_name"), "%s", r.message);
    eplb_call_result_free(&r);
    eplb_v1_RegisterModelRequest *req = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(req, upb_StringView_FromString("nomodel"));
    eplb_v1_ParallelConfig_set_enable_eplb(eplb_v1_RegisterModelRequest_mutable_parallel(req, a), true);
    do_register(a, req, 3, &r);
    cr_assert_str_eq(r.message, "model is required");
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, restart_finds_the_model_again) {
    upb_Arena *a = upb_Arena_New();
    eplb_call_result r;
    do_register(a, register_request(a, "kimi", wrap(a, "KimiK25ForConditionalGeneration",
                                                    moe_handle(a, "DeepseekV3ForCausalLM", 4))), 0, &r);
    eplb_call_result_free(&r);

    eplb_client_close(client);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_start(&srv); /* same database file */
    client = eplb_client_open(srv.addr);

    eplb_v1_Placement *p = get_placement(a, "kimi", 0, &r);
    check_initial_placement(p, 4);
    eplb_call_result_free(&r);
    eplb_v1_RegisterModelResponse *resp = do_register(
        a, register_request(a, "kimi", wrap(a, "KimiK25ForConditionalGeneration", moe_handle(a, "DeepseekV3ForCausalLM", 4))),
        0, &r);
    cr_assert(eplb_v1_RegisterModelResponse_registered(resp));
    cr_assert(sv_eq(eplb_v1_RegisterModelResponse_reason(resp), "already registered; placement kept at epoch 0"));
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    stop();
}

Test(server, concurrent_registrations_all_land) {
    /* Several client processes (eplbctl) at once, each registering its own
     * model; gRPC must not be used across fork(), so each is exec'd. */
    enum { CLIENTS = 6 };
    char cmd[8192];
    int n = snprintf(cmd, sizeof cmd, "set -e; pids=''; ");
    for (int i = 0; i < CLIENTS; i++)
        n += snprintf(cmd + n, sizeof cmd - (size_t)n,
                      "%s --addr %s register '{\"model_name\":\"model-%d\",\"model\":{\"architecture\":\"M\","
                      "\"interfaces\":[\"MIXTURE_OF_EXPERTS\"],\"moe\":{\"num_moe_layers\":2,\"num_logical_experts\":4,"
                      "\"num_physical_experts\":6,\"num_local_physical_experts\":3,\"num_redundant_experts\":2}},"
                      "\"parallel\":{\"enable_eplb\":true,\"ep_size\":2}}' >/dev/null & pids=\"$pids $!\"; ",
                      EPLBCTL_PATH, srv.addr, i);
    snprintf(cmd + n, sizeof cmd - (size_t)n, "for p in $pids; do wait $p; done");
    cr_assert_eq(system(cmd), 0, "a concurrent RegisterModel failed");
    upb_Arena *a = upb_Arena_New();
    for (int i = 0; i < CLIENTS; i++) {
        char name[32];
        eplb_call_result r;
        snprintf(name, sizeof name, "model-%d", i);
        get_placement(a, name, 0, &r);
        eplb_call_result_free(&r);
    }
    upb_Arena_Free(a);
    stop();
}

Test(server, eplbctl_json_in_json_out) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s --addr %s register '{\"model_name\":\"cli\",\"model\":{\"architecture\":\"KimiK25ForConditionalGeneration\","
             "\"interfaces\":[\"SUPPORTS_MULTIMODAL\"],\"language_model\":{\"architecture\":\"DeepseekV3ForCausalLM\","
             "\"interfaces\":[\"MIXTURE_OF_EXPERTS\"],\"moe\":{\"num_moe_layers\":1,\"num_logical_experts\":4,"
             "\"num_physical_experts\":6,\"num_local_physical_experts\":3,\"num_redundant_experts\":2}}},"
             "\"parallel\":{\"enable_eplb\":true,\"ep_size\":2}}' && %s --addr %s get cli && %s --addr %s health",
             EPLBCTL_PATH, srv.addr, EPLBCTL_PATH, srv.addr, EPLBCTL_PATH, srv.addr);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    char out[8192];
    size_t n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    cr_assert_eq(pclose(f), 0, "eplbctl failed: %s", out);
    cr_assert_not_null(strstr(out, "\"resolved_path\":\"KimiK25ForConditionalGeneration.language_model\""), "%s", out);
    cr_assert_not_null(strstr(out, "\"physical_to_logical\":[0,1,2,3,0,1]"), "%s", out);
    cr_assert_not_null(strstr(out, "{\"status\": \"SERVING\"}"), "%s", out);

    /* Every RPC is reachable from eplbctl (here: the error paths). */
    snprintf(cmd, sizeof cmd, "%s --addr %s detach '{\"model_id\":\"nosuch\"}' 2>&1", EPLBCTL_PATH, srv.addr);
    f = popen(cmd, "r");
    n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    pclose(f);
    cr_assert_not_null(strstr(out, "DetachWeights: NOT_FOUND"), "%s", out);

    snprintf(cmd, sizeof cmd, "%s --addr %s get nosuch 2>&1", EPLBCTL_PATH, srv.addr);
    f = popen(cmd, "r");
    n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    int status = pclose(f);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "%s", out);
    cr_assert_not_null(strstr(out, "GetPlacement: NOT_FOUND: model nosuch is not registered"), "%s", out);
    stop();
}

/* ---- flags: unix socket, message size limit ------------------------------ */

Test(server_flags, unix_socket_and_max_message_size, .timeout = 300) {
    eplbd_proc p;
    memset(&p, 0, sizeof p);
    eplbd_tmpdir(&p);
    char listen[192];
    snprintf(listen, sizeof listen, "unix:%s/eplbd.sock", p.dir);
    /* Large enough for the registration's largest possible response (the
     * server refuses a shape whose placement it could not send). */
    p.extra[0] = "--max-message-bytes";
    p.extra[1] = "8192";
    p.extra[2] = "--listen"; /* the last --listen wins */
    p.extra[3] = listen;
    eplbd_start(&p);
    cr_assert_str_eq(p.addr, listen);
    eplb_client *c = eplb_client_open(p.addr);
    upb_Arena *a = upb_Arena_New();
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(register_request(a, "ds", moe_handle(a, "M", 2)), a, &len);
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(c, "/eplb.v1.ExpertBalancer/RegisterModel", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 0, "%s", r.message);
    eplb_call_result_free(&r);

    /* A request past --max-message-bytes is refused by gRPC itself. */
    eplb_v1_RecordLoadRequest *big = eplb_v1_RecordLoadRequest_new(a);
    eplb_v1_RecordLoadRequest_set_model_id(big, upb_StringView_FromString("ds"));
    int64_t *load = eplb_v1_RecordLoadRequest_resize_physical_load(big, 4096, a);
    for (int i = 0; i < 4096; i++)
        load[i] = 1000000;
    bytes = eplb_v1_RecordLoadRequest_serialize(big, a, &len);
    cr_assert_gt(len, 8192);
    cr_assert_eq(eplb_client_call(c, "/eplb.v1.ExpertBalancer/RecordLoad", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 8 /* RESOURCE_EXHAUSTED */, "%s: %s", eplb_grpc_status_name(r.status), r.message);
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    eplbd_suite_stop(&p, c);
}
