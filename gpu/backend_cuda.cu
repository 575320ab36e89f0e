/* gpu/backend_cuda.cu: the "cuda" compute backend of apb/backend.h: instances, memory, weights, the
 * linear op (cuBLAS) and the attention op (apb_cuda_attn of gpu/attn.cu).
 *
 * What it is:
 *   - an instance per (device, act): its own non-blocking cudaStream and a cuBLAS handle bound to it;
 *     every op of the instance is enqueued on that stream in submission order, `sync` waits for it.
 *     Each op first makes the instance's device current on the calling thread (simulated hosts call
 *     from their own threads). act is BF16 (storage bf16, fp32 accumulation) or F32 (fp32 everywhere,
 *     TF32 never used: CUBLAS_COMPUTE_32F with CUBLAS_DEFAULT_MATH);
 *   - memory: alloc is cudaMalloc (256-byte aligned); free gives the block to the instance's cache, from
 *     which an alloc of exactly that size takes it again (a warm run of one shape allocates nothing),
 *     or, with the cache off (apb_backend_cuda_set_cache, APB_CUDA_CACHE=0), waits for the stream and
 *     cudaFree's. Every allocation for data (alloc, weights, op scratch) goes through dev_malloc, which
 *     keeps the device's count and budget (apb_cuda_set_mem_limit, APB_CUDA_MEM_LIMIT) and, when the
 *     budget or CUDA says no, releases the caches of all instances on the device and tries again; memset,
 *     copy, copy2d are stream-ordered (copy/copy2d reject overlapping ranges with APB_EINVAL, as the
 *     CPU does); upload/download move raw bytes and return when the host buffer may be reused or
 *     read; upload_f32/download_f32 convert on the device (fp32 staging chunks in op scratch and a
 *     conversion kernel; bf16 rounding is round-to-nearest-even, as apb_f32_to_bf16);
 *   - accounting for `mem`: bytes requested by alloc, weight bytes, and op scratch while an op holds
 *     it (cudaMallocAsync/cudaFreeAsync on the stream), as current and high-water mark;
 *   - weights: w [N, K] in act (converted once on the device), bias [N] in fp32 holding bf16-rounded
 *     values in BF16 mode, so the bias epilogue adds in fp32 and rounds the sum once;
 *   - linear: y [T, N] = x [T, K] W^T by cublasGemmEx (BF16 in and out with CUBLAS_COMPUTE_32F and
 *     reductions kept in fp32, or F32 in and out). With a bias the sum must be rounded once: in F32
 *     mode the GEMM writes y and an epilogue kernel adds the bias in place; in BF16 mode the GEMM
 *     writes fp32 row chunks to scratch and the epilogue adds the bias and rounds to bf16 into y; the
 *     handle has a workspace of its own of the size cuBLAS recommends (32 MiB on Hopper, 4 MiB before);
 *   - attn: apb_cuda_attn on the instance's stream with the instance's kernel choice: environment
 *     variable APB_CUDA_ATTN = simple | tc | tc_w16 | tc_w32 | hopper | hopper_v1 .. hopper_v5 at
 *     creation, or apb_backend_cuda_set_attn; default hopper for BF16 (TC where the Hopper kernel
 *     does not apply), simple for F32 (the tensor-core
 *     kernels need bf16 storage).
 * The other ops are in gpu/ops.cu and gpu/select.cu; the shared declarations in gpu/cuda_int.h.
 *
 * Inputs only the device can check (embed's ids, topk's NaN scores, gather's indices) are checked by
 * a kernel beside the op that reports into the instance's records (cu_chk_rec, gpu/cuda_int.h); sync,
 * download and download_f32 return the first failure since the last one was returned, unless
 * synchronous checks were asked for (each op then waits for its check).
 *
 * What it deliberately is not: a general allocator (blocks are reused at exactly their size only;
 * scratch comes from CUDA's stream-ordered pool), a graph-captured or fused layer (each op is one or a
 * few kernels), or a place that prints or exits.
 * Every CUDA and cuBLAS call is checked (APB_CU, APB_CUBLAS) and every launch is followed by
 * APB_CU_LAUNCH.
 *
 * Tested in tests/check_gpu_agree.c: every op against the naive oracle (and, in BF16 mode, against the
 * CPU's bf16 emulation), memory ops and accounting, validation messages, and whole runs.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <new>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apb/attn.h"
#include "cuda_int.h"

/* fp32 elements per staging chunk of upload_f32 / download_f32 / weight_create (64 MiB). */
#define CU_STAGE_ELEMS ((size_t)1 << 24)
/* fp32 elements of the BF16 linear-with-bias scratch (row chunks of at most this many outputs). */
#define CU_BIAS_ELEMS ((size_t)1 << 24)

/* ---------------------------------------------------------------- instance helpers */

apb_status cu_enter(cu_be *c, apb_error *err) {
  apb_status st = APB_OK;
  APB_CU(cudaSetDevice(c->dev));
done:
  return st;
}

static void count_add(cu_be *c, size_t bytes) {
  size_t now = c->cur.fetch_add(bytes) + bytes;
  size_t pk = c->peak.load();
  while (now > pk && !c->peak.compare_exchange_weak(pk, now)) {
  }
}

static void count_sub(cu_be *c, size_t bytes) { c->cur.fetch_sub(bytes); }

/* ---------------------------------------------------------------- device memory and its budget */

/* The live instances, so that an allocation that fails can release the caches of every instance on its
 * device (simulated hosts share one GPU, each with its own instance), not only its own; and the budget
 * record of each device that ever had an instance. Lock order: live().mu, then an instance's mu. */
struct cu_live {
  std::mutex mu;
  std::vector<cu_be *> all;
  std::vector<cu_dev *> devs;
};
static cu_live &live(void) { /* never destroyed: an instance may outlive the library's static objects */
  static cu_live *l = new cu_live();
  return *l;
}

