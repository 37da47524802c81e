/* test_registry.c -- RegisterModel's rules on the registry, with a fake
 * store that can fail on demand. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
}

static void teardown(void) { eplb_registry_close(reg); }

static eplb_handle lm = { .architecture = "DeepseekV3ForCausalLM", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                          .moe = { .num_moe_layers = 3, .num_logical_experts = 8, .num_physical_experts = 12,
                                   .num_local_physical_experts = 3, .num_redundant_experts = 4,
                                   .num_expert_groups = 2 } };
static eplb_handle vlm = { .architecture = "KimiK25ForConditionalGeneration",
                           .interfaces = EPLB_IFACE_MULTIMODAL, .language_model = &lm };

static eplb_register_request main_request(const char *name, const eplb_handle *h) {
    return (eplb_register_request){ .model_name = name, .model = h, .role = EPLB_ROLE_MAIN, .main_model_id = "",
                                    .parallel = { .enable_eplb = true, .ep_size = 4 } };
}

TestSuite(registry, .init = setup, .fini = teardown);

Test(registry, registers_wrapped_moe_with_initial_placement) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    cr_assert_str_eq(res.model_id, "kimi");
    cr_assert_str_eq(res.resolved_path, "KimiK25ForConditionalGeneration.language_model");
    cr_assert_eq(res.view.snap->placement.epoch, 0);
    cr_assert_eq(res.view.snap->placement.num_layers, 3);
    const int32_t row[] = { 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3 };
    for (int l = 0; l < 3; l++)
        cr_assert_arr_eq(res.view.snap->placement.phy2log + 12 * l, row, sizeof row);
    eplb_model_view_release(&res.view);
    cr_assert_eq(store.saves, 1);
    cr_assert_str_eq(store.last.architecture, "DeepseekV3ForCausalLM");
    cr_assert_eq(eplb_registry_count(reg), 1);
}

Test(registry, quiet_refusals_register_nothing) {
    eplb_handle llama = { .architecture = "LlamaForCausalLM" };
    eplb_register_request reqs[3] = { main_request("a", &vlm), main_request("b", &vlm), main_request("c", &llama) };
    reqs[0].parallel.enable_eplb = false;
    reqs[1].load_dummy_weights = true;
    const char *why[3] = { "EPLB is disabled", "dummy weights", "not a Mixture-of-Experts" };
    for (int i = 0; i < 3; i++) {
        eplb_register_result res;
        cr_assert_eq(eplb_registry_register(reg, &reqs[i], &res, NULL), EPLB_OK);
        cr_assert_not(res.registered);
        cr_assert_not_null(strstr(res.reason, why[i]), "%s", res.reason);
        cr_assert_null(res.view.snap);
    }
    cr_assert_eq(store.saves, 0);
    cr_assert_eq(eplb_registry_count(reg), 0);
}

Test(registry, same_registration_twice_is_idempotent) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    cr_assert_not_null(strstr(res.reason, "already registered"));
    cr_assert_eq(res.view.snap->placement.num_physical, 12);
    eplb_model_view_release(&res.view);
    cr_assert_eq(store.saves, 1);
    cr_assert_eq(eplb_registry_count(reg), 1);
}

Test(registry, same_name_different_shape_is_already_exists) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    req.parallel.ep_size = 2;
    eplb_handle lm2 = lm;
    lm2.moe.num_local_physical_experts = 6;
    req.model = &lm2;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EEXIST);
    cr_assert_not_null(strstr(err.msg, "num_local_physical_experts 3 (registered) != 6"), "%s", err.msg);
    cr_assert_not(res.registered);
    eplb_placement p;
    cr_assert_eq(get_placement(reg, "kimi", &p, NULL, NULL), EPLB_OK);
    cr_assert_eq(p.num_physical, 12);
    eplb_placement_free(&p);
}

Test(registry, store_failure_leaves_nothing_registered) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    eplb_error err;
    store.fail_next = 1;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EUNAVAILABLE);
    cr_assert_str_eq(err.msg, "store: injected failure");
    cr_assert_not(res.registered);
    cr_assert_eq(eplb_registry_count(reg), 0);
    cr_assert_eq(get_placement(reg, "kimi", &(eplb_placement){0}, NULL, &err), EPLB_ENOTFOUND);
}

Test(registry, speculator_is_unwrapped_like_a_main_model) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);

    /* A drafter that wraps a VLM wrapper: two levels of unwrapping. */
    eplb_handle drafter_lm = lm;
    drafter_lm.architecture = "DeepseekV3MTP";
    drafter_lm.moe.num_moe_layers = 1;
    eplb_handle drafter_vlm = { .architecture = "KimiK25ForConditionalGeneration",
                                .interfaces = EPLB_IFACE_MULTIMODAL, .language_model = &drafter_lm };
    eplb_handle drafter = { .architecture = "EagleKimiK25", .interfaces = EPLB_IFACE_MULTIMODAL,
                            .language_model = &drafter_vlm };
    eplb_register_request spec = main_request("kimi-drafter", &drafter);
    spec.role = EPLB_ROLE_SPECULATOR;
    spec.main_model_id = "kimi";
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    cr_assert_str_eq(res.resolved_path, "EagleKimiK25.language_model.language_model");
    cr_assert_eq(res.view.snap->placement.num_layers, 1);
    eplb_model_view_release(&res.view);
    cr_assert_eq(store.last.role, EPLB_ROLE_SPECULATOR);
    cr_assert_str_eq(store.last.main_model_id, "kimi");
}

