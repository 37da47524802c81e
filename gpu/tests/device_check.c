/* device_check.c -- GPU correctness and bandwidth check of the GPU backend
 * (libeplb_backend_cuda.so: gpu/hip/eplb_backend_hip.hip built by nvcc),
 * against the cpu backend and against images computed here.
 *
 * Plain C using the CUDA runtime only to allocate, fill and read back device
 * memory; the backend under test is loaded by the eplb_gpu loader
 * ($EPLB_CUDA_BACKEND or $EPLB_HIP_BACKEND; $EPLB_DEVICE_CHECK_BACKEND names
 * it: "cuda" by default).  Run by gpu/tests/device-check.sh.
 *
 * The buffer shape (ABI 3): 8 ranks x 4 slots (rank g on device g % devices:
 * with 2+ GPUs this covers peer copies), 2 layers x 3 tensors, 3 regions per
 * rank as engines lay them out: region 0 holds all of layer 0's tensors
 * interleaved in padded slot rows, starting at an offset; region 1 holds
 * layer 1's w13 alone at an offset; region 2 holds layer 1's w2 and then its
 * scales, the scales at an offset and stride that are multiples of 4 but not
 * of 16.  Sizes are chosen so that both kernel paths run (16-byte words:
 * w13; 4-byte words: w2, 1 MiB + 4 bytes, and the scales).  Padding holds a
 * sentinel that must survive every move.
 *
 * 1. device_ptr: a sequence of old -> new maps (worked examples, random maps
 *    with -1 slots and duplicates, a full derangement) is planned with
 *    eplb_plan_build and executed by both backends; after each, every byte
 *    of every region must equal the cpu backend's and the expected image.
 * 2. faults: a gather fault leaves device memory byte-identical (and a
 *    scatter after it is refused); a scatter fault is completed by a second
 *    scatter from staging, and a third (repeated) scatter changes nothing.
 * 3. held ranks: a server holding ranks 2..5 of 8 moves their slots (plans
 *    built for that range) and refuses a plan that needs rank 0, writing
 *    nothing.
 * 4. open refusals: a region declared larger than its allocation, memory on
 *    another device than declared, host memory as a device pointer, an
 *    offset that is not a multiple of 4: EPLB_EINVAL naming the region.
 * 5. ipc: an "engine" child process (this program re-executed) allocates
 *    every region with cudaMalloc and exports IPC handles; the backend opens
 *    them (cudaIpcOpenMemHandle), moves weights, closes; the child checks
 *    every slot's bytes.
 * 5b. events (ABI 4): the cpu backend refuses them; a garbage engine handle
 *    is refused (EPLB_EINVAL) and the backend still moves right; the done
 *    handle is stable; with host emulation also the stream order (every
 *    copy stream waits on the engine's event before the first copy, the
 *    exported event is recorded after the last, a known handle is opened
 *    once).
 * 5c. staging reserved once: the reservation's size per GPU, three
 *    derangements within it, a gather past a too-small reservation refused
 *    with nothing written.
 * 5d. host emulation: with ranks only on devices 2 and 3 of 4, nothing sets
 *    devices 0 or 1 (no context on a GPU the model does not use).
 * 6. bandwidth: 8 ranks x 9 slots of 42 MiB experts (w13 28 MiB + w2 14 MiB,
 *    DeepSeek-V3 fp8, each tensor in its own region), a derangement (gather
 *    + scatter of every slot), once with 16-byte-multiple sizes and once
 *    with sizes 4 bytes past (the 4-byte path); backend GB/s vs
 *    cudaMemcpyAsync device-to-device of the same slices.  Pass: >= 80%.
 * Ends with "N passed, N failed" (exit 0 only when nothing failed); exits 3
 * with "no CUDA device" when there is none.
 *
 * Built against gpu/tests/host_emul/cuda_runtime_api.h and a backend built
 * with -DEPLB_HIP_ON_HOST (gpu/tests/host-emulation-check.sh), it runs on a
 * machine without a GPU: 1-4 as above, 5 in one process (the handles hold
 * pointers), plus what only emulation can stage: peer access refused for
 * one pair (the hipMemcpyPeerAsync fallback carries it) and a sticky device
 * error (the backend stays broken).  6 is skipped there. */
#define _POSIX_C_SOURCE 200809L

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "eplb_backend.h"
#include "eplb_plan.h"

#define CK(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                        \
                    cudaGetErrorString(e_));                                                      \
            exit(2);                                                                              \
        }                                                                                         \
    } while (0)

static int passed, failed;
static const char *backend = "cuda"; /* $EPLB_DEVICE_CHECK_BACKEND */
static eplb_buffers_kind ipc_kind = EPLB_BUFFERS_CUDA_IPC;

static void result(bool ok, const char *what) {
    printf("%s %s\n", ok ? "PASS" : "FAIL", what);
    fflush(stdout);
    if (ok)
        passed++;
    else
        failed++;
}

static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        perror("malloc");
        exit(2);
    }
    return p;
}

/* ---- the correctness shape ---------------------------------------------- */

#define G 8
#define S 4
#define P (G * S)
#define L 2
#define NT 3
#define NR 3  /* regions per rank */
#define GPN 4 /* 2 "nodes" of 4 ranks: exercises cross-node accounting */
#define SENTINEL 0xA5

static const uint64_t tbytes[NT] = {3u * 1024 * 1024 + 12352, (1u << 20) + 4, 4100};
static const char *tnames[NT] = {"w13", "w2", "w13_scale"};
static eplb_tensor_layout place[L][NT]; /* the same on every rank */
static uint64_t rsize[NR];

static uint64_t align16(uint64_t v) { return (v + 15) & ~(uint64_t)15; }

static void layout_init(void) {
    /* Region 0: layer 0's tensors in rows (one row per slot), from 256 on. */
    uint64_t off = 0, rowoff[NT];
    for (int t = 0; t < NT; t++) {
        off += 48; /* padding, sentinel-checked */
        rowoff[t] = off;
        off = align16(off + tbytes[t]);
    }
    uint64_t row = off + 32;
    for (int t = 0; t < NT; t++)
        place[0][t] = (eplb_tensor_layout){0, 256 + rowoff[t], row};
    rsize[0] = 256 + row * S + 64;
    /* Region 1: layer 1's w13 alone, from 512 on. */
    place[1][0] = (eplb_tensor_layout){1, 512, align16(tbytes[0]) + 64};
    rsize[1] = 512 + place[1][0].stride * S + 32;
    /* Region 2: layer 1's w2, then its scales at offset and stride = 4 mod 16. */
    place[1][1] = (eplb_tensor_layout){2, 0, tbytes[1] + 12};
    uint64_t end = place[1][1].stride * S;
    place[1][2] = (eplb_tensor_layout){2, end + 4, tbytes[2] + 8};
    rsize[2] = end + 4 + place[1][2].stride * S + 16;
}

static uint8_t pattern(uint32_t l, uint32_t t, int32_t e, uint64_t i) {
    uint64_t z = ((uint64_t)l << 48) ^ ((uint64_t)t << 40) ^ ((uint64_t)(uint32_t)e << 8) ^
                 (i * 0x9E3779B97F4A7C15ull);
    z ^= z >> 29;
    z *= 0xBF58476D1CE4E5B9ull;
    return (uint8_t)(z >> 32);
}

/* The bytes of (layer, tensor, expert), computed once each (expert ids are
 * -1..P-1 here). */
static const uint8_t *slice(int l, int t, int32_t e) {
    static uint8_t *cache[L][NT][P + 1];
    uint8_t **c = &cache[l][t][e + 1];
    if (!*c) {
        *c = xmalloc(tbytes[t]);
        for (uint64_t i = 0; i < tbytes[t]; i++)
            (*c)[i] = pattern((uint32_t)l, (uint32_t)t, e, i);
    }
    return *c;
}

