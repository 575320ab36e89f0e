/* ref/backend_fast.c: the "fast" compute backend of apb/backend.h: OpenBLAS and OpenMP.
 *
 * What it is: the same ops as the oracle (ref/backend_naive.c), computed in fp32:
 *   - linear: y = x w^T by cblas_sgemm (RowMajor, x NoTrans, w Trans) on a fixed grid of tiles of
 *     APB_FAST_MB rows x APB_FAST_NB outputs, one single-threaded sgemm per tile, the tiles spread over
 *     this instance's OpenMP team; the bias add (and bf16 rounding) is done per tile right after it;
 *   - retaining scorer (APB.md 3.2): per chunk of APB_FAST_MB rows (one task each), h = qkv fc1^T by
 *     sgemm, SiLU in place, s = h fc2^T by sgemm, written transposed into scores [Hkv, T]. Chunks bound
 *     the scratch to a chunk x I floats per thread instead of T x I (512 MiB at T = 128K, I = 1024);
 *   - RMSNorm (sum of squares in double, as naive; HF's order: (x * inv) * w), SwiGLU (expf; gates below -80 in double), residual add, embedding
 *     lookup: OpenMP loops over rows with this instance's team size;
 *   - RoPE: per token a table of cos/sin of D/2 angles computed in double (as the oracle), shared by
 *     the token's Hq + Hkv heads, and the rotation in double; so it agrees with the oracle to the last
 *     bit in practice, and costs a table per token instead of one per (token, head);
 *   - attention: apb_attn_fast (ref/attn_fast.c); merge, maxpool, top-k, gather: ref/backend_cpu.c.
 *
 * Determinism (APB.md 6). Every output element is computed by one thread with a fixed sequence of
 * operations, and the OpenMP loops only decide which thread, so results do not depend on the OpenMP
 * team size. OpenBLAS is NOT bitwise stable across its own thread counts: measured on OpenBLAS 0.3.21
 * (pthread, DYNAMIC_ARCH, Cooperlake kernels), an sgemm [1024 x K] x [K x 8] differs between 1 and 2
 * threads for 1670 of the K in 1..2100 (every K > 320 but a few): its single-threaded and threaded
 * drivers cut K into different blocks. So every sgemm here runs single-threaded (on a tile whose shape
 * depends only on the problem, never on the team size), with OpenBLAS held at one thread for the
 * duration of the op through ref/blas_hold.c, whose one count (shared with ref/attn_fast.c) restores
 * OpenBLAS's count when the last user leaves. The attention op runs inside the same hold, so that simulated hosts running attention
 * and linear at the same time share one count. tests/check_backend.c checks bitwise equality for
 * OpenMP teams of 1, 2, 3 and OpenBLAS counts of 1, 2, 4, and that OpenBLAS's count is restored.
 * apb_attn_fast takes its team size from omp_get_max_threads(); when this instance has a fixed team
 * size it is called inside a one-thread parallel region that sets nthreads-var for that region only (a
 * one-thread team is not an active level, so the attention's own region still gets its threads),
 * leaving the caller's OpenMP state untouched.
 *
 * What it deliberately is not: tuned (no custom GEMM, no fused kernels, no vector intrinsics), or
 * different in its exact ops from the oracle.
 *
 * Tested in tests/check_backend.c: every op against the naive oracle on awkward sizes with tolerances
 * from apb_tolerance(APB_PREC_F32, k), bitwise thread-count determinism of linear, the scorer and
 * attention, and bf16 emulation.
 */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "apb/dtype.h"
#include "backend_cpu.h"
#include "blas_hold.h"

/* Tiles of the sgemm calls: rows (also the scorer's chunk) and outputs. */
#define APB_FAST_MB 256
#define APB_FAST_NB 1024

/* Parallelize an elementwise loop only when it has at least this many elements. */
#define APB_FAST_PAR_MIN 32768

static apb_status fast_embed(apb_backend *be, const apb_bweight *table, const int32_t *ids, int64_t T, void *out,
                             apb_error *err) {
  const char *op = "embed";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "table", table, -1, -1)) || (st = apb_bc_embed(err, T, ids, out)) || T == 0 ||
      (st = apb_cpu_check_ids(err, op, ids, T, table->N)))
    return st;
  const apb_cpu *c = apb_cpu_of(be);
  const int64_t E = table->K;
  float *y = out;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (T * E > APB_FAST_PAR_MIN)
  for (int64_t t = 0; t < T; t++) memcpy(y + t * E, table->w + (int64_t)ids[t] * E, (size_t)E * sizeof(float));
  apb_cpu_round(c, y, (size_t)(T * E));
  return APB_OK;
}

