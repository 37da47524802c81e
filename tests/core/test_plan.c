/* test_plan.c -- tests of transfer plans and GPU/node reassignment
 * (eplb_plan.c).
 *
 * Golden: the two worked transfer plans of eplb-semantics "Moving the
 * weights", duplicate destinations, -1 slots, cheapest-source order,
 * refusals.  Properties (fixed seeds, many shapes): a tiny executor in this
 * file runs each plan on an array of slot contents and checks every slot
 * ends with its new expert, unchanged and -1 slots are never written,
 * phase 1 writes no slot, phase 2 is idempotent (a rerun after a failure
 * part-way completes the plan), at most one cross-GPU copy per (GPU, expert)
 * and no dearer link than needed.  Reassignment keeps balancedness, never
 * lowers overlap and matches a brute-force optimum on small shapes. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_plan.h"
#include "eplb_policy.h"

/* ---------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t rng_below(uint64_t *state, uint32_t n) { return (uint32_t)(rng_next(state) % n); }

static void build_ok(uint32_t P, uint32_t G, uint32_t gpn, const int32_t *old_row,
                     const int32_t *new_row, eplb_plan *plan) {
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_plan_build(P, G, gpn, old_row, new_row, 0, G, plan, &err);
    cr_assert_eq(st, EPLB_OK, "plan failed: %s", err.msg);
}

/* The old slot whose bytes end up in destination slot d (or -1 if no op
 * writes d), following staging entries and wave-1 copies. */
static int64_t origin_of(const eplb_plan *p, uint32_t d) {
    for (uint32_t i = 0; i < p->num_scatter; i++) {
        const eplb_plan_op *op = &p->scatter[i];
        if (op->dst != d)
            continue;
        if (op->kind == EPLB_OP_UNSTAGE) {
            for (uint32_t j = 0; j < p->num_gather; j++)
                if (p->gather[j].dst == op->src)
                    return p->gather[j].src;
            return -2;
        }
        if (op->wave == 1)
            return origin_of(p, op->src);
        return op->src;
    }
    return -1;
}

/* Tiny executor.  mem[s] is the expert whose bytes slot s holds; writes[s]
 * counts writes.  Checks the plan's structural invariants as it goes. */
typedef struct sim {
    uint32_t P, S;
    int32_t *mem;     /* [P] */
    uint32_t *writes; /* [P] */
    int32_t *stg;     /* [num_staging] */
    bool *stg_set;    /* [num_staging] */
} sim;

static void sim_init(sim *s, const eplb_plan *p, const int32_t *old_row) {
    s->P = p->num_physical;
    s->S = p->num_physical / p->num_gpus;
    s->mem = malloc(s->P * sizeof *s->mem);
    s->writes = calloc(s->P, sizeof *s->writes);
    s->stg = malloc((p->num_staging + 1) * sizeof *s->stg);
    s->stg_set = calloc(p->num_staging + 1, sizeof *s->stg_set);
    cr_assert(s->mem && s->writes && s->stg && s->stg_set);
    memcpy(s->mem, old_row, s->P * sizeof *s->mem);
}

static void sim_free(sim *s) {
    free(s->mem);
    free(s->writes);
    free(s->stg);
    free(s->stg_set);
}

static void sim_gather(sim *s, const eplb_plan *p) {
    for (uint32_t i = 0; i < p->num_gather; i++) {
        const eplb_plan_op *op = &p->gather[i];
        cr_assert_eq(op->kind, EPLB_OP_STAGE);
        cr_assert_lt(op->src, s->P);
        cr_assert_lt(op->dst, p->num_staging);
        cr_assert_eq(op->src_gpu, op->src / s->S);
        cr_assert_eq(op->dst_gpu, p->staging[op->dst].gpu);
        cr_assert_eq(s->mem[op->src], op->expert, "gather reads slot %u holding %d, want %d",
                     op->src, s->mem[op->src], op->expert);
        cr_assert_not(s->stg_set[op->dst], "staging %u filled twice", op->dst);
        s->stg[op->dst] = s->mem[op->src];
        s->stg_set[op->dst] = true;
    }
}

