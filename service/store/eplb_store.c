/* eplb_store.c -- the SQLite implementation of eplb_store_ops.
 *
 * One connection guarded by a mutex: writes are rare (a registration, a
 * rebalance commit) and each is a short transaction, so a single writer is
 * simpler than a pool and never contends in practice. */
#include "eplb_store.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STORE_SCHEMA_VERSION 1

struct eplb_store {
    sqlite3 *db;
    pthread_mutex_t lock; /* one statement sequence at a time */
};

static const char *const schema_sql =
    "CREATE TABLE IF NOT EXISTS models ("
    "  model_id TEXT PRIMARY KEY,"
    "  role INTEGER NOT NULL,"
    "  main_model_id TEXT NOT NULL,"
    "  architecture TEXT NOT NULL,"
    "  resolved_path TEXT NOT NULL,"
    "  num_layers INTEGER NOT NULL, num_logical INTEGER NOT NULL,"
    "  num_physical INTEGER NOT NULL, num_local INTEGER NOT NULL,"
    "  num_redundant INTEGER NOT NULL, num_shared INTEGER NOT NULL,"
    "  num_groups INTEGER NOT NULL, ep_size INTEGER NOT NULL,"
    "  num_nodes INTEGER NOT NULL, window_size INTEGER NOT NULL,"
    "  step_interval INTEGER NOT NULL,"
    "  auto_rebalance INTEGER NOT NULL DEFAULT 0,"
    "  epoch INTEGER NOT NULL,"
    "  placement_physical INTEGER NOT NULL,"
    "  num_valid_physical INTEGER NOT NULL,"
    "  phy2log BLOB NOT NULL,"
    "  needs_weight_reload INTEGER NOT NULL DEFAULT 0"
    ");"
    /* The load window, oldest record first: [count][num_layers][num_logical]
     * little-endian int64s, and the number of passes ever counted. */
    "CREATE TABLE IF NOT EXISTS windows ("
    "  model_id TEXT PRIMARY KEY REFERENCES models(model_id),"
    "  passes INTEGER NOT NULL,"
    "  count INTEGER NOT NULL,"
    "  records BLOB NOT NULL"
    ");";

static eplb_status db_error(sqlite3 *db, eplb_error *err, const char *what) {
    int code = sqlite3_errcode(db);
    eplb_status st = (code == SQLITE_BUSY || code == SQLITE_LOCKED) ? EPLB_EUNAVAILABLE
                     : (code == SQLITE_CORRUPT || code == SQLITE_NOTADB) ? EPLB_EDATALOSS
                     : EPLB_EINTERNAL;
    return eplb_error_set(err, st, "store: %s: %s", what, sqlite3_errmsg(db));
}

static eplb_status exec(sqlite3 *db, const char *sql, eplb_error *err) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        eplb_status st = eplb_error_set(err, EPLB_EINTERNAL, "store: %s: %s", sql, msg ? msg : "?");
        sqlite3_free(msg);
        return st;
    }
    return EPLB_OK;
}

eplb_status eplb_store_open(const char *path, eplb_store **out, eplb_error *err) {
    *out = NULL;
    eplb_store *s = calloc(1, sizeof *s);
    if (!s)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                        NULL) != SQLITE_OK) {
        eplb_status st = eplb_error_set(err, EPLB_EUNAVAILABLE, "store: cannot open %s: %s", path,
                                        s->db ? sqlite3_errmsg(s->db) : "out of memory");
        sqlite3_close(s->db);
        free(s);
        return st;
    }
    sqlite3_busy_timeout(s->db, 5000);
    eplb_status st = exec(s->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", err);
    if (st == EPLB_OK)
        st = exec(s->db, schema_sql, err);
    if (st == EPLB_OK) {
        sqlite3_stmt *q;
        int version = -1;
        if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &q, NULL) == SQLITE_OK) {
            if (sqlite3_step(q) == SQLITE_ROW)
                version = sqlite3_column_int(q, 0);
            sqlite3_finalize(q);
        }
        if (version == 0)
            st = exec(s->db, "PRAGMA user_version = 1", err);
        else if (version != STORE_SCHEMA_VERSION)
            st = eplb_error_set(err, EPLB_EDATALOSS, "store: %s has schema version %d, this eplbd knows %d",
                                path, version, STORE_SCHEMA_VERSION);
    }
    if (st != EPLB_OK) {
        sqlite3_close(s->db);
        free(s);
        return st;
    }
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return EPLB_OK;
}

