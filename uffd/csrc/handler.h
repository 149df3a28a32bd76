/* Page-fault service for another process's userfaultfd (a VMM that handed us
 * its uffd, Firecracker style): faults served with UFFDIO_COPY from a memory
 * file, UFFD_EVENT_REMOVE handled, a background fill of the rest.
 *
 * The record of what was placed lives in memory the caller provides (a memfd
 * shared with a supervisor), so a restarted server resumes where a dead one
 * stopped: pc_hs_state, then the placed bitmap, then the removed bitmap, one
 * bit per page of the region's page size, regions one after another. */
#ifndef PC_HANDLER_H
#define PC_HANDLER_H

#include <stdint.h>
#include "bitmap.h"
#include "faults.h"
#include "uffd.h"

#define PC_HS_MAGIC 0x70637566666468ull /* "pcuffdh" */
#define PC_HS_VERSION 1u
#define PC_HS_PROM_BUCKETS 17u           /* finite bounds, metrics.LATENCY_BUCKETS_SECONDS */
#define PC_HS_LOG_BUCKETS 256u           /* 8 per power of two of nanoseconds, up to 2^32 ns */
#define PC_HS_FILL_MIN (64u << 10)       /* CRIU-style: restart small after a fault ... */
#define PC_HS_FILL_MAX (4u << 20)        /* ... grow to this while no faults come */
#define PC_HS_HEADER_BYTES 4096u

/* One region of the VMM's memory: GuestRegionUffdMapping plus where its bits start. */
typedef struct pc_hs_region { uint64_t base, size, offset, page_size, bit0; } pc_hs_region;

/* Shared state (all counters monotonic; written by the one serving thread,
 * read by anyone). Times are CLOCK_MONOTONIC nanoseconds. */
typedef struct pc_hs_state {
    uint64_t magic, version, npages, total_bytes;
    uint64_t start_ns, resident_ns, restarts, generation;
    uint64_t faults, faults_copy, faults_zero, faults_present;
    uint64_t pages_fault, pages_fill, pages_zero;
    uint64_t bytes_fault, bytes_fill, bytes_zero;
    uint64_t eexist, eagain, removes, removed_bytes, unregistered_bytes, wakes;
    uint64_t fill_chunk, fill_cursor, fill_steps, pages_done, enoent;
    uint64_t lat_count, lat_sum_ns, lat_max_ns;
    uint64_t lat_prom[PC_HS_PROM_BUCKETS + 1];   /* non-cumulative; last = above every bound */
    uint64_t lat_log[PC_HS_LOG_BUCKETS];
} pc_hs_state;

typedef struct pc_hs_session pc_hs_session;

/* Bytes of shared memory a session over npages pages needs. */
uint64_t pc_hs_shared_size(uint64_t npages);
/* Upper bound (ns) of log bucket i, and of Prometheus bucket i (i < PC_HS_PROM_BUCKETS). */
uint64_t pc_hs_log_bucket_upper_ns(uint32_t i);
uint64_t pc_hs_prom_bound_ns(uint32_t i);

/* Attach to a VMM's uffd. regions sorted by base, bit0 filled in, not
 * overlapping; src/src_len: the memory file mapped readable (the page
 * source; every region's [offset, offset+size) lies inside it). shared: at
 * least pc_hs_shared_size bytes; fresh=1 initialises it, 0 resumes the state
 * a previous server left. Sets O_NONBLOCK on the uffd. NULL + *err on error. */
pc_hs_session *pc_hs_open(int uffd, const pc_hs_region *regions, uint32_t nregions, const uint8_t *src, uint64_t src_len,
                          void *shared, uint64_t shared_len, int fresh, int fill, int *err);
/* After a restart: UFFDIO_WAKE over every region, so threads whose faults a
 * dead server had read fault again. 0 or -errno. */
int pc_hs_wake_all(pc_hs_session *s);
/* Serve until pc_hs_stop: 0 when stopped, -ESRCH when the VMM's memory is
 * gone, another -errno on a failure it cannot serve past. */
int pc_hs_run(pc_hs_session *s);
/* From any thread: make pc_hs_run return. */
void pc_hs_stop(pc_hs_session *s);
void pc_hs_close(pc_hs_session *s);    /* after pc_hs_run returned; does not close the uffd */
/* Place len bytes (whole pages) of the memory file at file offset off into the
 * VMM: UFFDIO_COPY into the region that maps it, placed bits set, EEXIST
 * counts as placed, removed pages skipped. Returns bytes newly placed or
 * -errno (-EAGAIN: a mapping change is pending; drain events and retry). This
 * is the entry point an asynchronous page source (a live postcopy stream)
 * would use from its receiving thread. Not thread-safe against pc_hs_run. */
int64_t pc_hs_place(pc_hs_session *s, uint64_t off, const uint8_t *data, uint64_t len);
/* Pages placed or removed (so resident or to be served as zeros). */
uint64_t pc_hs_count_done(const void *shared, uint64_t npages);
/* Test hook: the serving process kills itself (SIGKILL) after reading its
 * n-th fault, before serving it. 0 = never. */
void pc_hs_set_crash_after_faults(pc_hs_session *s, uint64_t n);

#endif /* PC_HANDLER_H */
