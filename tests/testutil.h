/* tests/testutil.h: what every Check suite shares.
 *
 * - The seed: APB_SEED from the environment, else a fixed default; printed at the start of each suite
 *   and in every failure message, so a failure can be replayed with APB_SEED=<seed> make check.
 * - Buffers with a guard region after them, filled with a poison value (NaN) before a call, so that
 *   unwritten outputs and overruns are caught.
 * - One closeness assertion built on apb_compare() and the tolerance table: it fails on non-finite
 *   values first, then prints max abs / max rel / relative Frobenius error and the worst index.
 */
#ifndef APB_TESTUTIL_H
#define APB_TESTUTIL_H

#include <check.h>
#include <stdint.h>
#include <stdio.h>

#include "apb/apb.h"

#define TU_DEFAULT_SEED 20261127u

/* The suite's seed (APB_SEED or the default). Printed once to stderr by tu_run(). */
uint64_t tu_seed(void);

/* A test case with an explicit timeout in seconds (Check's CK_TIMEOUT_MULTIPLIER still applies). */
TCase *tu_tcase(const char *name, double timeout_s);
/* Run a suite, printing its name and seed first; returns the exit code for main(): 77 (SKIP) when no
 * test ran (a CK_RUN_CASE that names none of its cases), not a pass. */
int tu_run(Suite *s, const char *name);

/* Guarded allocation: n floats followed by TU_GUARD floats of a sentinel pattern. */
#define TU_GUARD 64
float *tu_alloc(size_t n);
/* Fill the n floats with NaN (poison) and (re)write the guard. */
void tu_poison(float *p, size_t n);
/* 1 when the guard after n floats is intact. */
int tu_guard_ok(const float *p, size_t n);
void tu_free(float *p);

/* Random fill (uniform [-1, 1) times amp) from a stream derived from (seed, stream). */
void tu_fill(float *p, size_t n, uint64_t seed, uint64_t stream, float amp);

/* Assert got ~ ref within tol. `what` names the quantity; the seed and all error figures are printed
 * on failure (and the test fails). Also fails when the guard after got[n] was overwritten. */
#define tu_assert_close(what, got, ref, n, tol) \
  tu_assert_close_at(__FILE__, __LINE__, (what), (got), (ref), (n), (tol))
void tu_assert_close_at(const char *file, int line, const char *what, const float *got, const float *ref,
                        int64_t n, apb_tol tol);

/* got against ref where either may hold Inf or NaN: the same class per element (NaN where ref has
 * NaN, the same Inf where it has one, finite where it is finite) and, over the elements finite in
 * both, within tol. 1 when both hold; else 0, after printing the seed, the first element of another
 * class and the error figures to stderr (the caller decides when to fail, e.g. after every path). */
int tu_same_class_close(const char *what, const float *got, const float *ref, int64_t n, apb_tol tol);

/* Assert bitwise equality of two float arrays (memcmp), printing the first differing index. */
#define tu_assert_bitwise(what, a, b, n) tu_assert_bitwise_at(__FILE__, __LINE__, (what), (a), (b), (n))
void tu_assert_bitwise_at(const char *file, int line, const char *what, const float *a, const float *b,
                          int64_t n);

/* Assert that a profiled host's stage_s is a breakdown of its prefill (apb_host_args.profile 1 or 2):
 * every stage >= 0, the stages summing to prefill_s, and the projections, attention and FFN timed. */
#define tu_assert_stages(what, host, hs) tu_assert_stages_at(__FILE__, __LINE__, (what), (host), (hs))
void tu_assert_stages_at(const char *file, int line, const char *what, int host, const apb_host_stats *hs);

/* Path of a fresh temporary file name (under $TMPDIR or /tmp) with the given suffix, unique among
 * processes (mkstemps; the file itself is removed again); caller frees. */
char *tu_tmpname(const char *suffix);

/* Run a shell command line, capturing stdout+stderr into a malloc'd string (*out, may be NULL) and
 * returning the exit status (or -1). Used to test the apb program. */
int tu_sh(const char *cmdline, char **out);

/* The apb program under test: $APB_BIN (set by `make check`), else the build directory's apb, so a
 * suite run by hand from anywhere finds it; fails the test, naming both, when it is not executable. */
const char *tu_apb_bin(void);

#endif /* APB_TESTUTIL_H */
