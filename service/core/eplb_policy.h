/* eplb_policy.h -- the placement policy: DeepSeek's EPLB rebalance algorithm
 * (deepseek-ai/EPLB eplb.py, as vLLM's DefaultEplbPolicy runs it), vLLM
 * #29499's intra-GPU slot preservation, and the balancedness vLLM logs.
 *
 * It is pure computation on caller-owned arrays: no global state, no I/O, no
 * locks, so any number of threads may call it at once.  It is not the state
 * that holds the current mapping (log2phy is rebuilt elsewhere from phy2log),
 * it does not collect load, and it does not move weights.
 *
 * Output is bit-exact with DeepSeek's algorithm run with the canonical
 * tie-breaking the project's EPLB semantics reference writes down:
 *   - items are visited in stable descending weight order (equal weights: the
 *     lower index first);
 *   - among equally light packs with room, the lowest pack index wins;
 *   - among equal load/count, the lowest expert wins;
 *   - weights are doubles: a load is converted from int64 (exact below 2^53),
 *     a group's load is the sequential double sum of its experts' loads in
 *     expert order, a replica's weight is load / (double)count.
 *
 * Glossary (shapes, all row-major):
 *   L = num_layers, N = num_logical, P = num_physical, G = num_groups.
 *   logical_load  int64 [L][N]  tokens routed to each logical expert
 *   phy2log       int32 [L][P]  logical expert held by each slot (-1 empty)
 *   logcnt        int32 [L][N]  replicas of each logical expert (>= 1)
 *   a GPU holds P / num_gpus consecutive slots. */
#ifndef EPLB_POLICY_H
#define EPLB_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eplb_status.h"

/* Largest N and P accepted, so every id and count fits an int32 and every
 * per-layer scratch size fits comfortably in memory. */
#define EPLB_POLICY_MAX_EXPERTS (1u << 20)

typedef struct eplb_policy_shape {
    uint32_t num_layers;    /* L, >= 1 */
    uint32_t num_logical;   /* N, >= 1, multiple of num_groups (hierarchical path) */
    uint32_t num_physical;  /* P, >= N, multiple of num_gpus */
    uint32_t num_groups;    /* G, >= 1 (DeepSeek-V3: 8 groups of 32 experts) */
    uint32_t num_nodes;     /* >= 1; divides num_gpus (hierarchical path) */
    uint32_t num_gpus;      /* >= 1, the EP size */
} eplb_policy_shape;

/* Check the shape's preconditions:
 *   every count >= 1, N and P <= EPLB_POLICY_MAX_EXPERTS, P >= N,
 *   P % num_gpus == 0, and on the hierarchical path N % G == 0 and
 *   num_gpus % num_nodes == 0.
 * The path: when G % num_nodes == 0 the rebalance is hierarchical (groups
 * packed onto nodes first); otherwise it falls back to the global policy,
 * the hierarchical one run with G = 1 and one node, which needs neither
 * N % G nor num_gpus % num_nodes (as in DeepSeek's eplb.py and vLLM, whose
 * test_parameter_validation rebalances N=4, G=3, 2 nodes).
 * Returns EPLB_OK, or EPLB_EINVAL with a message naming the numbers, e.g.
 * "num_physical_experts 290 is not a multiple of num_gpus 32".  Never asserts;
 * err is left untouched on success. */
eplb_status eplb_policy_check(const eplb_policy_shape *s, eplb_error *err);

/* True when a valid shape takes the hierarchical path (G % num_nodes == 0). */
bool eplb_policy_is_hierarchical(const eplb_policy_shape *s);

/* Bytes of scratch eplb_policy_rebalance_scratch() needs for shape s (a few
 * layers' worth, reused for every batch of layers: O(N + P)); 0 if s is
 * invalid. */
size_t eplb_policy_scratch_size(const eplb_policy_shape *s);

