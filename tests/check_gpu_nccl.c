/* tests/check_gpu_nccl.c: the NCCL communicator and the multi-GPU runner (gpu/comm_nccl.c, apb/nccl.h)
 * on real devices, with H = 2 and 4 ranks (as many GPUs as are present, at most 4; one rank a GPU).
 *
 * What it checks:
 *   - every collective, as tests/check_comm.c checks the simulated hosts: contents and logical byte
 *     counts, on device buffers poisoned with 0xEE and followed by a guard (uploads and downloads
 *     through the backend ops): allgatherv with uneven sizes and an empty last contribution (the
 *     grouped broadcasts), with even sizes (ncclAllGather), in place (send inside recv), all empty;
 *     sendrecv around a ring and one-sided (-1 peers); alltoallv; bcast; barrier; bad arguments;
 *   - the i-variants (all-gather, sendrecv, all-to-all) and `wait`: the transfer starts after the
 *     compute that produced its input (the input is written after a long chain of adds on the compute
 *     stream) and the compute after `wait` sees it (one rank's input comes much later, so a copy not
 *     ordered after the transfer would read the poison); overlap timing is printed, not asserted (it
 *     depends on load and NCCL's channels);
 *   - failures end without hanging: a rank that never calls (others time out with a short
 *     APB_NCCL_TIMEOUT_S, the silent rank learns of it; also while they wait in a backend download,
 *     outside the communicator, where only the watchdog can release them), a rank that calls another
 *     collective (APB_NCCL_CHECK=1: APB_ECOMM naming both sides), a rank that aborts while its peers
 *     wait (they get APB_ECOMM with its reason, long before the timeout), and `apb run --gpus H` with a
 *     rank made to fail by APB_FAULT_RANK / APB_FAULT_LAYER, which must exit non-zero naming the rank
 *     well within `timeout 120`;
 *   - every method (dense, ring, zigzag, ulysses where H divides Hkv, star, apb; and apb --overlap 1,
 *     ulysses --overlap 0) with H = 2 and 4 on the tiny preset, and ulysses again on a variant of tiny
 *     with 16 query and 8 KV heads (several KV heads per rank, pipelined one per group, as on the
 *     llama3-8b shape), 1025 document tokens, in fp32 and bf16 mode: the NCCL run
 *     equals, bit for bit, the same plan run as simulated hosts on one GPU (the same kernels, so any
 *     difference is the communicator's); and against the CPU fast backend's run of the same plan
 *     (apb_sim_execute), final hidden states and logits within apb_tolerance(APB_PREC_F32, n) of the
 *     fp32 CPU run in fp32 mode
 *     (and the same tokens), and within apb_tolerance(APB_PREC_BF16, n) (relative Frobenius 1e-2) of
 *     the CPU run with bf16 storage (emulate_bf16) in bf16 mode. Against fp32, star and apb need not
 *     meet 1e-2 in bf16 (a rounding can move a score across the l_p-th place and change the passing
 *     block: the CPU's own bf16 emulation gives 1.1e-2 for apb H=2), so that distance is printed, not
 *     asserted; likewise, when a selection differs from the CPU's (a near-tie, APB.md 7), the distance
 *     to the CPU is reported, not bounded. Every rank's calls and bytes per collective equal the
 *     simulator's, every rank holds the same logits and tokens, and the tokens are printed;
 *   - the program: `apb run --gpus H` (fp32, with --dump) against the same run under mpirun with a
 *     CUDA backend (when built with MPI), and the preset generated on each device. The tests that
 *     start the program run first, before this process makes any CUDA context, so that the children
 *     get the GPUs even in an exclusive compute mode.
 *
 * Exits 77 (SKIP) before Check forks anything when the library has no NCCL or fewer than two GPUs are
 * present; runs with CK_FORK=no (no CUDA state may cross a fork), so Check cannot time a test out:
 * a deadline thread ends the process with a message instead if a test hangs. Seeds as in the other
 * suites (APB_SEED); the ranks' threads never assert (the main thread does, after joining them).
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "apb/nccl.h"
#include "apb/sim.h"
#include "config.h"
#include "testutil.h"

#define MAXH 4
#define GUARD 256

static int n_dev;           /* GPUs used: min(present, MAXH) */
static int Hs[2], n_Hs;     /* rank counts tested: 2, and 4 when present */
static apb_model *tiny;
static apb_model *gqa8;    /* tiny with 16 query and 8 KV heads of 32 (E 512): ulysses on H = 2 and 4 with
                              several KV heads per rank, as the llama3-8b shape runs it */
static apb_model *g_model; /* what run_plan and make_doc use: tiny unless a test says otherwise */
static const apb_model_config *g_gen_cfg; /* run_plan's use_preset: this configuration (NULL: tiny's) */
static int g_gen_I;                       /* and its retaining-head width */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---------------------------------------------------------------- the deadline (CK_FORK=no) */

static pthread_mutex_t dl_mu = PTHREAD_MUTEX_INITIALIZER;
static double dl_at;        /* 0: none */
static char dl_what[128];

static void *deadline_thread(void *p) {
  (void)p;
  for (;;) {
    sleep(1);
    pthread_mutex_lock(&dl_mu);
    if (dl_at > 0 && now_s() > dl_at) {
      fprintf(stderr, "check_gpu_nccl: %s did not finish within its deadline: a hang (seed %llu)\n", dl_what,
              (unsigned long long)tu_seed());
      fflush(stderr);
      _exit(1);
    }
    pthread_mutex_unlock(&dl_mu);
  }
  return NULL;
}

static void arm(double seconds, const char *what, int i) {
  pthread_mutex_lock(&dl_mu);
  dl_at = now_s() + seconds;
  snprintf(dl_what, sizeof dl_what, "%s #%d", what, i);
  pthread_mutex_unlock(&dl_mu);
}

static void disarm(void) {
  pthread_mutex_lock(&dl_mu);
  dl_at = 0;
  pthread_mutex_unlock(&dl_mu);
}

/* ---------------------------------------------------------------- groups and rank threads */

typedef struct grp {
  int H;
  apb_backend *be[MAXH];
  apb_comm *c[MAXH];
} grp;

static void grp_make(grp *g, int H) {
  apb_error err = {0};
  memset(g, 0, sizeof *g);
  g->H = H;
  for (int r = 0; r < H; r++)
    ck_assert_msg(apb_backend_cuda(r, APB_DT_F32, &g->be[r], &err) == APB_OK, "backend on device %d: %s", r, err.msg);
  ck_assert_msg(apb_nccl_group_create(H, NULL, g->be, g->c, &err) == APB_OK, "group of %d: %s", H, err.msg);
}

static void grp_free(grp *g) {
  for (int r = 0; r < g->H; r++) apb_comm_destroy(g->c[r]);
  for (int r = 0; r < g->H; r++) apb_backend_destroy(g->be[r]);
  memset(g, 0, sizeof *g);
}

typedef struct rctx {
  grp *g;
  int r;
  int variant;
  apb_status st;
  long bad;               /* wrong bytes seen */
  double t;               /* seconds this rank spent in the part under test */
  apb_error err;
} rctx;

static void run_ranks(grp *g, int variant, void *(*fn)(void *), rctx *x) {
  pthread_t th[MAXH];
  for (int r = 0; r < g->H; r++) {
    memset(&x[r], 0, sizeof x[r]);
    x[r].g = g, x[r].r = r, x[r].variant = variant;
  }
  for (int r = 0; r < g->H; r++) ck_assert_int_eq(pthread_create(&th[r], NULL, fn, &x[r]), 0);
  for (int r = 0; r < g->H; r++) pthread_join(th[r], NULL);
}

static unsigned char pat(int r, size_t i) { return (unsigned char)(r * 31 + i * 7 + (i >> 9)); }

/* Download n bytes of backend memory and wait for them. */
static apb_status fetch(apb_backend *be, void *host, const void *dev, size_t n, apb_error *err) {
  apb_status st = be->ops->download(be, host, dev, n, err);
  return st ? st : be->ops->sync(be, err);
}

/* ---------------------------------------------------------------- allgatherv */

/* variant 0: uneven sizes, last rank empty (broadcasts); 1: even (ncclAllGather); 2: even, in place;
 * 3: uneven, in place; 4: every contribution empty */
static size_t ag_size(int variant, int r, int H) {
  switch (variant) {
  case 0: case 3: return r == H - 1 ? 0 : (size_t)(r + 1) * 100003u;
  case 1: case 2: return 65536 + 8;
  default: return 0;
  }
}

