/* rpc_weights.c -- AttachWeights / DetachWeights, and the adapter that lets
 * the registry move weights: eplb_weights_ops implemented with transfer
 * plans (core) executed by a gpu/ backend (cpu over shm, hip over IPC).
 *
 * Trust boundary (docs/deploy.md): AttachWeights makes eplbd write into
 * memory the caller names, with eplbd's rights.  So it is refused unless the
 * caller is on this host (a unix socket or a loopback address; or
 * --allow-remote-weights), every shm object is named under --shm-prefix and
 * owned by eplbd's uid or an --shm-allow-uid, and is a regular file reached
 * without a symlink.  The prefix is checked here, with the flag's name in
 * the message; the backend checks all of it again on the descriptor it maps
 * (gpu/eplb_buffers.c, eplb_shm_open_checked).  DetachWeights follows the
 * same peer rule: a remote caller may not drop a local engine's attachment. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_backend.h"
#include "eplb_plan.h"
#include "eplb_plan_chunk.h"
#include "rpc_convert.h"
#include "rpc_handlers.h"

#define RPC_DEFAULT_SHM_PREFIX "/eplb-"

/* ---- the mover: eplb_weights_ops over a backend -------------------------- */

/* The registry calls check once, then per layer gather and scatter (scatter
 * again once after a failure).  The plan a gather ran is kept, with the rows
 * it was built from, so that scatter runs exactly that plan: the phases are
 * explicit, nothing is inferred from a plan's contents.
 *
 * Staging bound (--max-staging-mib, per GPU): a layer whose plan would
 * stage more is cut into chunks (eplb_plan_chunk.h), each a gather and a
 * scatter of its own.  gather runs chunk 0's gather; scatter runs chunk 0's
 * scatter, then chunk 1's gather and scatter, and so on.  Slots are written
 * from chunk 0's scatter on, so any failure after it answers EPLB_EDATALOSS
 * and the mover remembers where it was: the registry's one retry of the
 * scatter resumes at that chunk (its scatter again when its gather had
 * completed -- staging is intact -- else its gather, whose source bytes no
 * chunk has touched since).  Cost when the bound does not bite: one chunk,
 * as before. */
typedef struct weights_mover {
    eplb_backend *backend;
    uint32_t num_layers, num_physical, num_gpus, gpus_per_node; /* the layout it was opened for */
    uint32_t first_rank, held_ranks; /* the ranks attached here */
    uint64_t *layer_bytes; /* [L] bytes of one expert in that layer, all tensors */
    uint64_t max_staging_bytes; /* per GPU; 0: no bound */
    eplb_plan plan;        /* of the chunk gathered last, when chunk_gathered */
    bool gathered;         /* a layer's move is in progress (its gather ran) */
    uint32_t gathered_layer;
    int32_t *rows;         /* [2][P]: the old and new row of the layer's move */
    eplb_plan_chunks chunks; /* the layer's move, cut to the staging bound */
    uint32_t chunk;        /* the chunk to run next */
    bool chunk_gathered;   /* its gather completed (plan holds it) */
    eplb_move_bytes moved; /* what the layer's chunks copied so far */
} weights_mover;

static eplb_status prefixed(eplb_status st, uint32_t layer, const char *what, eplb_error *err) {
    if (st != EPLB_OK && err) {
        char msg[EPLB_ERROR_MSG_MAX];
        snprintf(msg, sizeof msg, "layer %u: %s%s", layer, what, err->msg);
        eplb_error_set(err, st, "%s", msg);
    }
    return st;
}

/* Staging entries a GPU may hold for layer: the bound over one entry's
 * bytes, possibly 0 (one expert is larger than the whole bound);
 * UINT64_MAX without a bound. */
static uint64_t staging_entries(const weights_mover *m, uint32_t layer) {
    if (!m->max_staging_bytes || !m->layer_bytes[layer])
        return UINT64_MAX;
    return m->max_staging_bytes / m->layer_bytes[layer];
}

/* The layer's move cut to the staging bound.  An expert larger than the
 * whole bound cannot be staged at all: fine only when nothing needs it. */
