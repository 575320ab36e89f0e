/* tests/check_gpu_attn.c: the CUDA attention of apb/cuda.h (gpu/attn.cu) against the CPU oracle
 * (shared/APB.md 3.6 and 7).
 *
 * What it checks, per case of the sweep (dense, star and apb shapes; rows 1, 3, 97, 113, 1023, 1025;
 * P and A in {0, 1, 67}; D 36, 64, 96, 128, 200, 256; GQA 1, 3, 4, 8, 160; local_keys 0 and 1; the
 * default scale and explicit ones; mild and peaky scores):
 *   - F32 storage, SIMPLE: o within apb_tolerance(APB_PREC_F32, k) of apb_attn_naive on the same fp32
 *     inputs, k the keys of the longest row;
 *   - BF16 storage, SIMPLE, every TC variant (TC, TC_W16, TC_W32) and every Hopper variant (HOPPER,
 *     HOPPER_V1 to _V5: gpu/attn_hopper.cu for D 64 and 128 on compute capability 9.0, TC for the
 *     other D), on bf16-rounded inputs: o within apb_tolerance(APB_PREC_BF16, k) of
 *     apb_attn_naive on those rounded inputs, and its relative Frobenius error at most twice that of
 *     the CPU bf16 emulation below;
 *   - LSE (fp32 in every path) within apb_tolerance(APB_PREC_F32, D + k): the dot product (D terms)
 *     and the exponential sum (k terms) both feed it;
 *   - every output buffer is poisoned with 0xFF bytes (NaN in f32 and bf16) before each run, and has a
 *     guard region after it that must come back intact; a NaN left anywhere fails the comparison;
 *   - TC and HOPPER run twice (the second time without LSE) give bitwise-identical o: no race, and
 *     lse = NULL is honoured; HOPPER with other CTA orders (APB_CUDA_HOPPER_HEAD_GROUP 0 and 3) gives
 *     the same o and lse bit for bit;
 *   - argument validation: APB_EINVAL / APB_EUNSUPPORTED with messages, and A + B = 0 is a no-op;
 *   - an Inf in the value of a key leaves the rows that do not see it finite and equal to the oracle's
 *     (F32 SIMPLE and every BF16 impl; not yet run on a GPU when written, in the ninth session).
 *
 * The CPU bf16 emulation ("the same computation done in bf16 on the CPU", docs/gpu-attention.md): the
 * oracle's arithmetic in double on the bf16-rounded inputs, with the two roundings a bf16 tensor-core
 * attention cannot avoid: the probabilities P = exp(s - max) rounded to bf16 before P.V (the tensor
 * cores take bf16 operands; the normaliser sums the unrounded P), and the output rounded to bf16.
 *
 * Needs a GPU: exits 77 (SKIP) before Check starts when apb_cuda_device_count fails, and runs with
 * CK_FORK=no so that no forked child inherits CUDA state. APB_GPU_SMALL=1 keeps a few small cases (for
 * compute-sanitizer); APB_GPU_IMPLS=name,name,... keeps those BF16 impls. Every case prints its error
 * figures to stderr.
 */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- the sweep */

typedef struct gcase {
  const char *name;
  int64_t P, A, B;
  int Hq, Hkv, D, local_keys;
  float scale; /* 0: 1/sqrt(D) */
  float qamp;  /* q uniform in [-qamp, qamp); k, v in [-1, 1) */
  int small;   /* part of the APB_GPU_SMALL set */
} gcase;

