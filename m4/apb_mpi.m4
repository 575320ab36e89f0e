# APB_CHECK_MPI: --with-mpi (default: use it if found). Takes the flags from pkg-config (ompi-c, mpich)
# or from the mpicc wrapper, then checks that MPI_Init links.
# Sets MPI_CFLAGS, MPI_LIBS, MPIRUN, apb_have_mpi, the HAVE_MPI conditional and macro.
AC_DEFUN([APB_CHECK_MPI], [
  AC_ARG_WITH([mpi],
    [AS_HELP_STRING([--with-mpi], [build the MPI communicator (default: if found)])],
    [], [with_mpi=check])
  apb_have_mpi=no
  AS_IF([test "x$with_mpi" != "xno"], [
    PKG_CHECK_MODULES([MPI], [ompi-c], [apb_mpi_found=yes], [
      PKG_CHECK_MODULES([MPI], [mpich], [apb_mpi_found=yes], [apb_mpi_found=no])])
    AS_IF([test "x$apb_mpi_found" = "xno"], [
      AC_PATH_PROGS([MPICC], [mpicc])
      AS_IF([test -n "$MPICC"], [
        MPI_CFLAGS=`$MPICC --showme:compile 2>/dev/null || $MPICC -compile_info 2>/dev/null | cut -d' ' -f2-`
        MPI_LIBS=`$MPICC --showme:link 2>/dev/null || $MPICC -link_info 2>/dev/null | cut -d' ' -f2-`
        apb_mpi_found=yes])
    ])
    AS_IF([test "x$apb_mpi_found" = "xyes"], [
      apb_save_CFLAGS=$CFLAGS; apb_save_LIBS=$LIBS
      CFLAGS="$CFLAGS $MPI_CFLAGS"; LIBS="$MPI_LIBS $LIBS"
      AC_MSG_CHECKING([whether MPI links])
      AC_LINK_IFELSE([AC_LANG_PROGRAM([[#include <mpi.h>]], [[int r = 0; MPI_Init(0, 0); MPI_Comm_rank(MPI_COMM_WORLD, &r); MPI_Finalize(); return r;]])],
        [AC_MSG_RESULT([yes]); apb_have_mpi=yes], [AC_MSG_RESULT([no])])
      CFLAGS=$apb_save_CFLAGS; LIBS=$apb_save_LIBS
    ])
    AS_IF([test "x$apb_have_mpi" = "xno" && test "x$with_mpi" != "xcheck"],
      [AC_MSG_ERROR([--with-mpi was given but no MPI that links was found: apt-get install libopenmpi-dev openmpi-bin])])
  ])
  AC_PATH_PROGS([MPIRUN], [mpirun mpiexec], [])
  AS_IF([test "x$apb_have_mpi" = "xyes"], [AC_DEFINE([HAVE_MPI], [1], [Define to 1 when the MPI communicator is built.])])
  AS_IF([test "x$apb_have_mpi" = "xyes" && test -n "$MPIRUN"],
    [AC_DEFINE_UNQUOTED([APB_MPIRUN], ["$MPIRUN"], [The mpirun that tests use to start several hosts.])])
  AM_CONDITIONAL([HAVE_MPI], [test "x$apb_have_mpi" = "xyes"])
  AC_SUBST([MPI_CFLAGS]) AC_SUBST([MPI_LIBS]) AC_SUBST([MPIRUN])
])
