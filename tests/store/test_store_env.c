/* test_store_env.c -- the store against its surroundings: a second eplbd
 * on the same file, a read-only file or directory, a full disk or quota,
 * and SQLite or allocation failures at every call.  Each of these must be
 * refused with a status an operator can act on and leave the stored rows as
 * they were.
 *
 * Tests run as root here, which chmod does not stop: the read-only cases
 * run in a child that drops to uid 65534 (or as the caller when not root),
 * and the full disk is a real tmpfs in a private mount namespace (skipped
 * where mounting is not allowed; the size cap covers the same path). */
#define _GNU_SOURCE
#include "store_test_util.h"

#include <errno.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>

#include "eplb_alloc.h"

TestSuite(lock, .init = tdir_setup, .fini = tdir_teardown);
TestSuite(readonly, .init = tdir_setup, .fini = tdir_teardown);
TestSuite(full, .init = tdir_setup, .fini = tdir_teardown);
TestSuite(faults, .init = tdir_setup, .fini = tdir_teardown);

static eplb_store *open_at(const char *path) {
    eplb_store *s;
    eplb_error err;
    cr_assert_eq(eplb_store_open(path, &s, &err), EPLB_OK, "%s", err.msg);
    return s;
}

/* ds saved at epoch 0 with one window record: "the previous row". */
static void save_base(eplb_store *s) {
    eplb_model_record r;
    rec_ds(&r, "ds");
    rec_push(&r, 1, 5);
    eplb_error err;
    cr_assert_eq(save(s, &r, &err), EPLB_OK, "%s", err.msg);
    rec_free(&r);
}

/* What a failed save must not have touched. */
static void expect_base(eplb_store *s, const char *what) {
    loaded l;
    eplb_error err;
    cr_assert_eq(load(s, &l, &err), EPLB_OK, "%s: %s", what, err.msg);
    cr_assert_eq(l.n, 1, "%s", what);
    cr_assert_str_empty(l.recs[0].damaged, "%s: %s", what, l.recs[0].damaged);
    cr_assert_eq(l.recs[0].placement.epoch, 0, "%s", what);
    cr_assert_eq(l.recs[0].state, EPLB_MOVE_IDLE, "%s", what);
    cr_assert_eq(l.recs[0].window.count, 1, "%s", what);
    loaded_free(&l);
}

/* The next version of ds: epoch 1, NEEDS_RELOAD, window of n records. */
static void rec_next(eplb_model_record *r, int n) {
    rec_ds(r, "ds");
    r->placement.epoch = 1;
    r->state = EPLB_MOVE_NEEDS_RELOAD;
    snprintf(r->state_reason, sizeof r->state_reason, "scatter failed");
    rec_push(r, n, 5);
}

/* ---- exclusive ------------------------------------------------------------- */

Test(lock, second_open_is_refused_naming_the_holder) {
    eplb_store *a = open_at(tdb), *b;
    eplb_error err;
    cr_assert_eq(eplb_store_open(tdb, &b, &err), EPLB_EUNAVAILABLE);
    cr_assert_null(b);
    char want[300];
    snprintf(want, sizeof want, "store: database %s is held by another eplbd (pid %d)", tdb, (int)getpid());
    cr_assert_str_eq(err.msg, want);
    /* The first is unharmed. */
    save_base(a);
    expect_base(a, "holder");
    eplb_store_close(a);
    b = open_at(tdb);
    expect_base(b, "after the holder closed");
    eplb_store_close(b);
}

/* The lock is on the file, not the name: another name for it, or the
 * .lock file removed under the holder, is refused as well, and opens once
 * the holder has closed. */
static void expect_held(const char *path, const char *want) {
    eplb_store *b;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_store_open(path, &b, &err);
    if (st == EPLB_OK)
        eplb_store_close(b);
    cr_assert_eq(st, EPLB_EUNAVAILABLE, "%s: %s", path, err.msg);
    cr_assert_null(b);
    cr_assert_not_null(strstr(err.msg, "held by"), "%s", err.msg);
    cr_assert_str_eq(err.msg, want);
}

static void expect_opens_after_close(eplb_store *a, const char *path) {
    save_base(a);
    expect_base(a, "holder");
    eplb_store_close(a);
    eplb_store *b = open_at(path);
    expect_base(b, path);
    eplb_store_close(b);
}

