/* eplb_backend.c -- the backend loader ("cpu" | "hip" | "cuda" | "auto"), the public
 * wrappers that validate arguments and the phase order (a scatter only of
 * the layer gathered last) before a backend runs, and the fault hooks.
 *
 * The choice of backend is made here, in one place:
 *   1. hip or cuda when the buffers live in device memory: GPU weights can
 *      only be moved by the GPU runtime (HIP; or CUDA, from the same source);
 *   2. cpu when they live in POSIX shared memory (and for every machine
 *      without a GPU runtime: it is always built and is the reference the
 *      GPU results are checked against).
 * The GPU backends are shared objects opened with dlopen, so one eplbd
 * binary runs where neither libamdhip64 nor a CUDA driver is installed. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eplb_backend.h"

struct eplb_backend {
    const eplb_backend_ops *ops;
    void *state;         /* the implementation's */
    uint32_t num_layers; /* L */
    uint32_t num_physical; /* P */
    uint32_t num_ranks;  /* G */
    uint32_t first_rank, held_ranks; /* the ranks this backend maps */
    /* The phase order, kept here for every backend: a scatter is only of the
     * layer whose gather succeeded last (its staging holds that layer). */
    bool gathered;
    uint32_t gathered_layer;
    uint32_t gathered_staging; /* that plan's num_staging: a cheap sanity check */
};

/* ======================================================================= */
/* Fault hook                                                               */
/* ======================================================================= */

static _Atomic int fault_phase;     /* eplb_fault_phase armed, 0 = inert */
static _Atomic int fault_countdown; /* ops of that phase left until the failing one */
/* The tests' hook and its argument (set while no move runs). */
static int (*_Atomic fault_hook)(eplb_fault_phase phase, void *arg);
static void *_Atomic fault_hook_arg;

void eplb_backend_set_fault_hook(int (*hook)(eplb_fault_phase phase, void *arg), void *arg) {
    atomic_store(&fault_hook, NULL);
    atomic_store(&fault_hook_arg, arg);
    atomic_store(&fault_hook, hook);
}

void eplb_backend_set_fault(eplb_fault_phase phase, int countdown) {
    atomic_store(&fault_phase, 0);
    if (phase == EPLB_FAULT_NONE || countdown <= 0)
        return;
    atomic_store(&fault_countdown, countdown);
    atomic_store(&fault_phase, (int)phase);
}

static int fault_check(eplb_fault_phase phase) {
    int (*hook)(eplb_fault_phase, void *) = atomic_load_explicit(&fault_hook, memory_order_acquire);
    if (atomic_load_explicit(&fault_phase, memory_order_relaxed) == (int)phase &&
        atomic_fetch_sub(&fault_countdown, 1) == 1) {
        atomic_store(&fault_phase, 0);
        return 1;
    }
    return hook ? hook(phase, atomic_load(&fault_hook_arg)) : 0;
}


/* ======================================================================= */
/* Loading the GPU shared objects                                           */
/* ======================================================================= */

/* One GPU backend shared object: where to look, and what loading it gave. */
typedef struct gpu_lib {
    const char *name;    /* "hip", "cuda" */
    const char *env;     /* variable naming its path */
    const char *library; /* file name */
    const char *symbol;  /* its get_ops */
    pthread_once_t once;
    const eplb_backend_ops *ops; /* NULL when it did not load */
    bool missing;        /* the .so itself is not installed (the normal no-GPU case) */
    char why[EPLB_ERROR_MSG_MAX]; /* why not, when it did not */
} gpu_lib;

static gpu_lib hip_lib = {"hip", "EPLB_HIP_BACKEND", EPLB_BACKEND_HIP_LIBRARY,
                          EPLB_BACKEND_HIP_SYMBOL, PTHREAD_ONCE_INIT, NULL, false, ""};
static gpu_lib cuda_lib = {"cuda", "EPLB_CUDA_BACKEND", EPLB_BACKEND_CUDA_LIBRARY,
                           EPLB_BACKEND_CUDA_SYMBOL, PTHREAD_ONCE_INIT, NULL, false, ""};

/* Search order: $ENV (a path: nothing else is tried, so a test or an
 * operator gets exactly that file), the running executable's directory,
 * then the dynamic linker's path.  A failure whose message names the file
 * itself as missing (not a library it needs, e.g. libamdhip64.so.5 on a
 * machine without ROCm) is "not installed". */
