/* gpu/attn.cu: APB's segmented attention for one host (shared/APB.md 3.6) on an NVIDIA GPU, with the
 * exact semantics of apb/attn.h, plus the few device-memory and timing helpers that C programs and
 * tests use through apb/cuda.h (they must not include CUDA headers).
 *
 * Legend: T = A + B query rows, P passing keys, A anchor rows/keys, B local rows/keys, Hq query heads,
 * Hkv KV heads, G = Hq / Hkv, D head dim, DP = D padded to the kernel's tile width, BM rows (query
 * row x head pairs) of a CTA, BN keys of a K/V tile. All tensors are token-major device arrays:
 * q, o [T, Hq, D]; kp, vp [P, Hkv, D]; ka, va [A, Hkv, D]; kb, vb [B, Hkv, D]; lse [Hq, T].
 *
 * Two kernels compute the same function:
 *   SIMPLE  one warp per (row, query head): fp32 CUDA-core math (no TF32), online softmax over chunks of
 *           32 keys (lane i scores key c+i with a compensated dot product; the warp then accumulates
 *           p*v, each lane owning D/32 columns; attn_row_exact in gpu/attn_row.cuh). F32 or BF16
 *           storage, any D <= 256. The tight-validation path and the fallback.
 *   TC      FlashAttention-2 style, BF16 storage, fp32 accumulation: mma.sync m16n8k16 with ldmatrix
 *           from XOR-swizzled shared memory, K and V tiles double-buffered with cp.async (tile t+1
 *           streams in while tile t is computed; one barrier per tile), online softmax in registers.
 *           A CTA of 4 warps owns BM = 64 (W16) or 128 (W32) rows of M, where M stacks the G query heads
 *           of one KV head under each token (m = token * G + head), so the whole GQA group shares every
 *           K/V tile. The keys a row sees are one interval of the concatenation [P | A | B], so a CTA
 *           walks a short list of key tiles (the P|A phase without a mask, then its own segment's
 *           causal phase) and never visits a tile that is fully masked; the per-element mask runs only
 *           on tiles that cross a row's last key or a segment end. P, A, B need not be multiples of
 *           any tile size: tiles are clipped and zero-filled. CTAs run longest first (the last local
 *           row tiles see the most keys). Fast paths D = 64 and 128; D <= 256 with D % 8 == 0 runs
 *           padded to 64, 128 or 256; other D (or pointers not 16-byte aligned) fall back to SIMPLE.
 *           Its P V product multiplies a masked key's p = 0 by that key's value, so an Inf or NaN
 *           value can poison rows that never see the key: the epilogue recomputes such rows exactly
 *           (attn_repair_rows, gpu/attn_row.cuh; docs/gpu-attention.md), as the Hopper kernel does.
 *
 * What it is not: a Hopper wgmma/TMA kernel (a later issue), a varlen or batched API, or a backward.
 *
 * Tested in tests/check_gpu_attn.c (against apb_attn_naive and a CPU bf16 emulation over awkward
 * shapes, poisoned outputs, guard regions, run-to-run bitwise equality); timed by `apb bench gpu-attn`
 * (src/cmd_bench_gpu.c) beside bench/gpu_attn_torch.py. Design and numbers: docs/gpu-attention.md.
 */
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "apb/attn.h"
#include "apb/cuda.h"
#include "attn_row.cuh"
#include "gpu_common.h"

/* gpu/attn_hopper.cu: the sm_90a kernel behind APB_CUDA_ATTN_HOPPER*; *done = 0 when it does not take
 * the case (then TC runs). variant 0 is its best, 1 to 5 the forced variants. */
apb_status apb_cuda_attn_hopper(const apb_cuda_attn_args *x, const apb_attn::AttnParams &a, int variant,
                                void *stream, int *done, apb_error *err);

