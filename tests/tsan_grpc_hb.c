/* tsan_grpc_hb.c -- tell ThreadSanitizer about the ordering gRPC's
 * completion queue guarantees.  Linked into eplbd in EPLB_SANITIZE=thread
 * builds only (CMakeLists.txt), with --wrap for the functions below.
 *
 * gRPC's C core promises that everything a thread did before it started a
 * batch (or request_call, or shutdown_and_notify) with a tag happens before
 * whatever the thread that receives that tag from the completion queue does
 * next.  Debian's libgrpc is not built with -fsanitize=thread, so TSan does
 * not see the atomics that keep that promise, and reports every field of
 * eplbd's per-call state (rpc_server.c: written before
 * grpc_call_start_batch on one worker, read after
 * grpc_completion_queue_next on another) as a race.  These wrappers state
 * the promise with TSan's annotations: release on the tag when it is
 * handed to gRPC, acquire on it when it comes back.  They add no ordering
 * gRPC does not provide and hide no access: a real race in eplbd's code
 * (two threads touching call state outside that hand-off) is still
 * reported. */
#include <grpc/grpc.h>

void __tsan_acquire(void *addr);
void __tsan_release(void *addr);

grpc_call_error __real_grpc_call_start_batch(grpc_call *call, const grpc_op *ops, size_t nops, void *tag,
                                             void *reserved);
grpc_call_error __wrap_grpc_call_start_batch(grpc_call *call, const grpc_op *ops, size_t nops, void *tag,
                                             void *reserved);
grpc_call_error __real_grpc_server_request_call(grpc_server *server, grpc_call **call, grpc_call_details *details,
                                                grpc_metadata_array *request_metadata,
                                                grpc_completion_queue *cq_bound_to_call,
                                                grpc_completion_queue *cq_for_notification, void *tag);
grpc_call_error __wrap_grpc_server_request_call(grpc_server *server, grpc_call **call, grpc_call_details *details,
                                                grpc_metadata_array *request_metadata,
                                                grpc_completion_queue *cq_bound_to_call,
                                                grpc_completion_queue *cq_for_notification, void *tag);
void __real_grpc_server_shutdown_and_notify(grpc_server *server, grpc_completion_queue *cq, void *tag);
void __wrap_grpc_server_shutdown_and_notify(grpc_server *server, grpc_completion_queue *cq, void *tag);
grpc_event __real_grpc_completion_queue_next(grpc_completion_queue *cq, gpr_timespec deadline, void *reserved);
grpc_event __wrap_grpc_completion_queue_next(grpc_completion_queue *cq, gpr_timespec deadline, void *reserved);
grpc_event __real_grpc_completion_queue_pluck(grpc_completion_queue *cq, void *tag, gpr_timespec deadline,
                                              void *reserved);
grpc_event __wrap_grpc_completion_queue_pluck(grpc_completion_queue *cq, void *tag, gpr_timespec deadline,
                                              void *reserved);

grpc_call_error __wrap_grpc_call_start_batch(grpc_call *call, const grpc_op *ops, size_t nops, void *tag,
                                             void *reserved) {
    __tsan_release(tag);
    return __real_grpc_call_start_batch(call, ops, nops, tag, reserved);
}

grpc_call_error __wrap_grpc_server_request_call(grpc_server *server, grpc_call **call, grpc_call_details *details,
                                                grpc_metadata_array *request_metadata,
                                                grpc_completion_queue *cq_bound_to_call,
                                                grpc_completion_queue *cq_for_notification, void *tag) {
    __tsan_release(tag);
    return __real_grpc_server_request_call(server, call, details, request_metadata, cq_bound_to_call,
                                           cq_for_notification, tag);
}

void __wrap_grpc_server_shutdown_and_notify(grpc_server *server, grpc_completion_queue *cq, void *tag) {
    __tsan_release(tag);
    __real_grpc_server_shutdown_and_notify(server, cq, tag);
}

grpc_event __wrap_grpc_completion_queue_next(grpc_completion_queue *cq, gpr_timespec deadline, void *reserved) {
    grpc_event ev = __real_grpc_completion_queue_next(cq, deadline, reserved);
    if (ev.type == GRPC_OP_COMPLETE)
        __tsan_acquire(ev.tag);
    return ev;
}

grpc_event __wrap_grpc_completion_queue_pluck(grpc_completion_queue *cq, void *tag, gpr_timespec deadline,
                                              void *reserved) {
    grpc_event ev = __real_grpc_completion_queue_pluck(cq, tag, deadline, reserved);
    if (ev.type == GRPC_OP_COMPLETE)
        __tsan_acquire(ev.tag);
    return ev;
}
