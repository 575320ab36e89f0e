/* src/cmd_predict.c: `apb predict`, the cost model of apb/cost.h from the command line: for each
 * method, per host, the counted FLOPs and bytes of a prefill and the predicted seconds for given
 * hardware rates (defaults: one H100, shared/GPU.md). Needs no weights: a preset's or a model
 * directory's config is enough. Tested in tests/check_cli.c (output) and, for the counts it relies
 * on, tests/check_sched.c. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apb/cost.h"
#include "cli.h"

#define CMD "predict"

static void help(const apb_hw *hw) {
  printf("Usage: apb predict [--preset NAME [sizes] | --model DIR] [--tokens N] [--query-len Q] [--method LIST]\n"
         "                   [--hosts H] [--anchor A] [--passing P] [--query-offset S] [--embed-query 0|1]\n"
         "                   [--balance] [--overlap 0|1|2] [--act-bytes B]\n"
         "                   [--attn-tflops X] [--gemm-tflops X] [--mem-gbs X] [--link-gbs X] [--latency-us X]\n"
         "                   [--per-host] [--json]\n"
         "       apb predict --fit FILE.json [--fit FILE.json ...] [--mem-gbs X] [--link-gbs X] [--latency-us X]\n"
         "                   [--json]\n\n"
         "Predicted prefill time per method from counted FLOPs and bytes (apb/cost.h):\n"
         "  t = attn FLOPs / attn rate + linear FLOPs / GEMM rate + elementwise bytes / memory bw\n"
         "      + bytes sent / link bw + collectives x latency   (the slowest host is the prefill time)\n\n"
         "  --preset NAME     tiny | small | llama3-8b-shape (default llama3-8b-shape)\n"
         "  --model DIR       read DIR/config.json instead (retaining heads of the published width, 1024)\n"
         CLI_SHAPE_HELP
         "  --tokens N        document tokens (default 131072)\n"
         "  --query-len Q     query tokens (default 64)\n"
         "  --method LIST     default dense,ring,zigzag,ulysses,star,apb\n"
         "  --hosts H         default 4\n"
         "  --balance         apb, star: two virtual hosts per host (h and 2H-1-h), as apb run --balance\n"
         "  --anchor A, --passing P   as in apb run (defaults of shared/APB.md 2)\n"
         "  --query-offset S, --embed-query 0|1   as in apb run (default 0; apb 1, star 0)\n"
         "  --overlap 0|1|2   as in apb run (default 2): apb's [P|A] key copies, ulysses' collectives\n"
         "  --act-bytes B     bytes per activation element, 1-8 (default 2: bf16; 4: fp32)\n"
         "  --attn-tflops X   default %.0f\n  --gemm-tflops X   default %.0f\n  --mem-gbs X       default %.0f\n"
         "  --link-gbs X      default %.0f\n  --latency-us X    default %.0f\n"
         "  --per-host        one row per host instead of the slowest host\n"
         "  --fit FILE        fit the attention and GEMM rates to the runs of `apb bench prefill --json FILE`\n"
         "                    (each with its own preset, method, GPUs, tokens, lengths, --balance and --overlap): the\n"
         "                    two rates with the smallest largest relative error, then each run's measured\n"
         "                    and fitted time. --mem-gbs, --link-gbs and --latency-us are kept (prefill\n"
         "                    times cannot separate the memory rate from the GEMM rate: both scale with a\n"
         "                    host's rows). Repeat for more files\n",
         hw->attn_flops_s / 1e12, hw->gemm_flops_s / 1e12, hw->mem_bytes_s / 1e9, hw->link_bytes_s / 1e9,
         hw->link_latency_s * 1e6);
}

/* ---------------------------------------------------------------- --fit */

typedef struct fit_run {
  char method[16];
  int gpus, balance;
  int64_t tokens, la, lp;
  double seconds;
  apb_cost *c; /* [H] */
  int H;
} fit_run;

/* An integer field of a run object, or def when absent; -1 with a message when it is not an integer. */
static int json_i64(const char *file, int i, json_t *run, const char *key, int64_t def, int64_t *out) {
  json_t *v = json_object_get(run, key);
  if (!v) return *out = def, 0;
  if (!json_is_integer(v)) return cli_fail(CMD, "%s: run %d: \"%s\" is not an integer", file, i, key), -1;
  *out = (int64_t)json_integer_value(v);
  return 0;
}

