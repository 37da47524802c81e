/* eplb_hip_compat.h -- every HIP/CUDA difference of the hip backend, in one
 * place.
 *
 * Built by hipcc (ROCm or Debian's hipcc 5.2): the real HIP API.
 * Built by nvcc -x cu -DEPLB_HIP_ON_CUDA: the few hip* names the backend
 * uses are mapped to the CUDA runtime here.  HIP's own hip/nvidia_detail
 * headers are not used: those of HIP 5.2 do not compile with CUDA 13
 * (removed texture references, changed APIs).  That is how the same kernels
 * run on an NVIDIA machine that has CUDA but no HIP packages.
 *
 * Built by a C++ compiler with -DEPLB_HIP_ON_HOST (tests only, machines
 * without a GPU): "device" memory is host memory, copies are memcpy, a
 * kernel launch runs every block and thread one after another on the CPU,
 * and $EPLB_HOST_DEVICES (default 2) pretend devices exist, of which only
 * the pairs (0,1), (2,3), ... have peer access (so both the kernel path and
 * the hipMemcpyPeerAsync fallback run).  An IPC handle holds a pointer.
 * gpu/tests/host-emulation-check.sh uses it to run device_check here.
 *
 * Also here, the same in every build: EPLB_LAUNCH (kernel launch syntax),
 * EPLB_API ("hip" or "cuda": the backend's name, its IPC kind and the prefix
 * of the runtime calls its messages name), eplb_mem_range (the allocation a
 * device pointer lies in; CUDA's runtime has no such call, so on CUDA the
 * driver's cuMemGetAddressRange_v2 is looked up in libcuda.so.1 at run time:
 * nothing links against the driver library), eplb_no_device_hint (a no-device
 * error in an operator's words), eplb_ptr_device (which device
 * memory a pointer is, from the runtime's pointer attributes), eplb_sm_count
 * (multiprocessors, to size the copy grid), eplb_error_sticky (errors
 * after which the process's GPU context is unusable) and eplb_ctx_active
 * (does this process already have a context on a device: the backend
 * restores the caller's current device only then, since setting a device
 * creates its context on CUDA 12 and HIP).
 *
 * Host emulation also emulates what a test needs to see through: with
 * -DEPLB_HIP_ON_HOST_AS_CUDA it builds the "cuda" flavour (its symbol, name
 * and IPC kind); the test executable (linked -rdynamic) may export
 *   eplb_host_emul_find(ptr, &base, &size, &device)  its allocations, for
 *       eplb_mem_range and eplb_ptr_device (absent: "not supported");
 *   int eplb_host_emul_sticky  nonzero: every stream synchronize and
 *       hipGetLastError answer hipErrorIllegalAddress (a sticky fault);
 *   unsigned eplb_host_emul_peer_copies[8][8]  hipMemcpyPeerAsync calls per
 *       (source, destination) device;
 *   void eplb_host_emul_log(what, device, event)  called for every "copy"
 *       (a kernel launch or a peer copy; event NULL), "wait" (a stream
 *       waits; event: the origin the handle named), "record" (event: the
 *       event recorded), "open" (an IPC event handle opened; event: its
 *       origin) and "set" (hipSetDevice), device being the current one: the order in which
 *       a test sees waits, copies and records is the order of the streams;
 * and $EPLB_HOST_PEER_FAIL="a>b" makes enabling peer access a -> b fail. */
#ifndef EPLB_HIP_COMPAT_H
#define EPLB_HIP_COMPAT_H

#include <stddef.h>
#include <stdint.h>

#ifdef EPLB_HIP_ON_CUDA

#include <cuda_runtime.h>
#include <dlfcn.h>

typedef cudaError_t hipError_t;
typedef cudaStream_t hipStream_t;
typedef cudaIpcMemHandle_t hipIpcMemHandle_t;
typedef cudaEvent_t hipEvent_t;
typedef cudaIpcEventHandle_t hipIpcEventHandle_t;

