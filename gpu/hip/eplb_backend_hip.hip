/* eplb_backend_hip.hip -- the hip and cuda backends: execute transfer plans
 * on the engine's own device buffers with one batched copy kernel per device.
 *
 * One source, three builds (eplb_hip_compat.h holds every difference):
 *   hipcc                           -> libeplb_backend_hip.so, backend "hip",
 *                                      HIP_IPC + DEVICE_PTR descriptions;
 *   nvcc -x cu -DEPLB_HIP_ON_CUDA   -> libeplb_backend_cuda.so, backend
 *                                      "cuda", CUDA_IPC + DEVICE_PTR;
 *   g++ -DEPLB_HIP_ON_HOST          -> the host emulation the tests run
 *                                      without a GPU.
 * Loaded with dlopen by gpu/eplb_backend.c; exports one symbol
 * (eplb_backend_hip_get_ops or eplb_backend_cuda_get_ops) and links nothing
 * from the executable.  Every runtime call is checked and turned into an
 * eplb_status with a message naming the call; nothing here exits or aborts.
 *
 * Open: every region of every held rank (ABI 3: a rank has a list of
 * regions, each tensor layout names its region) is mapped -- IPC handles
 * opened one by one, device pointers taken as given -- and checked against
 * the runtime: the memory must be device memory of the device the
 * description names (pointer attributes), and the declared size must fit in
 * the allocation it lies in (eplb_mem_range).  Either mismatch is
 * EPLB_EINVAL naming ranks[g].regions[r]: a wrong size or device would make
 * the kernels read or write memory the engine never gave us.
 *
 * How a phase runs (gather is phase 1; scatter is phase 2, wave 0 then wave
 * 1 when the plan has one; the loader in gpu/eplb_backend.c only lets a
 * scatter follow a successful gather of the same layer, so nothing here
 * remembers plans):
 *   1. every plan op x every tensor of the layer becomes one copy (src, dst,
 *      bytes), appended to the list of the device that holds the source
 *      ("push": remote stores over xGMI/NVLink are posted writes; a kernel on
 *      the source device reads locally);
 *   2. each device's list is uploaded and copied by one kernel launch on
 *      that device's own stream.  The grid is sized from the device's
 *      multiprocessor count, and the list's bytes are cut into equal
 *      per-block shares, so one 42 MiB expert spreads over the whole GPU as
 *      well as a thousand small scales do.  Each copy takes the 16-byte path
 *      (uint4) when its source, destination and length are multiples of 16,
 *      else the 4-byte path (uint32); validation guarantees multiples of 4;
 *      there is no byte path.  An op between devices without peer access
 *      (none, or enabling it failed for that pair) is a hipMemcpyPeerAsync
 *      on the source device's stream instead;
 *   3. every stream used is synchronized and checked before the next phase:
 *      phase 2 may overwrite slots phase 1 read on other devices, and an
 *      error must be attributed to its phase (eplb_backend.h: phase 1
 *      failure = nothing written, phase 2 failure = scatter again from
 *      staging).
 * A sticky device error (an illegal address, a kernel fault: the runtime
 * fails every later call of the process) marks the backend broken: that
 * call and every later one answer EPLB_EDATALOSS with the reason (saying
 * whether slots may be half written: a scatter was struck), never a retry
 * that pretends to succeed.  EPLB_EDATALOSS even when it struck a gather
 * (no slot written): this process can no longer move the model's weights,
 * so the registry stores NEEDS_RELOAD with the reason and health turns
 * NOT_SERVING for the service (rpc_health.h) -- what an operator must see.
 * Only a new process can move again.
 * Staging is one buffer per device (hipMalloc, kept until close: reserved
 * once at attach by reserve_staging -- then a plan needing more is refused,
 * never a reallocation mid-rebalance; unreserved, grown as needed), holding the entries of every held rank on that device, each on
 * the device of the rank that unstages it.  Several ranks may share a
 * device (tests); state per device (stream, copy list, staging) is shared
 * by them.
 *
 * Events (ABI 4, docs/api.md "Ordering with the engine's GPU streams"):
 * wait_event opens the engine's interprocess event (kept, per handle bytes,
 * up to kMaxWaitEvents; then the oldest is destroyed -- safe even with a
 * wait still queued on it, the runtime frees it once unused) and makes
 * every device's copy stream wait for it: the copies queued after it run
 * only once the engine's stream has passed its record, and the host never
 * blocks on the engine.  record_event records a join event on every other
 * device's stream, makes the first device's stream wait for them, then
 * records the one exported event (interprocess, no timing, created on the
 * first device at first use; its handle never changes, so an engine opens
 * it once) there: it completes after the last copy on any device.  Both
 * phases still synchronize their streams before returning (the commit
 * protocol needs the host to know the bytes moved), so today the done event
 * is complete when the answer leaves; an engine that waits on it stays
 * right if a later version stops synchronizing.  Cost: one stream wait per
 * device per rebalance, and one record per device plus (devices - 1)
 * cross-device waits. */
#include "eplb_hip_compat.h"

extern "C" {
#include "eplb_backend_impl.h"
}

