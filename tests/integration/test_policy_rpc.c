/* test_policy_rpc.c -- cost-aware rebalancing (RebalanceRequest.policy,
 * target_balancedness, budgets, link costs; ParallelConfig's defaults for
 * automatic rebalances) over real gRPC to an eplbd in another process. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

static eplbd_proc srv;
static eplb_client *client;

static void start(void) { eplbd_suite_start(&srv, &client); }

static void stop(void) { eplbd_suite_stop(&srv, client); }

TestSuite(policy_rpc, .init = start, .timeout = 300);

/* 4 layers, 32 experts, 40 slots on 8 GPUs (2 nodes), 4 groups. */
#define L_ 4
#define N_ 32
#define P_ 40

static int call(const char *method, const char *bytes, size_t len, eplb_call_result *r) {
    char path[128];
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(client, path, bytes, len, call_timeout_ms(), r), 0);
    return r->status;
}

/* A RegisterModelRequest of L layers, N experts in P slots, on ep GPUs over nodes nodes. */
static eplb_v1_RegisterModelRequest *model_request(upb_Arena *a, const char *name, const char *arch, uint32_t L,
                                                   uint32_t N, uint32_t P, uint32_t groups, uint32_t ep,
                                                   uint32_t nodes) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString(arch));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, L);
    eplb_v1_MoeSpec_set_num_logical_experts(m, N);
    eplb_v1_MoeSpec_set_num_physical_experts(m, P);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, P / ep);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, P - N);
    eplb_v1_MoeSpec_set_num_expert_groups(m, groups);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, ep);
    eplb_v1_ParallelConfig_set_num_nodes(p, nodes);
    return r;
}

static void send_register(upb_Arena *a, const eplb_v1_RegisterModelRequest *r) {
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    eplb_call_result res;
    cr_assert_eq(call("RegisterModel", bytes, len, &res), 0, "%s", res.message);
    eplb_call_result_free(&res);
}

static void register_model(upb_Arena *a, const char *name, bool incremental_auto, uint64_t max_slots) {
    eplb_v1_RegisterModelRequest *r = model_request(a, name, "PolicyMoE", L_, N_, P_, 4, 8, 2);
    if (incremental_auto) {
        eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
        eplb_v1_ParallelConfig_set_auto_rebalance(p, true);
        eplb_v1_ParallelConfig_set_window_size(p, 1);
        eplb_v1_ParallelConfig_set_step_interval(p, 1);
        eplb_v1_ParallelConfig_set_default_policy(p, eplb_v1_POLICY_INCREMENTAL);
        eplb_v1_ParallelConfig_set_max_slots_moved(p, max_slots);
    }
    send_register(a, r);
}

static eplb_v1_Placement *get(upb_Arena *a, const char *id) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0, "%s", r.message);
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    cr_assert_not_null(p);
    return p;
}

/* A skewed load: per layer, a few hot experts. */
static void skewed(int64_t *load, int seed) {
    for (int l = 0; l < L_; l++)
        for (int e = 0; e < N_; e++)
            load[l * N_ + e] = 10 + ((e * 7 + l * 3 + seed) % N_ < 4 ? 5000 : (e * 13 + seed) % 97);
}

typedef struct knobs {
    int policy;
    double target;
    uint64_t max_bytes, max_slots, expert_bytes;
    double cross_node;
    int dry_run;
} knobs;

/* A Rebalance of model id with the [layers][experts] load logical (n values). */
static eplb_v1_RebalanceResponse *rebalance_n(upb_Arena *a, const char *id, const int64_t *logical, size_t n,
                                              knobs k, int expect, char *msg, size_t msglen) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString(id));
    int64_t *dst = eplb_v1_RebalanceRequest_resize_logical_load(req, n, a);
    memcpy(dst, logical, n * sizeof *dst);
    eplb_v1_RebalanceRequest_set_policy(req, k.policy);
    eplb_v1_RebalanceRequest_set_target_balancedness(req, k.target);
    eplb_v1_RebalanceRequest_set_max_bytes_moved(req, k.max_bytes);
    eplb_v1_RebalanceRequest_set_max_slots_moved(req, k.max_slots);
    eplb_v1_RebalanceRequest_set_expert_bytes(req, k.expert_bytes);
    eplb_v1_RebalanceRequest_set_dry_run(req, k.dry_run);
    if (k.cross_node) {
        eplb_v1_LinkCosts *c = eplb_v1_RebalanceRequest_mutable_link_costs(req, a);
        eplb_v1_LinkCosts_set_cross_node(c, k.cross_node);
    }
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

