/* test_drain.c -- graceful shutdown and head-of-line blocking, over real
 * gRPC connections to a separate eplbd process.
 *
 * Slow calls come from eplbd's hidden test hook --test-handler-delay-ms
 * METHOD:MS (every handler of METHOD sleeps MS first, on the thread that
 * runs it), so each test knows how long its calls take.
 *
 *  - SIGTERM drains: every call the server accepted, including those still
 *    waiting for a worker, runs to completion; new connections are refused;
 *    the database holds every completed registration after a restart.
 *  - A call still running at --drain-ms is cancelled, the server waits for
 *    its handler and exits 0 (it used to abort in grpc_cq_begin_op), queued
 *    calls are not run, and the window flush and database close still run.
 *  - With every worker busy, Health/Check and GetPlacement still answer at
 *    once (they used to wait for a worker thread). */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"
#include "grpc/health/v1/health.upb.h"

#define REGISTER "/eplb.v1.ExpertBalancer/RegisterModel"
#define REBALANCE "/eplb.v1.ExpertBalancer/Rebalance"
#define GET "/eplb.v1.ExpertBalancer/GetPlacement"
#define HEALTH "/grpc.health.v1.Health/Check"

/* A small MoE model (2 layers, 4 logical / 6 physical experts, ep 2). */
static char *register_bytes(upb_Arena *a, const char *name, size_t *len) {
    return eplb_v1_RegisterModelRequest_serialize(harness_moe_request(a, name, 2, 4, 6, 2), a, len);
}

static char *rebalance_bytes(upb_Arena *a, const char *id, size_t *len) {
    eplb_v1_RebalanceRequest *r = eplb_v1_RebalanceRequest_new(a);
    eplb_v1_RebalanceRequest_set_model_id(r, upb_StringView_FromString(id));
    int64_t *load = eplb_v1_RebalanceRequest_resize_physical_load(r, 12, a);
    for (int i = 0; i < 12; i++)
        load[i] = 10 * (i % 6) + 1;
    eplb_v1_RebalanceRequest_set_dry_run(r, true);
    return eplb_v1_RebalanceRequest_serialize(r, a, len);
}

static char *get_bytes(upb_Arena *a, const char *id, size_t *len) {
    eplb_v1_GetPlacementRequest *r = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(r, upb_StringView_FromString(id));
    return eplb_v1_GetPlacementRequest_serialize(r, a, len);
}

static char *health_bytes(upb_Arena *a, size_t *len) {
    return grpc_health_v1_HealthCheckRequest_serialize(grpc_health_v1_HealthCheckRequest_new(a), a, len);
}

/* One call on this thread: its status, and its duration in *ms. */
static int timed_call(eplb_client *c, const char *method, const char *req, size_t len, int timeout_ms,
                      double *ms) {
    eplb_call_result r;
    double t0 = harness_now_ms();
    cr_assert_eq(eplb_client_call(c, method, req, len, timeout_ms, &r), 0);
    *ms = harness_now_ms() - t0;
    int st = r.status;
    eplb_call_result_free(&r);
    return st;
}

/* Wait until the server has accepted n calls of method (it logs each at
 * --log-level debug).  The old server (no "listening on" line) logged no
 * such thing: it gets a fixed 400 ms instead, inside the first round of
 * slow handlers, which is when its unmatched calls were lost. */
static void wait_accepted(const eplbd_proc *p, const char *method, int n) {
    char text[160];
    snprintf(text, sizeof text, "accepted %s (", method);
    if (!eplbd_wait_log(p, "listening on ", 0)) {
        usleep(400000);
        return;
    }
    cr_assert(eplbd_wait_log_n(p, text, n, 30000), "the server did not accept %d %s calls", n, method);
}

static void start_with(eplbd_proc *p, const char *const *args) {
    memset(p, 0, sizeof *p);
    eplbd_tmpdir(p);
    for (int i = 0; args[i]; i++)
        p->extra[i] = args[i];
    eplbd_start(p);
}

/* Restart on the same database without the hook; how many of model-0 ..
 * model-(n-1) are registered. */
static int count_registered(eplbd_proc *p, int n) {
    memset(p->extra, 0, sizeof p->extra);
    eplbd_start(p);
    eplb_client *c = eplb_client_open(p->addr);
    upb_Arena *a = upb_Arena_New();
    int found = 0;
    for (int i = 0; i < n; i++) {
        char name[32];
        size_t len;
        double ms;
        snprintf(name, sizeof name, "model-%d", i);
        char *bytes = get_bytes(a, name, &len);
        int st = timed_call(c, GET, bytes, len, call_timeout_ms(), &ms);
        cr_assert(st == 0 || st == 5 /* NOT_FOUND */, "GetPlacement %s: %s", name, eplb_grpc_status_name(st));
        found += st == 0;
    }
    upb_Arena_Free(a);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(p), 0);
    return found;
}

TestSuite(drain, .timeout = 300);