namespace {

constexpr unsigned kThreads = 512;
/* 4 x 512 threads per multiprocessor: the most resident threads on sm_80 /
 * sm_90 (2048) and on CDNA CUs; more blocks would only queue. */
constexpr unsigned kBlocksPerSM = 4;
/* Smallest share of one block: below this a block's start costs more than
 * its copy, so small lists launch fewer blocks. */
constexpr uint64_t kMinBlockBytes = 64u << 10;
/* Engine events kept open at once: an engine records into one event per
 * stream (a few); more distinct handles than this and the oldest is closed. */
constexpr uint32_t kMaxWaitEvents = 8;

struct CopyDesc {
    const uint8_t *src;
    uint8_t *dst;
    uint64_t bytes; /* multiple of 4 */
    uint64_t start; /* where it starts in the launch's byte stream; multiple of 16 */
};

/* 4 loads in flight per thread before the stores: enough to cover HBM
 * latency at full occupancy. */
template <typename W>
__device__ inline void copy_words(const W *__restrict__ s, W *__restrict__ t, uint64_t n) {
    const uint64_t step = blockDim.x;
    uint64_t i = threadIdx.x;
    for (; i + 3 * step < n; i += 4 * step) {
        W a = s[i], b = s[i + step], e = s[i + 2 * step], f = s[i + 3 * step];
        t[i] = a;
        t[i + step] = b;
        t[i + 2 * step] = e;
        t[i + 3 * step] = f;
    }
    for (; i < n; i += step)
        t[i] = s[i];
}

/* descs: [n] copies laid end to end in a byte stream of `total` bytes (each
 * start rounded up to 16).  Block b copies stream bytes [b * share,
 * (b + 1) * share): it finds the copy it starts in by binary search and
 * walks on.  share and every start are multiples of 16, so a block's piece
 * of a copy starts 16-aligned and ends 16-aligned or at the copy's end. */
__global__ void __launch_bounds__(kThreads)
    eplb_copy_kernel(const CopyDesc *__restrict__ descs, uint32_t n, uint64_t total,
                     uint64_t share) {
    const uint64_t lo = (uint64_t)blockIdx.x * share;
    if (lo >= total)
        return;
    const uint64_t hi = total - lo < share ? total : lo + share;
    uint32_t a = 0, b = n; /* the last copy with start <= lo */
    while (b - a > 1) {
        uint32_t m = a + (b - a) / 2;
        if (descs[m].start <= lo)
            a = m;
        else
            b = m;
    }
    for (uint32_t c = a; c < n; c++) {
        const CopyDesc d = descs[c];
        if (d.start >= hi)
            break;
        const uint64_t from = lo > d.start ? lo - d.start : 0;
        const uint64_t to = hi - d.start < d.bytes ? hi - d.start : d.bytes;
        if (from >= to)
            continue; /* the block's range falls in this copy's padding */
        if ((((uintptr_t)d.src | (uintptr_t)d.dst | d.bytes) & 15) == 0)
            copy_words(reinterpret_cast<const uint4 *>(d.src + from),
                       reinterpret_cast<uint4 *>(d.dst + from), (to - from) / 16);
        else
            copy_words(reinterpret_cast<const uint32_t *>(d.src + from),
                       reinterpret_cast<uint32_t *>(d.dst + from), (to - from) / 4);
    }
}

struct Device {
    int ordinal;
    unsigned max_grid;   /* multiprocessors x kBlocksPerSM */
    hipStream_t stream;
    CopyDesc *d_descs;   /* device copy of the copy list */
    size_t d_cap;        /* copies d_descs holds */
    CopyDesc *h_descs;   /* host copy list being built */
    size_t h_len, h_cap;
    uint64_t h_total;    /* stream bytes of h_descs */
    bool used;           /* has work in the current phase */
    uint8_t *staging;    /* entries of the held ranks on this device */
    size_t staging_cap;
    hipEvent_t join;     /* record_event: this stream's work, for the first device to wait on */
};

/* An engine event opened from its IPC handle (wait_event). */
struct WaitEvent {
    uint8_t handle[EPLB_EVENT_HANDLE_SIZE];
    hipEvent_t ev;
};

struct Mapping {
    uint8_t *base;       /* the region, mapped */
    bool ipc;            /* opened with hipIpcOpenMemHandle: close it */
};

struct HipState {
    eplb_layout lay;
    eplb_backend_env env;
    Device *devs;        /* [ndev] distinct ordinals */
    uint32_t ndev;
    Mapping *maps;       /* [lay.M] */
    uint32_t *rank_dev;  /* [G] held rank -> index into devs */
    uint64_t *stage_off; /* [G] held rank's first staging byte on its device (this plan) */
    bool *peer;          /* [ndev][ndev]: a's kernels may touch b's memory */
    WaitEvent waits[kMaxWaitEvents];
    uint32_t nwaits, wait_next; /* filled entries; the one to replace next */
    hipEvent_t done;     /* the exported event, on devs[0] (record_event) */
    bool reserved;       /* staging reserved at attach: never reallocated */
    uint8_t done_handle[EPLB_EVENT_HANDLE_SIZE];
    /* Set by a sticky error: every later call answers broken_code + msg. */
    eplb_status broken_code;
    char broken_msg[EPLB_ERROR_MSG_MAX];
};

/* ---- error handling ---------------------------------------------------- */

/* The runtime call's name as this build calls it: "hipSetDevice(...)" reads
 * "cudaSetDevice(...)" in the cuda backend. */
#define HIP_CHECK(call, code, label)                                                              \
    do {                                                                                          \
        hipError_t e_ = (call);                                                                   \
        if (e_ != hipSuccess) {                                                                   \
            st = eplb_impl_error(err, (code), "%s%s: %s", EPLB_API, &(#call)[3],                 \
                                 hipGetErrorString(e_));                                          \
            goto label;                                                                           \
        }                                                                                         \
    } while (0)

/* Restores the caller's current device (an engine may embed us) -- only
 * when the process has a context there: hipGetDevice answers 0 in a process
 * that never chose one, and setting device 0 back would create a context
 * (hundreds of MiB) on a GPU the model may not use. */
struct DeviceGuard {
    int saved = -1;
    DeviceGuard() {
        if (hipGetDevice(&saved) != hipSuccess || !eplb_ctx_active(saved))
            saved = -1;
    }
    ~DeviceGuard() {
        if (saved >= 0)
            (void)hipSetDevice(saved);
    }
};

eplb_status broken(const HipState *hs, eplb_error *err) {
    return eplb_impl_error(err, hs->broken_code, "%s", hs->broken_msg);
}

/* After a failed runtime call: a sticky error breaks the backend for good.
 * Besides the codes the runtime documents as sticky, an error that a
 * hipGetLastError does not clear (asked twice) is treated as sticky too. */
void note_sticky(HipState *hs, hipError_t e, eplb_status code, const char *what) {
    (void)hipGetLastError();
    if (!eplb_error_sticky(e) && hipGetLastError() == hipSuccess)
        return;
    if (hs->broken_code != EPLB_OK)
        return;
    hs->broken_code = EPLB_EDATALOSS; /* whatever phase: see the head comment */
    snprintf(hs->broken_msg, sizeof hs->broken_msg,
             "%s backend broken by a sticky device error (%s: %s): this process can no longer "
             "use the GPU; restart eplbd%s",
             EPLB_API, what, hipGetErrorString(e),
             code == EPLB_EDATALOSS ? "; slots of the layer being scattered may be half written"
                                    : "");
}

/* ---- probe / open / close ---------------------------------------------- */

eplb_status hip_probe(uint32_t *num_devices, eplb_error *err) {
    int n = 0;
    hipError_t e = hipGetDeviceCount(&n);
    *num_devices = 0;
    if (e != hipSuccess) {
        (void)hipGetLastError();
        const char *hint = eplb_no_device_hint(e);
        return eplb_impl_error(err, EPLB_EUNAVAILABLE, "%sGetDeviceCount: %s", EPLB_API,
                               hint ? hint : hipGetErrorString(e));
    }
    if (n <= 0)
        return eplb_impl_error(err, EPLB_EUNAVAILABLE, "%sGetDeviceCount: no device", EPLB_API);
    *num_devices = (uint32_t)n;
    return EPLB_OK;
}

/* Streams are synchronized and destroyed first, so that no copy still runs
 * when staging is freed and the engine's memory is unmapped under it. */
void hip_close(void *state) {
    HipState *hs = static_cast<HipState *>(state);
    if (!hs)
        return;
    DeviceGuard guard;
    for (uint32_t d = 0; hs->devs && d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        if (!dv->stream || hipSetDevice(dv->ordinal) != hipSuccess)
            continue;
        (void)hipStreamSynchronize(dv->stream);
        (void)hipStreamDestroy(dv->stream);
        dv->stream = nullptr;
    }
    for (uint32_t i = 0; i < hs->nwaits; i++) {
        (void)hipSetDevice(hs->devs[0].ordinal);
        (void)hipEventDestroy(hs->waits[i].ev);
    }
    if (hs->done && hipSetDevice(hs->devs[0].ordinal) == hipSuccess)
        (void)hipEventDestroy(hs->done);
    for (uint32_t d = 0; hs->devs && d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        (void)hipSetDevice(dv->ordinal);
        if (dv->join)
            (void)hipEventDestroy(dv->join);
        if (dv->staging)
            (void)hipFree(dv->staging);
        if (dv->d_descs)
            (void)hipFree(dv->d_descs);
        free(dv->h_descs);
    }
    for (uint32_t m = 0; hs->maps && m < hs->lay.M; m++) {
        if (!hs->maps[m].ipc || !hs->maps[m].base)
            continue;
        (void)hipSetDevice(hs->devs[hs->rank_dev[hs->lay.maps[m].rank]].ordinal);
        (void)hipIpcCloseMemHandle(hs->maps[m].base);
    }
    (void)hipGetLastError();
    free(hs->devs);
    free(hs->maps);
    free(hs->rank_dev);
    free(hs->stage_off);
    free(hs->peer);
    eplb_layout_free(&hs->lay);
    free(hs);
}

/* Map region r of held rank g (mapping m) and check it against the runtime. */
eplb_status open_region(HipState *hs, const eplb_buffers_desc *desc, uint32_t g, uint32_t r,
                        uint32_t m, eplb_error *err) {
    const eplb_region *reg = &desc->ranks[g].regions[r];
    Mapping *mp = &hs->maps[m];
    uint32_t first, count;
    eplb_buffers_held(desc, &first, &count);
    char name[96];
    snprintf(name, sizeof name, "ranks[%u].regions[%u] (rank %u, device %d)", g, r, first + g,
             reg->device);
    if (desc->kind == EPLB_IPC_KIND) {
        hipIpcMemHandle_t h;
        static_assert(sizeof(h) == EPLB_IPC_HANDLE_SIZE, "IPC handle is 64 bytes");
        memcpy(&h, reg->ipc_handle, sizeof h);
        void *p = nullptr;
        hipError_t e = hipIpcOpenMemHandle(&p, h, hipIpcMemLazyEnablePeerAccess);
        if (e != hipSuccess) {
            (void)hipGetLastError();
            return eplb_impl_error(err, EPLB_EINVAL, "%s: %sIpcOpenMemHandle: %s", name, EPLB_API,
                                   hipGetErrorString(e));
        }
        mp->base = static_cast<uint8_t *>(p);
        mp->ipc = true;
    } else {
        mp->base = reinterpret_cast<uint8_t *>(static_cast<uintptr_t>(reg->device_ptr));
        if (reg->device_ptr & 3)
            return eplb_impl_error(err, EPLB_EINVAL, "%s: device_ptr 0x%llx is not 4-byte "
                                   "aligned (the kernels copy 4- or 16-byte words)", name,
                                   (unsigned long long)reg->device_ptr);
    }
    if (reg->size < hs->lay.maps[m].extent)
        return eplb_impl_error(err, EPLB_EINVAL, "%s: size %llu < %llu bytes the layout needs",
                               name, (unsigned long long)reg->size,
                               (unsigned long long)hs->lay.maps[m].extent);
    bool is_device = false;
    int where = -1;
    hipError_t e = eplb_ptr_device(mp->base, &is_device, &where);
    if (e == hipSuccess && (!is_device || where != reg->device)) {
        if (!is_device)
            return eplb_impl_error(err, EPLB_EINVAL, "%s: not device memory (host, managed or "
                                   "unknown to the %s runtime)", name, EPLB_API);
        return eplb_impl_error(err, EPLB_EINVAL, "%s: the memory is on device %d, the "
                               "description says %d", name, where, reg->device);
    }
    if (e != hipSuccess && e != hipErrorNotSupported) {
        (void)hipGetLastError();
        return eplb_impl_error(err, EPLB_EINVAL, "%s: %sPointerGetAttributes: %s (not device "
                               "memory of this process?)", name, EPLB_API, hipGetErrorString(e));
    }
    void *abase = nullptr;
    size_t asize = 0;
    e = eplb_mem_range(mp->base, &abase, &asize);
    if (e == hipSuccess) {
        const uint8_t *ab = static_cast<uint8_t *>(abase);
        uint64_t off = (uint64_t)(mp->base - ab);
        if (mp->base < ab || off > asize || reg->size > asize - off)
            return eplb_impl_error(err, EPLB_EINVAL, "%s: declared size %llu runs past the "
                                   "allocation (%zu bytes, the region starting %llu bytes into "
                                   "it)", name, (unsigned long long)reg->size, asize,
                                   (unsigned long long)off);
    } else if (e != hipErrorNotSupported) {
        (void)hipGetLastError();
        return eplb_impl_error(err, EPLB_EINVAL, "%s: %sMemGetAddressRange: %s (not device "
                               "memory?)", name, EPLB_API, hipGetErrorString(e));
    }
    return EPLB_OK;
}

eplb_status hip_open(const eplb_buffers_desc *desc, uint32_t num_physical,
                     const eplb_backend_env *env, void **state, eplb_error *err) {
    *state = nullptr;
    if (desc->kind != EPLB_IPC_KIND && desc->kind != EPLB_BUFFERS_DEVICE_PTR)
        return eplb_impl_error(err, EPLB_EINVAL, "the %s backend maps %s IPC handles and "
                               "device pointers; this description is of kind %d", EPLB_API,
                               EPLB_API, (int)desc->kind);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    int count = 0;
    HipState *hs = static_cast<HipState *>(calloc(1, sizeof(HipState)));
    if (!hs)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the %s backend",
                               EPLB_API);
    hs->env = *env;
    st = eplb_layout_build(&hs->lay, desc, num_physical, err);
    if (st != EPLB_OK) {
        free(hs);
        return st;
    }
    const uint32_t G = hs->lay.G;
    hs->maps = static_cast<Mapping *>(calloc(hs->lay.M ? hs->lay.M : 1, sizeof(Mapping)));
    hs->rank_dev = static_cast<uint32_t *>(calloc(G ? G : 1, sizeof(uint32_t)));
    hs->stage_off = static_cast<uint64_t *>(calloc(G ? G : 1, sizeof(uint64_t)));
    hs->devs = static_cast<Device *>(calloc(G ? G : 1, sizeof(Device)));
    if (!hs->maps || !hs->rank_dev || !hs->stage_off || !hs->devs) {
        st = eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the %s backend", EPLB_API);
        goto fail;
    }
    HIP_CHECK(hipGetDeviceCount(&count), EPLB_EUNAVAILABLE, fail);

    /* Distinct devices, in order of first use.  A rank is one GPU: its
     * regions all name the same device (staging and the copies it sources
     * run there). */
    for (uint32_t g = 0; g < G; g++) {
        const eplb_rank_buffers *rb = &desc->ranks[g];
        int ord = rb->regions[0].device;
        for (uint32_t r = 0; r < rb->num_regions; r++) {
            if (rb->regions[r].device != ord) {
                st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u].regions[%u].device %d differs "
                                     "from regions[0].device %d: a rank's regions live on its "
                                     "one GPU", g, r, rb->regions[r].device, ord);
                goto fail;
            }
        }
        if (ord < 0 || ord >= count) {
            st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u].regions[0].device %d: this "
                                 "process sees %d device(s)", g, ord, count);
            goto fail;
        }
        uint32_t d = 0;
        while (d < hs->ndev && hs->devs[d].ordinal != ord)
            d++;
        if (d == hs->ndev) {
            hs->devs[d].ordinal = ord;
            hs->ndev++;
        }
        hs->rank_dev[g] = d;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        int sms = 0;
        HIP_CHECK(hipSetDevice(dv->ordinal), EPLB_EINTERNAL, fail);
        hipError_t e = eplb_sm_count(dv->ordinal, &sms);
        if (e != hipSuccess) {
            st = eplb_impl_error(err, EPLB_EINTERNAL, "%s multiprocessor count of device %d: %s",
                                 EPLB_API, dv->ordinal, hipGetErrorString(e));
            goto fail;
        }
        dv->max_grid = (unsigned)(sms > 0 ? sms : 1) * kBlocksPerSM;
        HIP_CHECK(hipStreamCreateWithFlags(&dv->stream, hipStreamNonBlocking), EPLB_EINTERNAL,
                  fail);
    }
    /* Peer access between every pair of distinct devices that allows it.  A
     * pair whose enabling fails (a driver or link refusing it) copies with
     * hipMemcpyPeerAsync instead: slower for that pair, never a failed open. */
    hs->peer = static_cast<bool *>(calloc((size_t)hs->ndev * hs->ndev, sizeof(bool)));
    if (!hs->peer) {
        st = eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the %s backend", EPLB_API);
        goto fail;
    }
    for (uint32_t a = 0; a < hs->ndev; a++) {
        hs->peer[a * hs->ndev + a] = true;
        for (uint32_t b = 0; b < hs->ndev; b++) {
            if (a == b)
                continue;
            int can = 0;
            if (hipDeviceCanAccessPeer(&can, hs->devs[a].ordinal, hs->devs[b].ordinal) !=
                    hipSuccess ||
                !can) {
                (void)hipGetLastError();
                continue;
            }
            HIP_CHECK(hipSetDevice(hs->devs[a].ordinal), EPLB_EINTERNAL, fail);
            hipError_t e = hipDeviceEnablePeerAccess(hs->devs[b].ordinal, 0);
            (void)hipGetLastError(); /* clear "already enabled" or the failure */
            hs->peer[a * hs->ndev + b] = e == hipSuccess || e == hipErrorPeerAccessAlreadyEnabled;
        }
    }
    /* Map every region of every held rank and check it. */
    for (uint32_t m = 0; m < hs->lay.M; m++) {
        uint32_t g = hs->lay.maps[m].rank;
        HIP_CHECK(hipSetDevice(hs->devs[hs->rank_dev[g]].ordinal), EPLB_EINTERNAL, fail);
        st = open_region(hs, desc, g, hs->lay.maps[m].region, m, err);
        if (st != EPLB_OK)
            goto fail;
    }
    *state = hs;
    return EPLB_OK;
