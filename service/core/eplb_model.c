/* eplb_model.c -- handle unwrapping and MoE shape validation. */
#include "eplb_model.h"

#include "eplb_load.h"

#include <stdio.h>
#include <string.h>

bool eplb_handle_is_moe(const eplb_handle *h) {
    return (h->interfaces & EPLB_IFACE_MOE) && h->has_moe && h->moe.num_moe_layers > 0;
}

eplb_status eplb_handle_resolve(const eplb_handle *h, const char *field,
                                eplb_resolved *out, eplb_error *err) {
    memset(out, 0, sizeof *out);
    snprintf(out->field, sizeof out->field, "%s", field);
    if (!h)
        return eplb_error_set(err, EPLB_EINVAL, "%s is required", field);
    if (!h->architecture[0])
        return eplb_error_set(err, EPLB_EINVAL, "%s.architecture is empty", field);
    snprintf(out->path, sizeof out->path, "%.*s", EPLB_ARCH_MAX, h->architecture);

    for (int depth = 0;; depth++) {
        if (eplb_handle_is_moe(h)) {
            out->moe = h;
            return EPLB_OK;
        }
        if (h->interfaces & EPLB_IFACE_MOE) {
            /* vLLM would call this "not MoE" and register nothing, silently;
             * a handle that declares MoE with no MoE layer or no metadata is
             * a bug in the caller, so say so -- unless it is a wrapper whose
             * language model may still be the MoE model. */
            if (!(h->interfaces & EPLB_IFACE_MULTIMODAL) || !h->language_model) {
                if (!h->has_moe)
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "%s declares MIXTURE_OF_EXPERTS but %s.moe is not set",
                                          out->field, out->field);
                return eplb_error_set(err, EPLB_EINVAL,
                                      "%s declares MIXTURE_OF_EXPERTS but %s.moe.num_moe_layers is 0",
                                      out->field, out->field);
            }
        }
        if (!(h->interfaces & EPLB_IFACE_MULTIMODAL)) {
            snprintf(out->reason, sizeof out->reason,
                     "%s (%s) is not a Mixture-of-Experts model and not a multimodal wrapper",
                     out->path, out->field);
            return EPLB_OK;
        }
        if (!h->language_model) {
            snprintf(out->reason, sizeof out->reason,
                     "%s (%s) is a multimodal wrapper that is not MoE and has no language_model",
                     out->path, out->field);
            return EPLB_OK;
        }
        if (depth >= EPLB_HANDLE_MAX_DEPTH)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "model handle nests more than %d wrapper levels (at %s)",
                                  EPLB_HANDLE_MAX_DEPTH, out->field);
        h = h->language_model;
        /* Both buffers are sized for EPLB_HANDLE_MAX_DEPTH levels. */
        strncat(out->path, ".language_model", sizeof out->path - strlen(out->path) - 1);
        strncat(out->field, ".language_model", sizeof out->field - strlen(out->field) - 1);
        if (!h->architecture[0])
            return eplb_error_set(err, EPLB_EINVAL, "%s.architecture is empty", out->field);
    }
}

