/* gpu/comm_nccl.c: the NCCL communicator (apb/comm.h on device memory) and the multi-GPU runner
 * (apb/nccl.h). Compiled by the C compiler; everything NCCL is under HAVE_NCCL, and without it every
 * entry point says so (APB_EUNSUPPORTED).
 *
 * What it is.
 * - Collectives enqueued on the compute stream (the CUDA backend instance's own stream), so that they
 *   are ordered with its kernels and nothing waits on the host. NCCL has no all-gather with per-rank
 *   sizes: allgatherv is one ncclAllGather when every contribution has the same size, else a group of
 *   ncclBroadcast calls, one per rank with a non-empty contribution, rooted at that rank, into its
 *   slot of recv (the H contributions back to back in rank order). sendrecv and alltoallv are grouped
 *   ncclSend/ncclRecv pairs (a rank's own chunk is a device copy); bcast is ncclBroadcast in place;
 *   barrier is an ncclAllReduce of one int followed by a host wait. Zero-byte transfers are skipped by
 *   every rank alike (every rank knows every size).
 * - The i-variants run on a second stream of the communicator (the communication stream): an event
 *   recorded on the compute stream orders them after the work that produced their input, and their
 *   completion event is what `wait` makes the compute stream wait for. The host never blocks in
 *   either, so compute enqueued between the start and `wait` overlaps the transfer. NCCL runs the
 *   operations of one communicator in the order they are issued, whatever their stream.
 * - Counts: the logical bytes of sim/comm_sim.c (what a collective delivers to other ranks).
 * - Failures. Communicators are non-blocking (config.blocking = 0): a call that answers ncclInProgress
 *   is polled with ncclCommGetAsyncError until it is enqueued, so init, enqueue and teardown cannot
 *   hang. Every collective also records a completion event in a pending list. Host waits (barrier,
 *   apb_nccl_sync, the check exchange) and a watchdog thread per communicator poll those events and
 *   ncclCommGetAsyncError; an NCCL error, or a collective that has not completed within the timeout
 *   (APB_NCCL_TIMEOUT_S, default 300 s; 0 waits forever), marks the communicator failed and aborts it
 *   (ncclCommAbort, which makes NCCL kernels waiting for peers exit, so a thread blocked in a backend
 *   download comes back). Every later call returns the failure (APB_ETIMEOUT, APB_ECOMM, APB_EDEVICE)
 *   naming the rank, the device and the collective with its sizes. A communicator's mutex serialises
 *   its owner thread's NCCL calls, the watchdog and aborts from other threads; no thread ever holds two
 *   of them, and a group abort is only started with none held.
 * - Groups: apb_nccl_group_create (one process, a thread per GPU) shares an abort across its
 *   communicators: one rank's abort or failure aborts all of them, and peers get APB_ECOMM with the
 *   first reason. apb_comm_nccl_mpi (a process per GPU) bootstraps through the MPI communicator of
 *   sim/comm_mpi.c (rank 0's unique id is broadcast on host memory) and ends the job with MPI_Abort on
 *   `abort`, as that communicator does.
 * - APB_NCCL_CHECK=1: before every collective the ranks all-gather what each is about to do (kind,
 *   sequence number, sizes, peers) and compare; a divergence is APB_ECOMM naming both sides instead of
 *   a hang or silent garbage. Costs one small all-gather and a host wait per collective.
 * - apb_nccl_execute: apb_sim_execute for GPUs (one thread, one backend instance and one copy of the
 *   weights per device), with the test-only fault hook APB_FAULT_RANK / APB_FAULT_LAYER.
 *
 * What it deliberately is not: a general NCCL wrapper (no reductions beyond the barrier's), a
 * multi-node launcher, or a recovery mechanism (a failed communicator stays failed).
 *
 * Tested by tests/check_gpu_nccl.c on 2 and 4 GPUs (docs/nccl.md says how to run it).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "apb/nccl.h"
#include "apb/sim.h"
#include "../lib/env.h"

#ifdef HAVE_NCCL
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

#include <cuda_runtime_api.h>
/* nccl.h declares a few functions with empty parameter lists, which -Wstrict-prototypes reports */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop

#include "apb/cuda.h"

#define DEFAULT_TIMEOUT_S 300.0

/* ---------------------------------------------------------------- small helpers */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s) {
  struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  nanosleep(&ts, NULL);
}

/* One pause of a polling loop: yield for the first rounds (an enqueue usually settles within tens of
 * microseconds, below a sleep's granularity), then sleep, backing off to 1 ms. */
static void poll_pause(int *round) {
  if (*round < 64) {
    sched_yield();
  } else {
    double s = 50e-6 * (double)(1 << (*round - 64 < 5 ? *round - 64 : 5));
    sleep_s(s < 1e-3 ? s : 1e-3);
  }
  (*round)++;
}

static const char *nccl_last(ncclComm_t nc) {
  const char *s = ncclGetLastError(nc);
  return s && *s ? s : "(no further detail from NCCL)";
}

/* The collective timeout: APB_NCCL_TIMEOUT_S (seconds, >= 0, 0 = none) or the default. */
static apb_status env_timeout(double *out, apb_error *err) {
  return apb_env_seconds("APB_NCCL_TIMEOUT_S", DEFAULT_TIMEOUT_S, "waits forever", out, err);
}

static int env_flag(const char *name) {
  const char *s = getenv(name);
  return s && *s && strcmp(s, "0") != 0;
}

/* Every NCCL call goes through NCCK (ncclInProgress is not an error on a non-blocking communicator:
 * the caller polls), every CUDA call through CUCK; both record the call text, file:line, rank and
 * device into err, set st and jump to `done`. */
#define NCCK(rank, dev, nc, call)                                                                      \
  do {                                                                                                 \
    ncclResult_t nc_r_ = (call);                                                                       \
    if (nc_r_ != ncclSuccess && nc_r_ != ncclInProgress) {                                             \
      st = apb_error_set(err, APB_ECOMM, "%s failed at %s:%d (rank %d, device %d): %s: %s", #call,     \
                         __FILE__, __LINE__, (rank), (dev), ncclGetErrorString(nc_r_), nccl_last(nc)); \
      goto done;                                                                                       \
    }                                                                                                  \
  } while (0)

#define CUCK(rank, dev, call)                                                                          \
  do {                                                                                                 \
    cudaError_t cu_e_ = (call);                                                                        \
    if (cu_e_ != cudaSuccess) {                                                                        \
      st = apb_error_set(err, APB_EDEVICE, "%s failed at %s:%d (rank %d, device %d): %s (%s)", #call,  \
                         __FILE__, __LINE__, (rank), (dev), cudaGetErrorString(cu_e_),                 \
                         cudaGetErrorName(cu_e_));                                                     \
      goto done;                                                                                       \
    }                                                                                                  \
  } while (0)

/* Make dev current for the calling thread, remembering the previous device (restored by dev_leave). */
static int dev_enter(int dev) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess) cur = -1;
  if (cur != dev) cudaSetDevice(dev);
  return cur;
}
static void dev_leave(int prev, int dev) {
  if (prev >= 0 && prev != dev) cudaSetDevice(prev);
}

/* ---------------------------------------------------------------- the communicator's state */

typedef struct pend {     /* a collective enqueued and not yet seen complete */
  cudaEvent_t ev;         /* recorded right after it, on its stream */
  apb_coll kind;
  int64_t seq;
  size_t bytes;           /* what this rank moves in it (for messages) */
  double t;               /* when it was enqueued */
} pend;

typedef struct fp_rec {   /* APB_NCCL_CHECK: what a rank is about to do */
  int32_t kind, dst, src, root;
  int64_t seq;
  uint64_t a, b;          /* allgather: hash of bytes[]; sendrecv: sbytes, rbytes; bcast: bytes */
} fp_rec;

typedef struct nc_group nc_group;

typedef struct nc_comm {
  apb_comm *pub;          /* the apb_comm this is the impl of (NULL once destroyed) */
  int rank, size, dev;
  ncclComm_t nc;          /* NULL once aborted or destroyed */
  cudaStream_t cs;        /* compute stream: the backend instance's */
  cudaStream_t xs;        /* communication stream of the i-variants (ours, highest priority) */
  nc_group *g;            /* in-process group; NULL under MPI */
  apb_comm *boot;         /* MPI communicator of the bootstrap (MPI_Abort on abort); NULL in a group */
  double timeout_s;
  int check;              /* APB_NCCL_CHECK */
  int64_t seq;            /* collectives started on this rank */
  pthread_mutex_t mu;     /* guards everything below, and every NCCL call on nc */
  int dead;               /* ncclCommAbort was called */
  apb_status fail_st;     /* first failure (APB_OK while healthy) */
  char fail_msg[APB_ERROR_MSG_MAX];
  pend *pend;             /* [n_pend] in enqueue order */
  int n_pend, cap_pend;
  double head_t;          /* when pend[0] became the oldest pending collective */
  int *scratch;           /* [1] device int: the barrier's all-reduce */
  fp_rec *fp_dev;         /* [H] device: the check exchange */
  fp_rec *fp_host;        /* [H] pinned host */
  pthread_t wd;
  int wd_on, wd_stop;
  pthread_cond_t wd_cv;
  int fault_armed;        /* apb_nccl_execute's fault hook fired: fail the next call */
  char fault_msg[256];
  int timing;             /* APB_NCCL_TIMING / apb_nccl_opts.comm_timing: time the compute stream's */
  apb_backend *be;        /* the backend instance whose stream cs is; its timing marks (be->ops->mark) */
  void **tev;             /* time collectives and waits: [n_tev] start/end pairs on cs, owner thread */
  int n_tev, cap_tev;     /* only, resolved into stats.visible_s by apb_nccl_sync */
} nc_comm;

