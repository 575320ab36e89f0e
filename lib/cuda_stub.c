/* lib/cuda_stub.c: apb/cuda.h when the library is built without the CUDA backend: every call says
 * so with APB_ENODEVICE, so that programs and tests behave the same with and without it. */
#include "config.h"

#ifndef HAVE_CUDA
#include "apb/cuda.h"

int apb_cuda_built(void) { return 0; }

apb_status apb_cuda_device_count(int *n, apb_error *err) {
  *n = 0;
  return apb_error_set(err, APB_ENODEVICE,
                       "this libapb was built without CUDA (configure found no toolkit, or --without-cuda)");
}

apb_status apb_cuda_device_describe(int dev, char *buf, size_t len, apb_error *err) {
  (void)dev;
  if (len) buf[0] = 0;
  return apb_error_set(err, APB_ENODEVICE, "this libapb was built without CUDA");
}
#endif
