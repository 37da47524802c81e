/* eplb_plan.c -- transfer plans and GPU/node reassignment (see eplb_plan.h
 * for the invariants every plan satisfies).
 *
 * Plan API       eplb_plan_build, eplb_plan_free
 * Reassignment   eplb_plan_reassign_gpus, eplb_plan_overlap (+ Kuhn-Munkres) */
#include "eplb_alloc.h"
#include "eplb_plan.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_policy.h" /* EPLB_POLICY_MAX_EXPERTS */

/* ======================================================================= */
/* Plan API                                                                 */
/* ======================================================================= */

/* Per-expert state of the group (destination GPU, expert) being filled. */
enum { GROUP_DIRECT = 0, GROUP_REMOTE_DIRECT = 1, GROUP_STAGED = 2 };

typedef struct plan_scratch {
    uint32_t *old_start; /* [E+1] CSR offsets into old_slots by expert */
    uint32_t *old_slots; /* [P]   old slots holding each expert, ascending */
    uint32_t *stamp;     /* [E]   GPU+1 whose group for this expert is open */
    uint32_t *grp_src;   /* [E]   source slot, or staging index (STAGED) */
    uint32_t *grp_dst0;  /* [E]   first destination slot of the group */
    uint8_t *grp_mode;   /* [E]   GROUP_* */
    uint32_t *reads;     /* [G]   cross-GPU reads assigned to each GPU so far */
    uint32_t *stg_count; /* [G]   staging entries on each GPU */
    eplb_plan_op *wave1; /* [P]   wave-1 ops, appended after wave 0 */
} plan_scratch;

static bool slot_changed(const int32_t *old_row, const int32_t *new_row, uint32_t s) {
    return new_row[s] != -1 && new_row[s] != old_row[s];
}

static uint8_t link_of(uint32_t src_gpu, uint32_t dst_gpu, uint32_t gpus_per_node) {
    if (src_gpu == dst_gpu)
        return EPLB_LINK_LOCAL;
    return src_gpu / gpus_per_node == dst_gpu / gpus_per_node ? EPLB_LINK_PEER : EPLB_LINK_NET;
}

static void count_op(eplb_plan *p, const eplb_plan_op *op) {
    if (op->link == EPLB_LINK_LOCAL) {
        p->local_copies++;
    } else {
        p->cross_gpu_copies++;
        if (op->link == EPLB_LINK_NET)
            p->cross_node_copies++;
    }
}

static eplb_plan_op make_op(uint8_t kind, uint32_t src, uint32_t src_gpu, uint32_t dst,
                            uint32_t dst_gpu, int32_t expert, uint8_t wave, uint32_t gpn) {
    eplb_plan_op op;
    memset(&op, 0, sizeof op);
    op.kind = kind;
    op.src = src;
    op.src_gpu = src_gpu;
    op.dst = dst;
    op.dst_gpu = dst_gpu;
    op.expert = expert;
    op.wave = wave;
    op.link = link_of(src_gpu, dst_gpu, gpn);
    return op;
}

static eplb_status check_row(const int32_t *row, uint32_t n, const char *which, eplb_error *err,
                             int32_t *max_expert) {
    for (uint32_t s = 0; s < n; s++) {
        int32_t v = row[s];
        if (v < -1 || v >= (int32_t)EPLB_POLICY_MAX_EXPERTS)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "%s_row[%u] = %d: must be -1 or in [0, %u)", which, s, v,
                                  EPLB_POLICY_MAX_EXPERTS);
        if (v > *max_expert)
            *max_expert = v;
    }
    return EPLB_OK;
}

/* Pick the source of expert e for destination GPU g: cheapest link first,
 * then stable, then least-read source GPU, then lowest slot (invariant 5).
 * Returns EPLB_OK with *src set, or EPLB_EPRECONDITION naming dst slot d. */