static void gpu_lib_load(gpu_lib *lib) {
    char path[PATH_MAX + 64];
    const char *file = lib->library;
    const char *env = getenv(lib->env);
    if (env && *env) {
        file = env;
    } else {
        ssize_t n = readlink("/proc/self/exe", path, PATH_MAX);
        if (n > 0) {
            path[n] = '\0';
            char *slash = strrchr(path, '/');
            if (slash) {
                snprintf(slash + 1, sizeof path - (size_t)(slash + 1 - path), "%s", lib->library);
                if (access(path, F_OK) == 0)
                    file = path;
            }
        }
    }
    void *h = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        size_t len = strlen(file);
        /* Only when searched by name: a path the operator gave that is
         * not there is a configuration error, said as such. */
        lib->missing = file == lib->library && e && strncmp(e, file, len) == 0 &&
                       e[len] == ':' && strstr(e, "No such file") != NULL;
        if (lib->missing)
            snprintf(lib->why, sizeof lib->why, "%s not installed", lib->library);
        else
            snprintf(lib->why, sizeof lib->why, "dlopen %s: %s", file, e ? e : "failed");
        return;
    }
    /* Never dlclose, even on the errors below: GPU runtimes do not unload
     * cleanly. */
    eplb_backend_get_ops_fn get = (eplb_backend_get_ops_fn)dlsym(h, lib->symbol);
    if (!get) {
        snprintf(lib->why, sizeof lib->why, "%s has no symbol %s", file, lib->symbol);
        return;
    }
    const eplb_backend_ops *ops = get();
    if (!ops || ops->abi != EPLB_BACKEND_ABI) {
        snprintf(lib->why, sizeof lib->why, "%s speaks backend ABI %u, eplbd speaks %u", file,
                 ops ? ops->abi : 0u, (unsigned)EPLB_BACKEND_ABI);
        return;
    }
    lib->ops = ops;
}

static void hip_load(void) { gpu_lib_load(&hip_lib); }
static void cuda_load(void) { gpu_lib_load(&cuda_lib); }

static const eplb_backend_ops *gpu_get(gpu_lib *lib, eplb_error *err) {
    pthread_once(&lib->once, lib == &hip_lib ? hip_load : cuda_load);
    if (!lib->ops)
        eplb_error_set(err, EPLB_EUNAVAILABLE, "%s backend unavailable: %s", lib->name, lib->why);
    return lib->ops;
}

/* Loaded and sees *devices >= 1; else why not (without the name) in *e. */
static bool gpu_usable(gpu_lib *lib, uint32_t *devices, eplb_error *e) {
    const eplb_backend_ops *ops = gpu_get(lib, e);
    *devices = 0;
    if (!ops) {
        snprintf(e->msg, sizeof e->msg, "%s", lib->why);
        return false;
    }
    if (ops->probe(devices, e) != EPLB_OK || *devices == 0) {
        if (e->msg[0] == '\0')
            snprintf(e->msg, sizeof e->msg, "no device");
        return false;
    }
    return true;
}

const char *eplb_backend_auto_name(char *why, size_t why_size) {
    eplb_error h, c;
    uint32_t n = 0;
    eplb_error_clear(&h);
    eplb_error_clear(&c);
    if (gpu_usable(&hip_lib, &n, &h)) {
        if (why)
            snprintf(why, why_size, "hip: %u device%s", n, n == 1 ? "" : "s");
        return "hip";
    }
    if (gpu_usable(&cuda_lib, &n, &c)) {
        if (why)
            snprintf(why, why_size, "cuda: %u device%s", n, n == 1 ? "" : "s");
        return "cuda";
    }
    /* The normal answer on a machine without GPUs (or without the GPU
     * builds): say so plainly; the details follow for when it is not. */
    if (why) {
        if (hip_lib.missing && cuda_lib.missing && !hip_lib.ops && !cuda_lib.ops)
            snprintf(why, why_size, "cpu: no GPU backend installed (%s, %s not found)",
                     EPLB_BACKEND_HIP_LIBRARY, EPLB_BACKEND_CUDA_LIBRARY);
        else
            snprintf(why, why_size, "cpu: no GPU backend usable here (hip: %.200s; cuda: %.200s)",
                     h.msg, c.msg);
    }
    return "cpu";
}

