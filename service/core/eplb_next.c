/* eplb_next.c -- a rebalance's next placement (see eplb_next.h).
 *
 * POLICY_DEEPSEEK: DeepSeek's placement from scratch, then the slot order
 * (MIN_TRAFFIC relabels GPU packs to their old holders; PRESERVE keeps
 * experts in their slots within a GPU).
 *
 * POLICY_INCREMENTAL: the from-scratch placement is computed first anyway
 * (with MIN_TRAFFIC order): it is the reference of the target and the
 * fallback.  Then, from the current placement, eplb_incremental_rebalance
 * runs until every layer is within target of the reference, or the budget
 * ends.  Short of the target, layers take the reference's row, or on the
 * hierarchical path a node repair (eplb_node_repair.h), when that is
 * better balanced and fits what is left of the budget.  Cost: the
 * from-scratch policy plus O(changes x candidates), the repairs within
 * the same compute bound; memory: two more [L][P] + [L][N] arrays, three
 * when layers are repaired. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_incremental.h"
#include "eplb_next.h"
#include "eplb_node_repair.h"
#include "eplb_plan.h"

/* Scratch of the copy count: per expert, the last GPU / node (as a tick)
 * that held it in the old row, and that wanted it in the new row. */
typedef struct copy_marks {
    uint32_t *old_gpu, *new_gpu, *old_node;
    uint32_t tick_gpu, tick_node;
} copy_marks;

static bool marks_init(copy_marks *m, uint32_t N) {
    m->old_gpu = eplb_calloc((size_t)3 * N + 3, sizeof(uint32_t));
    m->new_gpu = m->old_gpu ? m->old_gpu + N + 1 : NULL;
    m->old_node = m->old_gpu ? m->new_gpu + N + 1 : NULL;
    m->tick_gpu = m->tick_node = 0;
    return m->old_gpu != NULL;
}

/* Adds one layer's copies across GPUs and nodes, and (slots not NULL) its
 * slots rewritten.  O(P): each slot is looked at a constant number of
 * times. */
static void copies_layer(copy_marks *m, uint32_t P, uint32_t G, uint32_t gpn, uint32_t N, const int32_t *old_row,
                         const int32_t *new_row, uint64_t *cross_gpu, uint64_t *cross_node, uint64_t *slots) {
    const uint32_t S = P / G;
    for (uint32_t n0 = 0; n0 < G; n0 += gpn) {
        const uint32_t tn = ++m->tick_node;
        for (uint32_t k = n0 * S; k < (n0 + gpn) * S && k < P; k++)
            if (old_row[k] >= 0 && (uint32_t)old_row[k] < N)
                m->old_node[old_row[k]] = tn;
        for (uint32_t g = n0; g < n0 + gpn && g < G; g++) {
            const uint32_t tg = ++m->tick_gpu;
            for (uint32_t i = g * S; i < (g + 1) * S; i++)
                if (old_row[i] >= 0 && (uint32_t)old_row[i] < N)
                    m->old_gpu[old_row[i]] = tg;
            for (uint32_t i = g * S; i < (g + 1) * S; i++) {
                const int32_t e = new_row[i];
                if (slots)
                    *slots += old_row[i] != e;
                if (e < 0 || (uint32_t)e >= N || m->old_gpu[e] == tg || m->new_gpu[e] == tg)
                    continue;
                m->new_gpu[e] = tg; /* one copy per (GPU, expert) */
                (*cross_gpu)++;
                *cross_node += m->old_node[e] != tn;
            }
        }
    }
}

/* A lower bound of the copies (and so of the slots rewritten: each copy
 * rewrites its own slot) of new_row under any relabelling of its GPUs,
 * which is what eplb_plan_reassign_gpus chooses: new GPU g, given old GPU
 * h's bytes, copies the experts of g that h lacks, so at least g's
 * distinct experts minus the most that any old GPU shares with it.  O(P)
 * with old_row's lists per expert (head [N], next [P]: built here) and a
 * count per old GPU (shared [G], stamp [G]), where the relabelling is
 * O(G^2 S) and a matching; eplb_next skips the relabelling of a layer
 * whose bound the budget cannot pay (bench_incremental, 1 x 32, under a
 * budget of 2% of the slots: the fallback's look at every layer was 57%
 * of the call). */