static void *allgather_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r, v = x->variant, inplace = v == 2 || v == 3;
  size_t bytes[MAXH], off[MAXH], total = 0;
  for (int i = 0; i < H; i++) bytes[i] = ag_size(v, i, H), off[i] = total, total += bytes[i];
  unsigned char *mine = malloc(bytes[r] + 1), *got = malloc(total + GUARD);
  void *send = NULL, *recv = NULL;
  apb_error *err = &x->err;
  for (size_t i = 0; i < bytes[r]; i++) mine[i] = pat(r, i);
  apb_status st = be->ops->alloc(be, total + GUARD, &recv, err);
  if (!st) st = be->ops->memset(be, recv, 0xEE, total + GUARD, err);
  if (!st && !inplace && bytes[r]) st = be->ops->alloc(be, bytes[r], &send, err);
  if (!st && inplace) send = (char *)recv + off[r];
  if (!st && bytes[r]) st = be->ops->upload(be, send, mine, bytes[r], err);
  if (!st) st = c->ops->allgatherv(c, send, recv, bytes, err);
  if (!st) st = apb_nccl_sync(c, err);
  if (!st) st = fetch(be, got, recv, total + GUARD, err);
  for (int s = 0; !st && s < H; s++)
    for (size_t i = 0; i < bytes[s]; i++) x->bad += got[off[s] + i] != pat(s, i);
  for (size_t i = 0; !st && i < GUARD; i++) x->bad += got[total + i] != 0xEE; /* nothing past the end */
  x->st = st;
  if (!inplace) be->ops->free(be, send);
  be->ops->free(be, recv);
  free(mine), free(got);
  return NULL;
}

START_TEST(test_allgatherv) {
  int H = Hs[_i / 5], v = _i % 5;
  arm(120, "allgatherv", _i);
  grp g;
  grp_make(&g, H);
  rctx x[MAXH];
  run_ranks(&g, v, allgather_rank, x);
  for (int r = 0; r < H; r++) {
    ck_assert_msg(x[r].st == APB_OK && x[r].bad == 0, "H=%d variant %d rank %d: %s, %ld wrong bytes", H, v, r,
                  x[r].st ? x[r].err.msg : "ok", x[r].bad);
    int64_t others = 0;
    for (int s = 0; s < H; s++)
      if (s != r) others += (int64_t)ag_size(v, s, H);
    const apb_comm_stats *s = &g.c[r]->stats;
    ck_assert_int_eq(s->calls[APB_COLL_ALLGATHER], 1);
    ck_assert_int_eq(s->bytes_sent[APB_COLL_ALLGATHER], (int64_t)ag_size(v, r, H) * (H - 1));
    ck_assert_int_eq(s->bytes_recv[APB_COLL_ALLGATHER], others);
  }
  grp_free(&g);
  disarm();
}
END_TEST

/* ---------------------------------------------------------------- sendrecv, alltoallv, bcast, barrier */

/* variant 0: a ring, rank r sends (r % 3 + 1) * 4099 bytes to r + 1; variant 1: one-sided, rank 0
 * sends 12345 bytes to rank 1 (which sends nothing), every other rank passes -1 both ways */
static void *sendrecv_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r, prev = (r - 1 + H) % H;
  apb_error *err = &x->err;
  size_t ns = (size_t)(r % 3 + 1) * 4099, nr = (size_t)(prev % 3 + 1) * 4099;
  int dst = (r + 1) % H, src = prev;
  if (x->variant == 1) {
    dst = r == 0 ? 1 : -1, src = r == 1 ? 0 : -1;
    ns = r == 0 ? 12345 : 0, nr = r == 1 ? 12345 : 0;
  }
  unsigned char *mine = malloc(ns + 1), *got = malloc(nr + GUARD);
  void *send = NULL, *recv = NULL;
  for (size_t i = 0; i < ns; i++) mine[i] = pat(r, i);
  apb_status st = be->ops->alloc(be, ns + 1, &send, err);
  if (!st) st = be->ops->alloc(be, nr + GUARD, &recv, err);
  if (!st) st = be->ops->memset(be, recv, 0xEE, nr + GUARD, err);
  if (!st && ns) st = be->ops->upload(be, send, mine, ns, err);
  if (!st) st = c->ops->sendrecv(c, send, ns, dst, recv, nr, src, err);
  if (!st) st = apb_nccl_sync(c, err);
  if (!st) st = fetch(be, got, recv, nr + GUARD, err);
  for (size_t i = 0; !st && src >= 0 && i < nr; i++) x->bad += got[i] != pat(src, i);
  for (size_t i = 0; !st && i < GUARD; i++) x->bad += got[nr + i] != 0xEE;
  x->st = st;
  be->ops->free(be, send), be->ops->free(be, recv);
  free(mine), free(got);
  return NULL;
}

START_TEST(test_sendrecv) {
  int H = Hs[_i / 2], v = _i % 2;
  arm(120, "sendrecv", _i);
  grp g;
  grp_make(&g, H);
  rctx x[MAXH];
  run_ranks(&g, v, sendrecv_rank, x);
  for (int r = 0; r < H; r++) {
    ck_assert_msg(x[r].st == APB_OK && x[r].bad == 0, "H=%d variant %d rank %d: %s, %ld wrong bytes", H, v, r,
                  x[r].st ? x[r].err.msg : "ok", x[r].bad);
    int64_t sent = v == 0 ? (int64_t)(r % 3 + 1) * 4099 : (r == 0 ? 12345 : 0);
    int64_t recv = v == 0 ? (int64_t)(((r - 1 + H) % H) % 3 + 1) * 4099 : (r == 1 ? 12345 : 0);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_SENDRECV], 1);
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_SENDRECV], sent);
    ck_assert_int_eq(g.c[r]->stats.bytes_recv[APB_COLL_SENDRECV], recv);
  }
  grp_free(&g);
  disarm();
}
END_TEST

/* rank r sends (r + d + 1) * 1000 int32 to rank d, values r * 1000003 + d * 1009 + i */
static void *a2a_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r;
  apb_error *err = &x->err;
  size_t sb[MAXH], rb[MAXH], ns = 0, nr = 0;
  for (int d = 0; d < H; d++) sb[d] = (size_t)(r + d + 1) * 4000, rb[d] = (size_t)(d + r + 1) * 4000, ns += sb[d], nr += rb[d];
  int32_t *mine = malloc(ns), *got = malloc(nr + GUARD);
  size_t k = 0;
  for (int d = 0; d < H; d++)
    for (size_t i = 0; i < sb[d] / 4; i++) mine[k++] = r * 1000003 + d * 1009 + (int32_t)i;
  void *send = NULL, *recv = NULL;
  apb_status st = be->ops->alloc(be, ns, &send, err);
  if (!st) st = be->ops->alloc(be, nr + GUARD, &recv, err);
  if (!st) st = be->ops->memset(be, recv, 0xEE, nr + GUARD, err);
  if (!st) st = be->ops->upload(be, send, mine, ns, err);
  if (!st) st = c->ops->alltoallv(c, send, sb, recv, rb, err);
  if (!st) st = apb_nccl_sync(c, err);
  if (!st) st = fetch(be, got, recv, nr + GUARD, err);
  k = 0;
  for (int s = 0; !st && s < H; s++)
    for (size_t i = 0; i < rb[s] / 4; i++) x->bad += got[k++] != s * 1000003 + r * 1009 + (int32_t)i;
  const unsigned char *tail = (const unsigned char *)got + nr;
  for (size_t i = 0; !st && i < GUARD; i++) x->bad += tail[i] != 0xEE;
  x->st = st;
  be->ops->free(be, send), be->ops->free(be, recv);
  free(mine), free(got);
  return NULL;
}

START_TEST(test_alltoallv) {
  int H = Hs[_i];
  arm(120, "alltoallv", _i);
  grp g;
  grp_make(&g, H);
  rctx x[MAXH];
  run_ranks(&g, 0, a2a_rank, x);
  for (int r = 0; r < H; r++) {
    ck_assert_msg(x[r].st == APB_OK && x[r].bad == 0, "H=%d rank %d: %s, %ld wrong values", H, r,
                  x[r].st ? x[r].err.msg : "ok", x[r].bad);
    int64_t sent = 0;
    for (int d = 0; d < H; d++)
      if (d != r) sent += (int64_t)(r + d + 1) * 4000;
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_ALLTOALL], sent);
    ck_assert_int_eq(g.c[r]->stats.bytes_recv[APB_COLL_ALLTOALL], sent); /* symmetric sizes */
  }
  grp_free(&g);
  disarm();
}
END_TEST

