/* sched/decode.c: the query and greedy decode phase (shared/APB.md 4), the same for every method.
 *
 * The query tokens, then each generated token, run through every layer on every host. Each host
 * attends the new rows to its whole KV cache (the cache precedes the new tokens); the last host also
 * attends them to their own keys causally (with --balance the last virtual host lives on host 0). The per-host (output, LSE) pairs are all-gathered and
 * merged in host order (a host whose rows see no key contributes lse = -inf, never NaN), so every
 * host holds the same merged output and computes the same rest of the layer. Only the last host
 * appends the new tokens' K/V to its cache. The logits of the last row give the next token: argmax
 * (ties toward the lower id) on the last host, broadcast to all. A NaN or Inf logit (the query's, or a
 * decode step's) is APB_ENONFINITE naming it, checked on every host (all hold the same logits), never a
 * token picked past it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sched_int.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct dec_bufs {
  int32_t *ids, *pos, *tok;
  void *x, *hb, *qkv, *q, *k, *v, *o, *gu, *ff, *all_o, *logits;
  float *lse, *all_lse;
  size_t *ob, *lb;
} dec_bufs;

static void dec_free(host_ctx *h, dec_bufs *d) {
  void *b[] = {d->ids, d->pos, d->tok, d->x, d->hb, d->qkv, d->q, d->k, d->v, d->o, d->gu, d->ff,
               d->all_o, d->logits, d->lse, d->all_lse};
  for (size_t i = 0; i < sizeof b / sizeof *b; i++) sched_free(h, b[i]);
  free(d->ob);
  free(d->lb);
}

static apb_status dec_alloc(host_ctx *h, dec_bufs *d, int64_t M, apb_error *err) {
  size_t es = h->es, m = (size_t)M, H = (size_t)h->H, qw = (size_t)h->Hq * h->D, kw = (size_t)h->Hkv * h->D;
  apb_status st;
  d->ob = calloc(H, sizeof *d->ob);
  d->lb = calloc(H, sizeof *d->lb);
  if (!d->ob || !d->lb) return apb_error_set(err, APB_ENOMEM, "decode: out of memory");
  if ((st = sched_alloc(h, m * sizeof(int32_t), (void **)&d->ids, err)) ||
      (st = sched_alloc(h, m * sizeof(int32_t), (void **)&d->pos, err)) ||
      (st = sched_alloc(h, sizeof(int32_t), (void **)&d->tok, err)) ||
      (st = sched_alloc(h, m * (size_t)h->E * es, &d->x, err)) ||
      (st = sched_alloc(h, m * (size_t)h->E * es, &d->hb, err)) ||
      (st = sched_alloc(h, m * (size_t)h->QKV * es, &d->qkv, err)) ||
      (st = sched_alloc(h, m * qw * es, &d->q, err)) || (st = sched_alloc(h, m * kw * es, &d->k, err)) ||
      (st = sched_alloc(h, m * kw * es, &d->v, err)) || (st = sched_alloc(h, m * qw * es, &d->o, err)) ||
      (st = sched_alloc(h, m * 2 * (size_t)h->F * es, &d->gu, err)) ||
      (st = sched_alloc(h, m * (size_t)h->F * es, &d->ff, err)) ||
      (st = sched_alloc(h, H * m * qw * es, &d->all_o, err)) ||
      (st = sched_alloc(h, (size_t)h->V * es, &d->logits, err)) ||
      (st = sched_alloc(h, m * (size_t)h->Hq * sizeof(float), (void **)&d->lse, err)) ||
      (st = sched_alloc(h, H * m * (size_t)h->Hq * sizeof(float), (void **)&d->all_lse, err)))
    return st;
  return APB_OK;
}

/* One pass of M new rows (ids_h, positions pos0..) through every layer; logits of the last row into
 * logits_h [V]. */
