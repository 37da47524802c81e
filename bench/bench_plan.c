/* bench_plan.c -- bytes moved per rebalance by each way of placing the
 * policy's output, on seeded synthetic drifting loads.
 *
 * A standalone program, not a test: it prints numbers.  Links eplb_core only.
 *
 * Loads: per layer, expert popularity starts Zipf-like (weight 1/rank^1.1
 * over a random permutation) and drifts slowly: before each rebalance every
 * log-weight takes a N(0, drift^2) step (drift 0.15 unless given).  A
 * window's load is 1e6 tokens split by weight with +-10% noise.  50
 * rebalances from the initial mapping.
 *
 * Strategies (each keeps its own current mapping across the 50 rebalances;
 * the policy's output is the same for all, only its placement differs):
 *   vllm         the policy's slot order as is (vLLM without #29499), with
 *                vLLM's sender pairing (rebalance_execute.py: the ranks
 *                holding an expert serve its receivers in contiguous blocks,
 *                then round-robin, without regard to nodes)
 *   vllm+plan    the same mapping, moved by eplb_plan_build (cheapest source:
 *                same GPU, same node, other node)
 *   preserve     + eplb_policy_preserve_slots (vLLM #29499)
 *   reassign     + eplb_plan_reassign_gpus, then preserve_slots
 * Every strategy's transfers are counted once per (destination GPU, expert)
 * across GPUs, as both vLLM and eplb_plan_build fetch.
 *
 * Bytes per expert (stated assumption): 44,040,192 B = 42 MiB, DeepSeek-V3
 * and Kimi-K2 fp8 experts: w13 2 x 2048 x 7168 + w2 7168 x 2048 bytes (block
 * scales, ~10 KiB, ignored).  Bytes scale linearly with it.
 *
 *   cc -std=c11 -O2 -Iservice/core service/core/eplb_*.c bench/bench_plan.c -lm -lpthread
 *   ./bench_plan [rebalances [drift]]   (defaults 50 and 0.15: the log-weight step) */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_placement.h"
#include "eplb_plan.h"
#include "eplb_policy.h"
#include "bench_util.h"

#define BYTES_PER_EXPERT 44040192.0
#define NSTRAT 4

static const char *strat_names[NSTRAT] = {"vllm", "vllm+plan", "preserve", "reassign+preserve"};

typedef struct bench_case {
    const char *name;
    eplb_policy_shape shape;
} bench_case;

typedef struct totals {
    double written, cross_gpu, cross_node, local, staging_max;
    double plan_ns, reassign_ns;
} totals;

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* vLLM's sender pairing (rebalance_execute.py), counted for one layer. */
static void vllm_transfers(uint32_t P, uint32_t G, uint32_t gpn, uint32_t N,
                           const int32_t *old_row, const int32_t *new_row, uint64_t *cross_gpu,
                           uint64_t *cross_node) {
    uint32_t S = P / G;
    uint32_t *send = malloc(G * sizeof *send), *recv = malloc(G * sizeof *recv);
    for (uint32_t e = 0; e < N; e++) {
        uint32_t ns = 0, nr = 0;
        for (uint32_t g = 0; g < G; g++) {
            int has_old = 0, has_new = 0;
            for (uint32_t s = g * S; s < (g + 1) * S; s++) {
                has_old |= old_row[s] == (int32_t)e;
                has_new |= new_row[s] == (int32_t)e;
            }
            if (has_old)
                send[ns++] = g;
            else if (has_new)
                recv[nr++] = g;
        }
        if (ns == 0)
            continue;
        uint32_t k = nr / ns;
        for (uint32_t j = 0; j < nr; j++) {
            uint32_t sender = j < ns * k ? send[j / k] : send[j - ns * k];
            (*cross_gpu)++;
            if (sender / gpn != recv[j] / gpn)
                (*cross_node)++;
        }
    }
    free(send);
    free(recv);
}

