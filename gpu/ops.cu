/* gpu/ops.cu: the elementwise and row ops of the "cuda" backend (apb/backend.h): embed, rmsnorm,
 * split_rope, swiglu, add, the LSE merge, and the fp32 <-> bf16 conversions the memory ops use.
 *
 * What it is (each op: device helpers, kernel, launcher taking the instance's stream, then the op that
 * validates like the CPU backends and dispatches on the act dtype):
 *   - embed: a device check of the ids first (the first out-of-vocabulary index is read back and named,
 *     and nothing is written), then a row copy of the table (exact, no rounding: the table is act);
 *   - rmsnorm: one block per row, the sum of squares in fp32 (each thread a strided partial sum, then
 *     a fixed-order warp-shuffle and shared-memory tree), y = (x * inv) * w in fp32 (HF's order) and
 *     one rounding; y may be x (each element is read and written by the same thread, after the sum);
 *   - split_rope: HF rotate-half (APB.md 3.3). The inverse frequencies come from apb_rope_inv_freq on
 *     the host in double (validated as the CPU does) and are cached on the device; per (token, pair)
 *     the angle pos * f and its cosine and sine are computed in double and shared by the token's
 *     Hq + Hkv heads, and the rotation is done in double and rounded once: the CPU backends' arithmetic,
 *     so F32 agrees with the oracle to the last bit in practice (an fp32 angle would be off by up to
 *     pos * 2^-24 ~ 8e-3 rad at 128K positions). v is a strided 2-D copy (exact);
 *   - swiglu: silu(g) * u = g / (1 + exp(-g)) * u, in double for F32 storage and in fp32 for BF16
 *     (gates below -80 in double there, where expf(-g) would overflow and turn silu(g) into -0: the
 *     CPU fast path's arithmetic);
 *   - add: one fp32 addition per element, rounded once (bitwise the CPU's);
 *   - merge (APB.md 4): one warp per (row, head): m = max lse_i (NaN if any is NaN), weights
 *     exp(lse_i - m) / sum in double, skipping -inf partials; rows that no partial saw get o = 0 and
 *     lse = -inf (never NaN); o accumulated in double and rounded once. Every partial of a (row, head)
 *     is read before its output is written, so o and lse may alias part 0. Up to 32 parts travel as a
 *     kernel parameter; more go through a device table in op scratch.
 *
 * What it deliberately is not: fused with its neighbours (each op is one kernel), vectorised beyond
 * what the compiler does, or tuned; these ops are memory-bound and small next to GEMMs and attention.
 *
 * Tested in tests/check_gpu_agree.c against the naive oracle (F32: apb_tolerance(APB_PREC_F32, k);
 * BF16: within twice the CPU's bf16 emulation), bitwise where the op is exact (embed, add, v).
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_int.h"

#define CU_THREADS 256
#define CU_MERGE_PARTS 32 /* partials passed by value; more go through device memory */

/* ================================================================ device helpers */

__device__ __forceinline__ float warp_sum_f(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/* Sum of v over the block (blockDim.x a multiple of 32, at most 1024), the same order on every run;
 * every thread gets the result. sh: [32] shared floats. */
__device__ float block_sum_f(float v, float *sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum_f(v);
  __syncthreads(); /* sh may still be read from a previous call */
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? sh[lane] : 0.0f;
    t = warp_sum_f(t);
    if (lane == 0) sh[0] = t;
  }
  __syncthreads();
  return sh[0];
}

/* ================================================================ conversions */

template <typename TO, typename TI>
__global__ void convert_kernel(TO *dst, const TI *src, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    st_f(dst + i, ld_f(src + i));
}

