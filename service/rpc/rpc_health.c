/* rpc_health.c -- grpc.health.v1.Health/Check, for Kubernetes' native gRPC
 * probes, and the status computation Watch (rpc_server.c) shares with it
 * (rpc_health.h says what each service name reports).  Unknown services
 * are NOT_FOUND for Check, as the health protocol specifies. */
#include "rpc_health.h"

#include <string.h>

#include "eplb_health.h"
#include "grpc/health/v1/health.upb.h"

int rpc_health_status(rpc_context *ctx, const char *service, size_t len) {
    bool whole = len == 0;
    if (!whole && !(len == sizeof RPC_HEALTH_SERVICE - 1 && memcmp(service, RPC_HEALTH_SERVICE, len) == 0))
        return RPC_HEALTH_SERVICE_UNKNOWN;
    if (!atomic_load(&ctx->serving))
        return RPC_HEALTH_NOT_SERVING;
    if (whole || !ctx->registry)
        return RPC_HEALTH_SERVING;
    eplb_health h;
    eplb_registry_health(ctx->registry, &h);
    return h.needs_reload || h.damaged ? RPC_HEALTH_NOT_SERVING : RPC_HEALTH_SERVING;
}

void rpc_health_check(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                      rpc_reply *out) {
    const grpc_health_v1_HealthCheckRequest *m = grpc_health_v1_HealthCheckRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "grpc.health.v1.HealthCheckRequest");
        return;
    }
    upb_StringView service = grpc_health_v1_HealthCheckRequest_service(m);
    int st = rpc_health_status(ctx, service.data, service.size);
    if (st == RPC_HEALTH_SERVICE_UNKNOWN) {
        rpc_reply_set(out, 5, "unknown service %.*s", (int)(service.size > 128 ? 128 : service.size),
                      service.data);
        return;
    }
    grpc_health_v1_HealthCheckResponse *resp = grpc_health_v1_HealthCheckResponse_new(arena);
    if (resp) {
        grpc_health_v1_HealthCheckResponse_set_status(resp, st);
        out->body = grpc_health_v1_HealthCheckResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
