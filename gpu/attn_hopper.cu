/* gpu/attn_hopper.cu: APB's segmented attention for one host (shared/APB.md 3.6) on Hopper (sm_90a):
 * the same function as apb_attn_naive (apb/attn.h) and the SIMPLE/TC kernels of gpu/attn.cu, written
 * for the H100's own instructions. Reached through apb_cuda_attn (apb/cuda.h) with
 * APB_CUDA_ATTN_HOPPER (or the forced variants _V1 to _V5); bf16 storage, fp32 accumulation, D = 64 and
 * 128 (other D, another GPU, or pointers that are not 16-byte aligned go to the TC kernel instead).
 *
 * Legend (as gpu/attn.cu): T = A + B query rows, P passing keys, A anchor rows/keys, B local rows/keys,
 * Hq query heads, Hkv KV heads, G = Hq / Hkv, D head dim, BM = 128 M rows per CTA (query row x head
 * pairs), BN = 128 keys per K/V tile, S pipeline stages. Tensors are token-major device arrays:
 * q, o [T, Hq, D]; kp, vp [P, Hkv, D]; ka, va [A, Hkv, D]; kb, vb [B, Hkv, D]; lse [Hq, T] (fp32).
 *
 * Design (docs/gpu-attention.md, "The Hopper kernel"):
 *   - A CTA owns BM rows of M, M row m = token m / hc, query head g0 + m % hc of one KV head (hc =
 *     min(G, BM) heads): every K/V tile in shared memory serves the whole GQA group, as in TC.
 *   - Warp specialization: 3 warpgroups. Warpgroup 0 is the producer (one thread issues every copy;
 *     setmaxnreg gives its registers away, 40 per thread); warpgroups 1 and 2 are consumers (232
 *     registers), 64 M rows each.
 *   - Copies: TMA (cp.async.bulk.tensor.3d) with 128-byte swizzle, completing on mbarriers. One tensor
 *     map per segment (kp, vp, ka, va, kb, vb, plus q), passed as a __grid_constant__ parameter; a tile
 *     never straddles two segments (the tile list is P tiles, then A tiles, then the row segment's own
 *     tiles), and rows past a segment's end arrive as zeros from the TMA unit itself (out-of-bounds
 *     fill), so P, A, B need not be multiples of anything. K and V each have S stages with a full
 *     (TMA done) and an empty (both consumer warpgroups done) barrier, so K(t+1) streams in while V(t)
 *     is still being read.
 *   - Products: wgmma m64n128k16 with A = Q and B = K from shared memory (both K-major) for S = Q K^T;
 *     wgmma m64nDk16 with A = P from registers (the S accumulators rounded to bf16 in place: the
 *     accumulator and A-fragment layouts agree) and B = V from shared memory, MN-major, for O += P V.
 *   - Visibility (APB.md 3.6) is one interval of [P | A | B] per row; tiles wholly masked for the CTA are
 *     never listed, and the per-element mask runs only on a tile that crosses a segment end or the
 *     first row's last key.
 *   - Variants (template V): 1 runs S, softmax and P V one after another per tile; 2 overlaps the
 *     softmax of tile t with the P V product of tile t-1 inside each consumer warpgroup (issue S(t),
 *     issue PV(t-1), wait for S(t) only, softmax, then wait for PV); 3 adds ping-pong scheduling of the
 *     two consumer warpgroups (named barriers: one warpgroup issues its two products while the other
 *     does its softmax). Stages S: 2 at D = 128, 4 at D = 64; variants 4 and 5 are 2 and 3 with one
 *     more stage (3 at D = 128 fills the 227 KiB of shared memory). APB_CUDA_ATTN_HOPPER runs 2 at
 *     D = 128 and 3 at D = 64, the fastest on an H100 (docs/performance.md).
 *   - The epilogue recomputes exactly a row that a masked key's Inf or NaN value made non-finite
 *     (p = 0 times Inf in P V; attn_repair_rows, gpu/attn_row.cuh): nothing but a vote on finite data.
 *   - CTAs are numbered one KV head after another and, within a head, longest first (the last local
 *     row tiles see the most keys); the grid is not persistent: the hardware hands the next CTA to
 *     whichever SM frees up first, which is the longest-first greedy schedule for causal balance, and
 *     the CTAs running together share one head's keys in L2 (APB_CUDA_HOPPER_HEAD_GROUP, get_work).
 *
 * What it is not: a persistent kernel, a backward pass, varlen/batched, FP8, or a kernel for D other
 * than 64 and 128.
 *
 * Tested in tests/check_gpu_attn.c (every variant, the same agreement cases as TC: the oracle, the
 * CPU bf16 emulation, poisoned outputs, guard regions, run-to-run bitwise equality); timed by
 * `apb bench gpu-attn` beside TC, torch flash and cuDNN. Numbers: docs/performance.md.
 */
