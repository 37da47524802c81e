/* eplb_backend_cpu.c -- the cpu backend: executes transfer plans with memcpy
 * over POSIX shared memory mappings (shm_open + mmap MAP_SHARED), staging
 * in host memory.
 *
 * It is always built.  It serves engines whose expert weights live in host
 * shared memory (CPU inference, tests), and it is the reference the hip
 * backend's results are checked against.  Whole expert slices are copied
 * with one call each (no per-byte work): memcpy below 256 KiB, above it
 * SSE2 streaming (non-temporal) stores, which skip the read-for-ownership of
 * destination lines and leave the caches alone -- nothing reads a moved
 * expert soon, and glibc's memcpy switches to such stores only for copies
 * larger than most L3 caches, far above an expert slice (measured: 6 MiB
 * slices 5.4 GB/s with memcpy, 8.7 GB/s streamed, 9.5 GB/s one huge memcpy).
 *
 * Phases: gather copies slots -> host staging, scatter staging/slots ->
 * slots; the loader (eplb_backend.c) enforces their order, so staging holds
 * the layer gathered last until the next gather.  Nothing here remembers or
 * compares plans.
 *
 * Regions: every region of every held rank (one shm object each) is one
 * mapping (eplb_layout's numbering); a slot is found through its tensor's
 * mapping.  A plan's slots are all on held ranks (the loader checks).
 *
 * Shrinking buffers: each region's shm descriptor is kept open after mmap.
 * check fstat()s them all (a shrink before the move); the copy loops run
 * under the SIGBUS guard (eplb_sigbus.h) over the mappings (a shrink during
 * the move).  Either way the backend becomes `lost`: every later check,
 * gather and scatter answers EPLB_EDATALOSS with the first message, since
 * the bytes past the new end are gone even if the object grows back.
 *
 * Replaced objects: check also answers EPLB_EDATALOSS when a rank's object
 * has been unlinked since it was attached (st_nlink == 0 on the held
 * descriptor) and its name now leads to another object: an engine that
 * recreated the name sees a new object, and a move through the old mapping
 * would write where the engine no longer looks.  A name merely removed (an
 * engine cleaning up once every process has mapped it) is fine: both
 * mappings are still one object.  And at open, two ranks reaching the same object
 * (same st_dev and st_ino: a hard link, or one name twice) are refused --
 * their slots would overlap however the names differ. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eplb_backend_impl.h"
#include "eplb_sigbus.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef struct cpu_state {
    eplb_layout lay;          /* the description, flattened */
    eplb_backend_env env;     /* fault hook */
    eplb_sigbus_range *map;   /* [M] each region's mapping: base, mapped length */
    int *fd;                  /* [M] its shm descriptor, kept for fstat (-1: none) */
    char (*name)[EPLB_SHM_NAME_MAX + 1]; /* [M] its shm name, for messages */
    uint8_t *staging;         /* host staging, staging_cap bytes */
    size_t staging_cap;
    bool reserved;            /* staging was reserved: never reallocated */
    bool lost;                /* a buffer shrank: lost_msg says which */
    char lost_msg[EPLB_ERROR_MSG_MAX];
} cpu_state;

static eplb_status cpu_probe(uint32_t *num_devices, eplb_error *err) {
    (void)err;
    *num_devices = 0;
    return EPLB_OK;
}

static void cpu_close(void *state) {
    cpu_state *cs = state;
    if (!cs)
        return;
    for (uint32_t m = 0; cs->map && m < cs->lay.M; m++)
        if (cs->map[m].base)
            munmap((void *)cs->map[m].base, cs->map[m].size);
    for (uint32_t m = 0; cs->fd && m < cs->lay.M; m++)
        if (cs->fd[m] >= 0)
            close(cs->fd[m]);
    free(cs->map);
    free(cs->fd);
    free(cs->name);
    free(cs->staging);
    eplb_layout_free(&cs->lay);
    free(cs);
}

/* "ranks[1].regions[2]": where mapping m came from, for messages. */
static const char *where(const cpu_state *cs, uint32_t m, char *buf, size_t cap) {
    snprintf(buf, cap, "ranks[%u].regions[%u]", cs->lay.maps[m].rank, cs->lay.maps[m].region);
    return buf;
}

/* One mapping's object identity, for the hard-link check. */
typedef struct object_id {
    dev_t dev;
    ino_t ino;
    uint32_t m;
} object_id;

