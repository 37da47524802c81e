/* test_cpu_backend.c -- the cpu backend, buffer validation and the loader
 * (gpu/eplb_backend.c, gpu/eplb_buffers.c, gpu/cpu/eplb_backend_cpu.c).
 *
 * Fixture: one POSIX shm object per EP rank holding, for every layer, three
 * tensors of odd sizes with padded strides, laid out interleaved; every
 * slot's bytes encode (layer, tensor, logical expert) and every byte outside
 * a slot is a sentinel.  Plans from eplb_plan_build run through the backend;
 * afterwards every slot must hold its new expert's bytes, every -1 or
 * unchanged slot its old bytes, and every sentinel must be intact.  Fault
 * injection: a failure at any gather op leaves the buffers byte-identical;
 * a failure at any scatter op is completed by a second scatter from
 * staging.  Phases: a scatter only follows a gather of its layer.
 * Shrinking buffers: an shm object truncated before a move (check), or
 * during one (a fault hook truncates between two copies; another thread
 * truncates during a long copy), makes the move fail with EPLB_EDATALOSS
 * naming the rank -- the process survives the SIGBUS; a SIGBUS outside a
 * copy still kills it.  Identity: two ranks on one object (a hard link)
 * are refused at open; an object unlinked (and recreated) after open is
 * EPLB_EDATALOSS at check.  Trust: prefix, owner, symlink, FIFO. */
#include <criterion/criterion.h>

#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eplb_backend.h"
#include "eplb_plan.h"

#define MAX_RANKS 8
#define MAX_LAYERS 4
#define NT 3

/* w13, w2, w13_scale; a test may change them before fixture_init (each
 * Criterion test runs in its own process). */
static uint64_t tensor_bytes[NT] = {1000, 517, 24};
static const char *tensor_names[NT] = {"w13", "w2", "w13_scale"};

typedef struct fixture {
    uint32_t L, P, G, S;
    char names[MAX_RANKS][64];
    uint8_t *map[MAX_RANKS]; /* our own view of each shm object */
    size_t size;             /* bytes per rank */
    eplb_region ranks[MAX_RANKS];        /* one region per rank (the regions test adds more) */
    eplb_rank_buffers rbuf[MAX_RANKS];
    eplb_tensor_layout place[MAX_LAYERS][NT][MAX_RANKS];
    eplb_tensor_desc tensors[MAX_LAYERS][NT];
    eplb_layer_desc layers[MAX_LAYERS];
    eplb_buffers_desc desc;
} fixture;

static uint8_t pattern(uint32_t l, uint32_t t, int32_t e, uint64_t i) {
    uint64_t z = ((uint64_t)l << 48) ^ ((uint64_t)t << 40) ^ ((uint64_t)(uint32_t)e << 8) ^
                 (i * 0x9E3779B97F4A7C15ull);
    z ^= z >> 29;
    z *= 0xBF58476D1CE4E5B9ull;
    return (uint8_t)(z >> 32);
}

#define SENTINEL 0xA5

/* Layout: slots of all tensors of all layers interleaved per slot index:
 * for slot s: [l0 w13][pad][l0 w2][pad][l0 scale][pad][l1 w13]...; so the
 * stride of every tensor is the size of one such row. */
static void fixture_init(fixture *f, uint32_t L, uint32_t P, uint32_t G) {
    memset(f, 0, sizeof *f);
    f->L = L;
    f->P = P;
    f->G = G;
    f->S = P / G;
    uint64_t row = 0, off[MAX_LAYERS][NT];
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t t = 0; t < NT; t++) {
            off[l][t] = row + 8;
            row += 8 + tensor_bytes[t] + 5;
        }
    f->size = (size_t)(row * f->S + 64);
    for (uint32_t g = 0; g < G; g++) {
        snprintf(f->names[g], sizeof f->names[g], "/eplb-test-%d-%u", (int)getpid(), g);
        shm_unlink(f->names[g]);
        int fd = shm_open(f->names[g], O_RDWR | O_CREAT | O_EXCL, 0600);
        cr_assert(fd >= 0, "shm_open %s", f->names[g]);
        cr_assert_eq(ftruncate(fd, (off_t)f->size), 0);
        f->map[g] = mmap(NULL, f->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        cr_assert(f->map[g] != MAP_FAILED);
        close(fd);
        memset(f->map[g], SENTINEL, f->size);
        snprintf(f->ranks[g].shm_name, sizeof f->ranks[g].shm_name, "%s", f->names[g]);
        f->rbuf[g].num_regions = 1;
        f->rbuf[g].regions = &f->ranks[g];
    }
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t t = 0; t < NT; t++) {
            eplb_tensor_desc *td = &f->tensors[l][t];
            snprintf(td->name, sizeof td->name, "%s", tensor_names[t]);
            td->bytes_per_expert = tensor_bytes[t];
            for (uint32_t g = 0; g < G; g++) {
                f->place[l][t][g].offset = off[l][t];
                f->place[l][t][g].stride = row;
            }
            td->ranks = f->place[l][t];
        }
        f->layers[l].num_tensors = NT;
        f->layers[l].tensors = f->tensors[l];
    }
    f->desc.kind = EPLB_BUFFERS_SHM;
    f->desc.num_layers = L;
    f->desc.num_ranks = G;
    f->desc.ranks = f->rbuf;
    f->desc.layers = f->layers;
}

static uint8_t *slot_ptr(fixture *f, uint32_t l, uint32_t t, uint32_t s) {
    uint32_t g = s / f->S;
    const eplb_tensor_layout *pl = &f->place[l][t][g];
    return f->map[g] + pl->offset + (uint64_t)(s % f->S) * pl->stride;
}

static void fill_layer(fixture *f, uint32_t l, const int32_t *row) {
    for (uint32_t s = 0; s < f->P; s++)
        for (uint32_t t = 0; t < NT; t++) {
            uint8_t *p = slot_ptr(f, l, t, s);
            for (uint64_t i = 0; i < tensor_bytes[t]; i++)
                p[i] = pattern(l, t, row[s], i);
        }
}

/* Every slot of layer l holds want[s]'s bytes. */
static void check_layer(fixture *f, uint32_t l, const int32_t *want) {
    for (uint32_t s = 0; s < f->P; s++)
        for (uint32_t t = 0; t < NT; t++) {
            const uint8_t *p = slot_ptr(f, l, t, s);
            for (uint64_t i = 0; i < tensor_bytes[t]; i++)
                cr_assert_eq(p[i], pattern(l, t, want[s], i),
                             "layer %u tensor %s slot %u byte %llu: not expert %d's", l,
                             tensor_names[t], s, (unsigned long long)i, want[s]);
        }
}

