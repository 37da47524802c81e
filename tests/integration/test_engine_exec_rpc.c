/* test_engine_exec_rpc.c -- engine-executed rebalances over real gRPC to a
 * separate eplbd process: Rebalance(EXECUTION_ENGINE) -> GetTransferPlan
 * for every rank -> the plans, executed here on simulated ranks, turn the
 * served map into the target -> CommitRebalance (epoch + 1, placement ==
 * target); abort with 0 and with > 0 bytes touched; a wrong id, a bad
 * rank, an unknown id; SIGKILL of eplbd while pending, then a restart:
 * still pending (GetPlacement), the same plan, and the commit works. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

static eplbd_proc srv;
static eplb_client *client;

static void start(void) { eplbd_suite_start(&srv, &client); }
static void stop(void) { eplbd_suite_stop(&srv, client); }

TestSuite(engine_exec_rpc, .init = start, .timeout = 300);

#define L 4
#define N 12
#define P 16
#define G 8
#define S (P / G)

static void register_model(upb_Arena *a) {
    eplb_v1_RegisterModelRequest *r = harness_moe_request(a, "m", L, N, P, G);
    eplb_v1_ParallelConfig_set_num_nodes(eplb_v1_RegisterModelRequest_mutable_parallel(r, a), 2);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    char msg[512];
    cr_assert_eq(harness_rpc(client, "RegisterModel", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "%s", msg);
}

static int64_t load[L * P];

static void make_load(void) {
    for (int l = 0; l < L; l++)
        for (int e = 0; e < N; e++)
            load[l * P + e] = 10 + (e * 7 + l * 5) % 13 + (e == (l * 5) % N ? 500 : 0);
}

/* Rebalance; engine: EXECUTION_ENGINE; dry: a dry run (the target). */
static eplb_v1_RebalanceResponse *rebalance(upb_Arena *a, bool engine, bool dry, uint32_t per_step, int expect) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    int64_t *dst = eplb_v1_RebalanceRequest_resize_physical_load(req, L * P, a);
    memcpy(dst, load, sizeof load);
    eplb_v1_RebalanceRequest_set_dry_run(req, dry);
    eplb_v1_RebalanceRequest_set_force(req, true);
    eplb_v1_RebalanceRequest_set_layers_per_step(req, per_step);
    if (engine)
        eplb_v1_RebalanceRequest_set_execution(req, eplb_v1_EXECUTION_ENGINE);
    size_t len;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len), *body = NULL, msg[512];
    size_t blen = 0;
    int st = harness_rpc(client, "Rebalance", bytes, len, a, &body, &blen, msg, sizeof msg);
    cr_assert_eq(st, expect, "Rebalance: %d %s", st, msg);
    if (st)
        return NULL;
    eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_parse(body, blen, a);
    cr_assert_not_null(resp);
    return resp;
}

static eplb_v1_Placement *get(upb_Arena *a) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString("m"));
    size_t len, blen = 0;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len), *body = NULL;
    cr_assert_eq(harness_rpc(client, "GetPlacement", bytes, len, a, &body, &blen, NULL, 0), 0);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, blen, a);
    cr_assert_not_null(p);
    return p;
}

/* GetTransferPlan: its status; the plan (and raw bytes) when OK. */
static int get_plan(upb_Arena *a, const char *rid, uint32_t rank, eplb_v1_TransferPlan **out, char **raw,
                    size_t *raw_len, char *msg, size_t n) {
    eplb_v1_GetTransferPlanRequest *req = eplb_v1_GetTransferPlanRequest_new(a);
    eplb_v1_GetTransferPlanRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_GetTransferPlanRequest_set_rebalance_id(req, upb_StringView_FromString(rid));
    eplb_v1_GetTransferPlanRequest_set_rank(req, rank);
    size_t len, blen = 0;
    char *bytes = eplb_v1_GetTransferPlanRequest_serialize(req, a, &len), *body = NULL;
    int st = harness_rpc(client, "GetTransferPlan", bytes, len, a, &body, &blen, msg, n);
    if (st == 0) {
        *out = eplb_v1_TransferPlan_parse(body, blen, a);
        cr_assert_not_null(*out);
        if (raw) {
            *raw = body;
            *raw_len = blen;
        }
    }
    return st;
}