static eplb_status mover_chunks(const weights_mover *m, uint32_t layer, uint32_t P, const int32_t *old_row,
                                const int32_t *new_row, eplb_plan_chunks *out, eplb_error *err) {
    uint64_t allowed = staging_entries(m, layer);
    /* eplb_plan_chunk's 0 is "no bound"; a plan never stages more than P
     * entries, so a bound past UINT32_MAX is none. */
    uint32_t bound = allowed == 0 || allowed >= UINT32_MAX ? 0 : (uint32_t)allowed;
    eplb_status st = eplb_plan_chunk(P, m->num_gpus, m->gpus_per_node, old_row, new_row, m->first_rank,
                                     m->held_ranks, bound, out, err);
    if (st == EPLB_OK && allowed == 0 && out->max_staging_per_gpu > 0) {
        eplb_plan_chunks_free(out);
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "one expert of this layer is %llu bytes, more than the staging bound (%llu MiB per GPU, "
                            "--max-staging-mib), and the move needs staging", (unsigned long long)m->layer_bytes[layer],
                            (unsigned long long)(m->max_staging_bytes >> 20));
    }
    return prefixed(st, layer, "", err);
}

/* Per layer, the most staging entries one held rank can need: a rank
 * stages at most one entry per slot it writes (S = P / G slots), and with
 * the bound a chunk stages at most staging_entries per GPU; a layer whose
 * expert is larger than the whole bound moves only without staging (0).
 * Reserved once at attach (eplb_backend_reserve_staging), so no rebalance
 * allocates staging.  Cost: S x the largest padded expert per rank on every
 * device, held for the attachment's life, at most --max-staging-mib per
 * rank. */
static void mover_rank_entries(const weights_mover *m, uint32_t *entries) {
    const uint32_t S = m->num_gpus ? m->num_physical / m->num_gpus : 0;
    for (uint32_t l = 0; l < m->num_layers; l++) {
        uint64_t allowed = staging_entries(m, l);
        entries[l] = allowed < S ? (uint32_t)allowed : S;
    }
}

static eplb_status chunk_plan(const weights_mover *m, uint32_t k, eplb_plan *plan, eplb_error *err) {
    const uint32_t P = m->num_physical;
    return eplb_plan_build(P, m->num_gpus, m->gpus_per_node, m->chunks.rows + (size_t)k * P,
                           m->chunks.rows + (size_t)(k + 1) * P, m->first_rank, m->held_ranks, plan, err);
}

static void mover_drop_plan(weights_mover *m) {
    eplb_plan_free(&m->plan);
    eplb_plan_chunks_free(&m->chunks);
    m->gathered = false;
    m->chunk_gathered = false;
    m->chunk = 0;
    m->moved = (eplb_move_bytes){ 0, 0, 0 };
}

/* Layout, then the buffers themselves (a shrunk shm object is EPLB_EDATALOSS:
 * it outranks any refusal), then every layer's plan, cut to the staging
 * bound (EPLB_EPRECONDITION when one needs a rank or expert we do not hold,
 * or more staging than the bound allows).  Touches nothing. */
static eplb_status mover_check(void *ctx, uint32_t L, uint32_t P, const int32_t *old_phy2log,
                               const int32_t *new_phy2log, eplb_error *err) {
    weights_mover *m = ctx;
    if (L != m->num_layers || P != m->num_physical)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "the attached weights are laid out for %u layers x %u slots, the model has %u x %u: "
                              "attach them again", m->num_layers, m->num_physical, L, P);
    eplb_status st = eplb_backend_check(m->backend, err);
    if (st != EPLB_OK)
        return st;
    for (uint32_t l = 0; l < L; l++) {
        eplb_plan_chunks c;
        st = mover_chunks(m, l, P, old_phy2log + (size_t)l * P, new_phy2log + (size_t)l * P, &c, err);
        eplb_plan_chunks_free(&c);
        if (st != EPLB_OK)
            return st;
    }
    return EPLB_OK;
}

