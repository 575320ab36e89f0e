/* src/cmd_bench_ops.c: `apb bench gpu-ops`, the speed of the CUDA backend's memory-bound operations.
 *
 * The per-layer "other" time of `apb bench prefill` (everything but the GEMMs, the attention and the
 * collectives) is made of these: rmsnorm, split_rope, swiglu, add, the LSE merge of the overlapped apb
 * and the KV cache copies. Each is timed on the CUDA backend's stream with CUDA events, median of
 * --reps after --warmup, at the shapes one layer of a host with --tokens rows uses (llama3-8b-shape
 * sizes by default), and reported as milliseconds and GB/s of the bytes the op must read and write,
 * beside the backend's own device-to-device copy measured in the same run (the achievable rate).
 * Each op's time times its calls per layer, summed, is what one layer spends in them (swiglu counts T/C
 * calls: the last chunk of a layer may be partial, so its rows are counted, not its launches).
 *
 * bf16 storage, random inputs (never zeros). It calls only apb_* functions, so it compiles without
 * CUDA; such a build says so and returns 1. Run on the GPU machines by bench/gpu_session.sh (stage
 * bench-ops).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"


static const char *const cmd = "bench gpu-ops";

static const char help_text[] =
    "Usage: apb bench gpu-ops [--tokens T] [--hidden E] [--ffn F] [--hq N] [--hkv N] [--d N]\n"
    "                         [--ffn-chunk C] [--reps N] [--warmup N]\n"
    "\n"
    "Times the CUDA backend's memory-bound operations (bf16) at the shapes of one decoder layer over T\n"
    "rows on GPU 0: rmsnorm [T, E], split_rope [T, (Hq+2Hkv) D], add [T, E], swiglu [C, 2F], the LSE\n"
    "merge of two partials [T, Hq, D] and the copy of k and v into the KV cache. Prints the median ms\n"
    "of each call, the bytes it must move, GB/s, the ratio to a device-to-device copy of the same size\n"
    "measured in the same run, and the ms per layer (calls per layer x ms; swiglu's calls are T/C, the\n"
    "chunks' worth of rows).\n"
    "\n"
    "Options:\n"
    "  --tokens T      rows (default 36864: the anchor and block of a host at 128K on 4 GPUs)\n"
    "  --hidden E      hidden size (default 4096)\n"
    "  --ffn F         intermediate size (default 14336)\n"
    "  --hq N          query heads (default 32)\n"
    "  --hkv N         KV heads (default 8)\n"
    "  --d N           head dim, even (default 128)\n"
    "  --ffn-chunk C   rows per FFN chunk, as apb run's --ffn-chunk (default 8192)\n"
    "  --reps N        timed calls per op; the median is reported (default 20)\n"
    "  --warmup N      untimed calls first (default 3)\n"
    "  -h, --help      this text\n"
    "\n"
    "Exit status: 0 measured, 1 no CUDA in this build, no GPU, or a failed call, 2 usage error.\n";

typedef struct ops_opts {
  int64_t T, E, F, chunk;
  int hq, hkv, d, reps, warmup;
} ops_opts;

static int parse(int argc, char **argv, ops_opts *o) {
  enum { O_TOKENS = 256, O_HIDDEN, O_FFN, O_HQ, O_HKV, O_D, O_CHUNK, O_REPS, O_WARMUP };
  static const struct option opts[] = {
      {"tokens", required_argument, 0, O_TOKENS}, {"hidden", required_argument, 0, O_HIDDEN},
      {"ffn", required_argument, 0, O_FFN},       {"hq", required_argument, 0, O_HQ},
      {"hkv", required_argument, 0, O_HKV},       {"d", required_argument, 0, O_D},
      {"ffn-chunk", required_argument, 0, O_CHUNK}, {"reps", required_argument, 0, O_REPS},
      {"warmup", required_argument, 0, O_WARMUP}, {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  *o = (ops_opts){.T = 36864, .E = 4096, .F = 14336, .chunk = 8192, .hq = 32, .hkv = 8, .d = 128, .reps = 20,
                  .warmup = 3};
  int c, rc = 0;
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(help_text, stdout); return -1;
    case O_TOKENS: rc = cli_parse_i64(cmd, "--tokens", optarg, 1, INT64_C(1) << 22, &o->T); break;
    case O_HIDDEN: rc = cli_parse_i64(cmd, "--hidden", optarg, 8, INT64_C(1) << 16, &o->E); break;
    case O_FFN: rc = cli_parse_i64(cmd, "--ffn", optarg, 8, INT64_C(1) << 18, &o->F); break;
    case O_HQ: rc = cli_parse_int(cmd, "--hq", optarg, 1, 1024, &o->hq); break;
    case O_HKV: rc = cli_parse_int(cmd, "--hkv", optarg, 1, 1024, &o->hkv); break;
    case O_D: rc = cli_parse_int(cmd, "--d", optarg, 2, 256, &o->d); break;
    case O_CHUNK: rc = cli_parse_i64(cmd, "--ffn-chunk", optarg, 1, INT64_C(1) << 22, &o->chunk); break;
    case O_REPS: rc = cli_parse_int(cmd, "--reps", optarg, 1, 10000, &o->reps); break;
    case O_WARMUP: rc = cli_parse_int(cmd, "--warmup", optarg, 0, 1000, &o->warmup); break;
    default: return CLI_USAGE;
    }
  }
  if (rc) return rc;
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
  if (o->hq % o->hkv != 0) return cli_usage(cmd, "--hq %d is not a multiple of --hkv %d", o->hq, o->hkv);
  if (o->d % 2) return cli_usage(cmd, "--d %d must be even (RoPE rotates pairs of dimensions)", o->d);
  if (o->chunk > o->T) o->chunk = o->T;
  return CLI_OK;
}

enum { OP_COPY, OP_RMSNORM, OP_ROPE, OP_ADD, OP_SWIGLU, OP_MERGE, OP_CACHE, N_OP };

/* Everything one layer's memory-bound ops touch, in backend memory. */
typedef struct ops_bufs {
  void *x, *y, *qkv, *q, *k, *v, *gu, *ff, *o0, *o1, *kc;
  float *l0, *l1;
  int32_t *pos;
  apb_bweight *norm_w;
} ops_bufs;

