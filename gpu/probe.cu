/* gpu/probe.cu: device discovery for apb/cuda.h. Compiled with nvcc into libapb when CUDA is found;
 * lib/cuda_stub.c provides the same symbols otherwise. Tested by tests/check_gpu.c (SKIP without a
 * device). */
#include <stdio.h>

#include "apb/cuda.h"
#include "gpu_common.h"

extern "C" int apb_cuda_built(void) { return 1; }

extern "C" apb_status apb_cuda_device_count(int *n, apb_error *err) {
  apb_status st = APB_OK;
  *n = 0;
  cudaError_t e = cudaGetDeviceCount(n);
  if (e != cudaSuccess) {
    *n = 0;
    cudaGetLastError(); /* clear the sticky-free error so later calls start clean */
    return apb_error_set(err, APB_ENODEVICE, "no CUDA device: cudaGetDeviceCount said %s (%s)",
                         cudaGetErrorString(e), cudaGetErrorName(e));
  }
  if (*n == 0) return apb_error_set(err, APB_ENODEVICE, "no CUDA device: the driver reports 0 devices");
  return st;
}

extern "C" apb_status apb_cuda_device_describe(int dev, char *buf, size_t len, apb_error *err) {
  apb_status st = APB_OK;
  cudaDeviceProp p;
  APB_CU(cudaGetDeviceProperties(&p, dev));
  snprintf(buf, len, "device %d: %s, %d SMs, %.1f GiB, compute capability %d.%d", dev, p.name,
           p.multiProcessorCount, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), p.major, p.minor);
done:
  return st;
}