void eplb_store_close(eplb_store *s) {
    if (!s)
        return;
    sqlite3_close(s->db);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* phy2log travels as little-endian int32s so a database file moves between
 * machines. */
static unsigned char *pack_i32(const int32_t *v, size_t n) {
    unsigned char *b = malloc(n ? n * 4 : 1);
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
    unsigned char *b = malloc(n ? n * 8 : 1);
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
        v[i] = (int32_t)((uint32_t)b[4 * i] | (uint32_t)b[4 * i + 1] << 8 |
                         (uint32_t)b[4 * i + 2] << 16 | (uint32_t)b[4 * i + 3] << 24);
}

static uint32_t col_u32(sqlite3_stmt *q, int i) {
    sqlite3_int64 v = sqlite3_column_int64(q, i);
    return v < 0 || v > UINT32_MAX ? 0 : (uint32_t)v;
}

/* Inside store_save's transaction. */
static eplb_status save_window(eplb_store *s, const eplb_model_record *rec, eplb_error *err) {
    const eplb_load_window *w = &rec->window;
    size_t cells = (size_t)w->count * w->num_layers * w->num_logical;
    int64_t *flat = malloc(cells ? cells * sizeof *flat : 1);
    unsigned char *blob = flat ? (eplb_load_window_export(w, flat), pack_i64(flat, cells)) : NULL;
    free(flat);
    if (!blob)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory saving the load window");
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    if (sqlite3_prepare_v2(s->db, "INSERT OR REPLACE INTO windows (model_id, passes, count, records) VALUES (?,?,?,?)",
                           -1, &q, NULL) != SQLITE_OK) {
        st = db_error(s->db, err, "prepare window");
    } else {
        sqlite3_bind_text(q, 1, rec->model_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 2, (sqlite3_int64)w->passes);
        sqlite3_bind_int64(q, 3, w->count);
        sqlite3_bind_blob64(q, 4, blob, (sqlite3_uint64)cells * 8, SQLITE_STATIC);
        if (sqlite3_step(q) != SQLITE_DONE)
            st = db_error(s->db, err, "save window");
    }
    sqlite3_finalize(q);
    free(blob);
    return st;
}

/* Read a model's window, if any, into rec->window (already initialised). */
static eplb_status load_window(eplb_store *s, eplb_model_record *rec, eplb_error *err) {
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    if (sqlite3_prepare_v2(s->db, "SELECT passes, count, records FROM windows WHERE model_id = ?", -1, &q,
                           NULL) != SQLITE_OK)
        return db_error(s->db, err, "prepare window load");
    sqlite3_bind_text(q, 1, rec->model_id, -1, SQLITE_STATIC);
    if (sqlite3_step(q) == SQLITE_ROW) {
        uint64_t passes = (uint64_t)sqlite3_column_int64(q, 0);
        uint32_t count = col_u32(q, 1);
        const void *blob = sqlite3_column_blob(q, 2);
        size_t bytes = (size_t)sqlite3_column_bytes(q, 2);
        size_t cells = (size_t)count * rec->window.num_layers * rec->window.num_logical;
        if (bytes != cells * 8) {
            st = eplb_error_set(err, EPLB_EDATALOSS, "store: model %s has a %zu-byte window for %u records",
                                rec->model_id, bytes, count);
        } else {
            int64_t *flat = malloc(cells ? cells * sizeof *flat : 1);
            if (!flat) {
                st = eplb_error_set(err, EPLB_ENOMEM, "out of memory loading the load window");
            } else {
                unpack_i64(blob, flat, cells);
                st = eplb_load_window_import(&rec->window, flat, count, passes, err);
                free(flat);
            }
        }
    }
    sqlite3_finalize(q);
    return st;
}

static eplb_status store_save(void *ctx, const eplb_model_record *rec, eplb_error *err) {
    eplb_store *s = ctx;
    const eplb_placement *p = &rec->placement;
    size_t cells = (size_t)p->num_layers * p->num_physical;
    unsigned char *blob = pack_i32(p->phy2log, cells);
    if (!blob)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");

    static const char *const sql =
        "INSERT OR REPLACE INTO models (model_id, role, main_model_id, architecture, resolved_path,"
        " num_layers, num_logical, num_physical, num_local, num_redundant, num_shared, num_groups,"
        " ep_size, num_nodes, window_size, step_interval, epoch, placement_physical,"
        " num_valid_physical, phy2log, needs_weight_reload, auto_rebalance)"
        " VALUES (?,?,?,?,?, ?,?,?,?,?,?,?, ?,?,?,?,?,?, ?,?,?,?)";
    eplb_status st = EPLB_OK;
    sqlite3_stmt *q = NULL;
    pthread_mutex_lock(&s->lock);
    if (sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        st = db_error(s->db, err, "begin");
        goto out;
    }
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK) {
        st = db_error(s->db, err, "prepare save");
        goto rollback;
    }
    const eplb_model_shape *sh = &rec->shape;
    int i = 1;
    sqlite3_bind_text(q, i++, rec->model_id, -1, SQLITE_STATIC);
    sqlite3_bind_int(q, i++, (int)rec->role);
    sqlite3_bind_text(q, i++, rec->main_model_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, i++, rec->architecture, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, i++, rec->resolved_path, -1, SQLITE_STATIC);
    const uint32_t shape_cols[] = { sh->num_layers, sh->num_logical, sh->num_physical, sh->num_local,
                                    sh->num_redundant, sh->num_shared, sh->num_groups, sh->ep_size,
                                    sh->num_nodes, sh->window_size, sh->step_interval };
    for (size_t k = 0; k < sizeof shape_cols / sizeof shape_cols[0]; k++)
        sqlite3_bind_int64(q, i++, shape_cols[k]);
    sqlite3_bind_int64(q, i++, (sqlite3_int64)p->epoch);
    sqlite3_bind_int64(q, i++, p->num_physical);
    sqlite3_bind_int64(q, i++, p->num_valid_physical);
    sqlite3_bind_blob(q, i++, blob, (int)(cells * 4), SQLITE_STATIC);
    sqlite3_bind_int(q, i++, rec->needs_weight_reload);
    sqlite3_bind_int(q, i++, rec->shape.auto_rebalance);
    if (sqlite3_step(q) != SQLITE_DONE) {
        st = db_error(s->db, err, "save model");
        goto rollback;
    }
    if (rec->window.dirty && (st = save_window(s, rec, err)) != EPLB_OK)
        goto rollback;
    if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        st = db_error(s->db, err, "commit");
        goto rollback;
    }
    goto out;
