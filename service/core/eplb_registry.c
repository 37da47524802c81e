/* eplb_registry.c -- registered models, their lifetime, and RegisterModel's
 * rules.  Locks and what each blocks: eplb_registry_internal.h.
 *
 * Invariants:
 *  1. A model is visible only after the store accepted it.
 *  2. What readers see (e->snap, e->state) changes only after the store
 *     accepted it (write-ahead: the store is the truth a restart sees,
 *     memory never runs ahead of it), except NEEDS_RELOAD, which is also
 *     published when the store refuses it (the bytes are what they are).
 *  3. r->lock is never held across a store write or while waiting for an
 *     entry's op_lock; lock order is op_lock, r->lock, pub_lock. */
#include "eplb_registry.h"

#include <assert.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_registry_internal.h"

/* ---- entries ------------------------------------------------------------- */

static registry_entry *entry_new(const char *model_id) {
    registry_entry *e = eplb_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    atomic_init(&e->refs, 1);
    pthread_mutex_init(&e->op_lock, NULL);
    pthread_mutex_init(&e->pub_lock, NULL);
    snprintf(e->model_id, sizeof e->model_id, "%s", model_id);
    return e;
}

static registry_entry *entry_ref(registry_entry *e) {
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
    return e;
}

static void entry_unref(registry_entry *e) {
    if (!e || atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (e->weights)
        e->weights->close(e->weights_ctx);
    eplb_snapshot_unref(e->snap);
    eplb_placement_free(&e->rec.placement);
    eplb_load_window_free(&e->rec.window);
    pthread_mutex_destroy(&e->op_lock);
    pthread_mutex_destroy(&e->pub_lock);
    eplb_free(e);
}

/* Caller holds r->lock (either mode). */
static registry_entry *find_listed(eplb_registry *r, const char *model_id) {
    for (size_t i = 0; i < r->count; i++)
        if (strcmp(r->models[i]->model_id, model_id) == 0)
            return r->models[i];
    return NULL;
}

static eplb_status not_found(const char *model_id, eplb_error *err) {
    return eplb_error_set(err, EPLB_ENOTFOUND, "model %s is not registered", model_id);
}

static eplb_status damaged(const registry_entry *e, eplb_error *err) {
    return eplb_error_set(err, EPLB_EDATALOSS, "model %s cannot be served: %s", e->model_id, e->damaged);
}

eplb_status registry_acquire(eplb_registry *r, const char *model_id, registry_entry **out,
                             eplb_error *err) {
    *out = NULL;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = find_listed(r, model_id);
    if (!e || !e->visible) {
        pthread_rwlock_unlock(&r->lock);
        return not_found(model_id, err);
    }
    entry_ref(e);
    pthread_rwlock_unlock(&r->lock);
    pthread_mutex_lock(&e->op_lock);
    /* listed is written under r->lock *and* op_lock, so op_lock suffices
     * to read it: removed while we waited -> as if never found. */
    if (!e->listed || e->damaged[0]) {
        eplb_status st = e->listed ? damaged(e, err) : not_found(model_id, err);
        registry_release(e);
        return st;
    }
    *out = e;
    return EPLB_OK;
}

void registry_release(registry_entry *e) {
    pthread_mutex_unlock(&e->op_lock);
    entry_unref(e);
}

eplb_model_record registry_record(const registry_entry *e, const eplb_placement *p,
                                  const eplb_model_shape *s, eplb_move_state st, const char *reason) {
    eplb_model_record rec = e->rec; /* shallow: the window is shared, not copied */
    rec.placement = *p;
    rec.shape = *s;
    rec.state = st;
    snprintf(rec.state_reason, sizeof rec.state_reason, "%s", reason ? reason : "");
    rec.damaged[0] = '\0';
    return rec;
}

eplb_status registry_save(eplb_registry *r, const eplb_model_record *rec, eplb_error *err) {
    assert(eplb_move_state_persistent(rec->state));
    return r->store ? r->store->save(r->store_ctx, rec, err) : EPLB_OK;
}

/* Swap in what readers see.  Caller holds op_lock. */
static void publish(registry_entry *e, eplb_snapshot *snap, eplb_move_state st, const char *reason) {
    pthread_mutex_lock(&e->pub_lock);
    eplb_snapshot *old = e->snap;
    if (snap)
        e->snap = snap;
    e->state = st;
    snprintf(e->state_reason, sizeof e->state_reason, "%s", reason ? reason : "");
    pthread_mutex_unlock(&e->pub_lock);
    if (snap)
        eplb_snapshot_unref(old);
}

void registry_publish_state(registry_entry *e, eplb_move_state st, const char *reason) {
    e->rec.state = st;
    snprintf(e->rec.state_reason, sizeof e->rec.state_reason, "%s", reason ? reason : "");
    publish(e, NULL, st, reason);
}

/* Reserve (or give back, when the shape shrinks) the budget a shape change
 * needs.  EPLB_ENOSPACE past --max-state-mib. */
static eplb_status reserve_state_bytes(eplb_registry *r, registry_entry *e, uint64_t bytes, eplb_error *err) {
    eplb_status st = EPLB_OK;
    pthread_rwlock_wrlock(&r->lock);
    uint64_t total = r->state_bytes - e->state_bytes + bytes;
    if (bytes > e->state_bytes && total > r->limits.max_state_bytes)
        st = eplb_error_set(err, EPLB_ENOSPACE,
                            "model %s would take %llu MiB of placement and window state; the server has %llu MiB "
                            "of its %llu MiB budget left (--max-state-mib)",
                            e->model_id, (unsigned long long)(bytes >> 20),
                            (unsigned long long)((r->limits.max_state_bytes - (r->state_bytes - e->state_bytes)) >> 20),
                            (unsigned long long)(r->limits.max_state_bytes >> 20));
    else {
        r->state_bytes = total;
        e->state_bytes = bytes;
    }
    pthread_rwlock_unlock(&r->lock);
    return st;
}

eplb_status registry_commit_locked(eplb_registry *r, registry_entry *e, eplb_placement *next,
                                   const eplb_model_shape *shape, eplb_error *err) {
    const eplb_snapshot *cur = e->snap;
    const eplb_model_shape sh = *shape; /* shape may point into cur */
    shape = &sh;
    uint64_t old_bytes = e->state_bytes, new_bytes = eplb_model_state_bytes(shape);
    next->epoch = cur->placement.epoch + 1;
    eplb_snapshot *snap;
    eplb_status st = eplb_snapshot_new(next, shape, &snap, err);
    if (st != EPLB_OK)
        return st;
    if (new_bytes != old_bytes && (st = reserve_state_bytes(r, e, new_bytes, err)) != EPLB_OK) {
        eplb_snapshot_unref(snap);
        return st;
    }
    eplb_model_record rec = registry_record(e, &snap->placement, shape, EPLB_MOVE_IDLE, "");
    if ((st = registry_save(r, &rec, err)) != EPLB_OK) {
        if (new_bytes != old_bytes)
            reserve_state_bytes(r, e, old_bytes, NULL);
        eplb_snapshot_unref(snap);
        return st;
    }
    if (r->store)
        e->rec.window.dirty = false;
    e->rec.state = EPLB_MOVE_IDLE;
    e->rec.state_reason[0] = '\0';
    publish(e, snap, EPLB_MOVE_IDLE, "");
    return EPLB_OK;
}

/* ---- readers --------------------------------------------------------------- */

eplb_status eplb_registry_view(eplb_registry *r, const char *model_id, eplb_model_view *out,
                               eplb_error *err) {
    memset(out, 0, sizeof *out);
    eplb_status st = EPLB_OK;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = find_listed(r, model_id);
    if (!e || !e->visible) {
        st = not_found(model_id, err);
    } else if (e->damaged[0]) {
        st = damaged(e, err);
    } else {
        pthread_mutex_lock(&e->pub_lock);
        out->snap = eplb_snapshot_ref(e->snap);
        out->state = e->state;
        snprintf(out->state_reason, sizeof out->state_reason, "%s", e->state_reason);
        pthread_mutex_unlock(&e->pub_lock);
    }
    pthread_rwlock_unlock(&r->lock);
    return st;
}

eplb_status eplb_registry_get_shape(eplb_registry *r, const char *model_id, eplb_model_shape *out,
                                    eplb_error *err) {
    eplb_model_view v;
    eplb_status st = eplb_registry_view(r, model_id, &v, err);
    if (st == EPLB_OK)
        *out = v.snap->shape;
    eplb_model_view_release(&v);
    return st;
}

size_t eplb_registry_count(eplb_registry *r) {
    pthread_rwlock_rdlock(&r->lock);
    size_t n = 0;
    for (size_t i = 0; i < r->count; i++)
        n += r->models[i]->visible;
    pthread_rwlock_unlock(&r->lock);
    return n;
}

/* References to every visible entry, for walks that take op_locks (which
 * must not happen under r->lock).  *n entries; free the array and unref. */
static registry_entry **visible_entries(eplb_registry *r, size_t *n) {
    pthread_rwlock_rdlock(&r->lock);
    registry_entry **all = eplb_calloc(r->count ? r->count : 1, sizeof *all);
    *n = 0;
    for (size_t i = 0; all && i < r->count; i++)
        if (r->models[i]->visible)
            all[(*n)++] = entry_ref(r->models[i]);
    pthread_rwlock_unlock(&r->lock);
    return all;
}

/* ---- weights ---------------------------------------------------------------- */

eplb_status eplb_registry_attach_weights(eplb_registry *r, const char *model_id,
                                         const eplb_weights_ops *ops, void *ctx,
                                         const eplb_model_shape *shape, eplb_error *err) {
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK) {
        ops->close(ctx);
        return st;
    }
    const eplb_model_shape *now = &registry_current(e)->shape;
    if (now->num_layers != shape->num_layers || now->num_physical != shape->num_physical ||
        now->ep_size != shape->ep_size) {
        registry_release(e);
        ops->close(ctx);
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "model %s changed to %u physical experts on %u ranks while the weights were being "
                              "attached: attach again", model_id, now->num_physical, now->ep_size);
    }
    if (e->weights)
        e->weights->close(e->weights_ctx);
    e->weights = ops;
    e->weights_ctx = ctx;
    registry_release(e);
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
    registry_release(e);
    return EPLB_OK;
}