__global__ void round_bf16_kernel(float *x, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    x[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}

apb_status cu_convert(cu_be *c, void *dst, apb_dtype dt_dst, const void *src, apb_dtype dt_src, size_t n,
                      apb_error *err) {
  apb_status st = APB_OK;
  const unsigned g = cu_blocks((int64_t)n, CU_THREADS);
  if (n == 0) return APB_OK;
  if (dt_dst == dt_src) {
    APB_CU(cudaMemcpyAsync(dst, src, n * apb_dtype_size(dt_dst), cudaMemcpyDeviceToDevice, c->stream));
  } else if (dt_dst == APB_DT_BF16 && dt_src == APB_DT_F32) {
    convert_kernel<apb_bf16, float><<<g, CU_THREADS, 0, c->stream>>>((apb_bf16 *)dst, (const float *)src, n);
    APB_CU_LAUNCH();
  } else if (dt_dst == APB_DT_F32 && dt_src == APB_DT_BF16) {
    convert_kernel<float, apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((float *)dst, (const apb_bf16 *)src, n);
    APB_CU_LAUNCH();
  } else {
    return apb_error_set(err, APB_EUNSUPPORTED, "convert: %s -> %s (F32 and BF16 only)", apb_dtype_name(dt_src),
                         apb_dtype_name(dt_dst));
  }
done:
  return st;
}

apb_status cu_round_bf16_f32(cu_be *c, float *x, size_t n, apb_error *err) {
  apb_status st = APB_OK;
  if (n == 0) return APB_OK;
  round_bf16_kernel<<<cu_blocks((int64_t)n, CU_THREADS), CU_THREADS, 0, c->stream>>>(x, n);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ embed */

/* The input check of embed's ids and gather's indices (cu_chk_rec): entries of v [n] outside [0, bound). */
__global__ void range_check_kernel(const int32_t *v, int64_t n, int64_t bound, cu_chk_rec *rec,
                                   unsigned long long seq) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
    if (v[e] < 0 || v[e] >= bound) cu_chk_fail(rec, seq, (unsigned long long)e, v[e]);
}

apb_status cu_check_range(cu_be *c, int kind, const int32_t *v, int64_t n, int64_t bound, long long aux,
                          apb_error *err) {
  apb_status st = APB_OK;
  cu_chk_rec *rec = NULL;
  unsigned long long seq = 0;
  APB_TRY(cu_chk_begin(c, kind, bound, aux, &rec, &seq, err));
  range_check_kernel<<<cu_blocks(n, CU_THREADS), CU_THREADS, 0, c->stream>>>(v, n, bound, rec, seq);
  APB_CU_LAUNCH();
  st = cu_chk_end(c, err);
done:
  return st;
}

/* out [T, E] = table [ids[t], E]: element copies, no rounding (both are act); rows of ids outside
 * [0, V) (reported by cu_check_range) are zeros. */
template <typename T>
__global__ void embed_kernel(const T *table, const int32_t *ids, int64_t nt, int64_t E, int64_t V, T *out) {
  const int64_t total = nt * E;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / E, j = e % E, id = ids[t];
    out[e] = id >= 0 && id < V ? table[id * E + j] : (T)0.0f;
  }
}

apb_status cu_embed(apb_backend *be, const apb_bweight *table, const int32_t *ids, int64_t T, void *out,
                    apb_error *err) {
  const char *op = "embed";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = cu_weight_check(c, err, op, "table", table, -1, -1)) || (st = apb_bc_embed(err, T, ids, out)) || T == 0)
    return st;
  if (T > (int64_t)UINT32_MAX)
    return apb_error_set(err, APB_EINVAL, "%s: T=%lld tokens; at most %lu per call", op, (long long)T,
                         (unsigned long)UINT32_MAX);
  const unsigned g = cu_blocks(T * table->K, CU_THREADS);
  if ((st = cu_enter(c, err)) || (st = cu_check_range(c, CU_CHK_EMBED, ids, T, table->N, 0, err))) return st;
  if (be->act == APB_DT_BF16)
    embed_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((const apb_bf16 *)table->w, ids, T, table->K, table->N,
                                                             (apb_bf16 *)out);
  else
    embed_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((const float *)table->w, ids, T, table->K, table->N,
                                                          (float *)out);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ rmsnorm */

/* One block per row (grid-stride over rows): y [T, E] = x * (1 / sqrt(mean(x^2) + eps)) * w [E]. */
template <typename T>
__global__ void rmsnorm_kernel(const T *x, const T *w, float eps, int64_t nt, int64_t E, T *y) {
  __shared__ float sh[32];
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    const T *xr = x + t * E;
    T *yr = y + t * E;
    float ss = 0.0f;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      const float v = ld_f(xr + e);
      ss = fmaf(v, v, ss);
    }
    ss = block_sum_f(ss, sh);
    const float inv = 1.0f / sqrtf(ss / (float)E + eps);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) st_f(yr + e, (ld_f(xr + e) * inv) * ld_f(w + e));
  }
}

