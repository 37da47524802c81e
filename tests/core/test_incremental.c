/* test_incremental.c -- POLICY_INCREMENTAL (eplb_incremental.c) and the
 * choice of the next placement around it (eplb_next.c).
 *
 * Golden cases small enough to check by hand, then properties over
 * thousands of random shapes, loads and current placements: the
 * invariants of a placement, never worse than the current placement (per
 * layer), the budgets, the target when no budget binds, determinism, and
 * on the hierarchical path no group spreading to another node. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_incremental.h"
#include "eplb_next.h"
#include "eplb_plan.h"
#include "eplb_policy.h"
#include "two_threads_case.h"

static uint64_t rng_state;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint32_t rnd_below(uint32_t n) { return (uint32_t)(rnd() % n); }

static void counts(uint32_t L, uint32_t N, uint32_t P, const int32_t *row, int32_t *cnt) {
    memset(cnt, 0, (size_t)L * N * sizeof *cnt);
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t i = 0; i < P; i++)
            cnt[(size_t)l * N + row[(size_t)l * P + i]]++;
}

/* One layer, 3 experts in 4 slots on 2 GPUs of one node, default link
 * costs and no target: the search runs until no change lowers the max.
 * Fills cnt from row, rebalances both in place. */
static eplb_incremental_stats small_layer(int32_t row[4], int32_t cnt[3], const int64_t load[3]) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 3, .num_physical = 4, .num_groups = 1,
                                  .num_nodes = 1, .num_gpus = 2 };
    counts(1, 3, 4, row, cnt);
    const eplb_incremental_params p = { .shape = s, .logical_load = load, .total_target = -1, .cost_intra_node = 1,
                                        .cost_cross_node = 4 };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    return st;
}

/* Hand-checked: GPU0 holds {0, 1}, GPU1 {2, 0}; loads 10, 80, 10, so with
 * expert 0 replicated GPU0 carries 5 + 80 = 85 and GPU1 10 + 5 = 15.  No
 * swap helps (80 and 10 swapped gives 15 / 85).  Re-replication does: the
 * second replica of 0 (slot 3) becomes a replica of 1: both GPUs carry
 * 10 + 40 = 50.  One copy of expert 1 crosses GPUs, one slot changes. */
Test(incremental, golden_rereplication) {
    int32_t row[4] = { 0, 1, 2, 0 }, cnt[3];
    const int64_t load[3] = { 10, 80, 10 };
    const eplb_incremental_stats st = small_layer(row, cnt, load);
    const int32_t want[4] = { 0, 1, 2, 1 };
    cr_assert_arr_eq(row, want, sizeof want);
    cr_assert_eq(cnt[0], 1);
    cr_assert_eq(cnt[1], 2);
    cr_assert_eq(cnt[2], 1);
    cr_assert_eq(st.changes, 1);
    cr_assert_eq(st.copies, 1);
    double bal = eplb_policy_balancedness(1, 3, 4, 2, load, row, cnt, NULL);
    cr_assert_float_eq(bal, 1.0, 1e-12);
}

/* Hand-checked swap: GPU0 {0, 1} loads 60 + 30, GPU1 {2, 3} loads 20 + 10.
 * Max 90, mean 60.  Swapping 1 (30) with 3 (10) gives 70 / 50; 0 (60) with
 * 2 (20) gives 50 / 70; 1 with 2 gives 80 / 40; 0 with 3 gives 40 / 80.
 * Both best swaps reach max 70 at the same cost: the lower slot wins (0
 * with 2).  Then no single change lowers 70 (every other swap or
 * replacement leaves a GPU at >= 70), so it stops. */
Test(incremental, golden_swap_and_stop) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 4, .num_physical = 4, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    int32_t row[4] = { 0, 1, 2, 3 }, cnt[4];
    counts(1, 4, 4, row, cnt);
    const int64_t load[4] = { 60, 30, 20, 10 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4 };
    eplb_incremental_stats st;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, NULL), EPLB_OK);
    const int32_t want[4] = { 2, 1, 0, 3 };
    cr_assert_arr_eq(row, want, sizeof want);
    cr_assert_eq(st.changes, 1);
    cr_assert_eq(st.copies, 2);
}

/* Splitting a heavy replica (reference_cnt), hand-checked.  GPU0 {0, 3, 3},
 * GPU1 {1, 2, 3}; loads 40, 25, 25, 30 (expert 3's three replicas carry
 * 10 each): both GPUs at 60, the mean, so no change lowers the max.  The
 * reference counts {2, 1, 1, 2} give replicas of at most 25: the bound is
 * 1.3 x 25 = 32.5, and expert 0 (40 on one replica) is above it.  Expert 3
 * can give a slot (its two left carry 15).  Slot 1 or 2 -> 0: GPU0 20 + 20
 * + 15 = 55, GPU1 25 + 25 + 15 = 65; slot 5 -> 0: GPU0 20 + 15 + 15 = 50,
 * GPU1 70.  Slot 1 wins (lightest worst GPU, then free: GPU0 holds 0, then
 * lower slot).  The max rose to 65; the search then swaps 1 (25, slot 3)
 * with 0 (20, slot 0): 60 / 60 again, two copies. */
