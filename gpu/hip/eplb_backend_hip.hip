/* eplb_backend_hip.hip -- the hip backend: executes transfer plans on the
 * engine's own device buffers with one batched copy kernel per device.
 *
 * Built as libeplb_backend_hip.so (hipcc; or nvcc -x cu -DEPLB_HIP_ON_CUDA,
 * see eplb_hip_compat.h) and loaded with dlopen by gpu/eplb_backend.c; it
 * exports one symbol, eplb_backend_hip_get_ops, and links nothing from the
 * executable.  Every HIP call is checked and turned into an eplb_status with
 * a message naming the call; nothing here exits or aborts.
 *
 * How a phase runs (gather is phase 1; scatter is phase 2, wave 0 then wave
 * 1 when the plan has one; the loader in gpu/eplb_backend.c only lets a
 * scatter follow a successful gather of the same layer, so nothing here
 * remembers plans):
 *   1. every plan op x every tensor of the layer becomes (src, dst, bytes),
 *      split into chunks of kChunkBytes, appended to the list of the device
 *      that holds the source ("push": remote stores over xGMI/NVLink are
 *      posted writes; a kernel on the source device reads locally);
 *   2. each device's list is uploaded and one kernel launch (grid-stride,
 *      one block per chunk, 16-byte vector loads) copies it on that
 *      device's own stream;
 *      an op between devices without peer access uses hipMemcpyPeerAsync
 *      on the source device's stream instead;
 *   3. every stream used is synchronized and checked before the next phase:
 *      phase 2 may overwrite slots phase 1 read on other devices, and an
 *      error must be attributed to its phase (eplb_backend.h: phase 1
 *      failure = nothing written, phase 2 failure = scatter again from
 *      staging).
 * Staging lives on the destination rank's device (hipMalloc, grown as
 * needed, kept until close: it is at most slots-per-rank x one expert's
 * bytes of all tensors).  Several ranks may share a device (tests); state
 * per device (stream, descriptor buffer) is shared by them. */
#include "eplb_hip_compat.h"

extern "C" {
#include "eplb_backend_impl.h"
}

