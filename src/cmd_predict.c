/* src/cmd_predict.c: `apb predict`, the cost model of apb/cost.h from the command line: for each
 * method, per host, the counted FLOPs and bytes of a prefill and the predicted seconds for given
 * hardware rates (defaults: one H100, shared/GPU.md). Needs no weights: a preset's or a model
 * directory's config is enough. Tested in tests/check_cli.c (output) and, for the counts it relies
 * on, tests/check_sched.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apb/cost.h"
#include "cli.h"

#define CMD "predict"

static void help(const apb_hw *hw) {
  printf("Usage: apb predict [--preset NAME | --model DIR] [--tokens N] [--query-len Q] [--method LIST]\n"
         "                   [--hosts H] [--anchor A] [--passing P] [--balance] [--act-bytes 2|4]\n"
         "                   [--attn-tflops X] [--gemm-tflops X] [--mem-gbs X] [--link-gbs X] [--latency-us X]\n"
         "                   [--per-host] [--json]\n\n"
         "Predicted prefill time per method from counted FLOPs and bytes (apb/cost.h):\n"
         "  t = attn FLOPs / attn rate + linear FLOPs / GEMM rate + elementwise bytes / memory bw\n"
         "      + bytes sent / link bw + collectives x latency   (the slowest host is the prefill time)\n\n"
         "  --preset NAME     tiny | small | llama3-8b-shape (default llama3-8b-shape)\n"
         "  --model DIR       read DIR/config.json instead\n"
         "  --tokens N        document tokens (default 131072)\n"
         "  --query-len Q     query tokens (default 64)\n"
         "  --method LIST     default dense,ring,zigzag,ulysses,star,apb\n"
         "  --hosts H         default 4\n"
         "  --balance         apb, star: two virtual hosts per host (h and 2H-1-h), as apb run --balance\n"
         "  --anchor A, --passing P   as in apb run (defaults of shared/APB.md 2)\n"
         "  --act-bytes B     bytes per activation element (default 2: bf16)\n"
         "  --attn-tflops X   default %.0f\n  --gemm-tflops X   default %.0f\n  --mem-gbs X       default %.0f\n"
         "  --link-gbs X      default %.0f\n  --latency-us X    default %.0f\n"
         "  --per-host        one row per host instead of the slowest host\n",
         hw->attn_flops_s / 1e12, hw->gemm_flops_s / 1e12, hw->mem_bytes_s / 1e9, hw->link_bytes_s / 1e9,
         hw->link_latency_s * 1e6);
}

int cmd_predict(int argc, char **argv) {
  apb_hw hw;
  apb_hw_default(&hw);
  apb_preset preset = APB_PRESET_LLAMA3_8B;
  const char *model_dir = NULL;
  int64_t n = 131072, q = 64;
  apb_run_opts o;
  apb_run_opts_default(&o);
  o.hosts = 4;
  apb_method ms[APB_METHOD_COUNT];
  int nm = 0, act = 2, per_host = 0, json = 0;
  for (int i = 0; i < APB_METHOD_COUNT; i++) ms[nm++] = (apb_method)i;
  enum { O_PRESET = 256, O_MODEL, O_TOKENS, O_Q, O_METHOD, O_HOSTS, O_ANCHOR, O_PASSING, O_ACT, O_AT, O_GT, O_MEM,
         O_LINK, O_LAT, O_PER, O_JSON, O_BAL };
  static const struct option opts[] = {
      {"preset", required_argument, 0, O_PRESET}, {"model", required_argument, 0, O_MODEL},
      {"tokens", required_argument, 0, O_TOKENS}, {"query-len", required_argument, 0, O_Q},
      {"method", required_argument, 0, O_METHOD}, {"hosts", required_argument, 0, O_HOSTS},
      {"anchor", required_argument, 0, O_ANCHOR}, {"passing", required_argument, 0, O_PASSING},
      {"act-bytes", required_argument, 0, O_ACT}, {"attn-tflops", required_argument, 0, O_AT},
      {"gemm-tflops", required_argument, 0, O_GT}, {"mem-gbs", required_argument, 0, O_MEM},
      {"link-gbs", required_argument, 0, O_LINK}, {"latency-us", required_argument, 0, O_LAT},
      {"per-host", no_argument, 0, O_PER}, {"json", no_argument, 0, O_JSON}, {"balance", no_argument, 0, O_BAL},
      {"help", no_argument, 0, 'h'},
      {0, 0, 0, 0}};
  int ch;
  while ((ch = cli_getopt(CMD, argc, argv, opts)) != -1) {
    int rc = 0;
    switch (ch) {
    case O_PRESET:
      if (apb_preset_parse(optarg, &preset)) return cli_usage(CMD, "--preset: unknown preset '%s'", optarg);
      break;
    case O_MODEL: model_dir = optarg; break;
    case O_TOKENS: rc = cli_parse_i64(CMD, "--tokens", optarg, 1, (int64_t)1 << 40, &n); break;
    case O_Q: rc = cli_parse_i64(CMD, "--query-len", optarg, 1, 1 << 20, &q); break;
    case O_METHOD: rc = cli_parse_methods(CMD, "--method", optarg, ms, &nm); break;
    case O_HOSTS: rc = cli_parse_int(CMD, "--hosts", optarg, 1, APB_MAX_HOSTS, &o.hosts); break;
    case O_ANCHOR: rc = cli_parse_i64(CMD, "--anchor", optarg, 0, (int64_t)1 << 40, &o.anchor); break;
    case O_PASSING: rc = cli_parse_i64(CMD, "--passing", optarg, 0, (int64_t)1 << 40, &o.passing); break;
    case O_ACT: rc = cli_parse_int(CMD, "--act-bytes", optarg, 1, 8, &act); break;
    case O_AT: rc = cli_parse_rate(CMD, CLI_RATE_ATTN, optarg, &hw); break;
    case O_GT: rc = cli_parse_rate(CMD, CLI_RATE_GEMM, optarg, &hw); break;
    case O_MEM: rc = cli_parse_rate(CMD, CLI_RATE_MEM, optarg, &hw); break;
    case O_LINK: rc = cli_parse_rate(CMD, CLI_RATE_LINK, optarg, &hw); break;
    case O_LAT: rc = cli_parse_rate(CMD, CLI_RATE_LAT, optarg, &hw); break;
    case O_PER: per_host = 1; break;
    case O_BAL: o.balance = 1; break;
    case O_JSON: json = 1; break;
    case 'h': help(&hw); return CLI_OK;
    default: return CLI_USAGE;
    }
    if (rc) return rc;
  }
  if (optind < argc) return cli_usage(CMD, "unexpected argument '%s'", argv[optind]);
  apb_model_config cfg;
  int I = 0;
  apb_error err = {0};
  if (model_dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    apb_status st = apb_config_load(path, &cfg, &err);
    if (st) return cli_report(CMD, st, &err);
    I = 1024; /* the published retaining heads' width */
  } else {
    apb_preset_config(preset, &cfg, &I);
  }
  apb_plan *plan = malloc(sizeof *plan);
  apb_cost *c = malloc(sizeof *c * APB_MAX_HOSTS);
  if (!plan || !c) return free(plan), free(c), cli_fail(CMD, "out of memory");
  int rc = CLI_OK;
  if (json) printf("{\"tokens\": %lld, \"hosts\": %d, \"methods\": [", (long long)n, o.hosts);
  else
    printf("%-8s %4s %10s %10s %10s %10s %10s %10s %12s\n", "method", "host", "total s", "attn s", "linear s",
           "elem s", "comm s", "comm MiB", "attn TFLOP");
  for (int i = 0; i < nm && !rc; i++) {
    apb_run_opts oi = o;
    oi.method = ms[i];
    if (ms[i] == APB_METHOD_STAR && o.passing > 0) oi.passing = -1;
    oi.balance = o.balance > 0 && (ms[i] == APB_METHOD_APB || ms[i] == APB_METHOD_STAR); /* others: no pairs */
    apb_status st = apb_plan_make(&oi, n, q, &cfg, I, plan, &err);
    if (!st) st = apb_cost_plan(plan, &cfg, I, act, &hw, c, &err);
    if (st) {
      rc = cli_report(CMD, st, &err);
      break;
    }
    int worst = 0;
    for (int r = 0; r < plan->H; r++)
      if (c[r].t_total > c[worst].t_total) worst = r;
    for (int r = 0; r < plan->H; r++) {
      if (!per_host && r != worst) continue;
      const apb_cost *x = &c[r];
      if (json)
        printf("%s{\"method\": \"%s\", \"host\": %d, \"t_total\": %.6g, \"t_attn\": %.6g, \"t_linear\": %.6g, "
               "\"t_elem\": %.6g, \"t_comm\": %.6g, \"bytes_sent\": %lld, \"attn_flops\": %.6g, \"linear_flops\": %.6g}",
               (i || r) && (per_host || i) ? ", " : "", apb_method_name(ms[i]), r, x->t_total, x->t_attn, x->t_linear,
               x->t_elem, x->t_comm, (long long)x->bytes_sent, x->attn_flops, x->linear_flops);
      else
        printf("%-8s %4d %10.4f %10.4f %10.4f %10.4f %10.4f %10.1f %12.2f\n", apb_method_name(ms[i]), r, x->t_total,
               x->t_attn, x->t_linear, x->t_elem, x->t_comm, (double)x->bytes_sent / 1048576.0, x->attn_flops / 1e12);
    }
  }
  if (json && !rc) printf("]}\n");
  free(plan);
  free(c);
  return rc;
}