struct nc_group {
  int H;
  pthread_mutex_t mu;     /* guards why, origin, live; never held with a member's mu */
  atomic_int aborted;
  int origin;             /* rank whose abort or failure aborted the group (-1: none) */
  char why[APB_ERROR_MSG_MAX];
  nc_comm **members;      /* [H] */
  int live;               /* apb_comms not yet destroyed */
};

struct apb_comm_req {     /* an i-variant in flight */
  cudaEvent_t done;       /* recorded on the communication stream after the operations */
  apb_coll kind;
  int64_t seq;
};

static apb_status err_from(nc_comm *x, apb_error *err) {
  return apb_error_set(err, x->fail_st, "%s", x->fail_msg);
}

/* With x->mu held: record the first failure of x and abort its NCCL communicator (abort_nccl) unless
 * it is gone already. Returns x's failure status. The caller spreads it to the group after unlocking
 * (spread). */
static apb_status fail_locked(nc_comm *x, int abort_nccl, apb_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
static apb_status fail_locked(nc_comm *x, int abort_nccl, apb_status st, const char *fmt, ...) {
  if (x->fail_st == APB_OK) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->fail_msg, sizeof x->fail_msg, fmt, ap);
    va_end(ap);
    x->fail_st = st;
  }
  if (abort_nccl && !x->dead && x->nc) {
    int prev = dev_enter(x->dev);
    ncclCommAbort(x->nc); /* its result does not matter: the communicator is gone either way */
    dev_leave(prev, x->dev);
    x->nc = NULL;
    x->dead = 1;
  }
  return x->fail_st;
}

/* Abort every communicator of g (first reason wins). Called with no communicator mutex held. */
static void group_abort(nc_group *g, int origin, const char *why) {
  pthread_mutex_lock(&g->mu);
  if (!atomic_load(&g->aborted)) {
    snprintf(g->why, sizeof g->why, "%s", why);
    g->origin = origin;
    atomic_store(&g->aborted, 1);
  }
  char reason[APB_ERROR_MSG_MAX];
  snprintf(reason, sizeof reason, "%s", g->why);
  pthread_mutex_unlock(&g->mu);
  for (int r = 0; r < g->H; r++) {
    nc_comm *m = g->members[r];
    if (!m) continue;
    pthread_mutex_lock(&m->mu);
    fail_locked(m, 1, APB_ECOMM, "rank %d (device %d): the NCCL group was aborted: %s", m->rank, m->dev, reason);
    pthread_mutex_unlock(&m->mu);
  }
}

/* After x failed (and with x->mu not held): in a group, take the others down with it. Under MPI the
 * program reports and calls abort (MPI_Abort) from its main thread. */
static void spread(nc_comm *x) {
  if (!x->g) return;
  char why[APB_ERROR_MSG_MAX];
  pthread_mutex_lock(&x->mu);
  snprintf(why, sizeof why, "%s", x->fail_msg);
  pthread_mutex_unlock(&x->mu);
  group_abort(x->g, x->rank, why);
}

static const char *kind_name(apb_coll k) { return apb_coll_name(k); }

/* With x->mu held, once x's group was aborted: fail x with the group's reason (what: the collective
 * x was in, or NULL). */
static apb_status fail_aborted_locked(nc_comm *x, const char *what) {
  char why[APB_ERROR_MSG_MAX];
  pthread_mutex_lock(&x->g->mu);
  snprintf(why, sizeof why, "%s", x->g->why);
  pthread_mutex_unlock(&x->g->mu);
  return fail_locked(x, 1, APB_ECOMM, "rank %d (device %d): %s%sthe NCCL group was aborted: %s", x->rank, x->dev,
                     what ? what : "", what ? ": " : "", why);
}

/* With x->mu held: forget completed collectives, then fail x on an asynchronous NCCL error, a CUDA
 * error, or the oldest pending collective exceeding the timeout (measured from when it was enqueued
 * or became the oldest, whichever is later, so that a long queue of healthy work is not blamed). */
static apb_status scan_locked(nc_comm *x) {
  if (x->fail_st) return x->fail_st;
  if (x->g && atomic_load(&x->g->aborted)) return fail_aborted_locked(x, NULL);
  if (x->nc) {
    ncclResult_t a = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(x->nc, &a);
    if (r != ncclSuccess)
      return fail_locked(x, 1, APB_ECOMM, "ncclCommGetAsyncError failed (rank %d, device %d): %s: %s", x->rank,
                         x->dev, ncclGetErrorString(r), nccl_last(x->nc));
    if (a != ncclSuccess && a != ncclInProgress) {
      const char *what = x->n_pend ? kind_name(x->pend[0].kind) : "(no collective pending)";
      long long seq = x->n_pend ? (long long)x->pend[0].seq : -1;
      return fail_locked(x, 1, APB_ECOMM, "rank %d (device %d): asynchronous NCCL error during %s #%lld: %s: %s",
                         x->rank, x->dev, what, seq, ncclGetErrorString(a), nccl_last(x->nc));
    }
  }
  double t = now_s();
  int k = 0;
  for (int i = 0; i < x->n_pend; i++) {
    cudaError_t q = cudaEventQuery(x->pend[i].ev);
    if (q == cudaSuccess) {
      cudaEventDestroy(x->pend[i].ev);
      if (k == 0) x->head_t = t;
      continue;
    }
    if (q != cudaErrorNotReady)
      return fail_locked(x, 1, APB_EDEVICE, "rank %d (device %d): %s #%lld: cudaEventQuery: %s (%s)", x->rank,
                         x->dev, kind_name(x->pend[i].kind), (long long)x->pend[i].seq, cudaGetErrorString(q),
                         cudaGetErrorName(q));
    x->pend[k++] = x->pend[i];
  }
  x->n_pend = k;
  if (k > 0 && x->timeout_s > 0) {
    const pend *p = &x->pend[0];
    double since = p->t > x->head_t ? p->t : x->head_t;
    if (t - since > x->timeout_s)
      return fail_locked(x, 1, APB_ETIMEOUT,
                         "rank %d (device %d): %s #%lld (%zu bytes on this rank) did not complete within %.3g s "
                         "(APB_NCCL_TIMEOUT_S): a peer failed, diverged or never called it",
                         x->rank, x->dev, kind_name(p->kind), (long long)p->seq, p->bytes, x->timeout_s);
  }
  return APB_OK;
}

/* Timing on: a timing mark of the backend on the compute stream (one end of a start/end pair). Owner
 * thread only. */
static apb_status tmark(nc_comm *x, apb_error *err) {
  if (!x->timing) return APB_OK;
  if (x->n_tev == x->cap_tev) {
    int cap = x->cap_tev ? 2 * x->cap_tev : 256;
    void **t = realloc(x->tev, sizeof *t * (size_t)cap);
    if (!t) return apb_error_set(err, APB_ENOMEM, "rank %d: out of memory for the timing marks", x->rank);
    x->tev = t, x->cap_tev = cap;
  }
  apb_status st = x->be->ops->mark(x->be, &x->tev[x->n_tev], err);
  if (st == APB_OK) x->n_tev++;
  return st;
}

/* After the compute stream has drained: add the pairs' elapsed times to stats.visible_s and drop them
 * (an unpaired last mark, from a call that failed half-way, is dropped too). */
static void tresolve(nc_comm *x) {
  double s = 0;
  for (int i = 0; i + 1 < x->n_tev; i += 2) {
    double e = 0;
    if (x->be->ops->mark_elapsed(x->be, x->tev[i], x->tev[i + 1], &e, NULL) == APB_OK) s += e;
  }
  for (int i = 0; i < x->n_tev; i++) x->be->ops->mark_free(x->be, x->tev[i]);
  x->n_tev = 0;
  if (x->pub) x->pub->stats.visible_s += s;
}

/* With x->mu held: record a completion event for a collective just enqueued on stream s. */
static apb_status push_pending(nc_comm *x, cudaStream_t s, apb_coll kind, int64_t seq, size_t bytes, apb_error *err) {
  apb_status st = APB_OK;
  cudaEvent_t ev = NULL;
  if (x->n_pend == x->cap_pend) {
    int cap = x->cap_pend ? 2 * x->cap_pend : 64;
    pend *p = realloc(x->pend, sizeof *p * (size_t)cap);
    if (!p) return apb_error_set(err, APB_ENOMEM, "rank %d: out of memory for the pending-collective list", x->rank);
    x->pend = p, x->cap_pend = cap;
  }
  CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  CUCK(x->rank, x->dev, cudaEventRecord(ev, s));
  if (x->n_pend == 0) x->head_t = now_s();
  x->pend[x->n_pend++] = (pend){ev, kind, seq, bytes, now_s()};
  ev = NULL;
done:
  if (ev) cudaEventDestroy(ev);
  return st;
}

/* With x->mu held: after ncclGroupEnd (or a lone call) answered ncclInProgress, poll until NCCL has
 * enqueued everything (or failed), watching the group's abort flag and the timeout. */