/* The BF16 form with 16-byte accesses (E % 8 == 0, aligned rows): the same formula per element, the
 * sum of squares in another order (a block reduction either way). E8 = E / 8 vectors per row. */
__global__ void rmsnorm_bf16x8_kernel(const uint4 *x, const uint4 *w, float eps, int64_t nt, int64_t E8, uint4 *y) {
  __shared__ float sh[32];
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    const uint4 *xr = x + t * E8;
    uint4 *yr = y + t * E8;
    float ss = 0.0f;
    for (int64_t e = threadIdx.x; e < E8; e += blockDim.x) {
      float f[8];
      cu_unpack8(xr[e], f);
#pragma unroll
      for (int j = 0; j < 8; j++) ss = fmaf(f[j], f[j], ss);
    }
    ss = block_sum_f(ss, sh);
    const float inv = 1.0f / sqrtf(ss / (float)(E8 * 8) + eps);
    for (int64_t e = threadIdx.x; e < E8; e += blockDim.x) {
      float f[8], g[8];
      cu_unpack8(xr[e], f);
      cu_unpack8(w[e], g);
#pragma unroll
      for (int j = 0; j < 8; j++) f[j] = (f[j] * inv) * g[j];
      yr[e] = cu_pack8(f);
    }
  }
}

apb_status cu_rmsnorm(apb_backend *be, const apb_bweight *w, float eps, const void *x, int64_t T, void *y,
                      apb_error *err) {
  const char *op = "rmsnorm";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = cu_weight_check(c, err, op, "w", w, 1, -1)) || (st = apb_bc_rmsnorm(err, eps, T, w->K, apb_act_size(be), x, y)) || T == 0)
    return st;
  if ((st = cu_enter(c, err))) return st;
  const unsigned g = T < 65535 * 16 ? (unsigned)T : 65535u * 16u;
  if (be->act == APB_DT_BF16 && w->K % 8 == 0 && apb_aligned16(x) && apb_aligned16(y) && apb_aligned16(w->w))
    rmsnorm_bf16x8_kernel<<<g, CU_THREADS, 0, c->stream>>>((const uint4 *)x, (const uint4 *)w->w, eps, T, w->K / 8,
                                                           (uint4 *)y);
  else if (be->act == APB_DT_BF16)
    rmsnorm_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((const apb_bf16 *)x, (const apb_bf16 *)w->w, eps, T,
                                                               w->K, (apb_bf16 *)y);
  else
    rmsnorm_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((const float *)x, (const float *)w->w, eps, T, w->K,
                                                            (float *)y);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ split_rope */

/* Per (token t, pair i): a = pos[t] * f[i] in double; every q and k head of the token rotates its pair
 * (i, i + D/2) by a. qkv [T, (Hq+2Hkv)*D] -> q [T, Hq, D], k [T, Hkv, D]. */
template <typename T>
__global__ void rope_kernel(const T *qkv, int64_t nt, int Hq, int Hkv, int D, const int32_t *pos, const double *f,
                            T *q, T *k) {
  const int half = D / 2;
  const int64_t QKV = (int64_t)(Hq + 2 * Hkv) * D, total = nt * half;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / half;
    const int i = (int)(e % half);
    double sn, cs;
    sincos((double)pos[t] * f[i], &sn, &cs);
    const T *row = qkv + t * QKV;
    for (int h = 0; h < Hq + Hkv; h++) {
      const T *src = row + (int64_t)h * D;
      T *dst = h < Hq ? q + (t * Hq + h) * (int64_t)D : k + (t * Hkv + (h - Hq)) * (int64_t)D;
      const double x1 = ld_f(src + i), x2 = ld_f(src + i + half);
      st_f(dst + i, x1 * cs - x2 * sn);
      st_f(dst + i + half, x2 * cs + x1 * sn);
    }
  }
}

/* The BF16 form (D % 4 == 0): a block per token (grid-stride); the token's D/2 angles' cos and sin in
 * double, once, in shared memory; then every head's pairs two at a time with bf16x2 accesses, and v's
 * row copied in the same pass. Per element the same arithmetic and rounding as rope_kernel. */
