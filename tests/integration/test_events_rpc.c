/* test_events_rpc.c -- the GPU-side ordering fields over real gRPC
 * (RebalanceRequest.wait_event, ContinueRebalanceRequest.wait_event,
 * RebalanceResponse.done_event; docs/api.md "Ordering with the engine's GPU
 * streams") where no GPU is needed: a wait event for shm weights (the cpu
 * backend has no device events) or for a model without weights is
 * INVALID_ARGUMENT and changes nothing -- placement, epoch, every slot's
 * bytes, a pending stepped rebalance; a handle of the wrong length likewise;
 * the same call without the event then moves, and its answer has no done
 * event.  Also AttachWeights' staging report (reserved once).  The device
 * path (hip/cuda) is gpu/tests/device_check.c's. */
#include "eplbd_harness.h"

#include <fcntl.h>
#include <sys/mman.h>

#include "eplb/v1/eplb.upb.h"

enum { L = 2, N = 12, P = 16, G = 8, S = P / G, T = 2 };
static const uint64_t tensor_bytes[T] = { 4096, 64 };
static const char *const tensor_names[T] = { "w13", "w13_scale" };
static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};

static eplbd_proc srv;
static eplb_client *client;
static char names[G][64];
static unsigned char *base[G];
static size_t region_size;

/* Rank g's object: layer-major, tensor-major, S slots of 4 KiB each. */
static uint64_t offset_of(int l, int t) { return ((uint64_t)l * T + (uint64_t)t) * S * 4096; }
static unsigned char *slot_bytes(int l, int t, int slot) {
    return base[slot / S] + offset_of(l, t) + (uint64_t)(slot % S) * 4096;
}
static unsigned char pattern(int l, int t, int e, uint64_t i) {
    return (unsigned char)(l * 31 + t * 7 + e * 13 + (int)(i % 251) + 1);
}

static int call(const char *method, const char *bytes, size_t len, eplb_call_result *r) {
    char path[128];
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(client, path, bytes, len, call_timeout_ms(), r), 0);
    return r->status;
}

static void start(void) {
    memset(&srv, 0, sizeof srv);
    srv.extra[0] = "--backend";
    srv.extra[1] = "cpu";
    eplbd_suite_start(&srv, &client);
}

static void stop(void) {
    for (int g = 0; g < G; g++)
        if (base[g]) {
            munmap(base[g], region_size);
            shm_unlink(names[g]);
            base[g] = NULL;
        }
    eplbd_suite_stop(&srv, client);
}

static void register_model(upb_Arena *a) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString("m"));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("ReadmeMoE"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, L);
    eplb_v1_MoeSpec_set_num_logical_experts(m, N);
    eplb_v1_MoeSpec_set_num_physical_experts(m, P);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, S);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, P - N);
    eplb_v1_MoeSpec_set_num_expert_groups(m, 4);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, G);
    eplb_v1_ParallelConfig_set_num_nodes(p, 2);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    eplb_call_result res;
    cr_assert_eq(call("RegisterModel", bytes, len, &res), 0, "%s", res.message);
    eplb_call_result_free(&res);
}

/* The current map and epoch (copied into the arena). */
static const int32_t *get_map(upb_Arena *a, uint64_t *epoch, bool *pending) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString("m"));
    size_t len, n;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0, "%s", r.message);
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    cr_assert_not_null(p);
    *epoch = eplb_v1_Placement_epoch(p);
    if (pending)
        *pending = eplb_v1_Placement_pending_rebalance_id(p).size > 0;
    const int32_t *map = eplb_v1_Placement_physical_to_logical(p, &n);
    cr_assert_eq(n, (size_t)L * P);
    return map;
}

/* Every slot holds the bytes of the expert map names. */
static void check_bytes(const int32_t *map) {
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            for (int t = 0; t < T; t++) {
                const unsigned char *q = slot_bytes(l, t, s);
                for (uint64_t i = 0; i < tensor_bytes[t]; i++)
                    cr_assert_eq(q[i], pattern(l, t, map[l * P + s], i), "layer %d slot %d tensor %d byte %llu",
                                 l, s, t, (unsigned long long)i);
            }
}

