/* eplb_node_repair.h -- a cheaper row than from-scratch for a hierarchical
 * layer whose nodes are out of balance.
 *
 * On the hierarchical path every replica of a group lives on its group's
 * node (DeepSeek packs groups onto nodes first), and INCREMENTAL keeps it
 * so: no change moves a group.  When the drift has made the nodes' loads
 * uneven, no change within the nodes brings such a layer near the
 * from-scratch max, and eplb_next used to give it the from-scratch row,
 * which rewrites nearly every slot (DeepSeek re-packs within the nodes too).
 * The repair swaps one group between two nodes instead (the pair that
 * lowers the heaviest node's load most), places each moved group in the
 * slots the other left (replica counts by load, heaviest replica onto the
 * lightest GPU), and lets INCREMENTAL finish the layer within the nodes.
 * eplb_next offers the result as a second candidate for the layer and takes
 * whichever gains more per copy.  docs/benchmarks.md has the numbers.
 *
 * Cost: O(groups^2 / nodes) for the pair (at most EPLB_NODE_REPAIR_MAX_PAIRS),
 * O(P log P) for the placement, plus one INCREMENTAL call on the one layer
 * (within max_work).  No gRPC, storage or GPU code. */
#ifndef EPLB_NODE_REPAIR_H
#define EPLB_NODE_REPAIR_H

#include <stdbool.h>
#include <stdint.h>

#include "eplb_policy.h"
#include "eplb_status.h"

typedef struct eplb_node_repair_params {
    /* The model's shape; num_layers is ignored (one layer is repaired).
     * Hierarchical: num_groups % num_nodes == 0 and num_nodes > 1. */
    eplb_policy_shape shape;
    const int64_t *load;          /* [N] the layer's load */
    const int32_t *row;           /* [P] the layer's current row */
    const int32_t *ref_cnt;       /* [N] from-scratch replica counts (INCREMENTAL's item bound), or NULL */
    double floor;                 /* the layer's from-scratch max load (INCREMENTAL's floor) */
    double target_max;            /* the max load INCREMENTAL stops at */
    double cost_intra_node, cost_cross_node; /* > 0 */
    uint64_t max_work;            /* INCREMENTAL's compute bound for the polish (0: its default) */
} eplb_node_repair_params;

/* Writes the repaired row [P] and its counts [N], and sets *repaired.
 * *repaired is false (and the outputs unspecified) when the heaviest
 * node's mean GPU load is within target_max already, no swap of two
 * groups, each on one node, lowers the heaviest node's load, or there are
 * more pairs to try than EPLB_NODE_REPAIR_MAX_PAIRS.  *work (may be NULL)
 * gets the work spent, in INCREMENTAL's units (pairs tried count one
 * each).  EPLB_OK, EPLB_EINVAL (not a hierarchical shape, a slot outside
 * [0, N), an expert without a replica, a negative load), or EPLB_ENOMEM. */
eplb_status eplb_node_repair(const eplb_node_repair_params *p, int32_t *out_row, int32_t *out_cnt, bool *repaired,
                             uint64_t *work, eplb_error *err);

/* The most group pairs one repair tries: (groups on the heaviest node) x
 * (groups elsewhere).  DeepSeek-V3 has 4 x 4 at 2 nodes; a hostile shape
 * with thousands of groups is not repaired (a million pairs take a few
 * milliseconds). */
#define EPLB_NODE_REPAIR_MAX_PAIRS (1u << 20)

#endif