Test(drain, every_accepted_call_completes_and_new_connections_are_refused) {
    /* 12 calls of 1 s on 2 workers: 6 s of work, 10 s to drain.  The old
     * server had 2 x workers request_call slots, stuck behind the handlers
     * on the same threads: most of these were cancelled at SIGTERM. */
    enum { CALLS = 12, DELAY_MS = 1000 };
    const char *drain_ms = harness_slow() ? "60000" : "10000";
    const char *args[] = { "--workers", "2", "--drain-ms", drain_ms, "--test-handler-delay-ms",
                           "RegisterModel:1000", "--log-level", "debug", NULL };
    eplbd_proc p;
    start_with(&p, args);
    eplb_client *c = eplb_client_open(p.addr);
    upb_Arena *a = upb_Arena_New();
    size_t len;
    double ms;
    char *bytes = health_bytes(a, &len);
    cr_assert_eq(timed_call(c, HEALTH, bytes, len, call_timeout_ms(), &ms), 0); /* connected */

    harness_call calls[CALLS];
    for (int i = 0; i < CALLS; i++) {
        char name[32];
        snprintf(name, sizeof name, "model-%d", i);
        bytes = register_bytes(a, name, &len);
        harness_call_start(&calls[i], c, REGISTER, bytes, len, 60000);
    }
    wait_accepted(&p, REGISTER, CALLS); /* two running, ten queued */
    double t_sig = harness_now_ms();
    kill(p.pid, SIGTERM);
    cr_assert(eplbd_wait_log(&p, "draining", 10000), "no drain started");

    /* Draining: a new connection is refused at once (the listener is
     * closed), and the open one takes no new call. */
    eplb_client *late = eplb_client_open(p.addr);
    bytes = health_bytes(a, &len);
    int st = timed_call(late, HEALTH, bytes, len, 3000, &ms);
    /* UNAVAILABLE: the listener was closed.  gRPC closes listeners
     * asynchronously, so on a loaded machine (valgrind, 2 cores) the
     * connection may still be accepted just before: then its call is
     * CANCELLED by the shutting-down server.  Either way it is not served. */
    cr_assert(st == 14 /* UNAVAILABLE */ || st == 1 /* CANCELLED */, "a new connection while draining: %s",
              eplb_grpc_status_name(st));
    cr_assert_lt(ms, 2500, "refused after %.0f ms", ms);
    eplb_client_close(late);
    st = timed_call(c, HEALTH, bytes, len, 3000, &ms);
    cr_assert_neq(st, 0, "a new call on a draining connection was served");

    int ok = 0;
    double last = 0;
    for (int i = 0; i < CALLS; i++) {
        harness_call_join(&calls[i]);
        cr_assert_eq(calls[i].rc, 0);
        if (calls[i].status == 0)
            ok++;
        else
            cr_log_error("call %d: %s: %s", i, eplb_grpc_status_name(calls[i].status), calls[i].message);
        if (calls[i].end_ms - t_sig > last)
            last = calls[i].end_ms - t_sig;
    }
    int rc = eplbd_wait(&p, harness_slow() ? 120000 : 20000);
    double t_exit = harness_now_ms() - t_sig;
    char log[65536];
    eplbd_log(&p, log, sizeof log);
    fprintf(stderr, "drain: %d calls in flight at SIGTERM, %d completed OK, last at +%.0f ms, exit %d at +%.0f ms\n",
            CALLS, ok, last, rc, t_exit);
    cr_assert_eq(rc, 0, "eplbd exited with %d; log:\n%s", rc, log);
    cr_assert_eq(ok, CALLS, "%d of %d accepted calls completed; log:\n%s", ok, CALLS, log);
    cr_assert_geq(last, (CALLS / 2) * DELAY_MS - 1500, "the calls ran one after another on 2 workers");
    cr_assert_not_null(strstr(log, "12 call(s) in flight, 12 completed, 0 cancelled"), "%s", log);
    cr_assert_not_null(strstr(log, "stopped"), "%s", log);
    eplb_client_close(c);
    upb_Arena_Free(a);

    /* Each completed registration is in the database. */
    cr_assert_eq(count_registered(&p, CALLS), CALLS);
    eplbd_cleanup(&p);
}

