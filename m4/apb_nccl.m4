# APB_CHECK_NCCL: --with-nccl[=DIR] (default: use it if found; needs the CUDA backend).
# Sets NCCL_CFLAGS, NCCL_LIBS, apb_have_nccl, the HAVE_NCCL conditional and macro.
AC_DEFUN([APB_CHECK_NCCL], [
  AC_REQUIRE([APB_CHECK_CUDA])
  AC_ARG_WITH([nccl],
    [AS_HELP_STRING([--with-nccl@<:@=DIR@:>@], [build the NCCL communicator (default: if found with CUDA)])],
    [], [with_nccl=check])
  apb_have_nccl=no
  AS_IF([test "x$with_nccl" != "xno"], [
    AS_IF([test "x$apb_have_cuda" != "xyes"], [
      AS_IF([test "x$with_nccl" != "xcheck"], [AC_MSG_ERROR([--with-nccl needs the CUDA backend, which was not found or was disabled])])
    ], [
      NCCL_CFLAGS=""; NCCL_LIBS="-lnccl"
      AS_IF([test "x$with_nccl" != "xyes" && test "x$with_nccl" != "xcheck"], [
        NCCL_CFLAGS="-I$with_nccl/include"
        apb_nccl_libdir="$with_nccl/lib"
        AS_IF([test -d "$with_nccl/lib64"], [apb_nccl_libdir="$with_nccl/lib64"])
        NCCL_LIBS="-L$apb_nccl_libdir -Wl,-rpath,$apb_nccl_libdir -lnccl"
      ])
      apb_save_CFLAGS=$CFLAGS; apb_save_LIBS=$LIBS
      CFLAGS="$CFLAGS $NCCL_CFLAGS $CUDA_CFLAGS"; LIBS="$NCCL_LIBS $CUDA_LIBS $LIBS"
      AC_MSG_CHECKING([whether NCCL links])
      AC_LINK_IFELSE([AC_LANG_PROGRAM([[#include <nccl.h>]], [[int v = 0; return ncclGetVersion(&v) == ncclSuccess && v < 0;]])],
        [AC_MSG_RESULT([yes]); apb_have_nccl=yes], [AC_MSG_RESULT([no])])
      CFLAGS=$apb_save_CFLAGS; LIBS=$apb_save_LIBS
      AS_IF([test "x$apb_have_nccl" = "xno" && test "x$with_nccl" != "xcheck"],
        [AC_MSG_ERROR([--with-nccl was given but nccl.h / libnccl were not found (try --with-nccl=DIR)])])
    ])
  ])
  AS_IF([test "x$apb_have_nccl" = "xyes"], [AC_DEFINE([HAVE_NCCL], [1], [Define to 1 when the NCCL communicator is built.])])
  AM_CONDITIONAL([HAVE_NCCL], [test "x$apb_have_nccl" = "xyes"])
  AC_SUBST([NCCL_CFLAGS]) AC_SUBST([NCCL_LIBS])
])
