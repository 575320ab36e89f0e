/* lib/be_check.h: argument checks every compute backend shares (not installed).
 *
 * The CPU backends (ref/) and the CUDA backend (gpu/) validate the same arguments with the same
 * messages; the checks that do not depend on where memory lives are here, once. Each returns APB_OK
 * or APB_EINVAL with a message naming the op, the argument and the values. Tested through both
 * backends (tests/check_backend.c, tests/check_gpu_agree.c).
 */
#ifndef APB_LIB_BE_CHECK_H
#define APB_LIB_BE_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "apb/model.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* p is not NULL. */
apb_status apb_bc_need(apb_error *err, const char *op, const char *arg, const void *p);
/* v >= lo. */
apb_status apb_bc_len(apb_error *err, const char *op, const char *arg, int64_t v, int64_t lo);
/* [a, a+na) and [b, b+nb) do not overlap (NULL or empty ranges never do). */
apb_status apb_bc_disjoint(apb_error *err, const char *op, const char *an, const void *a, size_t na, const char *bn,
                           const void *b, size_t nb);
/* copy2d's arguments (apb/backend.h): pointers present, width within both pitches, sizes that fit, and
 * no dst row overlapping any src row. Call only with width > 0 and rows > 0. */
apb_status apb_bc_copy2d(apb_error *err, const void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                         size_t rows);
/* A weight of shape [wN, wK] (present: the weight pointer is not NULL) where [N, K] is wanted; N < 0 or
 * K < 0 accepts any extent. */
apb_status apb_bc_weight(apb_error *err, const char *op, const char *arg, int present, int64_t wN, int64_t wK,
                         int64_t N, int64_t K);
/* topk's shape arguments: R, T >= 0, T within int32 indices, 0 <= lo <= T, 0 <= k <= T - lo, and s
 * present when there is anything to read (R > 0 and T > lo). */
apb_status apb_bc_topk(apb_error *err, const float *s, int R, int64_t T, int64_t lo, int64_t k);
/* maxpool's arguments: R, T >= 0, w odd >= 1, s and out present and disjoint when R*T > 0. */
apb_status apb_bc_maxpool(apb_error *err, const float *s, int R, int64_t T, int w, const float *out);
/* The elementwise ops' arguments after their weight check (elements of es bytes): T (n) >= 0, and when
 * there is anything to do the pointers present and, where the op requires it, output and input disjoint.
 * embed: ids and out; rmsnorm: also eps finite and > 0, x and y [T, E] (the same or apart); swiglu: F >= 1, out
 * [T, F] apart from gu [T, 2F]; add: y and x (may alias). */
apb_status apb_bc_embed(apb_error *err, int64_t T, const void *ids, const void *out);
apb_status apb_bc_rmsnorm(apb_error *err, float eps, int64_t T, int64_t E, size_t es, const void *x, const void *y);
/* linear's arguments after its weight check (w [N, K], N, K >= 1): T >= 0 and, when T > 0, the sizes
 * within int64, x [T, K] and y [T, N] present and apart. */
apb_status apb_bc_linear(apb_error *err, int64_t T, int64_t N, int64_t K, size_t es, const void *x, const void *y);
apb_status apb_bc_swiglu(apb_error *err, int64_t T, int64_t F, const void *gu, const void *out, size_t es);
apb_status apb_bc_add(apb_error *err, size_t n, const void *y, const void *x);
/* split_rope's arguments (elements of es bytes): T >= 0, Hq, Hkv >= 1, D even >= 2, rope present, the
 * shape within range, and when T > 0 every pointer present and q, k, v apart from qkv and each other;
 * then *inv_freq = the rope's D/2 inverse frequencies (apb_rope_inv_freq; malloc'd, the caller frees
 * it), each finite and >= 0. *inv_freq is NULL after a failure. */
apb_status apb_bc_split_rope(apb_error *err, const void *qkv, int64_t T, int Hq, int Hkv, int D, const void *pos,
                             const apb_rope *rope, const void *q, const void *k, const void *v, size_t es,
                             double **inv_freq);

#ifdef __cplusplus
}
#endif
#endif /* APB_LIB_BE_CHECK_H */
