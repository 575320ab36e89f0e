/* tests/check_sched.c: every method end to end on the tiny preset with simulated hosts, against the
 * invariants of shared/APB.md 6:
 *   apb with H = 1 equals dense; apb with l_p = 0 equals star with the same anchor (query not
 *   embedded); apb with l_a = 0 and l_p >= l_b equals dense; ring, zigzag and ulysses equal dense for
 *   every H (ulysses: H dividing the KV heads, also 4 and 8 on a variant of tiny with 8 KV heads, where
 *   a host holds several and the pipelined form runs one group per KV head); the decode (LSE merge over H hosts) gives dense's logits and tokens; results are bitwise
 *   identical across thread counts and between the in-process and the MPI run (mpirun -np 2 and 4);
 *   the overlapped apb attention computes the same function as the single call; --balance on H hosts
 *   computes what 2H hosts compute (apb: with and without the overlapped form); apb with l_p = 0 is star
 *   also with the query embedded at an offset; l_a = 0, l_p >= l_b is dense with every scorer; the MLP
 *   in row chunks (--ffn-chunk 100 and 1) computes what one chunk computes; bf16 storage emulated on
 *   the CPU (emulate_bf16) keeps apb H = 1 = dense bitwise and ring = dense within the bf16 table.
 * Every run generates max_new_tokens (4) tokens on every host; the comparisons cover those tokens and
 *   the logits of every decode pass (the "logits" hook), not only the prefill.
 * Also: the cost model's FLOP and byte counts equal what the simulator counted, and bad input to
 * `apb run` gets a clear error and a non-zero exit, and a NaN or Inf logit (poisoned weights) is
 * APB_ENONFINITE on every host rather than a token picked silently. Document lengths include 1023
 * and 1025.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apb/cost.h"
#include "apb/sim.h"
#include "config.h"
#include "testutil.h"

static apb_model *tiny;
static apb_model *gqa8; /* tiny with 16 query and 8 KV heads of 32 (E 512): ulysses with H = 4 and 8 */

static void setup_model(void) {
  apb_error err = {0};
  if (!tiny) ck_assert_msg(apb_model_generate(APB_PRESET_TINY, 1, &tiny, &err) == APB_OK, "%s", err.msg);
  if (!gqa8) {
    apb_model_config c;
    int I;
    apb_preset_config(APB_PRESET_TINY, &c, &I);
    c.hidden = 512, c.n_heads = 16, c.n_kv_heads = 8, c.head_dim = 32;
    ck_assert_msg(apb_model_generate_config(&c, I, 2, &gqa8, &err) == APB_OK, "%s", err.msg);
  }
}

#define MAX_DEC 8 /* decode forward passes captured (max_new_tokens - 1 of them run) */

typedef struct run_out {
  int H;
  int64_t n, E, V; /* document tokens, hidden size, vocabulary */
  float *hidden;   /* [n, E] document order */
  float *logits;   /* [V] */
  int32_t gen[8];
  int64_t n_gen;
  float *dec;      /* [n_dec, V]: host 0's logits of every decode forward pass ("logits" hook, phase decode) */
  int n_dec;
  apb_host_result res[8];
  apb_comm_stats stats[8];
  apb_plan plan;
} run_out;

/* The hook of run_on: every host's decode-phase logits, in call order. */
typedef struct dec_cap {
  int64_t V;
  int n[8];
  float *lg[8]; /* [MAX_DEC, V] per host */
  int bad;      /* a call with an unexpected shape, host or count */
} dec_cap;

static void dec_hook(void *user, const apb_hook_info *in) {
  dec_cap *c = user;
  if (strcmp(in->stage, "logits") != 0 || strcmp(in->phase, "decode") != 0) return;
  if (in->host < 0 || in->host >= 8 || in->ndim != 1 || in->shape[0] != c->V || c->n[in->host] >= MAX_DEC) {
    c->bad = 1;
    return;
  }
  memcpy(c->lg[in->host] + (size_t)c->n[in->host]++ * (size_t)c->V, in->data, sizeof(float) * (size_t)c->V);
}

static void make_doc(int64_t n, int64_t q, int32_t **doc, int32_t **query) { /* tokens < tiny's vocab (any model's here) */
  *doc = malloc(sizeof(int32_t) * (size_t)n);
  *query = malloc(sizeof(int32_t) * (size_t)q);
  apb_rng r;
  apb_rng_seed(&r, tu_seed() + (uint64_t)n);
  for (int64_t i = 0; i < n; i++) (*doc)[i] = (int32_t)apb_rng_below(&r, (uint64_t)tiny->cfg.vocab);
  for (int64_t i = 0; i < q; i++) (*query)[i] = (int32_t)apb_rng_below(&r, (uint64_t)tiny->cfg.vocab);
}

static int g_profile; /* apb_sim_opts.profile of run() (test_profile_stages sets it) */
static int g_emulate; /* apb_sim_opts.cpu.emulate_bf16 of run() (test_bf16_emulation sets it) */

/* Run opts o on model m (tiny when NULL), n document tokens (seeded), q query tokens, o->max_new_tokens
 * new tokens (every host must generate exactly that many; the decode passes' logits are captured);
 * threads t. */
static void run_on(const apb_model *m, const apb_run_opts *o, int64_t n, int64_t q, int threads, run_out *out) {
  setup_model();
  if (!m) m = tiny;
  apb_error err = {0};
  memset(out, 0, sizeof *out);
  int32_t *doc, *query;
  make_doc(n, q, &doc, &query);
  apb_status st = apb_plan_make(o, n, q, &m->cfg, m->scorer_width, &out->plan, &err);
  ck_assert_msg(st == APB_OK, "plan (%s, H=%d, n=%lld): %s", apb_method_name(o->method), o->hosts, (long long)n,
                err.msg);
  dec_cap dc = {.V = m->cfg.vocab};
  for (int r = 0; r < 8; r++) dc.lg[r] = malloc(sizeof(float) * MAX_DEC * (size_t)m->cfg.vocab);
  apb_sim_opts so = {.backend = "fast", .cpu = {.emulate_bf16 = g_emulate, .threads = threads}, .timeout_s = 120,
                     .hook = dec_hook, .hook_user = &dc, .want_hidden = 1, .profile = g_profile};
  st = apb_sim_execute(&out->plan, m, &so, doc, query, out->res, out->stats, &err);
  ck_assert_msg(st == APB_OK, "run (%s, H=%d, n=%lld): %s", apb_method_name(o->method), o->hosts, (long long)n, err.msg);
  int H = out->plan.H, E = m->cfg.hidden;
  /* max_new_tokens tokens, hence max_new_tokens - 1 decode forward passes, on every host, with the same
   * logits everywhere (the last token needs no pass) */
  const int64_t want_dec = o->max_new_tokens > 1 ? o->max_new_tokens - 1 : 0;
  ck_assert_msg(!dc.bad && want_dec <= MAX_DEC, "decode logits hook: unexpected call");
  for (int r = 0; r < H; r++) {
    ck_assert_msg(dc.n[r] == want_dec, "%s H=%d host %d: %d decode passes reported, %lld expected",
                  apb_method_name(o->method), H, r, dc.n[r], (long long)want_dec);
    tu_assert_bitwise("decode logits on every host", dc.lg[r], dc.lg[0], want_dec * m->cfg.vocab);
  }
  out->dec = dc.lg[0], out->n_dec = (int)want_dec;
  for (int r = 1; r < 8; r++) free(dc.lg[r]);
  out->H = H, out->n = n, out->E = E, out->V = m->cfg.vocab;
  out->hidden = malloc(sizeof(float) * (size_t)n * (size_t)E);
  for (int64_t i = 0; i < n * E; i++) out->hidden[i] = NAN;
  for (int r = 0; r < H; r++)
    for (int64_t i = 0; i < out->res[r].n_rows; i++)
      memcpy(out->hidden + (size_t)out->res[r].row_pos[i] * (size_t)E, out->res[r].hidden + (size_t)i * (size_t)E,
             sizeof(float) * (size_t)E);
  out->logits = out->res[H - 1].logits;
  out->n_gen = out->res[H - 1].n_generated;
  ck_assert_msg(out->n_gen == o->max_new_tokens, "%s H=%d: %lld tokens generated, max_new_tokens %lld",
                apb_method_name(o->method), H, (long long)out->n_gen, (long long)o->max_new_tokens);
  memcpy(out->gen, out->res[H - 1].generated, sizeof(int32_t) * (size_t)out->n_gen);
  for (int r = 0; r < H; r++) { /* every host ends with the same logits and tokens (APB.md 4) */
    tu_assert_bitwise("logits on every host", out->res[r].logits, out->logits, m->cfg.vocab);
    ck_assert_int_eq(out->res[r].n_generated, out->n_gen);
    for (int64_t t = 0; t < out->n_gen; t++) ck_assert_int_eq(out->res[r].generated[t], out->gen[t]);
  }
  free(doc), free(query);
}

