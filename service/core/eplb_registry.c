/* eplb_registry.c -- registered models: entries, their lifetime and locks,
 * lookups, commits, readers, open/close (RegisterModel: eplb_register.c).
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
#include "eplb_pending.h"
#include "eplb_registry_internal.h"

/* ---- entries ------------------------------------------------------------- */

registry_entry *registry_entry_new(const char *model_id) {
    registry_entry *e = eplb_calloc(1, sizeof *e);
    if (!e)
        return NULL;
    atomic_init(&e->refs, 1);
    atomic_init(&e->weights_attached, false);
    pthread_mutex_init(&e->op_lock, NULL);
    pthread_mutex_init(&e->pub_lock, NULL);
    snprintf(e->model_id, sizeof e->model_id, "%s", model_id);
    return e;
}

registry_entry *registry_entry_ref(registry_entry *e) {
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
    return e;
}

void registry_entry_unref(registry_entry *e) {
    if (!e || atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (e->weights)
        e->weights->close(e->weights_ctx);
    eplb_snapshot_unref(e->snap);
    eplb_placement_free(&e->rec.placement);
    eplb_pending_clear(&e->rec.pending);
    eplb_transfer_plan_free(&e->xfer);
    eplb_load_window_free(&e->rec.window);
    pthread_mutex_destroy(&e->op_lock);
    pthread_mutex_destroy(&e->pub_lock);
    eplb_free(e);
}

/* Caller holds r->lock (either mode). */
registry_entry *registry_find(eplb_registry *r, const char *model_id) {
    for (size_t i = 0; i < r->count; i++)
        if (strcmp(r->models[i]->model_id, model_id) == 0)
            return r->models[i];
    return NULL;
}

eplb_status registry_not_found(const char *model_id, eplb_error *err) {
    return eplb_error_set(err, EPLB_ENOTFOUND, "model %s is not registered", model_id);
}

eplb_status registry_damaged(const registry_entry *e, eplb_error *err) {
    return eplb_error_set(err, EPLB_EDATALOSS, "model %s cannot be served: %s", e->model_id, e->damaged);
}

eplb_status registry_acquire(eplb_registry *r, const char *model_id, registry_entry **out,
                             eplb_error *err) {
    *out = NULL;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = registry_find(r, model_id);
    if (!e || !e->visible) {
        pthread_rwlock_unlock(&r->lock);
        return registry_not_found(model_id, err);
    }
    registry_entry_ref(e);
    pthread_rwlock_unlock(&r->lock);
    pthread_mutex_lock(&e->op_lock);
    /* listed is written under r->lock *and* op_lock, so op_lock suffices
     * to read it: removed while we waited -> as if never found. */
    if (!e->listed || e->damaged[0]) {
        eplb_status st = e->listed ? registry_damaged(e, err) : registry_not_found(model_id, err);
        registry_release(e);
        return st;
    }
    *out = e;
    return EPLB_OK;
}

void registry_release(registry_entry *e) {
    pthread_mutex_unlock(&e->op_lock);
    registry_entry_unref(e);
}

eplb_model_record registry_record(const registry_entry *e, const eplb_placement *p,
                                  const eplb_model_shape *s, eplb_move_state st, const char *reason) {
    eplb_model_record rec = e->rec; /* shallow: the window is shared, not copied */
    rec.placement = *p;
    rec.shape = *s;
    /* The pending rebalance as this placement leaves it: none once every
     * row holds its target, else how far the rows say it got.  So every
     * save is consistent, whichever path commits (a step that moved fewer
     * layers than planned included).  O(L * P), per save only. */
    if (rec.pending.id[0] && rec.pending.target.phy2log && rec.pending.target.num_layers == p->num_layers &&
        rec.pending.target.num_physical == p->num_physical) {
        uint32_t done = eplb_pending_layers_done(p, &rec.pending.target);
        if (done == p->num_layers)
            memset(&rec.pending, 0, sizeof rec.pending);
        else
            rec.pending.layers_done = done;
    }
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

void registry_stats_rebalance(registry_entry *e, bool committed, const eplb_rebalance_result *res,
                              uint64_t bytes) {
    pthread_mutex_lock(&e->pub_lock);
    eplb_model_stats *s = &e->stats;
    s->bytes_moved_total += bytes;
    if (committed) {
        s->rebalances++;
        s->has_last = true;
        s->last_balancedness_before = res->balancedness_before;
        s->last_balancedness_after = res->balancedness_after;
        s->last_experts_moved = res->experts_moved;
        s->last_bytes_moved = bytes;
        s->last_move_ms = res->move_ms;
        s->last_compute_ms = res->compute_ms;
    } else {
        s->rebalance_failures++;
    }
    pthread_mutex_unlock(&e->pub_lock);
}

void registry_stats_pass(registry_entry *e) {
    pthread_mutex_lock(&e->pub_lock);
    e->stats.passes_recorded++;
    pthread_mutex_unlock(&e->pub_lock);
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

void registry_view_of(registry_entry *e, eplb_model_view *out) {
    pthread_mutex_lock(&e->pub_lock);
    out->snap = eplb_snapshot_ref(e->snap);
    out->state = e->state;
    snprintf(out->state_reason, sizeof out->state_reason, "%s", e->state_reason);
    snprintf(out->pending_id, sizeof out->pending_id, "%s", e->pending_id);
    out->pending_layers_done = e->pending_done;
    out->pending_execution = e->pending_id[0] ? e->pending_exec : 0;
    pthread_mutex_unlock(&e->pub_lock);
}

void registry_publish_pending(registry_entry *e) {
    pthread_mutex_lock(&e->pub_lock);
    snprintf(e->pending_id, sizeof e->pending_id, "%s", e->rec.pending.id);
    e->pending_done = e->rec.pending.id[0] ? e->rec.pending.layers_done : 0;
    e->pending_exec = e->rec.pending.id[0] ? e->rec.pending.execution : 0;
    pthread_mutex_unlock(&e->pub_lock);
}

eplb_status eplb_registry_view(eplb_registry *r, const char *model_id, eplb_model_view *out,
                               eplb_error *err) {
    memset(out, 0, sizeof *out);
    eplb_status st = EPLB_OK;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = registry_find(r, model_id);
    if (!e || !e->visible) {
        st = registry_not_found(model_id, err);
    } else if (e->damaged[0]) {
        st = registry_damaged(e, err);
    } else {
        registry_view_of(e, out);
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
            all[(*n)++] = registry_entry_ref(r->models[i]);
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
    atomic_store(&e->weights_attached, true);
    registry_release(e);
    return EPLB_OK;
}

void registry_close_weights(registry_entry *e) {
    if (e->weights)
        e->weights->close(e->weights_ctx);
    e->weights = NULL;
    e->weights_ctx = NULL;
    atomic_store(&e->weights_attached, false);
}

eplb_status eplb_registry_detach_weights(eplb_registry *r, const char *model_id, bool *detached,
                                         eplb_error *err) {
    registry_entry *e;
    eplb_status st = registry_acquire(r, model_id, &e, err);
    if (st != EPLB_OK)
        return st;
    *detached = e->weights != NULL;
    registry_close_weights(e);
    registry_release(e);
    return EPLB_OK;
}

/* ---- ListModels, DeleteModel ---------------------------------------------- */

static int summary_cmp(const void *a, const void *b) {
    return strcmp(((const eplb_model_summary *)a)->model_id, ((const eplb_model_summary *)b)->model_id);
}

eplb_status eplb_registry_list(eplb_registry *r, eplb_model_summary **out, size_t *n, eplb_error *err) {
    *out = NULL;
    *n = 0;
    pthread_rwlock_rdlock(&r->lock);
    eplb_model_summary *all = eplb_calloc(r->count ? r->count : 1, sizeof *all);
    if (!all) {
        pthread_rwlock_unlock(&r->lock);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory listing %zu models", r->count);
    }
    size_t k = 0;
    for (size_t i = 0; i < r->count; i++) {
        registry_entry *e = r->models[i];
        if (!e->visible)
            continue;
        eplb_model_summary *m = &all[k++];
        snprintf(m->model_id, sizeof m->model_id, "%s", e->model_id);
        if (e->damaged[0]) { /* immutable once loaded */
            snprintf(m->damaged, sizeof m->damaged, "%s", e->damaged);
            continue;
        }
        /* Identity never changes once visible (written before visible). */
        m->role = e->rec.role;
        snprintf(m->main_model_id, sizeof m->main_model_id, "%s", e->rec.main_model_id);
        snprintf(m->architecture, sizeof m->architecture, "%s", e->rec.architecture);
        snprintf(m->resolved_path, sizeof m->resolved_path, "%s", e->rec.resolved_path);
        pthread_mutex_lock(&e->pub_lock);
        m->epoch = e->snap->placement.epoch;
        m->shape = e->snap->shape;
        m->state = e->state;
        snprintf(m->state_reason, sizeof m->state_reason, "%s", e->state_reason);
        m->stats = e->stats;
        pthread_mutex_unlock(&e->pub_lock);
        m->weights_attached = atomic_load(&e->weights_attached);
    }
    pthread_rwlock_unlock(&r->lock);
    qsort(all, k, sizeof *all, summary_cmp);
    *out = all;
    *n = k;
    return EPLB_OK;
}

/* Speculators naming e as their main model, as "a, b" into buf; 0 if none.
 * Caller holds r->lock. */
static size_t speculators_of(eplb_registry *r, const registry_entry *e, char *buf, size_t len) {
    size_t n = 0, used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < r->count; i++) {
        const registry_entry *s = r->models[i];
        if (s == e || !s->visible || s->damaged[0] || s->rec.role != EPLB_ROLE_SPECULATOR ||
            strcmp(s->rec.main_model_id, e->model_id) != 0)
            continue;
        int w = snprintf(buf + used, len - used, "%s%s", n ? ", " : "", s->model_id);
        if (w > 0 && (size_t)w < len - used)
            used += (size_t)w;
        n++;
    }
    return n;
}

eplb_status eplb_registry_delete(eplb_registry *r, const char *model_id, bool force, eplb_error *err) {
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *e = registry_find(r, model_id);
    if (!e || !e->visible) {
        pthread_rwlock_unlock(&r->lock);
        return registry_not_found(model_id, err);
    }
    registry_entry_ref(e);
    char specs[EPLB_ERROR_MSG_MAX / 2];
    size_t num_specs = speculators_of(r, e, specs, sizeof specs);
    pthread_rwlock_unlock(&r->lock);

    eplb_status st = EPLB_OK;
    if (num_specs && !force) {
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "model %s is the main model of speculator(s) %s: delete them first, or set force",
                            model_id, specs);
        registry_entry_unref(e);
        return st;
    }
    if (force) {
        pthread_mutex_lock(&e->op_lock); /* waits for the operation in progress */
    } else if (pthread_mutex_trylock(&e->op_lock) != 0) {
        registry_entry_unref(e);
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "an operation on model %s is in progress (e.g. a rebalance): try again, or set force",
                              model_id);
    }
    if (!e->listed) { /* deleted meanwhile */
        st = registry_not_found(model_id, err);
    } else if (e->weights && !force) {
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "model %s has weights attached: detach them first (DetachWeights), or set force",
                            model_id);
    } else if (r->store && (st = r->store->remove(r->store_ctx, model_id, err)) != EPLB_OK) {
        /* nothing changed */
    } else {
        registry_close_weights(e);
        pthread_rwlock_wrlock(&r->lock);
        registry_list_remove(r, e);
        pthread_rwlock_unlock(&r->lock);
        registry_entry_unref(e); /* the list's reference */
    }
    registry_release(e);
    return st;
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
        registry_entry_unref(e);
    }
    eplb_free(all);
    return first;
}

