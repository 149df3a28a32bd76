/* Prefetch that follows the guest: a detector of sequential and strided
 * page-request streams, with no I/O (the source's return-path thread drives
 * it; tests drive it directly).
 *
 * Every page request (pc_pf_request) is matched against a small table of
 * recent streams, one per vCPU-like walker. A stream remembers the host page
 * of its last request and a stride (host pages, either sign). A request that
 * lands on the stream's line, at most one step past what was already sent
 * ahead, is a hit: the window (host pages sent ahead of the last request)
 * doubles up to the cap and the pages up to last + stride * window become due.
 * A request further along the line, less than a window past what was sent
 * (the guest skipped pages sent for it), halves the window; a request that matches no stream re-anchors a nearby
 * stream with a new candidate stride or takes the least recently used slot.
 * A stride is trusted once two requests in a row confirm it.
 *
 * pc_pf_next hands out the due pages round-robin over the streams; the caller
 * sends those it can claim (a page already sent is skipped) and reports them
 * with pc_pf_mark_sent. A page sent ahead counts as used when a later request
 * of its stream goes past it (or a request asks for it): the guest walked
 * through it. What is never passed is the waste estimate (an upper bound:
 * a guest that walks on without faulting leaves no trace).
 *
 * Not thread-safe: one thread owns a pc_prefetch. */
#ifndef PC_PREFETCH_H
#define PC_PREFETCH_H

#include <stdint.h>

#define PC_PF_STREAMS 8
#define PC_PF_MAX_STRIDE 64         /* host pages: farther apart, two requests are not one stream */

typedef struct pc_pf_stream {
    int active, confirmed;
    uint32_t block;
    int64_t last;                   /* host page of the last request */
    int64_t stride;                 /* host pages between requests (0: not known yet) */
    int64_t target;                 /* last host page due (on the line); last when nothing is */
    int64_t next;                   /* next host page to hand out */
    uint64_t window;                /* host pages sent ahead of the last request */
    uint64_t used_tick;             /* for least-recently-used replacement */
} pc_pf_stream;

typedef struct pc_pf_counters {   /* pages: 4 KiB target pages */
    uint64_t requests;              /* requests seen */
    uint64_t hits;                  /* requests a stream predicted */
    uint64_t misses;                /* requests no stream predicted (new, re-anchored or jumped) */
    uint64_t windows;               /* hits that made new pages due */
    uint64_t pages_due;             /* pages handed out by pc_pf_next */
    uint64_t pages_sent;            /* pages sent ahead (pc_pf_mark_sent) */
    uint64_t pages_used;            /* sent ahead, then passed or asked for by the guest */
} pc_pf_counters;

typedef struct pc_prefetch {
    pc_pf_stream st[PC_PF_STREAMS];
    uint32_t nblocks;
    uint64_t *npages;               /* per block: host pages */
    uint64_t *page_size;            /* per block: bytes per host page */
    uint64_t **sent;                /* per block: one bit per host page sent ahead and not used yet */
    uint64_t min_bytes, max_bytes;  /* window bounds; max 0 = off */
    uint64_t tick;
    uint32_t rr;                    /* round-robin position of pc_pf_next */
    pc_pf_counters c;
} pc_prefetch;

/* 0 or -ENOMEM. Off (max_window 0) until pc_pf_configure. */
int pc_pf_init(pc_prefetch *p, uint32_t nblocks);
void pc_pf_release(pc_prefetch *p);
/* Block i has npages host pages of page_size bytes. 0, -ERANGE, -ENOMEM. */
int pc_pf_set_block(pc_prefetch *p, uint32_t i, uint64_t npages, uint64_t page_size);
/* Window bounds in bytes (at least one host page each); max_bytes 0 turns prefetch off. */
void pc_pf_configure(pc_prefetch *p, uint64_t min_bytes, uint64_t max_bytes);
/* Forget the streams (after a reconnection); counters and marks stay. */
void pc_pf_reset(pc_prefetch *p);
/* A page request for host page `page` of block `block`. Returns 1 on a hit. */
int pc_pf_request(pc_prefetch *p, uint32_t block, uint64_t page);
/* 1 and the next host page to send ahead, or 0 when nothing is due. */
int pc_pf_next(pc_prefetch *p, uint32_t *block, uint64_t *page);
/* 1 when pages are due (pc_pf_next would give one). */
int pc_pf_pending(const pc_prefetch *p);
/* The page pc_pf_next gave was sent ahead (the caller claimed it). */
void pc_pf_mark_sent(pc_prefetch *p, uint32_t block, uint64_t page);
/* Stream i's zone: the host pages [*lo, *hi) its guest walks next (from its
 * last request to twice the window past it), which the bulk stream leaves to
 * the prefetch. 1, or 0 when stream i follows nothing or walks with a stride
 * other than +-1 (the prefetch sends only the pages on its line). */
int pc_pf_zone(const pc_prefetch *p, int i, uint32_t *block, uint64_t *lo, uint64_t *hi);
/* The page could not be sent after all: it no longer counts as sent ahead. */
void pc_pf_unmark_sent(pc_prefetch *p, uint32_t block, uint64_t page);

#endif
