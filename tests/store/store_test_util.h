/* store_test_util.h -- shared by the store tests: a scratch directory per
 * test, records built by hand, load_all into an array, raw SQL on the file,
 * and an independent implementation of the row checksum (bitwise CRC-64/XZ
 * over the encoding documented in eplb_store.h), used both to prove the
 * store writes that format and to forge rows whose checksum is right but
 * whose values are not, so the range checks are reached.
 *
 * Criterion runs each test in its own process, so the globals are per test. */
#ifndef STORE_TEST_UTIL_H
#define STORE_TEST_UTIL_H

#include <criterion/criterion.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "eplb_registry.h"
#include "eplb_store.h"

static char tdir[64];
static char tdb[128];

static inline void tdir_setup(void) {
    snprintf(tdir, sizeof tdir, "/tmp/eplb-store-XXXXXX");
    cr_assert_not_null(mkdtemp(tdir));
    cr_assert_eq(chmod(tdir, 0755), 0); /* another uid must reach it */
    snprintf(tdb, sizeof tdb, "%s/eplbd.db", tdir);
}

/* Clear an immutable flag a test may have left (chattr -i). */
static inline void clear_immutable(const char *p) {
    int fd = open(p, O_RDONLY | O_NONBLOCK);
    if (fd < 0)
        return;
    int flags = 0;
    if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0 && (flags & FS_IMMUTABLE_FL)) {
        flags &= ~FS_IMMUTABLE_FL;
        ioctl(fd, FS_IOC_SETFLAGS, &flags);
    }
    close(fd);
}

static inline void tdir_clean(void) {
    DIR *d = opendir(tdir);
    if (!d)
        return;
    struct dirent *e;
    char p[400];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(p, sizeof p, "%s/%s", tdir, e->d_name);
        clear_immutable(p);
        unlink(p);
    }
    closedir(d);
}

static inline void tdir_teardown(void) {
    umount2(tdir, MNT_DETACH); /* a test's tmpfs, if it outlived the child */
    tdir_clean();
    rmdir(tdir);
}

/* ---- records -------------------------------------------------------------- */

/* A main model of L layers, N experts, P slots on ep ranks, the initial
 * map, epoch 0, IDLE, an empty window of `window` records. */
static inline void rec_make(eplb_model_record *rec, const char *id, uint32_t L, uint32_t N, uint32_t P, uint32_t ep,
                     uint32_t window) {
    memset(rec, 0, sizeof *rec);
    snprintf(rec->model_id, sizeof rec->model_id, "%s", id);
    rec->role = EPLB_ROLE_MAIN;
    snprintf(rec->architecture, sizeof rec->architecture, "DeepseekV3ForCausalLM");
    snprintf(rec->resolved_path, sizeof rec->resolved_path, "DeepseekV3ForCausalLM");
    rec->shape = (eplb_model_shape){ .num_layers = L, .num_logical = N, .num_physical = P, .num_local = P / ep,
                                     .num_redundant = P - N, .num_shared = 1, .num_groups = 2, .ep_size = ep,
                                     .num_nodes = 1, .window_size = window, .step_interval = 10 };
    cr_assert_eq(eplb_placement_init(&rec->placement, L, N, P, NULL), EPLB_OK);
    eplb_load_window_init(&rec->window, L, N, window);
    rec->state = EPLB_MOVE_IDLE;
}

/* The standard test model: 2 layers, 4 experts, 6 slots, ep 2, window 7. */
static inline void rec_ds(eplb_model_record *rec, const char *id) { rec_make(rec, id, 2, 4, 6, 2, 7); }

/* Push n records of load (value base + i + cell) into the window. */
static inline void rec_push(eplb_model_record *rec, int n, int64_t base) {
    size_t cells = (size_t)rec->shape.num_layers * rec->shape.num_logical;
    int64_t *load = calloc(cells, sizeof *load);
    for (int i = 0; i < n; i++) {
        for (size_t c = 0; c < cells; c++)
            load[c] = base + i + (int64_t)c;
        cr_assert_eq(eplb_load_window_push(&rec->window, load, NULL), EPLB_OK);
    }
    free(load);
}

static inline void rec_free(eplb_model_record *rec) {
    eplb_placement_free(&rec->placement);
    eplb_placement_free(&rec->pending.target);
    eplb_load_window_free(&rec->window);
}

static inline eplb_status save(eplb_store *s, const eplb_model_record *rec, eplb_error *err) {
    return eplb_store_sqlite_ops.save(s, rec, err);
}