Test(registry, speculator_must_agree_with_main_model) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);

    eplb_handle d = lm;
    d.moe.num_redundant_experts = 0;
    d.moe.num_physical_experts = 8;
    d.moe.num_local_physical_experts = 2;
    eplb_register_request spec = main_request("drafter", &d);
    spec.role = EPLB_ROLE_SPECULATOR;
    spec.main_model_id = "kimi";
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, &err), EPLB_EPRECONDITION);
    cr_assert_str_eq(err.msg, "speculator model.moe.num_redundant_experts 0 differs from main model kimi (4)");

    d = lm;
    d.moe.num_expert_groups = 4;
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, &err), EPLB_EPRECONDITION);
    cr_assert_not_null(strstr(err.msg, "num_expert_groups 4 differs"), "%s", err.msg);

    spec.main_model_id = "nobody";
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, &err), EPLB_ENOTFOUND);
    cr_assert_str_eq(err.msg, "main model nobody is not registered");

    spec.main_model_id = "";
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "main_model_id"), "%s", err.msg);
    cr_assert_eq(eplb_registry_count(reg), 1);
}

Test(registry, main_model_with_main_model_id_is_invalid) {
    eplb_register_request req = main_request("kimi", &vlm);
    req.main_model_id = "other";
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "main_model_id is only for MODEL_ROLE_SPECULATOR");
}

Test(registry, bad_requests_name_the_field) {
    eplb_register_request req = main_request("bad name", &vlm);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "model_name"));
    req = main_request("x", NULL);
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "model is required");
    eplb_handle broken = lm;
    broken.moe.num_physical_experts = 13;
    eplb_handle w = vlm;
    w.language_model = &broken;
    req = main_request("x", &w);
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "model.language_model.moe.num_physical_experts 13 != num_logical_experts 8 + num_redundant_experts 4");
    cr_assert_eq(eplb_registry_count(reg), 0);
    cr_assert_eq(store.saves, 0);
}

/* ---- what the store gives back at open ------------------------------------- */

static eplb_model_record stored(const char *name, eplb_move_state state) {
    eplb_model_record rec;
    memset(&rec, 0, sizeof rec);
    snprintf(rec.model_id, sizeof rec.model_id, "%s", name);
    snprintf(rec.architecture, sizeof rec.architecture, "DeepseekV3ForCausalLM");
    snprintf(rec.resolved_path, sizeof rec.resolved_path, "DeepseekV3ForCausalLM");
    rec.shape = (eplb_model_shape){ .num_layers = 3, .num_logical = 8, .num_physical = 12, .num_local = 3,
                                    .num_redundant = 4, .num_groups = 2, .ep_size = 4, .num_nodes = 1,
                                    .window_size = 10, .step_interval = 10 };
    cr_assert_eq(eplb_placement_init(&rec.placement, 3, 8, 12, NULL), EPLB_OK);
    rec.placement.epoch = 7;
    eplb_load_window_init(&rec.window, 3, 8, 10);
    rec.state = state;
    return rec;
}

