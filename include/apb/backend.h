/* apb/backend.h: the compute backend, the table of operations every schedule is written against.
 *
 * A backend owns memory ("backend memory": host memory for the CPU reference, device memory for CUDA)
 * and runs operations on it in submission order (a CUDA backend enqueues on its stream; `sync` waits).
 * Activations are stored in the backend's `act` dtype (F32 for the reference; BF16 or F32 for CUDA);
 * LSE, scores and indices have fixed types (fp32, fp32, int32). Every operation takes explicit shapes,
 * validates them, and returns a status. Shapes use the legend of apb/attn.h.
 *
 * Implementations: "naive" (ref/backend_naive.c: plain loops, double accumulation: the oracle),
 * "fast" (ref/backend_fast.c: OpenBLAS and OpenMP), and "cuda" (gpu/). An option of the CPU backends
 * rounds every stored activation to bf16, to emulate GPU storage. Weights created by one instance may
 * be used by every instance of the same kind on the same device (simulated hosts share them); destroy
 * a weight through the instance that created it (its bytes are counted there, see apb_backend_mem).
 * The two CPU backends share one weight format, so a weight of one may be used by the other.
 *
 * bf16 storage (CUDA bf16, and the CPU backends with emulate_bf16). An op that writes activations
 * rounds each output element once, after the whole fp32 (or better) computation of that element
 * including any bias: embed, rmsnorm, linear, split_rope (q, k and v), swiglu, add, attn (o), merge
 * (o) and gather. The retaining scorer's intermediate h = silu(qkv fc1^T) [T, I] is stored: rounded
 * after the fc1 product and again after the SiLU. Weights (and biases) are rounded once when created.
 * Raw byte ops (memset, copy, copy2d, upload, download) never round; upload_f32 converts. LSE, scores
 * (maxpool included) and indices are fp32/int32 and never rounded.
 *
 * Determinism: for a given backend, inputs and build, every op gives bitwise identical results on
 * every run and for any thread count (OpenMP team size and, for "fast", OpenBLAS's own thread count).
 * Nothing here prints or exits; errors name the op, the argument and the values.
 *
 * Tested op by op: tests/check_backend.c (fast against naive) and tests/check_gpu_agree.c (cuda
 * against naive, stage by stage, shared/APB.md 7).
 */
#ifndef APB_BACKEND_H
#define APB_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "apb/dtype.h"
#include "apb/model.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_backend apb_backend;
typedef struct apb_bweight apb_bweight; /* a weight matrix [N, K] (+ bias [N]) in backend memory */

/* Segmented attention on backend memory (semantics of apb_attn_args, apb/attn.h). */
typedef struct apb_battn_args {
  int64_t P, A, B;
  int Hq, Hkv, D;
  int local_keys;
  float scale;          /* 0: 1/sqrt(D) */
  const void *q;        /* [A+B, Hq, D] act */
  const void *kp, *vp;  /* [P, Hkv, D] act */
  const void *ka, *va;  /* [A, Hkv, D] act */
  const void *kb, *vb;  /* [B, Hkv, D] act */
  void *o;              /* [A+B, Hq, D] act */
  float *lse;           /* [Hq, A+B] fp32 (required) */
} apb_battn_args;

