/* apb/safetensors.h: reading and writing safetensors files.
 *
 * Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data. The JSON maps
 * each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of
 * the header) and may hold a "__metadata__" object of string values.
 *
 * The reader validates everything before any tensor is used: header length within the file and below
 * APB_ST_MAX_HEADER, well-formed JSON (jansson), known dtypes, non-negative shapes whose element count
 * does not overflow, offsets in range, each tensor covering exactly shape x dtype bytes, no two tensors
 * overlapping, duplicate names rejected, and the data section covered with no gaps. Files are
 * memory-mapped read-only; tensor data is reached through pointers into the mapping (valid until
 * apb_st_close; not necessarily aligned, since the format does not promise it: read through
 * apb_st_read_f32/_i64 or memcpy). Errors name the file, the tensor and what is wrong: APB_EIO when the
 * file cannot be opened or mapped, APB_EFORMAT when it breaks a rule of the format, APB_EUNSUPPORTED
 * for a valid safetensors dtype apb does not have (U16, U32, U64, F8_*, ...).
 *
 * The writer takes a list of tensors and writes them in the order given, 8-byte aligned header padding
 * with spaces, as the reference implementation does. Tested in tests/check_safetensors.c; fuzzed by
 * fuzz/fuzz_safetensors.c.
 */
#ifndef APB_SAFETENSORS_H
#define APB_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "apb/dtype.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define APB_ST_MAX_DIMS 8
#define APB_ST_MAX_HEADER (100u * 1024u * 1024u) /* the reference implementation's limit */

typedef struct apb_st_tensor {
  char *name;
  apb_dtype dtype;
  int ndim;                       /* 0 for a scalar */
  int64_t shape[APB_ST_MAX_DIMS];
  uint64_t begin, end;            /* byte offsets into the data section */
  const void *data;               /* points into the mapping (or the caller's buffer) */
} apb_st_tensor;

typedef struct apb_st_file {
  char *path;                     /* as given (or "<memory>") */
  int n;                          /* tensor count */
  apb_st_tensor *tensors;         /* [n], in file-offset order */
  int n_meta;
  char **meta_keys, **meta_vals;  /* [n_meta] __metadata__ entries */
  /* private */
  void *map;
  size_t map_size;
  int owns_map;
} apb_st_file;

/* Open and validate PATH (memory-mapped). On failure *out is NULL. */
apb_status apb_st_open(const char *path, apb_st_file **out, apb_error *err);
/* Validate a file image already in memory (not copied: buf must outlive the handle). `label` names it
 * in errors. Used by the fuzzer and by tests. */
apb_status apb_st_open_mem(const void *buf, size_t size, const char *label, apb_st_file **out,
                           apb_error *err);
void apb_st_close(apb_st_file *f);

/* The tensor called name, or NULL. */
const apb_st_tensor *apb_st_find(const apb_st_file *f, const char *name);
/* Element count (product of the shape; 1 for a scalar). */
int64_t apb_st_numel(const apb_st_tensor *t);

/* Look a tensor up by name and check it: present (else APB_ENOTFOUND), a floating dtype (F32, F16,
 * BF16, F64) or, when allow_int, an integer dtype (else APB_EUNSUPPORTED), and (when ndim >= 0) of
 * exactly that rank and, for each dims[i] >= 0 (dims may be NULL), that extent (else APB_EFORMAT).
 * Errors name the file, the tensor, expected and actual. *out is NULL on failure. */
apb_status apb_st_get(const apb_st_file *f, const char *name, int ndim, const int64_t *dims,
                      int allow_int, const apb_st_tensor **out, apb_error *err);
/* Widen a tensor of f to fp32 into dst [numel] (F32/F16/BF16/F64 and integer dtypes; any alignment). */
apb_status apb_st_read_f32(const apb_st_file *f, const apb_st_tensor *t, float *dst, apb_error *err);
/* Read an integer tensor (I8..I64, U8, BOOL) into dst [numel] as int64; APB_EUNSUPPORTED for floats. */
apb_status apb_st_read_i64(const apb_st_file *f, const apb_st_tensor *t, int64_t *dst, apb_error *err);

typedef struct apb_st_entry {
  const char *name;
  apb_dtype dtype;
  int ndim;
  int64_t shape[APB_ST_MAX_DIMS];
  const void *data;               /* numel x apb_dtype_size(dtype) bytes, already in dtype */
} apb_st_entry;

/* Write n tensors to path (atomically: a new file PATH.tmp.<pid>.<i>, created with O_EXCL so that no
 * existing file or symlink at that name is used, is written, fsynced and renamed into place; it is
 * removed on failure). meta may be NULL; otherwise n_meta key/value string pairs stored under
 * "__metadata__", which comes first in the header. Names must be unique UTF-8 and not "__metadata__";
 * bad entries give APB_EINVAL and write nothing, I/O failures APB_EIO, and so does a path that exists
 * but is not a regular file (a directory, /dev/null, a pipe: the rename would replace it). */
apb_status apb_st_write(const char *path, int n, const apb_st_entry *entries, int n_meta,
                        const char *const *meta_keys, const char *const *meta_vals, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_SAFETENSORS_H */
