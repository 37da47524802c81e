/* eplb_sigbus.h -- a copy into or out of a shm mapping that runs into
 * SIGBUS returns an error instead of killing the process.
 *
 * Why: the engine owns its shm objects and may truncate one (a crash and
 * restart, an operator's `truncate -s0`, a bug) while eplbd has it mapped;
 * the next access past the new end of the object raises SIGBUS, whose
 * default action kills eplbd and every model it serves.  fstat() before a
 * move (the cpu backend's check) catches a shrink that happened earlier;
 * this guard catches one that happens during the copy itself.
 *
 * How: one process-wide SIGBUS handler, installed once; a thread-local
 * guard (a sigjmp_buf plus the address ranges it covers) that is armed only
 * while eplb_sigbus_call runs its function.  A SIGBUS raised by the kernel
 * for an address inside an armed guard's ranges jumps back to
 * eplb_sigbus_call, which returns 1.  Any other SIGBUS -- no guard armed in
 * that thread, an address outside the ranges (a real bug: staging or the
 * heap), or one sent with kill() -- goes to the handler that was installed
 * before ours, or, when that was the default, kills the process with the
 * default action (core dump and all), as if we had never been there.
 *
 * Cost: eplb_sigbus_call is one sigsetjmp (one sigprocmask system call); the
 * copies themselves run at full speed. */
#ifndef EPLB_SIGBUS_H
#define EPLB_SIGBUS_H

#include <stddef.h>

typedef struct eplb_sigbus_range {
    const void *base;
    size_t size;
} eplb_sigbus_range;

/* Install the handler (once per process; later calls only report the first
 * result).  0, or -1 with errno set when sigaction failed. */
int eplb_sigbus_install(void);

/* Run fn(arg) in this thread with the guard armed over ranges[0..n).
 * Returns 0 when fn ran to its end; 1 when a SIGBUS on one of the ranges cut
 * it short (*fault_addr, when not NULL, is the faulting address).  fn is then
 * abandoned part-way: it must take no lock and acquire nothing it would
 * release at its end, and what it wrote through its argument before the
 * fault must be volatile to be read afterwards.  Guards nest (the innermost
 * one wins).  The handler must be installed (eplb_sigbus_install) first. */
int eplb_sigbus_call(void (*fn)(void *arg), void *arg, const eplb_sigbus_range *ranges, size_t n,
                     void **fault_addr);

#endif
