/* eplb_store.c -- the SQLite implementation of eplb_store_ops.
 *
 * One connection guarded by a mutex: writes are rare (a registration, a
 * rebalance commit) and each is a short transaction, so a single writer is
 * simpler than a pool and never contends in practice.
 *
 * Every row goes through one representation, an array of column values
 * (`col`), on its way in (save), out (load_all) and across a migration, so
 * the checksum is computed from the same bytes in all three and the column
 * order lives in one table (model_cols / window_cols / rebalance_cols).
 *
 * Cost per save: one CRC-64 pass over the row (slicing-by-8, about 1 GB/s
 * on the test machine: ~0.1 ms for DeepSeek-V3's 61 x 288 map, ~0.1 s for
 * a full 125 MB window, which SQLite then writes and fsyncs anyway), and
 * one more statement on rebalances (the pending row, or a primary-key
 * delete when none is pending); the same again per row at open.  Per
 * open: one committed write (the writability probe) and, once, a
 * migration, in one transaction: 1 -> 2 rewrites every row, 2 -> 3
 * creates the rebalances table, 3 -> 4 rewrites the models and rebalances
 * rows with the columns schema 4 added (the model's rebalance defaults; a
 * pending rebalance's execution, staging bound and expert size), at their
 * defaults. */
#include "eplb_store.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "eplb_alloc.h"

#define STORE_SCHEMA_VERSION 4

/* ---- SQLite calls with a fault hook ------------------------------------- */

typedef struct store_fault {
    long countdown; /* 0: inert; n > 0: the nth call from now fails */
    int rc;
    int sys_errno;
    long calls;     /* counted since the last eplb_store_set_fault */
} store_fault;

struct eplb_store {
    sqlite3 *db;
    pthread_mutex_t lock;   /* one statement sequence at a time */
    int lock_fd;            /* <path>.lock, flock'ed; -1 for :memory: */
    int db_fd;              /* the database file itself, flock'ed; -1 for :memory:.
                             * Closed only after sqlite3_close: closing any fd of
                             * the file drops SQLite's POSIX locks on it. */
    char *path;
    uint64_t size_limit;    /* bytes, 0: none (only for messages) */
    store_fault fault;
    /* The last failed call's code and errno, as injected or as SQLite said
     * (an injected failure leaves nothing in sqlite3_errmsg). */
    bool injected;
    int injected_errno;
};

/* Armed by eplb_store_set_fault(NULL, ...) for the next open. */
static pthread_mutex_t pending_lock = PTHREAD_MUTEX_INITIALIZER;
static store_fault pending_fault;

static int fault_hit(eplb_store *s) {
    s->injected = false;
    s->fault.calls++;
    if (s->fault.countdown > 0 && --s->fault.countdown == 0) {
        s->injected = true;
        s->injected_errno = s->fault.sys_errno;
        return s->fault.rc;
    }
    return SQLITE_OK;
}

static int x_prepare(eplb_store *s, const char *sql, sqlite3_stmt **q) {
    *q = NULL;
    int rc = fault_hit(s);
    return rc != SQLITE_OK ? rc : sqlite3_prepare_v2(s->db, sql, -1, q, NULL);
}

static int x_step(eplb_store *s, sqlite3_stmt *q) {
    int rc = fault_hit(s);
    return rc != SQLITE_OK ? rc : sqlite3_step(q);
}

static int x_exec(eplb_store *s, const char *sql) {
    int rc = fault_hit(s);
    return rc != SQLITE_OK ? rc : sqlite3_exec(s->db, sql, NULL, NULL, NULL);
}

