/* device_check.c -- GPU correctness and bandwidth check of the hip backend
 * built for NVIDIA (nvcc -x cu -DEPLB_HIP_ON_CUDA), against the cpu backend.
 *
 * Plain C using the CUDA runtime only to allocate, fill and read back device
 * memory; the backend under test is libeplb_backend_hip.so, loaded by the
 * eplb_gpu loader from $EPLB_HIP_BACKEND.  Run by gpu/tests/device-check.sh.
 *
 * 1. device_ptr: 8 ranks x 4 slots (rank g on device g % devices: with 2+
 *    GPUs this covers peer copies), 2 layers x 3 tensors of odd sizes with
 *    padded strides.  Device buffers and shm buffers start byte-identical
 *    (every slot encodes (layer, tensor, logical expert), padding is a
 *    sentinel); a sequence of old -> new maps (worked examples, random maps
 *    with -1 slots and duplicates, a full derangement) is planned with
 *    eplb_plan_build and executed by both backends; after each, every byte
 *    of every rank must equal the cpu backend's and the expected image.
 * 2. faults: a gather fault leaves device memory byte-identical (and a
 *    scatter after it is refused); a scatter fault is completed by a second
 *    scatter from staging, and a third (repeated) scatter changes nothing.
 * 3. hip_ipc: a child process (this program re-executed) allocates the
 *    buffers and exports IPC handles; the backend opens them
 *    (hipIpcOpenMemHandle), moves weights, closes; the child checks.
 * 4. bandwidth: 8 ranks x 9 slots of 42 MiB experts (w13 28 MiB + w2 14 MiB,
 *    DeepSeek-V3 fp8), a derangement (gather + scatter of every slot);
 *    backend GB/s vs cudaMemcpyAsync device-to-device of the same slices and
 *    of one large block.
 * Ends with "N passed, N failed" (exit 0 only when nothing failed); exits 3
 * with "no CUDA device" when there is none.
 *
 * Built against gpu/tests/host_emul/cuda_runtime_api.h and a backend built
 * with -DEPLB_HIP_ON_HOST (gpu/tests/host-emulation-check.sh), it runs on a
 * machine without a GPU: 1 and 2 as above, 3 in one process (the handles
 * hold pointers), 4 skipped. */
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

/* ---- the correctness shape ---------------------------------------------- */

#define G 8
#define S 4
#define P (G * S)
#define L 2
#define NT 3
#define GPN 4 /* 2 "nodes" of 4 ranks: exercises cross-node accounting */
#define SENTINEL 0xA5

static const uint64_t tbytes[NT] = {3u * 1024 * 1024 + 12345, 1u << 20, 4096 + 8};
static const char *tnames[NT] = {"w13", "w2", "w13_scale"};
static uint64_t toff[L][NT]; /* offset of (layer, tensor) inside a slot row */
static uint64_t row_bytes;   /* stride of every tensor: one slot row */
static size_t rank_bytes;

static void layout_init(void) {
    uint64_t off = 0;
    for (int l = 0; l < L; l++)
        for (int t = 0; t < NT; t++) {
            off += 48; /* padding, sentinel-checked */
            /* Slices are 16-aligned, except layer 1's last tensor: 3 bytes
             * off, so the kernel's unaligned head (slot -> slot) and
             * byte-wise (slot <-> aligned staging) paths run too. */
            if (l == 1 && t == NT - 1)
                off += 3;
            toff[l][t] = off;
            off += tbytes[t];
            off = (off + 15) & ~(uint64_t)15;
        }
    row_bytes = off + 32;
    rank_bytes = (size_t)(row_bytes * S + 64);
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
        *c = malloc(tbytes[t]);
        if (!*c) {
            perror("malloc");
            exit(2);
        }
        for (uint64_t i = 0; i < tbytes[t]; i++)
            (*c)[i] = pattern((uint32_t)l, (uint32_t)t, e, i);
    }
    return *c;
}

