/* lib/rope.c: RoPE inverse frequencies after scaling (apb/model.h), in double.
 *
 * For i = 0 .. D/2-1 the unscaled frequency is theta^(-2i/D). Then, by type:
 *   default  unchanged
 *   linear   divided by factor
 *   llama3   with wavelength w = 2 pi / f and the two thresholds w_lo = original / low_freq_factor and
 *            w_hi = original / high_freq_factor (w_lo > w_hi):
 *              w < w_hi           f              (high frequencies keep their value)
 *              w > w_lo           f / factor     (low frequencies are stretched)
 *              otherwise          (1 - s) f / factor + s f,  s = (original / w - low) / (high - low)
 *            which is the rule of transformers' _compute_llama3_parameters (and of Meta's reference).
 *
 * Precision: transformers computes all of this in fp32 (torch.arange(...).float() / D, base ** that,
 * then the llama3 arithmetic on fp32 tensors), and then the angle pos * f as an fp32 product before
 * cos/sin. We compute the frequencies in double, and a backend is expected to form the angle in
 * double too (or at least reduce it exactly). The two differ by about pos * f * 2^-24 radians per
 * rotation pair, roughly 2e-5 rad at position 300 for f = 1 and 8e-3 rad at 131072: small against the
 * 1e-5 relative tolerance of a short fixture, but it grows with the position, so comparisons against
 * transformers at long context must allow for it (docs/model.md). We deliberately do not emulate fp32
 * here: double is the better answer, and the oracle is supposed to be the better answer.
 *
 * Tested in tests/check_model.c against closed-form values computed in the test, and end to end
 * against transformers fixtures.
 */
#include <math.h>

#include "apb/model.h"

void apb_rope_inv_freq(const apb_rope *r, int D, double *inv_freq) {
  if (!r || !inv_freq || D < 2) return;
  const double two_pi = 6.283185307179586476925286766559;
  double lo_wave = 0, hi_wave = 0;
  if (r->type == APB_ROPE_LLAMA3) {
    lo_wave = (double)r->original_max_pos / r->low_freq_factor;
    hi_wave = (double)r->original_max_pos / r->high_freq_factor;
  }
  for (int i = 0; i < D / 2; i++) {
    double f = pow(r->theta, -(double)(2 * i) / (double)D);
    switch (r->type) {
    case APB_ROPE_DEFAULT: break;
    case APB_ROPE_LINEAR: f /= r->factor; break;
    case APB_ROPE_LLAMA3: {
      double w = two_pi / f;
      if (w > lo_wave) {
        f /= r->factor;
      } else if (!(w < hi_wave)) {
        double s =
            ((double)r->original_max_pos / w - r->low_freq_factor) / (r->high_freq_factor - r->low_freq_factor);
        f = (1.0 - s) * f / r->factor + s * f;
      }
      break;
    }
    }
    inv_freq[i] = f;
  }
}
