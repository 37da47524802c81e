/* eplb_buffers.c -- validation of the engine's buffer description
 * (eplb_buffers_validate) and the checked open of a shm object
 * (eplb_shm_open_checked).  Reads shm objects' metadata; writes nothing. */
#define _GNU_SOURCE /* qsort_r */
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
    uint32_t region, layer, tensor, slot;
} segment;

static int cmp_segment(const void *a, const void *b) {
    const segment *x = a, *y = b;
    if (x->region != y->region)
        return x->region < y->region ? -1 : 1;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

static bool terminated(const char *s, size_t cap) { return memchr(s, '\0', cap) != NULL; }

static eplb_status check_shm_name(const char *name, uint32_t g, uint32_t r, eplb_error *err) {
    if (!terminated(name, EPLB_SHM_NAME_MAX + 1))
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].shm_name is not NUL-terminated within "
                              "%d bytes", g, r, EPLB_SHM_NAME_MAX);
    size_t n = strlen(name);
    if (n < 2 || name[0] != '/' || strchr(name + 1, '/'))
        return eplb_error_set(err, EPLB_EINVAL,
                              "ranks[%u].regions[%u].shm_name \"%s\" must be \"/\" followed by 1..%d bytes "
                              "without '/'", g, r, name, EPLB_SHM_NAME_MAX - 1);
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

/* Open and fstat held rank g's region r; type always checked, prefix and
 * owner when policy is not NULL. */
static eplb_status open_shm(const eplb_buffers_desc *d, const eplb_shm_policy *policy, uint32_t g, uint32_t r,
                            int oflag, int *fd, uint64_t *size, eplb_error *err) {
    *fd = -1;
    const char *name = d->ranks[g].regions[r].shm_name;
    eplb_status st = check_shm_name(name, g, r, err);
    if (st != EPLB_OK)
        return st;
    if (policy && policy->prefix && policy->prefix[0] &&
        strncmp(name, policy->prefix, strlen(policy->prefix)) != 0)
        return eplb_error_set(err, EPLB_EPERM,
                              "ranks[%u].regions[%u].shm_name \"%s\" is not under the allowed prefix \"%s\"",
                              g, r, name, policy->prefix);
    /* O_NOFOLLOW: a symlink planted under the prefix must not lead us to
     * another object; O_NONBLOCK: opening a FIFO must not hang a worker. */
    int f = shm_open(name, oflag | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0);
    if (f < 0) {
        int e = errno;
        if (e == ELOOP)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "ranks[%u].regions[%u].shm_name \"%s\" is a symbolic link (refused)", g, r,
                                  name);
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].shm_name \"%s\": shm_open: %s", g, r,
                              name, strerror(e));
    }
    struct stat sb;
    if (fstat(f, &sb) != 0) {
        int e = errno;
        close(f);
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].shm_name \"%s\": fstat: %s", g, r, name,
                              strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(f);
        return eplb_error_set(err, EPLB_EINVAL,
                              "ranks[%u].regions[%u].shm_name \"%s\" is not a regular file (mode 0%o)", g, r,
                              name, (unsigned)sb.st_mode);
    }
    if (policy && !owner_allowed(policy, sb.st_uid)) {
        char allowed[256];
        allowed_uids(policy, allowed, sizeof allowed);
        close(f);
        return eplb_error_set(err, EPLB_EPERM,
                              "ranks[%u].regions[%u].shm_name \"%s\" is owned by uid %u; allowed: %s", g, r,
                              name, (unsigned)sb.st_uid, allowed);
    }
    *fd = f;
    *size = (uint64_t)sb.st_size;
    return EPLB_OK;
}

eplb_status eplb_shm_open_checked(const eplb_buffers_desc *d, const eplb_shm_policy *policy,
                                  uint32_t g, uint32_t r, int oflag, int *fd, uint64_t *size,
                                  eplb_error *err) {
    return open_shm(d, policy ? policy : &default_policy, g, r, oflag, fd, size, err);
}

/* The size of held rank g's region r: SHM reads the object's size. */
static eplb_status region_size(const eplb_buffers_desc *d, uint32_t g, uint32_t ri, uint64_t *size,
                               eplb_error *err) {
    const eplb_region *r = &d->ranks[g].regions[ri];
    if (d->kind == EPLB_BUFFERS_SHM) {
        int fd;
        uint64_t real = 0;
        eplb_status st = open_shm(d, NULL, g, ri, O_RDONLY, &fd, &real, err);
        if (st != EPLB_OK)
            return st;
        close(fd);
        if (r->size > real)
            return eplb_error_set(err, EPLB_EINVAL,
                                  "ranks[%u].regions[%u].size %llu exceeds shm object \"%s\"'s %llu bytes", g,
                                  ri, (unsigned long long)r->size, r->shm_name, (unsigned long long)real);
        *size = r->size ? r->size : real;
        return EPLB_OK;
    }
    if (r->device < 0)
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].device %d must be >= 0", g, ri,
                              r->device);
    if (r->size == 0)
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].size must be > 0 for device buffers", g,
                              ri);
    if (d->kind == EPLB_BUFFERS_HIP_IPC || d->kind == EPLB_BUFFERS_CUDA_IPC) {
        static const uint8_t zero[EPLB_IPC_HANDLE_SIZE];
        if (memcmp(r->ipc_handle, zero, sizeof zero) == 0)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].ipc_handle is all zero", g, ri);
    } else if (r->device_ptr == 0) {
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u].device_ptr is 0", g, ri);
    } else if (r->device_ptr + r->size < r->device_ptr) {
        return eplb_error_set(err, EPLB_EINVAL, "ranks[%u].regions[%u]: device_ptr + size overflows", g, ri);
    }
    *size = r->size;
    return EPLB_OK;
}