static eplb_status choose_source(const plan_scratch *sc, const int32_t *old_row,
                                 const int32_t *new_row, uint32_t S, uint32_t gpn, uint32_t lo,
                                 uint32_t hi, uint32_t g, int32_t e, uint32_t d, uint32_t *src,
                                 eplb_error *err) {
    uint32_t begin = sc->old_start[e], end = sc->old_start[e + 1];
    bool found = false, foreign = false;
    uint32_t best = 0, foreign_slot = 0;
    uint64_t best_key = 0;
    for (uint32_t i = begin; i < end; i++) {
        uint32_t s = sc->old_slots[i], sg = s / S;
        if (sg < lo || sg >= hi) {
            if (!foreign) {
                foreign = true;
                foreign_slot = s;
            }
            continue;
        }
        uint64_t tier = link_of(sg, g, gpn);
        uint64_t unstable = slot_changed(old_row, new_row, s) ? 1 : 0;
        uint64_t reads = tier == EPLB_LINK_LOCAL ? 0 : sc->reads[sg];
        if (reads > 0xFFFFF)
            reads = 0xFFFFF;
        /* tier:2 bits | unstable:1 | reads:20 | slot:21 (P <= 2^20) */
        uint64_t key = (tier << 42) | (unstable << 41) | (reads << 21) | s;
        if (!found || key < best_key) {
            found = true;
            best_key = key;
            best = s;
        }
    }
    if (found) {
        *src = best;
        return EPLB_OK;
    }
    if (foreign)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "slot %u (GPU %u) needs expert %d, held only by slots on GPUs "
                              "this server does not hold (GPUs %u..%u held): slot %u (GPU %u)",
                              d, g, e, lo, hi - 1, foreign_slot, foreign_slot / S);
    return eplb_error_set(err, EPLB_EPRECONDITION,
                          "slot %u (GPU %u) wants expert %d but no old slot holds it", d, g, e);
}

