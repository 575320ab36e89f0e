/* fuzz/fuzz_safetensors.c: libFuzzer target for the safetensors reader (lib/safetensors.c).
 *
 * Each input is taken as a whole file image and handed to apb_st_open_mem. When it is accepted, every
 * tensor is walked the way a model loader would: looked up by name, counted, and (when small) widened
 * to fp32 and, for integer dtypes, read as int64, so that a validation gap shows up as an
 * out-of-bounds read under AddressSanitizer. A rejected input must leave a non-empty message naming
 * the label. Built and run by `make fuzz` / `make fuzz-run` with clang
 * -fsanitize=fuzzer,address,undefined; seeds live in fuzz/corpus/safetensors/ (made by
 * fuzz/make_corpus.py), tokens in fuzz/safetensors.dict.
 *
 * Not a test of the writer, and not part of `make check` (which runs the fixed malformed cases of
 * tests/check_safetensors.c instead).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "apb/safetensors.h"

#define WALK_MAX 4096 /* elements read per tensor; larger tensors are only counted */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static float f32[WALK_MAX];
  static int64_t i64[WALK_MAX];
  apb_st_file *f = NULL;
  apb_error err = {0};
  apb_status st = apb_st_open_mem(data, size, "fuzz", &f, &err);
  if (st != APB_OK) {
    if (f || err.code != st || strncmp(err.msg, "fuzz: ", 6) != 0) abort();
    return 0;
  }
  const uint8_t *section = data + size;
  for (int i = 0; i < f->n; i++) {
    const apb_st_tensor *t = &f->tensors[i];
    if (apb_st_find(f, t->name) != t) abort();
    int64_t n = apb_st_numel(t);
    if (n < 0 || t->end - t->begin != (uint64_t)n * apb_dtype_size(t->dtype)) abort();
    if (i > 0 && t->begin != f->tensors[i - 1].end) abort();
    if ((const uint8_t *)t->data + (t->end - t->begin) > section) abort();
    if (n > WALK_MAX) continue;
    apb_error e2 = {0};
    if (apb_st_read_f32(f, t, f32, &e2) != APB_OK) abort();
    if (!apb_dtype_is_float(t->dtype) && apb_st_read_i64(f, t, i64, &e2) != APB_OK) abort();
    const apb_st_tensor *g = NULL;
    if (apb_st_get(f, t->name, t->ndim, t->shape, 1, &g, &e2) != APB_OK || g != t) abort();
  }
  for (int i = 0; i < f->n_meta; i++)
    if (!f->meta_keys[i] || !f->meta_vals[i]) abort();
  apb_st_close(f);
  return 0;
}
