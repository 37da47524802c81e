/* rpc_server.c -- completion-queue server loop and call state machine.
 *
 * Every event carries a tag: either a call (rpc_call, whose state says which
 * batch completed) or the server's shutdown tag.  A worker that gets a call
 * event advances that call by one step; handlers run on the worker thread,
 * so up to `workers` calls are handled at once.  Each accepted call posts
 * one replacement request_call, so the number of waiting slots is constant. */
#include "rpc_server.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rpc_log.h"

typedef struct rpc_method {
    const char *path;      /* ":path" of the call */
    const char *name;      /* for the log */
    rpc_handler_fn handler;
} rpc_method;

static const rpc_method methods[] = {
    { "/eplb.v1.ExpertBalancer/RegisterModel", "RegisterModel", rpc_register_model },
    { "/eplb.v1.ExpertBalancer/GetPlacement", "GetPlacement", rpc_get_placement },
    { "/eplb.v1.ExpertBalancer/SetupFromMapping", "SetupFromMapping", rpc_setup_from_mapping },
    { "/eplb.v1.ExpertBalancer/Rebalance", "Rebalance", rpc_rebalance },
    { "/eplb.v1.ExpertBalancer/RecordLoad", "RecordLoad", rpc_record_load },
    { "/eplb.v1.ExpertBalancer/AttachWeights", "AttachWeights", rpc_attach_weights },
    { "/eplb.v1.ExpertBalancer/DetachWeights", "DetachWeights", rpc_detach_weights },
    { "/grpc.health.v1.Health/Check", "Health/Check", rpc_health_check },
};

typedef enum call_state {
    CALL_REQUESTED, /* waiting in grpc_server_request_call */
    CALL_RECEIVING, /* initial metadata sent, message being received */
    CALL_SENDING,   /* response and status being sent */
} call_state;

typedef struct rpc_call {
    call_state state;
    rpc_server *server;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    grpc_byte_buffer *request;   /* received message, NULL if none */
    grpc_byte_buffer *response;  /* sent message, NULL if none */
    grpc_slice status_details;
    int cancelled;               /* RECV_CLOSE_ON_SERVER */
    const char *method;          /* name for the log */
    int status;                  /* grpc status sent */
    struct timespec started;
} rpc_call;

struct rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    rpc_context *ctx;
    pthread_t *threads;
    int workers;
    atomic_bool shutting_down;   /* no new request_call once set */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int shutdown_done;           /* the shutdown tag arrived (under lock) */
    char shutdown_tag;           /* its address is the tag */
};

/* ---- replies ----------------------------------------------------------- */

void rpc_reply_set(rpc_reply *out, int status, const char *fmt, ...) {
    va_list ap;
    out->status = status;
    va_start(ap, fmt);
    vsnprintf(out->message, sizeof out->message, fmt, ap);
    va_end(ap);
    out->body = NULL;
    out->body_len = 0;
}

void rpc_reply_from_error(rpc_reply *out, const eplb_error *err) {
    rpc_reply_set(out, eplb_status_grpc_code(err->code), "%s", err->msg);
}

void rpc_reply_malformed(rpc_reply *out, const char *message_type) {
    rpc_reply_set(out, GRPC_STATUS_INVALID_ARGUMENT, "request is not a valid %s message", message_type);
}

/* ---- calls ------------------------------------------------------------- */

static double ms_since(const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

static void call_free(rpc_call *c) {
    if (c->call)
        grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->request_metadata);
    if (c->request)
        grpc_byte_buffer_destroy(c->request);
    if (c->response)
        grpc_byte_buffer_destroy(c->response);
    grpc_slice_unref(c->status_details);
    free(c);
}

/* Post one waiting slot for a new call.  Not after shutdown began. */
static void call_request(rpc_server *s) {
    if (atomic_load(&s->shutting_down))
        return;
    rpc_call *c = calloc(1, sizeof *c);
    if (!c) {
        rpc_log(RPC_LOG_ERROR, "out of memory: one fewer waiting call slot");
        return;
    }
    c->server = s;
    c->state = CALL_REQUESTED;
    c->status_details = grpc_empty_slice();
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->request_metadata);
    grpc_call_error e = grpc_server_request_call(s->server, &c->call, &c->details, &c->request_metadata,
                                                 s->cq, s->cq, c);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "grpc_server_request_call: error %d", (int)e);
        call_free(c);
    }
}

