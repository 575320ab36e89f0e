/* ref/blas_hold.c: see blas_hold.h. */
#include "blas_hold.h"

#include <cblas.h>
#include <omp.h>

static int blas_users; /* holds in flight, over every caller and thread */
static int blas_saved; /* OpenBLAS's thread count before the first of them */

void apb_ref_blas_hold(void) {
  const int omp_nth = omp_get_max_threads();
#pragma omp critical(apb_openblas_threads)
  {
    if (blas_users++ == 0) {
      blas_saved = openblas_get_num_threads();
      openblas_set_num_threads(1);
    }
  }
  omp_set_num_threads(omp_nth);
}

void apb_ref_blas_release(void) {
  const int omp_nth = omp_get_max_threads();
#pragma omp critical(apb_openblas_threads)
  {
    if (--blas_users == 0) openblas_set_num_threads(blas_saved);
  }
  omp_set_num_threads(omp_nth);
}
