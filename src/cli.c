/* src/cli.c: the helpers every apb subcommand shares (see cli.h): command tables, error reporting on
 * stderr (or, under mpirun, into a buffer that rank 0 reports: cli_capture), getopt_long with our own
 * messages, checked parsing of option values, thread counts, clocks, the formatting of shapes and
 * indices, and reading tensors widened to fp32 (an F64 value beyond the F32 range refused).
 *
 * Deliberately not here: option tables, help texts and anything else one command alone needs. Nothing
 * here exits; every function returns a code the command passes up. Tested through the program in
 * tests/check_cli.c (every usage error there goes through these functions).
 */
#include "cli.h"

#include <cblas.h>
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- command tables */

const cli_command *cli_find(const cli_command *table, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (strcmp(table[i].name, name) == 0) return &table[i];
  return NULL;
}

void cli_list(const cli_command *table, int n) {
  int w = 0;
  for (int i = 0; i < n; i++) {
    int len = (int)strlen(table[i].name);
    if (len > w) w = len;
  }
  for (int i = 0; i < n; i++) printf("  %-*s  %s\n", w, table[i].name, table[i].summary);
}

int cli_call(cli_fn fn, int argc, char **argv) {
  optind = 0; /* glibc: 0 re-initialises getopt completely, so each command starts at argv[1] */
  return fn(argc, argv);
}

/* ---------------------------------------------------------------- reporting */

static char *capture_buf; /* cli_capture: the first message goes here instead of stderr */
static size_t capture_cap;

void cli_capture(char *buf, size_t cap) {
  capture_buf = cap ? buf : NULL, capture_cap = cap;
  if (capture_buf) capture_buf[0] = 0;
}

static void vreport(const char *cmd, const char *fmt, va_list ap) {
  if (capture_buf) {
    if (!capture_buf[0]) vsnprintf(capture_buf, capture_cap, fmt, ap);
    return;
  }
  fprintf(stderr, "apb %s: ", cmd);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
}

int cli_usage(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vreport(cmd, fmt, ap);
  va_end(ap);
  if (!capture_buf) fprintf(stderr, "Try 'apb %s --help' for the options and their defaults.\n", cmd);
  return CLI_USAGE;
}

int cli_fail(const char *cmd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vreport(cmd, fmt, ap);
  va_end(ap);
  return CLI_FAIL;
}

int cli_report(const char *cmd, apb_status st, const apb_error *err) {
  const char *msg = err && err->msg[0] ? err->msg : apb_status_str(st);
  if (capture_buf) {
    if (!capture_buf[0]) snprintf(capture_buf, capture_cap, "%s (%s)", msg, apb_status_str(st));
    return CLI_FAIL;
  }
  fprintf(stderr, "apb %s: %s (%s)\n", cmd, msg, apb_status_str(st));
  return CLI_FAIL;
}

/* ---------------------------------------------------------------- options */

int cli_getopt(const char *cmd, int argc, char **argv, const struct option *opts) {
  /* ':' first: a missing value is reported as ':' rather than '?', so the two messages differ. */
  char sopts[256];
  size_t k = 0;
  sopts[k++] = ':';
  for (const struct option *o = opts; o->name && k + 4 < sizeof sopts; o++) {
    if (o->flag || o->val <= 0 || o->val > 127 || !isalnum(o->val)) continue;
    sopts[k++] = (char)o->val;
    if (o->has_arg == required_argument) sopts[k++] = ':';
    if (o->has_arg == optional_argument) sopts[k++] = ':', sopts[k++] = ':';
  }
  sopts[k] = 0;

  opterr = 0;
  int c = getopt_long(argc, argv, sopts, opts, NULL);
  if (c != '?' && c != ':') return c;
  const char *typed = optind >= 1 && optind - 1 < argc ? argv[optind - 1] : "?";
  int is_long = strncmp(typed, "--", 2) == 0;
  if (c == ':') {
    if (is_long) cli_usage(cmd, "option '%s' needs a value", typed);
    else cli_usage(cmd, "option '-%c' needs a value", optopt);
  } else if (is_long && optopt != 0) {
    cli_usage(cmd, "option '%.*s' takes no value", (int)strcspn(typed, "="), typed);
  } else if (is_long) {
    cli_usage(cmd, "unknown or ambiguous option '%.*s'", (int)strcspn(typed, "="), typed);
  } else {
    cli_usage(cmd, "unknown option '-%c'", optopt ? optopt : '?');
  }
  return '?';
}

