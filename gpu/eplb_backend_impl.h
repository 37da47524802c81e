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

/* The description flattened: what a backend keeps after open.
 *
 * Regions of all held ranks are numbered in one sequence, the mappings:
 * mapping m is region maps[m].region of held rank maps[m].rank, and
 * rank_map[g] is held rank g's first mapping.  A backend maps each one
 * (map[M]) and finds a slot as map[place.mapping] + offset + i * stride. */
typedef struct eplb_layout_tensor {
    uint64_t bytes;        /* bytes_per_expert */
    uint64_t stage_offset; /* where it sits inside one staging entry (64-aligned) */
} eplb_layout_tensor;

typedef struct eplb_layout_place {
    uint32_t mapping;      /* index into the layout's mappings */
    uint64_t offset;
    uint64_t stride;
} eplb_layout_place;

typedef struct eplb_layout_mapping {
    uint32_t rank;         /* held rank (0-based in the held range) */
    uint32_t region;       /* its region index */
    uint64_t extent;       /* end of the furthest slot in it (0: no tensor uses it) */
} eplb_layout_mapping;

typedef struct eplb_layout {
    uint32_t L, P, S;               /* layers, slots (all ranks'), slots per rank */
    uint32_t G;                     /* held ranks */
    uint32_t first_rank;            /* global rank of held rank 0 */
    uint32_t M;                     /* mappings: regions of all held ranks */
    uint32_t *first;                /* [L+1] layer l's tensors are [first[l], first[l+1]) */
    eplb_layout_tensor *tensors;    /* [T] all layers' tensors */
    eplb_layout_place *place;       /* [T][G] mapping, offset and stride per held rank */
    uint64_t *entry_bytes;          /* [L] bytes of one staging entry of layer l */
    uint64_t max_entry_bytes;       /* largest entry_bytes */
    eplb_layout_mapping *maps;      /* [M] */
    uint32_t *rank_map;             /* [G+1] held rank g's mappings are [rank_map[g], rank_map[g+1]) */
    void *block_;                   /* the single allocation */
} eplb_layout;

static inline uint64_t eplb_impl_align64(uint64_t v) { return (v + 63) & ~(uint64_t)63; }

/* Flatten a validated description.  On error *lay is zeroed. */
static inline eplb_status eplb_layout_build(eplb_layout *lay, const eplb_buffers_desc *d,
                                            uint32_t num_physical, eplb_error *err) {
    memset(lay, 0, sizeof *lay);
    uint32_t first_rank, G;
    eplb_buffers_held(d, &first_rank, &G);
    uint32_t L = d->num_layers, T = 0, M = 0;
    for (uint32_t l = 0; l < L; l++)
        T += d->layers[l].num_tensors;
    for (uint32_t g = 0; g < G; g++)
        M += d->ranks[g].num_regions;
    size_t bytes = (size_t)T * sizeof(eplb_layout_tensor) + (size_t)T * G * sizeof(eplb_layout_place) +
                   (size_t)L * sizeof(uint64_t) + (size_t)M * sizeof(eplb_layout_mapping) +
                   (size_t)(L + 1) * sizeof(uint32_t) + (size_t)(G + 1) * sizeof(uint32_t) + 16;
    char *raw = (char *)malloc(bytes);
    if (!raw)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory for the buffer layout");
    lay->block_ = raw;
    /* 8-byte members first, then 4-byte ones: every member aligned. */
    lay->tensors = (eplb_layout_tensor *)raw;
    raw += (size_t)T * sizeof(eplb_layout_tensor);
    lay->place = (eplb_layout_place *)raw;
    raw += (size_t)T * G * sizeof(eplb_layout_place);
    lay->entry_bytes = (uint64_t *)raw;
    raw += (size_t)L * sizeof(uint64_t);
    lay->maps = (eplb_layout_mapping *)raw;
    raw += (size_t)M * sizeof(eplb_layout_mapping);
    lay->first = (uint32_t *)raw;
    raw += (size_t)(L + 1) * sizeof(uint32_t);
    lay->rank_map = (uint32_t *)raw;
    lay->L = L;
    lay->P = num_physical;
    lay->G = G;
    lay->first_rank = first_rank;
    lay->S = num_physical / d->num_ranks;
    lay->M = M;
    uint32_t m = 0;
    for (uint32_t g = 0; g < G; g++) {
        lay->rank_map[g] = m;
        for (uint32_t r = 0; r < d->ranks[g].num_regions; r++, m++) {
            lay->maps[m].rank = g;
            lay->maps[m].region = r;
            lay->maps[m].extent = 0;
        }
    }
    lay->rank_map[G] = m;
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
                const eplb_tensor_layout *tl = &td->ranks[g];
                eplb_layout_place pl;
                pl.mapping = lay->rank_map[g] + tl->region;
                pl.offset = tl->offset;
                pl.stride = tl->stride;
                lay->place[(size_t)t * G + g] = pl;
                uint64_t end = pl.offset + (uint64_t)(lay->S - 1) * pl.stride + td->bytes_per_expert;
                if (end > lay->maps[pl.mapping].extent)
                    lay->maps[pl.mapping].extent = end;
            }
        }
        lay->entry_bytes[l] = off;
        if (off > lay->max_entry_bytes)
            lay->max_entry_bytes = off;
    }
    lay->first[L] = t;
    return EPLB_OK;
}

/* Staging bytes one rank needs for layer_entries[l] entries in layer l,
 * the most over the layers (entries are padded: entry_bytes, not the
 * tensors' sum).  Saturates instead of overflowing. */
static inline uint64_t eplb_layout_staging_bytes(const eplb_layout *lay,
                                                 const uint32_t *layer_entries) {
    uint64_t most = 0;
    for (uint32_t l = 0; l < lay->L; l++) {
        uint64_t eb = lay->entry_bytes[l], n = layer_entries[l];
        uint64_t b = eb && n > UINT64_MAX / eb ? UINT64_MAX : n * eb;
        if (b > most)
            most = b;
    }
    return most;
}

static inline void eplb_layout_free(eplb_layout *lay) {
    free(lay->block_);
    memset(lay, 0, sizeof *lay);
}

/* Is global slot s on a held rank? */
static inline int eplb_layout_holds(const eplb_layout *lay, uint32_t s) {
    uint32_t g = s / lay->S;
    return g >= lay->first_rank && g - lay->first_rank < lay->G;
}

/* Where global slot s (on a held rank) of tensor t is: *mapping and the
 * byte offset in it. */
static inline uint64_t eplb_layout_slot_offset(const eplb_layout *lay, uint32_t t, uint32_t s,
                                               uint32_t *mapping) {
    uint32_t g = s / lay->S - lay->first_rank;
    const eplb_layout_place *pl = &lay->place[(size_t)t * lay->G + g];
    *mapping = pl->mapping;
    return pl->offset + (uint64_t)(s - (g + lay->first_rank) * lay->S) * pl->stride;
}

#endif
