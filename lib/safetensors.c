/* lib/safetensors.c: reading, validating and writing safetensors files (apb/safetensors.h).
 *
 * The reader maps the file read-only (or takes a caller's buffer), parses the header with jansson and
 * checks every rule of the format before it hands out a handle: the header length, the JSON itself
 * (UTF-8, duplicate keys rejected by JSON_REJECT_DUPLICATES; any top-level value is parsed so that a
 * non-object gets a clear message), each entry's dtype, shape and
 * data_offsets, the byte count of each tensor against shape x dtype, and that the tensors tile the data
 * section exactly (no overlap, no hole, nothing after the last tensor), which is what the reference
 * implementation enforces. Unknown keys inside a tensor entry are ignored, as the reference (serde)
 * does. All offset and size arithmetic is 64-bit with explicit overflow checks, because every number
 * in a header is attacker-controlled.
 *
 * What it deliberately is not: no streaming or partial reads (the whole file is mapped), no writes into
 * a mapping, no byte swapping (data is little-endian, as on every host we build for), and no support
 * for the safetensors dtypes apb has no use for (F8_*, U16/U32/U64, ...): those are reported as
 * APB_EUNSUPPORTED rather than as malformed.
 *
 * Tested in tests/check_safetensors.c (round trips, widening, and one case per rejection rule);
 * fuzzed by fuzz/fuzz_safetensors.c (`make fuzz-run`).
 */
#include "apb/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef unsigned long long ull;

/* dtypes of the safetensors format that apb_dtype does not have: well-formed, but unsupported. */
static const char *const foreign_dtypes[] = {"U16",     "U32",     "U64",     "F8_E4M3", "F8_E5M2",
                                             "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",      "C64"};

static const char *json_kind(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT: return "object";
  case JSON_ARRAY: return "array";
  case JSON_STRING: return "string";
  case JSON_INTEGER: return "integer";
  case JSON_REAL: return "real";
  case JSON_TRUE: return "true";
  case JSON_FALSE: return "false";
  case JSON_NULL: return "null";
  }
  return "value";
}

/* "-2" for an integer, "a JSON real" (etc.) for anything else: what a number slot actually held. */
static const char *describe(const json_t *v, char *buf, size_t cap) {
  if (json_is_integer(v))
    snprintf(buf, cap, "%lld", (long long)json_integer_value(v));
  else
    snprintf(buf, cap, "a JSON %s", json_kind(v));
  return buf;
}

/* "[5, 4]", "[]" for a scalar; "*" for a negative (wildcard) extent. Truncated to cap. */
static const char *fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
  size_t at = 0;
  int w = snprintf(buf, cap, "[");
  at = w > 0 ? (size_t)w : 0;
  for (int i = 0; i < ndim && at < cap; i++) {
    if (shape[i] < 0)
      w = snprintf(buf + at, cap - at, "%s*", i ? ", " : "");
    else
      w = snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)shape[i]);
    at += w > 0 ? (size_t)w : 0;
  }
  if (at < cap) snprintf(buf + at, cap - at, "]");
  return buf;
}

#define SHAPE_BUF (APB_ST_MAX_DIMS * 24 + 4)

/* ---------------------------------------------------------------- reading */

static apb_status parse_dtype(const char *L, const char *name, const json_t *entry, apb_dtype *out,
                              apb_error *err) {
  const json_t *v = json_object_get(entry, "dtype");
  if (!v) return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s': missing \"dtype\"", L, name);
  if (!json_is_string(v))
    return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s': \"dtype\" is a JSON %s, expected a string",
                         L, name, json_kind(v));
  const char *s = json_string_value(v);
  if (apb_dtype_parse(s, out) == 0) return APB_OK;
  for (size_t i = 0; i < sizeof foreign_dtypes / sizeof *foreign_dtypes; i++)
    if (strcmp(s, foreign_dtypes[i]) == 0)
      return apb_error_set(err, APB_EUNSUPPORTED,
                           "%s: tensor '%.120s': dtype %s is valid safetensors but not supported by apb "
                           "(supported: F32 F16 BF16 F64 I8 U8 I16 I32 I64 BOOL)",
                           L, name, s);
  return apb_error_set(err, APB_EFORMAT,
                       "%s: tensor '%.120s': unknown dtype \"%.40s\" (expected one of F32 F16 BF16 F64 I8 U8 "
                       "I16 I32 I64 BOOL)",
                       L, name, s);
}