fail:
    hip_close(hs);
    return st;
}

/* ---- building and running one phase ----------------------------------- */

eplb_status push_copy(Device *dv, const uint8_t *src, uint8_t *dst, uint64_t bytes,
                      eplb_error *err) {
    if ((((uintptr_t)src | (uintptr_t)dst | bytes) & 3) != 0)
        return eplb_impl_error(err, EPLB_EINTERNAL, "copy of %llu bytes %p -> %p is not 4-byte "
                               "aligned (validation should have refused the layout)",
                               (unsigned long long)bytes, (const void *)src, (void *)dst);
    if (dv->h_len == dv->h_cap) {
        size_t cap = dv->h_cap ? dv->h_cap * 2 : 256;
        CopyDesc *p = static_cast<CopyDesc *>(realloc(dv->h_descs, cap * sizeof(CopyDesc)));
        if (!p)
            return eplb_impl_error(err, EPLB_ENOMEM, "out of memory for %zu copies", cap);
        dv->h_descs = p;
        dv->h_cap = cap;
    }
    CopyDesc &c = dv->h_descs[dv->h_len++];
    c.src = src;
    c.dst = dst;
    c.bytes = bytes;
    c.start = dv->h_total;
    dv->h_total += (bytes + 15) & ~(uint64_t)15;
    dv->used = true;
    return EPLB_OK;
}

