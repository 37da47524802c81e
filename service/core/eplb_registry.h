/* eplb_registry.h -- the registered models, their placements, and the rules
 * of RegisterModel; persistence goes through a small store interface.
 *
 * Concurrency: a read-write lock guards the set of models; each model has
 * its own mutex, so changes to one model serialise while others proceed.
 * Every change is written to the store before it becomes visible: a failed
 * write leaves the registry as it was.
 *
 * Plain C (pthreads): the RPC layer translates requests into these calls
 * and eplb_status codes into gRPC statuses; the store is injected. */
#ifndef EPLB_REGISTRY_H
#define EPLB_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eplb_next.h"
#include "eplb_load.h"
#include "eplb_model.h"
#include "eplb_placement.h"
#include "eplb_move_state.h"
#include "eplb_snapshot.h"
#include "eplb_status.h"
#include "eplb_transfer.h"

typedef enum eplb_role {
    EPLB_ROLE_MAIN = 0,
    EPLB_ROLE_SPECULATOR = 1,
} eplb_role;

/* A rebalance committed in steps (RebalanceRequest.layers_per_step) that
 * has steps left: the full target placement, and how far it got.  Each
 * step commits the served placement with the next layers_per_step changed
 * layers taken from target; layers_done counts the layers whose served row
 * equals target's.  Persisted with the model's row, in the same
 * transaction as each step's commit, so a restart knows which layers
 * moved (the served placement says it, row by row) and can continue. */

/* Who moves the bytes of a committed rebalance (RebalanceRequest.execution). */
typedef enum eplb_execution {
    EPLB_EXEC_SERVER = 0, /* eplbd, on the weights it holds (or none attached) */
    EPLB_EXEC_ENGINE = 1, /* the engine's ranks run a transfer plan, then CommitRebalance */
} eplb_execution;

/* An engine-executed rebalance (EPLB_EXEC_ENGINE) is pending the same way:
 * target and steps as above, but nothing is committed until the engine
 * calls CommitRebalance; the plan of the step awaiting it is derived from
 * the served placement and the target (deterministic, so it is not
 * stored: a restart rebuilds the same plan). */
typedef struct eplb_pending_rebalance {
    char id[EPLB_REBALANCE_ID_MAX + 1]; /* "" = none pending */
    uint32_t layers_per_step;           /* >= 1 */
    uint32_t layers_done;               /* < num_layers while pending */
    bool with_weights;                  /* started with weights attached: continue only with them */
    double balancedness_before;         /* of the whole rebalance, on its load */
    double balancedness_after;
    uint32_t execution;                 /* eplb_execution */
    uint64_t max_staging_bytes;         /* ENGINE: the plan's staging bound per rank (0 = none) */
    uint64_t expert_bytes;              /* ENGINE: one expert's bytes (0 = unknown), for the bound and counts */
    eplb_placement target;              /* arrays owned by the record */
} eplb_pending_rebalance;

/* What is persisted of a model: identity, shape, placement, move state. */
typedef struct eplb_model_record {
    char model_id[EPLB_MODEL_NAME_MAX + 1];     /* the model name: stable across restarts */
    eplb_role role;
    char main_model_id[EPLB_MODEL_NAME_MAX + 1];/* speculators only */
    char architecture[EPLB_ARCH_MAX + 1];       /* of the resolved MoE handle */
    char resolved_path[EPLB_PATH_MAX];
    eplb_model_shape shape;
    eplb_placement placement;
    eplb_load_window window;                    /* saved when window.dirty */
    eplb_move_state state;                      /* IDLE, MOVING or NEEDS_RELOAD when stored */
    char state_reason[EPLB_ERROR_MSG_MAX];      /* why NEEDS_RELOAD ("" otherwise) */
    eplb_pending_rebalance pending;             /* pending.id[0] == 0: none */
    /* Set by the store's load_all only: the row failed verification
     * (checksum, range); every other field but model_id is then empty and
     * the registry answers EPLB_EDATALOSS with this text for the model. */
    char damaged[EPLB_ERROR_MSG_MAX];
} eplb_model_record;

/* Storage behind the registry.  Each call is one transaction: it either
 * stores everything it was given or nothing.  Errors: EPLB_ENOSPACE (disk
 * or quota full), EPLB_EUNAVAILABLE (busy, read-only, unopenable),
 * EPLB_EDATALOSS, EPLB_EINTERNAL. */