static int cmp_object(const void *a, const void *b) {
    const object_id *x = a, *y = b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    return (x->ino > y->ino) - (x->ino < y->ino);
}

/* Do two mappings reach the same object (a hard link, or one name twice)?
 * Compared by (st_dev, st_ino) on the descriptors we hold, since names say
 * nothing about identity.  Sorted: O(M log M). */
static eplb_status distinct_objects(cpu_state *cs, eplb_error *err) {
    object_id *ids = malloc((cs->lay.M ? cs->lay.M : 1) * sizeof *ids);
    if (!ids)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the cpu backend");
    char w1[48], w2[48];
    for (uint32_t m = 0; m < cs->lay.M; m++) {
        struct stat sb;
        if (fstat(cs->fd[m], &sb) != 0) {
            free(ids);
            return eplb_impl_error(err, EPLB_EINTERNAL, "%s.shm_name \"%s\": fstat: %s", where(cs, m, w1, sizeof w1),
                                   cs->name[m], strerror(errno));
        }
        ids[m] = (object_id){ sb.st_dev, sb.st_ino, m };
    }
    qsort(ids, cs->lay.M, sizeof *ids, cmp_object);
    for (uint32_t k = 1; k < cs->lay.M; k++)
        if (cmp_object(&ids[k - 1], &ids[k]) == 0) {
            uint32_t a = ids[k - 1].m < ids[k].m ? ids[k - 1].m : ids[k].m;
            uint32_t b = ids[k - 1].m < ids[k].m ? ids[k].m : ids[k - 1].m;
            eplb_status st = eplb_impl_error(err, EPLB_EINVAL,
                                             "%s.shm_name \"%s\" and %s.shm_name \"%s\" are the same shm object "
                                             "(a hard link?): each region needs its own",
                                             where(cs, a, w1, sizeof w1), cs->name[a], where(cs, b, w2, sizeof w2),
                                             cs->name[b]);
            free(ids);
            return st;
        }
    free(ids);
    return EPLB_OK;
}

static eplb_status cpu_open(const eplb_buffers_desc *desc, uint32_t num_physical,
                            const eplb_backend_env *env, void **state, eplb_error *err) {
    *state = NULL;
    if (eplb_sigbus_install() != 0)
        return eplb_impl_error(err, EPLB_EINTERNAL, "cpu backend: installing the SIGBUS guard: %s",
                               strerror(errno));
    cpu_state *cs = calloc(1, sizeof *cs);
    if (!cs)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the cpu backend");
    cs->env = *env;
    cs->env.shm_policy = NULL; /* valid during open only */
    eplb_status st = eplb_layout_build(&cs->lay, desc, num_physical, err);
    if (st != EPLB_OK) {
        free(cs);
        return st;
    }
    uint32_t M = cs->lay.M;
    cs->map = calloc(M, sizeof *cs->map);
    cs->fd = malloc(M * sizeof *cs->fd);
    cs->name = calloc(M, sizeof *cs->name);
    if (!cs->map || !cs->fd || !cs->name) {
        free(cs->fd);
        cs->fd = NULL;
        cpu_close(cs);
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the cpu backend");
    }
    for (uint32_t m = 0; m < M; m++)
        cs->fd[m] = -1;
    char w[48];
    for (uint32_t m = 0; m < M; m++) {
        uint32_t g = cs->lay.maps[m].rank, r = cs->lay.maps[m].region;
        const char *name = desc->ranks[g].regions[r].shm_name;
        snprintf(cs->name[m], sizeof cs->name[m], "%s", name);
        /* Name, type, owner and size are checked on the descriptor we map:
         * the object may have been replaced since validation. */
        int fd;
        uint64_t size = 0;
        st = eplb_shm_open_checked(desc, env->shm_policy, g, r, O_RDWR, &fd, &size, err);
        if (st != EPLB_OK) {
            cpu_close(cs);
            return st;
        }
        cs->fd[m] = fd;
        if (size < cs->lay.maps[m].extent || size == 0) {
            st = eplb_impl_error(err, EPLB_EINVAL, "%s.shm_name \"%s\": %llu bytes, the layout needs %llu",
                                 where(cs, m, w, sizeof w), name, (unsigned long long)size,
                                 (unsigned long long)cs->lay.maps[m].extent);
            cpu_close(cs);
            return st;
        }
        void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            st = eplb_impl_error(err, EPLB_EINTERNAL, "%s.shm_name \"%s\": mmap: %s", where(cs, m, w, sizeof w),
                                 name, strerror(errno));
            cpu_close(cs);
            return st;
        }
        cs->map[m].base = p;
        cs->map[m].size = (size_t)size;
    }
    st = distinct_objects(cs, err);
    if (st != EPLB_OK) {
        cpu_close(cs);
        return st;
    }
    *state = cs;
    return EPLB_OK;
}

