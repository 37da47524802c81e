/* eplb_placement.h -- where each logical expert lives: phy2log and the maps
 * derived from it (log2phy, logcnt), plus the epoch that versions them.
 *
 * Glossary (eplb-semantics): L layers, N logical experts, P physical slots.
 *   phy2log  [L][P]     logical expert of each slot, -1 = empty (elastic EP)
 *   logcnt   [L][N]     replicas of each logical expert
 *   log2phy  [L][N][X]  slots of each expert, ascending, padded with -1;
 *                       X = max_replicas = the largest logcnt (>= 1)
 * phy2log is the source of truth; the others are always rebuilt from it. */
#ifndef EPLB_PLACEMENT_H
#define EPLB_PLACEMENT_H

#include <stdint.h>

#include "eplb_status.h"

/* Largest log2phy (entries) a placement may have: 256 MiB of int32. */
#define EPLB_PLACEMENT_MAX_LOG2PHY (64ull << 20)

typedef struct eplb_placement {
    uint32_t num_layers;         /* L */
    uint32_t num_logical;        /* N */
    uint32_t num_physical;       /* P */
    uint32_t num_valid_physical; /* slots counted for load (P_old after scale-up) */
    uint32_t max_replicas;       /* X */
    uint64_t epoch;              /* 0 at registration, +1 per commit */
    int32_t *phy2log;            /* [L][P] */
    int32_t *logcnt;             /* [L][N] */
    int32_t *log2phy;            /* [L][N][X] */
} eplb_placement;

/* The initial map of every layer: [0..N-1] then i % N for the P - N
 * redundant slots.  Epoch 0, all slots valid.  On error *p is empty. */
eplb_status eplb_placement_init(eplb_placement *p, uint32_t num_layers, uint32_t num_logical,
                                uint32_t num_physical, eplb_error *err);

/* Replace the map with phy2log ([L][num_physical], entries -1 or < N) and
 * rebuild logcnt and log2phy.  p may be an empty shell that only has
 * num_layers and num_logical set (the arrays NULL).  Checks every entry and that every logical
 * expert keeps a replica in every layer; on error *p is unchanged.
 * num_valid_physical is recorded as given (<= num_physical).  The epoch is
 * not touched.  A map whose log2phy would exceed EPLB_PLACEMENT_MAX_LOG2PHY
 * entries is EPLB_EINVAL. */
eplb_status eplb_placement_assign(eplb_placement *p, uint32_t num_physical,
                                  uint32_t num_valid_physical, const int32_t *phy2log,
                                  eplb_error *err);

/* Deep copy; on error *dst is empty. */
eplb_status eplb_placement_copy(eplb_placement *dst, const eplb_placement *src, eplb_error *err);

void eplb_placement_free(eplb_placement *p);

/* Rebuild logcnt and log2phy from phy2log ([L][P]) without validation
 * beyond bounds: slots are scanned in ascending order and -1 skipped.
 * logcnt is [L][N]; log2phy, when not NULL, is [L][N][max_replicas] and
 * must be sized for the largest count (eplb_placement_max_replicas). */
uint32_t eplb_placement_max_replicas(uint32_t num_layers, uint32_t num_logical,
                                     uint32_t num_physical, const int32_t *phy2log);
void eplb_placement_rebuild(uint32_t num_layers, uint32_t num_logical, uint32_t num_physical,
                            uint32_t max_replicas, const int32_t *phy2log, int32_t *logcnt,
                            int32_t *log2phy);

#endif
