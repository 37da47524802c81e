/* eplb_transfer.c -- per-rank transfer plans for engine-executed rebalances
 * (eplb_transfer.h). */
#include "eplb_transfer.h"

#include <stdio.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_plan.h"
#include "eplb_plan_chunk.h"

void eplb_transfer_plan_free(eplb_transfer_plan *plan) {
    if (!plan)
        return;
    if (plan->ranks)
        for (uint32_t g = 0; g < plan->num_rank_plans; g++) {
            eplb_free(plan->ranks[g].ops);
            eplb_free(plan->ranks[g].step_first);
        }
    eplb_free(plan->ranks);
    eplb_free(plan->steps);
    eplb_free(plan->layers);
    memset(plan, 0, sizeof *plan);
}

eplb_status eplb_transfer_staging_entries(uint64_t max_staging_bytes, uint64_t expert_bytes, uint32_t *entries,
                                          eplb_error *err) {
    *entries = 0;
    if (!max_staging_bytes)
        return EPLB_OK;
    if (!expert_bytes)
        return eplb_error_set(err, EPLB_EINVAL,
                              "max_staging_bytes %llu needs the expert size: set expert_bytes (request or "
                              "ParallelConfig)", (unsigned long long)max_staging_bytes);
    uint64_t n = max_staging_bytes / expert_bytes;
    if (n == 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "max_staging_bytes %llu is less than one expert (expert_bytes %llu): no chunk fits",
                              (unsigned long long)max_staging_bytes, (unsigned long long)expert_bytes);
    *entries = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
    return EPLB_OK;
}

eplb_status eplb_transfer_plan_copy(const eplb_transfer_plan *src, uint32_t rank, eplb_transfer_plan *out,
                                    eplb_error *err) {
    memset(out, 0, sizeof *out);
    bool all = rank == UINT32_MAX;
    if (!all && (rank < src->first_rank || rank - src->first_rank >= src->num_rank_plans))
        return eplb_error_set(err, EPLB_EINVAL, "rank %u: the plan has ranks %u..%u of %u", rank, src->first_rank,
                              src->first_rank + src->num_rank_plans - 1, src->num_ranks);
    *out = *src;
    out->first_rank = all ? src->first_rank : rank;
    out->num_rank_plans = all ? src->num_rank_plans : 1;
    out->layers = eplb_malloc(((size_t)src->num_layers + 1) * sizeof *out->layers);
    out->steps = eplb_malloc(((size_t)src->num_steps + 1) * sizeof *out->steps);
    out->ranks = eplb_calloc(out->num_rank_plans, sizeof *out->ranks);
    if (!out->layers || !out->steps || !out->ranks)
        goto nomem;
    /* A rank without ops (or a plan without steps) has NULL arrays: memcpy
     * must not see them even for 0 bytes. */
    if (src->num_layers)
        memcpy(out->layers, src->layers, (size_t)src->num_layers * sizeof *out->layers);
    if (src->num_steps)
        memcpy(out->steps, src->steps, (size_t)src->num_steps * sizeof *out->steps);
    for (uint32_t i = 0; i < out->num_rank_plans; i++) {
        const eplb_transfer_rank *from = &src->ranks[out->first_rank - src->first_rank + i];
        eplb_transfer_rank *to = &out->ranks[i];
        *to = *from;
        to->ops = eplb_malloc(((size_t)from->num_ops + 1) * sizeof *to->ops);
        to->step_first = eplb_malloc(((size_t)src->num_steps + 1) * sizeof *to->step_first);
        if (!to->ops || !to->step_first) {
            eplb_free(to->ops);
            eplb_free(to->step_first);
            to->ops = NULL;
            to->step_first = NULL;
            goto nomem;
        }
        if (from->num_ops)
            memcpy(to->ops, from->ops, (size_t)from->num_ops * sizeof *to->ops);
        memcpy(to->step_first, from->step_first, ((size_t)src->num_steps + 1) * sizeof *to->step_first);
    }
    return EPLB_OK;
nomem:
    eplb_transfer_plan_free(out);
    return eplb_error_set(err, EPLB_ENOMEM, "out of memory copying a transfer plan");
}

/* Ops of one rank as they are built (sorted by step by construction). */
typedef struct op_vec {
    eplb_transfer_op *v;
    uint32_t n, cap;
} op_vec;

