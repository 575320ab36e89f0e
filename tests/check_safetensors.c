/* tests/check_safetensors.c: the safetensors reader and writer (apb/safetensors.h).
 *
 * - Round trips of every dtype apb writes (F32, F16, BF16, F64, I32, I64, U8), scalars, ranks 1..4, a
 *   zero-size tensor and metadata, checked byte for byte, plus the on-disk layout (8-byte aligned
 *   header padded with spaces, tensors in the order given, no temporary file left behind).
 * - Widening: apb_st_read_f32 agrees bit for bit with apb_bf16_to_f32, apb_f16_to_f32 and C casts,
 *   also on deliberately unaligned data; apb_st_read_i64 likewise.
 * - apb_st_get and apb_st_write argument errors.
 * - One malformed image per validation rule, each asserted by status code and by a distinctive piece
 *   of its message (which must also start with the file's label); a few on disk (missing, empty,
 *   truncated, a directory).
 * Not covered here: arbitrary garbage, which is fuzz/fuzz_safetensors.c's job.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

/* ---------------------------------------------------------------- helpers */

/* A file image: little-endian header length hlen, the JSON text, then data_len bytes 0, 1, 2, ...
 * hlen may differ from strlen(json) to build broken length fields; the image always holds json. */
static unsigned char *image_hlen(uint64_t hlen, const char *json, size_t data_len, size_t *size) {
  size_t jl = strlen(json);
  *size = 8 + jl + data_len;
  unsigned char *p = malloc(*size ? *size : 1);
  ck_assert(p != NULL);
  for (int i = 0; i < 8; i++) p[i] = (unsigned char)(hlen >> (8 * i));
  memcpy(p + 8, json, jl);
  for (size_t i = 0; i < data_len; i++) p[8 + jl + i] = (unsigned char)i;
  return p;
}

static unsigned char *image(const char *json, size_t data_len, size_t *size) {
  return image_hlen(strlen(json), json, data_len, size);
}

/* Assert that an open failed with code and a message starting with "label: " and containing needle. */
static void expect_error(const char *what, apb_status st, const apb_error *err, const apb_st_file *f,
                         apb_status code, const char *label, const char *needle) {
  ck_assert_msg(st == code, "%s: status %s, expected %s (message: %s)", what, apb_status_str(st),
                apb_status_str(code), err->msg);
  ck_assert_msg(err->code == code, "%s: err.code %d, expected %d", what, (int)err->code, (int)code);
  ck_assert_msg(f == NULL, "%s: a handle was returned on failure", what);
  size_t ll = strlen(label);
  ck_assert_msg(strncmp(err->msg, label, ll) == 0 && strncmp(err->msg + ll, ": ", 2) == 0,
                "%s: message does not start with '%s: ': %s", what, label, err->msg);
  ck_assert_msg(strstr(err->msg, needle) != NULL, "%s: message lacks \"%s\": %s", what, needle, err->msg);
}

static void *slurp(const char *path, size_t *size) {
  FILE *fp = fopen(path, "rb");
  ck_assert_msg(fp != NULL, "cannot open %s", path);
  fseek(fp, 0, SEEK_END);
  long n = ftell(fp);
  fseek(fp, 0, SEEK_SET);
  unsigned char *p = malloc(n > 0 ? (size_t)n : 1);
  ck_assert(p != NULL);
  ck_assert(fread(p, 1, (size_t)n, fp) == (size_t)n);
  fclose(fp);
  *size = (size_t)n;
  return p;
}

static void spit(const char *path, const void *p, size_t n) {
  FILE *fp = fopen(path, "wb");
  ck_assert_msg(fp != NULL, "cannot create %s", path);
  ck_assert(fwrite(p, 1, n, fp) == n);
  ck_assert(fclose(fp) == 0);
}