namespace {

using namespace apb_attn;

/* ================================================================ device helpers */

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared, bypassing L1; src_bytes 0 writes 16 zero bytes and reads nothing. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

/* Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
 * (row lane/4, columns 2*(lane%4) and +1) of matrix i; .trans gives the transposed element pair. */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/* c[16x8] += a[16x16] b[16x8], bf16 in, fp32 accumulate. Fragments (g = lane/4, t = lane%4):
 * a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g),
 * b1 (k 2t+8.., n g); c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1). */
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Byte offset of 16-byte chunk `chunk` of row `row` in a [rows, cpr chunks] tile whose chunk index is
 * XORed with row % 8: the 8 rows an ldmatrix reads hit 8 different bank groups. cpr >= 8. */
__device__ __forceinline__ uint32_t swz(int row, int chunk, int cpr) {
  return (uint32_t)((row * cpr + (chunk ^ (row & 7))) * 16);
}

/* ================================================================ SIMPLE kernel */

constexpr int kSimpleWarps = 4;

/* grid: ceil(T * Hq / kSimpleWarps) blocks of kSimpleWarps warps. Warp id -> row T-1 - id/Hq (longest
 * rows first), query head id % Hq: the warps of a block are consecutive heads of one row, so the heads
 * of a GQA group read the same K/V rows close together in time (L1/L2 reuse). */
template <typename T>
__global__ void __launch_bounds__(kSimpleWarps * 32) attn_simple_kernel(AttnParams p) {
  __shared__ float qs[kSimpleWarps][kMaxD]; /* [warp][D] this warp's query row in fp32 */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t id = (int64_t)blockIdx.x * kSimpleWarps + warp;
  if (id >= p.T * p.Hq) return;
  const int64_t r = p.T - 1 - id / p.Hq;
  const int h = (int)(id % p.Hq);
  const T *q = (const T *)p.q + (r * p.Hq + h) * (int64_t)p.D;
  for (int d = lane; d < p.D; d += 32) qs[warp][d] = to_f32(q[d]);
  __syncwarp();
  attn_row_exact<T>(p, qs[warp], r, h, lane);
}

/* ================================================================ TC kernel */

/* Compile-time shape of one TC variant: DP padded head dim, BN keys per tile, MT m16 tiles per warp. */
template <int DP, int BN, int MT>
struct TcCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * MT * kWarps;             /* M rows (token x head) per CTA */
  static constexpr int kCPR = DP / 8;                      /* 16-byte chunks per tile row */
  static constexpr bool kQReg = MT * DP <= 128;            /* Q fragments live in registers */
  static constexpr int kSmemQ = kBM * DP * 2;              /* [BM, DP] bf16 */
  static constexpr int kSmemKV = BN * DP * 2;              /* [BN, DP] bf16: K or V of one tile */
  static constexpr int kSmem = kSmemQ + 4 * kSmemKV;       /* Q, then K[2], then V[2] */
  static constexpr int kMinBlocks = MT == 1 && DP <= 64 ? 3 : 2; /* CTAs per SM the registers allow */
  static constexpr int kSUnroll = 1;                       /* S-loop unroll when Q is re-read (registers) */
  static_assert(DP % 64 == 0 && BN % 16 == 0 && kCPR >= 8, "tile shape");
};

struct TcParams {
  AttnParams a;
  int hc;          /* query heads per CTA: min(G, BM) */
  int gsplit;      /* CTAs per GQA group: ceil(G / hc) */
  int tpc;         /* tokens per CTA: BM / hc */
  int64_t nat;     /* anchor row tiles: ceil(A / tpc) */
  int64_t nlt;     /* local row tiles:  ceil(B / tpc) */
};

/* grid: (nlt + nat) * Hkv * gsplit CTAs of 128 threads, kSmem bytes of dynamic shared memory.
 * CTA rank (blockIdx.x / (Hkv * gsplit)) orders row tiles longest first: local tiles from the last
 * one down, then anchor tiles from the last one down. */