__global__ void rope_bf16_kernel(const apb_bf16 *qkv, int64_t nt, int Hq, int Hkv, int D, const int32_t *pos,
                                 const double *f, apb_bf16 *q, apb_bf16 *k, apb_bf16 *v) {
  extern __shared__ double cs_sn[]; /* [D/2] cos, then [D/2] sin */
  const int half = D / 2, hp = half / 2, nh = Hq + Hkv;
  const int64_t QKV = (int64_t)(Hq + 2 * Hkv) * D;
  for (int64_t t = blockIdx.x; t < nt; t += gridDim.x) {
    __syncthreads(); /* the previous token's table is no longer read */
    for (int i = threadIdx.x; i < half; i += blockDim.x) sincos((double)pos[t] * f[i], &cs_sn[half + i], &cs_sn[i]);
    __syncthreads();
    const apb_bf16 *row = qkv + t * QKV;
    for (int e = threadIdx.x; e < nh * hp; e += blockDim.x) {
      const int h = e / hp, i = 2 * (e % hp);
      const float2 x1 = __bfloat1622float2(*(const __nv_bfloat162 *)(row + (int64_t)h * D + i));
      const float2 x2 = __bfloat1622float2(*(const __nv_bfloat162 *)(row + (int64_t)h * D + i + half));
      const double c0 = cs_sn[i], c1 = cs_sn[i + 1], s0 = cs_sn[half + i], s1 = cs_sn[half + i + 1];
      apb_bf16 *dst = h < Hq ? q + (t * Hq + h) * (int64_t)D : k + (t * Hkv + (h - Hq)) * (int64_t)D;
      *(__nv_bfloat162 *)(dst + i) = __floats2bfloat162_rn((float)((double)x1.x * c0 - (double)x2.x * s0),
                                                           (float)((double)x1.y * c1 - (double)x2.y * s1));
      *(__nv_bfloat162 *)(dst + i + half) = __floats2bfloat162_rn((float)((double)x2.x * c0 + (double)x1.x * s0),
                                                                  (float)((double)x2.y * c1 + (double)x1.y * s1));
    }
    const __nv_bfloat162 *vs = (const __nv_bfloat162 *)(row + (int64_t)(Hq + Hkv) * D);
    __nv_bfloat162 *vd = (__nv_bfloat162 *)(v + t * Hkv * (int64_t)D);
    for (int e = threadIdx.x; e < Hkv * half; e += blockDim.x) vd[e] = vs[e];
  }
}

/* Make c->rope_dev hold f [n] (host); uploads only when the cached table differs. */
static apb_status rope_table(cu_be *c, const double *f, int n, apb_error *err) {
  apb_status st = APB_OK;
  if ((int)c->rope_host.size() == n && memcmp(c->rope_host.data(), f, (size_t)n * sizeof *f) == 0) return APB_OK;
  if (n > c->rope_cap) {
    if (c->rope_dev) {
      APB_CU(cudaStreamSynchronize(c->stream));
      APB_CU(cudaFree(c->rope_dev));
      c->rope_dev = NULL, c->rope_cap = 0;
    }
    APB_CU(cudaMalloc((void **)&c->rope_dev, (size_t)n * sizeof *f));
    c->rope_cap = n;
  }
  c->rope_host.clear();
  /* pageable host -> device: returns once f has been staged, so f may go right after */
  APB_CU(cudaMemcpyAsync(c->rope_dev, f, (size_t)n * sizeof *f, cudaMemcpyHostToDevice, c->stream));
  try {
    c->rope_host.assign(f, f + n);
  } catch (...) {
    return apb_error_set(err, APB_ENOMEM, "split_rope: out of host memory for the frequency cache");
  }
done:
  return st;
}