/* The budget record of device dev, made on first use (never freed); NULL when out of host memory. */
static cu_dev *cu_dev_of(int dev) {
  std::lock_guard<std::mutex> g(live().mu);
  for (cu_dev *d : live().devs)
    if (d->dev == dev) return d;
  cu_dev *d = new (std::nothrow) cu_dev();
  if (!d) return NULL;
  d->dev = dev;
  d->held.store(0);
  d->limit.store(0);
  try {
    live().devs.push_back(d);
  } catch (...) {
    delete d;
    return NULL;
  }
  return d;
}

static void cache_release_device(int dev);

/* Device memory for data: cudaMalloc, or cudaMallocAsync on the instance's stream (async), inside the
 * device's budget. When the budget or the device has no room, the caches of every instance on the device
 * are released and it tries once more. *over = 1 when the budget said no. *p = NULL on failure. */
static cudaError_t dev_malloc(cu_be *c, void **p, size_t bytes, int async, int *over) {
  cu_dev *d = c->dv;
  *p = NULL;
  for (int round = 0;; round++) {
    cudaError_t e = cudaErrorMemoryAllocation;
    const size_t lim = d->limit.load();
    const size_t was = d->held.fetch_add(bytes);
    *over = lim && (was + bytes > lim || was + bytes < was);
    if (*over) {
      d->held.fetch_sub(bytes);
    } else {
      e = async ? cudaMallocAsync(p, bytes, c->stream) : cudaMalloc(p, bytes);
      if (e != cudaSuccess) {
        d->held.fetch_sub(bytes);
        cudaGetLastError();
        *p = NULL;
      }
    }
    if (e != cudaErrorMemoryAllocation || round == 1) return e;
    cache_release_device(c->dev);
  }
}

/* Give back what dev_malloc took (async: cudaFreeAsync on the instance's stream). */
static void dev_free(cu_be *c, void *p, size_t bytes, int async) {
  if (!p) return;
  if (async)
    cudaFreeAsync(p, c->stream);
  else
    cudaFree(p);
  c->dv->held.fetch_sub(bytes);
}

/* The error of a dev_malloc that failed: "<op>: cannot allocate <bytes><what> on device d: <why>". */
static apb_status dev_malloc_error(const cu_be *c, cudaError_t e, int over, const char *op, size_t bytes,
                                   const char *what, apb_error *err) {
  if (over)
    return apb_error_set(err, APB_ENOMEM,
                         "%s: cannot allocate %zu bytes%s on device %d: that would pass the device's memory limit of "
                         "%zu bytes (APB_CUDA_MEM_LIMIT or apb_cuda_set_mem_limit), of which apb holds %zu",
                         op, bytes, what, c->dev, c->dv->limit.load(), c->dv->held.load());
  return apb_error_set(err, e == cudaErrorMemoryAllocation ? APB_ENOMEM : APB_EDEVICE,
                       "%s: cannot allocate %zu bytes%s on device %d: %s (%s)", op, bytes, what, c->dev,
                       cudaGetErrorString(e), cudaGetErrorName(e));
}

apb_status cu_scratch(cu_be *c, size_t bytes, const char *op, void **p, apb_error *err) {
  *p = NULL;
  if (bytes == 0) return APB_OK;
  int over = 0;
  cudaError_t e = dev_malloc(c, p, bytes, 1, &over);
  if (e != cudaSuccess || over) return dev_malloc_error(c, e, over, op, bytes, " of device scratch", err);
  count_add(c, bytes);
  return APB_OK;
}

void cu_scratch_free(cu_be *c, void *p, size_t bytes) {
  if (!p) return;
  dev_free(c, p, bytes, 1);
  count_sub(c, bytes);
}

/* ---------------------------------------------------------------- device-side input checks */

/* More checked calls than this between two syncs make the next checked call collect first. */
#define CU_CHK_MAX_CALLS 65536

apb_status cu_chk_begin(cu_be *c, int kind, long long bound, long long aux, cu_chk_rec **rec,
                        unsigned long long *seq, apb_error *err) {
  apb_status st = APB_OK;
  if (c->chk_calls.size() >= CU_CHK_MAX_CALLS) {
    APB_CU(cudaStreamSynchronize(c->stream));
    APB_TRY(cu_chk_collect(c, err));
  }
  try {
    c->chk_calls.push_back(cu_chk_call{++c->chk_seq, kind, bound, aux});
  } catch (...) {
    return apb_error_set(err, APB_ENOMEM, "out of host memory for the device-side check list");
  }
  *rec = c->chk + kind;
  *seq = c->chk_seq;
done:
  return st;
}

apb_status cu_chk_end(cu_be *c, apb_error *err) {
  apb_status st = APB_OK;
  if (!c->sync_checks) return APB_OK;
  APB_CU(cudaStreamSynchronize(c->stream));
  st = cu_chk_collect(c, err);
done:
  return st;
}

