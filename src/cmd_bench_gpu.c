/* src/cmd_bench_gpu.c: `apb bench gpu-attn`, the speed of the CUDA attention (gpu/attn.cu) on one GPU.
 *
 * It times apb_cuda_attn (the Hopper kernel of gpu/attn_hopper.cu beside the earlier TC kernel of
 * gpu/attn.cu) on dense causal attention at a list of token counts (P = A = 0, B = n) and,
 * with --apb-shape, on the APB shape of the last of 4 hosts at 128K (P 6144 passing keys, A 4096
 * anchor rows, B 32768 local rows), with random bf16 inputs (never zeros), CUDA events around each call,
 * the median of --reps runs after --warmup runs. Useful TFLOP/s counts only the visible (row, key)
 * pairs, as apb_attn_flops does: 4 * pairs * D * Hq. bench/gpu_attn_torch.py prints the same columns
 * for torch SDPA (flash and cuDNN) on the same shapes.
 *
 * With --check it also compares, per shape, the output of every impl with that of the first impl it
 * timed (relative Frobenius error and largest difference of o, largest LSE difference), at sizes the CPU
 * oracle of the tests cannot reach; two correct bf16 kernels differ by a few 1e-3.
 *
 * Not here: correctness against the oracle (tests/check_gpu_attn.c), the CPU benchmarks (src/cmd_bench.c). It calls only
 * apb_* functions, so it compiles and links without CUDA; such a build prints that and returns 1.
 * Tested on the GPU machines through bench/gpu_session.sh (stage bench-attn).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

int cmd_bench_gpu_attn(int argc, char **argv);

static const char *const cmd = "bench gpu-attn";

static const char help_text[] =
    "Usage: apb bench gpu-attn [--tokens LIST] [--hq N] [--hkv N] [--d N] [--reps N] [--warmup N]\n"
    "                          [--impl IMPL] [--simple-max N] [--apb-shape]\n"
    "                          [--shape P:A:B[:n] ...] [--check] [--seed N] [--json FILE]\n"
    "\n"
    "Times the CUDA attention (apb_cuda_attn, bf16 storage) on one GPU: dense causal attention over each\n"
    "token count, and with --apb-shape the APB shape of the last of 4 hosts at 128K (6144 passing keys,\n"
    "4096 anchor rows, 32768 local rows). Prints shape, impl, median ms and useful TFLOP/s\n"
    "(4 * visible (row, key) pairs * D * Hq, as apb_attn_flops).\n"
    "\n"
    "Options:\n"
    "  --tokens LIST   dense token counts (default 8192,16384,32768,65536,131072)\n"
    "  --hq N          query heads (default 32)\n"
    "  --hkv N         KV heads, dividing --hq (default 8)\n"
    "  --d N           head dim, 1..256 (default 128)\n"
    "  --reps N        timed runs per shape and impl; the median is reported (default 10)\n"
    "  --warmup N      untimed runs first (default 2)\n"
    "  --impl LIST     comma-separated kernels, timed in this order: simple, tc (the default TC variant),\n"
    "                  tc_w16 or tc_w32 (forced TC variants), hopper (the sm_90a kernel, its best\n"
    "                  variant), hopper_v1 .. hopper_v5 (its forced variants, docs/performance.md); new\n"
    "                  means tc,hopper and all every one of them (tc and hopper then duplicate one\n"
    "                  variant each, a noise check) (default new)\n"
    "  --simple-max N  skip the simple kernel on shapes with more than N rows: it is a correctness path,\n"
    "                  seconds per call at 16K (default 8192)\n"
    "  --apb-shape     also time the APB shape\n"
    "  --shape P:A:B[:n]  also time this segment shape: P passing keys, A anchor rows, B local rows\n"
    "                  (':n': the rows see P and A only, no local keys); repeatable, at most 8\n"
    "  --seed N        input seed (default 1)\n"
    "  --check         compare every impl's o and LSE with the first impl's, per shape; a relative\n"
    "                  Frobenius difference of o above 2e-2 (twice the bf16 bound against the oracle), a\n"
    "                  NaN, or an LSE difference above 1e-3 fails the run\n"
    "  --json FILE     also write the results as JSON\n"
    "  -h, --help      this text\n"
    "\n"
    "Exit status: 0 measured, 1 no CUDA in this build, no GPU, or a failed run, 2 usage error.\n";

/* Indexed by apb_cuda_attn_impl, then the two group names. */
enum { IMPL_TC = APB_CUDA_ATTN_TC, IMPL_HOPPER = APB_CUDA_ATTN_HOPPER, N_IMPL = APB_CUDA_ATTN_HOPPER_V5 + 1,
       IMPL_NEW = N_IMPL, IMPL_ALL };
