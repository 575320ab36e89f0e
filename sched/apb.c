/* sched/apb.c: the attention of dense, star and apb (shared/APB.md 3.2-3.6, 5).
 *
 * A host holds [A | B] (host 0 and dense: [B]). star attends over [A | B] with APB's visibility. apb
 * first compresses its block: scores for the local rows (the retaining heads on the pre-RoPE
 * concat(q, k, v), or the random / uniform scorers), a max-pool of window w inside the block, per KV
 * head the top l_p tokens (host 0 excluding the document tokens the anchor holds; ties toward the
 * lower position; ascending order), a gather of their post-RoPE K and V rows into C_h; then two
 * all-gathers (K and V) build P_h = C_0 ++ ... ++ C_{h-1} in host order, and the attention runs over
 * [P_h | A | B_h]. Host H-1 contributes nothing (its C is needed by no one). Dense is star with no
 * anchor on one host.
 */
#include <stdlib.h>
#include <string.h>

#include "apb/rng.h"
#include "sched_int.h"

typedef struct apb_state {
  float *scores, *pooled;   /* [Hkv, B] backend memory */
  int32_t *idx;             /* [Hkv, n_sel] */
  void *ck, *cv;            /* [n_sel, Hkv, D] this host's compressed block */
  void *pk, *pv;            /* [sum n_sel, Hkv, D] gathered compressed blocks of every host */
  float *host_scores;       /* [Hkv, B] host scratch for the random/uniform scorers */
  size_t *bytes;            /* [H] all-gather sizes */
  int64_t P;                /* passing rows of this host */
  void *o2;                 /* overlap: [B, Hq, D] local rows against P */
  float *lse2, *lse_loc;    /* overlap: [Hq, B] each */
} apb_state;

static int uses_passing(const host_ctx *h) { return h->p->o.method == APB_METHOD_APB && h->p->lp > 0 && h->H > 1; }

static apb_status star_setup(host_ctx *h, apb_error *err) {
  if (!uses_passing(h)) return APB_OK;
  apb_state *s = calloc(1, sizeof *s);
  if (!s) return apb_error_set(err, APB_ENOMEM, "apb: out of memory");
  h->mstate = s;
  const apb_plan *p = h->p;
  int64_t nsel = p->n_sel[h->r], total = 0;
  for (int r = 0; r < h->H; r++) total += p->n_sel[r];
  for (int r = 0; r < h->r; r++) s->P += p->n_sel[r];
  size_t row = (size_t)h->Hkv * h->D * h->es;
  s->bytes = calloc((size_t)h->H, sizeof *s->bytes);
  s->host_scores = malloc(sizeof(float) * (size_t)h->Hkv * (size_t)(h->B ? h->B : 1));
  if (!s->bytes || !s->host_scores) return apb_error_set(err, APB_ENOMEM, "apb: out of memory");
  for (int r = 0; r < h->H; r++) s->bytes[r] = (size_t)p->n_sel[r] * row;
  apb_status st;
  if ((st = sched_alloc(h, sizeof(float) * (size_t)h->Hkv * (size_t)h->B, (void **)&s->scores, err)) ||
      (st = sched_alloc(h, sizeof(float) * (size_t)h->Hkv * (size_t)h->B, (void **)&s->pooled, err)) ||
      (st = sched_alloc(h, sizeof(int32_t) * (size_t)h->Hkv * (size_t)nsel, (void **)&s->idx, err)) ||
      (st = sched_alloc(h, (size_t)total * row, &s->pk, err)) || (st = sched_alloc(h, (size_t)total * row, &s->pv, err)))
    return st;
  if (p->overlap && s->P > 0 &&
      ((st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * h->D * h->es, &s->o2, err)) ||
       (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse2, err)) ||
       (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse_loc, err))))
    return st;
  /* this host's C lives in its own slot of the gathered buffers (the all-gather then copies nothing for it) */
  int64_t off = 0;
  for (int r = 0; r < h->r; r++) off += p->n_sel[r];
  s->ck = (char *)s->pk + (size_t)off * row;
  s->cv = (char *)s->pv + (size_t)off * row;
  return APB_OK;
}