#include <cuda.h> /* CUtensorMap and its enums only; the encoder comes through the runtime */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "apb/cuda.h"
#include "attn_row.cuh"
#include "gpu_common.h"

/* Called by apb_cuda_attn (gpu/attn.cu) after it validated x (shapes, BF16 storage); sets *done = 1
 * when it launched, *done = 0 when this kernel does not take the case (D not 64/128, a device other than
 * compute capability 9.0, a pointer not 16-byte aligned, a length past 2^31): then the caller runs TC.
 * variant: 1 to 5 (see the top of the file), 0 for the best one for D (kBestVariantD*). a: the same
 * call as the other kernels see it (scale, and the raw pointers the epilogue's exact rows read). */
apb_status apb_cuda_attn_hopper(const apb_cuda_attn_args *x, const apb_attn::AttnParams &a, int variant,
                                void *stream, int *done, apb_error *err);

namespace {

typedef __nv_bfloat16 bf16;

constexpr int kBM = 128;          /* M rows per CTA: 2 consumer warpgroups x 64 */
constexpr int kBN = 128;          /* keys per K/V tile */
constexpr int kThreads = 384;     /* producer warpgroup + 2 consumer warpgroups */
constexpr int kProducerRegs = 40; /* setmaxnreg: 128 x 40 + 256 x 232 = 64512 = 384 x 168 at launch */
constexpr int kConsumerRegs = 232;
constexpr uint32_t kQBlk = kBM * 128;  /* bytes of one 64-column block of Q in shared memory */
constexpr uint32_t kKVBlk = kBN * 128; /* bytes of one 64-column block of a K or V tile */
/* What APB_CUDA_ATTN_HOPPER runs, measured on an H100 (docs/performance.md): at D = 128 the
 * intra-warpgroup overlap alone (ping-pong added nothing there), at D = 64, where the softmax
 * outweighs the halved products, overlap plus ping-pong (+17%). */
constexpr int kBestVariantD128 = 2;
constexpr int kBestVariantD64 = 3;

/* Compile-time shape for head dim D and S stages: shared memory is Q [D/64][BM][64], then K [S][D/64][BN][64], then
 * V [S][D/64][BN][64] (bf16, each [rows][64] block 128-byte swizzled by the TMA unit), then the
 * mbarriers. Every block starts on a 1024-byte boundary (the swizzle pattern's period). */
template <int D, int S>
struct HopCfg {
  static constexpr int kStages = S;
  static constexpr int kDB = D / 64;                  /* 64-column (128-byte) blocks of a row */
  static constexpr uint32_t kSmemQ = kBM * D * 2;
  static constexpr uint32_t kSmemKV = kBN * D * 2;    /* one K or V tile */
  static constexpr uint32_t kBarBytes = 8 * (1 + 4 * kStages);
  static constexpr uint32_t kSmem = kSmemQ + 2 * kStages * kSmemKV + 1024 /* barriers */ + 1024 /* align */;
  static_assert(D == 64 || D == 128, "head dim");
  static_assert(kBarBytes <= 1024, "barrier area");
};

/* Everything the kernel reads, passed by value as one __grid_constant__ parameter (the tensor maps
 * must live in parameter, constant or global memory). Segment index: 0 = P, 1 = A, 2 = B. */
struct HopParams {
  CUtensorMap tq;           /* q as (D, Hq, T), box (64, hc, tpc) */
  CUtensorMap tk[3];        /* k segments as (D, Hkv, len), box (64, 1, BN); zero when len == 0 */
  CUtensorMap tv[3];        /* v segments, the same */
  bf16 *o;                  /* [T, Hq, D] */
  float *lse;               /* [Hq, T] or NULL */
  int P, A, B, T;           /* lengths (< 2^31, checked on the host) */
  int Hq, Hkv, G;
  int hc;                   /* query heads per CTA: min(G, BM) */
  int gsplit;               /* CTAs per GQA group: ceil(G / hc) */
  int tpc;                  /* tokens per CTA: BM / hc */
  int nat, nlt;             /* anchor and local row tiles: ceil(A / tpc), ceil(B / tpc) */
  int local_keys;
  int hgroup;               /* CTA order: head slots interleaved per row tile (1..Hkv*gsplit), see get_work */
  uint32_t q_bytes;         /* bytes one Q load brings: D/64 boxes of 64 x hc x tpc bf16 */
  apb_attn::AttnParams a;   /* the call as every kernel sees it: scale_log2, and the raw pointers and
                             * shape of the rows the epilogue recomputes */
};

/* The CTA's rows and key tiles (APB.md 3.6), the same in every thread. */
struct Work {
  int hk, g0, hcount;       /* KV head, first query head of the group, heads used (<= hc) */
  int r0, ntok, row0;       /* first token in its segment, tokens, first q/o row */
  bool anchor;
  int nP, nA, nB, ntiles;   /* key tiles from P, A and the row segment's own keys */
};

/* CTA order: the nh = Hkv * gsplit head slots go in groups of hgroup; within a group the row tiles run
 * longest first (rank 0 is the longest: local row tiles from the last one down, then anchor row tiles
 * from the last one down), the group's head slots interleaved per rank. hgroup = nh is rank-major over
 * all heads; hgroup = 1 (the default) hands out one KV head's row tiles before the next head's, so
 * the CTAs running at one time mostly read one head's keys, which then stay in L2. Keys: anchor rows
 * see anchor keys [0, r0 + ntok) with the causal rule; local rows see all of P, all of A, then
 * (local_keys) local keys [0, r0 + ntok) causally. */
__device__ __forceinline__ Work get_work(const HopParams &p) {
  Work w;
  const int nh = p.Hkv * p.gsplit, nr = p.nlt + p.nat;
  const int b = (int)blockIdx.x, per = nr * p.hgroup, grp = b / per, base = grp * p.hgroup;
  const int cnt = min(p.hgroup, nh - base), in = b - grp * per;
  const int hs = base + in % cnt;
  const int rank = in / cnt;
  w.hk = hs / p.gsplit;
  w.g0 = (hs % p.gsplit) * p.hc;
  w.hcount = min(p.hc, p.G - w.g0);
  w.anchor = rank >= p.nlt;
  w.r0 = (w.anchor ? p.nat - 1 - (rank - p.nlt) : p.nlt - 1 - rank) * p.tpc;
  w.ntok = min(p.tpc, (w.anchor ? p.A : p.B) - w.r0);
  w.row0 = w.anchor ? w.r0 : p.A + w.r0;
  const int nown = w.r0 + w.ntok;
  w.nP = w.anchor ? 0 : (p.P + kBN - 1) / kBN;
  w.nA = ((w.anchor ? nown : p.A) + kBN - 1) / kBN;
  w.nB = !w.anchor && p.local_keys ? (nown + kBN - 1) / kBN : 0;
  w.ntiles = w.nP + w.nA + w.nB;
  return w;
}

/* Key tile t of the CTA's list: segment, first key in it, valid keys (may exceed BN), causal rule. */
struct Tile {
  int seg, ks, nvalid;
  bool causal;
};

__device__ __forceinline__ Tile get_tile(const HopParams &p, const Work &w, int t) {
  Tile x;
  if (t < w.nP) {
    x.seg = 0, x.ks = t * kBN, x.nvalid = p.P - x.ks, x.causal = false;
  } else if (t < w.nP + w.nA) {
    x.seg = 1, x.ks = (t - w.nP) * kBN;
    x.nvalid = (w.anchor ? w.r0 + w.ntok : p.A) - x.ks;
    x.causal = w.anchor;
  } else {
    x.seg = 2, x.ks = (t - w.nP - w.nA) * kBN, x.nvalid = w.r0 + w.ntok - x.ks, x.causal = true;
  }
  return x;
}

/* ================================================================ PTX wrappers */

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

/* Make the initialised barriers visible to the TMA unit (the async proxy) before anyone uses them. */
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/* Arrive once and add `bytes` to the transaction count the current phase waits for. */
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

/* Wait until the phase of parity `parity` has completed. A fresh barrier is in phase 0, so waiting on
 * parity 1 returns at once (how the producer's first pass over the empty barriers goes through). No
 * time-out: a trap in this loop (tried) makes ptxas share one block between the producer and consumer
 * register regions, which then get 168 registers, spill, and serialize their wgmma. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok = 0;
  while (!ok)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
}

/* One 3-D box of a tensor map -> shared memory at dst, completing `bar`'s transaction bytes. */
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(dst),
      "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

/* Named barriers for the ping-pong of the two consumer warpgroups (id 0 is __syncthreads). */
__device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* Keep the compiler from moving reads or writes of these registers across a wgmma wait: the asm
 * claims to modify them, so later uses depend on it, and it is ordered after the (volatile) wait. */
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; i++)
#pragma unroll
    for (int e = 0; e < 4; e++) asm volatile("" : "+r"(r[i][e])::"memory");
}

