/* gpu/select.cu: the compressor of APB (shared/APB.md 3.2 and 3.4) on the "cuda" backend: the
 * retaining-heads scorer, the max-pool, the per-row top-k selection and the gather of the selected
 * K/V rows (apb/backend.h).
 *
 * What it is:
 *   - score_retaining: scores [Hkv, T] fp32 = (fc2 silu(fc1 qkv^T))^T over row chunks of at most
 *     CU_SCORE_ROWS tokens (bounding the [rows, I] intermediate): GEMM 1 (cuBLAS, fp32 accumulation)
 *     writes h [rows, I] in act, a SiLU kernel rewrites it in place (BF16: h is rounded after the
 *     product and again after the SiLU, as apb/backend.h says the stored intermediate is), and GEMM 2
 *     computes the chunk's scores in fp32 straight into their transposed place in scores [Hkv, T]
 *     (column-major [T x Hkv] with leading dimension T), so no separate transpose pass is needed.
 *     The scorer's output is fp32 in both modes; only its inputs and h are bf16 in BF16 mode;
 *   - maxpool: out[r, t] = max of s[r, t'] over |t - t'| <= w/2 inside the row (outside is -inf); a
 *     NaN in the window is the output (the first NaN met, as the CPU), so that topk refuses it;
 *   - topk (APB.md 3.4): per row r of s [R, T], the k best of t in [lo, T), ties toward the lower t,
 *     -0 tying +0, written in ascending t. Candidates get the CPU's order key: the score mapped to an
 *     order-preserving uint32 and complemented (a higher score is a smaller key). One block per row runs
 *     a radix select, four passes of 8 bits with a 256-bin shared histogram, which yields the exact
 *     k-th smallest key K* and `need`, how many candidates with key == K* belong to the top k. A last
 *     pass walks t in ascending order and keeps every key < K* and the first `need` keys == K*
 *     (block-wide exclusive scans give each kept t its output slot): exactly the CPU's set (the CPU
 *     breaks ties by t in the low half of a 64-bit key, which is the same rule), in ascending order.
 *     NaN scores in [lo, T) are found first by a device scan and named (the first in row-major order),
 *     even for k = 0; k = T - lo writes lo .. T-1 directly;
 *   - gather: out [k, H, D] with out[i, h] = x[idx[h, i], h]: exact element copies after a device
 *     check of the indices (the first bad one in (h, i) order is read back and named, nothing written).
 *
 * What it deliberately is not: a multi-block select for one huge row (R is Hkv, a handful of rows of at
 * most l_b tokens each: one block per row runs a 128K-token row in well under a millisecond), or a
 * fused scorer epilogue inside the GEMM.
 *
 * Tested in tests/check_gpu_agree.c: maxpool, topk and gather bitwise against the CPU (the same scores
 * in, the same bits out), topk on tie-heavy rows, -0/+0, +-Inf, lo, k = T - lo, k = 0, NaN, a 128K-token
 * row checked by its defining property; the scorer against the naive oracle in both modes.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_int.h"

#define CU_THREADS 256
#define CU_SCORE_ROWS ((int64_t)16384) /* tokens per scorer chunk: h is [16384, I] act */
#define CU_TOPK_THREADS 512

/* ================================================================ score_retaining */

template <typename T>
__global__ void silu_kernel(T *h, size_t n) {
  typedef typename cu_math<T>::type M;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const M g = (M)ld_f(h + i);
    st_f(h + i, g / ((M)1 + exp(-g)));
  }
}

