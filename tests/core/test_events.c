/* test_events.c -- the GPU-side ordering protocol of a weight move in the
 * registry (eplb_weights_ops.begin / end, docs/api.md "Ordering with the
 * engine's GPU streams"), with a fake mover that logs every call: begin
 * runs after check and before the first gather, with the request's bytes;
 * end after the last scatter and before the commit is stored; a failed
 * begin moves nothing; a failed end still commits, without a done event; a
 * wait event is refused (nothing called, nothing changed) for weights
 * without events, without weights, or of the wrong length; ContinueRebalance
 * carries its own. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

/* The deepseek-ai/EPLB README shape (as test_engine.c): 2 layers, 12
 * experts, 16 slots, 8 GPUs. */
static eplb_handle readme = { .architecture = "Readme", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                              .moe = { .num_moe_layers = 2, .num_logical_experts = 12, .num_physical_experts = 16,
                                       .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                       .num_expert_groups = 4 } };
static const int64_t readme_load[2][12] = {
    { 90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86 },
    { 20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27 },
};
static int64_t phys_load[2 * 16];

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
    eplb_register_request req = { .model_name = "m", .model = &readme, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2, .window_size = 4,
                                                .step_interval = 3 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, NULL), EPLB_OK);
    eplb_model_view_release(&res.view);
    memset(phys_load, 0, sizeof phys_load);
    for (int l = 0; l < 2; l++)
        for (int e = 0; e < 12; e++)
            phys_load[l * 16 + e] = readme_load[l][e];
}

static void teardown(void) { eplb_registry_close(reg); }

TestSuite(events, .init = setup, .fini = teardown);

/* ---- a fake mover with a call log ----------------------------------------- */

typedef struct ev_mover {
    char log[64];           /* c check, b begin, g gather, s scatter, e end */
    size_t n;
    uint8_t begin_bytes[EPLB_EVENT_BYTES];
    size_t begin_len;
    eplb_status begin_status, end_status;
    bool no_bytes;          /* scatters report 0 bytes written */
    int saves_at_end;       /* store saves when end ran */
    eplb_move_state stored_at_end;
    uint8_t done[EPLB_EVENT_BYTES];
} ev_mover;

static void note(ev_mover *m, char c) {
    if (m->n + 1 < sizeof m->log)
        m->log[m->n++] = c;
    m->log[m->n] = '\0';
}

static eplb_status ev_check(void *ctx, uint32_t L, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *err) {
    (void)L, (void)P, (void)o, (void)n, (void)err;
    note(ctx, 'c');
    return EPLB_OK;
}
static eplb_status ev_gather(void *ctx, uint32_t l, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *err) {
    (void)l, (void)P, (void)o, (void)n, (void)err;
    note(ctx, 'g');
    return EPLB_OK;
}
static eplb_status ev_scatter(void *ctx, uint32_t l, uint32_t P, const int32_t *o, const int32_t *n,
                              eplb_move_bytes *b, eplb_error *err) {
    (void)l, (void)err;
    ev_mover *m = ctx;
    note(m, 's');
    *b = (eplb_move_bytes){ 0, 0, 0 };
    for (uint32_t s = 0; s < P && !m->no_bytes; s++)
        b->written += o[s] != n[s] ? 100 : 0;
    return EPLB_OK;
}
static void ev_close(void *ctx) { (void)ctx; }
static eplb_status ev_begin(void *ctx, const uint8_t *ev, size_t len, eplb_error *err) {
    ev_mover *m = ctx;
    note(m, 'b');
    m->begin_len = len;
    memcpy(m->begin_bytes, ev, len < sizeof m->begin_bytes ? len : sizeof m->begin_bytes);
    if (m->begin_status != EPLB_OK)
        return eplb_error_set(err, m->begin_status, "wait_event: hipIpcOpenEventHandle: invalid (injected)");
    return EPLB_OK;
}
static eplb_status ev_end(void *ctx, uint8_t done[EPLB_EVENT_BYTES], bool *has, eplb_error *err) {
    ev_mover *m = ctx;
    note(m, 'e');
    m->saves_at_end = store.saves;
    m->stored_at_end = store.last.state;
    *has = false;
    if (m->end_status != EPLB_OK)
        return eplb_error_set(err, m->end_status, "done event: hipEventRecord failed (injected)");
    memcpy(done, m->done, EPLB_EVENT_BYTES);
    *has = true;
    return EPLB_OK;
}

