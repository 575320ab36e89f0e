/* gpu/cuda_int.h: what the files of the CUDA compute backend share (not installed; C++ only).
 *
 * What it is: the instance struct (cu_be) and the device weight (struct apb_bweight) of the "cuda"
 * backend of apb/backend.h, the cuBLAS check macro in the style of APB_CU, element load/store helpers
 * for the two storage types, launch-size helpers, argument validation with the CPU backends' message
 * forms, op scratch (stream-ordered, counted), and the declarations of the ops implemented in
 * gpu/ops.cu (embed, rmsnorm, split_rope, swiglu, add, merge), gpu/select.cu (score_retaining,
 * maxpool, topk, gather) and gpu/backend_cuda.cu (memory, weights, linear, attn).
 *
 * Legend (as apb/attn.h): T tokens, E hidden, N/K a weight's rows/columns (y = x W^T), Hq/Hkv heads,
 * D head dim, F FFN width, I scorer width, R score rows, V vocabulary. "act" is the instance's
 * activation storage (BF16 or F32). Every pointer below is device memory unless it says host.
 *
 * What it deliberately is not: a public header, or usable from C (it holds std::atomic and std::mutex).
 *
 * Tested through the backend in tests/check_gpu_agree.c.
 */
#ifndef APB_CUDA_INT_H
#define APB_CUDA_INT_H

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "apb/backend.h"
#include "../lib/be_check.h"
#include "apb/cuda.h"
#include "gpu_common.h"

/* APB_CUBLAS(call): as APB_CU for a cuBLAS call: records the call text, file:line, device and the
 * cuBLAS status name into `err`, sets `st` (APB_EDEVICE) and jumps to `done`. */
#define APB_CUBLAS(call)                                                                             \
  do {                                                                                               \
    cublasStatus_t apb_b_ = (call);                                                                  \
    if (apb_b_ != CUBLAS_STATUS_SUCCESS) {                                                           \
      int apb_dev_ = -1;                                                                             \
      cudaGetDevice(&apb_dev_);                                                                      \
      st = apb_error_set(err, APB_EDEVICE, "%s failed at %s:%d on device %d: %s (%s)", #call,        \
                         __FILE__, __LINE__, apb_dev_, cublasGetStatusString(apb_b_),                \
                         cublasGetStatusName(apb_b_));                                               \
      goto done;                                                                                     \
    }                                                                                                \
  } while (0)

/* APB_TRY(expr): evaluate an apb_status expression; on failure keep it in `st` and jump to `done`. */
#define APB_TRY(expr)                                                                                \
  do {                                                                                               \
    st = (expr);                                                                                     \
    if (st != APB_OK) goto done;                                                                     \
  } while (0)

typedef __nv_bfloat16 apb_bf16;

/* A weight in device memory: w [N, K] in the creating instance's act dtype (rounded to nearest even
 * once, at creation, in BF16 mode), bias [N] in fp32 (holding bf16-rounded values in BF16 mode, so that
 * "weights and biases are rounded once when created" holds while epilogues add it in fp32). */
struct apb_bweight {
  int64_t N, K;
  apb_dtype dt;            /* storage of w: the creating instance's act */
  void *w;                 /* [N, K] row-major, dt */
  float *b;                /* [N] fp32, or NULL */
  size_t bytes;            /* device bytes of w and b, counted in the creating instance */
};

/* Device-side input checks (embed's token ids, top-k's NaN scores, gather's indices). A check kernel
 * runs beside the op and reports into a record of the instance: the first failing call (by its
 * sequence number `seq`, in stream order) and, within it, the smallest failing element index with the
 * offending value, packed as key = index << 32 | (uint32) value. By default the host does not wait:
 * the op's kernels skip bad entries (writing zeros) and the failure is returned by the next sync,
 * download or download_f32 of the instance, as CUDA reports kernel faults. With synchronous checks
 * (apb_backend_cuda_set_sync_checks, or APB_CUDA_SYNC_CHECKS=1 when the instance is made) the op waits
 * for its check and returns the error itself, before writing anything. */
enum { CU_CHK_EMBED, CU_CHK_TOPK, CU_CHK_GATHER, CU_CHK_KINDS };
struct cu_chk_rec {
  unsigned long long seq; /* the failing call's sequence number; ~0 when none failed */
  unsigned long long key; /* index << 32 | (uint32) value; ~0 when none */
};
/* What the host remembers of a checked call until its result is read. */
struct cu_chk_call {
  unsigned long long seq;
  int kind;
  long long bound, aux;   /* embed: vocabulary, -; topk: T (row length), -; gather: T, k */
};

/* What the backend's instances on one device hold for data (alloc's blocks in use or cached, weights,
 * op scratch), and that device's budget for it (apb_cuda_set_mem_limit, APB_CUDA_MEM_LIMIT; 0: none).
 * One per device, made with its first instance and never freed (gpu/backend_cuda.cu, cu_dev_of). */
