/* ref/attn_fast.c: the fast CPU path of APB's segmented attention (shared/APB.md 3.6, 6, 7).
 *
 * What it is: the same function as apb_attn_naive (ref/attn_naive.c), computed by tiles.
 *   - Tasks are (KV head, row tile). Anchor rows and local rows are tiled separately, because they see
 *     different key segments (APB.md 3.6). The Hq/Hkv query heads of a GQA group are stacked into one
 *     tile of M = G*nr rows, so that they share every K/V tile: the tile's Q is [G, nr, D].
 *   - For each key tile: S = (scale*Q) K^T by cblas_sgemm straight from the strided K rows, an online
 *     softmax update in fp32 (running max m, running sum l, rescale of the accumulator by
 *     exp(m_old - m_new)), then O += S V by cblas_sgemm with beta = 1.
 *   - Keys are visited segment by segment ([P | A | B], the oracle's order). Within a segment the part
 *     every row of the tile sees is cut into full tiles of APB_KT keys with no mask at all; the causal
 *     part (at most nr - 1 keys, the triangle) is one boundary tile where each row keeps a prefix of the
 *     keys, masked per element (APB.md 8: per element, never per tile). Keys no row of the tile sees
 *     are never touched. When a value row of a boundary tile holds an Inf or NaN, that tile's O += S V
 *     is summed by hand over each row's own prefix (the product would form 0 * Inf = NaN in rows that
 *     do not see that key).
 *   - Buffers are per thread, sized by the tile (Q, S, O: M x APB_KT at most), never [rows x keys].
 *
 * Determinism (APB.md 6): every task is computed by the same code on the same data whichever thread
 * runs it, with OpenBLAS held at one thread and per-thread buffers aligned to 64 bytes with padded
 * rows (so that vector loops see the same alignment), and every output element is written by exactly
 * one task. Hence the result is bitwise identical for any OpenMP thread count and on every run. The
 * schedule (dynamic, heaviest tasks first) only changes which thread runs a task.
 *
 * OpenBLAS threads. The Debian build is the pthread one: an sgemm called from inside our OpenMP region
 * would start OpenBLAS threads of its own (oversubscription, and thread-count-dependent blocking). So
 * OpenBLAS is set to one thread for the duration and restored afterwards. That setting is process-wide
 * inside OpenBLAS, so it is held with one count shared by every caller in ref/ (ref/blas_hold.c):
 * concurrent callers (simulated hosts on threads) restore it only when the last one leaves. This is
 * the one piece of global state here, and it mirrors OpenBLAS's own.
 *
 * What it deliberately is not: a general FlashAttention (no dropout, no bias, no arbitrary masks), or
 * tuned per CPU: one set of tile sizes, exp by a short polynomial that the compiler vectorizes.
 *
 * Tested in tests/check_attn.c: sweeps against the oracle (rows 1, 97, 113, 1023, 1025; D 64, 80, 96,
 * 128; GQA 1, 2, 4, 8; P, A in {0, 1, some}; local_keys 0/1), the invariants of APB.md 6, bitwise
 * identity for 1, 2 and 3 threads and across repeated runs. Performance: docs/tolerances.md.
 */
#include "apb/attn.h"
#include "blas_hold.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
  APB_KT = 256,   /* keys per full key tile */
  APB_MT = 512,   /* target rows (G heads x nr rows) per tile */
  APB_ALIGN = 64, /* bytes; every buffer row starts on this boundary */
  VL = 16,        /* lanes of the softmax loops; rows of S are padded to a multiple of VL */
};

/* Leading dimension of a [.., n] float buffer: n rounded up to a 64-byte multiple. */
static int pad16(int n) { return (n + 15) / 16 * 16; }

/* ---------------------------------------------------------------- exp for x <= 0
 * e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two
 * parts so that n*LN2_HI is exact for |n| < 2^9), and e^r by its Taylor series to degree 7 (truncation
 * below 8e-9 relative). n is rounded by adding 1.5*2^23, whose float ulp is 1, and read back from the
 * low bits. Measured against double exp over [-87, 0]: at most 1.0e-7 relative (0.84 ulp), from the
 * fp32 rounding of the Horner steps. Arguments below -87 (e^x < 2^-125, which vanishes against the
 * running sum, >= 1) give 0; that also keeps 2^n a normal number. Arguments above 0 (only in lanes
 * that are masked afterwards) are taken as 0. No branches and no calls, so that the loops below
 * vectorize; deterministic for a given build. */
