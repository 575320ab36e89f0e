/* src/cmd_cmp.c: `apb cmp A B`, every tensor of safetensors file A against the same-named tensor of the
 * reference file B, through the one comparison helper (apb_compare / apb_cmp_within) and the one
 * tolerance table (apb_tolerance), with one table row per tensor. When equality is asked for, two
 * integer tensors are also compared as int64 and an F64 tensor against a float one as double (fp32
 * cannot hold all their values), and a failure shows the file's values.
 *
 * Exit codes follow cmp(1) and diff(1): 0 all within tolerance, 1 some tensor differs (out of
 * tolerance, non-finite, different shape, or present in one file only), 2 trouble (usage, a file that
 * cannot be read). Not here: per-element dumps or metadata comparison. Tested in tests/check_cli.c
 * (equal files pass, perturbed files fail, NaN is reported).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char *const cmd = "cmp";

static const char help_text[] =
    "Usage: apb cmp A B [--rel-fro F] [--rtol R] [--atol T]\n"
    "       apb cmp A B [--prec fp32|tf32|bf16|f16|exact] [--k N]\n"
    "\n"
    "Compares every tensor of safetensors file A with the tensor of the same name in B, the reference.\n"
    "Shapes must match; dtypes may differ (both are widened to F32; an F64 value beyond the F32 range\n"
    "is refused as a file that cannot be read). When equality is asked for, two integer tensors are\n"
    "also compared as int64 and an F64 tensor against a float one as double, values F32 cannot all\n"
    "hold. One row per tensor:\n"
    "  tensor, shape, n             what was compared\n"
    "  nan, inf                     non-finite mismatches, checked first: any NaN fails, and so does an\n"
    "                               Inf in A that B does not have at the same place\n"
    "  max_abs, max_rel, rel_fro    max |A-B|, max |A-B|/|B|, ||A-B||_F / ||B||_F\n"
    "  at, got, ref                 the worst element (the first non-finite one, else the first element\n"
    "                               outside the elementwise bound, else the largest |A-B|) as a\n"
    "                               multi-index, with its values in A and B\n"
    "  result                       PASS or FAIL; a FAIL is followed by a line saying why\n"
    "\n"
    "Tolerance, one of three forms:\n"
    "  (none given)           rel_fro <= 1e-5 (shared/APB.md 7: the bound on fp32 paths), no\n"
    "                         elementwise test\n"
    "  --prec P [--k N]       the tolerance table (apb_tolerance, docs/tolerances.md) for precision P\n"
    "                         (fp32 when only --k is given) and reduction length N, the longest sum\n"
    "                         feeding one output, e.g. the number of keys for attention (default 1):\n"
    "                         a bound on rel_fro plus |A-B| <= c*rms(B) + c*|B| per element;\n"
    "                         --prec exact: every element equal\n"
    "  --rel-fro F, --rtol R, explicit bounds, a bound not given is not tested: rel_fro <= F, and per\n"
    "  --atol T               element |A-B| <= T + R*|B| when --rtol or --atol is given (the other\n"
    "                         one defaults to 0; --rtol 0 --atol 0 demands equal values)\n"
    "\n"
    "Options:\n"
    "  --rel-fro F   bound on the relative Frobenius error (not tested unless given)\n"
    "  --rtol R      elementwise relative bound (default 0 when --atol is given)\n"
    "  --atol T      elementwise absolute bound (default 0 when --rtol is given)\n"
    "  --prec P      fp32, tf32, bf16, f16 or exact (table form; default fp32 when --k is given)\n"
    "  --k N         reduction length for the table, 1 <= N (default 1)\n"
    "  -h, --help    this text\n"
    "\n"
    "Exit status: 0 every tensor within tolerance, 1 a tensor out of tolerance, non-finite, of another\n"
    "shape or in one file only, 2 usage error or a file that cannot be read.\n";

static const char *const prec_names[] = {"fp32", "tf32", "bf16", "f16", "exact"};
static const apb_prec prec_values[] = {APB_PREC_F32, APB_PREC_TF32, APB_PREC_BF16, APB_PREC_F16,
                                       APB_PREC_EXACT};

typedef struct cmp_opts {
  const char *a, *b;
  apb_tol tol;
  int exact_elem;    /* --rtol 0 --atol 0: every element must be equal */
  char desc[256];    /* the tolerance in words, for the header */
} cmp_opts;