eplb_status eplb_plan_build(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node,
                            const int32_t *old_row, const int32_t *new_row, uint32_t first_gpu,
                            uint32_t num_local_gpus, eplb_plan *out, eplb_error *err) {
    if (!out)
        return eplb_error_set(err, EPLB_EINVAL, "plan output is NULL");
    memset(out, 0, sizeof *out);
    if (!old_row || !new_row)
        return eplb_error_set(err, EPLB_EINVAL, "old_row or new_row is NULL");
    if (num_gpus == 0 || num_physical == 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical %u and num_gpus %u must be >= 1",
                              num_physical, num_gpus);
    if (num_physical > EPLB_POLICY_MAX_EXPERTS)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical %u exceeds %u", num_physical,
                              EPLB_POLICY_MAX_EXPERTS);
    if (num_physical % num_gpus != 0)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical %u is not a multiple of num_gpus %u",
                              num_physical, num_gpus);
    if (gpus_per_node == 0)
        return eplb_error_set(err, EPLB_EINVAL, "gpus_per_node must be >= 1");
    if ((uint64_t)first_gpu + num_local_gpus > num_gpus)
        return eplb_error_set(err, EPLB_EINVAL,
                              "local GPUs [%u, %u + %u) exceed num_gpus %u", first_gpu, first_gpu,
                              num_local_gpus, num_gpus);
    /* One pass checks both rows and finds the largest id (a rebalance
     * plans every layer, most of them unchanged at a small target, where
     * a pass per row was a third of the cost); a bad entry goes through
     * check_row for its message, the old row's first. */
    const uint32_t P = num_physical, G = num_gpus, S = P / G, gpn = gpus_per_node;
    const uint32_t lo = first_gpu, hi = first_gpu + num_local_gpus;
    int32_t max_e = -1;
    uint32_t bad = 0;
    for (uint32_t s = 0; s < P; s++) {
        const int32_t a = old_row[s], b = new_row[s];
        bad |= (uint32_t)(a < -1 || a >= (int32_t)EPLB_POLICY_MAX_EXPERTS) |
               (uint32_t)(b < -1 || b >= (int32_t)EPLB_POLICY_MAX_EXPERTS);
        max_e = a > max_e ? a : max_e;
        max_e = b > max_e ? b : max_e;
    }
    if (bad) {
        int32_t unused = -1;
        eplb_status st = check_row(old_row, num_physical, "old", err, &unused);
        return st != EPLB_OK ? st : check_row(new_row, num_physical, "new", err, &unused);
    }
    eplb_status st = EPLB_OK;
    const uint32_t E = (uint32_t)(max_e + 1);

    /* Counters, and every written slot on a GPU this server holds. */
    uint32_t written = 0;
    for (uint32_t s = 0; s < P; s++) {
        if (new_row[s] == -1) {
            out->slots_empty++;
        } else if (new_row[s] == old_row[s]) {
            out->slots_unchanged++;
        } else {
            uint32_t g = s / S;
            if (g < lo || g >= hi) {
                memset(out, 0, sizeof *out);
                if (num_local_gpus == 0)
                    return eplb_error_set(err, EPLB_EPRECONDITION,
                                          "slot %u (GPU %u) must be written (expert %d -> %d) "
                                          "but this server holds no GPU",
                                          s, g, old_row[s], new_row[s]);
                return eplb_error_set(err, EPLB_EPRECONDITION,
                                      "slot %u (GPU %u) must be written (expert %d -> %d) but "
                                      "this server holds only GPUs %u..%u",
                                      s, g, old_row[s], new_row[s], lo, hi - 1);
            }
            written++;
        }
    }
    out->num_physical = P;
    out->num_gpus = G;
    out->gpus_per_node = gpn;
    out->slots_written = written;
    if (written == 0)
        return EPLB_OK;

    /* One block for the plan: gather [written], scatter [written], staging
     * [written]; one block for scratch. */
    size_t ops_bytes = (size_t)written * sizeof(eplb_plan_op);
    size_t plan_bytes = 2 * ops_bytes + (size_t)written * sizeof(eplb_plan_staging);
    char *block = eplb_malloc(plan_bytes);
    size_t scratch_bytes = (4 * (size_t)E + 1 + P + 2 * (size_t)G) * sizeof(uint32_t) +
                           (size_t)E + (size_t)P * sizeof(eplb_plan_op);
    char *raw = eplb_malloc(scratch_bytes);
    if (!block || !raw) {
        eplb_free(block);
        eplb_free(raw);
        memset(out, 0, sizeof *out);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory building a plan for %u slots", P);
    }
    plan_scratch sc;
    sc.wave1 = (eplb_plan_op *)raw; /* first: strictest alignment */
    uint32_t *w = (uint32_t *)(raw + (size_t)P * sizeof(eplb_plan_op));
    sc.old_start = w;
    w += E + 1;
    sc.old_slots = w;
    w += P;
    sc.stamp = w;
    w += E;
    sc.grp_src = w;
    w += E;
    sc.grp_dst0 = w;
    w += E;
    sc.reads = w;
    w += G;
    sc.stg_count = w;
    w += G;
    sc.grp_mode = (uint8_t *)w;
    memset(sc.old_start, 0, (size_t)(E + 1) * sizeof(uint32_t));
    memset(sc.stamp, 0, (size_t)E * sizeof(uint32_t));
    memset(sc.reads, 0, (size_t)G * sizeof(uint32_t));
    memset(sc.stg_count, 0, (size_t)G * sizeof(uint32_t));

    /* CSR of old slots by expert (counting sort keeps slots ascending). */
    for (uint32_t s = 0; s < P; s++)
        if (old_row[s] >= 0)
            sc.old_start[old_row[s] + 1]++;
    for (uint32_t e = 0; e < E; e++)
        sc.old_start[e + 1] += sc.old_start[e];
    {
        uint32_t *fill = sc.stamp; /* borrowed as a cursor, reset below */
        for (uint32_t s = 0; s < P; s++)
            if (old_row[s] >= 0) {
                int32_t e = old_row[s];
                sc.old_slots[sc.old_start[e] + fill[e]++] = s;
            }
        memset(sc.stamp, 0, (size_t)E * sizeof(uint32_t));
    }

    out->gather = (eplb_plan_op *)block;
    out->scatter = (eplb_plan_op *)(block + ops_bytes);
    out->staging = (eplb_plan_staging *)(block + 2 * ops_bytes);
    uint32_t n_wave1 = 0;

    for (uint32_t g = lo; g < hi; g++) {
        for (uint32_t d = g * S; d < (g + 1) * S; d++) {
            if (!slot_changed(old_row, new_row, d))
                continue;
            int32_t e = new_row[d];
            if (sc.stamp[e] != g + 1) {
                /* First destination of (g, e): choose its source. */
                uint32_t src = 0;
                st = choose_source(&sc, old_row, new_row, S, gpn, lo, hi, g, e, d, &src, err);
                if (st != EPLB_OK) {
                    eplb_free(raw);
                    eplb_plan_free(out);
                    return st;
                }
                uint32_t sg = src / S;
                sc.stamp[e] = g + 1;
                sc.grp_dst0[e] = d;
                if (sg != g)
                    sc.reads[sg]++;
                if (!slot_changed(old_row, new_row, src)) {
                    sc.grp_mode[e] = sg == g ? GROUP_DIRECT : GROUP_REMOTE_DIRECT;
                    sc.grp_src[e] = src;
                    eplb_plan_op op = make_op(EPLB_OP_COPY, src, sg, d, g, e, 0, gpn);
                    out->scatter[out->num_scatter++] = op;
                    count_op(out, &op);
                } else {
                    uint32_t k = out->num_staging++;
                    eplb_plan_staging *ent = &out->staging[k];
                    ent->gpu = g;
                    ent->index = sc.stg_count[g]++;
                    ent->expert = e;
                    if (sc.stg_count[g] > out->max_staging_per_gpu)
                        out->max_staging_per_gpu = sc.stg_count[g];
                    sc.grp_mode[e] = GROUP_STAGED;
                    sc.grp_src[e] = k;
                    eplb_plan_op op = make_op(EPLB_OP_STAGE, src, sg, k, g, e, 0, gpn);
                    out->gather[out->num_gather++] = op;
                    count_op(out, &op);
                    op = make_op(EPLB_OP_UNSTAGE, k, g, d, g, e, 0, gpn);
                    out->scatter[out->num_scatter++] = op;
                    count_op(out, &op);
                }
                continue;
            }
            /* A further destination of (g, e): always filled locally. */
            eplb_plan_op op;
            switch (sc.grp_mode[e]) {
            case GROUP_DIRECT:
                op = make_op(EPLB_OP_COPY, sc.grp_src[e], g, d, g, e, 0, gpn);
                out->scatter[out->num_scatter++] = op;
                break;
            case GROUP_STAGED:
                op = make_op(EPLB_OP_UNSTAGE, sc.grp_src[e], g, d, g, e, 0, gpn);
                out->scatter[out->num_scatter++] = op;
                break;
            default: /* GROUP_REMOTE_DIRECT: copy the slot wave 0 fills */
                op = make_op(EPLB_OP_COPY, sc.grp_dst0[e], g, d, g, e, 1, gpn);
                sc.wave1[n_wave1++] = op;
                break;
            }
            count_op(out, &op);
        }
    }
    out->num_scatter_wave0 = out->num_scatter;
    memcpy(out->scatter + out->num_scatter, sc.wave1, (size_t)n_wave1 * sizeof(eplb_plan_op));
    out->num_scatter += n_wave1;
    eplb_free(raw);
    return EPLB_OK;
}