apb_status cu_split_rope(apb_backend *be, const void *qkv, int64_t T, int Hq, int Hkv, int D, const int32_t *pos,
                         const apb_rope *rope, void *q, void *k, void *v, apb_error *err) {
  cu_be *c = cu_of(be);
  apb_status st;
  const size_t es = apb_act_size(be);
  double *f = NULL;
  if ((st = apb_bc_split_rope(err, qkv, T, Hq, Hkv, D, pos, rope, q, k, v, es, &f)) || T == 0) {
    free(f);
    return st;
  }
  const int64_t QKV = ((int64_t)Hq + 2 * (int64_t)Hkv) * D;
  const unsigned g = cu_blocks(T * (D / 2), CU_THREADS);
  APB_TRY(cu_enter(c, err));
  APB_TRY(rope_table(c, f, D / 2, err));
  if (be->act == APB_DT_BF16 && D % 4 == 0 && ((uintptr_t)qkv | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 4 == 0) {
    const unsigned gt = T < 65535 * 16 ? (unsigned)T : 65535u * 16u;
    rope_bf16_kernel<<<gt, CU_THREADS, (size_t)D * sizeof(double), c->stream>>>(
        (const apb_bf16 *)qkv, T, Hq, Hkv, D, pos, c->rope_dev, (apb_bf16 *)q, (apb_bf16 *)k, (apb_bf16 *)v);
    APB_CU_LAUNCH();
    goto done; /* v is written by the kernel */
  }
  if (be->act == APB_DT_BF16)
    rope_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((const apb_bf16 *)qkv, T, Hq, Hkv, D, pos, c->rope_dev,
                                                            (apb_bf16 *)q, (apb_bf16 *)k);
  else
    rope_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((const float *)qkv, T, Hq, Hkv, D, pos, c->rope_dev,
                                                         (float *)q, (float *)k);
  APB_CU_LAUNCH();
  /* v [T, Hkv, D] = the last Hkv*D columns of each qkv row */
  APB_CU(cudaMemcpy2DAsync(v, (size_t)Hkv * D * es, (const char *)qkv + (size_t)(Hq + Hkv) * D * es, (size_t)QKV * es,
                           (size_t)Hkv * D * es, (size_t)T, cudaMemcpyDeviceToDevice, c->stream));
done:
  free(f);
  return st;
}

/* ================================================================ swiglu */

/* silu(g) * u in the arithmetic M of the storage type (cu_math). */
template <typename M> __device__ __forceinline__ M silu_mul(M g, M u) { return g / ((M)1 + exp(-g)) * u; }
/* fp32 (BF16 storage): below -80, expf(-g) nears fp32's overflow (past -88.7 it is Inf and g / Inf = -0,
 * while silu(g) is a normal number down to about -91 and a subnormal down to -103.9): there g e^g in
 * double, rounded once, as the CPU fast path does (ref/backend_fast.c); a rare branch, every other
 * gate's bits unchanged. */
template <> __device__ __forceinline__ float silu_mul<float>(float g, float u) {
  return g >= -80.0f ? g / (1.0f + expf(-g)) * u : (float)((double)g * exp((double)g)) * u;
}

template <typename T>
__global__ void swiglu_kernel(const T *gu, int64_t nt, int64_t F, T *out) {
  typedef typename cu_math<T>::type M;
  const int64_t total = nt * F;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / F, i = e % F;
    st_f(out + e, silu_mul<M>((M)ld_f(gu + t * 2 * F + i), (M)ld_f(gu + t * 2 * F + F + i)));
  }
}

/* The BF16 form with 16-byte accesses (F % 8 == 0, aligned): rows along y, 8 columns per thread along
 * x, so no division per element; the same formula per element. F8 = F / 8. */
__global__ void swiglu_bf16x8_kernel(const uint4 *gu, int64_t nt, int64_t F8, uint4 *out) {
  for (int64_t t = blockIdx.y; t < nt; t += gridDim.y)
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < F8; i += (int64_t)gridDim.x * blockDim.x) {
      float g[8], u[8];
      cu_unpack8(gu[t * 2 * F8 + i], g);
      cu_unpack8(gu[t * 2 * F8 + F8 + i], u);
#pragma unroll
      for (int j = 0; j < 8; j++) g[j] = silu_mul<float>(g[j], u[j]);
      out[t * F8 + i] = cu_pack8(g);
    }
}

