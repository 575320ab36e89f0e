/* tests/check_model.c: configuration, RoPE frequencies, loading, presets and saving (apb/model.h).
 *
 * - config: the three transformers fixtures (old form and new form of the same llama3 model must
 *   parse to the same configuration), defaults, precedence of the rope keys, and one case per error
 *   class (missing key, wrong JSON type, non-positive size, head counts that do not divide, unknown
 *   rope type, sliding windows, malformed JSON), each asserted by status and a piece of the message.
 * - rope: default/linear/llama3 against closed forms written out here, and against the fp32 inverse
 *   frequencies transformers computed for the fixtures.
 * - loader: one broken directory per error (missing tensor, wrong shape, wrong dtype, truncated file,
 *   index problems, missing/malformed config, heads problems), F16/BF16 widening, the fused layout
 *   against the raw HF tensors, and sharded loading.
 * - round trips: generate/create, save, load: bitwise for F32, bf16-rounded for BF16.
 * - presets: sizes (llama3-8b-shape has Llama-3.1-8B's 8,030,261,248 parameters), determinism across
 *   seeds and thread counts, and realistic activations measured with the plain forward below.
 * - fixtures: a plain forward written here (double accumulation, nothing shared with the library but
 *   the loaded weights and apb_rope_inv_freq) against transformers' layer outputs and logits; and the
 *   same comparison through the real forward (apb_host_run, dense, H = 1) on the naive and fast
 *   backends. Tolerance: the relative Frobenius bound of apb_tolerance(APB_PREC_F32, T + D) (the
 *   attention reduction; T >= 300, so the table gives the contract's 1e-5 of shared/APB.md 7) per layer
 *   and for the logits, without the table's elementwise terms, which are meant for comparisons against
 *   our double oracle, not against torch's fp32 arithmetic.
 * - gen-model: the command through $APB_BIN.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "apb/backend.h"
#include "apb/model.h"
#include "apb/sched.h"
#include "apb/sim.h"
#include "testutil.h"

/* ---------------------------------------------------------------- helpers */

static char *path2(const char *a, const char *b) {
  size_t n = strlen(a) + strlen(b) + 2;
  char *p = malloc(n);
  ck_assert(p != NULL);
  snprintf(p, n, "%s/%s", a, b);
  return p;
}

static char *fixture(const char *name) { return path2(APB_TEST_SRCDIR "/tests/fixtures", name); }

static char *make_tmpdir(void) {
  char *d = tu_tmpname(".d");
  ck_assert_msg(mkdir(d, 0755) == 0, "mkdir %s: %s", d, strerror(errno));
  return d;
}

/* Remove a flat directory made by make_tmpdir and free its name. */
static void rm_dir(char *d) {
  char *cmd = malloc(strlen(d) + 16);
  ck_assert(cmd != NULL);
  sprintf(cmd, "rm -rf '%s'", d);
  ck_assert(system(cmd) == 0);
  free(cmd);
  free(d);
}

static void spit(const char *path, const char *text) {
  FILE *fp = fopen(path, "wb");
  ck_assert_msg(fp != NULL, "cannot create %s", path);
  fputs(text, fp);
  ck_assert(fclose(fp) == 0);
}

/* Assert a failure: the status, err->code, and a piece of the message. */
static void expect_err(const char *what, apb_status st, const apb_error *err, apb_status code, const char *needle) {
  ck_assert_msg(st == code, "%s: status %s, expected %s (message: %s)", what, apb_status_str(st),
                apb_status_str(code), err->msg);
  ck_assert_msg(err->code == code, "%s: err.code %d, expected %d", what, (int)err->code, (int)code);
  ck_assert_msg(strstr(err->msg, needle) != NULL, "%s: message lacks \"%s\": %s", what, needle, err->msg);
}

static void expect_ok(const char *what, apb_status st, const apb_error *err) {
  ck_assert_msg(st == APB_OK, "%s: %s: %s", what, apb_status_str(st), err->msg);
}

static void cfg_assert_eq(const char *what, const apb_model_config *a, const apb_model_config *b) {
  ck_assert_msg(strcmp(a->arch, b->arch) == 0, "%s: arch %s vs %s", what, a->arch, b->arch);
#define EQ(f) ck_assert_msg(a->f == b->f, "%s: " #f " differs: %g vs %g", what, (double)a->f, (double)b->f)
  EQ(n_layers);
  EQ(hidden);
  EQ(ffn);
  EQ(n_heads);
  EQ(n_kv_heads);
  EQ(head_dim);
  EQ(vocab);
  EQ(rms_eps);
  EQ(rope.type);
  EQ(rope.theta);
  EQ(rope.factor);
  EQ(rope.low_freq_factor);
  EQ(rope.high_freq_factor);
  EQ(rope.original_max_pos);
  EQ(qkv_bias);
  EQ(o_bias);
  EQ(mlp_bias);
  EQ(tie_embeddings);
  EQ(max_pos);
#undef EQ
}

static apb_status parse_str(const char *json, apb_model_config *cfg, apb_error *err) {
  return apb_config_parse(json, strlen(json), "test.json", cfg, err);
}

/* ---------------------------------------------------------------- config: fixtures and defaults */

START_TEST(config_fixtures) {
  apb_error err = {0};
  apb_model_config old, neu;
  char *d = fixture("llama3_rope"), *p1 = path2(d, "config.json"), *p2 = path2(d, "config.new.json");
  expect_ok("old form", apb_config_load(p1, &old, &err), &err);
  expect_ok("new form", apb_config_load(p2, &neu, &err), &err);
  cfg_assert_eq("llama3_rope old vs new form", &old, &neu);
  ck_assert_str_eq(old.arch, "LlamaForCausalLM");
  ck_assert_int_eq(old.n_layers, 2);
  ck_assert_int_eq(old.hidden, 64);
  ck_assert_int_eq(old.ffn, 192);
  ck_assert_int_eq(old.n_heads, 4);
  ck_assert_int_eq(old.n_kv_heads, 2);
  ck_assert_int_eq(old.head_dim, 32); /* given, and not hidden / heads = 16 */
  ck_assert_int_eq(old.vocab, 256);
  ck_assert(old.rms_eps == 1e-5);
  ck_assert_int_eq(old.rope.type, APB_ROPE_LLAMA3);
  ck_assert(old.rope.theta == 500000.0 && old.rope.factor == 8.0);
  ck_assert(old.rope.low_freq_factor == 1.0 && old.rope.high_freq_factor == 4.0);
  ck_assert_int_eq(old.rope.original_max_pos, 8192);
  ck_assert(!old.qkv_bias && !old.o_bias && !old.mlp_bias && !old.tie_embeddings);
  ck_assert_int_eq(old.max_pos, 131072);
  free(d), free(p1), free(p2);

  apb_model_config c;
  d = fixture("llama_gqa_bias/config.json");
  expect_ok("llama_gqa_bias", apb_config_load(d, &c, &err), &err);
  ck_assert_int_eq(c.n_heads, 8);
  ck_assert_int_eq(c.n_kv_heads, 2);
  ck_assert_int_eq(c.head_dim, 16);
  ck_assert(c.qkv_bias && c.o_bias && c.mlp_bias && !c.tie_embeddings);
  ck_assert_int_eq(c.rope.type, APB_ROPE_DEFAULT);
  ck_assert(c.rope.theta == 10000.0 && c.rms_eps == 1e-6);
  free(d);

  d = fixture("qwen2_tied/config.json");
  expect_ok("qwen2_tied", apb_config_load(d, &c, &err), &err);
  ck_assert_str_eq(c.arch, "Qwen2ForCausalLM");
  ck_assert(c.qkv_bias && !c.o_bias && !c.mlp_bias && c.tie_embeddings);
  ck_assert_int_eq(c.n_kv_heads, 1);
  ck_assert_int_eq(c.head_dim, 16);
  ck_assert(c.rope.theta == 1e6 && c.rope.type == APB_ROPE_DEFAULT);
  ck_assert_int_eq(c.max_pos, 32768);
  free(d);
}
END_TEST

#define LLAMA_MIN                                                                               \
  "\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"intermediate_size\": 96, " \
  "\"num_hidden_layers\": 3, \"num_attention_heads\": 8, \"vocab_size\": 100"

