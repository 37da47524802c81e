/* eplb_backend.h -- moving expert weights: the description of the engine's
 * buffers, their validation, and the backend interface that executes
 * transfer plans (eplb_plan.h) on them in place.
 *
 * What it is: one small interface (a struct of function pointers) with
 * three implementations -- "cpu" (memcpy over POSIX shared memory, always
 * built), "hip" and "cuda" (one kernel source over HIP or CUDA IPC memory;
 * shared objects loaded at run time with dlopen, so one eplbd binary runs
 * with or without ROCm or CUDA installed).
 * What it is not: it does not decide what moves (eplb_plan_build does), it
 * never allocates or frees the engine's buffers (addresses never change), and
 * it does not commit placements (the caller does, after a layer succeeds).
 *
 * Life of one rebalance (the caller holding the model's lock; eplb_weights_ops
 * in eplb_registry.h is the same machine one level up):
 *
 *     open(buffers)                      (shm: opened, owner-checked, mapped, fds kept)
 *       check ---------------------------> EPLB_EDATALOSS: a buffer shrank, stop
 *       for each layer l:
 *         gather(l, plan_l) ------------> EPLB_EINTERNAL: nothing written, stop
 *         scatter(l, plan_l) --+--> ok       (EPLB_EDATALOSS: buffers lost, stop)
 *                    ^ EDATALOSS|
 *                    +- again --+  (same l, same plan_l: idempotent)
 *     close                              (unmap, close fds, free staging)
 *
 *   - gather (phase 1) copies the old bytes the plan stages into staging; it
 *     writes no slot of the engine.  EPLB_EINTERNAL: it failed and every slot
 *     is as it was (staging is dropped).  EPLB_EDATALOSS: the buffers
 *     themselves are gone (a shm object shrank under us: SIGBUS caught):
 *     no slot was written by us, but the engine's bytes are lost anyway.
 *   - scatter (phase 2) writes the destination slots of the layer gathered
 *     last, from staging and from stable slots.  It is idempotent (eplb_plan.h
 *     invariant 4): after EPLB_EDATALOSS (some slots written, others not) a
 *     second scatter with the same layer and plan completes the layer.
 *     Staging stays valid until the next gather (or close), so repeating a
 *     scatter that succeeded is harmless too; what is never done is running
 *     gather again over bytes a scatter already moved (it would undo a swap).
 *     A scatter whose layer is not the one gathered last, or after a failed
 *     gather, is refused (EPLB_EPRECONDITION, nothing written; EPLB_EDATALOSS
 *     when the buffers are lost): the backend does not guess from plans
 *     which phase a call means.
 *   - check (before anything moves) fstat()s every kept shm descriptor:
 *     EPLB_EDATALOSS when one is now smaller than the layout needs.  Once a
 *     loss is seen (by check or by a SIGBUS during a copy) every later
 *     check, gather and scatter answers EPLB_EDATALOSS: the bytes stay lost
 *     even if the object grows back (it grows back zeroed).
 *   Both phases return when their copies are complete.  One backend instance
 *   must not be used by two threads at once.
 *
 * Trust (SHM): a description names objects; the process that opens them may
 * hold more rights than the client that named them.  So every object is
 * opened with O_NOFOLLOW | O_NONBLOCK (no symlinks, no blocking FIFO), and
 * the descriptor that is mapped is the one checked (no check-then-use
 * race): a regular file, owned by this process's effective uid or one of
 * the policy's uids, named under the policy's prefix (eplb_shm_policy).
 * Copies into and out of the mappings run under a SIGBUS guard
 * (gpu/eplb_sigbus.h; one sigsetjmp per phase): a truncated object makes
 * the move fail with EPLB_EDATALOSS, never kills the process.
 *
 * Buffer description: per EP rank (GPU) held by this server, a list of
 * memory regions -- POSIX shm objects (cpu), HIP or CUDA IPC memory handles
 * + device ordinal (hip/cuda), or, for engines that load the backend
 * in-process and for tests, device pointers -- and per (layer, tensor, rank)
 * which region that tensor lives in, where its local slot 0 starts there and
 * the stride between slots.  Engines keep one tensor per layer and kind
 * (vLLM's w13_weight, w2_weight, scales), each in its own caching-allocator
 * block, or several in one block: a rank may have one region per tensor or
 * one for all.  A server may hold only some ranks (one node's GPUs:
 * first_rank, held_ranks); plans then may only touch those ranks' slots,
 * which the caller checks before anything moves.  Every tensor of a layer
 * moves with its expert (vLLM #47588 lost accuracy when scales moved without
 * their weights): gather and scatter always move all of them. */
