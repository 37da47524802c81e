/* rpc_reflection.c -- gRPC server reflection (grpc.reflection.v1 and
 * v1alpha ServerReflection/ServerReflectionInfo), so generic tools
 * (grpcurl, grpc_cli, Postman, Kreya) can list eplbd's services and fetch
 * their descriptors without a copy of protos/.
 *
 * The stream is bidirectional; rpc_server.c runs it and calls
 * rpc_server_reflection_info once per request message.  v1 and v1alpha
 * have the same messages with the same field numbers, so one handler
 * answers both (the bytes are the same on the wire).
 *
 * The descriptors are the ones compiled in (the upbdefs of protos/ and of
 * Debian's grpc-proto files): serialized FileDescriptorProtos, served as
 * they are.  A def pool built once (pthread_once) maps symbols to files;
 * it is never changed afterwards, so lookups from several threads need no
 * lock.  Cost per request: a hash lookup plus copying the descriptor
 * bytes' views into the response (the bytes themselves are static). */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "eplb/v1/eplb.upbdefs.h"
#include "grpc/health/v1/health.upbdefs.h"
#include "grpc/reflection/v1/reflection.upb.h"
#include "grpc/reflection/v1/reflection.upbdefs.h"
#include "grpc/reflection/v1alpha/reflection.upbdefs.h"
#include "rpc_handlers.h"
#include "rpc_log.h"
#include "upb/def.h"

/* The files reflection knows, and the services eplbd serves (in
 * ListServices order).  None of the files imports another. */