START_TEST(config_defaults) {
  apb_error err = {0};
  apb_model_config c;
  expect_ok("minimal llama", parse_str("{" LLAMA_MIN "}", &c, &err), &err);
  ck_assert_int_eq(c.n_kv_heads, 8); /* num_attention_heads */
  ck_assert_int_eq(c.head_dim, 8);   /* hidden / heads */
  ck_assert(c.rms_eps == 1e-6 && c.rope.theta == 10000.0 && c.rope.type == APB_ROPE_DEFAULT);
  ck_assert(!c.tie_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
  ck_assert_int_eq(c.max_pos, 2048);

  /* null counts as absent */
  expect_ok("nulls",
            parse_str("{" LLAMA_MIN ", \"head_dim\": null, \"num_key_value_heads\": null, "
                      "\"rope_scaling\": null, \"rope_parameters\": null, \"rope_theta\": null}",
                      &c, &err),
            &err);
  ck_assert_int_eq(c.head_dim, 8);
  ck_assert_int_eq(c.n_kv_heads, 8);

  /* attention_bias covers q, k, v and o */
  expect_ok("attention_bias", parse_str("{" LLAMA_MIN ", \"attention_bias\": true}", &c, &err), &err);
  ck_assert(c.qkv_bias && c.o_bias && !c.mlp_bias);

  /* model_type alone */
  expect_ok("model_type only",
            parse_str("{\"model_type\": \"qwen2\", \"hidden_size\": 64, \"intermediate_size\": 96, "
                      "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                      "\"vocab_size\": 10}",
                      &c, &err),
            &err);
  ck_assert_str_eq(c.arch, "Qwen2ForCausalLM");
  ck_assert(c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.tie_embeddings);
  ck_assert_int_eq(c.max_pos, 32768);

  /* legacy "type", linear */
  expect_ok("linear",
            parse_str("{" LLAMA_MIN ", \"rope_theta\": 5e5, \"rope_scaling\": {\"type\": \"linear\", "
                      "\"factor\": 2}}",
                      &c, &err),
            &err);
  ck_assert(c.rope.type == APB_ROPE_LINEAR && c.rope.factor == 2.0 && c.rope.theta == 5e5);

  /* rope_parameters.rope_theta beats rope_theta; rope_scaling beats rope_parameters for the type */
  expect_ok("precedence",
            parse_str("{" LLAMA_MIN ", \"rope_theta\": 1000, \"rope_parameters\": {\"rope_type\": \"default\", "
                      "\"rope_theta\": 2000}, \"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 3}}",
                      &c, &err),
            &err);
  ck_assert(c.rope.type == APB_ROPE_LINEAR && c.rope.factor == 3.0 && c.rope.theta == 2000.0);

  /* llama3 without original_max_position_embeddings falls back to max_position_embeddings */
  expect_ok("llama3 fallback",
            parse_str("{" LLAMA_MIN ", \"max_position_embeddings\": 4096, \"rope_parameters\": {\"rope_type\": "
                      "\"llama3\", \"rope_theta\": 500000, \"factor\": 8, \"low_freq_factor\": 1, "
                      "\"high_freq_factor\": 4}}",
                      &c, &err),
            &err);
  ck_assert_int_eq(c.rope.original_max_pos, 4096);

  /* transformers 5.x may nest the parameters under the layer type */
  expect_ok("nested",
            parse_str("{" LLAMA_MIN ", \"rope_parameters\": {\"full_attention\": {\"rope_type\": "
                      "\"linear\", \"factor\": 4, \"rope_theta\": 123}}}",
                      &c, &err),
            &err);
  ck_assert(c.rope.type == APB_ROPE_LINEAR && c.rope.factor == 4.0 && c.rope.theta == 123.0);

  /* Qwen2 with sliding_window set but unused is fine */
  expect_ok("qwen2 sliding off",
            parse_str("{\"architectures\": [\"Qwen2ForCausalLM\"], \"model_type\": \"qwen2\", \"hidden_size\": 64, "
                      "\"intermediate_size\": 96, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
                      "\"vocab_size\": 10, \"use_sliding_window\": false, \"sliding_window\": 4096, "
                      "\"layer_types\": [\"full_attention\", \"full_attention\"]}",
                      &c, &err),
            &err);

  /* a missing file */
  apb_status st = apb_config_load("/nonexistent/config.json", &c, &err);
  expect_err("missing file", st, &err, APB_ENOTFOUND, "/nonexistent/config.json");
}
END_TEST

/* ---------------------------------------------------------------- config: errors (a sweep) */

typedef struct cfg_case {
  const char *del;     /* key removed from the base, or NULL */
  const char *k1, *v1; /* key set to JSON text v1, or NULL */
  const char *k2, *v2;
  apb_status code;
  const char *needle;
} cfg_case;

static const cfg_case cfg_cases[] = {
    {"hidden_size", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "missing required key \"hidden_size\""},
    {"intermediate_size", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "\"intermediate_size\""},
    {"num_hidden_layers", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "\"num_hidden_layers\""},
    {"num_attention_heads", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "\"num_attention_heads\""},
    {"vocab_size", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "\"vocab_size\""},
    {"architectures", NULL, NULL, NULL, NULL, APB_ENOTFOUND, "\"architectures\""},
    {NULL, "num_key_value_heads", "3", NULL, NULL, APB_EINVAL, "not a multiple of \"num_key_value_heads\" (3)"},
    {NULL, "hidden_size", "100", NULL, NULL, APB_EINVAL, "\"hidden_size\" (100) is not a multiple of"},
    {NULL, "hidden_size", "\"64\"", NULL, NULL, APB_EFORMAT, "\"hidden_size\" is a string, expected an integer"},
    {NULL, "hidden_size", "64.0", NULL, NULL, APB_EFORMAT, "\"hidden_size\" is a real number"},
    {NULL, "hidden_size", "0", NULL, NULL, APB_EINVAL, "\"hidden_size\" is 0, expected a positive integer"},
    {NULL, "num_hidden_layers", "-2", NULL, NULL, APB_EINVAL, "\"num_hidden_layers\" is -2"},
    {NULL, "vocab_size", "1099511627776", NULL, NULL, APB_EUNSUPPORTED, "\"vocab_size\" is 1099511627776, more"},
    {NULL, "head_dim", "7", NULL, NULL, APB_EUNSUPPORTED, "head dimension 7 is odd"},
    {NULL, "head_dim", "[8]", NULL, NULL, APB_EFORMAT, "\"head_dim\" is an array"},
    {NULL, "rms_norm_eps", "\"1e-5\"", NULL, NULL, APB_EFORMAT, "\"rms_norm_eps\" is a string, expected a number"},
    {NULL, "rms_norm_eps", "0", NULL, NULL, APB_EINVAL, "\"rms_norm_eps\" is 0"},
    {NULL, "tie_word_embeddings", "1", NULL, NULL, APB_EFORMAT, "\"tie_word_embeddings\" is an integer"},
    {NULL, "attention_bias", "\"true\"", NULL, NULL, APB_EFORMAT, "\"attention_bias\" is a string"},
    {NULL, "hidden_act", "\"gelu\"", NULL, NULL, APB_EUNSUPPORTED, "\"hidden_act\" is \"gelu\""},
    {NULL, "hidden_act", "1", NULL, NULL, APB_EFORMAT, "\"hidden_act\" is an integer"},
    {NULL, "architectures", "[\"MistralForCausalLM\"]", NULL, NULL, APB_EUNSUPPORTED, "\"MistralForCausalLM\""},
    {NULL, "architectures", "\"LlamaForCausalLM\"", NULL, NULL, APB_EFORMAT, "\"architectures\" is a string"},
    {NULL, "architectures", "[]", NULL, NULL, APB_EFORMAT, "\"architectures\" is an empty array"},
    {NULL, "architectures", "[3]", NULL, NULL, APB_EFORMAT, "\"architectures\"[0] is an integer"},
    {NULL, "model_type", "\"qwen2\"", NULL, NULL, APB_EFORMAT, "\"model_type\" is \"qwen2\""},
    {"architectures", "model_type", "\"gpt2\"", NULL, NULL, APB_EUNSUPPORTED, "\"model_type\" is \"gpt2\""},
    {NULL, "rope_scaling", "{\"type\": \"yarn\", \"factor\": 4}", NULL, NULL, APB_EUNSUPPORTED,
     "\"rope_scaling.type\" is \"yarn\""},
    {NULL, "rope_scaling", "{\"rope_type\": \"dynamic\", \"factor\": 2}", NULL, NULL, APB_EUNSUPPORTED,
     "\"rope_scaling.rope_type\" is \"dynamic\""},
    {NULL, "rope_parameters", "{\"rope_type\": \"longrope\", \"rope_theta\": 1e4}", NULL, NULL, APB_EUNSUPPORTED,
     "\"rope_parameters.rope_type\" is \"longrope\""},
    {NULL, "rope_parameters", "{\"rope_type\": \"yarn\"}", "rope_scaling", "null", APB_EUNSUPPORTED, "\"yarn\""},
    {NULL, "rope_scaling", "{\"factor\": 2}", NULL, NULL, APB_ENOTFOUND, "neither \"rope_type\" nor \"type\""},
    {NULL, "rope_scaling", "{\"rope_type\": 2}", NULL, NULL, APB_EFORMAT, "\"rope_scaling.rope_type\" is an integer"},
    {NULL, "rope_scaling", "\"linear\"", NULL, NULL, APB_EFORMAT, "\"rope_scaling\" is a string"},
    {NULL, "rope_parameters", "[1]", NULL, NULL, APB_EFORMAT, "\"rope_parameters\" is an array"},
    {NULL, "rope_scaling", "{\"rope_type\": \"linear\"}", NULL, NULL, APB_ENOTFOUND,
     "missing required key \"rope_scaling.factor\""},
    {NULL, "rope_scaling", "{\"rope_type\": \"linear\", \"factor\": -1}", NULL, NULL, APB_EINVAL,
     "\"rope_scaling.factor\" is -1"},
    {NULL, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8, \"high_freq_factor\": 4}", NULL, NULL,
     APB_ENOTFOUND, "\"rope_scaling.low_freq_factor\""},
    {NULL, "rope_scaling",
     "{\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 4, \"high_freq_factor\": 4}", NULL, NULL,
     APB_EINVAL, "must be greater than"},
    {NULL, "rope_scaling",
     "{\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 1, \"high_freq_factor\": 4, "
     "\"original_max_position_embeddings\": \"8192\"}",
     NULL, NULL, APB_EFORMAT, "\"rope_scaling.original_max_position_embeddings\" is a string"},
    {NULL, "rope_theta", "\"big\"", NULL, NULL, APB_EFORMAT, "\"rope_theta\" is a string"},
    {NULL, "rope_theta", "-1", NULL, NULL, APB_EINVAL, "\"rope_theta\" is -1"},
    /* positive and finite, yet theta^(-2i/D) or f/factor overflows: caught by the fuzzer in CI */
    {NULL, "rope_theta", "5e-324", "head_dim", "64", APB_EINVAL, "RoPE inverse frequency 31 of 32 is inf"},
    {NULL, "rope_scaling", "{\"rope_type\": \"linear\", \"factor\": 1e-310}", NULL, NULL, APB_EINVAL,
     "RoPE inverse frequency 0 of 4 is inf"},
    {NULL, "partial_rotary_factor", "0.5", NULL, NULL, APB_EUNSUPPORTED, "\"partial_rotary_factor\" is 0.5"},
    {NULL, "rope_parameters", "{\"full_attention\": {\"rope_type\": \"default\"}, \"sliding_attention\": {}}", NULL,
     NULL, APB_EUNSUPPORTED, "layer type \"sliding_attention\""},
    {NULL, "architectures", "[\"Qwen2ForCausalLM\"]", "use_sliding_window", "true", APB_EUNSUPPORTED,
     "\"use_sliding_window\" is true"},
    {NULL, "architectures", "[\"Qwen2ForCausalLM\"]", "layer_types", "[\"full_attention\", \"sliding_attention\"]",
     APB_EUNSUPPORTED, "\"layer_types\"[1] is \"sliding_attention\""},
    {NULL, "architectures", "[\"Qwen2ForCausalLM\"]", "use_sliding_window", "\"no\"", APB_EFORMAT,
     "\"use_sliding_window\" is a string"},
    {NULL, "max_position_embeddings", "0", NULL, NULL, APB_EINVAL, "\"max_position_embeddings\" is 0"},
};
#define N_CFG_CASES ((int)(sizeof cfg_cases / sizeof cfg_cases[0]))

START_TEST(config_errors) {
  const cfg_case *k = &cfg_cases[_i];
  json_error_t je;
  json_t *root = json_loads("{" LLAMA_MIN "}", 0, &je);
  ck_assert(root != NULL);
  if (k->del) json_object_del(root, k->del);
  const char *keys[2] = {k->k1, k->k2}, *vals[2] = {k->v1, k->v2};
  for (int i = 0; i < 2; i++) {
    if (!keys[i]) continue;
    json_t *v = json_loads(vals[i], JSON_DECODE_ANY, &je);
    ck_assert_msg(v != NULL, "case %d: bad test JSON %s", _i, vals[i]);
    json_object_set_new(root, keys[i], v);
  }
  char *text = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  apb_model_config c;
  memset(&c, 0x5a, sizeof c);
  apb_error err = {0};
  apb_status st = apb_config_parse(text, strlen(text), "case.json", &c, &err);
  char what[96];
  snprintf(what, sizeof what, "config case %d (%s)", _i, text);
  expect_err(what, st, &err, k->code, k->needle);
  ck_assert_msg(strncmp(err.msg, "case.json: ", 11) == 0, "%s: message does not start with the label: %s", what,
                err.msg);
  ck_assert_msg(c.n_layers == 0 && c.hidden == 0, "%s: configuration not cleared on failure", what);
  free(text);
}
END_TEST

START_TEST(config_malformed) {
  apb_error err = {0};
  apb_model_config c;
  expect_err("truncated", parse_str("{\"hidden_size\": 64", &c, &err), &err, APB_EFORMAT, "not valid JSON");
  expect_err("empty", apb_config_parse("", 0, "e.json", &c, &err), &err, APB_EFORMAT, "e.json: not valid JSON");
  expect_err("array", parse_str("[1, 2]", &c, &err), &err, APB_EFORMAT, "the document is an array");
  expect_err("duplicate", parse_str("{" LLAMA_MIN ", \"vocab_size\": 7}", &c, &err), &err, APB_EFORMAT,
             "not valid JSON");
  static const char with_nul[] = "{\"a\": 1}\0garbage";
  expect_err("NUL", apb_config_parse(with_nul, sizeof with_nul - 1, "n.json", &c, &err), &err, APB_EFORMAT,
             "NUL byte at offset 8");
  expect_err("NaN", parse_str("{" LLAMA_MIN ", \"rope_theta\": NaN}", &c, &err), &err, APB_EFORMAT, "not valid JSON");
  /* a stale message in err is not carried into the next one */
  expect_ok("after errors", parse_str("{" LLAMA_MIN "}", &c, &err), &err);
  ck_assert_str_eq(err.msg, "");
}
END_TEST

/* ---------------------------------------------------------------- rope */

START_TEST(rope_closed_form) {
  const int D = 128;
  double f[64];
  apb_rope r = {.type = APB_ROPE_DEFAULT, .theta = 500000.0, .factor = 1.0};
  apb_rope_inv_freq(&r, D, f);
  ck_assert(f[0] == 1.0);
  for (int i = 0; i < D / 2; i++) {
    double want = exp(-(2.0 * i / D) * log(500000.0));
    ck_assert_msg(fabs(f[i] - want) <= 1e-14 * want, "default [%d]: %.17g vs %.17g", i, f[i], want);
  }
  ck_assert(fabs(f[32] - 1.0 / sqrt(500000.0)) < 1e-18); /* theta^(-1/2) exactly at i = D/4 */

  r.type = APB_ROPE_LINEAR, r.factor = 4.0;
  double g[64];
  apb_rope_inv_freq(&r, D, g);
  for (int i = 0; i < D / 2; i++) ck_assert(fabs(g[i] - f[i] / 4.0) <= 1e-15 * f[i]);

  /* llama3 (Llama-3.1): wavelength 2 pi / f; below 8192/4 = 2048 kept, above 8192/1 divided by 8,
   * between: linear in 8192 / wavelength. With theta 500000 and D 128, i <= 28 are high, i >= 35 low. */
  r = (apb_rope){.type = APB_ROPE_LLAMA3,
                 .theta = 500000.0,
                 .factor = 8.0,
                 .low_freq_factor = 1.0,
                 .high_freq_factor = 4.0,
                 .original_max_pos = 8192};
  apb_rope_inv_freq(&r, D, g);
  for (int i = 0; i <= 28; i++) ck_assert_msg(g[i] == f[i], "llama3 high-frequency [%d] changed", i);
  for (int i = 35; i < 64; i++) ck_assert_msg(fabs(g[i] - f[i] / 8) <= 1e-15 * f[i], "llama3 low [%d]", i);
  for (int i = 29; i <= 34; i++) {
    double wl = 2 * M_PI / f[i];
    ck_assert(wl >= 2048 && wl <= 8192);
    double t = (8192.0 / wl - 1.0) / 3.0; /* 0 at the low end, 1 at the high end */
    double want = f[i] * (t + (1 - t) / 8.0);
    ck_assert_msg(fabs(g[i] - want) <= 1e-14 * want, "llama3 medium [%d]: %.17g vs %.17g", i, g[i], want);
    ck_assert(g[i] < f[i] && g[i] > f[i] / 8);
  }
  for (int i = 1; i < 64; i++) ck_assert_msg(g[i] < g[i - 1], "llama3 frequencies not decreasing at %d", i);
}
END_TEST

/* apb_rope_inv_freq against transformers' own fp32 values: equal to fp32 rounding. */
START_TEST(rope_vs_transformers) {
  static const char *const names[] = {"llama3_rope", "llama_gqa_bias", "qwen2_tied"};
  for (int k = 0; k < 3; k++) {
    apb_error err = {0};
    char *d = fixture(names[k]), *cp = path2(d, "config.json"), *ep = path2(d, "expected.safetensors");
    apb_model_config c;
    expect_ok(cp, apb_config_load(cp, &c, &err), &err);
    apb_st_file *f;
    expect_ok(ep, apb_st_open(ep, &f, &err), &err);
    const apb_st_tensor *t;
    int64_t dims[1] = {c.head_dim / 2};
    expect_ok("rope.inv_freq", apb_st_get(f, "rope.inv_freq", 1, dims, 0, &t, &err), &err);
    float hf[256];
    double ours[256];
    expect_ok("read", apb_st_read_f32(f, t, hf, &err), &err);
    apb_rope_inv_freq(&c.rope, c.head_dim, ours);
    for (int i = 0; i < c.head_dim / 2; i++)
      ck_assert_msg(fabs(ours[i] - hf[i]) <= 4e-7 * ours[i], "%s inv_freq[%d]: ours %.9g, transformers %.9g",
                    names[k], i, ours[i], (double)hf[i]);
    apb_st_close(f);
    free(d), free(cp), free(ep);
  }
}
END_TEST

/* ---------------------------------------------------------------- a plain forward (the test's own) */

typedef struct fwd {
  float *layer_out; /* [L, T, E] */
  float *final_h;   /* [T, E] */
  float *logits;    /* [T, V] (all rows) or [1, V] (last row only) */
  float *scores;    /* [L, Hkv, T] retaining scores before pooling, or NULL */
} fwd;

static void ref_rmsnorm(const float *x, const float *w, int64_t T, int E, double eps, float *y) {
  for (int64_t t = 0; t < T; t++) {
    double ss = 0;
    for (int e = 0; e < E; e++) ss += (double)x[t * E + e] * x[t * E + e];
    double inv = 1.0 / sqrt(ss / E + eps);
    for (int e = 0; e < E; e++) y[t * E + e] = (float)(w[e] * (x[t * E + e] * inv));
  }
}

/* y [T, N] = x [T, K] W^T + b */
static void ref_linear(const float *x, int64_t T, const float *W, const float *b, int64_t N, int64_t K, float *y) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; t++)
    for (int64_t n = 0; n < N; n++) {
      double s = b ? b[n] : 0.0;
      for (int64_t k = 0; k < K; k++) s += (double)x[t * K + k] * W[n * K + k];
      y[t * N + n] = (float)s;
    }
}