/* One region, for the check that no two regions name the same memory. */
typedef struct region_ref {
    const eplb_region *r;
    uint32_t g, i;
} region_ref;

static int cmp_region(const void *a, const void *b, void *kindp) {
    const region_ref *x = a, *y = b;
    eplb_buffers_kind kind = *(const eplb_buffers_kind *)kindp;
    int c;
    switch (kind) {
    case EPLB_BUFFERS_SHM:
        c = strcmp(x->r->shm_name, y->r->shm_name);
        break;
    case EPLB_BUFFERS_DEVICE_PTR:
        c = x->r->device != y->r->device ? (x->r->device < y->r->device ? -1 : 1)
                                         : (x->r->device_ptr > y->r->device_ptr) - (x->r->device_ptr < y->r->device_ptr);
        break;
    default:
        c = memcmp(x->r->ipc_handle, y->r->ipc_handle, EPLB_IPC_HANDLE_SIZE);
        break;
    }
    return c;
}

/* Two regions (of one rank or of two) must not name the same memory: the
 * same shm name, the same IPC handle (one allocation block: tensors that
 * share a block are one region with several offsets), or overlapping
 * device ranges.  Sorted, so O(R log R) for R regions. */
static eplb_status check_regions_distinct(const eplb_buffers_desc *d, uint32_t G, size_t R, eplb_error *err) {
    region_ref *refs = malloc((R ? R : 1) * sizeof *refs);
    if (!refs)
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory checking %zu regions", R);
    size_t n = 0;
    for (uint32_t g = 0; g < G; g++)
        for (uint32_t i = 0; i < d->ranks[g].num_regions; i++)
            refs[n++] = (region_ref){ &d->ranks[g].regions[i], g, i };
    eplb_buffers_kind kind = d->kind;
    qsort_r(refs, n, sizeof *refs, cmp_region, &kind);
    eplb_status st = EPLB_OK;
    for (size_t k = 1; k < n && st == EPLB_OK; k++) {
        const region_ref *x = &refs[k - 1], *y = &refs[k];
        bool same = kind == EPLB_BUFFERS_DEVICE_PTR
                        ? x->r->device == y->r->device && y->r->device_ptr < x->r->device_ptr + x->r->size
                        : cmp_region(x, y, &kind) == 0;
        if (same)
            st = eplb_error_set(err, EPLB_EINVAL,
                                "ranks[%u].regions[%u] and ranks[%u].regions[%u] name the same memory "
                                "(tensors that share one allocation are one region at several offsets)",
                                x->g, x->i, y->g, y->i);
    }
    free(refs);
    return st;
}

