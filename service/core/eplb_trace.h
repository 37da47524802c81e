/* eplb_trace.h -- debug events from the core (weight-move states and
 * phases) to whoever logs them, without the core depending on the log,
 * the way eplb_alloc.h lets tests hook the allocator.  eplbd sets the hook
 * at --log-level debug only (main.c: rpc_log_trace, which writes each
 * event as one log line with its fields).
 *
 * Cost when off (the default, and eplbd at info or above): eplb_trace_on()
 * is one relaxed atomic load and a predictable branch, and callers build
 * an event only behind it, so the core pays nothing else.  When on: one
 * indirect call per event on the thread doing the work; the hook must be
 * thread-safe and quick (it runs under the model's op_lock during a move). */
#ifndef EPLB_TRACE_H
#define EPLB_TRACE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum eplb_trace_type {
    EPLB_TF_STR,  /* v.s: any bytes, NUL-terminated (the sink escapes them) */
    EPLB_TF_U64,
    EPLB_TF_I64,
    EPLB_TF_F64,  /* non-finite values are written as null */
    EPLB_TF_BOOL,
} eplb_trace_type;

/* One named value of an event.  key is a literal of [a-z0-9_] (written
 * as is: it becomes a JSON member name). */
typedef struct eplb_trace_field {
    const char *key;
    eplb_trace_type type;
    union {
        const char *s;
        uint64_t u;
        int64_t i;
        double f;
        bool b;
    } v;
} eplb_trace_field;

/* Initializers for an eplb_trace_field array. */
#define EPLB_TF_S(k, x) { .key = (k), .type = EPLB_TF_STR, .v = { .s = (x) } }
#define EPLB_TF_U(k, x) { .key = (k), .type = EPLB_TF_U64, .v = { .u = (uint64_t)(x) } }
#define EPLB_TF_I(k, x) { .key = (k), .type = EPLB_TF_I64, .v = { .i = (int64_t)(x) } }
#define EPLB_TF_F(k, x) { .key = (k), .type = EPLB_TF_F64, .v = { .f = (double)(x) } }
#define EPLB_TF_B(k, x) { .key = (k), .type = EPLB_TF_BOOL, .v = { .b = (x) } }

/* event: a literal naming what happened ("move_state", "move_layer");
 * model_id: the model it concerns (NULL: none). */
typedef void (*eplb_trace_fn)(const char *event, const char *model_id, const eplb_trace_field *fields,
                              size_t num_fields);

/* Install the hook (NULL: off).  Process-wide; set it before serving. */
void eplb_trace_set(eplb_trace_fn fn);

extern _Atomic(eplb_trace_fn) eplb_trace_hook;

static inline bool eplb_trace_on(void) {
    return atomic_load_explicit(&eplb_trace_hook, memory_order_relaxed) != NULL;
}

/* Hand an event to the hook, if one is set. */
void eplb_trace(const char *event, const char *model_id, const eplb_trace_field *fields, size_t num_fields);

#define EPLB_TRACE_N(a) (sizeof(a) / sizeof((a)[0]))

#endif