/* One call of op `k` on the buffers. */
static apb_status run_op(apb_backend *be, int k, const ops_opts *o, ops_bufs *b, apb_error *err) {
  const apb_rope rope = {.type = APB_ROPE_DEFAULT, .theta = 500000.0};
  const size_t TE = (size_t)o->T * (size_t)o->E, kv = (size_t)o->T * (size_t)o->hkv * (size_t)o->d * 2;
  switch (k) {
  case OP_COPY: return be->ops->copy(be, b->y, b->x, TE * 2, err);
  case OP_RMSNORM: return be->ops->rmsnorm(be, b->norm_w, 1e-5f, b->x, o->T, b->y, err);
  case OP_ROPE:
    return be->ops->split_rope(be, b->qkv, o->T, o->hq, o->hkv, o->d, b->pos, &rope, b->q, b->k, b->v, err);
  case OP_ADD: return be->ops->add(be, b->y, b->x, TE, err);
  case OP_SWIGLU: return be->ops->swiglu(be, b->gu, o->chunk, o->F, b->ff, err);
  case OP_MERGE: {
    const void *op[2] = {b->o0, b->o1};
    const float *lp[2] = {b->l0, b->l1};
    return be->ops->merge(be, 2, op, lp, o->T, o->hq, o->d, b->o0, b->l0, err);
  }
  case OP_CACHE: return be->ops->copy(be, b->kc, b->k, kv, err);
  }
  return APB_OK;
}