/* Bytes outside every slot still hold the sentinel. */
static void check_sentinels(fixture *f) {
    uint8_t *mask = calloc(f->size, 1);
    for (uint32_t g = 0; g < f->G; g++) {
        memset(mask, 0, f->size);
        for (uint32_t l = 0; l < f->L; l++)
            for (uint32_t t = 0; t < NT; t++)
                for (uint32_t s = g * f->S; s < (g + 1) * f->S; s++)
                    memset(mask + (slot_ptr(f, l, t, s) - f->map[g]), 1, tensor_bytes[t]);
        for (size_t i = 0; i < f->size; i++)
            if (!mask[i])
                cr_assert_eq(f->map[g][i], SENTINEL, "rank %u byte %zu outside slots written", g,
                             i);
    }
    free(mask);
}

static void fixture_fini(fixture *f) {
    for (uint32_t g = 0; g < f->G; g++) {
        munmap(f->map[g], f->size);
        shm_unlink(f->names[g]);
    }
}

/* A snapshot of every rank's bytes. */
static uint8_t *snapshot(fixture *f) {
    uint8_t *s = malloc(f->size * f->G);
    for (uint32_t g = 0; g < f->G; g++)
        memcpy(s + f->size * g, f->map[g], f->size);
    return s;
}

static bool same_as(fixture *f, const uint8_t *snap) {
    for (uint32_t g = 0; g < f->G; g++)
        if (memcmp(snap + f->size * g, f->map[g], f->size) != 0)
            return false;
    return true;
}

static eplb_backend *open_cpu(fixture *f) {
    eplb_backend *b = NULL;
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_backend_open_by_name("cpu", &f->desc, f->P, &b, &err);
    cr_assert_eq(st, EPLB_OK, "open: %s", err.msg);
    cr_assert_str_eq(eplb_backend_name(b), "cpu");
    return b;
}

/* Phase 1 then phase 2 of one layer, both expected to succeed. */
static void move_ok(eplb_backend *b, uint32_t layer, const eplb_plan *p) {
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_backend_gather(b, layer, p, &err), EPLB_OK, "gather %u: %s", layer, err.msg);
    cr_assert_eq(eplb_backend_scatter(b, layer, p, &err), EPLB_OK, "scatter %u: %s", layer,
                 err.msg);
}

static void plan_ok(fixture *f, const int32_t *old_row, const int32_t *new_row, uint32_t gpn,
                    eplb_plan *p) {
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_plan_build(f->P, f->G, gpn, old_row, new_row, 0, f->G, p, &err), EPLB_OK,
                 "%s", err.msg);
}

static uint64_t rng_next(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void random_rows(uint64_t *st, uint32_t P, uint32_t N, int32_t *old_row,
                        int32_t *new_row) {
    for (uint32_t s = 0; s < P; s++)
        old_row[s] = rng_next(st) % 9 == 0 ? -1 : (int32_t)(rng_next(st) % N);
    if (old_row[0] < 0)
        old_row[0] = 0;
    for (uint32_t s = 0; s < P; s++) {
        uint32_t r = (uint32_t)(rng_next(st) % 10);
        if (r < 3)
            new_row[s] = old_row[s];
        else if (r == 9)
            new_row[s] = -1;
        else {
            int32_t v;
            do
                v = old_row[rng_next(st) % P];
            while (v < 0);
            new_row[s] = v;
        }
    }
}

/* The row each slot ends with: new, or old where new is -1. */
static void expected_row(uint32_t P, const int32_t *old_row, const int32_t *new_row,
                         int32_t *out) {
    for (uint32_t s = 0; s < P; s++)
        out[s] = new_row[s] == -1 ? old_row[s] : new_row[s];
}

/* ---------------------------------------------------------------------------
 * Moving the weights
 * ------------------------------------------------------------------------- */

Test(cpu_backend, worked_examples) {
    fixture f;
    fixture_init(&f, 2, 6, 2);
    const int32_t old0[] = {0, 1, 2, 3, 0, 1}, new0[] = {0, 2, 0, 1, 0, 3};
    const int32_t old1[] = {5, 4, 3, 2, 1, 0}, new1[] = {5, 4, 3, 2, 1, 0}; /* unchanged */
    fill_layer(&f, 0, old0);
    fill_layer(&f, 1, old1);
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old0, new0, 2, &p);
    eplb_error err;
    move_ok(b, 0, &p);
    eplb_plan_free(&p);
    plan_ok(&f, old1, new1, 2, &p);
    move_ok(b, 1, &p);
    eplb_plan_free(&p);
    cr_assert_eq(eplb_backend_synchronize(b, &err), EPLB_OK);
    check_layer(&f, 0, new0);
    check_layer(&f, 1, new1);
    check_sentinels(&f);
    eplb_backend_close(b);
    fixture_fini(&f);

    /* 2 slots per GPU, 2 GPUs: old [0,1,2,3] -> new [2,0,1,3]. */
    fixture_init(&f, 1, 4, 2);
    const int32_t old2[] = {0, 1, 2, 3}, new2[] = {2, 0, 1, 3};
    fill_layer(&f, 0, old2);
    b = open_cpu(&f);
    plan_ok(&f, old2, new2, 2, &p);
    move_ok(b, 0, &p);
    check_layer(&f, 0, new2);
    /* Scattering again (the caller's retry after a failure it could not
     * attribute) writes the same bytes from the same staging: the exchange
     * is not undone. */
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    check_layer(&f, 0, new2);
    eplb_plan_free(&p);
    check_sentinels(&f);
    eplb_backend_close(b);
    fixture_fini(&f);
}

