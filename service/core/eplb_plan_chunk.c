/* eplb_plan_chunk.c -- a layer's move cut into chunks that fit a staging
 * budget (eplb_plan_chunk.h). */
#include "eplb_plan_chunk.h"

#include <stdbool.h>
#include <string.h>

#include "eplb_alloc.h"
#include "eplb_plan.h"

void eplb_plan_chunks_free(eplb_plan_chunks *c) {
    if (!c)
        return;
    eplb_free(c->rows);
    memset(c, 0, sizeof *c);
}

typedef struct cutter {
    uint32_t P, G, gpn, first, local, bound;
    const int32_t *new_row;
    uint32_t E;          /* experts: ids < E */
    int32_t *cur;        /* [P] the chunk's start */
    int32_t *test;       /* [P] cur with the chunk's groups (so far) applied */
    uint32_t *count;     /* [E] copies of each expert in test */
    bool *done;          /* [P] slot written (in test) */
    uint32_t *queue;     /* [P] the group being closed */
    bool *in_group;      /* [P] */
} cutter;

/* Does cur -> row plan, and how much does it stage?  *need: its largest
 * per-GPU staging. */
static eplb_status plan_need(const cutter *c, const int32_t *row, uint32_t *need, eplb_error *err) {
    eplb_plan p;
    eplb_status st = eplb_plan_build(c->P, c->G, c->gpn, c->cur, row, c->first, c->local, &p, err);
    *need = st == EPLB_OK ? p.max_staging_per_gpu : 0;
    eplb_plan_free(&p);
    return st;
}

/* Write slot s's new expert into test. */
static void apply(cutter *c, uint32_t s) {
    int32_t was = c->test[s];
    if (was >= 0)
        c->count[was]--;
    c->test[s] = c->new_row[s];
    c->count[c->new_row[s]]++;
    c->done[s] = true;
}

static void unapply(cutter *c, uint32_t s, int32_t was) {
    c->count[c->test[s]]--;
    c->test[s] = was;
    if (was >= 0)
        c->count[was]++;
    c->done[s] = false;
}

/* The group of slot s: s, and every pending write of an expert whose last
 * copy a write of the group destroys (it must read it in the same chunk).
 * Applies it to test; returns its size (slots in c->queue). */
static uint32_t close_group(cutter *c, uint32_t s, int32_t *was) {
    uint32_t n = 0;
    c->queue[n++] = s;
    c->in_group[s] = true;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t d = c->queue[i];
        was[i] = c->test[d];
        apply(c, d);
        int32_t lost = was[i];
        if (lost < 0 || c->count[lost] > 0)
            continue;
        for (uint32_t r = 0; r < c->P; r++)
            if (!c->done[r] && !c->in_group[r] && c->new_row[r] == lost) {
                c->in_group[r] = true;
                c->queue[n++] = r;
            }
    }
    return n;
}