/* Region r of global rank g for content rows [L][P]. */
static void build_region(uint8_t *img, uint32_t g, uint32_t r, int32_t content[L][P]) {
    memset(img, SENTINEL, rsize[r]);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < NT; t++)
            if (place[l][t].region == r)
                for (int s = 0; s < S; s++)
                    memcpy(img + place[l][t].offset + (uint64_t)s * place[l][t].stride,
                           slice(l, t, content[l][g * S + s]), tbytes[t]);
}

typedef struct world {
    uint32_t first, count; /* held ranks */
    eplb_tensor_layout places[L][NT][G];
    eplb_tensor_desc tensors[L][NT];
    eplb_layer_desc layers[L];
    eplb_region dev_regions[G][NR], shm_regions[G][NR];
    eplb_rank_buffers dev_ranks[G], shm_ranks[G];
    eplb_buffers_desc dev_desc, shm_desc;
    void *dptr[G][NR];
    char shm_names[G][NR][64];
    uint8_t *shm_map[G][NR];
    int ndev;
} world;

static int dev_of(const world *w, uint32_t g) { return (int)(g % (uint32_t)w->ndev); }

static void world_desc(world *w, uint32_t first, uint32_t count) {
    w->first = first;
    w->count = count;
    for (int l = 0; l < L; l++) {
        for (int t = 0; t < NT; t++) {
            eplb_tensor_desc *td = &w->tensors[l][t];
            snprintf(td->name, sizeof td->name, "%s", tnames[t]);
            td->bytes_per_expert = tbytes[t];
            for (uint32_t i = 0; i < count; i++)
                w->places[l][t][i] = place[l][t];
            td->ranks = w->places[l][t];
        }
        w->layers[l].num_tensors = NT;
        w->layers[l].tensors = w->tensors[l];
    }
    for (uint32_t i = 0; i < count; i++) {
        w->dev_ranks[i] = (eplb_rank_buffers){NR, w->dev_regions[i]};
        w->shm_ranks[i] = (eplb_rank_buffers){NR, w->shm_regions[i]};
    }
    bool all = first == 0 && count == G;
    w->dev_desc = (eplb_buffers_desc){EPLB_BUFFERS_DEVICE_PTR, L, G, all ? 0 : first,
                                      all ? 0 : count, w->dev_ranks, w->layers};
    w->shm_desc = w->dev_desc;
    w->shm_desc.kind = EPLB_BUFFERS_SHM;
    w->shm_desc.ranks = w->shm_ranks;
}