static const eplb_weights_ops ev_ops = { .check = ev_check, .gather = ev_gather, .scatter = ev_scatter,
                                         .close = ev_close, .begin = ev_begin, .end = ev_end };
/* shm-like weights: no events. */
static const eplb_weights_ops plain_ops = { .check = ev_check, .gather = ev_gather, .scatter = ev_scatter,
                                            .close = ev_close };
static ev_mover mover;
static uint8_t engine_event[EPLB_EVENT_BYTES];

static void attach(const eplb_weights_ops *ops) {
    memset(&mover, 0, sizeof mover);
    for (int i = 0; i < EPLB_EVENT_BYTES; i++) {
        mover.done[i] = (uint8_t)(0xd0 ^ i);
        engine_event[i] = (uint8_t)(0x5a + 3 * i);
    }
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "m", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "m", ops, &mover, &shape, NULL), EPLB_OK);
}

static eplb_rebalance_request request(const uint8_t *ev, size_t len) {
    return (eplb_rebalance_request){ .model_id = "m", .physical_load = phys_load, .physical_load_len = 32,
                                     .slot_order = EPLB_SLOT_ALGORITHM, .wait_event = ev, .wait_event_len = len };
}

static eplb_move_state state_now(uint64_t *epoch) {
    eplb_placement p;
    eplb_move_state st = EPLB_MOVE_STAGED;
    cr_assert_eq(get_placement(reg, "m", &p, &st, NULL), EPLB_OK);
    *epoch = p.epoch;
    eplb_placement_free(&p);
    return st;
}

/* ---- tests ------------------------------------------------------------------ */

Test(events, wait_before_the_first_gather_done_after_the_last_scatter) {
    attach(&ev_ops);
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_str_eq(mover.log, "cbgsgse");
    cr_assert_eq(mover.begin_len, EPLB_EVENT_BYTES);
    cr_assert_arr_eq(mover.begin_bytes, engine_event, EPLB_EVENT_BYTES);
    /* end ran while MOVING was the stored state, before the commit's save. */
    cr_assert_eq(mover.saves_at_end, 2); /* register, MOVING */
    cr_assert_eq(mover.stored_at_end, EPLB_MOVE_MOVING);
    cr_assert_eq(store.saves, 3);
    cr_assert(res.committed);
    cr_assert(res.has_done_event);
    cr_assert_arr_eq(res.done_event, mover.done, EPLB_EVENT_BYTES);
    cr_assert_eq(res.placement.epoch, 1);
    eplb_rebalance_result_free(&res);
}

Test(events, without_a_wait_event_no_begin_but_a_done_event) {
    attach(&ev_ops);
    eplb_rebalance_request req = request(NULL, 0);
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_str_eq(mover.log, "cgsgse");
    cr_assert(res.has_done_event);
    eplb_rebalance_result_free(&res);
}

Test(events, nothing_written_no_done_event) {
    attach(&ev_ops);
    mover.no_bytes = true;
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, NULL), EPLB_OK);
    cr_assert_str_eq(mover.log, "cbgsgs");
    cr_assert(!res.has_done_event);
    eplb_rebalance_result_free(&res);
}