static const gcase all_cases[] = {
    {"dense B1", 0, 0, 1, 4, 4, 64, 1, 0, 1, 1},
    {"dense B97 G4", 0, 0, 97, 8, 2, 128, 1, 0, 1, 1},
    {"dense B113 G8 D96 peaky", 0, 0, 113, 8, 1, 96, 1, 0, 4, 0},
    {"dense B1023 G8", 0, 0, 1023, 8, 1, 64, 1, 0, 1, 0},
    {"dense B1025 G4 peaky", 0, 0, 1025, 8, 2, 128, 1, 0, 4, 0},
    {"star A1 B97", 0, 1, 97, 8, 2, 64, 1, 0, 1, 0},
    {"star A67 B113 G8", 0, 67, 113, 8, 1, 128, 1, 0, 1, 0},
    {"star A67 B1 D96 peaky", 0, 67, 1, 4, 4, 96, 1, 0, 4, 0},
    {"star A67 B1025 scale0.3", 0, 67, 1025, 4, 4, 128, 1, 0.3f, 1, 0},
    {"apb P1 A1 B113", 1, 1, 113, 4, 4, 128, 1, 0, 1, 1},
    {"apb P67 A67 B97 G4 peaky", 67, 67, 97, 8, 2, 128, 1, 0, 4, 0},
    {"apb P67 A0 B1025 G8", 67, 0, 1025, 8, 1, 64, 1, 0, 1, 0},
    {"apb P1 A67 B1023 D96", 1, 67, 1023, 8, 2, 96, 1, 0, 1, 0},
    {"apb P67 A1 B1 G8", 67, 1, 1, 8, 1, 128, 1, 0, 1, 0},
    {"apb P67 A67 B97 no local keys", 67, 67, 97, 8, 2, 128, 0, 0, 1, 1},
    {"dense B113 no keys at all", 0, 0, 113, 4, 4, 64, 0, 0, 1, 0},
    {"apb P1 A0 B1 no local keys D96", 1, 0, 1, 8, 1, 96, 0, 0, 1, 0},
    {"anchor rows only P67 A113", 67, 113, 0, 8, 2, 64, 1, 0, 1, 0},
    {"apb P67 A1023 B97", 67, 1023, 97, 8, 2, 128, 1, 0, 1, 0},
    {"apb G3 P67 A67 B113", 67, 67, 113, 6, 2, 64, 1, 0, 1, 1},
    {"apb G160 P1 A67 B3", 1, 67, 3, 160, 1, 64, 1, 0, 1, 0},
    {"apb D256 P67 A1 B113", 67, 1, 113, 4, 2, 256, 1, 0, 1, 1},
    {"star D200 A67 B97 G4", 0, 67, 97, 4, 1, 200, 1, 0, 1, 0},
    {"apb D36 (TC falls back) P1 A1 B97", 1, 1, 97, 4, 2, 36, 1, 0, 1, 0},
    {"apb P67 A67 B1025 scale0.2 peaky", 67, 67, 1025, 8, 2, 128, 1, 0.2f, 4, 0},
    /* For the Hopper kernel's pipeline: many key tiles per CTA (its stage parities wrap several
     * times), segments of 1.5 to 2.5 key tiles, GQA 4 (32 tokens per CTA) and 1 (128). */
    {"dense B2048 G4 (many key tiles)", 0, 0, 2048, 4, 1, 128, 1, 0, 1, 0},
    {"apb P200 A300 B700 G4 peaky", 200, 300, 700, 8, 2, 128, 1, 0, 4, 0},
    {"apb P129 A255 B513 G1 D64", 129, 255, 513, 2, 2, 64, 1, 0, 1, 1},
};
enum { N_ALL = sizeof all_cases / sizeof all_cases[0] };

/* The cases this run uses (all, or the small set), chosen once in main(). */
static const gcase *run_cases[N_ALL];
static int n_run_cases;

static const apb_cuda_attn_impl bf16_impls[] = {
    APB_CUDA_ATTN_SIMPLE,    APB_CUDA_ATTN_TC,        APB_CUDA_ATTN_TC_W16,    APB_CUDA_ATTN_TC_W32,
    APB_CUDA_ATTN_HOPPER_V1, APB_CUDA_ATTN_HOPPER_V2, APB_CUDA_ATTN_HOPPER_V3, APB_CUDA_ATTN_HOPPER_V4,
    APB_CUDA_ATTN_HOPPER_V5, APB_CUDA_ATTN_HOPPER};
enum { N_BF16_IMPLS = sizeof bf16_impls / sizeof bf16_impls[0] };
static const char *const impl_names[] = {"simple",    "tc",        "tc_w16",    "tc_w32",    "hopper",
                                         "hopper_v1", "hopper_v2", "hopper_v3", "hopper_v4", "hopper_v5"};

/* The BF16 impls this run checks: all, or those APB_GPU_IMPLS names (comma-separated impl_names, e.g.
 * for a compute-sanitizer run of one kernel). */