/* Adds one copy executed by the source device (exec) into memory of device
 * other: a kernel copy list entry, or a peer memcpy without peer access. */
eplb_status add_copy(HipState *hs, uint32_t exec, uint32_t other, const uint8_t *src,
                     uint8_t *dst, uint64_t bytes, eplb_status fail_code, eplb_error *err) {
    Device *dv = &hs->devs[exec];
    if (hs->peer[exec * hs->ndev + other])
        return push_copy(dv, src, dst, bytes, err);
    eplb_status st = EPLB_OK;
    HIP_CHECK(hipSetDevice(dv->ordinal), fail_code, fail);
    HIP_CHECK(hipMemcpyPeerAsync(dst, hs->devs[other].ordinal, src, dv->ordinal, bytes,
                                 dv->stream),
              fail_code, fail);
    dv->used = true;
fail:
    return st;
}

/* Uploads and launches every device's copy list, then waits for every
 * stream used.  Always waits, even after an error, so that nothing of this
 * phase is still running when the caller returns. */
eplb_status run_lists(HipState *hs, eplb_status fail_code, eplb_error *err) {
    eplb_status st = EPLB_OK;
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        if (dv->h_len == 0 || st != EPLB_OK)
            continue;
        HIP_CHECK(hipSetDevice(dv->ordinal), fail_code, next);
        if (dv->h_len > dv->d_cap) {
            if (dv->d_descs) {
                HIP_CHECK(hipStreamSynchronize(dv->stream), fail_code, next);
                HIP_CHECK(hipFree(dv->d_descs), fail_code, next);
                dv->d_descs = nullptr;
                dv->d_cap = 0;
            }
            HIP_CHECK(hipMalloc(reinterpret_cast<void **>(&dv->d_descs),
                                dv->h_cap * sizeof(CopyDesc)),
                      fail_code, next);
            dv->d_cap = dv->h_cap;
        }
        HIP_CHECK(hipMemcpyAsync(dv->d_descs, dv->h_descs, dv->h_len * sizeof(CopyDesc),
                                 hipMemcpyHostToDevice, dv->stream),
                  fail_code, next);
        {
            /* Equal shares of the stream, 16-byte multiples, at least
             * kMinBlockBytes, at most max_grid blocks. */
            const uint64_t total = dv->h_total;
            uint64_t grid = (total + kMinBlockBytes - 1) / kMinBlockBytes;
            if (grid > dv->max_grid)
                grid = dv->max_grid;
            if (grid == 0)
                grid = 1;
            uint64_t share = ((total + grid - 1) / grid + 15) & ~(uint64_t)15;
            grid = (total + share - 1) / share;
            EPLB_LAUNCH(eplb_copy_kernel, dim3((unsigned)grid), dim3(kThreads), 0, dv->stream,
                        (const CopyDesc *)dv->d_descs, (uint32_t)dv->h_len, total, share);
            hipError_t e = hipGetLastError();
            if (e != hipSuccess) {
                st = eplb_impl_error(err, fail_code, "launching the copy kernel on device %d "
                                     "(%u blocks): %s", dv->ordinal, (unsigned)grid,
                                     hipGetErrorString(e));
                note_sticky(hs, e, fail_code, "kernel launch");
            }
        }
    next:;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        if (dv->used) {
            hipError_t e = hipSetDevice(dv->ordinal);
            if (e == hipSuccess)
                e = hipStreamSynchronize(dv->stream);
            if (e != hipSuccess) {
                if (st == EPLB_OK)
                    st = eplb_impl_error(err, fail_code, "%sStreamSynchronize(device %d): %s",
                                         EPLB_API, dv->ordinal, hipGetErrorString(e));
                note_sticky(hs, e, fail_code, "stream synchronize");
            }
        }
        dv->used = false;
        dv->h_len = 0;
        dv->h_total = 0;
    }
    return st;
}