static int64_t numel_of(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

/* ---------------------------------------------------------------- round trips */

#define RT_N 10

typedef struct rt_set {
  apb_st_entry e[RT_N];
  void *buf[RT_N];
} rt_set;

/* Tensors of every written dtype and rank 0..4, plus a zero-size one; random contents from the seed. */
static void rt_make(rt_set *s) {
  static const struct {
    const char *name;
    apb_dtype dt;
    int ndim;
    int64_t shape[4];
  } spec[RT_N] = {
      {"f32.r2", APB_DT_F32, 2, {3, 5}},      {"f16.r1", APB_DT_F16, 1, {7}},
      {"bf16.r3", APB_DT_BF16, 3, {2, 3, 4}}, {"f64.r4", APB_DT_F64, 4, {2, 1, 3, 2}},
      {"i32.r1", APB_DT_I32, 1, {5}},         {"i64.scalar", APB_DT_I64, 0, {0}},
      {"u8.r2", APB_DT_U8, 2, {3, 3}},        {"empty", APB_DT_F32, 3, {3, 0, 2}},
      {"f32.scalar", APB_DT_F32, 0, {0}},     {"layers.0.attn.q_proj.weight", APB_DT_BF16, 2, {4, 2}},
  };
  for (int i = 0; i < RT_N; i++) {
    apb_st_entry *e = &s->e[i];
    memset(e, 0, sizeof *e);
    e->name = spec[i].name;
    e->dtype = spec[i].dt;
    e->ndim = spec[i].ndim;
    for (int d = 0; d < e->ndim; d++) e->shape[d] = spec[i].shape[d];
    size_t n = (size_t)numel_of(e->ndim, e->shape);
    float *v = malloc((n ? n : 1) * sizeof *v);
    ck_assert(v != NULL);
    tu_fill(v, n, tu_seed(), (uint64_t)i, 3.0f);
    unsigned char *b = malloc(n * apb_dtype_size(e->dtype) + 1);
    ck_assert(b != NULL);
    for (size_t k = 0; k < n; k++) {
      double x = (double)v[k] * 1000.0;
      switch (e->dtype) {
      case APB_DT_I32: ((int32_t *)b)[k] = (int32_t)x; break;
      case APB_DT_I64: ((int64_t *)b)[k] = (int64_t)x * 1000003; break;
      case APB_DT_U8: b[k] = (unsigned char)(int)(x + 3000.0); break;
      default: break;
      }
    }
    if (apb_dtype_is_float(e->dtype)) ck_assert(apb_from_f32(b, e->dtype, v, n) == 0);
    free(v);
    s->buf[i] = b;
    e->data = n ? b : NULL; /* a zero-size tensor needs no data */
  }
}

static void rt_free(rt_set *s) {
  for (int i = 0; i < RT_N; i++) free(s->buf[i]);
}

static const char *const meta_keys[] = {"format", "note", "empty"};
static const char *const meta_vals[] = {"pt", "h\xc3\xa9llo, \"quoted\" \\ world", ""};

static void check_same(const apb_st_file *f, const rt_set *s) {
  ck_assert_int_eq(f->n, RT_N);
  for (int i = 0; i < RT_N; i++) {
    const apb_st_entry *e = &s->e[i];
    const apb_st_tensor *t = &f->tensors[i]; /* written in order, so file order is the given order */
    ck_assert_str_eq(t->name, e->name);
    ck_assert_ptr_eq(apb_st_find(f, e->name), t);
    ck_assert_int_eq(t->dtype, e->dtype);
    ck_assert_int_eq(t->ndim, e->ndim);
    for (int d = 0; d < e->ndim; d++) ck_assert_int_eq(t->shape[d], e->shape[d]);
    int64_t n = apb_st_numel(t);
    ck_assert_int_eq(n, numel_of(e->ndim, e->shape));
    size_t bytes = (size_t)n * apb_dtype_size(e->dtype);
    ck_assert_uint_eq(t->end - t->begin, bytes);
    if (i > 0) ck_assert_uint_eq(t->begin, f->tensors[i - 1].end);
    if (bytes)
      ck_assert_msg(memcmp(t->data, e->data, bytes) == 0, "tensor %s differs after the round trip", e->name);
  }
  ck_assert_int_eq(f->n_meta, 3);
  for (int i = 0; i < 3; i++) {
    ck_assert_str_eq(f->meta_keys[i], meta_keys[i]);
    ck_assert_str_eq(f->meta_vals[i], meta_vals[i]);
  }
  ck_assert_ptr_null(apb_st_find(f, "missing"));
  ck_assert_ptr_null(apb_st_find(f, "__metadata__"));
}

START_TEST(round_trip) {
  rt_set s;
  rt_make(&s);
  char *path = tu_tmpname(".safetensors");
  apb_error err = {0};
  apb_status st = apb_st_write(path, RT_N, s.e, 3, meta_keys, meta_vals, &err);
  ck_assert_msg(st == APB_OK, "write: %s", err.msg);

  apb_st_file *f = NULL;
  st = apb_st_open(path, &f, &err);
  ck_assert_msg(st == APB_OK, "open: %s", err.msg);
  ck_assert_str_eq(f->path, path);
  check_same(f, &s);
  apb_st_close(f);

  /* The layout: header length a multiple of 8, padded with spaces, metadata first, nothing more. */
  size_t size;
  unsigned char *img = slurp(path, &size);
  uint64_t hlen = 0;
  for (int i = 0; i < 8; i++) hlen |= (uint64_t)img[i] << (8 * i);
  ck_assert_uint_eq(hlen % 8, 0);
  ck_assert_uint_le(8 + hlen, size);
  ck_assert_msg(memcmp(img + 8, "{\"__metadata__\":{\"format\":\"pt\"", 30) == 0, "header starts %.40s",
                (const char *)img + 8);
  size_t total = 0;
  for (int i = 0; i < RT_N; i++)
    total += (size_t)numel_of(s.e[i].ndim, s.e[i].shape) * apb_dtype_size(s.e[i].dtype);
  ck_assert_uint_eq(size, 8 + hlen + total);
  size_t close_at = 8 + (size_t)hlen;
  while (img[close_at - 1] == ' ') close_at--;
  ck_assert_int_eq(img[close_at - 1], '}');
  ck_assert_uint_lt(8 + hlen - close_at, 8);

  /* The same bytes through apb_st_open_mem. */
  st = apb_st_open_mem(img, size, "mem", &f, &err);
  ck_assert_msg(st == APB_OK, "open_mem: %s", err.msg);
  ck_assert_str_eq(f->path, "mem");
  check_same(f, &s);
  apb_st_close(f);
  free(img);

  /* No temporary file left behind. */
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld.0", path, (long)getpid());
  struct stat sb;
  ck_assert_msg(stat(tmp, &sb) != 0, "temporary file %s left behind", tmp);

  /* A symlink planted at the temporary name is neither followed nor replaced: the write takes the next
   * name (it opened the first with O_TRUNC and wrote through the link into the file it named). */
  char victim[4200];
  snprintf(victim, sizeof victim, "%s.victim", path);
  FILE *vf = fopen(victim, "w");
  ck_assert(vf != NULL);
  fputs("victim", vf);
  fclose(vf);
  ck_assert_int_eq(symlink(victim, tmp), 0);
  st = apb_st_write(path, RT_N, s.e, 3, meta_keys, meta_vals, &err);
  ck_assert_msg(st == APB_OK, "write past a planted temporary name: %s", err.msg);
  char vbuf[16] = {0};
  vf = fopen(victim, "r");
  ck_assert(vf != NULL);
  ck_assert_msg(fread(vbuf, 1, sizeof vbuf - 1, vf) == 6 && strcmp(vbuf, "victim") == 0,
                "the file behind a symlink at %s was written: now \"%s\"", tmp, vbuf);
  fclose(vf);
  ck_assert_msg(lstat(tmp, &sb) == 0 && S_ISLNK(sb.st_mode), "the symlink at %s was replaced", tmp);
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld.1", path, (long)getpid());
  ck_assert_msg(stat(tmp, &sb) != 0, "temporary file %s left behind", tmp);
  snprintf(tmp, sizeof tmp, "%s.tmp.%ld.0", path, (long)getpid());
  unlink(tmp), unlink(victim);

  /* Overwriting replaces the file: no tensors, no metadata. */
  st = apb_st_write(path, 0, NULL, 0, NULL, NULL, &err);
  ck_assert_msg(st == APB_OK, "rewrite: %s", err.msg);
  st = apb_st_open(path, &f, &err);
  ck_assert_msg(st == APB_OK, "reopen: %s", err.msg);
  ck_assert_int_eq(f->n, 0);
  ck_assert_int_eq(f->n_meta, 0);
  apb_st_close(f);

  unlink(path);
  free(path);
  rt_free(&s);
}
END_TEST

/* Every element widened by read_f32 equals the element converted by the dtype module. */
static void expect_widening(const apb_st_file *f, const apb_st_tensor *t) {
  size_t n = (size_t)apb_st_numel(t);
  float *got = tu_alloc(n), *want = tu_alloc(n);
  apb_error err = {0};
  apb_status st = apb_st_read_f32(f, t, got, &err);
  ck_assert_msg(st == APB_OK, "read_f32 %s: %s", t->name, err.msg);
  const unsigned char *p = t->data;
  for (size_t k = 0; k < n; k++) {
    switch (t->dtype) {
    case APB_DT_F32: memcpy(&want[k], p + 4 * k, 4); break;
    case APB_DT_F16: {
      uint16_t h;
      memcpy(&h, p + 2 * k, 2);
      want[k] = apb_f16_to_f32(h);
      break;
    }
    case APB_DT_BF16: {
      uint16_t h;
      memcpy(&h, p + 2 * k, 2);
      want[k] = apb_bf16_to_f32(h);
      break;
    }
    case APB_DT_F64: {
      double x;
      memcpy(&x, p + 8 * k, 8);
      want[k] = (float)x;
      break;
    }
    case APB_DT_I32: {
      int32_t x;
      memcpy(&x, p + 4 * k, 4);
      want[k] = (float)x;
      break;
    }
    case APB_DT_I64: {
      int64_t x;
      memcpy(&x, p + 8 * k, 8);
      want[k] = (float)x;
      break;
    }
    case APB_DT_I16: {
      int16_t x;
      memcpy(&x, p + 2 * k, 2);
      want[k] = (float)x;
      break;
    }
    case APB_DT_I8: want[k] = (float)(int8_t)p[k]; break;
    case APB_DT_U8:
    case APB_DT_BOOL: want[k] = (float)p[k]; break;
    default: ck_abort_msg("unexpected dtype");
    }
  }
  tu_assert_bitwise(t->name, got, want, (int64_t)n);
  ck_assert_msg(tu_guard_ok(got, n), "read_f32 %s wrote past %zu elements", t->name, n);
  tu_free(got);
  tu_free(want);
}

START_TEST(read_f32_widening) {
  rt_set s;
  rt_make(&s);
  char *path = tu_tmpname(".safetensors");
  apb_error err = {0};
  ck_assert_msg(apb_st_write(path, RT_N, s.e, 0, NULL, NULL, &err) == APB_OK, "write: %s", err.msg);
  apb_st_file *f = NULL;
  ck_assert_msg(apb_st_open(path, &f, &err) == APB_OK, "open: %s", err.msg);
  for (int i = 0; i < f->n; i++) expect_widening(f, &f->tensors[i]);

  /* BF16 widening is exact: converting back gives the stored bits. */
  const apb_st_tensor *t = apb_st_find(f, "bf16.r3");
  float v[24];
  ck_assert(apb_st_read_f32(f, t, v, &err) == APB_OK);
  for (int k = 0; k < 24; k++) {
    uint16_t h;
    memcpy(&h, (const unsigned char *)t->data + 2 * k, 2);
    ck_assert_uint_eq(apb_f32_to_bf16(v[k]), h);
  }

  /* read_i64 on the integer tensors; refused on a float one. */
  const char *ints[] = {"i32.r1", "i64.scalar", "u8.r2"};
  for (int i = 0; i < 3; i++) {
    t = apb_st_find(f, ints[i]);
    ck_assert_ptr_nonnull(t);
    int64_t got[16], n = apb_st_numel(t);
    ck_assert_msg(apb_st_read_i64(f, t, got, &err) == APB_OK, "read_i64: %s", err.msg);
    for (int64_t k = 0; k < n; k++) {
      int64_t want;
      const unsigned char *p = t->data;
      if (t->dtype == APB_DT_I32) {
        int32_t x;
        memcpy(&x, p + 4 * k, 4);
        want = x;
      } else if (t->dtype == APB_DT_I64) {
        memcpy(&want, p + 8 * k, 8);
      } else {
        want = p[k];
      }
      ck_assert_int_eq(got[k], want);
    }
  }
  int64_t dummy[16];
  apb_error e2 = {0};
  apb_status st = apb_st_read_i64(f, apb_st_find(f, "f32.r2"), dummy, &e2);
  ck_assert_int_eq(st, APB_EUNSUPPORTED);
  ck_assert_msg(strstr(e2.msg, "'f32.r2' has dtype F32, apb_st_read_i64 needs an integer dtype"), "%s",
                e2.msg);

  /* A tensor from another handle is refused. */
  apb_st_file *g = NULL;
  ck_assert(apb_st_open(path, &g, &err) == APB_OK);
  apb_error e3 = {0};
  st = apb_st_read_f32(f, &g->tensors[0], v, &e3);
  ck_assert_int_eq(st, APB_EINVAL);
  ck_assert_msg(strstr(e3.msg, "does not belong to this file"), "%s", e3.msg);
  apb_st_close(g);

  apb_st_close(f);
  unlink(path);
  free(path);
  rt_free(&s);
}
END_TEST

/* Data at odd addresses (odd header length, odd offsets) is legal; reads must not assume alignment
 * (the sanitizer build traps misaligned loads). */
START_TEST(unaligned_data) {
  static const char json[] = "{\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
                             "\"h\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[6,8]},"
                             "\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                             "\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[16,24]},"
                             "\"w\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[24,26]},"
                             "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[26,30]},"
                             "\"l\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[30,38]},"
                             "\"c\":{\"dtype\":\"I8\",\"shape\":[2],\"data_offsets\":[38,40]},"
                             "\"o\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[40,41]}}";
  for (size_t pad = 0; pad < 8; pad++) {
    char hdr[sizeof json + 8];
    memcpy(hdr, json, sizeof json - 1);
    memset(hdr + sizeof json - 1, ' ', pad);
    hdr[sizeof json - 1 + pad] = 0;
    size_t size;
    unsigned char *img = image(hdr, 41, &size);
    /* Real values in the data so that the conversions are exercised on something non-trivial. */
    unsigned char *d = img + 8 + strlen(hdr);
    uint16_t b[3] = {apb_f32_to_bf16(1.5f), apb_f32_to_bf16(-2.25f), apb_f32_to_bf16(1e-3f)};
    uint16_t h = apb_f32_to_f16(0.333f);
    float f2[2] = {3.25f, -7.0f};
    double dd = 1.0 / 3.0;
    int16_t w = -1234;
    int32_t i32 = -123456;
    int64_t l = -(INT64_C(1) << 40);
    memcpy(d, b, 6);
    memcpy(d + 6, &h, 2);
    memcpy(d + 8, f2, 8);
    memcpy(d + 16, &dd, 8);
    memcpy(d + 24, &w, 2);
    memcpy(d + 26, &i32, 4);
    memcpy(d + 30, &l, 8);
    d[38] = 0xff;
    d[39] = 0x7f;
    d[40] = 1;
    /* Copy to an odd address too: open_mem does not copy, so the data stays where it is put. */
    unsigned char *raw = malloc(size + 1);
    ck_assert(raw != NULL);
    memcpy(raw + 1, img, size);
    apb_st_file *f = NULL;
    apb_error err = {0};
    ck_assert_msg(apb_st_open_mem(raw + 1, size, "odd", &f, &err) == APB_OK, "pad %zu: %s", pad, err.msg);
    for (int i = 0; i < f->n; i++) expect_widening(f, &f->tensors[i]);
    float v[3];
    ck_assert(apb_st_read_f32(f, apb_st_find(f, "b"), v, &err) == APB_OK);
    ck_assert(v[0] == 1.5f && v[1] == -2.25f && v[2] == apb_bf16_round(1e-3f));
    ck_assert(apb_st_read_f32(f, apb_st_find(f, "d"), v, &err) == APB_OK);
    ck_assert(v[0] == (float)(1.0 / 3.0));
    int64_t iv[2];
    ck_assert(apb_st_read_i64(f, apb_st_find(f, "w"), iv, &err) == APB_OK);
    ck_assert_int_eq(iv[0], -1234);
    ck_assert(apb_st_read_i64(f, apb_st_find(f, "i"), iv, &err) == APB_OK);
    ck_assert_int_eq(iv[0], -123456);
    ck_assert(apb_st_read_i64(f, apb_st_find(f, "l"), iv, &err) == APB_OK);
    ck_assert_int_eq(iv[0], -(INT64_C(1) << 40));
    ck_assert(apb_st_read_i64(f, apb_st_find(f, "c"), iv, &err) == APB_OK);
    ck_assert_int_eq(iv[0], -1);
    ck_assert_int_eq(iv[1], 127);
    ck_assert(apb_st_read_i64(f, apb_st_find(f, "o"), iv, &err) == APB_OK);
    ck_assert_int_eq(iv[0], 1);
    apb_st_close(f);
    free(raw);
    free(img);
  }
}
END_TEST

