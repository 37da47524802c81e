/* main.c -- eplbd: flags, signals, and wiring of store, registry and server.
 *
 * SIGTERM/SIGINT/SIGQUIT (and HUP, USR1, USR2, ALRM, which are ignored) are
 * blocked in every thread and taken by sigwait() here,
 * so shutdown runs on the main thread, in order: drain the server (every
 * accepted call finishes, up to --drain-ms; rpc_server_stop returns only
 * once no handler runs), then save the load windows and close the registry
 * and the database.  Those last steps run on every exit path after the
 * store opened. */
#include <errno.h>
#include <getopt.h>
#include <grpc/grpc.h>
#include <malloc.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "eplb_backend.h"
#include "eplb_registry.h"
#include "eplb_store.h"
#include "rpc_log.h"
#include "rpc_metrics.h"
#include "rpc_server.h"

#define EPLBD_VERSION "0.1.0"

typedef struct options {
    const char *listen;
    const char *data_dir;
    const char *db;             /* NULL: <data_dir>/eplbd.db */
    const char *ready_file;
    const char *metrics_listen; /* --metrics-listen host:port; NULL: no metrics listener */
    const char *backend;        /* weight-move backend: auto, cpu, hip */
    uint64_t max_staging_bytes; /* --max-staging-mib: per GPU, 0 = no bound */
    int workers;
    int max_message_bytes;
    int drain_ms;
    eplb_limits limits;
    /* AttachWeights trust boundary (rpc_context) */
    const char *shm_prefix;
    uint32_t shm_uids[RPC_MAX_SHM_UIDS];
    size_t num_shm_uids;
    bool allow_remote_weights;
    /* TLS: the files named by --tls-cert, --tls-key, --tls-client-ca, and
     * their contents (read once here: restart-only, no reload) */
    const char *tls_cert, *tls_key, *tls_client_ca;
    char *tls_cert_pem, *tls_key_pem, *tls_client_ca_pem;
    /* tests only: --test-handler-delay-ms METHOD:MS */
    char delay_method[64];
    int delay_ms;
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: eplbd [options]\n"
            "  --listen ADDR          host:port or unix:/path (default 127.0.0.1:50051)\n"
            "  --data-dir DIR         directory of the default database (default ./eplbd-data)\n"
            "  --db PATH              SQLite database file, or :memory: (default DIR/eplbd.db)\n"
            "  --workers N            threads that run handlers (default: number of CPUs, at least 2);\n"
            "                         Health/Check and GetPlacement never wait for one\n"
            "  --max-message-bytes N  largest request or response (default 67108864)\n"
            "  --max-layers N         largest num_moe_layers accepted (default 1024)\n"
            "  --max-experts N        largest num_physical_experts accepted (default 8192)\n"
            "  --max-ep-size N        largest ep_size accepted (default 4096)\n"
            "  --max-window-mib N     largest load window of one model, in MiB (default 256)\n"
            "  --max-models N         most registered models, main and speculators (default 64)\n"
            "  --max-state-mib N      all models' placements and full load windows, in MiB (default 1024)\n"
            "  --max-staging-mib N    staging a weight move may hold per GPU, in MiB (default 1024; 0: no bound);\n"
            "                         a layer that needs more moves in chunks\n"
            "  --drain-ms N           how long in-flight calls may finish at shutdown (default 10000)\n"
            "  --log-level LEVEL      debug, info, warn or error (default info)\n"
            "  --log-format FORMAT    text or json: one line per event on stderr (default text)\n"
            "  --ready-file PATH      write the bound address there once serving\n"
            "  --metrics-listen ADDR  serve Prometheus metrics at http://ADDR/metrics (host:port,\n"
            "                         [v6]:port; port 0 picks one, logged at start); default off\n"
            "  --backend NAME         how attached weights move: auto (hip, else cuda, when a GPU is\n"
            "                         there; else cpu), cpu, hip, cuda (forced: refused at start\n"
            "                         when unusable)\n"
            "  --shm-prefix P         AttachWeights shm objects must be named P... (default /eplb-;\n"
            "                         starts with '/', no other '/')\n"
            "  --shm-allow-uid UID    also accept shm objects owned by UID (repeatable, up to 16;\n"
            "                         the server's own uid always)\n"
            "  --allow-remote-weights accept AttachWeights from non-loopback TCP peers too\n"
            "  --tls-cert PEM         serve TLS with this certificate chain (needs --tls-key)\n"
            "  --tls-key PEM          private key of --tls-cert\n"
            "  --tls-client-ca PEM    require client certificates signed by this CA (mTLS; needs\n"
            "                         --tls-cert and --tls-key); TLS files are read at start only\n"
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

/* The whole of a PEM file named by flag, which must hold a "-----BEGIN
 * <what>" block, NUL-terminated (malloc'd), or NULL after saying why, naming
 * the flag and the file. */
static char *read_pem(const char *flag, const char *path, const char *what) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "eplbd: %s %s: cannot read: %s\n", flag, path, strerror(errno));
        return NULL;
    }
    size_t cap = 16384, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap || ferror(f))
            break;
        char *bigger = cap < (16u << 20) ? realloc(buf, (cap *= 2) + 1) : NULL;
        if (!bigger) {
            free(buf);
            buf = NULL;
        }
        buf = bigger;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        fprintf(stderr, "eplbd: %s %s: cannot read: %s\n", flag, path, bad ? "read error" : "too large");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    char begin[64];
    snprintf(begin, sizeof begin, "-----BEGIN %s", what);
    if (!strstr(buf, begin) || (strcmp(what, "CERTIFICATE") != 0 && !strstr(buf, "PRIVATE KEY-----"))) {
        fprintf(stderr, "eplbd: %s %s: not a PEM %s (no '%s%s' line)\n", flag, path,
                strcmp(what, "CERTIFICATE") == 0 ? "certificate" : "private key", begin,
                strcmp(what, "CERTIFICATE") == 0 ? "-----" : "... PRIVATE KEY-----");
        free(buf);
        return NULL;
    }
    return buf;
}

