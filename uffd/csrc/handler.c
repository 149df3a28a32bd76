/* Page-fault service for another process's userfaultfd: one thread per VMM
 * runs pc_hs_run, which reads faults and events, serves faults from the page
 * source, and fills the rest in the background between them. */
#define _GNU_SOURCE
#include "handler.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core.h"

#define QUEUE_CAP 1024u        /* pending faults: at most one per VMM thread, in practice */
#define READ_MAX 256u
/* One UFFDIO_COPY of the fill; the uffd is read between pieces, so a fault
 * waits at most one piece. Measured on this 2-core VM (bench/uffd_handler.py,
 * 1 GiB): 16 KiB pieces made the fault p50 2.6x the plain handler's, 4 KiB
 * pieces ~1.2x, and still fill at ~0.5 GB/s. */
#define FILL_PIECE_MAX (4u << 10)

struct pc_hs_session {
    int uffd, stop_efd;
    volatile int stop;
    int fill, fill_done;
    uint32_t nregions;
    pc_hs_region *regions;
    pc_block_desc *blocks;
    const uint8_t *src;
    uint64_t src_len;
    pc_hs_state *st;
    pc_bitmap placed, removed;
    uint64_t chunk, piece, crash_after;
    uint32_t qhead, qlen;
    pc_fault queue[QUEUE_CAP];
    pc_fault rbuf[READ_MAX];
    pc_uffd_event ebuf[READ_MAX];
};

static const uint64_t prom_bounds_ns[PC_HS_PROM_BUCKETS] = {
    5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000,
    10000000, 25000000, 50000000, 100000000, 250000000, 500000000, 1000000000,
};

uint64_t pc_hs_prom_bound_ns(uint32_t i) { return i < PC_HS_PROM_BUCKETS ? prom_bounds_ns[i] : UINT64_MAX; }

static uint32_t log_bucket(uint64_t v)
{
    if (v < 8)
        return (uint32_t)v;
    uint32_t e = 63u - (uint32_t)__builtin_clzll(v);
    uint32_t idx = (e - 2u) * 8u + (uint32_t)((v >> (e - 3u)) & 7u);
    return idx < PC_HS_LOG_BUCKETS ? idx : PC_HS_LOG_BUCKETS - 1u;
}

uint64_t pc_hs_log_bucket_upper_ns(uint32_t i)
{
    if (i < 8)
        return i + 1;
    uint32_t e = i / 8u + 2u, m = i % 8u;
    return (uint64_t)(9u + m) << (e - 3u);
}

static uint64_t words_for(uint64_t npages) { return (npages + 63) / 64; }

uint64_t pc_hs_shared_size(uint64_t npages) { return PC_HS_HEADER_BYTES + 2 * 8 * words_for(npages); }

static void add(uint64_t *field, uint64_t v) { __atomic_store_n(field, *field + v, __ATOMIC_RELAXED); }

static void record_latency(pc_hs_state *st, uint64_t ns)
{
    uint32_t b = 0;
    while (b < PC_HS_PROM_BUCKETS && ns > prom_bounds_ns[b])
        b++;
    add(&st->lat_prom[b], 1);
    add(&st->lat_log[log_bucket(ns)], 1);
    add(&st->lat_sum_ns, ns);
    if (ns > st->lat_max_ns)
        __atomic_store_n(&st->lat_max_ns, ns, __ATOMIC_RELAXED);
    add(&st->lat_count, 1);
}

uint64_t pc_hs_count_done(const void *shared, uint64_t npages)
{
    const uint64_t *p = (const uint64_t *)((const uint8_t *)shared + PC_HS_HEADER_BYTES);
    const uint64_t *r = p + words_for(npages);
    uint64_t n = 0;
    for (uint64_t w = 0; w < words_for(npages); w++)
        n += (uint64_t)__builtin_popcountll(p[w] | r[w]);
    return n;
}

