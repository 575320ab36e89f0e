/* tests/check_compare.c: the comparison helper and the tolerance table (lib/compare.c, shared/APB.md 7).
 *
 * What it checks: non-finite values fail before anything else is looked at (NaN in got or ref, Inf
 * against a finite value, Infs of opposite sign), while an Inf matched exactly is allowed; the figures
 * (max abs, max rel, relative Frobenius, worst index and values) on hand-worked vectors; the exact class
 * is bitwise (it tells -0 from +0); the elementwise guard catches one wild element that the Frobenius
 * norm hides; the table is monotone in k, floored at 4u and clamped to the contract (fp32 1e-5,
 * bf16 1e-2); the one-line report.
 * What it does not: judge whether the table's constants are right for a given kernel; check_attn and
 * the GPU suites do that by using it.
 */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const double u32 = 0x1p-24, u16b = 0x1p-8;

/* NaN fails first: even with a far larger error elsewhere, the report names the NaN. */
START_TEST(test_nan_first) {
  float got[5] = {1, 2, 3, NAN, 100}, ref[5] = {1, 2, 3, 4, 5};
  apb_cmp c;
  apb_tol loose = {1e9, 1e9, 0, 0};
  ck_assert_int_eq(apb_cmp_within(got, ref, 5, &loose, &c), 0);
  ck_assert_int_eq(c.n_nan, 1);
  ck_assert_int_eq(c.first_bad, 3);
  ck_assert_msg(isnan(c.worst_got) && c.worst_ref == 4.0f, "worst %g vs %g", (double)c.worst_got,
                (double)c.worst_ref);
  /* NaN in the reference fails too, and NaN against NaN is no match */
  float a[2] = {NAN, 1}, b[2] = {NAN, 1};
  ck_assert_int_eq(apb_cmp_within(a, b, 2, &loose, &c), 0);
  ck_assert_int_eq(c.n_nan, 1);
  ck_assert_int_eq(apb_cmp_within(b + 1, a, 1, &loose, &c), 0);
}
END_TEST

START_TEST(test_inf) {
  apb_cmp c;
  apb_tol t = apb_tolerance(APB_PREC_F32, 1);
  float ref[3] = {-INFINITY, 1, INFINITY};
  float same[3] = {-INFINITY, 1, INFINITY};
  ck_assert_msg(apb_cmp_within(same, ref, 3, &t, &c) == 1 && c.n_inf == 0, "matched Infs must pass");
  float got1[3] = {-INFINITY, INFINITY, INFINITY}; /* Inf where ref is finite */
  ck_assert_int_eq(apb_cmp_within(got1, ref, 3, &t, &c), 0);
  ck_assert_int_eq(c.n_inf, 1);
  ck_assert_int_eq(c.first_bad, 1);
  float got2[3] = {INFINITY, 1, INFINITY}; /* wrong sign */
  ck_assert_int_eq(apb_cmp_within(got2, ref, 3, &t, &c), 0);
  ck_assert_int_eq(c.first_bad, 0);
  float got3[3] = {-INFINITY, 1, 3e38f}; /* finite where ref is Inf */
  ck_assert_int_eq(apb_cmp_within(got3, ref, 3, &t, &c), 0);
  ck_assert_int_eq(c.n_inf, 1);
  /* matched Infs do not enter the norms */
  ck_assert_msg(c.ref_norm == 1.0, "ref_norm %g, want 1 (Infs skipped)", c.ref_norm);
}
END_TEST

