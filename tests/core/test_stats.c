/* test_stats.c -- the per-model activity counters (eplb_model_stats) that
 * eplb_registry_list returns for the metrics: they move on a commit, stay
 * put on a dry run and on a refused request, count a failure once the
 * rebalance was computed, and count RecordLoad passes (automatic
 * rebalances included). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

/* The deepseek-ai/EPLB README shape (as in test_engine.c). */
static eplb_handle readme = { .architecture = "Readme", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                              .moe = { .num_moe_layers = 2, .num_logical_experts = 12, .num_physical_experts = 16,
                                       .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                       .num_expert_groups = 4 } };
static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};
static int64_t phys_load[2 * 16];

static void register_model(const char *name, bool auto_rebalance) {
    eplb_register_request req = { .model_name = name, .model = &readme, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                .step_interval = 3, .auto_rebalance = auto_rebalance } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    eplb_model_view_release(&res.view);
}

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    register_model("m", false);
    memset(phys_load, 0, sizeof phys_load);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++)
            phys_load[l * 16 + e] = readme_load[l][e];
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(stats, .init = setup, .fini = teardown);

/* The model's counters as eplb_registry_list shows them. */
static eplb_model_stats stats_of(const char *id) {
    eplb_model_summary *all;
    size_t n;
    cr_assert_eq(eplb_registry_list(reg, &all, &n, NULL), EPLB_OK);
    eplb_model_stats s;
    memset(&s, 0, sizeof s);
    int found = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(all[i].model_id, id) == 0) {
            s = all[i].stats;
            found = 1;
        }
    free(all);
    cr_assert(found, "model %s not listed", id);
    return s;
}

static eplb_rebalance_request request(void) {
    return (eplb_rebalance_request){ .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                     .slot_order = EPLB_SLOT_ALGORITHM };
}

Test(stats, start_at_zero) {
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.rebalances, 0);
    cr_assert_eq(s.rebalance_failures, 0);
    cr_assert_not(s.has_last);
    cr_assert_eq(s.passes_recorded, 0);
    cr_assert_eq(s.bytes_moved_total, 0);
}

Test(stats, a_commit_sets_the_last_rebalance) {
    eplb_rebalance_request req = request();
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.rebalances, 1);
    cr_assert_eq(s.rebalance_failures, 0);
    cr_assert(s.has_last);
    cr_assert_float_eq(s.last_balancedness_before, res.balancedness_before, 1e-12);
    cr_assert_float_eq(s.last_balancedness_after, res.balancedness_after, 1e-12);
    cr_assert_gt(s.last_balancedness_after, s.last_balancedness_before);
    cr_assert_eq(s.last_experts_moved, res.experts_moved);
    cr_assert_gt(s.last_experts_moved, 0);
    cr_assert_eq(s.last_bytes_moved, 0); /* no weights attached */
    cr_assert_geq(s.last_compute_ms, 0.0);
    eplb_rebalance_result_free(&res);

    /* A second commit (from the new map) replaces the last_* values. */
    req.expected_epoch = 1;
    req.has_expected_epoch = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    s = stats_of("m");
    cr_assert_eq(s.rebalances, 2);
    cr_assert_eq(s.last_experts_moved, res.experts_moved);
    cr_assert_float_eq(s.last_balancedness_before, res.balancedness_before, 1e-12);
    eplb_rebalance_result_free(&res);
}

Test(stats, a_dry_run_and_a_refusal_change_nothing) {
    eplb_rebalance_request req = request();
    req.dry_run = true;
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    eplb_rebalance_result_free(&res);
    req.dry_run = false;
    req.has_expected_epoch = true;
    req.expected_epoch = 7; /* stale: refused before anything is computed */
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EABORTED);
    req.has_expected_epoch = false;
    req.physical_load_len = 5; /* bad length */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.rebalances, 0);
    cr_assert_eq(s.rebalance_failures, 0);
    cr_assert_not(s.has_last);
}

Test(stats, a_store_failure_is_a_failed_rebalance_and_keeps_the_last) {
    eplb_rebalance_request req = request();
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    double before = res.balancedness_before, after = res.balancedness_after;
    eplb_rebalance_result_free(&res);
    store.fail_next = 1;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EUNAVAILABLE);
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.rebalances, 1);
    cr_assert_eq(s.rebalance_failures, 1);
    cr_assert_float_eq(s.last_balancedness_before, before, 1e-12);
    cr_assert_float_eq(s.last_balancedness_after, after, 1e-12);
}

Test(stats, record_load_counts_passes_not_dummies_nor_refusals) {
    eplb_record_request rec = { .model_id = "m", .physical_load = phys_load, .physical_load_len = 32 };
    eplb_record_result rr;
    for (int i = 0; i < 4; i++)
        cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    rec.is_dummy = true;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    rec.is_dummy = false;
    rec.physical_load_len = 3;
    eplb_error err;
    cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, &err), EPLB_EINVAL);
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.passes_recorded, 4);
    cr_assert_eq(s.rebalances, 0); /* not registered with auto_rebalance */
}

