/* eplb_registry_internal.h -- private to eplb_registry.c and
 * eplb_rebalance.c: the registry's layout and its locked helpers. */
#ifndef EPLB_REGISTRY_INTERNAL_H
#define EPLB_REGISTRY_INTERNAL_H

#include <pthread.h>

#include "eplb_registry.h"

typedef struct registry_entry {
    pthread_mutex_t lock;   /* guards rec and the weights */
    eplb_model_record rec;
    const eplb_weights_ops *weights; /* NULL: placement only */
    void *weights_ctx;
} registry_entry;

struct eplb_registry {
    pthread_rwlock_t lock;        /* guards models and count */
    registry_entry **models;      /* [count]; a handful per server, so lookups scan */
    size_t count, cap;
    const eplb_store_ops *store;  /* NULL: memory only */
    void *store_ctx;
    eplb_limits limits;
};

/* Caller holds r->lock (either mode). */
registry_entry *registry_find_locked(eplb_registry *r, const char *model_id);

/* Look a model up and lock it: r->lock is held for reading and the entry's
 * mutex taken; release both with registry_release.  EPLB_ENOTFOUND (nothing
 * held) when unknown. */
eplb_status registry_acquire(eplb_registry *r, const char *model_id, registry_entry **out,
                             eplb_error *err);
void registry_release(eplb_registry *r, registry_entry *e);

/* Commit next as e's placement with the given shape: epoch + 1, written to
 * the store (with the window if dirty) before memory changes.  Takes
 * ownership of next's arrays in every case.  On error e is unchanged. */
eplb_status registry_commit_locked(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                   const eplb_model_shape *shape, eplb_error *err);

#endif
