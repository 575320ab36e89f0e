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
 *
 * Balanced (--balance, beyond the paper, as Spava does): host r holds the virtual hosts r and
 * 2H-1-r of a 2H-host run, rows [A | B_r | B_{2H-1-r}], so that the slow late blocks pair with the
 * quick early ones. Each virtual block is compressed on its own, a host contributes both C to the
 * all-gathers, and each block's rows attend [P_v | A] (copied together in virtual-host order) and
 * their own keys causally; the anchor rows attend the anchor alone; virtual host 0 sees no anchor.
 */
#include <stdlib.h>
#include <string.h>

#include "apb/rng.h"
#include "sched_int.h"

typedef struct slot {
  int v;                    /* virtual host */
  int64_t row0, B;          /* its rows in the host's row buffers, B of them */
  int64_t nsel, lo;         /* selected rows per KV head; first eligible local index */
  int64_t P;                /* passing rows it attends: sum of n_sel[w] for w < v */
  float *scores, *pooled;   /* [Hkv, B] */
  int32_t *idx;             /* [Hkv, nsel] */
  void *ck, *cv;            /* [nsel, Hkv, D]: its C, inside pk/pv at this host's place */
  void *qk, *qv;            /* balanced, or --overlap 2 with P > 0: [P + A, Hkv, D], P_v in virtual
                               order then the anchor keys */
} slot;

typedef struct apb_state {
  int ns;                   /* virtual hosts held: 1, or 2 when balanced */
  slot sl[2];
  int passing;              /* apb with l_p > 0 and more than one virtual host */
  void *pk, *pv;            /* [sum n_sel, Hkv, D] gathered C of every host, host-major */
  int64_t *rank_off;        /* [H] row offset of host q's contribution in pk */
  size_t *bytes;            /* [H] all-gather sizes */
  float *host_scores;       /* [Hkv, B] host scratch for the random/uniform scorers */
  void *o2;                 /* split overlap: [B, Hq, D] local rows against P */
  float *lse2, *lse_loc;    /* split overlap: [Hq, B] each */
  float *lse_tmp;           /* balanced, or --overlap 2 with P > 0: [Hq, max(A, B_slot)] */
} apb_state;

static int uses_passing(const host_ctx *h) { return h->p->o.method == APB_METHOD_APB && h->p->lp > 0 && h->p->V > 1; }

