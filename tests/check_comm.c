/* tests/check_comm.c: the simulated-hosts communicator (sim/comm_sim.c) against what each collective
 * must deliver, for H in {1, 2, 3, 4, 8}, in serialized and concurrent mode: contents, logical byte
 * counts, mismatch detection, abort and timeout (a peer that never arrives must not hang the others).
 * The MPI communicator is checked end to end by tests/check_sched.c (bitwise against this one).
 */
#include <stdlib.h>
#include <string.h>

#include "apb/sim.h"
#include "testutil.h"

static const int Hs[] = {1, 2, 3, 4, 8};

typedef struct group {
  int H;
  apb_backend *be[8];
  apb_comm *c[8];
  apb_sim_group *g;
} group;

static void group_make(group *gr, int H, int serialized, double timeout) {
  apb_error err = {0};
  gr->H = H;
  for (int r = 0; r < H; r++) ck_assert_msg(apb_backend_naive(NULL, &gr->be[r], &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_sim_group_create(H, gr->be, serialized, timeout, &gr->g, gr->c, &err) == APB_OK, "%s", err.msg);
}

static void group_free(group *gr) {
  for (int r = 0; r < gr->H; r++) apb_comm_destroy(gr->c[r]);
  apb_sim_group_destroy(gr->g);
  for (int r = 0; r < gr->H; r++) apb_backend_destroy(gr->be[r]);
}

/* Contribution sizes that differ per rank, some zero (like APB's last host). */
static size_t contrib(int r, int H) { return r == H - 1 ? 0 : (size_t)(4 * (r + 1) + 3); }

typedef struct ctx {
  group *gr;
  apb_status st[8];
  int bad[8];
} ctx;

/* Run host on H simulated hosts (serialized or concurrent) in gr: every host must return APB_OK with no
 * wrong value. The caller checks gr's counters, then frees it. */
static void run_mode(group *gr, int H, int serialized, void (*host)(int, void *)) {
  group_make(gr, H, serialized, 30);
  ctx x = {gr, {0}, {0}};
  apb_error err = {0};
  ck_assert_int_eq(apb_sim_run(gr->H, gr->c, host, &x, &err), APB_OK);
  for (int r = 0; r < gr->H; r++)
    ck_assert_msg(x.st[r] == APB_OK && x.bad[r] == 0, "H=%d serialized %d host %d: status %d, %d wrong values", gr->H,
                  serialized, r, x.st[r], x.bad[r]);
}

static void allgather_host(int r, void *arg) {
  ctx *x = arg;
  int H = x->gr->H;
  size_t bytes[8], total = 0;
  for (int i = 0; i < H; i++) bytes[i] = contrib(i, H), total += bytes[i];
  unsigned char send[64], recv[512];
  for (size_t i = 0; i < bytes[r]; i++) send[i] = (unsigned char)(r * 31 + i);
  memset(recv, 0xEE, sizeof recv);
  apb_error err = {0};
  apb_comm *c = x->gr->c[r];
  x->st[r] = c->ops->allgatherv(c, send, recv, bytes, &err);
  size_t off = 0;
  for (int s = 0; s < H; s++)
    for (size_t i = 0; i < bytes[s]; i++, off++)
      if (recv[off] != (unsigned char)(s * 31 + i)) x->bad[r]++;
  if (recv[total] != 0xEE) x->bad[r]++; /* nothing written past the end */
}

START_TEST(test_allgatherv) {
  for (int serialized = 0; serialized <= 1; serialized++) {
    group gr;
    run_mode(&gr, Hs[_i], serialized, allgather_host);
    int H = gr.H;
    for (int r = 0; r < H; r++) {
      size_t others = 0;
      for (int s = 0; s < H; s++)
        if (s != r) others += contrib(s, H);
      ck_assert_int_eq(gr.c[r]->stats.calls[APB_COLL_ALLGATHER], 1);
      ck_assert_int_eq(gr.c[r]->stats.bytes_sent[APB_COLL_ALLGATHER], (int64_t)contrib(r, H) * (H - 1));
      ck_assert_int_eq(gr.c[r]->stats.bytes_recv[APB_COLL_ALLGATHER], (int64_t)others);
    }
    group_free(&gr);
  }
}
END_TEST

static void ring_host(int r, void *arg) {
  ctx *x = arg;
  int H = x->gr->H;
  int32_t send[16], recv[16];
  memset(recv, 0xFF, sizeof recv); /* -1: no value sent is negative */
  size_t n_send = (size_t)(r % 3 + 1), n_recv = (size_t)(((r - 1 + H) % H) % 3 + 1);
  for (size_t i = 0; i < n_send; i++) send[i] = r * 100 + (int32_t)i;
  apb_error err = {0};
  apb_comm *c = x->gr->c[r];
  x->st[r] = c->ops->sendrecv(c, send, n_send * 4, (r + 1) % H, recv, n_recv * 4, (r - 1 + H) % H, &err);
  for (size_t i = 0; i < n_recv; i++)
    if (recv[i] != ((r - 1 + H) % H) * 100 + (int32_t)i) x->bad[r]++;
  if (recv[n_recv] != -1) x->bad[r]++; /* nothing written past what was received */
}

START_TEST(test_sendrecv_ring) {
  for (int serialized = 0; serialized <= 1; serialized++) {
    group gr;
    run_mode(&gr, Hs[_i], serialized, ring_host);
    for (int r = 0; r < gr.H; r++) {
      int64_t expect = gr.H == 1 ? 0 : (int64_t)(r % 3 + 1) * 4;
      ck_assert_int_eq(gr.c[r]->stats.bytes_sent[APB_COLL_SENDRECV], expect);
    }
    group_free(&gr);
  }
}
END_TEST

static void a2a_host(int r, void *arg) {
  ctx *x = arg;
  int H = x->gr->H;
  /* rank r sends (r + d + 1) int32 to rank d, each value r*1000 + d*10 + i */
  int32_t send[256] = {0}, recv[256];
  memset(recv, 0xFF, sizeof recv); /* -1: no value sent is negative (0 is one: rank 0's to itself) */
  size_t sb[8] = {0}, rb[8] = {0}, off = 0;
  for (int d = 0; d < H; d++) {
    sb[d] = (size_t)(r + d + 1) * 4;
    rb[d] = (size_t)(d + r + 1) * 4;
    for (int i = 0; i < r + d + 1; i++) send[off++] = r * 1000 + d * 10 + i;
  }
  apb_error err = {0};
  apb_comm *c = x->gr->c[r];
  x->st[r] = c->ops->alltoallv(c, send, sb, recv, rb, &err);
  off = 0;
  for (int s = 0; s < H; s++)
    for (int i = 0; i < s + r + 1; i++)
      if (recv[off++] != s * 1000 + r * 10 + i) x->bad[r]++;
  if (recv[off] != -1) x->bad[r]++; /* nothing written past the end */
}

START_TEST(test_alltoallv) {
  for (int serialized = 0; serialized <= 1; serialized++) {
    group gr;
    run_mode(&gr, Hs[_i], serialized, a2a_host);
    for (int r = 0; r < gr.H; r++) {
      int64_t sent = 0;
      for (int d = 0; d < gr.H; d++)
        if (d != r) sent += (r + d + 1) * 4;
      ck_assert_int_eq(gr.c[r]->stats.bytes_sent[APB_COLL_ALLTOALL], sent);
    }
    group_free(&gr);
  }
}
END_TEST

static void bcast_host(int r, void *arg) {
  ctx *x = arg;
  int H = x->gr->H, root = H - 1;
  int64_t v[3] = {r == root ? 7 : 0, r == root ? -9 : 0, r == root ? 123456789 : 0};
  apb_error err = {0};
  apb_comm *c = x->gr->c[r];
  x->st[r] = c->ops->bcast(c, v, sizeof v, root, &err);
  if (v[0] != 7 || v[1] != -9 || v[2] != 123456789) x->bad[r]++;
  if (!x->st[r]) x->st[r] = c->ops->barrier(c, &err);
}

START_TEST(test_bcast_barrier) {
  for (int serialized = 0; serialized <= 1; serialized++) {
    group gr;
    run_mode(&gr, Hs[_i], serialized, bcast_host);
    ck_assert_int_eq(gr.c[gr.H - 1]->stats.bytes_sent[APB_COLL_BCAST], (int64_t)24 * (gr.H - 1));
    group_free(&gr);
  }
}
END_TEST

/* Host 1 calls a barrier while the others all-gather: everyone must get APB_ECOMM, nobody hangs. */
static void diverge_host(int r, void *arg) {
  ctx *x = arg;
  apb_comm *c = x->gr->c[r];
  apb_error err = {0};
  size_t bytes[4] = {4, 4, 4, 4};
  char buf[16], s4[4] = {0};
  if (r == 1)
    x->st[r] = c->ops->barrier(c, &err);
  else
    x->st[r] = c->ops->allgatherv(c, s4, buf, bytes, &err);
  if (x->st[r] == APB_ECOMM && !strstr(err.msg, "diverged")) x->bad[r]++;
}

START_TEST(test_divergence_detected) {
  group gr;
  group_make(&gr, 4, _i, 30);
  ctx x = {&gr, {0}, {0}};
  apb_error err = {0};
  ck_assert_int_eq(apb_sim_run(4, gr.c, diverge_host, &x, &err), APB_OK);
  for (int r = 0; r < 4; r++) ck_assert_msg(x.st[r] == APB_ECOMM && !x.bad[r], "host %d status %d", r, x.st[r]);
  group_free(&gr);
}
END_TEST

/* Host 2 fails before its first collective and aborts; the others must return APB_ECOMM. */
static void abort_host(int r, void *arg) {
  ctx *x = arg;
  apb_comm *c = x->gr->c[r];
  apb_error err = {0};
  if (r == 2) {
    apb_sim_abort(c, "planted failure");
    x->st[r] = APB_EINVAL;
    return;
  }
  x->st[r] = c->ops->barrier(c, &err);
  if (!strstr(err.msg, "planted failure")) x->bad[r]++;
}

START_TEST(test_abort_releases_peers) {
  group gr;
  group_make(&gr, 4, _i, 0 /* no timeout: only the abort can release them */);
  ctx x = {&gr, {0}, {0}};
  apb_error err = {0};
  ck_assert_int_eq(apb_sim_run(4, gr.c, abort_host, &x, &err), APB_OK);
  for (int r = 0; r < 4; r++)
    if (r != 2) ck_assert_msg(x.st[r] == APB_ECOMM && !x.bad[r], "host %d status %d", r, x.st[r]);
  group_free(&gr);
}
END_TEST

/* Host 0 never calls: with a timeout the others return APB_ETIMEOUT or APB_ECOMM. */
static void missing_host(int r, void *arg) {
  ctx *x = arg;
  apb_error err = {0};
  if (r == 0) return;
  x->st[r] = x->gr->c[r]->ops->barrier(x->gr->c[r], &err);
}

START_TEST(test_timeout) {
  group gr;
  group_make(&gr, 3, 0, 0.5);
  ctx x = {&gr, {0}, {0}};
  apb_error err = {0};
  ck_assert_int_eq(apb_sim_run(3, gr.c, missing_host, &x, &err), APB_OK);
  for (int r = 1; r < 3; r++)
    ck_assert_msg(x.st[r] == APB_ETIMEOUT || x.st[r] == APB_ECOMM, "host %d status %d", r, x.st[r]);
  group_free(&gr);
}
END_TEST

START_TEST(test_bad_args) {
  apb_error err = {0};
  apb_sim_group *g = NULL;
  apb_comm *c[2];
  apb_backend *be[2] = {NULL, NULL};
  ck_assert_int_eq(apb_sim_group_create(0, be, 1, 0, &g, c, &err), APB_EINVAL);
  ck_assert_int_eq(apb_sim_group_create(2, be, 1, 0, &g, c, &err), APB_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "no backend"));
  /* sendrecv's peers: a rank, or -1 for none; -2 is neither (refused before any host waits) */
  group gr;
  group_make(&gr, 1, 1, 0);
  char b[4] = {0};
  ck_assert_int_eq(gr.c[0]->ops->sendrecv(gr.c[0], b, 4, -2, b, 4, -1, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "names peer -2/-1 of 1 hosts") != NULL, "%s", err.msg);
  ck_assert_int_eq(gr.c[0]->ops->sendrecv(gr.c[0], b, 4, -1, b, 4, 1, &err), APB_EINVAL);
  group_free(&gr);
}
END_TEST

int main(void) {
  Suite *s = suite_create("comm");
  TCase *tc = tu_tcase("collectives", 60);
  int nH = (int)(sizeof Hs / sizeof *Hs);
  tcase_add_loop_test(tc, test_allgatherv, 0, nH);
  tcase_add_loop_test(tc, test_sendrecv_ring, 0, nH);
  tcase_add_loop_test(tc, test_alltoallv, 0, nH);
  tcase_add_loop_test(tc, test_bcast_barrier, 0, nH);
  suite_add_tcase(s, tc);
  TCase *tf = tu_tcase("failures", 60);
  tcase_add_loop_test(tf, test_divergence_detected, 0, 2);
  tcase_add_loop_test(tf, test_abort_releases_peers, 0, 2);
  tcase_add_test(tf, test_timeout);
  tcase_add_test(tf, test_bad_args);
  suite_add_tcase(s, tf);
  return tu_run(s, "check_comm");
}