/* Phase 1 of the layer: cut its move, gather chunk 0 (no slot written). */
static eplb_status mover_gather(void *ctx, uint32_t layer, uint32_t P, const int32_t *old_row,
                                const int32_t *new_row, eplb_error *err) {
    weights_mover *m = ctx;
    mover_drop_plan(m);
    if (layer >= m->num_layers || P != m->num_physical)
        return eplb_error_set(err, EPLB_EINTERNAL, "gather of layer %u x %u slots, the weights have %u x %u", layer,
                              P, m->num_layers, m->num_physical);
    eplb_status st = mover_chunks(m, layer, P, old_row, new_row, &m->chunks, err);
    if (st == EPLB_OK)
        st = prefixed(chunk_plan(m, 0, &m->plan, err), layer, "", err);
    if (st == EPLB_OK && m->plan.num_gather + m->plan.num_scatter > 0)
        st = eplb_backend_gather(m->backend, layer, &m->plan, err);
    if (st != EPLB_OK) {
        mover_drop_plan(m);
        return st;
    }
    m->gathered = true;
    m->chunk_gathered = true;
    m->gathered_layer = layer;
    memcpy(m->rows, old_row, (size_t)P * sizeof *m->rows);
    memcpy(m->rows + P, new_row, (size_t)P * sizeof *m->rows);
    return EPLB_OK;
}

/* Phase 2 of the layer: every chunk from where it stands (see above). */
static eplb_status mover_scatter(void *ctx, uint32_t layer, uint32_t P, const int32_t *old_row,
                                 const int32_t *new_row, eplb_move_bytes *bytes, eplb_error *err) {
    weights_mover *m = ctx;
    *bytes = (eplb_move_bytes){ 0, 0, 0 };
    if (!m->gathered || m->gathered_layer != layer || P != m->num_physical ||
        memcmp(m->rows, old_row, (size_t)P * sizeof *m->rows) != 0 ||
        memcmp(m->rows + P, new_row, (size_t)P * sizeof *m->rows) != 0)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "scatter of layer %u does not follow a gather of that layer and plan; nothing written",
                              layer);
    const uint64_t lb = m->layer_bytes[layer];
    const uint32_t n = m->chunks.num_chunks;
    char what[64];
    while (m->chunk < n) {
        eplb_status st = EPLB_OK;
        if (!m->chunk_gathered) {
            /* A later chunk: its sources are what the earlier chunks wrote. */
            eplb_plan_free(&m->plan);
            st = chunk_plan(m, m->chunk, &m->plan, err);
            /* Even with nothing to stage: the backend scatters only the
             * plan gathered last. */
            if (st == EPLB_OK && m->plan.num_gather + m->plan.num_scatter > 0)
                st = eplb_backend_gather(m->backend, layer, &m->plan, err);
            if (st != EPLB_OK) {
                snprintf(what, sizeof what, "chunk %u of %u: gather: ", m->chunk + 1, n);
                /* Earlier chunks wrote slots: the layer is part-way. */
                return prefixed(EPLB_EDATALOSS, layer, what, err);
            }
            m->chunk_gathered = true;
            m->moved.staged += (uint64_t)m->plan.num_gather * lb;
        } else if (m->chunk == 0) {
            m->moved.staged += (uint64_t)m->plan.num_gather * lb;
        }
        if (m->plan.num_scatter > 0) {
            st = eplb_backend_scatter(m->backend, layer, &m->plan, err);
            /* Slots were written: a failure to synchronize leaves the chunk
             * unknown, not "as it was" (scatter again completes it). */
            if (st == EPLB_OK && eplb_backend_synchronize(m->backend, err) != EPLB_OK)
                st = EPLB_EDATALOSS;
        }
        if (st != EPLB_OK) {
            if (n > 1) {
                snprintf(what, sizeof what, "chunk %u of %u: ", m->chunk + 1, n);
                prefixed(st, layer, what, err);
            }
            if (m->chunk == 0)
                m->moved.staged -= (uint64_t)m->plan.num_gather * lb; /* counted again on the retry */
            return st;
        }
        /* Each scatter op writes one slot, every tensor of it; staging is
         * not a live slot and is counted apart, as are copies between GPUs. */
        m->moved.written += (uint64_t)m->plan.num_scatter * lb;
        m->moved.cross_gpu += (uint64_t)m->plan.cross_gpu_copies * lb;
        m->chunk++;
        m->chunk_gathered = false;
    }
    *bytes = m->moved;
    return EPLB_OK;
}

