/* eplb_move_state.c -- names and persistence of the move states; the
 * transitions themselves are in eplb_move.c, one function each. */
#include "eplb_move_state.h"

const char *eplb_move_state_name(eplb_move_state s) {
    switch (s) {
    case EPLB_MOVE_IDLE: return "IDLE";
    case EPLB_MOVE_STAGED: return "STAGED";
    case EPLB_MOVE_MOVING: return "MOVING";
    case EPLB_MOVE_COMMITTED: return "COMMITTED";
    case EPLB_MOVE_NEEDS_RELOAD: return "NEEDS_RELOAD";
    }
    return "?";
}

bool eplb_move_state_persistent(eplb_move_state s) {
    return s == EPLB_MOVE_IDLE || s == EPLB_MOVE_MOVING || s == EPLB_MOVE_NEEDS_RELOAD;
}
