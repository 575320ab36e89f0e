/* lib/config.c: a Hugging Face config.json into an apb_model_config (apb/model.h).
 *
 * Reads LlamaForCausalLM and Qwen2ForCausalLM configurations in both forms transformers has written:
 *   old (before 5.x)  rope_theta at the top level, rope_scaling null or {"type"|"rope_type", factor, ...}
 *   new (5.x)         rope_parameters {rope_theta, rope_type, factor, ...} (flat, or nested under the
 *                     layer type "full_attention")
 * Where both are present, rope_scaling wins over rope_parameters for the type and its fields, and
 * rope_parameters.rope_theta over the top-level rope_theta: transformers 5.17's own order
 * (convert_rope_params_to_dict). Defaults follow transformers where a key is absent (docs/model.md has
 * the table); the sizes that decide the weight shapes are required instead, because a model whose
 * shapes came from a library default is almost certainly not what the user meant.
 *
 * What it deliberately is not: no support for anything that changes the computation and that the
 * backends do not implement. Those are APB_EUNSUPPORTED naming the key and value: other
 * architectures, hidden_act other than silu, rope types other than default/linear/llama3 (yarn,
 * dynamic, longrope, ...), partial_rotary_factor != 1, Qwen2 sliding-window attention. Keys that do
 * not change the prefill (dropout, token ids, initializer_range, torch_dtype, ...) are ignored.
 *
 * Every error message starts with the label (the file name) and names the key, what it held and
 * what was expected. Sizes are bounded (LIMIT_* below) so that every product of them used later fits
 * in 64 bits. Tested in tests/check_model.c (both forms, every error class); fuzzed by
 * fuzz/fuzz_config.c.
 */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apb/model.h"

/* Bounds on sizes: far above any real model, low enough that V*E, (Hq+2Hkv)*D*E, L*... fit easily. */
#define LIMIT_LAYERS 4096
#define LIMIT_HIDDEN (1 << 20)
#define LIMIT_FFN (1 << 22)
#define LIMIT_HEADS 4096
#define LIMIT_HEAD_DIM 4096
#define LIMIT_VOCAB (1 << 24)
#define LIMIT_QKV (1 << 24) /* (Hq+2Hkv)*D */

/* The longest config.json we read: real ones are a few KB. */
#define CONFIG_MAX_BYTES (16u << 20)

typedef struct ctx {
  const char *L; /* label for messages */
  apb_error *err;
} ctx;

static const char *kind_of(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "an object";
  case JSON_ARRAY: return "an array";
  case JSON_STRING: return "a string";
  case JSON_INTEGER: return "an integer";
  case JSON_REAL: return "a real number";
  case JSON_TRUE:
  case JSON_FALSE: return "a boolean";
  case JSON_NULL: return "null";
  }
  return "a value";
}

/* A key that is absent or null counts as absent everywhere (transformers writes null for unset). */
static const json_t *get(const json_t *obj, const char *key) {
  const json_t *v = json_object_get(obj, key);
  return v && !json_is_null(v) ? v : NULL;
}

static apb_status type_error(const ctx *c, const char *where, const char *key, const json_t *v, const char *want) {
  return apb_error_set(c->err, APB_EFORMAT, "%s: \"%s%s\" is %s, expected %s", c->L, where, key, kind_of(v), want);
}

/* An integer key in [lo, hi]. Absent: *out = def when !required, else an error. */
static apb_status get_int(const ctx *c, const json_t *obj, const char *where, const char *key, int required,
                          int64_t lo, int64_t hi, int64_t def, int64_t *out) {
  const json_t *v = get(obj, key);
  if (!v) {
    if (required)
      return apb_error_set(c->err, APB_ENOTFOUND, "%s: missing required key \"%s%s\" (an integer)", c->L, where, key);
    *out = def;
    return APB_OK;
  }
  if (!json_is_integer(v)) return type_error(c, where, key, v, "an integer");
  int64_t x = (int64_t)json_integer_value(v);
  if (x < lo && lo == 1)
    return apb_error_set(c->err, APB_EINVAL, "%s: \"%s%s\" is %lld, expected a positive integer", c->L, where, key,
                         (long long)x);
  if (x < lo)
    return apb_error_set(c->err, APB_EINVAL, "%s: \"%s%s\" is %lld, expected at least %lld", c->L, where, key,
                         (long long)x, (long long)lo);
  if (x > hi)
    return apb_error_set(c->err, APB_EUNSUPPORTED, "%s: \"%s%s\" is %lld, more than apb supports (%lld)", c->L, where,
                         key, (long long)x, (long long)hi);
  *out = x;
  return APB_OK;
}

