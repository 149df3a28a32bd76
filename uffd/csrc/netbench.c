/* Physical floors for the migration benchmark: see netbench.h. */
#define _GNU_SOURCE
#include "netbench.h"
#include "core.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define STREAM_SOCKBUF (4u << 20)


/* A connected loopback TCP pair: fds[0] the client end, fds[1] the accepted end. */
static int tcp_pair(int fds[2], int nodelay)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof(a);
    int one = 1, err = 0;
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (l < 0)
        return -errno;
    fds[0] = fds[1] = -1;
    if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &alen))
        goto fail;
    if ((fds[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
        goto fail;
    if (connect(fds[0], (struct sockaddr *)&a, sizeof(a)))
        goto fail;
    if ((fds[1] = accept4(l, NULL, NULL, SOCK_CLOEXEC)) < 0)
        goto fail;
    close(l);
    if (nodelay)
        for (int i = 0; i < 2; i++)
            setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return 0;
fail:
    err = -errno;
    close(l);
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return err ? err : -EIO;
}

/* A loopback TCP pair for a one-way stream, fds[0] -> fds[1], with STREAM_SOCKBUF buffers. */
static int stream_pair(int fds[2])
{
    int rc = tcp_pair(fds, 0), bufsz = STREAM_SOCKBUF;
    if (rc == 0) {
        setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &bufsz, sizeof(bufsz));
        setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &bufsz, sizeof(bufsz));
    }
    return rc;
}

/* 0 once len bytes are written, -errno otherwise. */
static int write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* 1 once len bytes are read, 0 on EOF before any byte, -errno otherwise. */
static int read_all(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, p + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return got ? -EPIPE : 0;
        got += (size_t)n;
    }
    return 1;
}

struct echo {
    int fd;
    uint32_t size;
};

static void *echo_main(void *arg)
{
    struct echo *e = arg;
    uint8_t *buf = malloc(e->size);
    if (buf)
        while (read_all(e->fd, buf, e->size) == 1 && write_all(e->fd, buf, e->size) == 0)
            ;
    free(buf);
    return NULL;
}

int pc_nb_tcp_rtt(uint64_t iters, uint32_t msg_size, uint64_t *lat_ns)
{
    if (msg_size == 0 || msg_size > (1u << 20) || !lat_ns)
        return -EINVAL;
    int fds[2], rc = tcp_pair(fds, 1);
    if (rc < 0)
        return rc;
    uint8_t *buf = calloc(1, msg_size);
    struct echo e = { fds[1], msg_size };
    pthread_t peer;
    if (!buf) {
        rc = -ENOMEM;
    } else if ((rc = -pthread_create(&peer, NULL, echo_main, &e)) == 0) {
        for (uint64_t i = 0; i < iters && rc == 0; i++) {
            uint64_t t0 = pc_now_ns();
            if ((rc = write_all(fds[0], buf, msg_size)) == 0) {
                int r = read_all(fds[0], buf, msg_size);
                rc = r == 1 ? 0 : r == 0 ? -EPIPE : r;
            }
            lat_ns[i] = pc_now_ns() - t0;
        }
        shutdown(fds[0], SHUT_WR); /* EOF ends the peer */
        pthread_join(peer, NULL);
    }
    free(buf);
    close(fds[0]);
    close(fds[1]);
    return rc;
}

struct sender {
    int fd;
    uint32_t chunk;
    uint64_t total;
    int rc;
};

static void *sender_main(void *arg)
{
    struct sender *s = arg;
    uint8_t *buf = malloc(s->chunk);
    if (!buf) {
        s->rc = -ENOMEM;
        shutdown(s->fd, SHUT_WR);
        return NULL;
    }
    memset(buf, 0x5a, s->chunk);        /* touched, so no page faults are timed */
    for (uint64_t left = s->total; left && s->rc == 0;) {
        size_t n = left < s->chunk ? left : s->chunk;
        s->rc = write_all(s->fd, buf, n);
        left -= n;
    }
    shutdown(s->fd, SHUT_WR);
    free(buf);
    return NULL;
}