/* Rank g's bytes for content rows [L][P] (expert whose bytes each slot has). */
static void build_image(uint8_t *img, uint32_t g, int32_t content[L][P]) {
    memset(img, SENTINEL, rank_bytes);
    for (int l = 0; l < L; l++)
        for (int t = 0; t < NT; t++)
            for (int s = 0; s < S; s++)
                memcpy(img + toff[l][t] + (uint64_t)s * row_bytes,
                       slice(l, t, content[l][g * S + s]), tbytes[t]);
}

/* Some expert the map holds (for maps that need a source). */
static int32_t held(const int32_t *map, int from_end) {
    for (int i = 0; i < P; i++) {
        int32_t v = map[from_end ? P - 1 - i : i];
        if (v >= 0)
            return v;
    }
    return 0;
}

typedef struct world {
    eplb_tensor_layout place[L][NT][G];
    eplb_tensor_desc tensors[L][NT];
    eplb_layer_desc layers[L];
    eplb_rank_location dev_ranks[G], shm_ranks[G];
    eplb_buffers_desc dev_desc, shm_desc;
    void *dptr[G];
    char shm_names[G][64];
    uint8_t *shm_map[G];
    int ndev;
} world;

static void world_desc(world *w) {
    for (int l = 0; l < L; l++) {
        for (int t = 0; t < NT; t++) {
            eplb_tensor_desc *td = &w->tensors[l][t];
            snprintf(td->name, sizeof td->name, "%s", tnames[t]);
            td->bytes_per_expert = tbytes[t];
            for (int g = 0; g < G; g++) {
                w->place[l][t][g].offset = toff[l][t];
                w->place[l][t][g].stride = row_bytes;
            }
            td->ranks = w->place[l][t];
        }
        w->layers[l].num_tensors = NT;
        w->layers[l].tensors = w->tensors[l];
    }
}

static void world_init(world *w, int32_t content[L][P]) {
    memset(w, 0, sizeof *w);
    CK(cudaGetDeviceCount(&w->ndev));
    world_desc(w);
    uint8_t *img = malloc(rank_bytes);
    for (int g = 0; g < G; g++) {
        build_image(img, (uint32_t)g, content);
        int dev = g % w->ndev;
        CK(cudaSetDevice(dev));
        CK(cudaMalloc(&w->dptr[g], rank_bytes));
        CK(cudaMemcpy(w->dptr[g], img, rank_bytes, cudaMemcpyHostToDevice));
        w->dev_ranks[g].device = dev;
        w->dev_ranks[g].device_ptr = (uint64_t)(uintptr_t)w->dptr[g];
        w->dev_ranks[g].size = rank_bytes;

        snprintf(w->shm_names[g], sizeof w->shm_names[g], "/eplb-devcheck-%d-%d", (int)getpid(),
                 g);
        shm_unlink(w->shm_names[g]);
        int fd = shm_open(w->shm_names[g], O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)rank_bytes) != 0) {
            perror("shm");
            exit(2);
        }
        w->shm_map[g] = mmap(NULL, rank_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (w->shm_map[g] == MAP_FAILED) {
            perror("mmap");
            exit(2);
        }
        memcpy(w->shm_map[g], img, rank_bytes);
        snprintf(w->shm_ranks[g].shm_name, sizeof w->shm_ranks[g].shm_name, "%s",
                 w->shm_names[g]);
    }
    free(img);
    w->dev_desc = (eplb_buffers_desc){EPLB_BUFFERS_DEVICE_PTR, L, G, w->dev_ranks, w->layers};
    w->shm_desc = (eplb_buffers_desc){EPLB_BUFFERS_SHM, L, G, w->shm_ranks, w->layers};
}

static void world_fini(world *w) {
    for (int g = 0; g < G; g++) {
        CK(cudaSetDevice(g % w->ndev));
        CK(cudaFree(w->dptr[g]));
        munmap(w->shm_map[g], rank_bytes);
        shm_unlink(w->shm_names[g]);
    }
}