static void run(const apb_run_opts *o, int64_t n, int64_t q, int threads, run_out *out) {
  run_on(NULL, o, n, q, threads, out);
}

static void run_free(run_out *o) {
  for (int r = 0; r < o->H; r++) apb_host_result_free(&o->res[r]);
  free(o->hidden);
  free(o->dec);
}

static apb_run_opts opts(apb_method m, int H) {
  apb_run_opts o;
  apb_run_opts_default(&o);
  o.method = m, o.hosts = H, o.max_new_tokens = 4;
  return o;
}

/* exact methods equal dense within the fp32 table for the longest reduction (n keys): the final hidden
 * states, the query's logits and the logits of every decode pass (fed the same tokens: the caller
 * asserts the same tokens too) */
static void assert_matches(const char *what, const run_out *a, const run_out *ref) {
  apb_tol t = apb_tolerance(APB_PREC_F32, ref->n);
  char buf[160];
  snprintf(buf, sizeof buf, "%s: hidden", what);
  tu_assert_close(buf, a->hidden, ref->hidden, ref->n * ref->E, t);
  snprintf(buf, sizeof buf, "%s: logits", what);
  tu_assert_close(buf, a->logits, ref->logits, ref->V, t);
  ck_assert_int_eq(a->n_dec, ref->n_dec);
  for (int s = 0; s < ref->n_dec; s++) {
    if (memcmp(a->gen, ref->gen, sizeof(int32_t) * (size_t)(s + 1)) != 0) break; /* fed other tokens */
    snprintf(buf, sizeof buf, "%s: logits of decode pass %d", what, s);
    tu_assert_close(buf, a->dec + (int64_t)s * ref->V, ref->dec + (int64_t)s * ref->V, ref->V,
                    apb_tolerance(APB_PREC_F32, ref->n + ref->plan.q_len + s + 1));
  }
}

/* the same greedy tokens as ref */
static void assert_same_tokens(const char *what, const run_out *a, const run_out *ref) {
  ck_assert_msg(a->n_gen == ref->n_gen, "seed %llu: %s: %lld tokens generated, %lld in the reference",
                (unsigned long long)tu_seed(), what, (long long)a->n_gen, (long long)ref->n_gen);
  for (int64_t t = 0; t < ref->n_gen; t++)
    ck_assert_msg(a->gen[t] == ref->gen[t], "seed %llu: %s: token %lld is %d, %d in the reference",
                  (unsigned long long)tu_seed(), what, (long long)t, a->gen[t], ref->gen[t]);
}

/* the same final hidden states, logits, greedy tokens and decode logits as ref, bit for bit */
static void assert_bitwise_run(const char *what, const run_out *a, const run_out *ref) {
  char buf[160];
  snprintf(buf, sizeof buf, "%s: hidden", what);
  tu_assert_bitwise(buf, a->hidden, ref->hidden, ref->n * ref->E);
  snprintf(buf, sizeof buf, "%s: logits", what);
  tu_assert_bitwise(buf, a->logits, ref->logits, ref->V);
  assert_same_tokens(what, a, ref);
  ck_assert_int_eq(a->n_dec, ref->n_dec);
  snprintf(buf, sizeof buf, "%s: decode logits", what);
  tu_assert_bitwise(buf, a->dec, ref->dec, (int64_t)ref->n_dec * ref->V);
}

static const int64_t lens[] = {1023, 1025};
static const int hosts[] = {1, 2, 3, 4, 8};

START_TEST(test_exact_methods_equal_dense) {
  int64_t n = lens[_i % 2];
  int H = hosts[_i / 2];
  run_out dense, x;
  apb_run_opts od = opts(APB_METHOD_DENSE, 1);
  run(&od, n, 7, 0, &dense);
  apb_method ms[] = {APB_METHOD_RING, APB_METHOD_ZIGZAG, APB_METHOD_ULYSSES};
  for (size_t k = 0; k < 3; k++) {
    if (ms[k] == APB_METHOD_ULYSSES && tiny->cfg.n_kv_heads % H) continue; /* needs H | Hkv (tested below) */
    apb_run_opts o = opts(ms[k], H);
    run(&o, n, 7, 0, &x);
    char what[64];
    snprintf(what, sizeof what, "%s H=%d n=%lld", apb_method_name(ms[k]), H, (long long)n);
    assert_matches(what, &x, &dense);
    ck_assert_int_eq(x.n_gen, 4);
    assert_same_tokens(what, &x, &dense);
    run_free(&x);
  }
  run_free(&dense);
}
END_TEST

START_TEST(test_apb_h1_is_dense) {
  run_out dense, a;
  apb_run_opts od = opts(APB_METHOD_DENSE, 1), oa = opts(APB_METHOD_APB, 1);
  run(&od, lens[_i], 5, 0, &dense);
  run(&oa, lens[_i], 5, 0, &a);
  assert_bitwise_run("apb H=1 vs dense", &a, &dense);
  run_free(&dense), run_free(&a);
}
END_TEST

/* odd _i: both with the query embedded in the anchor at offset 9 (--embed-query 1 --query-offset 9) */
START_TEST(test_apb_lp0_is_star) {
  int H = hosts[1 + _i]; /* 2, 3, 4, 8 */
  run_out s, a;
  apb_run_opts os = opts(APB_METHOD_STAR, H), oa = opts(APB_METHOD_APB, H);
  os.anchor = oa.anchor = 64;
  oa.passing = 0;
  oa.embed_query = os.embed_query = _i % 2;
  oa.query_offset = os.query_offset = _i % 2 ? 9 : -1;
  run(&os, 1025, 5, 0, &s);
  run(&oa, 1025, 5, 0, &a);
  ck_assert_int_eq(a.plan.embed_query, _i % 2);
  ck_assert_int_eq(a.plan.s, _i % 2 ? 9 : 0);
  ck_assert_int_eq(s.plan.s, a.plan.s);
  char what[64];
  snprintf(what, sizeof what, "apb l_p=0 vs star, H=%d, embed_query %d", H, _i % 2);
  assert_bitwise_run(what, &a, &s);
  run_free(&s), run_free(&a);
}
END_TEST

/* _i: H = hosts[1 + _i / 3], n = lens[_i % 2], scorer _i % 3 (every (n, scorer) pair twice) */
START_TEST(test_apb_no_anchor_all_passing_is_dense) {
  int H = hosts[1 + _i / 3];
  int64_t n = lens[_i % 2];
  apb_scorer sc[] = {APB_SCORER_RETAINING, APB_SCORER_RANDOM, APB_SCORER_UNIFORM};
  run_out dense, a;
  apb_run_opts od = opts(APB_METHOD_DENSE, 1), oa = opts(APB_METHOD_APB, H);
  oa.anchor = 0, oa.embed_query = 0, oa.passing = n, oa.scorer = sc[_i % 3], oa.seed = 99;
  run(&od, n, 6, 0, &dense);
  run(&oa, n, 6, 0, &a);
  char what[80];
  snprintf(what, sizeof what, "apb l_a=0 l_p>=l_b H=%d n=%lld scorer %s", H, (long long)n,
           apb_scorer_name(sc[_i % 3]));
  assert_matches(what, &a, &dense);
  assert_same_tokens(what, &a, &dense);
  run_free(&dense), run_free(&a);
}
END_TEST

/* the overlapped apb attention computes the same function as the single call after the all-gathers:
 * split around them and merged by LSE (1), or the anchor rows first and the local rows in one call
 * over the passing and anchor keys copied together (2) */
