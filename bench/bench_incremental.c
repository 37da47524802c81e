/* bench_incremental.c -- balance against bytes: POLICY_DEEPSEEK (PRESERVE
 * and MIN_TRAFFIC slot orders) against POLICY_INCREMENTAL at several
 * targets and budgets, over seeded synthetic load traces.  Prints numbers;
 * not a test.  Links eplb_core only and calls eplb_next_placement, the
 * function the server's Rebalance runs.
 *
 * Loads (as bench_plan.c): per layer, Zipf-like popularity (1/rank^1.1 over
 * a random permutation); before each rebalance every log-weight takes a
 * N(0, drift^2) step; a window's load is 1e6 tokens split by weight with
 * +-10% noise.  Traces:
 *   slow    drift 0.15
 *   fast    drift 0.50
 *   shift   drift 0.15, and at rebalance R/2 the popularity is re-drawn
 * Each strategy keeps its own placement across the R rebalances (default
 * 50), all starting from the placement DEEPSEEK computes on the first load.
 *
 * Per strategy and trace: mean balancedness as a fraction of DEEPSEEK's on
 * the same load (rel), the worst rel, cross-GPU and cross-node bytes per
 * rebalance (copies as a plan makes them: one per (GPU, expert) the GPU
 * lacks; 42 MiB experts), the cumulative bytes as a fraction of
 * MIN_TRAFFIC's, rebalances that made balancedness worse (must be 0 for
 * INCREMENTAL), the stall an engine would see at 50 GB/s per GPU (the
 * slowest GPU's bytes in + out, from eplb_plan_build's sources), and the
 * median compute time (policy + the plans of all layers), and the layers
 * per rebalance that took the from-scratch row (fb) or a node repair
 * (nr, eplb_node_repair.h).  "deepseek, one step late": DeepSeek's
 * placement of the previous load on this one (what a single drift step
 * costs even a from-scratch placement).  For "shift":
 * rel at the 1st and 2nd rebalance after the shift.
 *
 *   ./bench_incremental [rebalances]
 * BENCH_CASE=substring picks cases, BENCH_STRATEGY=name one strategy (plus
 * MIN_TRAFFIC, the bytes reference).  BENCH_ZIPF (default 1.1) and
 * BENCH_NOISE (default 0.1) make other traces, BENCH_CROSS_NODE_COST (default
 * the policy's, 4) prices INCREMENTAL's copies across nodes; BENCH_HASH=1 prints a hash
 * of every placement each strategy chose (to check that a change gives the
 * same answers); BENCH_SHAPE=layers,experts,slots,groups,nodes,gpus runs
 * one shape of the caller's instead of the list.  The curve of balance
 * against bytes: BENCH_TARGETS=0.8,0.97 adds INCREMENTAL rows at those
 * targets, BENCH_BUDGETS=0.01,0.1 rows at t=0.99 under those fractions of
 * the slots, and BENCH_CSV=FILE appends one row per rebalance of every
 * strategy to FILE (bench/plot_incremental.py draws it).  BENCH_RELIEF=1
 * prints, per row, the GPUs per layer each rebalance had to bring down (those
 * above the layer's new max when it began) and the copies per such GPU. */
#define _POSIX_C_SOURCE 200809L

#include <ctype.h>
#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_next.h"
#include "eplb_placement.h"
#include "eplb_plan.h"
#include "eplb_policy.h"
#include "bench_util.h"

#define BYTES_PER_EXPERT 44040192.0 /* 42 MiB: DeepSeek-V3 / Kimi-K2 fp8 expert */
#define GPU_BYTES_PER_S 50e9

typedef struct strategy {
    const char *name;
    uint32_t policy;
    eplb_slot_order order;
    double target;
    double budget_frac; /* max_slots_moved as a fraction of L*P; 0 = none */
} strategy;

