/* eplb_helper.c -- one helper thread that shares work split into items
 * (see eplb_helper.h).
 *
 * State, under mu:
 *
 *            share hands it out           helper wakes
 *      IDLE ------------------> ASSIGNED -------------> RUNNING
 *       ^  ^                       |                       |
 *       |  +--- share calls it off +                       | worker returns
 *       |       (not woken yet)                            v
 *       +------------------ share collects it -------- DONE
 *
 * Only the share call that moved the state out of IDLE moves it back, so
 * one call at a time owns the helper; others find it busy and work alone.
 *
 * Locks: mu guards state, task and arg; it is held only to change them,
 * never while a worker runs.  cv_task wakes the helper (ASSIGNED), cv_done
 * the owning call (DONE). */
#include <assert.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#include "eplb_helper.h"

typedef enum { HELPER_IDLE, HELPER_ASSIGNED, HELPER_RUNNING, HELPER_DONE } helper_state;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_task = PTHREAD_COND_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static helper_state state = HELPER_IDLE;
static eplb_helper_fn task;
static void *task_arg;
static bool started; /* the thread exists: written once, inside once */
static atomic_bool enabled = true;
static atomic_ulong runs;

static void *helper_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (state != HELPER_ASSIGNED)
            pthread_cond_wait(&cv_task, &mu);
        state = HELPER_RUNNING;
        eplb_helper_fn fn = task;
        void *arg = task_arg;
        pthread_mutex_unlock(&mu);
        fn(arg);
        pthread_mutex_lock(&mu);
        assert(state == HELPER_RUNNING);
        state = HELPER_DONE;
        pthread_cond_signal(&cv_done);
    }
    return NULL;
}

static void helper_start(void) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* the helper inherits it: no signal lands there */
    pthread_attr_t at;
    pthread_t th;
    if (pthread_attr_init(&at) == 0) {
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        started = pthread_create(&th, &at, helper_main, NULL) == 0;
        pthread_attr_destroy(&at);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* IDLE -> ASSIGNED, when the helper exists and no other call owns it. */
static bool helper_hand_out(eplb_helper_fn fn, void *arg) {
    if (!atomic_load(&enabled))
        return false;
    pthread_once(&once, helper_start);
    if (!started)
        return false;
    pthread_mutex_lock(&mu);
    const bool took = state == HELPER_IDLE;
    if (took) {
        task = fn;
        task_arg = arg;
        state = HELPER_ASSIGNED;
        pthread_cond_signal(&cv_task);
    }
    pthread_mutex_unlock(&mu);
    return took;
}

/* ASSIGNED -> IDLE (called off: it never touches arg), or RUNNING ->
 * DONE -> IDLE (waited for).  true when the helper ran the worker. */
static bool helper_collect(void) {
    pthread_mutex_lock(&mu);
    const bool ran = state != HELPER_ASSIGNED;
    while (state == HELPER_RUNNING)
        pthread_cond_wait(&cv_done, &mu);
    assert(state == HELPER_ASSIGNED || state == HELPER_DONE);
    state = HELPER_IDLE;
    pthread_mutex_unlock(&mu);
    return ran;
}

void eplb_helper_share(eplb_helper_fn fn, void *arg) {
    const bool handed = helper_hand_out(fn, arg);
    fn(arg);
    if (handed && helper_collect())
        atomic_fetch_add(&runs, 1);
}

bool eplb_helper_set_enabled(bool on) { return atomic_exchange(&enabled, on); }

unsigned long eplb_helper_runs(void) { return atomic_load(&runs); }
