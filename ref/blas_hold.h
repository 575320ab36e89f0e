/* ref/blas_hold.h: OpenBLAS held at one thread while CPU reference code calls it from its own OpenMP
 * threads (not installed).
 *
 * Why: OpenBLAS's pthread build gives different bits at 1 thread than at 2 or more for some sgemm
 * shapes, and would oversubscribe the cores when called from inside an OpenMP region. Every caller
 * in ref/ (the fast attention and the fast backend) brackets its sgemm calls with hold/release. One
 * count, under one named critical section, is shared by all of them, so overlapping callers on
 * different threads never restore OpenBLAS's count while another still needs it at one. The calling
 * thread's OpenMP team size is put back after each change (OpenBLAS's OpenMP build alters it).
 * Tested by the thread-count determinism cases of tests/check_attn.c and tests/check_backend.c.
 */
#ifndef APB_REF_BLAS_HOLD_H
#define APB_REF_BLAS_HOLD_H

void apb_ref_blas_hold(void);
void apb_ref_blas_release(void);

#endif /* APB_REF_BLAS_HOLD_H */