static apb_status settle_locked(nc_comm *x, const char *what, apb_error *err) {
  double t0 = now_s();
  int round = 0;
  for (;;) {
    ncclResult_t a = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(x->nc, &a);
    if (r != ncclSuccess)
      a = r;
    if (a == ncclSuccess) break;
    if (a != ncclInProgress) {
      fail_locked(x, 1, APB_ECOMM, "rank %d (device %d): %s: NCCL failed while enqueuing: %s: %s", x->rank, x->dev,
                  what, ncclGetErrorString(a), nccl_last(x->nc));
      return err_from(x, err);
    }
    if (x->g && atomic_load(&x->g->aborted)) {
      fail_aborted_locked(x, what);
      return err_from(x, err);
    }
    if (x->timeout_s > 0 && now_s() - t0 > x->timeout_s) {
      fail_locked(x, 1, APB_ETIMEOUT,
                  "rank %d (device %d): %s: NCCL did not finish enqueuing within %.3g s (APB_NCCL_TIMEOUT_S): "
                  "a peer never joined (connection setup needs every rank)", x->rank, x->dev, what, x->timeout_s);
      return err_from(x, err);
    }
    poll_pause(&round);
  }
  if (x->pub) x->pub->stats.wait_s += now_s() - t0;
  return APB_OK;
}

/* Host wait for ev (recorded on one of x's streams) with x->mu NOT held, polling for failures. After
 * the event completes, x must still be healthy: an abort lets NCCL kernels finish with garbage. */
static apb_status wait_event(nc_comm *x, cudaEvent_t ev, const char *what, apb_error *err) {
  double t0 = now_s();
  apb_status st = APB_OK;
  int failed = 0, round = 0;
  for (;;) {
    cudaError_t q = cudaEventQuery(ev);
    pthread_mutex_lock(&x->mu);
    if (q != cudaSuccess && q != cudaErrorNotReady)
      fail_locked(x, 1, APB_EDEVICE, "rank %d (device %d): waiting for %s: cudaEventQuery: %s (%s)", x->rank, x->dev,
                  what, cudaGetErrorString(q), cudaGetErrorName(q));
    st = scan_locked(x);
    if (!st && q == cudaErrorNotReady && x->timeout_s > 0 && now_s() - t0 > x->timeout_s)
      st = fail_locked(x, 1, APB_ETIMEOUT,
                       "rank %d (device %d): waited %.3g s for %s (APB_NCCL_TIMEOUT_S): a peer failed, diverged or "
                       "never called it", x->rank, x->dev, now_s() - t0, what);
    if (st) {
      apb_error_set(err, st, "%s", x->fail_msg);
      failed = 1;
    }
    pthread_mutex_unlock(&x->mu);
    if (st || q == cudaSuccess) break;
    poll_pause(&round);
  }
  if (x->pub) x->pub->stats.wait_s += now_s() - t0;
  if (failed) spread(x);
  return st;
}

/* ---------------------------------------------------------------- one collective */

typedef struct coll {
  apb_coll kind;
  const void *send;
  void *recv;
  const size_t *bytes;    /* allgatherv: [H] contributions; alltoallv: [H] send sizes */
  const size_t *rbytes;   /* alltoallv: [H] receive sizes */
  size_t sbytes, rbytes1; /* sendrecv; bcast: sbytes */
  int dst, src, root;
  size_t moved;           /* bytes this rank sends plus receives (for messages) */
} coll;

static uint64_t hash_sizes(const size_t *v, int n) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < n; i++) {
    uint64_t s = (uint64_t)v[i];
    for (int b = 0; b < 8; b++) h = (h ^ ((s >> (8 * b)) & 0xff)) * 1099511628211ull;
  }
  return h;
}

static void describe(const fp_rec *f, char *buf, size_t len) {
  switch ((apb_coll)f->kind) {
  case APB_COLL_SENDRECV:
    snprintf(buf, len, "sendrecv #%lld (%llu bytes to rank %d, %llu bytes from rank %d)", (long long)f->seq,
             (unsigned long long)f->a, f->dst, (unsigned long long)f->b, f->src);
    break;
  case APB_COLL_BCAST:
    snprintf(buf, len, "bcast #%lld (%llu bytes from root %d)", (long long)f->seq, (unsigned long long)f->a, f->root);
    break;
  case APB_COLL_ALLGATHER:
    snprintf(buf, len, "allgather #%lld (sizes hash %016llx)", (long long)f->seq, (unsigned long long)f->a);
    break;
  default:
    snprintf(buf, len, "%s #%lld", kind_name((apb_coll)f->kind), (long long)f->seq);
  }
}