static apb_status fast_rmsnorm(apb_backend *be, const apb_bweight *w, float eps, const void *x, int64_t T, void *y,
                               apb_error *err) {
  const char *op = "rmsnorm";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "w", w, 1, -1)) || (st = apb_bc_rmsnorm(err, eps, T, w->K, sizeof(float), x, y)) || T == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const int64_t E = w->K;
  const float *xs = x, *wv = w->w;
  float *ys = y; /* may be x itself: each row is read whole before it is written */
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (T * E > APB_FAST_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    const float *xr = xs + t * E;
    float *yr = ys + t * E;
    /* the sum of squares in double, as the oracle: in fp32 it overflows for |x| beyond about 1.8e19
     * (y = 0) and underflows for tiny rows (y = inf when eps is tiny too) */
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t e = 0; e < E; e++) ss += (double)xr[e] * (double)xr[e];
    const float inv = (float)(1.0 / sqrt(ss / (double)E + (double)eps));
    for (int64_t e = 0; e < E; e++) yr[e] = (xr[e] * inv) * wv[e];
    if (c->emulate_bf16) apb_bf16_round_array(yr, (size_t)E);
  }
  return APB_OK;
}

/* y [m, n] (row stride ldy) = x [m, K] (stride K) w [n, K]^T (stride K), single-threaded. */
static void sgemm_nt(int64_t m, int64_t n, int64_t K, const float *x, const float *w, float *y, int64_t ldy) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)n, (int)K, 1.0f, x, (int)K, w, (int)K, 0.0f, y,
              (int)ldy);
}

static apb_status fits_blas(apb_error *err, const char *op, int64_t T, int64_t N, int64_t K) {
  if (T > INT_MAX || N > INT_MAX || K > INT_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: [%lld x %lld] x [%lld]^T exceeds the BLAS int range", op,
                         (long long)T, (long long)K, (long long)N);
  return APB_OK;
}

static apb_status fast_linear(apb_backend *be, const apb_bweight *w, const void *x, int64_t T, void *y,
                              apb_error *err) {
  const char *op = "linear";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "w", w, -1, -1)) ||
      (st = apb_bc_linear(err, T, w->N, w->K, sizeof(float), x, y)) || T == 0)
    return st;
  const int64_t N = w->N, K = w->K;
  if ((st = fits_blas(err, op, T, N, K))) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const float *xs = x, *b = w->b;
  float *ys = y;
  /* a fixed grid of tiles: the same sgemm calls whatever the team size */
  const int64_t tn = (N + APB_FAST_NB - 1) / APB_FAST_NB, ntile = (T + APB_FAST_MB - 1) / APB_FAST_MB * tn;
  int nth = apb_cpu_threads(c);
  if (nth > ntile) nth = (int)ntile;
  apb_ref_blas_hold();
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1)
  for (int64_t i = 0; i < ntile; i++) {
    const int64_t r0 = i / tn * APB_FAST_MB, c0 = i % tn * APB_FAST_NB;
    const int64_t m = T - r0 < APB_FAST_MB ? T - r0 : APB_FAST_MB, n = N - c0 < APB_FAST_NB ? N - c0 : APB_FAST_NB;
    float *yt = ys + r0 * N + c0;
    sgemm_nt(m, n, K, xs + r0 * K, w->w + c0 * K, yt, N);
    for (int64_t r = 0; r < m; r++) {
      float *yr = yt + r * N;
      if (b)
        for (int64_t j = 0; j < n; j++) yr[j] += b[c0 + j];
      if (c->emulate_bf16) apb_bf16_round_array(yr, (size_t)n);
    }
  }
  apb_ref_blas_release();
  return APB_OK;
}

