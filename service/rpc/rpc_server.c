/* rpc_server.c -- completion-queue server loop, worker pool and call state
 * machine.
 *
 * Why it is built this way:
 *  - A handler may run for seconds (a Rebalance of a large model, a weight
 *    move, a RegisterModel that writes a big placement).  If handlers ran on
 *    the threads that pump the completion queue, a few long calls would hold
 *    every CQ thread: Health probes and GetPlacement would wait behind them,
 *    and accepted calls would not get their replacement request_call slot,
 *    so new calls would sit unmatched in gRPC (where shutdown cancels them).
 *    So the CQ threads (RPC_CQ_THREADS) only advance call state machines,
 *    re-post request_call slots at once, and run Health/Check inline
 *    (constant time).  GetPlacement runs on a small reader pool: it never
 *    waits for an operation (snapshots), but encoding a large placement
 *    takes a while, so it stays off the CQ threads and is never queued
 *    behind slow work.  Every other handler runs on a pool of `workers`
 *    threads fed by a FIFO queue.
 *  - Every rpc_call object (a posted slot or an accepted call) is counted
 *    while it exists.  The completion queue is shut down only after the
 *    server's shutdown tag arrived AND the count is zero, so no batch is
 *    ever started on a shut-down queue (gRPC asserts on that), whatever the
 *    order in which handlers finish.
 *
 * Call state machine (each arrow is one completion-queue event or one
 * hand-off; slots + calls count the object from allocation to free):
 *
 *            call_request (start, or a CQ thread on every accept)
 *                 |
 *                 v
 *            REQUESTED ---- fails (server shutting down) ----------> freed
 *                 | accepted: post a replacement slot first, then
 *                 | batch SEND_INITIAL_METADATA + RECV_MESSAGE
 *                 v
 *            RECEIVING
 *                 | message in (or the call died: reply CANCELLED)
 *                 +---- Health / error reply: inline on the CQ thread
 *                 |                                     |
 *                 v                                     |
 *             QUEUED (reader or worker pool, FIFO)      |
 *                 | a pool thread pops it               |
 *                 v                                     v
 *             HANDLING: handler runs (or, after the drain time, no
 *                 |     handler: CANCELLED), reply built
 *                 | batch [SEND_MESSAGE] + SEND_STATUS + RECV_CLOSE
 *                 v
 *             SENDING
 *                 | batch done: one log line
 *                 v
 *               freed  (count - 1; the last one wakes the stopping thread)
 *
 * Shutdown (rpc_server_stop): set shutting_down (no new slot is posted),
 * health NOT_SERVING, grpc_server_shutdown_and_notify (listeners close:
 * new connections are refused; posted slots fail; connections get GOAWAY,
 * their accepted calls go on).  Wait, up to drain_ms, until the shutdown
 * tag arrived and slots + calls == 0: every accepted call, queued or
 * running, ran to completion.  If the time runs out: set cancelling (queued calls are
 * answered CANCELLED without running), grpc_server_cancel_all_calls, and
 * wait, without a limit, for that count to reach 0: handlers are bounded,
 * and a handler still running is waited for, so nothing uses the registry once stop
 * returns.  Then the CQ is shut down, the CQ threads and the workers are
 * joined, and the server and queue destroyed. */
#include "rpc_server.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "grpc/health/v1/health.upb.h"
#include "rpc_health.h"
#include "rpc_log.h"

/* ThreadSanitizer sees no ordering through libgrpc (built without it, and
 * its locks are absl's, not pthread's), so each hand-off of a call through
 * the completion queue is declared: release before a batch or request_call
 * is started with the call as tag, acquire when its event comes out.  No
 * code at all in a normal build. */
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define TSAN_RELEASE(p) __tsan_release(p)
#define TSAN_ACQUIRE(p) __tsan_acquire(p)
#else
#define TSAN_RELEASE(p) ((void)(p))
#define TSAN_ACQUIRE(p) ((void)(p))
#endif

/* Threads in grpc_completion_queue_next.  They never run a handler that
 * can take long, so two are plenty. */
#define RPC_CQ_THREADS 2
/* request_call slots kept posted: 2 per worker plus a margin, so a burst of
 * calls arriving together is matched at once (each accept re-posts one). */
#define RPC_SLOTS_MARGIN 32

/* Where a handler runs.  INLINE: on the CQ thread (constant time, never
 * waits).  READ: the reader pool (never waits for an operation, but may
 * take a while to encode a large placement: off the CQ threads, and not
 * behind slow work).  WORK: the worker pool (may run for seconds). */
enum rpc_lane { LANE_INLINE, LANE_READ, LANE_WORK, LANE_STREAM };
#define NUM_POOLS 2 /* LANE_READ and LANE_WORK have a pool: pools[lane - 1] */

/* Streaming methods (LANE_STREAM): run by the CQ threads, batch by batch
 * (see "Streams" below). */
enum rpc_stream_kind { STREAM_NONE, STREAM_WATCH, STREAM_BIDI };

/* Open streams at most (Watch and reflection together): each holds a call
 * object (~3 KiB) and gRPC's call state for as long as the client keeps
 * it open.  Beyond: RESOURCE_EXHAUSTED. */
#define RPC_MAX_STREAMS 1024
/* Largest message a stream handler takes (reflection requests: names). */
#define RPC_STREAM_MESSAGE_MAX (64u << 10)