namespace {

/* Bytes per block of work: large enough to amortize a block's start, small
 * enough that one 44 MiB expert spreads over every CU/SM. */
constexpr uint64_t kChunkBytes = 1u << 20;
constexpr unsigned kThreads = 512;
/* Grid limit (x): the kernel is grid-stride, so more chunks just loop. */
constexpr uint32_t kMaxGrid = 16384;

struct CopyDesc {
    const uint8_t *src;
    uint8_t *dst;
    uint64_t bytes; /* <= kChunkBytes */
};

/* descs: [n] chunks.  Block b copies chunks b, b + gridDim.x, ...
 * When src and dst agree modulo 16, the head bytes are copied singly, the
 * body as uint4 (16-byte) vectors, 4 loads in flight per thread, then the
 * tail bytes; otherwise bytes one by one (correct, slow, never seen with
 * real tensors, which are 256-byte aligned). */
__global__ void __launch_bounds__(kThreads)
    eplb_copy_kernel(const CopyDesc *__restrict__ descs, uint32_t n) {
    for (uint32_t c = blockIdx.x; c < n; c += gridDim.x) {
        const CopyDesc d = descs[c];
        const uint8_t *src = d.src;
        uint8_t *dst = d.dst;
        uint64_t bytes = d.bytes;
        if ((((uintptr_t)src ^ (uintptr_t)dst) & 15) == 0) {
            uint64_t head = (16 - ((uintptr_t)src & 15)) & 15;
            if (head > bytes)
                head = bytes;
            if (threadIdx.x < head)
                dst[threadIdx.x] = src[threadIdx.x];
            src += head;
            dst += head;
            bytes -= head;
            const uint4 *s = reinterpret_cast<const uint4 *>(src);
            uint4 *t = reinterpret_cast<uint4 *>(dst);
            const uint64_t nv = bytes / 16, step = blockDim.x;
            uint64_t i = threadIdx.x;
            for (; i + 3 * step < nv; i += 4 * step) {
                uint4 a = s[i], b = s[i + step], e = s[i + 2 * step], f = s[i + 3 * step];
                t[i] = a;
                t[i + step] = b;
                t[i + 2 * step] = e;
                t[i + 3 * step] = f;
            }
            for (; i < nv; i += step)
                t[i] = s[i];
            for (uint64_t j = nv * 16 + threadIdx.x; j < bytes; j += step)
                dst[j] = src[j];
        } else {
            for (uint64_t j = threadIdx.x; j < bytes; j += blockDim.x)
                dst[j] = src[j];
        }
    }
}

struct Device {
    int ordinal;
    hipStream_t stream;
    CopyDesc *d_descs;  /* device copy of the chunk list */
    size_t d_cap;       /* chunks d_descs holds */
    CopyDesc *h_descs;  /* host chunk list being built */
    size_t h_len, h_cap;
    bool used;          /* has work in the current phase */
};

struct Rank {
    uint8_t *base;      /* the mapping */
    bool ipc;           /* opened with hipIpcOpenMemHandle: close it */
    uint32_t dev;       /* index into HipState::devs */
    uint8_t *staging;   /* on the rank's device */
    size_t staging_cap;
};

struct HipState {
    eplb_layout lay;
    eplb_backend_env env;
    Device *devs;       /* [ndev] distinct ordinals */
    uint32_t ndev;
    Rank *ranks;        /* [G] */
    bool *peer;         /* [ndev][ndev]: a's kernels may touch b's memory */
};

/* ---- error handling ---------------------------------------------------- */

#define HIP_CHECK(call, code, label)                                                              \
    do {                                                                                          \
        hipError_t e_ = (call);                                                                   \
        if (e_ != hipSuccess) {                                                                   \
            st = eplb_impl_error(err, (code), "%s: %s", #call, hipGetErrorString(e_));           \
            goto label;                                                                           \
        }                                                                                         \
    } while (0)

/* Restores the caller's current device (an engine may embed us). */
struct DeviceGuard {
    int saved = -1;
    DeviceGuard() {
        if (hipGetDevice(&saved) != hipSuccess)
            saved = -1;
    }
    ~DeviceGuard() {
        if (saved >= 0)
            (void)hipSetDevice(saved);
    }
};

/* ---- probe / open / close ---------------------------------------------- */

eplb_status hip_probe(uint32_t *num_devices, eplb_error *err) {
    int n = 0;
    hipError_t e = hipGetDeviceCount(&n);
    *num_devices = 0;
    if (e != hipSuccess) {
        (void)hipGetLastError();
        return eplb_impl_error(err, EPLB_EUNAVAILABLE, "hipGetDeviceCount: %s",
                               hipGetErrorString(e));
    }
    if (n <= 0)
        return eplb_impl_error(err, EPLB_EUNAVAILABLE, "hipGetDeviceCount: no device");
    *num_devices = (uint32_t)n;
    return EPLB_OK;
}

void hip_close(void *state) {
    HipState *hs = static_cast<HipState *>(state);
    if (!hs)
        return;
    DeviceGuard guard;
    for (uint32_t g = 0; hs->ranks && g < hs->lay.G; g++) {
        Rank *r = &hs->ranks[g];
        if (!r->base && !r->staging)
            continue;
        (void)hipSetDevice(hs->devs[r->dev].ordinal);
        if (r->staging)
            (void)hipFree(r->staging);
        if (r->ipc && r->base)
            (void)hipIpcCloseMemHandle(r->base);
    }
    for (uint32_t d = 0; hs->devs && d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        (void)hipSetDevice(dv->ordinal);
        if (dv->stream) {
            (void)hipStreamSynchronize(dv->stream);
            (void)hipStreamDestroy(dv->stream);
        }
        if (dv->d_descs)
            (void)hipFree(dv->d_descs);
        free(dv->h_descs);
    }
    (void)hipGetLastError();
    free(hs->devs);
    free(hs->ranks);
    free(hs->peer);
    eplb_layout_free(&hs->lay);
    free(hs);
}

eplb_status hip_open(const eplb_buffers_desc *desc, uint32_t num_physical,
                     const eplb_backend_env *env, void **state, eplb_error *err) {
    *state = nullptr;
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    int count = 0;
    uint32_t G = desc->num_ranks;
    HipState *hs = static_cast<HipState *>(calloc(1, sizeof(HipState)));
    if (!hs)
        return eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the hip backend");
    hs->env = *env;
    st = eplb_layout_build(&hs->lay, desc, num_physical, err);
    if (st != EPLB_OK) {
        free(hs);
        return st;
    }
    hs->ranks = static_cast<Rank *>(calloc(G, sizeof(Rank)));
    hs->devs = static_cast<Device *>(calloc(G, sizeof(Device)));
    if (!hs->ranks || !hs->devs) {
        st = eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the hip backend");
        goto fail;
    }
    HIP_CHECK(hipGetDeviceCount(&count), EPLB_EUNAVAILABLE, fail);

    /* Distinct devices, in order of first use. */
    for (uint32_t g = 0; g < G; g++) {
        int ord = desc->ranks[g].device;
        if (ord >= count) {
            st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u].device %d: this process sees %d "
                                 "device(s)", g, ord, count);
            goto fail;
        }
        uint32_t d = 0;
        while (d < hs->ndev && hs->devs[d].ordinal != ord)
            d++;
        if (d == hs->ndev) {
            hs->devs[d].ordinal = ord;
            hs->ndev++;
        }
        hs->ranks[g].dev = d;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        HIP_CHECK(hipSetDevice(dv->ordinal), EPLB_EINTERNAL, fail);
        HIP_CHECK(hipStreamCreateWithFlags(&dv->stream, hipStreamNonBlocking), EPLB_EINTERNAL,
                  fail);
    }
    /* Peer access between every pair of distinct devices that allows it. */
    hs->peer = static_cast<bool *>(calloc((size_t)hs->ndev * hs->ndev, sizeof(bool)));
    if (!hs->peer) {
        st = eplb_impl_error(err, EPLB_ENOMEM, "out of memory opening the hip backend");
        goto fail;
    }
    for (uint32_t a = 0; a < hs->ndev; a++) {
        hs->peer[a * hs->ndev + a] = true;
        for (uint32_t b = 0; b < hs->ndev; b++) {
            if (a == b)
                continue;
            int can = 0;
            HIP_CHECK(hipDeviceCanAccessPeer(&can, hs->devs[a].ordinal, hs->devs[b].ordinal),
                      EPLB_EINTERNAL, fail);
            if (!can)
                continue;
            HIP_CHECK(hipSetDevice(hs->devs[a].ordinal), EPLB_EINTERNAL, fail);
            hipError_t e = hipDeviceEnablePeerAccess(hs->devs[b].ordinal, 0);
            if (e != hipSuccess && e != hipErrorPeerAccessAlreadyEnabled) {
                st = eplb_impl_error(err, EPLB_EINTERNAL, "hipDeviceEnablePeerAccess(%d -> %d): %s",
                                     hs->devs[a].ordinal, hs->devs[b].ordinal,
                                     hipGetErrorString(e));
                goto fail;
            }
            (void)hipGetLastError(); /* clear "already enabled" */
            hs->peer[a * hs->ndev + b] = true;
        }
    }
    /* Map every rank's buffer and check it against the layout. */
    for (uint32_t g = 0; g < G; g++) {
        const eplb_rank_location *loc = &desc->ranks[g];
        Rank *r = &hs->ranks[g];
        HIP_CHECK(hipSetDevice(hs->devs[r->dev].ordinal), EPLB_EINTERNAL, fail);
        if (desc->kind == EPLB_BUFFERS_HIP_IPC) {
            hipIpcMemHandle_t h;
            static_assert(sizeof(h) == EPLB_IPC_HANDLE_SIZE, "IPC handle is 64 bytes");
            memcpy(&h, loc->ipc_handle, sizeof h);
            void *p = nullptr;
            hipError_t e = hipIpcOpenMemHandle(&p, h, hipIpcMemLazyEnablePeerAccess);
            if (e != hipSuccess) {
                st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u].ipc_handle: hipIpcOpenMemHandle "
                                     "on device %d: %s", g, loc->device, hipGetErrorString(e));
                goto fail;
            }
            r->base = static_cast<uint8_t *>(p);
            r->ipc = true;
        } else {
            r->base = reinterpret_cast<uint8_t *>(static_cast<uintptr_t>(loc->device_ptr));
        }
        if (loc->size < hs->lay.rank_extent[g]) {
            st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u].size %llu < %llu bytes the layout "
                                 "needs", g, (unsigned long long)loc->size,
                                 (unsigned long long)hs->lay.rank_extent[g]);
            goto fail;
        }
        void *abase = nullptr;
        size_t asize = 0;
        hipError_t e = eplb_mem_range(r->base, &abase, &asize);
        if (e == hipSuccess) {
            uint64_t off = (uint64_t)(r->base - static_cast<uint8_t *>(abase));
            if (r->base < static_cast<uint8_t *>(abase) || off + loc->size > asize) {
                st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u]: declared size %llu runs past "
                                     "the allocation (%zu bytes, starting %llu bytes before)", g,
                                     (unsigned long long)loc->size, asize,
                                     (unsigned long long)off);
                goto fail;
            }
        } else if (e != hipErrorNotSupported) {
            st = eplb_impl_error(err, EPLB_EINVAL, "ranks[%u]: hipMemGetAddressRange: %s (not "
                                 "device memory of device %d?)", g, hipGetErrorString(e),
                                 loc->device);
            (void)hipGetLastError();
            goto fail;
        }
    }
    *state = hs;
    return EPLB_OK;