/* Rotate-half RoPE on rows of x [T, stride] whose heads start at col0: H heads of D, position t. */
static void ref_rope(float *x, int64_t T, int64_t stride, int64_t col0, int H, int D, const double *inv) {
  for (int64_t t = 0; t < T; t++)
    for (int h = 0; h < H; h++) {
      float *v = x + t * stride + col0 + (int64_t)h * D;
      for (int i = 0; i < D / 2; i++) {
        double a = (double)t * inv[i], c = cos(a), s = sin(a), x1 = v[i], x2 = v[i + D / 2];
        v[i] = (float)(x1 * c - x2 * s);
        v[i + D / 2] = (float)(x2 * c + x1 * s);
      }
    }
}

static double silu(double x) { return x / (1.0 + exp(-x)); }

static void ref_forward(const apb_model *m, const int32_t *ids, int64_t T, int all_logits, fwd *o) {
  const apb_model_config *c = &m->cfg;
  const int E = c->hidden, F = c->ffn, D = c->head_dim, Hq = c->n_heads, Hkv = c->n_kv_heads, V = c->vocab;
  const int64_t QD = (int64_t)Hq * D, KD = (int64_t)Hkv * D, QKV = QD + 2 * KD;
  float *x = malloc(sizeof(float) * T * E), *h = malloc(sizeof(float) * T * E),
        *qkv = malloc(sizeof(float) * T * QKV);
  float *att = malloc(sizeof(float) * T * QD), *tmp = malloc(sizeof(float) * T * E);
  float *gu = malloc(sizeof(float) * T * 2 * F), *act = malloc(sizeof(float) * T * F);
  double *inv = malloc(sizeof(double) * D / 2);
  ck_assert(x && h && qkv && att && tmp && gu && act && inv);
  apb_rope_inv_freq(&c->rope, D, inv);
  for (int64_t t = 0; t < T; t++) memcpy(x + t * E, m->embed + (int64_t)ids[t] * E, sizeof(float) * E);
  for (int l = 0; l < c->n_layers; l++) {
    const apb_layer *y = &m->layers[l];
    ref_rmsnorm(x, y->attn_norm, T, E, c->rms_eps, h);
    ref_linear(h, T, y->wqkv, y->bqkv, QKV, E, qkv);
    if (o->scores && y->fc1) {
      const int I = m->scorer_width;
      float *hid = malloc(sizeof(float) * T * I), *sc = malloc(sizeof(float) * T * Hkv);
      ck_assert(hid && sc);
      ref_linear(qkv, T, y->fc1, NULL, I, QKV, hid);
      for (int64_t i = 0; i < T * I; i++) hid[i] = (float)silu(hid[i]);
      ref_linear(hid, T, y->fc2, NULL, Hkv, I, sc);
      for (int64_t t = 0; t < T; t++)
        for (int k = 0; k < Hkv; k++) o->scores[((int64_t)l * Hkv + k) * T + t] = sc[t * Hkv + k];
      free(hid), free(sc);
    }
    ref_rope(qkv, T, QKV, 0, Hq, D, inv);
    ref_rope(qkv, T, QKV, QD, Hkv, D, inv);
    const double scale = 1.0 / sqrt((double)D);
#pragma omp parallel for schedule(dynamic)
    for (int64_t t = 0; t < T; t++) {
      double *p = malloc(sizeof(double) * (size_t)(t + 1)), *acc = malloc(sizeof(double) * (size_t)D);
      for (int hq = 0; hq < Hq; hq++) {
        int kv = hq / (Hq / Hkv);
        const float *q = qkv + t * QKV + (int64_t)hq * D;
        double mx = -INFINITY, sum = 0;
        for (int64_t s = 0; s <= t; s++) {
          const float *k = qkv + s * QKV + QD + (int64_t)kv * D;
          double d = 0;
          for (int i = 0; i < D; i++) d += (double)q[i] * k[i];
          p[s] = d * scale;
          if (p[s] > mx) mx = p[s];
        }
        for (int i = 0; i < D; i++) acc[i] = 0;
        for (int64_t s = 0; s <= t; s++) {
          double e = exp(p[s] - mx);
          sum += e;
          const float *v = qkv + s * QKV + QD + KD + (int64_t)kv * D;
          for (int i = 0; i < D; i++) acc[i] += e * v[i];
        }
        for (int i = 0; i < D; i++) att[t * QD + (int64_t)hq * D + i] = (float)(acc[i] / sum);
      }
      free(p), free(acc);
    }
    ref_linear(att, T, y->wo, y->bo, E, QD, tmp);
    for (int64_t i = 0; i < T * E; i++) x[i] += tmp[i];
    ref_rmsnorm(x, y->ffn_norm, T, E, c->rms_eps, h);
    ref_linear(h, T, y->w_gate_up, y->b_gate_up, 2 * F, E, gu);
    for (int64_t t = 0; t < T; t++)
      for (int i = 0; i < F; i++) act[t * F + i] = (float)(silu(gu[t * 2 * F + i]) * gu[t * 2 * F + F + i]);
    ref_linear(act, T, y->w_down, y->b_down, E, F, tmp);
    for (int64_t i = 0; i < T * E; i++) x[i] += tmp[i];
    memcpy(o->layer_out + (int64_t)l * T * E, x, sizeof(float) * T * E);
  }
  ref_rmsnorm(x, m->final_norm, T, E, c->rms_eps, o->final_h);
  if (o->logits) {
    int64_t r0 = all_logits ? 0 : T - 1;
    ref_linear(o->final_h + r0 * E, T - r0, m->lm_head, NULL, V, E, o->logits);
  }
  free(x), free(h), free(qkv), free(att), free(tmp), free(gu), free(act), free(inv);
}