static eplb_v1_RebalanceResponse *rebalance(upb_Arena *a, const char *id, const int64_t *logical, knobs k,
                                            int expect, char *msg, size_t msglen) {
    return rebalance_n(a, id, logical, L_ * N_, k, expect, msg, msglen);
}

static size_t changed_slots(const eplb_v1_Placement *a, const eplb_v1_Placement *b) {
    size_t na, nb;
    const int32_t *x = eplb_v1_Placement_physical_to_logical(a, &na);
    const int32_t *y = eplb_v1_Placement_physical_to_logical(b, &nb);
    cr_assert_eq(na, nb);
    size_t d = 0;
    for (size_t i = 0; i < na; i++)
        d += x[i] != y[i];
    return d;
}

Test(policy_rpc, incremental_meets_target_and_reports) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m", false, 0);
    int64_t load[L_ * N_];
    skewed(load, 1);
    /* From scratch first, then the load drifts: INCREMENTAL starts from
     * that placement. */
    eplb_v1_RebalanceResponse *r0 = rebalance(a, "m", load, (knobs){ 0 }, 0, NULL, 0);
    cr_assert(eplb_v1_RebalanceResponse_committed(r0));
    cr_assert_eq(eplb_v1_RebalanceResponse_policy_used(r0), eplb_v1_POLICY_DEEPSEEK);
    cr_assert_float_eq(eplb_v1_RebalanceResponse_balancedness_reference(r0),
                       eplb_v1_RebalanceResponse_balancedness_after(r0), 1e-12);
    eplb_v1_Placement *before = get(a, "m");
    skewed(load, 5);
    eplb_v1_RebalanceResponse *r = rebalance(a, "m", load,
                                             (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .target = 0.95 }, 0,
                                             NULL, 0);
    cr_assert(eplb_v1_RebalanceResponse_committed(r), "%s", eplb_v1_RebalanceResponse_reason(r).data);
    double ref = eplb_v1_RebalanceResponse_balancedness_reference(r);
    double after = eplb_v1_RebalanceResponse_balancedness_after(r);
    cr_assert_gt(ref, 0);
    cr_assert_geq(after, 0.95 * ref - 1e-9, "%.6f < 0.95 x %.6f", after, ref);
    cr_assert_geq(after, eplb_v1_RebalanceResponse_balancedness_before(r) - 1e-9);
    eplb_v1_Placement *now = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(now), eplb_v1_Placement_epoch(before) + 1);
    cr_assert_eq(eplb_v1_RebalanceResponse_slots_moved(r), changed_slots(before, now));
    cr_assert_eq(eplb_v1_RebalanceResponse_experts_moved(r), changed_slots(before, now));
    /* What from scratch would have copied is reported, to compare. */
    cr_assert_geq(eplb_v1_RebalanceResponse_reference_copies_cross_gpu(r),
                  eplb_v1_RebalanceResponse_layers_from_scratch(r) ? 1 : 0);
    stop();
    upb_Arena_Free(a);
}

/* A layer whose nodes drift apart takes a node repair, and the answer
 * counts it.  DeepSeek's placement of the first load puts groups 0 and 3 on
 * one node (group loads 400 300 200 100: LPT packs 400 + 100 and 300 +
 * 200); the second load makes both of them hot (400 100 100 400).  No
 * change inside the nodes can help then, and swapping one group between
 * the nodes copies far fewer experts than DeepSeek's row re-packing all. */
