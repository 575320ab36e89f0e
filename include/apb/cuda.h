/* apb/cuda.h: the CUDA side of the library, as seen from C.
 *
 * Everything here exists in every build. Without the CUDA backend compiled in (configure found no
 * CUDA or got --without-cuda) each call returns APB_ENODEVICE and says so in err. With it, calls that
 * need a GPU return APB_ENODEVICE when the driver reports none, so that tests can exit 77 (SKIP).
 */
#ifndef APB_CUDA_H
#define APB_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "apb/backend.h"
#include "apb/dtype.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the library was built with the CUDA backend. */
int apb_cuda_built(void);

/* Number of usable CUDA devices in *n (0 when the driver finds none: then APB_ENODEVICE with a
 * message such as "no CUDA device: cudaGetDeviceCount said ..."). Never aborts, also without a
 * driver installed. */
apb_status apb_cuda_device_count(int *n, apb_error *err);

/* One line describing device `dev` (name, SMs, memory, compute capability) into buf. */
apb_status apb_cuda_device_describe(int dev, char *buf, size_t len, apb_error *err);

/* The largest head dimension the CUDA kernels take (attention, LSE merge); a model with a larger one
 * runs on the CPU backends only. */
#define APB_CUDA_MAX_HEAD_DIM 256

/* ---------------------------------------------------------------- attention (gpu/attn.cu)
 *
 * APB's segmented attention for one host (shared/APB.md 3.6) on the GPU: the same function, the same
 * layouts and the same visibility rules as apb_attn_naive in apb/attn.h (anchor row i: anchor keys
 * 0..i; local row j: all P, all A, local keys 0..j when local_keys; a row with no visible key gets
 * o = 0 and lse = -inf; scale 0 means 1/sqrt(D)). Every pointer is a DEVICE pointer, token-major; the
 * three key segments stay separate arrays (never copied into one buffer). o and lse must not overlap
 * q or the keys and values (a row that an unseen key's Inf or NaN value poisoned is recomputed from q
 * after o was stored, docs/gpu-attention.md). Legend as apb/attn.h. */
typedef struct apb_cuda_attn_args {
  int64_t P, A, B;        /* passing keys, anchor rows/keys, local rows (and local keys if local_keys) */
  int Hq, Hkv, D;         /* Hq % Hkv == 0; 1 <= D <= APB_CUDA_MAX_HEAD_DIM */
  int local_keys;         /* 1: local rows see local keys causally; 0: P and A only (kb/vb unused) */
  float scale;            /* softmax scale; 0 means 1/sqrt(D) */
  apb_dtype dtype;        /* storage of q, k, v, o: APB_DT_BF16 or APB_DT_F32 (SIMPLE only) */
  const void *q;          /* [A+B, Hq, D] anchor rows first, then local rows */
  const void *kp, *vp;    /* [P, Hkv, D] passing block (may be NULL when P == 0) */
  const void *ka, *va;    /* [A, Hkv, D] anchor (may be NULL when A == 0) */
  const void *kb, *vb;    /* [B, Hkv, D] local block (may be NULL when B == 0 or local_keys == 0) */
  void *o;                /* [A+B, Hq, D] out, in dtype */
  float *lse;             /* [Hq, A+B] out, fp32 natural log; may be NULL */
} apb_cuda_attn_args;

typedef enum apb_cuda_attn_impl {
  APB_CUDA_ATTN_SIMPLE = 0, /* one warp per (row, head), fp32 CUDA-core math; F32 or BF16; any D */
  APB_CUDA_ATTN_TC = 1,     /* tensor cores (mma.sync bf16, fp32 accumulate), BF16 only; best variant */
  APB_CUDA_ATTN_TC_W16 = 2, /* TC forcing 16 rows per warp (64 per CTA); for tests and benchmarks */
  APB_CUDA_ATTN_TC_W32 = 3, /* TC forcing 32 rows per warp (128 per CTA; D <= 128, else as W16) */
  APB_CUDA_ATTN_HOPPER = 4, /* sm_90a kernel (gpu/attn_hopper.cu: wgmma, TMA, warp specialization), BF16
                             * only, D 64 and 128; best variant (V2 at D 128, V3 at D 64). Other D, a
                             * GPU other than compute capability 9.0, or pointers not 16-byte aligned
                             * run TC instead. Its CTA order (environment APB_CUDA_HOPPER_HEAD_GROUP=k:
                             * k KV heads' row tiles interleaved, default 1, 0 all) changes speed only,
                             * never a bit of the results */
  APB_CUDA_ATTN_HOPPER_V1 = 5, /* HOPPER forcing its first version (S, softmax, P V in turn); tests, benchmarks */
  APB_CUDA_ATTN_HOPPER_V2 = 6, /* HOPPER forcing softmax/P V overlap without warpgroup ping-pong; likewise */
  APB_CUDA_ATTN_HOPPER_V3 = 7, /* HOPPER forcing overlap plus ping-pong of the two consumer warpgroups */
  APB_CUDA_ATTN_HOPPER_V4 = 8, /* HOPPER_V2 with one more K/V pipeline stage */
  APB_CUDA_ATTN_HOPPER_V5 = 9  /* HOPPER_V3 with one more K/V pipeline stage */
} apb_cuda_attn_impl;

