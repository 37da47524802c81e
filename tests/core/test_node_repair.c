/* test_node_repair.c -- the node repair (eplb_node_repair.c) and its place
 * in the fallback of POLICY_INCREMENTAL (eplb_next.c).  Golden cases small
 * enough to check by hand; the random hierarchical properties of
 * test_incremental.c run through the repair too (about 90 of 2,000 cases
 * take it). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_incremental.h"
#include "eplb_next.h"
#include "eplb_node_repair.h"
#include "eplb_policy.h"

/* 4 groups of 2 experts, 2 nodes x 2 GPUs x 2 slots (no redundant slot).
 * Node 0 holds g0 {0, 1} and g1 {2, 3}; node 1 holds g2 {4, 5} and g3
 * {6, 7}: GPU0 {0, 2}, GPU1 {1, 3}, GPU2 {4, 6}, GPU3 {5, 7}. */
static const eplb_policy_shape four_groups = { .num_layers = 1, .num_logical = 8, .num_physical = 8,
                                               .num_groups = 4, .num_nodes = 2, .num_gpus = 4 };
static const int32_t four_groups_row[8] = { 0, 2, 1, 3, 4, 6, 5, 7 };
/* Groups 80, 20, 20, 10 on it: node 0 carries 100, node 1 30. */
static const int64_t four_groups_skewed[8] = { 40, 40, 10, 10, 10, 10, 5, 5 };

/* A repair of the four-group layer aiming at `floor`. */
static eplb_node_repair_params four_groups_repair(const int64_t *load, double floor) {
    return (eplb_node_repair_params){ .shape = four_groups, .load = load, .row = four_groups_row, .floor = floor,
                                      .target_max = floor, .cost_intra_node = 1, .cost_cross_node = 4 };
}

/* Loads 40 40 | 10 10 | 10 10 | 5 5: groups 80, 20, 20, 10, nodes 100 and
 * 30 (GPUs 50, 50, 15, 15).  Swaps: g0-g2 gives nodes 40 / 90, g0-g3
 * 30 / 100, g1-g2 100 / 30, g1-g3 90 / 40.  Two tie at 90: the lower A
 * (g0) wins.  g2 takes g0's slots 0 and 2 (one each, no slot left over):
 * e4 to GPU0 (GPU0 and GPU1 both carry 10 without the freed slots; the
 * lower GPU), e5 to GPU1, so 20 / 20.  g0 takes g2's slots 4 and 6: e0 to
 * GPU2, e1 to GPU3, 45 / 45.  The max is 45, the target: INCREMENTAL has
 * nothing left to do. */
Test(node_repair, golden_swaps_the_best_pair) {
    const eplb_node_repair_params p = four_groups_repair(four_groups_skewed, 45);
    int32_t row[8], cnt[8];
    bool repaired;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_OK, "%s", err.msg);
    cr_assert(repaired);
    const int32_t want[8] = { 4, 2, 5, 3, 0, 6, 1, 7 };
    cr_assert_arr_eq(row, want, sizeof want);
    for (int e = 0; e < 8; e++)
        cr_assert_eq(cnt[e], 1);
}

/* Step 3's counts and step 4's order.  2 nodes x 1 GPU x 6 slots: node 0
 * holds g0 (0, 1, 1) and g1 (2, 3, 3), node 1 holds g2 (4, 5, 5) and g3
 * (6, 7, 7).  Loads e0 90, e1 30, then 2 2 3 3 1 1: groups 120, 4, 6, 2,
 * nodes 124 and 8.  g0-g2 gives 10 / 122, g1-g3 122 / 10 (a tie: g0 is
 * the lower A), g0-g3 6 / 126, g1-g2 126 / 2.
 *   g0 moves into g2's three slots (6, 7, 8): one replica each, and the
 *   third to the heavier replica, e0 (90 against 30).  Heaviest first:
 *   e0 (45), e0 (45), e1 (30).
 *   g2 moves into g0's slots (0, 1, 2): e4 and e5 tie at 3, so the lower,
 *   e4, gets the third; heaviest first: e5 (3), e4 (1.5), e4 (1.5).
 * With one GPU per node nothing inside a node changes a GPU's load, so
 * INCREMENTAL leaves it: max 122, down from 124. */
