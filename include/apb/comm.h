/* apb/comm.h: the communicator, the collectives every schedule is written against.
 *
 * A communicator connects H hosts (ranks 0..H-1). Buffers are in the memory of the backend the
 * communicator was made for (host memory for the CPU backends, device memory for CUDA). Collectives
 * are called by every rank in the same order and take effect in submission order with that backend's
 * operations: a synchronous implementation (simulated hosts, MPI) completes before returning; NCCL
 * enqueues on the backend's stream. The i-variants start a transfer and return a request that `wait`
 * completes, so that compute that does not need the data can run meanwhile (NCCL: a second stream and
 * events; synchronous implementations finish in the start call and `wait` is a no-op). The buffers
 * belong to the transfer until `wait`; the size arrays do not: every implementation has read them when
 * the start call returns, so a caller may reuse them at once (an implementation over MPI's nonblocking
 * collectives would have to copy them).
 *
 * Every implementation counts, per rank and per collective kind, calls, bytes sent and bytes received
 * (bytes a rank copies to itself are not counted), so that the cost model can trust them.
 *
 * Implementations: sim/comm_sim.c (H hosts as threads in one process), sim/comm_mpi.c (one process per
 * host under mpirun), gpu/comm_nccl.c (NCCL). Tested in tests/check_comm.c (the simulated hosts),
 * tests/check_sched.c (MPI runs, bitwise against the simulated ones) and tests/check_gpu_nccl.c (NCCL).
 */
#ifndef APB_COMM_H
#define APB_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_comm apb_comm;
typedef struct apb_comm_req apb_comm_req;

typedef enum apb_coll {
  APB_COLL_ALLGATHER = 0,
  APB_COLL_SENDRECV,
  APB_COLL_ALLTOALL,
  APB_COLL_BCAST,
  APB_COLL_BARRIER,
  APB_COLL_COUNT
} apb_coll;

typedef struct apb_comm_stats {
  int64_t calls[APB_COLL_COUNT];
  int64_t bytes_sent[APB_COLL_COUNT];
  int64_t bytes_recv[APB_COLL_COUNT];
  double wait_s;             /* wall time spent blocked inside collectives */
  double visible_s;          /* NCCL with timing on (APB_NCCL_TIMING=1, apb_nccl_opts.comm_timing): time
                                the compute stream spent in collectives and waiting for the i-variants,
                                from CUDA events (no host wait), added up at apb_nccl_sync; else 0 */
} apb_comm_stats;

typedef struct apb_comm_ops {
  void (*destroy)(apb_comm *c);
  /* recv holds the H contributions back to back in rank order, bytes[r] from rank r; this rank's
   * send holds bytes[rank] (send may point into recv at its own slot). */
  apb_status (*allgatherv)(apb_comm *c, const void *send, void *recv, const size_t *bytes, apb_error *err);
  apb_status (*iallgatherv)(apb_comm *c, const void *send, void *recv, const size_t *bytes,
                            apb_comm_req **req, apb_error *err);
  /* send sbytes to rank dst and receive rbytes from rank src (either may be -1 for none) */
  apb_status (*sendrecv)(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                         int src, apb_error *err);
  apb_status (*isendrecv)(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                          int src, apb_comm_req **req, apb_error *err);
  /* send: H chunks back to back, sbytes[d] to rank d; recv: H chunks back to back, rbytes[s] from s */
  apb_status (*alltoallv)(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                          const size_t *rbytes, apb_error *err);
  apb_status (*ialltoallv)(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                           const size_t *rbytes, apb_comm_req **req, apb_error *err);
  apb_status (*bcast)(apb_comm *c, void *buf, size_t bytes, int root, apb_error *err);
  apb_status (*barrier)(apb_comm *c, apb_error *err);
  /* complete a request started by an i-variant (frees it); NULL is a no-op */
  apb_status (*wait)(apb_comm *c, apb_comm_req *req, apb_error *err);
  /* this rank failed: make every peer's pending and later collectives fail (APB_ECOMM) instead of
   * hanging. MPI ends the job (MPI_Abort); NCCL aborts the communicator. */
  void (*abort)(apb_comm *c, const char *why);
} apb_comm_ops;

struct apb_comm {
  int rank, size;
  const char *name;          /* "sim", "mpi", "nccl" */
  const apb_comm_ops *ops;
  void *impl;
  apb_comm_stats stats;      /* this rank's counts */
};

void apb_comm_destroy(apb_comm *c);
const char *apb_coll_name(apb_coll k);
/* Sum of bytes sent over every collective kind. */
int64_t apb_comm_bytes_sent(const apb_comm *c);

#ifdef __cplusplus
}
#endif
#endif /* APB_COMM_H */
