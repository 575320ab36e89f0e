/* sched/host.c: one host's run (apb/sched.h): its rows, the layer loop shared by every method, the KV
 * cache, and the hand-over to the query/decode phase.
 *
 * The layer (shared/APB.md 3, steps 1, 3, 7): RMSNorm, fused QKV projection (+ bias), RoPE at the
 * rows' position ids, the method's attention (step 2 and 4-6 live in the method), O projection,
 * residual, RMSNorm, SwiGLU MLP in row chunks (bounding the [rows, 2F] intermediate), residual. After
 * each layer's attention the K/V rows of the host's own document tokens go to the cache; anchor rows
 * never do (APB.md 3.8). Not here: anything that knows which backend or communicator it runs on.
 * Tested end to end by tests/check_sched.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sched_int.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

apb_status sched_alloc(host_ctx *h, size_t bytes, void **p, apb_error *err) {
  *p = NULL;
  if (bytes == 0) bytes = 16; /* a valid pointer for empty segments */
  return h->be->ops->alloc(h->be, bytes, p, err);
}

void sched_free(host_ctx *h, void *p) {
  if (p) h->be->ops->free(h->be, p);
}

static apb_status hook_call(host_ctx *h, const char *stage, int layer, float *data, int ndim,
                            const int64_t *shape) {
  apb_hook_info info = {.stage = stage, .phase = h->phase, .layer = layer, .host = h->r, .ndim = ndim,
                        .data = data};
  for (int i = 0; i < ndim && i < 4; i++) info.shape[i] = shape[i];
  h->hook(h->hook_user, &info);
  return APB_OK;
}

static size_t numel(int ndim, const int64_t *shape) {
  size_t n = 1;
  for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
  return n;
}

apb_status sched_hook_act(host_ctx *h, const char *stage, int layer, const void *buf, int ndim,
                          const int64_t *shape, apb_error *err) {
  if (!h->hook) return APB_OK;
  size_t n = numel(ndim, shape);
  float *tmp = malloc((n ? n : 1) * sizeof *tmp);
  if (!tmp) return apb_error_set(err, APB_ENOMEM, "hook %s: out of memory for %zu values", stage, n);
  apb_status st = n ? h->be->ops->download_f32(h->be, tmp, buf, n, err) : APB_OK;
  if (!st) st = hook_call(h, stage, layer, tmp, ndim, shape);
  free(tmp);
  return st;
}

apb_status sched_hook_f32(host_ctx *h, const char *stage, int layer, const float *buf, int ndim,
                          const int64_t *shape, apb_error *err) {
  if (!h->hook) return APB_OK;
  size_t n = numel(ndim, shape);
  float *tmp = malloc((n ? n : 1) * sizeof *tmp);
  if (!tmp) return apb_error_set(err, APB_ENOMEM, "hook %s: out of memory for %zu values", stage, n);
  apb_status st = n ? h->be->ops->download(h->be, tmp, buf, n * sizeof(float), err) : APB_OK;
  if (!st) st = hook_call(h, stage, layer, tmp, ndim, shape);
  free(tmp);
  return st;
}

apb_status sched_hook_i32(host_ctx *h, const char *stage, int layer, const int32_t *buf, int ndim,
                          const int64_t *shape, apb_error *err) {
  if (!h->hook) return APB_OK;
  size_t n = numel(ndim, shape);
  int32_t *tmp = malloc((n ? n : 1) * sizeof *tmp);
  float *f = malloc((n ? n : 1) * sizeof *f);
  apb_status st = APB_OK;
  if (!tmp || !f) st = apb_error_set(err, APB_ENOMEM, "hook %s: out of memory for %zu values", stage, n);
  if (!st && n) st = h->be->ops->download(h->be, tmp, buf, n * sizeof(int32_t), err);
  if (!st) {
    for (size_t i = 0; i < n; i++) f[i] = (float)tmp[i];
    st = hook_call(h, stage, layer, f, ndim, shape);
  }
  free(tmp);
  free(f);
  return st;
}

