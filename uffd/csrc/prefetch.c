/* Prefetch detector: see prefetch.h. */
#include "prefetch.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int pc_pf_init(pc_prefetch *p, uint32_t nblocks)
{
    memset(p, 0, sizeof(*p));
    p->npages = calloc(nblocks ? nblocks : 1, sizeof(*p->npages));
    p->page_size = calloc(nblocks ? nblocks : 1, sizeof(*p->page_size));
    p->sent = calloc(nblocks ? nblocks : 1, sizeof(*p->sent));
    if (!p->npages || !p->page_size || !p->sent) {
        free(p->npages);
        free(p->page_size);
        free(p->sent);
        memset(p, 0, sizeof(*p));
        return -ENOMEM;
    }
    p->nblocks = nblocks;
    return 0;
}

void pc_pf_release(pc_prefetch *p)
{
    for (uint32_t i = 0; p->sent && i < p->nblocks; i++)
        free(p->sent[i]);
    free(p->sent);
    free(p->npages);
    free(p->page_size);
    p->sent = NULL;
    p->npages = NULL;
    p->page_size = NULL;
    p->nblocks = 0;
}

int pc_pf_set_block(pc_prefetch *p, uint32_t i, uint64_t npages, uint64_t page_size)
{
    if (i >= p->nblocks || !page_size)
        return -ERANGE;
    uint64_t *bits = calloc(npages / 64 + 1, sizeof(uint64_t));
    if (!bits)
        return -ENOMEM;
    free(p->sent[i]);
    p->sent[i] = bits;
    p->npages[i] = npages;
    p->page_size[i] = page_size;
    return 0;
}

void pc_pf_configure(pc_prefetch *p, uint64_t min_bytes, uint64_t max_bytes)
{
    if (max_bytes && min_bytes > max_bytes)
        min_bytes = max_bytes;
    p->min_bytes = min_bytes;
    p->max_bytes = max_bytes;
}

/* Window bounds of a block, in its host pages (at least 1). */
static uint64_t min_window(const pc_prefetch *p, uint32_t block)
{
    uint64_t w = p->min_bytes / p->page_size[block];
    return w ? w : 1;
}

static uint64_t max_window(const pc_prefetch *p, uint32_t block)
{
    uint64_t w = p->max_bytes / p->page_size[block];
    return w ? w : 1;
}

void pc_pf_reset(pc_prefetch *p)
{
    memset(p->st, 0, sizeof(p->st));
    p->rr = 0;
}

/* Counters are in 4 KiB target pages. */
static uint64_t tp(const pc_prefetch *p, uint32_t block) { return p->page_size[block] >= 4096 ? p->page_size[block] / 4096 : 1; }

static int test_clear(pc_prefetch *p, uint32_t block, int64_t page)
{
    if (page < 0 || (uint64_t)page >= p->npages[block])
        return 0;
    uint64_t *w = &p->sent[block][page / 64], m = 1ull << (page % 64);
    int was = (*w & m) != 0;
    *w &= ~m;
    return was;
}

/* Pages sent ahead on the stream's line in (from, to]: the guest went past them. */
static void passed(pc_prefetch *p, const pc_pf_stream *s, int64_t from, int64_t to)
{
    for (int64_t q = from + s->stride; s->stride > 0 ? q <= to : q >= to; q += s->stride)
        if (test_clear(p, s->block, q))
            p->c.pages_used += tp(p, s->block);
}

/* Make the pages up to q + stride * window due. */
static void extend(pc_prefetch *p, pc_pf_stream *s, int64_t q)
{
    int64_t npages = (int64_t)p->npages[s->block];
    int64_t target = q + s->stride * (int64_t)s->window;
    if (target < 0)
        target = 0;
    if (target >= npages)
        target = npages - 1;
    /* never hand out the same page twice: start past what was handed out */
    int64_t from = q + s->stride;
    if (s->stride > 0 ? s->next > from : s->next < from)
        from = s->next;
    s->next = from;
    if (s->stride > 0 ? target > s->target : target < s->target) {
        s->target = target;
        if (s->stride > 0 ? from <= target : from >= target)
            p->c.windows++;
    }
}

static uint64_t grow(const pc_prefetch *p, uint32_t block, uint64_t w)
{
    w = w ? w * 2 : min_window(p, block);
    return w > max_window(p, block) ? max_window(p, block) : w;
}

static uint64_t shrink(const pc_prefetch *p, uint32_t block, uint64_t w)
{
    w /= 2;
    return w < min_window(p, block) ? min_window(p, block) : w;
}