/* root H-1 broadcasts 1 MiB + 5 bytes, then every rank passes a barrier */
#define BC_BYTES ((size_t)(1 << 20) + 5)
static void *bcast_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r, root = H - 1;
  apb_error *err = &x->err;
  unsigned char *buf = malloc(BC_BYTES + GUARD);
  for (size_t i = 0; i < BC_BYTES; i++) buf[i] = r == root ? pat(root, i) : 0;
  void *d = NULL;
  apb_status st = be->ops->alloc(be, BC_BYTES + GUARD, &d, err);
  if (!st) st = be->ops->memset(be, d, 0xEE, BC_BYTES + GUARD, err);
  if (!st && r == root) st = be->ops->upload(be, d, buf, BC_BYTES, err);
  if (!st) st = c->ops->bcast(c, d, BC_BYTES, root, err);
  if (!st) st = c->ops->barrier(c, err);
  if (!st) st = fetch(be, buf, d, BC_BYTES + GUARD, err);
  for (size_t i = 0; !st && i < BC_BYTES; i++) x->bad += buf[i] != pat(root, i);
  for (size_t i = 0; !st && i < GUARD; i++) x->bad += buf[BC_BYTES + i] != 0xEE;
  x->st = st;
  be->ops->free(be, d);
  free(buf);
  return NULL;
}

START_TEST(test_bcast_barrier) {
  int H = Hs[_i];
  arm(120, "bcast/barrier", _i);
  grp g;
  grp_make(&g, H);
  rctx x[MAXH];
  run_ranks(&g, 0, bcast_rank, x);
  for (int r = 0; r < H; r++) {
    ck_assert_msg(x[r].st == APB_OK && x[r].bad == 0, "H=%d rank %d: %s, %ld wrong bytes", H, r,
                  x[r].st ? x[r].err.msg : "ok", x[r].bad);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_BCAST], 1);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_BARRIER], 1);
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_BCAST], r == H - 1 ? (int64_t)BC_BYTES * (H - 1) : 0);
    ck_assert_int_eq(g.c[r]->stats.bytes_recv[APB_COLL_BCAST], r == H - 1 ? 0 : (int64_t)BC_BYTES);
  }
  grp_free(&g);
  disarm();
}
END_TEST

START_TEST(test_bad_args) {
  arm(120, "bad arguments", 0);
  apb_error err = {0};
  apb_backend *be[2] = {NULL, NULL};
  apb_comm *c[2];
  ck_assert_int_eq(apb_backend_cuda(0, APB_DT_F32, &be[0], &err), APB_OK);
  ck_assert_int_eq(apb_nccl_group_create(2, NULL, be, c, &err), APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "no backend"));
  be[1] = be[0];
  apb_error_clear(&err);
  ck_assert_int_eq(apb_nccl_group_create(2, NULL, be, c, &err), APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "both on device"));
  apb_error_clear(&err);
  ck_assert_int_eq(apb_nccl_group_create(1, (const int[]){1}, be, c, &err), APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "device"));
  setenv("APB_NCCL_TIMEOUT_S", "soon", 1);
  apb_error_clear(&err);
  apb_status st = apb_nccl_group_create(1, NULL, be, c, &err);
  unsetenv("APB_NCCL_TIMEOUT_S");
  ck_assert_int_eq(st, APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "APB_NCCL_TIMEOUT_S"));
  apb_backend_destroy(be[0]);
  /* arguments refused before anything reaches NCCL leave the group healthy */
  grp g;
  grp_make(&g, 2);
  size_t bytes[2] = {4, 4};
  apb_error_clear(&err);
  ck_assert_int_eq(g.c[0]->ops->sendrecv(g.c[0], NULL, 0, 2, NULL, 0, -1, &err), APB_EINVAL);
  apb_error_clear(&err);
  ck_assert_int_eq(g.c[0]->ops->bcast(g.c[0], NULL, 0, 5, &err), APB_EINVAL);
  apb_error_clear(&err);
  ck_assert_int_eq(g.c[0]->ops->allgatherv(g.c[0], NULL, NULL, bytes, &err), APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "NULL"));
  for (int r = 0; r < 2; r++) ck_assert_int_eq(apb_nccl_sync(g.c[r], &err), APB_OK);
  grp_free(&g);
  disarm();
}
END_TEST

/* ---------------------------------------------------------------- i-variants and overlap */

#define OV_N ((size_t)1 << 23)   /* floats of each compute buffer (32 MiB) */
#define OV_SHORT 8               /* adds of a short compute chain */
#define OV_LONG 600              /* adds of the late rank's chain before its input is ready */

static apb_status chain(apb_backend *be, void *a, const void *b, int n, apb_error *err) {
  apb_status st = APB_OK;
  for (int i = 0; !st && i < n; i++) st = be->ops->add(be, a, b, OV_N, err);
  return st;
}

/* The input is written at the end of a chain of adds (rank H-1's chain is long, so every transfer
 * completes late); compute runs between the start and `wait`; a copy after `wait` reads the result. */
static void *overlap_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r, late = r == H - 1;
  apb_error *err = &x->err;
  size_t bytes[MAXH], off[MAXH], total = 0, ring_b = 3 << 20, ab = (size_t)1 << 20, a2[MAXH];
  for (int i = 0; i < H; i++) bytes[i] = (size_t)(i + 1) << 20, off[i] = total, total += bytes[i], a2[i] = ab;
  void *a = NULL, *b = NULL, *send = NULL, *recv = NULL, *recv2 = NULL, *rs = NULL, *rr = NULL, *rr2 = NULL;
  void *as = NULL, *ar = NULL, *ar2 = NULL; /* all-to-all: chunk d of as goes to rank d */
  size_t most = total > ring_b ? total : ring_b;
  unsigned char *got = malloc(most > ab * (size_t)H ? most : ab * (size_t)H);
  apb_comm_req *q1 = NULL, *q2 = NULL, *q3 = NULL;
  apb_status st = APB_OK;
  if (!st) st = be->ops->alloc(be, OV_N * sizeof(float), &a, err);
  if (!st) st = be->ops->alloc(be, OV_N * sizeof(float), &b, err);
  if (!st) st = be->ops->alloc(be, bytes[r], &send, err);
  if (!st) st = be->ops->alloc(be, total, &recv, err);
  if (!st) st = be->ops->alloc(be, total, &recv2, err);
  if (!st) st = be->ops->alloc(be, ring_b, &rs, err);
  if (!st) st = be->ops->alloc(be, ring_b, &rr, err);
  if (!st) st = be->ops->alloc(be, ring_b, &rr2, err);
  if (!st) st = be->ops->alloc(be, ab * (size_t)H, &as, err);
  if (!st) st = be->ops->alloc(be, ab * (size_t)H, &ar, err);
  if (!st) st = be->ops->alloc(be, ab * (size_t)H, &ar2, err);
  if (!st) st = be->ops->memset(be, as, 0xEE, ab * (size_t)H, err);
  if (!st) st = be->ops->memset(be, ar, 0xEE, ab * (size_t)H, err);
  if (!st) st = be->ops->memset(be, a, 0, OV_N * sizeof(float), err);
  if (!st) st = be->ops->memset(be, b, 0, OV_N * sizeof(float), err);
  if (!st) st = be->ops->memset(be, send, 0xEE, bytes[r], err);
  if (!st) st = be->ops->memset(be, recv, 0xEE, total, err);
  if (!st) st = be->ops->memset(be, rs, 0xEE, ring_b, err);
  if (!st) st = be->ops->memset(be, rr, 0xEE, ring_b, err);
  if (!st) st = be->ops->sync(be, err);
  double t0 = now_s();
  /* the inputs are produced at the end of the chain: the transfers must start after it */
  if (!st) st = chain(be, a, b, late ? OV_LONG : OV_SHORT, err);
  if (!st) st = be->ops->memset(be, send, r + 1, bytes[r], err);
  if (!st) st = be->ops->memset(be, rs, 0x40 + r, ring_b, err);
  for (int d = 0; d < H && !st; d++) st = be->ops->memset(be, (char *)as + ab * (size_t)d, 0x80 + 8 * r + d, ab, err);
  if (!st) st = c->ops->iallgatherv(c, send, recv, bytes, &q1, err);
  if (!st) st = c->ops->isendrecv(c, rs, ring_b, (r + 1) % H, rr, ring_b, (r - 1 + H) % H, &q2, err);
  if (!st) st = c->ops->ialltoallv(c, as, a2, ar, a2, &q3, err);
  if (!st) st = chain(be, a, b, OV_SHORT, err); /* overlaps the transfers */
  apb_status w1 = c->ops->wait(c, q1, err), w2 = c->ops->wait(c, q2, err), w3 = c->ops->wait(c, q3, err);
  if (!st) st = w1 ? w1 : w2 ? w2 : w3;
  /* ordered after the transfers by `wait`: without it these copies would read the poison */
  if (!st) st = be->ops->copy(be, recv2, recv, total, err);
  if (!st) st = be->ops->copy(be, rr2, rr, ring_b, err);
  if (!st) st = be->ops->copy(be, ar2, ar, ab * (size_t)H, err);
  if (!st) st = fetch(be, got, recv2, total, err);
  for (int s = 0; !st && s < H; s++)
    for (size_t i = 0; i < bytes[s]; i++) x->bad += got[off[s] + i] != (unsigned char)(s + 1);
  if (!st) st = fetch(be, got, rr2, ring_b, err);
  for (size_t i = 0; !st && i < ring_b; i++) x->bad += got[i] != (unsigned char)(0x40 + (r - 1 + H) % H);
  if (!st) st = fetch(be, got, ar2, ab * (size_t)H, err);
  for (int s = 0; !st && s < H; s++) /* chunk s came from rank s, which filled it for us */
    for (size_t i = 0; i < ab; i++) x->bad += got[(size_t)s * ab + i] != (unsigned char)(0x80 + 8 * s + r);
  if (!st) st = apb_nccl_sync(c, err);
  x->t = now_s() - t0;
  x->st = st;
  void *bufs[] = {a, b, send, recv, recv2, rs, rr, rr2, as, ar, ar2};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) be->ops->free(be, bufs[i]);
  free(got);
  return NULL;
}