static int commit(upb_Arena *a, const char *rid, bool has_base, uint64_t base, eplb_v1_RebalanceResponse **out,
                  char *msg, size_t n) {
    eplb_v1_CommitRebalanceRequest *req = eplb_v1_CommitRebalanceRequest_new(a);
    eplb_v1_CommitRebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_CommitRebalanceRequest_set_rebalance_id(req, upb_StringView_FromString(rid));
    if (has_base)
        eplb_v1_CommitRebalanceRequest_set_base_epoch(req, base);
    size_t len, blen = 0;
    char *bytes = eplb_v1_CommitRebalanceRequest_serialize(req, a, &len), *body = NULL;
    int st = harness_rpc(client, "CommitRebalance", bytes, len, a, &body, &blen, msg, n);
    if (st == 0 && out) {
        *out = eplb_v1_RebalanceResponse_parse(body, blen, a);
        cr_assert_not_null(*out);
    }
    return st;
}

static int abort_rb(upb_Arena *a, const char *rid, uint64_t touched, eplb_v1_AbortRebalanceResponse **out) {
    eplb_v1_AbortRebalanceRequest *req = eplb_v1_AbortRebalanceRequest_new(a);
    eplb_v1_AbortRebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_AbortRebalanceRequest_set_rebalance_id(req, upb_StringView_FromString(rid));
    eplb_v1_AbortRebalanceRequest_set_bytes_touched(req, touched);
    size_t len, blen = 0;
    char *bytes = eplb_v1_AbortRebalanceRequest_serialize(req, a, &len), *body = NULL;
    int st = harness_rpc(client, "AbortRebalance", bytes, len, a, &body, &blen, NULL, 0);
    if (st == 0 && out)
        *out = eplb_v1_AbortRebalanceResponse_parse(body, blen, a);
    return st;
}

static const char *rid_of(upb_Arena *a, const eplb_v1_RebalanceResponse *r) {
    upb_StringView v = eplb_v1_RebalanceResponse_rebalance_id(r);
    char *s = upb_Arena_Malloc(a, v.size + 1);
    memcpy(s, v.data, v.size);
    s[v.size] = '\0';
    return s;
}

/* Run every rank's fetched plan on map ([L][P] expert ids), as the engine
 * would: per step all ranks at once, each SEND delivered to the RECV of the
 * same (sender, receiver, tag); counts the cross-node slots moved. */