/* Mark the buffers lost (first message wins) and return EPLB_EDATALOSS. */
static eplb_status cpu_lost(cpu_state *cs, eplb_error *err, const char *msg) {
    if (!cs->lost) {
        cs->lost = true;
        snprintf(cs->lost_msg, sizeof cs->lost_msg, "%s", msg);
    }
    return eplb_impl_error(err, EPLB_EDATALOSS, "%s", msg);
}

/* "ranks[1].regions[0] shm "/eplb-x" shrank to 0 bytes, the layout needs
 * 24576: its experts are lost", or "... was replaced ..." when the held
 * object has no name left and the name leads elsewhere; false when mapping
 * m is (still or again) large enough and still the engine's. */
static bool mapping_shrunk(cpu_state *cs, uint32_t m, char *msg, size_t cap) {
    char w[48];
    where(cs, m, w, sizeof w);
    struct stat sb;
    if (fstat(cs->fd[m], &sb) != 0) {
        snprintf(msg, cap, "%s shm \"%s\": fstat: %s: its experts are lost", w, cs->name[m], strerror(errno));
        return true;
    }
    if (sb.st_nlink == 0) {
        /* Unlinked.  An engine may remove its names once everyone has
         * mapped them (its mapping and ours stay one object): fine.  But if
         * the name now leads to another object, the engine recreated it and
         * looks there. */
        int probe = shm_open(cs->name[m], O_RDONLY | O_NOFOLLOW | O_NONBLOCK, 0);
        struct stat now;
        bool replaced = probe >= 0 && fstat(probe, &now) == 0 &&
                        (now.st_dev != sb.st_dev || now.st_ino != sb.st_ino);
        if (probe >= 0)
            close(probe);
        if (replaced) {
            snprintf(msg, cap, "%s shm \"%s\" was replaced by another object since it was attached: "
                     "its experts are no longer where the engine sees them", w, cs->name[m]);
            return true;
        }
    }
    if ((uint64_t)sb.st_size >= cs->lay.maps[m].extent)
        return false;
    snprintf(msg, cap, "%s shm \"%s\" shrank to %lld bytes, the layout needs %llu: its experts are lost", w,
             cs->name[m], (long long)sb.st_size, (unsigned long long)cs->lay.maps[m].extent);
    return true;
}

/* One fstat per region: has any object shrunk below what the layout needs? */
static eplb_status cpu_check(void *state, eplb_error *err) {
    cpu_state *cs = state;
    if (cs->lost)
        return eplb_impl_error(err, EPLB_EDATALOSS, "%s", cs->lost_msg);
    char msg[EPLB_ERROR_MSG_MAX];
    for (uint32_t m = 0; m < cs->lay.M; m++)
        if (mapping_shrunk(cs, m, msg, sizeof msg))
            return cpu_lost(cs, err, msg);
    return EPLB_OK;
}

/* Copies at least this large use streaming stores (where available). */
#define CPU_STREAM_MIN ((size_t)256 << 10)

