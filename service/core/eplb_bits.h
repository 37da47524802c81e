/* eplb_bits.h -- bit helpers shared by the core's files (header only). */
#ifndef EPLB_BITS_H
#define EPLB_BITS_H

#include <stdint.h>

/* The index of x's lowest set bit; x != 0.  One instruction with gcc and
 * clang, a loop elsewhere. */
static inline unsigned eplb_ctz64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctzll(x);
#else
    unsigned n = 0;
    while (!(x & 1)) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

#endif
