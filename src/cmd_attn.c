/* src/cmd_attn.c: `apb attn`, one host's segmented attention (shared/APB.md 3.6) on tensors from a
 * safetensors file, written to another: the way to check apb_attn_naive / apb_attn_fast against any
 * outside implementation (PyTorch, the thunlp/APB kernels) on the same inputs.
 *
 * It reads q [R, Hq, D], k and v [K, Hkv, D], cuts k/v into the segments [P | A | B] (P = K - R,
 * B = R - A), validates everything against the contract in help_text below (every message names the
 * tensor, the extents involved and what would be consistent), calls the library with local_keys = 1
 * and writes o [R, Hq, D] and lse [Hq, R]. Not here: the APB schedule (scores, selection, passing);
 * this is the attention step alone. Tested in tests/check_cli.c (round trips against apb_attn_naive
 * called directly, and every rejected input).
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char *const cmd = "attn";

static const char help_text[] =
    "Usage: apb attn --method dense|star|apb [--anchor A] [--passing P] [--scale S]\n"
    "                [--impl naive|fast] [--threads N] --in IN --out OUT\n"
    "\n"
    "One host's segmented attention (shared/APB.md 3.6) on tensors read from a safetensors file.\n"
    "\n"
    "Input IN (safetensors; F32, or F16/BF16/F64 widened to F32, an F64 value beyond its range refused):\n"
    "  q  [R, Hq, D]      the host's query rows: A anchor rows first, then B = R - A local rows\n"
    "  k  [K, Hkv, D]     keys: P passing, then A anchor, then B local (K = P + A + B)\n"
    "  v  [K, Hkv, D]     values, laid out as k\n"
    "  Hq must be a multiple of Hkv (query head h uses KV head h / (Hq/Hkv)); D is the same in q, k\n"
    "  and v; every value must be finite. Segments: kp = k[0:P], ka = k[P:P+A], kb = k[P+A:K].\n"
    "\n"
    "Output OUT (safetensors, F32; metadata: method, anchor, passing, scale, impl):\n"
    "  o    [R, Hq, D]    attention output\n"
    "  lse  [Hq, R]       log-sum-exp of the scaled scores of each row (natural log)\n"
    "\n"
    "Mask, per query row (positions are indices inside each segment):\n"
    "  anchor row i (0 <= i < A): anchor keys 0..i; nothing of P or B\n"
    "  local row j  (0 <= j < B): all P passing keys, all A anchor keys, local keys 0..j\n"
    "  o = softmax(scale * q.k over the visible keys) . v;  lse = log sum exp(scale * q.k)\n"
    "\n"
    "Options:\n"
    "  --method M    required, no default:\n"
    "                dense: plain causal attention, needs A = P = 0 (K = R)\n"
    "                star:  anchor + local block, needs P = 0 (K = R)\n"
    "                apb:   passing + anchor + local block\n"
    "  --anchor A    anchor rows/keys, 0 <= A <= R (default 0; R is at most 2^30)\n"
    "  --passing P   passing keys; must equal K - R, which is also the default (the option only\n"
    "                guards against a file of the wrong shape)\n"
    "  --scale S     softmax scale, 0 to 1e6; 0 means 1/sqrt(D) (default 0); a scale that fp32\n"
    "                rounds to 0 (about 7e-46 or less, half its smallest number) is refused\n"
    "  --impl I      naive: the oracle (plain loops, double accumulation)\n"
    "                fast:  OpenBLAS tiles, online softmax, OpenMP (default fast)\n"
    "  --threads N   OpenMP/OpenBLAS threads, 0 = OMP_NUM_THREADS or every core (default 0)\n"
    "  --in IN       input file (required)\n"
    "  --out OUT     output file, replaced atomically (required)\n"
    "  -h, --help    this text\n"
    "\n"
    "Dumping inputs from PyTorch (tensors token-major, [tokens, heads, head_dim]):\n"
    "  import torch\n"
    "  from safetensors.torch import save_file, load_file\n"
    "  # q: [A+B, Hq, D]; kp/ka/kb and vp/va/vb: [len, Hkv, D] (e.g. transposed from [heads, len, D])\n"
    "  save_file({'q': q.float().contiguous(),\n"
    "             'k': torch.cat([kp, ka, kb]).float().contiguous(),\n"
    "             'v': torch.cat([vp, va, vb]).float().contiguous()}, 'in.safetensors')\n"
    "  # apb attn --method apb --anchor A --in in.safetensors --out out.safetensors\n"
    "  out = load_file('out.safetensors')  # out['o'] [A+B, Hq, D], out['lse'] [Hq, A+B]\n"
    "Compare with: apb cmp out.safetensors reference.safetensors\n"
    "\n"
    "Exit status: 0 written, 1 bad input data or a failed run, 2 usage error.\n";

enum { METHOD_DENSE, METHOD_STAR, METHOD_APB };
static const char *const method_names[] = {"dense", "star", "apb"};
enum { IMPL_NAIVE, IMPL_FAST };
static const char *const impl_names[] = {"naive", "fast"};

typedef struct attn_opts {
  int method;        /* -1 until given */
  int64_t anchor;    /* A */
  int64_t passing;   /* P, -1 when not given */
  double scale;      /* 0: 1/sqrt(D) */
  int impl;
  int threads;
  const char *in, *out;
} attn_opts;