/* Shared-memory matrix descriptor for wgmma, 128-byte swizzle (layout type 1 in bits 62-63). addr: the
 * start (16-byte units, bits 0-13); lbo: leading-dimension byte offset (bits 16-29; for the MN-major V
 * operand the distance between 64-column blocks, ignored for K-major swizzled operands); sbo: stride
 * byte offset (bits 32-45), the distance between groups of 8 rows = 8 x 128 bytes. Base offset 0: every
 * start lies in a 1024-byte aligned block's first 128-byte row, plus k x 32 bytes for a K step. */
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo) {
  return (uint64_t)((addr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)(1024u >> 4) << 32) | (1ull << 62);
}

/* d [64] (+)= A B, one m64n128k16 step with A and B in shared memory, both K-major: S = Q K^T. The
 * first step of a product passes accumulate = 0 (d = A B). */
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}

/* d [64] += A B, one m64n128k16 step with A in registers (bf16 P fragments) and B in shared memory,
 * MN-major (V is stored [keys, D], so imm-trans-b = 1): O += P V. */
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

/* d [32] += A B, one m64n64k16 step with A in registers (bf16 P fragments) and B in shared memory,
 * MN-major (V is stored [keys, D], so imm-trans-b = 1): O += P V. */
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

/* ================================================================ consumer pieces
 *
 * Accumulator layout (wgmma m64nN, f32; per warpgroup): warp w holds rows 16w..16w+15, and element
 * 4j + e of a thread is row 16w + lane/4 + 8*(e/2), column 8j + 2*(lane%4) + e%2. S (m64n128) has 64
 * such floats per thread, O (m64nD) D/2. The A fragment of a register-sourced wgmma k step (16 keys)
 * has the same shape, so the P fragments of keys 16kk..16kk+15 are the bf16 pairs of
 * s[8kk..8kk+7]. */