Test(registry, a_model_stored_mid_move_is_served_as_needing_a_reload) {
    eplb_registry_close(reg);
    eplb_model_record recs[2] = { stored("moving", EPLB_MOVE_MOVING), stored("idle", EPLB_MOVE_IDLE) };
    store.replay = recs;
    store.num_replay = 2;
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "moving", &v, NULL), EPLB_OK);
    cr_assert_eq(v.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_eq(v.snap->placement.epoch, 7);
    cr_assert_not_null(strstr(v.state_reason, "stopped while moving weights from epoch 7"), "%s", v.state_reason);
    eplb_model_view_release(&v);
    cr_assert_eq(eplb_registry_view(reg, "idle", &v, NULL), EPLB_OK);
    cr_assert_eq(v.state, EPLB_MOVE_IDLE);
    eplb_model_view_release(&v);
}

Test(registry, a_damaged_row_refuses_that_model_only) {
    eplb_registry_close(reg);
    eplb_model_record recs[2] = { stored("ok", EPLB_MOVE_IDLE) };
    memset(&recs[1], 0, sizeof recs[1]);
    snprintf(recs[1].model_id, sizeof recs[1].model_id, "bad");
    snprintf(recs[1].damaged, sizeof recs[1].damaged, "store: model bad: checksum mismatch");
    store.replay = recs;
    store.num_replay = 2;
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_model_view v;
    eplb_error err;
    cr_assert_eq(eplb_registry_view(reg, "bad", &v, &err), EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "model bad cannot be served"), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "checksum mismatch"), "%s", err.msg);
    eplb_rebalance_request rreq = { .model_id = "bad" };
    eplb_rebalance_result rres;
    cr_assert_eq(eplb_registry_rebalance(reg, &rreq, &rres, &err), EPLB_EDATALOSS);
    /* Re-registering does not paper over it. */
    eplb_register_request req = main_request("bad", &lm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EDATALOSS);
    cr_assert_eq(eplb_registry_view(reg, "ok", &v, NULL), EPLB_OK);
    eplb_model_view_release(&v);
}

/* ---- bounded cost ------------------------------------------------------------ */

Test(registry, max_models_is_enforced) {
    eplb_registry_close(reg);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    lim.max_models = 2;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    const char *names[] = { "a", "b", "c" };
    for (int i = 0; i < 3; i++) {
        eplb_register_request req = main_request(names[i], &lm);
        eplb_register_result res;
        eplb_error err;
        eplb_status st = eplb_registry_register(reg, &req, &res, &err);
        if (i < 2) {
            cr_assert_eq(st, EPLB_OK);
            eplb_model_view_release(&res.view);
        } else {
            cr_assert_eq(st, EPLB_ENOSPACE);
            cr_assert_not_null(strstr(err.msg, "--max-models"), "%s", err.msg);
        }
    }
    /* The same registration again is still idempotent at the limit. */
    eplb_register_request req = main_request("a", &lm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    cr_assert_eq(eplb_registry_count(reg), 2);
    cr_assert_eq(store.saves, 2);
}

Test(registry, the_state_budget_is_enforced) {
    eplb_registry_close(reg);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    eplb_model_shape s = { .num_layers = 3, .num_logical = 8, .num_physical = 12, .window_size = 1000 };
    lim.max_state_bytes = eplb_model_state_bytes(&s) * 3 / 2; /* room for one */
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = main_request("a", &lm);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_model_view_release(&res.view);
    req = main_request("b", &lm);
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_ENOSPACE);
    cr_assert_not_null(strstr(err.msg, "--max-state-mib"), "%s", err.msg);
    cr_assert_eq(eplb_registry_count(reg), 1);
}

Test(registry, a_shape_whose_placement_cannot_be_sent_is_refused) {
    eplb_registry_close(reg);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    lim.max_response_bytes = 4096 + 100; /* smaller than any map of lm's shape */
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = main_request("a", &vlm);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "--max-message-bytes"), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "model.language_model.moe"), "%s", err.msg);
    cr_assert_eq(store.saves, 0);
}

/* ---- ListModels, DeleteModel ---------------------------------------------------- */

