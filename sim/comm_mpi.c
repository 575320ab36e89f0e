/* sim/comm_mpi.c: the MPI communicator (apb/sim.h, apb/comm.h): one process per host under mpirun.
 *
 * Host memory only (the CPU backends); the NCCL communicator serves GPUs. Byte sizes go to MPI as
 * MPI_BYTE counts, which are int: a transfer over INT_MAX bytes is split into pieces (sendrecv,
 * bcast) or refused with APB_EUNSUPPORTED naming the size (the v-collectives, whose displacements
 * are int as well). Counts are logical, as in sim/comm_sim.c, so that both give the same figures.
 * MPI errors are returned (MPI_ERRORS_RETURN) as APB_ECOMM with MPI's error string.
 * Tested by tests/check_sched.c, which runs `mpirun -np 2|4 apb run` and compares bitwise with the
 * in-process simulation.
 */
#include "config.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apb/sim.h"

#ifdef HAVE_MPI
#include <mpi.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int we_initialised;

static apb_status mpi_fail(apb_comm *c, int rc, const char *what, apb_error *err) {
  char s[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, s, &len);
  s[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = 0;
  return apb_error_set(err, APB_ECOMM, "MPI rank %d: %s failed: %s", c->rank, what, s);
}

static apb_status check_int(apb_comm *c, size_t n, const char *what, apb_error *err) {
  if (n > (size_t)INT_MAX)
    return apb_error_set(err, APB_EUNSUPPORTED, "MPI rank %d: %s of %zu bytes exceeds MPI's int counts", c->rank,
                         what, n);
  return APB_OK;
}

static apb_status mpi_allgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes, apb_error *err) {
  int H = c->size;
  int *cnt = malloc(sizeof(int) * (size_t)H), *dis = malloc(sizeof(int) * (size_t)H);
  apb_status st = APB_OK;
  if (!cnt || !dis) {
    st = apb_error_set(err, APB_ENOMEM, "MPI allgather: out of memory");
    goto done;
  }
  size_t off = 0;
  for (int r = 0; r < H; r++) {
    if ((st = check_int(c, off + bytes[r], "allgather", err))) goto done;
    cnt[r] = (int)bytes[r];
    dis[r] = (int)off;
    off += bytes[r];
  }
  double t0 = now_s();
  const void *sb = (const char *)send == (const char *)recv + dis[c->rank] ? MPI_IN_PLACE : send;
  int rc = MPI_Allgatherv(sb, cnt[c->rank], MPI_BYTE, recv, cnt, dis, MPI_BYTE, MPI_COMM_WORLD);
  c->stats.wait_s += now_s() - t0;
  if (rc != MPI_SUCCESS) {
    st = mpi_fail(c, rc, "MPI_Allgatherv", err);
    goto done;
  }
  c->stats.calls[APB_COLL_ALLGATHER]++;
  c->stats.bytes_sent[APB_COLL_ALLGATHER] += (int64_t)bytes[c->rank] * (H - 1);
  c->stats.bytes_recv[APB_COLL_ALLGATHER] += (int64_t)(off - bytes[c->rank]);
done:
  free(cnt);
  free(dis);
  return st;
}

static apb_status mpi_iallgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes,
                                  apb_comm_req **req, apb_error *err) {
  *req = NULL; /* completed in the call: the CPU backends compute synchronously anyway */
  return mpi_allgatherv(c, send, recv, bytes, err);
}

static apb_status mpi_sendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                               int src, apb_error *err) {
  if (dst >= c->size || src >= c->size || dst < -1 || src < -1) /* -1: no peer */
    return apb_error_set(err, APB_EINVAL, "sendrecv: rank %d names peer %d/%d of %d", c->rank, dst, src, c->size);
  double t0 = now_s();
  size_t done_s = 0, done_r = 0;
  do { /* pieces of at most INT_MAX bytes, both directions in step */
    size_t ns = dst >= 0 ? sbytes - done_s : 0, nr = src >= 0 ? rbytes - done_r : 0;
    if (ns > (size_t)INT_MAX) ns = (size_t)INT_MAX;
    if (nr > (size_t)INT_MAX) nr = (size_t)INT_MAX;
    int rc = MPI_Sendrecv((const char *)send + done_s, (int)ns, MPI_BYTE, dst >= 0 ? dst : MPI_PROC_NULL, 17,
                          (char *)recv + done_r, (int)nr, MPI_BYTE, src >= 0 ? src : MPI_PROC_NULL, 17,
                          MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Sendrecv", err);
    done_s += ns, done_r += nr;
  } while ((dst >= 0 && done_s < sbytes) || (src >= 0 && done_r < rbytes));
  c->stats.wait_s += now_s() - t0;
  c->stats.calls[APB_COLL_SENDRECV]++;
  if (dst >= 0 && dst != c->rank) c->stats.bytes_sent[APB_COLL_SENDRECV] += (int64_t)sbytes;
  if (src >= 0 && src != c->rank) c->stats.bytes_recv[APB_COLL_SENDRECV] += (int64_t)rbytes;
  return APB_OK;
}

static apb_status mpi_isendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                                int src, apb_comm_req **req, apb_error *err) {
  *req = NULL;
  return mpi_sendrecv(c, send, sbytes, dst, recv, rbytes, src, err);
}

