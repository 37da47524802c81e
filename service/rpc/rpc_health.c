/* rpc_health.c -- grpc.health.v1.Health/Check, for Kubernetes' native gRPC
 * probes.  "" and "eplb.v1.ExpertBalancer" are known services; others are
 * NOT_FOUND, as the health protocol specifies.  Draining reports
 * NOT_SERVING so a load balancer stops sending new calls. */
#include <string.h>

#include "grpc/health/v1/health.upb.h"
#include "rpc_handlers.h"

void rpc_health_check(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                      rpc_reply *out) {
    const grpc_health_v1_HealthCheckRequest *m = grpc_health_v1_HealthCheckRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "grpc.health.v1.HealthCheckRequest");
        return;
    }
    upb_StringView service = grpc_health_v1_HealthCheckRequest_service(m);
    static const char known[] = "eplb.v1.ExpertBalancer";
    if (service.size != 0 &&
        !(service.size == sizeof known - 1 && memcmp(service.data, known, service.size) == 0)) {
        rpc_reply_set(out, 5, "unknown service %.*s", (int)(service.size > 128 ? 128 : service.size),
                      service.data);
        return;
    }
    grpc_health_v1_HealthCheckResponse *resp = grpc_health_v1_HealthCheckResponse_new(arena);
    if (resp) {
        grpc_health_v1_HealthCheckResponse_set_status(
            resp, atomic_load(&ctx->serving) ? grpc_health_v1_HealthCheckResponse_SERVING
                                             : grpc_health_v1_HealthCheckResponse_NOT_SERVING);
        out->body = grpc_health_v1_HealthCheckResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