apb_status cu_chk_collect(cu_be *c, apb_error *err) {
  apb_status st = APB_OK;
  cu_chk_rec h[CU_CHK_KINDS];
  int k = -1;
  const cu_chk_call *call = NULL;
  unsigned long long index = 0;
  int value = 0;
  if (c->chk_calls.empty()) return APB_OK;
  APB_CU(cudaMemcpyAsync(h, c->chk, sizeof h, cudaMemcpyDeviceToHost, c->stream));
  APB_CU(cudaStreamSynchronize(c->stream));
  for (int i = 0; i < CU_CHK_KINDS; i++)
    if (h[i].seq != ~0ull && (k < 0 || h[i].seq < h[k].seq)) k = i;
  if (k < 0) {
    c->chk_calls.clear();
    return APB_OK;
  }
  for (const cu_chk_call &x : c->chk_calls)
    if (x.seq == h[k].seq) call = &x;
  index = h[k].key >> 32, value = (int)(unsigned)(h[k].key & 0xffffffffull);
  {
    const char *when = c->sync_checks ? "" : " (found on the device; reported at the next sync of the instance)";
    const long long bound = call ? call->bound : -1, aux = call ? call->aux : 1;
    if (k == CU_CHK_EMBED)
      st = apb_error_set(err, APB_EINVAL, "embed: ids[%llu]=%d is out of the vocabulary [0, %lld)%s", index, value,
                         bound, when);
    else if (k == CU_CHK_TOPK)
      st = apb_error_set(err, APB_ENONFINITE, "topk: score[%llu, %llu] is NaN; NaN scores are never selected%s",
                         bound > 0 ? index / (unsigned long long)bound : 0ull,
                         bound > 0 ? index % (unsigned long long)bound : index, when);
    else
      st = apb_error_set(err, APB_EINVAL, "gather: idx[%llu, %llu]=%d is out of [0, T=%lld)%s",
                         aux > 0 ? index / (unsigned long long)aux : 0ull,
                         aux > 0 ? index % (unsigned long long)aux : index, value, bound, when);
  }
  /* consumed: clear the records for the next failure (stream-ordered before any later check) */
  c->chk_calls.clear();
  if (cudaMemsetAsync(c->chk, 0xFF, sizeof h, c->stream) != cudaSuccess) cudaGetLastError();
done:
  return st;
}

/* ---------------------------------------------------------------- validation */

apb_status cu_weight_check(const cu_be *c, apb_error *err, const char *op, const char *arg, const apb_bweight *w,
                           int64_t N, int64_t K) {
  apb_status st = apb_bc_weight(err, op, arg, w != NULL, w ? w->N : 0, w ? w->K : 0, N, K);
  if (st) return st;
  if (w->dt != c->be.act)
    return apb_error_set(err, APB_EINVAL, "%s: weight %s is stored as %s but this instance computes in %s", op, arg,
                         apb_dtype_name(w->dt), apb_dtype_name(c->be.act));
  return APB_OK;
}

/* ---------------------------------------------------------------- memory ops */

/* Free every block of the cache, after the instance's queued work (which may still use them). */
static void cache_release(cu_be *c) {
  std::multimap<size_t, void *> blocks;
  {
    std::lock_guard<std::mutex> g(c->mu);
    blocks.swap(c->idle);
  }
  if (blocks.empty()) return;
  cudaSetDevice(c->dev);
  cudaStreamSynchronize(c->stream);
  for (auto &b : blocks) dev_free(c, b.second, b.first, 0);
}

static void cache_release_device(int dev) {
  std::lock_guard<std::mutex> g(live().mu);
  for (cu_be *x : live().all)
    if (x->dev == dev) cache_release(x);
  cudaSetDevice(dev);
}

/* A cached block of exactly `bytes` into *p (and the allocation table); 0 when there is none. Work
 * queued on the stream before the block was freed still runs first: the stream keeps order. */
static int cache_take(cu_be *c, size_t bytes, void **p) {
  std::lock_guard<std::mutex> g(c->mu);
  if (!c->cache) return 0;
  auto it = c->idle.find(bytes);
  if (it == c->idle.end()) return 0;
  try {
    c->sizes[it->second] = bytes;
  } catch (...) {
    return 0; /* no room in the table: cudaMalloc's path reports it */
  }
  *p = it->second;
  c->idle.erase(it);
  return 1;
}

static apb_status cu_alloc(apb_backend *be, size_t bytes, void **p, apb_error *err) {
  if (!p) return apb_error_set(err, APB_EINVAL, "alloc: p is NULL");
  *p = NULL;
  if (bytes == 0) return APB_OK;
  cu_be *c = cu_of(be);
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  if (cache_take(c, bytes, p)) {
    count_add(c, bytes);
    return APB_OK;
  }
  int over = 0;
  cudaError_t e = dev_malloc(c, p, bytes, 0, &over);
  if (e != cudaSuccess || over) return dev_malloc_error(c, e, over, "alloc", bytes, "", err);
  try {
    std::lock_guard<std::mutex> g(c->mu);
    c->sizes[*p] = bytes;
  } catch (...) {
    dev_free(c, *p, bytes, 0);
    *p = NULL;
    return apb_error_set(err, APB_ENOMEM, "alloc: out of host memory for the allocation table");
  }
  count_add(c, bytes);
  return APB_OK;
}

static void cu_free(apb_backend *be, void *p) {
  if (!p) return;
  cu_be *c = cu_of(be);
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> g(c->mu);
    auto it = c->sizes.find(p);
    if (it != c->sizes.end()) {
      bytes = it->second;
      c->sizes.erase(it);
      if (c->cache) {
        try {
          c->idle.emplace(bytes, p);
          count_sub(c, bytes);
          return;
        } catch (...) { /* no room to remember it: released below */
        }
      }
    }
  }
  /* The stream's queued kernels may still use p: wait for them before the memory goes. Errors cannot
   * be reported from free (it returns nothing); a sticky fault shows at the next checked call. */
  cudaSetDevice(c->dev);
  cudaStreamSynchronize(c->stream);
  if (bytes)
    dev_free(c, p, bytes, 0);
  else
    cudaFree(p); /* not alloc's: counted nowhere */
  count_sub(c, bytes);
}

static apb_status cu_memset(apb_backend *be, void *p, int byte, size_t bytes, apb_error *err) {
  if (bytes == 0) return APB_OK;
  if (!p) return apb_error_set(err, APB_EINVAL, "memset: p is NULL (%zu bytes)", bytes);
  cu_be *c = cu_of(be);
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  APB_CU(cudaMemsetAsync(p, byte, bytes, c->stream));
done:
  return st;
}

