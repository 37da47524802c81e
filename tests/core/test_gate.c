/* test_gate.c -- the commit gate and the topology override: a rebalance
 * that would make balancedness worse is answered but not committed unless
 * forced, one that gains less than min_improvement is not committed, and a
 * topology other than the registered one is dry-run only.  Nothing of a
 * refused or gated request changes the placement, the epoch or the store. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

/* 1 layer, 4 experts, 8 slots on 4 GPUs (one node), 1 group. */
static eplb_handle moe = { .architecture = "GateMoE", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                           .moe = { .num_moe_layers = 1, .num_logical_experts = 4, .num_physical_experts = 8,
                                    .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                    .num_expert_groups = 1 } };

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &moe, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 4, .num_nodes = 1, .window_size = 4,
                                                .step_interval = 1, .auto_rebalance = true } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(gate, .init = setup, .fini = teardown);

static uint64_t epoch_now(void) {
    eplb_placement p;
    cr_assert_eq(get_placement(reg, "m", &p, NULL, NULL), EPLB_OK);
    uint64_t e = p.epoch;
    eplb_placement_free(&p);
    return e;
}

/* Commit a placement made for a hot expert 0, then ask under the opposite
 * load: the policy's answer for that load can be checked against the
 * current map's balancedness either way. */
Test(gate, worse_is_not_committed_unless_forced_and_small_gains_wait) {
    const int64_t hot0[4] = { 1000, 10, 10, 10 };
    eplb_rebalance_request req = { .model_id = "m", .logical_load = hot0, .logical_load_len = 4 };
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.committed);
    cr_assert_str_eq(res.reason, "");
    cr_assert_gt(res.balancedness_after, res.balancedness_before);
    eplb_rebalance_result_free(&res);
    cr_assert_eq(epoch_now(), 1);

    /* The same load again: nothing better to find (gain 0): committed
     * without min_improvement, not with one. */
    int saves = store.saves;
    req.knobs.min_improvement = 0.01;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(!res.committed);
    cr_assert(strstr(res.reason, "below min_improvement 0.010000"), "%s", res.reason);
    eplb_rebalance_result_free(&res);
    cr_assert_eq(epoch_now(), 1);
    cr_assert_eq(store.saves, saves);
    req.force = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.committed);
    eplb_rebalance_result_free(&res);
    cr_assert_eq(epoch_now(), 2);

    /* Out of range: refused, nothing changes. */
    req.force = false;
    req.knobs.min_improvement = 1.5;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "min_improvement 1.5 is not in [0, 1]"), "%s", err.msg);
    cr_assert_eq(epoch_now(), 2);
}

/* DeepSeek's policy is greedy, so for some loads a placement the engine
 * already has (adopted with SetupFromMapping) is better than the policy's
 * answer.  Found by a seeded search (deterministic); the gate keeps it. */
Test(gate, an_answer_worse_than_the_current_placement_is_not_committed) {
    unsigned seed = 7;
    eplb_error err;
    for (int trial = 0; trial < 4000; trial++) {
        int32_t map[8];
        for (int s = 0; s < 8; s++)
            map[s] = s < 4 ? s : rand_r(&seed) % 4;
        int64_t load[4];
        for (int e = 0; e < 4; e++)
            load[e] = 1 + rand_r(&seed) % 100;
        eplb_setup_request su = { .model_id = "m", .expanded_phy2log = map, .expanded_len = 8, .num_physical = 8,
                                  .old_num_physical = 8, .ep_size = 4 };
        eplb_placement out;
        if (eplb_registry_setup_from_mapping(reg, &su, &out, &err) != EPLB_OK)
            continue;
        eplb_placement_free(&out);
        uint64_t epoch = epoch_now();
        eplb_rebalance_request req = { .model_id = "m", .logical_load = load, .logical_load_len = 4,
                                       .slot_order = EPLB_SLOT_ALGORITHM };
        eplb_rebalance_result res;
        cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
        bool worse = res.balancedness_after < res.balancedness_before - 1e-9;
        if (!worse) {
            cr_assert(res.committed);
            eplb_rebalance_result_free(&res);
            continue;
        }
        cr_assert(!res.committed);
        cr_assert(strstr(res.reason, "would get worse"), "%s", res.reason);
        eplb_rebalance_result_free(&res);
        cr_assert_eq(epoch_now(), epoch);
        req.force = true;
        cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
        cr_assert(res.committed);
        eplb_rebalance_result_free(&res);
        cr_assert_eq(epoch_now(), epoch + 1);
        cr_log_info("worse answer found at trial %d", trial);
        return;
    }
    cr_assert_fail("no load found for which the policy's answer is worse than the current placement");
}