static const char *const impl_names[] = {"simple",    "tc",        "tc_w16",    "tc_w32",    "hopper",    "hopper_v1",
                                         "hopper_v2", "hopper_v3", "hopper_v4", "hopper_v5", "new",       "all"};

#define MAX_TOKENS 16
#define MAX_SHAPES 8

/* One shape to time: segment lengths and a label. */
typedef struct bench_shape {
  const char *kind; /* "dense", "apb" or "shape" (--shape) */
  int64_t P, A, B;
  int local_keys;   /* 0: the rows see P and A only (the passing-only call of the overlapped apb) */
} bench_shape;

typedef struct bench_opts {
  int64_t tokens[MAX_TOKENS];
  int ntokens;
  int hq, hkv, d, reps, warmup;
  int impls[N_IMPL], nimpl; /* what --impl asked for, in order, each once */
  int64_t simple_max;
  int apb_shape, check;
  bench_shape shapes[MAX_SHAPES]; /* --shape */
  int nshape;
  int64_t seed;
  const char *json;
} bench_opts;


/* Device buffers of one shape, bf16: q, o [A+B, Hq, D]; k*, v* [len, Hkv, D]; lse [Hq, A+B]. */
typedef struct bench_bufs {
  void *q, *o, *kp, *vp, *ka, *va, *kb, *vb;
  float *lse;
} bench_bufs;

/* --impl: a comma-separated list of impl names and the groups new and all. */
static int parse_impls(const char *arg, bench_opts *o) {
  char buf[256];
  if (strlen(arg) >= sizeof buf) return cli_usage(cmd, "--impl list too long");
  strcpy(buf, arg);
  o->nimpl = 0;
  for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    int k = 0, add[N_IMPL], nadd = 0;
    const int rc = cli_parse_choice(cmd, "--impl", tok, impl_names, N_IMPL + 2, &k);
    if (rc) return rc;
    if (k == IMPL_ALL)
      for (int i = 0; i < N_IMPL; i++) add[nadd++] = i;
    else if (k == IMPL_NEW)
      add[nadd++] = IMPL_TC, add[nadd++] = IMPL_HOPPER;
    else
      add[nadd++] = k;
    for (int i = 0; i < nadd; i++) {
      int seen = 0;
      for (int j = 0; j < o->nimpl; j++) seen |= o->impls[j] == add[i];
      if (!seen) o->impls[o->nimpl++] = add[i];
    }
  }
  if (o->nimpl == 0) return cli_usage(cmd, "--impl names no kernel");
  return CLI_OK;
}

/* --shape P:A:B[:n]: three lengths >= 0 with A + B >= 1, and an optional ':n' (no local keys). */
static int parse_shape(const char *arg, bench_opts *o) {
  if (o->nshape == MAX_SHAPES) return cli_usage(cmd, "--shape: at most %d shapes", MAX_SHAPES);
  long long v[3];
  char tail[8] = "";
  int n = sscanf(arg, "%lld:%lld:%lld%7s", &v[0], &v[1], &v[2], tail);
  if (n < 3 || (n == 4 && strcmp(tail, ":n") != 0))
    return cli_usage(cmd, "--shape '%s': expected P:A:B or P:A:B:n (three lengths, e.g. 6144:4096:32768)", arg);
  for (int i = 0; i < 3; i++)
    if (v[i] < 0 || v[i] > (1LL << 24))
      return cli_usage(cmd, "--shape '%s': lengths must lie in [0, %lld]", arg, 1LL << 24);
  if (v[1] + v[2] < 1) return cli_usage(cmd, "--shape '%s': A + B must be at least 1 (no query rows)", arg);
  if (n == 4 && v[0] + v[1] < 1) return cli_usage(cmd, "--shape '%s': with ':n' the rows see no key at all", arg);
  o->shapes[o->nshape++] = (bench_shape){"shape", v[0], v[1], v[2], n == 3};
  return CLI_OK;
}