/* --tls-cert and --tls-key go together; --tls-client-ca needs both. */
static int parse_tls(options *o) {
    if (!o->tls_cert != !o->tls_key) {
        fprintf(stderr, "eplbd: %s %s given without %s: TLS needs both --tls-cert and --tls-key\n",
                o->tls_cert ? "--tls-cert" : "--tls-key", o->tls_cert ? o->tls_cert : o->tls_key,
                o->tls_cert ? "--tls-key" : "--tls-cert");
        return -1;
    }
    if (o->tls_client_ca && !o->tls_cert) {
        fprintf(stderr, "eplbd: --tls-client-ca %s given without --tls-cert and --tls-key: "
                        "client certificates are only checked on a TLS listener\n", o->tls_client_ca);
        return -1;
    }
    if (!o->tls_cert)
        return 0;
    if (!(o->tls_cert_pem = read_pem("--tls-cert", o->tls_cert, "CERTIFICATE")) ||
        !(o->tls_key_pem = read_pem("--tls-key", o->tls_key, "")) ||
        (o->tls_client_ca && !(o->tls_client_ca_pem = read_pem("--tls-client-ca", o->tls_client_ca, "CERTIFICATE")))) {
        free(o->tls_cert_pem);
        free(o->tls_key_pem);
        return -1;
    }
    return 0;
}

