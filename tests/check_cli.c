/* tests/check_cli.c: the apb program, run as a user runs it ($APB_BIN, set by the Makefile), on files
 * this suite writes itself with apb_st_write into temporary paths.
 *
 * - attn round trips (dense, star, apb; naive and fast; F32 and BF16 inputs; awkward sizes and GQA
 *   ratios 1, 3, 4, 8): the program's o and lse against apb_attn_naive called here directly, bitwise
 *   for --impl naive, within the fp32 tolerance table for --impl fast (k = keys + D, the reduction
 *   length docs/tolerances.md defines for attention).
 * - cmp: equal files pass (exit 0), also across dtypes; a perturbed element fails (exit 1) and is named
 *   by its multi-index; NaN is counted and fails; tensors in one file only fail; an unreadable file is
 *   exit 2; explicit and table tolerances; equality asked of integer and F64 tensors compares them in
 *   their own type, and an F64 value beyond the F32 range is refused (cmp and attn).
 * - every rejected input of attn (one loop test per row of bad_cases): a non-zero exit of the right
 *   kind (1 bad data, 2 usage) and the message substring that tells the user what was wrong.
 * - the dispatcher (help, version, unknown command), bench attn and demo on tiny shapes; run's and
 *   predict's refusals, gen-model's cleanup after a failed write, attn --out on a pipe or a directory.
 * Not here: the numerics of attention themselves (tests/check_attn.c). Each test spawns the program a
 * few times; the whole suite takes a few seconds.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

static const char *bin(void) { return tu_apb_bin(); }

/* Run "$APB_BIN <args>" (args printf-formatted); *out receives stdout+stderr (free it). */
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int apb(char **out, const char *fmt, ...) {
  char args[4096], line[8192];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(args, sizeof args, fmt, ap);
  va_end(ap);
  snprintf(line, sizeof line, "'%s' %s", bin(), args);
  int rc = tu_sh(line, out);
  ck_assert_msg(rc >= 0, "could not run %s", line);
  return rc;
}

#define assert_has(out, needle) \
  ck_assert_msg(strstr((out), (needle)) != NULL, "expected '%s' in the output:\n%s", (needle), (out))

/* ---------------------------------------------------------------- input files */

typedef struct qkv_spec {
  int64_t R, K;      /* q rows, k/v keys */
  int Hq, Hkv, D;    /* 0: 4, 2 and 8 */
  apb_dtype dtype;   /* of all three tensors (F32 or BF16 here) */
  int q_rank2;       /* write q as [R, Hq*D] */
  int64_t v_K;       /* v's key count when it should differ from k's (0: K) */
  int k_D;           /* k's and v's head dim when it should differ from q's (0: D) */
  int omit_v;
  int64_t nan_k, inf_q; /* poison k[nan_k - 1] with NaN, q[inf_q - 1] with -Inf; 0: none */
  float qk_scale;       /* multiply q and k by this (finite values whose q.k overflows fp32); 0: 1 */
} qkv_spec;

typedef struct qkv {
  float *q, *k, *v; /* what the program sees, as fp32 (after BF16 rounding when dtype is BF16) */
  int64_t nq, nk, nv;
} qkv;

/* Convert x [n] to dtype t in a fresh buffer (F32 is copied). */
static void *to_dtype(const float *x, int64_t n, apb_dtype t) {
  void *p = malloc((size_t)n * apb_dtype_size(t) + 1);
  ck_assert(p != NULL);
  ck_assert_int_eq(apb_from_f32(p, t, x, (size_t)n), 0);
  return p;
}

/* Write q/k/v by spec to path; x receives the fp32 values (free with qkv_free). */
static void write_qkv(const char *path, const qkv_spec *spec, uint64_t stream, qkv *x) {
  qkv_spec sd = *spec, *s = &sd;
  if (!s->Hq) s->Hq = 4;
  if (!s->Hkv) s->Hkv = 2;
  if (!s->D) s->D = 8;
  int kD = s->k_D ? s->k_D : s->D;
  int64_t vK = s->v_K ? s->v_K : s->K;
  x->nq = s->R * s->Hq * s->D;
  x->nk = s->K * s->Hkv * kD;
  x->nv = vK * s->Hkv * kD;
  x->q = malloc((size_t)x->nq * sizeof(float) + 1);
  x->k = malloc((size_t)x->nk * sizeof(float) + 1);
  x->v = malloc((size_t)x->nv * sizeof(float) + 1);
  ck_assert(x->q && x->k && x->v);
  tu_fill(x->q, (size_t)x->nq, tu_seed(), 3 * stream, 2.0f);
  tu_fill(x->k, (size_t)x->nk, tu_seed(), 3 * stream + 1, 2.0f);
  tu_fill(x->v, (size_t)x->nv, tu_seed(), 3 * stream + 2, 1.0f);
  for (int64_t i = 0; s->qk_scale && i < x->nq; i++) x->q[i] *= s->qk_scale;
  for (int64_t i = 0; s->qk_scale && i < x->nk; i++) x->k[i] *= s->qk_scale;
  if (s->nan_k) x->k[s->nan_k - 1] = NAN;
  if (s->inf_q) x->q[s->inf_q - 1] = -INFINITY;
  if (s->dtype == APB_DT_BF16) {
    apb_bf16_round_array(x->q, (size_t)x->nq);
    apb_bf16_round_array(x->k, (size_t)x->nk);
    apb_bf16_round_array(x->v, (size_t)x->nv);
  }
  void *dq = to_dtype(x->q, x->nq, s->dtype), *dk = to_dtype(x->k, x->nk, s->dtype);
  void *dv = to_dtype(x->v, x->nv, s->dtype);
  apb_st_entry e[3] = {
      {.name = "q", .dtype = s->dtype, .ndim = 3, .shape = {s->R, s->Hq, s->D}, .data = dq},
      {.name = "k", .dtype = s->dtype, .ndim = 3, .shape = {s->K, s->Hkv, kD}, .data = dk},
      {.name = "v", .dtype = s->dtype, .ndim = 3, .shape = {vK, s->Hkv, kD}, .data = dv},
  };
  if (s->q_rank2) {
    e[0].ndim = 2;
    e[0].shape[1] = (int64_t)s->Hq * s->D;
    e[0].shape[2] = 0;
  }
  apb_error err;
  apb_error_clear(&err);
  apb_status st = apb_st_write(path, s->omit_v ? 2 : 3, e, 0, NULL, NULL, &err);
  ck_assert_msg(st == APB_OK, "writing %s: %s", path, err.msg);
  free(dq);
  free(dk);
  free(dv);
}

static void qkv_free(qkv *x) {
  free(x->q);
  free(x->k);
  free(x->v);
}

/* Read tensor name of path as fp32 (expected shape [d0, d1, d2] or [d0, d1] when d2 < 0). */
static float *read_out(const char *path, const char *name, int64_t d0, int64_t d1, int64_t d2,
                       apb_st_file **keep) {
  apb_error err;
  apb_error_clear(&err);
  apb_st_file *f = NULL;
  ck_assert_msg(apb_st_open(path, &f, &err) == APB_OK, "%s", err.msg);
  int64_t dims[3] = {d0, d1, d2};
  const apb_st_tensor *t;
  ck_assert_msg(apb_st_get(f, name, d2 < 0 ? 2 : 3, dims, 0, &t, &err) == APB_OK, "%s", err.msg);
  ck_assert_int_eq(t->dtype, APB_DT_F32);
  int64_t n = apb_st_numel(t);
  float *x = tu_alloc((size_t)n);
  ck_assert_msg(apb_st_read_f32(f, t, x, &err) == APB_OK, "%s", err.msg);
  if (keep) *keep = f;
  else apb_st_close(f);
  return x;
}

static const char *meta(const apb_st_file *f, const char *key) {
  for (int i = 0; i < f->n_meta; i++)
    if (strcmp(f->meta_keys[i], key) == 0) return f->meta_vals[i];
  return "";
}

/* ---------------------------------------------------------------- attn round trips */

