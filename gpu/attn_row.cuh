/* gpu/attn_row.cuh: one attention row computed exactly by one warp (the SIMPLE kernel's method), shared
 * by gpu/attn.cu and gpu/attn_hopper.cu: the SIMPLE kernel runs it for every row, and the tensor-core
 * kernels run it for the rare rows that their tiling made non-finite (attn_repair_rows below).
 *
 * Legend as in gpu/attn.cu: T = A + B query rows, P passing keys, A anchor rows/keys, B local rows/keys,
 * Hq query heads, Hkv KV heads, G = Hq / Hkv, D head dim; q, o [T, Hq, D]; kp, vp [P, Hkv, D];
 * ka, va [A, Hkv, D]; kb, vb [B, Hkv, D]; lse [Hq, T]. Not a public header.
 */
#ifndef APB_GPU_ATTN_ROW_CUH
#define APB_GPU_ATTN_ROW_CUH

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "apb/cuda.h"

namespace apb_attn {

typedef __nv_bfloat16 bf16;

/* The caller's pointers and shape, and the scale in two units. */
struct AttnParams {
  const void *q;            /* [T, Hq, D] */
  const void *kp, *vp;      /* [P, Hkv, D] */
  const void *ka, *va;      /* [A, Hkv, D] */
  const void *kb, *vb;      /* [B, Hkv, D] */
  void *o;                  /* [T, Hq, D] */
  float *lse;               /* [Hq, T] or NULL */
  int64_t P, A, B, T;
  int Hq, Hkv, G, D, local_keys;
  float scale;              /* natural-log units */
  float scale_log2;         /* scale * log2(e): the tensor-core kernels work in base 2 */
};

constexpr int kMaxD = APB_CUDA_MAX_HEAD_DIM;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store_val(float *p, float x) { *p = x; }
__device__ __forceinline__ void store_val(bf16 *p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/* sum_d q[d] * k[d] [D] in fp32 arithmetic, compensated (Ogita-Rump-Oishi Dot2: the exact error of
 * each product from an fma, of each sum from TwoSum, summed aside): as accurate as a dot product in
 * twice the precision. A plain fp32 dot product errs by about u * sum |q k|, which a peaked softmax
 * turns into a relative output error far above fp32 rounding (seen: 1e-6 with scores of std 3). The
 * _rn intrinsics keep the compiler from fusing the steps. */
template <typename TQ, typename T>
__device__ __forceinline__ float dot_compensated(const TQ *q, const T *k, int D) {
  float s = 0.0f, c = 0.0f;
  for (int d = 0; d < D; d++) {
    const float a = to_f32(q[d]), b = to_f32(k[d]);
    const float pr = __fmul_rn(a, b), pe = __fmaf_rn(a, b, -pr); /* pr + pe == a * b */
    const float t = __fadd_rn(s, pr), z = __fsub_rn(t, s);         /* t + e == s + pr */
    const float e = __fadd_rn(__fsub_rn(s, __fsub_rn(t, z)), __fsub_rn(pr, z));
    c = __fadd_rn(c, __fadd_rn(e, pe));
    s = t;
  }
  /* An infinite product makes the error terms Inf - Inf = NaN: then the plain sum (+-Inf, or NaN). */
  return isfinite(s) ? __fadd_rn(s, c) : s;
}

/* Key j (0 <= j < the row's key count) of a row, in the order [P | A | B] (an anchor row's keys are
 * anchor keys 0..i): the [D] vector of KV head hk. seg_* are [len, Hkv, D]. */
template <typename T>
__device__ __forceinline__ const T *row_key(const T *seg_p, const T *seg_a, const T *seg_b, bool anchor_row,
                                            int64_t P, int64_t A, int64_t j, int Hkv, int hk, int D) {
  const T *base;
  int64_t t;
  if (anchor_row) base = seg_a, t = j;
  else if (j < P) base = seg_p, t = j;
  else if (j < P + A) base = seg_a, t = j - P;
  else base = seg_b, t = j - P - A;
  return base + (t * Hkv + hk) * (int64_t)D;
}

/* Row r (of [0, T)), query head h, by the whole warp: o and lse exactly as apb_attn_naive defines them,
 * in fp32 CUDA-core math. q points at the row's [D] query (shared or global memory, any element type).
 * Online softmax over chunks of 32 keys: lane i scores key c+i with a compensated dot product, then
 * the warp accumulates p*v for the chunk's keys, each lane owning columns lane, lane+32, ...; only
 * the keys the row sees are read, so a key it does not see cannot reach it. A row whose every score
 * is -inf gets o = 0 and lse = -inf, as one that sees no key (apb/attn.h); a NaN or +Inf score makes
 * o and lse NaN, as in the definition. */
template <typename T, typename TQ>
__device__ __forceinline__ void attn_row_exact(const AttnParams &p, const TQ *q, int64_t r, int h, int lane) {
  const int hk = h / p.G, D = p.D;
  const bool anchor = r < p.A;
  /* APB.md 3.6: anchor row i sees anchor keys 0..i; local row j sees P, A and local keys 0..j. */
  const int64_t nk = anchor ? r + 1 : p.P + p.A + (p.local_keys ? r - p.A + 1 : 0);
  const T *kp = (const T *)p.kp, *ka = (const T *)p.ka, *kb = (const T *)p.kb;
  const T *vp = (const T *)p.vp, *va = (const T *)p.va, *vb = (const T *)p.vb;
  float acc[kMaxD / 32]; /* [D/32] lane's output columns lane, lane+32, ... */
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t c = 0; c < nk; c += 32) {
    const int64_t j = c + lane;
    float s = -INFINITY;
    if (j < nk) {
      const T *kr = row_key(kp, ka, kb, anchor, p.P, p.A, j, p.Hkv, hk, D);
      s = dot_compensated(q, kr, D) * p.scale;
    }
    const float mn = fmaxf(m, warp_max(s)); /* lane 0 always holds a key */
    /* A chunk whose every score is -inf (so far) uses 0 as its reference: no -inf - (-inf). */
    const float mu = mn == -INFINITY ? 0.0f : mn;
    const float corr = expf(m - mu);        /* 0 on the first chunk (m = -inf) */
    const float e = j < nk ? expf(s - mu) : 0.0f;
    l = l * corr + warp_sum(e);
#pragma unroll
    for (int i = 0; i < kMaxD / 32; i++) acc[i] *= corr;
    const int cnt = nk - c < 32 ? (int)(nk - c) : 32;
    for (int jj = 0; jj < cnt; jj++) {
      const float pj = __shfl_sync(0xffffffffu, e, jj);
      const T *vr = row_key(vp, va, vb, anchor, p.P, p.A, c + jj, p.Hkv, hk, D);
#pragma unroll
      for (int i = 0; i < kMaxD / 32; i++) {
        const int d = lane + 32 * i;
        if (d < D) acc[i] = fmaf(pj, to_f32(vr[d]), acc[i]);
      }
    }
    m = mn;
  }
  T *o = (T *)p.o + (r * p.Hq + h) * (int64_t)D;
#pragma unroll
  for (int i = 0; i < kMaxD / 32; i++) {
    const int d = lane + 32 * i;
    if (d < D) store_val(o + d, l == 0.0f ? 0.0f : acc[i] / l); /* no visible key: o = 0; NaN stays */
  }
  if (p.lse && lane == 0) p.lse[(int64_t)h * p.T + r] = l == 0.0f ? -INFINITY : m + logf(l);
}

/* The rare path of the tensor-core kernels' epilogues. Their P V product multiplies a whole key tile:
 * a key that a row does not see enters with p = 0, and if its value is Inf or NaN, 0 * Inf = NaN
 * reaches a row that never sees it (a later token's value poisoning earlier rows of its row tile,
 * where apb_attn_naive stays finite), column by column. Only keys of the row's own segment (anchor
 * rows: A; local rows: B) past the row's position can do that, and only those the CTA loaded:
 * [r0, kend), r0 the CTA's first token in the segment.
 *
 * The warp reads those value rows once and keeps, per column d, the last key whose value there is Inf
 * or NaN (last_bad) and the first whose value is NaN (first_nan). A row at position i whose stored
 * output has a non-finite element is recomputed exactly (o and lse, attn_row_exact) when some column
 * has last_bad > i (an unseen non-finite value was multiplied into it) and first_nan > i (the row sees
 * no NaN there in [r0, i], which would make that column NaN in the definition too). Every other row
 * keeps what the tile gave, which the definition also has: a layer whose values are all NaN costs one
 * scan per warp with a bad row, not a recomputation.
 *
 * Called by the whole warp after its rows were stored, with this lane's NS row slots: bit s of bad set
 * when slot s stored a non-finite element, and row_of(s, &row, &head) giving the slot's q/o row and
 * query head; the lanes that share a row pool their bits here. hk is the CTA's KV head, anchor says
 * which segment its rows are in. Costs two shuffles and a vote unless some lane has a bad row. */
template <int NS, typename RowOf>
__device__ __forceinline__ void attn_repair_rows(const AttnParams &p, int hk, bool anchor, int64_t r0, int64_t kend,
                                                 unsigned bad, RowOf row_of, int lane) {
  bad |= __shfl_xor_sync(0xffffffffu, bad, 1); /* the quad of lanes that share each row */
  bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
  if (!__any_sync(0xffffffffu, bad != 0)) return;
  __syncwarp(); /* the stores above are visible to the whole warp */
  if (!(anchor || p.local_keys) || kend <= r0) return; /* no key of the row's own segment was multiplied unseen */
  const int D = p.D, nk = (int)(kend - r0); /* nk: at most a row tile plus a key tile */
  const unsigned short *seg = (const unsigned short *)(anchor ? p.va : p.vb) + hk * (int64_t)D;
  /* per column lane + 32 c, as offsets from r0: -1 / nk when no such key */
  int last_bad[kMaxD / 32], first_nan[kMaxD / 32];
#pragma unroll
  for (int c = 0; c < kMaxD / 32; c++) last_bad[c] = -1, first_nan[c] = nk;
  for (int k = 0; k < nk; k++) {
    const unsigned short *v = seg + (r0 + k) * (int64_t)p.Hkv * D;
#pragma unroll
    for (int c = 0; c < kMaxD / 32; c++) {
      const int d = lane + 32 * c;
      const unsigned short b = d < D ? v[d] : 0;
      if ((b & 0x7f80u) == 0x7f80u) { /* bf16 Inf or NaN */
        last_bad[c] = k;
        if ((b & 0x7fu) && first_nan[c] == nk) first_nan[c] = k;
      }
    }
  }
  bool any = false;
#pragma unroll
  for (int c = 0; c < kMaxD / 32; c++) any |= last_bad[c] >= 0;
  if (!__any_sync(0xffffffffu, any)) return;
  const int64_t seg0 = (anchor ? 0 : p.A) + r0; /* row index of the segment's position r0 */
#pragma unroll
  for (int s = 0; s < NS; s++) {
    int64_t row;
    int head;
    row_of(s, &row, &head); /* a slot past the CTA's rows or heads has no bad bit */
    unsigned pending = __ballot_sync(0xffffffffu, bad >> s & 1u);
    while (pending) {
      const int src = __ffs(pending) - 1;
      const int64_t r = __shfl_sync(0xffffffffu, row, src);
      const int h = __shfl_sync(0xffffffffu, head, src);
      pending &= __ballot_sync(0xffffffffu, !(row == r && head == h)); /* every lane holding that row */
      const int64_t i = r - seg0; /* the row's position, from r0 */
      bool poisoned = false;
#pragma unroll
      for (int c = 0; c < kMaxD / 32; c++) poisoned |= last_bad[c] > i && first_nan[c] > i;
      if (__any_sync(0xffffffffu, poisoned))
        attn_row_exact<bf16>(p, (const bf16 *)p.q + (r * p.Hq + h) * (int64_t)D, r, h, lane);
    }
  }
}

} /* namespace apb_attn */

#endif /* APB_GPU_ATTN_ROW_CUH */