Test(incremental, golden_split_heavy_replica) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 4, .num_physical = 6, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    int32_t row[6] = { 0, 3, 3, 1, 2, 3 }, cnt[4];
    counts(1, 4, 6, row, cnt);
    const int64_t load[4] = { 40, 25, 25, 30 };
    const int32_t ref_cnt[4] = { 2, 1, 1, 2 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4,
                                  .total_target = -1, .reference_cnt = ref_cnt };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    const int32_t want[6] = { 1, 0, 3, 0, 2, 3 };
    cr_assert_arr_eq(row, want, sizeof want);
    const int32_t want_cnt[4] = { 2, 1, 1, 2 };
    cr_assert_arr_eq(cnt, want_cnt, sizeof want_cnt);
    cr_assert_eq(st.splits, 1);
    cr_assert_eq(st.changes, 2);
    cr_assert_eq(st.copies, 2);
    cr_assert_eq(st.reverted, 0);
    cr_assert_float_eq(eplb_policy_balancedness(1, 4, 6, 2, load, row, cnt, NULL), 1.0, 1e-12);

    /* Without the reference counts nothing lowers the max: untouched. */
    int32_t row2[6] = { 0, 3, 3, 1, 2, 3 };
    counts(1, 4, 6, row2, cnt);
    p.reference_cnt = NULL;
    cr_assert_eq(eplb_incremental_rebalance(&p, row2, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(st.changes, 0);

    /* A budget that pays for the split (its copy is free) but not for the
     * swap that brings the max back from 65 (two copies, one left): the
     * layer ends above its start and takes its row back. */
    int32_t row3[6] = { 0, 3, 3, 1, 2, 3 };
    counts(1, 4, 6, row3, cnt);
    p.reference_cnt = ref_cnt;
    p.copies_budget = true;
    p.max_copies = 1;
    cr_assert_eq(eplb_incremental_rebalance(&p, row3, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    const int32_t same[6] = { 0, 3, 3, 1, 2, 3 };
    cr_assert_arr_eq(row3, same, sizeof same);
    const int32_t same_cnt[4] = { 1, 1, 1, 3 };
    cr_assert_arr_eq(cnt, same_cnt, sizeof same_cnt);
    cr_assert_eq(st.reverted, 1);
    cr_assert_eq(st.splits, 0);
    cr_assert_eq(st.changes, 0);
    cr_assert_eq(st.copies, 0);
    cr_assert_float_eq(st.total_max, 60, 1e-9);
    p.copies_budget = false;

    /* Under a budget, a model already at its target: no change, not even
     * the split (without a budget the split runs: the item bound holds for
     * every answer). */
    int32_t row6[6] = { 0, 3, 3, 1, 2, 3 };
    counts(1, 4, 6, row6, cnt);
    p.total_target = 60;
    p.slots_budget = true;
    p.max_slots = 100;
    cr_assert_eq(eplb_incremental_rebalance(&p, row6, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    cr_assert_arr_eq(row6, same, sizeof same);
    cr_assert_eq(st.reverted, 0);
    cr_assert_eq(st.splits, 0);
    cr_assert_eq(st.slots_moved, 0);
    p.slots_budget = false;

    /* Under a slot budget the split is paid from it, with a quarter of it
     * at most.  4 slots: the split may take 1 (its copy is free), the swap
     * takes 2 more: the unbudgeted answer, 3 slots.  3 slots would pay for
     * the same, but a quarter of 3 is no slot: no split, and without it
     * nothing lowers the max. */
    p.total_target = -1;
    p.slots_budget = true;
    const struct { uint64_t max_slots; const int32_t *row; uint64_t splits, slots; } budgeted[] = {
        { 4, want, 1, 3 },
        { 3, same, 0, 0 },
    };
    for (size_t i = 0; i < sizeof budgeted / sizeof budgeted[0]; i++) {
        int32_t r[6] = { 0, 3, 3, 1, 2, 3 };
        counts(1, 4, 6, r, cnt);
        p.max_slots = budgeted[i].max_slots;
        cr_assert_eq(eplb_incremental_rebalance(&p, r, cnt, &st, &err), EPLB_OK, "%s", err.msg);
        cr_assert_arr_eq(r, budgeted[i].row, sizeof r, "max_slots %llu", (unsigned long long)budgeted[i].max_slots);
        cr_assert_eq(st.splits, budgeted[i].splits);
        cr_assert_eq(st.slots_moved, budgeted[i].slots);
    }
}

/* A split that costs a copy, under a byte budget, hand-checked.  GPU0
 * {0, 1, 2}, GPU1 {3, 3, 3}; loads 40, 10, 10, 30: GPU0 60, GPU1 30.
 * Reference counts {2, 1, 1, 2}: the bound is 1.3 x 20 = 26, and expert 0
 * (40) is above it.  The split gives slot 3 (expert 3, whose two left
 * carry 15) to 0, one copy: GPU0 20 + 10 + 10 = 40, GPU1 20 + 15 + 15 =
 * 50.  The search then swaps 3 (15, slot 4) with 1 (10, slot 1): 45 / 45,
 * two copies.  Budget 4: the split may spend 1, the search the 3 left.
 * Budget 1: a quarter is no copy, so no split; the search makes the same
 * re-replication itself (it relieves GPU0, the busiest) and has nothing
 * left for the swap. */
Test(incremental, golden_split_pays_from_the_byte_budget) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 4, .num_physical = 6, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    const int64_t load[4] = { 40, 10, 10, 30 };
    const int32_t ref_cnt[4] = { 2, 1, 1, 2 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4,
                                  .total_target = -1, .reference_cnt = ref_cnt, .copies_budget = true };
    const struct { uint64_t max_copies; int32_t row[6]; uint64_t splits, changes, copies; } cases[] = {
        { 4, { 0, 3, 2, 0, 1, 3 }, 1, 2, 3 },
        { 1, { 0, 1, 2, 0, 3, 3 }, 0, 1, 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t row[6] = { 0, 1, 2, 3, 3, 3 }, cnt[4];
        counts(1, 4, 6, row, cnt);
        p.max_copies = cases[i].max_copies;
        eplb_incremental_stats st;
        eplb_error err;
        cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_OK, "%s", err.msg);
        cr_assert_arr_eq(row, cases[i].row, sizeof row, "max_copies %llu", (unsigned long long)cases[i].max_copies);
        cr_assert_eq(st.splits, cases[i].splits, "max_copies %llu", (unsigned long long)cases[i].max_copies);
        cr_assert_eq(st.changes, cases[i].changes);
        cr_assert_eq(st.copies, cases[i].copies);
    }
}

/* The heap's key counts the GPUs a layer's max waits for (level_key),
 * hand-checked.  Two layers of 4 GPUs x 2 slots, one replica per expert
 * (no re-replication), floors 14 and 10 (targets 0.9 x: 12.6 and 9), and
 * the model's target 33.5 against 20 + 18 now.
 *   Layer 0: GPU0 {10, 10}, GPU1 {5, 5}, GPU2 {6, 4}, GPU3 {5, 5}.  The
 *   best change swaps a 10 with a 5 (slots 0 and 2, the lowest): 15 / 15,
 *   the layer's max 20 -> 15, gain 5 for 2 copies.
 *   Layer 1: GPU0 {9, 9}, GPU1 {9, 9}, GPU2 {1, 1}, GPU3 {1, 1}.  Its best
 *   change swaps a 9 of GPU0 with a 1 of GPU2 (gain 8: a better score than
 *   layer 0's), but GPU1 still carries 18: the max falls only after a
 *   second swap, to 10.
 * Key of layer 0: 5 / cost.  Key of layer 1: at k = 1 the drop is 0 (GPU1
 * at 18), at k = 2 it is 8 for two swaps: 8 / (2 cost) = 4 / cost.  So
 * layer 0 goes first, and its one swap reaches 15 + 18 = 33 <= 33.5: two
 * copies, layer 1 untouched.  Keyed by the change's score alone, layer 1
 * would take both its swaps first (four copies) to reach 20 + 10. */
Test(incremental, golden_level_key_waits_for_tied_gpus) {
    eplb_policy_shape s = { .num_layers = 2, .num_logical = 8, .num_physical = 8, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 4 };
    int32_t row[16], cnt[16];
    for (int i = 0; i < 16; i++)
        row[i] = i % 8;
    counts(2, 8, 8, row, cnt);
    const int64_t load[16] = { 10, 10, 5, 5, 6, 4, 5, 5, /* layer 1 */ 9, 9, 9, 9, 1, 1, 1, 1 };
    const double floor[2] = { 14, 10 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4,
                                  .total_target = 33.5, .layer_floor = floor };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    const int32_t want[16] = { 2, 1, 0, 3, 4, 5, 6, 7, /* layer 1 */ 0, 1, 2, 3, 4, 5, 6, 7 };
    cr_assert_arr_eq(row, want, sizeof want);
    cr_assert_eq(st.changes, 1);
    cr_assert_eq(st.copies, 2);
    cr_assert(st.reached);
    cr_assert_float_eq(st.total_max, 33.0, 1e-9);
}

/* Copies are priced as the plan makes them: from the bytes the GPUs held
 * when the call began.  GPU0 {1, 0}, GPU1 {2, 0}; loads 26, 19, 59, so
 * expert 0's two replicas weigh 13: GPU0 32, GPU1 72.
 *   1. REPL: slot 3 (expert 0) takes expert 2, which GPU1 holds (free, one
 *      slot): GPU1 {2, 2} 59, GPU0 19 + 26 = 45.  Max 72 -> 59.
 *   2. GPU1 swaps one replica of 2 (29.5) with GPU0's 1 (19) or 0 (26):
 *      either leaves max 55.5 (48.5 / 55.5 or 55.5 / 48.5).  Expert 2 costs
 *      a copy to GPU0 either way.  Expert 1 would cost a copy to GPU1, but
 *      expert 0 is free there: GPU1 held it at the start (slot 3's old
 *      bytes, which the plan reads before it writes).
 * So the answer is {1, 2} {0, 2} with one copy.  Pricing from the current
 * holders only (as before) charged expert 0's return too and took 1 with
 * two copies: {2, 0} {1, 2}.  Without a target it stops when nothing
 * lowers 55.5. */
Test(incremental, golden_copy_back_is_free) {
    int32_t row[4] = { 1, 0, 2, 0 }, cnt[3];
    const int64_t load[3] = { 26, 19, 59 };
    const eplb_incremental_stats st = small_layer(row, cnt, load);
    const int32_t want[4] = { 1, 2, 0, 2 };
    cr_assert_arr_eq(row, want, sizeof want);
    cr_assert_eq(st.changes, 2);
    cr_assert_eq(st.copies, 1);
    const int32_t start[4] = { 1, 0, 2, 0 };
    uint64_t gpu = 0, node = 0;
    eplb_next_copies(4, 2, 2, 3, start, row, &gpu, &node);
    cr_assert_eq(gpu, 1, "the plan copies %llu experts", (unsigned long long)gpu);
}

/* Exact ties go to the lower slot, as consider() orders them, even where
 * score x cost rounds above the gain (a reviewer's case).  GPU0 {0, 1, 3},
 * GPU1 {0, 1, 2}; loads 384, 0, 22, 113; from-scratch counts 3, 3, 2, 3,
 * so the item bound is 1.3 x 128 = 166.4 and e0's replicas (192) split
 * first: of e1's slots, slot 4 leaves the touched GPUs lighter (GPU0 241,
 * GPU1 278, against 369 with slot 1).  Then GPU1 {0, 0, 2} is the
 * busiest, and two swaps tie at gain 15 (max 263) and cost 1.8 (two
 * slots, one copy at 0.3; the other half is free):
 *   e0 (slot 3) with GPU0's e3: e0 is on GPU0 already;
 *   e2 (slot 5) with GPU0's e1: GPU1 held e1 when the call began.
 * 15 / 1.8 times 1.8 rounds above 15, so a bound written as a product
 * skipped the first one.  The lower slot, 3, wins: {0, 1, 0} {3, 0, 2}
 * (256 / 263), after which no change lowers 263. */
Test(incremental, golden_ties_go_to_the_lower_slot) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 4, .num_physical = 6, .num_groups = 2,
                                  .num_nodes = 1, .num_gpus = 2 };
    int32_t row[6] = { 0, 1, 3, 0, 1, 2 }, cnt[4];
    counts(1, 4, 6, row, cnt);
    const int64_t load[4] = { 384, 0, 22, 113 };
    const int32_t ref[4] = { 3, 3, 2, 3 };
    const eplb_incremental_params p = { .shape = s, .logical_load = load, .total_target = -1, .reference_cnt = ref,
                                        .cost_intra_node = 0.3, .cost_cross_node = 7 };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_OK, "%s", err.msg);
    const int32_t want[6] = { 0, 1, 0, 3, 0, 2 };
    cr_assert_arr_eq(row, want, sizeof want);
    cr_assert_eq(st.splits, 1);
    cr_assert_eq(st.changes, 2);
    cr_assert_float_eq(st.total_max, 263.0, 1e-9);
}

/* A layer already balanced is left alone: GPU0 {0, 1} and GPU1 {0, 2}
 * carry 10 + 10 each. */
Test(incremental, balanced_layer_untouched) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 3, .num_physical = 4, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    int32_t row[4] = { 0, 1, 0, 2 }, cnt[3];
    counts(1, 3, 4, row, cnt);
    const int64_t load[3] = { 20, 10, 10 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4 };
    eplb_incremental_stats st;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, NULL), EPLB_OK);
    cr_assert_eq(st.changes, 0);
    const int32_t want[4] = { 0, 1, 0, 2 };
    cr_assert_arr_eq(row, want, sizeof want);
}

