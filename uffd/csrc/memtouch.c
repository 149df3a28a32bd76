/* Memory touching from C threads (see memtouch.h). */
#define _GNU_SOURCE
#include "memtouch.h"
#include "core.h"
#include "uffd.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline volatile uint8_t *at(uint64_t addr) { return (volatile uint8_t *)(uintptr_t)addr; }


int pc_mt_read_byte(uint64_t addr) { return *at(addr); }
void pc_mt_write_byte(uint64_t addr, uint8_t value) { *at(addr) = value; }

uint64_t pc_mt_touch_range(uint64_t addr, uint64_t len, uint64_t stride, int write)
{
    uint64_t sum = 0;
    if (stride == 0)
        stride = 1;
    for (uint64_t off = 0; off < len; off += stride) {
        uint8_t v = *at(addr + off);
        sum += v;
        if (write)
            *at(addr + off) = (uint8_t)(v + 1);
    }
    return sum;
}

uint64_t pc_mt_sum(uint64_t addr, uint64_t len)
{
    uint64_t sum = 0, off = 0;
    const uint8_t *p = (const uint8_t *)(uintptr_t)addr;
    for (; off < len; off++)
        sum += p[off];
    return sum;
}

/* Byte k = seed + (k/4096)*7 + k (mod 256): within a 4 KiB page that is a
 * run of consecutive values, so whole runs are copied / compared from a ramp. */
#define RAMP_SIZE (4096 + 256)

static void init_ramp(uint8_t *ramp)
{
    for (unsigned i = 0; i < RAMP_SIZE; i++)
        ramp[i] = (uint8_t)i;
}

static inline const uint8_t *pattern_run(const uint8_t *ramp, uint64_t k, uint64_t seed, uint64_t len, uint64_t *n)
{
    uint64_t j = k & 4095;
    uint64_t start = (seed + (k >> 12) * 7 + j) & 0xff;
    *n = 4096 - j < len - k ? 4096 - j : len - k;
    return ramp + start;
}

void pc_mt_fill_pattern(uint64_t addr, uint64_t len, uint64_t seed)
{
    uint8_t ramp[RAMP_SIZE];
    init_ramp(ramp);
    uint8_t *p = (uint8_t *)(uintptr_t)addr;
    uint64_t n = 0;
    for (uint64_t k = 0; k < len; k += n) {
        const uint8_t *run = pattern_run(ramp, k, seed, len, &n);
        memcpy(p + k, run, n);
    }
}

int64_t pc_mt_check_pattern(uint64_t addr, uint64_t len, uint64_t seed)
{
    uint8_t ramp[RAMP_SIZE];
    init_ramp(ramp);
    const uint8_t *p = (const uint8_t *)(uintptr_t)addr;
    uint64_t n = 0;
    for (uint64_t k = 0; k < len; k += n) {
        const uint8_t *want = pattern_run(ramp, k, seed, len, &n);
        if (memcmp(p + k, want, n) != 0)
            for (uint64_t i = 0; i < n; i++)
                if (p[k + i] != want[i])
                    return (int64_t)(k + i);
    }
    return -1;
}

int64_t pc_mt_write_to_fd(int fd, uint64_t addr, uint64_t len)
{
    ssize_t n;
    do {
        n = write(fd, (const void *)(uintptr_t)addr, len);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : (int64_t)n;
}

uint64_t pc_mt_fault_sequence(uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t *lat_ns)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t t0 = pc_now_ns();
        sum += *at(addr + i * page_size);
        if (lat_ns)
            lat_ns[i] = pc_now_ns() - t0;
    }
    return sum;
}

int pc_mt_fork_child_reads(uint64_t addr)
{
    /* Raw clone, not glibc fork(): fork() holds the malloc arena locks
     * across the clone, and with Feature.EVENT_FORK the clone waits until
     * the monitor reads the FORK event, so a monitor thread in this process
     * that allocates would deadlock. */
    long pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0L, 0L, 0L, 0L);
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        /* async-signal-safe calls only: we forked a threaded process. Default
         * fatal-signal handling, so a poisoned page kills the child quietly
         * instead of running the parent's faulthandler. */
        struct sigaction dfl = { .sa_handler = SIG_DFL };
        sigaction(SIGBUS, &dfl, NULL);
        sigaction(SIGSEGV, &dfl, NULL);
        _exit(*at(addr));
    }
    return (int)pid;
}

void pc_mt_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}

int64_t pc_mt_bench_copy(int fd, uint64_t dst, uint64_t src, uint64_t page_size, uint64_t npages)
{
    uint64_t t0 = pc_now_ns();
    for (uint64_t i = 0; i < npages; i++) {
        struct uffdio_copy c = { .dst = dst + i * page_size, .src = src + i * page_size, .len = page_size, .mode = 0 };
        if (ioctl(fd, UFFDIO_COPY, &c) != 0)
            return -errno;
    }
    return (int64_t)(pc_now_ns() - t0);
}

/* Bench reference: the machine's floor for a round trip that needs two
 * cross-thread wake-ups (what a fault served by another thread costs at
 * least): two threads bounce one byte over a pair of pipes. */
struct pingpong { int to_peer[2], to_main[2]; };

static void *pingpong_peer(void *arg)
{
    struct pingpong *pp = arg;
    char c;
    while (read(pp->to_peer[0], &c, 1) == 1)
        if (write(pp->to_main[1], &c, 1) != 1)
            break;
    return NULL;
}

int pc_mt_bench_wakeup_pingpong(uint64_t iters, uint64_t *lat_ns)
{
    struct pingpong pp;
    if (pipe(pp.to_peer) != 0)
        return -errno;
    if (pipe(pp.to_main) != 0) {
        int err = -errno;
        close(pp.to_peer[0]);
        close(pp.to_peer[1]);
        return err;
    }
    pthread_t peer;
    int rc = pthread_create(&peer, NULL, pingpong_peer, &pp);
    if (rc == 0) {
        char c = 1;
        for (uint64_t i = 0; i < iters; i++) {
            uint64_t t0 = pc_now_ns();
            if (write(pp.to_peer[1], &c, 1) != 1 || read(pp.to_main[0], &c, 1) != 1) {
                rc = errno ? errno : EIO;
                break;
            }
            lat_ns[i] = pc_now_ns() - t0;
        }
        close(pp.to_peer[1]); /* EOF ends the peer */
        pthread_join(peer, NULL);
    } else {
        close(pp.to_peer[1]);
    }
    close(pp.to_peer[0]);
    close(pp.to_main[0]);
    close(pp.to_main[1]);
    return -rc;
}