int pc_nb_tcp_stream(uint64_t total_bytes, uint32_t chunk, uint64_t *elapsed_ns)
{
    if (chunk == 0 || chunk > (64u << 20) || !elapsed_ns)
        return -EINVAL;
    int fds[2], rc = stream_pair(fds);
    if (rc < 0)
        return rc;
    uint8_t *buf = malloc(chunk);
    struct sender s = { fds[0], chunk, total_bytes, 0 };
    pthread_t tx;
    if (!buf) {
        rc = -ENOMEM;
    } else {
        memset(buf, 0, chunk);
        uint64_t t0 = pc_now_ns(), got = 0;
        if ((rc = -pthread_create(&tx, NULL, sender_main, &s)) == 0) {
            for (;;) {
                ssize_t n = read(fds[1], buf, chunk);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0) {
                    rc = n < 0 ? -errno : 0;
                    break;
                }
                got += (uint64_t)n;
            }
            *elapsed_ns = pc_now_ns() - t0;
            pthread_join(tx, NULL);
            if (rc == 0 && s.rc < 0)
                rc = s.rc;
            if (rc == 0 && got != total_bytes)
                rc = -EPIPE;
        }
    }
    free(buf);
    close(fds[0]);
    close(fds[1]);
    return rc;
}

struct remote {
    int uffd, net[2], stop[2];
    uint64_t page_size, src, addr, npages;
    uint8_t *page; /* the handler's receive buffer */
    int handler_rc, server_rc;
};

/* The "source": answers each 16-byte request (offset, length) with the page. */
static void *server_main(void *arg)
{
    struct remote *r = arg;
    uint64_t req[2];
    int rc;
    while ((rc = read_all(r->net[1], req, sizeof(req))) == 1) {
        if (req[0] >= r->npages * r->page_size || req[1] != r->page_size) {
            rc = -ERANGE;
            break;
        }
        if ((rc = write_all(r->net[1], (const void *)(uintptr_t)(r->src + req[0]), r->page_size)) < 0)
            break;
    }
    r->server_rc = rc < 0 ? rc : 0;
    shutdown(r->net[1], SHUT_RDWR);     /* a handler waiting for a reply sees EOF */
    return NULL;
}

/* The "destination": fault -> request -> reply -> UFFDIO_COPY (wakes the
 * faulter). After an error it goes on placing pages without the network, so
 * the faulting thread never stays blocked; the first error is reported. */
static void *handler_main(void *arg)
{
    struct remote *r = arg;
    int rc = 0;
    struct pollfd pfd[2] = { { r->uffd, POLLIN, 0 }, { r->stop[0], POLLIN, 0 } };
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            rc = rc ? rc : -errno;
            break;      /* cannot happen with valid fds; the faulter would hang, so report it loudly */
        }
        if (pfd[1].revents)
            break;
        struct uffd_msg msg;
        ssize_t n = read(r->uffd, &msg, sizeof(msg));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            rc = rc ? rc : -errno;
            break;
        }
        if (n != sizeof(msg) || msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t off = (msg.arg.pagefault.address & ~(r->page_size - 1)) - r->addr;
        uint64_t req[2] = { off, r->page_size };
        if (rc == 0 && (rc = write_all(r->net[0], req, sizeof(req))) == 0) {
            int got = read_all(r->net[0], r->page, r->page_size);
            rc = got == 1 ? 0 : got == 0 ? -EPIPE : got;
        }
        struct uffdio_copy c = { .dst = r->addr + off, .src = (uint64_t)(uintptr_t)r->page, .len = r->page_size };
        if (ioctl(r->uffd, UFFDIO_COPY, &c) != 0 && errno != EEXIST && rc == 0)
            rc = -errno;
    }
    r->handler_rc = rc;
    return NULL;
}

struct faulter {
    uint64_t addr, npages, page_size, first, step;
    uint64_t *lat_ns;
};

static void *faulter_main(void *arg)
{
    const struct faulter *f = arg;
    for (uint64_t i = f->first; i < f->npages; i += f->step) {
        volatile const uint8_t *p = (volatile const uint8_t *)(uintptr_t)(f->addr + i * f->page_size);
        uint64_t t0 = pc_now_ns();
        (void)*p;
        f->lat_ns[i] = pc_now_ns() - t0;
    }
    return NULL;
}

