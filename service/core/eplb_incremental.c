/* eplb_incremental.c -- POLICY_INCREMENTAL (see eplb_incremental.h).
 *
 * State per layer, kept for all layers at once (the heap interleaves them):
 *   w[N]        the expert's load (double)
 *   load[G]     each GPU's load: sum over its slots of w[e] / cnt[e]
 *   head[N], next[P]  the slots of each expert, a linked list
 *   irow[P], ihead[N], inext[P]  the row the plan copies from (the
 *                     caller's initial_row, or the row as the call got
 *                     it) and its lists: they price copies (source_link)
 *   grp_node[groups][nodes]  replicas of each group on each node
 *                            (hierarchical path only)
 * and the layer's best change, cached until the layer changes.
 *
 * A change is one of
 *   SWAP(s, t)     s on the busiest GPU g, t on another GPU: experts swap;
 *                  counts do not change, only loads of g and gpu(t).
 *   REPL(t, b)     slot t, whose expert c has >= 2 replicas, takes expert b:
 *                  c's other replicas get heavier, b's lighter.
 * Candidates (each O(1) or O(replicas) to evaluate):
 *   SWAP: every s on g x every slot t off g                    S * (P - S)
 *   REPL, adding a hot expert: b among the REPL_HOT hottest experts on g
 *         (by per-replica load) x every slot t with cnt >= 2   <= 2 * P
 *   REPL, dropping a replica from g: t on g with cnt >= 2 x b among the
 *         REPL_COLD experts lightest after one more replica    <= S * 8
 * so finding a layer's best change is O(S * P) (about 3k evaluations at
 * DeepSeek-V3 size), and a rebalance costs that per layer once plus once
 * per change applied.
 *
 * Gain of a change: how far the largest load among the GPUs it touches
 * falls below the busiest GPU's load M (a change must lower g's load and
 * leave every GPU it touches below M, so a layer's max never rises).  With
 * several GPUs tied at M the layer's max falls only after each is relieved;
 * the local gain still ranks the changes that get there, and the heap's key
 * counts them.  Gains are capped at M - FIX_DEPTH x the layer's floor (the
 * from-scratch max): past it a change buys nothing, so among changes that
 * reach it the cheapest wins.
 * Cost: per expert copied to a GPU that neither holds it nor held it when
 * the call began, the cheapest link from a GPU that held it then (the
 * plan's sources: cost_intra_node in the node, cost_cross_node across);
 * a copy within a GPU is free (source_link).  Every slot rewritten costs
 * SLOT_COST besides, so that free changes are still ranked by gain.
 *
 * Search order and pruning: re-replications first (a few hundred
 * evaluations), then swaps with GPUs lightest first; a pair is priced
 * exactly only when its gain over a lower bound of its cost (free where
 * the GPU holds or held the expert) could beat the best so far, and a GPU
 * whose bound cannot is skipped (another node's GPU in O(1) per GPU when
 * no group could cross).  Every bound is exact or keeps a slack against
 * rounding, and candidates are ranked by a total order (consider), so the
 * answer does not depend on the order candidates are met in or on which
 * ones a bound skips: a change to the pruning that gives other placements
 * is a bug (bench_incremental's BENCH_HASH checks it).  In O(1) each: a
 * re-replication whose donor's other replicas would push a GPU to M
 * (repl_may_beat, a_side_low); a swap partner too light or too heavy for
 * what the best's score needs (g's replicas sorted, swaps_with).
 *
 * Replica counts (reference_cnt given): each layer's item
 * bound is ITEM_SLACK x its heaviest from-scratch replica; REPL may not
 * make the donor's replicas heavier than it, and before the loop
 * split_heavy re-replicates every replica above it (under a budget, as
 * far as a quarter of it pays, and not at all when the model starts at
 * its target).  A layer whose max the splits lifted and the loop did not
 * bring back takes its saved row.
 *
 * The loop: a max-heap of layers keyed by how much each layer's max falls
 * per cost, counting the GPUs near the top that must be relieved before it
 * falls at all (level_key); a layer is first searched when a bound of its
 * key reaches the top (prime).  The top layer's change is applied (when
 * the budget still pays for it) and its next best found; it ends when the
 * sum over layers of the max load is within total_target, or no layer has
 * a change left.  Gains count down to FIX_DEPTH x the layer's floor.
 * Applied changes per layer are capped at P, and all work (replicas
 * visited, loads redone) at INCREMENTAL_MAX_WORK per call.  On the global
 * path without a budget the loop runs on two threads, with the same
 * answer ("Two threads", search_two_threads). */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_bits.h"
#include "eplb_incremental.h"

/* A rewritten slot moves bytes at memory speed, several times cheaper than
 * a link; not free, so that a free change of small gain does not go before
 * a paid one of large gain, and few large changes go before many small
 * ones.  bench_incremental, slow drift, bytes as a share of MIN_TRAFFIC's
 * at t=0.99 / t=0.95 (with level_key and FIX_DEPTH): 0.1: 10.7% / 4.2% at
 * 1 x 32 and 10.9% / 3.5% for Kimi-K2-like; 0.25: 10.7 / 4.2 and 10.4 /
 * 3.4; 0.5: 10.6 / 4.1 and 9.9 / 3.2; 0.75: 10.5 / 4.1 and 9.6 / 3.2;
 * 1.0: 10.5 / 4.1 and 9.3 / 3.1, but Kimi-K2-like's cross-node bytes grow
 * with it (12.5, 13.3, 13.6 GB per rebalance at 0.25, 0.75, 1.0): the
 * slots then outweigh the links' prices. */
#define SLOT_COST 0.75
#define REPL_HOT 2
#define REPL_COLD 8
/* ITEM_SLACK: the item bound over the largest from-scratch replica load
 * (eplb_incremental.h, reference_cnt).  bench_incremental, 1 node x 32
 * GPUs, bytes per rebalance at t=0.99 / t=0.95: no bound 130 / 89 GB;
 * exact from-scratch counts 85 / 37; slack 1.05 79 / 33, 1.15 73 / 30,
 * 1.3 70 / 28, 1.6 73 / 27, 2.0 125 / 50.  A tighter bound re-replicates
 * for counts that barely matter, a looser one lets slots drift to cold
 * experts again. */
#define ITEM_SLACK EPLB_INCREMENTAL_ITEM_SLACK
/* The most candidate evaluations one call makes (~1-2 s on this machine
 * class): a hostile shape (1024 layers x 8192 slots, one GPU) must not hold
 * the model's lock for minutes.  DeepSeek-V3 and Kimi-K2 sizes use 1-5% of
 * it; past it the greedy stops and eplb_next.c's fallback (from-scratch
 * rows) finishes. */
#define INCREMENTAL_MAX_WORK EPLB_INCREMENTAL_MAX_WORK
/* How deep below the layer's floor (the from-scratch max) gains still
 * count: a GPU a change relieves is brought this far when that costs no
 * more, so the next drift step does not lift it over the floor again at
 * once.  bench_incremental, slow drift, with level_key, bytes as a share
 * of MIN_TRAFFIC's at t=0.99 / t=0.95: 1.0 (the floor itself) 11.6% /
 * 4.2% at 1 x 32 and 12.7% / 3.5% for Kimi-K2-like; 0.96: 11.0 / 4.2 and
 * 11.2 / 3.4; 0.9: 10.7 / 4.2 and 10.4 / 3.4; 0.8: 11.3 / 4.2 and 11.0 /
 * 3.5.  The loop still stops at the model's target (total_target). */
#define FIX_DEPTH 0.9
/* Gains below this fraction of the layer's max are rounding, not progress. */
#define MIN_REL_GAIN 1e-9

enum { CH_NONE = 0, CH_SWAP = 1, CH_REPL = 2 };

typedef struct change {
    int kind;
    uint32_t s, t;       /* SWAP: slots; REPL: t is the slot */
    int32_t b;           /* REPL: the expert t takes */
    double gain, cost, score; /* score = gain / cost */
    uint32_t copies;     /* cross-GPU copies (the byte budget's unit) */
    uint32_t slots;      /* slots rewritten */
} change;

typedef struct layer_state {
    int32_t *row;        /* [P] into the caller's phy2log */
    int32_t *cnt;        /* [N] into the caller's logcnt */
    double *w;           /* [N] */
    double *xr;          /* [N] w / cnt, a replica's load, and */
    double *xup, *xdn;   /* [N] w / (cnt + 1) and w / (cnt - 1) (INFINITY at cnt 1): kept with cnt
                            (set_counts), so no search divides */
    double *x;           /* [P] xr of each slot's expert: kept with row and cnt (set_slot, set_counts) */
    int32_t cold[REPL_COLD]; /* find_best's REPL_COLD coldest experts, valid while cold_ok */
    uint32_t ncold;
    bool cold_ok;        /* cleared by set_counts */
    uint64_t *multi;     /* [N/64 rounded up] bit e: cnt[e] >= 2, kept with cnt (set_counts): find_best's
                          * donors come from these few experts, not from a pass over all N */
    uint32_t *order;     /* [G] GPUs by load, ascending (ties: lower GPU): kept between searches,
                            where a change moves a few GPUs, so the insertion sort is O(G) then */
    double *load;        /* [G] */
    int32_t *head;       /* [N] first slot of each expert, -1 none */
    int32_t *next;       /* [P] next slot of the same expert, -1 end */
    const int32_t *irow; /* [P] the plan's sources: p->initial_row's row, or a copy of row as the call got it */
    int32_t *ihead;      /* [N] irow's slots of each expert, and */
    int32_t *inext;      /* [P] their links */
    int32_t *grp_node;   /* [groups][nodes], hierarchical only */
    double target;       /* FIX_DEPTH x the layer's floor: gains below it do not count, done at it */
    double item_bound;   /* no change makes a replica's load exceed it (INFINITY: no bound) */
    double start_max;    /* the max load before any change: the result never exceeds it */
    int32_t *saved;      /* row [P] then counts [N] before the splits, NULL when none happened */
    uint32_t changes;    /* applied so far; at most P (then every slot could have been rewritten) */
    uint32_t copies, slots, splits; /* what they copied and rewrote, and how many were splits: for stats */
    bool done;
    bool stale;          /* best.score is only an upper bound (prime); find_best not run yet */
    change best;
    double key;          /* the heap's order: level_key of best, or prime's bound */
} layer_state;

typedef struct ctx {
    const eplb_incremental_params *p;
    uint32_t N, P, G, S, gpn, nodes, groups, per_group;
    layer_state *ls;
    uint64_t copies_left, slots_left;   /* when the budget flags are set */
    double min_link;                    /* the cheapest link between two GPUs */
    double cap;                         /* the busiest GPU's load above the target: the most a change gains */
    uint32_t eval_tick;                 /* stamps touch_tick: one per eval_repl_b */
    uint32_t b_tick;                    /* stamps b_stamp: one per b_prepare */
    uint32_t *b_stamp, *b_gpus;         /* [G] each */
    uint32_t *bn_stamp, *bn_cnt;        /* [nodes] each: bn_stamp == b_tick, b's first replicas on the node */
    uint32_t *bf_stamp;                 /* [G] == b_tick: b reaches the GPU free (it holds or held b) */
    double *b_load;                     /* [G] */
    uint32_t *touch_tick, *touch_at;    /* [G] each: GPU in the touched set when == eval_tick, at index */
    uint32_t tick;                      /* stamps of the marks below */
    uint32_t *on_g;                     /* [N] == tick: the expert reaches the busiest GPU g free (g holds or held it) */
    uint32_t *holds;                    /* [S][G] == tick: g's i-th slot's expert reaches GPU h free */
    uint32_t *shares;                   /* [G] == tick: some swap with h may have a free half */
    uint64_t work;                      /* candidate evaluations so far, and */
    uint64_t work_max;                  /* their bound: p->max_work, or INCREMENTAL_MAX_WORK */
    _Atomic uint64_t *work_out;         /* two threads: where this side publishes its work, and */
    const _Atomic uint64_t *work_peer;  /* where the other side does (NULL: one thread) */
    bool budget_refused;                /* this search refused a change the budget cannot pay for */
    bool budget_stopped;                /* a layer's search found nothing else: it stopped for the budget */
    double *lb;                         /* [S] cost bounds, scratch of find_best */
    double *xs;                         /* [S] g's per-replica loads, descending, and */
    uint32_t *si;                       /* [S] their slots on g: scratch of find_best */
    uint32_t *a_gpu;                    /* [2N] find_best's: each donor expert's two heaviest GPUs (UINT32_MAX none) */
    uint32_t *to_node;                  /* [nodes] swaps' scratch: 1 some group of g's experts is on the node, 2 none, 0 not known */
    uint32_t *donors;                   /* [P] slots that may give up their replica, scratch of find_best */
    uint32_t *slot_gpu;                 /* [P] slot / S: gpu_of is a load, not a division (about 4M a call at
                                         * 1 x 32, on a 20-90 cycle divider) */
    uint32_t *scr;                      /* the blocks the scratch above lives in (ctx_new) */
    double *scr_x;
    uint32_t *scr_marks;
    /* Scratch of one evaluation: the GPUs a change touches. */
    uint32_t touched[64 + 2 * 1024];
    double touched_load[64 + 2 * 1024];
} ctx;

