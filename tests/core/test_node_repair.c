/* test_node_repair.c -- the node repair (eplb_node_repair.c) and its place
 * in the fallback of POLICY_INCREMENTAL (eplb_next.c).  Golden cases small
 * enough to check by hand; the random hierarchical properties of
 * test_incremental.c run through the repair too (about 90 of 2,000 cases
 * take it). */
#include <criterion/criterion.h>
#include <string.h>

#include "eplb_next.h"
#include "eplb_node_repair.h"
#include "eplb_policy.h"

/* 4 groups of 2 experts, 2 nodes x 2 GPUs x 2 slots (no redundant slot).
 * Node 0 holds g0 {0, 1} and g1 {2, 3}; node 1 holds g2 {4, 5} and g3
 * {6, 7}: GPU0 {0, 2}, GPU1 {1, 3}, GPU2 {4, 6}, GPU3 {5, 7}. */
static const eplb_policy_shape four_groups = { .num_layers = 1, .num_logical = 8, .num_physical = 8,
                                               .num_groups = 4, .num_nodes = 2, .num_gpus = 4 };
static const int32_t four_groups_row[8] = { 0, 2, 1, 3, 4, 6, 5, 7 };

/* Loads 40 40 | 10 10 | 10 10 | 5 5: groups 80, 20, 20, 10, nodes 100 and
 * 30 (GPUs 50, 50, 15, 15).  Swaps: g0-g2 gives nodes 40 / 90, g0-g3
 * 30 / 100, g1-g2 100 / 30, g1-g3 90 / 40.  Two tie at 90: the lower A
 * (g0) wins.  g2 takes g0's slots 0 and 2 (one each, no slot left over):
 * e4 to GPU0 (GPU0 and GPU1 both carry 10 without the freed slots; the
 * lower GPU), e5 to GPU1, so 20 / 20.  g0 takes g2's slots 4 and 6: e0 to
 * GPU2, e1 to GPU3, 45 / 45.  The max is 45, the target: INCREMENTAL has
 * nothing left to do. */
Test(node_repair, golden_swaps_the_best_pair) {
    const int64_t load[8] = { 40, 40, 10, 10, 10, 10, 5, 5 };
    eplb_node_repair_params p = { .shape = four_groups, .load = load, .row = four_groups_row, .floor = 45,
                                  .target_max = 45, .cost_intra_node = 1, .cost_cross_node = 4 };
    int32_t row[8], cnt[8];
    bool repaired;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_OK, "%s", err.msg);
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
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_OK, "%s", err.msg);
    cr_assert(repaired);
    const int32_t want[12] = { 5, 4, 4, 2, 3, 3, 0, 0, 1, 6, 7, 7 };
    cr_assert_arr_eq(row, want, sizeof want);
    const int32_t want_cnt[8] = { 2, 1, 1, 2, 2, 1, 1, 2 };
    cr_assert_arr_eq(cnt, want_cnt, sizeof want_cnt);
}

/* Nodes already even (every expert 10): nothing to repair. */
Test(node_repair, none_when_the_nodes_are_even) {
    const int64_t load[8] = { 10, 10, 10, 10, 10, 10, 10, 10 };
    eplb_node_repair_params p = { .shape = four_groups, .load = load, .row = four_groups_row, .floor = 20,
                                  .target_max = 20, .cost_intra_node = 1, .cost_cross_node = 4 };
    int32_t row[8], cnt[8];
    bool repaired = true;
    eplb_error err;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_OK, "%s", err.msg);
    cr_assert_not(repaired);
}

Test(node_repair, refuses_what_it_cannot_repair) {
    const int64_t load[8] = { 40, 40, 10, 10, 10, 10, 5, 5 };
    eplb_node_repair_params p = { .shape = four_groups, .load = load, .row = four_groups_row, .floor = 45,
                                  .target_max = 45, .cost_intra_node = 1, .cost_cross_node = 4 };
    int32_t row[8], cnt[8];
    bool repaired;
    eplb_error err;
    p.shape.num_groups = 1; /* the global path: no groups to move */
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "num_groups"), "%s", err.msg);
    p.shape.num_groups = 4;
    p.shape.num_nodes = 1;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_EINVAL);
    p.shape.num_nodes = 2;
    const int32_t bad[8] = { 0, 2, 1, 3, 4, 6, 5, 9 };
    p.row = bad;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "slot 7 holds 9"), "%s", err.msg);
    const int32_t lost[8] = { 0, 2, 1, 3, 4, 6, 5, 5 }; /* expert 7 has no replica */
    p.row = lost;
    cr_assert_eq(eplb_node_repair(&p, row, cnt, &repaired, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "no replica"), "%s", err.msg);
}

/* Through eplb_next: a layer whose nodes keep it from the target takes the
 * repair when it copies less than the from-scratch row for the same
 * balance.  GPU0 {7, 6, 5}, GPU1 {4, 6, 6} (node 0: g2 {4, 5}, g3 {6, 7}),
 * GPU2 {2, 1, 0}, GPU3 {2, 3, 3} (node 1: g0, g1).  Loads 13 42 33 9 16
 * 46 37 40: groups 55, 42, 62, 77, nodes 139 and 97 (mean 59 per GPU).
 * No change inside the nodes gets node 0's GPUs under 69.5.  Swapping g0
 * and g3 gives nodes 117 and 119 (g0-g2 gives 132, g1-g2 and g1-g3 119 or
 * more), and the layer reaches DeepSeek's 60.5 (balancedness 59 / 60.5).
 * The repair copies 5 experts (all of them across nodes: e0 and e1 to
 * node 0; e6 twice and e7 to node 1); the from-scratch row needs more. */
Test(node_repair, fallback_takes_the_cheaper_row) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 8, .num_physical = 12, .num_groups = 4,
                                  .num_nodes = 2, .num_gpus = 4 };
    int32_t cur[12] = { 7, 6, 5, 4, 6, 6, 2, 1, 0, 2, 3, 3 }, cnt[8] = { 0 };
    for (int i = 0; i < 12; i++)
        cnt[cur[i]]++;
    const int64_t load[8] = { 13, 42, 33, 9, 16, 46, 37, 40 };
    eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    req.knobs.target_balancedness = 1.0;
    int32_t out[12], ocnt[8];
    eplb_next_report rep;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(rep.layers_node_repaired, 1);
    cr_assert_eq(rep.layers_from_scratch, 0);
    cr_assert_float_eq(rep.balancedness_after, 59.0 / 60.5, 1e-12);
    cr_assert_float_eq(rep.balancedness_reference, 59.0 / 60.5, 1e-12);
    cr_assert_eq(rep.copies_cross_gpu, 5);
    cr_assert_eq(rep.copies_cross_node, 5);
    /* Every group on one node: g2 and g0 on node 0, g3 and g1 on node 1. */
    for (int i = 0; i < 12; i++) {
        const int group = out[i] / 2, node = i / 6;
        cr_assert_eq(node, group == 0 || group == 2 ? 0 : 1, "slot %d holds %d", i, out[i]);
    }
    cr_assert(strstr(rep.reason, "group"), "%s", rep.reason);
}
