/* test_helper.c -- the helper thread that shares work (eplb_helper.c):
 * both threads run the worker when the helper is free, a call that finds
 * it busy works alone, and a disabled helper leaves everything to the
 * caller.  The DEEPSEEK policy's use of it is in test_policy.c. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "eplb_helper.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A worker that waits (up to 10 s) until `want` threads are inside it. */
typedef struct meet {
    atomic_int inside, calls;
    int want;
    atomic_bool release; /* set: stop waiting */
    atomic_int met;      /* calls that saw `want` threads inside */
} meet;

static void meet_work(void *arg) {
    meet *m = arg;
    atomic_fetch_add(&m->calls, 1);
    atomic_fetch_add(&m->inside, 1);
    const double until = now_s() + 10;
    while (atomic_load(&m->inside) < m->want && !atomic_load(&m->release) && now_s() < until)
        ;
    if (atomic_load(&m->inside) >= m->want)
        atomic_fetch_add(&m->met, 1);
    while (!atomic_load(&m->release) && m->want > 2 && now_s() < until)
        ; /* want > 2: hold the helper until released */
}

Test(helper, both_threads_run_the_worker) {
    meet m = { .want = 2 };
    const unsigned long runs = eplb_helper_runs();
    eplb_helper_share(meet_work, &m);
    cr_assert_eq(atomic_load(&m.calls), 2);
    cr_assert_eq(atomic_load(&m.met), 2, "the helper never joined the caller within 10 s");
    cr_assert_eq(eplb_helper_runs(), runs + 1);
}

static void *hold_helper(void *arg) {
    eplb_helper_share(meet_work, arg);
    return NULL;
}

static void count_work(void *arg) { atomic_fetch_add((atomic_int *)arg, 1); }

Test(helper, a_call_that_finds_it_busy_works_alone) {
    /* want 3 (never met): both threads of the first call stay inside until
     * released, so the helper is busy for the second call. */
    meet m = { .want = 3 };
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, hold_helper, &m), 0);
    const double until = now_s() + 10;
    while (atomic_load(&m.inside) < 2 && now_s() < until)
        ;
    cr_assert_eq(atomic_load(&m.inside), 2, "the helper did not take the first call");
    atomic_int n = 0;
    eplb_helper_share(count_work, &n);
    cr_assert_eq(atomic_load(&n), 1, "a busy helper ran another call's worker");
    atomic_store(&m.release, true);
    pthread_join(th, NULL);
    cr_assert_eq(atomic_load(&m.calls), 2);
    /* Free again: the next call has both threads. */
    meet m2 = { .want = 2 };
    eplb_helper_share(meet_work, &m2);
    cr_assert_eq(atomic_load(&m2.met), 2);
}

Test(helper, disabled_leaves_it_to_the_caller) {
    const bool was = eplb_helper_set_enabled(false);
    cr_assert(was);
    const unsigned long runs = eplb_helper_runs();
    atomic_int n = 0;
    for (int i = 0; i < 100; i++)
        eplb_helper_share(count_work, &n);
    cr_assert_eq(atomic_load(&n), 100);
    cr_assert_eq(eplb_helper_runs(), runs);
    cr_assert(!eplb_helper_set_enabled(true));
}
