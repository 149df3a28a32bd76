/* A receive buffer over a blocking socket, shared by the destination's
 * channel receivers and the source's return-path reader: C parses what it
 * can in place, and Python gets the exact bytes of control messages. */
#ifndef PC_SOCKBUF_H
#define PC_SOCKBUF_H

#include <stdint.h>

#define PC_SOCKBUF_ARRIVALS 16

typedef struct pc_sockbuf_arrival {
    uint64_t end;               /* sb->bytes after a receive */
    uint64_t ns;                /* when what it brought came in */
    uint64_t stamp;             /* the kernel's receive stamp as given (0: none): equal ones are one segment */
} pc_sockbuf_arrival;

typedef struct pc_sockbuf {
    int fd;
    uint8_t *buf;
    uint64_t cap, head, tail;   /* unread bytes are buf[head..tail) */
    uint64_t bytes;             /* received in total */
    uint64_t limit;             /* the buffer never grows beyond this */
    uint64_t spin_until_ns;     /* before this (pc_now_ns), wait for data on a CPU, not asleep */
    uint64_t linger_ns;         /* and each receive that finds no data waits this long on the CPU */
    uint64_t small_until_ns;    /* before this (pc_now_ns), a receive reads only what is asked for */
    int arrival_stamps;         /* set by pc_sockbuf_stamp_arrivals */
    pc_sockbuf_arrival arrivals[PC_SOCKBUF_ARRIVALS];  /* the last receives (a ring), pc_now_ns's clock */
    uint64_t nreceives;         /* receives recorded: those of one segment (one kernel stamp) count once */
} pc_sockbuf;

/* Until deadline_ns (pc_now_ns), a receive on sb waits for data on its CPU (polling,
 * yielding to whatever else is runnable there) instead of asleep: a thread woken here
 * on an idle (virtual) CPU waits 50-100 us typically and over 1 ms now and then. For
 * the few ms around a switch, where every wake-up is downtime. Any thread may set it. */
void pc_sockbuf_spin_until(pc_sockbuf *sb, uint64_t deadline_ns);

/* From now on, a receive that finds no data waits for it on its CPU up to ns (as the spin
 * above) before it sleeps (0: sleeps at once). For a stream's receiver, set by its own thread:
 * between a stream's segments the thread would otherwise sleep and be woken for the next one,
 * and where idle CPUs halt (a VM) that wake-up costs more than the segment (docs/design.md). */
void pc_sockbuf_linger(pc_sockbuf *sb, uint64_t ns);

/* Until deadline_ns (pc_now_ns; 0 ends it now), a receive reads only the bytes a fill asks
 * for (PC_SOCKBUF_SMALL_READ at most when it asks for none): TCP gives a receive the arrival
 * time of the last segment it read, so a message read together with one that came after it
 * would take that one's time. For the return path while a switch's last PONG is awaited,
 * whose arrival ends the downtime. Any thread may set it. */
#define PC_SOCKBUF_SMALL_READ 4
void pc_sockbuf_small_reads_until(pc_sockbuf *sb, uint64_t deadline_ns);

int pc_sockbuf_init(pc_sockbuf *sb, int fd, uint64_t cap, uint64_t limit);   /* 0 or -ENOMEM */
void pc_sockbuf_release(pc_sockbuf *sb);
/* From now on, a receive's arrival is when the kernel took in the last bytes it returned
 * (SO_TIMESTAMPNS), not when the receive ran: a reader busy elsewhere while a message came
 * in still knows when it came. 0, or -errno (arrivals are then the receives' times). */
int pc_sockbuf_stamp_arrivals(pc_sockbuf *sb);
/* When the byte at `offset` (counted as sb->bytes counts: pc_sockbuf_offset gives the unread
 * bytes' first) came in: the arrival of the receive that brought it, or of the oldest of the last
 * PC_SOCKBUF_ARRIVALS receives if it came before them (later than it came, never earlier). */
uint64_t pc_sockbuf_arrival_of(const pc_sockbuf *sb, uint64_t offset);
/* The offset of the first unread byte (not for a buffer given bytes back with pc_sockbuf_unread). */
static inline uint64_t pc_sockbuf_offset(const pc_sockbuf *sb) { return sb->bytes - (sb->tail - sb->head); }
/* Wait (on the CPU) until sb's socket is readable or its spin deadline (or linger) passes. */
void pc_sockbuf_spin(pc_sockbuf *sb);
/* One recv(): >0 bytes received, 0 at EOF, -errno. */
int64_t pc_sockbuf_recv(pc_sockbuf *sb);
/* Wait until at least n bytes are unread: returns how many are, 0 at EOF
 * before that, or -errno (-EMSGSIZE past the limit). */
int64_t pc_sockbuf_fill(pc_sockbuf *sb, uint64_t n);
void pc_sockbuf_consume(pc_sockbuf *sb, uint64_t n);
/* Put bytes back in front of the unread ones. */
int pc_sockbuf_unread(pc_sockbuf *sb, const uint8_t *data, uint64_t n);
/* Make the buffer at least cap bytes (unread bytes kept): 0, -EMSGSIZE past the limit, -ENOMEM. */
int pc_sockbuf_grow(pc_sockbuf *sb, uint64_t cap);
/* Room for n more bytes at the end: a pointer to it (fill it, then
 * pc_sockbuf_commit), or NULL (the limit, or no memory). */
uint8_t *pc_sockbuf_reserve(pc_sockbuf *sb, uint64_t n);
static inline void pc_sockbuf_commit(pc_sockbuf *sb, uint64_t n) { sb->tail += n; }
static inline uint64_t pc_sockbuf_avail(const pc_sockbuf *sb) { return sb->tail - sb->head; }
static inline const uint8_t *pc_sockbuf_data(const pc_sockbuf *sb) { return sb->buf + sb->head; }

#endif
