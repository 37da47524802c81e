/* eplb_backend.h -- moving expert weights: the description of the engine's
 * buffers, their validation, and the backend interface that executes
 * transfer plans (eplb_plan.h) on them in place.
 *
 * What it is: one small interface (a struct of function pointers) with two
 * implementations -- "cpu" (memcpy over POSIX shared memory, always built)
 * and "hip" (kernels over HIP IPC memory; a shared object loaded at run time
 * with dlopen, so one eplbd binary runs with or without ROCm installed).
 * What it is not: it does not decide what moves (eplb_plan_build does), it
 * never allocates or frees the engine's buffers (addresses never change), and
 * it does not commit placements (the caller does, after a layer succeeds).
 *
 * Life of one rebalance (per layer, the caller holding the model's lock):
 *
 *     open(buffers) --> execute_layer(l, plan) --+--> ... --> synchronize --> close
 *                          |          ^          |
 *                          |          +- retry --+  (same layer, same plan)
 *     execute_layer runs   phase 1 GATHER: copy the old bytes a plan stages
 *                          into staging (no slot of the engine is written),
 *                          then phase 2 SCATTER: write the destination slots.
 *   - phase 1 fails (EPLB_EINTERNAL): every slot is as it was; staging is
 *     dropped; the next execute_layer starts from phase 1 again.
 *   - phase 2 fails (EPLB_EDATALOSS): some destination slots are written,
 *     others not.  Staging is kept: calling execute_layer again with the same
 *     layer and an identical plan re-runs phase 2 only (it is idempotent,
 *     eplb_plan.h invariant 4) and completes the layer.  If the caller gives
 *     up instead -- or runs another plan, or another layer, which drops the
 *     staging -- the layer's weights are inconsistent: the model needs a
 *     reload.
 *   - after a success, staging is also kept until synchronize, close or an
 *     execute_layer with another layer or plan: so a repeated execute_layer
 *     of a layer that already succeeded is harmless (it re-runs phase 2,
 *     never phase 1 on already-moved bytes, which would undo a swap).
 * One backend instance must not be used by two threads at once.
 *
 * Buffer description: per EP rank (GPU) one mapping -- a POSIX shm object
 * (cpu), a HIP IPC memory handle + device ordinal (hip), or, for engines that
 * load the backend in-process and for tests, a device pointer -- and per
 * (layer, tensor, rank) where that tensor's local slot 0 starts in the
 * mapping and the stride between slots.  Every tensor of a layer moves with
 * its expert (vLLM #47588 lost accuracy when scales moved without their
 * weights): execute_layer always moves all of them. */
#ifndef EPLB_BACKEND_H
#define EPLB_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "eplb_plan.h"
#include "eplb_status.h"

/* ======================================================================= */
/* Buffer description                                                       */
/* ======================================================================= */

#define EPLB_TENSOR_NAME_MAX 32    /* bytes, without the terminating NUL */
#define EPLB_SHM_NAME_MAX 255      /* NAME_MAX: "/" + up to 254 bytes */
#define EPLB_IPC_HANDLE_SIZE 64    /* sizeof(hipIpcMemHandle_t) */
#define EPLB_BUFFERS_MAX_TENSORS 64 /* per layer: w13, w2, scales, zeros... */

typedef enum eplb_buffers_kind {
    EPLB_BUFFERS_SHM = 1,       /* host memory: shm_open name per rank (cpu) */
    EPLB_BUFFERS_HIP_IPC = 2,   /* device memory: hipIpcMemHandle_t per rank (hip) */
    EPLB_BUFFERS_DEVICE_PTR = 3 /* device memory already mapped in this process (hip) */
} eplb_buffers_kind;

/* Where one EP rank's mapping is.  Only the fields of the description's
 * kind are read. */
typedef struct eplb_rank_location {
    char shm_name[EPLB_SHM_NAME_MAX + 1];      /* SHM: "/name", NUL-terminated */
    uint8_t ipc_handle[EPLB_IPC_HANDLE_SIZE];  /* HIP_IPC: the handle's bytes */
    uint64_t device_ptr;                       /* DEVICE_PTR: base address */
    int32_t device;                            /* HIP_IPC, DEVICE_PTR: ordinal here */
    uint64_t size;  /* bytes of the mapping.  SHM: 0 = the object's size,
                     * else at most the object's size (fstat).  HIP_IPC and
                     * DEVICE_PTR: required (the hip backend also checks it
                     * against the allocation's real size when it opens). */
} eplb_rank_location;

/* Where one tensor's slots are in one rank's mapping: local slot i (0-based
 * within the rank) occupies [offset + i*stride, offset + i*stride +
 * bytes_per_expert). */
typedef struct eplb_tensor_layout {
    uint64_t offset;
    uint64_t stride; /* >= bytes_per_expert */
} eplb_tensor_layout;

typedef struct eplb_tensor_desc {
    char name[EPLB_TENSOR_NAME_MAX + 1]; /* "w13", "w2_scale", ...; unique per layer */
    uint64_t bytes_per_expert;           /* >= 1 */
    const eplb_tensor_layout *ranks;     /* [num_ranks] */
} eplb_tensor_desc;

typedef struct eplb_layer_desc {
    uint32_t num_tensors;                /* 1..EPLB_BUFFERS_MAX_TENSORS */
    const eplb_tensor_desc *tensors;     /* [num_tensors] */
} eplb_layer_desc;

/* Caller-owned; backends copy what they keep. */
typedef struct eplb_buffers_desc {
    eplb_buffers_kind kind;
    uint32_t num_layers;                 /* L */
    uint32_t num_ranks;                  /* G, the EP size */
    const eplb_rank_location *ranks;     /* [G] */
    const eplb_layer_desc *layers;       /* [L] */
} eplb_buffers_desc;