/* ---------------------------------------------------------------- fixtures: expected outputs */

static const char *const fixture_names[] = {"llama3_rope", "llama_gqa_bias", "qwen2_tied"};
#define N_FIXTURES 3

typedef struct expected {
  apb_st_file *f;
  int64_t T;
  int32_t *ids; /* [T] */
} expected;

static void expected_open(const char *name, expected *x) {
  apb_error err = {0};
  char *d = fixture(name), *p = path2(d, "expected.safetensors");
  expect_ok(p, apb_st_open(p, &x->f, &err), &err);
  const apb_st_tensor *t;
  expect_ok("input_ids", apb_st_get(x->f, "input_ids", 1, NULL, 1, &t, &err), &err);
  x->T = t->shape[0];
  int64_t *ids = malloc(sizeof *ids * (size_t)x->T);
  x->ids = malloc(sizeof *x->ids * (size_t)x->T);
  ck_assert(ids && x->ids);
  expect_ok("input_ids", apb_st_read_i64(x->f, t, ids, &err), &err);
  for (int64_t i = 0; i < x->T; i++) x->ids[i] = (int32_t)ids[i];
  free(ids), free(d), free(p);
}

/* The fp32 tensor `name` of the expected file, rows [r0, r0 + rows) of width w, into a fresh buffer. */
static float *expected_rows(const expected *x, const char *name, int64_t r0, int64_t rows, int64_t w) {
  apb_error err = {0};
  const apb_st_tensor *t;
  expect_ok(name, apb_st_get(x->f, name, 2, (int64_t[]){-1, w}, 0, &t, &err), &err);
  float *all = malloc(sizeof(float) * (size_t)apb_st_numel(t)), *out = tu_alloc((size_t)(rows * w));
  ck_assert(all != NULL);
  expect_ok(name, apb_st_read_f32(x->f, t, all, &err), &err);
  memcpy(out, all + r0 * w, sizeof(float) * (size_t)(rows * w));
  free(all);
  return out;
}

static void expected_close(expected *x) {
  apb_st_close(x->f);
  free(x->ids);
}

/* tu_assert_close against the table's relative Frobenius bound for reduction length k (elementwise
 * terms off: see the top of this file), printing the measured errors first: the margin to the bound is
 * worth seeing in the log, not only when it is exceeded. */
static void fixture_close(const char *what, const float *got, const float *ref, int64_t n, int64_t k) {
  apb_tol t = apb_tolerance(APB_PREC_F32, k);
  t.atol = t.atol_rms = t.rtol = 0;
  apb_cmp c;
  apb_compare(got, ref, n, &c);
  fprintf(stderr, "  ");
  apb_cmp_print(stderr, what, &c);
  tu_assert_close(what, got, ref, n, t);
}

START_TEST(fixture_plain_forward) {
  const char *name = fixture_names[_i];
  apb_error err = {0};
  char *d = fixture(name);
  apb_model *m;
  expect_ok(d, apb_model_load(d, NULL, &m, &err), &err);
  expected x;
  expected_open(name, &x);
  const int64_t T = x.T, E = m->cfg.hidden, V = m->cfg.vocab;
  ck_assert_int_ge(T, 300);
  fwd o = {tu_alloc((size_t)(m->cfg.n_layers * T * E)), tu_alloc((size_t)(T * E)), tu_alloc((size_t)(T * V)), NULL};
  ref_forward(m, x.ids, T, 1, &o);
  char what[128];
  for (int l = 0; l < m->cfg.n_layers; l++) {
    char key[64];
    snprintf(key, sizeof key, "layer_out.%d", l);
    float *ref = expected_rows(&x, key, 0, T, E);
    snprintf(what, sizeof what, "%s %s (plain forward vs transformers)", name, key);
    fixture_close(what, o.layer_out + l * T * E, ref, T * E, T + m->cfg.head_dim);
    tu_free(ref);
    if (l + 1 < m->cfg.n_layers) { /* HF's hidden_states[l+1] is layer l's output, except the last */
      snprintf(key, sizeof key, "layer_out.%d", l);
      ref = expected_rows(&x, key, 0, T, E);
      snprintf(key, sizeof key, "hidden_states.%d", l + 1);
      float *hs = expected_rows(&x, key, 0, T, E);
      tu_assert_bitwise("fixture: hidden_states[l+1] == layer_out[l]", hs, ref, T * E);
      tu_free(ref), tu_free(hs);
    }
  }
  char key[64];
  snprintf(key, sizeof key, "hidden_states.%d", m->cfg.n_layers); /* after the final norm */
  float *ref = expected_rows(&x, key, 0, T, E);
  snprintf(what, sizeof what, "%s final hidden (after the final norm)", name);
  fixture_close(what, o.final_h, ref, T * E, T + m->cfg.head_dim);
  tu_free(ref);
  ref = expected_rows(&x, "logits", 0, T, V);
  snprintf(what, sizeof what, "%s logits", name);
  fixture_close(what, o.logits, ref, T * V, T + m->cfg.head_dim);
  tu_free(ref);
  tu_free(o.layer_out), tu_free(o.final_h), tu_free(o.logits);
  expected_close(&x);
  apb_model_free(m);
  free(d);
}
END_TEST

/* The fused layout against the raw tensors of the checkpoint: wqkv rows are q, then k, then v (and
 * bqkv likewise); w_gate_up rows are gate, then up. */
START_TEST(fused_layout) {
  static const char *const dirs[] = {"qwen2_tied", "llama3_rope"};
  for (int k = 0; k < 2; k++) {
    apb_error err = {0};
    char *d = fixture(dirs[k]), *p = path2(d, "model.safetensors");
    apb_model *m;
    expect_ok(d, apb_model_load(d, NULL, &m, &err), &err);
    apb_st_file *f;
    expect_ok(p, apb_st_open(p, &f, &err), &err);
    const apb_model_config *c = &m->cfg;
    const int64_t E = c->hidden, F = c->ffn, QD = (int64_t)c->n_heads * c->head_dim,
                  KD = (int64_t)c->n_kv_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
      static const char *const parts[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                          "mlp.up_proj"};
      const int64_t row0[] = {0, QD, QD + KD, 0, F}, rows[] = {QD, KD, KD, F, F};
      for (int i = 0; i < 5; i++) {
        for (int bias = 0; bias < 2; bias++) {
          if (bias && (i >= 3 || !c->qkv_bias)) continue;
          char name[128];
          snprintf(name, sizeof name, "model.layers.%d.%s.%s", l, parts[i], bias ? "bias" : "weight");
          const apb_st_tensor *t = apb_st_find(f, name);
          ck_assert_msg(t != NULL, "%s: no %s", p, name);
          int64_t n = apb_st_numel(t);
          float *raw = tu_alloc((size_t)n);
          expect_ok(name, apb_st_read_f32(f, t, raw, &err), &err);
          const float *fused =
              bias ? m->layers[l].bqkv + row0[i] : (i < 3 ? m->layers[l].wqkv : m->layers[l].w_gate_up) + row0[i] * E;
          ck_assert_int_eq(n, rows[i] * (bias ? 1 : E));
          tu_assert_bitwise(name, fused, raw, n);
          tu_free(raw);
        }
      }
    }
    if (c->tie_embeddings) ck_assert_ptr_eq(m->lm_head, m->embed);
    apb_st_close(f);
    apb_model_free(m);
    free(d), free(p);
  }
}
END_TEST

/* ---------------------------------------------------------------- models made here */

/* A small Llama with every optional tensor (all biases) and retaining heads; D 6 so that wo [E, Hq D]
 * = [16, 24] is not square. Filled from the test seed. */
static apb_model *hand_model(int tied) {
  apb_model_config c;
  memset(&c, 0, sizeof c);
  strcpy(c.arch, "LlamaForCausalLM");
  c.n_layers = 2, c.hidden = 16, c.ffn = 24, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 6, c.vocab = 32;
  c.rms_eps = 1e-5, c.max_pos = 4096, c.tie_embeddings = tied;
  c.qkv_bias = c.o_bias = c.mlp_bias = 1;
  c.rope = (apb_rope){.type = APB_ROPE_LINEAR, .theta = 10000.0, .factor = 2.0};
  apb_model *m;
  apb_error err = {0};
  expect_ok("apb_model_create", apb_model_create(&c, 8, &m, &err), &err);
  ck_assert_ptr_nonnull(m->priv);
  /* fill every float of the arena through the model's own pointers */
  int64_t total = apb_model_param_count(&c, 8);
  float *base = (float *)(uintptr_t)m->embed;
  tu_fill(base, (size_t)total, tu_seed(), 77, 1.0f);
  return m;
}

/* A named tensor of a model directory: what the tests below write and break. */
typedef struct wt {
  char name[128];
  apb_dtype dtype;
  int ndim;
  int64_t shape[2];
  const void *data;
} wt;

/* The HF tensors of m, in our own spelling of the names (independent of apb_model_save). */
static int model_tensors(const apb_model *m, wt *w, int heads) {
  const apb_model_config *c = &m->cfg;
  const int64_t E = c->hidden, F = c->ffn, QD = (int64_t)c->n_heads * c->head_dim,
                KD = (int64_t)c->n_kv_heads * c->head_dim;
  int n = 0;
#define PUT(nm, p, d0, d1)                                                       \
  do {                                                                           \
    snprintf(w[n].name, sizeof w[n].name, "%s", nm);                             \
    w[n].dtype = APB_DT_F32, w[n].ndim = (d1) < 0 ? 1 : 2, w[n].shape[0] = (d0); \
    w[n].shape[1] = (d1) < 0 ? 0 : (d1), w[n].data = (p);                        \
    n++;                                                                         \
  } while (0)
  char nm[128];
  if (!heads) {
    PUT("model.embed_tokens.weight", m->embed, c->vocab, E);
    PUT("model.norm.weight", m->final_norm, E, -1);
    if (!c->tie_embeddings) PUT("lm_head.weight", m->lm_head, c->vocab, E);
  }
  for (int l = 0; l < c->n_layers; l++) {
    const apb_layer *y = &m->layers[l];
#define L_(fmt) (snprintf(nm, sizeof nm, "model.layers.%d." fmt, l), nm)
    if (heads) {
      PUT(L_("self_attn.fc1.weight"), y->fc1, m->scorer_width, QD + 2 * KD);
      PUT(L_("self_attn.fc2.weight"), y->fc2, c->n_kv_heads, m->scorer_width);
      continue;
    }
    PUT(L_("input_layernorm.weight"), y->attn_norm, E, -1);
    PUT(L_("self_attn.q_proj.weight"), y->wqkv, QD, E);
    PUT(L_("self_attn.k_proj.weight"), y->wqkv + QD * E, KD, E);
    PUT(L_("self_attn.v_proj.weight"), y->wqkv + (QD + KD) * E, KD, E);
    if (c->qkv_bias) {
      PUT(L_("self_attn.q_proj.bias"), y->bqkv, QD, -1);
      PUT(L_("self_attn.k_proj.bias"), y->bqkv + QD, KD, -1);
      PUT(L_("self_attn.v_proj.bias"), y->bqkv + QD + KD, KD, -1);
    }
    PUT(L_("self_attn.o_proj.weight"), y->wo, E, QD);
    if (c->o_bias) PUT(L_("self_attn.o_proj.bias"), y->bo, E, -1);
    PUT(L_("post_attention_layernorm.weight"), y->ffn_norm, E, -1);
    PUT(L_("mlp.gate_proj.weight"), y->w_gate_up, F, E);
    PUT(L_("mlp.up_proj.weight"), y->w_gate_up + F * E, F, E);
    PUT(L_("mlp.down_proj.weight"), y->w_down, E, F);
    if (c->mlp_bias) {
      PUT(L_("mlp.gate_proj.bias"), y->b_gate_up, F, -1);
      PUT(L_("mlp.up_proj.bias"), y->b_gate_up + F, F, -1);
      PUT(L_("mlp.down_proj.bias"), y->b_down, E, -1);
    }
#undef L_
  }
#undef PUT
  return n;
}

