/* ref/backend_cpu.c: the parts of the CPU compute backends that "naive" and "fast" share
 * (apb/backend.h, ref/backend_cpu.h).
 *
 * What it is:
 *   - host memory with byte accounting: alloc puts a 64-byte header holding the size in front of a
 *     64-byte aligned block, so free can subtract it; weight copies and op scratch go through the same
 *     counters (current bytes and high-water mark, atomics because simulated hosts run on threads);
 *   - weights: the caller's pointers, or a bf16-rounded copy when emulating GPU bf16 storage;
 *   - argument validation with APB_EINVAL messages that name the op, the argument and the values;
 *   - the bf16-emulation rounding of stored activations;
 *   - the ops whose results are exact (comparisons and copies), so one implementation serves both
 *     backends: maxpool (APB.md 3.2), top-k selection (APB.md 3.4), gather (APB.md 3.4, the
 *     compressed block), and the LSE merge (APB.md 4, through apb_attn_merge).
 *
 * Top-k. Each candidate t in [lo, T) gets a 64-bit key: the score mapped to an order-preserving
 * unsigned integer (with -0 folded onto +0), complemented so that a higher score is a smaller key, in
 * the high half, and t in the low half. Keys are distinct, and ascending key order is exactly "score
 * descending, then position ascending", the tie rule of APB.md 3.4. The keys are sorted (O(n log n)),
 * the k-th smallest is the threshold, and one pass over t in ascending order emits every t whose key is
 * at most the threshold: exactly k indices, already in ascending position order.
 *
 * What it deliberately is not: an allocator with pooling (every alloc is aligned_alloc), or a check
 * that pointers really came from this instance (host memory cannot tell).
 *
 * Tested in tests/check_backend.c (memory ops, accounting, validation messages, one test per rule of
 * APB.md 3.4 against a brute-force selection, maxpool and gather against direct definitions).
 */
#include "backend_cpu.h"
#include "../lib/be_check.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apb/dtype.h"

#define APB_CPU_ALIGN 64
#define APB_CPU_HDR 64 /* bytes in front of each alloc block; holds its size */

/* ---------------------------------------------------------------- instance */

apb_status apb_cpu_create(const char *name, const apb_cpu_opts *o, const apb_backend_ops *ops,
                          apb_backend **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "backend %s: out is NULL", name);
  *out = NULL;
  apb_cpu_opts def = {0, 0};
  if (!o) o = &def;
  if (o->threads < 0)
    return apb_error_set(err, APB_EINVAL, "backend %s: threads=%d must be >= 0 (0: omp_get_max_threads())",
                         name, o->threads);
  apb_cpu *c = calloc(1, sizeof *c);
  if (!c) return apb_error_set(err, APB_ENOMEM, "backend %s: cannot allocate the instance", name);
  c->be.name = name;
  c->be.act = APB_DT_F32;
  c->be.device = -1;
  c->be.ops = ops;
  c->be.impl = c;
  c->emulate_bf16 = o->emulate_bf16 != 0;
  c->threads = o->threads;
  atomic_init(&c->cur, 0);
  atomic_init(&c->peak, 0);
  *out = &c->be;
  return APB_OK;
}

void apb_cpu_destroy(apb_backend *be) {
  if (be) free(apb_cpu_of(be));
}

int apb_cpu_threads(const apb_cpu *c) {
  int n = c->threads > 0 ? c->threads : omp_get_max_threads();
  return n > 0 ? n : 1;
}

/* ---------------------------------------------------------------- accounting */

static void count_add(apb_cpu *c, size_t bytes) {
  size_t now = atomic_fetch_add(&c->cur, bytes) + bytes;
  size_t pk = atomic_load(&c->peak);
  while (now > pk && !atomic_compare_exchange_weak(&c->peak, &pk, now)) {
  }
}

static void count_sub(apb_cpu *c, size_t bytes) { atomic_fetch_sub(&c->cur, bytes); }

void apb_cpu_mem(const apb_backend *be, size_t *current, size_t *peak) {
  apb_cpu *c = apb_cpu_of(be);
  if (current) *current = atomic_load(&c->cur);
  if (peak) *peak = atomic_load(&c->peak);
}

/* aligned_alloc needs a size that is a multiple of the alignment; NULL on overflow or failure. */
static void *aligned_block(size_t bytes) {
  if (bytes > SIZE_MAX - 2 * APB_CPU_ALIGN) return NULL;
  size_t n = (bytes + APB_CPU_ALIGN - 1) / APB_CPU_ALIGN * APB_CPU_ALIGN;
  return aligned_alloc(APB_CPU_ALIGN, n);
}