static bool push_op(op_vec *ov, const eplb_transfer_op *op) {
    if (ov->n == ov->cap) {
        uint32_t cap = ov->cap ? ov->cap * 2 : 16;
        eplb_transfer_op *v = eplb_realloc(ov->v, (size_t)cap * sizeof *v);
        if (!v)
            return false;
        ov->v = v;
        ov->cap = cap;
    }
    ov->v[ov->n++] = *op;
    return true;
}

typedef struct builder {
    eplb_transfer_plan *out;
    op_vec *ops;             /* [G] */
    uint32_t steps_cap;
    uint32_t S, rpn;
} builder;

static bool add_step(builder *b, uint32_t layer, uint32_t chunk, uint8_t phase) {
    eplb_transfer_plan *p = b->out;
    if (p->num_steps == b->steps_cap) {
        uint32_t cap = b->steps_cap ? b->steps_cap * 2 : 16;
        eplb_transfer_step *v = eplb_realloc(p->steps, (size_t)cap * sizeof *v);
        if (!v)
            return false;
        p->steps = v;
        b->steps_cap = cap;
    }
    p->steps[p->num_steps++] = (eplb_transfer_step){ .layer = layer, .chunk = chunk, .phase = phase };
    return true;
}

/* One phase of one chunk's plan as a step: each plan op becomes a COPY on
 * its rank, or a SEND/RECV pair with the step's next tag.  Appending the
 * SEND and its RECV together keeps every pair of ranks in the same order
 * on both sides. */
static bool emit_phase(builder *b, const eplb_plan *pl, const eplb_plan_op *ops, uint32_t n, uint32_t layer,
                       uint32_t chunk, uint8_t phase) {
    if (!n)
        return true; /* an empty phase is left out, for every rank alike */
    eplb_transfer_plan *p = b->out;
    if (!add_step(b, layer, chunk, phase))
        return false;
    uint32_t step = p->num_steps - 1, tag = 0;
    for (uint32_t i = 0; i < n; i++) {
        const eplb_plan_op *o = &ops[i];
        bool src_stg = o->kind == EPLB_OP_UNSTAGE, dst_stg = o->kind == EPLB_OP_STAGE;
        uint32_t src = src_stg ? pl->staging[o->src].index : o->src % b->S;
        uint32_t dst = dst_stg ? pl->staging[o->dst].index : o->dst % b->S;
        if (o->src_gpu == o->dst_gpu) {
            eplb_transfer_op c = { .step = step, .src = src, .dst = dst, .expert = o->expert,
                                   .kind = EPLB_XFER_COPY, .src_staging = src_stg, .dst_staging = dst_stg };
            if (!push_op(&b->ops[o->src_gpu], &c))
                return false;
            p->copies_local++;
            continue;
        }
        bool net = o->src_gpu / b->rpn != o->dst_gpu / b->rpn;
        eplb_transfer_op s = { .step = step, .src = src, .peer = o->dst_gpu, .tag = tag, .expert = o->expert,
                               .kind = EPLB_XFER_SEND, .src_staging = src_stg, .cross_node = net };
        eplb_transfer_op r = { .step = step, .dst = dst, .peer = o->src_gpu, .tag = tag, .expert = o->expert,
                               .kind = EPLB_XFER_RECV, .dst_staging = dst_stg, .cross_node = net };
        tag++;
        if (!push_op(&b->ops[o->src_gpu], &s) || !push_op(&b->ops[o->dst_gpu], &r))
            return false;
        p->ranks[o->src_gpu].sent++;
        p->ranks[o->dst_gpu].received++;
        p->copies_cross_gpu++;
        if (net) {
            p->ranks[o->src_gpu].cross_node++;
            p->ranks[o->dst_gpu].cross_node++;
            p->copies_cross_node++;
        }
    }
    return true;
}

/* Prefix err's message with the layer (the plan and chunk messages do not
 * know it). */
static eplb_status layer_error(eplb_error *err, eplb_status st, uint32_t layer) {
    if (err) {
        char msg[EPLB_ERROR_MSG_MAX];
        snprintf(msg, sizeof msg, "layer %u: %s", layer, err->msg);
        eplb_error_set(err, st, "%s", msg);
    }
    return st;
}