/* Check a description against the registered shape (L layers, P slots, G
 * ranks) before any byte is touched: kind; counts; every shm name ("/x",
 * no other '/', NUL-terminated) and, for SHM, the object's size via
 * shm_open(O_RDONLY) + fstat (a missing object is EPLB_EINVAL too); every
 * IPC handle (not all zero), device ordinal (>= 0), device pointer (not 0)
 * and size; every tensor name (non-empty, NUL-terminated, unique in its
 * layer), bytes_per_expert (>= 1), stride (>= bytes_per_expert), that every
 * slot's bytes lie inside the rank's mapping (no overflow), and that no two
 * slots of any tensors of any layers overlap within a rank's mapping (a
 * write to one would corrupt another).
 * Returns EPLB_OK, or EPLB_EINVAL with a message naming the field, e.g.
 * "layers[3].tensors[1] (w2).ranks[5]: slot 8 ends at 4718592 past the
 * mapping's 4194304 bytes"; EPLB_ENOMEM when the overlap check cannot
 * allocate.  Touches nothing; err untouched on success.
 * Cost: O(G * L * T * S log(L * T * S)), S = P / G, T = tensors per layer. */
eplb_status eplb_buffers_validate(const eplb_buffers_desc *desc, uint32_t num_layers,
                                  uint32_t num_physical, uint32_t num_ranks, eplb_error *err);

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
} eplb_backend_env;

#define EPLB_BACKEND_ABI 1

/* One implementation.  The public wrappers below validate arguments
 * (layer range, plan shape and every op's indices) before calling these. */
typedef struct eplb_backend_ops {
    uint32_t abi;     /* EPLB_BACKEND_ABI */
    const char *name; /* "cpu", "hip" */
    /* Devices usable by this backend (cpu: 0).  EPLB_EUNAVAILABLE when its
     * runtime has none. */
    eplb_status (*probe)(uint32_t *num_devices, eplb_error *err);
    /* Map every rank's buffers (desc already validated).  On error nothing
     * stays mapped or allocated and *state is NULL. */
    eplb_status (*open)(const eplb_buffers_desc *desc, uint32_t num_physical,
                        const eplb_backend_env *env, void **state, eplb_error *err);
    /* Execute one layer's plan on every tensor of that layer; returns when
     * the copies are complete.  See the life of a rebalance above. */
    eplb_status (*execute_layer)(void *state, uint32_t layer, const eplb_plan *plan,
                                 eplb_error *err);
    /* Wait for outstanding work; drop staging. */
    eplb_status (*synchronize)(void *state, eplb_error *err);
    /* Unmap everything, free staging.  NULL is fine. */
    void (*close)(void *state);
} eplb_backend_ops;

extern const eplb_backend_ops eplb_backend_cpu_ops;

/* The symbol libeplb_backend_hip.so exports: returns its ops. */
#define EPLB_BACKEND_HIP_SYMBOL "eplb_backend_hip_get_ops"
#define EPLB_BACKEND_HIP_LIBRARY "libeplb_backend_hip.so"
typedef const eplb_backend_ops *(*eplb_backend_get_ops_fn)(void);

typedef struct eplb_backend eplb_backend; /* opaque */

/* Which backend "auto" means on this machine: "hip" when the HIP shared
 * object loads and its runtime reports >= 1 device, else "cpu"; why (when
 * not NULL) gets one line saying which and why, e.g. "cpu: dlopen
 * libeplb_backend_hip.so: ... cannot open shared object file".
 * The .so is searched as: $EPLB_HIP_BACKEND (a path), the directory of the
 * running executable, then the dynamic linker's path.  It is loaded once per
 * process and never unloaded (GPU runtimes do not unload cleanly). */
const char *eplb_backend_auto_name(char *why, size_t why_size);

/* Open a backend on the engine's buffers.
 *   name   "cpu", "hip" or "auto".  auto follows eplb_backend_auto_name,
 *          except that SHM buffers always go to cpu (only it maps shm) and
 *          device buffers never do (the cpu cannot reach them).
 *   desc   validated here first (eplb_buffers_validate) against
 *          (desc->num_layers, num_physical, desc->num_ranks).
 * Returns EPLB_OK; EPLB_EINVAL (bad name or description; a description of
 * the wrong kind for the backend); EPLB_EUNAVAILABLE (the hip .so does not
 * load, lacks the symbol or ABI, or sees no device); EPLB_EINTERNAL (a
 * runtime call failed: the message names it); EPLB_ENOMEM.  On error *out is
 * NULL and nothing is mapped. */
eplb_status eplb_backend_open_by_name(const char *name, const eplb_buffers_desc *desc,
                                      uint32_t num_physical, eplb_backend **out,
                                      eplb_error *err);

const char *eplb_backend_name(const eplb_backend *b);

/* Execute one layer's plan (all tensors of the layer).  The plan must have
 * been built for this description's P and G; each op is checked against
 * them (EPLB_EINVAL, nothing touched).  Returns EPLB_OK; EPLB_EINTERNAL for a
 * failure in phase 1 (nothing written); EPLB_EDATALOSS for a failure in
 * phase 2 (retry with the same layer and plan to complete it). */
eplb_status eplb_backend_execute_layer(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                       eplb_error *err);

eplb_status eplb_backend_synchronize(eplb_backend *b, eplb_error *err);

/* Close and free; NULL is fine. */
void eplb_backend_close(eplb_backend *b);

/* Arm the fault hook: the countdown-th plan op (1 = the next) of phase,
 * counted across all backends of the process from now on, fails once; then
 * the hook is inert again.  countdown <= 0 or EPLB_FAULT_NONE disarms it. */
void eplb_backend_set_fault(eplb_fault_phase phase, int countdown);

#endif
