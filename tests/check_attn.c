/* tests/check_attn.c: the CPU attention of apb/attn.h (shared/APB.md 3.6, 4, 6, 7).
 *
 * What it checks:
 *   - hand-worked cases with closed-form answers, for both the oracle (apb_attn_naive) and the fast
 *     path (apb_attn_fast): one key, two keys, equal scores (o is a mean, lse = log(count), which pins
 *     down exactly which keys each anchor and local row sees), a row with no visible key, the GQA head
 *     mapping, huge scores (no overflow), the scale, the FLOP count;
 *   - sweeps of the fast path against the oracle over awkward shapes (rows 1, 97, 113, 1023, 1025; D 64,
 *     80, 96, 128; GQA 1, 2, 4, 8; P and A in {0, 1, some}; local_keys 0 and 1);
 *   - the invariants of APB.md 6 that live at this level: star (P = 0) equals dense attention over the
 *     concatenated [A | B]; apb with every earlier key in P equals the matching dense rows; merging
 *     attention over two halves of a key set equals attention over the whole (APB.md 4); the fast path
 *     is bitwise identical for 1, 2 and 3 OpenMP threads and over repeated runs;
 *   - argument validation (APB_EINVAL with a message naming the field).
 * What it does not: time anything (docs/tolerances.md has the numbers, `apb bench attn` measures).
 * Every output buffer is poisoned (NaN) before each call and has a guard region checked afterwards.
 * Every bound is apb_tolerance(APB_PREC_F32, k), k the longest reduction feeding an output: the keys a
 * row sees plus D (red_len below).
 */
#include "testutil.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- a test problem */

typedef struct prob {
  apb_attn_args a;
  float *q;       /* [A+B, Hq, D] */
  float *kp, *vp; /* [P, Hkv, D] */
  float *ka, *va; /* [A, Hkv, D] */
  float *kb, *vb; /* [B, Hkv, D] */
  float *o, *lse; /* [A+B, Hq, D], [Hq, A+B]: outputs */
  size_t nq, nlse;
} prob;

/* Guarded allocation of n floats (at least one, so that a zero-length tensor still has a guard). */
static float *galloc(size_t n) { return tu_alloc(n ? n : 1); }

/* Inputs uniform in [-amp, amp) from the suite seed; `stream` keeps different problems apart. */
static void prob_init(prob *p, int64_t P, int64_t A, int64_t B, int Hq, int Hkv, int D, int local_keys,
                      uint64_t stream, float amp) {
  memset(p, 0, sizeof *p);
  const uint64_t seed = tu_seed();
  p->nq = (size_t)(A + B) * Hq * D;
  p->nlse = (size_t)(A + B) * Hq;
  size_t np = (size_t)P * Hkv * D, na = (size_t)A * Hkv * D, nb = (size_t)B * Hkv * D;
  p->q = galloc(p->nq);
  p->kp = galloc(np), p->vp = galloc(np);
  p->ka = galloc(na), p->va = galloc(na);
  p->kb = galloc(nb), p->vb = galloc(nb);
  p->o = galloc(p->nq), p->lse = galloc(p->nlse);
  tu_fill(p->q, p->nq, seed, stream * 8 + 0, amp);
  tu_fill(p->kp, np, seed, stream * 8 + 1, amp);
  tu_fill(p->vp, np, seed, stream * 8 + 2, amp);
  tu_fill(p->ka, na, seed, stream * 8 + 3, amp);
  tu_fill(p->va, na, seed, stream * 8 + 4, amp);
  tu_fill(p->kb, nb, seed, stream * 8 + 5, amp);
  tu_fill(p->vb, nb, seed, stream * 8 + 6, amp);
  apb_attn_args *a = &p->a; /* scale 0: 1/sqrt(D) */
  a->P = P, a->A = A, a->B = B, a->Hq = Hq, a->Hkv = Hkv, a->D = D, a->local_keys = local_keys;
  a->q = p->q, a->kp = p->kp, a->vp = p->vp, a->ka = p->ka, a->va = p->va, a->kb = p->kb, a->vb = p->vb;
  a->o = p->o, a->lse = p->lse;
}

static void prob_free(prob *p) {
  tu_free(p->q), tu_free(p->kp), tu_free(p->vp), tu_free(p->ka), tu_free(p->va), tu_free(p->kb);
  tu_free(p->vb), tu_free(p->o), tu_free(p->lse);
}

typedef apb_status (*attn_fn)(const apb_attn_args *, apb_error *);
static const attn_fn impls[2] = {apb_attn_naive, apb_attn_fast};
static const char *const impl_names[2] = {"naive", "fast"};

/* Poison the outputs, run, assert success and intact guards. */
static void run(attn_fn f, const char *name, prob *p) {
  tu_poison(p->o, p->nq);
  tu_poison(p->lse, p->nlse);
  apb_error err = {0};
  apb_status st = f(&p->a, &err);
  ck_assert_msg(st == APB_OK, "%s: status %s: %s", name, apb_status_str(st), err.msg);
  ck_assert_msg(tu_guard_ok(p->o, p->nq), "%s: wrote past o [%zu]", name, p->nq);
  ck_assert_msg(tu_guard_ok(p->lse, p->nlse), "%s: wrote past lse [%zu]", name, p->nlse);
}

/* Reduction length of one output: a score is a sum of D products, and an output row sums over every
 * key the row sees; the rounding errors of the two add (docs/tolerances.md). */
static int64_t red_len(const apb_attn_args *a) {
  int64_t k = a->A;
  if (a->B > 0) k = a->P + a->A + (a->local_keys ? a->B : 0);
  return k + a->D;
}

/* Copy of n floats into a fresh guarded buffer. */
static float *dup(const float *x, size_t n) {
  float *y = galloc(n);
  memcpy(y, x, n * sizeof *y);
  return y;
}

/* ---------------------------------------------------------------- hand-worked cases */