/* ---- flush, open, close --------------------------------------------------- */

eplb_status eplb_registry_flush(eplb_registry *r, eplb_error *err) {
    if (!r->store)
        return EPLB_OK;
    size_t n;
    registry_entry **all = visible_entries(r, &n);
    if (!all)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory flushing load windows");
    eplb_status first = EPLB_OK;
    for (size_t i = 0; i < n; i++) {
        registry_entry *e = all[i];
        pthread_mutex_lock(&e->op_lock);
        if (e->listed && !e->damaged[0] && e->rec.window.dirty) {
            eplb_model_record rec = registry_record(e, &e->snap->placement, &e->snap->shape, e->rec.state,
                                                    e->rec.state_reason);
            eplb_status st = registry_save(r, &rec, first == EPLB_OK ? err : NULL);
            if (st == EPLB_OK)
                e->rec.window.dirty = false;
            else if (first == EPLB_OK)
                first = st;
        }
        pthread_mutex_unlock(&e->op_lock);
        entry_unref(e);
    }
    eplb_free(all);
    return first;
}

/* Room for one more model.  Caller holds r->lock for writing. */
static eplb_status reserve_slot(eplb_registry *r, eplb_error *err) {
    if (r->count < r->cap)
        return EPLB_OK;
    size_t cap = r->cap ? r->cap * 2 : 8;
    registry_entry **m = eplb_realloc(r->models, cap * sizeof *m);
    if (!m)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory adding a model");
    r->models = m;
    r->cap = cap;
    return EPLB_OK;
}