static apb_status parse_shape(const char *L, const char *name, const json_t *entry, apb_st_tensor *t,
                              apb_error *err) {
  char d[64];
  const json_t *v = json_object_get(entry, "shape");
  if (!v) return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s': missing \"shape\"", L, name);
  if (!json_is_array(v))
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': \"shape\" is a JSON %s, expected an array of non-negative "
                         "integers",
                         L, name, json_kind(v));
  size_t rank = json_array_size(v);
  if (rank > APB_ST_MAX_DIMS)
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': shape has %zu dimensions, more than APB_ST_MAX_DIMS = %d", L,
                         name, rank, APB_ST_MAX_DIMS);
  for (size_t i = 0; i < rank; i++) {
    const json_t *e = json_array_get(v, i);
    if (!json_is_integer(e) || json_integer_value(e) < 0)
      return apb_error_set(err, APB_EFORMAT,
                           "%s: tensor '%.120s': shape[%zu] is %s, expected a non-negative integer", L, name,
                           i, describe(e, d, sizeof d));
    t->shape[i] = (int64_t)json_integer_value(e);
  }
  t->ndim = (int)rank;
  return APB_OK;
}

static apb_status parse_offsets(const char *L, const char *name, const json_t *entry, uint64_t off[2],
                                apb_error *err) {
  char d[64];
  const json_t *v = json_object_get(entry, "data_offsets");
  if (!v) return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s': missing \"data_offsets\"", L, name);
  if (!json_is_array(v))
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': \"data_offsets\" is a JSON %s, expected [begin, end]", L, name,
                         json_kind(v));
  if (json_array_size(v) != 2)
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': \"data_offsets\" has %zu entries, expected 2 ([begin, end])",
                         L, name, json_array_size(v));
  for (size_t i = 0; i < 2; i++) {
    const json_t *e = json_array_get(v, i);
    if (!json_is_integer(e) || json_integer_value(e) < 0)
      return apb_error_set(err, APB_EFORMAT,
                           "%s: tensor '%.120s': data_offsets[%zu] is %s, expected a non-negative integer", L,
                           name, i, describe(e, d, sizeof d));
    off[i] = (uint64_t)json_integer_value(e);
  }
  return APB_OK;
}

/* One tensor entry: dtype, shape, offsets, and the byte count they imply. dsize is the length of the
 * data section. t->name is already set (the caller owns it). */
static apb_status parse_tensor(const char *L, const json_t *entry, uint64_t dsize, apb_st_tensor *t,
                               apb_error *err) {
  const char *name = t->name;
  char sh[SHAPE_BUF];
  if (!json_is_object(entry))
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': entry is a JSON %s, expected an object with dtype, shape and "
                         "data_offsets",
                         L, name, json_kind(entry));
  apb_status st;
  uint64_t off[2];
  if ((st = parse_dtype(L, name, entry, &t->dtype, err)) != APB_OK) return st;
  if ((st = parse_shape(L, name, entry, t, err)) != APB_OK) return st;
  if ((st = parse_offsets(L, name, entry, off, err)) != APB_OK) return st;

  int64_t numel = 1;
  for (int i = 0; i < t->ndim; i++)
    if (__builtin_mul_overflow(numel, t->shape[i], &numel))
      return apb_error_set(err, APB_EFORMAT,
                           "%s: tensor '%.120s': shape %s has more elements than fit in 64 bits", L, name,
                           fmt_shape(sh, sizeof sh, t->ndim, t->shape));
  uint64_t bytes;
  if (__builtin_mul_overflow((uint64_t)numel, (uint64_t)apb_dtype_size(t->dtype), &bytes))
    return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s': shape %s x %s needs more than 2^64 bytes", L,
                         name, fmt_shape(sh, sizeof sh, t->ndim, t->shape), apb_dtype_name(t->dtype));

  if (off[0] > off[1])
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': data_offsets [%llu, %llu) have begin after end", L, name,
                         (ull)off[0], (ull)off[1]);
  if (off[1] > dsize)
    return apb_error_set(
        err, APB_EFORMAT,
        "%s: tensor '%.120s': data_offsets [%llu, %llu) run past the end of the data section "
        "(%llu bytes)",
        L, name, (ull)off[0], (ull)off[1], (ull)dsize);
  if (off[1] - off[0] != bytes)
    return apb_error_set(err, APB_EFORMAT,
                         "%s: tensor '%.120s': data_offsets [%llu, %llu) hold %llu bytes but shape %s x %s "
                         "needs %llu",
                         L, name, (ull)off[0], (ull)off[1], (ull)(off[1] - off[0]),
                         fmt_shape(sh, sizeof sh, t->ndim, t->shape), apb_dtype_name(t->dtype), (ull)bytes);
  t->begin = off[0];
  t->end = off[1];
  return APB_OK;
}