/* Accepted on purpose: the validator must not be stricter than the format. */
START_TEST(valid_edge_cases) {
  static const char *const ok[] = {
      "{}",
      "{}      ",
      "  {\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}",
      /* unknown keys in an entry are ignored, as the reference does */
      "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4],\"extra\":[1,{}]}}",
      /* zero-size tensors anywhere, including at the very end and before others */
      "{\"z\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]},"
      "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
      "\"y\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[4,4]}}",
      /* listed out of offset order */
      "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]},"
      "\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
      "\"__metadata__\":{}}",
  };
  static const size_t data[] = {0, 0, 4, 4, 4, 4};
  static const int count[] = {0, 0, 1, 1, 3, 2};
  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
    size_t size;
    unsigned char *img = image(ok[i], data[i], &size);
    apb_st_file *f = NULL;
    apb_error err = {0};
    apb_status st = apb_st_open_mem(img, size, "edge", &f, &err);
    ck_assert_msg(st == APB_OK, "case %zu (%s) rejected: %s", i, ok[i], err.msg);
    ck_assert_int_eq(f->n, count[i]);
    for (int k = 1; k < f->n; k++) ck_assert_uint_le(f->tensors[k - 1].begin, f->tensors[k].begin);
    if (i == 5) {
      ck_assert_str_eq(f->tensors[0].name, "a");
      ck_assert_str_eq(f->tensors[1].name, "b");
      ck_assert_ptr_eq(f->tensors[1].data, img + size - 1);
    }
    apb_st_close(f);
    free(img);
  }
  /* NULL label gives "<memory>" */
  size_t size;
  unsigned char *img = image("{}", 0, &size);
  apb_st_file *f = NULL;
  ck_assert(apb_st_open_mem(img, size, NULL, &f, NULL) == APB_OK);
  ck_assert_str_eq(f->path, "<memory>");
  apb_st_close(f);
  apb_st_close(NULL);
  free(img);
}
END_TEST