static void mover_close(void *ctx) {
    weights_mover *m = ctx;
    if (!m)
        return;
    eplb_backend_close(m->backend);
    eplb_plan_free(&m->plan);
    eplb_plan_chunks_free(&m->chunks);
    free(m->rows);
    free(m->layer_bytes);
    free(m);
}

/* Device backends: the copy streams wait on the engine's event before the
 * first gather (eplb_backend_wait_event refuses a handle that does not
 * open: nothing moved). */
static eplb_status mover_begin(void *ctx, const uint8_t *wait_event, size_t len, eplb_error *err) {
    weights_mover *m = ctx;
    return eplb_backend_wait_event(m->backend, wait_event, len, err);
}

/* After the last scatter: the done event.  On a failure the backend is
 * synchronized once more (the phases already were; this is the fallback the
 * registry relies on when it commits without a done event). */
static eplb_status mover_end(void *ctx, uint8_t done_event[EPLB_EVENT_BYTES], bool *has, eplb_error *err) {
    weights_mover *m = ctx;
    *has = false;
    eplb_status st = eplb_backend_record_event(m->backend, done_event, err);
    if (st != EPLB_OK) {
        eplb_error serr;
        (void)eplb_backend_synchronize(m->backend, &serr);
        return st;
    }
    *has = true;
    return EPLB_OK;
}

/* shm weights (cpu backend): no device events; the registry refuses a wait
 * event for them. */
static const eplb_weights_ops mover_ops = {
    .check = mover_check,
    .gather = mover_gather,
    .scatter = mover_scatter,
    .close = mover_close,
};

static const eplb_weights_ops mover_event_ops = {
    .check = mover_check,
    .gather = mover_gather,
    .scatter = mover_scatter,
    .close = mover_close,
    .begin = mover_begin,
    .end = mover_end,
};

_Static_assert(EPLB_EVENT_BYTES == EPLB_EVENT_HANDLE_SIZE, "core and backend agree on an event handle's size");

/* ---- trust boundary -------------------------------------------------------- */

/* gRPC peer strings are URIs: "ipv6:%5B::1%5D:5000" in recent versions,
 * "ipv6:[::1]:5000" in older ones.  Decodes %XX into out (NUL-terminated);
 * false when it does not fit. */
static bool peer_decode(const char *in, char *out, size_t cap) {
    size_t n = 0;
    for (const char *p = in; *p; p++) {
        int c = (unsigned char)*p;
        if (c == '%' && isxdigit((unsigned char)p[1]) && isxdigit((unsigned char)p[2])) {
            char hex[3] = { p[1], p[2], 0 };
            c = (int)strtol(hex, NULL, 16);
            p += 2;
        }
        if (n + 1 >= cap)
            return false;
        out[n++] = (char)c;
    }
    out[n] = '\0';
    return true;
}

/* Is the caller on this host: a unix socket, 127.0.0.0/8, ::1, or
 * ::ffff:127.0.0.0/104?  NULL (fuzzers, unit tests) counts as local;
 * anything unparsable does not. */
