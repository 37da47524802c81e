/* eplb_buffers.c -- validation of the engine's buffer description
 * (eplb_buffers_validate) and the checked open of a shm object
 * (eplb_shm_open_checked).  Reads shm objects' metadata; writes nothing. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eplb_backend.h"

/* One slot's bytes in a rank's mapping, for the overlap check. */
typedef struct segment {
    uint64_t begin, end;
    uint32_t layer, tensor, slot;
} segment;

static int cmp_segment(const void *a, const void *b) {
    const segment *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

static bool terminated(const char *s, size_t cap) { return memchr(s, '\0', cap) != NULL; }

static eplb_status check_shm_name(const char *name, uint32_t g, eplb_error *err) {
    if (!terminated(name, EPLB_SHM_NAME_MAX + 1))
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].shm_name is not NUL-terminated within "
                              "%d bytes", g, EPLB_SHM_NAME_MAX);
    size_t n = strlen(name);
    if (n < 2 || name[0] != '/' || strchr(name + 1, '/'))
        return eplb_error_set(err, EPLB_EINVAL,
                              "ranks[%u].shm_name \"%s\" must be \"/\" followed by 1..%d bytes "
                              "without '/'", g, name, EPLB_SHM_NAME_MAX - 1);
    return EPLB_OK;
}

static const eplb_shm_policy default_policy = {NULL, NULL, 0};

/* "0 (this process), 1000, 1001" */
static void allowed_uids(const eplb_shm_policy *p, char *out, size_t cap) {
    size_t len = (size_t)snprintf(out, cap, "%u (this process)", (unsigned)geteuid());
    for (uint32_t i = 0; i < p->num_uids && p->uids && len < cap; i++)
        len += (size_t)snprintf(out + len, cap - len, ", %u", (unsigned)p->uids[i]);
}

static bool owner_allowed(const eplb_shm_policy *p, uid_t uid) {
    if (uid == geteuid())
        return true;
    for (uint32_t i = 0; i < p->num_uids && p->uids; i++)
        if ((uid_t)p->uids[i] == uid)
            return true;
    return false;
}

/* Open and fstat rank g's object; type always checked, prefix and owner when
 * policy is not NULL. */
static eplb_status open_shm(const eplb_buffers_desc *d, const eplb_shm_policy *policy, uint32_t g,
                            int oflag, int *fd, uint64_t *size, eplb_error *err) {
    *fd = -1;
    const char *name = d->ranks[g].shm_name;
    eplb_status st = check_shm_name(name, g, err);
    if (st != EPLB_OK)
        return st;
    if (policy && policy->prefix && policy->prefix[0] &&
        strncmp(name, policy->prefix, strlen(policy->prefix)) != 0)
        return eplb_error_set(err, EPLB_EPERM,
                              "ranks[%u].shm_name \"%s\" is not under the allowed prefix \"%s\"", g,
                              name, policy->prefix);
    /* O_NOFOLLOW: a symlink planted under the prefix must not lead us to
     * another object; O_NONBLOCK: opening a FIFO must not hang a worker. */
    int f = shm_open(name, oflag | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0);
    if (f < 0) {
        int e = errno;
        if (e == ELOOP)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "ranks[%u].shm_name \"%s\" is a symbolic link (refused)", g, name);
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].shm_name \"%s\": shm_open: %s", g, name,
                              strerror(e));
    }
    struct stat sb;
    if (fstat(f, &sb) != 0) {
        int e = errno;
        close(f);
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].shm_name \"%s\": fstat: %s", g, name,
                              strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(f);
        return eplb_error_set(err, EPLB_EINVAL,
                              "ranks[%u].shm_name \"%s\" is not a regular file (mode 0%o)", g, name,
                              (unsigned)sb.st_mode);
    }
    if (policy && !owner_allowed(policy, sb.st_uid)) {
        char allowed[256];
        allowed_uids(policy, allowed, sizeof allowed);
        close(f);
        return eplb_error_set(err, EPLB_EPERM,
                              "ranks[%u].shm_name \"%s\" is owned by uid %u; allowed: %s", g, name,
                              (unsigned)sb.st_uid, allowed);
    }
    *fd = f;
    *size = (uint64_t)sb.st_size;
    return EPLB_OK;
}

eplb_status eplb_shm_open_checked(const eplb_buffers_desc *d, const eplb_shm_policy *policy,
                                  uint32_t g, int oflag, int *fd, uint64_t *size,
                                  eplb_error *err) {
    return open_shm(d, policy ? policy : &default_policy, g, oflag, fd, size, err);
}

