/* eplb_register.c -- RegisterModel's rules: unwrapping and validation
 * (no lock), the speculator check against its main model's published shape,
 * idempotent re-registration (which also clears NEEDS_RELOAD), and a new
 * model stored outside the registry lock (eplb_registry_internal.h). */
#include <stdio.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_registry_internal.h"

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
    /* The automatic rebalances' knobs are part of the registration too: a
     * second registration that asks for others is told, not ignored. */
    const eplb_rebalance_knobs *ka = &a->defaults, *kb = &b->defaults;
    struct { const char *name; uint64_t was, now; } ki[] = {
        { "parallel.default_policy", ka->policy, kb->policy },
        { "parallel.max_bytes_moved", ka->max_bytes_moved, kb->max_bytes_moved },
        { "parallel.max_slots_moved", ka->max_slots_moved, kb->max_slots_moved },
        { "parallel.expert_bytes", ka->expert_bytes, kb->expert_bytes },
    };
    for (size_t i = 0; i < sizeof ki / sizeof ki[0]; i++)
        if (ki[i].was != ki[i].now) {
            snprintf(buf, len, "%s %llu (registered) != %llu", ki[i].name, (unsigned long long)ki[i].was,
                     (unsigned long long)ki[i].now);
            return buf;
        }
    struct { const char *name; double was, now; } kd[] = {
        { "parallel.target_balancedness", ka->target_balancedness, kb->target_balancedness },
        { "parallel.min_improvement", ka->min_improvement, kb->min_improvement },
        { "parallel.link_costs.intra_node", ka->cost_intra_node, kb->cost_intra_node },
        { "parallel.link_costs.cross_node", ka->cost_cross_node, kb->cost_cross_node },
    };
    for (size_t i = 0; i < sizeof kd / sizeof kd[0]; i++)
        if (kd[i].was != kd[i].now) {
            snprintf(buf, len, "%s %g (registered) != %g", kd[i].name, kd[i].was, kd[i].now);
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


/* A speculator names a registered main model whose EP configuration it
 * shares.  Reads the main model's published shape: never waits for it. */
static eplb_status check_main_model(eplb_registry *r, const eplb_model_record *rec, eplb_error *err) {
    eplb_status st = EPLB_OK;
    pthread_rwlock_rdlock(&r->lock);
    registry_entry *main = registry_find(r, rec->main_model_id);
    if (!main || !main->visible) {
        st = eplb_error_set(err, EPLB_ENOTFOUND, "main model %s is not registered", rec->main_model_id);
    } else if (main->damaged[0]) {
        st = registry_damaged(main, err);
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
        return registry_damaged(e, err);
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
    registry_view_of(e, &out->view);
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
    registry_view_of(e, &out->view);
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
        registry_entry *fresh = registry_entry_new(rec.model_id);
        if (!fresh)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory adding model %s", rec.model_id);
        pthread_mutex_lock(&fresh->op_lock);
        pthread_rwlock_wrlock(&r->lock);
        registry_entry *e = registry_find(r, rec.model_id);
        if (e) {
            /* Wait for whoever holds the model (e.g. its own first save)
             * without holding r->lock. */
            registry_entry_ref(e);
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
            st = registry_reserve_slot(r, err);
        if (st != EPLB_OK) {
            pthread_rwlock_unlock(&r->lock);
            registry_release(e);
            return st;
        }
        e->state_bytes = bytes;
        registry_list_insert(r, e); /* the list's reference is the one entry_new gave */
        registry_entry_ref(e);      /* ours */
        pthread_rwlock_unlock(&r->lock);

        st = register_new(r, e, &rec, out, err);
        if (st != EPLB_OK) {
            pthread_rwlock_wrlock(&r->lock);
            registry_list_remove(r, e);
            pthread_rwlock_unlock(&r->lock);
            registry_entry_unref(e); /* the list's */
        }
        registry_release(e);
        return st;
    }
}
