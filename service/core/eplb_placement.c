/* eplb_placement.c -- the placement maps and their rebuild from phy2log. */
#include "eplb_alloc.h"
#include "eplb_placement.h"

#include <stdlib.h>
#include <string.h>

void eplb_placement_free(eplb_placement *p) {
    eplb_free(p->phy2log);
    eplb_free(p->logcnt);
    eplb_free(p->log2phy);
    memset(p, 0, sizeof *p);
}

uint32_t eplb_placement_max_replicas(uint32_t num_layers, uint32_t num_logical,
                                     uint32_t num_physical, const int32_t *phy2log) {
    uint32_t best = 1;
    uint32_t *count = eplb_calloc(num_logical ? num_logical : 1, sizeof *count);
    if (!count)
        return 0;
    for (uint32_t l = 0; l < num_layers; l++) {
        memset(count, 0, num_logical * sizeof *count);
        const int32_t *row = phy2log + (size_t)l * num_physical;
        for (uint32_t s = 0; s < num_physical; s++) {
            if (row[s] >= 0 && (uint32_t)row[s] < num_logical && ++count[row[s]] > best)
                best = count[row[s]];
        }
    }
    eplb_free(count);
    return best;
}

void eplb_placement_rebuild(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                            uint32_t max_replicas, const int32_t *phy2log, int32_t *logcnt,
                            int32_t *log2phy) {
    memset(logcnt, 0, (size_t)num_layers * num_logical * sizeof *logcnt);
    if (log2phy) {
        size_t n = (size_t)num_layers * num_logical * max_replicas;
        for (size_t i = 0; i < n; i++)
            log2phy[i] = -1;
    }
    for (uint32_t l = 0; l < num_layers; l++) {
        const int32_t *row = phy2log + (size_t)l * num_physical;
        int32_t *cnt = logcnt + (size_t)l * num_logical;
        for (uint32_t s = 0; s < num_physical; s++) {
            int32_t e = row[s];
            if (e < 0 || (uint32_t)e >= num_logical)
                continue;
            if (log2phy && (uint32_t)cnt[e] < max_replicas)
                log2phy[((size_t)l * num_logical + (uint32_t)e) * max_replicas + (uint32_t)cnt[e]] =
                    (int32_t)s;
            cnt[e]++;
        }
    }
}

/* Allocate the arrays for a shape; on failure nothing is allocated. */
static eplb_status placement_alloc(eplb_placement *p, uint32_t num_layers, uint32_t num_logical,
                                   uint32_t num_physical, uint32_t max_replicas, eplb_error *err) {
    memset(p, 0, sizeof *p);
    p->phy2log = eplb_malloc((size_t)num_layers * num_physical * sizeof *p->phy2log);
    p->logcnt = eplb_malloc((size_t)num_layers * num_logical * sizeof *p->logcnt);
    p->log2phy = eplb_malloc((size_t)num_layers * num_logical * max_replicas * sizeof *p->log2phy);
    if (!p->phy2log || !p->logcnt || !p->log2phy) {
        eplb_placement_free(p);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory for a %ux%u placement",
                              num_layers, num_physical);
    }
    p->num_layers = num_layers;
    p->num_logical = num_logical;
    p->num_physical = num_physical;
    p->num_valid_physical = num_physical;
    p->max_replicas = max_replicas;
    return EPLB_OK;
}

eplb_status eplb_placement_init(eplb_placement *p, uint32_t num_layers, uint32_t num_logical,
                                uint32_t num_physical, eplb_error *err) {
    memset(p, 0, sizeof *p);
    if (num_layers == 0 || num_logical == 0 || num_physical < num_logical)
        return eplb_error_set(err, EPLB_EINVAL,
                              "placement needs layers > 0 and num_physical %u >= num_logical %u > 0",
                              num_physical, num_logical);
    /* The first N slots hold one replica each; the P - N redundant ones go
     * round-robin, so the most replicated expert has ceil(P / N). */
    uint32_t max_replicas = (num_physical + num_logical - 1) / num_logical;
    eplb_status st = placement_alloc(p, num_layers, num_logical, num_physical, max_replicas, err);
    if (st != EPLB_OK)
        return st;
    for (uint32_t l = 0; l < num_layers; l++)
        for (uint32_t s = 0; s < num_physical; s++)
            p->phy2log[(size_t)l * num_physical + s] = (int32_t)(s % num_logical);
    eplb_placement_rebuild(num_layers, num_logical, num_physical, max_replicas, p->phy2log,
                           p->logcnt, p->log2phy);
    return EPLB_OK;
}

