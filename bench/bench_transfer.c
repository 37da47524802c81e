/* bench_transfer.c -- size and build time of engine-executed transfer plans
 * (eplb_transfer.h) at wide-EP sizes.
 *
 * A standalone program, not a test: it prints numbers.  Links eplb_core only.
 *
 * Cases: DeepSeek-V3 (58 MoE layers, 256 logical experts, 8 groups) on
 * 4 nodes x 8 GPUs with 32 redundant experts (288 slots), and on 16 nodes x
 * 8 GPUs (128 EP ranks) with 128 redundant (384 slots).
 * Rebalances, each computed as eplb_next.c does from scratch with
 * SLOT_ORDER_MIN_TRAFFIC (eplb_policy_rebalance, eplb_plan_reassign_gpus,
 * eplb_policy_preserve_slots):
 *   first   the initial placement ([0..N-1] then i % N) -> the policy's
 *           answer on a skewed load (per layer Zipf 1/rank^1.1 over a
 *           random permutation of the experts, 1e6 tokens, +-10% noise)
 *   drift   that placement -> the answer after each log-weight took a
 *           N(0, 0.15^2) step (what a periodic rebalance sees)
 * Each with no staging bound and with 4 experts per rank of staging (the
 * drift also with 2: refused where a layer's swap group needs more).
 *
 * Printed per case: plan steps, ops in all (COPY + SEND + RECV), per-rank
 * ops (max, mean), SEND/RECV pairs and those across nodes, the staging a
 * rank needs, the wire size of GetTransferPlan's answer (one rank: max and
 * mean) and of every rank's plan in one answer, computed field by field as
 * proto3 encodes rpc_transfer.c's messages, and the build time (best of 5).
 * Bytes of an expert: 44,040,192 (42 MiB, DeepSeek-V3 fp8 w13 + w2).
 *
 *   build-b1/bench/bench_transfer */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_plan.h"
#include "eplb_policy.h"
#include "eplb_transfer.h"
#include "bench_util.h"

#define EXPERT_BYTES 44040192ull

/* ---- proto3 wire sizes of rpc_transfer.c's messages ----------------------- */
static uint64_t vsz(uint64_t v) {
    uint64_t n = 1;
    while (v >= 128) {
        v >>= 7;
        n++;
    }
    return n;
}
static uint64_t fu(uint64_t v) { return v ? 1 + vsz(v) : 0; }           /* a scalar field, omitted at 0 */
static uint64_t fb(bool b) { return b ? 2 : 0; }
static uint64_t fm(uint64_t len) { return 1 + vsz(len) + len; }         /* an embedded message */

static uint64_t op_size(const eplb_transfer_op *op) {
    uint64_t n = fu(op->kind) + fu((uint64_t)(uint32_t)op->expert);
    if (op->kind != EPLB_XFER_RECV)
        n += fu(op->src) + fb(op->src_staging);
    if (op->kind != EPLB_XFER_SEND)
        n += fu(op->dst) + fb(op->dst_staging);
    if (op->kind != EPLB_XFER_COPY)
        n += fu(op->peer) + fu(op->tag) + fb(op->cross_node);
    return n;
}

static uint64_t rank_size(const eplb_transfer_plan *p, uint32_t g) {
    const eplb_transfer_rank *rk = &p->ranks[g];
    uint64_t n = fu(g) + fu(rk->max_staging) + fu(rk->sent) + fu(rk->received) + fu(rk->cross_node);
    for (uint32_t k = 0; k < p->num_steps; k++) {
        uint64_t s = fu(p->steps[k].layer) + fu(p->steps[k].chunk);
        for (uint32_t i = rk->step_first[k]; i < rk->step_first[k + 1]; i++)
            s += fm(op_size(&rk->ops[i]));
        n += fm(s);
    }
    return n;
}

/* TransferPlan header: model_id "deepseek-v3", a 16-digit id, epochs and
 * counts as they would be sent. */
static uint64_t header_size(const eplb_transfer_plan *p) {
    uint64_t layers = 0;
    for (uint32_t i = 0; i < p->num_layers; i++)
        layers += vsz(p->layers[i]);
    return fm(11) + fm(16) + fu(1) + fu(p->num_ranks) + fu(p->ranks_per_node) + fu(p->num_local) +
           (p->num_layers ? fm(layers) : 0) + fu(p->num_steps) + fu(EXPERT_BYTES) + fu(p->copies_cross_gpu) +
           fu(p->copies_cross_node);
}

/* ---- loads and placements -------------------------------------------------- */
typedef struct bench_case {
    const char *name;
    eplb_policy_shape s;
} bench_case;

static void zipf_weights(uint64_t *rng, uint32_t L, uint32_t N, double *logw) {
    uint32_t *perm = malloc(N * sizeof *perm);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t i = 0; i < N; i++)
            perm[i] = i;
        for (uint32_t i = N - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(rng_next(rng) % (i + 1));
            uint32_t t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (uint32_t r = 0; r < N; r++)
            logw[(size_t)l * N + perm[r]] = -1.1 * log((double)r + 1);
    }
    free(perm);
}

static void load_of(uint64_t *rng, uint32_t L, uint32_t N, const double *logw, int64_t *load) {
    for (uint32_t l = 0; l < L; l++) {
        double sum = 0;
        for (uint32_t e = 0; e < N; e++)
            sum += exp(logw[(size_t)l * N + e]);
        for (uint32_t e = 0; e < N; e++) {
            double w = exp(logw[(size_t)l * N + e]) / sum;
            load[(size_t)l * N + e] = (int64_t)(1e6 * w * (0.9 + 0.2 * rng_unit(rng)));
        }
    }
}

