/* test_transfer.c -- per-rank transfer plans (eplb_transfer.h), checked by
 * executing them: every rank holds its slots (each an expert id) and its
 * staging entries; steps run in order; within a step every op reads the
 * state the step started from (ops of a step may run at once) and sends
 * are delivered to the receive of the same (sender, receiver, tag).  After
 * the last step every slot must hold its new expert, unchanged and -1 slots
 * must never have been written, and the counters must match the ops. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_transfer.h"

typedef struct sim {
    uint32_t G, S, stg;
    int32_t *slots;    /* [G][S] */
    int32_t *staging;  /* [G][stg] */
    uint32_t *writes;  /* [G][S] times each slot was written */
} sim;

/* Run the plan on the simulated ranks and check the pairing. */
static void run(const eplb_transfer_plan *p, sim *s) {
    const uint32_t G = p->num_ranks, S = p->num_local;
    int32_t *slots0 = malloc((size_t)G * S * sizeof *slots0);
    int32_t *stg0 = malloc(((size_t)G * s->stg + 1) * sizeof *stg0);
    uint8_t *written = malloc((size_t)G * S + (size_t)G * s->stg + 1);
    uint8_t *read = malloc((size_t)G * S + (size_t)G * s->stg + 1);
    for (uint32_t k = 0; k < p->num_steps; k++) {
        memcpy(slots0, s->slots, (size_t)G * S * sizeof *slots0);
        memcpy(stg0, s->staging, (size_t)G * s->stg * sizeof *stg0);
        memset(written, 0, (size_t)G * S + (size_t)G * s->stg + 1);
        memset(read, 0, (size_t)G * S + (size_t)G * s->stg + 1);
#define SLOT_ID(g, i) ((size_t)(g) * S + (i))
#define STG_ID(g, i) ((size_t)G * S + (size_t)(g) * s->stg + (i))
        for (uint32_t g = 0; g < G; g++) {
            const eplb_transfer_rank *rk = &p->ranks[g];
            for (uint32_t i = rk->step_first[k]; i < rk->step_first[k + 1]; i++) {
                const eplb_transfer_op *op = &rk->ops[i];
                cr_assert_eq(op->step, k);
                if (op->kind == EPLB_XFER_RECV)
                    continue; /* done with its send */
                cr_assert(op->src_staging ? op->src < rk->max_staging : op->src < S, "rank %u step %u: src %u", g, k,
                          op->src);
                int32_t v = op->src_staging ? stg0[(size_t)g * s->stg + op->src] : slots0[SLOT_ID(g, op->src)];
                cr_assert_eq(v, op->expert, "rank %u step %u: reads expert %d, the op says %d", g, k, v, op->expert);
                read[op->src_staging ? STG_ID(g, op->src) : SLOT_ID(g, op->src)] = 1;
                uint32_t dg = g, dst = op->dst;
                bool dstg = op->dst_staging;
                if (op->kind == EPLB_XFER_SEND) {
                    /* Its receive: the first of the peer's RECVs from g with
                     * the tag (exactly one). */
                    const eplb_transfer_rank *pr = &p->ranks[op->peer];
                    int found = 0;
                    for (uint32_t j = pr->step_first[k]; j < pr->step_first[k + 1]; j++) {
                        const eplb_transfer_op *q = &pr->ops[j];
                        if (q->kind == EPLB_XFER_RECV && q->peer == g && q->tag == op->tag) {
                            found++;
                            cr_assert_eq(q->expert, op->expert);
                            cr_assert_eq(q->cross_node, op->cross_node);
                            dst = q->dst;
                            dstg = q->dst_staging;
                        }
                    }
                    cr_assert_eq(found, 1, "step %u: send %u -> %u tag %u has %d receives", k, g, op->peer, op->tag,
                                 found);
                    cr_assert_neq(op->peer, g);
                    cr_assert_eq(op->cross_node, g / p->ranks_per_node != op->peer / p->ranks_per_node);
                    dg = op->peer;
                }
                size_t w = dstg ? STG_ID(dg, dst) : SLOT_ID(dg, dst);
                cr_assert(dstg ? dst < p->ranks[dg].max_staging : dst < S);
                cr_assert_eq(written[w], 0, "step %u: rank %u %s %u written twice", k, dg, dstg ? "staging" : "slot",
                             dst);
                written[w] = 1;
                if (dstg)
                    s->staging[(size_t)dg * s->stg + dst] = v;
                else {
                    s->slots[SLOT_ID(dg, dst)] = v;
                    s->writes[SLOT_ID(dg, dst)]++;
                }
            }
        }
        /* No op of a step reads what another op of it writes. */
        for (size_t i = 0; i < (size_t)G * S + (size_t)G * s->stg; i++)
            cr_assert(!(read[i] && written[i]), "step %u: cell %zu read and written", k, i);
        /* Every RECV has its SEND (counted from the receiving side). */
        for (uint32_t g = 0; g < G; g++) {
            const eplb_transfer_rank *rk = &p->ranks[g];
            for (uint32_t i = rk->step_first[k]; i < rk->step_first[k + 1]; i++) {
                const eplb_transfer_op *op = &rk->ops[i];
                if (op->kind != EPLB_XFER_RECV)
                    continue;
                const eplb_transfer_rank *pr = &p->ranks[op->peer];
                int found = 0;
                for (uint32_t j = pr->step_first[k]; j < pr->step_first[k + 1]; j++)
                    found += pr->ops[j].kind == EPLB_XFER_SEND && pr->ops[j].peer == g && pr->ops[j].tag == op->tag;
                cr_assert_eq(found, 1);
            }
        }
        /* Order per pair: the n-th send g -> h is the n-th receive on h from g. */
        for (uint32_t g = 0; g < G; g++)
            for (uint32_t h = 0; h < G; h++) {
                if (g == h)
                    continue;
                const eplb_transfer_rank *a = &p->ranks[g], *b = &p->ranks[h];
                uint32_t i = a->step_first[k], j = b->step_first[k];
                for (;;) {
                    while (i < a->step_first[k + 1] && !(a->ops[i].kind == EPLB_XFER_SEND && a->ops[i].peer == h))
                        i++;
                    while (j < b->step_first[k + 1] && !(b->ops[j].kind == EPLB_XFER_RECV && b->ops[j].peer == g))
                        j++;
                    bool ea = i >= a->step_first[k + 1], eb = j >= b->step_first[k + 1];
                    cr_assert_eq(ea, eb);
                    if (ea)
                        break;
                    cr_assert_eq(a->ops[i].tag, b->ops[j].tag, "step %u: pair %u -> %u out of order", k, g, h);
                    i++, j++;
                }
            }
    }
    free(slots0);
    free(stg0);
    free(written);
    free(read);
}