pc_hs_session *pc_hs_open(int uffd, const pc_hs_region *regions, uint32_t nregions, const uint8_t *src, uint64_t src_len,
                          void *shared, uint64_t shared_len, int fresh, int fill, int *err)
{
    *err = 0;
    uint64_t npages = 0, total = 0;
    for (uint32_t i = 0; i < nregions; i++) {
        const pc_hs_region *r = &regions[i];
        if (r->page_size < 4096 || (r->page_size & (r->page_size - 1)) || r->size == 0 || r->size % r->page_size ||
            r->base % r->page_size || r->offset % r->page_size || r->bit0 != npages || r->offset + r->size > src_len ||
            (i && r->base < regions[i - 1].base + regions[i - 1].size)) {
            *err = -EINVAL;
            return NULL;
        }
        npages += r->size / r->page_size;
        total += r->size;
    }
    if (nregions == 0 || shared_len < pc_hs_shared_size(npages)) {
        *err = -EINVAL;
        return NULL;
    }
    pc_hs_state *st = shared;
    if (!fresh && (st->magic != PC_HS_MAGIC || st->version != PC_HS_VERSION || st->npages != npages)) {
        *err = -EBADMSG; /* not the state of this session */
        return NULL;
    }
    pc_hs_session *s = calloc(1, sizeof(*s));
    if (!s) {
        *err = -ENOMEM;
        return NULL;
    }
    s->regions = calloc(nregions, sizeof(*s->regions));
    s->blocks = calloc(nregions, sizeof(*s->blocks));
    s->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!s->regions || !s->blocks || s->stop_efd < 0) {
        *err = s->stop_efd < 0 ? -errno : -ENOMEM;
        pc_hs_close(s);
        return NULL;
    }
    memcpy(s->regions, regions, nregions * sizeof(*regions));
    for (uint32_t i = 0; i < nregions; i++)
        s->blocks[i] = (pc_block_desc){ .base = regions[i].base, .length = regions[i].size, .host_page_size = regions[i].page_size };
    s->nregions = nregions;
    s->uffd = uffd;
    s->src = src;
    s->src_len = src_len;
    s->fill = fill;
    s->st = st;
    uint64_t *words = (uint64_t *)((uint8_t *)shared + PC_HS_HEADER_BYTES);
    s->placed = (pc_bitmap){ .nbits = npages, .words = words };
    s->removed = (pc_bitmap){ .nbits = npages, .words = words + words_for(npages) };
    if (fresh) {
        memset(shared, 0, pc_hs_shared_size(npages));
        st->magic = PC_HS_MAGIC;
        st->version = PC_HS_VERSION;
        st->npages = npages;
        st->total_bytes = total;
        st->start_ns = pc_now_ns();
    } else {
        add(&st->restarts, 1);
    }
    add(&st->generation, 1);
    st->pages_done = pc_hs_count_done(shared, npages);
    s->chunk = PC_HS_FILL_MIN;
    s->piece = 4096;
    int fl = fcntl(uffd, F_GETFL);
    if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) < 0) {
        *err = -errno;
        pc_hs_close(s);
        return NULL;
    }
    return s;
}

void pc_hs_close(pc_hs_session *s)
{
    if (!s)
        return;
    if (s->stop_efd >= 0)
        close(s->stop_efd);
    free(s->regions);
    free(s->blocks);
    free(s);
}

void pc_hs_stop(pc_hs_session *s)
{
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t w = write(s->stop_efd, &one, sizeof(one));
    (void)w;
}

void pc_hs_set_crash_after_faults(pc_hs_session *s, uint64_t n) { s->crash_after = n; }

int pc_hs_wake_all(pc_hs_session *s)
{
    for (uint32_t i = 0; i < s->nregions; i++) {
        int rc = pc_uffd_wake(s->uffd, s->regions[i].base, s->regions[i].size);
        if (rc < 0 && rc != -ENOENT)
            return rc;
        add(&s->st->wakes, 1);
    }
    return 0;
}

/* ---- the record of pages ---- */

static int is_done(const pc_hs_session *s, uint64_t bit)
{
    return pc_bitmap_test(&s->placed, bit) || pc_bitmap_test(&s->removed, bit);
}

static void mark_placed(pc_hs_session *s, uint64_t bit, uint64_t n)
{
    for (uint64_t b = bit; b < bit + n; b++)
        if (!pc_bitmap_test_and_set_atomic(&s->placed, b) && !pc_bitmap_test(&s->removed, b))
            add(&s->st->pages_done, 1);
}