static apb_status get_int32(const ctx *c, const json_t *obj, const char *key, int required, int64_t hi, int64_t def,
                            int *out) {
  int64_t x = 0;
  apb_status st = get_int(c, obj, "", key, required, 1, hi, def, &x);
  if (st == APB_OK) *out = (int)x;
  return st;
}

/* A number (JSON integer or real). Absent: def unless required. pos: must be > 0. */
static apb_status get_num(const ctx *c, const json_t *obj, const char *where, const char *key, int required, int pos,
                          double def, double *out) {
  const json_t *v = get(obj, key);
  if (!v) {
    if (required)
      return apb_error_set(c->err, APB_ENOTFOUND, "%s: missing required key \"%s%s\" (a number)", c->L, where, key);
    *out = def;
    return APB_OK;
  }
  if (!json_is_number(v)) return type_error(c, where, key, v, "a number");
  double x = json_number_value(v);
  if (!isfinite(x) || (pos && !(x > 0)))
    return apb_error_set(c->err, APB_EINVAL, "%s: \"%s%s\" is %g, expected a %snumber", c->L, where, key, x,
                         pos ? "positive " : "finite ");
  *out = x;
  return APB_OK;
}

static apb_status get_bool(const ctx *c, const json_t *obj, const char *key, int def, int *out) {
  const json_t *v = get(obj, key);
  if (!v) {
    *out = def;
    return APB_OK;
  }
  if (!json_is_boolean(v)) return type_error(c, "", key, v, "true or false");
  *out = json_is_true(v);
  return APB_OK;
}

/* A string key; NULL (and APB_OK) when absent. */
static apb_status get_str(const ctx *c, const json_t *obj, const char *where, const char *key, const char **out) {
  const json_t *v = get(obj, key);
  *out = NULL;
  if (!v) return APB_OK;
  if (!json_is_string(v)) return type_error(c, where, key, v, "a string");
  *out = json_string_value(v);
  return APB_OK;
}

/* ---------------------------------------------------------------- architecture */

enum { ARCH_LLAMA, ARCH_QWEN2, ARCH_COUNT };
static const char *const arch_names[ARCH_COUNT] = {"LlamaForCausalLM", "Qwen2ForCausalLM"};
static const char *const arch_model_types[ARCH_COUNT] = {"llama", "qwen2"};

static apb_status parse_arch(const ctx *c, const json_t *root, int *arch) {
  const json_t *a = get(root, "architectures");
  const char *mt = NULL;
  apb_status st = get_str(c, root, "", "model_type", &mt);
  if (st != APB_OK) return st;
  *arch = -1;
  if (a) {
    if (!json_is_array(a)) return type_error(c, "", "architectures", a, "an array of strings");
    if (json_array_size(a) == 0)
      return apb_error_set(c->err, APB_EFORMAT, "%s: \"architectures\" is an empty array, expected one of %s, %s",
                           c->L, arch_names[0], arch_names[1]);
    size_t i;
    const json_t *e;
    json_array_foreach(a, i, e) {
      if (!json_is_string(e))
        return apb_error_set(c->err, APB_EFORMAT, "%s: \"architectures\"[%zu] is %s, expected a string", c->L, i,
                             kind_of(e));
      for (int k = 0; k < ARCH_COUNT && *arch < 0; k++)
        if (strcmp(json_string_value(e), arch_names[k]) == 0) *arch = k;
    }
    if (*arch < 0)
      return apb_error_set(c->err, APB_EUNSUPPORTED,
                           "%s: \"architectures\" is [\"%.80s\"%s], not supported (apb runs %s and %s)", c->L,
                           json_string_value(json_array_get(a, 0)), json_array_size(a) > 1 ? ", ..." : "",
                           arch_names[0], arch_names[1]);
    if (mt && strcmp(mt, arch_model_types[*arch]) != 0)
      return apb_error_set(c->err, APB_EFORMAT,
                           "%s: \"architectures\" names %s but \"model_type\" is \"%.80s\" (expected \"%s\")", c->L,
                           arch_names[*arch], mt, arch_model_types[*arch]);
    return APB_OK;
  }
  if (!mt)
    return apb_error_set(c->err, APB_ENOTFOUND,
                         "%s: missing required key \"architectures\" (and no \"model_type\" to fall back on); "
                         "expected [\"%s\"] or [\"%s\"]",
                         c->L, arch_names[0], arch_names[1]);
  for (int k = 0; k < ARCH_COUNT; k++)
    if (strcmp(mt, arch_model_types[k]) == 0) *arch = k;
  if (*arch < 0)
    return apb_error_set(c->err, APB_EUNSUPPORTED,
                         "%s: \"model_type\" is \"%.80s\", not supported (apb runs \"llama\" and \"qwen2\")", c->L,
                         mt);
  return APB_OK;
}

