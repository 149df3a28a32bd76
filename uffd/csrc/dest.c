/* Destination data path: see dest.h. */
#define _GNU_SOURCE
#include "dest.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "pagehash.h"
#include "uffd.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define RX_BUF_LIMIT (512u << 20)   /* the largest control message Python may ask for (PACKAGED) */
#define RX_MAX_RECS 4096u



/* The threads a faulting vCPU waits on (the fault service, the preempt
 * channel's receiver) run at a higher priority than the bulk stream's: on a
 * machine with few cores the bulk receiver would otherwise take half of the
 * CPU a requested page needs. Once per thread; without CAP_SYS_NICE the thread
 * keeps its nice and takes only the short slice (pc_thread_set_nice). */
static void boost_this_thread(void)
{
    static __thread int done;
    if (done)
        return;
    done = 1;
    (void)pc_thread_set_nice(PC_URGENT_NICE);
}

/* ------------------------------------------------------------------ pc_dst */

pc_dst *pc_dst_new(uint32_t nblocks)
{
    pc_dst *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->blocks = calloc(nblocks ? nblocks : 1, sizeof(*d->blocks));
    d->descs = calloc(nblocks ? nblocks : 1, sizeof(*d->descs));
    d->desc_block = calloc(nblocks ? nblocks : 1, sizeof(*d->desc_block));
    d->infos = calloc(nblocks ? nblocks : 1, sizeof(*d->infos));
    if (!d->blocks || !d->descs || !d->desc_block || !d->infos) {
        pc_dst_free(d);
        return NULL;
    }
    d->nblocks = nblocks;
    d->uffd = -1;
    d->rp_fd = -1;
    d->req_fd = -1;
    d->rp_last_block = -1;
    pthread_mutex_init(&d->rp_lock, NULL);
    pthread_mutex_init(&d->wlock, NULL);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* the fault thread's reads must not starve behind a stream of placements */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&d->place_lock, &ra);
    pthread_rwlockattr_destroy(&ra);
    return d;
}

static size_t request_ns_bytes(uint64_t length, uint64_t host_page_size)
{
    return length / host_page_size * sizeof(uint64_t);
}

static void free_request_ns(pc_dst_block *b)
{
    if (b->request_ns)
        pc_unmap_populated(b->request_ns, request_ns_bytes(b->length, b->host_page_size));
    b->request_ns = NULL;
}

void pc_dst_free(pc_dst *d)
{
    if (!d)
        return;
    for (uint32_t i = 0; i < d->nblocks && d->blocks; i++) {
        free_request_ns(&d->blocks[i]);
        pc_bitmap_free(d->blocks[i].claimed);
    }
    if (d->zero_buf)
        munmap(d->zero_buf, d->max_host_page_size);
    free(d->blocks);
    free(d->descs);
    free(d->desc_block);
    free(d->infos);
    if (d->removed)
        for (uint32_t i = 0; i < d->nblocks; i++)
            pc_bitmap_free(d->removed[i]);
    free(d->removed);
    free(d->regions);
    free(d->rdescs);
    pthread_rwlock_destroy(&d->place_lock);
    pthread_mutex_destroy(&d->rp_lock);
    pthread_mutex_destroy(&d->wlock);
    free(d);
}

int pc_dst_set_block(pc_dst *d, uint32_t i, const char *idstr, uint32_t idlen, uint64_t base, uint64_t length,
                     uint64_t host_page_size, int zeroable, pc_bitmap *received, pc_bitmap *requested, uint64_t *hashes)
{
    if (i >= d->nblocks || !pc_block_geometry_ok(idlen, length, host_page_size) || base % host_page_size)
        return -EINVAL;
    uint64_t npages = length / PC_TARGET_PAGE_SIZE;
    if (!received || !requested || received->nbits < npages || requested->nbits < npages)
        return -EINVAL;
    pc_dst_block *b = &d->blocks[i];
    free_request_ns(b);
    /* allocated now: the fault service writes here on each request, and fresh pages first
     * written by the started guest's first faults cost up to 60-90 us each where the host backs
     * memory lazily (8 bytes a host page: 0.2 % of a 4 KiB-page guest) */
    b->request_ns = pc_map_populated(request_ns_bytes(length, host_page_size));
    if (!b->request_ns)
        return -ENOMEM;
    b->base = base;
    b->length = length;
    b->host_page_size = host_page_size;
    b->zeroable = zeroable;
    b->received = received;
    b->requested = requested;
    b->hashes = hashes;
    b->idlen = idlen;
    memcpy(b->idstr, idstr, idlen);
    b->idstr[idlen] = 0;
    d->infos[i] = (pc_ram_block_info){ b->idstr, idlen, length, host_page_size };
    return 0;
}

int pc_dst_finish_setup(pc_dst *d)
{
    uint64_t maxhps = PC_TARGET_PAGE_SIZE;
    /* The fault reader wants the blocks sorted by address: an insertion sort
     * of a handful of blocks, keeping the map back to stream order. */
    for (uint32_t i = 0; i < d->nblocks; i++) {
        pc_dst_block *b = &d->blocks[i];
        if (!b->length)
            return -EINVAL;
        uint32_t j = i;
        while (j && d->descs[j - 1].base > b->base) {
            d->descs[j] = d->descs[j - 1];
            d->desc_block[j] = d->desc_block[j - 1];
            j--;
        }
        d->descs[j] = (pc_block_desc){ b->base, b->length, b->host_page_size, b->received, b->requested };
        d->desc_block[j] = i;
        if (b->host_page_size > maxhps)
            maxhps = b->host_page_size;
    }
    for (uint32_t i = 1; i < d->nblocks; i++)
        if (d->descs[i].base < d->descs[i - 1].base + d->descs[i - 1].length)
            return -EINVAL;     /* overlapping blocks */
    d->max_host_page_size = maxhps;
    d->zero_buf = mmap(NULL, maxhps, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d->zero_buf == MAP_FAILED) {
        d->zero_buf = NULL;
        return -ENOMEM;
    }
    return 0;
}

void pc_dst_set_uffd(pc_dst *d, int uffd) { __atomic_store_n(&d->uffd, uffd, __ATOMIC_RELEASE); }

int pc_dst_listen(pc_dst *d, int uffd, int go_fd, uint32_t *bad)
{
    for (uint32_t i = 0; i < d->nblocks; i++) {
        const pc_dst_block *b = &d->blocks[i];
        uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (b->alias ? UFFDIO_REGISTER_MODE_MINOR : 0);
        int rc = pc_uffd_register(uffd, b->base, b->length, mode, NULL);
        if (rc < 0) {
            *bad = i;
            return rc;
        }
    }
    pc_dst_set_uffd(d, uffd);
    if (go_fd >= 0) {
        const char go = 'g';
        while (write(go_fd, &go, 1) < 0)
            if (errno != EINTR) {
                *bad = d->nblocks;
                return -errno;
            }
    }
    return 0;
}

int pc_dst_set_remote(pc_dst *d, int uffd, const pc_dst_region *regions, uint32_t n)
{
    if (d->remote || !d->zero_buf || n == 0)
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        const pc_dst_region *r = &regions[i];
        if (r->block >= d->nblocks)
            return -EINVAL;
        const pc_dst_block *b = &d->blocks[r->block];
        if (r->page_size != b->host_page_size || r->size == 0 || r->size % r->page_size || r->base % r->page_size ||
            r->block_offset % r->page_size || r->block_offset > b->length || r->size > b->length - r->block_offset)
            return -EINVAL;
        for (uint32_t j = 0; j < i; j++) {
            const pc_dst_region *q = &regions[j];
            if (r->base < q->base + q->size && q->base < r->base + r->size)
                return -EINVAL;     /* overlapping in memory */
            if (r->block == q->block && r->block_offset < q->block_offset + q->size &&
                q->block_offset < r->block_offset + r->size)
                return -EINVAL;     /* two places for the same bytes */
        }
    }
    d->regions = calloc(n, sizeof(*d->regions));
    d->rdescs = calloc(n, sizeof(*d->rdescs));
    d->removed = calloc(d->nblocks, sizeof(*d->removed));
    if (!d->regions || !d->rdescs || !d->removed)
        return -ENOMEM;
    for (uint32_t i = 0; i < d->nblocks; i++)
        if (!(d->removed[i] = pc_bitmap_new(d->blocks[i].length / PC_TARGET_PAGE_SIZE)))
            return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {     /* insertion sort by base */
        uint32_t j = i;
        while (j && d->regions[j - 1].base > regions[i].base) {
            d->regions[j] = d->regions[j - 1];
            j--;
        }
        d->regions[j] = regions[i];
    }
    for (uint32_t i = 0; i < n; i++)
        d->rdescs[i] = (pc_block_desc){ d->regions[i].base, d->regions[i].size, d->regions[i].page_size, NULL, NULL };
    d->nregions = n;
    d->remote = 1;
    __atomic_store_n(&d->uffd, uffd, __ATOMIC_RELEASE);
    return 0;
}

int pc_dst_set_alias(pc_dst *d, uint32_t i, uint64_t alias, int fd)
{
    if (i >= d->nblocks || d->remote || !alias || fd < 0)
        return -EINVAL;
    pc_dst_block *b = &d->blocks[i];
    if (!b->length || alias % b->host_page_size)
        return -EINVAL;
    pc_bitmap_free(b->claimed);
    if (!(b->claimed = pc_bitmap_new(b->length / b->host_page_size)))
        return -ENOMEM;
    b->alias = (uint8_t *)(uintptr_t)alias;
    b->fd = fd;
    return 0;
}

/* The region holding host page host_off of block bi, or NULL. */
static const pc_dst_region *remote_region(const pc_dst *d, uint32_t bi, uint64_t host_off)
{
    for (uint32_t i = 0; i < d->nregions; i++) {
        const pc_dst_region *r = &d->regions[i];
        if (r->block == bi && host_off >= r->block_offset && host_off - r->block_offset < r->size)
            return r;
    }
    return NULL;
}

void pc_dst_set_vcpus(pc_dst *d, const uint32_t *tids, uint32_t n)
{
    pthread_mutex_lock(&d->wlock);
    d->nvcpus = n > PC_DST_MAX_VCPUS ? PC_DST_MAX_VCPUS : n;
    memcpy(d->vcpu_tids, tids, d->nvcpus * sizeof(uint32_t));
    pthread_mutex_unlock(&d->wlock);
}

void pc_dst_set_rp(pc_dst *d, int fd)
{
    pthread_mutex_lock(&d->rp_lock);
    d->rp_fd = fd;
    d->rp_last_block = -1;      /* the first request on a new return path names its block */
    d->req_fd = -1;             /* a new connection: the source says again where it reads them */
    pthread_mutex_unlock(&d->rp_lock);
}

void pc_dst_set_request_channel(pc_dst *d, int fd)
{
    pthread_mutex_lock(&d->rp_lock);
    d->req_fd = fd;
    d->req_last_block = -1;
    pthread_mutex_unlock(&d->rp_lock);
}

static int write_all(int fd, const uint8_t *p, uint64_t len)
{
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = { fd, POLLOUT, 0 };
                poll(&pfd, 1, 100);
                continue;
            }
            return -errno;
        }
        p += n;
        len -= (uint64_t)n;
    }
    return 0;
}

int pc_dst_rp_write(pc_dst *d, const uint8_t *data, uint64_t len)
{
    pc_mutex_lock_spinning(&d->rp_lock, PC_LOCK_SPIN_NS);     /* the switch's PONG 3 comes this way */
    int rc = d->rp_fd < 0 ? -EPIPE : write_all(d->rp_fd, data, len);
    pthread_mutex_unlock(&d->rp_lock);
    return rc;
}