static apb_status dec_step(host_ctx *h, dec_bufs *d, const int32_t *ids_h, int64_t M, int64_t pos0, float *logits_h,
                           apb_error *err) {
  apb_backend *be = h->be;
  const apb_model_config *cfg = h->cfg;
  int H = h->H, last = h->r == h->p->last_rank;
  size_t es = h->es, qw = (size_t)h->Hq * h->D, kw = (size_t)h->Hkv * h->D;
  apb_status st;
  int32_t *pos_h = malloc(sizeof(int32_t) * (size_t)M);
  if (!pos_h) return apb_error_set(err, APB_ENOMEM, "decode: out of memory");
  for (int64_t i = 0; i < M; i++) pos_h[i] = (int32_t)(pos0 + i);
  st = be->ops->upload(be, d->ids, ids_h, sizeof(int32_t) * (size_t)M, err);
  if (!st) st = be->ops->upload(be, d->pos, pos_h, sizeof(int32_t) * (size_t)M, err);
  free(pos_h);
  if (!st) st = be->ops->embed(be, h->bm->embed, d->ids, M, d->x, err);
  for (int r = 0; r < H; r++) d->ob[r] = (size_t)M * qw * es, d->lb[r] = (size_t)M * (size_t)h->Hq * sizeof(float);
  void *my_o = (char *)d->all_o + (size_t)h->r * d->ob[0];
  float *my_lse = d->all_lse + (size_t)h->r * (size_t)M * (size_t)h->Hq;
  for (int l = 0; !st && l < cfg->n_layers; l++) {
    const struct apb_blayer *lw = &h->bm->layers[l];
    if ((st = be->ops->rmsnorm(be, lw->attn_norm, (float)cfg->rms_eps, d->x, M, d->hb, err)) ||
        (st = be->ops->linear(be, lw->wqkv, d->hb, M, d->qkv, err)) ||
        (st = be->ops->split_rope(be, d->qkv, M, h->Hq, h->Hkv, h->D, d->pos, &cfg->rope, d->q, d->k, d->v, err)))
      break;
    apb_battn_args a = {.P = h->cache_len, .A = 0, .B = M, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D,
                        .local_keys = last, .q = d->q, .kp = h->kc[l], .vp = h->vc[l], .kb = d->k, .vb = d->v,
                        .o = my_o, .lse = my_lse};
    if ((st = be->ops->attn(be, &a, err))) break;
    if (H > 1 && ((st = h->comm->ops->allgatherv(h->comm, my_o, d->all_o, d->ob, err)) ||
                  (st = h->comm->ops->allgatherv(h->comm, my_lse, d->all_lse, d->lb, err))))
      break;
    const void **op = malloc(sizeof(void *) * (size_t)H);
    const float **lp = malloc(sizeof(float *) * (size_t)H);
    if (!op || !lp) {
      free(op), free(lp);
      st = apb_error_set(err, APB_ENOMEM, "decode: out of memory");
      break;
    }
    for (int r = 0; r < H; r++) {
      op[r] = (char *)d->all_o + (size_t)r * d->ob[0];
      lp[r] = d->all_lse + (size_t)r * (size_t)M * (size_t)h->Hq;
    }
    st = be->ops->merge(be, H, op, lp, M, h->Hq, h->D, d->o, d->lse, err);
    free(op), free(lp);
    if (st) break;
    if (last) { /* only the last host keeps the new tokens' K/V (APB.md 4) */
      if ((st = be->ops->copy(be, (char *)h->kc[l] + (size_t)h->cache_len * kw * es, d->k, (size_t)M * kw * es, err)) ||
          (st = be->ops->copy(be, (char *)h->vc[l] + (size_t)h->cache_len * kw * es, d->v, (size_t)M * kw * es, err)))
        break;
    }
    if ((st = be->ops->linear(be, lw->wo, d->o, M, d->hb, err)) ||
        (st = be->ops->add(be, d->x, d->hb, (size_t)M * (size_t)h->E, err)))
      break;
    for (int64_t r0 = 0; r0 < M && !st; r0 += h->chunk) { /* MLP, in the prefill's row chunks */
      int64_t n = M - r0 < h->chunk ? M - r0 : h->chunk;
      void *xc = sched_row(h, d->x, r0, h->E), *hc = sched_row(h, d->hb, r0, h->E);
      if ((st = be->ops->rmsnorm(be, lw->ffn_norm, (float)cfg->rms_eps, xc, n, hc, err)) ||
          (st = be->ops->linear(be, lw->w_gate_up, hc, n, d->gu, err)) ||
          (st = be->ops->swiglu(be, d->gu, n, h->F, d->ff, err)) ||
          (st = be->ops->linear(be, lw->w_down, d->ff, n, hc, err)) ||
          (st = be->ops->add(be, xc, hc, (size_t)n * (size_t)h->E, err)))
        break;
    }
  }
  if (last && !st) h->cache_len += M;
  /* logits of the last row */
  void *xl = sched_row(h, d->x, M - 1, h->E);
  if (!st) st = be->ops->rmsnorm(be, h->bm->final_norm, (float)cfg->rms_eps, xl, 1, d->hb, err);
  if (!st) st = be->ops->linear(be, h->bm->lm_head, d->hb, 1, d->logits, err);
  if (!st) st = be->ops->download_f32(be, logits_h, d->logits, (size_t)h->V, err);
  if (!st && h->hook) {
    int64_t sh[1] = {h->V};
    apb_hook_info info = {.stage = "logits", .phase = h->phase, .layer = -1, .host = h->r, .ndim = 1, .data = logits_h};
    info.shape[0] = sh[0];
    h->hook(h->hook_user, &info);
  }
  return st;
}