START_TEST(test_apb_overlap_same_function) {
  run_out a, b;
  apb_run_opts o = opts(APB_METHOD_APB, hosts[1 + _i]);
  o.anchor = 64, o.passing = 48;
  o.overlap = APB_OVERLAP_NONE;
  run(&o, 1025, 5, 0, &a);
  for (int ovl = APB_OVERLAP_SPLIT; ovl <= APB_OVERLAP_ANCHOR; ovl++) {
    o.overlap = ovl;
    run(&o, 1025, 5, 0, &b);
    char what[64];
    snprintf(what, sizeof what, "apb --overlap %d vs 0, H=%d", ovl, hosts[1 + _i]);
    assert_matches(what, &b, &a);
    assert_same_tokens(what, &b, &a);
    run_free(&b);
  }
  run_free(&a);
}
END_TEST

/* ulysses pipelined over head groups (overlap 1) is the unpipelined schedule to the bit: the same
 * attention per head, the same bytes, in uly_groups times as many collectives. tiny has 4 query and 2
 * KV heads: H = 1 makes two groups of one KV head, H = 2 one KV head whose query heads split in two. */
START_TEST(test_ulysses_pipeline_bitwise) {
  const int H = _i + 1;
  run_out a, b;
  apb_run_opts o = opts(APB_METHOD_ULYSSES, H);
  o.overlap = 0;
  run(&o, 1025, 5, 0, &a);
  o.overlap = 1;
  run(&o, 1025, 5, 0, &b);
  ck_assert_int_eq(a.plan.uly_groups, 1);
  ck_assert_int_eq(b.plan.uly_groups, 2);
  char what[64];
  snprintf(what, sizeof what, "ulysses pipelined vs not, H=%d", H);
  assert_bitwise_run(what, &b, &a);
  assert_same_tokens(what, &b, &a);
  for (int r = 0; r < H; r++) {
    const int64_t ca = a.stats[r].calls[APB_COLL_ALLTOALL], cb = b.stats[r].calls[APB_COLL_ALLTOALL];
    const int64_t sa = a.stats[r].bytes_sent[APB_COLL_ALLTOALL], ra = a.stats[r].bytes_recv[APB_COLL_ALLTOALL];
    const int64_t sb = b.stats[r].bytes_sent[APB_COLL_ALLTOALL], rb = b.stats[r].bytes_recv[APB_COLL_ALLTOALL];
    ck_assert_msg(sa == sb && ra == rb, "%s host %d: all-to-all bytes %lld/%lld pipelined, %lld/%lld not", what, r,
                  (long long)sb, (long long)rb, (long long)sa, (long long)ra);
    /* 5 per layer unpipelined; two groups: q, k, v, o, lse each (H = 1), or k, v with the first only */
    const int64_t L = tiny->cfg.n_layers, per = H == 1 ? 10 : 8;
    ck_assert_msg(ca == 5 * L && cb == per * L, "%s host %d: %lld and %lld all-to-alls, expected %lld and %lld", what,
                  r, (long long)ca, (long long)cb, (long long)(5 * L), (long long)(per * L));
  }
  run_free(&a), run_free(&b);
}
END_TEST

/* ulysses where each host holds several KV heads, as on the llama3-8b shape's GPUs (8 KV heads on 2
 * or 4): gqa8 (16 query, 8 KV heads) on H = 1, 2, 4, 8 hosts, pipelined (Hkv / H groups of one KV
 * head; H = 8: one KV head whose two query heads split in two) and blocking. Both equal dense within
 * the fp32 table, each other to the bit, with the same all-to-all bytes. */
START_TEST(test_ulysses_many_heads) {
  const int H = 1 << _i;
  setup_model();
  const int64_t n = 1025;
  run_out dense, a, b;
  apb_run_opts od = opts(APB_METHOD_DENSE, 1), o = opts(APB_METHOD_ULYSSES, H);
  run_on(gqa8, &od, n, 5, 0, &dense);
  o.overlap = 0;
  run_on(gqa8, &o, n, 5, 0, &a);
  o.overlap = 1;
  run_on(gqa8, &o, n, 5, 0, &b);
  const int hkv_h = gqa8->cfg.n_kv_heads / H;
  ck_assert_int_eq(a.plan.uly_groups, 1);
  ck_assert_int_eq(b.plan.uly_groups, hkv_h >= 2 ? hkv_h : 2);
  char what[80];
  snprintf(what, sizeof what, "ulysses blocking vs dense, 16/8 heads, H=%d", H);
  assert_matches(what, &a, &dense);
  assert_same_tokens(what, &a, &dense);
  snprintf(what, sizeof what, "ulysses pipelined (%d groups) vs blocking, 16/8 heads, H=%d", b.plan.uly_groups, H);
  assert_bitwise_run(what, &b, &a);
  assert_same_tokens(what, &b, &a);
  for (int r = 0; r < H; r++)
    ck_assert_msg(a.stats[r].bytes_sent[APB_COLL_ALLTOALL] == b.stats[r].bytes_sent[APB_COLL_ALLTOALL] &&
                      a.stats[r].bytes_recv[APB_COLL_ALLTOALL] == b.stats[r].bytes_recv[APB_COLL_ALLTOALL],
                  "%s host %d: all-to-all bytes differ", what, r);
  run_free(&dense), run_free(&a), run_free(&b);
}
END_TEST

/* A ulysses plan made for gqa8's 8 KV heads (H = 4) run on tiny's 2: APB_EINVAL naming the heads, not
 * a division by zero (4 hosts hold no KV head each). _i: overlap 0 (one group) and 1 (pipelined). */
START_TEST(test_ulysses_plan_of_another_model) {
  setup_model();
  apb_run_opts o = opts(APB_METHOD_ULYSSES, 4);
  o.overlap = _i;
  const int64_t n = 33, q = 3;
  apb_plan plan;
  apb_error err = {0};
  ck_assert_msg(apb_plan_make(&o, n, q, &gqa8->cfg, gqa8->scorer_width, &plan, &err) == APB_OK, "%s", err.msg);
  int32_t *doc, *query;
  make_doc(n, q, &doc, &query);
  apb_host_result res[8];
  apb_sim_opts so = {.backend = "fast", .timeout_s = 120};
  apb_status st = apb_sim_execute(&plan, tiny, &so, doc, query, res, NULL, &err);
  ck_assert_msg(st == APB_EINVAL && strstr(err.msg, "4 hosts do not divide this model's 2 KV heads"),
                "seed %llu, overlap %d: status %d, \"%s\"", (unsigned long long)tu_seed(), _i, (int)st, err.msg);
  free(doc), free(query);
}
END_TEST

/* --balance: H hosts holding virtual hosts h and 2H-1-h compute what 2H hosts compute */
START_TEST(test_balance_equals_2h_hosts) {
  int H = _i % 3 + 1; /* 1, 2, 4 */
  if (H == 3) H = 4;
  apb_method m = _i < 3 ? APB_METHOD_APB : APB_METHOD_STAR;
  run_out b, u;
  apb_run_opts ob = opts(m, H), ou = opts(m, 2 * H);
  ob.balance = 1;
  ob.anchor = ou.anchor = 48;
  if (m == APB_METHOD_APB) {
    ob.passing = ou.passing = 40;
    ob.scorer = ou.scorer = APB_SCORER_RANDOM; /* identical selections on both sides, by construction */
    ob.seed = ou.seed = 5;
  }
  run(&ou, 1025, 5, 0, &u);
  /* apb: every form of the balanced attention (single calls after the all-gather; split around it
   * and merged by LSE; the anchor rows while it runs, then single calls); star has no all-gather */
  for (int ovl = 0; ovl <= (m == APB_METHOD_APB ? APB_OVERLAP_ANCHOR : 0); ovl++) {
    ob.overlap = ovl;
    run(&ob, 1025, 5, 0, &b);
    char what[80];
    snprintf(what, sizeof what, "%s --balance --overlap %d H=%d vs %d hosts", apb_method_name(m), ovl, H, 2 * H);
    assert_matches(what, &b, &u);
    assert_same_tokens(what, &b, &u);
    run_free(&b);
  }
  run_free(&u);
}
END_TEST