typedef struct trip {
  const char *method, *impl;
  int64_t P, A, B;
  int Hq, Hkv, D;
  apb_dtype dtype;
  const char *extra; /* more options */
  float scale;       /* what extra sets, 0 for the default */
} trip;

static const trip trips[] = {
    {"apb", "naive", 7, 5, 20, 4, 2, 16, APB_DT_F32, "", 0},
    {"apb", "fast", 7, 5, 20, 4, 2, 16, APB_DT_F32, "--passing 7 --threads 2", 0},
    {"apb", "fast", 113, 31, 97, 8, 1, 32, APB_DT_F32, "", 0},
    {"apb", "naive", 11, 3, 13, 8, 1, 32, APB_DT_BF16, "--scale 0.3", 0.3f},
    {"star", "naive", 0, 6, 17, 8, 2, 8, APB_DT_F32, "", 0},
    {"star", "fast", 0, 6, 17, 8, 2, 8, APB_DT_F32, "--passing 0", 0},
    {"dense", "naive", 0, 0, 23, 3, 1, 5, APB_DT_F32, "", 0},
    {"dense", "fast", 0, 0, 129, 3, 3, 64, APB_DT_F32, "--threads 1", 0},
    {"apb", "fast", 1, 0, 1, 1, 1, 1, APB_DT_F32, "", 0},
};

START_TEST(attn_round_trip) {
  const trip *t = &trips[_i];
  int64_t R = t->A + t->B, K = t->P + t->A + t->B;
  qkv_spec s = {.R = R, .K = K, .Hq = t->Hq, .Hkv = t->Hkv, .D = t->D, .dtype = t->dtype};
  char *in = tu_tmpname(".safetensors"), *outp = tu_tmpname(".safetensors"), *out = NULL;
  qkv x;
  write_qkv(in, &s, 100 + (uint64_t)_i, &x);
  int rc = apb(&out, "attn --method %s --anchor %lld --impl %s %s --in '%s' --out '%s'", t->method,
               (long long)t->A, t->impl, t->extra, in, outp);
  ck_assert_msg(rc == 0, "case %d: exit %d:\n%s", _i, rc, out);
  assert_has(out, outp);

  apb_st_file *f = NULL;
  float *o = read_out(outp, "o", R, t->Hq, t->D, &f);
  float *lse = read_out(outp, "lse", t->Hq, R, -1, NULL);
  ck_assert_str_eq(meta(f, "method"), t->method);
  ck_assert_str_eq(meta(f, "impl"), t->impl);
  ck_assert_int_eq(atoll(meta(f, "anchor")), t->A);
  ck_assert_int_eq(atoll(meta(f, "passing")), t->P);
  apb_st_close(f);

  size_t row = (size_t)t->Hkv * (size_t)t->D;
  float *o_ref = tu_alloc((size_t)(R * t->Hq * t->D)), *l_ref = tu_alloc((size_t)(R * t->Hq));
  apb_attn_args a = {.P = t->P, .A = t->A, .B = t->B, .Hq = t->Hq, .Hkv = t->Hkv, .D = t->D,
                     .local_keys = 1, .scale = t->scale, .q = x.q, .kp = x.k, .vp = x.v,
                     .ka = x.k + (size_t)t->P * row, .va = x.v + (size_t)t->P * row,
                     .kb = x.k + (size_t)(t->P + t->A) * row, .vb = x.v + (size_t)(t->P + t->A) * row,
                     .o = o_ref, .lse = l_ref};
  apb_error err;
  apb_error_clear(&err);
  ck_assert_msg(apb_attn_naive(&a, &err) == APB_OK, "%s", err.msg);
  if (strcmp(t->impl, "naive") == 0) {
    tu_assert_bitwise("o (naive through the program)", o, o_ref, R * t->Hq * t->D);
    tu_assert_bitwise("lse (naive through the program)", lse, l_ref, R * t->Hq);
  } else {
    apb_tol tol = apb_tolerance(APB_PREC_F32, K + t->D);
    tu_assert_close("o (fast through the program)", o, o_ref, R * t->Hq * t->D, tol);
    tu_assert_close("lse (fast through the program)", lse, l_ref, R * t->Hq, tol);
  }
  tu_free(o);
  tu_free(lse);
  tu_free(o_ref);
  tu_free(l_ref);
  qkv_free(&x);
  unlink(in);
  unlink(outp);
  free(in);
  free(outp);
  free(out);
}
END_TEST

/* ---------------------------------------------------------------- attn: rejected inputs */

typedef struct bad_case {
  const char *what;
  qkv_spec s;
  const char *args; /* options after "attn"; @IN and @OUT stand for the input and output paths */
  int exit_code;
  const char *needle, *needle2; /* substrings of the message (needle2 may be NULL) */
} bad_case;

/* R rows and K keys of F32, Hq 4, Hkv 2, D 8 unless the fields after K set others. */
#define SPEC(R_, K_, ...) {.R = R_, .K = K_, __VA_ARGS__}
#define IO "--in @IN --out @OUT"
#define APB_IO "--method apb " IO

static const bad_case bad_cases[] = {
    {"A larger than rows", SPEC(10, 14), "--method apb --anchor 11 " IO, 1, "--anchor 11",
     "A must be <= R"},
    {"P inconsistent with keys - rows", SPEC(25, 30), "--method apb --passing 10 " IO, 1,
     "--passing 10 but k has 30 keys for 25 query rows: P must be keys - rows = 5", NULL},
    {"fewer keys than rows", SPEC(25, 20), APB_IO, 1, "keys must be at least rows", NULL},
    {"Hq not a multiple of Hkv", SPEC(6, 9, .Hq = 3), APB_IO, 1, "Hq = 3", "not a multiple of Hkv = 2"},
    {"D differs between q and k", SPEC(6, 9, .k_D = 16), APB_IO, 1, "head dim D differs",
     "q [6,4,8] has D = 8, k [9,2,16] has D = 16"},
    {"k and v shapes differ", SPEC(6, 9, .v_K = 10), APB_IO, 1, "k [9,2,8] and v [10,2,8]",
     "differ in shape"},
    {"q of rank 2", SPEC(6, 9, .q_rank2 = 1), APB_IO, 1, "tensor 'q'",
     "has rank 2 [6,32]; it must have rank 3 [R,Hq,D]"},
    {"tensor v missing", SPEC(6, 9, .omit_v = 1), APB_IO, 1, "has no tensor 'v'", NULL},
    {"NaN in k", SPEC(6, 9, .nan_k = 1 + 5 * 16 + 8 + 3), APB_IO, 1, "tensor 'k'",
     "non-finite value (nan) at [5,1,3]"},
    {"Inf in q", SPEC(6, 9, .inf_q = 1 + 2 * 32 + 7), APB_IO, 1, "tensor 'q'",
     "non-finite value (-inf) at [2,0,7]"},
    {"q.k overflows fp32 (fast)", SPEC(6, 9, .qk_scale = 1e20f), APB_IO, 1, "is not finite at",
     "overflows fp32"},
    {"q.k overflows fp32 (naive)", SPEC(6, 9, .qk_scale = 1e20f), APB_IO " --impl naive", 1, "is not finite at",
     "overflows fp32"},
    {"empty --out", SPEC(6, 9), "--method apb --in @IN --out ''", 1, "output path is empty", NULL},
    {"dense with a passing block", SPEC(6, 9), "--method dense " IO, 1,
     "--method dense needs as many keys", "use --method apb"},
    {"star with a passing block", SPEC(6, 9), "--method star --anchor 2 " IO, 1, "--method star", NULL},
    {"dense with an anchor", SPEC(6, 6), "--method dense --anchor 2 " IO, 2,
     "--method dense has no anchor", NULL},
    {"missing --in", SPEC(6, 9), "--method apb --out @OUT", 2, "--in is required", "apb attn --help"},
    {"missing --method", SPEC(6, 9), IO, 2, "--method is required", NULL},
    {"nonexistent input file", SPEC(6, 9), "--method apb --in @IN.missing --out @OUT", 1,
     ".missing: cannot open", NULL},
    {"unknown --method", SPEC(6, 9), "--method ring " IO, 2,
     "--method wants one of dense, star, apb; got 'ring'", NULL},
    {"garbage --anchor", SPEC(6, 9), "--method apb --anchor abc " IO, 2,
     "apb attn: --anchor wants an integer in [0, 1073741824], got 'abc'", NULL},
    {"negative --anchor", SPEC(6, 9), "--method apb --anchor -1 " IO, 2, "--anchor wants an integer", NULL},
    {"garbage --scale", SPEC(6, 9), "--method apb --scale nan " IO, 2, "--scale wants a finite number", NULL},
    {"--scale that is 0 in fp32", SPEC(6, 9), "--method apb --scale 1e-50 " IO, 2,
     "--scale 1e-50 is below the smallest fp32 number", "give 0 for 1/sqrt(D)"},
    {"unknown option", SPEC(6, 9), "--method apb --frobnicate 3 " IO, 2,
     "unknown or ambiguous option '--frobnicate'", NULL},
    {"option without its value", SPEC(6, 9), APB_IO " --anchor", 2, "option '--anchor' needs a value", NULL},
    {"stray operand", SPEC(6, 9), APB_IO " extra", 2, "unexpected argument 'extra'", NULL},
};

