/* Dirty-page tracking by the kernel, for precopy, with no help from whoever
 * writes the memory:
 *
 *  - PC_DIRTY_WP_ASYNC: userfaultfd write-protect in async mode
 *    (UFFD_FEATURE_WP_ASYNC, Linux 6.7+): a write to a protected page does not
 *    stop the writer, the kernel only drops the page's uffd-wp bit. The
 *    PAGEMAP_SCAN ioctl on the memory's pagemap file then lists the written
 *    pages (PAGE_IS_WRITTEN) and write-protects them again in the same call
 *    (PM_SCAN_WP_MATCHING), so nothing written during a scan is lost. The
 *    uffd must belong to the process that owns the memory: this process
 *    creates its own; for another process, that process creates one and
 *    passes it (SCM_RIGHTS), and we open /proc/PID/pagemap.
 *  - PC_DIRTY_SOFT: soft-dirty bits. /proc/PID/clear_refs = 4 clears them,
 *    /proc/PID/pagemap bit 55 says "written since". Reading and clearing are
 *    two steps: writes in between would be lost, so the caller freezes the
 *    writers around pc_dirty_collect (the guest's vCPUs, or SIGSTOP).
 *
 * Both work on 4 KiB pages and hugetlbfs (whole huge pages), on this process
 * (pid 0) or another one. Collected pages are OR-ed into the caller's dirty
 * bitmaps (one bit per 4 KiB target page, whole host pages), atomically. */
#ifndef PC_DIRTY_H
#define PC_DIRTY_H

#include <stddef.h>
#include <stdint.h>

#include "bitmap.h"

enum { PC_DIRTY_WP_ASYNC = 1, PC_DIRTY_SOFT = 2 };

typedef struct pc_dirty_range {
    uint64_t base, length, host_page_size;
    pc_bitmap *dirty;
} pc_dirty_range;

typedef struct pc_dirty {
    int method;
    int pid;                        /* 0: this process */
    int uffd;                       /* WP_ASYNC: the owner's userfaultfd */
    int own_uffd;                   /* we created it (close on free) */
    int pagemap_fd;
    int clear_refs_fd;              /* SOFT */
    uint32_t nranges;
    pc_dirty_range ranges[64];
    void *vec;                      /* WP_ASYNC: PAGEMAP_SCAN's output regions; SOFT: pagemap entries read */
    uint64_t vec_len;
    uint64_t scans, scan_ns, pages_found;
    char err[256];
} pc_dirty;

/* 1 when the method works here (kernel features, /proc files), else 0 and a
 * reason in err. */
int pc_dirty_probe(int method, char *err, size_t errcap);
/* uffd: -1 makes our own (pid must be 0), else the owner process's uffd (dup'ed). */
pc_dirty *pc_dirty_new(int method, int pid, int uffd, char *err, size_t errcap);
void pc_dirty_free(pc_dirty *t);
/* Track [base, base+length): registered (WP_ASYNC) but not yet protected. */
int pc_dirty_add_range(pc_dirty *t, uint64_t base, uint64_t length, uint64_t host_page_size, pc_bitmap *dirty);
/* Start from clean: protect every page (WP_ASYNC) / clear the bits (SOFT). */
int pc_dirty_start(pc_dirty *t);
/* OR every page written since the last start/collect into the bitmaps and
 * start over (protect again / clear). Returns target pages found, or -errno. */
int64_t pc_dirty_collect(pc_dirty *t);
/* Stop tracking: unprotect and unregister (WP_ASYNC). */
int pc_dirty_stop(pc_dirty *t);

#endif