/* ---- load_all into an array ------------------------------------------------- */

typedef struct loaded {
    int n;
    eplb_model_record recs[16];
} loaded;

static inline eplb_status collect(void *arg, eplb_model_record *rec, eplb_error *err) {
    (void)err;
    loaded *l = arg;
    cr_assert_lt(l->n, 16);
    l->recs[l->n++] = *rec; /* takes the arrays */
    return EPLB_OK;
}

static inline void loaded_free(loaded *l) {
    for (int i = 0; i < l->n; i++)
        rec_free(&l->recs[i]);
    l->n = 0;
}

static inline eplb_status load(eplb_store *s, loaded *l, eplb_error *err) {
    memset(l, 0, sizeof *l);
    return eplb_store_sqlite_ops.load_all(s, collect, l, err);
}

static inline eplb_model_record *find(loaded *l, const char *id) {
    for (int i = 0; i < l->n; i++)
        if (strcmp(l->recs[i].model_id, id) == 0)
            return &l->recs[i];
    return NULL;
}

/* Open path, load everything, close: what a restart sees. */
static inline void reload(const char *path, loaded *l) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(path, &s, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(load(s, l, &err), EPLB_OK, "%s", err.msg);
    eplb_store_close(s);
}

/* ---- raw SQL on the file (as an operator's sqlite3 shell would) -------------- */

static inline void sql(const char *path, const char *text) {
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    char *msg = NULL;
    int rc = sqlite3_exec(db, text, NULL, NULL, &msg);
    cr_assert_eq(rc, SQLITE_OK, "%s: %s", text, msg ? msg : "?");
    sqlite3_close(db);
}

static inline sqlite3_int64 sql_int(const char *path, const char *text) {
    sqlite3 *db;
    sqlite3_stmt *q;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(db, text, -1, &q, NULL), SQLITE_OK, "%s: %s", text, sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(q), SQLITE_ROW, "%s", text);
    sqlite3_int64 v = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    sqlite3_close(db);
    return v;
}

/* ---- the checksum, written again from its description ------------------------ */

static inline uint64_t crc64_xz(uint64_t crc, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ 0xC96C5795D7870F42ull : crc >> 1;
    }
    return crc;
}

static inline uint64_t crc64_le(uint64_t crc, uint64_t v) {
    unsigned char b[8];
    for (int k = 0; k < 8; k++)
        b[k] = (unsigned char)(v >> (8 * k));
    return crc64_xz(crc, b, 8);
}

/* The checksum of the current row of q (columns 0..n-1) under tag. */
static inline uint64_t row_crc(const char *tag, sqlite3_stmt *q, int n) {
    uint64_t crc = crc64_xz(~0ull, tag, strlen(tag));
    for (int i = 0; i < n; i++) {
        int t = sqlite3_column_type(q, i);
        unsigned char b = t == SQLITE_INTEGER ? 1 : t == SQLITE_FLOAT ? 2 : t == SQLITE_TEXT ? 3 : t == SQLITE_BLOB ? 4 : 5;
        crc = crc64_xz(crc, &b, 1);
        if (t == SQLITE_INTEGER) {
            crc = crc64_le(crc, (uint64_t)sqlite3_column_int64(q, i));
        } else if (t == SQLITE_FLOAT) {
            double f = sqlite3_column_double(q, i);
            uint64_t bits;
            memcpy(&bits, &f, 8);
            crc = crc64_le(crc, bits);
        } else if (t == SQLITE_TEXT || t == SQLITE_BLOB) {
            const void *p = t == SQLITE_TEXT ? (const void *)sqlite3_column_text(q, i) : sqlite3_column_blob(q, i);
            size_t len = (size_t)sqlite3_column_bytes(q, i);
            crc = crc64_le(crc, len);
            crc = crc64_xz(crc, p, len);
        }
    }
    return ~crc;
}

#define MODELS_COLUMNS                                                                                          \
    "model_id, role, main_model_id, architecture, resolved_path, num_layers, num_logical, num_physical,"         \
    " num_local, num_redundant, num_shared, num_groups, ep_size, num_nodes, window_size, step_interval,"         \
    " auto_rebalance, epoch, placement_physical, num_valid_physical, state, state_reason, phy2log,"             \
    " default_policy, default_target_balancedness, default_max_bytes_moved, default_max_slots_moved,"         \
    " default_min_improvement, default_cost_intra_node, default_cost_cross_node, expert_bytes"