/* Copy one expert slice: n bytes, src and dst never overlap. */
static void copy_slice(void *dst, const void *src, size_t n) {
#if defined(__SSE2__)
    if (n >= CPU_STREAM_MIN) {
        uint8_t *d = dst;
        const uint8_t *s = src;
        size_t head = (64 - ((uintptr_t)d & 63)) & 63; /* align dst to a cache line */
        memcpy(d, s, head);
        d += head;
        s += head;
        n -= head;
        size_t body = n & ~(size_t)63;
        if (((uintptr_t)s & 15) == 0) {
            for (size_t i = 0; i < body; i += 64) {
                __m128i a = _mm_load_si128((const __m128i *)(s + i));
                __m128i b = _mm_load_si128((const __m128i *)(s + i + 16));
                __m128i c = _mm_load_si128((const __m128i *)(s + i + 32));
                __m128i e = _mm_load_si128((const __m128i *)(s + i + 48));
                _mm_stream_si128((__m128i *)(d + i), a);
                _mm_stream_si128((__m128i *)(d + i + 16), b);
                _mm_stream_si128((__m128i *)(d + i + 32), c);
                _mm_stream_si128((__m128i *)(d + i + 48), e);
            }
        } else {
            for (size_t i = 0; i < body; i += 64) {
                __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
                __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
                __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
                __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
                _mm_stream_si128((__m128i *)(d + i), a);
                _mm_stream_si128((__m128i *)(d + i + 16), b);
                _mm_stream_si128((__m128i *)(d + i + 32), c);
                _mm_stream_si128((__m128i *)(d + i + 48), e);
            }
        }
        _mm_sfence(); /* streaming stores are weakly ordered: publish them */
        memcpy(d + body, s + body, n - body);
        return;
    }
#endif
    memcpy(dst, src, n);
}

static void *slot_addr(cpu_state *cs, uint32_t t, uint32_t slot) {
    uint32_t m;
    uint64_t off = eplb_layout_slot_offset(&cs->lay, t, slot, &m);
    return (uint8_t *)cs->map[m].base + off;
}

static void *staging_addr(cpu_state *cs, uint32_t layer, uint32_t t, uint32_t k) {
    return cs->staging + (size_t)k * cs->lay.entry_bytes[layer] +
           cs->lay.tensors[t].stage_offset;
}

/* Host staging: one entry per plan staging index, entry_bytes[layer] each. */
static eplb_status ensure_staging(cpu_state *cs, size_t need, eplb_error *err) {
    if (need <= cs->staging_cap)
        return EPLB_OK;
    if (cs->reserved)
        return eplb_impl_error(err, EPLB_EINTERNAL, "the plan needs %zu bytes of staging, %zu were "
                               "reserved at attach; nothing written", need, cs->staging_cap);
    void *p = NULL;
    if (posix_memalign(&p, 4096, need) != 0)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory for %zu bytes of staging", need);
    free(cs->staging);
    cs->staging = p;
    cs->staging_cap = need;
    return EPLB_OK;
}

/* One phase's ops, run under the SIGBUS guard (so: no lock, no allocation;
 * progress is volatile, to be read after a jump out). */
typedef struct phase_run {
    cpu_state *cs;
    uint32_t layer;
    const eplb_plan_op *ops;
    uint32_t n;
    eplb_fault_phase phase;
    volatile uint32_t done;  /* ops completed */
    volatile bool faulted;   /* the fault hook failed op `done` */
} phase_run;

static void run_ops(void *arg) {
    phase_run *r = arg;
    cpu_state *cs = r->cs;
    const uint32_t t0 = cs->lay.first[r->layer], t1 = cs->lay.first[r->layer + 1];
    for (uint32_t i = 0; i < r->n; i++) {
        const eplb_plan_op *op = &r->ops[i];
        if (cs->env.fault(r->phase)) {
            r->faulted = true;
            return;
        }
        for (uint32_t t = t0; t < t1; t++) {
            void *dst = op->kind == EPLB_OP_STAGE ? staging_addr(cs, r->layer, t, op->dst)
                                                  : slot_addr(cs, t, op->dst);
            const void *src = op->kind == EPLB_OP_UNSTAGE ? staging_addr(cs, r->layer, t, op->src)
                                                          : slot_addr(cs, t, op->src);
            copy_slice(dst, src, cs->lay.tensors[t].bytes);
        }
        r->done = i + 1;
    }
}

/* Runs r; on SIGBUS names the rank whose mapping faulted and marks the
 * buffers lost.  what: "gather" or "scatter". */
static eplb_status run_guarded(phase_run *r, const char *what, eplb_error *err) {
    cpu_state *cs = r->cs;
    void *addr = NULL;
    if (!eplb_sigbus_call(run_ops, r, cs->map, cs->lay.M, &addr))
        return EPLB_OK;
    uint32_t m = 0;
    while (m + 1 < cs->lay.M && !((uintptr_t)addr >= (uintptr_t)cs->map[m].base &&
                                  (uintptr_t)addr - (uintptr_t)cs->map[m].base < cs->map[m].size))
        m++;
    char why[EPLB_ERROR_MSG_MAX - 96], msg[EPLB_ERROR_MSG_MAX], w[48];
    if (!mapping_shrunk(cs, m, why, sizeof why))
        snprintf(why, sizeof why, "%s shm \"%s\" was truncated during the copy (SIGBUS at "
                 "offset %llu): its experts are lost", where(cs, m, w, sizeof w), cs->name[m],
                 (unsigned long long)((uintptr_t)addr - (uintptr_t)cs->map[m].base));
    snprintf(msg, sizeof msg, "layer %u: %s op %u of %u: %s", r->layer, what, (unsigned)r->done,
             r->n, why);
    return cpu_lost(cs, err, msg);
}

