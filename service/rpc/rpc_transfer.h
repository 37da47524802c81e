/* rpc_transfer.h -- TransferPlan messages (rpc_transfer.c) and the
 * RebalanceResponse encoder they share with rpc_placement.c. */
#ifndef RPC_TRANSFER_H
#define RPC_TRANSFER_H

#include <stdbool.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_registry.h"
#include "rpc_handlers.h"

/* A TransferPlan message of p (every rank plan it holds) in the arena, or
 * NULL when out of memory. */
eplb_v1_TransferPlan *rpc_transfer_plan_to_upb(const char *model_id, const char *rebalance_id, uint64_t base_epoch,
                                               uint64_t expert_bytes, const eplb_transfer_plan *p, upb_Arena *arena);

/* resp.transfer_plan from res's plan (if it has one).  false with *out
 * RESOURCE_EXHAUSTED when the plan alone would pass --max-message-bytes
 * (or memory runs out). */
bool rpc_transfer_attach_plan(rpc_context *ctx, const char *model_id, const eplb_rebalance_result *res,
                              eplb_v1_RebalanceResponse *resp, upb_Arena *arena, rpc_reply *out);

/* The RebalanceResponse of a Rebalance, ContinueRebalance or
 * CommitRebalance result (rpc_placement.c). */
void rpc_reply_rebalance(rpc_context *ctx, const char *model_id, const eplb_rebalance_result *res,
                         bool with_log2phy, upb_Arena *arena, rpc_reply *out);

#endif