fail:
    hip_close(hs);
    return st;
}

/* ---- building and running one phase ----------------------------------- */

eplb_status push_chunks(Device *dv, const uint8_t *src, uint8_t *dst, uint64_t bytes,
                        eplb_error *err) {
    size_t need = dv->h_len + (size_t)((bytes + kChunkBytes - 1) / kChunkBytes);
    if (need > dv->h_cap) {
        size_t cap = dv->h_cap ? dv->h_cap : 256;
        while (cap < need)
            cap *= 2;
        CopyDesc *p = static_cast<CopyDesc *>(realloc(dv->h_descs, cap * sizeof(CopyDesc)));
        if (!p)
            return eplb_impl_error(err, EPLB_ENOMEM, "out of memory for %zu copy chunks", cap);
        dv->h_descs = p;
        dv->h_cap = cap;
    }
    for (uint64_t off = 0; off < bytes; off += kChunkBytes) {
        CopyDesc &c = dv->h_descs[dv->h_len++];
        c.src = src + off;
        c.dst = dst + off;
        c.bytes = bytes - off < kChunkBytes ? bytes - off : kChunkBytes;
    }
    dv->used = true;
    return EPLB_OK;
}

/* Adds one copy executed by the source device (exec) into memory of device
 * other: a kernel chunk list entry, or a peer memcpy without peer access. */
