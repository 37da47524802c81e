/* test_tls.c -- eplbd with --tls-cert/--tls-key (TLS) and --tls-client-ca
 * (mTLS), over real connections from this process and from eplbctl.  The
 * certificates are made at test time with the openssl CLI in the server's
 * temporary directory: a CA, a server certificate for localhost and
 * 127.0.0.1 (subjectAltName), a client certificate from the same CA, and a
 * second, unrelated CA with a client certificate of its own. */
#include "eplbd_harness.h"

#include "eplb/v1/eplb.upb.h"
#include "grpc/health/v1/health.upb.h"

TestSuite(tls, .timeout = 300);

/* eplbctl's --timeout in seconds: longer when eplbd runs under a wrapper
 * (valgrind, TSan).  A failed handshake fails a call at once (UNAVAILABLE),
 * long before any of these. */
static int ctl_timeout_s(void) { return harness_slow() ? 60 : 10; }

static const char pki_script[] =
    "set -e\n"
    "cat > x.cnf <<'CNF'\n"
    "[req]\n"
    "distinguished_name = dn\n"
    "[dn]\n"
    "[ca_ext]\n"
    "basicConstraints = critical,CA:TRUE\n"
    "keyUsage = critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier = hash\n"
    "[server_ext]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage = serverAuth\n"
    "subjectAltName = DNS:localhost,IP:127.0.0.1\n"
    "[client_ext]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage = clientAuth\n"
    "CNF\n"
    "K='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'\n"
    "for ca in ca other-ca; do\n"
    "  openssl req -x509 -config x.cnf -extensions ca_ext $K -keyout $ca.key -out $ca.pem -days 2"
    " -subj /CN=eplb-test-$ca\n"
    "done\n"
    "leaf() {\n"
    "  openssl req -new -config x.cnf $K -keyout $1.key -out $1.csr -subj /CN=$4\n"
    "  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -out $1.pem -days 2"
    " -extfile x.cnf -extensions $3\n"
    "}\n"
    "leaf server ca server_ext localhost\n"
    "leaf client ca client_ext eplb-test-client\n"
    "leaf other-client other-ca client_ext eplb-test-other-client\n";

/* File names of the test PKI, all in the server's directory. */
typedef struct pki {
    char ca[256], other_ca[256], server_cert[256], server_key[256];
    char client_cert[256], client_key[256], other_cert[256], other_key[256];
} pki;

static void make_pki(const char *dir, pki *k) {
    cr_assert_eq(system("command -v openssl >/dev/null"), 0,
                 "the openssl CLI is missing (scripts/setup.sh installs it with the test packages)");
    char script[256], cmd[512];
    snprintf(script, sizeof script, "%s/pki.sh", dir);
    FILE *f = fopen(script, "w");
    cr_assert_not_null(f);
    fputs(pki_script, f);
    cr_assert_eq(fclose(f), 0);
    snprintf(cmd, sizeof cmd, "cd '%s' && sh pki.sh >pki.log 2>&1", dir);
    cr_assert_eq(system(cmd), 0, "making the test certificates failed; see %s/pki.log", dir);
    snprintf(k->ca, sizeof k->ca, "%s/ca.pem", dir);
    snprintf(k->other_ca, sizeof k->other_ca, "%s/other-ca.pem", dir);
    snprintf(k->server_cert, sizeof k->server_cert, "%s/server.pem", dir);
    snprintf(k->server_key, sizeof k->server_key, "%s/server.key", dir);
    snprintf(k->client_cert, sizeof k->client_cert, "%s/client.pem", dir);
    snprintf(k->client_key, sizeof k->client_key, "%s/client.key", dir);
    snprintf(k->other_cert, sizeof k->other_cert, "%s/other-client.pem", dir);
    snprintf(k->other_key, sizeof k->other_key, "%s/other-client.key", dir);
}

/* A server directory with the PKI in it; the server is not started. */
static void tls_server(eplbd_proc *p, pki *k, bool mtls) {
    memset(p, 0, sizeof *p);
    eplbd_tmpdir(p);
    make_pki(p->dir, k);
    p->extra[0] = "--tls-cert";
    p->extra[1] = k->server_cert;
    p->extra[2] = "--tls-key";
    p->extra[3] = k->server_key;
    if (mtls) {
        p->extra[4] = "--tls-client-ca";
        p->extra[5] = k->ca;
    }
}

static void stop_server(eplbd_proc *p) {
    int rc = eplbd_stop(p);
    eplbd_cleanup(p);
    cr_assert_eq(rc, 0, "eplbd exited with %d at SIGTERM", rc);
}

