/* test_engine_rebalance.c -- engine-executed rebalances on the registry
 * (eplb_rebalance_engine.c): Rebalance(ENGINE) leaves the served placement
 * and epoch alone and stores the target as pending; the plan, executed on
 * simulated ranks, turns the served bytes into the target; CommitRebalance
 * commits (epoch + 1), per step with layers_per_step; AbortRebalance clears
 * it or, with bytes touched, needs a reload; every bad call changes
 * nothing. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

#define L 6
#define N 12
#define P 16
#define G 8
#define S (P / G)

static fake_store store;
static eplb_registry *reg;

static eplb_handle moe = { .architecture = "EngMoE", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                           .moe = { .num_moe_layers = L, .num_logical_experts = N, .num_physical_experts = P,
                                    .num_local_physical_experts = S, .num_redundant_experts = P - N,
                                    .num_expert_groups = 4 } };
static int64_t phys_load[L * P];

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &moe, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = G, .num_nodes = 2,
                                                .window_size = 4, .step_interval = 100 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    for (int l = 0; l < L; l++)
        for (int e = 0; e < N; e++)
            phys_load[l * P + e] = 10 + (e * 7 + l * 5) % 13 + (e == (l * 5) % N ? 400 : 0);
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(engine_rebalance, .init = setup, .fini = teardown);

static eplb_rebalance_request engine_request(uint32_t k) {
    return (eplb_rebalance_request){ .model_id = "m", .physical_load = phys_load, .physical_load_len = L * P,
                                     .slot_order = EPLB_SLOT_PRESERVE, .layers_per_step = k,
                                     .execution = EPLB_EXEC_ENGINE, .include_transfer_plan = true };
}

static eplb_placement served(void) {
    eplb_placement p;
    cr_assert_eq(get_placement(reg, "m", &p, NULL, NULL), EPLB_OK);
    return p;
}

static eplb_model_view view(void) {
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "m", &v, NULL), EPLB_OK);
    return v;
}

/* Run every rank's plan on bytes ([L][P] expert ids, global slots): per
 * step, reads from the step's start, sends delivered to the RECV of the
 * same (sender, receiver, tag). */
static void execute(const eplb_transfer_plan *p, int32_t *bytes) {
    uint32_t stg = p->max_staging + 1;
    int32_t *staging = calloc((size_t)G * stg, sizeof *staging);
    int32_t *snap = malloc((size_t)P * sizeof *snap), *snap_stg = malloc((size_t)G * stg * sizeof *snap_stg);
    cr_assert_eq(p->num_rank_plans, G);
    for (uint32_t k = 0; k < p->num_steps; k++) {
        int32_t *row = bytes + (size_t)p->steps[k].layer * P;
        memcpy(snap, row, P * sizeof *snap);
        memcpy(snap_stg, staging, (size_t)G * stg * sizeof *snap_stg);
        for (uint32_t g = 0; g < G; g++) {
            const eplb_transfer_rank *rk = &p->ranks[g];
            for (uint32_t i = rk->step_first[k]; i < rk->step_first[k + 1]; i++) {
                const eplb_transfer_op *op = &rk->ops[i];
                if (op->kind == EPLB_XFER_RECV)
                    continue;
                int32_t v = op->src_staging ? snap_stg[g * stg + op->src] : snap[g * S + op->src];
                cr_assert_eq(v, op->expert);
                uint32_t dg = g, dst = op->dst;
                bool dstg = op->dst_staging;
                if (op->kind == EPLB_XFER_SEND) {
                    const eplb_transfer_rank *pr = &p->ranks[op->peer];
                    int found = 0;
                    for (uint32_t j = pr->step_first[k]; j < pr->step_first[k + 1]; j++)
                        if (pr->ops[j].kind == EPLB_XFER_RECV && pr->ops[j].peer == g && pr->ops[j].tag == op->tag) {
                            found++;
                            dst = pr->ops[j].dst;
                            dstg = pr->ops[j].dst_staging;
                        }
                    cr_assert_eq(found, 1);
                    dg = op->peer;
                }
                if (dstg)
                    staging[dg * stg + dst] = v;
                else
                    row[dg * S + dst] = v;
            }
        }
    }
    free(staging);
    free(snap);
    free(snap_stg);
}

