/* eplb_incremental.h -- POLICY_INCREMENTAL: rebalance by changing the
 * current placement as little as needed.
 *
 * DeepSeek's algorithm recomputes every placement from scratch and, after a
 * small drift of the load, rewrites most slots (66-93% at DeepSeek-V3 size).
 * This policy starts from the placement in place and applies one local
 * change at a time, the one with the best gain per weighted byte:
 *   - swap: two slots on different GPUs exchange their experts;
 *   - re-replication: a slot holding a replica of an expert with >= 2
 *     replicas takes another expert (drop a cold replica, add a hot one).
 * The gain of a change is how much it lowers the sum over layers of the
 * busiest GPU's load (balancedness = mean / max, and the mean is fixed);
 * its cost is the bytes it copies, weighted by link class: free within a
 * GPU (the expert is there, or was when the call began: the plan copies
 * from the old bytes), cost_intra_node between GPUs of a node,
 * cost_cross_node between nodes.  Layers are independent; one heap over all
 * layers picks the next change where the model's balancedness rises most
 * per byte (a layer's max falls only once all its GPUs above the new max
 * are relieved), so a budget goes where it pays most.
 *
 * Invariants of every output: each logical expert keeps >= 1 replica, each
 * GPU keeps its P / num_gpus slots, total replicas stay P; on the
 * hierarchical path (num_groups % num_nodes == 0, num_nodes > 1) no change
 * puts an expert on a node where its group has no replica (a group never
 * spreads to another node); no layer's max GPU load ever rises, so the
 * result is never less balanced than the current placement, layer by layer.
 *
 * Replica counts follow the load: a layer given the from-scratch counts
 * keeps every replica's load under a bound derived from them (see
 * reference_cnt), splitting the ones above it first.
 *
 * It stops when the model's balancedness reaches the target (the sum over
 * layers of the max GPU load is within total_target), and a layer when no
 * change lowers its max (or none below its floor), or when the budget left
 * cannot pay for its next change.
 * Deterministic: ties break by layer, then slot, then expert index. */
#ifndef EPLB_INCREMENTAL_H
#define EPLB_INCREMENTAL_H

#include <stdbool.h>
#include <stdint.h>

#include "eplb_policy.h"
#include "eplb_status.h"

/* The item bound's slack over the largest from-scratch replica load (see
 * reference_cnt; eplb_incremental.c says how it was chosen). */
#define EPLB_INCREMENTAL_ITEM_SLACK 1.3

/* The most work (candidate evaluations, replicas visited, loads redone)
 * one call does by default (~1-2 s on the 2-core machine class; see
 * eplb_incremental.c).  A caller that makes several calls for one
 * rebalance (eplb_next's node repairs) shares it out with max_work. */
#define EPLB_INCREMENTAL_MAX_WORK 300000000ull