eplb_status eplb_placement_assign(eplb_placement *p, uint32_t num_physical,
                                  uint32_t num_valid_physical, const int32_t *phy2log,
                                  eplb_error *err) {
    uint32_t L = p->num_layers, N = p->num_logical;
    if (num_physical < N)
        return eplb_error_set(err, EPLB_EINVAL, "num_physical_experts %u < num_logical_experts %u",
                              num_physical, N);
    if (num_valid_physical > num_physical)
        return eplb_error_set(err, EPLB_EINVAL, "num_valid_physical_experts %u > num_physical_experts %u",
                              num_valid_physical, num_physical);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t s = 0; s < num_physical; s++) {
            int32_t e = phy2log[(size_t)l * num_physical + s];
            if (e < -1 || e >= (int32_t)N)
                return eplb_error_set(err, EPLB_EINVAL,
                                      "physical_to_logical[layer %u][slot %u] = %d is not -1 or a logical expert in [0, %u)",
                                      l, s, e, N);
        }
    }
    uint32_t max_replicas = eplb_placement_max_replicas(L, N, num_physical, phy2log);
    if (max_replicas == 0)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    /* log2phy is [L][N][max replicas]: one expert copied into thousands of
     * slots would make it enormous, so such a map is refused. */
    if ((uint64_t)L * N * max_replicas > EPLB_PLACEMENT_MAX_LOG2PHY)
        return eplb_error_set(err, EPLB_EINVAL,
                              "an expert has %u replicas in one layer: logical_to_physical would need %llu entries "
                              "(at most %llu)", max_replicas, (unsigned long long)L * N * max_replicas,
                              (unsigned long long)EPLB_PLACEMENT_MAX_LOG2PHY);
    eplb_placement next;
    eplb_status st = placement_alloc(&next, L, N, num_physical, max_replicas, err);
    if (st != EPLB_OK)
        return st;
    memcpy(next.phy2log, phy2log, (size_t)L * num_physical * sizeof *phy2log);
    eplb_placement_rebuild(L, N, num_physical, max_replicas, next.phy2log, next.logcnt, next.log2phy);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t e = 0; e < N; e++) {
            if (next.logcnt[(size_t)l * N + e] == 0) {
                eplb_placement_free(&next);
                return eplb_error_set(err, EPLB_EINVAL,
                                      "logical expert %u has no replica in layer %u", e, l);
            }
        }
    }
    next.num_valid_physical = num_valid_physical;
    next.epoch = p->epoch;
    eplb_placement_free(p);
    *p = next;
    return EPLB_OK;
}

eplb_status eplb_placement_copy(eplb_placement *dst, const eplb_placement *src, eplb_error *err) {
    eplb_status st = placement_alloc(dst, src->num_layers, src->num_logical, src->num_physical,
                                     src->max_replicas, err);
    if (st != EPLB_OK)
        return st;
    size_t L = src->num_layers;
    memcpy(dst->phy2log, src->phy2log, L * src->num_physical * sizeof *dst->phy2log);
    memcpy(dst->logcnt, src->logcnt, L * src->num_logical * sizeof *dst->logcnt);
    if (src->log2phy)
        memcpy(dst->log2phy, src->log2phy, L * src->num_logical * src->max_replicas * sizeof *dst->log2phy);
    else /* a dry run's answer without it: the copy is whole again */
        eplb_placement_rebuild(src->num_layers, src->num_logical, src->num_physical, src->max_replicas, src->phy2log,
                               dst->logcnt, dst->log2phy);
    dst->num_valid_physical = src->num_valid_physical;
    dst->epoch = src->epoch;
    return EPLB_OK;
}
