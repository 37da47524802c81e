/* rpc_convert.c -- eplb.v1 messages <-> core types. */
#include "rpc_convert.h"

#include <stdio.h>
#include <string.h>

const char *rpc_string(upb_StringView v, size_t max, const char *field, upb_Arena *arena,
                       eplb_error *err) {
    if (v.size > max) {
        eplb_error_set(err, EPLB_EINVAL, "%s is %zu bytes long (at most %zu)", field, v.size, max);
        return NULL;
    }
    if (v.size && memchr(v.data, '\0', v.size)) {
        eplb_error_set(err, EPLB_EINVAL, "%s contains a NUL byte", field);
        return NULL;
    }
    char *s = upb_Arena_Malloc(arena, v.size + 1);
    if (!s) {
        eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        return NULL;
    }
    if (v.size)
        memcpy(s, v.data, v.size);
    s[v.size] = '\0';
    return s;
}

static eplb_moe_spec moe_from_upb(const eplb_v1_MoeSpec *m) {
    eplb_moe_spec s = {
        .num_moe_layers = eplb_v1_MoeSpec_num_moe_layers(m),
        .num_logical_experts = eplb_v1_MoeSpec_num_logical_experts(m),
        .num_physical_experts = eplb_v1_MoeSpec_num_physical_experts(m),
        .num_local_physical_experts = eplb_v1_MoeSpec_num_local_physical_experts(m),
        .num_routed_experts = eplb_v1_MoeSpec_num_routed_experts(m),
        .num_shared_experts = eplb_v1_MoeSpec_num_shared_experts(m),
        .num_redundant_experts = eplb_v1_MoeSpec_num_redundant_experts(m),
        .num_expert_groups = eplb_v1_MoeSpec_num_expert_groups(m),
    };
    return s;
}

eplb_status rpc_handle_from_upb(const eplb_v1_ModelHandle *m, const char *field, upb_Arena *arena,
                                const eplb_handle **out, eplb_error *err) {
    eplb_handle *first = NULL, *prev = NULL;
    char name[EPLB_PATH_MAX + 16];
    size_t base = (size_t)snprintf(name, sizeof name, "%s", field);
    *out = NULL;
    /* Iterative, and bounded: a hostile request cannot make this recurse. */
    for (int depth = 0; m && depth <= EPLB_HANDLE_MAX_DEPTH + 1; depth++) {
        eplb_handle *h = upb_Arena_Malloc(arena, sizeof *h);
        if (!h)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        memset(h, 0, sizeof *h);
        snprintf(name + base, sizeof name - base, ".architecture");
        h->architecture = rpc_string(eplb_v1_ModelHandle_architecture(m), EPLB_ARCH_MAX, name,
                                     arena, err);
        if (!h->architecture)
            return err ? err->code : EPLB_EINVAL;
        size_t n = 0;
        const int32_t *ifaces = eplb_v1_ModelHandle_interfaces(m, &n);
        for (size_t i = 0; i < n; i++) {
            /* Unknown interface values are ignored: newer clients may know
             * more interfaces than this server. */
            if (ifaces[i] == eplb_v1_MIXTURE_OF_EXPERTS)
                h->interfaces |= EPLB_IFACE_MOE;
            else if (ifaces[i] == eplb_v1_SUPPORTS_MULTIMODAL)
                h->interfaces |= EPLB_IFACE_MULTIMODAL;
        }
        if (eplb_v1_ModelHandle_has_moe(m)) {
            h->has_moe = true;
            h->moe = moe_from_upb(eplb_v1_ModelHandle_moe(m));
        }
        if (prev)
            prev->language_model = h;
        else
            first = h;
        prev = h;
        base += (size_t)snprintf(name + base, sizeof name - base, ".language_model");
        m = eplb_v1_ModelHandle_has_language_model(m) ? eplb_v1_ModelHandle_language_model(m) : NULL;
    }
    *out = first;
    return EPLB_OK;
}

