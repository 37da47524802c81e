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
#include <stdint.h>

#include "eplb_model.h"
#include "eplb_placement.h"
#include "eplb_status.h"

typedef enum eplb_role {
    EPLB_ROLE_MAIN = 0,
    EPLB_ROLE_SPECULATOR = 1,
} eplb_role;

/* What is persisted of a model: identity, shape and placement. */
typedef struct eplb_model_record {
    char model_id[EPLB_MODEL_NAME_MAX + 1];     /* the model name: stable across restarts */
    eplb_role role;
    char main_model_id[EPLB_MODEL_NAME_MAX + 1];/* speculators only */
    char architecture[EPLB_ARCH_MAX + 1];       /* of the resolved MoE handle */
    char resolved_path[EPLB_PATH_MAX];
    eplb_model_shape shape;
    eplb_placement placement;
    bool needs_weight_reload;
} eplb_model_record;

/* Storage behind the registry.  Each call is one transaction: it either
 * stores everything it was given or nothing. */
typedef struct eplb_store_ops {
    eplb_status (*save)(void *ctx, const eplb_model_record *rec, eplb_error *err);
    /* Calls each() for every stored model; each() takes ownership of
     * rec->placement's arrays. */
    eplb_status (*load_all)(void *ctx,
                            eplb_status (*each)(void *arg, eplb_model_record *rec, eplb_error *err),
                            void *arg, eplb_error *err);
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
    eplb_placement placement;     /* a copy when registered; free with eplb_placement_free */
    bool needs_weight_reload;
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

/* A consistent copy of a model's placement (EPLB_ENOTFOUND if unknown). */
eplb_status eplb_registry_get_placement(eplb_registry *r, const char *model_id,
                                        eplb_placement *out, bool *needs_weight_reload,
                                        eplb_error *err);

#endif