static apb_status star_setup(host_ctx *h, apb_error *err) {
  const apb_plan *p = h->p;
  if (!uses_passing(h) && !p->balance) return APB_OK;
  apb_state *s = calloc(1, sizeof *s);
  if (!s) return apb_error_set(err, APB_ENOMEM, "apb: out of memory");
  h->mstate = s;
  s->passing = uses_passing(h);
  int v[2], H = h->H;
  apb_plan_virtual(p, h->r, v, &s->ns);
  size_t row = (size_t)h->Hkv * h->D * h->es;
  s->bytes = calloc((size_t)H, sizeof *s->bytes);
  s->rank_off = calloc((size_t)H, sizeof *s->rank_off);
  s->host_scores = malloc(sizeof(float) * (size_t)h->Hkv * (size_t)(h->B ? h->B : 1));
  if (!s->bytes || !s->rank_off || !s->host_scores) return apb_error_set(err, APB_ENOMEM, "apb: out of memory");
  int64_t total = 0;
  for (int q = 0; q < H; q++) {
    int vq[2], nq;
    apb_plan_virtual(p, q, vq, &nq);
    s->rank_off[q] = total;
    for (int j = 0; j < nq; j++) total += p->n_sel[vq[j]];
    s->bytes[q] = (size_t)(total - s->rank_off[q]) * row;
  }
  apb_status st = APB_OK;
  if (s->passing && ((st = sched_alloc(h, (size_t)total * row, &s->pk, err)) ||
                     (st = sched_alloc(h, (size_t)total * row, &s->pv, err))))
    return st;
  int64_t row0 = h->A, coff = s->rank_off[h->r], maxb = h->A;
  for (int j = 0; j < s->ns; j++) {
    slot *sl = &s->sl[j];
    sl->v = v[j];
    sl->row0 = row0;
    sl->B = p->block_start[v[j] + 1] - p->block_start[v[j]];
    row0 += sl->B;
    maxb = sl->B > maxb ? sl->B : maxb;
    if (!s->passing) continue;
    sl->nsel = p->n_sel[v[j]];
    sl->lo = v[j] == 0 ? p->excl0 : 0;
    for (int w = 0; w < v[j]; w++) sl->P += p->n_sel[w];
    /* this host's C lives in its own place of the gathered buffers (the all-gather copies nothing for it) */
    sl->ck = (char *)s->pk + (size_t)coff * row;
    sl->cv = (char *)s->pv + (size_t)coff * row;
    coff += sl->nsel;
    if ((st = sched_alloc(h, sizeof(float) * (size_t)h->Hkv * (size_t)sl->B, (void **)&sl->scores, err)) ||
        (st = sched_alloc(h, sizeof(float) * (size_t)h->Hkv * (size_t)sl->B, (void **)&sl->pooled, err)) ||
        (st = sched_alloc(h, sizeof(int32_t) * (size_t)h->Hkv * (size_t)sl->nsel, (void **)&sl->idx, err)))
      return st;
    if (sl->v > 0 && (p->balance || (p->overlap == APB_OVERLAP_ANCHOR && sl->P > 0)) &&
        ((st = sched_alloc(h, (size_t)(sl->P + h->A) * row, &sl->qk, err)) ||
         (st = sched_alloc(h, (size_t)(sl->P + h->A) * row, &sl->qv, err))))
      return st;
  }
  if (p->balance) {
    if ((st = sched_alloc(h, (size_t)maxb * (size_t)h->Hq * sizeof(float), (void **)&s->lse_tmp, err))) return st;
    /* overlapped: a slot's rows against its passing block alone, merged into its rows afterwards */
    int64_t mb = 0;
    for (int j = 0; j < s->ns; j++)
      if (s->sl[j].P > 0 && s->sl[j].B > mb) mb = s->sl[j].B;
    if (s->passing && p->overlap == APB_OVERLAP_SPLIT && mb > 0 &&
        ((st = sched_alloc(h, (size_t)mb * (size_t)h->Hq * h->D * h->es, &s->o2, err)) ||
         (st = sched_alloc(h, (size_t)mb * (size_t)h->Hq * sizeof(float), (void **)&s->lse2, err)) ||
         (st = sched_alloc(h, (size_t)mb * (size_t)h->Hq * sizeof(float), (void **)&s->lse_loc, err))))
      return st;
    return APB_OK;
  }
  if (s->passing && p->overlap == APB_OVERLAP_ANCHOR && s->sl[0].P > 0)
    return sched_alloc(h, (size_t)maxb * (size_t)h->Hq * sizeof(float), (void **)&s->lse_tmp, err);
  if (s->passing && p->overlap == APB_OVERLAP_SPLIT && s->sl[0].P > 0 &&
      ((st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * h->D * h->es, &s->o2, err)) ||
       (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse2, err)) ||
       (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse_loc, err))))
    return st;
  return APB_OK;
}

static void star_teardown(host_ctx *h) {
  apb_state *s = h->mstate;
  if (!s) return;
  for (int j = 0; j < s->ns; j++) {
    slot *sl = &s->sl[j];
    sched_free(h, sl->scores), sched_free(h, sl->pooled), sched_free(h, sl->idx);
    sched_free(h, sl->qk), sched_free(h, sl->qv);
  }
  sched_free(h, s->pk), sched_free(h, s->pv);
  sched_free(h, s->o2), sched_free(h, s->lse2), sched_free(h, s->lse_loc), sched_free(h, s->lse_tmp);
  free(s->host_scores);
  free(s->bytes);
  free(s->rank_off);
  free(s);
  h->mstate = NULL;
}