static eplb_status cpu_gather(void *state, uint32_t layer, const eplb_plan *plan,
                              eplb_error *err) {
    cpu_state *cs = state;
    if (cs->lost)
        return eplb_impl_error(err, EPLB_EDATALOSS, "%s", cs->lost_msg);
    eplb_status st = ensure_staging(cs, (size_t)plan->num_staging * cs->lay.entry_bytes[layer],
                                    err);
    if (st != EPLB_OK)
        return st;
    phase_run r = {cs, layer, plan->gather, plan->num_gather, EPLB_FAULT_GATHER, 0, false};
    st = run_guarded(&r, "gather", err);
    if (st != EPLB_OK)
        return st;
    if (r.faulted) {
        const eplb_plan_op *op = &plan->gather[r.done];
        return eplb_impl_error(err, EPLB_EINTERNAL,
                               "layer %u: gather op %u (slot %u -> staging %u) failed (injected "
                               "fault); no slot was written", layer, (unsigned)r.done, op->src,
                               op->dst);
    }
    return EPLB_OK;
}

/* Wave 0 then wave 1: the plan's array order. */
static eplb_status cpu_scatter(void *state, uint32_t layer, const eplb_plan *plan,
                               eplb_error *err) {
    cpu_state *cs = state;
    if (cs->lost)
        return eplb_impl_error(err, EPLB_EDATALOSS, "%s", cs->lost_msg);
    phase_run r = {cs, layer, plan->scatter, plan->num_scatter, EPLB_FAULT_SCATTER, 0, false};
    eplb_status st = run_guarded(&r, "scatter", err);
    if (st != EPLB_OK)
        return st;
    if (r.faulted)
        return eplb_impl_error(err, EPLB_EDATALOSS,
                               "layer %u: scatter op %u (-> slot %u) failed (injected fault) after "
                               "%u of %u destination writes; scatter again to complete it from "
                               "staging", layer, (unsigned)r.done, plan->scatter[r.done].dst,
                               (unsigned)r.done, plan->num_scatter);
    return EPLB_OK;
}

static eplb_status cpu_synchronize(void *state, eplb_error *err) {
    (void)state;
    (void)err;
    return EPLB_OK; /* copies are synchronous: nothing to wait for */
}

/* One host buffer for every held rank's entries (the cpu backend indexes
 * staging by the plan's global staging index). */
static eplb_status cpu_reserve_staging(void *state, const uint32_t *layer_entries, uint64_t *total,
                                       uint64_t *per_gpu, eplb_error *err) {
    cpu_state *cs = state;
    uint64_t rank_bytes = eplb_layout_staging_bytes(&cs->lay, layer_entries);
    uint64_t need = rank_bytes * cs->lay.G;
    if (rank_bytes && need / rank_bytes != cs->lay.G)
        return eplb_impl_error(err, EPLB_EINVAL, "staging of %llu bytes x %u ranks overflows",
                               (unsigned long long)rank_bytes, cs->lay.G);
    cs->reserved = false;
    if (need > cs->staging_cap) {
        free(cs->staging);
        cs->staging = NULL;
        cs->staging_cap = 0;
        eplb_status st = ensure_staging(cs, (size_t)need, err);
        if (st != EPLB_OK)
            return st;
    }
    cs->reserved = true;
    *total = cs->staging_cap;
    *per_gpu = 0;
    return EPLB_OK;
}

const eplb_backend_ops eplb_backend_cpu_ops = {
    EPLB_BACKEND_ABI, "cpu",       cpu_probe,       cpu_open, cpu_check,
    cpu_gather,       cpu_scatter, cpu_synchronize, cpu_close,
    NULL,             NULL, /* no device events: memcpy returns complete */
    cpu_reserve_staging,
};