static void star_teardown(host_ctx *h) {
  apb_state *s = h->mstate;
  if (!s) return;
  sched_free(h, s->scores), sched_free(h, s->pooled), sched_free(h, s->idx);
  sched_free(h, s->pk), sched_free(h, s->pv);
  sched_free(h, s->o2), sched_free(h, s->lse2), sched_free(h, s->lse_loc);
  free(s->host_scores);
  free(s->bytes);
  free(s);
  h->mstate = NULL;
}

/* Raw scores [Hkv, B] of the random and uniform scorers, on the host (APB.md 3.2: other scorers). */
static void host_scores(const host_ctx *h, int layer, float *out) {
  const apb_plan *p = h->p;
  int64_t B = h->B, lo = h->r == 0 ? p->excl0 : 0, k = p->n_sel[h->r];
  for (int g = 0; g < h->Hkv; g++) {
    float *row = out + (size_t)g * (size_t)B;
    if (p->o.scorer == APB_SCORER_RANDOM) {
      apb_rng rng;
      apb_rng_seed(&rng, p->o.seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(1 + layer * 131071 + h->r * 8191 + g)));
      for (int64_t t = 0; t < B; t++) row[t] = (float)apb_rng_uniform(&rng);
    } else { /* uniform: k evenly spaced tokens of [lo, B) score 1, the rest 0 */
      for (int64_t t = 0; t < B; t++) row[t] = 0.0f;
      for (int64_t i = 0; i < k; i++) row[lo + i * (B - lo) / k] = 1.0f;
    }
  }
}

static apb_status compress(host_ctx *h, int layer, apb_state *s, apb_error *err) {
  const apb_plan *p = h->p;
  apb_backend *be = h->be;
  const struct apb_blayer *lw = &h->bm->layers[layer];
  int64_t B = h->B, nsel = p->n_sel[h->r], lo = h->r == 0 ? p->excl0 : 0;
  apb_status st;
  if (nsel == 0) return APB_OK; /* host H-1, or nothing eligible */
  if (p->o.scorer == APB_SCORER_RETAINING) {
    if (!lw->fc1 || !lw->fc2)
      return apb_error_set(err, APB_EINVAL, "layer %d has no retaining heads (fc1/fc2)", layer);
    int64_t I = h->bm->m->scorer_width;
    h->linear_flops += 2.0 * (double)B * (double)I * (double)(h->QKV + h->Hkv);
    st = be->ops->score_retaining(be, lw->fc1, lw->fc2, sched_row(h, h->qkv, h->A, h->QKV), B, s->scores, err);
  } else {
    host_scores(h, layer, s->host_scores);
    st = be->ops->upload(be, s->scores, s->host_scores, sizeof(float) * (size_t)h->Hkv * (size_t)B, err);
  }
  int64_t sh_s[2] = {h->Hkv, B}, sh_i[2] = {h->Hkv, nsel};
  if (!st) st = be->ops->maxpool(be, s->scores, h->Hkv, B, p->pool, s->pooled, err);
  if (!st) st = sched_hook_f32(h, "scores", layer, s->pooled, 2, sh_s, err);
  if (!st) st = be->ops->topk(be, s->pooled, h->Hkv, B, lo, nsel, s->idx, err);
  if (!st) st = sched_hook_i32(h, "selected", layer, s->idx, 2, sh_i, err);
  /* C_h: the selected post-RoPE K and V rows of the local block */
  if (!st) st = be->ops->gather(be, sched_row(h, h->k, h->A, (int64_t)h->Hkv * h->D), B, h->Hkv, h->D, s->idx, nsel,
                                s->ck, err);
  if (!st) st = be->ops->gather(be, sched_row(h, h->v, h->A, (int64_t)h->Hkv * h->D), B, h->Hkv, h->D, s->idx, nsel,
                                s->cv, err);
  return st;
}

/* Overlapped form (plan.overlap): the all-gathers run while [A | B] is attended (anchor rows final,
 * local rows partial); then the local rows attend P alone and the two partials merge by LSE. Local
 * rows' LSE are columns A.. of lse [Hq, T], so they are copied out and back around the merge. */