/* APB_NCCL_CHECK, with x->mu held: enqueue the exchange of fp records and an event after it. */
static apb_status exchange_locked(nc_comm *x, const fp_rec *mine, cudaEvent_t *ev, apb_error *err) {
  apb_status st = APB_OK;
  int H = x->size, me = x->rank;
  if ((st = scan_locked(x))) return err_from(x, err);
  x->fp_host[me] = *mine;
  CUCK(me, x->dev, cudaMemcpyAsync(&x->fp_dev[me], &x->fp_host[me], sizeof *mine, cudaMemcpyHostToDevice, x->cs));
  NCCK(me, x->dev, x->nc, ncclAllGather(&x->fp_dev[me], x->fp_dev, sizeof *mine, ncclUint8, x->nc, x->cs));
  if ((st = settle_locked(x, "the APB_NCCL_CHECK exchange", err))) goto done;
  CUCK(me, x->dev, cudaMemcpyAsync(x->fp_host, x->fp_dev, sizeof *mine * (size_t)H, cudaMemcpyDeviceToHost, x->cs));
  if ((st = push_pending(x, x->cs, (apb_coll)mine->kind, mine->seq, sizeof *mine * (size_t)H, err))) goto done;
  CUCK(me, x->dev, cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
  CUCK(me, x->dev, cudaEventRecord(*ev, x->cs));
done:
  return st;
}

/* APB_NCCL_CHECK: all-gather what every rank is about to do (kind, sequence number, sizes, peers) and
 * compare, so that a divergence is an error naming both sides instead of a hang. x->mu not held. */
static apb_status check_exchange(nc_comm *x, const coll *k, apb_error *err) {
  int H = x->size, me = x->rank;
  fp_rec mine = {.kind = (int32_t)k->kind, .dst = -1, .src = -1, .root = -1, .seq = x->seq};
  if (k->kind == APB_COLL_ALLGATHER) mine.a = hash_sizes(k->bytes, H);
  if (k->kind == APB_COLL_SENDRECV) mine.dst = k->dst, mine.src = k->src, mine.a = k->sbytes, mine.b = k->rbytes1;
  if (k->kind == APB_COLL_BCAST) mine.root = k->root, mine.a = k->sbytes;
  cudaEvent_t ev = NULL;
  pthread_mutex_lock(&x->mu);
  apb_status st = exchange_locked(x, &mine, &ev, err);
  if (st && x->fail_st == APB_OK) fail_locked(x, 1, st, "%s", err ? err->msg : apb_status_str(st));
  int failed = x->fail_st != APB_OK;
  pthread_mutex_unlock(&x->mu);
  if (failed) spread(x);
  if (!st) st = wait_event(x, ev, "the APB_NCCL_CHECK exchange", err);
  if (ev) cudaEventDestroy(ev);
  for (int r = 0; !st && r < H; r++) {
    const fp_rec *o = &x->fp_host[r];
    int bad = o->kind != mine.kind || o->seq != mine.seq;
    if (!bad && mine.kind == APB_COLL_ALLGATHER) bad = o->a != mine.a;
    if (!bad && mine.kind == APB_COLL_BCAST) bad = o->root != mine.root || o->a != mine.a;
    if (!bad && mine.kind == APB_COLL_SENDRECV && r == mine.src) bad = o->dst != me || o->a != mine.b;
    if (!bad && mine.kind == APB_COLL_SENDRECV && r == mine.dst) bad = o->src != me || o->b != mine.a;
    if (bad) { /* every rank sees the same table: each fails on its own, NCCL itself is still sound */
      char a[160], b[160];
      describe(&mine, a, sizeof a);
      describe(o, b, sizeof b);
      pthread_mutex_lock(&x->mu);
      fail_locked(x, 0, APB_ECOMM, "rank %d (device %d) is in %s while rank %d is in %s: the ranks diverged "
                  "(APB_NCCL_CHECK)", me, x->dev, a, r, b);
      st = err_from(x, err);
      pthread_mutex_unlock(&x->mu);
    }
  }
  return st;
}

/* The NCCL calls of one collective on stream s, between ncclGroupStart and ncclGroupEnd. x->mu held. */
static apb_status enqueue_body(nc_comm *x, const coll *k, cudaStream_t s, apb_error *err) {
  apb_status st = APB_OK;
  int H = x->size, me = x->rank, dev = x->dev;
  ncclComm_t nc = x->nc;
  switch (k->kind) {
  case APB_COLL_ALLGATHER: {
    int uniform = 1;
    for (int r = 1; r < H; r++) uniform &= k->bytes[r] == k->bytes[0];
    if (uniform) {
      if (k->bytes[0] > 0)
        NCCK(me, dev, nc, ncclAllGather(k->send, k->recv, k->bytes[0], ncclUint8, nc, s));
      break;
    }
    size_t off = 0;
    for (int r = 0; r < H; r++) {
      char *slot = (char *)k->recv + off;
      if (k->bytes[r] > 0)
        NCCK(me, dev, nc, ncclBroadcast(r == me ? k->send : slot, slot, k->bytes[r], ncclUint8, r, nc, s));
      off += k->bytes[r];
    }
    break;
  }
  case APB_COLL_SENDRECV:
    if (k->dst >= 0 && k->dst != me && k->sbytes > 0)
      NCCK(me, dev, nc, ncclSend(k->send, k->sbytes, ncclUint8, k->dst, nc, s));
    if (k->src >= 0 && k->src != me && k->rbytes1 > 0)
      NCCK(me, dev, nc, ncclRecv(k->recv, k->rbytes1, ncclUint8, k->src, nc, s));
    break;
  case APB_COLL_ALLTOALL: {
    size_t so = 0, ro = 0;
    for (int p = 0; p < H; p++) {
      if (p != me && k->bytes[p] > 0)
        NCCK(me, dev, nc, ncclSend((const char *)k->send + so, k->bytes[p], ncclUint8, p, nc, s));
      if (p != me && k->rbytes[p] > 0)
        NCCK(me, dev, nc, ncclRecv((char *)k->recv + ro, k->rbytes[p], ncclUint8, p, nc, s));
      so += k->bytes[p], ro += k->rbytes[p];
    }
    break;
  }
  case APB_COLL_BCAST:
    if (k->sbytes > 0) NCCK(me, dev, nc, ncclBroadcast(k->recv, k->recv, k->sbytes, ncclUint8, k->root, nc, s));
    break;
  case APB_COLL_BARRIER:
    NCCK(me, dev, nc, ncclAllReduce(x->scratch, x->scratch, 1, ncclInt32, ncclSum, nc, s));
    break;
  case APB_COLL_COUNT: break;
  }
done:
  return st;
}

/* Device copies a rank makes to itself (outside NCCL): its own chunk of alltoallv, a sendrecv to
 * itself. x->mu held. */
static apb_status self_copies(nc_comm *x, const coll *k, cudaStream_t s, apb_error *err) {
  apb_status st = APB_OK;
  int me = x->rank;
  if (k->kind == APB_COLL_ALLTOALL && k->bytes[me] > 0) {
    size_t so = 0, ro = 0;
    for (int p = 0; p < me; p++) so += k->bytes[p], ro += k->rbytes[p];
    CUCK(me, x->dev, cudaMemcpyAsync((char *)k->recv + ro, (const char *)k->send + so, k->bytes[me],
                                     cudaMemcpyDeviceToDevice, s));
  }
  if (k->kind == APB_COLL_SENDRECV && k->dst == me && k->src == me && k->sbytes > 0 && k->send != k->recv)
    CUCK(me, x->dev, cudaMemcpyAsync(k->recv, k->send, k->sbytes, cudaMemcpyDeviceToDevice, s));
done:
  return st;
}

static void count(apb_comm *c, const coll *k) {
  int H = c->size, me = c->rank;
  apb_comm_stats *s = &c->stats;
  s->calls[k->kind]++;
  switch (k->kind) {
  case APB_COLL_ALLGATHER:
    s->bytes_sent[k->kind] += (int64_t)k->bytes[me] * (H - 1);
    for (int r = 0; r < H; r++)
      if (r != me) s->bytes_recv[k->kind] += (int64_t)k->bytes[r];
    break;
  case APB_COLL_SENDRECV:
    if (k->dst >= 0 && k->dst != me) s->bytes_sent[k->kind] += (int64_t)k->sbytes;
    if (k->src >= 0 && k->src != me) s->bytes_recv[k->kind] += (int64_t)k->rbytes1;
    break;
  case APB_COLL_ALLTOALL:
    for (int r = 0; r < H; r++)
      if (r != me) s->bytes_sent[k->kind] += (int64_t)k->bytes[r], s->bytes_recv[k->kind] += (int64_t)k->rbytes[r];
    break;
  case APB_COLL_BCAST:
    if (me == k->root) s->bytes_sent[k->kind] += (int64_t)k->sbytes * (H - 1);
    else s->bytes_recv[k->kind] += (int64_t)k->sbytes;
    break;
  default: break;
  }
}

/* Start collective k: on the compute stream (async 0), or on the communication stream after an event
 * of the compute stream (async 1, *req gets its completion event). Barriers also wait on the host. */
static apb_status issue(apb_comm *c, coll *k, int async, apb_comm_req **req, apb_error *err) {
  nc_comm *x = c->impl;
  apb_status st = APB_OK;
  int prev = dev_enter(x->dev), locked = 0, in_group = 0;
  cudaEvent_t ev_start = NULL, ev_bar = NULL;
  apb_comm_req *rq = NULL;
  char what[96];
  snprintf(what, sizeof what, "%s #%lld", kind_name(k->kind), (long long)x->seq);
  if (req) *req = NULL;
  if (x->fault_armed) {
    st = apb_error_set(err, APB_EINVAL, "%s", x->fault_msg);
    goto out;
  }
  if (x->check && (st = check_exchange(x, k, err))) goto out;
  cudaStream_t s = async ? x->xs : x->cs;
  pthread_mutex_lock(&x->mu);
  locked = 1;
  if ((st = scan_locked(x))) {
    st = err_from(x, err);
    goto done;
  }
  if (async) {
    rq = calloc(1, sizeof *rq);
    if (!rq) {
      st = apb_error_set(err, APB_ENOMEM, "rank %d: out of memory for a request", x->rank);
      goto done;
    }
    CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&ev_start, cudaEventDisableTiming));
    CUCK(x->rank, x->dev, cudaEventRecord(ev_start, x->cs));
    CUCK(x->rank, x->dev, cudaStreamWaitEvent(x->xs, ev_start, 0));
  }
  if (!async && (st = tmark(x, err))) goto done;
  if ((st = self_copies(x, k, s, err))) goto done;
  NCCK(x->rank, x->dev, x->nc, ncclGroupStart());
  in_group = 1;
  st = enqueue_body(x, k, s, err);
  in_group = 0;
  ncclResult_t ge = ncclGroupEnd();
  if (st) goto done;
  if (ge != ncclSuccess && ge != ncclInProgress) {
    st = apb_error_set(err, APB_ECOMM, "ncclGroupEnd() failed for %s (rank %d, device %d, %zu bytes): %s: %s", what,
                       x->rank, x->dev, k->moved, ncclGetErrorString(ge), nccl_last(x->nc));
    goto done;
  }
  if ((st = settle_locked(x, what, err))) goto done;
  if (!async && (st = tmark(x, err))) goto done;
  if ((st = push_pending(x, s, k->kind, x->seq, k->moved, err))) goto done;
  if (async) {
    CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&rq->done, cudaEventDisableTiming));
    CUCK(x->rank, x->dev, cudaEventRecord(rq->done, x->xs));
    rq->kind = k->kind, rq->seq = x->seq;
    *req = rq;
    rq = NULL;
  }
  if (k->kind == APB_COLL_BARRIER) {
    CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&ev_bar, cudaEventDisableTiming));
    CUCK(x->rank, x->dev, cudaEventRecord(ev_bar, x->cs));
  }
  x->seq++;
  count(c, k);
done:
  if (in_group) ncclGroupEnd();
  if (ev_start) cudaEventDestroy(ev_start);
  if (rq) {
    if (rq->done) cudaEventDestroy(rq->done);
    free(rq);
  }
  if (locked) {
    /* any failure once this rank has started a collective leaves it out of step with its peers (they
     * may have enqueued theirs): fatal for the communicator, and for the group */
    if (st && x->fail_st == APB_OK) fail_locked(x, 1, st, "%s", err ? err->msg : apb_status_str(st));
    int failed = x->fail_st != APB_OK;
    pthread_mutex_unlock(&x->mu);
    if (failed) spread(x);
  }
  if (!st && ev_bar) st = wait_event(x, ev_bar, what, err);
  if (ev_bar) cudaEventDestroy(ev_bar);
out:
  dev_leave(prev, x->dev);
  return st;
}

/* ---------------------------------------------------------------- apb_comm_ops */

static apb_status check_buf(apb_comm *c, const char *coll_name, const void *p, size_t n, const char *which,
                            apb_error *err) {
  if (n > 0 && !p)
    return apb_error_set(err, APB_EINVAL, "%s: rank %d passes a NULL %s buffer for %zu bytes", coll_name, c->rank, which,
                         n);
  return APB_OK;
}

static apb_status start_allgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes, int async,
                                   apb_comm_req **req, apb_error *err) {
  if (req) *req = NULL;
  if (!bytes) return apb_error_set(err, APB_EINVAL, "allgather: rank %d passes no sizes", c->rank);
  size_t total = 0;
  for (int r = 0; r < c->size; r++) total += bytes[r];
  apb_status st;
  if ((st = check_buf(c, "allgather", send, bytes[c->rank], "send", err)) ||
      (st = check_buf(c, "allgather", recv, total, "recv", err)))
    return st;
  coll k = {.kind = APB_COLL_ALLGATHER, .send = send, .recv = recv, .bytes = bytes, .moved = total};
  return issue(c, &k, async, req, err);
}

static apb_status nc_allgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes, apb_error *err) {
  return start_allgatherv(c, send, recv, bytes, 0, NULL, err);
}

static apb_status nc_iallgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes, apb_comm_req **req,
                                 apb_error *err) {
  if (!req) return apb_error_set(err, APB_EINVAL, "iallgather: rank %d passes no request pointer", c->rank);
  return start_allgatherv(c, send, recv, bytes, 1, req, err);
}

