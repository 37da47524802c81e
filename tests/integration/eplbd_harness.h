/* eplbd_harness.h -- start a real eplbd process on an ephemeral port with a
 * temporary database, call it over gRPC, stop it with SIGTERM.
 *
 * EPLBD_WRAPPER in the environment (e.g. "valgrind --error-exitcode=99 ...")
 * is put in front of the server's command line; the harness then waits
 * longer and eplbd_stop() returns the wrapper's exit status, so a memory
 * error fails the test that stopped the server. */
#ifndef EPLBD_HARNESS_H
#define EPLBD_HARNESS_H

#include <criterion/criterion.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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

/* Start eplbd on p->db (keeps p->dir and p->db) and wait until it serves. */
static inline void eplbd_start(eplbd_proc *p) {
    char ready[192], log[192];
    snprintf(ready, sizeof ready, "%s/ready", p->dir);
    snprintf(log, sizeof log, "%s/eplbd.log", p->dir);
    unlink(ready);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
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
                return;
            }
        }
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            cr_assert_fail("eplbd exited during start-up (status %d); see %s", status, log);
        usleep(20000);
    }
    kill(pid, SIGKILL);
    cr_assert_fail("eplbd did not become ready within %d ms", limit_ms);
}

/* SIGTERM, wait, and return the exit status (-1 if it did not exit). */
static inline int eplbd_stop(eplbd_proc *p) {
    int status = 0;
    kill(p->pid, SIGTERM);
    int limit_ms = harness_slow() ? 120000 : 20000;
    for (int waited = 0; waited < limit_ms; waited += 10) {
        if (waitpid(p->pid, &status, WNOHANG) == p->pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        usleep(10000);
    }
    kill(p->pid, SIGKILL);
    waitpid(p->pid, &status, 0);
    return -1;
}

static inline void eplbd_cleanup(eplbd_proc *p) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", p->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", p->dir);
}

static inline int call_timeout_ms(void) { return harness_slow() ? 60000 : 10000; }

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

#endif
