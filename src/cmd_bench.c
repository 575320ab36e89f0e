/* src/cmd_bench.c: `apb bench TARGET` (a table of benchmark targets) and `apb demo`.
 *
 * bench attn: causal dense attention through apb_attn_fast for a list of token counts, in GFLOP/s of
 *   the FLOPs the mask needs (apb_attn_flops) over the median time of --reps runs after one warm-up,
 *   next to OpenBLAS cblas_sgemm measured in the same process (the ceiling the tiles are built on), and
 *   their ratio. Inputs are seeded random normals, never zeros (zeros would let the fast path's
 *   arithmetic hit trivial paths and would hide NaN propagation).
 * demo: the attention step of the last of H hosts (shared/APB.md 3.6) with the APB default lengths
 *   (APB.md 2) on random q/k/v; runs the naive oracle and the fast path on the same inputs, compares
 *   them with the tolerance table (apb_tolerance(APB_PREC_F32, keys)) and exits 0 only on PASS.
 *
 * A later issue adds `bench forward`, `bench prefill` and `bench gpu-attn`: one row in `targets` and
 * a function each. Not here: anything that checks correctness beyond the demo's comparison (that is
 * tests/check_attn.c). Times come from CLOCK_MONOTONIC. Tested in tests/check_cli.c (small shapes).
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* ---------------------------------------------------------------- shared */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median of t [n] (sorts t). */
static double median(double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* malloc n floats, or NULL when n * 4 bytes overflow or do not fit. */
static float *alloc_f32(int64_t n) {
  if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float)) return NULL;
  return malloc(n > 0 ? (size_t)n * sizeof(float) : 1);
}

static void fill_normal(apb_rng *r, float *x, int64_t n) { apb_rng_fill_normal(r, x, (size_t)n, 1.0f); }

/* ---------------------------------------------------------------- bench attn */

static const char bench_attn_help[] =
    "Usage: apb bench attn [--tokens T1,T2,...] [--hq N] [--hkv N] [--d N] [--reps N] [--gemm N]\n"
    "                      [--threads N] [--seed S] [--json]\n"
    "\n"
    "Causal dense attention (P = A = 0, B = T rows and keys) through apb_attn_fast for each T, and\n"
    "OpenBLAS cblas_sgemm on square M = N = K matrices in the same run, with the ratio of the two rates.\n"
    "GFLOP/s = apb_attn_flops (4 * visible (row, key) pairs * D * Hq) / median time; sgemm: 2*M*N*K.\n"
    "Each figure is the median of --reps runs after one warm-up run. Inputs: seeded normal random.\n"
    "\n"
    "Options:\n"
    "  --tokens LIST   comma-separated token counts, K/M suffixes allowed (default 4096,8192,16384)\n"
    "  --hq N          query heads (default 8)\n"
    "  --hkv N         KV heads, dividing --hq (default 2)\n"
    "  --d N           head dim (default 128)\n"
    "  --reps N        timed runs per figure (default 3)\n"
    "  --gemm N        sgemm size M = N = K (default 2048)\n"
    "  --threads N     OpenMP/OpenBLAS threads, 0 = OMP_NUM_THREADS or every core (default 0)\n"
    "  --seed S        random inputs (default 1)\n"
    "  --json          one JSON object on stdout instead of the table\n"
    "  -h, --help      this text\n";

#define MAX_TOKENS 32

typedef struct bench_attn_opts {
  int64_t tokens[MAX_TOKENS];
  int n_tokens;
  int hq, hkv, d, reps, gemm, threads, json;
  int64_t seed;
} bench_attn_opts;

/* Median seconds of reps sgemm runs of size o->gemm, after a warm-up; < 0 when out of memory. */
static double time_sgemm(const bench_attn_opts *o) { return cli_time_sgemm(o->gemm, o->reps, (uint64_t)o->seed); }

typedef struct attn_result {
  int64_t tokens;
  double flops, seconds;
} attn_result;

