/* eplb_transfer.h -- transfer plans the engine's ranks execute themselves
 * (RebalanceRequest.execution = EXECUTION_ENGINE): the per-layer plans of
 * eplb_plan.h, cut into staging-bounded chunks (eplb_plan_chunk.h), turned
 * into per-rank steps of local copies and matched send/receive pairs.
 *
 * Plain C, no I/O, no global state.  Nothing here touches a byte: a plan is
 * data that the engine runs with its own communicator (torch.distributed
 * isend/irecv over NCCL, RCCL or gloo).
 *
 * Semantics (the contract of TransferPlan in eplb.proto):
 *   - Steps, in order, the same list for every rank: per changed layer (in
 *     layer order), per chunk (in order), up to three phases:
 *       GATHER  the plan's STAGE ops: old contents still needed are copied
 *               into staging entries on the destination rank (no slot is
 *               written);
 *       WAVE0   the plan's wave-0 scatter: changed slots written from
 *               staging (local) or from stable slots (local or remote);
 *       WAVE1   the plan's wave-1 scatter: further destinations of an
 *               expert a rank fetched from another rank in WAVE0, copied
 *               locally from the slot WAVE0 filled.
 *     A phase with no op on any rank is left out (for every rank alike).
 *   - A rank runs a step's ops all at once (one batch of isend/irecv plus its
 *     local copies) and starts the next step only when they completed.
 *     Within a step no op reads what another op of the step writes (the
 *     plan's invariants 3 and 4), so any order inside a step is safe.
 *   - Same-rank op -> one COPY on that rank; cross-rank op -> a SEND on the
 *     source rank and a RECV on the destination rank, in the same step, with
 *     the same tag (unique within the step).  Between two ranks, the SENDs
 *     of a step appear on the sender in the same order as the matching RECVs
 *     on the receiver, so a backend that matches by order (NCCL ignores
 *     tags) pairs them the same way.
 *   - Slots are rank-local: global slot s is slot s % S of rank s / S,
 *     S = P / num_ranks.  Staging entries are per rank, [0,
 *     max_staging); every chunk starts again at entry 0 (its GATHER runs
 *     only after the previous chunk's WAVE0 read the entries).
 *   - Executing every step from the old placement's bytes leaves every slot
 *     whose new expert is not -1 holding its new expert; slots that keep
 *     their expert, and slots whose new expert is -1, are never written. */
#ifndef EPLB_TRANSFER_H
#define EPLB_TRANSFER_H

#include <stdbool.h>
#include <stdint.h>

#include "eplb_status.h"

typedef enum eplb_transfer_kind {
    EPLB_XFER_COPY = 0, /* src -> dst on this rank */
    EPLB_XFER_SEND = 1, /* src on this rank -> peer */
    EPLB_XFER_RECV = 2, /* peer -> dst on this rank */
} eplb_transfer_kind;

typedef enum eplb_transfer_phase {
    EPLB_XFER_GATHER = 0,
    EPLB_XFER_WAVE0 = 1,
    EPLB_XFER_WAVE1 = 2,
} eplb_transfer_phase;

typedef struct eplb_transfer_op {
    uint32_t step;       /* index into the plan's steps */
    uint32_t src;        /* rank-local slot, or staging entry (src_staging) */
    uint32_t dst;        /* rank-local slot, or staging entry (dst_staging) */
    uint32_t peer;       /* SEND, RECV: the other rank */
    uint32_t tag;        /* SEND, RECV: the pair's tag, unique within the step */
    int32_t expert;      /* logical expert whose bytes these are */
    uint8_t kind;        /* eplb_transfer_kind */
    bool src_staging;
    bool dst_staging;
    bool cross_node;     /* SEND, RECV: peer on another node */
} eplb_transfer_op;

typedef struct eplb_transfer_step {
    uint32_t layer;
    uint32_t chunk;
    uint8_t phase;       /* eplb_transfer_phase */
} eplb_transfer_step;

typedef struct eplb_transfer_rank {
    eplb_transfer_op *ops;   /* [num_ops], sorted by step */
    uint32_t num_ops;
    uint32_t *step_first;    /* [num_steps + 1]: ops of step k are [step_first[k], step_first[k+1]) */
    uint32_t max_staging;    /* staging entries this rank needs at once */
    uint64_t sent, received, cross_node; /* slots sent / received; of both, across nodes */
} eplb_transfer_rank;

typedef struct eplb_transfer_plan {
    uint32_t num_ranks;          /* G */
    uint32_t ranks_per_node;
    uint32_t num_local;          /* S = P / G */
    uint32_t num_physical;       /* P */
    uint32_t *layers;            /* [num_layers] the layers it moves, ascending */
    uint32_t num_layers;
    eplb_transfer_step *steps;   /* [num_steps] */
    uint32_t num_steps;
    eplb_transfer_rank *ranks;   /* [num_rank_plans]: ranks[i] is rank first_rank + i */
    uint32_t first_rank;         /* 0 for a built plan */
    uint32_t num_rank_plans;     /* num_ranks for a built plan; 1 for one rank's copy */
    uint64_t copies_local;       /* COPY ops, all ranks */
    uint64_t copies_cross_gpu;   /* SEND/RECV pairs */
    uint64_t copies_cross_node;  /* of those, between nodes */
    uint32_t max_staging;        /* the most any rank needs */
} eplb_transfer_plan;

/* Build the plan that takes old_phy2log to new_phy2log ([L][P] each, rows
 * that are equal are skipped).
 *   num_physical P, num_ranks G (divides P), ranks_per_node (divides G)
 *   max_staging  staging entries a rank may need at once; 0 = no bound
 *                (then at most one layer's slots per rank)
 * EPLB_OK; EPLB_EINVAL for a bad shape or entry (the message names layer and
 * slot); EPLB_EPRECONDITION when a layer cannot move within max_staging
 * ("layer 3: ...") or wants an expert no old slot of it holds; EPLB_ENOMEM.
 * On error *out is empty (eplb_transfer_plan_free on it is a no-op).
 * Cost: per changed layer one eplb_plan_chunk (one plan when the bound does
 * not bite) and one plan per chunk: O(L * P) ops, memory O(ops + G * steps). */
eplb_status eplb_transfer_build(uint32_t num_layers, uint32_t num_physical, uint32_t num_ranks,
                                uint32_t ranks_per_node, const int32_t *old_phy2log, const int32_t *new_phy2log,
                                uint32_t max_staging, eplb_transfer_plan *out, eplb_error *err);

void eplb_transfer_plan_free(eplb_transfer_plan *plan);

/* A deep copy of src with every rank (rank == UINT32_MAX) or only `rank`
 * (< num_ranks): header, steps and layers always; the counters stay the
 * whole plan's.  EPLB_EINVAL for a rank out of range or a src that does
 * not hold it; EPLB_ENOMEM.  On error *out is empty. */
eplb_status eplb_transfer_plan_copy(const eplb_transfer_plan *src, uint32_t rank, eplb_transfer_plan *out,
                                    eplb_error *err);

/* Staging entries a byte budget allows: max_staging_bytes / expert_bytes.
 * 0 bytes = no bound (*entries 0).  EPLB_EINVAL when a budget is given
 * without the expert size, or is smaller than one expert. */
eplb_status eplb_transfer_staging_entries(uint64_t max_staging_bytes, uint64_t expert_bytes, uint32_t *entries,
                                          eplb_error *err);

#endif