typedef struct copy_bound {
    int32_t *head, *next;
    uint32_t *shared, *stamp, *seen, tick;
} copy_bound;

static uint64_t copies_lower_bound(copy_bound *cb, uint32_t P, uint32_t G, uint32_t N, const int32_t *old_row,
                                   const int32_t *new_row) {
    const uint32_t S = P / G;
    for (uint32_t e = 0; e < N; e++)
        cb->head[e] = -1;
    for (uint32_t i = P; i-- > 0;) /* each expert's old slots, ascending: one GPU's are adjacent */
        if (old_row[i] >= 0 && (uint32_t)old_row[i] < N) {
            cb->next[i] = cb->head[old_row[i]];
            cb->head[old_row[i]] = (int32_t)i;
        }
    uint64_t lb = 0;
    for (uint32_t g = 0; g < G; g++) {
        if (++cb->tick == 0) { /* the stamps wrap: clear them */
            memset(cb->stamp, 0, (size_t)G * sizeof *cb->stamp);
            memset(cb->seen, 0, (size_t)N * sizeof *cb->seen);
            cb->tick = 1;
        }
        const uint32_t tick = cb->tick;
        uint32_t distinct = 0, most = 0;
        for (uint32_t i = g * S; i < (g + 1) * S; i++) {
            const int32_t e = new_row[i];
            if (e < 0 || (uint32_t)e >= N || cb->seen[e] == tick)
                continue;
            cb->seen[e] = tick;
            distinct++;
            uint32_t last = UINT32_MAX;
            for (int32_t u = cb->head[e]; u >= 0; u = cb->next[u]) {
                const uint32_t h = (uint32_t)u / S;
                if (h == last)
                    continue; /* e twice on h: it shares one expert */
                last = h;
                if (cb->stamp[h] != tick) {
                    cb->stamp[h] = tick;
                    cb->shared[h] = 0;
                }
                most = ++cb->shared[h] > most ? cb->shared[h] : most;
            }
        }
        lb += distinct - most;
    }
    return lb;
}

/* copy_bound's scratch for N experts, P slots and G GPUs; false: out of
 * memory (copy_bound_free still frees what was made). */
static bool copy_bound_init(copy_bound *cb, uint32_t N, uint32_t P, uint32_t G) {
    *cb = (copy_bound){ .head = eplb_malloc(((size_t)N + P) * sizeof *cb->head),
                        .shared = eplb_calloc((size_t)2 * G + N, sizeof *cb->shared) };
    if (!cb->head || !cb->shared)
        return false;
    cb->next = cb->head + N;
    cb->stamp = cb->shared + G;
    cb->seen = cb->stamp + G;
    return true;
}

static void copy_bound_free(copy_bound *cb) {
    eplb_free(cb->head);
    eplb_free(cb->shared);
}

uint64_t eplb_next_copies_lower_bound(uint32_t num_physical, uint32_t num_gpus, uint32_t num_logical,
                                      const int32_t *old_row, const int32_t *new_row) {
    if (!num_gpus || num_physical % num_gpus || !old_row || !new_row)
        return 0;
    copy_bound cb;
    uint64_t lb = 0;
    if (copy_bound_init(&cb, num_logical, num_physical, num_gpus))
        lb = copies_lower_bound(&cb, num_physical, num_gpus, num_logical, old_row, new_row);
    copy_bound_free(&cb);
    return lb;
}

void eplb_next_copies(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node, uint32_t num_logical,
                      const int32_t *old_row, const int32_t *new_row, uint64_t *cross_gpu, uint64_t *cross_node) {
    *cross_gpu = *cross_node = 0;
    if (!num_gpus || num_physical % num_gpus || !gpus_per_node || num_gpus % gpus_per_node)
        return;
    copy_marks m;
    if (!marks_init(&m, num_logical))
        return;
    copies_layer(&m, num_physical, num_gpus, gpus_per_node, num_logical, old_row, new_row, cross_gpu, cross_node,
                 NULL);
    eplb_free(m.old_gpu);
}