static apb_status start_sendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                                 int src, int async, apb_comm_req **req, apb_error *err) {
  if (req) *req = NULL;
  if (dst >= c->size || src >= c->size || dst < -1 || src < -1)
    return apb_error_set(err, APB_EINVAL, "sendrecv: rank %d names peer %d/%d of %d ranks", c->rank, dst, src, c->size);
  if ((dst == c->rank) != (src == c->rank) || (dst == c->rank && sbytes != rbytes))
    return apb_error_set(err, APB_EINVAL,
                         "sendrecv: rank %d sends %zu bytes to rank %d and receives %zu from rank %d: a rank that "
                         "sends to itself must receive the same bytes from itself", c->rank, sbytes, dst, rbytes, src);
  apb_status st;
  if ((dst >= 0 && (st = check_buf(c, "sendrecv", send, sbytes, "send", err))) ||
      (src >= 0 && (st = check_buf(c, "sendrecv", recv, rbytes, "recv", err))))
    return st;
  coll k = {.kind = APB_COLL_SENDRECV, .send = send, .recv = recv, .sbytes = dst >= 0 ? sbytes : 0,
            .rbytes1 = src >= 0 ? rbytes : 0, .dst = dst, .src = src};
  k.moved = k.sbytes + k.rbytes1;
  return issue(c, &k, async, req, err);
}

static apb_status nc_sendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                              int src, apb_error *err) {
  return start_sendrecv(c, send, sbytes, dst, recv, rbytes, src, 0, NULL, err);
}

static apb_status nc_isendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                               int src, apb_comm_req **req, apb_error *err) {
  if (!req) return apb_error_set(err, APB_EINVAL, "isendrecv: rank %d passes no request pointer", c->rank);
  return start_sendrecv(c, send, sbytes, dst, recv, rbytes, src, 1, req, err);
}

static apb_status start_alltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                  const size_t *rbytes, int async, apb_comm_req **req, apb_error *err) {
  if (req) *req = NULL;
  if (!sbytes || !rbytes) return apb_error_set(err, APB_EINVAL, "alltoall: rank %d passes no sizes", c->rank);
  if (sbytes[c->rank] != rbytes[c->rank])
    return apb_error_set(err, APB_EINVAL, "alltoall: rank %d sends itself %zu bytes but expects %zu from itself",
                         c->rank, sbytes[c->rank], rbytes[c->rank]);
  size_t st_ = 0, rt = 0;
  for (int r = 0; r < c->size; r++) st_ += sbytes[r], rt += rbytes[r];
  apb_status st;
  if ((st = check_buf(c, "alltoall", send, st_, "send", err)) || (st = check_buf(c, "alltoall", recv, rt, "recv", err)))
    return st;
  coll k = {.kind = APB_COLL_ALLTOALL, .send = send, .recv = recv, .bytes = sbytes, .rbytes = rbytes,
            .moved = st_ + rt};
  return issue(c, &k, async, req, err);
}

static apb_status nc_alltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv, const size_t *rbytes,
                               apb_error *err) {
  return start_alltoallv(c, send, sbytes, recv, rbytes, 0, NULL, err);
}

static apb_status nc_ialltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                const size_t *rbytes, apb_comm_req **req, apb_error *err) {
  if (!req) return apb_error_set(err, APB_EINVAL, "ialltoall: rank %d passes no request pointer", c->rank);
  return start_alltoallv(c, send, sbytes, recv, rbytes, 1, req, err);
}

static apb_status nc_bcast(apb_comm *c, void *buf, size_t bytes, int root, apb_error *err) {
  if (root < 0 || root >= c->size)
    return apb_error_set(err, APB_EINVAL, "bcast: root %d is not a rank of %d", root, c->size);
  apb_status st = check_buf(c, "bcast", buf, bytes, "", err);
  if (st) return st;
  coll k = {.kind = APB_COLL_BCAST, .send = buf, .recv = buf, .sbytes = bytes, .root = root, .moved = bytes};
  return issue(c, &k, 0, NULL, err);
}

static apb_status nc_barrier(apb_comm *c, apb_error *err) {
  coll k = {.kind = APB_COLL_BARRIER, .moved = sizeof(int)};
  return issue(c, &k, 0, NULL, err);
}

/* Stream-ordered: the compute stream waits for the request's completion event; the host goes on.
 * A failure already known (a peer's abort, an asynchronous error) is returned here. */
static apb_status nc_wait(apb_comm *c, apb_comm_req *req, apb_error *err) {
  if (!req) return APB_OK;
  nc_comm *x = c->impl;
  apb_status st = APB_OK;
  int prev = dev_enter(x->dev), failed = 0;
  pthread_mutex_lock(&x->mu);
  if ((st = scan_locked(x))) {
    st = err_from(x, err);
    failed = 1;
  }
  pthread_mutex_unlock(&x->mu);
  if (failed) spread(x);
  if (!st) st = tmark(x, err);
  if (!st) CUCK(x->rank, x->dev, cudaStreamWaitEvent(x->cs, req->done, 0));
  if (!st) st = tmark(x, err);
done:
  cudaEventDestroy(req->done);
  free(req);
  dev_leave(prev, x->dev);
  return st;
}

static void nc_abort(apb_comm *c, const char *why) {
  nc_comm *x = c->impl;
  pthread_mutex_lock(&x->mu);
  fail_locked(x, 1, APB_ECOMM, "rank %d (device %d) aborted: %s", x->rank, x->dev, why ? why : "(no reason given)");
  pthread_mutex_unlock(&x->mu);
  if (x->g) {
    spread(x);
  } else if (x->boot) {
    x->boot->ops->abort(x->boot, why); /* MPI_Abort: the peers are in other processes */
  }
}

/* ---------------------------------------------------------------- lifetime */

static void *watchdog(void *p) {
  nc_comm *x = p;
  cudaSetDevice(x->dev);
  double interval = 0.05;
  if (x->timeout_s > 0 && x->timeout_s / 10 < interval) interval = x->timeout_s / 10 > 1e-3 ? x->timeout_s / 10 : 1e-3;
  pthread_mutex_lock(&x->mu);
  while (!x->wd_stop) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long ns = ts.tv_nsec + (long)(interval * 1e9);
    ts.tv_sec += ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    pthread_cond_timedwait(&x->wd_cv, &x->mu, &ts);
    if (x->wd_stop || x->fail_st) continue;
    if (scan_locked(x)) {
      pthread_mutex_unlock(&x->mu);
      spread(x);
      pthread_mutex_lock(&x->mu);
    }
  }
  pthread_mutex_unlock(&x->mu);
  return NULL;
}

static void stop_watchdog(nc_comm *x) {
  if (!x->wd_on) return;
  pthread_mutex_lock(&x->mu);
  x->wd_stop = 1;
  pthread_cond_signal(&x->wd_cv);
  pthread_mutex_unlock(&x->mu);
  pthread_join(x->wd, NULL);
  x->wd_on = 0;
}

/* Free x's CUDA resources and x itself (its NCCL communicator is already finalized or aborted). */
static void free_comm(nc_comm *x) {
  if (!x) return;
  int prev = dev_enter(x->dev);
  for (int i = 0; i < x->n_pend; i++) cudaEventDestroy(x->pend[i].ev);
  free(x->pend);
  for (int i = 0; i < x->n_tev; i++) x->be->ops->mark_free(x->be, x->tev[i]);
  free(x->tev);
  if (x->xs) cudaStreamDestroy(x->xs);
  if (x->scratch) cudaFree(x->scratch);
  if (x->fp_dev) cudaFree(x->fp_dev);
  if (x->fp_host) cudaFreeHost(x->fp_host);
  dev_leave(prev, x->dev);
  pthread_cond_destroy(&x->wd_cv);
  pthread_mutex_destroy(&x->mu);
  free(x);
}

/* Finalize (flush and release) the live NCCL communicators among xs[0..n-1] together (all finalizes are
 * issued before any is waited for, in case NCCL's finalize synchronises the ranks), then destroy them;
 * any that does not settle within the timeout (60 s when the timeout is 0: a teardown never waits
 * forever) is aborted instead. */
static void teardown(nc_comm **xs, int n) {
  double t0 = now_s();
  for (int i = 0; i < n; i++) {
    nc_comm *x = xs[i];
    if (!x || x->dead || !x->nc) continue;
    int prev = dev_enter(x->dev);
    ncclResult_t r = ncclCommFinalize(x->nc);
    if (r != ncclSuccess && r != ncclInProgress) fail_locked(x, 1, APB_ECOMM, "ncclCommFinalize failed");
    dev_leave(prev, x->dev);
  }
  for (int i = 0; i < n; i++) {
    nc_comm *x = xs[i];
    if (!x || x->dead || !x->nc) continue;
    double limit = x->timeout_s > 0 ? x->timeout_s : 60;
    int round = 0;
    for (;;) {
      ncclResult_t a = ncclSuccess;
      if (ncclCommGetAsyncError(x->nc, &a) != ncclSuccess) a = ncclInternalError;
      if (a == ncclSuccess) break;
      if (a != ncclInProgress || now_s() - t0 > limit) {
        fail_locked(x, 1, APB_ECOMM, "finalizing the NCCL communicator did not settle");
        break;
      }
      poll_pause(&round);
    }
  }
  for (int i = 0; i < n; i++) {
    nc_comm *x = xs[i];
    if (!x || x->dead || !x->nc) continue;
    int prev = dev_enter(x->dev);
    ncclCommDestroy(x->nc);
    dev_leave(prev, x->dev);
    x->nc = NULL;
  }
}

