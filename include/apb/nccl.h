/* apb/nccl.h: the NCCL communicator (apb/comm.h on GPUs) and the multi-GPU runner.
 *
 * What it is. An apb_comm whose collectives are NCCL operations on device memory, enqueued on the
 * stream of the CUDA backend instance the communicator was made for (the compute stream), so that
 * collectives and kernels run in submission order with no host synchronisation. The i-variants run
 * on a second, communication stream of the communicator, ordered after the compute stream by an
 * event, and `wait` makes the compute stream wait for their completion event (again without blocking
 * the host): a schedule can overlap the passing-block all-gather with compute. Byte and call counts
 * are the logical ones of sim/comm_sim.c (bytes delivered to other ranks), so the simulator, MPI and
 * NCCL report the same figures. Two ways to make communicators: every local GPU driven by a thread
 * of one process (apb_nccl_group_create), or one process per GPU under mpirun with MPI used only to
 * share NCCL's unique id (apb_comm_nccl_mpi). apb_nccl_execute runs a whole plan one rank per GPU,
 * as apb_sim_execute does with simulated hosts.
 *
 * Failures never hang. Communicators are non-blocking (NCCL's config.blocking = 0); every wait polls
 * the CUDA event it waits for and ncclCommGetAsyncError, and a per-communicator watchdog thread does
 * the same for work enqueued earlier (so that a wait inside the backend, such as a download, cannot
 * hang either). A collective that does not complete within the timeout (APB_NCCL_TIMEOUT_S, default
 * 300 s), an asynchronous NCCL error, or comm->ops->abort aborts the NCCL communicator
 * (ncclCommAbort, which releases kernels waiting for peers); every later call on it returns
 * APB_ETIMEOUT or APB_ECOMM with a message naming the rank, the device and the collective. In one
 * process an abort aborts every communicator of the group; under mpirun `abort` ends the job
 * (MPI_Abort), as the MPI communicator does. docs/nccl.md has the design, the environment variables
 * (APB_NCCL_TIMEOUT_S, APB_NCCL_CHECK, APB_NCCL_TIMING, APB_FAULT_RANK, APB_FAULT_LAYER) and how to run
 * on the GPU machines.
 *
 * Without NCCL compiled in (configure found no nccl.h/libnccl or no CUDA) every entry point except
 * apb_nccl_built and apb_nccl_sync returns APB_EUNSUPPORTED and says why.
 *
 * Tested by tests/check_gpu_nccl.c (collectives, overlap, divergence, abort, a failing rank of
 * `apb run --gpus`, every method against the CPU run), which SKIPs without two GPUs.
 */
#ifndef APB_NCCL_H
#define APB_NCCL_H

#include <stdint.h>

#include "apb/backend.h"
#include "apb/comm.h"
#include "apb/model.h"
#include "apb/sched.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the library was built with the NCCL communicator. */
int apb_nccl_built(void);

/* H communicators in comms[0..H-1] for H GPUs driven by threads of this process: rank r runs on
 * bes[r] (a CUDA backend instance; its stream is rank r's compute stream). devices[r] names rank r's
 * device and must equal bes[r]->device; devices may be NULL (then bes[r]->device). Devices must be
 * distinct (NCCL gives one rank per GPU). One thread makes all of them: ncclGetUniqueId once, then
 * ncclCommInitRankConfig for every rank inside one ncclGroupStart/End, non-blocking, polled until
 * ready (or the timeout). After that each comms[r] is used by one thread at a time (rank r's). Destroy
 * each with apb_comm_destroy; the group's NCCL communicators are finalized together when the last
 * one is destroyed. comms->ops->abort on any of them aborts all of them. */
apb_status apb_nccl_group_create(int H, const int *devices, apb_backend *const *bes, apb_comm **comms,
                                 apb_error *err);

