/* gpu/gen.cu: the generated preset models (apb/model.h, lib/gen.c) made directly on the GPU, for
 * apb_bmodel_generate on a "cuda" backend (apb/backend.h, apb/cuda.h).
 *
 * What it is: apb_cuda_bmodel_generate_config makes an apb_model that holds only the configuration and the
 * retaining-head width (every weight pointer NULL: nothing is on the host; llama3-8b-shape would need
 * 32 GB there) and an apb_bmodel that owns it, whose every weight is allocated on the device and filled
 * by a kernel. Values come from a counter-based hash: element i of tensor `id` is
 * splitmix64(splitmix64(seed ^ splitmix64(id)) + i), whose top 24 bits give u in [0, 1), and the value
 * is lo + (hi - lo) * u, rounded once to the act dtype. The distributions and scales are exactly those
 * of lib/gen.c (uniform with the documented mean and standard deviation per tensor, the same tensor ids),
 * so activations stay at realistic magnitudes through every layer; the NUMBERS are not lib/gen.c's
 * (that draws from xoshiro streams on the CPU), so a GPU-generated model is not the CPU-generated model
 * of the same seed. Runs that must compare the two paths build the weights with apb_model_generate on
 * the host and apb_bmodel_create on each backend instead. The same (preset, seed, act) gives bitwise
 * the same weights on every run.
 *
 * What it deliberately is not: a loader, or a source of meaningful weights.
 *
 * Tested in tests/check_gpu_agree.c: the tiny preset generated on the GPU has each tensor's mean,
 * standard deviation and range as lib/gen.c documents, is bitwise reproducible, is freed with its
 * bmodel, and runs through a dense prefill with a final hidden-state RMS close to the CPU model's.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_int.h"

#define CU_THREADS 256

/* ================================================================ device helpers */

__host__ __device__ __forceinline__ uint64_t splitmix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* ================================================================ kernel and launcher */

/* x [n] = lo + width * u(key, i), u in [0, 1) with 24 random bits; T is the storage type. */
template <typename T>
__global__ void fill_kernel(T *x, int64_t n, uint64_t key, float lo, float width) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float u = (float)(splitmix(key + (uint64_t)i) >> 40) * (1.0f / 16777216.0f);
    st_f(x + i, fmaf(width, u, lo));
  }
}