static uint32_t gpus_per_node_of(const eplb_policy_shape *s) {
    return s->num_nodes && s->num_gpus % s->num_nodes == 0 ? s->num_gpus / s->num_nodes : s->num_gpus;
}

/* Copies (and slots rewritten) of every layer, into the [L] arrays when
 * given; the totals returned.  false when out of memory. */
static bool count_copies(const eplb_policy_shape *s, const int32_t *old, const int32_t *new, uint64_t *gpu,
                         uint64_t *node, uint64_t *slots) {
    *gpu = *node = 0;
    if (slots)
        *slots = 0;
    copy_marks m;
    if (!marks_init(&m, s->num_logical))
        return false;
    for (uint32_t l = 0; l < s->num_layers; l++) {
        uint64_t a = 0, b = 0;
        const size_t off = (size_t)l * s->num_physical;
        copies_layer(&m, s->num_physical, s->num_gpus, gpus_per_node_of(s), s->num_logical, old + off, new + off,
                     &a, &b, slots);
        *gpu += a;
        *node += b;
    }
    eplb_free(m.old_gpu);
    return true;
}

/* The most GPUs per node MIN_TRAFFIC's reassignment handles (its cost is
 * cubic in them); beyond it the reference keeps PRESERVE order. */
#define NEXT_MIN_TRAFFIC_MAX_GPUS_PER_NODE 256u

static eplb_status from_scratch(const eplb_policy_shape *s, eplb_slot_order order, const int32_t *cur,
                                const int64_t *load, int32_t *phy2log, int32_t *logcnt, eplb_error *err) {
    eplb_status st = eplb_policy_rebalance(s, load, phy2log, logcnt, err);
    if (st != EPLB_OK)
        return st;
    const uint32_t L = s->num_layers, P = s->num_physical;
    if (order == EPLB_SLOT_MIN_TRAFFIC)
        /* The policy's nodes are interchangeable only on its hierarchical path. */
        eplb_plan_reassign_gpus(L, P, s->num_gpus, eplb_policy_is_hierarchical(s) ? s->num_nodes : 1, cur, phy2log);
    if (order != EPLB_SLOT_ALGORITHM)
        eplb_policy_preserve_slots(L, P, s->num_gpus, cur, phy2log);
    return EPLB_OK;
}

/* A layer's max load from its balancedness: the mean (floor x the
 * reference's balancedness) over it; 0 for an empty layer. */
static double max_of(double floor, double ref_bal, double bal) {
    return bal > 0 ? floor * ref_bal / bal : 0;
}

/* The node repair of layer l (eplb_node_repair.h) as the fallback's second
 * candidate: its row and counts, its balancedness, and its copies + 1, slots and
 * cross-node copies against the current row (copies + 1 = UINT64_MAX:
 * no repair).  *work_left: what is left of the call's compute bound
 * (EPLB_INCREMENTAL_MAX_WORK, shared with the search and every repair), so
 * a hostile shape whose every layer falls back still ends in about the
 * time one search may take; none left, no repair. */
static eplb_status node_repair_layer(const eplb_next_request *req, const eplb_incremental_params *ip, uint32_t l,
                                     double floor, double target_max, const int32_t *ref_cnt, copy_marks *m,
                                     int32_t *row, int32_t *cnt, double *bal, uint64_t *stats, uint64_t *work_left,
                                     uint64_t *work_spent, eplb_error *err) {
    const eplb_policy_shape *s = &req->shape;
    const uint32_t N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    const eplb_node_repair_params np = {
        .shape = *s,
        .load = req->logical_load + (size_t)l * N,
        .row = req->cur_phy2log + (size_t)l * P,
        .ref_cnt = ref_cnt,
        .floor = floor,
        .target_max = target_max,
        .cost_intra_node = ip->cost_intra_node,
        .cost_cross_node = ip->cost_cross_node,
        .max_work = *work_left,
    };
    stats[0] = UINT64_MAX;
    if (*work_left == 0)
        return EPLB_OK;
    bool repaired;
    uint64_t work = 0;
    eplb_status st = eplb_node_repair(&np, row, cnt, &repaired, &work, err);
    *work_left -= work < *work_left ? work : *work_left;
    *work_spent += work;
    if (st != EPLB_OK || !repaired)
        return st;
    *bal = eplb_policy_balancedness(1, N, P, G, np.load, row, cnt, NULL);
    uint64_t copies = 0, node = 0, slots = 0;
    copies_layer(m, P, G, gpus_per_node_of(s), N, np.row, row, &copies, &node, &slots);
    stats[0] = copies + 1;
    stats[1] = slots;
    stats[2] = node;
    return EPLB_OK;
}

