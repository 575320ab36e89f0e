/* tests/check_backend.c: the CPU compute backends of apb/backend.h ("naive" and "fast").
 *
 * What it checks:
 *   - every op of the fast backend against the naive oracle on seeded random inputs with awkward sizes
 *     (T 1, 97, 113, 1025; E 64, 96, 256; GQA 1, 4, 8; D 64, 80, 128), with bounds only from
 *     apb_tolerance(APB_PREC_F32, k), k the longest reduction feeding one output (E for rmsnorm, K for
 *     linear, C + I for the scorer, keys + D for attention, 2 for a RoPE rotation, 1 for SwiGLU);
 *   - the exact ops (top-k, maxpool, gather, embed, add) bitwise, against direct definitions written
 *     here, with one test per selection rule of APB.md 3.4 (ties toward the lower position, ascending
 *     output, lo excludes a prefix, k = T - lo selects all, k = 0 writes nothing, NaN rejected) and a
 *     brute-force comparison on tie-heavy scores, plus a 128K-token run checked by its defining property;
 *   - closed forms: RoPE at p = 0 is the identity, p = 1 with D = 2 rotates by f_0 = 1 rad, the second
 *     pair of D = 4 rotates by theta^(-1/2); RMSNorm of a constant row; identity linear; SiLU values;
 *   - bf16 emulation: every activation an op writes is exactly bf16-representable, scores and LSE are
 *     not rounded, weights are copied and counted;
 *   - determinism (APB.md 6): fast linear and scorer bitwise equal for OpenMP team sizes 1, 2, 3 and
 *     OpenBLAS thread counts 1, 2, 4; fast attention bitwise equal for team sizes 1, 2, 3 and across runs;
 *     the caller's OpenMP thread count is left as it was;
 *   - memory ops, byte accounting (apb_backend_mem), creation by name, apb_bmodel on a hand-built model;
 *   - validation: bad shapes, out-of-range ids and indices, even pool windows, overlapping copies give
 *     APB_EINVAL with a message naming the op and the value, and write nothing.
 * Every output buffer is poisoned (NaN) and followed by a guard region that is checked after each call.
 * Attention is tested last: it comes from ref/attn_*.c.
 */
#include "testutil.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../ref/backend_cpu.h" /* white-box: the CPU weight descriptor, for apb_bmodel shapes */
#include "apb/attn.h"
#include "apb/backend.h"
#include "apb/cuda.h"
#include "apb/model.h"

/* ---------------------------------------------------------------- helpers */

static const int64_t Ts[] = {1, 97, 113, 1025};
static const int Es[] = {64, 96, 256};
#define NT ((int)(sizeof Ts / sizeof Ts[0]))
#define NE ((int)(sizeof Es / sizeof Es[0]))

static void ok_at(const char *file, int line, apb_status st, const apb_error *e, const char *what) {
  ck_assert_msg(st == APB_OK, "%s:%d seed %llu: %s failed: %s: %s", file, line, (unsigned long long)tu_seed(), what,
                apb_status_str(st), e->msg);
}
#define OK(st, e, what) ok_at(__FILE__, __LINE__, (st), (e), (what))

/* st must be `want`, with a message containing n1 and n2 (either may be NULL). */
static void fails_at(const char *file, int line, apb_status st, apb_status want, const apb_error *e,
                     const char *n1, const char *n2) {
  ck_assert_msg(st == want, "%s:%d: expected %s, got %s (%s)", file, line, apb_status_str(want), apb_status_str(st),
                e->msg);
  ck_assert_msg(e->code == want && e->msg[0], "%s:%d: no error message recorded", file, line);
  ck_assert_msg(!n1 || strstr(e->msg, n1), "%s:%d: message '%s' does not mention '%s'", file, line, e->msg, n1);
  ck_assert_msg(!n2 || strstr(e->msg, n2), "%s:%d: message '%s' does not mention '%s'", file, line, e->msg, n2);
}
#define FAILS(st, want, e, n1, n2) fails_at(__FILE__, __LINE__, (st), (want), (e), (n1), (n2))

#define GUARD(p, n) ck_assert_msg(tu_guard_ok((p), (n)), "%s:%d: guard after %s overwritten", __FILE__, __LINE__, #p)

static apb_backend *mk(const char *name, int emulate, int threads) {
  apb_cpu_opts o = {emulate, threads};
  apb_backend *be = NULL;
  apb_error e = {0};
  OK(apb_backend_create(name, -1, &o, &be, &e), &e, name);
  ck_assert(be != NULL);
  return be;
}

static apb_bweight *mkw(apb_backend *be, const float *w, int64_t N, int64_t K, const float *b) {
  apb_bweight *bw = NULL;
  apb_error e = {0};
  OK(be->ops->weight_create(be, w, N, K, b, &bw, &e), &e, "weight_create");
  return bw;
}

/* Random floats, uniform in [-amp, amp), from stream `s` of the suite's seed. */
static float *rnd(size_t n, uint64_t s, float amp) {
  float *p = tu_alloc(n ? n : 1);
  tu_fill(p, n, tu_seed(), s, amp);
  return p;
}

/* Guarded int32 buffers: n values of a sentinel, then a guard of another. */
#define I_SENT ((int32_t)-0x5a5a5a5b)
#define I_GUARD 16
static int32_t *ialloc(size_t n) {
  int32_t *p = malloc((n + I_GUARD) * sizeof *p);
  ck_assert(p != NULL);
  for (size_t i = 0; i < n + I_GUARD; i++) p[i] = i < n ? I_SENT : (int32_t)0x3c3c3c3c;
  return p;
}
static int iguard_ok(const int32_t *p, size_t n) {
  for (size_t i = n; i < n + I_GUARD; i++)
    if (p[i] != (int32_t)0x3c3c3c3c) return 0;
  return 1;
}

static int is_bf16(float x) {
  float r = apb_bf16_round(x);
  return memcmp(&r, &x, sizeof x) == 0;
}
static void assert_bf16(const char *what, const float *x, size_t n) {
  for (size_t i = 0; i < n; i++)
    ck_assert_msg(is_bf16(x[i]), "seed %llu: %s[%zu] = %.9g is not bf16-representable", (unsigned long long)tu_seed(),
                  what, i, (double)x[i]);
}

static apb_rope rope_default(double theta) {
  apb_rope r;
  memset(&r, 0, sizeof r);
  r.type = APB_ROPE_DEFAULT;
  r.theta = theta;
  r.factor = 1.0;
  return r;
}

/* ---------------------------------------------------------------- creation, memory, accounting */

START_TEST(test_create) {
  apb_error e = {0};
  apb_backend *be = NULL;
  const char *names[] = {"naive", "fast"};
  for (int i = 0; i < 2; i++) {
    OK(apb_backend_create(names[i], 3, NULL, &be, &e), &e, names[i]);
    ck_assert_str_eq(be->name, names[i]);
    ck_assert_int_eq(be->act, APB_DT_F32);
    ck_assert_int_eq(be->device, -1);
    ck_assert_uint_eq(apb_act_size(be), 4);
    apb_backend_destroy(be);
  }
  FAILS(apb_backend_create("turbo", 0, NULL, &be, &e), APB_EINVAL, &e, "turbo", "naive");
  ck_assert(be == NULL);
  apb_error_clear(&e);
  apb_cpu_opts bad = {0, -2};
  FAILS(apb_backend_create("fast", 0, &bad, &be, &e), APB_EINVAL, &e, "threads=-2", NULL);
  apb_error_clear(&e);
  if (!apb_cuda_built()) { /* never touch a GPU from this suite */
    FAILS(apb_backend_create("cuda-f32", 0, NULL, &be, &e), APB_ENODEVICE, &e, "CUDA", NULL);
    ck_assert(be == NULL);
    apb_error_clear(&e);
    FAILS(apb_cuda_set_mem_limit(0, 1 << 20, &e), APB_ENODEVICE, &e, "without CUDA", NULL);
    apb_error_clear(&e);
    size_t held = 1, limit = 1;
    FAILS(apb_cuda_mem_held(0, &held, &limit, &e), APB_ENODEVICE, &e, "without CUDA", NULL);
    ck_assert(held == 0 && limit == 0);
  }
  apb_backend_destroy(NULL);
}
END_TEST

/* timing marks (apb_host_args.profile 2): the CPU backends' are the clock; elapsed between two marks is
 * >= 0 and grows with the work between them; a NULL mark is an error; freeing NULL is allowed */
