/* test_concurrency.c -- the model entry is the unit of concurrency: a slow
 * operation (a weight move, a store write) on one model never blocks
 * readers of it or anything on another model; and the error paths under
 * failing allocations leave every model as it was.
 *
 * The old registry held its lock through the policy, the move and the
 * fsync (registry_acquire) and took the write lock across Register's save:
 * each test below deadlocks or times out there. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_alloc.h"
#include "eplb_registry.h"

#include "fake_store.h"

static fake_store store;
static eplb_registry *reg;

static eplb_handle readme = { .architecture = "Readme", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                              .moe = { .num_moe_layers = 2, .num_logical_experts = 12, .num_physical_experts = 16,
                                       .num_local_physical_experts = 2, .num_redundant_experts = 4,
                                       .num_expert_groups = 4 } };

static eplb_register_request request(const char *name) {
    return (eplb_register_request){ .model_name = name, .model = &readme, .main_model_id = "",
                                    .parallel = { .enable_eplb = true, .ep_size = 8, .num_nodes = 2 } };
}

static void register_ok(const char *name) {
    eplb_register_request req = request(name);
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(reg, &req, &res, &err), EPLB_OK, "%s", err.msg);
    eplb_model_view_release(&res.view);
}

static void setup(void) {
    fake_store_init(&store);
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_registry_open(&fake_ops, &store, &lim, &reg, NULL), EPLB_OK);
}

static void teardown(void) {
    fake_store_release(&store);
    eplb_registry_close(reg);
}

TestSuite(concurrency, .init = setup, .fini = teardown, .timeout = 20);

/* ---- a mover whose gather blocks until released ---------------------------- */

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static int gate_entered, gate_open;

static eplb_status slow_check(void *c, uint32_t L, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *e) {
    (void)c, (void)L, (void)P, (void)o, (void)n, (void)e;
    return EPLB_OK;
}
static eplb_status slow_gather(void *c, uint32_t l, uint32_t P, const int32_t *o, const int32_t *n, eplb_error *e) {
    (void)c, (void)l, (void)P, (void)o, (void)n, (void)e;
    pthread_mutex_lock(&gate_lock);
    gate_entered = 1;
    pthread_cond_broadcast(&gate_cond);
    while (!gate_open)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
    return EPLB_OK;
}
static eplb_status slow_scatter(void *c, uint32_t l, uint32_t P, const int32_t *o, const int32_t *n, eplb_move_bytes *b,
                                eplb_error *e) {
    (void)c, (void)l, (void)P, (void)o, (void)n, (void)e;
    *b = (eplb_move_bytes){ 0, 0, 0 };
    return EPLB_OK;
}
static void slow_close(void *c) { (void)c; }
static const eplb_weights_ops slow_ops = { .check = slow_check, .gather = slow_gather, .scatter = slow_scatter,
                                           .close = slow_close };

static int64_t skewed_load[2 * 16];

static void *rebalance_thread(void *arg) {
    const char *id = arg;
    for (int i = 0; i < 32; i++)
        skewed_load[i] = i % 16 < 12 ? 1 + (i % 5) * 100 : 0;
    eplb_rebalance_request req = { .model_id = id, .physical_load = skewed_load, .physical_load_len = 32 };
    eplb_rebalance_result res;
    eplb_status st = eplb_registry_rebalance(reg, &req, &res, NULL);
    if (st == EPLB_OK)
        eplb_rebalance_result_free(&res);
    return (void *)(intptr_t)st;
}