/* Reader threads: GetPlacement only takes a snapshot reference and
 * encodes; two keep one large encode from holding up the others. */
#define RPC_READ_THREADS 2

typedef struct rpc_method {
    const char *path;      /* ":path" of the call */
    const char *name;      /* for the log */
    rpc_handler_fn handler;
    int lane;              /* where its handler runs (rpc_lane) */
    int stream;            /* rpc_stream_kind (LANE_STREAM only) */
} rpc_method;

static const rpc_method methods[] = {
    { "/eplb.v1.ExpertBalancer/RegisterModel", "RegisterModel", rpc_register_model, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/GetPlacement", "GetPlacement", rpc_get_placement, LANE_READ, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/SetupFromMapping", "SetupFromMapping", rpc_setup_from_mapping, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/Rebalance", "Rebalance", rpc_rebalance, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/ContinueRebalance", "ContinueRebalance", rpc_continue_rebalance, LANE_WORK, STREAM_NONE },
    /* Per-rank plan fetches take the model's op_lock briefly (a copy of one
     * rank's ops) and encode without it: worker lane like the rest. */
    { "/eplb.v1.ExpertBalancer/GetTransferPlan", "GetTransferPlan", rpc_get_transfer_plan, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/CommitRebalance", "CommitRebalance", rpc_commit_rebalance, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/AbortRebalance", "AbortRebalance", rpc_abort_rebalance, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/RecordLoad", "RecordLoad", rpc_record_load, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/AttachWeights", "AttachWeights", rpc_attach_weights, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/DetachWeights", "DetachWeights", rpc_detach_weights, LANE_WORK, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/ListModels", "ListModels", rpc_list_models, LANE_READ, STREAM_NONE },
    { "/eplb.v1.ExpertBalancer/DeleteModel", "DeleteModel", rpc_delete_model, LANE_WORK, STREAM_NONE },
    { "/grpc.health.v1.Health/Check", "Health/Check", rpc_health_check, LANE_INLINE, STREAM_NONE },
    { "/grpc.health.v1.Health/Watch", "Health/Watch", NULL, LANE_STREAM, STREAM_WATCH },
    /* v1 and v1alpha have the same messages: one handler answers both. */
    { "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "ServerReflectionInfo",
      rpc_server_reflection_info, LANE_STREAM, STREAM_BIDI },
    { "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ServerReflectionInfo/v1alpha",
      rpc_server_reflection_info, LANE_STREAM, STREAM_BIDI },
};

typedef enum call_state {
    CALL_REQUESTED, /* a slot waiting in grpc_server_request_call */
    CALL_RECEIVING, /* accepted: initial metadata out, message in */
    CALL_QUEUED,    /* message in, waiting for a pool worker */
    CALL_HANDLING,  /* the handler runs (CQ thread or worker) */
    CALL_SENDING,   /* response, status and close in flight */
    CALL_STREAMING, /* a stream: batches as "Streams" below says */
} call_state;

/* What a completion-queue event's tag points to.  A call's main batches
 * (request_call, receive, send) use c->tag, which is the call's first
 * member, so the call itself is that tag; a stream's RECV_CLOSE_ON_SERVER
 * batch, in flight alongside them, uses c->close_tag. */
typedef enum { TAG_MAIN, TAG_CLOSE } tag_kind;
typedef struct rpc_tag {
    struct rpc_call *call;
    tag_kind kind;
} rpc_tag;

typedef struct rpc_call {
    rpc_tag tag;                 /* first: (rpc_tag *)c == &c->tag */
    rpc_tag close_tag;
    call_state state;
    rpc_server *server;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array request_metadata;
    grpc_byte_buffer *request;   /* received message, NULL if none */
    grpc_byte_buffer *response;  /* sent message, NULL if none */
    grpc_slice status_details;
    int received;                /* the RECV_MESSAGE batch succeeded */
    int cancelled;               /* RECV_CLOSE_ON_SERVER */
    const rpc_method *m;         /* NULL: unknown method */
    int status;                  /* grpc status sent */
    char message[EPLB_ERROR_MSG_MAX]; /* status details sent (log) */
    rpc_call_facts facts;        /* what the handler did (log, observer) */
    struct timespec started;
    struct rpc_call *next;       /* pool queue link (under the pool's lock) */

    /* Streams only (CALL_STREAMING), under s->stream_lock. */
    int stream;                  /* rpc_stream_kind */
    bool main_busy;              /* a TAG_MAIN batch is in flight */
    bool close_done;             /* the RECV_CLOSE_ON_SERVER batch completed */
    bool finishing;              /* SEND_STATUS started: nothing more is sent */
    bool freeing;                /* decided: the call is freed, off the list */
    int sent_status;             /* Watch: the ServingStatus last sent (0: none) */
    char service[128];           /* Watch: the service watched */
    size_t service_len;          /* > sizeof service: unknown (too long) */
    uint64_t messages;           /* messages sent (log) */
    struct rpc_call *stream_next, *stream_prev; /* s->streams */
} rpc_call;

/* A FIFO of calls and the threads that run them.  lock guards head, tail
 * and closed; it is held only to push or pop, never while a handler runs.
 * Idle threads wait on cond; pushers never wait. */