static const rpc_method *method_find(grpc_slice path) {
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (grpc_slice_str_cmp(path, methods[i].path) == 0)
            return &methods[i];
    return NULL;
}

/* The call was accepted: send initial metadata and receive the message. */
static void call_on_accepted(rpc_call *c) {
    clock_gettime(CLOCK_MONOTONIC, &c->started);
    call_request(c->server); /* keep the number of waiting slots constant */
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->request;
    c->state = CALL_RECEIVING;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, 2, c, NULL);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "start receive batch: error %d", (int)e);
        call_free(c);
    }
}

/* Copy the received message into the arena (one contiguous buffer for upb,
 * which keeps string views into it). */
static const char *request_bytes(grpc_byte_buffer *bb, upb_Arena *arena, size_t *len) {
    grpc_byte_buffer_reader reader;
    *len = 0;
    if (!bb || !grpc_byte_buffer_reader_init(&reader, bb))
        return NULL;
    grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    size_t n = GRPC_SLICE_LENGTH(all);
    char *buf = upb_Arena_Malloc(arena, n ? n : 1);
    if (buf && n)
        memcpy(buf, GRPC_SLICE_START_PTR(all), n);
    grpc_slice_unref(all);
    *len = n;
    return buf;
}

/* The message arrived: run the handler and send its reply. */
static void call_on_received(rpc_call *c, int ok) {
    rpc_server *s = c->server;
    rpc_reply reply;
    memset(&reply, 0, sizeof reply);
    const rpc_method *m = method_find(c->details.method);
    c->method = m ? m->name : NULL;
    upb_Arena *arena = upb_Arena_New();

    if (!ok) {
        /* The client went away before its message arrived. */
        rpc_reply_set(&reply, GRPC_STATUS_CANCELLED, "call ended before its message arrived");
    } else if (!arena) {
        rpc_reply_set(&reply, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else if (!m) {
        rpc_reply_set(&reply, GRPC_STATUS_UNIMPLEMENTED, "unknown method %.*s",
                      (int)(GRPC_SLICE_LENGTH(c->details.method) > 200 ? 200 : GRPC_SLICE_LENGTH(c->details.method)),
                      (const char *)GRPC_SLICE_START_PTR(c->details.method));
    } else if (!c->request) {
        rpc_reply_set(&reply, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
    } else {
        size_t len;
        const char *bytes = request_bytes(c->request, arena, &len);
        if (!bytes)
            rpc_reply_set(&reply, GRPC_STATUS_INTERNAL, "cannot read the request message");
        else
            m->handler(s->ctx, arena, bytes, len, &reply);
    }

    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (reply.status == GRPC_STATUS_OK) {
        grpc_slice body = grpc_slice_from_copied_buffer(reply.body, reply.body_len);
        c->response = grpc_raw_byte_buffer_create(&body, 1);
        grpc_slice_unref(body);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->response;
    } else {
        c->status_details = grpc_slice_from_copied_string(reply.message);
    }
    if (arena)
        upb_Arena_Free(arena);
    c->status = reply.status;
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)reply.status;
    ops[n++].data.send_status_from_server.status_details =
        reply.status == GRPC_STATUS_OK ? NULL : &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->state = CALL_SENDING;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, c, NULL);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "start send batch: error %d", (int)e);
        call_free(c);
    }
}