static bool peer_is_local(const char *peer) {
    if (!peer)
        return true;
    if (strncmp(peer, "unix:", 5) == 0 || strncmp(peer, "unix-abstract:", 14) == 0)
        return true;
    char buf[256];
    if (!peer_decode(peer, buf, sizeof buf))
        return false;
    if (strncmp(buf, "ipv4:", 5) == 0) {
        char *host = buf + 5, *colon = strrchr(host, ':');
        if (colon)
            *colon = '\0';
        struct in_addr a;
        return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
    }
    if (strncmp(buf, "ipv6:", 5) == 0) {
        char *host = buf + 5;
        if (*host == '[') {
            char *close = strchr(++host, ']');
            if (!close)
                return false;
            *close = '\0';
        } else {
            char *colon = strrchr(host, ':'); /* "ipv6:::1:5000" */
            if (colon)
                *colon = '\0';
        }
        char *zone = strchr(host, '%'); /* "fe80::1%eth0" */
        if (zone)
            *zone = '\0';
        struct in6_addr a;
        if (inet_pton(AF_INET6, host, &a) != 1)
            return false;
        if (IN6_IS_ADDR_LOOPBACK(&a))
            return true;
        return IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127;
    }
    return false;
}

/* The peer rule of both weight RPCs: AttachWeights makes eplbd write memory
 * the caller names, DetachWeights drops an attachment a local engine relies
 * on; neither is for a caller elsewhere.  True (and out set to
 * PERMISSION_DENIED) when the peer is refused. */
static bool refuse_remote(const rpc_context *ctx, const char *method, rpc_reply *out) {
    if (ctx->allow_remote_weights || peer_is_local(out->peer))
        return false;
    rpc_reply_set(out, 7 /* PERMISSION_DENIED */,
                  "%s from %s: weight buffers may only be attached over a unix socket or from a "
                  "loopback address (127.0.0.0/8, ::1); eplbd --allow-remote-weights lifts this",
                  method, out->peer);
    return true;
}

/* ---- AttachWeights -------------------------------------------------------- */

/* Build the backend's description from the request, in the arena.  Shape
 * checks the description cannot express (counts) are made here; the rest is
 * eplb_buffers_validate's, inside eplb_backend_open_by_name. */
