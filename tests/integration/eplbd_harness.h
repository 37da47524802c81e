/* eplbd_harness.h -- start a real eplbd process on an ephemeral port with a
 * temporary database, call it over gRPC, stop it with SIGTERM.
 *
 * A server dies with the test process that started it (PR_SET_PDEATHSIG),
 * so a failed assertion leaves no eplbd behind.
 *
 * EPLBD_WRAPPER in the environment (e.g. "valgrind --error-exitcode=99 ...")
 * is put in front of the server's command line; the harness then waits
 * longer and eplbd_stop() returns the wrapper's exit status, so a memory
 * error fails the test that stopped the server. */
#ifndef EPLBD_HARNESS_H
#define EPLBD_HARNESS_H

#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "eplb/v1/eplb.upb.h"
#include "eplb_client.h"

typedef struct eplbd_proc {
    pid_t pid;
    char dir[128];       /* temporary directory: database, ready file, log */
    char addr[128];      /* 127.0.0.1:PORT */
    char db[192];
    const char *extra[8]; /* more eplbd arguments, NULL-terminated */
} eplbd_proc;

static inline int harness_slow(void) {
    const char *w = getenv("EPLBD_WRAPPER");
    return w && *w;
}

/* Make a fresh temporary directory for a server's files. */
static inline void eplbd_tmpdir(eplbd_proc *p) {
    snprintf(p->dir, sizeof p->dir, "/tmp/eplbd-test-XXXXXX");
    cr_assert_not_null(mkdtemp(p->dir));
    snprintf(p->db, sizeof p->db, "%s/eplbd.db", p->dir);
}

/* Start eplbd on p->db (keeps p->dir and p->db) and wait until it serves
 * (returns 1, p->addr set) or exits first (returns 0, *exit_status is its
 * exit code, or 128 + signal).  Fails the test when it does neither within
 * the start-up limit. */