static int find_wt(const wt *w, int n, const char *name) {
  for (int i = 0; i < n; i++)
    if (strcmp(w[i].name, name) == 0) return i;
  ck_abort_msg("test bug: no tensor %s", name);
  return -1;
}

static void write_wt(const char *path, const wt *w, int n) {
  apb_st_entry *e = calloc((size_t)n, sizeof *e);
  ck_assert(e != NULL);
  for (int i = 0; i < n; i++) {
    e[i].name = w[i].name, e[i].dtype = w[i].dtype, e[i].ndim = w[i].ndim, e[i].data = w[i].data;
    e[i].shape[0] = w[i].shape[0], e[i].shape[1] = w[i].shape[1];
  }
  apb_error err = {0};
  expect_ok(path, apb_st_write(path, n, e, 0, NULL, NULL, &err), &err);
  free(e);
}

/* Write tensors [0, split) to shard 1 and the rest to shard 2, with an index naming them. */
static void write_sharded(const char *dir, const wt *w, int n, int split) {
  char *s1 = path2(dir, "model-00001-of-00002.safetensors"), *s2 = path2(dir, "model-00002-of-00002.safetensors");
  write_wt(s1, w, split);
  write_wt(s2, w + split, n - split);
  json_t *wm = json_object();
  for (int i = 0; i < n; i++)
    json_object_set_new(
        wm, w[i].name,
        json_string(i < split ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors"));
  json_t *root = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", wm);
  char *ip = path2(dir, "model.safetensors.index.json");
  ck_assert(json_dump_file(root, ip, JSON_INDENT(1)) == 0);
  json_decref(root);
  free(s1), free(s2), free(ip);
}

static void assert_models_equal(const char *what, const apb_model *a, const apb_model *b, int bf16) {
  cfg_assert_eq(what, &a->cfg, &b->cfg);
  ck_assert_int_eq(a->scorer_width, b->scorer_width);
  wt *wa = malloc(sizeof(wt) * 512), *wb = malloc(sizeof(wt) * 512);
  ck_assert(wa && wb);
  for (int heads = 0; heads < 2; heads++) {
    if (heads && a->scorer_width == 0) continue;
    int na = model_tensors(a, wa, heads), nb = model_tensors(b, wb, heads);
    ck_assert_int_eq(na, nb);
    for (int i = 0; i < na; i++) {
      int64_t n = wa[i].shape[0] * (wa[i].ndim == 2 ? wa[i].shape[1] : 1);
      char msg[200];
      snprintf(msg, sizeof msg, "%s: %s", what, wa[i].name);
      if (!bf16) {
        tu_assert_bitwise(msg, wb[i].data, wa[i].data, n);
      } else {
        float *r = malloc(sizeof(float) * (size_t)n);
        ck_assert(r != NULL);
        memcpy(r, wa[i].data, sizeof(float) * (size_t)n);
        apb_bf16_round_array(r, (size_t)n);
        tu_assert_bitwise(msg, wb[i].data, r, n);
        free(r);
      }
    }
  }
  if (a->cfg.tie_embeddings) ck_assert_ptr_eq(b->lm_head, b->embed);
  free(wa), free(wb);
}

static apb_model *save_load(const apb_model *m, const char *dir, int bf16, int with_heads) {
  apb_error err = {0};
  expect_ok("save", apb_model_save(m, dir, bf16, &err), &err);
  char *hp = path2(dir, APB_HEADS_FILE);
  apb_model *b;
  expect_ok("load back", apb_model_load(dir, with_heads ? hp : NULL, &b, &err), &err);
  free(hp);
  return b;
}

START_TEST(round_trip_generated) {
  apb_error err = {0};
  apb_model *m;
  expect_ok("generate tiny", apb_model_generate(APB_PRESET_TINY, tu_seed(), &m, &err), &err);
  for (int bf16 = 0; bf16 < 2; bf16++) {
    char *d = make_tmpdir();
    apb_model *b = save_load(m, d, bf16, 1);
    assert_models_equal(bf16 ? "tiny BF16 round trip" : "tiny F32 round trip", m, b, bf16);
    /* the dtype on disk is what was asked for */
    char *p = path2(d, "model.safetensors");
    apb_st_file *f;
    expect_ok(p, apb_st_open(p, &f, &err), &err);
    ck_assert_int_eq(apb_st_find(f, "model.layers.1.mlp.up_proj.weight")->dtype, bf16 ? APB_DT_BF16 : APB_DT_F32);
    ck_assert_ptr_null(apb_st_find(f, "model.layers.0.self_attn.q_proj.bias"));
    apb_st_close(f);
    free(p);
    apb_model_free(b);
    rm_dir(d);
  }
  apb_model_free(m);
}
END_TEST

START_TEST(round_trip_biases) {
  for (int tied = 0; tied < 2; tied++) {
    apb_model *m = hand_model(tied);
    char *d = make_tmpdir();
    apb_model *b = save_load(m, d, 0, 1);
    assert_models_equal(tied ? "biases, tied" : "biases", m, b, 0);
    apb_model_free(b);
    rm_dir(d);
    apb_model_free(m);
  }
  /* a Qwen2 model: q/k/v biases only */
  apb_model *src = hand_model(1);
  apb_model_config c = src->cfg;
  strcpy(c.arch, "Qwen2ForCausalLM");
  c.o_bias = c.mlp_bias = 0;
  apb_error err = {0};
  apb_model *q;
  expect_ok("create qwen2", apb_model_create(&c, 0, &q, &err), &err);
  tu_fill((float *)(uintptr_t)q->embed, (size_t)apb_model_param_count(&c, 0), tu_seed(), 78, 1.0f);
  char *d = make_tmpdir();
  apb_model *b = save_load(q, d, 0, 0);
  assert_models_equal("qwen2", q, b, 0);
  ck_assert_int_eq(b->scorer_width, 0);
  ck_assert_ptr_null(b->layers[0].fc1);
  apb_model_free(b);
  rm_dir(d);
  /* a configuration config.json cannot express */
  c.mlp_bias = 1;
  apb_model *bad;
  expect_ok("create", apb_model_create(&c, 0, &bad, &err), &err);
  d = make_tmpdir();
  expect_err("unsaveable", apb_model_save(bad, d, 0, &err), &err, APB_EINVAL, "Qwen2 has q/k/v biases");
  rm_dir(d);
  apb_model_free(bad);
  apb_model_free(q);
  apb_model_free(src);
}
END_TEST

/* Sharded loading, and F16/BF16 tensors widened. */
START_TEST(sharded_and_widened) {
  apb_model *m = hand_model(0);
  wt w[128];
  int n = model_tensors(m, w, 0);
  char *d = make_tmpdir();
  apb_error err = {0};
  expect_ok("save", apb_model_save(m, d, 0, &err), &err); /* for config.json */
  char *single = path2(d, "model.safetensors");
  ck_assert(unlink(single) == 0);
  /* two tensors stored as F16 and BF16: the loader widens them */
  int iq = find_wt(w, n, "model.layers.0.self_attn.k_proj.weight"),
      io = find_wt(w, n, "model.layers.1.self_attn.o_proj.weight");
  int64_t nq = w[iq].shape[0] * w[iq].shape[1], no = w[io].shape[0] * w[io].shape[1];
  uint16_t *h16 = malloc(2 * (size_t)nq), *b16 = malloc(2 * (size_t)no);
  ck_assert(h16 && b16);
  apb_from_f32(h16, APB_DT_F16, w[iq].data, (size_t)nq);
  apb_from_f32(b16, APB_DT_BF16, w[io].data, (size_t)no);
  w[iq].dtype = APB_DT_F16, w[iq].data = h16;
  w[io].dtype = APB_DT_BF16, w[io].data = b16;
  write_sharded(d, w, n, n / 2);
  char *hp = path2(d, APB_HEADS_FILE);
  apb_model *b;
  expect_ok("sharded load", apb_model_load(d, hp, &b, &err), &err);
  const int64_t E = m->cfg.hidden, QD = (int64_t)m->cfg.n_heads * m->cfg.head_dim;
  float *want = malloc(sizeof(float) * (size_t)(nq > no ? nq : no));
  ck_assert(want != NULL);
  apb_to_f32(want, h16, APB_DT_F16, (size_t)nq);
  tu_assert_bitwise("F16 k_proj widened", b->layers[0].wqkv + QD * E, want, nq);
  apb_to_f32(want, b16, APB_DT_BF16, (size_t)no);
  tu_assert_bitwise("BF16 o_proj widened", b->layers[1].wo, want, no);
  tu_assert_bitwise("F32 q_proj", b->layers[0].wqkv, m->layers[0].wqkv, QD * E);
  tu_assert_bitwise("embed", b->embed, m->embed, (int64_t)m->cfg.vocab * E);
  tu_assert_bitwise("fc2", b->layers[1].fc2, m->layers[1].fc2, (int64_t)m->cfg.n_kv_heads * b->scorer_width);
  apb_model_free(b);
  /* with model.safetensors present too, it wins over the index */
  expect_ok("save again", apb_model_save(m, d, 0, &err), &err);
  expect_ok("single wins", apb_model_load(d, NULL, &b, &err), &err);
  tu_assert_bitwise("k_proj from model.safetensors", b->layers[0].wqkv + QD * E, m->layers[0].wqkv + QD * E, nq);
  apb_model_free(b);
  free(want), free(h16), free(b16), free(hp), free(single);
  rm_dir(d);
  apb_model_free(m);
}
END_TEST

/* ---------------------------------------------------------------- loader errors (a sweep) */

enum {
  LE_MISSING_TENSOR,
  LE_MISSING_BIAS,
  LE_MISSING_LM_HEAD,
  LE_WRONG_SHAPE,
  LE_WRONG_RANK,
  LE_WRONG_DTYPE,
  LE_TRUNCATED,
  LE_NO_CONFIG,
  LE_BAD_CONFIG,
  LE_NO_WEIGHTS,
  LE_INDEX_MISSING_SHARD,
  LE_INDEX_WRONG_SHARD,
  LE_INDEX_NO_ENTRY,
  LE_INDEX_BAD_NAME,
  LE_INDEX_MALFORMED,
  LE_HEADS_MISSING_LAYER,
  LE_HEADS_WRONG_SHAPE,
  LE_HEADS_WIDTH_CHANGES,
  LE_HEADS_NO_FILE,
  LE_EXTRA_IGNORED,
  LE_COUNT
};

START_TEST(loader_errors) {
  apb_model *m = hand_model(0);
  wt w[128], h[16];
  int n = model_tensors(m, w, 0), nh = model_tensors(m, h, 1);
  char *d = make_tmpdir(), *wp = path2(d, "model.safetensors"), *cp = path2(d, "config.json"),
       *hp = path2(d, APB_HEADS_FILE), *ip = path2(d, "model.safetensors.index.json");
  apb_error err = {0};
  expect_ok("save", apb_model_save(m, d, 0, &err), &err);
  int32_t ints[64] = {0};
  float big[64 * 64] = {0};
  apb_status code = APB_OK;
  const char *needle = NULL;
  const char *heads = NULL;
  switch (_i) {
  case LE_MISSING_TENSOR: {
    int k = find_wt(w, n, "model.layers.1.self_attn.k_proj.weight");
    w[k] = w[--n];
    write_wt(wp, w, n);
    code = APB_ENOTFOUND, needle = "no tensor 'model.layers.1.self_attn.k_proj.weight'";
    break;
  }
  case LE_MISSING_BIAS: {
    int k = find_wt(w, n, "model.layers.1.mlp.down_proj.bias");
    w[k] = w[--n];
    write_wt(wp, w, n);
    code = APB_ENOTFOUND, needle = "'model.layers.1.mlp.down_proj.bias'";
    break;
  }
  case LE_MISSING_LM_HEAD: {
    int k = find_wt(w, n, "lm_head.weight");
    w[k] = w[--n];
    write_wt(wp, w, n);
    code = APB_ENOTFOUND, needle = "'lm_head.weight'";
    break;
  }
  case LE_WRONG_SHAPE: { /* o_proj transposed: [Hq D, E] = [24, 16] instead of [16, 24] */
    int k = find_wt(w, n, "model.layers.0.self_attn.o_proj.weight");
    int64_t t = w[k].shape[0];
    w[k].shape[0] = w[k].shape[1], w[k].shape[1] = t;
    write_wt(wp, w, n);
    code = APB_EFORMAT, needle = "'model.layers.0.self_attn.o_proj.weight' has shape [24, 16], expected [16, 24]";
    break;
  }
  case LE_WRONG_RANK: {
    int k = find_wt(w, n, "model.layers.1.post_attention_layernorm.weight");
    w[k].ndim = 2, w[k].shape[0] = 1, w[k].shape[1] = 16;
    write_wt(wp, w, n);
    code = APB_EFORMAT, needle = "'model.layers.1.post_attention_layernorm.weight' has shape [1, 16] (rank 2)";
    break;
  }
  case LE_WRONG_DTYPE: {
    int k = find_wt(w, n, "model.norm.weight");
    w[k].dtype = APB_DT_I32, w[k].data = ints;
    write_wt(wp, w, n);
    code = APB_EUNSUPPORTED, needle = "'model.norm.weight' has dtype I32";
    break;
  }
  case LE_TRUNCATED:
    ck_assert(truncate(wp, 4000) == 0);
    code = APB_EFORMAT, needle = "model.safetensors";
    break;
  case LE_NO_CONFIG:
    ck_assert(unlink(cp) == 0);
    code = APB_ENOTFOUND, needle = "config.json: cannot open";
    break;
  case LE_BAD_CONFIG:
    spit(cp, "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 16,");
    code = APB_EFORMAT, needle = "config.json: not valid JSON";
    break;
  case LE_NO_WEIGHTS:
    ck_assert(unlink(wp) == 0);
    code = APB_ENOTFOUND, needle = "no model.safetensors and no model.safetensors.index.json";
    break;
  case LE_INDEX_MISSING_SHARD: {
    ck_assert(unlink(wp) == 0);
    write_sharded(d, w, n, 10);
    char *s2 = path2(d, "model-00002-of-00002.safetensors");
    ck_assert(unlink(s2) == 0);
    free(s2);
    code = APB_ENOTFOUND, needle = "shard \"model-00002-of-00002.safetensors\"";
    break;
  }
  case LE_INDEX_WRONG_SHARD: { /* the index says shard 1, the tensor is in shard 2 */
    ck_assert(unlink(wp) == 0);
    write_sharded(d, w, n, 10);
    json_error_t je;
    json_t *root = json_load_file(ip, 0, &je);
    json_object_set_new(json_object_get(root, "weight_map"), w[20].name,
                        json_string("model-00001-of-00002.safetensors"));
    ck_assert(json_dump_file(root, ip, 0) == 0);
    json_decref(root);
    code = APB_EFORMAT, needle = "which has no such tensor";
    break;
  }
  case LE_INDEX_NO_ENTRY: {
    ck_assert(unlink(wp) == 0);
    write_sharded(d, w, n, 10);
    json_error_t je;
    json_t *root = json_load_file(ip, 0, &je);
    json_object_del(json_object_get(root, "weight_map"), "model.layers.0.mlp.up_proj.weight");
    ck_assert(json_dump_file(root, ip, 0) == 0);
    json_decref(root);
    code = APB_ENOTFOUND, needle = "weight_map has no tensor 'model.layers.0.mlp.up_proj.weight'";
    break;
  }
  case LE_INDEX_BAD_NAME:
    ck_assert(unlink(wp) == 0);
    spit(ip, "{\"weight_map\": {\"model.norm.weight\": \"../elsewhere.safetensors\"}}");
    code = APB_EFORMAT, needle = "expected a file name in the same directory";
    break;
  case LE_INDEX_MALFORMED:
    ck_assert(unlink(wp) == 0);
    spit(ip, "{\"metadata\": {}}");
    code = APB_EFORMAT, needle = "no \"weight_map\" object";
    break;
  case LE_HEADS_MISSING_LAYER: {
    int k = find_wt(h, nh, "model.layers.1.self_attn.fc1.weight");
    h[k] = h[--nh];
    write_wt(hp, h, nh);
    heads = hp, code = APB_ENOTFOUND, needle = "no tensor 'model.layers.1.self_attn.fc1.weight'";
    break;
  }
  case LE_HEADS_WRONG_SHAPE: {
    int k = find_wt(h, nh, "model.layers.0.self_attn.fc2.weight");
    h[k].shape[0] = 3, h[k].data = big; /* Hkv is 2 */
    write_wt(hp, h, nh);
    heads = hp, code = APB_EFORMAT,
    needle = "'model.layers.0.self_attn.fc2.weight' has shape [3, 8], expected [2, 8]";
    break;
  }
  case LE_HEADS_WIDTH_CHANGES: {
    int k = find_wt(h, nh, "model.layers.1.self_attn.fc1.weight");
    h[k].shape[0] = 9, h[k].data = big;
    write_wt(hp, h, nh);
    heads = hp, code = APB_EFORMAT,
    needle = "'model.layers.1.self_attn.fc1.weight' has shape [9, 48], expected [8, 48]";
    break;
  }
  case LE_HEADS_NO_FILE:
    heads = "/nonexistent/heads.safetensors", code = APB_EIO,
    needle = "retaining heads: /nonexistent/heads.safetensors";
    break;
  case LE_EXTRA_IGNORED: { /* an unexpected tensor is not an error */
    snprintf(w[n].name, sizeof w[n].name, "model.layers.0.self_attn.rotary_emb.inv_freq");
    w[n].dtype = APB_DT_F32, w[n].ndim = 1, w[n].shape[0] = 3, w[n].data = big;
    n++;
    write_wt(wp, w, n);
    heads = hp;
    break;
  }
  }
  static apb_model sentinel;
  apb_model *b = &sentinel; /* must be set to NULL on failure */
  apb_status st = apb_model_load(d, heads, &b, &err);
  char what[64];
  snprintf(what, sizeof what, "loader case %d", _i);
  if (code == APB_OK) {
    expect_ok(what, st, &err);
    assert_models_equal(what, m, b, 0);
    apb_model_free(b);
  } else {
    expect_err(what, st, &err, code, needle);
    ck_assert_msg(b == NULL, "%s: output not cleared on failure", what);
  }
  free(wp), free(cp), free(hp), free(ip);
  rm_dir(d);
  apb_model_free(m);
}
END_TEST

/* ---------------------------------------------------------------- presets */

START_TEST(preset_shapes) {
  apb_preset p;
  ck_assert_int_eq(apb_preset_parse("tiny", &p), 0);
  ck_assert_int_eq(p, APB_PRESET_TINY);
  ck_assert_int_eq(apb_preset_parse("llama3-8b-shape", &p), 0);
  ck_assert_int_eq(p, APB_PRESET_LLAMA3_8B);
  ck_assert_int_eq(apb_preset_parse("huge", &p), -1);
  ck_assert_int_eq(apb_preset_parse(NULL, &p), -1);
  ck_assert_str_eq(apb_preset_name(APB_PRESET_SMALL), "small");
  ck_assert_str_eq(apb_preset_name(APB_PRESET_COUNT), "?");
  apb_model_config c;
  int I;
  apb_preset_config(APB_PRESET_TINY, &c, &I);
  ck_assert(c.n_layers == 2 && c.hidden == 256 && c.n_heads == 4 && c.n_kv_heads == 2 && c.head_dim == 64);
  ck_assert(c.ffn == 1024 && c.vocab == 4096 && I == 128);
  apb_preset_config(APB_PRESET_SMALL, &c, &I);
  ck_assert(c.n_layers == 4 && c.hidden == 512 && c.n_heads == 8 && c.n_kv_heads == 2 && c.head_dim == 64);
  ck_assert(c.ffn == 2048 && c.vocab == 8192 && I == 256);
  apb_preset_config(APB_PRESET_LLAMA3_8B, &c, &I);
  ck_assert(c.n_layers == 32 && c.hidden == 4096 && c.n_heads == 32 && c.n_kv_heads == 8 && c.head_dim == 128);
  ck_assert(c.ffn == 14336 && c.vocab == 128256 && I == 1024 && c.rms_eps == 1e-5 && !c.tie_embeddings);
  ck_assert(c.rope.type == APB_ROPE_LLAMA3 && c.rope.theta == 500000.0 && c.rope.factor == 8.0);
  ck_assert(c.rope.low_freq_factor == 1.0 && c.rope.high_freq_factor == 4.0 && c.rope.original_max_pos == 8192);
  /* Llama-3.1-8B's published parameter count; the retaining heads add L (I (Hq+2Hkv) D + Hkv I) */
  ck_assert_int_eq(apb_model_param_count(&c, 0), INT64_C(8030261248));
  ck_assert_int_eq(apb_model_param_count(&c, I) - apb_model_param_count(&c, 0),
                   INT64_C(32) * (1024 * 6144 + 8 * 1024));
  /* sizes whose count overflows int64 (or is not positive): -1 and APB_ENOMEM, never a wrapped count */
  apb_model_config huge = c;
  huge.n_layers = huge.hidden = huge.ffn = huge.n_heads = huge.n_kv_heads = huge.head_dim = huge.vocab = INT_MAX;
  ck_assert_int_eq(apb_model_param_count(&huge, INT_MAX), -1);
  apb_model *m = NULL;
  apb_error err = {0};
  ck_assert_int_eq(apb_model_create(&huge, 0, &m, &err), APB_ENOMEM);
  ck_assert_msg(m == NULL && strstr(err.msg, "2^62"), "%s", err.msg);
  huge = c, huge.hidden = -4;
  ck_assert_int_eq(apb_model_param_count(&huge, 0), -1);
}
END_TEST

START_TEST(preset_deterministic) {
  apb_error err = {0};
  apb_model *a, *b, *c;
  int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  expect_ok("one thread", apb_model_generate(APB_PRESET_TINY, 42, &a, &err), &err);
  omp_set_num_threads(threads > 1 ? threads : 2);
  expect_ok("threads", apb_model_generate(APB_PRESET_TINY, 42, &b, &err), &err);
  omp_set_num_threads(threads);
  expect_ok("seed 43", apb_model_generate(APB_PRESET_TINY, 43, &c, &err), &err);
  assert_models_equal("same seed, different thread counts", a, b, 0);
  int64_t n = (int64_t)a->cfg.vocab * a->cfg.hidden, same = 0;
  for (int64_t i = 0; i < n; i++) same += a->embed[i] == c->embed[i];
  ck_assert_msg(same < n / 100, "seeds 42 and 43 give %lld equal embedding values of %lld", (long long)same,
                (long long)n);
  ck_assert_int_eq(a->scorer_width, 128);
  apb_model_free(a), apb_model_free(b), apb_model_free(c);
}
END_TEST

/* Activations stay in a realistic range through every layer and retaining scores vary. */
START_TEST(preset_activations) {
  const apb_preset p = _i ? APB_PRESET_SMALL : APB_PRESET_TINY;
  apb_error err = {0};
  apb_model *m;
  expect_ok("generate", apb_model_generate(p, tu_seed(), &m, &err), &err);
  const apb_model_config *c = &m->cfg;
  const int64_t T = 96, E = c->hidden;
  /* distinct tokens: in layer 0 a score depends on the token alone, so a repeated token would
   * repeat its score */
  int32_t ids[96];
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + 5);
  int64_t start = (int64_t)apb_rng_below(&r, (uint64_t)c->vocab);
  for (int i = 0; i < T; i++) ids[i] = (int32_t)((start + 37 * i) % c->vocab);
  fprintf(stderr, "%s: tokens %lld + 37 i (mod %d), seed %llu\n", apb_preset_name(p), (long long)start, c->vocab,
          (unsigned long long)tu_seed());
  fwd o = {tu_alloc((size_t)(c->n_layers * T * E)), tu_alloc((size_t)(T * E)), tu_alloc((size_t)c->vocab),
           tu_alloc((size_t)(c->n_layers * c->n_kv_heads * T))};
  ref_forward(m, ids, T, 0, &o);
  for (int l = 0; l < c->n_layers; l++) {
    double ss = 0;
    for (int64_t i = 0; i < T * E; i++) ss += (double)o.layer_out[l * T * E + i] * o.layer_out[l * T * E + i];
    double rms = sqrt(ss / (double)(T * E));
    fprintf(stderr, "%s layer %d: hidden RMS %.3f\n", apb_preset_name(p), l, rms);
    ck_assert_msg(rms > 0.7 && rms < 2.0, "%s layer %d: hidden-state RMS %.3f outside [0.7, 2]", apb_preset_name(p),
                  l, rms);
    for (int k = 0; k < c->n_kv_heads; k++) {
      const float *s = o.scores + ((int64_t)l * c->n_kv_heads + k) * T;
      double mean = 0, var = 0;
      for (int t = 0; t < T; t++) mean += s[t];
      mean /= (double)T;
      for (int t = 0; t < T; t++) var += (s[t] - mean) * (s[t] - mean);
      double sd = sqrt(var / (double)T);
      int distinct = 0;
      for (int t = 0; t < T; t++) {
        int dup = 0;
        for (int u = 0; u < t && !dup; u++) dup = s[u] == s[t];
        distinct += !dup;
      }
      ck_assert_msg(sd > 0.1 && distinct == T,
                    "%s layer %d KV head %d: retaining scores degenerate (std %.3g, %d distinct of %lld)",
                    apb_preset_name(p), l, k, sd, distinct, (long long)T);
    }
  }
  double ss = 0;
  for (int v = 0; v < c->vocab; v++) ss += (double)o.logits[v] * o.logits[v];
  double lrms = sqrt(ss / c->vocab);
  ck_assert_msg(lrms > 0.3 && lrms < 3.0, "logit RMS %.3f outside [0.3, 3]", lrms);
  tu_free(o.layer_out), tu_free(o.final_h), tu_free(o.logits), tu_free(o.scores);
  apb_model_free(m);
}
END_TEST

/* ---------------------------------------------------------------- gen-model (the command) */

START_TEST(cmd_gen_model) {
  const char *bin = tu_apb_bin();
  char *out = NULL, cmd[1024];
  snprintf(cmd, sizeof cmd, "'%s' gen-model --help", bin);
  int rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0 && strstr(out, "--preset"),
                "`apb gen-model --help` exited %d (is cmd_gen_model in the command table of src/apb.c?): %s", rc,
                out);
  ck_assert_msg(strstr(out, "default 1") != NULL, "--help does not state the seed default: %s", out);
  free(out);
  snprintf(cmd, sizeof cmd, "'%s' gen-model --out /tmp/x", bin);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 2 && strstr(out, "apb gen-model: --preset is required"), "missing --preset: rc %d: %s", rc,
                out);
  free(out);
  snprintf(cmd, sizeof cmd, "'%s' gen-model --preset huge --out /tmp/x", bin);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 2 && strstr(out, "apb gen-model:") && strstr(out, "huge"), "bad preset: rc %d: %s", rc, out);
  free(out);
  snprintf(cmd, sizeof cmd, "'%s' gen-model --preset tiny", bin);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 2 && strstr(out, "--out is required"), "missing --out: rc %d: %s", rc, out);
  free(out);
  snprintf(cmd, sizeof cmd, "'%s' gen-model --preset tiny --out /nonexistent/a/b", bin);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 1 && strstr(out, "apb gen-model: /nonexistent/a/b"), "unwritable: rc %d: %s", rc, out);
  free(out);

  for (int bf16 = 0; bf16 < 2; bf16++) {
    char *d = make_tmpdir();
    snprintf(cmd, sizeof cmd, "'%s' gen-model --preset tiny --seed 7 %s --out '%s'", bin, bf16 ? "--dtype bf16" : "",
             d);
    rc = tu_sh(cmd, &out);
    ck_assert_msg(rc == 0, "%s: rc %d: %s", cmd, rc, out);
    free(out);
    apb_error err = {0};
    apb_model *m, *b;
    expect_ok("generate", apb_model_generate(APB_PRESET_TINY, 7, &m, &err), &err);
    char *hp = path2(d, APB_HEADS_FILE);
    expect_ok("load gen-model output", apb_model_load(d, hp, &b, &err), &err);
    assert_models_equal("gen-model output", m, b, bf16);
    free(hp);
    apb_model_free(m), apb_model_free(b);
    rm_dir(d);
  }

  /* sizes changed from the preset's: the files hold what apb_model_generate_config makes of that
   * configuration; without retaining heads, an earlier model's heads file in DIR is removed */
  char *d = make_tmpdir();
  snprintf(cmd, sizeof cmd, "'%s' gen-model --preset tiny --out '%s'", bin, d);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0, "%s: rc %d: %s", cmd, rc, out);
  free(out);
  snprintf(cmd, sizeof cmd,
           "'%s' gen-model --preset tiny --seed 3 --layers 3 --hidden 128 --ffn 96 --q-heads 8 --kv-heads 4 "
           "--head-dim 16 --vocab 300 --scorer-width 0 --out '%s'", bin, d);
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0 && strstr(out, "layers 3, hidden 128, ffn 96, q-heads 8, kv-heads 4, head-dim 16, vocab 300, "
                                       "scorer-width 0") && strstr(out, "no retaining heads"),
                "%s: rc %d: %s", cmd, rc, out);
  free(out);
  {
    apb_error err = {0};
    apb_model_config c;
    int I;
    apb_preset_config(APB_PRESET_TINY, &c, &I);
    c.n_layers = 3, c.hidden = 128, c.ffn = 96, c.n_heads = 8, c.n_kv_heads = 4, c.head_dim = 16, c.vocab = 300;
    apb_model *m, *b;
    expect_ok("generate_config", apb_model_generate_config(&c, 0, 3, &m, &err), &err);
    expect_ok("load gen-model output with sizes", apb_model_load(d, NULL, &b, &err), &err);
    assert_models_equal("gen-model output with sizes", m, b, 0);
    apb_model_free(m), apb_model_free(b);
    char *hp = path2(d, APB_HEADS_FILE);
    ck_assert_msg(access(hp, F_OK) != 0, "%s: the earlier model's retaining heads are still there", hp);
    free(hp);
  }
  rm_dir(d);
  const char *bad[][2] = {{"--kv-heads 3", "4 query heads are not a multiple of 3 KV heads"},
                          {"--head-dim 7", "head dimension 7 is odd"},
                          {"--vocab 0", "--vocab wants an integer in [1,"},
                          {"--hidden 2000000", "hidden size (hidden_size) is 2000000; apb takes 1 to 1048576"},
                          {"--scorer-width -1", "--scorer-width wants an integer in [0,"}};
  for (int i = 0; i < 5; i++) {
    snprintf(cmd, sizeof cmd, "'%s' gen-model --preset tiny %s --out /tmp/never-written", bin, bad[i][0]);
    rc = tu_sh(cmd, &out);
    ck_assert_msg(rc == 2 && strstr(out, bad[i][1]), "%s: rc %d, expected 2 and '%s': %s", cmd, rc, bad[i][1], out);
    free(out);
  }
}
END_TEST