void eplb_plan_free(eplb_plan *plan) {
    if (!plan)
        return;
    eplb_free(plan->gather); /* the base of the plan's single block */
    memset(plan, 0, sizeof *plan);
}

/* ======================================================================= */
/* Reassignment                                                             */
/* ======================================================================= */

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* |A ∩ B| of two ascending multisets, negatives ignored.  O(n). */
static uint32_t sorted_overlap(const int32_t *a, const int32_t *b, uint32_t n) {
    uint32_t i = 0, j = 0, c = 0;
    while (i < n && a[i] < 0)
        i++;
    while (j < n && b[j] < 0)
        j++;
    while (i < n && j < n) {
        if (a[i] < b[j]) {
            i++;
        } else if (a[i] > b[j]) {
            j++;
        } else {
            c++;
            i++;
            j++;
        }
    }
    return c;
}

/* Work space of the Kuhn-Munkres solver for matrices up to k x k. */
typedef struct km_work {
    uint32_t k;
    int64_t *cost; /* [k*k] */
    int64_t *u, *v, *minv;    /* [k+1] */
    uint32_t *p, *way;        /* [k+1] */
    uint8_t *used;            /* [k+1] */
} km_work;

/* Maximum-weight perfect assignment of an n x n weight matrix w (row-major,
 * w[i*n+j] >= 0): assign[i] = column of row i.  The identity wins ties: each
 * weight is scaled by n+1 and a diagonal cell gets +1, so among maximum-
 * weight assignments the one with the most fixed points is chosen (the
 * bonus sums to at most n < n+1).  Returns the total (unscaled) weight.
 * Classic O(n^3) shortest augmenting path with potentials (minimizing the
 * negated weights); deterministic. */
