/* tests/check_gpu.c: the GPU smoke suite. Exits 77 (automake's SKIP) when the library has no CUDA
 * backend or the driver reports no device. Discovery touches CUDA in this process, so the suite runs
 * with CK_FORK=no: no CUDA state is ever inherited by a forked child. On a GPU machine it checks that device discovery answers sensibly. The stage-by-stage
 * agreement suites live in tests/check_gpu_agree.c. */
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

START_TEST(test_device_describe) {
  apb_error err = {0};
  int n = 0;
  ck_assert_int_eq(apb_cuda_device_count(&n, &err), APB_OK);
  ck_assert_int_ge(n, 1);
  for (int d = 0; d < n; d++) {
    char buf[256];
    ck_assert_msg(apb_cuda_device_describe(d, buf, sizeof buf, &err) == APB_OK, "%s", err.msg);
    ck_assert_msg(strstr(buf, "SMs") != NULL, "description '%s' lacks the SM count", buf);
    fprintf(stderr, "  %s\n", buf);
  }
  ck_assert_int_ne(apb_cuda_device_describe(n + 7, (char[64]){0}, 64, &err), APB_OK);
}
END_TEST

int main(void) {
  apb_error err = {0};
  int n = 0;
  if (apb_cuda_device_count(&n, &err) != APB_OK) {
    fprintf(stderr, "check_gpu: SKIP: %s\n", err.msg);
    return 77;
  }
  setenv("CK_FORK", "no", 1);
  Suite *s = suite_create("gpu");
  TCase *tc = tu_tcase("discovery", 60);
  tcase_add_test(tc, test_device_describe);
  suite_add_tcase(s, tc);
  return tu_run(s, "check_gpu");
}