eplb_status eplb_backend_usable(const char *name, eplb_error *err) {
    gpu_lib *lib;
    if (!name)
        return eplb_error_set(err, EPLB_EINVAL, "backend name is NULL");
    if (strcmp(name, "cpu") == 0 || strcmp(name, "auto") == 0)
        return EPLB_OK;
    if (strcmp(name, "hip") == 0)
        lib = &hip_lib;
    else if (strcmp(name, "cuda") == 0)
        lib = &cuda_lib;
    else
        return eplb_error_set(err, EPLB_EINVAL, "backend \"%s\" is not cpu, hip, cuda or auto",
                              name);
    eplb_error e;
    uint32_t n = 0;
    eplb_error_clear(&e);
    if (!gpu_usable(lib, &n, &e))
        return eplb_error_set(err, EPLB_EUNAVAILABLE, "%s backend unusable: %s", name, e.msg);
    return EPLB_OK;
}

/* ======================================================================= */
/* Public wrappers                                                          */
/* ======================================================================= */

eplb_status eplb_backend_open_by_name(const char *name, const eplb_buffers_desc *desc,
                                      uint32_t num_physical, eplb_backend **out,
                                      eplb_error *err) {
    return eplb_backend_open(name, desc, NULL, num_physical, out, err);
}

eplb_status eplb_backend_open(const char *name, const eplb_buffers_desc *desc,
                              const eplb_shm_policy *policy, uint32_t num_physical,
                              eplb_backend **out, eplb_error *err) {
    static const eplb_shm_policy default_policy = {NULL, NULL, 0};
    if (!out)
        return eplb_error_set(err, EPLB_EINVAL, "backend output is NULL");
    *out = NULL;
    if (!name || !desc)
        return eplb_error_set(err, EPLB_EINVAL, "backend name or buffer description is NULL");
    eplb_status st = eplb_buffers_validate(desc, desc->num_layers, num_physical, desc->num_ranks,
                                           err);
    if (st != EPLB_OK)
        return st;
    bool device = desc->kind != EPLB_BUFFERS_SHM;
    const eplb_backend_ops *ops;
    /* auto: shm -> cpu; IPC handles -> the runtime that made them; device
     * pointers -> whichever GPU backend eplb_backend_auto_name picks. */
    if (strcmp(name, "auto") == 0 && device) {
        char why[EPLB_ERROR_MSG_MAX];
        name = desc->kind == EPLB_BUFFERS_HIP_IPC    ? "hip"
               : desc->kind == EPLB_BUFFERS_CUDA_IPC ? "cuda"
                                                     : eplb_backend_auto_name(why, sizeof why);
        if (strcmp(name, "cpu") == 0)
            return eplb_error_set(err, EPLB_EUNAVAILABLE, "device buffers, but %s", why);
    }
    if (strcmp(name, "cpu") == 0 || (strcmp(name, "auto") == 0 && !device)) {
        ops = &eplb_backend_cpu_ops;
    } else if (strcmp(name, "hip") == 0 || strcmp(name, "cuda") == 0) {
        if ((desc->kind == EPLB_BUFFERS_HIP_IPC && name[0] != 'h') ||
            (desc->kind == EPLB_BUFFERS_CUDA_IPC && name[0] != 'c'))
            return eplb_error_set(err, EPLB_EINVAL, "the %s backend cannot open %s IPC handles",
                                  name, name[0] == 'h' ? "CUDA" : "HIP");
        ops = gpu_get(name[0] == 'h' ? &hip_lib : &cuda_lib, err);
        if (!ops)
            return EPLB_EUNAVAILABLE;
    } else {
        return eplb_error_set(err, EPLB_EINVAL, "backend \"%s\" is not cpu, hip, cuda or auto",
                              name);
    }
    if (ops == &eplb_backend_cpu_ops && device)
        return eplb_error_set(err, EPLB_EINVAL,
                              "the cpu backend maps shm buffers; these are device buffers");
    if (ops != &eplb_backend_cpu_ops && !device)
        return eplb_error_set(err, EPLB_EINVAL,
                              "the %s backend moves device buffers; these are shm buffers",
                              ops->name);
    eplb_backend *b = calloc(1, sizeof *b);
    if (!b)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory opening a backend");
    const eplb_backend_env env = {fault_check, policy ? policy : &default_policy};
    st = ops->open(desc, num_physical, &env, &b->state, err);
    if (st != EPLB_OK) {
        free(b);
        return st;
    }
    b->ops = ops;
    b->num_layers = desc->num_layers;
    b->num_physical = num_physical;
    b->num_ranks = desc->num_ranks;
    eplb_buffers_held(desc, &b->first_rank, &b->held_ranks);
    *out = b;
    return EPLB_OK;
}

const char *eplb_backend_name(const eplb_backend *b) { return b ? b->ops->name : "none"; }

static bool held(const eplb_backend *b, uint32_t gpu) {
    return gpu >= b->first_rank && gpu - b->first_rank < b->held_ranks;
}