Test(node_repair, golden_counts_follow_the_load) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 8, .num_physical = 12, .num_groups = 4,
                                  .num_nodes = 2, .num_gpus = 2 };
    const int32_t cur[12] = { 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7 };
    const int64_t load[8] = { 90, 30, 2, 2, 3, 3, 1, 1 };
    eplb_node_repair_params p = { .shape = s, .load = load, .row = cur, .floor = 66, .target_max = 66,
                                  .cost_intra_node = 1, .cost_cross_node = 4 };
    int32_t row[12], cnt[8];
    bool repaired;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_OK, "%s", err.msg);
    cr_assert(repaired);
    const int32_t want[12] = { 5, 4, 4, 2, 3, 3, 0, 0, 1, 6, 7, 7 };
    cr_assert_arr_eq(row, want, sizeof want);
    const int32_t want_cnt[8] = { 2, 1, 1, 2, 2, 1, 1, 2 };
    cr_assert_arr_eq(cnt, want_cnt, sizeof want_cnt);
}

/* Nodes already even (every expert 10): nothing to repair. */
Test(node_repair, none_when_the_nodes_are_even) {
    const int64_t load[8] = { 10, 10, 10, 10, 10, 10, 10, 10 };
    const eplb_node_repair_params p = four_groups_repair(load, 20);
    int32_t row[8], cnt[8];
    bool repaired = true;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_OK, "%s", err.msg);
    cr_assert_not(repaired);
}

Test(node_repair, refuses_what_it_cannot_repair) {
    eplb_node_repair_params p = four_groups_repair(four_groups_skewed, 45);
    int32_t row[8], cnt[8];
    bool repaired;
    eplb_error err;
    p.shape.num_groups = 1; /* the global path: no groups to move */
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "num_groups"), "%s", err.msg);
    p.shape.num_groups = 4;
    p.shape.num_nodes = 1;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_EINVAL);
    p.shape.num_nodes = 2;
    const int32_t bad[8] = { 0, 2, 1, 3, 4, 6, 5, 9 };
    p.row = bad;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "slot 7 holds 9"), "%s", err.msg);
    const int32_t lost[8] = { 0, 2, 1, 3, 4, 6, 5, 5 }; /* expert 7 has no replica */
    p.row = lost;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, NULL, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "no replica"), "%s", err.msg);
}

/* Through eplb_next: a layer whose nodes keep it from the target takes the
 * repair when it gains more per copy than the from-scratch row.
 * GPU0 {3, 2, 5}, GPU1 {3, 4, 4} (node 0: g1 {2, 3}, g2 {4, 5}); GPU2
 * {0, 6, 1}, GPU3 {0, 7, 7} (node 1: g0, g3).  Loads 25 20 24 6 50 8 25
 * 38: groups 45, 30, 58, 63; nodes 88 and 108; GPUs 35, 53, 57.5, 50.5
 * (mean 49).  No change inside the nodes gets node 1's GPUs under 54.
 *   The pair: node 1 is the heavier.  g0-g1 gives 93 / 103, g3-g2 103 /
 *   93 (a tie: g0 is the lower A), g0-g2 and g3-g1 121.
 *   g1 into g0's slots 6, 8, 9: e2 (24) takes the third (against e3's 6);
 *   12, 12, 6 onto GPU2 (25 without the freed slots), GPU2 (37 < 38),
 *   GPU3: {2, 6, 2} 49, {3, 7, 7} 44.
 *   g0 into g1's slots 0, 1, 3: e0 (25) takes the third; 20, 12.5, 12.5
 *   onto GPU0 (8), GPU0 (28 < 50), GPU1: {1, 0, 5} 40.5, {0, 4, 4} 62.5.
 *   INCREMENTAL then gives slot 3's e0 to e4 (one slot, e4 is on GPU1
 *   already): GPU0 53, GPU1 50.  Max 53: balancedness 49 / 53, above the
 *   from-scratch 0.9187.
 * Copies: e1 and e0 to GPU0, e2 to GPU2, e3 to GPU3, all across nodes: 4. */
Test(node_repair, fallback_takes_the_cheaper_row) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 8, .num_physical = 12, .num_groups = 4,
                                  .num_nodes = 2, .num_gpus = 4 };
    int32_t cur[12] = { 3, 2, 5, 3, 4, 4, 0, 6, 1, 0, 7, 7 }, cnt[8] = { 0 };
    for (int i = 0; i < 12; i++)
        cnt[cur[i]]++;
    const int64_t load[8] = { 25, 20, 24, 6, 50, 8, 25, 38 };
    eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    req.knobs.target_balancedness = 1.0;
    int32_t out[12], ocnt[8];
    eplb_next_report rep;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(rep.layers_node_repaired, 1);
    cr_assert_eq(rep.layers_from_scratch, 0);
    const int32_t want[12] = { 1, 0, 5, 4, 4, 4, 2, 6, 2, 3, 7, 7 };
    cr_assert_arr_eq(out, want, sizeof want);
    cr_assert_float_eq(rep.balancedness_after, 49.0 / 53.0, 1e-12);
    cr_assert_gt(rep.balancedness_after, rep.balancedness_reference);
    cr_assert_eq(rep.copies_cross_gpu, 4);
    cr_assert_eq(rep.copies_cross_node, 4);
    cr_assert(strstr(rep.reason, "group"), "%s", rep.reason);
}