static inline uint32_t gpu_of(const ctx *c, uint32_t slot) { return c->slot_gpu[slot]; }
static inline uint32_t node_of(const ctx *c, uint32_t gpu) { return gpu / c->gpn; }

/* A fresh touched set: touch_tick[g] == eval_tick marks g in it (the
 * stamps cleared when the tick wraps). */
static void new_touch_set(ctx *c) {
    if (++c->eval_tick == 0) {
        memset(c->touch_tick, 0, c->G * sizeof *c->touch_tick);
        c->eval_tick = 1;
    }
}

/* How copies are priced: as the plan makes them.  Its sources are the
 * bytes the GPUs held when the call began (eplb_plan.h, 1 and 5: the
 * caller's initial_row, or the row it passed; eplb_node_repair passes its
 * own row, two groups already swapped, and eplb_next recounts the real
 * copies), and a GPU copies an expert at most once (6).  So bringing
 * expert e to GPU g is
 * free when g holds e now (an earlier change of this call paid for the
 * copy) or held it then (a copy within the GPU); find_best's marks (holds,
 * on_g) and b_prepare's stamps say which.  Otherwise it costs the cheapest
 * link from a GPU that held e then: source_link.  Pricing from the current
 * holders only, as this did before, charged a copy for bringing an expert
 * back to a GPU it had just left, and priced links from GPUs whose copy
 * was made in the same call (docs/benchmarks.md). */
/* The cheaper link to a GPU from the GPUs that held an expert: one of its
 * node (here) or of another node (away); INFINITY with neither. */
static double cheapest_link(const ctx *c, bool here, bool away) {
    double best = INFINITY;
    if (here)
        best = c->p->cost_intra_node;
    if (away && c->p->cost_cross_node < best)
        best = c->p->cost_cross_node;
    return best;
}

static double source_link(const ctx *c, const layer_state *L, int32_t e, uint32_t g) {
    const uint32_t nd = node_of(c, g);
    bool here = false, away = false;
    /* A walk of the expert's first replicas: a per-expert node mask
     * (tried) saved few instructions, and its memory cost page faults. */
    for (int32_t u = L->ihead[e]; u >= 0 && !(here && away); u = L->inext[u]) {
        const bool same = node_of(c, gpu_of(c, (uint32_t)u)) == nd;
        here = here || same;
        away = away || !same;
    }
    return cheapest_link(c, here, away);
}

static bool group_on_node(const ctx *c, const layer_state *L, int32_t e, uint32_t node) {
    return L->grp_node[(size_t)((uint32_t)e / c->per_group) * c->nodes + node] > 0;
}

/* Whether one of expert a's replicas may go to another expert: a keeps one,
 * and its others stay under the item bound. */
static inline bool can_give_replica(const layer_state *L, int32_t a) {
    return L->cnt[a] >= 2 && !(L->xdn[a] > L->item_bound);
}

/* Whether a model whose layers' max loads sum to total is at its target
 * (none: never); the slack keeps an exact hit from missing by rounding. */
static bool at_target(const eplb_incremental_params *p, double total) {
    return p->total_target >= 0 && total <= p->total_target * (1 + 1e-12);
}

static bool affordable(const ctx *c, uint32_t copies, uint32_t slots) {
    return (!c->p->copies_budget || copies <= c->copies_left) && (!c->p->slots_budget || slots <= c->slots_left);
}

/* Take cand if it is better than *best (ties: lower kind, slot, expert). */
static void consider(change *best, const change *cand) {
    if (cand->score > best->score ||
        (cand->score == best->score && best->kind != CH_NONE &&
         (cand->kind < best->kind || (cand->kind == best->kind && (cand->s < best->s ||
          (cand->s == best->s && (cand->t < best->t || (cand->t == best->t && cand->b < best->b))))))))
        *best = *cand;
}

static uint32_t busiest(const ctx *c, const layer_state *L) {
    uint32_t g = 0;
    for (uint32_t h = 1; h < c->G; h++)
        if (L->load[h] > L->load[g])
            g = h;
    return g;
}

/* REPL(t, b) for a fixed b tried against many slots t: b's side of the
 * change (its replicas' GPUs get lighter) is the same for every t, so it
 * is computed once (b_prepare) and each t adds only its own expert's
 * replicas and its GPU: O(cnt[a]) per t instead of O(cnt[a] + cnt[b]). */
#define B_TOP 4
typedef struct b_part {
    int32_t b;
    uint32_t tick;            /* c->b_stamp[q] == tick: q holds b, its load after is c->b_load[q] */
    uint32_t ngpus;
    uint32_t icnt;            /* b's replicas when the call began (the plan's sources) */
    uint32_t top[B_TOP];      /* b's GPUs with the highest loads after, descending */
    uint32_t ntop;
} b_part;

static void b_prepare(ctx *c, const layer_state *L, int32_t b, b_part *bp) {
    if (++c->b_tick == 0) {
        memset(c->b_stamp, 0, c->G * sizeof *c->b_stamp);
        memset(c->bn_stamp, 0, c->nodes * sizeof *c->bn_stamp);
        memset(c->bf_stamp, 0, c->G * sizeof *c->bf_stamp);
        c->b_tick = 1;
    }
    bp->b = b;
    bp->tick = c->b_tick;
    bp->ngpus = 0;
    bp->ntop = 0;
    const double db = L->xup[b] - L->xr[b];
    for (int32_t u = L->head[b]; u >= 0; u = L->next[u]) {
        const uint32_t q = gpu_of(c, (uint32_t)u);
        if (c->b_stamp[q] != bp->tick) {
            c->b_stamp[q] = bp->tick;
            c->b_load[q] = L->load[q];
            c->b_gpus[bp->ngpus++] = q;
        }
        c->b_load[q] += db;
        c->bf_stamp[q] = bp->tick;
    }
    bp->icnt = 0;
    for (int32_t u = L->ihead[b]; u >= 0; u = L->inext[u]) { /* the plan's sources */
        const uint32_t q = gpu_of(c, (uint32_t)u), nd = node_of(c, q);
        c->bf_stamp[q] = bp->tick;
        if (c->bn_stamp[nd] != bp->tick) {
            c->bn_stamp[nd] = bp->tick;
            c->bn_cnt[nd] = 0;
        }
        c->bn_cnt[nd]++;
        bp->icnt++;
    }
    c->work += (uint32_t)L->cnt[b] + bp->icnt;
    for (uint32_t i = 0; i < bp->ngpus; i++) { /* keep the B_TOP heaviest, descending */
        const uint32_t q = c->b_gpus[i];
        uint32_t j = bp->ntop < B_TOP ? bp->ntop++ : B_TOP - 1;
        if (j == B_TOP - 1 && bp->ntop == B_TOP && i >= B_TOP && !(c->b_load[q] > c->b_load[bp->top[j]]))
            continue;
        while (j > 0 && c->b_load[bp->top[j - 1]] < c->b_load[q]) {
            bp->top[j] = bp->top[j - 1];
            j--;
        }
        bp->top[j] = q;
    }
}

static inline double base_load(const ctx *c, const layer_state *L, const b_part *bp, uint32_t q) {
    return c->b_stamp[q] == bp->tick ? c->b_load[q] : L->load[q];
}

/* What bringing the prepared expert b to GPU h costs, in O(1): free when
 * h holds or held it; else source_link's, from b_prepare's counts of the
 * GPUs that held b per node. */
static double b_fetch_cost(const ctx *c, const b_part *bp, uint32_t h, uint32_t *copies) {
    *copies = 0;
    if (c->bf_stamp[h] == bp->tick)
        return 0;
    *copies = 1;
    const uint32_t nd = node_of(c, h);
    const uint32_t on_node = c->bn_stamp[nd] == bp->tick ? c->bn_cnt[nd] : 0;
    return cheapest_link(c, on_node > 0, bp->icnt > on_node);
}

/* The loads after REPL(t, b), b's side prepared: *worst, the heaviest GPU
 * the change touches (g included when it does), *g_new, GPU g's load.
 * false when the change is not allowed: t's expert is b or has a single
 * replica, b's group is not on t's node (hierarchical), or t's expert's
 * other replicas would exceed the item bound. */
static bool repl_loads(ctx *c, const layer_state *L, uint32_t g, uint32_t t, const b_part *bp, double *worst,
                       double *g_new) {
    const int32_t a = L->row[t], b = bp->b;
    if (a == b || !can_give_replica(L, a))
        return false;
    const uint32_t h = gpu_of(c, t);
    if (c->p->hierarchical && !group_on_node(c, L, b, node_of(c, h)))
        return false;
    if ((uint32_t)L->cnt[a] + 1 > sizeof c->touched / sizeof c->touched[0])
        return false; /* more replicas than the touched set holds: not a candidate */
    const double xa_old = L->xr[a], da = L->xdn[a] - xa_old;
    const double xb_new = L->xup[b];
    c->work += (uint32_t)L->cnt[a]; /* a's replicas visited: an expert with thousands costs thousands */
    new_touch_set(c);
    /* a's side and t's GPU, on top of b's side. */
    uint32_t n = 0;
    for (int32_t u = L->head[a]; u >= 0; u = L->next[u]) {
        if ((uint32_t)u == t)
            continue;
        const uint32_t q = gpu_of(c, (uint32_t)u);
        if (c->touch_tick[q] != c->eval_tick) {
            c->touch_tick[q] = c->eval_tick;
            c->touch_at[q] = n;
            c->touched[n] = q;
            c->touched_load[n++] = base_load(c, L, bp, q);
        }
        c->touched_load[c->touch_at[q]] += da;
    }
    if (c->touch_tick[h] != c->eval_tick) {
        c->touch_tick[h] = c->eval_tick;
        c->touch_at[h] = n;
        c->touched[n] = h;
        c->touched_load[n++] = base_load(c, L, bp, h);
    }
    c->touched_load[c->touch_at[h]] += xb_new - xa_old;
    double w = -INFINITY;
    for (uint32_t i = 0; i < n; i++)
        w = c->touched_load[i] > w ? c->touched_load[i] : w;
    /* b's GPUs not touched by a's side: the heaviest of them. */
    bool found = false;
    for (uint32_t i = 0; i < bp->ntop && !found; i++)
        if (c->touch_tick[bp->top[i]] != c->eval_tick) {
            w = c->b_load[bp->top[i]] > w ? c->b_load[bp->top[i]] : w;
            found = true;
        }
    if (!found && bp->ngpus > bp->ntop) {
        c->work += bp->ngpus;
        for (uint32_t i = 0; i < bp->ngpus; i++)
            if (c->touch_tick[c->b_gpus[i]] != c->eval_tick)
                w = c->b_load[c->b_gpus[i]] > w ? c->b_load[c->b_gpus[i]] : w;
    }
    *worst = w;
    *g_new = c->touch_tick[g] == c->eval_tick ? c->touched_load[c->touch_at[g]] : base_load(c, L, bp, g);
    return true;
}

/* REPL(t, b) against the layer's max M on GPU g, b's side prepared: fills
 * *ch, or kind NONE when it does not lower g's load below M with every GPU
 * it touches below M. */
static void eval_repl_b(ctx *c, const layer_state *L, uint32_t g, double M, uint32_t t, const b_part *bp,
                        change *ch) {
    ch->kind = CH_NONE;
    double worst, g_new;
    if (!repl_loads(c, L, g, t, bp, &worst, &g_new))
        return;
    if (!(g_new < M) || !(worst < M))
        return;
    double gain = M - (worst > g_new ? worst : g_new);
    if (gain <= MIN_REL_GAIN * M)
        return;
    if (gain > c->cap)
        gain = c->cap;
    uint32_t copies;
    const double cost = b_fetch_cost(c, bp, gpu_of(c, t), &copies) + SLOT_COST;
    if (!affordable(c, copies, 1)) {
        c->budget_refused = true;
        return;
    }
    *ch = (change){ .kind = CH_REPL, .s = t, .t = t, .b = bp->b, .gain = gain, .cost = cost, .score = gain / cost,
                    .copies = copies, .slots = 1 };
}

