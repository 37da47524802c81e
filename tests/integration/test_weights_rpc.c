/* test_weights_rpc.c -- moving expert weights over real gRPC with the CPU
 * backend: this test process owns POSIX shm buffers whose bytes encode
 * (layer, tensor, logical expert) per slot, attaches them, rebalances, and
 * checks every slot's bytes; elastic scale-up; injected copy failures;
 * buffers truncated under the server (DATA_LOSS, the server stays up); a
 * buffer unlinked and recreated under the server (DATA_LOSS, NEEDS_RELOAD);
 * hard-linked ranks refused; the trust boundary of AttachWeights (prefix,
 * owner, symlink, FIFO, peer) and the peer rule of DetachWeights. */
#include "eplbd_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/mman.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_plan.h"
#include "grpc/health/v1/health.upb.h"

enum { L = 2, N = 12, P = 16, G = 8, T = 3, MAXG = 12 };
static const uint64_t tensor_bytes[T] = { 4096, 2048, 64 }; /* w13, w2, w13_scale */
static const char *const tensor_names[T] = { "w13", "w2", "w13_scale" };

static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};

static eplbd_proc srv;
static eplb_client *client;

/* The engine's buffers: one shm object per rank, layer-major, tensor-major,
 * slot-major, each slot padded to a 4 KiB-aligned stride. */
typedef struct buffers {
    uint32_t ranks, slots_per_rank;
    char names[MAXG][64];
    unsigned char *base[MAXG];
    size_t size;
} buffers;
static buffers buf;

static uint64_t stride_of(int t) { return (tensor_bytes[t] + 4095) / 4096 * 4096; }

static uint64_t offset_of(int l, int t, uint32_t slots) {
    uint64_t off = 0;
    for (int ll = 0; ll <= l; ll++)
        for (int tt = 0; tt < T; tt++) {
            if (ll == l && tt == t)
                return off;
            off += stride_of(tt) * slots;
        }
    return off;
}

static unsigned char pattern(int l, int t, int e, uint64_t i) {
    return (unsigned char)(l * 31 + t * 7 + e * 13 + (int)(i % 251) + 1);
}

static unsigned char *slot_bytes(int l, int t, uint32_t slot) {
    uint32_t r = slot / buf.slots_per_rank, i = slot % buf.slots_per_rank;
    return buf.base[r] + offset_of(l, t, buf.slots_per_rank) + stride_of(t) * i;
}

static void fill_slot(int l, uint32_t slot, int expert, unsigned char flip) {
    for (int t = 0; t < T; t++) {
        unsigned char *p = slot_bytes(l, t, slot);
        for (uint64_t i = 0; i < tensor_bytes[t]; i++)
            p[i] = expert < 0 ? 0 : (unsigned char)(pattern(l, t, expert, i) ^ flip);
    }
}

/* 0 when slot holds expert (with the given flip) in every tensor. */
static int slot_check(int l, uint32_t slot, int expert, unsigned char flip) {
    for (int t = 0; t < T; t++) {
        const unsigned char *p = slot_bytes(l, t, slot);
        for (uint64_t i = 0; i < tensor_bytes[t]; i++)
            if (p[i] != (unsigned char)(pattern(l, t, expert, i) ^ flip))
                return -1;
    }
    return 0;
}

static void buffers_create(uint32_t ranks, uint32_t slots_per_rank) {
    buf.ranks = ranks;
    buf.slots_per_rank = slots_per_rank;
    buf.size = offset_of(L - 1, T - 1, slots_per_rank) + stride_of(T - 1) * slots_per_rank;
    for (uint32_t r = 0; r < ranks; r++) {
        snprintf(buf.names[r], sizeof buf.names[r], "/eplb-test-%d-%u", (int)getpid(), r);
        shm_unlink(buf.names[r]);
        int fd = shm_open(buf.names[r], O_RDWR | O_CREAT | O_EXCL, 0600);
        cr_assert_geq(fd, 0, "shm_open %s", buf.names[r]);
        cr_assert_eq(ftruncate(fd, (off_t)buf.size), 0);
        buf.base[r] = mmap(NULL, buf.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        cr_assert_neq(buf.base[r], MAP_FAILED);
    }
}

static void buffers_destroy(void) {
    for (uint32_t r = 0; r < buf.ranks; r++) {
        munmap(buf.base[r], buf.size);
        shm_unlink(buf.names[r]);
    }
    memset(&buf, 0, sizeof buf);
}

/* ---- RPC helpers ------------------------------------------------------------ */

static int call(const char *method, const char *bytes, size_t len, eplb_call_result *r) {
    char path[128];
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(client, path, bytes, len, call_timeout_ms(), r), 0);
    return r->status;
}