/* Runs scatter ops [from, to). */
static void sim_scatter_range(sim *s, const eplb_plan *p, uint32_t from, uint32_t to) {
    for (uint32_t i = from; i < to; i++) {
        const eplb_plan_op *op = &p->scatter[i];
        cr_assert_lt(op->dst, s->P);
        cr_assert_eq(op->dst_gpu, op->dst / s->S);
        int32_t v;
        if (op->kind == EPLB_OP_UNSTAGE) {
            cr_assert_lt(op->src, p->num_staging);
            cr_assert(s->stg_set[op->src], "staging %u read before filled", op->src);
            cr_assert_eq(p->staging[op->src].gpu, op->dst_gpu, "unstage crosses GPUs");
            cr_assert_eq(op->link, EPLB_LINK_LOCAL);
            v = s->stg[op->src];
        } else {
            cr_assert_eq(op->kind, EPLB_OP_COPY);
            cr_assert_lt(op->src, s->P);
            cr_assert_eq(op->src_gpu, op->src / s->S);
            if (op->wave == 1) {
                cr_assert_geq(i, p->num_scatter_wave0);
                cr_assert_eq(op->src_gpu, op->dst_gpu, "wave-1 copy crosses GPUs");
            } else {
                cr_assert_lt(i, p->num_scatter_wave0);
            }
            v = s->mem[op->src];
        }
        cr_assert_eq(v, op->expert, "scatter op %u moves %d, labelled %d", i, v, op->expert);
        s->mem[op->dst] = v;
        s->writes[op->dst]++;
    }
}

/* Full check of one plan for (old_row, new_row). */
static void check_plan(const eplb_plan *p, const int32_t *old_row, const int32_t *new_row,
                       uint32_t gpn) {
    const uint32_t P = p->num_physical, G = p->num_gpus, S = P / G;
    cr_assert_eq(p->slots_unchanged + p->slots_empty + p->slots_written, P);
    cr_assert_eq(p->local_copies + p->cross_gpu_copies, p->num_gather + p->num_scatter);
    cr_assert_eq(p->num_scatter, p->slots_written, "each changed slot written exactly once");
    cr_assert_leq(p->num_scatter_wave0, p->num_scatter);

    sim s;
    sim_init(&s, p, old_row);
    sim_gather(&s, p);
    for (uint32_t i = 0; i < P; i++)
        cr_assert_eq(s.writes[i], 0, "phase 1 wrote slot %u", i);
    /* A failure part-way through phase 2, then a full rerun from staging. */
    uint32_t cut = p->num_scatter / 2;
    sim_scatter_range(&s, p, 0, cut);
    memset(s.writes, 0, P * sizeof *s.writes);
    sim_scatter_range(&s, p, 0, p->num_scatter);
    for (uint32_t i = 0; i < P; i++) {
        bool changed = new_row[i] != -1 && new_row[i] != old_row[i];
        if (changed) {
            cr_assert_eq(s.mem[i], new_row[i], "slot %u holds %d, want %d", i, s.mem[i],
                         new_row[i]);
            cr_assert_eq(s.writes[i], 1, "slot %u written %u times", i, s.writes[i]);
        } else {
            cr_assert_eq(s.writes[i], 0, "stable slot %u written", i);
            cr_assert_eq(s.mem[i], old_row[i]);
        }
    }
    /* Staging: unique (gpu, expert), each filled by one STAGE from a changed
     * slot (staging only when the source is overwritten), per-GPU indices
     * dense. */
    uint32_t *per_gpu = calloc(G, sizeof *per_gpu);
    for (uint32_t k = 0; k < p->num_staging; k++) {
        cr_assert(s.stg_set[k]);
        cr_assert_eq(p->staging[k].index, per_gpu[p->staging[k].gpu]++);
        for (uint32_t j = 0; j < k; j++)
            cr_assert(p->staging[j].gpu != p->staging[k].gpu ||
                          p->staging[j].expert != p->staging[k].expert,
                      "staging entries %u and %u duplicate", j, k);
    }
    uint32_t mx = 0;
    for (uint32_t g = 0; g < G; g++)
        mx = per_gpu[g] > mx ? per_gpu[g] : mx;
    cr_assert_eq(mx, p->max_staging_per_gpu);
    free(per_gpu);
    for (uint32_t i = 0; i < p->num_gather; i++) {
        uint32_t src = p->gather[i].src;
        cr_assert(new_row[src] != -1 && new_row[src] != old_row[src],
                  "staged a stable slot %u", src);
    }
    /* Links: at most one cross-GPU op per (dst GPU, expert); none when the
     * GPU had a local old replica; no cross-node op when the node had one. */
    uint32_t cross = 0, net = 0;
    const eplb_plan_op *all[2] = {p->gather, p->scatter};
    uint32_t cnt[2] = {p->num_gather, p->num_scatter};
    for (int ph = 0; ph < 2; ph++) {
        for (uint32_t i = 0; i < cnt[ph]; i++) {
            const eplb_plan_op *op = &all[ph][i];
            uint8_t want = op->src_gpu == op->dst_gpu ? EPLB_LINK_LOCAL
                           : op->src_gpu / gpn == op->dst_gpu / gpn ? EPLB_LINK_PEER
                                                                    : EPLB_LINK_NET;
            cr_assert_eq(op->link, want);
            if (op->link == EPLB_LINK_LOCAL)
                continue;
            cross++;
            net += op->link == EPLB_LINK_NET;
            for (uint32_t t = op->dst_gpu * S; t < (op->dst_gpu + 1) * S; t++)
                cr_assert_neq(old_row[t], op->expert,
                              "GPU %u fetched expert %d remotely but held it in slot %u",
                              op->dst_gpu, op->expert, t);
            if (op->link == EPLB_LINK_NET) {
                uint32_t node = op->dst_gpu / gpn;
                for (uint32_t t = 0; t < P; t++)
                    if (t / S / gpn == node)
                        cr_assert_neq(old_row[t], op->expert, "cross-node fetch avoidable");
            }
            for (int ph2 = 0; ph2 < 2; ph2++)
                for (uint32_t j = 0; j < cnt[ph2]; j++) {
                    const eplb_plan_op *o2 = &all[ph2][j];
                    if (o2 != op && o2->link != EPLB_LINK_LOCAL && o2->dst_gpu == op->dst_gpu)
                        cr_assert_neq(o2->expert, op->expert,
                                      "expert %d fetched twice onto GPU %u", op->expert,
                                      op->dst_gpu);
                }
        }
    }
    cr_assert_eq(cross, p->cross_gpu_copies);
    cr_assert_eq(net, p->cross_node_copies);
    sim_free(&s);
}

