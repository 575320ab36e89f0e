/* sched/sched_int.h: what the schedule files share (not installed).
 *
 * A host_ctx is one host's state for one run: its rows (anchor rows first, then its document rows),
 * the backend buffers of one layer, the KV cache of every layer, and the method's own state. The layer
 * code in host.c calls method_ops.attend once per layer; apb.c, ring.c and ulysses.c implement it.
 * Legend: T rows on this host = A + B, E hidden, F ffn, Hq/Hkv/D heads, QKV = (Hq + 2 Hkv) D.
 */
#ifndef APB_SCHED_INT_H
#define APB_SCHED_INT_H

#include "apb/sched.h"

typedef struct host_ctx host_ctx;

typedef struct method_ops {
  apb_status (*setup)(host_ctx *h, apb_error *err);
  /* from h->qkv (pre-RoPE) and h->q, h->k, h->v (post-RoPE) compute h->o [T, Hq, D] and h->lse [Hq, T] */
  apb_status (*attend)(host_ctx *h, int layer, apb_error *err);
  void (*teardown)(host_ctx *h);
} method_ops;

struct host_ctx {
  const apb_plan *p;
  const apb_model_config *cfg;
  const apb_bmodel *bm;
  apb_backend *be;
  apb_comm *comm;
  int r, H;
  apb_hook_fn hook;
  void *hook_user;
  const char *phase;
  size_t es;                  /* bytes per activation element */
  int E, F, Hq, Hkv, D, V;
  int64_t QKV;

  int64_t A, B, T;            /* anchor rows, document rows, all rows of this host */
  int32_t *ids_h, *pos_h;     /* [T] host copies */
  int64_t *row_pos;           /* [B] positions of the document rows */

  /* backend buffers for the prefill rows */
  int32_t *ids, *pos;         /* [T] */
  void *x;                    /* [T, E] residual stream */
  void *hb;                   /* [T, E] normed input / projection output */
  void *qkv;                  /* [T, QKV] pre-RoPE */
  void *q;                    /* [T, Hq, D] */
  void *kv;                   /* [2, T, Hkv, D]: k then v, contiguous (ring sends it whole) */
  void *k, *v;                /* views into kv */
  void *o;                    /* [T, Hq, D] */
  float *lse;                 /* [Hq, T] */
  void *gu, *ff;              /* [chunk, 2F], [chunk, F] */
  int64_t chunk;

  /* KV cache: per layer [cap, Hkv, D], rows 0..cache_len-1 used */
  void **kc, **vc;
  int64_t cache_len, cache_cap;

  const method_ops *m;
  void *mstate;
  double attn_flops, linear_flops;
  int profile;              /* apb_host_args.profile: 0, 1 (syncs) or 2 (the backend's timing marks) */
  void **marks;             /* profile 2: the marks made so far [n_marks] */
  int n_marks, cap_marks;
  struct { int stage, a, b; } *spans; /* profile 2: a stage from mark a to mark b [n_spans] */
  int n_spans, cap_spans;
  apb_stage cur_stage;      /* where sched_linear books its time */
  double elem_t0;           /* SCHED_ELEM's open span */
  double stage_s[APB_STAGE_COUNT];
  apb_status prof_st;       /* the first failure a profiling sync returned (a backend that checks */
  apb_error prof_err;       /* inputs on the device reports them at a sync); returned by the run */
};

extern const method_ops apb_method_dense_ops, apb_method_star_ops, apb_method_ring_ops,
    apb_method_zigzag_ops, apb_method_ulysses_ops;

/* Helpers in host.c. */
apb_status sched_alloc(host_ctx *h, size_t bytes, void **p, apb_error *err);
void sched_free(host_ctx *h, void *p);
/* Byte offset of row `row` in a token-major buffer with `width` elements per row. */
static inline void *sched_row(const host_ctx *h, const void *buf, int64_t row, int64_t width) {
  return (char *)buf + (size_t)row * (size_t)width * h->es;
}
/* Call the hook (if any) with a host copy of an activation buffer of n = prod(shape) elements. */
apb_status sched_hook_act(host_ctx *h, const char *stage, int layer, const void *buf, int ndim,
                          const int64_t *shape, apb_error *err);
/* Same for an fp32 buffer in backend memory (lse, scores). */
apb_status sched_hook_f32(host_ctx *h, const char *stage, int layer, const float *buf, int ndim,
                          const int64_t *shape, apb_error *err);
apb_status sched_hook_i32(host_ctx *h, const char *stage, int layer, const int32_t *buf, int ndim,
                          const int64_t *shape, apb_error *err);
/* be->ops->attn plus FLOP accounting. */
apb_status sched_attn(host_ctx *h, const apb_battn_args *a, apb_error *err);
/* Useful FLOPs of a segmented attention call (4 x visible pairs x D x Hq). */
double sched_attn_flops(const apb_battn_args *a);
/* be->ops->linear plus FLOP accounting. */
apb_status sched_linear(host_ctx *h, const apb_bweight *w, int64_t N, int64_t K, const void *x, int64_t T,
                        void *y, apb_error *err);

/* Profiling: profile 1: sync the backend and return the clock, and sched_prof_end adds the time
 * since t0 to stage s; profile 2 (a backend with timing marks): make a mark and return its number, and
 * sched_prof_end books the span between two marks, resolved after the prefill's last sync; else
 * nothing. */
double sched_prof_begin(host_ctx *h);
void sched_prof_end(host_ctx *h, apb_stage s, double t0);
/* Collectives through these, so their time is booked to APB_STAGE_COMM. */
apb_status sched_allgatherv(host_ctx *h, const void *send, void *recv, const size_t *bytes, apb_error *err);
apb_status sched_sendrecv(host_ctx *h, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes, int src,
                          apb_error *err);
apb_status sched_alltoallv(host_ctx *h, const void *send, const size_t *sbytes, void *recv, const size_t *rbytes,
                           apb_error *err);
/* Complete the requests reqs[0..n) that are not NULL and set them to NULL, booked to APB_STAGE_COMM.
 * st is the caller's status so far: when it already failed, the waits still run (nothing is left in
 * flight) but their own failures do not overwrite err, and st is returned; else the first failure.
 * With every request NULL (synchronous communicators) it books nothing and returns st. */
apb_status sched_wait(host_ctx *h, apb_comm_req **reqs, int n, apb_status st, apb_error *err);

/* The query and decode phase (decode.c). */
apb_status sched_decode(host_ctx *h, const int32_t *query, int64_t q_len, int64_t max_new, apb_host_result *res,
                        apb_error *err);

#endif /* APB_SCHED_INT_H */
