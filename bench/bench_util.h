/* bench_util.h -- what every benchmark here shares: a seeded splitmix64
 * generator (the traces are the same on every machine), a monotonic clock
 * and a comparison for qsort of doubles (medians).  Header-only: each
 * bench is one file. */
#ifndef EPLB_BENCH_UTIL_H
#define EPLB_BENCH_UTIL_H

#include <math.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static inline double rng_unit(uint64_t *state) { return (double)(rng_next(state) >> 11) * 0x1.0p-53; }

/* Standard normal (Box-Muller, one of the pair). */
static inline double rng_normal(uint64_t *state) {
    double u = rng_unit(state), v = rng_unit(state);
    if (u < 1e-300)
        u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static inline double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#endif