/* ---------------------------------------------------------------------------
 * Worked examples (eplb-semantics "Moving the weights")
 * ------------------------------------------------------------------------- */

Test(plan, worked_example_all_local) {
    const int32_t old_row[] = {0, 1, 2, 3, 0, 1};
    const int32_t new_row[] = {0, 2, 0, 1, 0, 3};
    eplb_plan p;
    build_ok(6, 2, 2, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 2);
    cr_assert_eq(p.cross_gpu_copies, 0, "all local");
    cr_assert_eq(p.slots_unchanged, 2); /* GPU0 slot0, GPU1 slot1 */
    cr_assert_eq(p.slots_written, 4);
    /* GPU0: slot0 unchanged, slot2 <- slot0, slot1 <- slot2. */
    cr_assert_eq(origin_of(&p, 0), -1);
    cr_assert_eq(origin_of(&p, 2), 0);
    cr_assert_eq(origin_of(&p, 1), 2);
    /* GPU1 (slots 3..5): slot1 unchanged, slot2 <- slot0, slot0 <- slot2. */
    cr_assert_eq(origin_of(&p, 4), -1);
    cr_assert_eq(origin_of(&p, 5), 3);
    cr_assert_eq(origin_of(&p, 3), 5);
    /* slot0 of GPU0 is stable: slot2 is a direct copy, no staging; the three
     * others read slots that are overwritten: three staging entries. */
    cr_assert_eq(p.num_staging, 3);
    cr_assert_eq(p.num_gather, 3);
    cr_assert_eq(p.local_copies, 7);
    eplb_plan_free(&p);
}

Test(plan, worked_example_two_gpus_exchange) {
    const int32_t old_row[] = {0, 1, 2, 3};
    const int32_t new_row[] = {2, 0, 1, 3};
    eplb_plan p;
    build_ok(4, 2, 2, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 2);
    /* GPU0 copies slot1 <- slot0, sends expert 1 to GPU1, receives expert 2
     * into slot0 from GPU1; GPU1 receives expert 1 into its slot0. */
    cr_assert_eq(origin_of(&p, 1), 0);
    cr_assert_eq(origin_of(&p, 0), 2);
    cr_assert_eq(origin_of(&p, 2), 1);
    cr_assert_eq(origin_of(&p, 3), -1);
    cr_assert_eq(p.slots_unchanged, 1);
    cr_assert_eq(p.cross_gpu_copies, 2);
    cr_assert_eq(p.cross_node_copies, 0);
    cr_assert_eq(p.num_staging, 3);
    for (uint32_t i = 0; i < p.num_gather; i++) {
        const eplb_plan_op *op = &p.gather[i];
        if (op->expert == 1)
            cr_assert(op->src == 1 && op->src_gpu == 0 && op->dst_gpu == 1 &&
                      op->link == EPLB_LINK_PEER);
        if (op->expert == 2)
            cr_assert(op->src == 2 && op->src_gpu == 1 && op->dst_gpu == 0);
    }
    eplb_plan_free(&p);
    /* The same exchange with one GPU per node crosses nodes. */
    build_ok(4, 2, 1, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 1);
    cr_assert_eq(p.cross_node_copies, 2);
    eplb_plan_free(&p);
}

