/* test_engine_rpc.c -- the placement engine over real gRPC: register ->
 * record load -> rebalance -> get placement; elastic scale-up; refusals
 * leave placement and epoch unchanged; concurrent rebalances serialise;
 * kill -9 and restart serve the last committed epoch. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

static eplbd_proc srv;
static eplb_client *client;

static void start(void) { eplbd_suite_start(&srv, &client); }

static void stop(void) { eplbd_suite_stop(&srv, client); }

/* The server is stopped at the end of each test body, not in .fini:
 * Criterion ignores a failed assertion in .fini, and the stop asserts a
 * clean exit at SIGTERM (valgrind and sanitizer verdicts). */
TestSuite(engine_rpc, .init = start, .timeout = 300);

/* The deepseek-ai/EPLB README example as a model: 2 layers, 12 experts,
 * 16 slots, 4 groups, 2 nodes, 8 GPUs. */
static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};
static const int32_t readme_phy2log[32] = { 5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                                            7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1 };

static void register_readme(upb_Arena *a, const char *name) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("ReadmeMoE"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, 2);
    eplb_v1_MoeSpec_set_num_logical_experts(m, 12);
    eplb_v1_MoeSpec_set_num_physical_experts(m, 16);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, 2);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, 4);
    eplb_v1_MoeSpec_set_num_expert_groups(m, 4);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, 8);
    eplb_v1_ParallelConfig_set_num_nodes(p, 2);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    eplb_call_result res;
    cr_assert_eq(eplb_client_call(client, "/eplb.v1.ExpertBalancer/RegisterModel", bytes, len, call_timeout_ms(), &res), 0);
    cr_assert_eq(res.status, 0, "%s", res.message);
    eplb_call_result_free(&res);
}

static int call(const char *method, const char *bytes, size_t len, eplb_call_result *r) {
    char path[128];
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(client, path, bytes, len, call_timeout_ms(), r), 0);
    return r->status;
}

static eplb_v1_Placement *get(upb_Arena *a, const char *id) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0, "%s", r.message);
    /* Copy the body into the arena: the parsed message points into it. */
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    cr_assert_not_null(p);
    return p;
}

/* Physical load [2][P] whose logical sum is the README load (first slot of
 * each expert, under the initial map). */
static int64_t *readme_physical(upb_Arena *a, uint32_t P) {
    int64_t *v = upb_Arena_Malloc(a, 2 * P * sizeof *v);
    memset(v, 0, 2 * P * sizeof *v);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++)
            v[l * P + (uint32_t)e] = readme_load[l][e];
    return v;
}

static void record(upb_Arena *a, const char *id, const int64_t *load, size_t n, int expect) {
    eplb_v1_RecordLoadRequest *req = eplb_v1_RecordLoadRequest_new(a);
    eplb_v1_RecordLoadRequest_set_model_id(req, upb_StringView_FromString(id));
    int64_t *dst = eplb_v1_RecordLoadRequest_resize_physical_load(req, n, a);
    memcpy(dst, load, n * sizeof *load);
    size_t len;
    char *bytes = eplb_v1_RecordLoadRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("RecordLoad", bytes, len, &r), expect, "RecordLoad: %s", r.message);
    eplb_call_result_free(&r);
}

typedef struct rebalance_args {
    const int64_t *load;
    size_t n;
    int has_epoch;
    uint64_t epoch;
    int dry_run;
    int algorithm;
} rebalance_args;