#ifndef EPLB_BACKEND_H
#define EPLB_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eplb_plan.h"
#include "eplb_status.h"

/* ======================================================================= */
/* Buffer description                                                       */
/* ======================================================================= */

#define EPLB_TENSOR_NAME_MAX 32    /* bytes, without the terminating NUL */
#define EPLB_SHM_NAME_MAX 255      /* NAME_MAX: "/" + up to 254 bytes */
#define EPLB_IPC_HANDLE_SIZE 64    /* sizeof(hipIpcMemHandle_t) == sizeof(cudaIpcMemHandle_t) */
#define EPLB_BUFFERS_MAX_TENSORS 64 /* per layer: w13, w2, scales, zeros... */
#define EPLB_BUFFERS_MAX_REGIONS 4096 /* per rank: e.g. 58 layers x 3 tensors, one block each */

typedef enum eplb_buffers_kind {
    EPLB_BUFFERS_SHM = 1,        /* host memory: shm_open name per region (cpu) */
    EPLB_BUFFERS_HIP_IPC = 2,    /* device memory: hipIpcMemHandle_t per region (hip) */
    EPLB_BUFFERS_DEVICE_PTR = 3, /* device memory already mapped in this process (hip, cuda) */
    EPLB_BUFFERS_CUDA_IPC = 4    /* device memory: cudaIpcMemHandle_t per region (cuda) */
} eplb_buffers_kind;

/* One memory region of a rank: an shm object, an IPC-exported allocation
 * (the whole caching-allocator block a handle names: tensors sit at
 * offsets in it), or a device pointer.  Only the fields of the
 * description's kind are read. */
typedef struct eplb_region {
    char shm_name[EPLB_SHM_NAME_MAX + 1];      /* SHM: "/name", NUL-terminated */
    uint8_t ipc_handle[EPLB_IPC_HANDLE_SIZE];  /* HIP_IPC, CUDA_IPC: the handle's bytes */
    uint64_t device_ptr;                       /* DEVICE_PTR: base address */
    int32_t device;                            /* device kinds: the ordinal here */
    uint64_t size;  /* bytes of the region.  SHM: 0 = the object's size,
                     * else at most the object's size (fstat).  Device kinds:
                     * required; checked against the allocation's real size
                     * when the backend opens it. */
} eplb_region;

/* One EP rank's regions. */
typedef struct eplb_rank_buffers {
    uint32_t num_regions;                      /* 1..EPLB_BUFFERS_MAX_REGIONS */
    const eplb_region *regions;                /* [num_regions] */
} eplb_rank_buffers;

/* Where one tensor's slots are on one rank: local slot i (0-based within
 * the rank) occupies [offset + i*stride, offset + i*stride +
 * bytes_per_expert) of the rank's regions[region]. */
typedef struct eplb_tensor_layout {
    uint32_t region;
    uint64_t offset;
    uint64_t stride; /* >= bytes_per_expert */
} eplb_tensor_layout;

typedef struct eplb_tensor_desc {
    char name[EPLB_TENSOR_NAME_MAX + 1]; /* "w13", "w2_scale", ...; unique per layer */
    uint64_t bytes_per_expert;           /* >= 1 */
    const eplb_tensor_layout *ranks;     /* [held ranks]: ranks[i] is rank first_rank + i */
} eplb_tensor_desc;

typedef struct eplb_layer_desc {
    uint32_t num_tensors;                /* 1..EPLB_BUFFERS_MAX_TENSORS */
    const eplb_tensor_desc *tensors;     /* [num_tensors] */
} eplb_layer_desc;

/* Caller-owned; backends copy what they keep. */
typedef struct eplb_buffers_desc {
    eplb_buffers_kind kind;
    uint32_t num_layers;                 /* L */
    uint32_t num_ranks;                  /* G, the model's EP size */
    /* The ranks this server holds: [first_rank, first_rank + held_ranks).
     * 0 and 0: all G. */
    uint32_t first_rank;
    uint32_t held_ranks;
    const eplb_rank_buffers *ranks;      /* [held ranks]: ranks[i] is rank first_rank + i */
    const eplb_layer_desc *layers;       /* [L] */
} eplb_buffers_desc;