static void mark_resident_if_done(pc_hs_session *s)
{
    if (s->st->pages_done >= s->st->npages && s->st->resident_ns == 0)
        __atomic_store_n(&s->st->resident_ns, pc_now_ns(), __ATOMIC_RELAXED);
}

/* UFFD_EVENT_REMOVE (MADV_DONTNEED / balloon): the range is empty again and
 * must read as zeros. 4 KiB pages: forget they were placed; a later fault
 * gets UFFDIO_ZEROPAGE. Huge pages have no ZEROPAGE: unregister the range so
 * the kernel itself fills it with zeros from now on. */
static void handle_remove(pc_hs_session *s, uint64_t start, uint64_t end)
{
    add(&s->st->removes, 1);
    for (uint32_t i = 0; i < s->nregions; i++) {
        const pc_hs_region *r = &s->regions[i];
        uint64_t lo = start > r->base ? start : r->base, hi = end < r->base + r->size ? end : r->base + r->size;
        if (lo >= hi)
            continue;
        lo = lo / r->page_size * r->page_size;
        hi = (hi + r->page_size - 1) / r->page_size * r->page_size;
        uint64_t first = r->bit0 + (lo - r->base) / r->page_size, n = (hi - lo) / r->page_size;
        for (uint64_t b = first; b < first + n; b++) {
            if (!is_done(s, b))
                add(&s->st->pages_done, 1);
            pc_bitmap_set_atomic(&s->removed, b);
            pc_bitmap_clear_atomic(&s->placed, b);
        }
        add(&s->st->removed_bytes, hi - lo);
        if (r->page_size > 4096 && pc_uffd_unregister(s->uffd, lo, hi - lo) == 0)
            add(&s->st->unregistered_bytes, hi - lo);
    }
}

/* ---- reading ---- */

static void push_fault(pc_hs_session *s, const pc_fault *f)
{
    if (s->qlen == QUEUE_CAP) {
        /* cannot happen with one fault per thread; if it does, the thread
         * faults again after the wake and is read later */
        pc_uffd_wake(s->uffd, f->address & ~4095ull, 4096);
        return;
    }
    s->queue[(s->qhead + s->qlen++) % QUEUE_CAP] = *f;
}

/* One read(): non-pagefault events are handled at once (before any fault of
 * the batch is served), faults are queued. Messages read, 0 when none, or -errno. */
static int read_batch(pc_hs_session *s)
{
    uint32_t nother = 0;
    int n = pc_read_faults_ex(s->uffd, s->blocks, s->nregions, s->rbuf, READ_MAX, NULL, s->ebuf, READ_MAX, &nother);
    if (n == -EAGAIN)
        return 0;
    if (n < 0)
        return n;
    for (uint32_t i = 0; i < nother; i++) {
        const pc_uffd_event *e = &s->ebuf[i];
        if (e->event == UFFD_EVENT_REMOVE)
            handle_remove(s, e->a, e->b);
        else if (e->event == UFFD_EVENT_FORK && e->ufd >= 0)
            close(e->ufd); /* not negotiated by a VMM we serve; do not leak it */
    }
    add(&s->st->faults, (uint64_t)n);
    for (int i = 0; i < n; i++)
        push_fault(s, &s->rbuf[i]);
    if (s->crash_after && s->st->faults >= s->crash_after && n > 0)
        kill(getpid(), SIGKILL); /* test hook: die holding faults read but not served */
    return n + (int)nother;
}

static int drain(pc_hs_session *s)
{
    for (;;) {
        int n = read_batch(s);
        if (n <= 0)
            return n;
    }
}

/* ---- placing ---- */

static uint32_t region_of_bit(const pc_hs_session *s, uint64_t bit)
{
    uint32_t i = 0;
    while (i + 1 < s->nregions && s->regions[i + 1].bit0 <= bit)
        i++;
    return i;
}

/* Copy n pages starting at bit; returns pages placed (present ones counted)
 * or -errno when none could be. */
