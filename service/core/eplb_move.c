/* eplb_move.c -- a committing Rebalance on a model with attached weights:
 * move the bytes layer by layer, then commit, as the state machine drawn
 * in eplb_move_state.h -- one function per transition, each asserting the
 * state it starts from (debug builds).
 *
 *   IDLE --move_stage--> STAGED --move_begin--> MOVING --move_commit--> COMMITTED
 *    ^ ^ |                  |                      |                        |
 *    | | |                  +-- move_unstage --+   |                  move_publish
 *    | | |                                     |   |                        |
 *    | +-+-------------------------------------+---+------------------------+
 *    |   |             move_fail (buffers lost, scatter retry failed,
 *    |   +------+----- commit not stored) from IDLE, STAGED or MOVING
 *    |          v
 *    +---- NEEDS_RELOAD   (re-registration, eplb_registry.c)
 *
 * What is stored when: MOVING before the first slot write (after the first
 * gather, which writes only staging), the new map with IDLE at the commit,
 * NEEDS_RELOAD before the error is answered.  A crash anywhere leaves a
 * stored state that is true: IDLE with the old map (nothing written), MOVING
 * (loaded as NEEDS_RELOAD), or IDLE with the new map.
 *
 * Cost: one extra fsync per rebalance that moves bytes (MOVING), the price
 * of a restart never serving a map the bytes do not hold.
 * Caller holds the model's op_lock throughout. */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_alloc.h"
#include "eplb_registry_internal.h"
#include "eplb_move.h"
#include "eplb_trace.h"

/* Debug trace (eplb_trace.h) of each transition: "move_state" with from,
 * to and the reason.  Off, one atomic load. */
static void trace_state(const eplb_move *m, eplb_move_state from, eplb_move_state to, const char *reason) {
    if (!eplb_trace_on())
        return;
    eplb_trace_field f[] = {
        EPLB_TF_S("from", eplb_move_state_name(from)),
        EPLB_TF_S("to", eplb_move_state_name(to)),
        EPLB_TF_S("reason", reason ? reason : ""),
    };
    eplb_trace("move_state", m->e->model_id, f, reason && reason[0] ? 3 : 2);
}

static void set_state(eplb_move *m, eplb_move_state from, eplb_move_state to, const char *reason) {
    assert(m->e->rec.state == from);
    registry_publish_state(m->e, to, reason);
    trace_state(m, from, to, reason);
}

/* IDLE -> STAGED: the plan of every layer can be carried out with the
 * buffers we hold, and (with a wait event) the copy streams wait on the
 * engine's event -- a wait queued before any copy, so a refused or failed
 * begin is a refusal like check's: nothing moved.  Refusals leave IDLE;
 * lost buffers go to NEEDS_RELOAD. */
static eplb_status move_stage(eplb_move *m, eplb_error *err) {
    assert(m->e->rec.state == EPLB_MOVE_IDLE);
    const eplb_placement *cur = &registry_current(m->e)->placement;
    const eplb_weights_ops *w = m->e->weights;
    eplb_status st = w->check(m->e->weights_ctx, cur->num_layers, cur->num_physical, cur->phy2log,
                              m->next->phy2log, err);
    if (st == EPLB_OK && m->wait_event_len) {
        /* The caller refused a wait event for weights without begin. */
        assert(w->begin);
        st = w->begin(m->e->weights_ctx, m->wait_event, m->wait_event_len, err);
    }
    if (st == EPLB_OK)
        set_state(m, EPLB_MOVE_IDLE, EPLB_MOVE_STAGED, "");
    return st;
}

/* STAGED -> IDLE: nothing was written. */
static void move_unstage(eplb_move *m) {
    set_state(m, EPLB_MOVE_STAGED, EPLB_MOVE_IDLE, "");
}

/* STAGED -> MOVING, stored before the first slot is written.  If the store
 * refuses, nothing was written: back to IDLE with the store's error. */