/* apb_config_check: what apb_config_parse accepts and refuses, for a configuration made in code */
START_TEST(config_check) {
  apb_error err = {0};
  apb_model_config c;
  int I;
  for (int p = 0; p < APB_PRESET_COUNT; p++) {
    apb_preset_config((apb_preset)p, &c, &I);
    expect_ok("a preset's configuration", apb_config_check(&c, &err), &err);
  }
  apb_model_config b;
  apb_preset_config(APB_PRESET_TINY, &b, &I);
  c = b, c.n_layers = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "layers (num_hidden_layers) is 0"), "%s", err.msg);
  c = b, c.n_kv_heads = 3;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "not a multiple of 3 KV heads"), "%s", err.msg);
  c = b, c.head_dim = 63;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EUNSUPPORTED);
  ck_assert_msg(strstr(err.msg, "odd"), "%s", err.msg);
  c = b, c.n_heads = 4096, c.n_kv_heads = 4096, c.head_dim = 4096;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EUNSUPPORTED);
  c = b, c.rms_eps = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  c = b, c.rms_eps = NAN;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  c = b, c.vocab = -5;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  c = b, c.vocab = (1 << 24) + 1; /* above the limit: unsupported, as the parser says */
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EUNSUPPORTED);
  /* RoPE and architecture: what the parser refuses (a zero theta or factor gives infinite frequencies) */
  c = b, c.rope.theta = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "RoPE theta"), "%s", err.msg);
  c = b, c.rope.type = APB_ROPE_LINEAR, c.rope.factor = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  c = b, c.rope.type = (apb_rope_type)7;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EUNSUPPORTED);
  apb_preset_config(APB_PRESET_LLAMA3_8B, &c, &I);
  expect_ok("llama3 RoPE", apb_config_check(&c, &err), &err);
  c.rope.high_freq_factor = c.rope.low_freq_factor;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  apb_preset_config(APB_PRESET_LLAMA3_8B, &c, &I);
  c.rope.original_max_pos = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  c = b, strcpy(c.arch, "GPT2LMHeadModel");
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EUNSUPPORTED);
  c = b, c.max_pos = 0;
  ck_assert_int_eq(apb_config_check(&c, &err), APB_EINVAL);
  ck_assert_int_eq(apb_config_check(NULL, &err), APB_EINVAL);
  /* apb_model_generate_config refuses what the check refuses, before allocating */
  apb_model *m = (apb_model *)&b;
  c = b, c.n_kv_heads = 3;
  ck_assert_int_eq(apb_model_generate_config(&c, I, 1, &m, &err), APB_EINVAL);
  ck_assert_ptr_null(m);
  ck_assert_int_eq(apb_model_generate_config(&b, -1, 1, &m, &err), APB_EINVAL);
  ck_assert_int_eq(apb_model_generate_config(NULL, 0, 1, &m, &err), APB_EINVAL);
}
END_TEST

