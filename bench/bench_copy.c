/* bench_copy.c -- cpu backend copy throughput vs plain memcpy on the same
 * machine.
 *
 * A standalone program, not a test: it prints numbers (and exits 1 only if
 * a call fails).  Links eplb_gpu (and eplb_core).
 *
 * Setup: 8 EP ranks x 9 slots (DeepSeek-V3's 288 / 32 per rank), one layer
 * of two tensors, w13 4 MiB + w2 2 MiB per expert (a 42 MiB fp8 expert
 * scaled down 7x so 8 ranks fit in memory), one POSIX shm object per rank,
 * pre-touched.  Plan A moves every slot to a random other slot (nearly all
 * across ranks, so every slot is staged: gather + scatter = 2 copies per
 * slot); plan B is its inverse, so A, B, A, ... always does the full work
 * (the same plan twice would be a retry, phase 2 only).
 * Throughput = bytes copied (gather + scatter ops x 6 MiB) / time of
 * eplb_backend_execute_layer.  Baselines, same machine, same slice size:
 *   memcpy slices  memcpy of 6 MiB slices between two pre-touched buffers
 *   memcpy 1 call  one memcpy of the same total size
 * Each figure is the median of the runs; the minimum time is shown too.
 *
 *   ./bench_copy [runs]   (default 15) */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "eplb_backend.h"
#include "eplb_plan.h"
#include "bench_util.h"

#define G 8
#define S 9
#define P (G * S)
#define W13 (4u << 20)
#define W2 (2u << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void report(const char *what, double bytes, double *t, int runs) {
    qsort(t, (size_t)runs, sizeof *t, cmp_double);
    printf("%-26s %8.2f GB/s median  %8.2f GB/s best   (%.0f MB per run, %d runs)\n", what,
           bytes / t[runs / 2] / 1e9, bytes / t[0] / 1e9, bytes / 1e6, runs);
}