/* The placement a one-shot server rebalance would commit (dry run). */
static eplb_placement target(void) {
    eplb_rebalance_request req = engine_request(0);
    req.execution = EPLB_EXEC_SERVER;
    req.include_transfer_plan = false;
    req.dry_run = true;
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    eplb_placement t;
    cr_assert_eq(eplb_placement_copy(&t, &res.placement, NULL), EPLB_OK);
    eplb_rebalance_result_free(&res);
    return t;
}

Test(engine_rebalance, pending_plan_executes_to_the_target_and_commit_serves_it) {
    eplb_placement want = target(), before = served();
    int saves = store.saves;
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_not(res.committed);
    cr_assert(res.pending);
    cr_assert_eq(res.execution, EPLB_EXEC_ENGINE);
    cr_assert_eq(strlen(res.rebalance_id), 16);
    cr_assert_eq(res.placement.epoch, 0);
    cr_assert_arr_eq(res.placement.phy2log, before.phy2log, L * P * sizeof(int32_t), "the served map is answered");
    cr_assert(res.has_plan);
    cr_assert_eq(res.plan_base_epoch, 0);
    cr_assert_gt(res.num_layers_moved, 0);
    cr_assert_eq(store.saves, saves + 1, "the pending record is stored");
    cr_assert_eq(store.last.pending.execution, EPLB_EXEC_ENGINE);
    cr_assert_str_eq(store.last.pending.id, res.rebalance_id);
    eplb_model_view v = view();
    cr_assert_str_eq(v.pending_id, res.rebalance_id);
    cr_assert_eq(v.pending_execution, EPLB_EXEC_ENGINE);
    cr_assert_eq(v.snap->placement.epoch, 0);
    eplb_model_view_release(&v);

    /* Each rank's fetched plan is its part of the whole. */
    for (uint32_t g = 0; g < G; g++) {
        eplb_transfer_answer a;
        cr_assert_eq(eplb_registry_get_transfer_plan(reg, "m", res.rebalance_id, g, &a, &err), EPLB_OK, "%s",
                     err.msg);
        cr_assert_eq(a.plan.num_rank_plans, 1);
        cr_assert_eq(a.plan.first_rank, g);
        cr_assert_eq(a.plan.num_steps, res.plan.num_steps);
        cr_assert_eq(a.plan.ranks[0].num_ops, res.plan.ranks[g].num_ops);
        cr_assert_arr_eq(a.plan.ranks[0].ops, res.plan.ranks[g].ops,
                         res.plan.ranks[g].num_ops * sizeof(eplb_transfer_op));
        cr_assert_eq(a.base_epoch, 0);
        eplb_transfer_plan_free(&a.plan);
    }
    /* Executed on the served bytes, the plan gives the target. */
    int32_t *bytes = malloc(L * P * sizeof *bytes);
    memcpy(bytes, before.phy2log, L * P * sizeof *bytes);
    execute(&res.plan, bytes);
    cr_assert_arr_eq(bytes, want.phy2log, L * P * sizeof *bytes);

    eplb_rebalance_result c;
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", res.rebalance_id, true, 0, &c, &err), EPLB_OK, "%s",
                 err.msg);
    cr_assert(c.committed);
    cr_assert_not(c.pending);
    cr_assert_eq(c.layers_done, L);
    cr_assert_eq(c.placement.epoch, 1);
    eplb_placement after = served();
    cr_assert_eq(after.epoch, 1);
    cr_assert_arr_eq(after.phy2log, want.phy2log, L * P * sizeof(int32_t));
    cr_assert_str_empty(store.last.pending.id, "the commit clears the stored pending record");
    v = view();
    cr_assert_str_empty(v.pending_id);
    eplb_model_view_release(&v);
    eplb_rebalance_result_free(&c);
    /* Committed: the id is gone. */
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", res.rebalance_id, false, 0, &c, &err), EPLB_EABORTED);
    free(bytes);
    eplb_rebalance_result_free(&res);
    eplb_placement_free(&want);
    eplb_placement_free(&before);
    eplb_placement_free(&after);
}