eplb_status eplb_buffers_validate(const eplb_buffers_desc *d, uint32_t num_layers,
                                  uint32_t num_physical, uint32_t num_ranks, eplb_error *err) {
    if (!d)
        return eplb_error_set(err, EPLB_EINVAL, "buffer description is NULL");
    if (d->kind != EPLB_BUFFERS_SHM && d->kind != EPLB_BUFFERS_HIP_IPC &&
        d->kind != EPLB_BUFFERS_DEVICE_PTR && d->kind != EPLB_BUFFERS_CUDA_IPC)
        return eplb_error_set(err, EPLB_EINVAL, "kind %d is not shm, hip_ipc, cuda_ipc or device_ptr",
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
    uint32_t first, G;
    eplb_buffers_held(d, &first, &G);
    if (G == 0 || first >= num_ranks || G > num_ranks - first)
        return eplb_error_set(err, EPLB_EINVAL,
                              "first_rank %u and num_ranks %u: the held ranks must be 1..%u ranks within "
                              "the model's %u", d->first_rank, d->held_ranks, num_ranks, num_ranks);
    if (!d->ranks || (num_layers > 0 && !d->layers))
        return eplb_error_set(err, EPLB_EINVAL, "ranks or layers is NULL");
    const uint32_t S = num_physical / num_ranks;
    const bool device = d->kind != EPLB_BUFFERS_SHM;

    size_t R = 0;
    for (uint32_t g = 0; g < G; g++) {
        uint32_t n = d->ranks[g].num_regions;
        if (n == 0 || n > EPLB_BUFFERS_MAX_REGIONS || !d->ranks[g].regions)
            return eplb_error_set(err, EPLB_EINVAL, "ranks[%u] (EP rank %u) has %u regions; 1..%d allowed", g,
                                  first + g, n, EPLB_BUFFERS_MAX_REGIONS);
        R += n;
    }

    /* Layers and tensors: names, sizes, regions, strides, alignment. */
    size_t segs_max = 0;
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
            if (device && td->bytes_per_expert % 4)
                return eplb_error_set(err, EPLB_EINVAL,
                                      "layers[%u].tensors[%u] (%s).bytes_per_expert %llu is not a multiple of 4: "
                                      "device copies move 16- or 4-byte words", l, t, td->name,
                                      (unsigned long long)td->bytes_per_expert);
            if (!td->ranks)
                return eplb_error_set(err, EPLB_EINVAL, "layers[%u].tensors[%u] (%s).ranks is NULL",
                                      l, t, td->name);
            for (uint32_t g = 0; g < G; g++) {
                const eplb_tensor_layout *tl = &td->ranks[g];
                if (tl->region >= d->ranks[g].num_regions)
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "layers[%u].tensors[%u] (%s).ranks[%u].region %u: rank %u has %u "
                                          "region(s)", l, t, td->name, g, tl->region, first + g,
                                          d->ranks[g].num_regions);
                if (tl->stride < td->bytes_per_expert)
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "layers[%u].tensors[%u] (%s).ranks[%u].stride %llu < "
                                          "bytes_per_expert %llu", l, t, td->name, g,
                                          (unsigned long long)tl->stride,
                                          (unsigned long long)td->bytes_per_expert);
                if (device && (tl->offset % 4 || tl->stride % 4))
                    return eplb_error_set(err, EPLB_EINVAL,
                                          "layers[%u].tensors[%u] (%s).ranks[%u]: offset %llu and stride %llu "
                                          "must be multiples of 4 for device memory", l, t, td->name, g,
                                          (unsigned long long)tl->offset, (unsigned long long)tl->stride);
            }
            segs_max += S;
        }
    }
    /* Per region: its own fields and size (every region, before comparing
     * them), then that no two are the same memory; then every slot inside
     * its region, none overlapping.  Segments of a rank are gathered for
     * all its regions and sorted by (region, begin). */
    eplb_status st = EPLB_OK;
    segment *segs = malloc((segs_max ? segs_max : 1) * sizeof *segs);
    uint64_t *all_sizes = malloc((R ? R : 1) * sizeof *all_sizes);
    if (!segs || !all_sizes) {
        free(segs);
        free(all_sizes);
        return eplb_error_set(err, EPLB_ENOMEM, "out of memory checking %zu slots per rank", segs_max);
    }
    for (uint32_t g = 0, k = 0; g < G; g++)
        for (uint32_t ri = 0; ri < d->ranks[g].num_regions; ri++, k++) {
            st = region_size(d, g, ri, &all_sizes[k], err);
            if (st != EPLB_OK)
                goto done;
        }
    st = check_regions_distinct(d, G, R, err);
    if (st != EPLB_OK)
        goto done;
    const uint64_t *sizes = all_sizes;
    for (uint32_t g = 0; g < G; sizes += d->ranks[g].num_regions, g++) {
        size_t n = 0;
        for (uint32_t l = 0; l < num_layers; l++) {
            const eplb_layer_desc *ld = &d->layers[l];
            for (uint32_t t = 0; t < ld->num_tensors; t++) {
                const eplb_tensor_desc *td = &ld->tensors[t];
                const eplb_tensor_layout *lay = &td->ranks[g];
                uint64_t size = sizes[lay->region];
                /* Last slot's end: offset + (S-1)*stride + bytes, overflow-checked. */
                uint64_t span = 0, end = 0;
                if (__builtin_mul_overflow((uint64_t)(S - 1), lay->stride, &span) ||
                    __builtin_add_overflow(span, lay->offset, &end) ||
                    __builtin_add_overflow(end, td->bytes_per_expert, &end) || end > size) {
                    st = eplb_error_set(err, EPLB_EINVAL,
                                        "layers[%u].tensors[%u] (%s).ranks[%u]: offset %llu + %u "
                                        "slots of stride %llu does not fit regions[%u]'s %llu "
                                        "bytes", l, t, td->name, g,
                                        (unsigned long long)lay->offset, S,
                                        (unsigned long long)lay->stride, lay->region,
                                        (unsigned long long)size);
                    goto done;
                }
                for (uint32_t s = 0; s < S; s++) {
                    segment *sg = &segs[n++];
                    sg->region = lay->region;
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
            if (segs[i].region == segs[i - 1].region && segs[i].begin < segs[i - 1].end) {
                const segment *a = &segs[i - 1], *b = &segs[i];
                st = eplb_error_set(err, EPLB_EINVAL,
                                    "ranks[%u].regions[%u]: layers[%u].tensors[%u] (%s) slot %u overlaps "
                                    "layers[%u].tensors[%u] (%s) slot %u", g, b->region, b->layer, b->tensor,
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
    free(all_sizes);
    return st;
}
