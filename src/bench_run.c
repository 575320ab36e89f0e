/* src/bench_run.c: `apb bench forward` and `apb bench sim`, whole-model benchmarks on the CPU (or any
 * backend), each reported against OpenBLAS sgemm measured in the same run.
 *
 * forward: one host, dense prefill of a preset at T tokens (default small, 8K), profiled by stage
 *   (apb_host_args.profile): tokens/s, and the rate of the linear layers (their FLOPs over the time of
 *   their matrix products) as a fraction of the sgemm rate. Goal (model issue): >= 0.7.
 * sim: H simulated hosts in serialized mode (one computes at a time, using every thread), default apb
 *   on the small preset at 32K tokens with 4 hosts: each host's compute time (prefill minus time
 *   blocked in collectives) against its FLOPs at the sgemm rate; the slowest host's ratio is the
 *   figure (goal: <= 1.5). Also each host's peak backend memory, beside an analytic estimate that is
 *   linear in the host's rows (no buffer quadratic in the length exists). Not a test: numbers only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

typedef struct bopts {
  apb_preset preset;
  int64_t tokens;
  int hosts, threads, gemm, reps, json, balance;
  int one_host; /* bench forward: dense on one host, so --hosts, --method and --balance are not its options */
  apb_method method;
  const char *backend;
  cli_shape shape; /* sizes changed from the preset's */
  char changed[256]; /* them, as " (kv-heads 8, ...)", or "" */
} bopts;

static int parse(const char *cmd, int argc, char **argv, bopts *o, const char *help) {
  enum { O_PRESET = 256, O_TOKENS, O_HOSTS, O_THREADS, O_GEMM, O_METHOD, O_BACKEND, O_JSON, O_BALANCE, O_SHAPE };
  static const struct option opts[] = {
      {"preset", required_argument, 0, O_PRESET}, {"tokens", required_argument, 0, O_TOKENS},
      {"hosts", required_argument, 0, O_HOSTS},   {"threads", required_argument, 0, O_THREADS},
      {"gemm", required_argument, 0, O_GEMM},     {"method", required_argument, 0, O_METHOD},
      {"backend", required_argument, 0, O_BACKEND}, {"json", no_argument, 0, O_JSON},
      {"balance", no_argument, 0, O_BALANCE},      CLI_SHAPE_OPTIONS(O_SHAPE),
      {"help", no_argument, 0, 'h'},              {0, 0, 0, 0}};
  int ch;
  while ((ch = cli_getopt(cmd, argc, argv, opts)) != -1) {
    int rc = 0;
    if (o->one_host && (ch == O_HOSTS || ch == O_METHOD || ch == O_BALANCE))
      return cli_usage(cmd, "--%s: %s runs dense on one host; for hosts and methods use apb bench sim",
                       ch == O_HOSTS ? "hosts" : ch == O_METHOD ? "method" : "balance", cmd);
    switch (ch) {
    case O_PRESET:
      if (apb_preset_parse(optarg, &o->preset)) return cli_usage(cmd, "--preset: unknown preset '%s'", optarg);
      break;
    case O_TOKENS: rc = cli_parse_i64(cmd, "--tokens", optarg, 2, (int64_t)1 << 30, &o->tokens); break;
    case O_HOSTS: rc = cli_parse_int(cmd, "--hosts", optarg, 1, APB_MAX_HOSTS, &o->hosts); break;
    case O_THREADS: rc = cli_parse_int(cmd, "--threads", optarg, 0, 4096, &o->threads); break;
    case O_GEMM: rc = cli_parse_int(cmd, "--gemm", optarg, 64, 16384, &o->gemm); break;
    case O_METHOD:
      if (apb_method_parse(optarg, &o->method)) return cli_usage(cmd, "--method: unknown method '%s'", optarg);
      break;
    case O_BACKEND: o->backend = optarg; break;
    case O_JSON: o->json = 1; break;
    case O_BALANCE: o->balance = 1; break;
    case 'h': fputs(help, stdout); fputs("Sizes:\n" CLI_SHAPE_HELP, stdout); return -1;
    default:
      if (ch >= O_SHAPE && ch < O_SHAPE + CLI_SHAPE_COUNT) {
        rc = cli_parse_shape(cmd, ch - O_SHAPE, optarg, &o->shape);
        break;
      }
      return CLI_USAGE;
    }
    if (rc) return rc;
  }
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s'", argv[optind]);
  return CLI_OK;
}

