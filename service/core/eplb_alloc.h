/* eplb_alloc.h -- every allocation of the core goes through these, so a
 * test can make the Nth one fail (libuv's uv_replace_allocator, SQLite's
 * sqlite3FaultSim) and walk each error path.
 *
 * Inert in production: one predictable branch on a relaxed atomic load per
 * call.  The countdown is process-wide (tests run one scenario at a time). */
#ifndef EPLB_ALLOC_H
#define EPLB_ALLOC_H

#include <stddef.h>

void *eplb_malloc(size_t n);
void *eplb_calloc(size_t count, size_t n);
void *eplb_realloc(void *p, size_t n);
void eplb_free(void *p);

/* Make the countdown-th allocation from now on (1 = the next) fail, and
 * every one after it when `sticky`; countdown <= 0 disarms.  Returns how
 * many allocations were made since the last call (so a test can size its
 * loop: "fail the 1st, the 2nd, ... until the operation succeeds"). */
long eplb_alloc_fail_at(long countdown, int sticky);

#endif
