/* eplbctl -- call eplbd from the shell: JSON in, JSON out.
 *
 * Requests are proto3 JSON (field names as in protos/eplb/v1/eplb.proto, or
 * their lowerCamel JSON names), given as an argument, "-" for stdin, or
 * "@file".  Responses are printed as JSON with proto field names; 64-bit
 * integers that fit in 2^53 are printed as numbers (proto3 JSON, and upb,
 * print them as strings).  --summary prints a short digest of a placement or
 * a rebalance instead of the whole map.  export / import read and write
 * placement files (SGLang's --init-expert-location JSON, vLLM's maps JSON).
 *
 * Exit status: 0 OK, 1 the RPC failed (status and message on stderr) or a
 * file does not fit the model, 2 usage (unknown command or option, missing
 * argument, JSON that does not parse), 3 a registration answered
 * "registered": false (unless --allow-unregistered). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb/v1/eplb.upbdefs.h"
#include "eplb_client.h"
#include "grpc/health/v1/health.upb.h"
#include "upb/decode.h"
#include "upb/def.h"
#include "upb/encode.h"
#include "upb/json_decode.h"
#include "upb/json_encode.h"
#include "upb/reflection.h"

#define EPLBCTL_VERSION "0.1.0"
#define VLLM_FORMAT "eplb-vllm-maps/1"
#define EXIT_UNREGISTERED 3

typedef const upb_MessageDef *(*msgdef_fn)(upb_DefPool *);

typedef struct command {
    const char *name;
    const char *method;     /* eplb.v1.ExpertBalancer/<method> */
    msgdef_fn request, response;
    const char *help;
} command;

static const command commands[] = {
    { "register", "RegisterModel", eplb_v1_RegisterModelRequest_getmsgdef,
      eplb_v1_RegisterModelResponse_getmsgdef, "register JSON        RegisterModelRequest (exit 3 when not registered)" },
    { "get", "GetPlacement", eplb_v1_GetPlacementRequest_getmsgdef, eplb_v1_Placement_getmsgdef,
      "get MODEL_ID|JSON    GetPlacementRequest" },
    { "setup", "SetupFromMapping", eplb_v1_SetupFromMappingRequest_getmsgdef,
      eplb_v1_Placement_getmsgdef, "setup JSON           SetupFromMappingRequest" },
    { "rebalance", "Rebalance", eplb_v1_RebalanceRequest_getmsgdef,
      eplb_v1_RebalanceResponse_getmsgdef, "rebalance JSON       RebalanceRequest" },
    { "continue", "ContinueRebalance", eplb_v1_ContinueRebalanceRequest_getmsgdef,
      eplb_v1_RebalanceResponse_getmsgdef, "continue JSON        ContinueRebalanceRequest (the next step of a stepped rebalance)" },
    { "transfer-plan", "GetTransferPlan", eplb_v1_GetTransferPlanRequest_getmsgdef, eplb_v1_TransferPlan_getmsgdef,
      "transfer-plan JSON   GetTransferPlanRequest (one rank's plan of an engine-executed rebalance)" },
    { "commit", "CommitRebalance", eplb_v1_CommitRebalanceRequest_getmsgdef, eplb_v1_RebalanceResponse_getmsgdef,
      "commit JSON          CommitRebalanceRequest (after every rank ran its plan)" },
    { "abort", "AbortRebalance", eplb_v1_AbortRebalanceRequest_getmsgdef, eplb_v1_AbortRebalanceResponse_getmsgdef,
      "abort JSON           AbortRebalanceRequest (bytes_touched > 0: the model needs a reload)" },
    { "record-load", "RecordLoad", eplb_v1_RecordLoadRequest_getmsgdef,
      eplb_v1_RecordLoadResponse_getmsgdef, "record-load JSON     RecordLoadRequest" },
    { "attach", "AttachWeights", eplb_v1_AttachWeightsRequest_getmsgdef,
      eplb_v1_AttachWeightsResponse_getmsgdef, "attach JSON          AttachWeightsRequest" },
    { "detach", "DetachWeights", eplb_v1_DetachWeightsRequest_getmsgdef,
      eplb_v1_DetachWeightsResponse_getmsgdef, "detach JSON          DetachWeightsRequest" },
    { "list", "ListModels", eplb_v1_ListModelsRequest_getmsgdef, eplb_v1_ListModelsResponse_getmsgdef,
      "list [JSON]          ListModelsRequest" },
    { "delete", "DeleteModel", eplb_v1_DeleteModelRequest_getmsgdef, eplb_v1_DeleteModelResponse_getmsgdef,
      "delete MODEL_ID|JSON DeleteModelRequest (JSON for \"force\": true)" },
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *f) {
    fprintf(f, "usage: eplbctl [OPTIONS] COMMAND [ARG]\n"
               "  --addr HOST:PORT|unix:PATH  (default $EPLBD_ADDR or 127.0.0.1:50051)\n"
               "  --timeout SECONDS     per call (default 30)\n"
               "  --summary             get/setup/rebalance/continue/commit/register: epoch, shape, state, replica\n"
               "                        histogram, balancedness per layer, pending rebalance, not the maps\n"
               "  --allow-unregistered  register: exit 0 when the answer is \"registered\": false (default 3)\n"
               "  --tls-ca PEM          CA of the server's certificate: use TLS\n"
               "  --tls-cert PEM        client certificate (mTLS; with --tls-key and --tls-ca)\n"
               "  --tls-key PEM         its private key\n"
               "  --tls-server-name N   name to check in the server's certificate (default: the host of --addr)\n"
               "  --version, --help\n"
               "commands:\n"
               "  health [SERVICE]     grpc.health.v1.Health/Check\n");
    for (size_t i = 0; i < NCOMMANDS; i++)
        fprintf(f, "  %s\n", commands[i].help);
    fprintf(f, "  export MODEL_ID [--format sglang|vllm] [-o FILE]\n"
               "                       the served placement as a placement file (default sglang, to stdout):\n"
               "                       sglang: {\"physical_to_logical_map\": [L][P]} (SGLang's --init-expert-location);\n"
               "                       vllm: vLLM's physical_to_logical_map, logical_to_physical_map, logical_replica_count\n"
               "  import MODEL_ID FILE apply a placement file (JSON; - for stdin): physical_to_logical_map ->\n"
               "                       SetupFromMapping at the model's shape (epoch + 1); logical_count [L][N] ->\n"
               "                       Rebalance(logical_load); prints the --summary of the answer\n"
               "                       (eplbctl reads and writes JSON only; .pt files: python3 -m eplb export|import)\n"
               "JSON is an argument, - for stdin, or @FILE.\n"
               "Exit: 0 OK, 1 RPC error or a file that does not fit the model, 2 usage or bad JSON, 3 not registered.\n");
}

