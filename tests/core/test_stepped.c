/* test_stepped.c -- Rebalance with layers_per_step and ContinueRebalance on
 * the registry: each step commits whole layers of the target (epoch + 1),
 * the served placement is old rows + moved rows at every step, the last
 * step ends at the one-shot placement, and what would change the placement
 * under a pending rebalance is refused. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_pending.h"
#include "eplb_registry.h"

#include "fake_store.h"

#define L 6
#define N 12
#define P 16

static fake_store store;
static eplb_registry *reg;

static eplb_handle moe = { .architecture = "StepMoE", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                           .moe = { .num_moe_layers = L, .num_logical_experts = N, .num_physical_experts = P,
                                    .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                    .num_expert_groups = 4 } };

/* Physical load: a skewed expert per layer, each expert's load in its
 * first slot (the initial map puts expert e in slot e). */
static int64_t phys_load[L * P];

static void open_registry(void) {
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
}

static void setup(void) {
    fake_store_init(&store);
    open_registry();
    eplb_register_request req = { .model_name = "m", .model = &moe, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                .step_interval = 1, .auto_rebalance = true } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    for (int l = 0; l < L; l++)
        for (int e = 0; e < N; e++)
            phys_load[l * P + e] = 10 + (e * 7 + l * 5) % 13 + (e == (l * 5) % N ? 400 : 0);
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(stepped, .init = setup, .fini = teardown);

static eplb_rebalance_request request(uint32_t k) {
    return (eplb_rebalance_request){ .model_id = "m", .physical_load = phys_load, .physical_load_len = L * P,
                                     .slot_order = EPLB_SLOT_PRESERVE, .layers_per_step = k };
}

static eplb_model_view view(void) {
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "m", &v, NULL), EPLB_OK);
    return v;
}

static int rows_equal(const int32_t *a, const int32_t *b, uint32_t l) {
    return memcmp(a + (size_t)l * P, b + (size_t)l * P, P * sizeof *a) == 0;
}

Test(stepped, steps_commit_whole_layers_until_the_target) {
    /* The one-shot target, from a dry run. */
    eplb_rebalance_request req = request(0);
    req.dry_run = true;
    eplb_rebalance_result want;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &want, NULL), EPLB_OK);
    eplb_placement start;
    cr_assert_eq(get_placement(reg, "m", &start, NULL, NULL), EPLB_OK);
    uint32_t changed = 0;
    for (uint32_t l = 0; l < L; l++)
        changed += !rows_equal(start.phy2log, want.placement.phy2log, l);
    cr_assert_geq(changed, 5, "the load must move most layers (%u)", changed);

    req = request(2);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.committed);
    cr_assert(res.pending);
    cr_assert_eq(strlen(res.rebalance_id), 16);
    cr_assert_eq(res.num_layers_moved, 2);
    cr_assert_eq(res.placement.epoch, 1);
    cr_assert_float_eq(res.balancedness_after, want.balancedness_after, 1e-12);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    strcpy(id, res.rebalance_id);
    uint64_t epoch = 1;
    uint32_t moved_total = res.num_layers_moved;
    for (;;) {
        /* Served: moved rows equal the target's, the others the start's. */
        eplb_model_view v = view();
        cr_assert_eq(v.snap->placement.epoch, epoch);
        uint32_t done = 0;
        for (uint32_t l = 0; l < L; l++) {
            int t = rows_equal(v.snap->placement.phy2log, want.placement.phy2log, l);
            cr_assert(t || rows_equal(v.snap->placement.phy2log, start.phy2log, l), "layer %u is neither", l);
            done += t;
        }
        cr_assert_eq(res.layers_done, done);
        cr_assert_arr_eq(res.placement.phy2log, v.snap->placement.phy2log, sizeof(int32_t) * L * P);
        if (res.pending) {
            cr_assert_str_eq(v.pending_id, id);
            cr_assert_eq(v.pending_layers_done, done);
            /* Stored in the same save as the step's commit. */
            cr_assert_str_eq(store.last.pending.id, id);
            cr_assert_eq(store.last.pending.layers_done, done);
            cr_assert_eq(store.last.placement.epoch, 0); /* (arrays not kept by the fake) */
        } else {
            cr_assert_str_eq(v.pending_id, "");
            cr_assert_str_eq(store.last.pending.id, "");
        }
        eplb_model_view_release(&v);
        bool pending = res.pending;
        eplb_rebalance_result_free(&res);
        if (!pending)
            break;
        cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", id, &res, &err), EPLB_OK, "%s", err.msg);
        cr_assert_str_eq(res.rebalance_id, id);
        cr_assert_leq(res.num_layers_moved, 2);
        moved_total += res.num_layers_moved;
        epoch++;
    }
    cr_assert_eq(moved_total, changed);
    eplb_placement end;
    cr_assert_eq(get_placement(reg, "m", &end, NULL, NULL), EPLB_OK);
    cr_assert_arr_eq(end.phy2log, want.placement.phy2log, sizeof(int32_t) * L * P);
    cr_assert_eq(end.epoch, (changed + 1) / 2);
    /* Finished: continuing is NOT_FOUND; a new Rebalance is allowed. */
    cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", id, &res, &err), EPLB_ENOTFOUND);
    cr_assert(strstr(err.msg, "finished"), "%s", err.msg);
    eplb_placement_free(&end);
    eplb_placement_free(&start);
    eplb_rebalance_result_free(&want);
}