typedef struct eplb_store_ops {
    eplb_status (*save)(void *ctx, const eplb_model_record *rec, eplb_error *err);
    /* Calls each() for every stored model; each() takes ownership of
     * rec->placement's and rec->window's arrays.  A row that fails its
     * checks is passed with rec->damaged set (the open still succeeds). */
    eplb_status (*load_all)(void *ctx,
                            eplb_status (*each)(void *arg, eplb_model_record *rec, eplb_error *err),
                            void *arg, eplb_error *err);
    /* Delete the model's rows (map and window), damaged or not; a model not
     * stored is no error. */
    eplb_status (*remove)(void *ctx, const char *model_id, eplb_error *err);
} eplb_store_ops;

typedef struct eplb_registry eplb_registry;

/* Create a registry and load every model the store holds.  store_ops may be
 * NULL for a memory-only registry (tests).  On error *out is NULL. */
eplb_status eplb_registry_open(const eplb_store_ops *store_ops, void *store_ctx,
                               const eplb_limits *limits, eplb_registry **out, eplb_error *err);
void eplb_registry_close(eplb_registry *r);

size_t eplb_registry_count(eplb_registry *r);

typedef struct eplb_register_request {
    const char *model_name;
    const eplb_handle *model;     /* NULL when the request has none */
    eplb_role role;
    const char *main_model_id;    /* "" for a main model */
    eplb_parallel parallel;
    bool load_dummy_weights;
} eplb_register_request;

typedef struct eplb_register_result {
    bool registered;
    char model_id[EPLB_MODEL_NAME_MAX + 1];
    char resolved_path[EPLB_PATH_MAX];
    char reason[EPLB_ERROR_MSG_MAX];
    eplb_model_view view;         /* when registered: the model now; eplb_model_view_release it */
} eplb_register_result;

/* RegisterModel.  Status OK with registered=false and a reason for EPLB
 * disabled, dummy weights, or no MoE model in the handle.  Registering a
 * name again with the same role, main model, resolved path and shape is
 * idempotent (the current placement is returned); anything else under a
 * taken name is EPLB_EEXIST.  A speculator must name a registered main model
 * (EPLB_ENOTFOUND) whose EP configuration it shares (EPLB_EPRECONDITION,
 * naming the field).  On error nothing changes. */
eplb_status eplb_registry_register(eplb_registry *r, const eplb_register_request *req,
                                   eplb_register_result *out, eplb_error *err);

/* The model's current epoch and move state (EPLB_ENOTFOUND if unknown,
 * EPLB_EDATALOSS naming the model if its stored row was damaged).  Never
 * waits for an operation on the model: it is what was last published.
 * Release with eplb_model_view_release. */
eplb_status eplb_registry_view(eplb_registry *r, const char *model_id, eplb_model_view *out,
                               eplb_error *err);

/* A copy of a model's current shape (EPLB_ENOTFOUND if unknown). */
eplb_status eplb_registry_get_shape(eplb_registry *r, const char *model_id, eplb_model_shape *out,
                                    eplb_error *err);

/* What a model did since this process started (the metrics,
 * docs/deploy.md "Metrics").  Process counters: kept in memory only, never
 * stored, so they start at zero at every start and for every registration
 * (DeleteModel and registering the name again start over).
 *
 * A rebalance counts (committed or failed) once it got past validation:
 * Rebalance RPCs that are not dry runs and RecordLoad's automatic ones.  A
 * request refused before any computation (stale epoch, bad load, needs a
 * reload) changes nothing here; the RPC metrics count it by status.  A dry
 * run changes nothing here either. */
typedef struct eplb_model_stats {
    uint64_t rebalances;              /* committed rebalances */
    uint64_t rebalance_failures;      /* computed but not committed (policy, weight move or store failed) */
    bool has_last;                    /* last_* hold the last committed rebalance */
    double last_balancedness_before;  /* of the load it was computed from */
    double last_balancedness_after;
    uint64_t last_experts_moved;      /* slots whose expert changed */
    uint64_t last_bytes_moved;        /* weight bytes copied (0 without attached weights) */
    double last_move_ms;
    double last_compute_ms;
    uint64_t bytes_moved_total;       /* weight bytes copied by every rebalance, failed ones included */
    uint64_t passes_recorded;         /* RecordLoad passes counted (dummy passes are not) */
} eplb_model_stats;