static int64_t copy_pages(pc_hs_session *s, uint64_t bit, uint64_t n, const uint8_t *data, uint64_t *fresh_bytes)
{
    const pc_hs_region *r = &s->regions[region_of_bit(s, bit)];
    uint64_t ps = r->page_size, rel = (bit - r->bit0) * ps;
    int64_t copied = 0;
    int rc = pc_uffd_copy(s->uffd, r->base + rel, (uint64_t)(uintptr_t)(data ? data : s->src + r->offset + rel), n * ps, 0, &copied);
    uint64_t done = copied > 0 ? (uint64_t)copied / ps : 0;
    mark_placed(s, bit, done);
    *fresh_bytes = done * ps;
    if (rc == -EEXIST) {
        /* present already: a dead server placed it and died before its bit */
        add(&s->st->eexist, 1);
        mark_placed(s, bit + done, 1);
        return (int64_t)done + 1;
    }
    if (rc < 0 && done == 0)
        return rc;
    return (int64_t)done;
}

static int serve_fault(pc_hs_session *s, const pc_fault *f)
{
    if (f->status == PC_FAULT_OUTSIDE) {
        /* not a region we were told about: wake so the thread is not stuck */
        pc_uffd_wake(s->uffd, f->address & ~4095ull, 4096);
        return 0;
    }
    const pc_hs_region *r = &s->regions[f->block];
    uint64_t bit = r->bit0 + f->offset / r->page_size, dst = r->base + f->offset;
    if (pc_bitmap_test(&s->placed, bit)) {
        add(&s->st->faults_present, 1);
        int rc = pc_uffd_wake(s->uffd, dst, r->page_size);
        return rc == -ENOENT ? 0 : rc;
    }
    if (pc_bitmap_test(&s->removed, bit)) {
        int rc = 0;
        if (r->page_size == 4096) {
            int64_t z = 0;
            rc = pc_uffd_zeropage(s->uffd, dst, 4096, 0, &z);
        } else {
            rc = pc_uffd_wake(s->uffd, dst, r->page_size); /* unregistered: the kernel serves it */
        }
        if (rc == -EAGAIN)
            return rc;
        if (rc < 0 && rc != -EEXIST && rc != -ENOENT)
            return rc;
        mark_placed(s, bit, 1);
        add(&s->st->faults_zero, 1);
        add(&s->st->pages_zero, 1);
        add(&s->st->bytes_zero, r->page_size);
        record_latency(s->st, pc_now_ns() - f->t_ns);
        return 0;
    }
    uint64_t fresh = 0;
    int64_t got = copy_pages(s, bit, 1, NULL, &fresh);
    if (got < 0)
        return (int)got;
    add(&s->st->faults_copy, 1);
    add(&s->st->pages_fault, fresh / r->page_size);
    add(&s->st->bytes_fault, fresh);
    record_latency(s->st, pc_now_ns() - f->t_ns);
    return 0;
}

/* Serve every queued fault; events are drained before each copy that got
 * EAGAIN (a mapping change pending) and the copy is retried. Faults served, or -errno. */
static int serve_queue(pc_hs_session *s)
{
    int served = 0, spins = 0;
    while (s->qlen) {
        pc_fault *f = &s->queue[s->qhead];
        int rc = serve_fault(s, f);
        if (rc == -EAGAIN) {
            add(&s->st->eagain, 1);
            int d = drain(s);
            if (d < 0)
                return d;
            if (++spins > 16)
                sched_yield(); /* the madvise caller has yet to run after its event was read */
            continue;
        }
        spins = 0;
        s->qhead = (s->qhead + 1) % QUEUE_CAP;
        s->qlen--;
        if (rc < 0)
            return rc;
        served++;
    }
    mark_resident_if_done(s);
    return served;
}

int64_t pc_hs_place(pc_hs_session *s, uint64_t off, const uint8_t *data, uint64_t len)
{
    int64_t placed = 0;
    for (uint32_t i = 0; i < s->nregions; i++) {
        const pc_hs_region *r = &s->regions[i];
        if (off < r->offset || off >= r->offset + r->size)
            continue;
        if (off % r->page_size || len % r->page_size || off + len > r->offset + r->size)
            return -EINVAL;
        uint64_t bit = r->bit0 + (off - r->offset) / r->page_size, n = len / r->page_size;
        for (uint64_t k = 0; k < n;) {
            if (is_done(s, bit + k)) {
                k++;
                continue;
            }
            uint64_t fresh = 0;
            int64_t got = copy_pages(s, bit + k, 1, data + k * r->page_size, &fresh);
            if (got < 0)
                return got;
            placed += (int64_t)fresh;
            k += (uint64_t)got;
        }
        mark_resident_if_done(s);
        return placed;
    }
    return -ERANGE;
}

