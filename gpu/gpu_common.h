/* gpu/gpu_common.h: the check macros every CUDA, cuBLAS and NCCL call in gpu/ goes through, and the
 * few device helpers the attention kernels and the backend's ops share.
 *
 * APB_CU(call) records the call text, file:line and device into `err` (a variable in scope) and jumps
 * to the label `done` (every function has one, freeing what it owns); `st` (an apb_status in scope) is
 * set. APB_CU_LAUNCH() checks the launch error right after a kernel launch. Not a public header.
 */
#ifndef APB_GPU_COMMON_H
#define APB_GPU_COMMON_H

#include <cuda_runtime.h>

#include "apb/status.h"

#define APB_CU(call)                                                                                 \
  do {                                                                                               \
    cudaError_t apb_e_ = (call);                                                                     \
    if (apb_e_ != cudaSuccess) {                                                                     \
      int apb_dev_ = -1;                                                                             \
      cudaGetDevice(&apb_dev_);                                                                      \
      st = apb_error_set(err, apb_e_ == cudaErrorNoDevice || apb_e_ == cudaErrorInsufficientDriver   \
                                  ? APB_ENODEVICE : APB_EDEVICE,                                     \
                         "%s failed at %s:%d on device %d: %s (%s)", #call, __FILE__, __LINE__,      \
                         apb_dev_, cudaGetErrorString(apb_e_), cudaGetErrorName(apb_e_));            \
      goto done;                                                                                     \
    }                                                                                                \
  } while (0)

#define APB_CU_LAUNCH() APB_CU(cudaGetLastError())

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

/* 1 when p is 16-byte aligned (the 16-byte, cp.async and TMA paths need it). */
static inline int apb_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* 2^x by the SFU (ex2.approx.ftz): the softmax exponent of the tensor-core attention kernels. */
__device__ __forceinline__ float apb_fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/* Two floats as bf16x2, the first in the low half (the lower column of an mma fragment). */
__device__ __forceinline__ uint32_t apb_pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof r);
  return r;
}
#endif

#endif /* APB_GPU_COMMON_H */