/* Under rp_lock: one page request, naming the block when it changed (each way on its own). */
static int send_request_locked(pc_dst *d, uint32_t bi, uint64_t host_off)
{
    pc_dst_block *b = &d->blocks[bi];
    /* A huge page's request stays on the return path: the preempt channel is then busy with
     * megabytes of urgent pages (its receiver holds that socket through each 256 KiB read),
     * while the bulk stream stands aside for them (bulk_pause), so main's socket is quiet. */
    int preempt_way = d->req_fd >= 0 && b->host_page_size == PC_TARGET_PAGE_SIZE;
    int fd = preempt_way ? d->req_fd : d->rp_fd;
    int64_t *last = preempt_way ? &d->req_last_block : &d->rp_last_block;
    if (fd < 0)
        return -EPIPE;
    uint8_t msg[4 + 13 + 255];
    uint64_t len;
    if (*last != (int64_t)bi) {
        pc_put_be16(msg, PC_RP_REQ_PAGES_ID);
        pc_put_be16(msg + 2, 13 + b->idlen);
        pc_put_be64(msg + 4, host_off);
        pc_put_be32(msg + 12, (uint32_t)b->host_page_size);
        msg[16] = (uint8_t)b->idlen;
        memcpy(msg + 17, b->idstr, b->idlen);
        len = 17 + b->idlen;
    } else {
        pc_put_be16(msg, PC_RP_REQ_PAGES);
        pc_put_be16(msg + 2, 12);
        pc_put_be64(msg + 4, host_off);
        pc_put_be32(msg + 12, (uint32_t)b->host_page_size);
        len = 16;
    }
    int rc = write_all(fd, msg, len);
    if (rc == 0)
        *last = bi;
    return rc;
}

int64_t pc_dst_resend_requests(pc_dst *d)
{
    int64_t sent = 0;
    pthread_mutex_lock(&d->rp_lock);
    for (uint32_t bi = 0; bi < d->nblocks; bi++) {
        pc_dst_block *b = &d->blocks[bi];
        uint64_t tp_per_hp = b->host_page_size / PC_TARGET_PAGE_SIZE;
        uint64_t npages = b->length / PC_TARGET_PAGE_SIZE;
        for (uint64_t i = pc_bitmap_find_next_set(b->requested, 0); i < npages;
             i = pc_bitmap_find_next_set(b->requested, i + 1)) {
            uint64_t first = i - i % tp_per_hp;
            if (pc_bitmap_test(b->received, first))
                continue;
            int rc = send_request_locked(d, bi, first * PC_TARGET_PAGE_SIZE);
            if (rc < 0) {
                pthread_mutex_unlock(&d->rp_lock);
                return rc;
            }
            sent++;
            i = first + tp_per_hp - 1;
        }
    }
    pthread_mutex_unlock(&d->rp_lock);
    __atomic_add_fetch(&d->c.requests_sent, (uint64_t)sent, __ATOMIC_RELAXED);
    return sent;
}

/* A discarded page is missing again: whoever brings it next writes it. */
static void unclaim(pc_dst_block *b, uint64_t offset, uint64_t length)
{
    if (!b->claimed || !length)
        return;
    /* a word at a time: a whole 2 GiB block of 4 KiB pages is 8192 words, not 524288 bits */
    uint64_t hps = b->host_page_size, first = offset / hps;
    pc_bitmap_clear_range_atomic(b->claimed, first, (offset + length - 1) / hps + 1 - first);
}

int pc_dst_discard(pc_dst *d, uint32_t bi, uint64_t offset, uint64_t length)
{
    if (bi >= d->nblocks)
        return -EINVAL;
    pc_dst_block *b = &d->blocks[bi];
    if (offset % PC_TARGET_PAGE_SIZE || length % PC_TARGET_PAGE_SIZE || offset > b->length ||
        length > b->length - offset)
        return -ERANGE;
    pc_bitmap_clear_range_atomic(b->received, offset / PC_TARGET_PAGE_SIZE, length / PC_TARGET_PAGE_SIZE);
    unclaim(b, offset, length);
    return 0;
}

int pc_dst_discard_ranges(pc_dst *d, uint32_t bi, const uint64_t *ranges, uint32_t n, int punch_fd,
                          uint32_t *bad)
{
    if (bi >= d->nblocks)
        return -EINVAL;
    pc_dst_block *b = &d->blocks[bi];
    for (uint32_t i = 0; i < n; i++) {     /* all or nothing: check every range first */
        uint64_t off = ranges[2 * i], len = ranges[2 * i + 1];
        if (len == 0 || off % PC_TARGET_PAGE_SIZE || len % PC_TARGET_PAGE_SIZE || off > b->length ||
            len > b->length - off) {
            *bad = i;
            return -ERANGE;
        }
    }
    int dropped = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = ranges[2 * i], len = ranges[2 * i + 1];
        uint64_t first = off / PC_TARGET_PAGE_SIZE, npages = len / PC_TARGET_PAGE_SIZE;
        /* nothing placed in the range: it is still missing, nothing to drop (the immediate
         * switch discards whole blocks that were never touched here) */
        int placed = pc_bitmap_find_next_set(b->received, first) < first + npages;
        pc_bitmap_clear_range_atomic(b->received, first, npages);
        unclaim(b, off, len);
        if (!placed)
            continue;
        int rc = punch_fd >= 0 ? pc_mem_punch_hole(punch_fd, off, len) : pc_mem_madvise_dontneed(b->base + off, len);
        if (rc < 0) {
            *bad = i;
            return rc;
        }
        dropped++;
    }
    return dropped;
}

/* Under wlock. */
static void ring_put(pc_dst *d, uint32_t kind, uint64_t ns)
{
    d->rings[kind][d->ring_head[kind]++ % PC_DST_LATENCY_RING] = ns;
}

uint32_t pc_dst_drain_latency(pc_dst *d, uint32_t kind, uint64_t *out, uint32_t max)
{
    if (kind > PC_LAT_REPLY)
        return 0;
    pthread_mutex_lock(&d->wlock);
    uint32_t n = 0;
    if (d->ring_head[kind] - d->ring_tail[kind] > PC_DST_LATENCY_RING)   /* overrun: keep the newest */
        d->ring_tail[kind] = d->ring_head[kind] - PC_DST_LATENCY_RING;
    while (d->ring_tail[kind] < d->ring_head[kind] && n < max)
        out[n++] = d->rings[kind][d->ring_tail[kind]++ % PC_DST_LATENCY_RING];
    pthread_mutex_unlock(&d->wlock);
    return n;
}

void pc_dst_snapshot(pc_dst *d, pc_dst_counters *c, uint64_t *blocktime_ns, uint64_t *vcpu_blocktime_ns, uint32_t *nwaiting)
{
    pthread_mutex_lock(&d->wlock);
    uint64_t now = pc_now_ns();
    *c = d->c;
    *blocktime_ns = d->blocktime_ns + (d->nvcpus && d->vcpus_blocked == d->nvcpus ? now - d->all_blocked_since_ns : 0);
    for (uint32_t v = 0; v < d->nvcpus; v++) {
        vcpu_blocktime_ns[v] = d->vcpu_blocktime_ns[v];
        for (uint32_t w = 0; w < d->nwaiters; w++)   /* include time blocked so far */
            if (d->waiters[w].tid == d->vcpu_tids[v])
                vcpu_blocktime_ns[v] += now - d->waiters[w].t_ns;
    }
    *nwaiting = d->nwaiters;
    pthread_mutex_unlock(&d->wlock);
}

static int vcpu_index(const pc_dst *d, uint32_t tid)
{
    for (uint32_t v = 0; v < d->nvcpus; v++)
        if (d->vcpu_tids[v] == tid)
            return (int)v;
    return -1;
}

/* Under wlock: a thread stopped waiting for a page at time now. */
static void waiter_done_locked(pc_dst *d, uint32_t w, uint64_t now)
{
    pc_dst_waiter *x = &d->waiters[w];
    int v = x->vcpu;        /* as counted when it started waiting */
    if (v >= 0) {
        d->vcpu_blocktime_ns[v] += now - x->t_ns;
        if (d->vcpus_blocked == d->nvcpus)
            d->blocktime_ns += now - d->all_blocked_since_ns;
        d->vcpus_blocked--;
    }
    ring_put(d, PC_LAT_FAULT, now - x->t_ns);
    d->c.latency_samples++;
    d->waiters[w] = d->waiters[--d->nwaiters];
}

/* A thread faulted on a page that is not here yet. */
static void page_waited(pc_dst *d, const pc_fault *f)
{
    pc_dst_block *b = &d->blocks[f->block];
    pthread_mutex_lock(&d->wlock);
    int v = vcpu_index(d, f->tid);
    if (v >= 0)     /* a vCPU waits for one page at a time: a new fault ends its earlier wait */
        for (uint32_t w = 0; w < d->nwaiters; w++)
            if (d->waiters[w].vcpu == v) {
                waiter_done_locked(d, w, f->t_ns > d->waiters[w].t_ns ? f->t_ns : d->waiters[w].t_ns);
                break;
            }
    if (d->nwaiters < PC_DST_MAX_WAITERS) {
        uint32_t w = d->nwaiters++;
        d->waiters[w] = (pc_dst_waiter){ f->offset, f->t_ns, f->block, f->tid, v };
        if (v >= 0 && ++d->vcpus_blocked == d->nvcpus)
            d->all_blocked_since_ns = f->t_ns;
        /* The page may have been placed between the read and now: placement
         * sets the bits before it takes wlock, so one of us sees the other. */
        if (pc_bitmap_test(b->received, f->offset / PC_TARGET_PAGE_SIZE))
            waiter_done_locked(d, w, pc_now_ns());
    }
    pthread_mutex_unlock(&d->wlock);
}

/* Faults read and mapped to (stream block, host page offset): a request for
 * each new one on the return path, and every one recorded as a waiter. */
static void request_pages(pc_dst *d, pc_fault *faults, int n)
{
    pc_mutex_lock_spinning(&d->rp_lock, PC_LOCK_SPIN_NS);
    for (int i = 0; i < n; i++) {
        pc_fault *f = &faults[i];
        if (f->status == PC_FAULT_OUTSIDE) {
            d->c.faults_outside++;
            continue;
        }
        if (f->status == PC_FAULT_NEW) {
            pc_dst_block *b = &d->blocks[f->block];
            /* On failure the request stays outstanding (requested bit
             * set) and is sent again by pc_dst_resend_requests. */
            if (send_request_locked(d, f->block, f->offset) == 0) {
                uint64_t sent = pc_now_ns();
                __atomic_store_n(&b->request_ns[f->offset / b->host_page_size], sent, __ATOMIC_RELAXED);
                __atomic_add_fetch(&d->c.requests_sent, 1, __ATOMIC_RELAXED);
                pthread_mutex_lock(&d->wlock);
                ring_put(d, PC_LAT_REQUEST, sent - f->t_ns);
                pthread_mutex_unlock(&d->wlock);
            } else {
                __atomic_store_n(&b->request_ns[f->offset / b->host_page_size], f->t_ns, __ATOMIC_RELAXED);
                __atomic_add_fetch(&d->c.requests_failed, 1, __ATOMIC_RELAXED);
            }
        }
    }
    pthread_mutex_unlock(&d->rp_lock);
    for (int i = 0; i < n; i++)
        if (faults[i].status != PC_FAULT_OUTSIDE)
            page_waited(d, &faults[i]);
}

/* Remote memory, under the write side of place_lock: UFFD_EVENT_REMOVE
 * (MADV_DONTNEED, a balloon) of [start, end): those pages read as zeros from
 * now on. They count as received (nothing is asked for or placed there any
 * more; a page that still arrives becomes a zero page); 4 KiB ranges are
 * woken so a thread already waiting there faults again and gets a zero page;
 * huge-page ranges are unregistered (there is no ZEROPAGE for them: the
 * kernel fills them with zeros itself from then on, and unregistering wakes). */
static void remote_removed(pc_dst *d, uint64_t start, uint64_t end)
{
    d->c.removes++;
    for (uint32_t i = 0; i < d->nregions; i++) {
        const pc_dst_region *r = &d->regions[i];
        uint64_t lo = start > r->base ? start : r->base, hi = end < r->base + r->size ? end : r->base + r->size;
        if (lo >= hi)
            continue;
        lo = lo / r->page_size * r->page_size;
        hi = (hi + r->page_size - 1) / r->page_size * r->page_size;
        pc_dst_block *b = &d->blocks[r->block];
        uint64_t first = (r->block_offset + (lo - r->base)) / PC_TARGET_PAGE_SIZE, n = (hi - lo) / PC_TARGET_PAGE_SIZE;
        pc_bitmap_set_range_atomic(d->removed[r->block], first, n);
        pc_bitmap_set_range_atomic(b->received, first, n);
        d->c.removed_pages += n;
        if (r->page_size > PC_TARGET_PAGE_SIZE)
            pc_uffd_unregister(d->uffd, lo, hi - lo);
        else
            pc_uffd_wake(d->uffd, lo, hi - lo);
    }
}

