/* test_store.c -- the SQLite store under the registry: a registry reopened
 * on the same file finds its models; a stored row that was edited or does
 * not match its shape is DATA_LOSS for that model only (the server still
 * starts and serves the others); a model stored mid-move comes back as
 * needing a reload. */
#include "store_test_util.h"

TestSuite(store, .init = tdir_setup, .fini = tdir_teardown);

static eplb_handle lm = { .architecture = "DeepseekV3ForCausalLM", .interfaces = EPLB_IFACE_MOE, .has_moe = true,
                          .moe = { .num_moe_layers = 2, .num_logical_experts = 4, .num_physical_experts = 6,
                                   .num_local_physical_experts = 3, .num_redundant_experts = 2 } };

static void open_registry(eplb_store **s, eplb_registry **r) {
    eplb_error err;
    eplb_limits lim = EPLB_LIMITS_DEFAULT;
    cr_assert_eq(eplb_store_open(tdb, s, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_registry_open(&eplb_store_sqlite_ops, *s, &lim, r, &err), EPLB_OK, "%s", err.msg);
}

static void register_model(eplb_registry *r, const char *name) {
    eplb_register_request req = { .model_name = name, .model = &lm, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 2, .window_size = 7 } };
    eplb_register_result res;
    eplb_error err;
    cr_assert_eq(eplb_registry_register(r, &req, &res, &err), EPLB_OK, "%s", err.msg);
    cr_assert(res.registered);
    eplb_model_view_release(&res.view);
}

Test(store, registry_survives_reopen) {
    eplb_store *s;
    eplb_registry *r;
    open_registry(&s, &r);
    register_model(r, "ds");
    eplb_registry_close(r);
    eplb_store_close(s);

    open_registry(&s, &r);
    cr_assert_eq(eplb_registry_count(r), 1);
    eplb_model_view v;
    eplb_error err;
    cr_assert_eq(eplb_registry_view(r, "ds", &v, &err), EPLB_OK, "%s", err.msg);
    const int32_t want[] = { 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1 };
    cr_assert_arr_eq(v.snap->placement.phy2log, want, sizeof want);
    cr_assert_eq(v.snap->placement.epoch, 0);
    cr_assert_eq(v.snap->shape.window_size, 7);
    cr_assert_eq(v.state, EPLB_MOVE_IDLE);
    eplb_model_view_release(&v);
    /* Registering again after the restart is idempotent: the shape was kept. */
    eplb_register_request req = { .model_name = "ds", .model = &lm, .main_model_id = "",
                                  .parallel = { .enable_eplb = true, .ep_size = 2, .window_size = 7 } };
    eplb_register_result res;
    cr_assert_eq(eplb_registry_register(r, &req, &res, NULL), EPLB_OK);
    cr_assert(res.registered);
    cr_assert_not_null(strstr(res.reason, "already registered"), "%s", res.reason);
    eplb_model_view_release(&res.view);
    eplb_registry_close(r);
    eplb_store_close(s);
}

Test(store, memory_database_works) {
    eplb_store *s, *t;
    eplb_error err;
    cr_assert_eq(eplb_store_open(":memory:", &s, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_store_open(":memory:", &t, &err), EPLB_OK, "%s", err.msg); /* no lock */
    eplb_store_close(t);
    eplb_store_close(s);
}

/* Register ds and other, close, run text on the file, reopen the registry
 * (it must open), and return what viewing ds says. */
static eplb_status register_then_tamper(const char *text, eplb_error *err) {
    eplb_store *s;
    eplb_registry *r;
    open_registry(&s, &r);
    register_model(r, "ds");
    register_model(r, "other");
    eplb_registry_close(r);
    eplb_store_close(s);

    sql(tdb, text);

    open_registry(&s, &r);
    cr_assert_eq(eplb_registry_count(r), 2, "a damaged model stays listed");
    eplb_model_view v;
    eplb_error other_err;
    cr_assert_eq(eplb_registry_view(r, "other", &v, &other_err), EPLB_OK, "%s", other_err.msg);
    eplb_model_view_release(&v);
    eplb_status st = eplb_registry_view(r, "ds", &v, err);
    if (st == EPLB_OK)
        eplb_model_view_release(&v);
    eplb_registry_close(r);
    eplb_store_close(s);
    return st;
}

Test(store, edited_map_is_data_loss_for_that_model_only) {
    eplb_error err;
    /* Slot 4 of layer 0 holds expert 1 instead of 0: still a valid map. */
    cr_assert_eq(register_then_tamper("UPDATE models SET phy2log = CAST(substr(phy2log, 1, 16) || x'01000000' ||"
                                      " substr(phy2log, 21) AS BLOB) WHERE model_id = 'ds'", &err),
                 EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "model ds"), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "store: model ds: checksum mismatch (row edited or corrupted)"), "%s",
                       err.msg);
}

Test(store, corrupt_map_is_data_loss_not_a_failed_start) {
    eplb_error err;
    cr_assert_eq(register_then_tamper("UPDATE models SET phy2log = x'0000' WHERE model_id = 'ds'", &err),
                 EPLB_EDATALOSS);
    cr_assert_not_null(strstr(err.msg, "store: model ds: checksum mismatch"), "%s", err.msg);
}

Test(store, model_stored_mid_move_needs_a_reload) {
    eplb_store *s;
    eplb_registry *r;
    open_registry(&s, &r);
    register_model(r, "ds");
    eplb_registry_close(r);
    /* What the registry stores before the first slot write; then eplbd dies. */
    eplb_model_record rec;
    rec_make(&rec, "ds", 2, 4, 6, 2, 7);
    rec.shape.num_groups = 1;
    rec.shape.num_shared = 0;
    rec.shape.step_interval = EPLB_DEFAULT_STEP_INTERVAL;
    rec.state = EPLB_MOVE_MOVING;
    rec.placement.epoch = 0;
    eplb_error err;
    cr_assert_eq(save(s, &rec, &err), EPLB_OK, "%s", err.msg);
    rec_free(&rec);
    eplb_store_close(s);

    open_registry(&s, &r);
    eplb_model_view v;
    cr_assert_eq(eplb_registry_view(r, "ds", &v, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(v.state, EPLB_MOVE_NEEDS_RELOAD);
    cr_assert_not_null(strstr(v.state_reason, "moving weights"), "%s", v.state_reason);
    eplb_model_view_release(&v);
    eplb_registry_close(r);
    eplb_store_close(s);
}

Test(store, unopenable_path_is_unavailable) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open("/nonexistent-dir/x/eplbd.db", &s, &err), EPLB_EUNAVAILABLE);
    cr_assert_null(s);
    cr_assert_not_null(strstr(err.msg, "/nonexistent-dir/x/eplbd.db"), "%s", err.msg);
}