/* Figures on a hand-worked vector: ref = (3, 4, 0, -1), got = (3, 4.05, 0, -1.02). */
START_TEST(test_figures) {
  const float ref[4] = {3, 4, 0, -1}, got[4] = {3, 4.05f, 0, -1.02f};
  apb_cmp c;
  apb_compare(got, ref, 4, &c);
  const double d1 = (double)4.05f - 4.0, d3 = fabs((double)-1.02f + 1.0);
  ck_assert_int_eq(c.n, 4);
  ck_assert_int_eq(c.n_nan + c.n_inf, 0);
  ck_assert_int_eq(c.max_abs_idx, 1);
  ck_assert_double_eq_tol(c.max_abs, d1, 1e-15);
  ck_assert_int_eq(c.max_rel_idx, 3); /* 0.02 / 1 beats 0.05 / 4 */
  ck_assert_double_eq_tol(c.max_rel, d3, 1e-15);
  ck_assert_double_eq_tol(c.ref_norm, sqrt(26.0), 1e-15);
  ck_assert_double_eq_tol(c.rel_fro, sqrt(d1 * d1 + d3 * d3) / sqrt(26.0), 1e-15);
  ck_assert_msg(c.worst_got == 4.05f && c.worst_ref == 4.0f, "worst %g vs %g", (double)c.worst_got,
                (double)c.worst_ref);
  /* all-zero reference: the Frobenius figure is absolute */
  const float z[2] = {0, 0}, g[2] = {3e-3f, 4e-3f};
  apb_compare(g, z, 2, &c);
  ck_assert_double_eq_tol(c.rel_fro, 5e-3, 1e-9);
  ck_assert_msg(c.ref_norm == 0, "ref_norm %g", c.ref_norm);
  /* nothing to compare */
  apb_compare(g, z, 0, &c);
  ck_assert_msg(c.max_abs_idx == -1 && c.rel_fro == 0 && c.first_bad == -1, "empty compare");
  apb_tol t = apb_tolerance(APB_PREC_F32, 1);
  ck_assert_int_eq(apb_cmp_within(g, z, 0, &t, &c), 1);
}
END_TEST

/* APB_PREC_EXACT demands bitwise equality: one ulp fails, and so does -0 against +0. */
START_TEST(test_exact) {
  apb_tol t = apb_tolerance(APB_PREC_EXACT, 1000);
  ck_assert_msg(t.rel_fro == 0 && t.atol == 0 && t.atol_rms == 0 && t.rtol == 0, "exact entry not all zero");
  float a[3] = {1, -2, 0.5f}, b[3] = {1, -2, 0.5f};
  apb_cmp c;
  ck_assert_int_eq(apb_cmp_within(a, b, 3, &t, &c), 1);
  b[2] = nextafterf(0.5f, 1.0f);
  ck_assert_int_eq(apb_cmp_within(a, b, 3, &t, &c), 0);
  ck_assert_int_eq(c.max_abs_idx, 2);
  float pz[1] = {0.0f}, nz[1] = {-0.0f};
  ck_assert_msg(apb_cmp_within(pz, nz, 1, &t, &c) == 0, "exact class took -0 for +0");
  float inf1[1] = {INFINITY};
  ck_assert_int_eq(apb_cmp_within(inf1, inf1, 1, &t, &c), 1);
}
END_TEST

/* One wild element among many: the Frobenius bound passes, the elementwise guard must not. */
START_TEST(test_elementwise_guard) {
  const int64_t n = 1000000;
  float *ref = tu_alloc((size_t)n), *got = tu_alloc((size_t)n);
  for (int64_t i = 0; i < n; i++) ref[i] = got[i] = 1.0f;
  /* rel_fro 1e-5 (clamped); elementwise 4u*1000 = 2.4e-4 capped at 8 x 1e-5 for both atol_rms and
   * rtol, so |got - ref| <= 8e-5 * rms(ref) + 8e-5 * |ref| = 1.6e-4 here */
  apb_tol t = apb_tolerance(APB_PREC_F32, n);
  got[123456] = 1.005f;                       /* rel_fro 5e-6: hidden by the norm */
  apb_cmp c;
  ck_assert_int_eq(apb_cmp_within(got, ref, n, &t, &c), 0);
  ck_assert_msg(c.rel_fro < t.rel_fro, "rel_fro %g should pass %g", c.rel_fro, t.rel_fro);
  ck_assert_int_eq(c.max_abs_idx, 123456);
  got[123456] = 1.0f + 1e-4f; /* within 1.6e-4 */
  ck_assert_int_eq(apb_cmp_within(got, ref, n, &t, &c), 1);
  got[123456] = 1.0f + 2e-4f; /* within the uncapped 4u*sqrt(k) = 2.4e-4, beyond the capped 1.6e-4 */
  ck_assert_int_eq(apb_cmp_within(got, ref, n, &t, &c), 0);
  ck_assert_int_eq(c.max_abs_idx, 123456);
  tu_free(ref), tu_free(got);
}
END_TEST