/* Parse argv into o; CLI_OK, CLI_USAGE, or -1 after printing --help. */
static int parse(int argc, char **argv, attn_opts *o) {
  enum { O_METHOD = 256, O_ANCHOR, O_PASSING, O_SCALE, O_IMPL, O_THREADS, O_IN, O_OUT };
  static const struct option opts[] = {
      {"method", required_argument, NULL, O_METHOD},   {"anchor", required_argument, NULL, O_ANCHOR},
      {"passing", required_argument, NULL, O_PASSING}, {"scale", required_argument, NULL, O_SCALE},
      {"impl", required_argument, NULL, O_IMPL},       {"threads", required_argument, NULL, O_THREADS},
      {"in", required_argument, NULL, O_IN},           {"out", required_argument, NULL, O_OUT},
      {"help", no_argument, NULL, 'h'},                {NULL, 0, NULL, 0}};
  *o = (attn_opts){.method = -1, .passing = -1, .impl = IMPL_FAST};
  int c, rc = 0;
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(help_text, stdout); return -1;
    case O_METHOD: rc = cli_parse_choice(cmd, "--method", optarg, method_names, 3, &o->method); break;
    case O_ANCHOR: rc = cli_parse_i64(cmd, "--anchor", optarg, 0, INT64_C(1) << 30, &o->anchor); break;
    case O_PASSING: rc = cli_parse_i64(cmd, "--passing", optarg, 0, INT64_C(1) << 30, &o->passing); break;
    case O_SCALE: rc = cli_parse_f64(cmd, "--scale", optarg, 0, 1e6, &o->scale); break;
    case O_IMPL: rc = cli_parse_choice(cmd, "--impl", optarg, impl_names, 2, &o->impl); break;
    case O_THREADS: rc = cli_parse_int(cmd, "--threads", optarg, 0, 4096, &o->threads); break;
    case O_IN: o->in = optarg; break;
    case O_OUT: o->out = optarg; break;
    default: return CLI_USAGE; /* cli_getopt reported it */
    }
  }
  if (rc) return rc;
  if (optind < argc)
    return cli_usage(cmd, "unexpected argument '%s' (files go after --in and --out)", argv[optind]);
  if (o->method < 0) return cli_usage(cmd, "--method is required: dense, star or apb");
  if (!o->in) return cli_usage(cmd, "--in is required: the safetensors file holding q, k and v");
  if (!o->out) return cli_usage(cmd, "--out is required: where to write o and lse");
  if (o->scale != 0 && (float)o->scale == 0) /* would be 0 in fp32, which means 1/sqrt(D) */
    return cli_usage(cmd, "--scale %g is below the smallest fp32 number (%g): give 0 for 1/sqrt(D), or a scale "
                     "of at least %g", o->scale, (double)FLT_TRUE_MIN, (double)FLT_TRUE_MIN);
  if (o->method == METHOD_DENSE && o->anchor != 0)
    return cli_usage(cmd, "--method dense has no anchor (--anchor %lld); use --method star or apb",
                     (long long)o->anchor);
  if (o->method != METHOD_APB && o->passing > 0)
    return cli_usage(cmd, "--method %s has no passing block (--passing %lld); use --method apb",
                     method_names[o->method], (long long)o->passing);
  return CLI_OK;
}

/* Look up a rank-3 floating tensor; on failure print why and return CLI_FAIL. */
static int get3(const apb_st_file *f, const char *name, const char *layout, const apb_st_tensor **out) {
  const apb_st_tensor *t = apb_st_find(f, name);
  char shape[128];
  if (!t)
    return cli_fail(cmd, "%s has no tensor '%s'; attn needs q [R,Hq,D], k [K,Hkv,D] and v [K,Hkv,D]",
                    f->path, name);
  cli_format_shape(shape, sizeof shape, t->ndim, t->shape);
  if (t->ndim != 3)
    return cli_fail(cmd, "tensor '%s' in %s has rank %d %s; it must have rank 3 %s", name, f->path, t->ndim,
                    shape, layout);
  if (!apb_dtype_is_float(t->dtype))
    return cli_fail(cmd, "tensor '%s' in %s has dtype %s; attn takes F32, F16, BF16 or F64", name, f->path,
                    apb_dtype_name(t->dtype));
  for (int i = 0; i < 3; i++)
    if (t->shape[i] > (i == 0 ? (INT64_C(1) << 30) : 65536))
      return cli_fail(cmd, "tensor '%s' in %s is too large %s; at most [2^30, 65536, 65536]", name,
                      f->path, shape);
  *out = t;
  return CLI_OK;
}

