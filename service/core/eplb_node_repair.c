/* eplb_node_repair.c -- swap one group between two nodes, then polish (see
 * eplb_node_repair.h).
 *
 * Steps, for one layer:
 *   1. each group's node (a group with replicas on two nodes is left where
 *      it is) and each node's load (sum over its slots of load / count);
 *   2. none when the heaviest node's mean GPU load is within target_max
 *      (changes inside the nodes can get there); else the pair of groups
 *      A (on the heaviest node: no other swap lowers it) and B (another
 *      node) whose swap gives the lowest heaviest-node load, ties to the
 *      lower A then B; none when no swap lowers it;
 *   3. B takes A's slots and A takes B's: each moved expert keeps one
 *      replica, and the slots left over go one at a time to the moved
 *      expert with the heaviest replica (as DeepSeek's replication does);
 *   4. within each node, the moved replicas, heaviest first, go to the
 *      GPU with the lightest load that still has one of the freed slots
 *      (its lowest such slot);
 *   5. INCREMENTAL on this layer alone moves replicas within the nodes
 *      from there, until the layer's max is within target_max.
 * Two binary heaps keep steps 3 and 4 at O(k log k) for k moved slots.
 * Step 2 is O(groups on the heaviest node x groups), at most
 * EPLB_NODE_REPAIR_MAX_PAIRS (a shape with more groups is not repaired),
 * and counted in *work with P, so eplb_next's shared compute bound covers
 * it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_incremental.h"
#include "eplb_node_repair.h"

/* ---- a binary min-heap of indices under a caller's order --------------- */

typedef bool (*before_fn)(const void *ctx, uint32_t x, uint32_t y);

static void heap_sift_down(uint32_t *h, uint32_t n, uint32_t i, before_fn before, const void *ctx) {
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(ctx, h[l], h[m]))
            m = l;
        if (r < n && before(ctx, h[r], h[m]))
            m = r;
        if (m == i)
            return;
        const uint32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static void heap_make(uint32_t *h, uint32_t n, before_fn before, const void *ctx) {
    for (uint32_t i = n / 2; i-- > 0;)
        heap_sift_down(h, n, i, before, ctx);
}

/* Step 3's order: the heavier replica (load / count) first, then the lower
 * expert. */
typedef struct repl_ctx {
    const int64_t *w;
    const int32_t *cnt;
} repl_ctx;

static bool heavier_replica(const void *vc, uint32_t x, uint32_t y) {
    const repl_ctx *c = vc;
    const double a = (double)c->w[x] / c->cnt[x], b = (double)c->w[y] / c->cnt[y];
    return a > b || (a == b && x < y);
}

/* Step 4's order: the lighter GPU first, then the lower GPU. */
typedef struct gpu_ctx {
    const double *load;
} gpu_ctx;

static bool lighter_gpu(const void *vc, uint32_t x, uint32_t y) {
    const gpu_ctx *c = vc;
    return c->load[x] < c->load[y] || (c->load[x] == c->load[y] && x < y);
}

typedef struct replica {
    double x;    /* its load */
    int32_t e;
} replica;

static int cmp_replica(const void *pa, const void *pb) {
    const replica *a = pa, *b = pb;
    if (a->x != b->x)
        return a->x > b->x ? -1 : 1;
    return (a->e > b->e) - (a->e < b->e);
}

/* Scratch of one repair, one allocation. */
typedef struct scratch {
    int32_t *grp_node;   /* [groups] the group's node, -1 none yet, -2 on several */
    double *grp_load;    /* [groups] */
    double *node_load;   /* [nodes] */
    double *gpu_load;    /* [G] */
    uint32_t *heap;      /* [max(per_group, G)] */
    uint32_t *free_at;   /* [G] next freed slot to fill, as an index into freed */
    uint32_t *free_end;  /* [G] */
    uint32_t *freed;     /* [P] the freed slots of a node, by GPU then slot */
    replica *repl;       /* [P] the moved replicas of a node */
} scratch;

/* Fill group `into`'s experts into the slots group `from` holds on node nd
 * (steps 3 and 4): counts in cnt (the moved group's entries), row updated.
 * `gpu_load` holds every GPU's load without the freed slots.  false when
 * the slots are too few (not for a valid row: each of `from`'s experts has
 * a replica there). */