rollback:
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
out:
    sqlite3_finalize(q);
    pthread_mutex_unlock(&s->lock);
    free(blob);
    return st;
}


static void col_text(sqlite3_stmt *q, int i, char *dst, size_t len) {
    const unsigned char *t = sqlite3_column_text(q, i);
    snprintf(dst, len, "%s", t ? (const char *)t : "");
}

/* Build a record from one row; rejects rows whose blob does not match
 * their shape (EPLB_EDATALOSS) rather than serve a wrong map. */
static eplb_status row_to_record(sqlite3_stmt *q, eplb_model_record *rec, eplb_error *err) {
    memset(rec, 0, sizeof *rec);
    int i = 0;
    col_text(q, i++, rec->model_id, sizeof rec->model_id);
    rec->role = (eplb_role)sqlite3_column_int(q, i++);
    col_text(q, i++, rec->main_model_id, sizeof rec->main_model_id);
    col_text(q, i++, rec->architecture, sizeof rec->architecture);
    col_text(q, i++, rec->resolved_path, sizeof rec->resolved_path);
    eplb_model_shape *sh = &rec->shape;
    uint32_t *shape_cols[] = { &sh->num_layers, &sh->num_logical, &sh->num_physical, &sh->num_local,
                               &sh->num_redundant, &sh->num_shared, &sh->num_groups, &sh->ep_size,
                               &sh->num_nodes, &sh->window_size, &sh->step_interval };
    for (size_t k = 0; k < sizeof shape_cols / sizeof shape_cols[0]; k++)
        *shape_cols[k] = col_u32(q, i++);
    uint64_t epoch = (uint64_t)sqlite3_column_int64(q, i++);
    uint32_t num_physical = col_u32(q, i++);
    uint32_t num_valid = col_u32(q, i++);
    const void *blob = sqlite3_column_blob(q, i);
    size_t bytes = (size_t)sqlite3_column_bytes(q, i++);
    rec->needs_weight_reload = sqlite3_column_int(q, i++) != 0;
    sh->auto_rebalance = sqlite3_column_int(q, i++) != 0;

    /* A row is trusted only as far as it is consistent: a zero divisor or
     * a shape that disagrees with its map would crash or mislead later. */
    if (sh->num_layers == 0 || sh->num_logical == 0 || sh->ep_size == 0 || sh->num_groups == 0 ||
        sh->num_nodes == 0 || sh->window_size == 0 || sh->step_interval == 0 ||
        sh->num_physical != num_physical || num_physical % sh->ep_size != 0 || num_valid > num_physical)
        return eplb_error_set(err, EPLB_EDATALOSS, "store: model %s has an inconsistent shape", rec->model_id);
    size_t cells = (size_t)sh->num_layers * num_physical;
    if (cells == 0 || bytes != cells * 4)
        return eplb_error_set(err, EPLB_EDATALOSS,
                              "store: model %s has a %zu-byte map for %u layers x %u slots",
                              rec->model_id, bytes, sh->num_layers, num_physical);
    int32_t *phy2log = malloc(cells * sizeof *phy2log);
    if (!phy2log)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory");
    unpack_i32(blob, phy2log, cells);
    eplb_status st = eplb_placement_init(&rec->placement, sh->num_layers, sh->num_logical,
                                         sh->num_logical, err);
    if (st == EPLB_OK)
        st = eplb_placement_assign(&rec->placement, num_physical, num_valid, phy2log, err);
    free(phy2log);
    if (st != EPLB_OK) {
        char why[EPLB_ERROR_MSG_MAX];
        snprintf(why, sizeof why, "%s", err ? err->msg : "invalid map");
        eplb_placement_free(&rec->placement);
        return eplb_error_set(err, EPLB_EDATALOSS, "store: model %s: %s", rec->model_id, why);
    }
    rec->placement.epoch = epoch;
    eplb_load_window_init(&rec->window, sh->num_layers, sh->num_logical, sh->window_size);
    return EPLB_OK;
}

