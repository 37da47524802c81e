/* rpc_metrics.c -- counters fed by on_call, and the text exposition.
 *
 * Counters are plain relaxed atomics in fixed arrays indexed by method and
 * gRPC code: the CQ thread that finishes a call pays a name lookup and
 * three or four atomic adds, and never a lock that a scrape could hold.
 * A scrape reads them without stopping writers, so a histogram is made
 * self-consistent at render time: _count is the sum of the bucket counts
 * it read (never a separately read counter), buckets are printed
 * cumulatively, so +Inf == _count and buckets never decrease even while
 * calls finish during the scrape.  _sum is read on its own and may be one
 * call ahead or behind, which Prometheus tolerates.
 *
 * Method labels are bounded: the method log names, and "unknown" for
 * every other path a client sends (a raw path as label would let any client
 * create series without bound). */
#include "rpc_metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "rpc_log.h"
#include "rpc_server.h"

/* The method log names rpc_server.c uses (rpc_server_method_known checks
 * them at rpc_metrics_new), then the bucket of everything else. */
static const char *const method_names[] = {
    "RegisterModel", "GetPlacement", "SetupFromMapping", "Rebalance",    "ContinueRebalance",
    "RecordLoad",    "AttachWeights", "DetachWeights",   "ListModels",   "DeleteModel",
    "GetTransferPlan", "CommitRebalance", "AbortRebalance",
    "Health/Check",  "Health/Watch",  "ServerReflectionInfo", "ServerReflectionInfo/v1alpha",
    "unknown",
};
#define NUM_METHODS (sizeof method_names / sizeof method_names[0])
#define METHOD_UNKNOWN (NUM_METHODS - 1)
/* Methods the server knows but this table does not (added to rpc_server.c
 * later): each takes one of these slots the first time it is called, so
 * its series are still its own and the count stays bounded by the
 * server's table. */
#define EXTRA_METHODS 8
#define NUM_CODES 17 /* grpc_status_code 0..16; anything else counts as UNKNOWN (2) */

/* Upper bounds in seconds: from a Health/Check on the CQ thread (~50 us
 * end to end) to a large weight move (seconds). */
static const double bucket_le[] = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                    0.25,   0.5,   1,      2.5,   5,     10 };
#define NUM_BUCKETS (sizeof bucket_le / sizeof bucket_le[0] + 1) /* + the +Inf bucket */

typedef struct method_stats {
    atomic_uint_fast64_t calls[NUM_CODES];
    atomic_uint_fast64_t buckets[NUM_BUCKETS]; /* not cumulative: one bucket per call */
    atomic_uint_fast64_t sum_ns;               /* 2^64 ns: 584 years of call time */
} method_stats;

typedef struct extra_method {
    atomic_bool ready;    /* name is set (release), for lock-free readers */
    char name[64];
} extra_method;

struct rpc_metrics {
    rpc_context *ctx;
    pthread_mutex_t extra_lock; /* taken only to claim an extra slot: once per new method name */
    extra_method extra[EXTRA_METHODS];
    method_stats extra_stats[EXTRA_METHODS];
    char db_path[4096];   /* "" for none */
    char version[64];
    double start_time;    /* Unix seconds */
    method_stats methods[NUM_METHODS];
};