static int parse_options(int argc, char **argv, options *o) {
    enum { O_LISTEN = 256, O_DATA, O_DB, O_WORKERS, O_MAXMSG, O_MAXL, O_MAXE, O_MAXEP, O_MAXWIN, O_DRAIN,
           O_LOG, O_READY, O_BACKEND, O_FAULT, O_VERSION, O_HELP, O_MAXMODELS, O_MAXSTATE, O_MAXSTAGING, O_SHMPREFIX,
           O_SHMUID, O_REMOTEW, O_DELAY, O_TLSCERT, O_TLSKEY, O_TLSCA, O_LOGFMT, O_METRICS };
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
        { "log-format", required_argument, NULL, O_LOGFMT },
        { "ready-file", required_argument, NULL, O_READY },
        { "metrics-listen", required_argument, NULL, O_METRICS },
        { "backend", required_argument, NULL, O_BACKEND },
        { "max-models", required_argument, NULL, O_MAXMODELS },
        { "max-state-mib", required_argument, NULL, O_MAXSTATE },
        { "max-staging-mib", required_argument, NULL, O_MAXSTAGING },
        { "shm-prefix", required_argument, NULL, O_SHMPREFIX },
        { "shm-allow-uid", required_argument, NULL, O_SHMUID },
        { "allow-remote-weights", no_argument, NULL, O_REMOTEW },
        { "tls-cert", required_argument, NULL, O_TLSCERT },
        { "tls-key", required_argument, NULL, O_TLSKEY },
        { "tls-client-ca", required_argument, NULL, O_TLSCA },
        { "fault-inject", required_argument, NULL, O_FAULT },
        { "test-handler-delay-ms", required_argument, NULL, O_DELAY },
        { "version", no_argument, NULL, O_VERSION },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    *o = (options){ .listen = "127.0.0.1:50051", .data_dir = "eplbd-data",
                    .workers = ncpu > 2 ? (int)ncpu : 2, .max_message_bytes = 64 << 20,
                    .drain_ms = 10000, .limits = EPLB_LIMITS_DEFAULT, .backend = "auto",
                    .max_staging_bytes = (uint64_t)1024 << 20,
                    .shm_prefix = "/eplb-" };
    int c, v;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case O_LISTEN: o->listen = optarg; break;
        case O_DATA: o->data_dir = optarg; break;
        case O_DB: o->db = optarg; break;
        case O_READY: o->ready_file = optarg; break;
        case O_METRICS: {
            char host[256];
            int port;
            if (rpc_metrics_http_parse(optarg, host, sizeof host, &port) != 0) {
                fprintf(stderr, "eplbd: --metrics-listen wants host:port (e.g. 127.0.0.1:9100, 0.0.0.0:9100 or "
                                "[::1]:9100), got '%s'\n", optarg);
                return -1;
            }
            o->metrics_listen = optarg;
            break;
        }
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
        case O_DELAY: {
            /* Tests only (not in --help): sleep MS before every handler of
             * METHOD (its log name: "Rebalance", "RegisterModel", ...), on
             * the thread that runs it, to make calls that are slow for a
             * known time: drain and head-of-line tests. */
            const char *colon = strrchr(optarg, ':');
            size_t n = colon ? (size_t)(colon - optarg) : 0;
            if (colon && n < sizeof o->delay_method) {
                memcpy(o->delay_method, optarg, n);
                o->delay_method[n] = '\0';
            }
            if (!colon || n >= sizeof o->delay_method || !rpc_server_method_known(o->delay_method) ||
                parse_int("--test-handler-delay-ms", colon + 1, 0, 3600000, &o->delay_ms) != 0) {
                fprintf(stderr, "eplbd: --test-handler-delay-ms wants METHOD:MS, e.g. Rebalance:2000\n");
                return -1;
            }
            break;
        }
        case O_SHMPREFIX:
            if (optarg[0] != '/' || optarg[1] == '\0' || strchr(optarg + 1, '/') || strlen(optarg) > 200) {
                fprintf(stderr, "eplbd: --shm-prefix wants a name that starts with '/', has at least one more "
                                "character and no other '/' (at most 200 characters; '/' alone would allow every "
                                "object), got '%s'\n", optarg);
                return -1;
            }
            o->shm_prefix = optarg;
            break;
        case O_SHMUID: {
            char *end;
            errno = 0;
            unsigned long uid = strtoul(optarg, &end, 10);
            if (errno || *end || end == optarg || optarg[0] == '-' || uid >= UINT32_MAX) {
                fprintf(stderr, "eplbd: --shm-allow-uid wants a numeric uid, got '%s'\n", optarg);
                return -1;
            }
            if (o->num_shm_uids == RPC_MAX_SHM_UIDS) {
                fprintf(stderr, "eplbd: --shm-allow-uid given more than %d times\n", RPC_MAX_SHM_UIDS);
                return -1;
            }
            o->shm_uids[o->num_shm_uids++] = (uint32_t)uid;
            break;
        }
        case O_REMOTEW: o->allow_remote_weights = true; break;
        case O_TLSCERT: o->tls_cert = optarg; break;
        case O_TLSKEY: o->tls_key = optarg; break;
        case O_TLSCA: o->tls_client_ca = optarg; break;
        case O_MAXMODELS: if (parse_int("--max-models", optarg, 1, 1 << 20, &v)) return -1; o->limits.max_models = (uint32_t)v; break;
        case O_MAXSTATE: if (parse_int("--max-state-mib", optarg, 1, 1 << 24, &v)) return -1; o->limits.max_state_bytes = (uint64_t)v << 20; break;
        case O_MAXSTAGING: if (parse_int("--max-staging-mib", optarg, 0, 1 << 24, &v)) return -1; o->max_staging_bytes = (uint64_t)v << 20; break;
        case O_BACKEND:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "hip") &&
                strcmp(optarg, "cuda")) {
                fprintf(stderr, "eplbd: --backend wants auto, cpu, hip or cuda, got '%s'\n", optarg);
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
            /* The core's debug events (weight moves) only at debug: off, they cost one atomic load. */
            eplb_trace_set(v == RPC_LOG_DEBUG ? rpc_log_trace : NULL);
            break;
        case O_LOGFMT:
            if ((v = rpc_log_format_parse(optarg)) < 0) {
                fprintf(stderr, "eplbd: --log-format wants text or json, got '%s'\n", optarg);
                return -1;
            }
            rpc_log_set_format((rpc_log_format)v);
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
    /* No response may be larger than what gRPC will send. */
    o->limits.max_response_bytes = (uint64_t)o->max_message_bytes;
    return parse_tls(o);
}

