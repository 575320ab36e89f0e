/* apb/cost.h: the cost model. For a plan it counts, per host, exactly what the schedules do: the
 * useful attention FLOPs, the projection/FFN/scorer FLOPs, and the logical bytes each collective
 * delivers (the same convention as apb_comm_stats), and turns them into predicted times from
 * hardware rates. tests/check_sched.c checks the counts against the simulator's own counters, so the
 * model's inputs are trusted; its rates are the user's (defaults: one H100, shared/GPU.md).
 *
 * Time per host = attention FLOPs / attn rate + linear FLOPs / GEMM rate + elementwise bytes / memory
 * bandwidth + bytes sent / link bandwidth + collectives x link latency; nothing overlaps (an upper
 * bound when communication is hidden behind compute). docs/performance.md compares it with
 * measurements.
 */
#ifndef APB_COST_H
#define APB_COST_H

#include <stdint.h>

#include "apb/model.h"
#include "apb/sched.h"
#include "apb/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct apb_hw {
  double attn_flops_s;   /* attention, useful FLOP/s (default 5.9e14: cuDNN causal, 32K, H100) */
  double gemm_flops_s;   /* dense GEMM FLOP/s (default 7.48e14: bf16 8192^3, H100) */
  double mem_bytes_s;    /* device memory bytes/s (default 3.0e12: copy, H100) */
  double link_bytes_s;   /* per-host send bandwidth (default 2.74e11: NCCL all-gather bus bw, 4 x H100) */
  double link_latency_s; /* per collective call (default 2e-5) */
} apb_hw;

void apb_hw_default(apb_hw *hw);

typedef struct apb_cost {
  /* prefill, this host, all layers */
  double attn_flops, linear_flops, elem_bytes;
  int64_t bytes_sent, bytes_recv, collectives;
  /* query + decode phase, this host */
  int64_t dec_bytes_sent, dec_collectives;
  /* predicted prefill seconds, by part, and in total */
  double t_attn, t_linear, t_elem, t_comm, t_total;
} apb_cost;

/* Fill out[0..H-1] for plan p of a model with config cfg (scorer width I) and activations of act_bytes
 * bytes per element. APB_EINVAL (or apb_config_check's status) for a NULL argument, a configuration
 * apb_config_check refuses, I < 0, act_bytes < 1, or a rate of hw that is not finite and positive (the
 * latency: finite and >= 0). */
apb_status apb_cost_plan(const apb_plan *p, const apb_model_config *cfg, int scorer_width, int act_bytes,
                         const apb_hw *hw, apb_cost *out, apb_error *err);

/* One measured prefill for apb_cost_fit: the per-host counts of its plan (apb_cost_plan's out[0..H-1],
 * at any rates: only the FLOPs, bytes and collectives are read) and the seconds it took. */
typedef struct apb_cost_obs {
  const apb_cost *hosts;
  int H;
  double seconds;
} apb_cost_obs;

/* The slowest host's predicted prefill seconds of o at rates hw (as apb_cost_plan's t_total). */
double apb_cost_obs_time(const apb_cost_obs *o, const apb_hw *hw);

/* Fit the attention and GEMM rates of *hw to measurements: the two rates that minimise the largest
 * relative error |predicted / measured - 1| over obs[0..n-1], the prediction being the slowest host's
 * time as in apb_cost_plan. hw's memory bandwidth, link bandwidth and latency are kept (they must be
 * positive, latency >= 0): the elementwise bytes and the linear FLOPs of a host are both proportional
 * to the rows it holds, so whole-prefill times cannot tell the memory rate from the GEMM rate (take it
 * from `apb bench gpu-ops` or keep the default). The search is over log-spaced rates from 10 to 5000
 * TFLOP/s, 2% steps first, then refined around the best point twice (0.2%, then 0.02% steps); ties
 * keep the lowest rates. *max_err (may be NULL) gets the largest error at the fit; *at_edge (may be
 * NULL) is set to 1 when a rate ended on a bound of the search: the measurements do not pin it down.
 * APB_EINVAL when n < 1, a measurement is not a positive finite number, or an observation has no
 * hosts. */
apb_status apb_cost_fit(const apb_cost_obs *obs, int n, apb_hw *hw, double *max_err, int *at_edge, apb_error *err);

#ifdef __cplusplus
}
#endif
#endif /* APB_COST_H */
