/* eplb_registry.c -- registered models and RegisterModel's rules.
 *
 * Invariants:
 *  1. A model is in r->models only after the store accepted it.
 *  2. A model's record changes only under its entry lock, and only after the
 *     store accepted the new record (write-ahead: the store is the truth a
 *     restart sees, memory never runs ahead of it).
 *  3. Lock order: r->lock before an entry lock; never the other way. */
#include "eplb_registry.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry_internal.h"

static void entry_free(registry_entry *e) {
    if (!e)
        return;
    if (e->weights)
        e->weights->close(e->weights_ctx);
    eplb_placement_free(&e->rec.placement);
    eplb_load_window_free(&e->rec.window);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

registry_entry *registry_find_locked(eplb_registry *r, const char *model_id) {
    for (size_t i = 0; i < r->count; i++)
        if (strcmp(r->models[i]->rec.model_id, model_id) == 0)
            return r->models[i];
    return NULL;
}

eplb_status registry_acquire(eplb_registry *r, const char *model_id, registry_entry **out,
                             eplb_error *err) {
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = registry_find_locked(r, model_id);
    if (!e) {
        pthread_rwlock_unlock(&r->lock);
        *out = NULL;
        return eplb_error_set(err, EPLB_ENOTFOUND, "model %s is not registered", model_id);
    }
    pthread_mutex_lock(&e->lock);
    *out = e;
    return EPLB_OK;
}

void registry_release(eplb_registry *r, registry_entry *e) {
    pthread_mutex_unlock(&e->lock);
    pthread_rwlock_unlock(&r->lock);
}

eplb_status registry_commit_locked(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                   const eplb_model_shape *shape, eplb_error *err) {
    eplb_model_record staged = e->rec; /* shallow: the window is shared, not copied */
    staged.shape = *shape;
    staged.placement = *next;
    staged.placement.epoch = e->rec.placement.epoch + 1;
    if (r->store) {
        eplb_status st = r->store->save(r->store_ctx, &staged, err);
        if (st != EPLB_OK) {
            eplb_placement_free(next);
            return st;
        }
    }
    eplb_placement_free(&e->rec.placement);
    e->rec.placement = staged.placement;
    e->rec.shape = *shape;
    if (r->store)
        e->rec.window.dirty = false;
    memset(next, 0, sizeof *next);
    return EPLB_OK;
}

eplb_status eplb_registry_get_shape(eplb_registry *r, const char *model_id, eplb_model_shape *out,
                                    eplb_error *err) {
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    *out = e->rec.shape;
    registry_release(r, e);
    return EPLB_OK;
}

eplb_status eplb_registry_attach_weights(eplb_registry *r, const char *model_id,
                                         const eplb_weights_ops *ops, void *ctx,
                                         const eplb_model_shape *shape, eplb_error *err) {
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK) {
        ops->close(ctx);
        return st;
    }
    const eplb_model_shape *now = &e->rec.shape;
    if (now->num_layers != shape->num_layers || now->num_physical != shape->num_physical ||
        now->ep_size != shape->ep_size) {
        registry_release(r, e);
        ops->close(ctx);
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "model %s changed to %u physical experts on %u ranks while the weights were being "
                              "attached: attach again", model_id, now->num_physical, now->ep_size);
    }
    if (e->weights)
        e->weights->close(e->weights_ctx);
    e->weights = ops;
    e->weights_ctx = ctx;
    registry_release(r, e);
    return EPLB_OK;
}

eplb_status eplb_registry_detach_weights(eplb_registry *r, const char *model_id, bool *detached,
                                         eplb_error *err) {
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    *detached = e->weights != NULL;
    if (e->weights)
        e->weights->close(e->weights_ctx);
    e->weights = NULL;
    e->weights_ctx = NULL;
    registry_release(r, e);
    return EPLB_OK;
}

eplb_status eplb_registry_flush(eplb_registry *r, eplb_error *err) {
    eplb_status first = EPLB_OK;
    if (!r->store)
        return EPLB_OK;
    pthread_rwlock_rdlock(&r->lock);
    for (size_t i = 0; i < r->count; i++) {
        registry_entry *e = r->models[i];
        pthread_mutex_lock(&e->lock);
        if (e->rec.window.dirty) {
            eplb_status st = r->store->save(r->store_ctx, &e->rec, first == EPLB_OK ? err : NULL);
            if (st == EPLB_OK)
                e->rec.window.dirty = false;
            else if (first == EPLB_OK)
                first = st;
        }
        pthread_mutex_unlock(&e->lock);
    }
    pthread_rwlock_unlock(&r->lock);
    return first;
}

