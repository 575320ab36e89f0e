/* lib/status.c: status strings and the error-detail helper of apb/status.h.
 * Tested by tests/check_safetensors.c and every suite that asserts on error messages. */
#include "apb/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *apb_status_str(apb_status s) {
  switch (s) {
  case APB_OK: return "ok";
  case APB_EINVAL: return "invalid argument";
  case APB_ENOMEM: return "out of memory";
  case APB_EIO: return "I/O error";
  case APB_EFORMAT: return "malformed input";
  case APB_ENOTFOUND: return "not found";
  case APB_EUNSUPPORTED: return "unsupported";
  case APB_ENONFINITE: return "non-finite value";
  case APB_ECOMM: return "communication error";
  case APB_EDEVICE: return "device error";
  case APB_ENODEVICE: return "no device";
  case APB_ETIMEOUT: return "timed out";
  case APB_EMISMATCH: return "mismatch";
  case APB_STATUS_COUNT: break;
  }
  return "unknown status";
}

apb_status apb_error_set(apb_error *err, apb_status code, const char *fmt, ...) {
  if (!err) return code;
  char prev[APB_ERROR_MSG_MAX];
  size_t plen = strnlen(err->msg, sizeof err->msg);
  int had = err->code != APB_OK && plen > 0;
  if (had) memcpy(prev, err->msg, plen + 1 <= sizeof prev ? plen + 1 : sizeof prev), prev[sizeof prev - 1] = 0;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  if (had && n >= 0 && (size_t)n + 3 < sizeof err->msg) { /* append ": prev", truncated to fit */
    size_t at = (size_t)n, room = sizeof err->msg - at - 3, plen2 = strlen(prev);
    if (plen2 > room) plen2 = room;
    err->msg[at] = ':', err->msg[at + 1] = ' ';
    memcpy(err->msg + at + 2, prev, plen2);
    err->msg[at + 2 + plen2] = 0;
  }
  err->code = code;
  return code;
}

void apb_error_clear(apb_error *err) {
  if (!err) return;
  err->code = APB_OK;
  err->msg[0] = 0;
}