START_TEST(test_threads_bitwise) {
  apb_method ms[] = {APB_METHOD_APB, APB_METHOD_RING, APB_METHOD_ULYSSES};
  run_out a, b;
  apb_run_opts o = opts(ms[_i], 2);
  run(&o, 1023, 9, 1, &a);
  run(&o, 1023, 9, 2, &b);
  assert_bitwise_run("1 vs 2 threads", &a, &b);
  run_free(&a), run_free(&b);
}
END_TEST

/* A NaN or Inf logit is APB_ENONFINITE, naming the logit, on every host alike, never a token picked
 * silently. _i: H = 1 or 3 (apb). Two ways in: an Inf in lm_head row 7 (the query's logits, also with
 * max_new_tokens 0, where no token is picked), and a NaN in the embedding row of the first generated
 * token, which neither the document nor the query holds (the query's logits are finite; decode step
 * 1's are not). */
static void expect_nonfinite(const apb_model *m, const apb_run_opts *o, const int32_t *doc, int64_t n,
                             const int32_t *query, int64_t q, const char *want) {
  apb_plan plan;
  apb_host_result res[8];
  apb_error err = {0};
  ck_assert_msg(apb_plan_make(o, n, q, &m->cfg, m->scorer_width, &plan, &err) == APB_OK, "%s", err.msg);
  apb_sim_opts so = {.backend = "fast", .timeout_s = 120};
  apb_status st = apb_sim_execute(&plan, m, &so, doc, query, res, NULL, &err);
  ck_assert_msg(st == APB_ENONFINITE && strstr(err.msg, want), "H=%d, max_new_tokens %lld: status %d, \"%s\"; "
                "expected APB_ENONFINITE with \"%s\"", o->hosts, (long long)o->max_new_tokens, (int)st, err.msg, want);
  /* a failed run writes no dump, so the message must not send the user to --dump-layers */
  ck_assert_msg(!strstr(err.msg, "--dump"), "\"%s\" advises a dump that a failed run does not write", err.msg);
}

START_TEST(test_nonfinite_logits) {
  apb_model *m = NULL;
  apb_error err = {0};
  ck_assert_msg(apb_model_generate(APB_PRESET_TINY, 1, &m, &err) == APB_OK, "%s", err.msg);
  const int64_t n = 301, q = 5, E = m->cfg.hidden;
  apb_run_opts o = opts(APB_METHOD_APB, _i ? 3 : 1);
  o.anchor = 32, o.passing = 16;
  /* the clean run's first token g; then a document and query without it */
  int32_t *doc = malloc(sizeof(int32_t) * (size_t)n), query[5];
  for (int64_t i = 0; i < n; i++) doc[i] = (int32_t)((i * 7 + 1) % m->cfg.vocab);
  for (int i = 0; i < q; i++) query[i] = 11 + i;
  apb_plan plan;
  apb_host_result res[8];
  ck_assert(apb_plan_make(&o, n, q, &m->cfg, m->scorer_width, &plan, &err) == APB_OK);
  apb_sim_opts so = {.backend = "fast", .timeout_s = 120};
  ck_assert_msg(apb_sim_execute(&plan, m, &so, doc, query, res, NULL, &err) == APB_OK, "%s", err.msg);
  const int32_t g = res[0].generated[0];
  for (int r = 0; r < plan.H; r++) apb_host_result_free(&res[r]);
  for (int64_t i = 0; i < n; i++)
    if (doc[i] == g) doc[i] = (g + 1) % (int32_t)m->cfg.vocab;
  for (int i = 0; i < q; i++)
    if (query[i] == g) query[i] = (g + 1) % (int32_t)m->cfg.vocab;
  /* the generated model's weights live in memory it owns: poisoned here, then freed with it */
  float *emb = (float *)m->embed + (size_t)g * (size_t)E;
  const float keep = emb[0];
  emb[0] = NAN;
  expect_nonfinite(m, &o, doc, n, query, q, "decode step 1: logit 0 of 4096 is ");
  emb[0] = keep;
  float *lm = (float *)m->lm_head + (size_t)7 * (size_t)E;
  for (int64_t e = 0; e < E; e++) lm[e] = INFINITY;
  expect_nonfinite(m, &o, doc, n, query, q, "the query's logits: logit 7 of 4096 is ");
  o.max_new_tokens = 0;
  expect_nonfinite(m, &o, doc, n, query, q, "the query's logits: logit 7 of 4096 is ");
  free(doc);
  apb_model_free(m);
}
END_TEST

/* --ffn-chunk: the MLP in chunks of rows (100, and 1: one row at a time) computes what one chunk per
 * host computes (the default 8192 exceeds every host's rows here); the query phase is chunked too */
START_TEST(test_ffn_chunk) {
  const apb_method ms[] = {APB_METHOD_DENSE, APB_METHOD_APB, APB_METHOD_RING};
  const apb_method m = ms[_i % 3];
  const int64_t chunk = _i < 3 ? 100 : 1;
  run_out a, b;
  apb_run_opts o = opts(m, m == APB_METHOD_DENSE ? 1 : 2);
  run(&o, 1025, 5, 0, &a);
  ck_assert_int_gt(a.plan.ffn_chunk, 1025);
  o.ffn_chunk = chunk;
  run(&o, 1025, 5, 0, &b);
  ck_assert_int_eq(b.plan.ffn_chunk, chunk);
  char what[80];
  snprintf(what, sizeof what, "%s H=%d --ffn-chunk %lld vs one chunk", apb_method_name(m), b.H, (long long)chunk);
  assert_matches(what, &b, &a);
  assert_same_tokens(what, &b, &a);
  run_free(&a), run_free(&b);
}
END_TEST

/* bf16 storage emulated on the CPU (apb_sim_opts.cpu.emulate_bf16) through whole runs: every stored
 * activation the run returns (final hidden states after the norm, logits) is bf16-representable; apb on
 * one host is dense bit for bit; ring on 2 and 3 hosts is dense within the bf16 table; and the emulated
 * dense run is the fp32 dense run within the bf16 table. */
START_TEST(test_bf16_emulation) {
  run_out d32, d, x;
  apb_run_opts od = opts(APB_METHOD_DENSE, 1);
  run(&od, 1025, 5, 0, &d32);
  g_emulate = 1;
  run(&od, 1025, 5, 0, &d);
  apb_run_opts oa = opts(APB_METHOD_APB, 1);
  run(&oa, 1025, 5, 0, &x);
  const apb_tol t = apb_tolerance(APB_PREC_BF16, 1025);
  char what[80];
  for (int64_t i = 0; i < d.n * d.E; i++) {
    const float r = apb_bf16_round(d.hidden[i]);
    ck_assert_msg(memcmp(&r, &d.hidden[i], sizeof r) == 0, "seed %llu: emulated bf16 dense: hidden[%lld] = %.9g is not bf16",
                  (unsigned long long)tu_seed(), (long long)i, (double)d.hidden[i]);
  }
  for (int64_t i = 0; i < d.V; i++) {
    const float r = apb_bf16_round(d.logits[i]);
    ck_assert_msg(memcmp(&r, &d.logits[i], sizeof r) == 0, "seed %llu: emulated bf16 dense: logits[%lld] = %.9g is not bf16",
                  (unsigned long long)tu_seed(), (long long)i, (double)d.logits[i]);
  }
  assert_bitwise_run("bf16 emulation: apb H=1 vs dense", &x, &d);
  run_free(&x);
  for (int H = 2; H <= 3; H++) {
    apb_run_opts o = opts(APB_METHOD_RING, H);
    run(&o, 1025, 5, 0, &x);
    snprintf(what, sizeof what, "bf16 emulation: ring H=%d vs dense: hidden", H);
    tu_assert_close(what, x.hidden, d.hidden, d.n * d.E, t);
    snprintf(what, sizeof what, "bf16 emulation: ring H=%d vs dense: logits", H);
    tu_assert_close(what, x.logits, d.logits, d.V, t);
    run_free(&x);
  }
  g_emulate = 0;
  tu_assert_close("bf16 emulated dense vs fp32 dense: hidden", d.hidden, d32.hidden, d.n * d.E, t);
  tu_assert_close("bf16 emulated dense vs fp32 dense: logits", d.logits, d32.logits, d.V, t);
  run_free(&d32), run_free(&d);
}
END_TEST