static apb_status parse_meta(apb_st_file *f, const json_t *meta, apb_error *err) {
  const char *L = f->path;
  if (!json_is_object(meta))
    return apb_error_set(err, APB_EFORMAT, "%s: __metadata__ is a JSON %s, expected an object of strings", L,
                         json_kind(meta));
  size_t n = json_object_size(meta);
  f->meta_keys = calloc(n ? n : 1, sizeof *f->meta_keys);
  f->meta_vals = calloc(n ? n : 1, sizeof *f->meta_vals);
  if (!f->meta_keys || !f->meta_vals)
    return apb_error_set(err, APB_ENOMEM, "%s: out of memory for %zu metadata entries", L, n);
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)meta, key, v) {
    if (!json_is_string(v))
      return apb_error_set(err, APB_EFORMAT, "%s: __metadata__ '%.120s' is a JSON %s, expected a string", L,
                           key, json_kind(v));
    char *k = strdup(key), *s = strdup(json_string_value(v));
    if (!k || !s) {
      free(k);
      free(s);
      return apb_error_set(err, APB_ENOMEM, "%s: out of memory copying metadata", L);
    }
    f->meta_keys[f->n_meta] = k;
    f->meta_vals[f->n_meta] = s;
    f->n_meta++;
  }
  return APB_OK;
}

static int by_offset(const void *pa, const void *pb) {
  const apb_st_tensor *a = pa, *b = pb;
  if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
  if (a->end != b->end) return a->end < b->end ? -1 : 1;
  return strcmp(a->name, b->name);
}

/* The sorted tensors must tile [0, dsize) exactly: each begins where the previous one ended. */
static apb_status check_coverage(const apb_st_file *f, uint64_t dsize, apb_error *err) {
  const char *L = f->path;
  uint64_t pos = 0;
  const apb_st_tensor *prev = NULL;
  for (int i = 0; i < f->n; i++) {
    const apb_st_tensor *t = &f->tensors[i];
    if (t->begin < pos)
      return apb_error_set(err, APB_EFORMAT,
                           "%s: tensors '%.120s' [%llu, %llu) and '%.120s' [%llu, %llu) overlap", L,
                           prev->name, (ull)prev->begin, (ull)prev->end, t->name, (ull)t->begin, (ull)t->end);
    if (t->begin > pos) {
      if (prev)
        return apb_error_set(
            err, APB_EFORMAT,
            "%s: data section bytes [%llu, %llu) between tensors '%.120s' and '%.120s' belong to "
            "no tensor",
            L, (ull)pos, (ull)t->begin, prev->name, t->name);
      return apb_error_set(
          err, APB_EFORMAT,
          "%s: data section bytes [0, %llu) before the first tensor '%.120s' belong to no tensor", L,
          (ull)t->begin, t->name);
    }
    pos = t->end;
    prev = t;
  }
  if (pos != dsize) {
    if (prev)
      return apb_error_set(
          err, APB_EFORMAT,
          "%s: data section has %llu bytes after the last tensor '%.120s' (it ends at %llu, the "
          "section is %llu bytes)",
          L, (ull)(dsize - pos), prev->name, (ull)pos, (ull)dsize);
    return apb_error_set(err, APB_EFORMAT,
                         "%s: data section holds %llu bytes but the header lists no tensors", L, (ull)dsize);
  }
  return APB_OK;
}

/* Validate the image buf[size] into f (whose path is set). On failure f holds what was parsed so far,
 * which apb_st_close frees. */