/* One registered model as ListModels shows it. */
typedef struct eplb_model_summary {
    char model_id[EPLB_MODEL_NAME_MAX + 1];
    eplb_role role;
    char main_model_id[EPLB_MODEL_NAME_MAX + 1];
    char architecture[EPLB_ARCH_MAX + 1];
    char resolved_path[EPLB_PATH_MAX];
    uint64_t epoch;
    eplb_model_shape shape;
    eplb_move_state state;
    char state_reason[EPLB_ERROR_MSG_MAX];
    bool weights_attached;
    char damaged[EPLB_ERROR_MSG_MAX]; /* non-empty: only model_id is meaningful */
    eplb_model_stats stats;           /* as last published; zero for a damaged model */
} eplb_model_summary;

/* Every visible model, sorted by id, into *out (malloc'd, *n entries; free
 * it with free()).  Never waits for an operation.  EPLB_ENOMEM. */
eplb_status eplb_registry_list(eplb_registry *r, eplb_model_summary **out, size_t *n, eplb_error *err);

/* DeleteModel: remove the model from the store, then from memory.
 * EPLB_ENOTFOUND; EPLB_EPRECONDITION (nothing changes) when, without
 * force, its weights are attached, another operation on it is in progress,
 * or speculators name it as their main model (with force: the weights are
 * closed and the operation waited for; speculators are left as they are).
 * A damaged model can always be deleted.  Store errors change nothing. */
eplb_status eplb_registry_delete(eplb_registry *r, const char *model_id, bool force, eplb_error *err);

/* Persist every model whose load window changed since it was last saved
 * (a clean shutdown keeps the window).  Returns the first error. */
eplb_status eplb_registry_flush(eplb_registry *r, eplb_error *err);

/* ---- expert weights --------------------------------------------------------
 * A model may have its expert weight buffers attached; a committing
 * Rebalance then moves the bytes in place, layer by layer, before the new
 * placement is committed.  The mover (plans + a CPU or HIP backend) sits
 * behind this interface, so the core knows no backend. */
/* What one layer's scatter copied (eplb_weights_ops.scatter). */
typedef struct eplb_move_bytes {
    uint64_t written;     /* bytes written into live slots */
    uint64_t cross_gpu;   /* of the layer's copies (both phases), bytes read on one GPU and written on another */
    uint64_t staged;      /* bytes copied into staging by the layer's gather */
} eplb_move_bytes;

typedef struct eplb_weights_ops {
    /* Before anything moves, with the plan old -> new ([L][P]):
     * EPLB_EPRECONDITION when it needs a rank this server does not hold or
     * an expert no slot holds (refused, nothing touched, state unchanged);
     * EPLB_EDATALOSS when the buffers no longer hold what was attached (a
     * shm object shrank or went away): the model needs a reload. */
    eplb_status (*check)(void *ctx, uint32_t num_layers, uint32_t num_physical,
                         const int32_t *old_phy2log, const int32_t *new_phy2log, eplb_error *err);
    /* Phase 1 of one layer ([P] rows): copy the old contents the plan
     * stages into staging; writes no slot.  EPLB_OK; EPLB_EINTERNAL: it
     * failed and the layer is as it was; EPLB_EDATALOSS: the buffers are
     * lost (shrunk under us): the model needs a reload. */
    eplb_status (*gather)(void *ctx, uint32_t layer, uint32_t num_physical, const int32_t *old_row,
                          const int32_t *new_row, eplb_error *err);
    /* Phase 2 of the layer gathered last: write its destination slots from
     * staging and from unchanged slots.  Idempotent, so the caller may call
     * it again after a failure to complete the layer.  EPLB_OK (*bytes: what
     * the layer's two phases copied); EPLB_EDATALOSS: some slots were
     * written, others not (or the buffers are lost). */
    eplb_status (*scatter)(void *ctx, uint32_t layer, uint32_t num_physical, const int32_t *old_row,
                           const int32_t *new_row, eplb_move_bytes *bytes, eplb_error *err);
    void (*close)(void *ctx);
    /* GPU-side ordering with the engine's streams (docs/api.md "Ordering
     * with the engine's GPU streams"); both NULL for weights without device
     * events (shm), and then a request's wait event is refused
     * (EPLB_EINVAL, "events need a device backend") before anything moves.
     * begin: after check, before the first gather, only when the request
     * carries a wait event (len bytes): the copy streams wait on it.  A
     * failure is a refusal like check's: nothing moved (EPLB_EDATALOSS: the
     * buffers are lost).
     * end: after the last scatter of a move that wrote bytes: record the
     * done event after every copy and write its handle (*has: one was
     * written).  A failure there does not undo the move: every phase
     * returned complete (the backend synchronizes), so the move commits and
     * the answer carries no done event. */
    eplb_status (*begin)(void *ctx, const uint8_t *wait_event, size_t len, eplb_error *err);
    eplb_status (*end)(void *ctx, uint8_t done_event[64], bool *has, eplb_error *err);
} eplb_weights_ops;