typedef struct rpc_pool {
    const char *name;            /* "worker", "reader" (log) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    rpc_call *head, *tail;
    int closed;                  /* threads exit once the queue is empty */
    pthread_t *threads;
    int num_threads;
} rpc_pool;

struct rpc_server {
    grpc_server *server;
    grpc_completion_queue *cq;
    rpc_context *ctx;
    pthread_t cq_threads[RPC_CQ_THREADS];
    int num_cq_threads;
    rpc_pool pools[NUM_POOLS];   /* [LANE_READ - 1], [LANE_WORK - 1] */
    const char *delay_method;    /* test hook (rpc_server_config) */
    int delay_ms;
    int drain_ms;                /* for the CANCELLED message */

    atomic_bool shutting_down;   /* set once by stop: no new request_call */
    atomic_bool cancelling;      /* drain time over: queued calls are not run */

    /* lock guards slots, calls, shutdown_done and the drain counters; it is
     * held only to update or test them (never across a gRPC or handler
     * call), so it blocks nobody for long.  cond (CLOCK_MONOTONIC) wakes
     * the stopping thread when the shutdown tag arrives or slots + calls
     * reaches 0. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int slots;                   /* REQUESTED objects */
    int calls;                   /* accepted, not yet freed */
    int shutdown_done;           /* the shutdown tag arrived */
    int drain_completed;         /* calls freed after stop began: finished */
    int drain_cancelled;         /* ... ended cancelled / client gone */

    char shutdown_tag;           /* its address is the tag */

