/* lib/backend.c: the backend-independent entry points of apb/backend.h: creation by name, destroy,
 * memory accounting, and a model's weights in backend memory (apb_bmodel).
 *
 * What it is: dispatch and bookkeeping. "naive" and "fast" are ref/backend_naive.c and
 * ref/backend_fast.c; "cuda", "cuda-bf16" and "cuda-f32" go to apb_backend_cuda (gpu/, or the
 * APB_ENODEVICE stub of lib/cuda_stub.c when built without CUDA). apb_bmodel_create makes every weight
 * of an apb_model through be->ops->weight_create, in the fused layouts of apb/model.h;
 * apb_bmodel_generate makes a preset's weights (on the host for the CPU backends, on the device for
 * CUDA through apb_cuda_bmodel_generate_config) and the bmodel then owns its apb_model.
 *
 * What it deliberately is not: a registry or plugin system; the names are a fixed list.
 *
 * Tested in tests/check_backend.c (creation by name, unknown names, a generated model's weights).
 */
#include "apb/backend.h"

#include <stdlib.h>
#include <string.h>

#include "apb/cuda.h"

apb_status apb_backend_create(const char *name, int device, const apb_cpu_opts *o, apb_backend **out,
                              apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "backend_create: out is NULL");
  *out = NULL;
  if (!name) return apb_error_set(err, APB_EINVAL, "backend_create: name is NULL");
  if (device < 0) device = 0;
  if (strcmp(name, "naive") == 0) return apb_backend_naive(o, out, err);
  if (strcmp(name, "fast") == 0) return apb_backend_fast(o, out, err);
  if (strcmp(name, "cuda") == 0 || strcmp(name, "cuda-bf16") == 0)
    return apb_backend_cuda(device, APB_DT_BF16, out, err);
  if (strcmp(name, "cuda-f32") == 0) return apb_backend_cuda(device, APB_DT_F32, out, err);
  return apb_error_set(err, APB_EINVAL,
                       "backend_create: unknown backend '%s' (known: naive, fast, cuda, cuda-bf16, cuda-f32)", name);
}

void apb_backend_destroy(apb_backend *be) {
  if (be && be->ops && be->ops->destroy) be->ops->destroy(be);
}

apb_status apb_backend_mem(const apb_backend *be, size_t *current, size_t *peak) {
  if (current) *current = 0;
  if (peak) *peak = 0;
  if (!be || !be->ops) return APB_EINVAL;
  if (!be->ops->mem) return APB_EUNSUPPORTED;
  be->ops->mem(be, current, peak);
  return APB_OK;
}

/* ---------------------------------------------------------------- apb_bmodel */

static apb_status mkw(apb_backend *be, const char *what, int layer, const float *w, int64_t N, int64_t K,
                      const float *bias, apb_bweight **out, apb_error *err) {
  if (!w) {
    if (layer >= 0)
      return apb_error_set(err, APB_EINVAL, "bmodel_create: layer %d: %s is NULL in the model", layer, what);
    return apb_error_set(err, APB_EINVAL, "bmodel_create: %s is NULL in the model", what);
  }
  apb_status st = be->ops->weight_create(be, w, N, K, bias, out, err);
  if (st != APB_OK) {
    if (layer >= 0) return apb_error_set(err, st, "bmodel_create: layer %d: %s [%lld, %lld]", layer, what,
                                         (long long)N, (long long)K);
    return apb_error_set(err, st, "bmodel_create: %s [%lld, %lld]", what, (long long)N, (long long)K);
  }
  return APB_OK;
}