/* Time causal dense attention over T tokens; APB_OK or the library's status (err says why). */
static apb_status time_attn(const bench_attn_opts *o, int64_t T, attn_result *res, apb_error *err) {
  int64_t nq = T * o->hq * o->d, nkv = T * o->hkv * o->d;
  float *q = alloc_f32(nq), *k = alloc_f32(nkv), *v = alloc_f32(nkv), *out = alloc_f32(nq);
  float *lse = alloc_f32(T * o->hq);
  double *t = malloc((size_t)o->reps * sizeof *t);
  apb_status st = APB_OK;
  if (!q || !k || !v || !out || !lse || !t) {
    st = apb_error_set(err, APB_ENOMEM, "cannot allocate q/k/v/o for %lld tokens; try fewer --tokens",
                       (long long)T);
  } else {
    apb_rng r;
    apb_rng_seed(&r, (uint64_t)o->seed * 0x9E3779B97F4A7C15ull + (uint64_t)T);
    fill_normal(&r, q, nq);
    fill_normal(&r, k, nkv);
    fill_normal(&r, v, nkv);
    apb_attn_args a = {.P = 0, .A = 0, .B = T, .Hq = o->hq, .Hkv = o->hkv, .D = o->d, .local_keys = 1,
                       .q = q, .kb = k, .vb = v, .o = out, .lse = lse};
    for (int i = -1; i < o->reps && st == APB_OK; i++) {
      double t0 = cli_now();
      st = apb_attn_fast(&a, err);
      if (i >= 0) t[i] = cli_now() - t0;
    }
    if (st == APB_OK) {
      res->tokens = T;
      res->flops = apb_attn_flops(&a);
      res->seconds = median(t, o->reps);
    }
  }
  free(q);
  free(k);
  free(v);
  free(out);
  free(lse);
  free(t);
  return st;
}

