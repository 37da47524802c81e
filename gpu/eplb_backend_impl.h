/* eplb_backend_impl.h -- private: helpers shared by the backends (cpu in C,
 * hip compiled as C++ by hipcc or nvcc), not part of the public interface.
 * Everything is static inline so the hip shared object links nothing from
 * the executable. */
#ifndef EPLB_BACKEND_IMPL_H
#define EPLB_BACKEND_IMPL_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_backend.h"

/* eplb_error_set without linking eplb_status.c. */
static inline eplb_status eplb_impl_error(eplb_error *err, eplb_status code, const char *fmt,
                                          ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* The description flattened: what a backend keeps after open. */
typedef struct eplb_layout_tensor {
    uint64_t bytes;        /* bytes_per_expert */
    uint64_t stage_offset; /* where it sits inside one staging entry (64-aligned) */
} eplb_layout_tensor;

typedef struct eplb_layout {
    uint32_t L, P, G, S;            /* layers, slots, ranks, slots per rank */
    uint32_t *first;                /* [L+1] layer l's tensors are [first[l], first[l+1]) */
    eplb_layout_tensor *tensors;    /* [T] all layers' tensors */
    eplb_tensor_layout *place;      /* [T][G] offset and stride per rank */
    uint64_t *entry_bytes;          /* [L] bytes of one staging entry of layer l */
    uint64_t max_entry_bytes;       /* largest entry_bytes */
    uint64_t *rank_extent;          /* [G] end of the furthest slot in rank g's mapping */
    void *block_;                   /* the single allocation */
} eplb_layout;

static inline uint64_t eplb_impl_align64(uint64_t v) { return (v + 63) & ~(uint64_t)63; }

/* Flatten a validated description.  On error *lay is zeroed. */
static inline eplb_status eplb_layout_build(eplb_layout *lay, const eplb_buffers_desc *d,
                                            uint32_t num_physical, eplb_error *err) {
    memset(lay, 0, sizeof *lay);
    uint32_t L = d->num_layers, G = d->num_ranks, T = 0;
    for (uint32_t l = 0; l < L; l++)
        T += d->layers[l].num_tensors;
    size_t bytes = (size_t)(L + 1) * sizeof(uint32_t) + 8 +
                   (size_t)T * sizeof(eplb_layout_tensor) +
                   (size_t)T * G * sizeof(eplb_tensor_layout) + (size_t)L * sizeof(uint64_t) +
                   (size_t)G * sizeof(uint64_t);
    char *raw = (char *)malloc(bytes);
    if (!raw)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory for the buffer layout");
    lay->block_ = raw;
    lay->tensors = (eplb_layout_tensor *)raw;
    raw += (size_t)T * sizeof(eplb_layout_tensor);
    lay->place = (eplb_tensor_layout *)raw;
    raw += (size_t)T * G * sizeof(eplb_tensor_layout);
    lay->entry_bytes = (uint64_t *)raw;
    raw += (size_t)L * sizeof(uint64_t);
    lay->rank_extent = (uint64_t *)raw;
    raw += (size_t)G * sizeof(uint64_t);
    lay->first = (uint32_t *)raw;
    lay->L = L;
    lay->P = num_physical;
    lay->G = G;
    lay->S = num_physical / G;
    for (uint32_t g = 0; g < G; g++)
        lay->rank_extent[g] = 0;
    uint32_t t = 0;
    for (uint32_t l = 0; l < L; l++) {
        lay->first[l] = t;
        uint64_t off = 0;
        for (uint32_t i = 0; i < d->layers[l].num_tensors; i++, t++) {
            const eplb_tensor_desc *td = &d->layers[l].tensors[i];
            lay->tensors[t].bytes = td->bytes_per_expert;
            lay->tensors[t].stage_offset = off;
            off = eplb_impl_align64(off + td->bytes_per_expert);
            for (uint32_t g = 0; g < G; g++) {
                eplb_tensor_layout pl = td->ranks[g];
                lay->place[(size_t)t * G + g] = pl;
                uint64_t end =
                    pl.offset + (uint64_t)(lay->S - 1) * pl.stride + td->bytes_per_expert;
                if (end > lay->rank_extent[g])
                    lay->rank_extent[g] = end;
            }
        }
        lay->entry_bytes[l] = off;
        if (off > lay->max_entry_bytes)
            lay->max_entry_bytes = off;
    }
    lay->first[L] = t;
    return EPLB_OK;
}

static inline void eplb_layout_free(eplb_layout *lay) {
    free(lay->block_);
    memset(lay, 0, sizeof *lay);
}

/* Byte offset of global slot s of tensor t in its rank's mapping. */
static inline uint64_t eplb_layout_slot_offset(const eplb_layout *lay, uint32_t t, uint32_t s) {
    uint32_t g = s / lay->S;
    const eplb_tensor_layout *pl = &lay->place[(size_t)t * lay->G + g];
    return pl->offset + (uint64_t)(s - g * lay->S) * pl->stride;
}

#endif