static void nc_destroy(apb_comm *c) {
  nc_comm *x = c->impl;
  if (x) {
    stop_watchdog(x);
    x->pub = NULL;
    apb_comm *boot = x->boot;
    nc_group *g = x->g;
    if (g) {
      pthread_mutex_lock(&g->mu);
      int last = --g->live == 0;
      pthread_mutex_unlock(&g->mu);
      if (last) { /* every member's watchdog is stopped: nobody else touches them now */
        teardown(g->members, g->H);
        for (int r = 0; r < g->H; r++) free_comm(g->members[r]);
        pthread_mutex_destroy(&g->mu);
        free(g->members);
        free(g);
      }
    } else {
      teardown(&x, 1);
      free_comm(x);
    }
    if (boot) apb_comm_destroy(boot);
  }
  free(c);
}

static const apb_comm_ops nccl_ops = {
    .destroy = nc_destroy,
    .allgatherv = nc_allgatherv,
    .iallgatherv = nc_iallgatherv,
    .sendrecv = nc_sendrecv,
    .isendrecv = nc_isendrecv,
    .alltoallv = nc_alltoallv,
    .ialltoallv = nc_ialltoallv,
    .bcast = nc_bcast,
    .barrier = nc_barrier,
    .wait = nc_wait,
    .abort = nc_abort,
};

/* The parts of a communicator that do not depend on NCCL being initialised: streams, scratch, the
 * apb_comm. The NCCL communicator and the watchdog come after. */
static apb_status comm_alloc(int rank, int size, apb_backend *be, double timeout_s, int check, nc_comm **out,
                             apb_error *err) {
  apb_status st = APB_OK;
  *out = NULL;
  int dev = be->device;
  void *stream = apb_cuda_backend_stream(be);
  if (!stream)
    return apb_error_set(err, APB_EINVAL, "NCCL rank %d: backend '%s' on device %d has no CUDA stream (the NCCL "
                         "communicator needs a CUDA backend instance)", rank, be->name, dev);
  nc_comm *x = calloc(1, sizeof *x);
  if (!x) return apb_error_set(err, APB_ENOMEM, "NCCL rank %d: out of memory", rank);
  x->rank = rank, x->size = size, x->dev = dev, x->cs = (cudaStream_t)stream, x->be = be;
  x->timeout_s = timeout_s, x->check = check, x->timing = env_flag("APB_NCCL_TIMING");
  pthread_mutex_init(&x->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&x->wd_cv, &ca);
  pthread_condattr_destroy(&ca);
  int prev = dev_enter(dev), least = 0, greatest = 0;
  /* the communication stream gets the highest priority, so that a transfer starts as soon as its
   * input is ready instead of queueing behind the compute it is meant to overlap */
  CUCK(rank, dev, cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUCK(rank, dev, cudaStreamCreateWithPriority(&x->xs, cudaStreamNonBlocking, greatest));
  CUCK(rank, dev, cudaMalloc((void **)&x->scratch, sizeof(int)));
  CUCK(rank, dev, cudaMemset(x->scratch, 0, sizeof(int)));
  if (check) {
    CUCK(rank, dev, cudaMalloc((void **)&x->fp_dev, sizeof(fp_rec) * (size_t)size));
    CUCK(rank, dev, cudaMallocHost((void **)&x->fp_host, sizeof(fp_rec) * (size_t)size));
  }
  x->pub = calloc(1, sizeof *x->pub);
  if (!x->pub) {
    st = apb_error_set(err, APB_ENOMEM, "NCCL rank %d: out of memory", rank);
    goto done;
  }
  x->pub->rank = rank, x->pub->size = size, x->pub->name = "nccl", x->pub->ops = &nccl_ops, x->pub->impl = x;
done:
  dev_leave(prev, dev);
  if (st) {
    free(x->pub);
    free_comm(x);
    return st;
  }
  *out = x;
  return APB_OK;
}

static apb_status start_watchdog(nc_comm *x, apb_error *err) {
  int e = pthread_create(&x->wd, NULL, watchdog, x);
  if (e) return apb_error_set(err, APB_ENOMEM, "NCCL rank %d: cannot start the watchdog thread: %s", x->rank, strerror(e));
  x->wd_on = 1;
  return APB_OK;
}

/* Poll a non-blocking communicator being initialised until it is ready. */
static apb_status settle_init(ncclComm_t nc, int rank, int dev, double timeout_s, double t0, apb_error *err) {
  int round = 0;
  for (;;) {
    ncclResult_t a = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(nc, &a);
    if (r != ncclSuccess) a = r;
    if (a == ncclSuccess) return APB_OK;
    if (a != ncclInProgress)
      return apb_error_set(err, APB_ECOMM, "NCCL rank %d (device %d): ncclCommInitRankConfig failed: %s: %s", rank, dev,
                           ncclGetErrorString(a), nccl_last(nc));
    if (timeout_s > 0 && now_s() - t0 > timeout_s)
      return apb_error_set(err, APB_ETIMEOUT, "NCCL rank %d (device %d): communicator not ready after %.3g s "
                           "(APB_NCCL_TIMEOUT_S): a rank never joined", rank, dev, timeout_s);
    poll_pause(&round);
  }
}

static ncclConfig_t nonblocking_config(void) {
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  return cfg;
}

static apb_status group_create(int H, const int *devices, apb_backend *const *bes, double timeout_s, apb_comm **comms,
                               nc_group **gout, apb_error *err) {
  apb_status st = APB_OK;
  if (gout) *gout = NULL;
  if (H < 1 || H > APB_MAX_HOSTS)
    return apb_error_set(err, APB_EINVAL, "NCCL group: %d ranks is not in [1, %d]", H, APB_MAX_HOSTS);
  if (!bes || !comms) return apb_error_set(err, APB_EINVAL, "NCCL group: bes and comms are required");
  for (int r = 0; r < H; r++) {
    comms[r] = NULL;
    if (!bes[r] || bes[r]->device < 0)
      return apb_error_set(err, APB_EINVAL, "NCCL group: rank %d has %s (NCCL needs a CUDA backend per rank)", r,
                           bes[r] ? "a host-memory backend" : "no backend");
    if (devices && devices[r] != bes[r]->device)
      return apb_error_set(err, APB_EINVAL, "NCCL group: rank %d is given device %d but its backend is on device %d",
                           r, devices[r], bes[r]->device);
    for (int q = 0; q < r; q++)
      if (bes[q]->device == bes[r]->device)
        return apb_error_set(err, APB_EINVAL, "NCCL group: ranks %d and %d are both on device %d (NCCL takes one "
                             "rank per GPU)", q, r, bes[r]->device);
  }
  int check = env_flag("APB_NCCL_CHECK");
  nc_group *g = calloc(1, sizeof *g);
  ncclComm_t *nc = calloc((size_t)H, sizeof *nc);
  ncclConfig_t *cfg = calloc((size_t)H, sizeof *cfg);
  int prev = -1, in_group = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  if (g) {
    pthread_mutex_init(&g->mu, NULL);
    atomic_init(&g->aborted, 0);
    g->H = H, g->origin = -1;
    g->members = calloc((size_t)H, sizeof *g->members);
  }
  if (!g || !nc || !cfg || !g->members) {
    st = apb_error_set(err, APB_ENOMEM, "NCCL group: out of memory for %d ranks", H);
    goto done;
  }
  for (int r = 0; r < H && !st; r++) st = comm_alloc(r, H, bes[r], timeout_s, check, &g->members[r], err);
  if (st) goto done;
  ncclUniqueId id;
  NCCK(-1, bes[0]->device, NULL, ncclGetUniqueId(&id));
  double t0 = now_s();
  NCCK(-1, bes[0]->device, NULL, ncclGroupStart());
  in_group = 1;
  for (int r = 0; r < H; r++) {
    cfg[r] = nonblocking_config();
    CUCK(r, bes[r]->device, cudaSetDevice(bes[r]->device));
    NCCK(r, bes[r]->device, NULL, ncclCommInitRankConfig(&nc[r], H, id, r, &cfg[r]));
  }
  in_group = 0;
  NCCK(-1, bes[0]->device, NULL, ncclGroupEnd());
  for (int r = 0; r < H && !st; r++) st = settle_init(nc[r], r, bes[r]->device, timeout_s, t0, err);
  if (st) goto done;
  for (int r = 0; r < H; r++) {
    nc_comm *x = g->members[r];
    x->nc = nc[r], nc[r] = NULL, x->g = g;
    comms[r] = x->pub;
    g->live++;
  }
  for (int r = 0; r < H && !st; r++) st = start_watchdog(g->members[r], err);
  if (st) {
    for (int r = 0; r < H; r++) stop_watchdog(g->members[r]);
    for (int r = 0; r < H; r++) comms[r] = NULL;
    for (int r = 0; r < H; r++) fail_locked(g->members[r], 1, st, "%s", err ? err->msg : "watchdog");
  }
done:
  if (in_group) ncclGroupEnd();
  for (int r = 0; nc && r < H; r++)
    if (nc[r]) {
      cudaSetDevice(bes[r]->device);
      ncclCommAbort(nc[r]);
    }
  if (prev >= 0) cudaSetDevice(prev);
  if (st && g) {
    for (int r = 0; g->members && r < H; r++)
      if (g->members[r]) {
        free(g->members[r]->pub);
        free_comm(g->members[r]);
      }
    pthread_mutex_destroy(&g->mu);
    free(g->members);
    free(g);
    g = NULL;
  }
  if (gout) *gout = g;
  free(nc);
  free(cfg);
  return st;
}

/* ---------------------------------------------------------------- public entry points */

int apb_nccl_built(void) { return 1; }

apb_status apb_nccl_group_create(int H, const int *devices, apb_backend *const *bes, apb_comm **comms,
                                 apb_error *err) {
  double timeout_s;
  apb_status st = env_timeout(&timeout_s, err);
  if (st) return st;
  return group_create(H, devices, bes, timeout_s, comms, NULL, err);
}

apb_status apb_comm_nccl_mpi(apb_backend *be, apb_comm **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "NCCL over MPI: out is NULL");
  *out = NULL;
  if (!be || be->device < 0)
    return apb_error_set(err, APB_EINVAL, "NCCL over MPI: needs a CUDA backend (got %s)",
                         be ? "a host-memory backend" : "none");
  double timeout_s;
  apb_status st = env_timeout(&timeout_s, err);
  if (st) return st;
  apb_comm *boot = NULL;
  nc_comm *x = NULL;
  ncclComm_t nc = NULL;
  int prev = -1, dev = be->device;
  if ((st = apb_comm_mpi(NULL, &boot, err))) return st; /* initialises MPI; host-memory collectives */
  int rank = boot->rank, size = boot->size;
  struct {
    int ok;
    ncclUniqueId id;
  } msg;
  memset(&msg, 0, sizeof msg);
  if (rank == 0) msg.ok = ncclGetUniqueId(&msg.id) == ncclSuccess;
  if ((st = boot->ops->bcast(boot, &msg, sizeof msg, 0, err))) goto done;
  if (!msg.ok) {
    st = apb_error_set(err, APB_ECOMM, "NCCL over MPI (rank %d): rank 0's ncclGetUniqueId failed: %s", rank,
                       nccl_last(NULL));
    goto done;
  }
  if ((st = comm_alloc(rank, size, be, timeout_s, env_flag("APB_NCCL_CHECK"), &x, err))) goto done;
  prev = dev_enter(dev);
  ncclConfig_t cfg = nonblocking_config();
  double t0 = now_s();
  NCCK(rank, dev, NULL, ncclCommInitRankConfig(&nc, size, msg.id, rank, &cfg));
  if ((st = settle_init(nc, rank, dev, timeout_s, t0, err))) goto done;
  x->nc = nc, nc = NULL, x->boot = boot, boot = NULL;
  if ((st = start_watchdog(x, err))) goto done;
  *out = x->pub;
  x = NULL;
done:
  if (nc) ncclCommAbort(nc);
  if (x) {
    if (x->nc) {
      ncclCommAbort(x->nc);
      x->nc = NULL;
    }
    if (x->boot) apb_comm_destroy(x->boot);
    free(x->pub);
    free_comm(x);
  }
  if (prev >= 0) dev_leave(prev, dev);
  if (boot) apb_comm_destroy(boot);
  return st;
}

