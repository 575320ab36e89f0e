/* src/apb.c: the apb program's entry point: a table of subcommands and the dispatch to them.
 *
 *   apb                     the default job (DEFAULT_JOB below)
 *   apb CMD [ARGS...]       run a subcommand; `apb CMD --help` documents it
 *   apb help [CMD]          the command list, or `apb CMD --help`
 *   apb --help | --version
 *
 * Adding a command: one row in `commands` plus its src/cmd_*.c file (with its prototype in cli.h and
 * the file in apb_SOURCES). Deliberately nothing else here: parsing, reporting and work belong to the
 * commands. Exit codes: 0 success, 1 failure, 2 usage error (cli.h). Tested in tests/check_cli.c.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const cli_command commands[] = {
    {"run", "prefill + query + decode with every method on H hosts, compared with dense (the default job)",
     cmd_run},
    {"predict", "the cost model: predicted prefill time per method and host from counted FLOPs and bytes",
     cmd_predict},
    {"gen-model", "write a preset model (config.json, model.safetensors, retaining heads) with random weights",
     cmd_gen_model},
    {"attn", "one host's segmented attention (dense, star, apb) on q/k/v from a safetensors file",
     cmd_attn},
    {"cmp", "compare every tensor of two safetensors files within a tolerance", cmd_cmp},
    {"bench", "benchmarks against a baseline of the same run: attn, forward, sim (CPU); gpu-attn, gpu-ops, prefill (GPUs)", cmd_bench},
    {"demo", "APB attention for the last host on random data: fast path against the oracle", cmd_demo},
};
static const int n_commands = (int)(sizeof commands / sizeof commands[0]);

/* What `apb` alone runs: argv for the command table. The one place that says what the default job is. */
static char *default_job[] = {"run", NULL};

static void usage(void) {
  printf("apb %s: APB distributed long-context prefill (arXiv 2502.12085)\n\n"
         "Usage: apb [COMMAND [ARGS...]]\n"
         "       apb help [COMMAND]      the same as apb COMMAND --help\n"
         "       apb --help | --version\n\n"
         "With no command, apb runs `apb %s` with its defaults; options without a command are its\n"
         "options (apb --synthetic 4096 --json is apb %s --synthetic 4096 --json).\n\n"
         "Commands:\n",
         APB_VERSION_STRING, default_job[0], default_job[0]);
  cli_list(commands, n_commands);
  printf("\nWhole-number options take a K, M or G suffix (x 2^10, 2^20, 2^30): --synthetic 128K is 131072 tokens.\n"
         "Exit status: 0 success, 1 failure (bad data, a failed check), 2 usage error.\n");
}

static int run(int argc, char **argv) {
  const cli_command *c = cli_find(commands, n_commands, argv[0]);
  if (!c) {
    fprintf(stderr, "apb: unknown command '%s'\nTry 'apb --help' for the list of commands.\n", argv[0]);
    return CLI_USAGE;
  }
  return cli_call(c->fn, argc, argv);
}

int main(int argc, char **argv) {
  if (argc < 2) return run(1, default_job);
  const char *a = argv[1];
  if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || (strcmp(a, "help") == 0 && argc == 2)) {
    usage();
    return CLI_OK;
  }
  if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0) {
    printf("apb %s (CUDA backend %s)\n", APB_VERSION_STRING, apb_cuda_built() ? "built" : "not built");
    return CLI_OK;
  }
  if (strcmp(a, "help") == 0) {
    if (argc > 3) {
      fprintf(stderr, "apb help: takes one command name, got %d words\n"
              "Try 'apb --help' for the list of commands.\n", argc - 2);
      return CLI_USAGE;
    }
    char help[] = "--help";
    char *sub[] = {argv[2], help, NULL};
    return run(2, sub);
  }
  if (a[0] == '-') { /* options without a command are the default job's: apb --json is apb run --json */
    argv[0] = default_job[0];
    return run(argc, argv);
  }
  return run(argc - 1, argv + 1);
}