static apb_status attend_overlapped(host_ctx *h, int layer, apb_state *s, apb_battn_args *a, apb_error *err) {
  apb_backend *be = h->be;
  apb_comm_req *rk = NULL, *rv = NULL;
  apb_status st;
  double t0 = sched_prof_begin(h);
  st = h->comm->ops->iallgatherv(h->comm, s->ck, s->pk, s->bytes, &rk, err);
  if (!st) st = h->comm->ops->iallgatherv(h->comm, s->cv, s->pv, s->bytes, &rv, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  if (!st) st = sched_attn(h, a, err); /* no P: everything that does not need the passing block */
  t0 = sched_prof_begin(h);
  apb_status w1 = h->comm->ops->wait(h->comm, rk, err);
  apb_status w2 = h->comm->ops->wait(h->comm, rv, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  if (st) return st;
  if (w1 || w2) return w1 ? w1 : w2;
  int64_t sh[3] = {s->P, h->Hkv, h->D};
  if ((st = sched_hook_act(h, "passing_k", layer, s->pk, 3, sh, err)) ||
      (st = sched_hook_act(h, "passing_v", layer, s->pv, 3, sh, err)))
    return st;
  int64_t qw = (int64_t)h->Hq * h->D;
  apb_battn_args b = {.P = s->P, .A = 0, .B = h->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 0,
                      .q = sched_row(h, h->q, h->A, qw), .kp = s->pk, .vp = s->pv, .o = s->o2, .lse = s->lse2};
  if ((st = sched_attn(h, &b, err))) return st;
  t0 = sched_prof_begin(h);
  size_t T = (size_t)h->T, Bn = (size_t)h->B, f = sizeof(float);
  void *o_loc = sched_row(h, h->o, h->A, qw);
  const void *op[2] = {o_loc, s->o2};
  const float *lp[2] = {s->lse_loc, s->lse2};
  st = be->ops->copy2d(be, s->lse_loc, Bn * f, h->lse + h->A, T * f, Bn * f, (size_t)h->Hq, err);
  if (!st) st = be->ops->merge(be, 2, op, lp, h->B, h->Hq, h->D, o_loc, s->lse_loc, err);
  if (!st) st = be->ops->copy2d(be, h->lse + h->A, T * f, s->lse_loc, Bn * f, Bn * f, (size_t)h->Hq, err);
  sched_prof_end(h, APB_STAGE_ATTN, t0);
  return st;
}

static apb_status star_attend(host_ctx *h, int layer, apb_error *err) {
  apb_state *s = h->mstate;
  apb_status st;
  int64_t kvw = (int64_t)h->Hkv * h->D;
  apb_battn_args a = {.P = 0, .A = h->A, .B = h->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                      .q = h->q, .ka = h->k, .va = h->v, .kb = sched_row(h, h->k, h->A, kvw),
                      .vb = sched_row(h, h->v, h->A, kvw), .o = h->o, .lse = h->lse};
  if (s) {
    double t0 = sched_prof_begin(h);
    st = compress(h, layer, s, err);
    sched_prof_end(h, APB_STAGE_SCORE, t0);
    if (st) return st;
    if (h->p->overlap && s->P > 0) return attend_overlapped(h, layer, s, &a, err);
    /* APB.md 3.5: every host contributes its C (host H-1: nothing); host h keeps the first h */
    if ((st = sched_allgatherv(h, s->ck, s->pk, s->bytes, err)) ||
        (st = sched_allgatherv(h, s->cv, s->pv, s->bytes, err)))
      return st;
    a.P = s->P, a.kp = s->pk, a.vp = s->pv;
    int64_t sh[3] = {s->P, h->Hkv, h->D};
    if ((st = sched_hook_act(h, "passing_k", layer, s->pk, 3, sh, err)) ||
        (st = sched_hook_act(h, "passing_v", layer, s->pv, 3, sh, err)))
      return st;
  }
  return sched_attn(h, &a, err);
}

const method_ops apb_method_star_ops = {star_setup, star_attend, star_teardown};
const method_ops apb_method_dense_ops = {NULL, star_attend, NULL};
