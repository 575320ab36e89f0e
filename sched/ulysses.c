/* sched/ulysses.c: Ulysses attention (shared/APB.md 5), exact.
 *
 * Host h holds block h for all heads. An all-to-all turns that into all n tokens for the heads of
 * host h (Hq/H query heads, Hkv/H KV heads: H must divide Hkv, checked by the plan); each host runs
 * dense causal attention on its heads; a second all-to-all (output and LSE) turns it back into the
 * host's block for all heads. Packing and unpacking are strided 2-D copies on the backend.
 *
 * Pipelined (plan.uly_groups = G > 1, the default with overlap): the host's heads are cut into G
 * groups. The all-to-alls of group g+1's q/k/v run while group g is attended, and group g's output
 * goes back while group g+1 is attended; only the first group's inputs and the last group's output
 * are exposed. Heads are independent, so the arithmetic is that of G = 1 (the same attention per
 * head, the same bytes moved), in G times as many collectives.
 */
#include <stdlib.h>

#include "sched_int.h"

typedef struct uly_state {
  int G, Gk, m;             /* head groups; K/V groups (Gk = G, or 1 when one KV head is split); m = G / Gk */
  int hqg, hkvg;            /* query heads per group; KV heads per K/V group */
  void *sq, *sk, *sv;       /* send: per (K/V) group, H chunks [B, hqg|hkvg, D] */
  void *fq, *fk, *fv;       /* full sequence per (K/V) group, [n, hqg|hkvg, D] */
  void *fo;                 /* per group [n, hqg, D] */
  float *flse;              /* per group [hqg, n] */
  float *slse;              /* per group: H chunks [hqg, B_d] */
  void *ro;                 /* per group: H chunks [B, hqg, D] */
  float *rlse;              /* per group: H chunks [hqg, B] (G = 1: lands in host_ctx.lse directly) */
  size_t *sb, *rb;          /* [H] byte counts */
  apb_comm_req **req;       /* [G][5]: q, k, v in; o, lse out */
} uly_state;

static apb_status uly_setup(host_ctx *h, apb_error *err) {
  uly_state *s = calloc(1, sizeof *s);
  if (!s) return apb_error_set(err, APB_ENOMEM, "ulysses: out of memory");
  h->mstate = s;
  int H = h->H, hq = h->Hq / H, hkv = h->Hkv / H;
  if (h->Hkv % H) /* apb_plan_make refuses this; a plan made for another model's heads gets here */
    return apb_error_set(err, APB_EINVAL, "ulysses: %d hosts do not divide this model's %d KV heads (was the plan "
                         "made for another model?)", H, h->Hkv);
  s->G = h->p->uly_groups;
  s->Gk = s->G < hkv ? s->G : hkv;
  if (s->G < 1 || hq % s->G || hkv % s->Gk || s->G % s->Gk)
    return apb_error_set(err, APB_EINVAL, "ulysses: %d head groups do not split %d query and %d KV heads per host",
                         s->G, hq, hkv);
  s->m = s->G / s->Gk, s->hqg = hq / s->G, s->hkvg = hkv / s->Gk;
  size_t n = (size_t)h->p->n, B = (size_t)h->B, es = h->es, D = (size_t)h->D;
  s->sb = calloc((size_t)H, sizeof *s->sb);
  s->rb = calloc((size_t)H, sizeof *s->rb);
  s->req = calloc((size_t)s->G * 5, sizeof *s->req);
  if (!s->sb || !s->rb || !s->req) return apb_error_set(err, APB_ENOMEM, "ulysses: out of memory");
  apb_status st;
  /* the groups together hold what one group of all the host's heads would */
  if ((st = sched_alloc(h, B * (size_t)h->Hq * D * es, &s->sq, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hkv * D * es, &s->sk, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hkv * D * es, &s->sv, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * D * es, &s->fq, err)) ||
      (st = sched_alloc(h, n * (size_t)hkv * D * es, &s->fk, err)) ||
      (st = sched_alloc(h, n * (size_t)hkv * D * es, &s->fv, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * D * es, &s->fo, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * sizeof(float), (void **)&s->flse, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * sizeof(float), (void **)&s->slse, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hq * D * es, &s->ro, err)) ||
      (s->G > 1 && (st = sched_alloc(h, B * (size_t)h->Hq * sizeof(float), (void **)&s->rlse, err))))
    return st;
  return APB_OK;
}