/* ---------------------------------------------------------------- the real forward vs transformers
 *
 * apb_host_run with method dense on one simulated host, on the naive and the fast backend: every
 * layer's output ("layer_out" hook), the final hidden states (result and "final_hidden" hook) and the
 * last token's logits against the fixture. The document is the first T - 16 tokens, the query the
 * last 16; the query phase's rows are checked through the last token's logits (the query phase reports
 * no layer outputs), and the final_hidden and logits hooks against the result. */

typedef struct capture {
  int64_t n, q; /* document rows (prefill) and query rows */
  int L, E, V;
  float *layer_out;         /* [L, n + q, E] */
  float *final_h;           /* [n + q, E] */
  float *logits;            /* [V] */
  int64_t got_layer[64][2]; /* rows seen per layer: [prefill, query] */
  int64_t got_final[2];
  int got_logits;
  int bad; /* a hook call with an unexpected shape */
  const apb_host_args *args;
  apb_host_result res;
  apb_status st;
  apb_error err;
} capture;

static void hook(void *user, const apb_hook_info *in) {
  capture *c = user;
  int ph = strcmp(in->phase, "prefill") == 0 ? 0 : strcmp(in->phase, "query") == 0 ? 1 : -1;
  if (ph < 0) return; /* decode steps: none are asked for (max_new_tokens 0) */
  int64_t r0 = ph ? c->n : 0, rows = ph ? c->q : c->n;
  if (strcmp(in->stage, "layer_out") == 0 || strcmp(in->stage, "final_hidden") == 0) {
    int fin = in->stage[0] == 'f';
    if (in->ndim != 2 || in->shape[1] != c->E || in->shape[0] != rows ||
        (!fin && (in->layer < 0 || in->layer >= c->L))) {
      c->bad = 1;
      return;
    }
    float *dst = fin ? c->final_h : c->layer_out + (int64_t)in->layer * (c->n + c->q) * c->E;
    memcpy(dst + r0 * c->E, in->data, sizeof(float) * (size_t)(rows * c->E));
    if (fin)
      c->got_final[ph] += rows;
    else
      c->got_layer[in->layer][ph] += rows;
  } else if (strcmp(in->stage, "logits") == 0) {
    if (in->shape[in->ndim - 1] != c->V) {
      c->bad = 1;
      return;
    }
    memcpy(c->logits, in->data, sizeof(float) * (size_t)c->V);
    c->got_logits = 1;
  }
}