/* Held index of global rank gpu (the wrapper checked that it is held). */
uint32_t held(const HipState *hs, uint32_t gpu) { return gpu - hs->lay.first_rank; }

uint8_t *slot_ptr(HipState *hs, uint32_t t, uint32_t slot) {
    uint32_t m = 0;
    uint64_t off = eplb_layout_slot_offset(&hs->lay, t, slot, &m);
    return hs->maps[m].base + off;
}

uint8_t *staging_ptr(HipState *hs, const eplb_plan *p, uint32_t layer, uint32_t t, uint32_t k) {
    const eplb_plan_staging &e = p->staging[k];
    uint32_t g = held(hs, e.gpu);
    return hs->devs[hs->rank_dev[g]].staging + hs->stage_off[g] +
           (size_t)e.index * hs->lay.entry_bytes[layer] + hs->lay.tensors[t].stage_offset;
}

/* Lays out the plan's staging entries (stage_off: each held rank's entries
 * after those of the ranks before it on its device) and, for a gather
 * (may_grow), grows each device's buffer to hold them.  Deterministic in the
 * plan, so gather and scatter of one plan agree.  Growing frees the old
 * buffer: safe in a gather, as the previous layer's scatter is over; never
 * in a scatter, whose staging holds the gathered bytes (a scatter whose plan
 * needs more than the gather's is not the same plan: refused). */