template <int DP, int BN, int MT>
__global__ void __launch_bounds__(TcCfg<DP, BN, MT>::kThreads, TcCfg<DP, BN, MT>::kMinBlocks)
    attn_tc_kernel(const TcParams tp) {
  typedef TcCfg<DP, BN, MT> C;
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnParams &p = tp.a;
  const uint32_t sQ = smem_addr(smem), sK0 = sQ + C::kSmemQ, sV0 = sK0 + 2 * C::kSmemKV; /* stage s: +s*kSmemKV */
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t P = p.P;
  const int D = p.D, Hkv = p.Hkv;

  /* Which rows: a row tile of one segment, the query heads [g0, g0 + hcount) of KV head hk. */
  const int nh = Hkv * tp.gsplit;
  const int hs = (int)(blockIdx.x % nh);
  const int64_t rank = blockIdx.x / nh;
  const int hk = hs / tp.gsplit, g0 = (hs % tp.gsplit) * tp.hc;
  const int hcount = min(tp.hc, p.G - g0);
  const bool anchor = rank >= tp.nlt;
  const int64_t r0 = (anchor ? tp.nat - 1 - (rank - tp.nlt) : tp.nlt - 1 - rank) * tp.tpc;
  const int ntok = (int)min((int64_t)tp.tpc, (anchor ? p.A : p.B) - r0);
  const int64_t row0 = anchor ? r0 : p.A + r0; /* first q/o row of the tile */

  /* Which keys (APB.md 3.6), as two phases of the interval a row sees:
   *   phase 0, local tiles only: keys [0, P + A) of [P | A], visible to every row (no mask);
   *   phase 1: keys [0, r0 + ntok) of the row's own segment (anchor: A; local: B if local_keys),
   *            key c visible to the row of coordinate rc (i or j) when c <= rc. */
  const int64_t n0 = anchor ? 0 : P + p.A;
  const int64_t n1 = (anchor || p.local_keys) ? r0 + ntok : 0;
  const int64_t n0t = (n0 + BN - 1) / BN;
  const int64_t ntiles = n0t + (n1 + BN - 1) / BN;
  const bf16 *qg = (const bf16 *)p.q;

  /* Q tile -> sQ [BM, DP]: M row m is token m / hc, head g0 + m % hc; rows past the tile, heads past
   * the group and columns past D are zero-filled. */
  for (int i = tid; i < C::kBM * C::kCPR; i += C::kThreads) {
    const int m = i / C::kCPR, c = i % C::kCPR;
    const int tok = m / tp.hc, g = m % tp.hc;
    const bool ok = tok < ntok && g < hcount && c * 8 < D;
    const bf16 *src = ok ? qg + ((row0 + tok) * p.Hq + hk * p.G + g0 + g) * (int64_t)D + c * 8 : qg;
    cp_async16(sQ + swz(m, c, C::kCPR), src, ok ? 16 : 0);
  }

  /* One K (is_v false) or V tile, the t-th of the list, -> dst [BN, DP]; keys past the phase end are
   * zero-filled. Thread tid copies chunk ld_c of rows ld_row + it * kRowsPerIt. A tile's rows come
   * from one segment, except a phase-0 tile that straddles P | A: rows from sw on then come from the
   * anchor. Segment pointers are read from the kernel parameters here rather than held in registers. */
  constexpr int kRowsPerIt = C::kThreads / C::kCPR;
  const int ld_row = tid / C::kCPR, ld_c = tid % C::kCPR;
  const bool ld_cok = ld_c * 8 < D;
  const int64_t kv_stride = (int64_t)Hkv * D, kv_off = (int64_t)hk * D + ld_c * 8;
  auto load_tile = [&](uint32_t dst, bool is_v, int64_t t) {
    const bf16 *segp = (const bf16 *)(is_v ? p.vp : p.kp), *sega = (const bf16 *)(is_v ? p.va : p.ka);
    const bf16 *seg1 = anchor ? sega : (const bf16 *)(is_v ? p.vb : p.kb);
    const bool ph0 = t < n0t;
    const int64_t ks = (ph0 ? t : t - n0t) * BN;
    const int kv = (int)min((int64_t)BN, (ph0 ? n0 : n1) - ks);
    const bool in_p = ph0 && ks < P;
    const bf16 *seg = !ph0 ? seg1 : in_p ? segp : sega;
    const int sw = in_p ? (int)min((int64_t)BN, P - ks) : BN;
    const int64_t off0 = ((in_p || !ph0 ? ks : ks - P) + ld_row) * kv_stride + kv_off; /* rows < sw */
    const int64_t off1 = (int64_t)(ld_row - sw) * kv_stride + kv_off;                   /* rows >= sw */
#pragma unroll
    for (int it = 0; it < BN / kRowsPerIt; it++) {
      const int rr = ld_row + it * kRowsPerIt;
      const bool ok = rr < kv && ld_cok, first = rr < sw;
      const int64_t off = (first ? off0 : off1) + (int64_t)(it * kRowsPerIt) * kv_stride;
      const bf16 *src = ok ? (first ? seg : sega) + off : qg;
      cp_async16(dst + swz(rr, ld_c, C::kCPR), src, ok ? 16 : 0);
    }
  };

  if (ntiles > 0) {
    load_tile(sK0, false, 0);
    load_tile(sV0, true, 0);
  }
  cp_async_commit();

  float oacc[MT][DP / 8][4]; /* O rows x DP columns, C fragments */
  float mrow[MT][2], lrow[MT][2]; /* running max (base 2, scaled), this thread's partial sum */
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int dn = 0; dn < DP / 8; dn++)
#pragma unroll
      for (int e = 0; e < 4; e++) oacc[mt][dn][e] = 0.0f;
    mrow[mt][0] = mrow[mt][1] = -INFINITY;
    lrow[mt][0] = lrow[mt][1] = 0.0f;
  }
  uint32_t qf[C::kQReg ? MT : 1][C::kQReg ? DP / 16 : 1][4]; /* Q A-fragments when kQReg */

  /* ldmatrix lane roles. A (Q): row lane%16, chunk +lane/16. B from K (non-trans): key lane%8 +
   * 8*(lane/16), chunk +(lane/8)%2. B from V (trans): key lane%8 + 8*((lane/8)%2), chunk +lane/16. */
  const int a_row = warp * 16 * MT + (lane & 15), a_ch = lane >> 4;
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_ch = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3), v_ch = lane >> 4;

  for (int64_t t = 0; t < ntiles; t++) {
    cp_async_wait_all();
    __syncthreads(); /* K(t), V(t) (and Q) landed; every warp is done with tile t-1's stage */
    if constexpr (C::kQReg) {
      if (t == 0) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int kk = 0; kk < DP / 16; kk++)
            ldsm_x4(qf[mt][kk], sQ + swz(a_row + mt * 16, kk * 2 + a_ch, C::kCPR));
      }
    }
    const uint32_t sK = sK0 + (uint32_t)(t & 1) * C::kSmemKV, sV = sV0 + (uint32_t)(t & 1) * C::kSmemKV;
    if (t + 1 < ntiles) { /* tile t+1 streams into the other stage while this one is computed */
      const uint32_t nxt = (uint32_t)((t + 1) & 1) * C::kSmemKV;
      load_tile(sK0 + nxt, false, t + 1);
      load_tile(sV0 + nxt, true, t + 1);
    }
    cp_async_commit();

    /* S = Q K^T for this tile: [16*MT rows, BN keys] per warp. */
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[mt][nt][e] = 0.0f;
#pragma unroll(C::kQReg ? DP / 16 : C::kSUnroll)
    for (int kk = 0; kk < DP / 16; kk++) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        if constexpr (C::kQReg) {
#pragma unroll
          for (int e = 0; e < 4; e++) a[mt][e] = qf[mt][kk][e];
        } else {
          ldsm_x4(a[mt], sQ + swz(a_row + mt * 16, kk * 2 + a_ch, C::kCPR));
        }
      }