Test(engine_rebalance, bad_calls_change_nothing) {
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    int saves = store.saves;
    eplb_transfer_answer a;
    cr_assert_eq(eplb_registry_get_transfer_plan(reg, "m", res.rebalance_id, G, &a, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "8 EP ranks"), "%s", err.msg);
    cr_assert_eq(eplb_registry_get_transfer_plan(reg, "m", "0000000000000000", 0, &a, &err), EPLB_ENOTFOUND);
    cr_assert_eq(eplb_registry_get_transfer_plan(reg, "nope", res.rebalance_id, 0, &a, &err), EPLB_ENOTFOUND);
    eplb_rebalance_result c;
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", "0000000000000000", false, 0, &c, &err), EPLB_EABORTED);
    cr_assert(strstr(err.msg, res.rebalance_id), "names the pending one: %s", err.msg);
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", res.rebalance_id, true, 7, &c, &err), EPLB_EABORTED);
    eplb_abort_result ab;
    cr_assert_eq(eplb_registry_abort_rebalance(reg, "m", "0000000000000000", 5, &ab, &err), EPLB_EABORTED);
    /* Another rebalance while pending: ABORTED; a dry run is fine. */
    eplb_rebalance_result r2;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &r2, &err), EPLB_EABORTED);
    cr_assert(strstr(err.msg, "CommitRebalance or AbortRebalance"), "%s", err.msg);
    req.dry_run = true;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &r2, &err), EPLB_OK, "%s", err.msg);
    eplb_rebalance_result_free(&r2);
    cr_assert_eq(store.saves, saves, "nothing stored");
    eplb_model_view v = view();
    cr_assert_str_eq(v.pending_id, res.rebalance_id);
    cr_assert_eq(v.snap->placement.epoch, 0);
    cr_assert_eq(v.state, EPLB_MOVE_IDLE);
    eplb_model_view_release(&v);
    eplb_rebalance_result_free(&res);
}

Test(engine_rebalance, request_fields_are_checked_before_anything_is_computed) {
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    req.execution = 2;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    req = engine_request(0);
    req.execution = EPLB_EXEC_SERVER; /* include_transfer_plan without the engine */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    req = engine_request(0);
    req.max_staging_bytes = 1000; /* no expert size anywhere */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "expert_bytes"), "%s", err.msg);
    req.knobs.expert_bytes = 2000; /* less than one expert */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    uint8_t ev[EPLB_EVENT_BYTES] = { 0 };
    req = engine_request(0);
    req.wait_event = ev;
    req.wait_event_len = sizeof ev;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert_eq(store.saves, 1, "only the registration was stored");
    eplb_model_view v = view();
    cr_assert_str_empty(v.pending_id);
    eplb_model_view_release(&v);
}

Test(engine_rebalance, a_staging_bound_cuts_chunks_and_one_too_small_refuses) {
    eplb_placement want = target(), before = served();
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    req.knobs.expert_bytes = 100;
    req.max_staging_bytes = 100; /* one entry per rank: refused unless every group fits */
    eplb_status st = eplb_registry_rebalance(reg, &req, &res, &err);
    if (st != EPLB_OK) {
        cr_assert_eq(st, EPLB_EPRECONDITION, "%s", err.msg);
        cr_assert(strstr(err.msg, "max_staging_bytes 100"), "%s", err.msg);
        cr_assert_null(strstr(err.msg, "--max-staging-mib"), "the engine's bound is the request's: %s", err.msg);
        eplb_model_view v = view();
        cr_assert_str_empty(v.pending_id, "refused: nothing pending");
        eplb_model_view_release(&v);
        cr_assert_eq(store.saves, 1);
    } else {
        eplb_abort_result ab;
        cr_assert_eq(eplb_registry_abort_rebalance(reg, "m", res.rebalance_id, 0, &ab, &err), EPLB_OK);
        eplb_rebalance_result_free(&res);
    }
    req.max_staging_bytes = 300;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_leq(res.plan.max_staging, 3);
    int32_t *bytes = malloc(L * P * sizeof *bytes);
    memcpy(bytes, before.phy2log, L * P * sizeof *bytes);
    execute(&res.plan, bytes);
    cr_assert_arr_eq(bytes, want.phy2log, L * P * sizeof *bytes);
    free(bytes);
    eplb_rebalance_result_free(&res);
    eplb_placement_free(&want);
    eplb_placement_free(&before);
}