typedef struct apb_backend_ops {
  void (*destroy)(apb_backend *be);

  /* memory: bytes in backend memory; upload/download move raw bytes between host and backend.
   * alloc aligns to at least 64 bytes; alloc of 0 bytes gives *p = NULL and APB_OK; free(NULL) does
   * nothing. Source and destination of copy/copy2d must not overlap (APB_EINVAL on the CPU). Memory
   * of one instance may be copied to/from by another instance of the same kind on the same device. */
  apb_status (*alloc)(apb_backend *be, size_t bytes, void **p, apb_error *err);
  void (*free)(apb_backend *be, void *p);
  apb_status (*memset)(apb_backend *be, void *p, int byte, size_t bytes, apb_error *err);
  apb_status (*copy)(apb_backend *be, void *dst, const void *src, size_t bytes, apb_error *err);
  /* 2-D copy: `rows` rows of `width` bytes, from src (row pitch spitch) to dst (pitch dpitch);
   * width <= spitch and width <= dpitch */
  apb_status (*copy2d)(apb_backend *be, void *dst, size_t dpitch, const void *src, size_t spitch,
                       size_t width, size_t rows, apb_error *err);
  apb_status (*upload)(apb_backend *be, void *dst, const void *host, size_t bytes, apb_error *err);
  apb_status (*download)(apb_backend *be, void *host, const void *src, size_t bytes, apb_error *err);
  /* fp32 host <-> act backend: n elements, converted (rounded to nearest even for bf16) */
  apb_status (*upload_f32)(apb_backend *be, void *dst, const float *host, size_t n, apb_error *err);
  apb_status (*download_f32)(apb_backend *be, float *host, const void *src, size_t n, apb_error *err);
  /* wait until every operation submitted so far has finished. Also where a backend that checks some
   * inputs on the device without waiting (the CUDA backend: embed's ids, topk's NaN scores, gather's
   * indices; apb/cuda.h, apb_backend_cuda_set_sync_checks) returns such a failure, as do download and
   * download_f32; the CPU backends find them in the op itself. */
  apb_status (*sync)(apb_backend *be, apb_error *err);

  /* weights: w [N, K] row-major fp32 host, bias [N] or NULL; N, K >= 1. Host backends keep the
   * pointers (the caller keeps w and bias alive until weight_destroy) unless they must round them to
   * bf16 (emulate_bf16), in which case they copy. */
  apb_status (*weight_create)(apb_backend *be, const float *w, int64_t N, int64_t K, const float *bias,
                              apb_bweight **out, apb_error *err);
  void (*weight_destroy)(apb_backend *be, apb_bweight *w);

  /* out [T, E] = table[ids[t]]; table [V, E]; ids [T] int32 in backend memory, each in [0, V)
   * (APB_EINVAL naming the first bad index and value otherwise; nothing is written then, except on
   * the CUDA backend without synchronous checks: the error comes at the next sync, and bad rows are
   * zeros) */
  apb_status (*embed)(apb_backend *be, const apb_bweight *table, const int32_t *ids, int64_t T, void *out,
                      apb_error *err);
  /* y [T, E] = x * (1 / sqrt(mean(x^2) + eps)) * w, w [1, E] (a weight with N = 1), as HF's
   * LlamaRMSNorm; mean over E in fp32 (CUDA) or double (the CPU backends). eps finite and > 0 (with
   * eps = 0 an all-zero row would be 0 * inf = NaN; apb_config_check asks for a positive one too). */
  apb_status (*rmsnorm)(apb_backend *be, const apb_bweight *w, float eps, const void *x, int64_t T, void *y,
                        apb_error *err);
  /* y [T, N] = x [T, K] w^T + bias; N, K from w. Naive: each output one double dot product. */
  apb_status (*linear)(apb_backend *be, const apb_bweight *w, const void *x, int64_t T, void *y,
                       apb_error *err);
  /* qkv [T, (Hq+2Hkv)*D] -> q [T, Hq, D], k [T, Hkv, D] rotated at pos [T] (int32, backend memory),
   * v [T, Hkv, D] copied. HF rotate-half convention: for i < D/2, with a = pos[t] * f_i and
   * f = apb_rope_inv_freq(rope, D),
   *   out[i] = x[i] cos a - x[i + D/2] sin a,   out[i + D/2] = x[i + D/2] cos a + x[i] sin a.
   * The CPU backends compute f, a, cos and sin in double. D even >= 2; rope->type default, linear or
   * llama3 (another value is APB_EINVAL). */
  apb_status (*split_rope)(apb_backend *be, const void *qkv, int64_t T, int Hq, int Hkv, int D,
                           const int32_t *pos, const apb_rope *rope, void *q, void *k, void *v,
                           apb_error *err);
  /* out [T, F] = silu(gu[:, :F]) * gu[:, F:], gu [T, 2F], silu(g) = g / (1 + exp(-g)) */
  apb_status (*swiglu)(apb_backend *be, const void *gu, int64_t T, int64_t F, void *out, apb_error *err);
  /* y [n] += x [n] */
  apb_status (*add)(apb_backend *be, void *y, const void *x, size_t n, apb_error *err);
  /* APB.md 3.6; apb_battn_args maps field by field onto apb_attn_args; lse is required */
  apb_status (*attn)(apb_backend *be, const apb_battn_args *a, apb_error *err);
  /* LSE merge of n partials (apb_attn_merge semantics); o and lse may alias part 0 */
  apb_status (*merge)(apb_backend *be, int n, const void *const *o_parts, const float *const *lse_parts,
                      int64_t T, int Hq, int D, void *o, float *lse, apb_error *err);
  /* retaining heads (APB.md 3.2): scores [Hkv, T] fp32 = (fc2 silu(fc1 qkv^T))^T, qkv [T, C] pre-RoPE
   * with C = fc1's K = (Hq+2Hkv)*D, fc1 [I, C], fc2 [Hkv, I] (Hkv = fc2's N, fc2's K must be I) */
  apb_status (*score_retaining)(apb_backend *be, const apb_bweight *fc1, const apb_bweight *fc2,
                                const void *qkv, int64_t T, float *scores, apb_error *err);
  /* out [R, T] = max over |t - t'| <= w/2 of s [R, T], per row (positions outside count as -inf);
   * w odd >= 1 (w = 1 copies). A NaN in a window makes that output NaN (topk then rejects it). */
  apb_status (*maxpool)(apb_backend *be, const float *s, int R, int64_t T, int w, float *out,
                        apb_error *err);
  /* per row r of s [R, T]: the k highest among t in [lo, T), ties toward the lower t (-0 ties +0),
   * written to idx [R, k] in ascending t; requires 0 <= lo <= T and 0 <= k <= T - lo (APB.md 3.4);
   * k = 0 writes nothing. A NaN score in [lo, T) is APB_ENONFINITE (even for k = 0; on the CUDA
   * backend without synchronous checks at the next sync, idx then holds k valid indices); Inf is
   * allowed. */
  apb_status (*topk)(apb_backend *be, const float *s, int R, int64_t T, int64_t lo, int64_t k, int32_t *idx,
                     apb_error *err);
  /* out [k, H, D] with out[i, h] = x[idx[h, i], h]; x [T, H, D], idx [H, k], each in [0, T)
   * (APB_EINVAL naming the first bad one otherwise, as embed) */
  apb_status (*gather)(apb_backend *be, const void *x, int64_t T, int H, int D, const int32_t *idx, int64_t k,
                       void *out, apb_error *err);

  /* memory accounting (apb_backend_mem); NULL when the backend does not count */
  void (*mem)(const apb_backend *be, size_t *current, size_t *peak);

  /* timing marks, for profiling without waiting (apb_host_args.profile = 2); all three NULL when the
   * backend has none. mark puts a point in the backend's queue (CUDA: a timing event recorded on the
   * instance's stream; CPU: the clock, every op having finished when it returns) into *m;
   * mark_elapsed gives the seconds from a to b once the work before b has finished (after a sync);
   * mark_free releases a mark (NULL is allowed). */
  apb_status (*mark)(apb_backend *be, void **m, apb_error *err);
  apb_status (*mark_elapsed)(apb_backend *be, void *a, void *b, double *seconds, apb_error *err);
  void (*mark_free)(apb_backend *be, void *m);
} apb_backend_ops;