/* The held range of d: *first and *count (0 and 0 mean all ranks). */
static inline void eplb_buffers_held(const eplb_buffers_desc *d, uint32_t *first, uint32_t *count) {
    *first = d->first_rank;
    *count = d->first_rank == 0 && d->held_ranks == 0 ? d->num_ranks : d->held_ranks;
}

/* The server's trust policy for SHM descriptions (the description comes from
 * a client; this does not): checked by the backend on the descriptor it
 * maps.  NULL where one is taken = the default: any name, owned by this
 * process's effective uid only. */
typedef struct eplb_shm_policy {
    const char *prefix;      /* NULL or "": any name; else every shm_name starts
                              * with it (eplbd: --shm-prefix, default "/eplb-") */
    const uint32_t *uids;    /* [num_uids] owners allowed besides geteuid() */
    uint32_t num_uids;
} eplb_shm_policy;

/* Check a description against the registered shape (L layers, P slots, G
 * ranks) before any byte is touched: kind; counts; the held range (within
 * G); every rank's region count; every shm name ("/x", no other '/',
 * NUL-terminated) and, for SHM, the object's type and size (opened
 * read-only with O_NOFOLLOW | O_NONBLOCK: a missing object, a symlink or a
 * non-regular file is EPLB_EINVAL; prefix and owner are the backend's to
 * check, eplb_shm_open_checked); every IPC handle (not all zero), device
 * ordinal (>= 0), device pointer (not 0) and size; that no two regions of
 * any held ranks name the same memory; every tensor name (non-empty,
 * NUL-terminated, unique in its layer), bytes_per_expert (>= 1), region
 * index, stride (>= bytes_per_expert), that every slot's bytes lie inside
 * its region (no overflow), and that no two slots of any tensors of any
 * layers overlap within a region (a write to one would corrupt another).
 * Alignment: device kinds need every offset, stride and bytes_per_expert
 * to be a multiple of 4 (the kernels copy 16-byte words where all three
 * are multiples of 16, else 4-byte words; a byte-per-thread path is never
 * taken), else EPLB_EINVAL saying so; SHM copies any alignment.
 * Returns EPLB_OK, or EPLB_EINVAL with a message naming the field, e.g.
 * "layers[3].tensors[1] (w2).ranks[5]: slot 8 ends at 4718592 past the
 * mapping's 4194304 bytes"; EPLB_ENOMEM when the overlap check cannot
 * allocate.  Touches nothing; err untouched on success.
 * Cost: O(G * L * T * S log(L * T * S)), S = P / G, T = tensors per layer,
 * plus one open + fstat per SHM rank. */
eplb_status eplb_buffers_validate(const eplb_buffers_desc *desc, uint32_t num_layers,
                                  uint32_t num_physical, uint32_t num_ranks, eplb_error *err);

/* Open region r of held rank g (0-based in the held range) of an SHM
 * description and check it, on the
 * descriptor, against policy (NULL: the default): oflag is O_RDONLY or
 * O_RDWR (O_NOFOLLOW, O_NONBLOCK and O_CLOEXEC are added).  In order: the
 * name (as validate; then the prefix: EPLB_EPERM "ranks[1].shm_name \"/x\"
 * is not under the allowed prefix \"/eplb-\""), the open (missing, or a
 * symlink: EPLB_EINVAL), a regular file (EPLB_EINVAL), the owner
 * (st_uid == geteuid() or one of policy->uids, else EPLB_EPERM "... is owned
 * by uid N; allowed: 0 (this process), 1000").  On success *fd is the open
 * descriptor (the caller closes it) and *size the object's size; on error
 * *fd is -1 and nothing stays open.  Cost: one open + one fstat. */
eplb_status eplb_shm_open_checked(const eplb_buffers_desc *desc, const eplb_shm_policy *policy,
                                  uint32_t g, uint32_t r, int oflag, int *fd, uint64_t *size,
                                  eplb_error *err);

/* ======================================================================= */
/* Backend interface                                                        */
/* ======================================================================= */

/* Fault injection (SQLite sqlite3FaultSim style): inert unless a test
 * installs it. */
typedef enum eplb_fault_phase {
    EPLB_FAULT_NONE = 0,
    EPLB_FAULT_GATHER = 1,  /* phase 1 ops */
    EPLB_FAULT_SCATTER = 2  /* phase 2 ops */
} eplb_fault_phase;

