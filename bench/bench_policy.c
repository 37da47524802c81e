/* bench_policy.c -- times eplb_policy_rebalance, eplb_policy_preserve_slots and
 * eplb_policy_balancedness
 * at DeepSeek-V3 size and at 2x and 4x that size.
 *
 * A standalone program, not a test: it checks nothing but that the calls
 * succeed.  Loads are Zipf-like (expert popularity ~ 1/rank^1.1, a random
 * permutation per layer, +-20% noise) from a fixed seed, so runs compare.
 * Each case: warm-up calls, then many timed calls (CLOCK_MONOTONIC); prints
 * the median, p99, minimum and mean per call (the machine may be shared: the
 * minimum is the least disturbed run).
 *
 *   cc -std=c11 -O2 -Iservice/core service/core/eplb_status.c \
 *      service/core/eplb_policy.c bench/bench_policy.c -lm -o bench_policy
 *   ./bench_policy [runs [filter]]   (default 2000 timed calls per 1x case; 2x
 *                            cases run runs/4, 4x cases runs/16, the 4096-expert
 *                            cases runs/32, at least 50; with a filter only the
 *                            cases whose name contains it run)
 *
 * Cases (L layers, N logical, P physical, G groups, nodes x GPUs per node):
 *   1x  DeepSeek-V3: L=58,  N=256,  P=288,  G=8   4x8 and 1x32 (32 GPUs)
 *   2x:              L=116, N=512,  P=576,  G=16  4x16 and 1x64 (64 GPUs)
 *   4x:              L=232, N=1024, P=1152, G=32  8x16 and 1x128 (128 GPUs)
 * plus the global fallback at 1x (G=8 on 3 nodes x 8 GPUs, P=288), and 4096
 * experts on few GPUs (L=58, N=4096, P=4608, G=8, one node of 8 or 2 GPUs: 576
 * and 2304 slots per GPU), where slot preservation dominated when it was
 * quadratic in slots per GPU. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_policy.h"
#include "bench_util.h"

typedef struct bench_case {
    const char *name;
    eplb_policy_shape shape;
    int cost; /* relative work per call: the case runs runs / cost times */
} bench_case;

/* splitmix64: small, seeded, good enough for loads. */