apb_status apb_bmodel_create(apb_backend *be, const apb_model *m, apb_bmodel **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "bmodel_create: out is NULL");
  *out = NULL;
  if (!be || !m) return apb_error_set(err, APB_EINVAL, "bmodel_create: %s is NULL", !be ? "be" : "m");
  const apb_model_config *c = &m->cfg;
  if (c->n_layers < 0 || c->hidden < 1 || c->ffn < 1 || c->n_heads < 1 || c->n_kv_heads < 1 || c->head_dim < 1 ||
      c->vocab < 1)
    return apb_error_set(err, APB_EINVAL,
                         "bmodel_create: bad configuration (L=%d, E=%d, F=%d, Hq=%d, Hkv=%d, D=%d, V=%d)",
                         c->n_layers, c->hidden, c->ffn, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab);
  const int64_t E = c->hidden, F = c->ffn, V = c->vocab, Iw = m->scorer_width;
  const int64_t QKV = ((int64_t)c->n_heads + 2 * (int64_t)c->n_kv_heads) * c->head_dim;
  const int64_t HD = (int64_t)c->n_heads * c->head_dim;

  apb_bmodel *bm = calloc(1, sizeof *bm);
  if (!bm) return apb_error_set(err, APB_ENOMEM, "bmodel_create: cannot allocate the model");
  bm->m = m;
  if (c->n_layers > 0) {
    bm->layers = calloc((size_t)c->n_layers, sizeof *bm->layers);
    if (!bm->layers) {
      free(bm);
      return apb_error_set(err, APB_ENOMEM, "bmodel_create: cannot allocate %d layers", c->n_layers);
    }
  }
  apb_status st;
  if ((st = mkw(be, "embed", -1, m->embed, V, E, NULL, &bm->embed, err)) ||
      (st = mkw(be, "final_norm", -1, m->final_norm, 1, E, NULL, &bm->final_norm, err)))
    goto fail;
  if (m->lm_head == m->embed)
    bm->lm_head = bm->embed; /* tied: one weight, destroyed once */
  else if ((st = mkw(be, "lm_head", -1, m->lm_head, V, E, NULL, &bm->lm_head, err)))
    goto fail;
  for (int l = 0; l < c->n_layers; l++) {
    const apb_layer *L = &m->layers[l];
    struct apb_blayer *B = &bm->layers[l];
    if ((st = mkw(be, "attn_norm", l, L->attn_norm, 1, E, NULL, &B->attn_norm, err)) ||
        (st = mkw(be, "wqkv", l, L->wqkv, QKV, E, L->bqkv, &B->wqkv, err)) ||
        (st = mkw(be, "wo", l, L->wo, E, HD, L->bo, &B->wo, err)) ||
        (st = mkw(be, "ffn_norm", l, L->ffn_norm, 1, E, NULL, &B->ffn_norm, err)) ||
        (st = mkw(be, "w_gate_up", l, L->w_gate_up, 2 * F, E, L->b_gate_up, &B->w_gate_up, err)) ||
        (st = mkw(be, "w_down", l, L->w_down, E, F, L->b_down, &B->w_down, err)))
      goto fail;
    if (Iw > 0 && (L->fc1 || L->fc2)) {
      if ((st = mkw(be, "fc1", l, L->fc1, Iw, QKV, NULL, &B->fc1, err)) ||
          (st = mkw(be, "fc2", l, L->fc2, c->n_kv_heads, Iw, NULL, &B->fc2, err)))
        goto fail;
    }
  }
  *out = bm;
  return APB_OK;
fail:
  apb_bmodel_destroy(be, bm);
  return st;
}

void apb_bmodel_destroy(apb_backend *be, apb_bmodel *bm) {
  if (!bm) return;
  void (*wd)(apb_backend *, apb_bweight *) = be->ops->weight_destroy;
  if (bm->layers)
    for (int l = 0; l < bm->m->cfg.n_layers; l++) {
      struct apb_blayer *B = &bm->layers[l];
      apb_bweight *ws[] = {B->attn_norm, B->wqkv, B->wo, B->ffn_norm, B->w_gate_up, B->w_down, B->fc1, B->fc2};
      for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
        if (ws[i]) wd(be, ws[i]);
    }
  if (bm->lm_head && bm->lm_head != bm->embed) wd(be, bm->lm_head);
  if (bm->embed) wd(be, bm->embed);
  if (bm->final_norm) wd(be, bm->final_norm);
  free(bm->layers);
  apb_model_free(bm->owned); /* last: the loop above read its configuration */
  free(bm);
}

apb_status apb_bmodel_generate_config(apb_backend *be, const apb_model_config *cfg, int scorer_width, uint64_t seed,
                                      apb_bmodel **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "bmodel_generate: out is NULL");
  *out = NULL;
  if (!be || !be->ops) return apb_error_set(err, APB_EINVAL, "bmodel_generate: be is NULL");
  if (be->device >= 0) return apb_cuda_bmodel_generate_config(be, cfg, scorer_width, seed, out, err); /* CUDA */
  apb_model *m = NULL;
  apb_status st = apb_model_generate_config(cfg, scorer_width, seed, &m, err);
  if (st != APB_OK) return st;
  if ((st = apb_bmodel_create(be, m, out, err)) != APB_OK) {
    apb_model_free(m);
    return st;
  }
  (*out)->owned = m;
  return APB_OK;
}

apb_status apb_bmodel_generate(apb_backend *be, apb_preset p, uint64_t seed, apb_bmodel **out, apb_error *err) {
  if (out) *out = NULL;
  if ((unsigned)p >= APB_PRESET_COUNT)
    return apb_error_set(err, APB_EINVAL, "bmodel_generate: unknown preset %d (expected 0..%d)", (int)p,
                         APB_PRESET_COUNT - 1);
  apb_model_config cfg;
  int I = 0;
  apb_preset_config(p, &cfg, &I);
  apb_status st = apb_bmodel_generate_config(be, &cfg, I, seed, out, err);
  /* the allocation's own message says how much memory it needed and found */
  return st == APB_OK ? st : apb_error_set(err, st, "preset %s", apb_preset_name(p));
}