Test(gate, a_different_topology_is_dry_run_only) {
    const int64_t hot0[4] = { 1000, 10, 10, 10 };
    eplb_rebalance_request req = { .model_id = "m", .logical_load = hot0, .logical_load_len = 4, .num_gpus = 2 };
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "num_gpus 2 (registered ep_size 4)") && strstr(err.msg, "dry-run only"), "%s",
              err.msg);
    cr_assert_eq(epoch_now(), 0);
    req.dry_run = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(!res.committed);
    eplb_rebalance_result_free(&res);
    /* The registered values themselves are no override. */
    req.dry_run = false;
    req.num_gpus = 4;
    req.num_nodes = 1;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.committed);
    eplb_rebalance_result_free(&res);
    cr_assert_eq(epoch_now(), 1);
}

/* The automatic rebalances' knobs are part of the registration: asking for
 * other ones under the same name is refused, naming the field. */
Test(gate, registration_with_other_rebalance_defaults_is_refused) {
    eplb_register_request req = { .model_name = "m", .model = &moe, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 4, .num_nodes = 1, .window_size = 4,
                                                .step_interval = 1, .auto_rebalance = true } };
    eplb_register_result res;
    eplb_error err;
    req.parallel.defaults.policy = EPLB_POLICY_INCREMENTAL;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EEXIST);
    cr_assert(strstr(err.msg, "parallel.default_policy 0 (registered) != 1"), "%s", err.msg);
    req.parallel.defaults.policy = EPLB_POLICY_DEEPSEEK;
    req.parallel.defaults.target_balancedness = 0.9;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EEXIST);
    cr_assert(strstr(err.msg, "parallel.target_balancedness 0 (registered) != 0.9"), "%s", err.msg);
    req.parallel.defaults.target_balancedness = 2;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "parallel.target_balancedness 2"), "%s", err.msg);
    req.parallel.defaults.target_balancedness = 0;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.registered);
    eplb_model_view_release(&res.view);
}

/* A dry run answers with the policy's maps; without_log2phy leaves the
 * largest one out, and a copy of that answer is whole again (the same
 * log2phy as the answer that built it). */
Test(gate, dry_run_without_log2phy_answers_the_same_maps) {
    const int64_t hot[4] = { 1000, 10, 10, 10 };
    eplb_rebalance_request req = { .model_id = "m", .logical_load = hot, .logical_load_len = 4, .dry_run = true };
    eplb_rebalance_result with, without;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &with, &err), EPLB_OK, "%s", err.msg);
    req.without_log2phy = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &without, &err), EPLB_OK, "%s", err.msg);
    cr_assert_not_null(with.placement.log2phy);
    cr_assert_null(without.placement.log2phy);
    cr_assert_eq(with.placement.max_replicas, without.placement.max_replicas);
    cr_assert_arr_eq(with.placement.phy2log, without.placement.phy2log, 8 * sizeof(int32_t));
    cr_assert_arr_eq(with.placement.logcnt, without.placement.logcnt, 4 * sizeof(int32_t));
    eplb_placement copy;
    cr_assert_eq(eplb_placement_copy(&copy, &without.placement, &err), EPLB_OK);
    cr_assert_arr_eq(copy.log2phy, with.placement.log2phy, 4 * with.placement.max_replicas * sizeof(int32_t));
    /* And the policy's answer is what a checked assign makes of it. */
    eplb_placement checked = { .num_layers = 1, .num_logical = 4 };
    cr_assert_eq(eplb_placement_assign(&checked, 8, 8, without.placement.phy2log, &err), EPLB_OK, "%s", err.msg);
    cr_assert_arr_eq(checked.log2phy, with.placement.log2phy, 4 * with.placement.max_replicas * sizeof(int32_t));
    cr_assert_eq(epoch_now(), 0);
    eplb_placement_free(&checked);
    eplb_placement_free(&copy);
    eplb_rebalance_result_free(&with);
    eplb_rebalance_result_free(&without);
}