static eplb_v1_RebalanceResponse *rebalance(upb_Arena *a, const char *id, rebalance_args args, int expect,
                                            char *msg, size_t msglen) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString(id));
    if (args.n) {
        int64_t *dst = eplb_v1_RebalanceRequest_resize_physical_load(req, args.n, a);
        memcpy(dst, args.load, args.n * sizeof *dst);
    }
    if (args.has_epoch)
        eplb_v1_RebalanceRequest_set_expected_epoch(req, args.epoch);
    eplb_v1_RebalanceRequest_set_dry_run(req, args.dry_run);
    if (args.algorithm)
        eplb_v1_RebalanceRequest_set_slot_order(req, eplb_v1_SLOT_ORDER_ALGORITHM);
    size_t len;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    eplb_call_result r;
    int st = call("Rebalance", bytes, len, &r);
    cr_assert_eq(st, expect, "Rebalance: %s: %s", eplb_grpc_status_name(st), r.message);
    if (msg)
        snprintf(msg, msglen, "%s", r.message);
    eplb_v1_RebalanceResponse *resp = NULL;
    if (st == 0) {
        char *body = upb_Arena_Malloc(a, r.body_len + 1);
        memcpy(body, r.body, r.body_len);
        resp = eplb_v1_RebalanceResponse_parse(body, r.body_len, a);
        cr_assert_not_null(resp);
    }
    eplb_call_result_free(&r);
    return resp;
}

static void assert_epoch_and_map(upb_Arena *a, uint64_t epoch, const int32_t *map, size_t n) {
    eplb_v1_Placement *p = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(p), epoch);
    size_t got;
    const int32_t *m = eplb_v1_Placement_physical_to_logical(p, &got);
    cr_assert_eq(got, n);
    cr_assert_arr_eq(m, map, n * sizeof *map);
}

Test(engine_rpc, register_record_rebalance_get) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    int64_t *load = readme_physical(a, 16);
    record(a, "m", load, 32, 0);
    eplb_v1_RebalanceResponse *resp = rebalance(a, "m", (rebalance_args){ .algorithm = 1 }, 0, NULL, 0);
    cr_assert(eplb_v1_RebalanceResponse_committed(resp));
    const eplb_v1_Placement *p = eplb_v1_RebalanceResponse_placement(resp);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 1);
    size_t n;
    cr_assert_arr_eq(eplb_v1_Placement_physical_to_logical(p, &n), readme_phy2log, sizeof readme_phy2log);
    cr_assert_gt(eplb_v1_RebalanceResponse_balancedness_after(resp), eplb_v1_RebalanceResponse_balancedness_before(resp));
    eplb_v1_RebalanceResponse_layer_balancedness_after(resp, &n);
    cr_assert_eq(n, 2);
    assert_epoch_and_map(a, 1, readme_phy2log, 32);
    upb_Arena_Free(a);
    stop();
}

Test(engine_rpc, scale_up_then_rebalance_fills_empty_slots) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    eplb_v1_Placement *p = get(a, "m");
    size_t n;
    const int32_t *old = eplb_v1_Placement_physical_to_logical(p, &n);
    eplb_v1_SetupFromMappingRequest *req = eplb_v1_SetupFromMappingRequest_new(a);
    eplb_v1_SetupFromMappingRequest_set_model_id(req, upb_StringView_FromString("m"));
    int32_t *exp = eplb_v1_SetupFromMappingRequest_resize_expanded_physical_to_logical(req, 48, a);
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 24; s++)
            exp[l * 24 + s] = s < 16 ? old[l * 16 + s] : -1;
    eplb_v1_SetupFromMappingRequest_set_num_physical_experts(req, 24);
    eplb_v1_SetupFromMappingRequest_set_old_num_physical_experts(req, 16);
    eplb_v1_SetupFromMappingRequest_set_ep_size(req, 12);
    eplb_v1_SetupFromMappingRequest_set_expected_epoch(req, 0);
    size_t len;
    char *bytes = eplb_v1_SetupFromMappingRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("SetupFromMapping", bytes, len, &r), 0, "%s", r.message);
    eplb_call_result_free(&r);
    p = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(p), 1);
    cr_assert_eq(eplb_v1_Placement_num_physical_experts(p), 24);
    cr_assert_eq(eplb_v1_Placement_num_valid_physical_experts(p), 16);

    eplb_v1_RebalanceResponse *resp =
        rebalance(a, "m", (rebalance_args){ .load = readme_physical(a, 24), .n = 48, .has_epoch = 1, .epoch = 1 }, 0, NULL, 0);
    const int32_t *m = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(resp), &n);
    cr_assert_eq(n, 48);
    for (size_t i = 0; i < n; i++)
        cr_assert_geq(m[i], 0, "slot %zu still empty after the rebalance", i);
    p = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(p), 2);
    cr_assert_eq(eplb_v1_Placement_num_valid_physical_experts(p), 24);
    upb_Arena_Free(a);
    stop();
}