#define hipSuccess cudaSuccess
#define hipErrorNoDevice cudaErrorNoDevice
#define hipErrorNotSupported cudaErrorNotSupported
#define hipErrorPeerAccessAlreadyEnabled cudaErrorPeerAccessAlreadyEnabled
#define hipGetErrorString cudaGetErrorString
#define hipGetErrorName cudaGetErrorName
#define hipGetLastError cudaGetLastError
#define hipGetDeviceCount cudaGetDeviceCount
#define hipGetDevice cudaGetDevice
#define hipSetDevice cudaSetDevice
#define hipMalloc cudaMalloc
#define hipFree cudaFree
#define hipMemcpyAsync cudaMemcpyAsync
#define hipMemcpyHostToDevice cudaMemcpyHostToDevice
#define hipMemcpyPeerAsync cudaMemcpyPeerAsync
#define hipStreamCreateWithFlags cudaStreamCreateWithFlags
#define hipStreamNonBlocking cudaStreamNonBlocking
#define hipStreamSynchronize cudaStreamSynchronize
#define hipStreamDestroy cudaStreamDestroy
#define hipIpcOpenMemHandle cudaIpcOpenMemHandle
#define hipIpcCloseMemHandle cudaIpcCloseMemHandle
#define hipIpcMemLazyEnablePeerAccess cudaIpcMemLazyEnablePeerAccess
#define hipDeviceCanAccessPeer cudaDeviceCanAccessPeer
#define hipDeviceEnablePeerAccess cudaDeviceEnablePeerAccess
#define hipErrorIllegalAddress cudaErrorIllegalAddress
#define hipEventCreateWithFlags cudaEventCreateWithFlags
#define hipEventDisableTiming cudaEventDisableTiming
#define hipEventInterprocess cudaEventInterprocess
#define hipEventRecord cudaEventRecord
#define hipEventDestroy cudaEventDestroy
#define hipStreamWaitEvent cudaStreamWaitEvent
#define hipIpcGetEventHandle cudaIpcGetEventHandle
#define hipIpcOpenEventHandle cudaIpcOpenEventHandle

#define EPLB_API "cuda"
#define EPLB_IPC_KIND EPLB_BUFFERS_CUDA_IPC
#define EPLB_GET_OPS eplb_backend_cuda_get_ops

#define EPLB_LAUNCH(kernel, grid, block, shmem, stream, ...)                                      \
    kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__)

static inline hipError_t eplb_sm_count(int device, int *n) {
    return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, device);
}

/* *is_device: ptr is device memory (cudaMalloc'd or IPC-mapped); *device:
 * whose.  Host and unregistered pointers succeed with *is_device false. */
static inline hipError_t eplb_ptr_device(const void *ptr, bool *is_device, int *device) {
    cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, ptr);
    if (e != cudaSuccess)
        return e;
    *is_device = a.type == cudaMemoryTypeDevice;
    *device = a.device;
    return cudaSuccess;
}

/* Why the runtime sees no device, in words an operator acts on: cudart
 * reports a machine without the NVIDIA driver as "driver version is
 * insufficient", which reads like an upgrade is due.  NULL: the runtime's
 * own message says it. */
static inline const char *eplb_no_device_hint(hipError_t e) {
    if (e != cudaErrorInsufficientDriver)
        return NULL;
    void *h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h)
        h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    return h ? NULL : "no NVIDIA driver here (libcuda.so.1 not found)";
}

/* Errors that poison the context: every later call of the process fails the
 * same way (CUDA runtime docs, "sticky" errors). */
static inline bool eplb_error_sticky(hipError_t e) {
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorMisalignedAddress:
    case cudaErrorIllegalInstruction:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorLaunchTimeout:
        return true;
    default:
        return false;
    }
}

/* Has this process a primary context on device (the driver's
 * cuDevicePrimaryCtxGetState, looked up at run time like cuMemGetAddressRange)?
 * Unknown (no driver entry point): true, so callers keep the old behaviour. */