static int run_case(const bench_case *bc, int rebalances, double drift) {
    const eplb_policy_shape *s = &bc->shape;
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    const uint32_t gpn = G / s->num_nodes;
    const uint32_t reassign_nodes = eplb_policy_is_hierarchical(s) ? s->num_nodes : 1;
    eplb_error err;
    if (eplb_policy_check(s, &err) != EPLB_OK) {
        fprintf(stderr, "%s: %s\n", bc->name, err.msg);
        return 1;
    }
    size_t nl = (size_t)L * N, np = (size_t)L * P;
    double *logw = malloc(nl * sizeof *logw);
    int64_t *load = malloc(nl * sizeof *load);
    int32_t *fresh = malloc(np * sizeof *fresh), *logcnt = malloc(nl * sizeof *logcnt);
    int32_t *cur[NSTRAT], *next = malloc(np * sizeof *next);
    eplb_placement init;
    if (!logw || !load || !fresh || !logcnt || !next ||
        eplb_placement_init(&init, L, N, P, &err) != EPLB_OK) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (int k = 0; k < NSTRAT; k++) {
        cur[k] = malloc(np * sizeof *cur[k]);
        memcpy(cur[k], init.phy2log, np * sizeof *cur[k]);
    }
    eplb_placement_free(&init);

    uint64_t st = 0x5EEDull ^ (uint64_t)P;
    uint32_t *perm = malloc(N * sizeof *perm);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t i = 0; i < N; i++)
            perm[i] = i;
        for (uint32_t i = N - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(rng_next(&st) % (i + 1));
            uint32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (uint32_t r = 0; r < N; r++)
            logw[(size_t)l * N + perm[r]] = -1.1 * log((double)(r + 1));
    }
    free(perm);

    totals first[NSTRAT], steady[NSTRAT];
    memset(first, 0, sizeof first);
    memset(steady, 0, sizeof steady);
    double bal_sum = 0.0;
    uint64_t overlap_id = 0, overlap_re = 0;

    for (int step = 0; step < rebalances; step++) {
        for (uint32_t l = 0; l < L; l++) {
            double sum = 0.0;
            for (uint32_t e = 0; e < N; e++) {
                double *w = &logw[(size_t)l * N + e];
                *w += drift * rng_normal(&st);
                sum += exp(*w);
            }
            for (uint32_t e = 0; e < N; e++) {
                double share = exp(logw[(size_t)l * N + e]) / sum;
                load[(size_t)l * N + e] = (int64_t)(1e6 * share * (0.9 + 0.2 * rng_unit(&st)));
            }
        }
        if (eplb_policy_rebalance(s, load, fresh, logcnt, &err) != EPLB_OK) {
            fprintf(stderr, "%s: %s\n", bc->name, err.msg);
            return 1;
        }
        bal_sum += eplb_policy_balancedness(L, N, P, G, load, fresh, logcnt, NULL);
        for (int k = 0; k < NSTRAT; k++) {
            totals *t = step == 0 ? &first[k] : &steady[k];
            memcpy(next, fresh, np * sizeof *next);
            if (k == 3) {
                double t0 = now_ns();
                for (uint32_t l = 0; l < L; l++)
                    overlap_id += eplb_plan_overlap(P, G, cur[k] + (size_t)l * P,
                                                    next + (size_t)l * P);
                eplb_plan_reassign_gpus(L, P, G, reassign_nodes, cur[k], next);
                t->reassign_ns += now_ns() - t0;
                for (uint32_t l = 0; l < L; l++)
                    overlap_re += eplb_plan_overlap(P, G, cur[k] + (size_t)l * P,
                                                    next + (size_t)l * P);
                double bal = eplb_policy_balancedness(L, N, P, G, load, next, logcnt, NULL);
                double ref = eplb_policy_balancedness(L, N, P, G, load, fresh, logcnt, NULL);
                if (fabs(bal - ref) > 1e-12 * ref) {
                    fprintf(stderr, "reassignment changed balancedness: %.17g vs %.17g\n", bal,
                            ref);
                    return 1;
                }
            }
            if (k >= 2)
                eplb_policy_preserve_slots(L, P, G, cur[k], next);
            for (uint32_t l = 0; l < L; l++) {
                const int32_t *o = cur[k] + (size_t)l * P, *n = next + (size_t)l * P;
                if (k == 0) {
                    uint64_t cg = 0, cn = 0;
                    vllm_transfers(P, G, gpn, N, o, n, &cg, &cn);
                    eplb_plan p;
                    if (eplb_plan_build(P, G, gpn, o, n, 0, G, &p, &err) != EPLB_OK) {
                        fprintf(stderr, "%s: %s\n", bc->name, err.msg);
                        return 1;
                    }
                    t->written += p.slots_written;
                    t->cross_gpu += (double)cg;
                    t->cross_node += (double)cn;
                    t->local += p.local_copies;
                    if (p.max_staging_per_gpu > t->staging_max)
                        t->staging_max = p.max_staging_per_gpu;
                    eplb_plan_free(&p);
                    continue;
                }
                eplb_plan p;
                double t0 = now_ns();
                eplb_status rc = eplb_plan_build(P, G, gpn, o, n, 0, G, &p, &err);
                t->plan_ns += now_ns() - t0;
                if (rc != EPLB_OK) {
                    fprintf(stderr, "%s: %s\n", bc->name, err.msg);
                    return 1;
                }
                t->written += p.slots_written;
                t->cross_gpu += p.cross_gpu_copies;
                t->cross_node += p.cross_node_copies;
                t->local += p.local_copies;
                if (p.max_staging_per_gpu > t->staging_max)
                    t->staging_max = p.max_staging_per_gpu;
                eplb_plan_free(&p);
            }
            memcpy(cur[k], next, np * sizeof *next);
        }
    }

    printf("\n== %s: L=%u N=%u P=%u groups=%u, %u nodes x %u GPUs (%s), %d rebalances, "
           "drift %.3f\n", bc->name, L, N, P, s->num_groups, s->num_nodes, gpn,
           eplb_policy_is_hierarchical(s) ? "hierarchical" : "global", rebalances, drift);
    printf("   mean balancedness %.4f (identical for every strategy; reassignment checked)\n",
           bal_sum / rebalances);
    printf("   GPU overlap after reassignment vs identity: %.1f%% more (steady + first)\n",
           overlap_id ? 100.0 * ((double)overlap_re / (double)overlap_id - 1.0) : 0.0);
    const double gb = BYTES_PER_EXPERT / 1e9;
    for (int phase = 0; phase < 2; phase++) {
        totals *tt = phase == 0 ? first : steady;
        double div = phase == 0 ? 1.0 : (double)(rebalances - 1);
        if (phase == 1 && rebalances < 2)
            break;
        printf("   %s\n", phase == 0 ? "first rebalance (from the initial mapping):"
                                      : "steady state, mean per rebalance (2..N):");
        printf("   %-18s %10s %10s %10s %10s %11s %11s %9s %9s\n", "strategy", "slots", "local",
               "x-GPU", "x-node", "x-GPU GB", "x-node GB", "stg/GPU", "plan ms");
        for (int k = 0; k < NSTRAT; k++) {
            totals *t = &tt[k];
            char plan_ms[32] = "-";
            if (k > 0)
                snprintf(plan_ms, sizeof plan_ms, "%.2f", t->plan_ns / div / 1e6);
            printf("   %-18s %10.1f %10.1f %10.1f %10.1f %11.1f %11.1f %9.0f %9s", strat_names[k],
                   t->written / div, t->local / div, t->cross_gpu / div, t->cross_node / div,
                   t->cross_gpu / div * gb, t->cross_node / div * gb, t->staging_max, plan_ms);
            if (k == 3)
                printf("  (+ reassign %.2f ms)", t->reassign_ns / div / 1e6);
            printf("\n");
        }
    }
    for (int k = 0; k < NSTRAT; k++)
        free(cur[k]);
    free(logw);
    free(load);
    free(fresh);
    free(logcnt);
    free(next);
    return 0;
}

int main(int argc, char **argv) {
    int rebalances = argc > 1 ? atoi(argv[1]) : 50;
    if (rebalances < 1)
        rebalances = 1;
    double drift = argc > 2 ? atof(argv[2]) : 0.15;
    const bench_case cases[] = {
        {"DeepSeek-V3", {58, 256, 288, 8, 4, 32}},
        {"DeepSeek-V3 1 node", {58, 256, 288, 8, 1, 32}},
        {"Kimi-K2-like", {61, 384, 416, 1, 1, 32}},
    };
    printf("bytes per expert: %.0f (42 MiB, fp8 w13 + w2 of a 7168 x 2048 expert)\n",
           BYTES_PER_EXPERT);
    printf("columns: slots = slots rewritten; local / x-GPU / x-node = copies (gather + scatter "
           "ops) by link;\n         GB = x-GPU or x-node copies x bytes per expert; stg/GPU = "
           "most staging entries on one GPU; plan ms = eplb_plan_build, all layers\n");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        if (run_case(&cases[c], rebalances, drift) != 0)
            return 1;
    return 0;
}
