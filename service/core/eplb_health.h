/* eplb_health.h -- what the registry says about the service's health, for
 * grpc.health.v1 (rpc_health.c): how many models cannot be served as they
 * are.  A model in NEEDS_RELOAD holds weight bytes that match no map (a
 * move failed part-way, or its buffers went away): the engine must reload
 * it, and until then its experts compute wrong results.  A damaged model's
 * stored row failed verification.  Either means the service is not doing
 * its job for that model, which a health watcher should see. */
#ifndef EPLB_HEALTH_H
#define EPLB_HEALTH_H

#include <stddef.h>

#include "eplb_registry.h"

typedef struct eplb_health {
    size_t models;            /* visible models */
    size_t needs_reload;      /* ... in NEEDS_RELOAD */
    size_t damaged;           /* ... whose stored row is damaged */
} eplb_health;

/* Count now.  Never waits for an operation: takes the registry lock (read)
 * and each entry's pub_lock for one field read.  Cost: O(models), no
 * allocation, so a completion-queue thread may call it. */
void eplb_registry_health(eplb_registry *r, eplb_health *out);

#endif
