/* log_cost.c -- what the log costs eplbd (docs/benchmarks.md, "Logs"): one
 * call line in text and in JSON (a committed Rebalance, an error with a
 * message), a free-text line, a line below the level (filtered), a debug
 * event through the core's trace hook, and the hook's check when it is
 * off (what every event site in eplb_move.c pays at info).  Lines go to
 * /dev/null, so this is the cost of building and writing a line, not of
 * the reader at the other end of stderr.
 *
 * Not a bench_*.c (those link eplb_core only); it needs the rpc library.
 * Build against a tree built with the default RelWithDebInfo (-O2):
 *   B=build-logs; gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE \
 *     -Iservice/rpc -Iservice/core -I$B/gen -I.deps/upb/src -I.deps/upb/include \
 *     bench/log_cost.c $B/libeplb_rpc.a $B/gpu/libeplb_gpu.a $B/libeplb_proto.a \
 *     $B/libeplb_core.a $(pkg-config --libs grpc) -ldl -lm -lpthread -o $B/log_cost
 *   $B/log_cost [lines]   (default 200000 per case; the off check runs 1000x that) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eplb_trace.h"
#include "rpc_log.h"

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static rpc_call_facts rebalance_facts(void) {
    rpc_call_facts f = { 0 };
    strcpy(f.model_id, "deepseek-v3");
    f.rebalance = true;
    f.committed = true;
    f.balancedness_before = 0.612345;
    f.balancedness_after = 0.934567;
    f.experts_moved = 1234;
    f.bytes_moved = 9876543210ull;
    f.compute_ms = 0.512;
    f.move_ms = 321.5;
    f.epoch = 42;
    return f;
}

typedef enum { CASE_REBALANCE, CASE_ERROR, CASE_TEXT_MSG, CASE_FILTERED, CASE_TRACE } case_kind;

static double run(case_kind k, rpc_log_format fmt, long n) {
    rpc_log_set_format(fmt);
    rpc_log_set_level(k == CASE_FILTERED ? RPC_LOG_WARN : RPC_LOG_DEBUG);
    rpc_call_facts f = rebalance_facts();
    rpc_call_facts ef = { 0 };
    strcpy(ef.model_id, "deepseek-v3");
    rpc_call_record ok = { .method = "Rebalance", .code = 0, .message = "", .duration_ms = 322.4,
                           .peer = "ipv4:10.0.3.17:51234", .facts = &f };
    rpc_call_record bad = { .method = "Rebalance", .code = 10, .duration_ms = 0.21,
                            .message = "model deepseek-v3 is at epoch 43, the request expected epoch 42",
                            .peer = "ipv4:10.0.3.17:51234", .facts = &ef };
    eplb_trace_field tf[] = {
        EPLB_TF_U("layer", 17), EPLB_TF_U("slots_changed", 21), EPLB_TF_F("gather_ms", 1.25),
        EPLB_TF_F("scatter_ms", 3.5), EPLB_TF_U("bytes_scattered", 1234567), EPLB_TF_B("scatter_retried", false),
    };
    eplb_trace_set(k == CASE_TRACE ? rpc_log_trace : NULL);
    double t0 = now_ns();
    for (long i = 0; i < n; i++) {
        switch (k) {
        case CASE_REBALANCE: rpc_log_call(&ok); break;
        case CASE_ERROR: rpc_log_call(&bad); break;
        case CASE_TEXT_MSG: rpc_log(RPC_LOG_INFO, "drained in %d ms: %d call(s) in flight", (int)i & 1023, 3); break;
        case CASE_FILTERED: rpc_log_call(&ok); break;
        case CASE_TRACE: eplb_trace("move_layer", "deepseek-v3", tf, EPLB_TRACE_N(tf)); break;
        }
    }
    double ns = (now_ns() - t0) / (double)n;
    eplb_trace_set(NULL);
    return ns;
}

/* What an event site costs at info: eplb_trace_on() and its branch (the
 * fields are built only behind it).  volatile sink: the loop is not
 * folded away; the baseline loop is subtracted. */
static double off_check(long n) {
    volatile long sink = 0;
    eplb_trace_set(NULL);
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        sink = sink + 1;
    double base = now_ns() - t0;
    t0 = now_ns();
    for (long i = 0; i < n; i++) {
        if (eplb_trace_on()) {
            eplb_trace_field f[] = { EPLB_TF_U("layer", i) };
            eplb_trace("move_layer", "m", f, 1);
        }
        sink = sink + 1;
    }
    double with = now_ns() - t0;
    return (with - base) / (double)n;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 200000;
    if (n <= 0)
        n = 200000;
    if (!freopen("/dev/null", "w", stderr))
        return 1;
    /* Warm-up: page in the code, the libc's time zone and stdio paths. */
    run(CASE_REBALANCE, RPC_LOG_JSON, n / 10 + 1);
    printf("%-52s %10s %10s\n", "case (ns per line)", "text", "json");
    static const struct {
        case_kind k;
        const char *name;
    } cases[] = {
        { CASE_REBALANCE, "call line: committed Rebalance (all fields)" },
        { CASE_ERROR, "call line: ABORTED with a 64-byte message" },
        { CASE_TEXT_MSG, "free-text line (rpc_log, printf format)" },
        { CASE_FILTERED, "call line below --log-level (not written)" },
        { CASE_TRACE, "debug event through the trace hook (6 fields)" },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        double t = run(cases[c].k, RPC_LOG_TEXT, n);
        double j = run(cases[c].k, RPC_LOG_JSON, n);
        printf("%-52s %10.1f %10.1f\n", cases[c].name, t, j);
    }
    printf("%-52s %10.3f\n", "trace hook off: eplb_trace_on() + branch (ns/site)", off_check(n * 1000));
    return 0;
}