Test(lock, a_hard_link_to_a_held_database_is_refused) {
    eplb_store *a = open_at(tdb);
    char hard[200], want[400];
    snprintf(hard, sizeof hard, "%s/hard.db", tdir);
    cr_assert_eq(link(tdb, hard), 0, "%s", strerror(errno));
    snprintf(want, sizeof want, "store: database %s is held by another process (lock on the database file)", hard);
    expect_held(hard, want);
    expect_opens_after_close(a, hard);
}

Test(lock, a_symlink_to_a_held_database_is_refused_naming_the_holder) {
    eplb_store *a = open_at(tdb);
    char sym[200], want[400];
    snprintf(sym, sizeof sym, "%s/link.db", tdir);
    cr_assert_eq(symlink(tdb, sym), 0, "%s", strerror(errno));
    /* The symlink resolves to the same .lock file, which names the pid. */
    snprintf(want, sizeof want, "store: database %s is held by another eplbd (pid %d)", sym, (int)getpid());
    expect_held(sym, want);
    char lock[220];
    snprintf(lock, sizeof lock, "%s.lock", sym);
    cr_assert_neq(access(lock, F_OK), 0, "no second lock file beside the symlink");
    expect_opens_after_close(a, sym);
}

Test(lock, a_removed_lock_file_does_not_free_a_held_database) {
    eplb_store *a = open_at(tdb);
    char lock[200], want[400];
    snprintf(lock, sizeof lock, "%s.lock", tdb);
    cr_assert_eq(unlink(lock), 0, "%s", strerror(errno));
    snprintf(want, sizeof want, "store: database %s is held by another process (lock on the database file)", tdb);
    expect_held(tdb, want);
    expect_opens_after_close(a, tdb);
}


static int hold_until_killed(void *arg, char *msg, size_t len) {
    int *fds = arg; /* [ready write end, unused] */
    eplb_store *s;
    eplb_error err;
    if (eplb_store_open(tdb, &s, &err) != EPLB_OK) {
        snprintf(msg, len, "child open: %s", err.msg);
        ssize_t w = write(fds[0], "F", 1);
        (void)w;
        return 1;
    }
    ssize_t w = write(fds[0], "R", 1);
    (void)w;
    for (;;)
        pause();
}

Test(lock, a_forked_holder_is_named_and_its_death_frees_the_file) {
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        /* Never outlive the test, whatever assertion ends it. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(ready[0]);
        char msg[300];
        int fds[2] = { ready[1], -1 };
        _exit(hold_until_killed(fds, msg, sizeof msg));
    }
    close(ready[1]);
    char c = 0;
    cr_assert_eq(read(ready[0], &c, 1), 1);
    close(ready[0]);
    cr_assert_eq(c, 'R');

    eplb_store *s;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_store_open(tdb, &s, &err);
    /* A holder that dies without closing (SIGKILL) leaves a stale pid in
     * the lock file, but no lock: the restart proceeds. */
    kill(pid, SIGKILL);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    if (st == EPLB_OK)
        eplb_store_close(s);
    cr_assert_eq(st, EPLB_EUNAVAILABLE, "%s", err.msg);
    char want[300];
    snprintf(want, sizeof want, "store: database %s is held by another eplbd (pid %d)", tdb, (int)pid);
    cr_assert_str_eq(err.msg, want);
    s = open_at(tdb);
    char lock[200], buf[32] = "";
    snprintf(lock, sizeof lock, "%s.lock", tdb);
    int fd = open(lock, O_RDONLY);
    cr_assert_geq(fd, 0);
    cr_assert_gt(read(fd, buf, sizeof buf - 1), 0);
    close(fd);
    cr_assert_eq(atoi(buf), (int)getpid(), "the lock file names its holder: %s", buf);
    eplb_store_close(s);
}

/* ---- read-only --------------------------------------------------------------- */

/* In a child: become uid/gid 65534 when root, then open; 0 when the open
 * was refused as read-only (the message in msg). */
static int open_as_nobody(void *arg, char *msg, size_t len) {
    (void)arg;
    if (geteuid() == 0 && (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0)) {
        snprintf(msg, len, "cannot drop to uid 65534: %s", strerror(errno));
        return 77;
    }
    eplb_store *s;
    eplb_error err;
    eplb_status st = eplb_store_open(tdb, &s, &err);
    if (st == EPLB_OK) {
        eplb_store_close(s);
        snprintf(msg, len, "opened as uid %d", (int)geteuid());
        return 1;
    }
    snprintf(msg, len, "%s|%s", eplb_status_name(st), err.msg);
    return st == EPLB_EUNAVAILABLE ? 0 : 1;
}

