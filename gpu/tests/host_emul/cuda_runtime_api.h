/* cuda_runtime_api.h (host emulation) -- the few CUDA runtime calls
 * device_check.c uses, on host memory, so that device_check runs against the
 * hip backend built with -DEPLB_HIP_ON_HOST on a machine without a GPU
 * (gpu/tests/host-emulation-check.sh).  Not a CUDA implementation: "device"
 * memory is malloc'd, copies are memcpy, streams do nothing.
 *
 * Included by exactly one translation unit (device_check.c), which is linked
 * -rdynamic: the eplb_host_emul_* definitions below are what the
 * emulated backend (gpu/hip/eplb_hip_compat.h, EPLB_HIP_ON_HOST) finds with
 * dlsym -- which device each cudaMalloc'd block is on and how big (pointer
 * attributes, allocation ranges), a switch that makes the backend's "device"
 * report a sticky illegal-address error, its peer-copy counters, and the
 * log of its copies, event waits and records. */
#ifndef EPLB_HOST_EMUL_CUDA_RUNTIME_API_H
#define EPLB_HOST_EMUL_CUDA_RUNTIME_API_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EPLB_DEVICE_CHECK_ON_HOST 1

typedef int cudaError_t;
typedef void *cudaStream_t;
typedef struct {
    char reserved[64];
} cudaIpcMemHandle_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorNoDevice = 100 };
enum {
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaStreamNonBlocking = 1
};

static inline const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaErrorNoDevice ? "no device (host emulation)" : "error (host emulation)";
}
static inline cudaError_t cudaGetDeviceCount(int *n) {
    const char *e = getenv("EPLB_HOST_DEVICES");
    *n = e ? atoi(e) : 2;
    return *n > 0 ? cudaSuccess : cudaErrorNoDevice;
}
/* The allocations, for eplb_host_emul_find. */
#define EPLB_HOST_EMUL_MAX_ALLOCS 4096
static struct {
    void *base;
    size_t size;
    int device;
} emul_allocs[EPLB_HOST_EMUL_MAX_ALLOCS];
static int emul_device;

int eplb_host_emul_sticky;
unsigned eplb_host_emul_peer_copies[8][8];

/* The emulated backend's stream log (eplb_hip_compat.h): "copy", "wait",
 * "record", "open" in the order the streams would run them. */
#define EPLB_HOST_LOG_MAX 8192
typedef struct eplb_host_log_entry {
    char what[8];
    int device;
    const void *event;
} eplb_host_log_entry;
eplb_host_log_entry eplb_host_emul_log_entries[EPLB_HOST_LOG_MAX];
unsigned eplb_host_emul_log_len;
void eplb_host_emul_log(const char *what, int device, const void *event);
void eplb_host_emul_log(const char *what, int device, const void *event) {
    if (eplb_host_emul_log_len >= EPLB_HOST_LOG_MAX)
        return;
    eplb_host_log_entry *e = &eplb_host_emul_log_entries[eplb_host_emul_log_len++];
    snprintf(e->what, sizeof e->what, "%s", what);
    e->device = device;
    e->event = event;
}
/* Nonzero when p lies in a block cudaMalloc returned: its base, size, device. */
int eplb_host_emul_find(const void *p, void **base, size_t *size, int *device);
int eplb_host_emul_find(const void *p, void **base, size_t *size, int *device) {
    const char *c = (const char *)p;
    for (int i = 0; i < EPLB_HOST_EMUL_MAX_ALLOCS; i++) {
        const char *b = (const char *)emul_allocs[i].base;
        if (b && c >= b && c < b + emul_allocs[i].size) {
            *base = emul_allocs[i].base;
            *size = emul_allocs[i].size;
            *device = emul_allocs[i].device;
            return 1;
        }
    }
    return 0;
}

static inline cudaError_t cudaSetDevice(int d) {
    if (d < 0)
        return cudaErrorInvalidValue;
    emul_device = d;
    return cudaSuccess;
}
static inline cudaError_t cudaMalloc(void **p, size_t n) {
    *p = aligned_alloc(256, (n + 255) & ~(size_t)255);
    if (!*p)
        return cudaErrorInvalidValue;
    for (int i = 0; i < EPLB_HOST_EMUL_MAX_ALLOCS; i++)
        if (!emul_allocs[i].base) {
            emul_allocs[i].base = *p;
            emul_allocs[i].size = n;
            emul_allocs[i].device = emul_device;
            return cudaSuccess;
        }
    free(*p);
    return cudaErrorInvalidValue;
}
static inline cudaError_t cudaFree(void *p) {
    for (int i = 0; p && i < EPLB_HOST_EMUL_MAX_ALLOCS; i++)
        if (emul_allocs[i].base == p)
            emul_allocs[i].base = NULL;
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMemset(void *p, int v, size_t n) {
    memset(p, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, int kind) {
    (void)kind;
    memcpy(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, int kind,
                                          cudaStream_t st) {
    (void)kind;
    (void)st;
    memcpy(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    (void)f;
    *s = malloc(1);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    (void)s;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    free(s);
    return cudaSuccess;
}
/* A handle that holds the pointer: only meaningful inside one process. */
static inline cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t *h, void *p) {
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &p, sizeof p);
    return cudaSuccess;
}

#endif