Test(incremental, refuses_bad_input) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 3, .num_physical = 4, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    int32_t row[4] = { 0, 1, -1, 2 }, cnt[3] = { 1, 1, 1 };
    const int64_t load[3] = { 1, 2, 3 };
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4 };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "slot 2 holds -1"), "%s", err.msg);
    int32_t row2[4] = { 0, 1, 1, 1 }; /* expert 2 has no replica */
    cr_assert_eq(eplb_incremental_rebalance(&p, row2, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "without a replica"), "%s", err.msg);
    /* The plan's sources: in range, and a replica of every expert. */
    int32_t row3[4] = { 0, 1, 2, 0 };
    const int32_t bad_initial[4] = { 0, 1, 3, 0 }, short_initial[4] = { 0, 1, 1, 0 };
    p.initial_row = bad_initial;
    cr_assert_eq(eplb_incremental_rebalance(&p, row3, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "initial_row layer 0 slot 2 holds 3"), "%s", err.msg);
    p.initial_row = short_initial;
    cr_assert_eq(eplb_incremental_rebalance(&p, row3, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "no replica of expert 2"), "%s", err.msg);
    const int32_t same[4] = { 0, 1, 2, 0 };
    cr_assert_arr_eq(row3, same, sizeof same); /* refused: nothing changed */
}

/* ---- properties ---------------------------------------------------------- */

typedef struct random_case {
    eplb_policy_shape s;
    int64_t *load;
    int32_t *cur, *cur_cnt;
} random_case;

static void random_case_free(random_case *c) {
    free(c->load);
    free(c->cur);
    free(c->cur_cnt);
}

/* A random valid shape, load and current placement.  hierarchical: make
 * the current placement DeepSeek's hierarchical one for another load, so
 * every group's replicas sit on one node. */
static void random_case_make(random_case *c, bool hierarchical) {
    uint32_t nodes = 1 + rnd_below(hierarchical ? 3 : 2);
    uint32_t gpus = nodes * (1 + rnd_below(4));
    uint32_t S = 1 + rnd_below(6);
    uint32_t P = gpus * S;
    uint32_t groups = hierarchical ? nodes * (1 + rnd_below(2)) : 1 + rnd_below(2);
    uint32_t per_group = 1 + rnd_below(P / groups > 1 ? P / groups : 1);
    uint32_t N = groups * per_group;
    while (N > P) {
        if (per_group > 1)
            per_group--;
        N = groups * per_group;
        if (N > P) { /* too many groups for the slots: fewer */
            groups = 1;
            per_group = P;
            N = P;
        }
    }
    c->s = (eplb_policy_shape){ .num_layers = 1 + rnd_below(3), .num_logical = N, .num_physical = P,
                                .num_groups = groups, .num_nodes = nodes, .num_gpus = gpus };
    const uint32_t L = c->s.num_layers;
    c->load = malloc((size_t)L * N * sizeof *c->load);
    c->cur = malloc((size_t)L * P * sizeof *c->cur);
    c->cur_cnt = malloc((size_t)L * N * sizeof *c->cur_cnt);
    for (size_t i = 0; i < (size_t)L * N; i++) {
        uint64_t r = rnd();
        c->load[i] = (r & 7) == 0 ? 0 : (int64_t)((r >> 8) % (1 + ((r >> 40) % 1000) * ((r >> 3) % 3 ? 1 : 50)));
    }
    if (hierarchical && eplb_policy_is_hierarchical(&c->s)) {
        int64_t *other = malloc((size_t)L * N * sizeof *other);
        for (size_t i = 0; i < (size_t)L * N; i++)
            other[i] = (int64_t)rnd_below(1000);
        cr_assert_eq(eplb_policy_rebalance(&c->s, other, c->cur, c->cur_cnt, NULL), EPLB_OK);
        free(other);
        return;
    }
    for (uint32_t l = 0; l < L; l++) {
        int32_t *row = c->cur + (size_t)l * P;
        for (uint32_t i = 0; i < P; i++)
            row[i] = i < N ? (int32_t)i : (int32_t)rnd_below(N);
        for (uint32_t i = P - 1; i > 0; i--) { /* shuffle */
            uint32_t j = rnd_below(i + 1);
            int32_t t = row[i];
            row[i] = row[j];
            row[j] = t;
        }
    }
    counts(L, N, P, c->cur, c->cur_cnt);
}

