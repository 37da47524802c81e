/* eplb_load.c -- logical load and the sliding load window. */
#include "eplb_alloc.h"
#include "eplb_load.h"

#include <stdlib.h>
#include <string.h>

eplb_status eplb_load_to_logical(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                                 uint32_t num_valid, const int32_t *phy2log,
                                 const int64_t *physical_load, int64_t *logical_load,
                                 eplb_error *err) {
    memset(logical_load, 0, (size_t)num_layers * num_logical * sizeof *logical_load);
    for (uint32_t l = 0; l < num_layers; l++) {
        const int32_t *map = phy2log + (size_t)l * num_physical;
        const int64_t *in = physical_load + (size_t)l * num_physical;
        int64_t *out = logical_load + (size_t)l * num_logical;
        for (uint32_t s = 0; s < num_physical; s++) {
            if (in[s] < 0)
                return eplb_error_set(err, EPLB_EINVAL, "physical_load[layer %u][slot %u] = %lld is negative",
                                      l, s, (long long)in[s]);
            int32_t e = map[s];
            if (s >= num_valid || e < 0 || (uint32_t)e >= num_logical)
                continue;
            if (out[e] > INT64_MAX - in[s])
                return eplb_error_set(err, EPLB_EINVAL, "load of logical expert %d in layer %u overflows int64", e, l);
            out[e] += in[s];
        }
    }
    return EPLB_OK;
}

void eplb_load_window_init(eplb_load_window *w, uint32_t num_layers, uint32_t num_logical,
                           uint32_t capacity) {
    memset(w, 0, sizeof *w);
    w->num_layers = num_layers;
    w->num_logical = num_logical;
    w->capacity = capacity ? capacity : 1;
}

void eplb_load_window_free(eplb_load_window *w) {
    eplb_free(w->records);
    eplb_free(w->sum);
    w->records = NULL;
    w->sum = NULL;
    w->count = w->head = w->allocated = 0;
}

uint64_t eplb_load_window_bytes(uint32_t num_layers, uint32_t num_logical, uint32_t capacity) {
    return (uint64_t)num_layers * num_logical * capacity * sizeof(int64_t);
}

/* Make room for one more record while the window is not full yet. */
static eplb_status window_grow(eplb_load_window *w, eplb_error *err) {
    size_t cells = (size_t)w->num_layers * w->num_logical;
    if (!w->sum) {
        w->sum = eplb_calloc(cells ? cells : 1, sizeof *w->sum);
        if (!w->sum)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory for the load window");
    }
    if (w->count < w->allocated)
        return EPLB_OK;
    uint32_t want = w->allocated ? w->allocated * 2 : 8;
    if (want > w->capacity)
        want = w->capacity;
    int64_t *r = eplb_realloc(w->records, (size_t)want * cells * sizeof *r);
    if (!r)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory growing the load window to %u records", want);
    w->records = r;
    w->allocated = want;
    return EPLB_OK;
}

eplb_status eplb_load_window_push(eplb_load_window *w, const int64_t *logical_load, eplb_error *err) {
    size_t cells = (size_t)w->num_layers * w->num_logical;
    if (w->count < w->capacity) {
        eplb_status st = window_grow(w, err);
        if (st != EPLB_OK)
            return st;
    }
    /* The slot this record goes to, and the record it replaces (if full). */
    uint32_t slot = w->count < w->capacity ? w->count : w->head;
    const int64_t *old = w->count < w->capacity ? NULL : w->records + (size_t)slot * cells;
    for (size_t i = 0; i < cells; i++) {
        int64_t base = w->sum[i] - (old ? old[i] : 0);
        if (base > INT64_MAX - logical_load[i])
            return eplb_error_set(err, EPLB_EINVAL, "the load window's sum overflows int64");
    }
    for (size_t i = 0; i < cells; i++)
        w->sum[i] += logical_load[i] - (old ? old[i] : 0);
    memcpy(w->records + (size_t)slot * cells, logical_load, cells * sizeof *logical_load);
    if (w->count < w->capacity)
        w->count++;
    else
        w->head = (w->head + 1) % w->capacity;
    w->passes++;
    w->dirty = true;
    return EPLB_OK;
}

void eplb_load_window_export(const eplb_load_window *w, int64_t *out) {
    size_t cells = (size_t)w->num_layers * w->num_logical;
    for (uint32_t i = 0; i < w->count; i++) {
        uint32_t slot = w->count < w->capacity ? i : (w->head + i) % w->capacity;
        memcpy(out + (size_t)i * cells, w->records + (size_t)slot * cells, cells * sizeof *out);
    }
}

eplb_status eplb_load_window_import(eplb_load_window *w, const int64_t *records, uint32_t count,
                                    uint64_t passes, eplb_error *err) {
    eplb_load_window next;
    eplb_load_window_init(&next, w->num_layers, w->num_logical, w->capacity);
    size_t cells = (size_t)w->num_layers * w->num_logical;
    uint32_t skip = count > next.capacity ? count - next.capacity : 0;
    for (uint32_t i = skip; i < count; i++) {
        eplb_status st = eplb_load_window_push(&next, records + (size_t)i * cells, err);
        if (st != EPLB_OK) {
            eplb_load_window_free(&next);
            return st;
        }
    }
    next.passes = passes;
    next.dirty = false;
    eplb_load_window_free(w);
    *w = next;
    return EPLB_OK;
}
