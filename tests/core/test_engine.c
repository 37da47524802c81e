/* test_engine.c -- SetupFromMapping, Rebalance and RecordLoad on the
 * registry: commits bump the epoch, every refused request changes nothing,
 * a store failure changes nothing. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;

static eplb_registry *reg;

/* The deepseek-ai/EPLB README shape: 2 layers, 12 experts, 16 slots, 4
 * groups, 2 nodes, 8 GPUs. */
static eplb_handle readme = { .architecture = "Readme", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                              .moe = { .num_moe_layers = 2, .num_logical_experts = 12, .num_physical_experts = 16,
                                       .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                       .num_expert_groups = 4 } };

static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};

/* Physical load that sums to readme_load under the initial map: each
 * expert's load in its first slot, redundant slots 0. */
static int64_t phys_load[2 * 16];

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &readme, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                .step_interval = 3 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    memset(phys_load, 0, sizeof phys_load);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++)
            phys_load[l * 16 + e] = readme_load[l][e];
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(engine, .init = setup, .fini = teardown);

static eplb_placement current(void) {
    eplb_placement p;
    cr_assert_eq(get_placement(reg, "m", &p, NULL, NULL), EPLB_OK);
    return p;
}

static void assert_unchanged(uint64_t epoch, const int32_t *phy2log, uint32_t P) {
    eplb_placement p = current();
    cr_assert_eq(p.epoch, epoch);
    cr_assert_eq(p.num_physical, P);
    cr_assert_arr_eq(p.phy2log, phy2log, 2 * P * sizeof(int32_t));
    eplb_placement_free(&p);
}

Test(engine, rebalance_reproduces_the_readme_example_and_commits) {
    eplb_rebalance_request req = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                   .slot_order = EPLB_SLOT_ALGORITHM };
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    const int32_t want[] = { 5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                             7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1 };
    const int32_t want_cnt[] = { 1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1 };
    cr_assert_arr_eq(res.placement.phy2log, want, sizeof want);
    cr_assert_arr_eq(res.placement.logcnt, want_cnt, sizeof want_cnt);
    cr_assert(res.committed);
    cr_assert_eq(res.placement.epoch, 1);
    cr_assert_gt(res.balancedness_after, res.balancedness_before);
    cr_assert_leq(res.balancedness_after, 1.0);
    cr_assert_gt(res.experts_moved, 0);
    eplb_rebalance_result_free(&res);
    assert_unchanged(1, want, 16);
    cr_assert_eq(store.saves, 2);
}

Test(engine, preserve_keeps_each_gpu_multiset_and_moves_no_more) {
    eplb_rebalance_request req = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                   .dry_run = true, .slot_order = EPLB_SLOT_ALGORITHM };
    eplb_rebalance_result algo, kept;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &algo, NULL), EPLB_OK);
    req.slot_order = EPLB_SLOT_PRESERVE;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &kept, NULL), EPLB_OK);
    cr_assert_leq(kept.experts_moved, algo.experts_moved);
    cr_assert_float_eq(kept.balancedness_after, algo.balancedness_after, 1e-12);
    for (int g = 0; g < 16; g++) { /* 2 layers x 8 GPUs of 2 slots */
        int32_t *a = algo.placement.phy2log + 2 * g, *b = kept.placement.phy2log + 2 * g;
        cr_assert((a[0] == b[0] && a[1] == b[1]) || (a[0] == b[1] && a[1] == b[0]), "gpu %d", g);
    }
    cr_assert_not(kept.committed);
    cr_assert_eq(kept.placement.epoch, 0);
    eplb_rebalance_result_free(&algo);
    eplb_rebalance_result_free(&kept);
    eplb_placement p = current();
    cr_assert_eq(p.epoch, 0);
    eplb_placement_free(&p);
    cr_assert_eq(store.saves, 1);
}

Test(engine, gpu_reassignment_moves_no_more_than_slot_preservation) {
    eplb_rebalance_request req = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                   .dry_run = true, .slot_order = EPLB_SLOT_PRESERVE };
    eplb_rebalance_result kept, best;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &kept, NULL), EPLB_OK);
    req.slot_order = EPLB_SLOT_MIN_TRAFFIC;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &best, NULL), EPLB_OK);
    cr_assert_leq(best.experts_moved, kept.experts_moved);
    cr_assert_float_eq(best.balancedness_after, kept.balancedness_after, 1e-12);
    for (int l = 0; l < 2; l++)
        cr_assert_float_eq(best.layer_after[l], kept.layer_after[l], 1e-12);
    eplb_rebalance_result_free(&kept);
    eplb_rebalance_result_free(&best);
}