apb_status cu_score_retaining(apb_backend *be, const apb_bweight *fc1, const apb_bweight *fc2, const void *qkv,
                              int64_t T, float *scores, apb_error *err) {
  const char *op = "score_retaining";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = cu_weight_check(c, err, op, "fc1", fc1, -1, -1)) ||
      (st = cu_weight_check(c, err, op, "fc2", fc2, -1, fc1->N)) || (st = apb_bc_len(err, op, "T", T, 0)))
    return st;
  if (fc1->b || fc2->b)
    return apb_error_set(err, APB_EINVAL, "%s: %s has a bias; the retaining heads have none (APB.md 3.2)", op,
                         fc1->b ? "fc1" : "fc2");
  if (T == 0) return APB_OK;
  const size_t es = apb_act_size(be);
  const int64_t C = fc1->K, Iw = fc1->N, Hkv = fc2->N; /* Iw: the scorer width I */
  if ((st = apb_bc_need(err, op, "qkv", qkv)) || (st = apb_bc_need(err, op, "scores", scores)) ||
      (st = apb_bc_disjoint(err, op, "scores", scores, (size_t)(Hkv * T) * sizeof(float), "qkv", qkv,
                        (size_t)(T * C) * es)))
    return st;
  if (T > INT_MAX || Iw > INT_MAX || Hkv > INT_MAX || C > INT_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: T=%lld, C=%lld, I=%lld exceed cuBLAS's int range", op, (long long)T,
                         (long long)C, (long long)Iw);
  if ((st = cu_enter(c, err))) return st;
  const int64_t rows = T < CU_SCORE_ROWS ? T : CU_SCORE_ROWS;
  const size_t hb = (size_t)rows * (size_t)Iw * es;
  const cudaDataType at = be->act == APB_DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const float one = 1.0f, zero = 0.0f;
  void *h = NULL;
  APB_TRY(cu_scratch(c, hb, op, &h, err));
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t m = T - t0 < rows ? T - t0 : rows;
    const size_t n = (size_t)m * (size_t)Iw;
    /* h [m, I] = qkv[t0 : t0+m] fc1^T, rounded to act */
    APB_TRY(cu_gemm_nt(c, m, Iw, C, (const char *)qkv + (size_t)(t0 * C) * es, fc1->w, h, be->act, Iw, err));
    if (be->act == APB_DT_BF16)
      silu_kernel<apb_bf16><<<cu_blocks((int64_t)n, CU_THREADS), CU_THREADS, 0, c->stream>>>((apb_bf16 *)h, n);
    else
      silu_kernel<float><<<cu_blocks((int64_t)n, CU_THREADS), CU_THREADS, 0, c->stream>>>((float *)h, n);
    APB_CU_LAUNCH();
    /* scores[:, t0 : t0+m] = (h fc2^T)^T: column-major [m x Hkv] at scores + t0 with leading dim T, from
     * h (row-major [m, I] = column-major [I x m], transposed) and fc2 (row-major [Hkv, I] = [I x Hkv]) */
    APB_CUBLAS(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)Hkv, (int)Iw, &one, h, at, (int)Iw,
                            fc2->w, at, (int)Iw, &zero, scores + t0, CUDA_R_32F, (int)T, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
  }
done:
  cu_scratch_free(c, h, hb);
  return st;
}

/* ================================================================ maxpool */

__global__ void maxpool_kernel(const float *s, int64_t R, int64_t T, int64_t half, float *out) {
  const int64_t total = R * T;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / T, t = e % T;
    const int64_t t0 = t - half < 0 ? 0 : t - half, t1 = t + half > T - 1 ? T - 1 : t + half;
    const float *row = s + r * T;
    float m = -INFINITY;
    for (int64_t u = t0; u <= t1; u++) {
      const float v = row[u];
      if (isnan(v)) {
        m = v;
        break;
      }
      if (v > m) m = v;
    }
    out[e] = m;
  }
}

apb_status cu_maxpool(apb_backend *be, const float *s, int R, int64_t T, int w, float *out, apb_error *err) {
  cu_be *c = cu_of(be);
  apb_status st = apb_bc_maxpool(err, s, R, T, w, out);
  if (st || R == 0 || T == 0) return st;
  if ((st = cu_enter(c, err))) return st;
  maxpool_kernel<<<cu_blocks((int64_t)R * T, CU_THREADS), CU_THREADS, 0, c->stream>>>(s, R, T, w / 2, out);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ topk (APB.md 3.4) */

/* The order key of a score: ascending keys = descending scores; -0 is folded onto +0 first. */
__device__ __forceinline__ uint32_t desc_key(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) == 0) u = 0;
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}

