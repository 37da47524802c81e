/* eplb_rebalance.c -- the placement engine's operations on a registered
 * model: SetupFromMapping, Rebalance and RecordLoad.
 *
 * Each runs under the model's mutex (so operations on one model serialise
 * and epochs strictly increase) and follows the same order:
 *   1. validate everything against the current state  -- errors change nothing
 *   2. compute the next placement into fresh arrays
 *   3. commit: store first, then memory (registry_commit_locked)
 * A dry run stops after 2. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_alloc.h"
#include "eplb_plan.h"
#include "eplb_policy.h"
#include "eplb_move.h"
#include "eplb_pending.h"
#include "eplb_registry_internal.h"

static eplb_status check_epoch(const registry_entry *e, bool has_expected, uint64_t expected,
                               eplb_error *err) {
    if (has_expected && expected != registry_current(e)->placement.epoch)
        return eplb_error_set(err, EPLB_EABORTED,
                              "model %s is at epoch %llu, the request expected epoch %llu",
                              e->model_id, (unsigned long long)registry_current(e)->placement.epoch,
                              (unsigned long long)expected);
    return EPLB_OK;
}

static eplb_status check_loaded(const registry_entry *e, eplb_error *err) {
    if (e->rec.state == EPLB_MOVE_NEEDS_RELOAD)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "model %s needs a weight reload (%s); reload the weights and register it again",
                              e->model_id, e->rec.state_reason);
    return EPLB_OK;
}

/* A topology other than the registered one (a what-if) is dry-run only: a
 * commit would give the engine a placement for GPUs it does not have.
 * EPLB_EPRECONDITION naming the fields. */
static eplb_status check_registered_topology(const registry_entry *e, const eplb_rebalance_request *req,
                                             eplb_error *err) {
    const eplb_model_shape *s = &registry_current(e)->shape;
    char what[256] = "";
    size_t n = 0;
    if (req->num_gpus && req->num_gpus != s->ep_size)
        n += (size_t)snprintf(what + n, sizeof what - n, "%snum_gpus %u (registered ep_size %u)", n ? ", " : "",
                              req->num_gpus, s->ep_size);
    if (req->num_nodes && req->num_nodes != s->num_nodes && n < sizeof what)
        n += (size_t)snprintf(what + n, sizeof what - n, "%snum_nodes %u (registered %u)", n ? ", " : "",
                              req->num_nodes, s->num_nodes);
    if (req->num_groups && req->num_groups != s->num_groups && n < sizeof what)
        n += (size_t)snprintf(what + n, sizeof what - n, "%snum_groups %u (registered %u)", n ? ", " : "",
                              req->num_groups, s->num_groups);
    if (!what[0])
        return EPLB_OK;
    return eplb_error_set(err, EPLB_EPRECONDITION,
                          "model %s: %s differ from its registration: a different topology is dry-run only "
                          "(set dry_run, or change the registration with SetupFromMapping)",
                          e->model_id, what);
}

static eplb_status check_gate(const eplb_rebalance_request *req, eplb_error *err) {
    return eplb_rebalance_knobs_check(&req->knobs, "", err);
}

/* A request's knobs over the model's defaults: target, link costs and the
 * expert size fall back to the registration's; policy, budgets and the
 * gate are the request's own (0 = DEEPSEEK, no budget, any gain). */
static eplb_rebalance_knobs merged_knobs(const registry_entry *e, const eplb_rebalance_knobs *k) {
    const eplb_rebalance_knobs *d = &registry_current(e)->shape.defaults;
    eplb_rebalance_knobs m = *k;
    if (!m.target_balancedness)
        m.target_balancedness = d->target_balancedness;
    if (!m.cost_intra_node)
        m.cost_intra_node = d->cost_intra_node;
    if (!m.cost_cross_node)
        m.cost_cross_node = d->cost_cross_node;
    if (!m.expert_bytes)
        m.expert_bytes = d->expert_bytes;
    return m;
}

/* A stepped rebalance in progress refuses what would change the placement
 * under it (EPLB_EABORTED). */
static eplb_status check_not_pending(const registry_entry *e, const char *what, eplb_error *err) {
    const eplb_pending_rebalance *p = &e->rec.pending;
    if (!p->id[0])
        return EPLB_OK;
    if (p->execution == EPLB_EXEC_ENGINE)
        return eplb_error_set(err, EPLB_EABORTED,
                              "model %s has an engine-executed rebalance pending (rebalance_id %s, %u of %u layers "
                              "done): CommitRebalance or AbortRebalance it before %s",
                              e->model_id, p->id, p->layers_done, p->target.num_layers, what);
    return eplb_error_set(err, EPLB_EABORTED,
                          "model %s has a stepped rebalance in progress (rebalance_id %s, %u of %u layers done): "
                          "finish it with ContinueRebalance before %s",
                          e->model_id, p->id, p->layers_done, p->target.num_layers, what);
}

/* The logical load ([L][N], out) of a request's physical load ([L][P]) under
 * e's current map, refusing a wrong length or a bad entry. */