START_TEST(test_marks) {
  const char *name = _i ? "fast" : "naive";
  apb_backend *be = mk(name, 0, 0);
  const apb_backend_ops *op = be->ops;
  apb_error e = {0};
  ck_assert(op->mark && op->mark_elapsed && op->mark_free);
  void *m0 = NULL, *m1 = NULL, *m2 = NULL;
  OK(op->mark(be, &m0, &e), &e, "mark");
  OK(op->mark(be, &m1, &e), &e, "mark");
  struct timespec ts = {0, 20 * 1000 * 1000}; /* 20 ms of "work" */
  nanosleep(&ts, NULL);
  OK(op->mark(be, &m2, &e), &e, "mark");
  double a = -1, b = -1;
  OK(op->mark_elapsed(be, m0, m1, &a, &e), &e, "mark_elapsed");
  OK(op->mark_elapsed(be, m1, m2, &b, &e), &e, "mark_elapsed");
  ck_assert_msg(a >= 0 && a < 0.01, "%s: back-to-back marks %g s apart", name, a);
  ck_assert_msg(b >= 0.019, "%s: 20 ms sleep measured as %g s", name, b);
  double c = 0;
  FAILS(op->mark_elapsed(be, NULL, m1, &c, &e), APB_EINVAL, &e, "NULL", NULL);
  apb_error_clear(&e);
  FAILS(op->mark_elapsed(be, m0, m1, NULL, &e), APB_EINVAL, &e, "seconds is NULL", NULL);
  apb_error_clear(&e);
  FAILS(op->mark(be, NULL, &e), APB_EINVAL, &e, "mark: m is NULL", NULL);
  op->mark_free(be, m0), op->mark_free(be, m1), op->mark_free(be, m2), op->mark_free(be, NULL);
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_memory) {
  const char *name = _i ? "fast" : "naive";
  apb_backend *be = mk(name, 0, 0);
  const apb_backend_ops *op = be->ops;
  apb_error e = {0};
  size_t cur = 1, peak = 1;
  ck_assert_int_eq(apb_backend_mem(be, &cur, &peak), APB_OK);
  ck_assert_uint_eq(cur, 0);
  ck_assert_uint_eq(peak, 0);

  void *a = NULL, *b = NULL, *z = (void *)1;
  OK(op->alloc(be, 1000, &a, &e), &e, "alloc");
  OK(op->alloc(be, 24, &b, &e), &e, "alloc");
  OK(op->alloc(be, 0, &z, &e), &e, "alloc 0");
  ck_assert(z == NULL);
  ck_assert_uint_eq((uintptr_t)a % 64, 0);
  ck_assert_uint_eq((uintptr_t)b % 64, 0);
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 1024);
  ck_assert_uint_eq(peak, 1024);

  /* memset, upload, copy, download round trip */
  unsigned char host[1000], back[1000];
  for (int i = 0; i < 1000; i++) host[i] = (unsigned char)(i * 7 + 3);
  OK(op->memset(be, a, 0xab, 1000, &e), &e, "memset");
  ck_assert_uint_eq(((unsigned char *)a)[999], 0xab);
  OK(op->upload(be, a, host, 1000, &e), &e, "upload");
  void *c = NULL;
  OK(op->alloc(be, 1000, &c, &e), &e, "alloc");
  OK(op->copy(be, c, a, 1000, &e), &e, "copy");
  OK(op->download(be, back, c, 1000, &e), &e, "download");
  ck_assert_int_eq(memcmp(host, back, 1000), 0);
  OK(op->sync(be, &e), &e, "sync");

  /* copy2d: columns 8..15 of 10 rows of pitch 40 into a packed [10, 8] block, and back into columns
   * 24..31 of the same buffer (interleaved with the source rows but disjoint: allowed) */
  OK(op->copy2d(be, c, 8, (char *)a + 8, 40, 8, 10, &e), &e, "copy2d");
  for (int r = 0; r < 10; r++) ck_assert_int_eq(memcmp((char *)c + r * 8, host + r * 40 + 8, 8), 0);
  OK(op->copy2d(be, (char *)a + 24, 40, (char *)a + 8, 40, 8, 10, &e), &e, "copy2d interleaved");
  for (int r = 0; r < 10; r++) ck_assert_int_eq(memcmp((char *)a + r * 40 + 24, host + r * 40 + 8, 8), 0);
  /* rows that overlap: rejected */
  FAILS(op->copy2d(be, (char *)a + 4, 40, (char *)a + 8, 40, 8, 10, &e), APB_EINVAL, &e, "copy2d", "overlaps");
  apb_error_clear(&e);
  FAILS(op->copy2d(be, (char *)a, 40, (char *)a + 400, 40, 8, 11, &e), APB_EINVAL, &e, "copy2d", "row");
  apb_error_clear(&e);
  FAILS(op->copy2d(be, c, 8, a, 40, 9, 2, &e), APB_EINVAL, &e, "width=9", "dpitch=8");
  apb_error_clear(&e);
  FAILS(op->copy(be, (char *)a + 10, a, 100, &e), APB_EINVAL, &e, "copy", "overlaps");
  apb_error_clear(&e);
  /* a size no buffer can have: refused, not wrapped around into "no overlap" */
  FAILS(op->copy(be, c, a, SIZE_MAX - 8, &e), APB_EINVAL, &e, "copy", "past the end of the address space");
  apb_error_clear(&e);
  FAILS(op->copy(be, NULL, a, 100, &e), APB_EINVAL, &e, "copy: dst is NULL", NULL);
  apb_error_clear(&e);
  OK(op->copy(be, NULL, NULL, 0, &e), &e, "empty copy");

  /* upload_f32 / download_f32 without emulation: exact */
  float f[5] = {1.0f / 3.0f, -2.5f, 1e-30f, 3e30f, 0.1f}, g[5];
  OK(op->upload_f32(be, b, f, 5, &e), &e, "upload_f32");
  OK(op->download_f32(be, g, b, 5, &e), &e, "download_f32");
  ck_assert_int_eq(memcmp(f, g, sizeof f), 0);

  op->free(be, a);
  op->free(be, NULL);
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 1024);
  ck_assert_uint_eq(peak, 2024);
  op->free(be, b);
  op->free(be, c);
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 0);
  ck_assert_uint_eq(peak, 2024);

  /* op scratch is counted while it is held: topk of 8 rows of 4096 keys needs 32 KiB per thread */
  float *s = rnd(8 * 4096, 1, 1.0f);
  int32_t *idx = ialloc(8 * 100);
  OK(op->topk(be, s, 8, 4096, 0, 100, idx, &e), &e, "topk");
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 0);
  ck_assert_uint_ge(peak, 4096 * 8);
  free(idx);
  tu_free(s);
  ck_assert_int_eq(apb_backend_mem(NULL, &cur, &peak), APB_EINVAL);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- fast vs naive, op by op */