/* The address actually served: host:port with the bound port (":0" ->
 * the real one), or the unix socket as given. */
static void bound_address(const char *listen, int port, char *addr, size_t n) {
    if (port > 0) {
        const char *colon = strrchr(listen, ':');
        snprintf(addr, n, "%.*s:%d", colon ? (int)(colon - listen) : (int)strlen(listen), listen, port);
    } else {
        snprintf(addr, n, "%s", listen);
    }
}

/* Write the address atomically (rename) so a reader never sees half. */
static int write_ready_file(const char *path, const char *addr) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%s\n", addr) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
        rpc_log(RPC_LOG_ERROR, "cannot write --ready-file %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* gRPC's listener stops accepting for good once accept() fails with EMFILE
 * (grpc/grpc#16058): make the soft descriptor limit the hard one, so only
 * a real exhaustion of the hard limit can get there. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
            rpc_log(RPC_LOG_DEBUG, "open-file limit raised from %llu to %llu", (unsigned long long)was,
                    (unsigned long long)rl.rlim_max);
    }
}

/* gRPC unlinks an existing unix socket path before it binds: a second
 * eplbd would silently take the path over (and the first, at its exit,
 * would remove it).  Refuse when something answers there, or when the path
 * is not a socket.  Returns 1 (after saying why) when in use. */