Test(engine_rebalance, abort_untouched_clears_and_touched_needs_a_reload) {
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_abort_result ab;
    cr_assert_eq(eplb_registry_abort_rebalance(reg, "m", res.rebalance_id, 0, &ab, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(ab.epoch, 0);
    cr_assert_eq(ab.state, EPLB_MOVE_IDLE);
    cr_assert_str_empty(store.last.pending.id);
    eplb_model_view v = view();
    cr_assert_str_empty(v.pending_id);
    eplb_model_view_release(&v);
    eplb_rebalance_result_free(&res);

    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_abort_rebalance(reg, "m", res.rebalance_id, 4096, &ab, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(ab.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_eq(store.last.state, EPLB_MOVE_NEEDS_RELOAD, "stored");
    cr_assert_str_empty(store.last.pending.id);
    v = view();
    cr_assert_eq(v.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert(strstr(v.state_reason, "4096 bytes"), "%s", v.state_reason);
    cr_assert_eq(v.snap->placement.epoch, 0);
    eplb_model_view_release(&v);
    eplb_rebalance_result r2;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &r2, &err), EPLB_EPRECONDITION);
    eplb_rebalance_result_free(&res);
}

Test(engine_rebalance, steps_commit_one_at_a_time_and_continue_answers_the_next) {
    eplb_placement want = target();
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(2);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(res.num_layers_moved, 2);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", res.rebalance_id);
    uint64_t epoch = 0;
    uint32_t steps = 0;
    for (;;) {
        eplb_placement cur = served();
        int32_t *bytes = malloc(L * P * sizeof *bytes);
        memcpy(bytes, cur.phy2log, L * P * sizeof *bytes);
        /* ContinueRebalance answers the step awaiting commit, moving nothing. */
        eplb_continue_request cq = { .model_id = "m", .rebalance_id = id, .include_transfer_plan = true };
        eplb_rebalance_result nx;
        cr_assert_eq(eplb_registry_continue(reg, &cq, &nx, &err), EPLB_OK, "%s", err.msg);
        cr_assert_not(nx.committed);
        cr_assert(nx.pending);
        cr_assert_eq(nx.placement.epoch, epoch);
        execute(&nx.plan, bytes);
        /* Only the step's layers change. */
        for (uint32_t l = 0; l < L; l++) {
            bool in_step = false;
            for (uint32_t i = 0; i < nx.num_layers_moved; i++)
                in_step |= nx.layers_moved[i] == l;
            const int32_t *expect = in_step ? want.phy2log : cur.phy2log;
            cr_assert_arr_eq(bytes + l * P, expect + l * P, P * sizeof *bytes, "layer %u", l);
        }
        eplb_rebalance_result c;
        cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", id, true, epoch, &c, &err), EPLB_OK, "%s", err.msg);
        epoch++;
        steps++;
        cr_assert_eq(c.placement.epoch, epoch);
        eplb_placement now = served();
        cr_assert_arr_eq(now.phy2log, bytes, L * P * sizeof *bytes, "committed = executed");
        /* A retried commit of the same step is ABORTED, nothing changes. */
        eplb_rebalance_result c2;
        eplb_status rst = eplb_registry_commit_rebalance(reg, "m", id, true, epoch - 1, &c2, &err);
        cr_assert_eq(rst, EPLB_EABORTED);
        bool more = c.pending;
        eplb_placement_free(&now);
        eplb_placement_free(&cur);
        eplb_rebalance_result_free(&c);
        eplb_rebalance_result_free(&nx);
        free(bytes);
        if (!more)
            break;
        cr_assert_lt(steps, L);
    }
    eplb_placement fin = served();
    cr_assert_arr_eq(fin.phy2log, want.phy2log, L * P * sizeof(int32_t));
    cr_assert_geq(steps, 2);
    eplb_placement_free(&fin);
    eplb_placement_free(&want);
    eplb_rebalance_result_free(&res);
}

Test(engine_rebalance, store_failures_change_nothing) {
    eplb_rebalance_result res;
    eplb_error err;
    eplb_rebalance_request req = engine_request(0);
    store.fail_next = 1;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EUNAVAILABLE);
    eplb_model_view v = view();
    cr_assert_str_empty(v.pending_id);
    eplb_model_view_release(&v);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    store.fail_next = 1;
    eplb_rebalance_result c;
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", res.rebalance_id, false, 0, &c, &err), EPLB_EUNAVAILABLE);
    v = view();
    cr_assert_str_eq(v.pending_id, res.rebalance_id, "still pending");
    cr_assert_eq(v.snap->placement.epoch, 0);
    eplb_model_view_release(&v);
    store.fail_next = 1;
    eplb_abort_result ab;
    cr_assert_eq(eplb_registry_abort_rebalance(reg, "m", res.rebalance_id, 0, &ab, &err), EPLB_EUNAVAILABLE);
    v = view();
    cr_assert_str_eq(v.pending_id, res.rebalance_id, "still pending");
    eplb_model_view_release(&v);
    cr_assert_eq(eplb_registry_commit_rebalance(reg, "m", res.rebalance_id, false, 0, &c, &err), EPLB_OK, "%s",
                 err.msg);
    cr_assert_eq(c.placement.epoch, 1);
    eplb_rebalance_result_free(&c);
    eplb_rebalance_result_free(&res);
}

#include "eplb_alloc.h"

/* Every allocation of each engine call, failed in turn: a clean
 * EPLB_ENOMEM that stores and publishes nothing, then success. */
Test(engine_rebalance, every_allocation_failure_is_clean) {
    eplb_error err;
    eplb_rebalance_result res;
    int walked = 0;
    for (long n = 1;; n++) {
        int saves = store.saves;
        eplb_rebalance_request req = engine_request(2);
        eplb_alloc_fail_at(n, 0);
        eplb_status st = eplb_registry_rebalance(reg, &req, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK)
            break;
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
        cr_assert_eq(store.saves, saves, "allocation %ld: stored anyway", n);
        eplb_model_view v = view();
        cr_assert_str_empty(v.pending_id, "allocation %ld: pending anyway", n);
        eplb_model_view_release(&v);
        walked++;
    }
    cr_assert_gt(walked, 5);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", res.rebalance_id);
    eplb_rebalance_result_free(&res);
    for (long n = 1;; n++) {
        eplb_transfer_answer a;
        eplb_alloc_fail_at(n, 0);
        eplb_status st = eplb_registry_get_transfer_plan(reg, "m", id, 3, &a, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            eplb_transfer_plan_free(&a.plan);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
    }
    for (long n = 1;; n++) {
        eplb_continue_request cq = { .model_id = "m", .rebalance_id = id, .include_transfer_plan = true };
        eplb_alloc_fail_at(n, 0);
        eplb_status st = eplb_registry_continue(reg, &cq, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            eplb_rebalance_result_free(&res);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
    }
    for (long n = 1;; n++) {
        int saves = store.saves;
        eplb_alloc_fail_at(n, 0);
        eplb_status st = eplb_registry_commit_rebalance(reg, "m", id, true, 0, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            cr_assert_eq(res.placement.epoch, 1);
            eplb_rebalance_result_free(&res);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
        cr_assert_eq(store.saves, saves, "allocation %ld: stored anyway", n);
        eplb_model_view v = view();
        cr_assert_eq(v.snap->placement.epoch, 0, "allocation %ld: committed anyway", n);
        cr_assert_str_eq(v.pending_id, id);
        eplb_model_view_release(&v);
    }
    /* The next step's plan is built on demand: its failures are clean too. */
    for (long n = 1;; n++) {
        eplb_abort_result ab;
        eplb_alloc_fail_at(n, 0);
        eplb_status st = eplb_registry_abort_rebalance(reg, "m", id, 0, &ab, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            cr_assert_eq(ab.epoch, 1);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
    }
    eplb_model_view v = view();
    cr_assert_str_empty(v.pending_id);
    eplb_model_view_release(&v);
}

/* The least staging entries per rank a layer's move needs (0: it does not
 * change; UINT32_MAX: none up to max fits). */
static uint32_t staging_need(uint32_t p, uint32_t g, const int32_t *old_row, const int32_t *new_row, uint32_t max) {
    if (memcmp(old_row, new_row, p * sizeof *old_row) == 0)
        return 0;
    for (uint32_t k = 1; k <= max; k++) {
        eplb_transfer_plan t;
        if (eplb_transfer_build(1, p, g, g / 2, old_row, new_row, k, &t, NULL) == EPLB_OK) {
            eplb_transfer_plan_free(&t);
            return k;
        }
    }
    return UINT32_MAX;
}

/* In steps under a staging bound, a layer of a later step that cannot fit
 * refuses the Rebalance at once (nothing pending), not its step's
 * GetTransferPlan half-way through.  A model with 6 slots per rank (so
 * layers differ in the staging they need), and loads searched for one
 * whose first changed layer fits a bound a later one does not. */
Test(engine_rebalance, steps_under_a_staging_bound_check_every_layer_up_front) {
    enum { WL = 6, WN = 16, WP = 24, WG = 4, WS = WP / WG };
    eplb_handle wm = { .architecture = "WideMoE", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                       .moe = { .num_moe_layers = WL, .num_logical_experts = WN, .num_physical_experts = WP,
                                .num_local_physical_experts = WS, .num_redundant_experts = WP - WN,
                                .num_expert_groups = 4 } };
    eplb_register_request rr = { .model_name = "w", .model = &wm, .main_model_id = "",
                                 .parallel = { .enable_eplb = true, .ep_size = WG, .num_nodes = 2, .window_size = 4,
                                               .step_interval = 100 } };
    eplb_register_result rres;
    cr_assert_eq(eplb_registry_register(reg, &rr, &rres, NULL), EPLB_OK);
    eplb_model_view_release(&rres.view);
    eplb_placement before;
    cr_assert_eq(get_placement(reg, "w", &before, NULL, NULL), EPLB_OK);
    int64_t load[WL * WN];
    bool found = false;
    uint64_t rng = 34;
    for (int seed = 0; seed < 500 && !found; seed++) {
        for (int i = 0; i < WL * WN; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            load[i] = 1 + (int64_t)((rng >> 33) % 1000) * ((rng >> 20) % 4 == 0 ? 20 : 1);
        }
        eplb_rebalance_request req = { .model_id = "w", .logical_load = load, .logical_load_len = WL * WN,
                                       .slot_order = EPLB_SLOT_PRESERVE, .dry_run = true };
        eplb_rebalance_result res;
        cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
        uint32_t first = 0, worst = 0;
        for (int l = 0; l < WL; l++) {
            uint32_t need = staging_need(WP, WG, before.phy2log + l * WP, res.placement.phy2log + l * WP, WS + 1);
            if (need && !first)
                first = need;
            if (need > worst)
                worst = need;
        }
        eplb_rebalance_result_free(&res);
        if (!first || worst <= first || worst == UINT32_MAX)
            continue;
        found = true;
        req.dry_run = false;
        req.execution = EPLB_EXEC_ENGINE;
        req.layers_per_step = 1;
        req.knobs.expert_bytes = 1000;
        req.max_staging_bytes = 1000ull * first; /* the first step fits, a later one does not */
        eplb_error err;
        cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EPRECONDITION, "bound %u, worst %u",
                     first, worst);
        cr_assert(strstr(err.msg, "max_staging_bytes"), "%s", err.msg);
        eplb_model_view v;
        cr_assert_eq(eplb_registry_view(reg, "w", &v, NULL), EPLB_OK);
        cr_assert_str_empty(v.pending_id, "refused: nothing pending");
        cr_assert_eq(v.snap->placement.epoch, before.epoch);
        eplb_model_view_release(&v);
        /* With room for the worst layer it is accepted, and aborted clean. */
        req.max_staging_bytes = 1000ull * worst;
        cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
        cr_assert(res.pending);
        eplb_abort_result ab;
        cr_assert_eq(eplb_registry_abort_rebalance(reg, "w", res.rebalance_id, 0, &ab, &err), EPLB_OK, "%s", err.msg);
        eplb_rebalance_result_free(&res);
    }
    cr_assert(found, "no load in the search had a later layer needing more staging than the first");
    eplb_placement_free(&before);
}
