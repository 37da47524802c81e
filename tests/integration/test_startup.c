/* test_startup.c -- what eplbd refuses at start-up and what it says: an
 * address already served by another eplbd, a database held by another
 * eplbd or read-only, bad flag values; the start-up line naming the
 * address; the flags of --help.  Every server is a separate process. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"
#include "grpc/health/v1/health.upb.h"

TestSuite(startup, .timeout = 300);

static void tmp_server(eplbd_proc *p) {
    memset(p, 0, sizeof *p);
    eplbd_tmpdir(p);
}

/* Run a shell command; its exit status, its stdout and stderr in out. */
static int run_capture(const char *cmd, char *out, size_t n) {
    char full[8192];
    snprintf(full, sizeof full, "timeout 30 %s 2>&1", cmd);
    FILE *f = popen(full, "r");
    cr_assert_not_null(f);
    size_t got = fread(out, 1, n - 1, f);
    out[got] = '\0';
    int status = pclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int health(const char *addr) {
    eplb_client *c = eplb_client_open(addr);
    upb_Arena *a = upb_Arena_New();
    size_t len;
    char *bytes = grpc_health_v1_HealthCheckRequest_serialize(grpc_health_v1_HealthCheckRequest_new(a), a, &len);
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(c, "/grpc.health.v1.Health/Check", bytes, len, call_timeout_ms(), &r), 0);
    int st = r.status;
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
    eplb_client_close(c);
    return st;
}

static int register_model(eplb_client *c, const char *name, char *message, size_t n) {
    upb_Arena *a = upb_Arena_New();
    size_t len;
    char *bytes = eplb_v1_RegisterModelRequest_serialize(harness_moe_request(a, name, 2, 4, 6, 2), a, &len);
    int st = harness_rpc(c, "RegisterModel", bytes, len, a, NULL, NULL, message, n);
    upb_Arena_Free(a);
    return st;
}

Test(startup, second_server_on_the_same_port_refuses_to_start) {
    /* gRPC sets SO_REUSEPORT unless told not to: the old second server
     * bound the same port and took half of the new connections. */
    eplbd_proc first, second;
    tmp_server(&first);
    eplbd_start(&first);
    tmp_server(&second);
    second.extra[0] = "--listen";
    second.extra[1] = first.addr;
    int status = 0;
    int started = eplbd_try_start(&second, &status);
    char log[16384];
    if (started) {
        eplbd_stop(&second);
        cr_assert_fail("a second eplbd started on %s", first.addr);
    }
    eplbd_log(&second, log, sizeof log);
    cr_assert_eq(status, 1, "exit status %d; log:\n%s", status, log);
    char want[256];
    snprintf(want, sizeof want, "cannot listen on %s", first.addr);
    cr_assert_not_null(strstr(log, want), "the error names the address; log:\n%s", log);
    eplbd_cleanup(&second);

    cr_assert_eq(health(first.addr), 0, "the first server still serves");
    cr_assert_eq(eplbd_stop(&first), 0);
    eplbd_cleanup(&first);
}

Test(startup, first_line_names_the_address_it_listens_on) {
    eplbd_proc p;
    tmp_server(&p);
    eplbd_start(&p); /* --listen 127.0.0.1:0: the line names the bound port */
    char log[16384], want[256];
    eplbd_log(&p, log, sizeof log);
    snprintf(want, sizeof want, "listening on %s,", p.addr);
    cr_assert_not_null(strstr(log, want), "%s", log);
    cr_assert_eq(eplbd_stop(&p), 0);

    char listen[256];
    snprintf(listen, sizeof listen, "unix:%s/s.sock", p.dir);
    p.extra[0] = "--listen";
    p.extra[1] = listen;
    eplbd_start(&p);
    snprintf(want, sizeof want, "listening on %s,", listen);
    eplbd_log(&p, log, sizeof log);
    cr_assert_not_null(strstr(log, want), "%s", log);
    cr_assert_eq(eplbd_stop(&p), 0);
    eplbd_cleanup(&p);
}