/* eplbd --backend cpu plus up to 6 more arguments (NULL-terminated). */
static void start_server_with(const char *const *more) {
    memset(&srv, 0, sizeof srv);
    srv.extra[0] = "--backend";
    srv.extra[1] = "cpu";
    for (int k = 0; more && more[k] && k < 6; k++)
        srv.extra[2 + k] = more[k];
    eplbd_suite_start(&srv, &client);
}

static void start_server(const char *fault) {
    const char *more[] = { fault ? "--fault-inject" : NULL, fault, NULL };
    start_server_with(more);
}

static void stop_server(void) {
    buffers_destroy();
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
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, P / G);
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

static int attach(upb_Arena *a, uint32_t ranks, const char *bad_name, char *msg, size_t msglen) {
    eplb_v1_AttachWeightsRequest *r = eplb_v1_AttachWeightsRequest_new(a);
    eplb_v1_AttachWeightsRequest_set_model_id(r, upb_StringView_FromString("m"));
    eplb_v1_AttachWeightsRequest_set_kind(r, eplb_v1_BUFFER_KIND_SHM);
    for (uint32_t g = 0; g < ranks; g++) {
        eplb_v1_RankBuffer *rb = eplb_v1_AttachWeightsRequest_add_ranks(r, a);
        eplb_v1_RankBuffer_set_shm_name(rb, upb_StringView_FromString(g == 0 && bad_name ? bad_name : buf.names[g]));
    }
    for (int l = 0; l < L; l++) {
        eplb_v1_LayerWeights *lw = eplb_v1_AttachWeightsRequest_add_layers(r, a);
        for (int t = 0; t < T; t++) {
            eplb_v1_ExpertTensor *et = eplb_v1_LayerWeights_add_tensors(lw, a);
            eplb_v1_ExpertTensor_set_name(et, upb_StringView_FromString(tensor_names[t]));
            eplb_v1_ExpertTensor_set_bytes_per_expert(et, tensor_bytes[t]);
            for (uint32_t g = 0; g < ranks; g++) {
                eplb_v1_TensorLayout *tl = eplb_v1_ExpertTensor_add_ranks(et, a);
                eplb_v1_TensorLayout_set_offset(tl, offset_of(l, t, buf.slots_per_rank));
                eplb_v1_TensorLayout_set_stride(tl, stride_of(t));
            }
        }
    }
    size_t len;
    char *bytes = eplb_v1_AttachWeightsRequest_serialize(r, a, &len);
    eplb_call_result res;
    int st = call("AttachWeights", bytes, len, &res);
    if (msg)
        snprintf(msg, msglen, "%s", res.message);
    if (st == 0) {
        eplb_v1_AttachWeightsResponse *resp = eplb_v1_AttachWeightsResponse_parse(res.body, res.body_len, a);
        cr_assert(eplb_v1_AttachWeightsResponse_backend(resp).size == 3 &&
                  memcmp(eplb_v1_AttachWeightsResponse_backend(resp).data, "cpu", 3) == 0);
        cr_assert_eq(eplb_v1_AttachWeightsResponse_bytes_per_slot(resp), L * (4096 + 2048 + 64));
    }
    eplb_call_result_free(&res);
    return st;
}

/* The current placement message (parsed in the arena). */
static const eplb_v1_Placement *get_placement(upb_Arena *a) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString("m"));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0, "%s", r.message);
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    cr_assert_not_null(p);
    return p;
}

/* The current map (copied into the arena). */
static const int32_t *get_map(upb_Arena *a, uint64_t *epoch, uint32_t *slots, int *reload) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString("m"));
    size_t len, n;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("GetPlacement", bytes, len, &r), 0);
    char *body = upb_Arena_Malloc(a, r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    eplb_v1_Placement *p = eplb_v1_Placement_parse(body, r.body_len, a);
    eplb_call_result_free(&r);
    *epoch = eplb_v1_Placement_epoch(p);
    *slots = eplb_v1_Placement_num_physical_experts(p);
    if (reload)
        *reload = eplb_v1_Placement_needs_weight_reload(p);
    return eplb_v1_Placement_physical_to_logical(p, &n);
}

/* Every slot of every layer holds the bytes of the expert map names. */
static void check_bytes_match(const int32_t *map, uint32_t slots) {
    for (int l = 0; l < L; l++)
        for (uint32_t s = 0; s < slots; s++) {
            int e = map[l * (int)slots + (int)s];
            if (e >= 0)
                cr_assert_eq(slot_check(l, s, e, 0), 0, "layer %d slot %u does not hold expert %d", l, s, e);
        }
}