/* Check the shapes of q, k, v against the options and each other (the help text's contract). Sets
 * *P; prints and returns CLI_FAIL on the first inconsistency. */
static int check_shapes(const attn_opts *o, const apb_st_file *f, const apb_st_tensor *q,
                        const apb_st_tensor *k, const apb_st_tensor *v, int64_t *P) {
  char qs[128], ks[128], vs[128];
  cli_format_shape(qs, sizeof qs, 3, q->shape);
  cli_format_shape(ks, sizeof ks, 3, k->shape);
  cli_format_shape(vs, sizeof vs, 3, v->shape);
  int64_t R = q->shape[0], K = k->shape[0];
  if (memcmp(k->shape, v->shape, 3 * sizeof k->shape[0]) != 0)
    return cli_fail(cmd, "k %s and v %s in %s differ in shape; they must be equal [K,Hkv,D]", ks, vs,
                    f->path);
  if (q->shape[1] < 1 || k->shape[1] < 1 || q->shape[2] < 1)
    return cli_fail(cmd, "q %s, k %s in %s: heads and head dim must be at least 1", qs, ks, f->path);
  if (q->shape[2] != k->shape[2])
    return cli_fail(cmd, "head dim D differs: q %s has D = %lld, k %s has D = %lld; they must match", qs,
                    (long long)q->shape[2], ks, (long long)k->shape[2]);
  if (q->shape[1] % k->shape[1] != 0)
    return cli_fail(cmd, "Hq = %lld (q %s) is not a multiple of Hkv = %lld (k %s); each KV head must serve "
                    "a whole group of query heads", (long long)q->shape[1], qs, (long long)k->shape[1], ks);
  if (R < 1) return cli_fail(cmd, "q %s in %s has no rows", qs, f->path);
  if (o->anchor > R)
    return cli_fail(cmd,
                    "--anchor %lld but q has only %lld rows: A must be <= R (anchor rows come first in q)",
                    (long long)o->anchor, (long long)R);
  if (K < R)
    return cli_fail(cmd, "k has %lld keys for %lld query rows: keys must be at least rows, "
                    "K = P + A + B with R = A + B", (long long)K, (long long)R);
  if (o->passing >= 0 && o->passing != K - R)
    return cli_fail(cmd,
                    "--passing %lld but k has %lld keys for %lld query rows: P must be keys - rows = %lld",
                    (long long)o->passing, (long long)K, (long long)R, (long long)(K - R));
  *P = K - R;
  if (o->method != METHOD_APB && *P != 0)
    return cli_fail(cmd,
                    "--method %s needs as many keys as query rows (no passing block), but k has %lld "
                    "keys for %lld rows; use --method apb",
                    method_names[o->method], (long long)K, (long long)R);
  return CLI_OK;
}

