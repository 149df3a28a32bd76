#define _GNU_SOURCE
#include "sockbuf.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "core.h"

int pc_sockbuf_init(pc_sockbuf *sb, int fd, uint64_t cap, uint64_t limit)
{
    memset(sb, 0, sizeof(*sb));
    sb->fd = fd;
    sb->cap = cap;
    sb->limit = limit < cap ? cap : limit;
    sb->buf = malloc(cap);
    return sb->buf ? 0 : -ENOMEM;
}

void pc_sockbuf_release(pc_sockbuf *sb)
{
    free(sb->buf);
    sb->buf = NULL;
}

/* Room for `need` more bytes at the end: compact first, grow if must. */
static int make_room(pc_sockbuf *sb, uint64_t need)
{
    if (sb->head && (sb->cap - sb->tail < need || sb->head > sb->cap / 2)) {
        memmove(sb->buf, sb->buf + sb->head, sb->tail - sb->head);
        sb->tail -= sb->head;
        sb->head = 0;
    }
    if (sb->cap - sb->tail >= need)
        return 0;
    uint64_t cap = sb->cap;
    while (cap - sb->tail < need)
        cap *= 2;
    return pc_sockbuf_grow(sb, cap);
}

void pc_sockbuf_spin_until(pc_sockbuf *sb, uint64_t deadline_ns)
{
    __atomic_store_n(&sb->spin_until_ns, deadline_ns, __ATOMIC_RELAXED);
}

void pc_sockbuf_linger(pc_sockbuf *sb, uint64_t ns)
{
    sb->linger_ns = ns;
}

void pc_sockbuf_spin(pc_sockbuf *sb)
{
    if (!__atomic_load_n(&sb->spin_until_ns, __ATOMIC_RELAXED) && !sb->linger_ns)
        return;
    struct pollfd pfd = { sb->fd, POLLIN, 0 };
    uint64_t now = pc_now_ns(), lingered = sb->linger_ns ? now + sb->linger_ns : 0;
    while (now < lingered || now < __atomic_load_n(&sb->spin_until_ns, __ATOMIC_RELAXED)) {
        if (poll(&pfd, 1, 0) != 0)
            return;     /* readable, closed, or an error the receive reports */
        sched_yield();
        now = pc_now_ns();
    }
}

int pc_sockbuf_stamp_arrivals(pc_sockbuf *sb)
{
    int on = 1;
    if (setsockopt(sb->fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on)) < 0)
        return -errno;
    sb->arrival_stamps = 1;
    return 0;
}

/* The kernel's receive time (CLOCK_REALTIME) of the last bytes msg brought, on pc_now_ns's clock;
 * received_ns (when the receive returned) if it carries none or one from the future. *stamp: the
 * kernel's time as it gave it (ns), 0 without one. */
static uint64_t arrival_ns(struct msghdr *msg, uint64_t received_ns, uint64_t *stamp)
{
    *stamp = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_TIMESTAMPNS)
            continue;
        struct timespec at, now;
        memcpy(&at, CMSG_DATA(c), sizeof(at));
        clock_gettime(CLOCK_REALTIME, &now);
        *stamp = (uint64_t)at.tv_sec * 1000000000u + (uint64_t)at.tv_nsec;
        int64_t ago = (int64_t)(now.tv_sec - at.tv_sec) * 1000000000 + (now.tv_nsec - at.tv_nsec);
        if (ago >= 0 && (uint64_t)ago < received_ns)
            return received_ns - (uint64_t)ago;
    }
    return received_ns;
}

uint64_t pc_sockbuf_arrival_of(const pc_sockbuf *sb, uint64_t offset)
{
    uint64_t kept = sb->nreceives < PC_SOCKBUF_ARRIVALS ? sb->nreceives : PC_SOCKBUF_ARRIVALS;
    if (!kept)
        return pc_now_ns();     /* nothing received yet */
    uint64_t ns = sb->arrivals[(sb->nreceives - 1) % PC_SOCKBUF_ARRIVALS].ns;
    for (uint64_t k = 1; k <= kept; k++) {     /* newest first: each brought (the older's end, its end] */
        const pc_sockbuf_arrival *a = &sb->arrivals[(sb->nreceives - k) % PC_SOCKBUF_ARRIVALS];
        if (a->end <= offset)
            break;
        ns = a->ns;
    }
    return ns;
}