static eplb_status desc_from_upb(const eplb_v1_AttachWeightsRequest *m, const eplb_model_shape *shape,
                                 const char *shm_prefix, upb_Arena *arena, eplb_buffers_desc *d,
                                 uint64_t *layer_bytes, eplb_error *err) {
    memset(d, 0, sizeof *d);
    int32_t kind = eplb_v1_AttachWeightsRequest_kind(m);
    if (kind == eplb_v1_BUFFER_KIND_SHM)
        d->kind = EPLB_BUFFERS_SHM;
    else if (kind == eplb_v1_BUFFER_KIND_HIP_IPC)
        d->kind = EPLB_BUFFERS_HIP_IPC;
    else if (kind == eplb_v1_BUFFER_KIND_CUDA_IPC)
        d->kind = EPLB_BUFFERS_CUDA_IPC;
    else
        return eplb_error_set(err, EPLB_EINVAL,
                              "kind must be BUFFER_KIND_SHM, BUFFER_KIND_HIP_IPC or BUFFER_KIND_CUDA_IPC");
    bool device_kind = d->kind != EPLB_BUFFERS_SHM;
    uint32_t first = eplb_v1_AttachWeightsRequest_first_rank(m);
    uint32_t held = eplb_v1_AttachWeightsRequest_num_ranks(m);
    if (first == 0 && held == 0)
        held = shape->ep_size;
    if (held == 0 || first >= shape->ep_size || held > shape->ep_size - first)
        return eplb_error_set(err, EPLB_EINVAL,
                              "first_rank %u and num_ranks %u: the ranks held must be 1..%u ranks within the "
                              "model's ep_size %u", first, eplb_v1_AttachWeightsRequest_num_ranks(m), shape->ep_size,
                              shape->ep_size);
    size_t nranks, nlayers;
    const eplb_v1_RankBuffer *const *ranks = eplb_v1_AttachWeightsRequest_ranks(m, &nranks);
    const eplb_v1_LayerWeights *const *layers = eplb_v1_AttachWeightsRequest_layers(m, &nlayers);
    if (nranks != held)
        return eplb_error_set(err, EPLB_EINVAL, "ranks has %zu entries, want %u (ranks %u..%u of ep_size %u)",
                              nranks, held, first, first + held - 1, shape->ep_size);
    if (nlayers != shape->num_layers)
        return eplb_error_set(err, EPLB_EINVAL, "layers has %zu entries, the model has %u MoE layers", nlayers,
                              shape->num_layers);
    eplb_rank_buffers *rb = upb_Arena_Malloc(arena, nranks * sizeof *rb);
    eplb_layer_desc *ld = upb_Arena_Malloc(arena, nlayers * sizeof *ld);
    if (!rb || !ld)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    for (size_t g = 0; g < nranks; g++) {
        size_t nreg;
        const eplb_v1_MemoryRegion *const *regs = eplb_v1_RankBuffer_regions(ranks[g], &nreg);
        /* Without regions the rank's single buffer is region 0. */
        size_t n = nreg ? nreg : 1;
        if (n > EPLB_BUFFERS_MAX_REGIONS)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu] has %zu regions; at most %d", g, n,
                                  EPLB_BUFFERS_MAX_REGIONS);
        eplb_region *loc = upb_Arena_Malloc(arena, n * sizeof *loc);
        if (!loc)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        memset(loc, 0, n * sizeof *loc);
        for (size_t r = 0; r < n; r++) {
            upb_StringView name = nreg ? eplb_v1_MemoryRegion_shm_name(regs[r]) : eplb_v1_RankBuffer_shm_name(ranks[g]);
            upb_StringView handle =
                nreg ? eplb_v1_MemoryRegion_ipc_handle(regs[r]) : eplb_v1_RankBuffer_hip_ipc_handle(ranks[g]);
            if (name.size > EPLB_SHM_NAME_MAX)
                return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu].regions[%zu].shm_name is longer than %d bytes", g,
                                      r, EPLB_SHM_NAME_MAX);
            if (device_kind && handle.size != EPLB_IPC_HANDLE_SIZE)
                return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu].regions[%zu].ipc_handle is %zu bytes, want %d", g,
                                      r, handle.size, EPLB_IPC_HANDLE_SIZE);
            /* An absent string is {NULL, 0}: memcpy from NULL is undefined
             * even for 0 bytes. */
            if (name.size && memchr(name.data, '\0', name.size))
                return eplb_error_set(err, EPLB_EINVAL, "ranks[%zu].regions[%zu].shm_name contains a NUL byte", g,
                                      r);
            if (name.size)
                memcpy(loc[r].shm_name, name.data, name.size);
            /* A malformed name is the backend's INVALID_ARGUMENT; a
             * well-formed one outside the prefix is refused here, before
             * anything opens it. */
            const char *nm = loc[r].shm_name;
            if (d->kind == EPLB_BUFFERS_SHM && shm_prefix[0] && nm[0] == '/' && nm[1] && !strchr(nm + 1, '/') &&
                strncmp(nm, shm_prefix, strlen(shm_prefix)) != 0)
                return eplb_error_set(err, EPLB_EPERM,
                                      "ranks[%zu].regions[%zu].shm_name \"%s\" is not under the allowed prefix \"%s\" "
                                      "(eplbd --shm-prefix)", g, r, nm, shm_prefix);
            if (handle.size == EPLB_IPC_HANDLE_SIZE)
                memcpy(loc[r].ipc_handle, handle.data, handle.size);
            loc[r].device = nreg ? eplb_v1_MemoryRegion_device(regs[r]) : eplb_v1_RankBuffer_device(ranks[g]);
            loc[r].size = nreg ? eplb_v1_MemoryRegion_size(regs[r]) : eplb_v1_RankBuffer_size(ranks[g]);
        }
        rb[g].num_regions = (uint32_t)n;
        rb[g].regions = loc;
    }
    for (size_t l = 0; l < nlayers; l++) {
        size_t nt;
        const eplb_v1_ExpertTensor *const *tensors = eplb_v1_LayerWeights_tensors(layers[l], &nt);
        if (nt == 0 || nt > EPLB_BUFFERS_MAX_TENSORS)
            return eplb_error_set(err, EPLB_EINVAL, "layers[%zu] has %zu tensors (1..%d)", l, nt,
                                  EPLB_BUFFERS_MAX_TENSORS);
        eplb_tensor_desc *td = upb_Arena_Malloc(arena, nt * sizeof *td);
        if (!td)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        memset(td, 0, nt * sizeof *td);
        layer_bytes[l] = 0;
        for (size_t t = 0; t < nt; t++) {
            upb_StringView name = eplb_v1_ExpertTensor_name(tensors[t]);
            if (name.size == 0 || name.size > EPLB_TENSOR_NAME_MAX)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%zu].tensors[%zu].name must be 1..%d bytes", l, t,
                                      EPLB_TENSOR_NAME_MAX);
            memcpy(td[t].name, name.data, name.size);
            td[t].bytes_per_expert = eplb_v1_ExpertTensor_bytes_per_expert(tensors[t]);
            layer_bytes[l] += td[t].bytes_per_expert;
            size_t nr;
            const eplb_v1_TensorLayout *const *lay = eplb_v1_ExpertTensor_ranks(tensors[t], &nr);
            if (nr != nranks)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%zu].tensors[%zu] (%s).ranks has %zu entries, want %zu",
                                      l, t, td[t].name, nr, nranks);
            eplb_tensor_layout *tl = upb_Arena_Malloc(arena, nr * sizeof *tl);
            if (!tl)
                return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
            for (size_t g = 0; g < nr; g++) {
                tl[g].region = eplb_v1_TensorLayout_region(lay[g]);
                tl[g].offset = eplb_v1_TensorLayout_offset(lay[g]);
                tl[g].stride = eplb_v1_TensorLayout_stride(lay[g]);
            }
            td[t].ranks = tl;
        }
        ld[l].num_tensors = (uint32_t)nt;
        ld[l].tensors = td;
    }
    d->num_layers = (uint32_t)nlayers;
    d->num_ranks = shape->ep_size;
    d->first_rank = first;
    d->held_ranks = held;
    d->ranks = rb;
    d->layers = ld;
    return EPLB_OK;
}