apb_status cu_swiglu(apb_backend *be, const void *gu, int64_t T, int64_t F, void *out, apb_error *err) {
  cu_be *c = cu_of(be);
  apb_status st = apb_bc_swiglu(err, T, F, gu, out, apb_act_size(be));
  if (st || T == 0) return st;
  if ((st = cu_enter(c, err))) return st;
  const unsigned g = cu_blocks(T * F, CU_THREADS);
  if (be->act == APB_DT_BF16 && F % 8 == 0 && apb_aligned16(gu) && apb_aligned16(out)) {
    const dim3 grid(cu_blocks(F / 8, CU_THREADS), (unsigned)(T < 65535 ? T : 65535));
    swiglu_bf16x8_kernel<<<grid, CU_THREADS, 0, c->stream>>>((const uint4 *)gu, T, F / 8, (uint4 *)out);
  } else if (be->act == APB_DT_BF16)
    swiglu_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((const apb_bf16 *)gu, T, F, (apb_bf16 *)out);
  else
    swiglu_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((const float *)gu, T, F, (float *)out);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ add */

/* y [n8 vectors of 8 bf16] += x, 16-byte accesses; the same per-element sum and rounding as add_kernel. */
__global__ void add_bf16x8_kernel(uint4 *y, const uint4 *x, size_t n8) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
    float a[8], b[8];
    cu_unpack8(y[i], a);
    cu_unpack8(x[i], b);
#pragma unroll
    for (int j = 0; j < 8; j++) a[j] += b[j];
    y[i] = cu_pack8(a);
  }
}

template <typename T>
__global__ void add_kernel(T *y, const T *x, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    st_f(y + i, ld_f(y + i) + ld_f(x + i));
}

apb_status cu_add(apb_backend *be, void *y, const void *x, size_t n, apb_error *err) {
  cu_be *c = cu_of(be);
  apb_status st = apb_bc_add(err, n, y, x);
  if (st || n == 0) return st;
  if ((st = cu_enter(c, err))) return st;
  const unsigned g = cu_blocks((int64_t)n, CU_THREADS);
  if (be->act == APB_DT_BF16 && n % 8 == 0 && apb_aligned16(y) && apb_aligned16(x))
    add_bf16x8_kernel<<<cu_blocks((int64_t)(n / 8), CU_THREADS), CU_THREADS, 0, c->stream>>>((uint4 *)y,
                                                                                            (const uint4 *)x, n / 8);
  else if (be->act == APB_DT_BF16)
    add_kernel<apb_bf16><<<g, CU_THREADS, 0, c->stream>>>((apb_bf16 *)y, (const apb_bf16 *)x, n);
  else
    add_kernel<float><<<g, CU_THREADS, 0, c->stream>>>((float *)y, (const float *)x, n);
  APB_CU_LAUNCH();
done:
  return st;
}

/* ================================================================ merge (APB.md 4) */

/* Partials as a kernel parameter (n <= CU_MERGE_PARTS) ... */
struct MergeParam {
  const void *o[CU_MERGE_PARTS];
  const float *l[CU_MERGE_PARTS];
  __device__ const void *op(int i) const { return o[i]; }
  __device__ const float *lp(int i) const { return l[i]; }
};
/* ... or as device tables o [n], l [n]. */
struct MergeTable {
  const void *const *o;
  const float *const *l;
  __device__ const void *op(int i) const { return o[i]; }
  __device__ const float *lp(int i) const { return l[i]; }
};

/* One warp per (row r, head h); lane j owns columns j, j + 32, ... (D <= 32 * CU_MERGE_COLS). */
#define CU_MERGE_COLS 8
static_assert(32 * CU_MERGE_COLS >= APB_CUDA_MAX_HEAD_DIM, "the merge covers every head dimension apb/cuda.h promises");
template <typename T, typename Parts>
__global__ void merge_kernel(Parts parts, int n, int64_t nt, int Hq, int D, T *o, float *lse) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t wi = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); wi < nt * Hq; wi += warps) {
    const int64_t r = wi / Hq;
    const int h = (int)(wi % Hq);
    const int64_t li = (int64_t)h * nt + r, oi = (r * Hq + h) * (int64_t)D;
    /* m: the max lse, NaN when any is NaN (the CPU's rule) */
    double m = -INFINITY;
    int any_nan = 0;
    for (int i = lane; i < n; i += 32) {
      const double l = parts.lp(i)[li];
      if (isnan(l)) any_nan = 1;
      else if (l > m) m = l;
    }
    for (int s = 16; s > 0; s >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, s));
    any_nan = __any_sync(0xffffffffu, any_nan);
    if (any_nan) m = NAN;
    double sum = 0.0;
    for (int i = lane; i < n; i += 32) {
      const double l = parts.lp(i)[li];
      sum += l == -INFINITY ? 0.0 : exp(l - m);
    }
    for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    double acc[CU_MERGE_COLS];