    /* stream_lock guards the open streams: the list, num_streams, each
     * stream call's stream fields, and last_health.  Held to decide what a
     * stream does next and to start that batch (gRPC never calls back into
     * us from grpc_call_start_batch) and, for reflection, across its
     * handler (a table lookup: microseconds, no I/O); never across an
     * eplb.v1 handler.  It nests inside nothing and takes no other lock
     * except, via rpc_health_status, the registry's r->lock (read) and
     * pub_locks, which never wait for an operation. */
    pthread_mutex_t stream_lock;
    rpc_call *streams;           /* open Watch and reflection calls */
    int num_streams;
    int last_health[2];          /* statuses last pushed to watchers: "", service */
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

void rpc_reply_note_model(rpc_reply *out, const char *data, size_t len) {
    size_t n = len < sizeof out->facts.model_id - 1 ? len : sizeof out->facts.model_id - 1;
    if (n)
        memcpy(out->facts.model_id, data, n);
    out->facts.model_id[n] = '\0';
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

static void sleep_ms(int ms) {
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void call_free(rpc_call *c) {
    rpc_server *s = c->server;
    if (c->call)
        grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->request_metadata);
    if (c->request)
        grpc_byte_buffer_destroy(c->request);
    if (c->response)
        grpc_byte_buffer_destroy(c->response);
    grpc_slice_unref(c->status_details);
    int was_slot = c->state == CALL_REQUESTED;
    free(c);
    pthread_mutex_lock(&s->lock);
    if (was_slot)
        s->slots--;
    else
        s->calls--;
    if (s->slots + s->calls == 0)
        pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/* Post one waiting slot for a new call.  Not after shutdown began.  Called
 * by start (before stop can run) or by a CQ thread that holds a live call,
 * so the count never drops to 0 in between and the CQ is never shut down
 * under it. */
static void call_request(rpc_server *s) {
    if (atomic_load(&s->shutting_down))
        return;
    rpc_call *c = calloc(1, sizeof *c);
    if (!c) {
        rpc_log(RPC_LOG_ERROR, "out of memory: one fewer waiting call slot");
        return;
    }
    c->server = s;
    c->tag = (rpc_tag){ c, TAG_MAIN };
    c->close_tag = (rpc_tag){ c, TAG_CLOSE };
    c->state = CALL_REQUESTED;
    c->status_details = grpc_empty_slice();
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->request_metadata);
    pthread_mutex_lock(&s->lock);
    s->slots++;
    pthread_mutex_unlock(&s->lock);
    TSAN_RELEASE(c);
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

bool rpc_server_method_known(const char *name) {
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (strcmp(name, methods[i].name) == 0)
            return true;
    return false;
}

/* The call was accepted: re-post its slot, send initial metadata and
 * receive the message. */
static void call_on_accepted(rpc_call *c) {
    rpc_server *s = c->server;
    clock_gettime(CLOCK_MONOTONIC, &c->started);
    pthread_mutex_lock(&s->lock);
    s->slots--;
    int in_flight = ++s->calls;
    pthread_mutex_unlock(&s->lock);
    rpc_log(RPC_LOG_DEBUG, "accepted %.*s (%d in flight)",
            (int)(GRPC_SLICE_LENGTH(c->details.method) > 100 ? 100 : GRPC_SLICE_LENGTH(c->details.method)),
            (const char *)GRPC_SLICE_START_PTR(c->details.method), in_flight);
    c->state = CALL_RECEIVING;
    call_request(s); /* at once: keep the number of waiting slots constant */
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->request;
    grpc_call *call = c->call; /* read before the hand-off */
    TSAN_RELEASE(c);
    grpc_call_error e = grpc_call_start_batch(call, ops, 2, c, NULL);
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

/* Run the handler (or answer without one) and start sending the reply. */
static void call_handle(rpc_call *c) {
    rpc_server *s = c->server;
    const rpc_method *m = c->m;
    rpc_reply reply;
    memset(&reply, 0, sizeof reply);
    upb_Arena *arena = NULL;
    c->state = CALL_HANDLING;

    if (!c->received) {
        /* The client went away (or the call was cancelled) before its
         * message arrived. */
        rpc_reply_set(&reply, GRPC_STATUS_CANCELLED, "call ended before its message arrived");
    } else if (!m) {
        rpc_reply_set(&reply, GRPC_STATUS_UNIMPLEMENTED, "unknown method %.*s",
                      (int)(GRPC_SLICE_LENGTH(c->details.method) > 200 ? 200 : GRPC_SLICE_LENGTH(c->details.method)),
                      (const char *)GRPC_SLICE_START_PTR(c->details.method));
    } else if (m->lane == LANE_WORK && atomic_load(&s->cancelling)) {
        rpc_reply_set(&reply, GRPC_STATUS_CANCELLED,
                      "server shutting down: drain time (%d ms) ran out before this call started", s->drain_ms);
    } else if (!c->request) {
        rpc_reply_set(&reply, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
    } else if (!(arena = upb_Arena_New())) {
        rpc_reply_set(&reply, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    } else {
        size_t len;
        const char *bytes = request_bytes(c->request, arena, &len);
        if (!bytes) {
            rpc_reply_set(&reply, GRPC_STATUS_INTERNAL, "cannot read the request message");
        } else {
            char *peer = grpc_call_get_peer(c->call);
            reply.peer = peer;
            if (s->delay_method && strcmp(s->delay_method, m->name) == 0)
                sleep_ms(s->delay_ms); /* test hook: a slow handler */
            m->handler(s->ctx, arena, bytes, len, &reply);
            reply.peer = NULL;
            gpr_free(peer);
        }
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
    c->facts = reply.facts;
    if (reply.status != GRPC_STATUS_OK)
        snprintf(c->message, sizeof c->message, "%s", reply.message);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)reply.status;
    ops[n++].data.send_status_from_server.status_details =
        reply.status == GRPC_STATUS_OK ? NULL : &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->state = CALL_SENDING;
    grpc_call *call = c->call; /* read before the hand-off */
    TSAN_RELEASE(c);
    grpc_call_error e = grpc_call_start_batch(call, ops, n, c, NULL);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "start send batch: error %d", (int)e);
        call_free(c);
    }
}

static void stream_start(rpc_call *c);
static void health_notify(rpc_server *s);

/* The message arrived (or the call died): inline methods and error
 * replies here, everything else to its method's pool. */
static void call_on_received(rpc_call *c, int ok) {
    rpc_server *s = c->server;
    c->received = ok;
    c->m = method_find(c->details.method);
    if (ok && c->m && c->m->lane == LANE_STREAM) {
        stream_start(c);
        return;
    }
    if (!ok || !c->m || c->m->lane == LANE_INLINE) {
        call_handle(c);
        return;
    }
    rpc_pool *p = &s->pools[c->m->lane - 1];
    c->state = CALL_QUEUED;
    c->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->tail)
        p->tail->next = c;
    else
        p->head = c;
    p->tail = c;
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

/* The call is over (its status went out, or it died): one log line, the
 * observer, the drain counters, then free. */
static void call_finished(rpc_call *c, int gone) {
    rpc_server *s = c->server;
    char method[128];
    if (c->m)
        snprintf(method, sizeof method, "%s", c->m->name);
    else
        snprintf(method, sizeof method, "%.*s",
                 (int)(GRPC_SLICE_LENGTH(c->details.method) > 100 ? 100 : GRPC_SLICE_LENGTH(c->details.method)),
                 (const char *)GRPC_SLICE_START_PTR(c->details.method));
    char *peer = grpc_call_get_peer(c->call);
    rpc_call_record rec = {
        .method = method,
        .code = c->status,
        .message = c->message,
        .duration_ms = ms_since(&c->started),
        .client_gone = gone,
        .peer = peer,
        .facts = &c->facts,
    };
    rpc_log_call(&rec);
    if (s->ctx->on_call)
        s->ctx->on_call(s->ctx->on_call_arg, &rec);
    gpr_free(peer);
    if (atomic_load(&s->shutting_down)) {
        pthread_mutex_lock(&s->lock);
        if (gone || c->status == GRPC_STATUS_CANCELLED)
            s->drain_cancelled++;
        else
            s->drain_completed++;
        pthread_mutex_unlock(&s->lock);
    }
    /* An operation may have changed a model's state (NEEDS_RELOAD, a
     * re-registration): tell the health watchers. */
    bool work = c->m && c->m->lane == LANE_WORK;
    call_free(c);
    if (work)
        health_notify(s);
}

static void call_on_sent(rpc_call *c, int ok) { call_finished(c, !ok || c->cancelled); }

/* ---- streams -----------------------------------------------------------
 * Health/Watch (server streaming) and ServerReflectionInfo (bidirectional)
 * run on the CQ threads, one batch at a time, plus one RECV_CLOSE_ON_SERVER
 * batch posted when the stream starts (close_tag), which completes when
 * the client cancels or the call ends: so a stream that sends nothing
 * still learns that its client went away.  Every decision is taken under
 * s->stream_lock, since the close and the main batch complete on either CQ
 * thread.
 *
 *   stream_start: post the close batch, then
 *     Watch:  send the current status; on each send's completion, and on
 *             health_notify, send again if the status changed; once
 *             shutting down and NOT_SERVING was sent: finish UNAVAILABLE.
 *     bidi:   answer the message in hand with [SEND_MESSAGE + RECV_MESSAGE];
 *             the client's half-close (no message): finish OK; a handler
 *             error: finish with it.  At shutdown an idle stream is
 *             cancelled with UNAVAILABLE.
 *   a main batch fails (client gone): cancel the call (the close batch then
 *     completes).
 *   freed once the close batch completed and no main batch is in flight. */

/* Start a main batch of the stream; on failure the call is cancelled.
 * Caller holds stream_lock and has set main_busy. */
static void stream_batch_locked(rpc_call *c, const grpc_op *ops, size_t n) {
    grpc_call *call = c->call;
    TSAN_RELEASE(c);
    grpc_call_error e = grpc_call_start_batch(call, ops, n, &c->tag, NULL);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "start stream batch: error %d", (int)e);
        c->main_busy = false;
        grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL, "eplbd could not continue the stream", NULL);
    }
}

/* End the stream with status (its message when not OK).  Caller holds
 * stream_lock; no main batch is in flight. */
static void stream_finish_locked(rpc_call *c, int status, const char *message) {
    c->finishing = true;
    c->main_busy = true;
    c->status = status;
    snprintf(c->message, sizeof c->message, "%s", status == GRPC_STATUS_OK ? "" : message);
    grpc_slice_unref(c->status_details);
    c->status_details = grpc_slice_from_copied_string(c->message);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op.data.send_status_from_server.status = (grpc_status_code)status;
    op.data.send_status_from_server.status_details = status == GRPC_STATUS_OK ? NULL : &c->status_details;
    stream_batch_locked(c, &op, 1);
}

/* Send body as one message (and, for bidi, receive the next).  Caller
 * holds stream_lock; no main batch is in flight. */
static void stream_send_locked(rpc_call *c, const char *body, size_t len, bool receive) {
    grpc_slice slice = grpc_slice_from_copied_buffer(body, len);
    if (c->response)
        grpc_byte_buffer_destroy(c->response);
    c->response = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    if (c->request) {
        grpc_byte_buffer_destroy(c->request);
        c->request = NULL;
    }
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_MESSAGE;
    ops[0].data.send_message.send_message = c->response;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->request;
    c->main_busy = true;
    c->messages++;
    stream_batch_locked(c, ops, receive ? 2 : 1);
}

/* Free the stream if it is over.  Caller holds stream_lock; returns true
 * when the caller must call call_finished(c) after unlocking. */
static bool stream_maybe_free_locked(rpc_call *c) {
    rpc_server *s = c->server;
    if (c->freeing || !c->close_done || c->main_busy)
        return false;
    c->freeing = true;
    if (c->stream_prev)
        c->stream_prev->stream_next = c->stream_next;
    else
        s->streams = c->stream_next;
    if (c->stream_next)
        c->stream_next->stream_prev = c->stream_prev;
    s->num_streams--;
    if (!c->finishing) { /* never sent a status: the client went away */
        c->status = GRPC_STATUS_CANCELLED;
        snprintf(c->message, sizeof c->message, "the client cancelled the stream after %llu message(s)",
                 (unsigned long long)c->messages);
    }
    return true;
}

/* The health statuses now: [0] for "", [1] for eplb.v1.ExpertBalancer. */
static void health_now(rpc_server *s, int st[2]) {
    st[0] = rpc_health_status(s->ctx, "", 0);
    st[1] = rpc_health_status(s->ctx, RPC_HEALTH_SERVICE, sizeof RPC_HEALTH_SERVICE - 1);
}

static int watch_status(const rpc_call *c, const int st[2]) {
    if (c->service_len == 0)
        return st[0];
    if (c->service_len == sizeof RPC_HEALTH_SERVICE - 1 && memcmp(c->service, RPC_HEALTH_SERVICE, c->service_len) == 0)
        return st[1];
    return RPC_HEALTH_SERVICE_UNKNOWN;
}

/* A watcher with nothing in flight: send its status if it changed; once
 * shutting down and the last status is out, finish.  Caller holds
 * stream_lock. */
static void watch_update_locked(rpc_call *c, const int st[2]) {
    rpc_server *s = c->server;
    if (c->main_busy || c->finishing || c->close_done)
        return;
    int now = watch_status(c, st);
    if (now != c->sent_status) {
        /* HealthCheckResponse { status = now }: field 1, varint. */
        char body[2] = { 0x08, (char)now };
        c->sent_status = now;
        stream_send_locked(c, body, sizeof body, false);
    } else if (atomic_load(&s->shutting_down)) {
        stream_finish_locked(c, GRPC_STATUS_UNAVAILABLE, "eplbd is shutting down");
    }
}

/* Health may have changed: push it to every idle watcher.  Cheap when
 * nobody watches (one lock, one test) or nothing changed. */
static void health_notify(rpc_server *s) {
    pthread_mutex_lock(&s->stream_lock);
    bool any = s->num_streams > 0;
    pthread_mutex_unlock(&s->stream_lock);
    if (!any)
        return;
    int st[2];
    health_now(s, st);
    pthread_mutex_lock(&s->stream_lock);
    bool changed = st[0] != s->last_health[0] || st[1] != s->last_health[1] || atomic_load(&s->shutting_down);
    s->last_health[0] = st[0];
    s->last_health[1] = st[1];
    for (rpc_call *c = s->streams; changed && c; c = c->stream_next)
        if (c->stream == STREAM_WATCH)
            watch_update_locked(c, st);
    pthread_mutex_unlock(&s->stream_lock);
}

/* bidi: answer the message in hand (c->request), or finish on the
 * client's half-close.  Runs the handler on this CQ thread (reflection:
 * microseconds).  Caller holds stream_lock. */
static void bidi_step_locked(rpc_call *c) {
    rpc_server *s = c->server;
    if (c->main_busy || c->finishing || c->close_done)
        return;
    if (!c->request) {
        stream_finish_locked(c, GRPC_STATUS_OK, "");
        return;
    }
    if (atomic_load(&s->shutting_down)) {
        stream_finish_locked(c, GRPC_STATUS_UNAVAILABLE, "eplbd is shutting down");
        return;
    }
    /* A reflection request names a file or a symbol: a few hundred bytes.
     * Bounded, so one client cannot hold this CQ thread and stream_lock
     * copying and parsing megabytes. */
    if (grpc_byte_buffer_length(c->request) > RPC_STREAM_MESSAGE_MAX) {
        stream_finish_locked(c, GRPC_STATUS_RESOURCE_EXHAUSTED,
                             "a ServerReflectionRequest is at most 64 KiB");
        return;
    }
    rpc_reply reply;
    memset(&reply, 0, sizeof reply);
    upb_Arena *arena = upb_Arena_New();
    size_t len;
    const char *bytes = arena ? request_bytes(c->request, arena, &len) : NULL;
    if (!bytes)
        rpc_reply_set(&reply, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory reading the request");
    else
        c->m->handler(s->ctx, arena, bytes, len, &reply);
    if (reply.status == GRPC_STATUS_OK)
        stream_send_locked(c, reply.body, reply.body_len, true);
    else
        stream_finish_locked(c, reply.status, reply.message);
    if (arena)
        upb_Arena_Free(arena);
}

/* The first message is in: take the stream over. */
static void stream_start(rpc_call *c) {
    rpc_server *s = c->server;
    c->state = CALL_STREAMING;
    c->stream = c->m->stream;
    int st[2] = { 0, 0 };
    if (c->stream == STREAM_WATCH) {
        health_now(s, st);
        /* HealthCheckRequest { string service = 1; } */
        upb_Arena *arena = upb_Arena_New();
        size_t len;
        const char *bytes = arena ? request_bytes(c->request, arena, &len) : NULL;
        const grpc_health_v1_HealthCheckRequest *m =
            bytes ? grpc_health_v1_HealthCheckRequest_parse(bytes, len, arena) : NULL;
        if (m) {
            upb_StringView v = grpc_health_v1_HealthCheckRequest_service(m);
            c->service_len = v.size;
            if (v.size)
                memcpy(c->service, v.data, v.size < sizeof c->service ? v.size : sizeof c->service);
        } else {
            c->stream = STREAM_NONE; /* finish below */
        }
        if (arena)
            upb_Arena_Free(arena);
    }

    pthread_mutex_lock(&s->stream_lock);
    c->stream_next = s->streams;
    if (s->streams)
        s->streams->stream_prev = c;
    s->streams = c;
    s->num_streams++;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    grpc_call *call = c->call;
    TSAN_RELEASE(c);
    grpc_call_error e = grpc_call_start_batch(call, &op, 1, &c->close_tag, NULL);
    if (e != GRPC_CALL_OK) {
        rpc_log(RPC_LOG_ERROR, "start stream close batch: error %d", (int)e);
        c->close_done = true; /* nothing will complete it */
        grpc_call_cancel_with_status(call, GRPC_STATUS_INTERNAL, "eplbd could not start the stream", NULL);
        bool done = stream_maybe_free_locked(c);
        pthread_mutex_unlock(&s->stream_lock);
        if (done)
            call_finished(c, 1);
        return;
    }
    if (s->num_streams > RPC_MAX_STREAMS)
        stream_finish_locked(c, GRPC_STATUS_RESOURCE_EXHAUSTED,
                             "too many open Watch/reflection streams (the limit is 1024): close some");
    else if (c->m->stream == STREAM_WATCH && c->stream == STREAM_NONE)
        stream_finish_locked(c, GRPC_STATUS_INVALID_ARGUMENT, "request is not a valid grpc.health.v1.HealthCheckRequest message");
    else if (c->stream == STREAM_WATCH)
        watch_update_locked(c, st);
    else
        bidi_step_locked(c);
    pthread_mutex_unlock(&s->stream_lock);
}

/* A main batch of a stream completed. */
static void stream_on_main(rpc_call *c, int ok) {
    rpc_server *s = c->server;
    pthread_mutex_lock(&s->stream_lock);
    c->main_busy = false;
    if (!ok && !c->close_done)
        grpc_call_cancel(c->call, NULL); /* the client is gone: end the call */
    bool done = stream_maybe_free_locked(c);
    bool watch = !done && ok && !c->finishing && c->stream == STREAM_WATCH;
    if (!done && ok && !c->finishing && c->stream != STREAM_WATCH)
        bidi_step_locked(c);
    pthread_mutex_unlock(&s->stream_lock);
    if (done) {
        call_finished(c, c->cancelled);
        return;
    }
    if (watch) {
        /* Statuses read after main_busy was cleared: a notify that ran
         * while this send was in flight skipped this watcher, and what it
         * saw is what health_now sees now (or newer). */
        int st[2];
        health_now(s, st);
        pthread_mutex_lock(&s->stream_lock);
        watch_update_locked(c, st);
        pthread_mutex_unlock(&s->stream_lock);
    }
}

/* The stream's RECV_CLOSE_ON_SERVER completed: the call is over. */
static void stream_on_close(rpc_call *c) {
    rpc_server *s = c->server;
    pthread_mutex_lock(&s->stream_lock);
    c->close_done = true;
    bool done = stream_maybe_free_locked(c);
    pthread_mutex_unlock(&s->stream_lock);
    if (done)
        call_finished(c, c->cancelled);
}

/* Shutdown began: watchers get NOT_SERVING and finish; idle reflection
 * streams (waiting for the client's next message) are cancelled, so
 * neither holds the drain. */
static void streams_shutdown(rpc_server *s) {
    health_notify(s);
    pthread_mutex_lock(&s->stream_lock);
    for (rpc_call *c = s->streams; c; c = c->stream_next)
        if (c->stream != STREAM_WATCH && !c->finishing && !c->close_done)
            grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE, "eplbd is shutting down", NULL);
    pthread_mutex_unlock(&s->stream_lock);
}

/* A CQ thread: advance call state machines; runs only inline handlers. */
static void *cq_main(void *arg) {
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
        rpc_tag *t = ev.tag;
        rpc_call *c = t->call;
        TSAN_ACQUIRE(c);
        if (t->kind == TAG_CLOSE) {
            stream_on_close(c);
            continue;
        }
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
        case CALL_STREAMING:
            stream_on_main(c, ev.success);
            break;
        case CALL_QUEUED:
        case CALL_HANDLING:
            /* No batch is in flight in these states. */
            rpc_log(RPC_LOG_ERROR, "completion for a call in state %d: ignored", (int)c->state);
            break;
        }
    }
    return NULL;
}