eplb_status ensure_staging(HipState *hs, const eplb_plan *p, uint32_t layer, bool may_grow,
                           eplb_error *err) {
    eplb_status st = EPLB_OK;
    const uint32_t G = hs->lay.G;
    const uint64_t eb = hs->lay.entry_bytes[layer];
    uint64_t *count = hs->stage_off; /* entries per held rank, then offsets */
    memset(count, 0, (size_t)G * sizeof *count);
    for (uint32_t k = 0; k < p->num_staging; k++) {
        const eplb_plan_staging &e = p->staging[k];
        if (e.gpu < hs->lay.first_rank || e.gpu - hs->lay.first_rank >= G)
            return eplb_impl_error(err, EPLB_EINVAL, "staging[%u] on rank %u, not held here", k,
                                   e.gpu);
        uint32_t g = held(hs, e.gpu);
        if ((uint64_t)e.index + 1 > count[g])
            count[g] = (uint64_t)e.index + 1;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        uint64_t need = 0;
        for (uint32_t g = 0; g < G; g++) {
            if (hs->rank_dev[g] != d)
                continue;
            uint64_t n = count[g];
            count[g] = need;
            need += n * eb;
        }
        if (need <= dv->staging_cap)
            continue;
        if (may_grow && hs->reserved)
            return eplb_impl_error(err, EPLB_EINTERNAL, "the plan needs %llu bytes of staging "
                                   "on device %d, %zu were reserved at attach; nothing written",
                                   (unsigned long long)need, dv->ordinal, dv->staging_cap);
        if (!may_grow)
            return eplb_impl_error(err, EPLB_EPRECONDITION, "the plan needs %llu bytes of "
                                   "staging on device %d, the gather's had %zu: not the plan "
                                   "that gathered; nothing written",
                                   (unsigned long long)need, dv->ordinal, dv->staging_cap);
        /* Round up to 2 MiB: fewer regrowths as layers differ slightly. */
        need = (need + (2u << 20) - 1) & ~(uint64_t)((2u << 20) - 1);
        HIP_CHECK(hipSetDevice(dv->ordinal), EPLB_EINTERNAL, fail);
        if (dv->staging) {
            HIP_CHECK(hipFree(dv->staging), EPLB_EINTERNAL, fail);
            dv->staging = nullptr;
            dv->staging_cap = 0;
        }
        {
            hipError_t e = hipMalloc(reinterpret_cast<void **>(&dv->staging), (size_t)need);
            if (e != hipSuccess) {
                dv->staging = nullptr;
                (void)hipGetLastError();
                return eplb_impl_error(err, EPLB_ENOMEM, "%sMalloc %llu bytes of staging on "
                                       "device %d: %s", EPLB_API, (unsigned long long)need,
                                       dv->ordinal, hipGetErrorString(e));
            }
        }
        dv->staging_cap = (size_t)need;
    }
fail:
    return st;
}

/* Queues ops [from, to) of one phase; stops at an injected fault. */
eplb_status queue_ops(HipState *hs, uint32_t layer, const eplb_plan *p, const eplb_plan_op *ops,
                      uint32_t from, uint32_t to, eplb_fault_phase phase, eplb_status fail_code,
                      uint32_t *failed_at, eplb_error *err) {
    const uint32_t t0 = hs->lay.first[layer], t1 = hs->lay.first[layer + 1];
    for (uint32_t i = from; i < to; i++) {
        const eplb_plan_op *op = &ops[i];
        if (hs->env.fault(phase)) {
            *failed_at = i;
            return eplb_impl_error(err, fail_code, "op %u failed (injected fault)", i);
        }
        uint32_t src_dev = hs->rank_dev[held(hs, op->src_gpu)];
        uint32_t dst_dev = hs->rank_dev[held(hs, op->dst_gpu)];
        for (uint32_t t = t0; t < t1; t++) {
            const uint8_t *src = op->kind == EPLB_OP_UNSTAGE ? staging_ptr(hs, p, layer, t, op->src)
                                                             : slot_ptr(hs, t, op->src);
            uint8_t *dst = op->kind == EPLB_OP_STAGE ? staging_ptr(hs, p, layer, t, op->dst)
                                                     : slot_ptr(hs, t, op->dst);
            eplb_status st = add_copy(hs, src_dev, dst_dev, src, dst, hs->lay.tensors[t].bytes,
                                      fail_code, err);
            if (st != EPLB_OK) {
                *failed_at = i;
                return st;
            }
        }
    }
    return EPLB_OK;
}

