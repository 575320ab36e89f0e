/* ref/attn_naive.c: the oracle for APB's segmented attention on one host (shared/APB.md 3.6, 7), and
 * the helpers shared by both CPU paths: argument validation, the scale, and the FLOP count.
 *
 * What it is: the definition. For every query row and query head it forms the scores against exactly
 * the keys that apb/attn.h's visibility rule lets the row see, accumulates every dot product and every
 * softmax sum in double, and runs the softmax in two passes (max first, then exp and sums). Keys are
 * visited in the order [P | A | B]. Output is fp32, rounded once at the end.
 *
 * What it deliberately is not: fast. No tiles, no BLAS, no threads, no online softmax. It holds one
 * row's scores at a time ([P+A+B] doubles), never a [rows x keys] matrix, so it can still check long
 * inputs, just slowly.
 *
 * Tested in tests/check_attn.c: hand-worked cases with closed-form answers (one key, two keys, equal
 * scores, a row with no visible key, GQA head mapping, huge scores), the invariants of APB.md 6, and as
 * the reference that apb_attn_fast (ref/attn_fast.c) is swept against.
 */
#include "apb/attn.h"

#include <math.h>
#include <stdlib.h>

apb_status apb_attn_validate(const apb_attn_args *a, apb_error *err) {
  if (!a) return apb_error_set(err, APB_EINVAL, "attn: args is NULL");
  if (a->P < 0 || a->A < 0 || a->B < 0)
    return apb_error_set(err, APB_EINVAL, "attn: negative length (P=%lld, A=%lld, B=%lld); all must be >= 0",
                         (long long)a->P, (long long)a->A, (long long)a->B);
  if (a->Hq < 1 || a->Hkv < 1)
    return apb_error_set(err, APB_EINVAL, "attn: head counts must be >= 1 (Hq=%d, Hkv=%d)", a->Hq, a->Hkv);
  if (a->Hq % a->Hkv != 0)
    return apb_error_set(err, APB_EINVAL,
                         "attn: Hq=%d is not a multiple of Hkv=%d (GQA needs Hq %% Hkv == 0)", a->Hq, a->Hkv);
  if (a->D < 1) return apb_error_set(err, APB_EINVAL, "attn: head dim D=%d must be >= 1", a->D);
  if (a->local_keys != 0 && a->local_keys != 1)
    return apb_error_set(err, APB_EINVAL, "attn: local_keys=%d must be 0 or 1", a->local_keys);
  if (!isfinite(a->scale) || a->scale < 0)
    return apb_error_set(err, APB_EINVAL, "attn: scale=%g must be finite and >= 0 (0 means 1/sqrt(D))",
                         (double)a->scale);
  /* Every element index below is computed in int64_t: make sure the largest one fits. */
  const int64_t big = INT64_MAX / 4;
  int64_t hd = (int64_t)a->Hq * a->D;
  if (a->P > big || a->A > big || a->B > big || a->A + a->B > big / hd || a->P + a->A + a->B > big / hd)
    return apb_error_set(err, APB_EINVAL, "attn: shape too large (P=%lld, A=%lld, B=%lld, Hq=%d, D=%d)",
                         (long long)a->P, (long long)a->A, (long long)a->B, a->Hq, a->D);
  int64_t T = a->A + a->B;
  if (T > 0 && !a->q)
    return apb_error_set(err, APB_EINVAL, "attn: q is NULL but A+B=%lld rows", (long long)T);
  if (T > 0 && !a->o)
    return apb_error_set(err, APB_EINVAL, "attn: o is NULL but A+B=%lld rows", (long long)T);
  if (a->P > 0 && (!a->kp || !a->vp))
    return apb_error_set(err, APB_EINVAL, "attn: %s is NULL but P=%lld passing keys", !a->kp ? "kp" : "vp",
                         (long long)a->P);
  if (a->A > 0 && (!a->ka || !a->va))
    return apb_error_set(err, APB_EINVAL, "attn: %s is NULL but A=%lld anchor keys", !a->ka ? "ka" : "va",
                         (long long)a->A);
  if (a->B > 0 && a->local_keys && (!a->kb || !a->vb))
    return apb_error_set(err, APB_EINVAL, "attn: %s is NULL but B=%lld local keys (local_keys=1)",
                         !a->kb ? "kb" : "vb", (long long)a->B);
  return APB_OK;
}