/* A database with ds in it, owned by root (0644). */
static void make_db(void) {
    eplb_store *s = open_at(tdb);
    save_base(s);
    eplb_store_close(s);
}

static void expect_readonly_refusal(const char *what, const char *detail) {
    char msg[1200];
    int rc = run_child(open_as_nobody, NULL, msg, sizeof msg);
    if (rc == 77)
        cr_skip_test("%s", msg);
    cr_assert_eq(rc, 0, "%s: %s", what, msg);
    cr_log_info("%s: %s", what, msg);
    char want[300];
    snprintf(want, sizeof want, "UNAVAILABLE|store: database %s is read-only: ", tdb);
    cr_assert_eq(strncmp(msg, want, strlen(want)), 0, "%s: %s", what, msg);
    cr_assert_not_null(strstr(msg, detail), "%s: %s", what, msg);
    /* Nothing was written: the owner, given its rights back, still finds
     * ds as it was. */
    char lock[200];
    snprintf(lock, sizeof lock, "%s.lock", tdb);
    chmod(tdir, 0755);
    chmod(tdb, 0644);
    if (geteuid() == 0) {
        cr_assert_eq(chown(tdir, 0, 0), 0);
        cr_assert_eq(chown(tdb, 0, 0), 0);
        cr_assert(chown(lock, 0, 0) == 0 || errno == ENOENT);
    }
    eplb_store *s = open_at(tdb);
    expect_base(s, what);
    eplb_store_close(s);
}

Test(readonly, a_file_this_user_cannot_write_is_refused_at_open) {
    make_db();
    cr_assert_eq(chmod(tdb, 0444), 0);
    if (geteuid() == 0) {
        /* The directory and the lock are the user's, the file is not. */
        char lock[200];
        snprintf(lock, sizeof lock, "%s.lock", tdb);
        cr_assert_eq(chown(tdir, 65534, 65534), 0);
        cr_assert(chown(lock, 65534, 65534) == 0 || errno == ENOENT);
    }
    expect_readonly_refusal("file 0444", "cannot write the file");
}

Test(readonly, a_directory_where_the_wal_cannot_be_created_is_refused_at_open) {
    make_db();
    char lock[200];
    snprintf(lock, sizeof lock, "%s.lock", tdb);
    if (geteuid() == 0) {
        /* The file and its lock are the user's; the directory is not. */
        cr_assert_eq(chown(tdb, 65534, 65534), 0);
        cr_assert(chown(lock, 65534, 65534) == 0 || errno == ENOENT);
    } else {
        cr_assert_eq(chmod(tdir, 0555), 0);
    }
    expect_readonly_refusal("directory not writable", "eplbd needs to write the file, its -wal and -shm files");
}

Test(readonly, a_directory_where_the_lock_cannot_be_created_is_refused_at_open) {
    make_db();
    char lock[200];
    snprintf(lock, sizeof lock, "%s.lock", tdb);
    cr_assert(unlink(lock) == 0 || errno == ENOENT);
    if (geteuid() == 0)
        cr_assert_eq(chown(tdb, 65534, 65534), 0);
    else
        cr_assert_eq(chmod(tdir, 0555), 0);
    expect_readonly_refusal("no lock file, directory not writable", "cannot open its lock file");
}

Test(readonly, an_immutable_file_is_refused_at_open_even_for_root) {
    make_db();
    int fd = open(tdb, O_RDONLY);
    cr_assert_geq(fd, 0);
    int flags = 0;
    int ok = ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0;
    flags |= FS_IMMUTABLE_FL;
    ok = ok && ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
    int why = errno;
    close(fd);
    if (!ok)
        cr_skip_test("chattr +i is not available here: %s", strerror(why));
    eplb_store *s;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_store_open(tdb, &s, &err);
    clear_immutable(tdb);
    if (st == EPLB_OK)
        eplb_store_close(s);
    cr_assert_eq(st, EPLB_EUNAVAILABLE, "%s", err.msg);
    cr_assert_null(s);
    char want[300];
    snprintf(want, sizeof want, "store: database %s is read-only: ", tdb);
    cr_assert_eq(strncmp(err.msg, want, strlen(want)), 0, "%s", err.msg);
}

/* ---- full ------------------------------------------------------------------------ */

