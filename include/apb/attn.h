/* apb/attn.h: APB's segmented attention for one host (shared/APB.md 3.6), on the CPU.
 *
 * Legend used in every header: T tokens (rows), P passing keys, A anchor, B local block, Hq query
 * heads, Hkv KV heads, D head dim, E hidden size, F FFN width, V vocabulary, L layers, I scorer width,
 * H hosts. Activations are token-major: q [A+B, Hq, D]; k, v per segment [len, Hkv, D]; o [A+B, Hq, D];
 * lse [Hq, A+B] (natural log). Query head i uses KV head i / (Hq / Hkv).
 *
 * Visibility (APB.md 3.6):
 *   anchor row i (0 <= i < A):   anchor keys 0..i. Nothing of P or B.
 *   local row j  (0 <= j < B):   all P keys, all A keys, and local keys 0..j (when local_keys != 0).
 * dense is P = A = 0; star is P = 0. With local_keys == 0 the local rows see P and A only (the ring
 * step against a remote block, or decode on a host that does not own the new tokens): then kb/vb are
 * unused and may be NULL. A row that sees no key at all gets o = 0 and lse = -inf. A score of -inf
 * (from an infinite q or k element) weighs nothing, so a row whose every score is -inf gets the same
 * o = 0 and lse = -inf; a NaN score, or one of +inf, makes the row's o and lse NaN.
 *
 * Two implementations of the same function:
 *   apb_attn_naive: the oracle. Plain loops, double accumulation, two-pass softmax. The definition.
 *   apb_attn_fast:  OpenMP over (KV head, row tile), OpenBLAS on tiles, online softmax in fp32, never a
 *                   [rows x keys] buffer. Bitwise identical for any thread count and on every run.
 *                   Its scaled queries, scores and sums are fp32, where the oracle's are double, and
 *                   that has limits (tests/check_attn.c, test_fast_fp32_limits, holds each):
 *                   - a score above FLT_MAX (about 3.4e38) is +inf and the row comes out NaN; one below
 *                     -FLT_MAX is -inf and weighs nothing, so a row whose every score is that low comes
 *                     out as a row that sees no key (o = 0, lse = -inf); the oracle may be finite;
 *                   - o is sum_j exp(s_j - max) v_j / sum_j exp(s_j - max) with the numerator summed in
 *                     fp32: where it passes FLT_MAX (|v| near FLT_MAX / keys) o comes out Inf;
 *                   - a score's rounding error grows with its magnitude, so the error of o does too:
 *                     apb_tolerance(APB_PREC_F32, keys + D), the bound the tests use, holds for scores
 *                     of order 1 to 10 (inputs in [-1, 1)); with larger logits its elementwise guard
 *                     fails, and only the relative Frobenius figure keeps APB.md 7's 1e-5, up to scores
 *                     of about 500 (inputs in [-20, 20), D = 128; docs/tolerances.md has the figures).
 *                     Any kernel with fp32 scores meets the same; compare such inputs by rel_fro alone.
 * Tested in tests/check_attn.c (hand-worked cases, sweeps against the oracle, invariants).
 */
#ifndef APB_ATTN_H
#define APB_ATTN_H

#include <stdint.h>

#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_attn_args {
  int64_t P, A, B;      /* passing keys, anchor rows/keys, local rows (and local keys if local_keys) */
  int Hq, Hkv, D;       /* Hq % Hkv == 0; D >= 1 */
  int local_keys;       /* 1: local rows see local keys causally (the usual case); 0: no local keys */
  float scale;          /* softmax scale; 0 means 1/sqrt(D) */
  const float *q;       /* [A+B, Hq, D] anchor rows first, then local rows */
  const float *kp, *vp; /* [P, Hkv, D] passing block (may be NULL when P == 0) */
  const float *ka, *va; /* [A, Hkv, D] anchor (may be NULL when A == 0) */
  const float *kb, *vb; /* [B, Hkv, D] local block (may be NULL when B == 0 or local_keys == 0) */
  float *o;             /* [A+B, Hq, D] out */
  float *lse;           /* [Hq, A+B] out; may be NULL when not wanted */
} apb_attn_args;

/* Check shapes and pointers: counts >= 0, Hq % Hkv == 0, D >= 1, scale finite and >= 0, every
 * pointer that the shape needs present. Returns APB_EINVAL with a message naming the field. */
apb_status apb_attn_validate(const apb_attn_args *a, apb_error *err);

/* The scale actually used (a->scale, or 1/sqrt(D) when it is 0). */
float apb_attn_scale(const apb_attn_args *a);

/* Attention FLOPs actually needed by the mask (4 * visible (row, key) pairs * D * Hq): the figure
 * every benchmark divides by. */
double apb_attn_flops(const apb_attn_args *a);

apb_status apb_attn_naive(const apb_attn_args *a, apb_error *err);
apb_status apb_attn_fast(const apb_attn_args *a, apb_error *err);

/* LSE merge of n partial results of the same rows (APB.md 4): for each row r and head h
 *   lse = log sum_i exp(lse_i), o = sum_i exp(lse_i - lse) * o_i.
 * Partials with lse = -inf contribute nothing; a row where every partial is -inf gets o = 0 and
 * lse = -inf (never NaN). A partial whose weight exp(lse_i - max lse) underflows to 0 in double (lse_i
 * more than about 745 below the largest) is skipped as well, its o not read: a NaN there does not
 * reach the result (the CUDA merge does the same). o_parts[i] [T, Hq, D], lse_parts[i] [Hq, T]; o and
 * lse may alias part 0. */
apb_status apb_attn_merge(int n, const float *const *o_parts, const float *const *lse_parts, int64_t T,
                          int Hq, int D, float *o, float *lse, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_ATTN_H */