/* A lower bound of the loads REPL(t, b) leaves on the GPUs of t's
 * expert a's other replicas (off t's GPU; -INFINITY when none), b's side
 * prepared, in O(1): a's heaviest GPU other than t's, of the two that
 * find_best keeps in a_gpu, ends at least da heavier than its base load,
 * and that sum is repl_loads' first add there, so it compares exactly. */
static inline double a_side_low(const ctx *c, const layer_state *L, const b_part *bp, uint32_t t) {
    const int32_t a = L->row[t];
    const uint32_t h = gpu_of(c, t), q1 = c->a_gpu[2 * (uint32_t)a], q2 = c->a_gpu[2 * (uint32_t)a + 1];
    const uint32_t q = q1 != h ? q1 : q2;
    return q == UINT32_MAX ? -INFINITY : base_load(c, L, bp, q) + L->xdn[a] - L->xr[a];
}

/* Whether REPL(t, b), b's side prepared, could beat the best: an upper
 * bound of its score in O(1), before repl_loads walks the replicas of t's
 * expert a.  Its gain is at most the cap, `shed` (what g can shed), and M
 * minus the load t's GPU ends with at least (a's other replicas there only
 * add) or a GPU of a's other replicas does (a_side_low); its cost at
 * least cost_lb.  A change that leaves a GPU at M or above is no
 * candidate at all: that test needs no best, and at 1 x 32 (12 calls) it
 * ends 388k of the 443k full evaluations made without it.  false when it
 * cannot beat the best, or only tie it and lose the tie (a later slot):
 * once a change reaches the cap, that is every later slot of the same
 * cost.  The slack (1e-12 of M)
 * keeps rounding in those loads from ruling out a better change; the cap's
 * term is exact, as the gain's is. */
static inline bool repl_may_beat(const ctx *c, const layer_state *L, const b_part *bp, double M, uint32_t t, double shed,
                          double cost_lb, const change *best) {
    const double h_low = base_load(c, L, bp, gpu_of(c, t)) + L->xup[bp->b] - L->x[t];
    if (h_low > M * (1 + 1e-12))
        return false; /* t's GPU would end at or above M */
    /* Most candidates fail here, before any best is set: a donor's other
     * replica sits on a GPU near the top. */
    const double a_low = a_side_low(c, L, bp, t);
    if (!(a_low < M))
        return false;
    double ub = M - (h_low > a_low ? h_low : a_low) + 1e-12 * M;
    ub = ub < shed + 1e-12 * M ? ub : shed + 1e-12 * M;
    ub = (ub < c->cap ? ub : c->cap) / cost_lb;
    return !(ub < best->score || (ub == best->score && best->kind == CH_REPL && best->s < t));
}

/* The heap's key of a layer whose best change is `best`: how much the
 * layer's max falls per cost, counting the GPUs that must be relieved with
 * the busiest before it falls at all.  Dropping the max to the (k+1)-th
 * busiest GPU's load (or the target) takes this change and k - 1 more,
 * priced as swaps; each drop counts at most what this change gains.  The
 * key is the best ratio over k.  A layer whose top GPUs are nearly tied
 * then waits behind layers where a change lowers the max now, instead of
 * taking changes that do not lower its max before the model reaches its
 * target (bench_incremental, slow drift at t=0.99, bytes as a share of
 * MIN_TRAFFIC's: 12.5% -> 11.6% at 1 x 32, 13.2% -> 12.7% for
 * Kimi-K2-like; with FIX_DEPTH 0.9 10.7% and 10.4%).  It is at most
 * best->score (k = 1 is the largest term's bound), so prime's bound is
 * still a bound.  O(G), with L->order sorted. */
static double level_key(const ctx *c, const layer_state *L, double M, const change *best) {
    const double swap_cost = 2 * SLOT_COST + 2 * c->min_link;
    double key = 0;
    for (uint32_t k = 1; k <= c->G; k++) {
        const double next = k < c->G ? L->load[L->order[c->G - 1 - k]] : -INFINITY;
        const double level = next > L->target ? next : L->target;
        double drop = M - level;
        drop = drop < best->gain ? drop : best->gain;
        const double e = drop / (best->cost + (k - 1) * swap_cost);
        key = e > key ? e : key;
        if (!(next > L->target))
            break;
    }
    return key;
}

/* Marks the GPUs on expert a's list (head, next: its slots now, or when
 * the call began) in holds_row and shares: a reaches them free, and a swap
 * with them may have a free half.  Returns the slots walked. */
static uint32_t mark_free_to(ctx *c, const int32_t *head, const int32_t *next, int32_t a, uint32_t *holds_row,
                             uint32_t tick) {
    uint32_t n = 0;
    for (int32_t u = head[a]; u >= 0; u = next[u], n++) {
        const uint32_t q = gpu_of(c, (uint32_t)u);
        holds_row[q] = tick;
        c->shares[q] = tick;
    }
    return n;
}

/* xs [n] descending, si [n] alongside (ties in any order: the search's
 * answer does not depend on the order it meets candidates in, consider's
 * order settles ties).  Shell sort with Knuth's gaps: no scratch, and
 * O(n^1.5) for the thousands of slots per GPU a hostile shape has. */
static void sort_desc(double *xs, uint32_t *si, uint32_t n) {
    uint32_t gap = 1;
    while (gap < n / 3)
        gap = 3 * gap + 1;
    for (; gap > 0; gap /= 3)
        for (uint32_t i = gap; i < n; i++) {
            const double v = xs[i];
            const uint32_t k = si[i];
            uint32_t j = i;
            for (; j >= gap && xs[j - gap] < v; j -= gap) {
                xs[j] = xs[j - gap];
                si[j] = si[j - gap];
            }
            xs[j] = v;
            si[j] = k;
        }
}

/* What find_best's swaps with each GPU share: the busiest GPU g and its
 * load M, g's replicas heaviest first (xs, si), the stamp of the marks
 * of free copies (tick). */
typedef struct swap_view {
    uint32_t g, g0, tick;
    double M, xmax, thr, ml;
    const double *x, *xs;
    const uint32_t *si;
} swap_view;

/* Swaps of g's replicas with GPU h's into *best.  false when no GPU
 * heavier than h can have a better one (find_best goes lightest first). */
static bool swaps_with(ctx *c, const layer_state *L, const swap_view *v, uint32_t h, change *best) {
    const uint32_t S = c->S, g = v->g, g0 = v->g0, tick = v->tick;
    const double M = v->M, xmax = v->xmax, thr = v->thr, ml = v->ml;
    const double *x = v->x, *xs = v->xs;
    const uint32_t *si = v->si;
    const double room = M - L->load[h];
    /* gain = M - max(M - d, load[h] + d) = min(d, room - d) <= room / 2 */
    double bound = room / 2 < xmax ? room / 2 : xmax;
    bound = bound < c->cap ? bound : c->cap;
    if (!(room > 0) || bound / (2 * SLOT_COST) < best->score)
        return false;
    if (c->p->hierarchical && node_of(c, h) != node_of(c, g)) {
        /* Another node: only experts whose groups are already on both
         * sides may cross.  With groups kept on one node (the usual
         * case) no GPU of another node qualifies: skipped in O(S). */
        const uint32_t nd = node_of(c, h);
        if (c->to_node[nd] == 0) { /* once per node: whether a group of g's experts is on it */
            bool to_h = false;
            for (uint32_t i = 0; i < S && !to_h; i++)
                to_h = group_on_node(c, L, L->row[g0 + i], nd);
            c->to_node[nd] = to_h ? 1 : 2;
        }
        if (c->to_node[nd] == 2)
            return true;
        bool to_g = false;
        for (uint32_t t = h * S; t < (h + 1) * S && !to_g; t++)
            to_g = group_on_node(c, L, L->row[t], node_of(c, g));
        if (!to_g)
            return true;
    }
    /* This GPU's cheapest swap: a half is free only where h holds or
     * held one of g's experts, or g one of h's (shares). */
    const bool shared = c->shares[h] == tick;
    if (bound / (2 * SLOT_COST + (shared ? 0 : ml) + (shared ? 0 : ml)) < best->score)
        return true;
    /* The cost bound of each half: free where the GPU holds or held
     * the expert.  The inner loop is then a few flops per pair, and
     * only a pair that could beat the best is priced exactly. */
    double *to_h = c->lb;
    for (uint32_t i = 0; i < S; i++)
        to_h[i] = 2 * SLOT_COST + (c->holds[(size_t)i * c->G + h] == tick ? 0 : ml);
    for (uint32_t t = h * S; t < (h + 1) * S; t++) {
        const double xb = x[t];
        const int32_t b = L->row[t];
        const double to_g = c->on_g[b] == tick ? 0 : ml;
        /* g's replicas heaviest first: d falls with j.  A pair gains
         * at most min(d, room - d), and its cost is at least
         * 2 SLOT_COST + to_g, so once d is below what that cost needs
         * no later one passes the test below (the same products:
         * rounding cannot let one through that this stops); past
         * ones with room - d below it are skipped. */
        const double need = best->score * (2 * SLOT_COST + to_g) * (1 - 1e-12);
        uint32_t j = 0;
        for (; j < S; j++) {
            const double d = xs[j] - xb;
            if (d < need)
                break;
            if (room - d < need)
                continue;
            const uint32_t i = si[j];
            double gain = d < room - d ? d : room - d;
            gain = gain < c->cap ? gain : c->cap;
            /* score * cost may round above gain when gain / cost equals
             * the score: the slack keeps such ties, which the exact
             * score and consider's order then settle. */
            if (!(gain > thr) || gain < best->score * (to_h[i] + to_g) * (1 - 1e-12))
                continue;
            const uint32_t s = g0 + i;
            const int32_t a = L->row[s];
            if (a == b)
                continue;
            if (c->p->hierarchical && node_of(c, h) != node_of(c, g) &&
                (!group_on_node(c, L, a, node_of(c, h)) || !group_on_node(c, L, b, node_of(c, g))))
                continue;
            /* The marks say which half is free (source_link's comment). */
            const uint32_t ca = c->holds[(size_t)i * c->G + h] != tick, cb = c->on_g[b] != tick;
            /* source_link walks the first replicas (about cnt of them) */
            c->work += (ca ? (uint32_t)L->cnt[a] : 0) + (cb ? (uint32_t)L->cnt[b] : 0);
            const double cost = (ca ? source_link(c, L, a, h) : 0) + (cb ? source_link(c, L, b, g) : 0) +
                                2 * SLOT_COST;
            if (!affordable(c, ca + cb, 2)) {
                c->budget_refused = true;
                continue;
            }
            change ch = { .kind = CH_SWAP, .s = s, .t = t, .b = -1, .gain = gain, .cost = cost, .score = gain / cost,
                          .copies = ca + cb, .slots = 2 };
            consider(best, &ch);
        }
        c->work += j + 1;
    }
    return true;
}

/* The experts that may give up a replica (can_give_replica), from the
 * bitmap of those with two or more, ascending: each one's two heaviest
 * GPUs into c->a_gpu (UINT32_MAX none; for a_side_low) and, donors not
 * NULL, their slots into donors.  Returns the slots. */
static uint32_t find_donors(ctx *c, const layer_state *L, uint32_t *donors) {
    uint32_t n = 0;
    for (uint32_t wd = 0; wd < (c->N + 63) / 64; wd++) {
        for (uint64_t bits = L->multi[wd]; bits; bits &= bits - 1) {
            const uint32_t a = wd * 64 + eplb_ctz64(bits);
            if (!can_give_replica(L, (int32_t)a))
                continue;
            uint32_t q1 = UINT32_MAX, q2 = UINT32_MAX;
            for (int32_t u = L->head[a]; u >= 0; u = L->next[u]) {
                const uint32_t q = gpu_of(c, (uint32_t)u);
                if (donors)
                    donors[n] = (uint32_t)u;
                n++;
                if (q == q1 || q == q2)
                    continue;
                if (q1 == UINT32_MAX || L->load[q] > L->load[q1]) {
                    q2 = q1;
                    q1 = q;
                } else if (q2 == UINT32_MAX || L->load[q] > L->load[q2]) {
                    q2 = q;
                }
            }
            c->a_gpu[2 * a] = q1;
            c->a_gpu[2 * a + 1] = q2;
        }
    }
    return n;
}