Test(policy_rpc, node_repairs_are_reported) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "nr", false, 0);
    int64_t first[L_ * N_], second[L_ * N_];
    const int64_t ga[4] = { 400, 300, 200, 100 }, gb[4] = { 400, 100, 100, 400 };
    for (int l = 0; l < L_; l++)
        for (int e = 0; e < N_; e++) {
            first[l * N_ + e] = ga[e / 8] * (1 + (e + l) % 8);
            second[l * N_ + e] = gb[e / 8] * (1 + (e + 3 * l) % 8);
        }
    eplb_v1_RebalanceResponse *r = rebalance(a, "nr", first, (knobs){ .policy = eplb_v1_POLICY_DEEPSEEK }, 0, NULL, 0);
    cr_assert(eplb_v1_RebalanceResponse_committed(r));
    cr_assert_eq(eplb_v1_RebalanceResponse_layers_node_repaired(r), 0);
    r = rebalance(a, "nr", second, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .dry_run = 1 }, 0, NULL, 0);
    cr_assert_eq(eplb_v1_RebalanceResponse_layers_node_repaired(r), L_, "%u",
                 eplb_v1_RebalanceResponse_layers_node_repaired(r));
    cr_assert_eq(eplb_v1_RebalanceResponse_layers_from_scratch(r), 0);
    cr_assert_eq(eplb_v1_RebalanceResponse_policy_used(r), eplb_v1_POLICY_INCREMENTAL);
    upb_StringView why = eplb_v1_RebalanceResponse_reason(r);
    char reason[512];
    snprintf(reason, sizeof reason, "%.*s", (int)why.size, why.data);
    cr_assert(strstr(reason, "node repair"), "%s", reason);
    cr_assert_geq(eplb_v1_RebalanceResponse_balancedness_after(r),
                  0.99 * eplb_v1_RebalanceResponse_balancedness_reference(r) - 1e-9);
    cr_assert_lt(eplb_v1_RebalanceResponse_plan_copies_cross_gpu(r),
                 eplb_v1_RebalanceResponse_reference_copies_cross_gpu(r));
    stop();
    upb_Arena_Free(a);
}

Test(policy_rpc, budgets_are_respected_and_bytes_reported) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m", false, 0);
    int64_t load[L_ * N_];
    skewed(load, 2);
    eplb_v1_Placement *before = get(a, "m");
    /* 3 slots at most. */
    eplb_v1_RebalanceResponse *r = rebalance(
        a, "m", load, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .max_slots = 3, .dry_run = 1 }, 0, NULL, 0);
    cr_assert_leq(eplb_v1_RebalanceResponse_slots_moved(r), 3);
    /* Bytes: 2 experts' worth of 1 MiB. */
    r = rebalance(a, "m", load,
                  (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .max_bytes = 2u << 20, .expert_bytes = 1u << 20 }, 0,
                  NULL, 0);
    cr_assert_leq(eplb_v1_RebalanceResponse_plan_copies_cross_gpu(r), 2);
    cr_assert_eq(eplb_v1_RebalanceResponse_plan_bytes_cross_gpu(r),
                 eplb_v1_RebalanceResponse_plan_copies_cross_gpu(r) << 20);
    cr_assert_eq(eplb_v1_RebalanceResponse_plan_bytes_cross_node(r),
                 eplb_v1_RebalanceResponse_plan_copies_cross_node(r) << 20);
    eplb_v1_Placement *now = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(now), eplb_v1_Placement_epoch(before) + 1);
    cr_assert_leq(changed_slots(before, now), 2 * 2 + 2); /* each copy serves <= 1 swap half or one replacement */
    stop();
    upb_Arena_Free(a);
}

Test(policy_rpc, bad_knobs_change_nothing) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m", false, 0);
    int64_t load[L_ * N_];
    skewed(load, 3);
    char msg[512];
    eplb_v1_Placement *before = get(a, "m");
    rebalance(a, "m", load, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .max_bytes = 100 }, 3, msg, sizeof msg);
    cr_assert(strstr(msg, "expert_bytes"), "%s", msg);
    rebalance(a, "m", load, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .target = 1.5 }, 3, msg, sizeof msg);
    cr_assert(strstr(msg, "target_balancedness"), "%s", msg);
    rebalance(a, "m", load, (knobs){ .policy = 9 }, 3, msg, sizeof msg);
    cr_assert(strstr(msg, "policy 9"), "%s", msg);
    rebalance(a, "m", load, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .cross_node = -2 }, 3, msg, sizeof msg);
    cr_assert(strstr(msg, "link_costs"), "%s", msg);
    eplb_v1_Placement *now = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(now), eplb_v1_Placement_epoch(before));
    cr_assert_eq(changed_slots(before, now), 0);
    stop();
    upb_Arena_Free(a);
}

/* ParallelConfig's default policy and budget drive the automatic
 * rebalance: one slot per rebalance at most. */