/* Exclusive prefix sum of v over the block (blockDim.x a multiple of 32); *total gets the block's sum.
 * sh: [33] shared ints. Every thread must call it. */
__device__ int block_excl_scan(int v, int *sh, int *total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads(); /* sh may still be read from a previous call */
  if (lane == 31) sh[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int s = lane < nw ? sh[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nw) sh[lane] = s; /* inclusive scan of the warp totals */
    if (lane == 31) sh[32] = s;
  }
  __syncthreads();
  *total = sh[32];
  return (wid > 0 ? sh[wid - 1] : 0) + x - v;
}

/* Input check of topk (cu_chk_rec): NaN scores among the candidates (r, t in [lo, T)), index r * T + t. */
__global__ void nan_check_kernel(const float *s, int64_t R, int64_t T, int64_t lo, cu_chk_rec *rec,
                                 unsigned long long seq) {
  const int64_t n = T - lo, total = R * n;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / n, t = lo + e % n;
    if (isnan(s[r * T + t])) cu_chk_fail(rec, seq, (unsigned long long)(r * T + t), 0);
  }
}

/* k = T - lo: every candidate, in order. idx [R, k]. */
__global__ void topk_all_kernel(int64_t R, int64_t lo, int64_t k, int32_t *idx) {
  const int64_t total = R * k;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
    idx[e] = (int32_t)(lo + e % k);
}

/* One block per row r: radix select of the k-th smallest key, then the ordered compaction. */
__global__ void topk_kernel(const float *s, int64_t T, int64_t lo, int64_t k, int32_t *idx) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t sh_prefix;
  __shared__ long long sh_need;
  __shared__ int sh_scan[33];
  const float *row = s + (int64_t)blockIdx.x * T;
  int32_t *out = idx + (int64_t)blockIdx.x * k;
  uint32_t prefix = 0, mask = 0;
  long long need = k; /* how many of the keys matching prefix/mask still belong to the top k */
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t t = lo + threadIdx.x; t < T; t += blockDim.x) {
      const uint32_t key = desc_key(row[t]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long below = 0;
      int b = 0;
      for (; b < 255; b++) {
        if (below + (long long)hist[b] >= need) break;
        below += hist[b];
      }
      sh_prefix = prefix | ((uint32_t)b << shift);
      sh_need = need - below;
    }
    __syncthreads();
    prefix = sh_prefix;
    need = sh_need;
    mask |= 255u << shift;
  }
  /* prefix is now K*; keep key < K*, and the first `need` keys == K* in ascending t */
  long long base_eq = 0, base_out = 0;
  for (int64_t t0 = lo; t0 < T; t0 += blockDim.x) {
    const int64_t t = t0 + threadIdx.x;
    const uint32_t key = t < T ? desc_key(row[t]) : 0xffffffffu;
    const int valid = t < T, lt = valid && key < prefix, eq = valid && key == prefix;
    int eq_total, sel_total;
    const long long eq_rank = base_eq + block_excl_scan(eq, sh_scan, &eq_total);
    const int sel = lt || (eq && eq_rank < need);
    const long long slot = base_out + block_excl_scan(sel, sh_scan, &sel_total);
    if (sel) out[slot] = (int32_t)t;
    base_eq += eq_total;
    base_out += sel_total;
  }
}