Test(plan, identical_rows_touch_nothing) {
    const int32_t row[] = {0, 1, 2, 3, 0, 1, -1, 2};
    eplb_plan p;
    build_ok(8, 4, 2, row, row, &p);
    cr_assert_eq(p.num_gather + p.num_scatter + p.num_staging, 0);
    cr_assert_eq(p.slots_unchanged, 7);
    cr_assert_eq(p.slots_empty, 1);
    cr_assert_null(p.gather);
    eplb_plan_free(&p);
    eplb_plan_free(&p); /* twice is fine */
    eplb_plan_free(NULL);
}

Test(plan, empty_slots_not_written_and_hold_nothing) {
    /* slot1's new expert is -1: not written, and it stays a stable source. */
    const int32_t old_row[] = {-1, 1, 2, 3};
    const int32_t new_row[] = {1, -1, 2, 3};
    eplb_plan p;
    build_ok(4, 2, 2, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 2);
    cr_assert_eq(p.slots_empty, 1);
    cr_assert_eq(p.num_scatter, 1);
    cr_assert_eq(p.scatter[0].kind, EPLB_OP_COPY);
    cr_assert_eq(p.scatter[0].src, 1);
    cr_assert_eq(p.scatter[0].dst, 0);
    cr_assert_eq(p.num_staging, 0);
    eplb_plan_free(&p);

    /* An old -1 slot holds nothing: expert 0 has no source. */
    const int32_t old2[] = {-1, 1, 2, 3};
    const int32_t new2[] = {0, 1, 2, 3};
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_plan_build(4, 2, 2, old2, new2, 0, 2, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "expert 0") && strstr(err.msg, "no old slot"), "%s", err.msg);
    cr_assert_eq(p.num_scatter, 0);
    cr_assert_null(p.gather);
}

Test(plan, duplicate_destination_fetched_once) {
    /* GPU0 wants expert 2 in both slots; GPU1 slot0 keeps it (stable). */
    const int32_t old_row[] = {0, 1, 2, 3};
    const int32_t new_row[] = {2, 2, 2, 3};
    eplb_plan p;
    build_ok(4, 2, 2, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 2);
    cr_assert_eq(p.cross_gpu_copies, 1);
    cr_assert_eq(p.local_copies, 1);
    cr_assert_eq(p.num_staging, 0);
    cr_assert_eq(p.num_scatter_wave0, 1);
    cr_assert_eq(p.scatter[1].wave, 1);
    cr_assert_eq(p.scatter[1].src, p.scatter[0].dst);
    eplb_plan_free(&p);

    /* The source is overwritten: one staging entry on GPU0, filled once over
     * the link, then copied locally into both slots. */
    const int32_t new2[] = {3, 3, 2, 2};
    build_ok(4, 2, 2, old_row, new2, &p);
    check_plan(&p, old_row, new2, 2);
    cr_assert_eq(p.cross_gpu_copies, 1);
    cr_assert_eq(p.num_staging, 1);
    cr_assert_eq(p.staging[0].gpu, 0);
    cr_assert_eq(p.staging[0].expert, 3);
    eplb_plan_free(&p);

    /* Three slots of GPU1 want expert 0 from GPU0, across nodes. */
    const int32_t old3[] = {0, 1, 2, 3, 4, 5, 6, 7};
    const int32_t new3[] = {0, 1, 2, 3, 0, 0, 0, 7};
    build_ok(8, 2, 1, old3, new3, &p);
    check_plan(&p, old3, new3, 1);
    cr_assert_eq(p.cross_node_copies, 1);
    cr_assert_eq(p.cross_gpu_copies, 1);
    cr_assert_eq(p.local_copies, 2);
    eplb_plan_free(&p);
}

