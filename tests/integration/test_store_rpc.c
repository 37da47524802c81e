/* test_store_rpc.c -- the database as an operator meets it, over real gRPC
 * against a real eplbd: one server per database (a second one refuses to
 * start naming the holder), a hand-edited row is DATA_LOSS for that model
 * only (the others serve), a database the server cannot write is refused
 * at start, and a full disk answers RESOURCE_EXHAUSTED, never INTERNAL. */
#include <fcntl.h>
#include <sys/mount.h>

#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"

static int register_model(eplb_client *c, const char *name, uint32_t layers, char *msg, size_t n) {
    upb_Arena *a = upb_Arena_New();
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(harness_moe_request(a, name, layers, 8, 12, 4), a, &len);
    int st = harness_rpc(c, "RegisterModel", bytes, len, a, NULL, NULL, msg, n);
    upb_Arena_Free(a);
    return st;
}

static int get_placement(eplb_client *c, const char *id, char *msg, size_t n) {
    upb_Arena *a = upb_Arena_New();
    eplb_v1_GetPlacementRequest *req = eplb_v1_GetPlacementRequest_new(a);
    eplb_v1_GetPlacementRequest_set_model_id(req, upb_StringView_FromString(id));
    size_t len;
    char *bytes = eplb_v1_GetPlacementRequest_serialize(req, a, &len);
    int st = harness_rpc(c, "GetPlacement", bytes, len, a, NULL, NULL, msg, n);
    upb_Arena_Free(a);
    return st;
}

static void sh(const char *fmt, const char *arg) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, fmt, arg);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
}

TestSuite(store_rpc, .timeout = 300);

Test(store_rpc, a_second_server_on_the_same_database_refuses_to_start) {
    eplbd_proc a = { 0 };
    eplbd_tmpdir(&a);
    eplbd_start(&a);
    eplbd_proc b = { 0 };
    eplbd_tmpdir(&b);
    snprintf(b.db, sizeof b.db, "%s", a.db); /* same database, own files */
    int status = 0;
    cr_assert_eq(eplbd_try_start(&b, &status), 0, "a second eplbd on %s started", a.db);
    cr_assert_neq(status, 0);
    char log[4096], want[64];
    eplbd_log(&b, log, sizeof log);
    snprintf(want, sizeof want, "held by another eplbd (pid %d)", (int)a.pid);
    cr_assert_not_null(strstr(log, want), "log: %s", log);
    /* The first one is unharmed. */
    eplb_client *c = eplb_client_open(a.addr);
    char msg[512];
    cr_assert_eq(register_model(c, "m", 2, msg, sizeof msg), 0, "%s", msg);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&a), 0);
    /* Once it is gone the database is free again. */
    cr_assert_eq(eplbd_try_start(&b, &status), 1);
    cr_assert_eq(eplbd_stop(&b), 0);
    eplbd_cleanup(&b);
    eplbd_cleanup(&a);
}

Test(store_rpc, an_edited_row_is_data_loss_for_that_model_only) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    eplb_client *c = eplb_client_open(s.addr);
    char msg[512];
    cr_assert_eq(register_model(c, "edited", 2, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(register_model(c, "negative", 2, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(register_model(c, "intact", 2, msg, sizeof msg), 0, "%s", msg);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);

    /* In range, and consistent with the shape: only a checksum can tell. */
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "sqlite3 '%s' \"UPDATE models SET epoch = 5 WHERE model_id = 'edited';"
             " UPDATE models SET epoch = -5 WHERE model_id = 'negative';\"", s.db);
    cr_assert_eq(system(cmd), 0);
    eplbd_start(&s);
    c = eplb_client_open(s.addr);
    cr_assert_eq(get_placement(c, "edited", msg, sizeof msg), 15 /* DATA_LOSS */, "%s", msg);
    cr_assert_not_null(strstr(msg, "edited"), "%s", msg);
    cr_assert_eq(get_placement(c, "negative", msg, sizeof msg), 15, "%s", msg);
    cr_assert_not_null(strstr(msg, "negative"), "%s", msg);
    cr_assert_eq(get_placement(c, "intact", msg, sizeof msg), 0, "%s", msg);
    /* Registering over it does not paper it over. */
    cr_assert_eq(register_model(c, "edited", 2, msg, sizeof msg), 15, "%s", msg);
    eplb_client_close(c);
    cr_assert_eq(eplbd_stop(&s), 0);
    eplbd_cleanup(&s);
}

Test(store_rpc, a_database_it_cannot_write_is_refused_at_start) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    eplbd_start(&s);
    cr_assert_eq(eplbd_stop(&s), 0);
    /* As an unprivileged user (root writes through file modes). */
    sh("chmod 0777 '%s'", s.dir);
    sh("chmod 0444 '%s'", s.db);
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "setpriv --reuid=65534 --regid=65534 --clear-groups %s --listen 127.0.0.1:0 --db '%s' "
             "--ready-file '%s/ro-ready' 2>'%s/ro.log'; echo $? > '%s/ro.rc'",
             EPLBD_PATH, s.db, s.dir, s.dir, s.dir);
    cr_assert_eq(system(cmd), 0);
    char path[256], buf[4096] = "";
    snprintf(path, sizeof path, "%s/ro-ready", s.dir);
    cr_assert_neq(access(path, F_OK), 0, "a read-only database started serving");
    snprintf(path, sizeof path, "%s/ro.log", s.dir);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    cr_assert_not_null(strstr(buf, "read-only"), "log: %s", buf);
    eplbd_cleanup(&s);
}

