/* tests/testutil.c: see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const uint32_t guard_bits = 0x7fa5a5a5u; /* a NaN payload nothing computes */

uint64_t tu_seed(void) {
  const char *s = getenv("APB_SEED");
  if (s && *s) return strtoull(s, NULL, 0);
  return TU_DEFAULT_SEED;
}

TCase *tu_tcase(const char *name, double timeout_s) {
  TCase *tc = tcase_create(name);
  tcase_set_timeout(tc, timeout_s);
  return tc;
}

int tu_run(Suite *s, const char *name) {
  fprintf(stderr, "%s: seed %llu (replay with APB_SEED=%llu)\n", name, (unsigned long long)tu_seed(),
          (unsigned long long)tu_seed());
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  const int failed = srunner_ntests_failed(sr), ran = srunner_ntests_run(sr);
  srunner_free(sr);
  if (ran == 0) { /* a filter that matches nothing must not read as a pass */
    fprintf(stderr, "%s: SKIP: no test ran (CK_RUN_SUITE, CK_RUN_CASE or CK_INCLUDE_TAGS selects none of its "
                    "cases; unset them or name one of this suite's)\n", name);
    return 77;
  }
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

float *tu_alloc(size_t n) {
  float *p = malloc((n + TU_GUARD) * sizeof *p);
  ck_assert_msg(p != NULL, "out of memory allocating %zu floats", n);
  tu_poison(p, n);
  return p;
}

void tu_poison(float *p, size_t n) {
  for (size_t i = 0; i < n; i++) p[i] = NAN;
  for (size_t i = 0; i < TU_GUARD; i++) memcpy(&p[n + i], &guard_bits, sizeof guard_bits);
}

int tu_guard_ok(const float *p, size_t n) {
  for (size_t i = 0; i < TU_GUARD; i++)
    if (memcmp(&p[n + i], &guard_bits, sizeof guard_bits) != 0) return 0;
  return 1;
}

void tu_free(float *p) { free(p); }

void tu_fill(float *p, size_t n, uint64_t seed, uint64_t stream, float amp) {
  apb_rng r;
  apb_rng_seed(&r, seed * 0x9E3779B97F4A7C15ull + stream);
  apb_rng_fill_uniform(&r, p, n, -amp, amp);
}

void tu_assert_close_at(const char *file, int line, const char *what, const float *got, const float *ref,
                        int64_t n, apb_tol tol) {
  apb_cmp c;
  int ok = apb_cmp_within(got, ref, n, &tol, &c);
  if (!ok) {
    fprintf(stderr, "%s:%d: seed %llu: %s out of tolerance (rel_fro <= %.3g, atol %.3g, rtol %.3g)\n  ",
            file, line, (unsigned long long)tu_seed(), what, tol.rel_fro, tol.atol, tol.rtol);
    apb_cmp_print(stderr, what, &c);
  }
  ck_assert_msg(ok,
                "%s:%d seed %llu: %s: nan=%lld inf=%lld max_abs=%.4g @%lld (got %.9g ref %.9g) "
                "max_rel=%.4g rel_fro=%.4g > %.3g",
                file, line, (unsigned long long)tu_seed(), what, (long long)c.n_nan, (long long)c.n_inf,
                c.max_abs, (long long)c.max_abs_idx, (double)c.worst_got, (double)c.worst_ref, c.max_rel,
                c.rel_fro, tol.rel_fro);
}

int tu_same_class_close(const char *what, const float *got, const float *ref, int64_t n, apb_tol tol) {
  float *g = malloc(sizeof *g * (size_t)(n ? n : 1)), *r = malloc(sizeof *r * (size_t)(n ? n : 1));
  ck_assert_msg(g && r, "out of memory comparing %lld values", (long long)n);
  int64_t other = -1;
  for (int64_t i = 0; i < n; i++) {
    const int same = isnan(ref[i]) ? isnan(got[i]) : isinf(ref[i]) ? got[i] == ref[i] : isfinite(got[i]);
    if (!same && other < 0) other = i;
    const int fin = isfinite(ref[i]) && isfinite(got[i]);
    g[i] = fin ? got[i] : 0.0f, r[i] = fin ? ref[i] : 0.0f;
  }
  apb_cmp c;
  const int close = apb_cmp_within(g, r, n, &tol, &c);
  if (other >= 0)
    fprintf(stderr, "seed %llu: %s: element %lld is %g where the reference has %g\n", (unsigned long long)tu_seed(),
            what, (long long)other, (double)got[other], (double)ref[other]);
  if (!close) fprintf(stderr, "seed %llu: ", (unsigned long long)tu_seed()), apb_cmp_print(stderr, what, &c);
  free(g), free(r);
  return other < 0 && close;
}

void tu_assert_bitwise_at(const char *file, int line, const char *what, const float *a, const float *b,
                          int64_t n) {
  int64_t bad = -1;
  for (int64_t i = 0; i < n; i++)
    if (memcmp(&a[i], &b[i], sizeof *a) != 0) {
      bad = i;
      break;
    }
  ck_assert_msg(bad < 0, "%s:%d seed %llu: %s not bitwise equal: first difference at %lld (%.9g vs %.9g)",
                file, line, (unsigned long long)tu_seed(), what, (long long)bad,
                bad >= 0 ? (double)a[bad] : 0.0, bad >= 0 ? (double)b[bad] : 0.0);
}

void tu_assert_stages_at(const char *file, int line, const char *what, int host, const apb_host_stats *hs) {
  double sum = 0;
  for (int k = 0; k < APB_STAGE_COUNT; k++) {
    ck_assert_msg(hs->stage_s[k] >= 0, "%s:%d: %s: host %d stage %s %g s < 0", file, line, what, host,
                  apb_stage_name((apb_stage)k), hs->stage_s[k]);
    sum += hs->stage_s[k];
  }
  ck_assert_msg(fabs(sum - hs->prefill_s) <= 1e-9 * hs->prefill_s + 1e-12,
                "%s:%d: %s: host %d stages sum to %.9g s, prefill %.9g s", file, line, what, host, sum, hs->prefill_s);
  const apb_stage busy[] = {APB_STAGE_QKV, APB_STAGE_ATTN, APB_STAGE_OPROJ, APB_STAGE_FFN};
  for (size_t k = 0; k < sizeof busy / sizeof busy[0]; k++)
    ck_assert_msg(hs->stage_s[busy[k]] > 0, "%s:%d: %s: host %d stage %s not timed", file, line, what, host,
                  apb_stage_name(busy[k]));
}

char *tu_tmpname(const char *suffix) {
  /* mkstemps makes a name no file had (a pid and counter would repeat in Check's forked children,
   * whose counters all start from the parent's), then the file is removed so the caller starts clean */
  const char *dir = getenv("TMPDIR");
  if (!dir || !*dir) dir = "/tmp";
  size_t len = strlen(dir) + strlen(suffix) + 32;
  char *p = malloc(len);
  ck_assert(p != NULL);
  /* a suffix with a '/' names a path below the unique name (a directory that does not exist) */
  int nested = strchr(suffix, '/') != NULL;
  snprintf(p, len, "%s/apbtest-XXXXXX%s", dir, nested ? "" : suffix);
  int fd = mkstemps(p, nested ? 0 : (int)strlen(suffix));
  ck_assert_msg(fd >= 0, "cannot create a temporary file in %s", dir);
  close(fd);
  unlink(p);
  if (nested) strcat(p, suffix);
  return p;
}

const char *tu_apb_bin(void) {
  const char *b = getenv("APB_BIN");
  if (!b || !*b) b = APB_TEST_BUILDDIR "/apb";
  ck_assert_msg(access(b, X_OK) == 0, "the apb program %s is not executable (APB_BIN %s; build it with make)", b,
                getenv("APB_BIN") ? "set" : "unset");
  return b;
}

int tu_sh(const char *cmdline, char **out) {
  size_t len = strlen(cmdline) + 16;
  char *full = malloc(len);
  ck_assert(full != NULL);
  snprintf(full, len, "(%s) 2>&1", cmdline);
  FILE *fp = popen(full, "r");
  free(full);
  if (!fp) return -1;
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  ck_assert(buf != NULL);
  size_t got;
  while ((got = fread(buf + n, 1, cap - n - 1, fp)) > 0) {
    n += got;
    if (cap - n < 2) {
      cap *= 2;
      buf = realloc(buf, cap);
      ck_assert(buf != NULL);
    }
  }
  buf[n] = 0;
  int status = pclose(fp);
  if (out)
    *out = buf;
  else
    free(buf);
  if (status == -1) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
