/* Source data path: see source.h. */
#define _GNU_SOURCE
#include "source.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <linux/sockios.h>  /* SIOCOUTQ */
#include <linux/tcp.h>   /* struct tcp_info with tcpi_bytes_acked (glibc's lacks it) */
#include <stddef.h>
#include <sys/uio.h>
#include <time.h>

#include "core.h"
#include "pagehash.h"
#include "ramscan.h"
#include "uffd.h"

#define BATCH_RECORDS 64            /* 256 KiB of 4 KiB pages: a requested page never waits long behind one */
#define HDR_MAX (8 + 1 + 255 + 1)
#define ZERO_CHECK_AHEAD 8           /* target pages: the prefetch distance of the zero check */



static int src_fail(pc_src *s, int code, int err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int src_fail(pc_src *s, int code, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err_msg, sizeof(s->err_msg), fmt, ap);
    va_end(ap);
    s->err_errno = err;
    return code;
}

static void record_hot(pc_src *s, uint32_t bi, uint64_t host_page);
static int take_hot(pc_src *s, uint64_t *pos, uint64_t *off, uint32_t *bi, uint64_t *first);
struct batch;
static struct batch *touched_batch(void);
static void free_batch(struct batch *bt);
static int bulk_hot_page(pc_src *s, struct batch *bt, uint32_t bi, uint64_t first, int *in_section);

pc_src *pc_src_new(uint32_t nblocks, uint32_t ram_section_id)
{
    pc_src *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->blocks = calloc(nblocks ? nblocks : 1, sizeof(*s->blocks));
    if (!s->blocks) {
        free(s);
        return NULL;
    }
    if (pc_pf_init(&s->pf, nblocks) < 0) {
        free(s->blocks);
        free(s);
        return NULL;
    }
    s->preempt_batch = touched_batch();
    if (!s->preempt_batch) {
        pc_pf_release(&s->pf);
        free(s->blocks);
        free(s);
        return NULL;
    }
    s->nblocks = nblocks;
    s->ram_section_id = ram_section_id;
    s->section_bytes = 64u << 20;
    s->rp_block = -1;
    s->req_fd = -1;
    s->pause_credit_ns = PC_SRC_PAUSE_MAX_NS;
    for (int ch = 0; ch < 2; ch++) {
        pthread_mutex_init(&s->chan[ch].lock, NULL);
        s->chan[ch].fd = -1;
        s->chan[ch].last_block = -1;
    }
    pthread_mutex_init(&s->qlock, NULL);
    pthread_mutex_init(&s->rec_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);    /* cap_wait computes monotonic deadlines */
    pthread_cond_init(&s->qcond, &ca);
    pthread_condattr_destroy(&ca);
    return s;
}

void pc_src_free(pc_src *s)
{
    if (!s)
        return;
    if (s->rp_ready)
        pc_sockbuf_release(&s->rp);
    if (s->req_fd >= 0)
        pc_sockbuf_release(&s->req);
    for (int ch = 0; ch < 2; ch++)
        pthread_mutex_destroy(&s->chan[ch].lock);
    pthread_mutex_destroy(&s->qlock);
    pthread_mutex_destroy(&s->rec_lock);
    pc_src_record_hot(s, 0);
    free(s->rec);
    free(s->hot);
    pthread_cond_destroy(&s->qcond);
    for (uint32_t i = 0; i < s->nblocks; i++) {
        free(s->blocks[i].main_end);
        pc_bitmap_free(s->blocks[i].discarded);
    }
    free(s->blocks);
    pc_pf_release(&s->pf);
    free_batch(s->preempt_batch);
    free(s);
}

int pc_src_set_block(pc_src *s, uint32_t i, const char *idstr, uint32_t idlen, uint64_t base, uint64_t length,
                     uint64_t host_page_size, pc_bitmap *dirty)
{
    if (i >= s->nblocks || !pc_block_geometry_ok(idlen, length, host_page_size) || !dirty ||
        dirty->nbits < length / PC_TARGET_PAGE_SIZE)
        return -EINVAL;
    pc_src_block *b = &s->blocks[i];
    free(b->main_end);
    b->main_end = calloc(length / host_page_size, sizeof(uint64_t));
    if (!b->main_end || pc_pf_set_block(&s->pf, i, length / host_page_size, host_page_size) < 0)
        return -ENOMEM;
    b->base = base;
    b->length = length;
    b->host_page_size = host_page_size;
    b->dirty = dirty;
    b->idlen = idlen;
    memcpy(b->idstr, idstr, idlen);
    b->idstr[idlen] = 0;
    return 0;
}

void pc_src_canonicalize(pc_src *s)
{
    for (uint32_t bi = 0; bi < s->nblocks; bi++) {
        pc_src_block *b = &s->blocks[bi];
        uint64_t ntp = b->host_page_size / PC_TARGET_PAGE_SIZE, npages = b->length / PC_TARGET_PAGE_SIZE;
        if (ntp == 1)
            continue;
        for (uint64_t i = pc_bitmap_find_next_set(b->dirty, 0); i < npages;
             i = pc_bitmap_find_next_set(b->dirty, i)) {
            uint64_t first = i - i % ntp;
            pc_bitmap_set_range_atomic(b->dirty, first, ntp);
            i = first + ntp;
        }
    }
}

void pc_src_set_channel(pc_src *s, int ch, int fd)
{
    pthread_mutex_lock(&s->chan[ch].lock);
    s->chan[ch].fd = fd;
    s->chan[ch].last_block = -1;
    s->chan[ch].conn_base = __atomic_load_n(&s->chan[ch].bytes, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->chan[ch].lock);
}

void pc_src_set_rp(pc_src *s, int fd)
{
    if (s->rp_ready)
        pc_sockbuf_release(&s->rp);
    s->rp_ready = pc_sockbuf_init(&s->rp, fd, 64 * 1024, 64u << 20) == 0;
    if (s->rp_ready)
        pc_sockbuf_stamp_arrivals(&s->rp);    /* best effort: else a control message's time is its read */
    s->rp_block = -1;
}

void pc_src_configure(pc_src *s, int preempt, uint64_t bandwidth_cap, uint64_t section_bytes)
{
    s->preempt = preempt;
    __atomic_store_n(&s->bandwidth_cap, bandwidth_cap, __ATOMIC_RELAXED);
    if (section_bytes)
        s->section_bytes = section_bytes;
}

void pc_src_set_send_once(pc_src *s, int once)
{
    __atomic_store_n(&s->send_once, once, __ATOMIC_RELAXED);
}

void pc_src_set_prefetch(pc_src *s, uint64_t min_bytes, uint64_t max_bytes)
{
    pc_pf_configure(&s->pf, min_bytes, max_bytes);
}

void pc_src_stop(pc_src *s)
{
    __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&s->qlock);
    pthread_cond_broadcast(&s->qcond);
    pthread_mutex_unlock(&s->qlock);
}

void pc_src_set_heartbeat(pc_src *s, uint64_t interval_ns) { __atomic_store_n(&s->heartbeat_ns, interval_ns, __ATOMIC_RELAXED); }

void pc_src_restart(pc_src *s)
{
    pthread_mutex_lock(&s->qlock);
    s->qhead = s->qtail;
    pthread_mutex_unlock(&s->qlock);
    s->cursor_block = 0;
    s->cursor_page = 0;
    pc_pf_reset(&s->pf);        /* the return-path thread is not running */
    s->hot_pos = s->hot_off = s->rp_hot_pos = s->rp_hot_off = 0;   /* the hot set first again, after a recovery */
    s->hot_armed = 0;
    if (s->req_fd >= 0)             /* the new connection's preempt channel is read once it is set */
        pc_sockbuf_release(&s->req);
    s->req_fd = -1;
    s->req_ended = 0;
    __atomic_store_n(&s->urgent, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->urgent_end, 0, __ATOMIC_RELEASE);
    s->pause_credit_ns = PC_SRC_PAUSE_MAX_NS;   /* the bulk thread is not running */
    s->pause_last_ns = 0;
    for (int i = 0; i < PC_PF_STREAMS; i++)
        __atomic_store_n(&s->zone[i].until_ns, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->stop, 0, __ATOMIC_RELEASE);
}