Test(startup, help_lists_the_flags_and_hides_the_test_hooks) {
    char out[16384], cmd[512];
    snprintf(cmd, sizeof cmd, "%s --help", EPLBD_PATH);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 0);
    const char *flags[] = { "--shm-prefix P", "--shm-allow-uid UID", "--allow-remote-weights", "--max-models N",
                            "--max-state-mib N", "--max-message-bytes N", "--drain-ms N", "--workers N" };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        cr_assert_not_null(strstr(out, flags[i]), "--help lacks %s:\n%s", flags[i], out);
    cr_assert_null(strstr(out, "--test-handler-delay-ms"), "%s", out);
    cr_assert_null(strstr(out, "--fault-inject"), "%s", out);
}

Test(startup, bad_flag_values_are_refused) {
    static const struct {
        const char *args, *says;
    } bad[] = {
        { "--shm-prefix eplb-", "--shm-prefix wants a name that starts with '/'" },
        { "--shm-prefix /eplb/x-", "--shm-prefix wants a name that starts with '/'" },
        { "--shm-prefix /", "'/' alone would allow every object" },
        { "--shm-allow-uid bob", "--shm-allow-uid wants a numeric uid, got 'bob'" },
        { "--shm-allow-uid -1", "--shm-allow-uid wants a numeric uid" },
        { "--max-models 0", "--max-models wants an integer" },
        { "--max-state-mib x", "--max-state-mib wants an integer" },
        { "--test-handler-delay-ms Nope:10", "--test-handler-delay-ms wants METHOD:MS" },
        { "--test-handler-delay-ms Rebalance", "--test-handler-delay-ms wants METHOD:MS" },
    };
    char out[4096], cmd[1024];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(cmd, sizeof cmd, "%s --db :memory: --listen 127.0.0.1:0 %s", EPLBD_PATH, bad[i].args);
        cr_assert_eq(run_capture(cmd, out, sizeof out), 2, "%s: %s", bad[i].args, out);
        cr_assert_not_null(strstr(out, bad[i].says), "%s: %s", bad[i].args, out);
    }
    /* At most RPC_MAX_SHM_UIDS (16) uids. */
    int n = snprintf(cmd, sizeof cmd, "%s --db :memory: --listen 127.0.0.1:0", EPLBD_PATH);
    for (int i = 0; i < 17; i++)
        n += snprintf(cmd + n, sizeof cmd - (size_t)n, " --shm-allow-uid %d", 1000 + i);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--shm-allow-uid given more than 16 times"), "%s", out);
}

Test(startup, good_flag_values_are_accepted) {
    eplbd_proc p;
    tmp_server(&p);
    const char *args[] = { "--shm-prefix", "/eplb-test-", "--shm-allow-uid", "1000", "--shm-allow-uid", "0",
                           "--allow-remote-weights", NULL };
    for (int i = 0; args[i]; i++)
        p.extra[i] = args[i];
    eplbd_start(&p);
    cr_assert_eq(health(p.addr), 0);
    cr_assert_eq(eplbd_stop(&p), 0);
    memset(p.extra, 0, sizeof p.extra);
    p.extra[0] = "--max-models";
    p.extra[1] = "3";
    p.extra[2] = "--max-state-mib";
    p.extra[3] = "16";
    eplbd_start(&p);
    cr_assert_eq(health(p.addr), 0);
    cr_assert_eq(eplbd_stop(&p), 0);
    eplbd_cleanup(&p);
}