/* The table's rows; BENCH_TARGETS and BENCH_BUDGETS append more (the curve). */
#define NSTRAT_MAX 40
static strategy strategies[NSTRAT_MAX] = {
    { "deepseek/preserve", EPLB_POLICY_DEEPSEEK, EPLB_SLOT_PRESERVE, 0, 0 },
    { "deepseek/min_traffic", EPLB_POLICY_DEEPSEEK, EPLB_SLOT_MIN_TRAFFIC, 0, 0 },
    { "incremental t=0.99", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.99, 0 },
    { "incremental t=0.95", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.95, 0 },
    { "incremental t=0.90", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.90, 0 },
    { "incr t=0.99 slots<=2%", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.99, 0.02 },
    { "incr t=0.99 slots<=5%", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.99, 0.05 },
    /* No rebalance at all: the stale placement's balancedness. */
    { "stale (never moves)", EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, 0.99, -1 },
};
static size_t nstrat; /* rows in use: the ones above (main counts them), then the added ones */
static char extra_names[NSTRAT_MAX][48];
/* BENCH_CSV: one row per rebalance of every strategy (bench/plot_incremental.py). */
static FILE *csv;

typedef struct bench_case {
    const char *name;
    eplb_policy_shape shape;
} bench_case;

typedef struct acc {
    double rel_sum, rel_min, gpu_bytes, node_bytes, stall_s_sum, from_scratch, node_repaired;
    double late_sum, late_min;  /* the placement before the rebalance, as a fraction of DeepSeek's */
    int worse, n;
    uint64_t relieved, copies;  /* BENCH_RELIEF: gpus_relieved's sum, and the copies across GPUs */
    uint64_t hash;              /* FNV-1a of every placement it chose (BENCH_HASH): "same answers" checks */
    double rel_after_shift[2];
    double ms[1024];
} acc;

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* The slowest GPU's bytes in + out for cur -> next, from the real plans. */
static double stall_bytes(const eplb_policy_shape *s, const int32_t *cur, const int32_t *next, double *io) {
    const uint32_t P = s->num_physical, G = s->num_gpus, gpn = G / s->num_nodes;
    memset(io, 0, G * sizeof *io);
    eplb_error err;
    for (uint32_t l = 0; l < s->num_layers; l++) {
        eplb_plan plan;
        if (eplb_plan_build(P, G, gpn, cur + (size_t)l * P, next + (size_t)l * P, 0, G, &plan, &err) != EPLB_OK)
            continue;
        for (int ph = 0; ph < 2; ph++) {
            const eplb_plan_op *ops = ph ? plan.scatter : plan.gather;
            uint32_t n = ph ? plan.num_scatter : plan.num_gather;
            for (uint32_t i = 0; i < n; i++)
                if (ops[i].src_gpu != ops[i].dst_gpu) {
                    io[ops[i].src_gpu] += BYTES_PER_EXPERT;
                    io[ops[i].dst_gpu] += BYTES_PER_EXPERT;
                }
        }
        eplb_plan_free(&plan);
    }
    double m = 0;
    for (uint32_t g = 0; g < G; g++)
        m = io[g] > m ? io[g] : m;
    return m;
}

static double plans_ms(const eplb_policy_shape *s, const int32_t *cur, const int32_t *next) {
    const uint32_t P = s->num_physical, G = s->num_gpus, gpn = G / s->num_nodes;
    eplb_error err;
    double t0 = now_ms();
    for (uint32_t l = 0; l < s->num_layers; l++) {
        eplb_plan plan;
        if (eplb_plan_build(P, G, gpn, cur + (size_t)l * P, next + (size_t)l * P, 0, G, &plan, &err) == EPLB_OK)
            eplb_plan_free(&plan);
    }
    return now_ms() - t0;
}

/* BENCH_RELIEF: GPUs whose load, when a rebalance began, was above the
 * layer's max after it: each had to shed load, so each took a copy, gave
 * one, or shared an expert that took a replica.  Copies per such GPU say
 * how close a rebalance came to that floor (one each, or less where one
 * re-replication relieves the GPUs an expert shares). */
static double gpu_load(const int64_t *w, const int32_t *row, const int32_t *cnt, uint32_t g, uint32_t S) {
    double sum = 0;
    for (uint32_t i = g * S; i < (g + 1) * S; i++)
        if (row[i] >= 0 && cnt[row[i]] > 0) /* as eplb_policy_balancedness: an empty slot weighs nothing */
            sum += (double)w[row[i]] / cnt[row[i]];
    return sum;
}