/* *after_known: true when rep->balancedness_after and layer_after (if
 * given) are set here -- every layer kept the search's row, so the
 * balancedness the search's rows were measured with is the answer's (one
 * pass over [L][P] saved, 1% of a 4 x 8 call). */
static eplb_status incremental(const eplb_next_request *req, int32_t *phy2log, int32_t *logcnt,
                               double *layer_after, bool *after_known, eplb_next_report *rep, eplb_error *err) {
    const eplb_policy_shape *s = &req->shape;
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    const uint32_t gpn = gpus_per_node_of(s);
    const eplb_rebalance_knobs *k = &req->knobs;
    const double target = k->target_balancedness > 0 ? k->target_balancedness : EPLB_DEFAULT_TARGET_BALANCEDNESS;
    int32_t *ref = eplb_malloc((size_t)L * P * sizeof *ref);
    int32_t *ref_cnt = eplb_malloc((size_t)L * N * sizeof *ref_cnt);
    double *ref_layer = eplb_malloc((size_t)L * sizeof *ref_layer);
    double *layer_floor = eplb_malloc((size_t)L * sizeof *layer_floor);
    double *inc_layer = eplb_malloc((size_t)L * sizeof *inc_layer);
    /* Per layer: incremental copies, its slots, then the reference's
     * copies + 1 (0 = not counted yet, UINT64_MAX = taken or not better)
     * and slots. */
    uint64_t *inc_copies = eplb_calloc((size_t)L * 7, sizeof *inc_copies); /* + cross-node: [4L) inc, [5L) ref */
    /* [6L) 0: the layer not looked at yet; else 1 + copies_lower_bound of
     * its reference row (under a budget; 1 without one) */
    uint64_t *ref_lb = inc_copies ? inc_copies + 6 * (size_t)L : NULL;
    copy_bound cbound = { 0 };
    copy_marks m = { 0 };
    int32_t *fix_row = NULL, *fix_cnt = NULL; /* [L][P], [L][N]: node repairs (hierarchical, short of the target) */
    double *fix_bal = NULL;                   /* [L] their balancedness */
    uint64_t *fix_stats = NULL;               /* [L][3] */
    bool *fix_taken = NULL;                   /* [L] the layer's row is its repair */
    eplb_status st = EPLB_OK;
    if (!ref || !ref_cnt || !ref_layer || !layer_floor || !inc_layer || !inc_copies || !marks_init(&m, N)) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for an incremental %ux%u rebalance", L, P);
        goto out;
    }
    /* The reference in the policy's own order: its balancedness does not
     * depend on the order, and MIN_TRAFFIC's GPU relabelling (the costly
     * part) is only worth running for the layers that fall back. */
    if ((st = eplb_policy_rebalance(s, req->logical_load, ref, ref_cnt, err)) != EPLB_OK)
        goto out;
    rep->balancedness_reference = eplb_policy_balancedness(L, N, P, G, req->logical_load, ref, ref_cnt, ref_layer);
    /* What the plain from-scratch rebalance would copy.  A copy is one
     * (GPU, expert) the GPU lacks, so the slot order within a GPU does not
     * change the count: no preserve_slots here (it took 5% of a 4 x 8
     * call); the layers that fall back order their row below. */
    for (uint32_t l = 0; l < L; l++) {
        uint64_t node = 0;
        copies_layer(&m, P, G, gpn, N, req->cur_phy2log + (size_t)l * P, ref + (size_t)l * P,
                     &rep->reference_copies_cross_gpu, &node, NULL);
    }
    /* Per layer: max = mean / balancedness, and mean (total / G) is fixed.
     * The target is on the model's balancedness, sum of means / sum of
     * maxes: the sum of the layers' max loads must come within
     * sum(from-scratch max) / target.  layer_floor: each layer's
     * from-scratch max. */
    double ref_total = 0;
    for (uint32_t l = 0; l < L; l++) {
        double sum = 0;
        for (uint32_t e = 0; e < N; e++)
            sum += (double)req->logical_load[(size_t)l * N + e];
        layer_floor[l] = sum > 0 ? sum / G / ref_layer[l] : 0;
        ref_total += layer_floor[l];
    }
    const double total_target = ref_total / target;

    memcpy(phy2log, req->cur_phy2log, (size_t)L * P * sizeof *phy2log);
    memcpy(logcnt, req->cur_logcnt, (size_t)L * N * sizeof *logcnt);
    const uint64_t max_copies = k->max_bytes_moved ? k->max_bytes_moved / k->expert_bytes : 0;
    const bool copies_budget = k->max_bytes_moved != 0, slots_budget = k->max_slots_moved != 0;
    eplb_incremental_params ip = {
        .shape = *s,
        .logical_load = req->logical_load,
        .total_target = total_target,
        .layer_floor = layer_floor,
        .reference_cnt = ref_cnt,
        .cost_intra_node = k->cost_intra_node > 0 ? k->cost_intra_node : EPLB_DEFAULT_COST_INTRA_NODE,
        .cost_cross_node = k->cost_cross_node > 0 ? k->cost_cross_node : EPLB_DEFAULT_COST_CROSS_NODE,
        .max_copies = max_copies,
        .max_slots = k->max_slots_moved,
        .copies_budget = copies_budget,
        .slots_budget = slots_budget,
        .hierarchical = eplb_policy_is_hierarchical(s) && s->num_nodes > 1,
        .initial_row = req->cur_phy2log, /* the same as phy2log now: no copy of it */
    };
    eplb_incremental_stats is;
    if ((st = eplb_incremental_rebalance(&ip, phy2log, logcnt, &is, err)) != EPLB_OK)
        goto out;
    const double inc_bal = eplb_policy_balancedness(L, N, P, G, req->logical_load, phy2log, logcnt, inc_layer);

    uint64_t used_copies = 0, used_slots = 0;
    for (uint32_t l = 0; l < L; l++) {
        const size_t off = (size_t)l * P;
        uint64_t node = 0, slots = 0;
        inc_copies[l] = 0;
        /* Most layers keep their row at a small target: nothing to count
         * (memcmp is about a tenth of copies_layer). */
        if (memcmp(req->cur_phy2log + off, phy2log + off, (size_t)P * sizeof *phy2log) != 0)
            copies_layer(&m, P, G, gpn, N, req->cur_phy2log + off, phy2log + off, &inc_copies[l], &node, &slots);
        inc_copies[L + l] = slots;
        inc_copies[4 * L + l] = node;
        used_copies += inc_copies[l];
        used_slots += slots;
    }
    /* Short of the target: layers take another row, the most max load
     * saved per copy first, while it is better than the layer's
     * incremental row and the budget allows.  Two candidates per layer:
     * the reference row (min-traffic order), and on the hierarchical path
     * the node repair (one group swapped between two nodes, then
     * INCREMENTAL within the nodes; eplb_node_repair.h), which rewrites far
     * fewer slots when the nodes' loads are what keeps the layer up. */
    double total = is.total_max;
    bool reached = is.reached || L == 0;
    const bool repairable = eplb_policy_is_hierarchical(s) && s->num_nodes > 1 && G % s->num_nodes == 0;
    if (!reached && repairable) {
        fix_row = eplb_malloc((size_t)L * P * sizeof *fix_row);
        fix_cnt = eplb_malloc((size_t)L * N * sizeof *fix_cnt);
        fix_bal = eplb_malloc((size_t)L * sizeof *fix_bal);
        fix_stats = eplb_calloc((size_t)L * 3, sizeof *fix_stats); /* copies + 1 (UINT64_MAX = none or taken), slots, cross-node */
        fix_taken = eplb_calloc(L, sizeof *fix_taken);
        if (!fix_row || !fix_cnt || !fix_bal || !fix_stats || !fix_taken) {
            st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for an incremental %ux%u rebalance", L, P);
            goto out;
        }
    }
    uint64_t work_left = is.work < EPLB_INCREMENTAL_MAX_WORK ? EPLB_INCREMENTAL_MAX_WORK - is.work : 0;
    rep->work = is.work; /* and the repairs' (node_repair_layer) */
    const bool budgeted = copies_budget || slots_budget;
    if (!reached && budgeted && !copy_bound_init(&cbound, N, P, G)) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for an incremental %ux%u rebalance", L, P);
        goto out;
    }
    if (!reached) {
        const uint32_t reassign_nodes = eplb_policy_is_hierarchical(s) ? s->num_nodes : 1;
        for (;;) {
            int32_t pick = -1;
            bool pick_fix = false;
            double pick_score = 0, pick_gain = 0;
            uint64_t pick_rg = 0, pick_rslots = 0, pick_rn = 0;
            for (uint32_t l = 0; l < L; l++) {
                if (inc_copies[2 * L + l] == UINT64_MAX)
                    continue; /* taken, or not better */
                const double inc_max = max_of(layer_floor[l], ref_layer[l], inc_layer[l]);
                const double gain = inc_max - layer_floor[l];
                if (!(gain > 0)) {
                    inc_copies[2 * L + l] = UINT64_MAX;
                    continue;
                }
                const size_t off = (size_t)l * P;
                int32_t *row = ref + off;
                if (ref_lb[l] == 0) { /* first look: the repair, and the reference's bound under a budget */
                    ref_lb[l] = 1 + (budgeted ? copies_lower_bound(&cbound, P, G, N, req->cur_phy2log + off, row) : 0);
                    if (fix_stats && (st = node_repair_layer(req, &ip, l, layer_floor[l], layer_floor[l] / target,
                                                             ref_cnt + (size_t)l * N, &m, fix_row + off,
                                                             fix_cnt + (size_t)l * N, &fix_bal[l],
                                                             fix_stats + 3 * (size_t)l, &work_left, &rep->work,
                                                             err)) != EPLB_OK)
                        goto out;
                }
                /* The reference row is ordered and counted once the budget
                 * could pay its bound (its copies and slots are no fewer). */
                const uint64_t lb = ref_lb[l] - 1;
                if (inc_copies[2 * L + l] == 0 &&
                    !(copies_budget && used_copies - inc_copies[l] + lb > max_copies) &&
                    !(slots_budget && used_slots - inc_copies[L + l] + lb > k->max_slots_moved)) {
                    if (gpn <= NEXT_MIN_TRAFFIC_MAX_GPUS_PER_NODE)
                        eplb_plan_reassign_gpus(1, P, G, reassign_nodes, req->cur_phy2log + off, row);
                    eplb_policy_preserve_slots(1, P, G, req->cur_phy2log + off, row);
                    uint64_t rg = 0, rn = 0, rslots = 0;
                    copies_layer(&m, P, G, gpn, N, req->cur_phy2log + off, row, &rg, &rn, &rslots);
                    inc_copies[2 * L + l] = 1 + rg;           /* copies + 1: 0 means not counted */
                    inc_copies[3 * L + l] = rslots;
                    inc_copies[5 * L + l] = rn;
                }
                for (int c = 0; c < 2; c++) { /* the reference, then the repair */
                    uint64_t rg, rslots, rn;
                    double cand_gain;
                    if (c == 0) {
                        if (inc_copies[2 * L + l] == 0)
                            continue; /* not counted: the budget cannot pay it */
                        rg = inc_copies[2 * L + l] - 1;
                        rslots = inc_copies[3 * L + l];
                        rn = inc_copies[5 * L + l];
                        cand_gain = gain;
                    } else {
                        if (!fix_stats || fix_stats[3 * (size_t)l] == UINT64_MAX)
                            continue;
                        rg = fix_stats[3 * (size_t)l] - 1;
                        rslots = fix_stats[3 * (size_t)l + 1];
                        rn = fix_stats[3 * (size_t)l + 2];
                        cand_gain = inc_max - max_of(layer_floor[l], ref_layer[l], fix_bal[l]);
                        if (!(cand_gain > 0))
                            continue;
                    }
                    if ((copies_budget && used_copies - inc_copies[l] + rg > max_copies) ||
                        (slots_budget && used_slots - inc_copies[L + l] + rslots > k->max_slots_moved))
                        continue;
                    const double extra = rg > inc_copies[l] ? (double)(rg - inc_copies[l]) : 0;
                    const double score = cand_gain / (1 + extra);
                    if (pick < 0 || score > pick_score) {
                        pick = (int32_t)l;
                        pick_fix = c == 1;
                        pick_score = score;
                        pick_gain = cand_gain;
                        pick_rg = rg;
                        pick_rslots = rslots;
                        pick_rn = rn;
                    }
                }
            }
            if (pick < 0)
                break;
            const uint32_t l = (uint32_t)pick;
            const size_t off = (size_t)l * P;
            used_copies = used_copies - inc_copies[l] + pick_rg;
            used_slots = used_slots - inc_copies[L + l] + pick_rslots;
            memcpy(phy2log + off, (pick_fix ? fix_row : ref) + off, (size_t)P * sizeof *phy2log);
            memcpy(logcnt + (size_t)l * N, (pick_fix ? fix_cnt : ref_cnt) + (size_t)l * N, (size_t)N * sizeof *logcnt);
            inc_copies[l] = pick_rg; /* the layer's row is the candidate's now */
            inc_copies[L + l] = pick_rslots;
            inc_copies[4 * L + l] = pick_rn;
            if (pick_fix) {
                /* The reference stays a candidate: still short of the
                 * target, the layer may take it over the repair. */
                fix_stats[3 * (size_t)l] = UINT64_MAX;
                fix_taken[l] = true;
                inc_layer[l] = fix_bal[l];
                rep->layers_node_repaired++;
            } else {
                inc_copies[2 * L + l] = UINT64_MAX;
                if (fix_taken && fix_taken[l]) {
                    fix_taken[l] = false;
                    rep->layers_node_repaired--;
                }
                rep->layers_from_scratch++;
            }
            total -= pick_gain;
            if (total <= total_target * (1 + 1e-12)) {
                reached = true;
                break;
            }
        }
    }
    if (rep->layers_from_scratch == 0 && rep->layers_node_repaired == 0) {
        rep->balancedness_after = inc_bal;
        if (layer_after)
            memcpy(layer_after, inc_layer, (size_t)L * sizeof *layer_after);
        *after_known = true;
    }
    /* What the answer copies, from the per-layer counts (no second pass). */
    for (uint32_t l = 0; l < L; l++) {
        rep->copies_cross_gpu += inc_copies[l];
        rep->slots_moved += inc_copies[L + l];
        rep->copies_cross_node += inc_copies[4 * L + l];
    }
    rep->policy_used = rep->layers_from_scratch == L ? EPLB_POLICY_DEEPSEEK : EPLB_POLICY_INCREMENTAL;
    /* Which rows the layers short of the target took. */
    char took[160];
    if (rep->layers_node_repaired)
        snprintf(took, sizeof took,
                 "%u of %u layers swapped a group between nodes (node repair) and %u took the from-scratch "
                 "placement (min-traffic order)", rep->layers_node_repaired, L, rep->layers_from_scratch);
    else
        snprintf(took, sizeof took, "%u of %u layers took the from-scratch placement (min-traffic order)",
                 rep->layers_from_scratch, L);
    if (rep->layers_from_scratch == L)
        snprintf(rep->reason, sizeof rep->reason,
                 "every layer fell back to the from-scratch placement (min-traffic order): local changes could "
                 "not reach the target %.4f of its balancedness%s", target,
                 is.work_exhausted ? " within the compute bound" : "");
    else if (!reached)
        snprintf(rep->reason, sizeof rep->reason, "short of the target %.4f of the from-scratch balancedness%s; %s",
                 target, copies_budget || slots_budget ? " within the budget" : "", took);
    else if (is.work_exhausted)
        snprintf(rep->reason, sizeof rep->reason, "local changes stopped at the compute bound; %s to reach the "
                 "target %.4f", took, target);
    else if (rep->layers_from_scratch || rep->layers_node_repaired)
        snprintf(rep->reason, sizeof rep->reason, "%s to reach the target %.4f", took, target);