static int rebalance(upb_Arena *a, uint32_t slots, int dry_run, eplb_v1_RebalanceResponse **out, char *msg,
                     size_t msglen) {
    eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString("m"));
    eplb_v1_RebalanceRequest_set_dry_run(req, dry_run);
    int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(req, L * slots, a);
    for (int l = 0; l < L; l++)
        for (uint32_t s = 0; s < slots; s++)
            load[(uint32_t)l * slots + s] = s < N ? readme_load[l][s] : 0;
    size_t len;
    char *bytes = eplb_v1_RebalanceRequest_serialize(req, a, &len);
    eplb_call_result r;
    int st = call("Rebalance", bytes, len, &r);
    if (msg)
        snprintf(msg, msglen, "%s", r.message);
    if (st == 0 && out) {
        char *body = upb_Arena_Malloc(a, r.body_len + 1);
        memcpy(body, r.body, r.body_len);
        *out = eplb_v1_RebalanceResponse_parse(body, r.body_len, a);
    }
    eplb_call_result_free(&r);
    return st;
}

/* Register, create and fill the buffers for the initial map, attach. */
static const int32_t *setup_model(upb_Arena *a) {
    register_model(a);
    buffers_create(G, P / G);
    uint64_t epoch;
    uint32_t slots;
    const int32_t *map = get_map(a, &epoch, &slots, NULL);
    for (int l = 0; l < L; l++)
        for (uint32_t s = 0; s < P; s++)
            fill_slot(l, s, map[l * P + (int)s], 0);
    cr_assert_eq(attach(a, G, NULL, NULL, 0), 0);
    return map;
}

Test(weights_rpc, rebalance_moves_every_tensor_and_leaves_unneeded_slots_alone, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    const int32_t *old = setup_model(a);

    /* Learn the new map first, then mark the slots no copy may touch: their
     * expert stays and no changed slot of the layer needs it. */
    eplb_v1_RebalanceResponse *dry;
    cr_assert_eq(rebalance(a, P, 1, &dry, NULL, 0), 0);
    size_t n;
    const int32_t *next = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(dry), &n);
    int canary[L][P] = { { 0 } };
    int canaries = 0;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++) {
            int e = old[l * P + s], needed = 0;
            for (int d = 0; d < P; d++)
                needed |= next[l * P + d] == e && old[l * P + d] != e;
            if (next[l * P + s] == e && !needed) {
                canary[l][s] = 1;
                canaries++;
                fill_slot(l, (uint32_t)s, e, 0xA5);
            }
        }
    cr_assert_gt(canaries, 0, "the example should keep some experts in place");

    /* bytes_moved counts what was written into live slots: one expert (all
     * tensors) per scatter op of each layer's plan; staging is not counted. */
    uint64_t want_bytes = 0;
    for (int l = 0; l < L; l++) {
        eplb_plan plan;
        eplb_error perr;
        cr_assert_eq(eplb_plan_build(P, G, G / 2, old + l * P, next + l * P, 0, G, &plan, &perr), EPLB_OK, "%s",
                     perr.msg);
        cr_assert_gt(plan.num_gather, 0, "the example should stage something");
        want_bytes += (uint64_t)plan.num_scatter * (4096 + 2048 + 64);
        eplb_plan_free(&plan);
    }
    eplb_v1_RebalanceResponse *resp;
    cr_assert_eq(rebalance(a, P, 0, &resp, NULL, 0), 0);
    cr_assert(eplb_v1_RebalanceResponse_committed(resp));
    cr_assert_eq(eplb_v1_RebalanceResponse_bytes_moved(resp), want_bytes);
    const int32_t *now = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(resp), &n);
    cr_assert_arr_eq(now, next, n * sizeof *now, "deterministic: the dry run and the commit agree");
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            cr_assert_eq(slot_check(l, (uint32_t)s, now[l * P + s], canary[l][s] ? 0xA5 : 0), 0,
                         "layer %d slot %d (expert %d%s)", l, s, now[l * P + s], canary[l][s] ? ", untouched" : "");
    upb_Arena_Free(a);
    stop_server();
}

Test(weights_rpc, bad_buffers_are_refused_before_any_byte, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    char msg[512];
    cr_assert_eq(attach(a, G - 1, NULL, msg, sizeof msg), 3);
    cr_assert_not_null(strstr(msg, "ranks has 7 entries"), "%s", msg);
    cr_assert_eq(attach(a, G, "/eplb-test-does-not-exist", msg, sizeof msg), 3, "%s", msg);
    /* Without weights attached, a rebalance only changes the map. */
    eplb_v1_RebalanceResponse *resp;
    cr_assert_eq(rebalance(a, P, 0, &resp, NULL, 0), 0);
    cr_assert_eq(eplb_v1_RebalanceResponse_bytes_moved(resp), 0);
    upb_Arena_Free(a);
    stop_server();
}

