/* apb/rng.h: the seeded random numbers used everywhere (tests, generated models, the random scorer).
 *
 * splitmix64 seeding into xoshiro256**; normals by Box-Muller in double. The same seed gives the same
 * stream on every machine and compiler. Not cryptographic. Tested in tests/check_dtype.c.
 */
#ifndef APB_RNG_H
#define APB_RNG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_rng {
  uint64_t s[4];
} apb_rng;

void apb_rng_seed(apb_rng *r, uint64_t seed);
uint64_t apb_rng_u64(apb_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double apb_rng_uniform(apb_rng *r);
/* Standard normal. */
double apb_rng_normal(apb_rng *r);
/* Uniform integer in [0, n), n >= 1, without modulo bias. */
uint64_t apb_rng_below(apb_rng *r, uint64_t n);
/* Fill x [n] with uniform values in [lo, hi). */
void apb_rng_fill_uniform(apb_rng *r, float *x, size_t n, float lo, float hi);
/* Fill x [n] with normal values times std. */
void apb_rng_fill_normal(apb_rng *r, float *x, size_t n, float std);

#ifdef __cplusplus
}
#endif
#endif /* APB_RNG_H */
