/* rpc_placement.c -- SetupFromMapping, Rebalance and RecordLoad: decode,
 * call the placement engine, encode.
 *
 * At --log-level debug each says what it was asked and what it computed
 * (rpc_log_event lines "setup_request", "rebalance_request",
 * "rebalance_plan", "record_load"); the checks cost one atomic load each
 * at info.  An automatic rebalance that RecordLoad triggers is logged at
 * info when it commits and at warn when it fails. */
#include <stdio.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"
#include "rpc_log.h"
#include "rpc_packed.h"
#include "rpc_transfer.h"

/* model_id of a request: present and a valid name, else *out set. */
static const char *model_id_of(upb_StringView v, upb_Arena *arena, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    rpc_reply_note_model(out, v.data, v.size);
    const char *id = rpc_string(v, 4 * EPLB_MODEL_NAME_MAX, "model_id", arena, &err);
    if (!id || eplb_model_name_check(id, "model_id", &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return NULL;
    }
    return id;
}

static void reply_placement(rpc_context *ctx, const char *id, const eplb_placement *p, upb_Arena *arena,
                            rpc_reply *out) {
    /* logical_to_physical only when it fits: the map is committed already,
     * and a client can derive it or ask GetPlacement. */
    uint64_t max = ctx->limits.max_response_bytes;
    bool with_log2phy = !max || rpc_placement_wire_bound(p, true) <= max;
    if (!with_log2phy && !rpc_placement_fits(p, false, max, out))
        return;
    eplb_v1_Placement *pm = rpc_placement_to_upb(id, p, EPLB_MOVE_IDLE, NULL, with_log2phy, arena);
    if (pm)
        out->body = eplb_v1_Placement_serialize(pm, arena, &out->body_len);
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_setup_from_mapping(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_SetupFromMappingRequest *m = eplb_v1_SetupFromMappingRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.SetupFromMappingRequest");
        return;
    }
    eplb_setup_request r = { 0 };
    if (!(r.model_id = model_id_of(eplb_v1_SetupFromMappingRequest_model_id(m), arena, out)))
        return;
    if (eplb_v1_SetupFromMappingRequest_has_model(m) &&
        rpc_handle_from_upb(eplb_v1_SetupFromMappingRequest_model(m), "model", arena, &r.model, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    r.expanded_phy2log = eplb_v1_SetupFromMappingRequest_expanded_physical_to_logical(m, &r.expanded_len);
    r.num_physical = eplb_v1_SetupFromMappingRequest_num_physical_experts(m);
    r.old_num_physical = eplb_v1_SetupFromMappingRequest_old_num_physical_experts(m);
    r.ep_size = eplb_v1_SetupFromMappingRequest_ep_size(m);
    r.has_expected_epoch = eplb_v1_SetupFromMappingRequest_has_expected_epoch(m);
    r.expected_epoch = eplb_v1_SetupFromMappingRequest_expected_epoch(m);
    if (rpc_log_enabled(RPC_LOG_DEBUG)) {
        eplb_trace_field f[] = {
            EPLB_TF_U("expanded_len", r.expanded_len),
            EPLB_TF_U("num_physical", r.num_physical),
            EPLB_TF_U("old_num_physical", r.old_num_physical),
            EPLB_TF_U("ep_size", r.ep_size),
            EPLB_TF_B("with_model", eplb_v1_SetupFromMappingRequest_has_model(m)),
            EPLB_TF_I("expected_epoch", r.has_expected_epoch ? (int64_t)r.expected_epoch : -1),
        };
        rpc_log_event(RPC_LOG_DEBUG, "setup_request", r.model_id, f, EPLB_TRACE_N(f));
    }

    eplb_placement p;
    if (eplb_registry_setup_from_mapping(ctx->registry, &r, &p, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    out->facts.num_layers = p.num_layers;
    out->facts.num_physical = p.num_physical;
    reply_placement(ctx, r.model_id, &p, arena, out);
    eplb_placement_free(&p);
}

void rpc_reply_rebalance(rpc_context *ctx, const char *model_id, const eplb_rebalance_result *res,
                         bool with_log2phy, upb_Arena *arena, rpc_reply *out) {
    rpc_call_facts *f = &out->facts;
    f->rebalance = true;
    f->committed = res->committed;
    f->balancedness_before = res->balancedness_before;
    f->balancedness_after = res->balancedness_after;
    f->experts_moved = res->experts_moved;
    f->bytes_moved = res->bytes_moved;
    f->compute_ms = res->compute_ms;
    f->move_ms = res->move_ms;
    f->epoch = res->placement.epoch;
    f->num_layers = res->placement.num_layers;
    f->num_physical = res->placement.num_physical;
    if (rpc_log_enabled(RPC_LOG_DEBUG)) {
        eplb_trace_field d[] = {
            EPLB_TF_U("layers", res->placement.num_layers),
            EPLB_TF_U("num_physical", res->placement.num_physical),
            EPLB_TF_U("num_logical", res->placement.num_logical),
            EPLB_TF_U("experts_moved", res->experts_moved),
            EPLB_TF_F("balancedness_before", res->balancedness_before),
            EPLB_TF_F("balancedness_after", res->balancedness_after),
            EPLB_TF_F("compute_ms", res->compute_ms),
            EPLB_TF_B("committed", res->committed),
            EPLB_TF_U("bytes_moved", res->bytes_moved),
            EPLB_TF_U("bytes_cross_gpu", res->bytes_cross_gpu),
            EPLB_TF_U("bytes_staged", res->bytes_staged),
            EPLB_TF_F("move_ms", res->move_ms),
            EPLB_TF_U("epoch", res->placement.epoch),
            EPLB_TF_S("rebalance_id", res->rebalance_id),
            EPLB_TF_U("layers_moved", res->num_layers_moved),
            EPLB_TF_U("layers_done", res->layers_done),
            EPLB_TF_B("pending", res->pending),
            EPLB_TF_S("execution", res->execution == EPLB_EXEC_ENGINE ? "engine" : "server"),
            EPLB_TF_U("plan_steps", res->has_plan ? res->plan.num_steps : 0),
            EPLB_TF_U("plan_copies_cross_gpu", res->has_plan ? res->plan.copies_cross_gpu : 0),
        };
        rpc_log_event(RPC_LOG_DEBUG, "rebalance_plan", model_id, d, EPLB_TRACE_N(d));
    }
    if (!rpc_placement_fits(&res->placement, with_log2phy, ctx->limits.max_response_bytes, out))
        return;
    eplb_v1_RebalanceResponse *resp = eplb_v1_RebalanceResponse_new(arena);
    eplb_v1_Placement *pm =
        resp ? rpc_placement_to_upb(model_id, &res->placement, EPLB_MOVE_IDLE, NULL, with_log2phy, arena) : NULL;
    /* Per-layer balancedness only where computed (not for a continued step). */
    uint32_t L = res->layer_before && res->layer_after ? res->placement.num_layers : 0;
    double *before = resp && L ? eplb_v1_RebalanceResponse_resize_layer_balancedness_before(resp, L, arena) : NULL;
    double *after = resp && L ? eplb_v1_RebalanceResponse_resize_layer_balancedness_after(resp, L, arena) : NULL;
    uint32_t *moved = resp && res->num_layers_moved
                          ? eplb_v1_RebalanceResponse_resize_layers_moved(resp, res->num_layers_moved, arena)
                          : NULL;
    char *rid = upb_Arena_Malloc(arena, sizeof res->rebalance_id);
    if (pm && rid && (!L || (before && after)) && (!res->num_layers_moved || moved)) {
        if (L) {
            memcpy(before, res->layer_before, L * sizeof *before);
            memcpy(after, res->layer_after, L * sizeof *after);
        }
        if (res->num_layers_moved)
            memcpy(moved, res->layers_moved, res->num_layers_moved * sizeof *moved);
        memcpy(rid, res->rebalance_id, sizeof res->rebalance_id);
        if (res->pending) {
            eplb_v1_Placement_set_pending_rebalance_id(pm, upb_StringView_FromString(rid));
            eplb_v1_Placement_set_pending_layers_done(pm, res->layers_done);
            eplb_v1_Placement_set_pending_execution(pm, (int32_t)res->execution);
        }
        eplb_v1_RebalanceResponse_set_placement(resp, pm);
        eplb_v1_RebalanceResponse_set_balancedness_before(resp, res->balancedness_before);
        eplb_v1_RebalanceResponse_set_balancedness_after(resp, res->balancedness_after);
        eplb_v1_RebalanceResponse_set_experts_moved(resp, res->experts_moved);
        eplb_v1_RebalanceResponse_set_compute_ms(resp, res->compute_ms);
        eplb_v1_RebalanceResponse_set_committed(resp, res->committed);
        eplb_v1_RebalanceResponse_set_bytes_moved(resp, res->bytes_moved);
        eplb_v1_RebalanceResponse_set_move_ms(resp, res->move_ms);
        eplb_v1_RebalanceResponse_set_rebalance_id(resp, upb_StringView_FromString(rid));
        eplb_v1_RebalanceResponse_set_layers_done(resp, res->layers_done);
        eplb_v1_RebalanceResponse_set_pending(resp, res->pending);
        eplb_v1_RebalanceResponse_set_bytes_cross_gpu(resp, res->bytes_cross_gpu);
        eplb_v1_RebalanceResponse_set_bytes_staged(resp, res->bytes_staged);
        const eplb_next_report *nx = &res->next;
        eplb_v1_RebalanceResponse_set_policy_used(resp, (int32_t)nx->policy_used);
        eplb_v1_RebalanceResponse_set_balancedness_reference(resp, nx->balancedness_reference);
        eplb_v1_RebalanceResponse_set_layers_from_scratch(resp, nx->layers_from_scratch);
        eplb_v1_RebalanceResponse_set_layers_node_repaired(resp, nx->layers_node_repaired);
        eplb_v1_RebalanceResponse_set_slots_moved(resp, nx->slots_moved);
        eplb_v1_RebalanceResponse_set_plan_copies_cross_gpu(resp, nx->copies_cross_gpu);
        eplb_v1_RebalanceResponse_set_plan_copies_cross_node(resp, nx->copies_cross_node);
        eplb_v1_RebalanceResponse_set_plan_bytes_cross_gpu(resp, nx->copies_cross_gpu * res->expert_bytes);
        eplb_v1_RebalanceResponse_set_plan_bytes_cross_node(resp, nx->copies_cross_node * res->expert_bytes);
        eplb_v1_RebalanceResponse_set_reference_copies_cross_gpu(resp, nx->reference_copies_cross_gpu);
        upb_StringView why;
        if (res->reason[0] && rpc_arena_view(res->reason, arena, &why))
            eplb_v1_RebalanceResponse_set_reason(resp, why);
        if (res->has_done_event) {
            /* The arena outlives the serialization; res does not matter. */
            char *ev = upb_Arena_Malloc(arena, EPLB_EVENT_BYTES);
            if (!ev) {
                rpc_reply_set(out, 8, "out of memory encoding the response");
                return;
            }
            memcpy(ev, res->done_event, EPLB_EVENT_BYTES);
            eplb_v1_RebalanceResponse_set_done_event(resp, upb_StringView_FromDataAndSize(ev, EPLB_EVENT_BYTES));
        }
        if (!rpc_transfer_attach_plan(ctx, model_id, res, resp, arena, out))
            return;
        out->body = eplb_v1_RebalanceResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    /* The loads (physical_load = 2, logical_load = 11) decoded directly,
     * the rest by upb (rpc_packed.h); upb alone when that declines. */
    static const uint32_t load_fields[2] = { 2, 11 };
    int64_t *loads[2] = { NULL, NULL };
    size_t nloads[2] = { 0, 0 };
    char *rest;
    size_t rest_len;
    const bool split = rpc_packed_split(req, len, load_fields, 2, arena, &rest, &rest_len, loads, nloads);
    const eplb_v1_RebalanceRequest *m = split ? eplb_v1_RebalanceRequest_parse(rest, rest_len, arena)
                                              : eplb_v1_RebalanceRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.RebalanceRequest");
        return;
    }
    eplb_rebalance_request r = { 0 };
    if (!(r.model_id = model_id_of(eplb_v1_RebalanceRequest_model_id(m), arena, out)))
        return;
    if (split) {
        r.physical_load = loads[0];
        r.physical_load_len = nloads[0];
        r.logical_load = loads[1];
        r.logical_load_len = nloads[1];
    } else {
        r.physical_load = eplb_v1_RebalanceRequest_physical_load(m, &r.physical_load_len);
        r.logical_load = eplb_v1_RebalanceRequest_logical_load(m, &r.logical_load_len);
    }
    r.num_groups = eplb_v1_RebalanceRequest_num_groups(m);
    r.num_nodes = eplb_v1_RebalanceRequest_num_nodes(m);
    r.num_gpus = eplb_v1_RebalanceRequest_num_gpus(m);
    r.has_expected_epoch = eplb_v1_RebalanceRequest_has_expected_epoch(m);
    r.expected_epoch = eplb_v1_RebalanceRequest_expected_epoch(m);
    r.dry_run = eplb_v1_RebalanceRequest_dry_run(m);
    r.without_log2phy = !eplb_v1_RebalanceRequest_include_logical_to_physical(m);
    r.layers_per_step = eplb_v1_RebalanceRequest_layers_per_step(m);
    r.force = eplb_v1_RebalanceRequest_force(m);
    eplb_rebalance_knobs *k = &r.knobs;
    k->min_improvement = eplb_v1_RebalanceRequest_min_improvement(m);
    k->policy = (uint32_t)eplb_v1_RebalanceRequest_policy(m); /* checked by the core */
    k->target_balancedness = eplb_v1_RebalanceRequest_target_balancedness(m);
    k->max_bytes_moved = eplb_v1_RebalanceRequest_max_bytes_moved(m);
    k->max_slots_moved = eplb_v1_RebalanceRequest_max_slots_moved(m);
    k->expert_bytes = eplb_v1_RebalanceRequest_expert_bytes(m);
    if (eplb_v1_RebalanceRequest_has_link_costs(m)) {
        const eplb_v1_LinkCosts *c = eplb_v1_RebalanceRequest_link_costs(m);
        k->cost_intra_node = eplb_v1_LinkCosts_intra_node(c);
        k->cost_cross_node = eplb_v1_LinkCosts_cross_node(c);
    }
    upb_StringView wev = eplb_v1_RebalanceRequest_wait_event(m);
    r.wait_event = (const uint8_t *)wev.data;
    r.wait_event_len = wev.size;
    r.execution = (uint32_t)eplb_v1_RebalanceRequest_execution(m); /* checked by the core */
    r.max_staging_bytes = eplb_v1_RebalanceRequest_max_staging_bytes(m);
    r.include_transfer_plan = eplb_v1_RebalanceRequest_include_transfer_plan(m);
    int32_t order = eplb_v1_RebalanceRequest_slot_order(m);
    if (order == eplb_v1_SLOT_ORDER_PRESERVE)
        r.slot_order = EPLB_SLOT_PRESERVE;
    else if (order == eplb_v1_SLOT_ORDER_ALGORITHM)
        r.slot_order = EPLB_SLOT_ALGORITHM;
    else if (order == eplb_v1_SLOT_ORDER_MIN_TRAFFIC)
        r.slot_order = EPLB_SLOT_MIN_TRAFFIC;
    else {
        rpc_reply_set(out, 3, "slot_order %d is not a SlotOrder", order);
        return;
    }
    if (rpc_log_enabled(RPC_LOG_DEBUG)) {
        static const char *const orders[] = { "preserve", "algorithm", "min_traffic" };
        /* Which load the plan is computed from: the request's passes, or
         * the model's recorded window when the request has none. */
        eplb_trace_field f[] = {
            EPLB_TF_S("load", r.physical_load_len ? "request" : "window"),
            EPLB_TF_U("load_values", r.physical_load_len),
            EPLB_TF_U("num_groups", r.num_groups),
            EPLB_TF_U("num_nodes", r.num_nodes),
            EPLB_TF_U("num_gpus", r.num_gpus),
            EPLB_TF_S("slot_order", (unsigned)r.slot_order < 3 ? orders[r.slot_order] : "?"),
            EPLB_TF_B("dry_run", r.dry_run),
            EPLB_TF_S("policy", k->policy == EPLB_POLICY_INCREMENTAL ? "incremental" : "deepseek"),
            EPLB_TF_U("max_bytes_moved", k->max_bytes_moved),
            EPLB_TF_U("max_slots_moved", k->max_slots_moved),
            EPLB_TF_I("expected_epoch", r.has_expected_epoch ? (int64_t)r.expected_epoch : -1),
        };
        rpc_log_event(RPC_LOG_DEBUG, "rebalance_request", r.model_id, f, EPLB_TRACE_N(f));
    }

    eplb_rebalance_result res;
    if (eplb_registry_rebalance(ctx->registry, &r, &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    rpc_reply_rebalance(ctx, r.model_id, &res, eplb_v1_RebalanceRequest_include_logical_to_physical(m), arena, out);
    if (out->status != 0 && res.execution == EPLB_EXEC_ENGINE && res.pending && !res.committed) {
        /* The answer cannot be sent (too big): the engine would never learn
         * the id, so the pending rebalance is withdrawn -- an error changes
         * nothing. */
        eplb_abort_result ab;
        eplb_error aerr;
        eplb_error_clear(&aerr);
        char msg[sizeof out->message];
        if (eplb_registry_abort_rebalance(ctx->registry, r.model_id, res.rebalance_id, 0, &ab, &aerr) == EPLB_OK)
            snprintf(msg, sizeof msg, "%s; nothing is pending", out->message);
        else
            snprintf(msg, sizeof msg, "%s; rebalance %s is pending and could not be withdrawn (%s): abort it with "
                     "AbortRebalance", out->message, res.rebalance_id, aerr.msg);
        snprintf(out->message, sizeof out->message, "%s", msg);
    }
    eplb_rebalance_result_free(&res);
}

void rpc_continue_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_ContinueRebalanceRequest *m = eplb_v1_ContinueRebalanceRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.ContinueRebalanceRequest");
        return;
    }
    const char *id = model_id_of(eplb_v1_ContinueRebalanceRequest_model_id(m), arena, out);
    if (!id)
        return;
    const char *rid = rpc_string(eplb_v1_ContinueRebalanceRequest_rebalance_id(m), EPLB_REBALANCE_ID_MAX,
                                 "rebalance_id", arena, &err);
    if (!rid) {
        rpc_reply_from_error(out, &err);
        return;
    }
    if (!rid[0]) {
        rpc_reply_set(out, 3, "rebalance_id is required (RebalanceResponse.rebalance_id of a pending rebalance)");
        return;
    }
    eplb_rebalance_result res;
    upb_StringView wev = eplb_v1_ContinueRebalanceRequest_wait_event(m);
    eplb_continue_request cq = { .model_id = id, .rebalance_id = rid, .wait_event = (const uint8_t *)wev.data,
                                 .wait_event_len = wev.size,
                                 .include_transfer_plan = eplb_v1_ContinueRebalanceRequest_include_transfer_plan(m) };
    if (eplb_registry_continue(ctx->registry, &cq, &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    rpc_reply_rebalance(ctx, id, &res, eplb_v1_ContinueRebalanceRequest_include_logical_to_physical(m), arena, out);
    eplb_rebalance_result_free(&res);
}

void rpc_record_load(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    static const uint32_t load_field = 2; /* physical_load: rpc_packed.h */
    int64_t *load = NULL;
    size_t nload = 0;
    char *rest;
    size_t rest_len;
    const bool split = rpc_packed_split(req, len, &load_field, 1, arena, &rest, &rest_len, &load, &nload);
    const eplb_v1_RecordLoadRequest *m = split ? eplb_v1_RecordLoadRequest_parse(rest, rest_len, arena)
                                               : eplb_v1_RecordLoadRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.RecordLoadRequest");
        return;
    }
    eplb_record_request r = { 0 };
    if (!(r.model_id = model_id_of(eplb_v1_RecordLoadRequest_model_id(m), arena, out)))
        return;
    if (split) {
        r.physical_load = load;
        r.physical_load_len = nload;
    } else {
        r.physical_load = eplb_v1_RecordLoadRequest_physical_load(m, &r.physical_load_len);
    }
    r.num_passes = eplb_v1_RecordLoadRequest_num_passes(m);
    r.is_dummy = eplb_v1_RecordLoadRequest_is_dummy(m);
    eplb_record_result res;
    if (eplb_registry_record_load(ctx->registry, &r, &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    out->facts.epoch = res.epoch;
    out->facts.rebalance = res.rebalanced;
    out->facts.committed = res.rebalanced;
    if (rpc_log_enabled(RPC_LOG_DEBUG)) {
        eplb_trace_field f[] = {
            EPLB_TF_U("load_values", r.physical_load_len),
            EPLB_TF_B("is_dummy", r.is_dummy),
            EPLB_TF_U("passes_recorded", res.passes_recorded),
        };
        rpc_log_event(RPC_LOG_DEBUG, "record_load", r.model_id, f, EPLB_TRACE_N(f));
    }
    if (res.auto_rebalance_error[0]) {
        eplb_trace_field f[] = {
            EPLB_TF_B("committed", false),
            EPLB_TF_U("passes_recorded", res.passes_recorded),
            EPLB_TF_S("error", res.auto_rebalance_error),
        };
        rpc_log_event(RPC_LOG_WARN, "auto_rebalance", r.model_id, f, EPLB_TRACE_N(f));
    } else if (res.rebalanced) {
        eplb_trace_field f[] = {
            EPLB_TF_B("committed", true),
            EPLB_TF_U("passes_recorded", res.passes_recorded),
            EPLB_TF_U("epoch", res.epoch),
        };
        rpc_log_event(RPC_LOG_INFO, "auto_rebalance", r.model_id, f, EPLB_TRACE_N(f));
    }
    eplb_v1_RecordLoadResponse *resp = eplb_v1_RecordLoadResponse_new(arena);
    if (resp) {
        eplb_v1_RecordLoadResponse_set_passes_recorded(resp, res.passes_recorded);
        eplb_v1_RecordLoadResponse_set_rebalanced(resp, res.rebalanced);
        eplb_v1_RecordLoadResponse_set_epoch(resp, res.epoch);
        out->body = eplb_v1_RecordLoadResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