static void wait_gate_entered(void) {
    pthread_mutex_lock(&gate_lock);
    while (!gate_entered)
        pthread_cond_wait(&gate_cond, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

static void open_gate(void) {
    pthread_mutex_lock(&gate_lock);
    gate_open = 1;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

Test(concurrency, a_move_in_progress_blocks_neither_readers_nor_other_models) {
    register_ok("a");
    register_ok("b");
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "a", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "a", &slow_ops, NULL, &shape, NULL), EPLB_OK);
    pthread_t t;
    pthread_create(&t, NULL, rebalance_thread, "a");
    wait_gate_entered(); /* a's op_lock is held inside its weight move */

    /* Readers of a see the published epoch and the move's state. */
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "a", &v, NULL), EPLB_OK);
    cr_assert_eq(v.snap->placement.epoch, 0);
    cr_assert_eq(v.state, EPLB_MOVE_STAGED);
    eplb_model_view_release(&v);
    /* Model b: reads, a rebalance (with its fsync), a registration. */
    cr_assert_eq(eplb_registry_view(reg, "b", &v, NULL), EPLB_OK);
    eplb_model_view_release(&v);
    cr_assert_eq((intptr_t)rebalance_thread("b"), EPLB_OK);
    register_ok("c");
    cr_assert_eq(eplb_registry_count(reg), 3);

    open_gate();
    void *rc;
    pthread_join(t, &rc);
    cr_assert_eq((intptr_t)rc, EPLB_OK);
    cr_assert_eq(eplb_registry_view(reg, "a", &v, NULL), EPLB_OK);
    cr_assert_eq(v.snap->placement.epoch, 1);
    cr_assert_eq(v.state, EPLB_MOVE_IDLE);
    eplb_model_view_release(&v);
}

static void *register_thread(void *arg) {
    eplb_register_request req = request(arg);
    eplb_register_result res;
    eplb_status st = eplb_registry_register(reg, &req, &res, NULL);
    if (st == EPLB_OK)
        eplb_model_view_release(&res.view);
    return (void *)(intptr_t)st;
}

Test(concurrency, a_registration_being_stored_blocks_no_one_else) {
    register_ok("a");
    store.block_model = "b";
    pthread_t t;
    pthread_create(&t, NULL, register_thread, "b");
    fake_store_wait_blocked(&store); /* b's save is in progress */

    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "a", &v, NULL), EPLB_OK);
    eplb_model_view_release(&v);
    /* b is not visible until stored. */
    eplb_error err;
    cr_assert_eq(eplb_registry_view(reg, "b", &v, &err), EPLB_ENOTFOUND);
    cr_assert_eq((intptr_t)rebalance_thread("a"), EPLB_OK);
    register_ok("c");

    /* A second registration of b waits for the first, then is idempotent. */
    pthread_t t2;
    pthread_create(&t2, NULL, register_thread, "b");
    fake_store_release(&store);
    void *rc1, *rc2;
    pthread_join(t, &rc1);
    pthread_join(t2, &rc2);
    cr_assert_eq((intptr_t)rc1, EPLB_OK);
    cr_assert_eq((intptr_t)rc2, EPLB_OK);
    cr_assert_eq(eplb_registry_count(reg), 3);
}

Test(concurrency, a_failed_first_save_lets_a_waiting_registration_start_over) {
    store.block_model = "b";
    store.fail_next = 1;
    pthread_t t, t2;
    pthread_create(&t, NULL, register_thread, "b");
    fake_store_wait_blocked(&store);
    pthread_create(&t2, NULL, register_thread, "b");
    struct timespec ms = { 0, 20 * 1000000L };
    nanosleep(&ms, NULL); /* let t2 reach the entry's lock */
    fake_store_release(&store);
    void *rc1, *rc2;
    pthread_join(t, &rc1);
    pthread_join(t2, &rc2);
    /* One of them was refused by the injected failure, the other stored. */
    cr_assert((intptr_t)rc1 == EPLB_EUNAVAILABLE || (intptr_t)rc2 == EPLB_EUNAVAILABLE);
    cr_assert((intptr_t)rc1 == EPLB_OK || (intptr_t)rc2 == EPLB_OK);
    cr_assert_eq(eplb_registry_count(reg), 1);
}

/* ---- readers and writers at once ------------------------------------------- */

static atomic_int stop_readers;

static void *reader_thread(void *arg) {
    (void)arg;
    uint64_t last = 0;
    long reads = 0;
    while (!atomic_load(&stop_readers) || reads < 100) {
        eplb_model_view v;
        if (eplb_registry_view(reg, "a", &v, NULL) != EPLB_OK)
            return (void *)1;
        const eplb_placement *p = &v.snap->placement;
        /* A snapshot is consistent: its counts agree with its map, and the
         * epoch never goes back. */
        int32_t total = 0;
        for (uint32_t i = 0; i < p->num_layers * p->num_logical; i++)
            total += p->logcnt[i];
        int32_t want = (int32_t)(p->num_layers * p->num_physical);
        uint64_t epoch = p->epoch;
        eplb_model_view_release(&v);
        if (total != want)
            return (void *)2;
        if (epoch < last)
            return (void *)3;
        last = epoch;
        reads++;
    }
    return reads > 0 ? NULL : (void *)4;
}