/* ---------------------------------------------------------------- RoPE */

/* The scaling dict in effect and where it came from, for messages. */
typedef struct rope_src {
  const json_t *dict; /* rope_scaling or rope_parameters (flat), or NULL */
  const char *where;  /* "rope_scaling." or "rope_parameters." */
} rope_src;

/* transformers 5.x may nest rope_parameters per layer type: {"full_attention": {...}}. apb runs full
 * attention only, so the one nested dict allowed is "full_attention". */
static apb_status unnest_rope_parameters(const ctx *c, const json_t *rp, const json_t **out, const char **where) {
  *out = rp;
  *where = "rope_parameters.";
  const json_t *full = json_object_get(rp, "full_attention");
  if (!full || !json_is_object(full)) return APB_OK;
  const char *k;
  const json_t *v;
  json_object_foreach((json_t *)rp, k, v) {
    if (strcmp(k, "full_attention") != 0 && json_is_object(v))
      return apb_error_set(c->err, APB_EUNSUPPORTED,
                           "%s: \"rope_parameters\" has parameters for layer type \"%.80s\"; apb supports "
                           "full attention only",
                           c->L, k);
  }
  *out = full;
  *where = "rope_parameters.full_attention.";
  return APB_OK;
}

static apb_status parse_rope(const ctx *c, const json_t *root, apb_model_config *cfg) {
  apb_status st;
  const json_t *rs = json_object_get(root, "rope_scaling");
  const json_t *rp = json_object_get(root, "rope_parameters");
  if (rs && !json_is_null(rs) && !json_is_object(rs))
    return type_error(c, "", "rope_scaling", rs, "an object or null");
  if (rp && !json_is_null(rp) && !json_is_object(rp))
    return type_error(c, "", "rope_parameters", rp, "an object or null");
  if (rs && json_is_null(rs)) rs = NULL;
  if (rp && json_is_null(rp)) rp = NULL;
  const char *rp_where = "rope_parameters.";
  if (rp && (st = unnest_rope_parameters(c, rp, &rp, &rp_where)) != APB_OK) return st;

  /* theta: rope_parameters.rope_theta, else rope_theta, else 10000 (transformers' default_theta). */
  double theta = 10000.0;
  if ((st = get_num(c, root, "", "rope_theta", 0, 1, theta, &theta)) != APB_OK) return st;
  if (rp && (st = get_num(c, rp, rp_where, "rope_theta", 0, 1, theta, &theta)) != APB_OK) return st;

  /* partial rotary embeddings change which dimensions rotate: not implemented by any backend. */
  double prf = 1.0;
  if ((st = get_num(c, root, "", "partial_rotary_factor", 0, 1, prf, &prf)) != APB_OK) return st;
  if (rp && (st = get_num(c, rp, rp_where, "partial_rotary_factor", 0, 1, prf, &prf)) != APB_OK) return st;
  if (prf != 1.0)
    return apb_error_set(c->err, APB_EUNSUPPORTED,
                         "%s: \"partial_rotary_factor\" is %g; apb rotates the whole head (1.0 only)", c->L, prf);

  rope_src src = {rs ? rs : rp, rs ? "rope_scaling." : rp_where};
  const char *type = "default", *type_key = "rope_type";
  if (src.dict) {
    const char *t1 = NULL, *t2 = NULL;
    if ((st = get_str(c, src.dict, src.where, "rope_type", &t1)) != APB_OK) return st;
    if ((st = get_str(c, src.dict, src.where, "type", &t2)) != APB_OK) return st;
    if (t1)
      type = t1;
    else if (t2)
      type = t2, type_key = "type";
    else if (rs)
      return apb_error_set(c->err, APB_ENOTFOUND,
                           "%s: \"rope_scaling\" has neither \"rope_type\" nor \"type\" (expected \"default\", "
                           "\"linear\" or \"llama3\")",
                           c->L);
  }
  apb_rope *r = &cfg->rope;
  memset(r, 0, sizeof *r);
  r->theta = theta;
  r->factor = 1.0;
  if (strcmp(type, "default") == 0) {
    r->type = APB_ROPE_DEFAULT;
    return APB_OK;
  }
  if (strcmp(type, "linear") == 0) {
    r->type = APB_ROPE_LINEAR;
    return get_num(c, src.dict, src.where, "factor", 1, 1, 1.0, &r->factor);
  }
  if (strcmp(type, "llama3") == 0) {
    r->type = APB_ROPE_LLAMA3;
    if ((st = get_num(c, src.dict, src.where, "factor", 1, 1, 1.0, &r->factor)) != APB_OK) return st;
    if ((st = get_num(c, src.dict, src.where, "low_freq_factor", 1, 1, 1.0, &r->low_freq_factor)) != APB_OK)
      return st;
    if ((st = get_num(c, src.dict, src.where, "high_freq_factor", 1, 1, 1.0, &r->high_freq_factor)) != APB_OK)
      return st;
    if (!(r->high_freq_factor > r->low_freq_factor))
      return apb_error_set(c->err, APB_EINVAL,
                           "%s: \"%shigh_freq_factor\" (%g) must be greater than \"%slow_freq_factor\" (%g)", c->L,
                           src.where, r->high_freq_factor, src.where, r->low_freq_factor);
    /* original_max_position_embeddings: in the dict, else top level, else max_position_embeddings
     * (transformers' fallback). */
    int64_t omp = 0;
    if ((st = get_int(c, root, "", "original_max_position_embeddings", 0, 1, INT64_C(1) << 40, cfg->max_pos, &omp)) !=
        APB_OK)
      return st;
    if ((st = get_int(c, src.dict, src.where, "original_max_position_embeddings", 0, 1, INT64_C(1) << 40, omp,
                      &omp)) != APB_OK)
      return st;
    r->original_max_pos = omp;
    return APB_OK;
  }
  return apb_error_set(
      c->err, APB_EUNSUPPORTED,
      "%s: \"%s%s\" is \"%.80s\", not supported (apb implements \"default\", \"linear\" and \"llama3\")", c->L,
      src.where, type_key, type);
}