/* rel_fro < 0 skips the Frobenius test; atol alone then decides. */
START_TEST(test_custom_tol) {
  const float ref[2] = {1, 2}, got[2] = {1.5f, 2};
  apb_cmp c;
  apb_tol t = {-1, 0.6, 0, 0};
  ck_assert_int_eq(apb_cmp_within(got, ref, 2, &t, &c), 1);
  t.atol = 0.4;
  ck_assert_int_eq(apb_cmp_within(got, ref, 2, &t, &c), 0);
  apb_tol fro_only = {0.3, 0, 0, 0}; /* rel_fro = 0.5 / sqrt(5) = 0.22 */
  ck_assert_int_eq(apb_cmp_within(got, ref, 2, &fro_only, &c), 1);
  fro_only.rel_fro = 0.2;
  ck_assert_int_eq(apb_cmp_within(got, ref, 2, &fro_only, &c), 0);
}
END_TEST

/* The table: non-decreasing in k, floored at 4u, clamped to the contract of APB.md 7. */
START_TEST(test_table) {
  const apb_prec ps[4] = {APB_PREC_F32, APB_PREC_TF32, APB_PREC_BF16, APB_PREC_F16};
  const double contract[4] = {1e-5, 1e-2, 1e-2, 1e-2};
  for (int i = 0; i < 4; i++) {
    apb_tol prev = apb_tolerance(ps[i], 1);
    for (int64_t k = 1; k <= (int64_t)1 << 40; k = k * 3 / 2 + 1) {
      apb_tol t = apb_tolerance(ps[i], k);
      ck_assert_msg(t.rel_fro >= prev.rel_fro && t.rtol >= prev.rtol && t.atol_rms >= prev.atol_rms,
                    "%s: table decreases at k=%lld", apb_prec_name(ps[i]), (long long)k);
      ck_assert_msg(t.rel_fro > 0 && t.rel_fro <= contract[i], "%s: rel_fro %g at k=%lld outside (0, %g]",
                    apb_prec_name(ps[i]), t.rel_fro, (long long)k, contract[i]);
      ck_assert_msg(t.rtol == t.atol_rms && t.rtol > 0 && t.rtol <= 8 * contract[i] && t.atol == 0,
                    "%s: elementwise terms (atol %g, atol_rms %g, rtol %g) at k=%lld, cap %g", apb_prec_name(ps[i]),
                    t.atol, t.atol_rms, t.rtol, (long long)k, 8 * contract[i]);
      prev = t;
    }
    const apb_tol top = apb_tolerance(ps[i], (int64_t)1 << 40);
    ck_assert_msg(top.rel_fro == contract[i], "%s: not clamped to %g", apb_prec_name(ps[i]), contract[i]);
    ck_assert_msg(top.rtol == 8 * contract[i], "%s: elementwise bound %g not capped at %g", apb_prec_name(ps[i]),
                  top.rtol, 8 * contract[i]);
  }
  /* the cap binds where docs/tolerances.md's values say: fp32 once 4u sqrt(k) > 8e-5 (k > 112590), so
   * k = 8100 is still 4u * 90 and k = 1e6 is capped ... */
  ck_assert_double_eq_tol(apb_tolerance(APB_PREC_F32, 8100).rtol, 360 * u32, 1e-20);
  ck_assert_msg(apb_tolerance(APB_PREC_F32, 1000000).rtol == 8e-5, "fp32 k=1e6: rtol %g, want the cap 8e-5",
                apb_tolerance(APB_PREC_F32, 1000000).rtol);
  /* ... and bf16 once 4u sqrt(k) > 0.08 (k > 26.2): k = 16 is 4u * 4, k = 64 is capped */
  ck_assert_double_eq_tol(apb_tolerance(APB_PREC_BF16, 16).rtol, 16 * u16b, 1e-20);
  ck_assert_msg(apb_tolerance(APB_PREC_BF16, 64).rtol == 0.08, "bf16 k=64: rtol %g, want the cap 0.08",
                apb_tolerance(APB_PREC_BF16, 64).rtol);
  /* fp32 by hand: 16u sqrt(k) until the clamp, elementwise 4u sqrt(k) */
  apb_tol t = apb_tolerance(APB_PREC_F32, 1);
  ck_assert_double_eq_tol(t.rel_fro, 16 * u32, 1e-20);
  ck_assert_double_eq_tol(t.rtol, 4 * u32, 1e-20);
  t = apb_tolerance(APB_PREC_F32, 100);
  ck_assert_double_eq_tol(t.rel_fro, 160 * u32, 1e-20);
  ck_assert_double_eq_tol(t.atol_rms, 40 * u32, 1e-20);
  ck_assert_msg(apb_tolerance(APB_PREC_F32, 0).rel_fro == apb_tolerance(APB_PREC_F32, 1).rel_fro,
                "k < 1 is 1");
  /* bf16: the 4u floor (1.6e-2) is above the contract, so the contract wins for every k */
  ck_assert_msg(apb_tolerance(APB_PREC_BF16, 1).rel_fro == 1e-2, "bf16 k=1: %g",
                apb_tolerance(APB_PREC_BF16, 1).rel_fro);
  ck_assert_double_eq_tol(apb_tolerance(APB_PREC_BF16, 1).rtol, 4 * u16b, 1e-20);
  ck_assert_str_eq(apb_prec_name(APB_PREC_F32), "fp32");
  ck_assert_str_eq(apb_prec_name(APB_PREC_BF16), "bf16");
  ck_assert_str_eq(apb_prec_name(APB_PREC_COUNT), "?");
}
END_TEST