/* Remote memory: a fault on a removed page gets a zero page at once. */
static void remote_zero_fault(pc_dst *d, const pc_dst_region *r, const pc_fault *f)
{
    uint64_t dst = r->base + f->offset;
    int64_t done = 0;
    int rc = r->page_size == PC_TARGET_PAGE_SIZE ? pc_uffd_zeropage(d->uffd, dst, r->page_size, 0, &done)
                                                 : pc_uffd_wake(d->uffd, dst, r->page_size);
    if (rc == -EAGAIN)      /* another event pending: let the thread fault again after we read it */
        pc_uffd_wake(d->uffd, dst, r->page_size);
    uint64_t now = pc_now_ns();
    pthread_mutex_lock(&d->wlock);
    d->c.zero_faults++;
    ring_put(d, PC_LAT_FAULT, now - f->t_ns);
    d->c.latency_samples++;
    pthread_mutex_unlock(&d->wlock);
}

/* Wait until fd is readable (1) or `other` shows any of other_events, an error or a hang-up
 * (0: that first); -errno, -EBADF when fd is not open. */
static int wait_readable_or(int fd, int other, short other_events)
{
    struct pollfd pfd[2] = { { fd, POLLIN, 0 }, { other, other_events, 0 } };
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (pfd[1].revents)
            return 0;
        if (pfd[0].revents & (POLLERR | POLLNVAL))
            return -EBADF;
        if (pfd[0].revents)
            return 1;
    }
}

static int remote_fault_service_run(pc_dst *d, int stop_fd)
{
    enum { BATCH = 64 };
    pc_fault faults[BATCH];
    pc_uffd_event events[BATCH];
    for (;;) {
        int w = wait_readable_or(d->uffd, stop_fd, POLLIN);
        if (w <= 0)
            return w;
        for (;;) {
            uint32_t nother = 0;
            pthread_rwlock_wrlock(&d->place_lock);
            int n = pc_read_faults_ex(d->uffd, d->rdescs, d->nregions, faults, BATCH, NULL, events, BATCH, &nother);
            for (uint32_t i = 0; n >= 0 && i < nother; i++) {
                const pc_uffd_event *e = &events[i];
                if (e->event == UFFD_EVENT_REMOVE || e->event == UFFD_EVENT_UNMAP)
                    remote_removed(d, e->a, e->b);      /* unmapped: nothing to place there either */
                else if (e->event == UFFD_EVENT_FORK && e->ufd >= 0)
                    close(e->ufd);                      /* not ours to serve */
            }
            pthread_rwlock_unlock(&d->place_lock);
            if (n == -EAGAIN)
                break;
            if (n < 0)
                return n;
            /* regions -> (stream block, offset in it); filter as pc_read_faults does for local blocks */
            int m = 0;
            uint32_t dropped = 0;
            for (int i = 0; i < n; i++) {
                pc_fault *f = &faults[i];
                if (f->status == PC_FAULT_OUTSIDE) {
                    pc_uffd_wake(d->uffd, f->address & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1), PC_TARGET_PAGE_SIZE);
                    faults[m++] = *f;
                    continue;
                }
                const pc_dst_region *r = &d->regions[f->block];
                uint64_t page = (r->block_offset + f->offset) / PC_TARGET_PAGE_SIZE;
                pc_dst_block *b = &d->blocks[r->block];
                if (pc_bitmap_test(d->removed[r->block], page)) {
                    remote_zero_fault(d, r, f);
                    continue;
                }
                if (pc_bitmap_test(b->received, page)) {
                    dropped++;      /* placed after the fault was queued: the copy woke the thread */
                    continue;
                }
                f->block = r->block;
                f->offset += r->block_offset;
                f->status = pc_bitmap_test_and_set_atomic(b->requested, page) ? PC_FAULT_ALREADY_REQUESTED : PC_FAULT_NEW;
                faults[m++] = *f;
            }
            __atomic_add_fetch(&d->c.faults, (uint64_t)n, __ATOMIC_RELAXED);
            __atomic_add_fetch(&d->c.faults_dropped, dropped, __ATOMIC_RELAXED);
            request_pages(d, faults, m);
            if (n + (int)nother < BATCH)
                break;
        }
    }
}

int pc_fault_service_run(pc_dst *d, int stop_fd, int go_fd)
{
    enum { BATCH = 64 };
    pc_fault faults[BATCH];
    boost_this_thread();
    if (go_fd >= 0) {
        /* Released by a write, not by a Python event: a thread returning from a Python wait
         * needs the GIL, which the switch's thread holds up to RUN; the guest's first faults
         * would then wait for it too. */
        int go = wait_readable_or(go_fd, stop_fd, POLLIN);
        if (go <= 0)
            return go;
    }
    if (d->remote)
        return remote_fault_service_run(d, stop_fd);
    int uffd = __atomic_load_n(&d->uffd, __ATOMIC_ACQUIRE);
    for (;;) {
        int w = wait_readable_or(uffd, stop_fd, POLLIN);
        if (w <= 0)
            return w;
        for (;;) {
            uint32_t dropped = 0;
            int n = pc_read_faults(uffd, d->descs, d->nblocks, faults, BATCH, &dropped);
            if (n == -EAGAIN)
                break;
            if (n < 0)
                return n;
            __atomic_add_fetch(&d->c.faults, (uint64_t)n + dropped, __ATOMIC_RELAXED);
            for (int i = 0; i < n; i++)     /* sorted order -> stream order */
                if (faults[i].status != PC_FAULT_OUTSIDE)
                    faults[i].block = d->desc_block[faults[i].block];
            __atomic_add_fetch(&d->c.faults_dropped, dropped, __ATOMIC_RELAXED);
            request_pages(d, faults, n);
            if (n < BATCH)
                break;
        }
    }
}

/* ------------------------------------------------------------------- pc_rx */

/* Buffer sizes follow the guest (issue 13: the service's own memory at most
 * 1% of the guest): the main channel's receive buffer is 1/512 of the RAM the
 * stream declares and the 4 KiB stage (both halves) as much, each between a
 * floor and today's caps (PC_RX_BUF_MAX, PC_RX_STAGE_PAGES), which a 2 GiB
 * guest reaches. Before the RAM setup (no blocks) the main buffer starts at
 * the floor. The preempt channel carries only requested pages, mostly placed
 * straight from the stage: its buffer stays at the floor. The buffer still
 * grows on demand for a big control message (up to RX_BUF_LIMIT). */
#define RX_GUEST_SHARE 512u

uint64_t pc_rx_buf_size_for(int kind, uint64_t ram_bytes)
{
    uint64_t n = ram_bytes / RX_GUEST_SHARE;
    if (kind == PC_RX_PREEMPT || n < PC_RX_BUF_MIN)
        return PC_RX_BUF_MIN;
    return n > PC_RX_BUF_MAX ? PC_RX_BUF_MAX : n;
}

uint32_t pc_rx_stage_pages_for(uint64_t ram_bytes)
{
    uint64_t n = ram_bytes / RX_GUEST_SHARE / (2 * PC_TARGET_PAGE_SIZE);
    if (n < PC_RX_STAGE_MIN_PAGES)
        return PC_RX_STAGE_MIN_PAGES;
    return n > PC_RX_STAGE_PAGES ? PC_RX_STAGE_PAGES : (uint32_t)n;
}

static uint64_t dst_ram_bytes(const pc_dst *d)
{
    uint64_t total = 0;
    for (uint32_t i = 0; d && i < d->nblocks; i++)
        total += d->blocks[i].length;
    return total;
}

/* Size the buffers for the blocks of d: the receive buffer only grows (it may
 * hold unread bytes), the stage is sized until its first use. */
static int rx_size_buffers(pc_rx *rx, const pc_dst *d)
{
    uint64_t ram = dst_ram_bytes(d);
    if (!rx->stage_alloc)
        rx->stage_pages = pc_rx_stage_pages_for(ram);
    uint64_t cap = pc_rx_buf_size_for(rx->kind, ram);
    return pc_sockbuf_grow(&rx->in, cap);
}

pc_rx *pc_rx_new(pc_dst *d, int fd, int kind, uint32_t ram_section_id)
{
    pc_rx *rx = calloc(1, sizeof(*rx));
    if (!rx)
        return NULL;
    rx->dst = d;
    rx->kind = kind;
    rx->ram_section_id = ram_section_id;
    int sb_rc = pc_sockbuf_init(&rx->in, fd, PC_RX_BUF_MIN, RX_BUF_LIMIT);
    if (sb_rc == 0)
        sb_rc = rx_size_buffers(rx, d);
    rx->max_recs = RX_MAX_RECS;
    rx->recs = calloc(rx->max_recs, sizeof(*rx->recs));
    /* no blocks yet (a stream whose RAM setup has not arrived): pc_rx_attach later */
    pthread_mutex_init(&rx->job_lock, NULL);
    pthread_cond_init(&rx->job_cv, NULL);
    cpu_set_t cpus;
    rx->use_placer = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) >= PC_RX_PLACER_MIN_CPUS;
    rx->tmp_size = d ? d->max_host_page_size : PC_TARGET_PAGE_SIZE;
    rx->tmp_alloc = mmap(NULL, rx->tmp_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (sb_rc < 0 || !rx->recs || rx->tmp_alloc == MAP_FAILED) {
        if (rx->tmp_alloc == MAP_FAILED)
            rx->tmp_alloc = NULL;
        pc_rx_free(rx);
        return NULL;
    }
    rx->tmp = rx->tmp_alloc;
    if (kind == PC_RX_MAIN)
        pc_rx_set_linger(rx, PC_RX_BULK_LINGER_NS, 0);
    else
        pc_rx_set_linger(rx, 0, PC_RX_WAITED_LINGER_NS);
    pc_ram_scan_init(&rx->scan, PC_TARGET_PAGE_SIZE, 0);
    rx->tmp_block = -1;
    return rx;
}

void pc_rx_set_linger(pc_rx *rx, uint64_t ns, uint64_t waited_ns)
{
    rx->linger_ns = ns;
    rx->waited_linger_ns = waited_ns;
    pc_sockbuf_linger(&rx->in, ns);     /* Python's receives too (control items on the main channel) */
}

void pc_rx_free(pc_rx *rx)
{
    if (!rx)
        return;
    if (rx->placer_started) {
        pthread_mutex_lock(&rx->job_lock);
        rx->placer_quit = 1;
        pthread_cond_broadcast(&rx->job_cv);
        pthread_mutex_unlock(&rx->job_lock);
        pthread_join(rx->placer, NULL);
    }
    pthread_mutex_destroy(&rx->job_lock);
    pthread_cond_destroy(&rx->job_cv);
    pc_sockbuf_release(&rx->in);
    free(rx->recs);
    if (rx->tmp_alloc)
        munmap(rx->tmp_alloc, rx->tmp_size);     /* not via dst: it may be freed first */
    if (rx->stage_alloc)
        munmap(rx->stage_alloc, 2ull * rx->stage_pages * PC_TARGET_PAGE_SIZE);
    free(rx);
}

