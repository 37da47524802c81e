/* eplb_store.h -- durable state in SQLite, behind eplb_store_ops.
 *
 * One row per model (identity, shape, epoch, move state, phy2log as a
 * little-endian int32 blob), one per load window and one per pending
 * rebalance (a rebalance committed in steps with steps left, or one the
 * engine executes awaiting CommitRebalance: its id, progress, execution
 * and full target map); every save is one transaction with
 * synchronous=FULL in WAL mode, so a crash at any moment leaves the last
 * committed record, never a half-written one: a step's new map and its
 * pending row commit together.  The schema is versioned with PRAGMA
 * user_version (4; a version-1, -2 or -3 file is migrated in one
 * transaction at open, step by step; a newer one is refused).
 *
 * Integrity: every row carries a CRC-64/XZ of a canonical encoding of all
 * its other columns (below), written by save and checked by load_all along
 * with the range of every stored value.  A row that fails is not served:
 * load_all passes the model with only model_id and `damaged` set, and the
 * rest of the database loads normally.  The checksum catches hand edits and
 * corruption below SQLite's radar; it is no defence against someone who
 * writes the file on purpose and recomputes it.
 *
 *   canonical encoding of a row = tag, then each column in table order:
 *     INTEGER  0x01, the int64 as 8 bytes little-endian (two's complement)
 *     TEXT     0x03, length as 8 bytes LE, the UTF-8 bytes (no NUL)
 *     BLOB     0x04, length as 8 bytes LE, the bytes
 *     NULL     0x05
 *   tag: "eplbd.models.v4", "eplbd.windows.v2" or "eplbd.rebalances.v4"
 *        (its bytes, no NUL; it names the row format: windows have not
 *        changed since schema 2; schema 2-3 models rows were
 *        "eplbd.models.v2" without the default_* and expert_bytes columns,
 *        schema 3 rebalances rows "eplbd.rebalances.v3" without the last
 *        three)
 *   models:  model_id, role, main_model_id, architecture, resolved_path,
 *            num_layers, num_logical, num_physical, num_local,
 *            num_redundant, num_shared, num_groups, ep_size, num_nodes,
 *            window_size, step_interval, auto_rebalance, epoch,
 *            placement_physical, num_valid_physical, state, state_reason,
 *            phy2log, then the rebalance defaults (ParallelConfig):
 *            default_policy, default_target_balancedness,
 *            default_max_bytes_moved, default_max_slots_moved,
 *            default_min_improvement, default_cost_intra_node,
 *            default_cost_cross_node, expert_bytes (doubles as their
 *            IEEE-754 bits, uint64s as the int64 of the same bits)
 *   windows: model_id, passes, count, records
 *   rebalances: model_id, id, layers_per_step, layers_done, with_weights,
 *            balancedness_before, balancedness_after (each the double's
 *            IEEE-754 bits as an INTEGER), num_layers, num_physical,
 *            num_valid_physical, epoch, phy2log (the target's, packed as
 *            in models), execution (0 eplbd, 1 the engine),
 *            max_staging_bytes, expert_bytes (uint64 bits); no row: none
 *            pending
 *   checksum column: the CRC as a signed 64-bit integer (same bits).
 *
 * Exclusive: a file database is locked for the store's lifetime with
 * flock() on "<path>.lock", which holds the holder's pid, so a second eplbd
 * on the same file is refused at open and told who holds it.  The kernel
 * drops the lock when its holder dies, so a crash never blocks a restart.
 *
 * Errors (status, then what an operator does):
 *   EPLB_EUNAVAILABLE  held by another eplbd, read-only file/directory/
 *                      mount, cannot open, busy: fix and restart/retry
 *   EPLB_ENOSPACE      disk, quota or eplb_store_set_size_limit full
 *   EPLB_EDATALOSS     the file is not a database or SQLite found it
 *                      corrupt (per-row damage is not an error: `damaged`)
 *   EPLB_ENOMEM        out of memory
 *   EPLB_EINTERNAL     anything else (a bug, an I/O error) */
#ifndef EPLB_STORE_H
#define EPLB_STORE_H

#include <stdint.h>

#include "eplb_registry.h"
#include "eplb_status.h"

typedef struct eplb_store eplb_store;

/* Open (creating if needed) the database at path; ":memory:" is allowed
 * (no lock file).  Takes the lock, migrates an older schema, and proves the
 * file writable with one committed write, so a read-only database or a full
 * disk is refused here rather than at the first save.  On error *out is
 * NULL and err says what failed. */
eplb_status eplb_store_open(const char *path, eplb_store **out, eplb_error *err);
/* Close the database, then release the lock.  NULL is fine. */
void eplb_store_close(eplb_store *s);

/* Cap the database at about max_bytes (rounded down to whole pages, never
 * below its current size; 0 lifts the cap): a save that would grow it past
 * the cap fails EPLB_ENOSPACE and changes nothing, as on a full disk.  For
 * a quota (a --max-db-mib flag) and for tests.  *effective (may be NULL) is
 * the cap in bytes now in force. */
eplb_status eplb_store_set_size_limit(eplb_store *s, uint64_t max_bytes, uint64_t *effective,
                                      eplb_error *err);

/* Test hook, SQLite-style fault injection: the nth SQLite call the store
 * makes from now on (1 = the next; every open, prepare, step and exec
 * counts) fails with sqlite_rc as if SQLite had returned it, with
 * sys_errno as its sqlite3_system_errno (for SQLITE_IOERR with ENOSPC).
 * nth <= 0 disarms.  s == NULL arms the next eplb_store_open instead.
 * Returns the number of calls counted since the last eplb_store_set_fault
 * on s (so a loop over 1..n knows when it has passed every call).
 * Allocations are failed with eplb_alloc_fail_at (eplb_alloc.h).
 * Inert in production: one branch per SQLite call. */
long eplb_store_set_fault(eplb_store *s, long nth, int sqlite_rc, int sys_errno);

/* The operations the registry uses; ctx is the eplb_store *. */
extern const eplb_store_ops eplb_store_sqlite_ops;

#endif