#pragma unroll
      for (int np = 0; np < BN / 16; np++) {
        uint32_t b[4];
        ldsm_x4(b, sK + swz(np * 16 + k_row, kk * 2 + k_ch, C::kCPR));
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_bf16(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_bf16(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    /* Mask only where the tile crosses a phase end or some row's last key. In such a tile of phase 1,
     * ks - r0 lies in (-BN, tpc): the key offset dk + col is compared with the row's token offset. */
    {
      const bool ph0 = t < n0t;
      const int64_t ks = (ph0 ? t : t - n0t) * BN;
      const int64_t kvalid = (ph0 ? n0 : n1) - ks;
      if (kvalid < BN || (!ph0 && ks + BN - 1 > r0)) {
        const int kv = (int)min(kvalid, (int64_t)BN);
        const int dk = ph0 ? INT_MIN / 2 : (int)(ks - r0);
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int hf = 0; hf < 2; hf++) {
            /* token offset (from r0) of this thread's row g + 8 hf of m16 tile mt */
            const int rtok = (warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * hf) / tp.hc;
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
              for (int e = 2 * hf; e < 2 * hf + 2; e++) {
                const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
                if (col >= kv || dk + col > rtok) s[mt][nt][e] = -INFINITY;
              }
          }
      }
    }

    /* Online softmax in base 2: m' = max(m, scale*log2e*max_row(s)); p = 2^(s*scale*log2e - m');
     * O and l are rescaled by 2^(m - m'). A row with no visible key so far keeps m = -inf and uses 0
     * as its reference, so that no inf - inf appears. */
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(mrow[mt][hf], mx * p.scale_log2);
        const float muse = mnew == -INFINITY ? 0.0f : mnew;
        const float alpha = apb_fast_exp2(mrow[mt][hf] - muse);
        mrow[mt][hf] = mnew;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
          for (int e = 2 * hf; e < 2 * hf + 2; e++) {
            s[mt][nt][e] = apb_fast_exp2(fmaf(s[mt][nt][e], p.scale_log2, -muse));
            sum += s[mt][nt][e];
          }
        lrow[mt][hf] = lrow[mt][hf] * alpha + sum;
#pragma unroll
        for (int dn = 0; dn < DP / 8; dn++) {
          oacc[mt][dn][2 * hf] *= alpha;
          oacc[mt][dn][2 * hf + 1] *= alpha;
        }
      }

    /* O += P V: P (bf16) from the S fragments, keys 16*kk.. as the k dimension. */
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        a[mt][0] = apb_pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = apb_pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = apb_pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = apb_pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DP / 16; dp++) {
        uint32_t b[4];
        ldsm_x4_trans(b, sV + swz(kk * 16 + v_row, dp * 2 + v_ch, C::kCPR));
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_bf16(oacc[mt][2 * dp], a[mt], b[0], b[1]);
          mma_bf16(oacc[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait_all(); /* with no key tile at all, the Q copy is still in flight */

  /* Epilogue: o = O / l (0 for a row with no visible key), lse = m ln2 + ln l (-inf then). Each row
   * slot notes whether it stored an Inf or NaN, for the repair below. */
  bf16 *og = (bf16 *)p.o;
  unsigned bad = 0; /* bit 2 mt + hf: that row slot stored an Inf or NaN */
  auto row_of = [&](int s, int64_t *row, int *head) {
    const int m = warp * 16 * MT + (s >> 1) * 16 + (lane >> 2) + 8 * (s & 1);
    *row = row0 + m / tp.hc, *head = hk * p.G + g0 + m % tp.hc;
  };
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      float l = lrow[mt][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int m = warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * hf;
      const int tok = m / tp.hc, g = m % tp.hc;
      if (tok >= ntok || g >= hcount) continue;
      const float inv = l == 0.0f ? 0.0f : 1.0f / l; /* a NaN l stays NaN */
      const int h = hk * p.G + g0 + g;
      bf16 *orow = og + ((row0 + tok) * p.Hq + h) * (int64_t)D + 2 * (lane & 3);
      bool nf = false;
#pragma unroll
      for (int dn = 0; dn < DP / 8; dn++) {
        if (dn * 8 >= D) break;
        const float v0 = oacc[mt][dn][2 * hf] * inv, v1 = oacc[mt][dn][2 * hf + 1] * inv;
        nf |= !isfinite(v0) || !isfinite(v1);
        *(uint32_t *)(orow + dn * 8) = apb_pack_bf16x2(v0, v1);
      }
      if (p.lse && (lane & 3) == 0)
        p.lse[(int64_t)h * p.T + row0 + tok] =
            l == 0.0f ? -INFINITY : mrow[mt][hf] * 0.69314718055994531f + logf(l);
      bad |= (unsigned)nf << (2 * mt + hf);
    }
  /* A row made non-finite by the P V product of a key it does not see: recomputed exactly
   * (gpu/attn_row.cuh). Phase 1 loaded the row segment's keys [0, r0 + ntok), zeros past that. */
  attn_repair_rows<2 * MT>(p, hk, anchor, r0, r0 + ntok, bad, row_of, lane);
}

/* ================================================================ helpers for the C side */

__global__ void fill_uniform_kernel(void *x, int is_bf16, size_t n, uint64_t seed, float amp) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull; /* splitmix64 of the index */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(z >> 40) * 0x1p-24f; /* [0, 1) */
    const float v = (2.0f * u - 1.0f) * amp;
    if (is_bf16) ((bf16 *)x)[i] = __float2bfloat16_rn(v);
    else ((float *)x)[i] = v;
  }
}