static void world_init(world *w, uint32_t first, uint32_t count, int32_t content[L][P]) {
    memset(w, 0, sizeof *w);
    CK(cudaGetDeviceCount(&w->ndev));
    world_desc(w, first, count);
    uint8_t *img = xmalloc(rsize[0] + rsize[1] + rsize[2]);
    for (uint32_t i = 0; i < count; i++) {
        uint32_t g = first + i;
        CK(cudaSetDevice(dev_of(w, g)));
        for (uint32_t r = 0; r < NR; r++) {
            build_region(img, g, r, content);
            CK(cudaMalloc(&w->dptr[i][r], rsize[r]));
            CK(cudaMemcpy(w->dptr[i][r], img, rsize[r], cudaMemcpyHostToDevice));
            w->dev_regions[i][r].device = dev_of(w, g);
            w->dev_regions[i][r].device_ptr = (uint64_t)(uintptr_t)w->dptr[i][r];
            w->dev_regions[i][r].size = rsize[r];

            snprintf(w->shm_names[i][r], sizeof w->shm_names[i][r], "/eplb-devcheck-%d-%u-%u",
                     (int)getpid(), g, r);
            shm_unlink(w->shm_names[i][r]);
            int fd = shm_open(w->shm_names[i][r], O_RDWR | O_CREAT | O_EXCL, 0600);
            if (fd < 0 || ftruncate(fd, (off_t)rsize[r]) != 0) {
                perror("shm");
                exit(2);
            }
            w->shm_map[i][r] = mmap(NULL, rsize[r], PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (w->shm_map[i][r] == MAP_FAILED) {
                perror("mmap");
                exit(2);
            }
            memcpy(w->shm_map[i][r], img, rsize[r]);
            snprintf(w->shm_regions[i][r].shm_name, sizeof w->shm_regions[i][r].shm_name, "%s",
                     w->shm_names[i][r]);
        }
    }
    free(img);
}

static void world_fini(world *w) {
    for (uint32_t i = 0; i < w->count; i++)
        for (uint32_t r = 0; r < NR; r++) {
            CK(cudaSetDevice(dev_of(w, w->first + i)));
            CK(cudaFree(w->dptr[i][r]));
            munmap(w->shm_map[i][r], rsize[r]);
            shm_unlink(w->shm_names[i][r]);
        }
}

/* Which (layer, tensor, slot) byte i of region r is, for messages. */
static void describe(uint32_t r, uint64_t i, char *buf, size_t n) {
    for (int l = 0; l < L; l++)
        for (int t = 0; t < NT; t++)
            if (place[l][t].region == r && i >= place[l][t].offset) {
                uint64_t k = (i - place[l][t].offset) / place[l][t].stride;
                uint64_t in = (i - place[l][t].offset) % place[l][t].stride;
                if (k < S && in < tbytes[t]) {
                    snprintf(buf, n, "layer %d %s slot %llu byte %llu", l, tnames[t],
                             (unsigned long long)k, (unsigned long long)in);
                    return;
                }
            }
    snprintf(buf, n, "padding");
}

/* Device bytes == shm bytes (when shm) == expected image, every region. */
static bool world_matches(world *w, bool shm, int32_t content[L][P], char *why, size_t n) {
    size_t max = rsize[0] + rsize[1] + rsize[2];
    uint8_t *dev = xmalloc(max), *want = xmalloc(max);
    bool ok = true;
    for (uint32_t i = 0; i < w->count && ok; i++)
        for (uint32_t r = 0; r < NR && ok; r++) {
            uint32_t g = w->first + i;
            CK(cudaSetDevice(dev_of(w, g)));
            CK(cudaMemcpy(dev, w->dptr[i][r], rsize[r], cudaMemcpyDeviceToHost));
            build_region(want, g, r, content);
            if (shm && memcmp(w->shm_map[i][r], want, rsize[r]) != 0) {
                snprintf(why, n, "cpu backend result wrong on rank %u region %u", g, r);
                ok = false;
            } else if (memcmp(dev, want, rsize[r]) != 0) {
                size_t k = 0;
                while (dev[k] == want[k])
                    k++;
                char where[96];
                describe(r, k, where, sizeof where);
                snprintf(why, n, "%s backend wrong on rank %u region %u at byte %zu (%s)",
                         backend, g, r, k, where);
                ok = false;
            }
        }
    free(dev);
    free(want);
    return ok;
}

/* A new phy2log from the current one, changing only slots of ranks [first,
 * first + count): kept slots, -1 slots (mode 1), experts drawn from those
 * slots of the same ranks currently hold (so every one has a source here). */
static void next_map(uint64_t *st, const int32_t *cur, int32_t *next, int mode, uint32_t first,
                     uint32_t count) {
    const uint32_t lo = first * S, hi = (first + count) * S;
    for (uint32_t s = 0; s < P; s++) {
        uint32_t r = (uint32_t)(rng_next(st) % 10);
        if (s < lo || s >= hi || (mode == 1 && r < 3)) {
            next[s] = cur[s];
        } else if (mode == 1 && r == 9) {
            next[s] = -1;
        } else {
            int32_t v;
            do
                v = cur[lo + rng_next(st) % (hi - lo)];
            while (v < 0);
            next[s] = v;
        }
    }
}

/* Some expert the row holds. */
static int32_t some_expert(const int32_t *row, int from_end) {
    for (int i = 0; i < P; i++) {
        int32_t v = row[from_end ? P - 1 - i : i];
        if (v >= 0)
            return v;
    }
    return 0;
}

static void apply(int32_t map[L][P], int32_t next[L][P], int32_t content[L][P], int l) {
    for (int s = 0; s < P; s++) {
        if (next[l][s] != -1)
            content[l][s] = next[l][s];
        map[l][s] = next[l][s];
    }
}

/* Every layer through the GPU backend (gather + scatter) and the cpu one. */
static bool run_both(world *w, eplb_backend *gpu, eplb_backend *cpu, int32_t map[L][P],
                     int32_t next[L][P], int32_t content[L][P], char *why, size_t n) {
    for (int l = 0; l < L; l++) {
        eplb_plan plan;
        eplb_error err;
        if (eplb_plan_build(P, G, GPN, map[l], next[l], w->first, w->count, &plan, &err) !=
            EPLB_OK) {
            snprintf(why, n, "plan: %s", err.msg);
            return false;
        }
        eplb_status a = eplb_backend_gather(gpu, (uint32_t)l, &plan, &err);
        if (a == EPLB_OK)
            a = eplb_backend_scatter(gpu, (uint32_t)l, &plan, &err);
        if (a != EPLB_OK) {
            snprintf(why, n, "%s gather/scatter layer %d: %s", backend, l, err.msg);
            eplb_plan_free(&plan);
            return false;
        }
        a = eplb_backend_execute_layer(cpu, (uint32_t)l, &plan, &err);
        eplb_plan_free(&plan);
        if (a != EPLB_OK) {
            snprintf(why, n, "cpu execute layer %d: %s", l, err.msg);
            return false;
        }
        apply(map, next, content, l);
    }
    eplb_error err;
    if (eplb_backend_synchronize(gpu, &err) != EPLB_OK ||
        eplb_backend_synchronize(cpu, &err) != EPLB_OK) {
        snprintf(why, n, "synchronize: %s", err.msg);
        return false;
    }
    return world_matches(w, true, content, why, n);
}

static bool open_pair(world *w, eplb_backend **gpu, eplb_backend **cpu, const char *what) {
    eplb_error err;
    char why[700];
    *gpu = *cpu = NULL;
    if (eplb_backend_open_by_name(backend, &w->dev_desc, P, gpu, &err) != EPLB_OK) {
        snprintf(why, sizeof why, "%s: open %s: %s", what, backend, err.msg);
        result(false, why);
        return false;
    }
    if (eplb_backend_open_by_name("cpu", &w->shm_desc, P, cpu, &err) != EPLB_OK) {
        snprintf(why, sizeof why, "%s: open cpu: %s", what, err.msg);
        result(false, why);
        eplb_backend_close(*gpu);
        return false;
    }
    return true;
}

static void init_rows(int32_t map[L][P], int32_t content[L][P]) {
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            map[l][s] = content[l][s] = s < 24 ? s : s % 24; /* 24 logical + 8 redundant */
}

static void check_device_ptr(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    eplb_backend *gpu, *cpu;
    eplb_error err;
    char why[600] = "";
    if (!open_pair(&w, &gpu, &cpu, "device_ptr"))
        return;
    char buf[160];
    snprintf(buf, sizeof buf, "device_ptr: backends open (%d device%s, %d regions per rank)",
             w.ndev, w.ndev == 1 ? "" : "s", NR);
    result(true, buf);
    result(world_matches(&w, true, content, why, sizeof why), "device_ptr: initial images equal");

    uint64_t st = 2026;
    for (int round = 0; round < 12; round++) {
        const char *what;
        for (int l = 0; l < L; l++) {
            if (round == 0) { /* every GPU swaps its first two slots */
                memcpy(next[l], map[l], sizeof next[l]);
                for (int g = 0; g < G; g++) {
                    next[l][g * S] = map[l][g * S + 1];
                    next[l][g * S + 1] = map[l][g * S];
                }
            } else if (round == 1) { /* rotate whole GPUs: all cross-GPU */
                for (int s = 0; s < P; s++)
                    next[l][s] = map[l][(s + S) % P];
            } else if (round == 2) { /* one expert everywhere on GPU 0: duplicates */
                memcpy(next[l], map[l], sizeof next[l]);
                int32_t e = some_expert(map[l], 1);
                for (int s = 0; s < S; s++)
                    next[l][s] = e;
            } else if (round == 11) { /* derangement of every slot */
                int32_t perm[P];
                for (int s = 0; s < P; s++)
                    perm[s] = s;
                for (int s = P - 1; s > 0; s--) {
                    int j = (int)(rng_next(&st) % (uint64_t)s);
                    int32_t t = perm[s];
                    perm[s] = perm[j];
                    perm[j] = t;
                }
                for (int s = 0; s < P; s++)
                    next[l][s] = map[l][perm[s]] >= 0 ? map[l][perm[s]] : some_expert(map[l], 0);
            } else {
                next_map(&st, map[l], next[l], 1, 0, G);
            }
        }
        what = round == 0 ? "swap in every GPU" : round == 1 ? "rotate GPUs" :
               round == 2 ? "duplicate destinations" : round == 11 ? "derangement" : "random map";
        bool ok = run_both(&w, gpu, cpu, map, next, content, why, sizeof why);
        char name[700];
        snprintf(name, sizeof name, "device_ptr: round %d (%s)%s%s", round, what, ok ? "" : ": ",
                 ok ? "" : why);
        result(ok, name);
    }

    /* Faults: gather fault changes nothing; scatter fault + retry completes. */
    for (int l = 0; l < L; l++)
        next_map(&st, map[l], next[l], 0, 0, G);
    eplb_plan plan;
    if (eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err) != EPLB_OK) {
        result(false, "faults: plan");
        return;
    }
    int32_t before[L][P];
    memcpy(before, content, sizeof before);
    eplb_backend_set_fault(EPLB_FAULT_GATHER, 2);
    eplb_status fs = eplb_backend_gather(gpu, 0, &plan, &err);
    eplb_status ps = eplb_backend_scatter(gpu, 0, &plan, &err); /* no gather: refused */
    result(fs == EPLB_EINTERNAL && ps == EPLB_EPRECONDITION &&
               world_matches(&w, false, before, why, sizeof why),
           "faults: gather fault -> EINTERNAL, scatter refused, device memory unchanged");
    eplb_backend_set_fault(EPLB_FAULT_SCATTER, plan.num_scatter > 2 ? 3 : 1);
    eplb_status gs = eplb_backend_gather(gpu, 0, &plan, &err);
    fs = eplb_backend_scatter(gpu, 0, &plan, &err);
    eplb_status rs = eplb_backend_scatter(gpu, 0, &plan, &err);
    eplb_status again = eplb_backend_scatter(gpu, 0, &plan, &err); /* harmless */
    eplb_status cs = eplb_backend_execute_layer(cpu, 0, &plan, &err);
    apply(map, next, content, 0);
    bool ok = gs == EPLB_OK && fs == EPLB_EDATALOSS && rs == EPLB_OK && again == EPLB_OK &&
              cs == EPLB_OK && world_matches(&w, true, content, why, sizeof why);
    result(ok, "faults: scatter fault -> EDATALOSS, a second scatter from staging completes, a "
               "third changes nothing");
    eplb_backend_set_fault(EPLB_FAULT_NONE, 0);
    eplb_plan_free(&plan);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}

/* ---- held ranks ------------------------------------------------------------ */