Test(full, a_capped_database_is_enospace_and_keeps_the_row) {
    eplb_store *s = open_at(tdb);
    save_base(s);
    uint64_t cap = 0;
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_store_set_size_limit(s, 1, &cap, &err), EPLB_OK, "%s", err.msg);
    cr_assert_gt(cap, 0); /* never below the current size */
    eplb_model_record r;
    rec_make(&r, "ds", 64, 4, 6, 2, 7);
    r.placement.epoch = 1;
    rec_push(&r, 7, 5); /* [7][64][4] int64s = 14 KiB: more pages */
    cr_assert_eq(save(s, &r, &err), EPLB_ENOSPACE, "%s", err.msg);
    cr_assert_eq(eplb_status_grpc_code(EPLB_ENOSPACE), 8 /* RESOURCE_EXHAUSTED */);
    cr_assert_eq(strncmp(err.msg, "store: disk full saving model ds: ", 34), 0, "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "capped at"), "%s", err.msg);
    expect_base(s, "after ENOSPACE");
    /* The store is still usable, and lifting the cap lets the save in. */
    cr_assert_eq(eplb_store_set_size_limit(s, 0, NULL, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(save(s, &r, &err), EPLB_OK, "%s", err.msg);
    rec_free(&r);
    eplb_store_close(s);
    loaded l;
    reload(tdb, &l);
    cr_assert_eq(l.recs[0].placement.epoch, 1);
    cr_assert_eq(l.recs[0].shape.num_layers, 64);
    loaded_free(&l);
}

/* In a child, in its own mount namespace: a 256 KiB tmpfs over tdir. */
static int full_tmpfs(void *arg, char *msg, size_t len) {
    (void)arg;
    if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", "none", MS_REC | MS_PRIVATE, NULL) != 0 ||
        mount("eplb-test", tdir, "tmpfs", 0, "size=256k") != 0) {
        snprintf(msg, len, "cannot mount a tmpfs here: %s", strerror(errno));
        return 77;
    }
    eplb_store *s;
    eplb_error err;
    if (eplb_store_open(tdb, &s, &err) != EPLB_OK) {
        snprintf(msg, len, "open: %s", err.msg);
        return 1;
    }
    eplb_model_record r;
    rec_ds(&r, "ds");
    if (save(s, &r, &err) != EPLB_OK) {
        snprintf(msg, len, "first save: %s", err.msg);
        return 1;
    }
    rec_free(&r);
    /* 600 records of [8][64] int64s: 2.4 MiB, ten times the disk. */
    rec_make(&r, "ds", 8, 64, 64, 2, 600);
    r.placement.epoch = 1;
    size_t cells = 8 * 64;
    int64_t *load1 = calloc(cells, sizeof *load1);
    for (int i = 0; i < 600; i++)
        eplb_load_window_push(&r.window, load1, NULL);
    free(load1);
    eplb_status st = save(s, &r, &err);
    rec_free(&r);
    if (st != EPLB_ENOSPACE) {
        snprintf(msg, len, "full save: %s: %s", eplb_status_name(st), err.msg);
        return 1;
    }
    char first[EPLB_ERROR_MSG_MAX];
    snprintf(first, sizeof first, "%s", err.msg);
    loaded l;
    if (load(s, &l, &err) != EPLB_OK || l.n != 1 || l.recs[0].placement.epoch != 0 ||
        l.recs[0].shape.num_layers != 2) {
        snprintf(msg, len, "after the full save the row changed (%d rows)", l.n);
        return 1;
    }
    loaded_free(&l);
    eplb_store_close(s);
    /* A new database on the now completely full disk: refused at open,
     * with the reason.  (The old one may still open: its WAL keeps the
     * space the failed save took, so the write probe fits.) */
    char filler[200], other[200];
    snprintf(filler, sizeof filler, "%s/filler", tdir);
    snprintf(other, sizeof other, "%s/other.db", tdir);
    int fd = open(filler, O_WRONLY | O_CREAT, 0600);
    static char block[4096];
    while (write(fd, block, sizeof block) > 0) {
    }
    close(fd);
    eplb_error_clear(&err);
    eplb_status open_st = eplb_store_open(other, &s, &err);
    char second[EPLB_ERROR_MSG_MAX];
    snprintf(second, sizeof second, "%s|%s", eplb_status_name(open_st), err.msg);
    if (open_st == EPLB_OK)
        eplb_store_close(s);
    unlink(filler);
    /* And after space is freed, the last committed row is there. */
    if (eplb_store_open(tdb, &s, &err) != EPLB_OK) {
        snprintf(msg, len, "reopen after freeing space: %s", err.msg);
        return 1;
    }
    if (load(s, &l, &err) != EPLB_OK || l.n != 1 || l.recs[0].placement.epoch != 0) {
        snprintf(msg, len, "after the restart the row changed");
        return 1;
    }
    loaded_free(&l);
    eplb_store_close(s);
    snprintf(msg, len, "%s\n%s", first, second);
    return 0;
}

Test(full, a_full_disk_is_enospace_and_keeps_the_row) {
    char msg[1200];
    int rc = run_child(full_tmpfs, NULL, msg, sizeof msg);
    if (rc == 77)
        cr_skip_test("%s", msg);
    cr_assert_eq(rc, 0, "%s", msg);
    cr_log_info("%s", msg);
    cr_assert_eq(strncmp(msg, "store: disk full saving model ds: ", 34), 0, "%s", msg);
    char *second = strchr(msg, '\n');
    cr_assert_not_null(second);
    cr_assert_eq(strncmp(second + 1, "RESOURCE_EXHAUSTED|store: disk full", 35), 0, "open on a full disk: %s",
                 second + 1);
}

/* ---- faults ------------------------------------------------------------------------ */

static const struct {
    int rc, sys_errno;
    eplb_status want;
    const char *text;
} sqlite_failures[] = {
    { SQLITE_FULL, 0, EPLB_ENOSPACE, "store: disk full saving model ds: database or disk is full" },
    { SQLITE_IOERR_WRITE, ENOSPC, EPLB_ENOSPACE, "store: disk full saving model ds: disk I/O error" },
    { SQLITE_IOERR_FSYNC, EDQUOT, EPLB_ENOSPACE, "store: disk full saving model ds" },
    { SQLITE_IOERR_WRITE, EROFS, EPLB_EUNAVAILABLE, " is read-only: disk I/O error" },
    { SQLITE_IOERR_WRITE, EIO, EPLB_EINTERNAL, "store: saving model ds: disk I/O error" },
    { SQLITE_READONLY, 0, EPLB_EUNAVAILABLE, " is read-only: attempt to write a readonly database" },
    { SQLITE_BUSY, 0, EPLB_EUNAVAILABLE, " is busy: database is locked" },
    { SQLITE_LOCKED, 0, EPLB_EUNAVAILABLE, " is busy: database table is locked" },
    { SQLITE_CORRUPT, 0, EPLB_EDATALOSS, "store: saving model ds: database disk image is malformed" },
    { SQLITE_NOMEM, 0, EPLB_ENOMEM, "store: saving model ds: out of memory" },
    { SQLITE_ERROR, 0, EPLB_EINTERNAL, "store: saving model ds: SQL logic error" },
};

Test(faults, a_failure_at_any_sqlite_call_of_a_save_keeps_the_previous_row) {
    eplb_store *s = open_at(tdb);
    for (size_t f = 0; f < sizeof sqlite_failures / sizeof sqlite_failures[0]; f++) {
        save_base(s);
        eplb_model_record r;
        rec_next(&r, 3);
        long n, points = 0;
        for (n = 1; n < 100; n++) {
            eplb_store_set_fault(s, n, sqlite_failures[f].rc, sqlite_failures[f].sys_errno);
            eplb_error err;
            eplb_status st = save(s, &r, &err);
            if (st == EPLB_OK)
                break;
            points++;
            cr_assert_eq(st, sqlite_failures[f].want, "rc %d at call %ld: %s", sqlite_failures[f].rc, n, err.msg);
            cr_assert_not_null(strstr(err.msg, sqlite_failures[f].text), "at call %ld: \"%s\" lacks \"%s\"", n,
                               err.msg, sqlite_failures[f].text);
            cr_assert_not_null(strstr(err.msg, "model ds"), "%s", err.msg);
            expect_base(s, err.msg);
        }
        eplb_store_set_fault(s, 0, 0, 0);
        /* BEGIN, prepare, step (model), prepare, step (window), COMMIT. */
        cr_assert_geq(points, 6, "only %ld fault points in a save with a window", points);
        rec_free(&r);
        loaded l;
        eplb_error err;
        cr_assert_eq(load(s, &l, &err), EPLB_OK);
        cr_assert_eq(l.recs[0].placement.epoch, 1, "the save went in once no call failed");
        cr_assert_eq(l.recs[0].window.count, 3);
        loaded_free(&l);
    }
    eplb_store_close(s);
}

Test(faults, an_allocation_failure_in_a_save_keeps_the_previous_row) {
    eplb_store *s = open_at(tdb);
    save_base(s);
    eplb_model_record r;
    rec_next(&r, 3);
    int failures = 0;
    for (long n = 1; n < 100; n++) {
        eplb_alloc_fail_at(n, 0);
        eplb_error err;
        eplb_status st = save(s, &r, &err);
        eplb_alloc_fail_at(0, 0);
        if (st == EPLB_OK)
            break;
        failures++;
        cr_assert_eq(st, EPLB_ENOMEM, "allocation %ld: %s", n, err.msg);
        cr_assert_not_null(strstr(err.msg, "model ds"), "%s", err.msg);
        expect_base(s, err.msg);
    }
    cr_assert_geq(failures, 2, "the map and the window are packed into allocated buffers");
    rec_free(&r);
    eplb_store_close(s);
}

Test(faults, a_failure_at_any_call_of_a_load_fails_it_cleanly) {
    eplb_store *s = open_at(tdb);
    save_base(s);
    eplb_model_record r;
    rec_ds(&r, "other");
    eplb_error err;
    cr_assert_eq(save(s, &r, &err), EPLB_OK);
    rec_free(&r);
    int failures = 0;
    for (long n = 1; n < 100; n++) {
        eplb_store_set_fault(s, n, SQLITE_IOERR_READ, EIO);
        loaded l;
        eplb_status st = load(s, &l, &err);
        loaded_free(&l); /* what was handed over before the failure */
        if (st == EPLB_OK)
            break;
        failures++;
        cr_assert_eq(st, EPLB_EINTERNAL, "%s", err.msg);
        cr_assert_not_null(strstr(err.msg, "store: loading"), "%s", err.msg);
    }
    eplb_store_set_fault(s, 0, 0, 0); /* the countdown outlived the last load */
    cr_assert_geq(failures, 5);
    failures = 0;
    for (long n = 1; n < 100; n++) {
        eplb_alloc_fail_at(n, 0);
        loaded l;
        eplb_status st = load(s, &l, &err);
        eplb_alloc_fail_at(0, 0);
        loaded_free(&l);
        if (st == EPLB_OK)
            break;
        failures++;
        cr_assert_eq(st, EPLB_ENOMEM, "%s", err.msg);
    }
    cr_assert_geq(failures, 4);
    loaded l;
    cr_assert_eq(load(s, &l, &err), EPLB_OK);
    cr_assert_eq(l.n, 2);
    loaded_free(&l);
    eplb_store_close(s);
}

Test(faults, a_failure_at_any_call_of_an_open_is_reported_and_leaks_no_lock) {
    make_db();
    int failures = 0;
    for (long n = 1; n < 100; n++) {
        eplb_store *s;
        eplb_error err;
        eplb_store_set_fault(NULL, n, SQLITE_BUSY, 0);
        eplb_status st = eplb_store_open(tdb, &s, &err);
        if (st == EPLB_OK) {
            expect_base(s, "after the faults");
            eplb_store_close(s);
            break;
        }
        failures++;
        cr_assert_null(s);
        cr_assert_eq(st, EPLB_EUNAVAILABLE, "%s", err.msg);
        cr_assert_not_null(strstr(err.msg, tdb), "%s", err.msg);
    }
    cr_assert_geq(failures, 6, "open, journal mode, synchronous, begin, version, tables, probe, commit");
}

/* Two processes, as two eplbds would be: a holder of the file under one
 * name keeps out an opener under another, and its death frees the file. */
Test(lock, a_forked_holder_keeps_out_a_hard_link_until_it_dies) {
    char hard[200];
    snprintf(hard, sizeof hard, "%s/hard.db", tdir);
    make_db();
    cr_assert_eq(link(tdb, hard), 0, "%s", strerror(errno));
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        close(ready[0]);
        char msg[300];
        int fds[2] = { ready[1], -1 };
        _exit(hold_until_killed(fds, msg, sizeof msg));
    }
    close(ready[1]);
    char c = 0;
    cr_assert_eq(read(ready[0], &c, 1), 1);
    close(ready[0]);
    cr_assert_eq(c, 'R');
    eplb_store *s;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_store_open(hard, &s, &err);
    kill(pid, SIGKILL);
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    if (st == EPLB_OK)
        eplb_store_close(s);
    cr_assert_eq(st, EPLB_EUNAVAILABLE, "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "held by another process (lock on the database file)"), "%s", err.msg);
    s = open_at(hard);
    expect_base(s, "after the holder died");
    eplb_store_close(s);
}