/* ---- background fill ---- */

static uint64_t next_free(const pc_hs_session *s, uint64_t from)
{
    uint64_t n = s->placed.nbits;
    for (uint64_t w = from / 64; w < words_for(n); w++) {
        uint64_t word = ~(s->placed.words[w] | s->removed.words[w]);
        if (w == from / 64)
            word &= ~0ull << (from % 64);
        if (word) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(word);
            return i < n ? i : n;
        }
    }
    return n;
}

/* Copy up to s->chunk bytes of pages nobody placed yet, in pieces; between
 * pieces, read the uffd and stop as soon as a fault is queued. 0, or -errno. */
static int fill_step(pc_hs_session *s)
{
    uint64_t budget = s->chunk, n = s->placed.nbits;
    add(&s->st->fill_steps, 1);
    while (budget) {
        uint64_t bit = next_free(s, s->st->fill_cursor);
        if (bit >= n)
            bit = next_free(s, 0);
        if (bit >= n) {
            s->fill_done = 1;
            mark_resident_if_done(s);
            return 0;
        }
        const pc_hs_region *r = &s->regions[region_of_bit(s, bit)];
        uint64_t ps = r->page_size, end_of_region = r->bit0 + r->size / ps;
        uint64_t want = (budget < s->piece ? budget : s->piece) / ps;
        if (want == 0)
            want = 1;
        uint64_t run = 1;
        while (run < want && bit + run < end_of_region && !is_done(s, bit + run))
            run++;
        uint64_t fresh = 0;
        int64_t got = copy_pages(s, bit, run, NULL, &fresh);
        if (got == -EAGAIN) {
            add(&s->st->eagain, 1);
            return 0; /* the caller drains the pending event first */
        }
        if (got == -ENOENT) {
            /* the VMM unmapped it: nothing to fill there */
            add(&s->st->enoent, 1);
            for (uint64_t b = bit; b < bit + run; b++) {
                if (!is_done(s, b))
                    add(&s->st->pages_done, 1);
                pc_bitmap_set_atomic(&s->removed, b);
            }
            got = (int64_t)run;
        } else if (got < 0) {
            return (int)got;
        }
        add(&s->st->pages_fill, fresh / ps);
        add(&s->st->bytes_fill, fresh);
        __atomic_store_n(&s->st->fill_cursor, bit + (uint64_t)got, __ATOMIC_RELAXED);
        budget = budget > run * ps ? budget - run * ps : 0;
        int d = read_batch(s);
        if (d < 0)
            return d;
        if (s->qlen)
            return 0;
        if (s->piece < FILL_PIECE_MAX)
            s->piece *= 2;
    }
    mark_resident_if_done(s);
    return 0;
}

int pc_hs_run(pc_hs_session *s)
{
    for (;;) {
        if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE))
            return 0;
        int d = drain(s);
        if (d < 0)
            return d;
        if (s->qlen) {
            int served = serve_queue(s);
            if (served < 0)
                return served;
            s->chunk = PC_HS_FILL_MIN; /* a fault came: restart small */
            s->piece = 4096;
        }
        if (s->fill && !s->fill_done && !s->qlen) {
            int rc = fill_step(s);
            if (rc < 0)
                return rc;
            if (!s->qlen && s->chunk < PC_HS_FILL_MAX)
                s->chunk *= 2;
            __atomic_store_n(&s->st->fill_chunk, s->chunk, __ATOMIC_RELAXED);
            continue;
        }
        if (s->qlen)
            continue;
        struct pollfd p[2] = { { .fd = s->uffd, .events = POLLIN }, { .fd = s->stop_efd, .events = POLLIN } };
        int rc = poll(p, 2, -1);
        if (rc < 0 && errno != EINTR)
            return -errno;
        if (p[0].revents & (POLLERR | POLLNVAL))
            return -EBADF;
    }
}