apb_status apb_nccl_sync(apb_comm *c, apb_error *err) {
  if (!c) return apb_error_set(err, APB_EINVAL, "nccl_sync: the communicator is NULL");
  if (c->ops != &nccl_ops) return APB_OK;
  nc_comm *x = c->impl;
  apb_status st = APB_OK;
  int prev = dev_enter(x->dev), locked = 0;
  cudaEvent_t e1 = NULL, e2 = NULL;
  pthread_mutex_lock(&x->mu);
  locked = 1;
  if (x->fail_st) {
    st = err_from(x, err);
    goto done;
  }
  CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&e1, cudaEventDisableTiming));
  CUCK(x->rank, x->dev, cudaEventCreateWithFlags(&e2, cudaEventDisableTiming));
  CUCK(x->rank, x->dev, cudaEventRecord(e1, x->cs));
  CUCK(x->rank, x->dev, cudaEventRecord(e2, x->xs));
  pthread_mutex_unlock(&x->mu);
  locked = 0;
  if (!(st = wait_event(x, e1, "the compute stream (apb_nccl_sync)", err)))
    st = wait_event(x, e2, "the communication stream (apb_nccl_sync)", err);
  if (!st) tresolve(x);
done:
  if (locked) pthread_mutex_unlock(&x->mu);
  if (e1) cudaEventDestroy(e1);
  if (e2) cudaEventDestroy(e2);
  dev_leave(prev, x->dev);
  return st;
}

/* ---------------------------------------------------------------- apb_nccl_execute */

typedef struct rank_ctx {
  int rank, dev;
  apb_backend *be;
  apb_bmodel *bm;
  apb_status st;
  apb_error err;
  struct exec_ctx *x;
  int fault;              /* this rank carries the injected fault */
} rank_ctx;

typedef struct exec_ctx {
  const apb_plan *plan;
  const apb_model *m;     /* host weights (NULL with use_preset) */
  const apb_nccl_opts *o;
  const char *kind;
  const int32_t *doc, *query;
  apb_host_result *res;
  apb_host_result *runs;  /* [reps, H] every timed run when reps > 1 (else NULL: straight into res) */
  apb_comm_stats *run_stats; /* [reps, H] the communicators' counts of each timed run (with runs) */
  int reps;
  apb_comm **comms;
  rank_ctx *rk;
  int fault_layer;
} exec_ctx;

static void *setup_rank(void *p) {
  rank_ctx *r = p;
  apb_error *err = &r->err;
  apb_status st = APB_OK;
  const apb_nccl_opts *o = r->x->o;
  CUCK(r->rank, r->dev, cudaSetDevice(r->dev));
  if ((st = apb_backend_create(r->x->kind, r->dev, NULL, &r->be, err)) ||
      (st = !o->use_preset ? apb_bmodel_create(r->be, r->x->m, &r->bm, err)
            : o->cfg       ? apb_bmodel_generate_config(r->be, o->cfg, o->scorer_width, o->seed, &r->bm, err)
                           : apb_bmodel_generate(r->be, o->preset, o->seed, &r->bm, err)))
    apb_error_set(err, st, "rank %d (device %d)", r->rank, r->dev);
done:
  r->st = st;
  return NULL;
}

/* The fault hook: chains to the caller's hook, and arms this rank's communicator once the prefill
 * reaches the fault layer (or the run has left the prefill). Runs on the rank's own thread. */
static void fault_hook(void *user, const apb_hook_info *in) {
  rank_ctx *r = user;
  exec_ctx *x = r->x;
  if (x->o->hook) x->o->hook(x->o->hook_user, in);
  nc_comm *nc = x->comms[r->rank]->impl;
  int prefill = strcmp(in->phase, "prefill") == 0;
  if (!nc->fault_armed && (!prefill || in->layer >= x->fault_layer)) {
    snprintf(nc->fault_msg, sizeof nc->fault_msg,
             "rank %d (device %d): injected fault at %s layer %d (APB_FAULT_RANK=%d, APB_FAULT_LAYER=%d)", r->rank,
             r->dev, in->phase, in->layer, r->rank, x->fault_layer);
    nc->fault_armed = 1;
  }
}

static void *run_rank(void *p) {
  rank_ctx *r = p;
  exec_ctx *x = r->x;
  apb_comm *c = x->comms[r->rank];
  cudaError_t e = cudaSetDevice(r->dev);
  if (e != cudaSuccess) {
    r->st = apb_error_set(&r->err, APB_EDEVICE, "cudaSetDevice(%d) failed (rank %d): %s", r->dev, r->rank,
                          cudaGetErrorString(e));
  } else {
    apb_host_args a = {.plan = x->plan, .bm = r->bm, .be = r->be, .comm = c, .doc = x->doc, .query = x->query,
                       .hook = r->fault ? fault_hook : x->o->hook, .hook_user = r->fault ? (void *)r : x->o->hook_user,
                       .want_hidden = x->o->want_hidden, .profile = x->o->profile};
    /* warm-up runs: the same work, results dropped; then the counts start afresh for the returned run
     * (no collective is in flight after apb_nccl_sync) */
    apb_host_args aw = a;
    aw.hook = NULL, aw.hook_user = NULL, aw.want_hidden = 0, aw.profile = 0;
    for (int w = 0; w < x->o->warmup && r->st == APB_OK; w++) {
      apb_host_result tmp;
      r->st = apb_host_run(&aw, &tmp, &r->err);
      apb_host_result_free(&tmp);
      if (r->st == APB_OK) r->st = apb_nccl_sync(c, &r->err);
    }
    /* each timed run ends with a sync (complete, not garbage from an abort, and its visible time
     * resolved), after which its counts are kept beside it: the run returned is the best, not the last */
    for (int k = 0; k < x->reps && r->st == APB_OK; k++) {
      const size_t i = (size_t)k * (size_t)x->plan->H + (size_t)r->rank;
      if (x->o->warmup > 0 || k > 0) memset(&c->stats, 0, sizeof c->stats);
      r->st = apb_host_run(&a, x->runs ? &x->runs[i] : &x->res[r->rank], &r->err);
      if (r->st == APB_OK) r->st = apb_nccl_sync(c, &r->err);
      if (r->st == APB_OK && x->run_stats) x->run_stats[i] = c->stats;
    }
  }
  if (r->st != APB_OK) c->ops->abort(c, r->err.msg);
  return NULL;
}