static apb_status cu_copy(apb_backend *be, void *dst, const void *src, size_t bytes, apb_error *err) {
  const char *op = "copy";
  if (bytes == 0 || dst == src) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "dst", dst)) || (st = apb_bc_need(err, op, "src", src)) ||
      (st = apb_bc_disjoint(err, op, "dst", dst, bytes, "src", src, bytes)))
    return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  APB_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
done:
  return st;
}

static apb_status cu_copy2d(apb_backend *be, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                            size_t rows, apb_error *err) {
  apb_status st;
  if (width == 0 || rows == 0) return APB_OK;
  if ((st = apb_bc_copy2d(err, dst, dpitch, src, spitch, width, rows))) return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  APB_CU(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, cudaMemcpyDeviceToDevice, c->stream));
done:
  return st;
}

/* Host -> device raw bytes; returns once the host buffer may be reused (whatever kind of memory it is). */
static apb_status cu_upload(apb_backend *be, void *dst, const void *host, size_t bytes, apb_error *err) {
  const char *op = "upload";
  if (bytes == 0) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "dst", dst)) || (st = apb_bc_need(err, op, "host", host))) return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  APB_CU(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, c->stream));
  APB_CU(cudaStreamSynchronize(c->stream));
done:
  return st;
}

/* Device -> host raw bytes, after every op submitted before it. */
static apb_status cu_download(apb_backend *be, void *host, const void *src, size_t bytes, apb_error *err) {
  const char *op = "download";
  if (bytes == 0) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "host", host)) || (st = apb_bc_need(err, op, "src", src))) return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  APB_CU(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, c->stream));
  APB_CU(cudaStreamSynchronize(c->stream));
  st = cu_chk_collect(c, err);
done:
  return st;
}

/* dst [n] (device, dt) = host fp32 [n], converted on the device in staging chunks; waits at the end. */
static apb_status put_f32(cu_be *c, const char *op, void *dst, apb_dtype dt, const float *host, size_t n,
                          apb_error *err) {
  apb_status st = APB_OK;
  void *stage = NULL;
  const size_t chunk = n < CU_STAGE_ELEMS ? n : CU_STAGE_ELEMS;
  if (dt == APB_DT_F32) {
    APB_CU(cudaMemcpyAsync(dst, host, n * sizeof(float), cudaMemcpyHostToDevice, c->stream));
  } else {
    APB_TRY(cu_scratch(c, chunk * sizeof(float), op, &stage, err));
    for (size_t i = 0; i < n; i += chunk) {
      const size_t m = n - i < chunk ? n - i : chunk;
      APB_CU(cudaMemcpyAsync(stage, host + i, m * sizeof(float), cudaMemcpyHostToDevice, c->stream));
      APB_TRY(cu_convert(c, (char *)dst + i * apb_dtype_size(dt), dt, stage, APB_DT_F32, m, err));
    }
  }
  APB_CU(cudaStreamSynchronize(c->stream));
done:
  cu_scratch_free(c, stage, chunk * sizeof(float));
  return st;
}

static apb_status cu_upload_f32(apb_backend *be, void *dst, const float *host, size_t n, apb_error *err) {
  const char *op = "upload_f32";
  if (n > SIZE_MAX / sizeof(float)) return apb_error_set(err, APB_EINVAL, "%s: n=%zu elements is too large", op, n);
  if (n == 0) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "dst", dst)) || (st = apb_bc_need(err, op, "host", host))) return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  return put_f32(c, op, dst, be->act, host, n, err);
}

static apb_status cu_download_f32(apb_backend *be, float *host, const void *src, size_t n, apb_error *err) {
  const char *op = "download_f32";
  if (n > SIZE_MAX / sizeof(float)) return apb_error_set(err, APB_EINVAL, "%s: n=%zu elements is too large", op, n);
  if (n == 0) return APB_OK;
  apb_status st;
  if ((st = apb_bc_need(err, op, "host", host)) || (st = apb_bc_need(err, op, "src", src))) return st;
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  void *stage = NULL;
  const size_t chunk = n < CU_STAGE_ELEMS ? n : CU_STAGE_ELEMS;
  if (be->act == APB_DT_F32) {
    APB_CU(cudaMemcpyAsync(host, src, n * sizeof(float), cudaMemcpyDeviceToHost, c->stream));
  } else {
    APB_TRY(cu_scratch(c, chunk * sizeof(float), op, &stage, err));
    for (size_t i = 0; i < n; i += chunk) {
      const size_t m = n - i < chunk ? n - i : chunk;
      APB_TRY(cu_convert(c, stage, APB_DT_F32, (const char *)src + i * apb_dtype_size(be->act), be->act, m, err));
      APB_CU(cudaMemcpyAsync(host + i, stage, m * sizeof(float), cudaMemcpyDeviceToHost, c->stream));
    }
  }
  APB_CU(cudaStreamSynchronize(c->stream));
  st = cu_chk_collect(c, err);
done:
  cu_scratch_free(c, stage, chunk * sizeof(float));
  return st;
}

static apb_status cu_sync(apb_backend *be, apb_error *err) {
  cu_be *c = cu_of(be);
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  APB_CU(cudaStreamSynchronize(c->stream));
  st = cu_chk_collect(c, err);
done:
  return st;
}

/* Timing marks: an event recorded on the instance's stream (no host wait). */
static apb_status cu_mark(apb_backend *be, void **m, apb_error *err) {
  cu_be *c = cu_of(be);
  cudaEvent_t e = NULL;
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  *m = NULL;
  APB_CU(cudaEventCreate(&e));
  APB_CU(cudaEventRecord(e, c->stream));
  *m = e, e = NULL;
done:
  if (e) cudaEventDestroy(e);
  return st;
}

