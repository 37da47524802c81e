/* test_models_rpc.c -- ListModels and DeleteModel over real gRPC, and
 * eplbctl's list and delete: a deleted model is gone from the database too
 * (a restart does not bring it back), its name can be registered anew, a
 * main model with speculators is refused unless forced, and a model whose
 * stored row was damaged can be listed and deleted. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

static void register_model(eplb_client *c, upb_Arena *a, const char *name, const char *main_model) {
    eplb_v1_RegisterModelRequest *r = harness_moe_request(a, name, main_model ? 1 : 2, 8, 12, 4);
    if (main_model) {
        eplb_v1_RegisterModelRequest_set_role(r, eplb_v1_MODEL_ROLE_SPECULATOR);
        eplb_v1_RegisterModelRequest_set_main_model_id(r, upb_StringView_FromString(main_model));
    }
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(r, a, &len), msg[512];
    cr_assert_eq(harness_rpc(c, "RegisterModel", bytes, len, a, NULL, NULL, msg, sizeof msg), 0, "RegisterModel %s: %s",
                 name, msg);
}

static const eplb_v1_ListModelsResponse *list(eplb_client *c, upb_Arena *a) {
    eplb_v1_ListModelsRequest *req = eplb_v1_ListModelsRequest_new(a);
    size_t len, blen = 0;
    char *bytes = eplb_v1_ListModelsRequest_serialize(req, a, &len), *body = NULL, msg[512];
    cr_assert_eq(harness_rpc(c, "ListModels", bytes, len, a, &body, &blen, msg, sizeof msg), 0, "%s", msg);
    const eplb_v1_ListModelsResponse *resp = eplb_v1_ListModelsResponse_parse(body, blen, a);
    cr_assert_not_null(resp);
    return resp;
}

static int delete_model(eplb_client *c, upb_Arena *a, const char *id, bool force, char *msg, size_t n) {
    eplb_v1_DeleteModelRequest *req = eplb_v1_DeleteModelRequest_new(a);
    eplb_v1_DeleteModelRequest_set_model_id(req, upb_StringView_FromString(id));
    eplb_v1_DeleteModelRequest_set_force(req, force);
    size_t len;
    char *bytes = eplb_v1_DeleteModelRequest_serialize(req, a, &len);
    return harness_rpc(c, "DeleteModel", bytes, len, a, NULL, NULL, msg, n);
}

static bool sv_is(upb_StringView v, const char *s) { return v.size == strlen(s) && memcmp(v.data, s, v.size) == 0; }

TestSuite(models_rpc, .timeout = 300);

Test(models_rpc, list_then_delete_survives_a_restart) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    upb_Arena *a = upb_Arena_New();
    register_model(c, a, "main", NULL);
    register_model(c, a, "draft", "main");
    register_model(c, a, "other", NULL);
    size_t n;
    const eplb_v1_ModelSummary *const *m = eplb_v1_ListModelsResponse_models(list(c, a), &n);
    cr_assert_eq(n, 3);
    cr_assert(sv_is(eplb_v1_ModelSummary_model_id(m[0]), "draft"));
    cr_assert_eq(eplb_v1_ModelSummary_role(m[0]), eplb_v1_MODEL_ROLE_SPECULATOR);
    cr_assert(sv_is(eplb_v1_ModelSummary_main_model_id(m[0]), "main"));
    cr_assert(sv_is(eplb_v1_ModelSummary_model_id(m[1]), "main"));
    cr_assert_eq(eplb_v1_ModelSummary_num_physical_experts(m[1]), 12);
    cr_assert_eq(eplb_v1_ModelSummary_state(m[1]), eplb_v1_MOVE_STATE_IDLE);

    char msg[512];
    cr_assert_eq(delete_model(c, a, "main", false, msg, sizeof msg), 9 /* FAILED_PRECONDITION */, "%s", msg);
    cr_assert_not_null(strstr(msg, "draft"), "%s", msg);
    cr_assert_eq(delete_model(c, a, "nope", false, msg, sizeof msg), 5 /* NOT_FOUND */);
    cr_assert_eq(delete_model(c, a, "bad name", false, msg, sizeof msg), 3 /* INVALID_ARGUMENT */);
    cr_assert_eq(delete_model(c, a, "draft", false, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(delete_model(c, a, "main", false, msg, sizeof msg), 0, "%s", msg);
    eplb_v1_ListModelsResponse_models(list(c, a), &n);
    cr_assert_eq(n, 1);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);

    eplbd_start(&s);
    c = eplb_client_open(s.addr);
    m = eplb_v1_ListModelsResponse_models(list(c, a), &n);
    cr_assert_eq(n, 1, "a deleted model came back after a restart");
    cr_assert(sv_is(eplb_v1_ModelSummary_model_id(m[0]), "other"));
    register_model(c, a, "main", NULL); /* the name is free */
    eplb_client_close(c);
    upb_Arena_Free(a);
    cr_assert_eq(eplbd_stop(&s), 0);
    eplbd_cleanup(&s);
}

Test(models_rpc, a_damaged_model_is_listed_and_can_be_deleted) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    upb_Arena *a = upb_Arena_New();
    register_model(c, a, "edited", NULL);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "sqlite3 '%s' \"UPDATE models SET epoch = 3 WHERE model_id = 'edited'\"", s.db);
    cr_assert_eq(system(cmd), 0);
    eplbd_start(&s);
    c = eplb_client_open(s.addr);
    size_t n;
    const eplb_v1_ModelSummary *const *m = eplb_v1_ListModelsResponse_models(list(c, a), &n);
    cr_assert_eq(n, 1);
    upb_StringView d = eplb_v1_ModelSummary_damaged(m[0]);
    cr_assert_gt(d.size, 0, "the damaged row is not marked");
    char msg[512];
    cr_assert_eq(delete_model(c, a, "edited", false, msg, sizeof msg), 0, "%s", msg);
    register_model(c, a, "edited", NULL);
    eplb_client_close(c);
    upb_Arena_Free(a);
    cr_assert_eq(eplbd_stop(&s), 0);
    eplbd_cleanup(&s);
}

Test(models_rpc, eplbctl_list_and_delete) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    upb_Arena *a = upb_Arena_New();
    register_model(c, a, "ctl-model", NULL);
    eplb_client_close(c);
    upb_Arena_Free(a);
    char cmd[512], out[192];
    snprintf(out, sizeof out, "%s/ctl.out", s.dir);
    snprintf(cmd, sizeof cmd, "%s --addr %s list > '%s'", EPLBCTL_PATH, s.addr, out);
    cr_assert_eq(system(cmd), 0);
    FILE *f = fopen(out, "r");
    char buf[4096] = "";
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    buf[got] = '\0';
    fclose(f);
    cr_assert_not_null(strstr(buf, "\"model_id\":\"ctl-model\""), "%s", buf);
    snprintf(cmd, sizeof cmd, "%s --addr %s delete ctl-model > '%s'", EPLBCTL_PATH, s.addr, out);
    cr_assert_eq(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "%s --addr %s delete ctl-model 2>/dev/null", EPLBCTL_PATH, s.addr);
    cr_assert_eq(WEXITSTATUS(system(cmd)), 1, "deleting twice must fail (NOT_FOUND)");
    cr_assert_eq(eplbd_stop(&s), 0);
    eplbd_cleanup(&s);
}