/* What the loader hands a backend (so a backend in a shared object calls
 * nothing in the executable). */
typedef struct eplb_backend_env {
    /* Called once before each plan op of a phase; nonzero = fail this op.
     * Never NULL. */
    int (*fault)(eplb_fault_phase phase);
    /* The SHM trust policy of this open (never NULL); valid during open
     * only: a backend copies what it keeps. */
    const eplb_shm_policy *shm_policy;
} eplb_backend_env;

/* 2: execute_layer split into explicit gather / scatter, check added.
 * 3: regions per rank, a held range of ranks, CUDA_IPC.
 * 4: wait_event / record_event (GPU-side ordering with the engine's
 *    streams, docs/api.md "Ordering with the engine's GPU streams");
 *    reserve_staging (staging allocated once, at attach). */
#define EPLB_BACKEND_ABI 4

/* sizeof(hipIpcEventHandle_t) == sizeof(cudaIpcEventHandle_t) */
#define EPLB_EVENT_HANDLE_SIZE 64

/* One implementation.  The public wrappers below validate arguments
 * (layer range, plan shape and every op's indices) and the phase order (a
 * scatter only of the layer gathered last) before calling these. */
typedef struct eplb_backend_ops {
    uint32_t abi;     /* EPLB_BACKEND_ABI */
    const char *name; /* "cpu", "hip", "cuda" */
    /* Devices usable by this backend (cpu: 0).  EPLB_EUNAVAILABLE when its
     * runtime has none. */
    eplb_status (*probe)(uint32_t *num_devices, eplb_error *err);
    /* Map every rank's buffers (desc already validated).  On error nothing
     * stays mapped or allocated and *state is NULL. */
    eplb_status (*open)(const eplb_buffers_desc *desc, uint32_t num_physical,
                        const eplb_backend_env *env, void **state, eplb_error *err);
    /* Do the buffers still hold what was opened?  EPLB_OK or EPLB_EDATALOSS.
     * NULL: nothing to check (device memory cannot shrink under us). */
    eplb_status (*check)(void *state, eplb_error *err);
    /* Phase 1 of one layer, all its tensors: old slots -> staging.  Returns
     * when the copies are complete.  See the life of a rebalance above. */
    eplb_status (*gather)(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err);
    /* Phase 2 of the layer gathered last (the wrapper guarantees it), with
     * the plan that gathered it: staging and stable slots -> slots. */
    eplb_status (*scatter)(void *state, uint32_t layer, const eplb_plan *plan, eplb_error *err);
    /* Wait for outstanding work (both phases already return complete: a
     * barrier for embedders).  Staging is kept. */
    eplb_status (*synchronize)(void *state, eplb_error *err);
    /* Unmap everything, free staging, destroy events.  NULL is fine. */
    void (*close)(void *state);
    /* ABI 4, both NULL for a backend without device events (cpu).
     * wait_event: every copy stream waits (on the device, the host does not
     * block) for the engine's interprocess event named by handle, so that
     * the next gather's copies start only after the engine's last use of
     * the weights.  A handle that does not open is EPLB_EINVAL (nothing
     * queued, the backend stays usable).  Opened events are kept (per
     * handle bytes) until close: engines record into the same event every
     * step, and opening it each time would leak a mapping per call.
     * record_event: record, after everything queued on every copy stream,
     * one interprocess event (one per backend, created on first use) and
     * write its IPC handle to handle.  The phases still return complete
     * (synchronized); the event orders the engine's streams after our
     * copies on the GPU, it does not replace our host synchronization. */
    eplb_status (*wait_event)(void *state, const uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                              eplb_error *err);
    eplb_status (*record_event)(void *state, uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                                eplb_error *err);
    /* Allocate staging once for layer_entries[l] entries per held rank in
     * layer l (the backend knows an entry's padded size; the most over the
     * layers is kept: each device its ranks' share, cpu one host buffer for
     * all) and keep it to close: a
     * later gather whose plan needs more is refused (EPLB_EINTERNAL,
     * nothing written) instead of reallocating mid-rebalance.  *total: the
     * bytes allocated; *per_gpu: the most on one device (cpu: 0).  Without
     * a reservation staging grows as plans need it (tools, tests). */
    eplb_status (*reserve_staging)(void *state, const uint32_t *layer_entries, uint64_t *total,
                                   uint64_t *per_gpu, eplb_error *err);
} eplb_backend_ops;