/* One line saying what was wrong, a hint, exit status 2. */
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("eplbctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs(" (eplbctl --help lists commands and options)\n", stderr);
    return 2;
}

/* ---- a growing output buffer ------------------------------------------------ */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
    if (b->oom)
        return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        sb_putn(b, tmp, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (!big) {
        b->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_putn(b, big, (size_t)n);
    free(big);
}

/* A JSON string of s (model ids, reasons, messages). */
static void sb_json_str(sbuf *b, const char *s, size_t n) {
    sb_putn(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char e[2] = { '\\', (char)c };
            sb_putn(b, e, 2);
        } else if (c < 0x20) {
            sb_printf(b, "\\u%04x", c);
        } else {
            sb_putn(b, (const char *)&s[i], 1);
        }
    }
    sb_putn(b, "\"", 1);
}

static void sb_json_sv(sbuf *b, upb_StringView v) { sb_json_str(b, v.data, v.size); }

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

/* ---- 64-bit integers as JSON numbers ------------------------------------------
 * upb prints int64/uint64 fields as strings ("epoch": "3"), as proto3 JSON
 * says.  The rewrite walks upb's (compact, valid) output alongside the
 * message definitions and unquotes exactly the strings of 64-bit integer
 * fields whose value fits 2^53 (a double holds it exactly, so every JSON
 * reader gets the number); anything larger stays a string. */

typedef struct rw {
    const char *s;
    size_t i, n;
    sbuf *out;
} rw;

static void rw_value(rw *r, const upb_FieldDef *f);

static bool fits_2p53(const char *s, size_t n) {
    size_t k = s[0] == '-' ? 1 : 0;
    if (n == k || n - k > 16)
        return false;
    for (size_t j = k; j < n; j++)
        if (s[j] < '0' || s[j] > '9')
            return false;
    char tmp[24];
    memcpy(tmp, s + k, n - k);
    tmp[n - k] = '\0';
    return strtoull(tmp, NULL, 10) <= (1ULL << 53);
}

/* A string token at r->i: copied, or unquoted when unquote and it is a safe integer. */
static void rw_string(rw *r, bool unquote, const char **key, size_t *keylen) {
    size_t start = r->i++;
    while (r->i < r->n && r->s[r->i] != '"')
        r->i += r->s[r->i] == '\\' ? 2 : 1;
    r->i++; /* closing quote */
    const char *body = r->s + start + 1;
    size_t blen = r->i - start - 2;
    if (key) {
        *key = body;
        *keylen = blen;
    }
    if (unquote && fits_2p53(body, blen))
        sb_putn(r->out, body, blen);
    else
        sb_putn(r->out, r->s + start, r->i - start);
}

static void rw_object(rw *r, const upb_MessageDef *md) {
    sb_putn(r->out, "{", 1);
    r->i++;
    while (r->i < r->n && r->s[r->i] != '}') {
        if (r->s[r->i] == ',') {
            sb_putn(r->out, ",", 1);
            r->i++;
            continue;
        }
        const char *key = NULL;
        size_t keylen = 0;
        rw_string(r, false, &key, &keylen);
        sb_putn(r->out, ":", 1);
        r->i++; /* ':' */
        const upb_FieldDef *f = md ? upb_MessageDef_FindFieldByNameWithSize(md, key, keylen) : NULL;
        if (md && !f)
            f = upb_MessageDef_FindByJsonNameWithSize(md, key, keylen);
        rw_value(r, f);
    }
    sb_putn(r->out, "}", 1);
    r->i++;
}

static void rw_value(rw *r, const upb_FieldDef *f) {
    if (r->i >= r->n)
        return;
    char c = r->s[r->i];
    if (c == '{') {
        rw_object(r, f && upb_FieldDef_IsSubMessage(f) ? upb_FieldDef_MessageSubDef(f) : NULL);
    } else if (c == '[') {
        sb_putn(r->out, "[", 1);
        r->i++;
        while (r->i < r->n && r->s[r->i] != ']') {
            if (r->s[r->i] == ',') {
                sb_putn(r->out, ",", 1);
                r->i++;
            } else {
                rw_value(r, f);
            }
        }
        sb_putn(r->out, "]", 1);
        r->i++;
    } else if (c == '"') {
        upb_CType t = f ? upb_FieldDef_CType(f) : kUpb_CType_String;
        rw_string(r, t == kUpb_CType_Int64 || t == kUpb_CType_UInt64, NULL, NULL);
    } else {
        size_t start = r->i;
        while (r->i < r->n && !strchr(",]}", r->s[r->i]))
            r->i++;
        sb_putn(r->out, r->s + start, r->i - start);
    }
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
    sbuf out = { 0 };
    rw r = { buf, 0, n, &out };
    if (n && buf[0] == '{')
        rw_object(&r, md);
    int rc = 0;
    if (out.oom || r.i != n) {
        fprintf(stderr, "eplbctl: out of memory printing the response\n");
        rc = 1;
    } else {
        printf("%s\n", out.p);
    }
    free(out.p);
    free(buf);
    return rc;
}

/* ---- --summary ------------------------------------------------------------------
 * A digest of a placement (and of a rebalance or a registration answer) in a
 * few hundred bytes, multi-line JSON: what an operator reads of a
 * 58 x 288 placement instead of its 190 KB map. */

static const char *state_name(int32_t s) {
    static const char *const names[] = { "MOVE_STATE_IDLE", "MOVE_STATE_STAGED", "MOVE_STATE_MOVING",
                                         "MOVE_STATE_COMMITTED", "MOVE_STATE_NEEDS_RELOAD" };
    return s >= 0 && s < 5 ? names[s] : "MOVE_STATE_UNKNOWN";
}

static void sb_doubles(sbuf *b, const double *v, size_t n) {
    sb_puts(b, "[");
    for (size_t i = 0; i < n; i++)
        sb_printf(b, "%s%.4f", i ? ", " : "", v[i]);
    sb_puts(b, "]");
}