int pc_rx_attach(pc_rx *rx, pc_dst *d)
{
    if (d->max_host_page_size > rx->tmp_size) {
        void *tmp = mmap(NULL, d->max_host_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (tmp == MAP_FAILED)
            return -ENOMEM;
        munmap(rx->tmp_alloc, rx->tmp_size);
        rx->tmp = rx->tmp_alloc = tmp;
        rx->tmp_size = d->max_host_page_size;
    }
    int rc = rx_size_buffers(rx, d);
    if (rc < 0)
        return rc;
    rx->dst = d;
    rx->tmp_block = -1;
    rx->tmp_inplace = rx->tmp_skip = 0;
    return 0;
}

void pc_rx_stop(pc_rx *rx) { __atomic_store_n(&rx->stop, 1, __ATOMIC_RELEASE); }

static void tmp_abandon(pc_rx *rx);

void pc_rx_reset_temp(pc_rx *rx)
{
    tmp_abandon(rx);
    pc_ram_scan_init(&rx->scan, PC_TARGET_PAGE_SIZE, 0);
}

static int rx_fail(pc_rx *rx, int code, int err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int rx_fail(pc_rx *rx, int code, int err, const char *fmt, ...)
{
    /* the placer thread's errors wait in job_msg until the receiver collects them */
    int placer = rx->placer_started && pthread_equal(pthread_self(), rx->placer);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(placer ? rx->job_msg : rx->err_msg, sizeof(rx->err_msg), fmt, ap);
    va_end(ap);
    if (placer)
        rx->job_errno = err;
    else
        rx->err_errno = err;
    return code;
}

/* Remote memory: place one host page through the owner's uffd at the address
 * of the region that maps it. Under the read side of place_lock, so that a
 * REMOVE read by the fault thread is either seen here (a zero page instead)
 * or read after this copy (and the owner's zap then clears it). */
static int place_remote(pc_rx *rx, uint32_t bi, uint64_t host_off, const uint8_t *src)
{
    pc_dst *d = rx->dst;
    pc_dst_block *b = &d->blocks[bi];
    const pc_dst_region *r = remote_region(d, bi, host_off);
    if (!r) {
        __atomic_add_fetch(&d->c.unmapped_host_pages, 1, __ATOMIC_RELAXED);
        return 0;       /* no region of the owner holds these bytes */
    }
    uint64_t hps = b->host_page_size, dst = r->base + (host_off - r->block_offset);
    uint64_t first = host_off / PC_TARGET_PAGE_SIZE, deadline = 0, backoff_ns = 1000;
    for (;;) {
        int64_t done = 0;
        int rc, zero = 0;
        pthread_rwlock_rdlock(&d->place_lock);
        if (pc_bitmap_test(d->removed[bi], first)) {
            zero = 1;   /* removed: it reads zeros (huge pages: unregistered, the kernel does it) */
            rc = hps == PC_TARGET_PAGE_SIZE ? pc_uffd_zeropage(d->uffd, dst, hps, 0, &done) : 0;
        } else if (!src && b->zeroable) {
            zero = 1;
            rc = pc_uffd_zeropage(d->uffd, dst, hps, 0, &done);
        } else {
            rc = pc_uffd_copy(d->uffd, dst, (uint64_t)(uintptr_t)(src ? src : d->zero_buf), hps, 0, &done);
        }
        pthread_rwlock_unlock(&d->place_lock);
        if (rc == -EAGAIN) {
            /* The owner is changing its mappings (a REMOVE not read yet):
             * wait for the fault thread to read it, lock released. */
            uint64_t now = pc_now_ns();
            if (!deadline)
                deadline = now + 30ull * 1000000000ull;
            if (__atomic_load_n(&rx->stop, __ATOMIC_ACQUIRE))
                return rx_fail(rx, PC_RX_E_IO, EINTR, "stopped while the memory owner's mappings were changing");
            if (now > deadline)
                return rx_fail(rx, PC_RX_E_PLACE, EAGAIN, "%s offset 0x%llx: the memory owner's mappings kept "
                               "changing for 30 s (are its userfaultfd events being read?)", b->idstr,
                               (unsigned long long)host_off);
            struct timespec ts = { 0, (long)backoff_ns };
            nanosleep(&ts, NULL);
            if (backoff_ns < 1000000)
                backoff_ns *= 2;
            continue;
        }
        if (rc == -EEXIST) {
            __atomic_add_fetch(&d->c.eexist, 1, __ATOMIC_RELAXED);
            return 0;
        }
        if (rc == -ENOENT) {    /* the owner unmapped it (its UNMAP event may still be unread) */
            __atomic_add_fetch(&d->c.unmapped_host_pages, 1, __ATOMIC_RELAXED);
            return 0;
        }
        if (rc < 0)
            return rx_fail(rx, PC_RX_E_PLACE, -rc, "%s %s offset 0x%llx (address 0x%llx of the memory owner): %s",
                           zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY", b->idstr, (unsigned long long)host_off,
                           (unsigned long long)dst,
                           rc == -ESRCH ? "the process that owns this memory is gone" : strerror(-rc));
        return 0;
    }
}

/* Waiters for any host page in [off, off + len) of block bi: the pages were placed. */
static void pages_arrived(pc_dst *d, uint32_t bi, uint64_t off, uint64_t len)
{
    pthread_mutex_lock(&d->wlock);
    uint64_t now = 0;
    for (uint32_t w = 0; w < d->nwaiters;) {
        if (d->waiters[w].block == bi && d->waiters[w].host_off - off < len) {
            if (!now)
                now = pc_now_ns();
            waiter_done_locked(d, w, now);      /* moves the last entry into w */
        } else {
            w++;
        }
    }
    pthread_mutex_unlock(&d->wlock);
}

/* UFFDIO_COPY (or ZEROPAGE when src is NULL and the block allows it) of len
 * bytes at dst, a run of whole host pages. A page already present stops the
 * kernel there: it is counted and stepped over, the rest is still placed. */
static int place_local(pc_rx *rx, int uffd, const pc_dst_block *b, uint64_t host_off, const uint8_t *src,
                       uint64_t len)
{
    pc_dst *d = rx->dst;
    uint64_t hps = b->host_page_size, dst = b->base + host_off, pos = 0;
    int zero = !src && b->zeroable;
    if (!src && !zero && len > hps) {       /* zero_buf is one host page: one at a time */
        for (; pos < len; pos += hps) {
            int rc = place_local(rx, uffd, b, host_off + pos, NULL, hps);
            if (rc)
                return rc;
        }
        return 0;
    }
    for (int attempt = 0; pos < len;) {
        int64_t done = 0;
        int rc = zero ? pc_uffd_zeropage(uffd, dst + pos, len - pos, 0, &done)
                      : pc_uffd_copy(uffd, dst + pos, (uint64_t)(uintptr_t)(src ? src + pos : d->zero_buf), len - pos,
                                     0, &done);
        pos += (uint64_t)done / hps * hps;
        if (rc == 0)
            break;
        if (rc == -EEXIST) {
            /* Already present: a race between channels, or a resend after a
             * recovery. The kernel copied nothing there; the page stands. */
            __atomic_add_fetch(&d->c.eexist, 1, __ATOMIC_RELAXED);
            pos += hps;
            continue;
        }
        if (rc == -EAGAIN && done == 0 && attempt++ < 1000) {
            sched_yield();      /* the mapping is changing (e.g. a fork): try again */
            continue;
        }
        return rx_fail(rx, PC_RX_E_PLACE, -rc, "%s %s offset 0x%llx len 0x%llx: %s",
                       zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY", b->idstr, (unsigned long long)(host_off + pos),
                       (unsigned long long)(len - pos), strerror(-rc));
    }
    return 0;
}

/* What follows placing n host pages from host_off (zeros of them all zero):
 * the received bits, counters, reply latencies, and the waiters woken. */
static void pages_placed(pc_rx *rx, uint32_t bi, uint64_t host_off, uint64_t n, uint64_t zeros)
{
    pc_dst *d = rx->dst;
    pc_dst_block *b = &d->blocks[bi];
    uint64_t hps = b->host_page_size, len = n * hps;
    uint64_t first = host_off / PC_TARGET_PAGE_SIZE, ntp = len / PC_TARGET_PAGE_SIZE;
    pc_bitmap_set_range_atomic(b->received, first, ntp);
    pc_bitmap_clear_range_atomic(b->requested, first, ntp);
    __atomic_add_fetch(&d->c.host_pages_placed, n, __ATOMIC_RELAXED);
    if (zeros)
        __atomic_add_fetch(&d->c.zero_host_pages_placed, zeros, __ATOMIC_RELAXED);
    __atomic_add_fetch(&rx->c.host_pages_placed, n, __ATOMIC_RELAXED);
    int replied = 0;
    for (uint64_t j = 0, hp = host_off / hps; j < n; j++, hp++) {
        if (!__atomic_load_n(&b->request_ns[hp], __ATOMIC_RELAXED))
            continue;
        uint64_t requested = __atomic_exchange_n(&b->request_ns[hp], 0, __ATOMIC_RELAXED);
        if (requested) {
            uint64_t now = pc_now_ns();
            pthread_mutex_lock(&d->wlock);
            ring_put(d, PC_LAT_REPLY, now > requested ? now - requested : 0);
            pthread_mutex_unlock(&d->wlock);
            replied = 1;
        }
    }
    /* the received bits are set before wlock is taken: a fault recorded
     * after this check sees them (page_waited) */
    if (replied || __atomic_load_n(&d->nwaiters, __ATOMIC_RELAXED))
        pages_arrived(d, bi, host_off, len);
}

static void record_hashes(const pc_dst_block *b, uint64_t host_off, const uint8_t *src, uint64_t len)
{
    if (!b->hashes)
        return;
    for (uint64_t i = 0, first = host_off / PC_TARGET_PAGE_SIZE; i < len / PC_TARGET_PAGE_SIZE; i++)
        b->hashes[first + i] = src ? pc_page_hash(src + i * PC_TARGET_PAGE_SIZE) : pc_zero_page_hash();
}

/* n bytes (a multiple of 64) to memory no cache holds: streaming stores skip
 * reading each line before it is overwritten, which is most of the cost of a
 * copy onto cold memory. Only dst must be aligned: a record's body in the
 * receive buffer sits 8 bytes past its header, wherever that fell, and
 * unaligned loads cost next to nothing. Not fenced: streaming_done() before
 * the page is mapped. */
static void copy_streaming_unfenced(uint8_t *dst, const uint8_t *src, uint64_t n)
{
#if defined(__SSE2__)
    if (!(((uintptr_t)dst | n) & 63)) {
        for (uint64_t i = 0; i < n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), e);
        }
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* The streamed bytes are visible (to the guest once the page is mapped). */
static void streaming_done(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

static void copy_streaming(uint8_t *dst, const uint8_t *src, uint64_t n)
{
    copy_streaming_unfenced(dst, src, n);
    streaming_done();
}

/* Claim host page host_off of a prefilled block for this channel: 1, or 0
 * when it is placed or being placed (writing it again could undo what a
 * running guest wrote since). */
static int claim_page(pc_dst_block *b, uint64_t host_off)
{
    return !pc_bitmap_test_and_set_atomic(b->claimed, host_off / b->host_page_size) &&
           !pc_bitmap_test(b->received, host_off / PC_TARGET_PAGE_SIZE);
}

/* Give back claimed pages not placed: their bytes may be half written, so
 * they become a hole first (an unclaimed page reads zeros, see pc_dst_block). */
static void release_claims(pc_dst_block *b, uint64_t host_off, uint64_t len)
{
    (void)pc_mem_punch_hole(b->fd, host_off, len);
    unclaim(b, host_off, len);
}

static void release_claim(pc_dst_block *b, uint64_t host_off)
{
    release_claims(b, host_off, b->host_page_size);
}

/* Map claimed host pages [host_off, host_off+len) (written through the alias)
 * into the guest with as few UFFDIO_CONTINUEs as it takes: one, unless a page
 * is mapped already (counted, skipped). 0 or -errno. */
static int continue_pages(pc_dst *d, int uffd, const pc_dst_block *b, uint64_t host_off, uint64_t len)
{
    for (uint64_t end = host_off + len, attempt = 0; host_off < end;) {
        int64_t done = 0;
        int rc = pc_uffd_continue(uffd, b->base + host_off, end - host_off, 0, &done);
        if (rc == 0)
            return 0;
        host_off += (uint64_t)done;
        if (rc == -EEXIST) {
            __atomic_add_fetch(&d->c.eexist, 1, __ATOMIC_RELAXED);
            host_off += b->host_page_size;
        } else if (rc == -EAGAIN && attempt++ < 1000) {
            sched_yield();      /* the mapping is changing (e.g. a fork): try again */
        } else {
            return rc;
        }
    }
    return 0;
}

/* Map claimed host pages [host_off, host_off+len) into the guest: their bytes
 * went through the alias already or, for zero pages (any_zero), none did and a
 * hole (a page discarded since the prefill) is allocated zeroed first. 0, or an
 * rx error once the claims are given back. */
static int map_claimed_pages(pc_rx *rx, int uffd, pc_dst_block *b, uint64_t host_off, uint64_t len, int any_zero)
{
    const char *what = "UFFDIO_CONTINUE";
    int rc = 0;
    if (any_zero && (rc = pc_mem_prefill(b->fd, host_off, len)) < 0)
        what = "fallocate";     /* a no-op on allocated pages */
    if (rc == 0)
        rc = continue_pages(rx->dst, uffd, b, host_off, len);
    if (rc == 0)
        return 0;
    release_claims(b, host_off, len);
    return rx_fail(rx, PC_RX_E_PLACE, -rc, "%s %s offset 0x%llx len 0x%llx: %s", what, b->idstr,
                   (unsigned long long)host_off, (unsigned long long)len, strerror(-rc));
}

static int map_claimed_page(pc_rx *rx, int uffd, pc_dst_block *b, uint64_t host_off, int zero)
{
    return map_claimed_pages(rx, uffd, b, host_off, b->host_page_size, zero);
}

/* A prefilled block (pc_dst_set_alias): the n host pages from host_off (src as
 * place_pages's, or each page's bytes apart in pages[], NULL for a zero page:
 * records in the receive buffer), each written through the alias by the
 * channel that claims it first (a page claimed by another is left to it: that
 * one places it and wakes its faults); a run of pages claimed here is mapped
 * with one UFFDIO_CONTINUE. Zero pages are not written: a claimed page reads
 * zeros. 0 or an rx error. */
static int place_minor_pages(pc_rx *rx, int uffd, uint32_t bi, uint64_t host_off, const uint8_t *src,
                             const uint8_t *const *pages, uint64_t n, uint64_t nzero)
{
    pc_dst_block *b = &rx->dst->blocks[bi];
    uint64_t hps = b->host_page_size;
    for (uint64_t j = 0; j < n;) {
        uint64_t first = j, zeros = 0;
        for (; j < n && claim_page(b, host_off + j * hps); j++) {
            const uint8_t *page = pages ? pages[j] : src ? src + j * hps : NULL;
            if (page && nzero && (nzero == n || pc_is_zero(page, hps)))
                page = NULL;
            if (page)
                copy_streaming_unfenced(b->alias + host_off + j * hps, page, hps);
            else
                zeros++;
            record_hashes(b, host_off + j * hps, page, hps);    /* before the guest can write it */
        }
        if (j > first) {
            streaming_done();
            uint64_t off = host_off + first * hps;
            int rc = map_claimed_pages(rx, uffd, b, off, (j - first) * hps, zeros > 0);
            if (rc)
                return rc;
            pages_placed(rx, bi, off, j - first, zeros);
        }
        if (j < n) {
            __atomic_add_fetch(&rx->dst->c.eexist, 1, __ATOMIC_RELAXED);
            j++;
        }
    }
    return 0;
}

/* Before LISTEN nothing is registered: a plain write of len bytes at off (precopy);
 * src NULL writes zeros. */
static void precopy_write(const pc_dst_block *b, uint64_t off, const uint8_t *src, uint64_t len)
{
    uint8_t *at = (uint8_t *)(uintptr_t)(b->base + off);
    if (src && b->alias)
        copy_streaming(at, src, len);     /* prefilled: cold */
    else if (src)
        memcpy(at, src, len);
    else
        memset(at, 0, len);
}

/* Place n consecutive complete host pages of block bi from host_off: src is
 * n host pages of bytes (nzero of them all zero), or NULL when they are all
 * zero. Runs of 4 KiB pages go in with one ioctl; the bookkeeping stays per
 * page. */
static int place_pages(pc_rx *rx, uint32_t bi, uint64_t host_off, const uint8_t *src, uint64_t n, uint64_t nzero)
{
    pc_dst *d = rx->dst;
    pc_dst_block *b = &d->blocks[bi];
    uint64_t hps = b->host_page_size, len = n * hps;
    int uffd = __atomic_load_n(&d->uffd, __ATOMIC_ACQUIRE);

    if (b->alias && uffd >= 0)
        return place_minor_pages(rx, uffd, bi, host_off, src, NULL, n, nzero);
    record_hashes(b, host_off, src, len);
    if (d->remote) {
        for (uint64_t j = 0; j < n; j++) {
            int rc = place_remote(rx, bi, host_off + j * hps, src ? src + j * hps : NULL);
            if (rc)
                return rc;
        }
    } else if (uffd < 0) {
        precopy_write(b, host_off, src, len);
    } else {
        int rc = place_local(rx, uffd, b, host_off, src, len);
        if (rc)
            return rc;
    }
    pages_placed(rx, bi, host_off, n, src ? nzero : n);
    return 0;
}

/* Place one complete host page. src is HPS bytes, or NULL when all zero. */
static int place_host_page(pc_rx *rx, uint32_t bi, uint64_t host_off, const uint8_t *src)
{
    return place_pages(rx, bi, host_off, src, 1, !src);
}

/* The 4 KiB staging area (rx->stage_pages pages a half), mapped on first use; NULL without memory. */
static uint8_t *rx_stage(pc_rx *rx)
{
    if (!rx->stage_alloc) {
        void *m = mmap(NULL, 2ull * rx->stage_pages * PC_TARGET_PAGE_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            return NULL;
        rx->stage = rx->stage_alloc = m;
    }
    return rx->stage;
}

/* ------------------------------------------------------------ the placer
 *
 * The receiver hands a staged run of 4 KiB pages to the placer thread and
 * goes on receiving into the other half of the stage: the kernel's copy out of the socket and UFFDIO_COPY's copy into
 * the guest run on two CPUs. That pays only with CPUs to spare (use_placer: PC_RX_PLACER_MIN_CPUS);
 * with 2 CPUs the hand-overs cost more than the overlap gains, and the receiver places its runs
 * itself (measured: idle 4 KiB bulk 1.51 -> 1.77 GB/s, busy 0.40 -> 0.93). One job at a time; pc_rx_run and
 * pc_rx_place_records return only once it is done (what they report as
 * placed is placed). Its errors are the receiver's at the next hand-over. */

/* Place n consecutive 4 KiB pages from src (nzero of them all zero). In a
 * zeroable block the zero pages go by UFFDIO_ZEROPAGE and stay unbacked: a
 * mixed run is split here, on the placer's CPU, never copied as pages of
 * zeros (the destination would hold more memory than the source). */
static int place_run(pc_rx *rx, uint32_t bi, uint64_t off, const uint8_t *src, uint64_t n, uint64_t nzero)
{
    const pc_dst_block *b = &rx->dst->blocks[bi];
    if (!src || nzero == n)
        return place_pages(rx, bi, off, NULL, n, n);
    if (!nzero || !b->zeroable || b->host_page_size != PC_TARGET_PAGE_SIZE)
        return place_pages(rx, bi, off, src, n, nzero);
    for (uint64_t i = 0; i < n;) {
        int zero = pc_is_zero(src + i * PC_TARGET_PAGE_SIZE, PC_TARGET_PAGE_SIZE);
        uint64_t j = i + 1;
        while (j < n && pc_is_zero(src + j * PC_TARGET_PAGE_SIZE, PC_TARGET_PAGE_SIZE) == zero)
            j++;
        int rc = zero ? place_pages(rx, bi, off + i * PC_TARGET_PAGE_SIZE, NULL, j - i, j - i)
                      : place_pages(rx, bi, off + i * PC_TARGET_PAGE_SIZE, src + i * PC_TARGET_PAGE_SIZE, j - i, 0);
        if (rc)
            return rc;
        i = j;
    }
    return 0;
}

static void *placer_main(void *arg)
{
    pc_rx *rx = arg;
    pthread_mutex_lock(&rx->job_lock);
    for (;;) {
        while (!rx->job_pending && !rx->placer_quit)
            pthread_cond_wait(&rx->job_cv, &rx->job_lock);
        if (!rx->job_pending)
            break;
        pthread_mutex_unlock(&rx->job_lock);
        int rc = place_run(rx, rx->job_block, rx->job_off, rx->job_src, rx->job_n, rx->job_nzero);
        pthread_mutex_lock(&rx->job_lock);
        if (rc && !rx->job_rc)
            rx->job_rc = rc;
        rx->job_pending = 0;
        pthread_cond_broadcast(&rx->job_cv);
    }
    pthread_mutex_unlock(&rx->job_lock);
    return NULL;
}

/* Wait for the job in flight; its error (a PC_RX_E_* code, message in
 * err_msg unless the receiver already has one: failed != 0) or 0. */
static int rx_drain_after(pc_rx *rx, int failed)
{
    if (!rx->placer_started)
        return 0;
    pthread_mutex_lock(&rx->job_lock);
    while (rx->job_pending)
        pthread_cond_wait(&rx->job_cv, &rx->job_lock);
    int rc = rx->job_rc;
    if (rc && !failed) {
        memcpy(rx->err_msg, rx->job_msg, sizeof(rx->err_msg));
        rx->err_errno = rx->job_errno;
        rx->job_rc = 0;
    }
    pthread_mutex_unlock(&rx->job_lock);
    return rc;
}
static int rx_drain(pc_rx *rx) { return rx_drain_after(rx, 0); }

/* Place n host pages from src (the stage or a temp page, which the receiver
 * leaves alone until the job is done) on the placer thread; synchronously
 * when it cannot start. */
static int place_async(pc_rx *rx, uint32_t bi, uint64_t off, const uint8_t *src, uint64_t n, uint64_t nzero)
{
    int rc = rx_drain(rx);
    if (rc)
        return rc;
    if (rx->kind == PC_RX_PREEMPT)      /* requested pages: no hand-over between threads on their way */
        return place_run(rx, bi, off, src, n, nzero);
    if (!rx->use_placer)
        return place_run(rx, bi, off, src, n, nzero);
    if (!rx->placer_started) {
        if (pthread_create(&rx->placer, NULL, placer_main, rx) != 0)
            return place_run(rx, bi, off, src, n, nzero);
        rx->placer_started = 1;
        (void)pthread_setname_np(rx->placer, "rx-placer");     /* what ps -L and top -H show */
    }
    pthread_mutex_lock(&rx->job_lock);
    rx->job_block = bi;
    rx->job_off = off;
    rx->job_src = src;
    rx->job_n = n;
    rx->job_nzero = nzero;
    rx->job_pending = 1;
    pthread_cond_broadcast(&rx->job_cv);
    pthread_mutex_unlock(&rx->job_lock);
    return 0;
}

/* The receiver is done filling the current stage half: the next fills go
 * to the other one (once the job reading it, if any, is done). */
static int rx_flip_stage(pc_rx *rx)
{
    if (!rx->stage_alloc)
        return 0;
    uint64_t half = (uint64_t)rx->stage_pages * PC_TARGET_PAGE_SIZE;
    rx->stage = rx->stage == rx->stage_alloc ? rx->stage_alloc + half : rx->stage_alloc;
    if (rx->job_pending && rx->job_src >= rx->stage && rx->job_src < rx->stage + half)
        return rx_drain(rx);
    return 0;
}

/* ------------------------------------------------ the bulk stream's page
 *
 * The main channel claims a prefilled block's huge page at its first record
 * and writes its records in place as they come (no temp page). A requested
 * page must not wait for the bulk stream (the source pauses its bulk inside a
 * huge page while urgent pages go, and the bulk receiver runs below the
 * guest): when the preempt channel brings a copy of the page the bulk stream
 * is writing, it takes the page over. Each write of the bulk receiver into the
 * page is a window (bulk_writing) that it opens only while the page is still
 * its own; the preempt channel marks the page taken, waits for an open window
 * to close, and writes its own copy (the same bytes: the source's guest is
 * stopped) and maps the page. From then on the guest may write to it, and
 * nothing of the bulk stream's lands there. */

#define PC_BULK_TAKEN (1ull << 63)

static uint64_t bulk_page_id(uint32_t bi, uint64_t host_off, uint64_t hps)
{
    return ((uint64_t)bi << 40 | host_off / hps) + 1;
}

/* The bulk receiver opens a write window into its page: 1, or 0 when the
 * preempt channel took the page over (the rest of this copy is dropped). */
static int bulk_write_begin(pc_rx *rx)
{
    if (rx->kind == PC_RX_PREEMPT)
        return 1;
    pc_dst *d = rx->dst;
    __atomic_store_n(&d->bulk_writing, 1, __ATOMIC_SEQ_CST);
    if (!(__atomic_load_n(&d->bulk_page, __ATOMIC_SEQ_CST) & PC_BULK_TAKEN))
        return 1;
    __atomic_store_n(&d->bulk_writing, 0, __ATOMIC_SEQ_CST);
    rx->tmp_inplace = 0;
    rx->tmp_skip = 1;
    return 0;
}

static void bulk_write_end(pc_rx *rx)
{
    if (rx->kind == PC_RX_PREEMPT)
        return;
    streaming_done();       /* streaming stores are visible before the window closes */
    __atomic_store_n(&rx->dst->bulk_writing, 0, __ATOMIC_SEQ_CST);
}

/* The bulk stream is done with its page (placed, dropped or given back). */
static void bulk_page_done(pc_rx *rx)
{
    if (rx->kind != PC_RX_PREEMPT)
        __atomic_store_n(&rx->dst->bulk_page, 0, __ATOMIC_SEQ_CST);
}

/* The preempt channel brings host page host_off of block bi, which another
 * channel claimed: 1 when it was the bulk stream's page in place and is this
 * channel's now (to write whole and map), 0 when the other channel places it. */
static int take_over_bulk_page(pc_dst *d, uint32_t bi, uint64_t host_off)
{
    pc_dst_block *b = &d->blocks[bi];
    uint64_t id = bulk_page_id(bi, host_off, b->host_page_size);
    if (!__atomic_compare_exchange_n(&d->bulk_page, &id, id | PC_BULK_TAKEN, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return 0;
    while (__atomic_load_n(&d->bulk_writing, __ATOMIC_SEQ_CST))
        sched_yield();      /* one receive or one record's copy */
    /* the bulk receiver's last window may have mapped it just before */
    if (pc_bitmap_test(b->received, host_off / PC_TARGET_PAGE_SIZE))
        return 0;
    __atomic_add_fetch(&d->c.taken_over, 1, __ATOMIC_RELAXED);
    return 1;
}

/* A host page begins on this channel: its first record is at host_off. With
 * claim, a prefilled block's page is claimed now and written in place (the
 * preempt channel takes over the bulk stream's, see above). */
static void tmp_begin(pc_rx *rx, uint32_t bi, uint64_t host_off, int claim)
{
    pc_dst *d = rx->dst;
    pc_dst_block *b = &d->blocks[bi];
    rx->tmp_block = bi;
    rx->tmp_host_off = rx->tmp_next_off = host_off;
    rx->tmp_all_zero = 1;
    rx->tmp_inplace = rx->tmp_skip = 0;
    if (claim && b->alias && __atomic_load_n(&d->uffd, __ATOMIC_ACQUIRE) >= 0) {
        if (claim_page(b, host_off)) {
            rx->tmp_inplace = 1;
            if (rx->kind != PC_RX_PREEMPT)
                __atomic_store_n(&d->bulk_page, bulk_page_id(bi, host_off, b->host_page_size), __ATOMIC_SEQ_CST);
        } else if (rx->kind == PC_RX_PREEMPT &&
                   (take_over_bulk_page(d, bi, host_off) || claim_page(b, host_off))) {
            rx->tmp_inplace = 1;    /* (claimed again: the bulk stream gave it back meanwhile) */
        } else {
            rx->tmp_skip = 1;
        }
    }
}

/* Target page off of the host page being assembled arrived (data NULL or
 * all zero: a zero page). In place, a zero page is not written: the claimed
 * page reads zeros until this channel writes it. */
static void tmp_put(pc_rx *rx, uint64_t off, const uint8_t *data)
{
    int zero = !data || pc_is_zero(data, PC_TARGET_PAGE_SIZE);
    if (!zero)
        rx->tmp_all_zero = 0;
    if (rx->tmp_skip)
        return;
    if (rx->tmp_inplace) {
        uint8_t *slot = rx->dst->blocks[rx->tmp_block].alias + off;
        if (!zero && slot != data && bulk_write_begin(rx)) {   /* (else received there: direct receive) */
            copy_streaming_unfenced(slot, data, PC_TARGET_PAGE_SIZE);
            bulk_write_end(rx);
        }
        return;
    }
    uint8_t *slot = rx->tmp + (off - rx->tmp_host_off);
    if (slot == data)
        return;     /* received into its slot (direct receive) */
    if (zero)
        memset(slot, 0, PC_TARGET_PAGE_SIZE);
    else
        memcpy(slot, data, PC_TARGET_PAGE_SIZE);
}

/* The page assembled in place is complete: map it (inside the bulk stream's
 * write window, which rx_place_tmp opened, and which this closes). */
static int place_inplace(pc_rx *rx, uint32_t bi, uint64_t host_off)
{
    pc_dst_block *b = &rx->dst->blocks[bi];
    streaming_done();
    /* hashed before it is mapped: from then on the guest may write to it */
    record_hashes(b, host_off, rx->tmp_all_zero ? NULL : b->alias + host_off, b->host_page_size);
    int rc = map_claimed_page(rx, __atomic_load_n(&rx->dst->uffd, __ATOMIC_ACQUIRE), b, host_off, rx->tmp_all_zero);
    if (rc == 0)
        pages_placed(rx, bi, host_off, 1, rx->tmp_all_zero);
    bulk_page_done(rx);
    bulk_write_end(rx);
    return rc;
}

/* The host page's last record arrived (tmp_block already -1). A page
 * assembled in tmp is placed here, not on the placer thread (the page's
 * records went straight into tmp, so placing is the only copy left; handing
 * 2 MiB pages over to another thread measured slower on a loaded 2-core machine). */
static int rx_place_tmp(pc_rx *rx, uint32_t bi, uint64_t host_off)
{
    /* a page in place is mapped inside a write window; one the preempt channel took over is
     * dropped (bulk_write_begin says so and sets tmp_skip) */
    int inplace = rx->tmp_inplace && bulk_write_begin(rx);
    int skip = rx->tmp_skip;
    rx->tmp_inplace = rx->tmp_skip = 0;
    if (skip) {
        __atomic_add_fetch(&rx->dst->c.eexist, 1, __ATOMIC_RELAXED);
        bulk_page_done(rx);
        return 0;
    }
    if (inplace)
        return place_inplace(rx, bi, host_off);
    return place_host_page(rx, bi, host_off, rx->tmp_all_zero ? NULL : rx->tmp);
}

/* Before LISTEN nothing is registered (precopy), and QEMU's later precopy passes send
 * only the dirty target pages of a huge page (ram_save_host_page): such a page is
 * written in place, one target page at a time, as QEMU's own precopy load does. */
static int precopy_writes(const pc_rx *rx)
{
    return !rx->dst->remote && __atomic_load_n(&rx->dst->uffd, __ATOMIC_ACQUIRE) < 0;
}

static void precopy_put(pc_rx *rx, uint32_t bi, uint64_t off, const uint8_t *data)
{
    pc_dst_block *b = &rx->dst->blocks[bi];
    precopy_write(b, off, data, PC_TARGET_PAGE_SIZE);
    record_hashes(b, off, data, PC_TARGET_PAGE_SIZE);
    pc_bitmap_set_range_atomic(b->received, off / PC_TARGET_PAGE_SIZE, 1);
}

/* Precopy: the target pages of a host page assembled so far, written in place (the
 * rest of the page is not coming: it was not dirty). */
static void tmp_flush_precopy(pc_rx *rx)
{
    if (rx->tmp_block < 0)
        return;
    uint32_t bi = (uint32_t)rx->tmp_block;
    for (uint64_t off = rx->tmp_host_off; off < rx->tmp_next_off; off += PC_TARGET_PAGE_SIZE)
        precopy_put(rx, bi, off, rx->tmp + (off - rx->tmp_host_off));
    tmp_abandon(rx);
}

/* A page left incomplete (the channel ended, or the stream starts over):
 * one claimed in place is given back. */
static void tmp_abandon(pc_rx *rx)
{
    if (rx->tmp_block >= 0 && rx->tmp_inplace && rx->dst && bulk_write_begin(rx)) {
        release_claim(&rx->dst->blocks[rx->tmp_block], rx->tmp_host_off);
        bulk_page_done(rx);
        bulk_write_end(rx);
    } else if (rx->tmp_block >= 0 && rx->dst) {
        bulk_page_done(rx);
    }
    rx->tmp_block = -1;
    rx->tmp_inplace = rx->tmp_skip = 0;
}

static int place_records(pc_rx *rx, const pc_ram_record *recs, uint32_t n, const uint8_t *buf)
{
    pc_dst *d = rx->dst;
    for (uint32_t i = 0; i < n; i++) {
        const pc_ram_record *r = &recs[i];
        if (r->block >= d->nblocks)
            return rx_fail(rx, PC_RX_E_PROTO, EINVAL, "record names block %u of %u", r->block, d->nblocks);
        pc_dst_block *b = &d->blocks[r->block];
        uint64_t hps = b->host_page_size;
        if (r->offset % PC_TARGET_PAGE_SIZE || r->offset >= b->length)
            return rx_fail(rx, PC_RX_E_PROTO, ERANGE, "page offset 0x%llx outside block %s (0x%llx bytes)",
                           (unsigned long long)r->offset, b->idstr, (unsigned long long)b->length);
        const uint8_t *data = r->kind == PC_REC_PAGE ? buf + r->data_pos : NULL;
        if (r->kind == PC_REC_PAGE)
            __atomic_add_fetch(&rx->c.pages_normal, 1, __ATOMIC_RELAXED);
        else
            __atomic_add_fetch(&rx->c.pages_zero, 1, __ATOMIC_RELAXED);
        if (hps == PC_TARGET_PAGE_SIZE) {
            if (data && pc_is_zero(data, PC_TARGET_PAGE_SIZE))
                data = NULL;
            /* After LISTEN, a run of records at consecutive offsets is placed
             * with one ioctl: UFFDIO_ZEROPAGE when all are zero, else their
             * bodies gathered into the stage (zeros for ZERO records) and one
             * UFFDIO_COPY. A page on its own goes straight from the buffer. */
            uint32_t k = 1, nz = data ? 0 : 1;
            if (!d->remote && __atomic_load_n(&d->uffd, __ATOMIC_ACQUIRE) >= 0) {
                for (; i + k < n && k < rx->stage_pages; k++) {
                    const pc_ram_record *q = &recs[i + k];
                    if (q->block != r->block || q->offset != r->offset + (uint64_t)k * PC_TARGET_PAGE_SIZE ||
                        q->offset >= b->length)
                        break;
                    if (q->kind != PC_REC_PAGE || pc_is_zero(buf + q->data_pos, PC_TARGET_PAGE_SIZE))
                        nz++;
                }
            }
            if (k > 1 && b->alias && !rx->use_placer) {
                /* A prefilled block: each body goes from the buffer to its page, no stage between */
                const uint8_t *pages[PC_RX_STAGE_PAGES];
                for (uint32_t j = 0; j < k; j++) {
                    const pc_ram_record *q = &recs[i + j];
                    pages[j] = q->kind == PC_REC_PAGE ? buf + q->data_pos : NULL;
                    if (j)
                        __atomic_add_fetch(q->kind == PC_REC_PAGE ? &rx->c.pages_normal : &rx->c.pages_zero, 1,
                                           __ATOMIC_RELAXED);
                }
                int rc = place_minor_pages(rx, __atomic_load_n(&d->uffd, __ATOMIC_ACQUIRE), r->block, r->offset,
                                           NULL, pages, k, nz);
                if (rc)
                    return rc;
                i += k - 1;
                continue;
            }
            uint8_t *stage = k > 1 && nz < k ? rx_stage(rx) : NULL;
            if (k > 1 && (stage || nz == k)) {
                for (uint32_t j = 1; j < k; j++)
                    __atomic_add_fetch(recs[i + j].kind == PC_REC_PAGE ? &rx->c.pages_normal : &rx->c.pages_zero, 1,
                                       __ATOMIC_RELAXED);
                for (uint32_t j = 0; stage && j < k; j++) {
                    uint8_t *slot = stage + (uint64_t)j * PC_TARGET_PAGE_SIZE;
                    if (recs[i + j].kind == PC_REC_PAGE)
                        memcpy(slot, buf + recs[i + j].data_pos, PC_TARGET_PAGE_SIZE);
                    else
                        memset(slot, 0, PC_TARGET_PAGE_SIZE);
                }
                int rc = stage ? place_async(rx, r->block, r->offset, stage, k, nz)
                               : place_pages(rx, r->block, r->offset, NULL, k, nz);
                if (!rc && stage)
                    rc = rx_flip_stage(rx);
                if (rc)
                    return rc;
                i += k - 1;
                continue;
            }
            int rc = place_host_page(rx, r->block, r->offset, data);
            if (rc)
                return rc;
            continue;
        }
        uint64_t host_off = r->offset & ~(hps - 1);
        if (rx->tmp_block < 0 ? r->offset != host_off
                              : (uint32_t)rx->tmp_block != r->block || r->offset != rx->tmp_next_off) {
            if (precopy_writes(rx)) {
                tmp_flush_precopy(rx);      /* a page of only its dirty target pages */
                precopy_put(rx, r->block, r->offset, data);
                continue;
            }
            if (rx->tmp_block < 0)
                return rx_fail(rx, PC_RX_E_PROTO, EINVAL,
                               "host page of %s at 0x%llx starts with target page 0x%llx, not its first",
                               b->idstr, (unsigned long long)host_off, (unsigned long long)r->offset);
            return rx_fail(rx, PC_RX_E_PROTO, EINVAL,
                           "host page not sent whole and in order on channel %d: expected %s+0x%llx, got %s+0x%llx",
                           rx->kind, d->blocks[rx->tmp_block].idstr, (unsigned long long)rx->tmp_next_off,
                           b->idstr, (unsigned long long)r->offset);
        }
        if (rx->tmp_block < 0)
            tmp_begin(rx, r->block, host_off, 1);
        tmp_put(rx, r->offset, data);
        rx->tmp_next_off += PC_TARGET_PAGE_SIZE;
        if (rx->tmp_next_off == host_off + hps) {
            rx->tmp_block = -1;
            int rc = rx_place_tmp(rx, r->block, host_off);
            if (rc)
                return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------- direct receive
 *
 * In a run of PAGE|CONTINUE records (the bulk stream, a requested host page)
 * every record is 8 header bytes and one 4 KiB body. rx_recv receives
 * the next records with one recvmsg, each header into direct_hdr[i] and each
 * body into slot i of a contiguous, page-aligned area: rx->stage for 4 KiB
 * blocks (runs of consecutive offsets then go in with one UFFDIO_COPY), and
 * rx->tmp at the body's place in the host page for huge pages (no copy into
 * the temp page). The headers are checked afterwards: from the first record
 * that is not the predicted one (a ZERO record, an idstr, EOS, a page of
 * another host page...) and from an incomplete last record on, the bytes go
 * back into the receive buffer in stream order, for the general path. */

#define DIRECT_REC (8 + PC_TARGET_PAGE_SIZE)

typedef struct direct_layout {
    uint8_t *bodies;
    uint32_t nrec;
    int inplace;    /* the bodies are the claimed page's own bytes (its alias), see direct_plan */
} direct_layout;

/* The byte at layout position pos: its piece and how many bytes of the piece remain. */
static uint8_t *direct_at(pc_rx *rx, const direct_layout *l, uint64_t pos, uint64_t *n)
{
    uint64_t i = pos / DIRECT_REC, r = pos % DIRECT_REC;
    if (r < 8) {
        *n = 8 - r;
        return rx->direct_hdr[i] + r;
    }
    *n = DIRECT_REC - r;
    return l->bodies + i * PC_TARGET_PAGE_SIZE + (r - 8);
}

/* Copy layout bytes [from, to) out to lin (out != 0) or in from lin. */
static void direct_copy(pc_rx *rx, const direct_layout *l, uint64_t from, uint64_t to, uint8_t *lin, int out)
{
    while (from < to) {
        uint64_t n;
        uint8_t *p = direct_at(rx, l, from, &n);
        if (n > to - from)
            n = to - from;
        if (out)
            memcpy(lin, p, n);
        else
            memcpy(p, lin, n);
        lin += n;
        from += n;
    }
}

/* Layout bytes [from, to) back into the (empty) receive buffer. */
static int direct_unread(pc_rx *rx, const direct_layout *l, uint64_t from, uint64_t to)
{
    if (from >= to)
        return 0;
    uint8_t *p = pc_sockbuf_reserve(&rx->in, to - from);
    if (!p)
        return -ENOMEM;
    direct_copy(rx, l, from, to, p, 1);
    pc_sockbuf_commit(&rx->in, to - from);
    return 0;
}

/* A huge page of a prefilled block starts on the bulk stream (the preempt
 * channel takes such pages through its buffer, see direct_plan): when its first
 * header says which (in the buffer, or peeked in the socket), claim it now
 * (tmp_begin), so that all its bodies are received straight into its bytes
 * through the alias and it is mapped with UFFDIO_CONTINUE: no copy besides the
 * kernel's out of the socket. The source sends a host page's records together,
 * so a page claimed here is in flight on this channel (and the preempt channel
 * takes it over when it brings a copy, see "the bulk stream's page"). 1 when
 * the page is begun (claimed or not), 0 when the temp page takes the first
 * records (the general case). */
static int begin_next_host_page(pc_rx *rx, uint32_t bi, uint64_t avail)
{
    const pc_dst_block *b = &rx->dst->blocks[bi];
    if (!b->alias || __atomic_load_n(&rx->dst->uffd, __ATOMIC_ACQUIRE) < 0 || avail >= DIRECT_REC)
        return 0;
    uint8_t hdr[8];
    if (avail >= 8) {
        memcpy(hdr, pc_sockbuf_data(&rx->in), 8);
    } else {
        if (avail)
            return 0;
        /* Wait for the header's 8 bytes without taking them (less only at the stream's end or
         * a stop, which the receive that follows reports) */
        ssize_t got;
        pc_sockbuf_spin(&rx->in);
        do
            got = recv(rx->in.fd, hdr, 8, MSG_PEEK | MSG_WAITALL);
        while (got < 0 && errno == EINTR);
        if (got != 8)
            return 0;
    }
    uint64_t word = pc_get_be64(hdr), off = word & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1);
    if ((word & (PC_TARGET_PAGE_SIZE - 1)) != (PC_RAM_FLAG_PAGE | PC_RAM_FLAG_CONTINUE) || off >= b->length ||
        off % b->host_page_size)
        return 0;       /* the general path takes (or reports) it */
    tmp_begin(rx, bi, off, 1);
    return 1;
}

/* Where the next records' bodies go, or 0 records when the direct receive
 * does not apply (then the general path receives into the buffer). */
static direct_layout direct_plan(pc_rx *rx)
{
    direct_layout l = { NULL, 0, 0 };
    pc_dst *d = rx->dst;
    int32_t bi = rx->scan.last_block;
    if (!d || bi < 0 || (uint32_t)bi >= d->nblocks || (rx->kind != PC_RX_PREEMPT && !rx->in_section))
        return l;
    uint64_t avail = pc_sockbuf_avail(&rx->in);
    if (avail >= DIRECT_REC)
        return l;
    if (avail >= 8) {
        uint64_t flags = pc_get_be64(pc_sockbuf_data(&rx->in)) & (PC_TARGET_PAGE_SIZE - 1);
        if (flags != (PC_RAM_FLAG_PAGE | PC_RAM_FLAG_CONTINUE))
            return l;
    }
    const pc_dst_block *b = &d->blocks[bi];
    uint64_t hps = b->host_page_size;
    if (hps == PC_TARGET_PAGE_SIZE) {
        if (rx->tmp_block >= 0)
            return l;
        if (!(l.bodies = rx_stage(rx)))
            return l;
        l.nrec = rx->stage_pages;
    } else {
        uint64_t ntp = hps / PC_TARGET_PAGE_SIZE;
        if (ntp > PC_RX_DIRECT_MAX || rx->tmp_size < hps)
            return l;
        /* A requested huge page of a prefilled block goes through the receive buffer (256 KiB,
         * warm), then a streaming copy into place; the kernel's copy straight into the page was
         * slower (likely: it reads each line of the cold page before writing it, the streaming
         * stores do not). 2 MiB busy fault p50 over the plain C fault: 1.20 -> 1.15,
         * 1.20 -> 1.15, 1.23 -> 1.16 (three interleaved A/Bs of 6, 8 and 10 pairs). The bulk
         * stream keeps it: its idle ratio was 0.96 with it, 0.92 without (6 pairs). A temp
         * page (no alias) is reused, so its lines are in the cache. */
        if (rx->kind == PC_RX_PREEMPT && b->alias)
            return l;
        if (rx->tmp_block < 0 && !begin_next_host_page(rx, (uint32_t)bi, avail)) {
            l.bodies = rx->tmp;
            l.nrec = (uint32_t)ntp;
        } else {
            if (rx->tmp_block != bi)
                return l;       /* the general path reports it */
            /* The bulk stream's page claimed in place (its first records told which it is):
             * the rest is received straight into its bytes, no copy out of the temp page. */
            l.inplace = rx->tmp_inplace;
            l.bodies = l.inplace ? d->blocks[bi].alias + rx->tmp_next_off
                                 : rx->tmp + (rx->tmp_next_off - rx->tmp_host_off);
            l.nrec = (uint32_t)((rx->tmp_host_off + hps - rx->tmp_next_off) / PC_TARGET_PAGE_SIZE);
        }
    }
    if (l.nrec > PC_RX_DIRECT_MAX)
        l.nrec = PC_RX_DIRECT_MAX;
    return l;
}

/* How many of the records at the start of the layout are complete and the
 * predicted ones: PAGE|CONTINUE of the channel's block, inside it, and for a
 * huge page the next target pages of the host page being assembled. */
static uint32_t direct_check(pc_rx *rx, const direct_layout *l, uint64_t total)
{
    const pc_dst_block *b = &rx->dst->blocks[rx->scan.last_block];
    uint64_t hps = b->host_page_size, expect = rx->tmp_block >= 0 ? rx->tmp_next_off : 0;
    uint32_t k = 0;
    for (; k < l->nrec && total - (uint64_t)k * DIRECT_REC >= DIRECT_REC; k++) {
        uint64_t word = pc_get_be64(rx->direct_hdr[k]), off = word & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1);
        if ((word & (PC_TARGET_PAGE_SIZE - 1)) != (PC_RAM_FLAG_PAGE | PC_RAM_FLAG_CONTINUE) || off >= b->length)
            break;
        if (hps > PC_TARGET_PAGE_SIZE) {
            if (k == 0 && rx->tmp_block < 0) {
                if (off % hps)
                    break;
                expect = off;
            }
            if (off != expect)
                break;
            expect += PC_TARGET_PAGE_SIZE;
        }
    }
    return k;
}

/* Place the k checked records of the layout. */
static int direct_place(pc_rx *rx, const direct_layout *l, uint32_t k)
{
    uint32_t bi = (uint32_t)rx->scan.last_block;
    const pc_dst_block *b = &rx->dst->blocks[bi];
    uint64_t hps = b->host_page_size;
    __atomic_add_fetch(&rx->c.pages_normal, k, __ATOMIC_RELAXED);
    __atomic_add_fetch(&rx->c.pages_direct, k, __ATOMIC_RELAXED);
    if (l->inplace)
        __atomic_add_fetch(&rx->c.pages_in_place, k, __ATOMIC_RELAXED);
    if (hps == PC_TARGET_PAGE_SIZE) {
        /* runs of consecutive offsets: one UFFDIO_COPY (UFFDIO_ZEROPAGE when all zero) */
        for (uint32_t i = 0; i < k;) {
            uint64_t off = pc_get_be64(rx->direct_hdr[i]) & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1);
            uint32_t j = i, nz = 0;
            for (; j < k && (j == i || (pc_get_be64(rx->direct_hdr[j]) & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1)) ==
                                           off + (uint64_t)(j - i) * PC_TARGET_PAGE_SIZE);
                 j++)
                nz += (uint32_t)pc_is_zero(l->bodies + (uint64_t)j * PC_TARGET_PAGE_SIZE, PC_TARGET_PAGE_SIZE);
            int rc = nz == j - i ? place_pages(rx, bi, off, NULL, j - i, nz)
                                 : place_async(rx, bi, off, l->bodies + (uint64_t)i * PC_TARGET_PAGE_SIZE, j - i, nz);
            if (rc)
                return rc;
            i = j;
        }
        if (k)
            return rx_flip_stage(rx);
        return 0;
    }
    if (!k)
        return 0;
    if (rx->tmp_block < 0)      /* into the temp page: a page to claim was begun by begin_next_host_page */
        tmp_begin(rx, bi, pc_get_be64(rx->direct_hdr[0]) & ~(uint64_t)(PC_TARGET_PAGE_SIZE - 1), 0);
    for (uint32_t i = 0; i < k; i++)     /* the bodies are in tmp already: written through in place */
        tmp_put(rx, rx->tmp_next_off + (uint64_t)i * PC_TARGET_PAGE_SIZE, l->bodies + (uint64_t)i * PC_TARGET_PAGE_SIZE);
    rx->tmp_next_off += (uint64_t)k * PC_TARGET_PAGE_SIZE;
    if (rx->tmp_next_off == rx->tmp_host_off + hps) {
        rx->tmp_block = -1;
        return rx_place_tmp(rx, bi, rx->tmp_host_off);
    }
    return 0;
}

/* One receive for pc_rx_run: >0 bytes received, 0 at EOF, -errno (recv);
 * a placement or protocol error sets *err to its PC_RX_E_* code. The
 * buffer's unread bytes (at most an incomplete record) go through the
 * layout too, and whatever is not placed comes back to the buffer. */
static int64_t rx_recv(pc_rx *rx, int *err)
{
    *err = 0;
    if (rx->kind == PC_RX_PREEMPT)
        boost_this_thread();
    /* while a thread waits for a page, the next bytes are likely its page, or the rest of it */
    int waited = rx->waited_linger_ns > rx->linger_ns && rx->dst &&
                 __atomic_load_n(&rx->dst->nwaiters, __ATOMIC_RELAXED);
    pc_sockbuf_linger(&rx->in, waited ? rx->waited_linger_ns : rx->linger_ns);
    direct_layout l = { NULL, 0, 0 };
    if (rx->direct_skip)
        rx->direct_skip--;
    else
        l = direct_plan(rx);
    if (!l.nrec)
        return pc_sockbuf_recv(&rx->in);
    pc_sockbuf *in = &rx->in;
    /* The bulk stream's page in place (only it receives in place: direct_plan): bytes are
     * waited for outside a write window, and a window takes only what is here (see
     * take_over_bulk_page) */
    int window = l.inplace;
    if (window) {
        (void)wait_readable_or(in->fd, -1, 0);     /* an error on the socket: the receive reports it */
        if (!bulk_write_begin(rx)) {
            window = 0;
            l = direct_plan(rx);    /* taken over: the rest of this copy goes to the temp page, dropped */
            if (!l.nrec)
                return pc_sockbuf_recv(in);
        }
    }
    uint64_t pre = pc_sockbuf_avail(in), len = (uint64_t)l.nrec * DIRECT_REC;
    direct_copy(rx, &l, 0, pre, (uint8_t *)(uintptr_t)pc_sockbuf_data(in), 0);
    pc_sockbuf_consume(in, pre);
    /* The kernel reads the whole iovec array on every call: offer about
     * twice what the last receive got (at least 64 KiB), not the whole layout. */
    uint64_t want = rx->direct_last * 2 > (64u << 10) ? rx->direct_last * 2 : (64u << 10);
    if (l.inplace)
        want = 256u << 10;      /* a copy inside recvmsg is not preempted (PREEMPT_NONE): short ones */
    if (len > pre + want)
        len = pre + want;
    int niov = 0;
    for (uint64_t pos = pre; pos < len;) {
        uint64_t n;
        uint8_t *p = direct_at(rx, &l, pos, &n);
        rx->direct_iov[niov++] = (struct iovec){ p, n };
        pos += n;
    }
    struct msghdr msg = { .msg_iov = rx->direct_iov, .msg_iovlen = (size_t)niov };
    ssize_t got;
    pc_sockbuf_spin(in);
    do
        got = recvmsg(in->fd, &msg, window ? MSG_DONTWAIT : 0);
    while (got < 0 && errno == EINTR);
    int64_t ret = got < 0 ? -errno : got;
    uint64_t total = pre + (got > 0 ? (uint64_t)got : 0);
    if (got > 0) {
        __atomic_add_fetch(&in->bytes, (uint64_t)got, __ATOMIC_RELAXED);
        rx->direct_last = (uint64_t)got;
    }
    uint32_t k = got > 0 ? direct_check(rx, &l, total) : 0;
    if (k < l.nrec && total - (uint64_t)k * DIRECT_REC >= 8 &&
        (pc_get_be64(rx->direct_hdr[k]) & PC_RAM_FLAG_ZERO)) {
        /* A ZERO record where a page was predicted: the rest is copied back.
         * When zero pages are all over the stream, receiving into the buffer
         * and staging runs from there copies less: try again a few receives
         * later, fewer the more often it fails. */
        rx->direct_backoff = rx->direct_backoff ? (rx->direct_backoff < 64 ? rx->direct_backoff * 2 : 64) : 2;
        rx->direct_skip = rx->direct_backoff;
    } else if (k) {
        rx->direct_backoff = 0;
    }
    if (direct_unread(rx, &l, (uint64_t)k * DIRECT_REC, total) < 0) {
        *err = rx_fail(rx, PC_RX_E_IO, ENOMEM, "no memory for the receive buffer");
        return ret;
    }
    if (l.inplace && total > (uint64_t)k * DIRECT_REC + 8) {
        /* the bodies after the k placed records held other bytes of the stream: zeros again
         * (a claimed page's parts read zeros until this channel writes them; a ZERO record
         * that comes there is never written) */
        uint64_t touched = (total - 8 + DIRECT_REC - 1) / DIRECT_REC;
        memset(l.bodies + (uint64_t)k * PC_TARGET_PAGE_SIZE, 0, (touched - k) * PC_TARGET_PAGE_SIZE);
    }
    if (window)
        bulk_write_end(rx);
    int rc = direct_place(rx, &l, k);
    if (rc)
        *err = rc;
    return ret;
}

/* Scan and place the records at head until EOS / need-data / error.
 * Returns 1 at EOS, 0 when more data is needed, or a PC_RX_E_* code. */
static int rx_records(pc_rx *rx)
{
    for (;;) {
        uint32_t nrec = 0;
        int32_t status = 0;
        uint64_t err_pos = 0;
        const uint8_t *data = pc_sockbuf_data(&rx->in);
        int64_t used = pc_ram_scan(&rx->scan, rx->dst->infos, rx->dst->nblocks, data, pc_sockbuf_avail(&rx->in),
                                   rx->recs, rx->max_recs, &nrec, &status, &err_pos);
        if (status < 0)
            return rx_fail(rx, PC_RX_E_PROTO, EINVAL, "bad page record at stream offset +%llu: scan error %d",
                           (unsigned long long)err_pos, status);
        int rc = place_records(rx, rx->recs, nrec, data);
        if (rc)
            return rc;
        pc_sockbuf_consume(&rx->in, (uint64_t)used);
        if (status == PC_SCAN_EOS) {
            if (precopy_writes(rx))
                tmp_flush_precopy(rx);  /* a page's dirty target pages end before EOS */
            return 1;
        }
        if (status == PC_SCAN_NEED_DATA)
            return 0;
        /* PC_SCAN_FULL: go on scanning */
    }
}

int pc_rx_place_records(pc_rx *rx, const pc_ram_record *recs, uint32_t n, const uint8_t *buf)
{
    int rc = place_records(rx, recs, n, buf);
    int drc = rx_drain_after(rx, rc != 0);
    return rc ? rc : drc;
}

static int rx_run(pc_rx *rx);

int pc_rx_run_niced(pc_rx *rx, int nice)
{
    pc_thread_set_nice(nice);
    return pc_rx_run(rx);
}

int pc_rx_run_after(pc_rx *rx, int go_fd)
{
    /* POLLRDHUP alone on the socket: its data must not end the wait, its hang-up must (and the
     * receive then reports it) */
    int w = wait_readable_or(go_fd, rx->in.fd, POLLRDHUP);
    if (w == -EBADF)
        return rx_fail(rx, PC_RX_E_IO, EBADF, "waiting for LISTEN: the go fd is not open");
    if (w < 0)
        return rx_fail(rx, PC_RX_E_IO, -w, "waiting for LISTEN: %s", strerror(-w));
    return pc_rx_run(rx);
}

int pc_rx_run(pc_rx *rx)
{
    int rc = rx_run(rx);
    int drc = rx_drain_after(rx, rc < 0);     /* what was received is placed before Python hears of it */
    if (rx->kind == PC_RX_PREEMPT || rc != PC_RX_CONTROL)
        tmp_abandon(rx);    /* the channel is done: a page it did not finish is not its to finish */
    return rc < 0 || !drc ? rc : drc;
}

static int rx_run(pc_rx *rx)
{
    pc_sockbuf *in = &rx->in;
    for (;;) {
        if (__atomic_load_n(&rx->stop, __ATOMIC_ACQUIRE))
            return PC_RX_STOPPED;
        uint64_t avail = pc_sockbuf_avail(in);
        if (rx->kind == PC_RX_PREEMPT || rx->in_section) {
            if (avail) {
                int rc = rx_records(rx);
                if (rc < 0)
                    return rc;
                if (rc == 1) {
                    if (rx->kind == PC_RX_PREEMPT)
                        return PC_RX_EOS;
                    rx->in_section = 0;     /* the footer comes next */
                    if (pc_sockbuf_fill(in, 5) < 5)
                        return rx_fail(rx, PC_RX_E_TRUNCATED, EPIPE, "stream ended before the section footer");
                    const uint8_t *p = pc_sockbuf_data(in);
                    if (p[0] != PC_VM_SECTION_FOOTER || pc_get_be32(p + 1) != rx->ram_section_id)
                        return rx_fail(rx, PC_RX_E_PROTO, EINVAL,
                                       "bad section footer 0x%02x id %u after ram section %u", p[0], pc_get_be32(p + 1),
                                       rx->ram_section_id);
                    pc_sockbuf_consume(in, 5);
                    continue;
                }
                /* 0: the next record is incomplete; receive more */
            }
        } else if (avail >= 5) {
            const uint8_t *p = pc_sockbuf_data(in);
            if ((p[0] == PC_VM_SECTION_PART || p[0] == PC_VM_SECTION_END) && pc_get_be32(p + 1) == rx->ram_section_id) {
                pc_sockbuf_consume(in, 5);
                rx->in_section = 1;
                continue;
            }
            return PC_RX_CONTROL;
        } else if (avail && pc_sockbuf_data(in)[0] != PC_VM_SECTION_PART &&
                   pc_sockbuf_data(in)[0] != PC_VM_SECTION_END) {
            return PC_RX_CONTROL;   /* EOF marker or a command: Python decodes it */
        }
        int place_rc;
        int64_t n = rx_recv(rx, &place_rc);
        if (place_rc)
            return place_rc;
        if (n == 0) {
            if (!pc_sockbuf_avail(in) && !rx->in_section && rx->tmp_block < 0)
                return PC_RX_EOF;
            if (!rx->in_section && rx->kind == PC_RX_MAIN && rx->tmp_block < 0)
                return PC_RX_CONTROL;   /* Python reports what the partial bytes were */
            return rx_fail(rx, PC_RX_E_TRUNCATED, EPIPE, "connection closed in the middle of %s",
                           rx->tmp_block >= 0 ? "a host page" : "a page record");
        }
        if (n == -EAGAIN)
            continue;       /* a write window's receive found nothing after all: wait again */
        if (n < 0)
            return rx_fail(rx, PC_RX_E_IO, (int)-n, "recv: %s", strerror((int)-n));
    }
}
