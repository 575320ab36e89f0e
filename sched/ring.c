/* sched/ring.c: ring and zigzag attention (shared/APB.md 5), exact.
 *
 * ring: host h holds block h. It attends its own block causally, then for H-1 steps passes the K/V it
 * holds to host h+1 and receives from host h-1 (sendrecv); a block from an earlier host is attended in
 * full, a later host's block is passed on unused (the naive ring of the paper's baseline). Partial
 * results are merged by LSE in arrival order, identically on every run.
 * zigzag: the document is cut into 2H chunks and host h holds chunks h and 2H-1-h, so every host does
 * the same causal work. Chunk c of queries sees chunk c' fully when c' < c and causally when c' == c.
 * The K/V of both chunks travel together around the ring.
 * The K/V buffer of a host is [k | v] of all its rows (host_ctx.kv), sent as is; each transfer
 * (isendrecv) runs while a block is attended, the first one while the host attends its own.
 */
#include <stdlib.h>

#include "sched_int.h"

typedef struct ring_state {
  void *buf[2];             /* receive buffers [2, rows, Hkv, D] of the largest block */
  void *o_tmp;              /* [rows, Hq, D] */
  float *lse_tmp;           /* [Hq, rows] */
  float *lse_lo, *lse_hi;   /* zigzag: [Hq, c0], [Hq, c1] */
} ring_state;

static int64_t rows_of(const host_ctx *h, int r) { return apb_plan_rows(h->p, r); }

static apb_status ring_setup(host_ctx *h, apb_error *err) {
  ring_state *s = calloc(1, sizeof *s);
  if (!s) return apb_error_set(err, APB_ENOMEM, "ring: out of memory");
  h->mstate = s;
  int64_t maxrows = 0;
  for (int r = 0; r < h->H; r++) maxrows = rows_of(h, r) > maxrows ? rows_of(h, r) : maxrows;
  size_t kvb = 2 * (size_t)maxrows * (size_t)h->Hkv * h->D * h->es;
  apb_status st;
  if ((st = sched_alloc(h, kvb, &s->buf[0], err)) || (st = sched_alloc(h, kvb, &s->buf[1], err)) ||
      (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * h->D * h->es, &s->o_tmp, err)) ||
      (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse_tmp, err)) ||
      (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse_lo, err)) ||
      (st = sched_alloc(h, (size_t)h->B * (size_t)h->Hq * sizeof(float), (void **)&s->lse_hi, err)))
    return st;
  return APB_OK;
}

static void ring_teardown(host_ctx *h) {
  ring_state *s = h->mstate;
  if (!s) return;
  sched_free(h, s->buf[0]), sched_free(h, s->buf[1]), sched_free(h, s->o_tmp);
  sched_free(h, s->lse_tmp), sched_free(h, s->lse_lo), sched_free(h, s->lse_hi);
  free(s);
  h->mstate = NULL;
}

/* rows [row0, row0+n) of this host attend P keys at kp/vp fully; merged into (o rows, lse_acc [Hq, n]). */
static apb_status attend_full_merge(host_ctx *h, ring_state *s, int64_t row0, int64_t n, const void *kp,
                                    const void *vp, int64_t P, float *lse_acc, apb_error *err) {
  int64_t qw = (int64_t)h->Hq * h->D;
  void *o_acc = sched_row(h, h->o, row0, qw);
  apb_battn_args a = {.P = P, .A = 0, .B = n, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 0,
                      .q = sched_row(h, h->q, row0, qw), .kp = kp, .vp = vp, .o = s->o_tmp, .lse = s->lse_tmp};
  apb_status st = sched_attn(h, &a, err);
  const void *op[2] = {o_acc, s->o_tmp};
  const float *lp[2] = {lse_acc, s->lse_tmp};
  double t0 = sched_prof_begin(h);
  if (!st) st = h->be->ops->merge(h->be, 2, op, lp, n, h->Hq, h->D, o_acc, lse_acc, err);
  sched_prof_end(h, APB_STAGE_ATTN, t0);
  return st;
}