/* Caller holds r->lock for writing; e has a slot (reserve_slot). */
static void list_insert(eplb_registry *r, registry_entry *e) {
    r->models[r->count++] = e;
    e->listed = true;
    r->state_bytes += e->state_bytes;
}

/* Caller holds r->lock for writing and e's op_lock. */
static void list_remove(eplb_registry *r, registry_entry *e) {
    for (size_t i = 0; i < r->count; i++)
        if (r->models[i] == e) {
            r->models[i] = r->models[--r->count];
            break;
        }
    e->listed = false;
    r->state_bytes -= e->state_bytes;
}

/* The registry takes a stored model (single-threaded: open). */
static eplb_status load_one(void *arg, eplb_model_record *rec, eplb_error *err) {
    eplb_registry *r = arg;
    eplb_status st = EPLB_OK;
    registry_entry *e = NULL;
    if (find_listed(r, rec->model_id)) {
        st = eplb_error_set(err, EPLB_EDATALOSS, "store holds model %s twice", rec->model_id);
        goto fail;
    }
    if ((st = reserve_slot(r, err)) != EPLB_OK)
        goto fail;
    if (!(e = entry_new(rec->model_id))) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory loading model %s", rec->model_id);
        goto fail;
    }
    if (rec->damaged[0]) {
        snprintf(e->damaged, sizeof e->damaged, "%s", rec->damaged);
        eplb_placement_free(&rec->placement);
        eplb_load_window_free(&rec->window);
    } else {
        if (rec->state == EPLB_MOVE_MOVING) {
            /* eplbd died between the first slot write and the commit. */
            snprintf(rec->state_reason, sizeof rec->state_reason,
                     "eplbd stopped while moving weights from epoch %llu: the weights match no stored map",
                     (unsigned long long)rec->placement.epoch);
            rec->state = EPLB_MOVE_NEEDS_RELOAD;
        } else if (!eplb_move_state_persistent(rec->state)) {
            snprintf(e->damaged, sizeof e->damaged, "store: move state %d is never stored", (int)rec->state);
        }
        if ((st = eplb_snapshot_new(&rec->placement, &rec->shape, &e->snap, err)) != EPLB_OK)
            goto fail;
        e->state = rec->state;
        snprintf(e->state_reason, sizeof e->state_reason, "%s", rec->state_reason);
        e->state_bytes = eplb_model_state_bytes(&rec->shape);
        e->rec = *rec;
        memset(&e->rec.placement, 0, sizeof e->rec.placement);
        memset(&rec->window, 0, sizeof rec->window);
    }
    e->visible = true;
    list_insert(r, e);
    return EPLB_OK;