Test(events, a_failed_begin_moves_nothing) {
    attach(&ev_ops);
    mover.begin_status = EPLB_EINVAL;
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "hipIpcOpenEventHandle"), "%s", err.msg);
    cr_assert_str_eq(mover.log, "cb");
    cr_assert_eq(store.saves, 1); /* only the registration: no MOVING, no commit */
    uint64_t epoch;
    cr_assert_eq(state_now(&epoch), EPLB_MOVE_IDLE);
    cr_assert_eq(epoch, 0);
    /* The weights stay usable: the next call without the event moves. */
    req = request(NULL, 0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.committed);
    eplb_rebalance_result_free(&res);
}

Test(events, a_begin_that_finds_the_buffers_lost_needs_a_reload) {
    attach(&ev_ops);
    mover.begin_status = EPLB_EDATALOSS;
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EDATALOSS);
    cr_assert_str_eq(mover.log, "cb");
    uint64_t epoch;
    cr_assert_eq(state_now(&epoch), EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_eq(epoch, 0);
}

Test(events, a_failed_end_commits_without_a_done_event) {
    attach(&ev_ops);
    mover.end_status = EPLB_EINTERNAL;
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_str_eq(mover.log, "cbgsgse");
    cr_assert(res.committed);
    cr_assert(!res.has_done_event);
    cr_assert_eq(res.placement.epoch, 1);
    uint64_t epoch;
    cr_assert_eq(state_now(&epoch), EPLB_MOVE_IDLE);
    cr_assert_eq(epoch, 1);
    eplb_rebalance_result_free(&res);
}

Test(events, refused_without_device_events_nothing_called) {
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    eplb_rebalance_result res;
    eplb_error err;
    /* No weights at all. */
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "events need a device backend"), "%s", err.msg);
    /* Weights without events (shm). */
    attach(&plain_ops);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "events need a device backend"), "%s", err.msg);
    cr_assert_str_eq(mover.log, "");
    cr_assert_eq(store.saves, 1);
    uint64_t epoch;
    cr_assert_eq(state_now(&epoch), EPLB_MOVE_IDLE);
    cr_assert_eq(epoch, 0);
    /* Without the event they move, and answer no done event. */
    req = request(NULL, 0);
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert_str_eq(mover.log, "cgsgs");
    cr_assert(!res.has_done_event);
    eplb_rebalance_result_free(&res);
}

Test(events, a_wait_event_of_the_wrong_length_is_refused) {
    attach(&ev_ops);
    eplb_rebalance_request req = request(engine_event, 63);
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "63 bytes, want 64"), "%s", err.msg);
    cr_assert_str_eq(mover.log, "");
}

Test(events, each_step_waits_on_its_own_event) {
    attach(&ev_ops);
    eplb_rebalance_request req = request(engine_event, sizeof engine_event);
    req.layers_per_step = 1;
    eplb_rebalance_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_rebalance(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.pending, "the README load moves both layers");
    cr_assert(res.has_done_event);
    char id[EPLB_REBALANCE_ID_MAX + 1];
    strcpy(id, res.rebalance_id);
    eplb_rebalance_result_free(&res);
    size_t first = mover.n;
    cr_assert_eq(mover.log[1], 'b');
    cr_assert_eq(mover.log[first - 1], 'e');
    /* The step's own event: another handle; the wrong length refused. */
    uint8_t second[EPLB_EVENT_BYTES];
    memset(second, 0x77, sizeof second);
    cr_assert_eq(eplb_registry_continue_rebalance_ev(reg, "m", id, second, 8, &res, &err), EPLB_EINVAL);
    cr_assert_eq(mover.n, first);
    cr_assert_eq(eplb_registry_continue_rebalance_ev(reg, "m", id, second, sizeof second, &res, &err), EPLB_OK,
                 "%s", err.msg);
    cr_assert(!res.pending);
    cr_assert(res.has_done_event);
    cr_assert_arr_eq(mover.begin_bytes, second, EPLB_EVENT_BYTES);
    cr_assert_eq(mover.log[first + 1], 'b');
    cr_assert_eq(mover.log[mover.n - 1], 'e');
    eplb_rebalance_result_free(&res);
}