Test(engine, refused_rebalances_change_nothing) {
    eplb_placement before = current();
    eplb_rebalance_result res;
    eplb_error err;
    struct { eplb_rebalance_request req; eplb_status code; const char *msg; } cases[] = {
        { { .model_id = "m", .physical_load = phys_load, .physical_load_len = 31 }, EPLB_EINVAL,
          "physical_load has 31 entries, want num_layers 2 x num_physical_experts 16" },
        { { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32, .has_expected_epoch = true,
            .expected_epoch = 3 }, EPLB_EABORTED, "model m is at epoch 0, the request expected epoch 3" },
        { { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32, .num_gpus = 3 }, EPLB_EINVAL,
          "not a multiple of num_gpus 3" },
        { { .model_id = "m" }, EPLB_EPRECONDITION, "has no recorded load" },
        { { .model_id = "nope", .physical_load = phys_load, .physical_load_len = 32 }, EPLB_ENOTFOUND,
          "model nope is not registered" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cr_assert_eq(eplb_registry_rebalance(reg, &cases[i].req, &res, &err), cases[i].code, "case %zu: %s", i, err.msg);
        cr_assert_not_null(strstr(err.msg, cases[i].msg), "case %zu: %s", i, err.msg);
    }
    int64_t neg[32];
    memcpy(neg, phys_load, sizeof neg);
    neg[20] = -5;
    eplb_rebalance_request req = { .model_id = "m", .physical_load = neg, .physical_load_len = 32 };
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "physical_load[layer 1][slot 4] = -5 is negative");

    store.fail_next = 1;
    req.physical_load = phys_load;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EUNAVAILABLE);
    assert_unchanged(0, before.phy2log, 16);
    eplb_placement_free(&before);
    cr_assert_eq(store.saves, 1);
}

Test(engine, setup_from_mapping_scale_up_then_rebalance_fills_empty_slots) {
    /* 8 -> 12 GPUs: 16 -> 24 slots, the new ranks' slots empty. */
    int32_t expanded[2 * 24];
    eplb_placement cur = current();
    for (int l = 0; l < 2; l++)
        for (int s = 0; s < 24; s++)
            expanded[l * 24 + s] = s < 16 ? cur.phy2log[l * 16 + s] : -1;
    eplb_placement_free(&cur);
    eplb_setup_request sreq = { .model_id = "m", .model = &readme, .expanded_phy2log = expanded, .expanded_len = 48,
                                .num_physical = 24, .old_num_physical = 16, .ep_size = 12,
                                .has_expected_epoch = true, .expected_epoch = 0 };
    eplb_placement p;
    cr_assert_eq(eplb_registry_setup_from_mapping(reg, &sreq, &p, NULL), EPLB_OK);
    cr_assert_eq(p.epoch, 1);
    cr_assert_eq(p.num_physical, 24);
    cr_assert_eq(p.num_valid_physical, 16);
    cr_assert_eq(p.logcnt[0], 2);
    eplb_placement_free(&p);

    /* Load in the new slots is not counted until the next rebalance. */
    int64_t load24[48];
    memset(load24, 0, sizeof load24);
    for (int l = 0; l < 2; l++) {
        for (int e = 0; e < 12; e++)
            load24[l * 24 + e] = readme_load[l][e];
        load24[l * 24 + 20] = 1000000;
    }
    eplb_record_request rec = { .model_id = "m", .physical_load = load24, .physical_load_len = 48 };
    eplb_record_result rr;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);

    eplb_rebalance_request req = { .model_id = "m" };
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_eq(res.placement.epoch, 2);
    cr_assert_eq(res.placement.num_valid_physical, 24);
    for (int i = 0; i < 48; i++)
        cr_assert_geq(res.placement.phy2log[i], 0, "slot %d still empty", i);
    int total = 0;
    for (int i = 0; i < 24; i++)
        total += res.placement.logcnt[i];
    cr_assert_eq(total, 48);
    eplb_rebalance_result_free(&res);
}

