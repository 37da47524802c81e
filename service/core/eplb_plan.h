/* eplb_plan.h -- transfer plans: which bytes move where so that, after a
 * rebalance, every physical slot holds the expert the new phy2log names; and
 * GPU/node reassignment, which relabels the policy's interchangeable GPU packs
 * so that fewer bytes have to move at all.
 *
 * Plain C, no I/O, no global state: any number of threads may build plans at
 * once.  A plan is data; the gpu/ backends (cpu, hip) execute it on the
 * engine's own buffers.  Nothing here touches a byte of expert weights.
 *
 * Glossary (eplb-semantics):
 *   P = num_physical slots of one layer, G = num_gpus (EP ranks); GPU g holds
 *   slots [g*P/G, (g+1)*P/G).  A node holds gpus_per_node consecutive GPUs.
 *   old_row / new_row  int32 [P]  phy2log of one layer before / after (-1 =
 *   empty slot: an old -1 slot holds nothing, a new -1 slot is not written).
 *
 * DESIGN NOTES (numbered invariants every plan satisfies):
 *  1. A slot whose expert is unchanged (new == old) or whose new expert is -1
 *     is never written.  Such a slot is "stable": its old bytes survive the
 *     whole plan, so it may be read at any time.
 *  2. Every other slot ("changed") is written exactly once by a scatter op
 *     (or a dependent copy, 4).
 *  3. Phase 1 (gather) copies old bytes of changed slots that are still
 *     needed into staging entries.  It writes no slot.  So a failure anywhere
 *     in phase 1 leaves every slot as it was.
 *  4. Phase 2 (scatter) writes changed slots, reading only staging entries,
 *     stable slots, or (for a duplicate destination fetched from another GPU)
 *     a slot written earlier in phase 2 by an op of wave 0.  Phase 2 is
 *     therefore idempotent: after a failure part-way through it, running the
 *     whole of phase 2 again (staging still intact) completes the plan.
 *  5. Sources are chosen cheapest first: the same GPU, then the same node,
 *     then another node; among equals a stable source (no staging needed),
 *     then the source GPU with the fewest reads assigned so far (spreads
 *     load over links), then the lowest slot id.
 *  6. For each (destination GPU, expert) at most one copy crosses GPUs; the
 *     other destination slots of that expert on that GPU are filled locally.
 *  7. A staging entry exists for a (destination GPU, expert) only when its
 *     source slot is itself overwritten (changed); staging lives on the
 *     destination GPU, so every scatter from staging is local.
 *
 * Example (eplb-semantics, EP=2, 3 slots per GPU): old [0,1,2,3,0,1] to new
 * [0,2,0,1,0,3].  GPU0: slot0 unchanged; slot2 <- slot0 (stable: a direct
 * copy in phase 2); slot1 <- slot2 (slot2 is overwritten, so phase 1 stages
 * it and phase 2 copies staging -> slot1).  GPU1 likewise: slot1 unchanged,
 * slot2 <- slot0 and slot0 <- slot2, both through staging. */
#ifndef EPLB_PLAN_H
#define EPLB_PLAN_H

#include <stdint.h>

#include "eplb_status.h"

/* What an op copies from and to. */
typedef enum eplb_plan_op_kind {
    EPLB_OP_STAGE = 1,   /* phase 1: old slot -> staging entry */
    EPLB_OP_UNSTAGE = 2, /* phase 2: staging entry -> slot (always same GPU) */
    EPLB_OP_COPY = 3     /* phase 2: slot -> slot (source stable, or wave 1) */
} eplb_plan_op_kind;

/* Which link an op uses (src_gpu vs dst_gpu). */
typedef enum eplb_plan_link {
    EPLB_LINK_LOCAL = 0, /* same GPU */
    EPLB_LINK_PEER = 1,  /* another GPU of the same node */
    EPLB_LINK_NET = 2    /* another node */
} eplb_plan_link;

typedef struct eplb_plan_op {
    uint32_t src;        /* global slot id [0,P), or staging index (UNSTAGE) */
    uint32_t dst;        /* global slot id [0,P), or staging index (STAGE) */
    uint32_t src_gpu;    /* GPU holding the source (a staging entry's gpu) */
    uint32_t dst_gpu;    /* GPU holding the destination */
    int32_t expert;      /* logical expert the bytes belong to */
    uint8_t kind;        /* eplb_plan_op_kind */
    uint8_t link;        /* eplb_plan_link */
    uint8_t wave;        /* phase 2 only: 0, or 1 = reads a wave-0 destination */
    uint8_t pad_;
} eplb_plan_op;

typedef struct eplb_plan_staging {
    uint32_t gpu;        /* GPU the entry lives on (= its destination GPU) */
    uint32_t index;      /* its index among that GPU's entries (0, 1, ...) */
    int32_t expert;      /* expert it holds */
} eplb_plan_staging;