/* Room for one more model.  Caller holds r->lock for writing. */
static eplb_status reserve_locked(eplb_registry *r, eplb_error *err) {
    if (r->count < r->cap)
        return EPLB_OK;
    size_t cap = r->cap ? r->cap * 2 : 8;
    registry_entry **m = realloc(r->models, cap * sizeof *m);
    if (!m)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory adding a model");
    r->models = m;
    r->cap = cap;
    return EPLB_OK;
}

/* Takes ownership of rec's placement whether it succeeds or not. Caller
 * holds r->lock for writing (or is the single-threaded loader). */
static eplb_status insert_locked(eplb_registry *r, eplb_model_record *rec, eplb_error *err) {
    eplb_status st = reserve_locked(r, err);
    if (st != EPLB_OK) {
        eplb_placement_free(&rec->placement);
        eplb_load_window_free(&rec->window);
        return st;
    }
    registry_entry *e = calloc(1, sizeof *e);
    if (!e) {
        eplb_placement_free(&rec->placement);
        eplb_load_window_free(&rec->window);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory adding model %s", rec->model_id);
    }
    pthread_mutex_init(&e->lock, NULL);
    e->rec = *rec;
    memset(&rec->placement, 0, sizeof rec->placement);
    memset(&rec->window, 0, sizeof rec->window);
    r->models[r->count++] = e;
    return EPLB_OK;
}

static eplb_status load_one(void *arg, eplb_model_record *rec, eplb_error *err) {
    eplb_registry *r = arg;
    if (registry_find_locked(r, rec->model_id)) {
        eplb_placement_free(&rec->placement);
        eplb_load_window_free(&rec->window);
        return eplb_error_set(err, EPLB_EDATALOSS, "store holds model %s twice", rec->model_id);
    }
    return insert_locked(r, rec, err);
}

eplb_status eplb_registry_open(const eplb_store_ops *store_ops, void *store_ctx,
                               const eplb_limits *limits, eplb_registry **out, eplb_error *err) {
    *out = NULL;
    eplb_registry *r = calloc(1, sizeof *r);
    if (!r)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    pthread_rwlock_init(&r->lock, NULL);
    r->store = store_ops;
    r->store_ctx = store_ctx;
    r->limits = *limits;
    if (store_ops) {
        eplb_status st = store_ops->load_all(store_ctx, load_one, r, err);
        if (st != EPLB_OK) {
            eplb_registry_close(r);
            return st;
        }
    }
    *out = r;
    return EPLB_OK;
}

void eplb_registry_close(eplb_registry *r) {
    if (!r)
        return;
    for (size_t i = 0; i < r->count; i++)
        entry_free(r->models[i]);
    free(r->models);
    pthread_rwlock_destroy(&r->lock);
    free(r);
}

size_t eplb_registry_count(eplb_registry *r) {
    pthread_rwlock_rdlock(&r->lock);
    size_t n = r->count;
    pthread_rwlock_unlock(&r->lock);
    return n;
}

/* A speculator shares its main model's EP configuration (vLLM keeps one
 * EPLB state for both): name the first field that differs. */
static eplb_status check_speculator(const eplb_model_record *main, const eplb_model_shape *s,
                                    const char *field, eplb_error *err) {
    const eplb_model_shape *m = &main->shape;
    struct { const char *name; uint32_t mine, theirs; } f[] = {
        { "num_routed_experts", s->num_logical, m->num_logical },
        { "num_logical_experts", s->num_logical, m->num_logical },
        { "num_redundant_experts", s->num_redundant, m->num_redundant },
        { "num_physical_experts", s->num_physical, m->num_physical },
        { "num_expert_groups", s->num_groups, m->num_groups },
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].mine != f[i].theirs)
            return eplb_error_set(err, EPLB_EPRECONDITION,
                                  "speculator %s.moe.%s %u differs from main model %s (%u)",
                                  field, f[i].name, f[i].mine, main->model_id, f[i].theirs);
    if (s->ep_size != m->ep_size)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "speculator parallel.ep_size %u differs from main model %s (%u)",
                              s->ep_size, main->model_id, m->ep_size);
    return EPLB_OK;
}

/* Name the first difference between an existing registration and a new one
 * under the same name, or return NULL when they are the same. */
