/* A stand-in for a VMM restoring a snapshot with a userfaultfd memory backend,
 * doing what Firecracker does: create the uffd (EVENT_REMOVE), register two
 * regions of its own memory at unrelated addresses for MISSING faults,
 * connect to the handler, send the GuestRegionUffdMapping JSON with the uffd
 * as SCM_RIGHTS, keep the connection open. Then it reads every 4 KiB page in
 * a scattered order and compares it with the memory file; optionally
 * MADV_DONTNEEDs a range and checks it reads zeros.
 *
 * usage: vmm SOCKET MEMFILE [--page-size N] [--regions A,B] [--json new|old|kib]
 *            [--threads T] [--seed S] [--pause-at N] [--dontneed OFF,LEN] [--measure] [--think-ns N]
 *            [--wait-eof] [--untouched-dontneed]
 * --untouched-dontneed: the readers leave the --dontneed range alone, so it is given back
 * before any of it was faulted in (live mode: while the stream has yet to send it).
 * Region 1 maps file [0, A), region 2 file [A, A+B); region 2 lies below region 1.
 * --wait-eof: before exiting, wait until the handler closes the connection (live mode:
 * the migration ends after the last page was read).
 * Prints "RESULT ok=1 pages=N mismatches=M checksum=X ..." (and latency with --measure). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PG 4096ull
static uint64_t page_size = PG, size1 = 8 << 20, size2 = 4 << 20;
static const char *json_style = "new";
static int threads = 1;
static uint64_t seed = 1, pause_at = 0, dn_off = 0, dn_len = 0;
static int measure = 0, wait_eof = 0, untouched_dontneed = 0;
static uint64_t think_ns = 0;
static uint8_t *r1, *r2;
static const uint8_t *file;
static uint64_t npages, mult, add;
static volatile uint64_t progress;
static pthread_mutex_t pause_lock = PTHREAD_MUTEX_INITIALIZER;
static int paused_done;
static uint64_t *lat;
static volatile uint64_t nlat;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "vmm: %s: %s\n", what, strerror(errno));
    exit(3);
}

static uint64_t gcd(uint64_t a, uint64_t b) { while (b) { uint64_t t = a % b; a = b; b = t; } return a; }

/* 4 KiB page index (file order) -> its address in our memory */
static uint8_t *page_addr(uint64_t p)
{
    uint64_t off = p * PG;
    return off < size1 ? r1 + off : r2 + (off - size1);
}

static int removed(uint64_t p)
{
    uint64_t off = p * PG;
    return dn_len && off >= dn_off && off < dn_off + dn_len;
}