/* Bytes of an IPC event handle (hipIpcEventHandle_t, cudaIpcEventHandle_t). */
#define EPLB_EVENT_BYTES 64

/* Attach (or replace) a model's weights, opened for `shape` (layers,
 * physical experts, ep_size); the registry owns ctx from now on, whatever
 * the result (closed on error, on detach, on replace, when SetupFromMapping
 * changes the layout, and at eplb_registry_close).  EPLB_ENOTFOUND for an
 * unknown model; EPLB_EPRECONDITION when the model's shape changed since
 * `shape` was read. */
eplb_status eplb_registry_attach_weights(eplb_registry *r, const char *model_id,
                                         const eplb_weights_ops *ops, void *ctx,
                                         const eplb_model_shape *shape, eplb_error *err);

/* Close a model's weights; *detached says whether any were attached. */
eplb_status eplb_registry_detach_weights(eplb_registry *r, const char *model_id, bool *detached,
                                         eplb_error *err);

/* ---- placement engine (eplb_rebalance.c) --------------------------------- */

typedef struct eplb_setup_request {
    const char *model_id;
    const eplb_handle *model;         /* NULL: not given; else must resolve to the model's shape */
    const int32_t *expanded_phy2log;  /* [L][num_physical] */
    size_t expanded_len;
    uint32_t num_physical;            /* P_new */
    uint32_t old_num_physical;        /* must be the current P */
    uint32_t ep_size;                 /* >= 1, divides P_new */
    bool has_expected_epoch;
    uint64_t expected_epoch;
} eplb_setup_request;

/* SetupFromMapping (elastic EP): adopt the expanded map, rebuild log2phy and
 * logcnt, count load over the first min(P_old, P_new) slots until the next
 * rebalance, epoch + 1.  *out is the committed placement.  On any error
 * nothing changes: EPLB_ENOTFOUND, EPLB_EINVAL (shape, entries, an expert
 * left without a replica), EPLB_EPRECONDITION (handle not the model's MoE
 * shape, old_num_physical_experts stale, model needs a weight reload),
 * EPLB_EABORTED (expected_epoch differs), store errors. */
eplb_status eplb_registry_setup_from_mapping(eplb_registry *r, const eplb_setup_request *req,
                                             eplb_placement *out, eplb_error *err);

typedef struct eplb_rebalance_request {
    const char *model_id;
    const int64_t *physical_load;     /* [L][P]; NULL: the recorded window */
    size_t physical_load_len;
    const int64_t *logical_load;      /* [L][N], instead of physical_load (what vLLM's policy gets) */
    size_t logical_load_len;
    uint32_t num_groups, num_nodes, num_gpus; /* 0: the registered topology */
    bool has_expected_epoch;
    uint64_t expected_epoch;
    bool dry_run;                     /* compute, change nothing */
    bool without_log2phy;             /* dry run: the answer's log2phy may be NULL (not wanted) */
    eplb_slot_order slot_order;
    uint32_t layers_per_step;         /* commit in steps of this many changed layers; 0: all at once */
    /* Policy, target, budgets, link costs, expert size, and the commit
     * gate's min_improvement (least balancedness gain; 0: any gain >= 0).
     * target, link costs and expert_bytes 0 take the model's defaults. */
    eplb_rebalance_knobs knobs;
    bool force;                       /* commit even when balancedness gets worse */
    /* The engine's IPC event (EPLB_EVENT_BYTES) recorded after its last use
     * of the weights; NULL/0: none (the engine synchronized before the
     * call).  Another length, or a wait event without weights that have
     * device events, is EPLB_EINVAL before anything is computed. */
    const uint8_t *wait_event;
    size_t wait_event_len;
    /* EPLB_EXEC_ENGINE: store the rebalance as pending and answer its plan
     * (eplb_rebalance_engine.c); max_staging_bytes bounds each rank's
     * staging (0: none), include_transfer_plan puts every rank's plan in
     * the result.  Both are EPLB_EINVAL with EPLB_EXEC_SERVER. */
    uint32_t execution;
    uint64_t max_staging_bytes;
    bool include_transfer_plan;
} eplb_rebalance_request;

