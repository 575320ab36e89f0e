/* apb/cuda.h: the CUDA side of the library, as seen from C.
 *
 * Everything here exists in every build. Without the CUDA backend compiled in (configure found no
 * CUDA or got --without-cuda) each call returns APB_ENODEVICE and says so in err. With it, calls that
 * need a GPU return APB_ENODEVICE when the driver reports none, so that tests can exit 77 (SKIP).
 */
#ifndef APB_CUDA_H
#define APB_CUDA_H

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

#ifdef __cplusplus
}
#endif
#endif /* APB_CUDA_H */
