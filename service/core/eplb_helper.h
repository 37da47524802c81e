/* eplb_helper.h -- one helper thread that shares work split into items.
 *
 * The DEEPSEEK policy's layers are independent, and a Rebalance at
 * DeepSeek-V3 size spends ~0.3 ms in it on one core of this 2-core machine
 * class.  eplb_helper_share runs a worker function on the calling thread
 * and, when the process-wide helper thread is free, on it too; the worker
 * takes items (say, layers) from a counter the two share until none are
 * left.  So the answer never depends on the helper: a helper that is busy
 * (another model's rebalance), late to wake (a halted vCPU takes tens to
 * hundreds of microseconds) or absent (pthread_create failed, or
 * eplb_helper_set_enabled(false)) only means the caller takes more items.
 * A call waits for the helper only while it is inside the worker; one
 * that was handed the work and has not woken yet is called off.
 *
 * The helper starts on first use, blocks every signal (eplbd's signal
 * handling stays on its own threads) and holds no lock while it works. */
#ifndef EPLB_HELPER_H
#define EPLB_HELPER_H

#include <stdbool.h>

typedef void (*eplb_helper_fn)(void *arg);

/* Runs fn(arg) here and, when the helper is free, there too; returns when
 * both calls that started have returned.  fn must be thread-safe and take
 * its items from state in arg (an atomic counter), so that it is correct
 * run once, twice at once, or with the helper's run cut short before it
 * starts. */
void eplb_helper_share(eplb_helper_fn fn, void *arg);

/* Tests: false makes every share run on the caller alone; returns the
 * previous value. */
bool eplb_helper_set_enabled(bool on);

/* Calls in which the helper ran the worker (tests). */
unsigned long eplb_helper_runs(void);

#endif