/* Append the runs of one `bench prefill --json` file to *runs (with their per-host costs). */
static int fit_load(const char *file, int act, const apb_hw *hw, fit_run **runs, int *n, int *cap) {
  json_error_t je;
  json_t *root = json_load_file(file, 0, &je);
  if (!root) return cli_fail(CMD, "%s: %s (line %d); expected the JSON of apb bench prefill --json", file, je.text,
                             je.line);
  int rc = CLI_OK;
  json_t *runs_j = json_object_get(root, "runs");
  const char *pname = json_string_value(json_object_get(root, "preset"));
  apb_preset preset;
  if (!json_is_array(runs_j) || !pname) {
    rc = cli_fail(CMD, "%s: no \"preset\" string or \"runs\" array; expected the JSON of apb bench prefill --json",
                  file);
    goto done;
  }
  if (apb_preset_parse(pname, &preset)) {
    rc = cli_fail(CMD, "%s: unknown preset '%s'", file, pname);
    goto done;
  }
  apb_model_config cfg;
  int I = 0;
  apb_preset_config(preset, &cfg, &I);
  /* the sizes the runs used (bench prefill writes them; older files: the preset's) */
  json_t *mj = json_object_get(root, "model");
  if (mj) {
    const char *keys[] = {"layers", "hidden", "ffn", "q_heads", "kv_heads", "head_dim", "vocab", "scorer_width"};
    int *fields[] = {&cfg.n_layers, &cfg.hidden, &cfg.ffn, &cfg.n_heads, &cfg.n_kv_heads, &cfg.head_dim, &cfg.vocab, &I};
    for (int k = 0; k < 8 && !rc; k++) {
      json_t *v = json_object_get(mj, keys[k]);
      const int64_t lo = k == 7 ? 0 : 1, hi = k == 7 ? 1 << 20 : INT32_MAX;
      if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        rc = cli_fail(CMD, "%s: \"model\".\"%s\" is missing or not an integer in [%lld, %lld]", file, keys[k],
                      (long long)lo, (long long)hi);
      else
        *fields[k] = (int)json_integer_value(v);
    }
    apb_error cerr = {0};
    if (!rc && apb_config_check(&cfg, &cerr) != APB_OK) rc = cli_fail(CMD, "%s: \"model\": %s", file, cerr.msg);
    if (rc) goto done;
  }
  for (size_t i = 0; i < json_array_size(runs_j) && !rc; i++) {
    json_t *r = json_array_get(runs_j, i);
    const char *mname = json_string_value(json_object_get(r, "method"));
    json_t *sec = json_object_get(r, "prefill_s");
    apb_method m;
    if (!json_is_object(r) || !mname || apb_method_parse(mname, &m)) {
      rc = cli_fail(CMD, "%s: run %zu: no known \"method\"", file, i);
      break;
    }
    if (json_object_get(r, "error")) continue; /* a run that failed: nothing measured */
    if (!json_is_number(sec) || !(json_number_value(sec) > 0) || !isfinite(json_number_value(sec))) {
      rc = cli_fail(CMD, "%s: run %zu: \"prefill_s\" is not a positive number", file, i);
      break;
    }
    int64_t gpus, tokens, la, lp, bal, q, ovl;
    if (json_i64(file, (int)i, r, "gpus", -1, &gpus) || json_i64(file, (int)i, r, "tokens", -1, &tokens) ||
        json_i64(file, (int)i, r, "anchor", -1, &la) || json_i64(file, (int)i, r, "passing", -1, &lp) ||
        json_i64(file, (int)i, r, "balance", 0, &bal) || json_i64(file, (int)i, r, "query_len", 64, &q) ||
        json_i64(file, (int)i, r, "overlap", -1, &ovl)) {
      rc = CLI_FAIL;
      break;
    }
    if (gpus < 1 || gpus > APB_MAX_HOSTS || tokens < 1) {
      rc = cli_fail(CMD, "%s: run %zu: \"gpus\" (1..%d) and \"tokens\" (>= 1) are required", file, i,
                    APB_MAX_HOSTS);
      break;
    }
    apb_run_opts o;
    apb_run_opts_default(&o);
    o.method = m, o.hosts = (int)gpus, o.balance = bal != 0 && (m == APB_METHOD_APB || m == APB_METHOD_STAR);
    if (ovl < -1 || ovl > APB_OVERLAP_ANCHOR) {
      rc = cli_fail(CMD, "%s: run %zu: \"overlap\" is %lld; bench prefill writes 0, 1 or 2", file, i, (long long)ovl);
      break;
    }
    o.overlap = (int)ovl; /* the run's own (apb's [P | A] copies count as memory traffic in --overlap 2) */
    if (m == APB_METHOD_APB) o.anchor = la, o.passing = lp; /* the others: APB.md 2's (star: l_a = l_b) */
    apb_plan *plan = malloc(sizeof *plan);
    if (*n == *cap) {
      fit_run *g = realloc(*runs, sizeof **runs * (size_t)(*cap ? 2 * *cap : 16));
      if (g) *runs = g, *cap = *cap ? 2 * *cap : 16;
    }
    apb_cost *c = malloc(sizeof *c * (size_t)gpus);
    if (!plan || !c || *n == *cap) {
      free(plan), free(c);
      rc = cli_fail(CMD, "out of memory");
      break;
    }
    apb_error err = {0};
    apb_status st = apb_plan_make(&o, tokens, q, &cfg, I, plan, &err);
    if (!st) st = apb_cost_plan(plan, &cfg, I, act, hw, c, &err);
    if (st) {
      free(plan), free(c);
      rc = cli_fail(CMD, "%s: run %zu (%s on %lld GPUs, %lld tokens): %s", file, i, mname, (long long)gpus,
                    (long long)tokens, err.msg);
      break;
    }
    fit_run *x = &(*runs)[(*n)++];
    snprintf(x->method, sizeof x->method, "%s", mname);
    x->gpus = plan->H, x->balance = plan->balance, x->tokens = tokens, x->la = plan->la, x->lp = plan->lp;
    x->seconds = json_number_value(sec), x->c = c, x->H = plan->H;
    free(plan);
  }
done:
  json_decref(root);
  return rc;
}