static eplb_status request_logical_load(const registry_entry *e, const int64_t *physical_load, size_t len,
                                        int64_t *logical, eplb_error *err) {
    const eplb_placement *cur = &registry_current(e)->placement;
    if (len != (size_t)cur->num_layers * cur->num_physical)
        return eplb_error_set(err, EPLB_EINVAL,
                              "physical_load has %zu entries, want num_layers %u x num_physical_experts %u", len,
                              cur->num_layers, cur->num_physical);
    return eplb_load_to_logical(cur->num_layers, cur->num_logical, cur->num_physical, cur->num_valid_physical,
                                cur->phy2log, physical_load, logical, err);
}

/* ---- SetupFromMapping ---------------------------------------------------- */

eplb_status eplb_registry_setup_from_mapping(eplb_registry *r, const eplb_setup_request *req,
                                             eplb_placement *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    /* The handle first: it needs no lock (the seed's second call site). */
    const eplb_moe_spec *spec = NULL;
    if (req->model) {
        eplb_resolved res;
        eplb_status st = eplb_handle_resolve(req->model, "model", &res, err);
        if (st != EPLB_OK)
            return st;
        if (!res.moe)
            return eplb_error_set(err, EPLB_EPRECONDITION, "model handle has no MoE model to set up: %s",
                                  res.reason);
        spec = &res.moe->moe;
    }

    registry_entry *e;
    eplb_status st = registry_acquire(r, req->model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    const eplb_model_shape *shape = &registry_current(e)->shape;
    const eplb_placement *cur = &registry_current(e)->placement;
    eplb_placement next = { 0 };
    eplb_model_shape next_shape = *shape;

    if (spec && (spec->num_moe_layers != shape->num_layers || spec->num_logical_experts != shape->num_logical)) {
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "model handle resolves to %u layers x %u logical experts; model %s has %u x %u",
                            spec->num_moe_layers, spec->num_logical_experts, e->model_id,
                            shape->num_layers, shape->num_logical);
        goto out;
    }
    if ((st = check_loaded(e, err)) != EPLB_OK || (st = check_not_pending(e, "SetupFromMapping", err)) != EPLB_OK ||
        (st = check_epoch(e, req->has_expected_epoch, req->expected_epoch, err)) != EPLB_OK)
        goto out;
    if (req->num_physical < shape->num_logical || req->num_physical > r->limits.max_physical_experts) {
        st = eplb_error_set(err, EPLB_EINVAL,
                            "num_physical_experts %u must be in [num_logical_experts %u, server limit %u]",
                            req->num_physical, shape->num_logical, r->limits.max_physical_experts);
        goto out;
    }
    if (req->old_num_physical != cur->num_physical) {
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "old_num_physical_experts %u does not match model %s's %u physical experts",
                            req->old_num_physical, e->model_id, cur->num_physical);
        goto out;
    }
    if ((uint64_t)req->expanded_len != (uint64_t)shape->num_layers * req->num_physical) {
        st = eplb_error_set(err, EPLB_EINVAL,
                            "expanded_physical_to_logical has %zu entries, want num_layers %u x num_physical_experts %u",
                            req->expanded_len, shape->num_layers, req->num_physical);
        goto out;
    }
    if (req->ep_size == 0 || req->ep_size > r->limits.max_ep_size || req->num_physical % req->ep_size != 0 ||
        req->ep_size % shape->num_nodes != 0) {
        st = eplb_error_set(err, EPLB_EINVAL,
                            "ep_size %u must be >= 1, at most %u, divide num_physical_experts %u and be a multiple "
                            "of num_nodes %u",
                            req->ep_size, r->limits.max_ep_size, req->num_physical, shape->num_nodes);
        goto out;
    }
    next = (eplb_placement){ .num_layers = cur->num_layers, .num_logical = cur->num_logical, .epoch = cur->epoch };
    uint32_t valid = req->old_num_physical < req->num_physical ? req->old_num_physical : req->num_physical;
    st = eplb_placement_assign(&next, req->num_physical, valid, req->expanded_phy2log, err);
    if (st != EPLB_OK) {
        /* Name the request field: the placement's message names the entry. */
        if (st == EPLB_EINVAL && err && strncmp(err->msg, "physical_to_logical", 19) == 0) {
            char msg[EPLB_ERROR_MSG_MAX];
            snprintf(msg, sizeof msg, "expanded_%s", err->msg);
            eplb_error_set(err, st, "%s", msg);
        }
        goto out;
    }
    next_shape.num_physical = req->num_physical;
    next_shape.ep_size = req->ep_size;
    next_shape.num_local = req->num_physical / req->ep_size;
    next_shape.num_redundant = req->num_physical - shape->num_logical;
    /* The same bound as at registration: a placement that could not be
     * sent must not be committed (every later GetPlacement would fail). */
    if (r->limits.max_response_bytes && eplb_model_response_bytes(&next_shape) > r->limits.max_response_bytes) {
        st = eplb_error_set(err, EPLB_EINVAL,
                            "num_physical_experts %u: a placement of %u layers x %u slots takes up to %llu bytes on "
                            "the wire, over the server's largest response of %llu bytes (--max-message-bytes)",
                            req->num_physical, shape->num_layers, req->num_physical,
                            (unsigned long long)eplb_model_response_bytes(&next_shape),
                            (unsigned long long)r->limits.max_response_bytes);
        goto out;
    }
    bool relayout = shape->num_physical != req->num_physical || shape->ep_size != req->ep_size;
    if ((st = eplb_placement_copy(out, &next, err)) != EPLB_OK)
        goto out;
    if ((st = registry_commit_locked(r, e, &next, &next_shape, err)) != EPLB_OK) {
        eplb_placement_free(out);
        goto out;
    }
    out->epoch = registry_current(e)->placement.epoch;
    /* The engine re-lays its buffers out for the new ranks: weights
     * attached for the old layout must not be moved; it attaches again. */
    if (relayout)
        registry_close_weights(e);
