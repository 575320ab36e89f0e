/* apb/dtype.h: element types, their sizes and names, and bf16/f16 <-> fp32 conversion.
 *
 * bf16 conversion rounds to nearest, ties to even, exactly as CUDA's __float2bfloat16_rn; NaN stays a
 * (quiet) NaN and Inf stays Inf. apb_bf16_round() is the fp32 -> bf16 -> fp32 round trip used to
 * emulate GPU bf16 storage on the CPU. f16 conversion is IEEE binary16, round to nearest even, with
 * subnormals; values beyond the f16 range become Inf. Tested in tests/check_dtype.c.
 */
#ifndef APB_DTYPE_H
#define APB_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum apb_dtype {
  APB_DT_F32 = 0,
  APB_DT_F16,
  APB_DT_BF16,
  APB_DT_F64,
  APB_DT_I8,
  APB_DT_U8,
  APB_DT_I16,
  APB_DT_I32,
  APB_DT_I64,
  APB_DT_BOOL,
  APB_DT_COUNT
} apb_dtype;

/* Bytes per element; 0 for an invalid value. */
size_t apb_dtype_size(apb_dtype t);
/* safetensors spelling ("F32", "BF16", "I64", ...); "?" for an invalid value. */
const char *apb_dtype_name(apb_dtype t);
/* Parse the safetensors spelling; returns 0 and sets *out, or -1 when unknown. */
int apb_dtype_parse(const char *name, apb_dtype *out);
/* 1 for F32, F16, BF16, F64. */
int apb_dtype_is_float(apb_dtype t);

uint16_t apb_f32_to_bf16(float x);
float apb_bf16_to_f32(uint16_t h);
uint16_t apb_f32_to_f16(float x);
float apb_f16_to_f32(uint16_t h);
/* fp32 -> bf16 -> fp32 (round to nearest even). */
float apb_bf16_round(float x);
/* In-place apb_bf16_round over n values. */
void apb_bf16_round_array(float *x, size_t n);

/* Convert n elements of type src_t at src into fp32 at dst (float types and integers). */
void apb_to_f32(float *dst, const void *src, apb_dtype src_t, size_t n);
/* Convert n fp32 values into dst_t (F32, F16, BF16, F64 only); returns -1 for other types. */
int apb_from_f32(void *dst, apb_dtype dst_t, const float *src, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* APB_DTYPE_H */