/* Parse s in full as an integer with an optional K/M/G suffix; 0 on success. */
static int parse_i64(const char *s, int64_t *out) {
  if (!s || !*s || isspace((unsigned char)*s)) return -1;
  errno = 0;
  char *end;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s) return -1;
  int64_t mul = 1;
  switch (*end) {
  case 'k': case 'K': mul = INT64_C(1) << 10; end++; break;
  case 'm': case 'M': mul = INT64_C(1) << 20; end++; break;
  case 'g': case 'G': mul = INT64_C(1) << 30; end++; break;
  default: break;
  }
  if (*end) return -1;
  if (v > INT64_MAX / mul || v < INT64_MIN / mul) return -1;
  *out = (int64_t)v * mul;
  return 0;
}

int cli_parse_i64(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi, int64_t *out) {
  int64_t v;
  if (parse_i64(s, &v) != 0 || v < lo || v > hi)
    return cli_usage(cmd, "%s wants an integer in [%lld, %lld], got '%s'", opt, (long long)lo,
                     (long long)hi, s ? s : "");
  *out = v;
  return 0;
}

int cli_parse_int(const char *cmd, const char *opt, const char *s, int lo, int hi, int *out) {
  int64_t v = 0;
  int rc = cli_parse_i64(cmd, opt, s, lo, hi, &v);
  if (rc == 0) *out = (int)v;
  return rc;
}

int cli_parse_f64(const char *cmd, const char *opt, const char *s, double lo, double hi, double *out) {
  char *end = NULL;
  double v = 0;
  int ok = s && *s && !isspace((unsigned char)*s);
  if (ok) {
    errno = 0;
    v = strtod(s, &end);
    ok = end != s && *end == 0 && errno != ERANGE && isfinite(v) && v >= lo && v <= hi;
  }
  if (!ok)
    return cli_usage(cmd, "%s wants a finite number in [%g, %g], got '%s'", opt, lo, hi, s ? s : "");
  *out = v;
  return 0;
}

const char *const cli_rate_names[CLI_RATE_COUNT] = {"attn-tflops", "gemm-tflops", "mem-gbs", "link-gbs",
                                                    "latency-us"};

int cli_parse_rate(const char *cmd, int which, const char *s, apb_hw *hw) {
  static const double lo[CLI_RATE_COUNT] = {1e-6, 1e-6, 1e-6, 1e-6, 0}, hi[CLI_RATE_COUNT] = {1e6, 1e6, 1e9, 1e9, 1e9},
                      unit[CLI_RATE_COUNT] = {1e12, 1e12, 1e9, 1e9, 1e-6};
  char opt[32];
  double v = 0;
  if (which < 0 || which >= CLI_RATE_COUNT) return cli_usage(cmd, "internal: no rate option %d", which);
  snprintf(opt, sizeof opt, "--%s", cli_rate_names[which]);
  int rc = cli_parse_f64(cmd, opt, s, lo[which], hi[which], &v);
  if (rc) return rc;
  v *= unit[which];
  switch (which) {
  case CLI_RATE_ATTN: hw->attn_flops_s = v; break;
  case CLI_RATE_GEMM: hw->gemm_flops_s = v; break;
  case CLI_RATE_MEM: hw->mem_bytes_s = v; break;
  case CLI_RATE_LINK: hw->link_bytes_s = v; break;
  default: hw->link_latency_s = v; break;
  }
  return 0;
}

static const char *const shape_names[CLI_SHAPE_COUNT] = {"layers",   "hidden", "ffn",   "q-heads",
                                                           "kv-heads", "head-dim", "vocab", "scorer-width"};

int cli_parse_shape(const char *cmd, int which, const char *s, cli_shape *shape) {
  if (which < 0 || which >= CLI_SHAPE_COUNT) return cli_usage(cmd, "internal: size option %d", which);
  char opt[32];
  snprintf(opt, sizeof opt, "--%s", shape_names[which]);
  /* the bounds here only keep the value an int; apb_config_check applies apb's limits */
  int64_t v = 0;
  int rc = cli_parse_i64(cmd, opt, s, which == CLI_SHAPE_SCORER ? 0 : 1, INT32_MAX, &v);
  if (rc) return rc;
  shape->v[which] = v, shape->set[which] = 1, shape->any = 1;
  return 0;
}