Test(plan, cheapest_source_first) {
    /* 4 GPUs x 2 slots, 2 GPUs per node: nodes {0,1} and {2,3}. */
    const int32_t old_row[] = {0, 9, 1, 9, 0, 9, 2, 9};
    eplb_plan p;
    /* GPU3 wants expert 0: GPU2 (same node) rather than GPU0 (other node). */
    const int32_t want_peer[] = {0, 9, 1, 9, 0, 9, 2, 0};
    build_ok(8, 4, 2, old_row, want_peer, &p);
    check_plan(&p, old_row, want_peer, 2);
    cr_assert_eq(origin_of(&p, 7), 4);
    cr_assert_eq(p.cross_node_copies, 0);
    eplb_plan_free(&p);
    /* GPU1 wants expert 0: GPU0 (same node) rather than GPU2. */
    const int32_t want_peer2[] = {0, 9, 1, 0, 0, 9, 2, 9};
    build_ok(8, 4, 2, old_row, want_peer2, &p);
    cr_assert_eq(origin_of(&p, 3), 0);
    eplb_plan_free(&p);
    /* Same GPU beats everything, even an overwritten slot (staged locally). */
    const int32_t old_loc[] = {5, 7, 6, 8};
    const int32_t new_loc[] = {6, 5, 6, 8};
    build_ok(4, 2, 2, old_loc, new_loc, &p);
    check_plan(&p, old_loc, new_loc, 2);
    cr_assert_eq(origin_of(&p, 1), 0, "expert 5 comes from slot0 on the same GPU");
    cr_assert_eq(p.cross_gpu_copies, 1); /* expert 6 from GPU1 */
    eplb_plan_free(&p);
    /* Equal links: a stable source beats a lower but overwritten slot. */
    const int32_t old3[] = {0, 9, 0, 9, 1, 1};
    const int32_t new3[] = {1, 9, 0, 9, 1, 0};
    build_ok(6, 3, 3, old3, new3, &p);
    check_plan(&p, old3, new3, 3);
    cr_assert_eq(origin_of(&p, 5), 2, "stable slot2 over overwritten slot0");
    cr_assert_eq(origin_of(&p, 0), 4, "stable slot4 over overwritten slot5");
    cr_assert_eq(p.num_staging, 0);
    eplb_plan_free(&p);
}

Test(plan, reads_spread_over_equal_sources) {
    /* Experts 0 and 1 both live on GPU0 and GPU1 (stable); GPU2 wants both.
     * Reads go one to each GPU. */
    const int32_t old_row[] = {0, 1, 0, 1, 8, 9};
    const int32_t new_row[] = {0, 1, 0, 1, 0, 1};
    eplb_plan p;
    build_ok(6, 3, 3, old_row, new_row, &p);
    check_plan(&p, old_row, new_row, 3);
    cr_assert_eq(p.num_scatter, 2);
    cr_assert_neq(p.scatter[0].src_gpu, p.scatter[1].src_gpu);
    eplb_plan_free(&p);
}

/* ---------------------------------------------------------------------------
 * Refusals
 * ------------------------------------------------------------------------- */

Test(plan, remote_gpus_refused_before_anything) {
    /* 4 GPUs x 1 slot; this server holds GPUs 0..1. */
    const int32_t old_row[] = {0, 1, 2, 3};
    const int32_t ok_row[] = {1, 0, 2, 3};
    const int32_t dst_far[] = {0, 1, 3, 2};
    const int32_t src_far[] = {2, 1, 2, 3};
    eplb_plan p;
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_plan_build(4, 4, 4, old_row, ok_row, 0, 2, &p, &err), EPLB_OK, "%s",
                 err.msg);
    check_plan(&p, old_row, ok_row, 4);
    eplb_plan_free(&p);

    cr_assert_eq(eplb_plan_build(4, 4, 4, old_row, dst_far, 0, 2, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "slot 2 (GPU 2)"), "%s", err.msg);
    cr_assert_null(p.gather);
    cr_assert_eq(p.slots_written + p.num_scatter, 0);

    eplb_error_clear(&err);
    cr_assert_eq(eplb_plan_build(4, 4, 4, old_row, src_far, 0, 2, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "slot 0 (GPU 0)") && strstr(err.msg, "slot 2 (GPU 2)"), "%s",
              err.msg);
    cr_assert_null(p.gather);

    /* A server with GPUs 2..3 cannot write GPU0's slot. */
    eplb_error_clear(&err);
    cr_assert_eq(eplb_plan_build(4, 4, 4, old_row, ok_row, 2, 2, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "GPU 0") && strstr(err.msg, "2..3"), "%s", err.msg);
    /* ...but a change limited to its GPUs is fine. */
    const int32_t mine[] = {0, 1, 3, 2};
    cr_assert_eq(eplb_plan_build(4, 4, 4, old_row, mine, 2, 2, &p, &err), EPLB_OK);
    eplb_plan_free(&p);
}

