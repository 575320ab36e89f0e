/* lib/cuda_stub.c: apb/cuda.h when the library is built without the CUDA backend: every call says
 * so with APB_ENODEVICE, so that programs and tests behave the same with and without it. */
#include "config.h"

#ifndef HAVE_CUDA
#include "apb/backend.h"
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

apb_status apb_cuda_attn(const apb_cuda_attn_args *a, apb_cuda_attn_impl impl, void *stream, apb_error *err) {
  (void)a, (void)impl, (void)stream;
  return apb_error_set(err, APB_ENODEVICE, "cuda_attn: this libapb was built without CUDA");
}

apb_status apb_cuda_malloc(void **p, size_t bytes, apb_error *err) {
  (void)bytes;
  *p = NULL;
  return apb_error_set(err, APB_ENODEVICE, "cuda_malloc: this libapb was built without CUDA");
}

void apb_cuda_free(void *p) { (void)p; }

apb_status apb_cuda_memcpy(void *dst, const void *src, size_t bytes, apb_error *err) {
  (void)dst, (void)src, (void)bytes;
  return apb_error_set(err, APB_ENODEVICE, "cuda_memcpy: this libapb was built without CUDA");
}

apb_status apb_cuda_memset(void *p, int byte, size_t bytes, apb_error *err) {
  (void)p, (void)byte, (void)bytes;
  return apb_error_set(err, APB_ENODEVICE, "cuda_memset: this libapb was built without CUDA");
}

apb_status apb_cuda_synchronize(apb_error *err) {
  return apb_error_set(err, APB_ENODEVICE, "cuda_synchronize: this libapb was built without CUDA");
}

apb_status apb_cuda_fill_uniform(void *x, apb_dtype dt, size_t n, uint64_t seed, float amp, void *stream,
                                 apb_error *err) {
  (void)x, (void)dt, (void)n, (void)seed, (void)amp, (void)stream;
  return apb_error_set(err, APB_ENODEVICE, "cuda_fill_uniform: this libapb was built without CUDA");
}

apb_status apb_cuda_timer_create(apb_cuda_timer **t, apb_error *err) {
  *t = NULL;
  return apb_error_set(err, APB_ENODEVICE, "cuda_timer_create: this libapb was built without CUDA");
}

void apb_cuda_timer_destroy(apb_cuda_timer *t) { (void)t; }

apb_status apb_cuda_timer_start(apb_cuda_timer *t, void *stream, apb_error *err) {
  (void)t, (void)stream;
  return apb_error_set(err, APB_ENODEVICE, "cuda_timer_start: this libapb was built without CUDA");
}

apb_status apb_cuda_timer_stop(apb_cuda_timer *t, void *stream, apb_error *err) {
  (void)t, (void)stream;
  return apb_error_set(err, APB_ENODEVICE, "cuda_timer_stop: this libapb was built without CUDA");
}

apb_status apb_cuda_timer_ms(apb_cuda_timer *t, float *ms, apb_error *err) {
  (void)t;
  *ms = 0.0f;
  return apb_error_set(err, APB_ENODEVICE, "cuda_timer_ms: this libapb was built without CUDA");
}

apb_status apb_backend_cuda(int device, apb_dtype act, apb_backend **out, apb_error *err) {
  (void)device, (void)act;
  if (out) *out = NULL;
  return apb_error_set(err, APB_ENODEVICE, "backend cuda: this libapb was built without CUDA");
}

apb_status apb_backend_cuda_set_attn(apb_backend *be, apb_cuda_attn_impl impl, apb_error *err) {
  (void)be, (void)impl;
  return apb_error_set(err, APB_ENODEVICE, "backend_cuda_set_attn: this libapb was built without CUDA");
}

apb_status apb_backend_cuda_set_sync_checks(apb_backend *be, int on, apb_error *err) {
  (void)be, (void)on;
  return apb_error_set(err, APB_ENODEVICE, "backend_cuda_set_sync_checks: this libapb was built without CUDA");
}

apb_status apb_backend_cuda_set_cache(apb_backend *be, int on, apb_error *err) {
  (void)be, (void)on;
  return apb_error_set(err, APB_ENODEVICE, "backend_cuda_set_cache: this libapb was built without CUDA");
}

apb_status apb_backend_cuda_cached(const apb_backend *be, size_t *bytes, apb_error *err) {
  (void)be;
  if (bytes) *bytes = 0;
  return apb_error_set(err, APB_ENODEVICE, "backend_cuda_cached: this libapb was built without CUDA");
}

apb_status apb_cuda_set_mem_limit(int device, size_t bytes, apb_error *err) {
  (void)device, (void)bytes;
  return apb_error_set(err, APB_ENODEVICE, "cuda_set_mem_limit: this libapb was built without CUDA");
}

apb_status apb_cuda_mem_held(int device, size_t *held, size_t *limit, apb_error *err) {
  (void)device;
  if (held) *held = 0;
  if (limit) *limit = 0;
  return apb_error_set(err, APB_ENODEVICE, "cuda_mem_held: this libapb was built without CUDA");
}

apb_status apb_cuda_bmodel_generate_config(apb_backend *be, const apb_model_config *cfg, int scorer_width,
                                           uint64_t seed, apb_bmodel **out, apb_error *err) {
  (void)be, (void)cfg, (void)scorer_width, (void)seed;
  if (out) *out = NULL;
  return apb_error_set(err, APB_ENODEVICE, "bmodel_generate: this libapb was built without CUDA");
}

void *apb_cuda_backend_stream(struct apb_backend *be) {
  (void)be;
  return NULL;
}
#endif
