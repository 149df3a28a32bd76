/* Source data path, in C threads with the GIL released:
 *  - pc_src_bulk_run: the background stream. It walks the dirty bitmaps,
 *    claims one host page at a time (so a page goes out once) and writes
 *    "ram" PART sections on the main channel, under an optional bandwidth cap.
 *  - pc_src_rp_run: the return-path reader. Page requests are served right
 *    here: with preempt, the requested host page is written on the preempt
 *    channel at once (never behind the bulk stream or its cap); without, it is
 *    queued for the bulk sender, which sends it before its next batch and
 *    while it waits for the cap. Other messages go back to Python.
 *    Requests are read on the preempt channel's way back too (our destination
 *    sends them there once told: PREEMPT_REQUESTS_PING): the return path is the
 *    main channel's socket, whose lock the bulk stream holds through each send,
 *    so a request read there waits for it (p50 ~60 us on loopback).
 *    With prefetch on (and preempt), each request also feeds a stream
 *    detector (prefetch.h): the pages it expects next are sent ahead on the
 *    preempt channel, in small chunks between requests (a request waiting on
 *    the return path is always served first) and only while the preempt
 *    socket's send queue is short. A page sent ahead is claimed as any other:
 *    never sent twice. */
#ifndef PC_SOURCE_H
#define PC_SOURCE_H

#include <pthread.h>
#include <stdint.h>

#include "bitmap.h"
#include "prefetch.h"
#include "sockbuf.h"

#define PC_SRC_QUEUE 4096
/* Heartbeat PING values: the top half says "ours"; QEMU's own PINGs are 1..4 and 0x42. */
#define PC_HEARTBEAT_PING 0x50430000u
#define PC_HEARTBEAT_MASK 0xffff0000u

typedef struct pc_src_block {
    uint64_t base, length, host_page_size;
    pc_bitmap *dirty;               /* one bit per target page: still to send */
    pc_bitmap *discarded;           /* precopy switch: discarded before the guest stopped (NULL: none) */
    uint64_t *main_end;             /* per host page: main-channel byte count once it is queued there, 0 = not */
    uint32_t idlen;
    char idstr[256];
} pc_src_block;

typedef struct pc_src_chan {
    pthread_mutex_t lock;
    int fd;                         /* -1 when absent or broken */
    int64_t last_block;             /* idstr/CONTINUE context of this channel */
    uint64_t conn_base;             /* bytes counted before this connection */
    uint64_t pages_normal, pages_zero, bytes;
} pc_src_chan;

enum { PC_CHAN_MAIN = 0, PC_CHAN_PREEMPT = 1 };

typedef struct pc_src_counters {
    uint64_t requests, request_pages_sent, request_pages_skipped, requests_queued, bad_requests, host_pages_sent;
    uint64_t resent_target_pages;   /* requested after the bulk took them on this connection: sent again on preempt */
    uint64_t hot_pages_sent;        /* target pages the postcopy bulk stream sent first as the hot set */
    uint64_t hot_pages_recorded;    /* target pages recorded (pc_src_record_hot) */
    uint64_t hot_pages_preempt;     /* of hot_pages_sent: pushed on the preempt channel between requests */
    uint64_t bulk_pauses;           /* times the bulk stream stood aside for urgent pages (preempt) */
    uint64_t bulk_pause_ns;         /* time it spent so */
    uint64_t bulk_pauses_capped;    /* of bulk_pauses: ended by its bound (PC_SRC_PAUSE_MAX_NS or its credit), not by the urgent work */
    uint64_t requests_preempt;      /* of requests: read on the preempt channel's way back */
} pc_src_counters;

/* Preempt: while requested pages are being served (urgent > 0), their bytes are
 * still in this host's send queue (preempt bytes sent below urgent_end), or
 * were written less than PC_SRC_PLACE_NS_PER_MIB per MiB of the host page ago
 * (the destination places them), the bulk stream stands aside between its
 * batches (and between the 256 KiB parts of a huge page), at most
 * PC_SRC_PAUSE_MAX_NS at a time and no longer than it ran since its last pause
 * (never starved: it runs at least half the time). */
#define PC_SRC_PLACE_NS_PER_MIB 250000ull
#define PC_SRC_PAUSE_MAX_NS 3000000ull
#define PC_SRC_PAUSE_POLL_NS 50000ull

/* A run of target pages of one block (hot sets: pushed first, or recorded). */
typedef struct pc_src_range {
    uint64_t block, first, npages;
} pc_src_range;

