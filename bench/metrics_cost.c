/* metrics_cost.c -- what the metrics cost eplbd (docs/benchmarks.md,
 * "Metrics"): the on_call observer per call (one thread, and two threads
 * on the same counters), and one render of the exposition with 64 models.
 *
 * Not a bench_*.c (those link eplb_core only); it needs the rpc library.
 * Build against a tree built with -DCMAKE_BUILD_TYPE=Release or the
 * default RelWithDebInfo:
 *   B=build-metrics; gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE \
 *     -Iservice/rpc -Iservice/core -I$B/gen -I.deps/upb/src -I.deps/upb/include \
 *     bench/metrics_cost.c $B/libeplb_rpc.a $B/gpu/libeplb_gpu.a $B/libeplb_proto.a \
 *     $B/libeplb_core.a $(pkg-config --libs grpc) -ldl -lm -lpthread -o $B/metrics_cost
 *   $B/metrics_cost */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_registry.h"
#include "rpc_log.h"
#include "rpc_metrics.h"

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static const char *methods[] = { "GetPlacement", "Rebalance", "Health/Check", "RecordLoad", "RegisterModel",
                                 "/x.Y/Unknown" };
#define CALLS 5000000

static rpc_metrics *metrics;

static void *observe(void *arg) {
    (void)arg;
    rpc_call_facts facts;
    memset(&facts, 0, sizeof facts);
    rpc_call_record rec = { .message = "", .facts = &facts };
    for (int i = 0; i < CALLS; i++) {
        rec.method = methods[i % 6];
        rec.code = (i % 7 == 0) ? 5 : 0;
        rec.duration_ms = (double)(i % 1000) * 0.37;
        rpc_metrics_on_call(metrics, &rec);
    }
    return NULL;
}

int main(void) {
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    lim.max_state_bytes = 64ull << 30; /* 64 full-size models */
    eplb_registry *reg;
    if (eplb_registry_open(NULL, NULL, &lim, &reg, NULL) != EPLB_OK)
        return 1;
    /* 64 DeepSeek-V3-shaped models (58 layers, 256 experts, 288 slots), each
     * rebalanced once, so every per-model series is rendered. */
    eplb_handle h = { .architecture = "DeepseekV3ForCausalLM", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                      .moe = { .num_moe_layers = 58, .num_logical_experts = 256, .num_physical_experts = 288,
                               .num_local_physical_experts = 9, .num_redundant_experts = 32,
                               .num_expert_groups = 8 } };
    int64_t *load = calloc(58 * 288, sizeof *load);
    for (int i = 0; i < 58 * 256; i++)
        load[(i / 256) * 288 + i % 256] = (i * 7919) % 1000 + 1;
    for (int k = 0; k < 64; k++) {
        char name[64];
        snprintf(name, sizeof name, "deepseek-v3-replica-%02d", k);
        eplb_register_request req = { .model_name = name, .model = &h, .main_model_id = "",
                                      .parallel = { .enable_eplb = true, .ep_size = 32, .num_nodes = 4, .window_size = 16 } };
        eplb_register_result res;
        eplb_error err;
        if (eplb_registry_register(reg, &req, &res, &err) != EPLB_OK || !res.registered) {
            fprintf(stderr, "register %s: %s%s\n", name, err.msg, res.reason);
            return 1;
        }
        eplb_model_view_release(&res.view);
        eplb_rebalance_request rr = { .model_id = name, .physical_load = load, .physical_load_len = 58 * 288 };
        eplb_rebalance_result out;
        if (eplb_registry_rebalance(reg, &rr, &out, NULL) != EPLB_OK)
            return 1;
        eplb_rebalance_result_free(&out);
    }
    rpc_context ctx = { .registry = reg, .limits = lim };
    atomic_init(&ctx.serving, true);
    metrics = rpc_metrics_new(&ctx, ":memory:", "bench");
    if (!metrics)
        return 1;

    observe(NULL); /* warm-up */
    for (int run = 0; run < 3; run++) {
        double t0 = now_ns();
        observe(NULL);
        double one = (now_ns() - t0) / CALLS;
        pthread_t a, b;
        t0 = now_ns();
        pthread_create(&a, NULL, observe, NULL);
        pthread_create(&b, NULL, observe, NULL);
        pthread_join(a, NULL);
        pthread_join(b, NULL);
        double two = (now_ns() - t0) / CALLS; /* wall per call-pair: each thread's cost */
        printf("on_call: %.1f ns/call on 1 thread; %.1f ns/call per thread with 2 threads at once\n", one, two);
    }

    char *text;
    size_t len;
    rpc_metrics_render(metrics, &text, &len); /* warm-up */
    free(text);
    for (int run = 0; run < 3; run++) {
        enum { RENDERS = 2000 };
        double t0 = now_ns();
        for (int i = 0; i < RENDERS; i++) {
            if (rpc_metrics_render(metrics, &text, &len) != 0)
                return 1;
            free(text);
        }
        printf("render with 64 models: %.1f us, %zu bytes\n", (now_ns() - t0) / RENDERS / 1e3, len);
    }
    rpc_metrics_free(metrics);
    eplb_registry_close(reg);
    free(load);
    return 0;
}
