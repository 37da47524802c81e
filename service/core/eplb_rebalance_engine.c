/* eplb_rebalance_engine.c -- rebalances the engine's ranks execute
 * (RebalanceRequest.execution = EXECUTION_ENGINE): the pending state, its
 * transfer plan, CommitRebalance and AbortRebalance.
 *
 * eplbd is the planner and the source of truth; it moves no byte.  The
 * sequence (docs/architecture.md draws it):
 *
 *   Rebalance(ENGINE)   policy, gate -> target stored as the pending
 *                       rebalance (execution ENGINE) with the served
 *                       placement unchanged (one transaction); answer id
 *   GetTransferPlan     each rank its plan of the step awaiting commit
 *   (engine)            every rank runs its plan; the engine's barrier
 *   CommitRebalance     the step's rows become the served placement,
 *                       epoch + 1, and the pending record advances or is
 *                       cleared -- one transaction
 *   AbortRebalance      cleared; with bytes touched, NEEDS_RELOAD
 *
 * What is stored is always true: before the commit the served placement is
 * the old one, and the engine's bytes are the old ones or (once it started
 * writing) match no map -- which only the engine can know, and says with
 * AbortRebalance(bytes_touched > 0).  eplbd killed while pending: the
 * pending row is loaded again and the same plan is rebuilt (a function of
 * the served placement, the target and the stored bound), so commit and
 * abort work after a restart.
 *
 * Everything here runs under the model's op_lock.  Cost: the plan of a step
 * is built once per (pending id, served epoch) and kept in the entry (at
 * DeepSeek-V3 size, 58 x 288 slots on 32 ranks: ~1.4 MB of ops, built in
 * a few ms; bench/bench_transfer.c); GetTransferPlan copies one rank's part
 * out under the lock and encodes it without. */
#include <stdio.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_pending.h"
#include "eplb_registry_internal.h"

void registry_engine_plan_drop(registry_entry *e) {
    eplb_transfer_plan_free(&e->xfer);
    e->has_xfer = false;
    e->xfer_id[0] = '\0';
}

/* The step awaiting commit: the served placement with the next
 * layers_per_step changed layers taken from the target. */
static eplb_status next_step(const registry_entry *e, eplb_placement *step, uint32_t **layers, uint32_t *n,
                             eplb_error *err) {
    const eplb_pending_rebalance *p = &e->rec.pending;
    return eplb_pending_step(&registry_current(e)->placement, &p->target, p->layers_per_step, step, layers, n, err);
}

/* A plan refused for the request's staging bound: say that it is the
 * request's bound (not --max-staging-mib, which the chunker's advice is
 * for: eplbd's own moves). */
static void staging_refusal(const eplb_pending_rebalance *p, uint32_t entries, eplb_status st, eplb_error *err) {
    if (st != EPLB_EPRECONDITION || !p->max_staging_bytes || !err)
        return;
    char *advice = strstr(err->msg, ": raise --max-staging-mib");
    if (advice)
        *advice = '\0';
    char msg[EPLB_ERROR_MSG_MAX];
    snprintf(msg, sizeof msg, "max_staging_bytes %llu (%u experts of %llu bytes per rank): %s; raise "
             "max_staging_bytes", (unsigned long long)p->max_staging_bytes, entries,
             (unsigned long long)p->expert_bytes, err->msg);
    eplb_error_set(err, st, "%s", msg);
}

/* The cached plan of the step awaiting commit, built when missing. */
static eplb_status engine_plan(registry_entry *e, const eplb_transfer_plan **out, eplb_error *err) {
    const eplb_pending_rebalance *p = &e->rec.pending;
    const eplb_snapshot *cur = registry_current(e);
    if (e->has_xfer && strcmp(e->xfer_id, p->id) == 0 && e->xfer_epoch == cur->placement.epoch) {
        *out = &e->xfer;
        return EPLB_OK;
    }
    registry_engine_plan_drop(e);
    uint32_t entries = 0;
    eplb_status st = eplb_transfer_staging_entries(p->max_staging_bytes, p->expert_bytes, &entries, err);
    if (st != EPLB_OK)
        return st;
    eplb_placement step;
    uint32_t *layers = NULL, n = 0;
    if ((st = next_step(e, &step, &layers, &n, err)) != EPLB_OK)
        return st;
    const eplb_model_shape *s = &cur->shape;
    st = eplb_transfer_build(cur->placement.num_layers, cur->placement.num_physical, s->ep_size,
                             s->ep_size / s->num_nodes, cur->placement.phy2log, step.phy2log, entries, &e->xfer, err);
    eplb_placement_free(&step);
    eplb_free(layers);
    if (st != EPLB_OK) {
        staging_refusal(p, entries, st, err);
        return st;
    }
    e->has_xfer = true;
    snprintf(e->xfer_id, sizeof e->xfer_id, "%s", p->id);
    e->xfer_epoch = cur->placement.epoch;
    *out = &e->xfer;
    return EPLB_OK;
}

