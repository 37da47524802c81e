/* fake_store.h -- an in-memory eplb_store_ops for the registry tests: counts
 * saves (and window saves), fails a chosen save, can block inside a save
 * (to prove who waits for it), and replays records at open. */
#ifndef FAKE_STORE_H
#define FAKE_STORE_H

#include <pthread.h>
#include <string.h>

#include "eplb_registry.h"

typedef struct fake_store {
    int saves;
    int window_saves;
    int removes;
    int fail_next;           /* fail the next save */
    int fail_after;          /* > 0: let this many saves pass, then fail one */
    eplb_model_record last;  /* the last record saved, without its arrays */
    eplb_move_state states[16]; /* state of each save, in order */
    /* Blocking: a save of model `block_model` waits until `release` is set. */
    const char *block_model;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int blocked, release;
    /* load_all hands these out (the registry takes their arrays). */
    eplb_model_record *replay;
    int num_replay;
} fake_store;

static eplb_status fake_save(void *ctx, const eplb_model_record *rec, eplb_error *err) {
    fake_store *s = ctx;
    if (s->block_model && strcmp(s->block_model, rec->model_id) == 0) {
        pthread_mutex_lock(&s->lock);
        s->blocked = 1;
        pthread_cond_broadcast(&s->cond);
        while (!s->release)
            pthread_cond_wait(&s->cond, &s->lock);
        pthread_mutex_unlock(&s->lock);
    }
    if (s->fail_after > 0) {
        if (--s->fail_after == 0)
            s->fail_next = 1; /* this save passes, the next one fails */
    } else if (s->fail_next) {
        s->fail_next = 0;
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: injected failure");
    }
    if (s->saves < 16)
        s->states[s->saves] = rec->state;
    s->saves++;
    s->window_saves += rec->window.dirty;
    s->last = *rec;
    memset(&s->last.placement, 0, sizeof s->last.placement);
    memset(&s->last.window, 0, sizeof s->last.window);
    memset(&s->last.pending.target, 0, sizeof s->last.pending.target);
    return EPLB_OK;
}

static eplb_status fake_load(void *ctx, eplb_status (*each)(void *, eplb_model_record *, eplb_error *),
                             void *arg, eplb_error *err) {
    fake_store *s = ctx;
    for (int i = 0; i < s->num_replay; i++) {
        eplb_status st = each(arg, &s->replay[i], err);
        if (st != EPLB_OK)
            return st;
    }
    return EPLB_OK;
}

static eplb_status fake_remove(void *ctx, const char *model_id, eplb_error *err) {
    fake_store *s = ctx;
    (void)model_id;
    if (s->fail_next) {
        s->fail_next = 0;
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: injected failure");
    }
    s->removes++;
    return EPLB_OK;
}

static const eplb_store_ops fake_ops = { .save = fake_save, .load_all = fake_load, .remove = fake_remove };

static inline void fake_store_init(fake_store *s) {
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
}

/* Wait until a save is blocked; then let it go with fake_store_release. */
static inline void fake_store_wait_blocked(fake_store *s) {
    pthread_mutex_lock(&s->lock);
    while (!s->blocked)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

static inline void fake_store_release(fake_store *s) {
    pthread_mutex_lock(&s->lock);
    s->release = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* A copy of a model's published placement (and its move state), as the
 * old copying reader gave it: what the tests compare against. */
static inline eplb_status get_placement(eplb_registry *r, const char *id, eplb_placement *out,
                                        eplb_move_state *state, eplb_error *err) {
    eplb_model_view v;
    memset(out, 0, sizeof *out);
    eplb_status st = eplb_registry_view(r, id, &v, err);
    if (st != EPLB_OK)
        return st;
    if (state)
        *state = v.state;
    st = eplb_placement_copy(out, &v.snap->placement, err);
    eplb_model_view_release(&v);
    return st;
}

#endif
