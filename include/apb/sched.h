/* apb/sched.h: the schedules. One function runs one host's part (SPMD: rank r of H) of a prefill and
 * the query/decode phase that follows, for any method, on any backend and communicator.
 *
 * Methods (shared/APB.md 5): dense (one host), ring, zigzag, ulysses (exact), star, apb (approximate).
 * The layer code (norm, projections, RoPE, FFN, residuals) is written once; a method only decides
 * which rows a host holds and how its attention is assembled (apb.c, ring.c, ulysses.c in sched/).
 * After the prefill every host keeps the KV cache of its own document tokens; the query tokens and
 * each generated token then run on every host with the LSE merge of APB.md 4 (sched/decode.c).
 *
 * Nothing here knows which backend or communicator it runs on, and nothing loops over hosts.
 * Tested end to end in tests/check_sched.c (invariants of APB.md 6 on the tiny preset).
 */
#ifndef APB_SCHED_H
#define APB_SCHED_H

#include <stdint.h>

#include "apb/backend.h"
#include "apb/comm.h"
#include "apb/model.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define APB_MAX_HOSTS 1024

typedef enum apb_method {
  APB_METHOD_DENSE = 0,
  APB_METHOD_RING,
  APB_METHOD_ZIGZAG,
  APB_METHOD_ULYSSES,
  APB_METHOD_STAR,
  APB_METHOD_APB,
  APB_METHOD_COUNT
} apb_method;

typedef enum apb_scorer {
  APB_SCORER_RETAINING = 0, /* Locret retaining heads (APB.md 3.2), APB's default */
  APB_SCORER_RANDOM,        /* seeded uniform random scores */
  APB_SCORER_UNIFORM,       /* n_sel tokens evenly spaced over the block's eligible ones score 1,
                               the rest 0 */
  APB_SCORER_COUNT
} apb_scorer;

int apb_method_parse(const char *s, apb_method *out);   /* 0 or -1 */
const char *apb_method_name(apb_method m);
int apb_scorer_parse(const char *s, apb_scorer *out);
const char *apb_scorer_name(apb_scorer s);

/* Every length and count of a run; -1 (or the stated value) selects the documented default. */
typedef struct apb_run_opts {
  apb_method method;
  int hosts;                /* H >= 1 (dense: ignored, runs on one host) */
  int64_t anchor;           /* l_a; -1: apb min(l_b/4, 8192), star l_b (APB.md 2, 5) */
  int64_t passing;          /* l_p; -1: l_a / 2 */
  int64_t query_offset;     /* s; -1: 0 */
  int embed_query;          /* -1: apb 1, star 0 */
  apb_scorer scorer;        /* default APB_SCORER_RETAINING */
  int pool;                 /* max-pool window w, odd; -1: 5 with the retaining scorer, else 1 */
  uint64_t seed;            /* random scorer */
  int64_t max_new_tokens;   /* greedy decode steps after the query (>= 0) */
  int64_t ffn_chunk;        /* rows per FFN chunk; -1: 8192 */
  int balance;              /* apb, star: each host holds two virtual hosts h and 2H-1-h of a 2H-host
                               run, so later (slower) blocks pair with earlier ones; -1: 0 */
  int overlap;              /* apb_overlap: how apb hides its all-gathers (same function, other
                               rounding); ulysses: nonzero pipelines the all-to-alls over groups of
                               heads (same arithmetic, see apb_plan.uly_groups); -1: APB_OVERLAP_ANCHOR.
                               Ring always prefetches the next block (same arithmetic). */
} apb_run_opts;

/* apb's attention around the passing block's all-gathers (apb_run_opts.overlap):
 * NONE: the all-gathers block, then one call over [P | A | B];
 * SPLIT: [A | B] is attended while they run, then the local rows against P alone, merged by LSE;
 * ANCHOR: the anchor rows (which never see P) are attended while they run, then the local rows in one
 * call over [P | A | B] (P and the anchor keys copied together), no merge. */
typedef enum apb_overlap { APB_OVERLAP_NONE = 0, APB_OVERLAP_SPLIT = 1, APB_OVERLAP_ANCHOR = 2 } apb_overlap;

