/* lib/gen.c: the presets and their seeded random weights (apb/model.h).
 *
 * Presets (sizes in apb/model.h and docs/model.md): tiny and small are for tests and CPU runs, sized
 * so that a 16K-token document runs through tiny on two cores in seconds (V 4096 keeps the embedding
 * table and the one lm_head row of logits cheap; F = 4E); llama3-8b-shape has Llama-3.1-8B's shapes
 * and the published retaining-head width I = 1024, and is meant for the GPU machines (about 32 GB in
 * fp32).
 *
 * Weights are drawn uniform with the standard deviation below (uniform rather than normal: it is
 * bounded and several times cheaper, which matters for the 8 billion values of llama3-8b-shape; only
 * the scale matters for keeping activations realistic):
 *   embed                 std 1                  residual stream starts at RMS ~1
 *   norms (all)           uniform [0.9, 1.1]     near 1, not exactly (so a dropped norm is caught)
 *   q and k rows of wqkv  std sqrt(2/E)          q.k/sqrt(D) ~ std 2 after RMSNorm: attention is
 *                                                peaked enough that which keys are kept matters
 *   v rows of wqkv        std 1/sqrt(E)
 *   wo                    std 1/sqrt(Hq D) / sqrt(2L)   each residual branch adds ~1/(2L) of variance,
 *   w_down                std 1/sqrt(F) / sqrt(2L)      so the stream ends near RMS sqrt(2), not sqrt(2L)
 *   gate and up           std 1/sqrt(E)
 *   lm_head               std 1/sqrt(E)          logits ~ N(0, 1)
 *   fc1                   std 1/sqrt((Hq+2Hkv) D), fc2 std 1/sqrt(I): retaining scores vary from token
 *                                                to token with std ~0.5 (non-degenerate top-k)
 *   biases (none in the presets; models made otherwise)  std 0.02
 * The residual-stream RMS is measured layer by layer in tests/check_model.c.
 *
 * Determinism: every tensor has a fixed id, and is filled in chunks of 64K values, each from its own
 * xoshiro stream seeded from (seed, id, chunk). The chunks are spread over OpenMP threads, so the
 * result is bitwise the same for any thread count, and llama3-8b-shape fills in seconds on 16 cores.
 *
 * What it deliberately is not: a trained model. Outputs are meaningless text; the presets exist to
 * exercise shapes, speed and the APB-vs-dense agreement machinery.
 */
#include <math.h>
#include <string.h>

#include "apb/model.h"
#include "apb/rng.h"

typedef struct preset_def {
  const char *name;
  int L, E, F, Hq, Hkv, D, V, I;
  int llama3;
} preset_def;

static const preset_def presets[APB_PRESET_COUNT] = {
    [APB_PRESET_TINY] = {"tiny", 2, 256, 1024, 4, 2, 64, 4096, 128, 0},
    [APB_PRESET_SMALL] = {"small", 4, 512, 2048, 8, 2, 64, 8192, 256, 0},
    [APB_PRESET_LLAMA3_8B] = {"llama3-8b-shape", 32, 4096, 14336, 32, 8, 128, 128256, 1024, 1},
};

int apb_preset_parse(const char *name, apb_preset *out) {
  if (!name) return -1;
  for (int p = 0; p < APB_PRESET_COUNT; p++)
    if (strcmp(name, presets[p].name) == 0) {
      if (out) *out = (apb_preset)p;
      return 0;
    }
  return -1;
}

const char *apb_preset_name(apb_preset p) { return (unsigned)p < APB_PRESET_COUNT ? presets[p].name : "?"; }

void apb_preset_config(apb_preset p, apb_model_config *cfg, int *scorer_width) {
  if ((unsigned)p >= APB_PRESET_COUNT) p = APB_PRESET_TINY;
  const preset_def *d = &presets[p];
  if (scorer_width) *scorer_width = d->I;
  if (!cfg) return;
  memset(cfg, 0, sizeof *cfg);
  strcpy(cfg->arch, "LlamaForCausalLM");
  cfg->n_layers = d->L;
  cfg->hidden = d->E;
  cfg->ffn = d->F;
  cfg->n_heads = d->Hq;
  cfg->n_kv_heads = d->Hkv;
  cfg->head_dim = d->D;
  cfg->vocab = d->V;
  cfg->rms_eps = 1e-5;
  cfg->max_pos = 131072;
  cfg->rope.theta = 500000.0;
  cfg->rope.factor = 1.0;
  if (d->llama3) {
    cfg->rope.type = APB_ROPE_LLAMA3;
    cfg->rope.factor = 8.0;
    cfg->rope.low_freq_factor = 1.0;
    cfg->rope.high_freq_factor = 4.0;
    cfg->rope.original_max_pos = 8192;
  }
}

/* ---------------------------------------------------------------- filling */

#define CHUNK ((int64_t)1 << 16)

static uint64_t derive(uint64_t a, uint64_t b) {
  apb_rng r;
  apb_rng_seed(&r, a ^ (b * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull));
  return apb_rng_u64(&r);
}

/* x [n] = uniform with this mean and standard deviation, from stream (seed, id). */
static void fill(float *x, int64_t n, uint64_t seed, uint64_t id, double mean, double std) {
  if (!x || n <= 0) return;
  const uint64_t s = derive(seed, id);
  const double half = std * sqrt(3.0);
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; c++) {
    apb_rng r;
    apb_rng_seed(&r, derive(s, (uint64_t)c));
    int64_t lo = c * CHUNK, len = n - lo < CHUNK ? n - lo : CHUNK;
    apb_rng_fill_uniform(&r, x + lo, (size_t)len, (float)(mean - half), (float)(mean + half));
  }
}

