/* fake_store.h -- an in-memory eplb_store_ops for the registry tests: counts
 * saves (and window saves), fails the next save on request, loads nothing. */
#ifndef FAKE_STORE_H
#define FAKE_STORE_H

#include <string.h>

#include "eplb_registry.h"

typedef struct fake_store {
    int saves;
    int window_saves;
    int fail_next;
    eplb_model_record last; /* the last record saved, without its arrays */
} fake_store;

static eplb_status fake_save(void *ctx, const eplb_model_record *rec, eplb_error *err) {
    fake_store *s = ctx;
    if (s->fail_next) {
        s->fail_next = 0;
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: injected failure");
    }
    s->saves++;
    s->window_saves += rec->window.dirty;
    s->last = *rec;
    memset(&s->last.placement, 0, sizeof s->last.placement);
    memset(&s->last.window, 0, sizeof s->last.window);
    return EPLB_OK;
}

static eplb_status fake_load(void *ctx, eplb_status (*each)(void *, eplb_model_record *, eplb_error *),
                             void *arg, eplb_error *err) {
    (void)ctx, (void)each, (void)arg, (void)err;
    return EPLB_OK;
}

static const eplb_store_ops fake_ops = { .save = fake_save, .load_all = fake_load };

#endif
