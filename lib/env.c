/* lib/env.c: see env.h. */
#include "env.h"

#include <stdlib.h>

apb_status apb_env_seconds(const char *name, double dflt, const char *zero_means, double *out, apb_error *err) {
  *out = dflt;
  const char *s = getenv(name);
  if (!s || !*s) return APB_OK;
  char *end = NULL;
  const double v = strtod(s, &end);
  if (end == s || *end || !(v >= 0) || v > 1e9)
    return apb_error_set(err, APB_EINVAL, "%s='%s' is not a number of seconds in [0, 1e9] (0 %s)", name, s,
                         zero_means);
  *out = v;
  return APB_OK;
}