/* From scratch, SLOT_ORDER_MIN_TRAFFIC, as eplb_next.c's from_scratch. */
static void next_placement(const eplb_policy_shape *s, const int32_t *cur, const int64_t *load, int32_t *out) {
    int32_t *cnt = malloc((size_t)s->num_layers * s->num_logical * sizeof *cnt);
    eplb_error err;
    if (eplb_policy_rebalance(s, load, out, cnt, &err) != EPLB_OK) {
        fprintf(stderr, "policy: %s\n", err.msg);
        exit(1);
    }
    eplb_plan_reassign_gpus(s->num_layers, s->num_physical, s->num_gpus,
                            eplb_policy_is_hierarchical(s) ? s->num_nodes : 1, cur, out);
    eplb_policy_preserve_slots(s->num_layers, s->num_physical, s->num_gpus, cur, out);
    free(cnt);
}

static void report(const bench_case *c, const char *what, uint32_t bound, const int32_t *from, const int32_t *to) {
    const eplb_policy_shape *s = &c->s;
    eplb_transfer_plan p;
    eplb_error err;
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_ms();
        eplb_status st = eplb_transfer_build(s->num_layers, s->num_physical, s->num_gpus, s->num_gpus / s->num_nodes,
                                             from, to, bound, &p, &err);
        double t = now_ms() - t0;
        if (st != EPLB_OK) {
            printf("%-12s %-6s bound %u: %s\n", c->name, what, bound, err.msg);
            return;
        }
        if (t < best)
            best = t;
        if (rep < 4)
            eplb_transfer_plan_free(&p);
    }
    uint64_t ops = 0, max_ops = 0, max_rank = 0, all = header_size(&p);
    for (uint32_t g = 0; g < p.num_ranks; g++) {
        ops += p.ranks[g].num_ops;
        if (p.ranks[g].num_ops > max_ops)
            max_ops = p.ranks[g].num_ops;
        uint64_t rs = rank_size(&p, g);
        if (rs > max_rank)
            max_rank = rs;
        all += fm(rs);
    }
    uint64_t one_mean = header_size(&p) + (all - header_size(&p)) / p.num_ranks;
    char bnd[16];
    if (bound)
        snprintf(bnd, sizeof bnd, "stg%u", bound);
    else
        snprintf(bnd, sizeof bnd, "nobnd");
    printf("%-12s %-6s %5s %4u layers %5u steps %7llu ops (rank max %5llu mean %6.0f) %6llu pairs %6llu x-node "
           "(%6.1f GiB) stg %u | rank plan max %7llu B mean %7llu B, all %8llu B | build %7.2f ms\n",
           c->name, what, bnd, p.num_layers, p.num_steps,
           (unsigned long long)ops, (unsigned long long)max_ops, (double)ops / p.num_ranks,
           (unsigned long long)p.copies_cross_gpu, (unsigned long long)p.copies_cross_node,
           (double)p.copies_cross_node * EXPERT_BYTES / (1ull << 30), p.max_staging,
           (unsigned long long)(header_size(&p) + fm(max_rank)), (unsigned long long)one_mean,
           (unsigned long long)all, best);
    eplb_transfer_plan_free(&p);
}

int main(void) {
    const bench_case cases[] = {
        { "dsv3-4x8", { .num_layers = 58, .num_logical = 256, .num_physical = 288, .num_groups = 8,
                        .num_nodes = 4, .num_gpus = 32 } },
        { "dsv3-16x8", { .num_layers = 58, .num_logical = 256, .num_physical = 384, .num_groups = 8,
                         .num_nodes = 16, .num_gpus = 128 } },
    };
    printf("bench_transfer: engine-executed transfer plans (eplb_transfer_build), experts of %llu bytes\n",
           (unsigned long long)EXPERT_BYTES);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const bench_case *c = &cases[ci];
        const eplb_policy_shape *s = &c->s;
        size_t LP = (size_t)s->num_layers * s->num_physical, LN = (size_t)s->num_layers * s->num_logical;
        int32_t *init = malloc(LP * sizeof *init), *first = malloc(LP * sizeof *first),
                *drift = malloc(LP * sizeof *drift);
        double *logw = malloc(LN * sizeof *logw);
        int64_t *load = malloc(LN * sizeof *load);
        for (size_t i = 0; i < LP; i++)
            init[i] = (int32_t)((i % s->num_physical) % s->num_logical);
        uint64_t rng = 42 + ci;
        zipf_weights(&rng, s->num_layers, s->num_logical, logw);
        load_of(&rng, s->num_layers, s->num_logical, logw, load);
        double t0 = now_ms();
        next_placement(s, init, load, first);
        double policy_ms = now_ms() - t0;
        for (size_t i = 0; i < LN; i++)
            logw[i] += 0.15 * rng_normal(&rng);
        load_of(&rng, s->num_layers, s->num_logical, logw, load);
        next_placement(s, first, load, drift);
        printf("%s: %u layers x %u slots, %u ranks on %u nodes; policy + reassign + preserve %.1f ms\n", c->name,
               s->num_layers, s->num_physical, s->num_gpus, s->num_nodes, policy_ms);
        report(c, "first", 0, init, first);
        report(c, "first", 4, init, first);
        report(c, "drift", 0, first, drift);
        report(c, "drift", 4, first, drift);
        report(c, "drift", 2, first, drift);
        free(init);
        free(first);
        free(drift);
        free(logw);
        free(load);
    }
    return 0;
}