void eplb_backend_held(const eplb_backend *b, uint32_t *first, uint32_t *count) {
    *first = b->first_rank;
    *count = b->held_ranks;
}

eplb_status eplb_backend_plan_held(const eplb_backend *b, uint32_t layer, const eplb_plan *p, eplb_error *err) {
    /* A bit per rank of the model: the ranks the plan needs that are not held. */
    uint32_t G = b->num_ranks, missing = 0;
    uint8_t *need = calloc((G + 7) / 8 ? (G + 7) / 8 : 1, 1);
    if (!need)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory checking the plan's ranks");
#define NEED(gpu)                                                                                  \
    do {                                                                                           \
        uint32_t g_ = (gpu);                                                                       \
        if (g_ < G && !held(b, g_) && !(need[g_ / 8] & (1u << (g_ % 8)))) {                       \
            need[g_ / 8] |= (uint8_t)(1u << (g_ % 8));                                            \
            missing++;                                                                             \
        }                                                                                          \
    } while (0)
    for (uint32_t i = 0; i < p->num_gather; i++) {
        NEED(p->gather[i].src_gpu);
        NEED(p->gather[i].dst_gpu);
    }
    for (uint32_t i = 0; i < p->num_scatter; i++) {
        NEED(p->scatter[i].src_gpu);
        NEED(p->scatter[i].dst_gpu);
    }
#undef NEED
    eplb_status st = EPLB_OK;
    if (missing) {
        char list[160];
        size_t len = 0;
        uint32_t shown = 0;
        for (uint32_t g = 0; g < G && len < sizeof list - 16; g++) /* ascending */
            if (need[g / 8] & (1u << (g % 8)))
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%u", shown++ ? ", " : "", g);
        if (shown < missing)
            snprintf(list + len, sizeof list - len, ", ...");
        st = eplb_error_set(err, EPLB_EPRECONDITION,
                            "layer %u: the plan needs EP rank(s) %s, which this server does not hold "
                            "(it holds ranks %u..%u): move them through the engine, or attach them here; "
                            "nothing was moved", layer, list, b->first_rank, b->first_rank + b->held_ranks - 1);
    }
    free(need);
    return st;
}

/* Every index a backend will dereference, checked against P, G and the
 * plan's own staging table, and every rank against the held range.
 * O(ops + staging). */
static eplb_status check_plan(const eplb_backend *b, uint32_t layer, const eplb_plan *p,
                              eplb_error *err) {
    const uint32_t P = b->num_physical, G = b->num_ranks, S = P / G;
    if (layer >= b->num_layers)
        return eplb_error_set(err, EPLB_EINVAL, "layer %u out of range (%u layers)", layer,
                              b->num_layers);
    if (!p)
        return eplb_error_set(err, EPLB_EINVAL, "layer %u: plan is NULL", layer);
    if (p->num_physical != P || p->num_gpus != G)
        return eplb_error_set(err, EPLB_EINVAL,
                              "layer %u: plan built for %u slots on %u GPUs, buffers have %u on %u",
                              layer, p->num_physical, p->num_gpus, P, G);
    if ((p->num_gather && !p->gather) || (p->num_scatter && !p->scatter) ||
        (p->num_staging && !p->staging) || p->num_scatter_wave0 > p->num_scatter)
        return eplb_error_set(err, EPLB_EINVAL, "layer %u: plan arrays inconsistent", layer);
    for (uint32_t k = 0; k < p->num_staging; k++)
        if (p->staging[k].gpu >= G)
            return eplb_error_set(err, EPLB_EINVAL, "layer %u: staging[%u].gpu %u >= %u", layer,
                                  k, p->staging[k].gpu, G);
    for (uint32_t i = 0; i < p->num_gather; i++) {
        const eplb_plan_op *op = &p->gather[i];
        if (op->kind != EPLB_OP_STAGE || op->src >= P || op->src_gpu != op->src / S ||
            op->dst >= p->num_staging || op->dst_gpu != p->staging[op->dst].gpu)
            return eplb_error_set(err, EPLB_EINVAL, "layer %u: gather op %u is malformed", layer,
                                  i);
    }
    for (uint32_t i = 0; i < p->num_scatter; i++) {
        const eplb_plan_op *op = &p->scatter[i];
        bool ok = op->dst < P && op->dst_gpu == op->dst / S;
        if (op->kind == EPLB_OP_UNSTAGE)
            ok = ok && op->src < p->num_staging && p->staging[op->src].gpu == op->dst_gpu &&
                 op->src_gpu == op->dst_gpu;
        else if (op->kind == EPLB_OP_COPY)
            ok = ok && op->src < P && op->src_gpu == op->src / S && op->src != op->dst;
        else
            ok = false;
        if (!ok)
            return eplb_error_set(err, EPLB_EINVAL, "layer %u: scatter op %u is malformed", layer,
                                  i);
    }
    if (b->held_ranks != G)
        return eplb_backend_plan_held(b, layer, p, err);
    return EPLB_OK;
}