/* Every group's replicas within one node, per layer. */
static bool group_local(const eplb_policy_shape *s, const int32_t *row) {
    const uint32_t S = s->num_physical / s->num_gpus, gpn = s->num_gpus / s->num_nodes;
    const uint32_t per_group = s->num_logical / s->num_groups;
    int32_t node_of_group[64];
    for (uint32_t g = 0; g < s->num_groups; g++)
        node_of_group[g] = -1;
    for (uint32_t i = 0; i < s->num_physical; i++) {
        uint32_t g = (uint32_t)row[i] / per_group, node = i / S / gpn;
        if (node_of_group[g] < 0)
            node_of_group[g] = (int32_t)node;
        else if (node_of_group[g] != (int32_t)node)
            return false;
    }
    return true;
}

static void check_case(random_case *c, bool hierarchical_check) {
    const eplb_policy_shape *s = &c->s;
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical;
    eplb_next_request req = { .shape = *s, .cur_phy2log = c->cur, .cur_logcnt = c->cur_cnt,
                              .logical_load = c->load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    req.knobs.target_balancedness = rnd_below(4) == 0 ? 0 : 0.8 + 0.2 * (double)rnd_below(1000) / 1000.0;
    const bool budget_bytes = rnd_below(3) == 0, budget_slots = rnd_below(3) == 0;
    if (budget_bytes) {
        req.knobs.expert_bytes = 1000;
        req.knobs.max_bytes_moved = 1000 * (uint64_t)rnd_below(P + 1) + rnd_below(1000);
    }
    if (budget_slots)
        req.knobs.max_slots_moved = 1 + rnd_below(P);
    if (rnd_below(2))
        req.knobs.cost_cross_node = 1 + rnd_below(8);
    int32_t *out = malloc((size_t)L * P * sizeof *out), *out2 = malloc((size_t)L * P * sizeof *out2);
    int32_t *cnt = malloc((size_t)L * N * sizeof *cnt), *cnt2 = malloc((size_t)L * N * sizeof *cnt2);
    int32_t *recount = malloc((size_t)L * N * sizeof *recount);
    double *before = malloc(L * sizeof *before), *after = malloc(L * sizeof *after);
    eplb_next_report rep, rep2;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, cnt, before, after, &rep, &err), EPLB_OK, "%s", err.msg);

    /* Invariants: ids in range, counts match, every expert kept. */
    for (size_t i = 0; i < (size_t)L * P; i++)
        cr_assert(out[i] >= 0 && (uint32_t)out[i] < N, "slot %zu holds %d", i, out[i]);
    counts(L, N, P, out, recount);
    cr_assert_arr_eq(cnt, recount, (size_t)L * N * sizeof *cnt);
    for (size_t i = 0; i < (size_t)L * N; i++)
        cr_assert_geq(cnt[i], 1, "expert %zu lost its last replica", i % N);
    /* Never worse, layer by layer. */
    for (uint32_t l = 0; l < L; l++)
        cr_assert_geq(after[l], before[l] - 1e-9, "layer %u: %.9f -> %.9f", l, before[l], after[l]);
    cr_assert_geq(rep.balancedness_after, rep.balancedness_before - 1e-9);
    /* The reported copies and slots are the answer's. */
    uint64_t cg = 0, cn = 0, sl = 0;
    for (uint32_t l = 0; l < L; l++) {
        uint64_t a, b;
        eplb_next_copies(P, s->num_gpus, s->num_gpus / s->num_nodes, N, c->cur + (size_t)l * P, out + (size_t)l * P,
                         &a, &b);
        cg += a;
        cn += b;
    }
    for (size_t i = 0; i < (size_t)L * P; i++)
        sl += c->cur[i] != out[i];
    cr_assert_eq(rep.copies_cross_gpu, cg);
    cr_assert_eq(rep.copies_cross_node, cn);
    cr_assert_eq(rep.slots_moved, sl);
    /* Budgets. */
    if (budget_bytes)
        cr_assert_leq(rep.copies_cross_gpu, req.knobs.max_bytes_moved / req.knobs.expert_bytes,
                      "%llu copies over a budget of %llu bytes", (unsigned long long)rep.copies_cross_gpu,
                      (unsigned long long)req.knobs.max_bytes_moved);
    if (budget_slots)
        cr_assert_leq(rep.slots_moved, req.knobs.max_slots_moved);
    /* The target, when no budget binds: the model's balancedness (sum of
     * means / sum of maxes) within target of the from-scratch one (layers
     * take the from-scratch row until it is). */
    const double target = req.knobs.target_balancedness ? req.knobs.target_balancedness : 0.99;
    if (!budget_bytes && !budget_slots) {
        double *ref_layer = malloc(L * sizeof *ref_layer);
        int32_t *ref = malloc((size_t)L * P * sizeof *ref), *ref_cnt = malloc((size_t)L * N * sizeof *ref_cnt);
        cr_assert_eq(eplb_policy_rebalance(s, c->load, ref, ref_cnt, NULL), EPLB_OK);
        double refb = eplb_policy_balancedness(L, N, P, s->num_gpus, c->load, ref, ref_cnt, ref_layer);
        cr_assert_float_eq(rep.balancedness_reference, refb, 1e-12);
        cr_assert_geq(rep.balancedness_after, refb * target - 1e-9);
        /* No replica heavier than the item bound unless it already was:
         * splits and re-replications keep under it; swaps do not change
         * replica loads. */
        for (uint32_t l = 0; l < L; l++) {
            double ref_item = 0, in_item = 0, out_item = 0;
            for (uint32_t e = 0; e < N; e++) {
                const double w = (double)c->load[(size_t)l * N + e];
                ref_item = fmax(ref_item, w / ref_cnt[(size_t)l * N + e]);
                in_item = fmax(in_item, w / c->cur_cnt[(size_t)l * N + e]);
                out_item = fmax(out_item, w / cnt[(size_t)l * N + e]);
            }
            cr_assert_leq(out_item, fmax(ref_item * EPLB_INCREMENTAL_ITEM_SLACK, in_item) * (1 + 1e-12),
                          "layer %u: a replica of load %.3f (bound %.3f, before %.3f)", l, out_item,
                          ref_item * EPLB_INCREMENTAL_ITEM_SLACK, in_item);
        }
        free(ref_layer);
        free(ref);
        free(ref_cnt);
    }
    cr_assert(rep.policy_used == EPLB_POLICY_INCREMENTAL || rep.layers_from_scratch == L);
    /* Deterministic. */
    cr_assert_eq(eplb_next_placement(&req, out2, cnt2, NULL, NULL, &rep2, &err), EPLB_OK);
    cr_assert_arr_eq(out, out2, (size_t)L * P * sizeof *out);
    cr_assert_eq(rep.copies_cross_gpu, rep2.copies_cross_gpu);
    /* Hierarchical: no group spreads to a second node. */
    if (hierarchical_check)
        for (uint32_t l = 0; l < L; l++)
            cr_assert(group_local(s, out + (size_t)l * P), "layer %u: a group spread over nodes", l);
    free(out);
    free(out2);
    free(cnt);
    free(cnt2);
    free(recount);
    free(before);
    free(after);
}