static apb_status parse(apb_st_file *f, const unsigned char *buf, size_t size, apb_error *err) {
  const char *L = f->path;
  if (size < 8)
    return apb_error_set(err, APB_EFORMAT, "%s: file is %zu bytes, too short for the 8-byte header length", L,
                         size);
  uint64_t hlen = 0;
  for (int i = 0; i < 8; i++) hlen |= (uint64_t)buf[i] << (8 * i);
  if (hlen == 0)
    return apb_error_set(err, APB_EFORMAT,
                         "%s: header length is 0, expected a JSON object of at least 2 bytes", L);
  if (hlen > APB_ST_MAX_HEADER)
    return apb_error_set(err, APB_EFORMAT, "%s: header length %llu exceeds the limit of %u bytes", L,
                         (ull)hlen, APB_ST_MAX_HEADER);
  if (hlen > size - 8)
    return apb_error_set(err, APB_EFORMAT,
                         "%s: header length %llu runs past the end of the file (%zu bytes follow the length)",
                         L, (ull)hlen, size - 8);

  /* No NUL may appear in JSON text, but jansson's buffer reader can take one for the end of input and
   * accept what follows it, so NUL is refused here. */
  const unsigned char *nul = memchr(buf + 8, 0, (size_t)hlen);
  if (nul)
    return apb_error_set(err, APB_EFORMAT, "%s: header is not valid JSON: NUL byte at header byte %zu", L,
                         (size_t)(nul - (buf + 8)));
  json_error_t je;
  json_t *root =
      json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
  if (!root)
    return apb_error_set(err, APB_EFORMAT, "%s: header is not valid UTF-8 JSON: %s (at header byte %d)", L,
                         je.text, je.position);
  apb_status st = APB_OK;
  if (!json_is_object(root)) {
    st = apb_error_set(err, APB_EFORMAT, "%s: header is a JSON %s, expected an object at the top level", L,
                       json_kind(root));
    goto done;
  }
  const unsigned char *data = buf + 8 + hlen;
  uint64_t dsize = (uint64_t)(size - 8 - (size_t)hlen);
  size_t nobj = json_object_size(root);
  if (nobj > INT_MAX) {
    st = apb_error_set(err, APB_EFORMAT, "%s: header lists %zu entries, more than %d", L, nobj, INT_MAX);
    goto done;
  }
  f->tensors = calloc(nobj ? nobj : 1, sizeof *f->tensors);
  if (!f->tensors) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory for %zu tensor entries", L, nobj);
    goto done;
  }
  const char *key;
  json_t *v;
  json_object_foreach(root, key, v) {
    if (strcmp(key, "__metadata__") == 0) {
      if ((st = parse_meta(f, v, err)) != APB_OK) goto done;
      continue;
    }
    apb_st_tensor *t = &f->tensors[f->n];
    if (!(t->name = strdup(key))) {
      st = apb_error_set(err, APB_ENOMEM, "%s: out of memory copying a tensor name", L);
      goto done;
    }
    f->n++;
    if ((st = parse_tensor(L, v, dsize, t, err)) != APB_OK) goto done;
  }
  qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, by_offset);
  if ((st = check_coverage(f, dsize, err)) != APB_OK) goto done;
  for (int i = 0; i < f->n; i++) f->tensors[i].data = data + f->tensors[i].begin;
done:
  json_decref(root);
  return st;
}

static apb_st_file *new_handle(const char *label) {
  apb_st_file *f = calloc(1, sizeof *f);
  if (!f) return NULL;
  if (!(f->path = strdup(label))) {
    free(f);
    return NULL;
  }
  return f;
}

apb_status apb_st_open_mem(const void *buf, size_t size, const char *label, apb_st_file **out,
                           apb_error *err) {
  if (!label) label = "<memory>";
  if (!out) return apb_error_set(err, APB_EINVAL, "%s: apb_st_open_mem needs an output handle", label);
  *out = NULL;
  if (!buf && size > 0) return apb_error_set(err, APB_EINVAL, "%s: NULL buffer of %zu bytes", label, size);
  apb_st_file *f = new_handle(label);
  if (!f) return apb_error_set(err, APB_ENOMEM, "%s: out of memory", label);
  apb_status st = parse(f, buf, size, err);
  if (st != APB_OK) {
    apb_st_close(f);
    return st;
  }
  f->map = (void *)(uintptr_t)buf;
  f->map_size = size;
  f->owns_map = 0;
  *out = f;
  return APB_OK;
}

