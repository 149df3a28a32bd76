/* userfaultfd ioctls and guest-memory shims: thin, EINTR-safe, -errno. */
#define _GNU_SOURCE
#include "uffd.h"
#include "core.h"

#include <alloca.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_userfaultfd
#error "the build host does not know the userfaultfd syscall number"
#endif

static int ioctl_retry(int fd, unsigned long req, void *arg)
{
    for (;;) {
        if (ioctl(fd, req, arg) == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

int pc_uffd_open_syscall(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

int pc_uffd_open_device(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = fd < 0 ? -errno : fd;
    close(dev);
    return err;
}

int pc_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    int rc = ioctl_retry(fd, UFFDIO_API, &api);
    if (rc == 0) {
        *features_out = api.features;
        *ioctls_out = api.ioctls;
    }
    return rc;
}

int pc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
    struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
    int rc = ioctl_retry(fd, UFFDIO_REGISTER, &reg);
    if (rc == 0 && ioctls_out)
        *ioctls_out = reg.ioctls;
    return rc;
}

int pc_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl_retry(fd, UFFDIO_UNREGISTER, &r);
}

/* COPY/ZEROPAGE/CONTINUE/POISON may stop part way. The kernel reports a
 * partial success as -EAGAIN with the progress in the struct: resume after
 * it (and after EINTR) so the caller sees the real reason for a stop, e.g.
 * EEXIST at the first present page. -EAGAIN with no progress means the
 * mapping is changing (a non-cooperative event is pending). */
static int resume(int rc, int64_t step)
{
    return rc == -EINTR || (rc == -EAGAIN && step > 0);
}
int pc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied)
{
    int64_t done = 0;
    for (;;) {
        struct uffdio_copy c = { .dst = dst + done, .src = src + done, .len = len - done, .mode = mode };
        int rc = ioctl(fd, UFFDIO_COPY, &c) == 0 ? 0 : -errno;
        int64_t step = c.copy > 0 ? c.copy : 0;
        done += step;
        if (resume(rc, step) && (uint64_t)done < len)
            continue;
        if (copied)
            *copied = done;
        return (uint64_t)done >= len ? 0 : rc;
    }
}

int pc_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *zeroed)
{
    int64_t done = 0;
    for (;;) {
        struct uffdio_zeropage z = { .range = { .start = dst + done, .len = len - done }, .mode = mode };
        int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : -errno;
        int64_t step = z.zeropage > 0 ? z.zeropage : 0;
        done += step;
        if (resume(rc, step) && (uint64_t)done < len)
            continue;
        if (zeroed)
            *zeroed = done;
        return (uint64_t)done >= len ? 0 : rc;
    }
}

int pc_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped)
{
    int64_t done = 0;
    for (;;) {
        struct pc_uffdio_continue c = { .range = { .start = start + done, .len = len - done }, .mode = mode };
        int rc = ioctl(fd, UFFDIO_CONTINUE, &c) == 0 ? 0 : -errno;
        int64_t step = c.mapped > 0 ? c.mapped : 0;
        done += step;
        if (resume(rc, step) && (uint64_t)done < len)
            continue;
        if (mapped)
            *mapped = done;
        return (uint64_t)done >= len ? 0 : rc;
    }
}

int pc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated)
{
    int64_t done = 0;
    for (;;) {
        struct pc_uffdio_poison p = { .range = { .start = start + done, .len = len - done }, .mode = mode };
        int rc = ioctl(fd, UFFDIO_POISON, &p) == 0 ? 0 : -errno;
        int64_t step = p.updated > 0 ? p.updated : 0;
        done += step;
        if (resume(rc, step) && (uint64_t)done < len)
            continue;
        if (updated)
            *updated = done;
        return (uint64_t)done >= len ? 0 : rc;
    }
}

int pc_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = { .start = start, .len = len };
    return ioctl_retry(fd, UFFDIO_WAKE, &r);
}

int pc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect w = { .range = { .start = start, .len = len }, .mode = mode };
    return ioctl_retry(fd, UFFDIO_WRITEPROTECT, &w);
}

void pc_uffd_event_from_msg(const struct uffd_msg *msg, pc_uffd_event *out)
{
    memset(out, 0, sizeof(*out));
    out->event = msg->event;
    out->ufd = -1;
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        out->a = msg->arg.pagefault.address;
        out->b = msg->arg.pagefault.flags;
        out->tid = msg->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_FORK:
        out->ufd = (int32_t)msg->arg.fork.ufd;
        break;
    case UFFD_EVENT_REMAP:
        out->a = msg->arg.remap.from;
        out->b = msg->arg.remap.to;
        out->c = msg->arg.remap.len;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        out->a = msg->arg.remove.start;
        out->b = msg->arg.remove.end;
        break;
    default:
        break;
    }
}


int pc_uffd_read_events(int fd, pc_uffd_event *out, uint32_t max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64; /* one stack buffer; callers loop until -EAGAIN */
    if (max == 0)
        return -EINVAL;
    ssize_t n;
    do {
        n = read(fd, msgs, sizeof(msgs[0]) * max);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    uint32_t count = (uint32_t)(n / (ssize_t)sizeof(msgs[0]));
    for (uint32_t i = 0; i < count; i++)
        pc_uffd_event_from_msg(&msgs[i], &out[i]);
    return (int)count;
}

int pc_mem_map(int fd, uint64_t len, uint64_t *addr_out)
{
    void *p = fd < 0 ? mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                     : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    *addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

int pc_mem_unmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) == 0 ? 0 : -errno;
}

