/* lib/cost.c: the cost model (apb/cost.h). Each count mirrors one place of the schedules (sched/):
 * attention pairs as sched_attn_flops, linear FLOPs as sched_linear, bytes as the communicator's
 * logical counts. Changing a schedule means changing its mirror here; tests/check_sched.c fails
 * otherwise. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "apb/cost.h"

void apb_hw_default(apb_hw *hw) {
  hw->attn_flops_s = 5.9e14;
  hw->gemm_flops_s = 7.48e14;
  hw->mem_bytes_s = 3.0e12;
  hw->link_bytes_s = 2.74e11;
  hw->link_latency_s = 2e-5;
}

/* c's predicted seconds at rates hw, by part and in total, from its counts. */
static void set_times(apb_cost *c, const apb_hw *hw) {
  c->t_attn = c->attn_flops / hw->attn_flops_s;
  c->t_linear = c->linear_flops / hw->gemm_flops_s;
  c->t_elem = c->elem_bytes / hw->mem_bytes_s;
  c->t_comm = (double)c->bytes_sent / hw->link_bytes_s + (double)c->collectives * hw->link_latency_s;
  c->t_total = c->t_attn + c->t_linear + c->t_elem + c->t_comm;
}

double apb_cost_obs_time(const apb_cost_obs *o, const apb_hw *hw) {
  double t = 0;
  for (int r = 0; r < o->H; r++) {
    apb_cost x = o->hosts[r];
    set_times(&x, hw);
    t = x.t_total > t ? x.t_total : t;
  }
  return t;
}

/* visible (row, key) pairs of one segmented attention call (apb/attn.h) */
static double pairs(int64_t P, int64_t A, int64_t B, int local_keys) {
  double x = (double)A * (double)(A + 1) / 2.0 + (double)B * (double)(P + A);
  if (local_keys) x += (double)B * (double)(B + 1) / 2.0;
  return x;
}

static int64_t blk(const apb_plan *p, int r) { return p->block_start[r + 1] - p->block_start[r]; }
static int64_t chunk(const apb_plan *p, int c) { return p->chunk_start[c + 1] - p->chunk_start[c]; }