/* Raw scores [Hkv, B] of the random and uniform scorers, on the host (APB.md 3.2: other scorers). */
static void host_scores(const host_ctx *h, int layer, const slot *sl, float *out) {
  const apb_plan *p = h->p;
  int64_t B = sl->B, lo = sl->lo, k = sl->nsel;
  for (int g = 0; g < h->Hkv; g++) {
    float *row = out + (size_t)g * (size_t)B;
    if (p->o.scorer == APB_SCORER_RANDOM) {
      apb_rng rng;
      apb_rng_seed(&rng, p->o.seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(1 + layer * 131071 + sl->v * 8191 + g)));
      for (int64_t t = 0; t < B; t++) row[t] = (float)apb_rng_uniform(&rng);
    } else { /* uniform: k evenly spaced tokens of [lo, B) score 1, the rest 0 */
      for (int64_t t = 0; t < B; t++) row[t] = 0.0f;
      for (int64_t i = 0; i < k; i++) row[lo + i * (B - lo) / k] = 1.0f;
    }
  }
}

/* C_v of one virtual block (APB.md 3.2-3.4). Hook stages carry a suffix for a host's second block. */
static apb_status compress(host_ctx *h, int layer, apb_state *s, int j, apb_error *err) {
  const apb_plan *p = h->p;
  apb_backend *be = h->be;
  const struct apb_blayer *lw = &h->bm->layers[layer];
  slot *sl = &s->sl[j];
  int64_t B = sl->B, nsel = sl->nsel, kvw = (int64_t)h->Hkv * h->D;
  apb_status st;
  if (nsel == 0) return APB_OK; /* the last virtual host, or nothing eligible */
  if (p->o.scorer == APB_SCORER_RETAINING) {
    if (!lw->fc1 || !lw->fc2)
      return apb_error_set(err, APB_EINVAL, "layer %d has no retaining heads (fc1/fc2)", layer);
    int64_t I = h->bm->m->scorer_width;
    h->linear_flops += 2.0 * (double)B * (double)I * (double)(h->QKV + h->Hkv);
    st = be->ops->score_retaining(be, lw->fc1, lw->fc2, sched_row(h, h->qkv, sl->row0, h->QKV), B, sl->scores, err);
  } else {
    host_scores(h, layer, sl, s->host_scores);
    st = be->ops->upload(be, sl->scores, s->host_scores, sizeof(float) * (size_t)h->Hkv * (size_t)B, err);
  }
  int64_t sh_s[2] = {h->Hkv, B}, sh_i[2] = {h->Hkv, nsel};
  if (!st) st = be->ops->maxpool(be, sl->scores, h->Hkv, B, p->pool, sl->pooled, err);
  if (!st) st = sched_hook_f32(h, j ? "scores_v2" : "scores", layer, sl->pooled, 2, sh_s, err);
  if (!st) st = be->ops->topk(be, sl->pooled, h->Hkv, B, sl->lo, nsel, sl->idx, err);
  if (!st) st = sched_hook_i32(h, j ? "selected_v2" : "selected", layer, sl->idx, 2, sh_i, err);
  /* C_v: the selected post-RoPE K and V rows of the block */
  if (!st) st = be->ops->gather(be, sched_row(h, h->k, sl->row0, kvw), B, h->Hkv, h->D, sl->idx, nsel, sl->ck, err);
  if (!st) st = be->ops->gather(be, sched_row(h, h->v, sl->row0, kvw), B, h->Hkv, h->D, sl->idx, nsel, sl->cv, err);
  return st;
}

static apb_status compress_all(host_ctx *h, int layer, apb_state *s, apb_error *err) {
  double t0 = sched_prof_begin(h);
  apb_status st = APB_OK;
  for (int j = 0; j < s->ns && !st; j++) st = compress(h, layer, s, j, err);
  sched_prof_end(h, APB_STAGE_SCORE, t0);
  return st;
}

static apb_status hook_passing(host_ctx *h, int layer, const void *pk, const void *pv, int64_t P, apb_error *err) {
  int64_t sh[3] = {P, h->Hkv, h->D};
  apb_status st = sched_hook_act(h, "passing_k", layer, pk, 3, sh, err);
  return st ? st : sched_hook_act(h, "passing_v", layer, pv, 3, sh, err);
}