/* The fields of a placement's summary, each line starting with ind. */
static void summary_placement(sbuf *b, const eplb_v1_Placement *p, const char *ind) {
    size_t np2l = 0, ncnt = 0;
    const int32_t *p2l = eplb_v1_Placement_physical_to_logical(p, &np2l);
    const int32_t *cnt = eplb_v1_Placement_logical_replica_count(p, &ncnt);
    uint32_t L = eplb_v1_Placement_num_layers(p), P = eplb_v1_Placement_num_physical_experts(p);
    uint32_t N = eplb_v1_Placement_num_logical_experts(p);
    size_t empty = 0;
    for (size_t i = 0; i < np2l; i++)
        empty += p2l[i] < 0;
    int32_t maxr = 0;
    for (size_t i = 0; i < ncnt; i++)
        maxr = cnt[i] > maxr ? cnt[i] : maxr;
    sb_printf(b, "%s\"model_id\": ", ind);
    sb_json_sv(b, eplb_v1_Placement_model_id(p));
    sb_printf(b, ",\n%s\"epoch\": %" PRIu64 ",\n", ind, eplb_v1_Placement_epoch(p));
    sb_printf(b, "%s\"state\": \"%s\",\n", ind, state_name(eplb_v1_Placement_state(p)));
    upb_StringView why = eplb_v1_Placement_state_reason(p);
    if (why.size) {
        sb_printf(b, "%s\"state_reason\": ", ind);
        sb_json_sv(b, why);
        sb_puts(b, ",\n");
    }
    sb_printf(b, "%s\"num_layers\": %u,\n%s\"num_physical_experts\": %u,\n%s\"num_logical_experts\": %u,\n", ind, L,
              ind, P, ind, N);
    sb_printf(b, "%s\"num_valid_physical_experts\": %u,\n%s\"empty_slots\": %zu,\n", ind,
              eplb_v1_Placement_num_valid_physical_experts(p), ind, empty);
    /* How many (layer, logical expert) pairs have k replicas. */
    sb_printf(b, "%s\"replica_histogram\": {", ind);
    bool first = true;
    for (int32_t k = 0; k <= maxr && ncnt; k++) {
        size_t c = 0;
        for (size_t i = 0; i < ncnt; i++)
            c += cnt[i] == k;
        if (c) {
            sb_printf(b, "%s\"%d\": %zu", first ? "" : ", ", k, c);
            first = false;
        }
    }
    sb_printf(b, "},\n%s\"max_replicas\": %d,\n", ind, maxr);
    upb_StringView pend = eplb_v1_Placement_pending_rebalance_id(p);
    sb_printf(b, "%s\"pending_rebalance_id\": ", ind);
    sb_json_sv(b, pend);
    sb_printf(b, ",\n%s\"pending_layers_done\": %u", ind, eplb_v1_Placement_pending_layers_done(p));
    if (pend.size)
        sb_printf(b, ",\n%s\"pending_execution\": \"%s\"", ind,
                  eplb_v1_Placement_pending_execution(p) == eplb_v1_EXECUTION_ENGINE ? "EXECUTION_ENGINE"
                                                                                    : "EXECUTION_SERVER");
}

static void summary_rebalance(sbuf *b, const eplb_v1_RebalanceResponse *r) {
    size_t nb = 0, na = 0, nm = 0;
    const double *before = eplb_v1_RebalanceResponse_layer_balancedness_before(r, &nb);
    const double *after = eplb_v1_RebalanceResponse_layer_balancedness_after(r, &na);
    const uint32_t *moved = eplb_v1_RebalanceResponse_layers_moved(r, &nm);
    sb_printf(b, "{\n  \"committed\": %s,\n", eplb_v1_RebalanceResponse_committed(r) ? "true" : "false");
    sb_printf(b, "  \"balancedness_before\": %.4f,\n  \"balancedness_after\": %.4f,\n",
              eplb_v1_RebalanceResponse_balancedness_before(r), eplb_v1_RebalanceResponse_balancedness_after(r));
    sb_puts(b, "  \"layer_balancedness_before\": ");
    sb_doubles(b, before, nb);
    sb_puts(b, ",\n  \"layer_balancedness_after\": ");
    sb_doubles(b, after, na);
    sb_printf(b, ",\n  \"experts_moved\": %" PRIu64 ",\n  \"compute_ms\": %.3f,\n",
              eplb_v1_RebalanceResponse_experts_moved(r), eplb_v1_RebalanceResponse_compute_ms(r));
    sb_puts(b, "  \"rebalance_id\": ");
    sb_json_sv(b, eplb_v1_RebalanceResponse_rebalance_id(r));
    sb_printf(b, ",\n  \"layers_done\": %u,\n  \"pending\": %s,\n  \"layers_moved\": [",
              eplb_v1_RebalanceResponse_layers_done(r), eplb_v1_RebalanceResponse_pending(r) ? "true" : "false");
    for (size_t i = 0; i < nm; i++)
        sb_printf(b, "%s%u", i ? ", " : "", moved[i]);
    sb_printf(b, "],\n  \"bytes_moved\": %" PRIu64 ",\n  \"bytes_cross_gpu\": %" PRIu64 ",\n  \"bytes_staged\": %" PRIu64
                 ",\n  \"move_ms\": %.3f",
              eplb_v1_RebalanceResponse_bytes_moved(r), eplb_v1_RebalanceResponse_bytes_cross_gpu(r),
              eplb_v1_RebalanceResponse_bytes_staged(r), eplb_v1_RebalanceResponse_move_ms(r));
    const eplb_v1_Placement *p = eplb_v1_RebalanceResponse_placement(r);
    if (p) {
        sb_puts(b, ",\n  \"placement\": {\n");
        summary_placement(b, p, "    ");
        sb_puts(b, "\n  }");
    }
    sb_puts(b, "\n}\n");
}

