/* rpc_weights.c -- AttachWeights / DetachWeights, and the adapter that lets
 * the registry move weights: eplb_weights_ops implemented with transfer
 * plans (core) executed by a gpu/ backend (cpu over shm, hip over IPC). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_backend.h"
#include "eplb_plan.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"

/* ---- the mover: eplb_weights_ops over a backend -------------------------- */

typedef struct weights_mover {
    eplb_backend *backend;
    uint32_t num_layers, num_physical, num_gpus, gpus_per_node; /* the layout it was opened for */
    uint64_t *layer_bytes; /* [L] bytes of one expert in that layer, all tensors */
} weights_mover;

static eplb_status mover_plan(const weights_mover *m, uint32_t layer, uint32_t P, const int32_t *old_row,
                              const int32_t *new_row, eplb_plan *plan, eplb_error *err) {
    eplb_status st = eplb_plan_build(P, m->num_gpus, m->gpus_per_node, old_row, new_row, 0, m->num_gpus, plan, err);
    if (st != EPLB_OK && err) {
        char msg[EPLB_ERROR_MSG_MAX];
        snprintf(msg, sizeof msg, "layer %u: %s", layer, err->msg);
        eplb_error_set(err, st, "%s", msg);
    }
    return st;
}

static eplb_status mover_check(void *ctx, uint32_t L, uint32_t P, const int32_t *old_phy2log,
                               const int32_t *new_phy2log, eplb_error *err) {
    weights_mover *m = ctx;
    if (L != m->num_layers || P != m->num_physical)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "the attached weights are laid out for %u layers x %u slots, the model has %u x %u: "
                              "attach them again", m->num_layers, m->num_physical, L, P);
    for (uint32_t l = 0; l < L; l++) {
        eplb_plan plan;
        eplb_status st = mover_plan(m, l, P, old_phy2log + (size_t)l * P, new_phy2log + (size_t)l * P, &plan, err);
        eplb_plan_free(&plan);
        if (st != EPLB_OK)
            return st;
    }
    return EPLB_OK;
}

static eplb_status mover_move_layer(void *ctx, uint32_t layer, uint32_t P, const int32_t *old_row,
                                    const int32_t *new_row, uint64_t *bytes, eplb_error *err) {
    weights_mover *m = ctx;
    eplb_plan plan;
    *bytes = 0;
    eplb_status st = mover_plan(m, layer, P, old_row, new_row, &plan, err);
    if (st == EPLB_OK && plan.num_gather + plan.num_scatter > 0) {
        st = eplb_backend_execute_layer(m->backend, layer, &plan, err);
        /* A failed scatter keeps its staging: run phase 2 again once. */
        if (st == EPLB_EDATALOSS)
            st = eplb_backend_execute_layer(m->backend, layer, &plan, err);
        /* The slots were written: a failure to synchronize now leaves the
         * layer in an unknown state, not "as it was". */
        if (st == EPLB_OK && eplb_backend_synchronize(m->backend, err) != EPLB_OK)
            st = EPLB_EDATALOSS;
        *bytes = (uint64_t)(plan.num_gather + plan.num_scatter) * m->layer_bytes[layer];
    }
    eplb_plan_free(&plan);
    return st;
}

static void mover_close(void *ctx) {
    weights_mover *m = ctx;
    if (!m)
        return;
    eplb_backend_close(m->backend);
    free(m->layer_bytes);
    free(m);
}

static const eplb_weights_ops mover_ops = {
    .check = mover_check,
    .move_layer = mover_move_layer,
    .close = mover_close,
};

/* ---- AttachWeights -------------------------------------------------------- */

/* Build the backend's description from the request, in the arena.  Shape
 * checks the description cannot express (counts) are made here; the rest is
 * eplb_buffers_validate's, inside eplb_backend_open_by_name. */
