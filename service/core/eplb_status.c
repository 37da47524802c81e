/* eplb_status.c -- the status table's functions and the error record. */
#include "eplb_status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

eplb_status eplb_error_set(eplb_error *err, eplb_status code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void eplb_error_clear(eplb_error *err) {
    if (err) {
        err->code = EPLB_OK;
        err->msg[0] = '\0';
    }
}

const char *eplb_status_name(eplb_status code) {
    switch (code) {
#define EPLB_STATUS_NAME(c, name, grpc) case c: return name;
        EPLB_STATUS_TABLE(EPLB_STATUS_NAME)
#undef EPLB_STATUS_NAME
    }
    return "UNKNOWN";
}

int eplb_status_grpc_code(eplb_status code) {
    switch (code) {
#define EPLB_STATUS_GRPC(c, name, grpc) case c: return grpc;
        EPLB_STATUS_TABLE(EPLB_STATUS_GRPC)
#undef EPLB_STATUS_GRPC
    }
    return 2;
}