eplb_status eplb_backend_check(eplb_backend *b, eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    return b->ops->check ? b->ops->check(b->state, err) : EPLB_OK;
}

eplb_status eplb_backend_gather(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    eplb_status st = check_plan(b, layer, plan, err);
    if (st != EPLB_OK)
        return st;
    /* From here on the old staging is being overwritten: no scatter of the
     * previous layer any more, whatever the result. */
    b->gathered = false;
    st = b->ops->gather(b->state, layer, plan, err);
    if (st == EPLB_OK) {
        b->gathered = true;
        b->gathered_layer = layer;
        b->gathered_staging = plan->num_staging;
    }
    return st;
}

eplb_status eplb_backend_scatter(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                 eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    eplb_status st = check_plan(b, layer, plan, err);
    if (st != EPLB_OK)
        return st;
    /* Refused below; but lost buffers are the better answer (the caller
     * must reload, not fix its call order). */
    if ((!b->gathered || b->gathered_layer != layer) && b->ops->check &&
        b->ops->check(b->state, err) == EPLB_EDATALOSS)
        return EPLB_EDATALOSS;
    if (!b->gathered)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "layer %u: scatter without a completed gather; nothing written",
                              layer);
    if (b->gathered_layer != layer)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "layer %u: scatter, but the layer gathered last is %u; nothing written",
                              layer, b->gathered_layer);
    if (b->gathered_staging != plan->num_staging)
        return eplb_error_set(err, EPLB_EPRECONDITION,
                              "layer %u: the scatter's plan has %u staging entries, the gathered "
                              "one %u: not the same plan; nothing written",
                              layer, plan->num_staging, b->gathered_staging);
    return b->ops->scatter(b->state, layer, plan, err);
}

eplb_status eplb_backend_execute_layer(eplb_backend *b, uint32_t layer, const eplb_plan *plan,
                                       eplb_error *err) {
    eplb_status st = eplb_backend_gather(b, layer, plan, err);
    return st == EPLB_OK ? eplb_backend_scatter(b, layer, plan, err) : st;
}

eplb_status eplb_backend_synchronize(eplb_backend *b, eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    return b->ops->synchronize(b->state, err);
}

bool eplb_backend_has_events(const eplb_backend *b) {
    return b && b->ops->wait_event && b->ops->record_event;
}

eplb_status eplb_backend_wait_event(eplb_backend *b, const uint8_t *handle, size_t len,
                                    eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    if (!eplb_backend_has_events(b))
        return eplb_error_set(err, EPLB_EINVAL,
                              "wait_event: events need a device backend (this one is %s)",
                              b->ops->name);
    if (!handle || len != EPLB_EVENT_HANDLE_SIZE)
        return eplb_error_set(err, EPLB_EINVAL, "wait_event is %zu bytes, want %d (an IPC event "
                              "handle)", len, EPLB_EVENT_HANDLE_SIZE);
    return b->ops->wait_event(b->state, handle, err);
}

eplb_status eplb_backend_record_event(eplb_backend *b, uint8_t handle[EPLB_EVENT_HANDLE_SIZE],
                                      eplb_error *err) {
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    if (!eplb_backend_has_events(b))
        return eplb_error_set(err, EPLB_EINVAL,
                              "done event: events need a device backend (this one is %s)",
                              b->ops->name);
    return b->ops->record_event(b->state, handle, err);
}

eplb_status eplb_backend_reserve_staging(eplb_backend *b, const uint32_t *layer_entries,
                                         uint64_t *total, uint64_t *per_gpu, eplb_error *err) {
    *total = *per_gpu = 0;
    if (!b)
        return eplb_error_set(err, EPLB_EINVAL, "backend is NULL");
    /* Staging of the previous layer may be dropped: no scatter of it after this. */
    b->gathered = false;
    return b->ops->reserve_staging(b->state, layer_entries, total, per_gpu, err);
}

void eplb_backend_close(eplb_backend *b) {
    if (!b)
        return;
    b->ops->close(b->state);
    free(b);
}
