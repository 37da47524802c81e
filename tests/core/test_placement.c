/* test_placement.c -- initial placement and the rebuild of log2phy/logcnt
 * (examples from eplb-semantics), and assignment validation. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_placement.h"

Test(placement, initial_map_examples) {
    eplb_placement p;
    cr_assert_eq(eplb_placement_init(&p, 2, 4, 6, NULL), EPLB_OK);
    const int32_t want6[] = { 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(p.phy2log, want6, sizeof want6);
    cr_assert_eq(p.epoch, 0);
    cr_assert_eq(p.num_valid_physical, 6);
    cr_assert_eq(p.max_replicas, 2);
    const int32_t cnt6[] = { 2, 2, 1, 1, 2, 2, 1, 1 };
    cr_assert_arr_eq(p.logcnt, cnt6, sizeof cnt6);
    eplb_placement_free(&p);

    cr_assert_eq(eplb_placement_init(&p, 1, 4, 10, NULL), EPLB_OK);
    const int32_t want10[] = { 0, 1, 2, 3, 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(p.phy2log, want10, sizeof want10);
    cr_assert_eq(p.max_replicas, 3);
    const int32_t l2p[] = { 0, 4, 8, 1, 5, 9, 2, 6, -1, 3, 7, -1 };
    cr_assert_arr_eq(p.log2phy, l2p, sizeof l2p);
    eplb_placement_free(&p);
}

Test(placement, rebuild_matches_vllm_docstring) {
    const int32_t phy2log[] = { 0, 1, 2, 3, 0, 1, 0, 2, 0, 1, 0, 3 };
    int32_t logcnt[8], log2phy[8 * 3];
    cr_assert_eq(eplb_placement_max_replicas(2, 4, 6, phy2log), 3);
    eplb_placement_rebuild(2, 4, 6, 3, phy2log, logcnt, log2phy);
    const int32_t want_l2p[] = { 0, 4, -1, 1, 5, -1, 2, -1, -1, 3, -1, -1,
                                 0, 2, 4, 3, -1, -1, 1, -1, -1, 5, -1, -1 };
    const int32_t want_cnt[] = { 2, 2, 1, 1, 3, 1, 1, 1 };
    cr_assert_arr_eq(log2phy, want_l2p, sizeof want_l2p);
    cr_assert_arr_eq(logcnt, want_cnt, sizeof want_cnt);
}

Test(placement, rebuild_skips_empty_slots) {
    const int32_t phy2log[] = { 0, 1, -1, 1, -1, 0 };
    int32_t logcnt[2], log2phy[2 * 2];
    eplb_placement_rebuild(1, 2, 6, 2, phy2log, logcnt, log2phy);
    const int32_t want_l2p[] = { 0, 5, 1, 3 };
    const int32_t want_cnt[] = { 2, 2 };
    cr_assert_arr_eq(log2phy, want_l2p, sizeof want_l2p);
    cr_assert_arr_eq(logcnt, want_cnt, sizeof want_cnt);
}

Test(placement, assign_expanded_map_keeps_epoch_and_valid_count) {
    eplb_placement p;
    cr_assert_eq(eplb_placement_init(&p, 1, 4, 6, NULL), EPLB_OK);
    p.epoch = 7;
    const int32_t expanded[] = { 0, 1, 2, 3, 0, 1, -1, -1, -1 };
    cr_assert_eq(eplb_placement_assign(&p, 9, 6, expanded, NULL), EPLB_OK);
    cr_assert_eq(p.num_physical, 9);
    cr_assert_eq(p.num_valid_physical, 6);
    cr_assert_eq(p.epoch, 7);
    cr_assert_arr_eq(p.phy2log, expanded, sizeof expanded);
    eplb_placement_free(&p);
}

Test(placement, assign_rejects_bad_maps_and_changes_nothing) {
    eplb_placement p;
    eplb_error err;
    cr_assert_eq(eplb_placement_init(&p, 1, 4, 6, NULL), EPLB_OK);
    const int32_t out_of_range[] = { 0, 1, 2, 3, 4, 1 };
    cr_assert_eq(eplb_placement_assign(&p, 6, 6, out_of_range, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "[layer 0][slot 4] = 4"), "%s", err.msg);
    const int32_t missing[] = { 0, 1, 2, 0, 1, -1 };
    cr_assert_eq(eplb_placement_assign(&p, 6, 6, missing, &err), EPLB_EINVAL);
    cr_assert_str_eq(err.msg, "logical expert 3 has no replica in layer 0");
    cr_assert_eq(eplb_placement_assign(&p, 6, 7, missing, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_placement_assign(&p, 3, 3, missing, &err), EPLB_EINVAL);
    const int32_t initial[] = { 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(p.phy2log, initial, sizeof initial);
    cr_assert_eq(p.num_physical, 6);
    eplb_placement_free(&p);
}

Test(placement, copy_is_deep) {
    eplb_placement a, b;
    cr_assert_eq(eplb_placement_init(&a, 3, 8, 10, NULL), EPLB_OK);
    a.epoch = 3;
    cr_assert_eq(eplb_placement_copy(&b, &a, NULL), EPLB_OK);
    cr_assert_neq(a.phy2log, b.phy2log);
    cr_assert_arr_eq(a.phy2log, b.phy2log, 30 * sizeof(int32_t));
    cr_assert_arr_eq(a.log2phy, b.log2phy, 3 * 8 * a.max_replicas * sizeof(int32_t));
    cr_assert_eq(b.epoch, 3);
    eplb_placement_free(&a);
    eplb_placement_free(&b);
}

Test(placement, a_map_whose_log2phy_would_explode_is_refused) {
    /* 1024 layers x 4096 experts; every layer gives expert 0 the 4096 extra
     * slots: log2phy would be 1024 x 4096 x 4097 entries (68 GB). */
    enum { LL = 1024, NN = 4096, PP = 8192 };
    eplb_placement p = { .num_layers = LL, .num_logical = NN };
    int32_t *map = malloc((size_t)LL * PP * sizeof *map);
    cr_assert_not_null(map);
    for (size_t l = 0; l < LL; l++)
        for (size_t s = 0; s < PP; s++)
            map[l * PP + s] = s < NN ? (int32_t)s : 0;
    eplb_error err;
    cr_assert_eq(eplb_placement_assign(&p, PP, PP, map, &err), EPLB_EINVAL);
    cr_assert_not_null(strstr(err.msg, "an expert has 4097 replicas"), "%s", err.msg);
    cr_assert_null(p.phy2log);
    free(map);
}
