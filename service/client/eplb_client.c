/* eplb_client.c -- unary calls with one batch of six ops on a private
 * completion queue per call (calls from several threads do not share one). */
#include "eplb_client.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct eplb_client {
    grpc_channel *channel;
};

const char *eplb_grpc_status_name(int status) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return status >= 0 && status <= 16 ? names[status] : "UNKNOWN";
}

/* The whole file, NUL-terminated (malloc'd), or NULL (errno set). */
static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 16384, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap || ferror(f))
            break;
        char *bigger = realloc(buf, (cap *= 2) + 1);
        if (!bigger)
            free(buf);
        buf = bigger;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        free(buf);
        errno = bad ? EIO : ENOMEM;
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

eplb_client *eplb_client_open(const char *target) { return eplb_client_open_tls(target, NULL, NULL); }

eplb_client *eplb_client_open_tls(const char *target, const eplb_client_tls *tls, const char **bad_file) {
    char *ca = NULL, *cert = NULL, *key = NULL;
    if (bad_file)
        *bad_file = NULL;
    if (tls) {
        const char *bad = NULL;
        if (!tls->ca_file || !tls->cert_file != !tls->key_file) {
            errno = EINVAL;
            return NULL;
        }
        if (!(ca = read_file(bad = tls->ca_file)) || (tls->cert_file && !(cert = read_file(bad = tls->cert_file))) ||
            (tls->key_file && !(key = read_file(bad = tls->key_file)))) {
            int e = errno;
            free(ca);
            free(cert);
            free(key);
            if (bad_file)
                *bad_file = bad;
            errno = e;
            return NULL;
        }
    }
    eplb_client *c = calloc(1, sizeof *c);
    if (!c) {
        free(ca);
        free(cert);
        free(key);
        return NULL;
    }
    grpc_init();
    grpc_channel_credentials *creds;
    if (tls) {
        grpc_ssl_pem_key_cert_pair pair = { .private_key = key, .cert_chain = cert };
        creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
    } else {
        creds = grpc_insecure_credentials_create();
    }
    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = 1 << 30;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = 1 << 30;
    size_t nargs = 2;
    if (tls && tls->server_name) {
        args[2].type = GRPC_ARG_STRING;
        args[2].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[2].value.string = (char *)tls->server_name;
        nargs = 3;
    }
    grpc_channel_args channel_args = { .num_args = nargs, .args = args };
    c->channel = creds ? grpc_channel_create(target, creds, &channel_args) : NULL;
    if (creds)
        grpc_channel_credentials_release(creds);
    if (key)
        memset(key, 0, strlen(key));
    free(ca);
    free(cert);
    free(key);
    if (!c->channel) {
        grpc_shutdown();
        free(c);
        return NULL;
    }
    return c;
}

void eplb_client_close(eplb_client *c) {
    if (!c)
        return;
    grpc_channel_destroy(c->channel);
    grpc_shutdown();
    free(c);
}

void eplb_call_result_free(eplb_call_result *r) {
    free(r->message);
    free(r->body);
    memset(r, 0, sizeof *r);
}

static char *slice_to_string(grpc_slice s) {
    size_t n = GRPC_SLICE_LENGTH(s);
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, GRPC_SLICE_START_PTR(s), n);
        p[n] = '\0';
    }
    return p;
}

int eplb_client_call(eplb_client *c, const char *method, const void *request, size_t len,
                     int timeout_ms, eplb_call_result *out) {
    memset(out, 0, sizeof *out);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                         gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_slice method_slice = grpc_slice_from_copied_string(method);
    grpc_call *call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                               method_slice, NULL, deadline, NULL);
    grpc_slice_unref(method_slice);

    grpc_slice req_slice = grpc_slice_from_copied_buffer(request, len);
    grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&req_slice, 1);
    grpc_slice_unref(req_slice);
    grpc_metadata_array initial_md, trailing_md;
    grpc_metadata_array_init(&initial_md);
    grpc_metadata_array_init(&trailing_md);
    grpc_byte_buffer *resp = NULL;
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &resp;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;

    int rc = -1;
    if (call && grpc_call_start_batch(call, ops, 6, call, NULL) == GRPC_CALL_OK) {
        grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        rc = 0;
        out->status = (int)status;
        out->message = slice_to_string(details);
        if (resp) {
            grpc_byte_buffer_reader reader;
            if (grpc_byte_buffer_reader_init(&reader, resp)) {
                grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
                out->body_len = GRPC_SLICE_LENGTH(all);
                out->body = malloc(out->body_len ? out->body_len : 1);
                if (out->body)
                    memcpy(out->body, GRPC_SLICE_START_PTR(all), out->body_len);
                grpc_slice_unref(all);
                grpc_byte_buffer_reader_destroy(&reader);
            }
        }
    }
    if (resp)
        grpc_byte_buffer_destroy(resp);
    grpc_byte_buffer_destroy(req);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&initial_md);
    grpc_metadata_array_destroy(&trailing_md);
    if (call)
        grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return rc;
}