out:
    eplb_placement_free(&next);
    registry_release(e);
    return st;
}

/* ---- Rebalance ------------------------------------------------------------ */

void eplb_rebalance_result_free(eplb_rebalance_result *res) {
    eplb_placement_free(&res->placement);
    eplb_transfer_plan_free(&res->plan);
    eplb_free(res->layer_before);
    eplb_free(res->layer_after);
    eplb_free(res->layers_moved);
    memset(res, 0, sizeof *res);
}

/* A request's wait event (the engine's IPC event handle): checked before
 * anything is computed, so a refusal changes nothing.  It is only usable by
 * weights whose backend orders with device events (eplb_weights_ops.begin);
 * without weights nothing of ours runs on the engine's GPUs to order. */
static eplb_status check_wait_event(const registry_entry *e, const uint8_t *ev, size_t len, eplb_error *err) {
    if (!len)
        return EPLB_OK;
    if (len != EPLB_EVENT_BYTES || !ev)
        return eplb_error_set(err, EPLB_EINVAL, "wait_event is %zu bytes, want %d (an IPC event handle)", len,
                              EPLB_EVENT_BYTES);
    if (!e->weights || !e->weights->begin)
        return eplb_error_set(err, EPLB_EINVAL,
                              "wait_event: events need a device backend (model %s has %s); synchronize the engine "
                              "before the call instead", e->model_id,
                              e->weights ? "shm weights, moved by the cpu backend" : "no weights attached");
    return EPLB_OK;
}

/* Commit next (ownership taken) as e's placement: with weights attached,
 * move the bytes first (eplb_move.c, the copy streams waiting on wait_event
 * when given); fills the result's byte counts and done event. */
static eplb_status commit_placement(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                    const uint8_t *wait_event, size_t wait_event_len, eplb_rebalance_result *out,
                                    eplb_error *err) {
    if (e->weights) {
        eplb_move m = { .r = r, .e = e, .next = next, .wait_event = wait_event, .wait_event_len = wait_event_len };
        eplb_status st = eplb_move_run(&m, err);
        out->bytes_moved = m.bytes_moved;
        out->bytes_cross_gpu = m.bytes_cross_gpu;
        out->bytes_staged = m.bytes_staged;
        out->move_ms = m.move_ms;
        out->has_done_event = st == EPLB_OK && m.has_done_event;
        if (out->has_done_event)
            memcpy(out->done_event, m.done_event, sizeof out->done_event);
        return st;
    }
    return registry_commit_locked(r, e, next, &registry_current(e)->shape, err);
}

/* After a step's commit attempt: what the pending rebalance is now.  A
 * model that needs a reload has none; otherwise layers_done is what the
 * served rows say (a failed move may have committed fewer layers than
 * planned), and the rebalance ends once every layer holds its target. */
static void pending_settle(registry_entry *e) {
    eplb_pending_rebalance *p = &e->rec.pending;
    if (p->id[0]) {
        if (e->rec.state == EPLB_MOVE_NEEDS_RELOAD)
            eplb_pending_clear(p);
        else if ((p->layers_done = eplb_pending_layers_done(&registry_current(e)->placement, &p->target)) ==
                 p->target.num_layers)
            eplb_pending_clear(p);
    }
    registry_publish_pending(e);
}

/* One step of e's pending rebalance: the next layers_per_step changed
 * layers of its target, committed.  Before the commit the pending record
 * says what the stored row will hold after it (cleared at the last step),
 * so the step and the record are one transaction.  Fills out (placement,
 * progress, bytes).  Caller holds op_lock. */