long eplb_store_set_fault(eplb_store *s, long nth, int sqlite_rc, int sys_errno) {
    store_fault f = { .countdown = nth > 0 ? nth : 0, .rc = sqlite_rc, .sys_errno = sys_errno };
    if (!s) {
        pthread_mutex_lock(&pending_lock);
        pending_fault = f;
        pthread_mutex_unlock(&pending_lock);
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    long was = s->fault.calls;
    s->fault = f;
    pthread_mutex_unlock(&s->lock);
    return was;
}

/* ---- errors ----------------------------------------------------------------
 * What an operator can act on decides the status: a full disk or quota is
 * ENOSPACE (free space, raise the cap), a read-only or busy database is
 * UNAVAILABLE (fix permissions, stop the other writer), corruption SQLite
 * itself sees is DATA_LOSS; only what nobody outside can fix is INTERNAL. */

static eplb_status map_rc(int rc, int sys_errno) {
    switch (rc & 0xff) {
    case SQLITE_FULL:
    case SQLITE_TOOBIG:
        return EPLB_ENOSPACE;
    case SQLITE_IOERR:
        /* A failed fsync or a short mmap'd -shm extension reports the
         * filesystem's own reason only through errno. */
        if (sys_errno == ENOSPC || sys_errno == EDQUOT)
            return EPLB_ENOSPACE;
        if (sys_errno == EROFS || sys_errno == EACCES || sys_errno == EPERM)
            return EPLB_EUNAVAILABLE;
        return EPLB_EINTERNAL;
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
    case SQLITE_AUTH:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return EPLB_EUNAVAILABLE;
    case SQLITE_NOMEM:
        return EPLB_ENOMEM;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return EPLB_EDATALOSS;
    default:
        return EPLB_EINTERNAL;
    }
}

static bool rc_is_readonly(int rc, int sys_errno) {
    int p = rc & 0xff;
    return p == SQLITE_READONLY || p == SQLITE_PERM ||
           (p == SQLITE_IOERR && (sys_errno == EROFS || sys_errno == EACCES || sys_errno == EPERM));
}

/* Fill err for SQLite's failure rc while `doing` ("saving model ds"); call
 * before anything else touches the connection (a ROLLBACK would replace
 * SQLite's message). */
static eplb_status db_fail(eplb_store *s, eplb_error *err, int rc, const char *doing) {
    int sys_errno = s->injected ? s->injected_errno : sqlite3_system_errno(s->db);
    char msg[300];
    if (s->injected)
        snprintf(msg, sizeof msg, "%s (injected fault)", sqlite3_errstr(rc));
    else
        snprintf(msg, sizeof msg, "%s", s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
    if (sys_errno && (rc & 0xff) == SQLITE_IOERR) {
        size_t n = strlen(msg);
        snprintf(msg + n, sizeof msg - n, " (%s)", strerror(sys_errno));
    }
    eplb_status st = map_rc(rc, sys_errno);
    if (st == EPLB_ENOSPACE) {
        if (s->size_limit)
            return eplb_error_set(err, st, "store: disk full %s: %s (the database is capped at %" PRIu64 " bytes)",
                                  doing, msg, s->size_limit);
        return eplb_error_set(err, st, "store: disk full %s: %s", doing, msg);
    }
    if (rc_is_readonly(rc, sys_errno))
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s is read-only: %s (%s)", s->path, msg,
                              doing);
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
        return eplb_error_set(err, st, "store: database %s is busy: %s (%s)", s->path, msg, doing);
    return eplb_error_set(err, st, "store: %s: %s", doing, msg);
}

/* Roll back whatever transaction is open.  Not a fault point: a rollback
 * that is skipped would leave the connection inside the transaction and
 * fail every later save; SQLite may also have rolled back already (after
 * SQLITE_FULL, for one), which sqlite3_get_autocommit tells. */
static void rollback(eplb_store *s) {
    if (!sqlite3_get_autocommit(s->db))
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
}

/* ---- the checksum: CRC-64/XZ (ECMA-182 polynomial, reflected), slicing-by-8 */

static uint64_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (unsigned i = 0; i < 256; i++) {
        uint64_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0xC96C5795D7870F42ull : c >> 1;
        crc_table[0][i] = c;
    }
    for (unsigned i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

/* crc is the running (inverted) register: start at ~0, finish with ~. */
static uint64_t crc_update(uint64_t crc, const void *data, size_t n) {
    const unsigned char *p = data;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w; /* the next 8 bytes as a little-endian word */
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        crc ^= w;
        crc = crc_table[7][crc & 0xff] ^ crc_table[6][(crc >> 8) & 0xff] ^ crc_table[5][(crc >> 16) & 0xff] ^
              crc_table[4][(crc >> 24) & 0xff] ^ crc_table[3][(crc >> 32) & 0xff] ^
              crc_table[2][(crc >> 40) & 0xff] ^ crc_table[1][(crc >> 48) & 0xff] ^ crc_table[0][crc >> 56];
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

static uint64_t crc_u64(uint64_t crc, uint64_t v) {
    unsigned char b[8];
    for (int k = 0; k < 8; k++)
        b[k] = (unsigned char)(v >> (8 * k));
    return crc_update(crc, b, 8);
}

/* ---- rows as column values ------------------------------------------------ */

typedef struct col {
    int type;        /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL */
    sqlite3_int64 i;
    double f;
    const void *p;   /* TEXT / BLOB bytes (not owned) */
    size_t n;
} col;

typedef struct col_def {
    const char *name;
    int type;        /* what the column must hold */
} col_def;

enum {
    MC_MODEL_ID, MC_ROLE, MC_MAIN, MC_ARCH, MC_PATH,
    MC_LAYERS, MC_LOGICAL, MC_PHYSICAL, MC_LOCAL, MC_REDUNDANT, MC_SHARED, MC_GROUPS, MC_EP_SIZE, MC_NODES,
    MC_WINDOW, MC_STEP, MC_AUTO, MC_EPOCH, MC_PPHYS, MC_VALID, MC_STATE, MC_REASON, MC_PHY2LOG,
    MC_V2_COUNT, /* the columns of schemas 2 and 3 end here */
    /* Schema 4: the model's rebalance defaults (eplb_model_shape.defaults,
     * ParallelConfig): doubles as IEEE-754 bits, uint64s as their
     * two's-complement int64, like the rebalances row's balancedness. */
    MC_POLICY = MC_V2_COUNT, MC_TARGET, MC_MAX_BYTES, MC_MAX_SLOTS, MC_MIN_IMPROVEMENT, MC_COST_INTRA,
    MC_COST_CROSS, MC_EXPERT_BYTES,
    MC_COUNT /* then the checksum */
};
static const col_def model_cols[MC_COUNT] = {
    { "model_id", SQLITE_TEXT }, { "role", SQLITE_INTEGER }, { "main_model_id", SQLITE_TEXT },
    { "architecture", SQLITE_TEXT }, { "resolved_path", SQLITE_TEXT },
    { "num_layers", SQLITE_INTEGER }, { "num_logical", SQLITE_INTEGER }, { "num_physical", SQLITE_INTEGER },
    { "num_local", SQLITE_INTEGER }, { "num_redundant", SQLITE_INTEGER }, { "num_shared", SQLITE_INTEGER },
    { "num_groups", SQLITE_INTEGER }, { "ep_size", SQLITE_INTEGER }, { "num_nodes", SQLITE_INTEGER },
    { "window_size", SQLITE_INTEGER }, { "step_interval", SQLITE_INTEGER }, { "auto_rebalance", SQLITE_INTEGER },
    { "epoch", SQLITE_INTEGER }, { "placement_physical", SQLITE_INTEGER },
    { "num_valid_physical", SQLITE_INTEGER }, { "state", SQLITE_INTEGER }, { "state_reason", SQLITE_TEXT },
    { "phy2log", SQLITE_BLOB },
    { "default_policy", SQLITE_INTEGER }, { "default_target_balancedness", SQLITE_INTEGER },
    { "default_max_bytes_moved", SQLITE_INTEGER }, { "default_max_slots_moved", SQLITE_INTEGER },
    { "default_min_improvement", SQLITE_INTEGER }, { "default_cost_intra_node", SQLITE_INTEGER },
    { "default_cost_cross_node", SQLITE_INTEGER }, { "expert_bytes", SQLITE_INTEGER },
};

enum { WC_MODEL_ID, WC_PASSES, WC_COUNT_, WC_RECORDS, WC_COUNT };
static const col_def window_cols[WC_COUNT] = {
    { "model_id", SQLITE_TEXT }, { "passes", SQLITE_INTEGER }, { "count", SQLITE_INTEGER },
    { "records", SQLITE_BLOB },
};

/* A pending rebalance (eplb_pending_rebalance), at most one per model.
 * The balancedness doubles are stored as their IEEE-754 bits in INTEGER
 * columns: exact whatever SQLite does with REALs (it stores NaN as NULL),
 * and the row stays within the checksum's integer encoding.  The target's
 * L and P are stored so a row is checked against its model's explicitly,
 * not only through the map's length; N is the model's. */
enum {
    RC_MODEL_ID, RC_ID, RC_PER_STEP, RC_DONE, RC_WEIGHTS, RC_BEFORE, RC_AFTER,
    RC_LAYERS, RC_PHYSICAL, RC_VALID, RC_EPOCH, RC_PHY2LOG,
    RC_V3_COUNT, /* the columns of schema 3 end here */
    /* Schema 4: who executes it (eplb_execution) and, for the engine, the
     * plan's staging bound and expert size (uint64s as int64 bits). */
    RC_EXEC = RC_V3_COUNT, RC_STAGING, RC_EXPERT_BYTES,
    RC_COUNT /* then the checksum */
};
static const col_def rebalance_cols[RC_COUNT] = {
    { "model_id", SQLITE_TEXT }, { "id", SQLITE_TEXT }, { "layers_per_step", SQLITE_INTEGER },
    { "layers_done", SQLITE_INTEGER }, { "with_weights", SQLITE_INTEGER },
    { "balancedness_before", SQLITE_INTEGER }, { "balancedness_after", SQLITE_INTEGER },
    { "num_layers", SQLITE_INTEGER }, { "num_physical", SQLITE_INTEGER },
    { "num_valid_physical", SQLITE_INTEGER }, { "epoch", SQLITE_INTEGER }, { "phy2log", SQLITE_BLOB },
    { "execution", SQLITE_INTEGER }, { "max_staging_bytes", SQLITE_INTEGER }, { "expert_bytes", SQLITE_INTEGER },
};

/* A tag names its table's row format, not the schema: windows rows are
 * unchanged since schema 2; models rows changed in 2 and 4, rebalances rows
 * in 4 (a migration reseals the rows it rewrites with the new tag). */
static const char models_v2_tag[] = "eplbd.models.v2";
static const char models_tag[] = "eplbd.models.v4";
static const char windows_tag[] = "eplbd.windows.v2";
static const char rebalances_tag[] = "eplbd.rebalances.v4";

static const char *type_name(int t) {
    switch (t) {
    case SQLITE_INTEGER: return "INTEGER";
    case SQLITE_FLOAT: return "REAL";
    case SQLITE_TEXT: return "TEXT";
    case SQLITE_BLOB: return "BLOB";
    default: return "NULL";
    }
}

/* The canonical encoding of eplb_store.h, hashed. */
static uint64_t row_checksum(const char *tag, const col *c, int n) {
    pthread_once(&crc_once, crc_init);
    uint64_t crc = crc_update(~0ull, tag, strlen(tag));
    for (int k = 0; k < n; k++) {
        unsigned char t = (unsigned char)(c[k].type == SQLITE_INTEGER ? 0x01
                                          : c[k].type == SQLITE_FLOAT ? 0x02
                                          : c[k].type == SQLITE_TEXT  ? 0x03
                                          : c[k].type == SQLITE_BLOB  ? 0x04
                                                                      : 0x05);
        crc = crc_update(crc, &t, 1);
        if (c[k].type == SQLITE_INTEGER) {
            crc = crc_u64(crc, (uint64_t)c[k].i);
        } else if (c[k].type == SQLITE_FLOAT) {
            uint64_t bits;
            memcpy(&bits, &c[k].f, sizeof bits);
            crc = crc_u64(crc, bits);
        } else if (c[k].type == SQLITE_TEXT || c[k].type == SQLITE_BLOB) {
            crc = crc_u64(crc, (uint64_t)c[k].n);
            crc = crc_update(crc, c[k].p, c[k].n);
        }
    }
    return ~crc;
}

/* Columns first..first+n-1 of the current row, as stored (no conversion:
 * what is hashed and checked is what the file holds). */
static void read_cols(sqlite3_stmt *q, int first, col *c, int n) {
    for (int k = 0; k < n; k++) {
        int i = first + k;
        c[k] = (col){ .type = sqlite3_column_type(q, i) };
        switch (c[k].type) {
        case SQLITE_INTEGER: c[k].i = sqlite3_column_int64(q, i); break;
        case SQLITE_FLOAT: c[k].f = sqlite3_column_double(q, i); break;
        case SQLITE_TEXT:
            c[k].p = sqlite3_column_text(q, i);
            c[k].n = (size_t)sqlite3_column_bytes(q, i);
            break;
        case SQLITE_BLOB:
            c[k].p = sqlite3_column_blob(q, i);
            c[k].n = (size_t)sqlite3_column_bytes(q, i);
            break;
        default: break;
        }
    }
}

static int bind_cols(sqlite3_stmt *q, const col *c, int n) {
    static const char empty[1] = "";
    int rc = SQLITE_OK;
    for (int k = 0; k < n && rc == SQLITE_OK; k++) {
        int i = k + 1;
        switch (c[k].type) {
        case SQLITE_INTEGER: rc = sqlite3_bind_int64(q, i, c[k].i); break;
        case SQLITE_FLOAT: rc = sqlite3_bind_double(q, i, c[k].f); break;
        case SQLITE_TEXT: rc = sqlite3_bind_text64(q, i, c[k].p ? c[k].p : empty, c[k].n, SQLITE_STATIC,
                                                   SQLITE_UTF8); break;
        /* A NULL pointer would bind NULL, not an empty blob. */
        case SQLITE_BLOB: rc = sqlite3_bind_blob64(q, i, c[k].p ? c[k].p : empty, c[k].n, SQLITE_STATIC); break;
        default: rc = sqlite3_bind_null(q, i); break;
        }
    }
    return rc;
}

static col col_int(sqlite3_int64 v) { return (col){ .type = SQLITE_INTEGER, .i = v }; }
static col col_text(const char *t) { return (col){ .type = SQLITE_TEXT, .p = t, .n = strlen(t) }; }
static col col_blob(const void *p, size_t n) { return (col){ .type = SQLITE_BLOB, .p = p, .n = n }; }

/* "a, b, c" of the defs, into buf. */
static void col_list(char *buf, size_t len, const col_def *d, int n) {
    buf[0] = '\0';
    for (int k = 0; k < n; k++) {
        size_t used = strlen(buf);
        snprintf(buf + used, len - used, "%s%s", k ? ", " : "", d[k].name);
    }
}

/* "?,?,?" (n marks), into buf. */
static void placeholders(char *buf, size_t len, int n) {
    buf[0] = '\0';
    for (int k = 0; k < n; k++) {
        size_t used = strlen(buf);
        snprintf(buf + used, len - used, "%s?", k ? "," : "");
    }
}

/* ---- checks shared by save and load_all -----------------------------------
 * A row is trusted only as far as it is consistent: a zero divisor, a shape
 * that disagrees with its map or a state that is never stored would crash
 * or mislead later.  save runs the same checks, so the store never writes a
 * row it would refuse to read. */

static bool check_types(const col *c, const col_def *d, int n, char *why, size_t len) {
    for (int k = 0; k < n; k++) {
        if (c[k].type != d[k].type) {
            snprintf(why, len, "column %s holds %s, not %s", d[k].name, type_name(c[k].type), type_name(d[k].type));
            return false;
        }
        if (d[k].type == SQLITE_TEXT && c[k].n && memchr(c[k].p, 0, c[k].n)) {
            snprintf(why, len, "column %s contains a NUL byte", d[k].name);
            return false;
        }
    }
    return true;
}

static bool check_range(const col *c, const col_def *d, sqlite3_int64 lo, sqlite3_int64 hi, char *why, size_t len) {
    if (c->i < lo || c->i > hi) {
        snprintf(why, len, "%s %lld is out of range [%lld, %lld]", d->name, (long long)c->i, (long long)lo,
                 (long long)hi);
        return false;
    }
    return true;
}

static bool check_text(const col *c, const col_def *d, size_t min, size_t max, char *why, size_t len) {
    if (c->n < min || c->n > max) {
        snprintf(why, len, "%s is %zu bytes long, want %zu to %zu", d->name, c->n, min, max);
        return false;
    }
    return true;
}

static double bits_to_double(sqlite3_int64 v);
static sqlite3_int64 double_to_bits(double d);

/* The defaults columns of a models row (types checked by the caller). */
static eplb_rebalance_knobs cols_to_knobs(const col *c) {
    return (eplb_rebalance_knobs){
        .policy = (uint32_t)c[MC_POLICY].i,
        .target_balancedness = bits_to_double(c[MC_TARGET].i),
        .max_bytes_moved = (uint64_t)c[MC_MAX_BYTES].i,
        .max_slots_moved = (uint64_t)c[MC_MAX_SLOTS].i,
        .min_improvement = bits_to_double(c[MC_MIN_IMPROVEMENT].i),
        .cost_intra_node = bits_to_double(c[MC_COST_INTRA].i),
        .cost_cross_node = bits_to_double(c[MC_COST_CROSS].i),
        .expert_bytes = (uint64_t)c[MC_EXPERT_BYTES].i,
    };
}

static bool check_model_cols(const col *c, char *why, size_t len) {
    const col_def *d = model_cols;
    if (!check_types(c, d, MC_COUNT, why, len))
        return false;
    if (!check_text(&c[MC_MODEL_ID], &d[MC_MODEL_ID], 1, EPLB_MODEL_NAME_MAX, why, len) ||
        !check_text(&c[MC_MAIN], &d[MC_MAIN], 0, EPLB_MODEL_NAME_MAX, why, len) ||
        !check_text(&c[MC_ARCH], &d[MC_ARCH], 1, EPLB_ARCH_MAX, why, len) ||
        !check_text(&c[MC_PATH], &d[MC_PATH], 1, EPLB_PATH_MAX - 1, why, len) ||
        !check_text(&c[MC_REASON], &d[MC_REASON], 0, EPLB_ERROR_MSG_MAX - 1, why, len))
        return false;
    eplb_error e;
    if (eplb_model_name_check((const char *)c[MC_MODEL_ID].p, "model_id", &e) != EPLB_OK) {
        snprintf(why, len, "%s", e.msg);
        return false;
    }
    if (!check_range(&c[MC_ROLE], &d[MC_ROLE], EPLB_ROLE_MAIN, EPLB_ROLE_SPECULATOR, why, len))
        return false;
    if (c[MC_ROLE].i == EPLB_ROLE_MAIN && c[MC_MAIN].n != 0) {
        snprintf(why, len, "a main model with main_model_id \"%s\"", (const char *)c[MC_MAIN].p);
        return false;
    }
    if (c[MC_ROLE].i == EPLB_ROLE_SPECULATOR) {
        if (eplb_model_name_check((const char *)c[MC_MAIN].p, "main_model_id", &e) != EPLB_OK) {
            snprintf(why, len, "a speculator whose %s", e.msg);
            return false;
        }
        if (strcmp(c[MC_MAIN].p, c[MC_MODEL_ID].p) == 0) {
            snprintf(why, len, "a speculator of itself");
            return false;
        }
    }
    /* Shape: every count a uint32; those that divide or size something
     * at least 1. */
    for (int k = MC_LAYERS; k <= MC_STEP; k++) {
        bool may_be_zero = k == MC_REDUNDANT || k == MC_SHARED;
        if (!check_range(&c[k], &d[k], may_be_zero ? 0 : 1, UINT32_MAX, why, len))
            return false;
    }
    sqlite3_int64 L = c[MC_LAYERS].i, N = c[MC_LOGICAL].i, P = c[MC_PHYSICAL].i;
    sqlite3_int64 local = c[MC_LOCAL].i, ep = c[MC_EP_SIZE].i; /* both in [1, 2^32) */
    if (P < N) {
        snprintf(why, len, "num_physical %lld < num_logical %lld", (long long)P, (long long)N);
        return false;
    }
    if (c[MC_REDUNDANT].i != P - N) {
        snprintf(why, len, "num_redundant %lld != num_physical %lld - num_logical %lld",
                 (long long)c[MC_REDUNDANT].i, (long long)P, (long long)N);
        return false;
    }
    if ((uint64_t)local * (uint64_t)ep != (uint64_t)P) {
        snprintf(why, len, "num_local %lld x ep_size %lld != num_physical %lld", (long long)local, (long long)ep,
                 (long long)P);
        return false;
    }
    if (N % c[MC_GROUPS].i != 0) {
        snprintf(why, len, "num_logical %lld is not a multiple of num_groups %lld", (long long)N,
                 (long long)c[MC_GROUPS].i);
        return false;
    }
    if (ep % c[MC_NODES].i != 0) {
        snprintf(why, len, "ep_size %lld is not a multiple of num_nodes %lld", (long long)ep,
                 (long long)c[MC_NODES].i);
        return false;
    }
    if (!check_range(&c[MC_AUTO], &d[MC_AUTO], 0, 1, why, len) ||
        !check_range(&c[MC_EPOCH], &d[MC_EPOCH], 0, INT64_MAX, why, len))
        return false;
    if (c[MC_PPHYS].i != P) {
        snprintf(why, len, "placement_physical %lld != num_physical %lld", (long long)c[MC_PPHYS].i, (long long)P);
        return false;
    }
    if (!check_range(&c[MC_VALID], &d[MC_VALID], 1, P, why, len))
        return false;
    if (!check_range(&c[MC_STATE], &d[MC_STATE], EPLB_MOVE_IDLE, EPLB_MOVE_STATE_MAX, why, len))
        return false;
    if (!eplb_move_state_persistent((eplb_move_state)c[MC_STATE].i)) {
        snprintf(why, len, "move state %lld (%s) is never stored", (long long)c[MC_STATE].i,
                 eplb_move_state_name((eplb_move_state)c[MC_STATE].i));
        return false;
    }
    /* L and P are uint32s, so L * P * 4 fits in 66 bits: compare in two
     * steps rather than overflow. */
    if ((uint64_t)L * (uint64_t)P > (SIZE_MAX - 1) / 4 || c[MC_PHY2LOG].n != (size_t)L * (size_t)P * 4) {
        snprintf(why, len, "a %zu-byte map for %lld layers x %lld slots", c[MC_PHY2LOG].n, (long long)L,
                 (long long)P);
        return false;
    }
    /* The defaults as registration checks them (ranges, NaN refused). */
    eplb_rebalance_knobs k = cols_to_knobs(c);
    if (!check_range(&c[MC_POLICY], &d[MC_POLICY], 0, UINT32_MAX, why, len))
        return false;
    if (eplb_rebalance_knobs_check(&k, "default ", &e) != EPLB_OK) {
        snprintf(why, len, "%s", e.msg);
        return false;
    }
    return true;
}

/* A window row against its model's shape (L, N, window_size). */
static bool check_window_cols(const col *c, const char *model_id, uint32_t L, uint32_t N, uint32_t capacity,
                              char *why, size_t len) {
    const col_def *d = window_cols;
    if (!check_types(c, d, WC_COUNT, why, len))
        return false;
    if (c[WC_MODEL_ID].n != strlen(model_id) || memcmp(c[WC_MODEL_ID].p, model_id, c[WC_MODEL_ID].n) != 0) {
        snprintf(why, len, "the row is for model %.*s", (int)c[WC_MODEL_ID].n, (const char *)c[WC_MODEL_ID].p);
        return false;
    }
    if (!check_range(&c[WC_COUNT_], &d[WC_COUNT_], 0, capacity, why, len) ||
        !check_range(&c[WC_PASSES], &d[WC_PASSES], c[WC_COUNT_].i, INT64_MAX, why, len))
        return false;
    /* count <= capacity (a uint32) and L * N <= UINT32_MAX: cells fits. */
    uint64_t cells = (uint64_t)c[WC_COUNT_].i * ((uint64_t)L * N);
    if ((uint64_t)L * N > UINT32_MAX || cells > (SIZE_MAX - 1) / 8 || c[WC_RECORDS].n != cells * 8) {
        snprintf(why, len, "a %zu-byte window for %lld records of %u layers x %u experts", c[WC_RECORDS].n,
                 (long long)c[WC_COUNT_].i, L, N);
        return false;
    }
    return true;
}

static double bits_to_double(sqlite3_int64 v) {
    uint64_t bits = (uint64_t)v;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static sqlite3_int64 double_to_bits(double d) {
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    return (sqlite3_int64)bits;
}

/* A rebalances row against its model (id, L, P).  Balancedness is a ratio
 * of sums of non-negative loads, mean over max: in [0, 1] up to rounding
 * (the slack), never NaN or infinite. */
static bool check_rebalance_cols(const col *c, const char *model_id, uint32_t L, uint32_t P, char *why,
                                 size_t len) {
    const col_def *d = rebalance_cols;
    if (!check_types(c, d, RC_COUNT, why, len))
        return false;
    if (c[RC_MODEL_ID].n != strlen(model_id) || memcmp(c[RC_MODEL_ID].p, model_id, c[RC_MODEL_ID].n) != 0) {
        snprintf(why, len, "the row is for model %.*s", (int)c[RC_MODEL_ID].n, (const char *)c[RC_MODEL_ID].p);
        return false;
    }
    if (!check_text(&c[RC_ID], &d[RC_ID], 1, EPLB_REBALANCE_ID_MAX, why, len))
        return false;
    const unsigned char *id = c[RC_ID].p;
    for (size_t i = 0; i < c[RC_ID].n; i++)
        if (id[i] < 0x20 || id[i] > 0x7e) { /* printable ASCII: it is shown in logs and answers */
            snprintf(why, len, "id byte %zu is 0x%02x, not printable ASCII", i, id[i]);
            return false;
        }
    if (c[RC_LAYERS].i != (sqlite3_int64)L || c[RC_PHYSICAL].i != (sqlite3_int64)P) {
        snprintf(why, len, "a target of %lld layers x %lld slots for a model of %u x %u", (long long)c[RC_LAYERS].i,
                 (long long)c[RC_PHYSICAL].i, L, P);
        return false;
    }
    if (!check_range(&c[RC_PER_STEP], &d[RC_PER_STEP], 1, UINT32_MAX, why, len) ||
        !check_range(&c[RC_DONE], &d[RC_DONE], 0, (sqlite3_int64)L - 1, why, len) ||
        !check_range(&c[RC_WEIGHTS], &d[RC_WEIGHTS], 0, 1, why, len) ||
        !check_range(&c[RC_VALID], &d[RC_VALID], 1, P, why, len) ||
        !check_range(&c[RC_EPOCH], &d[RC_EPOCH], 0, INT64_MAX, why, len) ||
        !check_range(&c[RC_EXEC], &d[RC_EXEC], EPLB_EXEC_SERVER, EPLB_EXEC_ENGINE, why, len))
        return false;
    /* eplbd moves nothing of an engine-executed rebalance. */
    if (c[RC_EXEC].i == EPLB_EXEC_ENGINE && c[RC_WEIGHTS].i) {
        snprintf(why, len, "an engine-executed rebalance marked with_weights");
        return false;
    }
    for (int k = RC_BEFORE; k <= RC_AFTER; k++) {
        double b = bits_to_double(c[k].i);
        if (!(b >= 0.0 && b <= 1.0 + 1e-6)) { /* false for NaN too */
            snprintf(why, len, "%s %.17g is out of range [0, 1]", d[k].name, b);
            return false;
        }
    }
    /* L * P * 4 fits: the model row passed the same check. */
    if (c[RC_PHY2LOG].n != (size_t)L * P * 4) {
        snprintf(why, len, "a %zu-byte target map for %u layers x %u slots", c[RC_PHY2LOG].n, L, P);
        return false;
    }
    return true;
}

/* ---- little-endian packing -------------------------------------------------
 * phy2log and windows travel as little-endian int32s / int64s so a database
 * file moves between machines. */

static unsigned char *pack_i32(const int32_t *v, size_t n) {
    unsigned char *b = eplb_malloc(n ? n * 4 : 1);
    if (!b)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        uint32_t x = (uint32_t)v[i];
        b[4 * i] = (unsigned char)x;
        b[4 * i + 1] = (unsigned char)(x >> 8);
        b[4 * i + 2] = (unsigned char)(x >> 16);
        b[4 * i + 3] = (unsigned char)(x >> 24);
    }
    return b;
}

static unsigned char *pack_i64(const int64_t *v, size_t n) {
    unsigned char *b = eplb_malloc(n ? n * 8 : 1);
    if (!b)
        return NULL;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 8; k++)
            b[8 * i + (size_t)k] = (unsigned char)((uint64_t)v[i] >> (8 * k));
    return b;
}

static void unpack_i64(const unsigned char *b, int64_t *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint64_t x = 0;
        for (int k = 0; k < 8; k++)
            x |= (uint64_t)b[8 * i + (size_t)k] << (8 * k);
        v[i] = (int64_t)x;
    }
}

static void unpack_i32(const unsigned char *b, int32_t *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        v[i] = (int32_t)((uint32_t)b[4 * i] | (uint32_t)b[4 * i + 1] << 8 | (uint32_t)b[4 * i + 2] << 16 |
                         (uint32_t)b[4 * i + 3] << 24);
}

/* ---- schema ---------------------------------------------------------------- */

/* Column order is the canonical order of eplb_store.h; checksum last. */
#define MODELS_V2_COLUMNS MODELS_V2_HEAD "  checksum INTEGER NOT NULL"
#define MODELS_V2_HEAD                                                                      \
    "  model_id TEXT PRIMARY KEY,"                                                          \
    "  role INTEGER NOT NULL,"                                                              \
    "  main_model_id TEXT NOT NULL,"                                                        \
    "  architecture TEXT NOT NULL,"                                                         \
    "  resolved_path TEXT NOT NULL,"                                                        \
    "  num_layers INTEGER NOT NULL, num_logical INTEGER NOT NULL,"                          \
    "  num_physical INTEGER NOT NULL, num_local INTEGER NOT NULL,"                          \
    "  num_redundant INTEGER NOT NULL, num_shared INTEGER NOT NULL,"                        \
    "  num_groups INTEGER NOT NULL, ep_size INTEGER NOT NULL,"                              \
    "  num_nodes INTEGER NOT NULL, window_size INTEGER NOT NULL,"                           \
    "  step_interval INTEGER NOT NULL,"                                                     \
    "  auto_rebalance INTEGER NOT NULL,"                                                    \
    "  epoch INTEGER NOT NULL,"                                                             \
    "  placement_physical INTEGER NOT NULL,"                                                \
    "  num_valid_physical INTEGER NOT NULL,"                                                \
    "  state INTEGER NOT NULL," /* eplb_move_state: 0 IDLE, 2 MOVING, 4 NEEDS_RELOAD */     \
    "  state_reason TEXT NOT NULL,"                                                         \
    "  phy2log BLOB NOT NULL,"
/* Schema 4: schema 2's columns, then the model's rebalance defaults. */
#define MODELS_V4_COLUMNS                                                                   \
    MODELS_V2_HEAD                                                                          \
    "  default_policy INTEGER NOT NULL,"                                                    \
    "  default_target_balancedness INTEGER NOT NULL,"                                       \
    "  default_max_bytes_moved INTEGER NOT NULL,"                                           \
    "  default_max_slots_moved INTEGER NOT NULL,"                                           \
    "  default_min_improvement INTEGER NOT NULL,"                                           \
    "  default_cost_intra_node INTEGER NOT NULL,"                                           \
    "  default_cost_cross_node INTEGER NOT NULL,"                                           \
    "  expert_bytes INTEGER NOT NULL,"                                                      \
    "  checksum INTEGER NOT NULL"
/* The load window, oldest record first: [count][num_layers][num_logical]
 * little-endian int64s, and the number of passes ever counted. */
#define WINDOWS_V2_COLUMNS                                                                  \
    "  model_id TEXT PRIMARY KEY REFERENCES models(model_id),"                              \
    "  passes INTEGER NOT NULL,"                                                            \
    "  count INTEGER NOT NULL,"                                                             \
    "  records BLOB NOT NULL,"                                                              \
    "  checksum INTEGER NOT NULL"

/* A model's pending rebalance (schema 3); no row: none pending.  The
 * balancedness columns hold a double's IEEE-754 bits; phy2log is the
 * target's [num_layers][num_physical] little-endian int32s. */
#define REBALANCES_V3_COLUMNS REBALANCES_V3_HEAD "  checksum INTEGER NOT NULL"
/* Schema 4: then who executes it, and the engine plan's bound and expert size. */
#define REBALANCES_V4_COLUMNS                                                               \
    REBALANCES_V3_HEAD                                                                      \
    "  execution INTEGER NOT NULL,"                                                         \
    "  max_staging_bytes INTEGER NOT NULL,"                                                 \
    "  expert_bytes INTEGER NOT NULL,"                                                      \
    "  checksum INTEGER NOT NULL"
#define REBALANCES_V3_HEAD                                                                  \
    "  model_id TEXT PRIMARY KEY REFERENCES models(model_id),"                              \
    "  id TEXT NOT NULL,"                                                                   \
    "  layers_per_step INTEGER NOT NULL,"                                                   \
    "  layers_done INTEGER NOT NULL,"                                                       \
    "  with_weights INTEGER NOT NULL,"                                                      \
    "  balancedness_before INTEGER NOT NULL,"                                               \
    "  balancedness_after INTEGER NOT NULL,"                                                \
    "  num_layers INTEGER NOT NULL,"                                                        \
    "  num_physical INTEGER NOT NULL,"                                                      \
    "  num_valid_physical INTEGER NOT NULL,"                                                \
    "  epoch INTEGER NOT NULL,"                                                             \
    "  phy2log BLOB NOT NULL,"

static const char *const rebalances_v3_sql = "CREATE TABLE rebalances (" REBALANCES_V3_COLUMNS ");";

static const char *const schema_v4_sql =
    "CREATE TABLE models (" MODELS_V4_COLUMNS ");"
    "CREATE TABLE windows (" WINDOWS_V2_COLUMNS ");"
    "CREATE TABLE rebalances (" REBALANCES_V4_COLUMNS ");";

static eplb_status open_fail(eplb_store *s, eplb_error *err, int rc) {
    int sys_errno = s->injected ? s->injected_errno : sqlite3_system_errno(s->db);
    char doing[80 + 4096];
    if (rc_is_readonly(rc, sys_errno))
        snprintf(doing, sizeof doing, "at open; eplbd needs to write the file, its -wal and -shm files and its .lock");
    else if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
        snprintf(doing, sizeof doing, "at open");
    else
        snprintf(doing, sizeof doing, "opening %s", s->path);
    return db_fail(s, err, rc, doing);
}

/* Does table `name` exist, and (when column != NULL) has it that column? */
static eplb_status table_has(eplb_store *s, const char *name, const char *column, bool *yes, eplb_error *err) {
    char sql[160];
    if (column)
        snprintf(sql, sizeof sql, "SELECT 1 FROM pragma_table_info('%s') WHERE name = '%s'", name, column);
    else
        snprintf(sql, sizeof sql, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '%s'", name);
    sqlite3_stmt *q;
    int rc = x_prepare(s, sql, &q);
    if (rc == SQLITE_OK)
        rc = x_step(s, q);
    *yes = rc == SQLITE_ROW;
    eplb_status st = rc == SQLITE_ROW || rc == SQLITE_DONE ? EPLB_OK : open_fail(s, err, rc);
    sqlite3_finalize(q);
    return st;
}

/* Copy every row of select_sql (n columns, in canonical order) into
 * insert_sql's table with its checksum appended, values exactly as stored. */
/* With old_tag (the select then ends with the row's old checksum, after the
 * n columns): a row whose old checksum does not verify under old_tag over
 * its first old_n columns is copied with a checksum that does not verify
 * either, so an upgrade never launders a damaged row. */
static eplb_status copy_sealed(eplb_store *s, const char *select_sql, const char *insert_sql, const char *tag,
                               int n, const char *old_tag, int old_n, eplb_error *err) {
    sqlite3_stmt *in = NULL, *out = NULL;
    col c[MC_COUNT + 2];
    int rc = x_prepare(s, select_sql, &in);
    if (rc == SQLITE_OK)
        rc = x_prepare(s, insert_sql, &out);
    while (rc == SQLITE_OK && (rc = x_step(s, in)) == SQLITE_ROW) {
        read_cols(in, 0, c, old_tag ? n + 1 : n);
        bool damaged = old_tag && (c[n].type != SQLITE_INTEGER ||
                                   (uint64_t)c[n].i != row_checksum(old_tag, c, old_n));
        c[n] = col_int((sqlite3_int64)(row_checksum(tag, c, n) ^ (damaged ? 1u : 0u)));
        rc = bind_cols(out, c, n + 1);
        if (rc == SQLITE_OK && (rc = x_step(s, out)) == SQLITE_DONE)
            rc = sqlite3_reset(out);
    }
    eplb_status st = rc == SQLITE_DONE ? EPLB_OK : db_fail(s, err, rc, "migrating the database to schema 4");
    sqlite3_finalize(in);
    sqlite3_finalize(out);
    return st;
}

/* Schema 1 -> 2, inside the open's transaction (all or nothing; the caller
 * then adds schema 3's table): the tables are rebuilt with state,
 * state_reason and checksum; a model flagged needs_weight_reload becomes
 * NEEDS_RELOAD.  Every row is sealed as it
 * stands: v1 had no checksum to verify, so a row edited before the upgrade
 * is caught only by the range checks. */
static eplb_status migrate_v1(eplb_store *s, bool has_windows, eplb_error *err) {
    int rc = x_exec(s, "CREATE TABLE models_v2 (" MODELS_V2_COLUMNS ");"
                       "CREATE TABLE windows_v2 (" WINDOWS_V2_COLUMNS ");");
    if (rc != SQLITE_OK)
        return db_fail(s, err, rc, "migrating the database to schema 4");
    char cols[600], sel[900], ins[900];
    col_list(cols, sizeof cols, model_cols, MC_STATE);
    /* "IS 0": anything but a clean 0 (garbage included) errs on the side
     * of a reload. */
    snprintf(sel, sizeof sel,
             "SELECT %s, CASE WHEN needs_weight_reload IS 0 THEN %d ELSE %d END,"
             " CASE WHEN needs_weight_reload IS 0 THEN '' ELSE 'the weights needed a reload when this database"
             " was upgraded from schema 1 (which kept no reason)' END, phy2log FROM models",
             cols, EPLB_MOVE_IDLE, EPLB_MOVE_NEEDS_RELOAD);
    col_list(cols, sizeof cols, model_cols, MC_V2_COUNT);
    char marks[2 * MC_COUNT + 2];
    placeholders(marks, sizeof marks, MC_V2_COUNT + 1);
    snprintf(ins, sizeof ins, "INSERT INTO models_v2 (%s, checksum) VALUES (%s)", cols, marks);
    eplb_status st = copy_sealed(s, sel, ins, models_v2_tag, MC_V2_COUNT, NULL, 0, err);
    if (st != EPLB_OK)
        return st;
    if (has_windows) {
        col_list(cols, sizeof cols, window_cols, WC_COUNT);
        snprintf(sel, sizeof sel, "SELECT %s FROM windows", cols);
        placeholders(marks, sizeof marks, WC_COUNT + 1);
        snprintf(ins, sizeof ins, "INSERT INTO windows_v2 (%s, checksum) VALUES (%s)", cols, marks);
        if ((st = copy_sealed(s, sel, ins, windows_tag, WC_COUNT, NULL, 0, err)) != EPLB_OK)
            return st;
        if ((rc = x_exec(s, "DROP TABLE windows")) != SQLITE_OK)
            return db_fail(s, err, rc, "migrating the database to schema 4");
    }
    rc = x_exec(s, "DROP TABLE models; ALTER TABLE models_v2 RENAME TO models;"
                   " ALTER TABLE windows_v2 RENAME TO windows;");
    return rc == SQLITE_OK ? EPLB_OK : db_fail(s, err, rc, "migrating the database to schema 4");
}

/* Schema 3 -> 4, inside the open's transaction: models and rebalances are
 * rebuilt with schema 4's columns at their defaults (no defaults stored:
 * the registration's knobs were not kept before schema 4; a pending
 * rebalance of schema 3 is eplbd-executed, no bound, size unknown) and
 * every row resealed under its v4 tag; a row whose v3 checksum does not
 * verify gets a v4 one that does not either (load_all then marks its model
 * DATA_LOSS, as before the upgrade).  Cost: one pass over the models and rebalances rows (not the
 * windows). */
static eplb_status migrate_v3(eplb_store *s, eplb_error *err) {
    int rc = x_exec(s, "CREATE TABLE models_v4 (" MODELS_V4_COLUMNS ");"
                       "CREATE TABLE rebalances_v4 (" REBALANCES_V4_COLUMNS ");");
    if (rc != SQLITE_OK)
        return db_fail(s, err, rc, "migrating the database to schema 4");
    char cols[900], sel[1200], ins[1200], marks[2 * MC_COUNT + 2];
    col_list(cols, sizeof cols, model_cols, MC_V2_COUNT);
    /* Defaults: policy 0 (DEEPSEEK), every double 0.0 (bits 0), no budget. */
    snprintf(sel, sizeof sel, "SELECT %s, 0, 0, 0, 0, 0, 0, 0, 0, checksum FROM models", cols);
    col_list(cols, sizeof cols, model_cols, MC_COUNT);
    placeholders(marks, sizeof marks, MC_COUNT + 1);
    snprintf(ins, sizeof ins, "INSERT INTO models_v4 (%s, checksum) VALUES (%s)", cols, marks);
    eplb_status st = copy_sealed(s, sel, ins, models_tag, MC_COUNT, models_v2_tag, MC_V2_COUNT, err);
    if (st != EPLB_OK)
        return st;
    col_list(cols, sizeof cols, rebalance_cols, RC_V3_COUNT);
    snprintf(sel, sizeof sel, "SELECT %s, %d, 0, 0, checksum FROM rebalances", cols, EPLB_EXEC_SERVER);
    col_list(cols, sizeof cols, rebalance_cols, RC_COUNT);
    placeholders(marks, sizeof marks, RC_COUNT + 1);
    snprintf(ins, sizeof ins, "INSERT INTO rebalances_v4 (%s, checksum) VALUES (%s)", cols, marks);
    if ((st = copy_sealed(s, sel, ins, rebalances_tag, RC_COUNT, "eplbd.rebalances.v3", RC_V3_COUNT, err)) != EPLB_OK)
        return st;
    rc = x_exec(s, "DROP TABLE rebalances; DROP TABLE models; ALTER TABLE models_v4 RENAME TO models;"
                   " ALTER TABLE rebalances_v4 RENAME TO rebalances;");
    return rc == SQLITE_OK ? EPLB_OK : db_fail(s, err, rc, "migrating the database to schema 4");
}

/* Create, migrate or check the schema, and prove the file writable: one
 * committed write (PRAGMA user_version) at every open, so a read-only
 * file, directory or mount, or a full disk, is refused now with its reason
 * rather than turning every later save into an error. */
static eplb_status prepare_schema(eplb_store *s, eplb_error *err) {
    int rc = x_exec(s, "BEGIN IMMEDIATE");
    if (rc != SQLITE_OK)
        return open_fail(s, err, rc);
    sqlite3_stmt *q;
    int version = -1;
    rc = x_prepare(s, "PRAGMA user_version", &q);
    if (rc == SQLITE_OK && (rc = x_step(s, q)) == SQLITE_ROW)
        version = sqlite3_column_int(q, 0);
    sqlite3_finalize(q);
    eplb_status st = EPLB_OK;
    if (version < 0) {
        st = open_fail(s, err, rc);
        goto out;
    }
    bool has_models = false, v1_models = false, has_windows = false, has_rebalances = false, v4_models = false;
    if ((st = table_has(s, "models", NULL, &has_models, err)) != EPLB_OK ||
        (st = table_has(s, "models", "needs_weight_reload", &v1_models, err)) != EPLB_OK ||
        (st = table_has(s, "windows", NULL, &has_windows, err)) != EPLB_OK ||
        (st = table_has(s, "rebalances", NULL, &has_rebalances, err)) != EPLB_OK ||
        (st = table_has(s, "models", "default_policy", &v4_models, err)) != EPLB_OK)
        goto out;
    /* Version 0 with v1 tables: a v1 eplbd created them and died before it
     * set user_version (two separate statements then). */
    if (version == 0 && has_models && v1_models)
        version = 1;
    /* Every upgrade runs in this one transaction: a failure anywhere leaves
     * the file at its old version, whole (v1 -> v3 included). */
    if (version == 0 && !has_models && !has_windows && !has_rebalances) {
        rc = x_exec(s, schema_v4_sql);
        if (rc != SQLITE_OK)
            st = open_fail(s, err, rc);
    } else if ((version == 1 && has_models && v1_models && !has_rebalances) ||
               (version == 2 && has_models && !v1_models && !v4_models && has_windows && !has_rebalances) ||
               (version == 3 && has_models && !v1_models && !v4_models && has_windows && has_rebalances)) {
        /* Each step in turn (v1's windows may be missing: it created its
         * tables one by one). */
        if (version == 1)
            st = migrate_v1(s, has_windows, err);
        /* 2 -> 3 adds an empty table: no row is read or resealed. */
        if (st == EPLB_OK && version <= 2 && (rc = x_exec(s, rebalances_v3_sql)) != SQLITE_OK)
            st = db_fail(s, err, rc, "migrating the database to schema 4");
        if (st == EPLB_OK)
            st = migrate_v3(s, err);
    } else if (version == 4 && has_models && !v1_models && v4_models && has_windows && has_rebalances) {
        /* current */
    } else if (version > STORE_SCHEMA_VERSION) {
        st = eplb_error_set(err, EPLB_EDATALOSS,
                            "store: %s has schema version %d, this eplbd knows up to %d (written by a newer eplbd?)",
                            s->path, version, STORE_SCHEMA_VERSION);
    } else {
        st = eplb_error_set(err, EPLB_EDATALOSS,
                            "store: %s has schema version %d but %s: not an eplbd database, or damaged", s->path,
                            version, has_models ? "unexpected tables" : "no models or windows table");
    }
    if (st != EPLB_OK)
        goto out;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", STORE_SCHEMA_VERSION);
    if ((rc = x_exec(s, sql)) != SQLITE_OK || (rc = x_exec(s, "COMMIT")) != SQLITE_OK)
        st = open_fail(s, err, rc);
out:
    if (st != EPLB_OK)
        rollback(s);
    return st;
}

/* ---- the lock ---------------------------------------------------------------
 * Two flock()s rather than SQLite's locking_mode=EXCLUSIVE, both dying with
 * the process:
 *   - on the database file itself, the one that excludes: it is tied to the
 *     inode, so a hard link, a symlink or a deleted "<path>.lock" still meets
 *     it.  (On Linux flock locks are independent of the POSIX fcntl locks
 *     SQLite takes on the same file.)
 *   - on "<path>.lock", where <path> is the database's resolved name (a
 *     symlinked path names the same file): it holds the holder's pid, for
 *     the message.
 * The .lock file is left in place at close: unlinking it would let a
 * newcomer lock a fresh inode while someone else still holds the old one. */

static eplb_status held_by_pid(eplb_store *s, int fd, eplb_error *err) {
    char buf[32] = "";
    ssize_t got = pread(fd, buf, sizeof buf - 1, 0);
    buf[got > 0 ? got : 0] = '\0';
    char *end;
    long pid = strtol(buf, &end, 10);
    if (end != buf && pid > 0)
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s is held by another eplbd (pid %ld)", s->path,
                              pid);
    /* the holder has not written its pid yet */
    return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s is held by another eplbd (pid unknown)", s->path);
}

static eplb_status db_file_open(eplb_store *s, eplb_error *err) {
    int fd = open(s->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        s->db_fd = fd;
        return EPLB_OK;
    }
    int e = errno;
    bool exists = access(s->path, F_OK) == 0;
    if (e == EACCES || e == EROFS || e == EPERM || e == ETXTBSY)
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s is read-only: this user (uid %ld) cannot %s: %s",
                              s->path, (long)geteuid(), exists ? "write the file" : "create the file", strerror(e));
    if (e == ENOSPC || e == EDQUOT)
        return eplb_error_set(err, EPLB_ENOSPACE, "store: disk full creating the database %s: %s", s->path,
                              strerror(e));
    return eplb_error_set(err, EPLB_EUNAVAILABLE, "store: cannot open %s: %s", s->path, strerror(e));
}