/* Profiling (apb_host_args.profile 1: syncs, 2: the backend's timing marks) changes no result, and the
 * per-stage times are a breakdown of the prefill: each stage >= 0, the projections, attention and FFN
 * > 0, the compressing host's scorer > 0, and the stages sum to the prefill time (OTHER is the rest). */
START_TEST(test_profile_stages) {
  const apb_method m = _i ? APB_METHOD_RING : APB_METHOD_APB;
  run_out ref;
  apb_run_opts o = opts(m, 2);
  o.anchor = 64, o.passing = 48;
  run(&o, 1025, 5, 0, &ref);
  for (int r = 0; r < ref.H; r++)
    for (int k = 0; k < APB_STAGE_COUNT; k++) ck_assert_msg(ref.res[r].stats.stage_s[k] == 0, "unprofiled stage time");
  for (int prof = 1; prof <= 2; prof++) {
    run_out a;
    g_profile = prof;
    run(&o, 1025, 5, 0, &a);
    g_profile = 0;
    char what[96];
    snprintf(what, sizeof what, "%s H=2 --profile %d against unprofiled", apb_method_name(m), prof);
    assert_bitwise_run(what, &a, &ref);
    for (int r = 0; r < a.H; r++) tu_assert_stages(what, r, &a.res[r].stats);
    if (m == APB_METHOD_APB)
      ck_assert_msg(a.res[0].stats.stage_s[APB_STAGE_SCORE] > 0, "%s: host 0 compresses but its scorer is not timed",
                    what);
    run_free(&a);
  }
  run_free(&ref);
}
END_TEST

/* the cost model counts what the simulator did: attention FLOPs and bytes per host, exactly */
START_TEST(test_cost_model_counts) {
  /* _i: every method on 2 or 3 hosts, then on 2 (apb split), then apb and star --balance on 2 */
  const int balance = _i >= 2 * APB_METHOD_COUNT;
  apb_method m = balance ? (_i % 2 ? APB_METHOD_STAR : APB_METHOD_APB) : (apb_method)(_i % APB_METHOD_COUNT);
  int H = m == APB_METHOD_DENSE ? 1 : (_i / APB_METHOD_COUNT ? 2 : (m == APB_METHOD_ULYSSES ? 2 : 3));
  run_out x;
  apb_run_opts o = opts(m, H);
  o.balance = balance;
  if (m == APB_METHOD_APB || m == APB_METHOD_STAR) o.anchor = 100, o.passing = m == APB_METHOD_APB ? 40 : -1;
  if (m == APB_METHOD_APB && _i / APB_METHOD_COUNT) o.overlap = APB_OVERLAP_SPLIT; /* its calls, the same pairs */
  run(&o, 1025, 5, 0, &x);
  apb_hw hw;
  apb_hw_default(&hw);
  apb_cost c[8];
  apb_error err = {0};
  ck_assert_int_eq(apb_cost_plan(&x.plan, &tiny->cfg, tiny->scorer_width, 4, &hw, c, &err), APB_OK);
  for (int r = 0; r < x.H; r++) {
    const apb_host_stats *s = &x.res[r].stats;
    /* exact: both are sums of integers far below 2^53, which doubles hold and add without rounding */
    ck_assert_msg(s->attn_flops > 0 && s->attn_flops < 0x1p53 && s->linear_flops > 0 && s->linear_flops < 0x1p53,
                  "%s host %d: FLOPs %.17g and %.17g", apb_method_name(m), r, s->attn_flops, s->linear_flops);
    ck_assert_msg(c[r].attn_flops == s->attn_flops, "%s host %d: attn FLOPs model %.17g run %.17g", apb_method_name(m),
                  r, c[r].attn_flops, s->attn_flops);
    ck_assert_msg(c[r].linear_flops == s->linear_flops, "%s host %d: linear FLOPs model %.17g run %.17g",
                  apb_method_name(m), r, c[r].linear_flops, s->linear_flops);
    int64_t sent = 0, recv = 0;
    for (int k = 0; k < APB_COLL_COUNT; k++) sent += x.stats[r].bytes_sent[k], recv += x.stats[r].bytes_recv[k];
    ck_assert_msg(c[r].bytes_sent + c[r].dec_bytes_sent == sent, "%s host %d: bytes sent model %lld+%lld run %lld",
                  apb_method_name(m), r, (long long)c[r].bytes_sent, (long long)c[r].dec_bytes_sent, (long long)sent);
    ck_assert_int_eq(s->bytes_sent, sent);
    int64_t calls = 0;
    for (int k = 0; k < APB_COLL_COUNT; k++) calls += x.stats[r].calls[k];
    ck_assert_msg(c[r].collectives + c[r].dec_collectives == calls, "%s host %d: collectives model %lld+%lld run %lld",
                  apb_method_name(m), r, (long long)c[r].collectives, (long long)c[r].dec_collectives,
                  (long long)calls);
  }
  run_free(&x);
}
END_TEST

/* bad input to apb_plan_make, apb_cost_plan and apb_host_run: an error naming it, never a crash, an
 * overflow, a silent default or inf/NaN times */
START_TEST(test_plan_cost_validation) {
  setup_model();
  apb_error err = {0};
  apb_run_opts o;
  apb_run_opts_default(&o);
  o.hosts = 2;
  apb_plan plan;
  ck_assert_int_eq(apb_plan_make(NULL, 64, 2, &tiny->cfg, tiny->scorer_width, &plan, &err), APB_EINVAL);
  ck_assert_int_eq(apb_plan_make(&o, 64, 2, &tiny->cfg, tiny->scorer_width, NULL, &err), APB_EINVAL);
  ck_assert_int_eq(apb_plan_make(&o, 64, 2, NULL, tiny->scorer_width, &plan, &err), APB_EINVAL);
  apb_run_opts b = o;
  b.passing = -5; /* -1 is the default; -5 is no length */
  apb_error_clear(&err);
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, tiny->scorer_width, &plan, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "--passing"), "%s", err.msg);
  b = o, b.max_new_tokens = INT64_MAX;
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, tiny->scorer_width, &plan, &err), APB_EINVAL);
  /* positions are int32: a run beyond 2^31 tokens is refused before anything is allocated */
  b = o, b.max_new_tokens = (int64_t)1 << 40;
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, tiny->scorer_width, &plan, &err), APB_OK);
  int32_t *doc, *query;
  make_doc(64, 2, &doc, &query);
  apb_host_result res[2];
  apb_sim_opts so = {.backend = "naive", .timeout_s = 60};
  apb_error_clear(&err);
  ck_assert_int_eq(apb_sim_execute(&plan, tiny, &so, doc, query, res, NULL, &err), APB_EUNSUPPORTED);
  ck_assert_msg(strstr(err.msg, "int32"), "%s", err.msg);
  free(doc), free(query);
  /* the retaining scorer without retaining heads: refused where a host selects, not on one host (which
   * selects nothing) nor with l_p = 0 */
  b = o;
  apb_error_clear(&err);
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, 0, &plan, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "retaining heads"), "%s", err.msg);
  b.hosts = 1;
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, 0, &plan, &err), APB_OK);
  b = o, b.passing = 0;
  ck_assert_int_eq(apb_plan_make(&b, 64, 2, &tiny->cfg, 0, &plan, &err), APB_OK);
  /* the cost model: rates must be finite and positive, the configuration valid */
  ck_assert_int_eq(apb_plan_make(&o, 64, 2, &tiny->cfg, tiny->scorer_width, &plan, &err), APB_OK);
  apb_hw hw, h0;
  apb_hw_default(&hw);
  apb_cost c[2];
  ck_assert_int_eq(apb_cost_plan(&plan, &tiny->cfg, tiny->scorer_width, 2, &hw, c, &err), APB_OK);
  h0 = hw, h0.attn_flops_s = 0;
  ck_assert_int_eq(apb_cost_plan(&plan, &tiny->cfg, tiny->scorer_width, 2, &h0, c, &err), APB_EINVAL);
  h0 = hw, h0.link_bytes_s = NAN;
  apb_error_clear(&err);
  ck_assert_int_eq(apb_cost_plan(&plan, &tiny->cfg, tiny->scorer_width, 2, &h0, c, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "link_bytes_s"), "%s", err.msg);
  ck_assert_int_eq(apb_cost_plan(&plan, &tiny->cfg, tiny->scorer_width, 2, NULL, c, &err), APB_EINVAL);
  ck_assert_int_eq(apb_cost_plan(&plan, &tiny->cfg, -5, 2, &hw, c, &err), APB_EINVAL);
  apb_model_config bad = tiny->cfg;
  bad.n_layers = -3;
  ck_assert_int_ne(apb_cost_plan(&plan, &bad, tiny->scorer_width, 2, &hw, c, &err), APB_OK);
  bad = tiny->cfg, bad.n_heads = INT_MAX;
  ck_assert_int_ne(apb_cost_plan(&plan, &bad, tiny->scorer_width, 2, &hw, c, &err), APB_OK);
}
END_TEST

