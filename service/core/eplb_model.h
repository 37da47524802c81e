/* eplb_model.h -- model handles, their unwrapping, and the MoE shape a
 * registered model is balanced with.
 *
 * A handle describes an inference engine's model object: its architecture,
 * the interfaces it implements, its MoE metadata, and for a multimodal
 * wrapper the handle its get_language_model() returns.  Unwrapping follows
 * vLLM (#39805, #42706) and goes further: it applies to speculators too and
 * recurses through wrappers of wrappers, up to EPLB_HANDLE_MAX_DEPTH.
 *
 * Plain C: no gRPC, upb or SQLite here.  Handles are built by the caller
 * (the RPC layer, from a request) and never owned by these functions. */
#ifndef EPLB_MODEL_H
#define EPLB_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "eplb_status.h"

/* More .language_model hops than this are refused: real models nest one or two levels
 * (drafter -> VLM -> language model); anything deeper is a malformed handle. */
#define EPLB_HANDLE_MAX_DEPTH 8

#define EPLB_MODEL_NAME_MAX 128
#define EPLB_REBALANCE_ID_MAX 32 /* a stepped rebalance's id (eplb_pending.h) */
#define EPLB_ARCH_MAX 128
/* "Arch" + EPLB_HANDLE_MAX_DEPTH * ".language_model" with room to spare. */
#define EPLB_PATH_MAX (EPLB_ARCH_MAX + 16 * (EPLB_HANDLE_MAX_DEPTH + 1))

enum {
    EPLB_IFACE_MOE = 1u << 0,        /* implements MixtureOfExperts */
    EPLB_IFACE_MULTIMODAL = 1u << 1, /* implements SupportsMultiModal */
};

typedef struct eplb_moe_spec {
    uint32_t num_moe_layers;
    uint32_t num_logical_experts;        /* N */
    uint32_t num_physical_experts;       /* P = N + redundant */
    uint32_t num_local_physical_experts; /* P / ep_size */
    uint32_t num_routed_experts;         /* 0 = same as N */
    uint32_t num_shared_experts;         /* informational */
    uint32_t num_redundant_experts;
    uint32_t num_expert_groups;          /* 0 = 1 */
} eplb_moe_spec;

typedef struct eplb_handle {
    const char *architecture;                  /* never NULL; "" when unset */
    unsigned interfaces;                       /* EPLB_IFACE_* bits */
    bool has_moe;                              /* moe below is meaningful */
    eplb_moe_spec moe;
    const struct eplb_handle *language_model; /* NULL when absent */
} eplb_handle;

/* vLLM's is_mixture_of_experts(): implements MixtureOfExperts and has MoE
 * layers. */
bool eplb_handle_is_moe(const eplb_handle *h);

typedef struct eplb_resolved {
    const eplb_handle *moe;         /* the MoE handle, or NULL when none qualified */
    char path[EPLB_PATH_MAX];       /* "KimiK25ForConditionalGeneration.language_model" */
    char field[EPLB_PATH_MAX];      /* request field of moe: "model.language_model" */
    char reason[EPLB_ERROR_MSG_MAX];/* why no handle qualified (moe == NULL) */
} eplb_resolved;

/* Resolve h to the MoE model to balance.  field names h in the request
 * ("model") so errors can name the exact field.
 *
 * EPLB_OK with out->moe set: the MoE handle and the path taken.
 * EPLB_OK with out->moe NULL: no MoE model anywhere; out->reason says why.
 * EPLB_EINVAL: a malformed handle (missing architecture, a MoE declaration
 * with zero layers, nesting past EPLB_HANDLE_MAX_DEPTH). */
eplb_status eplb_handle_resolve(const eplb_handle *h, const char *field,
                                eplb_resolved *out, eplb_error *err);

/* Which policy computes a rebalance (RebalanceRequest.policy). */
typedef enum eplb_policy_kind {
    EPLB_POLICY_DEEPSEEK = 0,    /* DeepSeek's EPLB from scratch, bit-exact */
    EPLB_POLICY_INCREMENTAL = 1, /* from the current placement, by gain per byte (eplb_incremental.h) */
} eplb_policy_kind;

/* The knobs of a cost-aware rebalance: a request's, or a model's defaults
 * for its automatic rebalances (ParallelConfig).  0 means the default in
 * every field. */
typedef struct eplb_rebalance_knobs {
    uint32_t policy;             /* eplb_policy_kind */
    double target_balancedness;  /* fraction of the from-scratch balancedness, (0, 1]; 0 = 0.99 */
    uint64_t max_bytes_moved;    /* bytes copied across GPUs; 0 = no budget */
    uint64_t max_slots_moved;    /* slots rewritten; 0 = no budget */
    double min_improvement;      /* commit gate, [0, 1] */
    double cost_intra_node;      /* weight of a byte between GPUs of a node; 0 = 1 */
    double cost_cross_node;      /* weight of a byte between nodes; 0 = 4 */
    uint64_t expert_bytes;       /* one expert's bytes in one layer; 0 = unknown */
} eplb_rebalance_knobs;

