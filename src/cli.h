/* src/cli.h: what every subcommand of the apb program shares.
 *
 * - The command table type and the prototypes of the command entry points (each lives in its own
 *   src/cmd_*.c). A command is `int fn(int argc, char **argv)` with argv[0] its own name; it returns the
 *   process exit code and never calls exit().
 * - Exit codes: CLI_OK (0), CLI_FAIL (1: a runtime error, bad data in a file, or a failed comparison),
 *   CLI_USAGE (2: the command line itself is wrong).
 * - Reporting: every message goes to stderr as "apb CMD: what was wrong" followed by what to do.
 *   cli_usage() adds "Try 'apb CMD --help' ..." and returns CLI_USAGE; cli_fail() returns CLI_FAIL;
 *   cli_report() prints a library error as "apb CMD: <msg> (<status string>)" and returns CLI_FAIL.
 * - Option parsing: cli_getopt() is getopt_long with its own messages (unknown option, missing value);
 *   cli_parse_*() turn option values into checked numbers, lists and choices, naming the option and
 *   the accepted range in the error.
 * Not here: anything a command alone needs. The library (include/apb) never prints; this file is where
 * printing starts. Tested through the program in tests/check_cli.c.
 */
#ifndef APB_CLI_H
#define APB_CLI_H

#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "apb/apb.h"

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

typedef int (*cli_fn)(int argc, char **argv);

/* One row of a command (or bench target) table. */
typedef struct cli_command {
  const char *name;    /* what the user types */
  const char *summary; /* one line for the listing */
  cli_fn fn;
} cli_command;

/* Command entry points (src/cmd_*.c). */
int cmd_attn(int argc, char **argv);  /* src/cmd_attn.c */
int cmd_cmp(int argc, char **argv);   /* src/cmd_cmp.c */
int cmd_bench(int argc, char **argv); /* src/cmd_bench.c */
int cmd_demo(int argc, char **argv);  /* src/cmd_bench.c */
int cmd_run(int argc, char **argv);   /* src/cmd_run.c */
int cmd_predict(int argc, char **argv); /* src/cmd_predict.c */
int cmd_gen_model(int argc, char **argv); /* src/cmd_gen.c */
int cmd_bench_gpu_attn(int argc, char **argv); /* src/cmd_bench_gpu.c: `apb bench gpu-attn` */
int cmd_bench_gpu_ops(int argc, char **argv);  /* src/cmd_bench_ops.c: `apb bench gpu-ops` */

/* The row called name in table [n], or NULL. */
const cli_command *cli_find(const cli_command *table, int n, const char *name);
/* Print "  name   summary" for every row, names padded to a common width. */
void cli_list(const cli_command *table, int n);
/* Reset getopt and run fn(argc, argv): every command starts parsing from argv[1]. */
int cli_call(cli_fn fn, int argc, char **argv);

/* ---------------------------------------------------------------- reporting (stderr) */

/* "apb CMD: <msg>" then "Try 'apb CMD --help' for the options and their defaults."; returns
 * CLI_USAGE. cmd is the command as typed after "apb" ("attn", "bench attn"). */