/* The layer's best change now (kind NONE when none improves or fits). */
static void find_best(ctx *c, layer_state *L) {
    change best = { .kind = CH_NONE, .score = -INFINITY };
    L->best = best;
    L->key = -INFINITY;
    L->stale = false;
    c->budget_refused = false;
    const uint32_t g = busiest(c, L);
    const double M = L->load[g];
    if (L->done || !(M > 0) || M <= L->target || L->changes >= c->P || c->work > c->work_max) {
        L->done = true;
        return;
    }
    if (c->p->slots_budget && c->slots_left == 0) { /* every change rewrites a slot: none is affordable */
        L->done = true;
        c->budget_stopped = true;
        return;
    }
    const uint32_t S = c->S, g0 = g * S;
    /* SWAP: s on g, t elsewhere.  GPUs lightest first: a swap with h gains
     * at most (M - load[h]) / 2, so once that cannot beat the best even
     * at the least cost, no heavier GPU can either. */
    uint32_t *order = L->order;
    for (uint32_t i = 1; i < c->G; i++) { /* insertion sort: nearly sorted since the last search */
        uint32_t v = order[i], j = i;
        while (j > 0 && (L->load[order[j - 1]] > L->load[v] ||
                         (L->load[order[j - 1]] == L->load[v] && order[j - 1] > v))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = v;
    }
    /* Per-replica load of every slot (kept with the row): the swaps' inner
     * loop is then adds and compares only. */
    const double *x = L->x;
    /* The donors: slots whose expert a has another replica and may lose
     * one, the only ones REPL may take (repl_loads refuses the rest: about
     * half the slots with two or more replicas, whose expert would exceed
     * the item bound); by expert, and each expert's two heaviest GPUs for
     * a_side_low. */
    const uint32_t ndonors = find_donors(c, L, c->donors);
    c->work += c->N + ndonors;
    double xmax = 0;
    for (uint32_t s = g0; s < g0 + S; s++)
        xmax = x[s] > xmax ? x[s] : xmax;
    const double thr = MIN_REL_GAIN * M;
    /* Gains past the target are worth nothing more: with them capped,
     * every change that brings g to the target scores by its cost alone. */
    c->cap = L->target >= 0 ? M - L->target : INFINITY;
    /* Which copies are free (the GPU holds or held the expert:
     * source_link's comment): a lower bound of every candidate's cost
     * before its exact one. */
    if (++c->tick == 0) { /* wrapped: every old stamp could match again */
        memset(c->on_g, 0, ((size_t)c->N + c->P + c->G) * sizeof *c->on_g);
        c->tick = 1;
    }
    const uint32_t tick = c->tick;
    for (uint32_t i = 0; i < S; i++) {
        const int32_t a = L->row[g0 + i];
        c->on_g[a] = tick;
        c->work += mark_free_to(c, L->head, L->next, a, c->holds + (size_t)i * c->G, tick); /* cnt[a] */
        c->work += mark_free_to(c, L->ihead, L->inext, a, c->holds + (size_t)i * c->G, tick);
    }
    /* An expert g held when the call began comes back to it free; the GPUs
     * that hold it now could swap it back. */
    for (uint32_t i = 0; i < S; i++) {
        const int32_t a = L->irow[g0 + i];
        if (c->on_g[a] == tick)
            continue; /* g holds it: marked above */
        c->on_g[a] = tick;
        c->work += (uint32_t)L->cnt[a];
        for (int32_t u = L->head[a]; u >= 0; u = L->next[u])
            c->shares[gpu_of(c, (uint32_t)u)] = tick;
    }
    const double ml = c->min_link;
    /* REPL adding a replica of one of g's hottest experts anywhere. */
    int32_t hot[REPL_HOT];
    uint32_t hot_slot[REPL_HOT]; /* a slot of g holding it: its row of holds */
    uint32_t nhot = 0;
    for (uint32_t s = g0; s < g0 + S; s++) {
        const int32_t a = L->row[s];
        const double xa = L->xr[a];
        bool dup = false;
        for (uint32_t i = 0; i < nhot; i++)
            dup = dup || hot[i] == a;
        if (dup)
            continue;
        if (nhot < REPL_HOT) {
            hot_slot[nhot] = s - g0;
            hot[nhot++] = a;
        } else {
            uint32_t k = 0; /* the coolest kept, replaced when a is hotter */
            for (uint32_t i = 1; i < nhot; i++)
                if (L->xr[hot[i]] < L->xr[hot[k]])
                    k = i;
            if (xa > L->xr[hot[k]]) {
                hot[k] = a;
                hot_slot[k] = s - g0;
            }
        }
    }
    for (uint32_t i = 0; i < nhot; i++) {
        /* g sheds at most its replicas' share of the drop of b's per-replica load. */
        const int32_t b = hot[i];
        uint32_t on_g = 0;
        for (uint32_t s = g0; s < g0 + S; s++)
            on_g += L->row[s] == b;
        const double shed_off_g = on_g * (L->xr[b] - L->xup[b]);
        /* A donor slot on g itself also sheds its own replica for b's
         * new one: at most xmax - xup[b] more. */
        const double on_g_extra = xmax - L->xup[b] > 0 ? xmax - L->xup[b] : 0;
        const double shed_max = shed_off_g + on_g_extra < c->cap ? shed_off_g + on_g_extra : c->cap;
        if ((shed_max + 1e-12 * M) / SLOT_COST < best.score)
            continue; /* the slack: shed is summed apart from a candidate's gain, and may round below it */
        const uint32_t *held = c->holds + (size_t)hot_slot[i] * c->G;
        b_part bp;
        b_prepare(c, L, b, &bp);
        c->work += ndonors;
        for (uint32_t di = 0; di < ndonors; di++) {
            const uint32_t t = c->donors[di], h = gpu_of(c, t);
            if (c->p->hierarchical && !group_on_node(c, L, b, node_of(c, h)))
                continue; /* repl_loads would refuse it: b's group is not on t's node */
            const double cost_lb = SLOT_COST + (held[h] == tick ? 0 : ml);
            double shed = shed_off_g;
            if (h == g && x[t] > L->xup[b])
                shed += x[t] - L->xup[b];
            shed = shed < c->cap ? shed : c->cap;
            if (shed + 1e-12 * M < best.score * cost_lb)
                continue; /* g sheds at most shed: cannot beat the best (the slack as above) */
            if (!repl_may_beat(c, L, &bp, M, t, shed, cost_lb, &best))
                continue;
            change ch;
            eval_repl_b(c, L, g, M, t, &bp, &ch);
            if (ch.kind != CH_NONE)
                consider(&best, &ch);
        }
    }
    /* REPL dropping a replica on g for one of the lightest experts. */
    /* The REPL_COLD experts lightest after one more replica, kept sorted
     * (ties: the lower expert first).  Kept with the counts (set_counts
     * clears cold_ok): swaps, most changes, leave them as they are. */
    int32_t *cold = L->cold;
    if (!L->cold_ok) {
        double coldv[REPL_COLD];
        uint32_t nc = 0;
        for (uint32_t e = 0; e < c->N; e++) {
            const double v = L->xup[e];
            if (nc == REPL_COLD && !(v < coldv[nc - 1]))
                continue;
            uint32_t j = nc < REPL_COLD ? nc++ : nc - 1;
            while (j > 0 && coldv[j - 1] > v) {
                cold[j] = cold[j - 1];
                coldv[j] = coldv[j - 1];
                j--;
            }
            cold[j] = (int32_t)e;
            coldv[j] = v;
        }
        L->ncold = nc;
        L->cold_ok = true;
    }
    const uint32_t ncold = L->ncold;
    c->work += (uint64_t)S * ncold;
    /* g's heaviest replica it may give up: g sheds at most that minus
     * the cold expert's new replica (when g does not hold the cold one, whose
     * other replicas on g would shed too), and the cold ones come
     * lightest first, so once that cannot beat the best at the least cost
     * no later one g does not hold can (the slack as for the hot ones).
     * The best only rises, so a bound that failed stays failed. */
    double xdon = -INFINITY;
    for (uint32_t t = g0; t < g0 + S; t++)
        if (can_give_replica(L, L->row[t]) && x[t] > xdon)
            xdon = x[t];
    bool rest_out = false; /* the cold ones g does not hold, from here on, cannot beat the best */
    for (uint32_t i = 0; i < ncold && xdon > -INFINITY; i++) {
        if (c->on_g[cold[i]] != tick) {
            if (rest_out)
                continue;
            double shed = xdon - L->xup[cold[i]];
            shed = shed < c->cap ? shed : c->cap;
            if (best.kind != CH_NONE && (shed + 1e-12 * M) / SLOT_COST < best.score) {
                rest_out = true;
                continue;
            }
        }
        b_part bp;
        b_prepare(c, L, cold[i], &bp);
        for (uint32_t t = g0; t < g0 + S; t++) {
            const int32_t a = L->row[t];
            if (a == cold[i] || !can_give_replica(L, a))
                continue; /* repl_loads would refuse it */
            uint32_t copies;
            if (!repl_may_beat(c, L, &bp, M, t, INFINITY, b_fetch_cost(c, &bp, g, &copies) + SLOT_COST, &best))
                continue;
            change ch;
            eval_repl_b(c, L, g, M, t, &bp, &ch);
            if (ch.kind != CH_NONE)
                consider(&best, &ch);
        }
    }
    /* Swaps last: the re-replications (a few hundred evaluations) have
     * set a best score by then, which prunes most of the S x P pairs
     * (seeding it with the lightest GPU's swaps first was tried: 1 x 32
     * and Kimi-K2-like took 0.4% and 3% more instructions). */
    double *xs = c->xs;
    uint32_t *si = c->si;
    for (uint32_t i = 0; i < S; i++) {
        xs[i] = x[g0 + i];
        si[i] = i;
    }
    sort_desc(xs, si, S);
    c->work += S;
    if (c->p->hierarchical)
        memset(c->to_node, 0, c->nodes * sizeof *c->to_node);
    const swap_view sv = { .g = g, .g0 = g0, .tick = tick, .M = M, .xmax = xmax, .thr = thr, .ml = ml, .x = x,
                           .xs = xs, .si = si };
    for (uint32_t oi = 0; oi < c->G; oi++) {
        const uint32_t h = order[oi];
        if (h != g && !swaps_with(c, L, &sv, h, &best))
            break;
    }
    L->best = best;
    L->key = best.kind == CH_NONE ? -INFINITY : level_key(c, L, M, &best);
    if (best.kind == CH_NONE) {
        L->done = true;
        c->budget_stopped = c->budget_stopped || c->budget_refused;
    }
}

/* Each expert's slots in row [P], as head [N] / next [P] lists, ascending
 * (prepending in reverse keeps them so); head -1 for an expert row lacks. */
static void link_slots(const int32_t *row, uint32_t P, uint32_t N, int32_t *head, int32_t *next) {
    for (uint32_t e = 0; e < N; e++)
        head[e] = -1;
    for (uint32_t i = P; i-- > 0;) {
        next[i] = head[row[i]];
        head[row[i]] = (int32_t)i;
    }
}

static void list_remove(layer_state *L, int32_t e, uint32_t slot) {
    int32_t *pp = &L->head[e];
    while (*pp >= 0 && (uint32_t)*pp != slot)
        pp = &L->next[*pp];
    if (*pp >= 0)
        *pp = L->next[slot];
}

static void list_add(layer_state *L, int32_t e, uint32_t slot) {
    /* Kept ascending: walks (and so ties among them) go by slot. */
    int32_t *pp = &L->head[e];
    while (*pp >= 0 && (uint32_t)*pp < slot)
        pp = &L->next[*pp];
    L->next[slot] = *pp;
    *pp = (int32_t)slot;
}

/* Expert e's per-replica loads after its count changed. */
/* Expert e's per-replica loads and its bit in multi, from its count. */
static void set_expert_loads(layer_state *L, int32_t e) {
    L->xr[e] = L->w[e] / L->cnt[e];
    L->xup[e] = L->w[e] / (L->cnt[e] + 1);
    L->xdn[e] = L->cnt[e] >= 2 ? L->w[e] / (L->cnt[e] - 1) : INFINITY;
    const uint64_t bit = (uint64_t)1 << ((uint32_t)e % 64);
    L->multi[(uint32_t)e / 64] = L->cnt[e] >= 2 ? L->multi[(uint32_t)e / 64] | bit : L->multi[(uint32_t)e / 64] & ~bit;
}

static void set_counts(layer_state *L, int32_t e) {
    set_expert_loads(L, e);
    for (int32_t u = L->head[e]; u >= 0; u = L->next[u])
        L->x[u] = L->xr[e];
    L->cold_ok = false;
}

/* Put expert e in slot t (its old expert's bookkeeping already removed). */
static void set_slot(ctx *c, layer_state *L, uint32_t t, int32_t old, int32_t e) {
    list_remove(L, old, t);
    list_add(L, e, t);
    L->row[t] = e;
    L->x[t] = L->xr[e];
    if (c->p->hierarchical) {
        const uint32_t nd = node_of(c, gpu_of(c, t));
        L->grp_node[(size_t)((uint32_t)old / c->per_group) * c->nodes + nd]--;
        L->grp_node[(size_t)((uint32_t)e / c->per_group) * c->nodes + nd]++;
    }
}

/* One GPU's load from its slots: O(S), and exact (no running sums), so
 * loads never depend on the order of the changes that led to them. */
static void recompute_gpu(ctx *c, layer_state *L, uint32_t g) {
    double sum = 0;
    for (uint32_t i = g * c->S; i < (g + 1) * c->S; i++)
        sum += L->xr[L->row[i]];
    L->load[g] = sum;
}

/* Every GPU's load: O(P). */
static void recompute_loads(ctx *c, layer_state *L) {
    for (uint32_t g = 0; g < c->G; g++)
        recompute_gpu(c, L, g);
}

/* Recompute g once per change (touch_tick marks the ones done). */
static uint32_t recompute_once(ctx *c, layer_state *L, uint32_t g) {
    if (c->touch_tick[g] == c->eval_tick)
        return 0;
    c->touch_tick[g] = c->eval_tick;
    recompute_gpu(c, L, g);
    return 1;
}

/* Applies ch; only the GPUs it touches change load (a swap's two; a
 * re-replication's GPUs of both experts' replicas), and only they are
 * recomputed.  Returns how many were (the work it cost, in units of S). */
static uint32_t apply(ctx *c, layer_state *L, const change *ch) {
    new_touch_set(c);
    uint32_t n = 0;
    if (ch->kind == CH_SWAP) {
        const int32_t a = L->row[ch->s], b = L->row[ch->t];
        set_slot(c, L, ch->s, a, b);
        set_slot(c, L, ch->t, b, a);
        n += recompute_once(c, L, gpu_of(c, ch->s));
        n += recompute_once(c, L, gpu_of(c, ch->t));
    } else {
        const int32_t a = L->row[ch->t];
        set_slot(c, L, ch->t, a, ch->b);
        L->cnt[a]--;
        L->cnt[ch->b]++;
        set_counts(L, a);
        set_counts(L, ch->b);
        for (int32_t u = L->head[a]; u >= 0; u = L->next[u])
            n += recompute_once(c, L, gpu_of(c, (uint32_t)u));
        for (int32_t u = L->head[ch->b]; u >= 0; u = L->next[u]) /* t's GPU among them */
            n += recompute_once(c, L, gpu_of(c, (uint32_t)u));
    }
    return n;
}

/* Apply ch and account for it: the layer's max load after minus before. */
static double take(ctx *c, layer_state *L, const change *ch, eplb_incremental_stats *stats) {
    const double before = L->load[busiest(c, L)];
    c->work += (uint64_t)apply(c, L, ch) * c->S + c->G; /* the loads redone, and busiest's scans */
    L->changes++;
    L->copies += ch->copies;
    L->slots += ch->slots;
    stats->changes++;
    stats->slots_moved += ch->slots;
    stats->copies += ch->copies;
    if (c->p->copies_budget)
        c->copies_left -= ch->copies;
    if (c->p->slots_budget)
        c->slots_left -= ch->slots;
    return L->load[busiest(c, L)] - before;
}

/* Whether the work is within the bound; on two threads, both sides' (a
 * side past it alone or with the other is redone on one thread anyway, so
 * a hostile shape's splits do not run to the bound on each side), this
 * side's published first. */
static bool within_bound(ctx *c) {
    if (!c->work_peer)
        return c->work <= c->work_max;
    atomic_store_explicit(c->work_out, c->work, memory_order_relaxed);
    return c->work + atomic_load_explicit(c->work_peer, memory_order_relaxed) <= c->work_max;
}

/* Before the search: split every replica heavier than the layer's item
 * bound, heaviest first.  One slot t, whose expert keeps its replicas
 * under the bound without it, takes another replica of the heavy expert
 * b: of all such slots the one whose touched GPUs end lightest, then the
 * cheapest copy, then the lowest slot.  A split may lift the layer's max
 * for the search to bring down again (forbidding it cost 25% more bytes
 * at 1 x 32, t=0.99: splits then stall behind the busiest GPU); a layer
 * that ends above its start_max takes its saved row back.  An expert no
 * slot can split stops the phase (the search then works around it).
 * Each split is O(P x replicas). */
static void split_heavy(ctx *c, layer_state *L, int32_t *save, eplb_incremental_stats *stats) {
    while (L->changes < c->P && within_bound(c)) {
        int32_t b = -1;
        double xb = L->item_bound;
        for (uint32_t e = 0; e < c->N; e++)
            if (L->xr[e] > xb) {
                xb = L->xr[e];
                b = (int32_t)e;
            }
        if (b < 0)
            return;
        b_part bp;
        b_prepare(c, L, b, &bp);
        change best = { .kind = CH_NONE };
        double best_worst = INFINITY, best_cost = INFINITY;
        c->work += (uint64_t)c->P + c->N; /* the scan for b and the slots tried */
        /* Each donor expert's two heaviest GPUs (a_gpu, as find_best keeps
         * them) for the a-side bound below: from the few experts with two
         * or more replicas. */
        find_donors(c, L, NULL);
        for (uint32_t t = 0; t < c->P && c->work <= c->work_max; t++) {
            double worst, t_new;
            const int32_t a = L->row[t];
            if (a == b || !can_give_replica(L, a))
                continue; /* repl_loads would refuse it */
            /* worst is at least t's GPU's load after: past the best's, t
             * cannot win; at it, it may tie and win on cost.  This skips
             * about 3 in 5 of repl_loads' walks at 1 x 32.  The sum is
             * rounded otherwise than repl_loads' (base + (xup - xr)), by
             * a few ulps of base + xup, hence a slack relative to that:
             * the difference can be far smaller than its terms. */
            const double up = base_load(c, L, &bp, gpu_of(c, t)) + L->xup[b];
            if (best.kind != CH_NONE && up - L->xr[a] > best_worst + 1e-12 * up)
                continue;
            /* And at least what a GPU of a's other replicas ends with
             * (a_side_low: (base + xdn) - xr, where repl_loads sums base +
             * (xdn - xr), so the slack is relative to base + xdn). */
            const double a_low = a_side_low(c, L, &bp, t);
            if (best.kind != CH_NONE && a_low > best_worst + 1e-12 * (a_low + L->xr[a]))
                continue;
            if (!repl_loads(c, L, gpu_of(c, t), t, &bp, &worst, &t_new))
                continue;
            uint32_t copies;
            const double cost = b_fetch_cost(c, &bp, gpu_of(c, t), &copies);
            if (!affordable(c, copies, 1))
                continue;
            if (worst < best_worst || (worst == best_worst && cost < best_cost)) {
                best = (change){ .kind = CH_REPL, .s = t, .t = t, .b = b, .copies = copies, .slots = 1 };
                best_worst = worst;
                best_cost = cost;
            }
        }
        if (best.kind == CH_NONE)
            return;
        if (!L->saved) {
            L->saved = save;
            memcpy(save, L->row, c->P * sizeof *save);
            memcpy(save + c->P, L->cnt, c->N * sizeof *save);
        }
        take(c, L, &best, stats);
        stats->splits++;
        L->splits++;
    }
}

/* A layer's key before its first search: every gain is capped at
 * M - target and every change costs at least SLOT_COST (one slot
 * rewritten, its copy free), so its best score, and so its key
 * (level_key), is at most (M - target) / SLOT_COST.  The loop searches a
 * layer only when that bound reaches the heap's top (a lazy greedy): a
 * searched top whose key is at least every other key beats every other
 * layer's actual key, so the changes taken are the ones an eager search of
 * every layer takes, in the same order, and a layer the loop never reaches
 * is never searched (6% of find_best's instructions at 4 x 8).  Under a
 * budget, reprime_unaffordable keeps the keys bounds.  Without a target
 * there is no bound: the layer is searched now. */
static void prime(ctx *c, layer_state *L) {
    const double M = L->load[busiest(c, L)];
    if (L->target < 0 || !(M > L->target) || L->done) {
        find_best(c, L);
        return;
    }
    L->best = (change){ .kind = CH_NONE, .score = (M - L->target) / SLOT_COST };
    L->key = L->best.score;
    L->stale = true;
}

/* ---- a max-heap of layers by their key (level_key, or prime's bound) -- */

static bool heap_before(const layer_state *ls, uint32_t x, uint32_t y) {
    const double a = ls[x].key, b = ls[y].key;
    return a > b || (a == b && x < y);
}

static void heap_down(const layer_state *ls, uint32_t *h, uint32_t n, uint32_t i) {
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && heap_before(ls, h[l], h[m]))
            m = l;
        if (r < n && heap_before(ls, h[r], h[m]))
            m = r;
        if (m == i)
            return;
        uint32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Under a budget, a layer's best can stop fitting once another layer's
 * change has spent the budget.  What it would choose then can have a
 * higher key (a larger gain at a larger cost: each of level_key's terms
 * adds the other fixes' price to the cost), so its key is no longer a bound
 * of it: the layer goes back to prime's bound, to be searched again when
 * that reaches the top.  Without this, the lazy order and an eager search
 * of every layer differed in 123 of 20,000 random budgeted cases (a
 * reviewer's driver).  O(layers) per change taken under a budget. */
static void reprime_unaffordable(ctx *c, layer_state *ls, uint32_t *heap, uint32_t *n) {
    bool changed = false;
    for (uint32_t i = 0; i < *n;) {
        layer_state *L = &ls[heap[i]];
        if (!L->stale && L->best.kind != CH_NONE && !affordable(c, L->best.copies, L->best.slots)) {
            prime(c, L);
            changed = true;
            if (L->done) { /* prime searched it (no target) and nothing fits */
                heap[i] = heap[--*n];
                continue;
            }
        }
        i++;
    }
    c->work += *n;
    if (changed)
        for (uint32_t i = *n / 2; i-- > 0;)
            heap_down(ls, heap, *n, i);
}

/* A search context with its own scratch (NULL: out of memory).  Each
 * thread that searches has one; its layers' states are in ls. */
static ctx *ctx_new(const eplb_incremental_params *p, uint32_t N, uint32_t P, uint32_t G, uint32_t nodes,
                    uint32_t groups) {
    ctx *c = eplb_malloc(sizeof *c);
    /* donors, touch_tick, touch_at, b_stamp, b_gpus, bn_stamp, bn_cnt, bf_stamp, si, to_node, a_gpu, slot_gpu */
    uint32_t *scr = eplb_calloc((size_t)8 * G + 2 * (size_t)P + P / G + 2 * (size_t)N, sizeof *scr);
    double *x = eplb_malloc((2 * (size_t)(P / G) + G) * sizeof *x); /* lb [S], b_load [G], xs [S] */
    uint32_t *marks = eplb_calloc((size_t)N + (size_t)P + G, sizeof *marks); /* on_g [N], holds [S][G] = [P], shares [G] */
    if (!c || !scr || !x || !marks) {
        eplb_free(c);
        eplb_free(scr);
        eplb_free(x);
        eplb_free(marks);
        return NULL;
    }
    *c = (ctx){ .p = p, .N = N, .P = P, .G = G, .S = P / G, .gpn = G / nodes, .nodes = nodes, .groups = groups,
                .per_group = N / groups, .donors = scr, .touch_tick = scr + P, .touch_at = scr + G + P, .b_stamp = scr + 2 * G + P, .b_gpus = scr + 3 * G + P, .bn_stamp = scr + 4 * G + P, .bn_cnt = scr + 5 * G + P, .bf_stamp = scr + 6 * G + P, .si = scr + 7 * G + P, .to_node = scr + 7 * G + P + P / G, .a_gpu = scr + 8 * G + P + P / G, .slot_gpu = scr + 8 * G + P + P / G + 2 * N, .lb = x, .b_load = x + P / G, .xs = x + P / G + G, .on_g = marks, .holds = marks + N, .shares = marks + N + P, .copies_left = p->max_copies, .slots_left = p->max_slots, .scr = scr, .scr_x = x, .scr_marks = marks };
    c->work_max = p->max_work ? p->max_work : INCREMENTAL_MAX_WORK;
    for (uint32_t i = 0; i < P; i++)
        c->slot_gpu[i] = i / c->S;
    c->min_link = nodes > 1 && p->cost_cross_node < p->cost_intra_node ? p->cost_cross_node : p->cost_intra_node;
    if (nodes == G && G > 1)
        c->min_link = p->cost_cross_node;
    return c;
}

static void ctx_free(ctx *c) {
    if (!c)
        return;
    eplb_free(c->scr);
    eplb_free(c->scr_x);
    eplb_free(c->scr_marks);
    eplb_free(c);
}

/* ---- Two threads: the same answer, the layers split between them ------
 *
 * Without a budget the loop's answer is fixed by how many changes each
 * layer takes, and a layer's changes depend on its own state only.  Give
 * each change taken e, the lowest key its layer's changes have had up to
 * it (a running minimum).  The loop takes changes in order of e, highest
 * first, ties to the lower layer and then the earlier change: a layer's
 * later change has an e no higher, and when a change is taken every other
 * layer's waiting change has a key (so an e) no higher, ties to the lower
 * layer (heap_before).  (Checked on about 260,000 takes of
 * bench_incremental, docs/benchmarks.md.)  So the even layers (this
 * thread) and the odd ones (a helper) each run the loop over their own
 * heap, the helper logging each change it takes, and this thread merges
 * the two streams by e, adding each change's max delta to the total in
 * that order, and stops where the loop stops: at the target, or when both
 * run out.  The helper stays at most TWO_AHEAD changes ahead; what it took
 * past the stop is undone (untake: every change has an exact inverse,
 * loads are recomputed from the slots).
 *
 * The layers' set-up, splits and prime come first, each layer taken by
 * whichever thread is free (a layer's depend on it alone: take_layers),
 * and the helper is started before them: a thread's start took p50 167 us
 * and p90 1.3 ms on this VM class, so this thread does as many layers as
 * the helper's start costs.  The sum of the layers' max loads is then
 * taken in layer order, as the one-thread loop has it.  A helper that has
 * not arrived by then is not waited for (with threads = 0): the loop runs
 * on this thread (3 of 90 calls at 1 x 32).  It is detached, and this
 * thread waits on its last flag rather than a join (45-70 us a call).
 *
 * What differs: the work count (each side searches its own stale tops,
 * and the helper's changes past the stop count too).  If the two sides'
 * work passes the compute bound (where one thread would have stopped
 * earlier), a log fills, or a layer is not valid (the one-thread run
 * names the first), the call is redone on this thread alone from its
 * input, kept for that: as if this had not happened.
 * Only on the global path without a budget: a budget couples the layers
 * (what one spends another cannot), and the node repairs' share of the
 * compute bound is what the search left, counted in the loop's order. */
#define TWO_AHEAD 32

typedef struct took {
    uint32_t l;
    int32_t old;          /* REPL: the expert slot ch.t held */
    double e, delta;      /* the change's e, and the layer's max after minus before */
    change ch;
} took;

typedef struct side {
    ctx *c;
    layer_state *ls;
    uint32_t *heap, n;
    double *eprev;        /* [layers] each layer's e so far (INFINITY: none taken) */
    took *log;            /* [cap] the changes taken, in order */
    uint32_t nlog, cap;
    eplb_incremental_stats *st;
    const _Atomic bool *stop; /* the helper's side: stop searching when set (NULL: never) */
} side;

/* The e of layer l's next change: its key, or a lower e it had. */
static double side_e(const side *sd, uint32_t l) {
    return sd->ls[l].key < sd->eprev[l] ? sd->ls[l].key : sd->eprev[l];
}

/* The side's next change (searching stale tops, as the loop does): its
 * layer and e.  false: none left. */
static bool side_peek(side *sd, uint32_t *l, double *e) {
    while (sd->n && !(sd->stop && atomic_load_explicit(sd->stop, memory_order_relaxed))) {
        const uint32_t top = sd->heap[0];
        layer_state *L = &sd->ls[top];
        if (!L->stale) {
            *l = top;
            *e = side_e(sd, top);
            return true;
        }
        find_best(sd->c, L);
        if (L->done)
            sd->heap[0] = sd->heap[--sd->n];
        heap_down(sd->ls, sd->heap, sd->n, 0);
    }
    return false;
}

/* Takes the change side_peek found (false: the log is full); *delta as take's. */
static bool side_take(side *sd, double *delta) {
    if (sd->nlog == sd->cap)
        return false;
    const uint32_t l = sd->heap[0];
    layer_state *L = &sd->ls[l];
    took *t = &sd->log[sd->nlog++];
    t->l = l;
    t->e = side_e(sd, l);
    t->ch = L->best;
    t->old = L->best.kind == CH_REPL ? L->row[L->best.t] : -1;
    sd->eprev[l] = t->e;
    t->delta = take(sd->c, L, &L->best, sd->st);
    *delta = t->delta;
    find_best(sd->c, L);
    if (L->done)
        sd->heap[0] = sd->heap[--sd->n];
    heap_down(sd->ls, sd->heap, sd->n, 0);
    return true;
}

/* Undoes a logged change: its inverse, and its counts off the layer and st. */
static void untake(ctx *c, layer_state *L, const took *t, eplb_incremental_stats *st) {
    change back = t->ch;
    if (back.kind == CH_REPL)
        back.b = t->old;
    apply(c, L, &back);
    L->changes--;
    L->copies -= t->ch.copies;
    L->slots -= t->ch.slots;
    st->changes--;
    st->slots_moved -= t->ch.slots;
    st->copies -= t->ch.copies;
}

/* The blocks every layer's state lives in, and where layer l's part is:
 * layer_init sets a layer up from them, on either thread. */
typedef struct layer_arena {
    const eplb_incremental_params *p;
    int32_t *phy2log, *logcnt;
    double *dbl;                /* w, xr, xup, xdn [N], load [G], x [P] per layer */
    int32_t *ints;              /* head, next, ihead, inext, grp_node (and irow) per layer */
    size_t per_layer;           /* ints per layer */
    uint32_t *order;            /* [G] per layer */
    uint64_t *multi;            /* [N/64 rounded up] per layer */
    int32_t *saved;             /* [P + N] per layer: the row and counts before the splits (NULL: no reference_cnt) */
    uint32_t groups, nodes;
} layer_arena;

/* Layer l's state from its row, counts and load; EINVAL (err NULL: no
 * message) when an expert has no replica, or no source in initial_row.
 * Writes only layer l's parts (logcnt's row: recounted). */
static eplb_status layer_init(ctx *c, layer_state *L, uint32_t l, const layer_arena *ar, eplb_error *err) {
    const eplb_incremental_params *p = ar->p;
    const uint32_t N = c->N, P = c->P, G = c->G, groups = ar->groups, nodes = ar->nodes;
    L->row = ar->phy2log + (size_t)l * P;
    L->cnt = ar->logcnt + (size_t)l * N;
    L->w = ar->dbl + (size_t)l * (4 * (size_t)N + G + P);
    L->xr = L->w + N;
    L->xup = L->xr + N;
    L->xdn = L->xup + N;
    L->load = L->xdn + N;
    L->x = L->load + G;
    L->order = ar->order + (size_t)l * G;
    for (uint32_t g = 0; g < G; g++)
        L->order[g] = g;
    L->head = ar->ints + (size_t)l * ar->per_layer;
    L->next = L->head + N;
    L->ihead = L->next + P;
    L->inext = L->ihead + N;
    L->grp_node = L->inext + P;
    L->target = p->layer_floor ? p->layer_floor[l] * FIX_DEPTH : -1;
    L->item_bound = INFINITY;
    for (uint32_t e = 0; e < N; e++) {
        L->w[e] = (double)p->logical_load[(size_t)l * N + e];
        L->cnt[e] = 0;
    }
    link_slots(L->row, P, N, L->head, L->next);
    memset(L->grp_node, 0, (size_t)groups * nodes * sizeof *L->grp_node);
    for (uint32_t g = 0; g < G; g++) { /* by GPU: one division per GPU, not three per slot */
        const uint32_t node = node_of(c, g);
        for (uint32_t i = g * c->S; i < (g + 1) * c->S; i++) {
            const int32_t e = L->row[i];
            L->cnt[e]++;
            L->grp_node[(groups > 1 ? (size_t)((uint32_t)e / c->per_group) * nodes : 0) + node]++;
        }
    }
    for (uint32_t e = 0; e < N; e++)
        if (L->cnt[e] <= 0)
            return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: layer %u has an expert without a replica", l);
    /* set_counts of every expert, with x filled by slot rather than
     * by each expert's replica list (the same values). */
    L->multi = ar->multi + (size_t)l * ((N + 63) / 64);
    for (uint32_t e = 0; e < N; e++)
        set_expert_loads(L, (int32_t)e);
    for (uint32_t i = 0; i < P; i++)
        L->x[i] = L->xr[L->row[i]];
    L->cold_ok = false;
    recompute_loads(c, L);
    if (p->initial_row) {
        L->irow = p->initial_row + (size_t)l * P;
    } else {
        int32_t *copy = L->grp_node + (size_t)groups * nodes;
        memcpy(copy, L->row, P * sizeof *copy);
        L->irow = copy;
    }
    link_slots(L->irow, P, N, L->ihead, L->inext);
    for (uint32_t e = 0; e < N; e++)
        if (L->ihead[e] < 0) /* initial_row only: no source to copy it from */
            return eplb_error_set(err, EPLB_EINVAL,
                                  "incremental rebalance: initial_row layer %u has no replica of expert %u", l, e);
    L->start_max = L->load[busiest(c, L)];
    return EPLB_OK;
}

/* Under a budget too: without the bound and the splits the counts drift
 * over rebalances (each budget spent on the max load now), and so does the
 * balance.  bench_incremental, 1 x 32, slow drift, t=0.99 with
 * max_slots_moved 1% / 2% / 5% / 10% of the slots, balancedness against
 * DeepSeek's: 0.870 / 0.903 / 0.918 / 0.923 without them (0.970 at the
 * first rebalance, 0.882 at the 50th with 5%), 0.872 / 0.921 / 0.967 /
 * 0.990 with them.  The splits pay from the budget like any change, and
 * the layers take them in order (a quarter of a small budget can go to the
 * first). */
static void layer_split(ctx *c, layer_state *L, uint32_t l, const layer_arena *ar, eplb_incremental_stats *stats) {
    const eplb_incremental_params *p = ar->p;
    if (!p->reference_cnt)
        return;
    const uint32_t N = c->N;
    double x = 0;
    for (uint32_t e = 0; e < N; e++) {
        const int32_t rc = p->reference_cnt[(size_t)l * N + e];
        if (rc > 0 && L->w[e] / rc > x)
            x = L->w[e] / rc;
    }
    L->item_bound = x > 0 ? x * ITEM_SLACK : INFINITY; /* no loaded expert counted: no bound */
    split_heavy(c, L, ar->saved + (size_t)l * (c->P + N), stats);
}

/* The hand-off: the helper writes b.log[i], then publishes produced =
 * i + 1 (release); this thread reads produced (acquire), then the entry.
 * Each side waits for the other by spinning, then yielding: a change is
 * a few microseconds of search, and a sleep on a condition variable cost
 * tens of them per change on this VM class (the two threads were slower
 * than one at 1 x 32, t=0.95). */
enum { HELPER_PENDING, HELPER_ARRIVED, HELPER_CANCELLED };

typedef struct duo {
    side b;                    /* the helper's side: its own until it finishes, but b.log[0, produced) */
    eplb_incremental_stats st; /* its counts */
    const layer_arena *ar;
    uint32_t layers;
    bool late;                 /* params.test.helper_late: before it arrives the helper reads only d's own fields */
    /* Each on its own cache line: the two threads write them on every change. */
    alignas(64) _Atomic uint32_t produced; /* entries of b.log the helper has published */
    alignas(64) _Atomic uint32_t consumed; /* of them, the ones this thread took: the helper stays TWO_AHEAD
                                              ahead at most */
    alignas(64) _Atomic uint64_t work;     /* the helper's ctx's work at its last step */
    alignas(64) _Atomic uint64_t main_work; /* this thread's ctx's work, as of its last step */
    alignas(64) _Atomic bool stop;         /* this thread is done with it (or the two passed the bound) */
    _Atomic bool go;                       /* the heaps are built: the helper may take changes */
    _Atomic bool finished;                 /* it published its last entry and touches nothing shared any more */
    alignas(64) _Atomic uint32_t next_layer; /* the layers' set-up: the next one to take, either thread */
    _Atomic uint32_t layers_done;          /* of them, finished (each taken once) */
    _Atomic bool bad;                      /* a layer not valid: the rest are only counted */
    _Atomic uint32_t state;                /* HELPER_PENDING until it arrives, or this thread goes on alone */
    _Atomic uint32_t owners;               /* 2, or 1 without a helper: the last to leave frees this block (a
                                              cancelled helper may wake after the call) */
} duo;

static void duo_leave(duo *d) {
    if (atomic_fetch_sub_explicit(&d->owners, 1, memory_order_acq_rel) == 1)
        eplb_free(d);
}

static void pause_a_moment(uint32_t *spins) {
    if (++*spins > 64)
        sched_yield();
}

/* The layers' set-up, splits and prime, taken one at a time from
 * next_layer by either thread (a layer's come out the same on either), so
 * that neither waits for the other to start: a thread's start took p50
 * 167 us and p90 1.3 ms on this VM class.  A layer not valid sets bad, and
 * the rest are only counted.  Publishes the work (c->work_out) before each
 * count (the calling thread reads both after the last). */
static void take_layers(duo *d, ctx *c, layer_state *ls, eplb_incremental_stats *st) {
    for (;;) {
        const uint32_t l = atomic_fetch_add_explicit(&d->next_layer, 1, memory_order_relaxed);
        if (l >= d->layers)
            return;
        if (!atomic_load_explicit(&d->bad, memory_order_relaxed)) {
            if (layer_init(c, &ls[l], l, d->ar, NULL) != EPLB_OK) {
                atomic_store_explicit(&d->bad, true, memory_order_relaxed);
            } else {
                layer_split(c, &ls[l], l, d->ar, st);
                prime(c, &ls[l]);
            }
        }
        atomic_store_explicit(c->work_out, c->work, memory_order_relaxed);
        atomic_fetch_add_explicit(&d->layers_done, 1, memory_order_release);
    }
}

static void *helper_main(void *arg) {
    duo *d = arg;
    uint32_t spins = 0;
    /* Tests (params.test.helper_late): a helper that starts only once the
     * layers are done, when the calling thread may already have gone on
     * alone (threads = 0) or waits for it (threads = 2). */
    while (d->late && atomic_load_explicit(&d->layers_done, memory_order_acquire) < d->layers &&
           !atomic_load_explicit(&d->bad, memory_order_relaxed))
        pause_a_moment(&spins);
    uint32_t expect = HELPER_PENDING;
    if (!atomic_compare_exchange_strong_explicit(&d->state, &expect, HELPER_ARRIVED, memory_order_acq_rel,
                                                 memory_order_acquire)) {
        duo_leave(d); /* too late: the calling thread went on alone */
        return NULL;
    }
    side *sd = &d->b;
    ctx *c = sd->c;
    take_layers(d, c, sd->ls, &d->st);
    spins = 0;
    while (!atomic_load_explicit(&d->go, memory_order_acquire) && !atomic_load_explicit(&d->stop, memory_order_relaxed))
        pause_a_moment(&spins);
    for (bool more = atomic_load_explicit(&d->go, memory_order_acquire);;) {
        spins = 0;
        while (more && !atomic_load_explicit(&d->stop, memory_order_relaxed) &&
               sd->nlog - atomic_load_explicit(&d->consumed, memory_order_relaxed) >= TWO_AHEAD)
            pause_a_moment(&spins);
        uint32_t l;
        double e, delta;
        more = more && within_bound(c) && !atomic_load_explicit(&d->stop, memory_order_relaxed) &&
               side_peek(sd, &l, &e) && side_take(sd, &delta);
        atomic_store_explicit(&d->work, c->work, memory_order_relaxed);
        if (!more) {
            /* The last thing it does with the call's state: the calling thread may free it then. */
            atomic_store_explicit(&d->finished, true, memory_order_release);
            duo_leave(d);
            return NULL;
        }
        atomic_store_explicit(&d->produced, sd->nlog, memory_order_release);
    }
}

/* The CPUs this process may run on (affinity; 1 when unknown). */
static int cpus_to_run_on(void) {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
}

/* Done with the helper: one that has not arrived never will (it only
 * leaves d); one that has is stopped and waited for, on its last flag
 * rather than a join (45-70 us a call): it is detached. */
static bool release_helper(duo *d) {
    uint32_t expect = HELPER_PENDING;
    if (atomic_compare_exchange_strong_explicit(&d->state, &expect, HELPER_CANCELLED, memory_order_acq_rel,
                                                memory_order_acquire))
        return false;
    atomic_store_explicit(&d->stop, true, memory_order_relaxed);
    uint32_t spins = 0;
    while (!atomic_load_explicit(&d->finished, memory_order_acquire))
        pause_a_moment(&spins);
    return true;
}

/* The whole search on two threads (eplb_incremental_rebalance's layers
 * set up, split and primed by whichever thread takes them, then searched,
 * the even ones here and the odd ones on a helper); *total as the
 * one-thread loop ends with.  TWO_DONE; TWO_ONE_LOOP: the layers are
 * primed and *total set, but the helper had not arrived, so the caller
 * runs the loop on this thread (the same answer, and it waits for no
 * thread that is slow to start); or the caller restores the input and
 * runs on one thread: TWO_NOT_STARTED (no memory, no thread), TWO_UNDONE
 * (a layer not valid, so that the one-thread run names the first; a log
 * full; the compute bound passed). */
enum { TWO_DONE, TWO_ONE_LOOP, TWO_NOT_STARTED, TWO_UNDONE };

static int search_two_threads(ctx *c, layer_state *ls, const layer_arena *ar, double *total,
                              eplb_incremental_stats *stats) {
    const eplb_incremental_params *p = c->p;
    const uint32_t Lyr = p->shape.num_layers;
    /* changes per layer are at most P; a side has at most (Lyr + 1) / 2 layers */
    const uint64_t most = (uint64_t)(Lyr + 1) / 2 * c->P + 64;
    uint32_t cap = most < (1u << 16) ? (uint32_t)most : (1u << 16);
    if (p->test.log_cap && p->test.log_cap < cap)
        cap = p->test.log_cap;
    duo *d = eplb_calloc(1, sizeof *d);
    double *eprev = eplb_malloc(2 * (size_t)Lyr * sizeof *eprev); /* one array per side: no shared cache lines */
    uint32_t *heaps = eplb_malloc((size_t)Lyr * sizeof *heaps);
    took *logs = eplb_malloc(2 * (size_t)cap * sizeof *logs);
    ctx *cb = ctx_new(p, c->N, c->P, c->G, ar->nodes, ar->groups);
    int result = TWO_NOT_STARTED;
    bool started = false, arrived = false;
    if (d)
        atomic_init(&d->owners, 1); /* this thread's; the helper's from its start */
    if (!d || !eprev || !heaps || !logs || !cb)
        goto out;
    cb->ls = ls;
    c->work_out = &d->main_work;
    c->work_peer = &d->work;
    cb->work_out = &d->work;
    cb->work_peer = &d->main_work;
    side a = { .c = c, .ls = ls, .heap = heaps, .eprev = eprev, .log = logs, .cap = cap, .st = stats };
    d->b = (side){ .c = cb, .ls = ls, .heap = heaps + (Lyr + 1) / 2, .eprev = eprev + Lyr, .log = logs + cap,
                   .cap = cap, .st = &d->st, .stop = &d->stop };
    d->ar = ar;
    d->layers = Lyr;
    d->late = p->test.helper_late;
    for (uint32_t l = 0; l < Lyr; l++)
        eprev[l] = eprev[Lyr + l] = INFINITY;
    atomic_init(&d->produced, 0);
    atomic_init(&d->consumed, 0);
    atomic_init(&d->work, 0);
    atomic_init(&d->main_work, 0);
    atomic_init(&d->stop, false);
    atomic_init(&d->go, false);
    atomic_init(&d->finished, false);
    atomic_init(&d->next_layer, 0);
    atomic_init(&d->layers_done, 0);
    atomic_init(&d->bad, false);
    atomic_init(&d->state, HELPER_PENDING);
    atomic_store_explicit(&d->owners, 2, memory_order_relaxed);
    pthread_t helper;
    if (p->test.thread_fails || pthread_create(&helper, NULL, helper_main, d) != 0) {
        atomic_store_explicit(&d->owners, 1, memory_order_relaxed);
        goto out;
    }
    pthread_detach(helper);
    started = true;
    result = TWO_UNDONE;
    take_layers(d, c, ls, stats);
    uint32_t spins = 0; /* every layer is taken: wait for one the helper may be in */
    while (atomic_load_explicit(&d->layers_done, memory_order_acquire) < Lyr)
        pause_a_moment(&spins);
    if (atomic_load_explicit(&d->bad, memory_order_relaxed) || !within_bound(c))
        goto out; /* a layer not valid, or the splits passed the bound: one thread redoes it */
    /* The sum in layer order, as the one-thread loop has it. */
    *total = 0;
    for (uint32_t l = 0; l < Lyr; l++)
        *total += ls[l].load[busiest(c, &ls[l])];
    if (at_target(p, *total)) {
        result = TWO_DONE; /* the splits were all it took */
        goto out;
    }
    /* Asked for two threads (threads >= 2), wait for the helper; else a
     * helper that has not arrived yet is not waited for. */
    spins = 0;
    while (p->threads >= 2 && atomic_load_explicit(&d->state, memory_order_acquire) == HELPER_PENDING)
        pause_a_moment(&spins);
    uint32_t expect = HELPER_PENDING;
    if (atomic_compare_exchange_strong_explicit(&d->state, &expect, HELPER_CANCELLED, memory_order_acq_rel,
                                                memory_order_acquire)) {
        started = false; /* it never arrived, and now never will: this thread did every layer */
        result = TWO_ONE_LOOP;
        goto out;
    }
    for (uint32_t l = 0; l < Lyr; l++)
        if (!ls[l].done) {
            side *sd = l % 2 ? &d->b : &a;
            sd->heap[sd->n++] = l;
        }
    for (uint32_t i = a.n / 2; i-- > 0;)
        heap_down(ls, a.heap, a.n, i);
    for (uint32_t i = d->b.n / 2; i-- > 0;)
        heap_down(ls, d->b.heap, d->b.n, i);
    atomic_store_explicit(&d->go, true, memory_order_release);
    uint32_t consumed = 0;
    bool full = false;
    while (!at_target(p, *total)) {
        uint32_t la = 0;
        double ea = 0;
        const bool ha = side_peek(&a, &la, &ea);
        uint32_t produced;
        bool finished;
        spins = 0;
        bool over;
        for (;;) { /* finished first: what it published before is then in produced */
            finished = atomic_load_explicit(&d->finished, memory_order_acquire);
            produced = atomic_load_explicit(&d->produced, memory_order_acquire);
            over = !within_bound(c);
            if (produced > consumed || finished || over)
                break;
            pause_a_moment(&spins);
        }
        const bool hb = produced > consumed;
        /* the helper stopped short of the end (its log is full), or the
         * two sides passed the compute bound: undone */
        full = (!hb && finished && d->b.n > 0) || over;
        if (full || (!ha && !hb))
            break;
        const took *tb = hb ? &d->b.log[consumed] : NULL;
        if (ha && (!hb || ea > tb->e || (ea == tb->e && la < tb->l))) {
            double delta;
            if (!side_take(&a, &delta)) {
                full = true;
                break;
            }
            *total += delta;
        } else {
            *total += tb->delta;
            consumed++;
            atomic_store_explicit(&d->consumed, consumed, memory_order_relaxed);
        }
    }
    arrived = release_helper(d);
    started = false;
    if (full || c->work + cb->work > c->work_max)
        goto out;
    /* The helper's changes past the stop, last first. */
    for (uint32_t i = d->b.nlog; i-- > consumed;)
        untake(c, &ls[d->b.log[i].l], &d->b.log[i], &d->st);
    d->b.nlog = consumed;
    result = TWO_DONE;
out:
    if (started) /* it may still be setting up layers or searching: stop it first */
        arrived = release_helper(d);
    c->work_out = NULL; /* one thread from here */
    c->work_peer = NULL;
    if (result == TWO_DONE || result == TWO_ONE_LOOP) { /* the helper's layers and changes, if it arrived */
        c->work += cb->work;
        stats->changes += d->st.changes;
        stats->splits += d->st.splits;
        stats->slots_moved += d->st.slots_moved;
        stats->copies += d->st.copies;
        if (result == TWO_DONE && arrived)
            stats->threads = 2; /* the helper took part (at the target after the splits, it may not have) */
    }
    ctx_free(cb);
    eplb_free(logs);
    eplb_free(heaps);
    eplb_free(eprev);
    if (d)
        duo_leave(d);
    return result;
}

/* The search from a valid input; two: on two threads (search_two_threads),
 * where *redo says it must be redone on one (from the input, restored), and
 * *undone that the two threads ran first. */
static eplb_status rebalance_run(const eplb_incremental_params *p, int32_t *phy2log, int32_t *logcnt,
                                 eplb_incremental_stats *stats, bool two, bool *redo, bool *undone,
                                 eplb_error *err) {
    eplb_status st = EPLB_OK;
    const uint32_t Lyr = p->shape.num_layers, N = p->shape.num_logical, P = p->shape.num_physical,
                   G = p->shape.num_gpus;
    /* Nodes price links always; they constrain groups only when hierarchical. */
    const uint32_t nodes = p->shape.num_nodes && G % p->shape.num_nodes == 0 ? p->shape.num_nodes : 1;
    double total = 0; /* sum over layers of the max GPU load: balancedness = sum of means / this */
    const uint32_t groups = p->hierarchical ? p->shape.num_groups : 1;
    ctx *c = ctx_new(p, N, P, G, nodes, groups);
    layer_state *ls = eplb_calloc(Lyr, sizeof *ls);
    double *dbl = eplb_malloc(((size_t)Lyr * (4 * (size_t)N + G + P)) * sizeof(double)); /* w, xr, xup, xdn, load, x */
    /* head, next, grp_node; ihead, inext; irow when the caller gives no initial_row */
    const size_t per_layer = 2 * (size_t)N + (p->initial_row ? 2 : 3) * (size_t)P + (size_t)groups * nodes;
    int32_t *ints = eplb_malloc((size_t)Lyr * per_layer * sizeof(int32_t));
    uint32_t *heap = eplb_malloc((size_t)Lyr * sizeof *heap);
    uint32_t *order = eplb_malloc((size_t)Lyr * G * sizeof *order); /* each layer's GPU order */
    int32_t *saved = p->reference_cnt ? eplb_malloc((size_t)Lyr * (P + N) * sizeof *saved) : NULL;
    uint64_t *multi = eplb_calloc((size_t)Lyr * ((N + 63) / 64), sizeof *multi); /* each layer's L->multi */
    if (!c || !ls || !dbl || !ints || !heap || !order || (p->reference_cnt && !saved) || !multi) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for an incremental %ux%u rebalance", Lyr, P);
        goto out;
    }
    c->ls = ls;
    const layer_arena ar = { .p = p, .phy2log = phy2log, .logcnt = logcnt, .dbl = dbl, .ints = ints,
                             .per_layer = per_layer, .order = order, .multi = multi, .saved = saved,
                             .groups = groups, .nodes = nodes };
    stats->threads = 1;
    uint32_t n = 0;
    if (two) {
        const int r = search_two_threads(c, ls, &ar, &total, stats);
        if (r == TWO_ONE_LOOP) { /* every layer primed here: the loop below, on this thread */
            for (uint32_t l = 0; l < Lyr; l++)
                if (!ls[l].done)
                    heap[n++] = l;
        } else if (r != TWO_DONE) {
            *undone = r == TWO_UNDONE;
            *redo = true;
            goto out;
        }
    } else {
        for (uint32_t l = 0; l < Lyr; l++)
            if ((st = layer_init(c, &ls[l], l, &ar, err)) != EPLB_OK)
                goto out;
        /* Every layer is valid: only now may one change.  The splits may
         * spend a quarter of a budget at most, so that the search always has
         * most of it: they come layer by layer, and a split that lifts a
         * layer's max the search cannot bring back is undone at the end, its
         * copies wasted.  bench_incremental, slow drift, t=0.99 with
         * max_slots_moved 0.1% of the slots, balancedness against DeepSeek's
         * with the splits' share at half / a quarter / none (no splits under a
         * budget, as before): 4 x 8 0.923 / 0.935 / 0.941, 1 x 32 0.643 /
         * 0.650 / 0.653.  From 1% on, half and a quarter are within 0.003. */
        const uint64_t held_copies = c->copies_left - c->copies_left / 4, held_slots = c->slots_left - c->slots_left / 4;
        c->copies_left -= held_copies;
        c->slots_left -= held_slots;
        /* Under a budget, a model already at its target spends none of it,
         * not even on splits (they pay now for later).  Without one the item
         * bound holds for the answer whatever the target (no replica above it
         * unless it was; a node repair's moved groups rely on that), so the
         * splits run. */
        double start_total = 0;
        for (uint32_t l = 0; l < Lyr; l++)
            start_total += ls[l].start_max;
        const bool met_at_start = (p->copies_budget || p->slots_budget) && at_target(p, start_total);
        for (uint32_t l = 0; l < Lyr; l++) {
            layer_state *L = &ls[l];
            if (!met_at_start)
                layer_split(c, L, l, &ar, stats);
            total += L->load[busiest(c, L)];
        }
        c->copies_left += held_copies;
        c->slots_left += held_slots;
        /* The current placement may not be hierarchical (say, registered with
         * the initial map): then the constraint is only "do not spread a group
         * further", which grp_node enforces as it is. */
        for (uint32_t l = 0; l < Lyr; l++) {
            prime(c, &ls[l]);
            if (!ls[l].done)
                heap[n++] = l;
        }
    }
    for (uint32_t i = n / 2; i-- > 0;)
        heap_down(ls, heap, n, i);
    /* total is kept exact enough: each step swaps one layer's max. */
    while (n && !at_target(p, total)) {
        if (c->work > c->work_max) {
            stats->work_exhausted = true; /* the caller's fallback takes over */
            break;
        }
        const uint32_t l = heap[0];
        layer_state *L = &ls[l];
        bool took = false;
        if (L->stale) {
            find_best(c, L); /* its first search: the key falls to its actual best */
        } else if (!affordable(c, L->best.copies, L->best.slots)) {
            /* The budget shrank since it was found: look again. */
            stats->budget_exhausted = true;
            find_best(c, L);
        } else {
            total += take(c, L, &L->best, stats);
            find_best(c, L);
            took = true;
        }
        if (L->done)
            heap[0] = heap[--n];
        heap_down(ls, heap, n, 0);
        if (took && (p->copies_budget || p->slots_budget))
            reprime_unaffordable(c, ls, heap, &n);
    }
    stats->budget_exhausted = stats->budget_exhausted || c->budget_stopped;
    /* A layer the splits left above its starting max goes back to its row
     * before them: no layer ends worse than it started. */
    for (uint32_t l = 0; l < Lyr; l++) {
        layer_state *L = &ls[l];
        const double now = L->load[busiest(c, L)];
        if (L->saved && now > L->start_max) {
            memcpy(L->row, L->saved, P * sizeof *L->row);
            memcpy(L->cnt, L->saved + P, N * sizeof *L->cnt);
            total += L->start_max - now;
            stats->reverted++;
            stats->changes -= L->changes;
            stats->copies -= L->copies;
            stats->slots_moved -= L->slots;
            stats->splits -= L->splits;
        }
    }
    stats->work_exhausted = stats->work_exhausted || c->work > c->work_max; /* the splits may have spent it */
    stats->total_max = total;
    stats->work = c->work;
    stats->reached = at_target(p, total);
    if ((p->copies_budget && c->copies_left == 0) || (p->slots_budget && c->slots_left < 2))
        stats->budget_exhausted = stats->budget_exhausted || !stats->reached;
out:
    ctx_free(c);
    eplb_free(ls);
    eplb_free(dbl);
    eplb_free(ints);
    eplb_free(heap);
    eplb_free(order);
    eplb_free(saved);
    eplb_free(multi);
    return st;
}

eplb_status eplb_incremental_rebalance(const eplb_incremental_params *p, int32_t *phy2log, int32_t *logcnt,
                                       eplb_incremental_stats *stats, eplb_error *err) {
    memset(stats, 0, sizeof *stats);
    eplb_status st = eplb_policy_check(&p->shape, err);
    if (st != EPLB_OK)
        return st;
    if (!p->logical_load || !phy2log || !logcnt)
        return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: NULL array");
    if (!(p->cost_intra_node > 0) || !(p->cost_cross_node > 0))
        return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: link costs must be > 0");
    /* The group constraint indexes groups x nodes: only on a shape whose
     * groups divide the experts and whose nodes divide the GPUs. */
    if (p->hierarchical && !(eplb_policy_is_hierarchical(&p->shape) && p->shape.num_nodes > 1))
        return eplb_error_set(err, EPLB_EINVAL,
                              "incremental rebalance: hierarchical needs num_groups %% num_nodes == 0 and more than "
                              "one node (num_groups %u, num_nodes %u)", p->shape.num_groups, p->shape.num_nodes);
    const uint32_t Lyr = p->shape.num_layers, N = p->shape.num_logical, P = p->shape.num_physical,
                   G = p->shape.num_gpus;
    for (size_t i = 0; i < (size_t)Lyr * P; i++)
        if (phy2log[i] < 0 || (uint32_t)phy2log[i] >= N)
            return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: layer %zu slot %zu holds %d", i / P,
                                  i % P, phy2log[i]);
    if (p->initial_row)
        for (size_t i = 0; i < (size_t)Lyr * P; i++)
            if (p->initial_row[i] < 0 || (uint32_t)p->initial_row[i] >= N)
                return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: initial_row layer %zu slot %zu holds %d",
                                      i / P, i % P, p->initial_row[i]);
    for (size_t i = 0; i < (size_t)Lyr * N; i++)
        if (p->logical_load[i] < 0)
            return eplb_error_set(err, EPLB_EINVAL, "incremental rebalance: negative load at %zu", i);
    /* Two threads where they pay (the answer is the same: "Two threads"):
     * the global path without a budget, from EPLB_INCREMENTAL_THREAD_MIN
     * slots with at most 64 per GPU, on two CPUs or more (on one the
     * hand-offs are all cost: a reviewer measured 2.21 -> 2.94 ms at 1 x 32,
     * t=0.95, under taskset -c 0).  The input is kept, to redo the call on
     * one thread when the two cannot finish it. */
    const bool two = p->threads != 1 && !p->hierarchical && !p->copies_budget && !p->slots_budget && Lyr >= 2 &&
                     (p->threads >= 2 || ((uint64_t)Lyr * P >= EPLB_INCREMENTAL_THREAD_MIN && P / G <= 64 &&
                                          cpus_to_run_on() >= 2));
    int32_t *input = two ? eplb_malloc((size_t)Lyr * (P + N) * sizeof *input) : NULL;
    if (input) {
        memcpy(input, phy2log, (size_t)Lyr * P * sizeof *input);
        memcpy(input + (size_t)Lyr * P, logcnt, (size_t)Lyr * N * sizeof *input);
        bool redo = false, undone = false;
        eplb_error two_err; /* not the caller's: a failure here is redone, and the redo's is the answer */
        st = rebalance_run(p, phy2log, logcnt, stats, true, &redo, &undone, &two_err);
        if (st == EPLB_OK && !redo) {
            eplb_free(input);
            return EPLB_OK;
        }
        memcpy(phy2log, input, (size_t)Lyr * P * sizeof *input);
        memcpy(logcnt, input + (size_t)Lyr * P, (size_t)Lyr * N * sizeof *input);
        eplb_free(input);
        memset(stats, 0, sizeof *stats);
        stats->threads_undone = undone; /* not when it could not start (no memory, no thread) */
    }
    return rebalance_run(p, phy2log, logcnt, stats, false, NULL, NULL, err);
}