/* S = Q K^T for one tile: q_base is this warpgroup's 64 rows of Q, k_base the tile's stage. */
template <int D>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_base, uint32_t k_base) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; kk++) {
    const uint32_t in_blk = (uint32_t)(kk & 3) * 32; /* 16 bf16 = 32 bytes per K step */
    const uint64_t da = sw128_desc(q_base + (uint32_t)(kk >> 2) * kQBlk + in_blk, 16);
    const uint64_t db = sw128_desc(k_base + (uint32_t)(kk >> 2) * kKVBlk + in_blk, 16);
    wgmma_ss_n128(s, da, db, kk > 0);
  }
  wgmma_commit();
}

/* O += P V for one tile: V [BN keys, D] at v_base; k step kk covers keys 16kk.. (2 groups of 8 rows of
 * 128 bytes: 2048 bytes), and the 64-column blocks of D lie kKVBlk apart (the descriptor's LBO). */
template <int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pf)[kBN / 16][4], uint32_t v_base) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBN / 16; kk++) {
    const uint64_t dv = sw128_desc(v_base + (uint32_t)kk * 2048u, kKVBlk);
    if constexpr (D == 128) wgmma_rs_n128(o, pf[kk], dv);
    else wgmma_rs_n64(o, pf[kk], dv);
  }
  wgmma_commit();
}

/* Whether tile x needs the per-element mask: it crosses its segment's end, or (causal) some key lies
 * past the first row's token. */
__device__ __forceinline__ bool needs_mask(const Tile &x, int r0) {
  return x.nvalid < kBN || (x.causal && x.ks + kBN - 1 > r0);
}

/* Mask where needed, then the online softmax of one S tile in base 2: m' = max(m, scale log2e max(s));
 * s := 2^(s scale log2e - m'); l := l alpha + sum(s); alpha = 2^(m - m') is what O must be multiplied
 * by. A row with no visible key so far keeps m = -inf and uses 0 as its reference (no inf - inf). The
 * sums are this thread's partial sums (its 32 columns of each row); the quad adds them at the end. */
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             const Tile &x, int r0, const int (&rtok)[2], int lane, float sl2) {
  if (needs_mask(x, r0)) {
    int lim[2]; /* columns >= lim are masked: past the segment, or past the row's own token */
#pragma unroll
    for (int h = 0; h < 2; h++) lim[h] = x.causal ? min(x.nvalid, r0 + rtok[h] - x.ks + 1) : x.nvalid;
#pragma unroll
    for (int j = 0; j < kBN / 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (8 * j + 2 * (lane & 3) + (e & 1) >= lim[e >> 1]) s[4 * j + e] = -INFINITY;
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBN / 8; j++) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mnew = fmaxf(m[h], mx * sl2);
    const float muse = mnew == -INFINITY ? 0.0f : mnew;
    alpha[h] = apb_fast_exp2(m[h] - muse);
    m[h] = mnew;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBN / 8; j++)
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; e++) {
        s[4 * j + e] = apb_fast_exp2(fmaf(s[4 * j + e], sl2, -muse));
        sum += s[4 * j + e];
      }
    l[h] = l[h] * alpha[h] + sum;
  }
}

