/* eplb_registry_internal.h -- private to the registry's files
 * (eplb_registry.c, eplb_rebalance.c, eplb_move.c): the registry's layout,
 * its entries and their locks.
 *
 * Locks, in the only order they may nest -- op_lock, then r->lock, then
 * pub_lock; never the other way:
 *
 *   r->lock (rwlock)   guards r->models / r->count / r->state_bytes and each
 *                      entry's `listed`.  Held only to look a name up, to
 *                      insert or to remove an entry: never across a store
 *                      write, a policy run, a weight move or a wait for an
 *                      op_lock.  An op_lock holder may take it briefly (to
 *                      publish visibility or its budget).  Blocks: other
 *                      lookups (write mode), for a scan of a few entries.
 *   e->op_lock (mutex) serialises operations on one model (Register of an
 *                      existing name, SetupFromMapping, Rebalance, RecordLoad,
 *                      Attach/Detach, flush).  Held across that model's
 *                      policy, weight move and fsync; guards e->rec,
 *                      e->weights*, e->published's writers.  Blocks: only
 *                      operations on the same model.
 *   e->pub_lock (mutex) guards e->snap, e->state, e->state_reason and
 *                      e->stats: what readers see.  Held for pointer and
 *                      field copies only.
 *                      Blocks: nothing that does I/O or computes.
 *
 * Readers (GetPlacement, the speculator check, Register's answer) take
 * r->lock (read) then e->pub_lock, never e->op_lock: they never wait for a
 * slow operation.  An entry is reference counted (r->models holds one, each
 * operation or view in progress one), so it outlives its removal from the
 * list while someone still uses it. */
#ifndef EPLB_REGISTRY_INTERNAL_H
#define EPLB_REGISTRY_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "eplb_registry.h"

typedef struct registry_entry {
    atomic_uint refs;
    pthread_mutex_t op_lock;
    pthread_mutex_t pub_lock;
    char model_id[EPLB_MODEL_NAME_MAX + 1]; /* immutable */

    /* Under r->lock.  listed: in r->models.  visible: its first save is
     * done (a registration in progress is listed but not visible: lookups
     * answer NOT_FOUND, a second Register of the name waits on op_lock). */
    bool listed;
    bool visible;
    uint64_t state_bytes;        /* its share of r->state_bytes */

    /* Under pub_lock (readers) -- written only by the op_lock holder. */
    eplb_snapshot *snap;         /* the published epoch: placement and shape */
    eplb_move_state state;       /* IDLE or NEEDS_RELOAD between operations */
    char state_reason[EPLB_ERROR_MSG_MAX];
    char pending_id[EPLB_REBALANCE_ID_MAX + 1]; /* rec.pending as readers see it */
    uint32_t pending_done;
    uint32_t pending_exec;       /* eplb_execution of rec.pending */
    /* Activity counters (eplb_model_stats, never stored).  The op_lock
     * holder updates them under pub_lock (registry_stats_*), so
     * eplb_registry_list copies them without waiting for an operation. */
    eplb_model_stats stats;

    /* Under op_lock.  rec's placement and shape are unused (snap has them);
     * it keeps identity, the window and the store's view of the state. */
    eplb_model_record rec;
    char damaged[EPLB_ERROR_MSG_MAX];  /* non-empty: stored row failed verification */
    const eplb_weights_ops *weights;   /* NULL: placement only */
    void *weights_ctx;
    atomic_bool weights_attached;      /* weights != NULL, for readers without op_lock */
    /* Under op_lock: the transfer plan of the engine-executed step that
     * awaits CommitRebalance, built on first use for (pending id, served
     * epoch) and dropped when either changes (a restart rebuilds it: the
     * plan is a function of the served placement and the target). */
    bool has_xfer;
    eplb_transfer_plan xfer;
    char xfer_id[EPLB_REBALANCE_ID_MAX + 1];
    uint64_t xfer_epoch;
} registry_entry;

struct eplb_registry {
    pthread_rwlock_t lock;
    registry_entry **models;      /* [count]; a handful per server, so lookups scan */
    size_t count, cap;
    uint64_t state_bytes;         /* sum of the entries' state_bytes */
    const eplb_store_ops *store;  /* NULL: memory only */
    void *store_ctx;
    eplb_limits limits;
};

/* ---- entries and the list (eplb_registry.c) ----------------------------- */

/* A new entry with one reference (the caller's), unlisted; NULL when out
 * of memory. */
registry_entry *registry_entry_new(const char *model_id);
registry_entry *registry_entry_ref(registry_entry *e);
/* Drop a reference; the last one closes the weights and frees. NULL ok. */
void registry_entry_unref(registry_entry *e);

/* The listed entry of that name (visible or not), or NULL.  Caller holds
 * r->lock (either mode). */