/* args with @IN and @OUT replaced by 'in' and 'out' (quoted) into buf [cap]. */
static void substitute(char *buf, size_t cap, const char *args, const char *in, const char *out) {
  size_t k = 0;
  for (const char *p = args; *p && k + 1 < cap;) {
    const char *path = strncmp(p, "@IN", 3) == 0 ? in : strncmp(p, "@OUT", 4) == 0 ? out : NULL;
    if (path) {
      k += (size_t)snprintf(buf + k, cap - k, "'%s'", path);
      p += path == in ? 3 : 4;
    } else {
      buf[k++] = *p++;
    }
    if (k >= cap) k = cap - 1;
  }
  buf[k] = 0;
}

START_TEST(attn_rejects) {
  const bad_case *c = &bad_cases[_i];
  char *in = tu_tmpname(".safetensors"), *outp = tu_tmpname(".safetensors"), *out = NULL;
  qkv x;
  write_qkv(in, &c->s, 200 + (uint64_t)_i, &x);
  char args[2048];
  substitute(args, sizeof args, c->args, in, outp);
  int rc = apb(&out, "attn %s", args);
  ck_assert_msg(rc == c->exit_code, "%s: exit %d, expected %d:\n%s", c->what, rc, c->exit_code, out);
  assert_has(out, c->needle);
  if (c->needle2) assert_has(out, c->needle2);
  ck_assert_msg(strncmp(out, "apb attn: ", 10) == 0, "%s: message does not start with 'apb attn: ':\n%s",
                c->what, out);
  ck_assert_msg(access(outp, F_OK) != 0, "%s: an output file was written", c->what);
  qkv_free(&x);
  unlink(in);
  free(in);
  free(outp);
  free(out);
}
END_TEST

/* --out naming something that is not a regular file: refused, and left as it was (the atomic rename used to
 * replace a pipe, and as root /dev/null, with the output file). */
START_TEST(attn_out_not_a_file) {
  char *in = tu_tmpname(".safetensors"), *fifo = tu_tmpname(".fifo"), *out = NULL;
  qkv x;
  write_qkv(in, &(qkv_spec){.R = 6, .K = 9}, 300, &x);
  ck_assert_int_eq(mkfifo(fifo, 0600), 0);
  ck_assert_int_eq(apb(&out, "attn --method apb --in '%s' --out '%s'", in, fifo), 1);
  assert_has(out, "exists and is not a regular file (a device, pipe or socket)");
  struct stat sb;
  ck_assert_int_eq(stat(fifo, &sb), 0);
  ck_assert_msg(S_ISFIFO(sb.st_mode), "the pipe %s was replaced", fifo);
  free(out);
  unlink(fifo);
  ck_assert_int_eq(mkdir(fifo, 0700), 0);
  ck_assert_int_eq(apb(&out, "attn --method apb --in '%s' --out '%s'", in, fifo), 1);
  assert_has(out, "exists and is not a regular file (a directory)");
  free(out);
  qkv_free(&x);
  unlink(in), rmdir(fifo);
  free(in), free(fifo);
}
END_TEST

/* F64 values beyond the F32 range: attn and cmp read every tensor as F32, where such a value is Inf; attn
 * blamed a non-finite value the file does not hold, cmp passed 1e300 against 2e300 (Inf = Inf). Both are
 * refused, naming the value. */
