/* eplb_next.c -- a rebalance's next placement (see eplb_next.h).
 *
 * POLICY_DEEPSEEK: DeepSeek's placement from scratch, then the slot order
 * (MIN_TRAFFIC relabels GPU packs to their old holders; PRESERVE keeps
 * experts in their slots within a GPU).
 *
 * POLICY_INCREMENTAL: the from-scratch placement is computed first anyway
 * (with MIN_TRAFFIC order): it is the reference of the target and the
 * fallback.  Then, from the current placement, eplb_incremental_rebalance
 * runs until every layer is within target of the reference, or the budget
 * ends.  A layer it could not bring to the target takes the reference's
 * row instead when that is better balanced and fits what is left of the
 * budget.  Cost: the from-scratch policy plus O(changes x candidates);
 * memory: two more [L][P] + [L][N] arrays. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_incremental.h"
#include "eplb_next.h"
#include "eplb_plan.h"

void eplb_next_copies(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node, uint32_t num_logical,
                      const int32_t *old_row, const int32_t *new_row, uint64_t *cross_gpu, uint64_t *cross_node) {
    *cross_gpu = *cross_node = 0;
    if (!num_gpus || num_physical % num_gpus || !gpus_per_node)
        return;
    const uint32_t S = num_physical / num_gpus;
    for (uint32_t g = 0; g < num_gpus; g++)
        for (uint32_t i = 0; i < S; i++) {
            int32_t e = new_row[g * S + i];
            if (e < 0 || (uint32_t)e >= num_logical)
                continue;
            bool seen = false; /* one copy per (GPU, expert): the first new slot of it */
            for (uint32_t j = 0; j < i && !seen; j++)
                seen = new_row[g * S + j] == e;
            bool held = false;
            for (uint32_t j = 0; j < S && !held; j++)
                held = old_row[g * S + j] == e;
            if (seen || held)
                continue;
            (*cross_gpu)++;
            uint32_t n0 = g / gpus_per_node * gpus_per_node;
            bool on_node = false;
            for (uint32_t k = n0 * S; k < (n0 + gpus_per_node) * S && !on_node; k++)
                on_node = old_row[k] == e;
            *cross_node += !on_node;
        }
}

static uint32_t gpus_per_node_of(const eplb_policy_shape *s) {
    return s->num_nodes && s->num_gpus % s->num_nodes == 0 ? s->num_gpus / s->num_nodes : s->num_gpus;
}

static void count_copies(const eplb_policy_shape *s, const int32_t *old, const int32_t *new, uint64_t *gpu,
                         uint64_t *node, uint64_t *slots) {
    *gpu = *node = 0;
    if (slots)
        *slots = 0;
    for (uint32_t l = 0; l < s->num_layers; l++) {
        uint64_t a, b;
        const size_t off = (size_t)l * s->num_physical;
        eplb_next_copies(s->num_physical, s->num_gpus, gpus_per_node_of(s), s->num_logical, old + off, new + off,
                         &a, &b);
        *gpu += a;
        *node += b;
        if (slots)
            for (uint32_t i = 0; i < s->num_physical; i++)
                *slots += old[off + i] != new[off + i];
    }
}

/* The most GPUs per node MIN_TRAFFIC's reassignment handles (its cost is
 * cubic in them); beyond it the reference keeps PRESERVE order. */
#define NEXT_MIN_TRAFFIC_MAX_GPUS_PER_NODE 256u

static eplb_status from_scratch(const eplb_policy_shape *s, eplb_slot_order order, const int32_t *cur,
                                const int64_t *load, int32_t *phy2log, int32_t *logcnt, eplb_error *err) {
    eplb_status st = eplb_policy_rebalance(s, load, phy2log, logcnt, err);
    if (st != EPLB_OK)
        return st;
    const uint32_t L = s->num_layers, P = s->num_physical;
    if (order == EPLB_SLOT_MIN_TRAFFIC)
        /* The policy's nodes are interchangeable only on its hierarchical path. */
        eplb_plan_reassign_gpus(L, P, s->num_gpus, eplb_policy_is_hierarchical(s) ? s->num_nodes : 1, cur, phy2log);
    if (order != EPLB_SLOT_ALGORITHM)
        eplb_policy_preserve_slots(L, P, s->num_gpus, cur, phy2log);
    return EPLB_OK;
}