registry_entry *registry_find(eplb_registry *r, const char *model_id);
/* Room for one more entry in the list.  Caller holds r->lock (write). */
eplb_status registry_reserve_slot(eplb_registry *r, eplb_error *err);
/* Insert (the list takes over the caller's reference) / remove (the list's
 * reference becomes the caller's).  Caller holds r->lock (write) and, to
 * remove, e's op_lock. */
void registry_list_insert(eplb_registry *r, registry_entry *e);
void registry_list_remove(eplb_registry *r, registry_entry *e);

/* EPLB_ENOTFOUND / EPLB_EDATALOSS with the message every call gives. */
eplb_status registry_not_found(const char *model_id, eplb_error *err);
eplb_status registry_damaged(const registry_entry *e, eplb_error *err);

/* Look a visible model up, take a reference and its op_lock; release with
 * registry_release.  EPLB_ENOTFOUND (nothing held) when unknown;
 * EPLB_EDATALOSS (nothing held) when its stored row was damaged. */
eplb_status registry_acquire(eplb_registry *r, const char *model_id, registry_entry **out,
                             eplb_error *err);
void registry_release(registry_entry *e);

/* The record to save for e with placement p, shape s and state st (shallow:
 * arrays are borrowed). */
eplb_model_record registry_record(const registry_entry *e, const eplb_placement *p,
                                  const eplb_model_shape *s, eplb_move_state st, const char *reason);

/* Store rec (memory-only registries accept everything). */
eplb_status registry_save(eplb_registry *r, const eplb_model_record *rec, eplb_error *err);

/* Commit next as e's placement with shape: epoch + 1, state IDLE, written to
 * the store (with the window if dirty) and then published.  Takes ownership
 * of next's arrays in every case.  On error nothing is published.  Caller
 * holds e->op_lock. */
eplb_status registry_commit_locked(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                   const eplb_model_shape *shape, eplb_error *err);

/* What a reader sees of e now: a reference to its snapshot, its move state
 * and reason, taken together under pub_lock.  Caller holds a reference to
 * e (or r->lock). */
void registry_view_of(registry_entry *e, eplb_model_view *out);

/* Close e's weights (if any).  Caller holds op_lock. */
void registry_close_weights(registry_entry *e);

/* Publish e->rec.pending's id and progress for readers.  Caller holds
 * op_lock. */
void registry_publish_pending(registry_entry *e);

/* Publish a new move state (and reason) for readers.  Caller holds op_lock. */
void registry_publish_state(registry_entry *e, eplb_move_state st, const char *reason);

/* Count a non-dry-run rebalance that was computed: committed (res's
 * balancedness, moves and times become the last_* values) or not; bytes
 * is what was copied either way.  Caller holds op_lock; takes pub_lock. */
void registry_stats_rebalance(registry_entry *e, bool committed, const eplb_rebalance_result *res,
                              uint64_t bytes);
/* Count one recorded pass.  Caller holds op_lock; takes pub_lock. */
void registry_stats_pass(registry_entry *e);

/* ---- engine-executed rebalances (eplb_rebalance_engine.c) ---------------- */

/* What a Rebalance asks of an engine execution. */
typedef struct registry_engine_exec {
    uint64_t max_staging_bytes;   /* per rank; 0 = no bound */
    uint64_t expert_bytes;        /* request's or model's; 0 = unknown */
    bool include_plan;
} registry_engine_exec;

/* Make next (ownership taken) e's pending engine-executed rebalance, in
 * steps of layers_per_step changed layers (0: all at once): the first
 * step's plan is built (a plan that cannot be, e.g. a staging bound below
 * what a layer needs, refuses and stores nothing), then the pending record
 * is stored with the unchanged placement.  Fills out (served placement,
 * id, pending, the step's layers, the plan when asked).  Caller holds
 * op_lock and has passed every check and the commit gate. */
eplb_status registry_engine_start(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                  uint32_t layers_per_step, const registry_engine_exec *x,
                                  eplb_rebalance_result *out, eplb_error *err);

/* ContinueRebalance of an engine-executed rebalance: answer the step
 * awaiting CommitRebalance (nothing moves or changes).  EPLB_ENOTFOUND when
 * rebalance_id is not the pending one.  Caller holds op_lock. */
eplb_status registry_engine_continue(registry_entry *e, const char *rebalance_id, bool include_plan,
                                     eplb_rebalance_result *out, eplb_error *err);

/* Forget the cached plan.  Caller holds op_lock. */
void registry_engine_plan_drop(registry_entry *e);

/* The current snapshot, for the op_lock holder (no reference taken: only
 * the op_lock holder replaces it). */
static inline const eplb_snapshot *registry_current(const registry_entry *e) { return e->snap; }

#endif