static apb_status mpi_alltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                const size_t *rbytes, apb_error *err) {
  int H = c->size;
  int *sc = malloc(sizeof(int) * 4 * (size_t)H);
  if (!sc) return apb_error_set(err, APB_ENOMEM, "MPI alltoall: out of memory");
  int *sd = sc + H, *rc_ = sc + 2 * H, *rd = sc + 3 * H;
  apb_status st = APB_OK;
  size_t so = 0, ro = 0;
  for (int r = 0; r < H; r++) {
    if ((st = check_int(c, so + sbytes[r], "alltoall", err)) || (st = check_int(c, ro + rbytes[r], "alltoall", err)))
      goto done;
    sc[r] = (int)sbytes[r], sd[r] = (int)so, rc_[r] = (int)rbytes[r], rd[r] = (int)ro;
    so += sbytes[r], ro += rbytes[r];
    if (r != c->rank) {
      c->stats.bytes_sent[APB_COLL_ALLTOALL] += (int64_t)sbytes[r];
      c->stats.bytes_recv[APB_COLL_ALLTOALL] += (int64_t)rbytes[r];
    }
  }
  double t0 = now_s();
  int rc = MPI_Alltoallv(send, sc, sd, MPI_BYTE, recv, rc_, rd, MPI_BYTE, MPI_COMM_WORLD);
  c->stats.wait_s += now_s() - t0;
  if (rc != MPI_SUCCESS) st = mpi_fail(c, rc, "MPI_Alltoallv", err);
  c->stats.calls[APB_COLL_ALLTOALL]++;
done:
  free(sc);
  return st;
}

static apb_status mpi_ialltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                 const size_t *rbytes, apb_comm_req **req, apb_error *err) {
  *req = NULL;
  return mpi_alltoallv(c, send, sbytes, recv, rbytes, err);
}

static apb_status mpi_bcast(apb_comm *c, void *buf, size_t bytes, int root, apb_error *err) {
  if (root < 0 || root >= c->size)
    return apb_error_set(err, APB_EINVAL, "bcast: root %d is not a rank of %d", root, c->size);
  double t0 = now_s();
  for (size_t off = 0; off < bytes || (bytes == 0 && off == 0);) {
    size_t n = bytes - off > (size_t)INT_MAX ? (size_t)INT_MAX : bytes - off;
    int rc = MPI_Bcast((char *)buf + off, (int)n, MPI_BYTE, root, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Bcast", err);
    off += n;
    if (n == 0) break;
  }
  c->stats.wait_s += now_s() - t0;
  c->stats.calls[APB_COLL_BCAST]++;
  if (c->rank == root)
    c->stats.bytes_sent[APB_COLL_BCAST] += (int64_t)bytes * (c->size - 1);
  else
    c->stats.bytes_recv[APB_COLL_BCAST] += (int64_t)bytes;
  return APB_OK;
}

static apb_status mpi_barrier(apb_comm *c, apb_error *err) {
  double t0 = now_s();
  int rc = MPI_Barrier(MPI_COMM_WORLD);
  c->stats.wait_s += now_s() - t0;
  if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Barrier", err);
  c->stats.calls[APB_COLL_BARRIER]++;
  return APB_OK;
}

static apb_status mpi_wait(apb_comm *c, apb_comm_req *req, apb_error *err) {
  (void)c, (void)req, (void)err;
  return APB_OK;
}

static void mpi_destroy(apb_comm *c) { free(c); }

static void mpi_abort(apb_comm *c, const char *why) {
  (void)c, (void)why; /* the program has reported why on stderr; MPI_Abort ends every rank */
  MPI_Abort(MPI_COMM_WORLD, 1);
}

static const apb_comm_ops mpi_ops = {
    .destroy = mpi_destroy,
    .allgatherv = mpi_allgatherv,
    .iallgatherv = mpi_iallgatherv,
    .sendrecv = mpi_sendrecv,
    .isendrecv = mpi_isendrecv,
    .alltoallv = mpi_alltoallv,
    .ialltoallv = mpi_ialltoallv,
    .bcast = mpi_bcast,
    .barrier = mpi_barrier,
    .wait = mpi_wait,
    .abort = mpi_abort,
};

int apb_mpi_detect(void) {
  int init = 0;
  MPI_Initialized(&init);
  if (init) return 1;
  const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"};
  for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
    const char *v = getenv(vars[i]);
    if (v && *v) return 1;
  }
  return 0;
}

apb_status apb_comm_mpi(apb_backend *be, apb_comm **out, apb_error *err) {
  *out = NULL;
  if (be && be->device >= 0)
    return apb_error_set(err, APB_EUNSUPPORTED,
                         "the MPI communicator moves host memory only; backend '%s' keeps device memory "
                         "(use NCCL for GPUs)", be->name);
  int init = 0;
  MPI_Initialized(&init);
  if (!init) {
    int provided = 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      return apb_error_set(err, APB_ECOMM, "MPI_Init_thread failed");
    we_initialised = 1;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  apb_comm *c = calloc(1, sizeof *c);
  if (!c) return apb_error_set(err, APB_ENOMEM, "MPI communicator: out of memory");
  MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
  MPI_Comm_size(MPI_COMM_WORLD, &c->size);
  c->name = "mpi";
  c->ops = &mpi_ops;
  *out = c;
  return APB_OK;
}

void apb_mpi_finalize(void) {
  int fin = 0;
  MPI_Finalized(&fin);
  if (we_initialised && !fin) MPI_Finalize();
}

#else /* !HAVE_MPI */

int apb_mpi_detect(void) { return 0; }

apb_status apb_comm_mpi(apb_backend *be, apb_comm **out, apb_error *err) {
  (void)be;
  *out = NULL;
  return apb_error_set(err, APB_EUNSUPPORTED,
                       "this apb was built without MPI: install libopenmpi-dev and reconfigure (--with-mpi)");
}

void apb_mpi_finalize(void) {}

#endif