rpc_metrics *rpc_metrics_new(rpc_context *ctx, const char *db_path, const char *version) {
    rpc_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->ctx = ctx;
    if (db_path && strcmp(db_path, ":memory:") != 0)
        snprintf(m->db_path, sizeof m->db_path, "%s", db_path);
    snprintf(m->version, sizeof m->version, "%s", version ? version : "");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    m->start_time = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    for (size_t i = 0; i < NUM_METHODS; i++) {
        method_stats *s = &m->methods[i];
        for (size_t c = 0; c < NUM_CODES; c++)
            atomic_init(&s->calls[c], 0);
        for (size_t b = 0; b < NUM_BUCKETS; b++)
            atomic_init(&s->buckets[b], 0);
        atomic_init(&s->sum_ns, 0);
    }
    for (size_t i = 0; i < EXTRA_METHODS; i++) {
        method_stats *s = &m->extra_stats[i];
        atomic_init(&m->extra[i].ready, false);
        for (size_t c = 0; c < NUM_CODES; c++)
            atomic_init(&s->calls[c], 0);
        for (size_t b = 0; b < NUM_BUCKETS; b++)
            atomic_init(&s->buckets[b], 0);
        atomic_init(&s->sum_ns, 0);
    }
    pthread_mutex_init(&m->extra_lock, NULL);
    /* A method renamed in rpc_server.c would silently count as "unknown":
     * refuse to start instead (a programming error, caught by every test). */
    for (size_t i = 0; i < METHOD_UNKNOWN; i++)
        if (!rpc_server_method_known(method_names[i])) {
            fprintf(stderr, "eplbd: rpc_metrics: method %s is not in the server's table\n", method_names[i]);
            free(m);
            return NULL;
        }
    return m;
}

void rpc_metrics_free(rpc_metrics *m) {
    if (!m)
        return;
    pthread_mutex_destroy(&m->extra_lock);
    free(m);
}

static method_stats *extra_find(rpc_metrics *m, const char *name) {
    for (size_t i = 0; i < EXTRA_METHODS; i++)
        if (atomic_load_explicit(&m->extra[i].ready, memory_order_acquire) && strcmp(m->extra[i].name, name) == 0)
            return &m->extra_stats[i];
    return NULL;
}

/* The counters of a method by its log name: the table, then the extra
 * slots, then "unknown". */
static method_stats *method_of(rpc_metrics *m, const char *name) {
    for (size_t i = 0; i < METHOD_UNKNOWN; i++)
        if (strcmp(name, method_names[i]) == 0)
            return &m->methods[i];
    method_stats *s = extra_find(m, name);
    if (s || strlen(name) >= sizeof m->extra[0].name || !rpc_server_method_known(name))
        return s ? s : &m->methods[METHOD_UNKNOWN];
    pthread_mutex_lock(&m->extra_lock);
    if (!(s = extra_find(m, name))) /* not claimed meanwhile by another CQ thread */
        for (size_t i = 0; i < EXTRA_METHODS && !s; i++)
            if (!atomic_load_explicit(&m->extra[i].ready, memory_order_relaxed)) {
                snprintf(m->extra[i].name, sizeof m->extra[i].name, "%s", name);
                atomic_store_explicit(&m->extra[i].ready, true, memory_order_release);
                s = &m->extra_stats[i];
            }
    pthread_mutex_unlock(&m->extra_lock);
    return s ? s : &m->methods[METHOD_UNKNOWN];
}

void rpc_metrics_on_call(void *arg, const rpc_call_record *rec) {
    rpc_metrics *m = arg;
    method_stats *s = method_of(m, rec->method ? rec->method : "");
    int code = rec->code >= 0 && rec->code < NUM_CODES ? rec->code : 2;
    double sec = rec->duration_ms > 0 ? rec->duration_ms / 1e3 : 0;
    size_t b = 0;
    while (b < NUM_BUCKETS - 1 && sec > bucket_le[b])
        b++;
    atomic_fetch_add_explicit(&s->calls[code], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->buckets[b], 1, memory_order_relaxed);
    /* Durations past ~584 years do not happen; clamp anyway (UB-free cast). */
    double ns = sec * 1e9;
    atomic_fetch_add_explicit(&s->sum_ns, ns < 1.8e19 ? (uint_fast64_t)ns : UINT64_MAX / 2, memory_order_relaxed);
}

/* ---- the exposition ------------------------------------------------------ */

typedef struct out_buf {
    char *p;
    size_t len, cap;
    bool failed; /* an allocation failed: the render fails */
} out_buf;