apb_status cu_topk(apb_backend *be, const float *s, int R, int64_t T, int64_t lo, int64_t k, int32_t *idx,
                   apb_error *err) {
  const char *op = "topk";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = apb_bc_topk(err, s, R, T, lo, k)) || R == 0 || T == lo) return st;
  if ((uint64_t)R * (uint64_t)T > (uint64_t)UINT32_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: R*T=%llu scores; at most %lu per call", op,
                         (unsigned long long)R * (unsigned long long)T, (unsigned long)UINT32_MAX);
  if ((st = cu_enter(c, err))) return st;
  {
    /* NaN candidates are refused (even when k = 0); a row with NaN still gets k indices in [lo, T) */
    cu_chk_rec *rec = NULL;
    unsigned long long seq = 0;
    APB_TRY(cu_chk_begin(c, CU_CHK_TOPK, T, 0, &rec, &seq, err));
    nan_check_kernel<<<cu_blocks((int64_t)R * (T - lo), CU_THREADS), CU_THREADS, 0, c->stream>>>(s, R, T, lo, rec, seq);
    APB_CU_LAUNCH();
    APB_TRY(cu_chk_end(c, err));
  }
  if (k == 0) goto done;
  if ((st = apb_bc_need(err, op, "idx", idx))) goto done;
  if (k == T - lo) {
    topk_all_kernel<<<cu_blocks((int64_t)R * k, CU_THREADS), CU_THREADS, 0, c->stream>>>(R, lo, k, idx);
  } else {
    topk_kernel<<<(unsigned)R, CU_TOPK_THREADS, 0, c->stream>>>(s, T, lo, k, idx);
  }
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ gather (APB.md 3.4) */

/* out [k, H, D] = x [idx[h, i], h, :]; rows of indices outside [0, T) (reported by cu_check_range)
 * are zeros. */
template <typename T>
__global__ void gather_kernel(const T *x, int64_t nt, int H, int D, const int32_t *idx, int64_t k, T *out) {
  const int64_t HD = (int64_t)H * D, total = k * HD;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = e / HD, hd = e % HD, h = hd / D, d = hd % D, r = idx[h * k + i];
    out[e] = r >= 0 && r < nt ? x[(r * H + h) * D + d] : (T)0.0f;
  }
}

apb_status cu_gather(apb_backend *be, const void *x, int64_t T, int H, int D, const int32_t *idx, int64_t k, void *out,
                     apb_error *err) {
  const char *op = "gather";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = apb_bc_len(err, op, "T", T, 0)) || (st = apb_bc_len(err, op, "H", H, 1)) || (st = apb_bc_len(err, op, "D", D, 1)) ||
      (st = apb_bc_len(err, op, "k", k, 0)))
    return st;
  if (k == 0) return APB_OK;
  const int64_t HD = (int64_t)H * D;
  if (k > INT64_MAX / 4 / HD || T > INT64_MAX / 4 / HD)
    return apb_error_set(err, APB_EINVAL, "%s: shape too large (T=%lld, k=%lld, H=%d, D=%d)", op, (long long)T,
                         (long long)k, H, D);
  const size_t es = apb_act_size(be);
  if ((st = apb_bc_need(err, op, "x", x)) || (st = apb_bc_need(err, op, "idx", idx)) || (st = apb_bc_need(err, op, "out", out)) ||
      (st = apb_bc_disjoint(err, op, "out", out, (size_t)(k * HD) * es, "x", x, (size_t)(T * HD) * es)))
    return st;
  if ((uint64_t)H * (uint64_t)k > (uint64_t)UINT32_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: H*k=%llu indices; at most %lu per call", op,
                         (unsigned long long)H * (unsigned long long)k, (unsigned long)UINT32_MAX);
  const unsigned g = cu_blocks(k * HD, CU_THREADS);
  if ((st = cu_enter(c, err)) || (st = cu_check_range(c, CU_CHK_GATHER, idx, (int64_t)H * k, T, k, err))) return st;
  if (be->act == APB_DT_BF16)
    gather_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((const apb_bf16 *)x, T, H, D, idx, k, (apb_bf16 *)out);
  else
    gather_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((const float *)x, T, H, D, idx, k, (float *)out);
  APB_CU_LAUNCH();
done:
  return st;
}
