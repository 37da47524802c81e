/* test_store_integrity.c -- schema 3 and what load_all trusts: the move
 * state and its reason survive a restart, a schema-1 file is migrated (to
 * 3) in one transaction, every row carries the documented checksum, and a row
 * that was edited, corrupted or holds an out-of-range value is handed over
 * as damaged (that model only) instead of being served or failing the
 * whole open. */
#include "store_test_util.h"

TestSuite(schema, .init = tdir_setup, .fini = tdir_teardown);
TestSuite(integrity, .init = tdir_setup, .fini = tdir_teardown);

static eplb_store *open_store(void) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(tdb, &s, &err), EPLB_OK, "%s", err.msg);
    return s;
}

/* ---- schema 4 (windows as in 2) ----------------------------------------------- */

Test(schema, checksum_is_the_documented_crc64_xz) {
    /* The helper is CRC-64/XZ (its standard check value)... */
    cr_assert_eq(~crc64_xz(~0ull, "123456789", 9), 0x995DC9BBDF1939FAull);
    /* ...and the store seals every row with it, over the documented
     * encoding (odd lengths exercise the tail of the sliced loop). */
    eplb_store *s = open_store();
    eplb_model_record a, b;
    rec_make(&a, "odd-length.name_1", 3, 5, 10, 2, 9);
    a.shape.num_groups = 5;
    rec_push(&a, 4, 100);
    rec_ds(&b, "ds");
    b.state = EPLB_MOVE_NEEDS_RELOAD;
    snprintf(b.state_reason, sizeof b.state_reason, "scatter of layer 1 failed");
    eplb_error err;
    cr_assert_eq(save(s, &a, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(save(s, &b, &err), EPLB_OK, "%s", err.msg);
    eplb_store_close(s);
    rec_free(&a);
    rec_free(&b);
    cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM models"), 2);
    cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM windows"), 1);
    cr_assert_eq(checksum_mismatches(tdb), 0);
    cr_assert_eq(sql_int(tdb, "PRAGMA user_version"), 4);
}

Test(schema, move_state_and_reason_survive_a_restart) {
    eplb_store *s = open_store();
    const eplb_move_state states[] = { EPLB_MOVE_IDLE, EPLB_MOVE_MOVING, EPLB_MOVE_NEEDS_RELOAD };
    const char *names[] = { "idle", "moving", "reload" };
    eplb_error err;
    for (int i = 0; i < 3; i++) {
        eplb_model_record r;
        rec_ds(&r, names[i]);
        r.state = states[i];
        if (states[i] == EPLB_MOVE_NEEDS_RELOAD)
            snprintf(r.state_reason, sizeof r.state_reason, "the shm object of rank 1 shrank to 4096 bytes");
        r.placement.epoch = 40 + (uint64_t)i;
        cr_assert_eq(save(s, &r, &err), EPLB_OK, "%s", err.msg);
        rec_free(&r);
    }
    eplb_store_close(s);

    loaded l;
    reload(tdb, &l);
    cr_assert_eq(l.n, 3);
    for (int i = 0; i < 3; i++) {
        eplb_model_record *r = find(&l, names[i]);
        cr_assert_not_null(r);
        cr_assert_str_empty(r->damaged, "%s", r->damaged);
        cr_assert_eq(r->state, states[i], "%s: state %d", names[i], (int)r->state);
        cr_assert_eq(r->placement.epoch, 40 + (uint64_t)i);
    }
    cr_assert_str_eq(find(&l, "reload")->state_reason, "the shm object of rank 1 shrank to 4096 bytes");
    cr_assert_str_empty(find(&l, "idle")->state_reason);
    loaded_free(&l);
}

Test(schema, states_that_last_one_call_are_never_stored) {
    eplb_store *s = open_store();
    eplb_model_record r;
    rec_ds(&r, "ds");
    eplb_error err;
    cr_assert_eq(save(s, &r, &err), EPLB_OK, "%s", err.msg);
    const eplb_move_state bad[] = { EPLB_MOVE_STAGED, EPLB_MOVE_COMMITTED, (eplb_move_state)7 };
    for (int i = 0; i < 3; i++) {
        r.state = bad[i];
        r.placement.epoch = 5;
        cr_assert_eq(save(s, &r, &err), EPLB_EINTERNAL, "state %d", (int)bad[i]);
        cr_assert_not_null(strstr(err.msg, "refusing to save model ds"), "%s", err.msg);
        cr_assert_not_null(strstr(err.msg, i < 2 ? "move state" : "state 7 is out of range"), "%s", err.msg);
    }
    rec_free(&r);
    loaded l;
    cr_assert_eq(load(s, &l, &err), EPLB_OK);
    cr_assert_eq(l.n, 1);
    cr_assert_eq(l.recs[0].state, EPLB_MOVE_IDLE);
    cr_assert_eq(l.recs[0].placement.epoch, 0);
    loaded_free(&l);
    eplb_store_close(s);
}

/* ---- schema 1 -> 3 ------------------------------------------------------------ */

/* What eplbd with schema 1 created (its DDL, verbatim). */
static const char *const v1_schema =
    "CREATE TABLE models ("
    "  model_id TEXT PRIMARY KEY, role INTEGER NOT NULL, main_model_id TEXT NOT NULL,"
    "  architecture TEXT NOT NULL, resolved_path TEXT NOT NULL,"
    "  num_layers INTEGER NOT NULL, num_logical INTEGER NOT NULL,"
    "  num_physical INTEGER NOT NULL, num_local INTEGER NOT NULL,"
    "  num_redundant INTEGER NOT NULL, num_shared INTEGER NOT NULL,"
    "  num_groups INTEGER NOT NULL, ep_size INTEGER NOT NULL,"
    "  num_nodes INTEGER NOT NULL, window_size INTEGER NOT NULL,"
    "  step_interval INTEGER NOT NULL, auto_rebalance INTEGER NOT NULL DEFAULT 0,"
    "  epoch INTEGER NOT NULL, placement_physical INTEGER NOT NULL,"
    "  num_valid_physical INTEGER NOT NULL, phy2log BLOB NOT NULL,"
    "  needs_weight_reload INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE windows (model_id TEXT PRIMARY KEY REFERENCES models(model_id),"
    "  passes INTEGER NOT NULL, count INTEGER NOT NULL, records BLOB NOT NULL);"
    "PRAGMA user_version = 1;";

/* The initial map of 2 layers x 6 slots over 4 experts, little-endian. */
#define V1_MAP "x'000000000100000002000000030000000000000001000000" \
               "000000000100000002000000030000000000000001000000'"

static void v1_insert(const char *id, long long epoch, int role, int reload) {
    char text[1200];
    snprintf(text, sizeof text,
             "INSERT INTO models VALUES ('%s', %d, '', 'DeepseekV3ForCausalLM', 'DeepseekV3ForCausalLM',"
             " 2, 4, 6, 3, 2, 0, 1, 2, 1, 7, 10, 1, %lld, 6, 6, " V1_MAP ", %d)",
             id, role, epoch, reload);
    sql(tdb, text);
}

static void make_v1_file(void) {
    sql(tdb, "PRAGMA journal_mode=WAL;");
    sql(tdb, v1_schema);
    v1_insert("a", 3, 0, 0);
    v1_insert("b", 8, 0, 1);
    /* a's window: 2 records of [2][4] int64s, 9 passes ever. */
    char text[2000] = "INSERT INTO windows VALUES ('a', 9, 2, x'";
    for (int i = 0; i < 16; i++) {
        char cell[20];
        snprintf(cell, sizeof cell, "%02x00000000000000", 10 + i);
        strcat(text, cell);
    }
    strcat(text, "')");
    sql(tdb, text);
}

Test(schema, v1_database_is_migrated_in_place) {
    make_v1_file();
    loaded l;
    reload(tdb, &l);
    cr_assert_eq(sql_int(tdb, "PRAGMA user_version"), 4);
    cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM rebalances"), 0, "schema 3's table, empty");
    cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM pragma_table_info('models') WHERE name = 'needs_weight_reload'"), 0);
    cr_assert_eq(checksum_mismatches(tdb), 0, "migration seals every row with the documented checksum");
    cr_assert_eq(l.n, 2);
    eplb_model_record *a = find(&l, "a"), *b = find(&l, "b");
    cr_assert(a && b);
    cr_assert_str_empty(a->damaged, "%s", a->damaged);
    cr_assert_str_empty(b->damaged, "%s", b->damaged);
    cr_assert_eq(a->state, EPLB_MOVE_IDLE);
    cr_assert_str_empty(a->state_reason);
    cr_assert_eq(a->placement.epoch, 3);
    cr_assert(a->shape.auto_rebalance);
    cr_assert_eq(a->window.count, 2);
    cr_assert_eq(a->window.passes, 9);
    cr_assert_eq(a->window.sum[0], 10 + 18); /* records 0 and 1 of cell 0: 10 and 18 */
    cr_assert_eq(b->state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_not_null(strstr(b->state_reason, "upgraded from schema 1"), "%s", b->state_reason);
    cr_assert_str_empty(a->pending.id);
    cr_assert_null(a->pending.target.phy2log);
    cr_assert_eq(b->placement.epoch, 8);
    const int32_t want[] = { 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(b->placement.phy2log, want, sizeof want);
    loaded_free(&l);

    /* Opening again changes nothing; an edit is now caught. */
    reload(tdb, &l);
    cr_assert_eq(l.n, 2);
    cr_assert_eq(find(&l, "b")->state, EPLB_MOVE_NEEDS_RELOAD);
    loaded_free(&l);
    sql(tdb, "UPDATE models SET epoch = 4 WHERE model_id = 'a'");
    reload(tdb, &l);
    cr_assert_str_eq(find(&l, "a")->damaged, "store: model a: checksum mismatch (row edited or corrupted)");
    loaded_free(&l);
}

Test(schema, v1_rows_out_of_range_are_damaged_after_migration) {
    make_v1_file();
    v1_insert("neg", -5, 0, 0); /* was served as epoch 18446744073709551611 */
    v1_insert("role", 1, 2, 0);
    loaded l;
    reload(tdb, &l);
    cr_assert_eq(l.n, 4);
    cr_assert_str_eq(find(&l, "neg")->damaged,
                     "store: model neg: epoch -5 is out of range [0, 9223372036854775807]");
    cr_assert_eq(find(&l, "neg")->placement.phy2log, NULL);
    cr_assert_eq(find(&l, "neg")->placement.epoch, 0);
    cr_assert_str_eq(find(&l, "role")->damaged, "store: model role: role 2 is out of range [0, 1]");
    cr_assert_str_empty(find(&l, "a")->damaged);
    loaded_free(&l);
}

Test(schema, migration_is_all_or_nothing) {
    make_v1_file();
    int failed = 0;
    for (long n = 1; n < 200; n++) {
        eplb_store *s;
        eplb_error err;
        eplb_store_set_fault(NULL, n, SQLITE_FULL, 0); /* the disk fills up mid-migration */
        eplb_status st = eplb_store_open(tdb, &s, &err);
        if (st == EPLB_OK) {
            eplb_store_close(s);
            break;
        }
        failed++;
        cr_assert_null(s);
        cr_assert_eq(st, EPLB_ENOSPACE, "fault %ld: %s", n, err.msg);
        cr_assert_not_null(strstr(err.msg, "injected"), "%s", err.msg);
        /* Still the schema-1 file, whole. */
        cr_assert_eq(sql_int(tdb, "PRAGMA user_version"), 1, "fault %ld", n);
        cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM models WHERE needs_weight_reload = 1"), 1);
        cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM windows"), 1);
        cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM sqlite_master WHERE name LIKE '%_v2'"), 0);
        cr_assert_eq(sql_int(tdb, "SELECT count(*) FROM sqlite_master WHERE name = 'rebalances'"), 0, "fault %ld", n);
    }
    cr_assert_gt(failed, 10, "every SQLite call of an open with a migration is a fault point (%d)", failed);
    cr_assert_eq(sql_int(tdb, "PRAGMA user_version"), 4);
    loaded l;
    reload(tdb, &l);
    cr_assert_eq(l.n, 2);
    cr_assert_eq(find(&l, "b")->state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_eq(find(&l, "a")->window.count, 2);
    loaded_free(&l);
}

Test(schema, newer_schema_is_refused) {
    eplb_store_close(open_store());
    sql(tdb, "PRAGMA user_version = 5");
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(tdb, &s, &err), EPLB_EDATALOSS);
    cr_assert_null(s);
    cr_assert_not_null(strstr(err.msg, "schema version 5, this eplbd knows up to 4"), "%s", err.msg);
}

Test(schema, a_file_that_is_not_a_database_is_data_loss) {
    FILE *f = fopen(tdb, "w");
    cr_assert_not_null(f);
    for (int i = 0; i < 512; i++)
        fputs("not a database, ", f);
    fclose(f);
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(tdb, &s, &err), EPLB_EDATALOSS, "%s", err.msg);
    cr_assert_null(s);
    cr_assert_not_null(strstr(err.msg, tdb), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "not a database"), "%s", err.msg);
}

/* ---- integrity ---------------------------------------------------------------- */

/* Save "ds" (a window of 2 records) and "other" into a fresh file. */
static void save_two(void) {
    tdir_clean();
    eplb_store *s = open_store();
    eplb_model_record ds, other;
    rec_ds(&ds, "ds");
    rec_push(&ds, 2, 1);
    rec_ds(&other, "other");
    eplb_error err;
    cr_assert_eq(save(s, &ds, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(save(s, &other, &err), EPLB_OK, "%s", err.msg);
    rec_free(&ds);
    rec_free(&other);
    eplb_store_close(s);
}

/* After an edit: the open and load succeed, "other" is whole, and "ds" is
 * handed over with only its id and a reason containing want. */
static void expect_damaged(const char *what, const char *want) {
    loaded l;
    reload(tdb, &l);
    cr_assert_eq(l.n, 2, "%s", what);
    eplb_model_record *ds = find(&l, "ds"), *other = find(&l, "other");
    cr_assert(ds && other, "%s", what);
    cr_assert_str_empty(other->damaged, "%s: %s", what, other->damaged);
    cr_assert_not_null(other->placement.phy2log);
    cr_assert_not_null(strstr(ds->damaged, want), "%s: got \"%s\", want \"%s\"", what, ds->damaged, want);
    cr_assert_eq(strncmp(ds->damaged, "store: model ds: ", 17), 0, "%s: %s", what, ds->damaged);
    cr_assert_null(ds->placement.phy2log, "%s", what);
    cr_assert_eq(ds->placement.epoch, 0, "%s", what);
    cr_assert_eq(ds->shape.num_layers, 0, "%s", what);
    cr_assert_null(ds->window.records, "%s", what);
    cr_assert_str_empty(ds->architecture, "%s", what);
    loaded_free(&l);
}

/* Swap two entries of ds's map in place: still a valid map of the shape. */
static void swap_map_entries(void) {
    sqlite3 *db;
    sqlite3_stmt *q;
    cr_assert_eq(sqlite3_open(tdb, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_prepare_v2(db, "SELECT phy2log FROM models WHERE model_id = 'ds'", -1, &q, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(q), SQLITE_ROW);
    unsigned char map[48];
    cr_assert_eq(sqlite3_column_bytes(q, 0), 48);
    memcpy(map, sqlite3_column_blob(q, 0), 48);
    sqlite3_finalize(q);
    unsigned char t[4];
    memcpy(t, map, 4);
    memcpy(map, map + 4, 4);
    memcpy(map + 4, t, 4);
    cr_assert_eq(sqlite3_prepare_v2(db, "UPDATE models SET phy2log = ? WHERE model_id = 'ds'", -1, &q, NULL), SQLITE_OK);
    sqlite3_bind_blob(q, 1, map, 48, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(q), SQLITE_DONE);
    sqlite3_finalize(q);
    sqlite3_close(db);
}

Test(integrity, in_range_map_edit_is_damaged_not_served) {
    save_two();
    swap_map_entries();
    expect_damaged("swapped map", "checksum mismatch (row edited or corrupted)");
    loaded l;
    reload(tdb, &l);
    cr_assert_str_eq(find(&l, "ds")->damaged, "store: model ds: checksum mismatch (row edited or corrupted)");
    loaded_free(&l);
}

Test(integrity, an_edit_of_any_column_is_caught) {
    static const char *const edits[] = {
        "UPDATE models SET epoch = epoch + 1 WHERE model_id = 'ds'",
        "UPDATE models SET state = 4 WHERE model_id = 'ds'",
        "UPDATE models SET state_reason = 'x' WHERE model_id = 'ds'",
        "UPDATE models SET architecture = 'MixtralForCausalLM' WHERE model_id = 'ds'",
        "UPDATE models SET resolved_path = 'X.language_model' WHERE model_id = 'ds'",
        "UPDATE models SET num_shared = 2 WHERE model_id = 'ds'",
        "UPDATE models SET auto_rebalance = 1 WHERE model_id = 'ds'",
        "UPDATE models SET step_interval = 11 WHERE model_id = 'ds'",
        "UPDATE models SET window_size = 8 WHERE model_id = 'ds'",
        "UPDATE models SET num_valid_physical = 5 WHERE model_id = 'ds'",
        "UPDATE models SET checksum = checksum + 1 WHERE model_id = 'ds'",
        "UPDATE models SET checksum = 'abc' WHERE model_id = 'ds'",
        /* Two rows swapping identities. */
        "UPDATE models SET model_id = 'tmp' WHERE model_id = 'other';"
        "UPDATE models SET model_id = 'other' WHERE model_id = 'ds';"
        "UPDATE models SET model_id = 'ds' WHERE model_id = 'tmp';",
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        save_two();
        sql(tdb, edits[i]);
        loaded l;
        reload(tdb, &l);
        cr_assert_eq(l.n, 2);
        cr_assert_str_eq(find(&l, "ds")->damaged, "store: model ds: checksum mismatch (row edited or corrupted)",
                         "%s: %s", edits[i], find(&l, "ds")->damaged);
        loaded_free(&l);
    }
}

Test(integrity, a_damaged_window_damages_its_model) {
    static const char *const edits[] = {
        "UPDATE windows SET records = CAST(x'05' || substr(records, 2) AS BLOB) WHERE model_id = 'ds'",
        "UPDATE windows SET passes = passes + 1 WHERE model_id = 'ds'",
        "UPDATE windows SET count = 1, records = substr(records, 1, 64) WHERE model_id = 'ds'",
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        save_two();
        sql(tdb, edits[i]);
        expect_damaged(edits[i], "load window checksum mismatch (row edited or corrupted)");
    }
}

/* Rows that a writer knowing the checksum made (resealed after the edit):
 * what is left to catch them is the range checks. */
Test(integrity, out_of_range_values_are_damaged_even_with_a_valid_checksum) {
    static const struct { const char *sql, *want; } cases[] = {
        { "UPDATE models SET epoch = -5", "epoch -5 is out of range [0, 9223372036854775807]" },
        { "UPDATE models SET role = 2", "role 2 is out of range [0, 1]" },
        { "UPDATE models SET role = 1", "a speculator whose main_model_id is empty" },
        { "UPDATE models SET role = 1, main_model_id = 'ds'", "a speculator of itself" },
        { "UPDATE models SET main_model_id = 'other'", "a main model with main_model_id \"other\"" },
        { "UPDATE models SET state = 1", "move state 1 (STAGED) is never stored" },
        { "UPDATE models SET state = 3", "move state 3 (COMMITTED) is never stored" },
        { "UPDATE models SET state = 9", "state 9 is out of range [0, 4]" },
        { "UPDATE models SET state = -1", "state -1 is out of range [0, 4]" },
        { "UPDATE models SET num_local = 2", "num_local 2 x ep_size 2 != num_physical 6" },
        { "UPDATE models SET ep_size = 0", "ep_size 0 is out of range [1, 4294967295]" },
        { "UPDATE models SET num_nodes = 2, ep_size = 1, num_local = 6", "ep_size 1 is not a multiple of num_nodes 2" },
        { "UPDATE models SET step_interval = 0", "step_interval 0 is out of range" },
        { "UPDATE models SET window_size = 0", "window_size 0 is out of range" },
        { "UPDATE models SET num_groups = 3", "num_logical 4 is not a multiple of num_groups 3" },
        { "UPDATE models SET num_groups = 0", "num_groups 0 is out of range" },
        { "UPDATE models SET num_redundant = 5", "num_redundant 5 != num_physical 6 - num_logical 4" },
        { "UPDATE models SET num_layers = 4294967296", "num_layers 4294967296 is out of range [1, 4294967295]" },
        { "UPDATE models SET num_layers = 0", "num_layers 0 is out of range" },
        { "UPDATE models SET num_logical = 7", "num_physical 6 < num_logical 7" },
        { "UPDATE models SET num_valid_physical = 0", "num_valid_physical 0 is out of range [1, 6]" },
        { "UPDATE models SET num_valid_physical = 7", "num_valid_physical 7 is out of range [1, 6]" },
        { "UPDATE models SET placement_physical = 5", "placement_physical 5 != num_physical 6" },
        { "UPDATE models SET auto_rebalance = 2", "auto_rebalance 2 is out of range [0, 1]" },
        { "UPDATE models SET epoch = 'x'", "column epoch holds TEXT, not INTEGER" },
        { "UPDATE models SET epoch = 1.5", "column epoch holds REAL, not INTEGER" },
        { "UPDATE models SET architecture = x'41'", "column architecture holds BLOB, not TEXT" },
        { "UPDATE models SET architecture = ''", "architecture is 0 bytes long" },
        { "UPDATE models SET resolved_path = 'a' || char(0) || 'b'", "column resolved_path contains a NUL byte" },
        { "UPDATE models SET architecture = printf('%.200c', 'A')", "architecture is 200 bytes long, want 1 to 128" },
        { "UPDATE models SET phy2log = x'0000'", "a 2-byte map for 2 layers x 6 slots" },
        { "UPDATE models SET phy2log = CAST(x'09' || substr(phy2log, 2) AS BLOB)",
          "stored map: physical_to_logical[layer 0][slot 0] = 9" },
        /* layer 0 becomes [1 1 2 3 1 1]: expert 0 has no slot */
        { "UPDATE models SET phy2log = CAST(x'01000000' || substr(phy2log, 5, 12) || x'01000000' ||"
          " substr(phy2log, 21) AS BLOB)", "stored map: logical expert 0 has no replica in layer 0" },
        { "UPDATE windows SET count = 9", "count 9 is out of range [0, 7]" },
        { "UPDATE windows SET passes = 1", "passes 1 is out of range [2, " },
        { "UPDATE windows SET count = 3, passes = 5", "a 128-byte window for 3 records of 2 layers x 4 experts" },
        { "UPDATE windows SET records = CAST(x'ffffffffffffffff' || substr(records, 9) AS BLOB)",
          "load window entry 0 is negative (-1)" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        save_two();
        char text[600];
        snprintf(text, sizeof text, "%s WHERE model_id = 'ds'", cases[i].sql);
        sql(tdb, text);
        reseal(tdb);
        expect_damaged(text, cases[i].want);
    }
}

Test(integrity, a_window_row_moved_to_another_model_is_damaged) {
    save_two();
    /* ds's window row relabelled as other's, checksum and all. */
    sql(tdb, "DELETE FROM windows WHERE model_id = 'other';"
             "UPDATE windows SET model_id = 'other' WHERE model_id = 'ds'");
    loaded l;
    reload(tdb, &l);
    cr_assert_str_eq(find(&l, "other")->damaged,
                     "store: model other: load window checksum mismatch (row edited or corrupted)");
    cr_assert_str_empty(find(&l, "ds")->damaged);
    cr_assert_eq(find(&l, "ds")->window.count, 0);
    loaded_free(&l);
}

Test(integrity, a_damaged_row_does_not_stop_the_others) {
    save_two();
    /* A row SQLite itself still reads, but nothing of which makes sense. */
    sql(tdb, "UPDATE models SET role = 'main', epoch = 'soon', phy2log = 'text' WHERE model_id = 'ds'");
    expect_damaged("garbage row", "checksum mismatch");
    reseal(tdb);
    expect_damaged("garbage row, resealed", "column role holds TEXT, not INTEGER");
}