Test(cpu_backend, random_plans_all_layers) {
    uint64_t st = 5;
    for (int iter = 0; iter < 40; iter++) {
        uint32_t G = 1 + (uint32_t)(rng_next(&st) % MAX_RANKS);
        uint32_t S = 1 + (uint32_t)(rng_next(&st) % 5);
        uint32_t L = 1 + (uint32_t)(rng_next(&st) % MAX_LAYERS);
        uint32_t P = G * S, N = 1 + (uint32_t)(rng_next(&st) % P);
        uint32_t gpn = 1 + (uint32_t)(rng_next(&st) % G);
        fixture f;
        fixture_init(&f, L, P, G);
        int32_t old_rows[MAX_LAYERS][40], new_rows[MAX_LAYERS][40], want[40];
        for (uint32_t l = 0; l < L; l++) {
            random_rows(&st, P, N, old_rows[l], new_rows[l]);
            fill_layer(&f, l, old_rows[l]);
        }
        eplb_backend *b = open_cpu(&f);
        for (uint32_t l = 0; l < L; l++) {
            eplb_plan p;
            plan_ok(&f, old_rows[l], new_rows[l], gpn, &p);
            move_ok(b, l, &p);
            eplb_plan_free(&p);
        }
        cr_assert_eq(eplb_backend_synchronize(b, NULL), EPLB_OK);
        eplb_backend_close(b);
        for (uint32_t l = 0; l < L; l++) {
            expected_row(P, old_rows[l], new_rows[l], want);
            check_layer(&f, l, want);
        }
        check_sentinels(&f);
        fixture_fini(&f);
    }
}

Test(cpu_backend, large_unaligned_slices) {
    /* Slices >= 256 KiB take the streaming-store path; odd sizes and offsets
     * exercise its unaligned head, body and tail. */
    tensor_bytes[0] = 300007;
    tensor_bytes[1] = 262144 + 5;
    uint64_t st = 11;
    for (int iter = 0; iter < 4; iter++) {
        uint32_t G = 2 + iter, S = 3, P = G * S;
        fixture f;
        fixture_init(&f, 2, P, G);
        int32_t old_rows[2][16], new_rows[2][16], want[16];
        for (uint32_t l = 0; l < 2; l++) {
            random_rows(&st, P, P, old_rows[l], new_rows[l]);
            fill_layer(&f, l, old_rows[l]);
        }
        eplb_backend *b = open_cpu(&f);
        for (uint32_t l = 0; l < 2; l++) {
            eplb_plan p;
            plan_ok(&f, old_rows[l], new_rows[l], 2, &p);
            move_ok(b, l, &p);
            eplb_plan_free(&p);
            expected_row(P, old_rows[l], new_rows[l], want);
            check_layer(&f, l, want);
        }
        check_sentinels(&f);
        eplb_backend_close(b);
        fixture_fini(&f);
    }
}

/* ---------------------------------------------------------------------------
 * Fault injection
 * ------------------------------------------------------------------------- */

Test(cpu_backend, fault_at_every_gather_op_changes_nothing) {
    fixture f;
    fixture_init(&f, 1, 12, 4);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2};
    const int32_t new_row[] = {3, 4, 5, 0, 1, 2, 8, 6, 7, 1, 2, 0};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    cr_assert_gt(p.num_gather, 3);
    uint8_t *snap = snapshot(&f);
    for (uint32_t k = 1; k <= p.num_gather; k++) {
        eplb_backend_set_fault(EPLB_FAULT_GATHER, (int)k);
        eplb_error err;
        eplb_error_clear(&err);
        cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_EINTERNAL, "k=%u", k);
        cr_assert(strstr(err.msg, "gather op") && strstr(err.msg, "no slot was written"), "%s",
                  err.msg);
        /* Staging is partial: no scatter may run from it. */
        cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EPRECONDITION, "k=%u", k);
        cr_assert(same_as(&f, snap), "gather fault at op %u changed the buffers", k);
    }
    /* A fault armed for a later op than exists never fires; disarm anyway. */
    eplb_backend_set_fault(EPLB_FAULT_NONE, 0);
    move_ok(b, 0, &p);
    check_layer(&f, 0, new_row);
    check_sentinels(&f);
    free(snap);
    eplb_plan_free(&p);
    eplb_backend_close(b);
    fixture_fini(&f);
}

Test(cpu_backend, fault_at_every_scatter_op_then_retry_completes) {
    fixture f;
    fixture_init(&f, 2, 12, 4);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2};
    const int32_t new_row[] = {3, 4, 5, 0, 1, 2, 8, 6, 7, 1, 1, 0};
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    cr_assert_gt(p.num_scatter, 3);
    for (uint32_t k = 1; k <= p.num_scatter; k++) {
        fill_layer(&f, 1, old_row);
        eplb_backend *b = open_cpu(&f);
        eplb_error err;
        eplb_error_clear(&err);
        cr_assert_eq(eplb_backend_gather(b, 1, &p, &err), EPLB_OK, "%s", err.msg);
        eplb_backend_set_fault(EPLB_FAULT_SCATTER, (int)k);
        cr_assert_eq(eplb_backend_scatter(b, 1, &p, &err), EPLB_EDATALOSS, "k=%u", k);
        cr_assert(strstr(err.msg, "scatter again"), "%s", err.msg);
        /* Phase 2 again, from the same staging, completes the layer. */
        cr_assert_eq(eplb_backend_scatter(b, 1, &p, &err), EPLB_OK, "%s", err.msg);
        check_layer(&f, 1, new_row);
        check_sentinels(&f);
        eplb_backend_close(b);
    }
    /* Faults twice in a row, then success. */
    fill_layer(&f, 1, old_row);
    eplb_backend *b = open_cpu(&f);
    cr_assert_eq(eplb_backend_gather(b, 1, &p, NULL), EPLB_OK);
    eplb_backend_set_fault(EPLB_FAULT_SCATTER, 2);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, NULL), EPLB_EDATALOSS);
    eplb_backend_set_fault(EPLB_FAULT_SCATTER, p.num_scatter);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, NULL), EPLB_EDATALOSS);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, NULL), EPLB_OK);
    check_layer(&f, 1, new_row);
    eplb_backend_close(b);
    eplb_plan_free(&p);
    fixture_fini(&f);
}

/* ---------------------------------------------------------------------------
 * Validation, loader, plan checks
 * ------------------------------------------------------------------------- */

static void expect_invalid(fixture *f, const char *needle) {
    eplb_error err;
    eplb_error_clear(&err);
    eplb_backend *b = (eplb_backend *)1;
    cr_assert_eq(eplb_backend_open_by_name("cpu", &f->desc, f->P, &b, &err), EPLB_EINVAL,
                 "wanted EINVAL for %s", needle);
    cr_assert_null(b);
    cr_assert(strstr(err.msg, needle), "message \"%s\" lacks \"%s\"", err.msg, needle);
}