/* Defaults: method apb, hosts 1, everything else -1 / 0 as above, scorer retaining, 0 new tokens. */
void apb_run_opts_default(apb_run_opts *o);

/* The resolved plan of a run: every default applied and every rule checked (APB.md 2-3), and the
 * token layout of each host. Computed identically on every host from (opts, n, q_len, model). */
typedef struct apb_plan {
  apb_run_opts o;           /* with defaults resolved */
  int H;                    /* hosts actually used (1 for dense) */
  int64_t n, q_len;         /* document and query tokens */
  int64_t la, lp, s;        /* anchor, passing, query offset */
  int embed_query;
  int pool;
  int64_t lb;               /* block length used for defaults and checks: block 0's (the largest) */
  int balance;              /* two virtual hosts per host (see apb_run_opts) */
  int V;                    /* virtual hosts: H, or 2H when balanced (block_start, n_sel index them) */
  int last_rank;            /* the host holding the last virtual host (it owns the new tokens' KV) */
  int64_t block_start[APB_MAX_HOSTS + 1];     /* virtual host v holds [block_start[v], block_start[v+1]) */
  int64_t chunk_start[2 * APB_MAX_HOSTS + 1]; /* zigzag: 2H chunks; host h holds h and 2H-1-h */
  int64_t n_sel[APB_MAX_HOSTS];               /* apb: compressed rows C_v per KV head (0 for V-1) */
  int64_t excl0;            /* apb: document tokens host 0 excludes from selection (held by the anchor) */
  int64_t ffn_chunk;        /* rows per FFN chunk (bounds the [rows, 2F] intermediate) */
  int overlap;              /* apb_overlap (see apb_run_opts) */
  int uly_groups;           /* ulysses: head groups whose all-to-alls overlap the attention of the
                               group before (1: none). With overlap, a host's Hkv/H KV heads one per
                               group; a host with one KV head splits its query heads in two when
                               their number is even (K/V travel with the first half). */
} apb_plan;

/* The virtual hosts of host r: *n is 1 (v[0] = r) or, balanced, 2 (v[0] = r, v[1] = 2H-1-r). */
void apb_plan_virtual(const apb_plan *p, int r, int v[2], int *n);

/* Document rows host r holds (its KV cache rows after the prefill). */
int64_t apb_plan_rows(const apb_plan *p, int r);

/* Resolve defaults and validate. Errors name the option: more hosts than tokens, l_a > l_b, l_p < 0,
 * query longer than the anchor allows, ulysses with H not dividing Hkv (and Hq), pool not odd, ... */
apb_status apb_plan_make(const apb_run_opts *o, int64_t n, int64_t q_len, const apb_model_config *cfg,
                         int scorer_width, apb_plan *plan, apb_error *err);

/* Per-stage hook: called (when set) with a host copy of every intermediate, fp32 unless noted.
 * Stages: "input" [T, E], "qkv" [T, (Hq+2Hkv)D] (pre-RoPE), "q" [T,Hq,D], "k" "v" [T,Hkv,D]
 * (post-RoPE), "scores" [Hkv, B] (after pooling), "selected" [Hkv, k] (int32 as float), "passing_k"
 * "passing_v" [P, Hkv, D], "attn_o" [T, Hq, D], "attn_lse" [Hq, T], "layer_out" [T, E],
 * "final_hidden" [T, E] (layer -1), "logits" [V] (layer -1, phase query/decode). A balanced host's
 * second virtual block reports its scores and selection as "scores_v2" and "selected_v2".
 * `rows` names the host's rows: T and the position of each row are in the call. */
typedef struct apb_hook_info {
  const char *stage;
  const char *phase;        /* "prefill", "query", "decode" */
  int layer;                /* -1 for stages outside layers */
  int host;
  int ndim;
  int64_t shape[4];
  const float *data;        /* host memory, valid during the call */
} apb_hook_info;
typedef void (*apb_hook_fn)(void *user, const apb_hook_info *info);