Test(weights_rpc, scale_up_fills_the_new_ranks_at_the_next_rebalance, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    const int32_t *old = setup_model(a);
    /* 8 -> 12 ranks: the engine makes 4 more buffers; their slots are -1. */
    buffers_destroy();
    buffers_create(MAXG, P / G);
    eplb_v1_SetupFromMappingRequest *sreq = eplb_v1_SetupFromMappingRequest_new(a);
    eplb_v1_SetupFromMappingRequest_set_model_id(sreq, upb_StringView_FromString("m"));
    int32_t *exp = eplb_v1_SetupFromMappingRequest_resize_expanded_physical_to_logical(sreq, L * 24, a);
    for (int l = 0; l < L; l++)
        for (int s = 0; s < 24; s++) {
            exp[l * 24 + s] = s < P ? old[l * P + s] : -1;
            fill_slot(l, (uint32_t)s, exp[l * 24 + s], 0);
        }
    eplb_v1_SetupFromMappingRequest_set_num_physical_experts(sreq, 24);
    eplb_v1_SetupFromMappingRequest_set_old_num_physical_experts(sreq, P);
    eplb_v1_SetupFromMappingRequest_set_ep_size(sreq, MAXG);
    size_t len;
    char *bytes = eplb_v1_SetupFromMappingRequest_serialize(sreq, a, &len);
    eplb_call_result r;
    cr_assert_eq(call("SetupFromMapping", bytes, len, &r), 0, "%s", r.message);
    eplb_call_result_free(&r);
    cr_assert_eq(attach(a, MAXG, NULL, NULL, 0), 0);

    eplb_v1_RebalanceResponse *resp = NULL;
    cr_assert_eq(rebalance(a, 24, 0, &resp, NULL, 0), 0);
    size_t n;
    const int32_t *now = eplb_v1_Placement_physical_to_logical(eplb_v1_RebalanceResponse_placement(resp), &n);
    cr_assert_eq(n, L * 24);
    for (size_t i = 0; i < n; i++)
        cr_assert_geq(now[i], 0);
    check_bytes_match(now, 24);
    upb_Arena_Free(a);
    stop_server();
}

/* After any injected failure the served map must match the bytes. */
static void fault_case(const char *fault, int expect_status, const char *expect_msg) {
    start_server(fault);
    upb_Arena *a = upb_Arena_New();
    setup_model(a);
    char msg[512];
    eplb_v1_RebalanceResponse *resp = NULL;
    int st = rebalance(a, P, 0, &resp, msg, sizeof msg);
    cr_assert_eq(st, expect_status, "%s: %s", fault, msg);
    if (expect_msg)
        cr_assert_not_null(strstr(msg, expect_msg), "%s: %s", fault, msg);
    uint64_t epoch;
    uint32_t slots;
    int reload;
    const int32_t *map = get_map(a, &epoch, &slots, &reload);
    cr_assert_not(reload);
    check_bytes_match(map, slots);
    upb_Arena_Free(a);
    stop_server();
}

Test(weights_rpc, gather_failure_leaves_bytes_and_map_consistent, .timeout = 300) {
    fault_case("gather:1", 13 /* INTERNAL */, "before any");
}

Test(weights_rpc, scatter_failure_is_retried_from_staging, .timeout = 300) {
    fault_case("scatter:2", 0, NULL);
}

/* ---- buffers that shrink under the server ------------------------------------ */

static void truncate_rank(uint32_t r, off_t size) {
    int fd = shm_open(buf.names[r], O_RDWR, 0);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, size), 0);
    close(fd);
}

static int health_status(upb_Arena *a) {
    grpc_health_v1_HealthCheckRequest *req = grpc_health_v1_HealthCheckRequest_new(a);
    size_t len;
    char *bytes = grpc_health_v1_HealthCheckRequest_serialize(req, a, &len);
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(client, "/grpc.health.v1.Health/Check", bytes, len, call_timeout_ms(), &r), 0);
    cr_assert_eq(r.status, 0, "%s", r.message);
    grpc_health_v1_HealthCheckResponse *resp = grpc_health_v1_HealthCheckResponse_parse(r.body, r.body_len, a);
    int st = resp ? grpc_health_v1_HealthCheckResponse_status(resp) : -1;
    eplb_call_result_free(&r);
    return st;
}

/* `truncate -s0` of two ranks' objects, then Rebalance: the server used to
 * die of SIGBUS.  Now the move fails with DATA_LOSS naming the rank, the
 * model needs a reload, and the server keeps serving. */