/* Run the plan (random document, 4-token query, no generation) with profiling; res [H] filled. */
static int run_plan(const char *cmd, const bopts *o, apb_model *m, apb_plan *plan, apb_host_result *res) {
  apb_error err = {0};
  int32_t *doc = malloc(sizeof(int32_t) * (size_t)o->tokens), query[4];
  if (!doc) return cli_fail(cmd, "out of memory for %lld tokens", (long long)o->tokens);
  apb_rng r;
  apb_rng_seed(&r, 7);
  for (int64_t i = 0; i < o->tokens; i++) doc[i] = (int32_t)apb_rng_below(&r, (uint64_t)m->cfg.vocab);
  for (int i = 0; i < 4; i++) query[i] = (int32_t)apb_rng_below(&r, (uint64_t)m->cfg.vocab);
  apb_run_opts ro;
  apb_run_opts_default(&ro);
  ro.method = o->method, ro.hosts = o->hosts, ro.balance = o->balance;
  apb_status st = apb_plan_make(&ro, o->tokens, 4, &m->cfg, m->scorer_width, plan, &err);
  apb_sim_opts so = {.backend = o->backend, .cpu = {.threads = o->threads}, .profile = 1};
  if (!st) st = apb_sim_execute(plan, m, &so, doc, query, res, NULL, &err);
  free(doc);
  return st ? cli_report(cmd, st, &err) : CLI_OK;
}

/* What both benchmarks do first: options, threads, the preset's model, and the sgemm rate (FLOP/s) of
 * this run. Returns CLI_OK, -1 after --help, or the exit code of a failure (reported). */
static int prepare(const char *cmd, int argc, char **argv, bopts *o, const char *help, apb_model **m,
                   double *sgemm) {
  int rc = parse(cmd, argc, argv, o, help);
  if (rc) return rc;
  cli_set_threads(o->threads);
  apb_error err = {0};
  apb_model_config cfg;
  int width = 0;
  apb_preset_config(o->preset, &cfg, &width);
  const int flags = (o->method == APB_METHOD_APB ? CLI_SHAPE_NEED_HEADS : 0) |
                    (strncmp(o->backend, "cuda", 4) == 0 ? CLI_SHAPE_CUDA : 0);
  if ((rc = cli_apply_shape(cmd, &o->shape, flags, &cfg, &width, o->changed, sizeof o->changed))) return rc;
  apb_status st = apb_model_generate_config(&cfg, width, 1, m, &err);
  if (st) return cli_report(cmd, st, &err);
  double gemm_s = cli_time_sgemm(o->gemm, 3, 1);
  if (gemm_s <= 0) {
    apb_model_free(*m), *m = NULL;
    return cli_fail(cmd, "out of memory measuring sgemm of size %d", o->gemm);
  }
  *sgemm = 2.0 * o->gemm * (double)o->gemm * o->gemm / gemm_s;
  return CLI_OK;
}

static const char forward_help[] =
    "Usage: apb bench forward [--preset small] [--tokens 8192] [--threads N] [--gemm 2048]\n"
    "                         [--backend fast] [--json]\n\n"
    "A dense prefill of the preset on one host, profiled by stage. Prints tokens/s and the linear\n"
    "layers' rate (their FLOPs over the time of their matrix products) against OpenBLAS sgemm\n"
    "(M = N = K = --gemm, median of 3) measured in the same run. Defaults in brackets.\n";