struct apb_backend {
  const char *name;           /* "naive", "fast", "cuda" */
  apb_dtype act;              /* activation storage dtype */
  int device;                 /* CUDA device ordinal, -1 for host backends */
  const apb_backend_ops *ops;
  void *impl;
};

/* Options for the CPU backends. */
typedef struct apb_cpu_opts {
  int emulate_bf16;           /* round every stored activation to bf16 (GPU storage emulation) */
  int threads;                /* OpenMP team size for this instance's parallel loops (num_threads
                                 clauses; global OpenMP state is never changed); 0: the caller's
                                 omp_get_max_threads() at each call. "fast" runs each sgemm
                                 single-threaded on fixed tiles, holding OpenBLAS at one thread
                                 while its ops run (OpenBLAS is not bitwise stable across its own
                                 thread counts) and restoring OpenBLAS's count afterwards. */
} apb_cpu_opts;

/* o may be NULL (all defaults). */
apb_status apb_backend_naive(const apb_cpu_opts *o, apb_backend **out, apb_error *err);
apb_status apb_backend_fast(const apb_cpu_opts *o, apb_backend **out, apb_error *err);
/* device >= 0; act APB_DT_BF16 or APB_DT_F32 (fp32 mode: TF32 off). APB_ENODEVICE without CUDA. */
apb_status apb_backend_cuda(int device, apb_dtype act, apb_backend **out, apb_error *err);
/* Create by name: "naive", "fast", "cuda" / "cuda-bf16", "cuda-f32". device is used by the CUDA
 * kinds only (< 0 means 0); o by the CPU kinds only (may be NULL). */