Test(engine, refused_setups_change_nothing) {
    eplb_placement before = current();
    int32_t map[2 * 24];
    for (int i = 0; i < 48; i++)
        map[i] = i % 24 < 16 ? before.phy2log[(i / 24) * 16 + i % 24] : -1;
    eplb_handle other = readme;
    other.moe.num_moe_layers = 3;
    eplb_handle llama = { .architecture = "LlamaForCausalLM" };
    int32_t bad_entry[48], missing[48];
    memcpy(bad_entry, map, sizeof map);
    bad_entry[30] = 12;
    memcpy(missing, map, sizeof map);
    for (int s = 0; s < 16; s++)
        if (missing[24 + s] == 7)
            missing[24 + s] = -1;
    struct { eplb_setup_request req; eplb_status code; const char *msg; } cases[] = {
        { { .model_id = "m", .model = &other, .expanded_phy2log = map, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12 }, EPLB_EPRECONDITION, "resolves to 3 layers x 12 logical experts" },
        { { .model_id = "m", .model = &llama, .expanded_phy2log = map, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12 }, EPLB_EPRECONDITION, "no MoE model" },
        { { .model_id = "m", .expanded_phy2log = map, .expanded_len = 47, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12 }, EPLB_EINVAL, "has 47 entries" },
        { { .model_id = "m", .expanded_phy2log = map, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 20, .ep_size = 12 }, EPLB_EPRECONDITION, "old_num_physical_experts 20" },
        { { .model_id = "m", .expanded_phy2log = map, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 5 }, EPLB_EINVAL, "ep_size 5" },
        { { .model_id = "m", .expanded_phy2log = bad_entry, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12 }, EPLB_EINVAL,
          "expanded_physical_to_logical[layer 1][slot 6] = 12" },
        { { .model_id = "m", .expanded_phy2log = missing, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12 }, EPLB_EINVAL, "logical expert 7 has no replica in layer 1" },
        { { .model_id = "m", .expanded_phy2log = map, .expanded_len = 48, .num_physical = 24,
            .old_num_physical = 16, .ep_size = 12, .has_expected_epoch = true, .expected_epoch = 9 },
          EPLB_EABORTED, "expected epoch 9" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        eplb_placement p;
        eplb_error err;
        cr_assert_eq(eplb_registry_setup_from_mapping(reg, &cases[i].req, &p, &err), cases[i].code, "case %zu: %s", i,
                     err.msg);
        cr_assert_not_null(strstr(err.msg, cases[i].msg), "case %zu: %s", i, err.msg);
    }
    assert_unchanged(0, before.phy2log, 16);
    eplb_placement_free(&before);
}

Test(engine, record_load_feeds_the_window_and_auto_rebalance_is_opt_in) {
    eplb_record_request rec = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32 };
    eplb_record_result rr;
    for (int i = 0; i < 3; i++)
        cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    cr_assert_eq(rr.passes_recorded, 3);
    cr_assert_not(rr.rebalanced); /* registered without auto_rebalance */
    rec.is_dummy = true;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    cr_assert_eq(rr.passes_recorded, 3);
    rec.is_dummy = false;
    rec.physical_load_len = 16;
    eplb_error err;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, &err), EPLB_EINVAL);

    /* The window's sum (3 x the README load) gives the README placement. */
    eplb_rebalance_request req = { .model_id = "m", .slot_order = EPLB_SLOT_ALGORITHM, .dry_run = true };
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_eq(res.placement.phy2log[0], 5);
    cr_assert_eq(res.placement.phy2log[16], 7);
    eplb_rebalance_result_free(&res);

    /* A model that asks for it rebalances every step_interval passes. */
    eplb_register_request areq = { .model_name = "auto", .model = &readme, .main_model_id = "",
                                   .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                 .step_interval = 3, .auto_rebalance = true } };
    eplb_register_result ares;
    cr_assert_eq(eplb_registry_register(reg, &areq, &ares, NULL), EPLB_OK);
    eplb_model_view_release(&ares.view);
    rec.model_id = "auto";
    rec.physical_load_len = 32;
    for (int i = 1; i <= 6; i++) {
        cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
        cr_assert_eq(rr.rebalanced, i % 3 == 0, "pass %d", i);
        cr_assert_eq(rr.epoch, (uint64_t)(i / 3), "pass %d", i);
    }
}

Test(engine, flush_saves_dirty_windows_once) {
    eplb_record_request rec = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32 };
    eplb_record_result rr;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_flush(reg, NULL), EPLB_OK);
    cr_assert_eq(store.window_saves, 1);
    cr_assert_eq(eplb_registry_flush(reg, NULL), EPLB_OK);
    cr_assert_eq(store.window_saves, 1);
}