/* Enqueue the attention on `stream` (a cudaStream_t; NULL is the default stream) and return without
 * waiting. Shapes are validated as apb_attn_validate does (APB_EINVAL naming the field); dtype other
 * than F32/BF16, D > 256, or a TC impl with F32 storage give APB_EUNSUPPORTED. TC with D % 8 != 0 or
 * with a pointer that is not 16-byte aligned runs SIMPLE instead (same results, slower). Launch errors
 * give APB_EDEVICE; faults inside the kernel show at the next synchronizing call. */
apb_status apb_cuda_attn(const apb_cuda_attn_args *a, apb_cuda_attn_impl impl, void *stream, apb_error *err);

/* ---------------------------------------------------------------- device memory and timing
 * Thin wrappers so that C code compiled without CUDA headers (src/, tests/) can drive the kernels.
 * Without the CUDA backend every call returns APB_ENODEVICE (apb_cuda_free does nothing). */

/* *p = cudaMalloc(bytes) (at least 1 byte, 256-byte aligned); *p = NULL on failure. */
apb_status apb_cuda_malloc(void **p, size_t bytes, apb_error *err);
/* cudaFree; NULL is allowed. */
void apb_cuda_free(void *p);
/* cudaMemcpy in whichever direction the two pointers say (unified addressing); synchronous. */
apb_status apb_cuda_memcpy(void *dst, const void *src, size_t bytes, apb_error *err);
/* cudaMemset of bytes bytes to the value `byte` (0xFF poisons f32 and bf16 with NaN). */
apb_status apb_cuda_memset(void *p, int byte, size_t bytes, apb_error *err);
/* cudaDeviceSynchronize: also where faults of earlier kernels are reported. */
apb_status apb_cuda_synchronize(apb_error *err);
/* x [n] of dtype F32 or BF16 := uniform [-amp, amp) from a counter-based hash of (seed, index), on
 * `stream`. For benchmarks: fast, reproducible, never zeros. */
apb_status apb_cuda_fill_uniform(void *x, apb_dtype dt, size_t n, uint64_t seed, float amp, void *stream,
                                 apb_error *err);

/* A pair of CUDA events: start and stop are recorded on a stream, ms waits for stop and gives the
 * elapsed milliseconds between them. */
typedef struct apb_cuda_timer apb_cuda_timer;
apb_status apb_cuda_timer_create(apb_cuda_timer **t, apb_error *err);
void apb_cuda_timer_destroy(apb_cuda_timer *t);
apb_status apb_cuda_timer_start(apb_cuda_timer *t, void *stream, apb_error *err);
apb_status apb_cuda_timer_stop(apb_cuda_timer *t, void *stream, apb_error *err);
apb_status apb_cuda_timer_ms(apb_cuda_timer *t, float *ms, apb_error *err);

/* ---------------------------------------------------------------- the backend's stream
 * For the NCCL communicator (gpu/comm_nccl.c), which enqueues collectives on the stream of the CUDA
 * backend instance they belong to, so that they are ordered with its kernels without a host sync.
 * Defined by the CUDA backend (gpu/backend_cuda.cu). */
struct apb_backend;
/* The cudaStream_t (as void *) on which CUDA backend instance be enqueues all of its work; never NULL
 * for a CUDA instance (each owns its stream). NULL for a backend that is not CUDA's, and always NULL
 * without the CUDA backend. */
void *apb_cuda_backend_stream(struct apb_backend *be);

/* ---------------------------------------------------------------- the CUDA compute backend (gpu/)
 * apb_backend_cuda (apb/backend.h) makes an instance; these reach what only the CUDA backend has. */

/* Choose the attention kernel of a CUDA backend instance (default: APB_CUDA_ATTN_HOPPER for BF16
 * storage, APB_CUDA_ATTN_SIMPLE for F32, or the environment variable APB_CUDA_ATTN = simple | tc | tc_w16 |
 * tc_w32 | hopper | hopper_v1 .. hopper_v5 read when the instance is made). APB_EINVAL for another
 * backend, an unknown impl, or a tensor-core impl on an F32 instance. */