Test(engine_rpc, every_refusal_leaves_placement_and_epoch_unchanged) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    int64_t *load = readme_physical(a, 16);
    rebalance(a, "m", (rebalance_args){ .load = load, .n = 32 }, 0, NULL, 0);
    eplb_v1_Placement *p = get(a, "m");
    size_t n;
    const int32_t *committed = eplb_v1_Placement_physical_to_logical(p, &n);
    int32_t map[32];
    memcpy(map, committed, sizeof map);
    char msg[512];

    rebalance(a, "m", (rebalance_args){ .load = load, .n = 31 }, 3, msg, sizeof msg);
    cr_assert_not_null(strstr(msg, "physical_load has 31 entries"), "%s", msg);
    rebalance(a, "m", (rebalance_args){ .load = load, .n = 32, .has_epoch = 1, .epoch = 0 }, 10, msg, sizeof msg);
    cr_assert_not_null(strstr(msg, "at epoch 1, the request expected epoch 0"), "%s", msg);
    rebalance(a, "nope", (rebalance_args){ .load = load, .n = 32 }, 5, NULL, 0);
    rebalance(a, "m", (rebalance_args){ .load = load, .n = 32, .dry_run = 1 }, 0, NULL, 0);
    int64_t *neg = readme_physical(a, 16);
    neg[3] = -1;
    rebalance(a, "m", (rebalance_args){ .load = neg, .n = 32 }, 3, NULL, 0);
    record(a, "m", neg, 32, 3);
    record(a, "m", load, 30, 3);
    assert_epoch_and_map(a, 1, map, 32);

    /* Malformed bytes for each new method. */
    static const char garbage[] = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0f";
    const char *methods[] = { "SetupFromMapping", "Rebalance", "RecordLoad" };
    for (int i = 0; i < 3; i++) {
        eplb_call_result r;
        cr_assert_eq(call(methods[i], garbage, sizeof garbage - 1, &r), 3, "%s", methods[i]);
        eplb_call_result_free(&r);
    }
    /* SetupFromMapping with a handle that is not this model, and a bad entry. */
    eplb_v1_SetupFromMappingRequest *req = eplb_v1_SetupFromMappingRequest_new(a);
    eplb_v1_SetupFromMappingRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_ModelHandle *h = eplb_v1_SetupFromMappingRequest_mutable_model(req, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("LlavaForConditionalGeneration"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_SUPPORTS_MULTIMODAL, a);
    int32_t *exp = eplb_v1_SetupFromMappingRequest_resize_expanded_physical_to_logical(req, 32, a);
    memcpy(exp, map, sizeof map);
    eplb_v1_SetupFromMappingRequest_set_num_physical_experts(req, 16);
    eplb_v1_SetupFromMappingRequest_set_old_num_physical_experts(req, 16);
    eplb_v1_SetupFromMappingRequest_set_ep_size(req, 8);
    size_t len;
    char *bytes = eplb_v1_SetupFromMappingRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("SetupFromMapping", bytes, len, &r), 9, "%s", r.message);
    eplb_call_result_free(&r);
    eplb_v1_SetupFromMappingRequest_clear_model(req);
    exp[5] = 99;
    bytes = eplb_v1_SetupFromMappingRequest_serialize(req, a, &len);
    cr_assert_eq(call("SetupFromMapping", bytes, len, &r), 3, "%s", r.message);
    cr_assert_not_null(strstr(r.message, "expanded_physical_to_logical[layer 0][slot 5] = 99"), "%s", r.message);
    eplb_call_result_free(&r);
    assert_epoch_and_map(a, 1, map, 32);
    upb_Arena_Free(a);
    stop();
}