static int fit(const char **files, int nfiles, int act, apb_hw *hw, int json) {
  fit_run *runs = NULL;
  int n = 0, cap = 0, rc = CLI_OK;
  for (int f = 0; f < nfiles && !rc; f++) rc = fit_load(files[f], act, hw, &runs, &n, &cap);
  if (!rc && n == 0) rc = cli_fail(CMD, "--fit: the file%s hold no successful run", nfiles > 1 ? "s" : "");
  apb_cost_obs *obs = rc ? NULL : malloc(sizeof *obs * (size_t)n);
  if (!rc && !obs) rc = cli_fail(CMD, "out of memory");
  double worst = 0;
  int edge = 0;
  if (!rc) {
    for (int i = 0; i < n; i++) obs[i] = (apb_cost_obs){runs[i].c, runs[i].H, runs[i].seconds};
    apb_error err = {0};
    apb_status st = apb_cost_fit(obs, n, hw, &worst, &edge, &err);
    if (st) rc = cli_report(CMD, st, &err);
  }
  if (!rc) {
    if (json)
      printf("{\"attn_tflops\": %.1f, \"gemm_tflops\": %.1f, \"mem_gbs\": %.0f, \"link_gbs\": %.0f, "
             "\"latency_us\": %.1f, \"max_rel_err\": %.6f, \"at_edge\": %d, \"runs\": [",
             hw->attn_flops_s / 1e12, hw->gemm_flops_s / 1e12, hw->mem_bytes_s / 1e9, hw->link_bytes_s / 1e9,
             hw->link_latency_s * 1e6, worst, edge);
    else
      printf("fitted to %d run%s: --attn-tflops %.1f --gemm-tflops %.1f (--mem-gbs %.0f, --link-gbs %.0f and "
             "--latency-us %.1f kept); largest error %.2f%%%s\n"
             "%-8s %4s %9s %13s %7s %11s %11s %8s\n",
             n, n == 1 ? "" : "s", hw->attn_flops_s / 1e12, hw->gemm_flops_s / 1e12, hw->mem_bytes_s / 1e9,
             hw->link_bytes_s / 1e9, hw->link_latency_s * 1e6, 100 * worst,
             edge ? "\n(a rate ended on a bound of the search: these runs do not pin it down)" : "", "method", "gpus",
             "tokens", "l_a/l_p", "balance", "measured s", "fitted s", "error");
    for (int i = 0; i < n; i++) {
      const fit_run *x = &runs[i];
      const double t = apb_cost_obs_time(&obs[i], hw);
      if (json)
        printf("%s{\"method\": \"%s\", \"gpus\": %d, \"tokens\": %lld, \"anchor\": %lld, \"passing\": %lld, "
               "\"balance\": %d, \"measured_s\": %.6f, \"fitted_s\": %.6f, \"rel_err\": %.6f}",
               i ? ", " : "", x->method, x->gpus, (long long)x->tokens, (long long)x->la, (long long)x->lp, x->balance,
               x->seconds, t, t / x->seconds - 1);
      else {
        char l[32];
        snprintf(l, sizeof l, "%lld/%lld", (long long)x->la, (long long)x->lp);
        printf("%-8s %4d %9lld %13s %7d %11.3f %11.3f %+7.1f%%\n", x->method, x->gpus, (long long)x->tokens, l,
               x->balance, x->seconds, t, 100 * (t / x->seconds - 1));
      }
    }
    if (json) printf("]}\n");
  }
  for (int i = 0; i < n; i++) free(runs[i].c);
  free(runs), free(obs);
  return rc;
}

