/* rpc_health.h -- the health statuses grpc.health.v1 reports (Check and
 * Watch), computed in one place.
 *
 *   ""                        SERVING while eplbd runs; NOT_SERVING once it
 *                             drains (SIGTERM): what liveness/readiness
 *                             probes and load balancers should look at.
 *   "eplb.v1.ExpertBalancer"  also NOT_SERVING while any model cannot be
 *                             served as it is: NEEDS_RELOAD (a weight move
 *                             failed part-way or its buffers went away) or
 *                             a damaged stored row.  SERVING again once
 *                             the model is re-registered or deleted.
 *   anything else             SERVICE_UNKNOWN (Check answers NOT_FOUND). */
#ifndef RPC_HEALTH_H
#define RPC_HEALTH_H

#include <stddef.h>

#include "rpc_handlers.h"

/* grpc.health.v1.HealthCheckResponse.ServingStatus values. */
enum { RPC_HEALTH_SERVING = 1, RPC_HEALTH_NOT_SERVING = 2, RPC_HEALTH_SERVICE_UNKNOWN = 3 };

/* The status of service (len bytes) now.  Never waits for an operation;
 * O(models), no allocation: fine on a completion-queue thread. */
int rpc_health_status(rpc_context *ctx, const char *service, size_t len);

/* The service's name as the health protocol knows it. */
#define RPC_HEALTH_SERVICE "eplb.v1.ExpertBalancer"

#endif