int cmd_bench_gpu_ops(int argc, char **argv) {
  ops_opts o;
  int rc = parse(argc, argv, &o);
  if (rc) return rc < 0 ? CLI_OK : rc;
  if (!apb_cuda_built())
    return cli_fail(cmd, "this apb was built without CUDA (configure found no toolkit, or --without-cuda); "
                         "rebuild with --with-cuda on a machine with the CUDA toolkit");
  apb_error err = {0};
  int ndev = 0;
  apb_status st = apb_cuda_device_count(&ndev, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  char dev[256];
  if ((st = apb_cuda_device_describe(0, dev, sizeof dev, &err))) return cli_report(cmd, st, &err);

  apb_backend *be = NULL;
  if ((st = apb_backend_cuda(0, APB_DT_BF16, &be, &err))) return cli_report(cmd, st, &err);
  ops_bufs b = {0};
  const size_t T = (size_t)o.T, E = (size_t)o.E, F = (size_t)o.F, C = (size_t)o.chunk;
  const size_t QKV = (size_t)(o.hq + 2 * o.hkv) * (size_t)o.d, HD = (size_t)o.hq * (size_t)o.d;
  const size_t KV = (size_t)o.hkv * (size_t)o.d;
  struct { void **p; size_t n; } act[] = {{&b.x, T * E}, {&b.y, T * E}, {&b.qkv, T * QKV}, {&b.q, T * HD},
                                          {&b.k, T * KV}, {&b.v, T * KV}, {&b.gu, C * 2 * F}, {&b.ff, C * F},
                                          {&b.o0, T * HD}, {&b.o1, T * HD}, {&b.kc, T * KV}};
  for (size_t i = 0; !st && i < sizeof act / sizeof *act; i++) {
    st = be->ops->alloc(be, act[i].n * 2, act[i].p, &err);
    if (!st) st = apb_cuda_fill_uniform(*act[i].p, APB_DT_BF16, act[i].n, 1000 + i, 1.0f,
                                        apb_cuda_backend_stream(be), &err);
  }
  if (!st) st = be->ops->alloc(be, T * (size_t)o.hq * sizeof(float), (void **)&b.l0, &err);
  if (!st) st = be->ops->alloc(be, T * (size_t)o.hq * sizeof(float), (void **)&b.l1, &err);
  if (!st) st = apb_cuda_fill_uniform(b.l0, APB_DT_F32, T * (size_t)o.hq, 2001, 4.0f, apb_cuda_backend_stream(be), &err);
  if (!st) st = apb_cuda_fill_uniform(b.l1, APB_DT_F32, T * (size_t)o.hq, 2002, 4.0f, apb_cuda_backend_stream(be), &err);
  if (!st) st = be->ops->alloc(be, T * sizeof(int32_t), (void **)&b.pos, &err);
  int32_t *pos_h = malloc(T * sizeof(int32_t));
  float *w_h = malloc(E * sizeof(float));
  if (!pos_h || !w_h) st = apb_error_set(&err, APB_ENOMEM, "out of host memory for positions and weights");
  if (!st) {
    for (size_t t = 0; t < T; t++) pos_h[t] = (int32_t)(t * 3 % 131072);
    for (size_t i = 0; i < E; i++) w_h[i] = 0.5f + (float)(i % 7) * 0.125f;
    st = be->ops->upload(be, b.pos, pos_h, T * sizeof(int32_t), &err);
  }
  if (!st) st = be->ops->weight_create(be, w_h, 1, o.E, NULL, &b.norm_w, &err);
  free(pos_h), free(w_h);
  if (!st) st = be->ops->sync(be, &err);

  /* name, bytes moved per call, calls per layer */
  struct { const char *name; double bytes, per_layer; } info[N_OP] = {
      {"copy (d2d)", 2.0 * T * E * 2, 0},
      {"rmsnorm", 2.0 * T * E * 2 + E * 2, 2},
      {"split_rope", 2.0 * T * QKV * 2, 1},
      {"add", 3.0 * T * E * 2, 2},
      {"swiglu", 3.0 * C * F * 2, (double)T / (double)C},
      {"merge (2 parts)", 3.0 * T * HD * 2 + 3.0 * T * o.hq * 4, 1},
      {"kv cache copy", 2.0 * T * KV * 2, 2},
  };
  float *ms = malloc(sizeof(float) * (size_t)o.reps);
  apb_cuda_timer *tm = NULL;
  if (!st && !ms) st = apb_error_set(&err, APB_ENOMEM, "out of host memory");
  if (!st) st = apb_cuda_timer_create(&tm, &err);
  if (!st) {
    printf("# %s\n# bf16, T %lld, E %lld, F %lld (chunk %lld), Hq %d, Hkv %d, D %d; median of %d after %d\n", dev,
           (long long)o.T, (long long)o.E, (long long)o.F, (long long)o.chunk, o.hq, o.hkv, o.d, o.reps, o.warmup);
    printf("%-18s %10s %10s %9s %9s %12s\n", "op", "ms", "MB", "GB/s", "vs copy", "ms/layer");
  }
  double copy_rate = 0, layer_ms = 0;
  void *stream = apb_cuda_backend_stream(be);
  for (int k = 0; !st && k < N_OP; k++) {
    for (int i = 0; !st && i < o.warmup; i++) st = run_op(be, k, &o, &b, &err);
    for (int i = 0; !st && i < o.reps; i++) {
      st = apb_cuda_timer_start(tm, stream, &err);
      if (!st) st = run_op(be, k, &o, &b, &err);
      if (!st) st = apb_cuda_timer_stop(tm, stream, &err);
      if (!st) st = apb_cuda_timer_ms(tm, &ms[i], &err);
    }
    if (st) break;
    const double med = cli_median_f(ms, o.reps), rate = info[k].bytes / (med * 1e-3) * 1e-9;
    if (k == OP_COPY) copy_rate = rate;
    layer_ms += med * info[k].per_layer;
    printf("%-18s %10.4f %10.1f %9.1f %9.3f %12.4f\n", info[k].name, med, info[k].bytes * 1e-6, rate,
           copy_rate > 0 ? rate / copy_rate : 0.0, med * info[k].per_layer);
  }
  if (!st) st = be->ops->sync(be, &err);
  if (!st) printf("%-18s %10s %10s %9s %9s %12.4f\n", "sum per layer", "", "", "", "", layer_ms);
  fflush(stdout);
  apb_cuda_timer_destroy(tm);
  free(ms);
  void *all[] = {b.x, b.y, b.qkv, b.q, b.k, b.v, b.gu, b.ff, b.o0, b.o1, b.kc, b.l0, b.l1, b.pos};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++)
    if (all[i]) be->ops->free(be, all[i]);
  if (b.norm_w) be->ops->weight_destroy(be, b.norm_w);
  apb_backend_destroy(be);
  return st ? cli_report(cmd, st, &err) : CLI_OK;
}