START_TEST(f64_beyond_f32) {
  char *a = tu_tmpname(".safetensors"), *b = tu_tmpname(".safetensors"), *o = tu_tmpname(".safetensors");
  char *out = NULL;
  double va[2] = {1e300, 1}, vb[2] = {2e300, 1}, one = 0.5;
  apb_error err;
  apb_error_clear(&err);
  apb_st_entry e[3] = {{.name = "q", .dtype = APB_DT_F64, .ndim = 3, .shape = {1, 1, 1}, .data = va},
                       {.name = "k", .dtype = APB_DT_F64, .ndim = 3, .shape = {1, 1, 1}, .data = &one},
                       {.name = "v", .dtype = APB_DT_F64, .ndim = 3, .shape = {1, 1, 1}, .data = &one}};
  ck_assert_msg(apb_st_write(a, 3, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  e[0].data = vb;
  ck_assert_msg(apb_st_write(b, 3, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", a, b), 2);
  assert_has(out, "tensor 'q' of ");
  assert_has(out, "the F64 value 1e+300 at [0,0,0] is beyond the F32 range");
  free(out);
  ck_assert_int_eq(apb(&out, "attn --method dense --in '%s' --out '%s'", a, o), 1);
  assert_has(out, "the F64 value 1e+300 at [0,0,0] is beyond the F32 range");
  ck_assert_msg(access(o, F_OK) != 0, "an output file was written");
  free(out);
  va[0] = 0.25; /* in range: read and compared as before */
  e[0].data = va;
  ck_assert_msg(apb_st_write(a, 3, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", a, a), 0);
  free(out);
  unlink(a), unlink(b);
  free(a), free(b), free(o);
}
END_TEST

/* Equality asked for on values fp32 cannot hold apart: int64 2^53 against 2^53 + 1, int32 2^24 + 1
 * against 2^24 (the fp32 widening made each pair equal), F64 1 against 1 + 2^-40, F64 0.1 against F32
 * 0.1f; each fails, naming the element with its exact values, with --prec exact and with --rtol 0
 * --atol 0; equal tensors pass. */
START_TEST(cmp_exact_in_own_type) {
  char *a = tu_tmpname(".safetensors"), *b = tu_tmpname(".safetensors"), *out = NULL;
  int64_t ia[2] = {5, (int64_t)1 << 53}, ib[2] = {5, ((int64_t)1 << 53) + 1};
  int32_t ja[3] = {0, 1, (1 << 24) + 1}, jb[3] = {0, 1, 1 << 24};
  int32_t ka[1] = {(1 << 24) + 1}, kb[1] = {(1 << 24) + 3}; /* fp32 tells these apart, as 2^24 and 2^24 + 4 */
  double fa[1] = {1 + 0x1p-40}, fb[1] = {1};
  double ma[2] = {1.0, 0.1}; /* F64 in A against F32 in B: 0.1 is not 0.1f */
  float mb[2] = {1.0f, 0.1f};
  apb_error err;
  apb_error_clear(&err);
  apb_st_entry e[5] = {{.name = "i64", .dtype = APB_DT_I64, .ndim = 1, .shape = {2}, .data = ia},
                       {.name = "i32", .dtype = APB_DT_I32, .ndim = 1, .shape = {3}, .data = ja},
                       {.name = "f64", .dtype = APB_DT_F64, .ndim = 1, .shape = {1}, .data = fa},
                       {.name = "i32far", .dtype = APB_DT_I32, .ndim = 1, .shape = {1}, .data = ka},
                       {.name = "mixed", .dtype = APB_DT_F64, .ndim = 1, .shape = {2}, .data = ma}};
  ck_assert_msg(apb_st_write(a, 5, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  e[0].data = ib, e[1].data = jb, e[2].data = fb, e[3].data = kb, e[4].data = mb, e[4].dtype = APB_DT_F32;
  ck_assert_msg(apb_st_write(b, 5, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  const char *modes[] = {"--prec exact", "--rtol 0 --atol 0"};
  for (int m = 0; m < 2; m++) {
    ck_assert_int_eq(apb(&out, "cmp '%s' '%s' %s", a, b, modes[m]), 1);
    assert_has(out, "i64: FAIL: values differ and equality was asked for; [1] differs (A 9007199254740992, B "
                    "9007199254740993)");
    assert_has(out, "i32: FAIL: values differ and equality was asked for; [2] differs (A 16777217, B 16777216)");
    assert_has(out, "f64: FAIL: values differ and equality was asked for; [0] differs (A 1.0000000000009095, B 1)");
    /* unequal in fp32 as well: the values shown are still the file's, not their fp32 roundings */
    assert_has(out, "i32far: FAIL: values differ and equality was asked for; [0] differs (A 16777217, B 16777219)");
    assert_has(out, "mixed: FAIL: values differ and equality was asked for; [1] differs (A 0.10000000000000001, B "
                    "0.10000000149011612)");
    free(out);
    ck_assert_int_eq(apb(&out, "cmp '%s' '%s' %s", a, a, modes[m]), 0);
    free(out);
  }
  /* a tolerance that is not equality keeps the fp32 comparison: these pass */
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --rtol 1e-6", a, b), 0);
  free(out);
  unlink(a), unlink(b);
  free(a), free(b);
}
END_TEST

/* gen-model over an earlier model whose heads cannot be replaced: the new config.json and weights with the
 * earlier heads loaded as one model; the files are removed instead, and the failure says why. */
START_TEST(gen_model_failed_write) {
  char *dir = tu_tmpname(".model"), path[4096], *out = NULL;
  ck_assert_int_eq(apb(&out, "gen-model --preset tiny --layers 1 --vocab 64 --seed 1 --out '%s'", dir), 0);
  free(out);
  snprintf(path, sizeof path, "%s/%s", dir, APB_HEADS_FILE);
  ck_assert_int_eq(unlink(path), 0);
  ck_assert_int_eq(mkdir(path, 0700), 0); /* stands for any failure to write the heads */
  ck_assert_int_eq(apb(&out, "gen-model --preset tiny --layers 1 --vocab 64 --seed 2 --out '%s'", dir), 1);
  assert_has(out, APB_HEADS_FILE);
  free(out);
  const char *files[] = {"config.json", "model.safetensors"};
  for (int i = 0; i < 2; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    ck_assert_msg(access(path, F_OK) != 0, "%s was left beside heads it was not written with", path);
  }
  snprintf(path, sizeof path, "%s/%s", dir, APB_HEADS_FILE);
  rmdir(path), rmdir(dir);
  free(dir);
}
END_TEST

/* ---------------------------------------------------------------- cmp */

/* Write tensors a [3,4,5] and b [7] (values from stream; a[ia] replaced by va when ia >= 0) as dtype t;
 * with only_a, b is left out. */
static void write_ab(const char *path, uint64_t stream, apb_dtype t, int64_t ia, float va, int only_a) {
  float a[60], b[7];
  tu_fill(a, 60, tu_seed(), stream, 3.0f);
  tu_fill(b, 7, tu_seed(), stream + 1, 3.0f);
  if (ia >= 0) a[ia] = va;
  void *da = to_dtype(a, 60, t), *db = to_dtype(b, 7, t);
  apb_st_entry e[2] = {{.name = "a", .dtype = t, .ndim = 3, .shape = {3, 4, 5}, .data = da},
                       {.name = "b", .dtype = t, .ndim = 1, .shape = {7}, .data = db}};
  apb_error err;
  apb_error_clear(&err);
  ck_assert_msg(apb_st_write(path, only_a ? 1 : 2, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  free(da);
  free(db);
}

/* The stored value of a[i] of write_ab(stream) with no replacement. */
static float a_value(uint64_t stream, int64_t i) {
  float a[60];
  tu_fill(a, 60, tu_seed(), stream, 3.0f);
  return a[i];
}

START_TEST(cmp_equal_and_perturbed) {
  char *x = tu_tmpname(".safetensors"), *y = tu_tmpname(".safetensors"), *z = tu_tmpname(".safetensors");
  char *out = NULL;
  write_ab(x, 7, APB_DT_F32, -1, 0, 0);
  write_ab(y, 7, APB_DT_F64, -1, 0, 0); /* same values, other dtype */

  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", x, x), 0);
  assert_has(out, "2 of 2 tensors within tolerance: PASS");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --prec exact", x, y), 0);
  assert_has(out, "table exact: every element equal");
  free(out);

  /* a[37] = a[1,3,2] moved by 1e-2 relative: beyond 1e-5 in rel_fro, within --rel-fro 0.1 */
  int64_t i = 1 * 20 + 3 * 5 + 2;
  write_ab(z, 7, APB_DT_F32, i, a_value(7, i) * 1.01f + 0.01f, 0);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", z, x), 1);
  assert_has(out, "[1,3,2]");
  assert_has(out, "FAIL");
  assert_has(out, "a: FAIL: rel_fro");
  assert_has(out, "1 of 2 tensors within tolerance: FAIL");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --rel-fro 0.1", z, x), 0);
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --rtol 1e-6", z, x), 1);
  assert_has(out, "outside the elementwise bound");
  assert_has(out, "[1,3,2]");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --prec fp32 --k 4096", z, x), 1);
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --atol 0 --rtol 0", z, x), 1);
  assert_has(out, "every element equal");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --prec bf16 --rel-fro 1", z, x), 2);
  assert_has(out, "not both");
  free(out);

  unlink(x);
  unlink(y);
  unlink(z);
  free(x);
  free(y);
  free(z);
}
END_TEST

START_TEST(cmp_nonfinite_missing_unreadable) {
  char *x = tu_tmpname(".safetensors"), *y = tu_tmpname(".safetensors"), *z = tu_tmpname(".safetensors");
  char *out = NULL;
  write_ab(x, 9, APB_DT_F32, -1, 0, 0);
  write_ab(y, 9, APB_DT_F32, 5, NAN, 0); /* a[0,1,0] */
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", y, x), 1);
  assert_has(out, "1 NaN and 0 Inf mismatches, the first at [0,1,0]");
  free(out);
  /* a loose tolerance does not let NaN through */
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --rel-fro 1e30", y, x), 1);
  assert_has(out, "NaN");
  free(out);

  write_ab(z, 9, APB_DT_F32, -1, 0, 1); /* a only */
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", z, x), 1);
  assert_has(out, "only in B");
  assert_has(out, ": b");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s'", x, z), 1);
  assert_has(out, "only in A");
  free(out);

  ck_assert_int_eq(apb(&out, "cmp '%s' '%s.missing'", x, x), 2);
  assert_has(out, ".missing: cannot open");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s'", x), 2);
  assert_has(out, "wants two files");
  free(out);
  ck_assert_int_eq(apb(&out, "cmp '%s' '%s' --prec fp8", x, x), 2);
  assert_has(out, "--prec wants one of fp32, tf32, bf16, f16, exact; got 'fp8'");
  free(out);

  unlink(x);
  unlink(y);
  unlink(z);
  free(x);
  free(y);
  free(z);
}
END_TEST

/* ---------------------------------------------------------------- dispatcher, bench, demo */

START_TEST(dispatcher) {
  char *out = NULL, *out2 = NULL;
  ck_assert_int_eq(apb(&out, "frobnicate"), 2);
  assert_has(out, "unknown command 'frobnicate'");
  assert_has(out, "apb --help");
  free(out);
  ck_assert_int_eq(apb(&out, "--frobnicate"), 2); /* the default job's option parser refuses it */
  assert_has(out, "apb run: unknown or ambiguous option '--frobnicate'");
  free(out);
  /* options without a command go to the default job */
  ck_assert_int_eq(apb(&out, "--synthetic 512 --method dense,apb --anchor 64 --threads 1 --quiet --json"), 0);
  ck_assert_int_eq(apb(&out2, "run --synthetic 512 --method dense,apb --anchor 64 --threads 1 --quiet --json"), 0);
  assert_has(out, "\"generated\"");
  const char *g1 = strstr(out, "\"apb\""), *g2 = strstr(out2, "\"apb\""); /* apb's relerr and tokens */
  ck_assert_msg(g1 && g2, "no apb run in:\n%s\n%s", out, out2);
  g1 = strstr(g1, "\"logits_rel_err\""), g2 = strstr(g2, "\"logits_rel_err\"");
  ck_assert_msg(g1 && g2 && strcmp(g1, g2) == 0, "apb OPTIONS and apb run OPTIONS differ:\n%s\n%s", out, out2);
  free(out), free(out2);

  ck_assert_int_eq(apb(&out, "--help"), 0);
  const char *cmds[] = {"attn", "cmp", "bench", "demo"};
  for (int i = 0; i < 4; i++) assert_has(out, cmds[i]);
  free(out);
  ck_assert_int_eq(apb(&out, "help"), 0);
  free(out);
  ck_assert_int_eq(apb(&out, "--version"), 0);
  assert_has(out, APB_VERSION_STRING);
  free(out);

  /* apb help CMD is apb CMD --help; the attn help documents the contract */
  ck_assert_int_eq(apb(&out, "help attn"), 0);
  ck_assert_int_eq(apb(&out2, "attn --help"), 0);
  ck_assert_str_eq(out, out2);
  assert_has(out, "lse  [Hq, R]");
  assert_has(out, "save_file");
  assert_has(out, "local row j");
  free(out);
  free(out2);
  ck_assert_int_eq(apb(&out, "help nothing"), 2);
  assert_has(out, "unknown command 'nothing'");
  free(out);
  const char *helps[] = {"cmp --help", "bench --help", "bench attn --help", "demo --help"};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(apb(&out, "%s", helps[i]), 0);
    assert_has(out, "Usage: apb");
    free(out);
  }
}
END_TEST

/* Run `apb ARGS`, expect exit code want_rc and (when want_msg) that text in the output. */
static void expect(int want_rc, const char *args, const char *want_msg) {
  char *out = NULL;
  ck_assert_int_eq(apb(&out, "%s", args), want_rc);
  if (want_msg) assert_has(out, want_msg);
  free(out);
}

/* The slowest host's predicted seconds from `apb predict ARGS --json`. */
static double predicted(const char *args) {
  char *out = NULL;
  ck_assert_int_eq(apb(&out, "predict %s --json", args), 0);
  const char *p = strstr(out, "\"t_total\": ");
  ck_assert_msg(p != NULL, "no t_total in:\n%s", out);
  double t = strtod(p + 11, NULL);
  free(out);
  return t;
}

static void write_text(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  ck_assert_msg(f != NULL, "cannot write %s", path);
  fputs(text, f);
  fclose(f);
}

/* predict --fit: runs timed as the model predicts them at attention 500 and GEMM 700 TFLOP/s give those
 * rates back with no error, whatever the method, host count, lengths and --balance; a run 5% slower
 * than that shows as the largest error; bad files and options are refused with the reason. */
START_TEST(predict_fit) {
  const char *rates = "--attn-tflops 500 --gemm-tflops 700";
  char a[128];
  snprintf(a, sizeof a, "--method dense --hosts 1 %s", rates);
  const double dense = predicted(a);
  snprintf(a, sizeof a, "--method ring --hosts 4 %s", rates);
  const double ring = predicted(a);
  snprintf(a, sizeof a, "--method star --hosts 4 %s", rates);
  const double star = predicted(a);
  snprintf(a, sizeof a, "--method apb --hosts 4 --anchor 4096 --passing 2048 %s", rates);
  const double apb4 = predicted(a);
  snprintf(a, sizeof a, "--method apb --hosts 2 --anchor 4096 --passing 2048 --balance %s", rates);
  const double apb2b = predicted(a);
  for (int slow = 0; slow < 2; slow++) {
    char json[2048];
    snprintf(json, sizeof json,
             "{\"preset\": \"llama3-8b-shape\", \"layers\": 32, \"runs\": ["
             "{\"method\": \"dense\", \"gpus\": 1, \"tokens\": 131072, \"prefill_s\": %.9g, \"anchor\": 0, "
             "\"passing\": 0, \"balance\": 1},"
             "{\"method\": \"ring\", \"gpus\": 4, \"tokens\": 131072, \"prefill_s\": %.9g, \"balance\": 0},"
             "{\"method\": \"zigzag\", \"gpus\": 4, \"tokens\": 131072, \"error\": \"out of memory\"},"
             "{\"method\": \"star\", \"gpus\": 4, \"tokens\": 131072, \"prefill_s\": %.9g, \"anchor\": 32768},"
             "{\"method\": \"apb\", \"gpus\": 4, \"tokens\": 131072, \"prefill_s\": %.9g, \"anchor\": 4096, "
             "\"passing\": 2048, \"query_len\": 64},"
             "{\"method\": \"apb\", \"gpus\": 2, \"tokens\": 131072, \"prefill_s\": %.9g, \"anchor\": 4096, "
             "\"passing\": 2048, \"balance\": 1}]}",
             dense, ring, star, slow ? apb4 * 1.05 : apb4, apb2b);
    char *path = tu_tmpname(".json"), *out = NULL;
    write_text(path, json);
    ck_assert_int_eq(apb(&out, "predict --fit '%s' --json", path), 0);
    const char *at = strstr(out, "\"attn_tflops\": "), *gt = strstr(out, "\"gemm_tflops\": "),
               *me = strstr(out, "\"max_rel_err\": ");
    ck_assert_msg(at && gt && me, "unexpected output:\n%s", out);
    const double fa = strtod(at + 15, NULL), fg = strtod(gt + 15, NULL), e = strtod(me + 15, NULL);
    if (!slow) {
      ck_assert_msg(fabs(fa / 500 - 1) < 1e-3 && fabs(fg / 700 - 1) < 1e-3 && e < 1e-3,
                    "fit gave attention %g, GEMM %g, largest error %g; want 500, 700, 0:\n%s", fa, fg, e, out);
      assert_has(out, "\"method\": \"apb\", \"gpus\": 2, \"tokens\": 131072, \"anchor\": 4096, \"passing\": 2048, "
                      "\"balance\": 1");
      ck_assert_msg(strstr(out, "zigzag") == NULL, "the failed run was fitted:\n%s", out);
    } else {
      /* the minimax fit spreads a 5% outlier: the largest error lies between 2.4% and 5% */
      ck_assert_msg(e > 0.024 && e <= 0.05, "largest error %g with one run 5%% slow:\n%s", e, out);
    }
    free(out);
    ck_assert_int_eq(apb(&out, "predict --fit '%s'", path), 0);
    assert_has(out, slow ? "fitted to 5 runs" : "fitted to 5 runs: --attn-tflops 5");
    assert_has(out, "measured s");
    free(out);
    remove(path);
    free(path);
  }

  /* a run file of other sizes ("model", as bench prefill writes it): the fit models those sizes */
  {
    const char *big = "--layers 80 --hidden 8192 --ffn 28672 --q-heads 64 --kv-heads 8";
    char a3[512];
    snprintf(a3, sizeof a3, "--method ring --hosts 4 %s %s", rates, big);
    const double ring70 = predicted(a3);
    snprintf(a3, sizeof a3, "--method apb --hosts 4 --anchor 4096 --passing 2048 %s %s", rates, big);
    const double apb70 = predicted(a3);
    ck_assert_msg(apb70 > 1.5 * apb4, "80 layers of 8192 predicted %g s against %g s for the preset", apb70, apb4);
    char json[2048], *path = tu_tmpname(".json"), *out = NULL;
    snprintf(json, sizeof json,
             "{\"preset\": \"llama3-8b-shape\", \"layers\": 80, \"model\": {\"layers\": 80, \"hidden\": 8192, "
             "\"ffn\": 28672, \"q_heads\": 64, \"kv_heads\": 8, \"head_dim\": 128, \"vocab\": 128256, "
             "\"scorer_width\": 1024}, \"runs\": ["
             "{\"method\": \"ring\", \"gpus\": 4, \"tokens\": 131072, \"prefill_s\": %.9g},"
             "{\"method\": \"apb\", \"gpus\": 4, \"tokens\": 131072, \"prefill_s\": %.9g, \"anchor\": 4096, "
             "\"passing\": 2048}]}",
             ring70, apb70);
    write_text(path, json);
    ck_assert_int_eq(apb(&out, "predict --fit '%s' --json", path), 0);
    const char *at = strstr(out, "\"attn_tflops\": "), *gt = strstr(out, "\"gemm_tflops\": ");
    ck_assert_msg(at && gt, "unexpected output:\n%s", out);
    const double fa = strtod(at + 15, NULL), fg = strtod(gt + 15, NULL);
    ck_assert_msg(fabs(fa / 500 - 1) < 1e-3 && fabs(fg / 700 - 1) < 1e-3,
                  "fit to the 80-layer runs gave attention %g, GEMM %g; want 500, 700:\n%s", fa, fg, out);
    free(out);
    remove(path);
    free(path);
  }

  /* refusals */
  char *path = tu_tmpname(".json");
  expect(1, "predict --fit /nonexistent/prefill.json", "expected the JSON of apb bench prefill --json");
#define RUN1(fields) "{\"preset\": \"llama3-8b-shape\", \"runs\": [{\"method\": \"apb\"" fields "}]}"
  const struct {
    const char *json, *msg;
  } bad[] = {
      {RUN1(", \"gpus\": 4, \"tokens\": 1000"), "\"prefill_s\" is not a positive number"},
      {RUN1(", \"gpus\": 4, \"tokens\": 1.5, \"prefill_s\": 1"), "\"tokens\" is not an integer"},
      {"{\"preset\": \"llama3-8b-shape\", \"runs\": [{\"method\": \"warp\", \"prefill_s\": 1}]}",
       "no known \"method\""},
      {"{\"preset\": \"huge\", \"runs\": []}", "unknown preset 'huge'"},
      {RUN1(", \"error\": \"x\""), "hold no successful run"},
      {RUN1(", \"gpus\": 4, \"tokens\": 1000, \"prefill_s\": 1, \"anchor\": 5000"),
       "run 0 (apb on 4 GPUs, 1000 tokens)"},
      {RUN1(", \"gpus\": 4, \"tokens\": 1000, \"prefill_s\": 1, \"overlap\": 3"), "\"overlap\" is 3"},
      {"not json", "expected the JSON"},
      {"{\"preset\": \"tiny\", \"model\": {\"layers\": 2, \"hidden\": 256, \"ffn\": 1024, \"q_heads\": 4, "
       "\"kv_heads\": 3, \"head_dim\": 64, \"vocab\": 4096, \"scorer_width\": 128}, \"runs\": []}",
       "\"model\": 4 query heads are not a multiple of 3 KV heads"},
      {"{\"preset\": \"tiny\", \"model\": {\"layers\": 2}, \"runs\": []}", "\"model\".\"hidden\" is missing"},
  };
#undef RUN1
  char a2[4200];
  snprintf(a2, sizeof a2, "predict --fit '%s'", path);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    write_text(path, bad[i].json);
    expect(1, a2, bad[i].msg);
  }
  snprintf(a2, sizeof a2, "predict --fit '%s' --tokens 1000", path);
  expect(2, a2, "drop --tokens");
  snprintf(a2, sizeof a2, "predict --fit '%s' --kv-heads 4", path);
  expect(2, a2, "drop --kv-heads");
  expect(2, "predict --kv-heads 3", "32 query heads are not a multiple of 3 KV heads");
  remove(path);
  free(path);
}
END_TEST

START_TEST(bench_and_demo) {
  char *out = NULL;
  ck_assert_int_eq(apb(&out, "bench attn --tokens 64,97 --hq 4 --hkv 2 --d 8 --reps 2 --gemm 64 --threads 2"),
                   0);
  assert_has(out, "M=N=K=64");
  assert_has(out, "vs_sgemm");
  assert_has(out, "      97");
  free(out);
  ck_assert_int_eq(apb(&out, "bench attn --tokens 33 --hq 2 --hkv 1 --d 4 --reps 1 --gemm 16 --json"), 0);
  assert_has(out, "\"results\": [");
  assert_has(out, "\"tokens\": 33");
  free(out);
  ck_assert_int_eq(apb(&out, "bench attn --tokens 64,,128"), 2);
  assert_has(out, "--tokens wants a comma-separated list");
  free(out);
  expect(2, "bench attn --hq 3 --hkv 2", NULL);
  /* the CPU benchmarks with the preset's sizes changed: ulysses on 4 hosts needs 4 KV heads */
  ck_assert_int_eq(apb(&out, "bench sim --preset tiny --tokens 512 --hosts 4 --method ulysses --kv-heads 4 --gemm 64 "
                             "--threads 2 --json"), 0);
  assert_has(out, "\"model\": {\"layers\": 2, \"hidden\": 256, \"ffn\": 1024, \"q_heads\": 4, \"kv_heads\": 4, ");
  assert_has(out, "\"hosts\": 4");
  free(out);
  expect(1, "bench sim --preset tiny --tokens 512 --hosts 4 --method ulysses --gemm 64 --threads 2",
         "must divide the 2 KV heads");
  expect(2, "bench forward --kv-heads 3", "8 query heads are not a multiple of 3 KV heads");
  /* without apb the retaining heads are not needed; the JSON says what ran */
  ck_assert_int_eq(apb(&out, "predict --scorer-width 0 --method ring,star --json"), 0);
  assert_has(out, "\"scorer_width\": 0}");
  free(out);
  expect(2, "bench", "attn");
  expect(2, "bench nope", "unknown benchmark target 'nope'");

  /* the GPU benchmarks read their options before they look for a device: usage errors everywhere */
  const struct {
    const char *args, *msg;
  } gpu_usage[] = {
      {"bench prefill --overlap 3", "--overlap wants an integer in [0, 2]"},
      {"bench prefill --anchor x", "--anchor wants an integer"},
      {"bench prefill --attn-tflops 0", "--attn-tflops wants a finite number"},
      {"bench prefill --tokens 8", "--tokens wants"},
      {"bench prefill --warmup -1", "--warmup wants an integer in [0, 100]"},
      {"bench prefill --reps 0", "--reps wants an integer in [1, 100]"},
      {"bench prefill --profile 3", "--profile wants an integer in [0, 2]"},
      {"bench prefill --ffn-chunk 0", "--ffn-chunk wants an integer in [1, 16777216]"},
      {"bench gpu-attn --shape 1:2", "expected P:A:B or P:A:B:n"},
      {"bench gpu-attn --shape 0:0:5:n", "the rows see no key at all"},
      {"bench gpu-attn --shape 0:0:0", "A + B must be at least 1"},
      {"bench gpu-ops --d 3", "--d 3 must be even"},
      {"bench gpu-ops --hq 6 --hkv 4", "--hq 6 is not a multiple of --hkv 4"},
      {"bench gpu-ops --reps 0", "--reps wants an integer in [1, 10000]"},
      {"bench gpu-ops --tokens 0", "--tokens wants"},
      {"predict --gemm-tflops -3", "--gemm-tflops wants a finite number"},
      {"bench prefill --kv-heads 5", "32 query heads are not a multiple of 5 KV heads"},
      {"bench prefill --head-dim 0", "--head-dim wants an integer in [1,"},
      {"bench prefill --head-dim 258", "head dimension 258: the CUDA kernels take at most 256"},
      {"bench prefill --scorer-width 0", "--scorer-width 0 leaves the model without retaining heads"},
      {"predict --scorer-width 0", "apb predict scores with them"},
      {"bench sim --scorer-width 0", "--scorer-width 0 leaves the model without retaining heads"},
  };
  for (size_t i = 0; i < sizeof gpu_usage / sizeof gpu_usage[0]; i++) expect(2, gpu_usage[i].args, gpu_usage[i].msg);
  /* predict: the rates are used (a 10x slower attention rate moves apb's attention time 10x) */
  expect(0, "predict --method apb --anchor 4096 --passing 2048 --attn-tflops 59 --json", "\"t_attn\": 7.8272");
  expect(0, "predict --method apb,ring --balance", "ring ");
  expect(2, "predict --preset tiny --model /nonexistent", "--model and --preset are exclusive");
  /* the planner's advice for a query that does not fit the anchor names --query-offset and
   * --embed-query: predict takes both, as run does */
  expect(1, "predict --preset tiny --tokens 4096 --query-len 900 --method apb", "or pass --embed-query 0");
  expect(0, "predict --preset tiny --tokens 4096 --query-len 900 --method apb --embed-query 0", "apb ");
  expect(1, "predict --preset tiny --tokens 4096 --query-len 200 --method apb --query-offset 100",
         "the query (200 tokens) does not fit in the anchor");
  expect(0, "predict --preset tiny --tokens 4096 --query-len 200 --method apb --query-offset 50", "apb ");
  /* a document the cost model cannot count is refused before any output: no table header, no partial JSON */
  for (int j = 0; j < 2; j++) {
    ck_assert_int_eq(apb(&out, "predict --tokens 1024G --method %s --json", j ? "apb" : "ring,apb"), 1);
    assert_has(out, "exceed its 64-bit byte counts");
    ck_assert_msg(strstr(out, "\"methods\"") == NULL, "partial JSON before the error:\n%s", out);
    free(out);
  }

  ck_assert_int_eq(apb(&out, "demo --tokens 1500 --hosts 3 --hq 4 --hkv 2 --d 16 --seed 5"), 0);
  assert_has(out, "PASS");
  assert_has(out, "host 2 of 3");
  free(out);
  ck_assert_int_eq(apb(&out, "demo --tokens 300 --hosts 1 --d 8"), 0);
  assert_has(out, "P 0 (passing) + A 0 (anchor) + B 300");
  free(out);
  ck_assert_int_eq(apb(&out, "demo --tokens 100 --hosts 4 --anchor 30"), 2);
  assert_has(out, "l_a <= l_b");
  free(out);
}
END_TEST

/* run, predict and bench forward on inputs they used to mishandle: each is refused with the reason (or,
 * for --max-new-tokens 0 and -h, accepted) instead of a sanitizer report, a partial output or a silently
 * different document. */
START_TEST(run_inputs) {
  const char *run = "run --preset tiny --threads 1 --quiet";
  char a[4200], *out = NULL;
  expect(0, "run -h", "Usage: apb run");
  snprintf(a, sizeof a, "%s --synthetic 256 --method dense,apb --anchor 32 --max-new-tokens 0 --json", run);
  expect(0, a, "\"generated\": []");

  /* --passing is apb's: star in a list runs without it (it used to refuse every run of the default list),
   * star alone refuses it */
  snprintf(a, sizeof a, "%s --synthetic 256 --method dense,star,apb --anchor 32 --passing 4 --max-new-tokens 1", run);
  expect(0, a, "apb ");
  snprintf(a, sizeof a, "%s --synthetic 256 --method star --anchor 32 --passing 4", run);
  expect(1, a, "star has no passing block");
  /* more tokens than int32 positions hold: refused before a document of that length is made (it was
   * allocated, filled, and then refused, or failed as out of memory) */
  snprintf(a, sizeof a, "%s --synthetic 1099511627776 --method dense", run);
  expect(1, a, "1099511627776 document + 16 query + 8 new tokens: positions are int32, at most 2^31 tokens in all; "
               "give a shorter document");
  /* so is --query-offset, unless --embed-query says star embeds the query too (the default list refused
   * every --query-offset); star alone refuses it, naming what to do */
  snprintf(a, sizeof a, "%s --synthetic 256 --anchor 32 --query-offset 5 --max-new-tokens 1", run);
  expect(0, a, "apb ");
  snprintf(a, sizeof a, "%s --synthetic 256 --method dense,star,apb --anchor 32 --query-offset 5 --embed-query 1 "
           "--max-new-tokens 1", run);
  expect(0, a, "star ");
  snprintf(a, sizeof a, "%s --synthetic 256 --method star --anchor 32 --query-offset 5", run);
  expect(1, a, "--query-offset 5 given but star does not embed the query in the anchor (--embed-query 0, star's "
               "default): drop --query-offset or pass --embed-query 1");
  snprintf(a, sizeof a, "%s --synthetic 256 --method dense,star,apb --anchor 32 --query-offset 5 --embed-query 0", run);
  expect(1, a, "--query-offset 5 given but star does not embed the query in the anchor (--embed-query 0)");

  /* token files: a line too long for one read is not split into two ids; an id beyond int64 is not
   * clamped; a directory is not an empty file; a safetensors file without tensors is described as such */
  char *path = tu_tmpname(".txt");
  char text[1200] = "";
  for (int i = 0; i < 40; i++) strcat(text, "7\n");
  memset(text + strlen(text), '0', 300);
  strcpy(text + 80 + 300, "5\n7\n");
  write_text(path, text);
  snprintf(a, sizeof a, "%s --method dense --tokens '%s'", run, path);
  expect(1, a, ":41: line longer than 254 characters");
  write_text(path, "1\n2\n99999999999999999999999\n");
  expect(1, a, ":3: '99999999999999999999999' is not a token id");
  remove(path);
  ck_assert(mkdir(path, 0700) == 0);
  expect(1, a, "Is a directory");
  rmdir(path);
  free(path);
  path = tu_tmpname(".safetensors");
  apb_error err = {0};
  ck_assert_int_eq(apb_st_write(path, 0, NULL, 0, NULL, NULL, &err), APB_OK);
  snprintf(a, sizeof a, "%s --method dense --tokens '%s'", run, path);
  expect(1, a, "no tensor 'tokens' among its 0 tensors");
  remove(path);
  free(path);

  /* a method the plan refuses ends the run before the others start (dense on 4M tokens would take hours) */
  snprintf(a, sizeof a, "%s --synthetic 4M --method dense,ulysses --hosts 3", run);
  expect(1, a, "3 hosts must divide the 2 KV heads");
  snprintf(a, sizeof a, "%s --synthetic 256 --method dense --dump ''", run);
  expect(2, a, "--dump wants a file name");
  expect(1, "run --model '' --quiet", "the model directory is empty");
  expect(2, "cmp '' ''", "path is empty");

  /* bench forward is dense on one host: --hosts overflowed its one-host result */
  expect(2, "bench forward --preset tiny --tokens 256 --hosts 4", "use apb bench sim");
  /* predict: every plan is checked before any output, so a refused default method leaves no partial JSON */
  ck_assert_int_eq(apb(&out, "predict --hosts 3 --json"), 1);
  assert_has(out, "give --method without ulysses");
  ck_assert_msg(strstr(out, "\"methods\"") == NULL, "partial JSON printed:\n%s", out);
  free(out);
  expect(0, "predict --hosts 3 --method dense,ring,zigzag,star,apb --json", "\"methods\"");
  expect(2, "predict --model ''", "--model wants a directory");
  /* --balance: dropped for the baselines of a list, refused for a baseline alone (as apb run does) */
  expect(0, "predict --method ring,apb --balance", "apb ");
  expect(1, "predict --method ring --balance", "--balance pairs virtual hosts");

  /* method lists: an empty item or a method named twice is a typo, not a shorter list */
  expect(2, "run --method ,dense", "an empty item");
  expect(2, "run --method dense,,apb", "an empty item");
  expect(2, "run --method dense,apb,", "an empty item");
  expect(2, "predict --method apb,ring,apb", "'apb' is listed twice");
  expect(2, "predict --method ring,nope", "unknown method 'nope'");
}
END_TEST

/* --dump-layers writes every layer's output per host and the selected indices of every host that passes
 * a block; --concurrent (hosts as threads at once) computes what the serialized hosts compute. */
START_TEST(dump_layers_and_concurrent) {
  char *path = tu_tmpname(".safetensors"), a[4400], *o1 = NULL, *o2 = NULL;
  const char *job = "run --preset tiny --synthetic 1024 --method apb --hosts 2 --anchor 64 --threads 1 --quiet";
  snprintf(a, sizeof a, "%s --dump '%s' --dump-layers", job, path);
  expect(0, a, NULL);
  apb_st_file *f = NULL;
  apb_error err = {0};
  ck_assert_msg(apb_st_open(path, &f, &err) == APB_OK, "%s", err.msg);
  for (int l = 0; l < 2; l++) {
    int64_t rows = 0;
    for (int h = 0; h < 2; h++) {
      char name[64];
      snprintf(name, sizeof name, "layer%d.host%d.out", l, h);
      const apb_st_tensor *t = apb_st_find(f, name);
      ck_assert_msg(t && t->dtype == APB_DT_F32 && t->ndim == 2 && t->shape[1] == 256, "%s: missing or not [T_h, 256]",
                    name);
      rows += t->shape[0];
      float *x = malloc(sizeof(float) * (size_t)apb_st_numel(t));
      ck_assert_msg(apb_st_read_f32(f, t, x, &err) == APB_OK, "%s", err.msg);
      for (int64_t i = 0; i < apb_st_numel(t); i++) ck_assert_msg(isfinite(x[i]), "%s[%lld] is not finite", name, (long long)i);
      free(x);
      /* host 0 passes l_p = 32 indices per KV head of its 512-token block; the last host passes none */
      snprintf(name, sizeof name, "layer%d.host%d.selected", l, h);
      t = apb_st_find(f, name);
      if (h == 1) {
        ck_assert_msg(t == NULL, "%s: the last host passes no block", name);
        continue;
      }
      ck_assert_msg(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 32, "%s: missing or not [2, 32]", name);
      int64_t idx[64];
      ck_assert_msg(apb_st_read_i64(f, t, idx, &err) == APB_OK, "%s", err.msg);
      for (int g = 0; g < 2; g++)
        for (int i = 0; i < 32; i++) {
          const int64_t v = idx[g * 32 + i];
          ck_assert_msg(v >= 0 && v < 512 && (i == 0 || v > idx[g * 32 + i - 1]),
                        "%s[%d][%d] = %lld: not an increasing index into the 512-token block", name, g, i, (long long)v);
        }
    }
    ck_assert_msg(rows >= 1024, "layer %d: %lld rows over both hosts, the document has 1024", l, (long long)rows);
  }
  apb_st_close(f);

  /* --balance: host 0 holds virtual hosts 0 and 3 (the last, which passes nothing), host 1 holds 1 and 2,
   * each passing l_p = 32 per KV head of its 256-token block: .selected and .selected_v2 */
  snprintf(a, sizeof a, "%s --balance --dump '%s' --dump-layers", job, path);
  expect(0, a, NULL);
  ck_assert_msg(apb_st_open(path, &f, &err) == APB_OK, "%s", err.msg);
  for (int l = 0; l < 2; l++)
    for (int h = 0; h < 2; h++)
      for (int second = 0; second < 2; second++) {
        char name[64];
        snprintf(name, sizeof name, "layer%d.host%d.selected%s", l, h, second ? "_v2" : "");
        const apb_st_tensor *t = apb_st_find(f, name);
        if (h == 0 && second) {
          ck_assert_msg(t == NULL, "%s: the last virtual host passes no block", name);
          continue;
        }
        ck_assert_msg(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 32, "--balance: %s missing or not [2, 32]",
                      name);
        int64_t idx[64];
        ck_assert_msg(apb_st_read_i64(f, t, idx, &err) == APB_OK, "%s", err.msg);
        for (int i = 0; i < 64; i++)
          ck_assert_msg(idx[i] >= 0 && idx[i] < 256, "%s[%d] = %lld: not an index into the 256-token block", name, i,
                        (long long)idx[i]);
      }
  apb_st_close(f);
  remove(path);
  free(path);

  /* the serialized and the concurrent run's dumps (hidden states, logits, tokens): equal bit for bit */
  char *d1 = tu_tmpname(".safetensors"), *d2 = tu_tmpname(".safetensors");
  ck_assert_int_eq(apb(&o1, "%s --hosts 4 --dump '%s'", job, d1), 0);
  ck_assert_int_eq(apb(&o2, "%s --hosts 4 --concurrent --dump '%s'", job, d2), 0);
  free(o1), free(o2);
  snprintf(a, sizeof a, "cmp --prec exact '%s' '%s'", d1, d2);
  expect(0, a, NULL);
  remove(d1), remove(d2);
  free(d1), free(d2);
}
END_TEST

/* gen-model's directory runs as it is: run --model DIR reads DIR's retaining heads without --heads (apb
 * needs them), and the model is the preset's with the same seed, so the greedy tokens are the same. */
START_TEST(model_dir_heads) {
  char *dir = tu_tmpname(".model"), a[4400], *from_dir = NULL, *from_preset = NULL;
  remove(dir);
  snprintf(a, sizeof a, "gen-model --preset tiny --seed 3 --out '%s'", dir);
  expect(0, a, "retaining_heads.safetensors");
  const char *job = "--synthetic 1024 --method dense,apb --max-new-tokens 4 --threads 1 --quiet --json";
  ck_assert_int_eq(apb(&from_dir, "run --model '%s' --seed 3 %s", dir, job), 0); /* the document's seed */
  ck_assert_int_eq(apb(&from_preset, "run --preset tiny --seed 3 %s", job), 0);
  const char *g1 = strstr(from_dir, "\"generated\""), *g2 = strstr(from_preset, "\"generated\"");
  ck_assert_msg(g1 && g2, "no generated tokens in:\n%s\n%s", from_dir, from_preset);
  ck_assert_msg(strncmp(g1, g2, strcspn(g2, "]")) == 0, "--model %s and the preset differ:\n%s\n%s", dir, from_dir,
                from_preset);
  free(from_dir), free(from_preset);
  /* without the file, apb's refusal names --heads */
  snprintf(a, sizeof a, "%s/retaining_heads.safetensors", dir);
  ck_assert_int_eq(remove(a), 0);
  snprintf(a, sizeof a, "run --model '%s' --method apb --synthetic 1024 --quiet", dir);
  expect(1, a, "--heads FILE");
  const char *files[] = {"config.json", "model.safetensors"};
  for (int i = 0; i < 2; i++) snprintf(a, sizeof a, "%s/%s", dir, files[i]), remove(a);
  rmdir(dir);
  free(dir);
}
END_TEST

static Suite *cli_suite(void) {
  Suite *s = suite_create("cli");
  TCase *tc = tu_tcase("attn_round_trip", 60);
  tcase_add_loop_test(tc, attn_round_trip, 0, (int)(sizeof trips / sizeof trips[0]));
  suite_add_tcase(s, tc);
  tc = tu_tcase("attn_rejects", 60);
  tcase_add_loop_test(tc, attn_rejects, 0, (int)(sizeof bad_cases / sizeof bad_cases[0]));
  tcase_add_test(tc, attn_out_not_a_file);
  tcase_add_test(tc, f64_beyond_f32);
  tcase_add_test(tc, cmp_exact_in_own_type);
  tcase_add_test(tc, gen_model_failed_write);
  suite_add_tcase(s, tc);
  tc = tu_tcase("cmp", 60);
  tcase_add_test(tc, cmp_equal_and_perturbed);
  tcase_add_test(tc, cmp_nonfinite_missing_unreadable);
  suite_add_tcase(s, tc);
  tc = tu_tcase("program", 60);
  tcase_add_test(tc, dispatcher);
  tcase_add_test(tc, bench_and_demo);
  tcase_add_test(tc, predict_fit);
  tcase_add_test(tc, run_inputs);
  tcase_add_test(tc, model_dir_heads);
  tcase_add_test(tc, dump_layers_and_concurrent);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(cli_suite(), "check_cli"); }