template <int N>
__device__ __forceinline__ void rescale_o(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < N / 4; j++) {
    o[4 * j] *= alpha[0], o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1], o[4 * j + 3] *= alpha[1];
  }
}

/* P (bf16) A fragments from the exponentiated S: k step kk takes columns 16kk..16kk+15. */
__device__ __forceinline__ void to_p(uint32_t (&pf)[kBN / 16][4], const float (&s)[64]) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; kk++) {
    pf[kk][0] = apb_pack_bf16x2(s[8 * kk], s[8 * kk + 1]);
    pf[kk][1] = apb_pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
    pf[kk][2] = apb_pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
    pf[kk][3] = apb_pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

/* ================================================================ the kernel
 *
 * grid: (nlt + nat) * Hkv * gsplit CTAs of 384 threads, HopCfg<D, S>::kSmem bytes of dynamic shared memory,
 * one CTA per SM. Barriers in shared memory after V: [0] Q full, [1+s] K full, [1+S+s] V full,
 * [1+2S+s] K empty, [1+3S+s] V empty. Full barriers: one arrival (the producer's expect_tx) plus the
 * TMA bytes; empty barriers: all 256 consumer threads. Tile t uses stage t % S in phase (t / S) & 1. */
template <int D, int V, int S>
__global__ void __launch_bounds__(kThreads, 1) attn_hopper_kernel(const __grid_constant__ HopParams p) {
  typedef HopCfg<D, S> C;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t sQ = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sK = sQ + C::kSmemQ, sV = sK + S * C::kSmemKV, bars = sV + S * C::kSmemKV;
  const uint32_t barQ = bars;
  auto full_k = [&](int s) { return bars + 8u * (uint32_t)(1 + s); };
  auto full_v = [&](int s) { return bars + 8u * (uint32_t)(1 + S + s); };
  auto empty_k = [&](int s) { return bars + 8u * (uint32_t)(1 + 2 * S + s); };
  auto empty_v = [&](int s) { return bars + 8u * (uint32_t)(1 + 3 * S + s); };
  const Work w = get_work(p);

  if (threadIdx.x == 0) {
    mbar_init(barQ, 1);
#pragma unroll
    for (int s = 0; s < S; s++) {
      mbar_init(full_k(s), 1), mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), 256), mbar_init(empty_v(s), 256);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    /* ---------------- producer warpgroup: one thread issues every copy */
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      mbar_expect_tx(barQ, p.q_bytes);
#pragma unroll
      for (int db = 0; db < C::kDB; db++)
        tma_load_3d(sQ + (uint32_t)db * kQBlk, &p.tq, barQ, db * 64, w.hk * p.G + w.g0, w.row0);
      for (int t = 0; t < w.ntiles; t++) {
        const int st = t % S;
        const uint32_t ph = (uint32_t)(t / S) & 1u;
        const Tile x = get_tile(p, w, t);
        mbar_wait(empty_k(st), ph ^ 1u);
        mbar_expect_tx(full_k(st), C::kSmemKV);
#pragma unroll
        for (int db = 0; db < C::kDB; db++)
          tma_load_3d(sK + (uint32_t)st * C::kSmemKV + (uint32_t)db * kKVBlk, &p.tk[x.seg], full_k(st), db * 64,
                      w.hk, x.ks);
        mbar_wait(empty_v(st), ph ^ 1u);
        mbar_expect_tx(full_v(st), C::kSmemKV);
#pragma unroll
        for (int db = 0; db < C::kDB; db++)
          tma_load_3d(sV + (uint32_t)st * C::kSmemKV + (uint32_t)db * kKVBlk, &p.tv[x.seg], full_v(st), db * 64,
                      w.hk, x.ks);
      }
    }
  } else {
    /* ---------------- consumer warpgroups c = 0, 1: M rows 64c..64c+63 */
    setmaxnreg_inc<kConsumerRegs>();
    const int ct = (int)threadIdx.x - 128, c = ct >> 7, warp = (ct >> 5) & 3, lane = ct & 31;
    const int mrow = 64 * c + 16 * warp + (lane >> 2); /* this thread's rows: mrow, mrow + 8 */
    const int rtok[2] = {mrow / p.hc, (mrow + 8) / p.hc};
    const uint32_t qb = sQ + (uint32_t)c * 64u * 128u;
    const float sl2 = p.a.scale_log2;
    const int nt = w.ntiles;
    float o[D / 2], s[64], m[2], l[2], alpha[2];
    uint32_t pf[kBN / 16][4];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; i++) s[i] = 0.0f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
    alpha[0] = alpha[1] = 1.0f;
    mbar_wait(barQ, 0);

    if constexpr (V == 1) {
      /* S, softmax, P V one after another; the other consumer warpgroup fills the gaps. */
      for (int t = 0; t < nt; t++) {
        const int st = t % S;
        const uint32_t ph = (uint32_t)(t / S) & 1u;
        mbar_wait(full_k(st), ph);
        issue_qk<D>(s, qb, sK + (uint32_t)st * C::kSmemKV);
        wgmma_wait<0>();
        fence_regs(s);
        mbar_arrive(empty_k(st));
        softmax_tile(s, m, l, alpha, get_tile(p, w, t), w.r0, rtok, lane, sl2);
        rescale_o(o, alpha);
        to_p(pf, s);
        mbar_wait(full_v(st), ph);
        issue_pv<D>(o, pf, sV + (uint32_t)st * C::kSmemKV);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pf);
        mbar_arrive(empty_v(st));
      }
    } else if (nt > 0) {
      /* Software pipelined: iteration t issues S(t) and PV(t-1), then does the softmax of S(t) while
       * PV(t-1) runs. With V == 3 the two warpgroups take turns issuing (named barrier 1 + c is
       * warpgroup c's turn): sections are the first S and each iteration's S + PV pair, n in all; warpgroup
       * 1 opens the first turn for warpgroup 0 and skips its own last hand-over, so every barrier gets
       * exactly as many arrivals as waits. */
      if constexpr (V == 3)
        if (c == 1) named_arrive(1, 256);
      mbar_wait(full_k(0), 0);
      if constexpr (V == 3) named_sync(1 + c, 256);
      issue_qk<D>(s, qb, sK);
      if constexpr (V == 3)
        if (!(c == 1 && nt == 1)) named_arrive(2 - c, 256);
      wgmma_wait<0>();
      fence_regs(s);
      mbar_arrive(empty_k(0));
      softmax_tile(s, m, l, alpha, get_tile(p, w, 0), w.r0, rtok, lane, sl2);
      to_p(pf, s);
      for (int t = 1; t < nt; t++) {
        const int st = t % S, sp = (t - 1) % S;
        mbar_wait(full_k(st), (uint32_t)(t / S) & 1u);
        if constexpr (V == 3) named_sync(1 + c, 256);
        issue_qk<D>(s, qb, sK + (uint32_t)st * C::kSmemKV);
        rescale_o(o, alpha); /* O holds P V up to tile t-2: bring it to tile t-1's reference */
        mbar_wait(full_v(sp), (uint32_t)((t - 1) / S) & 1u);
        issue_pv<D>(o, pf, sV + (uint32_t)sp * C::kSmemKV);
        if constexpr (V == 3)
          if (!(c == 1 && t == nt - 1)) named_arrive(2 - c, 256);
        wgmma_wait<1>(); /* S(t) done; PV(t-1) may still run */
        fence_regs(s);
        mbar_arrive(empty_k(st));
        softmax_tile(s, m, l, alpha, get_tile(p, w, t), w.r0, rtok, lane, sl2);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pf);
        mbar_arrive(empty_v(sp));
        to_p(pf, s);
      }
      rescale_o(o, alpha);
      const int sl = (nt - 1) % S;
      mbar_wait(full_v(sl), (uint32_t)((nt - 1) / S) & 1u);
      issue_pv<D>(o, pf, sV + (uint32_t)sl * C::kSmemKV);
      wgmma_wait<0>();
      fence_regs(o);
      mbar_arrive(empty_v(sl));
    }

    /* Epilogue: o = O / l (0 for a row with no visible key), lse = m ln 2 + ln l (-inf then). Each row
     * slot notes whether it stored an Inf or NaN, for the repair below. */
    unsigned bad = 0; /* bit h: row slot h stored an Inf or NaN */
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float lt = l[h];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int mr = mrow + 8 * h, tok = rtok[h], g = mr - tok * p.hc;
      if (tok >= w.ntok || g >= w.hcount) continue;
      const float inv = lt == 0.0f ? 0.0f : 1.0f / lt; /* a NaN l stays NaN */
      const int head = w.hk * p.G + w.g0 + g;
      bf16 *orow = p.o + ((int64_t)(w.row0 + tok) * p.Hq + head) * D + 2 * (lane & 3);
      bool nf = false;