typedef struct eplb_incremental_params {
    eplb_policy_shape shape;
    const int64_t *logical_load;  /* [L][N] */
    /* The target is on the whole model: balancedness is (sum over layers of
     * the mean GPU load) / (sum of the max), so it stops once the sum of
     * the layers' max loads is <= total_target (< 0: only when nothing
     * improves).  layer_floor [L] (NULL: none): the from-scratch max of
     * each layer.  Gains count down to 0.9 of it (eplb_incremental.c,
     * FIX_DEPTH: a GPU brought that far stays under the floor through the
     * next drift step); past that, bytes buy balance elsewhere more
     * cheaply. */
    double total_target;
    const double *layer_floor;
    /* reference_cnt [L][N] (NULL: no bound): the from-scratch replica
     * counts.  A layer's item bound is ITEM_SLACK
     * times its largest from-scratch replica load (max over e of load /
     * reference_cnt); no change makes a replica heavier than the bound,
     * and before the search every replica above it is split (one slot of
     * an expert whose replicas stay under it takes another copy of it).
     * A layer that ends above its starting max takes its row from before
     * the splits back (stats.reverted).  Without this the counts drift
     * with the load and the search spends slots on cold experts: over 50
     * rebalances at 1 node x 32 GPUs (t=0.95) the largest replica grew
     * from 0.56 to 0.96 of a GPU's mean load and the bytes per rebalance
     * from 19 to 130 GB (docs/benchmarks.md). */
    const int32_t *reference_cnt;
    double cost_intra_node;       /* > 0 */
    double cost_cross_node;       /* > 0 */
    uint64_t max_copies;          /* budget in cross-GPU copies, when copies_budget */
    uint64_t max_slots;           /* budget in slots rewritten, when slots_budget */
    bool copies_budget, slots_budget;
    bool hierarchical;            /* keep each group's replicas on the nodes they are on */
    uint64_t max_work;            /* the compute bound; 0: EPLB_INCREMENTAL_MAX_WORK */
    /* initial_row [L][P] (NULL: phy2log as given): the row the plan will
     * copy from, which prices copies (free where a GPU held the expert in
     * it); every expert needs a replica in it (EINVAL).  eplb_next passes
     * the current row, which saves a copy of it. */
    const int32_t *initial_row;
    /* threads (0: as many as pay, at most 2; 1: the calling thread only;
     * 2: two, the loop waiting for the second to start): the answer is the
     * same whatever the count (eplb_incremental.c, "Two threads").  With 0
     * the loop does not wait for a second thread that has not started by
     * the time the layers are set up: it runs on one.  A second one runs only on the global path without
     * a budget, for shapes of EPLB_INCREMENTAL_THREAD_MIN slots or more
     * with at most 64 per GPU (past that a search is long, and a call that
     * reaches the compute bound is redone on one thread), when the
     * process may run on 2 CPUs or more. */
    uint32_t threads;
    /* Tests only (zero in production): the two-thread search's fallback
     * paths, which real shapes rarely reach.  log_cap > 0 caps each side's
     * log of changes at that many (a full log undoes the search and the
     * loop runs on one thread); thread_fails makes creating the helper
     * fail as pthread_create does at the process's thread limit;
     * helper_late starts the helper's work only once the calling thread has
     * set up every layer: with threads = 0 the loop then mostly runs on one
     * thread, with 2 on two, the helper having taken no layer. */
    struct {
        uint32_t log_cap;
        bool thread_fails;
        bool helper_late;
    } test;
} eplb_incremental_params;

/* Layers x slots from which a second thread searches half the layers
 * (DeepSeek-V3: 58 x 288 = 16,704). */
#define EPLB_INCREMENTAL_THREAD_MIN 8192u

typedef struct eplb_incremental_stats {
    uint64_t changes;             /* swaps + re-replications in the answer (splits included) */
    uint64_t splits;              /* of which re-replications that split a replica above the item bound */
    uint32_t reverted;            /* layers that ended above their start after splits, and took their row back */
    uint64_t slots_moved;         /* slot rewrites (a slot rewritten twice counts twice) */
    uint64_t copies;              /* cross-GPU copies spent (the budget's unit) */
    double total_max;             /* sum over layers of the max GPU load, after */
    bool reached;                 /* total_max <= total_target */
    bool work_exhausted;          /* stopped at the compute bound (eplb_incremental.c) */
    uint32_t threads;             /* the loop ran on 2 (the two-thread search finished) or 1 */
    bool threads_undone;          /* the two-thread search ran and was undone (a log full, the compute bound
                                     passed, a layer not valid), and the call ran again on one thread */
    bool budget_exhausted;        /* some layer stopped for the budget */
    uint64_t work;                /* work spent (see max_work) */
} eplb_incremental_stats;

/* Improve phy2log [L][P] in place (logcnt [L][N] kept in step; both must
 * describe a valid placement: every expert >= 1 replica, no -1 slots).
 * EPLB_OK; EPLB_EINVAL for a bad shape or a -1 / out-of-range entry;
 * EPLB_ENOMEM (phy2log/logcnt then unchanged for layers not yet started,
 * valid for all). */
eplb_status eplb_incremental_rebalance(const eplb_incremental_params *p, int32_t *phy2log, int32_t *logcnt,
                                       eplb_incremental_stats *stats, eplb_error *err);

#endif