int main(int argc, char **argv) {
    int runs = argc > 1 ? atoi(argv[1]) : 15;
    if (runs < 3)
        runs = 3;
    const size_t stride = W13 + W2; /* both tensors of a slot, back to back */
    const size_t rank_bytes = stride * S;
    char names[G][64];
    eplb_region ranks[G];
    eplb_rank_buffers rbuf[G];
    eplb_tensor_layout lay13[G], lay2[G];
    memset(ranks, 0, sizeof ranks);
    for (int g = 0; g < G; g++) {
        snprintf(names[g], sizeof names[g], "/eplb-bench-copy-%d-%d", (int)getpid(), g);
        int fd = shm_open(names[g], O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)rank_bytes) != 0) {
            perror("shm");
            return 1;
        }
        void *p = mmap(NULL, rank_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        memset(p, g + 1, rank_bytes); /* touch every page */
        munmap(p, rank_bytes);
        snprintf(ranks[g].shm_name, sizeof ranks[g].shm_name, "%s", names[g]);
        rbuf[g] = (eplb_rank_buffers){ 1, &ranks[g] };
        lay13[g].region = lay2[g].region = 0;
        lay13[g].offset = 0;
        lay13[g].stride = stride;
        lay2[g].offset = W13;
        lay2[g].stride = stride;
    }
    eplb_tensor_desc tensors[2] = {{"w13", W13, lay13}, {"w2", W2, lay2}};
    eplb_layer_desc layer = {2, tensors};
    eplb_buffers_desc desc = {EPLB_BUFFERS_SHM, 1, G, 0, 0, rbuf, &layer};

    eplb_backend *b = NULL;
    eplb_error err;
    if (eplb_backend_open_by_name("cpu", &desc, P, &b, &err) != EPLB_OK) {
        fprintf(stderr, "open: %s\n", err.msg);
        return 1;
    }
    /* Plan A: a random derangement of distinct experts; B: its inverse. */
    int32_t old_row[P], new_row[P];
    uint64_t st = 1;
    for (int s = 0; s < P; s++)
        old_row[s] = new_row[s] = s;
    for (int s = P - 1; s > 0; s--) {
        int j = (int)(rng_next(&st) % (uint64_t)s); /* Sattolo: one cycle, no fixed point */
        int32_t t = new_row[s];
        new_row[s] = new_row[j];
        new_row[j] = t;
    }
    eplb_plan plan[2];
    if (eplb_plan_build(P, G, 8, old_row, new_row, 0, G, &plan[0], &err) != EPLB_OK ||
        eplb_plan_build(P, G, 8, new_row, old_row, 0, G, &plan[1], &err) != EPLB_OK) {
        fprintf(stderr, "plan: %s\n", err.msg);
        return 1;
    }
    uint32_t copies = plan[0].num_gather + plan[0].num_scatter;
    double bytes = (double)copies * (double)stride;
    printf("cpu backend: %d ranks x %d slots, %u + %u bytes per expert; plan: %u gather + %u "
           "scatter ops (%u cross-rank), %u staging entries\n", G, S, W13, W2,
           plan[0].num_gather, plan[0].num_scatter, plan[0].cross_gpu_copies,
           plan[0].num_staging);

    double *t = malloc((size_t)runs * sizeof *t);
    /* Warm-up: staging allocated and touched. */
    for (int i = 0; i < 2; i++)
        if (eplb_backend_execute_layer(b, 0, &plan[i], &err) != EPLB_OK) {
            fprintf(stderr, "execute: %s\n", err.msg);
            return 1;
        }
    for (int r = 0; r < runs; r++) {
        double t0 = now_s();
        if (eplb_backend_execute_layer(b, 0, &plan[r & 1], &err) != EPLB_OK) {
            fprintf(stderr, "execute: %s\n", err.msg);
            return 1;
        }
        t[r] = now_s() - t0;
    }
    qsort(t, (size_t)runs, sizeof *t, cmp_double);
    double backend_med = bytes / t[runs / 2], backend_best = bytes / t[0];
    report("cpu backend execute_layer", bytes, t, runs);

    /* Baselines on two pre-touched anonymous buffers of the same size. */
    size_t total = (size_t)copies * stride;
    size_t half = (size_t)P * stride;
    uint8_t *a = mmap(NULL, half, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *c = mmap(NULL, half, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || c == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(a, 1, half);
    memset(c, 2, half);
    for (int r = 0; r < runs; r++) {
        double t0 = now_s();
        for (size_t done = 0, i = 0; done < total; done += stride, i++) {
            size_t k = (i * 37) % P; /* scattered slices, like the plan's */
            memcpy(c + k * stride, a + ((k + 11) % P) * stride, stride);
        }
        t[r] = now_s() - t0;
    }
    qsort(t, (size_t)runs, sizeof *t, cmp_double);
    double slices_med = bytes / t[runs / 2], slices_best = bytes / t[0];
    report("memcpy 6 MiB slices", bytes, t, runs);
    for (int r = 0; r < runs; r++) {
        double t0 = now_s();
        for (size_t done = 0; done < total; done += half)
            memcpy(c, a, total - done < half ? total - done : half);
        t[r] = now_s() - t0;
    }
    qsort(t, (size_t)runs, sizeof *t, cmp_double);
    double big_med = bytes / t[runs / 2];
    report("memcpy 432 MiB per call", bytes, t, runs);
    printf("cpu backend / memcpy slices: %.0f%% (median), %.0f%% (best); "
           "/ memcpy 432 MiB: %.0f%% (median); target >= 70%%\n", 100.0 * backend_med / slices_med,
           100.0 * backend_best / slices_best, 100.0 * backend_med / big_med);

    munmap(a, half);
    munmap(c, half);
    free(t);
    eplb_plan_free(&plan[0]);
    eplb_plan_free(&plan[1]);
    eplb_backend_close(b);
    for (int g = 0; g < G; g++)
        shm_unlink(names[g]);
    return 0;
}