static void *reader(void *arg)
{
    long t = (long)arg;
    uint64_t mismatches = 0;
    unsigned char vec;
    for (uint64_t i = (uint64_t)t; i < npages; i += (uint64_t)threads) {
        if (pause_at && i >= pause_at && !paused_done) {
            pthread_mutex_lock(&pause_lock);
            if (!paused_done) {
                printf("PAUSE\n");
                fflush(stdout);
                char line[16];
                if (!fgets(line, sizeof line, stdin))
                    exit(4);
                paused_done = 1;
            }
            pthread_mutex_unlock(&pause_lock);
        }
        uint64_t p = (i * mult + add) % npages;
        if (untouched_dontneed && removed(p))
            continue;
        volatile uint8_t *a = page_addr(p);
        if (measure) {
            int resident = mincore((void *)((uintptr_t)a & ~(PG - 1)), PG, &vec) == 0 && (vec & 1);
            uint64_t t0 = now_ns();
            (void)a[0];
            uint64_t t1 = now_ns();
            if (!resident)
                lat[__atomic_fetch_add(&nlat, 1, __ATOMIC_RELAXED)] = t1 - t0;
        } else {
            (void)a[0];
        }
        __atomic_fetch_add(&progress, 1, __ATOMIC_RELAXED);
        if (think_ns) /* a guest computing between accesses */
            for (uint64_t t0 = now_ns(); now_ns() - t0 < think_ns;)
                ;
    }
    /* compare after touching, in this thread's share */
    for (uint64_t i = (uint64_t)t; i < npages; i += (uint64_t)threads) {
        uint64_t p = (i * mult + add) % npages;
        if (removed(p))
            continue;
        if (memcmp(page_addr(p), file + p * PG, PG) != 0)
            mismatches++;
    }
    return (void *)(uintptr_t)mismatches;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: vmm SOCKET MEMFILE [options]\n");
        return 2;
    }
    const char *sock_path = argv[1], *mem_path = argv[2];
    for (int i = 3; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(o, "--page-size")) page_size = strtoull(v, NULL, 0), i++;
        else if (!strcmp(o, "--regions")) sscanf(v, "%lu,%lu", &size1, &size2), i++;
        else if (!strcmp(o, "--json")) json_style = v, i++;
        else if (!strcmp(o, "--threads")) threads = atoi(v), i++;
        else if (!strcmp(o, "--seed")) seed = strtoull(v, NULL, 0), i++;
        else if (!strcmp(o, "--pause-at")) pause_at = strtoull(v, NULL, 0), i++;
        else if (!strcmp(o, "--dontneed")) sscanf(v, "%lu,%lu", &dn_off, &dn_len), i++;
        else if (!strcmp(o, "--measure")) measure = 1;
        else if (!strcmp(o, "--wait-eof")) wait_eof = 1;
        else if (!strcmp(o, "--untouched-dontneed")) untouched_dontneed = 1;
        else if (!strcmp(o, "--think-ns")) think_ns = strtoull(v, NULL, 0), i++;
        else { fprintf(stderr, "vmm: unknown option %s\n", o); return 2; }
    }
    int mfd = open(mem_path, O_RDONLY);
    if (mfd < 0) die("open memory file");
    file = mmap(NULL, size1 + size2, PROT_READ, MAP_SHARED, mfd, 0);
    if (file == MAP_FAILED) die("mmap memory file");

    /* two regions at unrelated addresses: region 2 first, a gap, region 1 */
    uint64_t gap = 64ull << 20, span = size1 + size2 + gap + 2 * page_size;
    uint8_t *res = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED) die("reserve");
    uint8_t *base = (uint8_t *)(((uintptr_t)res + page_size - 1) & ~(page_size - 1));
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE;
    if (page_size > PG) flags |= MAP_HUGETLB | (21 << MAP_HUGE_SHIFT);
    r2 = mmap(base, size2, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (r2 == MAP_FAILED) die("mmap region 2");
    r1 = mmap(base + size2 + gap, size1, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (r1 == MAP_FAILED) die("mmap region 1");

    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) die("userfaultfd");
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE };
    if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");
    struct uffdio_register reg = { .range = { (uintptr_t)r1, size1 }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER region 1");
    reg = (struct uffdio_register){ .range = { (uintptr_t)r2, size2 }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER region 2");

    char json[1024];
    if (!strcmp(json_style, "old"))
        snprintf(json, sizeof json, "[{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":0},"
                 "{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":%lu}]",
                 (uintptr_t)r1, size1, (uintptr_t)r2, size2, size1);
    else if (!strcmp(json_style, "kib"))
        snprintf(json, sizeof json, "[{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":0,\"page_size_kib\":%lu},"
                 "{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":%lu,\"page_size_kib\":%lu}]",
                 (uintptr_t)r1, size1, page_size, (uintptr_t)r2, size2, size1, page_size);
    else
        snprintf(json, sizeof json, "[{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":0,\"page_size\":%lu,\"page_size_kib\":%lu},"
                 "{\"base_host_virt_addr\":%lu,\"size\":%lu,\"offset\":%lu,\"page_size\":%lu,\"page_size_kib\":%lu}]",
                 (uintptr_t)r1, size1, page_size, page_size, (uintptr_t)r2, size2, size1, page_size, page_size);

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strncpy(sa.sun_path, sock_path, sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa)) die("connect");
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = { json, strlen(json) };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    if (sendmsg(s, &mh, 0) < 0) die("sendmsg");
    uint64_t t_start = now_ns();

    npages = (size1 + size2) / PG;
    mult = 2654435761ull % npages;
    if (mult == 0) mult = 1;
    while (gcd(mult, npages) != 1) mult++;
    add = seed * 7919 % npages;
    if (measure) lat = calloc(npages, sizeof(*lat));

    pthread_t th[64];
    uint64_t mismatches = 0;
    if (threads < 1 || threads > 64) threads = 1;
    for (long t = 0; t < threads; t++) pthread_create(&th[t], NULL, reader, (void *)t);
    for (long t = 0; t < threads; t++) {
        void *r;
        pthread_join(th[t], &r);
        mismatches += (uint64_t)(uintptr_t)r;
    }
    uint64_t t_touched = now_ns();

    uint64_t zero_bad = 0;
    if (dn_len) {
        /* balloon-style: give the range back, then it must read as zeros */
        uint8_t *a = dn_off < size1 ? r1 + dn_off : r2 + (dn_off - size1);
        if (madvise(a, dn_len, MADV_DONTNEED)) die("madvise(MADV_DONTNEED)");
        for (uint64_t o = 0; o < dn_len; o += 8)
            if (*(volatile uint64_t *)(a + o)) { zero_bad++; o = (o | (PG - 1)) - 7; }
    }
    uint64_t sum = 0;
    for (uint64_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)page_addr(p);
        for (uint64_t k = 0; k < PG / 8; k++) sum += w[k];
    }
    printf("RESULT ok=%d pages=%lu mismatches=%lu zero_bad=%lu checksum=%016lx touch_seconds=%.6f",
           mismatches == 0 && zero_bad == 0, npages, mismatches, zero_bad, sum, (t_touched - t_start) / 1e9);
    if (measure) {
        qsort(lat, nlat, sizeof(*lat), cmp_u64);
        printf(" faults=%lu p50_us=%.2f p99_us=%.2f", nlat, nlat ? lat[nlat / 2] / 1e3 : 0.0,
               nlat ? lat[nlat * 99 / 100] / 1e3 : 0.0);
    }
    printf("\n");
    fflush(stdout);
    if (wait_eof) {
        char b[256];
        while (read(s, b, sizeof b) > 0)
            ;
    }
    close(s);
    return mismatches == 0 && zero_bad == 0 ? 0 : 1;
}