eplb_parallel rpc_parallel_from_upb(const eplb_v1_ParallelConfig *m) {
    eplb_parallel p = { 0 };
    if (!m)
        return p;
    p.enable_eplb = eplb_v1_ParallelConfig_enable_eplb(m);
    p.ep_size = eplb_v1_ParallelConfig_ep_size(m);
    p.num_nodes = eplb_v1_ParallelConfig_num_nodes(m);
    p.window_size = eplb_v1_ParallelConfig_window_size(m);
    p.step_interval = eplb_v1_ParallelConfig_step_interval(m);
    p.num_redundant_experts = eplb_v1_ParallelConfig_num_redundant_experts(m);
    p.auto_rebalance = eplb_v1_ParallelConfig_auto_rebalance(m);
    eplb_rebalance_knobs *k = &p.defaults;
    k->policy = (uint32_t)eplb_v1_ParallelConfig_default_policy(m);
    k->target_balancedness = eplb_v1_ParallelConfig_target_balancedness(m);
    k->max_bytes_moved = eplb_v1_ParallelConfig_max_bytes_moved(m);
    k->max_slots_moved = eplb_v1_ParallelConfig_max_slots_moved(m);
    k->min_improvement = eplb_v1_ParallelConfig_min_improvement(m);
    k->expert_bytes = eplb_v1_ParallelConfig_expert_bytes(m);
    if (eplb_v1_ParallelConfig_has_link_costs(m)) {
        const eplb_v1_LinkCosts *c = eplb_v1_ParallelConfig_link_costs(m);
        k->cost_intra_node = eplb_v1_LinkCosts_intra_node(c);
        k->cost_cross_node = eplb_v1_LinkCosts_cross_node(c);
    }
    return p;
}

bool rpc_arena_view(const char *s, upb_Arena *arena, upb_StringView *out) {
    size_t n = strlen(s);
    char *copy = n ? upb_Arena_Malloc(arena, n) : NULL;
    if (n && !copy)
        return false;
    if (n)
        memcpy(copy, s, n);
    *out = upb_StringView_FromDataAndSize(copy, n);
    return true;
}

/* ---------------------------------------------------------------------------
 * The placement's maps on the wire.
 *
 * upb encodes a packed repeated int32 at some 30-60 instructions a value;
 * the maps are most of a placement answer (58 x 288 + 58 x 256 values at
 * DeepSeek-V3 size, a sixth of a dry-run Rebalance's instructions when upb
 * encoded them).  put_packed writes the same bytes upb would for the field
 * (tag, length, varints; nothing for an empty array) in a few instructions a
 * value, and rpc_placement_to_upb hands them to upb as the message's unknown
 * fields, which upb_Encode copies as they are after the known fields.  Field
 * order on the wire is free in protobuf; every parser reads the same message.
 * The server itself never reads these fields back from the message it
 * built.
 * ------------------------------------------------------------------------- */

#define PACKED_HEADER_MAX 16 /* a tag and a length, each a varint of <= 10 bytes */

/* Placement's field numbers (protos/eplb/v1/eplb.proto). */
enum {
    PLACEMENT_PHYSICAL_TO_LOGICAL = 7,   /* repeated int32 */
    PLACEMENT_LOGICAL_REPLICA_COUNT = 8, /* repeated int32 */
    PLACEMENT_LOGICAL_TO_PHYSICAL = 10,  /* repeated sint32 */
};