typedef struct pc_src {
    uint32_t nblocks;
    pc_src_block *blocks;
    pc_src_chan chan[2];
    uint32_t ram_section_id;
    int preempt;                    /* requested pages go on the preempt channel */
    int send_once;                  /* never send a host page twice (QEMU's destination fails on EEXIST) */
    uint64_t bandwidth_cap;         /* bulk bytes per second, 0 = unlimited */
    uint64_t section_bytes;         /* bulk data per PART section */
    uint64_t heartbeat_ns;          /* between sections, a PING at least this often (0 = never) */
    uint32_t ping_seq;              /* heartbeat PINGs carry PC_HEARTBEAT_PING | seq */
    uint64_t ping_sent_ns;          /* when the last heartbeat went out */
    /* requested host pages waiting for the bulk sender (no preempt) */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    struct { uint32_t block; uint64_t host_off; } queue[PC_SRC_QUEUE];
    uint64_t qhead, qtail;
    uint32_t cursor_block;
    uint64_t cursor_page;
    int stop;
    int round_mode;                 /* precopy: one pass over the bitmaps, then PC_TX_DONE */
    int round_end;                  /* precopy: end the pass now (PC_TX_STOPPED) */
    /* return path */
    pc_sockbuf rp;
    int rp_ready;
    int64_t rp_block;               /* block named by the last REQ_PAGES_ID */
    /* page requests on the preempt channel's way back (the return-path thread's own) */
    pc_sockbuf req;
    int req_fd;                     /* the preempt channel read (-1: none yet, or it ended) */
    int req_ended;                  /* this connection's ended: requests come on the return path only */
    int64_t req_block;              /* as rp_block, for this way */
    uint64_t rp_control_ns;         /* when the control message pc_src_rp_run last returned for came in
                                     * (PONG 3: the downtime's end) */
    struct batch *preempt_batch;    /* requested and sent-ahead pages' writev (under chan[PREEMPT].lock),
                                     * made and touched with the source: not at the started guest's first fault */
    int err_errno;
    char err_msg[256];
    pc_src_counters c;
    uint32_t urgent;                /* requests being served on the preempt channel (return-path thread) */
    uint64_t urgent_end;            /* preempt byte count (incl. conn_base) the last urgent page ends at */
    uint64_t urgent_ns;             /* when it was written (urgent_end counts no longer than PC_SRC_PAUSE_MAX_NS) */
    uint64_t urgent_grace_ns;       /* after it was written, the destination is placing it this long */
    uint64_t pause_credit_ns;       /* bulk thread: how long it may pause now (grows as it runs) */
    uint64_t pause_last_ns;         /* bulk thread: when it last looked (0: not yet) */
    pc_prefetch pf;                 /* the return-path thread's; pc_src_restart forgets its streams */
    /* Where the prefetch streams go next (target pages [lo, hi) of a block),
     * published by the return-path thread for the bulk stream, which leaves
     * them to the prefetch until `until_ns` (a stream that stops asking
     * loses its zone soon). */
    struct { uint32_t block; uint64_t lo, hi, until_ns; } zone[PC_PF_STREAMS];
    /* Hot set (pc_src_set_hot): once the postcopy bulk stream runs, it sends these
     * first, in order (hot_pos/off: its cursor) and, with preempt, the return-path
     * thread pushes them too, between requests (rp_hot_pos/off); each page goes once. */
    pc_src_range *hot;
    uint64_t nhot, hot_pos, hot_off, rp_hot_pos, rp_hot_off;
    int hot_armed;                  /* a page request came on this connection: the guest runs there (rp thread) */
    /* Recording (pc_src_record_hot): the pages requested or sent ahead, as runs in
     * the order of their first request (return-path thread; rec_lock for readers). */
    pthread_mutex_t rec_lock;
    pc_bitmap **rec_seen;           /* per block, per host page: recorded already (NULL: not recording) */
    pc_src_range *rec;
    uint64_t nrec, rec_cap;
} pc_src;

pc_src *pc_src_new(uint32_t nblocks, uint32_t ram_section_id);
void pc_src_free(pc_src *s);
int pc_src_set_block(pc_src *s, uint32_t i, const char *idstr, uint32_t idlen, uint64_t base, uint64_t length,
                     uint64_t host_page_size, pc_bitmap *dirty);
/* Make every host page all-dirty or all-clean, as QEMU does at the switch. */
void pc_src_canonicalize(pc_src *s);
/* fd -1 detaches; a new channel starts with no idstr context. */
void pc_src_set_channel(pc_src *s, int ch, int fd);
void pc_src_set_rp(pc_src *s, int fd);
void pc_src_configure(pc_src *s, int preempt, uint64_t bandwidth_cap, uint64_t section_bytes);
/* once: a requested page the bulk stream already took is not sent again on the preempt channel,
 * however long it waits in the socket queue (a QEMU destination fails on a second copy). */
void pc_src_set_send_once(pc_src *s, int once);
void pc_src_set_heartbeat(pc_src *s, uint64_t interval_ns);
/* Prefetch windows in bytes (max_bytes 0 = off, the default). Set before the
 * return-path thread runs. Needs preempt: without it, nothing is sent ahead. */
void pc_src_set_prefetch(pc_src *s, uint64_t min_bytes, uint64_t max_bytes);
/* Hot set: the postcopy bulk stream (not precopy rounds) sends the dirty host
 * pages of these runs first, in this order, then walks the bitmaps as usual;
 * with preempt, the return-path thread also pushes them on the preempt channel
 * as it sends ahead for the prefetch (after the prefetch's pages, between
 * requests, while the socket's queue is short, not under the bandwidth cap).
 * Runs are in target pages; n 0 clears. 0, -ERANGE (a run outside its block), -ENOMEM.
 * Before the bulk stream runs; pc_src_restart goes through the list again. */