static inline bool eplb_ctx_active(int device) {
    typedef int (*get_fn)(int *, int);
    typedef int (*state_fn)(int, unsigned *, int *);
    static get_fn get;
    static state_fn state;
    static int looked;
    if (!looked) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (!h)
            h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (h) {
            get = (get_fn)dlsym(h, "cuDeviceGet");
            state = (state_fn)dlsym(h, "cuDevicePrimaryCtxGetState");
        }
        looked = 1;
    }
    int dev = 0, active = 1;
    unsigned flags = 0;
    if (!get || !state || get(&dev, device) != 0 || state(dev, &flags, &active) != 0)
        return true;
    return active != 0;
}

/* The allocation containing ptr: base and size.  hipErrorNotSupported when
 * the driver entry point cannot be found (then callers trust the declared
 * size).  Needs the device's primary context current (any runtime call on
 * the device after cudaSetDevice makes it so). */
static inline hipError_t eplb_mem_range(void *ptr, void **base, size_t *size) {
    typedef int (*range_fn)(unsigned long long *, size_t *, unsigned long long);
    static range_fn fn;
    static int looked;
    if (!looked) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (!h)
            h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (h)
            fn = (range_fn)dlsym(h, "cuMemGetAddressRange_v2");
        looked = 1;
    }
    if (!fn)
        return hipErrorNotSupported;
    unsigned long long b = 0;
    int rc = fn(&b, size, (unsigned long long)(uintptr_t)ptr);
    if (rc != 0) /* CUDA_SUCCESS */
        return cudaErrorInvalidValue;
    *base = (void *)(uintptr_t)b;
    return hipSuccess;
}

#elif defined(EPLB_HIP_ON_HOST)

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>

typedef int hipError_t;
typedef struct eplb_host_stream *hipStream_t;
typedef struct {
    char reserved[64];
} hipIpcMemHandle_t;
typedef struct {
    char reserved[64];
} hipIpcEventHandle_t;
/* An emulated event: a counter of records.  Its IPC handle is the 8 bytes
 * "eplbevt" NUL, then a pointer naming the event (for one we export: the
 * event itself; a test makes the engine's handles the same way); anything
 * else does not open, as a garbage handle does not on a GPU. */
struct eplb_host_event {
    unsigned flags;
    int device;
    const void *origin; /* opened from a handle: what it named; else NULL */
    unsigned long records;
};
typedef struct eplb_host_event *hipEvent_t;
#define EPLB_HOST_EVENT_MAGIC "eplbevt"
enum {
    hipSuccess = 0,
    hipErrorInvalidValue = 1,
    hipErrorNoDevice = 100,
    hipErrorInvalidDevice = 101,
    hipErrorPeerAccessUnsupported = 217,
    hipErrorIllegalAddress = 700,
    hipErrorPeerAccessAlreadyEnabled = 704,
    hipErrorNotSupported = 801
};
enum { hipMemcpyHostToDevice = 1, hipStreamNonBlocking = 1, hipIpcMemLazyEnablePeerAccess = 1 };
enum { hipEventDisableTiming = 2, hipEventInterprocess = 4 };

#ifdef EPLB_HIP_ON_HOST_AS_CUDA
#define EPLB_API "cuda"
#define EPLB_IPC_KIND EPLB_BUFFERS_CUDA_IPC
#define EPLB_GET_OPS eplb_backend_cuda_get_ops
#else
#define EPLB_API "hip"
#define EPLB_IPC_KIND EPLB_BUFFERS_HIP_IPC
#define EPLB_GET_OPS eplb_backend_hip_get_ops
#endif

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
    unsigned x, y, z, w;
};
static dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __launch_bounds__(n)