static eplb_status pending_run_step(eplb_registry *r, registry_entry *e, const uint8_t *wait_event,
                                    size_t wait_event_len, eplb_rebalance_result *out, eplb_error *err) {
    eplb_pending_rebalance *p = &e->rec.pending;
    const eplb_placement *cur = &registry_current(e)->placement;
    const uint32_t L = cur->num_layers, P = cur->num_physical;
    eplb_placement step;
    eplb_status st = eplb_pending_step(cur, &p->target, p->layers_per_step, &step, &out->layers_moved,
                                       &out->num_layers_moved, err);
    if (st != EPLB_OK)
        return st;
    snprintf(out->rebalance_id, sizeof out->rebalance_id, "%s", p->id);
    out->balancedness_before = p->balancedness_before;
    out->balancedness_after = p->balancedness_after;
    uint64_t moved = 0;
    for (size_t i = 0; i < (size_t)L * P; i++)
        moved += step.phy2log[i] != cur->phy2log[i];
    out->experts_moved = moved;
    /* The answer is copied first: once committed, the call must not fail. */
    if ((st = eplb_placement_copy(&out->placement, &step, err)) != EPLB_OK) {
        eplb_placement_free(&step);
        return st;
    }
    /* The stored row's pending record follows the placement it stores
     * (registry_record): gone once every layer holds the target. */
    st = commit_placement(r, e, &step, wait_event, wait_event_len, out, err);
    pending_settle(e);
    if (st == EPLB_OK) {
        out->committed = true;
        out->placement.epoch = registry_current(e)->placement.epoch;
    } else {
        eplb_placement_free(&out->placement);
    }
    out->pending = p->id[0] != '\0';
    /* Finished: every layer holds the target; gone for a reload: none. */
    out->layers_done = out->pending ? p->layers_done : st == EPLB_OK ? L : 0;
    return st;
}