static inline int eplbd_try_start(eplbd_proc *p, int *exit_status) {
    char ready[192], log[192];
    snprintf(ready, sizeof ready, "%s/ready", p->dir);
    snprintf(log, sizeof log, "%s/eplbd.log", p->dir);
    unlink(ready);
    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        /* A test that fails an assertion exits without stopping its
         * server: the server (or its wrapper) dies with the test. */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(125);
        char *argv[64];
        int n = 0;
        char wrapper[512] = "";
        const char *w = getenv("EPLBD_WRAPPER");
        if (w && *w) {
            snprintf(wrapper, sizeof wrapper, "%s", w);
            for (char *tok = strtok(wrapper, " "); tok && n < 40; tok = strtok(NULL, " "))
                argv[n++] = tok;
        }
        argv[n++] = (char *)EPLBD_PATH;
        argv[n++] = "--listen";
        argv[n++] = "127.0.0.1:0";
        argv[n++] = "--db";
        argv[n++] = p->db;
        argv[n++] = "--ready-file";
        argv[n++] = ready;
        argv[n++] = "--workers";
        argv[n++] = "4";
        argv[n++] = "--drain-ms";
        argv[n++] = "5000";
        for (int k = 0; k < 8 && p->extra[k]; k++)
            argv[n++] = (char *)p->extra[k];
        argv[n] = NULL;
        /* The server's output goes to its log, never to the test's pipes. */
        if (!freopen(log, "a", stderr) || !freopen("/dev/null", "w", stdout))
            _exit(126);
        execvp(argv[0], argv);
        _exit(127);
    }
    p->pid = pid;
    int limit_ms = harness_slow() ? 120000 : 15000;
    for (int waited = 0; waited < limit_ms; waited += 20) {
        FILE *f = fopen(ready, "r");
        if (f) {
            int ok = fgets(p->addr, sizeof p->addr, f) != NULL;
            fclose(f);
            if (ok) {
                p->addr[strcspn(p->addr, "\n")] = '\0';
                return 1;
            }
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            *exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            p->pid = 0;
            return 0;
        }
        usleep(20000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    cr_assert_fail("eplbd did not become ready within %d ms", limit_ms);
    return 0;
}

/* Start eplbd on p->db (keeps p->dir and p->db) and wait until it serves. */
static inline void eplbd_start(eplbd_proc *p) {
    int status = 0;
    if (!eplbd_try_start(p, &status))
        cr_assert_fail("eplbd exited during start-up (status %d); see %s/eplbd.log", status, p->dir);
}

/* Wait up to limit_ms for the server to exit; its exit status (128 +
 * signal when killed), or -1 if it is still running. */
static inline int eplbd_wait(eplbd_proc *p, int limit_ms) {
    int status = 0;
    for (int waited = 0; waited <= limit_ms; waited += 10) {
        if (waitpid(p->pid, &status, WNOHANG) == p->pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        usleep(10000);
    }
    return -1;
}

/* The server's log so far (its stderr), NUL-terminated, at most n - 1
 * bytes (the start of the file). */
static inline const char *eplbd_log(const eplbd_proc *p, char *buf, size_t n) {
    char path[192];
    snprintf(path, sizeof path, "%s/eplbd.log", p->dir);
    buf[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f) {
        size_t got = fread(buf, 1, n - 1, f);
        buf[got] = '\0';
        fclose(f);
    }
    return buf;
}

/* Wait up to limit_ms for text to appear at least count times in the
 * server's log; 1 if it did. */
static inline int eplbd_wait_log_n(const eplbd_proc *p, const char *text, int count, int limit_ms) {
    static char buf[1 << 20];
    for (int waited = 0; waited <= limit_ms; waited += 10) {
        int n = 0;
        for (const char *at = eplbd_log(p, buf, sizeof buf); (at = strstr(at, text)) != NULL; at += strlen(text))
            n++;
        if (n >= count)
            return 1;
        usleep(10000);
    }
    return 0;
}

static inline int eplbd_wait_log(const eplbd_proc *p, const char *text, int limit_ms) {
    return eplbd_wait_log_n(p, text, 1, limit_ms);
}

/* Milliseconds on the monotonic clock. */
static inline double harness_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* SIGTERM, wait, and return the exit status (-1 if it did not exit). */
static inline int eplbd_stop(eplbd_proc *p) {
    kill(p->pid, SIGTERM);
    int rc = eplbd_wait(p, harness_slow() ? 120000 : 20000);
    if (rc == -1) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, NULL, 0);
    }
    return rc;
}

static inline void eplbd_cleanup(eplbd_proc *p) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", p->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", p->dir);
}

static inline int call_timeout_ms(void) { return harness_slow() ? 60000 : 10000; }

/* One unary call on its own thread, for tests that need several in flight
 * at once (the channel of client is shared; gRPC channels are thread-safe).
 * Fill the inputs, harness_call_start, later harness_call_join; then rc
 * (eplb_client_call's), status, message, and when it started and ended on
 * harness_now_ms's clock. */
typedef struct harness_call {
    eplb_client *client;
    char method[128];   /* full path: "/eplb.v1.ExpertBalancer/RegisterModel" */
    char *req;          /* request bytes (malloc'd copy, freed by join) */
    size_t len;
    int timeout_ms;
    int rc, status;
    char message[256];
    double start_ms, end_ms;
    pthread_t thread;
} harness_call;

static inline void *harness_call_main(void *arg) {
    harness_call *c = arg;
    eplb_call_result r;
    c->start_ms = harness_now_ms();
    c->rc = eplb_client_call(c->client, c->method, c->req, c->len, c->timeout_ms, &r);
    c->end_ms = harness_now_ms();
    c->status = r.status;
    snprintf(c->message, sizeof c->message, "%s", r.message ? r.message : "");
    eplb_call_result_free(&r);
    return NULL;
}