int bench_forward(int argc, char **argv) {
  const char *cmd = "bench forward";
  bopts o = {.preset = APB_PRESET_SMALL, .tokens = 8192, .hosts = 1, .gemm = 2048, .method = APB_METHOD_DENSE,
             .backend = "fast", .one_host = 1};
  apb_model *m = NULL;
  double sgemm = 0;
  int rc = prepare(cmd, argc, argv, &o, forward_help, &m, &sgemm);
  if (rc) return rc < 0 ? CLI_OK : rc;
  apb_plan *plan = malloc(sizeof *plan);
  apb_host_result res[1];
  memset(res, 0, sizeof res);
  rc = plan ? run_plan(cmd, &o, m, plan, res) : cli_fail(cmd, "out of memory");
  if (!rc) {
    const apb_host_stats *s = &res[0].stats;
    double lin_s = s->stage_s[APB_STAGE_QKV] + s->stage_s[APB_STAGE_OPROJ] + s->stage_s[APB_STAGE_FFN];
    double lin = s->linear_flops / lin_s;
    if (o.json) {
      printf("{\"preset\": \"%s\", ", apb_preset_name(o.preset));
      cli_json_model(stdout, &m->cfg, m->scorer_width);
      printf(", \"tokens\": %lld, \"threads\": %d, \"prefill_s\": %.6f, \"tokens_per_s\": %.1f, "
             "\"linear_gflops\": %.3f, \"sgemm_gflops\": %.3f, \"linear_over_sgemm\": %.4f, \"stage_s\": {",
             (long long)o.tokens, cli_threads(), s->prefill_s, (double)o.tokens / s->prefill_s,
             lin / 1e9, sgemm / 1e9, lin / sgemm);
      for (int k = 0; k < APB_STAGE_COUNT; k++) printf("%s\"%s\": %.6f", k ? ", " : "", apb_stage_name(k), s->stage_s[k]);
      printf("}}\n");
    } else {
      printf("apb bench forward: preset %s%s, %lld tokens, dense on one host, backend %s, %d threads\n",
             apb_preset_name(o.preset), o.changed, (long long)o.tokens, o.backend, cli_threads());
      printf("  sgemm (OpenBLAS, M=N=K=%d)        %10.1f GFLOP/s\n", o.gemm, sgemm / 1e9);
      printf("  prefill                         %10.3f s   %10.1f tokens/s\n", s->prefill_s,
             (double)o.tokens / s->prefill_s);
      printf("  linear layers (%.1f GFLOP)       %10.3f s   %10.1f GFLOP/s   %.3f of sgemm\n", s->linear_flops / 1e9,
             lin_s, lin / 1e9, lin / sgemm);
      printf("  attention (%.1f GFLOP)           %10.3f s   %10.1f GFLOP/s\n", s->attn_flops / 1e9,
             s->stage_s[APB_STAGE_ATTN], s->attn_flops / s->stage_s[APB_STAGE_ATTN] / 1e9);
      printf("  by stage:");
      for (int k = 0; k < APB_STAGE_COUNT; k++) printf(" %s %.3f", apb_stage_name(k), s->stage_s[k]);
      printf(" (s)\n");
    }
  }
  apb_host_result_free(&res[0]);
  free(plan);
  apb_model_free(m);
  return rc;
}

static const char sim_help[] =
    "Usage: apb bench sim [--preset small] [--tokens 32768] [--hosts 4] [--method apb] [--threads N]\n"
    "                     [--gemm 2048] [--backend fast] [--balance] [--json]\n\n"
    "H simulated hosts in serialized mode: one host computes at a time with every thread, so each\n"
    "host's compute time (prefill minus time blocked in collectives) is exact. For each host: that\n"
    "time, its FLOPs (attention + linear) at the sgemm rate measured in the same run, their ratio, and\n"
    "its peak backend memory beside an analytic estimate linear in its rows, and the slowest/fastest\n"
    "host ratio (--balance: each host holds virtual hosts h and 2H-1-h). Defaults in brackets.\n";