/* Timing only (printed): a chain alone, the two transfers alone, and both overlapped. */
static void *overlap_timing_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H;
  apb_error *err = &x->err;
  size_t per = (size_t)64 << 20, bytes[MAXH];
  for (int i = 0; i < H; i++) bytes[i] = per;
  void *a = NULL, *b = NULL, *recv = NULL;
  apb_comm_req *q = NULL;
  apb_status st = be->ops->alloc(be, OV_N * sizeof(float), &a, err);
  if (!st) st = be->ops->alloc(be, OV_N * sizeof(float), &b, err);
  if (!st) st = be->ops->alloc(be, per * (size_t)H, &recv, err);
  if (!st) st = be->ops->memset(be, a, 0, OV_N * sizeof(float), err);
  if (!st) st = be->ops->memset(be, b, 0, OV_N * sizeof(float), err);
  if (!st) st = c->ops->barrier(c, err);
  double t[3] = {0, 0, 0};
  for (int rep = 0; rep < 2 && !st; rep++) { /* the first round warms NCCL's connections up */
    double t0 = now_s();
    st = chain(be, a, b, 40, err);
    if (!st) st = be->ops->sync(be, err);
    double t1 = now_s();
    if (!st) st = c->ops->iallgatherv(c, (char *)recv + per * (size_t)x->r, recv, bytes, &q, err);
    if (!st) st = c->ops->wait(c, q, err);
    if (!st) st = apb_nccl_sync(c, err);
    if (!st) st = c->ops->barrier(c, err);
    double t2 = now_s();
    if (!st) st = c->ops->iallgatherv(c, (char *)recv + per * (size_t)x->r, recv, bytes, &q, err);
    if (!st) st = chain(be, a, b, 40, err);
    if (!st) st = c->ops->wait(c, q, err);
    if (!st) st = apb_nccl_sync(c, err);
    double t3 = now_s();
    if (!st) st = c->ops->barrier(c, err);
    t[0] = t1 - t0, t[1] = t2 - t1, t[2] = t3 - t2;
  }
  x->st = st;
  if (!st && x->r == 0)
    fprintf(stderr, "  overlap, H=%d, rank 0: compute %.2f ms, all-gather of %d x 64 MiB %.2f ms (with a barrier), "
            "both overlapped %.2f ms\n", H, 1e3 * t[0], H, 1e3 * t[1], 1e3 * t[2]);
  be->ops->free(be, a), be->ops->free(be, b), be->ops->free(be, recv);
  return NULL;
}

START_TEST(test_overlap) {
  int H = Hs[_i];
  arm(180, "i-variants and wait", _i);
  grp g;
  grp_make(&g, H);
  rctx x[MAXH];
  run_ranks(&g, 0, overlap_rank, x);
  for (int r = 0; r < H; r++) {
    ck_assert_msg(x[r].st == APB_OK && x[r].bad == 0, "H=%d rank %d: %s, %ld wrong bytes (the transfer was not "
                  "ordered after its input or before the compute after wait)", H, r, x[r].st ? x[r].err.msg : "ok",
                  x[r].bad);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_ALLGATHER], 1);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_SENDRECV], 1);
    ck_assert_int_eq(g.c[r]->stats.calls[APB_COLL_ALLTOALL], 1);
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_ALLGATHER], ((int64_t)(r + 1) << 20) * (H - 1));
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_SENDRECV], (int64_t)3 << 20);
    ck_assert_int_eq(g.c[r]->stats.bytes_sent[APB_COLL_ALLTOALL], ((int64_t)1 << 20) * (H - 1));
  }
  run_ranks(&g, 0, overlap_timing_rank, x);
  for (int r = 0; r < H; r++) ck_assert_msg(x[r].st == APB_OK, "H=%d rank %d (timing): %s", H, r, x[r].err.msg);
  grp_free(&g);
  disarm();
}
END_TEST

/* ---------------------------------------------------------------- failures that must not hang */

/* variant 0: rank 1 never calls, the others all-gather and wait in apb_nccl_sync (short timeout);
 * variant 1: rank 1 calls a barrier while the others all-gather (APB_NCCL_CHECK=1);
 * variant 2: rank H-1 aborts after 0.5 s while the others all-gather and wait (long timeout);
 * variant 3: as 0, but the others wait in a backend download, outside the communicator: only the
 * watchdog can release them (ncclCommAbort from its thread ends the kernel the download waits for). */
static void *fail_rank(void *p) {
  rctx *x = p;
  apb_backend *be = x->g->be[x->r];
  apb_comm *c = x->g->c[x->r];
  int H = x->g->H, r = x->r, v = x->variant;
  apb_error *err = &x->err;
  size_t bytes[MAXH];
  for (int i = 0; i < H; i++) bytes[i] = 4096;
  void *recv = NULL;
  double t0 = now_s();
  apb_status st = be->ops->alloc(be, 4096 * (size_t)H, &recv, err);
  if (!st && (v == 0 || v == 3) && r == 1) {
    x->st = APB_OK; /* silent: never calls */
  } else if (!st && v == 1 && r == 1) {
    st = c->ops->barrier(c, err);
  } else if (!st && v == 2 && r == H - 1) {
    usleep(500000);
    c->ops->abort(c, "planted failure");
    st = APB_EINVAL;
  } else if (!st) {
    st = c->ops->allgatherv(c, (char *)recv + 4096 * (size_t)r, recv, bytes, err);
    if (!st && v == 3) {
      unsigned char *h = malloc(4096 * (size_t)H);
      fetch(be, h, recv, 4096 * (size_t)H, err); /* returns once the watchdog aborted: garbage, unchecked */
      free(h);
      apb_error_clear(err);
    }
    if (!st) st = apb_nccl_sync(c, err);
  }
  x->t = now_s() - t0;
  x->st = st;
  be->ops->free(be, recv);
  return NULL;
}

