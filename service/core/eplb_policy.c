/* eplb_policy.c -- DeepSeek's EPLB rebalance, vLLM's intra-GPU slot
 * preservation and balancedness, on plain arrays.
 *
 * This is the algorithm only: it knows nothing of models, RPCs, stored state
 * or weight transfer.  It keeps no global state; everything a call needs lives
 * on its stack or in one scratch block, so calls are thread-safe.
 *
 * NOTES ON THE ALGORITHM (deepseek-ai/EPLB eplb.py, per layer)
 *
 *   1. Pack the G group loads onto the nodes (balanced_packing, m = nodes).
 *      A group's pack and rank relabel its experts into node-major order:
 *      mlog = (pack * groups_per_node + rank) * group_size + j.
 *   2. For each node, replicate its N/nodes experts into P/nodes slots
 *      (replicate_experts): slot k < N/nodes holds expert k; each further
 *      slot goes to the expert with the largest load / count.
 *   3. For each node, pack its P/nodes replicas (weight load / final count)
 *      onto its num_gpus/nodes GPUs, P/num_gpus each (balanced_packing);
 *      replica p lands in slot node * P/nodes + pack * P/num_gpus + rank.
 *   4. Map mlog back to logical ids; logcnt[log] = the node's count of mlog.
 *   When G % nodes != 0 all of it runs with G = 1 and one node (global).
 *
 *   balanced_packing(w[n], m packs of n/m): if n/m == 1 item i goes to pack i
 *   with rank 0; otherwise items are visited in descending weight and each
 *   goes to the lightest pack with room, its rank being that pack's count.
 *
 * CANONICAL TIES (the references leave them to an unstable sort): equal
 * weights are visited lower index first, equally light packs pick the lowest
 * pack, equal load/count picks the lowest expert.  Every comparison below is a
 * total order on (value, index), so the data structures that find the
 * extreme cannot change the answer, only its cost.  Doubles are computed as
 * the reference computes them (same conversions, same division, same order of
 * additions), so results are bit-exact, not merely close.
 *
 * HOW IT IS MADE FAST (a literal port re-sorts the P/nodes replicas of every
 * node and scans every expert for each redundant slot; on this kind of data a
 * C port is then dominated by branch mispredictions):
 *   - a layer's N expert loads are ordered once (sort_experts: a two-pass
 *     radix sort on a 16-bit coarse key, then exact fix-up of the rare runs
 *     of equal coarse keys) and split by node, keeping that order;
 *   - replicate: the best expert not yet replicated is always the next one
 *     in that order; the replicated ones sit in a branch-free winner tree
 *     keyed by load / count;
 *   - step 3 needs the replicas in descending weight: the unreplicated
 *     experts are already in order, so only the replicated experts (at most
 *     the redundant count) are sorted, expanded into their replicas and
 *     merged in;
 *   - the packs with room sit in a branch-free winner tree whose leaves hold
 *     the pack loads;
 *   - a group's load is an integer sum when that is provably the same double
 *     as the reference's running double sum (every load below 2^33).
 *   Per layer: O(N + P + R log R) with R = redundant slots, typically; see
 *   sort_experts for the worst case.
 *
 * Loads are int64 >= 0 converted to double (exact below 2^53), so every
 * weight is +0 or positive and its IEEE bit pattern orders like the value. */
#include "eplb_alloc.h"
#include "eplb_bits.h"
#include "eplb_policy.h"

#include <math.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__) && !defined(EPLB_POLICY_PORTABLE)
#define POLICY_SSE2 1
#include <emmintrin.h>
#endif

/* ---------------------------------------------------------------------------
 * Shapes
 * ------------------------------------------------------------------------- */