apb_status apb_cpu_scratch(apb_cpu *c, size_t bytes, const char *op, void **p, apb_error *err) {
  *p = NULL;
  if (bytes == 0) return APB_OK;
  *p = aligned_block(bytes);
  if (!*p) return apb_error_set(err, APB_ENOMEM, "%s: cannot allocate %zu bytes of scratch", op, bytes);
  count_add(c, bytes);
  return APB_OK;
}

void apb_cpu_scratch_free(apb_cpu *c, void *p, size_t bytes) {
  if (!p) return;
  free(p);
  count_sub(c, bytes);
}

/* ---------------------------------------------------------------- bf16 emulation */

void apb_cpu_round(const apb_cpu *c, float *x, size_t n) {
  if (!c->emulate_bf16 || n == 0) return;
  const size_t blk = 16384;
  const int64_t nb = (int64_t)((n + blk - 1) / blk);
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (nb > 4)
  for (int64_t i = 0; i < nb; i++) {
    size_t b0 = (size_t)i * blk, len = n - b0 < blk ? n - b0 : blk;
    apb_bf16_round_array(x + b0, len);
  }
}

/* ---------------------------------------------------------------- validation */

apb_status apb_cpu_weight(apb_error *err, const char *op, const char *arg, const apb_bweight *w, int64_t N,
                          int64_t K) {
  return apb_bc_weight(err, op, arg, w != NULL, w ? w->N : 0, w ? w->K : 0, N, K);
}

apb_status apb_cpu_check_ids(apb_error *err, const char *op, const int32_t *ids, int64_t T, int64_t V) {
  for (int64_t t = 0; t < T; t++)
    if (ids[t] < 0 || ids[t] >= V)
      return apb_error_set(err, APB_EINVAL, "%s: ids[%lld]=%d is out of the vocabulary [0, %lld)", op,
                           (long long)t, (int)ids[t], (long long)V);
  return APB_OK;
}

apb_status apb_cpu_scorer_check(apb_error *err, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                                int64_t T, const float *scores) {
  const char *op = "score_retaining";
  apb_status st;
  if ((st = apb_cpu_weight(err, op, "fc1", fc1, -1, -1)) || (st = apb_cpu_weight(err, op, "fc2", fc2, -1, fc1->N)) ||
      (st = apb_bc_len(err, op, "T", T, 0)))
    return st;
  if (fc1->b || fc2->b)
    return apb_error_set(err, APB_EINVAL, "%s: %s has a bias; the retaining heads have none (APB.md 3.2)", op,
                         fc1->b ? "fc1" : "fc2");
  if (T > 0) {
    if ((st = apb_bc_need(err, op, "qkv", qkv)) || (st = apb_bc_need(err, op, "scores", scores)) ||
        (st = apb_bc_disjoint(err, op, "scores", scores, (size_t)fc2->N * T * sizeof(float), "qkv", qkv,
                               (size_t)T * fc1->K * sizeof(float))))
      return st;
  }
  return APB_OK;
}

apb_status apb_cpu_attn_args(apb_error *err, const char *op, const apb_battn_args *a, apb_attn_args *out) {
  if (!a) return apb_error_set(err, APB_EINVAL, "%s: args is NULL", op);
  *out = (apb_attn_args){
      .P = a->P,
      .A = a->A,
      .B = a->B,
      .Hq = a->Hq,
      .Hkv = a->Hkv,
      .D = a->D,
      .local_keys = a->local_keys,
      .scale = a->scale,
      .q = a->q,
      .kp = a->kp,
      .vp = a->vp,
      .ka = a->ka,
      .va = a->va,
      .kb = a->kb,
      .vb = a->vb,
      .o = a->o,
      .lse = a->lse,
  };
  apb_status st = apb_attn_validate(out, err);
  if (st != APB_OK) return st;
  if (a->A + a->B > 0 && !a->lse)
    return apb_error_set(err, APB_EINVAL, "%s: lse is NULL; the backend op requires it ([Hq, A+B] = [%d, %lld])",
                         op, a->Hq, (long long)(a->A + a->B));
  return APB_OK;
}

/* ---------------------------------------------------------------- memory ops */