static int parse(int argc, char **argv, bench_opts *o) {
  enum { O_TOKENS = 256, O_HQ, O_HKV, O_D, O_REPS, O_WARMUP, O_IMPL, O_SIMPLE_MAX, O_APB, O_SEED, O_JSON, O_CHECK, O_SHAPE };
  static const struct option opts[] = {
      {"tokens", required_argument, NULL, O_TOKENS}, {"hq", required_argument, NULL, O_HQ},
      {"hkv", required_argument, NULL, O_HKV},       {"d", required_argument, NULL, O_D},
      {"reps", required_argument, NULL, O_REPS},     {"warmup", required_argument, NULL, O_WARMUP},
      {"impl", required_argument, NULL, O_IMPL},     {"simple-max", required_argument, NULL, O_SIMPLE_MAX},
      {"apb-shape", no_argument, NULL, O_APB},       {"seed", required_argument, NULL, O_SEED},
      {"json", required_argument, NULL, O_JSON},     {"check", no_argument, NULL, O_CHECK},
      {"shape", required_argument, NULL, O_SHAPE},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0}};
  static const int64_t default_tokens[] = {8192, 16384, 32768, 65536, 131072};
  *o = (bench_opts){.ntokens = 5, .hq = 32, .hkv = 8, .d = 128, .reps = 10, .warmup = 2,
                    .simple_max = 8192, .seed = 1};
  memcpy(o->tokens, default_tokens, sizeof default_tokens);
  o->impls[0] = IMPL_TC, o->impls[1] = IMPL_HOPPER, o->nimpl = 2;
  int c, rc = 0;
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(help_text, stdout); return -1;
    case O_TOKENS:
      rc = cli_parse_i64_list(cmd, "--tokens", optarg, 1, INT64_C(1) << 24, o->tokens, MAX_TOKENS, &o->ntokens);
      break;
    case O_HQ: rc = cli_parse_int(cmd, "--hq", optarg, 1, 1024, &o->hq); break;
    case O_HKV: rc = cli_parse_int(cmd, "--hkv", optarg, 1, 1024, &o->hkv); break;
    case O_D: rc = cli_parse_int(cmd, "--d", optarg, 1, 256, &o->d); break;
    case O_REPS: rc = cli_parse_int(cmd, "--reps", optarg, 1, 10000, &o->reps); break;
    case O_WARMUP: rc = cli_parse_int(cmd, "--warmup", optarg, 0, 1000, &o->warmup); break;
    case O_IMPL: rc = parse_impls(optarg, o); break;
    case O_SIMPLE_MAX:
      rc = cli_parse_i64(cmd, "--simple-max", optarg, 0, INT64_C(1) << 24, &o->simple_max);
      break;
    case O_APB: o->apb_shape = 1; break;
    case O_SEED: rc = cli_parse_i64(cmd, "--seed", optarg, 0, INT64_MAX, &o->seed); break;
    case O_JSON: o->json = optarg; break;
    case O_CHECK: o->check = 1; break;
    case O_SHAPE: rc = parse_shape(optarg, o); break;
    default: return CLI_USAGE;
    }
  }
  if (rc) return rc;
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
  if (o->hq % o->hkv != 0)
    return cli_usage(cmd, "--hq %d is not a multiple of --hkv %d (each KV head serves a whole group)", o->hq,
                     o->hkv);
  return CLI_OK;
}

static void bufs_free(bench_bufs *b) {
  apb_cuda_free(b->q), apb_cuda_free(b->o), apb_cuda_free(b->kp), apb_cuda_free(b->vp);
  apb_cuda_free(b->ka), apb_cuda_free(b->va), apb_cuda_free(b->kb), apb_cuda_free(b->vb);
  apb_cuda_free(b->lse);
  memset(b, 0, sizeof *b);
}