eplb_status eplb_policy_check(const eplb_policy_shape *s, eplb_error *err) {
    if (!s)
        return eplb_error_set(err, EPLB_EINVAL, "policy shape is NULL");
    if (s->num_layers == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_layers is 0; must be >= 1");
    if (s->num_logical == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_logical_experts is 0; must be >= 1");
    if (s->num_physical == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical_experts is 0; must be >= 1");
    if (s->num_groups == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_groups is 0; must be >= 1");
    if (s->num_nodes == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_nodes is 0; must be >= 1");
    if (s->num_gpus == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_gpus is 0; must be >= 1");
    if (s->num_logical > EPLB_POLICY_MAX_EXPERTS)
        return eplb_error_set(err, EPLB_EINVAL, "num_logical_experts %u exceeds the limit %u",
                              s->num_logical, EPLB_POLICY_MAX_EXPERTS);
    if (s->num_physical > EPLB_POLICY_MAX_EXPERTS)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical_experts %u exceeds the limit %u",
                              s->num_physical, EPLB_POLICY_MAX_EXPERTS);
    if (s->num_physical < s->num_logical)
        return eplb_error_set(err, EPLB_EINVAL,
                              "num_physical_experts %u is less than num_logical_experts %u",
                              s->num_physical, s->num_logical);
    if (s->num_physical % s->num_gpus != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "num_physical_experts %u is not a multiple of num_gpus %u",
                              s->num_physical, s->num_gpus);
    /* The global path runs with one group on one node, so these two only
     * bind the hierarchical one (DeepSeek asserts them there alone). */
    if (s->num_groups % s->num_nodes == 0 && s->num_logical % s->num_groups != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "num_logical_experts %u is not a multiple of num_groups %u",
                              s->num_logical, s->num_groups);
    if (s->num_groups % s->num_nodes == 0 && s->num_gpus % s->num_nodes != 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_gpus %u is not a multiple of num_nodes %u",
                              s->num_gpus, s->num_nodes);
    if ((size_t)s->num_layers > SIZE_MAX / sizeof(int64_t) / s->num_physical)
        return eplb_error_set(err, EPLB_EINVAL,
                              "num_layers %u x num_physical_experts %u is too large",
                              s->num_layers, s->num_physical);
    return EPLB_OK;
}

bool eplb_policy_is_hierarchical(const eplb_policy_shape *s) {
    return s && s->num_nodes != 0 && s->num_groups % s->num_nodes == 0;
}

/* The sizes one layer works with, after choosing the path. */
typedef struct policy_dims {
    uint32_t n_log;           /* N */
    uint32_t n_phy;           /* P */
    uint32_t groups;          /* G, or 1 on the global path */
    uint32_t nodes;           /* num_nodes, or 1 on the global path */
    uint32_t group_size;      /* N / groups */
    uint32_t groups_per_node; /* groups / nodes */
    uint32_t log_per_node;    /* N / nodes */
    uint32_t phy_per_node;    /* P / nodes */
    uint32_t gpus_per_node;   /* num_gpus / nodes */
    uint32_t phy_per_gpu;     /* P / num_gpus */
    uint32_t batch;           /* layers whose replicas are packed together (pack_lanes) */
} policy_dims;

/* Independent packings interleaved by pack_lanes. */
#define PACK_LANES 4

static policy_dims policy_dims_of(const eplb_policy_shape *s) {
    policy_dims d;
    bool hier = eplb_policy_is_hierarchical(s);
    d.n_log = s->num_logical;
    d.n_phy = s->num_physical;
    d.groups = hier ? s->num_groups : 1;
    d.nodes = hier ? s->num_nodes : 1;
    d.group_size = d.n_log / d.groups;
    d.groups_per_node = d.groups / d.nodes;
    d.log_per_node = d.n_log / d.nodes;
    d.phy_per_node = d.n_phy / d.nodes;
    d.gpus_per_node = s->num_gpus / d.nodes;
    d.phy_per_gpu = d.n_phy / s->num_gpus;
    /* Enough layers that PACK_LANES packings (one per node and layer) run
     * side by side, never more layers than there are. */
    d.batch = d.nodes >= PACK_LANES ? 1 : (PACK_LANES + d.nodes - 1) / d.nodes;
    if (d.batch > s->num_layers)
        d.batch = s->num_layers;
    return d;
}

static size_t pow2_at_least(size_t n) {
    size_t m = 1;
    while (m < n) m *= 2;
    return m;
}

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* ---------------------------------------------------------------------------
 * Scratch: one layer's worth, carved from one block, each array aligned for
 * 8-byte elements.
 * ------------------------------------------------------------------------- */

/* An item to order: its weight and its index in its row. */
typedef struct policy_item {
    double w;
    int32_t idx;
} policy_item;

#define RADIX_BUCKETS 256

typedef struct policy_scratch {
    policy_item *items;     /* [max(G, P/nodes)] items being sorted */
    policy_item *tmp;       /* [max(G, P/nodes)] merge sort buffer */
    double *group_w;        /* [G] load of each group */
    double *tok;            /* [N] load of each expert, node-major (mlog) order */
    double *order_w;        /* [batch * P] weight of each replica in visiting order, per layer and node */
    double *gorder_w;       /* [G] weight of each group in visiting order */
    uint64_t *pack_key;     /* [2 * pow2(max(nodes, gpus/node))] pack winner tree */
    uint64_t *rep_key;      /* [2 * pow2(min(N, P - N) / nodes)] replicated-expert tree */
    uint64_t *rkey;         /* [N] radix keys: ascending = heaviest expert first */
    uint64_t *rkey2;        /* [N] radix keys, other buffer */
    uint32_t *fbits;        /* [N] float image of each expert's load */
    uint32_t *hist;         /* [2][256] radix bucket counts / cursors, per half */
    int32_t *ridx;          /* [N] radix payload */
    int32_t *ridx2;         /* [N] radix payload, other buffer */
    int32_t *sorted;        /* [N] per node: its experts (node-local ids), heaviest first */
    int32_t *node_fill;     /* [nodes] fill position per node while splitting */
    int32_t *node_of;       /* [N] node of each node-major id (set once per call) */
    int32_t *mlog2log;      /* [batch * N] logical id of each node-major id, per layer */
    int32_t *gslot;         /* [G] node * groups_per_node + rank of each group */
    int32_t *cnt;           /* [N/nodes] replicas of each node-local expert */
    int32_t *phy2mlog;      /* [batch * P] node-local expert of each replica, per layer and node */
    int32_t *order;         /* [batch * P] replicas in visiting order, per layer and node */
    int32_t *gorder;        /* [G] groups in visiting order */
    int32_t *slot;          /* [batch * P] GPU * P/num_gpus + rank of each replica, per layer and node */
    uint64_t *lane_key;     /* [batch * nodes * 2 * pow2(gpus/node)] pack_lanes' trees (4 interleaved) */
    int32_t *lane_id;       /* [batch * nodes * 2 * pow2(gpus/node)] their ids */
    int32_t *lane_n;        /* [batch * nodes * gpus/node] items in each of their packs */
    int32_t *pack_id;       /* [2 * pow2(max(nodes, gpus/node))] its ids */
    int32_t *pack_n;        /* [max(nodes, gpus/node)] items in each pack */
    int32_t *rep_id;        /* [2 * pow2(min(N, P - N) / nodes)] its ids */
    int32_t *leaf_of;       /* [N/nodes] tree leaf, later slot list head, of each expert */
    int32_t *next_slot;     /* [P/nodes] next redundant slot of the same expert */
} policy_scratch;

/* Lays the arrays out from base (NULL: just measure); returns the bytes. */
static size_t policy_scratch_layout(const policy_dims *d, void *base, policy_scratch *sc) {
    size_t n_items = max_sz(d->groups, d->phy_per_node);
    size_t n_packs = max_sz(d->nodes, d->gpus_per_node);
    size_t pack_leaves = pow2_at_least(n_packs);
    size_t redundant = d->phy_per_node - d->log_per_node;
    size_t rep_leaves = pow2_at_least(redundant < d->log_per_node ? redundant : d->log_per_node);
    char *p = base;
    size_t off = 0;
#define PLACE(field, type, count)                                   \
    do {                                                            \
        if (sc) sc->field = (type *)(void *)(p + off);              \
        off += sizeof(type) * (size_t)(count);                      \
        off = (off + alignof(double) - 1) & ~(alignof(double) - 1); \
    } while (0)
    PLACE(items, policy_item, n_items);
    PLACE(tmp, policy_item, n_items);
    PLACE(group_w, double, d->groups);
    PLACE(tok, double, d->n_log);
    size_t bp = (size_t)d->batch * d->n_phy, chains = (size_t)d->batch * d->nodes;
    size_t lane_leaves = pow2_at_least(d->gpus_per_node);
    PLACE(order_w, double, bp);
    PLACE(gorder_w, double, d->groups);
    PLACE(lane_key, uint64_t, chains * 2 * lane_leaves);
    PLACE(pack_key, uint64_t, 2 * pack_leaves);
    PLACE(rep_key, uint64_t, 2 * rep_leaves);
    PLACE(rkey, uint64_t, d->n_log);
    PLACE(rkey2, uint64_t, d->n_log);
    PLACE(fbits, uint32_t, d->n_log);
    PLACE(hist, uint32_t, 2 * RADIX_BUCKETS);
    PLACE(ridx, int32_t, d->n_log);
    PLACE(ridx2, int32_t, d->n_log);
    PLACE(sorted, int32_t, d->n_log);
    PLACE(node_fill, int32_t, d->nodes);
    PLACE(node_of, int32_t, d->n_log);
    PLACE(mlog2log, int32_t, (size_t)d->batch * d->n_log);
    PLACE(gslot, int32_t, d->groups);
    PLACE(cnt, int32_t, d->log_per_node);
    PLACE(phy2mlog, int32_t, bp);
    PLACE(order, int32_t, bp);
    PLACE(gorder, int32_t, d->groups);
    PLACE(slot, int32_t, bp);
    PLACE(lane_id, int32_t, chains * 2 * lane_leaves);
    PLACE(lane_n, int32_t, chains * d->gpus_per_node);
    PLACE(pack_id, int32_t, 2 * pack_leaves);
    PLACE(pack_n, int32_t, n_packs);
    PLACE(rep_id, int32_t, 2 * rep_leaves);
    PLACE(leaf_of, int32_t, d->log_per_node);
    PLACE(next_slot, int32_t, d->phy_per_node);
#undef PLACE
    return off;
}

size_t eplb_policy_scratch_size(const eplb_policy_shape *s) {
    if (eplb_policy_check(s, NULL) != EPLB_OK)
        return 0;
    policy_dims d = policy_dims_of(s);
    return policy_scratch_layout(&d, NULL, NULL);
}

/* ---------------------------------------------------------------------------
 * Ordering: descending weight, ties by ascending index.
 * ------------------------------------------------------------------------- */

static inline bool item_before(const policy_item *a, const policy_item *b) {
    return a->w > b->w || (a->w == b->w && a->idx < b->idx);
}

#define SORT_RUN 16

/* Sorts a[0..n) by item_before (a total order) using tmp[0..n): insertion
 * sorted runs, then bottom-up merges.  For the few items that need it: the
 * groups, and the replicated experts or their replicas. */
static void sort_items(policy_item *a, policy_item *tmp, size_t n) {
    for (size_t lo = 0; lo < n; lo += SORT_RUN) {
        size_t hi = lo + SORT_RUN < n ? lo + SORT_RUN : n;
        for (size_t i = lo + 1; i < hi; i++) {
            policy_item x = a[i];
            size_t j = i;
            while (j > lo && item_before(&x, &a[j - 1])) {
                a[j] = a[j - 1];
                j--;
            }
            a[j] = x;
        }
    }
    policy_item *src = a, *dst = tmp;
    for (size_t width = SORT_RUN; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = item_before(&src[j], &src[i]) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        policy_item *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof *a);
}

static inline unsigned bit_width64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return x ? 64u - (unsigned)__builtin_clzll(x) : 0u;
#else
    unsigned n = 0;
    while (x) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

/* The passes of a stable LSD radix sort of key[0..n) on bits
 * [base, base + span) (span >= 1), in digits of at most 8 bits.  With idx
 * NULL the keys carry their own payload (packed); otherwise idx[] moves along
 * with them.  Returns the array (sc->rkey or sc->rkey2) that holds the sorted
 * keys, and sets *idx_out likewise.
 *
 * Each pass counts and scatters the two halves of the array with their own
 * bucket cursors (the second half's start where the first half's end), so
 * the two chains of cursor increments overlap instead of queueing. */
static uint64_t *radix_passes(uint32_t n, unsigned base, unsigned span, int32_t *idx,
                              int32_t **idx_out, policy_scratch *sc) {
    uint64_t *key = sc->rkey, *key2 = sc->rkey2;
    int32_t *idx2 = idx == sc->ridx ? sc->ridx2 : sc->ridx;
    unsigned passes = (span + 7) / 8, digit = (span + passes - 1) / passes;
    uint32_t buckets = (uint32_t)1 << digit, dmask = buckets - 1;
    uint32_t half = n / 2;
    uint32_t *h0 = sc->hist, *h1 = h0 + buckets; /* first half's, second half's counts */
    for (unsigned p = 0; p < passes; p++) {
        unsigned shift = base + p * digit;
        memset(h0, 0, 2 * (size_t)buckets * sizeof *h0);
        for (uint32_t i = 0; i < half; i++) {
            h0[(key[i] >> shift) & dmask]++;
            h1[(key[half + i] >> shift) & dmask]++;
        }
        for (uint32_t i = 2 * half; i < n; i++)
            h1[(key[i] >> shift) & dmask]++;
        uint32_t sum = 0;
        for (uint32_t b = 0; b < buckets; b++) {
            uint32_t c0 = h0[b], c1 = h1[b];
            h0[b] = sum;
            h1[b] = sum + c0;
            sum += c0 + c1;
        }
        if (!idx) {
            for (uint32_t i = 0; i < half; i++) {
                uint64_t k0 = key[i], k1 = key[half + i];
                key2[h0[(k0 >> shift) & dmask]++] = k0;
                key2[h1[(k1 >> shift) & dmask]++] = k1;
            }
            for (uint32_t i = 2 * half; i < n; i++)
                key2[h1[(key[i] >> shift) & dmask]++] = key[i];
        } else {
            for (uint32_t i = 0; i < half; i++) {
                uint32_t a0 = h0[(key[i] >> shift) & dmask]++;
                uint32_t a1 = h1[(key[half + i] >> shift) & dmask]++;
                key2[a0] = key[i];
                idx2[a0] = idx[i];
                key2[a1] = key[half + i];
                idx2[a1] = idx[half + i];
            }
            for (uint32_t i = 2 * half; i < n; i++) {
                uint32_t a = h1[(key[i] >> shift) & dmask]++;
                key2[a] = key[i];
                idx2[a] = idx[i];
            }
            int32_t *ti = idx;
            idx = idx2;
            idx2 = ti;
        }
        uint64_t *tk = key;
        key = key2;
        key2 = tk;
    }
    if (idx_out)
        *idx_out = idx;
    return key;
}

/* Writes to out[0..n) the positions of sc->rkey[0..n) in ascending key
 * order, equal keys in ascending position: a radix sort over only the bits
 * that differ between keys.  When those bits and the position fit one uint64
 * they travel as one word; otherwise key and position move side by side.
 * Clobbers sc->rkey. */
static void radix_sort_keys(uint32_t n, int32_t *out, policy_scratch *sc) {
    uint64_t *key = sc->rkey;
    uint64_t all_or = 0, all_and = ~(uint64_t)0;
    for (uint32_t i = 0; i < n; i++) {
        all_or |= key[i];
        all_and &= key[i];
    }
    uint64_t differ = all_or ^ all_and;
    if (differ == 0) {
        for (uint32_t i = 0; i < n; i++)
            out[i] = (int32_t)i;
        return;
    }
    unsigned lo = eplb_ctz64(differ), span = bit_width64(differ) - lo;
    unsigned pos_bits = bit_width64(n - 1);
    if (span + pos_bits <= 64) {
        uint64_t mask = span == 64 ? ~(uint64_t)0 : (((uint64_t)1 << span) - 1);
        for (uint32_t i = 0; i < n; i++)
            key[i] = (((key[i] >> lo) & mask) << pos_bits) | i;
        uint64_t *sorted = radix_passes(n, pos_bits, span, NULL, NULL, sc);
        uint64_t pmask = ((uint64_t)1 << pos_bits) - 1;
        for (uint32_t i = 0; i < n; i++)
            out[i] = (int32_t)(sorted[i] & pmask);
    } else {
        int32_t *idx;
        for (uint32_t i = 0; i < n; i++)
            sc->ridx[i] = (int32_t)i;
        radix_passes(n, lo, span, sc->ridx, &idx, sc);
        memcpy(out, idx, (size_t)n * sizeof *out);
    }
}

/* ---------------------------------------------------------------------------
 * Winner tree: the least (key, id) of M leaves (M a power of two) is found at
 * the root; updating a leaf replays its path in log2(M) steps.  Keys are
 * uint64 images of doubles (below) so that every step is integer compares and
 * conditional moves, with no branch to mispredict.  TREE_ABSENT marks an
 * absent leaf (above every image, below UINT64_MAX).
 * ------------------------------------------------------------------------- */

#define TREE_ABSENT (UINT64_MAX - 1)

static inline uint64_t double_bits(double w) {
    uint64_t bits;
    memcpy(&bits, &w, sizeof bits);
    return bits;
}

/* Tree key ordering like w >= 0 (lighter first); +inf maps below TREE_ABSENT. */
static inline uint64_t key_ascending(double w) { return double_bits(w); }

/* Tree key ordering like -w for w >= 0 (heavier first). */
static inline uint64_t key_descending(double w) {
    return (uint64_t)0x7FFFFFFFFFFFFFFF - double_bits(w);
}

typedef struct winner_tree {
    uint64_t *key; /* [2M] key of the winner at each node; leaves at M..2M */
    int32_t *id;   /* [2M] id of the winner at each node */
    size_t leaves; /* M */
} winner_tree;

/* Leaves 0..n get key live and id = leaf index, the others are absent.  The
 * live leaves are a prefix with equal keys and rising ids, so the left child
 * wins at every inner node. */
static void tree_init(winner_tree *t, size_t n, uint64_t live) {
    size_t M = t->leaves;
    for (size_t i = 0; i < M; i++) {
        t->key[M + i] = i < n ? live : TREE_ABSENT;
        t->id[M + i] = (int32_t)i;
    }
    for (size_t i = M - 1; i >= 1; i--) {
        t->key[i] = t->key[2 * i];
        t->id[i] = t->id[2 * i];
    }
}

/* Sets leaf's key to k and replays its path to the root, for a tree whose ids
 * are the leaf indices (the lower leaf wins a tie); returns the new winner
 * and stores its key in *root_key.  A left sibling (i odd) wins ties, so it
 * wins when ks < k + 1; keys stay below UINT64_MAX, so k + 1 cannot wrap.
 * About three dependent instructions per level. */
static inline int32_t tree_update_leaf(winner_tree *t, size_t leaf, uint64_t k,
                                       uint64_t *root_key) {
    size_t i = t->leaves + leaf;
    int32_t id = (int32_t)leaf;
    t->key[i] = k;
    while (i > 1) {
        size_t sib = i ^ 1;
        uint64_t ks = t->key[sib];
        int32_t is = t->id[sib];
        bool win = ks < k + (i & 1);
        k = win ? ks : k;
        id = win ? is : id;
        i >>= 1;
        t->key[i] = k;
        t->id[i] = id;
    }
    *root_key = k;
    return id;
}

/* Sets leaf's (key, id) to (k, id) and replays its path to the root, for a
 * tree whose ids are not in leaf order: the least (key, id) wins. */
static inline void tree_update_lex(winner_tree *t, size_t leaf, uint64_t k, int32_t id) {
    size_t i = t->leaves + leaf;
    t->key[i] = k;
    t->id[i] = id;
    while (i > 1) {
        size_t sib = i ^ 1;
        uint64_t ks = t->key[sib];
        int32_t is = t->id[sib];
        bool win = (ks < k) | ((ks == k) & (is < id));
        k = win ? ks : k;
        id = win ? is : id;
        i >>= 1;
        t->key[i] = k;
        t->id[i] = id;
    }
}

/* ---------------------------------------------------------------------------
 * The experts of a layer, heaviest first
 * ------------------------------------------------------------------------- */

#define FIXUP_RUN_MAX 64

/* The bit image of (float)w for w >= 0: rounding to float is monotone, and
 * so is the bit pattern of a non-negative float. */
static inline uint32_t float_image(double w) {
    float f = (float)w;
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* Writes to out[0..n) the indices of tok[0..n) (>= 0) in descending order,
 * equal values in ascending index.  fb[i] = float_image(tok[i]); fmin and fmax
 * are their least and greatest (the caller computes them as it fills tok).
 *
 * First a radix sort (two 8-bit passes) on a 16-bit coarse key: the float
 * image measured down from the largest and scaled to 16 bits, which keeps
 * about 11 bits of relative precision across the range (loads spread over
 * several octaves).  The coarse key never orders two values against their
 * exact order, so only a run of equal coarse keys can be out of order; the
 * runs that are get insertion-sorted on the exact doubles.  A long unsorted
 * run (many values within about 1/2048 of each other) falls back to an exact
 * radix sort on the doubles' bits, so the worst case stays O(n). */
static void sort_experts(const double *tok, const uint32_t *fb, uint32_t fmin, uint32_t fmax,
                         uint32_t n, int32_t *out, policy_scratch *sc) {
    bool inversion = false;
    unsigned width = bit_width64(fmax - fmin);
    unsigned shift = width > 16 ? width - 16 : 0;
    if (width == 0) { /* every value has the same float image */
        for (uint32_t i = 0; i < n; i++)
            out[i] = (int32_t)i;
        inversion = true; /* check them all */
    } else {
        /* (coarse key, smaller = heavier) above the position */
        unsigned pos_bits = bit_width64(n - 1);
        for (uint32_t i = 0; i < n; i++)
            sc->rkey[i] = ((uint64_t)((fmax - fb[i]) >> shift) << pos_bits) | i;
        uint64_t *sorted = radix_passes(n, pos_bits, width - shift, NULL, NULL, sc);
        uint64_t pmask = ((uint64_t)1 << pos_bits) - 1;
        double prev = INFINITY;
        for (uint32_t i = 0; i < n; i++) {
            int32_t e = (int32_t)(sorted[i] & pmask);
            out[i] = e;
            inversion |= tok[e] > prev;
            prev = tok[e];
        }
    }
    if (!inversion)
        return;

    /* An inversion can only sit inside a run of equal coarse keys: find each
     * one, widen it to its run, sort the run. */
    for (uint32_t j = 1; j < n; j++) {
        if (!(tok[out[j]] > tok[out[j - 1]]))
            continue;
        uint32_t coarse = (fmax - fb[out[j]]) >> shift, lo = j - 1, hi = j + 1;
        while (lo > 0 && ((fmax - fb[out[lo - 1]]) >> shift) == coarse)
            lo--;
        while (hi < n && ((fmax - fb[out[hi]]) >> shift) == coarse)
            hi++;
        if (hi - lo > FIXUP_RUN_MAX) {
            for (uint32_t k = 0; k < n; k++)
                sc->rkey[k] = key_descending(tok[k]);
            radix_sort_keys(n, out, sc);
            return;
        }
        for (uint32_t k = lo + 1; k < hi; k++) { /* stable: equal values keep index order */
            int32_t x = out[k];
            uint32_t m = k;
            while (m > lo && tok[x] > tok[out[m - 1]]) {
                out[m] = out[m - 1];
                m--;
            }
            out[m] = x;
        }
        j = hi; /* the next run starts strictly lighter */
    }
}

/* ---------------------------------------------------------------------------
 * balanced_packing
 * ------------------------------------------------------------------------- */

/* The greedy on items already in visiting order: order[k] is the k-th item
 * visited, w[k] its weight.  m packs of n/m items, n/m > 1.  Writes
 * slot[item] = pack * (n/m) + rank in pack.  A pack's load lives in its tree
 * leaf (key_ascending is the double's bit pattern), so the loop carries the
 * lightest pack and its load in registers. */
static void pack_in_order(const int32_t *order, const double *w, uint32_t n, uint32_t m,
                          int32_t *slot, policy_scratch *sc) {
    int32_t per_pack = (int32_t)(n / m);
    int32_t *cnt = sc->pack_n;
    winner_tree t = {sc->pack_key, sc->pack_id, pow2_at_least(m)};
    for (uint32_t p = 0; p < m; p++)
        cnt[p] = 0;
    tree_init(&t, m, key_ascending(0.0));
    int32_t p = 0;                      /* the lightest pack with room, lowest first */
    uint64_t pk = key_ascending(0.0);   /* its load */
    for (uint32_t k = 0; k < n; k++) {
        int32_t c = cnt[p];
        slot[order[k]] = p * per_pack + c;
        cnt[p] = c + 1;
        double load;
        memcpy(&load, &pk, sizeof load);
        uint64_t full = (uint64_t)0 - (uint64_t)(c + 1 == per_pack);
        uint64_t key = (TREE_ABSENT & full) | (key_ascending(load + w[k]) & ~full);
        p = tree_update_leaf(&t, (size_t)p, key, &pk);
    }
}

#if defined(__GNUC__) || defined(__clang__)
#define POLICY_NOINLINE __attribute__((noinline))
#else
#define POLICY_NOINLINE
#endif

/* One winner-tree level for a lane: if the sibling (ks, is) beats (k, id),
 * i.e. ks < kt where kt = k + 1 for a left sibling (it wins ties) and k for a
 * right one, take it.  Two conditional moves on x86-64 (gcc turns a ?: here
 * into a jump, and a mask select costs more instructions). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(EPLB_POLICY_PORTABLE)
static inline void lane_step(uint64_t ks, int32_t is, uint64_t kt, uint64_t *k, int32_t *id) {
    uint64_t kv = *k;
    int32_t iv = *id;
    __asm__("cmpq %[kt], %[ks]\n\t"
            "cmovbq %[ks], %[kv]\n\t"
            "cmovbl %[is], %[iv]"
            : [kv] "+r"(kv), [iv] "+r"(iv)
            : [ks] "r"(ks), [is] "r"(is), [kt] "r"(kt)
            : "cc");
    *k = kv;
    *id = iv;
}
#else
/* c ? a : b without a branch: a plain ?: in a winner tree's replay is compiled
 * to a jump on a comparison of pack loads, a coin toss for the predictor, and
 * each miss would also throw away the other lanes' work in flight. */
static inline uint64_t select_u64(bool c, uint64_t a, uint64_t b) {
    uint64_t m = (uint64_t)0 - (uint64_t)c;
    return (a & m) | (b & ~m);
}

static inline int32_t select_i32(bool c, int32_t a, int32_t b) {
    uint32_t m = (uint32_t)0 - (uint32_t)c;
    return (int32_t)(((uint32_t)a & m) | ((uint32_t)b & ~m));
}

static inline void lane_step(uint64_t ks, int32_t is, uint64_t kt, uint64_t *k, int32_t *id) {
    bool win = ks < kt;
    *k = select_u64(win, ks, *k);
    *id = select_i32(win, is, *id);
}
#endif

/* pack_in_order for PACK_LANES independent packings at once, each of n items
 * into m packs (n/m > 1): lane c packs order[c][0..n) with weights w[c][]
 * into slot[c][].  The lanes' winner trees are interleaved: node x of lane c
 * at key[x * PACK_LANES + c] and id[...] (2M nodes, M leaves), as are their
 * pack counts (cnt[pack * PACK_LANES + c]).
 *
 * One packing is a single chain of dependent steps: an item's pack is known
 * only once the previous item's tree replay is done (tens of cycles, most of
 * a layer's time).  Here the lanes advance together, item by item and tree
 * level by level (all the trees have the same depth), with no data-dependent
 * branch, so the core overlaps their chains.  Each lane computes exactly
 * what pack_in_order computes.  Not inlined: on its own it keeps the lanes
 * in registers. */
static POLICY_NOINLINE void pack_lanes(int32_t *const order[], double *const w[], uint32_t n,
                                       uint32_t m, int32_t *const slot[], uint64_t *key,
                                       int32_t *id, int32_t *cnt) {
    enum { NL = PACK_LANES };
    size_t M = pow2_at_least(m);
    unsigned depth = bit_width64(M) - 1;
    int32_t per_pack = (int32_t)(n / m);
    /* The first items go one per pack, in pack order, while each weighs
     * more than 0: an empty pack (load 0, the lower index first) beats
     * every pack holding one.  Those m of the n items need no tree replay
     * (1 node x 32 GPUs at DeepSeek-V3 size: 32 of 288), and the tree is
     * built once from its leaves after them; a winner tree's nodes are a
     * function of its leaves, so the replays that follow see the same tree. */
    uint32_t n0 = m;
    for (uint32_t c = 0; c < NL; c++)
        for (uint32_t k = 0; k < n0; k++)
            if (!(w[c][k] > 0)) {
                n0 = k + 1; /* item k still goes to pack k; the next may not */
                break;
            }
    for (size_t q = 0; q < (size_t)m * NL; q++)
        cnt[q] = 0;
    for (size_t x = 0; x < M; x++)
        for (uint32_t c = 0; c < NL; c++) {
            key[(M + x) * NL + c] = x < n0 ? key_ascending(0.0 + w[c][x]) : x < m ? key_ascending(0.0) : TREE_ABSENT;
            id[(M + x) * NL + c] = (int32_t)x;
        }
    for (uint32_t k = 0; k < n0; k++)
        for (uint32_t c = 0; c < NL; c++) {
            slot[c][order[c][k]] = (int32_t)k * per_pack; /* per_pack > 1: not full */
            cnt[(size_t)k * NL + c] = 1;
        }
    for (size_t x = M - 1; x >= 1; x--) /* each node the lighter child, the left one on ties */
        for (uint32_t c = 0; c < NL; c++) {
            const size_t l = 2 * x * NL + c, r = (2 * x + 1) * NL + c, t = key[r] < key[l] ? r : l;
            key[x * NL + c] = key[t];
            id[x * NL + c] = id[t];
        }
    int32_t p[NL];    /* each lane's lightest pack with room */
    uint64_t pk[NL];  /* its load */
    for (uint32_t c = 0; c < NL; c++) {
        p[c] = id[NL + c];
        pk[c] = key[NL + c];
    }
    for (uint32_t k = n0; k < n; k++) {
        uint64_t kk[NL];
        int32_t ii[NL];
        size_t pos[NL];
        for (uint32_t c = 0; c < NL; c++) {
            int32_t *cn = cnt + (size_t)p[c] * NL + c;
            int32_t cc = *cn;
            slot[c][order[c][k]] = p[c] * per_pack + cc;
            *cn = cc + 1;
            double load;
            memcpy(&load, &pk[c], sizeof load);
            uint64_t full = (uint64_t)0 - (uint64_t)(cc + 1 == per_pack);
            kk[c] = (TREE_ABSENT & full) | (key_ascending(load + w[c][k]) & ~full);
            ii[c] = p[c];
            pos[c] = M + (size_t)p[c];
            key[pos[c] * NL + c] = kk[c];
        }
        for (unsigned lvl = 0; lvl < depth; lvl++) {
            for (uint32_t c = 0; c < NL; c++) {
                size_t i = pos[c], sib = (i ^ 1) * NL + c;
                lane_step(key[sib], id[sib], kk[c] + (i & 1), &kk[c], &ii[c]);
                i >>= 1;
                key[i * NL + c] = kk[c];
                id[i * NL + c] = ii[c];
                pos[c] = i;
            }
        }
        for (uint32_t c = 0; c < NL; c++) {
            p[c] = ii[c];
            pk[c] = kk[c];
        }
    }
}

/* balanced_packing of w[0..n) into m packs (m divides n), for the groups:
 * slot[i] = pack * (n/m) + rank in pack. */
static void balanced_packing(const double *w, uint32_t n, uint32_t m, int32_t *slot,
                             policy_scratch *sc) {
    if (n / m == 1) {
        for (uint32_t i = 0; i < n; i++)
            slot[i] = (int32_t)i;
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        sc->items[i].w = w[i];
        sc->items[i].idx = (int32_t)i;
    }
    sort_items(sc->items, sc->tmp, n);
    for (uint32_t k = 0; k < n; k++) {
        sc->gorder[k] = sc->items[k].idx;
        sc->gorder_w[k] = sc->items[k].w;
    }
    pack_in_order(sc->gorder, sc->gorder_w, n, m, slot, sc);
}

/* ---------------------------------------------------------------------------
 * replicate_experts and the replicas' visiting order, one node
 * ------------------------------------------------------------------------- */

/* Replicates n_log experts with loads tok[] into n_phy slots.  sorted[] holds
 * the experts heaviest first (ties: lower id first).  Writes phy2mlog[n_phy]
 * and cnt[n_log]; returns how many experts were replicated, which are exactly
 * sorted[0..returned).
 *
 * The best expert not yet replicated is always the next one in sorted[]; the
 * replicated ones (tree leaf j = sorted[j]) sit in a winner tree keyed by
 * (heavier load / count first, lower id first).  Each redundant slot takes the
 * better of the two. */
static uint32_t replicate_experts(const double *tok, const int32_t *sorted, uint32_t n_log,
                                  uint32_t n_phy, int32_t *phy2mlog, int32_t *cnt,
                                  policy_scratch *sc) {
    for (uint32_t e = 0; e < n_log; e++) {
        phy2mlog[e] = (int32_t)e;
        cnt[e] = 1;
    }
    if (n_phy == n_log)
        return 0;
    uint32_t redundant = n_phy - n_log;
    winner_tree t = {sc->rep_key, sc->rep_id,
                     pow2_at_least(redundant < n_log ? redundant : n_log)};
    tree_init(&t, 0, TREE_ABSENT);
    int32_t *leaf_of = sc->leaf_of; /* [n_log], valid for replicated experts */
    uint32_t next = 0;
    for (uint32_t i = n_log; i < n_phy; i++) {
        int32_t e;
        uint64_t best_r = t.key[1];
        int32_t r = t.id[1];
        if (next == n_log) {
            e = r;
        } else {
            int32_t u = sorted[next];
            uint64_t best_u = key_descending(tok[u]);
            if (best_r < best_u || (best_r == best_u && r < u)) {
                e = r;
            } else {
                e = u;
                leaf_of[e] = (int32_t)next++;
            }
        }
        phy2mlog[i] = e;
        cnt[e]++;
        tree_update_lex(&t, (size_t)leaf_of[e], key_descending(tok[e] / (double)cnt[e]), e);
    }
    return next;
}

/* Fills order[0..n_phy) with the node's replicas in descending weight
 * tok[e] / cnt[e] (ties: lower replica index first) and order_w[] with their
 * weights.
 *
 * The unreplicated experts sorted[n_rep..n_log) are already in that order
 * (an expert's only replica has index e).  The replicated experts are sorted
 * by their new weight and each expands into its replicas: index e first, then
 * its redundant slots ascending.  That is their order unless two replicated
 * experts tie on weight (their replicas then interleave by index), in which
 * case all their replicas are sorted one by one.  Both lists then merge. */
static void order_replicas(const double *tok, const int32_t *sorted, uint32_t n_rep,
                           uint32_t n_log, uint32_t n_phy, const int32_t *phy2mlog,
                           const int32_t *cnt, int32_t *order, double *order_w,
                           policy_scratch *sc) {
    policy_item *b = sc->items; /* [n_rep + redundant] replicas of replicated experts */
    uint32_t nb = 0;
    policy_item *ex = sc->tmp; /* [n_rep] replicated experts */
    for (uint32_t k = 0; k < n_rep; k++) {
        int32_t e = sorted[k];
        ex[k].w = tok[e] / (double)cnt[e];
        ex[k].idx = e;
    }
    /* Usually few, and sorted[] already leans that way: insertion sort. */
    bool tie = false;
    if (n_rep > 32) {
        sort_items(ex, b, n_rep);
    } else {
        for (uint32_t k = 1; k < n_rep; k++) {
            policy_item x = ex[k];
            uint32_t j = k;
            while (j > 0 && item_before(&x, &ex[j - 1])) {
                ex[j] = ex[j - 1];
                j--;
            }
            ex[j] = x;
        }
    }
    for (uint32_t k = 1; k < n_rep; k++)
        tie |= ex[k].w == ex[k - 1].w;

    if (!tie) {
        int32_t *head = sc->leaf_of, *next = sc->next_slot; /* slot lists per expert */
        for (uint32_t k = 0; k < n_rep; k++)
            head[ex[k].idx] = -1;
        for (uint32_t i = n_phy; i-- > n_log;) {
            int32_t e = phy2mlog[i];
            next[i] = head[e];
            head[e] = (int32_t)i;
        }
        for (uint32_t k = 0; k < n_rep; k++) {
            b[nb++] = ex[k];
            for (int32_t i = head[ex[k].idx]; i >= 0; i = next[i]) {
                b[nb].w = ex[k].w;
                b[nb++].idx = i;
            }
        }
    } else {
        for (uint32_t k = 0; k < n_rep; k++)
            b[nb++] = ex[k];
        for (uint32_t i = n_log; i < n_phy; i++) {
            int32_t e = phy2mlog[i];
            b[nb].w = tok[e] / (double)cnt[e];
            b[nb++].idx = (int32_t)i;
        }
        sort_items(b, sc->tmp, nb);
    }

    uint32_t ia = n_rep, ib = 0, k = 0;
    while (ia < n_log && ib < nb) {
        policy_item a = {tok[sorted[ia]], sorted[ia]};
        if (item_before(&b[ib], &a)) {
            order[k] = b[ib].idx;
            order_w[k++] = b[ib++].w;
        } else {
            order[k] = a.idx;
            order_w[k++] = a.w;
            ia++;
        }
    }
    for (; ia < n_log; ia++, k++) {
        order[k] = sorted[ia];
        order_w[k] = tok[sorted[ia]];
    }
    for (; ib < nb; ib++, k++) {
        order[k] = b[ib].idx;
        order_w[k] = b[ib].w;
    }
}

/* ---------------------------------------------------------------------------
 * rebalance
 * ------------------------------------------------------------------------- */

/* While every load is below 2^33, a group of at most 2^20 of them sums below
 * 2^53, so every running sum is an exact double and an integer sum equals the
 * reference's sequential double sum. */
#define GROUP_SUM_MASK (((int64_t)1 << 33) - 1)

/* One layer, all but packing its replicas onto GPUs: load [N] -> logcnt [N],
 * and for batch slot b its node-major relabelling (mlog2log), and per node
 * its replicas (phy2mlog) and their visiting order (order, order_w) for
 * pack_lanes; with one slot per GPU there is nothing to pack, and out [P] is
 * written here.  Returns false, having written nothing, when a load is
 * negative. */
static bool prepare_layer(const policy_dims *d, const int64_t *load, int32_t *out,
                          int32_t *logcnt, policy_scratch *sc, uint32_t b) {
    int32_t *mlog2log = sc->mlog2log + (size_t)b * d->n_log;
    size_t bp = (size_t)b * d->n_phy;
    /* Step 1: groups onto nodes; node-major relabelling.  (The group sums
     * also catch a negative load.) */
    int64_t any = 0;
    for (uint32_t g = 0; g < d->groups; g++) {
        const int64_t *gl = load + (size_t)g * d->group_size;
        int64_t sum = 0;
        for (uint32_t j = 0; j < d->group_size; j++) {
            sum += gl[j] & GROUP_SUM_MASK; /* masked: cannot overflow */
            any |= gl[j];
        }
        sc->group_w[g] = (double)sum;
    }
    if (any < 0)
        return false;
    if (any > GROUP_SUM_MASK) {
        /* Some load is 2^33 or more, so a group's running sum may pass 2^53
         * and round: add as the reference does, in double, in order. */
        for (uint32_t g = 0; g < d->groups; g++) {
            const int64_t *gl = load + (size_t)g * d->group_size;
            double sum = 0.0;
            for (uint32_t j = 0; j < d->group_size; j++)
                sum += (double)gl[j];
            sc->group_w[g] = sum;
        }
    }
    balanced_packing(sc->group_w, d->groups, d->nodes, sc->gslot, sc);
    for (uint32_t g = 0; g < d->groups; g++) {
        size_t base = (size_t)sc->gslot[g] * d->group_size;
        for (uint32_t j = 0; j < d->group_size; j++)
            mlog2log[base + j] = (int32_t)(g * d->group_size + j);
    }

    /* All experts heaviest first (ties: lower mlog first), split by node
     * keeping that order, as node-local ids. */
    uint32_t fmin = UINT32_MAX, fmax = 0;
    for (uint32_t m = 0; m < d->n_log; m++) {
        double t = (double)load[mlog2log[m]];
        uint32_t b = float_image(t);
        sc->tok[m] = t;
        sc->fbits[m] = b;
        fmin = b < fmin ? b : fmin;
        fmax = b > fmax ? b : fmax;
    }
    sort_experts(sc->tok, sc->fbits, fmin, fmax, d->n_log, sc->sorted, sc);
    if (d->nodes > 1) {
        /* sorted[] -> per node, stable; ridx2 as the staging copy. */
        int32_t *all = sc->ridx2;
        memcpy(all, sc->sorted, (size_t)d->n_log * sizeof *all);
        for (uint32_t node = 0; node < d->nodes; node++)
            sc->node_fill[node] = (int32_t)(node * d->log_per_node);
        for (uint32_t k = 0; k < d->n_log; k++) {
            int32_t m = all[k], node = sc->node_of[m];
            sc->sorted[sc->node_fill[node]++] = m - node * (int32_t)d->log_per_node;
        }
    }

    for (uint32_t node = 0; node < d->nodes; node++) {
        const int32_t *m2l = mlog2log + (size_t)node * d->log_per_node;
        const double *tok = sc->tok + (size_t)node * d->log_per_node;
        const int32_t *sorted = sc->sorted + (size_t)node * d->log_per_node;
        size_t at = bp + (size_t)node * d->phy_per_node;
        int32_t *phy2mlog = sc->phy2mlog + at;

        /* Step 2: replicas within the node. */
        uint32_t n_rep = replicate_experts(tok, sorted, d->log_per_node, d->phy_per_node,
                                           phy2mlog, sc->cnt, sc);

        /* Step 3 (the packing is pack_lanes'): replicas onto the node's GPUs. */
        if (d->phy_per_gpu == 1) {
            int32_t *node_out = out + (size_t)node * d->phy_per_node;
            for (uint32_t p = 0; p < d->phy_per_node; p++)
                node_out[p] = m2l[phy2mlog[p]];
        } else {
            order_replicas(tok, sorted, n_rep, d->log_per_node, d->phy_per_node, phy2mlog,
                           sc->cnt, sc->order + at, sc->order_w + at, sc);
        }
        for (uint32_t k = 0; k < d->log_per_node; k++)
            logcnt[m2l[k]] = sc->cnt[k];
    }
    return true;
}

/* Steps 3 and 4 for the nb layers prepared in batch slots 0..nb: pack every
 * (layer, node)'s replicas onto its GPUs, PACK_LANES packings at a time, and
 * map them back to logical ids into out [nb][P]. */
static void finish_layers(const policy_dims *d, uint32_t nb, int32_t *out, policy_scratch *sc) {
    if (d->phy_per_gpu == 1)
        return;
    uint32_t chains = nb * d->nodes, ppn = d->phy_per_node, m = d->gpus_per_node;
    size_t tree = 2 * pow2_at_least(m);
    uint32_t c0 = 0;
    for (; c0 + PACK_LANES <= chains; c0 += PACK_LANES) {
        int32_t *order[PACK_LANES], *slot[PACK_LANES];
        double *w[PACK_LANES];
        for (uint32_t c = 0; c < PACK_LANES; c++) {
            size_t at = (size_t)(c0 + c) * ppn; /* chain = layer * nodes + node */
            order[c] = sc->order + at;
            w[c] = sc->order_w + at;
            slot[c] = sc->slot + at;
        }
        pack_lanes(order, w, ppn, m, slot, sc->lane_key + c0 * tree, sc->lane_id + c0 * tree,
                   sc->lane_n + (size_t)c0 * m);
    }
    for (; c0 < chains; c0++) { /* the rest one by one */
        size_t at = (size_t)c0 * ppn;
        pack_in_order(sc->order + at, sc->order_w + at, ppn, m, sc->slot + at, sc);
    }
    for (uint32_t b = 0; b < nb; b++) {
        const int32_t *mlog2log = sc->mlog2log + (size_t)b * d->n_log;
        for (uint32_t node = 0; node < d->nodes; node++) {
            const int32_t *m2l = mlog2log + (size_t)node * d->log_per_node;
            size_t at = (size_t)b * d->n_phy + (size_t)node * ppn;
            const int32_t *slot = sc->slot + at, *phy2mlog = sc->phy2mlog + at;
            int32_t *node_out = out + (size_t)b * d->n_phy + (size_t)node * ppn;
            for (uint32_t p = 0; p < ppn; p++)
                node_out[slot[p]] = m2l[phy2mlog[p]];
        }
    }
}

eplb_status eplb_policy_rebalance_scratch(const eplb_policy_shape *s, const int64_t *logical_load,
                                          int32_t *phy2log, int32_t *logcnt, void *scratch,
                                          size_t scratch_size, eplb_error *err) {
    eplb_status st = eplb_policy_check(s, err);
    if (st != EPLB_OK)
        return st;
    if (!logical_load || !phy2log || !logcnt)
        return eplb_error_set(err, EPLB_EINVAL, "rebalance: %s is NULL",
                              !logical_load ? "logical_load" : !phy2log ? "phy2log" : "logcnt");
    policy_dims d = policy_dims_of(s);
    size_t need = policy_scratch_layout(&d, NULL, NULL);
    if (!scratch || scratch_size < need)
        return eplb_error_set(err, EPLB_EINVAL, "rebalance: scratch is %zu bytes; needs %zu",
                              scratch ? scratch_size : (size_t)0, need);
    if (((uintptr_t)scratch & (alignof(double) - 1)) != 0)
        return eplb_error_set(err, EPLB_EINVAL, "rebalance: scratch is not aligned for double");
    policy_scratch sc;
    policy_scratch_layout(&d, scratch, &sc);
    for (uint32_t node = 0; node < d.nodes; node++)
        for (uint32_t k = 0; k < d.log_per_node; k++)
            sc.node_of[node * d.log_per_node + k] = (int32_t)node;

    for (uint32_t l0 = 0; l0 < s->num_layers; l0 += d.batch) {
        uint32_t nb = s->num_layers - l0 < d.batch ? s->num_layers - l0 : d.batch;
        for (uint32_t b = 0; b < nb; b++) {
            uint32_t l = l0 + b;
            const int64_t *load = logical_load + (size_t)l * d.n_log;
            if (!prepare_layer(&d, load, phy2log + (size_t)l * d.n_phy,
                               logcnt + (size_t)l * d.n_log, &sc, b)) {
                uint32_t e = 0;
                while (load[e] >= 0) e++;
                return eplb_error_set(err, EPLB_EINVAL,
                                      "logical_load[%u][%u] is %lld; loads must be >= 0", l, e,
                                      (long long)load[e]);
            }
        }
        finish_layers(&d, nb, phy2log + (size_t)l0 * d.n_phy, &sc);
    }
    return EPLB_OK;
}

eplb_status eplb_policy_rebalance(const eplb_policy_shape *s, const int64_t *logical_load,
                                  int32_t *phy2log, int32_t *logcnt, eplb_error *err) {
    eplb_status st = eplb_policy_check(s, err);
    if (st != EPLB_OK)
        return st;
    size_t need = eplb_policy_scratch_size(s);
    void *scratch = eplb_malloc(need);
    if (!scratch)
        return eplb_error_set(err, EPLB_ENOMEM, "rebalance: cannot allocate %zu bytes of scratch",
                              need);
    st = eplb_policy_rebalance_scratch(s, logical_load, phy2log, logcnt, scratch, need, err);
    eplb_free(scratch);
    return st;
}

/* ---------------------------------------------------------------------------
 * preserve_intragpu_slots
 * ------------------------------------------------------------------------- */

#if defined(POLICY_SSE2)
/* One GPU of one layer with k <= 16 slots (DeepSeek-V3: 9), as
 * preserve_gpu_small with the k entries in four SSE2 registers: the entries
 * matching old[s] are one compare and mask extraction per register, and no
 * step branches on the data.  cur[s] is written for every s; the fill pass
 * then overwrites the slots that kept nothing. */
static void preserve_gpu_16(size_t k, const int32_t *old, int32_t *cur) {
    int32_t orig[16] = {0};
    bool same = true;
    for (size_t j = 0; j < k; j++) {
        orig[j] = cur[j];
        same &= cur[j] == old[j];
    }
    if (same)
        return; /* every slot already keeps its expert */
    __m128i o0 = _mm_loadu_si128((const __m128i *)(const void *)orig);
    __m128i o1 = _mm_loadu_si128((const __m128i *)(const void *)(orig + 4));
    __m128i o2 = _mm_loadu_si128((const __m128i *)(const void *)(orig + 8));
    __m128i o3 = _mm_loadu_si128((const __m128i *)(const void *)(orig + 12));
    uint32_t all = ((uint32_t)1 << k) - 1, used = 0, kept = 0;
    for (size_t s = 0; s < k; s++) {
        int32_t v = old[s];
        __m128i vv = _mm_set1_epi32(v);
        uint32_t match =
            (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(o0, vv))) |
            (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(o1, vv))) << 4 |
            (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(o2, vv))) << 8 |
            (uint32_t)_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(o3, vv))) << 12;
        match &= all & ~used;
        used |= match & (0u - match); /* the first unused match */
        kept |= (uint32_t)(match != 0) << s;
        cur[s] = v;
    }
    uint32_t free_slots = ~kept & all, rest = ~used & all;
    while (free_slots) {
        cur[eplb_ctz64(free_slots)] = orig[eplb_ctz64(rest)];
        free_slots &= free_slots - 1;
        rest &= rest - 1;
    }
}
#endif

/* One GPU of one layer with k <= 64 slots: old [k], cur [k] in/out.  Used
 * and kept slots are bit masks. */
static void preserve_gpu_small(size_t k, const int32_t *old, int32_t *cur) {
    int32_t orig[64];
    bool same = true;
    for (size_t j = 0; j < k; j++) {
        orig[j] = cur[j];
        same &= cur[j] == old[j];
    }
    if (same)
        return; /* every slot already keeps its expert */
    uint64_t all = k == 64 ? ~(uint64_t)0 : (((uint64_t)1 << k) - 1);
    uint64_t used = 0, kept = 0;
    for (size_t s = 0; s < k; s++) {
        int32_t v = old[s];
        uint64_t match = 0;
        for (size_t j = 0; j < k; j++)
            match |= (uint64_t)(orig[j] == v) << j;
        match &= ~used;
        if (match) {
            used |= match & (~match + 1);
            kept |= (uint64_t)1 << s;
            cur[s] = v;
        }
    }
    uint64_t free_slots = ~kept & all, rest = ~used & all;
    while (free_slots) {
        cur[eplb_ctz64(free_slots)] = orig[eplb_ctz64(rest)];
        free_slots &= free_slots - 1;
        rest &= rest - 1;
    }
}

/* One GPU of one layer with any k, in O(k) expected time.
 *
 * The spec's "first unused new entry holding old[s]" is, per expert id, the
 * next one of its positions in ascending order: the positions holding each id
 * are chained in ascending order (nxt[]) from a hash table keyed by the id
 * (open addressing, linear probing, Fibonacci hashing; any int32 is a key,
 * -1 included).  Each old slot pops the head of its id's chain; a popped
 * position is marked used by nxt[j] = PRESERVE_USED.  Then the unused
 * positions fill the unkept slots, both ascending, as in the spec.
 *
 * Scratch: orig [k], nxt [k], kept [k], table [cap] with cap a power of two
 * >= 2k (so the table is at most half full and every probe ends). */
typedef struct preserve_bucket {
    int32_t key;  /* expert id */
    int32_t head; /* first unused position holding it, -1 none left; PRESERVE_EMPTY: free */
} preserve_bucket;

#define PRESERVE_EMPTY INT32_MIN
#define PRESERVE_USED (-2)

static inline size_t preserve_hash(int32_t v, unsigned shift) {
    return (size_t)(((uint32_t)v * 0x9E3779B1u) >> shift);
}

static void preserve_gpu(size_t k, const int32_t *old, int32_t *cur, int32_t *orig, int32_t *nxt,
                         unsigned char *kept, preserve_bucket *table, size_t cap, unsigned shift) {
    bool same = true;
    for (size_t j = 0; j < k; j++) {
        orig[j] = cur[j];
        same &= cur[j] == old[j];
    }
    if (same)
        return; /* every slot already keeps its expert */
    size_t mask = cap - 1;
    for (size_t b = 0; b < cap; b++)
        table[b].head = PRESERVE_EMPTY;
    for (size_t j = k; j-- > 0;) {
        int32_t v = orig[j];
        size_t h = preserve_hash(v, shift);
        while (table[h].head != PRESERVE_EMPTY && table[h].key != v)
            h = (h + 1) & mask;
        if (table[h].head == PRESERVE_EMPTY) {
            table[h].key = v;
            nxt[j] = -1;
        } else {
            nxt[j] = table[h].head;
        }
        table[h].head = (int32_t)j;
    }
    for (size_t s = 0; s < k; s++) {
        int32_t v = old[s];
        size_t h = preserve_hash(v, shift);
        while (table[h].head != PRESERVE_EMPTY && table[h].key != v)
            h = (h + 1) & mask;
        int32_t j = table[h].head;
        kept[s] = j >= 0; /* PRESERVE_EMPTY (absent) and -1 (none left) are < 0 */
        if (j >= 0) {
            table[h].head = nxt[j];
            nxt[j] = PRESERVE_USED;
            cur[s] = v;
        }
    }
    size_t j = 0;
    for (size_t s = 0; s < k; s++) {
        if (kept[s]) continue;
        while (nxt[j] == PRESERVE_USED) j++;
        cur[s] = orig[j++];
    }
}

#define PRESERVE_STACK_SLOTS 1024

void eplb_policy_preserve_slots(uint32_t num_layers, uint32_t num_physical, uint32_t num_gpus,
                                const int32_t *old_phy2log, int32_t *new_phy2log) {
    if (num_gpus == 0 || num_physical % num_gpus != 0 || !old_phy2log || !new_phy2log)
        return;
    size_t k = num_physical / num_gpus;
    if (k > EPLB_POLICY_MAX_EXPERTS)
        return;
#if defined(POLICY_SSE2)
    if (k <= 16) {
        for (size_t off = 0; off < (size_t)num_layers * num_physical; off += k)
            preserve_gpu_16(k, old_phy2log + off, new_phy2log + off);
        return;
    }
#endif
    if (k <= 64) {
        for (size_t off = 0; off < (size_t)num_layers * num_physical; off += k)
            preserve_gpu_small(k, old_phy2log + off, new_phy2log + off);
        return;
    }
    size_t cap = pow2_at_least(2 * k);
    unsigned shift = 32 - (bit_width64(cap) - 1);
    preserve_bucket table_stack[2 * PRESERVE_STACK_SLOTS];
    int32_t ints_stack[2 * PRESERVE_STACK_SLOTS];
    unsigned char kept_stack[PRESERVE_STACK_SLOTS];
    preserve_bucket *table = table_stack;
    int32_t *orig = ints_stack;
    unsigned char *kept = kept_stack;
    void *heap = NULL;
    if (k > PRESERVE_STACK_SLOTS) {
        heap = eplb_malloc(cap * sizeof *table + 2 * k * sizeof *orig + k);
        if (!heap)
            return;
        table = heap;
        orig = (int32_t *)(void *)(table + cap);
        kept = (unsigned char *)(orig + 2 * k);
    }
    for (size_t off = 0; off < (size_t)num_layers * num_physical; off += k)
        preserve_gpu(k, old_phy2log + off, new_phy2log + off, orig, orig + k, kept, table, cap,
                     shift);
    eplb_free(heap);
}

/* ---------------------------------------------------------------------------
 * Balancedness
 * ------------------------------------------------------------------------- */

double eplb_policy_balancedness(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                                uint32_t num_gpus, const int64_t *logical_load,
                                const int32_t *phy2log, const int32_t *logcnt, double *layer_out) {
    if (num_gpus == 0 || num_physical % num_gpus != 0 || !logical_load || !phy2log || !logcnt)
        return NAN;
    size_t k = num_physical / num_gpus;
    double sum_mean = 0.0, sum_max = 0.0;
    for (uint32_t l = 0; l < num_layers; l++) {
        const int64_t *load = logical_load + (size_t)l * num_logical;
        const int32_t *map = phy2log + (size_t)l * num_physical;
        const int32_t *cnt = logcnt + (size_t)l * num_logical;
        double total = 0.0, max = 0.0;
        for (uint32_t g = 0; g < num_gpus; g++) {
            double gpu = 0.0;
            for (size_t s = g * k; s < (g + 1) * k; s++) {
                int32_t e = map[s];
                if (e < 0 || (uint32_t)e >= num_logical || cnt[e] <= 0)
                    continue;
                gpu += (double)load[e] / (double)cnt[e];
            }
            total += gpu;
            if (gpu > max) max = gpu;
        }
        double mean = total / (double)num_gpus;
        if (layer_out)
            layer_out[l] = max > 0.0 ? mean / max : 1.0;
        sum_mean += mean;
        sum_max += max;
    }
    return sum_max > 0.0 ? sum_mean / sum_max : 1.0;
}