/* Rebalance every layer.
 *   logical_load  int64 [L][N], each >= 0 (zero load is valid)
 *   phy2log       int32 [L][P]  out: DeepSeek's own slot order
 *   logcnt        int32 [L][N]  out: replicas per logical expert
 * Allocates one scratch block per call (eplb_policy_scratch_size bytes).
 * Returns EPLB_OK; EPLB_EINVAL for a bad shape (see eplb_policy_check), a
 * NULL array or a negative load (the message names layer, expert and value);
 * EPLB_ENOMEM when the scratch block cannot be allocated.  On error the
 * contents of phy2log and logcnt are unspecified (layers before the bad one
 * may already be written); the input is never modified. */
eplb_status eplb_policy_rebalance(const eplb_policy_shape *s, const int64_t *logical_load,
                                  int32_t *phy2log, int32_t *logcnt, eplb_error *err);

/* eplb_policy_rebalance() with caller-provided scratch (no allocation):
 * scratch must be aligned for double and at least eplb_policy_scratch_size(s)
 * bytes, else EPLB_EINVAL.  Scratch contents are garbage afterwards.  One
 * scratch block must not be shared by concurrent calls. */
eplb_status eplb_policy_rebalance_scratch(const eplb_policy_shape *s, const int64_t *logical_load,
                                          int32_t *phy2log, int32_t *logcnt, void *scratch,
                                          size_t scratch_size, eplb_error *err);

/* vLLM #29499 intra-GPU slot preservation (preserve_intragpu_slots).
 *   old_phy2log  int32 [L][P]  the mapping in place now (-1 = empty slot)
 *   new_phy2log  int32 [L][P]  in/out: the rebalance's mapping
 * For each layer and each GPU (P / num_gpus consecutive slots), permutes
 * new_phy2log's slots inside that GPU: for each old slot s in ascending order,
 * if an unused new entry of that GPU holds old[s] (first such entry), it is
 * placed at s; then the remaining entries, in ascending order of their
 * position, fill the remaining slots in ascending order.  Each GPU keeps its
 * multiset of experts; the number of slots whose expert is unchanged never
 * drops.  Example (EP=2): old [0,1,2,3,0,1], new [0,2,0,1,0,3] ->
 * [0,0,2,3,0,1].  Does nothing when num_gpus is 0 or does not divide
 * num_physical (as vLLM), or when num_physical / num_gpus exceeds
 * EPLB_POLICY_MAX_EXPERTS.  O(L * P) expected time (a hash of each GPU's
 * expert ids; up to 64 slots per GPU, bit masks).  No
 * allocation up to 1024 slots per GPU; beyond that one scratch allocation per
 * call, and if it fails new_phy2log is left as it was (still a valid mapping,
 * just not slot-preserving). */
void eplb_policy_preserve_slots(uint32_t num_layers, uint32_t num_physical, uint32_t num_gpus,
                                const int32_t *old_phy2log, int32_t *new_phy2log);

/* Balancedness as vLLM logs it (1.0 is perfect).
 * A slot's load is its expert's logical load divided by that expert's replica
 * count, logical_load[l][e] / logcnt[l][e]; a slot holding -1 (or an id
 * outside [0, N), or an expert whose logcnt is <= 0) contributes 0.  A GPU's
 * load is the sum over its P / num_gpus slots.  Per layer:
 *     layer_out[l] = mean over GPUs of GPU load / max over GPUs of GPU load
 * (1.0 when the layer's load is all zero).  Returns the overall value as vLLM
 * computes it: (sum over layers of the mean GPU load) / (sum over layers of
 * the max GPU load), 1.0 when everything is zero.
 *   logical_load int64 [L][N], phy2log int32 [L][P], logcnt int32 [L][N],
 *   layer_out double [L] or NULL.
 * Returns NaN (layer_out untouched) when num_gpus is 0 or does not divide
 * num_physical, or an array is NULL. */
double eplb_policy_balancedness(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                                uint32_t num_gpus, const int64_t *logical_load,
                                const int32_t *phy2log, const int32_t *logcnt, double *layer_out);

#endif