/* Register; with weights: create, fill for the initial map and attach. */
static const int32_t *setup(upb_Arena *a, bool weights) {
    register_model(a);
    uint64_t epoch;
    const int32_t *map = get_map(a, &epoch, NULL);
    if (!weights)
        return map;
    region_size = offset_of(L, 0);
    for (int g = 0; g < G; g++) {
        snprintf(names[g], sizeof names[g], "/eplb-evtest-%d-%d", (int)getpid(), g);
        shm_unlink(names[g]);
        int fd = shm_open(names[g], O_RDWR | O_CREAT | O_EXCL, 0600);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ftruncate(fd, (off_t)region_size), 0);
        base[g] = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        cr_assert_neq(base[g], MAP_FAILED);
    }
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            for (int t = 0; t < T; t++)
                for (uint64_t i = 0; i < tensor_bytes[t]; i++)
                    slot_bytes(l, t, s)[i] = pattern(l, t, map[l * P + s], i);
    eplb_v1_AttachWeightsRequest *r = eplb_v1_AttachWeightsRequest_new(a);
    eplb_v1_AttachWeightsRequest_set_model_id(r, upb_StringView_FromString("m"));
    eplb_v1_AttachWeightsRequest_set_kind(r, eplb_v1_BUFFER_KIND_SHM);
    for (int g = 0; g < G; g++)
        eplb_v1_RankBuffer_set_shm_name(eplb_v1_AttachWeightsRequest_add_ranks(r, a),
                                        upb_StringView_FromString(names[g]));
    for (int l = 0; l < L; l++) {
        eplb_v1_LayerWeights *lw = eplb_v1_AttachWeightsRequest_add_layers(r, a);
        for (int t = 0; t < T; t++) {
            eplb_v1_ExpertTensor *et = eplb_v1_LayerWeights_add_tensors(lw, a);
            eplb_v1_ExpertTensor_set_name(et, upb_StringView_FromString(tensor_names[t]));
            eplb_v1_ExpertTensor_set_bytes_per_expert(et, tensor_bytes[t]);
            for (int g = 0; g < G; g++) {
                eplb_v1_TensorLayout *tl = eplb_v1_ExpertTensor_add_ranks(et, a);
                eplb_v1_TensorLayout_set_offset(tl, offset_of(l, t));
                eplb_v1_TensorLayout_set_stride(tl, 4096);
            }
        }
    }
    size_t len;
    char *bytes = eplb_v1_AttachWeightsRequest_serialize(r, a, &len);
    eplb_call_result res;
    cr_assert_eq(call("AttachWeights", bytes, len, &res), 0, "%s", res.message);
    /* Staging reserved once at attach: every held rank's S entries, each
     * the layer's tensors padded to 64 bytes, in one host buffer (cpu). */
    eplb_v1_AttachWeightsResponse *ar = eplb_v1_AttachWeightsResponse_parse(res.body, res.body_len, a);
    cr_assert_not_null(ar);
    cr_assert_eq(eplb_v1_AttachWeightsResponse_staging_bytes(ar), (uint64_t)G * S * (4096 + 64));
    cr_assert_eq(eplb_v1_AttachWeightsResponse_staging_bytes_per_gpu(ar), 0);
    eplb_call_result_free(&res);
    return map;
}

/* Rebalance with the README load; ev_len bytes of wait event (0: none).
 * The response's done_event size goes to *done_len (OK only). */
static int rebalance(upb_Arena *a, size_t ev_len, uint32_t layers_per_step, char *rid, size_t *done_len,
                     char *msg, size_t msglen) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_RebalanceRequest_set_slot_order(req, eplb_v1_SLOT_ORDER_ALGORITHM);
    eplb_v1_RebalanceRequest_set_layers_per_step(req, layers_per_step);
    int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(req, L * P, a);
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            load[l * P + s] = s < N ? readme_load[l][s] : 0;
    static char ev[96];
    memset(ev, 0x5a, sizeof ev);
    if (ev_len)
        eplb_v1_RebalanceRequest_set_wait_event(req, upb_StringView_FromDataAndSize(ev, ev_len));
    size_t len;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    eplb_call_result r;
    int st = call("Rebalance", bytes, len, &r);
    snprintf(msg, msglen, "%s", r.message);
    if (st == 0) {
        eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_parse(r.body, r.body_len, a);
        cr_assert_not_null(resp);
        *done_len = eplb_v1_RebalanceResponse_done_event(resp).size;
        if (rid) {
            upb_StringView id = eplb_v1_RebalanceResponse_rebalance_id(resp);
            snprintf(rid, 32, "%.*s", (int)id.size, id.data);
        }
    }
    eplb_call_result_free(&r);
    return st;
}

