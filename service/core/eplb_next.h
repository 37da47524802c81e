/* eplb_next.h -- choosing a rebalance's next placement: the policy
 * (DeepSeek from scratch, or incremental from the current placement), the
 * slot order, and what the change costs in expert copies.
 *
 * Pure computation on caller-owned arrays (no registry, no I/O, no locks):
 * the registry calls it under the model's lock; benchmarks and tests call it
 * directly.  Deterministic: the same inputs give the same output. */
#ifndef EPLB_NEXT_H
#define EPLB_NEXT_H

#include <stdint.h>

#include "eplb_model.h"
#include "eplb_policy.h"
#include "eplb_status.h"

typedef enum eplb_slot_order {
    EPLB_SLOT_PRESERVE = 0,     /* vLLM #29499: keep slots within each GPU */
    EPLB_SLOT_ALGORITHM = 1,    /* the policy's own order */
    EPLB_SLOT_MIN_TRAFFIC = 2,  /* reassign GPUs/nodes to their old holders, then keep slots */
} eplb_slot_order;

typedef struct eplb_next_request {
    eplb_policy_shape shape;       /* L, N, P, groups, nodes, gpus */
    eplb_slot_order order;         /* POLICY_DEEPSEEK's slot order */
    const int32_t *cur_phy2log;    /* [L][P] the placement in place now */
    const int32_t *cur_logcnt;     /* [L][N] its replica counts */
    const int64_t *logical_load;   /* [L][N] */
    eplb_rebalance_knobs knobs;    /* policy, target, budgets, link costs, expert_bytes (0 = defaults) */
} eplb_next_request;

typedef struct eplb_next_report {
    uint32_t policy_used;          /* eplb_policy_kind of the answer */
    double balancedness_before;    /* of cur */
    double balancedness_after;     /* of the answer */
    double balancedness_reference; /* from scratch (DeepSeek) on the same load */
    uint32_t layers_from_scratch;  /* INCREMENTAL: layers that fell back */
    uint32_t layers_node_repaired; /* INCREMENTAL, hierarchical: layers that took a node repair (eplb_node_repair.h) */
    uint64_t work;                 /* INCREMENTAL: compute spent, search and repairs (EPLB_INCREMENTAL_MAX_WORK's units) */
    uint64_t slots_moved;          /* slots whose expert changes */
    uint64_t copies_cross_gpu;     /* (GPU, expert) pairs the GPU must fetch from another GPU */
    uint64_t copies_cross_node;    /* of those, fetched from another node */
    uint64_t reference_copies_cross_gpu; /* INCREMENTAL: what from scratch (PRESERVE order) would need */
    char reason[EPLB_ERROR_MSG_MAX]; /* which fallback was taken, or why a target was missed; "" */
} eplb_next_report;

/* Compute the next placement of every layer into phy2log [L][P] and logcnt
 * [L][N].  layer_before / layer_after [L] (may be NULL; two separate
 * arrays: they are written in either order) get per-layer
 * balancedness.  EPLB_OK; EPLB_EINVAL for a bad shape or knobs (the
 * message names them), or max_bytes_moved without expert_bytes;
 * EPLB_ENOMEM.  The input arrays are never modified. */
eplb_status eplb_next_placement(const eplb_next_request *req, int32_t *phy2log, int32_t *logcnt,
                                double *layer_before, double *layer_after, eplb_next_report *rep,
                                eplb_error *err);

/* Expert copies a layer change old_row -> new_row ([P]) needs, counted as a
 * plan moves them (eplb_plan.h invariant 6): one per (GPU, expert) that the
 * GPU must hold and does not; cross_node when no GPU of its node holds it
 * either.  Slot moves within a GPU are free.  -1 entries are ignored. */
void eplb_next_copies(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node, uint32_t num_logical,
                      const int32_t *old_row, const int32_t *new_row, uint64_t *cross_gpu, uint64_t *cross_node);

/* A lower bound of the copies (so of the slots rewritten) that new_row
 * ([P]) needs from old_row under any relabelling of its GPUs, as
 * eplb_plan_reassign_gpus chooses one: per GPU, its distinct experts minus
 * the most any old GPU holds of them.  O(P).  0 (still a bound) when the
 * shape is not one or on allocation failure.  eplb_next skips relabelling
 * a fallback row whose bound the budget cannot pay. */
uint64_t eplb_next_copies_lower_bound(uint32_t num_physical, uint32_t num_gpus, uint32_t num_logical,
                                      const int32_t *old_row, const int32_t *new_row);

#endif
