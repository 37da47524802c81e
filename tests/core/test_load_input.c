/* test_load_input.c -- the load a client may send: Rebalance with
 * logical_load ([L][N], what vLLM's policy gets) instead of physical_load,
 * and RecordLoad with several passes packed (num_passes).  A bad request
 * changes nothing. */
#include <criterion/criterion.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

/* 2 layers, 12 experts, 16 slots, 8 GPUs in 2 nodes, 4 groups. */
static eplb_handle moe = { .architecture = "Readme", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                           .moe = { .num_moe_layers = 2, .num_logical_experts = 12, .num_physical_experts = 16,
                                    .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                    .num_expert_groups = 4 } };

static const int64_t logical[2 * 12] = {
    90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86,
    20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27,
};

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &moe, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 8,
                                                .step_interval = 4, .auto_rebalance = true } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(load_input, .init = setup, .fini = teardown);

/* Physical load that sums to `logical` under the initial map (expert e in
 * slot e; the redundant slots 12..15 hold experts 0..3 and get 0). */
static void physical_of(int64_t *phys) {
    memset(phys, 0, 2 * 16 * sizeof *phys);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++)
            phys[l * 16 + e] = logical[l * 12 + e];
}

Test(load_input, logical_load_rebalances_like_the_physical_load_it_sums) {
    int64_t phys[32];
    physical_of(phys);
    eplb_rebalance_request a = { .model_id = "m", .physical_load = phys, .physical_load_len = 32, .dry_run = true };
    eplb_rebalance_request b = { .model_id = "m", .logical_load = logical, .logical_load_len = 24, .dry_run = true };
    eplb_rebalance_result ra, rb;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &a, &ra, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_rebalance(reg, &b, &rb, &err), EPLB_OK, "%s", err.msg);
    cr_assert_arr_eq(ra.placement.phy2log, rb.placement.phy2log, 32 * sizeof(int32_t));
    cr_assert_float_eq(ra.balancedness_after, rb.balancedness_after, 0);
    cr_assert_float_eq(ra.balancedness_before, rb.balancedness_before, 0);
    eplb_rebalance_result_free(&ra);
    eplb_rebalance_result_free(&rb);
    /* Committed from logical_load. */
    b.dry_run = false;
    cr_assert_eq(eplb_registry_rebalance(reg, &b, &rb, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(rb.placement.epoch, 1);
    eplb_rebalance_result_free(&rb);
}

Test(load_input, bad_logical_load_changes_nothing) {
    int64_t phys[32], bad[24];
    physical_of(phys);
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request both = { .model_id = "m", .physical_load = phys, .physical_load_len = 32,
                                    .logical_load = logical, .logical_load_len = 24 };
    cr_assert_eq(eplb_registry_rebalance(reg, &both, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "not both"), "%s", err.msg);
    eplb_rebalance_request shortr = { .model_id = "m", .logical_load = logical, .logical_load_len = 23 };
    cr_assert_eq(eplb_registry_rebalance(reg, &shortr, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "logical_load has 23 entries, want num_layers 2 x num_logical_experts 12"), "%s",
              err.msg);
    memcpy(bad, logical, sizeof bad);
    bad[17] = -1;
    eplb_rebalance_request neg = { .model_id = "m", .logical_load = bad, .logical_load_len = 24 };
    cr_assert_eq(eplb_registry_rebalance(reg, &neg, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "logical_load[17] = -1 is negative (layer 1, expert 5)"), "%s", err.msg);
    eplb_placement p;
    cr_assert_eq(get_placement(reg, "m", &p, NULL, NULL), EPLB_OK);
    cr_assert_eq(p.epoch, 0);
    eplb_placement_free(&p);
}

Test(load_input, several_passes_in_one_record_load) {
    int64_t phys[3 * 32];
    for (int k = 0; k < 3; k++) {
        physical_of(phys + k * 32);
        for (int i = 0; i < 32; i++)
            phys[k * 32 + i] *= k + 1;
    }
    eplb_record_request r = { .model_id = "m", .physical_load = phys, .physical_load_len = 96, .num_passes = 3 };
    eplb_record_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_record_load(reg, &r, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(res.passes_recorded, 3);
    cr_assert(!res.rebalanced); /* step_interval 4 */
    /* The window holds 1x + 2x + 3x the load: a rebalance from it equals
     * one from 6x the load. */
    int64_t six[24];
    for (int i = 0; i < 24; i++)
        six[i] = 6 * logical[i];
    eplb_rebalance_request w = { .model_id = "m", .dry_run = true };
    eplb_rebalance_request x = { .model_id = "m", .logical_load = six, .logical_load_len = 24, .dry_run = true };
    eplb_rebalance_result rw, rx;
    cr_assert_eq(eplb_registry_rebalance(reg, &w, &rw, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_rebalance(reg, &x, &rx, &err), EPLB_OK, "%s", err.msg);
    cr_assert_arr_eq(rw.placement.phy2log, rx.placement.phy2log, 32 * sizeof(int32_t));
    cr_assert_float_eq(rw.balancedness_before, rx.balancedness_before, 1e-15);
    eplb_rebalance_result_free(&rw);
    eplb_rebalance_result_free(&rx);
    /* Two more passes cross step_interval 4 (at pass 4): one automatic
     * rebalance, committed. */
    r.physical_load_len = 64;
    r.num_passes = 2;
    cr_assert_eq(eplb_registry_record_load(reg, &r, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(res.passes_recorded, 5);
    cr_assert(res.rebalanced);
    cr_assert_eq(res.epoch, 1);
}

Test(load_input, a_bad_pass_refuses_every_pass) {
    int64_t phys[3 * 32];
    for (int k = 0; k < 3; k++)
        physical_of(phys + k * 32);
    phys[2 * 32 + 5] = -3;
    eplb_record_request r = { .model_id = "m", .physical_load = phys, .physical_load_len = 96, .num_passes = 3 };
    eplb_record_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_record_load(reg, &r, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "pass 2:"), "%s", err.msg);
    r.num_passes = 2; /* 96 values are not 2 passes */
    cr_assert_eq(eplb_registry_record_load(reg, &r, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "want num_passes 2 x num_layers 2 x num_physical_experts 16"), "%s", err.msg);
    /* Nothing was counted. */
    phys[2 * 32 + 5] = 0;
    r.num_passes = 1;
    r.physical_load_len = 32;
    cr_assert_eq(eplb_registry_record_load(reg, &r, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(res.passes_recorded, 1);
}