/* apb_cost_fit on hand-made counts: exact rates come back; a rate no run depends on ends on a bound
 * and is flagged; bad measurements and rates are refused */
START_TEST(test_cost_fit) {
  apb_cost h[3];
  memset(h, 0, sizeof h);
  h[0].attn_flops = 4e15, h[0].linear_flops = 1e15, h[0].elem_bytes = 3e11;
  h[1].attn_flops = 1e15, h[1].linear_flops = 2e15, h[1].elem_bytes = 6e11, h[1].bytes_sent = 274000000;
  h[2].attn_flops = 0.5e15, h[2].linear_flops = 0.5e15, h[2].collectives = 100;
  apb_hw hw;
  apb_hw_default(&hw);
  double t[3];
  for (int i = 0; i < 3; i++)
    t[i] = h[i].attn_flops / 400e12 + h[i].linear_flops / 800e12 + h[i].elem_bytes / hw.mem_bytes_s +
           (double)h[i].bytes_sent / hw.link_bytes_s + (double)h[i].collectives * hw.link_latency_s;
  /* observation 1 has two hosts: host 0 (h[1]) is the slower one and sets its time */
  apb_cost two[2] = {h[1], h[2]};
  apb_cost_obs obs[2] = {{&h[0], 1, t[0]}, {two, 2, t[1]}};
  double e = 1;
  int edge = 1;
  apb_error err = {0};
  ck_assert_int_eq(apb_cost_fit(obs, 2, &hw, &e, &edge, &err), APB_OK);
  ck_assert_msg(fabs(hw.attn_flops_s / 400e12 - 1) < 5e-4 && fabs(hw.gemm_flops_s / 800e12 - 1) < 5e-4,
                "fit gave %g and %g FLOP/s, want 4e14 and 8e14", hw.attn_flops_s, hw.gemm_flops_s);
  ck_assert_msg(e < 5e-4 && edge == 0, "largest error %g, at_edge %d", e, edge);
  /* no attention anywhere: its rate is not pinned down */
  apb_cost flat = h[0];
  flat.attn_flops = 0;
  apb_cost_obs one = {&flat, 1, 1.0};
  ck_assert_int_eq(apb_cost_fit(&one, 1, &hw, &e, &edge, &err), APB_OK);
  ck_assert_int_eq(edge, 1);
  apb_cost_obs bad = {&flat, 1, NAN};
  ck_assert_int_eq(apb_cost_fit(&bad, 1, &hw, NULL, NULL, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "positive number") != NULL, "%s", err.msg);
  bad.seconds = -1;
  ck_assert_int_eq(apb_cost_fit(&bad, 1, &hw, NULL, NULL, &err), APB_EINVAL);
  ck_assert_int_eq(apb_cost_fit(&one, 0, &hw, NULL, NULL, &err), APB_EINVAL);
  bad.seconds = 1, bad.H = 0;
  ck_assert_int_eq(apb_cost_fit(&bad, 1, &hw, NULL, NULL, &err), APB_EINVAL);
  hw.mem_bytes_s = 0;
  ck_assert_int_eq(apb_cost_fit(&one, 1, &hw, NULL, NULL, &err), APB_EINVAL);
  ck_assert_msg(strstr(err.msg, "bandwidth") != NULL, "%s", err.msg);
}
END_TEST

/* ---------------------------------------------------------------- the program */

static const char *bin(void) { return tu_apb_bin(); }

/* A JSON number field of the n-th method object of `apb run --json` output. */
static double json_field(const char *out, int n, const char *key) {
  const char *p = out;
  for (int i = 0; i <= n; i++) {
    p = strstr(p, "{\"method\"");
    ck_assert_msg(p != NULL, "method %d missing in:\n%s", n, out);
    p++;
  }
  char k[64];
  snprintf(k, sizeof k, "\"%s\": ", key);
  const char *f = strstr(p, k);
  ck_assert_msg(f != NULL, "%s missing in:\n%s", key, out);
  return strtod(f + strlen(k), NULL);
}

/* apb run's timing columns: compute s (the largest prefill less the time blocked in collectives) is the
 * prefill for dense, which has none, and well under it for simulated hosts that take turns at their
 * collectives; the table says which reading applies */
START_TEST(test_cli_run_times) {
  char cmd[1024], *out = NULL;
  snprintf(cmd, sizeof cmd, "%s run --quiet --synthetic 2048 --query-len 5 --max-new-tokens 2 --threads 1 "
           "--hosts 4 --method dense,ring,apb --json", bin());
  int rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0, "`%s` failed (%d):\n%s", cmd, rc, out);
  const double dp = json_field(out, 0, "prefill_s"), dc = json_field(out, 0, "prefill_compute_s");
  ck_assert_msg(dc == dp, "dense: compute %g s, prefill %g s: they should be equal", dc, dp);
  for (int i = 1; i < 3; i++) {
    const double p = json_field(out, i, "prefill_s"), c = json_field(out, i, "prefill_compute_s");
    ck_assert_msg(c > 0 && c < 0.9 * p, "method %d: compute %g s against prefill %g s", i, c, p);
  }
  free(out);
  snprintf(cmd, sizeof cmd, "%s run --quiet --synthetic 1024 --query-len 5 --max-new-tokens 1 --threads 1 "
           "--hosts 2 --method apb", bin());
  ck_assert_int_eq(tu_sh(cmd, &out), 0);
  ck_assert_msg(strstr(out, "compute s") && strstr(out, "take turns"), "%s", out);
  free(out);
  snprintf(cmd, sizeof cmd, "%s run --quiet --synthetic 1024 --query-len 5 --max-new-tokens 1 --threads 1 "
           "--hosts 2 --method apb --concurrent", bin());
  ck_assert_int_eq(tu_sh(cmd, &out), 0);
  ck_assert_msg(strstr(out, "compute s") && !strstr(out, "take turns"), "%s", out);
  free(out);
}
END_TEST