static uint64_t gpus_relieved(const eplb_policy_shape *s, const int64_t *load, const int32_t *old_row,
                              const int32_t *old_cnt, const int32_t *new_row, const int32_t *new_cnt) {
    const uint32_t N = s->num_logical, P = s->num_physical, G = s->num_gpus, S = P / G;
    uint64_t over = 0;
    for (uint32_t l = 0; l < s->num_layers; l++) {
        const int64_t *w = load + (size_t)l * N;
        double new_max = 0;
        for (uint32_t g = 0; g < G; g++) {
            const double x = gpu_load(w, new_row + (size_t)l * P, new_cnt + (size_t)l * N, g, S);
            new_max = x > new_max ? x : new_max;
        }
        for (uint32_t g = 0; g < G; g++)
            over += gpu_load(w, old_row + (size_t)l * P, old_cnt + (size_t)l * N, g, S) > new_max * (1 + 1e-12);
    }
    return over;
}

/* The popularity's Zipf exponent and the window's noise (+-), from
 * BENCH_ZIPF and BENCH_NOISE: other traces than the tables' (1.1, 0.1). */
static double zipf_s = 1.1, noise = 0.1;
/* BENCH_CROSS_NODE_COST: INCREMENTAL's price of a copy across nodes (a copy
 * within a node costs 1); 0 = the policy's default. */
static double cross_node_cost;