/* The summary of a response body of method; 0, or 1 when it does not parse. */
static int print_summary(const char *method, const char *body, size_t len) {
    upb_Arena *arena = upb_Arena_New();
    sbuf b = { 0 };
    int rc = 0;
    if (strcmp(method, "Rebalance") == 0 || strcmp(method, "ContinueRebalance") == 0 ||
        strcmp(method, "CommitRebalance") == 0) {
        const eplb_v1_RebalanceResponse *r = eplb_v1_RebalanceResponse_parse(body, len, arena);
        if (r)
            summary_rebalance(&b, r);
        else
            rc = 1;
    } else if (strcmp(method, "RegisterModel") == 0) {
        const eplb_v1_RegisterModelResponse *r = eplb_v1_RegisterModelResponse_parse(body, len, arena);
        if (r) {
            sb_printf(&b, "{\n  \"registered\": %s,\n  \"model_id\": ",
                      eplb_v1_RegisterModelResponse_registered(r) ? "true" : "false");
            sb_json_sv(&b, eplb_v1_RegisterModelResponse_model_id(r));
            sb_puts(&b, ",\n  \"resolved_path\": ");
            sb_json_sv(&b, eplb_v1_RegisterModelResponse_resolved_path(r));
            sb_puts(&b, ",\n  \"reason\": ");
            sb_json_sv(&b, eplb_v1_RegisterModelResponse_reason(r));
            sb_printf(&b, ",\n  \"epoch\": %" PRIu64 ",\n  \"state\": \"%s\"", eplb_v1_RegisterModelResponse_epoch(r),
                      state_name(eplb_v1_RegisterModelResponse_state(r)));
            const eplb_v1_Placement *p = eplb_v1_RegisterModelResponse_placement(r);
            if (p) {
                sb_puts(&b, ",\n  \"placement\": {\n");
                summary_placement(&b, p, "    ");
                sb_puts(&b, "\n  }");
            }
            sb_puts(&b, "\n}\n");
        } else {
            rc = 1;
        }
    } else { /* GetPlacement, SetupFromMapping: a Placement */
        const eplb_v1_Placement *p = eplb_v1_Placement_parse(body, len, arena);
        if (p) {
            sb_puts(&b, "{\n");
            summary_placement(&b, p, "  ");
            sb_puts(&b, "\n}\n");
        } else {
            rc = 1;
        }
    }
    if (rc)
        fprintf(stderr, "eplbctl: the %s response does not parse\n", method);
    else if (b.oom)
        rc = 1, fprintf(stderr, "eplbctl: out of memory\n");
    else
        fputs(b.p, stdout);
    free(b.p);
    upb_Arena_Free(arena);
    return rc;
}

static bool has_summary(const char *method) {
    return strcmp(method, "Rebalance") == 0 || strcmp(method, "ContinueRebalance") == 0 ||
           strcmp(method, "CommitRebalance") == 0 ||
           strcmp(method, "RegisterModel") == 0 || strcmp(method, "GetPlacement") == 0 ||
           strcmp(method, "SetupFromMapping") == 0;
}

/* ---- placement files: a JSON reader for import -----------------------------------
 * Reads the top-level object of a placement file, keeps the integer arrays
 * it needs (physical_to_logical_map, logical_count, logical_replica_count)
 * and checks the syntax of everything else.  Errors name the line and column. */

typedef struct numarr {
    int64_t *v;
    size_t n, cap;
    int ndim;
    size_t shape[3];
    bool shape_set[3];
    bool present;
} numarr;

typedef struct jp {
    const char *s;
    size_t i, n;
    char err[300];
} jp;

static bool jp_fail(jp *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool jp_fail(jp *p, const char *fmt, ...) {
    if (p->err[0])
        return false;
    size_t line = 1, col = 1;
    for (size_t k = 0; k < p->i && k < p->n; k++) {
        if (p->s[k] == '\n')
            line++, col = 1;
        else
            col++;
    }
    int off = snprintf(p->err, sizeof p->err, "line %zu column %zu: ", line, col);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err + off, sizeof p->err - (size_t)off, fmt, ap);
    va_end(ap);
    return false;
}

static void jp_ws(jp *p) {
    while (p->i < p->n && p->s[p->i] && strchr(" \t\r\n", p->s[p->i]))
        p->i++;
}

static bool jp_lit(jp *p, char c) {
    jp_ws(p);
    if (p->i < p->n && p->s[p->i] == c) {
        p->i++;
        return true;
    }
    return p->i < p->n ? jp_fail(p, "expected '%c', found '%c'", c, p->s[p->i]) : jp_fail(p, "expected '%c', found the end", c);
}

static bool jp_string(jp *p, const char **body, size_t *len) {
    jp_ws(p);
    if (p->i >= p->n || p->s[p->i] != '"')
        return jp_fail(p, "expected a string");
    size_t start = ++p->i;
    while (p->i < p->n && p->s[p->i] != '"') {
        if ((unsigned char)p->s[p->i] < 0x20)
            return jp_fail(p, "control character in a string");
        p->i += p->s[p->i] == '\\' ? 2 : 1;
    }
    if (p->i >= p->n)
        return jp_fail(p, "unterminated string");
    *body = p->s + start;
    *len = p->i - start;
    p->i++;
    return true;
}

/* A JSON number that is an integer (12, -1, 12.0, 1e3); fractions are refused. */
static bool jp_int(jp *p, int64_t *out) {
    jp_ws(p);
    const char *s = p->s + p->i;
    if (p->i >= p->n || !(*s == '-' || (*s >= '0' && *s <= '9')))
        return jp_fail(p, "expected a number");
    char tmp[64];
    size_t k = 0;
    while (p->i + k < p->n && k + 1 < sizeof tmp && s[k] && strchr("0123456789+-.eE", s[k]))
        tmp[k] = s[k], k++;
    tmp[k] = '\0';
    char *end;
    double d = strtod(tmp, &end);
    if (end != tmp + k || !isfinite(d))
        return jp_fail(p, "'%s' is not a number", tmp);
    if (d != floor(d) || fabs(d) > 9007199254740992.0)
        return jp_fail(p, "%s is not an integer", tmp);
    *out = (int64_t)d;
    p->i += k;
    return true;
}

static bool jp_skip(jp *p, int depth) {
    jp_ws(p);
    if (depth > 64)
        return jp_fail(p, "nested too deeply");
    if (p->i >= p->n)
        return jp_fail(p, "expected a value, found the end");
    char c = p->s[p->i];
    const char *b;
    size_t l;
    if (c == '"')
        return jp_string(p, &b, &l);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        p->i++;
        jp_ws(p);
        if (p->i < p->n && p->s[p->i] == close)
            return p->i++, true;
        for (;;) {
            if (c == '{' && !(jp_string(p, &b, &l) && jp_lit(p, ':')))
                return false;
            if (!jp_skip(p, depth + 1))
                return false;
            jp_ws(p);
            if (p->i < p->n && p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            return jp_lit(p, close);
        }
    }
    for (const char *w = "true\0false\0null\0"; *w; w += strlen(w) + 1)
        if (p->n - p->i >= strlen(w) && memcmp(p->s + p->i, w, strlen(w)) == 0)
            return p->i += strlen(w), true;
    if (c == '-' || (c >= '0' && c <= '9')) {
        /* any JSON number is fine where it is not read */
        while (p->i < p->n && p->s[p->i] && strchr("0123456789+-.eE", p->s[p->i]))
            p->i++;
        return true;
    }
    return jp_fail(p, "unexpected '%c'", c);
}