#define EPLB_DEFAULT_TARGET_BALANCEDNESS 0.99
#define EPLB_DEFAULT_COST_INTRA_NODE 1.0
#define EPLB_DEFAULT_COST_CROSS_NODE 4.0

/* Check knobs (field prefixes messages: "parallel" or ""): policy known,
 * target in [0, 1], min_improvement in [0, 1], costs finite and >= 0. */
eplb_status eplb_rebalance_knobs_check(const eplb_rebalance_knobs *k, const char *field, eplb_error *err);

typedef struct eplb_parallel {
    bool enable_eplb;
    uint32_t ep_size;               /* >= 1 */
    uint32_t num_nodes;             /* 0 = 1 */
    uint32_t window_size;           /* 0 = EPLB_DEFAULT_WINDOW_SIZE */
    uint32_t step_interval;         /* 0 = EPLB_DEFAULT_STEP_INTERVAL */
    uint32_t num_redundant_experts; /* 0 = take the model's */
    bool auto_rebalance;            /* rebalance every step_interval recorded passes */
    eplb_rebalance_knobs defaults;  /* of automatic rebalances */
} eplb_parallel;

/* vLLM's EPLBConfig defaults. */
#define EPLB_DEFAULT_WINDOW_SIZE 1000u
#define EPLB_DEFAULT_STEP_INTERVAL 3000u

/* Server-side size limits (flags of eplbd). */
typedef struct eplb_limits {
    uint32_t max_layers;
    uint32_t max_physical_experts;
    uint32_t max_ep_size;
    uint64_t max_window_bytes;   /* a model's full load window (--max-window-mib) */
    uint32_t max_models;         /* registered models, main and speculators (--max-models) */
    uint64_t max_state_bytes;    /* all models' placements + full windows, as
                                  * eplb_model_state_bytes counts them (--max-state-mib) */
    uint64_t max_response_bytes; /* the largest response a call may produce
                                  * (--max-message-bytes): a shape whose GetPlacement
                                  * could not be sent is refused at registration */
} eplb_limits;

#define EPLB_LIMITS_DEFAULT                                                                      \
    ((eplb_limits){ .max_layers = 1024, .max_physical_experts = 8192, .max_ep_size = 4096,      \
                    .max_window_bytes = 256ull << 20, .max_models = 64,                         \
                    .max_state_bytes = 1024ull << 20, .max_response_bytes = 64ull << 20 })

/* Everything a registered model is balanced with, defaults applied. */
typedef struct eplb_model_shape {
    uint32_t num_layers;    /* L */
    uint32_t num_logical;   /* N */
    uint32_t num_physical;  /* P */
    uint32_t num_local;     /* P / ep_size */
    uint32_t num_redundant; /* P - N */
    uint32_t num_shared;    /* informational */
    uint32_t num_groups;    /* >= 1, divides N */
    uint32_t ep_size;       /* >= 1, divides P */
    uint32_t num_nodes;     /* >= 1, divides ep_size */
    uint32_t window_size;   /* passes in the load window */
    uint32_t step_interval; /* passes between automatic rebalances */
    bool auto_rebalance;    /* rebalance by itself every step_interval passes */
    eplb_rebalance_knobs defaults; /* automatic rebalances' policy, budgets, gate (stored) */
} eplb_model_shape;

/* Check a resolved handle's MoE metadata against the parallel config and the
 * limits, and fill *out.  field names the handle ("model.language_model") so
 * a message names the exact field, e.g. "model.moe.num_physical_experts 290
 * != num_logical_experts 256 + num_redundant_experts 32".  On error *out is
 * unspecified. */
eplb_status eplb_model_shape_make(const eplb_moe_spec *moe, const char *field,
                                  const eplb_parallel *par, const eplb_limits *lim,
                                  eplb_model_shape *out, eplb_error *err);

/* Upper bound of a placement response of this shape (phy2log and replica
 * counts, without logical_to_physical, which GetPlacement sizes per call). */
uint64_t eplb_model_response_bytes(const eplb_model_shape *s);

/* What a registered model of this shape may cost the server at most, in
 * memory and database together: its placement (map, counts, an estimate of
 * logical_to_physical) and its full load window.  Counted against
 * eplb_limits.max_state_bytes. */
uint64_t eplb_model_state_bytes(const eplb_model_shape *s);

/* 1..EPLB_MODEL_NAME_MAX characters of [A-Za-z0-9._:/-]. */
eplb_status eplb_model_name_check(const char *name, const char *field, eplb_error *err);

#endif