apb_status apb_st_open(const char *path, apb_st_file **out, apb_error *err) {
  if (!path || !out) return apb_error_set(err, APB_EINVAL, "apb_st_open: NULL path or output handle");
  *out = NULL;
  if (!*path) return apb_error_set(err, APB_EIO, "cannot open the file: its path is empty; give a file name");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return apb_error_set(err, APB_EIO, "%s: cannot open: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return apb_error_set(err, APB_EIO, "%s: cannot stat: %s", path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return apb_error_set(err, APB_EIO, "%s: not a regular file", path);
  }
  if (sb.st_size < 8) { /* also keeps mmap away from an empty file, which it refuses */
    close(fd);
    return apb_error_set(err, APB_EFORMAT, "%s: file is %lld bytes, too short for the 8-byte header length",
                         path, (long long)sb.st_size);
  }
  if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
    close(fd);
    return apb_error_set(err, APB_EIO, "%s: file of %lld bytes does not fit in the address space", path,
                         (long long)sb.st_size);
  }
  size_t size = (size_t)sb.st_size;
  void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd); /* the mapping keeps the file alive */
  if (map == MAP_FAILED)
    return apb_error_set(err, APB_EIO, "%s: cannot map %zu bytes: %s", path, size, strerror(e));
  apb_st_file *f = new_handle(path);
  if (!f) {
    munmap(map, size);
    return apb_error_set(err, APB_ENOMEM, "%s: out of memory", path);
  }
  f->map = map;
  f->map_size = size;
  f->owns_map = 1;
  apb_status st = parse(f, map, size, err);
  if (st != APB_OK) {
    apb_st_close(f);
    return st;
  }
  *out = f;
  return APB_OK;
}

void apb_st_close(apb_st_file *f) {
  if (!f) return;
  if (f->tensors)
    for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
  free(f->tensors);
  for (int i = 0; i < f->n_meta; i++) {
    free(f->meta_keys[i]);
    free(f->meta_vals[i]);
  }
  free(f->meta_keys);
  free(f->meta_vals);
  if (f->owns_map && f->map) munmap(f->map, f->map_size);
  free(f->path);
  free(f);
}

const apb_st_tensor *apb_st_find(const apb_st_file *f, const char *name) {
  if (!f || !name) return NULL;
  for (int i = 0; i < f->n; i++)
    if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
  return NULL;
}

int64_t apb_st_numel(const apb_st_tensor *t) {
  if (!t) return 0;
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i]; /* cannot overflow: checked when the file was opened */
  return n;
}

apb_status apb_st_get(const apb_st_file *f, const char *name, int ndim, const int64_t *dims, int allow_int,
                      const apb_st_tensor **out, apb_error *err) {
  if (out) *out = NULL;
  if (!f || !name || !out) return apb_error_set(err, APB_EINVAL, "apb_st_get: NULL file, name or output");
  const char *L = f->path;
  if (ndim > APB_ST_MAX_DIMS)
    return apb_error_set(err, APB_EINVAL,
                         "%s: tensor '%.120s': asked for rank %d, more than APB_ST_MAX_DIMS = %d", L, name,
                         ndim, APB_ST_MAX_DIMS);
  const apb_st_tensor *t = apb_st_find(f, name);
  if (!t)
    return apb_error_set(err, APB_ENOTFOUND, "%s: no tensor '%.120s' (the file has %d tensors)", L, name,
                         f->n);
  if (!allow_int && !apb_dtype_is_float(t->dtype))
    return apb_error_set(
        err, APB_EUNSUPPORTED,
        "%s: tensor '%.120s' has dtype %s, expected a floating dtype (F32, F16, BF16 or F64)", L, name,
        apb_dtype_name(t->dtype));
  char got[SHAPE_BUF], want[SHAPE_BUF];
  if (ndim >= 0 && t->ndim != ndim) {
    char wild[SHAPE_BUF] = "";
    if (dims) fmt_shape(wild, sizeof wild, ndim, dims);
    return apb_error_set(err, APB_EFORMAT, "%s: tensor '%.120s' has shape %s (rank %d), expected rank %d%s%s",
                         L, name, fmt_shape(got, sizeof got, t->ndim, t->shape), t->ndim, ndim,
                         dims ? " " : "", wild);
  }
  if (ndim > 0 && dims)
    for (int i = 0; i < ndim; i++)
      if (dims[i] >= 0 && dims[i] != t->shape[i])
        return apb_error_set(
            err, APB_EFORMAT, "%s: tensor '%.120s' has shape %s, expected %s (dim %d is %lld, expected %lld)",
            L, name, fmt_shape(got, sizeof got, t->ndim, t->shape), fmt_shape(want, sizeof want, ndim, dims),
            i, (long long)t->shape[i], (long long)dims[i]);
  *out = t;
  return APB_OK;
}