void pc_sockbuf_small_reads_until(pc_sockbuf *sb, uint64_t deadline_ns)
{
    __atomic_store_n(&sb->small_until_ns, deadline_ns, __ATOMIC_RELAXED);
}

static int small_reads(const pc_sockbuf *sb)
{
    uint64_t until = __atomic_load_n(&sb->small_until_ns, __ATOMIC_RELAXED);
    return until && pc_now_ns() < until;
}

/* One recvmsg of at most `most` bytes (0: as much as fits). */
static int64_t recv_upto(pc_sockbuf *sb, uint64_t most)
{
    uint64_t want = sb->cap / 4 < 65536 ? sb->cap / 4 : 65536;
    if (most && want > most)
        want = most;
    int rc = make_room(sb, want);
    if (rc < 0)
        return rc;
    pc_sockbuf_spin(sb);
    for (;;) {
        uint64_t room = sb->cap - sb->tail;
        struct iovec iov = { sb->buf + sb->tail, most && room > most ? most : room };
        union { char buf[CMSG_SPACE(sizeof(struct timespec))]; struct cmsghdr align; } control;
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
        if (sb->arrival_stamps) {
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof(control.buf);
        }
        ssize_t n = recvmsg(sb->fd, &msg, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        sb->tail += (uint64_t)n;
        uint64_t end = __atomic_add_fetch(&sb->bytes, (uint64_t)n, __ATOMIC_RELAXED);
        if (n > 0) {
            uint64_t stamp = 0, ns = sb->arrival_stamps ? arrival_ns(&msg, pc_now_ns(), &stamp) : pc_now_ns();
            pc_sockbuf_arrival *last = sb->nreceives ? &sb->arrivals[(sb->nreceives - 1) % PC_SOCKBUF_ARRIVALS] : NULL;
            if (last && stamp && last->stamp == stamp)
                last->end = end;    /* the same segment read in parts: one arrival, the ring keeps older ones */
            else
                sb->arrivals[sb->nreceives++ % PC_SOCKBUF_ARRIVALS] = (pc_sockbuf_arrival){ end, ns, stamp };
        }
        return n;
    }
}

int64_t pc_sockbuf_recv(pc_sockbuf *sb)
{
    return recv_upto(sb, small_reads(sb) ? PC_SOCKBUF_SMALL_READ : 0);
}

int64_t pc_sockbuf_fill(pc_sockbuf *sb, uint64_t n)
{
    if (pc_sockbuf_avail(sb) < n) {
        int rc = make_room(sb, n - pc_sockbuf_avail(sb));
        if (rc < 0)
            return rc;
    }
    while (pc_sockbuf_avail(sb) < n) {
        int64_t r = recv_upto(sb, small_reads(sb) ? n - pc_sockbuf_avail(sb) : 0);
        if (r <= 0)
            return r;
    }
    return (int64_t)pc_sockbuf_avail(sb);
}

void pc_sockbuf_consume(pc_sockbuf *sb, uint64_t n)
{
    sb->head += n < pc_sockbuf_avail(sb) ? n : pc_sockbuf_avail(sb);
}

int pc_sockbuf_unread(pc_sockbuf *sb, const uint8_t *data, uint64_t n)
{
    if (n <= sb->head) {
        sb->head -= n;
        memcpy(sb->buf + sb->head, data, n);
        return 0;
    }
    int rc = make_room(sb, n);
    if (rc < 0)
        return rc;
    memmove(sb->buf + sb->head + n, sb->buf + sb->head, pc_sockbuf_avail(sb));
    memcpy(sb->buf + sb->head, data, n);
    sb->tail += n;
    return 0;
}

int pc_sockbuf_grow(pc_sockbuf *sb, uint64_t cap)
{
    if (cap <= sb->cap)
        return 0;
    if (cap > sb->limit)
        return -EMSGSIZE;
    uint8_t *nb = realloc(sb->buf, cap);
    if (!nb)
        return -ENOMEM;
    sb->buf = nb;
    sb->cap = cap;
    return 0;
}

uint8_t *pc_sockbuf_reserve(pc_sockbuf *sb, uint64_t n)
{
    return make_room(sb, n) < 0 ? NULL : sb->buf + sb->tail;
}