/* One phase (or wave): queue, run, wait.  The ops queued before a failure
 * still run (as on real hardware, where earlier copies complete). */
eplb_status run_phase(HipState *hs, uint32_t layer, const eplb_plan *p, const eplb_plan_op *ops,
                      uint32_t from, uint32_t to, eplb_fault_phase phase, eplb_status fail_code,
                      eplb_error *err) {
    uint32_t failed_at = to;
    eplb_error qerr;
    eplb_status qst = queue_ops(hs, layer, p, ops, from, to, phase, fail_code, &failed_at, &qerr);
    eplb_status rst = run_lists(hs, fail_code, err);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    if (qst != EPLB_OK) {
        if (err)
            *err = qerr;
        return qst;
    }
    return rst;
}

/* Prefixes err's message with "layer L: <what>: " and appends tail. */
void hip_phase_message(eplb_error *err, eplb_status st, uint32_t layer, const char *what,
                       const char *tail) {
    if (!err)
        return;
    char m[EPLB_ERROR_MSG_MAX];
    snprintf(m, sizeof m, "%s", err->msg);
    eplb_impl_error(err, st, "layer %u: %s: %s%s", layer, what, m, tail);
}

eplb_status hip_check(void *state, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    return hs->broken_code != EPLB_OK ? broken(hs, err) : EPLB_OK;
}

eplb_status hip_gather(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    eplb_status st = ensure_staging(hs, plan, layer, true, err);
    if (st != EPLB_OK)
        return st;
    st = run_phase(hs, layer, plan, plan->gather, 0, plan->num_gather, EPLB_FAULT_GATHER,
                   EPLB_EINTERNAL, err);
    if (st != EPLB_OK)
        hip_phase_message(err, st, layer, "gather",
                          st == EPLB_EDATALOSS ? "" : "; no slot was written");
    return st;
}

eplb_status hip_scatter(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    /* The same offsets the gather laid out (same plan): nothing is freed. */
    eplb_status st = ensure_staging(hs, plan, layer, false, err);
    if (st == EPLB_OK)
        st = run_phase(hs, layer, plan, plan->scatter, 0, plan->num_scatter_wave0,
                       EPLB_FAULT_SCATTER, EPLB_EDATALOSS, err);
    if (st == EPLB_OK && plan->num_scatter > plan->num_scatter_wave0)
        st = run_phase(hs, layer, plan, plan->scatter, plan->num_scatter_wave0,
                       plan->num_scatter, EPLB_FAULT_SCATTER, EPLB_EDATALOSS, err);
    if (st != EPLB_OK)
        hip_phase_message(err, st, layer, "scatter",
                          st == EPLB_EDATALOSS && hs->broken_code == EPLB_OK
                              ? "; scatter again to complete it from staging"
                              : "");
    return st;
}

eplb_status hip_synchronize(void *state, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    for (uint32_t d = 0; d < hs->ndev; d++) {
        HIP_CHECK(hipSetDevice(hs->devs[d].ordinal), EPLB_EINTERNAL, fail);
        hipError_t e = hipStreamSynchronize(hs->devs[d].stream);
        if (e != hipSuccess) {
            st = eplb_impl_error(err, EPLB_EINTERNAL, "%sStreamSynchronize(device %d): %s",
                                 EPLB_API, hs->devs[d].ordinal, hipGetErrorString(e));
            note_sticky(hs, e, EPLB_EINTERNAL, "stream synchronize");
            goto fail;
        }
    }
fail:
    return st;
}

/* Staging once: each device gets its ranks' share, allocated here (the
 * only hipMalloc of staging after this; see the head comment). */
eplb_status hip_reserve_staging(void *state, const uint32_t *layer_entries, uint64_t *total,
                                uint64_t *per_gpu, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    const uint64_t rank_bytes = eplb_layout_staging_bytes(&hs->lay, layer_entries);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    hs->reserved = false;
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        uint64_t ranks = 0;
        for (uint32_t g = 0; g < hs->lay.G; g++)
            ranks += hs->rank_dev[g] == d;
        uint64_t need = ranks * rank_bytes;
        if (rank_bytes && need / rank_bytes != ranks)
            return eplb_impl_error(err, EPLB_EINVAL, "staging of %llu bytes x %llu ranks "
                                   "overflows", (unsigned long long)rank_bytes,
                                   (unsigned long long)ranks);
        if (need <= dv->staging_cap)
            continue;
        HIP_CHECK(hipSetDevice(dv->ordinal), EPLB_EINTERNAL, fail);
        if (dv->staging) {
            HIP_CHECK(hipFree(dv->staging), EPLB_EINTERNAL, fail);
            dv->staging = nullptr;
            dv->staging_cap = 0;
        }
        hipError_t e = hipMalloc(reinterpret_cast<void **>(&dv->staging), (size_t)need);
        if (e != hipSuccess) {
            dv->staging = nullptr;
            (void)hipGetLastError();
            return eplb_impl_error(err, EPLB_ENOMEM, "%sMalloc %llu bytes of staging on device "
                                   "%d: %s", EPLB_API, (unsigned long long)need, dv->ordinal,
                                   hipGetErrorString(e));
        }
        dv->staging_cap = (size_t)need;
    }
    hs->reserved = true;
    *total = *per_gpu = 0;
    for (uint32_t d = 0; d < hs->ndev; d++) {
        *total += hs->devs[d].staging_cap;
        if (hs->devs[d].staging_cap > *per_gpu)
            *per_gpu = hs->devs[d].staging_cap;
    }
