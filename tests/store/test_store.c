/* test_store.c -- the SQLite store: a registry reopened on the same file
 * finds its models; a record whose map does not match its shape is refused
 * as DATA_LOSS rather than served. */
#include <criterion/criterion.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eplb_registry.h"
#include "eplb_store.h"

static char path[256];

static void setup(void) {
    snprintf(path, sizeof path, "/tmp/eplb-test-store-%d.db", (int)getpid());
    unlink(path);
}

static void teardown(void) {
    char extra[300];
    unlink(path);
    snprintf(extra, sizeof extra, "%s-wal", path);
    unlink(extra);
    snprintf(extra, sizeof extra, "%s-shm", path);
    unlink(extra);
}

TestSuite(store, .init = setup, .fini = teardown);

static eplb_handle lm = { .architecture = "DeepseekV3ForCausalLM", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                          .moe = { .num_moe_layers = 2, .num_logical_experts = 4, .num_physical_experts = 6,
                                   .num_local_physical_experts = 3, .num_redundant_experts = 2 } };

static void open_registry(eplb_store **s, eplb_registry **r) {
    eplb_error err;
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_store_open(path, s, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_open(&eplb_store_sqlite_ops, *s, &lim, r, &err), EPLB_OK, "%s", err.msg);
}

Test(store, registry_survives_reopen) {
    eplb_store *s;
    eplb_registry *r;
    open_registry(&s, &r);
    eplb_register_request req = { .model_name = "ds", .model = &lm, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 2, .window_size = 7 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(r, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    eplb_placement_free(&res.placement);
    eplb_registry_close(r);
    eplb_store_close(s);

    open_registry(&s, &r);
    cr_assert_eq(eplb_registry_count(r), 1);
    eplb_placement p;
    cr_assert_eq(eplb_registry_get_placement(r, "ds", &p, NULL, NULL), EPLB_OK);
    const int32_t want[] = { 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(p.phy2log, want, sizeof want);
    cr_assert_eq(p.epoch, 0);
    eplb_placement_free(&p);
    /* Registering again after the restart is idempotent: the shape was kept. */
    cr_assert_eq(eplb_registry_register(r, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    cr_assert_not_null(strstr(res.reason, "already registered"));
    eplb_placement_free(&res.placement);
    eplb_registry_close(r);
    eplb_store_close(s);
}

Test(store, memory_database_works) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(":memory:", &s, &err), EPLB_OK, "%s", err.msg);
    eplb_store_close(s);
}

/* Register a model, close, run sql on the file, and return what reopening
 * the registry says (the reopened store is closed again). */
static eplb_status register_then_tamper(const char *sql, eplb_error *err) {
    eplb_store *s;
    eplb_registry *r;
    open_registry(&s, &r);
    eplb_register_request req = { .model_name = "ds", .model = &lm, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 2 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(r, &req, &res, NULL), EPLB_OK);
    eplb_placement_free(&res.placement);
    eplb_registry_close(r);
    eplb_store_close(s);

    sqlite3 *db;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);

    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_store_open(path, &s, err), EPLB_OK);
    eplb_status st = eplb_registry_open(&eplb_store_sqlite_ops, s, &lim, &r, err);
    if (st == EPLB_OK)
        eplb_registry_close(r);
    else
        cr_assert_null(r);
    eplb_store_close(s);
    return st;
}

Test(store, corrupt_map_is_data_loss) {
    eplb_error err;
    cr_assert_eq(register_then_tamper("UPDATE models SET phy2log = x'0000'", &err), EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "model ds has a 2-byte map"), "%s", err.msg);
}

Test(store, inconsistent_shape_is_data_loss_not_a_crash) {
    eplb_error err;
    cr_assert_eq(register_then_tamper("UPDATE models SET step_interval = 0", &err), EPLB_EDATALOSS);
    cr_assert_str_eq(err.msg, "store: model ds has an inconsistent shape");
}

Test(store, unopenable_path_is_unavailable) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open("/nonexistent-dir/x/eplbd.db", &s, &err), EPLB_EUNAVAILABLE);
    cr_assert_null(s);
    cr_assert_not_null(strstr(err.msg, "/nonexistent-dir/x/eplbd.db"));
}