struct cu_dev {
  int dev;
  std::atomic<size_t> held, limit;
};

/* One CUDA backend instance; be.impl points back to it. */
struct cu_be {
  apb_backend be;
  int dev;                         /* CUDA device ordinal */
  cu_dev *dv;                      /* its device's budget */
  cudaStream_t stream;             /* every op of this instance is enqueued here (non-blocking stream) */
  cublasHandle_t blas;             /* bound to stream; default math (TF32 never used) */
  void *blas_ws;                   /* its workspace: cuBLAS's recommendation, 32 MiB on Hopper, 4 MiB before
                                      (not counted by `mem`, like the other per-instance tables) */
  apb_cuda_attn_impl attn;         /* attention kernel: APB_CUDA_ATTN env, apb_backend_cuda_set_attn */
  std::atomic<size_t> cur, peak;   /* bytes allocated now (alloc, weights, op scratch) and high water */
  std::mutex mu;                   /* guards sizes */
  std::unordered_map<const void *, size_t> sizes; /* alloc'd pointer -> requested bytes */
  /* alloc's cache (apb_backend_cuda_set_cache): blocks that free gave back, by size, handed out again to
   * an alloc of exactly that size; guarded by mu. Not counted by `mem` (which counts what is held). */
  std::multimap<size_t, void *> idle;
  int cache;                       /* 1: free keeps blocks in idle (default), 0: free releases them */
  /* split_rope's inverse-frequency table, cached: rope_host [rope_n] is what rope_dev [rope_n] holds
   * (uploaded again only when a call's table differs). D/2 doubles; not counted by `mem`, which counts
   * what a schedule allocates and frees. */
  double *rope_dev;
  int rope_cap;                    /* doubles rope_dev can hold */
  std::vector<double> rope_host;
  cu_chk_rec *chk;                 /* [CU_CHK_KINDS] device records of the input checks */
  unsigned long long chk_seq;      /* sequence number of the last checked call */
  std::vector<cu_chk_call> chk_calls; /* checked calls whose result is not read yet */
  int sync_checks;                 /* 1: each checked op waits for its check (see cu_chk_rec) */
};

/* Report a failing element from a check kernel (see cu_chk_rec): the first call claims the record,
 * and among its threads the smallest index wins. index < 2^32 (the callers' shapes guarantee it). */
__device__ __forceinline__ void cu_chk_fail(cu_chk_rec *r, unsigned long long seq, unsigned long long index,
                                            long long value) {
  const unsigned long long prev = atomicCAS(&r->seq, ~0ull, seq);
  if (prev == ~0ull || prev == seq) atomicMin(&r->key, index << 32 | (unsigned long long)(unsigned)value);
}

static inline cu_be *cu_of(const apb_backend *be) { return (cu_be *)be->impl; }

/* ---------------------------------------------------------------- element access */

__device__ __forceinline__ float ld_f(const float *p) { return *p; }
__device__ __forceinline__ float ld_f(const apb_bf16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st_f(float *p, float x) { *p = x; }
__device__ __forceinline__ void st_f(apb_bf16 *p, float x) { *p = __float2bfloat16_rn(x); }
/* Store a double result: one rounding to fp32 (F32), or to bf16 through fp32 (as the CPU emulation's
 * apb_bf16_round((float)v) does). */
__device__ __forceinline__ void st_f(float *p, double x) { *p = (float)x; }
__device__ __forceinline__ void st_f(apb_bf16 *p, double x) { *p = __float2bfloat16_rn((float)x); }

/* The arithmetic of elementwise formulas (SiLU, SwiGLU) per storage type: double for F32 storage (the
 * fp32 bound leaves no room for expf's 2-ulp error), fp32 for BF16 storage (the result keeps 8 bits). */
template <typename T> struct cu_math { typedef double type; };
template <> struct cu_math<apb_bf16> { typedef float type; };

/* Eight bf16 in one 16-byte word, to and from fp32 (round to nearest even): the vectorised BF16
 * elementwise kernels, which compute exactly what the scalar ones do per element. */
__device__ __forceinline__ void cu_unpack8(const uint4 &v, float f[8]) {
  const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const float2 p = __bfloat1622float2(h[j]);
    f[2 * j] = p.x, f[2 * j + 1] = p.y;
  }
}
__device__ __forceinline__ uint4 cu_pack8(const float f[8]) {
  uint4 v;
  __nv_bfloat162 *h = (__nv_bfloat162 *)&v;
#pragma unroll
  for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
  return v;
}

/* ---------------------------------------------------------------- launch sizes */

/* Blocks for n independent items at `threads` per block, capped (the kernels use grid-stride loops). */
static inline unsigned cu_blocks(int64_t n, int threads, unsigned cap = 65535u * 8u) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return b > (int64_t)cap ? cap : (unsigned)b;
}

/* ---------------------------------------------------------------- instance helpers (backend_cuda.cu) */