/* The storage of a model made by apb_model_create is its own and writable. */
static float *w(const float *p) { return (float *)(uintptr_t)p; }

enum { ID_EMBED = 1, ID_FINAL_NORM, ID_LM_HEAD, ID_LAYER0 = 100, IDS_PER_LAYER = 16 };
enum { K_ATTN_NORM, K_WQ_K, K_WV, K_BQKV, K_WO, K_BO, K_FFN_NORM, K_GATE_UP, K_BGU, K_DOWN, K_BDOWN, K_FC1, K_FC2 };

/* Fill every tensor of m (made by apb_model_create) as described at the top of the file. */
static void fill_model(apb_model *m, uint64_t seed) {
  const apb_model_config *c = &m->cfg;
  const int64_t E = c->hidden, F = c->ffn, V = c->vocab, QD = (int64_t)c->n_heads * c->head_dim,
                KD = (int64_t)c->n_kv_heads * c->head_dim, QKV = QD + 2 * KD, I = m->scorer_width;
  const double branch = 1.0 / sqrt(2.0 * c->n_layers), bias_std = 0.02;
  fill(w(m->embed), V * E, seed, ID_EMBED, 0, 1);
  fill(w(m->final_norm), E, seed, ID_FINAL_NORM, 1, 0.1 / sqrt(3.0));
  if (m->lm_head != m->embed) fill(w(m->lm_head), V * E, seed, ID_LM_HEAD, 0, 1 / sqrt((double)E));
  for (int l = 0; l < c->n_layers; l++) {
    const apb_layer *y = &m->layers[l];
    uint64_t id = ID_LAYER0 + (uint64_t)l * IDS_PER_LAYER;
    fill(w(y->attn_norm), E, seed, id + K_ATTN_NORM, 1, 0.1 / sqrt(3.0));
    fill(w(y->wqkv), (QD + KD) * E, seed, id + K_WQ_K, 0, sqrt(2.0 / (double)E));
    fill(w(y->wqkv) + (QD + KD) * E, KD * E, seed, id + K_WV, 0, 1 / sqrt((double)E));
    fill(w(y->bqkv), QKV, seed, id + K_BQKV, 0, bias_std);
    fill(w(y->wo), E * QD, seed, id + K_WO, 0, branch / sqrt((double)QD));
    fill(w(y->bo), E, seed, id + K_BO, 0, bias_std);
    fill(w(y->ffn_norm), E, seed, id + K_FFN_NORM, 1, 0.1 / sqrt(3.0));
    fill(w(y->w_gate_up), 2 * F * E, seed, id + K_GATE_UP, 0, 1 / sqrt((double)E));
    fill(w(y->b_gate_up), 2 * F, seed, id + K_BGU, 0, bias_std);
    fill(w(y->w_down), E * F, seed, id + K_DOWN, 0, branch / sqrt((double)F));
    fill(w(y->b_down), E, seed, id + K_BDOWN, 0, bias_std);
    if (I > 0) {
      fill(w(y->fc1), I * QKV, seed, id + K_FC1, 0, 1 / sqrt((double)QKV));
      fill(w(y->fc2), (int64_t)c->n_kv_heads * I, seed, id + K_FC2, 0, 1 / sqrt((double)I));
    }
  }
}

apb_status apb_model_generate_config(const apb_model_config *cfg, int scorer_width, uint64_t seed, apb_model **out,
                                     apb_error *err) {
  apb_error_clear(err);
  if (!out) return apb_error_set(err, APB_EINVAL, "apb_model_generate_config: NULL output");
  *out = NULL;
  if (!cfg) return apb_error_set(err, APB_EINVAL, "apb_model_generate_config: NULL configuration");
  apb_status st = apb_config_check(cfg, err);
  if (st != APB_OK) return st;
  if (scorer_width < 0 || scorer_width > (1 << 20))
    return apb_error_set(err, APB_EINVAL, "retaining-head width %d; apb takes 0 (none) to %d", scorer_width, 1 << 20);
  apb_model *m;
  st = apb_model_create(cfg, scorer_width, &m, err);
  if (st != APB_OK) return st;
  fill_model(m, seed);
  *out = m;
  return APB_OK;
}

apb_status apb_model_generate(apb_preset p, uint64_t seed, apb_model **out, apb_error *err) {
  apb_error_clear(err);
  if (!out) return apb_error_set(err, APB_EINVAL, "apb_model_generate: NULL output");
  *out = NULL;
  if ((unsigned)p >= APB_PRESET_COUNT)
    return apb_error_set(err, APB_EINVAL, "apb_model_generate: unknown preset %d (expected 0..%d)", (int)p,
                         APB_PRESET_COUNT - 1);
  apb_model_config cfg;
  int I;
  apb_preset_config(p, &cfg, &I);
  apb_status st = apb_model_generate_config(&cfg, I, seed, out, err);
  if (st != APB_OK) {
    if (p == APB_PRESET_LLAMA3_8B)
      return apb_error_set(err, st,
                           "preset %s is meant for the GPU machines (%.1f GB of fp32 weights; they have 128 GiB "
                           "of host memory)",
                           presets[p].name, (double)apb_model_param_count(&cfg, I) * 4 / 1e9);
    return apb_error_set(err, st, "preset %s", presets[p].name);
  }
  return APB_OK;
}