static apb_status fast_split_rope(apb_backend *be, const void *qkv, int64_t T, int Hq, int Hkv, int D,
                                  const int32_t *pos, const apb_rope *rope, void *q, void *k, void *v,
                                  apb_error *err) {
  double *f;
  apb_status st = apb_bc_split_rope(err, qkv, T, Hq, Hkv, D, pos, rope, q, k, v, sizeof(float), &f);
  if (st != APB_OK || T == 0) {
    free(f);
    return st;
  }
  apb_cpu *c = apb_cpu_of(be);
  const int half = D / 2;
  const int64_t QKV = ((int64_t)Hq + 2 * Hkv) * D;
  const float *x = qkv;
  float *qs = q, *ks = k, *vs = v;
  const int nth = apb_cpu_threads(c);
  const size_t per = (size_t)D * sizeof(double); /* cos [D/2] then sin [D/2] */
  void *buf;
  if ((st = apb_cpu_scratch(c, per * (size_t)nth, "split_rope", &buf, err))) {
    free(f);
    return st;
  }
#pragma omp parallel num_threads(nth) if (T * QKV > APB_FAST_PAR_MIN)
  {
    double *co = (double *)((char *)buf + per * (size_t)omp_get_thread_num()), *si = co + half;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
      for (int i = 0; i < half; i++) {
        const double a = (double)pos[t] * f[i];
        co[i] = cos(a);
        si[i] = sin(a);
      }
      const float *row = x + t * QKV;
      for (int h = 0; h < Hq + Hkv; h++) {
        const float *src = row + (int64_t)h * D;
        float *dst = h < Hq ? qs + (t * Hq + h) * D : ks + (t * Hkv + (h - Hq)) * D;
        for (int i = 0; i < half; i++) {
          const double x1 = src[i], x2 = src[i + half];
          dst[i] = (float)(x1 * co[i] - x2 * si[i]);
          dst[i + half] = (float)(x2 * co[i] + x1 * si[i]);
        }
        if (c->emulate_bf16) apb_bf16_round_array(dst, (size_t)D);
      }
      float *vd = vs + t * Hkv * D;
      memcpy(vd, row + (int64_t)(Hq + Hkv) * D, (size_t)Hkv * D * sizeof(float));
      if (c->emulate_bf16) apb_bf16_round_array(vd, (size_t)Hkv * D);
    }
  }
  apb_cpu_scratch_free(c, buf, per * (size_t)nth);
  free(f);
  return APB_OK;
}