static void uly_teardown(host_ctx *h) {
  uly_state *s = h->mstate;
  if (!s) return;
  void *b[] = {s->sq, s->sk, s->sv, s->fq, s->fk, s->fv, s->fo, s->flse, s->slse, s->ro, s->rlse};
  for (size_t i = 0; i < sizeof b / sizeof *b; i++) sched_free(h, b[i]);
  free(s->sb);
  free(s->rb);
  free(s->req);
  free(s);
  h->mstate = NULL;
}

/* All-to-all through the communicator, booked to APB_STAGE_COMM: started (*req set) when the plan
 * overlaps, else blocking (*req NULL). */
static apb_status a2a(host_ctx *h, const void *send, void *recv, apb_comm_req **req, apb_error *err) {
  uly_state *s = h->mstate;
  *req = NULL;
  if (s->G == 1) return sched_alltoallv(h, send, s->sb, recv, s->rb, err);
  double t0 = sched_prof_begin(h);
  apb_status st = h->comm->ops->ialltoallv(h->comm, send, s->sb, recv, s->rb, req, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

/* The inputs of group g: its query heads (and, first in its K/V group, its KV heads) of every row go
 * to the host that owns those heads, chunk d of the send slab holding host d's heads [B, w, D]; the
 * all-to-all brings every host's rows of this host's heads, in host order (= document order), as
 * [n, w, D]. x [B, Hx, D] holds all heads of this host's rows. */
static apb_status send_heads(host_ctx *h, const void *x, int Hx, int h0, int w, void *out, void *recv,
                             apb_comm_req **req, apb_error *err) {
  uly_state *s = h->mstate;
  const apb_plan *p = h->p;
  size_t eh = (size_t)h->D * h->es, hw = (size_t)w * eh, B = (size_t)h->B;
  for (int d = 0; d < h->H; d++) {
    apb_status st = h->be->ops->copy2d(h->be, (char *)out + (size_t)d * B * hw, hw,
                                       (const char *)x + ((size_t)d * (size_t)(Hx / h->H) + (size_t)h0) * eh,
                                       (size_t)Hx * eh, hw, B, err);
    if (st) return st;
    s->sb[d] = B * hw;
    s->rb[d] = (size_t)(p->block_start[d + 1] - p->block_start[d]) * hw;
  }
  return a2a(h, out, recv, req, err);
}

static apb_status start_inputs(host_ctx *h, int g, apb_error *err) {
  uly_state *s = h->mstate;
  size_t n = (size_t)h->p->n, B = (size_t)h->B, eh = (size_t)h->D * h->es;
  size_t qs = (size_t)s->hqg * eh, ks = (size_t)s->hkvg * eh; /* one row of a group's heads */
  apb_comm_req **rq = s->req + (size_t)g * 5;
  apb_status st = send_heads(h, h->q, h->Hq, g * s->hqg, s->hqg, (char *)s->sq + (size_t)g * h->H * B * qs,
                             (char *)s->fq + (size_t)g * n * qs, &rq[0], err);
  if (st || g % s->m) return st;
  int k = g / s->m;
  if ((st = send_heads(h, h->k, h->Hkv, k * s->hkvg, s->hkvg, (char *)s->sk + (size_t)k * h->H * B * ks,
                       (char *)s->fk + (size_t)k * n * ks, &rq[1], err)))
    return st;
  return send_heads(h, h->v, h->Hkv, k * s->hkvg, s->hkvg, (char *)s->sv + (size_t)k * h->H * B * ks,
                    (char *)s->fv + (size_t)k * n * ks, &rq[2], err);
}

/* Group g attended: its output rows go back to the hosts that own them, O [B_d, hqg, D] straight from
 * the group's output and the LSE [hqg, B_d] packed per destination. */
static apb_status start_outputs(host_ctx *h, int g, apb_error *err) {
  uly_state *s = h->mstate;
  const apb_plan *p = h->p;
  int H = h->H;
  size_t n = (size_t)p->n, B = (size_t)h->B, qs = (size_t)s->hqg * h->D * h->es, hqg = (size_t)s->hqg;
  apb_comm_req **rq = s->req + (size_t)g * 5;
  for (int d = 0; d < H; d++) {
    s->sb[d] = (size_t)(p->block_start[d + 1] - p->block_start[d]) * qs;
    s->rb[d] = B * qs;
  }
  apb_status st = a2a(h, (char *)s->fo + (size_t)g * n * qs, (char *)s->ro + (size_t)g * H * B * qs, &rq[3], err);
  if (st) return st;
  float *flse = s->flse + (size_t)g * hqg * n, *slse = s->slse + (size_t)g * hqg * n;
  size_t off = 0;
  for (int d = 0; d < H; d++) {
    size_t Bd = (size_t)(p->block_start[d + 1] - p->block_start[d]);
    if ((st = h->be->ops->copy2d(h->be, slse + off, Bd * sizeof(float), flse + p->block_start[d], n * sizeof(float),
                                 Bd * sizeof(float), hqg, err)))
      return st;
    s->sb[d] = Bd * hqg * sizeof(float);
    s->rb[d] = B * hqg * sizeof(float);
    off += Bd * hqg;
  }
  /* arrives as H chunks [hqg, B] in source order; with one group that is lse [Hq, B] itself */
  return a2a(h, slse, s->G == 1 ? h->lse : s->rlse + (size_t)g * H * hqg * B, &rq[4], err);
}

/* Group g's output arrived: O of source host src holds heads src*hq + g*hqg.. of our rows. */
static apb_status unpack_outputs(host_ctx *h, int g, apb_error *err) {
  uly_state *s = h->mstate;
  apb_backend *be = h->be;
  int H = h->H, hq = h->Hq / H;
  size_t B = (size_t)h->B, eh = (size_t)h->D * h->es, qs = (size_t)s->hqg * eh, hqg = (size_t)s->hqg;
  const char *ro = (const char *)s->ro + (size_t)g * H * B * qs;
  apb_status st;
  for (int src = 0; src < H; src++)
    if ((st = be->ops->copy2d(be, (char *)h->o + ((size_t)src * hq + (size_t)g * hqg) * eh, (size_t)h->Hq * eh,
                              ro + (size_t)src * B * qs, qs, qs, B, err)))
      return st;
  if (s->G == 1) return APB_OK;
  /* H chunks [hqg, B] -> rows src*hq + g*hqg.. of lse [Hq, B] */
  return be->ops->copy2d(be, h->lse + (size_t)g * hqg * B, (size_t)hq * B * sizeof(float),
                         s->rlse + (size_t)g * H * hqg * B, hqg * B * sizeof(float), hqg * B * sizeof(float),
                         (size_t)H, err);
}

static apb_status uly_attend(host_ctx *h, int layer, apb_error *err) {
  (void)layer;
  uly_state *s = h->mstate;
  size_t n = (size_t)h->p->n, eh = (size_t)h->D * h->es, qs = (size_t)s->hqg * eh, ks = (size_t)s->hkvg * eh;
  apb_status st = start_inputs(h, 0, err);
  for (int g = 0; g < s->G && !st; g++) {
    apb_comm_req **rq = s->req + (size_t)g * 5;
    if (g + 1 < s->G && (st = start_inputs(h, g + 1, err))) break;
    if ((st = sched_wait(h, rq, 3, st, err))) break;
    int k = g / s->m; /* the K/V group (m groups share one, sent with the first) */
    apb_battn_args a = {.P = 0, .A = 0, .B = (int64_t)n, .Hq = s->hqg, .Hkv = s->hkvg, .D = h->D, .local_keys = 1,
                        .q = (char *)s->fq + (size_t)g * n * qs, .kb = (char *)s->fk + (size_t)k * n * ks,
                        .vb = (char *)s->fv + (size_t)k * n * ks, .o = (char *)s->fo + (size_t)g * n * qs,
                        .lse = s->flse + (size_t)g * (size_t)s->hqg * n};
    if (!(st = sched_attn(h, &a, err))) st = start_outputs(h, g, err);
  }
  for (int g = 0; g < s->G && !st; g++)
    if (!(st = sched_wait(h, s->req + (size_t)g * 5 + 3, 2, st, err))) st = unpack_outputs(h, g, err);
  /* after a failed step, complete what was started (their own failures add nothing) */
  return sched_wait(h, s->req, s->G * 5, st, err);
}

const method_ops apb_method_ulysses_ops = {uly_setup, uly_attend, uly_teardown};
