/* cuda_runtime_api.h (host emulation) -- the few CUDA runtime calls
 * device_check.c uses, on host memory, so that device_check runs against the
 * hip backend built with -DEPLB_HIP_ON_HOST on a machine without a GPU
 * (gpu/tests/host-emulation-check.sh).  Not a CUDA implementation: "device"
 * memory is malloc'd, copies are memcpy, streams do nothing. */
#ifndef EPLB_HOST_EMUL_CUDA_RUNTIME_API_H
#define EPLB_HOST_EMUL_CUDA_RUNTIME_API_H

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
static inline cudaError_t cudaSetDevice(int d) { return d >= 0 ? cudaSuccess : cudaErrorInvalidValue; }
static inline cudaError_t cudaMalloc(void **p, size_t n) {
    *p = aligned_alloc(256, (n + 255) & ~(size_t)255);
    return *p ? cudaSuccess : cudaErrorInvalidValue;
}
static inline cudaError_t cudaFree(void *p) {
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