/* Parts of a prefill layer, for the per-stage time breakdown (apb_host_args.profile). The linear
 * stages count only their matrix products; the layer's norms, RoPE, SwiGLU, residual adds and KV
 * cache copies are ELEM (a method's own copies and merges are in COMM and ATTN); the work before the
 * first layer is SETUP; OTHER is what is left (launch gaps, the final norm, the last wait). */
typedef enum apb_stage {
  APB_STAGE_QKV = 0,        /* the fused q/k/v projection */
  APB_STAGE_SCORE,          /* compressor: scorer, pool, top-k, gather (apb) */
  APB_STAGE_COMM,           /* collectives (time until the data is there) */
  APB_STAGE_ATTN,           /* attention and LSE merges */
  APB_STAGE_OPROJ,          /* o projection */
  APB_STAGE_FFN,            /* gate/up and down projections */
  APB_STAGE_ELEM,           /* the layer's memory-bound ops: norms, RoPE, SwiGLU, adds, cache copies */
  APB_STAGE_SETUP,          /* before the first layer: token layout, the KV cache's and the layers'
                               buffers (allocation), upload, embedding, the method's own setup */
  APB_STAGE_OTHER,          /* the rest of the prefill */
  APB_STAGE_COUNT
} apb_stage;
const char *apb_stage_name(apb_stage s);

typedef struct apb_host_stats {
  double prefill_s, query_s, decode_s;   /* wall time on this host */
  double prefill_wait_s;                 /* of prefill_s, time blocked in collectives (a simulated host
                                            in serialized mode computes for prefill_s - prefill_wait_s) */
  double attn_flops;                     /* useful attention FLOPs of this host's prefill */
  double linear_flops;                   /* projection, FFN and scorer FLOPs of this host's prefill */
  double stage_s[APB_STAGE_COUNT];       /* prefill time by stage, when profiled (else 0) */
  int64_t bytes_sent;                    /* over all collectives (prefill + decode) */
  int64_t peak_bytes;                    /* backend memory high-water mark of this host (-1: unknown) */
} apb_host_stats;

/* What one host returns. Buffers are host memory, allocated by apb_host_run (free with
 * apb_host_result_free). */
typedef struct apb_host_result {
  int64_t n_rows;           /* document tokens this host holds (its KV cache rows) */
  int64_t *row_pos;         /* [n_rows] their positions (document order not guaranteed: zigzag) */
  float *hidden;            /* [n_rows, E] final hidden states (after the final norm) */
  float *logits;            /* [V] logits of the last query token (every host has them) */
  int64_t n_generated;
  int32_t *generated;       /* [n_generated] greedy tokens (identical on every host) */
  apb_host_stats stats;
} apb_host_result;

typedef struct apb_host_args {
  const apb_plan *plan;
  const apb_bmodel *bm;     /* weights on this host's backend kind */
  apb_backend *be;
  apb_comm *comm;           /* comm->size == plan->H, comm->rank is this host */
  const int32_t *doc;       /* [n] document token ids (host memory; every host gets all) */
  const int32_t *query;     /* [q_len] query token ids */
  apb_hook_fn hook;         /* may be NULL */
  void *hook_user;
  int want_hidden;          /* fill result->hidden */
  int profile;              /* fill stats.stage_s. 1: the backend is synced around every stage (slower,
                               and it removes any overlap of communication with compute); 2: timing
                               marks in the backend's queue around every stage (apb_backend_ops.mark:
                               CUDA events), no wait, overlap kept; 1's method where the backend has
                               no marks */
} apb_host_args;

/* Run this host's prefill, query and decode. On failure the caller reports the error and then calls
 * comm->ops->abort, so that the peers return APB_ECOMM instead of waiting forever. A NaN or Inf among
 * the query's logits or any decode step's is APB_ENONFINITE naming the logit, on every host alike
 * (each checks its own copy: all hold the same logits), never a token picked silently. */
apb_status apb_host_run(const apb_host_args *a, apb_host_result *res, apb_error *err);
void apb_host_result_free(apb_host_result *r);

#ifdef __cplusplus
}
#endif
#endif /* APB_SCHED_H */
