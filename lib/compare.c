/* lib/compare.c: apb_compare() and the tolerance table (apb/compare.h, docs/tolerances.md).
 *
 * The table. u is the unit roundoff of the storage precision (fp32 2^-24, tf32 2^-11, bf16 2^-8,
 * f16 2^-11). A sum of k rounded terms has a typical relative error near u*sqrt(k) and a worst case
 * near u*k; the bound on the relative Frobenius error is c*u*sqrt(k) with a safety factor c = 16,
 * clamped to the contract of shared/APB.md 7 (fp32 paths <= 1e-5, bf16 paths <= 1e-2) and to a floor
 * of 4u (a single rounding of inputs and outputs). The elementwise bound is atol_rms = rtol =
 * 4u*sqrt(k) (at least 4u): no element may be off by more than that fraction of the reference's RMS
 * value plus that fraction of itself, a guard against a single wild element that a Frobenius norm
 * would hide. It is capped at 8x the contract's Frobenius bound (bf16 at long reductions would
 * otherwise allow errors above 100% and guard nothing).
 * Tested in tests/check_compare.c.
 */
#include "apb/compare.h"

#include <math.h>
#include <string.h>

static int is_nan(float x) { return x != x; }

void apb_compare(const float *got, const float *ref, int64_t n, apb_cmp *c) {
  c->n = n;
  c->n_nan = c->n_inf = 0;
  c->first_bad = -1;
  c->max_abs = c->max_rel = 0;
  c->max_abs_idx = c->max_rel_idx = -1;
  c->worst_got = c->worst_ref = 0;
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    float g = got[i], r = ref[i];
    if (is_nan(g) || is_nan(r)) {
      c->n_nan++;
      if (c->first_bad < 0) c->first_bad = i;
      continue;
    }
    if (isinf(g) || isinf(r)) {
      if (g != r) {
        c->n_inf++;
        if (c->first_bad < 0) c->first_bad = i;
      }
      continue;
    }
    double d = fabs((double)g - (double)r);
    double rel = d / fmax(fabs((double)r), 1e-30);
    if (d > c->max_abs || c->max_abs_idx < 0) c->max_abs = d, c->max_abs_idx = i;
    if (rel > c->max_rel || c->max_rel_idx < 0) c->max_rel = rel, c->max_rel_idx = i;
    num += d * d;
    den += (double)r * (double)r;
  }
  c->ref_norm = sqrt(den);
  c->rel_fro = den > 0 ? sqrt(num) / sqrt(den) : sqrt(num);
  int64_t w = c->first_bad >= 0 ? c->first_bad : c->max_abs_idx;
  if (w >= 0) c->worst_got = got[w], c->worst_ref = ref[w];
}

static const struct {
  const char *name;
  double u;        /* unit roundoff */
  double contract; /* APB.md 7 bound on the relative Frobenius error per stage */
} prec_table[APB_PREC_COUNT] = {
    [APB_PREC_F32] = {"fp32", 0x1p-24, 1e-5},
    [APB_PREC_TF32] = {"tf32", 0x1p-11, 1e-2},
    [APB_PREC_BF16] = {"bf16", 0x1p-8, 1e-2},
    [APB_PREC_F16] = {"f16", 0x1p-11, 1e-2},
    [APB_PREC_EXACT] = {"exact", 0, 0},
};

const char *apb_prec_name(apb_prec p) { return (unsigned)p < APB_PREC_COUNT ? prec_table[p].name : "?"; }

apb_tol apb_tolerance(apb_prec p, int64_t k) {
  apb_tol t = {0, 0, 0, 0};
  if ((unsigned)p >= APB_PREC_COUNT || p == APB_PREC_EXACT) return t;
  if (k < 1) k = 1;
  double u = prec_table[p].u, sk = sqrt((double)k);
  double fro = 16.0 * u * sk;
  if (fro < 4.0 * u) fro = 4.0 * u;
  if (fro > prec_table[p].contract) fro = prec_table[p].contract;
  t.rel_fro = fro;
  double el = 4.0 * u * sk > 4.0 * u ? 4.0 * u * sk : 4.0 * u;
  if (el > 8.0 * prec_table[p].contract) el = 8.0 * prec_table[p].contract;
  t.atol_rms = t.rtol = el;
  return t;
}

int apb_cmp_within(const float *got, const float *ref, int64_t n, const apb_tol *t, apb_cmp *c) {
  apb_compare(got, ref, n, c);
  if (c->n_nan || c->n_inf) return 0;
  if (t->rel_fro == 0 && t->atol == 0 && t->atol_rms == 0 && t->rtol == 0) { /* exact: bit for bit */
    for (int64_t i = 0; i < n; i++)
      if (memcmp(&got[i], &ref[i], sizeof *got) != 0) { /* also tells -0 from +0 */
        c->max_abs_idx = i;
        c->worst_got = got[i], c->worst_ref = ref[i];
        return 0;
      }
    return 1;
  }
  if (t->rel_fro >= 0 && c->rel_fro > t->rel_fro) return 0;
  if (t->atol <= 0 && t->atol_rms <= 0 && t->rtol <= 0) return 1;
  double rms = n > 0 ? c->ref_norm / sqrt((double)n) : 0;
  double atol = (t->atol > 0 ? t->atol : 0) + (t->atol_rms > 0 ? t->atol_rms * rms : 0);
  double rtol = t->rtol > 0 ? t->rtol : 0;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)got[i] - (double)ref[i]);
    if (d > atol + rtol * fabs((double)ref[i])) {
      c->max_abs_idx = i;
      c->worst_got = got[i], c->worst_ref = ref[i];
      return 0;
    }
  }
  return 1;
}

void apb_cmp_print(FILE *fp, const char *name, const apb_cmp *c) {
  fprintf(fp, "%s: n=%lld max_abs=%.4g @%lld (got %.9g ref %.9g) max_rel=%.4g rel_fro=%.4g", name,
          (long long)c->n, c->max_abs, (long long)c->max_abs_idx, (double)c->worst_got,
          (double)c->worst_ref, c->max_rel, c->rel_fro);
  if (c->n_nan || c->n_inf)
    fprintf(fp, " NONFINITE nan=%lld inf=%lld first@%lld", (long long)c->n_nan, (long long)c->n_inf,
            (long long)c->first_bad);
  fputc('\n', fp);
}