/* The size of rank g's mapping: SHM reads the object's size. */
static eplb_status rank_size(const eplb_buffers_desc *d, uint32_t g, uint64_t *size,
                             eplb_error *err) {
    const eplb_rank_location *r = &d->ranks[g];
    if (d->kind == EPLB_BUFFERS_SHM) {
        int fd;
        uint64_t real = 0;
        eplb_status st = open_shm(d, NULL, g, O_RDONLY, &fd, &real, err);
        if (st != EPLB_OK)
            return st;
        close(fd);
        if (r->size > real)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "ranks[%u].size %llu exceeds shm object \"%s\"'s %llu bytes", g,
                                  (unsigned long long)r->size, r->shm_name,
                                  (unsigned long long)real);
        *size = r->size ? r->size : real;
        return EPLB_OK;
    }
    if (r->device < 0)
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].device %d must be >= 0", g, r->device);
    if (r->size == 0)
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].size must be > 0 for device buffers",
                              g);
    if (d->kind == EPLB_BUFFERS_HIP_IPC) {
        static const uint8_t zero[EPLB_IPC_HANDLE_SIZE];
        if (memcmp(r->ipc_handle, zero, sizeof zero) == 0)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].ipc_handle is all zero", g);
    } else if (r->device_ptr == 0) {
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].device_ptr is 0", g);
    } else if (r->device_ptr + r->size < r->device_ptr) {
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u]: device_ptr + size overflows", g);
    }
    *size = r->size;
    return EPLB_OK;
}

/* Two ranks must not name the same memory. */
static eplb_status check_ranks_distinct(const eplb_buffers_desc *d, eplb_error *err) {
    for (uint32_t a = 0; a < d->num_ranks; a++) {
        const eplb_rank_location *x = &d->ranks[a];
        for (uint32_t b = a + 1; b < d->num_ranks; b++) {
            const eplb_rank_location *y = &d->ranks[b];
            bool same = false;
            switch (d->kind) {
            case EPLB_BUFFERS_SHM:
                same = strcmp(x->shm_name, y->shm_name) == 0;
                break;
            case EPLB_BUFFERS_HIP_IPC:
                same = memcmp(x->ipc_handle, y->ipc_handle, EPLB_IPC_HANDLE_SIZE) == 0;
                break;
            case EPLB_BUFFERS_DEVICE_PTR:
                same = x->device == y->device && x->device_ptr < y->device_ptr + y->size &&
                       y->device_ptr < x->device_ptr + x->size;
                break;
            }
            if (same)
                return eplb_error_set(err, EPLB_EINVAL,
                                      "ranks[%u] and ranks[%u] name the same memory", a, b);
        }
    }
    return EPLB_OK;
}

