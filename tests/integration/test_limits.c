/* test_limits.c -- bounded cost over real gRPC: --max-models, --max-state-mib,
 * --max-message-bytes at registration, and RegisterModel answering without
 * the placement unless include_placement.  Each refusal leaves nothing
 * registered, even after a restart. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

/* RegisterModel of an L x N (+N redundant) MoE on ep_size 2; returns the
 * status, the response (parsed into a) in *resp when OK. */
static int register_moe(eplb_client *c, upb_Arena *a, const char *name, uint32_t L, uint32_t N, uint32_t window,
                        bool include_placement, eplb_v1_RegisterModelResponse **resp, char *msg, size_t msglen) {
    eplb_v1_RegisterModelRequest *r = harness_moe_request(a, name, L, N, 2 * N, 2);
    eplb_v1_ParallelConfig_set_window_size(eplb_v1_RegisterModelRequest_mutable_parallel(r, a), window);
    eplb_v1_RegisterModelRequest_set_include_placement(r, include_placement);
    size_t len, blen = 0;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len), *body = NULL;
    int st = harness_rpc(c, "RegisterModel", bytes, len, a, resp ? &body : NULL, &blen, msg, msglen);
    if (st == 0 && resp) {
        *resp = eplb_v1_RegisterModelResponse_parse(body, blen, a);
        cr_assert_not_null(*resp);
    }
    return st;
}

static int get_status(eplb_client *c, upb_Arena *a, const char *id) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    return harness_rpc(c, "GetPlacement", bytes, len, a, NULL, NULL, NULL, 0);
}

TestSuite(limits, .timeout = 300);

Test(limits, max_models_refuses_the_next_model_and_keeps_nothing_of_it) {
    eplbd_proc srv = { .extra = { "--max-models", "2" } };
    eplbd_tmpdir(&srv);
    eplbd_start(&srv);
    eplb_client *c = eplb_client_open(srv.addr);
    upb_Arena *a = upb_Arena_New();
    char msg[512];
    cr_assert_eq(register_moe(c, a, "a", 2, 4, 0, false, NULL, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(register_moe(c, a, "b", 2, 4, 0, false, NULL, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(register_moe(c, a, "c", 2, 4, 0, false, NULL, msg, sizeof msg), 8 /* RESOURCE_EXHAUSTED */);
    cr_assert_not_null(strstr(msg, "--max-models"), "%s", msg);
    /* The same registration again is idempotent at the limit. */
    cr_assert_eq(register_moe(c, a, "a", 2, 4, 0, false, NULL, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(get_status(c, a, "c"), 5 /* NOT_FOUND */);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_start(&srv);
    c = eplb_client_open(srv.addr);
    cr_assert_eq(get_status(c, a, "a"), 0);
    cr_assert_eq(get_status(c, a, "c"), 5);
    eplb_client_close(c);
    upb_Arena_Free(a);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_cleanup(&srv);
}

Test(limits, state_budget_and_response_size_refuse_oversized_shapes) {
    eplbd_proc srv = { .extra = { "--max-state-mib", "8", "--max-message-bytes", "1048576" } };
    eplbd_tmpdir(&srv);
    eplbd_start(&srv);
    eplb_client *c = eplb_client_open(srv.addr);
    upb_Arena *a = upb_Arena_New();
    char msg[512];
    /* 64 layers x 256 experts, 1000-pass window: ~250 MiB of window. */
    cr_assert_eq(register_moe(c, a, "deep", 64, 256, 0, false, NULL, msg, sizeof msg), 8);
    cr_assert_not_null(strstr(msg, "--max-state-mib"), "%s", msg);
    /* 1024 layers x 128 slots: a map of 128 Ki entries may take 1.3 MB. */
    cr_assert_eq(register_moe(c, a, "wide", 1024, 64, 1, false, NULL, msg, sizeof msg), 3);
    cr_assert_not_null(strstr(msg, "--max-message-bytes"), "%s", msg);
    cr_assert_eq(get_status(c, a, "deep"), 5);
    cr_assert_eq(get_status(c, a, "wide"), 5);
    cr_assert_eq(register_moe(c, a, "small", 4, 16, 10, false, NULL, msg, sizeof msg), 0, "%s", msg);
    eplb_client_close(c);
    upb_Arena_Free(a);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_cleanup(&srv);
}

Test(limits, register_returns_the_placement_only_when_asked) {
    eplbd_proc srv = { 0 };
    eplbd_tmpdir(&srv);
    eplbd_start(&srv);
    eplb_client *c = eplb_client_open(srv.addr);
    upb_Arena *a = upb_Arena_New();
    eplb_v1_RegisterModelResponse *resp = NULL;
    char msg[512];
    /* 1024 x 2048 slots: the placement is about 10 MB. */
    cr_assert_eq(register_moe(c, a, "big", 1024, 1024, 1, false, &resp, msg, sizeof msg), 0, "%s", msg);
    cr_assert(eplb_v1_RegisterModelResponse_registered(resp));
    cr_assert_not(eplb_v1_RegisterModelResponse_has_placement(resp));
    cr_assert_eq(eplb_v1_RegisterModelResponse_epoch(resp), 0);
    cr_assert_eq(eplb_v1_RegisterModelResponse_state(resp), eplb_v1_MOVE_STATE_IDLE);
    size_t len;
    cr_assert_not_null(eplb_v1_RegisterModelResponse_serialize(resp, a, &len));
    cr_assert_lt(len, 1024);
    cr_assert_eq(register_moe(c, a, "small", 2, 4, 0, true, &resp, msg, sizeof msg), 0, "%s", msg);
    cr_assert(eplb_v1_RegisterModelResponse_has_placement(resp));
    size_t n;
    eplb_v1_Placement_physical_to_logical(eplb_v1_RegisterModelResponse_placement(resp), &n);
    cr_assert_eq(n, 2 * 8);
    eplb_client_close(c);
    upb_Arena_Free(a);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_cleanup(&srv);
}