/* A pool thread: run queued handlers until the queue is closed and empty. */
static void *pool_main(void *arg) {
    rpc_pool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->head && !p->closed)
            pthread_cond_wait(&p->cond, &p->lock);
        rpc_call *c = p->head;
        if (c) {
            p->head = c->next;
            if (!p->head)
                p->tail = NULL;
        }
        pthread_mutex_unlock(&p->lock);
        if (!c)
            break; /* closed and empty */
        call_handle(c);
    }
    return NULL;
}

/* ---- lifecycle --------------------------------------------------------- */

static void pool_init(rpc_pool *p, const char *name) {
    p->name = name;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
}

/* Start up to n threads; returns how many started. */
static int pool_start(rpc_pool *p, int n) {
    p->threads = calloc((size_t)n, sizeof *p->threads);
    for (; p->threads && p->num_threads < n; p->num_threads++)
        if (pthread_create(&p->threads[p->num_threads], NULL, pool_main, p) != 0)
            break;
    if (p->num_threads < n)
        rpc_log(RPC_LOG_WARN, "started %d of %d %s threads", p->num_threads, n, p->name);
    return p->num_threads;
}

static void pool_join(rpc_pool *p) {
    pthread_mutex_lock(&p->lock);
    p->closed = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->num_threads; i++)
        pthread_join(p->threads[i], NULL);
    p->num_threads = 0;
}