/* ---------------------------------------------------------------- the whole config */

static apb_status parse_root(const ctx *c, const json_t *root, apb_model_config *cfg) {
  apb_status st;
  int arch;
  if (!json_is_object(root))
    return apb_error_set(c->err, APB_EFORMAT, "%s: the document is %s, expected a JSON object", c->L, kind_of(root));
  if ((st = parse_arch(c, root, &arch)) != APB_OK) return st;
  snprintf(cfg->arch, sizeof cfg->arch, "%s", arch_names[arch]);
  int qwen = arch == ARCH_QWEN2;

  if ((st = get_int32(c, root, "hidden_size", 1, LIMIT_HIDDEN, 0, &cfg->hidden)) != APB_OK) return st;
  if ((st = get_int32(c, root, "intermediate_size", 1, LIMIT_FFN, 0, &cfg->ffn)) != APB_OK) return st;
  if ((st = get_int32(c, root, "num_hidden_layers", 1, LIMIT_LAYERS, 0, &cfg->n_layers)) != APB_OK) return st;
  if ((st = get_int32(c, root, "num_attention_heads", 1, LIMIT_HEADS, 0, &cfg->n_heads)) != APB_OK) return st;
  if ((st = get_int32(c, root, "num_key_value_heads", 0, LIMIT_HEADS, cfg->n_heads, &cfg->n_kv_heads)) != APB_OK)
    return st;
  if ((st = get_int32(c, root, "vocab_size", 1, LIMIT_VOCAB, 0, &cfg->vocab)) != APB_OK) return st;
  if (cfg->n_heads % cfg->n_kv_heads != 0)
    return apb_error_set(c->err, APB_EINVAL,
                         "%s: \"num_attention_heads\" (%d) is not a multiple of \"num_key_value_heads\" (%d)", c->L,
                         cfg->n_heads, cfg->n_kv_heads);
  if (get(root, "head_dim")) {
    if ((st = get_int32(c, root, "head_dim", 1, LIMIT_HEAD_DIM, 0, &cfg->head_dim)) != APB_OK) return st;
  } else {
    if (cfg->hidden % cfg->n_heads != 0)
      return apb_error_set(c->err, APB_EINVAL,
                           "%s: \"hidden_size\" (%d) is not a multiple of \"num_attention_heads\" (%d), and no "
                           "\"head_dim\" is given",
                           c->L, cfg->hidden, cfg->n_heads);
    cfg->head_dim = cfg->hidden / cfg->n_heads;
  }
  if (cfg->head_dim % 2 != 0)
    return apb_error_set(c->err, APB_EUNSUPPORTED, "%s: head dimension %d is odd; RoPE (rotate-half) needs it even",
                         c->L, cfg->head_dim);
  if ((int64_t)(cfg->n_heads + 2 * cfg->n_kv_heads) * cfg->head_dim > LIMIT_QKV)
    return apb_error_set(c->err, APB_EUNSUPPORTED,
                         "%s: (num_attention_heads + 2 num_key_value_heads) x head_dim = %lld, more than apb "
                         "supports (%d)",
                         c->L, (long long)(cfg->n_heads + 2 * cfg->n_kv_heads) * cfg->head_dim, LIMIT_QKV);

  if ((st = get_num(c, root, "", "rms_norm_eps", 0, 1, 1e-6, &cfg->rms_eps)) != APB_OK) return st;
  const char *act = NULL;
  if ((st = get_str(c, root, "", "hidden_act", &act)) != APB_OK) return st;
  if (act && strcmp(act, "silu") != 0)
    return apb_error_set(c->err, APB_EUNSUPPORTED, "%s: \"hidden_act\" is \"%.80s\"; apb implements \"silu\" only",
                         c->L, act);
  if ((st = get_bool(c, root, "tie_word_embeddings", 0, &cfg->tie_embeddings)) != APB_OK) return st;
  if ((st = get_int(c, root, "", "max_position_embeddings", 0, 1, INT64_C(1) << 40, qwen ? 32768 : 2048,
                    &cfg->max_pos)) != APB_OK)
    return st;

  if (qwen) {
    /* Qwen2: q, k, v always carry biases, o and the MLP never (modeling_qwen2). */
    cfg->qkv_bias = 1, cfg->o_bias = 0, cfg->mlp_bias = 0;
    int sw = 0;
    if ((st = get_bool(c, root, "use_sliding_window", 0, &sw)) != APB_OK) return st;
    if (sw)
      return apb_error_set(c->err, APB_EUNSUPPORTED,
                           "%s: \"use_sliding_window\" is true; apb implements full causal attention only "
                           "(sliding-window layers are not supported)",
                           c->L);
    const json_t *lt = get(root, "layer_types");
    if (lt) {
      if (!json_is_array(lt)) return type_error(c, "", "layer_types", lt, "an array of strings");
      size_t i;
      const json_t *e;
      json_array_foreach(lt, i, e) {
        if (!json_is_string(e) || strcmp(json_string_value(e), "full_attention") != 0)
          return apb_error_set(c->err, APB_EUNSUPPORTED,
                               "%s: \"layer_types\"[%zu] is %s%.80s%s; apb supports \"full_attention\" only", c->L, i,
                               json_is_string(e) ? "\"" : "", json_is_string(e) ? json_string_value(e) : kind_of(e),
                               json_is_string(e) ? "\"" : "");
      }
    }
  } else {
    int ab = 0, mb = 0;
    if ((st = get_bool(c, root, "attention_bias", 0, &ab)) != APB_OK) return st;
    if ((st = get_bool(c, root, "mlp_bias", 0, &mb)) != APB_OK) return st;
    cfg->qkv_bias = ab, cfg->o_bias = ab, cfg->mlp_bias = mb;
  }
  return parse_rope(c, root, cfg);
}