static apb_status check_member(const apb_st_file *f, const apb_st_tensor *t, const void *dst, const char *fn,
                               apb_error *err) {
  if (!f || !t) return apb_error_set(err, APB_EINVAL, "%s: NULL file or tensor", fn);
  if (t < f->tensors || t >= f->tensors + f->n)
    return apb_error_set(err, APB_EINVAL, "%s: %s: the tensor does not belong to this file", fn, f->path);
  if (!dst && apb_st_numel(t) > 0)
    return apb_error_set(err, APB_EINVAL, "%s: %s: tensor '%.120s': NULL destination", fn, f->path, t->name);
  return APB_OK;
}

apb_status apb_st_read_f32(const apb_st_file *f, const apb_st_tensor *t, float *dst, apb_error *err) {
  apb_status st = check_member(f, t, dst, "apb_st_read_f32", err);
  if (st != APB_OK) return st;
  size_t n = (size_t)apb_st_numel(t), es = apb_dtype_size(t->dtype);
  if (es == 0)
    return apb_error_set(err, APB_EUNSUPPORTED, "%s: tensor '%.120s': invalid dtype %d", f->path, t->name,
                         (int)t->dtype);
  const unsigned char *src = t->data;
  if ((uintptr_t)src % es == 0) {
    apb_to_f32(dst, src, t->dtype, n);
    return APB_OK;
  }
  /* The format does not promise aligned data (an odd header length or odd offsets are legal), and
   * apb_to_f32 loads whole elements: go through an aligned bounce buffer. */
  union {
    double align;
    unsigned char b[4096];
  } tmp;
  size_t per = sizeof tmp.b / es;
  for (size_t at = 0; at < n; at += per) {
    size_t k = n - at < per ? n - at : per;
    memcpy(tmp.b, src + at * es, k * es);
    apb_to_f32(dst + at, tmp.b, t->dtype, k);
  }
  return APB_OK;
}

apb_status apb_st_read_i64(const apb_st_file *f, const apb_st_tensor *t, int64_t *dst, apb_error *err) {
  apb_status st = check_member(f, t, dst, "apb_st_read_i64", err);
  if (st != APB_OK) return st;
  size_t n = (size_t)apb_st_numel(t);
  const unsigned char *src = t->data;
  /* memcpy per element: the data may be unaligned (see apb_st_read_f32). */
  switch (t->dtype) {
  case APB_DT_I8:
    for (size_t i = 0; i < n; i++) dst[i] = (int8_t)src[i];
    return APB_OK;
  case APB_DT_U8:
  case APB_DT_BOOL:
    for (size_t i = 0; i < n; i++) dst[i] = src[i];
    return APB_OK;
  case APB_DT_I16:
    for (size_t i = 0; i < n; i++) {
      int16_t v;
      memcpy(&v, src + 2 * i, 2);
      dst[i] = v;
    }
    return APB_OK;
  case APB_DT_I32:
    for (size_t i = 0; i < n; i++) {
      int32_t v;
      memcpy(&v, src + 4 * i, 4);
      dst[i] = v;
    }
    return APB_OK;
  case APB_DT_I64:
    if (n) memcpy(dst, src, n * 8);
    return APB_OK;
  default:
    return apb_error_set(
        err, APB_EUNSUPPORTED,
        "%s: tensor '%.120s' has dtype %s, apb_st_read_i64 needs an integer dtype (I8, U8, I16, "
        "I32, I64 or BOOL)",
        f->path, t->name, apb_dtype_name(t->dtype));
  }
}

/* ---------------------------------------------------------------- writing */