eplb_status add_copy(HipState *hs, uint32_t exec, uint32_t other, const uint8_t *src,
                     uint8_t *dst, uint64_t bytes, eplb_status fail_code, eplb_error *err) {
    Device *dv = &hs->devs[exec];
    if (hs->peer[exec * hs->ndev + other])
        return push_chunks(dv, src, dst, bytes, err);
    eplb_status st = EPLB_OK;
    HIP_CHECK(hipSetDevice(dv->ordinal), fail_code, fail);
    HIP_CHECK(hipMemcpyPeerAsync(dst, hs->devs[other].ordinal, src, dv->ordinal, bytes,
                                 dv->stream),
              fail_code, fail);
    dv->used = true;
fail:
    return st;
}

/* Uploads and launches every device's chunk list, then waits for every
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
            uint32_t n = (uint32_t)dv->h_len;
            uint32_t grid = n < kMaxGrid ? n : kMaxGrid;
            EPLB_LAUNCH(eplb_copy_kernel, dim3(grid), dim3(kThreads), 0, dv->stream,
                        (const CopyDesc *)dv->d_descs, n);
            HIP_CHECK(hipGetLastError(), fail_code, next);
        }
    next:;
    }
    for (uint32_t d = 0; d < hs->ndev; d++) {
        Device *dv = &hs->devs[d];
        if (dv->used) {
            hipError_t e = hipSetDevice(dv->ordinal);
            if (e == hipSuccess)
                e = hipStreamSynchronize(dv->stream);
            if (e != hipSuccess && st == EPLB_OK)
                st = eplb_impl_error(err, fail_code, "hipStreamSynchronize(device %d): %s",
                                     dv->ordinal, hipGetErrorString(e));
        }
        dv->used = false;
        dv->h_len = 0;
    }
    return st;
}

uint8_t *slot_ptr(HipState *hs, uint32_t t, uint32_t slot) {
    return hs->ranks[slot / hs->lay.S].base + eplb_layout_slot_offset(&hs->lay, t, slot);
}

uint8_t *staging_ptr(HipState *hs, const eplb_plan *p, uint32_t layer, uint32_t t, uint32_t k) {
    const eplb_plan_staging &e = p->staging[k];
    return hs->ranks[e.gpu].staging + (size_t)e.index * hs->lay.entry_bytes[layer] +
           hs->lay.tensors[t].stage_offset;
}

eplb_status ensure_staging(HipState *hs, const eplb_plan *p, uint32_t layer, eplb_error *err) {
    eplb_status st = EPLB_OK;
    for (uint32_t k = 0; k < p->num_staging; k++) {
        Rank *r = &hs->ranks[p->staging[k].gpu];
        size_t need = ((size_t)p->staging[k].index + 1) * hs->lay.entry_bytes[layer];
        if (need <= r->staging_cap)
            continue;
        /* Grow to the plan's largest per-GPU count at once. */
        need = (size_t)p->max_staging_per_gpu * hs->lay.entry_bytes[layer];
        HIP_CHECK(hipSetDevice(hs->devs[r->dev].ordinal), EPLB_EINTERNAL, fail);
        if (r->staging) {
            HIP_CHECK(hipFree(r->staging), EPLB_EINTERNAL, fail);
            r->staging = nullptr;
            r->staging_cap = 0;
        }
        {
            hipError_t e = hipMalloc(reinterpret_cast<void **>(&r->staging), need);
            if (e != hipSuccess) {
                r->staging = nullptr;
                return eplb_impl_error(err, EPLB_ENOMEM, "hipMalloc %zu bytes of staging on "
                                       "device %d: %s", need, hs->devs[r->dev].ordinal,
                                       hipGetErrorString(e));
            }
        }
        r->staging_cap = need;
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
        uint32_t src_dev = hs->ranks[op->src_gpu].dev, dst_dev = hs->ranks[op->dst_gpu].dev;
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