static eplb_status lock_acquire(eplb_store *s, eplb_error *err) {
    eplb_status st = db_file_open(s, err);
    if (st != EPLB_OK)
        return st;
    /* The file exists now, so its resolved name does too. */
    char *real = realpath(s->path, NULL);
    const char *base = real ? real : s->path;
    size_t n = strlen(base) + sizeof ".lock";
    char *lp = eplb_malloc(n);
    if (!lp) {
        free(real);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    }
    snprintf(lp, n, "%s.lock", base);
    free(real);
    int fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        if (e == EACCES || e == EROFS || e == EPERM)
            st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s is read-only: cannot open its lock file %s: %s",
                                s->path, lp, strerror(e));
        else if (e == ENOSPC || e == EDQUOT)
            st = eplb_error_set(err, EPLB_ENOSPACE, "store: disk full creating the lock file %s: %s", lp, strerror(e));
        else
            st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: cannot open %s: lock file %s: %s", s->path, lp,
                                strerror(e));
        goto out;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e == EWOULDBLOCK)
            st = held_by_pid(s, fd, err);
        else
            st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: cannot lock %s: %s", lp, strerror(e));
        close(fd);
        goto out;
    }
    if (flock(s->db_fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e == EWOULDBLOCK) /* reached by another name, or its .lock was removed */
            st = eplb_error_set(err, EPLB_EUNAVAILABLE,
                                "store: database %s is held by another process (lock on the database file)", s->path);
        else
            st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: cannot lock %s: %s", s->path, strerror(e));
        close(fd); /* untouched: whatever pid it names stays */
        goto out;
    }
    /* Best effort: a lock file without a pid still locks. */
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) == 0 && pwrite(fd, pid, (size_t)len, 0) != len) {
        /* ignored: the next holder overwrites it */
    }
    s->lock_fd = fd;