static void call_on_sent(rpc_call *c, int ok) {
    static const char *const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    const char *status = c->status >= 0 && c->status <= 16 ? names[c->status] : "?";
    char method[128];
    if (c->method)
        snprintf(method, sizeof method, "%s", c->method);
    else
        snprintf(method, sizeof method, "%.*s",
                 (int)(GRPC_SLICE_LENGTH(c->details.method) > 100 ? 100 : GRPC_SLICE_LENGTH(c->details.method)),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
    rpc_log(c->status == GRPC_STATUS_OK ? RPC_LOG_INFO : RPC_LOG_WARN, "%s %s %.2fms%s", method,
            status, ms_since(&c->started), ok && !c->cancelled ? "" : " (client gone)");
    call_free(c);
}

static void *worker_main(void *arg) {
    rpc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        if (ev.tag == &s->shutdown_tag) {
            pthread_mutex_lock(&s->lock);
            s->shutdown_done = 1;
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
            continue;
        }
        rpc_call *c = ev.tag;
        switch (c->state) {
        case CALL_REQUESTED:
            if (ev.success)
                call_on_accepted(c);
            else
                call_free(c); /* shutting down: the slot is released */
            break;
        case CALL_RECEIVING:
            call_on_received(c, ev.success);
            break;
        case CALL_SENDING:
            call_on_sent(c, ev.success);
            break;
        }
    }
    return NULL;
}

/* ---- lifecycle --------------------------------------------------------- */

eplb_status rpc_server_start(const rpc_server_config *cfg, rpc_context *ctx, rpc_server **out,
                             int *bound_port, eplb_error *err) {
    *out = NULL;
    rpc_server *s = calloc(1, sizeof *s);
    if (!s)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    s->ctx = ctx;
    s->workers = cfg->workers > 0 ? cfg->workers : 1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);

    grpc_arg args[2];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = cfg->max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = cfg->max_message_bytes;
    grpc_channel_args channel_args = { .num_args = 2, .args = args };

    s->server = grpc_server_create(&channel_args, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(s->server, cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
        free(s);
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "cannot listen on %s", cfg->listen);
    }
    grpc_server_start(s->server);

    s->threads = calloc((size_t)s->workers, sizeof *s->threads);
    /* Two waiting slots per worker: a burst of new calls finds one ready. */
    for (int i = 0; i < 2 * s->workers; i++)
        call_request(s);
    int started = 0;
    for (; s->threads && started < s->workers; started++)
        if (pthread_create(&s->threads[started], NULL, worker_main, s) != 0)
            break;
    if (started == 0) {
        s->workers = 0;
        rpc_server_stop(s, 0);
        return eplb_error_set(err, EPLB_EINTERNAL, "cannot start worker threads");
    }
    s->workers = started;
    *bound_port = strncmp(cfg->listen, "unix:", 5) == 0 ? 0 : port;
    *out = s;
    return EPLB_OK;
}

void rpc_server_stop(rpc_server *s, int drain_ms) {
    if (!s)
        return;
    atomic_store(&s->shutting_down, true);
    atomic_store(&s->ctx->serving, false);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);

    /* Wait for in-flight calls up to drain_ms, then cancel what is left. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += drain_ms / 1000;
    deadline.tv_nsec += (long)(drain_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->lock);
    while (!s->shutdown_done && s->workers > 0)
        if (pthread_cond_timedwait(&s->cond, &s->lock, &deadline) != 0)
            break;
    int drained = s->shutdown_done;
    pthread_mutex_unlock(&s->lock);
    if (!drained) {
        rpc_log(RPC_LOG_WARN, "drain time (%d ms) is over: cancelling the calls still running", drain_ms);
        grpc_server_cancel_all_calls(s->server);
        pthread_mutex_lock(&s->lock);
        while (!s->shutdown_done && s->workers > 0)
            pthread_cond_wait(&s->cond, &s->lock);
        pthread_mutex_unlock(&s->lock);
    }
    if (s->workers == 0) {
        /* No worker thread ever ran: cancel everything and drain the queue
         * on this thread. */
        grpc_server_cancel_all_calls(s->server);
        grpc_completion_queue_shutdown(s->cq);
        worker_main(s);
    } else {
        grpc_completion_queue_shutdown(s->cq);
        for (int i = 0; i < s->workers; i++)
            pthread_join(s->threads[i], NULL);
    }
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->threads);
    free(s);
}
