/* eplb_pending.h -- a rebalance committed in steps (layers_per_step): the
 * arithmetic of steps, kept apart from the locking and committing in
 * eplb_rebalance.c.
 *
 *   Rebalance(layers_per_step = k): target = the policy's placement
 *     step: served' = served with the next k layers whose row differs from
 *           target's (in layer order) taken from target; commit served'
 *           (epoch + 1; with weights, move those layers' bytes first)
 *     layers_done = layers whose served row equals target's; pending while
 *     layers_done < L.  ContinueRebalance(id) does the next step.
 *
 * At every moment the served placement is what the bytes hold, layer by
 * layer: a step moves whole layers and commits exactly the rows it moved. */
#ifndef EPLB_PENDING_H
#define EPLB_PENDING_H

#include <stdint.h>

#include "eplb_placement.h"
#include "eplb_registry.h"

/* A fresh id: 16 lowercase hex digits from the system's entropy source
 * (getentropy; the clock and a counter if that fails).  Unique enough to
 * tell one rebalance of a model from the next; not a secret. */
void eplb_pending_new_id(char id[EPLB_REBALANCE_ID_MAX + 1]);

/* Free p's target and zero it (id "": none pending).  NULL is fine. */
void eplb_pending_clear(eplb_pending_rebalance *p);

/* Layers whose row in cur equals target's.  Both have the same L and P. */
uint32_t eplb_pending_layers_done(const eplb_placement *cur, const eplb_placement *target);

/* The placement after one step: cur with the first k layers whose row
 * differs from target's (in layer order) taken from target.  *layers
 * (malloc'd through eplb_alloc, *n entries, NULL when none) lists them.
 * out's epoch is cur's (the commit advances it).  EPLB_ENOMEM, or the
 * placement's own checks.  Cost: O(L * P). */
eplb_status eplb_pending_step(const eplb_placement *cur, const eplb_placement *target, uint32_t k,
                              eplb_placement *out, uint32_t **layers, uint32_t *n, eplb_error *err);

#endif
