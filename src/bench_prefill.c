/* src/bench_prefill.c: `apb bench prefill`, the multi-GPU prefill benchmark (shared/APB.md 5; the
 * paper's Table 14 setting on the GPUs we have).
 *
 * For each document length, GPU count and method: the llama3-8b-shape preset (or another) with random
 * bf16 weights generated on every GPU, one rank per GPU (apb_nccl_execute), the prefill of the
 * document and a short query; reported per run: the prefill time (the slowest rank's), tokens/s, peak
 * device memory per GPU, the cost model's prediction from the rates measured in the same run, and,
 * from a second, profiled run, the per-layer breakdown (q/k/v projection, scorer, communication,
 * attention, o projection, FFN, elementwise ops, setup before the first layer, other) of the slowest
 * rank. The profiled run synchronises around every stage (which removes any overlap of communication
 * with compute), so its total is not the reported time; --profile 2 times the stages with CUDA events
 * on each rank's stream instead (no wait). JSON with --json FILE, and beside it FILE.tsv (method,
 * "-balanced" appended under --balance, gpus, tokens, prefill seconds, dense seconds at that length or
 * 0) from which bench/plot_prefill.gp draws the docs/ plots.
 * Dense always runs on one GPU. Not a test: numbers only; without NCCL or GPUs it says so and fails.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define CMD "bench prefill"
#define MAXN 16
#define MAXR 64 /* ranks: --gpus accepts at most 64 */

static const char help_text[] =
    "Usage: apb bench prefill [--tokens LIST] [--gpus LIST] [--method LIST] [--preset NAME]\n"
    "                         [--query-len Q] [--anchor A] [--passing P] [--profile 0|1|2] [--warmup N]\n"
    "                         [--reps N] [--ffn-chunk R]\n"
    "                         [--balance] [--overlap 0|1|2] [--attn-tflops X] [--gemm-tflops X]\n"
    "                         [--mem-gbs X] [--link-gbs X] [--latency-us X] [--json FILE] [sizes]\n\n"
    "Prefill time per method on 1..N GPUs (one rank per GPU, NCCL), random bf16 weights made on the\n"
    "GPUs. Defaults: --tokens 131072, --gpus 4, --method dense,ring,zigzag,ulysses,star,apb, --preset\n"
    "llama3-8b-shape, --query-len 64, --profile 1 (a second run per case for the per-stage breakdown,\n"
    "each stage between two syncs; 2: between two CUDA events on the rank's stream, no host wait and the\n"
    "overlap kept, so the stages add up to what the timed run does), --warmup 1 (untimed whole runs\n"
    "before each measured one, on the same weights and NCCL communicators, so that connection setup and\n"
    "first-call costs are not timed), --reps 1 (timed runs; the fastest is reported, by its slowest\n"
    "rank; the PyTorch peer reports the best of 2 after 1 untimed). --balance runs apb and star with two\n"
    "virtual hosts per GPU (h and 2H-1-h). --overlap: how apb hides its all-gathers, 0 not at all (one\n"
    "attention call after them), 1 [A|B] attended while they run, then the local rows against P,\n"
    "merged by LSE, 2 the anchor rows attended while they run, then the local rows in one call over\n"
    "[P|A|B] (default); ulysses' all-to-alls are pipelined over head groups unless it is 0.\n"
    "--ffn-chunk R: rows per FFN chunk (default 8192; bounds the [R, 2F] gate/up intermediate). The\n"
    "profiled run prints every rank's breakdown under the case's line. apb and star use the lengths of\n"
    "shared/APB.md 2 (apb: l_a = min(l_b/4, 8192), l_p = l_a/2; star: l_a = l_b) unless --anchor A\n"
    "(apb's l_a; star keeps l_a = l_b) or --passing P (apb's l_p) say otherwise; the paper's 128K\n"
    "setting and the PyTorch peer (shared/bench/torch_prefill.py) use 4096 and 2048. Dense uses one\n"
    "GPU. 'model s' is the cost model\n"
    "(apb/cost.h, as `apb predict`) at the rates given by the last five options (defaults: apb\n"
    "predict's); with --profile 1 or 2, 'floor s' is the same model at the attention and GEMM rates the\n"
    "slowest rank reached in its profiled run (its attention FLOPs over its attention time, its linear\n"
    "FLOPs over its projection, scorer and FFN time), printed beside it. 'comm %' is the share of the\n"
    "prefill that the critical rank's compute stream spent in collectives or waiting for them (CUDA\n"
    "events around each, in the timed run: apb_comm_stats.visible_s), the critical rank being the one\n"
    "with the most time outside them (the others' waits are mostly waiting for it: load imbalance, which\n"
    "'slow/fast' shows); dense 0. After each length and GPU count that ran apb, one line gives apb's\n"
    "speedup over every other method of that length and GPU count (dense: its one-GPU run), all measured\n"
    "in this run.\n"
    "Sizes (the preset's unless given; the JSON records the model used):\n"
    CLI_SHAPE_HELP;

