/* Destination data path: everything per page runs here, in C threads with the
 * GIL released.
 *
 *  - pc_dst: the RAM blocks as the destination sees them (received / requested
 *    bitmaps, per-page hashes for --verify), placement, the return-path writer
 *    shared by the fault service and Python, and the fault bookkeeping
 *    (latency samples, per-vCPU blocktime).
 *  - pc_rx: one incoming channel (main or preempt). It receives into its own
 *    buffer, scans page records with pc_ram_scan, assembles host pages in its
 *    own temp page and places them. On the main channel it also steps over
 *    the "ram" section headers and footers; any other byte at a section
 *    boundary (a command, EOF) is handed back to Python.
 *  - pc_fault_service_run: the fault loop: uffd events -> REQ_PAGES(_ID) on
 *    the return path, deduplicated against the bitmaps. */
#ifndef PC_DEST_H
#define PC_DEST_H

#include <pthread.h>
#include <stdint.h>
#include <sys/uio.h>

#include "bitmap.h"
#include "faults.h"
#include "ramscan.h"
#include "sockbuf.h"

#define PC_DST_MAX_WAITERS 1024
#define PC_DST_MAX_VCPUS 64
#define PC_DST_LATENCY_RING 65536
enum { PC_LAT_FAULT = 0, PC_LAT_REQUEST = 1, PC_LAT_REPLY = 2 };

typedef struct pc_dst_block {
    uint64_t base, length, host_page_size;
    pc_bitmap *received, *requested;    /* one bit per 4 KiB target page */
    uint64_t *hashes;                   /* per target page hash as placed, or NULL */
    uint64_t *request_ns;               /* per host page: when it was requested, 0 if not */
    int zeroable;                       /* UFFDIO_ZEROPAGE allowed (not hugetlbfs) */
    /* Prefilled shared memory (pc_dst_set_alias): pages are written through a
     * second, unregistered mapping of the same file and mapped into the guest
     * with UFFDIO_CONTINUE; claimed (one bit per host page) says which channel
     * writes a page, so two copies of it never race with a guest that already runs on it.
     * A page nobody claimed and not received reads zeros (prefilled, or a hole):
     * whoever gives a claim back punches the page first. */
    uint8_t *alias;
    int fd;
    pc_bitmap *claimed;
    uint32_t idlen;
    char idstr[256];
} pc_dst_block;

typedef struct pc_dst_waiter { uint64_t host_off, t_ns; uint32_t block, tid; int32_t vcpu; /* -1: not a vCPU */ } pc_dst_waiter;

typedef struct pc_dst_counters {
    uint64_t faults, faults_dropped, faults_outside, requests_sent, requests_failed;
    uint64_t host_pages_placed, zero_host_pages_placed, eexist, latency_samples;
    uint64_t taken_over;                /* huge pages the preempt channel took over from the bulk stream */
    /* remote memory only (pc_dst_set_remote) */
    uint64_t removes, removed_pages, zero_faults, unmapped_host_pages;
} pc_dst_counters;

/* Remote memory: a region of another process's memory (mapped by its own
 * userfaultfd) holding [block_offset, block_offset + size) of RAM block
 * `block`. page_size must be the block's host page size. */
typedef struct pc_dst_region { uint64_t base, size, block_offset, page_size; uint32_t block; } pc_dst_region;

