/* test_placement_encoding.c -- rpc_placement_to_upb writes the big maps with
 * its own packed-varint encoder (rpc_convert.c); against upb's own encoding
 * of the same fields on 3000 random placements (negative and huge values,
 * empty maps): both parse to the same fields, the same size, and the
 * canonical re-encoding is byte-identical. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "rpc_convert.h"

static uint64_t st = 88172645463325252ull;
static uint32_t rnd(uint32_t n) { st ^= st << 13; st ^= st >> 7; st ^= st << 17; return (uint32_t)(st % n); }

static eplb_v1_Placement *old_way(const eplb_placement *p, bool l2p, upb_Arena *a) {
    eplb_v1_Placement *m = eplb_v1_Placement_new(a);
    eplb_v1_Placement_set_model_id(m, upb_StringView_FromString("m"));
    eplb_v1_Placement_set_epoch(m, p->epoch);
    eplb_v1_Placement_set_num_layers(m, p->num_layers);
    eplb_v1_Placement_set_num_physical_experts(m, p->num_physical);
    eplb_v1_Placement_set_num_logical_experts(m, p->num_logical);
    eplb_v1_Placement_set_num_valid_physical_experts(m, p->num_valid_physical);
    eplb_v1_Placement_set_max_replicas(m, p->max_replicas);
    size_t n1 = (size_t)p->num_layers * p->num_physical, n2 = (size_t)p->num_layers * p->num_logical;
    if (n1) memcpy(eplb_v1_Placement_resize_physical_to_logical(m, n1, a), p->phy2log, n1 * 4);
    if (n2) memcpy(eplb_v1_Placement_resize_logical_replica_count(m, n2, a), p->logcnt, n2 * 4);
    if (l2p && n2 && p->max_replicas)
        memcpy(eplb_v1_Placement_resize_logical_to_physical(m, n2 * p->max_replicas, a), p->log2phy, n2 * p->max_replicas * 4);
    return m;
}

static int same_arr(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || memcmp(a, b, na * 4) == 0);
}

Test(placement_encoding, same_message_as_upb) {
    for (int it = 0; it < 3000; it++) {
        eplb_placement p = {0};
        p.num_layers = rnd(4);
        p.num_logical = 1 + rnd(it % 10 == 0 ? 3000 : 40);
        p.num_physical = p.num_logical + rnd(50);
        p.num_valid_physical = p.num_physical;
        p.max_replicas = 1 + rnd(4);
        p.epoch = rnd(5) ? rnd(100) : 0;
        size_t n1 = (size_t)p.num_layers * p.num_physical, n2 = (size_t)p.num_layers * p.num_logical;
        size_t n3 = n2 * p.max_replicas;
        p.phy2log = malloc(n1 * 4 + 4); p.logcnt = malloc(n2 * 4 + 4); p.log2phy = malloc(n3 * 4 + 4);
        int kind = rnd(4);
        for (size_t i = 0; i < n1; i++) {
            uint32_t u = rnd(20);
            p.phy2log[i] = kind == 3 ? (int32_t)(uint32_t)(st >> 7) : u == 0 ? -1 : u == 1 ? (int32_t)rnd(1u << 30) : (int32_t)rnd(p.num_logical);
        }
        for (size_t i = 0; i < n2; i++) p.logcnt[i] = kind == 2 ? -(int32_t)rnd(1u << 31) : (int32_t)rnd(kind ? 20000 : 5);
        for (size_t i = 0; i < n3; i++) p.log2phy[i] = rnd(3) == 0 ? -1 : kind == 3 ? (int32_t)(uint32_t)(st >> 3) : (int32_t)rnd(p.num_physical);
        bool l2p = rnd(2);
        upb_Arena *a = upb_Arena_New();
        eplb_v1_Placement *x = rpc_placement_to_upb("m", &p, EPLB_MOVE_IDLE, NULL, l2p, a);
        eplb_v1_Placement *y = old_way(&p, l2p, a);
        size_t lx, ly;
        char *bx = eplb_v1_Placement_serialize(x, a, &lx), *by = eplb_v1_Placement_serialize(y, a, &ly);
        if (!bx || !by || lx != ly) cr_assert_fail("iter %d: sizes %zu vs %zu", it, lx, ly);
        const eplb_v1_Placement *px = eplb_v1_Placement_parse(bx, lx, a), *py = eplb_v1_Placement_parse(by, ly, a);
        size_t na, nb;
        const int32_t *ea, *eb;
        ea = eplb_v1_Placement_physical_to_logical(px, &na); eb = eplb_v1_Placement_physical_to_logical(py, &nb);
        if (!same_arr(ea, na, eb, nb) || !same_arr(ea, na, p.phy2log, n1)) cr_assert_fail("iter %d: p2l", it);
        ea = eplb_v1_Placement_logical_replica_count(px, &na); eb = eplb_v1_Placement_logical_replica_count(py, &nb);
        if (!same_arr(ea, na, eb, nb) || !same_arr(ea, na, p.logcnt, n2)) cr_assert_fail("iter %d: cnt", it);
        ea = eplb_v1_Placement_logical_to_physical(px, &na); eb = eplb_v1_Placement_logical_to_physical(py, &nb);
        if (!same_arr(ea, na, eb, nb) || !same_arr(ea, na, p.log2phy, l2p ? n3 : 0)) cr_assert_fail("iter %d: l2p", it);
        if (eplb_v1_Placement_epoch(px) != p.epoch || eplb_v1_Placement_num_layers(px) != p.num_layers ||
            eplb_v1_Placement_max_replicas(px) != p.max_replicas) cr_assert_fail("iter %d: scalars", it);
        /* the same bytes as a multiset of fields: re-serialized parse of x equals y's bytes */
        size_t lz; char *bz = eplb_v1_Placement_serialize(px, a, &lz);
        if (lz != ly || memcmp(bz, by, ly) != 0) cr_assert_fail("iter %d: re-encoded bytes differ", it);
        upb_Arena_Free(a);
        free(p.phy2log); free(p.logcnt); free(p.log2phy);
    }
}
