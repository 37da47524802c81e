/* rpc_log.c -- the log sink.  One fprintf per line keeps lines whole when
 * worker threads log at once (stdio locks the stream per call). */
#include "rpc_log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static atomic_int log_level = RPC_LOG_INFO;
static const char *const level_names[] = { "debug", "info", "warn", "error" };

int rpc_log_level_parse(const char *s) {
    for (int i = 0; i < 4; i++)
        if (strcmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

void rpc_log_set_level(rpc_log_level level) { atomic_store(&log_level, (int)level); }

void rpc_log(rpc_log_level level, const char *fmt, ...) {
    if ((int)level < atomic_load(&log_level))
        return;
    char line[1024], stamp[32];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s.%03ldZ %s %s\n", stamp, ts.tv_nsec / 1000000, level_names[level], line);
}