static int write_all(int fd, const void *p, size_t n) {
  const unsigned char *c = p;
  while (n > 0) {
    size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
    ssize_t w = write(fd, c, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    c += w;
    n -= (size_t)w;
  }
  return 0;
}

/* The header object, in the order given: __metadata__ first (as the reference writer does), then the
 * tensors with consecutive offsets. Checks every entry; *bytes gets each entry's size. */
static apb_status build_header(const char *path, int n, const apb_st_entry *entries, int n_meta,
                               const char *const *meta_keys, const char *const *meta_vals, uint64_t *bytes,
                               json_t **out, apb_error *err) {
  char sh[SHAPE_BUF];
  json_t *root = json_object();
  if (!root) return apb_error_set(err, APB_ENOMEM, "%s: out of memory building the header", path);
  apb_status st = APB_OK;
  if (n_meta > 0) {
    json_t *m = json_object();
    if (!m || json_object_set_new(root, "__metadata__", m) != 0) {
      st = apb_error_set(err, APB_ENOMEM, "%s: out of memory building the header", path);
      goto fail;
    }
    for (int i = 0; i < n_meta; i++) {
      const char *k = meta_keys[i], *v = meta_vals[i];
      if (!k || !v) {
        st = apb_error_set(err, APB_EINVAL, "%s: metadata entry %d has a NULL key or value", path, i);
        goto fail;
      }
      if (json_object_get(m, k)) {
        st = apb_error_set(err, APB_EINVAL, "%s: metadata key '%.120s' given twice", path, k);
        goto fail;
      }
      json_t *s = json_string(v);
      if (!s || json_object_set_new(m, k, s) != 0) {
        st =
            apb_error_set(err, APB_EINVAL, "%s: metadata '%.120s': key or value is not valid UTF-8", path, k);
        goto fail;
      }
    }
  }
  uint64_t off = 0;
  for (int i = 0; i < n; i++) {
    const apb_st_entry *e = &entries[i];
    const char *name = e->name;
    if (!name) {
      st = apb_error_set(err, APB_EINVAL, "%s: entry %d has no name", path, i);
      goto fail;
    }
    if (strcmp(name, "__metadata__") == 0) {
      st = apb_error_set(err, APB_EINVAL, "%s: entry %d: '__metadata__' is reserved, not a tensor name", path,
                         i);
      goto fail;
    }
    if (json_object_get(root, name)) {
      st = apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s' given twice (entry %d)", path, name, i);
      goto fail;
    }
    size_t es = apb_dtype_size(e->dtype);
    if (es == 0) {
      st = apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s': invalid dtype %d", path, name, (int)e->dtype);
      goto fail;
    }
    if (e->ndim < 0 || e->ndim > APB_ST_MAX_DIMS) {
      st = apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s': rank %d outside [0, %d]", path, name, e->ndim,
                         APB_ST_MAX_DIMS);
      goto fail;
    }
    int64_t numel = 1;
    for (int d = 0; d < e->ndim; d++) {
      if (e->shape[d] < 0) {
        st = apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s': shape %s has a negative extent", path, name,
                           fmt_shape(sh, sizeof sh, e->ndim, e->shape));
        goto fail;
      }
      if (__builtin_mul_overflow(numel, e->shape[d], &numel)) {
        st = apb_error_set(err, APB_EINVAL,
                           "%s: tensor '%.120s': shape %s has more elements than fit in 64 bits", path, name,
                           fmt_shape(sh, sizeof sh, e->ndim, e->shape));
        goto fail;
      }
    }
    uint64_t b, end;
    if (__builtin_mul_overflow((uint64_t)numel, (uint64_t)es, &b) || __builtin_add_overflow(off, b, &end) ||
        end > (uint64_t)INT64_MAX) {
      st = apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s': shape %s x %s overflows the file's offsets",
                         path, name, fmt_shape(sh, sizeof sh, e->ndim, e->shape), apb_dtype_name(e->dtype));
      goto fail;
    }
    if (b > 0 && !e->data) {
      st =
          apb_error_set(err, APB_EINVAL, "%s: tensor '%.120s': NULL data for %llu bytes", path, name, (ull)b);
      goto fail;
    }
    json_t *shape = json_array(), *t = NULL;
    int bad = !shape;
    for (int d = 0; !bad && d < e->ndim; d++)
      bad = json_array_append_new(shape, json_integer(e->shape[d])) != 0;
    if (!bad) { /* "o" hands shape over to the new object, even when json_pack fails */
      t = json_pack("{s:s, s:o, s:[I, I]}", "dtype", apb_dtype_name(e->dtype), "shape", shape, "data_offsets",
                    (json_int_t)off, (json_int_t)end);
      shape = NULL;
    }
    if (!t) {
      json_decref(shape);
      st = apb_error_set(err, APB_ENOMEM, "%s: out of memory building the header", path);
      goto fail;
    }
    if (json_object_set_new(root, name, t) != 0) {
      st = apb_error_set(err, APB_EINVAL, "%s: tensor name '%.120s' is not valid UTF-8", path, name);
      goto fail;
    }
    bytes[i] = b;
    off = end;
  }
  *out = root;
  return APB_OK;
