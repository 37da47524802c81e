/* two_threads_case.h -- one random comparison of POLICY_INCREMENTAL's loop
 * on two threads against threads = 1 (eplb_incremental.c, "Two threads"),
 * shared by test_incremental (Criterion, plain and ASan trees) and
 * tests/tsan/two_threads_driver.c (no Criterion: it runs under TSan).
 *
 * A random global shape of 2-40 layers, a target or none, link costs, an
 * initial_row or none; tt_options reach the fallbacks (the compute bound
 * passed, a log full, no helper thread, a layer not valid).  The answer,
 * counts and stats but the work must be equal; with threads_undone or one
 * thread, the work too. */
#ifndef TWO_THREADS_CASE_H
#define TWO_THREADS_CASE_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_incremental.h"
#include "eplb_policy.h"

static uint64_t tt_rnd(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint32_t tt_below(uint64_t *state, uint32_t n) { return (uint32_t)(tt_rnd(state) % n); }

/* Per layer, the max GPU load of row with counts cnt: the from-scratch
 * floors eplb_next gives the search. */
static void tt_layer_max(const eplb_policy_shape *s, const int64_t *load, const int32_t *row, const int32_t *cnt,
                         double *out) {
    const uint32_t N = s->num_logical, P = s->num_physical, S = P / s->num_gpus;
    for (uint32_t l = 0; l < s->num_layers; l++) {
        out[l] = 0;
        for (uint32_t g = 0; g < s->num_gpus; g++) {
            double sum = 0;
            for (uint32_t i = g * S; i < (g + 1) * S; i++) {
                const int32_t e = row[(size_t)l * P + i];
                sum += (double)load[(size_t)l * N + e] / cnt[(size_t)l * N + e];
            }
            out[l] = sum > out[l] ? sum : out[l];
        }
    }
}

typedef struct tt_options {
    uint64_t max_work;   /* the compute bound (0: the default) */
    bool near_bound;     /* max_work = W - 2 .. W + 2, W the one-thread call's work without a bound */
    uint32_t log_cap;    /* each side's log (0: as computed) */
    bool thread_fails;   /* no helper thread */
    bool helper_late;    /* the helper starts once the layers are set up (with automatic, the loop runs on one) */
    bool automatic;      /* threads = 0 for the second call (its loop does not wait for a late helper) */
    int bad;             /* 1: one layer's row lacks experts, 2: its initial_row does (both must refuse alike) */
} tt_options;

typedef struct tt_result {
    uint32_t threads;    /* the second call's stats.threads */
    bool undone;         /* its threads_undone */
    char msg[256];       /* what differed; empty when nothing did */
} tt_result;

/* false: out of memory or a call failed (msg says which). */
static bool two_threads_case_run(uint64_t *rng, const tt_options *o, tt_result *res) {
    res->msg[0] = '\0';
    res->threads = 0;
    res->undone = false;
    const uint32_t nodes = 1 + tt_below(rng, 2), gpus = nodes * (1 + tt_below(rng, 8)), S = 1 + tt_below(rng, 6);
    const uint32_t P = gpus * S, N = P / 2 + 1 + tt_below(rng, P - P / 2);
    const eplb_policy_shape s = { .num_layers = 2 + tt_below(rng, 39), .num_logical = N, .num_physical = P,
                                  .num_groups = 1, .num_nodes = nodes, .num_gpus = gpus };
    const uint32_t L = s.num_layers;
    const size_t ln = (size_t)L * N, lp = (size_t)L * P;
    int64_t *load = malloc(ln * sizeof *load), *old = malloc(ln * sizeof *old);
    int32_t *cur = malloc(lp * sizeof *cur), *ref = malloc(lp * sizeof *ref);
    int32_t *cur_cnt = malloc(ln * sizeof *cur_cnt), *ref_cnt = malloc(ln * sizeof *ref_cnt);
    int32_t *row[2] = { malloc(lp * sizeof(int32_t)), malloc(lp * sizeof(int32_t)) };
    int32_t *cnt[2] = { malloc(ln * sizeof(int32_t)), malloc(ln * sizeof(int32_t)) };
    double *floor_ = malloc(L * sizeof *floor_);
    bool ok = false;
    if (!load || !old || !cur || !ref || !cur_cnt || !ref_cnt || !row[0] || !row[1] || !cnt[0] || !cnt[1] ||
        !floor_) {
        snprintf(res->msg, sizeof res->msg, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < ln; i++) {
        old[i] = (int64_t)(1e6 / pow(1.0 + (double)tt_below(rng, N), 1.1));
        load[i] = tt_below(rng, 8) == 0 ? 0 : (int64_t)(1e6 / pow(1.0 + (double)tt_below(rng, N), 1.1));
    }
    if (eplb_policy_rebalance(&s, old, cur, cur_cnt, NULL) != EPLB_OK ||
        eplb_policy_rebalance(&s, load, ref, ref_cnt, NULL) != EPLB_OK) {
        snprintf(res->msg, sizeof res->msg, "eplb_policy_rebalance failed");
        goto out;
    }
    tt_layer_max(&s, load, ref, ref_cnt, floor_);
    double ref_total = 0;
    for (uint32_t l = 0; l < L; l++)
        ref_total += floor_[l];
    const uint32_t kind = tt_below(rng, 4), bad_layer = tt_below(rng, L);
    const bool initial = o->bad == 2 || tt_below(rng, 2);
    if (o->bad == 1 && N >= 2) /* every slot expert 0: the others have no replica */
        for (uint32_t i = 0; i < P; i++)
            cur[(size_t)bad_layer * P + i] = 0;
    if (o->bad == 2 && N >= 2) /* the plan's sources: the same, in a copy of the row */
        for (uint32_t i = 0; i < P; i++)
            ref[(size_t)bad_layer * P + i] = 0; /* ref is free now: the initial_row below */
    if (o->bad == 2)
        for (uint32_t l = 0; l < L; l++)
            if (l != bad_layer || N < 2)
                memcpy(ref + (size_t)l * P, cur + (size_t)l * P, P * sizeof *cur);
    eplb_incremental_params p = {
        .shape = s, .logical_load = load,
        .total_target = kind == 0 ? -1 : ref_total / (0.8 + 0.2 * (double)tt_below(rng, 1001) / 1000.0),
        .layer_floor = kind == 1 ? NULL : floor_, .reference_cnt = kind == 2 ? NULL : ref_cnt,
        .cost_intra_node = 1, .cost_cross_node = 1 + tt_below(rng, 8), .max_work = o->max_work,
        .initial_row = o->bad == 2 ? ref : initial ? cur : NULL,
        .test = { .log_cap = o->log_cap, .thread_fails = o->thread_fails, .helper_late = o->helper_late },
    };
    eplb_incremental_stats st[2];
    if (o->near_bound) { /* W: the one-thread work without a bound */
        memcpy(row[0], cur, lp * sizeof *cur);
        memcpy(cnt[0], cur_cnt, ln * sizeof *cur_cnt);
        p.threads = 1;
        p.max_work = 0;
        if (eplb_incremental_rebalance(&p, row[0], cnt[0], &st[0], NULL) != EPLB_OK) {
            snprintf(res->msg, sizeof res->msg, "threads = 1 without a bound failed");
            goto out;
        }
        p.max_work = st[0].work + 3 > 3 ? st[0].work + tt_below(rng, 5) - 2 : 1;
        p.max_work = p.max_work ? p.max_work : 1;
    }
    const bool refuse = o->bad && N >= 2;
    char msgs[2][sizeof ((eplb_error *)0)->msg];
    for (int k = 0; k < 2; k++) {
        eplb_error err;
        memcpy(row[k], cur, lp * sizeof *cur);
        memcpy(cnt[k], cur_cnt, ln * sizeof *cur_cnt);
        p.threads = k == 0 ? 1 : o->automatic ? 0 : 2;
        const eplb_status r = eplb_incremental_rebalance(&p, row[k], cnt[k], &st[k], &err);
        if (r != (refuse ? EPLB_EINVAL : EPLB_OK)) {
            snprintf(res->msg, sizeof res->msg, "threads = %d: status %d: %s", k + 1, (int)r,
                     r == EPLB_OK ? "" : err.msg);
            goto out;
        }
        snprintf(msgs[k], sizeof msgs[k], "%s", refuse ? err.msg : "");
    }
    ok = true;
    if (refuse) { /* the same refusal, the same arrays; the two threads ran and were undone */
        const char *diff = strcmp(msgs[0], msgs[1]) ? "the messages"
                           : memcmp(row[0], row[1], lp * sizeof *cur) ? "the rows"
                           : memcmp(cnt[0], cnt[1], ln * sizeof *cur_cnt) ? "the counts"
                           : !o->thread_fails && !st[1].threads_undone ? "threads_undone"
                           : NULL;
        res->undone = st[1].threads_undone;
        res->threads = 1;
        if (diff)
            snprintf(res->msg, sizeof res->msg, "%s differ refusing layer %u (%s against %s)", diff, bad_layer,
                     msgs[0], msgs[1]);
        goto out;
    }
    res->threads = st[1].threads;
    res->undone = st[1].threads_undone;
    const char *diff = memcmp(row[0], row[1], lp * sizeof *cur) ? "the rows"
                       : memcmp(cnt[0], cnt[1], ln * sizeof *cur_cnt) ? "the counts"
                       : st[0].changes != st[1].changes ? "changes"
                       : st[0].splits != st[1].splits ? "splits"
                       : st[0].reverted != st[1].reverted ? "reverted"
                       : st[0].slots_moved != st[1].slots_moved ? "slots_moved"
                       : st[0].copies != st[1].copies ? "copies"
                       : st[0].reached != st[1].reached ? "reached"
                       : st[0].work_exhausted != st[1].work_exhausted ? "work_exhausted"
                       : !(st[0].total_max == st[1].total_max) ? "total_max"
                       : st[0].threads != 1 || st[0].threads_undone ? "threads = 1 ran on two"
                       : o->thread_fails && (st[1].threads != 1 || st[1].threads_undone) ? "a helper without a thread"
                       : st[1].threads_undone && st[1].threads != 1 ? "undone, yet on two threads"
                       : st[1].threads == 1 && st[0].work != st[1].work ? "the work on one thread"
                       : NULL;
    if (diff)
        snprintf(res->msg, sizeof res->msg, "%s differ: %u layers x %u slots on %u GPUs (%u nodes), threads %u%s",
                 diff, L, P, gpus, nodes, st[1].threads, st[1].threads_undone ? ", undone" : "");
out:
    free(load);
    free(old);
    free(cur);
    free(ref);
    free(cur_cnt);
    free(ref_cnt);
    free(row[0]);
    free(row[1]);
    free(cnt[0]);
    free(cnt[1]);
    free(floor_);
    return ok;
}

#endif