typedef struct pc_dst {
    int uffd;                           /* -1 before LISTEN: pages are written with memcpy */
    uint32_t nblocks;
    pc_dst_block *blocks;
    pc_block_desc *descs;               /* for pc_read_faults: sorted by base */
    uint32_t *desc_block;               /* descs[i] is blocks[desc_block[i]] */
    pc_ram_block_info *infos;           /* for pc_ram_scan, same order */
    uint64_t max_host_page_size;
    uint8_t *zero_buf;                  /* zero host page for blocks that are not zeroable */
    /* return path: written by the fault service (requests) and Python (the rest) */
    pthread_mutex_t rp_lock;
    int rp_fd;                          /* -1 while paused */
    int64_t rp_last_block;              /* block of the last REQ_PAGES(_ID); -1 none */
    int req_fd;                         /* >= 0: page requests go here instead (the preempt channel) */
    int64_t req_last_block;             /* as rp_last_block, on req_fd */
    /* threads waiting for a page */
    pthread_mutex_t wlock;
    pc_dst_waiter waiters[PC_DST_MAX_WAITERS];
    uint32_t nwaiters;
    uint32_t nvcpus, vcpu_tids[PC_DST_MAX_VCPUS];
    uint64_t vcpu_blocktime_ns[PC_DST_MAX_VCPUS];
    uint32_t vcpus_blocked;
    uint64_t all_blocked_since_ns, blocktime_ns;
    /* latency samples (ns), rings drained by Python: PC_LAT_FAULT (fault -> placed),
     * PC_LAT_REQUEST (fault -> request written), PC_LAT_REPLY (request written -> placed) */
    uint64_t rings[3][PC_DST_LATENCY_RING];
    uint64_t ring_head[3], ring_tail[3];
    pc_dst_counters c;
    /* remote memory (pc_dst_set_remote): the blocks live in another process,
     * behind its userfaultfd; this process never touches them. */
    int remote;
    uint32_t nregions;
    pc_dst_region *regions;             /* sorted by base */
    pc_block_desc *rdescs;              /* the regions, for pc_read_faults_ex (no bitmaps) */
    pc_bitmap **removed;                /* per block, per target page: UFFD_EVENT_REMOVE read */
    /* placements (read side) vs. the fault thread's reads of the uffd (write
     * side): once a REMOVE is read and marked, no placement that checked
     * before it can still copy stale bytes after the owner zaps the range. */
    pthread_rwlock_t place_lock;
    /* The huge page the bulk stream writes in place (dest.c, "the bulk stream's
     * page"): its id (block << 40 | host page, + 1; 0 none), PC_BULK_TAKEN once
     * the preempt channel took it over; bulk_writing while the bulk receiver
     * writes into it. */
    uint64_t bulk_page;
    int bulk_writing;
} pc_dst;

pc_dst *pc_dst_new(uint32_t nblocks);
void pc_dst_free(pc_dst *d);
/* Blocks are indexed in the order of the stream's RAM setup. Bitmaps/hashes
 * are owned by the caller and must outlive d. Returns 0 or -errno. */
int pc_dst_set_block(pc_dst *d, uint32_t i, const char *idstr, uint32_t idlen, uint64_t base, uint64_t length,
                     uint64_t host_page_size, int zeroable, pc_bitmap *received, pc_bitmap *requested, uint64_t *hashes);
int pc_dst_finish_setup(pc_dst *d);     /* after the last set_block: checks overlaps, allocates buffers */
void pc_dst_set_uffd(pc_dst *d, int uffd);
/* LISTEN in one call, holding no GIL: register every block with uffd (MISSING, and MINOR where
 * the block takes its pages through a second mapping), attach uffd, then write a byte to go_fd
 * (the fault service's release; -1: none). 0, or -errno with the failing block's index in *bad
 * (nothing attached or released then; blocks registered before it stay registered), nblocks
 * when the write failed. */
int pc_dst_listen(pc_dst *d, int uffd, int go_fd, uint32_t *bad);
/* After pc_dst_finish_setup: the blocks are another process's memory, mapped
 * by `regions` (any order) and registered by that process with `uffd`. Every
 * placement is a UFFDIO_COPY/ZEROPAGE through uffd at the region's address
 * (never a write here, even before LISTEN); host pages no region maps are
 * counted as received and skipped; pc_fault_service_run reads that uffd
 * (faults, and UFFD_EVENT_REMOVE: the range reads zeros from then on).
 * 0 or -EINVAL (a region outside its block, overlapping, or of another page size). */
int pc_dst_set_remote(pc_dst *d, int uffd, const pc_dst_region *regions, uint32_t n);
/* Block i is a MAP_SHARED mapping of file fd (hugetlbfs or shmem) whose pages were
 * allocated beforehand (pc_mem_prefill) and registered MISSING|MINOR after
 * LISTEN; alias maps the same file, unregistered. After LISTEN a page is then
 * written through alias (streaming stores: the prefilled memory is cold, and
 * writing it without reading it first halves the cost of UFFDIO_COPY onto
 * fresh memory) and mapped with UFFDIO_CONTINUE. A hole (a page discarded
 * since) is allocated again. 0 or -EINVAL (a remote path, a misaligned alias). */
int pc_dst_set_alias(pc_dst *d, uint32_t i, uint64_t alias, int fd);
void pc_dst_set_vcpus(pc_dst *d, const uint32_t *tids, uint32_t n);
/* Return path: fd -1 pauses requests (they stay outstanding). */
void pc_dst_set_rp(pc_dst *d, int fd);
/* Page requests for 4 KiB pages on the preempt channel's way back (fd; -1: on
 * the return path again): a source that reads them there (it says so,
 * PREEMPT_REQUESTS_PING) gets them without waiting for the main channel's
 * socket, which its bulk stream holds. Huge pages' requests stay on the return
 * path (see send_request_locked). A new return path (pc_dst_set_rp) sets it
 * back to -1. */