void rpc_attach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    /* Shm names and IPC handles only mean something on this host; from
     * anywhere else an attachment is a request to write this host's memory. */
    if (refuse_remote(ctx, "AttachWeights", out))
        return;
    const eplb_v1_AttachWeightsRequest *m = eplb_v1_AttachWeightsRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.AttachWeightsRequest");
        return;
    }
    rpc_reply_note_model(out, eplb_v1_AttachWeightsRequest_model_id(m).data, eplb_v1_AttachWeightsRequest_model_id(m).size);
    const char *id = rpc_string(eplb_v1_AttachWeightsRequest_model_id(m), 4 * EPLB_MODEL_NAME_MAX, "model_id",
                                arena, &err);
    const char *backend = rpc_string(eplb_v1_AttachWeightsRequest_backend(m), 16, "backend", arena, &err);
    eplb_model_shape shape;
    if (!id || !backend || eplb_model_name_check(id, "model_id", &err) != EPLB_OK ||
        eplb_registry_get_shape(ctx->registry, id, &shape, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    const char *prefix = ctx->shm_prefix ? ctx->shm_prefix : RPC_DEFAULT_SHM_PREFIX;
    eplb_shm_policy policy = { .prefix = prefix,
                               .uids = ctx->shm_uids,
                               .num_uids = (uint32_t)(ctx->num_shm_uids < RPC_MAX_SHM_UIDS ? ctx->num_shm_uids
                                                                                           : RPC_MAX_SHM_UIDS) };
    weights_mover *mv = calloc(1, sizeof *mv);
    uint64_t *layer_bytes = calloc(shape.num_layers ? shape.num_layers : 1, sizeof *layer_bytes);
    int32_t *rows = calloc(2 * (size_t)(shape.num_physical ? shape.num_physical : 1), sizeof *rows);
    eplb_buffers_desc desc;
    eplb_status st = !mv || !layer_bytes || !rows
                         ? eplb_error_set(&err, EPLB_ENOMEM, "out of memory")
                         : desc_from_upb(m, &shape, prefix, arena, &desc, layer_bytes, &err);
    if (st == EPLB_OK)
        st = eplb_backend_open(backend[0] ? backend : ctx->default_backend, &desc, &policy, shape.num_physical,
                               &mv->backend, &err);
    if (st != EPLB_OK) {
        free(mv);
        free(layer_bytes);
        free(rows);
        rpc_reply_from_error(out, &err);
        return;
    }
    mv->rows = rows;
    mv->num_layers = shape.num_layers;
    mv->num_physical = shape.num_physical;
    mv->num_gpus = shape.ep_size;
    mv->gpus_per_node = shape.ep_size / shape.num_nodes;
    eplb_backend_held(mv->backend, &mv->first_rank, &mv->held_ranks);
    mv->layer_bytes = layer_bytes;
    mv->max_staging_bytes = ctx->max_staging_bytes;
    const char *name = eplb_backend_name(mv->backend);
    uint64_t staging_total = 0, staging_per_gpu = 0;
    uint32_t *entries = calloc(shape.num_layers ? shape.num_layers : 1, sizeof *entries);
    if (entries)
        mover_rank_entries(mv, entries);
    st = !entries ? eplb_error_set(&err, EPLB_ENOMEM, "out of memory")
                  : eplb_backend_reserve_staging(mv->backend, entries, &staging_total, &staging_per_gpu, &err);
    free(entries);
    if (st != EPLB_OK) {
        mover_close(mv);
        rpc_reply_from_error(out, &err);
        return;
    }
    uint64_t total = 0;
    for (uint32_t l = 0; l < shape.num_layers; l++)
        total += layer_bytes[l];
    const eplb_weights_ops *ops = eplb_backend_has_events(mv->backend) ? &mover_event_ops : &mover_ops;
    /* The registry owns mv from here, on success or not. */
    if (eplb_registry_attach_weights(ctx->registry, id, ops, mv, &shape, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_AttachWeightsResponse *resp = eplb_v1_AttachWeightsResponse_new(arena);
    if (resp) {
        eplb_v1_AttachWeightsResponse_set_backend(resp, upb_StringView_FromString(name));
        eplb_v1_AttachWeightsResponse_set_bytes_per_slot(resp, total);
        eplb_v1_AttachWeightsResponse_set_staging_bytes(resp, staging_total);
        eplb_v1_AttachWeightsResponse_set_staging_bytes_per_gpu(resp, staging_per_gpu);
        out->body = eplb_v1_AttachWeightsResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}

void rpc_detach_weights(rpc_context *ctx, upb_Arena *arena, const char *req, size_t len, rpc_reply *out) {
    eplb_error err;
    eplb_error_clear(&err);
    /* The same rule as AttachWeights: only a local caller may detach. */
    if (refuse_remote(ctx, "DetachWeights", out))
        return;
    const eplb_v1_DetachWeightsRequest *m = eplb_v1_DetachWeightsRequest_parse(req, len, arena);
    if (!m) {
        rpc_reply_malformed(out, "eplb.v1.DetachWeightsRequest");
        return;
    }
    rpc_reply_note_model(out, eplb_v1_DetachWeightsRequest_model_id(m).data, eplb_v1_DetachWeightsRequest_model_id(m).size);
    const char *id = rpc_string(eplb_v1_DetachWeightsRequest_model_id(m), 4 * EPLB_MODEL_NAME_MAX, "model_id",
                                arena, &err);
    bool detached = false;
    if (!id || eplb_model_name_check(id, "model_id", &err) != EPLB_OK ||
        eplb_registry_detach_weights(ctx->registry, id, &detached, &err) != EPLB_OK) {
        rpc_reply_from_error(out, &err);
        return;
    }
    eplb_v1_DetachWeightsResponse *resp = eplb_v1_DetachWeightsResponse_new(arena);
    if (resp) {
        eplb_v1_DetachWeightsResponse_set_detached(resp, detached);
        out->body = eplb_v1_DetachWeightsResponse_serialize(resp, arena, &out->body_len);
    }
    if (!out->body)
        rpc_reply_set(out, 8, "out of memory encoding the response");
}