int cmd_predict(int argc, char **argv) {
  apb_hw hw;
  apb_hw_default(&hw);
  apb_preset preset = APB_PRESET_LLAMA3_8B;
  const char *model_dir = NULL;
  int preset_given = 0;
  int64_t n = 131072, q = 64;
  apb_run_opts o;
  apb_run_opts_default(&o);
  o.hosts = 4;
  apb_method ms[APB_METHOD_COUNT];
  int nm = 0, act = 2, per_host = 0, json = 0, methods_given = 0;
  for (int i = 0; i < APB_METHOD_COUNT; i++) ms[nm++] = (apb_method)i;
  enum { O_PRESET = 256, O_MODEL, O_TOKENS, O_Q, O_METHOD, O_HOSTS, O_ANCHOR, O_PASSING, O_ACT, O_AT, O_GT, O_MEM,
         O_LINK, O_LAT, O_PER, O_JSON, O_BAL, O_FIT, O_OVL, O_QOFF, O_EMBED, O_SHAPE };
  static const struct option opts[] = {
      {"preset", required_argument, 0, O_PRESET}, {"model", required_argument, 0, O_MODEL},
      {"tokens", required_argument, 0, O_TOKENS}, {"query-len", required_argument, 0, O_Q},
      {"method", required_argument, 0, O_METHOD}, {"hosts", required_argument, 0, O_HOSTS},
      {"anchor", required_argument, 0, O_ANCHOR}, {"passing", required_argument, 0, O_PASSING},
      {"act-bytes", required_argument, 0, O_ACT}, {"attn-tflops", required_argument, 0, O_AT},
      {"gemm-tflops", required_argument, 0, O_GT}, {"mem-gbs", required_argument, 0, O_MEM},
      {"link-gbs", required_argument, 0, O_LINK}, {"latency-us", required_argument, 0, O_LAT},
      {"per-host", no_argument, 0, O_PER}, {"json", no_argument, 0, O_JSON}, {"balance", no_argument, 0, O_BAL},
      {"fit", required_argument, 0, O_FIT}, {"overlap", required_argument, 0, O_OVL}, {"help", no_argument, 0, 'h'},
      {"query-offset", required_argument, 0, O_QOFF}, {"embed-query", required_argument, 0, O_EMBED},
      CLI_SHAPE_OPTIONS(O_SHAPE), {0, 0, 0, 0}};
  cli_shape shape = {0};
  const char **fits = calloc((size_t)argc + 1, sizeof *fits);
  const char *plan_opt = NULL; /* an option that --fit does not take (the runs carry their own) */
  int nfit = 0;
  if (!fits) return cli_fail(CMD, "out of memory");
  int ch;
  while ((ch = cli_getopt(CMD, argc, argv, opts)) != -1) {
    int rc = 0;
    if (ch != O_FIT && ch != O_MEM && ch != O_LINK && ch != O_LAT && ch != O_JSON && ch != O_ACT)
      for (const struct option *op = opts; op->name; op++)
        if (op->val == ch) plan_opt = op->name;
    switch (ch) {
    case O_PRESET:
      if (apb_preset_parse(optarg, &preset)) return cli_usage(CMD, "--preset: unknown preset '%s'", optarg);
      preset_given = 1;
      break;
    case O_MODEL: model_dir = optarg; break;
    case O_TOKENS: rc = cli_parse_i64(CMD, "--tokens", optarg, 1, (int64_t)1 << 40, &n); break;
    case O_Q: rc = cli_parse_i64(CMD, "--query-len", optarg, 1, 1 << 20, &q); break;
    case O_METHOD: rc = cli_parse_methods(CMD, "--method", optarg, ms, &nm), methods_given = 1; break;
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
    case O_OVL: rc = cli_parse_int(CMD, "--overlap", optarg, 0, 2, &o.overlap); break;
    case O_QOFF: rc = cli_parse_i64(CMD, "--query-offset", optarg, 0, (int64_t)1 << 40, &o.query_offset); break;
    case O_EMBED: rc = cli_parse_int(CMD, "--embed-query", optarg, 0, 1, &o.embed_query); break;
    case O_JSON: json = 1; break;
    case O_FIT: fits[nfit++] = optarg; break;
    case 'h': help(&hw); free(fits); return CLI_OK;
    default:
      if (ch >= O_SHAPE && ch < O_SHAPE + CLI_SHAPE_COUNT) {
        rc = cli_parse_shape(CMD, ch - O_SHAPE, optarg, &shape);
        break;
      }
      free(fits);
      return CLI_USAGE;
    }
    if (rc) return free(fits), rc;
  }
  if (optind < argc) return free(fits), cli_usage(CMD, "unexpected argument '%s'", argv[optind]);
  if (model_dir && !*model_dir) return free(fits), cli_usage(CMD, "--model wants a directory, got ''");
  if (model_dir && preset_given) return free(fits), cli_usage(CMD, "--model and --preset are exclusive; give one");
  if (model_dir && shape.any)
    return free(fits), cli_usage(CMD, "the size options (--layers ... --scorer-width) change a preset; a --model "
                                      "directory has its own config.json");
  if (nfit) {
    int rc = plan_opt ? cli_usage(CMD, "--fit takes each run's own model, method and lengths from its file; "
                                  "drop --%s", plan_opt)
                      : fit(fits, nfit, act, &hw, json);
    free(fits);
    return rc;
  }
  free(fits);
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
    char changed[256];
    apb_preset_config(preset, &cfg, &I);
    int apb_in = 0;
    for (int i = 0; i < nm; i++) apb_in |= ms[i] == APB_METHOD_APB;
    int src = cli_apply_shape(CMD, &shape, apb_in ? CLI_SHAPE_NEED_HEADS : 0, &cfg, &I, changed, sizeof changed);
    if (src) return src;
  }
  apb_plan *plan = malloc(sizeof *plan);
  apb_cost *c = malloc(sizeof *c * APB_MAX_HOSTS);
  if (!plan || !c) return free(plan), free(c), cli_fail(CMD, "out of memory");
  int rc = CLI_OK;
  /* every method's plan and cost first: a refused one ends the command before any output (no partial
   * JSON or table) */
  for (int i = 0; i < nm; i++) {
    apb_run_opts oi = cli_method_opts(&o, ms[i], nm);
    apb_status st = apb_plan_make(&oi, n, q, &cfg, I, plan, &err);
    int planned = !st;
    if (planned) st = apb_cost_plan(plan, &cfg, I, act, &hw, c, &err);
    if (st) {
      free(plan), free(c);
      if (methods_given || planned) return cli_report(CMD, st, &err);
      return cli_fail(CMD, "%s (%s); the default --method is every method: give --method without %s",
                      err.msg, apb_status_str(st), apb_method_name(ms[i]));
    }
  }
  if (json) {
    printf("{\"tokens\": %lld, \"hosts\": %d, ", (long long)n, o.hosts);
    cli_json_model(stdout, &cfg, I);
    printf(", \"methods\": [");
  }
  else
    printf("%-8s %4s %10s %10s %10s %10s %10s %10s %12s\n", "method", "host", "total s", "attn s", "linear s",
           "elem s", "comm s", "comm MiB", "attn TFLOP");
  for (int i = 0; i < nm && !rc; i++) {
    apb_run_opts oi = cli_method_opts(&o, ms[i], nm);
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
