/* eplb_move_state.h -- the weight-move state machine of one model.
 *
 *                 check ok                    first gather ok
 *     IDLE ---------------------> STAGED ----------------------> MOVING
 *      ^  ^                          |  (MOVING stored before      |  |
 *      |  |  check/gather failed,    |   the first slot write)    |  |
 *      |  +------ nothing written ---+                            |  |
 *      |                                       all layers moved,  |  |
 *      |   published           COMMITTED <---- new map stored ----+  |
 *      +------------------------ |                                   |
 *                                            scatter retry failed,   |
 *     NEEDS_RELOAD <------------------------ buffers lost, or the ---+
 *          |         (stored before the      map could not be stored
 *          |          error is answered)
 *          +--> IDLE: re-registration (the engine reloaded its weights)
 *
 * A gather failure at layer k > 0 (nothing of layer k written) commits the
 * layers before k: MOVING -> COMMITTED with a mixed map, never a lie.
 *
 * Persisted: IDLE, MOVING, NEEDS_RELOAD.  STAGED and COMMITTED last one
 * call.  A model loaded in MOVING (eplbd died mid-move) is NEEDS_RELOAD.
 * Plain C, no locks: the caller holds the model's operation lock. */
#ifndef EPLB_MOVE_STATE_H
#define EPLB_MOVE_STATE_H

#include <stdbool.h>

typedef enum eplb_move_state {
    EPLB_MOVE_IDLE = 0,         /* the bytes (when attached) hold the served placement */
    EPLB_MOVE_STAGED = 1,       /* a plan is checked, no slot written yet */
    EPLB_MOVE_MOVING = 2,       /* slots are being written (stored before the first write) */
    EPLB_MOVE_COMMITTED = 3,    /* the new placement is stored; IDLE once published */
    EPLB_MOVE_NEEDS_RELOAD = 4, /* the bytes match no map: re-register after a reload */
} eplb_move_state;
#define EPLB_MOVE_STATE_MAX EPLB_MOVE_NEEDS_RELOAD

/* "IDLE", "STAGED", ...; "?" for a value out of range. */
const char *eplb_move_state_name(eplb_move_state s);

/* May a record in state s be stored (IDLE, MOVING, NEEDS_RELOAD)? */
bool eplb_move_state_persistent(eplb_move_state s);

#endif