Test(store_rpc, a_full_disk_is_resource_exhausted_and_keeps_what_was_stored) {
    eplbd_proc s = { 0 };
    eplbd_tmpdir(&s);
    /* The database on a 1 MiB tmpfs of a private mount namespace: the server
     * runs inside it, the test outside (over TCP). */
    char data[160];
    snprintf(data, sizeof data, "%s/data", s.dir);
    cr_assert_eq(mkdir(data, 0700), 0);
    if (system("unshare --mount --propagation private true 2>/dev/null") != 0) {
        cr_skip_test("no mount namespaces here (unshare --mount failed)");
    }
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "unshare --mount --propagation private sh -c \"mount -t tmpfs -o size=1m tmpfs '%s' && "
             "exec %s --listen 127.0.0.1:0 --db '%s/eplbd.db' --ready-file '%s/ready' "
             "--max-models 100000 --max-state-mib 1000000\" "
             "2>'%s/eplbd.log' &"
             " echo $! > '%s/pid'",
             data, EPLBD_PATH, data, s.dir, s.dir, s.dir);
    cr_assert_eq(system(cmd), 0);
    char path[256], addr[128] = "";
    snprintf(path, sizeof path, "%s/ready", s.dir);
    for (int i = 0; i < 750 && !addr[0]; i++) {
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(addr, sizeof addr, f))
                addr[0] = '\0';
            fclose(f);
        }
        usleep(20000);
    }
    addr[strcspn(addr, "\n")] = '\0';
    snprintf(path, sizeof path, "%s/pid", s.dir);
    FILE *f = fopen(path, "r");
    int pid = 0;
    cr_assert_not_null(f);
    cr_assert_eq(fscanf(f, "%d", &pid), 1);
    fclose(f);
    if (!addr[0])
        kill(pid, SIGKILL);
    cr_assert(addr[0], "eplbd on the tmpfs did not start");
    eplb_client *c = eplb_client_open(addr);
    char msg[512];
    int first = register_model(c, "first", 2, msg, sizeof msg);
    int st = 0, i = 0;
    for (; i < 500 && st == 0; i++) {
        char name[32];
        snprintf(name, sizeof name, "m%d", i);
        st = register_model(c, name, 1024, msg, sizeof msg); /* a 48 KiB map each */
    }
    int after = get_placement(c, "first", NULL, 0);
    eplb_client_close(c);
    /* unshare execs sh which execs eplbd: the pid is eplbd's. */
    kill(pid, SIGTERM);
    for (int k = 0; k < 1000 && kill(pid, 0) == 0; k++)
        usleep(10000);
    cr_assert_eq(first, 0);
    cr_assert_eq(st, 8 /* RESOURCE_EXHAUSTED */, "after %d models: %d %s", i, st, msg);
    cr_assert_not_null(strstr(msg, "disk full"), "%s", msg);
    cr_assert_eq(after, 0, "what was stored before the disk filled is still served");
    cr_assert_neq(kill(pid, 0), 0, "eplbd did not stop");
    eplbd_cleanup(&s);
}