START_TEST(test_failures) {
  int H = Hs[_i / 4], v = _i % 4;
  arm(120, "failure", _i);
  setenv("APB_NCCL_TIMEOUT_S", v == 0 || v == 3 ? "3" : "60", 1);
  if (v == 1) setenv("APB_NCCL_CHECK", "1", 1);
  grp g;
  grp_make(&g, H);
  unsetenv("APB_NCCL_CHECK");
  unsetenv("APB_NCCL_TIMEOUT_S");
  rctx x[MAXH];
  run_ranks(&g, v, fail_rank, x);
  int timeouts = 0;
  for (int r = 0; r < H; r++) {
    fprintf(stderr, "  failure variant %d, H=%d, rank %d: %s after %.2f s: %s\n", v, H, r, apb_status_str(x[r].st),
            x[r].t, x[r].err.msg);
    if ((v == 0 || v == 3) && r == 1) continue;
    if (v == 2 && r == H - 1) continue;
    if (v == 0 || v == 3) {
      ck_assert_msg(x[r].st == APB_ETIMEOUT || x[r].st == APB_ECOMM, "rank %d: %s", r, apb_status_str(x[r].st));
      timeouts += x[r].st == APB_ETIMEOUT;
      ck_assert_msg(strstr(x[r].err.msg, "rank"), "rank %d: the message names no rank: %s", r, x[r].err.msg);
      ck_assert_msg(x[r].t < 30, "rank %d took %.1f s with a 3 s timeout", r, x[r].t);
    } else if (v == 1) {
      ck_assert_msg(x[r].st == APB_ECOMM && strstr(x[r].err.msg, "diverged"), "rank %d: %s: %s", r,
                    apb_status_str(x[r].st), x[r].err.msg);
      ck_assert_msg(strstr(x[r].err.msg, "barrier") && strstr(x[r].err.msg, "allgather"), "rank %d: %s", r,
                    x[r].err.msg);
    } else {
      ck_assert_msg(x[r].st == APB_ECOMM && strstr(x[r].err.msg, "planted failure"), "rank %d: %s: %s", r,
                    apb_status_str(x[r].st), x[r].err.msg);
      ck_assert_msg(x[r].t < 20, "rank %d was released after %.1f s (timeout 60 s): the abort did not reach it", r,
                    x[r].t);
    }
  }
  if (v == 0 || v == 3) {
    ck_assert_msg(timeouts >= 1, "no rank reported the timeout itself");
    apb_error err = {0}; /* the silent rank learns that its group is gone */
    ck_assert_int_eq(apb_nccl_sync(g.c[1], &err), APB_ECOMM);
  }
  if (v == 2) { /* a failed communicator refuses every later call at once */
    apb_error err = {0};
    ck_assert_int_eq(g.c[0]->ops->barrier(g.c[0], &err), APB_ECOMM);
    ck_assert_ptr_nonnull(strstr(err.msg, "planted failure"));
  }
  grp_free(&g);
  disarm();
}
END_TEST

/* ---------------------------------------------------------------- the program */

static const char *bin(void) { return tu_apb_bin(); }

/* `apb run --gpus H` with a rank made to fail must end quickly, non-zero, naming that rank. */
START_TEST(test_run_fault) {
  int H = Hs[_i / 2], which = _i % 2;
  int rank = which ? 1 : H - 1, layer = which ? 1 : 0;
  const char *method = which ? "ring" : "apb";
  arm(180, "apb run with a failing rank", _i);
  char cmd[1024], *out = NULL, want[64];
  snprintf(cmd, sizeof cmd,
           "APB_FAULT_RANK=%d APB_FAULT_LAYER=%d APB_NCCL_TIMEOUT_S=100 timeout 120 %s run --gpus %d --method %s "
           "--synthetic 1025 --query-len 5 --max-new-tokens 2 --quiet", rank, layer, bin(), H, method);
  double t0 = now_s();
  int rc = tu_sh(cmd, &out);
  double t = now_s() - t0;
  snprintf(want, sizeof want, "rank %d", rank);
  fprintf(stderr, "  `%s`: exit %d after %.1f s\n", cmd, rc, t);
  ck_assert_msg(rc != 0 && rc != 124 && strstr(out, want) && strstr(out, "injected fault"),
                "`%s`: exit %d after %.1f s (124: timed out), output:\n%s", cmd, rc, t, out);
  ck_assert_msg(t < 100, "`%s` took %.1f s: the failure did not end the run promptly", cmd, t);
  free(out);
  disarm();
}
END_TEST

#if defined(HAVE_MPI) && defined(APB_MPIRUN)
static float *read_f32(apb_st_file *f, const char *name, int64_t *n) {
  apb_error err = {0};
  const apb_st_tensor *t = apb_st_find(f, name);
  ck_assert_msg(t != NULL, "dump has no tensor %s", name);
  *n = apb_st_numel(t);
  float *v = malloc(sizeof(float) * (size_t)(*n ? *n : 1));
  ck_assert_msg(apb_st_read_f32(f, t, v, &err) == APB_OK, "%s: %s", name, err.msg);
  return v;
}
#endif

/* `apb run --gpus 2` works end to end, and (with MPI) one process per GPU gives the same results. */
START_TEST(test_run_program) {
  arm(600, "apb run --gpus", 0);
  char *a = tu_tmpname(".safetensors"), cmd[1024], *out = NULL;
  const char *common = "run --quiet --backend cuda-f32 --method ring --synthetic 1025 --query-len 5 --max-new-tokens 3";
  snprintf(cmd, sizeof cmd, "timeout 300 %s %s --gpus 2 --dump %s", bin(), common, a);
  int rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0, "`%s`: exit %d:\n%s", cmd, rc, out);
  free(out);
  snprintf(cmd, sizeof cmd, "timeout 300 %s run --quiet --json --gpus %d --method dense,ring,apb --synthetic 1025 "
           "--query-len 5 --max-new-tokens 2", bin(), Hs[n_Hs - 1]);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0 && strstr(out, "\"method\": \"apb\""), "`%s`: exit %d:\n%s", cmd, rc, out);
  free(out);
  snprintf(cmd, sizeof cmd, "%s run --gpus 2 --hosts 3", bin());
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 2 && strstr(out, "each host is one GPU"), "`%s`: exit %d:\n%s", cmd, rc, out);
  free(out);
#if defined(HAVE_MPI) && defined(APB_MPIRUN)
  char *b = tu_tmpname(".safetensors");
  snprintf(cmd, sizeof cmd,
           "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader NCCL_NVLS_ENABLE=0 "
           "timeout 300 %s --oversubscribe -np 2 %s %s --dump %s", APB_MPIRUN, bin(), common, b);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0, "`%s`: exit %d:\n%s", cmd, rc, out);
  free(out);
  apb_st_file *fa = NULL, *fb = NULL;
  apb_error err = {0};
  ck_assert_msg(apb_st_open(a, &fa, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_st_open(b, &fb, &err) == APB_OK, "%s", err.msg);
  int64_t na, nb;
  const char *names[] = {"hidden", "logits"};
  for (int i = 0; i < 2; i++) {
    float *va = read_f32(fa, names[i], &na), *vb = read_f32(fb, names[i], &nb);
    ck_assert_int_eq(na, nb);
    char what[96];
    snprintf(what, sizeof what, "%s: mpirun -np 2 vs --gpus 2 (cuda-f32, ring)", names[i]);
    tu_assert_close(what, vb, va, na, apb_tolerance(APB_PREC_F32, 1025));
    free(va), free(vb);
  }
  const apb_st_tensor *ga = apb_st_find(fa, "generated"), *gb = apb_st_find(fb, "generated");
  ck_assert_msg(ga && gb && ga->end - ga->begin == gb->end - gb->begin &&
                memcmp(ga->data, gb->data, ga->end - ga->begin) == 0, "generated tokens differ between mpirun and --gpus");
  apb_st_close(fa), apb_st_close(fb);
  remove(b);
  free(b);
#else
  fprintf(stderr, "  (built without MPI: the mpirun run with a CUDA backend is not compiled in)\n");
#endif
  remove(a);
  free(a);
  disarm();
}
END_TEST

/* ---------------------------------------------------------------- every method against the CPU */

#define MAXL 8                /* layers whose selections are captured (tiny has 2) */

/* The selections of a run (APB.md 3.4), captured by a hook: each rank's thread writes its own slots. */
typedef struct sel_cap {
  float *sel[MAXH][MAXL];   /* [Hkv, k] token indices as floats */
  int64_t n[MAXH][MAXL];
} sel_cap;

static void sel_hook(void *user, const apb_hook_info *in) {
  sel_cap *c = user;
  if (strcmp(in->stage, "selected") || strcmp(in->phase, "prefill") || in->layer < 0 || in->layer >= MAXL ||
      in->host < 0 || in->host >= MAXH)
    return;
  int64_t n = 1;
  for (int i = 0; i < in->ndim; i++) n *= in->shape[i];
  free(c->sel[in->host][in->layer]);
  c->sel[in->host][in->layer] = malloc(sizeof(float) * (size_t)(n ? n : 1));
  memcpy(c->sel[in->host][in->layer], in->data, sizeof(float) * (size_t)n);
  c->n[in->host][in->layer] = n;
}

