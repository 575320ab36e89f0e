/* ref/backend_cpu.h: what the two CPU compute backends share (not installed).
 *
 * What it is: the instance struct, the weight struct, and the parts of apb/backend.h that are the
 * same for "naive" (ref/backend_naive.c) and "fast" (ref/backend_fast.c), implemented once in
 * ref/backend_cpu.c: host memory ops with byte accounting, weights, argument validation with
 * APB_EINVAL messages naming the op, the argument and the values, the bf16-emulation rounding, and
 * the exact ops (maxpool, topk, gather, merge) whose results cannot differ between the two.
 *
 * What it deliberately is not: a second public API. Nothing outside ref/ includes it; everything a
 * schedule needs goes through apb_backend_ops.
 *
 * Tested through both backends in tests/check_backend.c.
 */
#ifndef APB_REF_BACKEND_CPU_H
#define APB_REF_BACKEND_CPU_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "apb/attn.h"
#include "apb/backend.h"
#include "../lib/be_check.h"

/* One CPU backend instance; be->impl points back to it. */
typedef struct apb_cpu {
  apb_backend be;
  int emulate_bf16;        /* round stored activations to bf16 */
  int threads;             /* OpenMP team size; 0: omp_get_max_threads() at each call */
  atomic_size_t cur;       /* bytes allocated now (alloc, weight copies, op scratch) */
  atomic_size_t peak;      /* high-water mark of cur */
} apb_cpu;

/* A weight [N, K] (+ bias [N]) in host memory: the caller's arrays, or a bf16-rounded copy. */
struct apb_bweight {
  int64_t N, K;
  const float *w;          /* [N, K] row-major */
  const float *b;          /* [N] or NULL */
  float *own;              /* the copy that w (and b) point into, or NULL when pointers are kept */
  size_t bytes;            /* bytes of own, counted in the creating instance */
};

static inline apb_cpu *apb_cpu_of(const apb_backend *be) { return (apb_cpu *)be->impl; }

/* Create/destroy an instance with the given name and op table (o may be NULL). */
apb_status apb_cpu_create(const char *name, const apb_cpu_opts *o, const apb_backend_ops *ops,
                          apb_backend **out, apb_error *err);
void apb_cpu_destroy(apb_backend *be);

/* The team size for this call's parallel loops (>= 1). */
int apb_cpu_threads(const apb_cpu *c);

/* Scratch for one op (64-byte aligned), counted in cur/peak while held; bytes == 0 gives *p = NULL.
 * APB_ENOMEM names the op. Free with the same byte count. */
apb_status apb_cpu_scratch(apb_cpu *c, size_t bytes, const char *op, void **p, apb_error *err);
void apb_cpu_scratch_free(apb_cpu *c, void *p, size_t bytes);

/* When emulating bf16: round x [n] in place (apb_bf16_round_array), in parallel. No-op otherwise. */
void apb_cpu_round(const apb_cpu *c, float *x, size_t n);

/* ---- validation: each returns APB_OK or APB_EINVAL with "op: ..." naming the argument ---- */
/* (apb_bc_need, apb_bc_len, apb_bc_disjoint and the copy2d/maxpool checks are lib/be_check.h's) */
/* w non-NULL, and w->N == N (unless N < 0) and w->K == K (unless K < 0). */
apb_status apb_cpu_weight(apb_error *err, const char *op, const char *arg, const apb_bweight *w, int64_t N,
                          int64_t K);
/* ids [T] each in [0, V). */
apb_status apb_cpu_check_ids(apb_error *err, const char *op, const int32_t *ids, int64_t T, int64_t V);
/* fc1 [I, C], fc2 [Hkv, I], qkv [T, C], scores [Hkv, T]. */
apb_status apb_cpu_scorer_check(apb_error *err, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                                int64_t T, const float *scores);
/* Map apb_battn_args onto apb_attn_args (lse required) and validate with apb_attn_validate. */
apb_status apb_cpu_attn_args(apb_error *err, const char *op, const apb_battn_args *a, apb_attn_args *out);

/* ---- ops shared by both backends (apb/backend.h) ---- */
apb_status apb_cpu_alloc(apb_backend *be, size_t bytes, void **p, apb_error *err);
void apb_cpu_free(apb_backend *be, void *p);
apb_status apb_cpu_memset(apb_backend *be, void *p, int byte, size_t bytes, apb_error *err);
apb_status apb_cpu_copy(apb_backend *be, void *dst, const void *src, size_t bytes, apb_error *err);
apb_status apb_cpu_copy2d(apb_backend *be, void *dst, size_t dpitch, const void *src, size_t spitch,
                          size_t width, size_t rows, apb_error *err);
apb_status apb_cpu_upload(apb_backend *be, void *dst, const void *host, size_t bytes, apb_error *err);
apb_status apb_cpu_download(apb_backend *be, void *host, const void *src, size_t bytes, apb_error *err);
apb_status apb_cpu_upload_f32(apb_backend *be, void *dst, const float *host, size_t n, apb_error *err);
apb_status apb_cpu_download_f32(apb_backend *be, float *host, const void *src, size_t n, apb_error *err);
apb_status apb_cpu_sync(apb_backend *be, apb_error *err);
/* Timing marks: the monotonic clock when the mark is made (CPU ops are synchronous). */
apb_status apb_cpu_mark(apb_backend *be, void **m, apb_error *err);
apb_status apb_cpu_mark_elapsed(apb_backend *be, void *a, void *b, double *seconds, apb_error *err);
void apb_cpu_mark_free(apb_backend *be, void *m);
apb_status apb_cpu_weight_create(apb_backend *be, const float *w, int64_t N, int64_t K, const float *bias,
                                 apb_bweight **out, apb_error *err);
void apb_cpu_weight_destroy(apb_backend *be, apb_bweight *w);
apb_status apb_cpu_merge(apb_backend *be, int n, const void *const *o_parts, const float *const *lse_parts,
                         int64_t T, int Hq, int D, void *o, float *lse, apb_error *err);
apb_status apb_cpu_maxpool(apb_backend *be, const float *s, int R, int64_t T, int w, float *out,
                           apb_error *err);
apb_status apb_cpu_topk(apb_backend *be, const float *s, int R, int64_t T, int64_t lo, int64_t k, int32_t *idx,
                        apb_error *err);
apb_status apb_cpu_gather(apb_backend *be, const void *x, int64_t T, int H, int D, const int32_t *idx, int64_t k,
                          void *out, apb_error *err);
void apb_cpu_mem(const apb_backend *be, size_t *current, size_t *peak);

#endif /* APB_REF_BACKEND_CPU_H */