Test(drain, call_running_at_the_deadline_is_cancelled_without_abort) {
    /* 4 calls of 4 s on 2 workers, 1 s to drain: at the deadline two run
     * and two wait.  The old server shut its completion queue down while
     * the two handlers still ran and aborted when they finished. */
    enum { CALLS = 4 };
    const char *args[] = { "--workers", "2", "--drain-ms", "1000", "--test-handler-delay-ms",
                           "RegisterModel:4000", "--log-level", "debug", NULL };
    eplbd_proc p;
    start_with(&p, args);
    eplb_client *c = eplb_client_open(p.addr);
    upb_Arena *a = upb_Arena_New();
    size_t len;
    double ms;
    char *bytes = health_bytes(a, &len);
    cr_assert_eq(timed_call(c, HEALTH, bytes, len, call_timeout_ms(), &ms), 0);

    harness_call calls[CALLS];
    for (int i = 0; i < CALLS; i++) {
        char name[32];
        snprintf(name, sizeof name, "model-%d", i);
        bytes = register_bytes(a, name, &len);
        harness_call_start(&calls[i], c, REGISTER, bytes, len, 60000);
    }
    wait_accepted(&p, REGISTER, CALLS);
    usleep(100000); /* two handlers running, two calls queued */
    double t_sig = harness_now_ms();
    kill(p.pid, SIGTERM);

    double last = 0;
    for (int i = 0; i < CALLS; i++) {
        harness_call_join(&calls[i]);
        cr_assert_eq(calls[i].rc, 0);
        cr_assert_neq(calls[i].status, 0, "call %d completed although it could not in 1 s", i);
        if (calls[i].end_ms - t_sig > last)
            last = calls[i].end_ms - t_sig;
    }
    int rc = eplbd_wait(&p, harness_slow() ? 120000 : 20000);
    double t_exit = harness_now_ms() - t_sig;
    char log[65536];
    eplbd_log(&p, log, sizeof log);
    fprintf(stderr, "drain deadline: %d calls in flight, all cancelled by +%.0f ms, exit %d at +%.0f ms\n",
            CALLS, last, rc, t_exit);
    cr_assert_eq(rc, 0, "eplbd exited with %d (134 = SIGABRT); log:\n%s", rc, log);
    /* Cancelled at the deadline, not when the handlers returned ... */
    cr_assert_lt(last, 3000, "the clients were told only at +%.0f ms", last);
    /* ... but the server waited for the running handlers (4 s from their
     * start, about 0.1 s before SIGTERM) before it closed the database. */
    cr_assert_geq(t_exit, 3000, "exited at +%.0f ms, before its handlers returned", t_exit);
    cr_assert_not_null(strstr(log, "drain time (1000 ms) is over: cancelling 4 call(s)"), "%s", log);
    cr_assert_not_null(strstr(log, "4 call(s) in flight, 0 completed, 4 cancelled"), "%s", log);
    cr_assert_not_null(strstr(log, "stopped"), "%s", log);
    eplb_client_close(c);
    upb_Arena_Free(a);

    /* The two running handlers finished their registrations before the
     * database closed; the two queued calls never ran. */
    cr_assert_eq(count_registered(&p, CALLS), 2);
    eplbd_cleanup(&p);
}

Test(drain, health_and_get_placement_do_not_wait_for_busy_workers) {
    /* Both workers and the queue hold 2 s Rebalances; the old server ran
     * every handler on its 2 completion-queue threads, so Health waited. */
    enum { SLOW = 4 };
    const char *args[] = { "--workers", "2", "--drain-ms", "20000", "--test-handler-delay-ms",
                           "Rebalance:2000", "--log-level", "debug", NULL };
    eplbd_proc p;
    start_with(&p, args);
    eplb_client *c = eplb_client_open(p.addr);
    upb_Arena *a = upb_Arena_New();
    size_t len;
    double ms;
    char *bytes = register_bytes(a, "m", &len);
    cr_assert_eq(timed_call(c, REGISTER, bytes, len, call_timeout_ms(), &ms), 0);

    harness_call calls[SLOW];
    bytes = rebalance_bytes(a, "m", &len);
    for (int i = 0; i < SLOW; i++)
        harness_call_start(&calls[i], c, REBALANCE, bytes, len, 60000);
    wait_accepted(&p, REBALANCE, SLOW);
    usleep(100000); /* both workers inside a handler */

    double health_ms = 0, get_ms = 0, worst = 0;
    for (int round = 0; round < 3; round++) {
        bytes = health_bytes(a, &len);
        cr_assert_eq(timed_call(c, HEALTH, bytes, len, 10000, &health_ms), 0);
        bytes = get_bytes(a, "m", &len);
        cr_assert_eq(timed_call(c, GET, bytes, len, 10000, &get_ms), 0);
        worst = health_ms > worst ? health_ms : worst;
        worst = get_ms > worst ? get_ms : worst;
        fprintf(stderr, "busy workers: Health/Check %.1f ms, GetPlacement %.1f ms\n", health_ms, get_ms);
    }
    /* Generous (a loaded test machine): the point is they are not queued
     * behind 2 s calls. */
    cr_assert_lt(worst, harness_slow() ? 1500 : 500, "a fast call waited %.0f ms behind busy workers", worst);

    for (int i = 0; i < SLOW; i++) {
        harness_call_join(&calls[i]);
        cr_assert_eq(calls[i].status, 0, "Rebalance %d: %s: %s", i, eplb_grpc_status_name(calls[i].status),
                     calls[i].message);
    }
    upb_Arena_Free(a);
    eplbd_suite_stop(&p, c);
}