/* Balanced: the keys a virtual block sees before its own, into its qk/qv: [C_0 .. C_{v-1}] in
 * virtual-host order (host q holds virtual hosts q and 2H-1-q, in that order in pk/pv), then the anchor
 * keys when with_anchor; booked as communication, and hooked as the passing block. */
static apb_status slot_keys(host_ctx *h, int layer, apb_state *s, slot *sl, int with_anchor, apb_error *err) {
  apb_backend *be = h->be;
  const apb_plan *p = h->p;
  size_t row = (size_t)h->Hkv * h->D * h->es;
  int64_t at = 0;
  apb_status st = APB_OK;
  double t0 = sched_prof_begin(h);
  for (int w = 0; w < sl->v && !st; w++) {
    int q = w < h->H ? w : 2 * h->H - 1 - w;
    int64_t off = s->rank_off[q] + (w == q ? 0 : p->n_sel[q]);
    size_t bytes = (size_t)p->n_sel[w] * row;
    if (!(st = be->ops->copy(be, (char *)sl->qk + at * row, (char *)s->pk + off * row, bytes, err)))
      st = be->ops->copy(be, (char *)sl->qv + at * row, (char *)s->pv + off * row, bytes, err);
    at += p->n_sel[w];
  }
  if (!st && with_anchor) st = be->ops->copy(be, (char *)sl->qk + at * row, h->k, (size_t)h->A * row, err);
  if (!st && with_anchor) st = be->ops->copy(be, (char *)sl->qv + at * row, h->v, (size_t)h->A * row, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st ? st : hook_passing(h, layer, sl->qk, sl->qv, sl->P, err);
}

/* Merge partial (o2, lse2) of rows [row0, row0 + B) into o and columns row0.. of lse [Hq, T], through
 * lse_loc (the merge wants the rows' LSE contiguous). */
static apb_status merge_rows(host_ctx *h, apb_state *s, int64_t row0, int64_t B, apb_error *err) {
  apb_backend *be = h->be;
  size_t T = (size_t)h->T, Bn = (size_t)B, f = sizeof(float);
  void *o_loc = sched_row(h, h->o, row0, (int64_t)h->Hq * h->D);
  const void *op[2] = {o_loc, s->o2};
  const float *lp[2] = {s->lse_loc, s->lse2};
  apb_status st = be->ops->copy2d(be, s->lse_loc, Bn * f, h->lse + row0, T * f, Bn * f, (size_t)h->Hq, err);
  if (!st) st = be->ops->merge(be, 2, op, lp, B, h->Hq, h->D, o_loc, s->lse_loc, err);
  if (!st) st = be->ops->copy2d(be, h->lse + row0, T * f, s->lse_loc, Bn * f, Bn * f, (size_t)h->Hq, err);
  return st;
}

/* APB.md 3.5: the two all-gathers (K, V) of the compressed blocks; every host contributes its C (host
 * H-1: nothing, a balanced host both of its own, adjacent from sl[0].ck) and keeps what it needs.
 * Started (rq[0], rq[1] to be waited by sched_wait) when async, else complete (rq NULL). */
static apb_status gather_passing(host_ctx *h, apb_state *s, int async, apb_comm_req *rq[2], apb_error *err) {
  rq[0] = rq[1] = NULL;
  if (!async) {
    apb_status st = sched_allgatherv(h, s->sl[0].ck, s->pk, s->bytes, err);
    return st ? st : sched_allgatherv(h, s->sl[0].cv, s->pv, s->bytes, err);
  }
  double t0 = sched_prof_begin(h);
  apb_status st = h->comm->ops->iallgatherv(h->comm, s->sl[0].ck, s->pk, s->bytes, &rq[0], err);
  if (!st) st = h->comm->ops->iallgatherv(h->comm, s->sl[0].cv, s->pv, s->bytes, &rq[1], err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

/* Split form (plan.overlap APB_OVERLAP_SPLIT): the all-gathers run while [A | B] is attended (anchor rows final,
 * local rows partial); then the local rows attend P alone and the two partials merge by LSE. Local
 * rows' LSE are columns A.. of lse [Hq, T], so they are copied out and back around the merge. */
static apb_status attend_overlapped(host_ctx *h, int layer, apb_state *s, apb_battn_args *a, apb_error *err) {
  apb_comm_req *rq[2];
  const slot *sl = &s->sl[0];
  apb_status st = gather_passing(h, s, 1, rq, err);
  if (!st) st = sched_attn(h, a, err); /* no P: everything that does not need the passing block */
  if ((st = sched_wait(h, rq, 2, st, err))) return st;
  if ((st = hook_passing(h, layer, s->pk, s->pv, sl->P, err))) return st;
  int64_t qw = (int64_t)h->Hq * h->D;
  apb_battn_args b = {.P = sl->P, .A = 0, .B = h->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 0,
                      .q = sched_row(h, h->q, h->A, qw), .kp = s->pk, .vp = s->pv, .o = s->o2, .lse = s->lse2};
  if ((st = sched_attn(h, &b, err))) return st;
  double t0 = sched_prof_begin(h);
  st = merge_rows(h, s, h->A, h->B, err);
  sched_prof_end(h, APB_STAGE_ATTN, t0);
  return st;
}

/* One attention call whose LSE [Hq, B] goes to columns c0.. of lse [Hq, T] through lse_tmp. */
static apb_status attn_cols(host_ctx *h, apb_state *s, apb_battn_args *a, int64_t c0, apb_error *err) {
  int64_t rows = a->A + a->B;
  a->lse = s->lse_tmp;
  apb_status st = sched_attn(h, a, err);
  size_t f = sizeof(float);
  if (!st && rows > 0)
    st = h->be->ops->copy2d(h->be, h->lse + c0, (size_t)h->T * f, s->lse_tmp, (size_t)rows * f, (size_t)rows * f,
                            (size_t)h->Hq, err);
  return st;
}

/* Balanced and split (APB_OVERLAP_SPLIT with a passing block): the all-gathers run while the anchor rows
 * and every block's rows against the anchor keys and themselves are attended; then each block's rows
 * attend their passing block [C_0 .. C_{v-1}] alone and the two partials merge by LSE. The same
 * function as attend_blocks' single calls. */
static apb_status attend_balanced_overlapped(host_ctx *h, int layer, apb_state *s, apb_error *err) {
  int64_t kvw = (int64_t)h->Hkv * h->D, qw = (int64_t)h->Hq * h->D;
  apb_comm_req *rq[2];
  apb_status st = gather_passing(h, s, 1, rq, err);
  apb_battn_args an = {.A = h->A, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1, .q = h->q, .ka = h->k,
                       .va = h->v, .o = h->o};
  if (!st && h->A > 0) st = attn_cols(h, s, &an, 0, err);
  for (int j = 0; j < s->ns && !st; j++) {
    slot *sl = &s->sl[j];
    apb_battn_args a = {.B = sl->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                        .q = sched_row(h, h->q, sl->row0, qw), .kb = sched_row(h, h->k, sl->row0, kvw),
                        .vb = sched_row(h, h->v, sl->row0, kvw), .o = sched_row(h, h->o, sl->row0, qw)};
    if (sl->v > 0) a.P = h->A, a.kp = h->k, a.vp = h->v; /* the anchor keys: rows 0..A of k, v */
    st = attn_cols(h, s, &a, sl->row0, err);
  }
  if ((st = sched_wait(h, rq, 2, st, err))) return st;
  for (int j = 0; j < s->ns; j++) {
    slot *sl = &s->sl[j];
    if (sl->v == 0 || sl->P == 0) continue;
    if ((st = slot_keys(h, layer, s, sl, 0, err))) return st;
    apb_battn_args b = {.P = sl->P, .B = sl->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 0,
                        .q = sched_row(h, h->q, sl->row0, qw), .kp = sl->qk, .vp = sl->qv, .o = s->o2,
                        .lse = s->lse2};
    if ((st = sched_attn(h, &b, err))) return st;
    double t0 = sched_prof_begin(h);
    st = merge_rows(h, s, sl->row0, sl->B, err);
    sched_prof_end(h, APB_STAGE_ATTN, t0);
    if (st) return st;
  }
  return APB_OK;
}

/* The anchor rows, then each (virtual) block against [P_v | A] and itself, one call per block. The
 * all-gathers block first (overlap 0), or, with overlap APB_OVERLAP_ANCHOR, run while the anchor rows
 * (the only rows that do not need the passing block) are attended. Balanced runs and the unbalanced
 * anchor-first form come here; the latter has one slot. */
static apb_status attend_blocks(host_ctx *h, int layer, apb_state *s, apb_error *err) {
  int64_t kvw = (int64_t)h->Hkv * h->D, qw = (int64_t)h->Hq * h->D;
  apb_comm_req *rq[2] = {NULL, NULL};
  apb_status st = s->passing ? gather_passing(h, s, h->p->overlap == APB_OVERLAP_ANCHOR, rq, err) : APB_OK;
  apb_battn_args an = {.A = h->A, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1, .q = h->q, .ka = h->k,
                       .va = h->v, .o = h->o};
  if (!st && h->A > 0) st = attn_cols(h, s, &an, 0, err);
  if ((st = sched_wait(h, rq, 2, st, err))) return st;
  for (int j = 0; j < s->ns; j++) {
    slot *sl = &s->sl[j];
    apb_battn_args a = {.B = sl->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                        .q = sched_row(h, h->q, sl->row0, qw), .kb = sched_row(h, h->k, sl->row0, kvw),
                        .vb = sched_row(h, h->v, sl->row0, kvw), .o = sched_row(h, h->o, sl->row0, qw)};
    if (sl->v > 0 && !s->passing) { /* star: the anchor keys are rows 0..A of k, v */
      a.P = h->A, a.kp = h->k, a.vp = h->v;
    } else if (sl->v > 0) {         /* [C_0 .. C_{v-1} | A] in virtual-host order */
      if ((st = slot_keys(h, layer, s, sl, 1, err))) return st;
      a.P = sl->P + h->A, a.kp = sl->qk, a.vp = sl->qv;
    }
    if ((st = attn_cols(h, s, &a, sl->row0, err))) return st;
  }
  return APB_OK;
}

static apb_status star_attend(host_ctx *h, int layer, apb_error *err) {
  apb_state *s = h->mstate;
  apb_status st;
  int64_t kvw = (int64_t)h->Hkv * h->D;
  if (s && s->passing && (st = compress_all(h, layer, s, err))) return st;
  if (s && h->p->balance)
    return s->passing && s->o2 ? attend_balanced_overlapped(h, layer, s, err) : attend_blocks(h, layer, s, err);
  if (s && s->passing && h->p->overlap == APB_OVERLAP_ANCHOR && s->sl[0].P > 0) return attend_blocks(h, layer, s, err);
  apb_battn_args a = {.P = 0, .A = h->A, .B = h->B, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                      .q = h->q, .ka = h->k, .va = h->v, .kb = sched_row(h, h->k, h->A, kvw),
                      .vb = sched_row(h, h->v, h->A, kvw), .o = h->o, .lse = h->lse};
  if (s) {
    const slot *sl = &s->sl[0];
    if (h->p->overlap == APB_OVERLAP_SPLIT && sl->P > 0) return attend_overlapped(h, layer, s, &a, err);
    apb_comm_req *rq[2];
    if ((st = gather_passing(h, s, 0, rq, err))) return st; /* host h keeps the first h contributions */
    a.P = sl->P, a.kp = s->pk, a.vp = s->pv;
    if ((st = hook_passing(h, layer, s->pk, s->pv, sl->P, err))) return st;
  }
  return sched_attn(h, &a, err);
}

const method_ops apb_method_star_ops = {star_setup, star_attend, star_teardown};
const method_ops apb_method_dense_ops = {NULL, star_attend, NULL};