extern const eplb_backend_ops eplb_backend_cpu_ops;

/* The symbols the GPU shared objects export: each returns its ops.  One
 * source (gpu/hip/eplb_backend_hip.hip) builds both: hipcc for AMD GPUs,
 * nvcc for NVIDIA ones. */
#define EPLB_BACKEND_HIP_SYMBOL "eplb_backend_hip_get_ops"
#define EPLB_BACKEND_HIP_LIBRARY "libeplb_backend_hip.so"
#define EPLB_BACKEND_CUDA_SYMBOL "eplb_backend_cuda_get_ops"
#define EPLB_BACKEND_CUDA_LIBRARY "libeplb_backend_cuda.so"
typedef const eplb_backend_ops *(*eplb_backend_get_ops_fn)(void);

typedef struct eplb_backend eplb_backend; /* opaque */

/* Which backend "auto" means on this machine: "hip" when the HIP shared
 * object loads and its runtime reports >= 1 device, else "cuda" likewise,
 * else "cpu"; why (when not NULL) gets one line starting with the name and
 * saying why, e.g. "cuda: 8 devices", "cpu: no GPU backend installed
 * (libeplb_backend_hip.so, libeplb_backend_cuda.so not found)", "cpu: no GPU
 * backend usable here (hip: dlopen ...: libamdhip64.so.5: cannot open ...;
 * cuda: cudaGetDeviceCount: no CUDA-capable device is detected)".
 * Each .so is searched as: $EPLB_HIP_BACKEND / $EPLB_CUDA_BACKEND (a path:
 * only that), the directory of the running executable, then the dynamic
 * linker's path.  Each is loaded once per process and never unloaded (GPU
 * runtimes do not unload cleanly). */
const char *eplb_backend_auto_name(char *why, size_t why_size);

/* Can backend `name` be used here?  "cpu" and "auto" always; "hip" and
 * "cuda" when their .so loads and sees >= 1 device, else EPLB_EUNAVAILABLE
 * saying why ("cuda backend unusable: cudaGetDeviceCount: ...").  EPLB_EINVAL
 * for another name.  eplbd asks at start for a forced --backend. */
eplb_status eplb_backend_usable(const char *name, eplb_error *err);

/* Open a backend on the engine's buffers.
 *   name   "cpu", "hip", "cuda" or "auto".  auto: SHM buffers go to cpu
 *          (only it maps shm), HIP_IPC to hip, CUDA_IPC to cuda, device
 *          pointers to eplb_backend_auto_name's GPU backend (never cpu: it
 *          cannot reach them; EPLB_EUNAVAILABLE then).
 *   desc   validated here first (eplb_buffers_validate) against
 *          (desc->num_layers, num_physical, desc->num_ranks).
 *   policy what SHM objects may be mapped (NULL: the default, any name
 *          owned by this process's effective uid).
 * Returns EPLB_OK; EPLB_EINVAL (bad name or description; a description of
 * the wrong kind for the backend); EPLB_EPERM (an shm object outside the
 * prefix or of an owner not allowed); EPLB_EUNAVAILABLE (the hip or cuda
 * .so does not load, lacks the symbol or ABI, or sees no device); EPLB_EINTERNAL (a
 * runtime call failed: the message names it); EPLB_ENOMEM.  On error *out is
 * NULL and nothing is mapped. */
eplb_status eplb_backend_open(const char *name, const eplb_buffers_desc *desc,
                              const eplb_shm_policy *policy, uint32_t num_physical,
                              eplb_backend **out, eplb_error *err);

/* eplb_backend_open with the default policy. */
eplb_status eplb_backend_open_by_name(const char *name, const eplb_buffers_desc *desc,
                                      uint32_t num_physical, eplb_backend **out,
                                      eplb_error *err);

const char *eplb_backend_name(const eplb_backend *b);

/* The EP ranks b maps: [*first, *first + *count). */
void eplb_backend_held(const eplb_backend *b, uint32_t *first, uint32_t *count);

/* Does layer's plan touch only held ranks?  EPLB_OK, or EPLB_EPRECONDITION
 * naming the ranks it needs that are not held ("layer 3: the plan needs EP
 * rank(s) 9, 12, which this server does not hold (it holds ranks 0..7)");
 * EPLB_ENOMEM.  Gather and scatter refuse such plans too; a mover calls this
 * for every layer before the first gather, so nothing moves at all.
 * Cost: O(ops + G/8). */