static apb_status cu_mark_elapsed(apb_backend *be, void *a, void *b, double *seconds, apb_error *err) {
  cu_be *c = cu_of(be);
  float ms = 0;
  apb_status st = cu_enter(c, err);
  if (st != APB_OK) return st;
  if (!a || !b) return apb_error_set(err, APB_EINVAL, "mark_elapsed: %s mark is NULL", !a ? "the first" : "the second");
  const cudaError_t e = cudaEventElapsedTime(&ms, (cudaEvent_t)a, (cudaEvent_t)b);
  if (e != cudaSuccess) {
    cudaGetLastError(); /* not left behind for the next launch check to find */
    return apb_error_set(err, APB_EDEVICE, "mark_elapsed: cudaEventElapsedTime on device %d: %s (%s)", c->dev,
                         cudaGetErrorString(e), cudaGetErrorName(e));
  }
  *seconds = 1e-3 * (double)ms;
  return APB_OK;
}

static void cu_mark_free(apb_backend *be, void *m) {
  (void)be;
  if (m) cudaEventDestroy((cudaEvent_t)m);
}

/* ---------------------------------------------------------------- weights */

apb_status cu_weight_new(cu_be *c, int64_t N, int64_t K, int has_bias, apb_bweight **out, apb_error *err) {
  const char *op = "weight_create";
  apb_status st = APB_OK;
  *out = NULL;
  if ((st = apb_bc_len(err, op, "N", N, 1)) || (st = apb_bc_len(err, op, "K", K, 1))) return st;
  if (N > INT64_MAX / 8 / K)
    return apb_error_set(err, APB_EINVAL, "%s: [%lld, %lld] is too large", op, (long long)N, (long long)K);
  apb_bweight *bw = (apb_bweight *)calloc(1, sizeof *bw);
  if (!bw) return apb_error_set(err, APB_ENOMEM, "%s: cannot allocate the weight descriptor", op);
  bw->N = N, bw->K = K, bw->dt = c->be.act;
  const size_t wb = (size_t)N * (size_t)K * apb_dtype_size(c->be.act), bb = has_bias ? (size_t)N * sizeof(float) : 0;
  int over = 0;
  cudaError_t e = dev_malloc(c, &bw->w, wb, 0, &over);
  if (e == cudaSuccess && !over && bb) e = dev_malloc(c, (void **)&bw->b, bb, 0, &over);
  if (e != cudaSuccess || over) {
    const size_t failed = bw->w ? bb : wb; /* the bias's when the matrix's succeeded */
    dev_free(c, bw->w, wb, 0);
    free(bw);
    char what[96];
    snprintf(what, sizeof what, " for a [%lld, %lld] weight%s", (long long)N, (long long)K,
             failed == bb && bb != wb ? "'s bias" : "");
    return dev_malloc_error(c, e, over, op, failed, what, err);
  }
  bw->bytes = wb + bb;
  count_add(c, bw->bytes);
  *out = bw;
  return st;
}

static void cu_weight_destroy(apb_backend *be, apb_bweight *w) {
  if (!w) return;
  cu_be *c = cu_of(be);
  cudaSetDevice(c->dev);
  cudaStreamSynchronize(c->stream);
  const size_t bb = w->b ? (size_t)w->N * sizeof(float) : 0;
  dev_free(c, w->w, w->bytes - bb, 0);
  dev_free(c, w->b, bb, 0);
  count_sub(c, w->bytes);
  free(w);
}

static apb_status cu_weight_create(apb_backend *be, const float *w, int64_t N, int64_t K, const float *bias,
                                   apb_bweight **out, apb_error *err) {
  const char *op = "weight_create";
  apb_status st;
  if ((st = apb_bc_need(err, op, "out", out))) return st;
  *out = NULL;
  if ((st = apb_bc_need(err, op, "w", w))) return st;
  cu_be *c = cu_of(be);
  apb_bweight *bw = NULL;
  if ((st = cu_enter(c, err)) || (st = cu_weight_new(c, N, K, bias != NULL, &bw, err))) return st;
  APB_TRY(put_f32(c, op, bw->w, bw->dt, w, (size_t)N * (size_t)K, err));
  if (bias) {
    APB_TRY(put_f32(c, op, bw->b, APB_DT_F32, bias, (size_t)N, err));
    if (bw->dt == APB_DT_BF16) {
      APB_TRY(cu_round_bf16_f32(c, bw->b, (size_t)N, err));
      APB_CU(cudaStreamSynchronize(c->stream));
    }
  }
  *out = bw;
  bw = NULL;
done:
  if (bw) cu_weight_destroy(be, bw);
  return st;
}

/* ---------------------------------------------------------------- linear */

apb_status cu_gemm_nt(cu_be *c, int64_t m, int64_t n, int64_t K, const void *x, const void *w, void *y, apb_dtype yt,
                      int64_t ldy, apb_error *err) {
  apb_status st = APB_OK;
  const float one = 1.0f, zero = 0.0f;
  const cudaDataType at = c->be.act == APB_DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cudaDataType ct = yt == APB_DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  if (m > INT_MAX || n > INT_MAX || K > INT_MAX || ldy > INT_MAX)
    return apb_error_set(err, APB_EINVAL, "gemm: [%lld x %lld] x [%lld]^T (ldy %lld) exceeds cuBLAS's int range",
                         (long long)m, (long long)K, (long long)n, (long long)ldy);
  if (m == 0) return APB_OK;
  /* Row-major y [m, n] is column-major y^T [n x m]: y^T = W x^T, W (row-major [n, K]) read as the
   * column-major [K x n] matrix W^T and transposed, x (row-major [m, K]) as column-major [K x m]. */
  APB_CUBLAS(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)m, (int)K, &one, w, at, (int)K, x, at,
                          (int)K, &zero, y, ct, (int)ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
done:
  return st;
}