static const char *registration_difference(const eplb_model_record *old, const eplb_model_record *new,
                                           char *buf, size_t len) {
    const eplb_model_shape *a = &old->shape, *b = &new->shape;
    struct { const char *name; uint32_t was, now; } f[] = {
        { "num_moe_layers", a->num_layers, b->num_layers },
        { "num_logical_experts", a->num_logical, b->num_logical },
        { "num_physical_experts", a->num_physical, b->num_physical },
        { "num_local_physical_experts", a->num_local, b->num_local },
        { "num_redundant_experts", a->num_redundant, b->num_redundant },
        { "num_expert_groups", a->num_groups, b->num_groups },
        { "ep_size", a->ep_size, b->ep_size },
        { "num_nodes", a->num_nodes, b->num_nodes },
        { "window_size", a->window_size, b->window_size },
        { "step_interval", a->step_interval, b->step_interval },
        { "auto_rebalance", a->auto_rebalance, b->auto_rebalance },
        { "role", (uint32_t)old->role, (uint32_t)new->role },
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].was != f[i].now) {
            snprintf(buf, len, "%s %u (registered) != %u", f[i].name, f[i].was, f[i].now);
            return buf;
        }
    if (strcmp(old->main_model_id, new->main_model_id) != 0) {
        snprintf(buf, len, "main_model_id '%s' (registered) != '%s'", old->main_model_id,
                 new->main_model_id);
        return buf;
    }
    if (strcmp(old->resolved_path, new->resolved_path) != 0) {
        snprintf(buf, len, "resolved path %s (registered) != %s", old->resolved_path,
                 new->resolved_path);
        return buf;
    }
    return NULL;
}

/* Everything that does not need the registry: the request's own checks,
 * unwrapping and the MoE shape.  Returns OK with out->registered = false
 * and a reason for the quiet refusals. */
static eplb_status register_prepare(const eplb_registry *r, const eplb_register_request *req,
                                    eplb_model_record *rec, eplb_register_result *out,
                                    eplb_error *err) {
    eplb_status st = eplb_model_name_check(req->model_name, "model_name", err);
    if (st != EPLB_OK)
        return st;
    if (req->role != EPLB_ROLE_MAIN && req->role != EPLB_ROLE_SPECULATOR)
        return eplb_error_set(err, EPLB_EINVAL, "role %d is not a ModelRole", (int)req->role);
    if (req->role == EPLB_ROLE_SPECULATOR) {
        st = eplb_model_name_check(req->main_model_id, "main_model_id (required for MODEL_ROLE_SPECULATOR)", err);
        if (st != EPLB_OK)
            return st;
        if (strcmp(req->main_model_id, req->model_name) == 0)
            return eplb_error_set(err, EPLB_EINVAL, "a speculator cannot be its own main model (%s)",
                                  req->model_name);
    } else if (req->main_model_id[0]) {
        return eplb_error_set(err, EPLB_EINVAL, "main_model_id is only for MODEL_ROLE_SPECULATOR");
    }

    eplb_resolved res;
    st = eplb_handle_resolve(req->model, "model", &res, err);
    if (st != EPLB_OK)
        return st;
    snprintf(out->model_id, sizeof out->model_id, "%s", req->model_name);
    snprintf(out->resolved_path, sizeof out->resolved_path, "%s", res.path);

    if (!req->parallel.enable_eplb) {
        snprintf(out->reason, sizeof out->reason, "EPLB is disabled (parallel.enable_eplb is false)");
        return EPLB_OK;
    }
    if (req->load_dummy_weights) {
        snprintf(out->reason, sizeof out->reason,
                 "dummy weights are loaded (load_dummy_weights); there is no real expert load to balance");
        return EPLB_OK;
    }
    if (!res.moe) {
        snprintf(out->reason, sizeof out->reason, "%s", res.reason);
        return EPLB_OK;
    }
    st = eplb_model_shape_make(&res.moe->moe, res.field, &req->parallel, &r->limits, &rec->shape, err);
    if (st != EPLB_OK)
        return st;

    snprintf(rec->model_id, sizeof rec->model_id, "%s", req->model_name);
    rec->role = req->role;
    snprintf(rec->main_model_id, sizeof rec->main_model_id, "%s", req->main_model_id);
    snprintf(rec->architecture, sizeof rec->architecture, "%.*s", EPLB_ARCH_MAX, res.moe->architecture);
    snprintf(rec->resolved_path, sizeof rec->resolved_path, "%s", res.path);
    out->registered = true;
    return EPLB_OK;
}

