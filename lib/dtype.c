/* lib/dtype.c: dtype table and fp32 <-> bf16/f16 conversion (apb/dtype.h).
 * Tested in tests/check_dtype.c against hand-worked bit patterns, including ties, NaN, Inf and f16
 * subnormals. */
#include "apb/dtype.h"

#include <math.h>
#include <string.h>

static const struct {
  const char *name;
  size_t size;
  int is_float;
} dtypes[APB_DT_COUNT] = {
    [APB_DT_F32] = {"F32", 4, 1}, [APB_DT_F16] = {"F16", 2, 1}, [APB_DT_BF16] = {"BF16", 2, 1},
    [APB_DT_F64] = {"F64", 8, 1}, [APB_DT_I8] = {"I8", 1, 0},   [APB_DT_U8] = {"U8", 1, 0},
    [APB_DT_I16] = {"I16", 2, 0}, [APB_DT_I32] = {"I32", 4, 0}, [APB_DT_I64] = {"I64", 8, 0},
    [APB_DT_BOOL] = {"BOOL", 1, 0},
};

size_t apb_dtype_size(apb_dtype t) { return (unsigned)t < APB_DT_COUNT ? dtypes[t].size : 0; }
const char *apb_dtype_name(apb_dtype t) { return (unsigned)t < APB_DT_COUNT ? dtypes[t].name : "?"; }
int apb_dtype_is_float(apb_dtype t) { return (unsigned)t < APB_DT_COUNT && dtypes[t].is_float; }

int apb_dtype_parse(const char *name, apb_dtype *out) {
  for (int i = 0; i < APB_DT_COUNT; i++)
    if (strcmp(name, dtypes[i].name) == 0) {
      *out = (apb_dtype)i;
      return 0;
    }
  return -1;
}

static inline uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
static inline float bits_f32(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

uint16_t apb_f32_to_bf16(float x) {
  uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
  uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb; /* round to nearest, ties to even; overflow rounds to Inf as IEEE does */
  return (uint16_t)(u >> 16);
}

float apb_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

float apb_bf16_round(float x) { return apb_bf16_to_f32(apb_f32_to_bf16(x)); }

void apb_bf16_round_array(float *x, size_t n) {
  for (size_t i = 0; i < n; i++) x[i] = apb_bf16_round(x[i]);
}

uint16_t apb_f32_to_f16(float x) {
  uint32_t u = f32_bits(x);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to Inf */
  if (a < 0x38800000u) {                                    /* below the smallest normal, 2^-14 */
    if (a < 0x33000000u) return sign;                       /* below half the smallest subnormal */
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(a >> 23); /* value / 2^-24 = mant * 2^(E - 126), E < 113 */
    uint32_t half = 1u << (shift - 1);
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t r = mant >> shift;
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((a >> 13) - (112u << 10)); /* rebias 127 -> 15 */
  uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
  return (uint16_t)(sign | r);
}

float apb_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    float v = ldexpf((float)m, -24);
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

void apb_to_f32(float *dst, const void *src, apb_dtype t, size_t n) {
  switch (t) {
  case APB_DT_F32: memmove(dst, src, n * 4); return;
  case APB_DT_F16: {
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = apb_f16_to_f32(s[i]);
    return;
  }
  case APB_DT_BF16: {
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = apb_bf16_to_f32(s[i]);
    return;
  }
  case APB_DT_F64: {
    const double *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_I8: {
    const int8_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_U8:
  case APB_DT_BOOL: {
    const uint8_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_I16: {
    const int16_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_I32: {
    const int32_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_I64: {
    const int64_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
    return;
  }
  case APB_DT_COUNT: break;
  }
}

int apb_from_f32(void *dst, apb_dtype t, const float *src, size_t n) {
  switch (t) {
  case APB_DT_F32: memmove(dst, src, n * 4); return 0;
  case APB_DT_F16: {
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = apb_f32_to_f16(src[i]);
    return 0;
  }
  case APB_DT_BF16: {
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = apb_f32_to_bf16(src[i]);
    return 0;
  }
  case APB_DT_F64: {
    double *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = src[i];
    return 0;
  }
  default: return -1;
  }
}