int pc_src_set_hot(pc_src *s, const pc_src_range *runs, uint64_t n);
/* Record the host pages requested (and sent ahead by the prefetch), each once, as
 * runs of target pages in the order of their first request. 0 or -ENOMEM. */
int pc_src_record_hot(pc_src *s, int on);
/* Copy up to max recorded runs into out; returns how many there are. */
uint64_t pc_src_hot_recorded(pc_src *s, pc_src_range *out, uint64_t max);
void pc_src_stop(pc_src *s);
/* After a pause: clear the stop flag, rewind the background scan to the
 * start and forget queued requests (the destination sends them again). */
void pc_src_restart(pc_src *s);
/* Recovery: the dirty bitmap of block i becomes the complement of the
 * destination's received bitmap (QEMU's LE layout); host pages canonical.
 * 0, -EINVAL (bad size or padding), -ERANGE (no such block). */
int pc_src_reload_dirty(pc_src *s, uint32_t i, const uint8_t *received_le, uint64_t len);
/* Locked write of whole messages for Python (commands, END, EOF). */
int pc_src_chan_write(pc_src *s, int ch, const uint8_t *data, uint64_t len);
/* Write the last bytes of a channel (the preempt EOS) and close it to
 * further writes, atomically with respect to the request server. */
int pc_src_chan_finish(pc_src *s, int ch, const uint8_t *data, uint64_t len);


enum {
    PC_TX_DONE = 0,         /* nothing dirty is left */
    PC_TX_STOPPED = 1,
    PC_TX_E_IO = -1,        /* a write failed: err_errno */
};
int pc_src_bulk_run(pc_src *s);
/* The same, from a thread that first sets its own nice value: lowered here, in C, the thread
 * never holds the GIL at background priority (a preempted holder would stall the switch). */
int pc_src_bulk_run_niced(pc_src *s, int nice);
/* Preempt: 1 when urgent pages are in flight (the bulk stream would stand aside now). */
int pc_src_urgent_pending(pc_src *s);
/* Precopy rounds: with round_mode on, the next pc_src_bulk_run starts at the
 * first page, makes one pass over the dirty bitmaps (what the last scan
 * found) and returns PC_TX_DONE; pc_src_end_round makes it return
 * PC_TX_STOPPED at its next batch (the session switches over). Off: the
 * postcopy stream, which looks again until nothing is dirty. */
void pc_src_set_round_mode(pc_src *s, int on);
/* The next round goes on from where an ended one stopped (a sync period cut
 * the pass): it returns PC_TX_DONE at the end of the pass. */
void pc_src_resume_round(pc_src *s);
void pc_src_end_round(pc_src *s);
/* QEMU's MAX_DISCARDS_PER_COMMAND */
#define PC_SRC_DISCARDS_PER_CMD 12
/* Switchover: on the main channel, POSTCOPY_RAM_DISCARD commands for every
 * run of dirty host pages of every block (QEMU's encoding: byte ranges, at
 * most 12 per command, one block per command). Returns the number of ranges
 * or -errno. Hosts pages must be canonical (pc_src_canonicalize).
 * flags: PC_SRC_DISCARD_REMEMBER (guest still running, no round after it):
 * remember the pages discarded; PC_SRC_DISCARD_NEW_ONLY (guest stopped):
 * only the dirty pages not discarded before, then forget what was. */
#define PC_SRC_DISCARD_REMEMBER 1
#define PC_SRC_DISCARD_NEW_ONLY 2
int64_t pc_src_send_discards(pc_src *s, int flags);
/* Guest stopped, before the discards: at most max_ranges of them. When the
 * pages to discard make more runs, whole aligned chunks of 2, 4, ... (at most
 * PC_SRC_COARSEN_MAX_PAGES) target pages are discarded and sent again instead
 * (the destination's cost is per range). Returns the chunk in target pages (1: as they were). */
#define PC_SRC_COARSEN_MAX_PAGES 512
/* ... but never to chunks covering more than this many times the pages to discard. */
#define PC_SRC_COARSEN_MAX_COVER 2
int64_t pc_src_coarsen_discards(pc_src *s, uint64_t max_ranges);
/* The discard ranges the dirty pages make now (runs of dirty pages not discarded before). */
uint64_t pc_src_discard_runs(const pc_src *s);
uint64_t pc_src_dirty_pages(pc_src *s);

enum {
    PC_RP_CONTROL = 1,      /* a message that is not a page request is at the head of s->rp */
    PC_RP_EOF = 2,
    PC_RP_STOPPED = 3,
    PC_RP_BAD_REQUEST = 4,  /* a request outside its block or misaligned: err_msg; it was consumed */
    PC_RP_E_IO = -1,
    PC_RP_E_PROTO = -2,     /* malformed framing: err_msg */
};
int pc_src_rp_run(pc_src *s);

/* Hash every target page of [base, base + npages*4096) into out[]. */
void pc_hash_pages(uint64_t base, uint64_t npages, uint64_t *out);

#endif
