/* rpc_convert.h -- eplb.v1 messages <-> core types.  Everything built here
 * lives in the call's arena. */
#ifndef RPC_CONVERT_H
#define RPC_CONVERT_H

#include "eplb/v1/eplb.upb.h"
#include "eplb_model.h"
#include "eplb_move_state.h"
#include "eplb_placement.h"
#include "eplb_status.h"
#include "rpc_handlers.h"

/* A NUL-terminated copy of a string field in the arena ("" when empty), or
 * NULL with *err set when it is longer than max bytes or holds a NUL. */
const char *rpc_string(upb_StringView v, size_t max, const char *field, upb_Arena *arena,
                       eplb_error *err);

/* Convert a (possibly nested) handle.  m may be NULL (then *out is NULL).
 * Levels past EPLB_HANDLE_MAX_DEPTH + 1 are not converted: the core refuses
 * such a handle before it would look at them. */
eplb_status rpc_handle_from_upb(const eplb_v1_ModelHandle *m, const char *field, upb_Arena *arena,
                                const eplb_handle **out, eplb_error *err);

eplb_parallel rpc_parallel_from_upb(const eplb_v1_ParallelConfig *m);

/* A copy of the C string s in the arena as a string view ("" stays empty);
 * false when out of memory.  For response fields: the core's buffers do
 * not live as long as the arena. */
bool rpc_arena_view(const char *s, upb_Arena *arena, upb_StringView *out);

/* A Placement message of p (log2phy only when with_log2phy), or NULL when
 * out of memory. */
eplb_v1_Placement *rpc_placement_to_upb(const char *model_id, const eplb_placement *p,
                                        eplb_move_state state, const char *state_reason, bool with_log2phy,
                                        upb_Arena *arena);

/* An upper bound of the encoded size of p's Placement message. */
uint64_t rpc_placement_wire_bound(const eplb_placement *p, bool with_log2phy);

/* true when p's message fits in max_bytes (0 = no limit); else *out is
 * RESOURCE_EXHAUSTED saying so (nothing else happened). */
bool rpc_placement_fits(const eplb_placement *p, bool with_log2phy, uint64_t max_bytes, rpc_reply *out);

#endif