/* A NaN or Inf logit means the model's activations overflowed (or its weights hold one): argmax over it
 * would pick a token silently, so it is an error that names the first such logit. Every host computes
 * the same logits from the same merged rows, so every host fails alike, none waits on a peer. */
static apb_status check_logits(const host_ctx *h, const float *logits, int64_t step, apb_error *err) {
  for (int32_t i = 0; i < h->V; i++)
    if (!isfinite(logits[i])) {
      char when[64];
      if (step == 0) snprintf(when, sizeof when, "the query's logits");
      else snprintf(when, sizeof when, "decode step %lld", (long long)step);
      return apb_error_set(err, APB_ENONFINITE,
                           "%s: logit %d of %d is %g, not finite: the model's activations overflowed or its "
                           "weights hold a NaN/Inf", when, i, h->V, (double)logits[i]);
    }
  return APB_OK;
}

/* argmax on the last host, broadcast to every host (APB.md 4). */
static apb_status next_token(host_ctx *h, dec_bufs *d, const float *logits, int32_t *tok, apb_error *err) {
  int32_t best = 0;
  for (int32_t i = 1; i < h->V; i++)
    if (logits[i] > logits[best]) best = i;
  apb_status st = APB_OK;
  if (h->H > 1) {
    if (!st) st = h->be->ops->upload(h->be, d->tok, &best, sizeof best, err);
    if (!st) st = h->comm->ops->bcast(h->comm, d->tok, sizeof best, h->p->last_rank, err);
    if (!st) st = h->be->ops->download(h->be, &best, d->tok, sizeof best, err);
  }
  *tok = best;
  return st;
}

apb_status sched_decode(host_ctx *h, const int32_t *query, int64_t q_len, int64_t max_new, apb_host_result *res,
                        apb_error *err) {
  dec_bufs d;
  memset(&d, 0, sizeof d);
  h->phase = "query";
  int64_t saved_chunk = h->chunk;
  h->chunk = h->p->ffn_chunk < q_len ? h->p->ffn_chunk : q_len;
  double t0 = now_s();
  apb_status st = dec_alloc(h, &d, q_len, err);
  res->logits = malloc(sizeof(float) * (size_t)h->V);
  if (!st && !res->logits) st = apb_error_set(err, APB_ENOMEM, "decode: out of memory for logits");
  if (max_new > 0) {
    res->generated = malloc(sizeof(int32_t) * (size_t)max_new);
    if (!st && !res->generated) st = apb_error_set(err, APB_ENOMEM, "decode: out of memory");
  }
  if (!st) st = dec_step(h, &d, query, q_len, h->p->n, res->logits, err);
  if (!st) st = check_logits(h, res->logits, 0, err); /* returned even when nothing is generated */
  if (!st) st = h->be->ops->sync(h->be, err);
  res->stats.query_s = now_s() - t0;
  t0 = now_s();
  h->phase = "decode";
  h->chunk = 1;
  float *lg = malloc(sizeof(float) * (size_t)h->V);
  if (!st && !lg) st = apb_error_set(err, APB_ENOMEM, "decode: out of memory");
  const float *cur = res->logits;
  for (int64_t t = 0; !st && t < max_new; t++) {
    int32_t tok = 0;
    st = next_token(h, &d, cur, &tok, err);
    if (st) break;
    res->generated[t] = tok;
    res->n_generated = t + 1;
    if (t + 1 < max_new) { /* the last generated token needs no forward pass */
      st = dec_step(h, &d, &tok, 1, h->p->n + q_len + t, lg, err);
      if (!st) st = check_logits(h, lg, t + 1, err);
      cur = lg;
    }
  }
  if (!st) st = h->be->ops->sync(h->be, err);
  res->stats.decode_s = now_s() - t0;
  free(lg);
  dec_free(h, &d);
  h->chunk = saved_chunk;
  return st;
}
