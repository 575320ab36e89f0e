/* ref/backend_naive.c: the "naive" compute backend, the oracle of apb/backend.h (shared/APB.md 7).
 *
 * What it is: the definition of every op, in plain loops. Every reduction is accumulated in double
 * (the RMSNorm mean of squares, each linear dot product, both GEMMs of the retaining scorer), every
 * elementwise formula (RoPE rotation, SiLU, SwiGLU) is evaluated in double, and each output is rounded
 * to fp32 once, at the store (and then to bf16 when emulating GPU storage). RoPE's inverse frequencies,
 * angles, cosines and sines are all in double. Attention is apb_attn_naive (ref/attn_naive.c) and the
 * merge is apb_attn_merge (ref/merge.c). Memory, weights, maxpool, top-k and gather are shared with the
 * fast backend (ref/backend_cpu.c): they are exact.
 *
 * Rows (tokens) are spread over OpenMP threads where that is free: each output element is still one
 * sequential loop on one thread, so results do not depend on the thread count.
 *
 * What it deliberately is not: fast. No BLAS, no blocking, no vector tricks.
 *
 * Tested in tests/check_backend.c, where the fast backend is compared to it op by op, and against
 * closed forms (RoPE at p = 0 and p = 1, SiLU, RMSNorm of a constant row).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "apb/dtype.h"
#include "backend_cpu.h"

/* The fp32 store of a double result, then bf16 when emulating. */
static inline float store(const apb_cpu *c, double v) {
  float f = (float)v;
  return c->emulate_bf16 ? apb_bf16_round(f) : f;
}

static apb_status naive_embed(apb_backend *be, const apb_bweight *table, const int32_t *ids, int64_t T,
                              void *out, apb_error *err) {
  const char *op = "embed";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "table", table, -1, -1)) || (st = apb_bc_embed(err, T, ids, out)) || T == 0 ||
      (st = apb_cpu_check_ids(err, op, ids, T, table->N)))
    return st;
  const apb_cpu *c = apb_cpu_of(be);
  float *y = out;
  const int64_t E = table->K;
  for (int64_t t = 0; t < T; t++)
    for (int64_t e = 0; e < E; e++) y[t * E + e] = store(c, table->w[(int64_t)ids[t] * E + e]);
  return APB_OK;
}

static apb_status naive_rmsnorm(apb_backend *be, const apb_bweight *w, float eps, const void *x, int64_t T,
                                void *y, apb_error *err) {
  const char *op = "rmsnorm";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "w", w, 1, -1)) || (st = apb_bc_rmsnorm(err, eps, T, w->K, sizeof(float), x, y)) || T == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const int64_t E = w->K;
  const float *xs = x;
  float *ys = y; /* may be x itself: each row is read whole before it is written */
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    const float *xr = xs + t * E;
    double ss = 0;
    for (int64_t e = 0; e < E; e++) ss += (double)xr[e] * (double)xr[e];
    const double inv = 1.0 / sqrt(ss / (double)E + (double)eps);
    for (int64_t e = 0; e < E; e++) ys[t * E + e] = store(c, (double)xr[e] * inv * (double)w->w[e]);
  }
  return APB_OK;
}

static apb_status naive_linear(apb_backend *be, const apb_bweight *w, const void *x, int64_t T, void *y,
                               apb_error *err) {
  const char *op = "linear";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "w", w, -1, -1)) ||
      (st = apb_bc_linear(err, T, w->N, w->K, sizeof(float), x, y)) || T == 0)
    return st;
  const int64_t N = w->N, K = w->K;
  const apb_cpu *c = apb_cpu_of(be);
  const float *xs = x;
  float *ys = y;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; t++)
    for (int64_t n = 0; n < N; n++) {
      const float *xr = xs + t * K, *wr = w->w + n * K;
      double acc = 0;
      for (int64_t k = 0; k < K; k++) acc += (double)xr[k] * (double)wr[k];
      if (w->b) acc += (double)w->b[n];
      ys[t * N + n] = store(c, acc);
    }
  return APB_OK;
}

static apb_status naive_split_rope(apb_backend *be, const void *qkv, int64_t T, int Hq, int Hkv, int D,
                                   const int32_t *pos, const apb_rope *rope, void *q, void *k, void *v,
                                   apb_error *err) {
  double *f;
  apb_status st = apb_bc_split_rope(err, qkv, T, Hq, Hkv, D, pos, rope, q, k, v, sizeof(float), &f);
  if (st != APB_OK) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const int half = D / 2;
  const int64_t QKV = ((int64_t)Hq + 2 * Hkv) * D;
  const float *x = qkv;
  float *qs = q, *ks = k, *vs = v;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    const float *row = x + t * QKV;
    /* q heads then k heads, each rotated at pos[t]; the heads of row t are laid out [q | k | v] */
    for (int h = 0; h < Hq + Hkv; h++) {
      const float *src = row + (int64_t)h * D;
      float *dst = h < Hq ? qs + (t * Hq + h) * D : ks + (t * Hkv + (h - Hq)) * D;
      for (int i = 0; i < half; i++) {
        const double a = (double)pos[t] * f[i], co = cos(a), si = sin(a);
        const double x1 = src[i], x2 = src[i + half];
        dst[i] = store(c, x1 * co - x2 * si);
        dst[i + half] = store(c, x2 * co + x1 * si);
      }
    }
    for (int h = 0; h < Hkv; h++)
      for (int d = 0; d < D; d++) vs[(t * Hkv + h) * D + d] = store(c, row[(int64_t)(Hq + Hkv + h) * D + d]);
  }
  free(f);
  return APB_OK;
}