/* Fill x [n] of dtype dt with uniform values of this mean and standard deviation from stream (seed, id). */
static apb_status fill(cu_be *c, void *x, apb_dtype dt, int64_t n, uint64_t seed, uint64_t id, double mean,
                       double std_, apb_error *err) {
  apb_status st = APB_OK;
  const double half = std_ * sqrt(3.0);
  const uint64_t key = splitmix(seed ^ splitmix(id));
  const unsigned g = cu_blocks(n, CU_THREADS, 65535u * 4u);
  if (n <= 0) return APB_OK;
  if (dt == APB_DT_BF16)
    fill_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((apb_bf16 *)x, n, key, (float)(mean - half),
                                                            (float)(2 * half));
  else
    fill_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((float *)x, n, key, (float)(mean - half), (float)(2 * half));
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ the model */

/* Tensor ids and scales: lib/gen.c's. */
enum { ID_EMBED = 1, ID_FINAL_NORM, ID_LM_HEAD, ID_LAYER0 = 100, IDS_PER_LAYER = 16 };
enum { K_ATTN_NORM, K_WQ_K, K_WV, K_BQKV, K_WO, K_BO, K_FFN_NORM, K_GATE_UP, K_BGU, K_DOWN, K_BDOWN, K_FC1, K_FC2 };

/* A device weight [N, K] (+ bias) with its values drawn: w from (id, mean, std), the bias from bias_id
 * with std 0.02 (the bias is fp32 storage holding bf16-rounded values in BF16 mode). */
static apb_status mkw(cu_be *c, int64_t N, int64_t K, uint64_t seed, uint64_t id, double mean, double std_,
                      int has_bias, uint64_t bias_id, apb_bweight **out, apb_error *err) {
  apb_status st = cu_weight_new(c, N, K, has_bias, out, err);
  if (st == APB_OK) st = fill(c, (*out)->w, (*out)->dt, N * K, seed, id, mean, std_, err);
  if (st == APB_OK && has_bias) st = fill(c, (*out)->b, APB_DT_F32, N, seed, bias_id, 0.0, 0.02, err);
  if (st == APB_OK && has_bias && (*out)->dt == APB_DT_BF16) st = cu_round_bf16_f32(c, (*out)->b, (size_t)N, err);
  return st;
}

extern "C" apb_status apb_cuda_bmodel_generate_config(apb_backend *be, const apb_model_config *cfg, int scorer_width,
                                                      uint64_t seed, apb_bmodel **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "bmodel_generate: out is NULL");
  *out = NULL;
  if (!cu_is_instance(be)) return apb_error_set(err, APB_EINVAL, "bmodel_generate: be is not a CUDA backend instance");
  if (!cfg) return apb_error_set(err, APB_EINVAL, "bmodel_generate: NULL configuration");
  apb_status st = apb_config_check(cfg, err);
  if (st != APB_OK) return st;
  if (scorer_width < 0 || scorer_width > (1 << 20))
    return apb_error_set(err, APB_EINVAL, "bmodel_generate: retaining-head width %d; apb takes 0 (none) to %d",
                         scorer_width, 1 << 20);
  cu_be *c = cu_of(be);
  st = cu_enter(c, err);
  if (st != APB_OK) return st;
  apb_bmodel *bm = NULL;
  apb_model *m = (apb_model *)calloc(1, sizeof *m);
  if (!m) return apb_error_set(err, APB_ENOMEM, "bmodel_generate: out of host memory");
  const int I = scorer_width;
  m->cfg = *cfg;
  m->scorer_width = I;
  const apb_model_config *cf = &m->cfg;
  const int L = cf->n_layers;
  const int64_t E = cf->hidden, F = cf->ffn, V = cf->vocab, QD = (int64_t)cf->n_heads * cf->head_dim,
                KD = (int64_t)cf->n_kv_heads * cf->head_dim, QKV = QD + 2 * KD;
  const double branch = 1.0 / sqrt(2.0 * L), norm_std = 0.1 / sqrt(3.0);
  m->layers = (apb_layer *)calloc((size_t)L, sizeof *m->layers);
  bm = (apb_bmodel *)calloc(1, sizeof *bm);
  if (bm) {
    bm->m = m;
    bm->owned = m;
    bm->layers = (apb_bmodel::apb_blayer *)calloc((size_t)L, sizeof *bm->layers);
  }
  if (!m->layers || !bm || !bm->layers) {
    st = apb_error_set(err, APB_ENOMEM, "bmodel_generate: out of host memory for %d layers", L);
    goto fail;
  }
  APB_TRY(mkw(c, V, E, seed, ID_EMBED, 0, 1, 0, 0, &bm->embed, err));
  APB_TRY(mkw(c, 1, E, seed, ID_FINAL_NORM, 1, norm_std, 0, 0, &bm->final_norm, err));
  if (cf->tie_embeddings)
    bm->lm_head = bm->embed;
  else
    APB_TRY(mkw(c, V, E, seed, ID_LM_HEAD, 0, 1 / sqrt((double)E), 0, 0, &bm->lm_head, err));
  for (int l = 0; l < L; l++) {
    apb_bmodel::apb_blayer *y = &bm->layers[l];
    const uint64_t id = ID_LAYER0 + (uint64_t)l * IDS_PER_LAYER;
    APB_TRY(mkw(c, 1, E, seed, id + K_ATTN_NORM, 1, norm_std, 0, 0, &y->attn_norm, err));
    /* wqkv [QKV, E]: q and k rows std sqrt(2/E), v rows std 1/sqrt(E) (two draws into one weight) */
    APB_TRY(mkw(c, QKV, E, seed, id + K_WQ_K, 0, sqrt(2.0 / (double)E), cf->qkv_bias, id + K_BQKV, &y->wqkv, err));
    APB_TRY(fill(c, (char *)y->wqkv->w + (size_t)((QD + KD) * E) * apb_act_size(be), be->act, KD * E, seed,
                 id + K_WV, 0, 1 / sqrt((double)E), err));
    APB_TRY(mkw(c, E, QD, seed, id + K_WO, 0, branch / sqrt((double)QD), cf->o_bias, id + K_BO, &y->wo, err));
    APB_TRY(mkw(c, 1, E, seed, id + K_FFN_NORM, 1, norm_std, 0, 0, &y->ffn_norm, err));
    APB_TRY(mkw(c, 2 * F, E, seed, id + K_GATE_UP, 0, 1 / sqrt((double)E), cf->mlp_bias, id + K_BGU, &y->w_gate_up,
                err));
    APB_TRY(mkw(c, E, F, seed, id + K_DOWN, 0, branch / sqrt((double)F), cf->mlp_bias, id + K_BDOWN, &y->w_down, err));
    if (I > 0) {
      APB_TRY(mkw(c, I, QKV, seed, id + K_FC1, 0, 1 / sqrt((double)QKV), 0, 0, &y->fc1, err));
      APB_TRY(mkw(c, cf->n_kv_heads, I, seed, id + K_FC2, 0, 1 / sqrt((double)I), 0, 0, &y->fc2, err));
    }
  }
  APB_CU(cudaStreamSynchronize(c->stream));
  *out = bm;
  return APB_OK;
done:
fail:
  if (bm) {
    apb_bmodel_destroy(be, bm); /* frees the owned config-only model too */
  } else {
    free(m->layers);
    free(m);
  }
  return apb_error_set(err, st, "bmodel_generate: L %d, E %d, Hq %d, Hkv %d, D %d, V %d on device %d (%s)",
                       cfg->n_layers, cfg->hidden, cfg->n_heads, cfg->n_kv_heads, cfg->head_dim, cfg->vocab, c->dev,
                       apb_dtype_name(be->act));
}
