/* rpc_log.h -- eplbd's log: one line per event on stderr, with a level.
 * Lines look like "2026-11-27T20:46:00.123Z info RegisterModel OK 0.41ms". */
#ifndef RPC_LOG_H
#define RPC_LOG_H

typedef enum rpc_log_level {
    RPC_LOG_DEBUG = 0,
    RPC_LOG_INFO = 1,
    RPC_LOG_WARN = 2,
    RPC_LOG_ERROR = 3,
} rpc_log_level;

/* Parse "debug|info|warn|error"; returns -1 for anything else. */
int rpc_log_level_parse(const char *s);
void rpc_log_set_level(rpc_log_level level);
void rpc_log(rpc_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