static eplb_status move_begin(eplb_move *m, eplb_error *err) {
    assert(m->e->rec.state == EPLB_MOVE_STAGED);
    const eplb_snapshot *cur = registry_current(m->e);
    eplb_model_record rec = registry_record(m->e, &cur->placement, &cur->shape, EPLB_MOVE_MOVING, "");
    eplb_status st = registry_save(m->r, &rec, err);
    if (st != EPLB_OK) {
        move_unstage(m);
        return st;
    }
    if (m->r->store)
        m->e->rec.window.dirty = false;
    set_state(m, EPLB_MOVE_STAGED, EPLB_MOVE_MOVING, "");
    return EPLB_OK;
}

/* IDLE (the check found the buffers lost), STAGED or MOVING ->
 * NEEDS_RELOAD, stored first (best effort: when the
 * store refuses, the stored state is MOVING, which a restart also serves
 * as NEEDS_RELOAD; from STAGED a refused save leaves a stale IDLE row, so
 * the message says so).  Returns EPLB_EDATALOSS with the reason. */
static eplb_status move_fail(eplb_move *m, const char *why, eplb_error *err) {
    registry_entry *e = m->e;
    assert(e->rec.state == EPLB_MOVE_IDLE || e->rec.state == EPLB_MOVE_STAGED ||
           e->rec.state == EPLB_MOVE_MOVING);
    char reason[EPLB_ERROR_MSG_MAX];
    snprintf(reason, sizeof reason, "%s", why);
    const eplb_snapshot *cur = registry_current(e);
    eplb_model_record rec = registry_record(e, &cur->placement, &cur->shape, EPLB_MOVE_NEEDS_RELOAD, reason);
    eplb_error serr;
    eplb_error_clear(&serr);
    eplb_status st = registry_save(m->r, &rec, &serr);
    eplb_move_state from = e->rec.state;
    registry_publish_state(e, EPLB_MOVE_NEEDS_RELOAD, reason);
    trace_state(m, from, EPLB_MOVE_NEEDS_RELOAD, reason);
    return eplb_error_set(err, EPLB_EDATALOSS, "model %s needs a weight reload: %s%s%s", e->model_id, reason,
                          st == EPLB_OK ? "" : "; the store did not take the new state: ",
                          st == EPLB_OK ? "" : serr.msg);
}

/* MOVING -> COMMITTED: store `placement` (what the bytes now hold) as the
 * next epoch.  Takes ownership of placement. */
static eplb_status move_commit(eplb_move *m, eplb_placement *placement, eplb_error *err) {
    assert(m->e->rec.state == EPLB_MOVE_MOVING);
    eplb_status st = registry_commit_locked(m->r, m->e, placement, &registry_current(m->e)->shape, err);
    if (st == EPLB_OK) {
        /* registry_commit_locked stored and published IDLE with the map;
         * record the step for the machine's sake. */
        m->e->rec.state = EPLB_MOVE_COMMITTED;
        trace_state(m, EPLB_MOVE_MOVING, EPLB_MOVE_COMMITTED, "");
    }
    return st;
}

/* After the last scatter (still MOVING, nothing stored): the done event
 * for the engine's streams.  Its failure does not fail the move -- the
 * phases returned complete, the bytes are in place as far as the backend
 * knows -- so the move commits and the answer has no done event, which
 * tells the engine the bytes were complete when the answer left (docs/api.md). */
static void move_end(eplb_move *m) {
    assert(m->e->rec.state == EPLB_MOVE_MOVING);
    const eplb_weights_ops *w = m->e->weights;
    if (!w->end || m->bytes_moved == 0)
        return;
    eplb_error eerr;
    eplb_error_clear(&eerr);
    bool has = false;
    eplb_status st = w->end(m->e->weights_ctx, m->done_event, &has, &eerr);
    m->has_done_event = st == EPLB_OK && has;
    if (st != EPLB_OK && eplb_trace_on()) {
        eplb_trace_field f[] = {
            EPLB_TF_S("status", eplb_status_name(st)),
            EPLB_TF_S("error", eerr.msg),
        };
        eplb_trace("move_done_event_failed", m->e->model_id, f, EPLB_TRACE_N(f));
    }
}

/* COMMITTED -> IDLE: the new epoch is what readers see. */
static void move_publish(eplb_move *m) {
    set_state(m, EPLB_MOVE_COMMITTED, EPLB_MOVE_IDLE, "");
}

/* A placement whose layers [0, moved) come from next and the rest from cur:
 * what the bytes hold after a weight move stopped cleanly at layer `moved`. */