/* ================================================================ launchers */

apb_status launch_simple(const AttnParams &a, apb_dtype dt, cudaStream_t stream, apb_error *err) {
  apb_status st = APB_OK;
  const int64_t blocks = (a.T * a.Hq + kSimpleWarps - 1) / kSimpleWarps;
  if (blocks > INT_MAX)
    return apb_error_set(err, APB_EINVAL, "cuda_attn simple: T*Hq = %lld too large for one grid",
                         (long long)(a.T * a.Hq));
  if (dt == APB_DT_BF16) attn_simple_kernel<bf16><<<(unsigned)blocks, kSimpleWarps * 32, 0, stream>>>(a);
  else attn_simple_kernel<float><<<(unsigned)blocks, kSimpleWarps * 32, 0, stream>>>(a);
  APB_CU_LAUNCH();
done:
  return st;
}

template <int DP, int BN, int MT>
apb_status launch_tc(const AttnParams &a, cudaStream_t stream, apb_error *err) {
  typedef TcCfg<DP, BN, MT> C;
  apb_status st = APB_OK;
  TcParams tp;
  int64_t blocks;
  tp.a = a;
  tp.hc = a.G < C::kBM ? a.G : C::kBM;
  tp.gsplit = (a.G + tp.hc - 1) / tp.hc;
  tp.tpc = C::kBM / tp.hc;
  tp.nat = (a.A + tp.tpc - 1) / tp.tpc;
  tp.nlt = (a.B + tp.tpc - 1) / tp.tpc;
  blocks = (tp.nat + tp.nlt) * a.Hkv * tp.gsplit;
  if (blocks > INT_MAX)
    return apb_error_set(err, APB_EINVAL, "cuda_attn tc: %lld CTAs, more than one grid holds", (long long)blocks);
  APB_CU(cudaFuncSetAttribute(attn_tc_kernel<DP, BN, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  attn_tc_kernel<DP, BN, MT><<<(unsigned)blocks, C::kThreads, C::kSmem, stream>>>(tp);
  APB_CU_LAUNCH();
done:
  return st;
}

} /* namespace */

/* ================================================================ public entry points */

extern "C" apb_status apb_cuda_attn(const apb_cuda_attn_args *x, apb_cuda_attn_impl impl, void *stream,
                                    apb_error *err) {
  if (!x) return apb_error_set(err, APB_EINVAL, "cuda_attn: args is NULL");
  /* Shapes and pointer presence exactly as the CPU path checks them (the pointers are only tested
   * for NULL here, never dereferenced on the host). */
  apb_attn_args h;
  memset(&h, 0, sizeof h);
  h.P = x->P, h.A = x->A, h.B = x->B, h.Hq = x->Hq, h.Hkv = x->Hkv, h.D = x->D;
  h.local_keys = x->local_keys, h.scale = x->scale;
  h.q = (const float *)x->q, h.kp = (const float *)x->kp, h.vp = (const float *)x->vp;
  h.ka = (const float *)x->ka, h.va = (const float *)x->va, h.kb = (const float *)x->kb;
  h.vb = (const float *)x->vb, h.o = (float *)x->o, h.lse = x->lse;
  apb_status st = apb_attn_validate(&h, err);
  if (st != APB_OK) return apb_error_set(err, st, "cuda_attn");
  if (x->dtype != APB_DT_F32 && x->dtype != APB_DT_BF16)
    return apb_error_set(err, APB_EUNSUPPORTED, "cuda_attn: dtype %s; q, k, v, o must be F32 or BF16",
                         apb_dtype_name(x->dtype));
  if (x->D > kMaxD)
    return apb_error_set(err, APB_EUNSUPPORTED, "cuda_attn: D=%d; the CUDA kernels support D <= %d", x->D, kMaxD);
  if (impl != APB_CUDA_ATTN_SIMPLE && impl != APB_CUDA_ATTN_TC && impl != APB_CUDA_ATTN_TC_W16 &&
      impl != APB_CUDA_ATTN_TC_W32 && (impl < APB_CUDA_ATTN_HOPPER || impl > APB_CUDA_ATTN_HOPPER_V5))
    return apb_error_set(err, APB_EINVAL, "cuda_attn: unknown impl %d", (int)impl);
  if (impl != APB_CUDA_ATTN_SIMPLE && x->dtype != APB_DT_BF16)
    return apb_error_set(err, APB_EUNSUPPORTED,
                         "cuda_attn: the tensor-core kernel needs BF16 storage (got %s); use SIMPLE for F32",
                         apb_dtype_name(x->dtype));

  AttnParams a;
  a.q = x->q, a.kp = x->kp, a.vp = x->vp, a.ka = x->ka, a.va = x->va, a.kb = x->kb, a.vb = x->vb;
  a.o = x->o, a.lse = x->lse;
  a.P = x->P, a.A = x->A, a.B = x->B, a.T = x->A + x->B;
  a.Hq = x->Hq, a.Hkv = x->Hkv, a.G = x->Hq / x->Hkv, a.D = x->D, a.local_keys = x->local_keys;
  a.scale = apb_attn_scale(&h);
  a.scale_log2 = a.scale * 1.4426950408889634f;
  if (a.T == 0) return APB_OK;
  cudaStream_t s = (cudaStream_t)stream;
  if (impl == APB_CUDA_ATTN_SIMPLE) return launch_simple(a, x->dtype, s, err);

  /* TC needs 16-byte rows (D % 8 == 0) and 16-byte aligned bases for cp.async; otherwise SIMPLE. */
  const void *ptrs[] = {x->q, x->kp, x->vp, x->ka, x->va, x->kb, x->vb, x->o};
  int ok = x->D % 8 == 0;
  for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
    if (ptrs[i] && !apb_aligned16(ptrs[i])) ok = 0;
  if (!ok) return launch_simple(a, x->dtype, s, err);
  if (impl >= APB_CUDA_ATTN_HOPPER && impl <= APB_CUDA_ATTN_HOPPER_V5) {
    /* HOPPER -> its best variant (0); HOPPER_Vk -> variant k. */
    const int variant = impl == APB_CUDA_ATTN_HOPPER ? 0 : (int)impl - (int)APB_CUDA_ATTN_HOPPER;
    int done = 0;
    const apb_status hs = apb_cuda_attn_hopper(x, a, variant, stream, &done, err);
    if (hs != APB_OK || done) return hs;
  }
  const int wide = impl != APB_CUDA_ATTN_TC_W16; /* W32 unless asked otherwise (D <= 128 only) */
  if (x->D <= 64) return wide ? launch_tc<64, 64, 2>(a, s, err) : launch_tc<64, 64, 1>(a, s, err);
  if (x->D <= 128) return wide ? launch_tc<128, 64, 2>(a, s, err) : launch_tc<128, 64, 1>(a, s, err);
  return launch_tc<256, 32, 1>(a, s, err);
}

extern "C" apb_status apb_cuda_malloc(void **p, size_t bytes, apb_error *err) {
  apb_status st = APB_OK;
  *p = NULL;
  APB_CU(cudaMalloc(p, bytes ? bytes : 1));
done:
  return st;
}

extern "C" void apb_cuda_free(void *p) {
  if (p) cudaFree(p);
}

extern "C" apb_status apb_cuda_memcpy(void *dst, const void *src, size_t bytes, apb_error *err) {
  apb_status st = APB_OK;
  if (bytes) APB_CU(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
done:
  return st;
}

extern "C" apb_status apb_cuda_memset(void *p, int byte, size_t bytes, apb_error *err) {
  apb_status st = APB_OK;
  if (bytes) APB_CU(cudaMemset(p, byte, bytes));
done:
  return st;
}

extern "C" apb_status apb_cuda_synchronize(apb_error *err) {
  apb_status st = APB_OK;
  APB_CU(cudaDeviceSynchronize());
done:
  return st;
}

extern "C" apb_status apb_cuda_fill_uniform(void *x, apb_dtype dt, size_t n, uint64_t seed, float amp,
                                            void *stream, apb_error *err) {
  apb_status st = APB_OK;
  if (dt != APB_DT_F32 && dt != APB_DT_BF16)
    return apb_error_set(err, APB_EUNSUPPORTED, "cuda_fill_uniform: dtype %s; F32 or BF16 only",
                         apb_dtype_name(dt));
  if (n == 0) return APB_OK;
  fill_uniform_kernel<<<1024, 256, 0, (cudaStream_t)stream>>>(x, dt == APB_DT_BF16, n, seed, amp);
  APB_CU_LAUNCH();
done:
  return st;
}

struct apb_cuda_timer {
  cudaEvent_t start, stop;
};

extern "C" apb_status apb_cuda_timer_create(apb_cuda_timer **t, apb_error *err) {
  apb_status st = APB_OK;
  apb_cuda_timer *x = (apb_cuda_timer *)calloc(1, sizeof *x);
  *t = NULL;
  if (!x) return apb_error_set(err, APB_ENOMEM, "cuda_timer_create: out of host memory");
  APB_CU(cudaEventCreate(&x->start));
  APB_CU(cudaEventCreate(&x->stop));
  *t = x;
  x = NULL;
done:
  if (x) apb_cuda_timer_destroy(x);
  return st;
}

extern "C" void apb_cuda_timer_destroy(apb_cuda_timer *t) {
  if (!t) return;
  if (t->start) cudaEventDestroy(t->start);
  if (t->stop) cudaEventDestroy(t->stop);
  free(t);
}

extern "C" apb_status apb_cuda_timer_start(apb_cuda_timer *t, void *stream, apb_error *err) {
  apb_status st = APB_OK;
  APB_CU(cudaEventRecord(t->start, (cudaStream_t)stream));
done:
  return st;
}

extern "C" apb_status apb_cuda_timer_stop(apb_cuda_timer *t, void *stream, apb_error *err) {
  apb_status st = APB_OK;
  APB_CU(cudaEventRecord(t->stop, (cudaStream_t)stream));
done:
  return st;
}

extern "C" apb_status apb_cuda_timer_ms(apb_cuda_timer *t, float *ms, apb_error *err) {
  apb_status st = APB_OK;
  *ms = 0.0f;
  APB_CU(cudaEventSynchronize(t->stop));
  APB_CU(cudaEventElapsedTime(ms, t->start, t->stop));
done:
  return st;
}