double sched_attn_flops(const apb_battn_args *a) {
  /* anchor rows: i+1 keys each; local rows: P + A + (j+1 if local_keys) */
  double pairs = (double)a->A * (double)(a->A + 1) / 2.0 + (double)a->B * (double)(a->P + a->A);
  if (a->local_keys) pairs += (double)a->B * (double)(a->B + 1) / 2.0;
  return 4.0 * pairs * a->D * a->Hq;
}

const char *apb_stage_name(apb_stage s) {
  static const char *const names[APB_STAGE_COUNT] = {"qkv",  "score", "comm",  "attn", "oproj",
                                                     "ffn",  "elem",  "setup", "other"};
  return (unsigned)s < APB_STAGE_COUNT ? names[s] : "?";
}

/* A profiling sync; its failure is kept (the first one) for apb_host_run to return. */
static void prof_sync(host_ctx *h) {
  apb_error e = {0};
  apb_status st = h->be->ops->sync(h->be, &e);
  if (st && !h->prof_st) h->prof_st = st, h->prof_err = e;
}

/* Profile 2: room for one more element in *arr (n used of *cap, elem bytes each); 0 after keeping an
 * out-of-memory failure in prof_st. */
static int prof_room(host_ctx *h, void **arr, int n, int *cap, size_t elem, const char *what) {
  if (n < *cap) return 1;
  const int c = *cap ? 2 * *cap : 256;
  void *p = realloc(*arr, elem * (size_t)c);
  if (!p) {
    apb_error e = {0};
    h->prof_st = apb_error_set(&e, APB_ENOMEM, "profiling: out of memory for %d %s", c, what), h->prof_err = e;
    return 0;
  }
  *arr = p, *cap = c;
  return 1;
}

/* Profile 2: a timing mark in the backend's queue, its number (-1 after a failure, kept in prof_st). */
static int prof_mark(host_ctx *h) {
  apb_error e = {0};
  if (h->prof_st || !prof_room(h, (void **)&h->marks, h->n_marks, &h->cap_marks, sizeof *h->marks, "timing marks"))
    return -1;
  apb_status st = h->be->ops->mark(h->be, &h->marks[h->n_marks], &e);
  if (st) {
    h->prof_st = st, h->prof_err = e;
    return -1;
  }
  return h->n_marks++;
}

/* Profile 2 uses marks only where the backend has them; otherwise it is profile 1. */
static int prof_marks(const host_ctx *h) { return h->profile == 2 && h->be->ops->mark; }

double sched_prof_begin(host_ctx *h) {
  if (!h->profile) return 0;
  if (prof_marks(h)) return (double)prof_mark(h);
  prof_sync(h);
  return now_s();
}

void sched_prof_end(host_ctx *h, apb_stage s, double t0) {
  if (!h->profile) return;
  if (!prof_marks(h)) {
    prof_sync(h);
    h->stage_s[s] += now_s() - t0;
    return;
  }
  const int a = (int)t0, b = prof_mark(h);
  if (a < 0 || b < 0 || !prof_room(h, (void **)&h->spans, h->n_spans, &h->cap_spans, sizeof *h->spans, "stage spans"))
    return;
  h->spans[h->n_spans].stage = (int)s, h->spans[h->n_spans].a = a, h->spans[h->n_spans].b = b;
  h->n_spans++;
}

/* Profile 2, after the prefill's last sync: book every span to its stage, release the marks. */
static void prof_resolve(host_ctx *h) {
  for (int i = 0; i < h->n_spans && !h->prof_st; i++) {
    apb_error e = {0};
    double sec = 0;
    apb_status st = h->be->ops->mark_elapsed(h->be, h->marks[h->spans[i].a], h->marks[h->spans[i].b], &sec, &e);
    if (st) h->prof_st = st, h->prof_err = e;
    else h->stage_s[h->spans[i].stage] += sec;
  }
  for (int i = 0; i < h->n_marks; i++) h->be->ops->mark_free(h->be, h->marks[i]);
  free(h->marks), free(h->spans);
  h->marks = NULL, h->spans = NULL;
  h->n_marks = h->cap_marks = h->n_spans = h->cap_spans = 0;
}