int pc_mem_remap(uint64_t old_addr, uint64_t len, uint64_t new_addr, uint64_t *new_addr_out)
{
    void *p = new_addr ? mremap((void *)(uintptr_t)old_addr, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(uintptr_t)new_addr)
                       : mremap((void *)(uintptr_t)old_addr, len, len, MREMAP_MAYMOVE);
    if (p == MAP_FAILED)
        return -errno;
    *new_addr_out = (uint64_t)(uintptr_t)p;
    return 0;
}

static int madvise_retry(uint64_t addr, uint64_t len, int advice)
{
    for (;;) {
        if (madvise((void *)(uintptr_t)addr, len, advice) == 0)
            return 0;
        if (errno != EINTR && errno != EAGAIN)
            return -errno;
    }
}

int pc_mem_madvise_dontneed(uint64_t addr, uint64_t len) { return madvise_retry(addr, len, MADV_DONTNEED); }
int pc_mem_madvise_remove(uint64_t addr, uint64_t len) { return madvise_retry(addr, len, MADV_REMOVE); }
int pc_mem_populate_write(uint64_t addr, uint64_t len) { return madvise_retry(addr, len, MADV_POPULATE_WRITE); }

static int fallocate_retry(int fd, int mode, uint64_t offset, uint64_t len)
{
    for (;;) {
        if (fallocate(fd, mode, (off_t)offset, (off_t)len) == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

int pc_mem_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    return fallocate_retry(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
}

int pc_mem_prefill(int fd, uint64_t offset, uint64_t len)
{
    return fallocate_retry(fd, 0, offset, len);
}

uint64_t pc_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* struct sched_attr up to its VER1 fields (glibc before 2.41 does not declare it). */
struct pc_sched_attr {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};
#define PC_SCHED_FLAG_KEEP_POLICY 0x08

/* A thread raised below nice 0 waits on the network or the kernel most of the time and
 * must run the moment it wakes: with its slice this short, EEVDF (Linux >= 6.12)
 * preempts a running background thread at once instead of letting it finish its
 * own slice (1.4 ms on 2 CPUs). Other threads get the default slice back. */
#define PC_URGENT_SLICE_NS 100000u

int pc_thread_set_nice_of(uint32_t tid, int nice)
{
    struct pc_sched_attr a = { .size = sizeof(a), .sched_flags = PC_SCHED_FLAG_KEEP_POLICY, .sched_nice = nice,
                               .sched_runtime = nice < 0 ? PC_URGENT_SLICE_NS : 0 };
    if (syscall(SYS_sched_setattr, (pid_t)tid, &a, 0) == 0)
        return 0;
    int err = errno;
    if (err == EPERM && nice < 0) {     /* no CAP_SYS_NICE: the short slice alone needs no privilege */
        errno = 0;
        a.sched_nice = getpriority(PRIO_PROCESS, (id_t)tid);
        if (errno == 0)
            (void)syscall(SYS_sched_setattr, (pid_t)tid, &a, 0);
    } else if (err == EINVAL || err == ENOSYS) {    /* a kernel before 5.3 (no KEEP_POLICY) */
        id_t who = tid ? (id_t)tid : (id_t)syscall(SYS_gettid);
        err = setpriority(PRIO_PROCESS, who, nice) == 0 ? 0 : errno;
    }
    return -err;
}

int pc_malloc_one_arena(void)
{
    /* glibc gives each new thread that allocates its own malloc arena: fresh memory whose first
     * pages are touched at the thread's first allocations. The roles' threads make theirs when
     * the switch releases them (the fault service, the preempt receiver), and on a host that
     * backs memory lazily those page faults cost 20-60 us each, 1-3 ms of the downtime. One
     * arena, warm long before: the hot paths are C with their buffers allocated beforehand. */
    return mallopt(M_ARENA_MAX, 1) ? 0 : -EINVAL;
}

int pc_thread_set_nice(int nice)
{
    return pc_thread_set_nice_of(0, nice);
}

/* pc_lock_wait_probe: a thread holds the lock busy (as one inside a send) for hold_ns. */
struct lock_probe {
    pthread_mutex_t m;
    uint64_t hold_ns;
    int held;
};

static void *lock_probe_holder(void *arg)
{
    struct lock_probe *p = arg;
    pthread_mutex_lock(&p->m);
    __atomic_store_n(&p->held, 1, __ATOMIC_RELEASE);
    uint64_t until = pc_now_ns() + p->hold_ns;
    while (pc_now_ns() < until)
        pc_cpu_relax();
    pthread_mutex_unlock(&p->m);
    return NULL;
}

int64_t pc_lock_wait_probe(uint64_t hold_ns, uint64_t spin_ns)
{
    struct lock_probe p = { .m = PTHREAD_MUTEX_INITIALIZER, .hold_ns = hold_ns };
    pthread_t t;
    int rc = pthread_create(&t, NULL, lock_probe_holder, &p);
    if (rc)
        return -rc;
    while (!__atomic_load_n(&p.held, __ATOMIC_ACQUIRE))
        sched_yield();
    struct rusage before, after;
    getrusage(RUSAGE_THREAD, &before);
    pc_mutex_lock_spinning(&p.m, spin_ns);
    getrusage(RUSAGE_THREAD, &after);
    pthread_mutex_unlock(&p.m);
    pthread_join(t, NULL);
    return after.ru_nvcsw - before.ru_nvcsw;
}

void pc_thread_set_name(const char *name)
{
    char cut[16];   /* the kernel keeps 15 bytes and a NUL */
    snprintf(cut, sizeof(cut), "%s", name);
    (void)pthread_setname_np(pthread_self(), cut);
}

void pc_thread_touch_stack(uint64_t bytes)
{
    volatile uint8_t *below = alloca(bytes);
    for (uint64_t i = 0; i < bytes; i += 4096)
        below[i] = 0;
}