static inline size_t put_varint(unsigned char *q, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        q[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    q[n++] = (unsigned char)v;
    return n;
}

/* Writes field `field` (packed int32, or sint32 when zigzag) with the n
 * values of a at out; returns the end.  Needs PACKED_HEADER_MAX + 10 * n
 * bytes (5 * n + PACKED_HEADER_MAX for sint32). */
static char *put_packed(char *out, uint32_t field, const int32_t *a, size_t n, bool zigzag) {
    if (n == 0)
        return out; /* as upb: an empty repeated field is not written */
    unsigned char *data = (unsigned char *)out + PACKED_HEADER_MAX, *q = data;
    /* Values below 2^14 (the maps' ids and counts) take one or two bytes,
     * written without a branch on which; the rest the general way. */
#define PUT_SMALL(v)                                          \
    do {                                                      \
        uint32_t two_ = (v) >= 0x80;                          \
        q[0] = (unsigned char)(((v) & 0x7F) | (two_ << 7));   \
        q[1] = (unsigned char)((v) >> 7);                     \
        q += 1 + two_;                                        \
    } while (0)
    if (zigzag) {
        for (size_t i = 0; i < n; i++) {
            uint32_t x = (uint32_t)a[i], v = (x << 1) ^ (0u - (x >> 31));
            if (v < 0x4000)
                PUT_SMALL(v);
            else
                q += put_varint(q, v);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint32_t v = (uint32_t)a[i];
            if (v < 0x4000)
                PUT_SMALL(v);
            else
                q += put_varint(q, (uint64_t)(int64_t)a[i]); /* int32: a negative is 10 bytes */
        }
    }
#undef PUT_SMALL
    size_t len = (size_t)(q - data);
    unsigned char hdr[PACKED_HEADER_MAX];
    size_t h = put_varint(hdr, ((uint64_t)field << 3) | 2);
    h += put_varint(hdr + h, len);
    memcpy(out, hdr, h);
    memmove(out + h, data, len);
    return out + h + len;
}

eplb_v1_Placement *rpc_placement_to_upb(const char *model_id, const eplb_placement *p,
                                        eplb_move_state state, const char *state_reason, bool with_log2phy,
                                        upb_Arena *arena) {
    eplb_v1_Placement *m = eplb_v1_Placement_new(arena);
    if (!m)
        return NULL;
    eplb_v1_Placement_set_model_id(m, upb_StringView_FromString(model_id));
    eplb_v1_Placement_set_epoch(m, p->epoch);
    eplb_v1_Placement_set_num_layers(m, p->num_layers);
    eplb_v1_Placement_set_num_physical_experts(m, p->num_physical);
    eplb_v1_Placement_set_num_logical_experts(m, p->num_logical);
    eplb_v1_Placement_set_num_valid_physical_experts(m, p->num_valid_physical);
    eplb_v1_Placement_set_max_replicas(m, p->max_replicas);
    eplb_v1_Placement_set_needs_weight_reload(m, state == EPLB_MOVE_NEEDS_RELOAD);
    eplb_v1_Placement_set_state(m, (int32_t)state);
    upb_StringView reason;
    if (!rpc_arena_view(state_reason ? state_reason : "", arena, &reason))
        return NULL;
    eplb_v1_Placement_set_state_reason(m, reason);

    size_t n_p2l = (size_t)p->num_layers * p->num_physical;
    size_t n_cnt = (size_t)p->num_layers * p->num_logical;
    size_t n_l2p = with_log2phy ? n_cnt * p->max_replicas : 0;
    /* The maps, pre-encoded as the message's unknown fields (see
     * put_packed): the same fields on the wire, written after the others. */
    size_t cap = 3 * PACKED_HEADER_MAX + 10 * (n_p2l + n_cnt) + 5 * n_l2p;
    char *buf = upb_Arena_Malloc(arena, cap);
    if (!buf)
        return NULL;
    char *end = buf;
    end = put_packed(end, PLACEMENT_PHYSICAL_TO_LOGICAL, p->phy2log, n_p2l, false);
    end = put_packed(end, PLACEMENT_LOGICAL_REPLICA_COUNT, p->logcnt, n_cnt, false);
    if (with_log2phy)
        end = put_packed(end, PLACEMENT_LOGICAL_TO_PHYSICAL, p->log2phy, n_l2p, true);
    if (end != buf && !_upb_Message_AddUnknown((upb_Message *)m, buf, (size_t)(end - buf), arena))
        return NULL;
    return m;
}

uint64_t rpc_placement_wire_bound(const eplb_placement *p, bool with_log2phy) {
    uint64_t L = p->num_layers, N = p->num_logical, P = p->num_physical;
    /* int32 varints: 10 bytes for a negative, 5 at most otherwise; sint32 5. */
    return 10 * L * P + 5 * L * N + (with_log2phy ? 5 * L * N * p->max_replicas : 0) + 18 * L + 4096;
}

bool rpc_placement_fits(const eplb_placement *p, bool with_log2phy, uint64_t max_bytes, rpc_reply *out) {
    uint64_t bound = rpc_placement_wire_bound(p, with_log2phy);
    if (!max_bytes || bound <= max_bytes)
        return true;
    rpc_reply_set(out, 8 /* RESOURCE_EXHAUSTED */,
                  "the placement of %u layers x %u slots%s may take %llu bytes, over the server's largest response of "
                  "%llu bytes (--max-message-bytes)%s",
                  p->num_layers, p->num_physical, with_log2phy ? " with logical_to_physical" : "",
                  (unsigned long long)bound, (unsigned long long)max_bytes,
                  with_log2phy ? ": ask without include_logical_to_physical and derive it from physical_to_logical" : "");
    return false;
}
