/* userfaultfd and guest-memory shims for the postcopy C core.
 *
 * Every function returns 0 (or a count) on success and -errno on failure, so
 * C threads can call them directly and Python wrappers raise from the code.
 * EINTR is retried inside; partial progress is reported through the out
 * parameters so a caller can resume after -EAGAIN / -EEXIST.
 */
#ifndef PC_UFFD_H
#define PC_UFFD_H

#include <stdint.h>
#include <sys/ioctl.h> /* must precede linux/userfaultfd.h: it defines _IOWR */
#include <linux/userfaultfd.h>

/* Fallbacks for build hosts whose <linux/userfaultfd.h> predates the running
 * kernel. Values are the kernel ABI (include/uapi/linux/userfaultfd.h). */
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef _UFFDIO_CONTINUE
#define _UFFDIO_CONTINUE (0x07)
#endif
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
#endif
#ifndef UFFDIO_REGISTER_MODE_MINOR
#define UFFDIO_REGISTER_MODE_MINOR ((__u64)1 << 2)
#endif
#ifndef UFFD_PAGEFAULT_FLAG_MINOR
#define UFFD_PAGEFAULT_FLAG_MINOR (1 << 2)
#endif
#ifndef UFFDIO_CONTINUE_MODE_DONTWAKE
#define UFFDIO_CONTINUE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_MOVE_MODE_DONTWAKE
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
#endif

/* Our own copies of the newer ioctl argument structs, so the ioctl numbers
 * below do not depend on the host header having them. */
struct pc_uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
struct pc_uffdio_poison { struct uffdio_range range; uint64_t mode; int64_t updated; };
struct pc_uffdio_move { uint64_t dst, src, len, mode; int64_t move; };
#ifndef UFFDIO_CONTINUE
#define UFFDIO_CONTINUE _IOWR(UFFDIO, _UFFDIO_CONTINUE, struct pc_uffdio_continue)
#endif
#ifndef UFFDIO_POISON
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct pc_uffdio_poison)
#endif
#ifndef UFFDIO_MOVE
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct pc_uffdio_move)
#endif

/* ---- opening and negotiation ---- */
int pc_uffd_open_syscall(int flags);          /* fd or -errno */
int pc_uffd_open_device(int flags);           /* via /dev/userfaultfd: fd or -errno */
int pc_uffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);

/* ---- range ioctls: all return 0 or -errno ---- */
int pc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int pc_uffd_unregister(int fd, uint64_t start, uint64_t len);
int pc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied);
int pc_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *zeroed);
int pc_uffd_wake(int fd, uint64_t start, uint64_t len);
/* The calling thread's nice value, and with a nice below 0 a short scheduler slice (it
 * preempts at wakeup); 0 or -errno. Without CAP_SYS_NICE a raise fails, the slice still
 * takes. Called through cffi, which releases the GIL: a thread that lowers itself is never
 * preempted while holding it. Threads the caller creates later inherit both. */
int pc_malloc_one_arena(void);
int pc_thread_set_nice(int nice);
/* Tests of pc_mutex_lock_spinning (core.h): another thread holds a lock for hold_ns, busy on its
 * CPU; the calling thread takes it spinning up to spin_ns. Returns how many times the caller
 * slept on the way (voluntary context switches), or -errno. */
int64_t pc_lock_wait_probe(uint64_t hold_ns, uint64_t spin_ns);
/* Name the calling thread as ps -L, top -H and the scheduler's trace show it (first 15 bytes). */
void pc_thread_set_name(const char *name);
/* Write the next `bytes` of the calling thread's stack below its current depth now: a thread
 * that waits for the switch then runs its C loops on stack pages it already has (a first touch
 * there cost up to 270 us inside the downtime on a lazily backed VM). */
void pc_thread_touch_stack(uint64_t bytes);
/* The nice of the threads a faulting vCPU waits on (and of a stopping guest's vCPUs). */
#define PC_URGENT_NICE (-10)
/* The same for thread tid of this process (0: the calling thread). */
int pc_thread_set_nice_of(uint32_t tid, int nice);
int pc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int pc_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped);
int pc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated);

/* ---- events ---- */
/* One uffd_msg, flattened so Python (and C callers) need no union access.
 * PAGEFAULT: a=address b=flags tid=ptid; FORK: ufd=new fd;
 * REMAP: a=from b=to c=len; REMOVE/UNMAP: a=start b=end. */
typedef struct pc_uffd_event {
    uint32_t event;
    uint32_t tid;
    int32_t ufd;
    uint32_t _pad;
    uint64_t a, b, c;
} pc_uffd_event;

void pc_uffd_event_from_msg(const struct uffd_msg *msg, pc_uffd_event *out);
/* Reads up to max events in one read(); count, or -EAGAIN when none pending. */
int pc_uffd_read_events(int fd, pc_uffd_event *out, uint32_t max);

/* ---- guest memory shims ---- */
/* fd < 0: private anonymous mapping; otherwise MAP_SHARED of fd at offset 0. */
int pc_mem_map(int fd, uint64_t len, uint64_t *addr_out);
int pc_mem_unmap(uint64_t addr, uint64_t len);
/* mremap(MAYMOVE), to exactly new_addr (MREMAP_FIXED, replacing what is there) unless 0 */
int pc_mem_remap(uint64_t old_addr, uint64_t len, uint64_t new_addr, uint64_t *new_addr_out);
int pc_mem_madvise_dontneed(uint64_t addr, uint64_t len);
int pc_mem_madvise_remove(uint64_t addr, uint64_t len);
/* Map every page of [addr, addr+len) writable now (allocating the missing ones), not at first write. */
int pc_mem_populate_write(uint64_t addr, uint64_t len);
int pc_mem_punch_hole(int fd, uint64_t offset, uint64_t len);
/* fallocate: allocate (zeroed) the file's pages in [offset, offset+len) now, not at first touch. */
int pc_mem_prefill(int fd, uint64_t offset, uint64_t len);
uint64_t pc_monotonic_ns(void);

#endif /* PC_UFFD_H */