typedef struct eplb_rebalance_result {
    eplb_placement placement;         /* committed (or proposed, dry run) */
    double balancedness_before;
    double balancedness_after;
    double *layer_before;             /* [L], malloc'd */
    double *layer_after;              /* [L], malloc'd */
    uint64_t experts_moved;           /* slots whose expert changes */
    double compute_ms;                /* policy + preservation + balancedness */
    bool committed;
    uint64_t bytes_moved;             /* weight bytes written into live slots (attached weights only) */
    uint64_t bytes_cross_gpu;         /* of the copies, bytes that crossed GPUs */
    uint64_t bytes_staged;            /* bytes copied into staging */
    double move_ms;
    eplb_next_report next;            /* policy used, reference, copies the change needs */
    uint64_t expert_bytes;            /* the expert size it used (request or model; 0 = unknown) */
    /* Steps (eplb_pending.h): the rebalance's id, layers holding its target
     * after this call, whether steps remain, the layers this call moved. */
    char reason[EPLB_ERROR_MSG_MAX];  /* why not committed (the gate), "" otherwise */
    char rebalance_id[EPLB_REBALANCE_ID_MAX + 1];
    uint32_t layers_done;
    bool pending;
    uint32_t *layers_moved;           /* [num_layers_moved], malloc'd */
    uint32_t num_layers_moved;
    /* The IPC handle of the event recorded after this call's copies
     * (eplb_weights_ops.end): set only when bytes moved on weights with
     * device events and the record succeeded. */
    bool has_done_event;
    uint8_t done_event[EPLB_EVENT_BYTES];
    /* EPLB_EXEC_ENGINE: the step's transfer plan (when asked for), from
     * the placement of plan_base_epoch (the one served now). */
    uint32_t execution;               /* eplb_execution of the rebalance */
    bool has_plan;
    eplb_transfer_plan plan;
    uint64_t plan_base_epoch;
} eplb_rebalance_result;

/* Rebalance: compute a new placement from the request's load (or the
 * window) with DeepSeek's policy, keep experts in their slots unless asked
 * not to, and commit it (epoch + 1) unless dry_run.  On error nothing
 * changes.  Free *out with eplb_rebalance_result_free. */
eplb_status eplb_registry_rebalance(eplb_registry *r, const eplb_rebalance_request *req,
                                    eplb_rebalance_result *out, eplb_error *err);
void eplb_rebalance_result_free(eplb_rebalance_result *res);

/* ContinueRebalance: the next step of the model's stepped rebalance
 * rebalance_id (layers_per_step more changed layers moved and committed,
 * epoch + 1); the last step clears it.  EPLB_ENOTFOUND when the model or
 * that rebalance is unknown (finished, superseded by a reload, never
 * started); EPLB_EPRECONDITION when the model needs a reload, or the
 * rebalance moves weights and none are attached now.  Errors of the move
 * itself as Rebalance's.  layer_before/layer_after are not filled; the
 * balancedness values are the whole rebalance's. */
eplb_status eplb_registry_continue_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                             eplb_rebalance_result *out, eplb_error *err);

/* ContinueRebalance with the engine's wait event (as in
 * eplb_rebalance_request; NULL/0: none), checked the same way. */
eplb_status eplb_registry_continue_rebalance_ev(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                                const uint8_t *wait_event, size_t wait_event_len,
                                                eplb_rebalance_result *out, eplb_error *err);

/* ---- engine-executed rebalances (eplb_rebalance_engine.c) ------------------
 * Rebalance(execution = EPLB_EXEC_ENGINE) stores the target as the model's
 * pending rebalance and changes nothing else; the engine's ranks fetch
 * their plans, run them, and one caller commits or aborts:
 *
 *   pending(ENGINE, step k) --CommitRebalance--> epoch + 1, served rows of
 *      |                                         step k = target's; pending
 *      |                                         (step k+1) or cleared
 *      +--AbortRebalance(bytes_touched = 0)----> cleared, nothing else
 *      +--AbortRebalance(bytes_touched > 0)----> cleared, NEEDS_RELOAD
 * Every transition is one store transaction (model row + pending row). */