static void check_held(void) {
    enum { FIRST = 2, COUNT = 4 };
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, FIRST, COUNT, content);
    eplb_backend *gpu, *cpu;
    char why[600] = "";
    if (!open_pair(&w, &gpu, &cpu, "held ranks 2..5"))
        return;
    uint64_t st = 5;
    bool ok = true;
    for (int round = 0; round < 4 && ok; round++) {
        for (int l = 0; l < L; l++)
            next_map(&st, map[l], next[l], round & 1, FIRST, COUNT);
        ok = run_both(&w, gpu, cpu, map, next, content, why, sizeof why);
    }
    char name[700];
    snprintf(name, sizeof name, "held ranks 2..5 of 8: 4 rounds moved, other ranks untouched%s%s",
             ok ? "" : ": ", ok ? "" : why);
    result(ok, name);

    /* A plan for all ranks that writes rank 0 and reads rank 7: refused. */
    for (int s = 0; s < P; s++)
        next[0][s] = map[0][s];
    next[0][0] = map[0][P - 1] >= 0 ? map[0][P - 1] : some_expert(map[0], 1);
    next[0][FIRST * S] = map[0][P - 2] >= 0 ? map[0][P - 2] : some_expert(map[0], 1);
    eplb_plan plan;
    eplb_error err;
    eplb_status bs = eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err);
    eplb_status gs = bs == EPLB_OK ? eplb_backend_gather(gpu, 0, &plan, &err) : bs;
    snprintf(name, sizeof name, "held ranks: a plan touching ranks 0 and 7 -> EPRECONDITION, "
             "nothing written (got %s: %s)", eplb_status_name(gs), err.msg);
    result(bs == EPLB_OK && gs == EPLB_EPRECONDITION &&
               world_matches(&w, true, content, why, sizeof why),
           name);
    eplb_plan_free(&plan);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}

/* ---- open refusals --------------------------------------------------------- */

/* Opening d must fail with code and a message containing every needle. */
static void expect_refusal(const char *what, const eplb_buffers_desc *d, eplb_status code,
                           const char *n1, const char *n2) {
    eplb_backend *b = NULL;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_backend_open_by_name(backend, d, P, &b, &err);
    bool ok = st == code && b == NULL && strstr(err.msg, n1) && (!n2 || strstr(err.msg, n2));
    char name[800];
    snprintf(name, sizeof name, "open refuses %s (%s: %s)", what, eplb_status_name(st), err.msg);
    result(ok, name);
    eplb_backend_close(b);
}

static void check_refusals(void) {
    static int32_t map[L][P], content[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    eplb_region saved = w.dev_regions[1][2];

    /* Larger than the allocation: cudaMalloc rounds sizes up to its
     * granularity (up to 2 MiB), so declare 4 MiB more. */
    w.dev_regions[1][2].size = rsize[2] + (4u << 20);
    expect_refusal("a region declared larger than its allocation", &w.dev_desc, EPLB_EINVAL,
                   "ranks[1].regions[2]", "allocation");
    w.dev_regions[1][2] = saved;

    /* Declared on another device than the memory's. */
    if (w.ndev >= 2) {
        for (int r = 0; r < NR; r++)
            w.dev_regions[0][r].device = 1;
        expect_refusal("memory on device 0 declared on device 1", &w.dev_desc, EPLB_EINVAL,
                       "ranks[0].regions[0]", "on device 0");
        for (int r = 0; r < NR; r++)
            w.dev_regions[0][r].device = 0;
    } else {
        printf("SKIP open refuses memory on the wrong device (one device)\n");
    }

    /* Host memory is not device memory. */
    void *host = aligned_alloc(256, (size_t)rsize[2]);
    saved = w.dev_regions[3][2];
    w.dev_regions[3][2].device_ptr = (uint64_t)(uintptr_t)host;
    expect_refusal("host memory as a device pointer", &w.dev_desc, EPLB_EINVAL,
                   "ranks[3].regions[2]", "device memory");
    w.dev_regions[3][2] = saved;
    free(host);

    /* Offsets must be multiples of 4 for device kinds (validation). */
    eplb_tensor_layout keep = w.places[1][2][5];
    w.places[1][2][5].offset += 2;
    expect_refusal("an offset that is not a multiple of 4", &w.dev_desc, EPLB_EINVAL,
                   "ranks[5]", "of 4");
    w.places[1][2][5] = keep;

    /* And the restored description opens. */
    eplb_backend *b = NULL;
    eplb_error err;
    eplb_status st = eplb_backend_open_by_name(backend, &w.dev_desc, P, &b, &err);
    char name[700];
    snprintf(name, sizeof name, "open: the restored description opens%s%s",
             st == EPLB_OK ? "" : ": ", st == EPLB_OK ? "" : err.msg);
    result(st == EPLB_OK, name);
    eplb_backend_close(b);
    world_fini(&w);
}

/* ---- host emulation only: peer refused, sticky error ---------------------- */

#ifdef EPLB_DEVICE_CHECK_ON_HOST
/* Enabling peer access 0 -> 1 fails (emulated): the open still succeeds,
 * rank copies from device 0 to 1 go through hipMemcpyPeerAsync, 1 -> 0
 * stays on the kernel path, and the bytes are right. */
static void check_peer_refused(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    setenv("EPLB_HOST_PEER_FAIL", "0>1", 1);
    memset(eplb_host_emul_peer_copies, 0, sizeof eplb_host_emul_peer_copies);
    eplb_backend *gpu, *cpu;
    bool opened = open_pair(&w, &gpu, &cpu, "peer 0>1 refused");
    unsetenv("EPLB_HOST_PEER_FAIL");
    if (!opened)
        return;
    char why[600] = "";
    for (int l = 0; l < L; l++) /* rotate GPUs backwards: rank g+1 -> rank g, and forwards */
        for (int s = 0; s < P; s++)
            next[l][s] = map[l][(s + (l ? S : P - S)) % P];
    bool ok = run_both(&w, gpu, cpu, map, next, content, why, sizeof why);
    unsigned fwd = eplb_host_emul_peer_copies[0][1], back = eplb_host_emul_peer_copies[1][0];
    char name[800];
    snprintf(name, sizeof name, "peer access 0 -> 1 refused: open succeeds, 0 -> 1 copies by "
             "%sMemcpyPeerAsync (%u), 1 -> 0 by the kernel (%u peer copies), bytes right%s%s",
             backend, fwd, back, ok ? "" : ": ", ok ? "" : why);
    result(ok && fwd > 0 && back == 0, name);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}

/* A sticky error during a scatter (emulated illegal address): EDATALOSS
 * naming it, and every later call says so again, even once the "device"
 * answers again -- the backend never pretends a retry worked. */
static void check_sticky(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    eplb_backend *gpu, *cpu;
    if (!open_pair(&w, &gpu, &cpu, "sticky error"))
        return;
    uint64_t st = 11;
    next_map(&st, map[0], next[0], 0, 0, G);
    eplb_plan plan;
    eplb_error err, e2, e3, e4;
    bool ok = eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err) == EPLB_OK;
    eplb_status gs = ok ? eplb_backend_gather(gpu, 0, &plan, &err) : EPLB_EINVAL;
    eplb_host_emul_sticky = 1;
    eplb_status ss = eplb_backend_scatter(gpu, 0, &plan, &err);
    eplb_host_emul_sticky = 0;
    eplb_status rs = eplb_backend_scatter(gpu, 0, &plan, &e2);
    eplb_status ns = eplb_backend_gather(gpu, 1, &plan, &e3);
    eplb_status cs = eplb_backend_check(gpu, &e4);
    ok = ok && gs == EPLB_OK && ss == EPLB_EDATALOSS && strstr(err.msg, "sticky") &&
         strstr(err.msg, "illegal") && rs == EPLB_EDATALOSS && strstr(e2.msg, "sticky") &&
         ns == EPLB_EDATALOSS && cs == EPLB_EDATALOSS && strstr(e4.msg, "restart");
    char name[900];
    snprintf(name, sizeof name, "sticky device error in a scatter: EDATALOSS, and the retry, the "
             "next gather and check stay EDATALOSS (%s; retry %s; check %s)",
             err.msg, eplb_status_name(rs), eplb_status_name(cs));
    result(ok, name);
    eplb_plan_free(&plan);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);

    /* Struck in a gather: no slot written, but the backend is broken just
     * the same: EDATALOSS (the registry then stores NEEDS_RELOAD). */
    init_rows(map, content);
    world_init(&w, 0, G, content);
    if (!open_pair(&w, &gpu, &cpu, "sticky error in a gather"))
        return;
    ok = eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err) == EPLB_OK;
    eplb_host_emul_sticky = 1;
    gs = ok ? eplb_backend_gather(gpu, 0, &plan, &err) : EPLB_EINVAL;
    eplb_host_emul_sticky = 0;
    cs = eplb_backend_check(gpu, &e4);
    ok = ok && gs == EPLB_EDATALOSS && strstr(err.msg, "sticky") && !strstr(err.msg, "half written") &&
         cs == EPLB_EDATALOSS;
    snprintf(name, sizeof name, "sticky device error in a gather: EDATALOSS, no slot said written (%s)", err.msg);
    result(ok, name);
    eplb_plan_free(&plan);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}