/* One key: the softmax weight is exactly 1, so o is v bit for bit; lse is the one score. */
START_TEST(test_one_key) {
  const attn_fn f = impls[_i];
  prob p;
  prob_init(&p, 0, 0, 1, 1, 1, 4, 1, 1, 1.0f);
  const float q[4] = {1, 2, 0, -1}, k[4] = {0.5f, 0.5f, 1, 2}, v[4] = {3, -1, 2, 0.25f};
  memcpy(p.q, q, sizeof q), memcpy(p.kb, k, sizeof k), memcpy(p.vb, v, sizeof v);
  run(f, impl_names[_i], &p);
  tu_assert_bitwise("one key: o = v", p.o, v, 4);
  const float lse_ref = 0.5f * (0.5f + 1.0f - 2.0f); /* scale 1/sqrt(4) */
  tu_assert_close("one key: lse", p.lse, &lse_ref, 1, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  prob_free(&p);
}
END_TEST

/* Two keys, scale 1: row 0 sees key 0 only, row 1 sees both. Closed form in double. */
START_TEST(test_two_keys) {
  const attn_fn f = impls[_i];
  prob p;
  prob_init(&p, 0, 0, 2, 1, 1, 2, 1, 2, 1.0f);
  p.a.scale = 1.0f;
  const float q[4] = {0.4f, 9, 1, 0}, k[4] = {0.3f, 5, -0.7f, 1}, v[4] = {1, 2, -3, 0.5f};
  memcpy(p.q, q, sizeof q), memcpy(p.kb, k, sizeof k), memcpy(p.vb, v, sizeof v);
  run(f, impl_names[_i], &p);
  double s00 = (double)0.4f * (double)0.3f + 9.0 * 5.0; /* row 0 . key 0 */
  double s10 = (double)0.3f, s11 = (double)-0.7f;       /* row 1 = [1, 0] picks the first coordinate */
  double w0 = exp(s10), w1 = exp(s11), z = w0 + w1;
  float o_ref[4] = {1, 2, (float)((w0 * 1 + w1 * -3) / z), (float)((w0 * 2 + w1 * 0.5) / z)};
  float lse_ref[2] = {(float)s00, (float)(s10 + log1p(exp(s11 - s10)))};
  tu_assert_close("two keys: o", p.o, o_ref, 4, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_assert_close("two keys: lse", p.lse, lse_ref, 2, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  prob_free(&p);
}
END_TEST

/* q = 0 makes every visible score 0: each output is the plain mean of the values the row sees and
 * lse = log(count). With P, A and B all present this pins down the visibility rule of APB.md 3.6:
 * anchor row i sees anchor keys 0..i only; local row j sees all of P, all of A, local keys 0..j. */
START_TEST(test_equal_scores) {
  const attn_fn f = impls[_i];
  const int64_t P = 10, A = 37, B = 50;
  const int Hq = 4, Hkv = 2, D = 8, G = Hq / Hkv;
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 3, 1.0f);
  memset(p.q, 0, p.nq * sizeof *p.q);
  run(f, impl_names[_i], &p);
  float *o_ref = galloc(p.nq), *lse_ref = galloc(p.nlse);
  const int64_t T = A + B;
  for (int64_t r = 0; r < T; r++)
    for (int h = 0; h < Hq; h++) {
      const int hk = h / G;
      for (int d = 0; d < D; d++) {
        double sum = 0;
        int64_t n = 0;
        if (r < A) {
          for (int64_t t = 0; t <= r; t++, n++) sum += p.va[(t * Hkv + hk) * D + d];
        } else {
          for (int64_t t = 0; t < P; t++, n++) sum += p.vp[(t * Hkv + hk) * D + d];
          for (int64_t t = 0; t < A; t++, n++) sum += p.va[(t * Hkv + hk) * D + d];
          for (int64_t t = 0; t <= r - A; t++, n++) sum += p.vb[(t * Hkv + hk) * D + d];
        }
        o_ref[(r * Hq + h) * D + d] = (float)(sum / (double)n);
        lse_ref[h * T + r] = (float)log((double)n);
      }
    }
  tu_assert_close("equal scores: o (means)", p.o, o_ref, (int64_t)p.nq,
                  apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_assert_close("equal scores: lse = log(count)", p.lse, lse_ref, (int64_t)p.nlse,
                  apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_free(o_ref), tu_free(lse_ref);
  prob_free(&p);
}
END_TEST

/* local_keys = 0 with no P and no A: no row sees any key. o = 0 and lse = -inf exactly, and the
 * unused kb/vb may be NULL. */
START_TEST(test_no_visible_key) {
  const attn_fn f = impls[_i];
  prob p;
  prob_init(&p, 0, 0, 5, 4, 2, 16, 0, 4, 1.0f);
  p.a.kb = p.a.vb = NULL;
  p.a.kp = p.a.vp = p.a.ka = p.a.va = NULL;
  run(f, impl_names[_i], &p);
  for (size_t i = 0; i < p.nq; i++)
    ck_assert_msg(p.o[i] == 0.0f && !signbit(p.o[i]), "no visible key: o[%zu] = %g, want 0", i,
                  (double)p.o[i]);
  for (size_t i = 0; i < p.nlse; i++)
    ck_assert_msg(isinf(p.lse[i]) && p.lse[i] < 0, "no visible key: lse[%zu] = %g, want -inf", i,
                  (double)p.lse[i]);
  prob_free(&p);
}
END_TEST

/* GQA: query head h uses KV head h / (Hq/Hkv). Values are constant per KV head (1 for head 0, 2 for
 * head 1), so every output of heads 0, 1 is 1 and of heads 2, 3 is 2, up to rounding. */
START_TEST(test_gqa_mapping) {
  const attn_fn f = impls[_i];
  const int64_t P = 3, A = 20, B = 30;
  const int Hq = 4, Hkv = 2, D = 16;
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 5, 1.0f);
  float *vs[3] = {p.vp, p.va, p.vb};
  int64_t ns[3] = {P, A, B};
  for (int s = 0; s < 3; s++)
    for (int64_t t = 0; t < ns[s]; t++)
      for (int hk = 0; hk < Hkv; hk++)
        for (int d = 0; d < D; d++) vs[s][(t * Hkv + hk) * D + d] = (float)(hk + 1);
  run(f, impl_names[_i], &p);
  float *o_ref = galloc(p.nq);
  for (int64_t r = 0; r < A + B; r++)
    for (int h = 0; h < Hq; h++)
      for (int d = 0; d < D; d++) o_ref[(r * Hq + h) * D + d] = (float)(h / (Hq / Hkv) + 1);
  tu_assert_close("gqa mapping: o", p.o, o_ref, (int64_t)p.nq, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_free(o_ref);
  prob_free(&p);
}
END_TEST

/* Scores of +-1000 (exp would overflow or underflow without the max shift): still finite, and equal
 * to the closed form. D = 1, scale 1, keys 1 and 1.01 (as floats). */
START_TEST(test_huge_scores) {
  const attn_fn f = impls[_i];
  for (int sign = -1; sign <= 1; sign += 2) {
    prob p;
    prob_init(&p, 0, 0, 2, 1, 1, 1, 1, 6, 1.0f);
    p.a.scale = 1.0f;
    p.q[0] = p.q[1] = 1000.0f * (float)sign;
    p.kb[0] = 1.0f, p.kb[1] = 1.01f;
    p.vb[0] = 0.5f, p.vb[1] = -2.0f;
    run(f, impl_names[_i], &p);
    double s0 = 1000.0 * sign * 1.0, s1 = 1000.0 * sign * (double)1.01f, mx = s0 > s1 ? s0 : s1;
    double w0 = exp(s0 - mx), w1 = exp(s1 - mx);
    float o_ref[2] = {0.5f, (float)((w0 * 0.5 + w1 * -2.0) / (w0 + w1))};
    float lse_ref[2] = {(float)s0, (float)(mx + log(w0 + w1))};
    tu_assert_close("huge scores: o", p.o, o_ref, 2, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
    tu_assert_close("huge scores: lse", p.lse, lse_ref, 2, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
    prob_free(&p);
  }
}
END_TEST

/* A NaN input reaches exactly the outputs that depend on it (APB.md 7: NaN never passes): a NaN in one
 * q element poisons that (row, head); a NaN in anchor key t of KV head 1 poisons the query heads of
 * that group in every row that sees key t (anchor rows i >= t, all local rows) and nothing else. */
START_TEST(test_nan_propagates) {
  const attn_fn f = impls[_i];
  const int64_t P = 5, A = 20, B = 40, T = A + B, t = 7, rq = A + 10;
  const int Hq = 4, Hkv = 2, D = 16, hq = 1;
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 21, 1.0f);
  p.q[(rq * Hq + hq) * D + 3] = NAN;
  p.ka[(t * Hkv + 1) * D + 5] = NAN;
  run(f, impl_names[_i], &p);
  for (int64_t r = 0; r < T; r++)
    for (int h = 0; h < Hq; h++) {
      int want = (r == rq && h == hq) || (h / 2 == 1 && r >= t);
      for (int d = 0; d < D; d++)
        if (isnan(p.o[(r * Hq + h) * D + d]) != want)
          ck_abort_msg("%s: o[row %lld, head %d, %d] = %g, want %s", impl_names[_i], (long long)r, h, d,
                       (double)p.o[(r * Hq + h) * D + d], want ? "NaN" : "a number");
      ck_assert_msg(isnan(p.lse[h * T + r]) == want, "%s: lse[head %d, row %lld] = %g", impl_names[_i], h,
                    (long long)r, (double)p.lse[h * T + r]);
    }
  prob_free(&p);
  /* a score of +inf (inf - inf in the softmax) is NaN too; one of -inf just weighs nothing */
  prob_init(&p, 0, 0, 3, 1, 1, 1, 1, 22, 1.0f);
  p.q[0] = p.q[1] = p.q[2] = 1.0f;
  p.kb[0] = 0.5f, p.kb[1] = -INFINITY, p.kb[2] = INFINITY;
  run(f, impl_names[_i], &p);
  ck_assert_msg(p.o[0] == p.vb[0] && p.o[1] == p.vb[0] && isnan(p.o[2]) && isnan(p.lse[2]),
                "%s: o = (%g, %g, %g) for scores (0.5, -inf, +inf)", impl_names[_i], (double)p.o[0],
                (double)p.o[1], (double)p.o[2]);
  prob_free(&p);
}
END_TEST

/* The fast path's fp32 limits that apb/attn.h documents, each against the oracle:
 *   - scores below -FLT_MAX (q = 1e20, k = -1e20 and lower): -inf in fp32, so the row comes out as one
 *     that sees no key (o = 0, lse = -inf), while the oracle's o is finite (its lse, rounded, is -inf);
 *   - values of 1e36 over 1000 keys of equal score: the fp32 numerator passes FLT_MAX and o is +inf,
 *     while the oracle's is 1e36;
 *   - large logits (inputs in [-20, 20), D = 128, scores of several hundred): the relative Frobenius
 *     error of o stays within APB.md 7's 1e-5 (the table's elementwise guard does not hold there, and
 *     is not asked for), lse within the table. */
START_TEST(test_fast_fp32_limits) {
  prob p;
  prob_init(&p, 0, 0, 3, 1, 1, 2, 1, 25, 1.0f);
  p.a.scale = 1.0f;
  for (int t = 0; t < 3; t++) {
    p.q[2 * t] = p.q[2 * t + 1] = 1e20f;
    p.kb[2 * t] = -1e20f, p.kb[2 * t + 1] = -1e20f - 1e19f * (float)t;
    p.vb[2 * t] = (float)t + 1, p.vb[2 * t + 1] = -1;
  }
  run(apb_attn_naive, "naive", &p);
  ck_assert_msg(p.o[0] == 1 && p.o[2] == 1 && p.o[3] == -1 && isinf(p.lse[0]) && p.lse[0] < 0,
                "naive, scores -2e40: o (%g %g) (%g %g), lse %g", (double)p.o[0], (double)p.o[1], (double)p.o[2],
                (double)p.o[3], (double)p.lse[0]);
  run(apb_attn_fast, "fast", &p);
  for (size_t e = 0; e < p.nq; e++)
    ck_assert_msg(p.o[e] == 0.0f, "fast, scores below -FLT_MAX: o[%zu] = %g, want 0", e, (double)p.o[e]);
  for (size_t e = 0; e < p.nlse; e++)
    ck_assert_msg(isinf(p.lse[e]) && p.lse[e] < 0, "fast, scores below -FLT_MAX: lse[%zu] = %g", e, (double)p.lse[e]);
  prob_free(&p);

  const int64_t P = 1000;
  prob_init(&p, P, 0, 1, 1, 1, 4, 0, 26, 1.0f);
  memset(p.q, 0, p.nq * sizeof *p.q);
  for (int64_t e = 0; e < P * 4; e++) p.vp[e] = 1e36f;
  run(apb_attn_naive, "naive", &p);
  ck_assert_msg(p.o[0] == 1e36f, "naive, v = 1e36 over %lld keys: o = %g", (long long)P, (double)p.o[0]);
  run(apb_attn_fast, "fast", &p);
  ck_assert_msg(isinf(p.o[0]) && p.o[0] > 0, "fast, v = 1e36 over %lld keys: o = %g, documented +inf", (long long)P,
                (double)p.o[0]);
  prob_free(&p);

  prob_init(&p, 17, 40, 300, 8, 2, 128, 1, 27, 20.0f);
  run(apb_attn_naive, "naive", &p);
  float *o_ref = dup(p.o, p.nq), *lse_ref = dup(p.lse, p.nlse);
  run(apb_attn_fast, "fast", &p);
  const apb_tol fro = {1e-5, 0, 0, 0};
  tu_assert_close("large logits: o (rel_fro only)", p.o, o_ref, (int64_t)p.nq, fro);
  tu_assert_close("large logits: lse", p.lse, lse_ref, (int64_t)p.nlse, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_free(o_ref), tu_free(lse_ref);
  prob_free(&p);
}
END_TEST

/* A score of -inf weighs nothing (apb/attn.h). KV head 0: every key has a -inf element and q > 0, so
 * every score is -inf: each row of query head 0 gets o = +0 and lse = -inf, exactly as a row that sees
 * no key (the oracle's two-pass softmax met exp(-inf - -inf) = NaN here), except row rq whose q holds a
 * NaN: NaN. KV head 1: only anchor key 1 is -inf; anchor row 1 then sees key 0 alone (o = v0 bit for
 * bit), and the fast path agrees with the oracle throughout. */
START_TEST(test_all_scores_neg_inf) {
  const int64_t P = 2, A = 3, B = 5, T = A + B, rq = A + 2;
  const int Hq = 2, Hkv = 2, D = 4;
  float *o[2], *lse[2];
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 24, 1.0f);
  for (size_t e = 0; e < p.nq; e++) p.q[e] = fabsf(p.q[e]) + 0.125f;
  for (int64_t t = 0; t < P; t++) p.kp[(t * Hkv + 0) * D + 1] = -INFINITY;
  for (int64_t t = 0; t < A; t++) p.ka[(t * Hkv + 0) * D + 2] = -INFINITY;
  for (int64_t t = 0; t < B; t++) p.kb[(t * Hkv + 0) * D + 0] = -INFINITY;
  p.ka[(1 * Hkv + 1) * D + 3] = -INFINITY;
  p.q[(rq * Hq + 0) * D + 3] = NAN;
  for (int i = 0; i < 2; i++) {
    run(impls[i], impl_names[i], &p);
    for (int64_t r = 0; r < T; r++) {
      const float *orow = p.o + (r * Hq + 0) * D;
      const float l = p.lse[0 * T + r];
      if (r == rq)
        ck_assert_msg(isnan(orow[0]) && isnan(l), "seed %llu: %s: row %lld with a NaN q: o %g, lse %g",
                      (unsigned long long)tu_seed(), impl_names[i], (long long)r, (double)orow[0], (double)l);
      else
        for (int d = 0; d < D; d++)
          ck_assert_msg(orow[d] == 0.0f && !signbit(orow[d]) && isinf(l) && l < 0,
                        "seed %llu: %s: row %lld, every score -inf: o[%d] = %g, lse = %g; want 0 and -inf",
                        (unsigned long long)tu_seed(), impl_names[i], (long long)r, d, (double)orow[d], (double)l);
    }
    tu_assert_bitwise("anchor row 1 of head 1 (key 1 at -inf) = v0", p.o + (1 * Hq + 1) * D, p.va + 1 * D, D);
    o[i] = dup(p.o, p.nq), lse[i] = dup(p.lse, p.nlse);
  }
  for (int64_t r = 0; r < T; r++) { /* head 1 only: head 0 is checked above */
    float *oh[2] = {galloc(D), galloc(D)}, lh[2];
    for (int i = 0; i < 2; i++) memcpy(oh[i], o[i] + (r * Hq + 1) * D, D * sizeof(float)), lh[i] = lse[i][1 * T + r];
    tu_assert_close("one -inf key: o of head 1", oh[1], oh[0], D, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
    tu_assert_close("one -inf key: lse of head 1", &lh[1], &lh[0], 1, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
    tu_free(oh[0]), tu_free(oh[1]);
  }
  for (int i = 0; i < 2; i++) tu_free(o[i]), tu_free(lse[i]);
  prob_free(&p);
}
END_TEST

/* A non-finite value reaches only the rows that see its key (apb/attn.h's visibility): a NaN in anchor
 * value t (KV head 1, element da) and an Inf in local value j (KV head 0, element db). The rows
 * before them in the same row tile multiply them by a probability of 0 in the fast path's boundary
 * tile, which must not turn into 0 * Inf = NaN. Every other output is finite and agrees with the
 * oracle. Both implementations, against the exact pattern; then fast against naive elsewhere. */
START_TEST(test_nonfinite_value_causal) {
  const int64_t P = 3, A = 20, B = 40, T = A + B, t = 7, j = 25;
  const int Hq = 4, Hkv = 2, D = 16, G = Hq / Hkv, da = 5, db = 2;
  float *o[2], *lse[2];
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 23, 1.0f);
  p.va[(t * Hkv + 1) * D + da] = NAN;
  p.vb[(j * Hkv + 0) * D + db] = INFINITY;
  for (int i = 0; i < 2; i++) {
    run(impls[i], impl_names[i], &p);
    for (int64_t r = 0; r < T; r++)
      for (int h = 0; h < Hq; h++)
        for (int d = 0; d < D; d++) {
          const float x = p.o[(r * Hq + h) * D + d];
          const int nan = h / G == 1 && d == da && r >= t, inf = h / G == 0 && d == db && r >= A + j;
          ck_assert_msg(nan ? isnan(x) : inf ? isinf(x) && x > 0 : isfinite(x),
                        "seed %llu: %s: o[row %lld, head %d, %d] = %g, want %s", (unsigned long long)tu_seed(),
                        impl_names[i], (long long)r, h, d, (double)x, nan ? "NaN" : inf ? "+inf" : "finite");
        }
    for (size_t e = 0; e < p.nlse; e++)
      ck_assert_msg(isfinite(p.lse[e]), "seed %llu: %s: lse[%zu] = %g", (unsigned long long)tu_seed(),
                    impl_names[i], e, (double)p.lse[e]);
    o[i] = dup(p.o, p.nq), lse[i] = dup(p.lse, p.nlse);
    for (size_t e = 0; e < p.nq; e++)
      if (!isfinite(o[i][e])) o[i][e] = 0.0f; /* the pattern is checked above */
  }
  tu_assert_close("non-finite value: o elsewhere", o[1], o[0], (int64_t)p.nq, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  tu_assert_close("non-finite value: lse", lse[1], lse[0], (int64_t)p.nlse, apb_tolerance(APB_PREC_F32, red_len(&p.a)));
  for (int i = 0; i < 2; i++) tu_free(o[i]), tu_free(lse[i]);
  prob_free(&p);
}
END_TEST

/* The fast path against the oracle over every element, by class (NaN, the same Inf, finite) and, where
 * finite, within the tolerance, o and lse: _i 0, +Inf and -Inf values in one column at local keys 25
 * and 30 (the rows between see only the +Inf: +Inf there, NaN from 30 on); _i 1, a -Inf in a local
 * key (scores of +-Inf: -Inf weighs nothing, +Inf makes the row NaN). */
START_TEST(test_nonfinite_mixed) {
  const int64_t P = 3, A = 20, B = 40;
  const int Hq = 4, Hkv = 2, D = 16;
  prob p;
  prob_init(&p, P, A, B, Hq, Hkv, D, 1, 29 + (uint64_t)_i, 1.0f);
  if (_i == 0) p.vb[(25 * Hkv + 0) * D + 3] = INFINITY, p.vb[(30 * Hkv + 0) * D + 3] = -INFINITY;
  else p.kb[(25 * Hkv + 1) * D + 0] = -INFINITY;
  float *o[2], *lse[2];
  for (int i = 0; i < 2; i++) {
    run(impls[i], impl_names[i], &p);
    o[i] = dup(p.o, p.nq), lse[i] = dup(p.lse, p.nlse);
  }
  int64_t nonfinite = 0;
  for (size_t e = 0; e < p.nq; e++) nonfinite += !isfinite(o[0][e]);
  ck_assert_msg(nonfinite > 0, "case %d: the oracle is finite everywhere: the case tests nothing", _i);
  const apb_tol tol = apb_tolerance(APB_PREC_F32, red_len(&p.a));
  ck_assert_msg(tu_same_class_close("non-finite mix: fast o", o[1], o[0], (int64_t)p.nq, tol), "case %d: o (above)", _i);
  ck_assert_msg(tu_same_class_close("non-finite mix: fast lse", lse[1], lse[0], (int64_t)p.nlse, tol),
                "case %d: lse (above)", _i);
  for (int i = 0; i < 2; i++) tu_free(o[i]), tu_free(lse[i]);
  prob_free(&p);
}
END_TEST

/* scale = 0 means 1/sqrt(D); the same value given explicitly gives the same bits. */
START_TEST(test_scale) {
  apb_attn_args a = {.D = 64};
  ck_assert_msg(apb_attn_scale(&a) == 0.125f, "scale(D=64) = %g, want 0.125", (double)apb_attn_scale(&a));
  a.D = 80;
  ck_assert_msg(apb_attn_scale(&a) == (float)(1.0 / sqrt(80.0)), "scale(D=80) = %.9g",
                (double)apb_attn_scale(&a));
  a.scale = 0.3f;
  ck_assert_msg(apb_attn_scale(&a) == 0.3f, "explicit scale ignored: %g", (double)apb_attn_scale(&a));

  for (int i = 0; i < 2; i++) {
    prob p;
    prob_init(&p, 5, 9, 30, 2, 1, 16, 1, 7, 1.0f);
    run(impls[i], impl_names[i], &p);
    float *o0 = dup(p.o, p.nq), *l0 = dup(p.lse, p.nlse);
    p.a.scale = 0.25f; /* = 1/sqrt(16) */
    run(impls[i], impl_names[i], &p);
    tu_assert_bitwise("scale 0 vs explicit 1/sqrt(D): o", p.o, o0, (int64_t)p.nq);
    tu_assert_bitwise("scale 0 vs explicit 1/sqrt(D): lse", p.lse, l0, (int64_t)p.nlse);
    p.a.scale = 0.5f; /* a different scale must change the result */
    run(impls[i], impl_names[i], &p);
    ck_assert_msg(memcmp(p.lse, l0, p.nlse * sizeof *l0) != 0, "%s: scale 0.5 gave the lse of scale 0.25",
                  impl_names[i]);
    tu_free(o0), tu_free(l0);
    prob_free(&p);
  }
}
END_TEST

/* FLOPs = 4 * visible (row, key) pairs * D * Hq, counted by hand. */
START_TEST(test_flops) {
  apb_attn_args a = {.P = 3, .A = 4, .B = 5, .Hq = 2, .Hkv = 1, .D = 8, .local_keys = 1};
  /* anchor 1+2+3+4 = 10, local 5*(3+4) = 35 plus 1+..+5 = 15: 60 pairs */
  ck_assert_msg(apb_attn_flops(&a) == 4.0 * 60 * 8 * 2, "flops %g, want %g", apb_attn_flops(&a),
                4.0 * 60 * 8 * 2);
  a.local_keys = 0;
  ck_assert_msg(apb_attn_flops(&a) == 4.0 * 45 * 8 * 2, "flops %g, want %g", apb_attn_flops(&a),
                4.0 * 45 * 8 * 2);
  apb_attn_args d = {.B = 8192, .Hq = 8, .Hkv = 2, .D = 128, .local_keys = 1};
  ck_assert_msg(apb_attn_flops(&d) == 4.0 * (8192.0 * 8193 / 2) * 128 * 8, "dense flops %g",
                apb_attn_flops(&d));
}
END_TEST

/* No rows at all: nothing to do, nothing written. */
START_TEST(test_empty) {
  for (int i = 0; i < 2; i++) {
    prob p;
    prob_init(&p, 4, 0, 0, 2, 2, 8, 1, 8, 1.0f);
    run(impls[i], impl_names[i], &p);
    ck_assert_msg(isnan(p.o[0]) && isnan(p.lse[0]), "%s: T = 0 wrote output", impl_names[i]);
    prob_free(&p);
  }
}
END_TEST

/* ---------------------------------------------------------------- fast vs oracle sweeps */

typedef struct shape {
  int64_t P, A, B;
  int Hq, Hkv, D, local_keys;
} shape;

static const shape sweep[] = {
    /* rows 1 */
    {0, 0, 1, 4, 4, 64, 1},
    {5, 0, 1, 4, 1, 128, 1},
    {0, 1, 0, 8, 1, 80, 1},
    {3, 1, 0, 4, 4, 64, 0},
    {7, 0, 1, 4, 1, 96, 0},
    /* rows 97 */
    {0, 0, 97, 4, 1, 128, 1},
    {1, 1, 96, 2, 2, 80, 1},
    {50, 17, 80, 8, 1, 64, 1},
    {33, 97, 0, 4, 2, 64, 1},
    {13, 0, 97, 4, 1, 96, 0},
    {0, 40, 57, 4, 1, 128, 0},
    {0, 0, 97, 4, 2, 64, 0},
    /* rows 113 */
    {0, 0, 113, 8, 1, 80, 1},
    {64, 1, 112, 4, 1, 128, 1},
    {0, 64, 49, 1, 1, 128, 1},
    {1, 0, 113, 8, 8, 64, 1},
    {7, 113, 0, 2, 1, 64, 1},
    {300, 13, 100, 8, 2, 96, 1},
    /* rows 1023 */
    {0, 0, 1023, 4, 1, 64, 1},
    {200, 300, 723, 2, 1, 128, 1},
    {1, 1, 1022, 1, 1, 80, 1},
    {300, 0, 1023, 4, 1, 64, 0},
    /* rows 1025 */
    {0, 0, 1025, 8, 1, 64, 1},
    {100, 257, 768, 4, 2, 96, 1},
    {0, 1025, 0, 4, 1, 128, 1},
    {0, 1, 1024, 1, 1, 64, 1},
};
#define N_SWEEP ((int)(sizeof sweep / sizeof sweep[0]))

START_TEST(test_fast_vs_naive) {
  const shape s = sweep[_i];
  prob p;
  prob_init(&p, s.P, s.A, s.B, s.Hq, s.Hkv, s.D, s.local_keys, 100 + (uint64_t)_i, 1.0f);
  run(apb_attn_naive, "naive", &p);
  float *o_ref = dup(p.o, p.nq), *lse_ref = dup(p.lse, p.nlse);
  run(apb_attn_fast, "fast", &p);
  char what[160];
  const apb_tol tol = apb_tolerance(APB_PREC_F32, red_len(&p.a));
  snprintf(what, sizeof what, "sweep[%d] P=%lld A=%lld B=%lld Hq=%d Hkv=%d D=%d local_keys=%d: o", _i,
           (long long)s.P, (long long)s.A, (long long)s.B, s.Hq, s.Hkv, s.D, s.local_keys);
  tu_assert_close(what, p.o, o_ref, (int64_t)p.nq, tol);
  what[strlen(what) - 1] = 0;
  strcat(what, "lse");
  tu_assert_close(what, p.lse, lse_ref, (int64_t)p.nlse, tol);
  tu_free(o_ref), tu_free(lse_ref);
  prob_free(&p);
}
END_TEST

/* lse = NULL is allowed and changes nothing in o (run() poisons o first). */
START_TEST(test_lse_optional) {
  for (int i = 0; i < 2; i++) {
    prob p;
    prob_init(&p, 20, 30, 150, 4, 1, 64, 1, 9, 1.0f);
    run(impls[i], impl_names[i], &p);
    float *o0 = dup(p.o, p.nq);
    p.a.lse = NULL;
    run(impls[i], impl_names[i], &p);
    tu_assert_bitwise("o with lse = NULL", p.o, o0, (int64_t)p.nq);
    tu_free(o0);
    prob_free(&p);
  }
}
END_TEST

/* ---------------------------------------------------------------- invariants (APB.md 6) */

/* Copy rows [r0, r0+n) of o [T, Hq, D] and of lse [Hq, T] into compact buffers. */
static void take_rows(const float *o, const float *lse, int64_t T, int Hq, int D, int64_t r0, int64_t n,
                      float *o_out, float *lse_out) {
  memcpy(o_out, o + r0 * Hq * D, (size_t)(n * Hq * D) * sizeof *o);
  for (int h = 0; h < Hq; h++) memcpy(lse_out + h * n, lse + h * T + r0, (size_t)n * sizeof *lse);
}

/* star (P = 0, anchor A, block B) is dense causal attention over the concatenation [A | B]: its anchor
 * rows see anchor keys causally and its local rows see all of A and B causally. Built explicitly: the
 * dense problem's tokens are the star problem's anchor tokens followed by its block tokens. */
START_TEST(test_star_is_dense) {
  const int64_t A = 70, B = 90, T = A + B;
  const int Hq = 4, Hkv = 1, D = 64;
  prob st, de;
  prob_init(&st, 0, A, B, Hq, Hkv, D, 1, 10, 1.0f);
  st.a.kp = st.a.vp = NULL; /* P = 0: allowed */
  prob_init(&de, 0, 0, T, Hq, Hkv, D, 1, 11, 1.0f);
  const size_t kv_row = (size_t)Hkv * D;
  memcpy(de.q, st.q, st.nq * sizeof *st.q);
  memcpy(de.kb, st.ka, (size_t)A * kv_row * sizeof(float));
  memcpy(de.kb + A * kv_row, st.kb, (size_t)B * kv_row * sizeof(float));
  memcpy(de.vb, st.va, (size_t)A * kv_row * sizeof(float));
  memcpy(de.vb + A * kv_row, st.vb, (size_t)B * kv_row * sizeof(float));
  run(apb_attn_naive, "naive dense", &de);
  const apb_tol tol = apb_tolerance(APB_PREC_F32, red_len(&de.a));
  for (int i = 0; i < 2; i++) {
    run(impls[i], impl_names[i], &st);
    tu_assert_close(i ? "star (fast) vs dense over [A|B]: o" : "star (naive) vs dense over [A|B]: o", st.o,
                    de.o, (int64_t)st.nq, tol);
    tu_assert_close(i ? "star (fast) vs dense over [A|B]: lse" : "star (naive) vs dense over [A|B]: lse",
                    st.lse, de.lse, (int64_t)st.nlse, tol);
  }
  prob_free(&st), prob_free(&de);
}
END_TEST

/* apb where the passing block holds every earlier token that the anchor does not (APB.md 6: l_p >= l_b)
 * equals dense attention on the local rows. Dense tokens [0, T) are split as anchor [0, a), passing
 * [a, s), local block [s, T); loop index 0 uses no anchor (a = 0), 1 an anchor of 40 tokens (then the
 * key order [P | A | B] differs from the dense order, which changes the result only by rounding). */
START_TEST(test_apb_full_passing_is_dense) {
  const int64_t T = 300, s = 120, a = _i ? 40 : 0, P = s - a, B = T - s;
  const int Hq = 8, Hkv = 2, D = 64;
  prob de, ap;
  prob_init(&de, 0, 0, T, Hq, Hkv, D, 1, 12, 1.0f);
  run(apb_attn_naive, "naive dense", &de);
  prob_init(&ap, P, a, B, Hq, Hkv, D, 1, 13, 1.0f);
  const size_t kv_row = (size_t)Hkv * D, q_row = (size_t)Hq * D;
  memcpy(ap.q, de.q, (size_t)a * q_row * sizeof(float)); /* anchor rows: dense rows [0, a) */
  memcpy(ap.q + a * q_row, de.q + s * q_row, (size_t)B * q_row * sizeof(float));
  memcpy(ap.ka, de.kb, (size_t)a * kv_row * sizeof(float));
  memcpy(ap.va, de.vb, (size_t)a * kv_row * sizeof(float));
  memcpy(ap.kp, de.kb + a * kv_row, (size_t)P * kv_row * sizeof(float));
  memcpy(ap.vp, de.vb + a * kv_row, (size_t)P * kv_row * sizeof(float));
  memcpy(ap.kb, de.kb + s * kv_row, (size_t)B * kv_row * sizeof(float));
  memcpy(ap.vb, de.vb + s * kv_row, (size_t)B * kv_row * sizeof(float));
  float *o_ref = galloc((size_t)B * q_row), *lse_ref = galloc((size_t)B * Hq);
  float *o_got = galloc((size_t)B * q_row), *lse_got = galloc((size_t)B * Hq);
  float *o_ref2 = galloc((size_t)B * q_row), *lse_ref2 = galloc((size_t)B * Hq);
  take_rows(de.o, de.lse, T, Hq, D, s, B, o_ref, lse_ref);
  const apb_tol tol = apb_tolerance(APB_PREC_F32, red_len(&de.a));
  for (int i = 0; i < 2; i++) {
    run(impls[i], impl_names[i], &ap);
    take_rows(ap.o, ap.lse, a + B, Hq, D, a, B, o_got, lse_got);
    tu_assert_close(i ? "apb full passing (fast): local o" : "apb full passing (naive): local o", o_got,
                    o_ref, B * Hq * D, tol);
    tu_assert_close(i ? "apb full passing (fast): local lse" : "apb full passing (naive): local lse", lse_got,
                    lse_ref, B * Hq, tol);
    if (a > 0) { /* anchor rows are dense rows [0, a) */
      take_rows(ap.o, ap.lse, a + B, Hq, D, 0, a, o_got, lse_got);
      take_rows(de.o, de.lse, T, Hq, D, 0, a, o_ref2, lse_ref2);
      tu_assert_close("apb full passing: anchor o", o_got, o_ref2, a * Hq * D, tol);
      tu_assert_close("apb full passing: anchor lse", lse_got, lse_ref2, a * Hq, tol);
    }
  }
  tu_free(o_ref2), tu_free(lse_ref2);
  tu_free(o_ref), tu_free(lse_ref), tu_free(o_got), tu_free(lse_got);
  prob_free(&de), prob_free(&ap);
}
END_TEST

/* Decode-style merge (APB.md 4): rows against keys K split into halves K1, K2 (as passing blocks, no
 * local keys), merged by LSE, equal the rows against all of K. A third, empty partial (no keys: lse =
 * -inf, and its o poisoned with NaN) must change nothing. Output written in place over part 0. */
START_TEST(test_merge_halves) {
  const int64_t B = 64, K = 500, K1 = 230;
  const int Hq = 4, Hkv = 2, D = 32;
  prob whole, h1, h2, none;
  prob_init(&whole, K, 0, B, Hq, Hkv, D, 0, 14, 1.0f);
  run(apb_attn_naive, "naive whole", &whole);
  prob_init(&h1, K1, 0, B, Hq, Hkv, D, 0, 15, 1.0f);
  prob_init(&h2, K - K1, 0, B, Hq, Hkv, D, 0, 16, 1.0f);
  prob_init(&none, 0, 0, B, Hq, Hkv, D, 0, 17, 1.0f);
  const size_t kv_row = (size_t)Hkv * D;
  memcpy(h1.q, whole.q, whole.nq * sizeof(float));
  memcpy(h2.q, whole.q, whole.nq * sizeof(float));
  memcpy(h1.kp, whole.kp, (size_t)K1 * kv_row * sizeof(float));
  memcpy(h1.vp, whole.vp, (size_t)K1 * kv_row * sizeof(float));
  memcpy(h2.kp, whole.kp + K1 * kv_row, (size_t)(K - K1) * kv_row * sizeof(float));
  memcpy(h2.vp, whole.vp + K1 * kv_row, (size_t)(K - K1) * kv_row * sizeof(float));
  run(apb_attn_fast, "fast half 1", &h1);
  run(apb_attn_fast, "fast half 2", &h2);
  run(apb_attn_fast, "fast empty", &none);
  for (size_t i = 0; i < none.nlse; i++) ck_assert(isinf(none.lse[i]) && none.lse[i] < 0);
  tu_poison(none.o, none.nq); /* an empty partial's o must never be read */

  const float *ops[3] = {h1.o, none.o, h2.o}, *lps[3] = {h1.lse, none.lse, h2.lse};
  apb_error err = {0};
  apb_status st = apb_attn_merge(3, ops, lps, B, Hq, D, h1.o, h1.lse, &err); /* in place over part 0 */
  ck_assert_msg(st == APB_OK, "merge: %s", err.msg);
  ck_assert(tu_guard_ok(h1.o, h1.nq) && tu_guard_ok(h1.lse, h1.nlse));
  const apb_tol tol = apb_tolerance(APB_PREC_F32, red_len(&whole.a));
  tu_assert_close("merge of halves vs whole: o", h1.o, whole.o, (int64_t)whole.nq, tol);
  tu_assert_close("merge of halves vs whole: lse", h1.lse, whole.lse, (int64_t)whole.nlse, tol);
  prob_free(&whole), prob_free(&h1), prob_free(&h2), prob_free(&none);
}
END_TEST

/* Merging with empty partials is the identity, bit for bit; merging only empty partials gives o = 0,
 * lse = -inf (never NaN), even when their o holds NaN. */
START_TEST(test_merge_empty) {
  const int64_t T = 33;
  const int Hq = 2, D = 16;
  const size_t no = (size_t)T * Hq * D, nl = (size_t)T * Hq;
  float *o1 = galloc(no), *l1 = galloc(nl), *oe = galloc(no), *le = galloc(nl), *o = galloc(no),
        *l = galloc(nl);
  tu_fill(o1, no, tu_seed(), 901, 1.0f);
  tu_fill(l1, nl, tu_seed(), 902, 5.0f);
  for (size_t i = 0; i < nl; i++) le[i] = -INFINITY; /* oe stays NaN-poisoned */
  const float *ops[2] = {oe, o1}, *lps[2] = {le, l1};
  apb_error err = {0};
  ck_assert(apb_attn_merge(2, ops, lps, T, Hq, D, o, l, &err) == APB_OK);
  tu_assert_bitwise("merge with empty: o", o, o1, (int64_t)no);
  tu_assert_bitwise("merge with empty: lse", l, l1, (int64_t)nl);
  const float *eps[2] = {oe, oe}, *elps[2] = {le, le};
  tu_poison(o, no), tu_poison(l, nl);
  ck_assert(apb_attn_merge(2, eps, elps, T, Hq, D, o, l, &err) == APB_OK);
  for (size_t i = 0; i < no; i++)
    ck_assert_msg(o[i] == 0.0f, "all-empty merge: o[%zu] = %g", i, (double)o[i]);
  for (size_t i = 0; i < nl; i++)
    ck_assert_msg(isinf(l[i]) && l[i] < 0, "all-empty merge: lse[%zu] = %g", i, (double)l[i]);
  ck_assert(tu_guard_ok(o, no) && tu_guard_ok(l, nl));
  /* lse output is optional */
  tu_poison(o, no);
  ck_assert(apb_attn_merge(2, ops, lps, T, Hq, D, o, NULL, &err) == APB_OK);
  tu_assert_bitwise("merge without lse out: o", o, o1, (int64_t)no);
  /* a partial whose weight underflows to 0 in double (lse 1000 below the other's) is not read either:
   * its NaN o does not reach the result (attn.h; the CUDA merge skips it alike) */
  for (size_t i = 0; i < nl; i++) le[i] = l1[i] - 1000.0f;
  tu_poison(o, no);
  ck_assert(apb_attn_merge(2, ops, lps, T, Hq, D, o, l, &err) == APB_OK);
  tu_assert_bitwise("merge with a weight-0 partial: o", o, o1, (int64_t)no);
  tu_assert_bitwise("merge with a weight-0 partial: lse", l, l1, (int64_t)nl);
  tu_free(o1), tu_free(l1), tu_free(oe), tu_free(le), tu_free(o), tu_free(l);
}
END_TEST

/* The fast path is bitwise identical for 1, 2 and 3 OpenMP threads, and over repeated runs
 * (APB.md 6). Shapes with several row tiles, anchor and local rows, GQA stacking and boundary tiles. */
static const shape det_shapes[] = {
    {0, 0, 1025, 8, 2, 128, 1},
    {130, 300, 500, 4, 1, 80, 1},
    {77, 0, 400, 2, 2, 64, 0},
};

START_TEST(test_threads_bitwise) {
  const shape s = det_shapes[_i];
  prob p;
  prob_init(&p, s.P, s.A, s.B, s.Hq, s.Hkv, s.D, s.local_keys, 200 + (uint64_t)_i, 1.0f);
  omp_set_num_threads(1);
  run(apb_attn_fast, "fast, 1 thread", &p);
  float *o1 = dup(p.o, p.nq), *l1 = dup(p.lse, p.nlse);
  for (int nth = 2; nth <= 3; nth++) {
    omp_set_num_threads(nth);
    for (int rep = 0; rep < 2; rep++) {
      run(apb_attn_fast, "fast, several threads", &p);
      char what[96];
      snprintf(what, sizeof what, "shape %d: o, %d threads (run %d) vs 1 thread", _i, nth, rep);
      tu_assert_bitwise(what, p.o, o1, (int64_t)p.nq);
      snprintf(what, sizeof what, "shape %d: lse, %d threads (run %d) vs 1 thread", _i, nth, rep);
      tu_assert_bitwise(what, p.lse, l1, (int64_t)p.nlse);
    }
  }
  tu_free(o1), tu_free(l1);
  prob_free(&p);
}
END_TEST

/* ---------------------------------------------------------------- validation */

typedef struct bad_case {
  const char *what; /* a substring the message must contain */
  apb_attn_args a;
} bad_case;

START_TEST(test_validation) {
  static float buf[64];
  const apb_attn_args ok = {.P = 2,
                            .A = 3,
                            .B = 4,
                            .Hq = 4,
                            .Hkv = 2,
                            .D = 8,
                            .local_keys = 1,
                            .q = buf,
                            .kp = buf,
                            .vp = buf,
                            .ka = buf,
                            .va = buf,
                            .kb = buf,
                            .vb = buf,
                            .o = buf};
  bad_case bad[16];
  int n = 0;
  for (int i = 0; i < 16; i++) bad[i].a = ok;
  bad[n].what = "Hq=6", bad[n].a.Hq = 6, bad[n].a.Hkv = 4, n++;
  bad[n].what = "P=-1", bad[n].a.P = -1, n++;
  bad[n].what = "A=-2", bad[n].a.A = -2, n++;
  bad[n].what = "B=-3", bad[n].a.B = -3, n++;
  bad[n].what = "Hkv=0", bad[n].a.Hkv = 0, n++;
  bad[n].what = "D=0", bad[n].a.D = 0, n++;
  bad[n].what = "scale=nan", bad[n].a.scale = NAN, n++;
  bad[n].what = "scale=-1", bad[n].a.scale = -1.0f, n++;
  bad[n].what = "scale=inf", bad[n].a.scale = INFINITY, n++;
  bad[n].what = "local_keys=2", bad[n].a.local_keys = 2, n++;
  bad[n].what = "q is NULL", bad[n].a.q = NULL, n++;
  bad[n].what = "o is NULL", bad[n].a.o = NULL, n++;
  bad[n].what = "kp is NULL", bad[n].a.kp = NULL, n++;
  bad[n].what = "va is NULL", bad[n].a.va = NULL, n++;
  bad[n].what = "kb is NULL", bad[n].a.kb = NULL, n++;
  for (int f = 0; f < 2; f++) {
    apb_error err = {0};
    ck_assert_msg(impls[f](NULL, &err) == APB_EINVAL && strstr(err.msg, "NULL"), "%s(NULL): %s",
                  impl_names[f], err.msg);
    for (int i = 0; i < n; i++) {
      apb_error_clear(&err);
      apb_status st = impls[f](&bad[i].a, &err);
      ck_assert_msg(st == APB_EINVAL, "%s: case '%s' gave %s, want EINVAL", impl_names[f], bad[i].what,
                    apb_status_str(st));
      ck_assert_msg(strstr(err.msg, bad[i].what) != NULL, "%s: message for '%s' does not name it: \"%s\"",
                    impl_names[f], bad[i].what, err.msg);
    }
  }
  apb_error err = {0};
  ck_assert(apb_attn_validate(&ok, &err) == APB_OK && err.code == APB_OK);
  /* pointers that the shape does not need may be NULL */
  apb_attn_args lean = ok;
  lean.local_keys = 0, lean.kb = lean.vb = NULL;
  ck_assert_msg(apb_attn_validate(&lean, &err) == APB_OK, "kb/vb NULL with local_keys=0 refused: %s",
                err.msg);
  lean.P = 0, lean.kp = lean.vp = NULL;
  ck_assert_msg(apb_attn_validate(&lean, &err) == APB_OK, "kp/vp NULL with P=0 refused: %s", err.msg);

  /* merge */
  const float *parts[1] = {buf}, *nul[1] = {NULL};
  apb_error_clear(&err);
  ck_assert(apb_attn_merge(0, parts, parts, 1, 1, 8, buf, buf, &err) == APB_EINVAL && strstr(err.msg, "n=0"));
  apb_error_clear(&err);
  ck_assert(apb_attn_merge(1, parts, nul, 1, 1, 8, buf, buf, &err) == APB_EINVAL &&
            strstr(err.msg, "lse_parts"));
  apb_error_clear(&err);
  ck_assert(apb_attn_merge(1, parts, parts, -1, 1, 8, buf, buf, &err) == APB_EINVAL &&
            strstr(err.msg, "T=-1"));
  apb_error_clear(&err);
  ck_assert_msg(apb_attn_merge(1, parts, parts, INT64_MAX / 2, 4, 8, buf, buf, &err) == APB_EINVAL &&
                    strstr(err.msg, "too large"),
                "merge of 2^62 rows: %s", err.msg);

  /* fast: shapes that pass validation but whose tiles exceed BLAS's int (G x rows, padded D) are refused
   * before any index is formed (the buffers here are far too small: nothing may be read) */
  apb_attn_args wide = {.B = 16, .Hq = 1 << 30, .Hkv = 1, .D = 1, .q = buf, .o = buf};
  apb_error_clear(&err);
  ck_assert_msg(apb_attn_fast(&wide, &err) == APB_EINVAL && strstr(err.msg, "BLAS"), "G = 2^30: %s", err.msg);
  apb_attn_args deep = {.B = 1, .Hq = 1, .Hkv = 1, .D = INT_MAX, .q = buf, .o = buf};
  apb_error_clear(&err);
  ck_assert_msg(apb_attn_fast(&deep, &err) == APB_EINVAL && strstr(err.msg, "BLAS"), "D = INT_MAX: %s", err.msg);
}
END_TEST

/* ---------------------------------------------------------------- suite */

static Suite *attn_suite(void) {
  Suite *s = suite_create("attn");
  TCase *tc = tu_tcase("hand-worked", 30);
  tcase_add_loop_test(tc, test_one_key, 0, 2);
  tcase_add_loop_test(tc, test_two_keys, 0, 2);
  tcase_add_loop_test(tc, test_equal_scores, 0, 2);
  tcase_add_loop_test(tc, test_no_visible_key, 0, 2);
  tcase_add_loop_test(tc, test_gqa_mapping, 0, 2);
  tcase_add_loop_test(tc, test_huge_scores, 0, 2);
  tcase_add_loop_test(tc, test_nan_propagates, 0, 2);
  tcase_add_test(tc, test_nonfinite_value_causal);
  tcase_add_loop_test(tc, test_nonfinite_mixed, 0, 2);
  tcase_add_test(tc, test_all_scores_neg_inf);
  tcase_add_test(tc, test_fast_fp32_limits);
  tcase_add_test(tc, test_scale);
  tcase_add_test(tc, test_flops);
  tcase_add_test(tc, test_empty);
  tcase_add_test(tc, test_lse_optional);
  suite_add_tcase(s, tc);

  tc = tu_tcase("fast vs naive", 60);
  tcase_add_loop_test(tc, test_fast_vs_naive, 0, N_SWEEP);
  suite_add_tcase(s, tc);

  tc = tu_tcase("invariants", 60);
  tcase_add_test(tc, test_star_is_dense);
  tcase_add_loop_test(tc, test_apb_full_passing_is_dense, 0, 2);
  tcase_add_test(tc, test_merge_halves);
  tcase_add_test(tc, test_merge_empty);
  tcase_add_loop_test(tc, test_threads_bitwise, 0, (int)(sizeof det_shapes / sizeof det_shapes[0]));
  suite_add_tcase(s, tc);

  tc = tu_tcase("validation", 10);
  tcase_add_test(tc, test_validation);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(attn_suite(), "check_attn"); }
