# APB_CHECK_OPENBLAS: OpenBLAS through pkg-config, with a fallback to -lopenblas.
# Sets OPENBLAS_CFLAGS and OPENBLAS_LIBS; fails when no cblas with openblas_set_num_threads links.
AC_DEFUN([APB_CHECK_OPENBLAS], [
  PKG_CHECK_MODULES([OPENBLAS], [openblas], [apb_blas_pc=yes], [apb_blas_pc=no])
  AS_IF([test "x$apb_blas_pc" = "xno"], [
    OPENBLAS_CFLAGS=""
    for d in /usr/include/openblas /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/x86_64-linux-gnu; do
      AS_IF([test -f "$d/cblas.h"], [OPENBLAS_CFLAGS="-I$d"; break])
    done
    OPENBLAS_LIBS="-lopenblas"
  ])
  apb_save_CFLAGS=$CFLAGS; apb_save_LIBS=$LIBS
  CFLAGS="$CFLAGS $OPENBLAS_CFLAGS"; LIBS="$OPENBLAS_LIBS $LIBS"
  AC_MSG_CHECKING([for cblas_sgemm and openblas_set_num_threads])
  AC_LINK_IFELSE([AC_LANG_PROGRAM([[#include <cblas.h>]],
      [[float a = 1, b = 1, c = 0; openblas_set_num_threads(1);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, 1, 1, 1.0f, &a, 1, &b, 1, 0.0f, &c, 1);
        return (int)openblas_get_num_threads() < 0;]])],
    [AC_MSG_RESULT([yes])],
    [AC_MSG_RESULT([no])
     AC_MSG_ERROR([OpenBLAS (cblas) is required: apt-get install libopenblas-dev, or set OPENBLAS_CFLAGS and OPENBLAS_LIBS])])
  CFLAGS=$apb_save_CFLAGS; LIBS=$apb_save_LIBS
  AC_SUBST([OPENBLAS_CFLAGS]) AC_SUBST([OPENBLAS_LIBS])
])