static inline void harness_call_start(harness_call *c, eplb_client *client, const char *method,
                                      const void *req, size_t len, int timeout_ms) {
    memset(c, 0, sizeof *c);
    c->client = client;
    snprintf(c->method, sizeof c->method, "%s", method);
    c->req = malloc(len ? len : 1);
    cr_assert_not_null(c->req);
    memcpy(c->req, req, len);
    c->len = len;
    c->timeout_ms = timeout_ms;
    cr_assert_eq(pthread_create(&c->thread, NULL, harness_call_main, c), 0);
}

static inline void harness_call_join(harness_call *c) {
    pthread_join(c->thread, NULL);
    free(c->req);
    c->req = NULL;
}

/* The usual suite fixture: a fresh server and a client connected to it;
 * stopping asserts a clean exit at SIGTERM (so valgrind's verdict counts). */
static inline void eplbd_suite_start(eplbd_proc *p, eplb_client **client) {
    eplbd_tmpdir(p);
    eplbd_start(p);
    *client = eplb_client_open(p->addr);
    cr_assert_not_null(*client);
}

static inline void eplbd_suite_stop(eplbd_proc *p, eplb_client *client) {
    eplb_client_close(client);
    int rc = eplbd_stop(p);
    eplbd_cleanup(p);
    cr_assert_eq(rc, 0, "eplbd exited with %d at SIGTERM", rc);
}

/* ---- requests every suite builds ------------------------------------------ */

/* A RegisterModelRequest of an MoE "DeepseekV3ForCausalLM": L layers, N
 * logical experts, P physical slots on ep ranks (P - N redundant). */
static inline eplb_v1_RegisterModelRequest *harness_moe_request(upb_Arena *a, const char *name, uint32_t L,
                                                                uint32_t N, uint32_t P, uint32_t ep) {
    eplb_v1_RegisterModelRequest *r = eplb_v1_RegisterModelRequest_new(a);
    eplb_v1_RegisterModelRequest_set_model_name(r, upb_StringView_FromString(name));
    eplb_v1_ModelHandle *h = eplb_v1_RegisterModelRequest_mutable_model(r, a);
    eplb_v1_ModelHandle_set_architecture(h, upb_StringView_FromString("DeepseekV3ForCausalLM"));
    eplb_v1_ModelHandle_add_interfaces(h, eplb_v1_MIXTURE_OF_EXPERTS, a);
    eplb_v1_MoeSpec *m = eplb_v1_ModelHandle_mutable_moe(h, a);
    eplb_v1_MoeSpec_set_num_moe_layers(m, L);
    eplb_v1_MoeSpec_set_num_logical_experts(m, N);
    eplb_v1_MoeSpec_set_num_physical_experts(m, P);
    eplb_v1_MoeSpec_set_num_local_physical_experts(m, P / ep);
    eplb_v1_MoeSpec_set_num_redundant_experts(m, P - N);
    eplb_v1_ParallelConfig *p = eplb_v1_RegisterModelRequest_mutable_parallel(r, a);
    eplb_v1_ParallelConfig_set_enable_eplb(p, true);
    eplb_v1_ParallelConfig_set_ep_size(p, ep);
    return r;
}

/* One unary call of eplb.v1.ExpertBalancer/<method>: its status; the
 * status message into msg (when not NULL); when OK and body is not NULL, a
 * copy of the response bytes in the arena (parse it from there). */
static inline int harness_rpc(eplb_client *c, const char *method, const char *bytes, size_t len, upb_Arena *a,
                              char **body, size_t *body_len, char *msg, size_t n) {
    char path[128];
    eplb_call_result r;
    snprintf(path, sizeof path, "/eplb.v1.ExpertBalancer/%s", method);
    cr_assert_eq(eplb_client_call(c, path, bytes, len, call_timeout_ms(), &r), 0);
    if (msg)
        snprintf(msg, n, "%s", r.message ? r.message : "");
    if (body && r.status == 0) {
        *body = upb_Arena_Malloc(a, r.body_len + 1);
        cr_assert_not_null(*body);
        memcpy(*body, r.body, r.body_len);
        *body_len = r.body_len;
    }
    int st = r.status;
    eplb_call_result_free(&r);
    return st;
}

#endif