static void draw_popularity(uint64_t *st, uint32_t L, uint32_t N, double *logw) {
    uint32_t *perm = malloc(N * sizeof *perm);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t i = 0; i < N; i++)
            perm[i] = i;
        for (uint32_t i = N - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(rng_next(st) % (i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (uint32_t r = 0; r < N; r++)
            logw[(size_t)l * N + perm[r]] = -zipf_s * log((double)(r + 1));
    }
    free(perm);
}

static int run(const bench_case *bc, const char *trace, double drift, int R) {
    const eplb_policy_shape *s = &bc->shape;
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    const size_t nl = (size_t)L * N, np = (size_t)L * P;
    double *logw = malloc(nl * sizeof *logw), *io = malloc(G * sizeof *io);
    int64_t *load = malloc(nl * sizeof *load);
    int32_t *cur[NSTRAT_MAX], *cnt[NSTRAT_MAX], *next = malloc(np * sizeof *next), *ncnt = malloc(nl * sizeof *ncnt);
    acc *a = calloc(nstrat, sizeof *a);
    uint64_t st = 0x5EEDull ^ (uint64_t)P ^ ((uint64_t)L << 20);
    draw_popularity(&st, L, N, logw);
    eplb_error err;
    const bool relief = getenv("BENCH_RELIEF") != NULL;
    for (int step = -1; step < R; step++) {
        if (step == R / 2 && strcmp(trace, "shift") == 0)
            draw_popularity(&st, L, N, logw);
        for (uint32_t l = 0; l < L; l++) {
            double sum = 0;
            for (uint32_t e = 0; e < N; e++) {
                double *w = &logw[(size_t)l * N + e];
                *w += drift * rng_normal(&st);
                sum += exp(*w);
            }
            for (uint32_t e = 0; e < N; e++)
                load[(size_t)l * N + e] =
                    (int64_t)(1e6 * exp(logw[(size_t)l * N + e]) / sum * (1 - noise + 2 * noise * rng_unit(&st)));
        }
        if (step < 0) { /* everyone starts from DeepSeek's placement of the first load */
            eplb_policy_rebalance(s, load, next, ncnt, &err);
            for (size_t k = 0; k < nstrat; k++) {
                cur[k] = malloc(np * sizeof *next);
                cnt[k] = malloc(nl * sizeof *ncnt);
                memcpy(cur[k], next, np * sizeof *next);
                memcpy(cnt[k], ncnt, nl * sizeof *ncnt);
            }
            continue;
        }
        const char *only = getenv("BENCH_STRATEGY");
        for (size_t k = 0; k < nstrat; k++) {
            const strategy *sg = &strategies[k];
            if (only && strcmp(only, sg->name) != 0 && (k != 1 || getenv("BENCH_NO_REFERENCE")))
                continue; /* MIN_TRAFFIC always runs: it is the bytes reference */
            eplb_next_request req = { .shape = *s, .order = sg->order, .cur_phy2log = cur[k], .cur_logcnt = cnt[k],
                                      .logical_load = load };
            req.knobs.policy = sg->policy;
            req.knobs.target_balancedness = sg->target;
            req.knobs.cost_cross_node = cross_node_cost;
            /* At least one slot: 0 would mean no budget. */
            req.knobs.max_slots_moved = sg->budget_frac > 0 ? (uint64_t)fmax(1, sg->budget_frac * (double)np) : 0;
            if (sg->budget_frac < 0) { /* stale: the smallest budget (one byte, one slot), then kept as it was */
                req.knobs.expert_bytes = 1;
                req.knobs.max_bytes_moved = 1;
                req.knobs.max_slots_moved = 1;
            }
            eplb_next_report rep;
            double t0 = now_ms();
            if (eplb_next_placement(&req, next, ncnt, NULL, NULL, &rep, &err) != EPLB_OK) {
                fprintf(stderr, "%s %s: %s\n", bc->name, sg->name, err.msg);
                return 1;
            }
            if (sg->budget_frac < 0) { /* the call gave the reference; the budget still let one slot move */
                memcpy(next, cur[k], np * sizeof *next);
                memcpy(ncnt, cnt[k], nl * sizeof *ncnt);
                rep.balancedness_after = rep.balancedness_before;
                rep.copies_cross_gpu = rep.copies_cross_node = 0;
                rep.layers_from_scratch = rep.layers_node_repaired = 0;
            }
            double ms = now_ms() - t0 + plans_ms(s, cur[k], next);
            acc *x = &a[k];
            if (x->n < 1024)
                x->ms[x->n] = ms;
            /* The reference: DEEPSEEK's balancedness on this load. */
            double ref = rep.balancedness_reference;
            double rel = rep.balancedness_after / ref;
            x->rel_sum += rel;
            x->rel_min = x->n == 0 || rel < x->rel_min ? rel : x->rel_min;
            const double late = rep.balancedness_before / ref;
            x->late_sum += late;
            x->late_min = x->n == 0 || late < x->late_min ? late : x->late_min;
            x->from_scratch += rep.layers_from_scratch;
            x->node_repaired += rep.layers_node_repaired;
            x->worse += rep.balancedness_after < rep.balancedness_before - 1e-12;
            x->gpu_bytes += (double)rep.copies_cross_gpu * BYTES_PER_EXPERT;
            x->node_bytes += (double)rep.copies_cross_node * BYTES_PER_EXPERT;
            const double stall_s = stall_bytes(s, cur[k], next, io) / GPU_BYTES_PER_S;
            x->stall_s_sum += stall_s;
            if (csv)
                fprintf(csv, "\"%s\",%s,\"%s\",%d,%.6f,%.6f,%llu,%llu,%.0f,%.6f,%u\n", bc->name, trace, sg->name,
                        step, rel, late, (unsigned long long)rep.copies_cross_gpu,
                        (unsigned long long)rep.copies_cross_node, (double)rep.copies_cross_gpu * BYTES_PER_EXPERT,
                        stall_s, rep.layers_from_scratch);
            if (strcmp(trace, "shift") == 0 && (step == R / 2 || step == R / 2 + 1))
                x->rel_after_shift[step - R / 2] = rel;
            if (relief) {
                x->relieved += gpus_relieved(s, load, cur[k], cnt[k], next, ncnt);
                x->copies += rep.copies_cross_gpu;
            }
            x->hash = fnv1a(x->n ? x->hash : 0xcbf29ce484222325ull, next, np * sizeof *next);
            x->hash = fnv1a(x->hash, ncnt, nl * sizeof *ncnt);
            x->n++;
            memcpy(cur[k], next, np * sizeof *next);
            memcpy(cnt[k], ncnt, nl * sizeof *ncnt);
        }
    }
    printf("\n%s, trace %s (drift %.2f), %d rebalances, %u layers x %u experts x %u slots, %u GPUs / %u nodes\n",
           bc->name, trace, drift, R, L, N, P, G, s->num_nodes);
    printf("%-24s %7s %7s %11s %11s %8s %6s %9s %8s %6s %5s%s\n", "strategy", "rel", "rel_min", "GB/rebal",
           "xnode GB", "vs MT", "worse", "stall s", "ms p50", "fb", "nr", strcmp(trace, "shift") == 0 ? "  shift+1 shift+2" : "");
    const double mt = a[1].gpu_bytes > 0 ? a[1].gpu_bytes : INFINITY;
    for (size_t k = 0; k < nstrat; k++) {
        acc *x = &a[k];
        if (!x->n)
            continue;
        int n = x->n < 1024 ? x->n : 1024;
        qsort(x->ms, (size_t)n, sizeof x->ms[0], cmp_double);
        printf("%-24s %7.4f %7.4f %11.1f %11.1f %7.1f%% %6d %9.3f %8.3f %6.1f %5.1f", strategies[k].name,
               x->rel_sum / x->n, x->rel_min, x->gpu_bytes / x->n / 1e9, x->node_bytes / x->n / 1e9,
               100.0 * x->gpu_bytes / mt, x->worse, x->stall_s_sum / x->n, x->ms[n / 2], x->from_scratch / x->n,
               x->node_repaired / x->n);
        if (strcmp(trace, "shift") == 0)
            printf("  %7.4f %7.4f", x->rel_after_shift[0], x->rel_after_shift[1]);
        printf("\n");
    }
    if (relief)
        for (size_t k = 0; k < nstrat; k++)
            if (a[k].n && a[k].relieved)
                printf("relief %-24s %6.2f GPUs per layer above the new max, %5.2f copies per such GPU\n",
                       strategies[k].name, (double)a[k].relieved / a[k].n / L,
                       (double)a[k].copies / (double)a[k].relieved);
    if (getenv("BENCH_HASH"))
        for (size_t k = 0; k < nstrat; k++)
            if (a[k].n)
                printf("hash %-24s %016llx\n", strategies[k].name, (unsigned long long)a[k].hash);
    /* MIN_TRAFFIC's placement before each rebalance is DeepSeek's of the
     * previous load: what one drift step costs a from-scratch placement. */
    if (a[1].n)
        printf("%-24s %7.4f %7.4f   (DeepSeek's placement of the previous load, on this one)\n",
               "deepseek, one step late", a[1].late_sum / a[1].n, a[1].late_min);
    for (size_t k = 0; k < nstrat; k++) {
        free(cur[k]);
        free(cnt[k]);
    }
    free(a);
    free(logw);
    free(io);
    free(load);
    free(next);
    free(ncnt);
    return 0;
}

/* The exit status, once BENCH_CSV's rows are all written. */
static int finish(int rc) {
    if (!csv)
        return rc;
    const bool failed = ferror(csv) != 0;
    if (fclose(csv) != 0 || failed) {
        fprintf(stderr, "BENCH_CSV: write failed\n");
        return 1;
    }
    return rc;
}

/* BENCH_TARGETS "0.97,0.98": INCREMENTAL rows at those targets;
 * BENCH_BUDGETS "0.01,0.1": rows at t=0.99 with max_slots_moved that
 * fraction of all slots.  Each value in (0, 1]; at most NSTRAT_MAX rows in
 * all.  Returns 0, or 2 after saying what is wrong. */
static int add_strategies(const char *list, bool budgets) {
    const char *what = budgets ? "BENCH_BUDGETS" : "BENCH_TARGETS";
    for (const char *p = list; list && *list;) {
        char *end = (char *)p;
        double v = isspace((unsigned char)*p) ? NAN : strtod(p, &end);
        if (isnan(v) || end == p || (*end && *end != ',') || !(v > 0 && v <= 1)) {
            fprintf(stderr, "%s: want comma-separated numbers in (0, 1], got \"%s\"\n", what, list);
            return 2;
        }
        if (nstrat == NSTRAT_MAX) {
            fprintf(stderr, "%s: at most %d strategies in all\n", what, NSTRAT_MAX);
            return 2;
        }
        char *name = extra_names[nstrat];
        if (budgets)
            snprintf(name, sizeof extra_names[0], "incr t=0.99 slots<=%g%%", 100 * v);
        else
            snprintf(name, sizeof extra_names[0], "incremental t=%g", v);
        for (size_t k = 0; k < nstrat; k++)
            if (strcmp(strategies[k].name, name) == 0) {
                fprintf(stderr, "%s: %g gives the row \"%s\", which is there already\n", what, v, name);
                return 2;
            }
        strategies[nstrat++] = (strategy){ name, EPLB_POLICY_INCREMENTAL, EPLB_SLOT_PRESERVE, budgets ? 0.99 : v,
                                           budgets ? v : 0 };
        if (!*end)
            break;
        p = end + 1; /* past the comma: another number must follow */
    }
    return 0;
}

int main(int argc, char **argv) {
    /* As eplbd's main does: keep the calls' scratch in the heap, so the
     * times are the server's (without it glibc returns it to the kernel
     * after a call, and the next call's page faults cost 20% at 4 x 8). */
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 128 << 20);
    int R = argc > 1 ? atoi(argv[1]) : 50;
    if (R < 4)
        R = 4;
    const bench_case cases[] = {
        { "DeepSeek-V3 4 nodes x 8 GPUs", { 58, 256, 288, 8, 4, 32 } },
        { "DeepSeek-V3 1 node x 32 GPUs", { 58, 256, 288, 8, 1, 32 } },
        { "Kimi-K2-like 32 GPUs (4 x 8)", { 61, 384, 416, 1, 4, 32 } },
        /* Shapes beyond the three: other EP sizes, and a model
         * with more layers and fewer experts (Qwen3-235B-A22B-like: 94
         * layers x 128 experts, no groups). */
        { "DeepSeek-V3 1 node x 8 GPUs", { 58, 256, 288, 8, 1, 8 } },
        { "DeepSeek-V3 2 nodes x 8 GPUs", { 58, 256, 288, 8, 2, 16 } },
        { "DeepSeek-V3 8 nodes x 8 GPUs, 320 slots", { 58, 256, 320, 8, 8, 64 } },
        { "Qwen3-like 1 node x 16 GPUs", { 94, 128, 160, 1, 1, 16 } },
        { "Qwen3-like 2 nodes x 8 GPUs", { 94, 128, 144, 1, 2, 16 } },
    };
    if (getenv("BENCH_ZIPF"))
        zipf_s = atof(getenv("BENCH_ZIPF"));
    if (getenv("BENCH_NOISE"))
        noise = atof(getenv("BENCH_NOISE"));
    if (!(zipf_s >= 0) || !(noise >= 0 && noise < 1)) {
        fprintf(stderr, "BENCH_ZIPF must be >= 0 and BENCH_NOISE in [0, 1)\n");
        return 2;
    }
    while (nstrat < NSTRAT_MAX && strategies[nstrat].name)
        nstrat++;
    if (add_strategies(getenv("BENCH_TARGETS"), false) != 0 || add_strategies(getenv("BENCH_BUDGETS"), true) != 0)
        return 2;
    const char *xc = getenv("BENCH_CROSS_NODE_COST");
    if (xc) {
        char *end;
        cross_node_cost = isspace((unsigned char)*xc) ? NAN : strtod(xc, &end);
        if (isnan(cross_node_cost) || end == xc || *end || !(cross_node_cost > 0 && cross_node_cost <= 1e6)) {
            fprintf(stderr, "BENCH_CROSS_NODE_COST: want a number in (0, 1e6], got \"%s\"\n", xc);
            return 2;
        }
    }
    const char *csv_path = getenv("BENCH_CSV");
    if (csv_path && *csv_path) {
        csv = fopen(csv_path, "a");
        if (!csv) {
            fprintf(stderr, "BENCH_CSV: cannot open %s: %s\n", csv_path, strerror(errno));
            return 2;
        }
        if (ftell(csv) == 0)
            fprintf(csv, "case,trace,strategy,rebalance,rel,rel_before,copies_cross_gpu,copies_cross_node,"
                         "bytes_cross_gpu,stall_s,layers_from_scratch\n");
    }
    const char *shape = getenv("BENCH_SHAPE");
    if (shape) { /* one shape of the caller's: "layers,experts,slots,groups,nodes,gpus" */
        bench_case bc = { "BENCH_SHAPE", { 0 } };
        eplb_policy_shape *s = &bc.shape;
        eplb_error err;
        if (sscanf(shape, "%u,%u,%u,%u,%u,%u", &s->num_layers, &s->num_logical, &s->num_physical, &s->num_groups,
                   &s->num_nodes, &s->num_gpus) != 6 || eplb_policy_check(s, &err) != EPLB_OK) {
            fprintf(stderr, "BENCH_SHAPE: want layers,experts,slots,groups,nodes,gpus of a valid shape\n");
            return 2;
        }
        return finish(run(&bc, "slow", 0.15, R) || run(&bc, "fast", 0.50, R) || run(&bc, "shift", 0.15, R));
    }
    const char *only = getenv("BENCH_CASE");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (only && !strstr(cases[i].name, only))
            continue;
        if (run(&cases[i], "slow", 0.15, R) || run(&cases[i], "fast", 0.50, R) || run(&cases[i], "shift", 0.15, R))
            return finish(1);
    }
    return finish(0);
}