Test(weights_rpc, shrunk_buffers_are_data_loss_and_the_server_stays_up, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    uint64_t epoch0;
    uint32_t slots;
    setup_model(a);
    get_map(a, &epoch0, &slots, NULL);
    truncate_rank(1, 0);
    truncate_rank(2, 0);
    char msg[512], want[160];
    cr_assert_eq(rebalance(a, P, 0, NULL, msg, sizeof msg), 15 /* DATA_LOSS */, "%s", msg);
    snprintf(want, sizeof want, "ranks[1].regions[0] shm \"%s\" shrank to 0 bytes, the layout needs", buf.names[1]);
    cr_assert_not_null(strstr(msg, want), "%s", msg);
    cr_assert_not_null(strstr(msg, "its experts are lost"), "%s", msg);

    cr_assert_eq(health_status(a), grpc_health_v1_HealthCheckResponse_SERVING);
    const eplb_v1_Placement *p = get_placement(a);
    cr_assert(eplb_v1_Placement_needs_weight_reload(p));
    cr_assert_eq(eplb_v1_Placement_state(p), eplb_v1_MOVE_STATE_NEEDS_RELOAD);
    upb_StringView reason = eplb_v1_Placement_state_reason(p);
    char why[512];
    snprintf(why, sizeof why, "%.*s", (int)reason.size, reason.size ? reason.data : "");
    cr_assert_not_null(strstr(why, "shrank to 0 bytes"), "state_reason: %s", why);
    cr_assert_eq(eplb_v1_Placement_epoch(p), epoch0, "nothing was committed");
    /* The model refuses to move until it is reloaded; the server lives on. */
    cr_assert_neq(rebalance(a, P, 0, NULL, msg, sizeof msg), 0);
    cr_assert_eq(health_status(a), grpc_health_v1_HealthCheckResponse_SERVING);

    /* NEEDS_RELOAD was stored before the error was answered: a restart
     * serves it (the old map no longer describes the bytes). */
    eplb_client_close(client);
    cr_assert_eq(eplbd_stop(&srv), 0);
    eplbd_start(&srv);
    client = eplb_client_open(srv.addr);
    cr_assert_not_null(client);
    p = get_placement(a);
    cr_assert_eq(eplb_v1_Placement_state(p), eplb_v1_MOVE_STATE_NEEDS_RELOAD);
    reason = eplb_v1_Placement_state_reason(p);
    snprintf(why, sizeof why, "%.*s", (int)reason.size, reason.size ? reason.data : "");
    cr_assert_not_null(strstr(why, "shrank to 0 bytes"), "state_reason after restart: %s", why);
    cr_assert_neq(rebalance(a, P, 0, NULL, msg, sizeof msg), 0);
    /* The engine reloaded its weights: registering again clears it. */
    register_model(a);
    cr_assert_eq(eplb_v1_Placement_state(get_placement(a)), eplb_v1_MOVE_STATE_IDLE);
    upb_Arena_Free(a);
    stop_server(); /* asserts a clean exit at SIGTERM */
}

/* ---- buffers replaced under the server ------------------------------------------ */

/* The engine unlinks /eplb-...-1 and creates it again, same size and bytes:
 * the server's mapping is of the old object.  A move used to answer OK and
 * write into the unlinked object, so the engine's new object no longer
 * matched the map.  Now it is DATA_LOSS naming the rank, and NEEDS_RELOAD. */