Test(buffers, validation_names_the_field) {
    fixture f;
    fixture_init(&f, 2, 8, 2);
    eplb_error err;
    cr_assert_eq(eplb_buffers_validate(&f.desc, 2, 8, 2, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_buffers_validate(&f.desc, 3, 8, 2, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_buffers_validate(&f.desc, 2, 8, 4, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_buffers_validate(&f.desc, 2, 9, 2, &err), EPLB_EINVAL);

    char saved[64];
    strcpy(saved, f.ranks[1].shm_name);
    strcpy(f.ranks[1].shm_name, "no-slash");
    expect_invalid(&f, "ranks[1].regions[0].shm_name");
    strcpy(f.ranks[1].shm_name, "/eplb-test-does-not-exist");
    expect_invalid(&f, "shm_open");
    strcpy(f.ranks[1].shm_name, f.ranks[0].shm_name);
    expect_invalid(&f, "same memory");
    strcpy(f.ranks[1].shm_name, saved);

    f.ranks[0].size = f.size + 1;
    expect_invalid(&f, "exceeds shm object");
    f.ranks[0].size = f.size / 2; /* declared smaller than the layout needs */
    expect_invalid(&f, "tensors[0] (w13).ranks[0]: offset 8");
    f.ranks[0].size = 0;

    f.place[1][1][1].stride = tensor_bytes[1] - 1;
    expect_invalid(&f, "layers[1].tensors[1] (w2).ranks[1].stride");
    f.place[1][1][1].stride = f.place[1][0][1].stride;

    uint64_t o = f.place[1][2][0].offset;
    f.place[1][2][0].offset = f.place[1][1][0].offset + 3; /* overlaps w2 */
    expect_invalid(&f, "overlaps");
    f.place[1][2][0].offset = UINT64_MAX - 10; /* overflow */
    expect_invalid(&f, "does not fit");
    f.place[1][2][0].offset = o;

    strcpy(f.tensors[0][2].name, "w2");
    expect_invalid(&f, "repeats");
    strcpy(f.tensors[0][2].name, "");
    expect_invalid(&f, "layers[0].tensors[2].name");
    strcpy(f.tensors[0][2].name, tensor_names[2]);

    f.tensors[1][0].bytes_per_expert = 0;
    expect_invalid(&f, "bytes_per_expert");
    f.tensors[1][0].bytes_per_expert = tensor_bytes[0];

    f.layers[0].num_tensors = 0;
    expect_invalid(&f, "layers[0].num_tensors");
    f.layers[0].num_tensors = NT;

    /* Device descriptions: structural checks, and the cpu refuses them.
     * Device copies move 4- or 16-byte words: every size, offset and stride
     * a multiple of 4 (a 4 KiB-strided layout here). */
    f.desc.kind = EPLB_BUFFERS_HIP_IPC;
    const uint64_t dev_size = (uint64_t)2 * NT * f.S * 4096;
    for (uint32_t g = 0; g < 2; g++) {
        f.ranks[g].size = dev_size;
        f.ranks[g].device = 0;
        memset(f.ranks[g].ipc_handle, (int)(g + 1), EPLB_IPC_HANDLE_SIZE);
    }
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t t = 0; t < NT; t++)
            for (uint32_t g = 0; g < 2; g++) {
                f.place[l][t][g].offset = (uint64_t)(l * NT + t) * f.S * 4096;
                f.place[l][t][g].stride = 4096;
            }
    f.tensors[0][1].bytes_per_expert = f.tensors[1][1].bytes_per_expert = 516;
    cr_assert_eq(eplb_buffers_validate(&f.desc, 2, 8, 2, &err), EPLB_OK, "%s", err.msg);
    f.tensors[1][1].bytes_per_expert = 517;
    expect_invalid(&f, "layers[1].tensors[1] (w2).bytes_per_expert 517 is not a multiple of 4");
    f.tensors[1][1].bytes_per_expert = 516;
    f.place[1][2][1].offset += 2;
    expect_invalid(&f, "layers[1].tensors[2] (w13_scale).ranks[1]: offset");
    f.place[1][2][1].offset -= 2;
    f.place[0][0][0].stride = 4098;
    expect_invalid(&f, "multiples of 4");
    f.place[0][0][0].stride = 4096;
    f.desc.kind = EPLB_BUFFERS_CUDA_IPC;
    cr_assert_eq(eplb_buffers_validate(&f.desc, 2, 8, 2, &err), EPLB_OK, "%s", err.msg);
    f.desc.kind = EPLB_BUFFERS_HIP_IPC;
    expect_invalid(&f, "device buffers");
    memset(f.ranks[1].ipc_handle, 0, EPLB_IPC_HANDLE_SIZE);
    expect_invalid(&f, "ranks[1].regions[0].ipc_handle");
    memset(f.ranks[1].ipc_handle, 2, EPLB_IPC_HANDLE_SIZE);
    f.ranks[1].device = -1;
    expect_invalid(&f, "ranks[1].regions[0].device");
    f.ranks[1].device = 0;
    memset(f.ranks[1].ipc_handle, 1, EPLB_IPC_HANDLE_SIZE);
    expect_invalid(&f, "same memory");
    f.desc.kind = EPLB_BUFFERS_DEVICE_PTR;
    f.ranks[0].device_ptr = 0x10000;
    f.ranks[1].device_ptr = 0x10000 + dev_size / 2;
    expect_invalid(&f, "same memory");
    f.ranks[1].device_ptr = 0;
    expect_invalid(&f, "ranks[1].regions[0].device_ptr");
    f.desc.kind = (eplb_buffers_kind)9;
    expect_invalid(&f, "kind");
    fixture_fini(&f);
}

Test(loader, names_and_auto) {
    fixture f;
    fixture_init(&f, 1, 4, 2);
    eplb_backend *b = NULL;
    eplb_error err;
    cr_assert_eq(eplb_backend_open_by_name("gpu", &f.desc, 4, &b, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "cpu, hip, cuda or auto"), "%s", err.msg);
    cr_assert_null(b);
    /* shm buffers: auto is the cpu backend; hip refuses them or is absent. */
    cr_assert_eq(eplb_backend_open_by_name("auto", &f.desc, 4, &b, &err), EPLB_OK, "%s", err.msg);
    cr_assert_str_eq(eplb_backend_name(b), "cpu");
    eplb_backend_close(b);
    eplb_status st = eplb_backend_open_by_name("hip", &f.desc, 4, &b, &err);
    cr_assert(st == EPLB_EUNAVAILABLE || st == EPLB_EINVAL, "hip on shm: %s", err.msg);
    cr_assert_null(b);
    char why[512];
    const char *name = eplb_backend_auto_name(why, sizeof why);
    cr_assert(strcmp(name, "cpu") == 0 || strcmp(name, "hip") == 0 || strcmp(name, "cuda") == 0, "%s", name);
    cr_assert_eq(strncmp(why, name, strlen(name)), 0, "%s", why);
    cr_log_info("auto backend here: %s", why);
    eplb_backend_close(NULL);
    fixture_fini(&f);
}

Test(loader, plan_checked_before_anything) {
    fixture f;
    fixture_init(&f, 1, 6, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 0, 1}, new_row[] = {0, 2, 0, 1, 0, 3};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    uint8_t *snap = snapshot(&f);
    eplb_error err;
    cr_assert_eq(eplb_backend_gather(b, 1, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "layer 1 out of range"), "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_backend_gather(b, 0, NULL, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    p.scatter[p.num_scatter - 1].dst = 6;
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "scatter op"), "%s", err.msg);
    p.gather[0].src = 6;
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "gather op"), "%s", err.msg);
    eplb_plan_free(&p);
    cr_assert(same_as(&f, snap));
    /* A plan for another shape. */
    const int32_t o4[] = {0, 1, 2, 3}, n4[] = {1, 0, 2, 3};
    cr_assert_eq(eplb_plan_build(4, 2, 2, o4, n4, 0, 2, &p, NULL), EPLB_OK);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "built for 4 slots"), "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EINVAL);
    eplb_plan_free(&p);
    cr_assert(same_as(&f, snap));
    cr_assert_eq(eplb_backend_gather(NULL, 0, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_backend_scatter(NULL, 0, &p, &err), EPLB_EINVAL);
    cr_assert_eq(eplb_backend_check(NULL, &err), EPLB_EINVAL);
    free(snap);
    eplb_backend_close(b);
    fixture_fini(&f);
}

