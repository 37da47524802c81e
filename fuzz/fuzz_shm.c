/* fuzz_shm.c -- keep the fuzzers off real /dev/shm objects.
 *
 * The fuzz targets are linked with --wrap=shm_open,--wrap=shm_unlink, so
 * every shm_open and shm_unlink of the code under test (gpu/: the buffer
 * checks and the CPU backend of AttachWeights) lands here:
 *   - a name outside FUZZ_SHM_PREFIX is refused with EACCES, whatever the
 *     trust-boundary checks of the handler say;
 *   - a name inside it is renamed into this process's own namespace,
 *     "/eplb-fuzz.<pid>.<rest>", so parallel fuzzers (-jobs, -fork) never
 *     share an object;
 *   - O_CREAT and shm_unlink are refused: only the harness creates and
 *     removes objects (fuzz_shm_create, fuzz_shm_remove_all).
 * Objects of fuzzers that died without cleaning up (a crash, -fork children)
 * are removed when the next fuzzer starts. */
#include "fuzz_shm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int __real_shm_open(const char *name, int oflag, mode_t mode);
int __real_shm_unlink(const char *name);
void __sanitizer_set_death_callback(void (*callback)(void));

#define MAX_OBJECTS 16

static char created[MAX_OBJECTS][128];
static int num_created;

/* "/eplb-fuzz-<rest>" -> "/eplb-fuzz.<pid>.<rest>"; -1 if outside. */
static int real_name(const char *name, char *out, size_t n) {
    size_t plen = strlen(FUZZ_SHM_PREFIX);
    if (!name || strncmp(name, FUZZ_SHM_PREFIX, plen) != 0 || name[plen] == '\0' ||
        strchr(name + plen, '/'))
        return -1;
    int w = snprintf(out, n, "/eplb-fuzz.%ld.%s", (long)getpid(), name + plen);
    return w > 0 && (size_t)w < n ? 0 : -1;
}

int __wrap_shm_open(const char *name, int oflag, mode_t mode) {
    char real[256];
    if ((oflag & O_CREAT) || real_name(name, real, sizeof real) != 0) {
        errno = EACCES;
        return -1;
    }
    return __real_shm_open(real, oflag, mode);
}

int __wrap_shm_unlink(const char *name) {
    (void)name;
    errno = EACCES;
    return -1;
}

void fuzz_shm_remove_all(void) {
    for (int i = 0; i < num_created; i++)
        __real_shm_unlink(created[i]);
    num_created = 0;
}

/* Objects "/eplb-fuzz.<pid>.*" whose process is gone. */
static void remove_stale(void) {
    DIR *d = opendir("/dev/shm");
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, "eplb-fuzz.", 10) != 0)
            continue;
        long pid = strtol(e->d_name + 10, &end, 10);
        if (*end != '.' || pid <= 0 || pid == (long)getpid())
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        char path[300];
        snprintf(path, sizeof path, "/%s", e->d_name);
        __real_shm_unlink(path);
    }
    closedir(d);
}

void fuzz_shm_create(const char *suffix, size_t size) {
    static int registered;
    if (!registered) {
        registered = 1;
        remove_stale();
        atexit(fuzz_shm_remove_all);
        __sanitizer_set_death_callback(fuzz_shm_remove_all);
    }
    char name[128], real[128];
    snprintf(name, sizeof name, "%s%s", FUZZ_SHM_PREFIX, suffix);
    if (real_name(name, real, sizeof real) != 0 || num_created >= MAX_OBJECTS) {
        fprintf(stderr, "fuzz_shm: bad object %s\n", name);
        abort();
    }
    __real_shm_unlink(real);
    int fd = __real_shm_open(real, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) {
        perror("fuzz_shm: create");
        abort();
    }
    unsigned char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("fuzz_shm: mmap");
        abort();
    }
    for (size_t i = 0; i < size; i++)
        p[i] = (unsigned char)(i * 31u + 7u);
    munmap(p, size);
    close(fd);
    snprintf(created[num_created++], sizeof created[0], "%s", real);
}