#define NB_MAX_FAULTERS 8
#define NB_MAX_CONNS 4

static void remote_close(struct remote *r)
{
    close(r->net[0]);
    close(r->net[1]);
    free(r->page);
}

int pc_nb_remote_fault(int uffd_fd, uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t src,
                       uint32_t nfaulters, uint32_t nconns, uint64_t *lat_ns)
{
    if (page_size < 4096 || (page_size & (page_size - 1)) || addr % page_size || !npages || !lat_ns ||
        !nfaulters || nfaulters > NB_MAX_FAULTERS || !nconns || nconns > NB_MAX_CONNS)
        return -EINVAL;
    int fl = fcntl(uffd_fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if (nconns > 1 && !(fl & O_NONBLOCK))
        return -EINVAL;     /* a handler that lost the race for a fault would block in read() for good */
    int stop[2];
    if (pipe2(stop, O_CLOEXEC) != 0)
        return -errno;
    struct remote r[NB_MAX_CONNS];
    pthread_t server[NB_MAX_CONNS], handler[NB_MAX_CONNS], faulters[NB_MAX_FAULTERS];
    uint32_t nready = 0, nservers = 0, nhandlers = 0;
    int rc = 0;
    for (; nready < nconns; nready++) {
        r[nready] = (struct remote){ .uffd = uffd_fd, .stop = { stop[0], stop[1] }, .page_size = page_size,
                                     .src = src, .addr = addr, .npages = npages };
        if (!(r[nready].page = aligned_alloc(4096, page_size))) {
            rc = -ENOMEM;
            break;
        }
        memset(r[nready].page, 0, page_size);
        if ((rc = tcp_pair(r[nready].net, 1)) < 0) {
            free(r[nready].page);
            break;
        }
    }
    /* A server and a handler per connection; every handler polls the one userfaultfd (a fault is
     * read by one of them: the others see EAGAIN) and the one stop pipe, whose byte stays unread.
     * Counted as they start: only started threads are joined. */
    while (rc == 0 && nservers < nready && (rc = -pthread_create(&server[nservers], NULL, server_main,
                                                                   &r[nservers])) == 0)
        nservers++;
    while (rc == 0 && nhandlers < nready && (rc = -pthread_create(&handler[nhandlers], NULL, handler_main,
                                                                    &r[nhandlers])) == 0)
        nhandlers++;
    if (rc == 0) {
        struct faulter f[NB_MAX_FAULTERS];
        uint32_t started = 0;
        for (uint32_t t = 0; t < nfaulters; t++) {
            f[t] = (struct faulter){ addr, npages, page_size, t, nfaulters, lat_ns };
            if (nfaulters == 1) {
                faulter_main(&f[t]);            /* on this thread, as before: no thread start in the way */
                continue;
            }
            if ((rc = -pthread_create(&faulters[t], NULL, faulter_main, &f[t])) != 0)
                break;
            started++;
        }
        for (uint32_t t = 0; t < started; t++)
            pthread_join(faulters[t], NULL);
        /* a faulter that could not start leaves its pages missing: the handlers are stopped now,
         * so nothing touches them; rc already says why */
    }
    char x = 1;
    if (write(stop[1], &x, 1) != 1 && rc == 0)
        rc = -errno;
    for (uint32_t i = 0; i < nhandlers; i++) {
        pthread_join(handler[i], NULL);
        if (rc == 0)
            rc = r[i].handler_rc;
    }
    for (uint32_t i = 0; i < nready; i++)
        shutdown(r[i].net[0], SHUT_RDWR);       /* EOF ends its server */
    for (uint32_t i = 0; i < nservers; i++) {
        pthread_join(server[i], NULL);
        if (rc == 0)
            rc = r[i].server_rc;
    }
    for (uint32_t i = 0; i < nready; i++)
        remote_close(&r[i]);
    close(stop[0]);
    close(stop[1]);
    return rc;
}

int64_t pc_nb_copy_batched(int uffd_fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t chunk)
{
    if (!chunk || len % chunk)
        return -EINVAL;
    uint64_t t0 = pc_now_ns();
    for (uint64_t off = 0; off < len;) {
        uint64_t n = len - off < chunk ? len - off : chunk;
        struct uffdio_copy c = { .dst = dst + off, .src = src + off, .len = n };
        if (ioctl(uffd_fd, UFFDIO_COPY, &c) == 0) {
            off += n;
            continue;
        }
        if (errno == EAGAIN && c.copy > 0) {   /* partial copy: go on after it */
            off += (uint64_t)c.copy;
            continue;
        }
        return -errno;
    }
    return (int64_t)(pc_now_ns() - t0);
}

/* ---- the bulk stream's records, sent by copy or by reference (pc_nb_record_stream) ---- */

#define REC_BODY 4096u
#define REC_HDR 8u
#define REC_SIZE (REC_HDR + REC_BODY)
#define REC_PER_SEND 512u               /* a 2 MiB page's records: one sendmsg, as source.c sends them */
#define REC_FLAGS 0x28u                 /* PAGE | CONTINUE */

static uint64_t thread_cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

struct rec_stream {
    int fd, use_splice, verify, rc;     /* use_splice 2: the pages alone, no headers (the best case) */
    const uint8_t *src;
    uint64_t nrec, cpu_ns;
};

/* Build the iovecs of records first..first+n (headers into hdr). */
static void rec_iov(const struct rec_stream *s, uint64_t first, uint64_t n, uint8_t *hdr, struct iovec *iov)
{
    for (uint64_t i = 0; i < n; i++) {
        pc_put_be64(hdr + REC_HDR * i, (first + i) * REC_BODY | REC_FLAGS);
        iov[2 * i] = (struct iovec){ hdr + REC_HDR * i, REC_HDR };
        iov[2 * i + 1] = (struct iovec){ (void *)(s->src + (first + i) * REC_BODY), REC_BODY };
    }
}

static int rec_send_copy(struct rec_stream *s, uint8_t *hdr, struct iovec *iov)
{
    for (uint64_t r = 0; r < s->nrec; r += REC_PER_SEND) {
        uint64_t n = s->nrec - r < REC_PER_SEND ? s->nrec - r : REC_PER_SEND;
        rec_iov(s, r, n, hdr, iov);
        struct iovec *v = iov;
        int cnt = (int)(2 * n);
        while (cnt) {
            struct msghdr m = { .msg_iov = v, .msg_iovlen = (size_t)cnt };
            ssize_t w = sendmsg(s->fd, &m, 0);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                return -errno;
            v = pc_iov_advance(v, &cnt, (size_t)w);
        }
    }
    return 0;
}

/* vmsplice references the pages, it does not copy them: the headers' page must never be
 * written again while a pipe buffer or an skb holds it, so after each splice it is dropped
 * (MADV_DONTNEED) and the next round's headers land on a fresh page. */
static int rec_send_splice(struct rec_stream *s, uint8_t *hdr, struct iovec *iov)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC))
        return -errno;
    int rc = 0;
    long psz = fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    if (psz < 0)
        psz = fcntl(p[1], F_GETPIPE_SZ);
    int bare = s->use_splice == 2;
    uint64_t rec = bare ? REC_BODY : REC_SIZE;
    uint64_t per = psz > 0 ? (uint64_t)psz / 4096 / (bare ? 1 : 2) : 0;    /* a buffer per page, one per header */
    if (per == 0)
        rc = -EINVAL;
    for (uint64_t r = 0; rc == 0 && r < s->nrec; r += per) {
        uint64_t n = s->nrec - r < per ? s->nrec - r : per;
        if (bare)
            iov[0] = (struct iovec){ (void *)(s->src + r * REC_BODY), n * REC_BODY };
        else
            rec_iov(s, r, n, hdr, iov);
        struct iovec *v = iov;
        int cnt = bare ? 1 : (int)(2 * n);
        while (rc == 0 && cnt) {
            ssize_t w = vmsplice(p[1], v, (unsigned long)cnt, 0);
            if (w < 0 && errno != EINTR)
                rc = -errno;
            else if (w > 0)
                v = pc_iov_advance(v, &cnt, (size_t)w);
        }
        for (uint64_t left = n * rec; rc == 0 && left;) {
            ssize_t w = splice(p[0], NULL, s->fd, NULL, left, SPLICE_F_MORE);
            if (w < 0 && errno != EINTR)
                rc = -errno;
            else if (w == 0)
                rc = -EPIPE;
            else if (w > 0)
                left -= (uint64_t)w;
        }
        if (rc == 0 && !bare && madvise(hdr, REC_PER_SEND * REC_HDR, MADV_DONTNEED))
            rc = -errno;
    }
    close(p[0]);
    close(p[1]);
    return rc;
}