Test(cpu_backend, close_unmaps_everything) {
    fixture f;
    fixture_init(&f, 1, 4, 2);
    eplb_backend *b = open_cpu(&f);
    eplb_backend_close(b);
    /* Only our own fixture mappings remain: one per rank. */
    FILE *maps = fopen("/proc/self/maps", "r");
    cr_assert(maps);
    char line[1024];
    int count = 0;
    while (fgets(line, sizeof line, maps))
        for (uint32_t g = 0; g < f.G; g++)
            if (strstr(line, f.names[g] + 1))
                count++;
    fclose(maps);
    cr_assert_eq(count, (int)f.G, "backend left %d mappings", count - (int)f.G);
    fixture_fini(&f);
}

/* ---------------------------------------------------------------------------
 * Phases: explicit, never inferred from the plan
 * ------------------------------------------------------------------------- */

Test(phases, scatter_only_after_a_gather_of_its_layer) {
    fixture f;
    fixture_init(&f, 2, 6, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 0, 1}, new_row[] = {0, 2, 0, 1, 0, 3};
    fill_layer(&f, 0, old_row);
    fill_layer(&f, 1, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    uint8_t *snap = snapshot(&f);
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "without a completed gather"), "%s", err.msg);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "the layer gathered last is 0"), "%s", err.msg);
    /* A plan with another staging table is not the one gathered. */
    const int32_t same[] = {0, 1, 2, 3, 0, 1}, swap[] = {1, 0, 2, 3, 0, 1};
    eplb_plan q;
    plan_ok(&f, same, swap, 2, &q);
    cr_assert_neq(q.num_staging, p.num_staging);
    cr_assert_eq(eplb_backend_scatter(b, 0, &q, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "not the same plan"), "%s", err.msg);
    cr_assert(same_as(&f, snap), "a refused scatter wrote something");
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    check_layer(&f, 0, new_row);
    /* Gathering layer 1 replaces layer 0's staging. */
    cr_assert_eq(eplb_backend_gather(b, 1, &p, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EPRECONDITION);
    cr_assert_eq(eplb_backend_scatter(b, 1, &p, &err), EPLB_OK, "%s", err.msg);
    check_layer(&f, 0, new_row);
    check_layer(&f, 1, new_row);
    check_sentinels(&f);
    free(snap);
    eplb_plan_free(&p);
    eplb_plan_free(&q);
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* ---------------------------------------------------------------------------
 * Shrinking buffers: EPLB_EDATALOSS, never SIGBUS
 * ------------------------------------------------------------------------- */

static void shrink(fixture *f, uint32_t g, off_t size) {
    int fd = shm_open(f->names[g], O_RDWR, 0);
    cr_assert(fd >= 0);
    cr_assert_eq(ftruncate(fd, size), 0);
    close(fd);
}

/* The layout's extent on every rank: what "the layout needs" says. */
static uint64_t layout_needs(fixture *f) {
    uint64_t need = 0;
    for (uint32_t l = 0; l < f->L; l++)
        for (uint32_t t = 0; t < NT; t++) {
            uint64_t end = f->place[l][t][0].offset + (uint64_t)(f->S - 1) * f->place[l][t][0].stride +
                           tensor_bytes[t];
            if (end > need)
                need = end;
        }
    return need;
}

static void expect_lost(eplb_status st, const eplb_error *err, fixture *f, uint32_t g,
                        long long now) {
    char want[512];
    snprintf(want, sizeof want,
             "ranks[%u].regions[0] shm \"%s\" shrank to %lld bytes, the layout needs %llu: its experts are "
             "lost", g, f->names[g], now, (unsigned long long)layout_needs(f));
    cr_assert_eq(st, EPLB_EDATALOSS, "%s", err->msg);
    cr_assert(strstr(err->msg, want), "message \"%s\" lacks \"%s\"", err->msg, want);
}

Test(shrink, truncated_before_the_move_is_data_loss) {
    fixture f;
    fixture_init(&f, 2, 8, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7}, new_row[] = {7, 6, 5, 4, 3, 2, 1, 0};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_OK, "%s", err.msg);
    /* Shrinking past nothing the layout uses is harmless. */
    shrink(&f, 0, (off_t)layout_needs(&f));
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_OK, "%s", err.msg);
    shrink(&f, 1, 0);
    expect_lost(eplb_backend_check(b, &err), &err, &f, 1, 0);
    /* Lost for good: every phase says so, even once the object grew back
     * (it grows back zeroed). */
    shrink(&f, 1, (off_t)f.size);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    expect_lost(eplb_backend_gather(b, 0, &p, &err), &err, &f, 1, 0);
    expect_lost(eplb_backend_scatter(b, 0, &p, &err), &err, &f, 1, 0);
    expect_lost(eplb_backend_check(b, &err), &err, &f, 1, 0);
    eplb_plan_free(&p);
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* The fault hook shrinks rank `g` right before op `at` of `phase`. */
typedef struct shrink_hook {
    fixture *f;
    eplb_fault_phase phase;
    int at, seen;
    uint32_t g;
} shrink_hook;