START_TEST(test_cli_bad_input) {
  struct {
    const char *args, *expect;
  } cases[] = {
      {"--synthetic 3 --hosts 4 --method ring", "need at least 4 document tokens"},
      /* too few tokens for the hosts: the refusal names --hosts and what to do */
      {"--synthetic 3 --hosts 4 --method ring", "--hosts 4: 4 hosts need at least 4 document tokens for ring (one per "
                                                "host); the document has 3: lower --hosts or give a longer document"},
      {"--synthetic 7 --hosts 4 --method zigzag", "--hosts 4: 4 hosts need at least 8 document tokens for zigzag (two "
                                                  "chunks per host)"},
      {"--synthetic 7 --hosts 4 --method apb --embed-query 0 --balance", "lower --hosts, give a longer document or drop "
                                                                         "--balance"},
      {"--synthetic 40 --hosts 2 --method apb --anchor 20 --embed-query 0 --balance", "--anchor 20 exceeds the block "
       "length l_b = 10 (APB.md 3: l_a <= l_b; 40 tokens in 4 blocks, two per host with --balance): lower --anchor"},
      {"--synthetic 8 --hosts 2 --method apb --query-len 16", "(l_a 1, at most l_b = 4; s 0)"},
      {"--synthetic 1000 --hosts 3 --method ulysses", "give --hosts a divisor of 2"},
      {"--synthetic 1000 --hosts 3 --method star --passing 5", "drop --passing, or use --method apb"},
      {"--synthetic 1000 --hosts 4 --method apb --anchor 400", "exceeds the block length"},
      {"--synthetic 1000 --hosts 4 --method apb --anchor -5", "--anchor"},
      {"--synthetic 1000 --hosts 4 --method apb --anchor 20 --query-len 30", "does not fit in the anchor"},
      {"--synthetic 1000 --hosts 3 --method ulysses", "must divide the 2 KV heads"},
      {"--synthetic 1000 --method apb --pool 4", "--pool must be an odd window"},
      {"--synthetic 1000 --method bogus", "unknown method 'bogus'"},
      {"--synthetic 1000 --method ring --balance", "--balance pairs virtual hosts of apb or star"},
      {"--synthetic 99999999999999999999", "--synthetic"},
      {"--model /nonexistent/dir", "config.json"},
      {"--tokens /nonexistent/tokens.txt", "cannot open token file"},
      {"--synthetic 1000 --kv-heads 3", "4 query heads are not a multiple of 3 KV heads"},
      {"--synthetic 1000 --head-dim 9", "head dimension 9 is odd"},
      {"--synthetic 1000 --layers 0", "--layers wants an integer in [1,"},
      {"--model /nonexistent/dir --kv-heads 4", "a --model directory has its own config.json"},
      {"--synthetic 1000 --hosts 4 --method ulysses --kv-heads 4 --q-heads 6", "not a multiple of 4 KV heads"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    char cmd[512], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s run --quiet --max-new-tokens 1 %s", bin(), cases[i].args);
    int rc = tu_sh(cmd, &out);
    ck_assert_msg((rc == 1 || rc == 2) && strstr(out, cases[i].expect), "`%s`: exit %d, output:\n%s\n(expected '%s')",
                  cmd, rc, out, cases[i].expect);
    free(out);
  }
}
END_TEST

/* the preset's sizes changed on the command line: ulysses on 8 hosts (needs 8 KV heads, tiny has 2)
 * equals dense; a vocabulary of 2 still gives a valid synthetic document */
START_TEST(test_cli_sizes) {
  char cmd[512], *out = NULL;
  snprintf(cmd, sizeof cmd, "%s run --json --max-new-tokens 2 --synthetic 1000 --query-len 8 --hosts 8 --method "
           "dense,ulysses --q-heads 16 --kv-heads 8 --head-dim 32 --hidden 512", bin());
  int rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0 && strstr(out, "\"method\": \"ulysses\", \"hosts\": 8"), "`%s`: exit %d:\n%s", cmd, rc, out);
  const char *e = strstr(strstr(out, "\"method\": \"ulysses\""), "\"logits_rel_err\": ");
  ck_assert_msg(e != NULL, "no logits_rel_err for ulysses:\n%s", out);
  double rel = strtod(e + 18, NULL);
  apb_tol t = apb_tolerance(APB_PREC_F32, 1008);
  ck_assert_msg(rel <= t.rel_fro, "ulysses on 8 hosts (16/8 heads): logits rel err %g against dense, bound %g", rel,
                t.rel_fro);
  free(out);
  snprintf(cmd, sizeof cmd, "%s run --quiet --max-new-tokens 1 --synthetic 300 --hosts 2 --method dense,apb "
           "--scorer random --vocab 2", bin());
  rc = tu_sh(cmd, &out);
  ck_assert_msg(rc == 0, "`%s`: exit %d:\n%s", cmd, rc, out);
  free(out);
}
END_TEST

START_TEST(test_cli_token_files) {
  char *empty = tu_tmpname(".txt"), *big = tu_tmpname(".txt"), *bad = tu_tmpname(".txt");
  FILE *f = fopen(empty, "w");
  fclose(f);
  f = fopen(big, "w");
  for (int i = 0; i < 200; i++) fprintf(f, "%d\n", i == 100 ? 999999 : i % 50);
  fclose(f);
  f = fopen(bad, "w");
  fprintf(f, "1\n2\nthree\n");
  fclose(f);
  struct {
    const char *path, *expect;
  } cases[] = {{empty, "the document would be empty"}, {big, "outside the model's vocabulary"}, {bad, "is not a token id"}};
  for (size_t i = 0; i < 3; i++) {
    char cmd[512], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s run --quiet --method dense --tokens %s", bin(), cases[i].path);
    int rc = tu_sh(cmd, &out);
    ck_assert_msg(rc == 1 && strstr(out, cases[i].expect), "`%s`: exit %d:\n%s", cmd, rc, out);
    free(out);
  }
  remove(empty), remove(big), remove(bad);
  free(empty), free(big), free(bad);
}
END_TEST

#if defined(HAVE_MPI) && defined(APB_MPIRUN)
/* the same run in-process and as H processes under mpirun: bitwise equal dumps */
START_TEST(test_mpi_bitwise) {
  /* _i 2: ring on 3 ranks with 1000-byte MPI messages (APB_MPI_PIECE): blocks of 342, 341 and 341 rows
   * make sendrecvs whose two directions need different numbers of pieces, and a rank whose own
   * count of pieces differs from its peer's (1024 tokens, not 1025, where both would be the larger) */
  const int H = _i == 0 ? 2 : _i == 1 ? 4 : 3;
  const char *method = _i ? "ring" : "apb", *piece = _i == 2 ? "-x APB_MPI_PIECE=1000" : "";
  char *a = tu_tmpname(".safetensors"), *b = tu_tmpname(".safetensors");
  char cmd[1024], *out = NULL;
  const char *common = _i == 2 ? "run --quiet --synthetic 1024 --query-len 5 --max-new-tokens 3 --threads 1"
                               : "run --quiet --synthetic 1025 --query-len 5 --max-new-tokens 3 --threads 1";
  snprintf(cmd, sizeof cmd, "%s %s --method %s --hosts %d --dump %s", bin(), common, method, H, a);
  int rc = tu_sh(cmd, &out);
  if (rc != 0) fprintf(stderr, "`%s` failed (%d):\n%s\n", cmd, rc, out);
  ck_assert_msg(rc == 0, "the in-process run failed with %d: its output is above", rc);
  free(out);
#ifdef __SANITIZE_ADDRESS__
  /* OpenMPI keeps what MPI_Init allocates and unloads its components in MPI_Finalize, so LeakSanitizer
   * reports blocks it cannot attribute (<unknown module>): the ranks run with leak detection off. The
   * same code runs leak-checked in the in-process run above and in the rest of this suite. */
  const char *fwd = "-x ASAN_OPTIONS=detect_leaks=0:abort_on_error=1";
#else
  const char *fwd = "";
#endif
  snprintf(cmd, sizeof cmd,
           "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader "
           "%s --oversubscribe %s %s -np %d %s %s --method %s --hosts %d --dump %s",
           APB_MPIRUN, fwd, piece, H, bin(), common, method, H, b);
  rc = tu_sh(cmd, &out);
  if (rc != 0) fprintf(stderr, "`%s` failed (%d):\n%s\n", cmd, rc, out);
  ck_assert_msg(rc == 0, "mpirun -np %d (%s%s%s) failed with %d: its output is above", H, method, *piece ? ", " : "",
                piece, rc);
  free(out);
  apb_st_file *fa = NULL, *fb = NULL;
  apb_error err = {0};
  ck_assert_msg(apb_st_open(a, &fa, &err) == APB_OK, "%s", err.msg);
  ck_assert_msg(apb_st_open(b, &fb, &err) == APB_OK, "%s", err.msg);
  const char *names[] = {"hidden", "logits", "generated"};
  for (int i = 0; i < 3; i++) {
    const apb_st_tensor *ta = apb_st_find(fa, names[i]), *tb = apb_st_find(fb, names[i]);
    ck_assert_msg(ta && tb, "tensor %s missing", names[i]);
    ck_assert_int_eq(ta->end - ta->begin, tb->end - tb->begin);
    ck_assert_msg(memcmp(ta->data, tb->data, ta->end - ta->begin) == 0, "%s: in-process and mpirun -np %d differ (%s)",
                  names[i], H, method);
  }
  apb_st_close(fa), apb_st_close(fb);
  remove(a), remove(b);
  free(a), free(b);
}
END_TEST

static double now_wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int count_of(const char *hay, const char *needle) {
  int k = 0;
  for (const char *p = hay; (p = strstr(p, needle)); p++) k++;
  return k;
}