static eplb_client *open_tls(const char *addr, const char *ca, const char *cert, const char *key) {
    eplb_client_tls tls = { .ca_file = ca, .cert_file = cert, .key_file = key };
    eplb_client *c = eplb_client_open_tls(addr, &tls, NULL);
    cr_assert_not_null(c, "cannot open a TLS channel to %s", addr);
    return c;
}

/* Health/Check on c: the call's status; *serving is 1 when the response
 * says SERVING. */
static int health(eplb_client *c, int timeout_ms, int *serving, char *message, size_t n) {
    upb_Arena *a = upb_Arena_New();
    size_t len;
    char *bytes = grpc_health_v1_HealthCheckRequest_serialize(grpc_health_v1_HealthCheckRequest_new(a), a, &len);
    eplb_call_result r;
    cr_assert_eq(eplb_client_call(c, "/grpc.health.v1.Health/Check", bytes, len, timeout_ms, &r), 0);
    int st = r.status;
    *serving = 0;
    if (st == 0) {
        grpc_health_v1_HealthCheckResponse *resp =
            grpc_health_v1_HealthCheckResponse_parse(r.body ? r.body : "", r.body_len, a);
        *serving = resp && grpc_health_v1_HealthCheckResponse_status(resp) == 1;
    }
    snprintf(message, n, "%s", r.message ? r.message : "");
    eplb_call_result_free(&r);
    upb_Arena_Free(a);
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

/* Health on c must work and say SERVING. */
static void expect_serving(eplb_client *c, const char *what) {
    char msg[512];
    int serving = 0;
    int st = health(c, call_timeout_ms(), &serving, msg, sizeof msg);
    cr_assert_eq(st, 0, "%s: Health/Check failed: %s: %s", what, eplb_grpc_status_name(st), msg);
    cr_assert(serving, "%s: Health/Check does not say SERVING", what);
}

/* Health on c must fail with UNAVAILABLE (the handshake failed). */
static void expect_refused(eplb_client *c, const char *what) {
    char msg[512];
    int serving = 0;
    int st = health(c, call_timeout_ms(), &serving, msg, sizeof msg);
    cr_assert_eq(st, 14 /* UNAVAILABLE */, "%s: Health/Check got %s (%s), want UNAVAILABLE", what,
                 eplb_grpc_status_name(st), msg);
}

/* Run a shell command; its exit status, its stdout and stderr in out. */
static int run_capture(const char *cmd, char *out, size_t n) {
    char full[8192];
    snprintf(full, sizeof full, "timeout 150 %s 2>&1", cmd);
    FILE *f = popen(full, "r");
    cr_assert_not_null(f);
    size_t got = fread(out, 1, n - 1, f);
    out[got] = '\0';
    int status = pclose(f);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

Test(tls, client_with_the_right_ca_is_served) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, false);
    eplbd_start(&p);
    cr_assert(eplbd_wait_log(&p, "TLS, database", 1000), "the start-up line does not say TLS");
    eplb_client *c = open_tls(p.addr, k.ca, NULL, NULL);
    expect_serving(c, "TLS client, right CA");
    char msg[512];
    int st = register_model(c, "tls-model", msg, sizeof msg);
    cr_assert_eq(st, 0, "RegisterModel over TLS: %s: %s", eplb_grpc_status_name(st), msg);
    eplb_client_close(c);
    /* A client certificate the server did not ask for does no harm. */
    c = open_tls(p.addr, k.ca, k.client_cert, k.client_key);
    expect_serving(c, "TLS client with an unrequested certificate");
    eplb_client_close(c);
    /* The name checked may be overridden: "localhost" is in the certificate. */
    eplb_client_tls tls = { .ca_file = k.ca, .server_name = "localhost" };
    c = eplb_client_open_tls(p.addr, &tls, NULL);
    cr_assert_not_null(c);
    expect_serving(c, "TLS client, server name localhost");
    eplb_client_close(c);
    stop_server(&p);
}

Test(tls, client_with_the_wrong_ca_is_refused) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, false);
    eplbd_start(&p);
    eplb_client *c = open_tls(p.addr, k.other_ca, NULL, NULL);
    expect_refused(c, "TLS client, unrelated CA");
    eplb_client_close(c);
    /* A name the certificate does not hold fails too. */
    eplb_client_tls tls = { .ca_file = k.ca, .server_name = "eplbd.example" };
    c = eplb_client_open_tls(p.addr, &tls, NULL);
    cr_assert_not_null(c);
    expect_refused(c, "TLS client, server name not in the certificate");
    eplb_client_close(c);
    stop_server(&p);
}