Test(policy_rpc, automatic_rebalance_uses_the_model_policy) {
    upb_Arena *a = upb_Arena_New();
    register_model(a, "m", true, 1);
    eplb_v1_Placement *before = get(a, "m");
    int64_t load[L_ * N_];
    skewed(load, 4);
    /* One pass of physical load: each logical expert's load on its first slot
     * (the initial map holds expert e in slot e). */
    int64_t phys[L_ * P_];
    memset(phys, 0, sizeof phys);
    for (int l = 0; l < L_; l++)
        for (int e = 0; e < N_; e++)
            phys[l * P_ + e] = load[l * N_ + e];
    eplb_v1_RecordLoadRequest *req = eplb_v1_RecordLoadRequest_new(a);
    eplb_v1_RecordLoadRequest_set_model_id(req, upb_StringView_FromString("m"));
    int64_t *dst = eplb_v1_RecordLoadRequest_resize_physical_load(req, L_ * P_, a);
    memcpy(dst, phys, sizeof phys);
    size_t len;
    char *bytes = eplb_v1_RecordLoadRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("RecordLoad", bytes, len, &r), 0, "%s", r.message);
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_RecordLoadResponse *resp = eplb_v1_RecordLoadResponse_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    cr_assert_not_null(resp);
    cr_assert(eplb_v1_RecordLoadResponse_rebalanced(resp));
    eplb_v1_Placement *now = get(a, "m");
    cr_assert_eq(eplb_v1_Placement_epoch(now), eplb_v1_Placement_epoch(before) + 1);
    size_t d = changed_slots(before, now);
    cr_assert(d >= 1 && d <= 1, "%zu slots changed under a budget of 1", d);
    stop();
    upb_Arena_Free(a);
}

/* DeepSeek-V3 size on one node of 32 GPUs: the global path, where eplbd
 * searches the layers on two threads (eplb_incremental.c, "Two threads";
 * the TSan stage runs this against a TSan eplbd).  A from-scratch commit,
 * then a drifted load: the dry run meets the target, never loses, copies
 * far less than from scratch, and says the same twice. */
Test(policy_rpc, incremental_at_deepseek_v3_size) {
    enum { BL = 58, BN = 256, BP = 288 };
    upb_Arena *a = upb_Arena_New();
    send_register(a, model_request(a, "v3", "DeepseekV3ForCausalLM", BL, BN, BP, 8, 32, 1));
    static int64_t load[BL * BN];
    uint64_t x = 0x5eed;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < BL * BN; i++) { /* Zipf-like by a hashed rank, redrawn a little each pass */
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const int rank = (int)((i % BN) * 37 % BN) + (int)((x >> 33) % 8);
            load[i] = (int64_t)(1e6 / (1.0 + rank)) + (int64_t)((x >> 20) % 1000);
        }
        if (pass == 0) /* the placement INCREMENTAL starts from */
            rebalance_n(a, "v3", load, BL * BN, (knobs){ 0 }, 0, NULL, 0);
    }
    double after[2];
    uint64_t copies[2];
    for (int k = 0; k < 2; k++) {
        eplb_v1_RebalanceResponse *resp = rebalance_n(
            a, "v3", load, BL * BN, (knobs){ .policy = eplb_v1_POLICY_INCREMENTAL, .dry_run = 1 }, 0, NULL, 0);
        cr_assert_eq(eplb_v1_RebalanceResponse_policy_used(resp), eplb_v1_POLICY_INCREMENTAL);
        const double ref = eplb_v1_RebalanceResponse_balancedness_reference(resp);
        after[k] = eplb_v1_RebalanceResponse_balancedness_after(resp);
        copies[k] = eplb_v1_RebalanceResponse_plan_copies_cross_gpu(resp);
        cr_assert_geq(after[k], 0.99 * ref - 1e-9, "%.6f < 0.99 x %.6f", after[k], ref);
        cr_assert_geq(after[k], eplb_v1_RebalanceResponse_balancedness_before(resp) - 1e-9);
        cr_assert_lt(eplb_v1_RebalanceResponse_balancedness_before(resp), 0.99 * ref, "the drift left nothing to do");
        cr_assert_gt(copies[k], 0);
        cr_assert_lt(copies[k], eplb_v1_RebalanceResponse_reference_copies_cross_gpu(resp) / 2);
    }
    cr_assert(after[0] == after[1] && copies[0] == copies[1]);
    stop();
    upb_Arena_Free(a);
}