apb_status apb_cost_plan(const apb_plan *p, const apb_model_config *cfg, int scorer_width, int act_bytes,
                         const apb_hw *hw, apb_cost *out, apb_error *err) {
  if (!p || !cfg || !hw || !out)
    return apb_error_set(err, APB_EINVAL, "cost model: %s is NULL", !p ? "plan" : !cfg ? "cfg" : !hw ? "hw" : "out");
  apb_status cst = apb_config_check(cfg, err);
  if (cst != APB_OK) return apb_error_set(err, cst, "cost model");
  if (scorer_width < 0)
    return apb_error_set(err, APB_EINVAL, "cost model: scorer_width=%d must be >= 0", scorer_width);
  if (p->H < 1 || p->H > APB_MAX_HOSTS || (unsigned)p->o.method >= APB_METHOD_COUNT)
    return apb_error_set(err, APB_EINVAL, "cost model: the plan (H=%d, method %d) was not made by apb_plan_make",
                         p->H, (int)p->o.method);
  const struct {
    const char *name;
    double v;
  } rate[] = {{"attn_flops_s", hw->attn_flops_s},
              {"gemm_flops_s", hw->gemm_flops_s},
              {"mem_bytes_s", hw->mem_bytes_s},
              {"link_bytes_s", hw->link_bytes_s}};
  for (size_t i = 0; i < sizeof rate / sizeof rate[0]; i++) /* a zero or NaN rate would give inf or NaN times */
    if (!isfinite(rate[i].v) || !(rate[i].v > 0))
      return apb_error_set(err, APB_EINVAL, "cost model: hw %s=%g must be finite and > 0", rate[i].name, rate[i].v);
  if (!isfinite(hw->link_latency_s) || !(hw->link_latency_s >= 0))
    return apb_error_set(err, APB_EINVAL, "cost model: hw link_latency_s=%g must be finite and >= 0",
                         hw->link_latency_s);
  int H = p->H, L = cfg->n_layers, Hq = cfg->n_heads, Hkv = cfg->n_kv_heads, D = cfg->head_dim;
  double E = cfg->hidden, F = cfg->ffn, QKV = (double)(Hq + 2 * Hkv) * D, es = act_bytes;
  if (act_bytes <= 0) return apb_error_set(err, APB_EINVAL, "cost model: act_bytes must be positive");
  /* the byte counts are int64: refuse sizes whose largest count (every layer moving every row's q, k, v,
   * o and FFN activations H times) could pass 2^62, rather than wrap silently */
  const double worst = (double)p->n * (E + QKV + 3 * F + (double)Hq * D + 4.0 * Hq) * es * L * (H + 1) * 4;
  if (!(worst < 4.6e18))
    return apb_error_set(err, APB_EUNSUPPORTED,
                         "cost model: %lld tokens x %d layers at these sizes exceed its 64-bit byte counts",
                         (long long)p->n, L);
  apb_method m = p->o.method;
  for (int r = 0; r < H; r++) {
    apb_cost *c = &out[r];
    memset(c, 0, sizeof *c);
    int64_t A = 0, B = blk(p, r);
    int vv[2] = {r, r}, nv = 1;
    if (m == APB_METHOD_STAR || m == APB_METHOD_APB) {
      apb_plan_virtual(p, r, vv, &nv);
      B = 0;
      for (int j = 0; j < nv; j++) B += blk(p, vv[j]);
      if (r > 0 || p->balance) A = p->la;
    }
    if (m == APB_METHOD_ZIGZAG) B = chunk(p, r) + chunk(p, 2 * H - 1 - r);
    if (m == APB_METHOD_DENSE) B = p->n;
    int64_t T = A + B;
    double pr = 0; /* pairs per layer, counted in units of one head of dimension D */
    double hq_eff = Hq;
    double kvrow = (double)Hkv * D * es;
    double keys_copied = 0; /* apb: rows of [P_v | A] copied together per layer (K and V each) */
    switch (m) {
    case APB_METHOD_DENSE: pr = pairs(0, A, B, 1); break;
    case APB_METHOD_STAR:
    case APB_METHOD_APB: {
      int passing = m == APB_METHOD_APB && p->lp > 0 && p->V > 1;
      int64_t mine = 0, total = 0;
      for (int v = 0; v < p->V; v++) total += p->n_sel[v];
      for (int j = 0; j < nv && passing; j++) {
        mine += p->n_sel[vv[j]];
        if (p->n_sel[vv[j]] > 0 && p->o.scorer == APB_SCORER_RETAINING)
          c->linear_flops += 2.0 * (double)blk(p, vv[j]) * scorer_width * (QKV + Hkv);
      }
      if (!p->balance) { /* one call over [P_r | A | B_r] (or its split or anchor-first forms: the same pairs) */
        int64_t P = 0;
        for (int w = 0; passing && w < r; w++) P += p->n_sel[w];
        pr = pairs(P, A, B, 1);
        if (p->overlap == APB_OVERLAP_ANCHOR && P > 0) keys_copied = (double)(P + A);
      } else {           /* the anchor rows, then each virtual block against [P_v | A] and itself */
        pr = pairs(0, A, 0, 1);
        for (int j = 0; j < nv; j++) {
          int64_t Pv = 0, Bj = blk(p, vv[j]);
          for (int w = 0; passing && w < vv[j]; w++) Pv += p->n_sel[w];
          pr += pairs(vv[j] == 0 ? 0 : Pv + A, 0, Bj, 1);
          if (passing && vv[j] > 0) keys_copied += (double)(p->overlap == APB_OVERLAP_SPLIT ? Pv : Pv + A);
        }
      }
      if (passing) {
        c->bytes_sent = 2 * (int64_t)((double)mine * kvrow) * (H - 1);
        c->bytes_recv = 2 * (int64_t)((double)(total - mine) * kvrow);
        c->collectives = 2;
      }
      break;
    }
    case APB_METHOD_RING: {
      pr = pairs(0, 0, B, 1);
      for (int s = 1; s < H; s++) {
        int j = (r - s + H) % H, jsend = (r - s + 1 + H) % H;
        if (j < r) pr += (double)B * (double)blk(p, j);
        c->bytes_sent += (int64_t)(2.0 * (double)blk(p, jsend) * kvrow);
        c->bytes_recv += (int64_t)(2.0 * (double)blk(p, j) * kvrow);
      }
      c->collectives = H - 1;
      break;
    }
    case APB_METHOD_ZIGZAG: {
      int64_t c0 = chunk(p, r), c1 = chunk(p, 2 * H - 1 - r);
      pr = pairs(0, 0, c0, 1) + pairs(c0, 0, c1, 1);
      for (int s = 1; s < H; s++) {
        int j = (r - s + H) % H, jsend = (r - s + 1 + H) % H;
        int64_t j0 = chunk(p, j), jall = j0 + chunk(p, 2 * H - 1 - j);
        int64_t sall = chunk(p, jsend) + chunk(p, 2 * H - 1 - jsend);
        if (j < r) pr += (double)c0 * (double)j0;
        pr += (double)c1 * (double)(j > r ? jall : j0);
        c->bytes_sent += (int64_t)(2.0 * (double)sall * kvrow);
        c->bytes_recv += (int64_t)(2.0 * (double)jall * kvrow);
      }
      c->collectives = H - 1;
      break;
    }
    case APB_METHOD_ULYSSES: {
      hq_eff = (double)Hq / H;
      pr = pairs(0, 0, p->n, 1);
      double hd_q = (double)(Hq / H) * D * es, hd_kv = (double)(Hkv / H) * D * es;
      for (int d = 0; d < H; d++) {
        if (d == r) continue;
        /* q, k, v out; o and lse back */
        c->bytes_sent += (int64_t)((double)B * hd_q) + 2 * (int64_t)((double)B * hd_kv) +
                         (int64_t)((double)blk(p, d) * hd_q) + (int64_t)((double)blk(p, d) * (Hq / H) * 4.0);
        c->bytes_recv += (int64_t)((double)blk(p, d) * hd_q) + 2 * (int64_t)((double)blk(p, d) * hd_kv) +
                         (int64_t)((double)B * hd_q) + (int64_t)((double)B * (Hq / H) * 4.0);
      }
      { /* per head group: q (and k, v for the first group of each K/V group) in, o and lse back */
        int G = p->uly_groups > 0 ? p->uly_groups : 1, hkv = Hkv / H;
        c->collectives = 3 * G + 2 * (G < hkv ? G : hkv);
      }
      break;
    }
    case APB_METHOD_COUNT: return apb_error_set(err, APB_EINVAL, "cost model: unknown method");
    }
    c->attn_flops = 4.0 * pr * D * hq_eff * L;
    c->linear_flops = L * (c->linear_flops + 2.0 * (double)T * (E * QKV + (double)Hq * D * E + E * 2 * F + F * E));
    c->bytes_sent *= L, c->bytes_recv *= L, c->collectives *= L;
    /* elementwise traffic per layer: 2 norms (read+write), 2 residual adds (2 reads + write), RoPE
     * (read QKV, write q/k/v), SwiGLU (read 2F, write F), attention output and KV cache copy, and apb's
     * [P_v | A] key copies (K and V, read and write) */
    double elem = (double)T * (E * es * (2 * 2 + 2 * 3) + QKV * es * 2 + F * es * 3 + (double)Hq * D * es) +
                  (double)B * kvrow * 4 + keys_copied * kvrow * 2 * 2;
    c->elem_bytes = elem * L;
    /* decode: per pass and layer, all-gather of (o, lse) for its rows; per generated token after the
     * first a bcast of the token id from the last host */
    if (H > 1) {
      int64_t rows = p->q_len + (p->o.max_new_tokens > 1 ? p->o.max_new_tokens - 1 : 0);
      int64_t passes = 1 + (p->o.max_new_tokens > 1 ? p->o.max_new_tokens - 1 : 0);
      c->dec_bytes_sent = (int64_t)L * rows * ((int64_t)Hq * D * act_bytes + (int64_t)Hq * 4) * (H - 1);
      c->dec_collectives = (int64_t)L * passes * 2 + p->o.max_new_tokens;
      if (r == p->last_rank) c->dec_bytes_sent += p->o.max_new_tokens * 4 * (int64_t)(H - 1);
    }
    set_times(c, hw);
  }
  return APB_OK;
}

