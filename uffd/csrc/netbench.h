/* Physical floors for the migration benchmark (bench/migration.py), measured
 * in C so that no Python runs between the timestamps:
 *   - loopback TCP round trip of a small message (TCP_NODELAY, two threads);
 *   - loopback TCP stream throughput (a sender thread, a receiver thread);
 *   - a plain C remote fault: a faulting thread, a uffd handler thread that
 *     asks a server thread over TCP for the page and UFFDIO_COPYs the reply.
 * Every function returns 0 or -errno. */
#ifndef PC_NETBENCH_H
#define PC_NETBENCH_H

#include <stdint.h>

/* iters round trips of msg_size bytes each way over one loopback TCP
 * connection; the ns of each into lat_ns[i]. */
int pc_nb_tcp_rtt(uint64_t iters, uint32_t msg_size, uint64_t *lat_ns);

/* Send total_bytes in writes of chunk bytes from one thread to another over
 * one loopback TCP connection; *elapsed_ns from the first write to the last
 * byte read. */
int pc_nb_tcp_stream(uint64_t total_bytes, uint32_t chunk, uint64_t *elapsed_ns);

/* npages pages at addr (registered MISSING with uffd_fd, page_size each) are
 * touched in order by one thread; each fault is read by a handler thread,
 * requested from a server thread over loopback TCP (16-byte request, page_size
 * reply from src) and placed with one UFFDIO_COPY. lat_ns[i]: the touch of
 * page i as the faulting thread saw it. */
int pc_nb_remote_fault(int uffd_fd, uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t src,
                       uint64_t *lat_ns);

/* UFFDIO_COPY len bytes from src onto missing pages at dst in ioctls of chunk
 * bytes each (a multiple of the page size): what batching the placement of
 * contiguous pages would gain. Elapsed ns, or -errno on the first failure. */
int64_t pc_nb_copy_batched(int uffd_fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t chunk);

#endif /* PC_NETBENCH_H */