static _upb_DefPool_Init *const files[] = {
    &eplb_v1_eplb_proto_upbdefinit,
    &grpc_health_v1_health_proto_upbdefinit,
    &grpc_reflection_v1_reflection_proto_upbdefinit,
    &grpc_reflection_v1alpha_reflection_proto_upbdefinit,
};
static const char *const services[] = {
    "eplb.v1.ExpertBalancer",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static upb_DefPool *pool; /* NULL: could not be built (out of memory) */

static void pool_build(void) {
    upb_DefPool *p = upb_DefPool_New();
    if (!p)
        return;
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        if (!_upb_DefPool_LoadDefInit(p, files[i])) {
            upb_DefPool_Free(p);
            return;
        }
    pool = p;
}

static const _upb_DefPool_Init *file_by_name(const char *name) {
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        if (strcmp(files[i]->filename, name) == 0)
            return files[i];
    return NULL;
}

/* The file defining symbol: a message, enum, enum value, service, or a
 * service's method / a message's field (pool lookups know no methods or
 * fields: strip the last component and check it exists). */
static const upb_FileDef *file_of_symbol(const char *sym) {
    const upb_FileDef *f = upb_DefPool_FindFileContainingSymbol(pool, sym);
    if (f)
        return f;
    const char *dot = strrchr(sym, '.');
    if (!dot || dot == sym || !dot[1])
        return NULL;
    char parent[512];
    size_t n = (size_t)(dot - sym);
    if (n >= sizeof parent)
        return NULL;
    memcpy(parent, sym, n);
    parent[n] = '\0';
    const upb_ServiceDef *svc = upb_DefPool_FindServiceByName(pool, parent);
    if (svc)
        return upb_ServiceDef_FindMethodByName(svc, dot + 1) ? upb_ServiceDef_File(svc) : NULL;
    const upb_MessageDef *msg = upb_DefPool_FindMessageByName(pool, parent);
    if (msg)
        return upb_MessageDef_FindByName(msg, dot + 1, NULL, NULL) ? upb_MessageDef_File(msg) : NULL;
    return NULL;
}

static void set_error(grpc_reflection_v1_ServerReflectionResponse *resp, int code, const char *msg,
                      upb_Arena *arena) {
    grpc_reflection_v1_ErrorResponse *e = grpc_reflection_v1_ServerReflectionResponse_mutable_error_response(resp, arena);
    if (!e)
        return;
    grpc_reflection_v1_ErrorResponse_set_error_code(e, code);
    size_t n = strlen(msg);
    char *copy = upb_Arena_Malloc(arena, n + 1);
    if (copy) {
        memcpy(copy, msg, n + 1);
        grpc_reflection_v1_ErrorResponse_set_error_message(e, upb_StringView_FromDataAndSize(copy, n));
    }
}

/* How much of s to print in at most max bytes: cut at a UTF-8 character
 * boundary (an error message is a proto3 string: a cut character would
 * make the whole response undecodable). */
static int utf8_cut(const char *s, size_t max) {
    size_t n = strlen(s);
    return (int)(n <= max ? n : rpc_utf8_trim_tail(s, max));
}

/* A NUL-terminated, bounded copy of a request string, or NULL. */
static const char *arg_string(upb_StringView v, upb_Arena *arena) {
    if (v.size == 0 || v.size > 1024 || memchr(v.data, '\0', v.size))
        return NULL;
    char *s = upb_Arena_Malloc(arena, v.size + 1);
    if (s) {
        memcpy(s, v.data, v.size);
        s[v.size] = '\0';
    }
    return s;
}

void rpc_server_reflection_info(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len,
                                rpc_reply *out) {
    (void)ctx;
    const grpc_reflection_v1_ServerReflectionRequest *m =
        grpc_reflection_v1_ServerReflectionRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "grpc.reflection.v1.ServerReflectionRequest");
        return;
    }
    pthread_once(&pool_once, pool_build);
    if (!pool) {
        rpc_reply_set(out, 14, "reflection is unavailable: out of memory building its descriptor pool");
        return;
    }
    grpc_reflection_v1_ServerReflectionResponse *resp = grpc_reflection_v1_ServerReflectionResponse_new(arena);
    if (!resp) {
        rpc_reply_set(out, 8, "out of memory building the response");
        return;
    }
    grpc_reflection_v1_ServerReflectionResponse_set_valid_host(resp, grpc_reflection_v1_ServerReflectionRequest_host(m));
    grpc_reflection_v1_ServerReflectionResponse_set_original_request(
        resp, (grpc_reflection_v1_ServerReflectionRequest *)m);

    char msg[EPLB_ERROR_MSG_MAX];
    const char *file = NULL; /* descriptor to send */
    switch (grpc_reflection_v1_ServerReflectionRequest_message_request_case(m)) {
    case grpc_reflection_v1_ServerReflectionRequest_message_request_list_services: {
        grpc_reflection_v1_ListServiceResponse *l =
            grpc_reflection_v1_ServerReflectionResponse_mutable_list_services_response(resp, arena);
        for (size_t i = 0; l && i < sizeof services / sizeof services[0]; i++) {
            grpc_reflection_v1_ServiceResponse *s = grpc_reflection_v1_ListServiceResponse_add_service(l, arena);
            if (!s) {
                l = NULL;
                break;
            }
            grpc_reflection_v1_ServiceResponse_set_name(s, upb_StringView_FromString(services[i]));
        }
        if (!l) {
            rpc_reply_set(out, 8, "out of memory building the response");
            return;
        }
        break;
    }
    case grpc_reflection_v1_ServerReflectionRequest_message_request_file_by_filename: {
        const char *name = arg_string(grpc_reflection_v1_ServerReflectionRequest_file_by_filename(m), arena);
        if (name && file_by_name(name))
            file = name;
        else {
            const char *shown = name ? name : "(empty or not a file name)";
            snprintf(msg, sizeof msg, "unknown file %.*s", utf8_cut(shown, 200), shown);
            set_error(resp, 5, msg, arena);
        }
        break;
    }
    case grpc_reflection_v1_ServerReflectionRequest_message_request_file_containing_symbol: {
        const char *sym = arg_string(grpc_reflection_v1_ServerReflectionRequest_file_containing_symbol(m), arena);
        const upb_FileDef *f = sym ? file_of_symbol(sym) : NULL;
        if (f)
            file = upb_FileDef_Name(f);
        else {
            const char *shown = sym ? sym : "(empty)";
            snprintf(msg, sizeof msg, "unknown symbol %.*s", utf8_cut(shown, 200), shown);
            set_error(resp, 5, msg, arena);
        }
        break;
    }
    case grpc_reflection_v1_ServerReflectionRequest_message_request_file_containing_extension: {
        set_error(resp, 5, "eplbd's protos define no extensions", arena);
        break;
    }
    case grpc_reflection_v1_ServerReflectionRequest_message_request_all_extension_numbers_of_type: {
        const char *type = arg_string(grpc_reflection_v1_ServerReflectionRequest_all_extension_numbers_of_type(m), arena);
        if (type && upb_DefPool_FindMessageByName(pool, type)) {
            grpc_reflection_v1_ExtensionNumberResponse *x =
                grpc_reflection_v1_ServerReflectionResponse_mutable_all_extension_numbers_response(resp, arena);
            if (!x) {
                rpc_reply_set(out, 8, "out of memory building the response");
                return;
            }
            grpc_reflection_v1_ExtensionNumberResponse_set_base_type_name(x, upb_StringView_FromString(
                upb_MessageDef_FullName(upb_DefPool_FindMessageByName(pool, type))));
        } else {
            const char *shown = type ? type : "(empty)";
            snprintf(msg, sizeof msg, "unknown message type %.*s", utf8_cut(shown, 200), shown);
            set_error(resp, 5, msg, arena);
        }
        break;
    }
    default:
        set_error(resp, 3, "the request names no known ServerReflectionRequest field", arena);
        break;
    }
    if (file) {
        const _upb_DefPool_Init *init = file_by_name(file);
        grpc_reflection_v1_FileDescriptorResponse *fd =
            grpc_reflection_v1_ServerReflectionResponse_mutable_file_descriptor_response(resp, arena);
        if (!init || !fd || !grpc_reflection_v1_FileDescriptorResponse_add_file_descriptor_proto(fd, init->descriptor, arena)) {
            rpc_reply_set(out, 8, "out of memory building the response");
            return;
        }
    }
    out->body = grpc_reflection_v1_ServerReflectionResponse_serialize(resp, arena, &out->body_len);
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
