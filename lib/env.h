/* lib/env.h: reading the library's numeric environment settings. Not a public header. */
#ifndef APB_LIB_ENV_H
#define APB_LIB_ENV_H

#include "apb/status.h"

/* *out = the seconds in environment variable `name`, or dflt when it is unset or empty. A value that is
 * not a number in [0, 1e9] is APB_EINVAL, naming the variable and its value and saying what 0 means
 * (zero_means, e.g. "waits forever"). */
apb_status apb_env_seconds(const char *name, double dflt, const char *zero_means, double *out, apb_error *err);

#endif /* APB_LIB_ENV_H */
