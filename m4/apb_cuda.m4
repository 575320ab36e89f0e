# APB_CHECK_CUDA: --with-cuda[=DIR] (default: use it if found) and --with-cuda-arch=ARCH (default sm_90a).
# Sets NVCC, CUDA_CFLAGS, CUDA_LIBS, NVCC_ARCH_FLAGS, apb_have_cuda, the HAVE_CUDA conditional and macro.
AC_DEFUN([APB_CHECK_CUDA], [
  AC_ARG_WITH([cuda],
    [AS_HELP_STRING([--with-cuda@<:@=DIR@:>@], [build the CUDA backend (default: if found; DIR is the toolkit root)])],
    [], [with_cuda=check])
  AC_ARG_WITH([cuda-arch],
    [AS_HELP_STRING([--with-cuda-arch=ARCH], [GPU target, e.g. sm_90a, sm_90, sm_80 (default: sm_90a)])],
    [apb_cuda_arch=$withval], [apb_cuda_arch=sm_90a])
  apb_have_cuda=no
  AS_IF([test "x$with_cuda" != "xno"], [
    apb_cuda_dirs="/usr/local/cuda /usr"
    AS_IF([test "x$with_cuda" != "xyes" && test "x$with_cuda" != "xcheck"], [apb_cuda_dirs="$with_cuda"])
    AS_IF([test -n "$CUDA_HOME" && test "x$with_cuda" = "xcheck"], [apb_cuda_dirs="$CUDA_HOME $apb_cuda_dirs"])
    for d in $apb_cuda_dirs; do
      AS_IF([test -x "$d/bin/nvcc" && test -f "$d/include/cuda_runtime.h"], [apb_cuda_home=$d; break])
    done
    AS_IF([test -n "$apb_cuda_home"], [
      NVCC="$apb_cuda_home/bin/nvcc"
      CUDA_CFLAGS="-I$apb_cuda_home/include"
      apb_cuda_libdir="$apb_cuda_home/lib64"
      AS_IF([test -d "$apb_cuda_libdir"], [], [apb_cuda_libdir="$apb_cuda_home/lib"])
      CUDA_LIBS="-L$apb_cuda_libdir -Wl,-rpath,$apb_cuda_libdir -lcublas -lcudart -lstdc++"
      apb_save_CFLAGS=$CFLAGS; apb_save_LIBS=$LIBS
      CFLAGS="$CFLAGS $CUDA_CFLAGS"; LIBS="$CUDA_LIBS $LIBS"
      AC_MSG_CHECKING([whether cudart and cuBLAS link])
      AC_LINK_IFELSE([AC_LANG_PROGRAM([[#include <cuda_runtime.h>
#include <cublas_v2.h>]], [[int n = 0; cublasHandle_t h; (void)h; return cudaGetDeviceCount(&n) == 12345 || cublasCreate(0) == 12345;]])],
        [AC_MSG_RESULT([yes]); apb_have_cuda=yes], [AC_MSG_RESULT([no])])
      CFLAGS=$apb_save_CFLAGS; LIBS=$apb_save_LIBS
    ])
    AS_IF([test "x$apb_have_cuda" = "xno" && test "x$with_cuda" != "xcheck"],
      [AC_MSG_ERROR([--with-cuda was given but no usable CUDA toolkit (nvcc, cuda_runtime.h, libcudart, libcublas) was found in: $apb_cuda_dirs])])
  ])
  AS_CASE([$apb_cuda_arch],
    [sm_90a], [NVCC_ARCH_FLAGS="-gencode=arch=compute_90a,code=sm_90a"],
    [sm_*], [apb_cc=`echo $apb_cuda_arch | sed 's/^sm_//'`; NVCC_ARCH_FLAGS="-gencode=arch=compute_$apb_cc,code=sm_$apb_cc"],
    [AC_MSG_ERROR([--with-cuda-arch wants a value like sm_90a or sm_80, not '$apb_cuda_arch'])])
  AS_IF([test "x$apb_have_cuda" = "xyes"], [AC_DEFINE([HAVE_CUDA], [1], [Define to 1 when the CUDA backend is built.])])
  AM_CONDITIONAL([HAVE_CUDA], [test "x$apb_have_cuda" = "xyes"])
  AC_SUBST([NVCC]) AC_SUBST([CUDA_CFLAGS]) AC_SUBST([CUDA_LIBS]) AC_SUBST([NVCC_ARCH_FLAGS])
])