static void pool_destroy(rpc_pool *p) {
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p->threads);
}

static void join_workers(rpc_server *s) {
    for (int i = 0; i < NUM_POOLS; i++)
        pool_join(&s->pools[i]);
}

static void server_free(rpc_server *s) {
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->stream_lock);
    pthread_cond_destroy(&s->cond);
    for (int i = 0; i < NUM_POOLS; i++)
        pool_destroy(&s->pools[i]);
    free(s);
}

/* Start failed with no CQ thread running and no slot posted: the shutdown
 * tag is the only event; take it here. */
static void server_abort_start(rpc_server *s) {
    atomic_store(&s->shutting_down, true);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    grpc_server_cancel_all_calls(s->server);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->shutdown_tag)
            break;
    }
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    join_workers(s);
    server_free(s);
}

eplb_status rpc_server_start(const rpc_server_config *cfg, rpc_context *ctx, rpc_server **out,
                             int *bound_port, eplb_error *err) {
    *out = NULL;
    rpc_server *s = calloc(1, sizeof *s);
    if (!s)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    s->ctx = ctx;
    int workers = cfg->workers > 0 ? cfg->workers : 1;
    s->delay_method = cfg->test_delay_method;
    s->delay_ms = cfg->test_delay_ms;
    atomic_init(&s->shutting_down, false);
    atomic_init(&s->cancelling, false);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->stream_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &ca);
    pthread_condattr_destroy(&ca);
    pool_init(&s->pools[LANE_READ - 1], "reader");
    pool_init(&s->pools[LANE_WORK - 1], "worker");

    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = cfg->max_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = cfg->max_message_bytes;
    /* gRPC sets SO_REUSEPORT by default: a second eplbd on the same port
     * would bind too and take half the connections.  The port is ours. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    grpc_channel_args channel_args = { .num_args = 3, .args = args };

    s->server = grpc_server_create(&channel_args, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    bool tls = cfg->tls_cert_pem && cfg->tls_key_pem;
    grpc_server_credentials *creds;
    if (tls) {
        grpc_ssl_pem_key_cert_pair pair = { .private_key = cfg->tls_key_pem, .cert_chain = cfg->tls_cert_pem };
        creds = grpc_ssl_server_credentials_create_ex(
            cfg->tls_client_ca_pem, &pair, 1,
            cfg->tls_client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                   : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    } else {
        creds = grpc_insecure_server_credentials_create();
    }
    int port = creds ? grpc_server_add_http2_port(s->server, cfg->listen, creds) : 0;
    if (creds)
        grpc_server_credentials_release(creds);
    if (port == 0) {
        grpc_server_destroy(s->server);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        s->server = NULL;
        grpc_completion_queue_destroy(s->cq);
        pthread_mutex_destroy(&s->lock);
        pthread_mutex_destroy(&s->stream_lock);
        pthread_cond_destroy(&s->cond);
        for (int i = 0; i < NUM_POOLS; i++)
            pool_destroy(&s->pools[i]);
        free(s);
        return eplb_error_set(err, EPLB_EUNAVAILABLE,
                              "cannot listen on %s: the address is in use (another eplbd?) or not valid here%s",
                              cfg->listen, tls ? ", or the --tls-cert/--tls-key/--tls-client-ca PEM is not valid" : "");
    }
    grpc_server_start(s->server);

    /* Threads first, slots last: until a slot is posted the shutdown tag is
     * the only event the queue can deliver (server_abort_start). */
    for (; s->num_cq_threads < RPC_CQ_THREADS; s->num_cq_threads++)
        if (pthread_create(&s->cq_threads[s->num_cq_threads], NULL, cq_main, s) != 0)
            break;
    if (s->num_cq_threads == 0) {
        server_abort_start(s);
        return eplb_error_set(err, EPLB_EINTERNAL, "cannot start completion-queue threads");
    }
    int started = pool_start(&s->pools[LANE_WORK - 1], workers);
    if (started == 0 || pool_start(&s->pools[LANE_READ - 1], RPC_READ_THREADS) == 0) {
        rpc_server_stop(s, 0);
        return eplb_error_set(err, EPLB_EINTERNAL, "cannot start worker threads");
    }
    int slots = 2 * (started + RPC_READ_THREADS) + RPC_SLOTS_MARGIN;
    for (int i = 0; i < slots; i++)
        call_request(s);
    *bound_port = strncmp(cfg->listen, "unix:", 5) == 0 ? 0 : port;
    *out = s;
    return EPLB_OK;
}

