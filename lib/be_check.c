/* lib/be_check.c: see be_check.h. */
#include "be_check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

apb_status apb_bc_need(apb_error *err, const char *op, const char *arg, const void *p) {
  if (p) return APB_OK;
  return apb_error_set(err, APB_EINVAL, "%s: %s is NULL", op, arg);
}

apb_status apb_bc_len(apb_error *err, const char *op, const char *arg, int64_t v, int64_t lo) {
  if (v >= lo) return APB_OK;
  return apb_error_set(err, APB_EINVAL, "%s: %s=%lld must be >= %lld", op, arg, (long long)v, (long long)lo);
}

apb_status apb_bc_disjoint(apb_error *err, const char *op, const char *an, const void *a, size_t na, const char *bn,
                           const void *b, size_t nb) {
  if (!a || !b || na == 0 || nb == 0) return APB_OK;
  uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
  if (na > UINTPTR_MAX - a0 || nb > UINTPTR_MAX - b0) /* no buffer runs past the end of memory */
    return apb_error_set(err, APB_EINVAL, "%s: %s [%p, +%zu bytes) or %s [%p, +%zu bytes) runs past the end of the "
                         "address space", op, an, a, na, bn, b, nb);
  if (a0 < b0 + nb && b0 < a0 + na)
    return apb_error_set(err, APB_EINVAL, "%s: %s [%p, +%zu bytes) overlaps %s [%p, +%zu bytes)", op, an, a, na, bn,
                         b, nb);
  return APB_OK;
}

/* floor(a / b) for b > 0. */
static int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

apb_status apb_bc_copy2d(apb_error *err, const void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                         size_t rows) {
  const char *op = "copy2d";
  apb_status st;
  if ((st = apb_bc_need(err, op, "dst", dst)) || (st = apb_bc_need(err, op, "src", src))) return st;
  if (width > dpitch || width > spitch)
    return apb_error_set(err, APB_EINVAL, "%s: width=%zu exceeds a pitch (dpitch=%zu, spitch=%zu)", op, width,
                         dpitch, spitch);
  const size_t maxp = dpitch > spitch ? dpitch : spitch;
  if (rows > (size_t)INT64_MAX / 4 / maxp)
    return apb_error_set(err, APB_EINVAL, "%s: %zu rows of pitch %zu is too large", op, rows, maxp);
  /* Overlap: dst row i is [base + i*dpitch, +width) relative to src; src row j is [j*spitch, +width).
   * For each i, the src rows within width of it form one range of j; any j in [0, rows) overlaps. */
  const int64_t span_d = (int64_t)((rows - 1) * dpitch + width), span_s = (int64_t)((rows - 1) * spitch + width);
  if (apb_bc_disjoint(NULL, op, "", dst, (size_t)span_d, "", src, (size_t)span_s) == APB_OK) return APB_OK;
  const int64_t base = (int64_t)((intptr_t)dst - (intptr_t)src), w = (int64_t)width;
  const int64_t sp = (int64_t)spitch, dp = (int64_t)dpitch;
  for (int64_t i = 0; i < (int64_t)rows; i++) {
    const int64_t d0 = base + i * dp;
    int64_t jlo = floordiv(d0 - w, sp) + 1, jhi = floordiv(d0 + w - 1, sp);
    if (jlo < 0) jlo = 0;
    if (jhi > (int64_t)rows - 1) jhi = (int64_t)rows - 1;
    if (jlo <= jhi)
      return apb_error_set(err, APB_EINVAL, "%s: dst row %lld overlaps src row %lld (width %zu, pitches %zu/%zu)", op,
                           (long long)i, (long long)jlo, width, dpitch, spitch);
  }
  return APB_OK;
}

apb_status apb_bc_maxpool(apb_error *err, const float *s, int R, int64_t T, int w, const float *out) {
  const char *op = "maxpool";
  apb_status st;
  if ((st = apb_bc_len(err, op, "R", R, 0)) || (st = apb_bc_len(err, op, "T", T, 0))) return st;
  if (w < 1 || w % 2 == 0)
    return apb_error_set(err, APB_EINVAL, "%s: window w=%d must be odd and >= 1 (w = 1 disables pooling)", op, w);
  if (R == 0 || T == 0) return APB_OK;
  if (T > INT64_MAX / 4 / R)
    return apb_error_set(err, APB_EINVAL, "%s: shape [%d, %lld] is too large", op, R, (long long)T);
  const size_t bytes = (size_t)R * (size_t)T * sizeof(float);
  if ((st = apb_bc_need(err, op, "s", s)) || (st = apb_bc_need(err, op, "out", out))) return st;
  return apb_bc_disjoint(err, op, "out", out, bytes, "s", s, bytes);
}