/* ---------------------------------------------------------------- fitting the rates */

/* The largest relative error of the model at 1/rates (ia, ig: seconds per attention FLOP and per
 * GEMM FLOP) over the observations; fixed[i][r] is host r's elementwise and communication time. */
static double fit_err(const apb_cost_obs *obs, int n, const double *const *fixed, double ia, double ig) {
  double worst = 0;
  for (int i = 0; i < n; i++) {
    double t = 0;
    for (int r = 0; r < obs[i].H; r++) {
      const apb_cost *c = &obs[i].hosts[r];
      const double tr = c->attn_flops * ia + c->linear_flops * ig + fixed[i][r];
      t = tr > t ? tr : t;
    }
    const double e = fabs(t / obs[i].seconds - 1.0);
    worst = e > worst ? e : worst;
  }
  return worst;
}

apb_status apb_cost_fit(const apb_cost_obs *obs, int n, apb_hw *hw, double *max_err, int *at_edge, apb_error *err) {
  if (!obs || !hw || n < 1) return apb_error_set(err, APB_EINVAL, "cost fit: no measurements");
  if (!(hw->mem_bytes_s > 0) || !(hw->link_bytes_s > 0) || !(hw->link_latency_s >= 0))
    return apb_error_set(err, APB_EINVAL,
                         "cost fit: memory and link bandwidth must be positive and latency non-negative");
  for (int i = 0; i < n; i++) {
    if (!(obs[i].seconds > 0) || !isfinite(obs[i].seconds))
      return apb_error_set(err, APB_EINVAL, "cost fit: measurement %d is %g s; it must be a positive number", i,
                           obs[i].seconds);
    if (!obs[i].hosts || obs[i].H < 1)
      return apb_error_set(err, APB_EINVAL, "cost fit: measurement %d has no hosts", i);
  }
  double **fixed = calloc((size_t)n, sizeof *fixed);
  if (!fixed) return apb_error_set(err, APB_ENOMEM, "cost fit: out of memory");
  apb_status st = APB_OK;
  for (int i = 0; i < n && !st; i++) {
    if (!(fixed[i] = malloc(sizeof(double) * (size_t)obs[i].H))) {
      st = apb_error_set(err, APB_ENOMEM, "cost fit: out of memory");
      break;
    }
    for (int r = 0; r < obs[i].H; r++) {
      const apb_cost *c = &obs[i].hosts[r];
      fixed[i][r] = c->elem_bytes / hw->mem_bytes_s + (double)c->bytes_sent / hw->link_bytes_s +
                    (double)c->collectives * hw->link_latency_s;
    }
  }
  if (!st) {
    /* log(FLOP/s): 10 to 5000 TFLOP/s for both */
    const double lo = log(10e12), hi = log(5000e12);
    const double steps[3] = {log(1.02), log(1.002), log(1.0002)};
    double best[2] = {lo, lo}, best_e = HUGE_VAL, c0[2] = {lo, lo}, c1[2] = {hi, hi};
    for (int pass = 0; pass < 3; pass++) {
      const double h = steps[pass];
      const double a0 = c0[0] > lo ? c0[0] : lo, a1 = c1[0] < hi ? c1[0] : hi;
      const double g0 = c0[1] > lo ? c0[1] : lo, g1 = c1[1] < hi ? c1[1] : hi;
      for (double a = a0; a <= a1 + 1e-12; a += h) {
        const double ia = exp(-a);
        for (double g = g0; g <= g1 + 1e-12; g += h) {
          const double e = fit_err(obs, n, (const double *const *)fixed, ia, exp(-g));
          if (e < best_e) best_e = e, best[0] = a, best[1] = g;
        }
      }
      /* the next pass searches one step of this pass either side of the best point */
      for (int k = 0; k < 2; k++) c0[k] = best[k] - h, c1[k] = best[k] + h;
    }
    hw->attn_flops_s = exp(best[0]);
    hw->gemm_flops_s = exp(best[1]);
    if (max_err) *max_err = best_e;
    if (at_edge) {
      *at_edge = 0;
      for (int k = 0; k < 2; k++)
        if (best[k] - lo < steps[0] || hi - best[k] < steps[0]) *at_edge = 1;
    }
  }
  for (int i = 0; i < n; i++) free(fixed[i]);
  free(fixed);
  return st;
}