int pc_src_reload_dirty(pc_src *s, uint32_t i, const uint8_t *received_le, uint64_t len)
{
    if (i >= s->nblocks)
        return -ERANGE;
    pc_src_block *b = &s->blocks[i];
    int rc = pc_bitmap_from_le(b->dirty, received_le, len);
    if (rc < 0)
        return rc;
    pc_bitmap_invert(b->dirty);
    uint64_t ntp = b->host_page_size / PC_TARGET_PAGE_SIZE, npages = b->length / PC_TARGET_PAGE_SIZE;
    /* A partly received host page must go again whole. */
    for (uint64_t p = ntp > 1 ? pc_bitmap_find_next_set(b->dirty, 0) : npages; p < npages;
         p = pc_bitmap_find_next_set(b->dirty, p)) {
        uint64_t first = p - p % ntp;
        pc_bitmap_set_range_atomic(b->dirty, first, ntp);
        p = first + ntp;
    }
    return 0;
}

static int stopped(pc_src *s) { return __atomic_load_n(&s->stop, __ATOMIC_ACQUIRE); }

/* Write all iovecs (a socket), resuming after partial writes. With `reader`: the preempt channel,
 * whose batches only the return-path thread writes; while a write waits for room (a 2 MiB page is
 * more than the socket takes at once), what comes in on the return path is received, so that each
 * message's arrival is known: the kernel merges a small message into the next one when neither was
 * read and keeps one arrival time for both (PONG 3, the downtime's end, often comes while the
 * started guest's first huge page goes, its next request right behind). Not in parts with a look
 * between them: 8 writes of 256 KiB made a requested 2 MiB page's fault p50 1.43 ms against
 * 1.06 ms in one write (4+4 busy runs). */
static int writev_all_reading(int fd, struct iovec *iov, int n, pc_src *reader)
{
    int reading = reader && reader->rp_ready;
    while (n > 0) {
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)(n > IOV_MAX ? IOV_MAX : n) };
        ssize_t w = sendmsg(fd, &m, reading ? MSG_DONTWAIT : 0);
        if (w < 0 && errno == EAGAIN && reading) {
            struct pollfd p[2] = { { fd, POLLOUT, 0 }, { reader->rp.fd, POLLIN, 0 } };
            if (poll(p, 2, -1) > 0 && p[1].revents && pc_sockbuf_recv(&reader->rp) <= 0)
                reading = 0;    /* the return path's end, an error or a full buffer: its reader meets it */
            continue;
        }
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        iov = pc_iov_advance(iov, &n, (size_t)w);
    }
    return 0;
}

static int writev_all(int fd, struct iovec *iov, int n)
{
    return writev_all_reading(fd, iov, n, NULL);
}

static int write_all(int fd, const uint8_t *data, uint64_t len)
{
    struct iovec iov = { (void *)data, len };
    return writev_all(fd, &iov, 1);
}

int pc_src_chan_write(pc_src *s, int ch, const uint8_t *data, uint64_t len)
{
    if (ch < 0 || ch > 1)
        return -EINVAL;
    pthread_mutex_lock(&s->chan[ch].lock);
    int rc = s->chan[ch].fd < 0 ? -EPIPE : write_all(s->chan[ch].fd, data, len);
    if (rc == 0)
        __atomic_add_fetch(&s->chan[ch].bytes, len, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->chan[ch].lock);
    return rc;
}

int pc_src_chan_finish(pc_src *s, int ch, const uint8_t *data, uint64_t len)
{
    if (ch < 0 || ch > 1)
        return -EINVAL;
    pthread_mutex_lock(&s->chan[ch].lock);
    int rc = s->chan[ch].fd < 0 ? -EPIPE : write_all(s->chan[ch].fd, data, len);
    if (rc == 0)
        __atomic_add_fetch(&s->chan[ch].bytes, len, __ATOMIC_RELAXED);
    s->chan[ch].fd = -1;        /* nothing may follow: requests now go the main way (already sent) */
    pthread_mutex_unlock(&s->chan[ch].lock);
    return rc;
}

/* Records of whole host pages gathered for one writev. */
#define BATCH_SLOTS 1024            /* records (and raw pieces) per writev */
typedef struct batch {
    struct iovec iov[2 * BATCH_SLOTS];
    uint8_t hdr[BATCH_SLOTS][HDR_MAX];
    int niov, nhdr;
    uint64_t bytes, normal, zero;
    uint64_t flushed;               /* bytes written by all flushes so far */
} batch;

/* Its pages allocated now: their first writes (40 page faults, up to 60-90 us each where the host
 * backs memory lazily) would otherwise come with the first page the started guest asks for. */
static batch *touched_batch(void)
{
    return pc_map_populated(sizeof(batch));
}

static void free_batch(batch *bt)
{
    pc_unmap_populated(bt, sizeof(*bt));
}

static void batch_reset(batch *bt) { bt->niov = bt->nhdr = 0; bt->bytes = bt->normal = bt->zero = 0; }

static void batch_raw(batch *bt, const void *p, uint64_t n)
{
    uint8_t *h = bt->hdr[bt->nhdr++];
    memcpy(h, p, n);
    bt->iov[bt->niov++] = (struct iovec){ h, n };
    bt->bytes += n;
}

/* Under the channel lock. */
static void bulk_pause(pc_src *s);

static int batch_flush(pc_src *s, int ch, batch *bt)
{
    pc_src_chan *c = &s->chan[ch];
    if (!bt->niov)
        return 0;
    int rc = c->fd < 0 ? -EPIPE : writev_all_reading(c->fd, bt->iov, bt->niov, ch == PC_CHAN_PREEMPT ? s : NULL);
    if (rc == 0) {
        bt->flushed += bt->bytes;
        __atomic_add_fetch(&c->bytes, bt->bytes, __ATOMIC_RELAXED);
        __atomic_add_fetch(&c->pages_normal, bt->normal, __ATOMIC_RELAXED);
        __atomic_add_fetch(&c->pages_zero, bt->zero, __ATOMIC_RELAXED);
    }
    batch_reset(bt);
    return rc;
}

/* Add every target page of one host page: ZERO or PAGE records, the idstr
 * whenever the channel's block changes. A huge host page that does not fit
 * is flushed in parts: it still goes out whole, in order, on one channel.
 * Under the channel lock. */
static int batch_host_page(pc_src *s, int ch, batch *bt, uint32_t bi, uint64_t host_off)
{
    pc_src_chan *c = &s->chan[ch];
    const pc_src_block *b = &s->blocks[bi];
    for (uint64_t off = host_off; off < host_off + b->host_page_size; off += PC_TARGET_PAGE_SIZE) {
        if (bt->nhdr + 2 > BATCH_SLOTS) {
            int rc = batch_flush(s, ch, bt);
            if (rc < 0)
                return rc;
        }
        if (ch == PC_CHAN_MAIN && off != host_off && (off - host_off) % (BATCH_RECORDS * PC_TARGET_PAGE_SIZE) == 0 &&
            s->preempt && pc_src_urgent_pending(s)) {
            /* A huge page on main: its parts so far go now, the rest after the urgent page
             * (the records of one host page stay consecutive on this channel). */
            int rc = batch_flush(s, ch, bt);
            if (rc < 0)
                return rc;
            bulk_pause(s);
        }
        const uint8_t *page = (const uint8_t *)(uintptr_t)(b->base + off);
        /* The zero check reads each target page's first line, a cache miss the hardware
         * prefetcher does not cover (it stops at 4 KiB boundaries): ask for later ones now. */
        if (off + ZERO_CHECK_AHEAD * PC_TARGET_PAGE_SIZE < host_off + b->host_page_size)
            __builtin_prefetch(page + ZERO_CHECK_AHEAD * PC_TARGET_PAGE_SIZE, 0, 0);
        int zero = pc_is_zero(page, PC_TARGET_PAGE_SIZE);
        uint8_t *h = bt->hdr[bt->nhdr++];
        uint64_t flags = zero ? PC_RAM_FLAG_ZERO : PC_RAM_FLAG_PAGE, n = 8;
        if (c->last_block == (int64_t)bi)
            flags |= PC_RAM_FLAG_CONTINUE;
        pc_put_be64(h, off | flags);
        if (c->last_block != (int64_t)bi) {
            h[n++] = (uint8_t)b->idlen;
            memcpy(h + n, b->idstr, b->idlen);
            n += b->idlen;
            c->last_block = bi;
        }
        if (zero) {
            h[n++] = 0;
            bt->zero++;
        } else {
            bt->normal++;
        }
        bt->iov[bt->niov++] = (struct iovec){ h, n };
        bt->bytes += n;
        if (!zero) {
            bt->iov[bt->niov++] = (struct iovec){ (void *)page, PC_TARGET_PAGE_SIZE };
            bt->bytes += PC_TARGET_PAGE_SIZE;
        }
    }
    if (ch == PC_CHAN_MAIN) {
        __atomic_store_n(&b->main_end[host_off / b->host_page_size],
                         __atomic_load_n(&c->bytes, __ATOMIC_RELAXED) + bt->bytes, __ATOMIC_RELEASE);
    }
    return 0;
}