static int bench_attn(int argc, char **argv) {
  static const char *const cmd = "bench attn";
  enum { O_TOKENS = 256, O_HQ, O_HKV, O_D, O_REPS, O_GEMM, O_THREADS, O_SEED, O_JSON };
  static const struct option opts[] = {
      {"tokens", required_argument, NULL, O_TOKENS}, {"hq", required_argument, NULL, O_HQ},
      {"hkv", required_argument, NULL, O_HKV},       {"d", required_argument, NULL, O_D},
      {"reps", required_argument, NULL, O_REPS},     {"gemm", required_argument, NULL, O_GEMM},
      {"threads", required_argument, NULL, O_THREADS}, {"seed", required_argument, NULL, O_SEED},
      {"json", no_argument, NULL, O_JSON},           {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  bench_attn_opts o = {.tokens = {4096, 8192, 16384}, .n_tokens = 3, .hq = 8, .hkv = 2, .d = 128, .reps = 3,
                       .gemm = 2048, .seed = 1};
  int c, rc = 0;
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(bench_attn_help, stdout); return CLI_OK;
    case O_TOKENS:
      rc = cli_parse_i64_list(cmd, "--tokens", optarg, 1, 1 << 20, o.tokens, MAX_TOKENS, &o.n_tokens);
      break;
    case O_HQ: rc = cli_parse_int(cmd, "--hq", optarg, 1, 1024, &o.hq); break;
    case O_HKV: rc = cli_parse_int(cmd, "--hkv", optarg, 1, 1024, &o.hkv); break;
    case O_D: rc = cli_parse_int(cmd, "--d", optarg, 1, 1024, &o.d); break;
    case O_REPS: rc = cli_parse_int(cmd, "--reps", optarg, 1, 1000, &o.reps); break;
    case O_GEMM: rc = cli_parse_int(cmd, "--gemm", optarg, 1, 32768, &o.gemm); break;
    case O_THREADS: rc = cli_parse_int(cmd, "--threads", optarg, 0, 4096, &o.threads); break;
    case O_SEED: rc = cli_parse_i64(cmd, "--seed", optarg, 0, INT64_MAX, &o.seed); break;
    case O_JSON: o.json = 1; break;
    default: return CLI_USAGE;
    }
  }
  if (rc) return rc;
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
  if (o.hq % o.hkv != 0)
    return cli_usage(cmd, "--hq %d is not a multiple of --hkv %d; each KV head serves Hq/Hkv query heads",
                     o.hq, o.hkv);
  cli_set_threads(o.threads);

  double gemm_s = time_sgemm(&o);
  if (gemm_s < 0)
    return cli_fail(cmd, "cannot allocate three %dx%d matrices; try a smaller --gemm", o.gemm, o.gemm);
  double gemm_flops = 2.0 * o.gemm * (double)o.gemm * o.gemm, gemm_rate = gemm_flops / gemm_s * 1e-9;
  if (!o.json) {
    printf("apb bench attn: causal dense attention, apb_attn_fast, Hq %d, Hkv %d, D %d, %d threads, "
           "median of %d after a warm-up, seed %lld\n",
           o.hq, o.hkv, o.d, cli_threads(), o.reps, (long long)o.seed);
    printf("sgemm (OpenBLAS cblas_sgemm, M=N=K=%d): %.4f s, %.1f GFLOP/s\n\n", o.gemm, gemm_s, gemm_rate);
    printf("%8s  %10s  %10s  %10s  %9s\n", "tokens", "GFLOP", "time_s", "GFLOP/s", "vs_sgemm");
  } else {
    printf("{\"target\": \"attn\", \"impl\": \"fast\", \"hq\": %d, \"hkv\": %d, \"d\": %d, \"threads\": %d, "
           "\"reps\": %d, \"seed\": %lld,\n \"sgemm\": {\"m\": %d, \"n\": %d, \"k\": %d, \"seconds\": %.6g, "
           "\"gflops\": %.6g},\n \"results\": [",
           o.hq, o.hkv, o.d, cli_threads(), o.reps, (long long)o.seed, o.gemm, o.gemm, o.gemm, gemm_s,
           gemm_rate);
  }
  fflush(stdout);
  for (int i = 0; i < o.n_tokens; i++) {
    apb_error err;
    apb_error_clear(&err);
    attn_result res = {0, 0, 0};
    apb_status st = time_attn(&o, o.tokens[i], &res, &err);
    if (st != APB_OK) {
      if (o.json) printf("]}\n");
      return cli_report(cmd, st, &err);
    }
    double rate = res.flops / res.seconds * 1e-9;
    if (!o.json)
      printf("%8lld  %10.2f  %10.4f  %10.1f  %9.3f\n", (long long)res.tokens, res.flops * 1e-9, res.seconds,
             rate, rate / gemm_rate);
    else
      printf("%s\n  {\"tokens\": %lld, \"gflop\": %.6g, \"seconds\": %.6g, \"gflops\": %.6g, "
             "\"vs_sgemm\": %.4g}",
             i ? "," : "", (long long)res.tokens, res.flops * 1e-9, res.seconds, rate, rate / gemm_rate);
    fflush(stdout);
  }
  if (o.json) printf("\n]}\n");
  return CLI_OK;
}

/* ---------------------------------------------------------------- bench: the target table */

static const cli_command targets[] = {
    {"attn", "causal dense attention (apb_attn_fast) against OpenBLAS sgemm", bench_attn},
    {"gpu-attn", "CUDA attention kernels (dense and the APB shape), TFLOP/s", cmd_bench_gpu_attn},
    {"gpu-ops", "CUDA memory-bound ops (rmsnorm, RoPE, SwiGLU, add, merge) of one layer, GB/s", cmd_bench_gpu_ops},
    {"forward", "a model's dense prefill: tokens/s and the linear layers' rate against sgemm", bench_forward},
    {"prefill", "multi-GPU prefill per method (NCCL, random bf16 weights made on the GPUs)", bench_prefill},
    {"sim", "simulated hosts: the slowest host's compute time against its FLOPs at the sgemm rate", bench_sim},
};
static const int n_targets = (int)(sizeof targets / sizeof targets[0]);