static eplb_status store_load_all(void *ctx,
                                  eplb_status (*each)(void *arg, eplb_model_record *rec, eplb_error *err),
                                  void *arg, eplb_error *err) {
    eplb_store *s = ctx;
    sqlite3_stmt *q = NULL;
    eplb_status st = EPLB_OK;
    pthread_mutex_lock(&s->lock);
    if (sqlite3_prepare_v2(s->db,
                           "SELECT model_id, role, main_model_id, architecture, resolved_path,"
                           " num_layers, num_logical, num_physical, num_local, num_redundant, num_shared,"
                           " num_groups, ep_size, num_nodes, window_size, step_interval, epoch,"
                           " placement_physical, num_valid_physical, phy2log, needs_weight_reload, auto_rebalance"
                           " FROM models ORDER BY model_id",
                           -1, &q, NULL) != SQLITE_OK) {
        st = db_error(s->db, err, "prepare load");
        goto out;
    }
    int rc;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        eplb_model_record rec;
        st = row_to_record(q, &rec, err);
        if (st != EPLB_OK)
            goto out;
        if ((st = load_window(s, &rec, err)) != EPLB_OK) {
            eplb_placement_free(&rec.placement);
            eplb_load_window_free(&rec.window);
            goto out;
        }
        st = each(arg, &rec, err);
        if (st != EPLB_OK)
            goto out;
    }
    if (rc != SQLITE_DONE)
        st = db_error(s->db, err, "load models");
out:
    sqlite3_finalize(q);
    pthread_mutex_unlock(&s->lock);
    return st;
}

const eplb_store_ops eplb_store_sqlite_ops = {
    .save = store_save,
    .load_all = store_load_all,
};
