/* rpc_transfer.c -- engine-executed rebalances over gRPC: GetTransferPlan,
 * CommitRebalance, AbortRebalance, and the TransferPlan encoding that
 * Rebalance and ContinueRebalance use for include_transfer_plan.
 *
 * Size: a plan has O(layers x slots) ops (DeepSeek-V3 at 4 x 8: ~40k ops
 * over 32 ranks), each ~10-40 bytes on the wire, so every rank's plan in
 * one answer can pass --max-message-bytes at large EP; one rank's plan is
 * ~1/G of it.  A response that would not fit is RESOURCE_EXHAUSTED saying
 * to fetch each rank's plan with GetTransferPlan; the size is the encoded
 * message's, measured after encoding (in the call's arena, freed with the
 * call). */
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"
#include "rpc_log.h"
#include "rpc_transfer.h"

eplb_v1_TransferPlan *rpc_transfer_plan_to_upb(const char *model_id, const char *rebalance_id, uint64_t base_epoch,
                                               uint64_t expert_bytes, const eplb_transfer_plan *p, upb_Arena *arena) {
    eplb_v1_TransferPlan *m = eplb_v1_TransferPlan_new(arena);
    upb_StringView mid, rid;
    if (!m || !rpc_arena_view(model_id, arena, &mid) || !rpc_arena_view(rebalance_id, arena, &rid))
        return NULL;
    eplb_v1_TransferPlan_set_model_id(m, mid);
    eplb_v1_TransferPlan_set_rebalance_id(m, rid);
    eplb_v1_TransferPlan_set_base_epoch(m, base_epoch);
    eplb_v1_TransferPlan_set_num_ranks(m, p->num_ranks);
    eplb_v1_TransferPlan_set_ranks_per_node(m, p->ranks_per_node);
    eplb_v1_TransferPlan_set_num_local_physical_experts(m, p->num_local);
    eplb_v1_TransferPlan_set_num_steps(m, p->num_steps);
    eplb_v1_TransferPlan_set_expert_bytes(m, expert_bytes);
    eplb_v1_TransferPlan_set_copies_cross_gpu(m, p->copies_cross_gpu);
    eplb_v1_TransferPlan_set_copies_cross_node(m, p->copies_cross_node);
    if (p->num_layers) {
        uint32_t *layers = eplb_v1_TransferPlan_resize_layers(m, p->num_layers, arena);
        if (!layers)
            return NULL;
        memcpy(layers, p->layers, p->num_layers * sizeof *layers);
    }
    for (uint32_t i = 0; i < p->num_rank_plans; i++) {
        const eplb_transfer_rank *rk = &p->ranks[i];
        eplb_v1_RankTransferPlan *rm = eplb_v1_TransferPlan_add_ranks(m, arena);
        if (!rm)
            return NULL;
        eplb_v1_RankTransferPlan_set_rank(rm, p->first_rank + i);
        eplb_v1_RankTransferPlan_set_max_staging_slots(rm, rk->max_staging);
        eplb_v1_RankTransferPlan_set_slots_sent(rm, rk->sent);
        eplb_v1_RankTransferPlan_set_slots_received(rm, rk->received);
        eplb_v1_RankTransferPlan_set_slots_cross_node(rm, rk->cross_node);
        /* Every step, empty ones too: ranks run the same list in lockstep. */
        for (uint32_t k = 0; k < p->num_steps; k++) {
            eplb_v1_TransferStep *sm = eplb_v1_RankTransferPlan_add_steps(rm, arena);
            if (!sm)
                return NULL;
            eplb_v1_TransferStep_set_layer(sm, p->steps[k].layer);
            eplb_v1_TransferStep_set_chunk(sm, p->steps[k].chunk);
            for (uint32_t j = rk->step_first[k]; j < rk->step_first[k + 1]; j++) {
                const eplb_transfer_op *op = &rk->ops[j];
                eplb_v1_TransferOp *om = eplb_v1_TransferStep_add_ops(sm, arena);
                if (!om)
                    return NULL;
                eplb_v1_TransferOp_set_kind(om, op->kind);
                eplb_v1_TransferOp_set_expert(om, op->expert);
                if (op->kind != EPLB_XFER_RECV) {
                    eplb_v1_TransferOp_set_src(om, op->src);
                    eplb_v1_TransferOp_set_src_staging(om, op->src_staging);
                }
                if (op->kind != EPLB_XFER_SEND) {
                    eplb_v1_TransferOp_set_dst(om, op->dst);
                    eplb_v1_TransferOp_set_dst_staging(om, op->dst_staging);
                }
                if (op->kind != EPLB_XFER_COPY) {
                    eplb_v1_TransferOp_set_peer_rank(om, op->peer);
                    eplb_v1_TransferOp_set_tag(om, op->tag);
                    eplb_v1_TransferOp_set_cross_node(om, op->cross_node);
                }
            }
        }
    }
    return m;
}