static eplb_status desc_from_upb(const eplb_v1_AttachWeightsRequest *m, const eplb_model_shape *shape,
                                 upb_Arena *arena, eplb_buffers_desc *d, uint64_t *layer_bytes, eplb_error *err) {
    memset(d, 0, sizeof *d);
    int32_t kind = eplb_v1_AttachWeightsRequest_kind(m);
    if (kind == eplb_v1_BUFFER_KIND_SHM)
        d->kind = EPLB_BUFFERS_SHM;
    else if (kind == eplb_v1_BUFFER_KIND_HIP_IPC)
        d->kind = EPLB_BUFFERS_HIP_IPC;
    else
        return eplb_error_set(err, EPLB_EINVAL, "kind must be BUFFER_KIND_SHM or BUFFER_KIND_HIP_IPC");
    size_t nranks, nlayers;
    const eplb_v1_RankBuffer *const *ranks = eplb_v1_AttachWeightsRequest_ranks(m, &nranks);
    const eplb_v1_LayerWeights *const *layers = eplb_v1_AttachWeightsRequest_layers(m, &nlayers);
    if (nranks != shape->ep_size)
        return eplb_error_set(err, EPLB_EINVAL, "ranks has %zu entries, the model's ep_size is %u", nranks,
                              shape->ep_size);
    if (nlayers != shape->num_layers)
        return eplb_error_set(err, EPLB_EINVAL, "layers has %zu entries, the model has %u MoE layers", nlayers,
                              shape->num_layers);
    eplb_rank_location *loc = upb_Arena_Malloc(arena, nranks * sizeof *loc);
    eplb_layer_desc *ld = upb_Arena_Malloc(arena, nlayers * sizeof *ld);
    if (!loc || !ld)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    memset(loc, 0, nranks * sizeof *loc);
    for (size_t g = 0; g < nranks; g++) {
        upb_StringView name = eplb_v1_RankBuffer_shm_name(ranks[g]);
        upb_StringView handle = eplb_v1_RankBuffer_hip_ipc_handle(ranks[g]);
        if (name.size > EPLB_SHM_NAME_MAX)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu].shm_name is longer than %d bytes", g,
                                  EPLB_SHM_NAME_MAX);
        if (d->kind == EPLB_BUFFERS_HIP_IPC && handle.size != EPLB_IPC_HANDLE_SIZE)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu].hip_ipc_handle is %zu bytes, want %d", g, handle.size,
                                  EPLB_IPC_HANDLE_SIZE);
        memcpy(loc[g].shm_name, name.data, name.size);
        if (handle.size == EPLB_IPC_HANDLE_SIZE)
            memcpy(loc[g].ipc_handle, handle.data, handle.size);
        loc[g].device = eplb_v1_RankBuffer_device(ranks[g]);
        loc[g].size = eplb_v1_RankBuffer_size(ranks[g]);
    }
    for (size_t l = 0; l < nlayers; l++) {
        size_t nt;
        const eplb_v1_ExpertTensor *const *tensors = eplb_v1_LayerWeights_tensors(layers[l], &nt);
        if (nt == 0 || nt > EPLB_BUFFERS_MAX_TENSORS)
            return eplb_error_set(err, EPLB_EINVAL, "layers[%zu] has %zu tensors (1..%d)", l, nt,
                                  EPLB_BUFFERS_MAX_TENSORS);
        eplb_tensor_desc *td = upb_Arena_Malloc(arena, nt * sizeof *td);
        if (!td)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        memset(td, 0, nt * sizeof *td);
        layer_bytes[l] = 0;
        for (size_t t = 0; t < nt; t++) {
            upb_StringView name = eplb_v1_ExpertTensor_name(tensors[t]);
            if (name.size == 0 || name.size > EPLB_TENSOR_NAME_MAX)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%zu].tensors[%zu].name must be 1..%d bytes", l, t,
                                      EPLB_TENSOR_NAME_MAX);
            memcpy(td[t].name, name.data, name.size);
            td[t].bytes_per_expert = eplb_v1_ExpertTensor_bytes_per_expert(tensors[t]);
            layer_bytes[l] += td[t].bytes_per_expert;
            size_t nr;
            const eplb_v1_TensorLayout *const *lay = eplb_v1_ExpertTensor_ranks(tensors[t], &nr);
            if (nr != nranks)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%zu].tensors[%zu] (%s).ranks has %zu entries, want %zu",
                                      l, t, td[t].name, nr, nranks);
            eplb_tensor_layout *tl = upb_Arena_Malloc(arena, nr * sizeof *tl);
            if (!tl)
                return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
            for (size_t g = 0; g < nr; g++) {
                tl[g].offset = eplb_v1_TensorLayout_offset(lay[g]);
                tl[g].stride = eplb_v1_TensorLayout_stride(lay[g]);
            }
            td[t].ranks = tl;
        }
        ld[l].num_tensors = (uint32_t)nt;
        ld[l].tensors = td;
    }
    d->num_layers = (uint32_t)nlayers;
    d->num_ranks = (uint32_t)nranks;
    d->ranks = loc;
    d->layers = ld;
    return EPLB_OK;
}