int cmd_bench(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "apb bench: which benchmark? Targets:\n");
    for (int i = 0; i < n_targets; i++) fprintf(stderr, "  %s\n", targets[i].name);
    fprintf(stderr, "Try 'apb bench --help' for more.\n");
    return CLI_USAGE;
  }
  if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
    printf("Usage: apb bench TARGET [OPTIONS]   (apb bench TARGET --help for the options)\n\nTargets:\n");
    cli_list(targets, n_targets);
    return CLI_OK;
  }
  const cli_command *t = cli_find(targets, n_targets, argv[1]);
  if (!t) return cli_usage("bench", "unknown benchmark target '%s'", argv[1]);
  return cli_call(t->fn, argc - 1, argv + 1);
}

/* ---------------------------------------------------------------- demo */

static const char demo_help[] =
    "Usage: apb demo [--tokens N] [--hosts H] [--seed S] [--anchor A] [--passing L] [--hq N] [--hkv N]\n"
    "                [--d N] [--threads N]\n"
    "\n"
    "The attention step (shared/APB.md 3.6) of the last of H hosts in an APB prefill of an N-token\n"
    "document, on random q/k/v: the host's block B = its share of the document (split evenly, the\n"
    "remainder spread over the first hosts), the anchor A, and the passing block P = the compressed\n"
    "blocks of hosts 0..H-2 (min(L, eligible tokens) each; host 0 excludes the anchor's tokens).\n"
    "Runs the naive oracle and the fast path, compares the fast path's o and lse with the oracle's\n"
    "(tolerance table: fp32, reduction length = keys) and exits 0 only when both PASS.\n"
    "\n"
    "Options:\n"
    "  --tokens N    document tokens (default 16384)\n"
    "  --hosts H     hosts; the demo is host H-1 (default 4; 1 gives dense attention)\n"
    "  --anchor A    anchor length l_a (default min(l_b/4, 8192), l_b = N/H)\n"
    "  --passing L   passing length l_p per host (default l_a/2)\n"
    "  --hq N        query heads (default 8)\n"
    "  --hkv N       KV heads, dividing --hq (default 2)\n"
    "  --d N         head dim (default 64)\n"
    "  --threads N   OpenMP/OpenBLAS threads, 0 = OMP_NUM_THREADS or every core (default 0)\n"
    "  --seed S      random inputs (default 1)\n"
    "  -h, --help    this text\n";

typedef struct demo_shape {
  int64_t n, hosts, lb, la, lp, P, A, B;
} demo_shape;

/* The lengths of APB.md 2/3 for the last host. Returns 0, or a usage error already printed. */
static int demo_lengths(const char *cmd, int64_t anchor, int64_t passing, demo_shape *s) {
  s->lb = s->n / s->hosts; /* the last host gets no remainder token */
  if (s->lb < 1)
    return cli_usage(cmd, "--tokens %lld over --hosts %lld leaves the last host no tokens; give more tokens",
                     (long long)s->n, (long long)s->hosts);
  s->la = anchor >= 0 ? anchor : (s->lb / 4 < 8192 ? s->lb / 4 : 8192);
  s->lp = passing >= 0 ? passing : s->la / 2;
  if (s->la > s->lb)
    return cli_usage(cmd, "--anchor %lld is longer than a block (%lld tokens); APB needs l_a <= l_b",
                     (long long)s->la, (long long)s->lb);
  s->P = 0;
  for (int64_t h = 0; h + 1 < s->hosts; h++) {
    int64_t len = s->n / s->hosts + (h < s->n % s->hosts ? 1 : 0);
    int64_t eligible = h == 0 ? len - s->la : len;
    if (eligible < 0) eligible = 0;
    s->P += s->lp < eligible ? s->lp : eligible;
  }
  s->A = s->hosts > 1 ? s->la : 0; /* a lone host 0 holds its block only */
  s->B = s->lb;
  return 0;
}