typedef struct row {
  const char *method;
  int gpus;
  int64_t tokens;
  double prefill_s, tok_s, pred_s, peak_gib;
  double meas_attn, meas_gemm; /* profiled: the slowest rank's attention and GEMM FLOP/s (0: not profiled) */
  double floor_s;           /* the cost model at those two rates (0: not profiled) */
  double vis_s;             /* the critical rank's visible communication (apb_comm_stats.visible_s) */
  double stage_s[APB_STAGE_COUNT];
  double rank_stage_s[MAXR][APB_STAGE_COUNT]; /* profiled: every rank's per-layer seconds */
  double imbalance;         /* slowest / fastest rank's compute (prefill minus time blocked in collectives) */
  int64_t bytes;
  int64_t la, lp;           /* the plan's anchor and passing lengths */
  int64_t ffn_chunk;        /* the plan's rows per FFN chunk */
  int overlap;              /* the plan's overlap (apb_overlap) */
  int ok;
  char error[640];          /* why the case failed (ok == 0): the error message and status */
} row;

/* One case: method m on `gpus` GPUs at n tokens, with the command line's options in `base` (anchor,
 * passing, balance, overlap, FFN chunk; those that do not apply to m are reset to their defaults). */
static int run_case(const apb_model_config *cfg, int I, apb_method m, int gpus, int64_t n, int64_t q,
                    const apb_run_opts *base, int profile, int warmup, int reps, const apb_hw *hw, row *out) {
  apb_error err = {0};
  apb_run_opts o = *base;
  o.method = m, o.hosts = m == APB_METHOD_DENSE ? 1 : gpus;
  o.balance = base->balance > 0 && (m == APB_METHOD_APB || m == APB_METHOD_STAR);
  if (m != APB_METHOD_APB) o.anchor = o.passing = -1; /* -1: APB.md 2's defaults (star: l_a = l_b) */
  apb_plan *plan = malloc(sizeof *plan);
  int32_t *doc = malloc(sizeof(int32_t) * (size_t)n), *query = malloc(sizeof(int32_t) * (size_t)q);
  apb_host_result *res = calloc((size_t)gpus, sizeof *res);
  apb_comm_stats *cst = calloc((size_t)gpus, sizeof *cst);
  int rc = CLI_OK;
  if (!plan || !doc || !query || !res || !cst) {
    rc = cli_fail(CMD, "out of memory");
    goto done;
  }
  apb_rng r;
  apb_rng_seed(&r, 11);
  for (int64_t i = 0; i < n; i++) doc[i] = (int32_t)apb_rng_below(&r, (uint64_t)cfg->vocab);
  for (int64_t i = 0; i < q; i++) query[i] = (int32_t)apb_rng_below(&r, (uint64_t)cfg->vocab);
  apb_status st = apb_plan_make(&o, n, q, cfg, I, plan, &err);
  if (st) {
    rc = cli_report(CMD, st, &err);
    snprintf(out->error, sizeof out->error, "%s", err.msg);
    goto done;
  }
  for (int pass = 0; pass < 1 + (profile != 0); pass++) {
    apb_nccl_opts no = {.backend = "cuda-bf16", .use_preset = 1, .cfg = cfg, .scorer_width = I, .seed = 1,
                        .profile = pass == 1 ? profile : 0, .warmup = warmup, .reps = pass == 1 ? 1 : reps,
                        .comm_timing = pass == 0};
    st = apb_nccl_execute(plan, NULL, &no, doc, query, res, cst, &err);
    if (st) {
      rc = cli_report(CMD, st, &err);
      snprintf(out->error, sizeof out->error, "%s (%s)", err.msg, apb_status_str(st));
      goto done;
    }
    int worst = 0;
    for (int k = 1; k < plan->H; k++)
      if (res[k].stats.prefill_s > res[worst].stats.prefill_s) worst = k;
    /* per-rank compute: the profiled run books the time blocked in collectives to COMM (every stage is
     * synchronised), so its prefill minus COMM is the rank's own work; unprofiled, the host-side wait */
    double cmax = 0, cmin = 1e300;
    for (int k = 0; k < plan->H; k++) {
      const apb_host_stats *hs = &res[k].stats;
      double cpt = hs->prefill_s - (pass ? hs->stage_s[APB_STAGE_COMM] : hs->prefill_wait_s);
      cmax = cpt > cmax ? cpt : cmax, cmin = cpt < cmin ? cpt : cmin;
    }
    if (cmin > 0) out->imbalance = cmax / cmin;
    if (pass == 0) {
      out->prefill_s = res[worst].stats.prefill_s;
      /* the critical rank: the most time outside collectives. All ranks end a layer together, so the
       * others' visible time is mostly waiting for it (load imbalance, which slow/fast shows), not the
       * cost of communicating */
      int crit = 0;
      for (int k = 1; k < plan->H; k++)
        if (res[k].stats.prefill_s - cst[k].visible_s > res[crit].stats.prefill_s - cst[crit].visible_s) crit = k;
      out->vis_s = cst[crit].visible_s;
      out->tok_s = (double)n / out->prefill_s;
      out->peak_gib = 0;
      out->bytes = 0;
      for (int k = 0; k < plan->H; k++) {
        if ((double)res[k].stats.peak_bytes / 1073741824.0 > out->peak_gib)
          out->peak_gib = (double)res[k].stats.peak_bytes / 1073741824.0;
        out->bytes += res[k].stats.bytes_sent;
      }
    } else {
      const apb_host_stats *ws = &res[worst].stats;
      const double ta = ws->stage_s[APB_STAGE_ATTN],
                   tl = ws->stage_s[APB_STAGE_QKV] + ws->stage_s[APB_STAGE_SCORE] + ws->stage_s[APB_STAGE_OPROJ] +
                        ws->stage_s[APB_STAGE_FFN];
      out->meas_attn = ta > 0 ? ws->attn_flops / ta : 0;
      out->meas_gemm = tl > 0 ? ws->linear_flops / tl : 0;
      for (int s = 0; s < APB_STAGE_COUNT; s++) out->stage_s[s] = res[worst].stats.stage_s[s] / cfg->n_layers;
      for (int k = 0; k < plan->H && k < MAXR; k++)
        for (int s = 0; s < APB_STAGE_COUNT; s++) out->rank_stage_s[k][s] = res[k].stats.stage_s[s] / cfg->n_layers;
    }
    for (int k = 0; k < plan->H; k++) apb_host_result_free(&res[k]);
  }
  apb_cost *c = calloc((size_t)plan->H, sizeof *c);
  if (c && apb_cost_plan(plan, cfg, I, 2, hw, c, &err) == APB_OK) {
    out->pred_s = 0;
    for (int k = 0; k < plan->H; k++)
      if (c[k].t_total > out->pred_s) out->pred_s = c[k].t_total;
  }
  if (c && out->meas_attn > 0 && out->meas_gemm > 0) {
    apb_hw fit = *hw;
    fit.attn_flops_s = out->meas_attn, fit.gemm_flops_s = out->meas_gemm;
    if (apb_cost_plan(plan, cfg, I, 2, &fit, c, &err) == APB_OK)
      for (int k = 0; k < plan->H; k++)
        if (c[k].t_total > out->floor_s) out->floor_s = c[k].t_total;
  }
  free(c);
  out->la = plan->la, out->lp = plan->lp, out->ffn_chunk = plan->ffn_chunk, out->overlap = plan->overlap;
  out->method = apb_method_name(m);
  out->gpus = plan->H;
  out->tokens = n;
  out->ok = 1;
done:
  free(plan), free(doc), free(query), free(res), free(cst);
  return rc;
}