static int64_t km_solve(km_work *kw, const int64_t *w, uint32_t n, uint32_t *assign) {
    const int64_t INF = INT64_MAX / 4;
    int64_t *a = kw->cost;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < n; j++)
            a[i * n + j] = -(w[i * n + j] * (int64_t)(n + 1) + (i == j ? 1 : 0));
    for (uint32_t j = 0; j <= n; j++) {
        kw->u[j] = 0;
        kw->v[j] = 0;
        kw->p[j] = 0;
        kw->way[j] = 0;
    }
    for (uint32_t i = 1; i <= n; i++) {
        kw->p[0] = i;
        uint32_t j0 = 0;
        for (uint32_t j = 0; j <= n; j++) {
            kw->minv[j] = INF;
            kw->used[j] = 0;
        }
        do {
            kw->used[j0] = 1;
            uint32_t i0 = kw->p[j0], j1 = 0;
            int64_t delta = INF;
            for (uint32_t j = 1; j <= n; j++) {
                if (kw->used[j])
                    continue;
                int64_t cur = a[(i0 - 1) * n + (j - 1)] - kw->u[i0] - kw->v[j];
                if (cur < kw->minv[j]) {
                    kw->minv[j] = cur;
                    kw->way[j] = j0;
                }
                if (kw->minv[j] < delta) {
                    delta = kw->minv[j];
                    j1 = j;
                }
            }
            for (uint32_t j = 0; j <= n; j++) {
                if (kw->used[j]) {
                    kw->u[kw->p[j]] += delta;
                    kw->v[j] -= delta;
                } else {
                    kw->minv[j] -= delta;
                }
            }
            j0 = j1;
        } while (kw->p[j0] != 0);
        do {
            uint32_t j1 = kw->way[j0];
            kw->p[j0] = kw->p[j1];
            j0 = j1;
        } while (j0 != 0);
    }
    int64_t total = 0;
    for (uint32_t j = 1; j <= n; j++) {
        uint32_t i = kw->p[j] - 1;
        assign[i] = j - 1;
        total += w[i * n + (j - 1)];
    }
    return total;
}

uint64_t eplb_plan_overlap(uint32_t num_physical, uint32_t num_gpus, const int32_t *old_row,
                           const int32_t *new_row) {
    if (num_gpus == 0 || num_physical % num_gpus != 0 || !old_row || !new_row)
        return 0;
    uint32_t S = num_physical / num_gpus;
    int32_t *buf = eplb_malloc(2 * (size_t)num_physical * sizeof *buf + 1);
    if (!buf)
        return 0;
    memcpy(buf, old_row, (size_t)num_physical * sizeof *buf);
    memcpy(buf + num_physical, new_row, (size_t)num_physical * sizeof *buf);
    uint64_t total = 0;
    for (uint32_t g = 0; g < num_gpus; g++) {
        qsort(buf + (size_t)g * S, S, sizeof *buf, cmp_i32);
        qsort(buf + num_physical + (size_t)g * S, S, sizeof *buf, cmp_i32);
        total += sorted_overlap(buf + (size_t)g * S, buf + num_physical + (size_t)g * S, S);
    }
    eplb_free(buf);
    return total;
}