Test(weights_rpc, unlinked_and_recreated_buffer_is_data_loss, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    uint64_t epoch0;
    uint32_t slots;
    setup_model(a);
    get_map(a, &epoch0, &slots, NULL);
    cr_assert_eq(shm_unlink(buf.names[1]), 0);
    int fd = shm_open(buf.names[1], O_RDWR | O_CREAT | O_EXCL, 0600);
    cr_assert_geq(fd, 0);
    cr_assert_eq(ftruncate(fd, (off_t)buf.size), 0);
    unsigned char *fresh = mmap(NULL, buf.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    cr_assert_neq(fresh, MAP_FAILED);
    memcpy(fresh, buf.base[1], buf.size);
    munmap(buf.base[1], buf.size);
    buf.base[1] = fresh; /* what the engine sees from now on */
    unsigned char *before = malloc(buf.size);
    memcpy(before, fresh, buf.size);

    char msg[512], want[256];
    cr_assert_eq(rebalance(a, P, 0, NULL, msg, sizeof msg), 15 /* DATA_LOSS */, "%s", msg);
    snprintf(want, sizeof want,
             "ranks[1].regions[0] shm \"%s\" was replaced by another object since it was attached: its experts are no longer "
             "where the engine sees them", buf.names[1]);
    cr_assert_not_null(strstr(msg, want), "%s", msg);
    const eplb_v1_Placement *p = get_placement(a);
    cr_assert(eplb_v1_Placement_needs_weight_reload(p));
    cr_assert_eq(eplb_v1_Placement_state(p), eplb_v1_MOVE_STATE_NEEDS_RELOAD);
    upb_StringView reason = eplb_v1_Placement_state_reason(p);
    char why[512];
    snprintf(why, sizeof why, "%.*s", (int)reason.size, reason.size ? reason.data : "");
    cr_assert_not_null(strstr(why, "was replaced by another object"), "state_reason: %s", why);
    cr_assert_eq(eplb_v1_Placement_epoch(p), epoch0, "nothing was committed");
    cr_assert(memcmp(fresh, before, buf.size) == 0, "the engine's new object was written");
    cr_assert_eq(health_status(a), grpc_health_v1_HealthCheckResponse_SERVING);
    free(before);
    upb_Arena_Free(a);
    stop_server();
}

/* `ln /dev/shm/<rank 1> /dev/shm/<other>` attached as rank 0 and rank 1:
 * two names, one object, overlapping slots.  Refused at AttachWeights. */
Test(weights_rpc, hard_linked_ranks_are_refused, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    char target[128], hl[128], msg[512], want[256];
    snprintf(target, sizeof target, "/dev/shm%s", buf.names[1]);
    snprintf(hl, sizeof hl, "/dev/shm/eplb-test-%d-hl", (int)getpid());
    unlink(hl);
    if (link(target, hl) != 0)
        cr_skip_test("/dev/shm takes no hard links here");
    cr_assert_eq(attach(a, G, hl + 8, msg, sizeof msg), 3 /* INVALID_ARGUMENT */, "%s", msg);
    snprintf(want, sizeof want, "ranks[0].regions[0].shm_name \"%s\" and ranks[1].regions[0].shm_name \"%s\" are the same shm object",
             hl + 8, buf.names[1]);
    cr_assert_not_null(strstr(msg, want), "%s", msg);
    unlink(hl);
    cr_assert_eq(attach(a, G, NULL, msg, sizeof msg), 0, "%s", msg);
    upb_Arena_Free(a);
    stop_server();
}

/* ---- the trust boundary of AttachWeights --------------------------------------- */

/* Create (or recreate) a shm object of buf.size bytes under `name`. */
static void make_object(const char *name) {
    shm_unlink(name);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    cr_assert_geq(fd, 0, "shm_open %s", name);
    cr_assert_eq(ftruncate(fd, (off_t)buf.size), 0);
    close(fd);
}

Test(weights_rpc, shm_names_outside_the_prefix_are_refused, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    char name[64], msg[512], want[160];
    /* What the old server happily mapped read-write: any object it could
     * open, e.g. a POSIX semaphore of another process. */
    snprintf(name, sizeof name, "/sem.eplbtest-%d", (int)getpid());
    make_object(name);
    cr_assert_eq(attach(a, G, name, msg, sizeof msg), 7 /* PERMISSION_DENIED */, "%s", msg);
    snprintf(want, sizeof want, "ranks[0].regions[0].shm_name \"%s\" is not under the allowed prefix \"/eplb-\"", name);
    cr_assert_not_null(strstr(msg, want), "%s", msg);
    cr_assert_not_null(strstr(msg, "--shm-prefix"), "%s", msg);
    shm_unlink(name);
    /* Malformed names are INVALID_ARGUMENT; an empty one (an absent proto
     * string: a NULL pointer) must not reach memcpy (UBSan builds abort). */
    cr_assert_eq(attach(a, G, "", msg, sizeof msg), 3, "%s", msg);
    cr_assert_not_null(strstr(msg, "ranks[0].regions[0].shm_name"), "%s", msg);
    cr_assert_eq(attach(a, G, "eplb-no-slash", msg, sizeof msg), 3, "%s", msg);
    cr_assert_eq(attach(a, G, NULL, msg, sizeof msg), 0, "%s", msg);
    upb_Arena_Free(a);
    stop_server();

    /* --shm-prefix moves the boundary. */
    const char *more[] = { "--shm-prefix", "/eplb-test-", NULL };
    start_server_with(more);
    a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    snprintf(name, sizeof name, "/eplb-other-%d", (int)getpid());
    make_object(name);
    cr_assert_eq(attach(a, G, name, msg, sizeof msg), 7, "%s", msg);
    cr_assert_not_null(strstr(msg, "allowed prefix \"/eplb-test-\""), "%s", msg);
    shm_unlink(name);
    cr_assert_eq(attach(a, G, NULL, msg, sizeof msg), 0, "%s", msg);
    upb_Arena_Free(a);
    stop_server();
}

Test(weights_rpc, shm_objects_of_other_owners_are_refused, .timeout = 300) {
    if (geteuid() != 0)
        cr_skip_test("needs root to give an shm object to another uid");
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    int fd = shm_open(buf.names[3], O_RDWR, 0);
    cr_assert_geq(fd, 0);
    cr_assert_eq(fchown(fd, 65534, 65534), 0);
    close(fd);
    char msg[512], want[160];
    cr_assert_eq(attach(a, G, NULL, msg, sizeof msg), 7 /* PERMISSION_DENIED */, "%s", msg);
    snprintf(want, sizeof want, "ranks[3].regions[0].shm_name \"%s\" is owned by uid 65534; allowed: 0 (this process)",
             buf.names[3]);
    cr_assert_not_null(strstr(msg, want), "%s", msg);
    upb_Arena_Free(a);
    eplbd_suite_stop(&srv, client); /* keep the buffers */

    const char *more[] = { "--shm-allow-uid", "65534", NULL };
    start_server_with(more);
    a = upb_Arena_New();
    register_model(a);
    cr_assert_eq(attach(a, G, NULL, msg, sizeof msg), 0, "%s", msg);
    upb_Arena_Free(a);
    stop_server();
}

Test(weights_rpc, symlinks_and_fifos_are_refused, .timeout = 300) {
    start_server(NULL);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    buffers_create(G, P / G);
    char target[128], link[128], fifo[128], msg[512];
    snprintf(target, sizeof target, "/dev/shm%s", buf.names[0]);
    snprintf(link, sizeof link, "/dev/shm/eplb-test-%d-link", (int)getpid());
    snprintf(fifo, sizeof fifo, "/dev/shm/eplb-test-%d-fifo", (int)getpid());
    unlink(link);
    unlink(fifo);
    if (symlink(target, link) != 0 || mkfifo(fifo, 0600) != 0)
        cr_skip_test("/dev/shm takes no symlinks or FIFOs here");
    cr_assert_eq(attach(a, G, link + 8, msg, sizeof msg), 3, "%s", msg);
    cr_assert_not_null(strstr(msg, "symbolic link"), "%s", msg);
    /* A FIFO used to hang the worker in open(2), forever. */
    cr_assert_eq(attach(a, G, fifo + 8, msg, sizeof msg), 3, "%s", msg);
    cr_assert_not_null(strstr(msg, "not a regular file"), "%s", msg);
    unlink(link);
    unlink(fifo);
    upb_Arena_Free(a);
    stop_server();
}

/* An address of this host in family af that is neither loopback nor
 * link-local, as a --listen host ("" when none): "192.0.2.2", "[fd00::2]". */
static void outside_address(int af, char *out, size_t n) {
    out[0] = '\0';
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) != 0)
        return;
    for (struct ifaddrs *i = ifs; i && !out[0]; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != af)
            continue;
        char host[INET6_ADDRSTRLEN];
        if (af == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)i->ifa_addr;
            if ((ntohl(sin->sin_addr.s_addr) >> 24) != 127 && inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host))
                snprintf(out, n, "%s", host);
        } else {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)i->ifa_addr;
            if (!IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr) && !IN6_IS_ADDR_LINKLOCAL(&sin6->sin6_addr) &&
                !IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr) && inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host))
                snprintf(out, n, "[%s]", host);
        }
    }
    freeifaddrs(ifs);
}