Test(startup, max_models_reaches_the_registry) {
    eplbd_proc p;
    tmp_server(&p);
    p.extra[0] = "--max-models";
    p.extra[1] = "2";
    eplbd_start(&p);
    eplb_client *c = eplb_client_open(p.addr);
    char msg[512];
    cr_assert_eq(register_model(c, "a", msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(register_model(c, "b", msg, sizeof msg), 0, "%s", msg);
    int st = register_model(c, "c", msg, sizeof msg);
    cr_assert_eq(st, 8 /* RESOURCE_EXHAUSTED */, "a third model with --max-models 2: %s: %s",
                 eplb_grpc_status_name(st), msg);
    cr_assert_not_null(strstr(msg, "--max-models"), "%s", msg);
    eplbd_suite_stop(&p, c);
}

Test(startup, database_held_by_another_eplbd_is_refused) {
    eplbd_proc first, second;
    tmp_server(&first);
    eplbd_start(&first);
    tmp_server(&second);
    snprintf(second.db, sizeof second.db, "%s", first.db); /* same file, other port */
    int status = 0;
    int started = eplbd_try_start(&second, &status);
    if (started) {
        eplbd_stop(&second);
        cr_assert_fail("a second eplbd opened %s", first.db);
    }
    char log[16384], want[128];
    eplbd_log(&second, log, sizeof log);
    cr_assert_eq(status, 1, "exit status %d; log:\n%s", status, log);
    snprintf(want, sizeof want, "held by another eplbd (pid %d)", (int)first.pid);
    cr_assert_not_null(strstr(log, want), "the store's error, verbatim; log:\n%s", log);
    cr_assert_not_null(strstr(log, first.db), "the error names the database; log:\n%s", log);
    eplbd_cleanup(&second);
    cr_assert_eq(health(first.addr), 0);
    cr_assert_eq(eplbd_stop(&first), 0);
    eplbd_cleanup(&first);
}

Test(startup, read_only_database_is_refused) {
    eplbd_proc p;
    tmp_server(&p);
    eplbd_start(&p); /* create the database */
    cr_assert_eq(eplbd_stop(&p), 0);
    char cmd[2048], out[16384];
    if (geteuid() != 0) {
        snprintf(cmd, sizeof cmd, "chmod 0444 '%s' && chmod 0555 '%s'", p.db, p.dir);
        cr_assert_eq(system(cmd), 0);
        snprintf(cmd, sizeof cmd, "%s --listen 127.0.0.1:0 --db '%s'", EPLBD_PATH, p.db);
    } else {
        /* root ignores file modes: a read-only bind mount of the directory
         * in a private mount namespace. */
        snprintf(cmd, sizeof cmd, "unshare -m sh -c \"mount --bind '%s' '%s' && mount -o remount,bind,ro '%s'\"",
                 p.dir, p.dir, p.dir);
        if (system(cmd) != 0) {
            eplbd_cleanup(&p);
            cr_skip_test("running as root without a way to make a read-only mount");
        }
        snprintf(cmd, sizeof cmd,
                 "unshare -m sh -c \"mount --bind '%s' '%s' && mount -o remount,bind,ro '%s' && "
                 "exec %s --listen 127.0.0.1:0 --db '%s'\"",
                 p.dir, p.dir, p.dir, EPLBD_PATH, p.db);
    }
    int rc = run_capture(cmd, out, sizeof out);
    cr_assert_eq(rc, 1, "eplbd on a read-only database: exit %d:\n%s", rc, out);
    cr_assert_not_null(strstr(out, "read-only"), "%s", out);
    cr_assert_null(strstr(out, "listening on"), "%s", out);
    snprintf(cmd, sizeof cmd, "chmod 0755 '%s'; chmod 0644 '%s'", p.dir, p.db);
    cr_assert_eq(system(cmd), 0);
    eplbd_cleanup(&p);
}

Test(startup, second_server_on_the_same_unix_socket_refuses_to_start) {
    /* gRPC unlinks an existing socket path before it binds: the second
     * server used to take the path over, and the first one's exit then
     * removed it from under the second. */
    eplbd_proc first, second;
    tmp_server(&first);
    char listen[192];
    snprintf(listen, sizeof listen, "unix:%s/eplbd.sock", first.dir);
    first.extra[0] = "--listen";
    first.extra[1] = listen;
    eplbd_start(&first);
    tmp_server(&second);
    second.extra[0] = "--listen";
    second.extra[1] = listen;
    int status = 0;
    if (eplbd_try_start(&second, &status)) {
        eplbd_stop(&second);
        cr_assert_fail("a second eplbd started on %s", listen);
    }
    char log[16384];
    eplbd_log(&second, log, sizeof log);
    cr_assert_eq(status, 1, "exit status %d; log:\n%s", status, log);
    cr_assert_not_null(strstr(log, "another process is listening there"), "log:\n%s", log);
    eplbd_cleanup(&second);
    cr_assert_eq(health(listen), 0, "the first server still serves");
    cr_assert_eq(eplbd_stop(&first), 0);
    /* A stale socket file (nobody listening) is taken over. */
    eplbd_start(&first);
    cr_assert_eq(health(listen), 0);
    cr_assert_eq(eplbd_stop(&first), 0);
    eplbd_cleanup(&first);
}

Test(startup, hangup_and_user_signals_are_ignored_and_quit_drains) {
    eplbd_proc p;
    tmp_server(&p);
    eplbd_start(&p);
    eplb_client *c = eplb_client_open(p.addr);
    char msg[512];
    cr_assert_eq(register_model(c, "m", msg, sizeof msg), 0, "%s", msg);
    eplb_client_close(c);
    static const int ignored[] = { SIGHUP, SIGUSR1, SIGUSR2, SIGALRM };
    for (size_t k = 0; k < sizeof ignored / sizeof ignored[0]; k++) {
        kill(p.pid, ignored[k]);
        cr_assert_eq(eplbd_wait(&p, 200), -1, "signal %d stopped eplbd", ignored[k]);
        cr_assert_eq(health(p.addr), 0, "still serving after signal %d", ignored[k]);
    }
    char log[16384];
    eplbd_log(&p, log, sizeof log);
    cr_assert_not_null(strstr(log, "ignored: eplbd has no configuration to reload"), "log:\n%s", log);
    /* SIGQUIT stops it like SIGTERM: drained, exit 0, database closed. */
    kill(p.pid, SIGQUIT);
    cr_assert_eq(eplbd_wait(&p, 20000), 0);
    eplbd_log(&p, log, sizeof log);
    cr_assert_not_null(strstr(log, "stopped"), "log:\n%s", log);
    eplbd_cleanup(&p);
}

/* A forced GPU backend that cannot be used here is refused at start, with
 * the reason (the .so is pointed at a path that does not exist, so this
 * holds on every machine, GPU or not); an unknown name is a usage error. */
Test(startup, forced_gpu_backend_that_cannot_work_is_refused) {
    static const char *names[] = { "hip", "cuda" };
    char out[4096], cmd[1024];
    for (size_t i = 0; i < 2; i++) {
        snprintf(cmd, sizeof cmd, "env EPLB_HIP_BACKEND=/nonexistent/hip.so EPLB_CUDA_BACKEND=/nonexistent/cuda.so "
                 "%s --db :memory: --listen 127.0.0.1:0 --backend %s", EPLBD_PATH, names[i]);
        cr_assert_eq(run_capture(cmd, out, sizeof out), 1, "%s: %s", names[i], out);
        char says[128];
        snprintf(says, sizeof says, "--backend %s: %s backend unusable: dlopen /nonexistent/%s.so", names[i],
                 names[i], names[i]);
        cr_assert_not_null(strstr(out, says), "%s: %s", names[i], out);
    }
    snprintf(cmd, sizeof cmd, "%s --db :memory: --listen 127.0.0.1:0 --backend gpu", EPLBD_PATH);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--backend wants auto, cpu, hip or cuda, got 'gpu'"), "%s", out);
}