/* The answer of a pending engine step (Rebalance, ContinueRebalance):
 * served placement, nothing committed, the step's layers, the plan when
 * asked.  Caller holds op_lock; out's arrays are fresh. */
static eplb_status answer_pending(registry_entry *e, bool include_plan, eplb_rebalance_result *out,
                                  eplb_error *err) {
    const eplb_pending_rebalance *p = &e->rec.pending;
    const eplb_snapshot *cur = registry_current(e);
    const eplb_transfer_plan *plan;
    eplb_status st = engine_plan(e, &plan, err);
    if (st != EPLB_OK)
        return st;
    eplb_free(out->layers_moved);
    out->layers_moved = eplb_malloc(((size_t)plan->num_layers + 1) * sizeof *out->layers_moved);
    if (!out->layers_moved)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    memcpy(out->layers_moved, plan->layers, (size_t)plan->num_layers * sizeof *out->layers_moved);
    out->num_layers_moved = plan->num_layers;
    eplb_placement_free(&out->placement);
    if ((st = eplb_placement_copy(&out->placement, &cur->placement, err)) != EPLB_OK)
        return st;
    if (include_plan) {
        if ((st = eplb_transfer_plan_copy(plan, EPLB_TRANSFER_ALL_RANKS, &out->plan, err)) != EPLB_OK)
            return st;
        out->has_plan = true;
    }
    snprintf(out->rebalance_id, sizeof out->rebalance_id, "%s", p->id);
    out->execution = EPLB_EXEC_ENGINE;
    out->committed = false;
    out->pending = true;
    out->layers_done = p->layers_done;
    out->plan_base_epoch = cur->placement.epoch;
    out->expert_bytes = p->expert_bytes;
    if (!out->balancedness_before && !out->balancedness_after) {
        out->balancedness_before = p->balancedness_before;
        out->balancedness_after = p->balancedness_after;
    }
    return EPLB_OK;
}

/* Store e's record as it is now (placement, state) with `pending` as its
 * pending rebalance.  The window goes with it when dirty. */
static eplb_status save_pending(eplb_registry *r, registry_entry *e, const eplb_pending_rebalance *pending,
                                eplb_move_state st_to, const char *reason, eplb_error *err) {
    const eplb_snapshot *cur = registry_current(e);
    eplb_model_record rec = registry_record(e, &cur->placement, &cur->shape, st_to, reason);
    if (pending)
        rec.pending = *pending;
    else
        memset(&rec.pending, 0, sizeof rec.pending);
    eplb_status st = registry_save(r, &rec, err);
    if (st == EPLB_OK && r->store)
        e->rec.window.dirty = false;
    return st;
}

eplb_status registry_engine_start(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                  uint32_t layers_per_step, const registry_engine_exec *x,
                                  eplb_rebalance_result *out, eplb_error *err) {
    eplb_pending_rebalance *p = &e->rec.pending;
    const uint32_t L = next->num_layers;
    eplb_pending_clear(p);
    eplb_pending_new_id(p->id);
    p->layers_per_step = layers_per_step && layers_per_step < L ? layers_per_step : L;
    p->with_weights = false; /* eplbd moves nothing: attached weights are not needed */
    p->execution = EPLB_EXEC_ENGINE;
    p->max_staging_bytes = x->max_staging_bytes;
    p->expert_bytes = x->expert_bytes;
    p->balancedness_before = out->balancedness_before;
    p->balancedness_after = out->balancedness_after;
    p->target = *next; /* owned by the record now */
    memset(next, 0, sizeof *next);
    p->layers_done = eplb_pending_layers_done(&registry_current(e)->placement, &p->target);
    /* The plan first: one that cannot be built refuses before anything is
     * stored.  In steps under a staging bound, every later step's layers
     * must fit too, or the engine would find out half-way: each layer
     * moves from its served row to its target whatever the step, so one
     * plan of the whole move checks them all (one more build, ~1-2 ms at
     * DeepSeek-V3 size; only here). */
    eplb_status st = EPLB_OK;
    const uint32_t changed = L - p->layers_done;
    if (p->max_staging_bytes && p->layers_per_step < changed) {
        uint32_t entries = 0;
        st = eplb_transfer_staging_entries(p->max_staging_bytes, p->expert_bytes, &entries, err);
        if (st == EPLB_OK) {
            const eplb_snapshot *cur = registry_current(e);
            const eplb_model_shape *s = &cur->shape;
            eplb_transfer_plan whole;
            st = eplb_transfer_build(L, cur->placement.num_physical, s->ep_size, s->ep_size / s->num_nodes,
                                     cur->placement.phy2log, p->target.phy2log, entries, &whole, err);
            if (st == EPLB_OK)
                eplb_transfer_plan_free(&whole);
            staging_refusal(p, entries, st, err);
        }
    }
    if (st == EPLB_OK)
        st = answer_pending(e, x->include_plan, out, err);
    if (st == EPLB_OK)
        st = save_pending(r, e, p, e->rec.state, e->rec.state_reason, err);
    if (st != EPLB_OK) {
        eplb_pending_clear(p);
        registry_engine_plan_drop(e);
        eplb_transfer_plan_free(&out->plan);
        out->has_plan = false;
        out->pending = false;
        return st;
    }
    registry_publish_pending(e);
    return EPLB_OK;
}

