/* test_packed.c -- rpc_packed_split against upb: the loads it decodes and
 * the rest it leaves to upb give the same request upb parses from the whole
 * message, on random requests and on random and mutated bytes; whatever it
 * declines upb still parses (the fallback). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "rpc_packed.h"

static uint64_t st = 0x2545F4914F6CDD1Dull;
static uint64_t rnd(void) {
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    return st;
}

static int64_t random_value(void) {
    switch (rnd() % 6) {
    case 0: return 0;
    case 1: return (int64_t)(rnd() % 128);
    case 2: return (int64_t)(rnd() % 1000000);
    case 3: return (int64_t)(rnd() >> 1);          /* up to 63 bits: 9-byte varints */
    case 4: return -(int64_t)(rnd() % 1000) - 1;   /* negative: 10 bytes, the fallback */
    default: return (int64_t)(rnd() >> (rnd() % 64));
    }
}

static const uint32_t fields[2] = { 2, 11 };

/* Both ways of reading bytes agree: split + parse(rest) vs parse(all). */
static void check_same(const char *bytes, size_t len, bool must_split) {
    upb_Arena *a = upb_Arena_New();
    int64_t *v[2];
    size_t n[2];
    char *rest;
    size_t rest_len;
    bool split = rpc_packed_split(bytes, len, fields, 2, a, &rest, &rest_len, v, n);
    const eplb_v1_RebalanceRequest *whole = eplb_v1_RebalanceRequest_parse(bytes, len, a);
    if (must_split)
        cr_assert(split, "a well-formed request without negative loads was declined");
    if (split) {
        const eplb_v1_RebalanceRequest *m = eplb_v1_RebalanceRequest_parse(rest, rest_len, a);
        cr_assert_eq(m != NULL, whole != NULL, "split parse %d, whole parse %d", m != NULL, whole != NULL);
        if (m && whole) {
            size_t np, nl;
            const int64_t *pl = eplb_v1_RebalanceRequest_physical_load(whole, &np);
            const int64_t *ll = eplb_v1_RebalanceRequest_logical_load(whole, &nl);
            cr_assert_eq(n[0], np);
            cr_assert_eq(n[1], nl);
            if (np)
                cr_assert_arr_eq(v[0], pl, np * sizeof *pl);
            if (nl)
                cr_assert_arr_eq(v[1], ll, nl * sizeof *ll);
            /* The other fields: the same as upb's when re-encoded without the loads. */
            eplb_v1_RebalanceRequest *w2 = eplb_v1_RebalanceRequest_parse(bytes, len, a);
            eplb_v1_RebalanceRequest_resize_physical_load(w2, 0, a);
            eplb_v1_RebalanceRequest_resize_logical_load(w2, 0, a);
            size_t l1, l2;
            char *b1 = eplb_v1_RebalanceRequest_serialize(m, a, &l1);
            char *b2 = eplb_v1_RebalanceRequest_serialize(w2, a, &l2);
            cr_assert_eq(l1, l2);
            cr_assert(l1 == 0 || memcmp(b1, b2, l1) == 0, "the other fields differ");
        }
    }
    upb_Arena_Free(a);
}

static char *random_request(upb_Arena *a, size_t *len, bool *negative) {
    eplb_v1_RebalanceRequest *r = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(r, upb_StringView_FromString(rnd() % 2 ? "m" : "model-x"));
    *negative = false;
    for (int f = 0; f < 2; f++) {
        size_t n = rnd() % 3 == 0 ? 0 : rnd() % 400;
        int64_t *dst = n ? (f ? eplb_v1_RebalanceRequest_resize_logical_load(r, n, a)
                              : eplb_v1_RebalanceRequest_resize_physical_load(r, n, a))
                         : NULL;
        for (size_t i = 0; i < n; i++) {
            dst[i] = rnd() % 50 ? random_value() : (int64_t)(rnd() % 100);
            *negative = *negative || dst[i] < 0;
        }
    }
    if (rnd() % 2)
        eplb_v1_RebalanceRequest_set_num_gpus(r, (uint32_t)rnd());
    if (rnd() % 2)
        eplb_v1_RebalanceRequest_set_expected_epoch(r, rnd());
    if (rnd() % 2)
        eplb_v1_RebalanceRequest_set_target_balancedness(r, (double)(rnd() % 1000) / 1000);
    if (rnd() % 2)
        eplb_v1_RebalanceRequest_set_wait_event(r, upb_StringView_FromDataAndSize("\x01\x02\x03", 3));
    if (rnd() % 2) {
        eplb_v1_LinkCosts *c = eplb_v1_RebalanceRequest_mutable_link_costs(r, a);
        eplb_v1_LinkCosts_set_cross_node(c, 3.5);
    }
    eplb_v1_RebalanceRequest_set_dry_run(r, rnd() % 2);
    return eplb_v1_RebalanceRequest_serialize(r, a, len);
}