static double elapsed_ms(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Compute (and unless dry_run, commit) a rebalance of e from logical_load
 * ([L][N]).  Caller holds e's lock and has checked epoch and reload. */
/* The commit gate (RebalanceRequest.min_improvement / force).  Automatic
 * rebalances use the default: never worse. */
typedef struct rebalance_gate {
    double min_improvement;
    bool force;
} rebalance_gate;

/* Balancedness is a ratio in (0, 1]: gains below this are rounding. */
#define GATE_EPSILON 1e-12

static eplb_status rebalance_locked(eplb_registry *r, registry_entry *e, const int64_t *logical_load,
                                    const eplb_policy_shape *ps, eplb_slot_order order,
                                    const eplb_rebalance_knobs *knobs, bool dry_run, bool without_log2phy,
                                    uint32_t layers_per_step, const uint8_t *wait_event, size_t wait_event_len,
                                    const rebalance_gate *gate, const registry_engine_exec *engine,
                                    eplb_rebalance_result *out, eplb_error *err) {
    bool gated = false, engine_started = false;
    const eplb_placement *cur = &registry_current(e)->placement;
    uint32_t L = cur->num_layers, N = cur->num_logical, P = cur->num_physical;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    int32_t *phy2log = eplb_malloc((size_t)L * P * sizeof *phy2log);
    int32_t *logcnt = eplb_malloc((size_t)L * N * sizeof *logcnt);
    out->layer_before = eplb_malloc(L * sizeof(double));
    out->layer_after = eplb_malloc(L * sizeof(double));
    eplb_status st = EPLB_OK;
    if (!phy2log || !logcnt || !out->layer_before || !out->layer_after) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for a %ux%u rebalance", L, P);
        goto out;
    }
    eplb_next_request nreq = { .shape = *ps, .order = order, .cur_phy2log = cur->phy2log,
                               .cur_logcnt = cur->logcnt, .logical_load = logical_load, .knobs = *knobs };
    if ((st = eplb_next_placement(&nreq, phy2log, logcnt, out->layer_before, out->layer_after, &out->next, err)) !=
        EPLB_OK)
        goto out;
    out->balancedness_before = out->next.balancedness_before;
    out->balancedness_after = out->next.balancedness_after;
    out->experts_moved = out->next.slots_moved;
    out->expert_bytes = knobs->expert_bytes;
    if (out->next.reason[0])
        snprintf(out->reason, sizeof out->reason, "%s", out->next.reason);

    if (dry_run) {
        /* A dry run answers with the policy's own maps: they are valid by
         * construction (eplb_next.h; tests/core/test_incremental.c checks
         * it), so assign's validation and copy are skipped, and log2phy,
         * the largest map, is built only when the caller wants it.  About
         * 1.3M of a DeepSeek-V3 dry-run call's 4.7M instructions outside
         * the policy (bench_rpc, callgrind). */
        uint32_t x = 1;
        for (size_t i = 0; i < (size_t)L * N; i++)
            x = (uint32_t)logcnt[i] > x ? (uint32_t)logcnt[i] : x;
        if ((uint64_t)L * N * x <= EPLB_PLACEMENT_MAX_LOG2PHY) { /* else assign's refusal below */
            int32_t *l2p = NULL;
            if (!without_log2phy) {
                if (!(l2p = eplb_malloc((size_t)L * N * x * sizeof *l2p))) {
                    st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for a %ux%u rebalance", L, P);
                    goto out;
                }
                eplb_placement_rebuild(L, N, P, x, phy2log, logcnt, l2p);
            }
            out->placement = (eplb_placement){ .num_layers = L, .num_logical = N, .num_physical = P,
                                               .num_valid_physical = P, .max_replicas = x, .epoch = cur->epoch,
                                               .phy2log = phy2log, .logcnt = logcnt, .log2phy = l2p };
            phy2log = NULL; /* owned by the answer */
            logcnt = NULL;
            out->compute_ms = elapsed_ms(&t0);
            goto out;
        }
    }

    /* An empty shell of the model's shape: assign allocates and fills it.
     * Every slot is filled now, so load counts over all of them again. */
    eplb_placement next = { .num_layers = L, .num_logical = N, .epoch = cur->epoch };
    st = eplb_placement_assign(&next, P, P, phy2log, err);
    out->compute_ms = elapsed_ms(&t0);
    if (st != EPLB_OK) {
        eplb_placement_free(&next);
        goto out;
    }
    if (dry_run) {
        out->placement = next;
        goto out;
    }
    {
        /* A rebalance that does not pay is not committed: answered like a
         * dry run, with the reason. */
        double gain = out->balancedness_after - out->balancedness_before;
        double want = gate ? gate->min_improvement : 0;
        bool force = gate && gate->force;
        if (!force && gain < -GATE_EPSILON)
            snprintf(out->reason, sizeof out->reason,
                     "not committed: balancedness would get worse (%.6f -> %.6f); set force to commit anyway",
                     out->balancedness_before, out->balancedness_after);
        else if (!force && want > 0 && gain < want - GATE_EPSILON)
            snprintf(out->reason, sizeof out->reason,
                     "not committed: the balancedness gain %.6f (%.6f -> %.6f) is below min_improvement %.6f", gain,
                     out->balancedness_before, out->balancedness_after, want);
        if (!force && (gain < -GATE_EPSILON || (want > 0 && gain < want - GATE_EPSILON))) {
            gated = true;
            out->placement = next;
            goto out;
        }
    }
    const uint64_t epoch0 = cur->epoch; /* cur goes stale once a commit lands */
    const uint32_t changed_layers = L - eplb_pending_layers_done(cur, &next);
    out->execution = engine ? EPLB_EXEC_ENGINE : EPLB_EXEC_SERVER;
    if (engine && changed_layers) {
        /* The engine moves the bytes: the target becomes the model's
         * pending rebalance, nothing is committed until CommitRebalance.
         * (No changed layer: nothing to execute, committed below.) */
        st = registry_engine_start(r, e, &next, layers_per_step, engine, out, err);
        engine_started = st == EPLB_OK;
        eplb_placement_free(&next);
        goto out;
    }
    if (layers_per_step && changed_layers > layers_per_step) {
        /* In steps: the target becomes the model's pending rebalance and
         * its first step runs now. */
        eplb_pending_rebalance *p = &e->rec.pending;
        eplb_pending_clear(p);
        eplb_pending_new_id(p->id);
        p->layers_per_step = layers_per_step;
        p->with_weights = e->weights != NULL;
        p->balancedness_before = out->balancedness_before;
        p->balancedness_after = out->balancedness_after;
        p->target = next; /* owned by the record now */
        st = pending_run_step(r, e, wait_event, wait_event_len, out, err);
        if (st != EPLB_OK && registry_current(e)->placement.epoch == epoch0 && e->rec.pending.id[0]) {
            /* Nothing committed, so nothing stored it: no rebalance to continue. */
            eplb_pending_clear(p);
            registry_publish_pending(e);
            out->pending = false;
            out->layers_done = 0;
        }
        goto out;
    }
    eplb_pending_new_id(out->rebalance_id);
    out->layers_moved = eplb_malloc((changed_layers ? changed_layers : 1) * sizeof *out->layers_moved);
    if (!out->layers_moved) {
        eplb_placement_free(&next);
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        goto out;
    }
    for (uint32_t l = 0; l < L; l++)
        if (memcmp(cur->phy2log + (size_t)l * P, next.phy2log + (size_t)l * P, (size_t)P * sizeof *phy2log) != 0)
            out->layers_moved[out->num_layers_moved++] = l;
    /* The answer is copied first: once committed, the call must not fail. */
    if ((st = eplb_placement_copy(&out->placement, &next, err)) != EPLB_OK) {
        eplb_placement_free(&next);
        goto out;
    }
    st = commit_placement(r, e, &next, wait_event, wait_event_len, out, err);
    if (st != EPLB_OK) {
        eplb_placement_free(&out->placement);
        goto out;
    }
    out->committed = true;
    out->layers_done = L;
    out->placement.epoch = registry_current(e)->placement.epoch;
out:
    /* Every computed, non-dry-run rebalance is counted (the metrics): a
     * failure anywhere after validation, including an allocation, is a
     * failed rebalance; bytes a failed move already copied still count. */
    /* An engine-executed one counts when it is committed (CommitRebalance). */
    if (!dry_run && !gated && !engine_started)
        registry_stats_rebalance(e, st == EPLB_OK, out, out->bytes_moved);
    eplb_free(phy2log);
    eplb_free(logcnt);
    return st;
}