/* Start a server listening on `listen` (plus `flag` when not NULL), register,
 * attach buf, stop the server; the attach's status (msg: its message). */
static int attach_via(const char *listen, const char *flag, char *msg, size_t n) {
    eplbd_proc p;
    memset(&p, 0, sizeof p);
    eplbd_tmpdir(&p);
    p.extra[0] = "--backend";
    p.extra[1] = "cpu";
    p.extra[2] = "--listen"; /* the last --listen wins */
    p.extra[3] = listen;
    p.extra[4] = flag;
    eplbd_start(&p);
    srv = p;
    client = eplb_client_open(p.addr);
    cr_assert_not_null(client);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    int st = attach(a, G, NULL, msg, n);
    upb_Arena_Free(a);
    eplbd_suite_stop(&srv, client);
    return st;
}

/* DetachWeights of model "m": its status (msg: its message). */
static int detach(upb_Arena *a, bool *detached, char *msg, size_t n) {
    eplb_v1_DetachWeightsRequest *r = eplb_v1_DetachWeightsRequest_new(a);
    eplb_v1_DetachWeightsRequest_set_model_id(r, upb_StringView_FromString("m"));
    size_t len;
    char *bytes = eplb_v1_DetachWeightsRequest_serialize(r, a, &len);
    eplb_call_result res;
    int st = call("DetachWeights", bytes, len, &res);
    snprintf(msg, n, "%s", res.message);
    *detached = false;
    if (st == 0) {
        eplb_v1_DetachWeightsResponse *resp = eplb_v1_DetachWeightsResponse_parse(res.body, res.body_len, a);
        cr_assert_not_null(resp);
        *detached = eplb_v1_DetachWeightsResponse_detached(resp);
    }
    eplb_call_result_free(&res);
    return st;
}

/* Like attach_via, for DetachWeights: with `flag` (--allow-remote-weights)
 * buf is attached first, so that there is something to detach. */