static bool move_group(const eplb_policy_shape *s, const int64_t *w, const int32_t *row_before, int32_t *row,
                       int32_t *cnt, uint32_t from, uint32_t into, uint32_t nd, scratch *sc) {
    const uint32_t S = s->num_physical / s->num_gpus, gpn = s->num_gpus / s->num_nodes;
    const uint32_t per = s->num_logical / s->num_groups;
    const uint32_t g0 = nd * gpn;
    /* The freed slots, grouped by GPU (ascending slots within each). */
    uint32_t nfree = 0;
    for (uint32_t g = g0; g < g0 + gpn; g++) {
        sc->free_at[g] = nfree;
        for (uint32_t i = g * S; i < (g + 1) * S; i++)
            if ((uint32_t)row_before[i] / per == from)
                sc->freed[nfree++] = i;
        sc->free_end[g] = nfree;
    }
    if (nfree < per)
        return false; /* cannot happen: `from` has per experts, each with a replica here */
    /* Step 3: one replica each, then the rest by the heaviest replica. */
    const uint32_t e0 = into * per;
    for (uint32_t k = 0; k < per; k++) {
        cnt[e0 + k] = 1;
        sc->heap[k] = e0 + k;
    }
    repl_ctx rc = { w, cnt };
    heap_make(sc->heap, per, heavier_replica, &rc);
    for (uint32_t extra = nfree - per; extra > 0; extra--) {
        cnt[sc->heap[0]]++;
        heap_sift_down(sc->heap, per, 0, heavier_replica, &rc);
    }
    /* Step 4: heaviest replica first onto the lightest GPU with room. */
    uint32_t nr = 0;
    for (uint32_t k = 0; k < per; k++)
        for (int32_t j = 0; j < cnt[e0 + k]; j++)
            sc->repl[nr++] = (replica){ .x = (double)w[e0 + k] / cnt[e0 + k], .e = (int32_t)(e0 + k) };
    qsort(sc->repl, nr, sizeof *sc->repl, cmp_replica);
    uint32_t ng = 0;
    for (uint32_t g = g0; g < g0 + gpn; g++)
        if (sc->free_at[g] < sc->free_end[g])
            sc->heap[ng++] = g;
    gpu_ctx gc = { sc->gpu_load };
    heap_make(sc->heap, ng, lighter_gpu, &gc);
    for (uint32_t r = 0; r < nr; r++) {
        const uint32_t g = sc->heap[0];
        row[sc->freed[sc->free_at[g]++]] = sc->repl[r].e;
        sc->gpu_load[g] += sc->repl[r].x;
        if (sc->free_at[g] == sc->free_end[g])
            sc->heap[0] = sc->heap[--ng];
        heap_sift_down(sc->heap, ng, 0, lighter_gpu, &gc);
    }
    return true;
}

