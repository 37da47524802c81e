/* eplb_incremental.c -- POLICY_INCREMENTAL (see eplb_incremental.h).
 * Work in progress: makes no change yet, so every layer short of its
 * target falls back to the from-scratch placement (eplb_next.c). */
#include <string.h>

#include "eplb_incremental.h"

eplb_status eplb_incremental_rebalance(const eplb_incremental_params *p, int32_t *phy2log, int32_t *logcnt,
                                       eplb_incremental_stats *stats, eplb_error *err) {
    (void)p; (void)phy2log; (void)logcnt; (void)err;
    memset(stats, 0, sizeof *stats);
    return EPLB_OK;
}