static apb_status naive_swiglu(apb_backend *be, const void *gu, int64_t T, int64_t F, void *out,
                               apb_error *err) {
  apb_status st = apb_bc_swiglu(err, T, F, gu, out, sizeof(float));
  if (st || T == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  const float *x = gu;
  float *y = out;
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < F; i++) {
      const double g = x[t * 2 * F + i], u = x[t * 2 * F + F + i];
      y[t * F + i] = store(c, g / (1.0 + exp(-g)) * u);
    }
  return APB_OK;
}

static apb_status naive_add(apb_backend *be, void *y, const void *x, size_t n, apb_error *err) {
  apb_status st = apb_bc_add(err, n, y, x);
  if (st || n == 0) return st;
  const apb_cpu *c = apb_cpu_of(be);
  float *ys = y;
  const float *xs = x;
  for (size_t i = 0; i < n; i++) ys[i] = store(c, (double)(ys[i] + xs[i])); /* one fp32 add, exact rounding */
  return APB_OK;
}

static apb_status naive_attn(apb_backend *be, const apb_battn_args *a, apb_error *err) {
  apb_attn_args aa;
  apb_status st = apb_cpu_attn_args(err, "attn", a, &aa);
  if (st == APB_OK) st = apb_attn_naive(&aa, err);
  if (st == APB_OK) apb_cpu_round(apb_cpu_of(be), aa.o, (size_t)(aa.A + aa.B) * (size_t)aa.Hq * (size_t)aa.D);
  return st;
}

static apb_status naive_score(apb_backend *be, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                              int64_t T, float *scores, apb_error *err) {
  const char *op = "score_retaining";
  apb_status st = apb_cpu_scorer_check(err, fc1, fc2, qkv, T, scores);
  if (st != APB_OK || T == 0) return st;
  apb_cpu *c = apb_cpu_of(be);
  const int64_t C = fc1->K, Iw = fc1->N, Hkv = fc2->N; /* Iw: the scorer width I */
  const float *x = qkv;
  const int nth = apb_cpu_threads(c);
  const size_t per = (size_t)Iw * sizeof(double);
  void *buf;
  if ((st = apb_cpu_scratch(c, per * (size_t)nth, op, &buf, err))) return st;
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    double *h = (double *)((char *)buf + per * (size_t)omp_get_thread_num()); /* [I] */
    const float *xr = x + t * C;
    for (int64_t i = 0; i < Iw; i++) {
      const float *wr = fc1->w + i * C;
      double acc = 0;
      for (int64_t j = 0; j < C; j++) acc += (double)xr[j] * (double)wr[j];
      if (c->emulate_bf16) acc = apb_bf16_round((float)acc); /* h is stored (apb/backend.h) */
      acc = acc / (1.0 + exp(-acc));
      h[i] = c->emulate_bf16 ? apb_bf16_round((float)acc) : acc;
    }
    for (int64_t r = 0; r < Hkv; r++) {
      const float *wr = fc2->w + r * Iw;
      double acc = 0;
      for (int64_t i = 0; i < Iw; i++) acc += h[i] * (double)wr[i];
      scores[r * T + t] = (float)acc; /* scores are fp32, never rounded to bf16 */
    }
  }
  apb_cpu_scratch_free(c, buf, per * (size_t)nth);
  return APB_OK;
}

static const apb_backend_ops naive_ops = {
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
    .embed = naive_embed,
    .rmsnorm = naive_rmsnorm,
    .linear = naive_linear,
    .split_rope = naive_split_rope,
    .swiglu = naive_swiglu,
    .add = naive_add,
    .attn = naive_attn,
    .merge = apb_cpu_merge,
    .score_retaining = naive_score,
    .maxpool = apb_cpu_maxpool,
    .topk = apb_cpu_topk,
    .gather = apb_cpu_gather,
    .mem = apb_cpu_mem,
    .mark = apb_cpu_mark,
    .mark_elapsed = apb_cpu_mark_elapsed,
    .mark_free = apb_cpu_mark_free,
};

apb_status apb_backend_naive(const apb_cpu_opts *o, apb_backend **out, apb_error *err) {
  return apb_cpu_create("naive", o, &naive_ops, out, err);
}