static eplb_policy_shape policy_shape(const registry_entry *e, uint32_t groups, uint32_t nodes, uint32_t gpus) {
    const eplb_model_shape *s = &registry_current(e)->shape;
    return (eplb_policy_shape){
        .num_layers = registry_current(e)->placement.num_layers,
        .num_logical = registry_current(e)->placement.num_logical,
        .num_physical = registry_current(e)->placement.num_physical,
        .num_groups = groups ? groups : s->num_groups,
        .num_nodes = nodes ? nodes : s->num_nodes,
        .num_gpus = gpus ? gpus : s->ep_size,
    };
}

/* The policy's preconditions, plus the server's limits on what a request
 * may ask for: its cost grows with num_gpus (and, for MIN_TRAFFIC, with the
 * cube of the GPUs per node), and the model's lock is held meanwhile. */
#define MIN_TRAFFIC_MAX_GPUS_PER_NODE 256u
static eplb_status check_topology(const eplb_registry *r, const eplb_policy_shape *ps, eplb_slot_order order,
                                  eplb_error *err) {
    if (ps->num_gpus > r->limits.max_ep_size)
        return eplb_error_set(err, EPLB_EINVAL, "num_gpus %u exceeds the server limit %u (--max-ep-size)",
                              ps->num_gpus, r->limits.max_ep_size);
    if (ps->num_nodes > ps->num_gpus)
        return eplb_error_set(err, EPLB_EINVAL, "num_nodes %u exceeds num_gpus %u", ps->num_nodes, ps->num_gpus);
    eplb_status st = eplb_policy_check(ps, err);
    if (st == EPLB_OK && order == EPLB_SLOT_MIN_TRAFFIC && ps->num_gpus / ps->num_nodes > MIN_TRAFFIC_MAX_GPUS_PER_NODE)
        st = eplb_error_set(err, EPLB_EINVAL, "SLOT_ORDER_MIN_TRAFFIC takes at most %u GPUs per node, not %u",
                            MIN_TRAFFIC_MAX_GPUS_PER_NODE, ps->num_gpus / ps->num_nodes);
    return st;
}

/* The execution fields of a request.  Engine execution moves nothing of
 * eplbd's, so a wait event has nothing to order; weights attached to eplbd
 * are allowed and left alone (they map the engine's own buffers, which the
 * engine rewrites itself; the attachment stays valid for later
 * server-executed rebalances once the map is committed). */
static eplb_status check_execution(const registry_entry *e, const eplb_rebalance_request *req, eplb_error *err) {
    (void)e;
    if (req->execution > EPLB_EXEC_ENGINE)
        return eplb_error_set(err, EPLB_EINVAL, "execution %u is not an Execution (0 SERVER, 1 ENGINE)",
                              req->execution);
    if (req->execution == EPLB_EXEC_SERVER && (req->max_staging_bytes || req->include_transfer_plan))
        return eplb_error_set(err, EPLB_EINVAL,
                              "max_staging_bytes and include_transfer_plan are for execution EXECUTION_ENGINE");
    if (req->execution == EPLB_EXEC_ENGINE && req->wait_event_len)
        return eplb_error_set(err, EPLB_EINVAL,
                              "wait_event is for EXECUTION_SERVER: with EXECUTION_ENGINE eplbd copies nothing on "
                              "the engine's GPUs");
    return EPLB_OK;
}