static void *rec_sender_main(void *arg)
{
    struct rec_stream *s = arg;
    uint64_t c0 = thread_cpu_ns();
    size_t hdr_len = REC_PER_SEND * REC_HDR;
    uint8_t *hdr = mmap(NULL, hdr_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct iovec *iov = calloc(2 * REC_PER_SEND, sizeof(*iov));
    if (hdr == MAP_FAILED || !iov)
        s->rc = -ENOMEM;
    else
        s->rc = s->use_splice ? rec_send_splice(s, hdr, iov) : rec_send_copy(s, hdr, iov);
    shutdown(s->fd, SHUT_WR);
    if (hdr != MAP_FAILED)
        munmap(hdr, hdr_len);
    free(iov);
    s->cpu_ns = thread_cpu_ns() - c0;
    return NULL;
}

/* The receiving end: everything into one buffer; with verify, record by record against src. */
static int rec_receive(int fd, const struct rec_stream *s, uint64_t *got)
{
    size_t hdr = s->use_splice == 2 ? 0 : REC_HDR, rec = hdr + REC_BODY;
    size_t cap = s->verify ? rec : 4u << 20;
    uint8_t *buf = malloc(cap);
    int rc = 0;
    if (!buf)
        return -ENOMEM;
    memset(buf, 0, cap);                /* touched, so no page faults are timed */
    for (uint64_t i = 0; rc == 0; i++) {
        if (s->verify) {
            int r = read_all(fd, buf, rec);
            if (r <= 0) {
                rc = r;
                break;
            }
            uint8_t want[REC_HDR];
            pc_put_be64(want, i * REC_BODY | REC_FLAGS);
            if (i >= s->nrec || memcmp(buf, want, hdr) || memcmp(buf + hdr, s->src + i * REC_BODY, REC_BODY))
                rc = -EBADMSG;
            *got += rec;
            continue;
        }
        ssize_t n = read(fd, buf, cap);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            rc = n < 0 ? -errno : 0;
            break;
        }
        *got += (uint64_t)n;
    }
    free(buf);
    return rc;
}

