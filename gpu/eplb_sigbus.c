/* eplb_sigbus.c -- the SIGBUS guard (eplb_sigbus.h). */
#include "eplb_sigbus.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef struct guard {
    sigjmp_buf jb;
    const eplb_sigbus_range *ranges;
    size_t n;
    void *volatile addr;  /* written by the handler, read after the jump */
    struct guard *outer;  /* the guard this one nests in */
} guard;

/* The armed guard of this thread, NULL when none.  Written only by its own
 * thread (and by the handler running on that thread). */
static _Thread_local guard *volatile armed;

static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_errno;      /* 0: installed */
static struct sigaction prev;  /* the handler before ours; written once, before ours runs */

static bool covers(const guard *g, const void *addr) {
    uintptr_t a = (uintptr_t)addr;
    for (size_t i = 0; i < g->n; i++) {
        uintptr_t b = (uintptr_t)g->ranges[i].base;
        if (a >= b && a - b < g->ranges[i].size)
            return true;
    }
    return false;
}

/* Not ours: what would have happened without us. */
static void pass_on(int sig, siginfo_t *si, void *uc) {
    bool from_kernel = si && si->si_code > 0;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) {
            prev.sa_sigaction(sig, si, uc);
            return;
        }
    } else if (prev.sa_handler == SIG_IGN && !from_kernel) {
        return; /* a SIGBUS sent by kill() to a process that ignores it */
    } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        prev.sa_handler(sig);
        return;
    }
    /* The default action.  A fault: returning re-runs the faulting
     * instruction, which now kills the process (with the right address in
     * the core).  A signal sent by a process: send it again; it is blocked
     * in this handler and delivered, with the default action, on return. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (!from_kernel)
        raise(sig);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    int saved = errno;
    guard *g = armed;
    if (g && si && si->si_code > 0 && covers(g, si->si_addr)) {
        g->addr = si->si_addr;
        armed = g->outer;
        siglongjmp(g->jb, 1); /* restores the mask saved by sigsetjmp: SIGBUS unblocked */
    }
    pass_on(sig, si, uc);
    errno = saved;
}

static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &prev) != 0)
        install_errno = errno ? errno : EINVAL;
}

int eplb_sigbus_install(void) {
    pthread_once(&install_once, install);
    if (install_errno) {
        errno = install_errno;
        return -1;
    }
    return 0;
}

int eplb_sigbus_call(void (*fn)(void *arg), void *arg, const eplb_sigbus_range *ranges, size_t n,
                     void **fault_addr) {
    guard g;
    g.ranges = ranges;
    g.n = n;
    g.addr = NULL;
    g.outer = armed;
    if (sigsetjmp(g.jb, 1) != 0) {
        /* The handler already disarmed g (armed = g.outer). */
        if (fault_addr)
            *fault_addr = g.addr;
        return 1;
    }
    armed = &g;
    fn(arg);
    armed = g.outer;
    return 0;
}
