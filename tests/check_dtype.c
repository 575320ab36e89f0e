/* tests/check_dtype.c: element types, bf16/f16 conversion (lib/dtype.c) and the seeded rng (lib/rng.c).
 *
 * What it checks:
 *   - bf16: hand-worked bit patterns (exact values, ties to even in both directions, just above and
 *     below a tie, NaN stays NaN with its sign, Inf, overflow to Inf, negative values, subnormals), a
 *     lossless round trip of all 65536 bf16 patterns, and a sampled sweep over fp32 bit patterns
 *     against an independent rounding written here with rint() in double;
 *   - f16: the same for IEEE binary16 (normals, subnormals, ties, the 65520 overflow edge);
 *   - apb_to_f32 / apb_from_f32 for every type, dtype names, parsing, sizes;
 *   - the rng: the same seed gives the same stream, different seeds differ, apb_rng_below stays in
 *     range (also for n = 1 and n > 2^63), uniform values stay in [0, 1) and fill_uniform in [lo, hi)
 *     even for the largest possible draw (a constructed generator state), normals have mean 0, var 1.
 * What it does not: test conversions that the library does not offer (integers from fp32).
 */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* An assertion for hot loops: Check records the location of every passing ck_assert (a write to the
 * runner), which would dominate loops of millions of checks; this one only calls Check on failure. */
#define LOOP_ASSERT(cond, ...)                                                                               \
  do {                                                                                                       \
    if (!(cond)) ck_abort_msg(__VA_ARGS__);                                                                  \
  } while (0)

static uint32_t bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
static float from_bits(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

/* ---------------------------------------------------------------- bf16 */

START_TEST(test_bf16_patterns) {
  static const struct {
    uint32_t in;
    uint16_t out;
    const char *what;
  } cases[] = {
      {0x3f800000u, 0x3f80, "1.0 exact"},
      {0xbfc00000u, 0xbfc0, "-1.5 exact"},
      {0x00000000u, 0x0000, "+0"},
      {0x80000000u, 0x8000, "-0"},
      {0x3f808000u, 0x3f80, "tie, even below: down"},
      {0x3f818000u, 0x3f82, "tie, odd below: up"},
      {0xbf808000u, 0xbf80, "negative tie: down in magnitude"},
      {0xbf818000u, 0xbf82, "negative tie, odd: up in magnitude"},
      {0x3f808001u, 0x3f81, "just above a tie: up"},
      {0x3f807fffu, 0x3f80, "just below a tie: down"},
      {0x3f80ffffu, 0x3f81, "just below the next value: up"},
      {0x7f800000u, 0x7f80, "+Inf"},
      {0xff800000u, 0xff80, "-Inf"},
      {0x7f7fffffu, 0x7f80, "FLT_MAX overflows to Inf"},
      {0x7f7f8000u, 0x7f80, "tie at the top: to even = Inf"},
      {0x7f7f7fffu, 0x7f7f, "just below the top tie: largest finite"},
      {0xff7fffffu, 0xff80, "-FLT_MAX overflows to -Inf"},
      {0x00008000u, 0x0000, "subnormal tie: down to 0"},
      {0x00018000u, 0x0002, "subnormal tie, odd: up"},
      {0x00000001u, 0x0000, "smallest subnormal: 0"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint16_t got = apb_f32_to_bf16(from_bits(cases[i].in));
    ck_assert_msg(got == cases[i].out, "bf16(0x%08x) [%s] = 0x%04x, want 0x%04x", cases[i].in, cases[i].what,
                  got, cases[i].out);
  }
  /* NaN stays NaN (also a signalling NaN whose payload sits in the dropped low bits), sign kept */
  const uint32_t nans[4] = {0x7fc00000u, 0x7f800001u, 0xffc00001u, 0xff800001u};
  for (int i = 0; i < 4; i++) {
    uint16_t h = apb_f32_to_bf16(from_bits(nans[i]));
    ck_assert_msg(isnan(apb_bf16_to_f32(h)), "bf16(NaN 0x%08x) = 0x%04x is not NaN", nans[i], h);
    ck_assert_msg((h >> 15) == (nans[i] >> 31), "bf16(NaN 0x%08x) lost its sign", nans[i]);
  }
  ck_assert(apb_bf16_to_f32(0x3f80) == 1.0f && apb_bf16_to_f32(0xc040) == -3.0f);
  ck_assert(apb_bf16_round(1.00390625f) == 1.0f);      /* 1 + 2^-8: tie, down to even */
  ck_assert(apb_bf16_round(1.01171875f) == 1.015625f); /* 1 + 3*2^-8: tie, up to even */
  float arr[3] = {1.00390625f, -1.01171875f, 2.0f};
  apb_bf16_round_array(arr, 3);
  ck_assert(arr[0] == 1.0f && arr[1] == -1.015625f && arr[2] == 2.0f);
}
END_TEST

/* Every bf16 pattern survives bf16 -> f32 -> bf16 (NaNs stay NaN). */
START_TEST(test_bf16_roundtrip_all) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = apb_bf16_to_f32((uint16_t)h);
    LOOP_ASSERT(bits(f) == h << 16, "bf16 0x%04x widened to 0x%08x", h, bits(f));
    uint16_t back = apb_f32_to_bf16(f);
    if (isnan(f))
      LOOP_ASSERT(isnan(apb_bf16_to_f32(back)), "bf16 NaN 0x%04x came back as 0x%04x", h, back);
    else
      LOOP_ASSERT(back == h, "bf16 0x%04x came back as 0x%04x", h, back);
  }
}
END_TEST