/* ---------------------------------------------------------------- malformed images */

#define T1(name, body) "{\"" name "\":" body "}"
#define F32x2(off) "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":" off "}"

typedef struct bad_case {
  const char *what;
  const char *json;
  size_t data;
  apb_status code;
  const char *needle;
} bad_case;

static const bad_case bad[] = {
    {"truncated JSON", "{\"a\":", 0, APB_EFORMAT, "header is not valid UTF-8 JSON"},
    {"invalid UTF-8 in a name", "{\"\xff\":1}", 0, APB_EFORMAT, "unable to decode byte 0xff"},
    {"garbage after the JSON", "{} x", 0, APB_EFORMAT, "end of file expected"},
    {"NUL in a name", T1("a\\u0000b", F32x2("[0,8]")), 8, APB_EFORMAT, "NUL byte in object key"},
    {"top level is an array", "[1, 2]", 0, APB_EFORMAT, "header is a JSON array, expected an object"},
    {"top level is a string", "\"x\"", 0, APB_EFORMAT, "header is a JSON string, expected an object"},
    {"top level is a number", "8", 0, APB_EFORMAT, "header is a JSON integer, expected an object"},
    {"duplicate tensor name", "{\"a\":" F32x2("[0,8]") ",\"a\":" F32x2("[8,16]") "}", 16, APB_EFORMAT,
     "duplicate object key"},
    {"entry is not an object", T1("w", "3"), 0, APB_EFORMAT,
     "tensor 'w': entry is a JSON integer, expected an object"},
    {"missing dtype", T1("w", "{\"shape\":[1],\"data_offsets\":[0,4]}"), 4, APB_EFORMAT,
     "tensor 'w': missing \"dtype\""},
    {"dtype is not a string", T1("w", "{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}"), 4, APB_EFORMAT,
     "tensor 'w': \"dtype\" is a JSON integer, expected a string"},
    {"unknown dtype", T1("w", "{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}"), 4, APB_EFORMAT,
     "tensor 'w': unknown dtype \"F17\""},
    {"dtype is lower case", T1("w", "{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}"), 4,
     APB_EFORMAT, "unknown dtype \"f32\""},
    {"unsupported dtype", T1("w", "{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[0,4]}"), 4,
     APB_EUNSUPPORTED, "tensor 'w': dtype U16 is valid safetensors but not supported"},
    {"missing shape", T1("w", "{\"dtype\":\"F32\",\"data_offsets\":[0,4]}"), 4, APB_EFORMAT,
     "tensor 'w': missing \"shape\""},
    {"shape is not an array", T1("w", "{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}"), 16,
     APB_EFORMAT, "\"shape\" is a JSON integer, expected an array"},
    {"negative extent", T1("w", "{\"dtype\":\"F32\",\"shape\":[2,-2],\"data_offsets\":[0,16]}"), 16,
     APB_EFORMAT, "tensor 'w': shape[1] is -2, expected a non-negative integer"},
    {"real extent", T1("w", "{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}"), 8, APB_EFORMAT,
     "shape[0] is a JSON real"},
    {"string extent", T1("w", "{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}"), 8, APB_EFORMAT,
     "shape[0] is a JSON string"},
    {"rank 9", T1("w", "{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}"), 1,
     APB_EFORMAT, "shape has 9 dimensions, more than APB_ST_MAX_DIMS = 8"},
    {"element count overflows",
     T1("w", "{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}"), 0, APB_EFORMAT,
     "shape [4294967296, 4294967296] has more elements than fit in 64 bits"},
    {"byte count overflows",
     T1("w", "{\"dtype\":\"I64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,0]}"), 0, APB_EFORMAT,
     "shape [2305843009213693952] x I64 needs more than 2^64 bytes"},
    {"integer too big for JSON",
     T1("w", "{\"dtype\":\"U8\",\"shape\":[18446744073709551616],\"data_offsets\":[0,0]}"), 0, APB_EFORMAT,
     "too big integer"},
    {"missing data_offsets", T1("w", "{\"dtype\":\"F32\",\"shape\":[1]}"), 0, APB_EFORMAT,
     "tensor 'w': missing \"data_offsets\""},
    {"data_offsets is not an array", T1("w", "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":\"0-4\"}"), 4,
     APB_EFORMAT, "\"data_offsets\" is a JSON string, expected [begin, end]"},
    {"data_offsets has 3 entries", T1("w", "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}"), 8,
     APB_EFORMAT, "\"data_offsets\" has 3 entries, expected 2"},
    {"negative offset", T1("w", "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}"), 4, APB_EFORMAT,
     "data_offsets[0] is -4, expected a non-negative integer"},
    {"null offset", T1("w", "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,null]}"), 4, APB_EFORMAT,
     "data_offsets[1] is a JSON null"},
    {"begin after end", T1("w", "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}"), 8, APB_EFORMAT,
     "tensor 'w': data_offsets [8, 4) have begin after end"},
    {"end past the data section", T1("w", F32x2("[0,8]")), 4, APB_EFORMAT,
     "tensor 'w': data_offsets [0, 8) run past the end of the data section (4 bytes)"},
    {"size does not match shape", T1("q", "{\"dtype\":\"F32\",\"shape\":[5,4],\"data_offsets\":[0,100]}"),
     100, APB_EFORMAT, "tensor 'q': data_offsets [0, 100) hold 100 bytes but shape [5, 4] x F32 needs 80"},
    {"scalar with two elements", T1("s", "{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,4]}"), 4,
     APB_EFORMAT, "hold 4 bytes but shape [] x BF16 needs 2"},
    {"overlapping tensors", "{\"a\":" F32x2("[0,8]") ",\"b\":" F32x2("[4,12]") "}", 12, APB_EFORMAT,
     "tensors 'a' [0, 8) and 'b' [4, 12) overlap"},
    {"identical ranges", "{\"a\":" F32x2("[0,8]") ",\"b\":" F32x2("[0,8]") "}", 8, APB_EFORMAT,
     "tensors 'a' [0, 8) and 'b' [0, 8) overlap"},
    {"empty tensor inside another",
     "{\"a\":" F32x2("[0,8]") ",\"z\":{\"dtype\":\"F32\",\"shape\":[0],"
                              "\"data_offsets\":[4,4]}}",
     8, APB_EFORMAT, "tensors 'a' [0, 8) and 'z' [4, 4) overlap"},
    {"hole between tensors", "{\"a\":" F32x2("[0,8]") ",\"b\":" F32x2("[12,20]") "}", 20, APB_EFORMAT,
     "data section bytes [8, 12) between tensors 'a' and 'b' belong to no tensor"},
    {"hole before the first tensor", T1("a", F32x2("[4,12]")), 12, APB_EFORMAT,
     "data section bytes [0, 4) before the first tensor 'a' belong to no tensor"},
    {"bytes after the last tensor", T1("a", F32x2("[0,8]")), 11, APB_EFORMAT,
     "data section has 3 bytes after the last tensor 'a' (it ends at 8, the section is 11 bytes)"},
    {"data but no tensors", "{\"__metadata__\":{\"k\":\"v\"}}", 5, APB_EFORMAT,
     "data section holds 5 bytes but the header lists no tensors"},
    {"__metadata__ is not an object", "{\"__metadata__\":[\"k\",\"v\"]}", 0, APB_EFORMAT,
     "__metadata__ is a JSON array, expected an object of strings"},
    {"__metadata__ value is a number", "{\"__metadata__\":{\"ok\":\"v\",\"k\":1}}", 0, APB_EFORMAT,
     "__metadata__ 'k' is a JSON integer, expected a string"},
    {"__metadata__ value holds NUL", "{\"__metadata__\":{\"k\":\"a\\u0000b\"}}", 0, APB_EFORMAT,
     "\\u0000 is not allowed"},
    {"__metadata__ given twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, APB_EFORMAT,
     "duplicate object key"},
};
#define N_BAD ((int)(sizeof bad / sizeof *bad))