apb_status apb_cpu_alloc(apb_backend *be, size_t bytes, void **p, apb_error *err) {
  if (!p) return apb_error_set(err, APB_EINVAL, "alloc: p is NULL");
  *p = NULL;
  if (bytes == 0) return APB_OK;
  if (bytes > SIZE_MAX - APB_CPU_HDR)
    return apb_error_set(err, APB_ENOMEM, "alloc: %zu bytes is beyond the address space", bytes);
  char *blk = aligned_block(bytes + APB_CPU_HDR);
  if (!blk) return apb_error_set(err, APB_ENOMEM, "alloc: cannot allocate %zu bytes of host memory", bytes);
  memcpy(blk, &bytes, sizeof bytes);
  count_add(apb_cpu_of(be), bytes);
  *p = blk + APB_CPU_HDR;
  return APB_OK;
}

void apb_cpu_free(apb_backend *be, void *p) {
  if (!p) return;
  char *blk = (char *)p - APB_CPU_HDR;
  size_t bytes;
  memcpy(&bytes, blk, sizeof bytes);
  count_sub(apb_cpu_of(be), bytes);
  free(blk);
}

apb_status apb_cpu_memset(apb_backend *be, void *p, int byte, size_t bytes, apb_error *err) {
  (void)be;
  if (bytes == 0) return APB_OK;
  if (!p) return apb_error_set(err, APB_EINVAL, "memset: p is NULL (%zu bytes)", bytes);
  memset(p, byte, bytes);
  return APB_OK;
}

/* copy, upload and download are the same thing for host memory. */
static apb_status host_copy(const char *op, void *dst, const void *src, size_t bytes, apb_error *err) {
  if (bytes == 0 || dst == src) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "dst", dst)) || (st = apb_bc_need(err, op, "src", src)) ||
      (st = apb_bc_disjoint(err, op, "dst", dst, bytes, "src", src, bytes)))
    return st;
  memcpy(dst, src, bytes);
  return APB_OK;
}

apb_status apb_cpu_copy(apb_backend *be, void *dst, const void *src, size_t bytes, apb_error *err) {
  (void)be;
  return host_copy("copy", dst, src, bytes, err);
}

apb_status apb_cpu_upload(apb_backend *be, void *dst, const void *host, size_t bytes, apb_error *err) {
  (void)be;
  return host_copy("upload", dst, host, bytes, err);
}

apb_status apb_cpu_download(apb_backend *be, void *host, const void *src, size_t bytes, apb_error *err) {
  (void)be;
  return host_copy("download", host, src, bytes, err);
}

apb_status apb_cpu_copy2d(apb_backend *be, void *dst, size_t dpitch, const void *src, size_t spitch,
                          size_t width, size_t rows, apb_error *err) {
  (void)be;
  if (width == 0 || rows == 0) return APB_OK;
  apb_status st = apb_bc_copy2d(err, dst, dpitch, src, spitch, width, rows);
  if (st) return st;
  for (size_t r = 0; r < rows; r++) memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
  return APB_OK;
}

apb_status apb_cpu_upload_f32(apb_backend *be, void *dst, const float *host, size_t n, apb_error *err) {
  if (n > SIZE_MAX / sizeof(float))
    return apb_error_set(err, APB_EINVAL, "upload_f32: n=%zu elements is too large", n);
  apb_status st = host_copy("upload_f32", dst, host, n * sizeof(float), err);
  if (st == APB_OK) apb_cpu_round(apb_cpu_of(be), dst, n);
  return st;
}

apb_status apb_cpu_download_f32(apb_backend *be, float *host, const void *src, size_t n, apb_error *err) {
  (void)be;
  if (n > SIZE_MAX / sizeof(float))
    return apb_error_set(err, APB_EINVAL, "download_f32: n=%zu elements is too large", n);
  return host_copy("download_f32", host, src, n * sizeof(float), err);
}

apb_status apb_cpu_sync(apb_backend *be, apb_error *err) {
  (void)be, (void)err;
  return APB_OK; /* every CPU op has finished when it returns */
}

apb_status apb_cpu_mark(apb_backend *be, void **m, apb_error *err) {
  (void)be;
  if (!m) return apb_error_set(err, APB_EINVAL, "mark: m is NULL");
  double *t = malloc(sizeof *t);
  if (!t) return apb_error_set(err, APB_ENOMEM, "mark: out of host memory");
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  *t = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
  *m = t;
  return APB_OK;
}

apb_status apb_cpu_mark_elapsed(apb_backend *be, void *a, void *b, double *seconds, apb_error *err) {
  (void)be;
  if (!a || !b) return apb_error_set(err, APB_EINVAL, "mark_elapsed: %s mark is NULL", !a ? "the first" : "the second");
  if (!seconds) return apb_error_set(err, APB_EINVAL, "mark_elapsed: seconds is NULL");
  *seconds = *(const double *)b - *(const double *)a;
  return APB_OK;
}