/* y [rows, N] (act) = src [rows, N] (fp32, row stride ld) + b [N], rounded once; src may be y (F32). */
template <typename TO>
__global__ void bias_kernel(const float *src, int64_t ld, const float *b, TO *y, int64_t rows, int64_t N) {
  const int64_t total = rows * N;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / N, n = e % N;
    st_f(y + e, src[r * ld + n] + b[n]);
  }
}

static apb_status launch_bias(cu_be *c, const float *src, int64_t ld, const float *b, void *y, int64_t rows, int64_t N,
                              apb_error *err) {
  apb_status st = APB_OK;
  const unsigned g = cu_blocks(rows * N, 256);
  if (c->be.act == APB_DT_BF16)
    bias_kernel<apb_bf16><<<g, 256, 0, c->stream>>>(src, ld, b, (apb_bf16 *)y, rows, N);
  else
    bias_kernel<float><<<g, 256, 0, c->stream>>>(src, ld, b, (float *)y, rows, N);
  APB_CU_LAUNCH();
done:
  return st;
}

static apb_status cu_linear(apb_backend *be, const apb_bweight *w, const void *x, int64_t T, void *y, apb_error *err) {
  const char *op = "linear";
  cu_be *c = cu_of(be);
  apb_status st;
  if ((st = cu_weight_check(c, err, op, "w", w, -1, -1)) ||
      (st = apb_bc_linear(err, T, w->N, w->K, apb_act_size(be), x, y)) || T == 0)
    return st;
  const int64_t N = w->N, K = w->K;
  const size_t es = apb_act_size(be);
  if ((st = cu_enter(c, err))) return st;
  void *tmp = NULL;
  int64_t chunk = 0;
  if (!w->b) {
    APB_TRY(cu_gemm_nt(c, T, N, K, x, w->w, y, be->act, N, err));
  } else if (be->act == APB_DT_F32) {
    APB_TRY(cu_gemm_nt(c, T, N, K, x, w->w, y, APB_DT_F32, N, err));
    APB_TRY(launch_bias(c, (const float *)y, N, w->b, y, T, N, err));
  } else {
    chunk = (int64_t)(CU_BIAS_ELEMS / (size_t)N);
    if (chunk < 1) chunk = 1;
    if (chunk > T) chunk = T;
    APB_TRY(cu_scratch(c, (size_t)chunk * (size_t)N * sizeof(float), op, &tmp, err));
    for (int64_t r0 = 0; r0 < T; r0 += chunk) {
      const int64_t m = T - r0 < chunk ? T - r0 : chunk;
      APB_TRY(cu_gemm_nt(c, m, N, K, (const char *)x + (size_t)(r0 * K) * es, w->w, tmp, APB_DT_F32, N, err));
      APB_TRY(launch_bias(c, (const float *)tmp, N, w->b, (char *)y + (size_t)(r0 * N) * es, m, N, err));
    }
  }
done:
  cu_scratch_free(c, tmp, (size_t)chunk * (size_t)N * sizeof(float));
  return st;
}

/* ---------------------------------------------------------------- attention */

static apb_status cu_attn(apb_backend *be, const apb_battn_args *a, apb_error *err) {
  const char *op = "attn";
  if (!a) return apb_error_set(err, APB_EINVAL, "%s: args is NULL", op);
  apb_attn_args h;
  memset(&h, 0, sizeof h);
  h.P = a->P, h.A = a->A, h.B = a->B, h.Hq = a->Hq, h.Hkv = a->Hkv, h.D = a->D;
  h.local_keys = a->local_keys, h.scale = a->scale;
  h.q = (const float *)a->q, h.kp = (const float *)a->kp, h.vp = (const float *)a->vp;
  h.ka = (const float *)a->ka, h.va = (const float *)a->va, h.kb = (const float *)a->kb;
  h.vb = (const float *)a->vb, h.o = (float *)a->o, h.lse = a->lse;
  apb_status st = apb_attn_validate(&h, err);
  if (st != APB_OK) return apb_error_set(err, st, "%s", op);
  if (a->A + a->B > 0 && !a->lse)
    return apb_error_set(err, APB_EINVAL, "%s: lse is NULL; the backend op requires it ([Hq, A+B] = [%d, %lld])", op,
                         a->Hq, (long long)(a->A + a->B));
  cu_be *c = cu_of(be);
  if ((st = cu_enter(c, err))) return st;
  apb_cuda_attn_args x;
  memset(&x, 0, sizeof x);
  x.P = a->P, x.A = a->A, x.B = a->B, x.Hq = a->Hq, x.Hkv = a->Hkv, x.D = a->D;
  x.local_keys = a->local_keys, x.scale = a->scale, x.dtype = be->act;
  x.q = a->q, x.kp = a->kp, x.vp = a->vp, x.ka = a->ka, x.va = a->va, x.kb = a->kb, x.vb = a->vb;
  x.o = a->o, x.lse = a->lse;
  st = apb_cuda_attn(&x, c->attn, (void *)c->stream, err);
  if (st != APB_OK) return apb_error_set(err, st, "%s", op);
  return APB_OK;
}

/* ---------------------------------------------------------------- instance */

static void cu_mem(const apb_backend *be, size_t *current, size_t *peak) {
  const cu_be *c = cu_of(be);
  if (current) *current = c->cur.load();
  if (peak) *peak = c->peak.load();
}

static void cu_destroy(apb_backend *be) {
  if (!be) return;
  cu_be *c = cu_of(be);
  {
    std::lock_guard<std::mutex> g(live().mu);
    std::vector<cu_be *> &all = live().all;
    for (size_t i = 0; i < all.size(); i++)
      if (all[i] == c) {
        all.erase(all.begin() + (ptrdiff_t)i);
        break;
      }
  }
  cudaSetDevice(c->dev);
  if (c->stream) {
    cache_release(c);
    cudaStreamSynchronize(c->stream);
  }
  if (c->rope_dev) cudaFree(c->rope_dev);
  if (c->chk) cudaFree(c->chk);
  if (c->blas) cublasDestroy(c->blas);
  if (c->blas_ws) cudaFree(c->blas_ws);
  if (c->stream) cudaStreamDestroy(c->stream);
  delete c;
}