void eplb_plan_reassign_gpus(uint32_t num_layers, uint32_t num_physical, uint32_t num_gpus,
                             uint32_t num_nodes, const int32_t *old_phy2log,
                             int32_t *new_phy2log) {
    if (num_gpus == 0 || num_physical % num_gpus != 0 || num_nodes == 0 ||
        num_gpus % num_nodes != 0 || !old_phy2log || !new_phy2log || num_physical == 0)
        return;
    const uint32_t P = num_physical, G = num_gpus, S = P / G, n = num_nodes, m = G / n;
    const uint32_t k = n > m ? n : m;

    /* Scratch: sorted old/new rows [2P], result row [P], inner weights and
     * node weights [k*k] each, inner assignments [n*n*m], node assignment
     * [n], KM work space. */
    size_t bytes = 0;
    bytes += 3 * (size_t)P * sizeof(int32_t);
    bytes += 2 * (size_t)k * k * sizeof(int64_t); /* w + cost */
    bytes += (size_t)n * n * sizeof(int64_t);     /* node values */
    bytes += 3 * ((size_t)k + 1) * sizeof(int64_t);
    bytes += ((size_t)n * n * m + n + 2 * ((size_t)k + 1)) * sizeof(uint32_t);
    bytes += (size_t)k + 1 + 64;
    char *raw = eplb_malloc(bytes);
    if (!raw)
        return;
    char *cur = raw;
#define TAKE(ptr, type, count)                                                                    \
    do {                                                                                          \
        ptr = (type *)cur;                                                                        \
        cur += (size_t)(count) * sizeof(type);                                                    \
    } while (0)
    int64_t *wmat, *node_val;
    km_work kw;
    kw.k = k;
    TAKE(wmat, int64_t, (size_t)k * k);
    TAKE(kw.cost, int64_t, (size_t)k * k);
    TAKE(node_val, int64_t, (size_t)n * n);
    TAKE(kw.u, int64_t, k + 1);
    TAKE(kw.v, int64_t, k + 1);
    TAKE(kw.minv, int64_t, k + 1);
    int32_t *so, *sn, *row;
    TAKE(so, int32_t, P);
    TAKE(sn, int32_t, P);
    TAKE(row, int32_t, P);
    uint32_t *inner, *node_assign;
    TAKE(inner, uint32_t, (size_t)n * n * m);
    TAKE(node_assign, uint32_t, n);
    TAKE(kw.p, uint32_t, k + 1);
    TAKE(kw.way, uint32_t, k + 1);
    TAKE(kw.used, uint8_t, k + 1);
#undef TAKE

    for (uint32_t l = 0; l < num_layers; l++) {
        const int32_t *old_row = old_phy2log + (size_t)l * P;
        int32_t *new_row = new_phy2log + (size_t)l * P;
        memcpy(so, old_row, (size_t)P * sizeof *so);
        memcpy(sn, new_row, (size_t)P * sizeof *sn);
        for (uint32_t g = 0; g < G; g++) {
            qsort(so + (size_t)g * S, S, sizeof *so, cmp_i32);
            qsort(sn + (size_t)g * S, S, sizeof *sn, cmp_i32);
        }
        /* Inner problems: new node b's GPUs onto physical node a's GPUs. */
        for (uint32_t b = 0; b < n; b++) {
            for (uint32_t a = 0; a < n; a++) {
                for (uint32_t i = 0; i < m; i++)
                    for (uint32_t j = 0; j < m; j++)
                        wmat[i * m + j] = sorted_overlap(sn + (size_t)(b * m + i) * S,
                                                         so + (size_t)(a * m + j) * S, S);
                node_val[b * n + a] = km_solve(&kw, wmat, m, inner + ((size_t)b * n + a) * m);
            }
        }
        if (n == 1) {
            node_assign[0] = 0;
        } else {
            memcpy(wmat, node_val, (size_t)n * n * sizeof *wmat);
            km_solve(&kw, wmat, n, node_assign);
        }
        bool moved = false;
        for (uint32_t b = 0; b < n; b++) {
            uint32_t a = node_assign[b];
            const uint32_t *in = inner + ((size_t)b * n + a) * m;
            for (uint32_t i = 0; i < m; i++) {
                uint32_t from = b * m + i, to = a * m + in[i];
                if (from != to)
                    moved = true;
                memcpy(row + (size_t)to * S, new_row + (size_t)from * S, (size_t)S * sizeof *row);
            }
        }
        if (moved)
            memcpy(new_row, row, (size_t)P * sizeof *row);
    }
    eplb_free(raw);
}
