/* main.c -- eplbd: flags, signals, and wiring of store, registry and server.
 *
 * SIGTERM/SIGINT are blocked in every thread and taken by sigwait() here,
 * so shutdown runs on the main thread, in order: drain the server (in-flight
 * calls finish), then close the registry and the database. */
#include <errno.h>
#include <getopt.h>
#include <grpc/grpc.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eplb_backend.h"
#include "eplb_registry.h"
#include "eplb_store.h"
#include "rpc_log.h"
#include "rpc_server.h"

#define EPLBD_VERSION "0.1.0"

typedef struct options {
    const char *listen;
    const char *data_dir;
    const char *db;             /* NULL: <data_dir>/eplbd.db */
    const char *ready_file;
    const char *backend;        /* weight-move backend: auto, cpu, hip */
    int workers;
    int max_message_bytes;
    int drain_ms;
    eplb_limits limits;
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: eplbd [options]\n"
            "  --listen ADDR          host:port or unix:/path (default 127.0.0.1:50051)\n"
            "  --data-dir DIR         directory of the default database (default ./eplbd-data)\n"
            "  --db PATH              SQLite database file, or :memory: (default DIR/eplbd.db)\n"
            "  --workers N            worker threads (default: number of CPUs, at least 2)\n"
            "  --max-message-bytes N  largest request or response (default 67108864)\n"
            "  --max-layers N         largest num_moe_layers accepted (default 1024)\n"
            "  --max-experts N        largest num_physical_experts accepted (default 8192)\n"
            "  --max-ep-size N        largest ep_size accepted (default 4096)\n"
            "  --max-window-mib N     largest load window of one model, in MiB (default 256)\n"
            "  --drain-ms N           how long in-flight calls may finish at shutdown (default 10000)\n"
            "  --log-level LEVEL      debug, info, warn or error (default info)\n"
            "  --ready-file PATH      write the bound address there once serving\n"
            "  --backend NAME         how attached weights move: auto (hip when a GPU is there), cpu, hip\n"
            "  --version, --help\n");
}

static int parse_int(const char *flag, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "eplbd: %s wants an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_options(int argc, char **argv, options *o) {
    enum { O_LISTEN = 256, O_DATA, O_DB, O_WORKERS, O_MAXMSG, O_MAXL, O_MAXE, O_MAXEP, O_MAXWIN, O_DRAIN,
           O_LOG, O_READY, O_BACKEND, O_FAULT, O_VERSION, O_HELP };
    static const struct option longopts[] = {
        { "listen", required_argument, NULL, O_LISTEN },
        { "data-dir", required_argument, NULL, O_DATA },
        { "db", required_argument, NULL, O_DB },
        { "workers", required_argument, NULL, O_WORKERS },
        { "max-message-bytes", required_argument, NULL, O_MAXMSG },
        { "max-layers", required_argument, NULL, O_MAXL },
        { "max-experts", required_argument, NULL, O_MAXE },
        { "max-ep-size", required_argument, NULL, O_MAXEP },
        { "max-window-mib", required_argument, NULL, O_MAXWIN },
        { "drain-ms", required_argument, NULL, O_DRAIN },
        { "log-level", required_argument, NULL, O_LOG },
        { "ready-file", required_argument, NULL, O_READY },
        { "backend", required_argument, NULL, O_BACKEND },
        { "fault-inject", required_argument, NULL, O_FAULT },
        { "version", no_argument, NULL, O_VERSION },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    *o = (options){ .listen = "127.0.0.1:50051", .data_dir = "eplbd-data",
                    .workers = ncpu > 2 ? (int)ncpu : 2, .max_message_bytes = 64 << 20,
                    .drain_ms = 10000, .limits = EPLB_LIMITS_DEFAULT, .backend = "auto" };
    int c, v;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case O_LISTEN: o->listen = optarg; break;
        case O_DATA: o->data_dir = optarg; break;
        case O_DB: o->db = optarg; break;
        case O_READY: o->ready_file = optarg; break;
        case O_FAULT: {
            /* Tests only (not in --help): fail the Nth weight-copy op of a
             * phase once, e.g. "gather:1" or "scatter:3". */
            int n = 0;
            eplb_fault_phase phase = strncmp(optarg, "gather:", 7) == 0    ? EPLB_FAULT_GATHER
                                     : strncmp(optarg, "scatter:", 8) == 0 ? EPLB_FAULT_SCATTER
                                                                           : EPLB_FAULT_NONE;
            if (phase == EPLB_FAULT_NONE ||
                parse_int("--fault-inject", strchr(optarg, ':') + 1, 1, 1 << 30, &n) != 0) {
                fprintf(stderr, "eplbd: --fault-inject wants gather:N or scatter:N\n");
                return -1;
            }
            eplb_backend_set_fault(phase, n);
            break;
        }
        case O_BACKEND:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "hip")) {
                fprintf(stderr, "eplbd: --backend wants auto, cpu or hip, got '%s'\n", optarg);
                return -1;
            }
            o->backend = optarg;
            break;
        case O_WORKERS: if (parse_int("--workers", optarg, 1, 1024, &o->workers)) return -1; break;
        case O_MAXMSG: if (parse_int("--max-message-bytes", optarg, 1024, 1 << 30, &o->max_message_bytes)) return -1; break;
        case O_DRAIN: if (parse_int("--drain-ms", optarg, 0, 3600000, &o->drain_ms)) return -1; break;
        case O_MAXL: if (parse_int("--max-layers", optarg, 1, 1 << 20, &v)) return -1; o->limits.max_layers = (uint32_t)v; break;
        case O_MAXE: if (parse_int("--max-experts", optarg, 1, 1 << 24, &v)) return -1; o->limits.max_physical_experts = (uint32_t)v; break;
        case O_MAXEP: if (parse_int("--max-ep-size", optarg, 1, 1 << 20, &v)) return -1; o->limits.max_ep_size = (uint32_t)v; break;
        case O_MAXWIN: if (parse_int("--max-window-mib", optarg, 1, 1 << 20, &v)) return -1; o->limits.max_window_bytes = (uint64_t)v << 20; break;
        case O_LOG:
            if ((v = rpc_log_level_parse(optarg)) < 0) {
                fprintf(stderr, "eplbd: --log-level wants debug, info, warn or error, got '%s'\n", optarg);
                return -1;
            }
            rpc_log_set_level((rpc_log_level)v);
            break;
        case O_VERSION: printf("eplbd %s\n", EPLBD_VERSION); exit(0);
        case O_HELP: usage(stdout); exit(0);
        default: usage(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "eplbd: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    return 0;
}