static void sel_free(sel_cap *c) {
  for (int h = 0; h < MAXH; h++)
    for (int l = 0; l < MAXL; l++) free(c->sel[h][l]);
  memset(c, 0, sizeof *c);
}

/* Host and layer pairs whose selections differ (the first is named in where). */
static int sel_differ(const sel_cap *a, const sel_cap *b, char *where, size_t len) {
  int d = 0;
  for (int h = 0; h < MAXH; h++)
    for (int l = 0; l < MAXL; l++) {
      int same = a->n[h][l] == b->n[h][l] &&
                 (!a->n[h][l] || memcmp(a->sel[h][l], b->sel[h][l], sizeof(float) * (size_t)a->n[h][l]) == 0);
      if (!same && d++ == 0) snprintf(where, len, "host %d layer %d", h, l);
    }
  return d;
}

typedef struct run_out {
  int H;
  int64_t n;
  float *hidden;            /* [n, E] document order, poisoned first */
  const float *logits;      /* [V] (last host's) */
  int32_t gen[8];
  int64_t n_gen;
  apb_host_result res[MAXH];
  apb_comm_stats stats[MAXH];
} run_out;

static void make_doc(int64_t n, int64_t q, int32_t **doc, int32_t **query) {
  *doc = malloc(sizeof(int32_t) * (size_t)n);
  *query = malloc(sizeof(int32_t) * (size_t)q);
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + (uint64_t)n);
  for (int64_t i = 0; i < n; i++) (*doc)[i] = (int32_t)apb_rng_below(&r, (uint64_t)g_model->cfg.vocab);
  for (int64_t i = 0; i < q; i++) (*query)[i] = (int32_t)apb_rng_below(&r, (uint64_t)g_model->cfg.vocab);
}

typedef enum where_run {
  ON_CPU,                   /* the CPU fast backend, simulated hosts */
  ON_CPU_BF16,              /* the same with every stored activation rounded to bf16 */
  ON_ONE_GPU,               /* simulated hosts on device 0 (the same kernels as ON_GPUS) */
  ON_GPUS                   /* one rank per GPU through NCCL (apb_nccl_execute) */
} where_run;

/* Warm-up and timed runs of apb_nccl_execute in run_plan (test_warmup_reps sets them). */
static int g_warmup = 0, g_reps = 0, g_timing = 0, g_profile = 0;

/* Run the plan; backend names the CUDA mode for ON_ONE_GPU and ON_GPUS; cap (may be NULL) captures
 * the selections; use_preset generates the weights on each device (ON_GPUS only). */
static void run_plan(const apb_plan *plan, where_run w, const char *backend, int use_preset, sel_cap *cap,
                     const int32_t *doc, const int32_t *query, run_out *o) {
  apb_error err = {0};
  memset(o, 0, sizeof *o);
  apb_status st;
  if (w != ON_GPUS) {
    apb_sim_opts so = {.backend = w == ON_ONE_GPU ? backend : "fast", .cpu = {.emulate_bf16 = w == ON_CPU_BF16},
                       .timeout_s = 120, .hook = cap ? sel_hook : NULL, .hook_user = cap, .want_hidden = 1};
    st = apb_sim_execute(plan, g_model, &so, doc, query, o->res, o->stats, &err);
  } else {
    apb_nccl_opts no = {.backend = backend, .use_preset = use_preset, .preset = APB_PRESET_TINY,
                        .cfg = use_preset ? g_gen_cfg : NULL, .scorer_width = g_gen_I, .seed = 1,
                        .timeout_s = 120, .hook = cap ? sel_hook : NULL, .hook_user = cap, .want_hidden = 1,
                        .warmup = g_warmup, .reps = g_reps, .comm_timing = g_timing,
                        .profile = g_profile};
    st = apb_nccl_execute(plan, use_preset ? NULL : g_model, &no, doc, query, o->res, o->stats, &err);
  }
  static const char *wn[] = {"cpu", "cpu bf16", "simulated hosts on one GPU", "NCCL"};
  ck_assert_msg(st == APB_OK, "%s, H=%d, %s %s: %s", apb_method_name(plan->o.method), plan->H, wn[w],
                backend ? backend : "", err.msg);
  int H = plan->H, E = g_model->cfg.hidden;
  int64_t n = plan->n;
  o->H = H, o->n = n;
  o->hidden = malloc(sizeof(float) * (size_t)n * (size_t)E);
  for (int64_t i = 0; i < n * E; i++) o->hidden[i] = NAN;
  for (int r = 0; r < H; r++)
    for (int64_t i = 0; i < o->res[r].n_rows; i++)
      memcpy(o->hidden + (size_t)o->res[r].row_pos[i] * (size_t)E, o->res[r].hidden + (size_t)i * (size_t)E,
             sizeof(float) * (size_t)E);
  o->logits = o->res[H - 1].logits;
  o->n_gen = o->res[H - 1].n_generated;
  ck_assert_int_le(o->n_gen, 8);
  memcpy(o->gen, o->res[H - 1].generated, sizeof(int32_t) * (size_t)o->n_gen);
  for (int r = 0; r < H; r++) { /* every host ends with the same logits and tokens (APB.md 4) */
    tu_assert_bitwise("logits on every host", o->res[r].logits, o->logits, g_model->cfg.vocab);
    ck_assert_int_eq(o->res[r].n_generated, o->n_gen);
    for (int64_t t = 0; t < o->n_gen; t++) ck_assert_int_eq(o->res[r].generated[t], o->gen[t]);
  }
}

static void run_free(run_out *o) {
  for (int r = 0; r < o->H; r++) apb_host_result_free(&o->res[r]);
  free(o->hidden);
}

static void print_tokens(const char *what, const run_out *o) {
  fprintf(stderr, "    %-44s tokens:", what);
  for (int64_t t = 0; t < o->n_gen; t++) fprintf(stderr, " %d", o->gen[t]);
  fprintf(stderr, "\n");
}

static void assert_same_counts(const char *what, const run_out *a, const run_out *ref) {
  for (int r = 0; r < a->H; r++)
    for (int c = 0; c < APB_COLL_COUNT; c++)
      ck_assert_msg(a->stats[r].calls[c] == ref->stats[r].calls[c] &&
                    a->stats[r].bytes_sent[c] == ref->stats[r].bytes_sent[c] &&
                    a->stats[r].bytes_recv[c] == ref->stats[r].bytes_recv[c],
                    "%s rank %d %s: NCCL counted %lld calls, %lld sent, %lld received; the simulator %lld, %lld, %lld",
                    what, r, apb_coll_name((apb_coll)c), (long long)a->stats[r].calls[c],
                    (long long)a->stats[r].bytes_sent[c], (long long)a->stats[r].bytes_recv[c],
                    (long long)ref->stats[r].calls[c], (long long)ref->stats[r].bytes_sent[c],
                    (long long)ref->stats[r].bytes_recv[c]);
}

/* every method with its default overlap (apb: the anchor rows during the all-gathers, the local rows
 * in one call after them; ulysses: pipelined over head groups), and the other forms: apb split around
 * the all-gathers and merged by LSE, ulysses blocking */
static const apb_method methods[] = {APB_METHOD_DENSE, APB_METHOD_RING, APB_METHOD_ZIGZAG, APB_METHOD_ULYSSES,
                                     APB_METHOD_STAR,  APB_METHOD_APB,  APB_METHOD_APB,    APB_METHOD_ULYSSES,
                                     APB_METHOD_ULYSSES};
static const int overlaps[] = {-1, -1, -1, -1, -1, -1, APB_OVERLAP_SPLIT, APB_OVERLAP_NONE, -1};
static const int on_gqa8[] = {0, 0, 0, 0, 0, 0, 0, 0, 1}; /* the last on gqa8: several KV heads per rank */
#define N_METHODS ((int)(sizeof methods / sizeof *methods))
/* the (H, method) pairs test_methods_vs_cpu runs, built in main: ulysses needs H to divide the KV
 * heads, so the pairs where it does not are listed there (and printed), not run and counted */
static struct {
  int H, m;
} mv[2 * N_METHODS];
static int n_mv;