static int impl_selected(apb_cuda_attn_impl impl) {
  const char *sel = getenv("APB_GPU_IMPLS");
  if (!sel || !*sel) return 1;
  const char *name = impl_names[impl];
  const size_t n = strlen(name);
  for (const char *p = sel; (p = strstr(p, name)) != NULL; p += n)
    if ((p == sel || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
  return 0;
}

#define GUARD_BYTES 256
#define GUARD_BYTE 0x5A

/* ---------------------------------------------------------------- host problem */

typedef struct hprob {
  apb_attn_args a;        /* shape and host pointers (fp32) */
  float *q;               /* [T, Hq, D] */
  float *kp, *vp;         /* [P, Hkv, D] */
  float *ka, *va;         /* [A, Hkv, D] */
  float *kb, *vb;         /* [B, Hkv, D] */
  size_t nq, nlse, np, na, nb;
  int64_t k;              /* keys of the longest row (>= 1): the reduction length of the tolerance */
} hprob;

static float *xmalloc_f(size_t n) {
  float *p = malloc((n ? n : 1) * sizeof *p);
  ck_assert_msg(p != NULL, "out of host memory (%zu floats)", n);
  return p;
}

static void hprob_init(hprob *h, const gcase *c, uint64_t stream) {
  memset(h, 0, sizeof *h);
  const int64_t T = c->A + c->B;
  const uint64_t seed = tu_seed();
  h->nq = (size_t)T * c->Hq * c->D;
  h->nlse = (size_t)T * c->Hq;
  h->np = (size_t)c->P * c->Hkv * c->D;
  h->na = (size_t)c->A * c->Hkv * c->D;
  h->nb = (size_t)c->B * c->Hkv * c->D;
  h->q = xmalloc_f(h->nq);
  h->kp = xmalloc_f(h->np), h->vp = xmalloc_f(h->np);
  h->ka = xmalloc_f(h->na), h->va = xmalloc_f(h->na);
  h->kb = xmalloc_f(h->nb), h->vb = xmalloc_f(h->nb);
  tu_fill(h->q, h->nq, seed, stream * 8 + 0, c->qamp);
  tu_fill(h->kp, h->np, seed, stream * 8 + 1, 1.0f);
  tu_fill(h->vp, h->np, seed, stream * 8 + 2, 1.0f);
  tu_fill(h->ka, h->na, seed, stream * 8 + 3, 1.0f);
  tu_fill(h->va, h->na, seed, stream * 8 + 4, 1.0f);
  tu_fill(h->kb, h->nb, seed, stream * 8 + 5, 1.0f);
  tu_fill(h->vb, h->nb, seed, stream * 8 + 6, 1.0f);
  apb_attn_args *a = &h->a;
  a->P = c->P, a->A = c->A, a->B = c->B, a->Hq = c->Hq, a->Hkv = c->Hkv, a->D = c->D;
  a->local_keys = c->local_keys, a->scale = c->scale;
  a->q = h->q, a->kp = h->kp, a->vp = h->vp, a->ka = h->ka, a->va = h->va, a->kb = h->kb, a->vb = h->vb;
  int64_t k = c->B > 0 ? c->P + c->A + (c->local_keys ? c->B : 0) : c->A;
  h->k = k > 1 ? k : 1;
}

static void hprob_round_bf16(hprob *h) {
  apb_bf16_round_array(h->q, h->nq);
  apb_bf16_round_array(h->kp, h->np), apb_bf16_round_array(h->vp, h->np);
  apb_bf16_round_array(h->ka, h->na), apb_bf16_round_array(h->va, h->na);
  apb_bf16_round_array(h->kb, h->nb), apb_bf16_round_array(h->vb, h->nb);
}

static void hprob_free(hprob *h) {
  free(h->q), free(h->kp), free(h->vp), free(h->ka), free(h->va), free(h->kb), free(h->vb);
}

/* The oracle: o [T, Hq, D], lse [Hq, T]. */
static void oracle(const hprob *h, float *o, float *lse) {
  apb_attn_args a = h->a;
  a.o = o, a.lse = lse;
  apb_error err = {0};
  ck_assert_msg(apb_attn_naive(&a, &err) == APB_OK, "apb_attn_naive: %s", err.msg);
}

/* The CPU bf16 emulation (see the top of the file): o [T, Hq, D] out. Inputs already bf16-rounded. */
static void emulate_bf16(const hprob *h, float *o) {
  const apb_attn_args *a = &h->a;
  const int64_t P = a->P, A = a->A, T = a->A + a->B;
  const int Hq = a->Hq, Hkv = a->Hkv, D = a->D, G = Hq / Hkv;
  const double scale = apb_attn_scale(a);
  double *s = malloc((size_t)(P + A + a->B + 1) * sizeof *s), *acc = malloc((size_t)D * sizeof *acc);
  ck_assert(s && acc);
  for (int64_t r = 0; r < T; r++) {
    /* APB.md 3.6, keys in the order [P | A | B]. */
    const float *segk[3], *segv[3];
    int64_t segn[3];
    int nseg = 0;
    if (r < A) {
      segk[0] = a->ka, segv[0] = a->va, segn[0] = r + 1, nseg = 1;
    } else {
      segk[0] = a->kp, segv[0] = a->vp, segn[0] = P;
      segk[1] = a->ka, segv[1] = a->va, segn[1] = A;
      segk[2] = a->kb, segv[2] = a->vb, segn[2] = a->local_keys ? r - A + 1 : 0;
      nseg = 3;
    }
    for (int hq = 0; hq < Hq; hq++) {
      const int hk = hq / G;
      const float *qr = a->q + (r * Hq + hq) * (int64_t)D;
      float *orow = o + (r * Hq + hq) * (int64_t)D;
      int64_t n = 0;
      double mx = -INFINITY;
      for (int g = 0; g < nseg; g++)
        for (int64_t t = 0; t < segn[g]; t++, n++) {
          const float *kr = segk[g] + (t * Hkv + hk) * (int64_t)D;
          double dot = 0;
          for (int d = 0; d < D; d++) dot += (double)qr[d] * kr[d];
          s[n] = dot * scale;
          if (s[n] > mx) mx = s[n];
        }
      for (int d = 0; d < D; d++) acc[d] = 0;
      double sum = 0;
      n = 0;
      for (int g = 0; g < nseg; g++)
        for (int64_t t = 0; t < segn[g]; t++, n++) {
          const float *vr = segv[g] + (t * Hkv + hk) * (int64_t)D;
          const double p = exp(s[n] - mx);
          const double pr = apb_bf16_round((float)p);
          sum += p;
          for (int d = 0; d < D; d++) acc[d] += pr * vr[d];
        }
      for (int d = 0; d < D; d++) orow[d] = n ? apb_bf16_round((float)(acc[d] / sum)) : 0.0f;
    }
  }
  free(s);
  free(acc);
}

/* ---------------------------------------------------------------- device side */

typedef struct dprob {
  void *q, *kp, *vp, *ka, *va, *kb, *vb; /* inputs in dtype (NULL for empty segments) */
  void *o;                               /* [T, Hq, D] in dtype, then GUARD_BYTES */
  float *lse;                            /* [Hq, T], then GUARD_BYTES */
  size_t obytes, lbytes;                 /* without the guards */
} dprob;

static void *dev_upload(const float *x, size_t n, apb_dtype dt) {
  if (n == 0) return NULL;
  apb_error err = {0};
  size_t es = apb_dtype_size(dt);
  void *tmp = malloc(n * es), *d = NULL;
  ck_assert(tmp != NULL);
  ck_assert_int_eq(apb_from_f32(tmp, dt, x, n), 0);
  ck_assert_msg(apb_cuda_malloc(&d, n * es, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_memcpy(d, tmp, n * es, &err) == APB_OK, "%s", err.msg);
  free(tmp);
  return d;
}

static void dprob_init(dprob *d, const hprob *h, apb_dtype dt) {
  apb_error err = {0};
  memset(d, 0, sizeof *d);
  d->q = dev_upload(h->q, h->nq, dt);
  d->kp = dev_upload(h->kp, h->np, dt), d->vp = dev_upload(h->vp, h->np, dt);
  d->ka = dev_upload(h->ka, h->na, dt), d->va = dev_upload(h->va, h->na, dt);
  if (h->a.local_keys) d->kb = dev_upload(h->kb, h->nb, dt), d->vb = dev_upload(h->vb, h->nb, dt);
  d->obytes = h->nq * apb_dtype_size(dt);
  d->lbytes = h->nlse * sizeof(float);
  ck_assert_msg(apb_cuda_malloc(&d->o, d->obytes + GUARD_BYTES, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_malloc((void **)&d->lse, d->lbytes + GUARD_BYTES, &err) == APB_OK, "%s", err.msg);
}

static void dprob_free(dprob *d) {
  apb_cuda_free(d->q), apb_cuda_free(d->kp), apb_cuda_free(d->vp), apb_cuda_free(d->ka);
  apb_cuda_free(d->va), apb_cuda_free(d->kb), apb_cuda_free(d->vb), apb_cuda_free(d->o);
  apb_cuda_free(d->lse);
}

/* 1 when the GUARD_BYTES after buf[n] all hold GUARD_BYTE. */
static int guard_intact(const unsigned char *buf, size_t n) {
  for (size_t i = 0; i < GUARD_BYTES; i++)
    if (buf[n + i] != GUARD_BYTE) return 0;
  return 1;
}

/* Poison the outputs (0xFF: NaN) and rewrite their guards, run `impl`, wait, and bring back o (raw in
 * o_raw [obytes + guard], as fp32 in o [nq]) and, with_lse, lse [nlse]. */
static void run_gpu(const gcase *c, const hprob *h, const dprob *d, apb_dtype dt, apb_cuda_attn_impl impl,
                    int with_lse, unsigned char *o_raw, float *o, float *lse) {
  apb_error err = {0};
  unsigned char *l_raw = malloc(d->lbytes + GUARD_BYTES);
  ck_assert(l_raw != NULL);
  ck_assert_msg(apb_cuda_memset(d->o, 0xFF, d->obytes, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_memset((char *)d->o + d->obytes, GUARD_BYTE, GUARD_BYTES, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_memset(d->lse, 0xFF, d->lbytes, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_memset((char *)d->lse + d->lbytes, GUARD_BYTE, GUARD_BYTES, &err) == APB_OK, "%s",
                err.msg);
  apb_cuda_attn_args x = {.P = c->P, .A = c->A, .B = c->B, .Hq = c->Hq, .Hkv = c->Hkv, .D = c->D,
                          .local_keys = c->local_keys, .scale = c->scale, .dtype = dt, .q = d->q,
                          .kp = d->kp, .vp = d->vp, .ka = d->ka, .va = d->va, .kb = d->kb, .vb = d->vb,
                          .o = d->o, .lse = with_lse ? d->lse : NULL};
  apb_status st = apb_cuda_attn(&x, impl, NULL, &err);
  ck_assert_msg(st == APB_OK, "%s: apb_cuda_attn(%s, %s): %s (%s)", c->name, apb_dtype_name(dt),
                impl_names[impl], err.msg, apb_status_str(st));
  st = apb_cuda_synchronize(&err);
  ck_assert_msg(st == APB_OK, "%s: after apb_cuda_attn(%s, %s): %s", c->name, apb_dtype_name(dt),
                impl_names[impl], err.msg);
  ck_assert_msg(apb_cuda_memcpy(o_raw, d->o, d->obytes + GUARD_BYTES, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_cuda_memcpy(l_raw, d->lse, d->lbytes + GUARD_BYTES, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(guard_intact(o_raw, d->obytes), "%s (%s, %s): guard after o overwritten", c->name,
                apb_dtype_name(dt), impl_names[impl]);
  ck_assert_msg(guard_intact(l_raw, d->lbytes), "%s (%s, %s): guard after lse overwritten", c->name,
                apb_dtype_name(dt), impl_names[impl]);
  apb_to_f32(o, o_raw, dt, h->nq);
  if (with_lse) memcpy(lse, l_raw, d->lbytes);
  else
    for (size_t i = 0; i < h->nlse; i++)
      ck_assert_msg(((const uint32_t *)(const void *)l_raw)[i] == 0xFFFFFFFFu,
                    "%s (%s): lse written although lse = NULL", c->name, impl_names[impl]);
  free(l_raw);
}

static double rel_fro(const float *got, const float *ref, size_t n) {
  apb_cmp cm;
  apb_compare(got, ref, (int64_t)n, &cm);
  return cm.n_nan || cm.n_inf ? INFINITY : cm.rel_fro;
}

/* ---------------------------------------------------------------- tests */

START_TEST(test_f32_simple) {
  const gcase *c = run_cases[_i];
  hprob h;
  hprob_init(&h, c, (uint64_t)_i);
  float *ref = xmalloc_f(h.nq), *ref_lse = xmalloc_f(h.nlse);
  float *o = xmalloc_f(h.nq), *lse = xmalloc_f(h.nlse);
  unsigned char *o_raw = malloc(h.nq * sizeof(float) + GUARD_BYTES);
  ck_assert(o_raw != NULL);
  oracle(&h, ref, ref_lse);
  dprob d;
  dprob_init(&d, &h, APB_DT_F32);
  run_gpu(c, &h, &d, APB_DT_F32, APB_CUDA_ATTN_SIMPLE, 1, o_raw, o, lse);
  char what[160];
  snprintf(what, sizeof what, "%s: f32 simple o", c->name);
  tu_assert_close(what, o, ref, (int64_t)h.nq, apb_tolerance(APB_PREC_F32, h.k));
  snprintf(what, sizeof what, "%s: f32 simple lse", c->name);
  tu_assert_close(what, lse, ref_lse, (int64_t)h.nlse, apb_tolerance(APB_PREC_F32, c->D + h.k));
  fprintf(stderr, "  %-40s f32  simple  o rel_fro %.3g  lse rel_fro %.3g\n", c->name, rel_fro(o, ref, h.nq),
          rel_fro(lse, ref_lse, h.nlse));
  dprob_free(&d);
  free(ref), free(ref_lse), free(o), free(lse), free(o_raw);
  hprob_free(&h);
}
END_TEST

START_TEST(test_bf16) {
  const gcase *c = run_cases[_i];
  hprob h;
  hprob_init(&h, c, (uint64_t)_i);
  hprob_round_bf16(&h);
  float *ref = xmalloc_f(h.nq), *ref_lse = xmalloc_f(h.nlse), *emu = xmalloc_f(h.nq), *rnd = xmalloc_f(h.nq);
  float *o = xmalloc_f(h.nq), *lse = xmalloc_f(h.nlse), *o2 = xmalloc_f(h.nq);
  const size_t raw_bytes = h.nq * 2 + GUARD_BYTES;
  unsigned char *o_raw = malloc(raw_bytes), *o_raw2 = malloc(raw_bytes);
  ck_assert(o_raw && o_raw2);
  oracle(&h, ref, ref_lse);
  emulate_bf16(&h, emu);
  memcpy(rnd, ref, h.nq * sizeof *rnd);
  apb_bf16_round_array(rnd, h.nq);
  const double e_emu = rel_fro(emu, ref, h.nq), e_rnd = rel_fro(rnd, ref, h.nq);
  dprob d;
  dprob_init(&d, &h, APB_DT_BF16);
  for (size_t m = 0; m < N_BF16_IMPLS; m++) {
    const apb_cuda_attn_impl impl = bf16_impls[m];
    if (!impl_selected(impl)) continue;
    run_gpu(c, &h, &d, APB_DT_BF16, impl, 1, o_raw, o, lse);
    char what[160];
    snprintf(what, sizeof what, "%s: bf16 %s o", c->name, impl_names[impl]);
    tu_assert_close(what, o, ref, (int64_t)h.nq, apb_tolerance(APB_PREC_BF16, h.k));
    snprintf(what, sizeof what, "%s: bf16 %s lse", c->name, impl_names[impl]);
    tu_assert_close(what, lse, ref_lse, (int64_t)h.nlse, apb_tolerance(APB_PREC_F32, c->D + h.k));
    const double e = rel_fro(o, ref, h.nq);
    fprintf(stderr, "  %-40s bf16 %-7s o rel_fro %.3g (cpu emulation %.3g, ratio %.2f; rounded oracle %.3g)"
                    "  lse rel_fro %.3g\n",
            c->name, impl_names[impl], e, e_emu, e_emu > 0 ? e / e_emu : 0.0, e_rnd,
            rel_fro(lse, ref_lse, h.nlse));
    ck_assert_msg(e <= 2.0 * e_emu,
                  "%s: bf16 %s: relative Frobenius error %.4g is more than twice the CPU bf16 emulation's "
                  "%.4g (seed %llu)",
                  c->name, impl_names[impl], e, e_emu, (unsigned long long)tu_seed());
    if (impl != APB_CUDA_ATTN_SIMPLE) {
      run_gpu(c, &h, &d, APB_DT_BF16, impl, 0, o_raw2, o2, NULL);
      ck_assert_msg(memcmp(o_raw, o_raw2, h.nq * 2) == 0,
                    "%s: bf16 %s: two runs differ (a race, or lse = NULL changes o)", c->name,
                    impl_names[impl]);
    }
    if (impl == APB_CUDA_ATTN_HOPPER) /* other CTA orders (APB_CUDA_HOPPER_HEAD_GROUP): the same bits */
      for (int g = 0; g <= 3; g += 3) { /* 0: all KV heads interleaved; 3: three at a time */
        float *lse2 = xmalloc_f(h.nlse);
        setenv("APB_CUDA_HOPPER_HEAD_GROUP", g == 0 ? "0" : "3", 1);
        run_gpu(c, &h, &d, APB_DT_BF16, impl, 1, o_raw2, o2, lse2);
        unsetenv("APB_CUDA_HOPPER_HEAD_GROUP");
        ck_assert_msg(memcmp(o_raw, o_raw2, h.nq * 2) == 0 && memcmp(lse, lse2, h.nlse * sizeof *lse) == 0,
                      "%s: bf16 hopper: CTA order with head group %d changes o or lse", c->name, g);
        free(lse2);
      }
  }
  dprob_free(&d);
  free(ref), free(ref_lse), free(emu), free(rnd), free(o), free(lse), free(o2), free(o_raw), free(o_raw2);
  hprob_free(&h);
}
END_TEST

/* An Inf or NaN in the value of key j of a causal segment (local: seg 'b'; anchor: seg 'a'), column
 * col of KV head kv, and optionally a second one (j2 >= 0). The tensor-core kernels multiply a masked
 * key's p = 0 by its value on the causal boundary tile, 0 * Inf = NaN in rows that never see the key
 * (the CPU fast path did, ref/attn_fast.c); they repair such rows (gpu/attn_row.cuh). Cases: one Inf
 * (dense, APB, in the anchor, in the last key, D 64), two keys whose rows in between see only the
 * first (another column; the same column with the other sign), a NaN, a split GQA group (G 160 >
 * the CTA's rows) in the last KV head, and a -Inf in a key (tensor 'k': scores of +-Inf; the exact
 * path must not turn them into o = 0). Every path is checked before the test fails, and the failing
 * ones are named. _i: case. */
static const struct {
  gcase c;
  char tensor, seg; /* 'v' or 'k'; 'b' local or 'a' anchor */
  int kv;           /* KV head */
  int64_t j;
  int col;
  float val;
  int64_t j2; /* -1: none */
  int col2;
  float val2;
} nf_cases[] = {
    {{"inf value: dense B97 G4", 0, 0, 97, 8, 2, 128, 1, 0, 1, 0}, 'v', 'b', 0, 40, 0, INFINITY, -1, 0, 0},
    {{"inf value: apb P67 A67 B113 G4", 67, 67, 113, 8, 2, 128, 1, 0, 1, 0}, 'v', 'b', 1, 50, 0, INFINITY, -1, 0, 0},
    {{"inf value: dense B1025 G8 D64", 0, 0, 1025, 8, 1, 64, 1, 0, 1, 0}, 'v', 'b', 0, 700, 0, INFINITY, -1, 0, 0},
    {{"inf value in the anchor: apb P67 A300 B113 G4", 67, 300, 113, 8, 2, 128, 1, 0, 1, 0}, 'v', 'a', 0, 200, 5,
     INFINITY, -1, 0, 0},
    {{"inf value, last key: dense B257 G1", 0, 0, 257, 4, 4, 64, 1, 0, 1, 0}, 'v', 'b', 3, 256, 0, INFINITY, -1, 0, 0},
    {{"inf values, two keys, two columns: dense B97 G4", 0, 0, 97, 8, 2, 128, 1, 0, 1, 0}, 'v', 'b', 0, 40, 0, INFINITY,
     50, 1, INFINITY},
    {{"inf and -inf, two keys, one column: dense B97 G4", 0, 0, 97, 8, 2, 128, 1, 0, 1, 0}, 'v', 'b', 0, 40, 0,
     INFINITY, 50, 0, -INFINITY},
    {{"nan value: dense B1025 G8 D64", 0, 0, 1025, 8, 1, 64, 1, 0, 1, 0}, 'v', 'b', 0, 700, 3, NAN, -1, 0, 0},
    {{"inf value, split group: apb P1 A67 B3 G160 D64", 1, 67, 3, 160, 1, 64, 1, 0, 1, 0}, 'v', 'b', 0, 1, 0,
     INFINITY, -1, 0, 0},
    {{"-inf in a key: dense B97 G4", 0, 0, 97, 8, 2, 128, 1, 0, 1, 0}, 'k', 'b', 0, 40, 0, -INFINITY, -1, 0, 0},
};
enum { N_NF = sizeof nf_cases / sizeof nf_cases[0] };

START_TEST(test_nonfinite_unseen_value) {
  const gcase *c = &nf_cases[_i].c;
  char failed[512] = "";
  for (int mode = 0; mode < 2; mode++) {
    const apb_dtype dt = mode ? APB_DT_BF16 : APB_DT_F32;
    hprob h;
    hprob_init(&h, c, 100 + (uint64_t)_i);
    if (mode) hprob_round_bf16(&h);
    float *seg = nf_cases[_i].tensor == 'k' ? (nf_cases[_i].seg == 'b' ? h.kb : h.ka)
                                            : (nf_cases[_i].seg == 'b' ? h.vb : h.va);
    const size_t row = (size_t)c->Hkv * (size_t)c->D, head = (size_t)nf_cases[_i].kv * (size_t)c->D;
    seg[(size_t)nf_cases[_i].j * row + head + (size_t)nf_cases[_i].col] = nf_cases[_i].val;
    if (nf_cases[_i].j2 >= 0) seg[(size_t)nf_cases[_i].j2 * row + head + (size_t)nf_cases[_i].col2] = nf_cases[_i].val2;
    float *ref = xmalloc_f(h.nq), *ref_lse = xmalloc_f(h.nlse), *o = xmalloc_f(h.nq), *lse = xmalloc_f(h.nlse);
    unsigned char *o_raw = malloc(h.nq * apb_dtype_size(dt) + GUARD_BYTES);
    ck_assert(o_raw != NULL);
    oracle(&h, ref, ref_lse);
    size_t nonfinite = 0;
    for (size_t i = 0; i < h.nq; i++) nonfinite += !isfinite(ref[i]);
    ck_assert_msg(nonfinite > 0 && nonfinite < h.nq,
                  "%s: the oracle's o has %zu non-finite values of %zu: the case tests nothing", c->name, nonfinite,
                  h.nq);
    dprob d;
    dprob_init(&d, &h, dt);
    const apb_tol tol = apb_tolerance(mode ? APB_PREC_BF16 : APB_PREC_F32, h.k);
    const apb_tol tol_lse = apb_tolerance(APB_PREC_F32, c->D + h.k);
    for (size_t m = 0; m < (mode ? (size_t)N_BF16_IMPLS : 1); m++) {
      const apb_cuda_attn_impl impl = mode ? bf16_impls[m] : APB_CUDA_ATTN_SIMPLE;
      if (mode && !impl_selected(impl)) continue;
      run_gpu(c, &h, &d, dt, impl, 1, o_raw, o, lse);
      char what[200];
      snprintf(what, sizeof what, "%s: %s %s o", c->name, apb_dtype_name(dt), impl_names[impl]);
      int ok = tu_same_class_close(what, o, ref, (int64_t)h.nq, tol);
      snprintf(what, sizeof what, "%s: %s %s lse", c->name, apb_dtype_name(dt), impl_names[impl]);
      ok &= tu_same_class_close(what, lse, ref_lse, (int64_t)h.nlse, tol_lse);
      if (!ok)
        snprintf(failed + strlen(failed), sizeof failed - strlen(failed), " %s/%s", apb_dtype_name(dt),
                 impl_names[impl]);
    }
    dprob_free(&d);
    free(ref), free(ref_lse), free(o), free(lse), free(o_raw);
    hprob_free(&h);
  }
  ck_assert_msg(failed[0] == 0, "seed %llu: %s: these paths differ from the oracle (details above):%s",
                (unsigned long long)tu_seed(), c->name, failed);
}
END_TEST

START_TEST(test_validation) {
  apb_error err = {0};
  char dummy[64] __attribute__((aligned(16)));
  apb_cuda_attn_args x = {.P = 0, .A = 0, .B = 4, .Hq = 4, .Hkv = 2, .D = 64, .local_keys = 1,
                          .dtype = APB_DT_BF16, .q = dummy, .kb = dummy, .vb = dummy, .o = dummy};
  ck_assert_int_eq(apb_cuda_attn(NULL, APB_CUDA_ATTN_TC, NULL, &err), APB_EINVAL);
  apb_cuda_attn_args y = x;
  y.Hq = 6, y.Hkv = 4;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "Hq") != NULL, "message '%s' does not name Hq", err.msg);
  y = x, y.P = 3;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_SIMPLE, NULL, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "kp") != NULL, "message '%s' does not name kp", err.msg);
  y = x, y.kb = NULL;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_EINVAL);
  y = x, y.B = -1;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_EINVAL);
  y = x, y.scale = -1.0f;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_EINVAL);
  y = x, y.D = 257;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_SIMPLE, NULL, &err), APB_EUNSUPPORTED);
  y = x, y.dtype = APB_DT_F16;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_SIMPLE, NULL, &err), APB_EUNSUPPORTED);
  y = x, y.dtype = APB_DT_F32;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_EUNSUPPORTED);
  ck_assert_msg(strstr(err.msg, "SIMPLE") != NULL, "message '%s' does not point to SIMPLE", err.msg);
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_HOPPER, NULL, &err), APB_EUNSUPPORTED);
  ck_assert_int_eq(apb_cuda_attn(&x, (apb_cuda_attn_impl)99, NULL, &err), APB_EINVAL);
  /* No rows: nothing to do, nothing launched, whatever the pointers. */
  y = x, y.B = 0, y.q = NULL, y.o = NULL, y.kb = NULL, y.vb = NULL;
  ck_assert_int_eq(apb_cuda_attn(&y, APB_CUDA_ATTN_TC, NULL, &err), APB_OK);
  ck_assert_int_eq(apb_cuda_synchronize(&err), APB_OK);
}
END_TEST

