/* eplb_health.c -- the registry's health counts (eplb_health.h). */
#include "eplb_health.h"

#include <string.h>

#include "eplb_registry_internal.h"

void eplb_registry_health(eplb_registry *r, eplb_health *out) {
    memset(out, 0, sizeof *out);
    pthread_rwlock_rdlock(&r->lock);
    for (size_t i = 0; i < r->count; i++) {
        registry_entry *e = r->models[i];
        if (!e->visible)
            continue;
        out->models++;
        if (e->damaged[0]) { /* immutable once loaded */
            out->damaged++;
            continue;
        }
        pthread_mutex_lock(&e->pub_lock);
        bool reload = e->state == EPLB_MOVE_NEEDS_RELOAD;
        pthread_mutex_unlock(&e->pub_lock);
        out->needs_reload += reload;
    }
    pthread_rwlock_unlock(&r->lock);
}