static apb_status ring_attend(host_ctx *h, int layer, apb_error *err) {
  (void)layer;
  ring_state *s = h->mstate;
  int H = h->H, r = h->r, zig = h->p->o.method == APB_METHOD_ZIGZAG;
  const apb_plan *p = h->p;
  int64_t kvw = (int64_t)h->Hkv * h->D;
  size_t row = (size_t)kvw * h->es;
  int64_t c0 = zig ? p->chunk_start[r + 1] - p->chunk_start[r] : h->B, c1 = h->B - c0;
  float *lse_lo = zig ? s->lse_lo : h->lse;
  apb_status st = APB_OK;
  /* Step s receives the block of host j = r - s while the block received at step s-1 (from host
   * r - s + 1) is sent on and, at the same time, attended: the transfer hides behind the compute. At
   * step 1 the host's own block goes out while its own rows are attended (the transfer is started
   * first, so that on GPUs it does not wait for that attention). Blocks are merged in arrival order. */
  const void *cur = h->kv;
  int cur_host = r;
  for (int step = 1; step <= H; step++) {
    void *recv = s->buf[step & 1];
    int j = (r - step + H) % H;
    apb_comm_req *req = NULL;
    if (step < H) {
      double t0 = sched_prof_begin(h);
      st = h->comm->ops->isendrecv(h->comm, cur, 2 * (size_t)rows_of(h, cur_host) * row, (r + 1) % H, recv,
                                   2 * (size_t)rows_of(h, j) * row, (r - 1 + H) % H, &req, err);
      sched_prof_end(h, APB_STAGE_COMM, t0);
      if (st) return st;
    }
    if (step == 1) {
      /* own rows: lo part causal; zigzag's hi chunk sees the lo chunk fully and itself causally */
      apb_battn_args a = {.P = 0, .A = 0, .B = c0, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                          .q = h->q, .kb = h->k, .vb = h->v, .o = h->o, .lse = lse_lo};
      st = sched_attn(h, &a, err);
      if (!st && zig) {
        apb_battn_args b = {.P = c0, .A = 0, .B = c1, .Hq = h->Hq, .Hkv = h->Hkv, .D = h->D, .local_keys = 1,
                            .q = sched_row(h, h->q, c0, (int64_t)h->Hq * h->D), .kp = h->k, .vp = h->v,
                            .kb = sched_row(h, h->k, c0, kvw), .vb = sched_row(h, h->v, c0, kvw),
                            .o = sched_row(h, h->o, c0, (int64_t)h->Hq * h->D), .lse = s->lse_hi};
        st = sched_attn(h, &b, err);
      }
    } else { /* attend the block that arrived at the previous step */
      int64_t jrows = rows_of(h, cur_host);
      const char *rk = cur, *rv = (const char *)cur + (size_t)jrows * row;
      if (!zig) {
        if (cur_host < r) st = attend_full_merge(h, s, 0, h->B, rk, rv, jrows, h->lse, err);
      } else {
        int64_t j0 = p->chunk_start[cur_host + 1] - p->chunk_start[cur_host];
        /* lo chunk r sees chunk j iff j < r; chunk 2H-1-j is always later */
        if (cur_host < r) st = attend_full_merge(h, s, 0, c0, rk, rv, j0, s->lse_lo, err);
        /* hi chunk 2H-1-r sees chunk j always, and chunk 2H-1-j iff j > r (both contiguous) */
        if (!st) st = attend_full_merge(h, s, c0, c1, rk, rv, cur_host > r ? jrows : j0, s->lse_hi, err);
      }
    }
    if ((st = sched_wait(h, &req, 1, st, err))) return st;
    cur = recv;
    cur_host = j;
  }
  if (zig) { /* lse [Hq, T] = [lse_lo | lse_hi] per head */
    size_t T = (size_t)h->T;
    if ((st = h->be->ops->copy2d(h->be, h->lse, T * sizeof(float), s->lse_lo, (size_t)c0 * sizeof(float),
                                 (size_t)c0 * sizeof(float), (size_t)h->Hq, err)) ||
        (st = h->be->ops->copy2d(h->be, h->lse + c0, T * sizeof(float), s->lse_hi, (size_t)c1 * sizeof(float),
                                 (size_t)c1 * sizeof(float), (size_t)h->Hq, err)))
      return st;
  }
  return APB_OK;
}

const method_ops apb_method_ring_ops = {ring_setup, ring_attend, ring_teardown};
const method_ops apb_method_zigzag_ops = {ring_setup, ring_attend, ring_teardown};