/* Independent reference: round the finite float x to a binary format with `mant` fraction bits, least
 * normal exponent emin and largest finite value maxf, ties to even (rint in the default rounding
 * mode), in double (exact: x has 24 significant bits and the scaling is by powers of 2). */
static double ref_round(float x, int mant, int emin, double maxf) {
  double ax = fabs((double)x);
  if (ax == 0) return (double)x;
  int e = ilogb(ax);
  if (e < emin) e = emin;
  double q = ldexp(rint(ldexp(ax, mant - e)), e - mant);
  /* overflow: beyond maxf plus half an ulp at the top (exactly half rounds to even = the next power) */
  double half = ldexp(1.0, ilogb(maxf) - mant - 1);
  if (ax >= maxf + half) q = INFINITY;
  return x < 0 ? -q : q;
}

/* Sampled fp32 patterns (every 4099th, plus the patterns around every rounding tie of the sample)
 * against the reference, for both bf16 and f16. */
START_TEST(test_sweep_vs_reference) {
  long checked = 0;
  for (uint64_t p = 0; p < 0x100000000ull; p += 4099) {
    for (int d = -1; d <= 1; d++) {
      uint32_t base = (uint32_t)p;
      /* around the bf16 tie of this pattern, and around its f16 tie */
      uint32_t cand[3] = {base, (base & 0xffff0000u) + 0x8000u + (uint32_t)d,
                          (base & 0xffffe000u) + 0x1000u + (uint32_t)d};
      for (int c = 0; c < 3; c++) {
        float x = from_bits(cand[c]);
        if (!isfinite(x)) continue;
        float b = apb_bf16_to_f32(apb_f32_to_bf16(x));
        double rb = ref_round(x, 7, -126, 0x1.fep127);
        LOOP_ASSERT(bits(b) == bits((float)rb), "bf16 of 0x%08x (%.9g): got %.9g want %.9g", cand[c],
                    (double)x, (double)b, rb);
        float h = apb_f16_to_f32(apb_f32_to_f16(x));
        double rh = ref_round(x, 10, -14, 65504.0);
        LOOP_ASSERT(bits(h) == bits((float)rh), "f16 of 0x%08x (%.9g): got %.9g want %.9g", cand[c],
                    (double)x, (double)h, rh);
        checked++;
      }
    }
  }
  ck_assert(checked > 1000000);
}
END_TEST

/* ---------------------------------------------------------------- f16 */