apb_status apb_bc_weight(apb_error *err, const char *op, const char *arg, int present, int64_t wN, int64_t wK,
                         int64_t N, int64_t K) {
  if (!present) return apb_error_set(err, APB_EINVAL, "%s: weight %s is NULL", op, arg);
  if ((N >= 0 && wN != N) || (K >= 0 && wK != K)) {
    char want_n[32] = "N", want_k[32] = "K";
    if (N >= 0) snprintf(want_n, sizeof want_n, "%lld", (long long)N);
    if (K >= 0) snprintf(want_k, sizeof want_k, "%lld", (long long)K);
    return apb_error_set(err, APB_EINVAL, "%s: weight %s is [%lld, %lld], expected [%s, %s]", op, arg, (long long)wN,
                         (long long)wK, want_n, want_k);
  }
  return APB_OK;
}

apb_status apb_bc_topk(apb_error *err, const float *s, int R, int64_t T, int64_t lo, int64_t k) {
  const char *op = "topk";
  apb_status st;
  if ((st = apb_bc_len(err, op, "R", R, 0)) || (st = apb_bc_len(err, op, "T", T, 0))) return st;
  if (T > INT32_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: T=%lld does not fit the int32 indices", op, (long long)T);
  if (lo < 0 || lo > T)
    return apb_error_set(err, APB_EINVAL, "%s: lo=%lld must be in [0, T=%lld]", op, (long long)lo, (long long)T);
  if (k < 0 || k > T - lo)
    return apb_error_set(err, APB_EINVAL, "%s: k=%lld must be in [0, T - lo] = [0, %lld] (T=%lld, lo=%lld)", op,
                         (long long)k, (long long)(T - lo), (long long)T, (long long)lo);
  if (R == 0 || T == lo) return APB_OK;
  return apb_bc_need(err, op, "s", s);
}

apb_status apb_bc_embed(apb_error *err, int64_t T, const void *ids, const void *out) {
  const char *op = "embed";
  apb_status st = apb_bc_len(err, op, "T", T, 0);
  if (st || T == 0) return st;
  if ((st = apb_bc_need(err, op, "ids", ids))) return st;
  return apb_bc_need(err, op, "out", out);
}

apb_status apb_bc_rmsnorm(apb_error *err, float eps, int64_t T, int64_t E, size_t es, const void *x, const void *y) {
  const char *op = "rmsnorm";
  apb_status st = apb_bc_len(err, op, "T", T, 0);
  if (st) return st;
  if (E < 1 || T > INT64_MAX / 8 / E)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large or empty (T=%lld, E=%lld)", op, (long long)T,
                         (long long)E);
  /* eps = 0 would turn an all-zero row into 0 * inf = NaN (apb_config_check asks for a positive one too) */
  if (!isfinite(eps) || !(eps > 0))
    return apb_error_set(err, APB_EINVAL, "%s: eps=%g must be finite and > 0", op, (double)eps);
  if (T == 0) return APB_OK;
  if ((st = apb_bc_need(err, op, "x", x)) || (st = apb_bc_need(err, op, "y", y))) return st;
  if (x == y) return APB_OK; /* in place */
  const size_t bytes = (size_t)(T * E) * es;
  return apb_bc_disjoint(err, op, "y", y, bytes, "x", x, bytes);
}

apb_status apb_bc_linear(apb_error *err, int64_t T, int64_t N, int64_t K, size_t es, const void *x, const void *y) {
  const char *op = "linear";
  apb_status st;
  if ((st = apb_bc_len(err, op, "T", T, 0)) || T == 0) return st;
  if (T > INT64_MAX / 8 / (N > K ? N : K))
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (T=%lld, weight [%lld, %lld])", op, (long long)T,
                         (long long)N, (long long)K);
  if ((st = apb_bc_need(err, op, "x", x)) || (st = apb_bc_need(err, op, "y", y))) return st;
  return apb_bc_disjoint(err, op, "y", y, (size_t)(T * N) * es, "x", x, (size_t)(T * K) * es);
}