eplb_status eplb_backend_plan_held(const eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                   eplb_error *err);

/* Before a move: EPLB_OK, or EPLB_EDATALOSS naming the buffer that no longer
 * holds what was attached ("ranks[1] shm \"/eplb-x\" shrank to 0 bytes, the
 * layout needs 24576: its experts are lost").  Cost: one fstat per rank
 * (cpu); nothing (hip). */
eplb_status eplb_backend_check(eplb_backend *b, eplb_error *err);

/* Phase 1 of one layer (all tensors of the layer).  The plan must have been
 * built for this description's P and G; each op is checked against them
 * (EPLB_EINVAL, nothing touched).  Returns EPLB_OK; EPLB_EINTERNAL (nothing
 * written, staging dropped); EPLB_EDATALOSS (the buffers are lost); EPLB_ENOMEM
 * (staging could not grow; nothing written). */
eplb_status eplb_backend_gather(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                eplb_error *err);

/* Phase 2 of `layer`, which must be the layer of the last successful
 * gather, with the same plan (the caller's contract: the backend does not
 * fingerprint plans; a plan with another staging count is refused).
 * Returns EPLB_OK; EPLB_EPRECONDITION (no completed gather of this layer:
 * nothing written; EPLB_EDATALOSS instead when the buffers are lost, which
 * is what the caller must act on); EPLB_EINVAL (malformed plan: nothing
 * written);
 * EPLB_EDATALOSS (some slots written: scatter again to complete the layer;
 * or the buffers are lost, and a retry says so again). */
eplb_status eplb_backend_scatter(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                 eplb_error *err);

/* gather then scatter once, no retry: for benchmarks and tools that do not
 * need the phases apart (the registry's mover does: rpc_weights.c). */
eplb_status eplb_backend_execute_layer(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                       eplb_error *err);

eplb_status eplb_backend_synchronize(eplb_backend *b, eplb_error *err);

/* Does b order its copies with device events (hip, cuda: yes; cpu: no)? */
bool eplb_backend_has_events(const eplb_backend *b);

/* Make b's copy streams wait for the engine's event (len bytes at handle: an
 * hipIpcEventHandle_t / cudaIpcEventHandle_t of an event created with the
 * interprocess and disable-timing flags) before any copy queued after this
 * call.  EPLB_EINVAL: len is not EPLB_EVENT_HANDLE_SIZE, b has no events
 * ("events need a device backend"), or the handle does not open (nothing
 * queued, b stays usable); a broken backend answers as its phases do.
 * Cost: one IPC open per new handle, one stream wait per device. */
eplb_status eplb_backend_wait_event(eplb_backend *b, const uint8_t *handle, size_t len,
                                    eplb_error *err);

/* Record b's done event after everything queued so far on every copy
 * stream and write its IPC handle (the same bytes every call: one event per
 * backend, re-recorded).  EPLB_EINVAL when b has no events.  Cost: one
 * event record per device plus one cross-device wait per extra device. */
eplb_status eplb_backend_record_event(eplb_backend *b, uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                                      eplb_error *err);

/* Reserve staging once (eplb_backend_ops.reserve_staging): per layer
 * ([num_layers]) the most entries one held rank can stage (the mover
 * computes them from the slots per rank and the staging bound).
 * EPLB_ENOMEM when the runtime cannot allocate it (nothing kept).
 * Cost: one allocation per device, at attach instead of in a rebalance. */
eplb_status eplb_backend_reserve_staging(eplb_backend *b, const uint32_t *layer_entries,
                                         uint64_t *total, uint64_t *per_gpu, eplb_error *err);

/* Close and free; NULL is fine. */
void eplb_backend_close(eplb_backend *b);

/* Arm the fault hook: the countdown-th plan op (1 = the next) of phase,
 * counted across all backends of the process from now on, fails once; then
 * the hook is inert again.  countdown <= 0 or EPLB_FAULT_NONE disarms it. */
void eplb_backend_set_fault(eplb_fault_phase phase, int countdown);

/* Tests: hook(phase, arg) is called before each plan op of either phase,
 * after the countdown above; nonzero fails that op as an armed fault does.
 * It may do anything else first (the tests shrink a buffer there, so that
 * the very next copy runs into SIGBUS).  NULL uninstalls it. */
void eplb_backend_set_fault_hook(int (*hook)(eplb_fault_phase phase, void *arg), void *arg);

#endif
