/* eplbctl -- call eplbd from the shell: JSON in, JSON out.
 *
 * Requests are proto3 JSON (field names as in protos/eplb/v1/eplb.proto, or
 * their lowerCamel JSON names), given as an argument, "-" for stdin, or
 * "@file".  Responses are printed as JSON with proto field names.  Exit
 * status: 0 OK, 1 the RPC failed (status and message on stderr), 2 usage. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upbdefs.h"
#include "eplb_client.h"
#include "grpc/health/v1/health.upb.h"
#include "upb/decode.h"
#include "upb/encode.h"
#include "upb/json_decode.h"
#include "upb/json_encode.h"
#include "upb/reflection.h"

typedef const upb_MessageDef *(*msgdef_fn)(upb_DefPool *);

typedef struct command {
    const char *name;
    const char *method;     /* eplb.v1.ExpertBalancer/<method> */
    msgdef_fn request, response;
    const char *help;
} command;

static const command commands[] = {
    { "register", "RegisterModel", eplb_v1_RegisterModelRequest_getmsgdef,
      eplb_v1_RegisterModelResponse_getmsgdef, "register JSON       RegisterModelRequest" },
    { "get", "GetPlacement", eplb_v1_GetPlacementRequest_getmsgdef, eplb_v1_Placement_getmsgdef,
      "get MODEL_ID|JSON    GetPlacementRequest" },
    { "setup", "SetupFromMapping", eplb_v1_SetupFromMappingRequest_getmsgdef,
      eplb_v1_Placement_getmsgdef, "setup JSON          SetupFromMappingRequest" },
    { "rebalance", "Rebalance", eplb_v1_RebalanceRequest_getmsgdef,
      eplb_v1_RebalanceResponse_getmsgdef, "rebalance JSON      RebalanceRequest" },
    { "continue", "ContinueRebalance", eplb_v1_ContinueRebalanceRequest_getmsgdef,
      eplb_v1_RebalanceResponse_getmsgdef, "continue JSON       ContinueRebalanceRequest (the next step of a stepped rebalance)" },
    { "record-load", "RecordLoad", eplb_v1_RecordLoadRequest_getmsgdef,
      eplb_v1_RecordLoadResponse_getmsgdef, "record-load JSON    RecordLoadRequest" },
    { "attach", "AttachWeights", eplb_v1_AttachWeightsRequest_getmsgdef,
      eplb_v1_AttachWeightsResponse_getmsgdef, "attach JSON         AttachWeightsRequest" },
    { "detach", "DetachWeights", eplb_v1_DetachWeightsRequest_getmsgdef,
      eplb_v1_DetachWeightsResponse_getmsgdef, "detach JSON         DetachWeightsRequest" },
    { "list", "ListModels", eplb_v1_ListModelsRequest_getmsgdef, eplb_v1_ListModelsResponse_getmsgdef,
      "list [JSON]          ListModelsRequest" },
    { "delete", "DeleteModel", eplb_v1_DeleteModelRequest_getmsgdef, eplb_v1_DeleteModelResponse_getmsgdef,
      "delete MODEL_ID|JSON DeleteModelRequest (JSON for \"force\": true)" },
};

static void usage(FILE *f) {
    fprintf(f, "usage: eplbctl [--addr HOST:PORT|unix:PATH] [--timeout SECONDS] [TLS options] COMMAND [ARG]\n"
               "  --tls-ca PEM          CA of the server's certificate: use TLS\n"
               "  --tls-cert PEM        client certificate (mTLS; with --tls-key and --tls-ca)\n"
               "  --tls-key PEM         its private key\n"
               "  --tls-server-name N   name to check in the server's certificate (default: the host of --addr)\n"
               "  health [SERVICE]     grpc.health.v1.Health/Check\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %s\n", commands[i].help);
    fprintf(f, "JSON is an argument, - for stdin, or @FILE.  Default address: $EPLBD_ADDR or 127.0.0.1:50051.\n");
}