typedef union fbits {
  float f;
  uint32_t u;
  int32_t i;
} fbits; /* type punning through a union, as C11 allows */

static inline float exp_nonpos(float x) {
  const float LOG2E = 1.44269504088896341f, LN2_HI = 0.693145751953125f, LN2_LO = 1.42860682030941723e-6f;
  const float SHIFT = 12582912.0f;           /* 1.5 * 2^23, bit pattern 0x4b400000 */
  const int32_t NEG87 = (int32_t)0xc2ae0000; /* bit pattern of -87.0f, read as int32 */
  fbits xc = {x}, t, e;
  /* Clamp to [-87, 0] in the integer domain (a float comparison here would let the compiler split the
   * loop into branches, since a comparison may trap, and that stops vectorization). Read as int32, the
   * pattern of x >= +0 is >= 0, and a negative x is below -87 (or -inf) exactly when its pattern is
   * above NEG87 (both negative: larger magnitude, larger pattern). */
  const int32_t keep = -(int32_t)(xc.i < 0);             /* all ones unless x >= +0 */
  const int32_t under = -(int32_t)(xc.i > NEG87) & keep; /* all ones when x < -87 */
  xc.i = (xc.i & keep & ~under) | (NEG87 & under);
  t.f = xc.f * LOG2E + SHIFT;
  float n = t.f - SHIFT;
  float r = xc.f - n * LN2_HI;
  r = r - n * LN2_LO;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  e.u = (uint32_t)(t.i - 0x4b400000 + 127) << 23; /* 2^n, n in [-126, 0] */
  e.i &= ~under;                                  /* below -87: 2^n = 0, so the product is 0 */
  return p * e.f;
}

/* ---------------------------------------------------------------- one task */

/* Fixed description of the whole call, shared read-only by every task. */
typedef struct plan {
  const apb_attn_args *a;
  int64_t T; /* A + B rows */
  int G;     /* query heads per KV head */
  int R;     /* rows per head per tile */
  int ldq, lds, ldo;
  int64_t kstride; /* Hkv * D: distance between consecutive keys of one head */
  float scale;
} plan;

/* One thread's buffers: M = G*R rows. */
typedef struct work {
  float *q;     /* [M, ldq] scaled queries, head-major: row g*nr + i is head g, tile row i */
  float *s;     /* [M, lds] scores, then probabilities, of one key tile */
  float *o;     /* [M, ldo] unnormalized output accumulator */
  float *m, *l; /* [M] running max and running sum */
} work;

/* GCC builds the softmax loops below once per listed instruction set (AVX-512, AVX2, baseline) and
 * picks one at load time; other compilers build the baseline only. The loops are elementwise or
 * reduce in a fixed lane order (VL lanes whatever the vector width), and the ISO C mode of AM_CFLAGS
 * does not contract a*b+c into an FMA, so the clones even agree with each other; in any case one
 * machine always runs the same clone, whatever the thread count. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define APB_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#ifndef APB_VEC_CLONES
#define APB_VEC_CLONES
#endif

/* Online softmax update of the M = G*nr rows of a key tile whose scores are in w->s [M, lds] (APB.md
 * 3.6; the update of FlashAttention): rows keep a prefix of cnt keys, cnt = nk for every row unless
 * `partial`, where tile row ri keeps vis0 + ri - k0 keys (clamped to [0, nk]). Replaces the scores by
 * probabilities exp(s - m_new), zero past the prefix up to column nkv, rescales the accumulator and
 * the running sum by exp(m_old - m_new). */
