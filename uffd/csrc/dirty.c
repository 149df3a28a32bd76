/* Dirty-page tracking by the kernel: see dirty.h. */
#define _GNU_SOURCE
#include "dirty.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core.h"
#include "uffd.h"   /* <linux/userfaultfd.h> and fallbacks for newer features */

#define TP 4096u

/* PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7): defined here when the
 * build host's headers predate it. The values are the kernel ABI. */
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start, end, categories;
};
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

#define PM_SOFT_DIRTY (1ull << 55)
#define PM_PRESENT (1ull << 63)
#define SCAN_VEC 4096               /* regions per PAGEMAP_SCAN call */
#define PAGEMAP_CHUNK 8192          /* entries per pread */

static void seterr(char *err, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t cap, const char *fmt, ...)
{
    if (!err || !cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

static int proc_open(int pid, const char *what, int flags)
{
    char path[64];
    if (pid)
        snprintf(path, sizeof(path), "/proc/%d/%s", pid, what);
    else
        snprintf(path, sizeof(path), "/proc/self/%s", what);
    return open(path, flags | O_CLOEXEC);
}

static const uint64_t WP_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
                                    UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

static int new_wp_uffd(char *err, size_t cap)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        seterr(err, cap, "userfaultfd: %s", strerror(e));
        return -e;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = WP_FEATURES };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(fd);
        seterr(err, cap, "UFFDIO_API with WP_ASYNC, WP_UNPOPULATED, WP_HUGETLBFS_SHMEM: %s (Linux 6.7+ needed)",
               strerror(e));
        return -e;
    }
    return fd;
}

int pc_dirty_probe(int method, char *err, size_t errcap)
{
    if (method == PC_DIRTY_WP_ASYNC) {
        int fd = new_wp_uffd(err, errcap);
        if (fd < 0)
            return 0;
        close(fd);
        int pm = proc_open(0, "pagemap", O_RDONLY);
        if (pm < 0) {
            seterr(err, errcap, "/proc/self/pagemap: %s", strerror(errno));
            return 0;
        }
        /* An empty scan: ENOTTY/EINVAL when the kernel has no PAGEMAP_SCAN. */
        struct pm_scan_arg a = { .size = sizeof(a), .start = 0, .end = 0 };
        int rc = ioctl(pm, PAGEMAP_SCAN, &a);
        int e = errno;
        close(pm);
        if (rc < 0) {
            seterr(err, errcap, "PAGEMAP_SCAN: %s (Linux 6.7+ needed)", strerror(e));
            return 0;
        }
        return 1;
    }
    if (method == PC_DIRTY_SOFT) {
        int fd = proc_open(0, "clear_refs", O_WRONLY);
        if (fd < 0) {
            seterr(err, errcap, "/proc/self/clear_refs: %s", strerror(errno));
            return 0;
        }
        close(fd);
        /* A page written after clear_refs must show bit 55 (CONFIG_MEM_SOFT_DIRTY). */
        volatile uint8_t *p = aligned_alloc(TP, TP);
        if (!p) {
            seterr(err, errcap, "out of memory");
            return 0;
        }
        p[0] = 1;
        int cr = proc_open(0, "clear_refs", O_WRONLY), pm = proc_open(0, "pagemap", O_RDONLY);
        uint64_t e = 0;
        int ok = cr >= 0 && pm >= 0 && write(cr, "4", 1) == 1;
        p[0] = 2;
        ok = ok && pread(pm, &e, 8, (off_t)((uintptr_t)p / TP * 8)) == 8 && (e & PM_SOFT_DIRTY);
        if (cr >= 0)
            close(cr);
        if (pm >= 0)
            close(pm);
        free((void *)p);
        if (!ok)
            seterr(err, errcap, "soft-dirty bits do not work here (CONFIG_MEM_SOFT_DIRTY?)");
        return ok;
    }
    seterr(err, errcap, "unknown method %d", method);
    return 0;
}