eplb_status eplb_plan_chunk(uint32_t num_physical, uint32_t num_gpus, uint32_t gpus_per_node,
                            const int32_t *old_row, const int32_t *new_row, uint32_t first_gpu,
                            uint32_t num_local_gpus, uint32_t max_staging_per_gpu, eplb_plan_chunks *out,
                            eplb_error *err) {
    memset(out, 0, sizeof *out);
    const uint32_t P = num_physical;
    /* The whole move first: its errors are the move's, and it may fit. */
    eplb_plan whole;
    eplb_status st = eplb_plan_build(P, num_gpus, gpus_per_node, old_row, new_row, first_gpu, num_local_gpus,
                                     &whole, err);
    if (st != EPLB_OK)
        return st;
    uint32_t whole_need = whole.max_staging_per_gpu;
    eplb_plan_free(&whole);
    out->num_physical = P;
    if (max_staging_per_gpu == 0 || whole_need <= max_staging_per_gpu) {
        out->rows = eplb_malloc(2 * (size_t)P * sizeof *out->rows);
        if (!out->rows)
            return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
        memcpy(out->rows, old_row, (size_t)P * sizeof *out->rows);
        memcpy(out->rows + P, new_row, (size_t)P * sizeof *out->rows);
        out->num_chunks = 1;
        out->max_staging_per_gpu = whole_need;
        return EPLB_OK;
    }

    cutter c = { .P = P, .G = num_gpus, .gpn = gpus_per_node, .first = first_gpu, .local = num_local_gpus,
                 .bound = max_staging_per_gpu, .new_row = new_row };
    int32_t max_e = -1;
    for (uint32_t s = 0; s < P; s++) {
        if (old_row[s] > max_e)
            max_e = old_row[s];
        if (new_row[s] > max_e)
            max_e = new_row[s];
    }
    c.E = (uint32_t)(max_e + 1);
    /* At most one chunk per changed slot: rows for P + 1 states. */
    size_t cap_rows = (size_t)P + 1;
    int32_t *rows = eplb_malloc(cap_rows * P * sizeof *rows);
    c.cur = eplb_malloc((size_t)P * sizeof *c.cur);
    c.test = eplb_malloc((size_t)P * sizeof *c.test);
    c.count = eplb_calloc(c.E ? c.E : 1, sizeof *c.count);
    c.done = eplb_calloc(P, sizeof *c.done);
    c.queue = eplb_malloc((size_t)P * sizeof *c.queue);
    c.in_group = eplb_calloc(P, sizeof *c.in_group);
    int32_t *was = eplb_malloc((size_t)P * sizeof *was);
    if (!rows || !c.cur || !c.test || !c.count || !c.done || !c.queue || !c.in_group || !was) {
        st = eplb_error_set(err, EPLB_ENOMEM, "out of memory cutting a layer's move into chunks");
        goto out;
    }
    memcpy(c.cur, old_row, (size_t)P * sizeof *c.cur);
    memcpy(c.test, old_row, (size_t)P * sizeof *c.test);
    for (uint32_t s = 0; s < P; s++) {
        if (old_row[s] >= 0)
            c.count[old_row[s]]++;
        /* Stable slots (unchanged, or emptied: -1 is never written) are done. */
        c.done[s] = new_row[s] == old_row[s] || new_row[s] < 0;
    }
    memcpy(rows, old_row, (size_t)P * sizeof *rows);
    uint32_t n = 0, most = 0;
    for (;;) {
        bool any = false, pending = false;
        uint32_t first_need = 0;
        for (uint32_t s = 0; s < P; s++) {
            if (c.done[s])
                continue;
            pending = true;
            uint32_t g = close_group(&c, s, was);
            uint32_t need = 0;
            eplb_status pst = plan_need(&c, c.test, &need, err);
            bool fits = pst == EPLB_OK && need <= c.bound;
            if (!fits) {
                if (!any && !first_need)
                    first_need = pst == EPLB_OK ? need : UINT32_MAX;
                while (g-- > 0)
                    unapply(&c, c.queue[g], was[g]);
            } else {
                any = true;
                if (need > most)
                    most = need;
            }
            for (uint32_t i = 0; i < P; i++)
                c.in_group[i] = false;
        }
        if (!pending)
            break;
        if (!any) {
            st = first_need == UINT32_MAX
                     ? eplb_error_set(err, EPLB_EPRECONDITION,
                                      "a group of writes of this layer cannot be planned within the staging bound")
                     : eplb_error_set(err, EPLB_EPRECONDITION,
                                      "this layer's move needs %u staging entries on one GPU at once (writes that "
                                      "must move together); the staging bound allows %u: raise --max-staging-mib",
                                      first_need, c.bound);
            goto out;
        }
        n++;
        memcpy(rows + (size_t)n * P, c.test, (size_t)P * sizeof *rows);
        memcpy(c.cur, c.test, (size_t)P * sizeof *c.cur);
    }
    /* Slots emptied by the move (-1) are never written: the last row is
     * the move's target exactly. */
    memcpy(rows + (size_t)n * P, new_row, (size_t)P * sizeof *rows);
    out->rows = rows;
    rows = NULL;
    out->num_chunks = n;
    out->max_staging_per_gpu = most;
    st = EPLB_OK;
out:
    eplb_free(rows);
    eplb_free(c.cur);
    eplb_free(c.test);
    eplb_free(c.count);
    eplb_free(c.done);
    eplb_free(c.queue);
    eplb_free(c.in_group);
    eplb_free(was);
    return st;
}
