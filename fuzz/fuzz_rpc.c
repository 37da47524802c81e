/* fuzz_rpc.c -- libFuzzer target for one RPC handler: decode + handler +
 * encode, on an in-memory registry, exactly as rpc_server.c calls it
 * (minus gRPC).  Built once per line of fuzz/rpcs.txt with
 *   FUZZ_HANDLER   the handler (rpc_register_model, ...)
 *   FUZZ_RESPONSE  its response message (eplb_v1_Placement, ...)
 *   FUZZ_NAME      the target's name, for messages
 *
 * The registry persists across inputs, so state one input leaves (a
 * recorded load pass, a new epoch, attached weights) is what the next one
 * sees; it is rebuilt every EPLB_FUZZ_RESET_EVERY inputs (default 1000; 1
 * makes every input start from the seeded state, which is what a lone
 * crash input replays on).  Seeded models, which the corpus
 * (fuzz/make_corpus.py) names:
 *   fuzz-a      DeepseekV3ForCausalLM, 2 layers, 4 logical / 6 physical, ep 2,
 *               automatic rebalance every 4 passes, weights attached on
 *               /eplb-fuzz-r0 and -r1 (cpu backend)
 *   fuzz-b      KimiK25ForConditionalGeneration wrapping a MoE language model,
 *               3 layers, 8 / 12, ep 4 on 2 nodes, 2 expert groups
 *   fuzz-draft  a speculator of fuzz-a, 1 layer
 * shm objects /eplb-fuzz-r0..r3 (64 KiB each) exist for AttachWeights; no
 * other shm object can be opened (fuzz_shm.c).
 *
 * EPLB_FUZZ_VERBOSE=1 prints every reply's status (to see how deep seeds go).
 *
 * Beyond the sanitizers, each reply is checked: a gRPC status code, a
 * terminated message, and on OK a body that parses as FUZZ_RESPONSE. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "fuzz_shm.h"
#include "grpc/health/v1/health.upb.h"
#include "grpc/reflection/v1/reflection.upb.h"
#include "rpc_handlers.h"
#include "rpc_log.h"

#ifndef FUZZ_HANDLER
#error "build with -DFUZZ_HANDLER=rpc_... -DFUZZ_RESPONSE=... (fuzz/CMakeLists.txt)"
#endif

#define PASTE2(a, b) a##b
#define PASTE(a, b) PASTE2(a, b)
#define RESPONSE_PARSE PASTE(FUZZ_RESPONSE, _parse)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static rpc_context ctx;
static eplb_limits limits;
static unsigned long inputs, reset_every = 1000;
static int verbose; /* EPLB_FUZZ_VERBOSE=1: print each reply's status */

static void die(const char *what, const rpc_reply *r) {
    fprintf(stderr, "fuzz_%s: seeding failed: %s: status %d: %s\n", FUZZ_NAME, what, r->status, r->message);
    abort();
}

/* Run a seeding request through its handler; it must succeed. */
static void seed_call(rpc_handler_fn fn, const char *what, upb_Arena *a, const char *bytes, size_t len) {
    rpc_reply r;
    memset(&r, 0, sizeof r);
    r.peer = "unix:/run/eplbd-fuzz.sock";
    if (!bytes)
        die(what, &r);
    fn(&ctx, a, bytes, len, &r);
    if (r.status != 0)
        die(what, &r);
}

static eplb_v1_ModelHandle *moe_handle(eplb_v1_ModelHandle *h, upb_Arena *a, uint32_t layers, uint32_t logical,
                                       uint32_t physical, uint32_t local, uint32_t groups) {
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("DeepseekV3ForCausalLM"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, layers);
    eplb_v1_MoeSpec_set_num_logical_experts(m, logical);
    eplb_v1_MoeSpec_set_num_physical_experts(m, physical);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, local);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, physical - logical);
    eplb_v1_MoeSpec_set_num_expert_groups(m, groups);
    return h;
}

static void register_model(upb_Arena *a, const char *name, bool wrapped, bool speculator, uint32_t layers,
                           uint32_t logical, uint32_t physical, uint32_t ep, uint32_t nodes, uint32_t groups) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    if (wrapped) {
        eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("KimiK25ForConditionalGeneration"));
        eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_SUPPORTS_MULTIMODAL, a);
        h = eplb_v1_ModelHandle_mutable_language_model(h, a);
    }
    moe_handle(h, a, layers, logical, physical, physical / ep, groups);
    if (speculator) {
        eplb_v1_RegisterModelRequest_set_role(r, eplb_v1_MODEL_ROLE_SPECULATOR);
        eplb_v1_RegisterModelRequest_set_main_model_id(r, upb_StringView_FromString("fuzz-a"));
    }
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, ep);
    eplb_v1_ParallelConfig_set_num_nodes(p, nodes);
    eplb_v1_ParallelConfig_set_num_redundant_experts(p, physical - logical);
    if (!wrapped) {
        eplb_v1_ParallelConfig_set_window_size(p, 8);
        eplb_v1_ParallelConfig_set_step_interval(p, 4);
        eplb_v1_ParallelConfig_set_auto_rebalance(p, true);
    }
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len);
    seed_call(rpc_register_model, name, a, bytes, len);
}

/* fuzz-a's weights: two tensors per expert ("w" 64 bytes, "s" 8 bytes),
 * 3 slots per rank and layer, both layers in one object per rank. */
