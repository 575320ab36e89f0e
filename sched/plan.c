/* sched/plan.c: method and scorer names, run defaults, and the plan of a run (apb/sched.h).
 *
 * Implements the rules of shared/APB.md 2-3: blocks split evenly with the remainder spread one token
 * each over the first hosts (no padding); l_a default min(l_b/4, 8192) for apb and l_b for star, l_p
 * default l_a/2; the anchor embeds the query at offset s (apb) or not (star); q_len < l_a - s when
 * embedded; l_a <= l_b; host 0 excludes from selection the document tokens the anchor holds; host
 * H-1's compressed block is needed by no one and is not computed. Every violation is an APB_EINVAL
 * naming the option and the numbers, and saying what to change. Tested in tests/check_sched.c.
 */
#include <stdint.h>
#include <string.h>

#include "apb/sched.h"

static const char *const method_names[APB_METHOD_COUNT] = {"dense", "ring", "zigzag", "ulysses", "star", "apb"};
static const char *const scorer_names[APB_SCORER_COUNT] = {"retaining", "random", "uniform"};

int apb_method_parse(const char *s, apb_method *out) {
  for (int i = 0; i < APB_METHOD_COUNT; i++)
    if (strcmp(s, method_names[i]) == 0) return *out = (apb_method)i, 0;
  return -1;
}
const char *apb_method_name(apb_method m) { return (unsigned)m < APB_METHOD_COUNT ? method_names[m] : "?"; }

int apb_scorer_parse(const char *s, apb_scorer *out) {
  for (int i = 0; i < APB_SCORER_COUNT; i++)
    if (strcmp(s, scorer_names[i]) == 0) return *out = (apb_scorer)i, 0;
  return -1;
}
const char *apb_scorer_name(apb_scorer s) { return (unsigned)s < APB_SCORER_COUNT ? scorer_names[s] : "?"; }

void apb_run_opts_default(apb_run_opts *o) {
  memset(o, 0, sizeof *o);
  o->method = APB_METHOD_APB;
  o->hosts = 1;
  o->anchor = -1;
  o->passing = -1;
  o->query_offset = -1;
  o->embed_query = -1;
  o->scorer = APB_SCORER_RETAINING;
  o->pool = -1;
  o->seed = 0;
  o->max_new_tokens = 0;
  o->ffn_chunk = -1;
  o->overlap = -1;
  o->balance = -1;
}

void apb_plan_virtual(const apb_plan *p, int r, int v[2], int *n) {
  v[0] = r;
  v[1] = 2 * p->H - 1 - r;
  *n = p->balance ? 2 : 1;
}

int64_t apb_plan_rows(const apb_plan *p, int r) {
  if (p->o.method == APB_METHOD_DENSE) return p->n;
  if (p->o.method == APB_METHOD_ZIGZAG)
    return (p->chunk_start[r + 1] - p->chunk_start[r]) + (p->chunk_start[2 * p->H - r] - p->chunk_start[2 * p->H - 1 - r]);
  int v[2], nv;
  apb_plan_virtual(p, r, v, &nv);
  int64_t rows = 0;
  for (int j = 0; j < nv; j++) rows += p->block_start[v[j] + 1] - p->block_start[v[j]];
  return rows;
}

static void split_even(int64_t n, int parts, int64_t *start) {
  int64_t q = n / parts, rem = n % parts, at = 0;
  for (int i = 0; i < parts; i++) {
    start[i] = at;
    at += q + (i < rem ? 1 : 0);
  }
  start[parts] = n;
}