int main(void) {
  apb_error err = {0};
  int n = 0;
  if (apb_cuda_device_count(&n, &err) != APB_OK) {
    fprintf(stderr, "check_gpu_attn: SKIP: %s\n", err.msg);
    return 77;
  }
  setenv("CK_FORK", "no", 1);
  const char *small = getenv("APB_GPU_SMALL");
  const int only_small = small && *small && strcmp(small, "0") != 0;
  for (int i = 0; i < N_ALL; i++)
    if (!only_small || all_cases[i].small) run_cases[n_run_cases++] = &all_cases[i];
  char desc[APB_ERROR_MSG_MAX];
  if (apb_cuda_device_describe(0, desc, sizeof desc, &err) != APB_OK) memcpy(desc, err.msg, sizeof desc);
  fprintf(stderr, "check_gpu_attn: %s; %d cases%s\n", desc, n_run_cases, only_small ? " (APB_GPU_SMALL)" : "");

  Suite *s = suite_create("gpu_attn");
  TCase *tc = tu_tcase("validation", 60);
  tcase_add_test(tc, test_validation);
  suite_add_tcase(s, tc);
  tc = tu_tcase("f32_simple", 300);
  tcase_add_loop_test(tc, test_f32_simple, 0, n_run_cases);
  suite_add_tcase(s, tc);
  tc = tu_tcase("bf16", 600);
  tcase_add_loop_test(tc, test_bf16, 0, n_run_cases);
  suite_add_tcase(s, tc);
  tc = tu_tcase("nonfinite", 300);
  tcase_add_loop_test(tc, test_nonfinite_unseen_value, 0, N_NF);
  suite_add_tcase(s, tc);
  return tu_run(s, "check_gpu_attn");
}