eplb_status eplb_registry_rebalance(eplb_registry *r, const eplb_rebalance_request *req,
                                    eplb_rebalance_result *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    registry_entry *e;
    eplb_status st = registry_acquire(r, req->model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    const eplb_placement *cur = &registry_current(e)->placement;
    size_t cells = (size_t)cur->num_layers * cur->num_logical;
    int64_t *logical = NULL;
    eplb_policy_shape ps = policy_shape(e, req->num_groups, req->num_nodes, req->num_gpus);

    if ((st = check_loaded(e, err)) != EPLB_OK ||
        (!req->dry_run && (st = check_not_pending(e, "another Rebalance", err)) != EPLB_OK) ||
        (st = check_epoch(e, req->has_expected_epoch, req->expected_epoch, err)) != EPLB_OK ||
        (st = check_topology(r, &ps, req->slot_order, err)) != EPLB_OK ||
        (!req->dry_run && (st = check_registered_topology(e, req, err)) != EPLB_OK) ||
        (st = check_gate(req, err)) != EPLB_OK ||
        (st = check_wait_event(e, req->wait_event, req->wait_event_len, err)) != EPLB_OK ||
        (st = check_execution(e, req, err)) != EPLB_OK)
        goto out;
    logical = eplb_malloc(cells * sizeof *logical);
    if (!logical) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        goto out;
    }
    if (req->physical_load_len && req->logical_load_len) {
        st = eplb_error_set(err, EPLB_EINVAL, "send physical_load or logical_load, not both");
        goto out;
    }
    if (req->logical_load_len) {
        if (req->logical_load_len != cells) {
            st = eplb_error_set(err, EPLB_EINVAL,
                                "logical_load has %zu entries, want num_layers %u x num_logical_experts %u",
                                req->logical_load_len, cur->num_layers, cur->num_logical);
            goto out;
        }
        for (size_t i = 0; i < cells; i++)
            if (req->logical_load[i] < 0) {
                st = eplb_error_set(err, EPLB_EINVAL, "logical_load[%zu] = %lld is negative (layer %zu, expert %zu)",
                                    i, (long long)req->logical_load[i], i / cur->num_logical,
                                    i % cur->num_logical);
                goto out;
            }
        memcpy(logical, req->logical_load, cells * sizeof *logical);
    } else if (req->physical_load_len) {
        if ((st = request_logical_load(e, req->physical_load, req->physical_load_len, logical, err)) != EPLB_OK)
            goto out;
    } else {
        if (e->rec.window.count == 0) {
            st = eplb_error_set(err, EPLB_EPRECONDITION,
                                "model %s has no recorded load: send physical_load or RecordLoad first",
                                e->model_id);
            goto out;
        }
        memcpy(logical, e->rec.window.sum, cells * sizeof *logical);
    }
    rebalance_gate gate = { req->knobs.min_improvement, req->force };
    eplb_rebalance_knobs knobs = merged_knobs(e, &req->knobs);
    registry_engine_exec engine = { .max_staging_bytes = req->max_staging_bytes, .expert_bytes = knobs.expert_bytes,
                                    .include_plan = req->include_transfer_plan };
    if (req->execution == EPLB_EXEC_ENGINE) {
        /* The bound needs the expert size (request's or model's): refused
         * before anything is computed. */
        uint32_t entries;
        if ((st = eplb_transfer_staging_entries(engine.max_staging_bytes, engine.expert_bytes, &entries, err)) !=
            EPLB_OK)
            goto out;
    }
    st = rebalance_locked(r, e, logical, &ps, req->slot_order, &knobs, req->dry_run, req->without_log2phy, req->layers_per_step, req->wait_event,
                          req->wait_event_len, &gate,
                          req->execution == EPLB_EXEC_ENGINE && !req->dry_run ? &engine : NULL, out, err);
out:
    eplb_free(logical);
    registry_release(e);
    if (st != EPLB_OK)
        eplb_rebalance_result_free(out);
    return st;
}

eplb_status eplb_registry_continue_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                             eplb_rebalance_result *out, eplb_error *err) {
    return eplb_registry_continue_rebalance_ev(r, model_id, rebalance_id, NULL, 0, out, err);
}

eplb_status eplb_registry_continue_rebalance_ev(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                                const uint8_t *wait_event, size_t wait_event_len,
                                                eplb_rebalance_result *out, eplb_error *err) {
    eplb_continue_request req = { .model_id = model_id, .rebalance_id = rebalance_id, .wait_event = wait_event,
                                  .wait_event_len = wait_event_len };
    return eplb_registry_continue(r, &req, out, err);
}

eplb_status eplb_registry_continue(eplb_registry *r, const eplb_continue_request *req, eplb_rebalance_result *out,
                                   eplb_error *err) {
    memset(out, 0, sizeof *out);
    const char *rebalance_id = req->rebalance_id;
    const uint8_t *wait_event = req->wait_event;
    size_t wait_event_len = req->wait_event_len;
    registry_entry *e;
    eplb_status st = registry_acquire(r, req->model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    const eplb_pending_rebalance *p = &e->rec.pending;
    if ((st = check_loaded(e, err)) != EPLB_OK)
        goto out;
    if (p->id[0] && p->execution == EPLB_EXEC_ENGINE && strcmp(p->id, rebalance_id) == 0) {
        if (wait_event_len) {
            st = eplb_error_set(err, EPLB_EINVAL,
                                "wait_event: rebalance %s is executed by the engine; eplbd copies nothing", p->id);
            goto out;
        }
        st = registry_engine_continue(e, rebalance_id, req->include_transfer_plan, out, err);
        goto out;
    }
    if (req->include_transfer_plan) {
        st = eplb_error_set(err, EPLB_EINVAL, "include_transfer_plan is for an engine-executed rebalance");
        goto out;
    }
    if (!p->id[0] || strcmp(p->id, rebalance_id) != 0) {
        st = p->id[0] ? eplb_error_set(err, EPLB_ENOTFOUND,
                                       "model %s has no rebalance %s in progress (the one in progress is %s)",
                                       e->model_id, rebalance_id, p->id)
                      : eplb_error_set(err, EPLB_ENOTFOUND,
                                       "model %s has no rebalance %s in progress (it finished, or never started)",
                                       e->model_id, rebalance_id);
        goto out;
    }
    if (p->with_weights && !e->weights) {
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "rebalance %s of model %s moves weights, and none are attached now (eplbd restarted?): "
                            "attach them again, then continue", p->id, e->model_id);
        goto out;
    }
    if ((st = check_wait_event(e, wait_event, wait_event_len, err)) != EPLB_OK)
        goto out;
    st = pending_run_step(r, e, wait_event, wait_event_len, out, err);
    registry_stats_rebalance(e, st == EPLB_OK, out, out->bytes_moved);
out:
    registry_release(e);
    if (st != EPLB_OK)
        eplb_rebalance_result_free(out);
    return st;
}