/* Per method and H, in fp32 and bf16 mode:
 *  1. the NCCL run equals the simulated hosts on one GPU bit for bit (the same kernels on the same kind
 *     of device: any difference is the communicator's), with the same counts;
 *  2. against the CPU (fp32 run for fp32 mode, bf16-storage run for bf16 mode): within the table's
 *     bound, the same tokens in fp32, the same counts. A selection that differs from the CPU's is a
 *     near-tie of scores (APB.md 7: allowed, and it changes what follows), so then the distance is
 *     reported, not bounded; 1. still holds. */
START_TEST(test_methods_vs_cpu) {
  const int H = mv[_i].H, mi = mv[_i].m;
  apb_method m = methods[mi];
  /* every test sets what run_plan reads (CK_FORK=no: a failed test does not get to restore it) */
  g_model = on_gqa8[mi] ? gqa8 : tiny, g_gen_cfg = NULL, g_gen_I = 0;
  arm(600, "method vs CPU", _i);
  const int64_t n = 1025, q = 7;
  const int64_t nE = n * g_model->cfg.hidden;
  apb_run_opts ro;
  apb_run_opts_default(&ro);
  ro.method = m, ro.hosts = H, ro.max_new_tokens = 4, ro.overlap = overlaps[mi];
  apb_plan *plan = malloc(sizeof *plan);
  apb_error err = {0};
  ck_assert_msg(apb_plan_make(&ro, n, q, &g_model->cfg, g_model->scorer_width, plan, &err) == APB_OK, "%s", err.msg);
  char mname[32];
  if (ro.overlap >= 0)
    snprintf(mname, sizeof mname, "%s --overlap %d", apb_method_name(m), ro.overlap);
  else
    snprintf(mname, sizeof mname, "%s%s", apb_method_name(m), g_model == gqa8 ? " (16/8 heads)" : "");
  int32_t *doc, *query;
  make_doc(n, q, &doc, &query);
  run_out cpu[2], one, gpu;
  sel_cap ccap[2], gcap;
  memset(ccap, 0, sizeof ccap), memset(&gcap, 0, sizeof gcap);
  char what[128], buf[192];
  for (int k = 0; k < 2; k++) {
    run_plan(plan, k ? ON_CPU_BF16 : ON_CPU, NULL, 0, &ccap[k], doc, query, &cpu[k]);
    snprintf(what, sizeof what, "%s H=%d cpu fast%s", mname, plan->H, k ? " bf16" : "");
    print_tokens(what, &cpu[k]);
  }
  const char *modes[] = {"cuda-f32", "cuda-bf16"};
  for (int k = 0; k < 2; k++) {
    snprintf(what, sizeof what, "%s H=%d %s", mname, plan->H, modes[k]);
    run_plan(plan, ON_ONE_GPU, modes[k], 0, NULL, doc, query, &one);
    run_plan(plan, ON_GPUS, modes[k], 0, &gcap, doc, query, &gpu);
    print_tokens(what, &gpu);
    /* 1: the communicator moves bytes exactly */
    snprintf(buf, sizeof buf, "%s: final hidden, NCCL vs simulated hosts on one GPU", what);
    tu_assert_bitwise(buf, gpu.hidden, one.hidden, nE);
    snprintf(buf, sizeof buf, "%s: logits, NCCL vs simulated hosts on one GPU", what);
    tu_assert_bitwise(buf, gpu.logits, one.logits, g_model->cfg.vocab);
    ck_assert_int_eq(gpu.n_gen, one.n_gen);
    for (int64_t t = 0; t < gpu.n_gen; t++)
      ck_assert_msg(gpu.gen[t] == one.gen[t], "%s: token %lld is %d with NCCL, %d with simulated hosts on one GPU",
                    what, (long long)t, gpu.gen[t], one.gen[t]);
    assert_same_counts(what, &gpu, &one);
    /* bytes depend on the storage dtype: only the fp32 mode moves what the (fp32) CPU run moves */
    if (k == 0) assert_same_counts(what, &gpu, &cpu[0]);
    /* 2: the numbers against the CPU */
    char sel_at[64] = "";
    int differ = sel_differ(&gcap, &ccap[k], sel_at, sizeof sel_at);
    apb_tol tol = apb_tolerance(k == 0 ? APB_PREC_F32 : APB_PREC_BF16, n);
    if (!differ) {
      snprintf(buf, sizeof buf, "%s: final hidden vs the CPU", what);
      tu_assert_close(buf, gpu.hidden, cpu[k].hidden, nE, tol);
      snprintf(buf, sizeof buf, "%s: logits vs the CPU", what);
      tu_assert_close(buf, gpu.logits, cpu[k].logits, g_model->cfg.vocab, tol);
      if (k == 0) {
        ck_assert_int_eq(gpu.n_gen, cpu[0].n_gen);
        for (int64_t t = 0; t < cpu[0].n_gen; t++)
          ck_assert_msg(gpu.gen[t] == cpu[0].gen[t], "%s: token %lld is %d, the CPU's %d", what, (long long)t,
                        gpu.gen[t], cpu[0].gen[t]);
      }
    } else {
      apb_cmp ch, cl;
      apb_compare(gpu.hidden, cpu[k].hidden, nE, &ch);
      apb_compare(gpu.logits, cpu[k].logits, g_model->cfg.vocab, &cl);
      fprintf(stderr, "    %s: selections differ from the CPU's at %d host/layer pairs (first: %s): a near-tie of "
              "scores (APB.md 7), reported, not bounded: hidden rel_fro %.3g, logits rel_fro %.3g\n", what, differ,
              sel_at, ch.rel_fro, cl.rel_fro);
    }
    if (k == 1) { /* for information: bf16 storage against fp32, which star and apb need not meet (a
                     rounding can move a score across the l_p-th place and change the passing block) */
      apb_cmp ch, cl;
      apb_compare(gpu.hidden, cpu[0].hidden, nE, &ch);
      apb_compare(gpu.logits, cpu[0].logits, g_model->cfg.vocab, &cl);
      fprintf(stderr, "    %-44s against the CPU in fp32: hidden rel_fro %.3g, logits rel_fro %.3g\n", what,
              ch.rel_fro, cl.rel_fro);
    }
    run_free(&gpu), run_free(&one);
    sel_free(&gcap);
  }
  run_free(&cpu[0]), run_free(&cpu[1]);
  sel_free(&ccap[0]), sel_free(&ccap[1]);
  free(doc), free(query), free(plan);
  g_model = tiny;
  disarm();
}
END_TEST

/* The preset generated on each device (apb_bmodel_generate; for tiny with 16/8 heads, apb_bmodel_generate_config):
 * not lib/gen.c's numbers, so it is checked
 * for running and for every rank agreeing, not against the CPU. */
START_TEST(test_preset_on_device) {
  int H = Hs[_i / 3];
  /* 0: the tiny preset, apb; 1 and 2: tiny with 16/8 heads and retaining heads of width 64
   * (apb_bmodel_generate_config on each device), ulysses and apb */
  const int sized = _i % 3 != 0;
  arm(300, "preset on device", _i);
  apb_run_opts ro;
  apb_run_opts_default(&ro);
  ro.method = _i % 3 == 1 ? APB_METHOD_ULYSSES : APB_METHOD_APB, ro.hosts = H, ro.max_new_tokens = 3;
  apb_model_config cfg;
  int width = 0;
  apb_preset_config(APB_PRESET_TINY, &cfg, &width);
  if (sized) cfg = gqa8->cfg, width = 64;
  apb_plan *plan = malloc(sizeof *plan);
  apb_error err = {0};
  ck_assert_msg(apb_plan_make(&ro, 1023, 5, &cfg, width, plan, &err) == APB_OK, "%s", err.msg);
  int32_t *doc, *query;
  make_doc(1023, 5, &doc, &query);
  run_out o;
  /* run_plan reads the sizes (hidden, vocab) from g_model and generates g_gen_cfg on each device */
  g_model = sized ? gqa8 : tiny, g_gen_cfg = sized ? &cfg : NULL, g_gen_I = width;
  run_plan(plan, ON_GPUS, "cuda-bf16", 1, NULL, doc, query, &o);
  g_model = tiny, g_gen_cfg = NULL, g_gen_I = 0;
  for (int i = 0; i < cfg.vocab; i++) ck_assert_msg(isfinite(o.logits[i]), "logit %d is %g", i, (double)o.logits[i]);
  char what[96];
  snprintf(what, sizeof what, "%s, %s generated on each GPU", apb_method_name(ro.method),
           sized ? "tiny with 16/8 heads" : "the preset");
  print_tokens(what, &o);
  run_free(&o);
  free(doc), free(query), free(plan);
  disarm();
}
END_TEST

