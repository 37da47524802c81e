/* eplb_alloc.c -- the core's allocator with a failure hook (eplb_alloc.h). */
#include "eplb_alloc.h"

#include <stdatomic.h>
#include <stdlib.h>

static atomic_long countdown; /* 0: inert; > 0: allocations left before the failure */
static atomic_int sticky_failure;
static atomic_long made;      /* allocations since the last eplb_alloc_fail_at */

static int should_fail(void) {
    atomic_fetch_add_explicit(&made, 1, memory_order_relaxed);
    if (atomic_load_explicit(&countdown, memory_order_relaxed) == 0)
        return 0;
    long left = atomic_fetch_sub_explicit(&countdown, 1, memory_order_relaxed);
    if (left == 1) {
        if (atomic_load_explicit(&sticky_failure, memory_order_relaxed))
            atomic_store_explicit(&countdown, -1, memory_order_relaxed); /* never reaches 0 */
        return 1;
    }
    if (left <= 0) {
        atomic_store_explicit(&countdown, -1, memory_order_relaxed);
        return 1; /* sticky */
    }
    return 0;
}

void *eplb_malloc(size_t n) { return should_fail() ? NULL : malloc(n ? n : 1); }
void *eplb_calloc(size_t count, size_t n) { return should_fail() ? NULL : calloc(count ? count : 1, n ? n : 1); }
void *eplb_realloc(void *p, size_t n) { return should_fail() ? NULL : realloc(p, n ? n : 1); }
void eplb_free(void *p) { free(p); }

long eplb_alloc_fail_at(long n, int sticky) {
    long was = atomic_exchange(&made, 0);
    atomic_store(&sticky_failure, sticky);
    atomic_store(&countdown, n > 0 ? n : 0);
    return was;
}