/* A rectangular array of integers, at most 3 dimensions, row-major into a. */
static bool jp_numarray(jp *p, numarr *a, int level, const char *name) {
    if (!jp_lit(p, '['))
        return false;
    size_t count = 0;
    jp_ws(p);
    if (p->i < p->n && p->s[p->i] == ']') {
        p->i++;
    } else {
        for (;;) {
            jp_ws(p);
            if (p->i < p->n && p->s[p->i] == '[') {
                if (level + 1 >= 3 || (a->ndim && level + 1 >= a->ndim))
                    return jp_fail(p, "%s is nested too deeply", name);
                if (!jp_numarray(p, a, level + 1, name))
                    return false;
            } else {
                if (!a->ndim)
                    a->ndim = level + 1;
                else if (a->ndim != level + 1)
                    return jp_fail(p, "%s mixes numbers and arrays at one depth", name);
                int64_t v = 0;
                if (!jp_int(p, &v))
                    return false;
                if (a->n == a->cap) {
                    size_t cap = a->cap ? a->cap * 2 : 1024;
                    int64_t *nv = realloc(a->v, cap * sizeof *nv);
                    if (!nv)
                        return jp_fail(p, "out of memory");
                    a->v = nv;
                    a->cap = cap;
                }
                a->v[a->n++] = v;
            }
            count++;
            jp_ws(p);
            if (p->i < p->n && p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            if (!jp_lit(p, ']'))
                return false;
            break;
        }
    }
    if (!a->shape_set[level]) {
        a->shape[level] = count;
        a->shape_set[level] = true;
    } else if (a->shape[level] != count) {
        return jp_fail(p, "%s is not rectangular: a row of %zu where the first has %zu", name, count,
                       a->shape[level]);
    }
    return true;
}

typedef struct pfile {
    numarr p2l, lc, cnt;
    bool vllm_keys; /* logical_replica_count or logical_to_physical_map: a vLLM maps file */
} pfile;

static void pfile_free(pfile *f) {
    free(f->p2l.v);
    free(f->lc.v);
    free(f->cnt.v);
}

static bool pfile_parse(jp *p, pfile *f) {
    if (!jp_lit(p, '{'))
        return false;
    jp_ws(p);
    if (p->i < p->n && p->s[p->i] == '}') {
        p->i++;
    } else {
        for (;;) {
            const char *key;
            size_t klen;
            if (!jp_string(p, &key, &klen) || !jp_lit(p, ':'))
                return false;
#define KEY(s) (klen == strlen(s) && memcmp(key, s, klen) == 0)
            numarr *a = KEY("physical_to_logical_map") ? &f->p2l
                        : KEY("logical_count")          ? &f->lc
                        : KEY("logical_replica_count")  ? &f->cnt
                                                        : NULL;
            if (KEY("logical_replica_count") || KEY("logical_to_physical_map"))
                f->vllm_keys = true;
#undef KEY
            if (a) {
                if (a->present)
                    return jp_fail(p, "%.*s appears twice", (int)klen, key);
                a->present = true;
                if (!jp_numarray(p, a, 0, a == &f->p2l ? "physical_to_logical_map" : a == &f->lc ? "logical_count" : "logical_replica_count"))
                    return false;
            } else if (!jp_skip(p, 0)) {
                return false;
            }
            jp_ws(p);
            if (p->i < p->n && p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            if (!jp_lit(p, '}'))
                return false;
            break;
        }
    }
    jp_ws(p);
    if (p->i != p->n)
        return jp_fail(p, "text after the end of the object");
    return true;
}

/* ---- calls used by export and import ------------------------------------------- */

/* Call method with request bytes; 0 with r holding the answer, else the exit status (message printed). */
static int call_ok(eplb_client *c, const char *method, const char *bytes, size_t len, int timeout_ms,
                   eplb_call_result *r) {
    char full[128];
    snprintf(full, sizeof full, "/eplb.v1.ExpertBalancer/%s", method);
    if (eplb_client_call(c, full, bytes, len, timeout_ms, r) != 0) {
        fprintf(stderr, "eplbctl: cannot start the call\n");
        return 1;
    }
    if (r->status != 0) {
        fprintf(stderr, "eplbctl: %s: %s: %s\n", method, eplb_grpc_status_name(r->status), r->message ? r->message : "");
        eplb_call_result_free(r);
        return 1;
    }
    return 0;
}

static const eplb_v1_Placement *get_placement(eplb_client *c, const char *model_id, int timeout_ms, upb_Arena *arena,
                                              int *rc) {
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(arena);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(model_id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, arena, &len);
    eplb_call_result r;
    if ((*rc = call_ok(c, "GetPlacement", bytes, len, timeout_ms, &r)) != 0)
        return NULL;
    /* parse into the arena: the body must outlive r */
    char *body = upb_Arena_Malloc(arena, r.body_len + 1);
    if (body && r.body_len)
        memcpy(body, r.body, r.body_len);
    const eplb_v1_Placement *p = body ? eplb_v1_Placement_parse(body, r.body_len, arena) : NULL;
    eplb_call_result_free(&r);
    if (!p) {
        fprintf(stderr, "eplbctl: the GetPlacement response does not parse\n");
        *rc = 1;
    }
    return p;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static void sb_rows(sbuf *b, const int32_t *v, size_t rows, size_t cols) {
    sb_puts(b, "[");
    for (size_t r = 0; r < rows; r++) {
        sb_puts(b, r ? ",[" : "[");
        for (size_t c = 0; c < cols; c++)
            sb_printf(b, c ? ",%d" : "%d", v[r * cols + c]);
        sb_puts(b, "]");
    }
    sb_puts(b, "]");
}

/* export MODEL_ID [--format sglang|vllm] [-o FILE]: the same bytes as eplb.files.export_*. */
static int do_export(eplb_client *c, const char *model_id, const char *format, const char *out, int timeout_ms) {
    if (strcmp(format, "sglang") != 0 && strcmp(format, "vllm") != 0)
        return usage_error("--format is sglang or vllm, not '%s'", format);
    if (out && ends_with(out, ".pt"))
        return usage_error("eplbctl writes JSON only; for a .pt file use python3 -m eplb export %s -o %s", model_id,
                           out);
    upb_Arena *arena = upb_Arena_New();
    int rc;
    const eplb_v1_Placement *p = get_placement(c, model_id, timeout_ms, arena, &rc);
    sbuf b = { 0 };
    if (!p)
        goto done;
    size_t np2l = 0, ncnt = 0;
    const int32_t *p2l = eplb_v1_Placement_physical_to_logical(p, &np2l);
    const int32_t *cnt = eplb_v1_Placement_logical_replica_count(p, &ncnt);
    size_t L = eplb_v1_Placement_num_layers(p), P = eplb_v1_Placement_num_physical_experts(p);
    size_t N = eplb_v1_Placement_num_logical_experts(p);
    rc = 1;
    if (np2l != L * P || ncnt != L * N || P < N) {
        fprintf(stderr, "eplbctl: the placement of %s is not [%zu][%zu]\n", model_id, L, P);
        goto done;
    }
    if (strcmp(format, "sglang") == 0) {
        for (size_t i = 0; i < np2l; i++)
            if (p2l[i] < 0) {
                fprintf(stderr, "eplbctl: layer %zu slot %zu of %s is empty (-1): SGLang's physical_to_logical_map "
                                "has no empty slots (rebalance first, or --format vllm)\n", i / P, i % P, model_id);
                goto done;
            }
        sb_puts(&b, "{\"physical_to_logical_map\":");
        sb_rows(&b, p2l, L, P);
        sb_puts(&b, "}\n");
    } else {
        size_t R = P - N + 1; /* vLLM's num_redundant_experts + 1 */
        int32_t *l2p = malloc(L * N * R * sizeof *l2p);
        size_t *fill = calloc(N ? N : 1, sizeof *fill);
        if (!l2p || !fill) {
            free(l2p), free(fill);
            fprintf(stderr, "eplbctl: out of memory\n");
            goto done;
        }
        for (size_t i = 0; i < L * N * R; i++)
            l2p[i] = -1;
        bool ok = true;
        for (size_t l = 0; l < L && ok; l++) {
            memset(fill, 0, N * sizeof *fill);
            for (size_t s = 0; s < P; s++) {
                int32_t e = p2l[l * P + s];
                if (e < 0)
                    continue;
                if ((size_t)e >= N || fill[e] >= R) {
                    ok = false;
                    break;
                }
                l2p[(l * N + (size_t)e) * R + fill[e]++] = (int32_t)s;
            }
        }
        if (ok) {
            sb_puts(&b, "{\"format\":\"" VLLM_FORMAT "\",\"model_id\":");
            sb_json_sv(&b, eplb_v1_Placement_model_id(p));
            sb_printf(&b, ",\"epoch\":%" PRIu64 ",\"num_logical_experts\":%zu,\"physical_to_logical_map\":",
                      eplb_v1_Placement_epoch(p), N);
            sb_rows(&b, p2l, L, P);
            sb_puts(&b, ",\"logical_to_physical_map\":[");
            for (size_t l = 0; l < L; l++) {
                sb_puts(&b, l ? "," : "");
                sb_rows(&b, l2p + l * N * R, N, R);
            }
            sb_puts(&b, "],\"logical_replica_count\":");
            sb_rows(&b, cnt, L, N);
            sb_puts(&b, "}\n");
        } else {
            fprintf(stderr, "eplbctl: the placement of %s names an expert >= %zu or more than %zu replicas\n",
                    model_id, N, R);
        }
        free(l2p);
        free(fill);
        if (!ok)
            goto done;
    }
    if (b.oom) {
        fprintf(stderr, "eplbctl: out of memory\n");
        goto done;
    }
    if (!out || strcmp(out, "-") == 0) {
        rc = fwrite(b.p, 1, b.n, stdout) == b.n ? 0 : 1;
    } else {
        /* write aside, then rename: a reader never sees half a file */
        size_t tl = strlen(out) + 8;
        char *tmp = malloc(tl);
        FILE *f = tmp ? (snprintf(tmp, tl, "%s.tmp", out), fopen(tmp, "wb")) : NULL;
        if (!f || fwrite(b.p, 1, b.n, f) != b.n || fclose(f) != 0 || rename(tmp, out) != 0) {
            fprintf(stderr, "eplbctl: cannot write %s: %s\n", out, strerror(errno));
            if (tmp)
                remove(tmp);
        } else {
            rc = 0;
        }
        free(tmp);
    }
done:
    free(b.p);
    upb_Arena_Free(arena);
    return rc;
}

/* import MODEL_ID FILE: a mapping -> SetupFromMapping, load counts -> Rebalance(logical_load). */
static int do_import(eplb_client *c, const char *model_id, const char *path, int timeout_ms) {
    if (ends_with(path, ".pt"))
        return usage_error("eplbctl reads JSON only; for a .pt file use python3 -m eplb import %s %s", model_id, path);
    size_t len = 0;
    char *text;
    if (strcmp(path, "-") == 0) {
        text = read_arg("-", &len);
    } else {
        char *at = malloc(strlen(path) + 2);
        if (!at)
            return 1;
        at[0] = '@';
        strcpy(at + 1, path);
        text = read_arg(at, &len);
        free(at);
    }
    if (!text)
        return 2;
    pfile f = { 0 };
    jp p = { text, 0, len, "" };
    int rc = 2;
    upb_Arena *arena = upb_Arena_New();
    if (!pfile_parse(&p, &f)) {
        fprintf(stderr, "eplbctl: %s is not a placement file: %s (eplbctl --help: import)\n", path, p.err);
        goto out;
    }
    bool mapping = f.p2l.present;
    if (!mapping && !f.lc.present) {
        fprintf(stderr, "eplbctl: %s has neither physical_to_logical_map nor logical_count\n", path);
        goto out;
    }
    numarr *a = mapping ? &f.p2l : &f.lc;
    if (a->ndim == 0 && a->n == 0)
        a->ndim = 1;
    if ((mapping && a->ndim != 2) || (!mapping && a->ndim != 2 && a->ndim != 3)) {
        fprintf(stderr, "eplbctl: %s: %s must be [layers][%s]%s, not %d-dimensional\n", path,
                mapping ? "physical_to_logical_map" : "logical_count", mapping ? "physical" : "logical",
                mapping ? "" : " or [k][layers][logical]", a->ndim);
        goto out;
    }
    for (size_t i = 0; i < a->n; i++)
        if (a->v[i] < (mapping ? -1 : 0) || (mapping && a->v[i] < 0 && !f.vllm_keys)) {
            fprintf(stderr, "eplbctl: %s: %s holds %" PRId64 " (%s)\n", path, mapping ? "physical_to_logical_map" : "logical_count",
                    a->v[i], mapping ? (f.vllm_keys ? "entries are -1 or an expert id" : "an SGLang map has no empty slots")
                                     : "counts are >= 0");
            goto out;
        }
    rc = 1;
    const eplb_v1_Placement *cur = get_placement(c, model_id, timeout_ms, arena, &rc);
    if (!cur)
        goto out;
    rc = 1;
    size_t L = eplb_v1_Placement_num_layers(cur), P = eplb_v1_Placement_num_physical_experts(cur);
    size_t N = eplb_v1_Placement_num_logical_experts(cur);
    uint64_t epoch = eplb_v1_Placement_epoch(cur);
    size_t d0 = a->ndim == 3 ? a->shape[1] : a->shape[0], d1 = a->ndim == 3 ? a->shape[2] : a->shape[1];
    if (d0 != L || d1 != (mapping ? P : N)) {
        fprintf(stderr, "eplbctl: %s is [%zu][%zu] but %s has %zu layers x %zu %s (a file applies at the model's own "
                        "shape)\n", mapping ? "physical_to_logical_map" : "logical_count", d0, d1, model_id, L,
                mapping ? P : N, mapping ? "slots" : "logical experts");
        goto out;
    }
    char *bytes;
    size_t blen;
    const char *method;
    if (mapping) {
        if (f.cnt.present) { /* a vLLM file: its replica counts must be those of its map */
            if (f.cnt.ndim != 2 || f.cnt.shape[0] != L || f.cnt.shape[1] != N) {
                fprintf(stderr, "eplbctl: %s: logical_replica_count is not [%zu][%zu]\n", path, L, N);
                goto out;
            }
            for (size_t l = 0; l < L; l++)
                for (size_t e = 0; e < N; e++) {
                    int64_t k = 0;
                    for (size_t s = 0; s < P; s++)
                        k += f.p2l.v[l * P + s] == (int64_t)e;
                    if (k != f.cnt.v[l * N + e]) {
                        fprintf(stderr, "eplbctl: %s: logical_replica_count[%zu][%zu] = %" PRId64 " but "
                                        "physical_to_logical_map holds expert %zu %" PRId64 " time(s) in layer %zu\n",
                                path, l, e, f.cnt.v[l * N + e], e, k, l);
                        goto out;
                    }
                }
        }
        /* ep_size of the model: ListModels */
        eplb_v1_ListModelsRequest *lreq = eplb_v1_ListModelsRequest_new(arena);
        char *lb = eplb_v1_ListModelsRequest_serialize(lreq, arena, &blen);
        eplb_call_result lr;
        if (call_ok(c, "ListModels", lb, blen, timeout_ms, &lr) != 0)
            goto out;
        size_t llen = lr.body_len;
        char *lbody = upb_Arena_Malloc(arena, llen + 1);
        if (lbody && llen)
            memcpy(lbody, lr.body, llen);
        eplb_call_result_free(&lr);
        const eplb_v1_ListModelsResponse *list = lbody ? eplb_v1_ListModelsResponse_parse(lbody, llen, arena) : NULL;
        size_t nm = 0;
        const eplb_v1_ModelSummary *const *models = list ? eplb_v1_ListModelsResponse_models(list, &nm) : NULL;
        uint32_t ep = 0;
        for (size_t i = 0; i < nm; i++) {
            upb_StringView id = eplb_v1_ModelSummary_model_id(models[i]);
            if (id.size == strlen(model_id) && memcmp(id.data, model_id, id.size) == 0)
                ep = eplb_v1_ModelSummary_ep_size(models[i]);
        }
        if (!ep) {
            fprintf(stderr, "eplbctl: ListModels does not list %s\n", model_id);
            goto out;
        }
        eplb_v1_SetupFromMappingRequest *req = eplb_v1_SetupFromMappingRequest_new(arena);
        eplb_v1_SetupFromMappingRequest_set_model_id(req, upb_StringView_FromString(model_id));
        int32_t *dst = eplb_v1_SetupFromMappingRequest_resize_expanded_physical_to_logical(req, a->n, arena);
        if (!dst)
            goto out;
        for (size_t i = 0; i < a->n; i++)
            dst[i] = (int32_t)a->v[i];
        eplb_v1_SetupFromMappingRequest_set_num_physical_experts(req, (uint32_t)P);
        eplb_v1_SetupFromMappingRequest_set_old_num_physical_experts(req, (uint32_t)P);
        eplb_v1_SetupFromMappingRequest_set_ep_size(req, ep);
        eplb_v1_SetupFromMappingRequest_set_expected_epoch(req, epoch);
        bytes = eplb_v1_SetupFromMappingRequest_serialize(req, arena, &blen);
        method = "SetupFromMapping";
    } else {
        eplb_v1_RebalanceRequest *req = eplb_v1_RebalanceRequest_new(arena);
        eplb_v1_RebalanceRequest_set_model_id(req, upb_StringView_FromString(model_id));
        int64_t *dst = eplb_v1_RebalanceRequest_resize_logical_load(req, L * N, arena);
        if (!dst)
            goto out;
        memset(dst, 0, L * N * sizeof *dst);
        for (size_t i = 0; i < a->n; i++) /* [k][L][N] is summed over k, as SGLang does */
            dst[i % (L * N)] += a->v[i];
        eplb_v1_RebalanceRequest_set_expected_epoch(req, epoch);
        bytes = eplb_v1_RebalanceRequest_serialize(req, arena, &blen);
        method = "Rebalance";
    }
    eplb_call_result r;
    if (!bytes || call_ok(c, method, bytes, blen, timeout_ms, &r) != 0)
        goto out;
    rc = print_summary(method, r.body ? r.body : "", r.body_len);
    eplb_call_result_free(&r);
out:
    pfile_free(&f);
    free(text);
    upb_Arena_Free(arena);
    return rc;
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

static int do_command(eplb_client *client, const command *cmd, const char *arg, int timeout_ms, bool summary,
                      bool allow_unregistered) {
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
        if (strpbrk(arg, "\"\\")) {
            rc = usage_error("a model id has no quotes or backslashes: '%s'", arg);
            goto out;
        }
        size_t n = strlen(arg) + 32;
        json = malloc(n);
        if (json)
            json_len = (size_t)snprintf(json, n, "{\"model_id\": \"%s\"}", arg);
    } else {
        json = read_arg(arg, &json_len);
    }
    if (!json)
        goto out;

    upb_Message *req = upb_Message_New(req_md, arena);
    upb_Status status;
    upb_Status_Clear(&status);
    if (!upb_JsonDecode(json, json_len, req, req_md, pool, 0, arena, &status)) {
        char what[300];
        snprintf(what, sizeof what, "%s", upb_Status_ErrorMessage(&status));
        what[strcspn(what, "\n")] = '\0'; /* one line */
        rc = usage_error("%s: %s is not a valid %s: %s", cmd->name, arg && arg[0] == '@' ? arg + 1 : "the JSON",
                         upb_MessageDef_FullName(req_md), what);
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
        else if (summary && has_summary(cmd->method))
            rc = print_summary(cmd->method, r.body ? r.body : "", r.body_len);
        else
            rc = print_json(resp, resp_md, pool);
        if (rc == 0 && strcmp(cmd->method, "RegisterModel") == 0) {
            const eplb_v1_RegisterModelResponse *reg = (const eplb_v1_RegisterModelResponse *)resp;
            if (!eplb_v1_RegisterModelResponse_registered(reg) && !allow_unregistered) {
                upb_StringView why = eplb_v1_RegisterModelResponse_reason(reg);
                fprintf(stderr, "eplbctl: not registered: %.*s (--allow-unregistered accepts this)\n", (int)why.size,
                        why.data);
                rc = EXIT_UNREGISTERED;
            }
        }
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
    bool summary = false, allow_unregistered = false;
    const char *format = NULL, *out = NULL;
    const char *pos[4];
    int npos = 0;
    /* Options go anywhere: before the command or after its arguments. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool is_opt = (a[0] == '-' && a[1] == '-') || strcmp(a, "-o") == 0;
        if (!is_opt) {
            if (npos == 4)
                return usage_error("too many arguments (from '%s' on)", a);
            pos[npos++] = a;
            continue;
        }
        static const char *const with_value[] = { "--addr", "--timeout", "--tls-ca", "--tls-cert", "--tls-key",
                                                  "--tls-server-name", "--format", "-o", "--output" };
        bool wants = false;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            wants |= strcmp(a, with_value[k]) == 0;
        if (wants && i + 1 >= argc)
            return usage_error("%s needs a value", a);
        if (strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--version") == 0) {
            printf("eplbctl %s (API eplb.v1)\n", EPLBCTL_VERSION);
            return 0;
        } else if (strcmp(a, "--summary") == 0) {
            summary = true;
        } else if (strcmp(a, "--allow-unregistered") == 0) {
            allow_unregistered = true;
        } else if (strcmp(a, "--addr") == 0) {
            addr = argv[++i];
        } else if (strcmp(a, "--tls-ca") == 0) {
            tls.ca_file = argv[++i];
        } else if (strcmp(a, "--tls-cert") == 0) {
            tls.cert_file = argv[++i];
        } else if (strcmp(a, "--tls-key") == 0) {
            tls.key_file = argv[++i];
        } else if (strcmp(a, "--tls-server-name") == 0) {
            tls.server_name = argv[++i];
        } else if (strcmp(a, "--format") == 0) {
            format = argv[++i];
        } else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) {
            out = argv[++i];
        } else if (strcmp(a, "--timeout") == 0) {
            char *end;
            double s = strtod(argv[++i], &end);
            if (*end || s <= 0 || s > 86400)
                return usage_error("--timeout wants seconds in (0, 86400], not '%s'", argv[i]);
            timeout_ms = (int)(s * 1000);
        } else {
            return usage_error("unknown option %s", a);
        }
    }
    if (npos == 0)
        return usage_error("no command given");
    const char *name = pos[0];
    const command *cmd = NULL;
    for (size_t k = 0; k < NCOMMANDS; k++)
        if (strcmp(commands[k].name, name) == 0)
            cmd = &commands[k];
    bool is_export = strcmp(name, "export") == 0, is_import = strcmp(name, "import") == 0;
    bool is_health = strcmp(name, "health") == 0;
    if (!cmd && !is_export && !is_import && !is_health)
        return usage_error("unknown command '%s'", name);
    int max_args = is_import ? 2 : 1;
    if (npos - 1 > max_args)
        return usage_error("%s takes %d argument%s, got %d (from '%s' on)", name, max_args, max_args > 1 ? "s" : "",
                           npos - 1, pos[1 + max_args]);
    if (is_import && npos < 3)
        return usage_error("import needs MODEL_ID and FILE");
    if (is_export && npos < 2)
        return usage_error("export needs MODEL_ID");
    if (cmd && npos < 2 && strcmp(name, "list") != 0)
    {
        const char *spec = strchr(cmd->help, ' ');
        spec += strspn(spec, " ");
        return usage_error("%s needs an argument: %.*s", name, (int)strcspn(spec, " "), spec);
    }
    if ((format || out) && !is_export)
        return usage_error("%s is for export", format ? "--format" : "-o");
    if ((is_export || is_import) && strpbrk(pos[1], "\"\\"))
        return usage_error("a model id has no quotes or backslashes: '%s'", pos[1]);
    const char *arg = npos > 1 ? pos[1] : NULL;
    bool use_tls = tls.ca_file || tls.cert_file || tls.key_file || tls.server_name;
    if (use_tls && !tls.ca_file)
        return usage_error("--tls-cert, --tls-key and --tls-server-name need --tls-ca (the server's CA)");
    if (!tls.cert_file != !tls.key_file)
        return usage_error("--tls-cert and --tls-key go together");
    if (is_export && format && strcmp(format, "sglang") != 0 && strcmp(format, "vllm") != 0)
        return usage_error("--format is sglang or vllm, not '%s'", format);
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
    int rc;
    if (is_export)
        rc = do_export(client, pos[1], format ? format : "sglang", out, timeout_ms);
    else if (is_import)
        rc = do_import(client, pos[1], pos[2], timeout_ms);
    else if (cmd)
        rc = do_command(client, cmd, arg, timeout_ms, summary, allow_unregistered);
    else
        rc = do_health(client, arg ? arg : "", timeout_ms);
    eplb_client_close(client);
    return rc;
}