/* ---- weights: a fake mover that fails on demand ----------------------------- */

typedef struct fake_mover {
    eplb_status check_status;
    int fail_layer;             /* -1: never */
    eplb_status fail_status;    /* EPLB_EINTERNAL or EPLB_EDATALOSS (gather) */
    int scatter_fail_layer;     /* -1: never */
    int scatter_failures;       /* how many scatter calls of that layer fail */
    int gathers, scatters, moves;
    eplb_move_state state_at_first_scatter; /* what the store held then */
    int *closed;
} fake_mover;

static eplb_status fm_check(void *ctx, uint32_t L, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *err) {
    (void)L, (void)P, (void)o, (void)n;
    fake_mover *m = ctx;
    if (m->check_status == EPLB_EDATALOSS)
        return eplb_error_set(err, m->check_status, "ranks[1] shm \"/eplb-x\" shrank to 0 bytes");
    if (m->check_status != EPLB_OK)
        return eplb_error_set(err, m->check_status, "layer 0: slot 3 (GPU 1) needs a GPU this server does not hold");
    return EPLB_OK;
}

static eplb_status fm_gather(void *ctx, uint32_t layer, uint32_t P, const int32_t *o, const int32_t *n,
                             eplb_error *err) {
    (void)P, (void)o, (void)n;
    fake_mover *m = ctx;
    m->gathers++;
    if ((int)layer == m->fail_layer)
        return eplb_error_set(err, m->fail_status, "injected");
    return EPLB_OK;
}

static eplb_status fm_scatter(void *ctx, uint32_t layer, uint32_t P, const int32_t *o, const int32_t *n,
                              eplb_move_bytes *bytes, eplb_error *err) {
    fake_mover *m = ctx;
    *bytes = (eplb_move_bytes){ 0, 0, 0 };
    if (m->scatters++ == 0)
        m->state_at_first_scatter = store.last.state;
    if ((int)layer == m->scatter_fail_layer && m->scatter_failures > 0) {
        m->scatter_failures--;
        return eplb_error_set(err, EPLB_EDATALOSS, "injected scatter failure");
    }
    for (uint32_t s = 0; s < P; s++)
        bytes->written += o[s] != n[s] ? 100 : 0;
    m->moves++;
    return EPLB_OK;
}

static void fm_close(void *ctx) {
    fake_mover *m = ctx;
    (*m->closed)++;
}

static const eplb_weights_ops fm_ops = { .check = fm_check, .gather = fm_gather, .scatter = fm_scatter,
                                         .close = fm_close };
static fake_mover mover;
static int mover_closed;

static void attach(eplb_status check, int fail_layer, eplb_status fail) {
    mover = (fake_mover){ .check_status = check, .fail_layer = fail_layer, .fail_status = fail,
                          .scatter_fail_layer = -1, .closed = &mover_closed };
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "m", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "m", &fm_ops, &mover, &shape, NULL), EPLB_OK);
}

static eplb_rebalance_request move_request(void) {
    return (eplb_rebalance_request){ .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                     .slot_order = EPLB_SLOT_ALGORITHM };
}

static eplb_move_state state_now(void) {
    eplb_placement p;
    eplb_move_state st = EPLB_MOVE_STAGED;
    cr_assert_eq(get_placement(reg, "m", &p, &st, NULL), EPLB_OK);
    eplb_placement_free(&p);
    return st;
}

Test(engine, weights_move_before_the_commit) {
    attach(EPLB_OK, -1, EPLB_OK);
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert(res.committed);
    cr_assert_eq(mover.moves, 2);
    cr_assert_eq(res.bytes_moved, res.experts_moved * 100);
    cr_assert_eq(res.placement.epoch, 1);
    eplb_rebalance_result_free(&res);
    /* MOVING was stored before the first slot write, then IDLE with the map. */
    cr_assert_eq(mover.state_at_first_scatter, EPLB_MOVE_MOVING);
    cr_assert_eq(store.saves, 3); /* register, MOVING, commit */
    cr_assert_eq(store.states[1], EPLB_MOVE_MOVING);
    cr_assert_eq(store.states[2], EPLB_MOVE_IDLE);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
    /* Dry runs never move. */
    req.dry_run = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_eq(mover.moves, 2);
    cr_assert_eq(mover.gathers, 2);
    eplb_rebalance_result_free(&res);
    bool detached;
    cr_assert_eq(eplb_registry_detach_weights(reg, "m", &detached, NULL), EPLB_OK);
    cr_assert(detached);
    cr_assert_eq(mover_closed, 1);
}

