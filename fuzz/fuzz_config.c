/* fuzz/fuzz_config.c: libFuzzer target for the config.json parser (lib/config.c, apb_config_parse).
 *
 * Each input is taken as the text of a config.json. A rejected input must come back with the status
 * recorded in the error, a message that starts with the label, and a zeroed configuration. An
 * accepted one must satisfy every promise the rest of apb relies on: positive sizes within the
 * parser's bounds, Hq a multiple of Hkv, an even head dimension, a supported RoPE type with positive
 * theta and factors (llama3: high_freq_factor > low_freq_factor), and RoPE frequencies that are
 * finite, positive and decreasing. Built and run by `make fuzz` / `make fuzz-run` with clang
 * -fsanitize=fuzzer,address,undefined; seeds live in fuzz/corpus/config/ (real and edge-case
 * configurations), tokens in fuzz/config.dict.
 *
 * Not a test of the model loader (which checks tensors against a parsed configuration) and not part
 * of `make check`: tests/check_model.c runs one fixed case per error class instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "apb/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static double inv[2048];
  apb_model_config c;
  apb_error err = {0};
  apb_status st = apb_config_parse((const char *)data, size, "fuzz", &c, &err);
  if (st != APB_OK) {
    if (err.code != st || strncmp(err.msg, "fuzz: ", 6) != 0) abort();
    if (c.n_layers != 0 || c.hidden != 0 || c.arch[0] != 0) abort();
    return 0;
  }
  if (err.code != APB_OK || err.msg[0] != 0) abort();
  if (strcmp(c.arch, "LlamaForCausalLM") != 0 && strcmp(c.arch, "Qwen2ForCausalLM") != 0) abort();
  if (c.n_layers < 1 || c.hidden < 1 || c.ffn < 1 || c.vocab < 1 || c.n_heads < 1 || c.n_kv_heads < 1) abort();
  if (c.n_heads % c.n_kv_heads != 0 || c.head_dim < 2 || c.head_dim % 2 != 0) abort();
  if (!(c.rms_eps > 0) || !isfinite(c.rms_eps) || c.max_pos < 1) abort();
  const apb_rope *r = &c.rope;
  if (!(r->theta > 0) || !isfinite(r->theta) || !(r->factor > 0)) abort();
  switch (r->type) {
  case APB_ROPE_DEFAULT:
  case APB_ROPE_LINEAR: break;
  case APB_ROPE_LLAMA3:
    if (!(r->high_freq_factor > r->low_freq_factor) || !(r->low_freq_factor > 0) || r->original_max_pos < 1) abort();
    break;
  default: abort();
  }
  if (c.head_dim / 2 <= (int)(sizeof inv / sizeof inv[0])) {
    apb_rope_inv_freq(r, c.head_dim, inv);
    for (int i = 0; i < c.head_dim / 2; i++) {
      /* theta < 1 makes frequencies grow with i; theta^(-2i/D) may underflow to 0 for huge theta */
      if (!isfinite(inv[i]) || inv[i] < 0) abort();
      if (i > 0 && r->theta > 1 && r->type != APB_ROPE_LLAMA3 && inv[i] > inv[i - 1]) abort();
    }
  }
  return 0;
}