typedef struct eplb_plan {
    uint32_t num_physical;       /* P the plan was built for */
    uint32_t num_gpus;           /* G */
    uint32_t gpus_per_node;      /* as given */
    uint32_t num_gather;         /* phase 1 ops, all EPLB_OP_STAGE */
    uint32_t num_scatter;        /* phase 2 ops: wave 0 first, then wave 1 */
    uint32_t num_scatter_wave0;  /* ops [0, this) of scatter are wave 0 */
    uint32_t num_staging;        /* staging entries */
    uint32_t max_staging_per_gpu;/* the most entries any one GPU holds */
    eplb_plan_op *gather;        /* [num_gather] */
    eplb_plan_op *scatter;       /* [num_scatter] */
    eplb_plan_staging *staging;  /* [num_staging] */
    /* Counters (slots partition: unchanged + empty + written == P). */
    uint32_t slots_unchanged;    /* new == old != -1: not touched */
    uint32_t slots_empty;        /* new == -1: not written */
    uint32_t slots_written;      /* changed slots, each written once */
    uint32_t local_copies;       /* ops (both phases) with src_gpu == dst_gpu */
    uint32_t cross_gpu_copies;   /* ops with src_gpu != dst_gpu (incl. cross-node) */
    uint32_t cross_node_copies;  /* of those, ops between nodes */
} eplb_plan;

/* Build the transfer plan of ONE layer.
 *   num_physical   P >= 1, a multiple of num_gpus, <= EPLB_POLICY_MAX_EXPERTS
 *   num_gpus       G >= 1
 *   gpus_per_node  >= 1 (node of GPU g = g / gpus_per_node)
 *   old_row        int32 [P] the layer's phy2log now
 *   new_row        int32 [P] the layer's phy2log wanted
 *   first_gpu, num_local_gpus   the GPUs this server holds:
 *                  [first_gpu, first_gpu + num_local_gpus) within [0, G)
 *   out            the plan (caller frees with eplb_plan_free)
 * Entries must be -1 or in [0, EPLB_POLICY_MAX_EXPERTS).
 * Returns EPLB_OK; EPLB_EINVAL for a bad shape, NULL pointer or entry (the
 * message names the slot and value); EPLB_EPRECONDITION when a slot to be
 * written, or the only sources of an expert it needs, lie on GPUs this server
 * does not hold ("slot 7 (GPU 2) needs expert 5, held only by slots on GPUs
 * outside 0..1: slot 12 (GPU 4)"), or when a new slot wants an expert no old
 * slot holds ("slot 3 (GPU 1) wants expert 9 but no old slot holds it").
 * The message does not know the layer: callers prefix "layer L: ".
 * A plan is returned only when every check passed: on any error *out is
 * left empty (zeroed; eplb_plan_free on it is a no-op); inputs are never
 * modified.
 * EPLB_ENOMEM when an allocation fails.
 * Cost: O(P + E + sum over changed (GPU, expert) groups of that expert's old
 * replica count) time, O(P + E) memory, E = largest expert id + 1; one
 * allocation for the plan and one for scratch. */
eplb_status eplb_plan_build(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node,
                            const int32_t *old_row, const int32_t *new_row, uint32_t first_gpu,
                            uint32_t num_local_gpus, eplb_plan *out, eplb_error *err);

/* Free the plan's arrays and zero it.  NULL and an empty plan are fine. */
void eplb_plan_free(eplb_plan *plan);

/* GPU/node reassignment (goes beyond vLLM).
 *   old_phy2log  int32 [L][P]  the mapping in place now
 *   new_phy2log  int32 [L][P]  in/out: the policy's mapping
 * The policy's GPU packs inside a node are interchangeable, and so are its
 * nodes (when it ran hierarchically with num_nodes nodes; pass num_nodes = 1
 * when it ran globally: then every GPU is interchangeable).  Per layer this
 * permutes whole GPU blocks (P/G slots each) of new_phy2log -- node blocks to
 * physical nodes, then GPU blocks within each node to that node's GPUs -- so
 * as to maximize the overlap: the sum over GPUs of the multiset intersection
 * of the GPU's new experts with the experts it already holds (-1 ignored).
 * The choice is optimal among all such node-respecting permutations
 * (Kuhn-Munkres for the GPUs of every (new node, physical node) pair, then
 * for the nodes on those optimal values), and among optimal ones it keeps
 * the most blocks in place (the identity wins every tie), so the result is
 * deterministic and never has less overlap than the identity.
 * Each GPU's multiset of experts is preserved, so per-GPU load and
 * balancedness are unchanged.  Slot order inside a GPU is not optimized:
 * run eplb_policy_preserve_slots afterwards.
 * Does nothing when num_gpus is 0 or does not divide num_physical, when
 * num_nodes is 0 or does not divide num_gpus (then treat it as 1 node: pass
 * 1), or when a scratch allocation fails (new_phy2log is then left as it was:
 * still a valid mapping, just not reassigned).
 * Cost per layer, n = num_nodes, m = GPUs per node, S = P/G:
 * O(G*S log S + n^2*m^2*S + n^2*m^3 + n^3) time, O(P + n^2*m) memory. */
void eplb_plan_reassign_gpus(uint32_t num_layers, uint32_t num_physical, uint32_t num_gpus,
                             uint32_t num_nodes, const int32_t *old_phy2log,
                             int32_t *new_phy2log);

/* Overlap of one layer as eplb_plan_reassign_gpus defines it: the sum over
 * GPUs of |multiset(new GPU block) ∩ multiset(old GPU block)|, -1 ignored.
 * 0 when num_gpus is 0 or does not divide num_physical, or on allocation
 * failure.  O(P log P). */
uint64_t eplb_plan_overlap(uint32_t num_physical, uint32_t num_gpus, const int32_t *old_row,
                           const int32_t *new_row);

#endif
