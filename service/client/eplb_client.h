/* eplb_client.h -- a minimal unary gRPC client over the C core: one request
 * of raw bytes in, status + message + raw response bytes out.  eplbctl and
 * the integration tests use it; it knows nothing of eplb's messages. */
#ifndef EPLB_CLIENT_H
#define EPLB_CLIENT_H

#include <stddef.h>

typedef struct eplb_client eplb_client;

typedef struct eplb_call_result {
    int status;      /* grpc_status_code */
    char *message;   /* status details (malloc'd, "" when none) */
    char *body;      /* response bytes (malloc'd), NULL when none */
    size_t body_len;
} eplb_call_result;

/* Open an insecure channel to target ("host:port" or "unix:/path"). */
eplb_client *eplb_client_open(const char *target);

/* TLS for eplb_client_open_tls: file names of PEM files. */
typedef struct eplb_client_tls {
    const char *ca_file;      /* CA that signed the server's certificate (required) */
    const char *cert_file;    /* client certificate chain for mTLS, or NULL */
    const char *key_file;     /* its private key (with cert_file), or NULL */
    const char *server_name;  /* name checked against the server's certificate instead of
                               * target's host, or NULL */
} eplb_client_tls;

/* Open a TLS channel (tls NULL: same as eplb_client_open).  NULL when a file
 * cannot be read (errno says why; *bad_file, when not NULL, is the name of
 * that file), when cert_file and key_file are not both given or both NULL,
 * or when the channel cannot be made. */
eplb_client *eplb_client_open_tls(const char *target, const eplb_client_tls *tls, const char **bad_file);
void eplb_client_close(eplb_client *c);

/* Call method ("/eplb.v1.ExpertBalancer/RegisterModel") with request bytes
 * and wait at most timeout_ms.  Returns 0 when the call completed (whatever
 * its status), -1 when it could not be started.  Free out with
 * eplb_call_result_free. */
int eplb_client_call(eplb_client *c, const char *method, const void *request, size_t len,
                     int timeout_ms, eplb_call_result *out);
void eplb_call_result_free(eplb_call_result *r);

/* "OK", "INVALID_ARGUMENT", ... for a grpc_status_code. */
const char *eplb_grpc_status_name(int status);

#endif