out:
    eplb_free(lp);
    return st;
}

/* ---- open / close ----------------------------------------------------------- */

eplb_status eplb_store_open(const char *path, eplb_store **out, eplb_error *err) {
    *out = NULL;
    eplb_store *s = eplb_calloc(1, sizeof *s);
    char *p = eplb_malloc(strlen(path) + 1);
    if (!s || !p) {
        eplb_free(s);
        eplb_free(p);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    }
    strcpy(p, path);
    s->path = p;
    s->lock_fd = -1;
    s->db_fd = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_lock(&pending_lock);
    s->fault = pending_fault;
    pending_fault = (store_fault){ 0 };
    pthread_mutex_unlock(&pending_lock);

    bool memory = strcmp(path, ":memory:") == 0 || path[0] == '\0';
    eplb_status st = memory ? EPLB_OK : lock_acquire(s, err);
    if (st != EPLB_OK)
        goto fail;
    int rc = fault_hit(s);
    if (rc == SQLITE_OK)
        rc = sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, NULL);
    if (rc != SQLITE_OK) {
        char msg[300];
        snprintf(msg, sizeof msg, "%s%s", s->injected || !s->db ? sqlite3_errstr(rc) : sqlite3_errmsg(s->db),
                 s->injected ? " (injected fault)" : "");
        st = map_rc(rc, s->db ? sqlite3_system_errno(s->db) : 0);
        st = eplb_error_set(err, st == EPLB_EINTERNAL ? EPLB_EUNAVAILABLE : st, "store: cannot open %s: %s", path, msg);
        goto fail;
    }
    /* SQLite opens a file it may not write read-only without a word. */
    if (sqlite3_db_readonly(s->db, "main") == 1) {
        st = eplb_error_set(err, EPLB_EUNAVAILABLE,
                            "store: database %s is read-only: this user (uid %ld) cannot write the file",
                            path, (long)geteuid());
        goto fail;
    }
    sqlite3_busy_timeout(s->db, 5000);
    sqlite3_stmt *q;
    const char *mode = NULL;
    rc = x_prepare(s, "PRAGMA journal_mode=WAL", &q);
    if (rc == SQLITE_OK && (rc = x_step(s, q)) == SQLITE_ROW)
        mode = (const char *)sqlite3_column_text(q, 0);
    if (!mode) {
        st = open_fail(s, err, rc);
    } else if (!memory && strcmp(mode, "wal") != 0) {
        /* WAL + synchronous=FULL is what makes a save atomic and durable. */
        st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: database %s cannot use WAL (journal mode stays %s)",
                            path, mode);
    }
    sqlite3_finalize(q);
    if (st != EPLB_OK)
        goto fail;
    if ((rc = x_exec(s, "PRAGMA synchronous=FULL")) != SQLITE_OK) {
        st = open_fail(s, err, rc);
        goto fail;
    }
    if ((st = prepare_schema(s, err)) != EPLB_OK)
        goto fail;
    s->fault = (store_fault){ 0 }; /* an armed open fault is for the open only */
    *out = s;
    return EPLB_OK;
