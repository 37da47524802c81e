/* rpc_server.h -- eplbd's gRPC server on the C core: one completion queue,
 * a pool of worker threads, one small state machine per call.
 *
 *   request_call --> RECV (initial metadata out, message in)
 *                --> handler (decode, core, encode; one upb arena)
 *                --> SENT (message, status, close) --> freed
 *
 * Shutdown drains: new calls are refused, in-flight calls finish (up to a
 * deadline, then they are cancelled), then the workers exit. */
#ifndef RPC_SERVER_H
#define RPC_SERVER_H

#include "rpc_handlers.h"

typedef struct rpc_server_config {
    const char *listen;          /* "host:port" or "unix:/path" */
    int workers;                 /* worker threads (>= 1) */
    int max_message_bytes;       /* receive and send limit */
} rpc_server_config;

typedef struct rpc_server rpc_server;

/* Bind and start serving ctx.  On success *bound_port is the TCP port
 * actually bound (useful with port 0), 0 for a unix socket.  On error *out
 * is NULL and err says what failed. */
eplb_status rpc_server_start(const rpc_server_config *cfg, rpc_context *ctx, rpc_server **out,
                             int *bound_port, eplb_error *err);

/* Stop accepting, let in-flight calls finish for up to drain_ms, cancel the
 * rest, join the workers and free the server.  ctx stays the caller's. */
void rpc_server_stop(rpc_server *s, int drain_ms);

#endif