Test(stats, automatic_rebalances_count_as_rebalances) {
    register_model("auto", true);
    eplb_record_request rec = { .model_id = "auto", .physical_load = phys_load, .physical_load_len = 32 };
    eplb_record_result rr;
    for (int i = 0; i < 6; i++)
        cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    eplb_model_stats s = stats_of("auto");
    cr_assert_eq(s.passes_recorded, 6);
    cr_assert_eq(s.rebalances, 2); /* step_interval 3 */
    cr_assert(s.has_last);
    cr_assert_gt(s.last_balancedness_after, 0.0);
    /* A failed automatic rebalance: the pass counts, the call succeeds. */
    store.fail_next = 1;
    for (int i = 0; i < 3; i++)
        cr_assert_eq(eplb_registry_record_load(reg, &rec, &rr, NULL), EPLB_OK);
    cr_assert_neq(rr.auto_rebalance_error[0], '\0');
    s = stats_of("auto");
    cr_assert_eq(s.passes_recorded, 9);
    cr_assert_eq(s.rebalances, 2);
    cr_assert_eq(s.rebalance_failures, 1);
    /* The other model is untouched. */
    cr_assert_eq(stats_of("m").passes_recorded, 0);
}

/* ---- weights: a mover that copies 100 bytes per changed slot ---------------- */

static int fail_scatters; /* scatter calls that fail (EPLB_EDATALOSS) */

static eplb_status sm_check(void *ctx, uint32_t L, uint32_t P, const int32_t *o, const int32_t *n,
                            eplb_error *err) {
    (void)ctx, (void)L, (void)P, (void)o, (void)n, (void)err;
    return EPLB_OK;
}
static eplb_status sm_gather(void *ctx, uint32_t layer, uint32_t P, const int32_t *o, const int32_t *n,
                             eplb_error *err) {
    (void)ctx, (void)layer, (void)P, (void)o, (void)n, (void)err;
    return EPLB_OK;
}
static eplb_status sm_scatter(void *ctx, uint32_t layer, uint32_t P, const int32_t *o, const int32_t *n,
                              eplb_move_bytes *bytes, eplb_error *err) {
    (void)ctx;
    *bytes = (eplb_move_bytes){ 0, 0, 0 };
    if (layer == 1 && fail_scatters > 0) {
        fail_scatters--;
        return eplb_error_set(err, EPLB_EDATALOSS, "injected scatter failure");
    }
    for (uint32_t s = 0; s < P; s++)
        bytes->written += o[s] != n[s] ? 100 : 0;
    return EPLB_OK;
}
static void sm_close(void *ctx) { (void)ctx; }
static const eplb_weights_ops sm_ops = { .check = sm_check, .gather = sm_gather, .scatter = sm_scatter,
                                         .close = sm_close };

static void attach(void) {
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "m", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "m", &sm_ops, NULL, &shape, NULL), EPLB_OK);
}

Test(stats, moved_bytes_add_up_and_a_failed_move_is_counted) {
    attach();
    eplb_rebalance_request req = request();
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_gt(res.bytes_moved, 0);
    uint64_t first = res.bytes_moved;
    eplb_model_stats s = stats_of("m");
    cr_assert_eq(s.last_bytes_moved, first);
    cr_assert_eq(s.bytes_moved_total, first);
    cr_assert_float_eq(s.last_move_ms, res.move_ms, 1e-12);
    eplb_rebalance_result_free(&res);

    /* Layer 1's scatter fails twice (the retry too): layer 0's bytes were
     * copied, the model needs a reload, the rebalance failed. */
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 16; e++)
            phys_load[l * 16 + e] = (e * 37 + l * 11) % 97 + 1;
    req.slot_order = EPLB_SLOT_ALGORITHM;
    fail_scatters = 2;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EDATALOSS);
    s = stats_of("m");
    cr_assert_eq(s.rebalances, 1);
    cr_assert_eq(s.rebalance_failures, 1);
    cr_assert_eq(s.last_bytes_moved, first);  /* the last commit's */
    cr_assert_geq(s.bytes_moved_total, first); /* plus what the failed one copied */
}

Test(stats, a_new_registration_starts_from_zero) {
    eplb_rebalance_request req = request();
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    eplb_rebalance_result_free(&res);
    cr_assert_eq(stats_of("m").rebalances, 1);
    cr_assert_eq(eplb_registry_delete(reg, "m", false, NULL), EPLB_OK);
    register_model("m", false);
    cr_assert_eq(stats_of("m").rebalances, 0);
}