static apb_status run_threads(int H, rank_ctx *rk, void *(*fn)(void *), apb_error *err) {
  pthread_t *th = calloc((size_t)H, sizeof *th);
  if (!th) return apb_error_set(err, APB_ENOMEM, "NCCL run: out of memory for %d threads", H);
  int started = 0;
  apb_status st = APB_OK;
  for (int r = 0; r < H; r++) {
    int e = pthread_create(&th[r], NULL, fn, &rk[r]);
    if (e) {
      st = apb_error_set(err, APB_ENOMEM, "NCCL run: pthread_create for rank %d: %s", r, strerror(e));
      break;
    }
    started++;
  }
  for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
  free(th);
  return st;
}

static apb_status parse_fault(int H, int *rank, int *layer, apb_error *err) {
  *rank = -1, *layer = 0;
  const char *s = getenv("APB_FAULT_RANK"), *l = getenv("APB_FAULT_LAYER");
  if (!s || !*s) return APB_OK;
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (end == s || *end || v < 0 || v >= APB_MAX_HOSTS)
    return apb_error_set(err, APB_EINVAL, "APB_FAULT_RANK='%s' is not a rank number", s);
  *rank = v < H ? (int)v : -1; /* a run without that rank (dense's one GPU) runs unharmed */
  if (l && *l) {
    long w = strtol(l, &end, 10);
    if (end == l || *end || w < 0 || w > 1000000)
      return apb_error_set(err, APB_EINVAL, "APB_FAULT_LAYER='%s' is not a layer number >= 0", l);
    *layer = (int)w;
  }
  return APB_OK;
}

apb_status apb_nccl_execute(const apb_plan *plan, const apb_model *m, const apb_nccl_opts *o, const int32_t *doc,
                            const int32_t *query, apb_host_result *res, apb_comm_stats *stats, apb_error *err) {
  if (!plan || !o || !res) return apb_error_set(err, APB_EINVAL, "NCCL run: plan, opts and res are required");
  if (o->warmup < 0 || o->reps < 0)
    return apb_error_set(err, APB_EINVAL, "NCCL run: warmup=%d and reps=%d runs; both must be >= 0", o->warmup,
                         o->reps);
  if (!o->use_preset && !m) return apb_error_set(err, APB_EINVAL, "NCCL run: no model (and use_preset is 0)");
  int H = plan->H, ndev = 0;
  const char *kind = o->backend ? o->backend : "cuda-bf16";
  if (strcmp(kind, "cuda") && strcmp(kind, "cuda-bf16") && strcmp(kind, "cuda-f32"))
    return apb_error_set(err, APB_EINVAL, "NCCL run: backend '%s' is not a CUDA backend (cuda-bf16, cuda-f32)", kind);
  apb_status st = apb_cuda_device_count(&ndev, err);
  if (st) return st;
  for (int r = 0; r < H; r++) {
    int d = o->devices ? o->devices[r] : r;
    if (d < 0 || d >= ndev)
      return apb_error_set(err, APB_ENODEVICE, "NCCL run: rank %d of %d wants device %d, but %d device%s present", r,
                           H, d, ndev, ndev == 1 ? " is" : "s are");
  }
  double timeout_s = o->timeout_s;
  if (timeout_s <= 0 && (st = env_timeout(&timeout_s, err))) return st;
  int fault_rank, fault_layer;
  if ((st = parse_fault(H, &fault_rank, &fault_layer, err))) return st;

  memset(res, 0, sizeof *res * (size_t)H);
  apb_host_result *runs = NULL; /* every timed run when o->reps > 1 ([reps, H]) */
  apb_comm_stats *run_stats = NULL; /* and its communicators' counts */
  int best_run = 0;
  const int reps = o->reps > 1 ? o->reps : 1;
  nc_group *g = NULL;
  rank_ctx *rk = calloc((size_t)H, sizeof *rk);
  apb_comm **comms = calloc((size_t)H, sizeof *comms);
  apb_backend **bes = calloc((size_t)H, sizeof *bes);
  if (!rk || !comms || !bes) {
    st = apb_error_set(err, APB_ENOMEM, "NCCL run: out of memory for %d ranks", H);
    goto done;
  }
  if (reps > 1 && (!(runs = calloc((size_t)reps * (size_t)H, sizeof *runs)) ||
                   !(run_stats = calloc((size_t)reps * (size_t)H, sizeof *run_stats)))) {
    st = apb_error_set(err, APB_ENOMEM, "NCCL run: out of memory for %d runs of %d ranks", reps, H);
    goto done;
  }
  exec_ctx x = {plan, m, o, kind, doc, query, res, runs, run_stats, reps, comms, rk, fault_layer};
  for (int r = 0; r < H; r++)
    rk[r] = (rank_ctx){.rank = r, .dev = o->devices ? o->devices[r] : r, .x = &x, .fault = r == fault_rank};
  /* 1: a backend instance and the weights on every device, in parallel */
  if ((st = run_threads(H, rk, setup_rank, err))) goto done;
  for (int r = 0; r < H && !st; r++)
    if (rk[r].st) st = apb_error_set(err, rk[r].st, "%s", rk[r].err.msg);
  if (st) goto done;
  for (int r = 0; r < H; r++) bes[r] = rk[r].be;
  /* 2: the NCCL group */
  if ((st = group_create(H, NULL, bes, timeout_s, comms, &g, err))) goto done;
  if (o->comm_timing)
    for (int r = 0; r < H; r++) ((nc_comm *)comms[r]->impl)->timing = 1;
  /* 3: every rank's run */
  if ((st = run_threads(H, rk, run_rank, err))) {
    for (int r = 0; r < H; r++)
      if (comms[r]) comms[r]->ops->abort(comms[r], "the NCCL run could not start every rank's thread");
    goto done;
  }
  int origin = -1;
  pthread_mutex_lock(&g->mu);
  if (atomic_load(&g->aborted)) origin = g->origin;
  pthread_mutex_unlock(&g->mu);
  if (origin >= 0 && rk[origin].st != APB_OK) /* the rank that failed first, not the aborts it caused */
    st = apb_error_set(err, rk[origin].st, "%s", rk[origin].err.msg);
  for (int r = 0; r < H && !st; r++)
    if (rk[r].st != APB_OK && rk[r].st != APB_ECOMM && rk[r].st != APB_ETIMEOUT)
      st = apb_error_set(err, rk[r].st, "%s", rk[r].err.msg);
  for (int r = 0; r < H && !st; r++)
    if (rk[r].st != APB_OK) st = apb_error_set(err, rk[r].st, "%s", rk[r].err.msg);
  if (!st && runs) { /* keep the run whose slowest rank was fastest; the others are freed below */
    int best = 0;
    double best_s = 0;
    for (int k = 0; k < reps; k++) {
      double worst = 0;
      for (int r = 0; r < H; r++)
        if (runs[(size_t)k * H + r].stats.prefill_s > worst) worst = runs[(size_t)k * H + r].stats.prefill_s;
      if (k == 0 || worst < best_s) best = k, best_s = worst;
    }
    best_run = best;
    for (int r = 0; r < H; r++) {
      res[r] = runs[(size_t)best * H + r];
      memset(&runs[(size_t)best * H + r], 0, sizeof *runs);
    }
  }
  if (stats)
    for (int r = 0; r < H; r++) stats[r] = runs && !st ? run_stats[(size_t)best_run * H + r] : comms[r]->stats;
done:
  for (size_t i = 0; runs && i < (size_t)reps * (size_t)H; i++) apb_host_result_free(&runs[i]);
  free(runs);
  free(run_stats);
  for (int r = 0; comms && r < H; r++)
    if (comms[r]) apb_comm_destroy(comms[r]);
  for (int r = 0; rk && r < H; r++) {
    if (!rk[r].be) continue;
    int prev = dev_enter(rk[r].dev);
    if (rk[r].bm) apb_bmodel_destroy(rk[r].be, rk[r].bm);
    apb_backend_destroy(rk[r].be);
    dev_leave(prev, rk[r].dev);
  }
  if (st)
    for (int r = 0; r < H; r++) apb_host_result_free(&res[r]);
  free(rk);
  free(comms);
  free(bes);
  return st;
}

#else /* !HAVE_NCCL */

#define NO_NCCL "this libapb was built without NCCL (configure found no CUDA, or no nccl.h and libnccl; " \
                "see docs/nccl.md)"

int apb_nccl_built(void) { return 0; }

apb_status apb_nccl_group_create(int H, const int *devices, apb_backend *const *bes, apb_comm **comms,
                                 apb_error *err) {
  (void)devices, (void)bes;
  for (int r = 0; comms && r < H; r++) comms[r] = NULL;
  return apb_error_set(err, APB_EUNSUPPORTED, "NCCL group: %s", NO_NCCL);
}

apb_status apb_comm_nccl_mpi(apb_backend *be, apb_comm **out, apb_error *err) {
  (void)be;
  if (out) *out = NULL;
  return apb_error_set(err, APB_EUNSUPPORTED, "NCCL over MPI: %s", NO_NCCL);
}

apb_status apb_nccl_sync(apb_comm *c, apb_error *err) {
  if (!c) return apb_error_set(err, APB_EINVAL, "nccl_sync: the communicator is NULL");
  return APB_OK; /* no NCCL communicator can exist: every other one is synchronous */
}

apb_status apb_nccl_execute(const apb_plan *plan, const apb_model *m, const apb_nccl_opts *o, const int32_t *doc,
                            const int32_t *query, apb_host_result *res, apb_comm_stats *stats, apb_error *err) {
  (void)plan, (void)m, (void)o, (void)doc, (void)query, (void)res, (void)stats;
  return apb_error_set(err, APB_EUNSUPPORTED, "NCCL run: %s", NO_NCCL);
}

#endif