/* The one-line report names the figures, and flags non-finite values. */
START_TEST(test_print) {
  const float ref[3] = {1, 2, 3}, got[3] = {1, NAN, 3.5f};
  apb_cmp c;
  apb_compare(got, ref, 3, &c);
  char *buf = NULL;
  size_t len = 0;
  FILE *fp = open_memstream(&buf, &len);
  ck_assert(fp != NULL);
  apb_cmp_print(fp, "stage", &c);
  fclose(fp);
  ck_assert_msg(strncmp(buf, "stage: n=3 ", 11) == 0, "report: %s", buf);
  ck_assert_msg(strstr(buf, "max_abs=") && strstr(buf, "rel_fro=") && strstr(buf, "NONFINITE nan=1"),
                "report: %s", buf);
  ck_assert_msg(buf[len - 1] == '\n', "report not one line");
  free(buf);
}
END_TEST

static Suite *compare_suite(void) {
  Suite *s = suite_create("compare");
  TCase *tc = tu_tcase("compare", 10);
  tcase_add_test(tc, test_nan_first);
  tcase_add_test(tc, test_inf);
  tcase_add_test(tc, test_figures);
  tcase_add_test(tc, test_exact);
  tcase_add_test(tc, test_elementwise_guard);
  tcase_add_test(tc, test_custom_tol);
  tcase_add_test(tc, test_table);
  tcase_add_test(tc, test_print);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(compare_suite(), "check_compare"); }