static int continue_rebalance(upb_Arena *a, const char *rid, size_t ev_len, size_t *done_len, char *msg,
                              size_t msglen) {
    eplb_v1_ContinueRebalanceRequest *req = eplb_v1_ContinueRebalanceRequest_new(a);
    eplb_v1_ContinueRebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_ContinueRebalanceRequest_set_rebalance_id(req, upb_StringView_FromString(rid));
    static char ev[64];
    memset(ev, 0x33, sizeof ev);
    if (ev_len)
        eplb_v1_ContinueRebalanceRequest_set_wait_event(req, upb_StringView_FromDataAndSize(ev, ev_len));
    size_t len;
    char *bytes = eplb_v1_ContinueRebalanceRequest_serialize(req, a, &len);
    eplb_call_result r;
    int st = call("ContinueRebalance", bytes, len, &r);
    snprintf(msg, msglen, "%s", r.message);
    if (st == 0) {
        eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_parse(r.body, r.body_len, a);
        cr_assert_not_null(resp);
        *done_len = eplb_v1_RebalanceResponse_done_event(resp).size;
    }
    eplb_call_result_free(&r);
    return st;
}

Test(events_rpc, wait_event_on_shm_weights_is_invalid_and_changes_nothing, .timeout = 300) {
    start();
    upb_Arena *a = upb_Arena_New();
    const int32_t *map0 = setup(a, true);
    char msg[512];
    size_t done_len = 99;
    cr_assert_eq(rebalance(a, 64, 0, NULL, &done_len, msg, sizeof msg), 3 /* INVALID_ARGUMENT */, "%s", msg);
    cr_assert(strstr(msg, "events need a device backend"), "%s", msg);
    cr_assert_eq(rebalance(a, 63, 0, NULL, &done_len, msg, sizeof msg), 3, "%s", msg);
    cr_assert(strstr(msg, "63 bytes, want 64"), "%s", msg);
    uint64_t epoch;
    const int32_t *now = get_map(a, &epoch, NULL);
    cr_assert_eq(epoch, 0);
    cr_assert_arr_eq(now, map0, sizeof(int32_t) * L * P);
    check_bytes(map0);
    /* Without the event the same call moves; no done event for shm. */
    cr_assert_eq(rebalance(a, 0, 0, NULL, &done_len, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(done_len, 0);
    now = get_map(a, &epoch, NULL);
    cr_assert_eq(epoch, 1);
    cr_assert(memcmp(now, map0, sizeof(int32_t) * L * P) != 0, "the README load moves experts");
    check_bytes(now);
    upb_Arena_Free(a);
    stop();
}

Test(events_rpc, wait_event_on_a_step_is_invalid_and_the_rebalance_stays_pending, .timeout = 300) {
    start();
    upb_Arena *a = upb_Arena_New();
    setup(a, true);
    char msg[512], rid[32] = "";
    size_t done_len = 99;
    cr_assert_eq(rebalance(a, 0, 1, rid, &done_len, msg, sizeof msg), 0, "%s", msg);
    uint64_t epoch;
    bool pending = false;
    const int32_t *step1 = get_map(a, &epoch, &pending);
    cr_assert(pending, "the README load changes both layers: two steps");
    cr_assert_eq(epoch, 1);
    cr_assert_eq(continue_rebalance(a, rid, 64, &done_len, msg, sizeof msg), 3, "%s", msg);
    cr_assert(strstr(msg, "events need a device backend"), "%s", msg);
    const int32_t *now = get_map(a, &epoch, &pending);
    cr_assert(pending);
    cr_assert_eq(epoch, 1);
    cr_assert_arr_eq(now, step1, sizeof(int32_t) * L * P);
    check_bytes(now);
    cr_assert_eq(continue_rebalance(a, rid, 0, &done_len, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(done_len, 0);
    now = get_map(a, &epoch, &pending);
    cr_assert(!pending);
    cr_assert_eq(epoch, 2);
    check_bytes(now);
    upb_Arena_Free(a);
    stop();
}

Test(events_rpc, wait_event_without_weights_is_invalid, .timeout = 300) {
    start();
    upb_Arena *a = upb_Arena_New();
    const int32_t *map0 = setup(a, false);
    char msg[512];
    size_t done_len = 99;
    cr_assert_eq(rebalance(a, 64, 0, NULL, &done_len, msg, sizeof msg), 3, "%s", msg);
    cr_assert(strstr(msg, "no weights attached"), "%s", msg);
    uint64_t epoch;
    const int32_t *now = get_map(a, &epoch, NULL);
    cr_assert_eq(epoch, 0);
    cr_assert_arr_eq(now, map0, sizeof(int32_t) * L * P);
    cr_assert_eq(rebalance(a, 0, 0, NULL, &done_len, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(done_len, 0);
    upb_Arena_Free(a);
    stop();
}