int pc_pf_request(pc_prefetch *p, uint32_t block, uint64_t page)
{
    if (!p->max_bytes || block >= p->nblocks || page >= p->npages[block])
        return 0;
    int64_t q = (int64_t)page;
    p->c.requests++;
    p->tick++;
    if (test_clear(p, block, q))
        p->c.pages_used += tp(p, block);   /* the guest asked for a page sent ahead: on its way, used */
    pc_pf_stream *near = NULL, *slot = NULL;
    int64_t near_dist = 0;
    for (int i = 0; i < PC_PF_STREAMS; i++) {
        pc_pf_stream *s = &p->st[i];
        if (!s->active) {
            if (!slot || slot->active)
                slot = s;
            continue;
        }
        if (!slot || (slot->active && s->used_tick < slot->used_tick))
            slot = s;
        if (s->block != block)
            continue;
        int64_t d = q - s->last;
        if (d == 0) {               /* asked again: nothing new */
            s->used_tick = p->tick;
            return 0;
        }
        if (s->stride && d % s->stride == 0 && d / s->stride > 0) {
            int64_t k = d / s->stride;
            int64_t reach = s->confirmed ? (s->target - s->last) / s->stride + 1 : 1;
            if (k <= reach) {       /* a hit: the guest walks the line, inside what was sent for it */
                if (s->confirmed)
                    passed(p, s, s->last, q);
                s->window = s->confirmed ? grow(p, block, s->window) : min_window(p, block);
                s->confirmed = 1;
                s->last = q;
                s->used_tick = p->tick;
                extend(p, s, q);
                p->c.hits++;
                return 1;
            }
            if (s->confirmed && k <= reach + (int64_t)s->window) {
                /* further along the line: the guest skipped pages sent for it */
                s->window = shrink(p, block, s->window);
                s->last = q;
                s->used_tick = p->tick;
                extend(p, s, q);
                p->c.misses++;
                return 0;
            }
        }
        int64_t dist = d < 0 ? -d : d;
        if (dist <= PC_PF_MAX_STRIDE && !s->confirmed && (!near || dist < near_dist)) {
            near = s;
            near_dist = dist;
        }
    }
    p->c.misses++;
    if (near) {                     /* a candidate stride: trusted when the next request follows it */
        near->stride = q - near->last;
        near->last = q;
        near->target = q;
        near->next = q + near->stride;
        near->used_tick = p->tick;
        return 0;
    }
    *slot = (pc_pf_stream){ .active = 1, .block = block, .last = q, .target = q, .next = q,
                            .used_tick = p->tick };
    return 0;
}

static int due(const pc_prefetch *p, const pc_pf_stream *s)
{
    return s->active && s->confirmed && (s->stride > 0 ? s->next <= s->target : s->next >= s->target) &&
           s->next >= 0 && (uint64_t)s->next < p->npages[s->block];
}

int pc_pf_pending(const pc_prefetch *p)
{
    for (int i = 0; i < PC_PF_STREAMS; i++)
        if (due(p, &p->st[i]))
            return 1;
    return 0;
}

int pc_pf_next(pc_prefetch *p, uint32_t *block, uint64_t *page)
{
    for (int n = 0; n < PC_PF_STREAMS; n++) {
        pc_pf_stream *s = &p->st[p->rr];
        p->rr = (p->rr + 1) % PC_PF_STREAMS;
        if (!due(p, s))
            continue;
        *block = s->block;
        *page = (uint64_t)s->next;
        s->next += s->stride;
        p->c.pages_due += tp(p, s->block);
        return 1;
    }
    return 0;
}

void pc_pf_mark_sent(pc_prefetch *p, uint32_t block, uint64_t page)
{
    if (block >= p->nblocks || page >= p->npages[block])
        return;
    p->sent[block][page / 64] |= 1ull << (page % 64);
    p->c.pages_sent += tp(p, block);
}

void pc_pf_unmark_sent(pc_prefetch *p, uint32_t block, uint64_t page)
{
    if (block >= p->nblocks || page >= p->npages[block])
        return;
    if (test_clear(p, block, (int64_t)page))
        p->c.pages_sent -= tp(p, block);
}

int pc_pf_zone(const pc_prefetch *p, int i, uint32_t *block, uint64_t *lo, uint64_t *hi)
{
    if (i < 0 || i >= PC_PF_STREAMS)
        return 0;
    const pc_pf_stream *s = &p->st[i];
    /* A strided walker touches one host page in |stride|: the prefetch sends only those, so the
     * pages between must stay the bulk stream's (left to it, they waited for its next pass). */
    if (!s->active || !s->confirmed || (s->stride != 1 && s->stride != -1))
        return 0;
    int64_t npages = (int64_t)p->npages[s->block];
    int64_t beyond = s->target + (int64_t)s->window * s->stride;    /* one more window past what is due */
    int64_t near = s->stride > 0 ? s->last : beyond, far = s->stride > 0 ? beyond : s->last;
    if (near < 0)
        near = 0;
    if (far > npages - 1)
        far = npages - 1;
    if (near > far)
        return 0;
    *block = s->block;
    *lo = (uint64_t)near;
    *hi = (uint64_t)far + 1;
    return 1;
}
