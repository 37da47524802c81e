/* rpc_models.c -- ListModels and DeleteModel: decode, call the registry,
 * encode.  ListModels never waits for an operation on a model (it reads
 * published state); DeleteModel's refusals are the registry's. */
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"

static bool summary_to_upb(const eplb_model_summary *s, eplb_v1_ModelSummary *m, upb_Arena *arena) {
    upb_StringView v;
    if (!rpc_arena_view(s->model_id, arena, &v))
        return false;
    eplb_v1_ModelSummary_set_model_id(m, v);
    if (s->damaged[0]) {
        if (!rpc_arena_view(s->damaged, arena, &v))
            return false;
        eplb_v1_ModelSummary_set_damaged(m, v);
        return true;
    }
    eplb_v1_ModelSummary_set_role(m, (int32_t)s->role);
    if (!rpc_arena_view(s->main_model_id, arena, &v))
        return false;
    eplb_v1_ModelSummary_set_main_model_id(m, v);
    if (!rpc_arena_view(s->architecture, arena, &v))
        return false;
    eplb_v1_ModelSummary_set_architecture(m, v);
    if (!rpc_arena_view(s->resolved_path, arena, &v))
        return false;
    eplb_v1_ModelSummary_set_resolved_path(m, v);
    eplb_v1_ModelSummary_set_epoch(m, s->epoch);
    eplb_v1_ModelSummary_set_num_layers(m, s->shape.num_layers);
    eplb_v1_ModelSummary_set_num_logical_experts(m, s->shape.num_logical);
    eplb_v1_ModelSummary_set_num_physical_experts(m, s->shape.num_physical);
    eplb_v1_ModelSummary_set_ep_size(m, s->shape.ep_size);
    eplb_v1_ModelSummary_set_num_nodes(m, s->shape.num_nodes);
    eplb_v1_ModelSummary_set_state(m, (int32_t)s->state);
    if (!rpc_arena_view(s->state_reason, arena, &v))
        return false;
    eplb_v1_ModelSummary_set_state_reason(m, v);
    eplb_v1_ModelSummary_set_weights_attached(m, s->weights_attached);
    return true;
}

void rpc_list_models(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    if (!eplb_v1_ListModelsRequest_parse(req, len, arena)) {
        rpc_reply_malformed(out, "eplb.v1.ListModelsRequest");
        return;
    }
    eplb_model_summary *all;
    size_t n;
    if (eplb_registry_list(ctx->registry, &all, &n, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_ListModelsResponse *resp = eplb_v1_ListModelsResponse_new(arena);
    bool ok = resp != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        eplb_v1_ModelSummary *m = eplb_v1_ListModelsResponse_add_models(resp, arena);
        ok = m && summary_to_upb(&all[i], m, arena);
    }
    free(all);
    if (ok)
        out->body = eplb_v1_ListModelsResponse_serialize(resp, arena, &out->body_len);
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_delete_model(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_DeleteModelRequest *m = eplb_v1_DeleteModelRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.DeleteModelRequest");
        return;
    }
    rpc_reply_note_model(out, eplb_v1_DeleteModelRequest_model_id(m).data, eplb_v1_DeleteModelRequest_model_id(m).size);
    const char *id = rpc_string(eplb_v1_DeleteModelRequest_model_id(m), 4 * EPLB_MODEL_NAME_MAX, "model_id",
                                arena, &err);
    if (!id || eplb_model_name_check(id, "model_id", &err) != EPLB_OK ||
        eplb_registry_delete(ctx->registry, id, eplb_v1_DeleteModelRequest_force(m), &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_DeleteModelResponse *resp = eplb_v1_DeleteModelResponse_new(arena);
    if (resp) {
        eplb_v1_DeleteModelResponse_set_deleted(resp, true);
        out->body = eplb_v1_DeleteModelResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
