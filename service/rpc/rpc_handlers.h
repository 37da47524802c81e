/* rpc_handlers.h -- what every RPC handler sees and returns.
 *
 * A handler decodes its request with upb into the call's arena, calls the
 * core, and encodes the response into the same arena (freed once, by the
 * server, when the call ends).  Core errors become gRPC statuses here and
 * nowhere else. */
#ifndef RPC_HANDLERS_H
#define RPC_HANDLERS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eplb_registry.h"
#include "eplb_status.h"
#include "upb/arena.h"

#define RPC_MAX_SHM_UIDS 16

struct rpc_call_record; /* rpc_log.h */

typedef struct rpc_context {
    eplb_registry *registry;
    eplb_limits limits;
    atomic_bool serving;  /* false while draining: health says NOT_SERVING */
    const char *default_backend; /* AttachWeights without a backend: "auto", "cpu", "hip" */
    /* Trust boundary of AttachWeights (docs/deploy.md): shm objects only
     * under shm_prefix (--shm-prefix, default "/eplb-"), owned by the
     * server's uid or one of shm_uids (--shm-allow-uid, repeatable); weight
     * attachments only from a unix-socket or loopback peer unless
     * allow_remote_weights (--allow-remote-weights). */
    const char *shm_prefix;
    uint32_t shm_uids[RPC_MAX_SHM_UIDS];
    size_t num_shm_uids;
    bool allow_remote_weights;
    /* Staging a weight move may hold per GPU (--max-staging-mib); 0: no
     * bound.  A layer that needs more is moved in chunks (rpc_weights.c). */
    uint64_t max_staging_bytes;
    /* Called once per finished call, on a CQ thread, after its log line
     * (the metrics, rpc_metrics.h).  Must not block.  NULL: none. */
    void (*on_call)(void *arg, const struct rpc_call_record *rec);
    void *on_call_arg;
} rpc_context;

/* What a call did, for its log line and the metrics (rpc_call_log.h):
 * handlers fill what applies; zero means "not known / not applicable". */
typedef struct rpc_call_facts {
    /* The model the request names, as sent (possibly invalid: a refused
     * name is logged too; escaped by the log writer), truncated. */
    char model_id[EPLB_MODEL_NAME_MAX + 1];
    bool rebalance;                   /* a placement was computed (Rebalance, automatic) */
    bool committed;                   /* ... and committed */
    double balancedness_before;
    double balancedness_after;
    uint64_t experts_moved;           /* slots whose expert changes */
    uint64_t bytes_moved;             /* weight bytes copied */
    double compute_ms;                /* policy + preservation */
    double move_ms;                   /* weight move */
    uint64_t epoch;                   /* the model's epoch after the call (0: unknown) */
    uint32_t num_layers;              /* shape of what was computed or sent (debug log) */
    uint32_t num_physical;
    uint64_t response_bytes;          /* encoded response size */
} rpc_call_facts;

typedef struct rpc_reply {
    /* In: the caller's address as gRPC names it ("ipv4:127.0.0.1:51234",
     * "ipv6:[::1]:5000", "unix:/run/eplbd.sock", "unix-abstract:..."), set
     * by the server before the handler runs; NULL in fuzzers and tests. */
    const char *peer;
    int status;                       /* grpc_status_code */
    char message[EPLB_ERROR_MSG_MAX]; /* status details when not OK */
    const char *body;                 /* response bytes (arena) when OK */
    size_t body_len;
    rpc_call_facts facts;             /* out: for the log and metrics */
} rpc_reply;

typedef void (*rpc_handler_fn)(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                               rpc_reply *out);

/* Fill out with a status and message (status 0 is OK). */
void rpc_reply_set(rpc_reply *out, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void rpc_reply_from_error(rpc_reply *out, const eplb_error *err);

/* Note the model a request names (raw bytes, truncated) in out->facts. */
void rpc_reply_note_model(rpc_reply *out, const char *data, size_t len);

/* The request could not be decoded (INVALID_ARGUMENT). */
void rpc_reply_malformed(rpc_reply *out, const char *message_type);

void rpc_register_model(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_get_placement(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_setup_from_mapping(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_continue_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_record_load(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
/* Engine-executed rebalances (rpc_transfer.c). */
void rpc_get_transfer_plan(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_commit_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_abort_rebalance(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_attach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_detach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_list_models(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_delete_model(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
void rpc_health_check(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);
/* One message of a grpc.reflection.v1[alpha] ServerReflectionInfo stream
 * (rpc_reflection.c); the stream itself is rpc_server.c's. */
void rpc_server_reflection_info(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out);

#endif