void pc_dst_set_request_channel(pc_dst *d, int fd);
int pc_dst_rp_write(pc_dst *d, const uint8_t *data, uint64_t len);   /* 0 or -errno; whole message or nothing */
/* Send a request for every requested-but-not-received host page (after a
 * recovery). Returns the number sent or -errno. */
int64_t pc_dst_resend_requests(pc_dst *d);
/* Discard ranges clear received bits (before LISTEN the memory is dropped by the caller). */
int pc_dst_discard(pc_dst *d, uint32_t block, uint64_t offset, uint64_t length);
/* All ranges of one POSTCOPY_RAM_DISCARD in one call (pairs of offset, length in bytes): each
 * becomes missing again; a range with a placed page is also dropped from memory (MADV_DONTNEED,
 * or fallocate PUNCH_HOLE on punch_fd for a file-backed block). Every range is checked before
 * any is applied. Returns how many ranges held placed pages; -ERANGE (a range outside the block
 * or misaligned) or the drop's -errno, with *bad the index of that range. */
int pc_dst_discard_ranges(pc_dst *d, uint32_t block, const uint64_t *ranges, uint32_t n, int punch_fd,
                          uint32_t *bad);
/* Latency samples of one kind (PC_LAT_*) since the last drain; returns how many were copied. */
uint32_t pc_dst_drain_latency(pc_dst *d, uint32_t kind, uint64_t *out, uint32_t max);
void pc_dst_snapshot(pc_dst *d, pc_dst_counters *c, uint64_t *blocktime_ns, uint64_t *vcpu_blocktime_ns, uint32_t *nwaiting);

/* The fault service loop; returns when stop_fd becomes readable (0) or on a
 * uffd error (-errno). go_fd >= 0: it first waits here, without the GIL, until
 * go_fd is readable (LISTEN: the uffd is set and registered by then) or stop_fd is. */
int pc_fault_service_run(pc_dst *d, int stop_fd, int go_fd);

enum { PC_RX_MAIN = 0, PC_RX_PREEMPT = 1 };
enum {
    PC_RX_CONTROL = 1,      /* bytes at head are not RAM framing: Python decodes them */
    PC_RX_EOF = 2,          /* the peer closed the connection at a record boundary */
    PC_RX_EOS = 3,          /* preempt channel: EOS record */
    PC_RX_STOPPED = 4,      /* pc_rx_stop was called */
    PC_RX_E_IO = -1,        /* recv failed: err_errno */
    PC_RX_E_PROTO = -2,     /* malformed stream: err_msg */
    PC_RX_E_PLACE = -3,     /* UFFDIO_COPY/ZEROPAGE failed: err_errno, err_msg */
    PC_RX_E_TRUNCATED = -4, /* EOF in the middle of a record or section */
};

/* pages_direct: PAGE records whose bodies were received straight into place
 * (the direct receive in dest.c) rather than through the receive buffer;
 * pages_in_place: those of them received into their page's own bytes (a
 * prefilled block's huge page claimed at its first header: no copy at all) */
typedef struct pc_rx_counters {
    uint64_t pages_normal, pages_zero, host_pages_placed, pages_direct, pages_in_place;
} pc_rx_counters;

/* Direct receive: up to this many PAGE|CONTINUE records per recvmsg, headers
 * apart and bodies contiguous (4 KiB blocks: in rx->stage; huge pages: in
 * rx->tmp at their place in the host page). */
#define PC_RX_DIRECT_MAX 512
#define PC_RX_STAGE_PAGES 256            /* a stage half at most (a 2 GiB guest and more) */
#define PC_RX_STAGE_MIN_PAGES 16
#define PC_RX_PLACER_MIN_CPUS 4          /* a placer thread only with CPUs to spare (see dest.c) */
#define PC_RX_BUF_MIN (256u << 10)       /* receive buffer: before the RAM setup, and the preempt channel's */
#define PC_RX_BUF_MAX (4u << 20)         /* the main channel's at most (a 2 GiB guest and more) */
/* A receive that finds nothing waits on its CPU this long before it sleeps (pc_rx_set_linger):
 * on an idle virtual CPU a sleeping receiver is woken 50-100 us (at times over 1 ms) after its
 * bytes came, and the sender pays for the wake-up too. The bulk stream's receiver lingers
 * between segments (idle 2 MiB bulk 2.68 -> 3.25 GB/s, medians of 6 interleaved pairs); the
 * preempt channel's while a thread waits for a page (busy 2 MiB fault p50 over the plain C
 * fault 1.39 -> 0.85, 5 pairs), not when nothing was asked for (docs/performance.md, Round 23). */
#define PC_RX_BULK_LINGER_NS (300u * 1000)
#define PC_RX_WAITED_LINGER_NS (1000u * 1000)

