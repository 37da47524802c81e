/* test_load.c -- logical load from physical load, and the load window. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <string.h>

#include "eplb_load.h"

Test(load, physical_to_logical_sums_valid_slots_only) {
    /* 1 layer, N=3, P=5, last slot is new (not valid yet), slot 2 empty. */
    const int32_t phy2log[] = { 0, 1, -1, 0, 2 };
    const int64_t phys[] = { 10, 20, 30, 5, 1000 };
    int64_t logical[3];
    cr_assert_eq(eplb_load_to_logical(1, 3, 5, 4, phy2log, phys, logical, NULL), EPLB_OK);
    const int64_t want[] = { 15, 20, 0 };
    cr_assert_arr_eq(logical, want, sizeof want);
}

Test(load, negative_and_overflowing_loads_are_refused) {
    const int32_t phy2log[] = { 0, 0 };
    const int64_t neg[] = { 1, -1 };
    const int64_t big[] = { INT64_MAX, 1 };
    int64_t logical[1];
    eplb_error err;
    cr_assert_eq(eplb_load_to_logical(1, 1, 2, 2, phy2log, neg, logical, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "physical_load[layer 0][slot 1] = -1 is negative");
    cr_assert_eq(eplb_load_to_logical(1, 1, 2, 2, phy2log, big, logical, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "overflows"));
}

Test(load, window_keeps_the_last_capacity_records) {
    eplb_load_window w;
    eplb_load_window_init(&w, 1, 2, 3);
    for (int64_t i = 1; i <= 5; i++) {
        int64_t rec[2] = { i, 10 * i };
        cr_assert_eq(eplb_load_window_push(&w, rec, NULL), EPLB_OK);
    }
    cr_assert_eq(w.count, 3);
    cr_assert_eq(w.passes, 5);
    cr_assert_eq(w.sum[0], 3 + 4 + 5);
    cr_assert_eq(w.sum[1], 30 + 40 + 50);
    int64_t out[6];
    eplb_load_window_export(&w, out);
    const int64_t want[] = { 3, 30, 4, 40, 5, 50 };
    cr_assert_arr_eq(out, want, sizeof want);

    /* Import into a smaller window keeps the newest records. */
    eplb_load_window small;
    eplb_load_window_init(&small, 1, 2, 2);
    cr_assert_eq(eplb_load_window_import(&small, out, 3, 5, NULL), EPLB_OK);
    cr_assert_eq(small.count, 2);
    cr_assert_eq(small.sum[0], 9);
    cr_assert_eq(small.passes, 5);
    cr_assert_not(small.dirty);
    eplb_load_window_free(&small);
    eplb_load_window_free(&w);
}

Test(load, window_matches_brute_force_sum) {
    /* Random records: the running sum equals a recomputation over the last
     * `capacity` records at every step. */
    enum { L = 2, N = 3, CAP = 7, STEPS = 50 };
    eplb_load_window w;
    eplb_load_window_init(&w, L, N, CAP);
    static int64_t all[STEPS][L * N];
    uint64_t seed = 12345;
    for (int s = 0; s < STEPS; s++) {
        for (int i = 0; i < L * N; i++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            all[s][i] = (int64_t)(seed >> 40);
        }
        cr_assert_eq(eplb_load_window_push(&w, all[s], NULL), EPLB_OK);
        for (int i = 0; i < L * N; i++) {
            int64_t want = 0;
            for (int k = s; k >= 0 && k > s - CAP; k--)
                want += all[k][i];
            cr_assert_eq(w.sum[i], want, "step %d cell %d", s, i);
        }
    }
    eplb_load_window_free(&w);
}