static eplb_status check_loaded(const registry_entry *e, eplb_error *err) {
    if (e->rec.state == EPLB_MOVE_NEEDS_RELOAD)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "model %s needs a weight reload (%s); reload the weights and register it again",
                              e->model_id, e->rec.state_reason);
    return EPLB_OK;
}

/* e's pending rebalance is rebalance_id and the engine executes it.  A
 * mismatch is `mismatch` (NOT_FOUND for lookups, ABORTED for commit and
 * abort: the caller's view of the model is stale). */
static eplb_status check_engine_pending(const registry_entry *e, const char *rebalance_id, eplb_status mismatch,
                                        eplb_error *err) {
    const eplb_pending_rebalance *p = &e->rec.pending;
    if (!p->id[0])
        return eplb_error_set(err, mismatch,
                              "model %s has no rebalance %s pending (it was committed or aborted, or never started)",
                              e->model_id, rebalance_id);
    if (strcmp(p->id, rebalance_id) != 0)
        return eplb_error_set(err, mismatch, "model %s has no rebalance %s pending (the pending one is %s)",
                              e->model_id, rebalance_id, p->id);
    if (p->execution != EPLB_EXEC_ENGINE)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "rebalance %s of model %s is executed by eplbd (layers_per_step): continue it with "
                              "ContinueRebalance", p->id, e->model_id);
    return EPLB_OK;
}

eplb_status registry_engine_continue(registry_entry *e, const char *rebalance_id, bool include_plan,
                                     eplb_rebalance_result *out, eplb_error *err) {
    eplb_status st = check_engine_pending(e, rebalance_id, EPLB_ENOTFOUND, err);
    if (st == EPLB_OK)
        st = answer_pending(e, include_plan, out, err);
    return st;
}

eplb_status eplb_registry_get_transfer_plan(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                            uint32_t rank, eplb_transfer_answer *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    const eplb_snapshot *cur = registry_current(e);
    const eplb_transfer_plan *plan;
    if ((st = check_engine_pending(e, rebalance_id, EPLB_ENOTFOUND, err)) != EPLB_OK)
        goto out;
    if (rank != EPLB_TRANSFER_ALL_RANKS && rank >= cur->shape.ep_size) {
        st = eplb_error_set(err, EPLB_EINVAL, "rank %u: model %s has %u EP ranks (0..%u)", rank, e->model_id,
                            cur->shape.ep_size, cur->shape.ep_size - 1);
        goto out;
    }
    if ((st = engine_plan(e, &plan, err)) != EPLB_OK ||
        (st = eplb_transfer_plan_copy(plan, rank, &out->plan, err)) != EPLB_OK)
        goto out;
    snprintf(out->rebalance_id, sizeof out->rebalance_id, "%s", e->rec.pending.id);
    out->base_epoch = cur->placement.epoch;
    out->expert_bytes = e->rec.pending.expert_bytes;
out:
    registry_release(e);
    return st;
}