eplb_status hip_gather(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    DeviceGuard guard;
    eplb_status st = ensure_staging(hs, plan, layer, err);
    if (st != EPLB_OK)
        return st;
    st = run_phase(hs, layer, plan, plan->gather, 0, plan->num_gather, EPLB_FAULT_GATHER,
                   EPLB_EINTERNAL, err);
    if (st != EPLB_OK)
        hip_phase_message(err, st, layer, "gather", "; no slot was written");
    return st;
}

eplb_status hip_scatter(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    DeviceGuard guard;
    eplb_status st = run_phase(hs, layer, plan, plan->scatter, 0, plan->num_scatter_wave0,
                               EPLB_FAULT_SCATTER, EPLB_EDATALOSS, err);
    if (st == EPLB_OK && plan->num_scatter > plan->num_scatter_wave0)
        st = run_phase(hs, layer, plan, plan->scatter, plan->num_scatter_wave0,
                       plan->num_scatter, EPLB_FAULT_SCATTER, EPLB_EDATALOSS, err);
    if (st != EPLB_OK)
        hip_phase_message(err, st, layer, "scatter",
                          "; scatter again to complete it from staging");
    return st;
}

eplb_status hip_synchronize(void *state, eplb_error *err) {
    HipState *hs = static_cast<HipState *>(state);
    DeviceGuard guard;
    eplb_status st = EPLB_OK;
    for (uint32_t d = 0; d < hs->ndev; d++) {
        HIP_CHECK(hipSetDevice(hs->devs[d].ordinal), EPLB_EINTERNAL, fail);
        HIP_CHECK(hipStreamSynchronize(hs->devs[d].stream), EPLB_EINTERNAL, fail);
    }
fail:
    return st;
}

/* No check: device memory cannot shrink under an open IPC handle. */
const eplb_backend_ops hip_ops = {
    EPLB_BACKEND_ABI, "hip",      hip_probe,       hip_open, nullptr,
    hip_gather,       hip_scatter, hip_synchronize, hip_close,
};

} // namespace

extern "C" __attribute__((visibility("default"))) const eplb_backend_ops *
eplb_backend_hip_get_ops(void) {
    return &hip_ops;
}