fail:
    return st;
}

/* The engine's event, opened once per distinct handle (see the head
 * comment); then every copy stream waits for it. */
eplb_status hip_wait_event(void *state, const uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                           eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    hipEvent_t ev = nullptr;
    for (uint32_t i = 0; i < hs->nwaits && !ev; i++)
        if (memcmp(hs->waits[i].handle, handle, EPLB_EVENT_HANDLE_SIZE) == 0)
            ev = hs->waits[i].ev;
    if (!ev) {
        hipIpcEventHandle_t h;
        static_assert(sizeof(h) == EPLB_EVENT_HANDLE_SIZE, "IPC event handle is 64 bytes");
        memcpy(&h, handle, sizeof h);
        HIP_CHECK(hipSetDevice(hs->devs[0].ordinal), EPLB_EINTERNAL, fail);
        hipError_t e = hipIpcOpenEventHandle(&ev, h);
        if (e != hipSuccess) {
            (void)hipGetLastError();
            return eplb_impl_error(err, EPLB_EINVAL, "wait_event: %sIpcOpenEventHandle: %s (an "
                                   "event of another process on this host, created with the "
                                   "interprocess and disable-timing flags?); nothing moved",
                                   EPLB_API, hipGetErrorString(e));
        }
        WaitEvent *w;
        if (hs->nwaits < kMaxWaitEvents) {
            w = &hs->waits[hs->nwaits++];
        } else {
            w = &hs->waits[hs->wait_next];
            (void)hipEventDestroy(w->ev);
            hs->wait_next = (hs->wait_next + 1) % kMaxWaitEvents;
        }
        memcpy(w->handle, handle, EPLB_EVENT_HANDLE_SIZE);
        w->ev = ev;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        HIP_CHECK(hipSetDevice(hs->devs[d].ordinal), EPLB_EINTERNAL, fail);
        hipError_t e = hipStreamWaitEvent(hs->devs[d].stream, ev, 0);
        if (e != hipSuccess) {
            st = eplb_impl_error(err, EPLB_EINTERNAL, "wait_event: %sStreamWaitEvent(device %d): "
                                 "%s", EPLB_API, hs->devs[d].ordinal, hipGetErrorString(e));
            note_sticky(hs, e, EPLB_EINTERNAL, "stream wait event");
            goto fail;
        }
    }
fail:
    return st;
}

/* The done event after all copy streams (see the head comment). */
eplb_status hip_record_event(void *state, uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                             eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    if (hs->broken_code != EPLB_OK)
        return broken(hs, err);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    Device *d0 = &hs->devs[0];
    hipError_t e = hipSuccess;
    const char *what = "";
    if (!hs->done) {
        hipIpcEventHandle_t h;
        static_assert(sizeof(h) == EPLB_EVENT_HANDLE_SIZE, "IPC event handle is 64 bytes");
        HIP_CHECK(hipSetDevice(d0->ordinal), EPLB_EINTERNAL, fail);
        HIP_CHECK(hipEventCreateWithFlags(&hs->done, hipEventInterprocess | hipEventDisableTiming),
                  EPLB_EINTERNAL, fail);
        e = hipIpcGetEventHandle(&h, hs->done);
        if (e != hipSuccess) {
            (void)hipEventDestroy(hs->done);
            hs->done = nullptr;
            what = "IpcGetEventHandle";
            goto runtime;
        }
        memcpy(hs->done_handle, &h, sizeof h);
    }
    for (uint32_t d = 1; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        HIP_CHECK(hipSetDevice(dv->ordinal), EPLB_EINTERNAL, fail);
        if (!dv->join)
            HIP_CHECK(hipEventCreateWithFlags(&dv->join, hipEventDisableTiming), EPLB_EINTERNAL,
                      fail);
        if ((e = hipEventRecord(dv->join, dv->stream)) != hipSuccess) {
            what = "EventRecord";
            goto runtime;
        }
        HIP_CHECK(hipSetDevice(d0->ordinal), EPLB_EINTERNAL, fail);
        if ((e = hipStreamWaitEvent(d0->stream, dv->join, 0)) != hipSuccess) {
            what = "StreamWaitEvent";
            goto runtime;
        }
    }
    HIP_CHECK(hipSetDevice(d0->ordinal), EPLB_EINTERNAL, fail);
    if ((e = hipEventRecord(hs->done, d0->stream)) != hipSuccess) {
        what = "EventRecord";
        goto runtime;
    }
    memcpy(handle, hs->done_handle, EPLB_EVENT_HANDLE_SIZE);
    return EPLB_OK;
runtime:
    st = eplb_impl_error(err, EPLB_EINTERNAL, "done event: %s%s: %s", EPLB_API, what,
                         hipGetErrorString(e));
    note_sticky(hs, e, EPLB_EINTERNAL, "done event");
fail:
    return st;
}

/* check: device memory cannot shrink under an open handle; it reports a
 * broken backend (see note_sticky). */
const eplb_backend_ops hip_ops = {
    EPLB_BACKEND_ABI, EPLB_API,    hip_probe,       hip_open,       hip_check,
    hip_gather,       hip_scatter, hip_synchronize, hip_close,      hip_wait_event,
    hip_record_event, hip_reserve_staging,
};

} // namespace

extern "C" __attribute__((visibility("default"))) const eplb_backend_ops *EPLB_GET_OPS(void) {
    return &hip_ops;
}