int bench_prefill(int argc, char **argv) {
  int64_t tokens[MAXN] = {131072}, gpus_l[MAXN] = {4};
  int nt = 1, ng = 1, nm = 0, profile = 1, warmup = 1, reps = 1;
  int64_t q = 64;
  apb_run_opts base; /* what the options set for every case; method and hosts per case */
  apb_run_opts_default(&base);
  base.balance = 0, base.overlap = -1; /* the plan's default */
  apb_hw hw;
  apb_hw_default(&hw);
  apb_method ms[APB_METHOD_COUNT];
  for (int i = 0; i < APB_METHOD_COUNT; i++) ms[nm++] = (apb_method)i;
  apb_preset preset = APB_PRESET_LLAMA3_8B;
  const char *json = NULL;
  enum { O_TOK = 256, O_GPUS, O_METHOD, O_PRESET, O_Q, O_PROF, O_JSON, O_BAL, O_OVL, O_LA, O_LP, O_WARM, O_REPS,
         O_FFNC, O_RATE, O_SHAPE = O_RATE + CLI_RATE_COUNT };
  static const struct option opts[] = {
      {"tokens", required_argument, 0, O_TOK},     {"gpus", required_argument, 0, O_GPUS},
      {"method", required_argument, 0, O_METHOD},  {"preset", required_argument, 0, O_PRESET},
      {"query-len", required_argument, 0, O_Q},
      {"profile", required_argument, 0, O_PROF},   {"json", required_argument, 0, O_JSON},
      {"balance", no_argument, 0, O_BAL},          {"overlap", required_argument, 0, O_OVL},
      {"anchor", required_argument, 0, O_LA},      {"passing", required_argument, 0, O_LP},
      {"warmup", required_argument, 0, O_WARM},    {"reps", required_argument, 0, O_REPS},
      {"ffn-chunk", required_argument, 0, O_FFNC},
      {"attn-tflops", required_argument, 0, O_RATE + CLI_RATE_ATTN},
      {"gemm-tflops", required_argument, 0, O_RATE + CLI_RATE_GEMM},
      {"mem-gbs", required_argument, 0, O_RATE + CLI_RATE_MEM},
      {"link-gbs", required_argument, 0, O_RATE + CLI_RATE_LINK},
      {"latency-us", required_argument, 0, O_RATE + CLI_RATE_LAT},
      CLI_SHAPE_OPTIONS(O_SHAPE),
      {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
  cli_shape shape = {0};
  int ch;
  while ((ch = cli_getopt(CMD, argc, argv, opts)) != -1) {
    int rc = 0;
    switch (ch) {
    case O_TOK: rc = cli_parse_i64_list(CMD, "--tokens", optarg, 16, (int64_t)1 << 24, tokens, MAXN, &nt); break;
    case O_GPUS: rc = cli_parse_i64_list(CMD, "--gpus", optarg, 1, 64, gpus_l, MAXN, &ng); break;
    case O_METHOD: rc = cli_parse_methods(CMD, "--method", optarg, ms, &nm); break;
    case O_PRESET:
      if (apb_preset_parse(optarg, &preset)) rc = cli_usage(CMD, "--preset: unknown preset '%s'", optarg);
      break;
    case O_Q: rc = cli_parse_i64(CMD, "--query-len", optarg, 1, 4096, &q); break;
    case O_PROF: rc = cli_parse_int(CMD, "--profile", optarg, 0, 2, &profile); break;
    case O_OVL: rc = cli_parse_int(CMD, "--overlap", optarg, 0, 2, &base.overlap); break;
    case O_FFNC: rc = cli_parse_i64(CMD, "--ffn-chunk", optarg, 1, (int64_t)1 << 24, &base.ffn_chunk); break;
    case O_WARM: rc = cli_parse_int(CMD, "--warmup", optarg, 0, 100, &warmup); break;
    case O_REPS: rc = cli_parse_int(CMD, "--reps", optarg, 1, 100, &reps); break;
    case O_RATE + CLI_RATE_ATTN:
    case O_RATE + CLI_RATE_GEMM:
    case O_RATE + CLI_RATE_MEM:
    case O_RATE + CLI_RATE_LINK:
    case O_RATE + CLI_RATE_LAT: rc = cli_parse_rate(CMD, ch - O_RATE, optarg, &hw); break;
    case O_LA: rc = cli_parse_i64(CMD, "--anchor", optarg, 0, (int64_t)1 << 24, &base.anchor); break;
    case O_LP: rc = cli_parse_i64(CMD, "--passing", optarg, 0, (int64_t)1 << 24, &base.passing); break;
    case O_JSON: json = optarg; break;
    case O_BAL: base.balance = 1; break;
    case 'h': fputs(help_text, stdout); return CLI_OK;
    default:
      if (ch >= O_SHAPE && ch < O_SHAPE + CLI_SHAPE_COUNT) {
        rc = cli_parse_shape(CMD, ch - O_SHAPE, optarg, &shape);
        break;
      }
      return CLI_USAGE;
    }
    if (rc) return rc;
  }
  if (optind < argc) return cli_usage(CMD, "unexpected argument '%s'", argv[optind]);
  apb_model_config cfg;
  int I = 0;
  char changed[256] = "";
  apb_preset_config(preset, &cfg, &I);
  int apb_in = 0;
  for (int i = 0; i < nm; i++) apb_in |= ms[i] == APB_METHOD_APB;
  int src = cli_apply_shape(CMD, &shape, CLI_SHAPE_CUDA | (apb_in ? CLI_SHAPE_NEED_HEADS : 0), &cfg, &I, changed,
                            sizeof changed);
  if (src) return src;
  if (!apb_nccl_built()) return cli_fail(CMD, "this apb was built without NCCL/CUDA: nothing to benchmark here");
  setenv("NCCL_NVLS_ENABLE", "0", 0); /* NVLink multicast stays off on shared machines (docs/nccl.md) */
  apb_error err = {0};
  int ndev = 0;
  if (apb_cuda_device_count(&ndev, &err) != APB_OK) return cli_report(CMD, APB_ENODEVICE, &err);
  FILE *jf = json ? fopen(json, "w") : NULL, *tf = NULL;
  if (json && !jf) return cli_fail(CMD, "cannot write %s: %m", json);
  if (json) {
    char tsv[4096];
    snprintf(tsv, sizeof tsv, "%s.tsv", json);
    if (!(tf = fopen(tsv, "w"))) return fclose(jf), cli_fail(CMD, "cannot write %s: %m", tsv);
    fprintf(tf, "# method\tgpus\ttokens\tprefill_s\tdense_s\n");
  }
  double dense_s = 0;
  char dev0[256] = "";
  if (apb_cuda_device_describe(0, dev0, sizeof dev0, &err) != APB_OK) snprintf(dev0, sizeof dev0, "?");
  for (char *c = dev0; *c; c++)
    if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) *c = ' '; /* for the JSON string */
  const char *dev0_json = strncmp(dev0, "device 0: ", 10) ? dev0 : dev0 + 10; /* the key names the device */
  if (jf)
  {
    fprintf(jf, "{\"preset\": \"%s\", \"layers\": %d, ", apb_preset_name(preset), cfg.n_layers);
    cli_json_model(jf, &cfg, I);
    fprintf(jf, ", \"gpus_visible\": %d, \"device0\": \"%s\", \"runs\": [", ndev, dev0_json);
  }
  printf("apb bench prefill: preset %s%s, %d layers, bf16, %d GPU(s) visible; %s\n", apb_preset_name(preset), changed,
         cfg.n_layers, ndev, dev0);
  printf("%-8s %4s %8s %10s %12s %10s %10s %9s %9s %8s", "method", "gpus", "tokens", "prefill s", "tokens/s",
         "model s", "floor s", "peak GiB", "slow/fast", "comm %");
  for (int s = 0; s < APB_STAGE_COUNT; s++) printf(" %8s", apb_stage_name((apb_stage)s));
  printf("   (per-layer ms, profiled)  l_a/l_p\n");
  int rc = CLI_OK, first = 1, failed = 0;
  for (int ti = 0; ti < nt; ti++, dense_s = 0)
    for (int gi = 0; gi < ng; gi++) {
      double took[APB_METHOD_COUNT] = {0}; /* this length and GPU count: each method's seconds (0: not run) */
      for (int mi = 0; mi < nm; mi++) {
        int g = (int)gpus_l[gi];
        if (ms[mi] == APB_METHOD_DENSE && gi > 0) continue; /* one GPU: once per length */
        if (g > ndev && ms[mi] != APB_METHOD_DENSE) {
          fprintf(stderr, "apb bench prefill: %d GPUs asked, %d visible: skipping %s\n", g, ndev,
                  apb_method_name(ms[mi]));
          continue;
        }
        row rw;
        memset(&rw, 0, sizeof rw);
        int crc = run_case(&cfg, I, ms[mi], g, tokens[ti], q, &base, profile, warmup, reps, &hw, &rw);
        if (crc != CLI_OK) {
          /* one case failing (out of memory at this length, say) does not stop the others */
          failed++;
          printf("%-8s %4d %8lld    failed: %s\n", apb_method_name(ms[mi]), ms[mi] == APB_METHOD_DENSE ? 1 : g,
                 (long long)tokens[ti], rw.error);
          fflush(stdout);
          if (jf) {
            fprintf(jf, "%s{\"method\": \"%s\", \"gpus\": %d, \"tokens\": %lld, \"error\": \"", first ? "" : ", ",
                    apb_method_name(ms[mi]), ms[mi] == APB_METHOD_DENSE ? 1 : g, (long long)tokens[ti]);
            for (const char *c = rw.error; *c; c++)
              if (*c == '"' || *c == '\\') fprintf(jf, "\\%c", *c);
              else if ((unsigned char)*c >= 0x20) fputc(*c, jf);
            fprintf(jf, "\"}");
            first = 0;
          }
          continue;
        }
        printf("%-8s %4d %8lld %10.3f %12.0f %10.3f %10.3f %9.2f %9.3f %8.2f", rw.method, rw.gpus,
               (long long)rw.tokens, rw.prefill_s, rw.tok_s, rw.pred_s, rw.floor_s, rw.peak_gib, rw.imbalance,
               rw.prefill_s > 0 ? 100.0 * rw.vis_s / rw.prefill_s : 0.0);
        for (int s = 0; s < APB_STAGE_COUNT; s++) printf(" %8.2f", rw.stage_s[s] * 1e3);
        if (ms[mi] == APB_METHOD_APB || ms[mi] == APB_METHOD_STAR)
          printf("   %lld/%lld", (long long)rw.la, (long long)rw.lp);
        printf("\n");
        for (int k = 0; profile && rw.gpus > 1 && k < rw.gpus && k < MAXR; k++) {
          printf("%-8s %4s %8s %10s %12s %10s %10s %9s %9s %8s", "", "", "", "", "", "", "", "", "",
                 k ? "" : "rank:");
          for (int s = 0; s < APB_STAGE_COUNT; s++) printf(" %8.2f", rw.rank_stage_s[k][s] * 1e3);
          printf("   rank %d\n", k);
        }
        fflush(stdout);
        if (ms[mi] == APB_METHOD_DENSE) dense_s = rw.prefill_s;
        took[ms[mi]] = rw.prefill_s;
        if (tf)
          fprintf(tf, "%s%s\t%d\t%lld\t%.6f\t%.6f\n", rw.method,
                  base.balance && (ms[mi] == APB_METHOD_APB || ms[mi] == APB_METHOD_STAR) ? "-balanced" : "", rw.gpus,
                  (long long)rw.tokens, rw.prefill_s, ms[0] == APB_METHOD_DENSE ? dense_s : 0.0);
        if (jf) {
          fprintf(jf,
                  "%s{\"method\": \"%s\", \"gpus\": %d, \"tokens\": %lld, \"prefill_s\": %.6f, "
                  "\"tokens_per_s\": %.1f, \"model_s\": %.6f, \"floor_s\": %.6f, \"attn_tflops\": %.1f, "
                  "\"gemm_tflops\": %.1f, \"peak_gib\": %.3f, \"slowest_over_fastest\": %.4f, \"balance\": %d, "
                  "\"overlap\": %d, \"warmup\": %d, \"reps\": %d, \"anchor\": %lld, \"passing\": %lld, "
                  "\"ffn_chunk\": %lld, \"query_len\": %lld, "
                  "\"bytes_sent\": %lld, \"visible_comm_s\": %.6f, \"per_layer_ms\": {",
                  first ? "" : ", ", rw.method, rw.gpus, (long long)rw.tokens, rw.prefill_s, rw.tok_s, rw.pred_s,
                  rw.floor_s, rw.meas_attn / 1e12, rw.meas_gemm / 1e12, rw.peak_gib, rw.imbalance, base.balance,
                  rw.overlap, warmup, reps, (long long)rw.la, (long long)rw.lp, (long long)rw.ffn_chunk,
                  (long long)q, (long long)rw.bytes, rw.vis_s);
          for (int s = 0; s < APB_STAGE_COUNT; s++)
            fprintf(jf, "%s\"%s\": %.4f", s ? ", " : "", apb_stage_name((apb_stage)s), rw.stage_s[s] * 1e3);
          fprintf(jf, "}, \"rank_per_layer_ms\": [");
          for (int k = 0; profile && k < rw.gpus && k < MAXR; k++) {
            fprintf(jf, "%s{", k ? ", " : "");
            for (int s = 0; s < APB_STAGE_COUNT; s++)
              fprintf(jf, "%s\"%s\": %.4f", s ? ", " : "", apb_stage_name((apb_stage)s), rw.rank_stage_s[k][s] * 1e3);
            fprintf(jf, "}");
          }
          fprintf(jf, "]}");
          first = 0;
        }
      }
      /* apb's speedups over the other methods of this length and GPU count (dense: this length's
       * one-GPU run), all measured in this run */
      if (took[APB_METHOD_APB] > 0) {
        int any = 0;
        for (int m = 0; m < APB_METHOD_COUNT; m++) {
          const double t = m == APB_METHOD_DENSE ? dense_s : took[m];
          if (m == APB_METHOD_APB || t <= 0) continue;
          if (!any) printf("apb on %d GPU(s), %lld tokens%s: ", (int)gpus_l[gi], (long long)tokens[ti],
                           base.balance ? " (--balance)" : "");
          printf("%s%.2fx %s%s", any ? ", " : "", t / took[APB_METHOD_APB], apb_method_name((apb_method)m),
                 m == APB_METHOD_DENSE ? " (1 GPU)" : "");
          any = 1;
        }
        if (any) printf(" (speedup, this run)\n");
        fflush(stdout);
      }
    }
  if (jf) {
    fprintf(jf, "]}\n");
    fclose(jf);
  }
  if (tf) fclose(tf);
  if (failed && rc == CLI_OK) rc = cli_fail(CMD, "%d case(s) failed (the lines above say why)", failed);
  return rc;
}