#endif

/* ---- events (ABI 4): GPU-side ordering with the engine's streams ------------ */

/* An engine handle as the emulation reads it (eplb_hip_compat.h): the magic,
 * then a pointer naming the event. */
#ifdef EPLB_DEVICE_CHECK_ON_HOST
static int engine_origin; /* its address names the engine's event */
static void engine_handle(uint8_t h[EPLB_EVENT_HANDLE_SIZE], const void *origin) {
    memset(h, 0, EPLB_EVENT_HANDLE_SIZE);
    memcpy(h, "eplbevt", 8);
    memcpy(h + 8, &origin, sizeof origin);
}
#endif

/* Both builds: the cpu backend has no events (refused, length too), a
 * device backend has; a garbage handle is refused cleanly (EPLB_EINVAL,
 * nothing queued, the backend moves afterwards); the done handle is the
 * same on every record and not all zero.  Host emulation also checks the
 * order the streams see: every device's stream waits on the engine's event
 * before the first copy, and the exported event is recorded after the last
 * copy, on the first device, after the other devices' joins; an engine
 * handle seen again is not opened again. */
static void check_events(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    eplb_backend *gpu, *cpu;
    if (!open_pair(&w, &gpu, &cpu, "events"))
        return;
    eplb_error err;
    char why[700] = "";
    uint8_t h[EPLB_EVENT_HANDLE_SIZE], done1[EPLB_EVENT_HANDLE_SIZE], done2[EPLB_EVENT_HANDLE_SIZE];
    memset(h, 0x5a, sizeof h);
    bool ok = !eplb_backend_has_events(cpu) && eplb_backend_has_events(gpu);
    eplb_status c1 = eplb_backend_wait_event(cpu, h, sizeof h, &err);
    ok = ok && c1 == EPLB_EINVAL && strstr(err.msg, "events need a device backend");
    eplb_status c2 = eplb_backend_record_event(cpu, done1, &err);
    ok = ok && c2 == EPLB_EINVAL;
    eplb_status c3 = eplb_backend_wait_event(gpu, h, 63, &err);
    ok = ok && c3 == EPLB_EINVAL && strstr(err.msg, "want 64");
    if (!ok)
        snprintf(why, sizeof why, "refusals: cpu wait %s, cpu record %s, short handle %s: %s",
                 eplb_status_name(c1), eplb_status_name(c2), eplb_status_name(c3), err.msg);
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    eplb_host_emul_log_len = 0;
#endif
    /* Garbage (0x5a bytes: no event of any process). */
    eplb_status bad = eplb_backend_wait_event(gpu, h, sizeof h, &err);
    if (ok && !(bad == EPLB_EINVAL && strstr(err.msg, "IpcOpenEventHandle"))) {
        ok = false;
        snprintf(why, sizeof why, "garbage handle: %s: %s", eplb_status_name(bad), err.msg);
    }
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    unsigned queued = 0; /* stream work; setting a device is not */
    for (unsigned i = 0; i < eplb_host_emul_log_len; i++)
        queued += strcmp(eplb_host_emul_log_entries[i].what, "set") != 0;
    if (ok && queued != 0) {
        ok = false;
        snprintf(why, sizeof why, "a refused handle queued %u stream operations", queued);
    }
    engine_handle(h, &engine_origin);
    for (int round = 0; ok && round < 2; round++)
        if (eplb_backend_wait_event(gpu, h, sizeof h, &err) != EPLB_OK) {
            ok = false;
            snprintf(why, sizeof why, "engine handle, round %d: %s", round, err.msg);
        }
#endif
    /* One move of both layers, then the done event (twice: same handle). */
    uint64_t rs = 5;
    for (int l = 0; ok && l < L; l++) {
        next_map(&rs, map[l], next[l], 1, 0, G);
        eplb_plan plan;
        ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
             eplb_backend_execute_layer(gpu, (uint32_t)l, &plan, &err) == EPLB_OK &&
             eplb_backend_execute_layer(cpu, (uint32_t)l, &plan, &err) == EPLB_OK;
        eplb_plan_free(&plan);
        if (!ok)
            snprintf(why, sizeof why, "move layer %d after the wait: %s", l, err.msg);
        apply(map, next, content, l);
    }
    static const uint8_t zero[EPLB_EVENT_HANDLE_SIZE];
    if (ok && (eplb_backend_record_event(gpu, done1, &err) != EPLB_OK ||
               eplb_backend_record_event(gpu, done2, &err) != EPLB_OK)) {
        ok = false;
        snprintf(why, sizeof why, "record: %s", err.msg);
    }
    if (ok && (memcmp(done1, done2, sizeof done1) != 0 || memcmp(done1, zero, sizeof zero) == 0)) {
        ok = false;
        snprintf(why, sizeof why, "the done handle is all zero or changes between records");
    }
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    if (ok) {
        /* The log since the garbage handle: open (once), waits, copies,
         * then the records of the first record_event. */
        /* Stream work only: the hipSetDevice calls between are not. */
        static eplb_host_log_entry lg[EPLB_HOST_LOG_MAX];
        unsigned n = 0;
        for (unsigned i = 0; i < eplb_host_emul_log_len; i++)
            if (strcmp(eplb_host_emul_log_entries[i].what, "set") != 0)
                lg[n++] = eplb_host_emul_log_entries[i];
        unsigned opens = 0, waits = 0, first_copy = n, last_copy = 0;
        unsigned last_wait = 0, first_record = n;
        bool waited[8] = {false};
        const void *done_ev = NULL;
        memcpy(&done_ev, done1 + 8, sizeof done_ev);
        for (unsigned i = 0; i < n; i++) {
            if (strcmp(lg[i].what, "open") == 0)
                opens += lg[i].event == &engine_origin;
            else if (strcmp(lg[i].what, "copy") == 0) {
                if (first_copy == n)
                    first_copy = i;
                last_copy = i;
            } else if (strcmp(lg[i].what, "wait") == 0 && lg[i].event == &engine_origin) {
                waits++;
                last_wait = i;
                if (lg[i].device >= 0 && lg[i].device < 8)
                    waited[lg[i].device] = true;
            } else if (strcmp(lg[i].what, "record") == 0 && first_record == n)
                first_record = i;
        }
        /* The first record_event's entries: ndev - 1 joins (each followed
         * by the first device's wait on it) and the exported record. */
        unsigned exported = first_record + 2 * (unsigned)(w.ndev - 1);
        bool all_waited = true;
        for (int d = 0; d < w.ndev && d < 8; d++)
            all_waited = all_waited && waited[d];
        ok = opens == 1 && waits == 2 * (unsigned)w.ndev && all_waited && first_copy < n &&
             last_wait < first_copy && first_record > last_copy && exported < n &&
             strcmp(lg[exported].what, "record") == 0 && lg[exported].event == done_ev &&
             lg[exported].device == dev_of(&w, 0);
        if (!ok)
            snprintf(why, sizeof why, "stream order: %u opens (want 1), %u waits (want %d, every "
                     "device: %s), last wait %u < first copy %u, last copy %u < first record "
                     "%u, exported record at %u: %s on device %d, the handle's event: %s",
                     opens, waits, 2 * w.ndev, all_waited ? "yes" : "no", last_wait, first_copy,
                     last_copy, first_record, exported, exported < n ? lg[exported].what : "-",
                     exported < n ? lg[exported].device : -1,
                     exported < n && lg[exported].event == done_ev ? "yes" : "no");
    }
#endif
    /* The bad handle left the backend usable: the bytes are right. */
    if (ok && (eplb_backend_synchronize(gpu, &err) != EPLB_OK || !world_matches(&w, true, content, why, sizeof why)))
        ok = false;
    char name[900];
    snprintf(name, sizeof name, "events: cpu refused, garbage handle refused cleanly, %s; done "
             "handle stable%s%s",
#ifdef EPLB_DEVICE_CHECK_ON_HOST
             "waits on every stream before the first copy, done event after the last",
#else
             "moves after it",
#endif
             ok ? "" : ": ", ok ? "" : why);
    result(ok, name);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}