static int shrink_at(eplb_fault_phase phase, void *arg) {
    shrink_hook *h = arg;
    if (phase == h->phase && ++h->seen == h->at) {
        int fd = shm_open(h->f->names[h->g], O_RDWR, 0);
        if (fd < 0 || ftruncate(fd, 0) != 0)
            abort();
        close(fd);
    }
    return 0;
}

/* One case: the k-th op of phase runs into a rank truncated to 0. */
static void shrink_mid_phase(eplb_fault_phase phase, int k) {
    fixture f;
    fixture_init(&f, 1, 12, 4);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2};
    const int32_t new_row[] = {3, 4, 5, 0, 1, 2, 8, 6, 7, 1, 2, 0};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    cr_assert(k <= (int)(phase == EPLB_FAULT_GATHER ? p.num_gather : p.num_scatter));
    /* The rank the k-th op reads or writes. */
    const eplb_plan_op *op = phase == EPLB_FAULT_GATHER ? &p.gather[k - 1] : &p.scatter[k - 1];
    shrink_hook h = {&f, phase, k, 0, phase == EPLB_FAULT_GATHER ? op->src_gpu : op->dst_gpu};
    eplb_backend_set_fault_hook(shrink_at, &h);
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_backend_gather(b, 0, &p, &err);
    if (phase == EPLB_FAULT_SCATTER) {
        cr_assert_eq(st, EPLB_OK, "%s", err.msg);
        st = eplb_backend_scatter(b, 0, &p, &err);
    }
    eplb_backend_set_fault_hook(NULL, NULL);
    expect_lost(st, &err, &f, h.g, 0);
    char where[64];
    snprintf(where, sizeof where, "layer 0: %s op %d of",
             phase == EPLB_FAULT_GATHER ? "gather" : "scatter", k - 1);
    cr_assert(strstr(err.msg, where), "message \"%s\" lacks \"%s\"", err.msg, where);
    /* The retry the registry makes fails the same way; the process lives. */
    expect_lost(eplb_backend_scatter(b, 0, &p, &err), &err, &f, h.g, 0);
    expect_lost(eplb_backend_check(b, &err), &err, &f, h.g, 0);
    eplb_plan_free(&p);
    eplb_backend_close(b);
    fixture_fini(&f);
}

Test(shrink, truncated_during_gather_is_data_loss_not_sigbus) {
    shrink_mid_phase(EPLB_FAULT_GATHER, 1);
    shrink_mid_phase(EPLB_FAULT_GATHER, 3);
}

Test(shrink, truncated_during_scatter_is_data_loss_not_sigbus) {
    shrink_mid_phase(EPLB_FAULT_SCATTER, 1);
    shrink_mid_phase(EPLB_FAULT_SCATTER, 4);
}

/* Another thread truncates while a large copy runs: whichever copy it lands
 * in (or between), the move fails with EPLB_EDATALOSS and the process lives. */
typedef struct racer {
    fixture *f;
    volatile int go;
} racer;

static int signal_racer(eplb_fault_phase phase, void *arg) {
    racer *r = arg;
    if (phase == EPLB_FAULT_SCATTER)
        __atomic_store_n(&r->go, 1, __ATOMIC_RELEASE);
    return 0;
}

static void *race_truncate(void *arg) {
    racer *r = arg;
    while (!__atomic_load_n(&r->go, __ATOMIC_ACQUIRE))
        ;
    int fd = shm_open(r->f->names[1], O_RDWR, 0);
    if (fd >= 0) {
        if (ftruncate(fd, 4096) != 0)
            abort();
        close(fd);
    }
    return NULL;
}

Test(shrink, truncated_by_another_thread_during_a_long_copy, .timeout = 120) {
    tensor_bytes[0] = 16u << 20; /* 16 MiB slices: milliseconds per copy */
    tensor_bytes[1] = 1u << 20;
    fixture f;
    fixture_init(&f, 1, 8, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7}, new_row[] = {4, 5, 6, 7, 0, 1, 2, 3};
    eplb_backend *b = open_cpu(&f);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    racer r = {&f, 0};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, race_truncate, &r), 0);
    eplb_backend_set_fault_hook(signal_racer, &r);
    eplb_error err;
    eplb_error_clear(&err);
    eplb_status st = eplb_backend_gather(b, 0, &p, &err);
    cr_assert_eq(st, EPLB_OK, "%s", err.msg);
    st = eplb_backend_scatter(b, 0, &p, &err);
    pthread_join(th, NULL);
    eplb_backend_set_fault_hook(NULL, NULL);
    /* The truncation may land after the last copy: then check finds it. */
    if (st == EPLB_OK)
        st = eplb_backend_check(b, &err);
    cr_log_info("racing truncate: %s", err.msg);
    cr_assert_eq(st, EPLB_EDATALOSS, "%s", err.msg);
    cr_assert(strstr(err.msg, "ranks[1]") && strstr(err.msg, "its experts are lost"), "%s",
              err.msg);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_EDATALOSS);
    eplb_plan_free(&p);
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* Under AddressSanitizer (EPLB_SANITIZE=ON) its own SIGBUS handler would
 * turn the crash below into a report and exit(1); let SIGBUS be ours. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "handle_sigbus=0"; }

