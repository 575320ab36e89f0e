/* sim/comm_mpi.c: the MPI communicator (apb/sim.h, apb/comm.h): one process per host under mpirun.
 *
 * Host memory only (the CPU backends); the NCCL communicator serves GPUs. Byte sizes go to MPI as
 * MPI_BYTE counts, which are int: a transfer over INT_MAX bytes is split into pieces (sendrecv,
 * bcast) or refused with APB_EUNSUPPORTED naming the size (the v-collectives, whose displacements
 * are int as well). Each direction of a sendrecv is max(1, ceil(bytes / piece)) messages, a number
 * both ends compute from the same size, whatever the other direction needs. The environment variable
 * APB_MPI_PIECE (bytes, 1 to INT_MAX; default INT_MAX) makes the pieces smaller, so that the tests
 * run the splitting without 2 GiB transfers. Counts are logical, as in sim/comm_sim.c, so that both
 * give the same figures.
 * MPI errors are returned (MPI_ERRORS_RETURN) as APB_ECOMM with MPI's error string.
 * Every transfer is posted non-blocking and polled (MPI_Testall; back to back for 200 us per message or
 * collective, then sleeping 10 us doubling up to 160 us between polls), so that a peer that never comes
 * (crashed outside MPI's sight, diverged, stuck) ends in APB_ETIMEOUT after APB_MPI_TIMEOUT_S seconds
 * (default 300; 0 waits forever) instead of a hang. The requests of a timed-out or failed transfer
 * cannot be taken back, so the communicator then stays failed: every later call returns the first
 * failure, and the transfer's buffers (the count arrays here are left allocated) must stay valid until
 * the job ends (the program ends it with MPI_Abort). Test-only fault hook: APB_MPI_STALL_RANK=r makes
 * rank r sleep APB_MPI_STALL_S seconds (default 60) before its first transfer, once per process: a peer
 * that comes late or never.
 * Tested by tests/check_sched.c, which runs `mpirun -np 2|4 apb run` and compares bitwise with the
 * in-process simulation.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apb/sim.h"
#include "../lib/env.h"

#ifdef HAVE_MPI
#include <mpi.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int we_initialised;
static size_t piece = (size_t)INT_MAX; /* bytes per MPI message of a split transfer (APB_MPI_PIECE) */

/* What a communicator keeps besides apb_comm (c->impl). */
typedef struct {
  double timeout_s;              /* APB_MPI_TIMEOUT_S: give up on a transfer after this long (0: never) */
  int stall_rank;                /* APB_MPI_STALL_RANK (-1: none) */
  double stall_s;                /* APB_MPI_STALL_S */
  apb_error failed;              /* the first failure; code APB_OK while the communicator is usable */
} mpi_state;

static mpi_state *state_of(apb_comm *c) { return (mpi_state *)c->impl; }
static int stalled; /* the stall hook has slept (once per process, whatever the communicators) */

/* messages of a transfer of b bytes: at least one (a 0-byte one too) */
static size_t pieces(size_t b) { return b == 0 ? 1 : b / piece + (b % piece != 0); }

/* Record err's failure as the communicator's (the first one stays) and return it. */
static apb_status fail_stays(apb_comm *c, apb_status st, apb_error *err) {
  mpi_state *ms = state_of(c);
  if (ms->failed.code == APB_OK) {
    ms->failed.code = st;
    snprintf(ms->failed.msg, sizeof ms->failed.msg, "%s", err && err->msg[0] ? err->msg : apb_status_str(st));
  }
  return st;
}

