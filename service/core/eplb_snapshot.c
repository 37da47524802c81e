/* eplb_snapshot.c -- reference-counted, immutable epochs (eplb_snapshot.h). */
#include "eplb_snapshot.h"

#include <stdlib.h>
#include <string.h>

#include "eplb_alloc.h"

eplb_status eplb_snapshot_new(eplb_placement *placement, const eplb_model_shape *shape,
                              eplb_snapshot **out, eplb_error *err) {
    eplb_snapshot *s = eplb_calloc(1, sizeof *s);
    if (!s) {
        eplb_placement_free(placement);
        *out = NULL;
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory for a placement snapshot");
    }
    atomic_init(&s->refs, 1);
    s->placement = *placement;
    s->shape = *shape;
    memset(placement, 0, sizeof *placement);
    *out = s;
    return EPLB_OK;
}

eplb_snapshot *eplb_snapshot_ref(eplb_snapshot *s) {
    if (s)
        atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
}

void eplb_snapshot_unref(eplb_snapshot *s) {
    if (!s)
        return;
    /* acq_rel: the last holder must see every write made before the others
     * let go (the usual refcount rule). */
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1) {
        eplb_placement_free(&s->placement);
        eplb_free(s);
    }
}

void eplb_model_view_release(eplb_model_view *view) {
    eplb_snapshot_unref(view->snap);
    memset(view, 0, sizeof *view);
}