apb_status sched_attn(host_ctx *h, const apb_battn_args *a, apb_error *err) {
  h->attn_flops += sched_attn_flops(a);
  double t0 = sched_prof_begin(h);
  apb_status st = h->be->ops->attn(h->be, a, err);
  sched_prof_end(h, APB_STAGE_ATTN, t0);
  return st;
}

apb_status sched_linear(host_ctx *h, const apb_bweight *w, int64_t N, int64_t K, const void *x, int64_t T,
                        void *y, apb_error *err) {
  h->linear_flops += 2.0 * (double)T * (double)N * (double)K;
  double t0 = sched_prof_begin(h);
  apb_status st = h->be->ops->linear(h->be, w, x, T, y, err);
  sched_prof_end(h, h->cur_stage, t0);
  return st;
}

apb_status sched_allgatherv(host_ctx *h, const void *send, void *recv, const size_t *bytes, apb_error *err) {
  double t0 = sched_prof_begin(h);
  apb_status st = h->comm->ops->allgatherv(h->comm, send, recv, bytes, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

apb_status sched_sendrecv(host_ctx *h, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes, int src,
                          apb_error *err) {
  double t0 = sched_prof_begin(h);
  apb_status st = h->comm->ops->sendrecv(h->comm, send, sbytes, dst, recv, rbytes, src, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

apb_status sched_alltoallv(host_ctx *h, const void *send, const size_t *sbytes, void *recv, const size_t *rbytes,
                           apb_error *err) {
  double t0 = sched_prof_begin(h);
  apb_status st = h->comm->ops->alltoallv(h->comm, send, sbytes, recv, rbytes, err);
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

apb_status sched_wait(host_ctx *h, apb_comm_req **reqs, int n, apb_status st, apb_error *err) {
  int any = 0;
  for (int i = 0; i < n && !any; i++) any = reqs[i] != NULL;
  if (!any) return st; /* nothing in flight (synchronous communicators): no profiling span either */
  apb_error scratch = {0};
  double t0 = sched_prof_begin(h);
  for (int i = 0; i < n; i++) {
    if (!reqs[i]) continue;
    apb_status w = h->comm->ops->wait(h->comm, reqs[i], st ? &scratch : err);
    reqs[i] = NULL;
    if (!st) st = w;
  }
  sched_prof_end(h, APB_STAGE_COMM, t0);
  return st;
}

/* The host's rows: token ids and positions (APB.md 3 "Inputs" and "The anchor"). */
static apb_status make_rows(host_ctx *h, const int32_t *doc, const int32_t *query, apb_error *err) {
  const apb_plan *p = h->p;
  int r = h->r;
  apb_method m = p->o.method;
  int64_t A = 0, B = 0;
  int64_t s0 = 0, s1 = 0, t0 = 0, t1 = 0; /* one or two document ranges */
  if (m == APB_METHOD_DENSE) {
    s0 = 0, s1 = p->n;
  } else if (m == APB_METHOD_ZIGZAG) {
    s0 = p->chunk_start[r], s1 = p->chunk_start[r + 1];
    t0 = p->chunk_start[2 * h->H - 1 - r], t1 = p->chunk_start[2 * h->H - r];
  } else if (p->balance) { /* virtual hosts r and 2H-1-r; the second always needs the anchor */
    int v = 2 * h->H - 1 - r;
    s0 = p->block_start[r], s1 = p->block_start[r + 1];
    t0 = p->block_start[v], t1 = p->block_start[v + 1];
    A = p->la;
  } else {
    s0 = p->block_start[r], s1 = p->block_start[r + 1];
    if ((m == APB_METHOD_STAR || m == APB_METHOD_APB) && r > 0) A = p->la;
  }
  B = (s1 - s0) + (t1 - t0);
  h->A = A, h->B = B, h->T = A + B;
  h->ids_h = malloc(sizeof(int32_t) * (size_t)(h->T ? h->T : 1));
  h->pos_h = malloc(sizeof(int32_t) * (size_t)(h->T ? h->T : 1));
  h->row_pos = malloc(sizeof(int64_t) * (size_t)(B ? B : 1));
  if (!h->ids_h || !h->pos_h || !h->row_pos) return apb_error_set(err, APB_ENOMEM, "host %d: out of memory", r);
  /* anchor: doc[0..s), query, doc[s..l_a - q_len) when embedded; doc[0..l_a) otherwise; positions 0..l_a-1 */
  int64_t i = 0;
  if (A > 0) {
    if (p->embed_query) {
      for (int64_t t = 0; t < p->s; t++) h->ids_h[i++] = doc[t];
      for (int64_t t = 0; t < p->q_len; t++) h->ids_h[i++] = query[t];
      for (int64_t t = p->s; t < p->la - p->q_len; t++) h->ids_h[i++] = doc[t];
    } else {
      for (int64_t t = 0; t < p->la; t++) h->ids_h[i++] = doc[t];
    }
    for (int64_t t = 0; t < A; t++) h->pos_h[t] = (int32_t)t;
  }
  int64_t j = 0;
  for (int64_t t = s0; t < s1; t++, i++, j++) h->ids_h[i] = doc[t], h->pos_h[i] = (int32_t)t, h->row_pos[j] = t;
  for (int64_t t = t0; t < t1; t++, i++, j++) h->ids_h[i] = doc[t], h->pos_h[i] = (int32_t)t, h->row_pos[j] = t;
  return APB_OK;
}

static const method_ops *method_for(apb_method m) {
  switch (m) {
  case APB_METHOD_DENSE: return &apb_method_dense_ops;
  case APB_METHOD_RING: return &apb_method_ring_ops;
  case APB_METHOD_ZIGZAG: return &apb_method_zigzag_ops;
  case APB_METHOD_ULYSSES: return &apb_method_ulysses_ops;
  case APB_METHOD_STAR:
  case APB_METHOD_APB: return &apb_method_star_ops;
  case APB_METHOD_COUNT: break;
  }
  return NULL;
}

static apb_status alloc_prefill(host_ctx *h, apb_error *err) {
  size_t es = h->es, T = (size_t)h->T;
  apb_status st;
  h->chunk = h->p->ffn_chunk < h->T ? h->p->ffn_chunk : h->T;
  if ((st = sched_alloc(h, T * sizeof(int32_t), (void **)&h->ids, err)) ||
      (st = sched_alloc(h, T * sizeof(int32_t), (void **)&h->pos, err)) ||
      (st = sched_alloc(h, T * (size_t)h->E * es, &h->x, err)) ||
      (st = sched_alloc(h, T * (size_t)h->E * es, &h->hb, err)) ||
      (st = sched_alloc(h, T * (size_t)h->QKV * es, &h->qkv, err)) ||
      (st = sched_alloc(h, T * (size_t)h->Hq * h->D * es, &h->q, err)) ||
      (st = sched_alloc(h, 2 * T * (size_t)h->Hkv * h->D * es, &h->kv, err)) ||
      (st = sched_alloc(h, T * (size_t)h->Hq * h->D * es, &h->o, err)) ||
      (st = sched_alloc(h, T * (size_t)h->Hq * sizeof(float), (void **)&h->lse, err)) ||
      (st = sched_alloc(h, (size_t)h->chunk * 2 * (size_t)h->F * es, &h->gu, err)) ||
      (st = sched_alloc(h, (size_t)h->chunk * (size_t)h->F * es, &h->ff, err)))
    return st;
  h->k = h->kv;
  h->v = (char *)h->kv + T * (size_t)h->Hkv * h->D * es;
  return APB_OK;
}

static void free_prefill(host_ctx *h) {
  void *bufs[] = {h->ids, h->pos, h->x, h->hb, h->qkv, h->q, h->kv, h->o, h->lse, h->gu, h->ff};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) sched_free(h, bufs[i]);
  h->ids = h->pos = NULL, h->lse = NULL;
  h->x = h->hb = h->qkv = h->q = h->kv = h->k = h->v = h->o = h->gu = h->ff = NULL;
}

static apb_status alloc_cache(host_ctx *h, int64_t extra, apb_error *err) {
  int L = h->cfg->n_layers;
  h->cache_cap = h->B + extra;
  h->kc = calloc((size_t)L, sizeof *h->kc);
  h->vc = calloc((size_t)L, sizeof *h->vc);
  if (!h->kc || !h->vc) return apb_error_set(err, APB_ENOMEM, "host %d: out of memory for the KV cache", h->r);
  size_t bytes = (size_t)h->cache_cap * (size_t)h->Hkv * h->D * h->es;
  for (int l = 0; l < L; l++) {
    apb_status st;
    if ((st = sched_alloc(h, bytes, &h->kc[l], err)) || (st = sched_alloc(h, bytes, &h->vc[l], err))) return st;
  }
  return APB_OK;
}

static void free_cache(host_ctx *h) {
  if (h->kc)
    for (int l = 0; l < h->cfg->n_layers; l++) sched_free(h, h->kc[l]), sched_free(h, h->vc[l]);
  free(h->kc);
  free(h->vc);
  h->kc = h->vc = NULL;
}

/* A memory-bound op of the layer, booked to the ELEM stage when profiled:
 * `st = SCHED_ELEM(h, be->ops->add(...))`. The comma operator orders the span's start before the call. */
static apb_status elem_end(host_ctx *h, apb_status st) {
  sched_prof_end(h, APB_STAGE_ELEM, h->elem_t0);
  return st;
}
#define SCHED_ELEM(h, call) ((h)->elem_t0 = sched_prof_begin(h), elem_end((h), (call)))

/* MLP in row chunks: x += down(swiglu(gate_up(norm(x)))) (APB.md 3.7). */
static apb_status ffn(host_ctx *h, const struct apb_blayer *lw, void *x, void *hb, int64_t T, apb_error *err) {
  apb_backend *be = h->be;
  apb_status st = APB_OK;
  for (int64_t r0 = 0; r0 < T && !st; r0 += h->chunk) {
    int64_t n = T - r0 < h->chunk ? T - r0 : h->chunk;
    void *xc = sched_row(h, x, r0, h->E), *hc = sched_row(h, hb, r0, h->E);
    h->cur_stage = APB_STAGE_FFN;
    if ((st = SCHED_ELEM(h, be->ops->rmsnorm(be, lw->ffn_norm, (float)h->cfg->rms_eps, xc, n, hc, err))) ||
        (st = sched_linear(h, lw->w_gate_up, 2 * (int64_t)h->F, h->E, hc, n, h->gu, err)) ||
        (st = SCHED_ELEM(h, be->ops->swiglu(be, h->gu, n, h->F, h->ff, err))) ||
        (st = sched_linear(h, lw->w_down, h->E, h->F, h->ff, n, hc, err)) ||
        (st = SCHED_ELEM(h, be->ops->add(be, xc, hc, (size_t)n * (size_t)h->E, err))))
      break;
  }
  return st;
}

/* One decoder layer over T rows of x (shared by the prefill and the query/decode phase up to the
 * attention, which the caller supplies through `attend`). */
static apb_status layer_prefill(host_ctx *h, int l, apb_error *err) {
  apb_backend *be = h->be;
  const struct apb_blayer *lw = &h->bm->layers[l];
  int64_t T = h->T;
  apb_status st;
  int64_t sh_x[2] = {T, h->E}, sh_qkv[2] = {T, h->QKV}, sh_q[3] = {T, h->Hq, h->D}, sh_k[3] = {T, h->Hkv, h->D},
          sh_lse[2] = {h->Hq, T};
  if ((st = sched_hook_act(h, "input", l, h->x, 2, sh_x, err))) return st;
  h->cur_stage = APB_STAGE_QKV;
  if ((st = SCHED_ELEM(h, be->ops->rmsnorm(be, lw->attn_norm, (float)h->cfg->rms_eps, h->x, T, h->hb, err))) ||
      (st = sched_linear(h, lw->wqkv, h->QKV, h->E, h->hb, T, h->qkv, err)) ||
      (st = sched_hook_act(h, "qkv", l, h->qkv, 2, sh_qkv, err)) ||
      (st = SCHED_ELEM(h, be->ops->split_rope(be, h->qkv, T, h->Hq, h->Hkv, h->D, h->pos, &h->cfg->rope, h->q, h->k,
                                              h->v, err))) ||
      (st = sched_hook_act(h, "q", l, h->q, 3, sh_q, err)) || (st = sched_hook_act(h, "k", l, h->k, 3, sh_k, err)) ||
      (st = sched_hook_act(h, "v", l, h->v, 3, sh_k, err)))
    return st;
  if ((st = h->m->attend(h, l, err))) return st;
  if ((st = sched_hook_act(h, "attn_o", l, h->o, 3, sh_q, err)) ||
      (st = sched_hook_f32(h, "attn_lse", l, h->lse, 2, sh_lse, err)))
    return st;
  /* cache this host's document rows (APB.md 3.8: the anchor and the passing block never enter it) */
  size_t kvrow = (size_t)h->Hkv * h->D * h->es;
  if ((st = SCHED_ELEM(h, be->ops->copy(be, h->kc[l], sched_row(h, h->k, h->A, (int64_t)h->Hkv * h->D),
                                        (size_t)h->B * kvrow, err))) ||
      (st = SCHED_ELEM(h, be->ops->copy(be, h->vc[l], sched_row(h, h->v, h->A, (int64_t)h->Hkv * h->D),
                                        (size_t)h->B * kvrow, err))))
    return st;
  h->cur_stage = APB_STAGE_OPROJ;
  if ((st = sched_linear(h, lw->wo, h->E, (int64_t)h->Hq * h->D, h->o, T, h->hb, err)) ||
      (st = SCHED_ELEM(h, be->ops->add(be, h->x, h->hb, (size_t)T * (size_t)h->E, err))) ||
      (st = ffn(h, lw, h->x, h->hb, T, err)))
    return st;
  return sched_hook_act(h, "layer_out", l, h->x, 2, sh_x, err);
}

apb_status apb_host_run(const apb_host_args *a, apb_host_result *res, apb_error *err) {
  memset(res, 0, sizeof *res);
  const apb_plan *p = a->plan;
  if (!p || !a->bm || !a->be || !a->comm || !a->doc || !a->query)
    return apb_error_set(err, APB_EINVAL, "apb_host_run: plan, weights, backend, communicator, document and query "
                         "are all required");
  if (a->comm->size != p->H || a->comm->rank < 0 || a->comm->rank >= p->H)
    return apb_error_set(err, APB_EINVAL, "apb_host_run: the communicator has %d hosts (rank %d) but the plan "
                         "needs %d", a->comm->size, a->comm->rank, p->H);
  if (p->n + p->q_len + p->o.max_new_tokens > (int64_t)INT32_MAX + 1)
    return apb_error_set(err, APB_EUNSUPPORTED,
                         "apb_host_run: %lld document + %lld query + %lld new tokens: positions are int32 (at most "
                         "2^31 tokens in all)", (long long)p->n, (long long)p->q_len, (long long)p->o.max_new_tokens);
  const apb_model_config *cfg = &a->bm->m->cfg;
  for (int64_t t = 0; t < p->n; t++)
    if (a->doc[t] < 0 || a->doc[t] >= cfg->vocab)
      return apb_error_set(err, APB_EINVAL, "document token %lld is id %d, outside the vocabulary [0, %d)",
                           (long long)t, a->doc[t], cfg->vocab);
  for (int64_t t = 0; t < p->q_len; t++)
    if (a->query[t] < 0 || a->query[t] >= cfg->vocab)
      return apb_error_set(err, APB_EINVAL, "query token %lld is id %d, outside the vocabulary [0, %d)",
                           (long long)t, a->query[t], cfg->vocab);

  host_ctx hc = {0}, *h = &hc;
  h->p = p, h->cfg = cfg, h->bm = a->bm, h->be = a->be, h->comm = a->comm;
  h->r = a->comm->rank, h->H = p->H;
  h->hook = a->hook, h->hook_user = a->hook_user, h->phase = "prefill";
  h->es = apb_act_size(a->be);
  h->E = cfg->hidden, h->F = cfg->ffn, h->Hq = cfg->n_heads, h->Hkv = cfg->n_kv_heads, h->D = cfg->head_dim;
  h->V = cfg->vocab;
  h->QKV = (int64_t)(h->Hq + 2 * h->Hkv) * h->D;
  h->m = method_for(p->o.method);
  h->profile = a->profile;
  apb_backend *be = h->be;
  double t0 = now_s(), wait0 = a->comm->stats.wait_s;
  const int64_t sent0 = apb_comm_bytes_sent(a->comm); /* the communicator may have served earlier runs */
  const double ts = sched_prof_begin(h);
  apb_status st = make_rows(h, a->doc, a->query, err);
  int last = h->r == p->last_rank;
  if (!st) st = alloc_cache(h, last ? p->q_len + p->o.max_new_tokens : 0, err);
  if (!st) st = alloc_prefill(h, err);
  if (!st) st = be->ops->upload(be, h->ids, h->ids_h, (size_t)h->T * sizeof(int32_t), err);
  if (!st) st = be->ops->upload(be, h->pos, h->pos_h, (size_t)h->T * sizeof(int32_t), err);
  if (!st) st = be->ops->embed(be, h->bm->embed, h->ids, h->T, h->x, err);
  if (!st && h->m->setup) st = h->m->setup(h, err);
  sched_prof_end(h, APB_STAGE_SETUP, ts);
  for (int l = 0; !st && l < cfg->n_layers; l++) st = layer_prefill(h, l, err);
  h->cache_len = h->B;
  /* final hidden states of this host's document rows (the anchor is discarded, APB.md 3) */
  if (!st && (a->want_hidden || h->hook)) {
    void *xl = sched_row(h, h->x, h->A, h->E), *hl = sched_row(h, h->hb, h->A, h->E);
    int64_t sh[2] = {h->B, h->E};
    st = be->ops->rmsnorm(be, h->bm->final_norm, (float)cfg->rms_eps, xl, h->B, hl, err);
    if (!st) st = sched_hook_act(h, "final_hidden", -1, hl, 2, sh, err);
    if (!st && a->want_hidden) {
      res->hidden = malloc(sizeof(float) * (size_t)(h->B ? h->B : 1) * (size_t)h->E);
      if (!res->hidden) st = apb_error_set(err, APB_ENOMEM, "host %d: out of memory for hidden states", h->r);
      else st = be->ops->download_f32(be, res->hidden, hl, (size_t)h->B * (size_t)h->E, err);
    }
  }
  if (!st) st = be->ops->sync(be, err);
  if (h->marks || h->spans) { /* profile 2: the spans are complete now (after a failure: only freed) */
    if (st) h->n_spans = 0;
    prof_resolve(h);
  }
  if (!st && h->prof_st) st = apb_error_set(err, h->prof_st, "%s", h->prof_err.msg);
  res->stats.prefill_s = now_s() - t0;
  res->stats.prefill_wait_s = a->comm->stats.wait_s - wait0;
  res->stats.attn_flops = h->attn_flops;
  res->stats.linear_flops = h->linear_flops;
  if (h->profile) {
    double booked = 0;
    for (int k = 0; k < APB_STAGE_COUNT; k++) booked += h->stage_s[k];
    h->stage_s[APB_STAGE_OTHER] = res->stats.prefill_s - booked;
    for (int k = 0; k < APB_STAGE_COUNT; k++) res->stats.stage_s[k] = h->stage_s[k];
    h->profile = 0; /* the breakdown is the prefill's: the query and decode phases run unprofiled */
  }
  if (h->m->teardown) h->m->teardown(h);
  free_prefill(h);
  if (!st) st = sched_decode(h, a->query, p->q_len, p->o.max_new_tokens, res, err);
  res->n_rows = h->B;
  res->row_pos = h->row_pos, h->row_pos = NULL;
  res->stats.bytes_sent = apb_comm_bytes_sent(a->comm) - sent0;
  size_t cur = 0, peak = 0;
  res->stats.peak_bytes = apb_backend_mem(be, &cur, &peak) == APB_OK ? (int64_t)peak : -1;
  free_cache(h);
  free(h->ids_h);
  free(h->pos_h);
  free(h->row_pos);
  if (st) apb_error_set(err, st, "host %d of %d (%s)", h->r, h->H, apb_method_name(p->o.method));
  return st;
}

void apb_host_result_free(apb_host_result *r) {
  if (!r) return;
  free(r->row_pos);
  free(r->hidden);
  free(r->logits);
  free(r->generated);
  memset(r, 0, sizeof *r);
}