Test(incremental, properties_random_global) {
    rng_state = 0x1234;
    for (int k = 0; k < 3000; k++) {
        random_case c;
        random_case_make(&c, false);
        check_case(&c, false);
        random_case_free(&c);
    }
}

Test(incremental, properties_random_hierarchical) {
    rng_state = 0x9876;
    int checked = 0;
    for (int k = 0; k < 2000; k++) {
        random_case c;
        random_case_make(&c, true);
        bool h = eplb_policy_is_hierarchical(&c.s) && c.s.num_nodes > 1;
        bool local = h;
        for (uint32_t l = 0; local && l < c.s.num_layers; l++)
            local = group_local(&c.s, c.cur + (size_t)l * c.s.num_physical);
        check_case(&c, local);
        checked += local;
        random_case_free(&c);
    }
    cr_assert_gt(checked, 200, "only %d hierarchical cases", checked);
}

/* Budgets of zero change nothing that costs: no copies, or no slots. */
Test(incremental, zero_budgets) {
    rng_state = 0x55;
    for (int k = 0; k < 300; k++) {
        random_case c;
        random_case_make(&c, false);
        const uint32_t L = c.s.num_layers, N = c.s.num_logical, P = c.s.num_physical;
        int32_t *out = malloc((size_t)L * P * sizeof *out), *cnt = malloc((size_t)L * N * sizeof *cnt);
        eplb_next_request req = { .shape = c.s, .cur_phy2log = c.cur, .cur_logcnt = c.cur_cnt,
                                  .logical_load = c.load };
        req.knobs.policy = EPLB_POLICY_INCREMENTAL;
        req.knobs.max_slots_moved = 1; /* at most one slot: no swap (2 slots) */
        eplb_next_report rep;
        cr_assert_eq(eplb_next_placement(&req, out, cnt, NULL, NULL, &rep, NULL), EPLB_OK);
        cr_assert_leq(rep.slots_moved, 1);
        req.knobs.max_slots_moved = 0;
        req.knobs.expert_bytes = 4096;
        req.knobs.max_bytes_moved = 4095; /* less than one expert */
        cr_assert_eq(eplb_next_placement(&req, out, cnt, NULL, NULL, &rep, NULL), EPLB_OK);
        cr_assert_eq(rep.copies_cross_gpu, 0);
        free(out);
        free(cnt);
        random_case_free(&c);
    }
}

Test(incremental, knobs_checked) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 3, .num_physical = 4, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = 2 };
    int32_t row[4] = { 0, 1, 2, 0 }, cnt[3] = { 2, 1, 1 }, out[4], ocnt[3];
    const int64_t load[3] = { 10, 80, 10 };
    eplb_next_request req = { .shape = s, .cur_phy2log = row, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    eplb_next_report rep;
    eplb_error err;
    req.knobs.max_bytes_moved = 100;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "needs the size of an expert"), "%s", err.msg);
    req.knobs.max_bytes_moved = 0;
    req.knobs.target_balancedness = 1.5;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "target_balancedness 1.5"), "%s", err.msg);
    req.knobs.target_balancedness = NAN;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_EINVAL);
    req.knobs.target_balancedness = 0;
    req.knobs.policy = 7;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "policy 7"), "%s", err.msg);
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    req.knobs.cost_cross_node = -1;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_EINVAL);
    req.knobs.cost_cross_node = 0;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(rep.policy_used, EPLB_POLICY_INCREMENTAL);
    cr_assert_float_eq(rep.balancedness_after, 1.0, 1e-12);
    cr_assert_eq(rep.copies_cross_gpu, 1);
    cr_assert_eq(rep.slots_moved, 1);
}

/* The copy count as plans make them: one per (GPU, expert) the GPU lacks,
 * cross-node when its node lacks it too; moves within a GPU are free. */
Test(incremental, copies_counted_like_plans) {
    /* 2 nodes x 2 GPUs x 2 slots. */
    const int32_t old_row[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
    const int32_t new_row[8] = { 1, 0, 2, 2, 3, 3, 6, 0 };
    uint64_t gpu, node;
    eplb_next_copies(8, 4, 2, 8, old_row, new_row, &gpu, &node);
    /* GPU0 {1,0}: nothing new.  GPU1 {2,2}: nothing new (2 is there).
     * GPU2 {3,3}: 3 is new (from GPU1: node 0 -> cross node), once.
     * GPU3 {6,0}: 6 from GPU3's own? no: GPU3 held {6,7}: 6 is there; 0
     * is new, from node 0: cross node. */
    cr_assert_eq(gpu, 2);
    cr_assert_eq(node, 2);
}

/* An expert with more replicas than a change's touched set holds (2112):
 * such re-replications are skipped, nothing overflows, the answer is a
 * valid placement no worse than before. */
Test(incremental, experts_with_thousands_of_replicas) {
    enum { NN = 3, PP = 4800, GG = 4 };
    eplb_policy_shape s = { .num_layers = 1, .num_logical = NN, .num_physical = PP, .num_groups = 1,
                            .num_nodes = 1, .num_gpus = GG };
    int32_t *row = malloc(PP * sizeof *row), cnt[NN];
    for (int i = 0; i < PP; i++)
        row[i] = i < 2 ? i + 1 : 0; /* expert 0: 4798 replicas */
    counts(1, NN, PP, row, cnt);
    const int64_t load[NN] = { 1000, 900000, 5 };
    eplb_next_request req = { .shape = s, .cur_phy2log = row, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    int32_t *out = malloc(PP * sizeof *out), ocnt[NN];
    double before, after;
    eplb_next_report rep;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, &before, &after, &rep, &err), EPLB_OK, "%s", err.msg);
    int32_t recount[NN];
    counts(1, NN, PP, out, recount);
    cr_assert_arr_eq(recount, ocnt, sizeof ocnt);
    for (int e = 0; e < NN; e++)
        cr_assert_geq(ocnt[e], 1);
    cr_assert_geq(after, before - 1e-9);
    free(row);
    free(out);
}

/* Review findings: a hierarchical constraint on a shape that is not
 * hierarchical, and zero link costs, are refused by the direct API; a
 * current placement with empty slots (a scale-up not rebalanced yet) is
 * answered from scratch, filling them. */