/* Zipf-like load [L][N]. */
static void fill_zipf(int64_t *load, uint32_t layers, uint32_t n, uint64_t seed) {
    uint64_t st = seed;
    uint32_t *perm = malloc(n * sizeof *perm);
    if (!perm) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (uint32_t l = 0; l < layers; l++) {
        for (uint32_t i = 0; i < n; i++)
            perm[i] = i;
        for (uint32_t i = n - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(rng_next(&st) % (i + 1));
            uint32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (uint32_t r = 0; r < n; r++) {
            double base = 1.0e6 / pow((double)(r + 1), 1.1);
            load[(size_t)l * n + perm[r]] = (int64_t)(base * (0.8 + 0.4 * rng_unit(&st)));
        }
    }
    free(perm);
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void report(const char *what, const char *name, double *ns, int runs) {
    double sum = 0.0;
    for (int i = 0; i < runs; i++)
        sum += ns[i];
    qsort(ns, (size_t)runs, sizeof *ns, cmp_double);
    int p99 = (int)ceil(0.99 * runs) - 1;
    printf("%-9s %-42s median %7.1f us  p99 %7.1f us  min %7.1f us  mean %7.1f us  (%d runs)\n",
           what, name, ns[runs / 2] / 1e3, ns[p99] / 1e3, ns[0] / 1e3, sum / runs / 1e3, runs);
}

int main(int argc, char **argv) {
    int runs = argc > 1 ? atoi(argv[1]) : 2000;
    if (runs < 10)
        runs = 10;
    const bench_case cases[] = {
        {"1x L=58 N=256 P=288 G=8 4 nodes x 8 GPUs", {58, 256, 288, 8, 4, 32}, 1},
        {"1x L=58 N=256 P=288 G=8 1 node x 32 GPUs", {58, 256, 288, 8, 1, 32}, 1},
        {"1x L=58 N=256 P=288 G=8 3x8 GPUs (global)", {58, 256, 288, 8, 3, 24}, 1},
        {"2x L=116 N=512 P=576 G=16 4x16 GPUs", {116, 512, 576, 16, 4, 64}, 4},
        {"2x L=116 N=512 P=576 G=16 1x64 GPUs", {116, 512, 576, 16, 1, 64}, 4},
        {"4x L=232 N=1024 P=1152 G=32 8x16 GPUs", {232, 1024, 1152, 32, 8, 128}, 16},
        {"4x L=232 N=1024 P=1152 G=32 1x128 GPUs", {232, 1024, 1152, 32, 1, 128}, 16},
        {"4096 L=58 N=4096 P=4608 G=8 1x8 GPUs", {58, 4096, 4608, 8, 1, 8}, 32},
        {"4096 L=58 N=4096 P=4608 G=8 1x2 GPUs", {58, 4096, 4608, 8, 1, 2}, 32},
    };
    const char *filter = argc > 2 ? argv[2] : NULL;
    double *ns = malloc((size_t)(runs < 50 ? 50 : runs) * sizeof *ns);
    if (!ns) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        if (filter && !strstr(cases[c].name, filter))
            continue;
        const eplb_policy_shape *s = &cases[c].shape;
        int n_runs = runs / cases[c].cost < 50 ? 50 : runs / cases[c].cost;
        eplb_error err;
        if (eplb_policy_check(s, &err) != EPLB_OK) {
            fprintf(stderr, "%s: %s\n", cases[c].name, err.msg);
            return 1;
        }
        size_t nl = (size_t)s->num_layers * s->num_logical, np = (size_t)s->num_layers * s->num_physical;
        int64_t *load = malloc(nl * sizeof *load), *prev = malloc(nl * sizeof *prev);
        int32_t *phy2log = malloc(np * sizeof *phy2log), *logcnt = malloc(nl * sizeof *logcnt);
        int32_t *old = malloc(np * sizeof *old), *work = malloc(np * sizeof *work);
        if (!load || !prev || !phy2log || !logcnt || !old || !work) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        fill_zipf(load, s->num_layers, s->num_logical, 42 + c);

        /* The mapping in place before: the rebalance of other loads. */
        fill_zipf(prev, s->num_layers, s->num_logical, 4242 + c);
        if (eplb_policy_rebalance(s, prev, old, logcnt, &err) != EPLB_OK) {
            fprintf(stderr, "%s: %s\n", cases[c].name, err.msg);
            return 1;
        }

        for (int i = 0; i < 50; i++)
            eplb_policy_rebalance(s, load, phy2log, logcnt, NULL);
        for (int i = 0; i < n_runs; i++) {
            double t0 = now_ns();
            eplb_status st = eplb_policy_rebalance(s, load, phy2log, logcnt, &err);
            ns[i] = now_ns() - t0;
            if (st != EPLB_OK) {
                fprintf(stderr, "%s: %s\n", cases[c].name, err.msg);
                return 1;
            }
        }
        report("rebalance", cases[c].name, ns, n_runs);
        printf("          balancedness of the result %.4f\n",
               eplb_policy_balancedness(s->num_layers, s->num_logical, s->num_physical, s->num_gpus,
                                        load, phy2log, logcnt, NULL));

        for (int i = 0; i < 50; i++) {
            memcpy(work, phy2log, np * sizeof *work);
            eplb_policy_preserve_slots(s->num_layers, s->num_physical, s->num_gpus, old, work);
        }
        for (int i = 0; i < n_runs; i++) {
            memcpy(work, phy2log, np * sizeof *work);
            double t0 = now_ns();
            eplb_policy_preserve_slots(s->num_layers, s->num_physical, s->num_gpus, old, work);
            ns[i] = now_ns() - t0;
        }
        report("preserve", cases[c].name, ns, n_runs);

        volatile double sink = 0.0;
        for (int i = 0; i < n_runs; i++) {
            double t0 = now_ns();
            sink += eplb_policy_balancedness(s->num_layers, s->num_logical, s->num_physical,
                                             s->num_gpus, load, phy2log, logcnt, NULL);
            ns[i] = now_ns() - t0;
        }
        (void)sink;
        report("balance", cases[c].name, ns, n_runs);

        free(load);
        free(prev);
        free(phy2log);
        free(logcnt);
        free(old);
        free(work);
    }
    free(ns);
    return 0;
}