static const apb_backend_ops cu_ops = {
    cu_destroy,
    cu_alloc,
    cu_free,
    cu_memset,
    cu_copy,
    cu_copy2d,
    cu_upload,
    cu_download,
    cu_upload_f32,
    cu_download_f32,
    cu_sync,
    cu_weight_create,
    cu_weight_destroy,
    cu_embed,
    cu_rmsnorm,
    cu_linear,
    cu_split_rope,
    cu_swiglu,
    cu_add,
    cu_attn,
    cu_merge,
    cu_score_retaining,
    cu_maxpool,
    cu_topk,
    cu_gather,
    cu_mem,
    cu_mark,
    cu_mark_elapsed,
    cu_mark_free,
};

/* The attention kernels by name (apb/cuda.h), for APB_CUDA_ATTN. */
static const struct {
  const char *name;
  apb_cuda_attn_impl impl;
} attn_names[] = {
    {"simple", APB_CUDA_ATTN_SIMPLE},       {"tc", APB_CUDA_ATTN_TC},
    {"tc_w16", APB_CUDA_ATTN_TC_W16},       {"tc_w32", APB_CUDA_ATTN_TC_W32},
    {"hopper", APB_CUDA_ATTN_HOPPER},       {"hopper_v1", APB_CUDA_ATTN_HOPPER_V1},
    {"hopper_v2", APB_CUDA_ATTN_HOPPER_V2}, {"hopper_v3", APB_CUDA_ATTN_HOPPER_V3},
    {"hopper_v4", APB_CUDA_ATTN_HOPPER_V4}, {"hopper_v5", APB_CUDA_ATTN_HOPPER_V5},
};
#define N_ATTN_NAMES (sizeof attn_names / sizeof attn_names[0])

/* APB_CUDA_ATTN: NULL or empty gives the default for act; an unknown name is APB_EINVAL. */
static apb_status attn_from_env(apb_dtype act, apb_cuda_attn_impl *impl, apb_error *err) {
  const char *s = getenv("APB_CUDA_ATTN");
  /* bf16: the Hopper kernel (it hands shapes it does not take, and non-Hopper GPUs, to TC) */
  *impl = act == APB_DT_BF16 ? APB_CUDA_ATTN_HOPPER : APB_CUDA_ATTN_SIMPLE;
  if (!s || !*s) return APB_OK;
  size_t i = 0;
  while (i < N_ATTN_NAMES && strcmp(s, attn_names[i].name) != 0) i++;
  if (i == N_ATTN_NAMES)
    return apb_error_set(err, APB_EINVAL,
                         "backend cuda: APB_CUDA_ATTN=%s is not one of simple, tc, tc_w16, tc_w32, hopper, "
                         "hopper_v1 .. hopper_v5", s);
  *impl = attn_names[i].impl;
  if (*impl != APB_CUDA_ATTN_SIMPLE && act != APB_DT_BF16)
    return apb_error_set(err, APB_EINVAL,
                         "backend cuda: APB_CUDA_ATTN=%s needs bf16 storage; the F32 backend runs simple only", s);
  return APB_OK;
}

/* s in full as a byte count: digits with an optional K, M, G or T suffix (powers of 1024); 0 on success. */
static int parse_bytes(const char *s, size_t *out) {
  if (!s || *s < '0' || *s > '9') return -1;
  errno = 0;
  char *end;
  const unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s) return -1;
  int shift = 0;
  switch (*end) {
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  default: break;
  }
  if (*end || v > (unsigned long long)SIZE_MAX >> shift) return -1;
  *out = (size_t)v << shift;
  return 0;
}