/* Device bytes == shm bytes == expected image, for every rank. */
static bool world_matches(world *w, int32_t content[L][P], char *why, size_t n) {
    uint8_t *dev = malloc(rank_bytes), *want = malloc(rank_bytes);
    bool ok = true;
    for (int g = 0; g < G && ok; g++) {
        CK(cudaSetDevice(g % w->ndev));
        CK(cudaMemcpy(dev, w->dptr[g], rank_bytes, cudaMemcpyDeviceToHost));
        build_image(want, (uint32_t)g, content);
        if (memcmp(w->shm_map[g], want, rank_bytes) != 0) {
            snprintf(why, n, "cpu backend result wrong on rank %d", g);
            ok = false;
        } else if (memcmp(dev, want, rank_bytes) != 0) {
            size_t i = 0;
            while (dev[i] == want[i])
                i++;
            snprintf(why, n, "hip backend differs from cpu on rank %d at byte %zu (slot %zu)", g,
                     i, (size_t)(i / row_bytes));
            ok = false;
        }
    }
    free(dev);
    free(want);
    return ok;
}

/* A new phy2log from the current one: kept slots, -1 slots, experts drawn
 * from those currently held (so every one has a source). */
static void next_map(uint64_t *st, const int32_t *cur, int32_t *next, int mode) {
    for (int s = 0; s < P; s++) {
        uint32_t r = (uint32_t)(rng_next(st) % 10);
        if (mode == 1 && r < 3) {
            next[s] = cur[s];
        } else if (mode == 1 && r == 9) {
            next[s] = -1;
        } else {
            int32_t v;
            do
                v = cur[rng_next(st) % P];
            while (v < 0);
            next[s] = v;
        }
    }
}

static bool run_both(world *w, eplb_backend *hip, eplb_backend *cpu, int32_t map[L][P],
                     int32_t next[L][P], int32_t content[L][P], char *why, size_t n) {
    for (int l = 0; l < L; l++) {
        eplb_plan plan;
        eplb_error err;
        if (eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) != EPLB_OK) {
            snprintf(why, n, "plan: %s", err.msg);
            return false;
        }
        eplb_status a = eplb_backend_gather(hip, (uint32_t)l, &plan, &err);
        if (a == EPLB_OK)
            a = eplb_backend_scatter(hip, (uint32_t)l, &plan, &err);
        if (a != EPLB_OK) {
            snprintf(why, n, "hip gather/scatter layer %d: %s", l, err.msg);
            eplb_plan_free(&plan);
            return false;
        }
        a = eplb_backend_execute_layer(cpu, (uint32_t)l, &plan, &err);
        eplb_plan_free(&plan);
        if (a != EPLB_OK) {
            snprintf(why, n, "cpu execute layer %d: %s", l, err.msg);
            return false;
        }
        for (int s = 0; s < P; s++) {
            if (next[l][s] != -1)
                content[l][s] = next[l][s];
            map[l][s] = next[l][s];
        }
    }
    eplb_error err;
    if (eplb_backend_synchronize(hip, &err) != EPLB_OK ||
        eplb_backend_synchronize(cpu, &err) != EPLB_OK) {
        snprintf(why, n, "synchronize: %s", err.msg);
        return false;
    }
    return world_matches(w, content, why, n);
}