apb_status apb_config_check(const apb_model_config *cfg, apb_error *err) {
  apb_error_clear(err);
  if (!cfg) return apb_error_set(err, APB_EINVAL, "apb_config_check: NULL configuration");
  const struct {
    const char *name;
    int64_t v, hi;
  } f[] = {{"layers (num_hidden_layers)", cfg->n_layers, LIMIT_LAYERS},
           {"hidden size (hidden_size)", cfg->hidden, LIMIT_HIDDEN},
           {"FFN size (intermediate_size)", cfg->ffn, LIMIT_FFN},
           {"query heads (num_attention_heads)", cfg->n_heads, LIMIT_HEADS},
           {"KV heads (num_key_value_heads)", cfg->n_kv_heads, LIMIT_HEADS},
           {"head dimension (head_dim)", cfg->head_dim, LIMIT_HEAD_DIM},
           {"vocabulary (vocab_size)", cfg->vocab, LIMIT_VOCAB}};
  for (size_t i = 0; i < sizeof f / sizeof *f; i++)
    if (f[i].v < 1 || f[i].v > f[i].hi) /* as the parser: below 1 is invalid, above the limit unsupported */
      return apb_error_set(err, f[i].v < 1 ? APB_EINVAL : APB_EUNSUPPORTED, "%s is %lld; apb takes 1 to %lld",
                           f[i].name, (long long)f[i].v, (long long)f[i].hi);
  if (cfg->n_heads % cfg->n_kv_heads != 0)
    return apb_error_set(err, APB_EINVAL, "%d query heads are not a multiple of %d KV heads", cfg->n_heads,
                         cfg->n_kv_heads);
  if (cfg->head_dim % 2 != 0)
    return apb_error_set(err, APB_EUNSUPPORTED, "head dimension %d is odd; RoPE (rotate-half) needs it even",
                         cfg->head_dim);
  if ((int64_t)(cfg->n_heads + 2 * cfg->n_kv_heads) * cfg->head_dim > LIMIT_QKV)
    return apb_error_set(err, APB_EUNSUPPORTED, "(query heads + 2 KV heads) x head dimension = %lld, more than apb "
                         "supports (%d)", (long long)(cfg->n_heads + 2 * cfg->n_kv_heads) * cfg->head_dim, LIMIT_QKV);
  if (!(cfg->rms_eps > 0) || !isfinite(cfg->rms_eps))
    return apb_error_set(err, APB_EINVAL, "RMSNorm epsilon %g is not a positive finite number", cfg->rms_eps);
  if (cfg->max_pos < 1)
    return apb_error_set(err, APB_EINVAL, "max_position_embeddings %lld is not positive", (long long)cfg->max_pos);
  int arch_ok = 0;
  for (int k = 0; k < ARCH_COUNT; k++) arch_ok |= strcmp(cfg->arch, arch_names[k]) == 0;
  if (!arch_ok)
    return apb_error_set(err, APB_EUNSUPPORTED, "architecture \"%.40s\"; apb implements %s and %s", cfg->arch,
                         arch_names[0], arch_names[1]);
  /* RoPE: the rules parse_rope applies */
  const apb_rope *r = &cfg->rope;
  if (!(r->theta > 0) || !isfinite(r->theta))
    return apb_error_set(err, APB_EINVAL, "RoPE theta %g is not a positive finite number", r->theta);
  if (r->type != APB_ROPE_DEFAULT && r->type != APB_ROPE_LINEAR && r->type != APB_ROPE_LLAMA3)
    return apb_error_set(err, APB_EUNSUPPORTED, "RoPE type %d (apb implements default, linear and llama3)",
                         (int)r->type);
  if (r->type != APB_ROPE_DEFAULT && (!(r->factor > 0) || !isfinite(r->factor)))
    return apb_error_set(err, APB_EINVAL, "RoPE factor %g is not a positive finite number", r->factor);
  if (r->type == APB_ROPE_LLAMA3) {
    if (!(r->low_freq_factor > 0) || !isfinite(r->low_freq_factor) || !(r->high_freq_factor > r->low_freq_factor) ||
        !isfinite(r->high_freq_factor))
      return apb_error_set(err, APB_EINVAL,
                           "llama3 RoPE: high_freq_factor (%g) must be finite and greater than low_freq_factor (%g) > 0",
                           r->high_freq_factor, r->low_freq_factor);
    if (r->original_max_pos < 1)
      return apb_error_set(err, APB_EINVAL, "llama3 RoPE: original_max_position_embeddings %lld is not positive",
                           (long long)r->original_max_pos);
  }
  /* Each rule above can hold while the frequencies still overflow: theta^(-2i/D) is infinite for a
   * subnormal theta, and f/factor for a subnormal factor. Every backend refuses such a RoPE at run
   * time (apb_bc_split_rope); refuse it here, where the configuration is read. */
  double inv[LIMIT_HEAD_DIM / 2];
  apb_rope_inv_freq(r, cfg->head_dim, inv);
  for (int i = 0; i < cfg->head_dim / 2; i++)
    if (!isfinite(inv[i]) || inv[i] < 0)
      return apb_error_set(err, APB_EINVAL,
                           "RoPE inverse frequency %d of %d is %g (theta %g, factor %g): choose a theta and factor "
                           "whose frequencies are finite",
                           i, cfg->head_dim / 2, inv[i], r->theta, r->factor);
  return APB_OK;
}