Test(engine, weights_precondition_moves_nothing) {
    eplb_placement before = current();
    attach(EPLB_EPRECONDITION, -1, EPLB_OK);
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EPRECONDITION);
    cr_assert_eq(mover.moves + mover.gathers, 0);
    assert_unchanged(0, before.phy2log, 16);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
    eplb_placement_free(&before);
}

Test(engine, buffers_lost_before_the_move_need_a_reload_stored_first) {
    attach(EPLB_EDATALOSS, -1, EPLB_OK);
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "shrank to 0 bytes"), "%s", err.msg);
    cr_assert_eq(mover.gathers, 0);
    cr_assert_eq(store.last.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_not_null(strstr(store.last.state_reason, "shrank"), "%s", store.last.state_reason);
    cr_assert_eq(state_now(), EPLB_MOVE_NEEDS_RELOAD);
}

Test(engine, gather_failure_on_the_first_layer_changes_nothing) {
    eplb_placement before = current();
    attach(EPLB_OK, 0, EPLB_EINTERNAL);
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINTERNAL);
    cr_assert_not_null(strstr(err.msg, "nothing changed"), "%s", err.msg);
    assert_unchanged(0, before.phy2log, 16);
    eplb_placement_free(&before);
    cr_assert_eq(store.saves, 1);
    cr_assert_eq(mover.scatters, 0);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
}

Test(engine, store_refusing_moving_writes_nothing) {
    eplb_placement before = current();
    attach(EPLB_OK, -1, EPLB_OK);
    store.fail_next = 1; /* the MOVING save */
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EUNAVAILABLE);
    cr_assert_eq(mover.scatters, 0);
    assert_unchanged(0, before.phy2log, 16);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
    eplb_placement_free(&before);
}

Test(engine, gather_failure_later_commits_the_layers_that_moved) {
    eplb_placement before = current();
    attach(EPLB_OK, 1, EPLB_EINTERNAL);
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINTERNAL);
    cr_assert_not_null(strstr(err.msg, "layers 0..0 were moved and committed at epoch 1"), "%s", err.msg);
    eplb_placement p = current();
    cr_assert_eq(p.epoch, 1);
    const int32_t readme_l0[] = { 5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1 };
    cr_assert_arr_eq(p.phy2log, readme_l0, sizeof readme_l0);
    cr_assert_arr_eq(p.phy2log + 16, before.phy2log + 16, 16 * sizeof(int32_t));
    eplb_placement_free(&p);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
    cr_assert_eq(store.last.state, EPLB_MOVE_IDLE);
    eplb_placement_free(&before);
}

Test(engine, one_scatter_failure_is_completed_by_the_retry) {
    attach(EPLB_OK, -1, EPLB_OK);
    mover.scatter_fail_layer = 1;
    mover.scatter_failures = 1;
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(mover.scatters, 3);
    cr_assert_eq(mover.gathers, 2); /* the retry never gathers again (it would undo swaps) */
    eplb_rebalance_result_free(&res);
    cr_assert_eq(state_now(), EPLB_MOVE_IDLE);
}

Test(engine, scatter_failure_marks_the_model_for_reload_until_registered_again) {
    attach(EPLB_OK, -1, EPLB_OK);
    mover.scatter_fail_layer = 1;
    mover.scatter_failures = 2;
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "needs a weight reload"), "%s", err.msg);
    /* Stored before the error was answered. */
    cr_assert_eq(store.last.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_not_null(strstr(store.last.state_reason, "layer 1"), "%s", store.last.state_reason);
    cr_assert_eq(state_now(), EPLB_MOVE_NEEDS_RELOAD);

    /* Refused until the engine registers again (after reloading weights). */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EPRECONDITION);
    cr_assert_not_null(strstr(err.msg, "register it again"), "%s", err.msg);
    eplb_setup_request sreq = { .model_id = "m" };
    eplb_placement p;
    cr_assert_eq(eplb_registry_setup_from_mapping(reg, &sreq, &p, &err), EPLB_EPRECONDITION);

    eplb_register_request rreq = { .model_name = "m", .model = &readme, .main_model_id = "",
                                   .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                 .step_interval = 3 } };
    eplb_register_result rres;
    cr_assert_eq(eplb_registry_register(reg, &rreq, &rres, NULL), EPLB_OK);
    cr_assert_eq(rres.view.state, EPLB_MOVE_IDLE);
    eplb_model_view_release(&rres.view);
    cr_assert_eq(store.last.state, EPLB_MOVE_IDLE);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_rebalance_result_free(&res);
}

