/* eplb_store.h -- durable state in SQLite, behind eplb_store_ops.
 *
 * One row per model (identity, shape, epoch, phy2log as a little-endian
 * int32 blob); every save is one transaction with synchronous=FULL in WAL
 * mode, so a crash at any moment leaves the last committed record, never a
 * half-written one.  The schema is versioned with PRAGMA user_version. */
#ifndef EPLB_STORE_H
#define EPLB_STORE_H

#include "eplb_registry.h"
#include "eplb_status.h"

typedef struct eplb_store eplb_store;

/* Open (creating if needed) the database at path; ":memory:" is allowed.
 * On error *out is NULL and err says what failed. */
eplb_status eplb_store_open(const char *path, eplb_store **out, eplb_error *err);
void eplb_store_close(eplb_store *s);

/* The operations the registry uses; ctx is the eplb_store *. */
extern const eplb_store_ops eplb_store_sqlite_ops;

#endif