static void check_device_ptr(void) {
    static int32_t map[L][P], content[L][P], next[L][P];
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            map[l][s] = content[l][s] = s < 24 ? s : s % 24; /* 24 logical + 8 redundant */
    world w;
    world_init(&w, content);
    eplb_backend *hip = NULL, *cpu = NULL;
    eplb_error err;
    char why[600] = "";
    if (eplb_backend_open_by_name("hip", &w.dev_desc, P, &hip, &err) != EPLB_OK) {
        snprintf(why, sizeof why, "open hip: %s", err.msg);
        result(false, why);
        return;
    }
    if (eplb_backend_open_by_name("cpu", &w.shm_desc, P, &cpu, &err) != EPLB_OK) {
        snprintf(why, sizeof why, "open cpu: %s", err.msg);
        result(false, why);
        return;
    }
    char buf[128];
    snprintf(buf, sizeof buf, "device_ptr: backends open (%d device%s)", w.ndev,
             w.ndev == 1 ? "" : "s");
    result(true, buf);
    result(world_matches(&w, content, why, sizeof why), "device_ptr: initial images equal");

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
                int32_t e = held(map[l], 1);
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
                    next[l][s] = map[l][perm[s]] >= 0 ? map[l][perm[s]] : held(map[l], 0);
            } else {
                next_map(&st, map[l], next[l], 1);
            }
        }
        what = round == 0 ? "swap in every GPU" : round == 1 ? "rotate GPUs" :
               round == 2 ? "duplicate destinations" : round == 11 ? "derangement" : "random map";
        bool ok = run_both(&w, hip, cpu, map, next, content, why, sizeof why);
        char name[700];
        snprintf(name, sizeof name, "device_ptr: round %d (%s)%s%s", round, what, ok ? "" : ": ",
                 ok ? "" : why);
        result(ok, name);
    }

    /* Faults: gather fault changes nothing; scatter fault + retry completes. */
    for (int l = 0; l < L; l++)
        next_map(&st, map[l], next[l], 0);
    eplb_plan plan;
    if (eplb_plan_build(P, G, GPN, map[0], next[0], 0, G, &plan, &err) != EPLB_OK) {
        result(false, "faults: plan");
        return;
    }
    uint8_t *snap = malloc(rank_bytes * G), *now = malloc(rank_bytes * G);
    for (int g = 0; g < G; g++) {
        CK(cudaSetDevice(g % w.ndev));
        CK(cudaMemcpy(snap + rank_bytes * g, w.dptr[g], rank_bytes, cudaMemcpyDeviceToHost));
    }
    eplb_backend_set_fault(EPLB_FAULT_GATHER, 2);
    eplb_status fs = eplb_backend_gather(hip, 0, &plan, &err);
    eplb_status ps = eplb_backend_scatter(hip, 0, &plan, &err); /* no gather: refused */
    for (int g = 0; g < G; g++) {
        CK(cudaSetDevice(g % w.ndev));
        CK(cudaMemcpy(now + rank_bytes * g, w.dptr[g], rank_bytes, cudaMemcpyDeviceToHost));
    }
    result(fs == EPLB_EINTERNAL && ps == EPLB_EPRECONDITION &&
               memcmp(snap, now, rank_bytes * G) == 0,
           "faults: gather fault -> EINTERNAL, scatter refused, device memory unchanged");
    eplb_backend_set_fault(EPLB_FAULT_SCATTER, plan.num_scatter > 2 ? 3 : 1);
    eplb_status gs = eplb_backend_gather(hip, 0, &plan, &err);
    fs = eplb_backend_scatter(hip, 0, &plan, &err);
    eplb_status rs = eplb_backend_scatter(hip, 0, &plan, &err);
    eplb_status again = eplb_backend_scatter(hip, 0, &plan, &err); /* harmless */
    eplb_status cs = eplb_backend_execute_layer(cpu, 0, &plan, &err);
    for (int s = 0; s < P; s++) {
        if (next[0][s] != -1)
            content[0][s] = next[0][s];
        map[0][s] = next[0][s];
    }
    bool ok = gs == EPLB_OK && fs == EPLB_EDATALOSS && rs == EPLB_OK && again == EPLB_OK &&
              cs == EPLB_OK && world_matches(&w, content, why, sizeof why);
    result(ok, "faults: scatter fault -> EDATALOSS, a second scatter from staging completes, a "
               "third changes nothing");
    eplb_backend_set_fault(EPLB_FAULT_NONE, 0);
    eplb_plan_free(&plan);
    free(snap);
    free(now);
    eplb_backend_close(hip);
    eplb_backend_close(cpu);
    world_fini(&w);
}

/* ---- hip_ipc through a child process ------------------------------------ */

/* The child: allocate, fill with content rows from stdin, export handles on
 * stdout, then read the final content rows and check. */