APB_VEC_CLONES
static void softmax_update(work *w, int M, int nr, int D, int lds, int ldo, int nk, int nkv, int partial,
                           int64_t vis0, int64_t k0) {
  for (int i = 0; i < M; i++) {
    float *s = w->s + (int64_t)i * lds;
    int cnt = nk;
    if (partial) {
      int64_t c = vis0 + i % nr - k0;
      cnt = c < 0 ? 0 : c > nk ? nk : (int)c;
    }
    /* Fixed-length chunks of VL lanes (rows of S are padded to a multiple of VL), so that the compiler
     * vectorizes with no scalar remainder; lane results are folded in a fixed order. */
    const int nch = (cnt + VL - 1) / VL;
    float lane[VL];
    int32_t nan[VL];
    for (int jj = 0; jj < VL; jj++) lane[jj] = -INFINITY, nan[jj] = 0;
    for (int c = 0; c < nch; c++)
      for (int jj = 0; jj < VL; jj++) {
        float x = s[c * VL + jj];
        x = c * VL + jj < cnt ? x : -INFINITY;
        lane[jj] = x > lane[jj] ? x : lane[jj];
        nan[jj] |= x != x;
      }
    float tmax = -INFINITY;
    int32_t any_nan = 0;
    for (int jj = 0; jj < VL; jj++) tmax = lane[jj] > tmax ? lane[jj] : tmax, any_nan |= nan[jj];
    /* A NaN score (NaN in q or k) would vanish from the max and from exp_nonpos: poison the row's sum
     * instead, so that its o and lse come out NaN, as the oracle's do (APB.md 7: NaN never passes).
     * The same for a score of +inf, where the oracle meets inf - inf. */
    if (any_nan || tmax == INFINITY) w->l[i] = NAN; /* +inf: inf - inf, undefined as in the oracle */
    float mold = w->m[i], mnew = tmax > mold ? tmax : mold;
    if (mnew == -INFINITY) { /* this row has seen no key yet */
      for (int j = 0; j < nkv; j++) s[j] = 0.0f;
      continue;
    }
    for (int jj = 0; jj < VL; jj++) lane[jj] = 0.0f;
    for (int c = 0; c < nch; c++)
      for (int jj = 0; jj < VL; jj++) {
        fbits p = {exp_nonpos(s[c * VL + jj] - mnew)};
        p.i &= -(int32_t)(c * VL + jj < cnt); /* keys past the row's prefix get p = 0 */
        s[c * VL + jj] = p.f;
        lane[jj] += p.f;
      }
    float sum = 0.0f;
    for (int jj = 0; jj < VL; jj++) sum += lane[jj];
    for (int j = nch * VL; j < nkv; j++) s[j] = 0.0f;
    if (mold != mnew) {
      float alpha = exp_nonpos(mold - mnew); /* 0 when mold = -inf: nothing to rescale yet */
      float *o = w->o + (int64_t)i * ldo;
      for (int d = 0; d < D; d++) o[d] *= alpha;
      w->l[i] *= alpha;
      w->m[i] = mnew;
    }
    w->l[i] += sum;
  }
}

/* 1 when every element of n value rows (D floats each, kstride apart) is finite. */
static int rows_finite(const float *v, int64_t kstride, int n, int D) {
  int32_t bad = 0;
  for (int j = 0; j < n; j++)
    for (int d = 0; d < D; d++) {
      fbits b = {v[j * kstride + d]};
      bad |= (b.u & 0x7f800000u) == 0x7f800000u; /* Inf or NaN */
    }
  return !bad;
}

/* One key tile: keys [k0, k0+nk) of a segment (k, v point at key 0 of the KV head, keys kstride
 * apart). Tile row i (head g = i / nr, tile row ri = i % nr) sees the first
 * min(nk, vis0 + causal*ri - k0) keys of the tile; vis0 is the visible count for tile row 0. */
static void key_tile(const plan *pl, work *w, int nr, const float *k, const float *v, int64_t k0, int nk,
                     int64_t vis0, int causal) {
  const int M = pl->G * nr, D = pl->a->D;
  int partial = causal && vis0 < k0 + nk; /* a boundary tile: some row does not see every key */
  int nkv = nk;                           /* keys that the PV product needs */
  if (partial) {
    int64_t last = vis0 + (nr - 1) - k0;
    nkv = last < nk ? (int)last : nk;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, nk, D, 1.0f, w->q, pl->ldq, k + k0 * pl->kstride,
              (int)pl->kstride, 0.0f, w->s, pl->lds);
  softmax_update(w, M, nr, D, pl->lds, pl->ldo, nk, nkv, partial, vis0, k0);
  /* A boundary tile's product also multiplies the p = 0 of a key that a row does not see by that
   * key's value: an Inf or NaN value there would make 0 * Inf = NaN in a row that never sees it
   * (a later token's value poisoning earlier rows, which the oracle keeps finite). Such a tile sums
   * each row's own prefix by hand instead; the check reads nkv value rows, against the product's
   * M * nkv * D multiplications. */
  if (partial && nkv > 0 && !rows_finite(v + k0 * pl->kstride, pl->kstride, nkv, D)) {
    for (int i = 0; i < M; i++) {
      const int64_t c = vis0 + i % nr - k0;
      const int cnt = c < 0 ? 0 : c > nkv ? nkv : (int)c;
      const float *p = w->s + (int64_t)i * pl->lds;
      float *o = w->o + (int64_t)i * pl->ldo;
      for (int j = 0; j < cnt; j++) {
        const float *vr = v + (k0 + j) * pl->kstride;
        for (int d = 0; d < D; d++) o[d] += p[j] * vr[d];
      }
    }
    return;
  }
  if (nkv > 0)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, D, nkv, 1.0f, w->s, pl->lds,
                v + k0 * pl->kstride, (int)pl->kstride, 1.0f, w->o, pl->ldo);
}