static bool reserve(out_buf *o, size_t more) {
    if (o->failed)
        return false;
    if (o->len + more + 1 <= o->cap)
        return true;
    size_t cap = o->cap ? o->cap : 16384;
    while (cap < o->len + more + 1)
        cap *= 2;
    char *p = realloc(o->p, cap);
    if (!p) {
        o->failed = true;
        return false;
    }
    o->p = p;
    o->cap = cap;
    return true;
}

static void put(out_buf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out_buf *o, const char *fmt, ...) {
    for (int tries = 0; tries < 2; tries++) {
        if (!reserve(o, 256))
            return;
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = true;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        if (!reserve(o, (size_t)n + 1))
            return;
    }
}

/* A label value, escaped, between quotes. */
static void put_label(out_buf *o, const char *v) {
    /* Worst case: every byte becomes 3 (U+FFFD) */
    size_t n = strlen(v) * 3 + 3;
    if (!reserve(o, n))
        return;
    o->p[o->len++] = '"';
    o->len = rpc_metrics_escape_label(o->p, o->len, o->cap, v);
    o->p[o->len++] = '"';
    o->p[o->len] = '\0';
}

/* A sample value: Prometheus spells the non-finite ones +Inf, -Inf, NaN;
 * 17 significant digits round-trip a double exactly. */
static void put_value(out_buf *o, double v) {
    if (isnan(v))
        put(o, " NaN\n");
    else if (isinf(v))
        put(o, v > 0 ? " +Inf\n" : " -Inf\n");
    else
        put(o, " %.17g\n", v);
}

static void put_u64(out_buf *o, uint64_t v) { put(o, " %llu\n", (unsigned long long)v); }

static void family(out_buf *o, const char *name, const char *type, const char *help) {
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{model_id="..."} -- the start of a per-model sample. */
static void model_sample(out_buf *o, const char *name, const char *model_id) {
    put(o, "%s{model_id=", name);
    put_label(o, model_id);
    put(o, "}");
}

static uint64_t file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0;
}

/* Every method with counters, in order: the table (less "unknown"), the
 * extra slots in use, "unknown" last.  Returns how many. */
static size_t methods_now(rpc_metrics *m, const char **names, const method_stats **stats) {
    size_t k = 0;
    for (size_t i = 0; i < METHOD_UNKNOWN; i++, k++)
        names[k] = method_names[i], stats[k] = &m->methods[i];
    for (size_t i = 0; i < EXTRA_METHODS; i++)
        if (atomic_load_explicit(&m->extra[i].ready, memory_order_acquire))
            names[k] = m->extra[i].name, stats[k++] = &m->extra_stats[i];
    names[k] = method_names[METHOD_UNKNOWN], stats[k++] = &m->methods[METHOD_UNKNOWN];
    return k;
}

static void render_rpc(rpc_metrics *m, out_buf *o) {
    const char *names[NUM_METHODS + EXTRA_METHODS];
    const method_stats *stats[NUM_METHODS + EXTRA_METHODS];
    size_t nm = methods_now(m, names, stats);
    family(o, "eplbd_rpc_calls_total", "counter",
           "Finished gRPC calls by method and status code (method=\"unknown\": any path not in the API).");
    for (size_t i = 0; i < nm; i++)
        for (int c = 0; c < NUM_CODES; c++) {
            uint64_t v = atomic_load_explicit(&stats[i]->calls[c], memory_order_relaxed);
            /* Every method's OK series always, so rate() and ratios have a
             * denominator from the first scrape; other codes once seen. */
            if (v || c == 0) {
                put(o, "eplbd_rpc_calls_total{method=");
                put_label(o, names[i]);
                put(o, ",code=\"%s\"}", rpc_status_name(c));
                put_u64(o, v);
            }
        }
    family(o, "eplbd_rpc_duration_seconds", "histogram",
           "Time from accepting a call to sending its status, by method.");
    for (size_t i = 0; i < nm; i++) {
        const method_stats *s = stats[i];
        uint64_t cum = 0;
        for (size_t b = 0; b < NUM_BUCKETS; b++) {
            cum += atomic_load_explicit(&s->buckets[b], memory_order_relaxed);
            put(o, "eplbd_rpc_duration_seconds_bucket{method=");
            put_label(o, names[i]);
            if (b < NUM_BUCKETS - 1)
                put(o, ",le=\"%g\"}", bucket_le[b]);
            else
                put(o, ",le=\"+Inf\"}");
            put_u64(o, cum);
        }
        put(o, "eplbd_rpc_duration_seconds_sum{method=");
        put_label(o, names[i]);
        put(o, "}");
        put_value(o, (double)atomic_load_explicit(&s->sum_ns, memory_order_relaxed) / 1e9);
        put(o, "eplbd_rpc_duration_seconds_count{method=");
        put_label(o, names[i]);
        put(o, "}");
        put_u64(o, cum);
    }
}