/* Outside a copy, a SIGBUS is still a crash: the guard does not hide bugs. */
Test(shrink, sigbus_outside_a_copy_still_kills, .signal = SIGBUS) {
    fixture f;
    fixture_init(&f, 1, 4, 2);
    eplb_backend *b = open_cpu(&f); /* installs the handler */
    shrink(&f, 0, 0);
    for (uint32_t g = 0; g < f.G; g++)
        shm_unlink(f.names[g]); /* this process dies below: leave nothing behind */
    volatile uint8_t *p = f.map[0];
    p[0] = 1; /* our own mapping, past the end now: SIGBUS, default action */
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* A handler installed before ours still gets the SIGBUS it is owed. */
static void own_sigbus(int sig) {
    (void)sig;
    _exit(42);
}

Test(shrink, sigbus_outside_a_copy_reaches_the_previous_handler, .exit_code = 42) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = own_sigbus;
    sigemptyset(&sa.sa_mask);
    cr_assert_eq(sigaction(SIGBUS, &sa, NULL), 0);
    fixture f;
    fixture_init(&f, 1, 4, 2);
    eplb_backend *b = open_cpu(&f);
    shrink(&f, 0, 0);
    for (uint32_t g = 0; g < f.G; g++)
        shm_unlink(f.names[g]);
    volatile uint8_t *p = f.map[0];
    p[0] = 1;
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* ---------------------------------------------------------------------------
 * Identity: two ranks on one object; an object replaced under its name
 * ------------------------------------------------------------------------- */

/* `ln /dev/shm/a /dev/shm/b`: two names, one object.  Rank 1 on a hard link
 * to rank 0's object would overlap its slots: refused at open, naming both
 * ranks, whatever the names say. */
Test(identity, hard_linked_ranks_are_refused) {
    fixture f;
    fixture_init(&f, 1, 8, 2);
    char path[128], hl[128], saved[64];
    snprintf(path, sizeof path, "/dev/shm%s", f.names[0]);
    snprintf(hl, sizeof hl, "/dev/shm/eplb-test-%d-hl", (int)getpid());
    unlink(hl);
    if (link(path, hl) != 0)
        cr_skip_test("/dev/shm does not take hard links here");
    strcpy(saved, f.ranks[1].shm_name);
    snprintf(f.ranks[1].shm_name, sizeof f.ranks[1].shm_name, "%s", hl + 8);
    eplb_error err;
    eplb_error_clear(&err);
    eplb_backend *b = (eplb_backend *)1;
    cr_assert_eq(eplb_backend_open_by_name("cpu", &f.desc, f.P, &b, &err), EPLB_EINVAL, "%s",
                 err.msg);
    cr_assert_null(b);
    char want[256];
    snprintf(want, sizeof want, "ranks[0].regions[0].shm_name \"%s\" and ranks[1].regions[0].shm_name \"%s\" are the "
             "same shm object", f.names[0], hl + 8);
    cr_assert(strstr(err.msg, want), "message \"%s\" lacks \"%s\"", err.msg, want);
    /* Rank 0's bytes: untouched (nothing was mapped for writing). */
    for (size_t i = 0; i < f.size; i++)
        cr_assert_eq(f.map[0][i], SENTINEL, "byte %zu", i);
    /* Distinct objects again: accepted. */
    strcpy(f.ranks[1].shm_name, saved);
    b = open_cpu(&f);
    eplb_backend_close(b);
    unlink(hl);
    fixture_fini(&f);
}

/* The engine unlinks rank 1's object and creates a new one under the same
 * name, same size and bytes.  Our mapping is of the old object: a move would
 * write where the engine no longer looks.  check (and every phase after it)
 * answers EPLB_EDATALOSS, and the new object is left alone. */
Test(identity, unlinked_and_recreated_is_data_loss_at_check) {
    fixture f;
    fixture_init(&f, 1, 8, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7}, new_row[] = {7, 6, 5, 4, 3, 2, 1, 0};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_error err;
    eplb_error_clear(&err);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_OK, "%s", err.msg);
    /* Replace rank 1: a fresh object, a copy of the old bytes. */
    cr_assert_eq(shm_unlink(f.names[1]), 0);
    int fd = shm_open(f.names[1], O_RDWR | O_CREAT | O_EXCL, 0600);
    cr_assert(fd >= 0);
    cr_assert_eq(ftruncate(fd, (off_t)f.size), 0);
    uint8_t *fresh = mmap(NULL, f.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    cr_assert(fresh != MAP_FAILED);
    close(fd);
    memcpy(fresh, f.map[1], f.size);
    uint8_t *before = malloc(f.size);
    memcpy(before, fresh, f.size);
    char want[512];
    snprintf(want, sizeof want, "ranks[1].regions[0] shm \"%s\" was replaced by another object since it was "
             "attached: its experts are no longer where the engine sees them", f.names[1]);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_EDATALOSS, "%s", err.msg);
    cr_assert(strstr(err.msg, want), "message \"%s\" lacks \"%s\"", err.msg, want);
    /* Lost for good, in every phase. */
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_EDATALOSS);
    cr_assert(strstr(err.msg, want), "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_EDATALOSS);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_EDATALOSS);
    cr_assert(memcmp(fresh, before, f.size) == 0, "the new object was written");
    eplb_plan_free(&p);
    eplb_backend_close(b);
    free(before);
    munmap(fresh, f.size);
    fixture_fini(&f);
}

/* An engine may remove its names once every process has mapped them: the
 * held object is still the one it writes and reads, so moves go on. */