int cli_apply_shape(const char *cmd, const cli_shape *shape, int flags, apb_model_config *cfg, int *scorer_width,
                    char *desc, size_t len) {
  int *field[CLI_SHAPE_COUNT] = {&cfg->n_layers,   &cfg->hidden, &cfg->ffn,   &cfg->n_heads,
                                 &cfg->n_kv_heads, &cfg->head_dim, &cfg->vocab, scorer_width};
  size_t at = 0;
  if (len) desc[0] = 0;
  for (int i = 0; i < CLI_SHAPE_COUNT; i++) {
    if (!shape->set[i]) continue;
    *field[i] = (int)shape->v[i];
    if (at < len)
      at += (size_t)snprintf(desc + at, len - at, "%s%s %lld", at ? ", " : " (", shape_names[i], (long long)shape->v[i]);
  }
  if (at && at < len) snprintf(desc + at, len - at, ")");
  apb_error err = {0};
  if (apb_config_check(cfg, &err) != APB_OK) return cli_usage(cmd, "the model's sizes: %s", err.msg);
  if (*scorer_width > (1 << 20)) return cli_usage(cmd, "--scorer-width %d: apb takes 0 to %d", *scorer_width, 1 << 20);
  if ((flags & CLI_SHAPE_NEED_HEADS) && *scorer_width < 1)
    return cli_usage(cmd, "--scorer-width 0 leaves the model without retaining heads, and apb %s scores with them "
                          "(it has no --scorer option): give a width >= 1", cmd);
  if ((flags & CLI_SHAPE_CUDA) && cfg->head_dim > APB_CUDA_MAX_HEAD_DIM)
    return cli_usage(cmd, "head dimension %d: the CUDA kernels take at most %d (the CPU backends take any even one)",
                     cfg->head_dim, APB_CUDA_MAX_HEAD_DIM);
  return 0;
}

void cli_json_model(FILE *f, const apb_model_config *cfg, int scorer_width) {
  fprintf(f,
          "\"model\": {\"layers\": %d, \"hidden\": %d, \"ffn\": %d, \"q_heads\": %d, \"kv_heads\": %d, "
          "\"head_dim\": %d, \"vocab\": %d, \"scorer_width\": %d}",
          cfg->n_layers, cfg->hidden, cfg->ffn, cfg->n_heads, cfg->n_kv_heads, cfg->head_dim, cfg->vocab, scorer_width);
}

int cli_parse_i64_list(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                       int64_t *out, int max, int *n) {
  int count = 0, ok = s != NULL && *s != 0;
  const char *p = s;
  while (ok) {
    size_t len = strcspn(p, ",");
    char item[64];
    if (count >= max || len == 0 || len >= sizeof item) {
      ok = 0;
      break;
    }
    memcpy(item, p, len);
    item[len] = 0;
    int64_t v;
    if (parse_i64(item, &v) != 0 || v < lo || v > hi) {
      ok = 0;
      break;
    }
    out[count++] = v;
    if (p[len] == 0) break;
    p += len + 1;
  }
  if (!ok)
    return cli_usage(cmd, "%s wants a comma-separated list of 1 to %d integers in [%lld, %lld], got '%s'",
                     opt, max, (long long)lo, (long long)hi, s ? s : "");
  *n = count;
  return 0;
}

int cli_parse_choice(const char *cmd, const char *opt, const char *s, const char *const *names, int n,
                     int *out) {
  for (int i = 0; i < n; i++)
    if (s && strcmp(s, names[i]) == 0) {
      *out = i;
      return 0;
    }
  char list[256];
  size_t k = 0;
  list[0] = 0;
  for (int i = 0; i < n && k < sizeof list; i++)
    k += (size_t)snprintf(list + k, sizeof list - k, "%s%s", i ? ", " : "", names[i]);
  return cli_usage(cmd, "%s wants one of %s; got '%s'", opt, list, s ? s : "");
}

/* ---------------------------------------------------------------- shared helpers */

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

float cli_median_f(float *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp_float);
  return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

void cli_set_threads(int n) {
  if (n <= 0) return;
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int cli_threads(void) { return omp_get_max_threads(); }

double cli_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* printf-append to buf [cap] at *k, never past the end (truncated output stays NUL-terminated). */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static void append(char *buf, size_t cap, size_t *k, const char *fmt, ...) {
  if (*k >= cap) return;
  va_list ap;
  va_start(ap, fmt);
  int w = vsnprintf(buf + *k, cap - *k, fmt, ap);
  va_end(ap);
  if (w > 0) *k += (size_t)w;
}

void cli_format_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t k = 0;
  if (cap == 0) return;
  buf[0] = 0;
  append(buf, cap, &k, "[");
  for (int i = 0; i < ndim; i++) append(buf, cap, &k, "%s%lld", i ? "," : "", (long long)shape[i]);
  append(buf, cap, &k, "]");
}

void cli_format_index(char *buf, size_t cap, int ndim, const int64_t *shape, int64_t flat) {
  int64_t idx[APB_ST_MAX_DIMS];
  int64_t rest = flat;
  if (ndim > APB_ST_MAX_DIMS) ndim = APB_ST_MAX_DIMS;
  for (int i = ndim - 1; i >= 0; i--) {
    int64_t e = shape[i] > 0 ? shape[i] : 1;
    idx[i] = rest % e;
    rest /= e;
  }
  cli_format_shape(buf, cap, ndim, idx);
}