apb_status apb_backend_cuda_set_attn(apb_backend *be, apb_cuda_attn_impl impl, apb_error *err);

/* The input checks that only the device can make (embed: token ids inside the vocabulary; topk: no NaN
 * score among the candidates; gather: indices inside [0, T)) run beside the op without a host wait;
 * the op skips bad entries and the failure, naming the op, the first bad element and its value, is
 * returned by the next sync, download or download_f32 of the instance (default: on = 0, or the
 * environment variable APB_CUDA_SYNC_CHECKS=1 read when the instance is made). on = 1 makes each such
 * op wait for its check and return the failure itself, having written nothing: slower (one host
 * round trip per call), for debugging. APB_EINVAL when be is not a CUDA instance. */
apb_status apb_backend_cuda_set_sync_checks(apb_backend *be, int on, apb_error *err);

/* Backend memory that free gives back stays with the instance (default on = 1, or off when the
 * environment variable APB_CUDA_CACHE=0 is set as the instance is made): the next alloc of exactly
 * that size takes the block again instead of calling cudaMalloc, so a repeated run of one shape
 * allocates nothing (without it a warm prefill of the llama3-8b shape spent 1.2-3.5 ms per layer
 * before its first layer on 4 H200s, nearly all of it in cudaMalloc; apb at 128K: 1.728 s with
 * APB_CUDA_CACHE=0, 1.648 s with the cache). An allocation that CUDA or the device's budget
 * (apb_cuda_set_mem_limit) refuses releases the cached blocks of every instance on the device
 * (simulated hosts share one) and tries again; destroy releases the
 * instance's. Work queued on the instance's stream before a free still runs before any use of the block by a
 * later op of the instance (one stream keeps order); another stream that uses a block (a
 * communicator's) must have been waited for before the free, as with the cache off. apb_backend_mem
 * counts what is held, not what is cached: apb_backend_cuda_cached says that. on = 0 releases the
 * cache now and makes free return blocks to CUDA (after waiting for the stream). Not to be called
 * while another thread uses the instance. APB_EINVAL when be is not a CUDA instance. */
apb_status apb_backend_cuda_set_cache(apb_backend *be, int on, apb_error *err);

/* Bytes in be's cache of freed blocks (apb_backend_cuda_set_cache). APB_EINVAL when be is not a CUDA
 * instance or bytes is NULL. */
apb_status apb_backend_cuda_cached(const apb_backend *be, size_t *bytes, apb_error *err);

/* A budget for the device memory that the CUDA backend holds for data on device `device`: alloc's
 * blocks in use or cached, weights and op scratch, summed over every instance on the device (simulated
 * hosts share one). bytes = 0 means no budget, the default. An allocation that would pass it is
 * refused as one that CUDA refuses: the caches of freed blocks of every instance on the device are
 * released, it is tried once more, and then it fails with APB_ENOMEM and a message naming the limit.
 * For seeing whether a run fits a smaller GPU (an 80 GB H100 on an H200: 80G less the context and
 * workspaces below) and for leaving room to other processes. Not counted: the CUDA context, cuBLAS's
 * workspace (32 MiB per instance on Hopper), the per-instance tables, NCCL's buffers, memory taken
 * outside the backend. A limit below what is held frees nothing; the next allocation that would pass
 * it fails. The environment variable APB_CUDA_MEM_LIMIT (bytes, with an optional K, M, G or T suffix,
 * powers of 1024; e.g. 80G) sets the limit of the device each time an instance is made on it; an
 * unparsable value makes that creation fail with APB_EINVAL. APB_EINVAL for a device that does not
 * exist, APB_ENODEVICE without CUDA. */
apb_status apb_cuda_set_mem_limit(int device, size_t bytes, apb_error *err);

/* What the CUDA backend holds for data on `device` now (as counted by apb_cuda_set_mem_limit: in use
 * and cached, every instance) into *held, and the device's limit into *limit (0: none); either may be
 * NULL. Errors as apb_cuda_set_mem_limit. */
apb_status apb_cuda_mem_held(int device, size_t *held, size_t *limit, apb_error *err);

/* apb_bmodel_generate_config for a CUDA instance (apb/backend.h says what it makes). APB_EINVAL when
 * be is not a CUDA instance or scorer_width is outside 0 .. 2^20; apb_config_check's error when the
 * configuration fails it; APB_ENOMEM when the device memory does not suffice. */
apb_status apb_cuda_bmodel_generate_config(apb_backend *be, const apb_model_config *cfg, int scorer_width,
                                           uint64_t seed, apb_bmodel **out, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_CUDA_H */