static void host_main(int rank, void *arg) {
  capture *c = arg;
  (void)rank;
  c->st = apb_host_run(c->args, &c->res, &c->err);
}

START_TEST(fixture_forward) {
  const char *name = fixture_names[_i / 2];
  const int fast = _i % 2;
  apb_error err = {0};
  char *d = fixture(name);
  apb_model *m;
  expect_ok(d, apb_model_load(d, NULL, &m, &err), &err);
  expected x;
  expected_open(name, &x);
  const int L = m->cfg.n_layers, E = m->cfg.hidden, V = m->cfg.vocab;
  const int64_t T = x.T, q = 16, n = T - q;
  ck_assert_int_le(L, 64);

  apb_backend *be = NULL;
  apb_cpu_opts co = {0, 0};
  apb_status st = fast ? apb_backend_fast(&co, &be, &err) : apb_backend_naive(&co, &be, &err);
  ck_assert_msg(st == APB_OK, "%s backend: %s: %s", fast ? "fast" : "naive", apb_status_str(st), err.msg);
  apb_bmodel *bm = NULL;
  expect_ok("apb_bmodel_create", apb_bmodel_create(be, m, &bm, &err), &err);
  apb_run_opts o;
  apb_run_opts_default(&o);
  o.method = APB_METHOD_DENSE;
  o.hosts = 1;
  apb_plan plan;
  expect_ok("apb_plan_make", apb_plan_make(&o, n, q, &m->cfg, m->scorer_width, &plan, &err), &err);
  apb_sim_group *g = NULL;
  apb_comm *comm = NULL;
  expect_ok("apb_sim_group_create", apb_sim_group_create(1, &be, 1, 120.0, &g, &comm, &err), &err);

  capture *c = calloc(1, sizeof *c);
  ck_assert(c != NULL);
  c->n = n, c->q = q, c->L = L, c->E = E, c->V = V;
  c->layer_out = tu_alloc((size_t)(L * T * E));
  c->final_h = tu_alloc((size_t)(T * E));
  c->logits = tu_alloc((size_t)V);
  apb_host_args a = {.plan = &plan,
                     .bm = bm,
                     .be = be,
                     .comm = comm,
                     .doc = x.ids,
                     .query = x.ids + n,
                     .hook = hook,
                     .hook_user = c,
                     .want_hidden = 1};
  c->args = &a;
  expect_ok("apb_sim_run", apb_sim_run(1, &comm, host_main, c, &err), &err);
  ck_assert_msg(c->st == APB_OK, "apb_host_run (%s, %s backend): %s: %s", name, fast ? "fast" : "naive",
                apb_status_str(c->st), c->err.msg);
  ck_assert_msg(!c->bad, "a hook call had an unexpected shape");

  char what[160];
  const int64_t k = T + m->cfg.head_dim;
  for (int l = 0; l < L; l++) {
    ck_assert_msg(c->got_layer[l][0] == n, "%s: layer %d: prefill layer_out covered %lld of %lld rows", name, l,
                  (long long)c->got_layer[l][0], (long long)n);
    /* the query phase reports no layer outputs (apb/sched.h: its stages are the logits); its rows are
     * checked through the last token's logits below */
    char key[64];
    snprintf(key, sizeof key, "layer_out.%d", l);
    float *ref = expected_rows(&x, key, 0, n, E);
    snprintf(what, sizeof what, "%s %s layer %d output (%s backend, %lld rows)", name, "apb_host_run", l,
             fast ? "fast" : "naive", (long long)n);
    fixture_close(what, c->layer_out + (int64_t)l * T * E, ref, n * E, k);
    tu_free(ref);
  }
  char key[64];
  snprintf(key, sizeof key, "hidden_states.%d", L); /* HF's last entry: after the final norm */
  float *ref = expected_rows(&x, key, 0, n, E);
  ck_assert_msg(c->res.hidden != NULL && c->res.n_rows == n, "result: %lld hidden rows, expected %lld",
                (long long)c->res.n_rows, (long long)n);
  snprintf(what, sizeof what, "%s result hidden (after the final norm, %s backend)", name, fast ? "fast" : "naive");
  fixture_close(what, c->res.hidden, ref, n * E, k);
  /* the "final_hidden" hook (documented, and called whenever a hook is set) reports the same rows */
  ck_assert_msg(c->got_final[0] == n, "%s: the final_hidden hook covered %lld of %lld rows", name,
                (long long)c->got_final[0], (long long)n);
  tu_assert_bitwise("final_hidden hook = result hidden", c->final_h, c->res.hidden, n * E);
  tu_free(ref);
  ref = expected_rows(&x, "logits", T - 1, 1, V);
  ck_assert_msg(c->res.logits != NULL, "no logits in the result");
  snprintf(what, sizeof what, "%s logits of the last token (%s backend)", name, fast ? "fast" : "naive");
  fixture_close(what, c->res.logits, ref, V, k);
  /* the "logits" hook of the query phase reports them too */
  ck_assert_msg(c->got_logits, "%s: no logits hook call", name);
  tu_assert_bitwise("logits hook = result logits", c->logits, c->res.logits, V);
  tu_free(ref);

  apb_host_result_free(&c->res);
  tu_free(c->layer_out), tu_free(c->final_h), tu_free(c->logits);
  free(c);
  apb_comm_destroy(comm);
  apb_sim_group_destroy(g);
  apb_bmodel_destroy(be, bm);
  apb_backend_destroy(be);
  expected_close(&x);
  apb_model_free(m);
  free(d);
}
END_TEST

/* ---------------------------------------------------------------- suite */

static Suite *suite(void) {
  Suite *s = suite_create("model");
  TCase *tc = tu_tcase("config", 20);
  tcase_add_test(tc, config_fixtures);
  tcase_add_test(tc, config_defaults);
  tcase_add_loop_test(tc, config_errors, 0, N_CFG_CASES);
  tcase_add_test(tc, config_malformed);
  suite_add_tcase(s, tc);
  tc = tu_tcase("rope", 20);
  tcase_add_test(tc, rope_closed_form);
  tcase_add_test(tc, rope_vs_transformers);
  suite_add_tcase(s, tc);
  tc = tu_tcase("loader", 60);
  tcase_add_loop_test(tc, loader_errors, 0, LE_COUNT);
  tcase_add_test(tc, fused_layout);
  tcase_add_test(tc, sharded_and_widened);
  suite_add_tcase(s, tc);
  tc = tu_tcase("round_trip", 120);
  tcase_add_test(tc, round_trip_generated);
  tcase_add_test(tc, round_trip_biases);
  suite_add_tcase(s, tc);
  tc = tu_tcase("presets", 300);
  tcase_add_test(tc, preset_shapes);
  tcase_add_test(tc, preset_deterministic);
  tcase_add_loop_test(tc, preset_activations, 0, 2);
  suite_add_tcase(s, tc);
  tc = tu_tcase("fixtures", 300);
  tcase_add_loop_test(tc, fixture_plain_forward, 0, N_FIXTURES);
  tcase_add_loop_test(tc, fixture_forward, 0, 2 * N_FIXTURES);
  suite_add_tcase(s, tc);
  tc = tu_tcase("cli", 120);
  tcase_add_test(tc, cmd_gen_model);
  tcase_add_test(tc, config_check);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(suite(), "check_model"); }