Test(tls, plaintext_client_is_refused) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, false);
    eplbd_start(&p);
    eplb_client *c = eplb_client_open(p.addr);
    cr_assert_not_null(c);
    expect_refused(c, "plaintext client against a TLS server");
    eplb_client_close(c);
    /* The server still serves TLS clients after that. */
    c = open_tls(p.addr, k.ca, NULL, NULL);
    expect_serving(c, "TLS client after a plaintext one");
    eplb_client_close(c);
    stop_server(&p);
}

Test(tls, tls_client_against_a_plaintext_server_fails) {
    eplbd_proc p;
    pki k;
    memset(&p, 0, sizeof p);
    eplbd_tmpdir(&p);
    make_pki(p.dir, &k);
    eplbd_start(&p);
    eplb_client *c = open_tls(p.addr, k.ca, NULL, NULL);
    expect_refused(c, "TLS client against a plaintext server");
    eplb_client_close(c);
    stop_server(&p);
}

Test(tls, mtls_requires_a_client_certificate_from_the_ca) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, true);
    eplbd_start(&p);
    cr_assert(eplbd_wait_log(&p, "mTLS, database", 1000), "the start-up line does not say mTLS");
    eplb_client *c = open_tls(p.addr, k.ca, k.client_cert, k.client_key);
    expect_serving(c, "mTLS client with a certificate from the CA");
    char msg[512];
    int st = register_model(c, "mtls-model", msg, sizeof msg);
    cr_assert_eq(st, 0, "RegisterModel over mTLS: %s: %s", eplb_grpc_status_name(st), msg);
    eplb_client_close(c);

    c = open_tls(p.addr, k.ca, NULL, NULL);
    expect_refused(c, "TLS client without a certificate against mTLS");
    eplb_client_close(c);

    c = open_tls(p.addr, k.ca, k.other_cert, k.other_key);
    expect_refused(c, "mTLS client with a certificate from an unrelated CA");
    eplb_client_close(c);

    c = eplb_client_open(p.addr);
    cr_assert_not_null(c);
    expect_refused(c, "plaintext client against mTLS");
    eplb_client_close(c);

    /* The good client still works after the refused ones. */
    c = open_tls(p.addr, k.ca, k.client_cert, k.client_key);
    expect_serving(c, "mTLS client after refused ones");
    eplb_client_close(c);
    stop_server(&p);
}

/* eplbd with these extra flags must exit non-zero at start, its log naming
 * every string of want (NULL-terminated). */
static void expect_refuses_to_start(eplbd_proc *p, const char *const *flags, const char *const *want) {
    memset(p->extra, 0, sizeof p->extra);
    for (int i = 0; flags[i]; i++)
        p->extra[i] = flags[i];
    char log_path[256];
    snprintf(log_path, sizeof log_path, "%s/eplbd.log", p->dir);
    unlink(log_path);
    int status = 0;
    int started = eplbd_try_start(p, &status);
    if (started) {
        eplbd_stop(p);
        cr_assert_fail("eplbd started with %s %s ...", flags[0], flags[1]);
    }
    cr_assert_neq(status, 0);
    static char log[1 << 16];
    eplbd_log(p, log, sizeof log);
    for (int i = 0; want[i]; i++)
        cr_assert_not_null(strstr(log, want[i]), "eplbd's message does not name '%s': %s", want[i], log);
}

Test(tls, bad_flag_combinations_refuse_to_start) {
    eplbd_proc p;
    pki k;
    memset(&p, 0, sizeof p);
    eplbd_tmpdir(&p);
    make_pki(p.dir, &k);
    char missing[256];
    snprintf(missing, sizeof missing, "%s/no-such.pem", p.dir);

    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, NULL },
                            (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-key", k.server_key, NULL },
                            (const char *[]){ "--tls-key", k.server_key, "--tls-cert", NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-client-ca", k.ca, NULL },
                            (const char *[]){ "--tls-client-ca", k.ca, NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-client-ca", k.ca, "--tls-key", k.server_key, NULL },
                            (const char *[]){ "--tls-key", "--tls-cert", NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", missing, "--tls-key", k.server_key, NULL },
                            (const char *[]){ "--tls-cert", missing, "No such file", NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", missing, NULL },
                            (const char *[]){ "--tls-key", missing, NULL });
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", k.server_key,
                                                  "--tls-client-ca", missing, NULL },
                            (const char *[]){ "--tls-client-ca", missing, NULL });
    /* Swapped files: neither is what its flag wants. */
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_key, "--tls-key", k.server_cert, NULL },
                            (const char *[]){ "--tls-cert", k.server_key, NULL });
    /* A certificate and a key that are not a pair: gRPC refuses the listen. */
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", k.client_key, NULL },
                            (const char *[]){ "--tls-cert", "--tls-key", NULL });
    /* A directory opens but does not read. */
    expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", p.dir, NULL },
                            (const char *[]){ "--tls-key", p.dir, "cannot read", NULL });
    /* Unreadable (mode 000) -- root reads anything, so only when not root. */
    if (geteuid() != 0) {
        char unreadable[256], cmd[600];
        snprintf(unreadable, sizeof unreadable, "%s/unreadable.key", p.dir);
        snprintf(cmd, sizeof cmd, "cp '%s' '%s' && chmod 000 '%s'", k.server_key, unreadable, unreadable);
        cr_assert_eq(system(cmd), 0);
        expect_refuses_to_start(&p, (const char *[]){ "--tls-cert", k.server_cert, "--tls-key", unreadable, NULL },
                                (const char *[]){ "--tls-key", unreadable, "Permission denied", NULL });
    }
    eplbd_cleanup(&p);
}