/* ---- RecordLoad ----------------------------------------------------------- */

eplb_status eplb_registry_record_load(eplb_registry *r, const eplb_record_request *req,
                                      eplb_record_result *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    registry_entry *e;
    eplb_status st = registry_acquire(r, req->model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    const eplb_placement *cur = &registry_current(e)->placement;
    size_t cells = (size_t)cur->num_layers * cur->num_logical;
    size_t phys_cells = (size_t)cur->num_layers * cur->num_physical;
    uint32_t passes = req->num_passes ? req->num_passes : 1;
    int64_t *logical = NULL;
    /* Every pass is converted (and so validated) before any is counted:
     * a bad request changes nothing, dummy or not. */
    if (req->physical_load_len != (size_t)passes * phys_cells) {
        st = eplb_error_set(err, EPLB_EINVAL,
                            "physical_load has %zu entries, want num_passes %u x num_layers %u x "
                            "num_physical_experts %u", req->physical_load_len, passes, cur->num_layers,
                            cur->num_physical);
        goto out;
    }
    /* passes x L x N <= the request's passes x L x P values: bounded by
     * the message size. */
    logical = eplb_malloc((size_t)passes * cells * sizeof *logical);
    if (!logical) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        goto out;
    }
    for (uint32_t k = 0; k < passes; k++)
        if ((st = request_logical_load(e, req->physical_load + (size_t)k * phys_cells, phys_cells,
                                       logical + (size_t)k * cells, err)) != EPLB_OK) {
            if (passes > 1) {
                char msg[EPLB_ERROR_MSG_MAX];
                snprintf(msg, sizeof msg, "pass %u: %s", k, err ? err->msg : "");
                eplb_error_set(err, st, "%s", msg);
            }
            goto out;
        }
    /* The window's sums must not overflow whatever passes it evicts. */
    if (!req->is_dummy)
        for (size_t i = 0; i < cells; i++) {
            int64_t total = e->rec.window.sum ? e->rec.window.sum[i] : 0;
            for (uint32_t k = 0; k < passes; k++) {
                int64_t v = logical[(size_t)k * cells + i];
                if (total > INT64_MAX - v) {
                    st = eplb_error_set(err, EPLB_EINVAL, "the load window's sum would overflow int64");
                    goto out;
                }
                total += v;
            }
        }
    bool auto_due = false;
    const eplb_model_shape *sh = &registry_current(e)->shape;
    for (uint32_t k = 0; !req->is_dummy && k < passes; k++) {
        if ((st = eplb_load_window_push(&e->rec.window, logical + (size_t)k * cells, err)) != EPLB_OK)
            goto out; /* out of memory growing the window: the passes before k are counted */
        registry_stats_pass(e);
        auto_due = auto_due || (sh->step_interval && e->rec.window.passes % sh->step_interval == 0);
    }

    const eplb_model_shape *s = &registry_current(e)->shape;
    /* Not while a stepped rebalance is in progress: its engine installs the
     * steps; an automatic one would change the placement under it. */
    if (!req->is_dummy && s->auto_rebalance && auto_due &&
        e->rec.state != EPLB_MOVE_NEEDS_RELOAD && !e->rec.pending.id[0]) {
        /* vLLM's step(): every step_interval passes, rebalance from the window. */
        eplb_rebalance_result res;
        memset(&res, 0, sizeof res);
        eplb_policy_shape ps = policy_shape(e, 0, 0, 0);
        memcpy(logical, e->rec.window.sum, cells * sizeof *logical);
        eplb_error why;
        eplb_error_clear(&why);
        eplb_slot_order order = e->weights && ps.num_gpus / ps.num_nodes <= MIN_TRAFFIC_MAX_GPUS_PER_NODE
                                    ? EPLB_SLOT_MIN_TRAFFIC : EPLB_SLOT_PRESERVE;
        /* The model's own policy, budgets and gate (ParallelConfig). */
        eplb_rebalance_knobs knobs = merged_knobs(e, &s->defaults);
        rebalance_gate gate = { knobs.min_improvement, false };
        eplb_status ast = rebalance_locked(r, e, logical, &ps, order, &knobs, false, false, 0, NULL, 0, &gate, NULL, &res, &why);
        out->rebalanced = ast == EPLB_OK;
        eplb_rebalance_result_free(&res);
        /* The pass is counted either way, so the call succeeds (a retried
         * RecordLoad would count it twice); the failure is reported. */
        if (ast != EPLB_OK)
            snprintf(out->auto_rebalance_error, sizeof out->auto_rebalance_error, "%s: %s",
                     eplb_status_name(ast), why.msg);
    }
    out->passes_recorded = e->rec.window.passes;
    out->epoch = registry_current(e)->placement.epoch;
out:
    eplb_free(logical);
    registry_release(e);
    return st;
}