#ifdef EPLB_DEVICE_CHECK_ON_HOST
/* Only the devices the regions name: with 4 devices visible and every rank
 * on devices 2 and 3, nothing of open, reserve, a move, the events or close
 * sets device 0 or 1 (setting a device creates its context on CUDA 12 and
 * HIP: memory on a GPU the model does not use).  Runs first, while the
 * emulated process has no context anywhere (as eplbd at start). */
static void check_devices_named(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    setenv("EPLB_HOST_DEVICES", "2", 1);
    world_init(&w, 0, G, content); /* on "devices" 0 and 1 of this test ... */
    setenv("EPLB_HOST_DEVICES", "4", 1);
    /* ... which the backend is told are devices 2 and 3 of 4. */
    for (int i = 0; i < EPLB_HOST_EMUL_MAX_ALLOCS; i++)
        for (uint32_t g = 0; g < G; g++)
            for (uint32_t r = 0; r < NR; r++)
                if (emul_allocs[i].base && emul_allocs[i].base == w.dptr[g][r])
                    emul_allocs[i].device += 2;
    for (uint32_t g = 0; g < G; g++)
        for (uint32_t r = 0; r < NR; r++)
            w.dev_regions[g][r].device += 2;
    eplb_host_emul_log_len = 0;
    eplb_backend *gpu = NULL;
    eplb_error err;
    char why[700] = "";
    uint32_t entries[L] = {S, S};
    uint64_t total, per_gpu;
    uint8_t done[EPLB_EVENT_HANDLE_SIZE];
    bool ok = eplb_backend_open_by_name(backend, &w.dev_desc, P, &gpu, &err) == EPLB_OK &&
              eplb_backend_reserve_staging(gpu, entries, &total, &per_gpu, &err) == EPLB_OK;
    uint64_t rs = 9;
    for (int l = 0; ok && l < L; l++) {
        next_map(&rs, map[l], next[l], 1, 0, G);
        eplb_plan plan;
        ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
             eplb_backend_execute_layer(gpu, (uint32_t)l, &plan, &err) == EPLB_OK;
        eplb_plan_free(&plan);
    }
    ok = ok && eplb_backend_record_event(gpu, done, &err) == EPLB_OK &&
         eplb_backend_synchronize(gpu, &err) == EPLB_OK;
    if (!ok)
        snprintf(why, sizeof why, "%s", err.msg);
    eplb_backend_close(gpu);
    unsigned sets[4] = {0, 0, 0, 0};
    for (unsigned i = 0; i < eplb_host_emul_log_len; i++)
        if (strcmp(eplb_host_emul_log_entries[i].what, "set") == 0 &&
            eplb_host_emul_log_entries[i].device >= 0 && eplb_host_emul_log_entries[i].device < 4)
            sets[eplb_host_emul_log_entries[i].device]++;
    if (ok && (sets[0] || sets[1] || !sets[2] || !sets[3])) {
        ok = false;
        snprintf(why, sizeof why, "devices set: 0: %u, 1: %u, 2: %u, 3: %u (want none on 0, 1)",
                 sets[0], sets[1], sets[2], sets[3]);
    }
    for (uint32_t g = 0; g < G; g++) /* back, for world_fini */
        for (int i = 0; i < EPLB_HOST_EMUL_MAX_ALLOCS; i++)
            for (uint32_t r = 0; r < NR; r++)
                if (emul_allocs[i].base && emul_allocs[i].base == w.dptr[g][r])
                    emul_allocs[i].device -= 2;
    world_fini(&w);
    char name[900];
    snprintf(name, sizeof name, "only the devices the regions name are set (ranks on 2 and 3 of "
             "4: open, reserve, move, done event, close)%s%s", ok ? "" : ": ", ok ? "" : why);
    result(ok, name);
}
#endif

/* ---- staging reserved once (ABI 4) ------------------------------------------ */

/* Reserved for S entries per rank, staging is allocated at the reservation
 * (per_gpu: the ranks of the busiest device x that) and moves run without
 * growing it; reserved too small, a gather that needs more is refused
 * (EPLB_EINTERNAL naming the reservation) with every byte as it was. */
static void check_staging_once(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    init_rows(map, content);
    world w;
    world_init(&w, 0, G, content);
    eplb_backend *gpu, *cpu;
    if (!open_pair(&w, &gpu, &cpu, "staging once"))
        return;
    eplb_error err;
    char why[700] = "";
    /* An entry is the layer's tensors, each padded to 64 bytes
     * (eplb_backend_impl.h); both layers have the same tensors. */
    uint64_t entry = 0;
    for (int t = 0; t < NT; t++)
        entry += (tbytes[t] + 63) & ~(uint64_t)63;
    const uint64_t rank_bytes = (uint64_t)S * entry;
    uint32_t entries[L], tiny[L];
    for (int l = 0; l < L; l++) {
        entries[l] = S;
        tiny[l] = 1;
    }
    uint64_t total = 0, per_gpu = 0, ctotal = 0, cper = 0;
    /* Ranks on the busiest device: rank g is on device g % ndev. */
    uint64_t busiest = (uint64_t)((G + w.ndev - 1) / w.ndev);
    bool ok = eplb_backend_reserve_staging(gpu, entries, &total, &per_gpu, &err) == EPLB_OK &&
              eplb_backend_reserve_staging(cpu, entries, &ctotal, &cper, &err) == EPLB_OK;
    if (!ok)
        snprintf(why, sizeof why, "reserve: %s", err.msg);
    else if (per_gpu != busiest * rank_bytes || total != (uint64_t)G * rank_bytes ||
             ctotal != (uint64_t)G * rank_bytes || cper != 0) {
        ok = false;
        snprintf(why, sizeof why, "reserved %llu per GPU (want %llu), %llu in all (want %llu); "
                 "cpu %llu, %llu per GPU (want 0)", (unsigned long long)per_gpu,
                 (unsigned long long)(busiest * rank_bytes), (unsigned long long)total,
                 (unsigned long long)G * rank_bytes, (unsigned long long)ctotal,
                 (unsigned long long)cper);
    }
    /* Full derangements: the most staging a plan can ask of a rank. */
    for (int round = 0; ok && round < 3; round++) {
        for (int l = 0; l < L; l++)
            for (int s2 = 0; s2 < P; s2++)
                next[l][s2] = map[l][(s2 + S * (round + 1) + 1) % P];
        ok = run_both(&w, gpu, cpu, map, next, content, why, sizeof why);
    }
    /* Too small (1 entry per rank): a gather staging more is refused, nothing written. */
    if (ok && eplb_backend_reserve_staging(gpu, tiny, &total, &per_gpu, &err) != EPLB_OK) {
        ok = false;
        snprintf(why, sizeof why, "reserve 1 entry: %s", err.msg);
    }
    if (ok) {
        /* The reservation only grows: shrinking keeps the buffer, so shrink
         * by closing and reopening. */
        eplb_backend_close(gpu);
        gpu = NULL;
        if (eplb_backend_open_by_name(backend, &w.dev_desc, P, &gpu, &err) != EPLB_OK ||
            eplb_backend_reserve_staging(gpu, tiny, &total, &per_gpu, &err) != EPLB_OK) {
            ok = false;
            snprintf(why, sizeof why, "reopen + reserve 1 entry: %s", err.msg);
        }
    }
    if (ok) {
        for (int s2 = 0; s2 < P; s2++)
            next[0][s2] = map[0][(s2 + 1) % P]; /* a rotation: staging needed */
        eplb_plan plan;
        eplb_status gs = EPLB_EINVAL;
        if (eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err) == EPLB_OK) {
            gs = plan.num_staging ? eplb_backend_gather(gpu, 0, &plan, &err) : EPLB_OK;
            eplb_plan_free(&plan);
        }
        ok = gs == EPLB_EINTERNAL && strstr(err.msg, "reserved at attach") &&
             world_matches(&w, true, content, why, sizeof why);
        if (!ok && !why[0])
            snprintf(why, sizeof why, "a gather past a 1-entry reservation: %s (%s)",
                     eplb_status_name(gs), err.msg);
    }
    char name[900];
    snprintf(name, sizeof name, "staging reserved once: %llu bytes per GPU, moves within it, a "
             "plan past it refused with nothing written%s%s", (unsigned long long)per_gpu,
             ok ? "" : ": ", ok ? "" : why);
    result(ok, name);
    eplb_backend_close(gpu);
    eplb_backend_close(cpu);
    world_fini(&w);
}

