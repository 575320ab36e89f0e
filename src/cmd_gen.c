/* src/cmd_gen.c: `apb gen-model`, a preset model with seeded random weights written as a Hugging Face
 * directory (config.json, model.safetensors, retaining_heads.safetensors) that apb and transformers
 * both load.
 *
 * It parses the options, calls apb_model_generate_config and apb_model_save, and prints one line saying what
 * was written. Not here: the presets and how weights are drawn (lib/gen.c), the file formats
 * (lib/model.c). Tested through the program in tests/check_cli.c and, for what it writes, by the
 * round trips of tests/check_model.c.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "apb/model.h"

int cmd_gen_model(int argc, char **argv);

static const char *const cmd = "gen-model";

static const char help_text[] =
    "Usage: apb gen-model --preset tiny|small|llama3-8b-shape [--seed S] [--dtype f32|bf16] [sizes] --out DIR\n"
    "\n"
    "Write a model with seeded random weights as a Hugging Face directory: DIR/config.json\n"
    "(LlamaForCausalLM, old transformers form), DIR/model.safetensors (HF tensor names) and\n"
    "DIR/" APB_HEADS_FILE " (Locret retaining heads, one fc1/fc2 pair per layer).\n"
    "`apb run --model DIR` (heads included) and transformers' AutoModelForCausalLM.from_pretrained(DIR)\n"
    "both load it.\n"
    "\n"
    "Presets (L layers, E hidden, F intermediate, Hq/Hkv heads, D head dim, V vocab, I scorer width):\n"
    "  tiny             L 2   E 256   F 1024   Hq 4  Hkv 2  D 64   V 4096    I 128   (17 MB in f32)\n"
    "  small            L 4   E 512   F 2048   Hq 8  Hkv 2  D 64   V 8192    I 256   (98 MB)\n"
    "  llama3-8b-shape  L 32  E 4096  F 14336  Hq 32 Hkv 8  D 128  V 128256  I 1024  (33 GB; 16 GB bf16)\n"
    "  llama3-8b-shape needs its fp32 weights in memory (33 GB) even for a bf16 file: it is meant\n"
    "  for the GPU machines, and the command says how much it needs and found when memory is short.\n"
    "\n"
    "Options:\n"
    "  --preset P    tiny, small or llama3-8b-shape (required)\n"
    "  --seed S      random seed, 0 .. 2^63-1 (default 1); the same seed gives the same files on every\n"
    "                machine and for any thread count\n"
    "  --dtype T     f32 (default: the files hold exactly the weights apb generates in memory) or bf16\n"
    "                (half the size, rounded to nearest even)\n"
    "  --out DIR     output directory, created if missing; files in it are replaced (required); when\n"
    "                writing fails after config.json, the three files are removed from DIR\n"
    CLI_SHAPE_HELP
    "  -h, --help    this text\n"
    "\n"
    "docs/model.md describes how the weights are drawn.\n"
    "\n"
    "Exit status: 0 written, 1 generation or writing failed, 2 usage error.\n";

int cmd_gen_model(int argc, char **argv) {
  enum { O_PRESET = 256, O_SEED, O_DTYPE, O_OUT, O_SHAPE };
  static const struct option opts[] = {{"preset", required_argument, NULL, O_PRESET},
                                       {"seed", required_argument, NULL, O_SEED},
                                       {"dtype", required_argument, NULL, O_DTYPE},
                                       {"out", required_argument, NULL, O_OUT},
                                       CLI_SHAPE_OPTIONS(O_SHAPE),
                                       {"help", no_argument, NULL, 'h'},
                                       {NULL, 0, NULL, 0}};
  static const char *const preset_names[] = {"tiny", "small", "llama3-8b-shape"};
  static const char *const dtype_names[] = {"f32", "bf16"};
  int preset = -1, dtype = 0, c, rc = 0;
  int64_t seed = 1;
  const char *out = NULL;
  cli_shape shape = {0};
  while (rc == 0 && (c = cli_getopt(cmd, argc, argv, opts)) != -1) {
    switch (c) {
    case 'h': fputs(help_text, stdout); return CLI_OK;
    case O_PRESET: rc = cli_parse_choice(cmd, "--preset", optarg, preset_names, APB_PRESET_COUNT, &preset); break;
    case O_SEED: rc = cli_parse_i64(cmd, "--seed", optarg, 0, INT64_MAX, &seed); break;
    case O_DTYPE: rc = cli_parse_choice(cmd, "--dtype", optarg, dtype_names, 2, &dtype); break;
    case O_OUT: out = optarg; break;
    default:
      if (c >= O_SHAPE && c < O_SHAPE + CLI_SHAPE_COUNT) {
        rc = cli_parse_shape(cmd, c - O_SHAPE, optarg, &shape);
        break;
      }
      return CLI_USAGE; /* cli_getopt reported it */
    }
  }
  if (rc) return rc;
  if (optind < argc) return cli_usage(cmd, "unexpected argument '%s' (the directory goes after --out)", argv[optind]);
  if (preset < 0) return cli_usage(cmd, "--preset is required: tiny, small or llama3-8b-shape");
  if (!out || !*out) return cli_usage(cmd, "--out is required: the directory to write the model to");

  apb_model_config cfg;
  int I = 0;
  char changed[256] = "";
  apb_preset_config((apb_preset)preset, &cfg, &I);
  if ((rc = cli_apply_shape(cmd, &shape, 0, &cfg, &I, changed, sizeof changed))) return rc;
  apb_error err = {0};
  apb_model *m = NULL;
  apb_status st = apb_model_generate_config(&cfg, I, (uint64_t)seed, &m, &err);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  st = apb_model_save(m, out, dtype == 1, &err);
  int64_t params = apb_model_param_count(&m->cfg, m->scorer_width);
  apb_model_free(m);
  if (st != APB_OK) return cli_report(cmd, st, &err);
  if (I == 0) { /* a retaining-heads file left by an earlier model in DIR would be loaded with this one */
    char hp[4096];
    snprintf(hp, sizeof hp, "%s/%s", out, APB_HEADS_FILE);
    if (remove(hp) != 0 && errno != ENOENT) return cli_fail(cmd, "%s: cannot remove the earlier model's file: %s", hp, strerror(errno));
  }
  printf("apb gen-model: wrote %s%s, seed %lld, %s, %.1f M parameters, to %s: config.json, model.safetensors%s%s\n",
         preset_names[preset], changed, (long long)seed, dtype == 1 ? "BF16" : "F32", (double)params / 1e6, out,
         I > 0 ? ", " : " (no retaining heads: --scorer-width 0)", I > 0 ? APB_HEADS_FILE : "");
  return CLI_OK;
}