static eplb_status incremental(const eplb_next_request *req, int32_t *phy2log, int32_t *logcnt,
                               double *layer_before, double *layer_after, eplb_next_report *rep, eplb_error *err) {
    const eplb_policy_shape *s = &req->shape;
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    const eplb_rebalance_knobs *k = &req->knobs;
    const double target = k->target_balancedness > 0 ? k->target_balancedness : EPLB_DEFAULT_TARGET_BALANCEDNESS;
    int32_t *ref = eplb_malloc((size_t)L * P * sizeof *ref);
    int32_t *ref_cnt = eplb_malloc((size_t)L * N * sizeof *ref_cnt);
    double *ref_layer = eplb_malloc((size_t)L * sizeof *ref_layer);
    double *target_max = eplb_malloc((size_t)L * sizeof *target_max);
    double *inc_layer = eplb_malloc((size_t)L * sizeof *inc_layer);
    eplb_status st = EPLB_OK;
    if (!ref || !ref_cnt || !ref_layer || !target_max || !inc_layer) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory for an incremental %ux%u rebalance", L, P);
        goto out;
    }
    eplb_slot_order ref_order =
        gpus_per_node_of(s) <= NEXT_MIN_TRAFFIC_MAX_GPUS_PER_NODE ? EPLB_SLOT_MIN_TRAFFIC : EPLB_SLOT_PRESERVE;
    if ((st = from_scratch(s, ref_order, req->cur_phy2log, req->logical_load, ref, ref_cnt, err)) != EPLB_OK)
        goto out;
    rep->balancedness_reference = eplb_policy_balancedness(L, N, P, G, req->logical_load, ref, ref_cnt, ref_layer);
    uint64_t dummy;
    count_copies(s, req->cur_phy2log, ref, &rep->reference_copies_cross_gpu, &dummy, NULL);
    /* Per layer: max = mean / balancedness, and mean (total / G) is fixed. */
    for (uint32_t l = 0; l < L; l++) {
        double total = 0;
        for (uint32_t e = 0; e < N; e++)
            total += (double)req->logical_load[(size_t)l * N + e];
        double mean = total / G;
        target_max[l] = total > 0 ? mean / ref_layer[l] / target : 0;
    }

    memcpy(phy2log, req->cur_phy2log, (size_t)L * P * sizeof *phy2log);
    memcpy(logcnt, req->cur_logcnt, (size_t)L * N * sizeof *logcnt);
    const uint64_t max_copies = k->max_bytes_moved ? k->max_bytes_moved / k->expert_bytes : 0;
    const bool copies_budget = k->max_bytes_moved != 0, slots_budget = k->max_slots_moved != 0;
    eplb_incremental_params ip = {
        .shape = *s,
        .logical_load = req->logical_load,
        .target_max = target_max,
        .cost_intra_node = k->cost_intra_node > 0 ? k->cost_intra_node : EPLB_DEFAULT_COST_INTRA_NODE,
        .cost_cross_node = k->cost_cross_node > 0 ? k->cost_cross_node : EPLB_DEFAULT_COST_CROSS_NODE,
        .max_copies = max_copies,
        .max_slots = k->max_slots_moved,
        .copies_budget = copies_budget,
        .slots_budget = slots_budget,
        .hierarchical = eplb_policy_is_hierarchical(s) && s->num_nodes > 1,
    };
    eplb_incremental_stats is;
    if ((st = eplb_incremental_rebalance(&ip, phy2log, logcnt, &is, err)) != EPLB_OK)
        goto out;
    eplb_policy_balancedness(L, N, P, G, req->logical_load, phy2log, logcnt, inc_layer);

    /* Fallback, layer by layer in order: a layer short of its target takes
     * the reference row when that is better and the budget still allows. */
    uint64_t used_copies = 0, used_node = 0, used_slots = 0;
    count_copies(s, req->cur_phy2log, phy2log, &used_copies, &used_node, &used_slots);
    uint32_t short_layers = 0;
    const uint32_t gpn = gpus_per_node_of(s);
    for (uint32_t l = 0; l < L; l++) {
        const size_t off = (size_t)l * P;
        if (!(inc_layer[l] < ref_layer[l] * target - 1e-12))
            continue;
        if (!(ref_layer[l] > inc_layer[l])) {
            short_layers++;
            continue;
        }
        uint64_t ig, in, rg, rn, islots = 0, rslots = 0;
        eplb_next_copies(P, G, gpn, N, req->cur_phy2log + off, phy2log + off, &ig, &in);
        eplb_next_copies(P, G, gpn, N, req->cur_phy2log + off, ref + off, &rg, &rn);
        for (uint32_t i = 0; i < P; i++) {
            islots += req->cur_phy2log[off + i] != phy2log[off + i];
            rslots += req->cur_phy2log[off + i] != ref[off + i];
        }
        if ((copies_budget && used_copies - ig + rg > max_copies) ||
            (slots_budget && used_slots - islots + rslots > k->max_slots_moved)) {
            short_layers++;
            continue;
        }
        used_copies = used_copies - ig + rg;
        used_slots = used_slots - islots + rslots;
        memcpy(phy2log + off, ref + off, (size_t)P * sizeof *phy2log);
        memcpy(logcnt + (size_t)l * N, ref_cnt + (size_t)l * N, (size_t)N * sizeof *logcnt);
        rep->layers_from_scratch++;
    }
    rep->policy_used = rep->layers_from_scratch == L ? EPLB_POLICY_DEEPSEEK : EPLB_POLICY_INCREMENTAL;
    if (rep->layers_from_scratch == L)
        snprintf(rep->reason, sizeof rep->reason,
                 "every layer fell back to the from-scratch placement (min-traffic order): local changes could "
                 "not reach the target %.4f of its balancedness", target);
    else if (rep->layers_from_scratch || short_layers)
        snprintf(rep->reason, sizeof rep->reason,
                 "%u of %u layers fell back to the from-scratch placement (min-traffic order); %u stayed short of "
                 "the target %.4f of its balancedness%s", rep->layers_from_scratch, L, short_layers, target,
                 short_layers && is.budget_exhausted ? " (budget)" : "");