/* Parse argv into o; CLI_OK, CLI_USAGE, or -1 after printing --help. */
static int parse(int argc, char **argv, cmp_opts *o) {
  enum { O_RTOL = 256, O_ATOL, O_RELFRO, O_PREC, O_K };
  static const struct option opts[] = {
      {"rtol", required_argument, NULL, O_RTOL}, {"atol", required_argument, NULL, O_ATOL},
      {"rel-fro", required_argument, NULL, O_RELFRO}, {"prec", required_argument, NULL, O_PREC},
      {"k", required_argument, NULL, O_K},       {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  double rtol = -1, atol = -1, rel_fro = -1;
  int prec = -1;
  int64_t k = -1;
  int c, rc = 0;
  memset(o, 0, sizeof *o);
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(help_text, stdout); return -1;
    case O_RTOL: rc = cli_parse_f64(cmd, "--rtol", optarg, 0, 1e30, &rtol); break;
    case O_ATOL: rc = cli_parse_f64(cmd, "--atol", optarg, 0, 1e30, &atol); break;
    case O_RELFRO: rc = cli_parse_f64(cmd, "--rel-fro", optarg, 0, 1e30, &rel_fro); break;
    case O_PREC: rc = cli_parse_choice(cmd, "--prec", optarg, prec_names, 5, &prec); break;
    case O_K: rc = cli_parse_i64(cmd, "--k", optarg, 1, INT64_C(1) << 40, &k); break;
    default: return CLI_USAGE;
    }
  }
  if (rc) return rc;
  if (argc - optind != 2)
    return cli_usage(cmd, "wants two files, A and the reference B; got %d", argc - optind);
  o->a = argv[optind];
  o->b = argv[optind + 1];

  int explicit_tol = rtol >= 0 || atol >= 0 || rel_fro >= 0;
  if (explicit_tol && (prec >= 0 || k >= 0))
    return cli_usage(cmd,
                     "give either --prec/--k (the tolerance table) or --rel-fro/--rtol/--atol, not both");
  if (explicit_tol) {
    int elem = rtol >= 0 || atol >= 0;
    o->tol = (apb_tol){.rel_fro = rel_fro, .atol = atol > 0 ? atol : 0, .rtol = rtol > 0 ? rtol : 0};
    o->exact_elem = elem && o->tol.atol == 0 && o->tol.rtol == 0;
    size_t n = 0;
    if (rel_fro >= 0) n += (size_t)snprintf(o->desc, sizeof o->desc, "rel_fro <= %g", rel_fro);
    else n += (size_t)snprintf(o->desc, sizeof o->desc, "rel_fro not tested");
    if (o->exact_elem) snprintf(o->desc + n, sizeof o->desc - n, ", every element equal");
    else if (elem)
      snprintf(o->desc + n, sizeof o->desc - n, ", |A-B| <= %g + %g*|B|", o->tol.atol, o->tol.rtol);
    else snprintf(o->desc + n, sizeof o->desc - n, ", no elementwise test");
  } else if (prec >= 0 || k >= 0) {
    apb_prec p = prec >= 0 ? prec_values[prec] : APB_PREC_F32;
    if (k < 0) k = 1;
    o->tol = apb_tolerance(p, k);
    if (p == APB_PREC_EXACT)
      snprintf(o->desc, sizeof o->desc, "table %s: every element equal", apb_prec_name(p));
    else
      snprintf(o->desc, sizeof o->desc,
               "table %s at k=%lld: rel_fro <= %.3g, |A-B| <= %.3g*rms(B) + %.3g*|B|", apb_prec_name(p),
               (long long)k, o->tol.rel_fro, o->tol.atol_rms, o->tol.rtol);
  } else {
    o->tol = (apb_tol){.rel_fro = 1e-5};
    snprintf(o->desc, sizeof o->desc, "rel_fro <= 1e-05 (default), no elementwise test");
  }
  return CLI_OK;
}

/* Column widths of the table. */
typedef struct widths {
  int name, shape;
} widths;

static void header(const widths *w) {
  printf("%-*s  %-*s  %10s  %5s  %5s  %-10s  %-10s  %-10s  %-*s  %-15s  %-15s  %s\n", w->name, "tensor",
         w->shape, "shape", "n", "nan", "inf", "max_abs", "max_rel", "rel_fro", w->shape, "at", "got", "ref",
         "result");
}

/* Equality asked for, and values that fp32 cannot all hold (integers past 2^24, F64): the fp32
 * comparison may call two different values equal, so two integer tensors are compared as int64, and an
 * F64 tensor against a float one (F64, F32, BF16 or F16; xf, yf are the files' values read as fp32,
 * exact for all but F64) as double. The index of the first unequal element (its values in got, ref),
 * -1 when all are equal or the pair is of another kind (an integer against a float tensor stays
 * compared in fp32), -2 when a tensor could not be read (err says why). */
