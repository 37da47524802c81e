/* rpc_log.h -- eplbd's log: one line per event on stderr, with a level, as
 * text or as JSON (--log-format).
 *
 *   text: 2026-11-27T20:46:00.123Z info Rebalance OK 0.41ms model=m epoch=3 ...
 *   json: {"ts":"2026-11-27T20:46:00.123Z","level":"info","event":"call",
 *          "method":"Rebalance","model_id":"m","status":"OK","code":0,...}
 *
 * One write per line, so lines from threads logging at once stay whole.
 * Field names of the JSON form are documented in docs/deploy.md ("Logs")
 * and are a contract for log pipelines. */
#ifndef RPC_LOG_H
#define RPC_LOG_H

#include <stdbool.h>
#include <stddef.h>

#include "eplb_trace.h"
#include "rpc_handlers.h"

/* Longest line, with its newline and NUL: longer content is cut (at a
 * character boundary, never inside an escape) and the line then ends with
 * "truncated":true (JSON) or " [truncated]" (text). */
#define RPC_LOG_LINE_MAX 4096

typedef enum rpc_log_level {
    RPC_LOG_DEBUG = 0,
    RPC_LOG_INFO = 1,
    RPC_LOG_WARN = 2,
    RPC_LOG_ERROR = 3,
} rpc_log_level;

typedef enum rpc_log_format {
    RPC_LOG_TEXT = 0,
    RPC_LOG_JSON = 1,
} rpc_log_format;

/* One finished call, as the server saw it. */
typedef struct rpc_call_record {
    const char *method;          /* log name ("Rebalance"), or the raw path of an unknown method */
    int code;                    /* grpc status code sent */
    const char *message;         /* status details ("" when OK) */
    double duration_ms;          /* accepted -> reply sent */
    bool client_gone;            /* the client cancelled or went away */
    const char *peer;            /* "ipv4:...", "unix:..." or NULL */
    const rpc_call_facts *facts; /* never NULL */
} rpc_call_record;

/* Parse "debug|info|warn|error"; returns -1 for anything else. */
int rpc_log_level_parse(const char *s);
/* Parse "text|json"; returns -1 for anything else. */
int rpc_log_format_parse(const char *s);
void rpc_log_set_level(rpc_log_level level);
void rpc_log_set_format(rpc_log_format format);
bool rpc_log_enabled(rpc_log_level level);
void rpc_log(rpc_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The status name gRPC uses ("OK", "INVALID_ARGUMENT", ...), "UNKNOWN" out of range. */
const char *rpc_status_name(int code);

/* The one line of a finished call: info when OK, warn otherwise. */
void rpc_log_call(const rpc_call_record *rec);

/* A structured event line: {"ts","level","event":event,"model_id":...,
 * then each field} in JSON, "event model=ID key=value ..." in text.
 * model_id may be NULL. */
void rpc_log_event(rpc_log_level level, const char *event, const char *model_id, const eplb_trace_field *fields,
                   size_t num_fields);

/* The core's trace hook (eplb_trace_fn): each event as a debug line.
 * main.c installs it at --log-level debug. */
void rpc_log_trace(const char *event, const char *model_id, const eplb_trace_field *fields, size_t num_fields);

/* Append s (len bytes, any content) to buf at `at` as a JSON string body
 * (no quotes): escapes quotes, backslashes, control bytes and U+2028/9,
 * and replaces bytes that are not UTF-8 with U+FFFD.  Stops before the
 * first character (or escape) that would not fit in cap with the
 * terminating NUL, so a cut never splits one; buf[result] is NUL.  With
 * at >= cap nothing is written.  Returns the new length. */
size_t rpc_json_escape(char *buf, size_t at, size_t cap, const char *s, size_t len);

/* The length of s[0, len) without a UTF-8 sequence that a cut left
 * incomplete at its end (snprintf and friends truncate by bytes). */
size_t rpc_utf8_trim_tail(const char *s, size_t len);

#endif