void apb_cpu_mark_free(apb_backend *be, void *m) {
  (void)be;
  free(m);
}

/* ---------------------------------------------------------------- weights */

apb_status apb_cpu_weight_create(apb_backend *be, const float *w, int64_t N, int64_t K, const float *bias,
                                 apb_bweight **out, apb_error *err) {
  const char *op = "weight_create";
  apb_status st;
  if ((st = apb_bc_need(err, op, "out", out))) return st;
  *out = NULL;
  if ((st = apb_bc_need(err, op, "w", w)) || (st = apb_bc_len(err, op, "N", N, 1)) ||
      (st = apb_bc_len(err, op, "K", K, 1)))
    return st;
  if (N > INT64_MAX / 8 / K)
    return apb_error_set(err, APB_EINVAL, "%s: [%lld, %lld] is too large", op, (long long)N, (long long)K);
  apb_cpu *c = apb_cpu_of(be);
  apb_bweight *bw = calloc(1, sizeof *bw);
  if (!bw) return apb_error_set(err, APB_ENOMEM, "%s: cannot allocate the weight descriptor", op);
  bw->N = N, bw->K = K, bw->w = w, bw->b = bias;
  if (c->emulate_bf16) { /* bf16 storage: a rounded copy (apb/backend.h) */
    const size_t nw = (size_t)N * (size_t)K, nb = bias ? (size_t)N : 0;
    bw->bytes = (nw + nb) * sizeof(float);
    bw->own = aligned_block(bw->bytes);
    if (!bw->own) {
      free(bw);
      return apb_error_set(err, APB_ENOMEM, "%s: cannot allocate %zu bytes for the bf16 copy of [%lld, %lld]", op,
                           (nw + nb) * sizeof(float), (long long)N, (long long)K);
    }
    memcpy(bw->own, w, nw * sizeof(float));
    if (bias) memcpy(bw->own + nw, bias, nb * sizeof(float));
    apb_cpu_round(c, bw->own, nw + nb);
    bw->w = bw->own;
    bw->b = bias ? bw->own + nw : NULL;
    count_add(c, bw->bytes);
  }
  *out = bw;
  return APB_OK;
}

void apb_cpu_weight_destroy(apb_backend *be, apb_bweight *w) {
  if (!w) return;
  if (w->own) {
    free(w->own);
    count_sub(apb_cpu_of(be), w->bytes);
  }
  free(w);
}

/* ---------------------------------------------------------------- merge (APB.md 4) */

apb_status apb_cpu_merge(apb_backend *be, int n, const void *const *o_parts, const float *const *lse_parts,
                         int64_t T, int Hq, int D, void *o, float *lse, apb_error *err) {
  apb_status st = apb_attn_merge(n, (const float *const *)o_parts, lse_parts, T, Hq, D, o, lse, err);
  if (st == APB_OK && T > 0) apb_cpu_round(apb_cpu_of(be), o, (size_t)T * (size_t)Hq * (size_t)D);
  return st;
}

/* ---------------------------------------------------------------- maxpool (APB.md 3.2) */

apb_status apb_cpu_maxpool(apb_backend *be, const float *s, int R, int64_t T, int w, float *out,
                           apb_error *err) {
  apb_status st = apb_bc_maxpool(err, s, R, T, w, out);
  if (st || R == 0 || T == 0) return st;
  const int64_t half = w / 2, n = (int64_t)R * T;
  const int nth = apb_cpu_threads(apb_cpu_of(be));
#pragma omp parallel for num_threads(nth) schedule(static) if (n > 32768)
  for (int64_t e = 0; e < n; e++) {
    const int64_t r = e / T, t = e % T;
    const int64_t t0 = t - half < 0 ? 0 : t - half, t1 = t + half > T - 1 ? T - 1 : t + half;
    const float *row = s + r * T;
    float m = -INFINITY;
    for (int64_t u = t0; u <= t1; u++) {
      const float v = row[u];
      if (isnan(v)) { /* propagate, so that topk reports it instead of selecting around it */
        m = v;
        break;
      }
      if (v > m) m = v;
    }
    out[e] = m;
  }
  return APB_OK;
}

/* ---------------------------------------------------------------- top-k (APB.md 3.4) */

/* The 64-bit key of (score x, position t): ascending keys = score descending, then t ascending. */
static uint64_t topk_key(float x, int64_t t) {
  if (x == 0.0f) x = 0.0f; /* -0 ties +0 */
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* order-preserving map to unsigned */
  return ((uint64_t)(uint32_t)~u << 32) | (uint64_t)(uint32_t)t;
}