int pc_nb_record_stream(uint64_t src, uint64_t len, int use_splice, int verify, uint64_t *elapsed_ns,
                        uint64_t *sender_cpu_ns, uint64_t *receiver_cpu_ns)
{
    if (!src || len == 0 || len % REC_BODY || use_splice < 0 || use_splice > 2 || !elapsed_ns || !sender_cpu_ns ||
        !receiver_cpu_ns)
        return -EINVAL;
    int fds[2], rc = stream_pair(fds);
    if (rc < 0)
        return rc;
    struct rec_stream s = { .fd = fds[0], .use_splice = use_splice, .verify = verify,
                            .src = (const uint8_t *)(uintptr_t)src, .nrec = len / REC_BODY };
    pthread_t tx;
    uint64_t got = 0, t0 = pc_now_ns(), c0 = thread_cpu_ns();
    if ((rc = -pthread_create(&tx, NULL, rec_sender_main, &s)) == 0) {
        rc = rec_receive(fds[1], &s, &got);
        *receiver_cpu_ns = thread_cpu_ns() - c0;
        *elapsed_ns = pc_now_ns() - t0;
        if (rc < 0)
            shutdown(fds[1], SHUT_RDWR);    /* a sender blocked on a full socket ends */
        pthread_join(tx, NULL);
        *sender_cpu_ns = s.cpu_ns;
        if (rc == 0 && s.rc < 0)
            rc = s.rc;
        if (rc == 0 && got != s.nrec * (use_splice == 2 ? REC_BODY : REC_SIZE))
            rc = -EPIPE;
    }
    close(fds[0]);
    close(fds[1]);
    return rc;
}
