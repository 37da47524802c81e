/* test_plan_chunk.c -- a layer's move cut to fit a staging bound: chunks
 * start at the old row and end at the new one, each chunk's plan fits, and
 * running the chunks' plans one after another on a simulated layer (slot ->
 * expert id) gives every written slot its new expert. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_plan.h"
#include "eplb_plan_chunk.h"

/* Execute plan on bytes[] (each slot's content: an expert id). */
static void run_plan(const eplb_plan *p, int32_t *bytes) {
    int32_t *staging = calloc(p->num_staging + 1, sizeof *staging);
    for (uint32_t i = 0; i < p->num_gather; i++)
        staging[p->gather[i].dst] = bytes[p->gather[i].src];
    for (uint32_t i = 0; i < p->num_scatter; i++) {
        const eplb_plan_op *op = &p->scatter[i];
        bytes[op->dst] = op->kind == EPLB_OP_UNSTAGE ? staging[op->src] : bytes[op->src];
    }
    free(staging);
}

static void check_chunks(uint32_t P, uint32_t G, const int32_t *old_row, const int32_t *new_row, uint32_t bound,
                         uint32_t *chunks_out) {
    eplb_plan_chunks c;
    eplb_error err;
    cr_assert_eq(eplb_plan_chunk(P, G, G, old_row, new_row, 0, G, bound, &c, &err), EPLB_OK, "%s", err.msg);
    cr_assert_geq(c.num_chunks, 1);
    cr_assert_arr_eq(c.rows, old_row, P * sizeof *old_row);
    cr_assert_arr_eq(c.rows + (size_t)c.num_chunks * P, new_row, P * sizeof *new_row);
    int32_t *bytes = malloc(P * sizeof *bytes);
    memcpy(bytes, old_row, P * sizeof *bytes);
    for (uint32_t k = 0; k < c.num_chunks; k++) {
        eplb_plan p;
        cr_assert_eq(eplb_plan_build(P, G, G, c.rows + (size_t)k * P, c.rows + (size_t)(k + 1) * P, 0, G, &p, &err),
                     EPLB_OK, "chunk %u: %s", k, err.msg);
        if (bound)
            cr_assert_leq(p.max_staging_per_gpu, bound, "chunk %u stages %u", k, p.max_staging_per_gpu);
        run_plan(&p, bytes);
        eplb_plan_free(&p);
        /* What the next chunk starts from is what the bytes hold. */
        for (uint32_t s = 0; s < P; s++)
            if (c.rows[(size_t)(k + 1) * P + s] >= 0)
                cr_assert_eq(bytes[s], c.rows[(size_t)(k + 1) * P + s], "chunk %u slot %u", k, s);
    }
    for (uint32_t s = 0; s < P; s++)
        if (new_row[s] >= 0)
            cr_assert_eq(bytes[s], new_row[s], "slot %u holds %d, want %d", s, bytes[s], new_row[s]);
    free(bytes);
    if (chunks_out)
        *chunks_out = c.num_chunks;
    eplb_plan_chunks_free(&c);
}

Test(plan_chunk, no_bound_or_a_fitting_move_is_one_chunk) {
    const int32_t old_row[6] = { 0, 1, 2, 3, 0, 1 }, new_row[6] = { 0, 2, 0, 1, 0, 3 };
    uint32_t n;
    check_chunks(6, 2, old_row, new_row, 0, &n);
    cr_assert_eq(n, 1);
    check_chunks(6, 2, old_row, new_row, 8, &n);
    cr_assert_eq(n, 1);
}

Test(plan_chunk, swaps_are_cut_into_chunks_that_fit) {
    /* One GPU of 8 slots: four disjoint swaps (each needs 2 staging entries
     * with unique experts).  Bound 2: one swap per chunk. */
    const int32_t old_row[8] = { 0, 1, 2, 3, 4, 5, 6, 7 }, new_row[8] = { 1, 0, 3, 2, 5, 4, 7, 6 };
    uint32_t n;
    check_chunks(8, 1, old_row, new_row, 2, &n);
    cr_assert_eq(n, 4);
    check_chunks(8, 1, old_row, new_row, 4, &n);
    cr_assert_eq(n, 2);
}

Test(plan_chunk, a_group_larger_than_the_bound_is_refused) {
    /* A 3-cycle of unique experts on one GPU must move at once. */
    const int32_t old_row[3] = { 0, 1, 2 }, new_row[3] = { 1, 2, 0 };
    eplb_plan_chunks c;
    eplb_error err;
    cr_assert_eq(eplb_plan_chunk(3, 1, 1, old_row, new_row, 0, 1, 2, &c, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "needs 3 staging entries") && strstr(err.msg, "allows 2"), "%s", err.msg);
    cr_assert_null(c.rows);
    check_chunks(3, 1, old_row, new_row, 3, NULL);
}

/* Random valid rows: every expert of [0, N) at least once, the rest random. */
static void random_row(uint32_t P, uint32_t N, int32_t *row, unsigned *seed) {
    for (uint32_t s = 0; s < P; s++)
        row[s] = s < N ? (int32_t)s : (int32_t)(rand_r(seed) % N);
    for (uint32_t s = P - 1; s > 0; s--) {
        uint32_t j = (uint32_t)rand_r(seed) % (s + 1);
        int32_t t = row[s];
        row[s] = row[j];
        row[j] = t;
    }
}

Test(plan_chunk, random_moves_under_every_small_bound) {
    unsigned seed = 12345;
    const uint32_t P = 48, G = 4, N = 32;
    int32_t old_row[48], new_row[48];
    uint32_t multi = 0, refused = 0;
    for (int trial = 0; trial < 60; trial++) {
        random_row(P, N, old_row, &seed);
        random_row(P, N, new_row, &seed);
        for (uint32_t bound = 0; bound <= 6; bound++) {
            eplb_plan_chunks c;
            eplb_error err;
            eplb_status st = eplb_plan_chunk(P, G, G, old_row, new_row, 0, G, bound, &c, &err);
            if (st == EPLB_EPRECONDITION) {
                cr_assert(bound > 0 && strstr(err.msg, "staging bound"), "%s", err.msg);
                refused++;
                continue;
            }
            cr_assert_eq(st, EPLB_OK, "%s", err.msg);
            multi += c.num_chunks > 1;
            eplb_plan_chunks_free(&c);
            check_chunks(P, G, old_row, new_row, bound, NULL);
        }
    }
    /* The bounds bite: many moves were cut, a few refused. */
    cr_assert_gt(multi, 60, "only %u moves were cut", multi);
    cr_log_info("%u cut, %u refused", multi, refused);
}
