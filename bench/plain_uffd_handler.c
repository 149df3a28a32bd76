/* The baseline: a plain page-fault handler as in Firecracker's on-demand
 * example. Accepts one VMM, maps the memory file, and copies each faulting
 * page (UFFDIO_COPY) from it; nothing else. Prints "RESIDENT seconds=S" when
 * every page of every region has been served (time since the handshake).
 * usage: plain_uffd_handler SOCKET MEMFILE */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct region { uint64_t base, size, offset, page_size; };

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t field(const char *obj, const char *name, uint64_t dflt)
{
    const char *p = strstr(obj, name);
    return p ? strtoull(p + strlen(name) + 1, NULL, 10) : dflt;
}

int main(int argc, char **argv)
{
    if (argc != 3) return 2;
    int mfd = open(argv[2], O_RDONLY);
    struct stat sb;
    fstat(mfd, &sb);
    const uint8_t *file = mmap(NULL, sb.st_size, PROT_READ, MAP_PRIVATE, mfd, 0);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    unlink(argv[1]);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 1)) { perror("bind"); return 3; }
    printf("LISTENING\n");
    fflush(stdout);
    int c = accept(ls, NULL, NULL);
    char buf[4096] = { 0 }, cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { buf, sizeof buf - 1 };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
    if (recvmsg(c, &mh, 0) <= 0) { perror("recvmsg"); return 3; }
    uint64_t t0 = now_ns();
    int uffd;
    memcpy(&uffd, CMSG_DATA(CMSG_FIRSTHDR(&mh)), sizeof(int));
    struct region regions[16];
    int nr = 0;
    uint64_t npages = 0, served = 0;
    for (char *obj = strchr(buf, '{'); obj && nr < 16; obj = strchr(obj + 1, '{')) {
        struct region *r = &regions[nr++];
        r->base = field(obj, "\"base_host_virt_addr\"", 0);
        r->size = field(obj, "\"size\"", 0);
        r->offset = field(obj, "\"offset\"", 0);
        r->page_size = field(obj, "\"page_size\"", 4096);
        npages += r->size / r->page_size;
    }
    struct pollfd p[2] = { { .fd = uffd, .events = POLLIN }, { .fd = c, .events = POLLIN } };
    for (;;) {
        if (poll(p, 2, -1) < 0 && errno != EINTR) return 3;
        if (p[1].revents) break; /* the VMM closed its connection */
        struct uffd_msg msgs[64];
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n <= 0) continue;
        for (int i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
            uint64_t a = msgs[i].arg.pagefault.address;
            for (int k = 0; k < nr; k++) {
                struct region *r = &regions[k];
                if (a < r->base || a >= r->base + r->size) continue;
                uint64_t dst = a & ~(r->page_size - 1);
                struct uffdio_copy cp = { .dst = dst, .src = (uintptr_t)(file + r->offset + (dst - r->base)), .len = r->page_size };
                if (ioctl(uffd, UFFDIO_COPY, &cp) == 0 && ++served == npages) {
                    printf("RESIDENT seconds=%.6f\n", (now_ns() - t0) / 1e9);
                    fflush(stdout);
                }
            }
        }
    }
    return 0;
}
