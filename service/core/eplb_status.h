/* eplb_status.h -- status codes of the eplb core and the error record that
 * carries a human-readable message with them.
 *
 * One X-macro table defines every code, its name and the gRPC status the RPC
 * layer maps it to, so the enum, eplb_status_name() and the mapping cannot
 * drift apart.  The core never includes gRPC: the third column is a plain
 * number (grpc_status_code values from include/grpc/status.h). */
#ifndef EPLB_STATUS_H
#define EPLB_STATUS_H

#include <stddef.h>

/*        code                name                   grpc status */
#define EPLB_STATUS_TABLE(X)                                          \
    X(EPLB_OK,               "OK",                   0  /* OK */)     \
    X(EPLB_EINVAL,           "INVALID_ARGUMENT",     3)               \
    X(EPLB_ENOTFOUND,        "NOT_FOUND",            5)               \
    X(EPLB_EEXIST,           "ALREADY_EXISTS",       6)               \
    X(EPLB_ENOMEM,           "RESOURCE_EXHAUSTED",   8)               \
    X(EPLB_ENOSPACE,         "RESOURCE_EXHAUSTED",   8  /* disk, quota, budget */) \
    X(EPLB_EPRECONDITION,    "FAILED_PRECONDITION",  9)               \
    X(EPLB_EABORTED,         "ABORTED",              10)              \
    X(EPLB_EINTERNAL,        "INTERNAL",             13)              \
    X(EPLB_EUNAVAILABLE,     "UNAVAILABLE",          14)              \
    X(EPLB_EDATALOSS,        "DATA_LOSS",            15)              \
    X(EPLB_EPERM,            "PERMISSION_DENIED",    7  /* trust boundary: peer, shm owner, prefix */)

typedef enum eplb_status {
#define EPLB_STATUS_ENUM(code, name, grpc) code,
    EPLB_STATUS_TABLE(EPLB_STATUS_ENUM)
#undef EPLB_STATUS_ENUM
} eplb_status;

/* An error: the status plus a message naming what was wrong (the field, the
 * numbers).  Functions that take an eplb_error * fill it on failure and
 * leave it untouched on success; NULL is accepted and means "don't care". */
#define EPLB_ERROR_MSG_MAX 512
typedef struct eplb_error {
    eplb_status code;
    char msg[EPLB_ERROR_MSG_MAX];
} eplb_error;

/* Set *err (when not NULL) and return code, so a check reads
 * `return eplb_error_set(err, EPLB_EINVAL, "...", ...);`. */
eplb_status eplb_error_set(eplb_error *err, eplb_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void eplb_error_clear(eplb_error *err);

const char *eplb_status_name(eplb_status code);

/* The grpc_status_code number for code (UNKNOWN = 2 for an unknown code). */
int eplb_status_grpc_code(eplb_status code);

#endif
