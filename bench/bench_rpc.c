/* bench_rpc.c -- end-to-end Rebalance latency over loopback gRPC.
 *
 * A separate client process: registers one model per client thread at the
 * given size, then each thread sends Rebalance calls with the load in the
 * request (Zipf-like, seeded) on its own channel, as fast as it can, for a
 * fixed number of calls.  Prints p50/p90/p99/max per mode.
 *
 * usage: bench_rpc ADDR [clients] [calls-per-client] [layers experts slots groups nodes gpus]
 * BENCH_RPC_MODES=dry-run (or commit) runs only that mode at the given clients;
 * by default: dry-run and commit at the given clients, then commit at 1. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_client.h"
#include "bench_util.h"

typedef struct shape {
    uint32_t layers, experts, slots, groups, nodes, gpus;
} shape;

typedef struct worker {
    const char *addr;
    int id;
    int calls;
    int dry_run;
    shape s;
    double *lat_ms;   /* [calls] */
    int errors;
} worker;

static int call(eplb_client *c, const char *method, const char *bytes, size_t len) {
    char path[128];
    eplb_call_result r;
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    if (eplb_client_call(c, path, bytes, len, 60000, &r) != 0)
        return -1;
    int st = r.status;
    if (st != 0)
        fprintf(stderr, "%s: %s: %s\n", method, eplb_grpc_status_name(st), r.message);
    eplb_call_result_free(&r);
    return st;
}

static int register_model(eplb_client *c, const char *name, const shape *s) {
    upb_Arena *a = upb_Arena_New();
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
    eplb_v1_MoeSpec_set_num_expert_groups(m, s->groups);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, s->gpus);
    eplb_v1_ParallelConfig_set_num_nodes(p, s->nodes);
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    int st = call(c, "RegisterModel", bytes, len);
    upb_Arena_Free(a);
    return st;
}

static void *worker_main(void *arg) {
    worker *w = arg;
    eplb_client *c = eplb_client_open(w->addr);
    char name[64];
    snprintf(name, sizeof name, "bench-%d-%ux%u", w->id, w->s.layers, w->s.slots);
    if (register_model(c, name, &w->s) != 0) {
        w->errors = w->calls;
        eplb_client_close(c);
        return NULL;
    }
    /* Requests are built before timing starts (the client shares the
     * machine's cores with the server): 16 Zipf-like loads, cycled. */
    enum { VARIANTS = 16 };
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(w->id + 1);
    size_t n = (size_t)w->s.layers * w->s.slots;
    upb_Arena *a = upb_Arena_New();
    char *bytes[VARIANTS];
    size_t lens[VARIANTS];
    for (int v = 0; v < VARIANTS; v++) {
        eplb_v1_RebalanceRequest *r = eplb_v1_RebalanceRequest_new(a);
        eplb_v1_RebalanceRequest_set_model_id(r, upb_StringView_FromString(name));
        eplb_v1_RebalanceRequest_set_dry_run(r, w->dry_run);
        int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(r, n, a);
        for (size_t k = 0; k < n; k++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            double u = (double)(seed >> 11) / 9007199254740992.0;
            load[k] = (int64_t)(20000.0 / (1.0 + (double)(k % w->s.slots) * u));
        }
        bytes[v] = eplb_v1_RebalanceRequest_serialize(r, a, &lens[v]);
    }
    for (int i = 0; i < w->calls; i++) {
        double t0 = now_ms();
        int st = call(c, "Rebalance", bytes[i % VARIANTS], lens[i % VARIANTS]);
        w->lat_ms[i] = now_ms() - t0;
        if (st != 0) {
            /* Count the rest as failed: a broken server is not a number. */
            w->errors += w->calls - i;
            for (; i < w->calls; i++)
                w->lat_ms[i] = 0;
            break;
        }
    }
    upb_Arena_Free(a);
    eplb_client_close(c);
    return NULL;
}

static int run(const char *addr, int clients, int calls, int dry_run, shape s, int round) {
    worker *w = calloc((size_t)clients, sizeof *w);
    pthread_t *t = calloc((size_t)clients, sizeof *t);
    double *all = calloc((size_t)clients * (size_t)calls, sizeof *all);
    double t0 = now_ms();
    for (int i = 0; i < clients; i++) {
        w[i] = (worker){ .addr = addr, .id = i + 100 * round, .calls = calls, .dry_run = dry_run, .s = s,
                         .lat_ms = all + (size_t)i * (size_t)calls };
        pthread_create(&t[i], NULL, worker_main, &w[i]);
    }
    int errors = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(t[i], NULL);
        errors += w[i].errors;
    }
    double wall = now_ms() - t0;
    size_t n = (size_t)clients * (size_t)calls;
    qsort(all, n, sizeof *all, cmp_double);
    printf("rebalance %-7s L=%u N=%u P=%u G=%u nodes=%u gpus=%u clients=%d calls=%zu: "
           "p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms  throughput %.0f calls/s  errors %d\n",
           dry_run ? "dry-run" : "commit", s.layers, s.experts, s.slots, s.groups, s.nodes, s.gpus, clients, n,
           all[n / 2], all[n * 9 / 10], all[(size_t)ceil((double)n * 0.99) - 1], all[n - 1], (double)n / wall * 1e3,
           errors);
    free(w);
    free(t);
    free(all);
    return errors;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_rpc ADDR [clients] [calls] [layers experts slots groups nodes gpus]\n");
        return 2;
    }
    int clients = argc > 2 ? atoi(argv[2]) : 4;
    int calls = argc > 3 ? atoi(argv[3]) : 500;
    shape s = { 58, 256, 288, 8, 4, 32 };
    if (argc > 9)
        s = (shape){ (uint32_t)atoi(argv[4]), (uint32_t)atoi(argv[5]), (uint32_t)atoi(argv[6]),
                     (uint32_t)atoi(argv[7]), (uint32_t)atoi(argv[8]), (uint32_t)atoi(argv[9]) };
    const char *modes = getenv("BENCH_RPC_MODES");
    int errors = 0;
    if (modes && strcmp(modes, "dry-run") == 0)
        return run(argv[1], clients, calls, 1, s, 0) ? 1 : 0;
    if (modes && strcmp(modes, "commit") == 0)
        return run(argv[1], clients, calls, 0, s, 1) ? 1 : 0;
    errors += run(argv[1], clients, calls, 1, s, 0);
    errors += run(argv[1], clients, calls, 0, s, 1);
    errors += run(argv[1], 1, calls, 0, s, 2);
    return errors ? 1 : 0;
}