/* Room for one more model.  Caller holds r->lock for writing. */
eplb_status registry_reserve_slot(eplb_registry *r, eplb_error *err) {
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
void registry_list_insert(eplb_registry *r, registry_entry *e) {
    r->models[r->count++] = e;
    e->listed = true;
    r->state_bytes += e->state_bytes;
}

/* Caller holds r->lock for writing and e's op_lock. */
void registry_list_remove(eplb_registry *r, registry_entry *e) {
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
    if (registry_find(r, rec->model_id)) {
        st = eplb_error_set(err, EPLB_EDATALOSS, "store holds model %s twice", rec->model_id);
        goto fail;
    }
    if ((st = registry_reserve_slot(r, err)) != EPLB_OK)
        goto fail;
    if (!(e = registry_entry_new(rec->model_id))) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory loading model %s", rec->model_id);
        goto fail;
    }
    if (rec->damaged[0]) {
        snprintf(e->damaged, sizeof e->damaged, "%s", rec->damaged);
        eplb_placement_free(&rec->placement);
        eplb_pending_clear(&rec->pending);
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
        /* A model that must be reloaded has no rebalance to continue. */
        if (rec->state == EPLB_MOVE_NEEDS_RELOAD)
            eplb_pending_clear(&rec->pending);
        if ((st = eplb_snapshot_new(&rec->placement, &rec->shape, &e->snap, err)) != EPLB_OK)
            goto fail;
        e->state = rec->state;
        snprintf(e->state_reason, sizeof e->state_reason, "%s", rec->state_reason);
        e->state_bytes = eplb_model_state_bytes(&rec->shape);
        e->rec = *rec;
        memset(&e->rec.placement, 0, sizeof e->rec.placement);
        memset(&rec->window, 0, sizeof rec->window);
        memset(&rec->pending, 0, sizeof rec->pending);
        eplb_pending_rebalance *pd = &e->rec.pending;
        if (pd->id[0]) {
            /* The served rows say how far it got (the stored count is only
             * what the step planned). */
            const eplb_placement *cur = &e->snap->placement;
            if (pd->target.num_layers != cur->num_layers || pd->target.num_physical != cur->num_physical ||
                !pd->target.phy2log)
                snprintf(e->damaged, sizeof e->damaged,
                         "store: the pending rebalance %s has a %ux%u target, the model is %ux%u", pd->id,
                         pd->target.num_layers, pd->target.num_physical, cur->num_layers, cur->num_physical);
            else if ((pd->layers_done = eplb_pending_layers_done(cur, &pd->target)) == cur->num_layers)
                eplb_pending_clear(pd);
        }
        snprintf(e->pending_id, sizeof e->pending_id, "%s", pd->id);
        e->pending_done = pd->id[0] ? pd->layers_done : 0;
        e->pending_exec = pd->id[0] ? pd->execution : 0;
    }
    e->visible = true;
    registry_list_insert(r, e);
    return EPLB_OK;
fail:
    eplb_placement_free(&rec->placement);
    eplb_pending_clear(&rec->pending);
    eplb_load_window_free(&rec->window);
    registry_entry_unref(e);
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
        registry_entry_unref(r->models[i]);
    eplb_free(r->models);
    pthread_rwlock_destroy(&r->lock);
    eplb_free(r);
}

