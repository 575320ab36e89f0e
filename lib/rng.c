/* lib/rng.c: splitmix64 + xoshiro256** (apb/rng.h). Tested in tests/check_dtype.c. */
#include "apb/rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void apb_rng_seed(apb_rng *r, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

uint64_t apb_rng_u64(apb_rng *r) {
  uint64_t *s = r->s;
  uint64_t out = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return out;
}

double apb_rng_uniform(apb_rng *r) { return (double)(apb_rng_u64(r) >> 11) * 0x1.0p-53; }

double apb_rng_normal(apb_rng *r) {
  double u1 = apb_rng_uniform(r), u2 = apb_rng_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint64_t apb_rng_below(apb_rng *r, uint64_t n) {
  uint64_t lim = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = apb_rng_u64(r);
  while (x >= lim);
  return x % n;
}

void apb_rng_fill_uniform(apb_rng *r, float *x, size_t n, float lo, float hi) {
  for (size_t i = 0; i < n; i++) {
    float v = (float)(lo + (hi - lo) * apb_rng_uniform(r));
    /* u < 1, but the rounding to float can still land on hi (u = 1 - 2^-53 gives exactly hi): keep
     * the half-open range that apb/rng.h promises. */
    x[i] = v < hi ? v : nextafterf(hi, lo);
  }
}

void apb_rng_fill_normal(apb_rng *r, float *x, size_t n, float std) {
  for (size_t i = 0; i < n; i++) x[i] = (float)(std * apb_rng_normal(r));
}