Test(packed, random_requests_read_the_same) {
    for (int it = 0; it < 3000; it++) {
        upb_Arena *a = upb_Arena_New();
        size_t len;
        bool negative;
        char *bytes = random_request(a, &len, &negative);
        cr_assert_not_null(bytes);
        check_same(bytes, len, !negative);
        upb_Arena_Free(a);
    }
}

Test(packed, loads_split_over_several_fields_and_out_of_order) {
    /* physical_load twice (packed chunks concatenate), logical_load first,
     * model_id between them. */
    const char msg[] = { 0x5a, 0x02, 0x05, 0x06,       /* 11: [5, 6] */
                         0x12, 0x03, 0x01, (char)0x80, 0x01, /* 2: [1, 128] */
                         0x0a, 0x01, 'm',              /* 1: "m" */
                         0x12, 0x01, 0x07 };           /* 2: [7] */
    check_same(msg, sizeof msg, true);
    upb_Arena *a = upb_Arena_New();
    int64_t *v[2];
    size_t n[2];
    char *rest;
    size_t rest_len;
    cr_assert(rpc_packed_split(msg, sizeof msg, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_eq(n[0], 3);
    cr_assert_eq(v[0][0], 1);
    cr_assert_eq(v[0][1], 128);
    cr_assert_eq(v[0][2], 7);
    cr_assert_eq(n[1], 2);
    cr_assert_eq(rest_len, 3);
    upb_Arena_Free(a);
}

Test(packed, declines_what_it_does_not_expect) {
    upb_Arena *a = upb_Arena_New();
    int64_t *v[2];
    size_t n[2];
    char *rest;
    size_t rest_len;
    const char unpacked[] = { 0x10, 0x05 };             /* field 2 as a plain varint */
    const char cut[] = { 0x12, 0x02, 0x01, (char)0x80 }; /* the last value cut off */
    const char trunc[] = { 0x12, 0x05, 0x01 };          /* length past the end */
    const char group[] = { 0x1b };                     /* a group start */
    cr_assert_not(rpc_packed_split(unpacked, sizeof unpacked, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_not(rpc_packed_split(cut, sizeof cut, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_not(rpc_packed_split(trunc, sizeof trunc, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_not(rpc_packed_split(group, sizeof group, fields, 2, a, &rest, &rest_len, v, n));
    /* An empty chunk of a load (found by fuzz_rebalance: no array to index). */
    const char empty_chunk[] = { 0x12, 0x00, 0x0a, 0x01, 'm' };
    cr_assert(rpc_packed_split(empty_chunk, sizeof empty_chunk, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_eq(n[0], 0);
    cr_assert_eq(rest_len, 3);
    /* And an empty message is an empty request. */
    cr_assert(rpc_packed_split("", 0, fields, 2, a, &rest, &rest_len, v, n));
    cr_assert_eq(n[0] + n[1] + rest_len, 0);
    upb_Arena_Free(a);
}

/* Random bytes and mutated requests: never a different answer than upb's. */
Test(packed, hostile_bytes_never_read_differently) {
    for (int it = 0; it < 20000; it++) {
        upb_Arena *a = upb_Arena_New();
        size_t len;
        bool negative;
        char *bytes = random_request(a, &len, &negative);
        char *copy = malloc(len + 8);
        memcpy(copy, bytes, len);
        size_t flips = 1 + rnd() % 4;
        for (size_t k = 0; k < flips && len; k++)
            copy[rnd() % len] = (char)rnd();
        size_t l2 = rnd() % 4 == 0 && len ? rnd() % len : len; /* sometimes truncated */
        check_same(copy, l2, false);
        free(copy);
        upb_Arena_Free(a);
    }
}