fail:
    eplb_store_close(s);
    return st;
}

void eplb_store_close(eplb_store *s) {
    if (!s)
        return;
    /* The database first (its last checkpoint), then the locks: SQLite's
     * POSIX locks would go with any close of the file before it is done. */
    sqlite3_close(s->db);
    if (s->db_fd >= 0)
        close(s->db_fd);
    if (s->lock_fd >= 0)
        close(s->lock_fd);
    pthread_mutex_destroy(&s->lock);
    eplb_free(s->path);
    eplb_free(s);
}

eplb_status eplb_store_set_size_limit(eplb_store *s, uint64_t max_bytes, uint64_t *effective, eplb_error *err) {
    pthread_mutex_lock(&s->lock);
    eplb_status st = EPLB_OK;
    sqlite3_stmt *q = NULL;
    sqlite3_int64 page = 0, pages = 0;
    int rc = x_prepare(s, "PRAGMA page_size", &q);
    if (rc == SQLITE_OK && (rc = x_step(s, q)) == SQLITE_ROW)
        page = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    if (page <= 0) {
        st = db_fail(s, err, rc, "reading the page size");
        goto out;
    }
    /* SQLite clamps the count to the file's current size from below and
     * to its own maximum from above, and says what it chose. */
    uint64_t want = max_bytes ? max_bytes / (uint64_t)page : 0xfffffffeull;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA max_page_count = %" PRIu64, want ? want : 1);
    rc = x_prepare(s, sql, &q);
    if (rc == SQLITE_OK && (rc = x_step(s, q)) == SQLITE_ROW)
        pages = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    if (pages <= 0) {
        st = db_fail(s, err, rc, "setting the size limit");
        goto out;
    }
    s->size_limit = max_bytes ? (uint64_t)pages * (uint64_t)page : 0;
    if (effective)
        *effective = (uint64_t)pages * (uint64_t)page;
out:
    pthread_mutex_unlock(&s->lock);
    return st;
}