/* ---- ipc through an engine child process ----------------------------------- */

#ifdef EPLB_DEVICE_CHECK_ON_HOST
/* Host emulation: the "IPC handles" hold pointers, so the exporting side
 * lives in this process. */
static void check_ipc(const char *self) {
    (void)self;
    static int32_t map[L][P], content[L][P], next[L][P];
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            map[l][s] = content[l][s] = (s * 7 + l) % 28;
    world w;
    world_init(&w, 0, G, content);
    w.dev_desc.kind = ipc_kind;
    for (int g = 0; g < G; g++)
        for (int r = 0; r < NR; r++) {
            cudaIpcMemHandle_t h;
            CK(cudaIpcGetMemHandle(&h, w.dptr[g][r]));
            memcpy(w.dev_regions[g][r].ipc_handle, &h, EPLB_IPC_HANDLE_SIZE);
            w.dev_regions[g][r].device_ptr = 0;
        }
    eplb_backend *gpu = NULL;
    eplb_error err;
    char why[600] = "";
    bool ok = eplb_backend_open_by_name("auto", &w.dev_desc, P, &gpu, &err) == EPLB_OK &&
              strcmp(eplb_backend_name(gpu), backend) == 0;
    if (!ok)
        snprintf(why, sizeof why, "open auto: %s (%s)", err.msg, eplb_backend_name(gpu));
    uint64_t st = 77;
    for (int round = 0; ok && round < 4; round++)
        for (int l = 0; l < L && ok; l++) {
            next_map(&st, map[l], next[l], 1, 0, G);
            eplb_plan plan;
            ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
                 eplb_backend_execute_layer(gpu, (uint32_t)l, &plan, &err) == EPLB_OK;
            if (!ok)
                snprintf(why, sizeof why, "round %d layer %d: %s", round, l, err.msg);
            eplb_plan_free(&plan);
            apply(map, next, content, l);
        }
    eplb_backend_close(gpu);
    if (ok)
        ok = world_matches(&w, false, content, why, sizeof why);
    world_fini(&w);
    char name[700];
    snprintf(name, sizeof name, "ipc (in-process, host emulation; auto picks %s)%s%s", backend,
             ok ? "" : ": ", ok ? "" : why);
    result(ok, name);
}

static int ipc_child(void) { return 2; }
#else
/* The engine: allocate every region, fill with content rows from stdin,
 * export handles on stdout, then read the final content rows and check
 * every region's bytes. */
static int ipc_child(void) {
    static int32_t content[L][P];
    if (fread(content, sizeof content, 1, stdin) != 1)
        return 2;
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    void *dptr[G][NR];
    uint8_t *img = xmalloc(rsize[0] + rsize[1] + rsize[2]);
    for (uint32_t g = 0; g < G; g++)
        for (uint32_t r = 0; r < NR; r++) {
            build_region(img, g, r, content);
            CK(cudaSetDevice((int)g % ndev));
            CK(cudaMalloc(&dptr[g][r], rsize[r]));
            CK(cudaMemcpy(dptr[g][r], img, rsize[r], cudaMemcpyHostToDevice));
            cudaIpcMemHandle_t h;
            CK(cudaIpcGetMemHandle(&h, dptr[g][r]));
            int32_t dev = (int32_t)g % ndev;
            uint64_t size = rsize[r];
            fwrite(&h, sizeof h, 1, stdout);
            fwrite(&dev, sizeof dev, 1, stdout);
            fwrite(&size, sizeof size, 1, stdout);
        }
    fflush(stdout);
    if (fread(content, sizeof content, 1, stdin) != 1)
        return 2;
    int bad = 0;
    uint8_t *dev = xmalloc(rsize[0] + rsize[1] + rsize[2]);
    for (uint32_t g = 0; g < G; g++)
        for (uint32_t r = 0; r < NR; r++) {
            CK(cudaSetDevice((int)g % ndev));
            CK(cudaMemcpy(dev, dptr[g][r], rsize[r], cudaMemcpyDeviceToHost));
            build_region(img, g, r, content);
            if (memcmp(dev, img, rsize[r]) != 0) {
                size_t k = 0;
                while (dev[k] == img[k])
                    k++;
                char where[96];
                describe(r, k, where, sizeof where);
                fprintf(stderr, "engine: rank %u region %u differs at byte %zu (%s)\n", g, r, k,
                        where);
                bad = 1;
            }
            CK(cudaFree(dptr[g][r]));
        }
    free(dev);
    free(img);
    char verdict = bad ? 'F' : 'K';
    fwrite(&verdict, 1, 1, stdout);
    fflush(stdout);
    return bad;
}

static void check_ipc(const char *self) {
    static int32_t map[L][P], content[L][P], next[L][P];
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            map[l][s] = content[l][s] = (s * 7 + l) % 28;
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0) {
        result(false, "ipc: pipe");
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(to_child[0], 0);
        dup2(from_child[1], 1);
        close(to_child[1]);
        close(from_child[0]);
        execl(self, self, "--ipc-child", (char *)NULL);
        _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    FILE *out = fdopen(to_child[1], "w"), *in = fdopen(from_child[0], "r");
    fwrite(content, sizeof content, 1, out);
    fflush(out);
    world w;
    memset(&w, 0, sizeof w);
    world_desc(&w, 0, G);
    w.dev_desc.kind = ipc_kind;
    bool ok = true;
    for (int g = 0; g < G && ok; g++)
        for (int r = 0; r < NR && ok; r++)
            ok = fread(w.dev_regions[g][r].ipc_handle, EPLB_IPC_HANDLE_SIZE, 1, in) == 1 &&
                 fread(&w.dev_regions[g][r].device, sizeof(int32_t), 1, in) == 1 &&
                 fread(&w.dev_regions[g][r].size, sizeof(uint64_t), 1, in) == 1;
    char why[600] = "the engine gave no handles";
    eplb_backend *gpu = NULL;
    eplb_error err;
    if (ok && eplb_backend_open_by_name("auto", &w.dev_desc, P, &gpu, &err) != EPLB_OK) {
        snprintf(why, sizeof why, "open: %s", err.msg);
        ok = false;
    }
    uint64_t st = 77;
    for (int round = 0; ok && round < 4; round++) {
        for (int l = 0; l < L && ok; l++) {
            next_map(&st, map[l], next[l], 1, 0, G);
            eplb_plan plan;
            ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
                 eplb_backend_execute_layer(gpu, (uint32_t)l, &plan, &err) == EPLB_OK;
            if (!ok)
                snprintf(why, sizeof why, "round %d layer %d: %s", round, l, err.msg);
            eplb_plan_free(&plan);
            apply(map, next, content, l);
        }
    }
    eplb_backend_close(gpu); /* IPC handles closed before the engine frees */
    fwrite(content, sizeof content, 1, out);
    fflush(out);
    char verdict = 0;
    if (ok && (fread(&verdict, 1, 1, in) != 1 || verdict != 'K')) {
        snprintf(why, sizeof why, "the engine found wrong bytes (its stderr says where)");
        ok = false;
    }
    fclose(out);
    fclose(in);
    int status = 0;
    waitpid(pid, &status, 0);
    char name[700];
    snprintf(name, sizeof name, "ipc: engine-owned regions (%d per rank) moved through %s IPC "
             "handles, every slot checked by the engine%s%s", NR, backend, ok ? "" : ": ",
             ok ? "" : why);
    result(ok, name);
}
#endif