/* n bf16 values of uniform [-1, 1) noise (stream `which` of the seed); NULL when n == 0. */
static apb_status alloc_random(void **p, size_t n, uint64_t seed, apb_error *err) {
  *p = NULL;
  if (n == 0) return APB_OK;
  apb_status st = apb_cuda_malloc(p, n * 2, err);
  if (st == APB_OK) st = apb_cuda_fill_uniform(*p, APB_DT_BF16, n, seed, 1.0f, NULL, err);
  return st;
}

static apb_status bufs_alloc(bench_bufs *b, const bench_shape *s, const bench_opts *o, apb_error *err) {
  memset(b, 0, sizeof *b);
  const size_t T = (size_t)(s->A + s->B), kvrow = (size_t)o->hkv * o->d;
  const uint64_t seed = (uint64_t)o->seed * 16;
  apb_status st = alloc_random(&b->q, T * o->hq * o->d, seed + 1, err);
  if (st == APB_OK) st = alloc_random(&b->kp, (size_t)s->P * kvrow, seed + 2, err);
  if (st == APB_OK) st = alloc_random(&b->vp, (size_t)s->P * kvrow, seed + 3, err);
  if (st == APB_OK) st = alloc_random(&b->ka, (size_t)s->A * kvrow, seed + 4, err);
  if (st == APB_OK) st = alloc_random(&b->va, (size_t)s->A * kvrow, seed + 5, err);
  if (st == APB_OK) st = alloc_random(&b->kb, (size_t)s->B * kvrow, seed + 6, err);
  if (st == APB_OK) st = alloc_random(&b->vb, (size_t)s->B * kvrow, seed + 7, err);
  if (st == APB_OK) st = apb_cuda_malloc(&b->o, T * o->hq * o->d * 2, err);
  if (st == APB_OK) st = apb_cuda_malloc((void **)&b->lse, T * o->hq * sizeof(float), err);
  if (st == APB_OK) st = apb_cuda_synchronize(err);
  if (st != APB_OK) bufs_free(b);
  return st;
}

/* --check state of one shape: the first impl's o (bf16 bits) and lse on the host, and a buffer for the
 * others'. */
typedef struct agree {
  uint16_t *ref_o, *o;
  float *ref_lse, *lse;
  const char *ref_name;
  int failed;
} agree;

static void agree_free(agree *g) {
  free(g->ref_o), free(g->o), free(g->ref_lse), free(g->lse);
  memset(g, 0, sizeof *g);
}

/* Bring back o and lse of the impl just timed; the first becomes the reference, the others are compared
 * with it and one line is printed. APB_ENOMEM when the host cannot hold two copies. */
static apb_status agree_step(agree *g, const bench_bufs *b, const bench_shape *s, const bench_opts *o,
                             const char *name, apb_error *err) {
  const size_t no = (size_t)(s->A + s->B) * o->hq * o->d, nl = (size_t)(s->A + s->B) * o->hq;
  const int first = g->ref_o == NULL;
  if (first) {
    g->ref_o = malloc(no * 2), g->o = malloc(no * 2);
    g->ref_lse = malloc(nl * sizeof(float)), g->lse = malloc(nl * sizeof(float));
    if (!g->ref_o || !g->o || !g->ref_lse || !g->lse) {
      agree_free(g);
      return apb_error_set(err, APB_ENOMEM, "no host memory for two copies of o (%zu MiB each)", no * 2 >> 20);
    }
    g->ref_name = name;
  }
  apb_status st = apb_cuda_memcpy(first ? g->ref_o : g->o, b->o, no * 2, err);
  if (st == APB_OK) st = apb_cuda_memcpy(first ? g->ref_lse : g->lse, b->lse, nl * sizeof(float), err);
  if (st != APB_OK || first) return st;
  double d2 = 0, r2 = 0, dmax = 0, lmax = 0;
  size_t nan = 0;
  for (size_t i = 0; i < no; i++) {
    const double x = apb_bf16_to_f32(g->o[i]), r = apb_bf16_to_f32(g->ref_o[i]);
    if (isnan(x) || isnan(r)) {
      nan++;
      continue;
    }
    d2 += (x - r) * (x - r), r2 += r * r;
    if (fabs(x - r) > dmax) dmax = fabs(x - r);
  }
  for (size_t i = 0; i < nl; i++) {
    const double x = g->lse[i], r = g->ref_lse[i];
    if (isnan(x) || isnan(r)) nan++;
    else if (x != r && fabs(x - r) > lmax) lmax = isinf(x) || isinf(r) ? INFINITY : fabs(x - r);
  }
  const double rel = r2 > 0 ? sqrt(d2 / r2) : sqrt(d2);
  const int bad = nan > 0 || !(rel <= 2e-2) || !(lmax <= 1e-3);
  printf("  %-10s vs %-10s o rel_fro %.3g, max |diff| %.3g; lse max |diff| %.3g; NaN %zu%s\n", name, g->ref_name,
         rel, dmax, lmax, nan, bad ? "  MISMATCH" : "");
  fflush(stdout);
  if (bad) g->failed = 1;
  return APB_OK;
}