/* All keys of one segment that the tile sees: keys [0, vis0) by every row, then (causal) the triangle
 * up to vis0 + nr - 1, capped at the segment length n. */
static void segment(const plan *pl, work *w, int nr, const float *k, const float *v, int64_t n, int64_t vis0,
                    int causal) {
  int64_t full = vis0 < n ? vis0 : n;
  int64_t end = causal ? vis0 + nr - 1 : full;
  if (end > n) end = n;
  for (int64_t k0 = 0; k0 < full; k0 += APB_KT) {
    int nk = (int)(full - k0 < APB_KT ? full - k0 : APB_KT);
    key_tile(pl, w, nr, k, v, k0, nk, vis0, 0);
  }
  if (end > full) key_tile(pl, w, nr, k, v, full, (int)(end - full), vis0, 1);
}

/* Task: KV head hk, rows [r0, r0+nr) of q (all anchor rows, or all local rows). */
static void run_task(const plan *pl, work *w, int hk, int64_t r0, int nr) {
  const apb_attn_args *a = pl->a;
  const int G = pl->G, D = a->D, Hq = a->Hq, M = G * nr;
  const int ldq = pl->ldq, ldo = pl->ldo;
  for (int g = 0; g < G; g++)
    for (int ri = 0; ri < nr; ri++) {
      const float *src = a->q + ((r0 + ri) * Hq + hk * G + g) * (int64_t)D;
      float *dst = w->q + (int64_t)(g * nr + ri) * ldq;
      for (int d = 0; d < D; d++) dst[d] = src[d] * pl->scale;
    }
  for (int i = 0; i < M; i++) {
    w->m[i] = -INFINITY;
    w->l[i] = 0.0f;
    memset(w->o + (int64_t)i * ldo, 0, (size_t)D * sizeof(float));
  }
  const int64_t off = (int64_t)hk * D; /* KV head hk inside a [len, Hkv, D] segment */
  if (r0 < a->A) {                     /* anchor rows: anchor keys 0..i (APB.md 3.6) */
    segment(pl, w, nr, a->ka + off, a->va + off, a->A, r0 + 1, 1);
  } else { /* local rows: all of P, all of A, local keys 0..j */
    int64_t j0 = r0 - a->A;
    if (a->P > 0) segment(pl, w, nr, a->kp + off, a->vp + off, a->P, a->P, 0);
    if (a->A > 0) segment(pl, w, nr, a->ka + off, a->va + off, a->A, a->A, 0);
    if (a->local_keys && a->B > 0) segment(pl, w, nr, a->kb + off, a->vb + off, a->B, j0 + 1, 1);
  }
  for (int g = 0; g < G; g++) {
    const int h = hk * G + g;
    for (int ri = 0; ri < nr; ri++) {
      const int i = g * nr + ri;
      const int64_t r = r0 + ri;
      float *dst = a->o + (r * Hq + h) * (int64_t)D;
      const float *acc = w->o + (int64_t)i * ldo;
      const float l = w->l[i];
      if (l != 0.0f) { /* l >= 1, or NaN */
        for (int d = 0; d < D; d++) dst[d] = acc[d] / l;
        if (a->lse) a->lse[(int64_t)h * pl->T + r] = w->m[i] + logf(l);
      } else { /* no visible key: o = 0, lse = -inf (apb/attn.h) */
        for (int d = 0; d < D; d++) dst[d] = 0.0f;
        if (a->lse) a->lse[(int64_t)h * pl->T + r] = -INFINITY;
      }
    }
  }
}