/* One process per GPU under mpirun: this rank's communicator on be (a CUDA backend on the device this
 * process uses; see docs/nccl.md for choosing it from the local rank). MPI is initialised if needed
 * (through apb_comm_mpi, so apb_mpi_finalize ends it) and used only to broadcast NCCL's unique id from
 * rank 0. Every rank of MPI_COMM_WORLD must call this. `abort` aborts the NCCL communicator and ends
 * the job with MPI_Abort. APB_EUNSUPPORTED without MPI or without NCCL. */
apb_status apb_comm_nccl_mpi(apb_backend *be, apb_comm **out, apb_error *err);

/* Wait (host side) until every collective c has enqueued so far, on both of its streams, has
 * completed, polling for asynchronous errors and the timeout; returns the communicator's failure if
 * it has one (a peer's abort, a timeout, an NCCL error). A program calls it after a rank's run to
 * know that the results it downloaded are complete and sound. For a communicator that is not NCCL's
 * (synchronous: simulated hosts, MPI) it returns APB_OK at once. */
apb_status apb_nccl_sync(apb_comm *c, apb_error *err);

/* A whole run on GPUs, one rank per device, as apb_sim_execute (apb/sim.h) does with simulated hosts:
 * H = plan->H threads; thread r makes a CUDA backend instance on its device and its own copy of the
 * weights there (weights cannot be shared across devices), the NCCL group is made, every thread runs
 * apb_host_run, and a rank that fails aborts the others (comm->ops->abort). Results of every rank in
 * res[0..H-1] (free each with apb_host_result_free) and, when stats is not NULL, each rank's
 * communication counts in stats[0..H-1]. On failure the error of the rank that failed first is
 * returned (not the APB_ECOMM its failure caused on the others).
 *
 * Weights: from the host model m (apb_bmodel_create on every device), or, when use_preset is set (m
 * may then be NULL), generated on every device from the preset and seed (apb_bmodel_generate: the
 * same weights on every device, but not lib/gen.c's numbers, so a comparison with the CPU goes
 * through a host model); the plan must then have been made with apb_preset_config's configuration
 * (or with opts.cfg when given).
 *
 * Test-only fault injection (docs/nccl.md): with APB_FAULT_RANK=r in the environment (and
 * APB_FAULT_LAYER=l, default 0), rank r fails with APB_EINVAL ("injected fault") at its first
 * collective once its prefill has reached layer l; methods without collectives inside their layers
 * (dense, star) fail at the first collective of the query phase; a run without rank r is unharmed. */
typedef struct apb_nccl_opts {
  const char *backend;      /* "cuda-bf16" (NULL: this) or "cuda-f32" (fp32 storage, TF32 off) */
  const int *devices;       /* [H]: device of rank r; NULL: rank r on device r */
  int use_preset;           /* 1: weights generated on each device from preset and seed (m unused) */
  apb_preset preset;
  const apb_model_config *cfg; /* with use_preset: this configuration instead of the preset's (NULL: the
                                  preset's), with retaining heads of scorer_width (apb_bmodel_generate_config) */
  int scorer_width;
  uint64_t seed;
  double timeout_s;         /* collective timeout in seconds; 0: APB_NCCL_TIMEOUT_S, else 300 */
  apb_hook_fn hook;         /* called from the H rank threads at once (it must be thread-safe) */
  void *hook_user;
  int want_hidden;
  int profile;              /* per-stage times in each rank's stats (apb_host_args.profile) */
  int warmup;               /* whole runs before the one returned, on the same weights and communicators,
                               untimed and without hook: NCCL's connections, CUDA's lazy module loading
                               and cuBLAS's first calls are paid there (0: none); `stats` then covers
                               the returned run only */
  int comm_timing;          /* 1: stats[r].visible_s measured (as APB_NCCL_TIMING=1 does) */
  int reps;                 /* timed runs after the warm-ups (0 or 1: one); res gets the run whose slowest
                               rank was fastest, `stats` that same run's counts; the hook sees every one */
} apb_nccl_opts;

apb_status apb_nccl_execute(const apb_plan *plan, const apb_model *m, const apb_nccl_opts *o, const int32_t *doc,
                            const int32_t *query, apb_host_result *res, apb_comm_stats *stats, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_NCCL_H */