Test(identity, a_name_merely_removed_is_no_loss) {
    fixture f;
    fixture_init(&f, 1, 8, 2);
    const int32_t old_row[] = {0, 1, 2, 3, 4, 5, 6, 7}, new_row[] = {7, 6, 5, 4, 3, 2, 1, 0};
    fill_layer(&f, 0, old_row);
    eplb_backend *b = open_cpu(&f);
    eplb_error err;
    eplb_error_clear(&err);
    for (uint32_t g = 0; g < f.G; g++)
        cr_assert_eq(shm_unlink(f.names[g]), 0);
    cr_assert_eq(eplb_backend_check(b, &err), EPLB_OK, "%s", err.msg);
    eplb_plan p;
    plan_ok(&f, old_row, new_row, 2, &p);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_backend_scatter(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    eplb_plan_free(&p);
    eplb_backend_close(b);
    fixture_fini(&f);
}

/* ---------------------------------------------------------------------------
 * Trust: what may be mapped
 * ------------------------------------------------------------------------- */

static eplb_status open_with(fixture *f, const eplb_shm_policy *policy, eplb_error *err) {
    eplb_backend *b = (eplb_backend *)1;
    eplb_error_clear(err);
    eplb_status st = eplb_backend_open("cpu", &f->desc, policy, f->P, &b, err);
    if (st == EPLB_OK)
        eplb_backend_close(b);
    else
        cr_assert_null(b);
    return st;
}

Test(trust, prefix_of_the_policy) {
    fixture f;
    fixture_init(&f, 1, 4, 2);
    eplb_error err;
    eplb_shm_policy pol = {"/eplb-test-", NULL, 0};
    cr_assert_eq(open_with(&f, &pol, &err), EPLB_OK, "%s", err.msg);
    pol.prefix = "/eplb-prod-";
    cr_assert_eq(open_with(&f, &pol, &err), EPLB_EPERM);
    cr_assert(strstr(err.msg, "ranks[0].regions[0].shm_name") &&
                  strstr(err.msg, "is not under the allowed prefix \"/eplb-prod-\""),
              "%s", err.msg);
    pol.prefix = "";
    cr_assert_eq(open_with(&f, &pol, &err), EPLB_OK, "%s", err.msg);
    fixture_fini(&f);
}

Test(trust, owner_must_be_us_or_allowed) {
    if (geteuid() != 0)
        cr_skip_test("needs root to give an shm object to another uid");
    fixture f;
    fixture_init(&f, 1, 4, 2);
    int fd = shm_open(f.names[1], O_RDWR, 0);
    cr_assert(fd >= 0);
    cr_assert_eq(fchown(fd, 65534, 65534), 0);
    close(fd);
    eplb_error err;
    cr_assert_eq(open_with(&f, NULL, &err), EPLB_EPERM);
    char want[128];
    snprintf(want, sizeof want, "ranks[1].regions[0].shm_name \"%s\" is owned by uid 65534; allowed: %u "
             "(this process)", f.names[1], (unsigned)geteuid());
    cr_assert(strstr(err.msg, want), "message \"%s\" lacks \"%s\"", err.msg, want);
    const uint32_t uids[] = {1000, 65534};
    eplb_shm_policy pol = {NULL, uids, 1};
    cr_assert_eq(open_with(&f, &pol, &err), EPLB_EPERM);
    cr_assert(strstr(err.msg, "allowed: 0 (this process), 1000"), "%s", err.msg);
    pol.num_uids = 2;
    cr_assert_eq(open_with(&f, &pol, &err), EPLB_OK, "%s", err.msg);
    fixture_fini(&f);
}

Test(trust, symlinks_and_fifos_are_refused, .timeout = 20) {
    fixture f;
    fixture_init(&f, 1, 4, 2);
    char path[128], link[128], fifo[128], saved[64];
    snprintf(path, sizeof path, "/dev/shm%s", f.names[0]);
    snprintf(link, sizeof link, "/dev/shm/eplb-test-%d-link", (int)getpid());
    snprintf(fifo, sizeof fifo, "/dev/shm/eplb-test-%d-fifo", (int)getpid());
    unlink(link);
    unlink(fifo);
    if (symlink(path, link) != 0 || mkfifo(fifo, 0600) != 0)
        cr_skip_test("/dev/shm does not take symlinks or FIFOs here");
    strcpy(saved, f.ranks[0].shm_name);
    eplb_error err;
    /* A symlink to an object we could map is refused all the same: it could
     * as well lead to a semaphore or another engine's weights. */
    snprintf(f.ranks[0].shm_name, sizeof f.ranks[0].shm_name, "%s", link + 8);
    cr_assert_eq(open_with(&f, NULL, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "ranks[0].regions[0].shm_name") && strstr(err.msg, "symbolic link"), "%s",
              err.msg);
    /* A FIFO must neither hang the open (O_NONBLOCK) nor be mapped. */
    snprintf(f.ranks[0].shm_name, sizeof f.ranks[0].shm_name, "%s", fifo + 8);
    cr_assert_eq(open_with(&f, NULL, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "not a regular file"), "%s", err.msg);
    strcpy(f.ranks[0].shm_name, saved);
    cr_assert_eq(open_with(&f, NULL, &err), EPLB_OK, "%s", err.msg);
    unlink(link);
    unlink(fifo);
    fixture_fini(&f);
}

/* A backend holding ranks 2..3 of 4 (one node of two): plans within them
 * move; a plan that needs rank 0 is refused before anything is written,
 * naming the rank. */
Test(held, a_subset_of_ranks_moves_only_its_own_slots) {
    fixture f;
    fixture_init(&f, 1, 8, 4); /* 2 slots per rank */
    eplb_tensor_desc tensors[NT];
    for (uint32_t t = 0; t < NT; t++) {
        tensors[t] = f.tensors[0][t];
        tensors[t].ranks = &f.place[0][t][2];
    }
    eplb_layer_desc layer = { NT, tensors };
    eplb_buffers_desc d = f.desc;
    d.first_rank = 2;
    d.held_ranks = 2;
    d.ranks = &f.rbuf[2];
    d.layers = &layer;
    const int32_t old_row[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
    fill_layer(&f, 0, old_row);
    eplb_backend *b = NULL;
    eplb_error err;
    cr_assert_eq(eplb_backend_open_by_name("cpu", &d, 8, &b, &err), EPLB_OK, "%s", err.msg);
    uint32_t first, count;
    eplb_backend_held(b, &first, &count);
    cr_assert_eq(first, 2);
    cr_assert_eq(count, 2);

    /* Ranks 2 and 3 swap their experts: slots 4..7. */
    const int32_t within[8] = { 0, 1, 2, 3, 6, 7, 4, 5 };
    eplb_plan p;
    cr_assert_eq(eplb_plan_build(8, 4, 2, old_row, within, 2, 2, &p, &err), EPLB_OK, "%s", err.msg);
    cr_assert_eq(eplb_backend_plan_held(b, 0, &p, &err), EPLB_OK, "%s", err.msg);
    move_ok(b, 0, &p);
    eplb_plan_free(&p);
    check_layer(&f, 0, within);

    /* Slot 0 (rank 0) and slot 7 (rank 3) trade: the plan (built for all
     * ranks) needs rank 0. */
    const int32_t across[8] = { 5, 1, 2, 3, 6, 7, 4, 0 };
    cr_assert_eq(eplb_plan_build(8, 4, 2, within, across, 0, 4, &p, &err), EPLB_OK, "%s", err.msg);
    uint8_t *before = snapshot(&f);
    cr_assert_eq(eplb_backend_plan_held(b, 0, &p, &err), EPLB_EPRECONDITION);
    cr_assert(strstr(err.msg, "needs EP rank(s) 0, which this server does not hold (it holds ranks 2..3)"), "%s",
              err.msg);
    cr_assert_eq(eplb_backend_gather(b, 0, &p, &err), EPLB_EPRECONDITION);
    uint8_t *after = snapshot(&f);
    cr_assert_arr_eq(before, after, f.size * f.G);
    free(before);
    free(after);
    eplb_plan_free(&p);
    eplb_backend_close(b);

    /* The held range must lie within the model's ranks. */
    d.first_rank = 3;
    cr_assert_eq(eplb_backend_open_by_name("cpu", &d, 8, &b, &err), EPLB_EINVAL);
    cr_assert(strstr(err.msg, "first_rank 3 and num_ranks 2"), "%s", err.msg);
    fixture_fini(&f);
}