#pragma unroll
    for (int j = 0; j < CU_MERGE_COLS; j++) acc[j] = 0.0;
    const int seen = !(m == -INFINITY);
    if (seen) {
      for (int c0 = 0; c0 < n; c0 += 32) {
        const int i = c0 + lane;
        double wi_ = 0.0;
        if (i < n) {
          const double l = parts.lp(i)[li];
          wi_ = l == -INFINITY ? 0.0 : exp(l - m) / sum;
        }
        const int cnt = n - c0 < 32 ? n - c0 : 32;
        for (int j = 0; j < cnt; j++) {
          const double wj = __shfl_sync(0xffffffffu, wi_, j);
          if (wj == 0.0) continue;
          const T *oj = (const T *)parts.op(c0 + j) + oi;
#pragma unroll
          for (int q = 0; q < CU_MERGE_COLS; q++) {
            const int d = lane + 32 * q;
            if (d < D) acc[q] += wj * (double)ld_f(oj + d);
          }
        }
      }
    }
    __syncwarp(); /* every lane has read every partial's lse (and o) of this (r, h): outputs may alias part 0 */
#pragma unroll
    for (int q = 0; q < CU_MERGE_COLS; q++) {
      const int d = lane + 32 * q;
      if (d < D) st_f(o + oi + d, seen ? acc[q] : 0.0);
    }
    if (lse && lane == 0) lse[li] = seen ? (float)(m + log(sum)) : -INFINITY;
  }
}

/* The BF16 form for few partials (n <= CU_MERGE_PARTS, D % 8 == 0, 16-byte aligned o): 16 threads per
 * (row, head), each owning 8-column chunks (16-byte accesses) and computing the partials' weights
 * itself, in double as merge_kernel does; per element the same sums in the same order. The two
 * (row, head) pairs of a warp finish their reads before lse is written (o and lse may alias part 0). */
__global__ void merge_bf16x8_kernel(MergeParam parts, int n, int64_t nt, int Hq, int D8, apb_bf16 *o, float *lse) {
  const int lane = threadIdx.x & 31, sub = lane & 15;
  const int64_t total = nt * Hq, warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t first = 2 * ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  for (int64_t base = first; base < total; base += 2 * warps) {
    const int64_t wi = base + (lane >> 4);
    const bool active = wi < total;
    double m = -INFINITY, sum = 0.0;
    int64_t li = 0, oi = 0;
    if (active) {
      const int64_t r = wi / Hq;
      const int h = (int)(wi % Hq);
      li = (int64_t)h * nt + r, oi = (r * Hq + h) * (int64_t)D8;
      int any_nan = 0;
      for (int i = 0; i < n; i++) {
        const double l = parts.l[i][li];
        if (isnan(l)) any_nan = 1;
        else if (l > m) m = l;
      }
      if (any_nan) m = NAN;
      for (int i = 0; i < n; i++) {
        const double l = parts.l[i][li];
        sum += l == -INFINITY ? 0.0 : exp(l - m);
      }
      const int seen = !(m == -INFINITY);
      for (int c = sub; c < D8; c += 16) {
        double acc[8];
#pragma unroll
        for (int q = 0; q < 8; q++) acc[q] = 0.0;
        if (seen)
          for (int i = 0; i < n; i++) {
            const double l = parts.l[i][li];
            const double w = l == -INFINITY ? 0.0 : exp(l - m) / sum;
            if (w == 0.0) continue;
            float f[8];
            cu_unpack8(((const uint4 *)parts.o[i])[oi + c], f);
#pragma unroll
            for (int q = 0; q < 8; q++) acc[q] += w * (double)f[q];
          }
        float f[8];
#pragma unroll
        for (int q = 0; q < 8; q++) f[q] = (float)acc[q];
        ((uint4 *)o)[oi + c] = cu_pack8(f);
      }
    }
    __syncwarp(); /* both pairs of the warp have read their partials' lse */
    if (active && sub == 0 && lse) lse[li] = m == -INFINITY ? -INFINITY : (float)(m + log(sum));
  }
}

template <typename T, typename Parts>
static apb_status launch_merge(cu_be *c, const Parts &parts, int n, int64_t T_, int Hq, int D, void *o, float *lse,
                               apb_error *err) {
  apb_status st = APB_OK;
  const unsigned g = cu_blocks(T_ * Hq, CU_THREADS / 32);
  merge_kernel<T, Parts><<<g, CU_THREADS, 0, c->stream>>>(parts, n, T_, Hq, D, (T *)o, lse);
  APB_CU_LAUNCH();
done:
  return st;
}