int cmd_demo(int argc, char **argv) {
  static const char *const cmd = "demo";
  enum { O_TOKENS = 256, O_HOSTS, O_SEED, O_ANCHOR, O_PASSING, O_HQ, O_HKV, O_D, O_THREADS };
  static const struct option opts[] = {
      {"tokens", required_argument, NULL, O_TOKENS}, {"hosts", required_argument, NULL, O_HOSTS},
      {"seed", required_argument, NULL, O_SEED},     {"anchor", required_argument, NULL, O_ANCHOR},
      {"passing", required_argument, NULL, O_PASSING}, {"hq", required_argument, NULL, O_HQ},
      {"hkv", required_argument, NULL, O_HKV},       {"d", required_argument, NULL, O_D},
      {"threads", required_argument, NULL, O_THREADS}, {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  demo_shape s = {.n = 16384, .hosts = 4};
  int64_t seed = 1, anchor = -1, passing = -1;
  int hq = 8, hkv = 2, d = 64, threads = 0;
  int c, rc = 0;
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(demo_help, stdout); return CLI_OK;
    case O_TOKENS: rc = cli_parse_i64(cmd, "--tokens", optarg, 1, INT64_C(1) << 24, &s.n); break;
    case O_HOSTS: rc = cli_parse_i64(cmd, "--hosts", optarg, 1, 1024, &s.hosts); break;
    case O_SEED: rc = cli_parse_i64(cmd, "--seed", optarg, 0, INT64_MAX, &seed); break;
    case O_ANCHOR: rc = cli_parse_i64(cmd, "--anchor", optarg, 0, INT64_C(1) << 24, &anchor); break;
    case O_PASSING: rc = cli_parse_i64(cmd, "--passing", optarg, 0, INT64_C(1) << 24, &passing); break;
    case O_HQ: rc = cli_parse_int(cmd, "--hq", optarg, 1, 1024, &hq); break;
    case O_HKV: rc = cli_parse_int(cmd, "--hkv", optarg, 1, 1024, &hkv); break;
    case O_D: rc = cli_parse_int(cmd, "--d", optarg, 1, 1024, &d); break;
    case O_THREADS: rc = cli_parse_int(cmd, "--threads", optarg, 0, 4096, &threads); break;
    default: return CLI_USAGE;
    }
  }
  if (rc) return rc;
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
  if (hq % hkv != 0)
    return cli_usage(cmd, "--hq %d is not a multiple of --hkv %d; each KV head serves Hq/Hkv query heads", hq,
                     hkv);
  if ((rc = demo_lengths(cmd, anchor, passing, &s)) != 0) return rc;
  cli_set_threads(threads);

  int64_t R = s.A + s.B, K = s.P + s.A + s.B;
  int64_t nq = R * hq * d, nkv = K * hkv * d;
  float *q = alloc_f32(nq), *k = alloc_f32(nkv), *v = alloc_f32(nkv);
  float *o_ref = alloc_f32(nq), *o_fast = alloc_f32(nq), *l_ref = alloc_f32(R * hq),
        *l_fast = alloc_f32(R * hq);
  if (!q || !k || !v || !o_ref || !o_fast || !l_ref || !l_fast) {
    rc = cli_fail(cmd, "cannot allocate q/k/v for %lld rows and %lld keys; try fewer --tokens", (long long)R,
                  (long long)K);
    goto done;
  }
  apb_rng r;
  apb_rng_seed(&r, (uint64_t)seed);
  fill_normal(&r, q, nq);
  fill_normal(&r, k, nkv);
  fill_normal(&r, v, nkv);
  /* Poison: an output the implementation forgot to write shows up as NaN in the comparison. */
  for (int64_t i = 0; i < nq; i++) o_ref[i] = o_fast[i] = NAN;
  for (int64_t i = 0; i < R * hq; i++) l_ref[i] = l_fast[i] = NAN;

  size_t row = (size_t)hkv * (size_t)d;
  apb_attn_args a = {.P = s.P, .A = s.A, .B = s.B, .Hq = hq, .Hkv = hkv, .D = d, .local_keys = 1, .q = q,
                     .kp = k, .vp = v, .ka = k + (size_t)s.P * row, .va = v + (size_t)s.P * row,
                     .kb = k + (size_t)(s.P + s.A) * row, .vb = v + (size_t)(s.P + s.A) * row,
                     .o = o_ref, .lse = l_ref};
  double flops = apb_attn_flops(&a);
  printf(
      "apb demo: host %lld of %lld, %lld-token document, seed %lld, %d threads\n"
      "  keys P %lld (passing) + A %lld (anchor) + B %lld (local) = %lld; rows A + B = %lld; Hq %d, Hkv %d, "
      "D %d; %.2f GFLOP\n",
      (long long)(s.hosts - 1), (long long)s.hosts, (long long)s.n, (long long)seed, cli_threads(),
      (long long)s.P, (long long)s.A, (long long)s.B, (long long)K, (long long)R, hq, hkv, d, flops * 1e-9);
  fflush(stdout);

  apb_error err;
  apb_error_clear(&err);
  double t0 = cli_now();
  apb_status st = apb_attn_naive(&a, &err);
  double t_naive = cli_now() - t0;
  if (st == APB_OK) {
    a.o = o_fast;
    a.lse = l_fast;
    t0 = cli_now();
    st = apb_attn_fast(&a, &err);
  }
  double t_fast = cli_now() - t0;
  if (st != APB_OK) {
    rc = cli_report(cmd, st, &err);
    goto done;
  }
  apb_tol tol = apb_tolerance(APB_PREC_F32, K);
  apb_cmp co, cl;
  int ok_o = apb_cmp_within(o_fast, o_ref, nq, &tol, &co);
  int ok_l = apb_cmp_within(l_fast, l_ref, R * hq, &tol, &cl);
  int bad_ref = cli_first_nonfinite(o_ref, nq) >= 0 || cli_first_nonfinite(l_ref, R * hq) >= 0;
  int ok = ok_o && ok_l && !bad_ref;
  printf("\n%-6s  %9s  %9s  %12s  %12s  %s\n", "impl", "time_s", "GFLOP/s", "rel_fro(o)", "rel_fro(lse)",
         "result");
  printf("%-6s  %9.3f  %9.2f  %12s  %12s  %s\n", "naive", t_naive, flops / t_naive * 1e-9, "oracle", "oracle",
         bad_ref ? "FAIL (oracle wrote non-finite values)" : "-");
  printf("%-6s  %9.3f  %9.2f  %12.3g  %12.3g  %s\n", "fast", t_fast, flops / t_fast * 1e-9, co.rel_fro,
         cl.rel_fro, ok ? "PASS" : "FAIL");
  printf(
      "\ntolerance (fp32 table, k = %lld keys): rel_fro <= %.3g, |fast-naive| <= %.3g*rms + %.3g*|naive|\n",
      (long long)K, tol.rel_fro, tol.atol_rms, tol.rtol);
  if (!ok_o) apb_cmp_print(stdout, "  o", &co);
  if (!ok_l) apb_cmp_print(stdout, "  lse", &cl);
  rc = ok ? CLI_OK : cli_fail(cmd, "the fast path disagrees with the oracle beyond the fp32 tolerance; "
                                   "run tests/check_attn for the failing shapes");

done:
  free(q);
  free(k);
  free(v);
  free(o_ref);
  free(o_fast);
  free(l_ref);
  free(l_fast);
  return rc;
}
