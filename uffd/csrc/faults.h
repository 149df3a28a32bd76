/* Batch fault reader: one read() of the uffd, pagefault events mapped to RAM
 * blocks and filtered against the received / requested bitmaps, all in C. */
#ifndef PC_FAULTS_H
#define PC_FAULTS_H

#include <stdint.h>
#include "bitmap.h"
#include "uffd.h"

#define PC_TARGET_PAGE_SIZE 4096u

/* bitmaps: one bit per 4 KiB target page; either may be NULL (no filtering) */
typedef struct pc_block_desc { uint64_t base, length, host_page_size; pc_bitmap *received, *requested; } pc_block_desc;
typedef struct pc_fault { uint64_t address, offset /* in block, rounded down to host page */, flags, t_ns /* CLOCK_MONOTONIC when read */; uint32_t block, tid, status; } pc_fault;
enum { PC_FAULT_NEW = 0, PC_FAULT_ALREADY_REQUESTED = 1, PC_FAULT_OUTSIDE = 2 };
#define PC_FAULT_NO_BLOCK UINT32_MAX

/* Blocks must be sorted by base and not overlap. Reads at most
 * min(max_out, 256) messages in one read(). Returns the number of faults
 * written to out, or -errno (-EAGAIN when nothing is pending). Non-pagefault
 * events are discarded (a FORK event's new fd is closed): use
 * pc_read_faults_ex when registered for them. */
int pc_read_faults(int fd, const pc_block_desc *blocks, uint32_t nblocks, pc_fault *out, uint32_t max_out, uint32_t *n_dropped);
/* As above; other events go to other[] (*n_other of them). At most
 * min(max_out, max_other) messages are read so none is lost. */
int pc_read_faults_ex(int fd, const pc_block_desc *blocks, uint32_t nblocks, pc_fault *out, uint32_t max_out, uint32_t *n_dropped,
                      pc_uffd_event *other, uint32_t max_other, uint32_t *n_other);
/* Map one address: block index or PC_FAULT_NO_BLOCK. */
uint32_t pc_find_block(const pc_block_desc *blocks, uint32_t nblocks, uint64_t address);

#endif /* PC_FAULTS_H */