static void check_counters(const eplb_transfer_plan *p) {
    uint64_t copies = 0, sends = 0, recvs = 0, net = 0, sent = 0, recv = 0;
    for (uint32_t g = 0; g < p->num_ranks; g++) {
        const eplb_transfer_rank *rk = &p->ranks[g];
        uint64_t s = 0, r = 0, x = 0;
        cr_assert_eq(rk->step_first[0], 0);
        cr_assert_eq(rk->step_first[p->num_steps], rk->num_ops);
        for (uint32_t i = 0; i < rk->num_ops; i++) {
            const eplb_transfer_op *op = &rk->ops[i];
            copies += op->kind == EPLB_XFER_COPY;
            s += op->kind == EPLB_XFER_SEND;
            r += op->kind == EPLB_XFER_RECV;
            x += op->kind != EPLB_XFER_COPY && op->cross_node;
            net += op->kind == EPLB_XFER_SEND && op->cross_node;
        }
        cr_assert_eq(rk->sent, s);
        cr_assert_eq(rk->received, r);
        cr_assert_eq(rk->cross_node, x);
        cr_assert_leq(rk->max_staging, p->max_staging);
        sends += s;
        recvs += r;
        sent += rk->sent;
        recv += rk->received;
    }
    cr_assert_eq(sends, recvs);
    cr_assert_eq(sends, p->copies_cross_gpu);
    cr_assert_eq(net, p->copies_cross_node);
    cr_assert_eq(copies, p->copies_local);
    cr_assert_eq(sent, recv);
}