static int64_t unequal_in_own_type(const apb_st_file *fa, const apb_st_tensor *ta, const apb_st_file *fb,
                                   const apb_st_tensor *tb, int64_t n, const float *xf, const float *yf, char *got,
                                   char *ref, size_t cap, apb_status *st, apb_error *err) {
  const int ia = !apb_dtype_is_float(ta->dtype), ib = !apb_dtype_is_float(tb->dtype);
  if (ia && ib) {
    int64_t *x = malloc(sizeof *x * (size_t)(n ? n : 1)), *y = malloc(sizeof *y * (size_t)(n ? n : 1));
    int64_t at = -1;
    if (!x || !y) *st = apb_error_set(err, APB_ENOMEM, "%s: cannot allocate %lld int64 values", ta->name, (long long)n);
    else if (!(*st = apb_st_read_i64(fa, ta, x, err)) && !(*st = apb_st_read_i64(fb, tb, y, err)))
      for (int64_t i = 0; i < n && at < 0; i++)
        if (x[i] != y[i]) at = i, snprintf(got, cap, "%lld", (long long)x[i]), snprintf(ref, cap, "%lld", (long long)y[i]);
    free(x), free(y);
    return *st ? -2 : at;
  }
  if ((ta->dtype == APB_DT_F64 || tb->dtype == APB_DT_F64) && !ia && !ib)
    for (int64_t i = 0; i < n; i++) {
      double x = xf[i], y = yf[i]; /* the mapping need not be 8-byte aligned */
      if (ta->dtype == APB_DT_F64) memcpy(&x, (const char *)ta->data + 8 * i, 8);
      if (tb->dtype == APB_DT_F64) memcpy(&y, (const char *)tb->data + 8 * i, 8);
      if (!(x == y)) {
        snprintf(got, cap, "%.17g", x), snprintf(ref, cap, "%.17g", y);
        return i;
      }
    }
  return -1;
}

/* Compare one pair of same-shaped tensors; prints the row (and the reason on failure). Returns 1 when
 * within tolerance, 0 when not, -1 when a tensor could not be read (reported on stderr). */
static int compare_one(const cmp_opts *o, const widths *w, const apb_st_file *fa, const apb_st_tensor *ta,
                       const apb_st_file *fb, const apb_st_tensor *tb) {
  apb_error err;
  apb_error_clear(&err);
  float *x = NULL, *y = NULL;
  apb_status st = cli_read_tensor(fa, ta, &x, &err);
  if (st == APB_OK) st = cli_read_tensor(fb, tb, &y, &err);
  if (st != APB_OK) {
    free(x);
    cli_report(cmd, st, &err);
    return -1;
  }
  int64_t n = apb_st_numel(ta);
  apb_cmp c;
  int ok = apb_cmp_within(x, y, n, &o->tol, &c);
  if (ok && o->exact_elem && c.max_abs != 0) {
    ok = 0;
    for (int64_t i = 0; i < n; i++)
      if (x[i] != y[i]) {
        c.max_abs_idx = i, c.worst_got = x[i], c.worst_ref = y[i];
        break;
      }
  }
  int64_t at = c.first_bad >= 0 ? c.first_bad : c.max_abs_idx;
  char shape[128], idx[128] = "-", got[32] = "-", ref[32] = "-";
  cli_format_shape(shape, sizeof shape, ta->ndim, ta->shape);
  if (at >= 0) {
    snprintf(got, sizeof got, "%.9g", (double)c.worst_got);
    snprintf(ref, sizeof ref, "%.9g", (double)c.worst_ref);
  }
  const int equality = o->exact_elem || (o->tol.rel_fro == 0 && o->tol.atol == 0 && o->tol.atol_rms == 0 &&
                                         o->tol.rtol == 0);
  if (equality && !c.n_nan && !c.n_inf) { /* also when fp32 failed: the values then shown are the file's */
    int64_t u = unequal_in_own_type(fa, ta, fb, tb, n, x, y, got, ref, sizeof got, &st, &err);
    if (u == -2) {
      free(x), free(y);
      cli_report(cmd, st, &err);
      return -1;
    }
    if (u >= 0) ok = 0, at = u;
  }
  if (at >= 0) cli_format_index(idx, sizeof idx, ta->ndim, ta->shape, at);
  printf("%-*s  %-*s  %10lld  %5lld  %5lld  %-10.3g  %-10.3g  %-10.3g  %-*s  %-15s  %-15s  %s\n", w->name,
         ta->name, w->shape, shape, (long long)n, (long long)c.n_nan, (long long)c.n_inf, c.max_abs,
         c.max_rel, c.rel_fro, w->shape, idx, got, ref, ok ? "PASS" : "FAIL");
  if (!ok) {
    if (c.n_nan || c.n_inf)
      printf("  %s: FAIL: %lld NaN and %lld Inf mismatches, the first at %s (A %s, B %s)\n", ta->name,
             (long long)c.n_nan, (long long)c.n_inf, idx, got, ref);
    else if (equality)
      printf("  %s: FAIL: values differ and equality was asked for; %s differs (A %s, B %s)\n", ta->name, idx,
             got, ref);
    else if (o->tol.rel_fro >= 0 && c.rel_fro > o->tol.rel_fro)
      printf("  %s: FAIL: rel_fro %.3g > %.3g\n", ta->name, c.rel_fro, o->tol.rel_fro);
    else
      printf("  %s: FAIL: element %s is outside the elementwise bound (A %s, B %s)\n", ta->name, idx, got,
             ref);
  }
  free(x);
  free(y);
  return ok;
}

