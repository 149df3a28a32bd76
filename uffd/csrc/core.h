/* Small inline helpers shared by the C core: the monotonic clock, partial writes of iovecs, big-endian
 * fields of QEMU's stream, its framing constants, and the geometry a RAM
 * block must have. Header only: every component may include it. */
#ifndef PC_CORE_H
#define PC_CORE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>

/* Thread-local storage: keep it to a few words (tests/uffd/test_fault_path_memory.py). The module is
 * loaded with dlopen, so each thread's copy of all of its __thread variables is allocated and
 * zeroed at that thread's first use of any of them: a 64 KiB array there cost the fault service
 * and the preempt receiver 16 fresh pages each when the switch released them (on a host that
 * backs memory lazily, 60-90 us a page: about 2 ms of the downtime). Buffers go in the objects. */
static inline uint64_t pc_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Past the w bytes a partial write took: the first iovec not written in full, its start moved. */
static inline struct iovec *pc_iov_advance(struct iovec *iov, int *n, size_t w)
{
    while (*n > 0 && w >= iov->iov_len) {
        w -= iov->iov_len;
        iov++;
        (*n)--;
    }
    if (*n > 0 && w > 0) {
        iov->iov_base = (uint8_t *)iov->iov_base + w;
        iov->iov_len -= w;
    }
    return iov;
}

/* Zeroed memory with every page allocated now (MAP_POPULATE), for a buffer a hot path first
 * writes inside the switch. Not malloc + memset: the compiler turns that into calloc, which
 * leaves memory fresh from the system untouched. NULL on failure; free with pc_unmap_populated. */
static inline void *pc_map_populated(size_t n)
{
    void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static inline void pc_unmap_populated(void *p, size_t n)
{
    if (p)
        munmap(p, n ? n : 1);
}

static inline void pc_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield" ::: "memory");
#else
    __asm__ volatile("" ::: "memory");
#endif
}

/* How long a thread on the fault path spins for a lock before it sleeps (pc_mutex_lock_spinning). */
#define PC_LOCK_SPIN_NS 200000ull

/* Take a lock that other threads hold for one short send: spinning up to `spin_ns`, then
 * sleeping. A thread that sleeps on a lock gives up its CPU, and when every CPU is busy it waits
 * for a time slice to get one back: traced in a 2 MiB busy downtime run, the destination's switch
 * thread slept 40 us on the return-path lock (the fault service sending the started guest's first
 * requests) and then waited 1.7 ms for its CPU, on which the source's thread was sending a 2 MiB
 * page; PONG 3, the downtime's end, waited with it. */
static inline void pc_mutex_lock_spinning(pthread_mutex_t *m, uint64_t spin_ns)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    uint64_t until = pc_now_ns() + spin_ns;
    do {
        for (int i = 0; i < 32; i++)
            pc_cpu_relax();
        if (pthread_mutex_trylock(m) == 0)
            return;
    } while (pc_now_ns() < until);
    pthread_mutex_lock(m);
}

static inline void pc_put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void pc_put_be32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i)); }
static inline void pc_put_be64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i)); }
static inline uint16_t pc_get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t pc_get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t pc_get_be64(const uint8_t *p) { return (uint64_t)pc_get_be32(p) << 32 | pc_get_be32(p + 4); }

/* QEMU_VM_* section bytes, MIG_CMD_* commands and return-path message types
 * (see the protocol spec). tests/uffd/test_wire_constants.py checks them, and
 * ramscan.h's RAM flags, against postcopy/wire/_constants.py. */
#define PC_VM_SECTION_PART 0x02
#define PC_VM_SECTION_END 0x03
#define PC_VM_SECTION_FOOTER 0x7e
#define PC_VM_COMMAND 0x08
#define PC_MIG_CMD_PING 2
#define PC_MIG_CMD_POSTCOPY_RAM_DISCARD 6
#define PC_RP_REQ_PAGES_ID 3
#define PC_RP_REQ_PAGES 4
#define PC_RP_MAX_FRAME 512

/* A RAM block both roles accept: a named (1..255 bytes) whole number of host
 * pages, the host page a power of two of at least 4 KiB. */
static inline int pc_block_geometry_ok(uint32_t idlen, uint64_t length, uint64_t host_page_size)
{
    return idlen >= 1 && idlen <= 255 && host_page_size >= 4096 && !(host_page_size & (host_page_size - 1)) &&
           length && length % host_page_size == 0;
}

#endif