eplb_status eplb_node_repair(const eplb_node_repair_params *p, int32_t *out_row, int32_t *out_cnt, bool *repaired,
                             uint64_t *work, eplb_error *err) {
    *repaired = false;
    if (work)
        *work = 0;
    eplb_policy_shape s = p->shape;
    s.num_layers = 1;
    eplb_status st = eplb_policy_check(&s, err);
    if (st != EPLB_OK)
        return st;
    if (!eplb_policy_is_hierarchical(&s) || s.num_nodes < 2 || s.num_gpus % s.num_nodes)
        return eplb_error_set(err, EPLB_EINVAL, "node repair: needs num_groups %% num_nodes == 0 and 2 or more nodes "
                              "(num_groups %u, num_nodes %u)", s.num_groups, s.num_nodes);
    const uint32_t N = s.num_logical, P = s.num_physical, G = s.num_gpus, nodes = s.num_nodes;
    const uint32_t groups = s.num_groups, per = N / groups, S = P / G, gpn = G / nodes;
    memset(out_cnt, 0, N * sizeof *out_cnt);
    for (uint32_t i = 0; i < P; i++) {
        if (p->row[i] < 0 || (uint32_t)p->row[i] >= N)
            return eplb_error_set(err, EPLB_EINVAL, "node repair: slot %u holds %d", i, p->row[i]);
        out_cnt[p->row[i]]++;
    }
    for (uint32_t e = 0; e < N; e++) {
        if (out_cnt[e] == 0)
            return eplb_error_set(err, EPLB_EINVAL, "node repair: expert %u has no replica", e);
        if (p->load[e] < 0)
            return eplb_error_set(err, EPLB_EINVAL, "node repair: expert %u has a negative load", e);
    }

    scratch sc;
    const uint32_t hn = per > G ? per : G;
    void *mem = eplb_malloc((size_t)groups * (sizeof(int32_t) + sizeof(double)) + (size_t)nodes * sizeof(double) +
                            (size_t)G * (sizeof(double) + 2 * sizeof(uint32_t)) + (size_t)hn * sizeof(uint32_t) +
                            (size_t)P * (sizeof(uint32_t) + sizeof(replica)));
    if (!mem)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory for a node repair of %u slots", P);
    /* Doubles and replicas first, so every array stays aligned. */
    sc.repl = mem;
    sc.grp_load = (double *)(sc.repl + P);
    sc.node_load = sc.grp_load + groups;
    sc.gpu_load = sc.node_load + nodes;
    sc.grp_node = (int32_t *)(sc.gpu_load + G);
    sc.heap = (uint32_t *)(sc.grp_node + groups);
    sc.free_at = sc.heap + hn;
    sc.free_end = sc.free_at + G;
    sc.freed = sc.free_end + G;

    /* Step 1. */
    for (uint32_t x = 0; x < groups; x++) {
        sc.grp_node[x] = -1;
        sc.grp_load[x] = 0;
    }
    for (uint32_t e = 0; e < N; e++)
        sc.grp_load[e / per] += (double)p->load[e];
    for (uint32_t n = 0; n < nodes; n++)
        sc.node_load[n] = 0;
    for (uint32_t g = 0; g < G; g++)
        sc.gpu_load[g] = 0;
    for (uint32_t i = 0; i < P; i++) {
        const uint32_t e = (uint32_t)p->row[i], x = e / per, g = i / S, nd = g / gpn;
        const double v = (double)p->load[e] / out_cnt[e];
        sc.gpu_load[g] += v;
        sc.node_load[nd] += v;
        if (sc.grp_node[x] == -1)
            sc.grp_node[x] = (int32_t)nd;
        else if (sc.grp_node[x] != (int32_t)nd)
            sc.grp_node[x] = -2;
    }
    /* Step 2: the three heaviest nodes give "the heaviest other than a
     * and b" in O(1) per pair. */
    uint32_t top[3] = { UINT32_MAX, UINT32_MAX, UINT32_MAX };
    for (uint32_t n = 0; n < nodes; n++) {
        uint32_t v = n;
        for (uint32_t j = 0; j < 3; j++)
            if (top[j] == UINT32_MAX || sc.node_load[v] > sc.node_load[top[j]]) {
                const uint32_t t = top[j];
                top[j] = v;
                if (t == UINT32_MAX)
                    break;
                v = t;
            }
    }
    /* The heaviest node's mean GPU within the target: changes inside the
     * nodes can get there, no group needs to move. */
    const uint32_t na = top[0];
    const double before = sc.node_load[na];
    if (!(before / gpn > p->target_max))
        goto done;
    /* Only a swap with a group of the heaviest node can lower its load. */
    uint64_t on_top = 0;
    for (uint32_t A = 0; A < groups; A++)
        on_top += sc.grp_node[A] == (int32_t)na;
    if (on_top * groups > EPLB_NODE_REPAIR_MAX_PAIRS)
        goto done;
    if (work)
        *work += (uint64_t)P + on_top * groups;
    double best = before;
    uint32_t bestA = UINT32_MAX, bestB = UINT32_MAX;
    for (uint32_t A = 0; A < groups; A++) {
        if (sc.grp_node[A] != (int32_t)na)
            continue;
        for (uint32_t B = 0; B < groups; B++) {
            if (sc.grp_node[B] < 0 || (uint32_t)sc.grp_node[B] == na)
                continue;
            const uint32_t nb = (uint32_t)sc.grp_node[B];
            double m = sc.node_load[na] - sc.grp_load[A] + sc.grp_load[B];
            const double mb = sc.node_load[nb] - sc.grp_load[B] + sc.grp_load[A];
            m = mb > m ? mb : m;
            for (uint32_t j = 0; j < 3; j++)
                if (top[j] != UINT32_MAX && top[j] != na && top[j] != nb) {
                    m = sc.node_load[top[j]] > m ? sc.node_load[top[j]] : m;
                    break;
                }
            if (m < best) {
                best = m;
                bestA = A;
                bestB = B;
            }
        }
    }
    if (bestA == UINT32_MAX || !(best < before * (1 - 1e-9)))
        goto done; /* no swap lowers the heaviest node */

    /* Steps 3 and 4.  Each node's GPU loads without the slots it frees. */
    const uint32_t nb = (uint32_t)sc.grp_node[bestB];
    memcpy(out_row, p->row, P * sizeof *out_row);
    for (uint32_t i = 0; i < P; i++) {
        const uint32_t e = (uint32_t)p->row[i], x = e / per;
        if (x == bestA || x == bestB)
            sc.gpu_load[i / S] -= (double)p->load[e] / out_cnt[e];
    }
    if (!move_group(&s, p->load, p->row, out_row, out_cnt, bestA, bestB, na, &sc) ||
        !move_group(&s, p->load, p->row, out_row, out_cnt, bestB, bestA, nb, &sc))
        goto done;

    /* Step 5. */
    eplb_incremental_params ip = {
        .shape = s,
        .logical_load = p->load,
        .total_target = p->target_max,
        .layer_floor = &p->floor,
        .reference_cnt = p->ref_cnt,
        .cost_intra_node = p->cost_intra_node,
        .cost_cross_node = p->cost_cross_node,
        .hierarchical = true,
        .max_work = p->max_work,
        /* No initial_row: the polish prices copies from the swapped row.
         * A moved group's replica that moves again within its new node
         * then costs an intra-node copy; from the current row it would
         * cost a cross-node one, though the plan copies it across once
         * either way.  Priced from the current row, DeepSeek-V3 2 x 8 at
         * t=0.95 copied 6.3-9.8% instead of 6.2-9.2% (bench_incremental;
         * eplb_next counts the real copies in both). */
    };
    eplb_incremental_stats is;
    st = eplb_incremental_rebalance(&ip, out_row, out_cnt, &is, err);
    if (work)
        *work += is.work;
    *repaired = st == EPLB_OK;
done:
    eplb_free(mem);
    return st;
}