START_TEST(malformed_header) {
  const bad_case *c = &bad[_i];
  size_t size;
  unsigned char *img = image(c->json, c->data, &size);
  apb_st_file *f = (apb_st_file *)img; /* must be reset to NULL */
  apb_error err = {0};
  apb_status st = apb_st_open_mem(img, size, "bad.safetensors", &f, &err);
  expect_error(c->what, st, &err, f, c->code, "bad.safetensors", c->needle);
  free(img);
}
END_TEST

/* Broken length fields and files too short to hold one. */
START_TEST(malformed_length) {
  static const char json[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}";
  struct {
    const char *what;
    uint64_t hlen;
    size_t cut; /* bytes to keep of the image; 0 keeps all */
    const char *needle;
  } len_cases[] = {
      {"5-byte file", 0, 5, "file is 5 bytes, too short for the 8-byte header length"},
      {"header length 0", 0, 0, "header length is 0"},
      {"header length above the limit", (uint64_t)APB_ST_MAX_HEADER + 1, 0,
       "header length 104857601 exceeds the limit of 104857600 bytes"},
      {"header length 2^64-1", UINT64_MAX, 0, "header length 18446744073709551615 exceeds the limit"},
      {"header length past the end of the file", 100, 0,
       "header length 100 runs past the end of the file (55 bytes follow the length)"},
      {"header length one short", sizeof json - 2, 0, "not valid UTF-8 JSON"},
      {"header length one long (takes data byte 0x00)", sizeof json, 0, "NUL byte at header byte 53"},
  };
  size_t nc = sizeof len_cases / sizeof *len_cases;
  for (size_t i = 0; i < nc; i++) {
    size_t size;
    unsigned char *img = image_hlen(len_cases[i].hlen, json, 2, &size);
    if (i == 0)
      memcpy(img, (const unsigned char[]){(unsigned char)(sizeof json - 1), 0, 0, 0, 0, 0, 0, 0}, 8);
    if (len_cases[i].cut) size = len_cases[i].cut;
    apb_st_file *f = NULL;
    apb_error err = {0};
    apb_status st = apb_st_open_mem(img, size, "len.st", &f, &err);
    expect_error(len_cases[i].what, st, &err, f, APB_EFORMAT, "len.st", len_cases[i].needle);
    free(img);
  }
  /* An empty image, with and without a buffer. */
  for (int k = 0; k < 2; k++) {
    unsigned char one = 0;
    apb_st_file *f = NULL;
    apb_error err = {0};
    apb_status st = apb_st_open_mem(k ? &one : NULL, 0, "zero.st", &f, &err);
    expect_error("empty image", st, &err, f, APB_EFORMAT, "zero.st", "file is 0 bytes");
  }
  /* A raw NUL byte inside the header text. */
  static const char with_nul[] = "{\"a\":1\0}";
  unsigned char img[8 + sizeof with_nul - 1];
  memset(img, 0, 8);
  img[0] = sizeof with_nul - 1;
  memcpy(img + 8, with_nul, sizeof with_nul - 1);
  apb_st_file *f = NULL;
  apb_error err = {0};
  apb_status st = apb_st_open_mem(img, sizeof img, "nul.st", &f, &err);
  expect_error("raw NUL in the header", st, &err, f, APB_EFORMAT, "nul.st", "NUL byte at header byte 6");
}
END_TEST