extern "C" apb_status apb_backend_cuda(int device, apb_dtype act, apb_backend **out, apb_error *err) {
  if (!out) return apb_error_set(err, APB_EINVAL, "backend cuda: out is NULL");
  *out = NULL;
  if (act != APB_DT_BF16 && act != APB_DT_F32)
    return apb_error_set(err, APB_EINVAL, "backend cuda: act %s; the CUDA backend stores BF16 or F32",
                         apb_dtype_name(act));
  apb_cuda_attn_impl impl;
  apb_status st = attn_from_env(act, &impl, err);
  if (st != APB_OK) return st;
  int n = 0;
  if ((st = apb_cuda_device_count(&n, err))) return st;
  if (device < 0 || device >= n)
    return apb_error_set(err, APB_EINVAL, "backend cuda: device %d does not exist (%d device%s)", device, n,
                         n == 1 ? "" : "s");
  cu_be *c = new (std::nothrow) cu_be();
  if (!c) return apb_error_set(err, APB_ENOMEM, "backend cuda: cannot allocate the instance");
  c->be.name = "cuda";
  c->be.act = act;
  c->be.device = device;
  c->be.ops = &cu_ops;
  c->be.impl = c;
  c->dev = device;
  c->attn = impl;
  c->cur.store(0);
  c->peak.store(0);
  c->stream = NULL;
  c->blas = NULL;
  c->blas_ws = NULL;
  c->rope_dev = NULL;
  c->rope_cap = 0;
  c->chk = NULL;
  c->chk_seq = 0;
  if (!(c->dv = cu_dev_of(device))) {
    delete c;
    return apb_error_set(err, APB_ENOMEM, "backend cuda: out of host memory for the device record");
  }
  {
    const char *ml = getenv("APB_CUDA_MEM_LIMIT");
    if (ml && *ml) {
      size_t lim = 0;
      if (parse_bytes(ml, &lim) != 0) {
        delete c;
        return apb_error_set(err, APB_EINVAL,
                             "backend cuda: APB_CUDA_MEM_LIMIT=%s is not a byte count (digits with an optional K, M, "
                             "G or T suffix, powers of 1024; 0 for no limit), e.g. 80G", ml);
      }
      c->dv->limit.store(lim);
    }
  }
  {
    const char *sc = getenv("APB_CUDA_SYNC_CHECKS");
    c->sync_checks = sc && *sc && strcmp(sc, "0") != 0;
    const char *ca = getenv("APB_CUDA_CACHE");
    c->cache = !(ca && strcmp(ca, "0") == 0);
  }
  APB_CU(cudaSetDevice(device));
  APB_CU(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
  APB_CU(cudaMalloc((void **)&c->chk, CU_CHK_KINDS * sizeof(cu_chk_rec)));
  APB_CU(cudaMemsetAsync(c->chk, 0xFF, CU_CHK_KINDS * sizeof(cu_chk_rec), c->stream));
  APB_CUBLAS(cublasCreate(&c->blas));
  APB_CUBLAS(cublasSetStream(c->blas, c->stream));
  {
    /* after cublasSetStream, which would put the handle back on its default workspace */
    int major = 0;
    APB_CU(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    const size_t ws = (size_t)(major >= 9 ? 32 : 4) << 20;
    APB_CU(cudaMalloc(&c->blas_ws, ws));
    APB_CUBLAS(cublasSetWorkspace(c->blas, c->blas_ws, ws));
  }
  APB_CUBLAS(cublasSetMathMode(c->blas, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                       CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  try {
    std::lock_guard<std::mutex> g(live().mu);
    live().all.push_back(c);
  } catch (...) {
    st = apb_error_set(err, APB_ENOMEM, "backend cuda: out of host memory for the instance list");
    goto done;
  }
  *out = &c->be;
  c = NULL;
done:
  if (c) cu_destroy(&c->be);
  return st;
}

int cu_is_instance(const apb_backend *be) { return be && be->ops == &cu_ops; }

extern "C" apb_status apb_backend_cuda_set_attn(apb_backend *be, apb_cuda_attn_impl impl, apb_error *err) {
  if (!cu_is_instance(be))
    return apb_error_set(err, APB_EINVAL, "backend_cuda_set_attn: not a CUDA backend instance");
  size_t i = 0;
  while (i < N_ATTN_NAMES && attn_names[i].impl != impl) i++;
  if (i == N_ATTN_NAMES) return apb_error_set(err, APB_EINVAL, "backend_cuda_set_attn: unknown impl %d", (int)impl);
  if (impl != APB_CUDA_ATTN_SIMPLE && be->act != APB_DT_BF16)
    return apb_error_set(err, APB_EINVAL, "backend_cuda_set_attn: the tensor-core kernels need bf16 storage");
  cu_of(be)->attn = impl;
  return APB_OK;
}

extern "C" apb_status apb_backend_cuda_set_sync_checks(apb_backend *be, int on, apb_error *err) {
  if (!cu_is_instance(be))
    return apb_error_set(err, APB_EINVAL, "backend_cuda_set_sync_checks: not a CUDA backend instance");
  cu_of(be)->sync_checks = on != 0;
  return APB_OK;
}

extern "C" apb_status apb_backend_cuda_set_cache(apb_backend *be, int on, apb_error *err) {
  if (!cu_is_instance(be)) return apb_error_set(err, APB_EINVAL, "backend_cuda_set_cache: not a CUDA backend instance");
  cu_be *c = cu_of(be);
  {
    std::lock_guard<std::mutex> g(c->mu);
    c->cache = on != 0;
  }
  if (!on) cache_release(c);
  return APB_OK;
}

extern "C" apb_status apb_backend_cuda_cached(const apb_backend *be, size_t *bytes, apb_error *err) {
  if (!cu_is_instance(be)) return apb_error_set(err, APB_EINVAL, "backend_cuda_cached: not a CUDA backend instance");
  if (!bytes) return apb_error_set(err, APB_EINVAL, "backend_cuda_cached: bytes is NULL");
  cu_be *c = cu_of(be);
  std::lock_guard<std::mutex> g(c->mu);
  size_t sum = 0;
  for (const auto &b : c->idle) sum += b.first;
  *bytes = sum;
  return APB_OK;
}

/* The budget record of an existing device, for the public calls named op. */
static apb_status dev_record(const char *op, int device, cu_dev **d, apb_error *err) {
  int n = 0;
  apb_status st = apb_cuda_device_count(&n, err);
  if (st) return st;
  if (device < 0 || device >= n)
    return apb_error_set(err, APB_EINVAL, "%s: device %d does not exist (%d device%s)", op, device, n,
                         n == 1 ? "" : "s");
  if (!(*d = cu_dev_of(device)))
    return apb_error_set(err, APB_ENOMEM, "%s: out of host memory for the device record", op);
  return APB_OK;
}

extern "C" apb_status apb_cuda_set_mem_limit(int device, size_t bytes, apb_error *err) {
  cu_dev *d = NULL;
  apb_status st = dev_record("cuda_set_mem_limit", device, &d, err);
  if (st) return st;
  d->limit.store(bytes);
  return APB_OK;
}

extern "C" apb_status apb_cuda_mem_held(int device, size_t *held, size_t *limit, apb_error *err) {
  cu_dev *d = NULL;
  apb_status st = dev_record("cuda_mem_held", device, &d, err);
  if (st) return st;
  if (held) *held = d->held.load();
  if (limit) *limit = d->limit.load();
  return APB_OK;
}

extern "C" void *apb_cuda_backend_stream(struct apb_backend *be) {
  return cu_is_instance(be) ? (void *)cu_of(be)->stream : NULL;
}