eplb_status eplb_transfer_build(uint32_t num_layers, uint32_t num_physical, uint32_t num_ranks,
                                uint32_t ranks_per_node, const int32_t *old_phy2log, const int32_t *new_phy2log,
                                uint32_t max_staging, eplb_transfer_plan *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    const uint32_t L = num_layers, P = num_physical, G = num_ranks;
    if (!old_phy2log || !new_phy2log || !L || !P || !G || P % G || !ranks_per_node || G % ranks_per_node)
        return eplb_error_set(err, EPLB_EINVAL,
                              "transfer plan: %u layers x %u slots over %u ranks (%u per node): want layers, slots "
                              "and ranks >= 1, ranks dividing slots and ranks per node dividing ranks",
                              L, P, G, ranks_per_node);
    out->num_ranks = G;
    out->ranks_per_node = ranks_per_node;
    out->num_local = P / G;
    out->num_physical = P;
    out->num_rank_plans = G;
    builder b = { .out = out, .S = P / G, .rpn = ranks_per_node };
    eplb_status st = EPLB_OK;
    eplb_plan_chunks ch = { 0 };
    eplb_plan pl = { 0 };
    uint32_t *stg = NULL;
    out->ranks = eplb_calloc(G, sizeof *out->ranks);
    b.ops = eplb_calloc(G, sizeof *b.ops);
    out->layers = eplb_malloc((size_t)L * sizeof *out->layers);
    stg = eplb_calloc(G, sizeof *stg);
    if (!out->ranks || !b.ops || !out->layers || !stg)
        goto nomem;

    for (uint32_t l = 0; l < L; l++) {
        const int32_t *o = old_phy2log + (size_t)l * P, *n = new_phy2log + (size_t)l * P;
        if (memcmp(o, n, (size_t)P * sizeof *o) == 0)
            continue;
        out->layers[out->num_layers++] = l;
        if ((st = eplb_plan_chunk(P, G, ranks_per_node, o, n, 0, G, max_staging, &ch, err)) != EPLB_OK) {
            layer_error(err, st, l);
            goto fail;
        }
        for (uint32_t c = 0; c < ch.num_chunks; c++) {
            if ((st = eplb_plan_build(P, G, ranks_per_node, ch.rows + (size_t)c * P, ch.rows + (size_t)(c + 1) * P,
                                      0, G, &pl, err)) != EPLB_OK) {
                layer_error(err, st, l);
                goto fail;
            }
            memset(stg, 0, (size_t)G * sizeof *stg);
            for (uint32_t k = 0; k < pl.num_staging; k++)
                if (pl.staging[k].index + 1 > stg[pl.staging[k].gpu])
                    stg[pl.staging[k].gpu] = pl.staging[k].index + 1;
            for (uint32_t g = 0; g < G; g++) {
                if (stg[g] > out->ranks[g].max_staging)
                    out->ranks[g].max_staging = stg[g];
                if (stg[g] > out->max_staging)
                    out->max_staging = stg[g];
            }
            if (!emit_phase(&b, &pl, pl.gather, pl.num_gather, l, c, EPLB_XFER_GATHER) ||
                !emit_phase(&b, &pl, pl.scatter, pl.num_scatter_wave0, l, c, EPLB_XFER_WAVE0) ||
                !emit_phase(&b, &pl, pl.scatter + pl.num_scatter_wave0, pl.num_scatter - pl.num_scatter_wave0, l, c,
                            EPLB_XFER_WAVE1))
                goto nomem;
            eplb_plan_free(&pl);
        }
        eplb_plan_chunks_free(&ch);
    }
    /* Hand the op vectors over and index them by step. */
    for (uint32_t g = 0; g < G; g++) {
        eplb_transfer_rank *rk = &out->ranks[g];
        rk->step_first = eplb_calloc((size_t)out->num_steps + 1, sizeof *rk->step_first);
        if (!rk->step_first)
            goto nomem;
        rk->ops = b.ops[g].v;
        rk->num_ops = b.ops[g].n;
        b.ops[g] = (op_vec){ 0 };
        uint32_t i = 0;
        for (uint32_t k = 0; k < out->num_steps; k++) {
            rk->step_first[k] = i;
            while (i < rk->num_ops && rk->ops[i].step == k)
                i++;
        }
        rk->step_first[out->num_steps] = i;
    }
    eplb_free(b.ops);
    eplb_free(stg);
    return EPLB_OK;
nomem:
    st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for a transfer plan of %u layers x %u slots", L, P);
fail:
    eplb_plan_free(&pl);
    eplb_plan_chunks_free(&ch);
    if (b.ops)
        for (uint32_t g = 0; g < G; g++)
            eplb_free(b.ops[g].v);
    eplb_free(b.ops);
    eplb_free(stg);
    eplb_transfer_plan_free(out);
    return st;
}
