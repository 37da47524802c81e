/* two_threads_driver.c -- the two-thread search's random comparisons
 * (tests/core/two_threads_case.h) without Criterion, so that they run in
 * the TSan tree (Criterion cannot: docs/testing.md).  Not a test by
 * itself: tests/tsan/test_two_threads.py runs it and checks what it says.
 *
 *   two_threads_driver CASES SEED MODE
 * MODE: plain (no fallback knob), bound (a small compute bound), near (the
 * bound at the one-thread call's own work, +-2), log (each side's log
 * capped at 1-40 changes), nothread (no helper thread), bad (a layer not
 * valid: both refuse it alike), late (the helper starts once the layers
 * are set up; threads 0 or 2 at random: the loop on one thread, or on two
 * with a helper that set up no layer).
 * Prints "cases N two T undone U" and exits 0 when every case gave the
 * one-thread answer; 1 and the case's difference otherwise; 2 on bad
 * arguments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "two_threads_case.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s CASES SEED plain|bound|near|log|nothread|bad|late\n", argv[0]);
        return 2;
    }
    char *end;
    const long cases = strtol(argv[1], &end, 10);
    if (*end || cases < 1 || cases > 1000000) {
        fprintf(stderr, "CASES: want 1..1000000, got \"%s\"\n", argv[1]);
        return 2;
    }
    uint64_t rng = strtoull(argv[2], &end, 0);
    if (*end || end == argv[2]) {
        fprintf(stderr, "SEED: want a number, got \"%s\"\n", argv[2]);
        return 2;
    }
    const char *mode = argv[3];
    const bool bound = !strcmp(mode, "bound"), log = !strcmp(mode, "log"), nothread = !strcmp(mode, "nothread");
    const bool near = !strcmp(mode, "near"), bad = !strcmp(mode, "bad"), late = !strcmp(mode, "late");
    if (!bound && !log && !nothread && !near && !bad && !late && strcmp(mode, "plain") != 0) {
        fprintf(stderr, "MODE: want plain, bound, near, log, nothread, bad or late, got \"%s\"\n", mode);
        return 2;
    }
    long two = 0, undone = 0;
    for (long k = 0; k < cases; k++) {
        const tt_options o = { .max_work = bound ? 2000 + tt_below(&rng, 60000) : 0, .near_bound = near,
                               .log_cap = log ? 1 + tt_below(&rng, 40) : 0, .thread_fails = nothread,
                               .bad = bad ? 1 + (int)tt_below(&rng, 2) : 0, .helper_late = late,
                               .automatic = late && tt_below(&rng, 2) };
        tt_result r;
        if (!two_threads_case_run(&rng, &o, &r) || r.msg[0]) {
            fprintf(stderr, "case %ld: %s\n", k, r.msg);
            return 1;
        }
        two += r.threads == 2;
        undone += r.undone;
    }
    printf("cases %ld two %ld undone %ld\n", cases, two, undone);
    return 0;
}