Test(engine, store_failure_after_moving_flags_the_model) {
    attach(EPLB_OK, -1, EPLB_OK);
    store.fail_after = 1; /* MOVING passes, the commit fails */
    eplb_rebalance_request req = move_request();
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "needs a weight reload"), "%s", err.msg);
    cr_assert_eq(mover.moves, 2);
    cr_assert_eq(state_now(), EPLB_MOVE_NEEDS_RELOAD);
    /* The NEEDS_RELOAD save after the failed commit went through. */
    cr_assert_eq(store.last.state, EPLB_MOVE_NEEDS_RELOAD);
    eplb_placement p = current();
    cr_assert_eq(p.epoch, 0); /* the map the store kept; the bytes match none */
    eplb_placement_free(&p);
}

Test(engine, request_topology_is_bounded_by_server_limits) {
    eplb_rebalance_request req = move_request();
    req.num_gpus = 8192; /* divides nothing here, but the limit is checked first */
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "--max-ep-size"), "%s", err.msg);
    req.num_gpus = 2;
    req.num_nodes = 4;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "num_nodes 4 exceeds num_gpus 2");
}

Test(engine, attaching_for_a_stale_shape_is_refused_and_scale_up_detaches) {
    eplb_model_shape stale;
    cr_assert_eq(eplb_registry_get_shape(reg, "m", &stale, NULL), EPLB_OK);
    stale.num_physical = 24;
    mover = (fake_mover){ .fail_layer = -1, .closed = &mover_closed };
    mover_closed = 0;
    eplb_error err;
    cr_assert_eq(eplb_registry_attach_weights(reg, "m", &fm_ops, &mover, &stale, &err), EPLB_EPRECONDITION);
    cr_assert_eq(mover_closed, 1, "the registry closes what it refuses");

    attach(EPLB_OK, -1, EPLB_OK);
    eplb_placement cur = current();
    int32_t expanded[48];
    for (int i = 0; i < 48; i++)
        expanded[i] = i % 24 < 16 ? cur.phy2log[(i / 24) * 16 + i % 24] : -1;
    eplb_placement_free(&cur);
    eplb_setup_request sreq = { .model_id = "m", .expanded_phy2log = expanded, .expanded_len = 48,
                                .num_physical = 24, .old_num_physical = 16, .ep_size = 12 };
    eplb_placement p;
    cr_assert_eq(eplb_registry_setup_from_mapping(reg, &sreq, &p, NULL), EPLB_OK);
    eplb_placement_free(&p);
    cr_assert_eq(mover_closed, 2, "weights laid out for 16 slots are detached at 24");
    bool detached = true;
    cr_assert_eq(eplb_registry_detach_weights(reg, "m", &detached, NULL), EPLB_OK);
    cr_assert_not(detached);
}

Test(engine, a_scale_up_whose_placement_could_not_be_sent_is_refused) {
    /* The registration bound again: committing it would leave a model
     * that no GetPlacement can return. */
    eplb_registry_close(reg);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    eplb_model_shape s16 = { .num_layers = 2, .num_logical = 12, .num_physical = 16 };
    lim.max_response_bytes = eplb_model_response_bytes(&s16) + 1;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &readme, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2 } };
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_model_view_release(&res.view);
    int32_t map[2 * 24];
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 24; i++)
            map[l * 24 + i] = i < 12 ? i : -1;
    eplb_setup_request sreq = { .model_id = "m", .expanded_phy2log = map, .expanded_len = 48,
                                .num_physical = 24, .old_num_physical = 16, .ep_size = 8 };
    eplb_placement p;
    int saves = store.saves;
    cr_assert_eq(eplb_registry_setup_from_mapping(reg, &sreq, &p, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "--max-message-bytes"), "%s", err.msg);
    cr_assert_eq(store.saves, saves);
    eplb_placement now = current();
    cr_assert_eq(now.epoch, 0);
    cr_assert_eq(now.num_physical, 16);
    eplb_placement_free(&now);
}
