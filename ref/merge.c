/* ref/merge.c: the LSE merge of partial attention results (shared/APB.md 4; also ring's per-step
 * merge of APB.md 5).
 *
 * What it is: for each row r and query head h, given n partials (o_i, lse_i) of the same rows computed
 * over disjoint key sets,
 *   m = max_i lse_i,  w_i = exp(lse_i - m),  lse = m + log(sum_i w_i),  o = sum_i (w_i / sum_j w_j) o_i,
 * accumulated in double and rounded once. A partial with lse = -inf (its rows saw no key) is skipped
 * outright, so that its o (zero, or anything else) never reaches the result; a row where every partial
 * is -inf gets o = 0 and lse = -inf, never NaN. o and lse may alias part 0: each output element is
 * written only after every partial's element at the same index has been read.
 *
 * What it deliberately is not: a streaming/online merge, or a check of its inputs for NaN (a NaN lse
 * propagates, it is not hidden; a NaN in the o of a partial whose weight underflows to 0 is not read,
 * as the CUDA merge, which skips those loads, does not read it either).
 *
 * Tested in tests/check_attn.c: merging attention over two halves of a key set equals attention over
 * the whole; merging with an all -inf partial is bitwise the identity; all -inf rows give o = 0 and
 * lse = -inf; in-place (aliased) output.
 */
#include "apb/attn.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

apb_status apb_attn_merge(int n, const float *const *o_parts, const float *const *lse_parts, int64_t T,
                          int Hq, int D, float *o, float *lse, apb_error *err) {
  if (n < 1) return apb_error_set(err, APB_EINVAL, "attn_merge: n=%d partials, need >= 1", n);
  if (T < 0 || Hq < 1 || D < 1)
    return apb_error_set(err, APB_EINVAL,
                         "attn_merge: bad shape T=%lld, Hq=%d, D=%d (need T >= 0, Hq, D >= 1)", (long long)T,
                         Hq, D);
  if (T == 0) return APB_OK;
  if (T > INT64_MAX / 4 / ((int64_t)Hq * D))
    return apb_error_set(err, APB_EINVAL, "attn_merge: shape too large (T=%lld, Hq=%d, D=%d)", (long long)T, Hq, D);
  if (!o_parts || !lse_parts || !o)
    return apb_error_set(err, APB_EINVAL, "attn_merge: %s is NULL",
                         !o_parts     ? "o_parts"
                         : !lse_parts ? "lse_parts"
                                      : "o");
  for (int i = 0; i < n; i++)
    if (!o_parts[i] || !lse_parts[i])
      return apb_error_set(err, APB_EINVAL, "attn_merge: %s[%d] is NULL",
                           !o_parts[i] ? "o_parts" : "lse_parts", i);

  double *w = malloc((size_t)n * sizeof *w); /* [n] weights of one (row, head) */
  if (!w) return apb_error_set(err, APB_ENOMEM, "attn_merge: cannot allocate %d weights", n);

  for (int64_t r = 0; r < T; r++)
    for (int h = 0; h < Hq; h++) {
      const int64_t li = (int64_t)h * T + r, oi = (r * Hq + h) * (int64_t)D;
      double m = -INFINITY;
      for (int i = 0; i < n; i++) {
        double l = lse_parts[i][li];
        if (l > m || isnan(l)) m = l;
      }
      if (m == -INFINITY) { /* no partial saw a key */
        for (int d = 0; d < D; d++) o[oi + d] = 0.0f;
        if (lse) lse[li] = -INFINITY;
        continue;
      }
      double sum = 0;
      for (int i = 0; i < n; i++) {
        double l = lse_parts[i][li];
        w[i] = l == -INFINITY ? 0.0 : exp(l - m);
        sum += w[i];
      }
      for (int i = 0; i < n; i++) w[i] /= sum;
      for (int d = 0; d < D; d++) {
        double acc = 0;
        for (int i = 0; i < n; i++)
          if (w[i] != 0.0) acc += w[i] * (double)o_parts[i][oi + d];
        o[oi + d] = (float)acc;
      }
      if (lse) lse[li] = (float)(m + log(sum));
    }
  free(w);
  return APB_OK;
}
