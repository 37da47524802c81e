/* rpc_register.c -- RegisterModel and GetPlacement. */
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"

void rpc_register_model(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                        rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_RegisterModelRequest *m = eplb_v1_RegisterModelRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.RegisterModelRequest");
        return;
    }

    eplb_register_request r = { 0 };
    upb_StringView name = eplb_v1_RegisterModelRequest_model_name(m);
    rpc_reply_note_model(out, name.data, name.size);
    r.model_name = rpc_string(eplb_v1_RegisterModelRequest_model_name(m), 4 * EPLB_MODEL_NAME_MAX,
                              "model_name", arena, &err);
    r.main_model_id = rpc_string(eplb_v1_RegisterModelRequest_main_model_id(m), 4 * EPLB_MODEL_NAME_MAX,
                                 "main_model_id", arena, &err);
    if (!r.model_name || !r.main_model_id) {
        rpc_reply_from_error(out, &err);
        return;
    }
    if (eplb_v1_RegisterModelRequest_has_model(m) &&
        rpc_handle_from_upb(eplb_v1_RegisterModelRequest_model(m), "model", arena, &r.model, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    r.role = (eplb_role)eplb_v1_RegisterModelRequest_role(m);
    r.parallel = rpc_parallel_from_upb(eplb_v1_RegisterModelRequest_has_parallel(m)
                                           ? eplb_v1_RegisterModelRequest_parallel(m) : NULL);
    r.load_dummy_weights = eplb_v1_RegisterModelRequest_load_dummy_weights(m);

    eplb_register_result res;
    if (eplb_registry_register(ctx->registry, &r, &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }

    eplb_v1_RegisterModelResponse *resp = eplb_v1_RegisterModelResponse_new(arena);
    const char *model_id = rpc_string(upb_StringView_FromString(res.model_id), sizeof res.model_id,
                                      "model_id", arena, &err);
    const char *path = rpc_string(upb_StringView_FromString(res.resolved_path), sizeof res.resolved_path,
                                  "resolved_path", arena, &err);
    const char *reason = rpc_string(upb_StringView_FromString(res.reason), sizeof res.reason,
                                    "reason", arena, &err);
    bool with_placement = eplb_v1_RegisterModelRequest_include_placement(m);
    if (res.registered && with_placement &&
        !rpc_placement_fits(&res.view.snap->placement, true, ctx->limits.max_response_bytes, out)) {
        eplb_model_view_release(&res.view);
        return;
    }
    eplb_v1_Placement *pm = NULL;
    if (resp && res.registered && with_placement)
        pm = rpc_placement_to_upb(res.model_id, &res.view.snap->placement, res.view.state, res.view.state_reason,
                                  true, arena);
    if (res.registered) {
        rpc_reply_note_model(out, res.model_id, strlen(res.model_id));
        out->facts.epoch = res.view.snap->placement.epoch;
        out->facts.num_layers = res.view.snap->placement.num_layers;
        out->facts.num_physical = res.view.snap->placement.num_physical;
    }
    if (resp && res.registered) {
        eplb_v1_RegisterModelResponse_set_epoch(resp, res.view.snap->placement.epoch);
        eplb_v1_RegisterModelResponse_set_state(resp, (int32_t)res.view.state);
    }
    eplb_model_view_release(&res.view);
    if (!resp || !model_id || !path || !reason || (res.registered && with_placement && !pm)) {
        rpc_reply_set(out, 8, "out of memory building the response");
        return;
    }
    eplb_v1_RegisterModelResponse_set_registered(resp, res.registered);
    eplb_v1_RegisterModelResponse_set_model_id(resp, upb_StringView_FromString(res.registered ? model_id : ""));
    eplb_v1_RegisterModelResponse_set_resolved_path(resp, upb_StringView_FromString(path));
    eplb_v1_RegisterModelResponse_set_reason(resp, upb_StringView_FromString(reason));
    if (pm)
        eplb_v1_RegisterModelResponse_set_placement(resp, pm);
    out->body = eplb_v1_RegisterModelResponse_serialize(resp, arena, &out->body_len);
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_get_placement(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                       rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_GetPlacementRequest *m = eplb_v1_GetPlacementRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.GetPlacementRequest");
        return;
    }
    upb_StringView idv = eplb_v1_GetPlacementRequest_model_id(m);
    rpc_reply_note_model(out, idv.data, idv.size);
    const char *id = rpc_string(idv, 4 * EPLB_MODEL_NAME_MAX, "model_id", arena, &err);
    if (!id || eplb_model_name_check(id, "model_id", &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    /* A reference to the published epoch: never waits for an operation on
     * the model, and encodes without holding any lock. */
    eplb_model_view v;
    if (eplb_registry_view(ctx->registry, id, &v, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    bool with_log2phy = eplb_v1_GetPlacementRequest_include_logical_to_physical(m);
    eplb_v1_Placement *pm = NULL;
    out->facts.epoch = v.snap->placement.epoch;
    out->facts.num_layers = v.snap->placement.num_layers;
    out->facts.num_physical = v.snap->placement.num_physical;
    if (rpc_placement_fits(&v.snap->placement, with_log2phy, ctx->limits.max_response_bytes, out))
        pm = rpc_placement_to_upb(id, &v.snap->placement, v.state, v.state_reason, with_log2phy, arena);
    if (pm && v.pending_id[0]) {
        upb_StringView pid;
        if (rpc_arena_view(v.pending_id, arena, &pid)) {
            eplb_v1_Placement_set_pending_rebalance_id(pm, pid);
            eplb_v1_Placement_set_pending_layers_done(pm, v.pending_layers_done);
            eplb_v1_Placement_set_pending_execution(pm, (int32_t)v.pending_execution);
        } else {
            pm = NULL;
        }
    }
    eplb_model_view_release(&v);
    if (out->status != 0)
        return;
    if (pm)
        out->body = eplb_v1_Placement_serialize(pm, arena, &out->body_len);
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