/* Schemas 2 and 3 (tag "eplbd.models.v2", 23 columns) and schema 3's
 * rebalances ("eplbd.rebalances.v3", 12): for files made as those eplbds
 * made them. */
#define MODELS_V2_COLUMNS                                                                                       \
    "model_id, role, main_model_id, architecture, resolved_path, num_layers, num_logical, num_physical,"         \
    " num_local, num_redundant, num_shared, num_groups, ep_size, num_nodes, window_size, step_interval,"         \
    " auto_rebalance, epoch, placement_physical, num_valid_physical, state, state_reason, phy2log"
#define REBALANCES_V3_COLUMNS                                                                                   \
    "model_id, id, layers_per_step, layers_done, with_weights, balancedness_before, balancedness_after,"        \
    " num_layers, num_physical, num_valid_physical, epoch, phy2log"
#define WINDOWS_COLUMNS "model_id, passes, count, records"
#define REBALANCES_COLUMNS                                                                                      \
    "model_id, id, layers_per_step, layers_done, with_weights, balancedness_before, balancedness_after,"        \
    " num_layers, num_physical, num_valid_physical, epoch, phy2log, execution, max_staging_bytes, expert_bytes"

/* For each row of table: compare (check = 1: count mismatches) or rewrite
 * (check = 0) its checksum column.  Returns the mismatches (check) or the
 * rows rewritten. */
static inline int seal_table(const char *path, const char *table, const char *cols, int ncols, const char *tag, int check) {
    sqlite3 *db;
    sqlite3_stmt *q, *u;
    char text[800];
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    snprintf(text, sizeof text, "SELECT %s, checksum, rowid FROM %s", cols, table);
    cr_assert_eq(sqlite3_prepare_v2(db, text, -1, &q, NULL), SQLITE_OK, "%s: %s", text, sqlite3_errmsg(db));
    snprintf(text, sizeof text, "UPDATE %s SET checksum = ? WHERE rowid = ?", table);
    cr_assert_eq(sqlite3_prepare_v2(db, text, -1, &u, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    int n = 0;
    while (sqlite3_step(q) == SQLITE_ROW) {
        uint64_t want = row_crc(tag, q, ncols);
        if (check) {
            n += sqlite3_column_type(q, ncols) != SQLITE_INTEGER ||
                 (uint64_t)sqlite3_column_int64(q, ncols) != want;
            continue;
        }
        sqlite3_bind_int64(u, 1, (sqlite3_int64)want);
        sqlite3_bind_int64(u, 2, sqlite3_column_int64(q, ncols + 1));
        cr_assert_eq(sqlite3_step(u), SQLITE_DONE);
        sqlite3_reset(u);
        n++;
    }
    cr_assert_eq(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_finalize(q);
    sqlite3_finalize(u);
    sqlite3_close(db);
    return n;
}

/* Recompute every checksum, as a writer that knows the format would. */
static inline void reseal(const char *path) {
    seal_table(path, "models", MODELS_COLUMNS, 31, "eplbd.models.v4", 0);
    seal_table(path, "windows", WINDOWS_COLUMNS, 4, "eplbd.windows.v2", 0);
    seal_table(path, "rebalances", REBALANCES_COLUMNS, 15, "eplbd.rebalances.v4", 0);
}

/* Rows whose checksum is not the documented one (0: all agree). */
static inline int checksum_mismatches(const char *path) {
    return seal_table(path, "models", MODELS_COLUMNS, 31, "eplbd.models.v4", 1) +
           seal_table(path, "windows", WINDOWS_COLUMNS, 4, "eplbd.windows.v2", 1) +
           seal_table(path, "rebalances", REBALANCES_COLUMNS, 15, "eplbd.rebalances.v4", 1);
}

/* ---- a child process -----------------------------------------------------------
 * For what must not happen in the test's own process (another uid, another
 * mount namespace, a second lock holder): fn runs in a fork and writes a
 * line into msg; its return is the exit status (0 pass, 77 skip, else
 * fail). */
typedef int (*child_fn)(void *arg, char *msg, size_t len);

static inline int run_child(child_fn fn, void *arg, char *msg, size_t len) {
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        close(fds[0]);
        char buf[1024] = "";
        int rc = fn(arg, buf, sizeof buf);
        ssize_t w = write(fds[1], buf, strlen(buf));
        (void)w;
        _exit(rc);
    }
    close(fds[1]);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < len && (r = read(fds[0], msg + got, len - 1 - got)) > 0)
        got += (size_t)r;
    msg[got] = '\0';
    close(fds[0]);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#endif