static int run(const cmp_opts *o, apb_st_file *fa, apb_st_file *fb) {
  widths w = {6, 5};
  for (int i = 0; i < fa->n; i++) {
    char shape[128];
    cli_format_shape(shape, sizeof shape, fa->tensors[i].ndim, fa->tensors[i].shape);
    int ln = (int)strlen(fa->tensors[i].name), ls = (int)strlen(shape);
    if (ln > w.name) w.name = ln < 40 ? ln : 40;
    if (ls > w.shape) w.shape = ls;
  }
  printf("apb cmp: %s against the reference %s\ntolerance: %s\n", o->a, o->b, o->desc);
  header(&w);
  int n_fail = 0, n_pass = 0, trouble = 0;
  for (int i = 0; i < fa->n; i++) {
    const apb_st_tensor *ta = &fa->tensors[i], *tb = apb_st_find(fb, ta->name);
    if (!tb) continue; /* listed below */
    if (ta->ndim != tb->ndim || memcmp(ta->shape, tb->shape, (size_t)ta->ndim * sizeof ta->shape[0]) != 0) {
      char sa[128], sb[128];
      cli_format_shape(sa, sizeof sa, ta->ndim, ta->shape);
      cli_format_shape(sb, sizeof sb, tb->ndim, tb->shape);
      printf("%-*s  %-*s  shape differs: %s in A, %s in B  FAIL\n", w.name, ta->name, w.shape, sa, sa, sb);
      n_fail++;
      continue;
    }
    int r = compare_one(o, &w, fa, ta, fb, tb);
    if (r < 0) trouble = 1;
    else if (r) n_pass++;
    else n_fail++;
  }
  int only_a = 0, only_b = 0;
  for (int i = 0; i < fa->n; i++) only_a += apb_st_find(fb, fa->tensors[i].name) == NULL;
  for (int i = 0; i < fb->n; i++) only_b += apb_st_find(fa, fb->tensors[i].name) == NULL;
  if (only_a || only_b) {
    fprintf(stderr, "apb cmp: the files hold different tensors; compare files of the same computation\n");
    for (int i = 0; i < fa->n; i++)
      if (!apb_st_find(fb, fa->tensors[i].name))
        fprintf(stderr, "apb cmp:   only in A (%s): %s\n", o->a, fa->tensors[i].name);
    for (int i = 0; i < fb->n; i++)
      if (!apb_st_find(fa, fb->tensors[i].name))
        fprintf(stderr, "apb cmp:   only in B (%s): %s\n", o->b, fb->tensors[i].name);
  }
  printf("%d of %d tensors within tolerance", n_pass, fa->n + only_b);
  if (only_a || only_b) printf(" (%d only in A, %d only in B)", only_a, only_b);
  printf(": %s\n", n_fail || only_a || only_b || trouble ? "FAIL" : "PASS");
  if (trouble) return CLI_USAGE;
  return n_fail || only_a || only_b ? CLI_FAIL : CLI_OK;
}

int cmd_cmp(int argc, char **argv) {
  cmp_opts o;
  int rc = parse(argc, argv, &o);
  if (rc < 0) return CLI_OK;
  if (rc) return rc;
  apb_error err;
  apb_error_clear(&err);
  apb_st_file *fa = NULL, *fb = NULL;
  apb_status st = apb_st_open(o.a, &fa, &err);
  if (st == APB_OK) st = apb_st_open(o.b, &fb, &err);
  if (st != APB_OK) {
    if (fa) apb_st_close(fa);
    cli_report(cmd, st, &err);
    return CLI_USAGE; /* cannot compare at all: trouble, as cmp(1) says */
  }
  rc = run(&o, fa, fb);
  apb_st_close(fa);
  apb_st_close(fb);
  return rc;
}