/* Continue a pending rebalance: a server-executed one moves and commits its
 * next step (as eplb_registry_continue_rebalance_ev); an engine-executed
 * one only answers the step awaiting CommitRebalance (its layers, and its
 * plan when include_transfer_plan), changing nothing. */
typedef struct eplb_continue_request {
    const char *model_id;
    const char *rebalance_id;
    const uint8_t *wait_event;
    size_t wait_event_len;
    bool include_transfer_plan;
} eplb_continue_request;
eplb_status eplb_registry_continue(eplb_registry *r, const eplb_continue_request *req, eplb_rebalance_result *out,
                                   eplb_error *err);

/* One rank's plan (or every rank's: rank EPLB_TRANSFER_ALL_RANKS) of the
 * step awaiting CommitRebalance, copied out (free plan with
 * eplb_transfer_plan_free). */
#define EPLB_TRANSFER_ALL_RANKS UINT32_MAX
typedef struct eplb_transfer_answer {
    char rebalance_id[EPLB_REBALANCE_ID_MAX + 1];
    uint64_t base_epoch;              /* the served placement the plan starts from */
    uint64_t expert_bytes;            /* 0 = unknown */
    eplb_transfer_plan plan;
} eplb_transfer_answer;
/* EPLB_ENOTFOUND (model, or no such rebalance pending); EPLB_EINVAL (rank
 * >= ep_size); EPLB_EPRECONDITION (the rebalance is server-executed, the
 * model needs a reload); EPLB_ENOMEM. */
eplb_status eplb_registry_get_transfer_plan(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                            uint32_t rank, eplb_transfer_answer *out, eplb_error *err);

/* CommitRebalance: the step every rank executed becomes the served
 * placement (epoch + 1) with the pending record in one transaction.
 * base_epoch (when has_base_epoch) must be the epoch the plan started
 * from, so a retried commit cannot commit a step nobody ran.  out as
 * ContinueRebalance's (placement now served, layers_moved, pending,
 * layers_done).  EPLB_EABORTED when that rebalance is not the one pending
 * (nothing changes) or base_epoch differs; EPLB_EPRECONDITION when it is
 * server-executed or the model needs a reload; store errors change
 * nothing. */
eplb_status eplb_registry_commit_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                           bool has_base_epoch, uint64_t base_epoch, eplb_rebalance_result *out,
                                           eplb_error *err);

typedef struct eplb_abort_result {
    uint64_t epoch;
    eplb_move_state state;
} eplb_abort_result;
/* AbortRebalance: bytes_touched 0 clears the pending rebalance (placement
 * and epoch stay); > 0 also puts the model in NEEDS_RELOAD (the weights
 * match no map), stored before the answer (published even when the store
 * refuses: the bytes are what they are).  Errors as CommitRebalance's. */
eplb_status eplb_registry_abort_rebalance(eplb_registry *r, const char *model_id, const char *rebalance_id,
                                          uint64_t bytes_touched, eplb_abort_result *out, eplb_error *err);

typedef struct eplb_record_request {
    const char *model_id;
    const int64_t *physical_load;     /* [passes][L][P], packed */
    size_t physical_load_len;
    uint32_t num_passes;              /* passes in physical_load; 0 = 1 */
    bool is_dummy;                    /* not counted */
} eplb_record_request;

typedef struct eplb_record_result {
    uint64_t passes_recorded;         /* passes counted so far */
    bool rebalanced;                  /* this pass triggered an automatic rebalance */
    uint64_t epoch;                   /* epoch after the call */
    char auto_rebalance_error[EPLB_ERROR_MSG_MAX]; /* why an automatic rebalance failed ("" if none) */
} eplb_record_result;

/* RecordLoad: add one pass to the model's window.  An automatic rebalance
 * that fails does not fail the call (the pass is counted): it is reported
 * in out->auto_rebalance_error.  Every step_interval
 * passes, a model registered with auto_rebalance is rebalanced from its
 * window and committed (EPLB_SLOT_MIN_TRAFFIC when weights are attached,
 * since then the bytes are ours to move; else EPLB_SLOT_PRESERVE).  A bad request changes nothing. */
eplb_status eplb_registry_record_load(eplb_registry *r, const eplb_record_request *req,
                                      eplb_record_result *out, eplb_error *err);

#endif