/* Warm up, then time o->reps calls; *median and *best in ms. */
static apb_status time_impl(const apb_cuda_attn_args *x, apb_cuda_attn_impl impl, const bench_opts *o,
                            apb_cuda_timer *tm, float *ms, float *median, float *best, apb_error *err) {
  apb_status st = APB_OK;
  for (int i = 0; i < o->warmup && st == APB_OK; i++) st = apb_cuda_attn(x, impl, NULL, err);
  if (st == APB_OK) st = apb_cuda_synchronize(err);
  for (int i = 0; i < o->reps && st == APB_OK; i++) {
    st = apb_cuda_timer_start(tm, NULL, err);
    if (st == APB_OK) st = apb_cuda_attn(x, impl, NULL, err);
    if (st == APB_OK) st = apb_cuda_timer_stop(tm, NULL, err);
    if (st == APB_OK) st = apb_cuda_timer_ms(tm, &ms[i], err);
  }
  if (st != APB_OK) return st;
  *median = cli_median_f(ms, o->reps);
  *best = ms[0];
  return APB_OK;
}

int cmd_bench_gpu_attn(int argc, char **argv) {
  bench_opts o;
  int rc = parse(argc, argv, &o);
  if (rc == -1) return CLI_OK;
  if (rc != CLI_OK) return rc;
  if (!apb_cuda_built())
    return cli_fail(cmd, "this apb was built without CUDA (configure found no toolkit, or --without-cuda); "
                         "rebuild with --with-cuda on a machine with nvcc");
  apb_error err;
  apb_error_clear(&err);
  int ndev = 0;
  apb_status st = apb_cuda_device_count(&ndev, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  char dev[256];
  st = apb_cuda_device_describe(0, dev, sizeof dev, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);

  bench_shape shapes[MAX_TOKENS + 1 + MAX_SHAPES];
  int nshapes = 0;
  for (int i = 0; i < o.ntokens; i++) shapes[nshapes++] = (bench_shape){"dense", 0, 0, o.tokens[i], 1};
  if (o.apb_shape) shapes[nshapes++] = (bench_shape){"apb", 6144, 4096, 32768, 1};
  for (int i = 0; i < o.nshape; i++) shapes[nshapes++] = o.shapes[i];

  FILE *js = NULL;
  if (o.json) {
    js = fopen(o.json, "w");
    if (!js) return cli_fail(cmd, "cannot write --json %s; check the directory exists and is writable", o.json);
    char date[64];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    fprintf(js, "{\"bench\": \"gpu-attn\", \"device\": \"%s\", \"date\": \"%s\", \"dtype\": \"bf16\", "
                "\"reps\": %d, \"warmup\": %d, \"results\": [",
            dev, date, o.reps, o.warmup);
  }
  printf("# %s\n# bf16, Hq %d, Hkv %d, D %d, median of %d after %d warm-up\n", dev, o.hq, o.hkv, o.d, o.reps,
         o.warmup);
  printf("%-34s %-10s %10s %10s %9s\n", "shape", "impl", "ms", "best_ms", "TFLOP/s");
  fflush(stdout);

  float *ms = malloc((size_t)o.reps * sizeof *ms);
  apb_cuda_timer *tm = NULL;
  int nres = 0;
  rc = CLI_OK;
  if (!ms) return cli_fail(cmd, "out of host memory");
  st = apb_cuda_timer_create(&tm, &err);
  for (int si = 0; si < nshapes && st == APB_OK; si++) {
    const bench_shape *s = &shapes[si];
    bench_bufs b;
    st = bufs_alloc(&b, s, &o, &err);
    if (st != APB_OK) break;
    apb_cuda_attn_args x = {.P = s->P, .A = s->A, .B = s->B, .Hq = o.hq, .Hkv = o.hkv, .D = o.d,
                            .local_keys = s->local_keys, .dtype = APB_DT_BF16, .q = b.q, .kp = b.kp, .vp = b.vp,
                            .ka = b.ka, .va = b.va, .kb = b.kb, .vb = b.vb, .o = b.o, .lse = b.lse};
    apb_attn_args fa = {.P = s->P, .A = s->A, .B = s->B, .Hq = o.hq, .Hkv = o.hkv, .D = o.d,
                        .local_keys = s->local_keys};
    const double flop = apb_attn_flops(&fa);
    char label[96];
    if (s->P || s->A || !s->local_keys)
      snprintf(label, sizeof label, "%s P%lld A%lld B%lld%s", s->kind, (long long)s->P, (long long)s->A,
               (long long)s->B, s->local_keys ? "" : " nolocal");
    else
      snprintf(label, sizeof label, "%s causal n=%lld", s->kind, (long long)s->B);
    agree ag = {0};
    for (int ii = 0; ii < o.nimpl && st == APB_OK; ii++) {
      const int impl = o.impls[ii];
      if (impl == APB_CUDA_ATTN_SIMPLE && s->A + s->B > o.simple_max) {
        printf("%-34s %-10s %10s %10s %9s  (skipped: more rows than --simple-max %lld)\n", label, "simple", "-",
               "-", "-", (long long)o.simple_max);
        continue;
      }
      float med = 0, best = 0;
      st = time_impl(&x, (apb_cuda_attn_impl)impl, &o, tm, ms, &med, &best, &err);
      if (st != APB_OK) break;
      const double tflops = flop / (med * 1e-3) / 1e12;
      printf("%-34s %-10s %10.3f %10.3f %9.1f\n", label, impl_names[impl], med, best, tflops);
      fflush(stdout);
      if (js)
        fprintf(js,
                "%s\n  {\"shape\": \"%s\", \"label\": \"%s\", \"P\": %lld, \"A\": %lld, \"B\": %lld, \"Hq\": %d, "
                "\"Hkv\": %d, \"D\": %d, \"impl\": \"%s\", \"ms\": %.4f, \"best_ms\": %.4f, \"flop\": %.6g, "
                "\"tflops\": %.2f}",
                nres ? "," : "", s->kind, label, (long long)s->P, (long long)s->A, (long long)s->B, o.hq, o.hkv,
                o.d, impl_names[impl], med, best, flop, tflops);
      nres++;
      if (o.check) {
        st = agree_step(&ag, &b, s, &o, impl_names[impl], &err);
        if (st == APB_ENOMEM) {
          printf("  (--check skipped: %s)\n", err.msg);
          apb_error_clear(&err);
          st = APB_OK;
          o.check = 0;
        }
        if (ag.failed) rc = CLI_FAIL;
      }
    }
    agree_free(&ag);
    bufs_free(&b);
  }
  if (st != APB_OK) rc = cli_report(cmd, st, &err);
  else if (rc != CLI_OK) rc = cli_fail(cmd, "--check: outputs disagree (see the MISMATCH lines above)");
  apb_cuda_timer_destroy(tm);
  free(ms);
  if (js) {
    fprintf(js, "\n]}\n");
    if (fclose(js) != 0 && rc == CLI_OK) rc = cli_fail(cmd, "error writing --json %s", o.json);
  }
  return rc;
}