static apb_status launch_merge_bf16x8(cu_be *c, const MergeParam &parts, int n, int64_t T_, int Hq, int D, void *o,
                                      float *lse, apb_error *err) {
  apb_status st = APB_OK;
  const unsigned g = cu_blocks((T_ * Hq + 1) / 2, CU_THREADS / 32);
  merge_bf16x8_kernel<<<g, CU_THREADS, 0, c->stream>>>(parts, n, T_, Hq, D / 8, (apb_bf16 *)o, lse);
  APB_CU_LAUNCH();
done:
  return st;
}

apb_status cu_merge(apb_backend *be, int n, const void *const *o_parts, const float *const *lse_parts, int64_t T,
                    int Hq, int D, void *o, float *lse, apb_error *err) {
  const char *op = "merge";
  cu_be *c = cu_of(be);
  if (n < 1) return apb_error_set(err, APB_EINVAL, "%s: n=%d partials, need >= 1", op, n);
  if (T < 0 || Hq < 1 || D < 1)
    return apb_error_set(err, APB_EINVAL, "%s: bad shape T=%lld, Hq=%d, D=%d (need T >= 0, Hq, D >= 1)", op,
                         (long long)T, Hq, D);
  if (D > 32 * CU_MERGE_COLS)
    return apb_error_set(err, APB_EUNSUPPORTED, "%s: D=%d; the CUDA merge supports D <= %d", op, D, 32 * CU_MERGE_COLS);
  if (T == 0) return APB_OK;
  if (!o_parts || !lse_parts || !o)
    return apb_error_set(err, APB_EINVAL, "%s: %s is NULL", op, !o_parts ? "o_parts" : !lse_parts ? "lse_parts" : "o");
  for (int i = 0; i < n; i++)
    if (!o_parts[i] || !lse_parts[i])
      return apb_error_set(err, APB_EINVAL, "%s: %s[%d] is NULL", op, !o_parts[i] ? "o_parts" : "lse_parts", i);
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  const int bf = be->act == APB_DT_BF16;
  void *tab = NULL;
  const size_t tb = 2 * (size_t)n * sizeof(void *);
  int vec = bf && D % 8 == 0 && apb_aligned16(o);
  for (int i = 0; i < n && vec; i++) vec = apb_aligned16(o_parts[i]);
  if (n <= CU_MERGE_PARTS) {
    MergeParam p;
    memset(&p, 0, sizeof p);
    for (int i = 0; i < n; i++) p.o[i] = o_parts[i], p.l[i] = lse_parts[i];
    if (vec) st = launch_merge_bf16x8(c, p, n, T, Hq, D, o, lse, err);
    else st = bf ? launch_merge<apb_bf16>(c, p, n, T, Hq, D, o, lse, err) : launch_merge<float>(c, p, n, T, Hq, D, o, lse, err);
  } else {
    /* the pointer table goes up through op scratch; pageable host -> device returns once staged */
    const void **h = (const void **)malloc(tb);
    if (!h) return apb_error_set(err, APB_ENOMEM, "%s: out of host memory for %d partials", op, n);
    for (int i = 0; i < n; i++) h[i] = o_parts[i], h[n + i] = lse_parts[i];
    st = cu_scratch(c, tb, op, &tab, err);
    if (st == APB_OK) {
      cudaError_t e = cudaMemcpyAsync(tab, h, tb, cudaMemcpyHostToDevice, c->stream);
      if (e != cudaSuccess)
        st = apb_error_set(err, APB_EDEVICE, "%s: cudaMemcpyAsync of the partials table on device %d: %s", op, c->dev,
                           cudaGetErrorString(e));
    }
    free(h);
    if (st == APB_OK) {
      MergeTable p;
      p.o = (const void *const *)tab;
      p.l = (const float *const *)((const void **)tab + n);
      st = bf ? launch_merge<apb_bf16>(c, p, n, T, Hq, D, o, lse, err) : launch_merge<float>(c, p, n, T, Hq, D, o, lse, err);
    }
  }
  cu_scratch_free(c, tab, tb);
  return st;
}