/* mpirun -np 2 runs that must fail on every rank (none waiting for a peer), with a non-zero exit and
 * the message once, naming the failing rank when only one failed. Rank 0 runs with args, rank 1 with
 * alt (NULL: args), through a wrapper script that picks by the launcher's rank variable. */
START_TEST(test_mpi_errors) {
  const char *tokens = tu_tmpname(".txt");
  FILE *tf = fopen(tokens, "w");
  ck_assert_msg(tf != NULL, "cannot write %s", tokens);
  for (int i = 0; i < 1030; i++) fprintf(tf, "%d\n", 20 + i % 1000);
  fclose(tf);
  char tok_ok[512], tok_bad[512];
  snprintf(tok_ok, sizeof tok_ok, "--method apb --tokens %s", tokens);
  snprintf(tok_bad, sizeof tok_bad, "--method apb --tokens %s.missing", tokens);
  struct {
    const char *args, *alt, *expect;
  } cases[] = {
      /* the default methods include dense, which one host runs */
      {"--synthetic 1025", NULL, "give --method without dense (the default list dense,ring,star,apb has it)"},
      {"--synthetic 1025 --method apb --hosts 3", NULL, "--hosts 3 but mpirun started 2 ranks"},
      {"--synthetic 1025 --method apb --dump-layers --dump /dev/null", NULL,
       "--dump-layers keeps every host's layers in one process"},
      {"--synthetic 1025 --method ulysses --kv-heads 1", NULL, "ulysses on mpirun's 2 ranks"},
      /* one rank's input unreadable, or different from rank 0's */
      {tok_ok, tok_bad, "rank 1 of 2: cannot open token file"},
      {"--synthetic 1025 --method apb", "--synthetic 1025 --method apb --seed 2", "rank 1 of 2: its model differs"},
      {"--synthetic 1025 --method ring", "--synthetic 1030 --method ring",
       "rank 1 of 2: its document or query differs"},
      {"--synthetic 1025 --method apb", "--synthetic 1025 --method apb --anchor 64",
       "rank 1 of 2: its options differ"},
  };
  char *wrap = tu_tmpname(".sh"), cmd[2048], *out = NULL;
  const char *common = "run --quiet --query-len 5 --max-new-tokens 2 --threads 1";
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    FILE *f = fopen(wrap, "w");
    ck_assert_msg(f != NULL, "cannot write %s", wrap);
    fprintf(f, "#!/bin/sh\nif [ \"${OMPI_COMM_WORLD_RANK:-$PMI_RANK}\" = 1 ]; then exec %s %s %s; fi\nexec %s %s %s\n",
            bin(), common, cases[i].alt ? cases[i].alt : cases[i].args, bin(), common, cases[i].args);
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "chmod +x %s && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader "
             "timeout 120 %s --oversubscribe -x ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 -np 2 %s",
             wrap, APB_MPIRUN, wrap);
    int rc = tu_sh(cmd, &out);
    int k = count_of(out, cases[i].expect);
    if (rc == 0 || rc == 124 || k != 1)
      fprintf(stderr, "mpirun -np 2 apb %s %s (rank 1: %s): exit %d, '%s' %d times (want once):\n%s\n", common,
              cases[i].args, cases[i].alt ? cases[i].alt : "the same", rc, cases[i].expect, k, out);
    ck_assert_msg(rc != 0 && rc != 124, "case %zu: exit %d (0: a wrong run passed; 124: a rank hung)", i, rc);
    ck_assert_msg(k == 1, "case %zu: the message came %d times, not once: the output is above", i, k);
    free(out);
  }
  remove(wrap), remove(tokens);
  free(wrap), free((char *)tokens);
}
END_TEST

/* A rank that never comes to a collective: rank 1 sleeps 60 s before its first transfer (the test-only
 * APB_MPI_STALL_RANK), so rank 0 must give up after APB_MPI_TIMEOUT_S=1 s, say so once naming itself,
 * and end the job: a non-zero exit well before rank 1 would have woken. _i 1: a timeout that is not a
 * number is refused on every rank before any transfer. */
START_TEST(test_mpi_timeout) {
  char cmd[1024], *out = NULL;
  const char *env = _i == 0 ? "-x APB_MPI_TIMEOUT_S=1 -x APB_MPI_STALL_RANK=1 -x APB_MPI_STALL_S=60"
                            : "-x APB_MPI_TIMEOUT_S=soon";
  snprintf(cmd, sizeof cmd,
           "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader timeout 120 %s "
           "--oversubscribe -x ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 %s -np 2 %s run --quiet --synthetic 1025 "
           "--method ring --query-len 5 --max-new-tokens 2 --threads 1",
           APB_MPIRUN, env, bin());
  const double t0 = now_wall();
  int rc = tu_sh(cmd, &out);
  const double took = now_wall() - t0;
  const char *expect = _i == 0 ? "rank 0 of 2: MPI rank 0: allgather did not complete within 1 s (APB_MPI_TIMEOUT_S)"
                               : "APB_MPI_TIMEOUT_S='soon' is not a number of seconds in [0, 1e9] (0 waits forever)";
  const int k = count_of(out, expect);
  if (rc == 0 || rc == 124 || k < 1 || (_i == 0 && (k != 1 || took > 40)))
    fprintf(stderr, "`%s`: exit %d after %.1f s, '%s' %d times:\n%s\n", cmd, rc, took, expect, k, out);
  ck_assert_msg(rc != 0 && rc != 124, "exit %d (0: passed; 124: hung)", rc);
  ck_assert_msg(k >= 1 && (_i == 1 || k == 1), "the message came %d times: the output is above", k);
  ck_assert_msg(_i == 1 || took < 40, "the job took %.1f s to end after a 1 s timeout", took);
  free(out);
}
END_TEST
#endif

int main(void) {
  Suite *s = suite_create("sched");
  TCase *ti = tu_tcase("invariants", 600);
  tcase_add_loop_test(ti, test_exact_methods_equal_dense, 0, 10);
  tcase_add_loop_test(ti, test_apb_h1_is_dense, 0, 2);
  tcase_add_loop_test(ti, test_apb_lp0_is_star, 0, 4);
  tcase_add_loop_test(ti, test_apb_no_anchor_all_passing_is_dense, 0, 12);
  tcase_add_loop_test(ti, test_apb_overlap_same_function, 0, 4);
  tcase_add_loop_test(ti, test_ulysses_pipeline_bitwise, 0, 2);
  tcase_add_loop_test(ti, test_ulysses_many_heads, 0, 4);
  tcase_add_loop_test(ti, test_ulysses_plan_of_another_model, 0, 2);
  tcase_add_loop_test(ti, test_balance_equals_2h_hosts, 0, 6);
  tcase_add_loop_test(ti, test_threads_bitwise, 0, 3);
  tcase_add_loop_test(ti, test_ffn_chunk, 0, 6);
  tcase_add_loop_test(ti, test_nonfinite_logits, 0, 2);
  tcase_add_test(ti, test_bf16_emulation);
  tcase_add_loop_test(ti, test_profile_stages, 0, 2);
  tcase_add_loop_test(ti, test_cost_model_counts, 0, 2 * APB_METHOD_COUNT + 2);
  tcase_add_test(ti, test_cost_fit);
  tcase_add_test(ti, test_plan_cost_validation);
  suite_add_tcase(s, ti);
  TCase *tc = tu_tcase("program", 300);
  tcase_add_test(tc, test_cli_bad_input);
  tcase_add_test(tc, test_cli_token_files);
  tcase_add_test(tc, test_cli_sizes);
  tcase_add_test(tc, test_cli_run_times);
#if defined(HAVE_MPI) && defined(APB_MPIRUN)
  tcase_add_loop_test(tc, test_mpi_bitwise, 0, 3);
  tcase_add_test(tc, test_mpi_errors);
  tcase_add_loop_test(tc, test_mpi_timeout, 0, 2);
#else
  fprintf(stderr, "check_sched: built without MPI (or no mpirun): the mpirun comparison is not compiled in\n");
#endif
  suite_add_tcase(s, tc);
  int rc = tu_run(s, "check_sched");
  apb_model_free(tiny);
  apb_model_free(gqa8);
  return rc;
}