/* Read ARG: literal JSON, "-" (stdin) or "@file".  Returns malloc'd text. */
static char *read_arg(const char *arg, size_t *len) {
    FILE *f = NULL;
    if (strcmp(arg, "-") == 0)
        f = stdin;
    else if (arg[0] == '@' && !(f = fopen(arg + 1, "rb"))) {
        fprintf(stderr, "eplbctl: cannot open %s: %s\n", arg + 1, strerror(errno));
        return NULL;
    }
    if (!f) {
        *len = strlen(arg);
        return strdup(arg);
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        char *bigger = realloc(buf, cap *= 2);
        if (!bigger) {
            free(buf);
            buf = NULL;
        }
        buf = bigger;
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

static int print_json(const upb_Message *msg, const upb_MessageDef *md, const upb_DefPool *pool) {
    upb_Status status;
    upb_Status_Clear(&status);
    int opts = upb_JsonEncode_UseProtoNames | upb_JsonEncode_EmitDefaults;
    size_t n = upb_JsonEncode(msg, md, pool, opts, NULL, 0, &status);
    char *buf = malloc(n + 1);
    if (!buf || upb_JsonEncode(msg, md, pool, opts, buf, n + 1, &status) != n) {
        fprintf(stderr, "eplbctl: cannot encode the response as JSON: %s\n", upb_Status_ErrorMessage(&status));
        free(buf);
        return 1;
    }
    printf("%s\n", buf);
    free(buf);
    return 0;
}

static int report_status(const char *method, const eplb_call_result *r) {
    fprintf(stderr, "eplbctl: %s: %s: %s\n", method, eplb_grpc_status_name(r->status),
            r->message ? r->message : "");
    return 1;
}

static int do_health(eplb_client *client, const char *service, int timeout_ms) {
    upb_Arena *arena = upb_Arena_New();
    grpc_health_v1_HealthCheckRequest *req = grpc_health_v1_HealthCheckRequest_new(arena);
    grpc_health_v1_HealthCheckRequest_set_service(req, upb_StringView_FromString(service));
    size_t len;
    char *bytes = grpc_health_v1_HealthCheckRequest_serialize(req, arena, &len);
    eplb_call_result r;
    int rc = 1;
    if (eplb_client_call(client, "/grpc.health.v1.Health/Check", bytes, len, timeout_ms, &r) != 0) {
        fprintf(stderr, "eplbctl: cannot start the call\n");
    } else if (r.status != 0) {
        rc = report_status("Health/Check", &r);
    } else {
        grpc_health_v1_HealthCheckResponse *resp =
            grpc_health_v1_HealthCheckResponse_parse(r.body ? r.body : "", r.body_len, arena);
        int s = resp ? grpc_health_v1_HealthCheckResponse_status(resp) : -1;
        const char *name = s == 1 ? "SERVING" : s == 2 ? "NOT_SERVING" : s == 3 ? "SERVICE_UNKNOWN" : "UNKNOWN";
        printf("{\"status\": \"%s\"}\n", name);
        rc = s == 1 ? 0 : 1;
    }
    eplb_call_result_free(&r);
    upb_Arena_Free(arena);
    return rc;
}

static int do_command(eplb_client *client, const command *cmd, const char *arg, int timeout_ms) {
    upb_DefPool *pool = upb_DefPool_New();
    upb_Arena *arena = upb_Arena_New();
    const upb_MessageDef *req_md = cmd->request(pool), *resp_md = cmd->response(pool);
    int rc = 2;
    size_t json_len = 0;
    char *json = NULL;
    if (!arg) {
        json = strdup("{}"); /* "list": the empty request */
        json_len = json ? 2 : 0;
    } else if ((strcmp(cmd->name, "get") == 0 || strcmp(cmd->name, "delete") == 0) && arg[0] != '{' &&
               arg[0] != '-' && arg[0] != '@') {
        /* "get MODEL_ID", "delete MODEL_ID": build the one-field request. */
        size_t n = strlen(arg) + 32;
        json = malloc(n);
        if (json)
            json_len = (size_t)snprintf(json, n, "{\"model_id\": \"%s\"}", arg);
        if (strpbrk(arg, "\"\\")) {
            fprintf(stderr, "eplbctl: model id must not contain quotes or backslashes\n");
            goto out;
        }
    } else {
        json = read_arg(arg, &json_len);
    }
    if (!json)
        goto out;

    upb_Message *req = upb_Message_New(req_md, arena);
    upb_Status status;
    upb_Status_Clear(&status);
    if (!upb_JsonDecode(json, json_len, req, req_md, pool, 0, arena, &status)) {
        fprintf(stderr, "eplbctl: %s is not a valid %s: %s\n", arg && arg[0] == '@' ? arg + 1 : "the JSON",
                upb_MessageDef_FullName(req_md), upb_Status_ErrorMessage(&status));
        goto out;
    }
    char *bytes;
    size_t len;
    if (upb_Encode(req, upb_MessageDef_MiniTable(req_md), 0, arena, &bytes, &len) != kUpb_EncodeStatus_Ok) {
        fprintf(stderr, "eplbctl: cannot encode the request\n");
        goto out;
    }
    char method[128];
    snprintf(method, sizeof method, "/eplb.v1.ExpertBalancer/%s", cmd->method);
    eplb_call_result r;
    rc = 1;
    if (eplb_client_call(client, method, bytes, len, timeout_ms, &r) != 0) {
        fprintf(stderr, "eplbctl: cannot start the call\n");
        goto out;
    }
    if (r.status != 0) {
        rc = report_status(cmd->method, &r);
    } else {
        upb_Message *resp = upb_Message_New(resp_md, arena);
        if (upb_Decode(r.body ? r.body : "", r.body_len, resp, upb_MessageDef_MiniTable(resp_md), NULL, 0,
                       arena) != kUpb_DecodeStatus_Ok)
            fprintf(stderr, "eplbctl: the response is not a valid %s\n", upb_MessageDef_FullName(resp_md));
        else
            rc = print_json(resp, resp_md, pool);
    }
    eplb_call_result_free(&r);
out:
    free(json);
    upb_Arena_Free(arena);
    upb_DefPool_Free(pool);
    return rc;
}

int main(int argc, char **argv) {
    const char *addr = getenv("EPLBD_ADDR");
    if (!addr || !*addr)
        addr = "127.0.0.1:50051";
    int timeout_ms = 30000;
    eplb_client_tls tls = { 0 };
    int i = 1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1] == '-'; i++) {
        if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--addr") == 0 && i + 1 < argc) {
            addr = argv[++i];
        } else if (strcmp(argv[i], "--tls-ca") == 0 && i + 1 < argc) {
            tls.ca_file = argv[++i];
        } else if (strcmp(argv[i], "--tls-cert") == 0 && i + 1 < argc) {
            tls.cert_file = argv[++i];
        } else if (strcmp(argv[i], "--tls-key") == 0 && i + 1 < argc) {
            tls.key_file = argv[++i];
        } else if (strcmp(argv[i], "--tls-server-name") == 0 && i + 1 < argc) {
            tls.server_name = argv[++i];
        } else if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
            double s = strtod(argv[++i], NULL);
            if (s <= 0 || s > 86400) {
                fprintf(stderr, "eplbctl: --timeout wants seconds in (0, 86400]\n");
                return 2;
            }
            timeout_ms = (int)(s * 1000);
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[i];
    const char *arg = i + 1 < argc ? argv[i + 1] : NULL;
    const command *cmd = NULL;
    for (size_t k = 0; k < sizeof commands / sizeof commands[0]; k++)
        if (strcmp(commands[k].name, name) == 0)
            cmd = &commands[k];
    if (strcmp(name, "health") != 0 && (!cmd || (!arg && strcmp(name, "list") != 0))) {
        usage(stderr);
        return 2;
    }
    bool use_tls = tls.ca_file || tls.cert_file || tls.key_file || tls.server_name;
    if (use_tls && !tls.ca_file) {
        fprintf(stderr, "eplbctl: --tls-cert, --tls-key and --tls-server-name need --tls-ca (the server's CA)\n");
        return 2;
    }
    if (!tls.cert_file != !tls.key_file) {
        fprintf(stderr, "eplbctl: --tls-cert and --tls-key go together\n");
        return 2;
    }
    const char *bad = NULL;
    eplb_client *client = eplb_client_open_tls(addr, use_tls ? &tls : NULL, &bad);
    if (!client && bad) {
        const char *flag = bad == tls.ca_file ? "--tls-ca" : bad == tls.cert_file ? "--tls-cert" : "--tls-key";
        fprintf(stderr, "eplbctl: %s %s: cannot read: %s\n", flag, bad, strerror(errno));
        return 2;
    }
    if (!client) {
        fprintf(stderr, "eplbctl: cannot open a channel to %s\n", addr);
        return 1;
    }
    int rc = cmd ? do_command(client, cmd, arg, timeout_ms) : do_health(client, arg ? arg : "", timeout_ms);
    eplb_client_close(client);
    return rc;
}