/* Build, run and check old -> new ([L][P]); returns the plan's step count. */
static uint32_t check_move(uint32_t L, uint32_t P, uint32_t G, uint32_t rpn, const int32_t *old_map,
                           const int32_t *new_map, uint32_t bound) {
    eplb_transfer_plan p;
    eplb_error err;
    cr_assert_eq(eplb_transfer_build(L, P, G, rpn, old_map, new_map, bound, &p, &err), EPLB_OK, "%s", err.msg);
    check_counters(&p);
    if (bound)
        cr_assert_leq(p.max_staging, bound);
    const uint32_t S = P / G;
    sim s = { .G = G, .S = S, .stg = p.max_staging };
    s.slots = malloc((size_t)G * S * sizeof *s.slots);
    s.staging = calloc((size_t)G * s.stg + 1, sizeof *s.staging);
    s.writes = calloc((size_t)G * S, sizeof *s.writes);
    /* Every step of the plan names its layer; run the layers one by one. */
    uint32_t k0 = 0;
    for (uint32_t li = 0; li < p.num_layers; li++) {
        uint32_t l = p.layers[li];
        memcpy(s.slots, old_map + (size_t)l * P, (size_t)P * sizeof *s.slots); /* [G][S] = [P] */
        memset(s.writes, 0, (size_t)G * S * sizeof *s.writes);
        uint32_t k1 = k0;
        while (k1 < p.num_steps && p.steps[k1].layer == l)
            k1++;
        cr_assert_gt(k1, k0, "layer %u has no step", l);
        for (uint32_t k = k0 + 1; k < k1; k++)
            cr_assert(p.steps[k].chunk > p.steps[k - 1].chunk ||
                      (p.steps[k].chunk == p.steps[k - 1].chunk && p.steps[k].phase > p.steps[k - 1].phase));
        eplb_transfer_plan view = p;
        /* A view of steps [k0, k1): shift every rank's index. */
        eplb_transfer_rank *ranks = malloc(G * sizeof *ranks);
        for (uint32_t g = 0; g < G; g++) {
            ranks[g] = p.ranks[g];
            ranks[g].step_first = p.ranks[g].step_first + k0;
            ranks[g].ops = p.ranks[g].ops; /* indices stay absolute */
        }
        view.ranks = ranks;
        view.num_steps = k1 - k0;
        /* op->step is absolute: rebase by checking against k0 in run(). */
        for (uint32_t g = 0; g < G; g++)
            for (uint32_t i = p.ranks[g].step_first[k0]; i < p.ranks[g].step_first[k1]; i++)
                p.ranks[g].ops[i].step -= k0;
        run(&view, &s);
        for (uint32_t g = 0; g < G; g++)
            for (uint32_t i = p.ranks[g].step_first[k0]; i < p.ranks[g].step_first[k1]; i++)
                p.ranks[g].ops[i].step += k0;
        free(ranks);
        const int32_t *o = old_map + (size_t)l * P, *n = new_map + (size_t)l * P;
        for (uint32_t x = 0; x < P; x++) {
            if (n[x] >= 0)
                cr_assert_eq(s.slots[x], n[x], "layer %u slot %u holds %d, want %d", l, x, s.slots[x], n[x]);
            if (n[x] < 0 || n[x] == o[x])
                cr_assert_eq(s.writes[x], 0, "layer %u slot %u (%d -> %d) was written", l, x, o[x], n[x]);
        }
        k0 = k1;
    }
    cr_assert_eq(k0, p.num_steps);
    /* Layers not listed are unchanged. */
    uint32_t li = 0;
    for (uint32_t l = 0; l < L; l++) {
        bool listed = li < p.num_layers && p.layers[li] == l;
        li += listed;
        cr_assert_eq(listed, memcmp(old_map + (size_t)l * P, new_map + (size_t)l * P, P * sizeof *old_map) != 0);
    }
    uint32_t steps = p.num_steps;
    free(s.slots);
    free(s.staging);
    free(s.writes);
    eplb_transfer_plan_free(&p);
    return steps;
}

Test(transfer, the_plan_example_moves_and_pairs) {
    /* eplb_plan.h's example on 2 ranks of one node. */
    const int32_t old_row[6] = { 0, 1, 2, 3, 0, 1 }, new_row[6] = { 0, 2, 0, 1, 0, 3 };
    check_move(1, 6, 2, 2, old_row, new_row, 0);
}