Test(concurrency, readers_always_see_whole_epochs) {
    register_ok("a");
    pthread_t r[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&r[i], NULL, reader_thread, NULL);
    for (int i = 0; i < 50; i++)
        cr_assert_eq((intptr_t)rebalance_thread("a"), EPLB_OK);
    atomic_store(&stop_readers, 1);
    for (int i = 0; i < 3; i++) {
        void *rc;
        pthread_join(r[i], &rc);
        cr_assert_null(rc, "reader %d failed with %ld", i, (long)(intptr_t)rc);
    }
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(reg, "a", &v, NULL), EPLB_OK);
    cr_assert_eq(v.snap->placement.epoch, 50);
    eplb_model_view_release(&v);
}

/* ---- every allocation failing, one at a time -------------------------------- */

Test(concurrency, each_failed_allocation_leaves_everything_as_it_was) {
    register_ok("a");
    /* Walk RegisterModel, Rebalance and RecordLoad with the 1st, 2nd, ...
     * allocation failing until the operation succeeds: each failure is a
     * clean EPLB_ENOMEM and changes nothing. */
    int walked = 0;
    for (long n = 1;; n++) {
        int saves = store.saves;
        eplb_alloc_fail_at(n, 0);
        eplb_register_request req = request("b");
        eplb_register_result res;
        eplb_error err;
        eplb_status st = eplb_registry_register(reg, &req, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            eplb_model_view_release(&res.view);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
        cr_assert_eq(store.saves, saves, "allocation %ld: stored anyway", n);
        cr_assert_eq(eplb_registry_count(reg), 1);
        walked++;
    }
    cr_assert_gt(walked, 2);
    for (long n = 1;; n++) {
        eplb_alloc_fail_at(n, 0);
        eplb_rebalance_result res;
        eplb_error err;
        for (int i = 0; i < 32; i++)
            skewed_load[i] = i % 16 < 12 ? 1 + (i % 5) * 100 : 0;
        eplb_rebalance_request req = { .model_id = "a", .physical_load = skewed_load, .physical_load_len = 32 };
        eplb_status st = eplb_registry_rebalance(reg, &req, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            cr_assert_eq(res.placement.epoch, 1);
            eplb_rebalance_result_free(&res);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
        eplb_model_view v;
        cr_assert_eq(eplb_registry_view(reg, "a", &v, NULL), EPLB_OK);
        cr_assert_eq(v.snap->placement.epoch, 0, "allocation %ld committed anyway", n);
        eplb_model_view_release(&v);
    }
    for (long n = 1;; n++) {
        eplb_alloc_fail_at(n, 0);
        eplb_record_request req = { .model_id = "a", .physical_load = skewed_load, .physical_load_len = 32 };
        eplb_record_result res;
        eplb_error err;
        eplb_status st = eplb_registry_record_load(reg, &req, &res, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK) {
            cr_assert_eq(res.passes_recorded, 1);
            break;
        }
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
    }
}

Test(concurrency, delete_refuses_a_model_with_an_operation_in_progress_unless_forced) {
    register_ok("a");
    eplb_model_shape shape;
    cr_assert_eq(eplb_registry_get_shape(reg, "a", &shape, NULL), EPLB_OK);
    cr_assert_eq(eplb_registry_attach_weights(reg, "a", &slow_ops, NULL, &shape, NULL), EPLB_OK);
    pthread_t t;
    pthread_create(&t, NULL, rebalance_thread, "a");
    wait_gate_entered();
    eplb_error err;
    cr_assert_eq(eplb_registry_delete(reg, "a", false, &err), EPLB_EPRECONDITION);
    cr_assert_not_null(strstr(err.msg, "in progress"), "%s", err.msg);
    /* ListModels does not wait either. */
    eplb_model_summary *all;
    size_t n;
    cr_assert_eq(eplb_registry_list(reg, &all, &n, NULL), EPLB_OK);
    cr_assert_eq(n, 1);
    cr_assert_eq(all[0].state, EPLB_MOVE_STAGED);
    free(all);
    open_gate();
    void *rc;
    pthread_join(t, &rc);
    cr_assert_eq((intptr_t)rc, EPLB_OK);
    cr_assert_eq(eplb_registry_delete(reg, "a", true, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_count(reg), 0);
}