pc_dirty *pc_dirty_new(int method, int pid, int uffd, char *err, size_t errcap)
{
    if (method != PC_DIRTY_WP_ASYNC && method != PC_DIRTY_SOFT) {
        seterr(err, errcap, "unknown method %d", method);
        return NULL;
    }
    if (method == PC_DIRTY_WP_ASYNC && uffd < 0 && pid != 0 && pid != getpid()) {
        seterr(err, errcap, "write-protect tracking of process %d needs a userfaultfd made by that process "
               "(passed over SCM_RIGHTS)", pid);
        return NULL;
    }
    pc_dirty *t = calloc(1, sizeof(*t));
    if (!t) {
        seterr(err, errcap, "out of memory");
        return NULL;
    }
    t->method = method;
    t->pid = pid == getpid() ? 0 : pid;
    t->uffd = t->pagemap_fd = t->clear_refs_fd = -1;
    t->pagemap_fd = proc_open(t->pid, "pagemap", O_RDONLY);
    if (t->pagemap_fd < 0) {
        seterr(err, errcap, "/proc/%d/pagemap: %s", pid, strerror(errno));
        goto fail;
    }
    if (method == PC_DIRTY_SOFT) {
        t->clear_refs_fd = proc_open(t->pid, "clear_refs", O_WRONLY);
        if (t->clear_refs_fd < 0) {
            seterr(err, errcap, "/proc/%d/clear_refs: %s", pid, strerror(errno));
            goto fail;
        }
        t->vec_len = PAGEMAP_CHUNK;
        t->vec = calloc(PAGEMAP_CHUNK, sizeof(uint64_t));
        if (!t->vec) {
            seterr(err, errcap, "out of memory");
            goto fail;
        }
    } else {
        if (uffd >= 0) {
            t->uffd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
            if (t->uffd < 0) {
                seterr(err, errcap, "dup of the owner's userfaultfd: %s", strerror(errno));
                goto fail;
            }
        } else if ((t->uffd = new_wp_uffd(err, errcap)) < 0) {
            t->uffd = -1;
            goto fail;
        }
        t->own_uffd = 1;
        t->vec_len = SCAN_VEC;
        t->vec = calloc(SCAN_VEC, sizeof(struct page_region));
        if (!t->vec) {
            seterr(err, errcap, "out of memory");
            goto fail;
        }
    }
    return t;
fail:
    pc_dirty_free(t);
    return NULL;
}

void pc_dirty_free(pc_dirty *t)
{
    if (!t)
        return;
    if (t->uffd >= 0)
        close(t->uffd);     /* closing the uffd unregisters and drops the protection */
    if (t->pagemap_fd >= 0)
        close(t->pagemap_fd);
    if (t->clear_refs_fd >= 0)
        close(t->clear_refs_fd);
    free(t->vec);
    free(t);
}

static int fail(pc_dirty *t, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(pc_dirty *t, int e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->err, sizeof(t->err), fmt, ap);
    va_end(ap);
    return -e;
}

int pc_dirty_add_range(pc_dirty *t, uint64_t base, uint64_t length, uint64_t host_page_size, pc_bitmap *dirty)
{
    if (t->nranges >= sizeof(t->ranges) / sizeof(t->ranges[0]))
        return fail(t, ENOSPC, "too many ranges");
    if (!host_page_size || host_page_size % TP || base % host_page_size || length % host_page_size || !dirty ||
        dirty->nbits < length / TP)
        return fail(t, EINVAL, "range 0x%llx+0x%llx: misaligned or bitmap too small",
                    (unsigned long long)base, (unsigned long long)length);
    if (t->method == PC_DIRTY_WP_ASYNC) {
        struct uffdio_register r = { .range = { base, length }, .mode = UFFDIO_REGISTER_MODE_WP };
        if (ioctl(t->uffd, UFFDIO_REGISTER, &r) < 0)
            return fail(t, errno, "UFFDIO_REGISTER (WP) 0x%llx+0x%llx: %s", (unsigned long long)base,
                        (unsigned long long)length, strerror(errno));
    }
    t->ranges[t->nranges++] = (pc_dirty_range){ base, length, host_page_size, dirty };
    return 0;
}

static int clear_refs(pc_dirty *t)
{
    if (pwrite(t->clear_refs_fd, "4", 1, 0) != 1)
        return fail(t, errno, "clear_refs: %s", strerror(errno));
    return 0;
}