/* What the test executable exports (see the head comment); looked up once. */
struct eplb_host_hooks {
    int (*find)(const void *, void **, size_t *, int *);
    int *sticky;
    unsigned (*peer_copies)[8];
    void (*log)(const char *, int, const void *);
};
static inline const eplb_host_hooks &eplb_host_hooks_get(void) {
    static eplb_host_hooks h;
    static bool looked;
    if (!looked) {
        h.find = (int (*)(const void *, void **, size_t *, int *))dlsym(RTLD_DEFAULT,
                                                                         "eplb_host_emul_find");
        h.sticky = (int *)dlsym(RTLD_DEFAULT, "eplb_host_emul_sticky");
        h.peer_copies = (unsigned (*)[8])dlsym(RTLD_DEFAULT, "eplb_host_emul_peer_copies");
        h.log = (void (*)(const char *, int, const void *))dlsym(RTLD_DEFAULT, "eplb_host_emul_log");
        looked = true;
    }
    return h;
}
static inline bool eplb_host_dead(void) {
    const eplb_host_hooks &h = eplb_host_hooks_get();
    return h.sticky && *h.sticky;
}

static int eplb_host_device;
/* Devices this process has set (a context exists from then on, as on CUDA
 * 12): eplb_ctx_active. */
static bool eplb_host_ctx[64];
static inline bool eplb_ctx_active(int device) {
    return device >= 0 && device < 64 && eplb_host_ctx[device];
}
static inline void eplb_host_log(const char *what, const void *event) {
    const eplb_host_hooks &h = eplb_host_hooks_get();
    if (h.log)
        h.log(what, eplb_host_device, event);
}
static inline int eplb_host_devices(void) {
    const char *e = getenv("EPLB_HOST_DEVICES");
    int n = e ? atoi(e) : 2;
    return n < 0 ? 0 : n;
}
static inline const char *hipGetErrorString(hipError_t e) {
    return e == hipErrorNoDevice           ? "no device (host emulation)"
           : e == hipErrorIllegalAddress   ? "an illegal memory access was encountered (host emulation)"
           : e == hipErrorPeerAccessUnsupported ? "peer access is not supported (host emulation)"
                                           : "error (host emulation)";
}
static inline hipError_t hipGetLastError(void) {
    return eplb_host_dead() ? hipErrorIllegalAddress : hipSuccess;
}
static inline hipError_t hipGetDeviceCount(int *n) {
    *n = eplb_host_devices();
    return *n > 0 ? hipSuccess : hipErrorNoDevice;
}
static inline hipError_t hipGetDevice(int *d) {
    *d = eplb_host_device;
    return hipSuccess;
}
static inline hipError_t hipSetDevice(int d) {
    if (d < 0 || d >= eplb_host_devices())
        return hipErrorInvalidDevice;
    eplb_host_device = d;
    if (d < 64)
        eplb_host_ctx[d] = true;
    eplb_host_log("set", NULL);
    return hipSuccess;
}
static inline hipError_t hipMalloc(void **p, size_t n) {
    *p = aligned_alloc(256, (n + 255) & ~(size_t)255);
    return *p ? hipSuccess : hipErrorInvalidValue;
}
static inline hipError_t hipFree(void *p) {
    free(p);
    return hipSuccess;
}
static inline hipError_t hipMemcpyAsync(void *d, const void *s, size_t n, int, hipStream_t) {
    memcpy(d, s, n);
    return hipSuccess;
}
static inline hipError_t hipMemcpyPeerAsync(void *d, int dd, const void *s, int sd, size_t n,
                                            hipStream_t) {
    const eplb_host_hooks &h = eplb_host_hooks_get();
    if (h.peer_copies && sd >= 0 && sd < 8 && dd >= 0 && dd < 8)
        h.peer_copies[sd][dd]++;
    eplb_host_log("copy", NULL);
    memcpy(d, s, n);
    return hipSuccess;
}
static inline hipError_t hipStreamCreateWithFlags(hipStream_t *s, unsigned) {
    *s = reinterpret_cast<hipStream_t>(malloc(1));
    return *s ? hipSuccess : hipErrorInvalidValue;
}
static inline hipError_t hipStreamSynchronize(hipStream_t) {
    return eplb_host_dead() ? hipErrorIllegalAddress : hipSuccess;
}
static inline hipError_t hipStreamDestroy(hipStream_t s) {
    free(s);
    return hipSuccess;
}
static inline hipError_t hipIpcOpenMemHandle(void **p, hipIpcMemHandle_t h, unsigned) {
    memcpy(p, h.reserved, sizeof *p);
    return *p ? hipSuccess : hipErrorInvalidValue;
}
static inline hipError_t hipIpcCloseMemHandle(void *) { return hipSuccess; }
static inline hipError_t hipDeviceCanAccessPeer(int *can, int a, int b) {
    *can = (a ^ b) == 1;
    return hipSuccess;
}
static inline hipError_t hipEventCreateWithFlags(hipEvent_t *ev, unsigned flags) {
    *ev = static_cast<hipEvent_t>(calloc(1, sizeof(eplb_host_event)));
    if (!*ev)
        return hipErrorInvalidValue;
    (*ev)->flags = flags;
    (*ev)->device = eplb_host_device;
    return hipSuccess;
}
static inline hipError_t hipEventDestroy(hipEvent_t ev) {
    free(ev);
    return hipSuccess;
}
/* The stream's work runs at the call (copies are synchronous here), so a
 * record counts and is logged in stream order. */
