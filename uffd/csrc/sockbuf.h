/* A receive buffer over a blocking socket, shared by the destination's
 * channel receivers and the source's return-path reader: C parses what it
 * can in place, and Python gets the exact bytes of control messages. */
#ifndef PC_SOCKBUF_H
#define PC_SOCKBUF_H

#include <stdint.h>

typedef struct pc_sockbuf {
    int fd;
    uint8_t *buf;
    uint64_t cap, head, tail;   /* unread bytes are buf[head..tail) */
    uint64_t bytes;             /* received in total */
    uint64_t limit;             /* the buffer never grows beyond this */
} pc_sockbuf;

int pc_sockbuf_init(pc_sockbuf *sb, int fd, uint64_t cap, uint64_t limit);   /* 0 or -ENOMEM */
void pc_sockbuf_release(pc_sockbuf *sb);
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