Test(plan, bad_arguments) {
    const int32_t row[] = {0, 1, 2, 3};
    const int32_t bad[] = {0, -2, 2, 3};
    eplb_plan p;
    eplb_error err;
    cr_assert_eq(eplb_plan_build(4, 3, 1, row, row, 0, 3, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "multiple"), "%s", err.msg);
    cr_assert_eq(eplb_plan_build(4, 0, 1, row, row, 0, 0, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_plan_build(4, 2, 0, row, row, 0, 2, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_plan_build(4, 2, 1, row, row, 1, 2, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_plan_build(4, 2, 1, NULL, row, 0, 2, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_plan_build(4, 2, 1, row, row, 0, 2, NULL, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_plan_build(4, 2, 1, row, bad, 0, 2, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "new_row[1] = -2"), "%s", err.msg);
    cr_assert_eq(eplb_plan_build(4, 2, 1, bad, row, 0, 2, &p, NULL), EPLB_EINVAL);
    /* Both rows bad: the old row's entry is named, even at a later slot
     * (the rows are checked in one pass, the message as before). */
    const int32_t bad_late[] = {0, 1, 2, (int32_t)EPLB_POLICY_MAX_EXPERTS};
    cr_assert_eq(eplb_plan_build(4, 2, 1, bad_late, bad, 0, 2, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "old_row[3] = "), "%s", err.msg);
    cr_assert_eq(p.num_gather + p.num_scatter + p.slots_written, 0);
}

/* ---------------------------------------------------------------------------
 * Properties over random maps
 * ------------------------------------------------------------------------- */

/* A random old row over N experts (some -1), and a new row drawing experts
 * only from those the old row holds, with some slots kept and some -1. */
static void random_rows(uint64_t *st, uint32_t P, uint32_t N, int32_t *old_row,
                        int32_t *new_row) {
    for (uint32_t s = 0; s < P; s++)
        old_row[s] = rng_below(st, 10) == 0 ? -1 : (int32_t)rng_below(st, N);
    if (old_row[0] == -1)
        old_row[0] = 0;
    uint32_t keep = rng_below(st, 4); /* 0..3: more or fewer unchanged slots */
    for (uint32_t s = 0; s < P; s++) {
        uint32_t r = rng_below(st, 16);
        if (r < keep * 3)
            new_row[s] = old_row[s];
        else if (r == 15)
            new_row[s] = -1;
        else {
            int32_t v;
            do
                v = old_row[rng_below(st, P)];
            while (v < 0);
            new_row[s] = v;
        }
    }
}

Test(plan, property_random_maps) {
    uint64_t st = 42;
    for (int iter = 0; iter < 3000; iter++) {
        uint32_t G = 1 + rng_below(&st, 8);
        uint32_t S = 1 + rng_below(&st, 6);
        uint32_t P = G * S, N = 1 + rng_below(&st, P + 2);
        uint32_t gpn = 1 + rng_below(&st, G);
        int32_t *old_row = malloc(P * sizeof *old_row);
        int32_t *new_row = malloc(P * sizeof *new_row);
        random_rows(&st, P, N, old_row, new_row);
        eplb_plan p;
        build_ok(P, G, gpn, old_row, new_row, &p);
        check_plan(&p, old_row, new_row, gpn);
        eplb_plan_free(&p);
        free(old_row);
        free(new_row);
    }
}

Test(plan, property_policy_shaped) {
    /* DeepSeek-V3-like single layers: a permutation of a policy-shaped row. */
    uint64_t st = 7;
    const uint32_t P = 288, G = 32, N = 256;
    int32_t old_row[288], new_row[288];
    for (int iter = 0; iter < 50; iter++) {
        for (uint32_t s = 0; s < P; s++) {
            old_row[s] = (int32_t)(s < N ? s : rng_below(&st, N));
            new_row[s] = (int32_t)(s < N ? s : rng_below(&st, N));
        }
        for (uint32_t s = P - 1; s > 0; s--) {
            uint32_t j = rng_below(&st, s + 1);
            int32_t t = new_row[s];
            new_row[s] = new_row[j];
            new_row[j] = t;
        }
        eplb_plan p;
        build_ok(P, G, 8, old_row, new_row, &p);
        check_plan(&p, old_row, new_row, 8);
        eplb_plan_free(&p);
    }
}

/* ---------------------------------------------------------------------------
 * Reassignment
 * ------------------------------------------------------------------------- */

Test(reassign, golden_swaps) {
    int32_t old_row[] = {0, 1, 2, 3};
    int32_t new_row[] = {2, 3, 0, 1};
    eplb_plan_reassign_gpus(1, 4, 2, 1, old_row, new_row);
    int32_t want[] = {0, 1, 2, 3};
    cr_assert_arr_eq(new_row, want, sizeof want);

    /* 2 nodes x 2 GPUs, 1 slot each: nodes swap, then GPUs inside. */
    int32_t new2[] = {3, 2, 1, 0};
    eplb_plan_reassign_gpus(1, 4, 4, 2, old_row, new2);
    cr_assert_arr_eq(new2, want, sizeof want);

    /* No overlap anywhere: identity. */
    int32_t new3[] = {7, 6, 5, 4};
    int32_t want3[] = {7, 6, 5, 4};
    eplb_plan_reassign_gpus(1, 4, 4, 2, old_row, new3);
    cr_assert_arr_eq(new3, want3, sizeof want3);

    /* Node structure respected: with 2 nodes, new GPUs {0,1} hold experts of
     * old GPUs {0,2}; they may not be split across nodes. */
    int32_t new4[] = {0, 2, 1, 3};
    int32_t want4[] = {0, 2, 1, 3}; /* any node-respecting move scores <= 2 */
    eplb_plan_reassign_gpus(1, 4, 4, 2, old_row, new4);
    cr_assert_arr_eq(new4, want4, sizeof want4);
    int32_t new5[] = {0, 2, 1, 3};
    int32_t want5[] = {0, 1, 2, 3};
    eplb_plan_reassign_gpus(1, 4, 4, 1, old_row, new5); /* 1 node: free */
    cr_assert_arr_eq(new5, want5, sizeof want5);

    /* Invalid shapes: untouched. */
    int32_t new6[] = {3, 2, 1, 0};
    eplb_plan_reassign_gpus(1, 4, 3, 1, old_row, new6);
    eplb_plan_reassign_gpus(1, 4, 4, 3, old_row, new6);
    eplb_plan_reassign_gpus(1, 4, 0, 1, old_row, new6);
    int32_t want6[] = {3, 2, 1, 0};
    cr_assert_arr_eq(new6, want6, sizeof want6);
}

/* Best overlap over all node-respecting block permutations (brute force). */
static uint64_t brute_best(uint32_t P, uint32_t G, uint32_t n, const int32_t *old_row,
                           const int32_t *new_row) {
    uint32_t m = G / n, S = P / G;
    uint32_t perm[8];
    for (uint32_t i = 0; i < G; i++)
        perm[i] = i;
    uint64_t best = 0;
    int32_t row[64];
    /* Heap's algorithm over all G! permutations; keep node-respecting ones. */
    uint32_t c[8] = {0};
    for (;;) {
        bool ok = true;
        for (uint32_t b = 0; b < n && ok; b++)
            for (uint32_t i = 1; i < m && ok; i++)
                ok = perm[b * m + i] / m == perm[b * m] / m;
        if (ok) {
            for (uint32_t g = 0; g < G; g++)
                memcpy(row + perm[g] * S, new_row + g * S, S * sizeof *row);
            uint64_t v = eplb_plan_overlap(P, G, old_row, row);
            best = v > best ? v : best;
        }
        uint32_t i = 1;
        while (i < G && c[i] >= i) {
            c[i] = 0;
            i++;
        }
        if (i >= G)
            break;
        uint32_t j = (i % 2) ? c[i] : 0;
        uint32_t t = perm[j];
        perm[j] = perm[i];
        perm[i] = t;
        c[i]++;
    }
    return best;
}

static void sorted_block(const int32_t *row, uint32_t S, int32_t *out) {
    memcpy(out, row, S * sizeof *out);
    for (uint32_t i = 1; i < S; i++)
        for (uint32_t j = i; j > 0 && out[j - 1] > out[j]; j--) {
            int32_t t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
        }
}

Test(reassign, optimal_on_small_shapes) {
    uint64_t st = 99;
    for (int iter = 0; iter < 400; iter++) {
        static const uint32_t shapes[][2] = {{2, 1}, {3, 1}, {4, 1}, {5, 1}, {6, 1},
                                             {4, 2}, {6, 2}, {6, 3}, {8, 2}, {8, 4}};
        uint32_t k = rng_below(&st, 10);
        uint32_t G = shapes[k][0], n = shapes[k][1];
        uint32_t S = 1 + rng_below(&st, 8 / (G > 4 ? 2 : 1));
        uint32_t P = G * S, N = 1 + rng_below(&st, P);
        int32_t old_row[64], new_row[64], orig[64];
        for (uint32_t s = 0; s < P; s++) {
            old_row[s] = rng_below(&st, 8) == 0 ? -1 : (int32_t)rng_below(&st, N);
            new_row[s] = rng_below(&st, 8) == 0 ? -1 : (int32_t)rng_below(&st, N);
        }
        memcpy(orig, new_row, sizeof orig);
        uint64_t before = eplb_plan_overlap(P, G, old_row, new_row);
        eplb_plan_reassign_gpus(1, P, G, n, old_row, new_row);
        uint64_t after = eplb_plan_overlap(P, G, old_row, new_row);
        cr_assert_geq(after, before);
        if (G <= 8)
            cr_assert_eq(after, brute_best(P, G, n, old_row, orig), "G=%u n=%u S=%u", G, n, S);
        if (after == before) /* identity wins ties */
            cr_assert_arr_eq(new_row, orig, P * sizeof *orig);
        /* A permutation of whole GPU blocks that respects nodes. */
        uint32_t m = G / n;
        bool used[8] = {false};
        for (uint32_t g = 0; g < G; g++) {
            int32_t a[16], b[16];
            sorted_block(new_row + g * S, S, a);
            bool found = false;
            for (uint32_t h = 0; h < G && !found; h++) {
                sorted_block(orig + h * S, S, b);
                if (!used[h] && memcmp(a, b, S * sizeof *a) == 0 &&
                    memcmp(new_row + g * S, orig + h * S, S * sizeof *a) == 0) {
                    /* blocks move whole: same order inside */
                    used[h] = true;
                    found = true;
                }
            }
            cr_assert(found, "GPU %u's block is not one of the policy's blocks", g);
        }
        (void)m;
    }
}

Test(reassign, keeps_balancedness_never_lowers_overlap) {
    /* DeepSeek-V3 shape, hierarchical: 4 nodes x 8 GPUs; and 1 node x 32. */
    const uint32_t L = 4, N = 256, P = 288, G = 32;
    static const uint32_t node_counts[] = {4, 1};
    uint64_t st = 2024;
    int64_t *load = malloc(L * N * sizeof *load);
    int32_t *old_map = malloc(L * P * sizeof *old_map);
    int32_t *new_map = malloc(L * P * sizeof *new_map);
    int32_t *logcnt = malloc(L * N * sizeof *logcnt);
    int32_t *logcnt_old = malloc(L * N * sizeof *logcnt_old);
    for (int c = 0; c < 2; c++) {
        eplb_policy_shape sh = {L, N, P, 8, node_counts[c], G};
        for (int round = 0; round < 5; round++) {
            for (uint32_t i = 0; i < L * N; i++)
                load[i] = (int64_t)(rng_next(&st) % 100000) * (int64_t)(1 + (i % 7 == 0) * 20);
            cr_assert_eq(eplb_policy_rebalance(&sh, load, old_map, logcnt_old, NULL), EPLB_OK);
            for (uint32_t i = 0; i < L * N; i++)
                load[i] += (int64_t)(rng_next(&st) % 30000);
            cr_assert_eq(eplb_policy_rebalance(&sh, load, new_map, logcnt, NULL), EPLB_OK);
            double lb[4], la[4];
            double before = eplb_policy_balancedness(L, N, P, G, load, new_map, logcnt, lb);
            uint64_t ov_before[4];
            for (uint32_t l = 0; l < L; l++)
                ov_before[l] = eplb_plan_overlap(P, G, old_map + l * P, new_map + l * P);
            eplb_plan_reassign_gpus(L, P, G, node_counts[c], old_map, new_map);
            double after = eplb_policy_balancedness(L, N, P, G, load, new_map, logcnt, la);
            cr_assert(fabs(before - after) <= 1e-12 * before, "%.17g vs %.17g", before, after);
            for (uint32_t l = 0; l < L; l++) {
                cr_assert(fabs(lb[l] - la[l]) <= 1e-12 * lb[l]);
                cr_assert_geq(eplb_plan_overlap(P, G, old_map + l * P, new_map + l * P),
                              ov_before[l]);
            }
            /* ...and the plan after preservation is valid and executes. */
            eplb_policy_preserve_slots(L, P, G, old_map, new_map);
            for (uint32_t l = 0; l < L; l++) {
                eplb_plan p;
                build_ok(P, G, 8, old_map + l * P, new_map + l * P, &p);
                check_plan(&p, old_map + l * P, new_map + l * P, 8);
                eplb_plan_free(&p);
            }
        }
    }
    free(load);
    free(old_map);
    free(new_map);
    free(logcnt);
    free(logcnt_old);
}