/* Run `count` eplbctl rebalances at once; returns how many exited 0. */
static int concurrent_rebalances(int count, const char *extra) {
    char cmd[16384];
    int n = snprintf(cmd, sizeof cmd, "ok=0; pids=''; ");
    char load[512] = "";
    int k = 0;
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 16; s++)
            k += snprintf(load + k, sizeof load - (size_t)k, "%s%lld", k ? "," : "",
                          (long long)(s < 12 ? readme_load[l][s] + s * 7 : 0));
    for (int i = 0; i < count; i++)
        n += snprintf(cmd + n, sizeof cmd - (size_t)n,
                      "%s --addr %s rebalance '{\"model_id\":\"m\",\"physical_load\":[%s]%s}' >/dev/null 2>&1 & "
                      "pids=\"$pids $!\"; ",
                      EPLBCTL_PATH, srv.addr, load, extra);
    snprintf(cmd + n, sizeof cmd - (size_t)n, "for p in $pids; do wait $p && ok=$((ok+1)); done; exit $ok");
    int status = system(cmd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Test(engine_rpc, concurrent_rebalances_serialize) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    /* No expected epoch: every commit lands, one after the other. */
    cr_assert_eq(concurrent_rebalances(8, ""), 8);
    cr_assert_eq(eplb_v1_Placement_epoch(get(a, "m")), 8);
    /* All expecting epoch 8: exactly one wins, the rest are ABORTED. */
    cr_assert_eq(concurrent_rebalances(8, ",\"expected_epoch\":8"), 1);
    cr_assert_eq(eplb_v1_Placement_epoch(get(a, "m")), 9);
    upb_Arena_Free(a);
    stop();
}

Test(engine_rpc, kill_9_then_restart_serves_the_last_committed_epoch) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    int64_t *load = readme_physical(a, 16);
    eplb_v1_RebalanceResponse *last = NULL;
    for (int i = 0; i < 5; i++)
        last = rebalance(a, "m", (rebalance_args){ .load = load, .n = 32 }, 0, NULL, 0);
    size_t n;
    int32_t map[32];
    memcpy(map, eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(last), &n), sizeof map);
    record(a, "m", load, 32, 0);
    eplb_client_close(client);
    kill(srv.pid, SIGKILL);
    waitpid(srv.pid, NULL, 0);
    eplbd_start(&srv);
    client = eplb_client_open(srv.addr);
    assert_epoch_and_map(a, 5, map, 32);
    upb_Arena_Free(a);
    stop();
}

Test(engine_rpc, clean_restart_keeps_epoch_and_window) {
    upb_Arena *a = upb_Arena_New();
    register_readme(a, "m");
    int64_t *load = readme_physical(a, 16);
    rebalance(a, "m", (rebalance_args){ .load = load, .n = 32, .algorithm = 1 }, 0, NULL, 0);
    /* Under the README map every expert's first slot is in log2phy: record
     * the README load again in physical terms of the new map. */
    eplb_v1_Placement *p = get(a, "m");
    size_t n;
    const int32_t *map = eplb_v1_Placement_physical_to_logical(p, &n);
    int64_t phys[32] = { 0 };
    for (int l = 0; l < 2; l++) {
        int seen[12] = { 0 };
        for (int s = 0; s < 16; s++) {
            int e = map[l * 16 + s];
            if (!seen[e]++)
                phys[l * 16 + s] = readme_load[l][e];
        }
    }
    record(a, "m", phys, 32, 0);
    eplb_client_close(client);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_start(&srv);
    client = eplb_client_open(srv.addr);
    assert_epoch_and_map(a, 1, readme_phy2log, 32);
    /* The window survived: a rebalance from it needs no load in the request
     * and, being the README load, reproduces the README map. */
    eplb_v1_RebalanceResponse *resp = rebalance(a, "m", (rebalance_args){ .algorithm = 1, .dry_run = 1 }, 0, NULL, 0);
    cr_assert_arr_eq(eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(resp), &n),
                     readme_phy2log, sizeof readme_phy2log);
    upb_Arena_Free(a);
    stop();
}
