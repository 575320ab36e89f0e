/* apb/compare.h: the one comparison helper and the one tolerance table (shared/APB.md 7).
 *
 * apb_compare() measures `got` against the reference `ref`: it counts non-finite values first (NaN or
 * Inf in got where ref is finite, or any NaN, fails before anything else is looked at), then reports
 * the max abs error, the max rel error (|got-ref| / max(|ref|, tiny)), the relative Frobenius error
 * ||got-ref|| / ||ref|| (accumulated in double), and the worst index with both values.
 *
 * apb_tolerance() is the table: bounds derived from the storage/compute precision and the reduction
 * length K of the computation (the longest sum feeding one output). Tests, `apb cmp` and the GPU
 * agreement runs all take their bounds from here, never tuned by eye. docs/tolerances.md explains it.
 * Tested in tests/check_compare.c.
 */
#ifndef APB_COMPARE_H
#define APB_COMPARE_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_cmp {
  int64_t n;            /* elements compared */
  int64_t n_nan;        /* NaN in got or ref */
  int64_t n_inf;        /* Inf in got where ref differs (an Inf matched exactly in both is allowed) */
  int64_t first_bad;    /* index of the first non-finite mismatch, -1 if none */
  double max_abs;       /* max |got - ref| */
  int64_t max_abs_idx;
  double max_rel;       /* max |got - ref| / max(|ref|, 1e-30) */
  int64_t max_rel_idx;
  double rel_fro;       /* ||got - ref||_F / ||ref||_F (abs Frobenius when ||ref|| == 0) */
  double ref_norm;      /* ||ref||_F */
  float worst_got, worst_ref; /* values at max_abs_idx (or first_bad when non-finite) */
} apb_cmp;

typedef struct apb_tol {
  double rel_fro;       /* bound on the relative Frobenius error; < 0 skips this test */
  double atol;          /* elementwise, absolute */
  double atol_rms;      /* elementwise, in units of the reference's RMS value (scale-free) */
  double rtol;          /* elementwise, relative: |got-ref| <= atol + atol_rms*rms(ref) + rtol*|ref| */
} apb_tol;             /* all of atol, atol_rms, rtol <= 0 skips the elementwise test, except that an
                          all-zero apb_tol (APB_PREC_EXACT) demands bitwise-equal values */

/* Precision classes of the table. */
typedef enum apb_prec {
  APB_PREC_F32 = 0,     /* fp32 storage and fp32 (or better) accumulation vs a double oracle */
  APB_PREC_TF32,        /* fp32 storage, tf32 matrix products */
  APB_PREC_BF16,        /* bf16 storage, fp32 accumulation */
  APB_PREC_F16,         /* f16 storage, fp32 accumulation */
  APB_PREC_EXACT,       /* must be bitwise equal */
  APB_PREC_COUNT
} apb_prec;

void apb_compare(const float *got, const float *ref, int64_t n, apb_cmp *out);

/* The table entry for precision p and reduction length k (k >= 1). */
apb_tol apb_tolerance(apb_prec p, int64_t k);
const char *apb_prec_name(apb_prec p);

/* Compare (as apb_compare) and test against t: 1 when there is no non-finite mismatch, the relative
 * Frobenius error is within t->rel_fro, and every element is within the elementwise bound. On an
 * elementwise failure c->max_abs_idx, worst_got and worst_ref name the first offending element. */
int apb_cmp_within(const float *got, const float *ref, int64_t n, const apb_tol *t, apb_cmp *c);

/* One line: "name: n=.. max_abs=.. @idx (got .. ref ..) max_rel=.. rel_fro=.. [nan=.. inf=..]". */
void apb_cmp_print(FILE *fp, const char *name, const apb_cmp *c);

#ifdef __cplusplus
}
#endif
#endif /* APB_COMPARE_H */