static int ipc_child(void) {
    static int32_t content[L][P];
    if (fread(content, sizeof content, 1, stdin) != 1)
        return 2;
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    void *dptr[G];
    uint8_t *img = malloc(rank_bytes);
    for (int g = 0; g < G; g++) {
        build_image(img, (uint32_t)g, content);
        CK(cudaSetDevice(g % ndev));
        CK(cudaMalloc(&dptr[g], rank_bytes));
        CK(cudaMemcpy(dptr[g], img, rank_bytes, cudaMemcpyHostToDevice));
        cudaIpcMemHandle_t h;
        CK(cudaIpcGetMemHandle(&h, dptr[g]));
        int32_t dev = g % ndev;
        uint64_t size = rank_bytes;
        fwrite(&h, sizeof h, 1, stdout);
        fwrite(&dev, sizeof dev, 1, stdout);
        fwrite(&size, sizeof size, 1, stdout);
    }
    fflush(stdout);
    if (fread(content, sizeof content, 1, stdin) != 1)
        return 2;
    int bad = 0;
    for (int g = 0; g < G; g++) {
        uint8_t *dev = malloc(rank_bytes);
        CK(cudaSetDevice(g % ndev));
        CK(cudaMemcpy(dev, dptr[g], rank_bytes, cudaMemcpyDeviceToHost));
        build_image(img, (uint32_t)g, content);
        if (memcmp(dev, img, rank_bytes) != 0) {
            fprintf(stderr, "ipc child: rank %d bytes differ\n", g);
            bad = 1;
        }
        free(dev);
        CK(cudaFree(dptr[g]));
    }
    free(img);
    char verdict = bad ? 'F' : 'K';
    fwrite(&verdict, 1, 1, stdout);
    fflush(stdout);
    return bad;
}

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
    memset(&w, 0, sizeof w);
    world_desc(&w);
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    void *dptr[G];
    uint8_t *img = malloc(rank_bytes);
    for (int g = 0; g < G; g++) {
        build_image(img, (uint32_t)g, content);
        CK(cudaMalloc(&dptr[g], rank_bytes));
        CK(cudaMemcpy(dptr[g], img, rank_bytes, cudaMemcpyHostToDevice));
        cudaIpcMemHandle_t h;
        CK(cudaIpcGetMemHandle(&h, dptr[g]));
        memcpy(w.dev_ranks[g].ipc_handle, &h, EPLB_IPC_HANDLE_SIZE);
        w.dev_ranks[g].device = g % ndev;
        w.dev_ranks[g].size = rank_bytes;
    }
    w.dev_desc = (eplb_buffers_desc){EPLB_BUFFERS_HIP_IPC, L, G, w.dev_ranks, w.layers};
    eplb_backend *hip = NULL;
    eplb_error err;
    char why[600] = "";
    bool ok = eplb_backend_open_by_name("hip", &w.dev_desc, P, &hip, &err) == EPLB_OK;
    if (!ok)
        snprintf(why, sizeof why, "open: %s", err.msg);
    uint64_t st = 77;
    for (int round = 0; ok && round < 4; round++)
        for (int l = 0; l < L && ok; l++) {
            next_map(&st, map[l], next[l], 1);
            eplb_plan plan;
            ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
                 eplb_backend_execute_layer(hip, (uint32_t)l, &plan, &err) == EPLB_OK;
            if (!ok)
                snprintf(why, sizeof why, "round %d layer %d: %s", round, l, err.msg);
            eplb_plan_free(&plan);
            for (int s = 0; s < P; s++) {
                if (next[l][s] != -1)
                    content[l][s] = next[l][s];
                map[l][s] = next[l][s];
            }
        }
    eplb_backend_close(hip);
    for (int g = 0; g < G; g++) {
        build_image(img, (uint32_t)g, content);
        if (ok && memcmp(dptr[g], img, rank_bytes) != 0) {
            snprintf(why, sizeof why, "rank %d bytes differ", g);
            ok = false;
        }
        CK(cudaFree(dptr[g]));
    }
    free(img);
    char name[700];
    snprintf(name, sizeof name, "hip_ipc (in-process, host emulation)%s%s", ok ? "" : ": ",
             ok ? "" : why);
    result(ok, name);
}
#else
static void check_ipc(const char *self) {
    static int32_t map[L][P], content[L][P], next[L][P];
    for (int l = 0; l < L; l++)
        for (int s = 0; s < P; s++)
            map[l][s] = content[l][s] = (s * 7 + l) % 28;
    int to_child[2], from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0) {
        result(false, "hip_ipc: pipe");
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
    world_desc(&w);
    bool ok = true;
    for (int g = 0; g < G && ok; g++) {
        ok = fread(w.dev_ranks[g].ipc_handle, EPLB_IPC_HANDLE_SIZE, 1, in) == 1 &&
             fread(&w.dev_ranks[g].device, sizeof(int32_t), 1, in) == 1 &&
             fread(&w.dev_ranks[g].size, sizeof(uint64_t), 1, in) == 1;
    }
    char why[600] = "child gave no handles";
    eplb_backend *hip = NULL;
    eplb_error err;
    if (ok) {
        w.dev_desc = (eplb_buffers_desc){EPLB_BUFFERS_HIP_IPC, L, G, w.dev_ranks, w.layers};
        if (eplb_backend_open_by_name("hip", &w.dev_desc, P, &hip, &err) != EPLB_OK) {
            snprintf(why, sizeof why, "open: %s", err.msg);
            ok = false;
        }
    }
    uint64_t st = 77;
    for (int round = 0; ok && round < 4; round++) {
        for (int l = 0; l < L && ok; l++) {
            next_map(&st, map[l], next[l], 1);
            eplb_plan plan;
            ok = eplb_plan_build(P, G, GPN, map[l], next[l], 0, G, &plan, &err) == EPLB_OK &&
                 eplb_backend_execute_layer(hip, (uint32_t)l, &plan, &err) == EPLB_OK;
            if (!ok)
                snprintf(why, sizeof why, "round %d layer %d: %s", round, l, err.msg);
            eplb_plan_free(&plan);
            for (int s = 0; s < P; s++) {
                if (next[l][s] != -1)
                    content[l][s] = next[l][s];
                map[l][s] = next[l][s];
            }
        }
    }
    eplb_backend_close(hip); /* hipIpcCloseMemHandle before the child frees */
    fwrite(content, sizeof content, 1, out);
    fflush(out);
    char verdict = 0;
    if (ok && (fread(&verdict, 1, 1, in) != 1 || verdict != 'K')) {
        snprintf(why, sizeof why, "child found wrong bytes");
        ok = false;
    }
    fclose(out);
    fclose(in);
    int status = 0;
    waitpid(pid, &status, 0);
    char name[700];
    snprintf(name, sizeof name, "hip_ipc: child-owned buffers moved through IPC handles%s%s",
             ok ? "" : ": ", ok ? "" : why);
    result(ok, name);
}

