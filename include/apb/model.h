/* apb/model.h: Llama-family models in the reference: configuration, weights, generated presets.
 *
 * A model is read from a Hugging Face directory: config.json (LlamaForCausalLM or Qwen2ForCausalLM,
 * old and new transformers forms: rope_theta/rope_scaling or rope_parameters) and model.safetensors or
 * a sharded model.safetensors.index.json. Weights are widened to fp32 (F32 tensors are used in place
 * from the memory map). Retaining heads (APB.md 3.2, Locret) come from a separate safetensors file with
 * keys model.layers.{i}.self_attn.fc1.weight [I, (Hq+2Hkv)*D] and .fc2.weight [Hkv, I]
 * (tools/convert_heads.py makes one from a Locret / thunlp-APB PyTorch checkpoint).
 *
 * The loader fuses what every backend wants fused: wqkv [(Hq+2Hkv)*D, E] (q rows, then k, then v;
 * bias likewise) and w_gate_up [2F, E] (gate rows, then up). Everything is checked for presence,
 * dtype and shape, with the tensor named in errors. Weights are shared read-only by all simulated
 * hosts of a process. docs/model.md lists the keys, names and presets.
 *
 * Legend: L layers, E hidden, F intermediate (FFN), V vocabulary, Hq query heads, Hkv KV heads, D head
 * dim, I retaining-head width. Every matrix is row-major [out, in] as HF stores it (y = x W^T + b).
 *
 * Tested in tests/check_model.c (configs in both forms and every error class, RoPE frequencies,
 * loader errors, save/load round trips, and layer-by-layer against HF transformers fixtures in
 * tests/fixtures/); fuzz/fuzz_config.c fuzzes apb_config_parse.
 */
#ifndef APB_MODEL_H
#define APB_MODEL_H

#include <stdint.h>

#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum apb_rope_type { APB_ROPE_DEFAULT = 0, APB_ROPE_LINEAR, APB_ROPE_LLAMA3 } apb_rope_type;

typedef struct apb_rope {
  apb_rope_type type;
  double theta;              /* rope_theta */
  double factor;             /* linear and llama3 */
  double low_freq_factor;    /* llama3 */
  double high_freq_factor;   /* llama3 */
  int64_t original_max_pos;  /* llama3: original_max_position_embeddings */
} apb_rope;

/* Inverse frequencies inv_freq [D/2] after scaling (the rules of HF's _compute_default/linear/llama3_
 * parameters), computed in double; HF computes them in fp32 (lib/rope.c says what that changes).
 * Rotation pair i (dims i and i + D/2, rotate-half) turns by pos * inv_freq[i]. D even, >= 2. */
void apb_rope_inv_freq(const apb_rope *r, int D, double *inv_freq);

typedef struct apb_model_config {
  char arch[64];             /* "LlamaForCausalLM" or "Qwen2ForCausalLM" */
  int n_layers;              /* L */
  int hidden;                /* E */
  int ffn;                   /* F (intermediate_size) */
  int n_heads;               /* Hq */
  int n_kv_heads;            /* Hkv */
  int head_dim;              /* D (head_dim, or hidden / n_heads) */
  int vocab;                 /* V */
  double rms_eps;
  apb_rope rope;
  int qkv_bias;              /* Qwen2, or attention_bias */
  int o_bias;                /* attention_bias (Llama) */
  int mlp_bias;              /* mlp_bias (Llama) */
  int tie_embeddings;
  int64_t max_pos;           /* max_position_embeddings (informational; llama3's fallback for
                                original_max_position_embeddings) */
} apb_model_config;

typedef struct apb_layer {
  const float *attn_norm;    /* [E] */
  const float *wqkv;         /* [(Hq+2Hkv)*D, E] */
  const float *bqkv;         /* [(Hq+2Hkv)*D] or NULL */
  const float *wo;           /* [E, Hq*D] */
  const float *bo;           /* [E] or NULL */
  const float *ffn_norm;     /* [E] */
  const float *w_gate_up;    /* [2F, E] */
  const float *b_gate_up;    /* [2F] or NULL */
  const float *w_down;       /* [E, F] */
  const float *b_down;       /* [E] or NULL */
  const float *fc1;          /* [I, (Hq+2Hkv)*D] retaining head, or NULL */
  const float *fc2;          /* [Hkv, I] or NULL */
} apb_layer;

typedef struct apb_model {
  apb_model_config cfg;
  int scorer_width;          /* I, 0 when no retaining heads are loaded */
  const float *embed;        /* [V, E] */
  const float *final_norm;   /* [E] */
  const float *lm_head;      /* [V, E] (== embed when tied) */
  apb_layer *layers;         /* [L] */
  void *priv;                /* owned storage and mappings */
} apb_model;

/* Parse config.json text (len bytes, no NUL needed; label names it in errors). Unknown architectures,
 * activations other than silu, rope types other than default/linear/llama3 and Qwen2 sliding windows
 * are APB_EUNSUPPORTED; a missing required key APB_ENOTFOUND; a wrong JSON type or malformed text
 * APB_EFORMAT; a non-positive size or head counts that do not divide APB_EINVAL. Every message names
 * the key. On failure *cfg is zeroed. apb_config_load reads the file first (a missing file is
 * APB_ENOTFOUND). */
apb_status apb_config_parse(const char *json, size_t len, const char *label, apb_model_config *cfg,
                            apb_error *err);