/* Bytes a host's prefill keeps at once, linear in its rows T (B of them its own): the layer buffers of
 * sched/host.c, the KV cache, the FFN chunk and the method's buffers (apb: scores, passing blocks;
 * ring/zigzag: two received blocks; ulysses: the head-split copies of the whole sequence). */
static double mem_bound(const apb_plan *p, const apb_model_config *c, int r, int64_t T, int64_t B, size_t es) {
  double E = c->hidden, Hq = c->n_heads, Hkv = c->n_kv_heads, D = c->head_dim, F = c->ffn, L = c->n_layers;
  double QKV = (Hq + 2 * Hkv) * D, chunk = p->ffn_chunk < T ? (double)p->ffn_chunk : (double)T;
  double per_row = es * (2 * E + QKV + 2 * Hq * D + 2 * Hkv * D) + 4 * Hq + 8;
  double b = (double)T * per_row + chunk * 3 * F * es + 2 * L * (double)B * Hkv * D * es;
  double n = (double)p->n;
  switch (p->o.method) {
  case APB_METHOD_STAR:
    if (p->balance) b += (double)(T > B ? T - B : B) * Hq * 4; /* lse_tmp */
    break;
  case APB_METHOD_APB: {
    const int split = p->overlap == APB_OVERLAP_SPLIT, anchor = !p->balance && p->overlap == APB_OVERLAP_ANCHOR;
    double tot = 0, maxb = (double)(T - B), maxbp = 0;
    for (int v = 0; v < p->V; v++) tot += (double)p->n_sel[v];
    int vv[2], nv;
    apb_plan_virtual(p, r, vv, &nv);
    b += 2 * 4 * Hkv * (double)B + 2 * tot * Hkv * D * es; /* scores, pooled; gathered C */
    for (int j = 0; j < nv; j++) {
      double Bj = (double)(p->block_start[vv[j] + 1] - p->block_start[vv[j]]), Pv = 0;
      for (int w = 0; w < vv[j]; w++) Pv += (double)p->n_sel[w];
      b += 4 * Hkv * (double)p->n_sel[vv[j]];                       /* idx */
      if (vv[j] > 0 && (p->balance || (anchor && Pv > 0)))
        b += 2 * (Pv + (double)(T - B)) * Hkv * D * es; /* [P_v | A] copies */
      maxb = Bj > maxb ? Bj : maxb;
      if (Pv > 0 && Bj > maxbp) maxbp = Bj;
    }
    if (p->balance || (anchor && r > 0 && tot > 0)) b += maxb * Hq * 4; /* lse_tmp */
    if (p->balance && split && tot > 0) b += maxbp * (Hq * D * es + 2 * 4 * Hq); /* o2, lse2, lse_loc */
    else if (!p->balance && split && r > 0) b += (double)B * (Hq * D * es + 2 * 4 * Hq); /* o2, lse2, lse_loc */
    break;
  }
  case APB_METHOD_RING:
  case APB_METHOD_ZIGZAG: b += 2 * 2 * (double)p->lb * 2 * Hkv * D * es + (double)B * (Hq * D * es + 3 * 4 * Hq); break;
  case APB_METHOD_ULYSSES:
    b += n * (3 * Hq + 2 * Hkv) / p->H * D * es + 2 * n * Hq / p->H * 4 + B * Hq * D * es * 2;
    if (p->uly_groups > 1) b += B * Hq * 4; /* rlse */
    break;
  default: break;
  }
  return b;
}