static void render_process(rpc_metrics *m, out_buf *o, size_t models) {
    family(o, "eplbd_up", "gauge", "1 while the process runs (a scrape that answers).");
    put(o, "eplbd_up 1\n");
    family(o, "eplbd_serving", "gauge", "1 while serving, 0 while draining at shutdown (health NOT_SERVING).");
    put(o, "eplbd_serving %d\n", atomic_load(&m->ctx->serving) ? 1 : 0);
    family(o, "eplbd_start_time_seconds", "gauge", "Start time of the process, Unix seconds.");
    put(o, "eplbd_start_time_seconds");
    put_value(o, m->start_time);
    family(o, "eplbd_build_info", "gauge", "Always 1; the version label says which eplbd runs.");
    put(o, "eplbd_build_info{version=");
    put_label(o, m->version);
    put(o, "} 1\n");
    family(o, "eplbd_models", "gauge", "Registered (open) models, main and speculators, damaged included.");
    put(o, "eplbd_models %zu\n", models);
    family(o, "eplbd_models_limit", "gauge", "Most registered models (--max-models).");
    put(o, "eplbd_models_limit %u\n", m->ctx->limits.max_models);
    family(o, "eplbd_database_bytes", "gauge", "Size of the SQLite database file plus its -wal (0 for :memory:).");
    uint64_t db = 0;
    if (m->db_path[0]) {
        char wal[sizeof m->db_path + 8];
        snprintf(wal, sizeof wal, "%s-wal", m->db_path);
        db = file_size(m->db_path) + file_size(wal);
    }
    put(o, "eplbd_database_bytes %llu\n", (unsigned long long)db);
}