apb_status cli_read_tensor(const apb_st_file *f, const apb_st_tensor *t, float **out, apb_error *err) {
  int64_t n = apb_st_numel(t);
  *out = NULL;
  if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float))
    return apb_error_set(err, APB_ENOMEM, "tensor '%s' of %s: %lld elements do not fit in memory",
                         t->name, f->path, (long long)n);
  float *x = malloc(n > 0 ? (size_t)n * sizeof *x : 1);
  if (!x)
    return apb_error_set(err, APB_ENOMEM, "tensor '%s' of %s: cannot allocate %lld floats", t->name,
                         f->path, (long long)n);
  apb_status st = apb_st_read_f32(f, t, x, err);
  if (st != APB_OK) {
    free(x);
    return st;
  }
  /* an F64 value past the F32 range became +-Inf: a NaN/Inf check would blame the file, and two such
   * values would compare equal (1e300 against 2e300) */
  for (int64_t i = 0; t->dtype == APB_DT_F64 && i < n; i++) {
    double d;
    memcpy(&d, (const unsigned char *)t->data + (size_t)i * sizeof d, sizeof d);
    if (isfinite(d) && !isfinite(x[i])) {
      char idx[128];
      cli_format_index(idx, sizeof idx, t->ndim, t->shape, i);
      free(x);
      return apb_error_set(err, APB_EUNSUPPORTED,
                           "tensor '%s' of %s: the F64 value %g at %s is beyond the F32 range (|x| <= %g) apb "
                           "reads it into; scale the tensor down", t->name, f->path, d, idx, (double)FLT_MAX);
    }
  }
  *out = x;
  return APB_OK;
}

int64_t cli_first_nonfinite(const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(x[i])) return i;
  return -1;
}

double cli_time_sgemm(int g, int reps, uint64_t seed) {
  size_t n = (size_t)g * (size_t)g;
  float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b), *c = malloc(n * sizeof *c);
  double *t = malloc((size_t)(reps > 0 ? reps : 1) * sizeof *t);
  double med = -1;
  if (a && b && c && t && reps > 0) {
    apb_rng r;
    apb_rng_seed(&r, seed ^ 0x5eedull);
    apb_rng_fill_normal(&r, a, n, 1.0f);
    apb_rng_fill_normal(&r, b, n, 1.0f);
    for (int i = -1; i < reps; i++) {
      double t0 = cli_now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g, g, g, 1.0f, a, g, b, g, 0.0f, c, g);
      if (i >= 0) t[i] = cli_now() - t0;
    }
    for (int i = 1; i < reps; i++) /* insertion sort: reps is small */
      for (int j = i; j > 0 && t[j] < t[j - 1]; j--) {
        double x = t[j];
        t[j] = t[j - 1], t[j - 1] = x;
      }
    med = reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
  }
  free(a), free(b), free(c), free(t);
  return med;
}

apb_run_opts cli_method_opts(const apb_run_opts *o, apb_method m, int n_methods) {
  apb_run_opts r = *o;
  r.method = m;
  if (n_methods > 1 && m == APB_METHOD_STAR) r.passing = -1;
  /* star embeds no query unless told to: the offset is apb's */
  if (n_methods > 1 && m == APB_METHOD_STAR && o->embed_query < 0) r.query_offset = -1;
  if (n_methods > 1 && m != APB_METHOD_APB && m != APB_METHOD_STAR) r.balance = 0;
  return r;
}

int cli_parse_methods(const char *cmd, const char *opt, const char *s, apb_method *out, int *n) {
  *n = 0;
  for (const char *t = s;; t++) {
    const size_t len = strcspn(t, ",");
    char name[32];
    if (len == 0) return cli_usage(cmd, "%s '%s': an empty item; give methods separated by single commas", opt, s);
    snprintf(name, sizeof name, "%.*s", len < sizeof name ? (int)len : (int)sizeof name - 1, t);
    apb_method m;
    if (len >= sizeof name || apb_method_parse(name, &m))
      return cli_usage(cmd, "%s: unknown method '%.*s' (dense, ring, zigzag, ulysses, star, apb)", opt, (int)len, t);
    for (int i = 0; i < *n; i++)
      if (out[i] == m) return cli_usage(cmd, "%s: '%s' is listed twice", opt, name);
    out[(*n)++] = m; /* distinct, so at most APB_METHOD_COUNT */
    t += len;
    if (!*t) return CLI_OK;
  }
}