static int unix_socket_in_use(const char *listen) {
    if (strncmp(listen, "unix:", 5) != 0)
        return 0;
    const char *path = listen + 5;
    struct stat st;
    if (lstat(path, &st) != 0)
        return 0;
    if (!S_ISSOCK(st.st_mode)) {
        rpc_log(RPC_LOG_ERROR, "cannot listen on %s: the path exists and is not a socket", listen);
        return 1;
    }
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        return 0; /* gRPC will say so */
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int busy = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EAGAIN;
    close(fd);
    if (busy)
        rpc_log(RPC_LOG_ERROR, "cannot listen on %s: another process is listening there (another eplbd?)", listen);
    return busy; /* ECONNREFUSED: a stale socket, gRPC replaces it */
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

    /* Every signal whose default action would end the process without the
     * drain, the window flush and the database close is taken by sigwait
     * below: TERM, INT and QUIT stop (drained); HUP, USR1, USR2 and ALRM are
     * logged and ignored (there is no configuration to reload). */
    static const int stop_sigs[] = { SIGTERM, SIGINT, SIGQUIT };
    static const int ignored_sigs[] = { SIGHUP, SIGUSR1, SIGUSR2, SIGALRM };
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    for (size_t k = 0; k < sizeof stop_sigs / sizeof stop_sigs[0]; k++)
        sigaddset(&stop_signals, stop_sigs[k]);
    for (size_t k = 0; k < sizeof ignored_sigs / sizeof ignored_sigs[0]; k++)
        sigaddset(&stop_signals, ignored_sigs[k]);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL); /* before any thread starts */
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    /* A forced GPU backend that cannot work here is a deployment error:
     * refuse now rather than fail every AttachWeights.  After the sigmask:
     * GPU runtimes start threads, which must inherit it. */
    eplb_error berr;
    if (eplb_backend_usable(o.backend, &berr) != EPLB_OK) {
        rpc_log(RPC_LOG_ERROR, "--backend %s: %s", o.backend, berr.msg);
        return 1;
    }
    if (unix_socket_in_use(o.listen))
        return 1;

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
    rpc_context ctx = { .registry = registry, .limits = o.limits, .default_backend = o.backend,
                        .shm_prefix = o.shm_prefix, .num_shm_uids = o.num_shm_uids,
                        .allow_remote_weights = o.allow_remote_weights, .max_staging_bytes = o.max_staging_bytes };
    memcpy(ctx.shm_uids, o.shm_uids, sizeof ctx.shm_uids);
    atomic_init(&ctx.serving, true);
    /* Metrics listen before gRPC serves, so the first calls are counted and
     * a bad --metrics-listen refuses the start before anything is served. */
    rpc_metrics *metrics = NULL;
    rpc_metrics_http *metrics_http = NULL;
    char metrics_url[320] = "";
    if (o.metrics_listen) {
        if (!(metrics = rpc_metrics_new(&ctx, db_path, EPLBD_VERSION))) {
            eplb_error_set(&err, EPLB_ENOMEM, "cannot set up the metrics");
        } else if (rpc_metrics_http_start(o.metrics_listen, metrics, &metrics_http, metrics_url, sizeof metrics_url,
                                          &err) == EPLB_OK) {
            ctx.on_call = rpc_metrics_on_call;
            ctx.on_call_arg = metrics;
        }
        if (!metrics_http) {
            rpc_log(RPC_LOG_ERROR, "%s", err.msg);
            rpc_metrics_free(metrics);
            eplb_registry_close(registry);
            eplb_store_close(store);
            grpc_shutdown();
            return 1;
        }
    }
    rpc_server_config cfg = { .listen = o.listen, .workers = o.workers,
                              .max_message_bytes = o.max_message_bytes,
                              .test_delay_method = o.delay_method[0] ? o.delay_method : NULL,
                              .test_delay_ms = o.delay_ms, .tls_cert_pem = o.tls_cert_pem,
                              .tls_key_pem = o.tls_key_pem, .tls_client_ca_pem = o.tls_client_ca_pem };
    rpc_server *server = NULL;
    int port = 0;
    int started = rpc_server_start(&cfg, &ctx, &server, &port, &err);
    /* gRPC copied the PEM text; the key need not stay in our memory. */
    if (o.tls_key_pem) {
        explicit_bzero(o.tls_key_pem, strlen(o.tls_key_pem));
        free(o.tls_key_pem);
    }
    free(o.tls_cert_pem);
    free(o.tls_client_ca_pem);
    cfg.tls_cert_pem = cfg.tls_key_pem = cfg.tls_client_ca_pem = NULL;
    if (started != EPLB_OK) {
        rpc_log(RPC_LOG_ERROR, "%s", err.msg);
        rpc_metrics_http_stop(metrics_http);
        rpc_metrics_free(metrics);
        eplb_registry_close(registry);
        eplb_store_close(store);
        grpc_shutdown();
        return 1;
    }
    char addr[512], why[256] = "";
    bound_address(o.listen, port, addr, sizeof addr);
    const char *backend = strcmp(o.backend, "auto") == 0 ? eplb_backend_auto_name(why, sizeof why) : o.backend;
    rpc_log(RPC_LOG_INFO, "eplbd %s listening on %s, %s, database %s, %zu model(s), %d workers, "
            "weight backend %s", EPLBD_VERSION, addr,
            o.tls_client_ca ? "mTLS" : o.tls_cert ? "TLS" : "plaintext", db_path,
            eplb_registry_count(registry), o.workers, why[0] ? why : backend);
    if (metrics_url[0])
        rpc_log(RPC_LOG_INFO, "metrics on %s", metrics_url);
    if (cfg.test_delay_method)
        rpc_log(RPC_LOG_WARN, "test hook: every %s handler sleeps %d ms first", cfg.test_delay_method,
                cfg.test_delay_ms);
    int rc = 0;
    if (o.ready_file && write_ready_file(o.ready_file, addr) != 0)
        rc = 1;

    int sig = 0;
    while (rc == 0 && sigwait(&stop_signals, &sig) == 0) {
        bool ignored = false;
        for (size_t k = 0; k < sizeof ignored_sigs / sizeof ignored_sigs[0]; k++)
            ignored |= sig == ignored_sigs[k];
        if (!ignored)
            break;
        rpc_log(RPC_LOG_WARN, "signal %d (%s) ignored: eplbd has no configuration to reload (SIGTERM stops it)",
                sig, strsignal(sig));
        sig = 0;
    }
    if (sig)
        rpc_log(RPC_LOG_INFO, "signal %d (%s): stopping", sig, strsignal(sig));
    rpc_server_stop(server, o.drain_ms); /* returns once no handler runs */
    /* After the drain, so calls finished while draining were counted (and
     * scrapes during the drain saw serving 0); before the registry closes,
     * which rendering reads. */
    rpc_metrics_http_stop(metrics_http);
    rpc_metrics_free(metrics);
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