fail:
  json_decref(root);
  return st;
}

apb_status apb_st_write(const char *path, int n, const apb_st_entry *entries, int n_meta,
                        const char *const *meta_keys, const char *const *meta_vals, apb_error *err) {
  if (!path) return apb_error_set(err, APB_EINVAL, "apb_st_write: NULL path");
  if (!*path) return apb_error_set(err, APB_EINVAL, "the output path is empty; give a file name");
  struct stat sb; /* the rename below would replace a device (/dev/null), a pipe or a socket with a file */
  if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
    return apb_error_set(err, APB_EIO, "%s exists and is not a regular file (%s); give the path of a file to "
                         "write", path, S_ISDIR(sb.st_mode) ? "a directory" : "a device, pipe or socket");
  if (n < 0 || (n > 0 && !entries))
    return apb_error_set(err, APB_EINVAL, "%s: %d tensors given with entries %p", path, n,
                         (const void *)entries);
  if (n_meta < 0 || (n_meta > 0 && (!meta_keys || !meta_vals)))
    return apb_error_set(err, APB_EINVAL, "%s: %d metadata entries given without keys or values", path,
                         n_meta);

  uint64_t *bytes = calloc(n ? (size_t)n : 1, sizeof *bytes);
  if (!bytes) return apb_error_set(err, APB_ENOMEM, "%s: out of memory", path);
  json_t *root = NULL;
  char *text = NULL, *head = NULL, *tmp = NULL;
  int fd = -1;
  apb_status st = build_header(path, n, entries, n_meta, meta_keys, meta_vals, bytes, &root, err);
  if (st != APB_OK) goto done;
  text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
  if (!text) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory serialising the header", path);
    goto done;
  }
  size_t tl = strlen(text), hl = (tl + 7) & ~(size_t)7; /* spaces to a multiple of 8, as the reference does */
  if (hl > APB_ST_MAX_HEADER) {
    st = apb_error_set(err, APB_EINVAL, "%s: header of %zu bytes exceeds the limit of %u", path, hl,
                       APB_ST_MAX_HEADER);
    goto done;
  }
  if (!(head = malloc(8 + hl))) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory", path);
    goto done;
  }
  for (int i = 0; i < 8; i++) head[i] = (char)(((uint64_t)hl >> (8 * i)) & 0xffu);
  memcpy(head + 8, text, tl);
  memset(head + 8 + tl, ' ', hl - tl);

  size_t tmplen = strlen(path) + 32;
  if (!(tmp = malloc(tmplen))) {
    st = apb_error_set(err, APB_ENOMEM, "%s: out of memory", path);
    goto done;
  }
  /* a new file (O_EXCL: never one that exists, nor through a symlink planted at that name); a name
   * taken by a stale file of a crashed process with the same pid is passed over */
  for (int i = 0; i < 100; i++) {
    snprintf(tmp, tmplen, "%s.tmp.%ld.%d", path, (long)getpid(), i);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0 || errno != EEXIST) break;
  }
  if (fd < 0) {
    st = apb_error_set(err, APB_EIO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
    free(tmp);
    tmp = NULL; /* not created: nothing to remove */
    goto done;
  }
  int ok = write_all(fd, head, 8 + hl) == 0;
  for (int i = 0; ok && i < n; i++) ok = write_all(fd, entries[i].data, (size_t)bytes[i]) == 0;
  if (!ok) {
    st = apb_error_set(err, APB_EIO, "%s: writing %s failed: %s", path, tmp, strerror(errno));
    goto done;
  }
  if (fsync(fd) != 0) {
    st = apb_error_set(err, APB_EIO, "%s: fsync of %s failed: %s", path, tmp, strerror(errno));
    goto done;
  }
  int rc = close(fd);
  fd = -1;
  if (rc != 0) {
    st = apb_error_set(err, APB_EIO, "%s: closing %s failed: %s", path, tmp, strerror(errno));
    goto done;
  }
  if (rename(tmp, path) != 0) {
    st = apb_error_set(err, APB_EIO, "%s: cannot rename %s into place: %s", path, tmp, strerror(errno));
    goto done;
  }
  free(tmp);
  tmp = NULL; /* renamed: nothing left to remove */
done:
  if (fd >= 0) close(fd);
  if (tmp && st != APB_OK) unlink(tmp);
  free(tmp);
  free(head);
  free(text);
  json_decref(root);
  free(bytes);
  return st;
}