static apb_status fast_swiglu(apb_backend *be, const void *gu, int64_t T, int64_t F, void *out, apb_error *err) {
  apb_status st = apb_bc_swiglu(err, T, F, gu, out, sizeof(float));
  if (st || T == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const float *x = gu;
  float *y = out;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (T * F > APB_FAST_PAR_MIN)
  for (int64_t t = 0; t < T; t++) {
    const float *g = x + t * 2 * F, *u = g + F;
    float *yr = y + t * F;
    /* below -80, expf(-g) nears fp32's overflow (past -88.7 it is Inf and g / Inf = -0, while silu(g)
     * is a tiny number down to -103.9): there g e^g in double, rounded once (a rare branch; the bits
     * of every other gate are unchanged) */
    for (int64_t i = 0; i < F; i++)
      yr[i] = g[i] >= -80.0f ? g[i] / (1.0f + expf(-g[i])) * u[i] : (float)((double)g[i] * exp((double)g[i])) * u[i];
    if (c->emulate_bf16) apb_bf16_round_array(yr, (size_t)F);
  }
  return APB_OK;
}

static apb_status fast_add(apb_backend *be, void *y, const void *x, size_t n, apb_error *err) {
  apb_status st = apb_bc_add(err, n, y, x);
  if (st || n == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  float *ys = y;
  const float *xs = x;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (n > APB_FAST_PAR_MIN)
  for (size_t i = 0; i < n; i++) ys[i] += xs[i];
  apb_cpu_round(c, ys, n);
  return APB_OK;
}

static apb_status fast_attn(apb_backend *be, const apb_battn_args *a, apb_error *err) {
  apb_attn_args aa;
  apb_status st = apb_cpu_attn_args(err, "attn", a, &aa);
  if (st != APB_OK) return st;
  const apb_cpu *c = apb_cpu_of(be);
  apb_ref_blas_hold(); /* apb_attn_fast holds OpenBLAS at one thread too; this shares the count (top of file) */
  if (c->threads > 0) {
    /* A one-thread region: nthreads-var set inside it belongs to this region's implicit task only. */
    const int nth = c->threads;
#pragma omp parallel num_threads(1)
    {
      omp_set_num_threads(nth);
      st = apb_attn_fast(&aa, err);
    }
  } else {
    st = apb_attn_fast(&aa, err);
  }
  apb_ref_blas_release();
  if (st == APB_OK) apb_cpu_round(c, aa.o, (size_t)(aa.A + aa.B) * (size_t)aa.Hq * (size_t)aa.D);
  return st;
}

static apb_status fast_score(apb_backend *be, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                             int64_t T, float *scores, apb_error *err) {
  const char *op = "score_retaining";
  apb_status st = apb_cpu_scorer_check(err, fc1, fc2, qkv, T, scores);
  if (st != APB_OK || T == 0) return st;
  const int64_t C = fc1->K, Iw = fc1->N, Hkv = fc2->N; /* Iw: the scorer width I (complex.h owns I) */
  if ((st = fits_blas(err, op, APB_FAST_MB, Iw, C))) return st;
  apb_cpu *c = apb_cpu_of(be);
  const int64_t CH = T < APB_FAST_MB ? T : APB_FAST_MB, nchunk = (T + APB_FAST_MB - 1) / APB_FAST_MB;
  int nth = apb_cpu_threads(c);
  if (nth > nchunk) nth = (int)nchunk;
  const size_t per = (size_t)(CH * Iw + CH * Hkv) * sizeof(float); /* h [CH, I], s [CH, Hkv] */
  void *buf;
  if ((st = apb_cpu_scratch(c, per * (size_t)nth, op, &buf, err))) return st;
  const float *x = qkv;
  apb_ref_blas_hold();
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1)
  for (int64_t ci = 0; ci < nchunk; ci++) {
    float *h = (float *)((char *)buf + per * (size_t)omp_get_thread_num()), *s = h + CH * Iw;
    const int64_t t0 = ci * APB_FAST_MB, m = T - t0 < APB_FAST_MB ? T - t0 : APB_FAST_MB;
    sgemm_nt(m, Iw, C, x + t0 * C, fc1->w, h, Iw);
    for (int64_t r = 0; r < m; r++) {
      float *hr = h + r * Iw;
      if (c->emulate_bf16) apb_bf16_round_array(hr, (size_t)Iw); /* h is stored (apb/backend.h) */
      for (int64_t i = 0; i < Iw; i++) hr[i] = hr[i] / (1.0f + expf(-hr[i]));
      if (c->emulate_bf16) apb_bf16_round_array(hr, (size_t)Iw);
    }
    sgemm_nt(m, Hkv, Iw, h, fc2->w, s, Hkv);
    for (int64_t r = 0; r < m; r++)
      for (int64_t j = 0; j < Hkv; j++) scores[j * T + t0 + r] = s[r * Hkv + j];
  }
  apb_ref_blas_release();
  apb_cpu_scratch_free(c, buf, per * (size_t)nth);
  return APB_OK;
}

static const apb_backend_ops fast_ops = {
    .destroy = apb_cpu_destroy,
    .alloc = apb_cpu_alloc,
    .free = apb_cpu_free,
    .memset = apb_cpu_memset,
    .copy = apb_cpu_copy,
    .copy2d = apb_cpu_copy2d,
    .upload = apb_cpu_upload,
    .download = apb_cpu_download,
    .upload_f32 = apb_cpu_upload_f32,
    .download_f32 = apb_cpu_download_f32,
    .sync = apb_cpu_sync,
    .weight_create = apb_cpu_weight_create,
    .weight_destroy = apb_cpu_weight_destroy,
    .embed = fast_embed,
    .rmsnorm = fast_rmsnorm,
    .linear = fast_linear,
    .split_rope = fast_split_rope,
    .swiglu = fast_swiglu,
    .add = fast_add,
    .attn = fast_attn,
    .merge = apb_cpu_merge,
    .score_retaining = fast_score,
    .maxpool = apb_cpu_maxpool,
    .topk = apb_cpu_topk,
    .gather = apb_cpu_gather,
    .mem = apb_cpu_mem,
    .mark = apb_cpu_mark,
    .mark_elapsed = apb_cpu_mark_elapsed,
    .mark_free = apb_cpu_mark_free,
};

apb_status apb_backend_fast(const apb_cpu_opts *o, apb_backend **out, apb_error *err) {
  return apb_cpu_create("fast", o, &fast_ops, out, err);
}
