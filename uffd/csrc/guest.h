/*
 * The built-in synthetic guest: vCPU threads (pthreads created here, so no
 * Python thread and no GIL is involved while they touch guest memory) that
 * run a deterministic read/write workload over a set of RAM regions.
 *
 * Page layout (every 4 KiB target page, also inside 2 MiB / 1 GiB host pages):
 *   - initial content is a pattern derived from (seed, region, page index);
 *     about 1 page in 8 (and, for PC_GUEST_PATTERN_HOT, the upper half of the
 *     page space) is all zero so migrations see zero pages;
 *   - vCPU v owns the 8-byte counter slot at byte 64*v and is its only
 *     writer; a write adds 1 to it (slots start at the initial pattern value);
 *   - a read folds the vCPU's own slot, the pattern word at 64*v+8 and the
 *     page's last word (never written) into the vCPU's running read hash;
 *   - the last word of a non-zero page is a tag naming (region, page), so a
 *     page placed at the wrong offset can be traced back to where it belongs.
 *
 * Each vCPU's access sequence depends only on (seed, vCPU index, step), so
 * pc_guest_verify() can replay it and predict every page exactly.
 *
 * Functions return 0 / -errno (or a count); they may be called with the GIL
 * released (cffi always does), and none of them touch guest memory except
 * fill_initial, verify and the vCPU threads.
 */
#ifndef PC_GUEST_H
#define PC_GUEST_H

#include <stddef.h>
#include <stdint.h>

#define PC_GUEST_TARGET_PAGE_SIZE 4096
#define PC_GUEST_MAX_VCPUS 32
#define PC_GUEST_MAX_REGIONS 1024
#define PC_GUEST_STATE_VERSION 1
#define PC_GUEST_NICE_KEEP 100  /* pc_guest_set_vcpu_nice: the nice each vCPU started with */

/* workload patterns */
#define PC_GUEST_PATTERN_SEQ 0    /* each vCPU walks its share of pages in order, pass after pass */
#define PC_GUEST_PATTERN_RANDOM 1 /* uniform pages from a per-vCPU PRNG */
#define PC_GUEST_PATTERN_HOT 2    /* first 10% of the page space takes 90% of accesses */

/* what verify thinks went wrong with a page */
#define PC_GUEST_MISMATCH_ZERO 1    /* page is all zero, data expected */
#define PC_GUEST_MISMATCH_COUNTER 2 /* only counter slots differ: lost or stale updates */
#define PC_GUEST_MISMATCH_FOREIGN 3 /* content belongs to another page (origin_*) */
#define PC_GUEST_MISMATCH_CONTENT 4 /* any other difference */

typedef struct pc_guest pc_guest;

typedef struct {
    uint64_t addr;           /* host virtual address of the region */
    uint64_t length;         /* bytes; multiple of host_page_size */
    uint64_t host_page_size; /* 4096, 2 MiB, 1 GiB, ... */
} pc_guest_region;

typedef struct {
    uint64_t steps;  /* accesses done (reads + writes) */
    uint64_t reads;
    uint64_t writes;
} pc_guest_vcpu_stats;

typedef struct {
    uint32_t region;
    uint32_t kind;          /* PC_GUEST_MISMATCH_* */
    uint64_t offset;        /* byte offset of the 4 KiB page inside its region */
    uint32_t byte_offset;   /* first differing 8-byte word, offset inside the page */
    uint32_t vcpu;          /* for COUNTER: the vCPU whose slot differs */
    uint64_t expected;      /* the 8-byte word at byte_offset (little-endian) */
    uint64_t actual;
    int32_t origin_region;  /* for FOREIGN: the page the content belongs to, else -1 */
    uint32_t reserved;
    uint64_t origin_offset;
} pc_guest_mismatch;

typedef struct {
    uint64_t pages_checked;
    uint64_t pages_mismatched;
    uint32_t mismatches_reported; /* entries written to the caller's array */
    uint32_t read_hash_bad_mask;  /* bit v: vCPU v's read hash differs from the replay */
    uint32_t state_bad_mask;      /* bit v: vCPU v's counters/PRNG/position differ from the replay */
    uint32_t reserved;
} pc_guest_verify_result;

/* Create a guest (no threads yet); its vCPUs run at nice (-20..19), whichever thread
 * starts them. On error returns NULL and writes a message to err. */
pc_guest *pc_guest_new(const pc_guest_region *regions, uint32_t nregions, uint32_t nvcpus,
                       uint32_t pattern, uint64_t seed, uint32_t write_percent,
                       uint64_t rate_limit, int nice, char *err, size_t errcap);

/* Stops (request + join) if running, then frees. */
void pc_guest_free(pc_guest *g);