static void execute(eplb_v1_TransferPlan *const plans[G], int32_t *map, uint64_t *cross_node) {
    const uint32_t steps = eplb_v1_TransferPlan_num_steps(plans[0]);
    int32_t staging[G][P + 1], snap_stg[G][P + 1], snap[P];
    memset(staging, 0xff, sizeof staging);
    *cross_node = 0;
    for (uint32_t k = 0; k < steps; k++) {
        const eplb_v1_TransferStep *st[G];
        for (uint32_t g = 0; g < G; g++) {
            size_t n;
            const eplb_v1_RankTransferPlan *const *rp = eplb_v1_TransferPlan_ranks(plans[g], &n);
            cr_assert_eq(n, 1);
            cr_assert_eq(eplb_v1_RankTransferPlan_rank(rp[0]), g);
            const eplb_v1_TransferStep *const *steps_g = eplb_v1_RankTransferPlan_steps(rp[0], &n);
            cr_assert_eq(n, steps, "every rank has every step");
            st[g] = steps_g[k];
            cr_assert_eq(eplb_v1_TransferStep_layer(st[g]), eplb_v1_TransferStep_layer(st[0]));
            cr_assert_eq(eplb_v1_TransferStep_chunk(st[g]), eplb_v1_TransferStep_chunk(st[0]));
        }
        int32_t *row = map + (size_t)eplb_v1_TransferStep_layer(st[0]) * P;
        memcpy(snap, row, sizeof snap);
        memcpy(snap_stg, staging, sizeof snap_stg);
        for (uint32_t g = 0; g < G; g++) {
            size_t n;
            const eplb_v1_TransferOp *const *ops = eplb_v1_TransferStep_ops(st[g], &n);
            for (size_t i = 0; i < n; i++) {
                const eplb_v1_TransferOp *op = ops[i];
                int kind = eplb_v1_TransferOp_kind(op);
                if (kind == eplb_v1_TRANSFER_OP_RECV)
                    continue;
                uint32_t src = eplb_v1_TransferOp_src(op);
                int32_t v = eplb_v1_TransferOp_src_staging(op) ? snap_stg[g][src] : snap[g * S + src];
                cr_assert_eq(v, eplb_v1_TransferOp_expert(op));
                uint32_t dg = g, dst = eplb_v1_TransferOp_dst(op);
                bool dstg = eplb_v1_TransferOp_dst_staging(op);
                if (kind == eplb_v1_TRANSFER_OP_SEND) {
                    dg = eplb_v1_TransferOp_peer_rank(op);
                    size_t m;
                    const eplb_v1_TransferOp *const *peer = eplb_v1_TransferStep_ops(st[dg], &m);
                    int found = 0;
                    for (size_t j = 0; j < m; j++)
                        if (eplb_v1_TransferOp_kind(peer[j]) == eplb_v1_TRANSFER_OP_RECV &&
                            eplb_v1_TransferOp_peer_rank(peer[j]) == g &&
                            eplb_v1_TransferOp_tag(peer[j]) == eplb_v1_TransferOp_tag(op)) {
                            found++;
                            dst = eplb_v1_TransferOp_dst(peer[j]);
                            dstg = eplb_v1_TransferOp_dst_staging(peer[j]);
                        }
                    cr_assert_eq(found, 1);
                    *cross_node += eplb_v1_TransferOp_cross_node(op);
                }
                if (dstg)
                    staging[dg][dst] = v;
                else
                    row[dg * S + dst] = v;
            }
        }
    }
}

static void fetch_all(upb_Arena *a, const char *rid, eplb_v1_TransferPlan *plans[G]) {
    for (uint32_t g = 0; g < G; g++) {
        char msg[512];
        cr_assert_eq(get_plan(a, rid, g, &plans[g], NULL, NULL, msg, sizeof msg), 0, "rank %u: %s", g, msg);
        cr_assert_eq(eplb_v1_TransferPlan_num_ranks(plans[g]), G);
        cr_assert_eq(eplb_v1_TransferPlan_ranks_per_node(plans[g]), G / 2);
        cr_assert_eq(eplb_v1_TransferPlan_num_local_physical_experts(plans[g]), S);
    }
}

static void expect_map(eplb_v1_Placement *p, const int32_t *want) {
    size_t n;
    const int32_t *m = eplb_v1_Placement_physical_to_logical(p, &n);
    cr_assert_eq(n, L * P);
    cr_assert_arr_eq(m, want, L * P * sizeof *want);
}

