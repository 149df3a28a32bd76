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
 * touched by nfaulters threads (1-8), thread t the pages t, t+nfaulters, ... in
 * order. nconns (1-4) loopback TCP connections each have a handler thread and a
 * server thread: a handler reads a fault, requests it from its server (16-byte
 * request, page_size reply from src) and places it with one UFFDIO_COPY, one
 * fault after the other; the handlers share the userfaultfd, which must be
 * O_NONBLOCK when nconns > 1. lat_ns[i]: the touch of page i as its faulting
 * thread saw it. */
int pc_nb_remote_fault(int uffd_fd, uint64_t addr, uint64_t npages, uint64_t page_size, uint64_t src,
                       uint32_t nfaulters, uint32_t nconns, uint64_t *lat_ns);

/* UFFDIO_COPY len bytes from src onto missing pages at dst in ioctls of chunk
 * bytes each (a multiple of the page size): what batching the placement of
 * contiguous pages would gain. Elapsed ns, or -errno on the first failure. */
int64_t pc_nb_copy_batched(int uffd_fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t chunk);

/* len bytes at src (a multiple of 4 KiB) from a sender thread to a receiver
 * thread over loopback TCP as the bulk stream carries them: per 4 KiB page an
 * 8-byte record header and the page, 512 records per sendmsg (the kernel copies
 * the pages into its buffers); with use_splice the same records by vmsplice into
 * a pipe and splice into the socket (the kernel references the pages instead);
 * use_splice 2: the pages alone by reference, no headers (not a stream the
 * destination reads: the best case of sending by reference).
 * verify: the receiver checks every record against src (slow; for tests).
 * *elapsed_ns from the start to the last byte read; each thread's CPU time. */
int pc_nb_record_stream(uint64_t src, uint64_t len, int use_splice, int verify, uint64_t *elapsed_ns,
                        uint64_t *sender_cpu_ns, uint64_t *receiver_cpu_ns);

#endif /* PC_NETBENCH_H */