apb_status apb_bc_swiglu(apb_error *err, int64_t T, int64_t F, const void *gu, const void *out, size_t es) {
  const char *op = "swiglu";
  apb_status st;
  if ((st = apb_bc_len(err, op, "T", T, 0)) || (st = apb_bc_len(err, op, "F", F, 1)) || T == 0) return st;
  if (F > INT64_MAX / 8 || T > INT64_MAX / 8 / F)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (T=%lld, F=%lld)", op, (long long)T, (long long)F);
  if ((st = apb_bc_need(err, op, "gu", gu)) || (st = apb_bc_need(err, op, "out", out))) return st;
  return apb_bc_disjoint(err, op, "out", out, (size_t)(T * F) * es, "gu", gu, (size_t)(T * 2 * F) * es);
}

apb_status apb_bc_add(apb_error *err, size_t n, const void *y, const void *x) {
  apb_status st;
  if (n == 0) return APB_OK;
  if ((st = apb_bc_need(err, "add", "y", y))) return st;
  return apb_bc_need(err, "add", "x", x);
}

apb_status apb_bc_split_rope(apb_error *err, const void *qkv, int64_t T, int Hq, int Hkv, int D, const void *pos,
                             const apb_rope *rope, const void *q, const void *k, const void *v, size_t es,
                             double **inv_freq) {
  const char *op = "split_rope";
  apb_status st;
  *inv_freq = NULL;
  if ((st = apb_bc_len(err, op, "T", T, 0)) || (st = apb_bc_len(err, op, "Hq", Hq, 1)) ||
      (st = apb_bc_len(err, op, "Hkv", Hkv, 1)) || (st = apb_bc_need(err, op, "rope", rope)))
    return st;
  if (D < 2 || D % 2)
    return apb_error_set(err, APB_EINVAL, "%s: head dim D=%d must be even and >= 2 (rotate-half)", op, D);
  if (rope->type != APB_ROPE_DEFAULT && rope->type != APB_ROPE_LINEAR && rope->type != APB_ROPE_LLAMA3)
    return apb_error_set(err, APB_EINVAL, "%s: rope type %d is not default (0), linear (1) or llama3 (2)", op,
                         (int)rope->type);
  /* (Hq + 2 Hkv) < 2^33 and D < 2^31: the product fits below 2^64 only when checked */
  if (((int64_t)Hq + 2 * (int64_t)Hkv) > INT64_MAX / 4 / D)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (Hq=%d, Hkv=%d, D=%d)", op, Hq, Hkv, D);
  const int64_t QKV = ((int64_t)Hq + 2 * (int64_t)Hkv) * D;
  if (T > INT64_MAX / 4 / QKV)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (T=%lld, Hq=%d, Hkv=%d, D=%d)", op, (long long)T,
                         Hq, Hkv, D);
  if (T > 0) {
    if ((st = apb_bc_need(err, op, "qkv", qkv)) || (st = apb_bc_need(err, op, "pos", pos)) ||
        (st = apb_bc_need(err, op, "q", q)) || (st = apb_bc_need(err, op, "k", k)) ||
        (st = apb_bc_need(err, op, "v", v)))
      return st;
    const size_t bq = (size_t)T * Hq * D * es, bk = (size_t)T * Hkv * D * es, bx = (size_t)T * QKV * es;
    if ((st = apb_bc_disjoint(err, op, "q", q, bq, "qkv", qkv, bx)) ||
        (st = apb_bc_disjoint(err, op, "k", k, bk, "qkv", qkv, bx)) ||
        (st = apb_bc_disjoint(err, op, "v", v, bk, "qkv", qkv, bx)) ||
        (st = apb_bc_disjoint(err, op, "q", q, bq, "k", k, bk)) ||
        (st = apb_bc_disjoint(err, op, "q", q, bq, "v", v, bk)) ||
        (st = apb_bc_disjoint(err, op, "k", k, bk, "v", v, bk)))
      return st;
  }
  double *f = malloc((size_t)(D / 2) * sizeof *f);
  if (!f) return apb_error_set(err, APB_ENOMEM, "%s: cannot allocate %d inverse frequencies", op, D / 2);
  apb_rope_inv_freq(rope, D, f);
  for (int i = 0; i < D / 2; i++)
    if (!isfinite(f[i]) || f[i] < 0) {
      const double bad = f[i];
      free(f);
      return apb_error_set(err, APB_EINVAL, "%s: inverse frequency %d of %d is %g (rope theta=%g, type %d)", op, i,
                           D / 2, bad, rope->theta, (int)rope->type);
    }
  *inv_freq = f;
  return APB_OK;
}