apb_status apb_backend_create(const char *name, int device, const apb_cpu_opts *o, apb_backend **out,
                              apb_error *err);
void apb_backend_destroy(apb_backend *be); /* NULL is allowed */

/* Backend memory of be in bytes: currently allocated, and the high-water mark since creation. Counts
 * alloc, weight copies made by weight_create, and scratch that ops allocate while they run.
 * APB_EUNSUPPORTED when the backend does not count (its mem op is NULL). */
apb_status apb_backend_mem(const apb_backend *be, size_t *current, size_t *peak);

/* Bytes per activation element of be. */
static inline size_t apb_act_size(const apb_backend *be) { return apb_dtype_size(be->act); }

/* A model's weights in backend memory, made once and shared by the instances of one kind. Norms are
 * [1, E] weights; lm_head is the same apb_bweight as embed when the model ties them; fc1/fc2 are NULL
 * when the model has no retaining heads (m->scorer_width == 0). */
typedef struct apb_bmodel {
  const apb_model *m;
  apb_bweight *embed, *final_norm, *lm_head;
  struct apb_blayer {
    apb_bweight *attn_norm, *wqkv, *wo, *ffn_norm, *w_gate_up, *w_down, *fc1, *fc2;
  } *layers;
  apb_model *owned;           /* the model m when this bmodel owns it (apb_bmodel_generate): freed by
                                 apb_bmodel_destroy after the weights; NULL otherwise */
} apb_bmodel;

apb_status apb_bmodel_create(apb_backend *be, const apb_model *m, apb_bmodel **out, apb_error *err);
void apb_bmodel_destroy(apb_backend *be, apb_bmodel *bm); /* with the creating instance; NULL is allowed */

/* A generated preset model (apb/model.h) in be's memory, owning its apb_model (bm->owned):
 *   - CPU backends: the preset's configuration through apb_model_generate_config on the host (the
 *     weights of apb_model_generate(p, seed), bitwise: lib/gen.c's), then apb_bmodel_create;
 *   - CUDA (apb_cuda_bmodel_generate_config, gpu/gen.cu): bm->m holds only the configuration and scorer width
 *     (every weight pointer NULL, nothing on the host) and every weight is drawn on the device from a
 *     counter-based hash with lib/gen.c's distributions and scales, but NOT lib/gen.c's numbers: a run
 *     that compares the GPU with the CPU must use apb_model_generate + apb_bmodel_create instead.
 * Destroy with apb_bmodel_destroy(be, bm). */
apb_status apb_bmodel_generate(apb_backend *be, apb_preset p, uint64_t seed, apb_bmodel **out, apb_error *err);
/* The same for any configuration (checked by apb_config_check) and retaining-head width: on the CPU
 * apb_model_generate_config's weights, on CUDA drawn on the device as above. */
apb_status apb_bmodel_generate_config(apb_backend *be, const apb_model_config *cfg, int scorer_width, uint64_t seed,
                                      apb_bmodel **out, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_BACKEND_H */