void rpc_attach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_AttachWeightsRequest *m = eplb_v1_AttachWeightsRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.AttachWeightsRequest");
        return;
    }
    const char *id = rpc_string(eplb_v1_AttachWeightsRequest_model_id(m), 4 * EPLB_MODEL_NAME_MAX, "model_id",
                                arena, &err);
    const char *backend = rpc_string(eplb_v1_AttachWeightsRequest_backend(m), 16, "backend", arena, &err);
    eplb_model_shape shape;
    if (!id || !backend || eplb_model_name_check(id, "model_id", &err) != EPLB_OK ||
        eplb_registry_get_shape(ctx->registry, id, &shape, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    weights_mover *mv = calloc(1, sizeof *mv);
    uint64_t *layer_bytes = calloc(shape.num_layers, sizeof *layer_bytes);
    eplb_buffers_desc desc;
    eplb_status st = !mv || !layer_bytes ? eplb_error_set(&err, EPLB_ENOMEM, "out of memory")
                                         : desc_from_upb(m, &shape, arena, &desc, layer_bytes, &err);
    if (st == EPLB_OK)
        st = eplb_backend_open_by_name(backend[0] ? backend : ctx->default_backend, &desc, shape.num_physical,
                                       &mv->backend, &err);
    if (st != EPLB_OK) {
        free(mv);
        free(layer_bytes);
        rpc_reply_from_error(out, &err);
        return;
    }
    mv->num_layers = shape.num_layers;
    mv->num_physical = shape.num_physical;
    mv->num_gpus = shape.ep_size;
    mv->gpus_per_node = shape.ep_size / shape.num_nodes;
    mv->layer_bytes = layer_bytes;
    const char *name = eplb_backend_name(mv->backend);
    uint64_t total = 0;
    for (uint32_t l = 0; l < shape.num_layers; l++)
        total += layer_bytes[l];
    /* The registry owns mv from here, on success or not. */
    if (eplb_registry_attach_weights(ctx->registry, id, &mover_ops, mv, &shape, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_AttachWeightsResponse *resp = eplb_v1_AttachWeightsResponse_new(arena);
    if (resp) {
        eplb_v1_AttachWeightsResponse_set_backend(resp, upb_StringView_FromString(name));
        eplb_v1_AttachWeightsResponse_set_bytes_per_slot(resp, total);
        out->body = eplb_v1_AttachWeightsResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_detach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_DetachWeightsRequest *m = eplb_v1_DetachWeightsRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.DetachWeightsRequest");
        return;
    }
    const char *id = rpc_string(eplb_v1_DetachWeightsRequest_model_id(m), 4 * EPLB_MODEL_NAME_MAX, "model_id",
                                arena, &err);
    bool detached = false;
    if (!id || eplb_model_name_check(id, "model_id", &err) != EPLB_OK ||
        eplb_registry_detach_weights(ctx->registry, id, &detached, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_DetachWeightsResponse *resp = eplb_v1_DetachWeightsResponse_new(arena);
    if (resp) {
        eplb_v1_DetachWeightsResponse_set_detached(resp, detached);
        out->body = eplb_v1_DetachWeightsResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
