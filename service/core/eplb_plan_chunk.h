/* eplb_plan_chunk.h -- moving one layer within a staging budget.
 *
 * A layer's plan (eplb_plan.h) stages, on each destination GPU, the old
 * contents of overwritten slots that are still needed; for a layer that
 * reshuffles most of its slots that can be many expert-sized entries per
 * GPU (42 MiB each at DeepSeek-V3 size).  --max-staging-mib bounds it: the
 * layer's move old -> new is cut into chunks old = rows[0] -> rows[1] ->
 * ... -> rows[n] = new, each an ordinary plan whose staging fits.  An
 * intermediate row is not a placement anyone serves (the layer commits only
 * at the end), just a state of the bytes; each one still holds every
 * expert the later chunks read.
 *
 * How chunks are cut: slots are taken in order, in groups closed under
 * "this write destroys the last copy of an expert that a later write
 * needs" (those writes go in the same chunk, reading it from staging: a
 * swap is one group); a group joins the current chunk when the chunk's plan
 * still fits, else it starts the next.  A group that does not fit alone is
 * refused (the budget is below what the layer needs at least). */
#ifndef EPLB_PLAN_CHUNK_H
#define EPLB_PLAN_CHUNK_H

#include <stdint.h>

#include "eplb_status.h"

typedef struct eplb_plan_chunks {
    uint32_t num_physical;       /* P */
    uint32_t num_chunks;         /* >= 1 */
    int32_t *rows;               /* [num_chunks + 1][P]: rows[0] old, rows[num_chunks] new */
    uint32_t max_staging_per_gpu;/* the most entries any chunk stages on one GPU */
} eplb_plan_chunks;

/* Cut old_row -> new_row into chunks whose plans (eplb_plan_build with the
 * same P, G, gpus_per_node, first_gpu, num_local_gpus) stage at most
 * max_staging_per_gpu entries on any GPU (0: no bound: one chunk).
 * EPLB_OK; eplb_plan_build's errors for the whole move; EPLB_EPRECONDITION
 * when a group of writes that must move together needs more staging than
 * the bound ("layer move needs 3 staging entries on GPU 1 at once; the
 * bound allows 2"); EPLB_ENOMEM.  Free *out with eplb_plan_chunks_free.
 * Cost: one plan when it fits; else O(P) plans of the layer (only when
 * the bound bites). */
eplb_status eplb_plan_chunk(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node,
                            const int32_t *old_row, const int32_t *new_row, uint32_t first_gpu,
                            uint32_t num_local_gpus, uint32_t max_staging_per_gpu, eplb_plan_chunks *out,
                            eplb_error *err);
void eplb_plan_chunks_free(eplb_plan_chunks *c);

#endif