/* ---- save ------------------------------------------------------------------ */

static char models_insert_sql[1600], models_select_sql[1600], windows_insert_sql[300], windows_select_sql[300];
static char rebalances_insert_sql[600], rebalances_select_sql[600];
static const char rebalances_delete_sql[] = "DELETE FROM rebalances WHERE model_id = ?";
static pthread_once_t sql_once = PTHREAD_ONCE_INIT;

static void sql_init(void) {
    char cols[1200], marks[2 * MC_COUNT + 2];
    col_list(cols, sizeof cols, model_cols, MC_COUNT);
    placeholders(marks, sizeof marks, MC_COUNT + 1);
    snprintf(models_insert_sql, sizeof models_insert_sql, "INSERT OR REPLACE INTO models (%s, checksum) VALUES (%s)",
             cols, marks);
    snprintf(models_select_sql, sizeof models_select_sql, "SELECT %s, checksum FROM models ORDER BY model_id", cols);
    col_list(cols, sizeof cols, window_cols, WC_COUNT);
    placeholders(marks, sizeof marks, WC_COUNT + 1);
    snprintf(windows_insert_sql, sizeof windows_insert_sql, "INSERT OR REPLACE INTO windows (%s, checksum) VALUES (%s)",
             cols, marks);
    snprintf(windows_select_sql, sizeof windows_select_sql, "SELECT %s, checksum FROM windows WHERE model_id = ?",
             cols);
    col_list(cols, sizeof cols, rebalance_cols, RC_COUNT);
    placeholders(marks, sizeof marks, RC_COUNT + 1);
    snprintf(rebalances_insert_sql, sizeof rebalances_insert_sql,
             "INSERT OR REPLACE INTO rebalances (%s, checksum) VALUES (%s)", cols, marks);
    snprintf(rebalances_select_sql, sizeof rebalances_select_sql,
             "SELECT %s, checksum FROM rebalances WHERE model_id = ?", cols);
}

/* The pending rebalance's row (pc[RC_COUNT + 1], checksum included) and
 * its packed map (*blob, the caller frees it), or why it cannot be stored:
 * EPLB_EINTERNAL (it is not what load_all would accept) or EPLB_ENOMEM.
 * Costs one O(L * P) pass over the target besides the packing and the CRC. */
static eplb_status pending_row(const eplb_model_record *rec, col *pc, unsigned char **blob, eplb_error *err) {
    const eplb_pending_rebalance *pr = &rec->pending;
    const eplb_placement *t = &pr->target;
    const eplb_model_shape *sh = &rec->shape;
    *blob = NULL;
    char why[EPLB_ERROR_MSG_MAX - 64 - EPLB_MODEL_NAME_MAX];
    if (strnlen(pr->id, sizeof pr->id) == sizeof pr->id) {
        snprintf(why, sizeof why, "its id is not terminated within %d bytes", EPLB_REBALANCE_ID_MAX);
        goto refuse;
    }
    if (t->num_layers != sh->num_layers || t->num_logical != sh->num_logical ||
        t->num_physical != rec->placement.num_physical || !t->phy2log || t->epoch > (uint64_t)INT64_MAX) {
        snprintf(why, sizeof why, "target %ux%ux%u epoch %" PRIu64 " does not fit the model's %ux%ux%u",
                 t->num_layers, t->num_logical, t->num_physical, t->epoch, sh->num_layers, sh->num_logical,
                 rec->placement.num_physical);
        goto refuse;
    }
    size_t cells = (size_t)t->num_layers * t->num_physical;
    for (size_t i = 0; i < cells; i++)
        if (t->phy2log[i] < -1 || t->phy2log[i] >= (int32_t)t->num_logical) {
            snprintf(why, sizeof why, "target entry %zu is %" PRId32 ", not -1 or < %u", i, t->phy2log[i],
                     t->num_logical);
            goto refuse;
        }
    if (!(*blob = pack_i32(t->phy2log, cells)))
        return eplb_error_set(err, EPLB_ENOMEM, "store: out of memory saving model %s", rec->model_id);
    pc[RC_MODEL_ID] = col_text(rec->model_id);
    pc[RC_ID] = col_text(pr->id);
    pc[RC_PER_STEP] = col_int(pr->layers_per_step);
    pc[RC_DONE] = col_int(pr->layers_done);
    pc[RC_WEIGHTS] = col_int(pr->with_weights ? 1 : 0);
    pc[RC_BEFORE] = col_int(double_to_bits(pr->balancedness_before));
    pc[RC_AFTER] = col_int(double_to_bits(pr->balancedness_after));
    pc[RC_LAYERS] = col_int(t->num_layers);
    pc[RC_PHYSICAL] = col_int(t->num_physical);
    pc[RC_VALID] = col_int(t->num_valid_physical);
    pc[RC_EPOCH] = col_int((sqlite3_int64)t->epoch);
    pc[RC_PHY2LOG] = col_blob(*blob, cells * 4);
    pc[RC_EXEC] = col_int(pr->execution);
    pc[RC_STAGING] = col_int((sqlite3_int64)pr->max_staging_bytes);
    pc[RC_EXPERT_BYTES] = col_int((sqlite3_int64)pr->expert_bytes);
    if (!check_rebalance_cols(pc, rec->model_id, sh->num_layers, rec->placement.num_physical, why, sizeof why)) {
        eplb_free(*blob);
        *blob = NULL;
        goto refuse;
    }
    pc[RC_COUNT] = col_int((sqlite3_int64)row_checksum(rebalances_tag, pc, RC_COUNT));
    return EPLB_OK;
refuse:
    return eplb_error_set(err, EPLB_EINTERNAL, "store: refusing to save model %s: pending rebalance: %s",
                          rec->model_id, why);
}