/* ---- bandwidth ---------------------------------------------------------- */

/* One derangement of 8 ranks x 9 slots, w13 and w2 each in its own region
 * per rank; pad = 0 (16-byte path) or 4 (sizes 4 bytes past: 4-byte path). */
static void bandwidth_run(uint64_t pad) {
    enum { BG = 8, BS = 9, BP = BG * BS };
    const uint64_t w13 = (28u << 20) + pad, w2 = (14u << 20) + pad;
    const uint64_t s13 = align16(w13), s2 = align16(w2);
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    eplb_region reg[BG][2];
    eplb_rank_buffers ranks[BG];
    eplb_tensor_layout l13[BG], l2[BG];
    memset(reg, 0, sizeof reg);
    for (int g = 0; g < BG; g++) {
        CK(cudaSetDevice(g % ndev));
        void *a, *b;
        CK(cudaMalloc(&a, s13 * BS));
        CK(cudaMalloc(&b, s2 * BS));
        CK(cudaMemset(a, g, s13 * BS));
        CK(cudaMemset(b, g + 100, s2 * BS));
        reg[g][0] = (eplb_region){.device_ptr = (uint64_t)(uintptr_t)a, .device = g % ndev,
                                  .size = s13 * BS};
        reg[g][1] = (eplb_region){.device_ptr = (uint64_t)(uintptr_t)b, .device = g % ndev,
                                  .size = s2 * BS};
        ranks[g] = (eplb_rank_buffers){2, reg[g]};
        l13[g] = (eplb_tensor_layout){0, 0, s13};
        l2[g] = (eplb_tensor_layout){1, 0, s2};
    }
    eplb_tensor_desc td[2] = {{"w13", w13, l13}, {"w2", w2, l2}};
    eplb_layer_desc ld = {2, td};
    eplb_buffers_desc desc = {EPLB_BUFFERS_DEVICE_PTR, 1, BG, 0, 0, ranks, &ld};
    eplb_backend *gpu = NULL;
    eplb_error err;
    char m[800];
    if (eplb_backend_open_by_name(backend, &desc, BP, &gpu, &err) != EPLB_OK) {
        snprintf(m, sizeof m, "bandwidth: open: %s", err.msg);
        result(false, m);
        return;
    }
    int32_t a[BP], b[BP];
    uint64_t st = 9;
    for (int s = 0; s < BP; s++)
        a[s] = b[s] = s;
    for (int s = BP - 1; s > 0; s--) {
        int j = (int)(rng_next(&st) % (uint64_t)s);
        int32_t t = b[s];
        b[s] = b[j];
        b[j] = t;
    }
    eplb_plan plan[2];
    if (eplb_plan_build(BP, BG, 8, a, b, 0, BG, &plan[0], &err) != EPLB_OK ||
        eplb_plan_build(BP, BG, 8, b, a, 0, BG, &plan[1], &err) != EPLB_OK) {
        result(false, "bandwidth: plan");
        return;
    }
    const uint32_t n = plan[0].num_gather + plan[0].num_scatter;
    const double bytes = (double)n * (double)(w13 + w2);
    const int runs = 6;
    double total = 0;
    for (int r = -2; r < runs; r++) { /* 2 warm-up runs allocate staging */
        double t0 = now_s();
        if (eplb_backend_execute_layer(gpu, 0, &plan[(r + 2) & 1], &err) != EPLB_OK) {
            snprintf(m, sizeof m, "bandwidth: execute: %s", err.msg);
            result(false, m);
            return;
        }
        if (r >= 0)
            total += now_s() - t0;
    }
    double gpu_gbs = bytes / (total / runs) / 1e9;
    eplb_backend_close(gpu);
    for (int g = 0; g < BG; g++) {
        CK(cudaSetDevice(g % ndev));
        CK(cudaFree((void *)(uintptr_t)reg[g][0].device_ptr));
        CK(cudaFree((void *)(uintptr_t)reg[g][1].device_ptr));
    }

    /* Baseline on device 0: the same number of the same copies (w13 and w2
     * slices) with cudaMemcpyAsync device-to-device. */
    CK(cudaSetDevice(0));
    const size_t half = (size_t)(s13 + s2) * BS * 2;
    void *x, *y;
    CK(cudaMalloc(&x, half));
    CK(cudaMalloc(&y, half));
    CK(cudaMemset(x, 1, half));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const uint32_t slots = (uint32_t)(half / (s13 + s2));
    double base = 0;
    for (int r = -1; r < runs; r++) {
        double t0 = now_s();
        for (uint32_t i = 0; i < n; i++) {
            size_t k = (i * 37u) % slots, j = (k + 11) % slots;
            CK(cudaMemcpyAsync((char *)y + k * (s13 + s2), (char *)x + j * (s13 + s2), w13,
                               cudaMemcpyDeviceToDevice, s));
            CK(cudaMemcpyAsync((char *)y + k * (s13 + s2) + s13, (char *)x + j * (s13 + s2) + s13,
                               w2, cudaMemcpyDeviceToDevice, s));
        }
        CK(cudaStreamSynchronize(s));
        if (r >= 0)
            base += now_s() - t0;
    }
    double base_gbs = bytes / (base / runs) / 1e9;
    CK(cudaStreamDestroy(s));
    CK(cudaFree(x));
    CK(cudaFree(y));
    printf("bandwidth, %s path (%d device%s, %u x %.0f MiB copies = %.1f GB per run, %d runs):\n",
           pad ? "4-byte" : "16-byte", ndev, ndev == 1 ? "" : "s", n,
           (double)(w13 + w2) / (1 << 20), bytes / 1e9, runs);
    printf("  %s backend gather + scatter   %8.1f GB/s\n", backend, gpu_gbs);
    printf("  cudaMemcpyAsync D2D slices      %8.1f GB/s\n", base_gbs);
    snprintf(m, sizeof m, "bandwidth, %s path: %s backend %.0f%% of cudaMemcpy D2D (>= 80%%)",
             pad ? "4-byte" : "16-byte", backend, 100.0 * gpu_gbs / base_gbs);
    result(gpu_gbs >= 0.8 * base_gbs, m);
    eplb_plan_free(&plan[0]);
    eplb_plan_free(&plan[1]);
}

int main(int argc, char **argv) {
    layout_init();
    const char *b = getenv("EPLB_DEVICE_CHECK_BACKEND");
    if (b && *b)
        backend = b;
    ipc_kind = strcmp(backend, "hip") == 0 ? EPLB_BUFFERS_HIP_IPC : EPLB_BUFFERS_CUDA_IPC;
    if (argc > 1 && strcmp(argv[1], "--ipc-child") == 0)
        return ipc_child();
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev == 0) {
        printf("no CUDA device (%s): nothing checked\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        printf("0 passed, 0 failed, 1 skipped\n");
        return 3;
    }
    char why[512];
    const char *autoname = eplb_backend_auto_name(why, sizeof why);
    printf("auto backend: %s (%s)\n", autoname, why);
    result(strcmp(autoname, backend) == 0, "auto picks the backend under test");
    double t0 = now_s();
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    check_devices_named(); /* first: no context anywhere yet */
#endif
    check_device_ptr();
    check_held();
    check_refusals();
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    check_peer_refused();
    check_sticky();
#endif
    check_events();
    check_staging_once();
    check_ipc("/proc/self/exe");
    printf("correctness: %.1f s\n", now_s() - t0);
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    printf("SKIP bandwidth (host emulation: no GPU to measure)\n");
    (void)bandwidth_run;
#else
    bandwidth_run(0);
    bandwidth_run(4);
#endif
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