Test(engine_exec_rpc, plan_fetch_execute_commit) {
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    make_load();
    eplb_v1_RebalanceResponse *dry = rebalance(a, false, true, 0, 0);
    size_t n;
    const int32_t *target = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(dry), &n);
    int32_t map[L * P];
    {
        size_t m;
        memcpy(map, eplb_v1_Placement_physical_to_logical(get(a), &m), sizeof map);
    }
    eplb_v1_RebalanceResponse *r = rebalance(a, true, false, 0, 0);
    cr_assert_not(eplb_v1_RebalanceResponse_committed(r));
    cr_assert(eplb_v1_RebalanceResponse_pending(r));
    const char *rid = rid_of(a, r);
    cr_assert_eq(strlen(rid), 16);
    cr_assert_not(eplb_v1_RebalanceResponse_has_transfer_plan(r), "not asked for");
    eplb_v1_Placement *p = get(a);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    expect_map(p, map);
    upb_StringView pid = eplb_v1_Placement_pending_rebalance_id(p);
    cr_assert_eq(pid.size, 16);
    cr_assert_eq(memcmp(pid.data, rid, 16), 0);
    cr_assert_eq(eplb_v1_Placement_pending_execution(p), eplb_v1_EXECUTION_ENGINE);

    eplb_v1_TransferPlan *plans[G];
    fetch_all(a, rid, plans);
    uint64_t cross_node = 0;
    execute(plans, map, &cross_node);
    cr_assert_arr_eq(map, target, sizeof map, "executed plans give the target");
    /* The plan's own count of cross-node copies is what moved across nodes. */
    cr_assert_eq(cross_node, eplb_v1_TransferPlan_copies_cross_node(plans[0]));

    eplb_v1_RebalanceResponse *c = NULL;
    char msg[512];
    cr_assert_eq(commit(a, rid, true, 0, &c, msg, sizeof msg), 0, "%s", msg);
    cr_assert(eplb_v1_RebalanceResponse_committed(c));
    cr_assert_not(eplb_v1_RebalanceResponse_pending(c));
    p = get(a);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 1);
    expect_map(p, target);
    cr_assert_eq(eplb_v1_Placement_pending_rebalance_id(p).size, 0);
    /* Again: the id is gone, nothing changes. */
    cr_assert_eq(commit(a, rid, false, 0, NULL, msg, sizeof msg), 10 /* ABORTED */, "%s", msg);
    cr_assert_eq(eplb_v1_Placement_epoch(get(a)), 1);
    upb_Arena_Free(a);
    stop();
}

Test(engine_exec_rpc, wrong_id_bad_rank_unknown_id_and_aborts) {
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    make_load();
    eplb_v1_RebalanceResponse *r = rebalance(a, true, false, 0, 0);
    const char *rid = rid_of(a, r);
    char msg[512];
    eplb_v1_TransferPlan *plan;
    cr_assert_eq(get_plan(a, rid, G, &plan, NULL, NULL, msg, sizeof msg), 3 /* INVALID_ARGUMENT */, "%s", msg);
    cr_assert_eq(get_plan(a, "ffffffffffffffff", 0, &plan, NULL, NULL, msg, sizeof msg), 5 /* NOT_FOUND */, "%s", msg);
    cr_assert_eq(commit(a, "ffffffffffffffff", false, 0, NULL, msg, sizeof msg), 10 /* ABORTED */, "%s", msg);
    cr_assert_eq(commit(a, rid, true, 3, NULL, msg, sizeof msg), 10, "%s", msg);
    cr_assert_eq(commit(a, "", false, 0, NULL, msg, sizeof msg), 3, "%s", msg);
    /* A second rebalance while pending: ABORTED. */
    rebalance(a, true, false, 0, 10);
    eplb_v1_Placement *p = get(a);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    cr_assert_eq(eplb_v1_Placement_pending_rebalance_id(p).size, 16, "still pending");

    eplb_v1_AbortRebalanceResponse *ab = NULL;
    cr_assert_eq(abort_rb(a, rid, 0, &ab), 0);
    cr_assert_eq(eplb_v1_AbortRebalanceResponse_epoch(ab), 0);
    cr_assert_not(eplb_v1_AbortRebalanceResponse_needs_weight_reload(ab));
    p = get(a);
    cr_assert_eq(eplb_v1_Placement_pending_rebalance_id(p).size, 0);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);

    r = rebalance(a, true, false, 0, 0);
    rid = rid_of(a, r);
    cr_assert_eq(abort_rb(a, rid, 1 << 20, &ab), 0);
    cr_assert(eplb_v1_AbortRebalanceResponse_needs_weight_reload(ab));
    cr_assert_eq(eplb_v1_AbortRebalanceResponse_state(ab), eplb_v1_MOVE_STATE_NEEDS_RELOAD);
    p = get(a);
    cr_assert(eplb_v1_Placement_needs_weight_reload(p));
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    rebalance(a, true, false, 0, 9 /* FAILED_PRECONDITION */);
    upb_Arena_Free(a);
    stop();
}