/* A hostile shape on the hierarchical path: every layer short of an
 * unreachable target, so every layer is offered a repair.  The search and
 * all the repairs share one compute bound (EPLB_INCREMENTAL_MAX_WORK), so
 * the call ends in about the time one search may take; the answer is
 * still a valid placement with every group on one node. */
Test(node_repair, repairs_share_the_compute_bound, .timeout = 120) {
    const uint32_t L = 48, N = 2048, P = 4096, G = 16, nodes = 2, groups = 16, per = N / groups, S = P / G;
    const eplb_policy_shape s = { .num_layers = L, .num_logical = N, .num_physical = P, .num_groups = groups,
                                  .num_nodes = nodes, .num_gpus = G };
    int64_t *l0 = malloc((size_t)L * N * sizeof *l0), *load = malloc((size_t)L * N * sizeof *load);
    int32_t *cur = malloc((size_t)L * P * sizeof *cur), *cnt = malloc((size_t)L * N * sizeof *cnt);
    int32_t *out = malloc((size_t)L * P * sizeof *out), *ocnt = malloc((size_t)L * N * sizeof *ocnt);
    uint64_t r = 12345;
    for (size_t i = 0; i < (size_t)L * N; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        l0[i] = (int64_t)(1 + (r >> 33) % 1000);
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        load[i] = (int64_t)(1 + ((r >> 33) % 1000) * ((r >> 20) % 7 == 0 ? 40 : 1));
    }
    cr_assert_eq(eplb_policy_rebalance(&s, l0, cur, cnt, NULL), EPLB_OK);
    eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    req.knobs.target_balancedness = 1.0;
    eplb_next_report rep;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert_geq(rep.balancedness_after, rep.balancedness_before - 1e-9);
    /* One bound for the search and the repairs: each may pass it by its
     * last step only (one search of a layer, well under 1% of it). */
    cr_assert_leq(rep.work, EPLB_INCREMENTAL_MAX_WORK + EPLB_INCREMENTAL_MAX_WORK / 100, "work %llu",
                  (unsigned long long)rep.work);
    for (uint32_t l = 0; l < L; l++) {
        int32_t node_of_group[16];
        for (uint32_t x = 0; x < groups; x++)
            node_of_group[x] = -1;
        for (uint32_t i = 0; i < P; i++) {
            const int32_t e = out[(size_t)l * P + i];
            cr_assert(e >= 0 && (uint32_t)e < N);
            const uint32_t x = (uint32_t)e / per, nd = i / S / (G / nodes);
            if (node_of_group[x] < 0)
                node_of_group[x] = (int32_t)nd;
            cr_assert_eq(node_of_group[x], (int32_t)nd, "layer %u: group %u on two nodes", l, x);
        }
    }
    free(l0);
    free(load);
    free(cur);
    free(cnt);
    free(out);
    free(ocnt);
}

/* More pairs than EPLB_NODE_REPAIR_MAX_PAIRS: no repair, at once.  2,048
 * groups of one expert on 2 nodes x 1 GPU: 1,024 x 2,048 pairs. */
Test(node_repair, gives_up_past_the_pair_bound, .timeout = 10) {
    const uint32_t N = 2048;
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = N, .num_physical = N, .num_groups = N,
                                  .num_nodes = 2, .num_gpus = 2 };
    int64_t *load = malloc(N * sizeof *load);
    int32_t *cur = malloc(N * sizeof *cur), *row = malloc(N * sizeof *row), *cnt = malloc(N * sizeof *cnt);
    for (uint32_t e = 0; e < N; e++) {
        cur[e] = (int32_t)e;
        load[e] = e < N / 2 ? 100 : 1; /* node 0 carries nearly everything */
    }
    eplb_node_repair_params p = { .shape = s, .load = load, .row = cur, .floor = 1, .target_max = 1,
                                  .cost_intra_node = 1, .cost_cross_node = 4 };
    bool repaired = true;
    uint64_t work = 1;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &work, &err), EPLB_OK, "%s", err.msg);
    cr_assert_not(repaired);
    cr_assert_eq(work, 0);
    free(load);
    free(cur);
    free(row);
    free(cnt);
}