START_TEST(malformed_on_disk) {
  char *path = tu_tmpname(".safetensors");
  apb_st_file *f = (apb_st_file *)path;
  apb_error err = {0};

  /* missing */
  apb_status st = apb_st_open(path, &f, &err);
  expect_error("missing file", st, &err, f, APB_EIO, path, "cannot open: No such file");

  /* empty: a zero-length mapping would fail, so this must be caught before mmap */
  spit(path, "", 0);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("empty file", st, &err, f, APB_EFORMAT, path, "file is 0 bytes, too short");

  /* 3 bytes */
  spit(path, "\x02\0\0", 3);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("3-byte file", st, &err, f, APB_EFORMAT, path, "file is 3 bytes, too short");

  /* truncated: a valid file cut short inside its data */
  float v[6] = {1, 2, 3, 4, 5, 6};
  apb_st_entry e[2] = {{.name = "x", .dtype = APB_DT_F32, .ndim = 2, .shape = {2, 2}, .data = v},
                       {.name = "y", .dtype = APB_DT_F32, .ndim = 1, .shape = {2}, .data = v + 4}};
  ck_assert(apb_st_write(path, 2, e, 0, NULL, NULL, &err) == APB_OK);
  size_t size;
  unsigned char *img = slurp(path, &size);
  spit(path, img, size - 4);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("truncated file", st, &err, f, APB_EFORMAT, path,
               "tensor 'y': data_offsets [16, 24) run past the end of the data section (20 bytes)");
  /* cut inside the header */
  spit(path, img, 20);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("file cut in its header", st, &err, f, APB_EFORMAT, path, "runs past the end of the file");
  /* with bytes appended */
  unsigned char *longer = malloc(size + 1);
  ck_assert(longer != NULL);
  memcpy(longer, img, size);
  longer[size] = 0;
  spit(path, longer, size + 1);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("file with a byte appended", st, &err, f, APB_EFORMAT, path,
               "1 bytes after the last tensor 'y'");
  free(longer);
  free(img);
  unlink(path);

  /* a directory */
  ck_assert(mkdir(path, 0700) == 0);
  apb_error_clear(&err);
  st = apb_st_open(path, &f, &err);
  expect_error("directory", st, &err, f, APB_EIO, path, "not a regular file");
  rmdir(path);
  free(path);

  /* an empty path (an option given as ''): said so, rather than ": cannot open" */
  f = (apb_st_file *)&err;
  apb_error_clear(&err);
  st = apb_st_open("", &f, &err);
  ck_assert_msg(st == APB_EIO && f == NULL && strstr(err.msg, "path is empty") != NULL,
                "empty path: status %s, handle %p, message: %s", apb_status_str(st), (void *)f, err.msg);
}
END_TEST