Test(stepped, a_pending_rebalance_refuses_what_would_change_the_placement) {
    eplb_rebalance_request req = request(1);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.pending);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    strcpy(id, res.rebalance_id);
    eplb_rebalance_result_free(&res);
    int saves = store.saves;

    req = request(0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EABORTED);
    cr_assert(strstr(err.msg, id) && strstr(err.msg, "ContinueRebalance"), "%s", err.msg);
    req.dry_run = true; /* changes nothing: allowed */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_rebalance_result_free(&res);

    eplb_placement cur;
    cr_assert_eq(get_placement(reg, "m", &cur, NULL, NULL), EPLB_OK);
    eplb_setup_request s = { .model_id = "m", .expanded_phy2log = cur.phy2log, .expanded_len = L * P,
                             .num_physical = P, .old_num_physical = P, .ep_size = 8 };
    eplb_placement out;
    cr_assert_eq(eplb_registry_setup_from_mapping(reg, &s, &out, &err), EPLB_EABORTED);

    /* RecordLoad still counts passes, without an automatic rebalance. */
    eplb_record_request rr = { .model_id = "m", .physical_load = phys_load, .physical_load_len = L * P };
    eplb_record_result rres;
    cr_assert_eq(eplb_registry_record_load(reg, &rr, &rres, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(rres.passes_recorded, 1);
    cr_assert(!rres.rebalanced);
    cr_assert_eq(rres.epoch, cur.epoch);

    cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", "0000000000000000", &res, &err), EPLB_ENOTFOUND);
    cr_assert(strstr(err.msg, id), "%s", err.msg);
    cr_assert_eq(eplb_registry_continue_rebalance(reg, "nope", id, &res, &err), EPLB_ENOTFOUND);
    eplb_placement after;
    cr_assert_eq(get_placement(reg, "m", &after, NULL, NULL), EPLB_OK);
    cr_assert_eq(after.epoch, cur.epoch);
    cr_assert_arr_eq(after.phy2log, cur.phy2log, sizeof(int32_t) * L * P);
    cr_assert_eq(store.saves, saves); /* nothing stored (windows are saved at flush) */
    eplb_placement_free(&after);
    eplb_placement_free(&cur);
}

Test(stepped, a_rebalance_that_fits_one_step_is_not_pending) {
    eplb_rebalance_request req = request(L);
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert(res.committed);
    cr_assert(!res.pending);
    cr_assert_eq(res.layers_done, L);
    cr_assert_eq(strlen(res.rebalance_id), 16);
    cr_assert_gt(res.num_layers_moved, 0);
    eplb_model_view v = view();
    cr_assert_str_eq(v.pending_id, "");
    eplb_model_view_release(&v);
    eplb_rebalance_result_free(&res);
}

Test(stepped, a_store_failure_on_the_first_step_leaves_nothing_pending) {
    eplb_rebalance_request req = request(1);
    eplb_rebalance_result res;
    eplb_error err;
    store.fail_next = 1;
    cr_assert_neq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK);
    eplb_model_view v = view();
    cr_assert_str_eq(v.pending_id, "");
    cr_assert_eq(v.snap->placement.epoch, 0);
    eplb_model_view_release(&v);
    /* And a new one may start. */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.pending);
    eplb_rebalance_result_free(&res);
}