apb_status apb_config_load(const char *path, apb_model_config *cfg, apb_error *err);
/* Check a configuration made in code (a preset changed by hand) against what apb_config_parse
 * accepts: every size from 1 to the parser's limit, query heads a multiple of KV heads, an even head
 * dimension, (Hq + 2 Hkv) x D within the limit, a positive finite RMSNorm epsilon, a positive
 * max_pos, a known architecture, and the RoPE rules (positive finite theta; default, linear or llama3;
 * a positive factor; llama3's high > low > 0 and a positive original length; every inverse frequency
 * finite, which a subnormal theta or factor breaks). APB_EINVAL (a value out
 * of its domain) or APB_EUNSUPPORTED (beyond a limit, odd D, another architecture or RoPE type) with a
 * message naming the field. apb_model_generate_config calls it. */
apb_status apb_config_check(const apb_model_config *cfg, apb_error *err);

/* Load DIR/config.json and the weights (DIR/model.safetensors, else the shards named by
 * DIR/model.safetensors.index.json); heads_path (may be NULL: no retaining heads, scorer_width 0)
 * names a retaining-heads file. Tensors may be F32, F16, BF16 or F64; extra tensors are ignored.
 * Errors name the file and tensor (missing, wrong dtype, wrong shape, a missing shard, ...). */
apb_status apb_model_load(const char *dir, const char *heads_path, apb_model **out, apb_error *err);
/* Release everything (mappings and owned storage). NULL is allowed. */
void apb_model_free(apb_model *m);

/* A model of configuration cfg with owned fp32 storage for every tensor the configuration has
 * (biases where it says so, lm_head aliasing embed when tied, retaining heads when scorer_width > 0),
 * every pointer set and the values uninitialised. The storage behind the const pointers is the
 * model's own and writable: generators and tests fill it (cast away the const) before sharing the
 * model. APB_ENOMEM, checked against the memory available first, when it does not fit. */
apb_status apb_model_create(const apb_model_config *cfg, int scorer_width, apb_model **out, apb_error *err);

/* The name apb_model_save gives the retaining heads, and `apb` looks for next to config.json. */
#define APB_HEADS_FILE "retaining_heads.safetensors"

/* Parameters (elements) of a model of this configuration: every weight and bias, lm_head counted
 * once more unless tied, plus the retaining heads when scorer_width > 0. Times 4 for fp32 bytes.
 * -1 when a size of cfg is not positive (L may be 0) or the count would reach 2^62. */
int64_t apb_model_param_count(const apb_model_config *cfg, int scorer_width);

/* Presets for generated models (docs/model.md has every size and how the weights are drawn). */
typedef enum apb_preset { APB_PRESET_TINY = 0, APB_PRESET_SMALL, APB_PRESET_LLAMA3_8B, APB_PRESET_COUNT } apb_preset;
int apb_preset_parse(const char *name, apb_preset *out);   /* 0 or -1 */
const char *apb_preset_name(apb_preset p);
/* The configuration of a preset and its retaining-head width I (scorer_width may be NULL):
 *   tiny             L 2,  E 256,  F 1024,  Hq 4,  Hkv 2, D 64,  V 4096,   I 128
 *   small            L 4,  E 512,  F 2048,  Hq 8,  Hkv 2, D 64,  V 8192,   I 256
 *   llama3-8b-shape  L 32, E 4096, F 14336, Hq 32, Hkv 8, D 128, V 128256, I 1024 (Llama-3.1-8B)
 * tiny and small: rope default, theta 500000; llama3-8b-shape: llama3 scaling (factor 8, low 1,
 * high 4, original 8192). All: rms eps 1e-5, untied, no biases, max_pos 131072. An invalid p gives tiny. */
void apb_preset_config(apb_preset p, apb_model_config *cfg, int *scorer_width);
/* A model with seeded random weights, built in memory (no files), scaled so that activations stay in
 * a realistic range through every layer (hidden-state RMS about 1). Retaining heads included. The
 * same (p, seed) gives bitwise the same weights on every machine and for any thread count.
 * The memory needed (apb_model_param_count x 4 bytes: about 32 GB for llama3-8b-shape, which is meant
 * for the GPU machines) is checked against the memory available before anything is allocated;
 * APB_ENOMEM with a message saying so when it does not fit. */
apb_status apb_model_generate(apb_preset p, uint64_t seed, apb_model **out, apb_error *err);
/* The same for any configuration (a preset's, changed, e.g. more KV heads for a test that needs H
 * to divide them): weights drawn as for the presets (docs/model.md), retaining heads of width
 * scorer_width when > 0 (at most 2^20). The configuration is checked first (apb_config_check); then
 * errors as apb_model_create's (APB_ENOMEM when it does not fit in memory). */
apb_status apb_model_generate_config(const apb_model_config *cfg, int scorer_width, uint64_t seed, apb_model **out,
                                     apb_error *err);
/* Write a model to dir (created if missing): config.json (old transformers form, readable by
 * transformers 5.x and by apb_config_load), model.safetensors in BF16 (bf16 != 0, rounded to nearest
 * even) or F32 with unfused HF names, and APB_HEADS_FILE in the same dtype when the model has
 * retaining heads. Each file is written atomically; when the weights or heads fail after config.json
 * was written, all three files are removed (an earlier model's files left beside the new config would
 * load as one model). apb_model_load(dir, dir/APB_HEADS_FILE) reads it back: bitwise for F32,
 * bf16-rounded for BF16. */
apb_status apb_model_save(const apb_model *m, const char *dir, int bf16, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_MODEL_H */