eplb_status eplb_model_shape_make(const eplb_moe_spec *moe, const char *field,
                                  const eplb_parallel *par, const eplb_limits *lim,
                                  eplb_model_shape *out, eplb_error *err) {
    const char *f = field;
    memset(out, 0, sizeof *out);

    if (moe->num_moe_layers == 0)
        return eplb_error_set(err, EPLB_EINVAL, "%s.moe.num_moe_layers must be > 0", f);
    if (moe->num_moe_layers > lim->max_layers)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_moe_layers %u exceeds the server limit %u (--max-layers)",
                              f, moe->num_moe_layers, lim->max_layers);
    if (moe->num_logical_experts == 0)
        return eplb_error_set(err, EPLB_EINVAL, "%s.moe.num_logical_experts must be > 0", f);
    if (moe->num_physical_experts == 0)
        return eplb_error_set(err, EPLB_EINVAL, "%s.moe.num_physical_experts must be > 0", f);
    if (moe->num_physical_experts > lim->max_physical_experts)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_physical_experts %u exceeds the server limit %u (--max-experts)",
                              f, moe->num_physical_experts, lim->max_physical_experts);
    if (moe->num_routed_experts != 0 && moe->num_routed_experts != moe->num_logical_experts)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_routed_experts %u != num_logical_experts %u",
                              f, moe->num_routed_experts, moe->num_logical_experts);
    if ((uint64_t)moe->num_logical_experts + moe->num_redundant_experts != moe->num_physical_experts)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_physical_experts %u != num_logical_experts %u + num_redundant_experts %u",
                              f, moe->num_physical_experts, moe->num_logical_experts,
                              moe->num_redundant_experts);
    if (par->num_redundant_experts != 0 && par->num_redundant_experts != moe->num_redundant_experts)
        return eplb_error_set(err, EPLB_EINVAL,
                              "parallel.num_redundant_experts %u != %s.moe.num_redundant_experts %u",
                              par->num_redundant_experts, f, moe->num_redundant_experts);
    if (par->ep_size == 0)
        return eplb_error_set(err, EPLB_EINVAL, "parallel.ep_size must be >= 1");
    if (par->ep_size > lim->max_ep_size)
        return eplb_error_set(err, EPLB_EINVAL,
                              "parallel.ep_size %u exceeds the server limit %u (--max-ep-size)",
                              par->ep_size, lim->max_ep_size);
    if (moe->num_physical_experts % par->ep_size != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_physical_experts %u is not a multiple of parallel.ep_size %u",
                              f, moe->num_physical_experts, par->ep_size);
    if (moe->num_local_physical_experts != moe->num_physical_experts / par->ep_size)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_local_physical_experts %u != num_physical_experts %u / ep_size %u",
                              f, moe->num_local_physical_experts, moe->num_physical_experts, par->ep_size);
    uint32_t groups = moe->num_expert_groups ? moe->num_expert_groups : 1;
    if (moe->num_logical_experts % groups != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe.num_logical_experts %u is not a multiple of num_expert_groups %u",
                              f, moe->num_logical_experts, groups);
    uint32_t nodes = par->num_nodes ? par->num_nodes : 1;
    if (par->ep_size % nodes != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "parallel.ep_size %u is not a multiple of parallel.num_nodes %u",
                              par->ep_size, nodes);

    out->num_layers = moe->num_moe_layers;
    out->num_logical = moe->num_logical_experts;
    out->num_physical = moe->num_physical_experts;
    out->num_local = moe->num_local_physical_experts;
    out->num_redundant = moe->num_redundant_experts;
    out->num_shared = moe->num_shared_experts;
    out->num_groups = groups;
    out->ep_size = par->ep_size;
    out->num_nodes = nodes;
    out->window_size = par->window_size ? par->window_size : EPLB_DEFAULT_WINDOW_SIZE;
    out->step_interval = par->step_interval ? par->step_interval : EPLB_DEFAULT_STEP_INTERVAL;
    out->auto_rebalance = par->auto_rebalance;
    eplb_status kst = eplb_rebalance_knobs_check(&par->defaults, "parallel.", err);
    if (kst != EPLB_OK)
        return kst;
    out->defaults = par->defaults;
    /* The window is [window_size][L][N] int64s once full: refuse what the
     * server could not hold rather than fail at the 900th pass. */
    uint64_t window = (uint64_t)out->window_size * out->num_layers * out->num_logical * sizeof(int64_t);
    if (window > lim->max_window_bytes)
        return eplb_error_set(err, EPLB_EINVAL,
                              "parallel.window_size %u needs a %llu MiB load window for %u layers x %u experts; "
                              "the server limit is %llu MiB (--max-window-mib)",
                              out->window_size, (unsigned long long)(window >> 20), out->num_layers,
                              out->num_logical, (unsigned long long)(lim->max_window_bytes >> 20));
    uint64_t response = eplb_model_response_bytes(out);
    if (lim->max_response_bytes && response > lim->max_response_bytes)
        return eplb_error_set(err, EPLB_EINVAL,
                              "%s.moe: a placement of %u layers x %u slots takes up to %llu bytes on the wire, over "
                              "the server's largest response of %llu bytes (--max-message-bytes)",
                              f, out->num_layers, out->num_physical, (unsigned long long)response,
                              (unsigned long long)lim->max_response_bytes);
    return EPLB_OK;
}

eplb_status eplb_rebalance_knobs_check(const eplb_rebalance_knobs *k, const char *field, eplb_error *err) {
    if (k->policy != EPLB_POLICY_DEEPSEEK && k->policy != EPLB_POLICY_INCREMENTAL)
        return eplb_error_set(err, EPLB_EINVAL, "%spolicy %u is not a known Policy", field, k->policy);
    /* Written so that NaN fails every test. */
    if (!(k->target_balancedness >= 0 && k->target_balancedness <= 1))
        return eplb_error_set(err, EPLB_EINVAL, "%starget_balancedness %g is not in (0, 1] (0 = the default %g)",
                              field, k->target_balancedness, EPLB_DEFAULT_TARGET_BALANCEDNESS);
    if (!(k->min_improvement >= 0 && k->min_improvement <= 1))
        return eplb_error_set(err, EPLB_EINVAL, "%smin_improvement %g is not in [0, 1]", field, k->min_improvement);
    if (!(k->cost_intra_node >= 0 && k->cost_intra_node <= 1e6) || !(k->cost_cross_node >= 0 && k->cost_cross_node <= 1e6))
        return eplb_error_set(err, EPLB_EINVAL, "%slink_costs (intra_node %g, cross_node %g) must be in [0, 1e6]", field,
                              k->cost_intra_node, k->cost_cross_node);
    return EPLB_OK;
}

uint64_t eplb_model_response_bytes(const eplb_model_shape *s) {
    uint64_t L = s->num_layers, N = s->num_logical, P = s->num_physical;
    /* Packed varints: an int32 takes at most 5 bytes, -1 takes 10; the
     * replica counts at most 5; per-layer balancedness 2 x 8 (+ tags). */
    return 10 * L * P + 5 * L * N + 18 * L + 4096;
}

uint64_t eplb_model_state_bytes(const eplb_model_shape *s) {
    uint64_t L = s->num_layers, N = s->num_logical, P = s->num_physical;
    uint64_t X = P - N + 1; /* most replicas one expert can have */
    uint64_t placement = 4 * L * P + 4 * L * N + 4 * L * N * (X < 64 ? X : 64);
    uint64_t window = eplb_load_window_bytes(s->num_layers, s->num_logical, s->window_size) + 8 * L * N;
    /* In memory and in the database (map blob, window blob). */
    return 2 * (placement + window);
}

eplb_status eplb_model_name_check(const char *name, const char *field, eplb_error *err) {
    size_t n = strlen(name);
    if (n == 0)
        return eplb_error_set(err, EPLB_EINVAL, "%s is empty", field);
    if (n > EPLB_MODEL_NAME_MAX)
        return eplb_error_set(err, EPLB_EINVAL, "%s is %zu characters long (at most %d)",
                              field, n, EPLB_MODEL_NAME_MAX);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == ':' || c == '/' || c == '-';
        if (!ok)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "%s has character 0x%02x at offset %zu (allowed: A-Z a-z 0-9 . _ : / -)",
                                  field, c, i);
    }
    return EPLB_OK;
}
