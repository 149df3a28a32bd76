/* Batch fault reading: one read(), then per-fault work in C only. */
#define _GNU_SOURCE
#include "faults.h"

#include <errno.h>
#include <unistd.h>

uint32_t pc_find_block(const pc_block_desc *blocks, uint32_t nblocks, uint64_t address)
{
    uint32_t lo = 0, hi = nblocks; /* first block with base > address is at hi */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (blocks[mid].base <= address)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return PC_FAULT_NO_BLOCK;
    const pc_block_desc *b = &blocks[lo - 1];
    return address - b->base < b->length ? lo - 1 : PC_FAULT_NO_BLOCK;
}

#define READ_BATCH_MAX 256u

int pc_read_faults_ex(int fd, const pc_block_desc *blocks, uint32_t nblocks, pc_fault *out, uint32_t max_out, uint32_t *n_dropped,
                      pc_uffd_event *other, uint32_t max_other, uint32_t *n_other)
{
    struct uffd_msg msgs[READ_BATCH_MAX];
    uint32_t want = max_out;
    if (other && max_other < want)
        want = max_other;
    if (want > READ_BATCH_MAX)
        want = READ_BATCH_MAX;
    if (n_dropped)
        *n_dropped = 0;
    if (n_other)
        *n_other = 0;
    if (want == 0)
        return -EINVAL;

    ssize_t nread;
    do {
        nread = read(fd, msgs, sizeof(msgs[0]) * want);
    } while (nread < 0 && errno == EINTR);
    if (nread < 0)
        return -errno;
    uint64_t now = pc_monotonic_ns();
    uint32_t nmsg = (uint32_t)(nread / (ssize_t)sizeof(msgs[0]));
    uint32_t n = 0, dropped = 0, others = 0;

    for (uint32_t m = 0; m < nmsg; m++) {
        const struct uffd_msg *msg = &msgs[m];
        if (msg->event != UFFD_EVENT_PAGEFAULT) {
            if (other) {
                pc_uffd_event_from_msg(msg, &other[others++]);
            } else if (msg->event == UFFD_EVENT_FORK) {
                close((int)msg->arg.fork.ufd); /* nobody will serve it: do not leak it */
            }
            continue;
        }
        uint64_t address = msg->arg.pagefault.address;
        pc_fault *f = &out[n];
        f->address = address;
        f->flags = msg->arg.pagefault.flags;
        f->tid = msg->arg.pagefault.feat.ptid;
        f->t_ns = now;
        uint32_t bi = pc_find_block(blocks, nblocks, address);
        if (bi == PC_FAULT_NO_BLOCK) {
            f->block = PC_FAULT_NO_BLOCK;
            f->offset = 0;
            f->status = PC_FAULT_OUTSIDE;
            n++;
            continue;
        }
        const pc_block_desc *b = &blocks[bi];
        uint64_t hps = b->host_page_size ? b->host_page_size : PC_TARGET_PAGE_SIZE;
        uint64_t offset = (address - b->base) / hps * hps;
        uint64_t page = offset / PC_TARGET_PAGE_SIZE;
        if (b->received && page < b->received->nbits && pc_bitmap_test(b->received, page)) {
            dropped++; /* placed after the fault was queued: the thread is already woken */
            continue;
        }
        f->block = bi;
        f->offset = offset;
        f->status = PC_FAULT_NEW;
        if (b->requested && page < b->requested->nbits && pc_bitmap_test_and_set_atomic(b->requested, page))
            f->status = PC_FAULT_ALREADY_REQUESTED;
        n++;
    }
    if (n_dropped)
        *n_dropped = dropped;
    if (n_other)
        *n_other = others;
    return (int)n;
}

int pc_read_faults(int fd, const pc_block_desc *blocks, uint32_t nblocks, pc_fault *out, uint32_t max_out, uint32_t *n_dropped)
{
    return pc_read_faults_ex(fd, blocks, nblocks, out, max_out, n_dropped, NULL, 0, NULL);
}
