/* apb/status.h: status codes and error details returned by every library call.
 *
 * The library never prints and never exits. A call returns an apb_status; when the caller passes an
 * apb_error, the call also writes a one-line message naming what was wrong (the file, the tensor, the
 * option, the expected and actual values) and, where it helps, what to do. Programs decide how to
 * report it. Not thread-shared: give each thread its own apb_error.
 */
#ifndef APB_STATUS_H
#define APB_STATUS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum apb_status {
  APB_OK = 0,
  APB_EINVAL,       /* an argument, shape or option is out of its domain */
  APB_ENOMEM,       /* host or device allocation failed */
  APB_EIO,          /* a file could not be opened, read, written or mapped */
  APB_EFORMAT,      /* a file or JSON document is malformed */
  APB_ENOTFOUND,    /* a named tensor, key or file is missing */
  APB_EUNSUPPORTED, /* well-formed but not supported (dtype, architecture, rope type, ...) */
  APB_ENONFINITE,   /* NaN or Inf where finite values are required */
  APB_ECOMM,        /* a collective or point-to-point transfer failed, or a peer aborted */
  APB_EDEVICE,      /* CUDA, cuBLAS or driver error */
  APB_ENODEVICE,    /* no GPU (or no GPU backend compiled in) */
  APB_ETIMEOUT,     /* a peer did not answer in time */
  APB_EMISMATCH,    /* a comparison found values outside tolerance */
  APB_STATUS_COUNT
} apb_status;

/* Static, never NULL, for every value (unknown values give "unknown status"). */
const char *apb_status_str(apb_status s);

#define APB_ERROR_MSG_MAX 512

typedef struct apb_error {
  apb_status code;
  char msg[APB_ERROR_MSG_MAX]; /* NUL-terminated; empty when code == APB_OK */
} apb_error;

/* Record code and a printf-style message into err (if err is non-NULL); returns code, so that
 * `return apb_error_set(err, APB_EINVAL, "...", ...);` reads naturally. A message already present is
 * kept as context: the new text is prepended ("new: old"), so outer calls add where they were. */
apb_status apb_error_set(apb_error *err, apb_status code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Clear err (code APB_OK, empty message). NULL is allowed. */
void apb_error_clear(apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_STATUS_H */
