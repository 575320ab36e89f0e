/* apb/sim.h: H hosts simulated inside one process, and the MPI communicator.
 *
 * apb_sim_group makes H communicators that talk through shared memory: each collective is a barrier,
 * copies from the peers' buffers through the backend's copy (so host and device memory both work),
 * and a second barrier. Results are deterministic and bitwise identical to the MPI run.
 *
 * Serialized mode (the default): one lock is held by whichever host is computing and released only
 * while a host waits inside a collective, so exactly one simulated host runs at a time and may use
 * every core (OpenMP) for its own work. Each host's compute time is then its wall time minus its
 * wait_s. Concurrent mode lets all hosts run at once (useful with one GPU per host).
 *
 * apb_sim_run starts H threads, calls fn(rank, arg) on each and joins them. Tested in
 * tests/check_comm.c.
 */
#ifndef APB_SIM_H
#define APB_SIM_H

#include "apb/backend.h"
#include "apb/comm.h"
#include "apb/sched.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_sim_group apb_sim_group;

/* H communicators in comms[0..H-1]; bes[r] is host r's backend (used for copies into r's buffers).
 * timeout_s > 0: a host that waits longer than that in one collective gets APB_ETIMEOUT (a peer died
 * or diverged); 0 waits forever. */
apb_status apb_sim_group_create(int H, apb_backend *const *bes, int serialized, double timeout_s,
                                apb_sim_group **out, apb_comm **comms, apb_error *err);
void apb_sim_group_destroy(apb_sim_group *g); /* after every comm of the group is destroyed */

/* Mark the calling thread as host `rank` starting (takes the run lock in serialized mode) and done
 * (releases it). apb_sim_run calls these around fn. */
void apb_sim_host_begin(apb_comm *c);
void apb_sim_host_end(apb_comm *c);

/* A failed host calls this so that peers blocked in (or later entering) a collective return
 * APB_ECOMM instead of waiting forever. */
void apb_sim_abort(apb_comm *c, const char *why);

/* Run fn(rank, arg) on H threads (rank 0 on a new thread too) with begin/end around each. */
apb_status apb_sim_run(int H, apb_comm *const *comms, void (*fn)(int rank, void *arg), void *arg,
                       apb_error *err);

/* Run a whole plan with H simulated hosts in this process: one backend instance per host (all of the
 * kind `backend` names, sharing one copy of the weights), a simulated group, H threads, and the
 * results of every host in res[0..H-1] (free each with apb_host_result_free) and, when stats is not
 * NULL, each host's communication counts in stats[0..H-1]. With a hook in concurrent mode the hook
 * is called from several threads at once; in serialized mode (the default) from one at a time. */
typedef struct apb_sim_opts {
  const char *backend;      /* "naive", "fast", "cuda-bf16", "cuda-f32" (NULL: "fast") */
  apb_cpu_opts cpu;         /* for the CPU backends */
  int device;               /* CUDA device shared by the simulated hosts */
  int concurrent;           /* 0: serialized (default), 1: every host runs at once */
  double timeout_s;         /* collective timeout (0: none) */
  apb_hook_fn hook;
  void *hook_user;
  int want_hidden;
  int profile;              /* per-stage times in each host's stats (apb_host_args.profile) */
} apb_sim_opts;

apb_status apb_sim_execute(const apb_plan *plan, const apb_model *m, const apb_sim_opts *o, const int32_t *doc,
                           const int32_t *query, apb_host_result *res, apb_comm_stats *stats, apb_error *err);

/* MPI: 1 when MPI is initialised or a launcher's variable (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK,
 * MPI_LOCALNRANKS) is set, i.e. under mpirun/mpiexec, one rank included. Without MPI compiled in: 0. */
int apb_mpi_detect(void);
/* Initialise MPI (if needed) and make the world communicator; be is this rank's backend (host memory
 * only: a backend with device memory is APB_EUNSUPPORTED, GPUs use NCCL). APB_EUNSUPPORTED without MPI.
 * Transfers over INT_MAX bytes go as several messages; APB_MPI_PIECE (bytes, 1 to INT_MAX) sets a
 * smaller message size (the tests use it to run the splitting); another value is APB_EINVAL.
 * A transfer that has not completed after APB_MPI_TIMEOUT_S seconds (default 300; 0 waits forever;
 * not a number in [0, 1e9]: APB_EINVAL here) returns APB_ETIMEOUT naming the collective, and the
 * communicator then returns that first failure from every call (its requests cannot be taken back:
 * end the job, e.g. with its abort op; the buffers of the timed-out transfer must stay valid until
 * then). Test-only: APB_MPI_STALL_RANK=r (< the number of ranks) makes rank r sleep APB_MPI_STALL_S
 * seconds (default 60) before its first transfer, once per process. */
apb_status apb_comm_mpi(apb_backend *be, apb_comm **out, apb_error *err);
void apb_mpi_finalize(void);

#ifdef __cplusplus
}
#endif
#endif /* APB_SIM_H */