/* Widen a tensor to fp32 into *x and reject non-finite values. */
static int load(const apb_st_file *f, const apb_st_tensor *t, float **x) {
  apb_error err;
  apb_error_clear(&err);
  apb_status st = cli_read_tensor(f, t, x, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  int64_t bad = cli_first_nonfinite(*x, apb_st_numel(t));
  if (bad >= 0) {
    char idx[128];
    cli_format_index(idx, sizeof idx, t->ndim, t->shape, bad);
    return cli_fail(cmd,
                    "tensor '%s' in %s holds a non-finite value (%g) at %s; attention needs finite inputs",
                    t->name, f->path, (double)(*x)[bad], idx);
  }
  return CLI_OK;
}

static int write_out(const attn_opts *o, const apb_attn_args *a, float scale, double seconds) {
  int64_t R = a->A + a->B;
  apb_st_entry e[2] = {
      {.name = "o", .dtype = APB_DT_F32, .ndim = 3, .shape = {R, a->Hq, a->D}, .data = a->o},
      {.name = "lse", .dtype = APB_DT_F32, .ndim = 2, .shape = {a->Hq, R}, .data = a->lse},
  };
  char anchor[32], passing[32], scale_s[32];
  snprintf(anchor, sizeof anchor, "%lld", (long long)a->A);
  snprintf(passing, sizeof passing, "%lld", (long long)a->P);
  snprintf(scale_s, sizeof scale_s, "%.9g", (double)scale);
  const char *keys[] = {"method", "anchor", "passing", "scale", "impl"};
  const char *vals[] = {method_names[o->method], anchor, passing, scale_s, impl_names[o->impl]};
  apb_error err;
  apb_error_clear(&err);
  apb_status st = apb_st_write(o->out, 2, e, 5, keys, vals, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  printf("apb attn: %s -> %s: method %s, impl %s, P %lld, A %lld, B %lld, Hq %d, Hkv %d, D %d, scale %.6g, "
         "%.3f s, %.2f GFLOP/s\n",
         o->in, o->out, method_names[o->method], impl_names[o->impl], (long long)a->P, (long long)a->A,
         (long long)a->B, a->Hq, a->Hkv, a->D, (double)scale, seconds,
         seconds > 0 ? apb_attn_flops(a) / seconds * 1e-9 : 0.0);
  return CLI_OK;
}

int cmd_attn(int argc, char **argv) {
  attn_opts o;
  int rc = parse(argc, argv, &o);
  if (rc < 0) return CLI_OK;
  if (rc) return rc;
  cli_set_threads(o.threads);

  apb_error err;
  apb_error_clear(&err);
  apb_st_file *f = NULL;
  apb_status st = apb_st_open(o.in, &f, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);

  const apb_st_tensor *tq = NULL, *tk = NULL, *tv = NULL;
  float *q = NULL, *k = NULL, *v = NULL, *out = NULL, *lse = NULL;
  int64_t P = 0;
  rc = get3(f, "q", "[R,Hq,D]", &tq);
  if (!rc) rc = get3(f, "k", "[K,Hkv,D]", &tk);
  if (!rc) rc = get3(f, "v", "[K,Hkv,D]", &tv);
  if (!rc) rc = check_shapes(&o, f, tq, tk, tv, &P);
  if (!rc) rc = load(f, tq, &q);
  if (!rc) rc = load(f, tk, &k);
  if (!rc) rc = load(f, tv, &v);
  if (rc) goto done;

  int64_t R = tq->shape[0];
  int Hq = (int)tq->shape[1], Hkv = (int)tk->shape[1], D = (int)tq->shape[2];
  size_t kv_row = (size_t)Hkv * (size_t)D;
  out = malloc((size_t)R * (size_t)Hq * (size_t)D * sizeof *out);
  lse = malloc((size_t)R * (size_t)Hq * sizeof *lse);
  if (!out || !lse) {
    rc = cli_fail(cmd, "cannot allocate the output o [%lld,%d,%d]; try a smaller input", (long long)R, Hq, D);
    goto done;
  }
  apb_attn_args a = {
      .P = P, .A = o.anchor, .B = R - o.anchor, .Hq = Hq, .Hkv = Hkv, .D = D, .local_keys = 1,
      .scale = (float)o.scale, .q = q,
      .kp = k, .vp = v,
      .ka = k + (size_t)P * kv_row, .va = v + (size_t)P * kv_row,
      .kb = k + (size_t)(P + o.anchor) * kv_row, .vb = v + (size_t)(P + o.anchor) * kv_row,
      .o = out, .lse = lse,
  };
  float scale = apb_attn_scale(&a);
  double t0 = cli_now();
  st = o.impl == IMPL_NAIVE ? apb_attn_naive(&a, &err) : apb_attn_fast(&a, &err);
  double seconds = cli_now() - t0;
  if (st != APB_OK) {
    rc = cli_report(cmd, st, &err);
    goto done;
  }
  /* Finite inputs can still overflow fp32 in scale * q.k; every row sees at least one key, so a
   * non-finite o or lse is that overflow, never a result. */
  int64_t bad_o = cli_first_nonfinite(out, R * Hq * D), bad_l = cli_first_nonfinite(lse, R * Hq);
  if (bad_o >= 0 || bad_l >= 0) {
    char idx[128];
    int64_t shape_o[3] = {R, Hq, D}, shape_l[2] = {Hq, R};
    if (bad_o >= 0) cli_format_index(idx, sizeof idx, 3, shape_o, bad_o);
    else cli_format_index(idx, sizeof idx, 2, shape_l, bad_l);
    rc = cli_fail(cmd, "the output %s is not finite at %s: scale * q.k (scale %g) overflows fp32 for these "
                  "inputs; scale q and k down (or lower --scale) and run again",
                  bad_o >= 0 ? "o" : "lse", idx, (double)scale);
    goto done;
  }
  rc = write_out(&o, &a, scale, seconds);

done:
  free(q);
  free(k);
  free(v);
  free(out);
  free(lse);
  apb_st_close(f);
  return rc;
}