static eplb_status store_save(void *ctx, const eplb_model_record *rec, eplb_error *err) {
    eplb_store *s = ctx;
    pthread_once(&sql_once, sql_init);
    const eplb_placement *p = &rec->placement;
    const eplb_model_shape *sh = &rec->shape;
    const eplb_load_window *w = &rec->window;
    char doing[EPLB_MODEL_NAME_MAX + 32];
    snprintf(doing, sizeof doing, "saving model %s", rec->model_id);

    /* What the core hands over must be what load_all would accept. */
    if (rec->damaged[0])
        return eplb_error_set(err, EPLB_EINTERNAL, "store: refusing to save model %s: it is marked damaged",
                              rec->model_id);
    if (p->num_layers != sh->num_layers || p->num_logical != sh->num_logical || !p->phy2log ||
        p->epoch > (uint64_t)INT64_MAX || (w->dirty && (w->num_layers != sh->num_layers ||
                                                        w->num_logical != sh->num_logical ||
                                                        w->count > sh->window_size)))
        return eplb_error_set(err, EPLB_EINTERNAL,
                              "store: refusing to save model %s: placement %ux%u epoch %" PRIu64
                              " or window %ux%u (%u records) does not fit shape %ux%u (window %u)",
                              rec->model_id, p->num_layers, p->num_logical, p->epoch, w->num_layers, w->num_logical,
                              w->count, sh->num_layers, sh->num_logical, sh->window_size);
    size_t cells = (size_t)p->num_layers * p->num_physical;
    size_t wcells = w->dirty ? (size_t)w->count * w->num_layers * w->num_logical : 0;
    unsigned char *blob = pack_i32(p->phy2log, cells);
    int64_t *flat = w->dirty ? eplb_malloc(wcells ? wcells * sizeof *flat : 1) : NULL;
    unsigned char *wblob = NULL, *pblob = NULL;
    if (flat) {
        eplb_load_window_export(w, flat);
        wblob = pack_i64(flat, wcells);
        eplb_free(flat);
    }
    if (!blob || (w->dirty && !wblob)) {
        eplb_free(blob);
        eplb_free(wblob);
        return eplb_error_set(err, EPLB_ENOMEM, "store: out of memory saving model %s", rec->model_id);
    }

    col c[MC_COUNT + 1] = {
        [MC_MODEL_ID] = col_text(rec->model_id), [MC_ROLE] = col_int(rec->role),
        [MC_MAIN] = col_text(rec->main_model_id), [MC_ARCH] = col_text(rec->architecture),
        [MC_PATH] = col_text(rec->resolved_path), [MC_LAYERS] = col_int(sh->num_layers),
        [MC_LOGICAL] = col_int(sh->num_logical), [MC_PHYSICAL] = col_int(sh->num_physical),
        [MC_LOCAL] = col_int(sh->num_local), [MC_REDUNDANT] = col_int(sh->num_redundant),
        [MC_SHARED] = col_int(sh->num_shared), [MC_GROUPS] = col_int(sh->num_groups),
        [MC_EP_SIZE] = col_int(sh->ep_size), [MC_NODES] = col_int(sh->num_nodes),
        [MC_WINDOW] = col_int(sh->window_size), [MC_STEP] = col_int(sh->step_interval),
        [MC_AUTO] = col_int(sh->auto_rebalance ? 1 : 0), [MC_EPOCH] = col_int((sqlite3_int64)p->epoch),
        [MC_PPHYS] = col_int(p->num_physical), [MC_VALID] = col_int(p->num_valid_physical),
        [MC_STATE] = col_int(rec->state), [MC_REASON] = col_text(rec->state_reason),
        [MC_PHY2LOG] = col_blob(blob, cells * 4),
        [MC_POLICY] = col_int(sh->defaults.policy),
        [MC_TARGET] = col_int(double_to_bits(sh->defaults.target_balancedness)),
        [MC_MAX_BYTES] = col_int((sqlite3_int64)sh->defaults.max_bytes_moved),
        [MC_MAX_SLOTS] = col_int((sqlite3_int64)sh->defaults.max_slots_moved),
        [MC_MIN_IMPROVEMENT] = col_int(double_to_bits(sh->defaults.min_improvement)),
        [MC_COST_INTRA] = col_int(double_to_bits(sh->defaults.cost_intra_node)),
        [MC_COST_CROSS] = col_int(double_to_bits(sh->defaults.cost_cross_node)),
        [MC_EXPERT_BYTES] = col_int((sqlite3_int64)sh->defaults.expert_bytes),
    };
    col wc[WC_COUNT + 1] = {
        [WC_MODEL_ID] = col_text(rec->model_id), [WC_PASSES] = col_int((sqlite3_int64)w->passes),
        [WC_COUNT_] = col_int(w->count), [WC_RECORDS] = col_blob(wblob, wcells * 8),
    };
    char why[EPLB_ERROR_MSG_MAX - 64];
    eplb_status st = EPLB_OK;
    if (!check_model_cols(c, why, sizeof why) ||
        (w->dirty && (w->passes > (uint64_t)INT64_MAX ||
                      !check_window_cols(wc, rec->model_id, sh->num_layers, sh->num_logical, sh->window_size, why,
                                         sizeof why)))) {
        if (w->dirty && w->passes > (uint64_t)INT64_MAX)
            snprintf(why, sizeof why, "window passes %" PRIu64 " out of range", w->passes);
        st = eplb_error_set(err, EPLB_EINTERNAL, "store: refusing to save model %s: %s", rec->model_id, why);
        goto free;
    }
    c[MC_COUNT] = col_int((sqlite3_int64)row_checksum(models_tag, c, MC_COUNT));
    if (w->dirty)
        wc[WC_COUNT] = col_int((sqlite3_int64)row_checksum(windows_tag, wc, WC_COUNT));
    /* The pending rebalance goes in the same transaction as the model row:
     * a step's commit and "how far it got" are never apart.  None pending:
     * its row is deleted (one primary-key delete per save). */
    bool pending = rec->pending.id[0] != '\0';
    col pc[RC_COUNT + 1];
    if (pending && (st = pending_row(rec, pc, &pblob, err)) != EPLB_OK)
        goto free;

    sqlite3_stmt *q = NULL;
    pthread_mutex_lock(&s->lock);
    int rc = x_exec(s, "BEGIN IMMEDIATE");
    if (rc != SQLITE_OK)
        goto fail;
    if ((rc = x_prepare(s, models_insert_sql, &q)) != SQLITE_OK || (rc = bind_cols(q, c, MC_COUNT + 1)) != SQLITE_OK ||
        (rc = x_step(s, q)) != SQLITE_DONE)
        goto fail;
    sqlite3_finalize(q);
    q = NULL;
    if (w->dirty &&
        ((rc = x_prepare(s, windows_insert_sql, &q)) != SQLITE_OK || (rc = bind_cols(q, wc, WC_COUNT + 1)) != SQLITE_OK ||
         (rc = x_step(s, q)) != SQLITE_DONE))
        goto fail;
    sqlite3_finalize(q);
    q = NULL;
    if ((rc = x_prepare(s, pending ? rebalances_insert_sql : rebalances_delete_sql, &q)) != SQLITE_OK ||
        (rc = pending ? bind_cols(q, pc, RC_COUNT + 1) : sqlite3_bind_text(q, 1, rec->model_id, -1, SQLITE_STATIC)) !=
            SQLITE_OK ||
        (rc = x_step(s, q)) != SQLITE_DONE)
        goto fail;
    if ((rc = x_exec(s, "COMMIT")) != SQLITE_OK)
        goto fail;
    goto out;
fail:
    st = db_fail(s, err, rc, doing);
    rollback(s);
out:
    sqlite3_finalize(q);
    pthread_mutex_unlock(&s->lock);
free:
    eplb_free(blob);
    eplb_free(wblob);
    eplb_free(pblob);
    return st;
}

/* ---- remove ------------------------------------------------------------------ */

/* All rows of a model (window, pending rebalance, model) in one
 * transaction; rows that fail verification go too (that is how an operator
 * gets rid of a damaged model). */
static eplb_status store_remove(void *ctx, const char *model_id, eplb_error *err) {
    eplb_store *s = ctx;
    char doing[64 + EPLB_MODEL_NAME_MAX];
    snprintf(doing, sizeof doing, "deleting model %s", model_id);
    eplb_status st = EPLB_OK;
    sqlite3_stmt *q = NULL;
    static const char *const sql[] = { "DELETE FROM windows WHERE model_id = ?", rebalances_delete_sql,
                                       "DELETE FROM models WHERE model_id = ?" };
    pthread_mutex_lock(&s->lock);
    int rc = x_exec(s, "BEGIN IMMEDIATE");
    if (rc != SQLITE_OK)
        goto fail;
    for (size_t k = 0; k < sizeof sql / sizeof sql[0]; k++) {
        if ((rc = x_prepare(s, sql[k], &q)) != SQLITE_OK)
            goto fail;
        sqlite3_bind_text(q, 1, model_id, -1, SQLITE_STATIC);
        if ((rc = x_step(s, q)) != SQLITE_DONE)
            goto fail;
        sqlite3_finalize(q);
        q = NULL;
    }
    if ((rc = x_exec(s, "COMMIT")) != SQLITE_OK)
        goto fail;
    goto out;
fail:
    st = db_fail(s, err, rc, doing);
    rollback(s);
out:
    sqlite3_finalize(q);
    pthread_mutex_unlock(&s->lock);
    return st;
}

/* ---- load ------------------------------------------------------------------ */

static void copy_text(char *dst, size_t len, const col *c) {
    if (c->type == SQLITE_TEXT)
        snprintf(dst, len, "%.*s", (int)c->n, (const char *)c->p);
    else
        dst[0] = '\0';
}

/* Result of reading one model: EPLB_OK with rec filled (or with
 * rec->damaged set), or a failure of the load itself (SQLite, memory). */