#pragma unroll
      for (int j = 0; j < D / 8; j++) {
        const float v0 = o[4 * j + 2 * h] * inv, v1 = o[4 * j + 2 * h + 1] * inv;
        nf |= !isfinite(v0) || !isfinite(v1);
        *(uint32_t *)(orow + 8 * j) = apb_pack_bf16x2(v0, v1);
      }
      if (p.lse && (lane & 3) == 0)
        p.lse[(int64_t)head * p.T + w.row0 + tok] = lt == 0.0f ? -INFINITY : m[h] * 0.69314718055994531f + logf(lt);
      bad |= (unsigned)nf << h;
    }
    /* A row made non-finite by the P V product of a key it does not see: recomputed exactly
     * (gpu/attn_row.cuh). The CTA's causal tiles load the row segment's keys up to a whole tile past
     * its last token (TMA fills zeros only past the segment's end). */
    auto row_of = [&](int s, int64_t *row, int *head) {
      const int mr = mrow + 8 * s, tok = mr / p.hc;
      *row = w.row0 + tok, *head = w.hk * p.G + w.g0 + (mr - tok * p.hc);
    };
    const int ntown = w.anchor ? w.nA : w.nB;
    const int64_t kend = min((int64_t)ntown * kBN, (int64_t)(w.anchor ? p.A : p.B));
    apb_attn::attn_repair_rows<2>(p.a, w.hk, w.anchor, w.r0, kend, bad, row_of, lane);
  }
}

