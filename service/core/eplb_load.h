/* eplb_load.h -- expert load accounting: the physical-to-logical load sum
 * and the sliding window of recorded passes (vLLM's expert_load_window).
 *
 * The window holds *logical* load per record ([L][N]), converted with the
 * map that was live when the pass ran, so a rebalance or an elastic
 * scale-up in the middle of a window does not misattribute older passes.
 * Storage grows with use (a model that never records load costs nothing) up
 * to `capacity` records, then wraps.  Not thread-safe: the owner's lock
 * guards it. */
#ifndef EPLB_LOAD_H
#define EPLB_LOAD_H

#include <stdbool.h>
#include <stdint.h>

#include "eplb_status.h"

/* Logical load of one pass: for each layer, the load of the first
 * num_valid slots summed per logical expert (-1 slots skipped), like vLLM's
 * scatter_add over phy2log[:, :num_valid].
 *   phy2log        int32 [L][P]
 *   physical_load  int64 [L][P], each >= 0
 *   logical_load   int64 [L][N]  out
 * EPLB_EINVAL names the first negative entry or a sum past INT64_MAX; on
 * error logical_load is unspecified. */
eplb_status eplb_load_to_logical(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                                 uint32_t num_valid, const int32_t *phy2log,
                                 const int64_t *physical_load, int64_t *logical_load,
                                 eplb_error *err);

typedef struct eplb_load_window {
    uint32_t num_layers;   /* L */
    uint32_t num_logical;  /* N */
    uint32_t capacity;     /* records kept (window_size) */
    uint32_t count;        /* records held, <= capacity */
    uint32_t head;         /* slot of the oldest record once the window is full */
    uint32_t allocated;    /* record slots allocated, <= capacity */
    uint64_t passes;       /* records ever pushed (drives step_interval) */
    int64_t *records;      /* [allocated][L][N] */
    int64_t *sum;          /* [L][N] sum of the held records */
    bool dirty;            /* changed since last persisted */
} eplb_load_window;

/* An empty window (no allocation until the first push). */
void eplb_load_window_init(eplb_load_window *w, uint32_t num_layers, uint32_t num_logical,
                           uint32_t capacity);
void eplb_load_window_free(eplb_load_window *w);

/* Add one record ([L][N]), dropping the oldest when full.  EPLB_ENOMEM
 * leaves the window unchanged; EPLB_EINVAL when the sum would overflow. */
eplb_status eplb_load_window_push(eplb_load_window *w, const int64_t *logical_load, eplb_error *err);

/* The held records oldest first, into out ([count][L][N]). */
void eplb_load_window_export(const eplb_load_window *w, int64_t *out);

/* Replace the window's contents with count records (oldest first); records
 * past capacity are dropped from the front.  On error *w is unchanged. */
eplb_status eplb_load_window_import(eplb_load_window *w, const int64_t *records, uint32_t count,
                                    uint64_t passes, eplb_error *err);

/* Bytes a full window of this shape takes. */
uint64_t eplb_load_window_bytes(uint32_t num_layers, uint32_t num_logical, uint32_t capacity);

#endif