/* _i: T = Ts[i % NT], K = Es[(i / NT) % NE], bias when i >= NT * NE; N odd and not a multiple of K */
START_TEST(test_linear) {
  const int64_t T = Ts[_i % NT], K = Es[(_i / NT) % NE], N = K * 3 / 2 + 7;
  const int bias = _i >= NT * NE;
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  float *x = rnd((size_t)(T * K), 10 + _i, 1.0f), *w = rnd((size_t)(N * K), 20 + _i, 1.0f);
  float *b = bias ? rnd((size_t)N, 30 + _i, 0.5f) : NULL;
  apb_bweight *bw = mkw(nv, w, N, K, b);
  float *yn = tu_alloc((size_t)(T * N)), *yf = tu_alloc((size_t)(T * N));
  OK(nv->ops->linear(nv, bw, x, T, yn, &e), &e, "naive linear");
  OK(fs->ops->linear(fs, bw, x, T, yf, &e), &e, "fast linear");
  GUARD(yn, (size_t)(T * N));
  GUARD(yf, (size_t)(T * N));
  tu_assert_close("linear", yf, yn, T * N, apb_tolerance(APB_PREC_F32, K));
  nv->ops->weight_destroy(nv, bw);
  tu_free(x), tu_free(w), tu_free(yn), tu_free(yf);
  if (b) tu_free(b);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

START_TEST(test_rmsnorm) {
  const int64_t T = Ts[_i % NT], E = Es[_i / NT];
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  float *x = rnd((size_t)(T * E), 40 + _i, 3.0f), *w = rnd((size_t)E, 50 + _i, 1.0f);
  apb_bweight *bw = mkw(nv, w, 1, E, NULL);
  float *yn = tu_alloc((size_t)(T * E)), *yf = tu_alloc((size_t)(T * E));
  OK(nv->ops->rmsnorm(nv, bw, 1e-5f, x, T, yn, &e), &e, "naive rmsnorm");
  OK(fs->ops->rmsnorm(fs, bw, 1e-5f, x, T, yf, &e), &e, "fast rmsnorm");
  GUARD(yn, (size_t)(T * E));
  GUARD(yf, (size_t)(T * E));
  tu_assert_close("rmsnorm", yf, yn, T * E, apb_tolerance(APB_PREC_F32, E));
  /* in place gives the same values */
  OK(fs->ops->rmsnorm(fs, bw, 1e-5f, x, T, x, &e), &e, "fast rmsnorm in place");
  tu_assert_bitwise("rmsnorm in place", x, yf, T * E);
  nv->ops->weight_destroy(nv, bw);
  tu_free(x), tu_free(w), tu_free(yn), tu_free(yf);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

/* (Hq, Hkv) for GQA 1, 4, 8, and head dims */
static const int gqa[][2] = {{2, 2}, {8, 2}, {8, 1}};
static const int Ds[] = {64, 128, 80};

START_TEST(test_rope) {
  const int64_t T = Ts[_i % NT];
  const int Hq = gqa[(_i / NT) % 3][0], Hkv = gqa[(_i / NT) % 3][1], D = Ds[(_i / NT / 3) % 3];
  const int64_t QKV = (int64_t)(Hq + 2 * Hkv) * D;
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  apb_rope rope = rope_default(_i % 2 ? 10000.0 : 500000.0);
  float *x = rnd((size_t)(T * QKV), 60 + _i, 2.0f);
  int32_t *pos = malloc((size_t)T * sizeof *pos);
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + 70 + (uint64_t)_i);
  for (int64_t t = 0; t < T; t++) pos[t] = (int32_t)apb_rng_below(&r, 131072);
  pos[0] = 131071;
  const size_t nq = (size_t)(T * Hq * D), nk = (size_t)(T * Hkv * D);
  float *qn = tu_alloc(nq), *kn = tu_alloc(nk), *vn = tu_alloc(nk);
  float *qf = tu_alloc(nq), *kf = tu_alloc(nk), *vf = tu_alloc(nk);
  OK(nv->ops->split_rope(nv, x, T, Hq, Hkv, D, pos, &rope, qn, kn, vn, &e), &e, "naive split_rope");
  OK(fs->ops->split_rope(fs, x, T, Hq, Hkv, D, pos, &rope, qf, kf, vf, &e), &e, "fast split_rope");
  GUARD(qn, nq), GUARD(kn, nk), GUARD(vn, nk), GUARD(qf, nq), GUARD(kf, nk), GUARD(vf, nk);
  tu_assert_close("rope q", qf, qn, (int64_t)nq, apb_tolerance(APB_PREC_F32, 2));
  tu_assert_close("rope k", kf, kn, (int64_t)nk, apb_tolerance(APB_PREC_F32, 2));
  tu_assert_bitwise("rope v", vf, vn, (int64_t)nk);
  /* v is the last Hkv*D columns of qkv, unchanged */
  for (int64_t t = 0; t < T; t++)
    ck_assert_int_eq(memcmp(vn + t * Hkv * D, x + t * QKV + (Hq + Hkv) * D, (size_t)(Hkv * D) * sizeof(float)), 0);
  tu_free(x), tu_free(qn), tu_free(kn), tu_free(vn), tu_free(qf), tu_free(kf), tu_free(vf);
  free(pos);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

START_TEST(test_swiglu_add_embed) {
  const int64_t T = Ts[_i % NT], F = Es[_i / NT];
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  /* swiglu: gates over a wide range, so that exp over- and underflows are exercised */
  float *gu = rnd((size_t)(T * 2 * F), 80 + _i, 30.0f);
  float *on = tu_alloc((size_t)(T * F)), *of = tu_alloc((size_t)(T * F));
  OK(nv->ops->swiglu(nv, gu, T, F, on, &e), &e, "naive swiglu");
  OK(fs->ops->swiglu(fs, gu, T, F, of, &e), &e, "fast swiglu");
  GUARD(on, (size_t)(T * F));
  GUARD(of, (size_t)(T * F));
  tu_assert_close("swiglu", of, on, T * F, apb_tolerance(APB_PREC_F32, 1));
  /* add: one fp32 addition per element in both */
  float *y1 = rnd((size_t)(T * F), 90 + _i, 1.0f), *y2 = rnd((size_t)(T * F), 90 + _i, 1.0f);
  OK(nv->ops->add(nv, y1, on, (size_t)(T * F), &e), &e, "naive add");
  OK(fs->ops->add(fs, y2, on, (size_t)(T * F), &e), &e, "fast add");
  tu_assert_bitwise("add", y2, y1, T * F);
  float *y0 = rnd((size_t)(T * F), 90 + _i, 1.0f);
  for (int64_t i = 0; i < T * F; i++) y0[i] += on[i];
  tu_assert_bitwise("add vs definition", y1, y0, T * F);
  /* embed: rows of the table, bitwise */
  const int64_t V = 1000;
  float *tab = rnd((size_t)(V * F), 100 + _i, 1.0f);
  apb_bweight *bt = mkw(nv, tab, V, F, NULL);
  int32_t *ids = malloc((size_t)T * sizeof *ids);
  for (int64_t t = 0; t < T; t++) ids[t] = (int32_t)((t * 7919 + _i) % V);
  ids[0] = (int32_t)(V - 1);
  float *en = tu_alloc((size_t)(T * F)), *ef = tu_alloc((size_t)(T * F));
  OK(nv->ops->embed(nv, bt, ids, T, en, &e), &e, "naive embed");
  OK(fs->ops->embed(fs, bt, ids, T, ef, &e), &e, "fast embed");
  GUARD(en, (size_t)(T * F));
  GUARD(ef, (size_t)(T * F));
  for (int64_t t = 0; t < T; t++) tu_assert_bitwise("embed row", en + t * F, tab + (int64_t)ids[t] * F, F);
  tu_assert_bitwise("embed", ef, en, T * F);
  nv->ops->weight_destroy(nv, bt);
  free(ids);
  tu_free(gu), tu_free(on), tu_free(of), tu_free(y0), tu_free(y1), tu_free(y2), tu_free(tab), tu_free(en), tu_free(ef);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

/* _i: T = Ts[i % NT], heads/D from gqa[] and Ds[] together; I = 64 or 96 */
START_TEST(test_score) {
  const int64_t T = Ts[_i % NT];
  const int g = (_i / NT) % 3, Hq = gqa[g][0], Hkv = gqa[g][1], D = Ds[g];
  const int64_t C = (int64_t)(Hq + 2 * Hkv) * D, Iw = 64 + 32 * (_i % 2);
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  float *qkv = rnd((size_t)(T * C), 110 + _i, 2.0f);
  float *f1 = rnd((size_t)(Iw * C), 120 + _i, 1.0f / sqrtf((float)C) * 3.0f);
  float *f2 = rnd((size_t)(Hkv * Iw), 130 + _i, 1.0f / sqrtf((float)Iw) * 3.0f);
  apb_bweight *w1 = mkw(nv, f1, Iw, C, NULL), *w2 = mkw(nv, f2, Hkv, Iw, NULL);
  float *sn = tu_alloc((size_t)(Hkv * T)), *sf = tu_alloc((size_t)(Hkv * T));
  OK(nv->ops->score_retaining(nv, w1, w2, qkv, T, sn, &e), &e, "naive score");
  OK(fs->ops->score_retaining(fs, w1, w2, qkv, T, sf, &e), &e, "fast score");
  GUARD(sn, (size_t)(Hkv * T));
  GUARD(sf, (size_t)(Hkv * T));
  tu_assert_close("score_retaining", sf, sn, Hkv * T, apb_tolerance(APB_PREC_F32, C + Iw));
  /* the layout: score [r, t] of the last token, from its qkv row by the definition, read at r * T + t */
  const int64_t t = T - 1;
  float got[8], want[8];
  for (int r = 0; r < Hkv; r++) {
    double s = 0;
    for (int64_t i = 0; i < Iw; i++) {
      double h = 0;
      for (int64_t c = 0; c < C; c++) h += (double)qkv[t * C + c] * f1[i * C + c];
      s += h / (1.0 + exp(-h)) * f2[r * Iw + i];
    }
    want[r] = (float)s, got[r] = sn[r * T + t];
  }
  tu_assert_close("score layout", got, want, Hkv, apb_tolerance(APB_PREC_F32, C + Iw));
  nv->ops->weight_destroy(nv, w1), nv->ops->weight_destroy(nv, w2);
  tu_free(qkv), tu_free(f1), tu_free(f2), tu_free(sn), tu_free(sf);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

/* ---------------------------------------------------------------- closed forms */

START_TEST(test_closed_forms) {
  const char *name = _i ? "fast" : "naive";
  apb_backend *be = mk(name, 0, 0);
  const apb_backend_ops *op = be->ops;
  apb_error e = {0};

  /* RoPE at p = 0: the identity, bitwise, for q and k; v copied */
  {
    const int Hq = 4, Hkv = 2, D = 80, T = 3;
    const int64_t QKV = (Hq + 2 * Hkv) * D;
    apb_rope rope = rope_default(500000.0);
    float *x = rnd((size_t)(T * QKV), 140, 1.0f), *q = tu_alloc(T * Hq * D), *k = tu_alloc(T * Hkv * D),
          *v = tu_alloc(T * Hkv * D);
    int32_t pos[3] = {0, 0, 0};
    OK(op->split_rope(be, x, T, Hq, Hkv, D, pos, &rope, q, k, v, &e), &e, "rope p=0");
    for (int t = 0; t < T; t++) {
      tu_assert_bitwise("rope p=0 q", q + t * Hq * D, x + t * QKV, Hq * D);
      tu_assert_bitwise("rope p=0 k", k + t * Hkv * D, x + t * QKV + Hq * D, Hkv * D);
      tu_assert_bitwise("rope p=0 v", v + t * Hkv * D, x + t * QKV + (Hq + Hkv) * D, Hkv * D);
    }
    tu_free(x), tu_free(q), tu_free(k), tu_free(v);
  }
  /* RoPE at p = 1, D = 2: f_0 = theta^0 = 1, a rotation by 1 radian; p = 1, D = 4: pair 1 rotates by
   * theta^(-2/4) = 0.01 rad for theta = 10^4. One head each of q, k, v. */
  for (int D = 2; D <= 4; D += 2) {
    apb_rope rope = rope_default(10000.0);
    float x[12] = {0.6f, -0.8f, 0.25f, 1.5f, -1.0f, 0.5f, 2.0f, -0.125f, 0.3f, 0.7f, 0.9f, -0.2f};
    float *q = tu_alloc((size_t)D), *k = tu_alloc((size_t)D), *v = tu_alloc((size_t)D);
    int32_t pos = 1;
    OK(op->split_rope(be, x, 1, 1, 1, D, &pos, &rope, q, k, v, &e), &e, "rope p=1");
    GUARD(q, (size_t)D), GUARD(k, (size_t)D), GUARD(v, (size_t)D);
    const int h = D / 2;
    for (int head = 0; head < 2; head++) {
      const float *src = x + head * D, *got = head ? k : q;
      float want[4];
      for (int i = 0; i < h; i++) {
        const double a = i == 0 ? 1.0 : 0.01;
        want[i] = (float)(src[i] * cos(a) - src[i + h] * sin(a));
        want[i + h] = (float)(src[i + h] * cos(a) + src[i] * sin(a));
      }
      tu_assert_close(head ? "rope p=1 k" : "rope p=1 q", got, want, D, apb_tolerance(APB_PREC_F32, 2));
    }
    ck_assert_int_eq(memcmp(v, x + 2 * D, (size_t)D * sizeof(float)), 0);
    tu_free(q), tu_free(k), tu_free(v);
  }
  /* RMSNorm of a constant row c: c / sqrt(c^2 + eps) * w */
  {
    float x[64], w[64], *y = tu_alloc(64), want[64];
    for (int i = 0; i < 64; i++) x[i] = 0.5f, w[i] = (float)(i - 32) / 8.0f;
    apb_bweight *bw = mkw(be, w, 1, 64, NULL);
    OK(op->rmsnorm(be, bw, 1e-6f, x, 1, y, &e), &e, "rmsnorm const");
    GUARD(y, 64);
    for (int i = 0; i < 64; i++) want[i] = (float)(0.5 / sqrt(0.25 + (double)1e-6f) * w[i]);
    tu_assert_close("rmsnorm const", y, want, 64, apb_tolerance(APB_PREC_F32, 64));
    op->weight_destroy(be, bw);
    tu_free(y);
  }
  /* identity linear with bias: y = x + b, exact */
  {
    float w[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1}, b[3] = {0.5f, -1.0f, 2.0f}, x[6] = {1, 2, 3, -4, 5.5f, 6};
    float *y = tu_alloc(6);
    apb_bweight *bw = mkw(be, w, 3, 3, b);
    OK(op->linear(be, bw, x, 2, y, &e), &e, "identity linear");
    GUARD(y, 6);
    for (int i = 0; i < 6; i++) ck_assert_float_eq(y[i], x[i] + b[i % 3]);
    op->weight_destroy(be, bw);
    tu_free(y);
  }
  /* SwiGLU: silu(0) = 0, silu(-inf side) -> -0, silu(g) ~ g for large g; against the closed form in
   * double (one rounding of a product of two terms: the table's k = 1) */
  {
    float gu[8] = {0.0f, -200.0f, 30.0f, 1.0f, 5.0f, 7.0f, 2.0f, 3.0f}, *o = tu_alloc(4), want[4];
    OK(op->swiglu(be, gu, 1, 4, o, &e), &e, "swiglu values");
    GUARD(o, 4);
    ck_assert_msg(o[0] == 0.0f && fabsf(o[1]) == 0.0f, "swiglu: silu(0) * 5 = %g, silu(-200) * 7 = %g", (double)o[0],
                  (double)o[1]);
    for (int i = 0; i < 4; i++) want[i] = (float)((double)gu[i] / (1.0 + exp(-(double)gu[i])) * (double)gu[4 + i]);
    tu_assert_close("swiglu closed form", o, want, 4, apb_tolerance(APB_PREC_F32, 1));
    tu_free(o);
    /* gates in (-103.9, -88.7): exp(-g) overflows fp32 but silu(g) is a subnormal, not -0 */
    float deep[8] = {-89.0f, -95.0f, -100.0f, -103.0f, 1.0f, 1.0f, 1.0f, 1.0f}, *od = tu_alloc(4);
    OK(op->swiglu(be, deep, 1, 4, od, &e), &e, "swiglu subnormal outputs");
    GUARD(od, 4);
    for (int i = 0; i < 4; i++) want[i] = (float)((double)deep[i] / (1.0 + exp(-(double)deep[i])));
    tu_assert_close("swiglu, gates below -88.7", od, want, 4, apb_tolerance(APB_PREC_F32, 1));
    tu_free(od);
  }
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- maxpool and gather, exact */

START_TEST(test_maxpool) {
  const int64_t T = Ts[_i % NT];
  const int ws[] = {1, 3, 5, 7, 2 * (int)T + 1};
  const int w = ws[_i / NT], R = 3;
  apb_backend *be = mk((_i / NT + _i) % 2 ? "fast" : "naive", 0, 2);
  apb_error e = {0};
  float *s = rnd((size_t)(R * T), 150 + _i, 1.0f), *o = tu_alloc((size_t)(R * T));
  if (T > 10) s[7] = -INFINITY, s[8] = INFINITY;
  OK(be->ops->maxpool(be, s, R, T, w, o, &e), &e, "maxpool");
  GUARD(o, (size_t)(R * T));
  for (int r = 0; r < R; r++)
    for (int64_t t = 0; t < T; t++) {
      float m = -INFINITY;
      for (int64_t u = t - w / 2; u <= t + w / 2; u++)
        if (u >= 0 && u < T && s[r * T + u] > m) m = s[r * T + u];
      ck_assert_msg(memcmp(&m, &o[r * T + t], sizeof m) == 0, "seed %llu: maxpool w=%d [%d, %lld]: %g, want %g",
                    (unsigned long long)tu_seed(), w, r, (long long)t, (double)o[r * T + t], (double)m);
    }
  if (w == 1) tu_assert_bitwise("maxpool w=1 copies", o, s, R * T);
  tu_free(s), tu_free(o);
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_maxpool_rules) {
  apb_backend *be = mk("fast", 0, 0);
  apb_error e = {0};
  float s[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, *o = tu_alloc(9);
  for (int w = -1; w <= 4; w += 1) {
    if (w == 1 || w == 3) continue;
    apb_error_clear(&e);
    char want[16];
    snprintf(want, sizeof want, "w=%d", w);
    FAILS(be->ops->maxpool(be, s, 1, 9, w, o, &e), APB_EINVAL, &e, "maxpool", want);
  }
  /* positions outside the block count as -inf: the window does not reach across rows */
  float two[6] = {9, 1, 1, 1, 1, 9}, *p2 = tu_alloc(6);
  OK(be->ops->maxpool(be, two, 2, 3, 3, p2, &e), &e, "maxpool rows");
  GUARD(p2, 6);
  const float want2[6] = {9, 9, 1, 1, 9, 9};
  tu_assert_bitwise("maxpool rows", p2, want2, 6);
  /* a NaN poisons exactly its window, so that topk reports it (o is NaN-poisoned first: every other
   * output must have been written with a number) */
  s[4] = NAN;
  tu_poison(o, 9);
  OK(be->ops->maxpool(be, s, 1, 9, 3, o, &e), &e, "maxpool NaN");
  GUARD(o, 9);
  for (int t = 0; t < 9; t++) ck_assert_msg((t >= 3 && t <= 5) == (isnan(o[t]) != 0), "t=%d: %g", t, (double)o[t]);
  FAILS(be->ops->maxpool(be, s, 1, 9, 3, s + 2, &e), APB_EINVAL, &e, "maxpool", "overlaps");
  tu_free(o), tu_free(p2);
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_gather) {
  const int64_t T = Ts[_i % NT];
  const int Hs[] = {1, 2, 8}, H = Hs[(_i / NT) % 3], D = (_i / NT / 3) ? 80 : 64;
  apb_backend *be = mk(_i % 2 ? "fast" : "naive", 0, 0);
  apb_error e = {0};
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + 160 + (uint64_t)_i);
  const int64_t k = 1 + (int64_t)apb_rng_below(&r, (uint64_t)T);
  float *x = rnd((size_t)(T * H * D), 170 + _i, 1.0f), *o = tu_alloc((size_t)(k * H * D));
  int32_t *idx = malloc((size_t)(H * k) * sizeof *idx);
  for (int64_t i = 0; i < H * k; i++) idx[i] = (int32_t)apb_rng_below(&r, (uint64_t)T);
  OK(be->ops->gather(be, x, T, H, D, idx, k, o, &e), &e, "gather");
  GUARD(o, (size_t)(k * H * D));
  for (int64_t i = 0; i < k; i++)
    for (int h = 0; h < H; h++)
      tu_assert_bitwise("gather row", o + (i * H + h) * D, x + ((int64_t)idx[h * k + i] * H + h) * D, D);
  /* k = 0 writes nothing */
  tu_poison(o, (size_t)(k * H * D));
  OK(be->ops->gather(be, x, T, H, D, idx, 0, o, &e), &e, "gather k=0");
  ck_assert(isnan(o[0]));
  /* out of range: named, nothing written */
  idx[H * k - 1] = (int32_t)T;
  char want[64];
  snprintf(want, sizeof want, "idx[%d, %lld]=%lld", H - 1, (long long)(k - 1), (long long)T);
  FAILS(be->ops->gather(be, x, T, H, D, idx, k, o, &e), APB_EINVAL, &e, "gather", want);
  ck_assert(isnan(o[0]));
  apb_error_clear(&e);
  idx[0] = -1;
  FAILS(be->ops->gather(be, x, T, H, D, idx, k, o, &e), APB_EINVAL, &e, "idx[0, 0]=-1", NULL);
  free(idx);
  tu_free(x), tu_free(o);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- top-k (APB.md 3.4) */

/* Run topk on one row and compare to `want` [k]. */
static void topk1(apb_backend *be, const float *s, int64_t T, int64_t lo, int64_t k, const int32_t *want) {
  apb_error e = {0};
  int32_t *idx = ialloc((size_t)k);
  OK(be->ops->topk(be, s, 1, T, lo, k, idx, &e), &e, "topk");
  ck_assert(iguard_ok(idx, (size_t)k));
  for (int64_t i = 0; i < k; i++)
    ck_assert_msg(idx[i] == want[i], "topk T=%lld lo=%lld k=%lld: idx[%lld]=%d, want %d", (long long)T, (long long)lo,
                  (long long)k, (long long)i, idx[i], want[i]);
  free(idx);
}

START_TEST(test_topk_ties) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  const float s[6] = {1, 3, 3, 2, 3, 3};
  topk1(be, s, 6, 0, 1, (int32_t[]){1});
  topk1(be, s, 6, 0, 2, (int32_t[]){1, 2});
  topk1(be, s, 6, 0, 3, (int32_t[]){1, 2, 4});
  topk1(be, s, 6, 0, 5, (int32_t[]){1, 2, 3, 4, 5});
  const float z[4] = {-0.0f, 0.0f, -0.0f, -1.0f}; /* -0 and +0 tie */
  topk1(be, z, 4, 0, 1, (int32_t[]){0});
  topk1(be, z, 4, 1, 1, (int32_t[]){1});
  topk1(be, z, 4, 0, 2, (int32_t[]){0, 1});
  const float eq[5] = {7, 7, 7, 7, 7};
  topk1(be, eq, 5, 1, 2, (int32_t[]){1, 2});
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_topk_order) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  float up[10], down[10];
  for (int t = 0; t < 10; t++) up[t] = (float)t, down[t] = (float)-t;
  topk1(be, up, 10, 0, 3, (int32_t[]){7, 8, 9}); /* best is 9, written last: ascending position */
  topk1(be, down, 10, 0, 3, (int32_t[]){0, 1, 2});
  const float mixed[6] = {0.5f, 9, -INFINITY, 4, INFINITY, 8};
  topk1(be, mixed, 6, 0, 3, (int32_t[]){1, 4, 5});
  topk1(be, mixed, 6, 0, 6, (int32_t[]){0, 1, 2, 3, 4, 5});
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_topk_lo) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  const float s[7] = {9, 9, 9, 1, 2, 3, 0};
  topk1(be, s, 7, 3, 2, (int32_t[]){4, 5});
  topk1(be, s, 7, 0, 2, (int32_t[]){0, 1});
  /* k = T - lo selects all eligible, in order */
  topk1(be, s, 7, 3, 4, (int32_t[]){3, 4, 5, 6});
  topk1(be, s, 7, 6, 1, (int32_t[]){6});
  /* k = 0: nothing written, also with lo = T */
  apb_error e = {0};
  int32_t *idx = ialloc(4);
  OK(be->ops->topk(be, s, 1, 7, 2, 0, idx, &e), &e, "topk k=0");
  OK(be->ops->topk(be, s, 1, 7, 7, 0, idx, &e), &e, "topk lo=T");
  OK(be->ops->topk(be, s, 1, 7, 0, 0, NULL, &e), &e, "topk k=0 idx NULL");
  for (int i = 0; i < 4; i++) ck_assert_int_eq(idx[i], I_SENT);
  ck_assert(iguard_ok(idx, 4));
  /* out of domain */
  FAILS(be->ops->topk(be, s, 1, 7, 3, 5, idx, &e), APB_EINVAL, &e, "k=5", "[0, 4]");
  apb_error_clear(&e);
  FAILS(be->ops->topk(be, s, 1, 7, 8, 0, idx, &e), APB_EINVAL, &e, "lo=8", NULL);
  apb_error_clear(&e);
  FAILS(be->ops->topk(be, s, 1, 7, -1, 1, idx, &e), APB_EINVAL, &e, "lo=-1", NULL);
  apb_error_clear(&e);
  FAILS(be->ops->topk(be, s, 1, 7, 0, -1, idx, &e), APB_EINVAL, &e, "k=-1", NULL);
  for (int i = 0; i < 4; i++) ck_assert_int_eq(idx[i], I_SENT);
  free(idx);
  apb_backend_destroy(be);
}
END_TEST

START_TEST(test_topk_nan) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  apb_error e = {0};
  float s[2 * 6] = {5, 4, 3, 2, 1, 0, 5, 4, 3, 2, 1, 0};
  int32_t *idx = ialloc(2 * 2);
  s[6 + 4] = NAN; /* row 1, t = 4: not the best, must still be refused */
  FAILS(be->ops->topk(be, s, 2, 6, 0, 2, idx, &e), APB_ENONFINITE, &e, "score[1, 4]", "NaN");
  apb_error_clear(&e);
  FAILS(be->ops->topk(be, s, 2, 6, 0, 0, idx, &e), APB_ENONFINITE, &e, "score[1, 4]", NULL);
  for (int i = 0; i < 4; i++) ck_assert_int_eq(idx[i], I_SENT);
  /* a NaN in the excluded prefix is not a candidate */
  apb_error_clear(&e);
  OK(be->ops->topk(be, s, 2, 6, 5, 1, idx, &e), &e, "NaN before lo");
  ck_assert_int_eq(idx[0], 5);
  ck_assert_int_eq(idx[1], 5);
  free(idx);
  apb_backend_destroy(be);
}
END_TEST

/* Brute force: t is selected iff fewer than k candidates beat it (higher score, or equal and lower t). */
START_TEST(test_topk_brute) {
  const int64_t T = Ts[_i % NT];
  const int R = 4;
  apb_backend *be = mk(_i % 2 ? "fast" : "naive", 0, 3);
  apb_error e = {0};
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + 180 + (uint64_t)_i);
  float *s = tu_alloc((size_t)(R * T));
  for (int64_t i = 0; i < R * T; i++) s[i] = (float)apb_rng_below(&r, 8) - 3.0f; /* many ties */
  const int64_t los[] = {0, T / 3}, lo = los[(_i / NT) % 2];
  const int64_t n = T - lo, ks[] = {1, n / 2, n - 1 > 0 ? n - 1 : 1, n}, k = ks[(_i / NT / 2) % 4];
  int32_t *idx = ialloc((size_t)(R * k));
  OK(be->ops->topk(be, s, R, T, lo, k, idx, &e), &e, "topk");
  ck_assert(iguard_ok(idx, (size_t)(R * k)));
  for (int row = 0; row < R; row++) {
    const float *sr = s + row * T;
    int64_t m = 0;
    for (int64_t t = lo; t < T; t++) {
      int64_t beat = 0;
      for (int64_t u = lo; u < T; u++) beat += sr[u] > sr[t] || (sr[u] == sr[t] && u < t);
      if (beat < k) {
        ck_assert_msg(m < k && idx[row * k + m] == t,
                      "seed %llu: row %d T=%lld lo=%lld k=%lld: selection %lld is %d, want %lld",
                      (unsigned long long)tu_seed(), row, (long long)T, (long long)lo, (long long)k, (long long)m,
                      m < k ? idx[row * k + m] : -1, (long long)t);
        m++;
      }
    }
    ck_assert_int_eq(m, k);
  }
  free(idx);
  tu_free(s);
  apb_backend_destroy(be);
}
END_TEST

/* 128K tokens, 8 KV heads, l_p = 2048: checked by the defining property in O(T). */
START_TEST(test_topk_large) {
  const int64_t T = 131072, lo = 4096, k = 2048;
  const int R = 8;
  apb_backend *be = mk("fast", 0, 0);
  apb_error e = {0};
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + 190);
  float *s = tu_alloc((size_t)(R * T));
  for (int64_t i = 0; i < R * T; i++) s[i] = (float)(apb_rng_below(&r, 1u << 16)) / 4096.0f; /* ties too */
  int32_t *idx = ialloc((size_t)(R * k));
  unsigned char *sel = calloc((size_t)T, 1);
  double t0 = omp_get_wtime();
  OK(be->ops->topk(be, s, R, T, lo, k, idx, &e), &e, "topk 128K");
  double dt = omp_get_wtime() - t0;
  ck_assert_msg(dt < 5.0, "topk of [%d, %lld] took %.2f s", R, (long long)T, dt);
  for (int row = 0; row < R; row++) {
    const float *sr = s + row * T;
    const int32_t *ir = idx + row * k;
    memset(sel, 0, (size_t)T);
    for (int64_t i = 0; i < k; i++) {
      ck_assert(ir[i] >= lo && ir[i] < T);
      ck_assert(i == 0 || ir[i] > ir[i - 1]);
      sel[ir[i]] = 1;
    }
    /* the worst selected (lowest score, then highest t) beats the best unselected */
    int64_t ws = -1, bu = -1;
    for (int64_t t = lo; t < T; t++) {
      if (sel[t] && (ws < 0 || sr[t] <= sr[ws])) ws = t;
      if (!sel[t] && (bu < 0 || sr[t] > sr[bu])) bu = t;
    }
    ck_assert_msg(sr[ws] > sr[bu] || (sr[ws] == sr[bu] && ws < bu),
                  "seed %llu: row %d: selected %lld (%g) vs unselected %lld (%g)", (unsigned long long)tu_seed(),
                  row, (long long)ws, (double)sr[ws], (long long)bu, (double)sr[bu]);
  }
  free(sel), free(idx);
  tu_free(s);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- bf16 emulation */

START_TEST(test_bf16) {
  apb_backend *nv = mk("naive", 1, 0), *fs = mk("fast", 1, 0);
  apb_backend *bes[2] = {nv, fs};
  apb_error e = {0};
  const int64_t T = 113, E = 96, F = 64, V = 50, Iw = 32;
  const int Hq = 4, Hkv = 2, D = 16;
  const int64_t QKV = (int64_t)(Hq + 2 * Hkv) * D, GD = 2 * F / Hkv; /* gu seen as [T, Hkv, GD] */
  float *tab = rnd((size_t)(V * E), 200, 1.0f), *wl = rnd((size_t)(QKV * E), 201, 0.2f);
  float *bl = rnd((size_t)QKV, 202, 1.0f), *wn = rnd((size_t)E, 203, 1.0f);
  float *f1 = rnd((size_t)(Iw * QKV), 204, 0.2f), *f2 = rnd((size_t)(Hkv * Iw), 205, 0.3f);
  float *gu = rnd((size_t)(T * 2 * F), 206, 3.0f);
  int32_t ids[113], pos[113];
  for (int t = 0; t < T; t++) ids[t] = (int32_t)((t * 31) % V), pos[t] = t + 1000;
  apb_rope rope = rope_default(10000.0);
  float *out[2][10];
  size_t cur, peak;
  for (int b = 0; b < 2; b++) {
    apb_backend *be = bes[b];
    const apb_backend_ops *op = be->ops;
    apb_bweight *wt = mkw(be, tab, V, E, NULL), *wlin = mkw(be, wl, QKV, E, bl), *wnorm = mkw(be, wn, 1, E, NULL);
    apb_bweight *w1 = mkw(be, f1, Iw, QKV, NULL), *w2 = mkw(be, f2, Hkv, Iw, NULL);
    /* weights are copied and rounded, and the copies are counted */
    apb_backend_mem(be, &cur, &peak);
    ck_assert_uint_eq(cur, (size_t)(V * E + QKV * E + QKV + E + Iw * QKV + Hkv * Iw) * sizeof(float));
    assert_bf16("weight copy", wlin->w, (size_t)(QKV * E));
    assert_bf16("bias copy", wlin->b, (size_t)QKV);
    float *x = tu_alloc((size_t)(T * E)), *hn = tu_alloc((size_t)(T * E)), *qkv = tu_alloc((size_t)(T * QKV));
    float *q = tu_alloc((size_t)(T * Hq * D)), *k = tu_alloc((size_t)(T * Hkv * D));
    float *v = tu_alloc((size_t)(T * Hkv * D));
    float *sw = tu_alloc((size_t)(T * F)), *sc = tu_alloc((size_t)(Hkv * T)), *o = tu_alloc((size_t)(T * Hq * D));
    float *lse = tu_alloc((size_t)(Hq * T)), *up = tu_alloc(5), *g = tu_alloc((size_t)(7 * Hkv * GD));
    OK(op->embed(be, wt, ids, T, x, &e), &e, "embed");
    OK(op->rmsnorm(be, wnorm, 1e-5f, x, T, hn, &e), &e, "rmsnorm");
    OK(op->linear(be, wlin, hn, T, qkv, &e), &e, "linear");
    OK(op->split_rope(be, qkv, T, Hq, Hkv, D, pos, &rope, q, k, v, &e), &e, "split_rope");
    OK(op->swiglu(be, gu, T, F, sw, &e), &e, "swiglu");
    OK(op->add(be, x, hn, (size_t)(T * E), &e), &e, "add");
    OK(op->score_retaining(be, w1, w2, qkv, T, sc, &e), &e, "score");
    apb_battn_args a = {.P = 0, .A = 0, .B = T, .Hq = Hq, .Hkv = Hkv, .D = D, .local_keys = 1, .q = q, .kb = k,
                        .vb = v, .o = o, .lse = lse};
    OK(op->attn(be, &a, &e), &e, "attn");
    const float uf[5] = {0.1f, 1.0f / 3.0f, -7.3f, 1e-3f, 12345.678f};
    OK(op->upload_f32(be, up, uf, 5, &e), &e, "upload_f32");
    const int32_t gi[2 * 7] = {0, 5, 9, 17, 50, 100, 112, 1, 2, 3, 4, 5, 6, 7};
    OK(op->gather(be, gu, T, Hkv, (int)GD, gi, 7, g, &e), &e, "gather"); /* from raw fp32 input */
    assert_bf16("embed", x, (size_t)(T * E)); /* after add */
    assert_bf16("rmsnorm", hn, (size_t)(T * E));
    assert_bf16("linear", qkv, (size_t)(T * QKV));
    assert_bf16("rope q", q, (size_t)(T * Hq * D));
    assert_bf16("rope k", k, (size_t)(T * Hkv * D));
    assert_bf16("rope v", v, (size_t)(T * Hkv * D));
    assert_bf16("swiglu", sw, (size_t)(T * F));
    assert_bf16("attn o", o, (size_t)(T * Hq * D));
    assert_bf16("upload_f32", up, 5);
    assert_bf16("gather", g, (size_t)(7 * Hkv * GD));
    /* merge of the attention output with q under shifted LSEs: a mix that bf16 cannot hold unrounded */
    float *mo = tu_alloc((size_t)(T * Hq * D)), *ml = tu_alloc((size_t)(Hq * T)), *l2 = tu_alloc((size_t)(Hq * T));
    for (int64_t i = 0; i < Hq * T; i++) l2[i] = lse[i] - 0.7f;
    const void *parts[2] = {o, q};
    const float *lparts[2] = {lse, l2};
    OK(op->merge(be, 2, parts, lparts, T, Hq, D, mo, ml, &e), &e, "merge");
    assert_bf16("merge o", mo, (size_t)(T * Hq * D));
    /* scores and LSE stay fp32: some value is not bf16 */
    int sc_fp32 = 0, lse_fp32 = 0;
    for (int64_t i = 0; i < Hkv * T; i++) sc_fp32 += !is_bf16(sc[i]);
    for (int64_t i = 0; i < Hq * T; i++) lse_fp32 += !is_bf16(lse[i]) || !is_bf16(ml[i]);
    ck_assert_msg(sc_fp32 > 0 && lse_fp32 > 0, "scores/lse were rounded to bf16");
    out[b][0] = x, out[b][1] = hn, out[b][2] = qkv, out[b][3] = q, out[b][4] = sw, out[b][5] = sc, out[b][6] = o;
    out[b][7] = lse, out[b][8] = up, out[b][9] = g;
    tu_free(k), tu_free(v), tu_free(mo), tu_free(ml), tu_free(l2);
    op->weight_destroy(be, wt), op->weight_destroy(be, wlin), op->weight_destroy(be, wnorm);
    op->weight_destroy(be, w1), op->weight_destroy(be, w2);
    apb_backend_mem(be, &cur, &peak);
    ck_assert_uint_eq(cur, 0);
  }
  /* fast against naive, both emulating: bf16 bounds (stored values may round to neighbouring bf16s) */
  const int64_t ns[10] = {T * E, T * E, T * QKV, T * Hq * D, T * F, Hkv * T, T * Hq * D, Hq * T, 5, 7 * Hkv * GD};
  const int64_t ks[10] = {E, E, E, E, 1, QKV + Iw, T + D, T + D, 1, 1};
  const char *what[10] = {"embed+add", "rmsnorm", "linear", "rope", "swiglu", "scores", "attn", "lse", "upload",
                          "gather"};
  for (int j = 0; j < 10; j++) {
    tu_assert_close(what[j], out[1][j], out[0][j], ns[j], apb_tolerance(APB_PREC_BF16, ks[j]));
    tu_free(out[0][j]), tu_free(out[1][j]);
  }
  tu_free(tab), tu_free(wl), tu_free(bl), tu_free(wn), tu_free(f1), tu_free(f2), tu_free(gu);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

/* ---------------------------------------------------------------- determinism (APB.md 6) */

START_TEST(test_det_blas) {
  /* T, K, N; K = 1000 is a K where a plain OpenBLAS 0.3.21 sgemm differs between 1 and 2 threads */
  const int64_t shapes[2][3] = {{1025, 256, 768}, {2048, 1000, 1000}};
  const int64_t T = shapes[_i][0], K = shapes[_i][1], N = shapes[_i][2];
  apb_error e = {0};
  float *x = rnd((size_t)(T * K), 210, 1.0f), *w = rnd((size_t)(N * K), 211, 1.0f), *b = rnd((size_t)N, 212, 1.0f);
  float *f2 = rnd((size_t)(8 * N), 213, 1.0f);
  float *ref = tu_alloc((size_t)(T * N)), *y = tu_alloc((size_t)(T * N));
  float *sref = tu_alloc((size_t)(8 * T)), *s = tu_alloc((size_t)(8 * T));
  const int blas_saved = openblas_get_num_threads();
  const int team[3] = {1, 2, 3}, blas[3] = {1, 2, 4};
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++) {
      openblas_set_num_threads(blas[j]);
      apb_backend *fs = mk("fast", 0, team[i]);
      apb_bweight *bw = mkw(fs, w, N, K, b), *w1 = mkw(fs, w, N, K, NULL), *w2 = mkw(fs, f2, 8, N, NULL);
      float *yy = i + j ? y : ref, *ss = i + j ? s : sref;
      tu_poison(yy, (size_t)(T * N));
      tu_poison(ss, (size_t)(8 * T));
      OK(fs->ops->linear(fs, bw, x, T, yy, &e), &e, "linear");
      OK(fs->ops->score_retaining(fs, w1, w2, x, T, ss, &e), &e, "score");
      ck_assert_int_eq(openblas_get_num_threads(), blas[j]); /* OpenBLAS's count is restored */
      if (i + j) {
        char what[64];
        snprintf(what, sizeof what, "linear, team %d, openblas %d", team[i], blas[j]);
        tu_assert_bitwise(what, y, ref, T * N);
        snprintf(what, sizeof what, "scores, team %d, openblas %d", team[i], blas[j]);
        tu_assert_bitwise(what, s, sref, 8 * T);
      }
      fs->ops->weight_destroy(fs, bw), fs->ops->weight_destroy(fs, w1), fs->ops->weight_destroy(fs, w2);
      apb_backend_destroy(fs);
    }
  openblas_set_num_threads(blas_saved);
  tu_free(x), tu_free(w), tu_free(b), tu_free(f2), tu_free(ref), tu_free(y), tu_free(sref), tu_free(s);
}
END_TEST

/* naive and the fast elementwise ops: any team size, bitwise */
START_TEST(test_det_team) {
  const int64_t T = 1025, E = 256, N = 300;
  apb_error e = {0};
  float *x = rnd((size_t)(T * E), 220, 1.0f), *w = rnd((size_t)(N * E), 221, 1.0f), *wn = rnd((size_t)E, 222, 1.0f);
  float *r1 = NULL, *r2 = NULL, *r3 = NULL;
  for (int nth = 1; nth <= 3; nth += 2) {
    apb_backend *nv = mk("naive", 0, nth), *fs = mk("fast", 0, nth);
    apb_bweight *bw = mkw(nv, w, N, E, NULL), *bn = mkw(nv, wn, 1, E, NULL);
    float *a = tu_alloc((size_t)(T * N)), *b = tu_alloc((size_t)(T * E)), *c = tu_alloc((size_t)(T * E));
    OK(nv->ops->linear(nv, bw, x, T, a, &e), &e, "naive linear");
    OK(nv->ops->rmsnorm(nv, bn, 1e-5f, x, T, b, &e), &e, "naive rmsnorm");
    OK(fs->ops->rmsnorm(fs, bn, 1e-5f, x, T, c, &e), &e, "fast rmsnorm");
    if (!r1) {
      r1 = a, r2 = b, r3 = c;
    } else {
      tu_assert_bitwise("naive linear, team 1 vs 3", a, r1, T * N);
      tu_assert_bitwise("naive rmsnorm, team 1 vs 3", b, r2, T * E);
      tu_assert_bitwise("fast rmsnorm, team 1 vs 3", c, r3, T * E);
      tu_free(a), tu_free(b), tu_free(c);
    }
    nv->ops->weight_destroy(nv, bw), nv->ops->weight_destroy(nv, bn);
    apb_backend_destroy(nv), apb_backend_destroy(fs);
  }
  tu_free(r1), tu_free(r2), tu_free(r3), tu_free(x), tu_free(w), tu_free(wn);
}
END_TEST

/* ---------------------------------------------------------------- validation */

START_TEST(test_validation) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  const apb_backend_ops *op = be->ops;
  apb_error e = {0};
  float *w = rnd(2 * 64, 230, 1.0f), *x = rnd(4 * 64, 231, 1.0f), *y = tu_alloc(4 * 64);
  apb_bweight *w2 = mkw(be, w, 2, 64, NULL), *w1 = mkw(be, w, 1, 64, NULL);
  FAILS(op->rmsnorm(be, w2, 1e-5f, x, 4, y, &e), APB_EINVAL, &e, "rmsnorm", "[2, 64], expected [1, K]");
  apb_error_clear(&e);
  FAILS(op->rmsnorm(be, w1, -1.0f, x, 4, y, &e), APB_EINVAL, &e, "rmsnorm", "eps=-1");
  apb_error_clear(&e);
  FAILS(op->rmsnorm(be, NULL, 1e-5f, x, 4, y, &e), APB_EINVAL, &e, "rmsnorm", "w is NULL");
  apb_error_clear(&e);
  FAILS(op->linear(be, w2, NULL, 4, y, &e), APB_EINVAL, &e, "linear: x is NULL", NULL);
  apb_error_clear(&e);
  FAILS(op->linear(be, w2, x, -1, y, &e), APB_EINVAL, &e, "linear", "T=-1");
  apb_error_clear(&e);
  FAILS(op->linear(be, w2, x, 4, x + 8, &e), APB_EINVAL, &e, "linear", "overlaps");
  apb_error_clear(&e);
  FAILS(op->swiglu(be, x, 2, 0, y, &e), APB_EINVAL, &e, "swiglu", "F=0");
  apb_error_clear(&e);
  /* shapes whose element counts overflow int64: refused before any product is formed */
  FAILS(op->linear(be, w2, x, INT64_MAX / 4, y, &e), APB_EINVAL, &e, "linear", "too large");
  apb_error_clear(&e);
  FAILS(op->swiglu(be, x, INT64_MAX / 2, 4, y, &e), APB_EINVAL, &e, "swiglu", "too large");
  apb_error_clear(&e);
  /* rmsnorm: eps must be > 0 (with 0 an all-zero row is 0 * inf = NaN) */
  FAILS(op->rmsnorm(be, w1, 0.0f, x, 4, y, &e), APB_EINVAL, &e, "rmsnorm", "eps=0");
  apb_error_clear(&e);
  /* rmsnorm in place is allowed, a y that overlaps x without being x is not (later rows would read
   * normalised values) */
  FAILS(op->rmsnorm(be, w1, 1e-5f, x, 2, x + 64, &e), APB_EINVAL, &e, "rmsnorm", "overlaps");
  apb_error_clear(&e);
  OK(op->rmsnorm(be, w1, 1e-5f, y, 4, y, &e), &e, "rmsnorm in place");
  /* rmsnorm of huge rows: the sum of squares (1e60) must not overflow (fp32 gave y = 0) */
  {
    const float one = 1.0f;
    apb_bweight *w1s = mkw(be, &one, 1, 1, NULL);
    /* two rows of E = 1: each is x / sqrt(x^2 + eps) = +-1 (eps is below the ulp of 1e60) */
    const float xb[2] = {1e30f, -1e30f}, want[2] = {1.0f, -1.0f};
    float *yb = tu_alloc(2);
    OK(op->rmsnorm(be, w1s, 1e-5f, xb, 2, yb, &e), &e, "rmsnorm of 1e30");
    GUARD(yb, 2);
    tu_assert_close(_i ? "fast rmsnorm of +-1e30" : "naive rmsnorm of +-1e30", yb, want, 2,
                    apb_tolerance(APB_PREC_F32, 1));
    tu_free(yb);
    op->weight_destroy(be, w1s);
  }
  /* embed: out-of-vocabulary ids, named; nothing written */
  int32_t ids[4] = {0, 1, 2, 2};
  OK(op->embed(be, w2, ids, 2, y, &e), &e, "embed");
  tu_poison(y, 4 * 64);
  FAILS(op->embed(be, w2, ids, 4, y, &e), APB_EINVAL, &e, "embed", "ids[2]=2");
  ck_assert(isnan(y[0]));
  apb_error_clear(&e);
  ids[1] = -7;
  FAILS(op->embed(be, w2, ids, 2, y, &e), APB_EINVAL, &e, "ids[1]=-7", "[0, 2)");
  apb_error_clear(&e);
  /* split_rope */
  apb_rope rope = rope_default(10000.0);
  int32_t pos[4] = {0, 1, 2, 3};
  FAILS(op->split_rope(be, x, 1, 1, 1, 7, pos, &rope, y, y + 16, y + 32, &e), APB_EINVAL, &e, "split_rope", "D=7");
  apb_error_clear(&e);
  FAILS(op->split_rope(be, x, 1, 1, 1, 8, pos, NULL, y, y + 16, y + 32, &e), APB_EINVAL, &e, "rope is NULL", NULL);
  apb_error_clear(&e);
  FAILS(op->split_rope(be, x, 1, 1, 1, 8, pos, &rope, y, y + 4, y + 32, &e), APB_EINVAL, &e, "q", "overlaps");
  apb_error_clear(&e);
  FAILS(op->split_rope(be, x, 1, INT_MAX, INT_MAX, INT_MAX - 1, pos, &rope, y, y + 16, y + 32, &e), APB_EINVAL, &e,
        "split_rope", "too large");
  apb_error_clear(&e);
  apb_rope rope_bad = rope;
  rope_bad.type = (apb_rope_type)77;
  FAILS(op->split_rope(be, x, 1, 1, 1, 8, pos, &rope_bad, y, y + 16, y + 32, &e), APB_EINVAL, &e, "split_rope",
        "rope type 77");
  apb_error_clear(&e);
  /* scorer: fc2's K must be fc1's N; no biases */
  apb_bweight *wb = mkw(be, w, 2, 64, w), *w12 = mkw(be, w, 1, 2, NULL);
  FAILS(op->score_retaining(be, w2, w2, x, 1, y, &e), APB_EINVAL, &e, "fc2", "expected [N, 2]");
  apb_error_clear(&e);
  FAILS(op->score_retaining(be, wb, w12, x, 1, y, &e), APB_EINVAL, &e, "fc1 has a bias", NULL);
  apb_error_clear(&e);
  /* attention: lse is required */
  apb_battn_args a = {.B = 2, .Hq = 1, .Hkv = 1, .D = 8, .local_keys = 1, .q = x, .kb = x, .vb = x, .o = y};
  FAILS(op->attn(be, &a, &e), APB_EINVAL, &e, "attn", "lse is NULL");
  apb_error_clear(&e);
  a.lse = y + 100, a.Hq = 3, a.Hkv = 2;
  FAILS(op->attn(be, &a, &e), APB_EINVAL, &e, "Hq=3", NULL);
  apb_error_clear(&e);
  FAILS(op->merge(be, 0, NULL, NULL, 1, 1, 1, y, y, &e), APB_EINVAL, &e, "n=0", NULL);
  apb_error_clear(&e);
  /* weights */
  apb_bweight *bad = (apb_bweight *)1;
  FAILS(op->weight_create(be, w, 0, 64, NULL, &bad, &e), APB_EINVAL, &e, "weight_create", "N=0");
  ck_assert(bad == NULL);
  apb_error_clear(&e);
  FAILS(op->weight_create(be, NULL, 2, 64, NULL, &bad, &e), APB_EINVAL, &e, "weight_create", "w is NULL");
  op->weight_destroy(be, w1), op->weight_destroy(be, w2), op->weight_destroy(be, wb), op->weight_destroy(be, w12);
  op->weight_destroy(be, NULL);
  tu_free(w), tu_free(x), tu_free(y);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- apb_bmodel */

typedef struct toy {
  apb_model m;
  apb_layer L[2];
  float *buf;
} toy;

/* A hand-built 2-layer model (E 32, F 48, Hq 4, Hkv 2, D 8, V 40, I 16): every tensor from one buffer. */
static void toy_make(toy *t, int tied, int biases, int heads) {
  memset(t, 0, sizeof *t);
  apb_model_config *c = &t->m.cfg;
  snprintf(c->arch, sizeof c->arch, "LlamaForCausalLM");
  c->n_layers = 2, c->hidden = 32, c->ffn = 48, c->n_heads = 4, c->n_kv_heads = 2, c->head_dim = 8, c->vocab = 40;
  c->rms_eps = 1e-5, c->rope = rope_default(10000.0), c->tie_embeddings = tied;
  t->m.scorer_width = heads ? 16 : 0;
  t->buf = rnd(100000, 240, 0.5f);
  float *p = t->buf;
  t->m.embed = p, p += 40 * 32;
  t->m.final_norm = p, p += 32;
  t->m.lm_head = tied ? t->m.embed : p;
  p += 40 * 32;
  for (int l = 0; l < 2; l++) {
    apb_layer *L = &t->L[l];
    L->attn_norm = p, p += 32;
    L->wqkv = p, p += 64 * 32;
    L->bqkv = biases ? p : NULL, p += 64;
    L->wo = p, p += 32 * 32;
    L->bo = biases ? p : NULL, p += 32;
    L->ffn_norm = p, p += 32;
    L->w_gate_up = p, p += 96 * 32;
    L->b_gate_up = biases ? p : NULL, p += 96;
    L->w_down = p, p += 32 * 48;
    L->b_down = biases ? p : NULL, p += 32;
    L->fc1 = heads ? p : NULL, p += 16 * 64;
    L->fc2 = heads ? p : NULL, p += 2 * 16;
  }
  ck_assert(p <= t->buf + 100000);
  t->m.layers = t->L;
}

/* w has shape [N, K] and holds src: the same floats, or (a copy, made only to round: emulate_bf16)
 * src rounded to bf16, element by element */
static void shape(const apb_bweight *w, int64_t N, int64_t K, const float *src, int has_bias) {
  ck_assert_msg(w && w->N == N && w->K == K, "weight [%lld, %lld], want [%lld, %lld]", w ? (long long)w->N : -1LL,
                w ? (long long)w->K : -1LL, (long long)N, (long long)K);
  if (!w->own) {
    tu_assert_bitwise("weight kept in place", w->w, src, N * K);
  } else {
    float *r = malloc(sizeof(float) * (size_t)(N * K));
    ck_assert(r != NULL);
    memcpy(r, src, sizeof(float) * (size_t)(N * K));
    apb_bf16_round_array(r, (size_t)(N * K));
    tu_assert_bitwise("weight copy = bf16(source)", w->w, r, N * K);
    free(r);
  }
  ck_assert_int_eq(w->b != NULL, has_bias);
}

START_TEST(test_bmodel) {
  const int tied = _i & 1, biases = (_i >> 1) & 1, emulate = (_i >> 2) & 1;
  toy t;
  toy_make(&t, tied, biases, 1);
  apb_backend *be = mk("fast", emulate, 0);
  apb_error e = {0};
  apb_bmodel *bm = NULL;
  OK(apb_bmodel_create(be, &t.m, &bm, &e), &e, "bmodel_create");
  ck_assert(bm->m == &t.m);
  shape(bm->embed, 40, 32, t.m.embed, 0);
  shape(bm->final_norm, 1, 32, t.m.final_norm, 0);
  shape(bm->lm_head, 40, 32, t.m.lm_head, 0);
  ck_assert_int_eq(bm->lm_head == bm->embed, tied);
  for (int l = 0; l < 2; l++) {
    const struct apb_blayer *B = &bm->layers[l];
    const apb_layer *L = &t.L[l];
    shape(B->attn_norm, 1, 32, L->attn_norm, 0);
    shape(B->wqkv, 64, 32, L->wqkv, biases);
    shape(B->wo, 32, 32, L->wo, biases);
    shape(B->ffn_norm, 1, 32, L->ffn_norm, 0);
    shape(B->w_gate_up, 96, 32, L->w_gate_up, biases);
    shape(B->w_down, 32, 48, L->w_down, biases);
    shape(B->fc1, 16, 64, L->fc1, 0);
    shape(B->fc2, 2, 16, L->fc2, 0);
  }
  size_t cur, peak;
  apb_backend_mem(be, &cur, &peak);
  const size_t per_layer = 32 + 64 * 32 + 32 * 32 + 32 + 96 * 32 + 32 * 48 + 16 * 64 + 2 * 16 +
                           (biases ? 64 + 32 + 96 + 32 : 0);
  const size_t want = emulate ? (40 * 32 * (tied ? 1 : 2) + 32 + 2 * per_layer) * sizeof(float) : 0;
  ck_assert_uint_eq(cur, want);
  apb_bmodel_destroy(be, bm);
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 0);
  ck_assert_uint_eq(peak, want);

  /* no retaining heads: fc1/fc2 NULL; a missing tensor: named, and everything made so far released */
  toy u;
  toy_make(&u, tied, biases, 0);
  OK(apb_bmodel_create(be, &u.m, &bm, &e), &e, "bmodel_create without heads");
  ck_assert(bm->layers[1].fc1 == NULL && bm->layers[1].fc2 == NULL);
  apb_bmodel_destroy(be, bm);
  u.L[1].wo = NULL;
  FAILS(apb_bmodel_create(be, &u.m, &bm, &e), APB_EINVAL, &e, "layer 1", "wo");
  ck_assert(bm == NULL);
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 0);
  apb_bmodel_destroy(be, NULL);
  tu_free(t.buf), tu_free(u.buf);
  apb_backend_destroy(be);
}
END_TEST