static inline hipError_t hipEventRecord(hipEvent_t ev, hipStream_t) {
    if (!ev)
        return hipErrorInvalidValue;
    if (eplb_host_dead())
        return hipErrorIllegalAddress;
    ev->records++;
    eplb_host_log("record", ev);
    return hipSuccess;
}
static inline hipError_t hipStreamWaitEvent(hipStream_t, hipEvent_t ev, unsigned) {
    if (!ev)
        return hipErrorInvalidValue;
    if (eplb_host_dead())
        return hipErrorIllegalAddress;
    eplb_host_log("wait", ev->origin ? ev->origin : ev);
    return hipSuccess;
}
/* As CUDA: only an event created interprocess (and without timing) has a
 * handle. */
static inline hipError_t hipIpcGetEventHandle(hipIpcEventHandle_t *h, hipEvent_t ev) {
    if (!ev || !(ev->flags & hipEventInterprocess) || !(ev->flags & hipEventDisableTiming))
        return hipErrorInvalidValue;
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, EPLB_HOST_EVENT_MAGIC, 8);
    memcpy(h->reserved + 8, &ev, sizeof ev);
    return hipSuccess;
}
static inline hipError_t hipIpcOpenEventHandle(hipEvent_t *ev, hipIpcEventHandle_t h) {
    const void *origin = NULL;
    memcpy(&origin, h.reserved + 8, sizeof origin);
    if (memcmp(h.reserved, EPLB_HOST_EVENT_MAGIC, 8) != 0 || !origin)
        return hipErrorInvalidValue;
    hipError_t e = hipEventCreateWithFlags(ev, hipEventInterprocess | hipEventDisableTiming);
    if (e == hipSuccess) {
        (*ev)->origin = origin;
        eplb_host_log("open", origin);
    }
    return e;
}
/* Fails for the pair $EPLB_HOST_PEER_FAIL names ("a>b"), as a driver may
 * for one link. */
static inline hipError_t hipDeviceEnablePeerAccess(int peer, unsigned) {
    const char *e = getenv("EPLB_HOST_PEER_FAIL");
    int a = -1, b = -1;
    if (e && sscanf(e, "%d>%d", &a, &b) == 2 && a == eplb_host_device && b == peer)
        return hipErrorPeerAccessUnsupported;
    return hipSuccess;
}