eplb_status eplb_registry_commit_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                           bool has_base_epoch, uint64_t base_epoch, eplb_rebalance_result *out,
                                           eplb_error *err) {
    memset(out, 0, sizeof *out);
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    eplb_pending_rebalance *p = &e->rec.pending;
    const eplb_placement *cur = &registry_current(e)->placement;
    const uint32_t L = cur->num_layers, P = cur->num_physical;
    eplb_placement step = { 0 };
    if ((st = check_loaded(e, err)) != EPLB_OK || (st = check_engine_pending(e, rebalance_id, EPLB_EABORTED, err)) != EPLB_OK)
        goto out;
    if (has_base_epoch && base_epoch != cur->epoch) {
        st = eplb_error_set(err, EPLB_EABORTED,
                            "model %s is at epoch %llu; the plan committed started from epoch %llu (a retried "
                            "commit?): nothing changed",
                            e->model_id, (unsigned long long)cur->epoch, (unsigned long long)base_epoch);
        goto out;
    }
    if ((st = next_step(e, &step, &out->layers_moved, &out->num_layers_moved, err)) != EPLB_OK)
        goto out;
    uint64_t moved = 0;
    for (size_t i = 0; i < (size_t)L * P; i++)
        moved += step.phy2log[i] != cur->phy2log[i];
    out->experts_moved = moved;
    out->plan_base_epoch = cur->epoch;
    snprintf(out->rebalance_id, sizeof out->rebalance_id, "%s", p->id);
    out->balancedness_before = p->balancedness_before;
    out->balancedness_after = p->balancedness_after;
    out->expert_bytes = p->expert_bytes;
    out->execution = EPLB_EXEC_ENGINE;
    /* The answer is copied first: once committed, the call must not fail. */
    if ((st = eplb_placement_copy(&out->placement, &step, err)) != EPLB_OK)
        goto out;
    /* registry_record derives the stored pending record from the committed
     * rows: advanced to the next step, or gone after the last one. */
    if ((st = registry_commit_locked(r, e, &step, &registry_current(e)->shape, err)) != EPLB_OK) {
        eplb_placement_free(&out->placement);
        goto out;
    }
    registry_engine_plan_drop(e);
    if ((p->layers_done = eplb_pending_layers_done(&registry_current(e)->placement, &p->target)) == L)
        eplb_pending_clear(p);
    registry_publish_pending(e);
    out->committed = true;
    out->placement.epoch = registry_current(e)->placement.epoch;
    out->pending = p->id[0] != '\0';
    out->layers_done = out->pending ? p->layers_done : L;
    registry_stats_rebalance(e, true, out, 0);
out:
    eplb_placement_free(&step);
    registry_release(e);
    if (st != EPLB_OK)
        eplb_rebalance_result_free(out);
    return st;
}

eplb_status eplb_registry_abort_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                          uint64_t bytes_touched, eplb_abort_result *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    if ((st = check_loaded(e, err)) != EPLB_OK || (st = check_engine_pending(e, rebalance_id, EPLB_EABORTED, err)) != EPLB_OK)
        goto out;
    if (!bytes_touched) {
        /* Nothing written: the served placement is still what the bytes
         * hold.  The pending record goes, in the store first. */
        if ((st = save_pending(r, e, NULL, e->rec.state, e->rec.state_reason, err)) != EPLB_OK)
            goto out;
    } else {
        /* Some rank wrote live slots: the bytes match no map.  Stored
         * before the answer; published even when the store refuses (the
         * bytes are what they are), as a failed server move does -- a
         * refused save leaves the pending row, so after a restart the
         * model would show the rebalance pending again, and the message
         * says so. */
        char reason[EPLB_ERROR_MSG_MAX];
        snprintf(reason, sizeof reason,
                 "AbortRebalance(%s) after the engine wrote %llu bytes of live slots: the weights match no map",
                 rebalance_id, (unsigned long long)bytes_touched);
        eplb_error serr;
        eplb_error_clear(&serr);
        eplb_status sst = save_pending(r, e, NULL, EPLB_MOVE_NEEDS_RELOAD, reason, &serr);
        registry_publish_state(e, EPLB_MOVE_NEEDS_RELOAD, reason);
        if (sst != EPLB_OK) {
            st = eplb_error_set(err, sst,
                                "model %s is NEEDS_RELOAD (%s), but the store refused to record it: %s; a restart "
                                "before the model is registered again would show the rebalance pending",
                                e->model_id, reason, serr.msg);
        }
    }
    eplb_pending_clear(&e->rec.pending);
    registry_engine_plan_drop(e);
    registry_publish_pending(e);
    out->epoch = registry_current(e)->placement.epoch;
    out->state = e->rec.state;
out:
    registry_release(e);
    return st;
}
