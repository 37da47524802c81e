/* eplb_snapshot.h -- one committed epoch of a model: its placement and the
 * shape it was committed with, immutable once published and shared by
 * reference counting.
 *
 * Why: readers (GetPlacement, RegisterModel's answer, the speculator check)
 * must never wait for a writer's policy, weight move or fsync, and must not
 * copy a 2M-entry map under a lock.  A writer builds the next snapshot off
 * to the side and publishes it by swapping one pointer under the model's
 * publication lock; a reader takes a reference under the same lock (a
 * pointer copy and an atomic increment) and encodes from it at leisure.
 * Cost: one malloc per commit; memory of an old epoch lives until its last
 * reader lets go. */
#ifndef EPLB_SNAPSHOT_H
#define EPLB_SNAPSHOT_H

#include <stdatomic.h>

#include "eplb_model.h"
#include "eplb_move_state.h"
#include "eplb_placement.h"
#include "eplb_status.h"

typedef struct eplb_snapshot {
    atomic_uint refs;
    eplb_placement placement; /* never written after publication */
    eplb_model_shape shape;
} eplb_snapshot;

/* A new snapshot with one reference; takes ownership of *placement's
 * arrays (left empty) in every case.  EPLB_ENOMEM. */
eplb_status eplb_snapshot_new(eplb_placement *placement, const eplb_model_shape *shape,
                              eplb_snapshot **out, eplb_error *err);
eplb_snapshot *eplb_snapshot_ref(eplb_snapshot *s);
/* Drop a reference; the last one frees.  NULL is fine. */
void eplb_snapshot_unref(eplb_snapshot *s);

/* What a reader sees of a model at one instant: its epoch and its move
 * state, taken together under the publication lock. */
typedef struct eplb_model_view {
    eplb_snapshot *snap;                   /* referenced */
    eplb_move_state state;
    char state_reason[EPLB_ERROR_MSG_MAX]; /* why NEEDS_RELOAD */
    char pending_id[EPLB_REBALANCE_ID_MAX + 1]; /* a stepped rebalance in progress ("" none) */
    uint32_t pending_layers_done;
    uint32_t pending_execution;            /* eplb_execution of the pending rebalance */
} eplb_model_view;

/* Unreference view->snap and clear the view.  NULL snap is fine. */
void eplb_model_view_release(eplb_model_view *view);

#endif