#endif

/* ---- bandwidth ---------------------------------------------------------- */

static void check_bandwidth(void) {
    enum { BG = 8, BS = 9, BP = BG * BS };
    const uint64_t w13 = 28u << 20, w2 = 14u << 20, stride = w13 + w2;
    const size_t rbytes = (size_t)(stride * BS);
    int ndev = 0;
    CK(cudaGetDeviceCount(&ndev));
    eplb_rank_location ranks[BG];
    eplb_tensor_layout l13[BG], l2[BG];
    void *d[BG];
    memset(ranks, 0, sizeof ranks);
    for (int g = 0; g < BG; g++) {
        CK(cudaSetDevice(g % ndev));
        CK(cudaMalloc(&d[g], rbytes));
        CK(cudaMemset(d[g], g, rbytes));
        ranks[g].device = g % ndev;
        ranks[g].device_ptr = (uint64_t)(uintptr_t)d[g];
        ranks[g].size = rbytes;
        l13[g] = (eplb_tensor_layout){0, stride};
        l2[g] = (eplb_tensor_layout){w13, stride};
    }
    eplb_tensor_desc td[2] = {{"w13", w13, l13}, {"w2", w2, l2}};
    eplb_layer_desc ld = {2, td};
    eplb_buffers_desc desc = {EPLB_BUFFERS_DEVICE_PTR, 1, BG, ranks, &ld};
    eplb_backend *hip = NULL;
    eplb_error err;
    if (eplb_backend_open_by_name("hip", &desc, BP, &hip, &err) != EPLB_OK) {
        result(false, "bandwidth: open");
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
    double bytes = (double)(plan[0].num_gather + plan[0].num_scatter) * (double)stride;
    const int runs = 8;
    double best = 1e30, total = 0;
    for (int r = -2; r < runs; r++) { /* 2 warm-up runs allocate staging */
        double t0 = now_s();
        if (eplb_backend_execute_layer(hip, 0, &plan[(r + 2) & 1], &err) != EPLB_OK) {
            char m[700];
            snprintf(m, sizeof m, "bandwidth: execute: %s", err.msg);
            result(false, m);
            return;
        }
        double t = now_s() - t0;
        if (r >= 0) {
            best = t < best ? t : best;
            total += t;
        }
    }
    double hip_gbs = bytes / (total / runs) / 1e9, hip_best = bytes / best / 1e9;
    eplb_backend_close(hip);

    /* Baselines on device 0: the same number of 42 MiB slices with
     * cudaMemcpyAsync D2D between two buffers, and one large block. */
    CK(cudaSetDevice(0));
    size_t half = (size_t)stride * BP;
    void *x, *y;
    CK(cudaMalloc(&x, half));
    CK(cudaMalloc(&y, half));
    CK(cudaMemset(x, 1, half));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    uint32_t n = plan[0].num_gather + plan[0].num_scatter;
    double t_slices = 1e30, t_block = 1e30, sum_slices = 0, sum_block = 0;
    for (int r = -1; r < runs; r++) {
        double t0 = now_s();
        for (uint32_t i = 0; i < n; i++) {
            size_t k = (i * 37u) % BP;
            CK(cudaMemcpyAsync((char *)y + k * stride, (char *)x + ((k + 11) % BP) * stride,
                               stride, cudaMemcpyDeviceToDevice, s));
        }
        CK(cudaStreamSynchronize(s));
        double t1 = now_s();
        for (double done = 0; done < bytes; done += (double)half)
            CK(cudaMemcpyAsync(y, x, bytes - done < (double)half ? (size_t)(bytes - done) : half,
                               cudaMemcpyDeviceToDevice, s));
        CK(cudaStreamSynchronize(s));
        double t2 = now_s();
        if (r >= 0) {
            t_slices = t1 - t0 < t_slices ? t1 - t0 : t_slices;
            t_block = t2 - t1 < t_block ? t2 - t1 : t_block;
            sum_slices += t1 - t0;
            sum_block += t2 - t1;
        }
    }
    double sl_gbs = bytes / (sum_slices / runs) / 1e9, bl_gbs = bytes / (sum_block / runs) / 1e9;
    printf("bandwidth (%d device%s, %u x 42 MiB copies = %.1f GB per run, %d runs):\n", ndev,
           ndev == 1 ? "" : "s", n, bytes / 1e9, runs);
    printf("  hip backend gather + scatter    %8.1f GB/s mean  %8.1f GB/s best\n", hip_gbs,
           hip_best);
    printf("  cudaMemcpyAsync 42 MiB slices   %8.1f GB/s mean  %8.1f GB/s best\n", sl_gbs,
           bytes / t_slices / 1e9);
    printf("  cudaMemcpyAsync %5.1f GB blocks  %8.1f GB/s mean  %8.1f GB/s best\n",
           (double)half / 1e9, bl_gbs, bytes / t_block / 1e9);
    printf("  hip backend / memcpy slices: %.0f%%; / memcpy blocks: %.0f%%\n",
           100.0 * hip_gbs / sl_gbs, 100.0 * hip_gbs / bl_gbs);
    result(hip_gbs > 0.5 * sl_gbs, "bandwidth: hip backend >= 50% of cudaMemcpy D2D slices");
    CK(cudaStreamDestroy(s));
    CK(cudaFree(x));
    CK(cudaFree(y));
    for (int g = 0; g < BG; g++) {
        CK(cudaSetDevice(g % ndev));
        CK(cudaFree(d[g]));
    }
    eplb_plan_free(&plan[0]);
    eplb_plan_free(&plan[1]);
}

int main(int argc, char **argv) {
    layout_init();
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
    printf("auto backend: %s (%s)\n", eplb_backend_auto_name(why, sizeof why), why);
    check_device_ptr();
    check_ipc("/proc/self/exe");
#ifdef EPLB_DEVICE_CHECK_ON_HOST
    printf("SKIP bandwidth (host emulation: no GPU to measure)\n");
    (void)check_bandwidth;
#else
    check_bandwidth();
#endif
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