fail:
    eplb_placement_free(&rec->placement);
    eplb_load_window_free(&rec->window);
    entry_unref(e);
    return st;
}

eplb_status eplb_registry_open(const eplb_store_ops *store_ops, void *store_ctx,
                               const eplb_limits *limits, eplb_registry **out, eplb_error *err) {
    *out = NULL;
    eplb_registry *r = eplb_calloc(1, sizeof *r);
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
        entry_unref(r->models[i]);
    eplb_free(r->models);
    pthread_rwlock_destroy(&r->lock);
    eplb_free(r);
}

/* ---- RegisterModel ---------------------------------------------------------- */

/* A speculator shares its main model's EP configuration (vLLM keeps one
 * EPLB state for both): name the first field that differs. */
static eplb_status check_speculator(const char *main_id, const eplb_model_shape *m, const eplb_model_shape *s,
                                    const char *field, eplb_error *err) {
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
                                  field, f[i].name, f[i].mine, main_id, f[i].theirs);
    if (s->ep_size != m->ep_size)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "speculator parallel.ep_size %u differs from main model %s (%u)",
                              s->ep_size, main_id, m->ep_size);
    return EPLB_OK;
}

/* Name the first difference between an existing registration and a new one
 * under the same name, or return NULL when they are the same. */
static const char *registration_difference(const eplb_model_record *old, const eplb_model_shape *a,
                                           const eplb_model_record *new, char *buf, size_t len) {
    const eplb_model_shape *b = &new->shape;
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


/* What a reader of e sees now, into out->view.  Caller holds op_lock. */
static void view_of(registry_entry *e, eplb_register_result *out) {
    pthread_mutex_lock(&e->pub_lock);
    out->view.snap = eplb_snapshot_ref(e->snap);
    out->view.state = e->state;
    snprintf(out->view.state_reason, sizeof out->view.state_reason, "%s", e->state_reason);
    pthread_mutex_unlock(&e->pub_lock);
}

/* A speculator names a registered main model whose EP configuration it
 * shares.  Reads the main model's published shape: never waits for it. */
static eplb_status check_main_model(eplb_registry *r, const eplb_model_record *rec, eplb_error *err) {
    eplb_status st = EPLB_OK;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *main = find_listed(r, rec->main_model_id);
    if (!main || !main->visible) {
        st = eplb_error_set(err, EPLB_ENOTFOUND, "main model %s is not registered", rec->main_model_id);
    } else if (main->damaged[0]) {
        st = damaged(main, err);
    } else if (main->rec.role != EPLB_ROLE_MAIN) { /* role never changes once visible */
        st = eplb_error_set(err, EPLB_EPRECONDITION, "main_model_id %s is itself a speculator", rec->main_model_id);
    } else {
        pthread_mutex_lock(&main->pub_lock);
        eplb_model_shape shape = main->snap->shape;
        pthread_mutex_unlock(&main->pub_lock);
        st = check_speculator(main->model_id, &shape, &rec->shape, "model", err);
    }
    pthread_rwlock_unlock(&r->lock);
    return st;
}

/* The name is taken: same registration -> idempotent (and a reload clears
 * NEEDS_RELOAD), anything else -> EPLB_EEXIST.  Caller holds e's op_lock. */
static eplb_status register_existing(eplb_registry *r, registry_entry *e, const eplb_model_record *rec,
                                     eplb_register_result *out, eplb_error *err) {
    char why[EPLB_ERROR_MSG_MAX - 128];
    if (e->damaged[0])
        return damaged(e, err);
    const eplb_snapshot *cur = registry_current(e);
    const char *diff = registration_difference(&e->rec, &cur->shape, rec, why, sizeof why);
    if (diff)
        return eplb_error_set(err, EPLB_EEXIST, "model %s is already registered differently: %s", rec->model_id,
                              diff);
    if (e->rec.state == EPLB_MOVE_NEEDS_RELOAD) {
        /* Registering again is how an engine says it reloaded its weights
         * (for the placement it is told here): NEEDS_RELOAD -> IDLE. */
        eplb_model_record cleared = registry_record(e, &cur->placement, &cur->shape, EPLB_MOVE_IDLE, "");
        eplb_status st = registry_save(r, &cleared, err);
        if (st != EPLB_OK)
            return st;
        if (r->store)
            e->rec.window.dirty = false;
        registry_publish_state(e, EPLB_MOVE_IDLE, "");
    }
    out->registered = true;
    view_of(e, out);
    snprintf(out->reason, sizeof out->reason, "already registered; placement kept at epoch %llu",
             (unsigned long long)cur->placement.epoch);
    return EPLB_OK;
}

/* A new name: the entry is listed (invisible) under r->lock with its
 * op_lock held, stored outside r->lock, then made visible -- or unlisted
 * if the store refused it. */
static eplb_status register_new(eplb_registry *r, registry_entry *e, eplb_model_record *rec,
                                eplb_register_result *out, eplb_error *err) {
    eplb_placement p;
    eplb_status st = eplb_placement_init(&p, rec->shape.num_layers, rec->shape.num_logical,
                                         rec->shape.num_physical, err);
    if (st == EPLB_OK)
        st = eplb_snapshot_new(&p, &rec->shape, &e->snap, err);
    if (st != EPLB_OK)
        return st;
    e->rec = *rec;
    memset(&e->rec.placement, 0, sizeof e->rec.placement);
    eplb_load_window_init(&e->rec.window, rec->shape.num_layers, rec->shape.num_logical, rec->shape.window_size);
    eplb_model_record stored = registry_record(e, &e->snap->placement, &rec->shape, EPLB_MOVE_IDLE, "");
    if ((st = registry_save(r, &stored, err)) != EPLB_OK)
        return st;
    pthread_rwlock_wrlock(&r->lock);
    e->visible = true;
    pthread_rwlock_unlock(&r->lock);
    out->registered = true;
    view_of(e, out);
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
    if (rec.role == EPLB_ROLE_SPECULATOR && (st = check_main_model(r, &rec, err)) != EPLB_OK)
        return st;

    for (;;) {
        /* The new entry is made and locked before r->lock: the order is
         * op_lock then r->lock everywhere (eplb_registry_internal.h). */
        registry_entry *fresh = entry_new(rec.model_id);
        if (!fresh)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory adding model %s", rec.model_id);
        pthread_mutex_lock(&fresh->op_lock);
        pthread_rwlock_wrlock(&r->lock);
        registry_entry *e = find_listed(r, rec.model_id);
        if (e) {
            /* Wait for whoever holds the model (e.g. its own first save)
             * without holding r->lock. */
            entry_ref(e);
            pthread_rwlock_unlock(&r->lock);
            registry_release(fresh);
            pthread_mutex_lock(&e->op_lock);
            if (!e->listed) { /* its registration failed meanwhile: start over */
                registry_release(e);
                continue;
            }
            st = register_existing(r, e, &rec, out, err);
            registry_release(e);
            return st;
        }
        e = fresh;
        size_t models = r->count;
        uint64_t bytes = eplb_model_state_bytes(&rec.shape);
        if (models >= r->limits.max_models)
            st = eplb_error_set(err, EPLB_ENOSPACE,
                                "the server holds its maximum of %u models (--max-models); model %s is not registered",
                                r->limits.max_models, rec.model_id);
        else if (r->state_bytes + bytes > r->limits.max_state_bytes)
            st = eplb_error_set(err, EPLB_ENOSPACE,
                                "model %s would take %llu MiB of placement and window state; %llu MiB of the "
                                "server's %llu MiB are left (--max-state-mib)",
                                rec.model_id, (unsigned long long)((bytes + (1 << 20) - 1) >> 20),
                                (unsigned long long)((r->limits.max_state_bytes - r->state_bytes) >> 20),
                                (unsigned long long)(r->limits.max_state_bytes >> 20));
        else
            st = reserve_slot(r, err);
        if (st != EPLB_OK) {
            pthread_rwlock_unlock(&r->lock);
            registry_release(e);
            return st;
        }
        e->state_bytes = bytes;
        list_insert(r, e); /* the list's reference is the one entry_new gave */
        entry_ref(e);      /* ours */
        pthread_rwlock_unlock(&r->lock);

        st = register_new(r, e, &rec, out, err);
        if (st != EPLB_OK) {
            pthread_rwlock_wrlock(&r->lock);
            list_remove(r, e);
            pthread_rwlock_unlock(&r->lock);
            entry_unref(e); /* the list's */
        }
        registry_release(e);
        return st;
    }
}