static eplb_status noop_check(void *c, uint32_t L, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *e) {
    (void)c, (void)L, (void)P, (void)o, (void)n, (void)e;
    return EPLB_OK;
}
static int noop_closed;
static void noop_close(void *c) { (void)c, noop_closed++; }
static const eplb_weights_ops noop_ops = { .check = noop_check, .close = noop_close };

Test(registry, list_shows_every_model_sorted_with_its_state) {
    const char *names[] = { "zeta", "alpha", "mid" };
    for (int i = 0; i < 3; i++) {
        eplb_register_request req = main_request(names[i], &vlm);
        eplb_register_result res;
        cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
        eplb_model_view_release(&res.view);
    }
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "mid", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "mid", &noop_ops, NULL, &shape, NULL), EPLB_OK);
    eplb_model_summary *all;
    size_t n;
    cr_assert_eq(eplb_registry_list(reg, &all, &n, NULL), EPLB_OK);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(all[0].model_id, "alpha");
    cr_assert_str_eq(all[1].model_id, "mid");
    cr_assert_str_eq(all[2].model_id, "zeta");
    cr_assert_str_eq(all[0].resolved_path, "KimiK25ForConditionalGeneration.language_model");
    cr_assert_eq(all[0].shape.num_physical, 12);
    cr_assert_eq(all[0].state, EPLB_MOVE_IDLE);
    cr_assert(all[1].weights_attached);
    cr_assert_not(all[0].weights_attached);
    free(all);
}

Test(registry, delete_refuses_attached_weights_and_main_models_of_speculators_unless_forced) {
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    eplb_register_request spec = main_request("draft", &lm);
    spec.role = EPLB_ROLE_SPECULATOR;
    spec.main_model_id = "kimi";
    cr_assert_eq(eplb_registry_register(reg, &spec, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_model_view_release(&res.view);

    cr_assert_eq(eplb_registry_delete(reg, "kimi", false, &err), EPLB_EPRECONDITION);
    cr_assert_not_null(strstr(err.msg, "speculator(s) draft"), "%s", err.msg);
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "draft", &shape, NULL), EPLB_OK);
    noop_closed = 0;
    cr_assert_eq(eplb_registry_attach_weights(reg, "draft", &noop_ops, NULL, &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_delete(reg, "draft", false, &err), EPLB_EPRECONDITION);
    cr_assert_not_null(strstr(err.msg, "DetachWeights"), "%s", err.msg);
    cr_assert_eq(eplb_registry_count(reg), 2);
    cr_assert_eq(store.removes, 0);

    /* A store that refuses changes nothing. */
    store.fail_next = 1;
    cr_assert_eq(eplb_registry_delete(reg, "draft", true, &err), EPLB_EUNAVAILABLE);
    cr_assert_eq(eplb_registry_count(reg), 2);
    cr_assert_eq(noop_closed, 0);

    cr_assert_eq(eplb_registry_delete(reg, "draft", true, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(noop_closed, 1);
    cr_assert_eq(eplb_registry_delete(reg, "kimi", false, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(store.removes, 2);
    cr_assert_eq(eplb_registry_count(reg), 0);
    cr_assert_eq(eplb_registry_delete(reg, "kimi", false, &err), EPLB_ENOTFOUND);
    /* The name is free again: a new registration starts at epoch 0. */
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_eq(res.view.snap->placement.epoch, 0);
    eplb_model_view_release(&res.view);
}

Test(registry, a_damaged_model_can_be_deleted_and_registered_again) {
    eplb_registry_close(reg);
    eplb_model_record recs[1];
    memset(recs, 0, sizeof recs);
    snprintf(recs[0].model_id, sizeof recs[0].model_id, "kimi");
    snprintf(recs[0].damaged, sizeof recs[0].damaged, "store: model kimi: checksum mismatch");
    store.replay = recs;
    store.num_replay = 1;
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_model_summary *all;
    size_t n;
    cr_assert_eq(eplb_registry_list(reg, &all, &n, NULL), EPLB_OK);
    cr_assert_eq(n, 1);
    cr_assert_not_null(strstr(all[0].damaged, "checksum mismatch"));
    free(all);
    eplb_error err;
    cr_assert_eq(eplb_registry_delete(reg, "kimi", false, &err), EPLB_OK, "%s", err.msg);
    eplb_register_request req = main_request("kimi", &vlm);
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_model_view_release(&res.view);
}