static int cmp_u64(const void *a, const void *b) {
  const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

apb_status apb_cpu_topk(apb_backend *be, const float *s, int R, int64_t T, int64_t lo, int64_t k, int32_t *idx,
                        apb_error *err) {
  const char *op = "topk";
  apb_status st = apb_bc_topk(err, s, R, T, lo, k);
  if (st || R == 0 || T == lo) return st;
  for (int r = 0; r < R; r++) /* serial, so that the first NaN reported is always the same one */
    for (int64_t t = lo; t < T; t++)
      if (isnan(s[(int64_t)r * T + t]))
        return apb_error_set(err, APB_ENONFINITE, "%s: score[%d, %lld] is NaN; NaN scores are never selected", op,
                             r, (long long)t);
  if (k == 0) return APB_OK;
  if ((st = apb_bc_need(err, op, "idx", idx))) return st;
  const int64_t n = T - lo;
  if (k == n) { /* everything is selected (APB.md 3.4: fewer eligible tokens than l_p) */
    for (int r = 0; r < R; r++)
      for (int64_t i = 0; i < n; i++) idx[(int64_t)r * k + i] = (int32_t)(lo + i);
    return APB_OK;
  }
  apb_cpu *c = apb_cpu_of(be);
  int nth = apb_cpu_threads(c);
  if (nth > R) nth = R;
  void *buf;
  const size_t per = (size_t)n * sizeof(uint64_t);
  if ((st = apb_cpu_scratch(c, per * (size_t)nth, op, &buf, err))) return st;
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int r = 0; r < R; r++) {
    uint64_t *key = (uint64_t *)((char *)buf + per * (size_t)omp_get_thread_num());
    const float *row = s + (int64_t)r * T;
    for (int64_t t = lo; t < T; t++) key[t - lo] = topk_key(row[t], t);
    qsort(key, (size_t)n, sizeof *key, cmp_u64);
    const uint64_t thr = key[k - 1];
    int32_t *dst = idx + (int64_t)r * k;
    int64_t m = 0;
    for (int64_t t = lo; t < T; t++)
      if (topk_key(row[t], t) <= thr) dst[m++] = (int32_t)t;
  }
  apb_cpu_scratch_free(c, buf, per * (size_t)nth);
  return APB_OK;
}

/* ---------------------------------------------------------------- gather (APB.md 3.4) */

apb_status apb_cpu_gather(apb_backend *be, const void *x, int64_t T, int H, int D, const int32_t *idx, int64_t k,
                          void *out, apb_error *err) {
  const char *op = "gather";
  apb_status st;
  if ((st = apb_bc_len(err, op, "T", T, 0)) || (st = apb_bc_len(err, op, "H", H, 1)) ||
      (st = apb_bc_len(err, op, "D", D, 1)) || (st = apb_bc_len(err, op, "k", k, 0)))
    return st;
  if (k == 0) return APB_OK;
  const int64_t HD = (int64_t)H * D;
  if (k > INT64_MAX / 4 / HD || T > INT64_MAX / 4 / HD)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (T=%lld, k=%lld, H=%d, D=%d)", op, (long long)T,
                         (long long)k, H, D);
  if ((st = apb_bc_need(err, op, "x", x)) || (st = apb_bc_need(err, op, "idx", idx)) ||
      (st = apb_bc_need(err, op, "out", out)) ||
      (st = apb_bc_disjoint(err, op, "out", out, (size_t)(k * HD) * sizeof(float), "x", x,
                             (size_t)(T * HD) * sizeof(float))))
    return st;
  for (int h = 0; h < H; h++)
    for (int64_t i = 0; i < k; i++) {
      const int32_t t = idx[(int64_t)h * k + i];
      if (t < 0 || t >= T)
        return apb_error_set(err, APB_EINVAL, "%s: idx[%d, %lld]=%d is out of [0, T=%lld)", op, h, (long long)i,
                             (int)t, (long long)T);
    }
  apb_cpu *c = apb_cpu_of(be);
  const float *xs = x;
  float *os = out;
  const int nth = apb_cpu_threads(c);
#pragma omp parallel for num_threads(nth) schedule(static) if (k * HD > 65536)
  for (int64_t i = 0; i < k; i++)
    for (int h = 0; h < H; h++) {
      const int64_t t = idx[(int64_t)h * k + i];
      memcpy(os + (i * H + h) * D, xs + (t * H + h) * D, (size_t)D * sizeof(float));
    }
  apb_cpu_round(c, os, (size_t)(k * HD));
  return APB_OK;
}