eplb_status eplb_buffers_validate(const eplb_buffers_desc *d, uint32_t num_layers,
                                  uint32_t num_physical, uint32_t num_ranks, eplb_error *err) {
    if (!d)
        return eplb_error_set(err, EPLB_EINVAL, "buffer description is NULL");
    if (d->kind != EPLB_BUFFERS_SHM && d->kind != EPLB_BUFFERS_HIP_IPC &&
        d->kind != EPLB_BUFFERS_DEVICE_PTR)
        return eplb_error_set(err, EPLB_EINVAL, "kind %d is not shm, hip_ipc or device_ptr",
                              (int)d->kind);
    if (num_ranks == 0 || num_physical == 0 || num_physical % num_ranks != 0)
        return eplb_error_set(err, EPLB_EINVAL,
                              "shape: num_physical %u must be a positive multiple of num_ranks %u",
                              num_physical, num_ranks);
    if (d->num_layers != num_layers)
        return eplb_error_set(err, EPLB_EINVAL, "num_layers %u, the model has %u", d->num_layers,
                              num_layers);
    if (d->num_ranks != num_ranks)
        return eplb_error_set(err, EPLB_EINVAL, "num_ranks %u, the model has %u EP ranks",
                              d->num_ranks, num_ranks);
    if (!d->ranks || (num_layers > 0 && !d->layers))
        return eplb_error_set(err, EPLB_EINVAL, "ranks or layers is NULL");
    const uint32_t S = num_physical / num_ranks;

    /* Layers and tensors: names, sizes, strides. */
    size_t segs_per_rank = 0;
    for (uint32_t l = 0; l < num_layers; l++) {
        const eplb_layer_desc *ld = &d->layers[l];
        if (ld->num_tensors == 0 || ld->num_tensors > EPLB_BUFFERS_MAX_TENSORS || !ld->tensors)
            return eplb_error_set(err, EPLB_EINVAL, "layers[%u].num_tensors %u must be 1..%d", l,
                                  ld->num_tensors, EPLB_BUFFERS_MAX_TENSORS);
        for (uint32_t t = 0; t < ld->num_tensors; t++) {
            const eplb_tensor_desc *td = &ld->tensors[t];
            if (!terminated(td->name, sizeof td->name) || td->name[0] == '\0')
                return eplb_error_set(err, EPLB_EINVAL,
                                      "layers[%u].tensors[%u].name must be 1..%d bytes", l, t,
                                      EPLB_TENSOR_NAME_MAX);
            for (uint32_t u = 0; u < t; u++)
                if (strcmp(ld->tensors[u].name, td->name) == 0)
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "layers[%u].tensors[%u].name \"%s\" repeats tensors[%u]",
                                          l, t, td->name, u);
            if (td->bytes_per_expert == 0)
                return eplb_error_set(err, EPLB_EINVAL,
                                      "layers[%u].tensors[%u] (%s).bytes_per_expert must be >= 1",
                                      l, t, td->name);
            if (!td->ranks)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%u].tensors[%u] (%s).ranks is NULL",
                                      l, t, td->name);
            for (uint32_t g = 0; g < num_ranks; g++)
                if (td->ranks[g].stride < td->bytes_per_expert)
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "layers[%u].tensors[%u] (%s).ranks[%u].stride %llu < "
                                          "bytes_per_expert %llu", l, t, td->name, g,
                                          (unsigned long long)td->ranks[g].stride,
                                          (unsigned long long)td->bytes_per_expert);
            segs_per_rank += S;
        }
    }
    eplb_status st = check_ranks_distinct(d, err);
    if (st != EPLB_OK)
        return st;

    segment *segs = malloc((segs_per_rank ? segs_per_rank : 1) * sizeof *segs);
    if (!segs)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory checking %zu slots per rank",
                              segs_per_rank);
    for (uint32_t g = 0; g < num_ranks; g++) {
        uint64_t size = 0;
        st = rank_size(d, g, &size, err);
        if (st != EPLB_OK)
            goto done;
        size_t n = 0;
        for (uint32_t l = 0; l < num_layers; l++) {
            const eplb_layer_desc *ld = &d->layers[l];
            for (uint32_t t = 0; t < ld->num_tensors; t++) {
                const eplb_tensor_desc *td = &ld->tensors[t];
                const eplb_tensor_layout *lay = &td->ranks[g];
                /* Last slot's end: offset + (S-1)*stride + bytes, overflow-checked. */
                uint64_t span = 0, end = 0;
                if (__builtin_mul_overflow((uint64_t)(S - 1), lay->stride, &span) ||
                    __builtin_add_overflow(span, lay->offset, &end) ||
                    __builtin_add_overflow(end, td->bytes_per_expert, &end) || end > size) {
                    st = eplb_error_set(err, EPLB_EINVAL,
                                        "layers[%u].tensors[%u] (%s).ranks[%u]: offset %llu + %u "
                                        "slots of stride %llu does not fit the mapping's %llu "
                                        "bytes", l, t, td->name, g,
                                        (unsigned long long)lay->offset, S,
                                        (unsigned long long)lay->stride,
                                        (unsigned long long)size);
                    goto done;
                }
                for (uint32_t s = 0; s < S; s++) {
                    segment *sg = &segs[n++];
                    sg->begin = lay->offset + (uint64_t)s * lay->stride;
                    sg->end = sg->begin + td->bytes_per_expert;
                    sg->layer = l;
                    sg->tensor = t;
                    sg->slot = s;
                }
            }
        }
        qsort(segs, n, sizeof *segs, cmp_segment);
        for (size_t i = 1; i < n; i++) {
            if (segs[i].begin < segs[i - 1].end) {
                const segment *a = &segs[i - 1], *b = &segs[i];
                st = eplb_error_set(err, EPLB_EINVAL,
                                    "ranks[%u]: layers[%u].tensors[%u] (%s) slot %u overlaps "
                                    "layers[%u].tensors[%u] (%s) slot %u", g, b->layer, b->tensor,
                                    d->layers[b->layer].tensors[b->tensor].name, b->slot,
                                    a->layer, a->tensor,
                                    d->layers[a->layer].tensors[a->tensor].name, a->slot);
                goto done;
            }
        }
    }
    st = EPLB_OK;
done:
    free(segs);
    return st;
}