apb_status apb_plan_make(const apb_run_opts *o, int64_t n, int64_t q_len, const apb_model_config *cfg,
                         int scorer_width, apb_plan *p, apb_error *err) {
  if (!o || !p || !cfg)
    return apb_error_set(err, APB_EINVAL, "apb_plan_make: %s is NULL", !o ? "opts" : !p ? "plan" : "cfg");
  memset(p, 0, sizeof *p);
  p->o = *o;
  if ((unsigned)o->method >= APB_METHOD_COUNT)
    return apb_error_set(err, APB_EINVAL, "--method: unknown method %d", (int)o->method);
  if ((unsigned)o->scorer >= APB_SCORER_COUNT)
    return apb_error_set(err, APB_EINVAL, "--scorer: unknown scorer %d", (int)o->scorer);
  if (n < 1) return apb_error_set(err, APB_EINVAL, "the document is empty: at least one token is needed");
  if (q_len < 1) return apb_error_set(err, APB_EINVAL, "--query-len: the query needs at least one token, got %lld",
                                      (long long)q_len);
  if (o->max_new_tokens < 0)
    return apb_error_set(err, APB_EINVAL, "--max-new-tokens must be >= 0, got %lld", (long long)o->max_new_tokens);
  /* token counts and positions are added up later: keep every sum far from overflowing */
  if (n > INT64_MAX / 8 || q_len > INT64_MAX / 8 || o->max_new_tokens > INT64_MAX / 8)
    return apb_error_set(err, APB_EINVAL, "%lld document, %lld query and %lld new tokens: too many", (long long)n,
                         (long long)q_len, (long long)o->max_new_tokens);
  /* -1 selects a default (apb_run_opts); other negative values are errors */
  const struct {
    const char *name;
    int64_t v;
  } neg[] = {{"--anchor", o->anchor},           {"--passing", o->passing},     {"--query-offset", o->query_offset},
             {"--embed-query", o->embed_query}, {"--pool", o->pool},           {"--ffn-chunk", o->ffn_chunk},
             {"--balance", o->balance}};
  for (size_t i = 0; i < sizeof neg / sizeof neg[0]; i++)
    if (neg[i].v < -1)
      return apb_error_set(err, APB_EINVAL, "%s must not be negative (-1 selects the default), got %lld", neg[i].name,
                           (long long)neg[i].v);
  int H = o->method == APB_METHOD_DENSE ? 1 : o->hosts;
  if (H < 1 || H > APB_MAX_HOSTS)
    return apb_error_set(err, APB_EINVAL, "--hosts must be in [1, %d], got %d", APB_MAX_HOSTS, o->hosts);
  int64_t min_tokens = o->method == APB_METHOD_ZIGZAG ? 2 * (int64_t)H : H;
  if (n < min_tokens)
    return apb_error_set(err, APB_EINVAL, "--hosts %d: %d hosts need at least %lld document tokens for %s (%s); the "
                         "document has %lld: lower --hosts or give a longer document", H, H, (long long)min_tokens,
                         apb_method_name(o->method), o->method == APB_METHOD_ZIGZAG ? "two chunks per host" :
                         "one per host", (long long)n);
  p->H = H;
  p->n = n;
  p->q_len = q_len;
  p->ffn_chunk = o->ffn_chunk < 0 ? 8192 : o->ffn_chunk;
  p->overlap = o->overlap < 0 ? APB_OVERLAP_ANCHOR : o->overlap;
  if (o->overlap < -1 || p->overlap > APB_OVERLAP_ANCHOR)
    return apb_error_set(err, APB_EINVAL, "--overlap must be 0 (none), 1 (split) or 2 (anchor), got %d", o->overlap);
  if (p->ffn_chunk < 1)
    return apb_error_set(err, APB_EINVAL, "--ffn-chunk must be >= 1 row, got %lld", (long long)o->ffn_chunk);
  int approx = o->method == APB_METHOD_STAR || o->method == APB_METHOD_APB;
  p->balance = o->balance > 0;
  if (p->balance && !approx)
    return apb_error_set(err, APB_EINVAL, "--balance pairs virtual hosts of apb or star; %s has no such blocks",
                         apb_method_name(o->method));
  if (p->balance && 2 * H > APB_MAX_HOSTS)
    return apb_error_set(err, APB_EINVAL, "--balance with %d hosts needs %d virtual hosts; at most %d", H, 2 * H,
                         APB_MAX_HOSTS);
  if (p->balance && n < 2 * (int64_t)H)
    return apb_error_set(err, APB_EINVAL, "--balance: %d hosts hold %d virtual blocks, more than the %lld tokens: "
                         "lower --hosts, give a longer document or drop --balance", H, 2 * H, (long long)n);
  p->V = p->balance ? 2 * H : H;
  p->last_rank = p->balance ? 0 : H - 1;
  split_even(n, p->V, p->block_start);
  split_even(n, 2 * H, p->chunk_start);
  p->lb = p->block_start[1] - p->block_start[0];

  if (o->method == APB_METHOD_ULYSSES && (cfg->n_kv_heads % H != 0))
    return apb_error_set(err, APB_EINVAL, "ulysses splits heads over hosts: %d hosts must divide the %d KV heads "
                         "(and %d query heads): give --hosts a divisor of %d", H, cfg->n_kv_heads, cfg->n_heads,
                         cfg->n_kv_heads);
  p->uly_groups = 1;
  if (o->method == APB_METHOD_ULYSSES && p->overlap) {
    int hq = cfg->n_heads / H, hkv = cfg->n_kv_heads / H;
    p->uly_groups = hkv >= 2 ? hkv : hq % 2 == 0 ? 2 : 1;
  }

  p->pool = o->pool < 0 ? (o->scorer == APB_SCORER_RETAINING ? 5 : 1) : o->pool;
  if (!approx) return APB_OK;

  int is_apb = o->method == APB_METHOD_APB;
  p->la = o->anchor >= 0 ? o->anchor : is_apb ? (p->lb / 4 < 8192 ? p->lb / 4 : 8192) : p->lb;
  if (p->la > p->lb)
    return apb_error_set(err, APB_EINVAL, "--anchor %lld exceeds the block length l_b = %lld (APB.md 3: l_a <= l_b; "
                         "%lld tokens in %d blocks%s): lower --anchor or --hosts", (long long)p->la, (long long)p->lb,
                         (long long)n, p->V, p->balance ? ", two per host with --balance" : "");
  p->embed_query = o->embed_query >= 0 ? o->embed_query : is_apb;
  p->s = o->query_offset >= 0 ? o->query_offset : 0;
  if (!p->embed_query && o->query_offset > 0)
    return apb_error_set(err, APB_EINVAL, "--query-offset %lld given but %s does not embed the query in the anchor "
                         "(--embed-query 0%s): drop --query-offset or pass --embed-query 1", (long long)o->query_offset,
                         apb_method_name(o->method), o->embed_query < 0 ? ", star's default" : "");
  if (p->embed_query && !(q_len < p->la - p->s))
    return apb_error_set(err, APB_EINVAL,
                         "the query (%lld tokens) does not fit in the anchor: APB.md 3 needs q_len < l_a - s "
                         "(l_a %lld, at most l_b = %lld; s %lld); raise --anchor, lower --query-offset, or pass "
                         "--embed-query 0", (long long)q_len, (long long)p->la, (long long)p->lb, (long long)p->s);
  if (!is_apb) {
    if (o->passing > 0)
      return apb_error_set(err, APB_EINVAL, "--passing %lld: star has no passing block (drop --passing, or use "
                           "--method apb)", (long long)o->passing);
    return APB_OK;
  }
  p->lp = o->passing >= 0 ? o->passing : p->la / 2;
  if (p->pool < 1 || p->pool % 2 == 0)
    return apb_error_set(err, APB_EINVAL, "--pool must be an odd window >= 1, got %d", p->pool);
  p->excl0 = p->embed_query ? p->la - q_len : p->la;
  int64_t selected = 0;
  for (int v = 0; v < p->V; v++) {
    int64_t len = p->block_start[v + 1] - p->block_start[v];
    int64_t eligible = v == 0 ? len - p->excl0 : len;
    if (eligible < 0) eligible = 0;
    p->n_sel[v] = v == p->V - 1 ? 0 : (p->lp < eligible ? p->lp : eligible);
    selected += p->n_sel[v];
  }
  /* The scorer runs only where a host selects (one host, or l_p = 0, selects nothing). */
  if (selected > 0 && o->scorer == APB_SCORER_RETAINING && scorer_width <= 0)
    return apb_error_set(err, APB_EINVAL, "the retaining scorer needs retaining heads (fc1/fc2), and this model has "
                         "none (scorer width 0): load them (apb run --heads FILE), generate them (--scorer-width "
                         ">= 1), or choose another scorer (apb run --scorer random|uniform)");
  return APB_OK;
}