/* Warm-up runs and repeated timed runs (what bench prefill times) return what one run returns, bit for
 * bit, with the counts of one run. */
START_TEST(test_warmup_reps) {
  int H = Hs[0];
  g_model = tiny, g_gen_cfg = NULL, g_gen_I = 0;
  arm(300, "warmup and reps", _i);
  apb_run_opts ro;
  apb_run_opts_default(&ro);
  ro.method = _i ? APB_METHOD_RING : APB_METHOD_APB, ro.hosts = H, ro.max_new_tokens = 3;
  ro.scorer = APB_SCORER_RETAINING;
  apb_plan *plan = malloc(sizeof *plan);
  apb_error err = {0};
  ck_assert_msg(apb_plan_make(&ro, 1023, 5, &tiny->cfg, tiny->scorer_width, plan, &err) == APB_OK, "%s", err.msg);
  int32_t *doc, *query;
  make_doc(1023, 5, &doc, &query);
  run_out one, more;
  run_plan(plan, ON_GPUS, "cuda-f32", 0, NULL, doc, query, &one);
  g_warmup = 1, g_reps = 3, g_timing = 1;
  run_plan(plan, ON_GPUS, "cuda-f32", 0, NULL, doc, query, &more);
  g_warmup = 0, g_reps = 0, g_timing = 0;
  /* the visible communication time: measured only with timing on, within the rank's prefill, and
   * not zero for apb (rank 0's all-gathers block its compute stream) */
  double vis = 0;
  for (int r = 0; r < H; r++) {
    ck_assert_msg(one.stats[r].visible_s == 0, "rank %d: visible_s %g without timing", r, one.stats[r].visible_s);
    ck_assert_msg(more.stats[r].visible_s >= 0 && more.stats[r].visible_s <= more.res[r].stats.prefill_s +
                  more.res[r].stats.query_s + more.res[r].stats.decode_s,
                  "rank %d: visible_s %g outside [0, the run's %g s]", r, more.stats[r].visible_s,
                  more.res[r].stats.prefill_s + more.res[r].stats.query_s + more.res[r].stats.decode_s);
    vis += more.stats[r].visible_s;
  }
  if (ro.method == APB_METHOD_APB) ck_assert_msg(vis > 0, "apb: no visible communication time measured");
  fprintf(stderr, "    %s: visible communication %.3f ms summed over ranks\n", apb_method_name(ro.method), vis * 1e3);
  char what[64];
  snprintf(what, sizeof what, "%s H=%d warmup 1 reps 3 vs one run", apb_method_name(ro.method), H);
  tu_assert_bitwise(what, more.hidden, one.hidden, (size_t)plan->n * (size_t)tiny->cfg.hidden);
  tu_assert_bitwise(what, more.logits, one.logits, tiny->cfg.vocab);
  assert_same_counts(what, &more, &one);
  for (int r = 0; r < H; r++) ck_assert_int_eq(more.res[r].stats.bytes_sent, one.res[r].stats.bytes_sent);
  /* --profile 2: stages timed by CUDA events on each rank's stream; no result changes, and the stages
   * are a breakdown of the prefill (each >= 0, summing to it; projections, attention, FFN timed) */
  run_out prof;
  g_profile = 2;
  run_plan(plan, ON_GPUS, "cuda-f32", 0, NULL, doc, query, &prof);
  g_profile = 0;
  snprintf(what, sizeof what, "%s H=%d profile 2 vs unprofiled", apb_method_name(ro.method), H);
  tu_assert_bitwise(what, prof.hidden, one.hidden, (size_t)plan->n * (size_t)tiny->cfg.hidden);
  for (int r = 0; r < H; r++) tu_assert_stages(what, r, &prof.res[r].stats);
  run_free(&prof);
  run_free(&one), run_free(&more);
  free(doc), free(query), free(plan);
  disarm();
}
END_TEST

int main(void) {
  apb_error err = {0};
  int n = 0;
  if (!apb_nccl_built()) {
    fprintf(stderr, "check_gpu_nccl: SKIP: this libapb was built without NCCL\n");
    return 77;
  }
  if (apb_cuda_device_count(&n, &err) != APB_OK || n < 2) {
    fprintf(stderr, "check_gpu_nccl: SKIP: needs at least 2 GPUs, found %d%s%s\n", n, err.msg[0] ? ": " : "", err.msg);
    return 77;
  }
  setenv("CK_FORK", "no", 1);
  setenv("NCCL_NVLS_ENABLE", "0", 0); /* NVLink multicast stays off on the shared machines */
  n_dev = n < MAXH ? n : MAXH;
  Hs[n_Hs++] = 2;
  if (n_dev >= 4) Hs[n_Hs++] = 4;
  for (int d = 0; d < n_dev; d++) {
    char desc[256];
    if (apb_cuda_device_describe(d, desc, sizeof desc, &err) == APB_OK) fprintf(stderr, "check_gpu_nccl: %s\n", desc);
  }
  fprintf(stderr, "check_gpu_nccl: %d GPUs present, testing H =%s%s\n", n, " 2", n_Hs > 1 ? ", 4" : " (4 needs 4 GPUs)");
  if (apb_model_generate(APB_PRESET_TINY, 1, &tiny, &err) != APB_OK) {
    fprintf(stderr, "check_gpu_nccl: tiny preset: %s\n", err.msg);
    return 1;
  }
  g_model = tiny;
  apb_model_config c;
  int I;
  apb_preset_config(APB_PRESET_TINY, &c, &I);
  c.hidden = 512, c.n_heads = 16, c.n_kv_heads = 8, c.head_dim = 32;
  if (apb_model_generate_config(&c, I, 2, &gqa8, &err) != APB_OK) {
    fprintf(stderr, "check_gpu_nccl: tiny with 8 KV heads: %s\n", err.msg);
    return 1;
  }
  for (int h = 0; h < n_Hs; h++)
    for (int mi = 0; mi < N_METHODS; mi++) {
      const apb_model *mm = on_gqa8[mi] ? gqa8 : tiny;
      if (methods[mi] == APB_METHOD_ULYSSES && mm->cfg.n_kv_heads % Hs[h]) {
        fprintf(stderr, "check_gpu_nccl: not run: ulysses with H=%d on a model with %d KV heads (H must divide them)\n",
                Hs[h], mm->cfg.n_kv_heads);
        continue;
      }
      mv[n_mv].H = Hs[h], mv[n_mv].m = mi, n_mv++;
    }
  pthread_t dl;
  pthread_create(&dl, NULL, deadline_thread, NULL);
  pthread_detach(dl);

  Suite *s = suite_create("gpu_nccl");
  /* first, while this process holds no CUDA context yet: the child processes then get the GPUs even
   * when they are in an exclusive compute mode */
  TCase *tc = tu_tcase("program", 1200);
  tcase_add_loop_test(tc, test_run_fault, 0, 2 * n_Hs);
  tcase_add_test(tc, test_run_program);
  suite_add_tcase(s, tc);
  tc = tu_tcase("collectives", 600);
  tcase_add_loop_test(tc, test_allgatherv, 0, 5 * n_Hs);
  tcase_add_loop_test(tc, test_sendrecv, 0, 2 * n_Hs);
  tcase_add_loop_test(tc, test_alltoallv, 0, n_Hs);
  tcase_add_loop_test(tc, test_bcast_barrier, 0, n_Hs);
  tcase_add_test(tc, test_bad_args);
  tcase_add_loop_test(tc, test_overlap, 0, n_Hs);
  suite_add_tcase(s, tc);
  tc = tu_tcase("failures", 600);
  tcase_add_loop_test(tc, test_failures, 0, 4 * n_Hs);
  suite_add_tcase(s, tc);
  tc = tu_tcase("end_to_end", 3600);
  tcase_add_loop_test(tc, test_methods_vs_cpu, 0, n_mv);
  tcase_add_loop_test(tc, test_preset_on_device, 0, 3 * n_Hs);
  tcase_add_loop_test(tc, test_warmup_reps, 0, 2);
  suite_add_tcase(s, tc);
  int rc = tu_run(s, "check_gpu_nccl");
  apb_model_free(tiny);
  apb_model_free(gqa8);
  return rc;
}