Test(engine_exec_rpc, sigkill_while_pending_then_restart_keeps_it_and_commit_works) {
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    make_load();
    eplb_v1_RebalanceResponse *dry = rebalance(a, false, true, 0, 0);
    size_t n;
    const int32_t *target = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(dry), &n);
    /* In steps of 2 layers: the first step's plan, executed, committed. */
    eplb_v1_RebalanceResponse *r = rebalance(a, true, false, 2, 0);
    const char *rid = rid_of(a, r);
    eplb_v1_TransferPlan *before;
    char *raw0 = NULL, msg[512];
    size_t raw0_len = 0;
    cr_assert_eq(get_plan(a, rid, 0, &before, &raw0, &raw0_len, msg, sizeof msg), 0, "%s", msg);

    eplb_client_close(client);
    kill(srv.pid, SIGKILL);
    waitpid(srv.pid, NULL, 0);
    eplbd_start(&srv);
    client = eplb_client_open(srv.addr);

    eplb_v1_Placement *p = get(a);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    upb_StringView pid = eplb_v1_Placement_pending_rebalance_id(p);
    cr_assert_eq(pid.size, 16);
    cr_assert_eq(memcmp(pid.data, rid, 16), 0, "the pending rebalance survived the kill");
    cr_assert_eq(eplb_v1_Placement_pending_execution(p), eplb_v1_EXECUTION_ENGINE);
    eplb_v1_TransferPlan *after;
    char *raw1 = NULL;
    size_t raw1_len = 0;
    cr_assert_eq(get_plan(a, rid, 0, &after, &raw1, &raw1_len, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(raw1_len, raw0_len);
    cr_assert_arr_eq(raw1, raw0, raw0_len, "the same plan is rebuilt");

    /* Execute and commit every step to the end. */
    int32_t map[L * P];
    memcpy(map, eplb_v1_Placement_physical_to_logical(p, &n), sizeof map);
    uint64_t epoch = 0;
    for (int steps = 0;; steps++) {
        cr_assert_lt(steps, L);
        eplb_v1_TransferPlan *plans[G];
        fetch_all(a, rid, plans);
        cr_assert_eq(eplb_v1_TransferPlan_base_epoch(plans[0]), epoch);
        uint64_t xn;
        execute(plans, map, &xn);
        eplb_v1_RebalanceResponse *c = NULL;
        cr_assert_eq(commit(a, rid, true, epoch, &c, msg, sizeof msg), 0, "%s", msg);
        epoch++;
        p = get(a);
        cr_assert_eq(eplb_v1_Placement_epoch(p), epoch);
        expect_map(p, map);
        if (!eplb_v1_RebalanceResponse_pending(c))
            break;
        if (steps == 0) {
            /* Once more across a restart, mid-way. */
            eplb_client_close(client);
            kill(srv.pid, SIGKILL);
            waitpid(srv.pid, NULL, 0);
            eplbd_start(&srv);
            client = eplb_client_open(srv.addr);
        }
    }
    expect_map(get(a), target);
    upb_Arena_Free(a);
    stop();
}

/* Every rank's plan past --max-message-bytes: RESOURCE_EXHAUSTED naming
 * GetTransferPlan, and the pending rebalance is withdrawn (nothing
 * changes); without include_transfer_plan each rank's plan fits. */
TestSuite(engine_exec_limits, .timeout = 300);

Test(engine_exec_limits, a_plan_answer_too_big_is_refused_and_withdrawn) {
    eplbd_proc big = { .extra = { "--max-message-bytes", "8192" } };
    eplbd_tmpdir(&big);
    eplbd_start(&big);
    client = eplb_client_open(big.addr);
    upb_Arena *a = upb_Arena_New();
    /* 64 experts on 32 ranks of 2 slots, no redundancy: a skewed load
     * moves most slots across ranks, so the plan outweighs the placement. */
    enum { LL = 4, NN = 64, PP = 64, GG = 32 };
    eplb_v1_RegisterModelRequest *rr = harness_moe_request(a, "m", LL, NN, PP, GG);
    eplb_v1_ParallelConfig_set_num_nodes(eplb_v1_RegisterModelRequest_mutable_parallel(rr, a), 2);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(rr, a, &len), msg[512];
    cr_assert_eq(harness_rpc(client, "RegisterModel", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "%s", msg);
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    int64_t *ld = eplb_v1_RebalanceRequest_resize_physical_load(req, LL * PP, a);
    for (int l = 0; l < LL; l++)
        for (int s = 0; s < PP; s++)
            ld[l * PP + s] = 1 + ((s * 37 + l * 11) % 101) * ((s * 13 + l) % 7 + 1);
    eplb_v1_RebalanceRequest_set_force(req, true);
    eplb_v1_RebalanceRequest_set_execution(req, eplb_v1_EXECUTION_ENGINE);
    eplb_v1_RebalanceRequest_set_include_transfer_plan(req, true);
    bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    cr_assert_eq(harness_rpc(client, "Rebalance", bytes, len, a, NULL, NULL, msg, sizeof msg), 8, "%s", msg);
    cr_assert_not_null(strstr(msg, "GetTransferPlan"), "%s", msg);
    cr_assert_not_null(strstr(msg, "nothing is pending"), "%s", msg);
    eplb_v1_Placement *p = get(a);
    cr_assert_eq(eplb_v1_Placement_pending_rebalance_id(p).size, 0);
    cr_assert_eq(eplb_v1_Placement_epoch(p), 0);
    /* Without the plan in the answer: pending, and each rank's plan fits. */
    eplb_v1_RebalanceRequest_set_include_transfer_plan(req, false);
    bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    char *body = NULL;
    size_t blen = 0;
    cr_assert_eq(harness_rpc(client, "Rebalance", bytes, len, a, &body, &blen, msg, sizeof msg), 0, "%s", msg);
    eplb_v1_RebalanceResponse *r = eplb_v1_RebalanceResponse_parse(body, blen, a);
    const char *rid = rid_of(a, r);
    for (uint32_t g = 0; g < GG; g++) {
        eplb_v1_TransferPlan *plan;
        cr_assert_eq(get_plan(a, rid, g, &plan, NULL, NULL, msg, sizeof msg), 0, "rank %u: %s", g, msg);
    }
    cr_assert_eq(commit(a, rid, true, 0, NULL, msg, sizeof msg), 0, "%s", msg);
    upb_Arena_Free(a);
    eplb_client_close(client);
    cr_assert_eq(eplbd_stop(&big), 0);
    eplbd_cleanup(&big);
}

/* The registration's rebalance defaults are stored (schema 4): after a
 * SIGKILL and a restart the same registration is idempotent, and an engine
 * rebalance bounded by max_staging_bytes finds the model's expert_bytes. */
Test(engine_exec_rpc, registration_defaults_survive_a_restart) {
    upb_Arena *a = upb_Arena_New();
    eplb_v1_RegisterModelRequest *r = harness_moe_request(a, "m", L, N, P, G);
    eplb_v1_ParallelConfig *par = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_num_nodes(par, 2);
    eplb_v1_ParallelConfig_set_expert_bytes(par, 1000);
    eplb_v1_ParallelConfig_set_target_balancedness(par, 0.95);
    eplb_v1_ParallelConfig_set_min_improvement(par, 0.01);
    eplb_v1_ParallelConfig_set_default_policy(par, eplb_v1_POLICY_INCREMENTAL);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len), msg[512];
    cr_assert_eq(harness_rpc(client, "RegisterModel", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "%s", msg);
    eplb_client_close(client);
    kill(srv.pid, SIGKILL);
    waitpid(srv.pid, NULL, 0);
    eplbd_start(&srv);
    client = eplb_client_open(srv.addr);
    char *body = NULL;
    size_t blen = 0;
    cr_assert_eq(harness_rpc(client, "RegisterModel", bytes, len, a, &body, &blen, msg, sizeof msg), 0, "%s", msg);
    eplb_v1_RegisterModelResponse *rr = eplb_v1_RegisterModelResponse_parse(body, blen, a);
    cr_assert(eplb_v1_RegisterModelResponse_registered(rr));
    upb_StringView why = eplb_v1_RegisterModelResponse_reason(rr);
    char reason[512];
    snprintf(reason, sizeof reason, "%.*s", (int)why.size, why.data);
    cr_assert_not_null(strstr(reason, "already registered"), "%s", reason);
    /* max_staging_bytes with no expert_bytes in the request: the model's. */
    make_load();
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    int64_t *dst = eplb_v1_RebalanceRequest_resize_physical_load(req, L * P, a);
    memcpy(dst, load, sizeof load);
    eplb_v1_RebalanceRequest_set_force(req, true);
    eplb_v1_RebalanceRequest_set_execution(req, eplb_v1_EXECUTION_ENGINE);
    eplb_v1_RebalanceRequest_set_max_staging_bytes(req, 3000);
    eplb_v1_RebalanceRequest_set_include_transfer_plan(req, true);
    bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    cr_assert_eq(harness_rpc(client, "Rebalance", bytes, len, a, &body, &blen, msg, sizeof msg), 0, "%s", msg);
    eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_parse(body, blen, a);
    const eplb_v1_TransferPlan *plan = eplb_v1_RebalanceResponse_transfer_plan(resp);
    cr_assert_not_null(plan);
    cr_assert_eq(eplb_v1_TransferPlan_expert_bytes(plan), 1000);
    size_t nr;
    const eplb_v1_RankTransferPlan *const *ranks = eplb_v1_TransferPlan_ranks(plan, &nr);
    cr_assert_eq(nr, G);
    for (size_t g = 0; g < nr; g++)
        cr_assert_leq(eplb_v1_RankTransferPlan_max_staging_slots(ranks[g]), 3);
    upb_Arena_Free(a);
    stop();
}

/* Every rank fetches at once (as G engine processes do), racing a commit
 * attempt with a stale base epoch: every fetch is OK, the stale commit is
 * ABORTED, and the real commit then lands. */
Test(engine_exec_rpc, ranks_fetch_concurrently) {
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    make_load();
    eplb_v1_RebalanceResponse *r = rebalance(a, true, false, 0, 0);
    const char *rid = rid_of(a, r);
    harness_call calls[2 * G + 1];
    for (uint32_t i = 0; i < 2 * G; i++) {
        eplb_v1_GetTransferPlanRequest *req = eplb_v1_GetTransferPlanRequest_new(a);
        eplb_v1_GetTransferPlanRequest_set_model_id(req, upb_StringView_FromString("m"));
        eplb_v1_GetTransferPlanRequest_set_rebalance_id(req, upb_StringView_FromString(rid));
        eplb_v1_GetTransferPlanRequest_set_rank(req, i % G);
        size_t len;
        char *bytes = eplb_v1_GetTransferPlanRequest_serialize(req, a, &len);
        harness_call_start(&calls[i], client, "/eplb.v1.ExpertBalancer/GetTransferPlan", bytes, len,
                           call_timeout_ms());
    }
    eplb_v1_CommitRebalanceRequest *cr = eplb_v1_CommitRebalanceRequest_new(a);
    eplb_v1_CommitRebalanceRequest_set_model_id(cr, upb_StringView_FromString("m"));
    eplb_v1_CommitRebalanceRequest_set_rebalance_id(cr, upb_StringView_FromString(rid));
    eplb_v1_CommitRebalanceRequest_set_base_epoch(cr, 5);
    size_t len;
    char *bytes = eplb_v1_CommitRebalanceRequest_serialize(cr, a, &len);
    harness_call_start(&calls[2 * G], client, "/eplb.v1.ExpertBalancer/CommitRebalance", bytes, len,
                       call_timeout_ms());
    for (uint32_t i = 0; i <= 2 * G; i++) {
        harness_call_join(&calls[i]);
        cr_assert_eq(calls[i].rc, 0);
        cr_assert_eq(calls[i].status, i < 2 * G ? 0 : 10, "call %u: %s", i, calls[i].message);
    }
    char msg[512];
    cr_assert_eq(commit(a, rid, true, 0, NULL, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(eplb_v1_Placement_epoch(get(a)), 1);
    upb_Arena_Free(a);
    stop();
}
