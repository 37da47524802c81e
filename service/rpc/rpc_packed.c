/* rpc_packed.c -- see rpc_packed.h.  Two passes over the message: the
 * first checks the wire structure and counts each field's values (a
 * varint ends at a byte < 0x80), the second decodes them and copies every
 * other field's bytes to the rest. */
#include <string.h>

#include "rpc_packed.h"

/* A varint of at most max_bytes: 10 for a tag or another field's value,
 * 9 (63 bits) for a load, since a 10-byte one is a negative int64, which
 * the core refuses anyway; upb reads it and says so. */
static bool varint_n(const unsigned char **pp, const unsigned char *end, uint64_t *v, unsigned max_bytes) {
    const unsigned char *p = *pp;
    uint64_t x = 0;
    for (unsigned i = 0; i < max_bytes; i++) {
        if (p >= end)
            return false;
        const unsigned char b = *p++;
        x |= (uint64_t)(b & 0x7F) << (7 * i);
        if (b < 0x80) {
            *v = x;
            *pp = p;
            return true;
        }
    }
    return false;
}

static bool varint(const unsigned char **pp, const unsigned char *end, uint64_t *v) {
    return varint_n(pp, end, v, 10);
}

static int which(const uint32_t *fields, size_t n, uint64_t f) {
    for (size_t i = 0; i < n; i++)
        if (fields[i] == f)
            return (int)i;
    return -1;
}

/* Skip one field's payload of wire type wt; false when malformed. */
static bool skip(const unsigned char **pp, const unsigned char *end, unsigned wt) {
    uint64_t v;
    switch (wt) {
    case 0:
        return varint(pp, end, &v);
    case 1:
        if ((size_t)(end - *pp) < 8)
            return false;
        *pp += 8;
        return true;
    case 2:
        if (!varint(pp, end, &v) || v > (uint64_t)(end - *pp))
            return false;
        *pp += v;
        return true;
    case 5:
        if ((size_t)(end - *pp) < 4)
            return false;
        *pp += 4;
        return true;
    default: /* groups (3, 4) and reserved types: upb's to judge */
        return false;
    }
}

bool rpc_packed_split(const char *msg, size_t len, const uint32_t *fields, size_t nfields, upb_Arena *arena,
                      char **rest, size_t *rest_len, int64_t **values, size_t *counts) {
    if (nfields > RPC_PACKED_MAX_FIELDS || !msg)
        return false;
    const unsigned char *const start = (const unsigned char *)msg, *const end = start + len;
    size_t count[RPC_PACKED_MAX_FIELDS] = { 0 };
    for (const unsigned char *p = start; p < end;) {
        uint64_t tag;
        if (!varint(&p, end, &tag))
            return false;
        const unsigned wt = (unsigned)(tag & 7);
        const int k = which(fields, nfields, tag >> 3);
        if (k < 0) {
            if (!skip(&p, end, wt))
                return false;
            continue;
        }
        uint64_t n;
        if (wt != 2 || !varint(&p, end, &n) || n > (uint64_t)(end - p) || (n && p[n - 1] >= 0x80))
            return false; /* not packed, or a value cut off */
        for (uint64_t i = 0; i < n; i++)
            count[k] += p[i] < 0x80;
        p += n;
    }
    char *r = upb_Arena_Malloc(arena, len ? len : 1);
    if (!r)
        return false;
    for (size_t i = 0; i < nfields; i++) {
        values[i] = count[i] ? upb_Arena_Malloc(arena, count[i] * sizeof(int64_t)) : NULL;
        if (count[i] && !values[i])
            return false;
        counts[i] = 0;
    }
    size_t nr = 0;
    for (const unsigned char *p = start; p < end;) {
        const unsigned char *field = p;
        uint64_t tag = 0, n = 0;
        varint(&p, end, &tag); /* checked by the first pass */
        const int k = which(fields, nfields, tag >> 3);
        if (k < 0) {
            skip(&p, end, (unsigned)(tag & 7));
            memcpy(r + nr, field, (size_t)(p - field));
            nr += (size_t)(p - field);
            continue;
        }
        varint(&p, end, &n);
        const unsigned char *q = p, *qe = p + n;
        if (!n)
            continue; /* an empty chunk: no array to index (it may be NULL) */
        int64_t *out = values[k] + counts[k];
        size_t got = 0;
        while (q < qe) {
            uint64_t v;
            if (!varint_n(&q, qe, &v, 9))
                return false; /* over 9 bytes: upb decides */
            out[got++] = (int64_t)v;
        }
        counts[k] += got;
        p = qe;
    }
    *rest = r;
    *rest_len = nr;
    return true;
}