int bench_sim(int argc, char **argv) {
  const char *cmd = "bench sim";
  bopts o = {.preset = APB_PRESET_SMALL, .tokens = 32768, .hosts = 4, .gemm = 2048, .method = APB_METHOD_APB,
             .backend = "fast"};
  apb_model *m = NULL;
  double sgemm = 0;
  int rc = prepare(cmd, argc, argv, &o, sim_help, &m, &sgemm);
  if (rc) return rc < 0 ? CLI_OK : rc;
  apb_plan *plan = malloc(sizeof *plan);
  apb_host_result *res = calloc((size_t)o.hosts, sizeof *res);
  rc = plan && res ? run_plan(cmd, &o, m, plan, res) : cli_fail(cmd, "out of memory");
  if (!rc) {
    int worst = 0;
    double worst_ideal = 0;
    if (!o.json)
      printf("apb bench sim: %s, preset %s%s, %lld tokens, %d hosts (serialized), backend %s, %d threads\n"
             "  sgemm (OpenBLAS, M=N=K=%d): %.1f GFLOP/s\n\n"
             "%5s %8s %10s %10s %10s %9s %12s %12s\n",
             apb_method_name(o.method), apb_preset_name(o.preset), o.changed, (long long)o.tokens, plan->H, o.backend,
             cli_threads(), o.gemm, sgemm / 1e9, "host", "rows", "compute s", "GFLOP", "ideal s", "ratio",
             "peak MiB", "est MiB");
    else
    {
      printf("{\"method\": \"%s\", \"preset\": \"%s\", ", apb_method_name(o.method), apb_preset_name(o.preset));
      cli_json_model(stdout, &m->cfg, m->scorer_width);
      printf(", \"tokens\": %lld, \"hosts\": %d, \"sgemm_gflops\": %.3f, \"hosts_detail\": [", (long long)o.tokens,
             plan->H, sgemm / 1e9);
    }
    for (int r = 0; r < plan->H; r++) {
      const apb_host_stats *s = &res[r].stats;
      double comp = s->prefill_s - s->prefill_wait_s, fl = s->attn_flops + s->linear_flops, ideal = fl / sgemm;
      int64_t B = res[r].n_rows,
              T = B + ((o.method == APB_METHOD_APB || o.method == APB_METHOD_STAR) && (r || plan->balance) ? plan->la : 0);
      double bound = mem_bound(plan, &m->cfg, r, T, B, 4);
      if (comp > res[worst].stats.prefill_s - res[worst].stats.prefill_wait_s) worst = r;
      if (ideal > worst_ideal) worst_ideal = ideal;
      if (o.json)
        printf("%s{\"host\": %d, \"rows\": %lld, \"compute_s\": %.6f, \"flops\": %.6g, \"ideal_s\": %.6f, "
               "\"peak_bytes\": %lld, \"bound_bytes\": %.0f}", r ? ", " : "", r, (long long)T, comp, fl, ideal,
               (long long)s->peak_bytes, bound);
      else
        printf("%5d %8lld %10.3f %10.1f %10.3f %9.3f %12.1f %12.1f\n", r, (long long)T, comp, fl / 1e9, ideal,
               comp / ideal, (double)s->peak_bytes / 1048576.0, bound / 1048576.0);
    }
    double wc = res[worst].stats.prefill_s - res[worst].stats.prefill_wait_s, fastest = wc;
    for (int r = 0; r < plan->H; r++) {
      double cr = res[r].stats.prefill_s - res[r].stats.prefill_wait_s;
      if (cr < fastest) fastest = cr;
    }
    if (o.json)
      printf("], \"slowest_compute_s\": %.6f, \"largest_ideal_s\": %.6f, \"ratio\": %.4f, "
             "\"slowest_over_fastest\": %.4f}\n", wc, worst_ideal, wc / worst_ideal, wc / fastest);
    else
      printf("\nslowest host %d: %.3f s of compute; largest per-host FLOPs / sgemm rate: %.3f s; ratio %.3f\n"
             "slowest / fastest host compute: %.3f%s\n", worst, wc, worst_ideal, wc / worst_ideal, wc / fastest,
             o.balance ? " (balanced: virtual hosts h and 2H-1-h per host)" : "");
  }
  for (int r = 0; res && plan && r < plan->H; r++) apb_host_result_free(&res[r]);
  free(res);
  free(plan);
  apb_model_free(m);
  return rc;
}
