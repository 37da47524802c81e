/* bench_isolation.c -- does slow work on some models delay readers of
 * another?  Prints GetPlacement and Health/Check latency of a small model
 * while other threads keep the server busy with slow calls on other
 * models: committing Rebalances of a large model (policy + fsync) and
 * RegisterModel of new large models (a multi-MB save each).
 *
 * A separate client process on its own channels.  Run it against any eplbd
 * (the request fields it uses exist in every version):
 *
 *   bench_isolation ADDR [busy-threads] [seconds] [layers experts slots]
 *
 * Prints p50/p99/max of each probe and how many slow calls ran meanwhile. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_client.h"
#include "bench_util.h"

typedef struct shape {
    uint32_t layers, experts, slots, gpus;
} shape;

static const char *addr;
static shape big = { 256, 512, 1024, 32 };
static atomic_int stop;
static atomic_long slow_calls, slow_errors;

static int call(eplb_client *c, const char *path, const char *bytes, size_t len) {
    eplb_call_result r;
    if (eplb_client_call(c, path, bytes, len, 120000, &r) != 0)
        return -1;
    int st = r.status;
    if (st != 0)
        fprintf(stderr, "%s: %s: %s\n", path, eplb_grpc_status_name(st), r.message);
    eplb_call_result_free(&r);
    return st;
}

static char *register_bytes(upb_Arena *a, const char *name, const shape *s, size_t *len) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("DeepseekV3ForCausalLM"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, s->layers);
    eplb_v1_MoeSpec_set_num_logical_experts(m, s->experts);
    eplb_v1_MoeSpec_set_num_physical_experts(m, s->slots);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, s->slots / s->gpus);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, s->slots - s->experts);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, s->gpus);
    eplb_v1_ParallelConfig_set_window_size(p, 1);
    return eplb_v1_RegisterModelRequest_serialize(r, a, len);
}

/* Busy thread i: even threads rebalance (commit) their own large model in
 * a loop, odd threads register a new large model per call. */
static void *busy_main(void *arg) {
    int id = (int)(intptr_t)arg;
    eplb_client *c = eplb_client_open(addr);
    upb_Arena *a = upb_Arena_New();
    char name[64];
    size_t len;
    snprintf(name, sizeof name, "busy-%d", id);
    char *reg = register_bytes(a, name, &big, &len);
    if (call(c, "/eplb.v1.ExpertBalancer/RegisterModel", reg, len) != 0)
        atomic_fetch_add(&slow_errors, 1);
    eplb_v1_RebalanceRequest *rb = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(rb, upb_StringView_FromString(name));
    size_t n = (size_t)big.layers * big.slots;
    int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(rb, n, a);
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(id + 1);
    for (int k = 0; !atomic_load(&stop); k++) {
        if (id % 2 == 0) {
            for (size_t i = 0; i < n; i++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                load[i] = (int64_t)(seed >> 44);
            }
            char *bytes = eplb_v1_RebalanceRequest_serialize(rb, a, &len);
            if (call(c, "/eplb.v1.ExpertBalancer/Rebalance", bytes, len) != 0)
                atomic_fetch_add(&slow_errors, 1);
        } else {
            upb_Arena *b = upb_Arena_New();
            snprintf(name, sizeof name, "busy-%d-%d", id, k);
            char *bytes = register_bytes(b, name, &big, &len);
            if (call(c, "/eplb.v1.ExpertBalancer/RegisterModel", bytes, len) != 0)
                atomic_fetch_add(&slow_errors, 1);
            upb_Arena_Free(b);
        }
        atomic_fetch_add(&slow_calls, 1);
    }
    upb_Arena_Free(a);
    eplb_client_close(c);
    return NULL;
}

static void report(const char *what, double *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_double);
    printf("%-24s n=%-6zu p50 %8.2f ms  p99 %8.2f ms  max %8.2f ms\n", what, n, v[n / 2],
           v[(size_t)ceil((double)n * 0.99) - 1], v[n - 1]);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_isolation ADDR [busy-threads] [seconds] [layers experts slots]\n");
        return 2;
    }
    addr = argv[1];
    int threads = argc > 2 ? atoi(argv[2]) : 4;
    double seconds = argc > 3 ? atof(argv[3]) : 10;
    if (argc > 6)
        big = (shape){ (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), (uint32_t)atoi(argv[6]), 32 };

    eplb_client *c = eplb_client_open(addr);
    upb_Arena *a = upb_Arena_New();
    shape small = { 2, 12, 16, 8 };
    size_t len;
    char *reg = register_bytes(a, "probe", &small, &len);
    if (call(c, "/eplb.v1.ExpertBalancer/RegisterModel", reg, len) != 0)
        return 1;
    eplb_v1_GetPlacementRequest *g = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(g, upb_StringView_FromString("probe"));
    char *get = eplb_v1_GetPlacementRequest_serialize(g, a, &len);
    size_t get_len = len;

    pthread_t *t = calloc((size_t)threads, sizeof *t);
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, busy_main, (void *)(intptr_t)i);
    size_t cap = 100000, n = 0;
    double *gp = calloc(cap, sizeof *gp), *hc = calloc(cap, sizeof *hc);
    double t0 = now_ms();
    struct timespec pause = { 0, 5 * 1000000L };
    nanosleep(&pause, NULL);
    while (now_ms() - t0 < seconds * 1e3 && n < cap) {
        double s = now_ms();
        if (call(c, "/eplb.v1.ExpertBalancer/GetPlacement", get, get_len) != 0)
            return 1;
        double m = now_ms();
        if (call(c, "/grpc.health.v1.Health/Check", "", 0) != 0)
            return 1;
        gp[n] = m - s;
        hc[n] = now_ms() - m;
        n++;
        nanosleep(&pause, NULL);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("busy: %d threads on %ux%ux%u models, %ld slow calls (%ld failed) in %.1f s\n", threads, big.layers,
           big.experts, big.slots, atomic_load(&slow_calls), atomic_load(&slow_errors), (now_ms() - t0) / 1e3);
    report("GetPlacement(probe)", gp, n);
    report("Health/Check", hc, n);
    free(gp);
    free(hc);
    free(t);
    upb_Arena_Free(a);
    eplb_client_close(c);
    return 0;
}
