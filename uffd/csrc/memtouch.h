/* Touching guest memory from C, with the GIL released: for tests, benches and
 * anything that must not touch uffd-registered memory under the GIL. A thread
 * calling these on a missing page blocks in the kernel until it is served. */
#ifndef PC_MEMTOUCH_H
#define PC_MEMTOUCH_H

#include <stdint.h>

int pc_mt_read_byte(uint64_t addr);
void pc_mt_write_byte(uint64_t addr, uint8_t value);
/* Touch addr, addr+stride, ... below addr+len: read each byte, and with write
 * also store it plus one. Returns the sum of the bytes read. */
uint64_t pc_mt_touch_range(uint64_t addr, uint64_t len, uint64_t stride, int write);
uint64_t pc_mt_sum(uint64_t addr, uint64_t len);
void pc_mt_fill_pattern(uint64_t addr, uint64_t len, uint64_t seed); /* byte k = (seed + k/4096 * 7 + k) & 0xff */
int64_t pc_mt_check_pattern(uint64_t addr, uint64_t len, uint64_t seed); /* -1 if all match, else first bad index */
/* A kernel-mode access: write(fd, addr, len). Bytes written or -errno. */
int64_t pc_mt_write_to_fd(int fd, uint64_t addr, uint64_t len);
/* Fault npages pages one after another (read one byte each), recording the
 * CLOCK_MONOTONIC ns each touch took in lat_ns[i] (may be NULL). Sum of bytes. */
uint64_t pc_mt_fault_sequence(uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t *lat_ns);
/* fork(); the child (default SIGBUS/SIGSEGV handling) reads the byte at addr (with the child's copy of any
 * uffd registration) and _exit()s with that value. Returns the child's pid
 * or -errno. */
int pc_mt_fork_child_reads(uint64_t addr);
void pc_mt_memcpy(uint64_t dst, uint64_t src, uint64_t len);
/* Bench: UFFDIO_COPY npages consecutive pages from src to consecutive missing
 * pages at dst, one ioctl per page. Elapsed ns, or -errno on the first failure. */
int64_t pc_mt_bench_copy(int fd, uint64_t dst, uint64_t src, uint64_t page_size, uint64_t npages);
/* Bench reference: iters round trips of one byte between two threads over
 * pipes (two wake-ups each), ns per round trip into lat_ns. 0 or -errno. */
int pc_mt_bench_wakeup_pingpong(uint64_t iters, uint64_t *lat_ns);

#endif /* PC_MEMTOUCH_H */