Test(incremental, review_edge_cases) {
    eplb_policy_shape s = { .num_layers = 1, .num_logical = 10, .num_physical = 12, .num_groups = 4,
                            .num_nodes = 3, .num_gpus = 6 };
    int32_t row[12], cnt[10];
    for (int i = 0; i < 12; i++)
        row[i] = i % 10;
    counts(1, 10, 12, row, cnt);
    int64_t load[10];
    for (int e = 0; e < 10; e++)
        load[e] = 10 + e * e;
    eplb_incremental_params p = { .shape = s, .logical_load = load, .cost_intra_node = 1, .cost_cross_node = 4,
                                  .hierarchical = true };
    eplb_incremental_stats st;
    eplb_error err;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "hierarchical needs"), "%s", err.msg);
    p.hierarchical = false;
    p.cost_intra_node = 0;
    cr_assert_eq(eplb_incremental_rebalance(&p, row, cnt, &st, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "link costs must be > 0"), "%s", err.msg);

    row[11] = -1; /* an empty slot */
    counts(1, 10, 11, row, cnt); /* the first 11 slots */
    eplb_next_request req = { .shape = s, .cur_phy2log = row, .cur_logcnt = cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    int32_t out[12], ocnt[10];
    eplb_next_report rep;
    cr_assert_eq(eplb_next_placement(&req, out, ocnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
    for (int i = 0; i < 12; i++)
        cr_assert(out[i] >= 0 && out[i] < 10, "slot %d holds %d", i, out[i]);
    cr_assert_eq(rep.policy_used, EPLB_POLICY_DEEPSEEK);
    cr_assert_eq(rep.layers_from_scratch, 1);
    cr_assert(strstr(rep.reason, "empty slots"), "%s", rep.reason);
    cr_assert_float_eq(rep.balancedness_reference, rep.balancedness_after, 1e-12);
}

/* A shape whose replicas number in the hundreds per expert (4096 slots for
 * 2048 experts on 2 GPUs, counts from another Zipf load): each split and
 * re-replication visits every replica, so the compute bound (300M
 * replica visits) is what ends the search, after about a second.  The
 * answer is still a valid placement, no layer worse, the target met (the
 * layers left take the from-scratch row), and the reason says why. */
Test(incremental, compute_bound_on_hostile_replica_counts, .timeout = 120) {
    const eplb_policy_shape s = { .num_layers = 2, .num_logical = 2048, .num_physical = 4096, .num_groups = 1,
                                  .num_nodes = 1, .num_gpus = 2 };
    const uint32_t L = s.num_layers, N = s.num_logical, P = s.num_physical;
    int64_t *load = malloc((size_t)L * N * sizeof *load), *old_load = malloc((size_t)L * N * sizeof *old_load);
    int32_t *cur = malloc((size_t)L * P * sizeof *cur), *cur_cnt = malloc((size_t)L * N * sizeof *cur_cnt);
    int32_t *out = malloc((size_t)L * P * sizeof *out), *cnt = malloc((size_t)L * N * sizeof *cnt);
    double before[2], after[2];
    rng_state = 0x51;
    for (size_t i = 0; i < (size_t)L * N; i++) {
        old_load[i] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
        load[i] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
    }
    cr_assert_eq(eplb_policy_rebalance(&s, old_load, cur, cur_cnt, NULL), EPLB_OK);
    eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cur_cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    eplb_next_report rep;
    eplb_error err;
    cr_assert_eq(eplb_next_placement(&req, out, cnt, before, after, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert(strstr(rep.reason, "compute bound"), "reason: %s", rep.reason);
    int32_t *recount = malloc((size_t)L * N * sizeof *recount);
    counts(L, N, P, out, recount);
    cr_assert_arr_eq(cnt, recount, (size_t)L * N * sizeof *cnt);
    for (size_t i = 0; i < (size_t)L * N; i++)
        cr_assert_geq(cnt[i], 1);
    for (uint32_t l = 0; l < L; l++)
        cr_assert_geq(after[l], before[l] - 1e-9, "layer %u: %.9f -> %.9f", l, before[l], after[l]);
    cr_assert_geq(rep.balancedness_after, rep.balancedness_reference * 0.99 - 1e-9);
    free(load);
    free(old_load);
    free(cur);
    free(cur_cnt);
    free(out);
    free(cnt);
    free(recount);
}

/* Half of 8192 slots on 1024 GPUs hold expert 0, which carries all the load
 * (a review's reproducer): every split prices copies of an expert with
 * thousands of replicas.  Priced in O(1) and counted by the compute bound,
 * the call takes about two seconds; priced by walking the replicas it took
 * nearly ten minutes for this one layer.  The timeout catches a hang, not
 * a speed: the numbers are bench's. */
Test(incremental, splits_of_an_expert_with_thousands_of_replicas, .timeout = 120) {
    const eplb_policy_shape s = { .num_layers = 1, .num_logical = 256, .num_physical = 8192, .num_groups = 1,
                                  .num_nodes = 1, .num_gpus = 1024 };
    const uint32_t N = s.num_logical, P = s.num_physical;
    int32_t *cur = malloc(P * sizeof *cur), *cur_cnt = calloc(N, sizeof *cur_cnt);
    int32_t *out = malloc(P * sizeof *out), *cnt = malloc(N * sizeof *cnt);
    int64_t *load = calloc(N, sizeof *load);
    for (uint32_t i = 0; i < P; i++) {
        cur[i] = i < P / 2 ? 0 : (int32_t)(1 + (i - P / 2) % (N - 1));
        cur_cnt[cur[i]]++;
    }
    load[0] = 1000000000;
    eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cur_cnt, .logical_load = load };
    req.knobs.policy = EPLB_POLICY_INCREMENTAL;
    eplb_next_report rep;
    eplb_error err;
    double before, after;
    cr_assert_eq(eplb_next_placement(&req, out, cnt, &before, &after, &rep, &err), EPLB_OK, "%s", err.msg);
    cr_assert_geq(after, before);
    cr_assert_geq(rep.balancedness_after, rep.balancedness_reference * 0.99 - 1e-9);
    int32_t *recount = malloc(N * sizeof *recount);
    counts(1, N, P, out, recount);
    cr_assert_arr_eq(cnt, recount, N * sizeof *cnt);
    free(cur);
    free(cur_cnt);
    free(out);
    free(cnt);
    free(load);
    free(recount);
}

/* ---- two threads ---------------------------------------------------------- */

/* The answer with a second thread is the loop's on one (eplb_incremental.c,
 * "Two threads"): two_threads_case.h's random cases. */
static uint32_t two_threads_case_with(const tt_options *o, bool *undone) {
    tt_result r;
    cr_assert(two_threads_case_run(&rng_state, o, &r), "%s", r.msg);
    cr_assert(r.msg[0] == '\0', "%s", r.msg);
    if (undone)
        *undone = r.undone;
    return r.threads;
}

static uint32_t two_threads_case(uint64_t max_work, uint32_t log_cap, bool thread_fails, bool *undone) {
    const tt_options o = { .max_work = max_work, .log_cap = log_cap, .thread_fails = thread_fails };
    return two_threads_case_with(&o, undone);
}

Test(incremental, two_threads_give_the_same_answer) {
    rng_state = 0x2b2b;
    int two = 0;
    for (int k = 0; k < 400; k++)
        two += two_threads_case(0, 0, false, NULL) == 2;
    cr_assert_gt(two, 300, "the two-thread search finished in %d of 400 cases", two); /* the rest: at target */
}

/* How `cases` random cases with o ran: on one thread, on two; with
 * random_bound, each under a compute bound of 2,000-62,000. */
static void two_threads_outcomes(tt_options o, bool random_bound, int cases, int *one, int *two) {
    *one = *two = 0;
    for (int k = 0; k < cases; k++) {
        if (random_bound)
            o.max_work = 2000 + rnd_below(60000);
        const uint32_t t = two_threads_case_with(&o, NULL);
        *one += t == 1;
        *two += t == 2;
    }
}

Test(incremental, two_threads_past_the_compute_bound_give_the_same_answer) {
    rng_state = 0x3c3c;
    int one, two;
    two_threads_outcomes((tt_options){ 0 }, true, 200, &one, &two);
    cr_assert(one > 10 && two > 10, "undone in %d, finished in %d of 200 cases", one, two);
}

/* A log that fills (each side's capped at 1-40 changes): the search is
 * undone and the loop runs again on one thread, with its answer; a log
 * large enough for the call's changes still finishes on two. */
Test(incremental, two_threads_with_a_full_log_give_the_same_answer) {
    rng_state = 0x5e5e;
    int undone = 0, two = 0;
    for (int k = 0; k < 200; k++) {
        bool u;
        two += two_threads_case(0, 1 + rnd_below(40), false, &u) == 2;
        undone += u;
    }
    cr_assert(undone > 50 && two > 10, "undone in %d, finished in %d of 200 cases", undone, two);
}

/* No helper thread (pthread_create failing, as at the process's thread
 * limit): the one-thread answer. */
Test(incremental, two_threads_without_a_thread_give_the_same_answer) {
    rng_state = 0x6f6f;
    for (int k = 0; k < 100; k++)
        cr_assert_eq(two_threads_case(0, 0, true, NULL), 1);
}

/* The compute bound at the one-thread call's own work W, W - 2 .. W + 2:
 * where one thread stops one change short or just finishes, two threads
 * finish with its answer or are redone. */
Test(incremental, two_threads_at_the_edge_of_the_compute_bound) {
    rng_state = 0x9c9c;
    int one, two;
    two_threads_outcomes((tt_options){ .near_bound = true }, false, 300, &one, &two);
    cr_assert(one > 20 && two > 20, "redone in %d, finished in %d of 300 cases", one, two);
}

/* A helper that starts only once the calling thread has set up every
 * layer (params.test.helper_late), with threads = 2 or 0: the calling
 * thread runs the loop alone when the helper has not arrived (with 0) or
 * waits for it, which then searches layers it took no part in setting up
 * (with 2); the answer is the one-thread one either way. */
Test(incremental, two_threads_with_a_late_helper_give_the_same_answer) {
    rng_state = 0xbebe;
    int one = 0, two = 0;
    for (int k = 0; k < 300; k++) {
        const tt_options o = { .helper_late = true, .automatic = k % 2 == 0 };
        const uint32_t t = two_threads_case_with(&o, NULL);
        one += t == 1 && k % 2 == 0;
        two += t == 2 && k % 2 == 1;
    }
    cr_assert(one > 20, "with threads = 0, the loop on one thread in %d of 150 cases", one);
    cr_assert(two > 20, "with threads = 2, on two in %d of 150 cases", two);
}

/* A layer not valid, on a random side (its row, or its initial_row): the
 * two-thread call refuses it as one thread does (same message, arrays). */
Test(incremental, two_threads_refuse_random_bad_layers_as_one_thread) {
    rng_state = 0xadad;
    for (int bad = 1; bad <= 2; bad++) {
        const tt_options o = { .bad = bad };
        int undone = 0;
        for (int k = 0; k < 150; k++) {
            bool u;
            two_threads_case_with(&o, &u);
            undone += u;
        }
        cr_assert_gt(undone, 120, "bad %d: undone in %d of 150 cases", bad, undone);
    }
}

/* An allocation that fails anywhere in a two-thread call: out of memory
 * with nothing changed, or (inside the two-thread search) the one-thread
 * answer. */
Test(incremental, two_threads_out_of_memory) {
    const eplb_policy_shape s = { .num_layers = 12, .num_logical = 24, .num_physical = 32, .num_groups = 1,
                                  .num_nodes = 1, .num_gpus = 8 };
    const uint32_t L = s.num_layers, N = s.num_logical;
    int64_t load[12 * 24], old[12 * 24];
    rng_state = 0x4d4d;
    for (uint32_t i = 0; i < L * N; i++) {
        old[i] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
        load[i] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
    }
    int32_t cur[12 * 32], cur_cnt[12 * 24], want[12 * 32], want_cnt[12 * 24], row[12 * 32], cnt[12 * 24];
    cr_assert_eq(eplb_policy_rebalance(&s, old, cur, cur_cnt, NULL), EPLB_OK);
    eplb_incremental_params p = { .shape = s, .logical_load = load, .total_target = -1, .cost_intra_node = 1,
                                  .cost_cross_node = 4, .threads = 1 };
    eplb_incremental_stats st;
    eplb_error err;
    memcpy(want, cur, sizeof cur);
    memcpy(want_cnt, cur_cnt, sizeof cur_cnt);
    cr_assert_eq(eplb_incremental_rebalance(&p, want, want_cnt, &st, &err), EPLB_OK);
    cr_assert_gt(st.changes, 0);
    p.threads = 2;
    int fell_back = 0;
    for (long k = 1;; k++) {
        memcpy(row, cur, sizeof cur);
        memcpy(cnt, cur_cnt, sizeof cur_cnt);
        snprintf(err.msg, sizeof err.msg, "untouched");
        eplb_alloc_fail_at(k, 0);
        const eplb_status r = eplb_incremental_rebalance(&p, row, cnt, &st, &err);
        const long made = eplb_alloc_fail_at(0, 0);
        if (r == EPLB_OK) /* a failure the one-thread run recovered from leaves no message */
            cr_assert_str_eq(err.msg, "untouched", "allocation %ld", k);
        if (r == EPLB_ENOMEM) {
            cr_assert_arr_eq(row, cur, sizeof cur, "allocation %ld", k);
            cr_assert_arr_eq(cnt, cur_cnt, sizeof cnt);
            continue;
        }
        cr_assert_eq(r, EPLB_OK, "allocation %ld: %s", k, err.msg);
        cr_assert_arr_eq(row, want, sizeof want, "allocation %ld", k);
        cr_assert_arr_eq(cnt, want_cnt, sizeof want_cnt);
        if (made < k) /* no allocation failed: the end */
            break;
        fell_back += st.threads == 1;
    }
    cr_assert_gt(fell_back, 3); /* the two-thread search's own allocations */
}

/* ---- the fallback's copy bound (eplb_next_copies_lower_bound) -------------- */

/* Random rows: the bound is at most the copies of the row relabelled as
 * eplb_plan_reassign_gpus does, as it is, and under a random relabelling
 * of its GPUs. */
Test(incremental, copies_lower_bound_holds_under_every_relabelling) {
    rng_state = 0x7a7a;
    int tight = 0;
    for (int k = 0; k < 2000; k++) {
        const uint32_t G = 1 + rnd_below(8), S = 1 + rnd_below(6), P = G * S, N = 1 + rnd_below(P);
        int32_t old[48], row[48], perm[48];
        for (uint32_t i = 0; i < P; i++) {
            old[i] = rnd_below(10) == 0 ? -1 : (int32_t)rnd_below(N);
            row[i] = rnd_below(10) == 0 ? -1 : (int32_t)rnd_below(N);
        }
        const uint64_t lb = eplb_next_copies_lower_bound(P, G, N, old, row);
        uint64_t gpu, node;
        eplb_next_copies(P, G, G, N, old, row, &gpu, &node);
        cr_assert_leq(lb, gpu, "as it is: %llu > %llu", (unsigned long long)lb, (unsigned long long)gpu);
        uint32_t h[8];
        for (uint32_t g = 0; g < G; g++)
            h[g] = g;
        for (uint32_t g = G; g-- > 1;) {
            const uint32_t j = rnd_below(g + 1), t = h[g];
            h[g] = h[j];
            h[j] = t;
        }
        for (uint32_t g = 0; g < G; g++)
            memcpy(perm + h[g] * S, row + g * S, S * sizeof *row);
        eplb_next_copies(P, G, G, N, old, perm, &gpu, &node);
        cr_assert_leq(lb, gpu, "relabelled");
        cr_assert_eq(eplb_next_copies_lower_bound(P, G, N, old, perm), lb, "the bound does not see labels");
        eplb_plan_reassign_gpus(1, P, G, 1, old, row);
        eplb_next_copies(P, G, G, N, old, row, &gpu, &node);
        cr_assert_leq(lb, gpu, "reassigned");
        tight += lb == gpu;
    }
    cr_assert_gt(tight, 1000, "the bound met the reassigned copies in %d of 2000 rows", tight);
}

Test(incremental, copies_lower_bound_golden) {
    /* GPUs swapped: nothing to copy.  Disjoint experts: every one, once
     * per GPU (expert 4 twice on GPU 0 is one copy). */
    const int32_t old[6] = { 0, 1, 2, 3, 5, 5 }, swapped[6] = { 2, 3, 5, 5, 1, 0 };
    const int32_t fresh[6] = { 4, 4, 6, 7, 8, 6 }, some[6] = { 0, 6, 2, 7, 3, 8 };
    cr_assert_eq(eplb_next_copies_lower_bound(6, 3, 9, old, swapped), 0);
    cr_assert_eq(eplb_next_copies_lower_bound(6, 3, 9, old, fresh), 5);
    /* GPU 0 {0, 6}: shares 0 with old GPU 0, pays 1; {2, 7}: 1; {3, 8}: 1. */
    cr_assert_eq(eplb_next_copies_lower_bound(6, 3, 9, old, some), 3);
    cr_assert_eq(eplb_next_copies_lower_bound(6, 4, 9, old, some), 0, "not a shape: 0, still a bound");
}

/* Under a slot budget the fallback takes the from-scratch row when the
 * budget pays exactly its slots, and not one slot less: the bound that
 * skips its relabelling (eplb_next.c) must not skip a row the budget pays. */
Test(incremental, fallback_under_a_budget_that_pays_it_exactly) {
    rng_state = 0x8b8b;
    int taken = 0;
    for (int k = 0; k < 600; k++) {
        const uint32_t G = 2 + rnd_below(7), S = 1 + rnd_below(5), P = G * S, N = P / 2 + 1 + rnd_below(P - P / 2);
        const eplb_policy_shape s = { .num_layers = 1, .num_logical = N, .num_physical = P, .num_groups = 1,
                                      .num_nodes = 1, .num_gpus = G };
        int64_t old[40], load[40];
        for (uint32_t e = 0; e < N; e++) {
            old[e] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
            load[e] = (int64_t)(1e6 / pow(1.0 + (double)rnd_below(N), 1.1));
        }
        int32_t cur[40], cur_cnt[40], ref[40], ref_cnt[40], out[40], cnt[40];
        cr_assert_eq(eplb_policy_rebalance(&s, old, cur, cur_cnt, NULL), EPLB_OK);
        cr_assert_eq(eplb_policy_rebalance(&s, load, ref, ref_cnt, NULL), EPLB_OK);
        /* The reference's slots as eplb_next orders its row. */
        eplb_plan_reassign_gpus(1, P, G, 1, cur, ref);
        eplb_policy_preserve_slots(1, P, G, cur, ref);
        uint64_t slots = 0;
        for (uint32_t i = 0; i < P; i++)
            slots += ref[i] != cur[i];
        if (slots == 0)
            continue;
        for (int less = 0; less < 2; less++) {
            eplb_next_request req = { .shape = s, .cur_phy2log = cur, .cur_logcnt = cur_cnt, .logical_load = load };
            req.knobs.policy = EPLB_POLICY_INCREMENTAL;
            req.knobs.target_balancedness = 1.0;
            req.knobs.max_slots_moved = slots - (uint64_t)less;
            if (req.knobs.max_slots_moved == 0)
                continue;
            eplb_next_report rep;
            eplb_error err;
            cr_assert_eq(eplb_next_placement(&req, out, cnt, NULL, NULL, &rep, &err), EPLB_OK, "%s", err.msg);
            cr_assert_leq(rep.slots_moved, req.knobs.max_slots_moved);
            if (less)
                cr_assert_eq(rep.layers_from_scratch, 0, "one slot short of the row, it took it");
            else if (rep.layers_from_scratch == 1)
                taken++;
            else
                cr_assert_geq(rep.balancedness_after, rep.balancedness_reference * (1 - 1e-12),
                              "the budget paid the from-scratch row (%llu slots), better than the answer",
                              (unsigned long long)slots);
        }
    }
    cr_assert_gt(taken, 100, "the from-scratch row taken in %d cases", taken);
}

/* A layer that is not valid (an expert without a replica, or no source
 * for one in initial_row) on either thread's side: the two-thread call
 * refuses it as one thread does, with the same message (the first such
 * layer) and the same arrays. */
Test(incremental, two_threads_refuse_bad_layers_as_one_thread) {
    const eplb_policy_shape s = { .num_layers = 6, .num_logical = 6, .num_physical = 8, .num_groups = 1,
                                  .num_nodes = 1, .num_gpus = 4 };
    enum { L = 6, N = 6, P = 8 };
    int64_t load[L * N];
    for (uint32_t i = 0; i < L * N; i++)
        load[i] = 1000 + 997 * (i % 7);
    int32_t good[P] = { 0, 1, 2, 3, 4, 5, 0, 1 }, bad[P] = { 0, 1, 2, 3, 4, 0, 0, 1 }; /* bad: no expert 5 */
    const struct { uint32_t bad_layers; bool initial; const char *want; } cases[] = {
        { 1u << 3, false, "layer 3 has an expert without a replica" },           /* the helper's side */
        { 1u << 4, false, "layer 4 has an expert without a replica" },           /* the calling thread's */
        { (1u << 3) | (1u << 4), false, "layer 3 has an expert without a replica" },
        { 1u << 5, true, "initial_row layer 5 has no replica of expert 5" },
        { (1u << 2) | (1u << 5), true, "initial_row layer 2 has no replica of expert 5" },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int32_t row[2][L * P], cnt[2][L * N], initial[L * P];
        char msg[2][256];
        for (int t = 0; t < 2; t++) {
            for (uint32_t l = 0; l < L; l++) {
                const bool is_bad = !cases[k].initial && (cases[k].bad_layers >> l & 1);
                memcpy(row[t] + l * P, is_bad ? bad : good, sizeof good);
                memcpy(initial + l * P, cases[k].initial && (cases[k].bad_layers >> l & 1) ? bad : good, sizeof good);
            }
            counts(L, N, P, row[t], cnt[t]);
            eplb_incremental_params p = { .shape = s, .logical_load = load, .total_target = -1,
                                          .cost_intra_node = 1, .cost_cross_node = 4, .threads = 1 + (uint32_t)t,
                                          .initial_row = cases[k].initial ? initial : NULL };
            eplb_incremental_stats st;
            eplb_error err;
            cr_assert_eq(eplb_incremental_rebalance(&p, row[t], cnt[t], &st, &err), EPLB_EINVAL, "case %zu", k);
            snprintf(msg[t], sizeof msg[t], "%s", err.msg);
            cr_assert(strstr(msg[t], cases[k].want), "case %zu, threads %d: %s", k, t + 1, msg[t]);
            cr_assert_eq(st.threads_undone, t == 1, "case %zu: the two threads ran, then one", k);
        }
        cr_assert_str_eq(msg[0], msg[1]);
        cr_assert_arr_eq(row[0], row[1], sizeof row[0], "case %zu", k);
        cr_assert_arr_eq(cnt[0], cnt[1], sizeof cnt[0], "case %zu", k);
    }
}