out:
    (void)layer_before;
    (void)layer_after;
    eplb_free(ref);
    eplb_free(ref_cnt);
    eplb_free(ref_layer);
    eplb_free(target_max);
    eplb_free(inc_layer);
    return st;
}

eplb_status eplb_next_placement(const eplb_next_request *req, int32_t *phy2log, int32_t *logcnt,
                                double *layer_before, double *layer_after, eplb_next_report *rep,
                                eplb_error *err) {
    memset(rep, 0, sizeof *rep);
    const eplb_policy_shape *s = &req->shape;
    eplb_status st = eplb_rebalance_knobs_check(&req->knobs, "", err);
    if (st != EPLB_OK)
        return st;
    if ((st = eplb_policy_check(s, err)) != EPLB_OK)
        return st;
    if (req->knobs.max_bytes_moved && !req->knobs.expert_bytes)
        return eplb_error_set(err, EPLB_EINVAL,
                              "max_bytes_moved %llu needs the size of an expert: set expert_bytes (in the request "
                              "or ParallelConfig)", (unsigned long long)req->knobs.max_bytes_moved);
    const uint32_t L = s->num_layers, N = s->num_logical, P = s->num_physical, G = s->num_gpus;
    if (req->knobs.policy == EPLB_POLICY_INCREMENTAL) {
        st = incremental(req, phy2log, logcnt, layer_before, layer_after, rep, err);
    } else {
        st = from_scratch(s, req->order, req->cur_phy2log, req->logical_load, phy2log, logcnt, err);
        rep->policy_used = EPLB_POLICY_DEEPSEEK;
    }
    if (st != EPLB_OK)
        return st;
    rep->balancedness_before =
        eplb_policy_balancedness(L, N, P, G, req->logical_load, req->cur_phy2log, req->cur_logcnt, layer_before);
    rep->balancedness_after = eplb_policy_balancedness(L, N, P, G, req->logical_load, phy2log, logcnt, layer_after);
    if (req->knobs.policy != EPLB_POLICY_INCREMENTAL)
        rep->balancedness_reference = rep->balancedness_after;
    count_copies(s, req->cur_phy2log, phy2log, &rep->copies_cross_gpu, &rep->copies_cross_node, &rep->slots_moved);
    return EPLB_OK;
}
