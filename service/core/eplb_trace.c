/* eplb_trace.c -- the core's debug-event hook (eplb_trace.h). */
#include "eplb_trace.h"

/* Zero-initialized (no hook): clang does not take NULL, a void *, as a
 * constant initializer of an atomic function pointer. */
_Atomic(eplb_trace_fn) eplb_trace_hook;

void eplb_trace_set(eplb_trace_fn fn) { atomic_store(&eplb_trace_hook, fn); }

void eplb_trace(const char *event, const char *model_id, const eplb_trace_field *fields, size_t num_fields) {
    /* Loaded once: a hook unset meanwhile is still safe to call (sinks
     * are plain functions that live as long as the process). */
    eplb_trace_fn fn = atomic_load_explicit(&eplb_trace_hook, memory_order_relaxed);
    if (fn)
        fn(event, model_id, fields, num_fields);
}