static eplb_status mixed_placement(const eplb_placement *cur, const eplb_placement *next, uint32_t moved,
                                   eplb_placement *out, eplb_error *err) {
    uint32_t L = cur->num_layers, P = cur->num_physical;
    int32_t *map = eplb_malloc((size_t)L * P * sizeof *map);
    if (!map)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    memcpy(map, next->phy2log, (size_t)moved * P * sizeof *map);
    memcpy(map + (size_t)moved * P, cur->phy2log + (size_t)moved * P, (size_t)(L - moved) * P * sizeof *map);
    *out = (eplb_placement){ .num_layers = L, .num_logical = cur->num_logical, .epoch = cur->epoch };
    /* Layers still on the old map keep its valid-slot count. */
    eplb_status st = eplb_placement_assign(out, P, moved == L ? P : cur->num_valid_physical, map, err);
    eplb_free(map);
    return st;
}

static double elapsed_ms(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Slots of a layer whose expert changes (what the plan writes). */
static uint64_t slots_changed(const int32_t *old_row, const int32_t *new_row, uint32_t P) {
    uint64_t n = 0;
    for (uint32_t p = 0; p < P; p++)
        n += old_row[p] != new_row[p];
    return n;
}

/* "move_layer": one layer's two phases.  Only the scatter reports bytes
 * (eplb_weights_ops: the gather's staging copies are not counted). */
static void trace_layer(const eplb_move *m, uint32_t layer, uint64_t changed, double gather_ms, double scatter_ms,
                        uint64_t bytes, bool retried) {
    eplb_trace_field f[] = {
        EPLB_TF_U("layer", layer),
        EPLB_TF_U("slots_changed", changed),
        EPLB_TF_F("gather_ms", gather_ms),
        EPLB_TF_F("scatter_ms", scatter_ms),
        EPLB_TF_U("bytes_scattered", bytes),
        EPLB_TF_B("scatter_retried", retried),
    };
    eplb_trace("move_layer", m->e->model_id, f, EPLB_TRACE_N(f));
}

eplb_status eplb_move_run(eplb_move *m, eplb_error *err) {
    registry_entry *e = m->e;
    const eplb_weights_ops *w = e->weights;
    const eplb_placement *cur = &registry_current(e)->placement;
    const uint32_t L = cur->num_layers, P = cur->num_physical;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char why[EPLB_ERROR_MSG_MAX], msg[EPLB_ERROR_MSG_MAX];
    /* Per-phase clocks and slot counts only when traced. */
    const bool traced = eplb_trace_on();
    uint64_t total_changed = 0;
    if (traced) {
        for (uint32_t l = 0; l < L; l++)
            total_changed += slots_changed(cur->phy2log + (size_t)l * P, m->next->phy2log + (size_t)l * P, P);
        eplb_trace_field f[] = {
            EPLB_TF_U("layers", L),
            EPLB_TF_U("num_physical", P),
            EPLB_TF_U("slots_changed", total_changed),
            EPLB_TF_U("epoch", cur->epoch),
        };
        eplb_trace("move_start", e->model_id, f, EPLB_TRACE_N(f));
    }

    eplb_status st = move_stage(m, err);
    if (st == EPLB_EDATALOSS) {
        snprintf(why, sizeof why, "%s", err ? err->msg : "the attached buffers are lost");
        st = move_fail(m, why, err);
    }
    if (st != EPLB_OK)
        goto out;

    uint32_t layer = 0;
    for (; layer < L; layer++) {
        const int32_t *old_row = cur->phy2log + (size_t)layer * P, *new_row = m->next->phy2log + (size_t)layer * P;
        struct timespec tp;
        double gather_ms = 0;
        if (traced)
            clock_gettime(CLOCK_MONOTONIC, &tp);
        st = w->gather(e->weights_ctx, layer, P, old_row, new_row, err);
        if (traced) {
            gather_ms = elapsed_ms(&tp);
            clock_gettime(CLOCK_MONOTONIC, &tp);
        }
        if (st != EPLB_OK) {
            if (traced)
                trace_layer(m, layer, slots_changed(old_row, new_row, P), gather_ms, 0, 0, false);
            break;
        }
        if (layer == 0 && (st = move_begin(m, err)) != EPLB_OK)
            goto out; /* nothing written: IDLE again, the store's error */
        if (traced && layer == 0)
            clock_gettime(CLOCK_MONOTONIC, &tp); /* the scatter's clock leaves out the MOVING fsync */
        eplb_move_bytes bytes = { 0, 0, 0 };
        bool retried = false;
        st = w->scatter(e->weights_ctx, layer, P, old_row, new_row, &bytes, err);
        if (st != EPLB_OK) {
            /* Phase 2 is idempotent: once more completes the layer, unless
             * the buffers are really gone. */
            bytes = (eplb_move_bytes){ 0, 0, 0 };
            retried = true;
            st = w->scatter(e->weights_ctx, layer, P, old_row, new_row, &bytes, err);
        }
        if (traced)
            trace_layer(m, layer, slots_changed(old_row, new_row, P), gather_ms, elapsed_ms(&tp), bytes.written,
                        retried);
        m->bytes_moved += bytes.written;
        m->bytes_cross_gpu += bytes.cross_gpu;
        m->bytes_staged += bytes.staged;
        if (st != EPLB_OK) {
            snprintf(why, sizeof why, "writing layer %u failed and so did its retry (%s); layers 0..%u had moved",
                     layer, err ? err->msg : "", layer);
            st = move_fail(m, why, err);
            goto out;
        }
        m->layers_done = layer + 1;
    }
    m->move_ms = elapsed_ms(&t0);

    if (st == EPLB_OK) {
        /* Every layer moved: the done event, then commit the new map.  (A
         * move that stopped early answers an error, which carries no event:
         * its copies completed before the answer.) */
        if (e->rec.state == EPLB_MOVE_MOVING)
            move_end(m);
        st = move_commit(m, m->next, err);
        if (st != EPLB_OK) {
            snprintf(why, sizeof why, "the weights were moved but the new placement could not be stored (%s)",
                     err ? err->msg : "");
            st = move_fail(m, why, err);
            goto out;
        }
        move_publish(m);
        goto out;
    }

    /* A gather failed: layer `layer` and those after it are untouched. */
    snprintf(why, sizeof why, "%s", err ? err->msg : "");
    if (st == EPLB_EDATALOSS) {
        /* The buffers are lost (e.g. shrunk under us). */
        if (e->rec.state == EPLB_MOVE_STAGED || e->rec.state == EPLB_MOVE_MOVING)
            st = move_fail(m, why, err);
        goto out;
    }
    if (layer == 0) {
        move_unstage(m);
        st = eplb_error_set(err, st, "moving layer 0 failed before any slot was written (%s): nothing changed", why);
        goto out;
    }
    eplb_placement partial;
    eplb_status pst = mixed_placement(cur, m->next, layer, &partial, err);
    if (pst == EPLB_OK)
        pst = move_commit(m, &partial, err);
    if (pst != EPLB_OK) {
        snprintf(msg, sizeof msg, "layers 0..%u moved, then layer %u failed (%s), and that could not be stored (%s)",
                 layer - 1, layer, why, err ? err->msg : "");
        st = move_fail(m, msg, err);
        goto out;
    }
    move_publish(m);
    st = eplb_error_set(err, st,
                        "moving layer %u failed before any of its slots was written (%s): layers 0..%u were "
                        "moved and committed at epoch %llu, the rest keep their placement",
                        layer, why, layer - 1, (unsigned long long)registry_current(e)->placement.epoch);
out:
    if (m->move_ms == 0)
        m->move_ms = elapsed_ms(&t0);
    if (traced) {
        eplb_trace_field f[] = {
            EPLB_TF_S("status", eplb_status_name(st)),
            EPLB_TF_U("layers", L),
            EPLB_TF_U("layers_done", m->layers_done),
            EPLB_TF_U("bytes_moved", m->bytes_moved),
            EPLB_TF_F("move_ms", m->move_ms),
            EPLB_TF_S("state", eplb_move_state_name(e->rec.state)),
        };
        eplb_trace("move_done", e->model_id, f, EPLB_TRACE_N(f));
    }
    eplb_placement_free(m->next);
    assert(e->rec.state == EPLB_MOVE_IDLE || e->rec.state == EPLB_MOVE_NEEDS_RELOAD);
    return st;
}