/* ---------------------------------------------------------------- apb_st_get */

START_TEST(get_checks) {
  float w[15] = {0};
  int32_t ids[4] = {1, 2, 3, 4};
  apb_st_entry e[2] = {{.name = "w", .dtype = APB_DT_BF16, .ndim = 2, .shape = {3, 5}, .data = w},
                       {.name = "ids", .dtype = APB_DT_I32, .ndim = 1, .shape = {4}, .data = ids}};
  char *path = tu_tmpname(".safetensors");
  apb_error err = {0};
  ck_assert_msg(apb_st_write(path, 2, e, 0, NULL, NULL, &err) == APB_OK, "%s", err.msg);
  apb_st_file *f = NULL;
  ck_assert(apb_st_open(path, &f, &err) == APB_OK);

  const apb_st_tensor *t = NULL;
  ck_assert(apb_st_get(f, "w", 2, (const int64_t[]){3, 5}, 0, &t, &err) == APB_OK);
  ck_assert_ptr_eq(t, apb_st_find(f, "w"));
  ck_assert(apb_st_get(f, "w", 2, (const int64_t[]){-1, 5}, 0, &t, &err) == APB_OK);
  ck_assert(apb_st_get(f, "w", -1, NULL, 0, &t, &err) == APB_OK);
  ck_assert(apb_st_get(f, "ids", 1, (const int64_t[]){4}, 1, &t, &err) == APB_OK);

  struct {
    const char *name;
    int ndim;
    int64_t dims[3];
    int allow_int;
    apb_status code;
    const char *needle;
  } cases[] = {
      {"nope", 2, {3, 5}, 0, APB_ENOTFOUND, "no tensor 'nope' (the file has 2 tensors)"},
      {"w", 3, {3, 5, 1}, 0, APB_EFORMAT, "tensor 'w' has shape [3, 5] (rank 2), expected rank 3 [3, 5, 1]"},
      {"w",
       2,
       {3, 4},
       0,
       APB_EFORMAT,
       "tensor 'w' has shape [3, 5], expected [3, 4] (dim 1 is 5, expected 4)"},
      {"w", 2, {-1, 4}, 0, APB_EFORMAT, "expected [*, 4] (dim 1 is 5, expected 4)"},
      {"ids", 1, {4}, 0, APB_EUNSUPPORTED, "tensor 'ids' has dtype I32, expected a floating dtype"},
      {"w", 9, {0}, 0, APB_EINVAL, "asked for rank 9"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    apb_error e1 = {0};
    t = (const apb_st_tensor *)f;
    apb_status st = apb_st_get(f, cases[i].name, cases[i].ndim, cases[i].dims, cases[i].allow_int, &t, &e1);
    expect_error(cases[i].needle, st, &e1, (const apb_st_file *)t, cases[i].code, path, cases[i].needle);
  }
  apb_st_close(f);
  unlink(path);
  free(path);
}
END_TEST

/* ---------------------------------------------------------------- apb_st_write errors */

START_TEST(write_errors) {
  float v[4] = {0};
  char *path = tu_tmpname(".safetensors");
  struct {
    const char *what;
    apb_st_entry e[2];
    int n;
    apb_status code;
    const char *needle;
  } cases[] = {
      {"duplicate name",
       {{.name = "a", .dtype = APB_DT_F32, .ndim = 1, .shape = {1}, .data = v},
        {.name = "a", .dtype = APB_DT_F32, .ndim = 1, .shape = {1}, .data = v}},
       2,
       APB_EINVAL,
       "tensor 'a' given twice (entry 1)"},
      {"reserved name",
       {{.name = "__metadata__", .dtype = APB_DT_F32, .ndim = 0, .data = v}},
       1,
       APB_EINVAL,
       "'__metadata__' is reserved"},
      {"no name",
       {{.name = NULL, .dtype = APB_DT_F32, .ndim = 0, .data = v}},
       1,
       APB_EINVAL,
       "entry 0 has no name"},
      {"negative extent",
       {{.name = "a", .dtype = APB_DT_F32, .ndim = 2, .shape = {2, -1}, .data = v}},
       1,
       APB_EINVAL,
       "tensor 'a': shape [2, *] has a negative extent"},
      {"bad rank",
       {{.name = "a", .dtype = APB_DT_F32, .ndim = 9, .data = v}},
       1,
       APB_EINVAL,
       "rank 9 outside [0, 8]"},
      {"bad dtype",
       {{.name = "a", .dtype = APB_DT_COUNT, .ndim = 0, .data = v}},
       1,
       APB_EINVAL,
       "invalid dtype"},
      {"NULL data",
       {{.name = "a", .dtype = APB_DT_F64, .ndim = 1, .shape = {2}, .data = NULL}},
       1,
       APB_EINVAL,
       "tensor 'a': NULL data for 16 bytes"},
      {"size overflow",
       {{.name = "a",
         .dtype = APB_DT_F64,
         .ndim = 2,
         .shape = {INT64_C(1) << 31, INT64_C(1) << 31},
         .data = v}},
       1,
       APB_EINVAL,
       "overflows the file's offsets"},
      {"name not UTF-8",
       {{.name = "\xc3(", .dtype = APB_DT_F32, .ndim = 0, .data = v}},
       1,
       APB_EINVAL,
       "is not valid UTF-8"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    apb_error err = {0};
    apb_status st = apb_st_write(path, cases[i].n, cases[i].e, 0, NULL, NULL, &err);
    expect_error(cases[i].what, st, &err, NULL, cases[i].code, path, cases[i].needle);
    struct stat sb;
    ck_assert_msg(stat(path, &sb) != 0, "%s: a file was written", cases[i].what);
  }
  apb_st_entry ok = {.name = "a", .dtype = APB_DT_F32, .ndim = 1, .shape = {4}, .data = v};
  apb_error err = {0};
  apb_status st =
      apb_st_write(path, 1, &ok, 2, (const char *const[]){"k", "k"}, (const char *const[]){"1", "2"}, &err);
  expect_error("duplicate metadata key", st, &err, NULL, APB_EINVAL, path, "metadata key 'k' given twice");

  /* A directory that does not exist: the message names the file. */
  char *missing = tu_tmpname("/no/such/dir/x.safetensors");
  apb_error_clear(&err);
  st = apb_st_write(missing, 1, &ok, 0, NULL, NULL, &err);
  expect_error("missing directory", st, &err, NULL, APB_EIO, missing, "cannot create");
  free(missing);

  /* An empty path: said so (it used to fail renaming ".tmp.<pid>" into place). */
  apb_error_clear(&err);
  st = apb_st_write("", 1, &ok, 0, NULL, NULL, &err);
  ck_assert_msg(st == APB_EINVAL && strstr(err.msg, "output path is empty") != NULL,
                "empty path: status %s, message: %s", apb_status_str(st), err.msg);
  free(path);
}
END_TEST

static Suite *suite(void) {
  Suite *s = suite_create("safetensors");
  TCase *tc = tu_tcase("round_trip", 30);
  tcase_add_test(tc, round_trip);
  tcase_add_test(tc, read_f32_widening);
  tcase_add_test(tc, unaligned_data);
  tcase_add_test(tc, valid_edge_cases);
  suite_add_tcase(s, tc);
  tc = tu_tcase("malformed", 30);
  tcase_add_loop_test(tc, malformed_header, 0, N_BAD);
  tcase_add_test(tc, malformed_length);
  tcase_add_test(tc, malformed_on_disk);
  suite_add_tcase(s, tc);
  tc = tu_tcase("api", 30);
  tcase_add_test(tc, get_checks);
  tcase_add_test(tc, write_errors);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return tu_run(suite(), "check_safetensors"); }