/* Take the host page for sending: 1 when it was dirty (it is ours now). */
static int claim_host_page(pc_src_block *b, uint64_t host_off)
{
    uint64_t first = host_off / PC_TARGET_PAGE_SIZE, ntp = b->host_page_size / PC_TARGET_PAGE_SIZE;
    uint64_t mask = 1ull << (first % 64);
    uint64_t old = __atomic_fetch_and(&b->dirty->words[first / 64], ~mask, __ATOMIC_ACQ_REL);
    if (!(old & mask))
        return 0;
    if (ntp > 1)
        pc_bitmap_clear_range_atomic(b->dirty, first + 1, ntp - 1);
    return 1;
}

/* Send one requested host page on the preempt channel, now. */
static int send_urgent_preempt(pc_src *s, uint32_t bi, uint64_t host_off)
{
    batch *bt = s->preempt_batch;
    pc_src_chan *c = &s->chan[PC_CHAN_PREEMPT];
    pthread_mutex_lock(&c->lock);
    batch_reset(bt);
    /* A huge page's 512 records (and their bodies: at most 2 * BATCH_SLOTS iovecs) go in one writev. */
    int rc = batch_host_page(s, PC_CHAN_PREEMPT, bt, bi, host_off);
    if (rc == 0)
        rc = batch_flush(s, PC_CHAN_PREEMPT, bt);
    if (rc == 0) {
        /* what the destination needs to place it after it is in (UFFDIO_COPY of a huge page) */
        __atomic_store_n(&s->urgent_grace_ns, s->blocks[bi].host_page_size * PC_SRC_PLACE_NS_PER_MIB >> 20,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&s->urgent_ns, pc_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&s->urgent_end, __atomic_load_n(&c->bytes, __ATOMIC_RELAXED), __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* A 2 MiB page: its 512 records fit one batch (never flushed in parts), their iovecs one writev call. */
_Static_assert(512 + 2 <= BATCH_SLOTS && 2 * 512 <= IOV_MAX, "a requested 2 MiB page goes in one writev");

int pc_src_urgent_pending(pc_src *s)
{
    if (__atomic_load_n(&s->urgent, __ATOMIC_ACQUIRE))
        return 1;
    uint64_t end = __atomic_load_n(&s->urgent_end, __ATOMIC_ACQUIRE);
    if (!end)
        return 0;
    pc_src_chan *c = &s->chan[PC_CHAN_PREEMPT];
    int fd = __atomic_load_n(&c->fd, __ATOMIC_RELAXED);
    uint64_t age = pc_now_ns() - __atomic_load_n(&s->urgent_ns, __ATOMIC_RELAXED);
    uint64_t grace = __atomic_load_n(&s->urgent_grace_ns, __ATOMIC_RELAXED);
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (fd < 0 || end <= c->conn_base || age > PC_SRC_PAUSE_MAX_NS)
        goto done;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 || len < offsetof(struct tcp_info, tcpi_bytes_retrans) + 8)
        goto done;
    /* Still in this host's send queue (not sent: on loopback, not yet in the destination's
     * socket), or sent so recently that the destination is still placing it. Sent, not
     * acked: a delayed ACK of the last segment would hold the bulk stream for nothing. */
    if (c->conn_base + ti.tcpi_bytes_sent - ti.tcpi_bytes_retrans < end || age < grace)
        return 1;
done:
    /* taken in by the destination (or too old to wait for): done, unless a newer page came meanwhile */
    __atomic_compare_exchange_n(&s->urgent_end, &end, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    return 0;
}

/* Bulk side (preempt): stand aside while urgent pages are in flight, at most
 * PC_SRC_PAUSE_MAX_NS and at most the time it ran since its last pause (credit:
 * with a guest that faults all the time, the bulk stream still runs half the time
 * or more). */
static void bulk_pause(pc_src *s)
{
    uint64_t t0 = pc_now_ns();
    if (s->pause_last_ns) {
        s->pause_credit_ns += t0 - s->pause_last_ns;
        if (s->pause_credit_ns > PC_SRC_PAUSE_MAX_NS)
            s->pause_credit_ns = PC_SRC_PAUSE_MAX_NS;
    }
    s->pause_last_ns = t0;
    if (!s->preempt || s->pause_credit_ns < PC_SRC_PAUSE_POLL_NS || !pc_src_urgent_pending(s))
        return;
    uint64_t now = t0;
    __atomic_add_fetch(&s->c.bulk_pauses, 1, __ATOMIC_RELAXED);
    while (!stopped(s) && pc_src_urgent_pending(s)) {
        if (now - t0 >= s->pause_credit_ns) {
            __atomic_add_fetch(&s->c.bulk_pauses_capped, 1, __ATOMIC_RELAXED);
            break;
        }
        struct timespec nap = { 0, (long)PC_SRC_PAUSE_POLL_NS };
        nanosleep(&nap, NULL);
        now = pc_now_ns();
    }
    now = pc_now_ns();
    s->pause_credit_ns -= now - t0 < s->pause_credit_ns ? now - t0 : s->pause_credit_ns;
    s->pause_last_ns = now;
    __atomic_add_fetch(&s->c.bulk_pause_ns, now - t0, __ATOMIC_RELAXED);
}

/* Bulk side: requested pages queued for the main channel, sent first. */
static int drain_queue(pc_src *s, batch *bt, int *in_section)
{
    for (;;) {
        pthread_mutex_lock(&s->qlock);
        if (s->qhead == s->qtail) {
            pthread_mutex_unlock(&s->qlock);
            return 0;
        }
        uint32_t bi = s->queue[s->qhead % PC_SRC_QUEUE].block;
        uint64_t host_off = s->queue[s->qhead % PC_SRC_QUEUE].host_off;
        s->qhead++;
        pthread_mutex_unlock(&s->qlock);
        if (!claim_host_page(&s->blocks[bi], host_off)) {
            __atomic_add_fetch(&s->c.request_pages_skipped, 1, __ATOMIC_RELAXED);
            continue;
        }
        if (!*in_section) {
            uint8_t h[5] = { PC_VM_SECTION_PART };
            pc_put_be32(h + 1, s->ram_section_id);
            batch_raw(bt, h, 5);
            *in_section = 1;
        }
        int rc = batch_host_page(s, PC_CHAN_MAIN, bt, bi, host_off);
        if (rc == 0)
            rc = batch_flush(s, PC_CHAN_MAIN, bt);
        if (rc < 0)
            return rc;
        __atomic_add_fetch(&s->c.request_pages_sent, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->c.host_pages_sent, 1, __ATOMIC_RELAXED);
    }
}

/* How long a stream's zone stays the prefetch's after its last request. */
#define ZONE_NS 20000000ull

static void publish_zones(pc_src *s)
{
    uint64_t now = pc_now_ns();
    for (int i = 0; i < PC_PF_STREAMS; i++) {
        uint32_t bi;
        uint64_t lo, hi;
        if (!pc_pf_zone(&s->pf, i, &bi, &lo, &hi)) {
            __atomic_store_n(&s->zone[i].until_ns, 0, __ATOMIC_RELEASE);
            continue;
        }
        uint64_t ntp = s->blocks[bi].host_page_size / PC_TARGET_PAGE_SIZE;
        if (__atomic_load_n(&s->zone[i].lo, __ATOMIC_RELAXED) == lo * ntp &&
            __atomic_load_n(&s->zone[i].block, __ATOMIC_RELAXED) == bi &&
            __atomic_load_n(&s->zone[i].hi, __ATOMIC_RELAXED) == hi * ntp &&
            __atomic_load_n(&s->zone[i].until_ns, __ATOMIC_RELAXED))
            continue;       /* unchanged: its clock runs from its last move */
        __atomic_store_n(&s->zone[i].until_ns, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&s->zone[i].block, bi, __ATOMIC_RELAXED);
        __atomic_store_n(&s->zone[i].lo, lo * ntp, __ATOMIC_RELAXED);
        __atomic_store_n(&s->zone[i].hi, hi * ntp, __ATOMIC_RELAXED);
        __atomic_store_n(&s->zone[i].until_ns, now + ZONE_NS, __ATOMIC_RELEASE);
    }
}

/* Bulk side: the end of the live prefetch zone target page i of block bi is in, or i. */
static uint64_t past_zones(pc_src *s, uint32_t bi, uint64_t i, uint64_t now)
{
    for (int z = 0; z < PC_PF_STREAMS; z++) {
        uint64_t until = __atomic_load_n(&s->zone[z].until_ns, __ATOMIC_ACQUIRE);
        if (!until || now >= until || __atomic_load_n(&s->zone[z].block, __ATOMIC_RELAXED) != bi)
            continue;
        uint64_t lo = __atomic_load_n(&s->zone[z].lo, __ATOMIC_RELAXED), hi = __atomic_load_n(&s->zone[z].hi, __ATOMIC_RELAXED);
        if (i >= lo && i < hi)
            return hi;
    }
    return i;
}

/* Wait until `until` (monotonic ns) or a stop; without preempt, requested
 * pages are sent while waiting: they never wait for the cap. */
static int cap_wait(pc_src *s, uint64_t until, batch *bt, int *in_section)
{
    while (!stopped(s)) {
        if (!s->preempt) {
            int rc = drain_queue(s, bt, in_section);    /* the caller holds the main channel lock */
            if (rc < 0)
                return rc;
        }
        uint64_t now = pc_now_ns();
        if (now >= until)
            return 0;
        uint64_t slice = until - now < 1000000 ? until - now : 1000000;   /* 1 ms at most */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t t = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + slice;
        pthread_mutex_lock(&s->qlock);
        if (s->qhead == s->qtail && !stopped(s)) {
            struct timespec abs = { (time_t)(t / 1000000000ull), (long)(t % 1000000000ull) };
            pthread_cond_timedwait(&s->qcond, &s->qlock, &abs);
        }
        pthread_mutex_unlock(&s->qlock);
    }
    return 0;
}

int pc_src_bulk_run_niced(pc_src *s, int nice)
{
    pc_thread_set_nice(nice);
    return pc_src_bulk_run(s);
}

int pc_src_bulk_run(pc_src *s)
{
    batch *bt = calloc(1, sizeof(*bt));
    if (!bt)
        return src_fail(s, PC_TX_E_IO, ENOMEM, "out of memory");
    pc_src_chan *c = &s->chan[PC_CHAN_MAIN];
    int in_section = 0, rc = 0, result = PC_TX_DONE;
    uint64_t section_bytes = 0, window_start = pc_now_ns(), window_bytes = 0, pass_pages = 0;
    int skipped_zone = 0;           /* this pass left pages to the prefetch */
    pthread_mutex_lock(&c->lock);
    int round_mode = __atomic_load_n(&s->round_mode, __ATOMIC_ACQUIRE);
    for (;;) {
        if (stopped(s) || (round_mode && __atomic_load_n(&s->round_end, __ATOMIC_ACQUIRE))) {
            result = PC_TX_STOPPED;
            break;
        }
        if (!s->preempt && (rc = drain_queue(s, bt, &in_section)) < 0)
            break;
        bulk_pause(s);      /* preempt: a requested page does not share the link with this stream */
        uint64_t flushed_before = bt->flushed;     /* requested pages above do not count against the cap */
        /* Gather up to BATCH_RECORDS target pages of whole host pages. */
        uint64_t records = 0, now = pc_now_ns();
        while (records < BATCH_RECORDS && s->cursor_block < s->nblocks) {
            uint32_t hot_block;
            uint64_t hot_first;
            if (!round_mode && s->hot_pos < s->nhot && take_hot(s, &s->hot_pos, &s->hot_off, &hot_block, &hot_first)) {
                if ((rc = bulk_hot_page(s, bt, hot_block, hot_first, &in_section)) < 0)
                    break;
                records += s->blocks[hot_block].host_page_size / PC_TARGET_PAGE_SIZE;
                pass_pages++;
                continue;
            }
            pc_src_block *b = &s->blocks[s->cursor_block];
            uint64_t npages = b->length / PC_TARGET_PAGE_SIZE, ntp = b->host_page_size / PC_TARGET_PAGE_SIZE;
            uint64_t i = pc_bitmap_find_next_set(b->dirty, s->cursor_page);
            if (i >= npages) {
                s->cursor_block++;
                s->cursor_page = 0;
                continue;
            }
            uint64_t first = i - i % ntp;
            uint64_t past = past_zones(s, s->cursor_block, first, now);
            if (past != first) {
                s->cursor_page = past;      /* a guest walks there: the prefetch sends it */
                skipped_zone = 1;
                continue;
            }
            s->cursor_page = first + ntp;
            if (!claim_host_page(b, first * PC_TARGET_PAGE_SIZE))
                continue;       /* a request took it first */
            if (!in_section) {
                uint8_t h[5] = { PC_VM_SECTION_PART };
                pc_put_be32(h + 1, s->ram_section_id);
                batch_raw(bt, h, 5);
                in_section = 1;
            }
            if ((rc = batch_host_page(s, PC_CHAN_MAIN, bt, s->cursor_block, first * PC_TARGET_PAGE_SIZE)) < 0)
                break;
            __atomic_add_fetch(&s->c.host_pages_sent, 1, __ATOMIC_RELAXED);
            records += ntp;
            pass_pages++;
        }
        if (rc < 0)
            break;
        int done = s->cursor_block >= s->nblocks;
        uint64_t hb = __atomic_load_n(&s->heartbeat_ns, __ATOMIC_RELAXED);
        int beat = hb && pc_now_ns() - s->ping_sent_ns >= hb;
        if (in_section && (done || beat || section_bytes >= s->section_bytes)) {
            uint8_t tail[13];
            pc_put_be64(tail, PC_RAM_FLAG_EOS);
            tail[8] = PC_VM_SECTION_FOOTER;
            pc_put_be32(tail + 9, s->ram_section_id);
            batch_raw(bt, tail, 13);
            in_section = 0;
            section_bytes = 0;
        }
        if (beat && !in_section) {
            /* Between sections: a PING the destination must answer, so a
             * link that silently stopped is noticed (the watchdog in Python). */
            uint8_t ping[9] = { PC_VM_COMMAND, 0x00, PC_MIG_CMD_PING, 0x00, 0x04 };    /* length 4 */
            s->ping_seq = (s->ping_seq + 1) & ~PC_HEARTBEAT_MASK;
            pc_put_be32(ping + 5, PC_HEARTBEAT_PING | s->ping_seq);
            batch_raw(bt, ping, 9);
            __atomic_store_n(&s->ping_sent_ns, pc_now_ns(), __ATOMIC_RELAXED);
        }
        if ((rc = batch_flush(s, PC_CHAN_MAIN, bt)) < 0)
            break;
        uint64_t sent = bt->flushed - flushed_before;
        section_bytes += sent;
        if (done && round_mode)
            break;          /* one pass: the next scan says what to send next */
        if (done) {
            /* A request may have re-dirtied nothing, but a recovery reload
             * may have: look once more from the start. */
            if (pc_src_dirty_pages(s) == 0)
                break;
            if (skipped_zone && !pass_pages) {
                /* all that is left is where guests walk: the prefetch sends it, or the zones expire */
                struct timespec nap = { 0, 1000000 };
                nanosleep(&nap, NULL);
            }
            skipped_zone = 0;
            pass_pages = 0;
            s->cursor_block = 0;
            s->cursor_page = 0;
            continue;
        }
        uint64_t cap = __atomic_load_n(&s->bandwidth_cap, __ATOMIC_RELAXED);
        if (cap) {
            window_bytes += sent;
            uint64_t due = window_start + window_bytes * 1000000000ull / cap;
            uint64_t now = pc_now_ns();
            if (now > due + 100000000ull) {     /* idle for a while: do not burst to catch up */
                window_start = now;
                window_bytes = 0;
            } else if (due > now && (rc = cap_wait(s, due, bt, &in_section)) < 0) {
                break;
            }
        }
    }
    if (rc < 0)
        result = src_fail(s, PC_TX_E_IO, -rc, "main channel write: %s", strerror(-rc));
    else if (in_section) {
        /* stopped inside a section: close it so the stream stays well formed */
        uint8_t tail[13];
        pc_put_be64(tail, PC_RAM_FLAG_EOS);
        tail[8] = PC_VM_SECTION_FOOTER;
        pc_put_be32(tail + 9, s->ram_section_id);
        batch_raw(bt, tail, 13);
        if ((rc = batch_flush(s, PC_CHAN_MAIN, bt)) < 0)
            result = src_fail(s, PC_TX_E_IO, -rc, "main channel write: %s", strerror(-rc));
    }
    pthread_mutex_unlock(&c->lock);
    free(bt);
    return result;
}

uint64_t pc_src_dirty_pages(pc_src *s)
{
    uint64_t n = 0;
    for (uint32_t bi = 0; bi < s->nblocks; bi++)
        n += pc_bitmap_count(s->blocks[bi].dirty);
    return n;
}

/* True (once per page) when a host page went on this connection's main
 * channel: the destination asks for a page only while it has not placed it,
 * so that copy is still on its way: in a socket, or in the destination's
 * receive buffer behind megabytes of other pages, whose receiver runs below
 * the guest and may not get to it for tens of ms. Otherwise (sent on an
 * earlier connection: recovery reloads what arrived) it counts as skipped. */
static int sent_on_main_once(pc_src *s, pc_src_block *b, uint64_t host_off)
{
    uint64_t *slot = &b->main_end[host_off / b->host_page_size];
    uint64_t end = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    pc_src_chan *c = &s->chan[PC_CHAN_MAIN];
    if (!end || __atomic_load_n(&c->fd, __ATOMIC_RELAXED) < 0 || end <= c->conn_base)
        return 0;
    return __atomic_exchange_n(slot, 0, __ATOMIC_ACQ_REL) != 0;
}

/* Prefetch: what one burst may send, and how much may wait unsent in the
 * preempt socket before more is sent ahead (a requested page queues behind
 * it). */
#define PF_CHUNK_BYTES (128u << 10)
#define PF_CHUNK_LOOKS 4096         /* due pages looked at per chunk (most may be sent already) */
#define PF_QUEUE_LIMIT (512 << 10)
enum { PF_SENT = 0, PF_FULL = 1 };

/* Send one chunk of the pages the detector says are due (or, with hot set, of
 * the hot set) on the preempt channel (return-path thread). PF_SENT, PF_FULL
 * (the socket's queue is long: wait for it or a request) or PC_RP_E_IO. */
static int prefetch_chunk(pc_src *s, int hot)
{
    batch *bt = s->preempt_batch;
    pc_src_chan *c = &s->chan[PC_CHAN_PREEMPT];
    struct { uint32_t block; uint64_t page; } claimed[PF_CHUNK_BYTES / PC_TARGET_PAGE_SIZE];
    uint32_t n = 0;
    uint64_t bytes = 0, hot_pages = 0;
    int rc = 0;
    pthread_mutex_lock(&c->lock);
    if (c->fd < 0) {                /* finished or broken: nothing more goes this way */
        pthread_mutex_unlock(&c->lock);
        pc_pf_reset(&s->pf);
        s->rp_hot_pos = s->nhot;    /* the bulk stream sends the rest of the hot set */
        return PF_SENT;
    }
    int outq = 0;
    if (ioctl(c->fd, SIOCOUTQ, &outq) == 0 && outq > PF_QUEUE_LIMIT) {
        pthread_mutex_unlock(&c->lock);
        return PF_FULL;
    }
    batch_reset(bt);
    uint32_t bi;
    uint64_t page;
    for (int looks = 0; bytes < PF_CHUNK_BYTES && looks < PF_CHUNK_LOOKS; looks++) {
        pc_src_block *b;
        /* claimed under the channel lock: a finish (the preempt EOS) cannot come between claim and send */
        if (hot) {
            uint64_t first;
            if (!take_hot(s, &s->rp_hot_pos, &s->rp_hot_off, &bi, &first))
                break;
            b = &s->blocks[bi];
            page = first / (b->host_page_size / PC_TARGET_PAGE_SIZE);
            hot_pages += b->host_page_size / PC_TARGET_PAGE_SIZE;
        } else {
            if (!pc_pf_next(&s->pf, &bi, &page))
                break;
            b = &s->blocks[bi];
            if (!claim_host_page(b, page * b->host_page_size))
                continue;
            pc_pf_mark_sent(&s->pf, bi, page);
        }
        claimed[n].block = bi;
        claimed[n].page = page;
        n++;
        record_hot(s, bi, page);
        if ((rc = batch_host_page(s, PC_CHAN_PREEMPT, bt, bi, page * b->host_page_size)) < 0)
            break;
        bytes += b->host_page_size;
    }
    if (rc == 0)
        rc = batch_flush(s, PC_CHAN_PREEMPT, bt);
    batch_reset(bt);
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        /* Put them back: they must still be sent (a recovery reloads the dirty bitmaps anyway). */
        for (uint32_t i = 0; i < n; i++) {
            pc_src_block *b = &s->blocks[claimed[i].block];
            uint64_t ntp = b->host_page_size / PC_TARGET_PAGE_SIZE;
            pc_bitmap_set_range_atomic(b->dirty, claimed[i].page * ntp, ntp);
            if (!hot)
                pc_pf_unmark_sent(&s->pf, claimed[i].block, claimed[i].page);
        }
        pc_pf_reset(&s->pf);
        return src_fail(s, PC_RP_E_IO, -rc, "preempt channel write: %s", strerror(-rc));
    }
    __atomic_add_fetch(&s->c.host_pages_sent, n, __ATOMIC_RELAXED);
    if (hot_pages) {
        __atomic_add_fetch(&s->c.hot_pages_sent, hot_pages, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->c.hot_pages_preempt, hot_pages, __ATOMIC_RELAXED);
    }
    return PF_SENT;
}

static int serve_request_pages(pc_src *s, uint32_t bi, uint64_t start, uint64_t len);

/* One page request (already validated): serve or queue each host page. */
static int serve_request(pc_src *s, uint32_t bi, uint64_t start, uint64_t len)
{
    __atomic_add_fetch(&s->c.requests, 1, __ATOMIC_RELAXED);
    int urgent = s->preempt && __atomic_load_n(&s->chan[PC_CHAN_PREEMPT].fd, __ATOMIC_RELAXED) >= 0;
    if (urgent)
        __atomic_add_fetch(&s->urgent, 1, __ATOMIC_ACQ_REL);   /* the bulk stands aside until they are taken in */
    int rc = serve_request_pages(s, bi, start, len);
    if (urgent)
        __atomic_sub_fetch(&s->urgent, 1, __ATOMIC_ACQ_REL);
    return rc;
}

static int serve_request_pages(pc_src *s, uint32_t bi, uint64_t start, uint64_t len)
{
    pc_src_block *b = &s->blocks[bi];
    uint64_t hps = b->host_page_size;
    for (uint64_t off = start & ~(hps - 1); off < start + len; off += hps) {
        record_hot(s, bi, off / hps);
        s->hot_armed = 1;       /* the destination runs the guest: the preempt channel may carry the hot set */
        if (s->preempt && s->chan[PC_CHAN_PREEMPT].fd >= 0) {
            if (!claim_host_page(b, off)) {
                if (__atomic_load_n(&s->send_once, __ATOMIC_RELAXED) || !sent_on_main_once(s, b, off)) {
                    __atomic_add_fetch(&s->c.request_pages_skipped, 1, __ATOMIC_RELAXED);
                    continue;
                }
                /* The bulk stream took it, but it still sits in this host's
                 * socket queue behind megabytes of other pages: send it again
                 * on the preempt channel (the destination keeps the first copy
                 * to arrive; the other is EEXIST). The guest is stopped, so
                 * both copies are the same. */
                int rc = send_urgent_preempt(s, bi, off);
                if (rc == -EPIPE && __atomic_load_n(&s->chan[PC_CHAN_PREEMPT].fd, __ATOMIC_RELAXED) < 0)
                    continue;       /* the preempt channel was finished meanwhile: the page is on main */
                if (rc < 0)
                    return src_fail(s, PC_RP_E_IO, -rc, "preempt channel write: %s", strerror(-rc));
                __atomic_add_fetch(&s->c.resent_target_pages, hps / PC_TARGET_PAGE_SIZE, __ATOMIC_RELAXED);
                continue;
            }
            int rc = send_urgent_preempt(s, bi, off);
            if (rc < 0) {
                /* Put it back: it must still be sent, after a recovery. */
                pc_bitmap_set_range_atomic(b->dirty, off / PC_TARGET_PAGE_SIZE, hps / PC_TARGET_PAGE_SIZE);
                return src_fail(s, PC_RP_E_IO, -rc, "preempt channel write: %s", strerror(-rc));
            }
            __atomic_add_fetch(&s->c.request_pages_sent, 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&s->c.host_pages_sent, 1, __ATOMIC_RELAXED);
        } else {
            pthread_mutex_lock(&s->qlock);
            if (s->qtail - s->qhead < PC_SRC_QUEUE) {
                s->queue[s->qtail % PC_SRC_QUEUE].block = bi;
                s->queue[s->qtail % PC_SRC_QUEUE].host_off = off;
                s->qtail++;
                __atomic_add_fetch(&s->c.requests_queued, 1, __ATOMIC_RELAXED);
            }   /* else: the bulk stream gets to it anyway; the destination asks again after a recovery */
            pthread_cond_signal(&s->qcond);
            pthread_mutex_unlock(&s->qlock);
        }
    }
    if (s->preempt && __atomic_load_n(&s->chan[PC_CHAN_PREEMPT].fd, __ATOMIC_RELAXED) >= 0) {
        pc_pf_request(&s->pf, bi, start / hps);
        publish_zones(s);
    }
    return 0;
}

static int64_t find_block(pc_src *s, const uint8_t *id, uint32_t n)
{
    for (uint32_t i = 0; i < s->nblocks; i++)
        if (s->blocks[i].idlen == n && !memcmp(s->blocks[i].idstr, id, n))
            return i;
    return -1;
}

/* Page requests on the preempt channel's way back: read from the moment this
 * connection's preempt channel is set until it ends (its sockets are closed only
 * after this thread is joined, see Source._close_channels). */
static void req_follow_preempt(pc_src *s)
{
    if (s->req_ended || s->req_fd >= 0)
        return;
    int fd = __atomic_load_n(&s->chan[PC_CHAN_PREEMPT].fd, __ATOMIC_RELAXED);
    if (fd < 0)
        return;
    if (pc_sockbuf_init(&s->req, fd, 4096, PC_RP_MAX_FRAME + 4) == 0) {
        s->req_fd = fd;
        s->req_block = -1;
    } else {
        s->req_ended = 1;           /* no memory for it: requests come on the return path */
    }
}

/* The preempt channel's way back closed (or broke): a request cut short there
 * is asked for again after a recovery. */
static void req_end(pc_src *s)
{
    pc_sockbuf_release(&s->req);
    s->req_fd = -1;
    s->req_ended = 1;
}

/* Nothing unread either way: wait for the return path or the preempt channel
 * and take in what came (as pc_sockbuf_spin: on the CPU while the return path's
 * spin deadline is ahead). 1: something came, 0: EOF on the return path, -errno. */
static int64_t rp_wait_both(pc_src *s)
{
    struct pollfd pfd[2] = { { s->rp.fd, POLLIN, 0 }, { s->req_fd, POLLIN, 0 } };
    for (;;) {
        uint64_t until = __atomic_load_n(&s->rp.spin_until_ns, __ATOMIC_RELAXED);
        int n = poll(pfd, 2, until && pc_now_ns() < until ? 0 : -1);
        if (n > 0)
            break;
        if (n == 0)
            sched_yield();
        else if (errno != EINTR)
            return -errno;
    }
    if (pfd[1].revents && pc_sockbuf_recv(&s->req) <= 0)
        req_end(s);
    if (pfd[0].revents) {
        int64_t r = pc_sockbuf_recv(&s->rp);
        if (r <= 0)
            return r;
    }
    return 1;
}

int pc_src_rp_run(pc_src *s)
{
    if (!s->rp_ready)
        return src_fail(s, PC_RP_E_IO, EBADF, "no return path");
    for (;;) {
        if (stopped(s))
            return PC_RP_STOPPED;
        req_follow_preempt(s);
        int both = s->req_fd >= 0;
        /* what came on the preempt channel first: it only ever carries requests */
        pc_sockbuf *in = both && pc_sockbuf_avail(&s->req) ? &s->req : &s->rp;
        int64_t *block = in == &s->req ? &s->req_block : &s->rp_block;
        int idle = pc_sockbuf_avail(&s->rp) < 4 && !(both && pc_sockbuf_avail(&s->req));
        int pf_due = pc_pf_pending(&s->pf);
        int hot_due = !pf_due && s->preempt && s->rp_hot_pos < s->nhot && __atomic_load_n(&s->hot_armed, __ATOMIC_ACQUIRE);
        if (idle && (pf_due || hot_due)) {
            /* Pages are due ahead of the guest (the detector's first, then the hot set's):
             * a chunk of them, unless a request is waiting. */
            struct pollfd pfd[2] = { { s->rp.fd, POLLIN, 0 }, { both ? s->req_fd : -1, POLLIN, 0 } };
            if (poll(pfd, 2, 0) == 0) {
                int rc = prefetch_chunk(s, !pf_due);
                if (rc < 0)
                    return rc;
                if (rc == PF_FULL)
                    poll(pfd, 2, 1);
                continue;
            }
        }
        if (both && !pc_sockbuf_avail(&s->rp) && !pc_sockbuf_avail(&s->req)) {
            /* (a message begun on one way is read to its end below, on that way alone) */
            int64_t w = rp_wait_both(s);
            if (w == 0)
                return PC_RP_EOF;
            if (w < 0)
                return src_fail(s, PC_RP_E_IO, (int)-w, "return path recv: %s", strerror((int)-w));
            continue;
        }
        if (!both && s->preempt && !s->req_ended && !pc_sockbuf_avail(&s->rp)) {
            /* No preempt channel set yet (a recovery connects it after the return path): wait
             * for the return path a millisecond at a time, looking for it in between. */
            struct pollfd pfd = { s->rp.fd, POLLIN, 0 };
            if (poll(&pfd, 1, 1) <= 0)
                continue;
        }
        int64_t r = pc_sockbuf_fill(in, 4);
        if (r <= 0 && in == &s->req) {
            req_end(s);
            continue;
        }
        if (r == 0)
            return pc_sockbuf_avail(in) ? src_fail(s, PC_RP_E_PROTO, EPIPE, "return path closed mid-message")
                                        : PC_RP_EOF;
        if (r < 0)
            return src_fail(s, PC_RP_E_IO, (int)-r, "return path recv: %s", strerror((int)-r));
        const uint8_t *p = pc_sockbuf_data(in);
        uint16_t type = pc_get_be16(p), len = pc_get_be16(p + 2);
        if (len > PC_RP_MAX_FRAME)
            return src_fail(s, PC_RP_E_PROTO, EINVAL, "return-path message type %u has length %u > %u", type, len,
                            PC_RP_MAX_FRAME);
        if (type != PC_RP_REQ_PAGES_ID && type != PC_RP_REQ_PAGES) {
            if (in == &s->req)
                return src_fail(s, PC_RP_E_PROTO, EINVAL, "return-path message type %u on the preempt channel "
                                "(it carries page requests only)", type);
            /* when its header came in (a PONG read after a page was sent counts from its arrival),
             * not when Python gets the GIL back */
            s->rp_control_ns = pc_sockbuf_arrival_of(in, pc_sockbuf_offset(in) + 3);
            return PC_RP_CONTROL;
        }
        r = pc_sockbuf_fill(in, 4u + len);
        if (r <= 0 && in == &s->req) {
            req_end(s);
            continue;
        }
        if (r == 0)
            return src_fail(s, PC_RP_E_PROTO, EPIPE, "return path closed mid-message");
        if (r < 0)
            return src_fail(s, PC_RP_E_IO, (int)-r, "return path recv: %s", strerror((int)-r));
        p = pc_sockbuf_data(in);
        const uint8_t *body = p + 4;
        if (type == PC_RP_REQ_PAGES_ID) {
            if (len < 14 || len != 13u + body[12])
                return src_fail(s, PC_RP_E_PROTO, EINVAL, "REQ_PAGES_ID with length %u", len);
            *block = find_block(s, body + 13, body[12]);
            if (*block < 0) {
                pc_sockbuf_consume(in, 4u + len);
                return src_fail(s, PC_RP_BAD_REQUEST, ENOENT, "page request names unknown block '%.*s'",
                                (int)body[12], (const char *)body + 13);
            }
        } else if (len != 12) {
            return src_fail(s, PC_RP_E_PROTO, EINVAL, "REQ_PAGES with length %u (expected 12)", len);
        } else if (*block < 0) {
            pc_sockbuf_consume(in, 4u + len);
            return src_fail(s, PC_RP_BAD_REQUEST, EINVAL, "REQ_PAGES before any REQ_PAGES_ID named a block");
        }
        uint64_t start = pc_get_be64(body);
        uint64_t rlen = pc_get_be32(body + 8);
        pc_src_block *b = &s->blocks[*block];
        pc_sockbuf_consume(in, 4u + len);
        if (rlen == 0 || start % PC_TARGET_PAGE_SIZE || rlen % PC_TARGET_PAGE_SIZE || start >= b->length ||
            rlen > b->length - start)
            return src_fail(s, PC_RP_BAD_REQUEST, ERANGE,
                            "page request %s offset 0x%llx len 0x%llx is outside the block (0x%llx bytes) or misaligned",
                            b->idstr, (unsigned long long)start, (unsigned long long)rlen,
                            (unsigned long long)b->length);
        if (in == &s->req)
            __atomic_add_fetch(&s->c.requests_preempt, 1, __ATOMIC_RELAXED);
        int rc = serve_request(s, (uint32_t)*block, start, rlen);
        if (rc < 0)
            return rc;
    }
}

void pc_hash_pages(uint64_t base, uint64_t npages, uint64_t *out)
{
    for (uint64_t i = 0; i < npages; i++)
        out[i] = pc_page_hash((const uint8_t *)(uintptr_t)(base + i * PC_TARGET_PAGE_SIZE));
}

void pc_src_set_round_mode(pc_src *s, int on)
{
    s->cursor_block = 0;
    s->cursor_page = 0;
    __atomic_store_n(&s->round_end, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->round_mode, on, __ATOMIC_RELEASE);
}

void pc_src_resume_round(pc_src *s)
{
    __atomic_store_n(&s->round_end, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&s->round_mode, 1, __ATOMIC_RELEASE);
}

void pc_src_end_round(pc_src *s) { __atomic_store_n(&s->round_end, 1, __ATOMIC_RELEASE); }

/* Word w of the pages to discard: dirty, and not discarded already (x may be NULL). */
static inline uint64_t discard_word(const pc_bitmap *d, const pc_bitmap *x, uint64_t w)
{
    uint64_t v = __atomic_load_n(&d->words[w], __ATOMIC_ACQUIRE);
    return x ? v & ~x->words[w] : v;
}

/* The next page at or after i whose discard bit is `want` (npages if none). */
static uint64_t discard_next(const pc_bitmap *d, const pc_bitmap *x, uint64_t i, uint64_t npages, int want)
{
    if (i >= npages)
        return npages;
    uint64_t nw = pc_bitmap_nwords(d), w = i / 64;
    uint64_t v = discard_word(d, x, w);
    if (!want)
        v = ~v;
    v &= ~0ull << (i % 64);
    for (;;) {
        if (v) {
            uint64_t j = w * 64 + (uint64_t)__builtin_ctzll(v);
            return j < npages ? j : npages;
        }
        if (++w >= nw)
            return npages;
        v = discard_word(d, x, w);
        if (!want)
            v = ~v;
    }
}

/* Append one discard command (n ranges) to buf; returns its length. */
static size_t discard_cmd(uint8_t *buf, const pc_src_block *b, const uint64_t (*r)[2], int n)
{
    size_t len = 1 + 1 + b->idlen + 1 + 16u * (size_t)n, o = 0;
    buf[o++] = PC_VM_COMMAND;
    pc_put_be16(buf + o, PC_MIG_CMD_POSTCOPY_RAM_DISCARD);
    pc_put_be16(buf + o + 2, (uint16_t)len);
    o += 4;
    buf[o++] = 0;                       /* version */
    buf[o++] = (uint8_t)b->idlen;
    memcpy(buf + o, b->idstr, b->idlen);
    o += b->idlen;
    buf[o++] = 0;                       /* QEMU sends the name's NUL too */
    for (int i = 0; i < n; i++, o += 16) {
        pc_put_be64(buf + o, r[i][0]);
        pc_put_be64(buf + o + 8, r[i][1]);
    }
    return o;
}

/* Runs of chunks of c target pages holding a page to discard (dirty, not discarded before);
 * *covered (may be NULL): the target pages those chunks hold. */
static uint64_t discard_runs_covering(const pc_src *s, uint64_t c, uint64_t *covered)
{
    uint64_t runs = 0, chunks = 0;
    for (uint32_t bi = 0; bi < s->nblocks; bi++) {
        const pc_src_block *b = &s->blocks[bi];
        uint64_t npages = b->length / PC_TARGET_PAGE_SIZE, last = UINT64_MAX;
        for (uint64_t i = discard_next(b->dirty, b->discarded, 0, npages, 1); i < npages;) {
            uint64_t k = i / c;
            if (last == UINT64_MAX || k != last + 1)
                runs++;
            last = k;
            chunks++;
            i = discard_next(b->dirty, b->discarded, (k + 1) * c, npages, 1);
        }
    }
    if (covered)
        *covered = chunks * c;
    return runs;
}

static uint64_t discard_runs(const pc_src *s, uint64_t c) { return discard_runs_covering(s, c, NULL); }

uint64_t pc_src_discard_runs(const pc_src *s) { return discard_runs(s, 1); }

int64_t pc_src_coarsen_discards(pc_src *s, uint64_t max_ranges)
{
    /* Widen no further than PC_SRC_COARSEN_MAX_COVER times the pages to discard: scattered
     * writes (a random writer) would otherwise widen to chunks covering most of the memory,
     * all of it then fetched again after RUN; past that the ranges exceed max_ranges. */
    uint64_t c = 1, pages = 0;
    (void)discard_runs_covering(s, 1, &pages);
    while (c < PC_SRC_COARSEN_MAX_PAGES && discard_runs(s, c) > max_ranges) {
        uint64_t covered = 0;
        (void)discard_runs_covering(s, c * 2, &covered);
        if (covered > PC_SRC_COARSEN_MAX_COVER * pages)
            break;
        c *= 2;
    }
    if (c == 1)
        return 1;
    for (uint32_t bi = 0; bi < s->nblocks; bi++) {
        pc_src_block *b = &s->blocks[bi];
        uint64_t npages = b->length / PC_TARGET_PAGE_SIZE;
        for (uint64_t i = discard_next(b->dirty, b->discarded, 0, npages, 1); i < npages;) {
            uint64_t k = i / c, start = k * c, n = start + c <= npages ? c : npages - start;
            /* the whole chunk goes again: dropped on the destination, sent again from here */
            pc_bitmap_set_range_atomic(b->dirty, start, n);
            if (b->discarded)
                pc_bitmap_clear_range_atomic(b->discarded, start, n);
            i = discard_next(b->dirty, b->discarded, start + n, npages, 1);
        }
    }
    return (int64_t)c;
}

int64_t pc_src_send_discards(pc_src *s, int flags)
{
    enum { CMD_MAX = 5 + 3 + 255 + 16 * PC_SRC_DISCARDS_PER_CMD, BUF = 64 * 1024 };
    uint8_t *buf = malloc(BUF);
    if (!buf)
        return -ENOMEM;
    int64_t total = 0;
    int rc = 0;
    size_t used = 0;
    for (uint32_t bi = 0; bi < s->nblocks && rc == 0; bi++) {
        pc_src_block *b = &s->blocks[bi];
        uint64_t npages = b->length / PC_TARGET_PAGE_SIZE;
        const pc_bitmap *skip = (flags & PC_SRC_DISCARD_NEW_ONLY) ? b->discarded : NULL;
        uint64_t r[PC_SRC_DISCARDS_PER_CMD][2];
        int n = 0;
        for (uint64_t i = discard_next(b->dirty, skip, 0, npages, 1); i < npages && rc == 0;) {
            uint64_t j = discard_next(b->dirty, skip, i, npages, 0);
            r[n][0] = i * PC_TARGET_PAGE_SIZE;
            r[n][1] = (j - i) * PC_TARGET_PAGE_SIZE;
            total++;
            if (++n == PC_SRC_DISCARDS_PER_CMD) {
                used += discard_cmd(buf + used, b, (const uint64_t (*)[2])r, n);
                n = 0;
            }
            if (used + CMD_MAX > BUF) {
                rc = pc_src_chan_write(s, PC_CHAN_MAIN, buf, used);
                used = 0;
            }
            i = discard_next(b->dirty, skip, j, npages, 1);
        }
        if (n && rc == 0)
            used += discard_cmd(buf + used, b, (const uint64_t (*)[2])r, n);
        if (rc == 0 && (flags & PC_SRC_DISCARD_REMEMBER)) {
            /* what the destination dropped now (the pages stay dirty here: no round follows) */
            if (!b->discarded && !(b->discarded = pc_bitmap_new(b->dirty->nbits)))
                rc = -ENOMEM;
            else
                for (uint64_t w = 0; w < pc_bitmap_nwords(b->dirty); w++)
                    b->discarded->words[w] |= __atomic_load_n(&b->dirty->words[w], __ATOMIC_ACQUIRE);
        } else if (flags & PC_SRC_DISCARD_NEW_ONLY) {
            pc_bitmap_free(b->discarded);
            b->discarded = NULL;
        }
    }
    if (used && rc == 0)
        rc = pc_src_chan_write(s, PC_CHAN_MAIN, buf, used);
    free(buf);
    /* As QEMU's ram_postcopy_send_discard_bitmap: the next page on main names
     * its block again (the destination's postcopy receiver starts afresh). */
    pthread_mutex_lock(&s->chan[PC_CHAN_MAIN].lock);
    s->chan[PC_CHAN_MAIN].last_block = -1;
    pthread_mutex_unlock(&s->chan[PC_CHAN_MAIN].lock);
    return rc < 0 ? rc : total;
}

/* ---- hot set: pushed first by the postcopy bulk stream, or recorded ------------ */

int pc_src_set_hot(pc_src *s, const pc_src_range *runs, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        if (runs[i].block >= s->nblocks)
            return -ERANGE;
        uint64_t npages = s->blocks[runs[i].block].length / PC_TARGET_PAGE_SIZE;
        if (!runs[i].npages || runs[i].first >= npages || runs[i].npages > npages - runs[i].first)
            return -ERANGE;
    }
    pc_src_range *copy = NULL;
    if (n && !(copy = malloc(n * sizeof(*copy))))
        return -ENOMEM;
    if (n)
        memcpy(copy, runs, n * sizeof(*copy));
    free(s->hot);
    s->hot = copy;
    s->nhot = n;
    s->hot_pos = s->hot_off = s->rp_hot_pos = s->rp_hot_off = 0;
    return 0;
}

/* Claim the next dirty host page of the hot set from cursor (pos, off) (the bulk
 * stream's or the return path's): 1 and its block and first target page, or 0
 * when the whole set went (sent, requested or sent ahead). */
static int take_hot(pc_src *s, uint64_t *pos, uint64_t *off, uint32_t *bi, uint64_t *first)
{
    while (*pos < s->nhot) {
        const pc_src_range *r = &s->hot[*pos];
        if (*off >= r->npages) {
            ++*pos;
            *off = 0;
            continue;
        }
        pc_src_block *b = &s->blocks[r->block];
        uint64_t ntp = b->host_page_size / PC_TARGET_PAGE_SIZE, page = r->first + *off;
        uint64_t host_first = page - page % ntp;
        *off = host_first + ntp - r->first;
        if (claim_host_page(b, host_first * PC_TARGET_PAGE_SIZE)) {
            *bi = (uint32_t)r->block;
            *first = host_first;
            return 1;
        }
    }
    return 0;
}

/* Bulk side (main channel lock held): one claimed hot host page into the batch. */
static int bulk_hot_page(pc_src *s, batch *bt, uint32_t bi, uint64_t first, int *in_section)
{
    if (!*in_section) {
        uint8_t h[5] = { PC_VM_SECTION_PART };
        pc_put_be32(h + 1, s->ram_section_id);
        batch_raw(bt, h, 5);
        *in_section = 1;
    }
    int rc = batch_host_page(s, PC_CHAN_MAIN, bt, bi, first * PC_TARGET_PAGE_SIZE);
    if (rc < 0) {
        pc_src_block *b = &s->blocks[bi];
        pc_bitmap_set_range_atomic(b->dirty, first, b->host_page_size / PC_TARGET_PAGE_SIZE);
        return rc;
    }
    __atomic_add_fetch(&s->c.host_pages_sent, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->c.hot_pages_sent, s->blocks[bi].host_page_size / PC_TARGET_PAGE_SIZE, __ATOMIC_RELAXED);
    record_hot(s, bi, first / (s->blocks[bi].host_page_size / PC_TARGET_PAGE_SIZE));
    return 0;
}

int pc_src_record_hot(pc_src *s, int on)
{
    pthread_mutex_lock(&s->rec_lock);
    if (on && !s->rec_seen) {
        pc_bitmap **seen = calloc(s->nblocks ? s->nblocks : 1, sizeof(*seen));
        int ok = seen != NULL;
        for (uint32_t i = 0; ok && i < s->nblocks; i++)
            ok = (seen[i] = pc_bitmap_new(s->blocks[i].length / s->blocks[i].host_page_size)) != NULL;
        if (!ok) {
            for (uint32_t i = 0; seen && i < s->nblocks; i++)
                pc_bitmap_free(seen[i]);
            free(seen);
            pthread_mutex_unlock(&s->rec_lock);
            return -ENOMEM;
        }
        __atomic_store_n(&s->rec_seen, seen, __ATOMIC_RELEASE);
    } else if (!on && s->rec_seen) {
        /* only with the return-path thread stopped (or never started) */
        pc_bitmap **seen = s->rec_seen;
        __atomic_store_n(&s->rec_seen, NULL, __ATOMIC_RELEASE);
        for (uint32_t i = 0; i < s->nblocks; i++)
            pc_bitmap_free(seen[i]);
        free(seen);
    }
    pthread_mutex_unlock(&s->rec_lock);
    return 0;
}

/* Return-path thread: host page `host_page` of block bi was asked for or sent ahead. */
static void record_hot(pc_src *s, uint32_t bi, uint64_t host_page)
{
    pc_bitmap **seen = __atomic_load_n(&s->rec_seen, __ATOMIC_ACQUIRE);
    if (!seen || pc_bitmap_test_and_set_atomic(seen[bi], host_page))
        return;
    uint64_t ntp = s->blocks[bi].host_page_size / PC_TARGET_PAGE_SIZE, first = host_page * ntp;
    pthread_mutex_lock(&s->rec_lock);
    pc_src_range *last = s->nrec ? &s->rec[s->nrec - 1] : NULL;
    if (last && last->block == bi && last->first + last->npages == first) {
        last->npages += ntp;
    } else {
        if (s->nrec == s->rec_cap) {
            uint64_t cap = s->rec_cap ? s->rec_cap * 2 : 1024;
            pc_src_range *grown = realloc(s->rec, cap * sizeof(*grown));
            if (!grown) {                   /* a hint: what does not fit is left out */
                pthread_mutex_unlock(&s->rec_lock);
                return;
            }
            s->rec = grown;
            s->rec_cap = cap;
        }
        s->rec[s->nrec++] = (pc_src_range){ bi, first, ntp };
    }
    __atomic_add_fetch(&s->c.hot_pages_recorded, ntp, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->rec_lock);
}

uint64_t pc_src_hot_recorded(pc_src *s, pc_src_range *out, uint64_t max)
{
    pthread_mutex_lock(&s->rec_lock);
    uint64_t n = s->nrec;
    if (out && max)
        memcpy(out, s->rec, (n < max ? n : max) * sizeof(*out));
    pthread_mutex_unlock(&s->rec_lock);
    return n;
}