eplb_status eplb_registry_register(eplb_registry *r, const eplb_register_request *req,
                                   eplb_register_result *out, eplb_error *err) {
    eplb_model_record rec;
    memset(out, 0, sizeof *out);
    memset(&rec, 0, sizeof rec);

    eplb_status st = register_prepare(r, req, &rec, out, err);
    if (st != EPLB_OK || !out->registered) {
        out->registered = false;
        return st;
    }
    out->registered = false; /* until it is stored */

    pthread_rwlock_wrlock(&r->lock);
    if (rec.role == EPLB_ROLE_SPECULATOR) {
        registry_entry *main = registry_find_locked(r, rec.main_model_id);
        if (!main) {
            st = eplb_error_set(err, EPLB_ENOTFOUND, "main model %s is not registered", rec.main_model_id);
            goto unlock;
        }
        if (main->rec.role != EPLB_ROLE_MAIN) {
            st = eplb_error_set(err, EPLB_EPRECONDITION, "main_model_id %s is itself a speculator",
                                rec.main_model_id);
            goto unlock;
        }
        st = check_speculator(&main->rec, &rec.shape, "model", err);
        if (st != EPLB_OK)
            goto unlock;
    }

    registry_entry *existing = registry_find_locked(r, rec.model_id);
    if (existing) {
        char why[EPLB_ERROR_MSG_MAX - 128];
        pthread_mutex_lock(&existing->lock);
        const char *diff = registration_difference(&existing->rec, &rec, why, sizeof why);
        if (diff) {
            st = eplb_error_set(err, EPLB_EEXIST,
                                "model %s is already registered differently: %s", rec.model_id, diff);
        } else {
            if (existing->rec.needs_weight_reload) {
                /* Registering again is how an engine says it reloaded its
                 * weights (for the placement it is told here). */
                eplb_model_record cleared = existing->rec;
                cleared.needs_weight_reload = false;
                cleared.window.dirty = false;
                st = r->store ? r->store->save(r->store_ctx, &cleared, err) : EPLB_OK;
                if (st == EPLB_OK)
                    existing->rec.needs_weight_reload = false;
            }
            if (st == EPLB_OK)
                st = eplb_placement_copy(&out->placement, &existing->rec.placement, err);
            if (st == EPLB_OK) {
                out->registered = true;
                out->needs_weight_reload = existing->rec.needs_weight_reload;
                snprintf(out->reason, sizeof out->reason,
                         "already registered; placement kept at epoch %llu",
                         (unsigned long long)existing->rec.placement.epoch);
            }
        }
        pthread_mutex_unlock(&existing->lock);
        goto unlock;
    }

    st = eplb_placement_init(&rec.placement, rec.shape.num_layers, rec.shape.num_logical,
                             rec.shape.num_physical, err);
    if (st != EPLB_OK)
        goto unlock;
    eplb_load_window_init(&rec.window, rec.shape.num_layers, rec.shape.num_logical, rec.shape.window_size);
    /* Everything that can fail in memory happens before the store write:
     * once the store has the model, memory must follow (invariant 2). */
    if ((st = eplb_placement_copy(&out->placement, &rec.placement, err)) != EPLB_OK ||
        (st = reserve_locked(r, err)) != EPLB_OK)
        goto unlock_free;
    if (r->store && (st = r->store->save(r->store_ctx, &rec, err)) != EPLB_OK)
        goto unlock_free;
    st = insert_locked(r, &rec, err); /* cannot fail on capacity now */
    if (st != EPLB_OK)
        goto unlock_free;
    out->registered = true;
    goto unlock;
unlock_free:
    eplb_placement_free(&out->placement);

unlock:
    pthread_rwlock_unlock(&r->lock);
    eplb_placement_free(&rec.placement);
    return st;
}

eplb_status eplb_registry_get_placement(eplb_registry *r, const char *model_id,
                                        eplb_placement *out, bool *needs_weight_reload,
                                        eplb_error *err) {
    memset(out, 0, sizeof *out);
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = registry_find_locked(r, model_id);
    eplb_status st;
    if (!e) {
        st = eplb_error_set(err, EPLB_ENOTFOUND, "model %s is not registered", model_id);
    } else {
        pthread_mutex_lock(&e->lock);
        st = eplb_placement_copy(out, &e->rec.placement, err);
        if (needs_weight_reload)
            *needs_weight_reload = e->rec.needs_weight_reload;
        pthread_mutex_unlock(&e->lock);
    }
    pthread_rwlock_unlock(&r->lock);
    return st;
}
