/* rpc_server.h -- eplbd's gRPC server on the C core: one completion queue
 * served by a few CQ threads, a pool of worker threads fed by a queue, one
 * small state machine per call.
 *
 *   request_call --> RECV (initial metadata out, message in)
 *                --> handler (decode, core, encode; one upb arena):
 *                    Health/Check and GetPlacement inline on the CQ thread,
 *                    every other method on a pool worker
 *                --> SENT (message, status, close) --> freed
 *
 * The CQ threads never run a long handler, so a full pool never delays
 * Health, GetPlacement or the posting of new request_call slots.
 *
 * Shutdown drains: new connections are refused, every call already
 * accepted (running or queued for a worker) finishes, up to a deadline;
 * then what is left is cancelled, the server waits for running handlers to
 * return, and only then shuts the completion queue down and frees. */
#ifndef RPC_SERVER_H
#define RPC_SERVER_H

#include "rpc_handlers.h"

typedef struct rpc_server_config {
    const char *listen;          /* "host:port" or "unix:/path" */
    int workers;                 /* pool threads that run handlers (>= 1) */
    int max_message_bytes;       /* receive and send limit */
    /* TLS (eplbd's --tls-cert, --tls-key, --tls-client-ca): PEM text, read
     * once at start (no reload).  tls_cert_pem and tls_key_pem both NULL:
     * plaintext.  tls_client_ca_pem set: every client must present a
     * certificate that verifies against it (mTLS). */
    const char *tls_cert_pem;
    const char *tls_key_pem;
    const char *tls_client_ca_pem;
    /* Tests only (eplbd's hidden --test-handler-delay-ms METHOD:MS): sleep
     * test_delay_ms before every handler of the method whose log name is
     * test_delay_method ("Rebalance", "RegisterModel", ...), on the thread
     * that runs it.  NULL: no delay. */
    const char *test_delay_method;
    int test_delay_ms;
} rpc_server_config;

typedef struct rpc_server rpc_server;

/* Is name the log name of a method ("RegisterModel", "Health/Check", ...)? */
bool rpc_server_method_known(const char *name);

/* Bind and start serving ctx.  The listening address is exclusive (no
 * SO_REUSEPORT): a second server on the same port fails here.  On success
 * *bound_port is the TCP port actually bound (useful with port 0), 0 for a
 * unix socket.  On error *out is NULL and err says what failed, naming the
 * address. */
eplb_status rpc_server_start(const rpc_server_config *cfg, rpc_context *ctx, rpc_server **out,
                             int *bound_port, eplb_error *err);

/* Stop accepting (new connections are refused, health says NOT_SERVING),
 * let every accepted call finish for up to drain_ms, then cancel the calls
 * still queued or running and wait for running handlers to return; join
 * the threads and free the server.  When it returns no handler runs and no
 * gRPC object of the server is left.  ctx stays the caller's. */
void rpc_server_stop(rpc_server *s, int drain_ms);

#endif