static apb_status mpi_fail(apb_comm *c, int rc, const char *what, apb_error *err) {
  char s[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, s, &len);
  s[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = 0;
  return fail_stays(c, apb_error_set(err, APB_ECOMM, "MPI rank %d: %s failed: %s", c->rank, what, s), err);
}

/* Before a transfer: a failed communicator returns its first failure; the stall hook sleeps once. */
static apb_status enter(apb_comm *c, apb_error *err) {
  mpi_state *ms = state_of(c);
  if (ms->failed.code != APB_OK)
    return apb_error_set(err, ms->failed.code, "%s (the MPI communicator failed earlier)", ms->failed.msg);
  if (ms->stall_rank == c->rank && !stalled) {
    stalled = 1;
    struct timespec ts = {(time_t)ms->stall_s, (long)((ms->stall_s - (double)(time_t)ms->stall_s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
  }
  return APB_OK;
}

/* Wait for n posted requests, polling: APB_ETIMEOUT once the whole transfer has taken longer than the
 * timeout (counted from t0, across its pieces). Polls back to back for the first 200 us of this wait,
 * then sleeps between polls, 10 us doubling up to 160 us (a sleeping rank does not progress MPI for
 * its peers): a long wait costs little CPU, a short one no added latency. */
static apb_status settle(apb_comm *c, MPI_Request *r, int n, const char *what, double t0, apb_error *err) {
  const double limit = state_of(c)->timeout_s, tp = now_s();
  long nap_ns = 10000;
  for (;;) {
    int flag = 0, rc = MPI_Testall(n, r, &flag, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, what, err);
    if (flag) return APB_OK;
    const double t = now_s();
    if (limit > 0 && t - t0 > limit)
      return fail_stays(c,
                        apb_error_set(err, APB_ETIMEOUT,
                                      "MPI rank %d: %s did not complete within %g s (APB_MPI_TIMEOUT_S): a peer "
                                      "failed, diverged or never called it",
                                      c->rank, what, limit),
                        err);
    if (t - tp > 200e-6) {
      struct timespec ts = {0, nap_ns};
      nanosleep(&ts, NULL);
      if (nap_ns < 160000) nap_ns *= 2;
    }
  }
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
  if ((st = enter(c, err))) goto done;
  double t0 = now_s();
  const void *sb = (const char *)send == (const char *)recv + dis[c->rank] ? MPI_IN_PLACE : send;
  MPI_Request rq;
  int rc = MPI_Iallgatherv(sb, cnt[c->rank], MPI_BYTE, recv, cnt, dis, MPI_BYTE, MPI_COMM_WORLD, &rq);
  st = rc != MPI_SUCCESS ? mpi_fail(c, rc, "MPI_Iallgatherv", err) : settle(c, &rq, 1, "allgather", t0, err);
  c->stats.wait_s += now_s() - t0;
  if (st == APB_ETIMEOUT) cnt = dis = NULL; /* the pending request still reads them: left allocated */
  if (st) goto done;
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
  apb_status st = enter(c, err);
  if (st) return st;
  double t0 = now_s();
  /* pieces of at most `piece` bytes, both directions in step; a direction whose pieces are all sent
   * talks to MPI_PROC_NULL, so that each end exchanges exactly pieces(bytes) messages with a peer */
  const size_t ps = dst >= 0 ? pieces(sbytes) : 0, pr = src >= 0 ? pieces(rbytes) : 0;
  size_t done_s = 0, done_r = 0;
  for (size_t i = 0; i < ps || i < pr; i++) {
    size_t ns = i < ps ? sbytes - done_s : 0, nr = i < pr ? rbytes - done_r : 0;
    if (ns > piece) ns = piece;
    if (nr > piece) nr = piece;
    MPI_Request rq[2];
    int rc = MPI_Irecv((char *)recv + done_r, (int)nr, MPI_BYTE, i < pr ? src : MPI_PROC_NULL, 17, MPI_COMM_WORLD, &rq[0]);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Irecv", err);
    rc = MPI_Isend((const char *)send + done_s, (int)ns, MPI_BYTE, i < ps ? dst : MPI_PROC_NULL, 17, MPI_COMM_WORLD,
                   &rq[1]);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Isend", err);
    if ((st = settle(c, rq, 2, "sendrecv", t0, err))) return st;
    done_s += ns, done_r += nr;
  }
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
  }
  if ((st = enter(c, err))) goto done;
  double t0 = now_s();
  MPI_Request rq;
  int rc = MPI_Ialltoallv(send, sc, sd, MPI_BYTE, recv, rc_, rd, MPI_BYTE, MPI_COMM_WORLD, &rq);
  st = rc != MPI_SUCCESS ? mpi_fail(c, rc, "MPI_Ialltoallv", err) : settle(c, &rq, 1, "alltoall", t0, err);
  c->stats.wait_s += now_s() - t0;
  if (st == APB_ETIMEOUT) sc = NULL; /* the pending request still reads the counts: left allocated */
  if (st) goto done;
  c->stats.calls[APB_COLL_ALLTOALL]++; /* counted on success only, as the other collectives */
  for (int r = 0; r < H; r++)
    if (r != c->rank) {
      c->stats.bytes_sent[APB_COLL_ALLTOALL] += (int64_t)sbytes[r];
      c->stats.bytes_recv[APB_COLL_ALLTOALL] += (int64_t)rbytes[r];
    }
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
  apb_status st = enter(c, err);
  if (st) return st;
  double t0 = now_s();
  for (size_t i = 0, off = 0, np = pieces(bytes); i < np; i++) { /* every rank: the same pieces */
    size_t n = bytes - off > piece ? piece : bytes - off;
    MPI_Request rq;
    int rc = MPI_Ibcast((char *)buf + off, (int)n, MPI_BYTE, root, MPI_COMM_WORLD, &rq);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Ibcast", err);
    if ((st = settle(c, &rq, 1, "bcast", t0, err))) return st;
    off += n;
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
  apb_status st = enter(c, err);
  if (st) return st;
  double t0 = now_s();
  MPI_Request rq;
  int rc = MPI_Ibarrier(MPI_COMM_WORLD, &rq);
  st = rc != MPI_SUCCESS ? mpi_fail(c, rc, "MPI_Ibarrier", err) : settle(c, &rq, 1, "barrier", t0, err);
  c->stats.wait_s += now_s() - t0;
  if (st) return st;
  c->stats.calls[APB_COLL_BARRIER]++;
  return APB_OK;
}

static apb_status mpi_wait(apb_comm *c, apb_comm_req *req, apb_error *err) {
  (void)c, (void)req, (void)err;
  return APB_OK;
}

static void mpi_destroy(apb_comm *c) {
  if (c) free(c->impl);
  free(c);
}

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
  const char *pv = getenv("APB_MPI_PIECE");
  if (pv && *pv) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(pv, &end, 10);
    if (errno || *end || v < 1 || v > (unsigned long long)INT_MAX || pv[0] == '-')
      return apb_error_set(err, APB_EINVAL, "APB_MPI_PIECE=%s: give a byte count from 1 to %d (or unset it)", pv,
                           INT_MAX);
    piece = (size_t)v;
  }
  double timeout_s = 300, stall_s = 60;
  long stall_rank = -1;
  apb_status est = apb_env_seconds("APB_MPI_TIMEOUT_S", 300, "waits forever", &timeout_s, err);
  if (!est) est = apb_env_seconds("APB_MPI_STALL_S", 60, "does not stall", &stall_s, err);
  if (est) return est;
  const char *sr = getenv("APB_MPI_STALL_RANK");
  if (sr && *sr) {
    char *end = NULL;
    errno = 0;
    stall_rank = strtol(sr, &end, 10);
    if (errno || *end || stall_rank < 0 || stall_rank > INT_MAX)
      return apb_error_set(err, APB_EINVAL, "APB_MPI_STALL_RANK='%s' is not a rank number (a test-only fault hook)", sr);
  }
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
  mpi_state *ms = calloc(1, sizeof *ms);
  if (!c || !ms) {
    free(c), free(ms);
    return apb_error_set(err, APB_ENOMEM, "MPI communicator: out of memory");
  }
  ms->timeout_s = timeout_s, ms->stall_rank = (int)stall_rank, ms->stall_s = stall_s;
  c->impl = ms;
  MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
  MPI_Comm_size(MPI_COMM_WORLD, &c->size);
  if (stall_rank >= c->size) {
    apb_error_set(err, APB_EINVAL, "APB_MPI_STALL_RANK=%ld names no rank of %d (a test-only fault hook)", stall_rank,
                  c->size);
    mpi_destroy(c);
    return APB_EINVAL;
  }
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
