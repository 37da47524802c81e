/* rpc_packed.h -- packed repeated int64 fields of a request, decoded in one
 * pass before upb sees the rest.
 *
 * Why: a DeepSeek-V3 Rebalance or RecordLoad carries 58 x 288 int64 loads,
 * and upb's generic decoder spends ~0.8M instructions on them (its varint
 * loop per value plus growing the array).  Here the values are counted, the
 * array allocated once, and each varint decoded by a short loop; upb parses
 * the other fields from a copy of the message without them.  Anything this
 * does not expect (a value not packed, a varint over 9 bytes, a truncated
 * or odd wire type) returns false, and the caller lets upb parse the whole
 * message as before: the result is the same message either way
 * (tests/rpc/test_packed.c compares them on random and hostile inputs). */
#ifndef RPC_PACKED_H
#define RPC_PACKED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "upb/arena.h"

#define RPC_PACKED_MAX_FIELDS 2

/* Split msg: fields[i] (field numbers of packed repeated int64 fields) go
 * to values[i] / counts[i] (arena arrays; NULL and 0 when absent), the
 * rest, in order, to *rest / *rest_len (an arena copy).  true on success;
 * false (outputs unspecified) to fall back to upb. */
bool rpc_packed_split(const char *msg, size_t len, const uint32_t *fields, size_t nfields, upb_Arena *arena,
                      char **rest, size_t *rest_len, int64_t **values, size_t *counts);

#endif