/* apb_bmodel_generate_config on a CPU backend: the bmodel owns apb_model_generate_config's model of
 * that configuration (the same weights, bitwise); a configuration apb_config_check refuses is refused
 * before anything is allocated; apb_bmodel_generate is the preset's configuration. */
START_TEST(test_bmodel_generate_config) {
  apb_backend *be = mk("fast", 0, 0);
  apb_error e = {0};
  apb_model_config c;
  int width;
  apb_preset_config(APB_PRESET_TINY, &c, &width);
  c.n_layers = 1, c.hidden = 64, c.ffn = 96, c.n_heads = 8, c.n_kv_heads = 4, c.head_dim = 16, c.vocab = 50;
  apb_bmodel *bm = NULL;
  apb_model *ref = NULL;
  OK(apb_bmodel_generate_config(be, &c, 24, 9, &bm, &e), &e, "bmodel_generate_config");
  OK(apb_model_generate_config(&c, 24, 9, &ref, &e), &e, "model_generate_config");
  ck_assert(bm->owned == bm->m && bm->m != NULL);
  ck_assert_int_eq(bm->m->cfg.n_kv_heads, 4);
  ck_assert_int_eq(bm->m->scorer_width, 24);
  const int64_t QKV = (8 + 2 * 4) * 16;
  ck_assert_int_eq(memcmp(bm->m->embed, ref->embed, sizeof(float) * 50 * 64), 0);
  ck_assert_int_eq(memcmp(bm->m->layers[0].wqkv, ref->layers[0].wqkv, sizeof(float) * (size_t)(QKV * 64)), 0);
  ck_assert_int_eq(memcmp(bm->m->layers[0].fc2, ref->layers[0].fc2, sizeof(float) * 4 * 24), 0);
  shape(bm->layers[0].wqkv, QKV, 64, ref->layers[0].wqkv, 0);
  shape(bm->layers[0].fc1, 24, QKV, ref->layers[0].fc1, 0);
  apb_bmodel_destroy(be, bm);
  apb_model_free(ref);
  bm = (apb_bmodel *)&c;
  c.n_kv_heads = 3;
  FAILS(apb_bmodel_generate_config(be, &c, 24, 9, &bm, &e), APB_EINVAL, &e, "8 query heads", "3 KV heads");
  ck_assert(bm == NULL);
  size_t cur, peak;
  apb_backend_mem(be, &cur, &peak);
  ck_assert_uint_eq(cur, 0);
  OK(apb_bmodel_generate(be, APB_PRESET_TINY, 1, &bm, &e), &e, "bmodel_generate tiny");
  ck_assert_int_eq(bm->m->cfg.n_kv_heads, 2);
  ck_assert_int_eq(bm->m->scorer_width, 128);
  apb_bmodel_destroy(be, bm);
  FAILS(apb_bmodel_generate(be, APB_PRESET_COUNT, 1, &bm, &e), APB_EINVAL, &e, "unknown preset", NULL);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- attention and merge (last) */

typedef struct acase {
  int64_t P, A, B;
  int g, lk; /* gqa[g] and Ds[g]; local_keys */
} acase;
static const acase acases[] = {
    {0, 0, 97, 0, 1},   {13, 40, 113, 1, 1}, {0, 64, 1025, 0, 1},
    {200, 0, 97, 2, 0}, {5, 1, 1, 1, 1},     {31, 17, 113, 2, 1},
};
#define NA ((int)(sizeof acases / sizeof acases[0]))

typedef struct abuf {
  float *q, *kp, *vp, *ka, *va, *kb, *vb;
  int64_t P, A, B;
  int Hq, Hkv, D;
} abuf;

static void abuf_make(abuf *b, const acase *c, uint64_t s) {
  b->P = c->P, b->A = c->A, b->B = c->B;
  b->Hq = gqa[c->g][0], b->Hkv = gqa[c->g][1], b->D = Ds[c->g];
  const size_t hk = (size_t)b->Hkv * b->D;
  b->q = rnd((size_t)((c->A + c->B) * b->Hq * b->D), s, 1.0f);
  b->kp = rnd((size_t)c->P * hk, s + 1, 1.0f), b->vp = rnd((size_t)c->P * hk, s + 2, 1.0f);
  b->ka = rnd((size_t)c->A * hk, s + 3, 1.0f), b->va = rnd((size_t)c->A * hk, s + 4, 1.0f);
  b->kb = rnd((size_t)c->B * hk, s + 5, 1.0f), b->vb = rnd((size_t)c->B * hk, s + 6, 1.0f);
}
static void abuf_free(abuf *b) {
  tu_free(b->q), tu_free(b->kp), tu_free(b->vp), tu_free(b->ka), tu_free(b->va), tu_free(b->kb), tu_free(b->vb);
}
static apb_battn_args abuf_args(const abuf *b, int lk, float *o, float *lse) {
  apb_battn_args a = {.P = b->P, .A = b->A, .B = b->B, .Hq = b->Hq, .Hkv = b->Hkv, .D = b->D, .local_keys = lk,
                      .q = b->q, .kp = b->kp, .vp = b->vp, .ka = b->ka, .va = b->va, .kb = b->kb, .vb = b->vb,
                      .o = o, .lse = lse};
  return a;
}

START_TEST(test_attn) {
  const acase *c = &acases[_i];
  abuf b;
  abuf_make(&b, c, 300 + 10 * (uint64_t)_i);
  apb_backend *nv = mk("naive", 0, 0), *fs = mk("fast", 0, 0);
  apb_error e = {0};
  const int64_t T = c->A + c->B, no = T * b.Hq * b.D, nl = b.Hq * T;
  float *on = tu_alloc((size_t)no), *ln = tu_alloc((size_t)nl), *of = tu_alloc((size_t)no), *lf = tu_alloc((size_t)nl);
  apb_battn_args an = abuf_args(&b, c->lk, on, ln), af = abuf_args(&b, c->lk, of, lf);
  OK(nv->ops->attn(nv, &an, &e), &e, "naive attn");
  OK(fs->ops->attn(fs, &af, &e), &e, "fast attn");
  GUARD(on, (size_t)no), GUARD(ln, (size_t)nl), GUARD(of, (size_t)no), GUARD(lf, (size_t)nl);
  const int64_t keys = c->P + c->A + c->B;
  tu_assert_close("attn o", of, on, no, apb_tolerance(APB_PREC_F32, keys + b.D));
  tu_assert_close("attn lse", lf, ln, nl, apb_tolerance(APB_PREC_F32, keys + b.D));
  /* the backend op is apb_attn_naive on the same arguments, bitwise */
  float *od = tu_alloc((size_t)no), *ld = tu_alloc((size_t)nl);
  apb_attn_args d = {.P = b.P, .A = b.A, .B = b.B, .Hq = b.Hq, .Hkv = b.Hkv, .D = b.D, .local_keys = c->lk, .q = b.q,
                     .kp = b.kp, .vp = b.vp, .ka = b.ka, .va = b.va, .kb = b.kb, .vb = b.vb, .o = od, .lse = ld};
  OK(apb_attn_naive(&d, &e), &e, "apb_attn_naive");
  tu_assert_bitwise("attn o = apb_attn_naive", on, od, no);
  tu_assert_bitwise("attn lse = apb_attn_naive", ln, ld, nl);
  tu_free(on), tu_free(ln), tu_free(of), tu_free(lf), tu_free(od), tu_free(ld);
  abuf_free(&b);
  apb_backend_destroy(nv), apb_backend_destroy(fs);
}
END_TEST

START_TEST(test_attn_det) {
  const acase *c = &acases[1 + 4 * _i]; /* with P, A and GQA */
  abuf b;
  abuf_make(&b, c, 400);
  apb_error e = {0};
  const int64_t T = c->A + c->B, no = T * b.Hq * b.D, nl = b.Hq * T;
  float *o0 = tu_alloc((size_t)no), *l0 = tu_alloc((size_t)nl), *o = tu_alloc((size_t)no), *l = tu_alloc((size_t)nl);
  const int before = omp_get_max_threads();
  for (int nth = 1; nth <= 3; nth++)
    for (int rep = 0; rep < 2; rep++) {
      apb_backend *fs = mk("fast", 0, nth);
      const int first = nth == 1 && rep == 0;
      apb_battn_args a = abuf_args(&b, c->lk, first ? o0 : o, first ? l0 : l);
      if (!first) tu_poison(o, (size_t)no), tu_poison(l, (size_t)nl);
      OK(fs->ops->attn(fs, &a, &e), &e, "fast attn");
      ck_assert_int_eq(omp_get_max_threads(), before); /* the caller's OpenMP state is untouched */
      if (!first) {
        tu_assert_bitwise("attn o across team sizes and runs", o, o0, no);
        tu_assert_bitwise("attn lse across team sizes and runs", l, l0, nl);
      }
      apb_backend_destroy(fs);
    }
  tu_free(o0), tu_free(l0), tu_free(o), tu_free(l);
  abuf_free(&b);
}
END_TEST

START_TEST(test_merge) {
  apb_backend *be = mk(_i ? "fast" : "naive", 0, 0);
  apb_error e = {0};
  const int64_t T = 97;
  const int Hq = 4, D = 64, n = 3;
  float *o[3], *l[3];
  for (int i = 0; i < n; i++) {
    o[i] = rnd((size_t)(T * Hq * D), 500 + i, 1.0f);
    l[i] = rnd((size_t)(Hq * T), 510 + i, 5.0f);
  }
  for (int64_t r = 0; r < Hq * T; r += 7) l[1][r] = -INFINITY; /* rows part 1 did not see */
  for (int i = 0; i < n; i++) l[i][3] = -INFINITY;              /* a row nobody saw */
  float *mo = tu_alloc((size_t)(T * Hq * D)), *ml = tu_alloc((size_t)(Hq * T));
  float *dO = tu_alloc((size_t)(T * Hq * D)), *dl = tu_alloc((size_t)(Hq * T));
  const void *op_[3] = {o[0], o[1], o[2]};
  const float *lp[3] = {l[0], l[1], l[2]};
  OK(be->ops->merge(be, n, op_, lp, T, Hq, D, mo, ml, &e), &e, "merge");
  OK(apb_attn_merge(n, (const float *const *)o, lp, T, Hq, D, dO, dl, &e), &e, "apb_attn_merge");
  tu_assert_bitwise("merge o = apb_attn_merge", mo, dO, T * Hq * D);
  tu_assert_bitwise("merge lse = apb_attn_merge", ml, dl, Hq * T);
  ck_assert(ml[3] == -INFINITY);
  for (int i = 0; i < n; i++) tu_free(o[i]), tu_free(l[i]);
  tu_free(mo), tu_free(ml), tu_free(dO), tu_free(dl);
  apb_backend_destroy(be);
}
END_TEST

/* ---------------------------------------------------------------- suite */

int main(void) {
  Suite *s = suite_create("backend");
  TCase *tc = tu_tcase("memory", 30);
  tcase_add_test(tc, test_create);
  tcase_add_loop_test(tc, test_memory, 0, 2);
  tcase_add_loop_test(tc, test_marks, 0, 2);
  tcase_add_loop_test(tc, test_bmodel, 0, 8);
  tcase_add_test(tc, test_bmodel_generate_config);
  suite_add_tcase(s, tc);

  tc = tu_tcase("exact ops", 60);
  tcase_add_loop_test(tc, test_maxpool, 0, NT * 5);
  tcase_add_test(tc, test_maxpool_rules);
  tcase_add_loop_test(tc, test_gather, 0, NT * 6);
  tcase_add_loop_test(tc, test_topk_ties, 0, 2);
  tcase_add_loop_test(tc, test_topk_order, 0, 2);
  tcase_add_loop_test(tc, test_topk_lo, 0, 2);
  tcase_add_loop_test(tc, test_topk_nan, 0, 2);
  tcase_add_loop_test(tc, test_topk_brute, 0, NT * 8);
  tcase_add_test(tc, test_topk_large);
  suite_add_tcase(s, tc);

  tc = tu_tcase("fast vs naive", 120);
  tcase_add_loop_test(tc, test_linear, 0, NT * NE * 2);
  tcase_add_loop_test(tc, test_rmsnorm, 0, NT * NE);
  tcase_add_loop_test(tc, test_rope, 0, NT * 9);
  tcase_add_loop_test(tc, test_swiglu_add_embed, 0, NT * NE);
  tcase_add_loop_test(tc, test_score, 0, NT * 3);
  tcase_add_loop_test(tc, test_closed_forms, 0, 2);
  suite_add_tcase(s, tc);

  tc = tu_tcase("bf16, determinism, validation", 120);
  tcase_add_test(tc, test_bf16);
  tcase_add_loop_test(tc, test_det_blas, 0, 2);
  tcase_add_test(tc, test_det_team);
  tcase_add_loop_test(tc, test_validation, 0, 2);
  suite_add_tcase(s, tc);

  tc = tu_tcase("attention", 120);
  tcase_add_loop_test(tc, test_attn, 0, NA);
  tcase_add_loop_test(tc, test_attn_det, 0, 2);
  tcase_add_loop_test(tc, test_merge, 0, 2);
  suite_add_tcase(s, tc);
  return tu_run(s, "check_backend");
}