Test(stepped, a_restart_continues_from_the_stored_step) {
    eplb_rebalance_request req = request(2);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.pending);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    strcpy(id, res.rebalance_id);
    eplb_rebalance_result_free(&res);
    /* What a store would hand back: the row as last saved, deep. */
    eplb_model_view v = view();
    eplb_model_record rec = store.last;
    cr_assert_eq(eplb_placement_copy(&rec.placement, &v.snap->placement, NULL), EPLB_OK);
    eplb_model_view_release(&v);
    req.dry_run = true;
    req.layers_per_step = 0;
    /* The fake keeps no arrays: rebuild the target as a dry run from the
     * start placement on a fresh registry (the same policy on the same
     * load gives the same target). */
    eplb_registry_close(reg);
    fake_store_init(&store);
    rec.window = (eplb_load_window){ 0 };
    rec.pending.target = (eplb_placement){ 0 };
    /* Build the target: the full rebalance of the start placement. */
    open_registry();
    eplb_register_request rq = { .model_name = "m", .model = &moe, .main_model_id = "",
                                 .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                               .step_interval = 1 } };
    eplb_register_result rg;
    cr_assert_eq(eplb_registry_register(reg, &rq, &rg, NULL), EPLB_OK);
    eplb_model_view_release(&rg.view);
    eplb_rebalance_result full;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &full, NULL), EPLB_OK);
    cr_assert_eq(eplb_placement_copy(&rec.pending.target, &full.placement, NULL), EPLB_OK);
    eplb_rebalance_result_free(&full);
    eplb_registry_close(reg);

    fake_store_init(&store);
    eplb_model_record *replay = malloc(sizeof *replay);
    *replay = rec;
    replay->pending.layers_done = 0; /* stale on purpose: the registry recounts from the rows */
    store.replay = replay;
    store.num_replay = 1;
    open_registry();
    v = view();
    cr_assert_str_eq(v.pending_id, id);
    cr_assert_eq(v.snap->placement.epoch, 1);
    cr_assert_geq(v.pending_layers_done, 2, "recounted from the rows, not the stale 0");
    eplb_model_view_release(&v);
    cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", id, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(res.placement.epoch, 2);
    eplb_rebalance_result_free(&res);
    free(replay);
}

/* Weights whose gather fails at one layer (EPLB_EINTERNAL: nothing of that
 * layer written), so a step commits only the layers before it. */
static int fail_gather_layer = -1;
static eplb_status fw_check(void *c, uint32_t l, uint32_t p, const int32_t *o, const int32_t *n, eplb_error *e) {
    (void)c, (void)l, (void)p, (void)o, (void)n, (void)e;
    return EPLB_OK;
}
static eplb_status fw_gather(void *c, uint32_t layer, uint32_t p, const int32_t *o, const int32_t *n,
                             eplb_error *e) {
    (void)c, (void)p, (void)o, (void)n;
    return (int)layer == fail_gather_layer ? eplb_error_set(e, EPLB_EINTERNAL, "injected gather failure") : EPLB_OK;
}
static eplb_status fw_scatter(void *c, uint32_t l, uint32_t p, const int32_t *o, const int32_t *n, eplb_move_bytes *b,
                              eplb_error *e) {
    (void)c, (void)l, (void)p, (void)o, (void)n, (void)e;
    *b = (eplb_move_bytes){ 0, 0, 0 };
    return EPLB_OK;
}
static void fw_close(void *c) { (void)c; }
static const eplb_weights_ops fw_ops = { .check = fw_check, .gather = fw_gather, .scatter = fw_scatter,
                                         .close = fw_close };

Test(stepped, a_last_step_that_moves_fewer_layers_stays_pending_in_memory_and_store) {
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "m", &shape, NULL), EPLB_OK);
    static int ctx;
    cr_assert_eq(eplb_registry_attach_weights(reg, "m", &fw_ops, &ctx, &shape, NULL), EPLB_OK);
    /* The layers the target changes, from a dry run. */
    eplb_rebalance_request req = request(0);
    req.dry_run = true;
    eplb_rebalance_result want;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &want, NULL), EPLB_OK);
    eplb_placement start;
    cr_assert_eq(get_placement(reg, "m", &start, NULL, NULL), EPLB_OK);
    uint32_t changed[L], nc = 0;
    for (uint32_t l = 0; l < L; l++)
        if (!rows_equal(start.phy2log, want.placement.phy2log, l))
            changed[nc++] = l;
    cr_assert_geq(nc, 4);
    /* Step 1 moves all but the last two changed layers; step 2 (the last)
     * fails at the last one, committing only the one before it. */
    req = request(nc - 2);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.pending);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    strcpy(id, res.rebalance_id);
    eplb_rebalance_result_free(&res);
    fail_gather_layer = (int)changed[nc - 1];
    cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", id, &res, &err), EPLB_EINTERNAL);
    cr_assert(strstr(err.msg, "committed"), "%s", err.msg);
    eplb_model_view v = view();
    cr_assert_str_eq(v.pending_id, id);
    cr_assert_eq(v.pending_layers_done, L - 1);
    eplb_model_view_release(&v);
    /* What is stored agrees: still pending, one layer to go. */
    cr_assert_str_eq(store.last.pending.id, id);
    cr_assert_eq(store.last.pending.layers_done, L - 1);
    /* And it can be finished. */
    fail_gather_layer = -1;
    cr_assert_eq(eplb_registry_continue_rebalance(reg, "m", id, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(!res.pending);
    cr_assert_eq(res.layers_done, L);
    cr_assert_str_eq(store.last.pending.id, "");
    eplb_rebalance_result_free(&res);
    eplb_placement_free(&start);
    eplb_rebalance_result_free(&want);
}