/* ---------------------------------------------------------------- entry */

apb_status apb_attn_fast(const apb_attn_args *a, apb_error *err) {
  apb_status st = apb_attn_validate(a, err);
  if (st != APB_OK) return st;
  const int64_t A = a->A, B = a->B, T = A + B;
  if (T == 0) return APB_OK;

  plan pl;
  pl.a = a;
  pl.T = T;
  pl.G = a->Hq / a->Hkv;
  pl.R = APB_MT / pl.G;
  if (pl.R < 16) pl.R = 16;
  if (pl.R > 128) pl.R = 128;
  /* Buffers no bigger than the call needs (a decode step has one row): rows per tile at most the
   * longer of the anchor and the block, keys per tile at most the longest segment. */
  const int64_t maxrows = A > B ? A : B, maxseg = a->P > maxrows ? a->P : maxrows;
  const int rt = maxrows < pl.R ? (int)maxrows : pl.R, kt = maxseg < APB_KT ? (int)maxseg : APB_KT;
  /* tile rows (G heads x rt rows) and padded head dims are BLAS ints */
  if ((int64_t)pl.G * rt > INT32_MAX / 2 || a->D > INT32_MAX / 2)
    return apb_error_set(err, APB_EINVAL,
                         "attn_fast: a tile of %d query heads per KV head x %d rows of dim %d exceeds the BLAS "
                         "int range", pl.G, rt, a->D);
  pl.ldq = pl.ldo = pad16(a->D);
  pl.lds = pad16(kt);
  pl.kstride = (int64_t)a->Hkv * a->D;
  pl.scale = apb_attn_scale(a);
  if (pl.kstride > INT32_MAX)
    return apb_error_set(err, APB_EINVAL, "attn_fast: Hkv*D=%lld exceeds the BLAS leading-dimension range",
                         (long long)pl.kstride);

  /* Tasks: local row tiles first, last (heaviest) first, then anchor row tiles, last first; each for
   * every KV head. Which thread runs a task does not change its result. */
  const int64_t nta = (A + pl.R - 1) / pl.R, ntb = (B + pl.R - 1) / pl.R;
  const int64_t ntasks = (nta + ntb) * a->Hkv;

  const int nth_want = omp_get_max_threads();
  const int nth = ntasks < nth_want ? (int)ntasks : nth_want;
  const int M = pl.G * rt;
  const size_t per_q = (size_t)M * pl.ldq, per_s = (size_t)M * pl.lds, per_o = (size_t)M * pl.ldo;
  const size_t per_ml = (size_t)pad16(M);
  const size_t per = per_q + per_s + per_o + 2 * per_ml; /* floats per thread, a multiple of 16 */
  float *pool = aligned_alloc(APB_ALIGN, (size_t)nth * per * sizeof(float));
  if (!pool)
    return apb_error_set(err, APB_ENOMEM, "attn_fast: cannot allocate %d x %zu floats of tile buffers", nth,
                         per);
  memset(pool, 0, (size_t)nth * per * sizeof(float)); /* the padding of S rows is read (and masked) */

  apb_ref_blas_hold();
#pragma omp parallel num_threads(nth)
  {
    float *base = pool + (size_t)omp_get_thread_num() * per;
    work w = {base, base + per_q, base + per_q + per_s, base + per_q + per_s + per_o,
              base + per_q + per_s + per_o + per_ml};
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; t++) {
      const int hk = (int)(t % a->Hkv);
      const int64_t tile = t / a->Hkv;
      int64_t r0, r1;
      if (tile < ntb) { /* local tile ntb-1-tile */
        r0 = A + (ntb - 1 - tile) * pl.R;
        r1 = r0 + pl.R < T ? r0 + pl.R : T;
      } else { /* anchor tile nta-1-(tile-ntb) */
        r0 = (nta - 1 - (tile - ntb)) * pl.R;
        r1 = r0 + pl.R < A ? r0 + pl.R : A;
      }
      run_task(&pl, &w, hk, r0, (int)(r1 - r0));
    }
  }
  apb_ref_blas_release();
  /* In OpenBLAS's OpenMP build, openblas_set_num_threads also sets this thread's OpenMP thread count:
   * put back the caller's. */
  omp_set_num_threads(nth_want);
  free(pool);
  return APB_OK;
}