int cli_usage(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* "apb CMD: <msg>"; returns CLI_FAIL. The message says what was wrong and what to do. */
int cli_fail(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* "apb CMD: <err->msg> (<status string>)"; returns CLI_FAIL. */
int cli_report(const char *cmd, apb_status st, const apb_error *err);
/* Until cli_capture(NULL, 0): the first message of cli_usage, cli_fail and cli_report (without the
 * "apb CMD: " prefix and the --help hint) goes to buf instead of stderr, later ones nowhere. Used under
 * mpirun, where rank 0 reports every rank's message once (src/cmd_run.c). */
void cli_capture(char *buf, size_t cap);

/* ---------------------------------------------------------------- options */

/* getopt_long over argv with the short options derived from opts (every entry whose val is an
 * alphanumeric character) and opterr off. Returns the matched val, -1 after the last option (then
 * optind indexes the first operand), or '?' after printing a usage error (unknown option, missing
 * value): the caller returns CLI_USAGE. Operands may come before, between or after options. */
int cli_getopt(const char *cmd, int argc, char **argv, const struct option *opts);

/* Parse s as a decimal integer with an optional binary suffix (K = 1024, M = 1024^2, G = 1024^3) in
 * [lo, hi]. On error prints "apb CMD: OPT wants an integer in [lo, hi], got 's'" (cli_usage) and
 * returns CLI_USAGE; returns 0 on success. */
int cli_parse_i64(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi, int64_t *out);
/* As cli_parse_i64, for an int (lo and hi must fit in int). */
int cli_parse_int(const char *cmd, const char *opt, const char *s, int lo, int hi, int *out);
/* A finite decimal or exponent number in [lo, hi]. */
int cli_parse_f64(const char *cmd, const char *opt, const char *s, double lo, double hi, double *out);
/* The cost model's rates (apb/cost.h) as options, shared by `predict` and `bench prefill`: which =
 * 0 --attn-tflops, 1 --gemm-tflops, 2 --mem-gbs, 3 --link-gbs, 4 --latency-us; sets that field of hw. */
enum { CLI_RATE_ATTN, CLI_RATE_GEMM, CLI_RATE_MEM, CLI_RATE_LINK, CLI_RATE_LAT, CLI_RATE_COUNT };
extern const char *const cli_rate_names[CLI_RATE_COUNT]; /* the option names, without "--" */
int cli_parse_rate(const char *cmd, int which, const char *s, apb_hw *hw);
/* Sizes of a generated preset as options, shared by every command that makes a model from a preset
 * (run, gen-model, predict, bench forward, sim and prefill): --layers, --hidden, --ffn,
 * --q-heads, --kv-heads, --head-dim, --vocab, --scorer-width, each changing that size alone (no other
 * size follows it). A command puts CLI_SHAPE_OPTIONS(base) in its option table, calls
 * cli_parse_shape(cmd, val - base, optarg, &shape) for vals base .. base + CLI_SHAPE_COUNT - 1, and
 * cli_apply_shape on the preset's configuration after parsing. */
enum { CLI_SHAPE_LAYERS, CLI_SHAPE_HIDDEN, CLI_SHAPE_FFN, CLI_SHAPE_QHEADS, CLI_SHAPE_KVHEADS, CLI_SHAPE_HEADDIM,
       CLI_SHAPE_VOCAB, CLI_SHAPE_SCORER, CLI_SHAPE_COUNT };
typedef struct cli_shape {
  int64_t v[CLI_SHAPE_COUNT];
  int set[CLI_SHAPE_COUNT];
  int any; /* some size was given */
} cli_shape;
#define CLI_SHAPE_OPTIONS(base)                                                                                    \
  {"layers", required_argument, 0, (base) + CLI_SHAPE_LAYERS},                                                     \
      {"hidden", required_argument, 0, (base) + CLI_SHAPE_HIDDEN},                                                 \
      {"ffn", required_argument, 0, (base) + CLI_SHAPE_FFN},                                                       \
      {"q-heads", required_argument, 0, (base) + CLI_SHAPE_QHEADS},                                                \
      {"kv-heads", required_argument, 0, (base) + CLI_SHAPE_KVHEADS},                                              \
      {"head-dim", required_argument, 0, (base) + CLI_SHAPE_HEADDIM},                                              \
      {"vocab", required_argument, 0, (base) + CLI_SHAPE_VOCAB},                                                   \
      {"scorer-width", required_argument, 0, (base) + CLI_SHAPE_SCORER}
/* The help lines for them (26-column option field). */
#define CLI_SHAPE_HELP                                                                                             \
  "  --layers L, --hidden E, --ffn F, --q-heads HQ, --kv-heads HKV, --head-dim D, --vocab V,\n"                   \
  "  --scorer-width I    change that size of the preset, each alone (default: the preset's); the\n"             \
  "                      result is checked as a config.json would be (HQ a multiple of HKV, D even).\n"          \
  "                      E.g. --preset tiny --q-heads 16 --kv-heads 8 --head-dim 32 --hidden 512:\n"            \
  "                      tiny with 8 KV heads, so that ulysses runs on 4 or 8 hosts\n"
int cli_parse_shape(const char *cmd, int which, const char *s, cli_shape *shape);
/* cfg and *scorer_width (a preset's, changed in place) with the given sizes, checked by
 * apb_config_check; desc [len] receives what changed (" (q-heads 16, kv-heads 8)", or "" when nothing
 * did). flags: CLI_SHAPE_NEED_HEADS (the command has no other scorer than the retaining heads: width 0
 * refused), CLI_SHAPE_CUDA (the model runs on the CUDA backend: head dimension at most
 * APB_CUDA_MAX_HEAD_DIM). 0, or CLI_USAGE after saying what is wrong. */
enum { CLI_SHAPE_NEED_HEADS = 1, CLI_SHAPE_CUDA = 2 };
int cli_apply_shape(const char *cmd, const cli_shape *shape, int flags, apb_model_config *cfg, int *scorer_width,
                    char *desc, size_t len);
/* `"model": {"layers": L, "hidden": E, "ffn": F, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "vocab": V,
 * "scorer_width": I}` (no leading or trailing comma): the sizes a JSON result was computed with. */
void cli_json_model(FILE *f, const apb_model_config *cfg, int scorer_width);
/* A comma-separated list of 1..max integers, each in [lo, hi] (suffixes as cli_parse_i64), into
 * out [max]; *n receives the count. */
int cli_parse_i64_list(const char *cmd, const char *opt, const char *s, int64_t lo, int64_t hi,
                       int64_t *out, int max, int *n);
/* A comma-separated list of methods (dense, ring, zigzag, ulysses, star, apb) into out
 * [APB_METHOD_COUNT]; *n receives the count (>= 1). */
int cli_parse_methods(const char *cmd, const char *opt, const char *s, apb_method *out, int *n);
/* The options o of method m in a list of n_methods (apb run and predict): in a list, --passing is apb's
 * (star runs without it), so is --query-offset unless --embed-query is given (star does not embed the
 * query by default), and --balance apb's and star's (the baselines run as they are); a method alone
 * gets the options as given, so that the plan refuses what does not fit it. */
apb_run_opts cli_method_opts(const apb_run_opts *o, apb_method m, int n_methods);
/* One of names [n]; *out receives its index. */
int cli_parse_choice(const char *cmd, const char *opt, const char *s, const char *const *names, int n,
                     int *out);

/* ---------------------------------------------------------------- shared helpers */

/* OpenMP and OpenBLAS thread counts; n <= 0 keeps the defaults (OMP_NUM_THREADS, else every core). */
void cli_set_threads(int n);
/* Threads an OpenMP parallel region will use now. */
int cli_threads(void);
/* Seconds from CLOCK_MONOTONIC. */
double cli_now(void);
/* Median of v [n >= 1] (the mean of the two middle values for even n); sorts v ascending, so v[0] is
 * then the best. */
float cli_median_f(float *v, int n);
/* Median seconds of `reps` OpenBLAS sgemm runs of size g x g x g (seeded normal inputs), after one
 * warm-up; < 0 when out of memory. The baseline every CPU benchmark reports against. */
double cli_time_sgemm(int g, int reps, uint64_t seed);
/* bench targets in src/bench_run.c */
int bench_forward(int argc, char **argv);
int bench_sim(int argc, char **argv);
int bench_prefill(int argc, char **argv); /* src/bench_prefill.c */

/* "[3,4,5]" ("[]" for a scalar) into buf [cap]. */
void cli_format_shape(char *buf, size_t cap, int ndim, const int64_t *shape);
/* The row-major multi-index of element `flat` of a tensor of that shape, as "[3,0,17]". */
void cli_format_index(char *buf, size_t cap, int ndim, const int64_t *shape, int64_t flat);

/* Widen tensor t of file f to fp32 in a fresh malloc'd buffer (*out; free() it). A finite F64 value
 * beyond the F32 range is refused (APB_EUNSUPPORTED, naming it and where it is), not read as Inf. */
apb_status cli_read_tensor(const apb_st_file *f, const apb_st_tensor *t, float **out, apb_error *err);
/* Index of the first NaN or Inf in x [n], or -1. */
int64_t cli_first_nonfinite(const float *x, int64_t n);

#endif /* APB_CLI_H */