int pc_dirty_start(pc_dirty *t)
{
    if (t->method == PC_DIRTY_SOFT)
        return clear_refs(t);
    for (uint32_t i = 0; i < t->nranges; i++) {
        pc_dirty_range *r = &t->ranges[i];
        struct uffdio_writeprotect wp = { .range = { r->base, r->length }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
        if (ioctl(t->uffd, UFFDIO_WRITEPROTECT, &wp) < 0)
            return fail(t, errno, "UFFDIO_WRITEPROTECT 0x%llx+0x%llx: %s", (unsigned long long)r->base,
                        (unsigned long long)r->length, strerror(errno));
    }
    return 0;
}

/* Mark [start, end) of range r dirty, widened to whole host pages. */
static uint64_t mark(pc_dirty_range *r, uint64_t start, uint64_t end)
{
    uint64_t hps = r->host_page_size;
    start = (start - r->base) / hps * hps;
    end = (end - r->base + hps - 1) / hps * hps;
    if (end > r->length)
        end = r->length;
    if (end <= start)
        return 0;
    pc_bitmap_set_range_atomic(r->dirty, start / TP, (end - start) / TP);
    return (end - start) / TP;
}

static int64_t collect_wp(pc_dirty *t, pc_dirty_range *r)
{
    struct page_region *vec = t->vec;
    uint64_t found = 0, pos = r->base, end = r->base + r->length;
    while (pos < end) {
        struct pm_scan_arg a = {
            .size = sizeof(a),
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = pos,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = t->vec_len,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(t->pagemap_fd, PAGEMAP_SCAN, &a);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(t, errno, "PAGEMAP_SCAN 0x%llx..0x%llx: %s", (unsigned long long)pos,
                        (unsigned long long)end, strerror(errno));
        }
        for (long i = 0; i < n; i++)
            found += mark(r, vec[i].start, vec[i].end);
        if (a.walk_end <= pos)
            return fail(t, EIO, "PAGEMAP_SCAN made no progress at 0x%llx", (unsigned long long)pos);
        pos = a.walk_end;
    }
    return (int64_t)found;
}

static int64_t collect_soft(pc_dirty *t, pc_dirty_range *r)
{
    uint64_t *buf = t->vec;     /* not a thread-local array: see the note on thread-local storage in core.h */
    uint64_t found = 0, npages = r->length / TP, first = r->base / TP;
    for (uint64_t p = 0; p < npages;) {
        uint64_t n = npages - p < PAGEMAP_CHUNK ? npages - p : PAGEMAP_CHUNK;
        ssize_t got = pread(t->pagemap_fd, buf, n * 8, (off_t)((first + p) * 8));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return fail(t, errno, "pagemap read: %s", strerror(errno));
        }
        if (got == 0 || got % 8)
            return fail(t, EIO, "pagemap read: short read");
        uint64_t k = (uint64_t)got / 8;
        for (uint64_t i = 0; i < k; i++) {
            if (!(buf[i] & PM_SOFT_DIRTY))
                continue;
            uint64_t a = r->base + (p + i) * TP;
            uint64_t j = i + 1;
            while (j < k && (buf[j] & PM_SOFT_DIRTY))
                j++;
            found += mark(r, a, r->base + (p + j) * TP);
            i = j - 1;
        }
        p += k;
    }
    return (int64_t)found;
}

int64_t pc_dirty_collect(pc_dirty *t)
{
    uint64_t t0 = pc_now_ns();
    int64_t total = 0;
    for (uint32_t i = 0; i < t->nranges; i++) {
        int64_t n = t->method == PC_DIRTY_WP_ASYNC ? collect_wp(t, &t->ranges[i]) : collect_soft(t, &t->ranges[i]);
        if (n < 0)
            return n;
        total += n;
    }
    if (t->method == PC_DIRTY_SOFT) {
        int rc = clear_refs(t);
        if (rc < 0)
            return rc;
    }
    t->scans++;
    t->scan_ns += pc_now_ns() - t0;
    t->pages_found += (uint64_t)total;
    return total;
}

int pc_dirty_stop(pc_dirty *t)
{
    if (t->method != PC_DIRTY_WP_ASYNC)
        return 0;
    int rc = 0;
    for (uint32_t i = 0; i < t->nranges; i++) {
        pc_dirty_range *r = &t->ranges[i];
        struct uffdio_range rg = { r->base, r->length };
        if (ioctl(t->uffd, UFFDIO_UNREGISTER, &rg) < 0 && !rc)
            rc = fail(t, errno, "UFFDIO_UNREGISTER: %s", strerror(errno));
    }
    t->nranges = 0;
    return rc;
}