uint32_t pc_guest_nvcpus(const pc_guest *g);
uint64_t pc_guest_total_pages(const pc_guest *g);

/* Write the initial content of every page (source side, before start). -EBUSY while running. */
int pc_guest_fill_initial(pc_guest *g);

/* Write the initial content of [offset, offset+length) of a region into out, e.g. to
 * serve a fault on a fresh destination (a whole host page). offset and length are
 * multiples of 4 KiB. -EINVAL for a bad region, -ERANGE for a bad range. */
int pc_guest_initial_content(const pc_guest *g, uint32_t region, uint64_t offset, uint64_t length,
                             void *out);

/* Make the vCPU threads now, parked: the next pc_guest_start releases them instead of
 * making threads (a destination starts its guest inside the downtime, and QEMU's vCPU
 * threads exist before RUN too). Returns once each has its name, priority and id and waits,
 * touching no guest memory or state; pc_guest_join (and free) ends them unstarted. -EBUSY
 * while the vCPUs run; 0 if already prepared. */
int pc_guest_prepare(pc_guest *g);

/* Start the vCPU threads. Each runs until stopped or until it has done nsteps more
 * accesses (0 = no limit). -EBUSY while vCPUs run (the threads of stopped ones are joined
 * first). */
int pc_guest_start(pc_guest *g, uint64_t nsteps);

/* Ask every vCPU to stop at its next access boundary (one asleep in its rate limit stops
 * at once); never blocks. */
void pc_guest_request_stop(pc_guest *g);
/* Auto-converge: every vCPU sleeps `percent` % of the time (10 ms run slices; 0-99). */
void pc_guest_set_throttle(pc_guest *g, uint32_t percent);
uint32_t pc_guest_throttle(const pc_guest *g);
/* Precopy: the vCPUs (running and started later) run at `nice`; PC_GUEST_NICE_KEEP: each
 * back at the nice it started with. Threads changed, or -errno of the first failure. */
int pc_guest_set_vcpu_nice(pc_guest *g, int nice);
int pc_guest_vcpu_nice(const pc_guest *g);

/* Wait until every vCPU has left its loop: 0, or -ETIMEDOUT after timeout_ns
 * (negative = forever). A vCPU blocked in a userfaultfd fault leaves only once
 * the fault is resolved, so whoever serves faults must keep doing so meanwhile. */
int pc_guest_wait(pc_guest *g, int64_t timeout_ns);

/* Join the vCPU threads (blocks like pc_guest_wait with no timeout). 0 if none ran. */
int pc_guest_join(pc_guest *g);

/* request_stop + wait: every vCPU out of its loop (one asleep in its rate limit is stopped
 * there, unwoken), its state written back. The threads end after it: pc_guest_join waits for
 * that, and pc_guest_start / pc_guest_prepare join stopped ones first. Same caveat as
 * pc_guest_wait: keep serving faults meanwhile. */
int pc_guest_stop(pc_guest *g);

/* Number of vCPU threads still inside their loop. */
uint32_t pc_guest_running(pc_guest *g);
/* Kernel thread ids of the vCPUs that have started (0 for the others); returns how many are known. */
uint32_t pc_guest_vcpu_tids(pc_guest *g, uint32_t *out, uint32_t cap);
uint32_t pc_guest_wait_vcpu_tids(pc_guest *g, uint32_t *out, uint32_t cap, uint64_t timeout_ns);


/* Copy per-vCPU counters (readable while running); returns nvcpus (entries written, up to cap). */
int pc_guest_stats(const pc_guest *g, pc_guest_vcpu_stats *out, uint32_t cap);

/* Saved state: versioned little-endian bytes. Size depends on nregions and nvcpus. */
size_t pc_guest_state_size(const pc_guest *g);
/* Returns bytes written, -ENOSPC if cap is too small, -EBUSY while running. */
int64_t pc_guest_save_state(const pc_guest *g, void *buf, size_t cap);
/* Returns 0, -EBUSY while running, or a negative errno with a message in err:
 * -EMSGSIZE (size), -EPROTO (magic), -EPROTONOSUPPORT (version),
 * -EINVAL (configuration differs: nvcpus, regions, pattern, seed, write_percent),
 * -EBADMSG (checksum or inconsistent per-vCPU values). */
int pc_guest_load_state(pc_guest *g, const void *buf, size_t len, char *err, size_t errcap);

/* Replay every vCPU from step 0 to its current step count, predict every page and
 * every read hash, and compare with memory and with the state. Writes up to mmcap
 * mismatches. Guest memory must be readable (all pages present, or faults served).
 * 0, -EBUSY while running, -ENOMEM. */
int pc_guest_verify(pc_guest *g, pc_guest_verify_result *res, pc_guest_mismatch *mm,
                    uint32_t mmcap);

#endif