static eplb_status load_window(eplb_store *s, eplb_model_record *rec, eplb_error *err) {
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    char doing[EPLB_MODEL_NAME_MAX + 48];
    snprintf(doing, sizeof doing, "loading the window of model %s", rec->model_id);
    int rc = x_prepare(s, windows_select_sql, &q);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(q, 1, rec->model_id, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = x_step(s, q);
    if (rc == SQLITE_DONE)
        goto out; /* no window saved yet */
    if (rc != SQLITE_ROW) {
        st = db_fail(s, err, rc, doing);
        goto out;
    }
    col c[WC_COUNT + 1];
    read_cols(q, 0, c, WC_COUNT + 1);
    char why[EPLB_ERROR_MSG_MAX - 64], bad[EPLB_ERROR_MSG_MAX - 96];
    const eplb_load_window *w = &rec->window;
    if (c[WC_COUNT].type != SQLITE_INTEGER ||
        (uint64_t)c[WC_COUNT].i != row_checksum(windows_tag, c, WC_COUNT)) {
        snprintf(why, sizeof why, "load window checksum mismatch (row edited or corrupted)");
    } else if (!check_window_cols(c, rec->model_id, w->num_layers, w->num_logical, w->capacity, bad, sizeof bad)) {
        snprintf(why, sizeof why, "load window: %s", bad);
    } else {
        size_t cells = (size_t)c[WC_COUNT_].i * w->num_layers * w->num_logical;
        int64_t *flat = eplb_malloc(cells ? cells * sizeof *flat : 1);
        if (!flat) {
            st = eplb_error_set(err, EPLB_ENOMEM, "store: out of memory loading the window of model %s",
                                rec->model_id);
            goto out;
        }
        unpack_i64(c[WC_RECORDS].p, flat, cells);
        why[0] = '\0';
        for (size_t i = 0; i < cells; i++)
            if (flat[i] < 0) {
                snprintf(why, sizeof why, "load window entry %zu is negative (%" PRId64 ")", i, flat[i]);
                break;
            }
        eplb_error e;
        eplb_status ist = why[0] ? EPLB_OK
                                 : eplb_load_window_import(&rec->window, flat, (uint32_t)c[WC_COUNT_].i,
                                                           (uint64_t)c[WC_PASSES].i, &e);
        eplb_free(flat);
        if (ist == EPLB_ENOMEM) {
            st = eplb_error_set(err, ist, "store: model %s: %s", rec->model_id, e.msg);
            goto out;
        }
        if (ist != EPLB_OK)
            snprintf(why, sizeof why, "load window: %s", e.msg);
        if (!why[0])
            goto out;
    }
    /* A damaged window damages its model: dropping it would silently lose
     * recorded passes and shift the next automatic rebalance. */
    snprintf(rec->damaged, sizeof rec->damaged, "store: model %s: %s", rec->model_id, why);
out:
    sqlite3_finalize(q);
    return st;
}

/* The model's pending rebalance, if it has one, into rec->pending (rec's
 * shape and placement are loaded and verified).  Same contract as
 * load_window: a row that fails sets rec->damaged; a pending rebalance
 * that is dropped or half-trusted would resume the wrong target. */
static eplb_status load_pending(eplb_store *s, eplb_model_record *rec, eplb_error *err) {
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    char doing[EPLB_MODEL_NAME_MAX + 64];
    snprintf(doing, sizeof doing, "loading the pending rebalance of model %s", rec->model_id);
    int rc = x_prepare(s, rebalances_select_sql, &q);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(q, 1, rec->model_id, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = x_step(s, q);
    if (rc == SQLITE_DONE)
        goto out; /* none pending */
    if (rc != SQLITE_ROW) {
        st = db_fail(s, err, rc, doing);
        goto out;
    }
    col c[RC_COUNT + 1];
    read_cols(q, 0, c, RC_COUNT + 1);
    char why[EPLB_ERROR_MSG_MAX - 64 - EPLB_MODEL_NAME_MAX], bad[sizeof why - 48];
    const eplb_model_shape *sh = &rec->shape;
    if (c[RC_COUNT].type != SQLITE_INTEGER ||
        (uint64_t)c[RC_COUNT].i != row_checksum(rebalances_tag, c, RC_COUNT)) {
        snprintf(why, sizeof why, "checksum mismatch (row edited or corrupted)");
    } else if (!check_rebalance_cols(c, rec->model_id, sh->num_layers, rec->placement.num_physical, bad,
                                     sizeof bad)) {
        snprintf(why, sizeof why, "%s", bad);
    } else {
        size_t cells = (size_t)sh->num_layers * rec->placement.num_physical;
        int32_t *phy2log = eplb_malloc(cells * sizeof *phy2log);
        if (!phy2log) {
            st = eplb_error_set(err, EPLB_ENOMEM, "store: out of memory loading the pending rebalance of model %s",
                                rec->model_id);
            goto out;
        }
        unpack_i32(c[RC_PHY2LOG].p, phy2log, cells);
        /* assign checks every entry and that every expert keeps a replica,
         * and derives logcnt and log2phy, as for the model's own map. */
        eplb_pending_rebalance *pr = &rec->pending;
        pr->target = (eplb_placement){ .num_layers = sh->num_layers, .num_logical = sh->num_logical };
        eplb_error e;
        eplb_status ast = eplb_placement_assign(&pr->target, rec->placement.num_physical, (uint32_t)c[RC_VALID].i,
                                                phy2log, &e);
        eplb_free(phy2log);
        if (ast == EPLB_ENOMEM) {
            st = eplb_error_set(err, ast, "store: model %s: %s", rec->model_id, e.msg);
            goto out;
        }
        if (ast == EPLB_OK) {
            pr->target.epoch = (uint64_t)c[RC_EPOCH].i;
            memcpy(pr->id, c[RC_ID].p, c[RC_ID].n); /* 1..EPLB_REBALANCE_ID_MAX bytes, checked */
            pr->id[c[RC_ID].n] = '\0';
            pr->layers_per_step = (uint32_t)c[RC_PER_STEP].i;
            pr->layers_done = (uint32_t)c[RC_DONE].i;
            pr->with_weights = c[RC_WEIGHTS].i != 0;
            pr->balancedness_before = bits_to_double(c[RC_BEFORE].i);
            pr->balancedness_after = bits_to_double(c[RC_AFTER].i);
            pr->execution = (uint32_t)c[RC_EXEC].i;
            pr->max_staging_bytes = (uint64_t)c[RC_STAGING].i;
            pr->expert_bytes = (uint64_t)c[RC_EXPERT_BYTES].i;
            goto out;
        }
        snprintf(why, sizeof why, "target map: %s", e.msg);
    }
    snprintf(rec->damaged, sizeof rec->damaged, "store: model %s: rebalances row: %s", rec->model_id, why);
out:
    sqlite3_finalize(q);
    return st;
}

/* One models row into rec.  EPLB_OK: rec is whole, or only model_id and
 * damaged are set; anything else fails the load. */
static eplb_status row_to_record(eplb_store *s, sqlite3_stmt *q, eplb_model_record *rec, eplb_error *err) {
    memset(rec, 0, sizeof *rec);
    col c[MC_COUNT + 1];
    read_cols(q, 0, c, MC_COUNT + 1);
    copy_text(rec->model_id, sizeof rec->model_id, &c[MC_MODEL_ID]);
    char why[EPLB_ERROR_MSG_MAX - 64];
    eplb_status st = EPLB_OK;
    if (c[MC_COUNT].type != SQLITE_INTEGER || (uint64_t)c[MC_COUNT].i != row_checksum(models_tag, c, MC_COUNT)) {
        snprintf(why, sizeof why, "checksum mismatch (row edited or corrupted)");
        goto damaged;
    }
    if (!check_model_cols(c, why, sizeof why))
        goto damaged;

    rec->role = (eplb_role)c[MC_ROLE].i;
    copy_text(rec->main_model_id, sizeof rec->main_model_id, &c[MC_MAIN]);
    copy_text(rec->architecture, sizeof rec->architecture, &c[MC_ARCH]);
    copy_text(rec->resolved_path, sizeof rec->resolved_path, &c[MC_PATH]);
    copy_text(rec->state_reason, sizeof rec->state_reason, &c[MC_REASON]);
    rec->state = (eplb_move_state)c[MC_STATE].i;
    eplb_model_shape *sh = &rec->shape;
    uint32_t *shape_cols[] = { &sh->num_layers, &sh->num_logical, &sh->num_physical, &sh->num_local,
                               &sh->num_redundant, &sh->num_shared, &sh->num_groups, &sh->ep_size,
                               &sh->num_nodes, &sh->window_size, &sh->step_interval };
    for (int k = 0; k < (int)(sizeof shape_cols / sizeof shape_cols[0]); k++)
        *shape_cols[k] = (uint32_t)c[MC_LAYERS + k].i; /* ranges checked */
    sh->auto_rebalance = c[MC_AUTO].i != 0;
    sh->defaults = cols_to_knobs(c);

    size_t cells = (size_t)sh->num_layers * sh->num_physical;
    int32_t *phy2log = eplb_malloc(cells * sizeof *phy2log);
    if (!phy2log) {
        st = eplb_error_set(err, EPLB_ENOMEM, "store: out of memory loading model %s", rec->model_id);
        goto fail;
    }
    unpack_i32(c[MC_PHY2LOG].p, phy2log, cells);
    rec->placement = (eplb_placement){ .num_layers = sh->num_layers, .num_logical = sh->num_logical };
    eplb_error e;
    st = eplb_placement_assign(&rec->placement, sh->num_physical, (uint32_t)c[MC_VALID].i, phy2log, &e);
    eplb_free(phy2log);
    if (st == EPLB_ENOMEM) {
        eplb_error_set(err, st, "store: model %s: %s", rec->model_id, e.msg);
        goto fail;
    }
    if (st != EPLB_OK) {
        st = EPLB_OK;
        snprintf(why, sizeof why, "stored map: %s", e.msg);
        goto damaged;
    }
    rec->placement.epoch = (uint64_t)c[MC_EPOCH].i;
    eplb_load_window_init(&rec->window, sh->num_layers, sh->num_logical, sh->window_size);
    if ((st = load_window(s, rec, err)) != EPLB_OK)
        goto fail;
    if (!rec->damaged[0] && (st = load_pending(s, rec, err)) != EPLB_OK)
        goto fail;
    if (!rec->damaged[0])
        return EPLB_OK;
    /* The window or the pending rebalance was damaged: keep only the id
     * and its reason. */
    char id[sizeof rec->model_id], reason[sizeof rec->damaged];
    memcpy(id, rec->model_id, sizeof id);
    memcpy(reason, rec->damaged, sizeof reason);
    eplb_placement_free(&rec->placement);
    eplb_placement_free(&rec->pending.target);
    eplb_load_window_free(&rec->window);
    memset(rec, 0, sizeof *rec);
    memcpy(rec->model_id, id, sizeof id);
    memcpy(rec->damaged, reason, sizeof reason);
    return EPLB_OK;
damaged:
    eplb_placement_free(&rec->placement);
    memset(rec, 0, sizeof *rec);
    copy_text(rec->model_id, sizeof rec->model_id, &c[MC_MODEL_ID]);
    snprintf(rec->damaged, sizeof rec->damaged, "store: model %s: %s", rec->model_id, why);
    return EPLB_OK;
fail:
    eplb_placement_free(&rec->placement);
    eplb_placement_free(&rec->pending.target);
    eplb_load_window_free(&rec->window);
    return st;
}

static eplb_status store_load_all(void *ctx,
                                  eplb_status (*each)(void *arg, eplb_model_record *rec, eplb_error *err),
                                  void *arg, eplb_error *err) {
    eplb_store *s = ctx;
    pthread_once(&sql_once, sql_init);
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    pthread_mutex_lock(&s->lock);
    int rc = x_prepare(s, models_select_sql, &q);
    while (rc == SQLITE_OK && (rc = x_step(s, q)) == SQLITE_ROW) {
        eplb_model_record rec;
        if ((st = row_to_record(s, q, &rec, err)) != EPLB_OK)
            goto out;
        if ((st = each(arg, &rec, err)) != EPLB_OK)
            goto out;
        rc = SQLITE_OK;
    }
    if (rc != SQLITE_DONE)
        st = db_fail(s, err, rc, "loading the models");
out:
    sqlite3_finalize(q);
    pthread_mutex_unlock(&s->lock);
    return st;
}

const eplb_store_ops eplb_store_sqlite_ops = {
    .save = store_save,
    .load_all = store_load_all,
    .remove = store_remove,
};