apb_status apb_config_parse(const char *json, size_t len, const char *label, apb_model_config *cfg, apb_error *err) {
  apb_error_clear(err);
  ctx c = {label ? label : "config.json", err};
  if (!cfg || (!json && len > 0)) return apb_error_set(err, APB_EINVAL, "%s: NULL text or output", c.L);
  memset(cfg, 0, sizeof *cfg);
  /* JSON text holds no NUL; jansson's buffer reader could stop at one and accept what precedes it. */
  const char *nul = len ? memchr(json, 0, len) : NULL;
  if (nul)
    return apb_error_set(err, APB_EFORMAT, "%s: not valid JSON: NUL byte at offset %zu", c.L, (size_t)(nul - json));
  json_error_t je;
  json_t *root = json_loadb(json ? json : "", len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
  if (!root)
    return apb_error_set(err, APB_EFORMAT, "%s: not valid JSON: %s (line %d, column %d)", c.L, je.text, je.line,
                         je.column);
  apb_status st = parse_root(&c, root, cfg);
  json_decref(root);
  /* what the parser accepts, the check accepts (it states the same rules for configurations made in code) */
  if (st == APB_OK && (st = apb_config_check(cfg, err)) != APB_OK) apb_error_set(err, st, "%s", c.L);
  if (st != APB_OK) memset(cfg, 0, sizeof *cfg);
  return st;
}

apb_status apb_config_load(const char *path, apb_model_config *cfg, apb_error *err) {
  apb_error_clear(err);
  if (!path || !cfg) return apb_error_set(err, APB_EINVAL, "apb_config_load: NULL path or output");
  FILE *fp = fopen(path, "rb");
  if (!fp)
    return apb_error_set(err, errno == ENOENT ? APB_ENOTFOUND : APB_EIO, "%s: cannot open: %s", path,
                         strerror(errno));
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  apb_status st = APB_OK;
  while (buf) {
    size_t got = fread(buf + n, 1, cap - n, fp);
    n += got;
    if (got == 0) break;
    if (n == cap) {
      if (cap >= CONFIG_MAX_BYTES) {
        st = apb_error_set(err, APB_EFORMAT, "%s: larger than %u bytes; not a model configuration", path,
                           CONFIG_MAX_BYTES);
        break;
      }
      char *nb = realloc(buf, cap * 2);
      if (!nb) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = nb, cap *= 2;
    }
  }
  if (!buf) st = apb_error_set(err, APB_ENOMEM, "%s: out of memory reading the file", path);
  if (st == APB_OK && ferror(fp)) st = apb_error_set(err, APB_EIO, "%s: read error: %s", path, strerror(errno));
  fclose(fp);
  if (st == APB_OK) st = apb_config_parse(buf, n, path, cfg, err);
  free(buf);
  return st;
}