/* ================================================================ host side */

typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                  const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The driver's cuTensorMapEncodeTiled, through the runtime (libapb links libcudart, not libcuda). */
apb_status get_encoder(EncodeTiledFn *fn, apb_error *err) {
  apb_status st = APB_OK;
  void *f = NULL;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  *fn = NULL;
  APB_CU(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
  if (q != cudaDriverEntryPointSuccess || !f)
    return apb_error_set(err, APB_EDEVICE, "cuda_attn hopper: the driver has no cuTensorMapEncodeTiled (query result %d)",
                         (int)q);
  *fn = (EncodeTiledFn)f;
done:
  return st;
}

/* A bf16 array [len, heads, D] as the 3-D tensor (D, heads, len), boxes of (64, bh, bt), 128-byte swizzle,
 * zeros outside. */
apb_status encode_map(EncodeTiledFn fn, CUtensorMap *m, const void *base, int D, int heads, int64_t len, int bh,
                      int bt, const char *what, apb_error *err) {
  const cuuint64_t dims[3] = {(cuuint64_t)D, (cuuint64_t)heads, (cuuint64_t)len};
  const cuuint64_t strides[2] = {(cuuint64_t)D * 2, (cuuint64_t)heads * (cuuint64_t)D * 2};
  const cuuint32_t box[3] = {64, (cuuint32_t)bh, (cuuint32_t)bt};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUresult r = fn(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void *)base, dims, strides, box, estr,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return apb_error_set(err, APB_EDEVICE, "cuda_attn hopper: cuTensorMapEncodeTiled(%s: %lld x %d x %d, box %d x %d) "
                         "failed with CUresult %d", what, (long long)len, heads, D, bt, bh, (int)r);
  return APB_OK;
}

template <int D, int V, int S>
apb_status launch(const HopParams &hp, unsigned blocks, cudaStream_t stream, apb_error *err) {
  apb_status st = APB_OK;
  APB_CU(cudaFuncSetAttribute(attn_hopper_kernel<D, V, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              (int)HopCfg<D, S>::kSmem));
  attn_hopper_kernel<D, V, S><<<blocks, kThreads, HopCfg<D, S>::kSmem, stream>>>(hp);
  APB_CU_LAUNCH();
done:
  return st;
}

/* Variants 1-3 with the base stage count (2 at D = 128, 4 at D = 64); 4 and 5 are 2 and 3 with one
 * more stage (at D = 128 that fills the 227 KiB of shared memory). */
template <int D>
apb_status launch_variant(const HopParams &hp, unsigned blocks, int variant, cudaStream_t stream, apb_error *err) {
  constexpr int S = D == 64 ? 4 : 2;
  switch (variant) {
  case 1: return launch<D, 1, S>(hp, blocks, stream, err);
  case 2: return launch<D, 2, S>(hp, blocks, stream, err);
  case 3: return launch<D, 3, S>(hp, blocks, stream, err);
  case 4: return launch<D, 2, S + 1>(hp, blocks, stream, err);
  default: return launch<D, 3, S + 1>(hp, blocks, stream, err);
  }
}

} /* namespace */