Test(transfer, a_cross_rank_swap_is_a_send_recv_pair_each_way) {
    /* Ranks 0 and 1 (different nodes) swap experts 0 and 1; each keeps its
     * other expert, so both are fetched from the peer directly in WAVE0. */
    const int32_t old_row[4] = { 0, 2, 1, 3 }, new_row[4] = { 1, 2, 0, 3 };
    eplb_transfer_plan p;
    eplb_error err;
    cr_assert_eq(eplb_transfer_build(1, 4, 2, 1, old_row, new_row, 0, &p, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(p.copies_cross_gpu, 2);
    cr_assert_eq(p.copies_cross_node, 2);
    cr_assert_eq(p.ranks[0].sent, 1);
    cr_assert_eq(p.ranks[0].received, 1);
    cr_assert_eq(p.ranks[0].cross_node, 2);
    eplb_transfer_plan_free(&p);
    check_move(1, 4, 2, 1, old_row, new_row, 0);
}

Test(transfer, equal_maps_have_no_steps) {
    const int32_t row[8] = { 0, 1, 2, 3, 0, 1, 2, 3 };
    eplb_transfer_plan p;
    eplb_error err;
    cr_assert_eq(eplb_transfer_build(1, 8, 4, 2, row, row, 0, &p, &err), EPLB_OK);
    cr_assert_eq(p.num_steps, 0);
    cr_assert_eq(p.num_layers, 0);
    for (uint32_t g = 0; g < 4; g++)
        cr_assert_eq(p.ranks[g].num_ops, 0);
    /* Copies of a plan without steps or ops (NULL arrays). */
    eplb_transfer_plan c;
    cr_assert_eq(eplb_transfer_plan_copy(&p, 2, &c, &err), EPLB_OK);
    cr_assert_eq(c.num_rank_plans, 1);
    cr_assert_eq(c.first_rank, 2);
    eplb_transfer_plan_free(&c);
    cr_assert_eq(eplb_transfer_plan_copy(&p, UINT32_MAX, &c, &err), EPLB_OK);
    cr_assert_eq(c.num_rank_plans, 4);
    eplb_transfer_plan_free(&c);
    cr_assert_eq(eplb_transfer_plan_copy(&p, 4, &c, &err), EPLB_EINVAL);
    eplb_transfer_plan_free(&p);
}

Test(transfer, bad_shapes_and_budgets_are_refused) {
    const int32_t row[6] = { 0, 1, 2, 0, 1, 2 };
    eplb_transfer_plan p;
    eplb_error err;
    cr_assert_eq(eplb_transfer_build(1, 6, 4, 1, row, row, 0, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_transfer_build(1, 6, 2, 4, row, row, 0, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_transfer_build(1, 6, 2, 1, row, NULL, 0, &p, &err), EPLB_EINVAL);
    const int32_t bad[6] = { 0, 1, 2, 0, 1, 9 }; /* expert 9 held by no old slot */
    cr_assert_eq(eplb_transfer_build(1, 6, 2, 1, row, bad, 0, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "layer 0: "), "%s", err.msg);
    uint32_t n;
    cr_assert_eq(eplb_transfer_staging_entries(0, 0, &n, &err), EPLB_OK);
    cr_assert_eq(n, 0);
    cr_assert_eq(eplb_transfer_staging_entries(100, 0, &n, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_transfer_staging_entries(100, 101, &n, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_transfer_staging_entries(250, 100, &n, &err), EPLB_OK);
    cr_assert_eq(n, 2);
    /* A 3-cycle on one rank needs 3 entries at once. */
    const int32_t o3[3] = { 0, 1, 2 }, n3[3] = { 1, 2, 0 };
    cr_assert_eq(eplb_transfer_build(1, 3, 1, 1, o3, n3, 2, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "layer 0: "), "%s", err.msg);
    check_move(1, 3, 1, 1, o3, n3, 3);
}

/* A random placement row: every expert of [0, N) once, then redundant
 * replicas, shuffled; some -1 slots when holes. */
static void random_row(unsigned *seed, uint32_t N, uint32_t P, int32_t *row, bool holes) {
    for (uint32_t s = 0; s < P; s++)
        row[s] = s < N ? (int32_t)s : (int32_t)(rand_r(seed) % N);
    for (uint32_t s = P - 1; s > 0; s--) {
        uint32_t j = (uint32_t)rand_r(seed) % (s + 1);
        int32_t t = row[s];
        row[s] = row[j];
        row[j] = t;
    }
    if (holes)
        for (uint32_t s = 0; s < P; s++)
            if (rand_r(seed) % 8 == 0) {
                /* Empty only a redundant copy: every expert keeps one. */
                int32_t e = row[s];
                uint32_t c = 0;
                for (uint32_t t = 0; t < P; t++)
                    c += row[t] == e;
                if (c > 1)
                    row[s] = -1;
            }
}

/* A changed row near the old one: a few swaps and replica changes. */
static void perturb(unsigned *seed, uint32_t N, uint32_t P, const int32_t *old_row, int32_t *row) {
    memcpy(row, old_row, P * sizeof *row);
    uint32_t k = 1 + (uint32_t)rand_r(seed) % (P / 2 + 1);
    for (uint32_t i = 0; i < k; i++) {
        uint32_t a = (uint32_t)rand_r(seed) % P, b = (uint32_t)rand_r(seed) % P;
        int32_t t = row[a];
        row[a] = row[b];
        row[b] = t;
    }
    /* A redundant slot takes another expert when its expert keeps a copy. */
    uint32_t s = (uint32_t)rand_r(seed) % P;
    if (row[s] >= 0) {
        uint32_t c = 0;
        for (uint32_t t = 0; t < P; t++)
            c += row[t] == row[s];
        if (c > 1)
            row[s] = (int32_t)((uint32_t)rand_r(seed) % N);
    }
}

Test(transfer, hundreds_of_random_moves_execute_to_the_new_placement) {
    unsigned seed = 1234;
    static const struct { uint32_t N, P, G, rpn; } shapes[] = {
        { 4, 6, 2, 1 }, { 8, 12, 4, 2 }, { 16, 24, 8, 4 }, { 16, 32, 8, 2 }, { 30, 36, 6, 3 }, { 12, 16, 16, 4 },
        { 64, 72, 8, 8 }, { 7, 8, 1, 1 },
    };
    for (int it = 0; it < 400; it++) {
        uint32_t k = (uint32_t)it % (sizeof shapes / sizeof shapes[0]);
        uint32_t N = shapes[k].N, P = shapes[k].P, G = shapes[k].G, rpn = shapes[k].rpn, L = 1 + (uint32_t)it % 3;
        int32_t *o = malloc((size_t)L * P * sizeof *o), *n = malloc((size_t)L * P * sizeof *n);
        for (uint32_t l = 0; l < L; l++) {
            random_row(&seed, N, P, o + (size_t)l * P, it % 5 == 0);
            if (it % 2)
                random_row(&seed, N, P, n + (size_t)l * P, it % 7 == 0);
            else
                perturb(&seed, N, P, o + (size_t)l * P, n + (size_t)l * P);
        }
        if (L > 1 && it % 4 == 0) /* a layer that does not change */
            memcpy(n, o, P * sizeof *o);
        check_move(L, P, G, rpn, o, n, 0);
        /* With a staging bound: whatever fits is executed correctly; a bound
         * below what a group needs is refused, cleanly. */
        for (uint32_t bound = 1; bound <= 3; bound++) {
            eplb_transfer_plan p;
            eplb_error err;
            eplb_status st = eplb_transfer_build(L, P, G, rpn, o, n, bound, &p, &err);
            if (st == EPLB_OK) {
                eplb_transfer_plan_free(&p);
                check_move(L, P, G, rpn, o, n, bound);
            } else {
                cr_assert_eq(st, EPLB_EPRECONDITION, "%s", err.msg);
                cr_assert_eq(p.num_steps, 0);
                cr_assert_null(p.ranks);
            }
        }
        free(o);
        free(n);
    }
}

Test(transfer, a_bound_cuts_more_chunks_and_every_rank_sees_the_same_steps) {
    /* One node of 2 ranks, 8 slots each, all swapped pairwise within each
     * rank: bound 2 needs a chunk per swap. */
    int32_t o[16], n[16];
    for (int i = 0; i < 16; i++) {
        o[i] = i;
        n[i] = i ^ 1;
    }
    uint32_t unbounded = check_move(1, 16, 2, 2, o, n, 0);
    uint32_t bounded = check_move(1, 16, 2, 2, o, n, 2);
    cr_assert_gt(bounded, unbounded);
    eplb_transfer_plan p;
    eplb_error err;
    cr_assert_eq(eplb_transfer_build(1, 16, 2, 2, o, n, 2, &p, &err), EPLB_OK);
    cr_assert_eq(p.max_staging, 2);
    cr_assert_eq(p.steps[p.num_steps - 1].chunk, 3);
    eplb_transfer_plan_free(&p);
}