Test(tls, help_lists_the_tls_flags) {
    char out[16384];
    cr_assert_eq(run_capture(EPLBD_PATH " --help", out, sizeof out), 0);
    cr_assert_not_null(strstr(out, "--tls-cert PEM"), "%s", out);
    cr_assert_not_null(strstr(out, "--tls-key PEM"), "%s", out);
    cr_assert_not_null(strstr(out, "--tls-client-ca PEM"), "%s", out);
    cr_assert_eq(run_capture(EPLBCTL_PATH " --help", out, sizeof out), 0);
    cr_assert_not_null(strstr(out, "--tls-ca PEM"), "%s", out);
    cr_assert_not_null(strstr(out, "--tls-server-name"), "%s", out);
}

Test(tls, eplbctl_with_tls_options) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, false);
    eplbd_start(&p);
    char cmd[2048], out[8192];
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d --tls-ca '%s' health", EPLBCTL_PATH, p.addr, ctl_timeout_s(), k.ca);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 0, "%s", out);
    cr_assert_not_null(strstr(out, "SERVING"), "%s", out);
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d --tls-ca '%s' --tls-server-name localhost list",
             EPLBCTL_PATH, p.addr, ctl_timeout_s(), k.ca);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 0, "%s", out);
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d --tls-ca '%s' health", EPLBCTL_PATH, p.addr, ctl_timeout_s(), k.other_ca);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 1, "%s", out);
    cr_assert_not_null(strstr(out, "UNAVAILABLE"), "%s", out);
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d health", EPLBCTL_PATH, p.addr, ctl_timeout_s());
    cr_assert_eq(run_capture(cmd, out, sizeof out), 1, "%s", out);
    /* Usage errors name the flag. */
    snprintf(cmd, sizeof cmd, "%s --addr %s --tls-ca '%s/nope.pem' health", EPLBCTL_PATH, p.addr, p.dir);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--tls-ca"), "%s", out);
    snprintf(cmd, sizeof cmd, "%s --addr %s --tls-cert '%s' health", EPLBCTL_PATH, p.addr, k.client_cert);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 2, "%s", out);
    cr_assert_not_null(strstr(out, "--tls-ca"), "%s", out);
    stop_server(&p);

    tls_server(&p, &k, true);
    eplbd_start(&p);
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d --tls-ca '%s' --tls-cert '%s' --tls-key '%s' health",
             EPLBCTL_PATH, p.addr, ctl_timeout_s(), k.ca, k.client_cert, k.client_key);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 0, "%s", out);
    snprintf(cmd, sizeof cmd, "%s --addr %s --timeout %d --tls-ca '%s' health", EPLBCTL_PATH, p.addr, ctl_timeout_s(), k.ca);
    cr_assert_eq(run_capture(cmd, out, sizeof out), 1, "%s", out);
    stop_server(&p);
}

Test(tls, tls_on_a_unix_socket) {
    eplbd_proc p;
    pki k;
    tls_server(&p, &k, false);
    char sock[256];
    snprintf(sock, sizeof sock, "unix:%s/eplbd.sock", p.dir);
    p.extra[4] = "--listen";
    p.extra[5] = sock;
    eplbd_start(&p);
    cr_assert_str_eq(p.addr, sock);
    /* gRPC checks "localhost" for a unix: target; the certificate has it. */
    eplb_client *c = open_tls(p.addr, k.ca, NULL, NULL);
    expect_serving(c, "TLS client on a unix socket");
    eplb_client_close(c);
    c = eplb_client_open(p.addr);
    cr_assert_not_null(c);
    expect_refused(c, "plaintext client on a TLS unix socket");
    eplb_client_close(c);
    stop_server(&p);
}
