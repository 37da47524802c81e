/* eplb_move.h -- private to the registry's files: one committing weight
 * move (eplb_move.c has the state machine). */
#ifndef EPLB_MOVE_H
#define EPLB_MOVE_H

#include "eplb_registry_internal.h"

typedef struct eplb_move {
    eplb_registry *r;
    registry_entry *e;     /* op_lock held; weights attached; state IDLE */
    eplb_placement *next;  /* the target map; eplb_move_run takes its arrays */
    const uint8_t *wait_event; /* NULL/0: none; else checked by the caller (length, begin present) */
    size_t wait_event_len;
    /* out */
    uint32_t layers_done;  /* layers whose bytes hold the new experts */
    uint64_t bytes_moved;  /* bytes written into live slots */
    uint64_t bytes_cross_gpu;
    uint64_t bytes_staged;
    double move_ms;
    bool has_done_event;   /* done_event holds the end op's handle */
    uint8_t done_event[EPLB_EVENT_BYTES];
} eplb_move;

/* Move the weights from the model's placement to *m->next and commit.
 * EPLB_OK: committed, state IDLE.  Otherwise the state says what the bytes
 * hold: IDLE (nothing written, or the layers before a failed gather were
 * committed -- the message says which) or NEEDS_RELOAD (EPLB_EDATALOSS). */
eplb_status eplb_move_run(eplb_move *m, eplb_error *err);

#endif