START_TEST(test_f16_patterns) {
  static const struct {
    float in;
    uint16_t out;
    const char *what;
  } cases[] = {
      {1.0f, 0x3c00, "1"},
      {-2.0f, 0xc000, "-2"},
      {0.0f, 0x0000, "+0"},
      {-0.0f, 0x8000, "-0"},
      {65504.0f, 0x7bff, "largest finite"},
      {65519.0f, 0x7bff, "below the overflow tie"},
      {65520.0f, 0x7c00, "overflow tie: to even = Inf"},
      {1e5f, 0x7c00, "overflow"},
      {-1e5f, 0xfc00, "negative overflow"},
      {INFINITY, 0x7c00, "+Inf"},
      {-INFINITY, 0xfc00, "-Inf"},
      {0x1p-14f, 0x0400, "smallest normal"},
      {0x1p-24f, 0x0001, "smallest subnormal"},
      {0x1p-25f, 0x0000, "half the smallest subnormal: tie to 0"},
      {0x1.000002p-25f, 0x0001, "just above that tie"},
      {0x3p-25f, 0x0002, "1.5 subnormal units: tie, up to even"},
      {0x5p-25f, 0x0002, "2.5 subnormal units: tie, down to even"},
      {0x7fep-25f, 0x03ff, "largest subnormal"},
      {0x7ffp-25f, 0x0400, "tie between the largest subnormal and the smallest normal: even = normal"},
      {0x1.002p0f, 0x3c00, "1 + 2^-11: tie, down to even"},
      {0x1.006p0f, 0x3c02, "1 + 3*2^-11: tie, up to even"},
      {0x1.002002p0f, 0x3c01, "just above a tie"},
      {-0x1.006p0f, 0xbc02, "negative tie"},
      {1e-9f, 0x0000, "underflow to 0"},
      {-1e-9f, 0x8000, "underflow to -0"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint16_t got = apb_f32_to_f16(cases[i].in);
    ck_assert_msg(got == cases[i].out, "f16(%a) [%s] = 0x%04x, want 0x%04x", (double)cases[i].in,
                  cases[i].what, got, cases[i].out);
  }
  ck_assert(isnan(apb_f16_to_f32(apb_f32_to_f16(NAN))));
  ck_assert(isnan(apb_f16_to_f32(apb_f32_to_f16(from_bits(0x7f800001u)))));
  ck_assert(apb_f16_to_f32(0x0001) == 0x1p-24f && apb_f16_to_f32(0x03ff) == 0x3ffp-24f);
  ck_assert(apb_f16_to_f32(0x7bff) == 65504.0f && isinf(apb_f16_to_f32(0xfc00)) &&
            apb_f16_to_f32(0xfc00) < 0);
  ck_assert(signbit(apb_f16_to_f32(0x8000)) && apb_f16_to_f32(0x8000) == 0.0f);
}
END_TEST

START_TEST(test_f16_roundtrip_all) {
  for (uint32_t h = 0; h < 65536; h++) {
    float f = apb_f16_to_f32((uint16_t)h);
    uint16_t back = apb_f32_to_f16(f);
    if (isnan(f))
      LOOP_ASSERT(((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff), "0x%04x decoded as NaN but is not one", h);
    else
      LOOP_ASSERT(back == h, "f16 0x%04x -> %a -> 0x%04x", h, (double)f, back);
  }
}
END_TEST

/* ---------------------------------------------------------------- tables and array conversion */

START_TEST(test_dtype_table) {
  static const struct {
    apb_dtype t;
    const char *name;
    size_t size;
    int is_float;
  } tab[] = {
      {APB_DT_F32, "F32", 4, 1},   {APB_DT_F16, "F16", 2, 1}, {APB_DT_BF16, "BF16", 2, 1},
      {APB_DT_F64, "F64", 8, 1},   {APB_DT_I8, "I8", 1, 0},   {APB_DT_U8, "U8", 1, 0},
      {APB_DT_I16, "I16", 2, 0},   {APB_DT_I32, "I32", 4, 0}, {APB_DT_I64, "I64", 8, 0},
      {APB_DT_BOOL, "BOOL", 1, 0},
  };
  ck_assert_int_eq((int)(sizeof tab / sizeof tab[0]), APB_DT_COUNT);
  for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
    ck_assert_str_eq(apb_dtype_name(tab[i].t), tab[i].name);
    ck_assert_uint_eq(apb_dtype_size(tab[i].t), tab[i].size);
    ck_assert_int_eq(apb_dtype_is_float(tab[i].t), tab[i].is_float);
    apb_dtype back = APB_DT_COUNT;
    ck_assert_int_eq(apb_dtype_parse(tab[i].name, &back), 0);
    ck_assert_int_eq(back, tab[i].t);
  }
  apb_dtype t = APB_DT_F32;
  ck_assert_int_eq(apb_dtype_parse("f32", &t), -1); /* safetensors spelling is upper case */
  ck_assert_int_eq(apb_dtype_parse("F8_E4M3", &t), -1);
  ck_assert_int_eq(apb_dtype_parse("", &t), -1);
  ck_assert_str_eq(apb_dtype_name(APB_DT_COUNT), "?");
  ck_assert_str_eq(apb_dtype_name((apb_dtype)-1), "?");
  ck_assert_uint_eq(apb_dtype_size(APB_DT_COUNT), 0);
  ck_assert_int_eq(apb_dtype_is_float(APB_DT_COUNT), 0);
}
END_TEST

START_TEST(test_to_from_f32) {
  float out[4];
  const double f64[4] = {1.5, -2.25, 1e300, 0x1.0000001p0};
  apb_to_f32(out, f64, APB_DT_F64, 4);
  ck_assert(out[0] == 1.5f && out[1] == -2.25f && isinf(out[2]) && out[3] == 1.0f);
  const int8_t i8[4] = {-128, -1, 0, 127};
  apb_to_f32(out, i8, APB_DT_I8, 4);
  ck_assert(out[0] == -128 && out[1] == -1 && out[2] == 0 && out[3] == 127);
  const uint8_t u8[4] = {0, 1, 200, 255};
  apb_to_f32(out, u8, APB_DT_U8, 4);
  ck_assert(out[2] == 200 && out[3] == 255);
  apb_to_f32(out, u8, APB_DT_BOOL, 2);
  ck_assert(out[0] == 0 && out[1] == 1);
  const int16_t i16[4] = {-32768, 32767, 5, -5};
  apb_to_f32(out, i16, APB_DT_I16, 4);
  ck_assert(out[0] == -32768 && out[1] == 32767 && out[3] == -5);
  const int32_t i32[4] = {INT32_MIN, 16777217, 7, -7};
  apb_to_f32(out, i32, APB_DT_I32, 4);
  ck_assert(out[0] == -0x1p31f && out[1] == 16777216.0f && out[3] == -7);
  const int64_t i64[4] = {INT64_MIN, 1, 2, 1ll << 40};
  apb_to_f32(out, i64, APB_DT_I64, 4);
  ck_assert(out[0] == -0x1p63f && out[3] == 0x1p40f);
  const uint16_t h[4] = {0x3c00, 0xc000, 0x7c00, 0x0001};
  apb_to_f32(out, h, APB_DT_F16, 4);
  ck_assert(out[0] == 1 && out[1] == -2 && isinf(out[2]) && out[3] == 0x1p-24f);
  const uint16_t b[4] = {0x3f80, 0xc040, 0xff80, 0x0000};
  apb_to_f32(out, b, APB_DT_BF16, 4);
  ck_assert(out[0] == 1 && out[1] == -3 && isinf(out[2]) && out[2] < 0 && out[3] == 0);
  const float f[4] = {1, -2, 3.5f, 0x1.002p0f};
  apb_to_f32(out, f, APB_DT_F32, 4);
  ck_assert(memcmp(out, f, sizeof f) == 0);

  uint16_t h2[4], b2[4];
  double d2[4];
  float f2[4];
  ck_assert_int_eq(apb_from_f32(h2, APB_DT_F16, f, 4), 0);
  ck_assert(h2[0] == 0x3c00 && h2[1] == 0xc000 && h2[2] == 0x4300 && h2[3] == 0x3c00);
  ck_assert_int_eq(apb_from_f32(b2, APB_DT_BF16, f, 4), 0);
  ck_assert(b2[0] == 0x3f80 && b2[1] == 0xc000 && b2[2] == 0x4060 && b2[3] == 0x3f80);
  ck_assert_int_eq(apb_from_f32(d2, APB_DT_F64, f, 4), 0);
  ck_assert(d2[2] == 3.5 && d2[3] == (double)0x1.002p0f);
  ck_assert_int_eq(apb_from_f32(f2, APB_DT_F32, f, 4), 0);
  ck_assert(memcmp(f2, f, sizeof f) == 0);
  int32_t i2[4];
  ck_assert_int_eq(apb_from_f32(i2, APB_DT_I32, f, 4), -1);
  ck_assert_int_eq(apb_from_f32(i2, APB_DT_BOOL, f, 4), -1);
}
END_TEST

/* ---------------------------------------------------------------- rng */

START_TEST(test_rng_streams) {
  apb_rng a, b, c;
  apb_rng_seed(&a, 42);
  apb_rng_seed(&b, 42);
  apb_rng_seed(&c, 43);
  int differ = 0;
  for (int i = 0; i < 1000; i++) {
    uint64_t x = apb_rng_u64(&a), y = apb_rng_u64(&b), z = apb_rng_u64(&c);
    ck_assert_msg(x == y, "same seed, different value at %d", i);
    differ += x != z;
  }
  ck_assert_msg(differ > 990, "seeds 42 and 43 agree on %d of 1000 values", 1000 - differ);
  /* the stream is fixed across machines and compilers: the first value of seed 0, computed by hand
   * from splitmix64 and xoshiro256** */
  apb_rng_seed(&a, 0);
  uint64_t s1 = 0x6e789e6aa1b965f4ull; /* splitmix64 output 2 of seed 0 */
  ck_assert_msg(a.s[1] == s1, "splitmix64 seeding: s[1] = 0x%016llx", (unsigned long long)a.s[1]);
  uint64_t m = s1 * 5;
  uint64_t want = ((m << 7) | (m >> 57)) * 9;
  ck_assert_msg(apb_rng_u64(&a) == want, "xoshiro256** output");
}
END_TEST

START_TEST(test_rng_ranges) {
  apb_rng r;
  apb_rng_seed(&r, tu_seed());
  const uint64_t ns[5] = {1, 2, 7, 1000003, (1ull << 63) + 1};
  for (int k = 0; k < 5; k++)
    for (int i = 0; i < 2000; i++) {
      uint64_t v = apb_rng_below(&r, ns[k]);
      LOOP_ASSERT(v < ns[k], "apb_rng_below(%llu) gave %llu", (unsigned long long)ns[k],
                  (unsigned long long)v);
    }
  /* every residue of a small n shows up */
  int seen[7] = {0};
  for (int i = 0; i < 700; i++) seen[apb_rng_below(&r, 7)]++;
  for (int i = 0; i < 7; i++)
    ck_assert_msg(seen[i] > 50, "apb_rng_below(7): %d drawn %d times of 700", i, seen[i]);
  double sum = 0, sum2 = 0;
  const int n = 100000;
  for (int i = 0; i < n; i++) {
    double u = apb_rng_uniform(&r);
    LOOP_ASSERT(u >= 0 && u < 1, "uniform %.17g outside [0, 1)", u);
    double g = apb_rng_normal(&r);
    LOOP_ASSERT(isfinite(g), "normal %g", g);
    sum += g, sum2 += g * g;
  }
  /* mean and variance of n standard normals: standard errors 1/sqrt(n) and sqrt(2/n); 6 sigma */
  ck_assert_msg(fabs(sum / n) < 6 / sqrt(n), "normal mean %g", sum / n);
  ck_assert_msg(fabs(sum2 / n - 1) < 6 * sqrt(2.0 / n), "normal variance %g", sum2 / n);
  float x[1000];
  apb_rng_fill_uniform(&r, x, 1000, -0.5f, 0.25f);
  for (int i = 0; i < 1000; i++)
    LOOP_ASSERT(x[i] >= -0.5f && x[i] < 0.25f, "fill_uniform: x[%d] = %g", i, (double)x[i]);
}
END_TEST

/* Multiplicative inverse of an odd a modulo 2^64 (Newton: each step doubles the correct bits). */
static uint64_t inv64(uint64_t a) {
  uint64_t x = a;
  for (int i = 0; i < 6; i++) x *= 2 - a * x;
  return x;
}

/* The largest draw: a generator state whose next output is 2^64 - 1, built by inverting the
 * xoshiro256** output function out = rotl(5 s[1], 7) * 9. uniform() is then 1 - 2^-53, and
 * fill_uniform must still stay below hi. */
START_TEST(test_rng_top_draw) {
  const uint64_t out = ~0ull;
  uint64_t y = out * inv64(9);
  uint64_t m = (y >> 7) | (y << 57);
  apb_rng r = {{1, m * inv64(5), 3, 4}};
  apb_rng r2 = r, r3 = r;
  ck_assert_msg(apb_rng_u64(&r) == out, "constructed state does not give 2^64-1");
  double u = apb_rng_uniform(&r2);
  ck_assert_msg(u < 1.0 && u == 1.0 - 0x1p-53, "uniform of the top draw: %.17g", u);
  float x;
  apb_rng_fill_uniform(&r3, &x, 1, -1.0f, 1.0f);
  ck_assert_msg(x < 1.0f, "fill_uniform(-1, 1) returned hi = %.9g on the top draw", (double)x);
  ck_assert_msg(x == nextafterf(1.0f, 0.0f), "fill_uniform top draw %.9g", (double)x);
}
END_TEST

static Suite *dtype_suite(void) {
  Suite *s = suite_create("dtype");
  TCase *tc = tu_tcase("conversion", 30);
  tcase_add_test(tc, test_bf16_patterns);
  tcase_add_test(tc, test_bf16_roundtrip_all);
  tcase_add_test(tc, test_f16_patterns);
  tcase_add_test(tc, test_f16_roundtrip_all);
  tcase_add_test(tc, test_sweep_vs_reference);
  tcase_add_test(tc, test_dtype_table);
  tcase_add_test(tc, test_to_from_f32);
  suite_add_tcase(s, tc);
  tc = tu_tcase("rng", 10);
  tcase_add_test(tc, test_rng_streams);
  tcase_add_test(tc, test_rng_ranges);
  tcase_add_test(tc, test_rng_top_draw);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(dtype_suite(), "check_dtype"); }