/* model_id / rebalance_id of a request: present and valid, else *out set. */
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

static const char *rebalance_id_of(upb_StringView v, upb_Arena *arena, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const char *rid = rpc_string(v, EPLB_REBALANCE_ID_MAX, "rebalance_id", arena, &err);
    if (!rid) {
        rpc_reply_from_error(out, &err);
        return NULL;
    }
    if (!rid[0]) {
        rpc_reply_set(out, 3, "rebalance_id is required (RebalanceResponse.rebalance_id of the pending rebalance)");
        return NULL;
    }
    return rid;
}

void rpc_get_transfer_plan(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_GetTransferPlanRequest *m = eplb_v1_GetTransferPlanRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.GetTransferPlanRequest");
        return;
    }
    const char *id = model_id_of(eplb_v1_GetTransferPlanRequest_model_id(m), arena, out);
    const char *rid = id ? rebalance_id_of(eplb_v1_GetTransferPlanRequest_rebalance_id(m), arena, out) : NULL;
    if (!rid)
        return;
    uint32_t rank = eplb_v1_GetTransferPlanRequest_rank(m);
    if (rank == EPLB_TRANSFER_ALL_RANKS) { /* the core's "every rank": not a rank */
        rpc_reply_set(out, 3, "rank %u is not an EP rank", rank);
        return;
    }
    eplb_transfer_answer a;
    if (eplb_registry_get_transfer_plan(ctx->registry, id, rid, rank, &a, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    out->facts.epoch = a.base_epoch;
    eplb_v1_TransferPlan *pm = rpc_transfer_plan_to_upb(id, a.rebalance_id, a.base_epoch, a.expert_bytes, &a.plan, arena);
    if (pm)
        out->body = eplb_v1_TransferPlan_serialize(pm, arena, &out->body_len);
    uint64_t ops = a.plan.num_rank_plans ? a.plan.ranks[0].num_ops : 0;
    eplb_transfer_plan_free(&a.plan);
    if (!out->body) {
        rpc_reply_set(out, 8, "out of memory encoding the response");
        return;
    }
    uint64_t max = ctx->limits.max_response_bytes;
    if (max && out->body_len > max) {
        out->body = NULL;
        rpc_reply_set(out, 8,
                      "rank %u's transfer plan (%llu ops) takes %zu bytes, over the server's largest response of "
                      "%llu bytes (--max-message-bytes): raise it, or rebalance in steps (layers_per_step)",
                      rank, (unsigned long long)ops, out->body_len, (unsigned long long)max);
        out->body_len = 0;
    }
}

/* Encode res's plan into resp when it carries one; false (*out set) when
 * it does not fit or memory runs out. */
bool rpc_transfer_attach_plan(rpc_context *ctx, const char *model_id, const eplb_rebalance_result *res,
                              eplb_v1_RebalanceResponse *resp, upb_Arena *arena, rpc_reply *out) {
    if (!res->has_plan)
        return true;
    eplb_v1_TransferPlan *pm = rpc_transfer_plan_to_upb(model_id, res->rebalance_id, res->plan_base_epoch,
                                                        res->expert_bytes, &res->plan, arena);
    if (!pm) {
        rpc_reply_set(out, 8, "out of memory encoding the response");
        return false;
    }
    uint64_t max = ctx->limits.max_response_bytes;
    if (max) {
        size_t n = 0;
        /* Measured on its own: the rest of the answer is small next to it
         * (the placement is checked separately). */
        if (!eplb_v1_TransferPlan_serialize(pm, arena, &n)) {
            rpc_reply_set(out, 8, "out of memory encoding the response");
            return false;
        }
        if (n > max) {
            rpc_reply_set(out, 8,
                          "every rank's transfer plan (%u ranks, %u steps) takes %zu bytes, over the server's largest "
                          "response of %llu bytes (--max-message-bytes): ask without include_transfer_plan and "
                          "fetch each rank's plan with GetTransferPlan",
                          res->plan.num_ranks, res->plan.num_steps, n, (unsigned long long)max);
            return false;
        }
    }
    eplb_v1_RebalanceResponse_set_transfer_plan(resp, pm);
    return true;
}

void rpc_commit_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_CommitRebalanceRequest *m = eplb_v1_CommitRebalanceRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.CommitRebalanceRequest");
        return;
    }
    const char *id = model_id_of(eplb_v1_CommitRebalanceRequest_model_id(m), arena, out);
    const char *rid = id ? rebalance_id_of(eplb_v1_CommitRebalanceRequest_rebalance_id(m), arena, out) : NULL;
    if (!rid)
        return;
    eplb_rebalance_result res;
    if (eplb_registry_commit_rebalance(ctx->registry, id, rid, eplb_v1_CommitRebalanceRequest_has_base_epoch(m),
                                       eplb_v1_CommitRebalanceRequest_base_epoch(m), &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    if (rpc_log_enabled(RPC_LOG_INFO)) {
        eplb_trace_field f[] = {
            EPLB_TF_S("rebalance_id", rid),
            EPLB_TF_U("epoch", res.placement.epoch),
            EPLB_TF_U("layers_moved", res.num_layers_moved),
            EPLB_TF_B("pending", res.pending),
        };
        rpc_log_event(RPC_LOG_INFO, "engine_commit", id, f, EPLB_TRACE_N(f));
    }
    rpc_reply_rebalance(ctx, id, &res, eplb_v1_CommitRebalanceRequest_include_logical_to_physical(m), arena, out);
    eplb_rebalance_result_free(&res);
}

void rpc_abort_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    const eplb_v1_AbortRebalanceRequest *m = eplb_v1_AbortRebalanceRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.AbortRebalanceRequest");
        return;
    }
    const char *id = model_id_of(eplb_v1_AbortRebalanceRequest_model_id(m), arena, out);
    const char *rid = id ? rebalance_id_of(eplb_v1_AbortRebalanceRequest_rebalance_id(m), arena, out) : NULL;
    if (!rid)
        return;
    uint64_t touched = eplb_v1_AbortRebalanceRequest_bytes_touched(m);
    eplb_abort_result res;
    if (eplb_registry_abort_rebalance(ctx->registry, id, rid, touched, &res, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    {
        eplb_trace_field f[] = {
            EPLB_TF_S("rebalance_id", rid),
            EPLB_TF_U("bytes_touched", touched),
            EPLB_TF_B("needs_reload", res.state == EPLB_MOVE_NEEDS_RELOAD),
        };
        /* A touched abort leaves weights that match no map: warn. */
        rpc_log_event(touched ? RPC_LOG_WARN : RPC_LOG_INFO, "engine_abort", id, f, EPLB_TRACE_N(f));
    }
    out->facts.epoch = res.epoch;
    eplb_v1_AbortRebalanceResponse *resp = eplb_v1_AbortRebalanceResponse_new(arena);
    if (resp) {
        eplb_v1_AbortRebalanceResponse_set_epoch(resp, res.epoch);
        eplb_v1_AbortRebalanceResponse_set_state(resp, (int32_t)res.state);
        eplb_v1_AbortRebalanceResponse_set_needs_weight_reload(resp, res.state == EPLB_MOVE_NEEDS_RELOAD);
        out->body = eplb_v1_AbortRebalanceResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