out:
    copy_bound_free(&cbound);
    eplb_free(m.old_gpu);
    eplb_free(fix_row);
    eplb_free(fix_cnt);
    eplb_free(fix_bal);
    eplb_free(fix_stats);
    eplb_free(fix_taken);
    eplb_free(inc_copies);
    eplb_free(ref);
    eplb_free(ref_cnt);
    eplb_free(ref_layer);
    eplb_free(layer_floor);
    eplb_free(inc_layer);
    return st;
}

eplb_status eplb_next_placement(const eplb_next_request *req, int32_t *phy2log, int32_t *logcnt,
                                double *layer_before, double *layer_after, eplb_next_report *rep,
                                eplb_error *err) {
    memset(rep, 0, sizeof *rep);
    const eplb_policy_shape *s = &req->shape;
    eplb_status st = eplb_rebalance_knobs_check(&req->knobs, "", err);
    if (st != EPLB_OK)
        return st;
    if ((st = eplb_policy_check(s, err)) != EPLB_OK)
        return st;
    if (req->knobs.max_bytes_moved && !req->knobs.expert_bytes)
        return eplb_error_set(err, EPLB_EINVAL,
                              "max_bytes_moved %llu needs the size of an expert: set expert_bytes (in the request "
                              "or ParallelConfig)", (unsigned long long)req->knobs.max_bytes_moved);
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    /* Empty slots (a SetupFromMapping scale-up not rebalanced yet) are not
     * a placement INCREMENTAL can start from: from scratch, which fills
     * them, in min-traffic order. */
    bool empty_slots = false, after_known = false;
    for (size_t i = 0; i < (size_t)L * P && !empty_slots; i++)
        empty_slots = req->cur_phy2log[i] < 0;
    if (req->knobs.policy == EPLB_POLICY_INCREMENTAL && empty_slots) {
        const eplb_slot_order order =
            gpus_per_node_of(s) <= NEXT_MIN_TRAFFIC_MAX_GPUS_PER_NODE ? EPLB_SLOT_MIN_TRAFFIC : EPLB_SLOT_PRESERVE;
        st = from_scratch(s, order, req->cur_phy2log, req->logical_load, phy2log, logcnt, err);
        rep->policy_used = EPLB_POLICY_DEEPSEEK;
        rep->layers_from_scratch = L;
        snprintf(rep->reason, sizeof rep->reason,
                 "the current placement has empty slots (scaled up, not rebalanced yet): from scratch, min-traffic "
                 "order, fills them");
    } else if (req->knobs.policy == EPLB_POLICY_INCREMENTAL) {
        st = incremental(req, phy2log, logcnt, layer_after, &after_known, rep, err);
    } else {
        st = from_scratch(s, req->order, req->cur_phy2log, req->logical_load, phy2log, logcnt, err);
        rep->policy_used = EPLB_POLICY_DEEPSEEK;
    }
    if (st != EPLB_OK)
        return st;
    rep->balancedness_before =
        eplb_policy_balancedness(L, N, P, G, req->logical_load, req->cur_phy2log, req->cur_logcnt, layer_before);
    if (!after_known)
        rep->balancedness_after =
            eplb_policy_balancedness(L, N, P, G, req->logical_load, phy2log, logcnt, layer_after);
    if (req->knobs.policy != EPLB_POLICY_INCREMENTAL || empty_slots) {
        rep->balancedness_reference = rep->balancedness_after;
        if (!count_copies(s, req->cur_phy2log, phy2log, &rep->copies_cross_gpu, &rep->copies_cross_node,
                          &rep->slots_moved))
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory counting a rebalance's copies");
    }
    return EPLB_OK;
}