typedef struct pc_rx {
    pc_dst *dst;
    int kind;
    pc_sockbuf in;
    pc_ram_scan_state scan;
    pc_ram_record *recs;
    uint32_t max_recs;
    /* host page being assembled on this channel */
    uint8_t *tmp;
    uint64_t tmp_size;
    int64_t tmp_block;
    uint64_t tmp_host_off, tmp_next_off;
    uint32_t tmp_all_zero;
    /* In a prefilled block after LISTEN a channel claims the page at its first
     * record and writes each record through the alias as it arrives (no copy
     * of the whole page after its last byte: what a waiting fault sees, and
     * the bulk stream's second copy); a page another channel claimed first is
     * received and dropped (tmp_skip), unless the preempt channel takes it
     * over from the bulk stream (dest.c, "the bulk stream's page"). */
    uint32_t tmp_inplace, tmp_skip;
    /* direct receive (see PC_RX_DIRECT_MAX) */
    uint8_t *stage;                     /* the stage's half the receiver fills (stage_pages pages) */
    uint32_t stage_pages;               /* pages a stage half holds: pc_rx_stage_pages_for the guest */
    uint8_t *stage_alloc;               /* both halves, mapped on first use */
    uint8_t *tmp_alloc;                 /* the temp page's mapping (tmp) */
    /* the placer thread: places a staged run of 4 KiB pages while the
     * receiver receives the next ones (one job at a time); without it
     * (use_placer 0) the receiver places them */
    int use_placer;                     /* pc_rx_new: PC_RX_PLACER_MIN_CPUS or more CPUs to run on */
    pthread_t placer;
    int placer_started, placer_quit, job_pending, job_rc, job_errno;
    pthread_mutex_t job_lock;
    pthread_cond_t job_cv;
    uint32_t job_block;
    uint64_t job_off, job_n, job_nzero;
    const uint8_t *job_src;
    char job_msg[256];
    uint32_t direct_skip;               /* receives into the buffer before the next direct try */
    uint32_t direct_backoff;            /* the skip after the next mispredicted ZERO record */
    uint64_t direct_last;               /* bytes the last direct receive got */
    uint8_t direct_hdr[PC_RX_DIRECT_MAX][8];
    struct iovec direct_iov[2 * PC_RX_DIRECT_MAX];
    /* before each receive (pc_sockbuf_linger): always, and while a thread waits for a page */
    uint64_t linger_ns, waited_linger_ns;
    /* main channel framing */
    uint32_t ram_section_id;
    int in_section;
    int stop;
    int err_errno;
    char err_msg[256];
    pc_rx_counters c;
} pc_rx;

pc_rx *pc_rx_new(pc_dst *d, int fd, int kind, uint32_t ram_section_id);
/* The sizes a receiver takes for a guest of ram_bytes (the blocks' total). */
uint64_t pc_rx_buf_size_for(int kind, uint64_t ram_bytes);
uint32_t pc_rx_stage_pages_for(uint64_t ram_bytes);
void pc_rx_free(pc_rx *rx);
/* How long a receive that finds nothing waits on the CPU before it sleeps: always, and while a
 * thread waits for a page (pc_rx_new sets PC_RX_BULK_LINGER_NS on the main channel and
 * PC_RX_WAITED_LINGER_NS on the preempt channel). Before the receiver runs. */
void pc_rx_set_linger(pc_rx *rx, uint64_t ns, uint64_t waited_ns);
/* the RAM blocks arrived (or changed): place into d from now on */
int pc_rx_attach(pc_rx *rx, pc_dst *d);
int pc_rx_run(pc_rx *rx);               /* see the PC_RX_* codes */
/* The same, from a thread that first sets its own nice value (in C: never holding the GIL lowered). */
int pc_rx_run_niced(pc_rx *rx, int nice);
/* pc_rx_run once go_fd is readable (LISTEN), waiting here without the GIL; a hang-up or an
 * error on the channel's socket ends the wait too (pc_rx_run then reports it). Bytes that
 * arrive before LISTEN wait in the socket: nothing is placed before the memory is registered. */
int pc_rx_run_after(pc_rx *rx, int go_fd);
void pc_rx_stop(pc_rx *rx);
/* Python decodes control messages from rx->in with the pc_sockbuf_* calls. */
/* Place a run of records already scanned by someone else (precopy pages that
 * the Python decoder delivered). Returns 0 or a PC_RX_E_* code. */
int pc_rx_place_records(pc_rx *rx, const pc_ram_record *recs, uint32_t n, const uint8_t *buf);
/* Forget a partly assembled host page (on pause: it will be sent again). */
void pc_rx_reset_temp(pc_rx *rx);

#endif /* PC_DEST_H */
