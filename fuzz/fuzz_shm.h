/* fuzz_shm.h -- the fuzzers' private /dev/shm namespace (fuzz_shm.c). */
#ifndef FUZZ_SHM_H
#define FUZZ_SHM_H

#include <stddef.h>

/* Names the code under test may open: "/eplb-fuzz-<rest>".  Each is really
 * "/eplb-fuzz.<pid>.<rest>" of this process. */
#define FUZZ_SHM_PREFIX "/eplb-fuzz-"

/* Create (or re-create) FUZZ_SHM_PREFIX<suffix> with size bytes of a
 * pattern; aborts on failure.  Removed at exit and when a sanitizer report
 * ends the process. */
void fuzz_shm_create(const char *suffix, size_t size);

/* Remove every object this process created. */
void fuzz_shm_remove_all(void);

#endif