/* Wait until the shutdown tag arrived and no call object is left, up to
 * deadline (NULL: no limit).  Returns 1 when drained. */
static int wait_drained(rpc_server *s, const struct timespec *deadline) {
    pthread_mutex_lock(&s->lock);
    while (!(s->shutdown_done && s->slots + s->calls == 0))
        if (deadline ? pthread_cond_timedwait(&s->cond, &s->lock, deadline) != 0
                     : pthread_cond_wait(&s->cond, &s->lock) != 0)
            break;
    int drained = s->shutdown_done && s->slots + s->calls == 0;
    pthread_mutex_unlock(&s->lock);
    return drained;
}

void rpc_server_stop(rpc_server *s, int drain_ms) {
    if (!s)
        return;
    struct timespec t0, deadline;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    s->drain_ms = drain_ms;
    atomic_store(&s->shutting_down, true);
    atomic_store(&s->ctx->serving, false);
    pthread_mutex_lock(&s->lock);
    int in_flight = s->calls;
    pthread_mutex_unlock(&s->lock);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    streams_shutdown(s);
    rpc_log(RPC_LOG_INFO, "draining: %d call(s) in flight, up to %d ms; new connections are refused",
            in_flight, drain_ms);

    deadline = t0;
    deadline.tv_sec += drain_ms / 1000;
    deadline.tv_nsec += (long)(drain_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    if (!wait_drained(s, &deadline)) {
        pthread_mutex_lock(&s->lock);
        int left = s->calls;
        pthread_mutex_unlock(&s->lock);
        rpc_log(RPC_LOG_WARN,
                "drain time (%d ms) is over: cancelling %d call(s) still queued or running; "
                "waiting for running handlers to return", drain_ms, left);
        atomic_store(&s->cancelling, true);
        grpc_server_cancel_all_calls(s->server);
        wait_drained(s, NULL);
    }
    /* Every call is freed and the shutdown tag is in: nothing can start a
     * batch any more, so the queue may shut down. */
    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->num_cq_threads; i++)
        pthread_join(s->cq_threads[i], NULL);
    join_workers(s);
    pthread_mutex_lock(&s->lock);
    int completed = s->drain_completed, cancelled = s->drain_cancelled;
    pthread_mutex_unlock(&s->lock);
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    rpc_log(RPC_LOG_INFO, "drained in %.0f ms: %d call(s) in flight, %d completed, %d cancelled",
            (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6, in_flight,
            completed, cancelled);
    server_free(s);
}