float apb_attn_scale(const apb_attn_args *a) {
  return a->scale != 0.0f ? a->scale : (float)(1.0 / sqrt((double)a->D));
}

double apb_attn_flops(const apb_attn_args *a) {
  double A = (double)a->A, B = (double)a->B, P = (double)a->P;
  double pairs = A * (A + 1) / 2 + B * (P + A) + (a->local_keys ? B * (B + 1) / 2 : 0.0);
  return 4.0 * pairs * a->D * a->Hq;
}

/* One key segment as the oracle sees it: n keys at k/v [n, Hkv, D]. */
typedef struct seg {
  const float *k, *v;
  int64_t n;
} seg;

apb_status apb_attn_naive(const apb_attn_args *a, apb_error *err) {
  apb_status st = apb_attn_validate(a, err);
  if (st != APB_OK) return st;
  const int64_t P = a->P, A = a->A, B = a->B, T = A + B;
  const int Hq = a->Hq, Hkv = a->Hkv, D = a->D, G = Hq / Hkv;
  const double scale = (double)apb_attn_scale(a);
  if (T == 0) return APB_OK;

  double *s = malloc((size_t)(P + A + B + 1) * sizeof *s); /* [keys] one row's scores */
  double *acc = malloc((size_t)D * sizeof *acc);           /* [D] one row's output */
  if (!s || !acc) {
    free(s), free(acc);
    return apb_error_set(err, APB_ENOMEM, "attn_naive: cannot allocate %lld scores",
                         (long long)(P + A + B + 1));
  }

  for (int64_t r = 0; r < T; r++) {
    /* APB.md 3.6: the segments row r sees, in key order [P | A | B]. */
    seg segs[3];
    int nseg = 0;
    if (r < A) {
      segs[nseg++] = (seg){a->ka, a->va, r + 1};
    } else {
      int64_t j = r - A;
      segs[nseg++] = (seg){a->kp, a->vp, P};
      segs[nseg++] = (seg){a->ka, a->va, A};
      segs[nseg++] = (seg){a->kb, a->vb, a->local_keys ? j + 1 : 0};
    }
    for (int h = 0; h < Hq; h++) {
      const int hk = h / G;
      const float *qr = a->q + (r * Hq + h) * (int64_t)D;
      float *orow = a->o + (r * Hq + h) * (int64_t)D;

      /* Pass 1: scores and their max. */
      int64_t n = 0;
      double mx = -INFINITY;
      int nan = 0;
      for (int g = 0; g < nseg; g++)
        for (int64_t t = 0; t < segs[g].n; t++) {
          const float *kr = segs[g].k + (t * Hkv + hk) * (int64_t)D;
          double dot = 0;
          for (int d = 0; d < D; d++) dot += (double)qr[d] * (double)kr[d];
          s[n] = dot * scale;
          if (s[n] > mx) mx = s[n];
          nan |= isnan(s[n]);
          n++;
        }

      /* no visible key, or every score -inf (each weighs nothing, and exp(-inf - -inf) would be NaN):
       * o = 0, lse = -inf (apb/attn.h) */
      if (n == 0 || (mx == -INFINITY && !nan)) {
        for (int d = 0; d < D; d++) orow[d] = 0.0f;
        if (a->lse) a->lse[(int64_t)h * T + r] = -INFINITY;
        continue;
      }

      /* Pass 2: exp, sum, weighted sum of values. */
      for (int d = 0; d < D; d++) acc[d] = 0;
      double sum = 0;
      n = 0;
      for (int g = 0; g < nseg; g++)
        for (int64_t t = 0; t < segs[g].n; t++) {
          const float *vr = segs[g].v + (t * Hkv + hk) * (int64_t)D;
          double p = exp(s[n++] - mx);
          sum += p;
          for (int d = 0; d < D; d++) acc[d] += p * (double)vr[d];
        }
      for (int d = 0; d < D; d++) orow[d] = (float)(acc[d] / sum);
      if (a->lse) a->lse[(int64_t)h * T + r] = (float)(mx + log(sum));
    }
  }
  free(s);
  free(acc);
  return APB_OK;
}
