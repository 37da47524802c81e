/* eplb_pending.c -- steps of a rebalance committed in steps (eplb_pending.h). */
#include "eplb_pending.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "eplb_alloc.h"

void eplb_pending_new_id(char id[EPLB_REBALANCE_ID_MAX + 1]) {
    static atomic_uint_fast64_t counter;
    uint64_t v = 0;
    if (getentropy(&v, sizeof v) != 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        v = ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)ts.tv_nsec ^ (atomic_fetch_add(&counter, 1) << 48);
    }
    snprintf(id, EPLB_REBALANCE_ID_MAX + 1, "%016llx", (unsigned long long)v);
}

void eplb_pending_clear(eplb_pending_rebalance *p) {
    if (!p)
        return;
    eplb_placement_free(&p->target);
    memset(p, 0, sizeof *p);
}

static int row_differs(const eplb_placement *a, const eplb_placement *b, uint32_t l) {
    size_t P = a->num_physical;
    return memcmp(a->phy2log + (size_t)l * P, b->phy2log + (size_t)l * P, P * sizeof *a->phy2log) != 0;
}

uint32_t eplb_pending_layers_done(const eplb_placement *cur, const eplb_placement *target) {
    uint32_t done = 0;
    for (uint32_t l = 0; l < cur->num_layers; l++)
        done += !row_differs(cur, target, l);
    return done;
}

eplb_status eplb_pending_step(const eplb_placement *cur, const eplb_placement *target, uint32_t k,
                              eplb_placement *out, uint32_t **layers, uint32_t *n, eplb_error *err) {
    const uint32_t L = cur->num_layers, P = cur->num_physical;
    *layers = NULL;
    *n = 0;
    memset(out, 0, sizeof *out);
    int32_t *map = eplb_malloc((size_t)L * P * sizeof *map);
    uint32_t *taken = eplb_malloc((k < L ? k : L) * sizeof *taken + 1);
    if (!map || !taken) {
        eplb_free(map);
        eplb_free(taken);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory for a rebalance step");
    }
    memcpy(map, cur->phy2log, (size_t)L * P * sizeof *map);
    uint32_t m = 0;
    bool all_target = true;
    for (uint32_t l = 0; l < L; l++) {
        if (!row_differs(cur, target, l))
            continue;
        if (m < k) {
            memcpy(map + (size_t)l * P, target->phy2log + (size_t)l * P, (size_t)P * sizeof *map);
            taken[m++] = l;
        } else {
            all_target = false;
        }
    }
    *out = (eplb_placement){ .num_layers = L, .num_logical = cur->num_logical, .epoch = cur->epoch };
    /* Layers still on the old map keep its valid-slot count (after a
     * scale-up the new slots count once every layer fills them). */
    eplb_status st = eplb_placement_assign(out, P, all_target ? target->num_valid_physical : cur->num_valid_physical,
                                           map, err);
    eplb_free(map);
    if (st != EPLB_OK) {
        eplb_free(taken);
        return st;
    }
    *layers = taken;
    *n = m;
    return EPLB_OK;
}