#define EPLB_LAUNCH(kernel, grid, block, shmem, stream, ...)                                      \
    do {                                                                                          \
        (void)(shmem);                                                                            \
        (void)(stream);                                                                           \
        gridDim = (grid);                                                                         \
        blockDim = (block);                                                                       \
        eplb_host_log("copy", NULL);                                                              \
        for (unsigned b_ = 0; b_ < gridDim.x; b_++)                                               \
            for (unsigned t_ = 0; t_ < blockDim.x; t_++) {                                        \
                blockIdx = dim3(b_);                                                              \
                threadIdx = dim3(t_);                                                             \
                kernel(__VA_ARGS__);                                                              \
            }                                                                                     \
    } while (0)

/* 2 "multiprocessors": a few blocks per launch, so the work split runs. */
static inline hipError_t eplb_sm_count(int, int *n) {
    *n = 2;
    return hipSuccess;
}

static inline hipError_t eplb_mem_range(void *ptr, void **base, size_t *size) {
    const eplb_host_hooks &h = eplb_host_hooks_get();
    int device;
    if (!h.find)
        return hipErrorNotSupported;
    return h.find(ptr, base, size, &device) ? hipSuccess : hipErrorInvalidValue;
}

static inline hipError_t eplb_ptr_device(const void *ptr, bool *is_device, int *device) {
    const eplb_host_hooks &h = eplb_host_hooks_get();
    void *base;
    size_t size;
    if (!h.find)
        return hipErrorNotSupported;
    *is_device = h.find(ptr, &base, &size, device) != 0;
    return hipSuccess;
}

static inline bool eplb_error_sticky(hipError_t e) { return e == hipErrorIllegalAddress; }
static inline const char *eplb_no_device_hint(hipError_t) { return NULL; }

#else /* HIP */

#include <hip/hip_runtime.h>

#define EPLB_API "hip"
#define EPLB_IPC_KIND EPLB_BUFFERS_HIP_IPC
#define EPLB_GET_OPS eplb_backend_hip_get_ops

#define EPLB_LAUNCH(kernel, grid, block, shmem, stream, ...)                                      \
    hipLaunchKernelGGL(kernel, (grid), (block), (shmem), (stream), __VA_ARGS__)

static inline hipError_t eplb_sm_count(int device, int *n) {
    return hipDeviceGetAttribute(n, hipDeviceAttributeMultiprocessorCount, device);
}

/* ROCm 6 renamed hipPointerAttribute_t's memoryType to type. */
static inline hipError_t eplb_ptr_device(const void *ptr, bool *is_device, int *device) {
    hipPointerAttribute_t a;
    hipError_t e = hipPointerGetAttributes(&a, ptr);
    if (e != hipSuccess)
        return e;
#if HIP_VERSION_MAJOR >= 6
    *is_device = a.type == hipMemoryTypeDevice;
#else
    *is_device = a.memoryType == hipMemoryTypeDevice;
#endif
    *device = a.device;
    return hipSuccess;
}

/* Has this process a primary context on device?  Unknown: true. */
static inline bool eplb_ctx_active(int device) {
    hipDevice_t dev = 0;
    unsigned flags = 0;
    int active = 1;
    if (hipDeviceGet(&dev, device) != hipSuccess ||
        hipDevicePrimaryCtxGetState(dev, &flags, &active) != hipSuccess) {
        (void)hipGetLastError();
        return true;
    }
    return active != 0;
}

/* hipErrorNoDevice says it plainly. */
static inline const char *eplb_no_device_hint(hipError_t) { return NULL; }

/* Errors after which the device's queues are unusable for this process. */
static inline bool eplb_error_sticky(hipError_t e) {
    switch (e) {
    case hipErrorIllegalAddress:
    case hipErrorLaunchFailure:
    case hipErrorAssert:
    case hipErrorECCNotCorrectable:
    case hipErrorLaunchTimeOut:
        return true;
    default:
        return false;
    }
}

static inline hipError_t eplb_mem_range(void *ptr, void **base, size_t *size) {
    hipDeviceptr_t b = 0;
    hipError_t e = hipMemGetAddressRange(&b, size, (hipDeviceptr_t)ptr);
    if (e == hipSuccess)
        *base = (void *)b;
    return e;
}

#endif

#endif