/* Make the instance's device current on the calling thread (simulated hosts call from many threads). */
apb_status cu_enter(cu_be *c, apb_error *err);
/* Op scratch: cudaMallocAsync on the instance's stream, counted while held; bytes == 0 gives NULL.
 * cu_scratch_free enqueues cudaFreeAsync after the op's kernels (stream order makes that safe). */
apb_status cu_scratch(cu_be *c, size_t bytes, const char *op, void **p, apb_error *err);
void cu_scratch_free(cu_be *c, void *p, size_t bytes);
/* An uninitialised device weight [N, K] (+ fp32 bias [N] when has_bias), counted in c. */
apb_status cu_weight_new(cu_be *c, int64_t N, int64_t K, int has_bias, apb_bweight **out, apb_error *err);
/* y [m, n] (row stride ldy, type yt) = x [m, K] (stride K, act) w [n, K]^T (stride K, act), fp32
 * accumulation (CUBLAS_COMPUTE_32F, TF32 off), on the instance's stream. yt is the act dtype or F32. */
apb_status cu_gemm_nt(cu_be *c, int64_t m, int64_t n, int64_t K, const void *x, const void *w, void *y,
                      apb_dtype yt, int64_t ldy, apb_error *err);
/* Input checks (see cu_chk_rec): cu_chk_begin registers a checked call of `kind` and gives the record
 * and sequence number its check kernel reports to; cu_chk_end, after that kernel is enqueued, waits
 * for it and returns the failure when checks are synchronous (else APB_OK at once); cu_chk_collect,
 * after the stream was synchronised, returns the first failure since the last collection (and clears
 * it). */
apb_status cu_chk_begin(cu_be *c, int kind, long long bound, long long aux, cu_chk_rec **rec,
                        unsigned long long *seq, apb_error *err);
apb_status cu_chk_end(cu_be *c, apb_error *err);
apb_status cu_chk_collect(cu_be *c, apb_error *err);
/* The check of an int32 array v [n] against [0, bound) (embed's ids, gather's indices) as a `kind` call
 * with aux (gpu/ops.cu): begin, the check kernel, end. */
apb_status cu_check_range(cu_be *c, int kind, const int32_t *v, int64_t n, int64_t bound, long long aux,
                          apb_error *err);
/* 1 when be is an instance of this backend. */
int cu_is_instance(const apb_backend *be);

/* ---------------------------------------------------------------- validation (the CPU backends' messages) */

/* w non-NULL, and w->N == N (unless N < 0) and w->K == K (unless K < 0); w->dt == the instance's act. */
apb_status cu_weight_check(const cu_be *c, apb_error *err, const char *op, const char *arg, const apb_bweight *w,
                           int64_t N, int64_t K);
/* apb_bc_need, apb_bc_len, apb_bc_disjoint and the copy2d/maxpool checks: lib/be_check.h, shared with ref/ */

/* ---------------------------------------------------------------- ops (signatures of apb_backend_ops) */

/* gpu/ops.cu */
apb_status cu_embed(apb_backend *be, const apb_bweight *table, const int32_t *ids, int64_t T, void *out,
                    apb_error *err);
apb_status cu_rmsnorm(apb_backend *be, const apb_bweight *w, float eps, const void *x, int64_t T, void *y,
                      apb_error *err);
apb_status cu_split_rope(apb_backend *be, const void *qkv, int64_t T, int Hq, int Hkv, int D, const int32_t *pos,
                         const apb_rope *rope, void *q, void *k, void *v, apb_error *err);
apb_status cu_swiglu(apb_backend *be, const void *gu, int64_t T, int64_t F, void *out, apb_error *err);
apb_status cu_add(apb_backend *be, void *y, const void *x, size_t n, apb_error *err);
apb_status cu_merge(apb_backend *be, int n, const void *const *o_parts, const float *const *lse_parts, int64_t T,
                    int Hq, int D, void *o, float *lse, apb_error *err);
/* dst [n] (dt_dst) = src [n] (dt_src), each F32 or BF16, on c's stream (RNE to bf16). */
apb_status cu_convert(cu_be *c, void *dst, apb_dtype dt_dst, const void *src, apb_dtype dt_src, size_t n,
                      apb_error *err);
/* x [n] fp32 := bf16-rounded values of itself (RNE), on c's stream. */
apb_status cu_round_bf16_f32(cu_be *c, float *x, size_t n, apb_error *err);

/* gpu/select.cu */
apb_status cu_score_retaining(apb_backend *be, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                              int64_t T, float *scores, apb_error *err);
apb_status cu_maxpool(apb_backend *be, const float *s, int R, int64_t T, int w, float *out, apb_error *err);
apb_status cu_topk(apb_backend *be, const float *s, int R, int64_t T, int64_t lo, int64_t k, int32_t *idx,
                   apb_error *err);
apb_status cu_gather(apb_backend *be, const void *x, int64_t T, int H, int D, const int32_t *idx, int64_t k,
                     void *out, apb_error *err);

#endif /* APB_CUDA_INT_H */