static void attach_fuzz_a(upb_Arena *a) {
    eplb_v1_AttachWeightsRequest *r = eplb_v1_AttachWeightsRequest_new(a);
    eplb_v1_AttachWeightsRequest_set_model_id(r, upb_StringView_FromString("fuzz-a"));
    eplb_v1_AttachWeightsRequest_set_kind(r, eplb_v1_BUFFER_KIND_SHM);
    eplb_v1_AttachWeightsRequest_set_backend(r, upb_StringView_FromString("cpu"));
    static const char *const ranks[] = { FUZZ_SHM_PREFIX "r0", FUZZ_SHM_PREFIX "r1" };
    for (int g = 0; g < 2; g++)
        eplb_v1_RankBuffer_set_shm_name(eplb_v1_AttachWeightsRequest_add_ranks(r, a),
                                        upb_StringView_FromString(ranks[g]));
    for (uint64_t l = 0; l < 2; l++) {
        eplb_v1_LayerWeights *lw = eplb_v1_AttachWeightsRequest_add_layers(r, a);
        static const struct { const char *name; uint64_t bytes, base; } tensors[] = {
            { "w", 64, 0 }, { "s", 8, 2 * 3 * 64 },
        };
        for (int t = 0; t < 2; t++) {
            eplb_v1_ExpertTensor *et = eplb_v1_LayerWeights_add_tensors(lw, a);
            eplb_v1_ExpertTensor_set_name(et, upb_StringView_FromString(tensors[t].name));
            eplb_v1_ExpertTensor_set_bytes_per_expert(et, tensors[t].bytes);
            for (int g = 0; g < 2; g++) {
                eplb_v1_TensorLayout *tl = eplb_v1_ExpertTensor_add_ranks(et, a);
                eplb_v1_TensorLayout_set_offset(tl, tensors[t].base + l * 3 * tensors[t].bytes);
                eplb_v1_TensorLayout_set_stride(tl, tensors[t].bytes);
            }
        }
    }
    size_t len;
    char *bytes = eplb_v1_AttachWeightsRequest_serialize(r, a, &len);
    seed_call(rpc_attach_weights, "AttachWeights fuzz-a", a, bytes, len);
}

static void registry_seed(void) {
    eplb_error err;
    eplb_error_clear(&err);
    if (eplb_registry_open(NULL, NULL, &limits, &ctx.registry, &err) != EPLB_OK) {
        fprintf(stderr, "fuzz_%s: eplb_registry_open: %s\n", FUZZ_NAME, err.msg);
        abort();
    }
    upb_Arena *a = upb_Arena_New();
    register_model(a, "fuzz-a", false, false, 2, 4, 6, 2, 1, 1);
    register_model(a, "fuzz-b", true, false, 3, 8, 12, 4, 2, 2);
    register_model(a, "fuzz-draft", false, true, 1, 4, 6, 2, 1, 1);
    attach_fuzz_a(a);
    upb_Arena_Free(a);
}

static void registry_reset(void) {
    eplb_registry_close(ctx.registry);
    ctx.registry = NULL;
    registry_seed();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *e = getenv("EPLB_FUZZ_RESET_EVERY");
    if (e && atol(e) > 0)
        reset_every = (unsigned long)atol(e);
    verbose = getenv("EPLB_FUZZ_VERBOSE") && atoi(getenv("EPLB_FUZZ_VERBOSE")) > 0;
    /* Never dlopen a HIP backend named by the environment. */
    unsetenv("EPLB_HIP_BACKEND");
    unsetenv("EPLB_CUDA_BACKEND");
    rpc_log_set_level(RPC_LOG_ERROR);
    /* Small limits keep each model, and so each input, cheap. */
    limits = EPLB_LIMITS_DEFAULT;
    limits.max_layers = 64;
    limits.max_physical_experts = 256;
    limits.max_ep_size = 64;
    limits.max_window_bytes = 1u << 20;
    limits.max_models = 16;
    limits.max_state_bytes = 64u << 20;
    limits.max_response_bytes = 4u << 20;
    ctx.limits = limits;
    atomic_init(&ctx.serving, true);
    ctx.default_backend = "cpu";
    ctx.shm_prefix = FUZZ_SHM_PREFIX;
    ctx.num_shm_uids = 0;
    ctx.allow_remote_weights = false;
    for (int g = 0; g < 4; g++) {
        char suffix[8];
        snprintf(suffix, sizeof suffix, "r%d", g);
        fuzz_shm_create(suffix, 64 << 10);
    }
    registry_seed();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (++inputs % reset_every == 0)
        registry_reset();
    upb_Arena *arena = upb_Arena_New();
    if (!arena)
        abort();
    rpc_reply out;
    memset(&out, 0, sizeof out);
    out.peer = "unix:/run/eplbd-fuzz.sock";
    FUZZ_HANDLER(&ctx, arena, (const char *)data, size, &out);

    if (verbose)
        fprintf(stderr, "fuzz_%s: %zu bytes: status %d %s\n", FUZZ_NAME, size, out.status,
                out.status ? out.message : "OK");
    if (out.status < 0 || out.status > 16) {
        fprintf(stderr, "fuzz_%s: status %d is no gRPC status\n", FUZZ_NAME, out.status);
        abort();
    }
    if (out.status != 0 && memchr(out.message, '\0', sizeof out.message) == NULL) {
        fprintf(stderr, "fuzz_%s: status message not terminated\n", FUZZ_NAME);
        abort();
    }
    if (out.status == 0) {
        if (!out.body) {
            fprintf(stderr, "fuzz_%s: OK without a response body\n", FUZZ_NAME);
            abort();
        }
        if (!RESPONSE_PARSE(out.body, out.body_len, arena)) {
            fprintf(stderr, "fuzz_%s: the OK response does not parse (%zu bytes)\n", FUZZ_NAME, out.body_len);
            abort();
        }
    }
    upb_Arena_Free(arena);
    return 0;
}