/* Write the address atomically (rename) so a reader never sees half. */
static int write_ready_file(const char *path, const char *listen, int port) {
    char tmp[4096], addr[512];
    if (port > 0) {
        /* Replace the port of host:port with the one bound (":0" -> real). */
        const char *colon = strrchr(listen, ':');
        snprintf(addr, sizeof addr, "%.*s:%d", colon ? (int)(colon - listen) : (int)strlen(listen), listen, port);
    } else {
        snprintf(addr, sizeof addr, "%s", listen);
    }
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%s\n", addr) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
        rpc_log(RPC_LOG_ERROR, "cannot write --ready-file %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    options o;
    if (parse_options(argc, argv, &o) != 0)
        return 2;

    /* A DeepSeek-V3-sized Rebalance allocates and frees a few 100 KiB-2 MiB
     * arrays per call; above glibc's default threshold each one is a fresh
     * mmap whose pages fault in and are zeroed every time.  Keeping them in
     * the heap makes them reusable across calls (measured in
     * docs/benchmarks.md). */
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 128 << 20);

    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL); /* before any thread starts */
    signal(SIGPIPE, SIG_IGN);

    char db_path[4096];
    if (o.db) {
        snprintf(db_path, sizeof db_path, "%s", o.db);
    } else {
        if (mkdir(o.data_dir, 0750) != 0 && errno != EEXIST) {
            rpc_log(RPC_LOG_ERROR, "cannot create data directory %s: %s", o.data_dir, strerror(errno));
            return 1;
        }
        snprintf(db_path, sizeof db_path, "%s/eplbd.db", o.data_dir);
    }

    eplb_error err;
    eplb_error_clear(&err);
    eplb_store *store = NULL;
    eplb_registry *registry = NULL;
    if (eplb_store_open(db_path, &store, &err) != EPLB_OK ||
        eplb_registry_open(&eplb_store_sqlite_ops, store, &o.limits, &registry, &err) != EPLB_OK) {
        rpc_log(RPC_LOG_ERROR, "%s", err.msg);
        eplb_store_close(store);
        return 1;
    }

    grpc_init();
    rpc_context ctx = { .registry = registry, .limits = o.limits, .default_backend = o.backend };
    atomic_init(&ctx.serving, true);
    rpc_server_config cfg = { .listen = o.listen, .workers = o.workers,
                              .max_message_bytes = o.max_message_bytes };
    rpc_server *server = NULL;
    int port = 0;
    if (rpc_server_start(&cfg, &ctx, &server, &port, &err) != EPLB_OK) {
        rpc_log(RPC_LOG_ERROR, "%s", err.msg);
        eplb_registry_close(registry);
        eplb_store_close(store);
        grpc_shutdown();
        return 1;
    }
    char why[256] = "";
    const char *backend = strcmp(o.backend, "auto") == 0 ? eplb_backend_auto_name(why, sizeof why) : o.backend;
    rpc_log(RPC_LOG_INFO, "eplbd %s serving on %s (port %d), database %s, %zu model(s), %d workers, "
            "weight backend %s%s%s", EPLBD_VERSION, o.listen, port, db_path, eplb_registry_count(registry),
            o.workers, backend, why[0] ? ": " : "", why);
    int rc = 0;
    if (o.ready_file && write_ready_file(o.ready_file, o.listen, port) != 0)
        rc = 1;

    int sig = 0;
    if (rc == 0)
        sigwait(&stop_signals, &sig);
    rpc_log(RPC_LOG_INFO, "signal %d: draining (up to %d ms)", sig, o.drain_ms);
    rpc_server_stop(server, o.drain_ms);
    /* Load recorded since the last commit is kept across a clean stop. */
    if (eplb_registry_flush(registry, &err) != EPLB_OK) {
        rpc_log(RPC_LOG_ERROR, "saving load windows: %s", err.msg);
        rc = 1;
    }
    eplb_registry_close(registry);
    eplb_store_close(store);
    grpc_shutdown();
    rpc_log(RPC_LOG_INFO, "stopped");
    return rc;
}