static int detach_via(const char *listen, const char *flag, bool *detached, char *msg, size_t n) {
    eplbd_proc p;
    memset(&p, 0, sizeof p);
    eplbd_tmpdir(&p);
    p.extra[0] = "--backend";
    p.extra[1] = "cpu";
    p.extra[2] = "--listen";
    p.extra[3] = listen;
    p.extra[4] = flag;
    eplbd_start(&p);
    srv = p;
    client = eplb_client_open(p.addr);
    cr_assert_not_null(client);
    upb_Arena *a = upb_Arena_New();
    register_model(a);
    if (flag)
        cr_assert_eq(attach(a, G, NULL, msg, n), 0, "%s", msg);
    int st = detach(a, detached, msg, n);
    upb_Arena_Free(a);
    eplbd_suite_stop(&srv, client);
    return st;
}

Test(weights_rpc, attachments_only_from_this_host, .timeout = 300) {
    char v4[64], v6[80], listen[128], msg[512];
    buffers_create(G, P / G);
    outside_address(AF_INET, v4, sizeof v4);
    outside_address(AF_INET6, v6, sizeof v6);
    if (!v4[0] && !v6[0])
        cr_skip_test("this host has no address other than loopback");
    /* Reached through a non-loopback address, the server sees a remote
     * peer: refused, unless --allow-remote-weights. */
    const char *outside[2] = { v4, v6 };
    for (int k = 0; k < 2; k++) {
        if (!outside[k][0])
            continue;
        snprintf(listen, sizeof listen, "%s:0", outside[k]);
        cr_assert_eq(attach_via(listen, NULL, msg, sizeof msg), 7 /* PERMISSION_DENIED */, "%s: %s",
                     listen, msg);
        cr_assert_not_null(strstr(msg, "unix socket or from a loopback address"), "%s", msg);
        cr_assert_not_null(strstr(msg, "--allow-remote-weights"), "%s", msg);
        char host[80];
        snprintf(host, sizeof host, "%s", outside[k] + (outside[k][0] == '['));
        host[strcspn(host, "]")] = '\0';
        cr_assert_not_null(strstr(msg, host), "the message names the peer: %s", msg);
        cr_assert_eq(attach_via(listen, "--allow-remote-weights", msg, sizeof msg), 0, "%s: %s", listen,
                     msg);
    }
    /* Loopback, v6 too (gRPC writes it "ipv6:%5B::1%5D:port"), and a unix
     * socket are this host. */
    if (v6[0])
        cr_assert_eq(attach_via("[::1]:0", NULL, msg, sizeof msg), 0, "[::1]: %s", msg);
    char sock[128];
    snprintf(sock, sizeof sock, "unix:/tmp/eplbd-weights-%d.sock", (int)getpid());
    cr_assert_eq(attach_via(sock, NULL, msg, sizeof msg), 0, "%s: %s", sock, msg);
    unlink(sock + 5);
    buffers_destroy();
}

/* DetachWeights follows the same peer rule: from a remote peer it used to
 * answer OK. */
Test(weights_rpc, detachments_only_from_this_host, .timeout = 300) {
    char v4[64], v6[80], listen[128], msg[512];
    bool detached;
    buffers_create(G, P / G);
    outside_address(AF_INET, v4, sizeof v4);
    outside_address(AF_INET6, v6, sizeof v6);
    if (!v4[0] && !v6[0])
        cr_skip_test("this host has no address other than loopback");
    const char *outside[2] = { v4, v6 };
    for (int k = 0; k < 2; k++) {
        if (!outside[k][0])
            continue;
        snprintf(listen, sizeof listen, "%s:0", outside[k]);
        cr_assert_eq(detach_via(listen, NULL, &detached, msg, sizeof msg), 7 /* PERMISSION_DENIED */, "%s: %s",
                     listen, msg);
        cr_assert_not_null(strstr(msg, "DetachWeights from "), "%s", msg);
        cr_assert_not_null(strstr(msg, "unix socket or from a loopback address"), "%s", msg);
        cr_assert_not_null(strstr(msg, "--allow-remote-weights"), "%s", msg);
        char host[80];
        snprintf(host, sizeof host, "%s", outside[k] + (outside[k][0] == '['));
        host[strcspn(host, "]")] = '\0';
        cr_assert_not_null(strstr(msg, host), "the message names the peer: %s", msg);
        cr_assert_eq(detach_via(listen, "--allow-remote-weights", &detached, msg, sizeof msg), 0, "%s: %s",
                     listen, msg);
        cr_assert(detached, "%s: the attachment was detached", listen);
    }
    char sock[128];
    snprintf(sock, sizeof sock, "unix:/tmp/eplbd-detach-%d.sock", (int)getpid());
    cr_assert_eq(detach_via(sock, NULL, &detached, msg, sizeof msg), 0, "%s: %s", sock, msg);
    unlink(sock + 5);
    buffers_destroy();
}