/* APB_CUDA_HOPPER_HEAD_GROUP=k (read at each call): head slots interleaved per row tile. Unset or
 * empty: 1 (one KV head at a time, 1.5-2.8% faster than interleaving all of them at 32K-128K on an
 * H100, docs/performance.md); 0, or more than nh: nh (rank-major over all heads, the first order);
 * else k. A tuning knob for `bench gpu-attn`; every order computes the same tiles the same way, so
 * results are bitwise the same (tests/check_gpu_attn.c). */
static int hop_head_group(int nh) {
  const char *e = getenv("APB_CUDA_HOPPER_HEAD_GROUP");
  const long k = e && *e ? strtol(e, NULL, 10) : 1;
  return k <= 0 || k > nh ? nh : (int)k;
}

apb_status apb_cuda_attn_hopper(const apb_cuda_attn_args *x, const apb_attn::AttnParams &a, int variant,
                                void *stream, int *done, apb_error *err) {
  apb_status st = APB_OK;
  *done = 0;
  if (variant < 0 || variant > 5) return apb_error_set(err, APB_EINVAL, "cuda_attn hopper: variant %d", variant);
  if (variant == 0) variant = x->D == 64 ? kBestVariantD64 : kBestVariantD128;
  if (x->dtype != APB_DT_BF16 || (x->D != 64 && x->D != 128)) return APB_OK;
  /* int coordinates and offsets in the kernel; far beyond any shape that fits a GPU today. */
  const int64_t lim = INT_MAX / 2;
  if (x->P > lim || x->A > lim || x->B > lim || x->A + x->B > lim || x->A + x->B == 0) return APB_OK;
  const void *ptrs[] = {x->q, x->kp, x->vp, x->ka, x->va, x->kb, x->vb, x->o};
  for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
    if (ptrs[i] && !apb_aligned16(ptrs[i])) return APB_OK;
  int dev = 0, major = 0, minor = 0;
  APB_CU(cudaGetDevice(&dev));
  APB_CU(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  APB_CU(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (major != 9 || minor != 0) return APB_OK; /* sm_90a code runs on compute capability 9.0 only */
  {
    HopParams hp;
    memset(&hp, 0, sizeof hp);
    hp.o = (bf16 *)x->o, hp.lse = x->lse;
    hp.P = (int)x->P, hp.A = (int)x->A, hp.B = (int)x->B, hp.T = (int)(x->A + x->B);
    hp.Hq = x->Hq, hp.Hkv = x->Hkv, hp.G = x->Hq / x->Hkv;
    hp.hc = hp.G < kBM ? hp.G : kBM;
    hp.gsplit = (hp.G + hp.hc - 1) / hp.hc;
    hp.tpc = kBM / hp.hc;
    hp.nat = (hp.A + hp.tpc - 1) / hp.tpc;
    hp.nlt = (hp.B + hp.tpc - 1) / hp.tpc;
    hp.local_keys = x->local_keys;
    hp.hgroup = hop_head_group(hp.Hkv * hp.gsplit);
    hp.a = a;
    hp.q_bytes = (uint32_t)(x->D * hp.hc * hp.tpc * 2);
    const int64_t blocks = ((int64_t)hp.nat + hp.nlt) * hp.Hkv * hp.gsplit;
    if (blocks > INT_MAX)
      return apb_error_set(err, APB_EINVAL, "cuda_attn hopper: %lld CTAs, more than one grid holds", (long long)blocks);
    EncodeTiledFn enc = NULL;
    st = get_encoder(&enc, err);
    if (st != APB_OK) return st;
    st = encode_map(enc, &hp.tq, x->q, x->D, x->Hq, hp.T, hp.hc, hp.tpc, "q", err);
    const void *kseg[3] = {x->kp, x->ka, x->local_keys ? x->kb : NULL};
    const void *vseg[3] = {x->vp, x->va, x->local_keys ? x->vb : NULL};
    const int64_t len[3] = {x->P, x->A, x->B};
    for (int g = 0; g < 3 && st == APB_OK; g++) {
      if (len[g] == 0 || !kseg[g] || !vseg[g]) continue; /* never listed as a tile */
      st = encode_map(enc, &hp.tk[g], kseg[g], x->D, x->Hkv, len[g], 1, kBN, "k", err);
      if (st == APB_OK) st = encode_map(enc, &hp.tv[g], vseg[g], x->D, x->Hkv, len[g], 1, kBN, "v", err);
    }
    if (st != APB_OK) return st;
    cudaStream_t s = (cudaStream_t)stream;
    st = x->D == 64 ? launch_variant<64>(hp, (unsigned)blocks, variant, s, err)
                    : launch_variant<128>(hp, (unsigned)blocks, variant, s, err);
    if (st == APB_OK) *done = 1;
  }
done:
  return st;
}