static void render_models(out_buf *o, const eplb_model_summary *all, size_t n) {
    family(o, "eplbd_model_info", "gauge", "Always 1 per registered model: its role and main model.");
    for (size_t i = 0; i < n; i++) {
        put(o, "eplbd_model_info{model_id=");
        put_label(o, all[i].model_id);
        put(o, ",role=\"%s\",main_model_id=", all[i].role == EPLB_ROLE_SPECULATOR ? "speculator" : "main");
        put_label(o, all[i].main_model_id);
        put(o, "} 1\n");
    }
    family(o, "eplbd_model_damaged", "gauge", "1 when the model's stored row failed verification (served as DATA_LOSS).");
    for (size_t i = 0; i < n; i++) {
        model_sample(o, "eplbd_model_damaged", all[i].model_id);
        put(o, " %d\n", all[i].damaged[0] ? 1 : 0);
    }
    family(o, "eplbd_model_epoch", "gauge", "The model's published placement epoch.");
    for (size_t i = 0; i < n; i++)
        if (!all[i].damaged[0]) {
            model_sample(o, "eplbd_model_epoch", all[i].model_id);
            put_u64(o, all[i].epoch);
        }
    family(o, "eplbd_model_state", "gauge", "1 for the model's published weight-move state, 0 for the others.");
    for (size_t i = 0; i < n; i++)
        if (!all[i].damaged[0])
            for (int st = 0; st <= EPLB_MOVE_STATE_MAX; st++) {
                put(o, "eplbd_model_state{model_id=");
                put_label(o, all[i].model_id);
                put(o, ",state=\"%s\"} %d\n", eplb_move_state_name((eplb_move_state)st), (int)all[i].state == st);
            }
    family(o, "eplbd_model_weights_attached", "gauge", "1 while the model's expert weights are attached.");
    for (size_t i = 0; i < n; i++)
        if (!all[i].damaged[0]) {
            model_sample(o, "eplbd_model_weights_attached", all[i].model_id);
            put(o, " %d\n", all[i].weights_attached ? 1 : 0);
        }
    family(o, "eplbd_model_physical_experts", "gauge", "Physical expert slots of the model (changes with SetupFromMapping).");
    for (size_t i = 0; i < n; i++)
        if (!all[i].damaged[0]) {
            model_sample(o, "eplbd_model_physical_experts", all[i].model_id);
            put(o, " %u\n", all[i].shape.num_physical);
        }

    /* Activity since this process started (never persisted). */
    static const struct {
        const char *name, *type, *help;
    } fam[] = {
        { "eplbd_model_rebalances_total", "counter", "Committed rebalances (Rebalance calls, ContinueRebalance steps, automatic ones) since start." },
        { "eplbd_model_rebalance_failures_total", "counter",
          "Rebalances computed but not committed (weight move or store failed) since start." },
        { "eplbd_model_passes_recorded_total", "counter", "RecordLoad passes counted (not dummy ones) since start." },
        { "eplbd_model_bytes_moved_total", "counter", "Expert weight bytes copied by rebalances since start." },
        { "eplbd_model_balancedness_before", "gauge",
          "Balancedness (mean/max GPU load, 1 is perfect) of the last committed rebalance's load under the old placement." },
        { "eplbd_model_balancedness_after", "gauge",
          "Balancedness of the last committed rebalance's load under the new placement." },
        { "eplbd_model_last_experts_moved", "gauge", "Slots whose expert changed in the last committed rebalance." },
        { "eplbd_model_last_bytes_moved", "gauge", "Weight bytes copied by the last committed rebalance." },
        { "eplbd_model_last_move_seconds", "gauge", "Weight-move time of the last committed rebalance." },
        { "eplbd_model_last_compute_seconds", "gauge", "Policy time of the last committed rebalance." },
    };
    for (size_t f = 0; f < sizeof fam / sizeof fam[0]; f++) {
        family(o, fam[f].name, fam[f].type, fam[f].help);
        for (size_t i = 0; i < n; i++) {
            const eplb_model_stats *s = &all[i].stats;
            if (all[i].damaged[0] || (f >= 4 && !s->has_last))
                continue; /* no last rebalance yet: no sample (not a fake 0) */
            model_sample(o, fam[f].name, all[i].model_id);
            switch (f) {
            case 0: put_u64(o, s->rebalances); break;
            case 1: put_u64(o, s->rebalance_failures); break;
            case 2: put_u64(o, s->passes_recorded); break;
            case 3: put_u64(o, s->bytes_moved_total); break;
            case 4: put_value(o, s->last_balancedness_before); break;
            case 5: put_value(o, s->last_balancedness_after); break;
            case 6: put_u64(o, s->last_experts_moved); break;
            case 7: put_u64(o, s->last_bytes_moved); break;
            case 8: put_value(o, s->last_move_ms / 1e3); break;
            default: put_value(o, s->last_compute_ms / 1e3); break;
            }
        }
    }
}

int rpc_metrics_render(rpc_metrics *m, char **out, size_t *len) {
    *out = NULL;
    *len = 0;
    out_buf o = { 0 };
    eplb_model_summary *all = NULL;
    size_t n = 0;
    eplb_error err;
    eplb_error_clear(&err);
    if (eplb_registry_list(m->ctx->registry, &all, &n, &err) != EPLB_OK)
        return -1;
    render_rpc(m, &o);
    render_process(m, &o, n);
    render_models(&o, all, n);
    free(all);
    if (o.failed || !o.p) {
        free(o.p);
        return -1;
    }
    *out = o.p;
    *len = o.len;
    return 0;
}
