/* sched/ulysses.c: Ulysses attention (shared/APB.md 5), exact.
 *
 * Host h holds block h for all heads. An all-to-all turns that into all n tokens for the heads of
 * host h (Hq/H query heads, Hkv/H KV heads: H must divide Hkv, checked by the plan); each host runs
 * dense causal attention on its heads; a second all-to-all (output and LSE) turns it back into the
 * host's block for all heads. Packing and unpacking are strided 2-D copies on the backend.
 */
#include <stdlib.h>

#include "sched_int.h"

typedef struct uly_state {
  void *sq, *sk, *sv;       /* send: H chunks [B, hq|hkv, D] */
  void *fq, *fk, *fv;       /* full sequence for this host's heads [n, hq|hkv, D] */
  void *fo;                 /* [n, hq, D] */
  float *flse;              /* [hq, n] */
  void *so;                 /* [n, hq, D] packed per destination (block order) = fo */
  float *slse;              /* [H chunks of [hq, B_d]] */
  void *ro;                 /* [H chunks of [B, hq, D]] */
  float *rlse;              /* [H chunks of [hq, B]] = lse [Hq, B] directly */
  size_t *sb, *rb;          /* [H] byte counts */
} uly_state;

static apb_status uly_setup(host_ctx *h, apb_error *err) {
  uly_state *s = calloc(1, sizeof *s);
  if (!s) return apb_error_set(err, APB_ENOMEM, "ulysses: out of memory");
  h->mstate = s;
  int H = h->H, hq = h->Hq / H, hkv = h->Hkv / H;
  size_t n = (size_t)h->p->n, B = (size_t)h->B, es = h->es, D = (size_t)h->D;
  s->sb = calloc((size_t)H, sizeof *s->sb);
  s->rb = calloc((size_t)H, sizeof *s->rb);
  if (!s->sb || !s->rb) return apb_error_set(err, APB_ENOMEM, "ulysses: out of memory");
  apb_status st;
  if ((st = sched_alloc(h, B * (size_t)h->Hq * D * es, &s->sq, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hkv * D * es, &s->sk, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hkv * D * es, &s->sv, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * D * es, &s->fq, err)) ||
      (st = sched_alloc(h, n * (size_t)hkv * D * es, &s->fk, err)) ||
      (st = sched_alloc(h, n * (size_t)hkv * D * es, &s->fv, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * D * es, &s->fo, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * sizeof(float), (void **)&s->flse, err)) ||
      (st = sched_alloc(h, n * (size_t)hq * sizeof(float), (void **)&s->slse, err)) ||
      (st = sched_alloc(h, B * (size_t)h->Hq * D * es, &s->ro, err)))
    return st;
  return APB_OK;
}

static void uly_teardown(host_ctx *h) {
  uly_state *s = h->mstate;
  if (!s) return;
  void *b[] = {s->sq, s->sk, s->sv, s->fq, s->fk, s->fv, s->fo, s->flse, s->slse, s->ro};
  for (size_t i = 0; i < sizeof b / sizeof *b; i++) sched_free(h, b[i]);
  free(s->sb);
  free(s->rb);
  free(s);
  h->mstate = NULL;
}

/* x [B, Hx, D] -> H chunks [B, Hx/H, D] back to back (chunk d: heads of host d). */
static apb_status pack_heads(host_ctx *h, const void *x, int Hx, void *out, apb_error *err) {
  size_t hd = (size_t)(Hx / h->H) * h->D * h->es, B = (size_t)h->B;
  for (int d = 0; d < h->H; d++) {
    apb_status st = h->be->ops->copy2d(h->be, (char *)out + (size_t)d * B * hd, hd, (const char *)x + (size_t)d * hd,
                                       (size_t)Hx * h->D * h->es, hd, B, err);
    if (st) return st;
  }
  return APB_OK;
}

static apb_status a2a_heads(host_ctx *h, uly_state *s, const void *send, int Hx, void *recv, apb_error *err) {
  const apb_plan *p = h->p;
  size_t hd = (size_t)(Hx / h->H) * h->D * h->es;
  for (int d = 0; d < h->H; d++) {
    s->sb[d] = (size_t)h->B * hd;
    s->rb[d] = (size_t)(p->block_start[d + 1] - p->block_start[d]) * hd;
  }
  return sched_alltoallv(h, send, s->sb, recv, s->rb, err);
}

static apb_status uly_attend(host_ctx *h, int layer, apb_error *err) {
  (void)layer;
  uly_state *s = h->mstate;
  const apb_plan *p = h->p;
  int H = h->H, hq = h->Hq / H, hkv = h->Hkv / H;
  size_t es = h->es, D = (size_t)h->D, B = (size_t)h->B, n = (size_t)p->n;
  apb_backend *be = h->be;
  apb_status st;
  /* sequence split -> head split (received chunks arrive in host order = document order) */
  if ((st = pack_heads(h, h->q, h->Hq, s->sq, err)) || (st = pack_heads(h, h->k, h->Hkv, s->sk, err)) ||
      (st = pack_heads(h, h->v, h->Hkv, s->sv, err)) || (st = a2a_heads(h, s, s->sq, h->Hq, s->fq, err)) ||
      (st = a2a_heads(h, s, s->sk, h->Hkv, s->fk, err)) || (st = a2a_heads(h, s, s->sv, h->Hkv, s->fv, err)))
    return st;
  apb_battn_args a = {.P = 0, .A = 0, .B = (int64_t)n, .Hq = hq, .Hkv = hkv, .D = h->D, .local_keys = 1,
                      .q = s->fq, .kb = s->fk, .vb = s->fv, .o = s->fo, .lse = s->flse};
  if ((st = sched_attn(h, &a, err))) return st;
  /* head split -> sequence split. Output: block d of fo (token-major, contiguous) goes to host d and
   * arrives as [B, hq, D] per source host s, i.e. heads s*hq.. of our rows. */
  size_t ohd = (size_t)hq * D * es;
  for (int d = 0; d < H; d++) {
    s->sb[d] = (size_t)(p->block_start[d + 1] - p->block_start[d]) * ohd;
    s->rb[d] = B * ohd;
  }
  if ((st = sched_alltoallv(h, s->fo, s->sb, s->ro, s->rb, err))) return st;
  for (int src = 0; src < H; src++)
    if ((st = be->ops->copy2d(be, (char *)h->o + (size_t)src * ohd, (size_t)h->Hq * D * es,
                              (char *)s->ro + (size_t)src * B * ohd, ohd, ohd, B, err)))
      return st;
  /* LSE: [hq, n] -> per destination d the columns of block d, [hq, B_d] */
  size_t off = 0;
  for (int d = 0; d < H; d++) {
    size_t Bd = (size_t)(p->block_start[d + 1] - p->block_start[d]);
    if ((st = be->ops->copy2d(be, s->slse + off, Bd * sizeof(float), s->flse + p->block_start[d], n * sizeof(float),
                              Bd * sizeof(float), (size_t)hq, err)))
      return st;
    s->sb[d] = Bd * (size_t)hq * sizeof(float);
    s->rb[d] = B * (size_t)hq * sizeof(float);
    off += Bd * (size_t)hq;
  }
  /* arrives as H chunks [hq, B] in source order = lse [Hq, B] (heads of host s are rows s*hq..) */
  return sched_alltoallv(h, s->slse, s->sb, h->lse, s->rb, err);
}

const method_ops apb_method_ulysses_ops = {uly_setup, uly_attend, uly_teardown};
