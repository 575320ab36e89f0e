/* src/cmd_run.c: `apb run`, the end-to-end job: a model, a document and a query, one or more methods
 * on H hosts (simulated in this process, or one process per host under mpirun), the query and greedy
 * decode, and a table comparing every method with dense (shared/APB.md 3-5).
 *
 * With no arguments `apb` runs this with its embedded defaults (tiny preset, a 16K-token synthetic
 * document with a passkey needle, 4 simulated hosts, methods dense, ring, star, apb). Output: one
 * table on stdout (or JSON with --json); progress on stderr when it is a terminal; --dump writes the
 * final hidden states, the logits of the last query token and the generated tokens. Under mpirun the
 * ranks agree on each step's outcome (mpi_agree), so that all stop together and rank 0 reports each
 * message once, and compare fingerprints of their options, model and document with rank 0's
 * (mpi_same_inputs); a rank that fails inside a method's run ends the job (rank_ends_job). Not here:
 * the schedules themselves (sched/), or any printing inside the library. Tested by tests/check_sched.c
 * (end to end, including mpirun) and tests/check_cli.c; the GPU paths (--gpus, and a CUDA backend
 * under mpirun, both through NCCL) by tests/check_gpu_nccl.c.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "apb/backend.h"
#include "apb/cuda.h"
#include "apb/model.h"
#include "apb/nccl.h"
#include "apb/safetensors.h"
#include "apb/sched.h"
#include "apb/sim.h"
#include "cli.h"

#define CMD "run"
#define MAX_METHODS APB_METHOD_COUNT

static void help(void) {
  printf(
      "Usage: apb run [--model DIR [--heads FILE] | --preset NAME [--seed S] [sizes]]\n"
      "               [--tokens FILE | --synthetic N] [--query-len Q]\n"
      "               [--method LIST] [--hosts H] [--anchor A] [--passing P] [--query-offset S]\n"
      "               [--embed-query 0|1] [--scorer retaining|random|uniform] [--pool W]\n"
      "               [--max-new-tokens N] [--backend naive|fast|cuda-bf16|cuda-f32] [--threads N]\n"
      "               [--concurrent | --gpus N] [--dump FILE] [--dump-layers] [--json] [--quiet]\n\n"
      "Runs a prefill of the document with each method on H hosts, then the query and greedy decode\n"
      "(shared/APB.md 3-5), and prints a table against dense.\n\n"
      "Model:\n"
      "  --model DIR         a Hugging Face directory (config.json, model.safetensors[.index.json])\n"
      "  --heads FILE        retaining heads for --model (model.layers.{i}.self_attn.fc1/fc2.weight;\n"
      "                      default DIR/" APB_HEADS_FILE " when that file exists)\n"
      "  --preset NAME       tiny | small | llama3-8b-shape, seeded random weights (default tiny)\n"
      "  --seed S            seed of the preset's weights and of the synthetic document (default 1)\n"
      CLI_SHAPE_HELP
      "Input:\n"
      "  --tokens FILE       token ids, one per line, or a safetensors file with an integer tensor\n"
      "                      'tokens' (or its only tensor); the last --query-len ids are the query\n"
      "  --synthetic N       a generated N-token document with a passkey needle (default 16384)\n"
      "  --query-len Q       query tokens (default 16; with --tokens, taken from the end of the file)\n"
      "Methods (shared/APB.md 5):\n"
      "  --method LIST       comma-separated: dense, ring, zigzag, ulysses, star, apb\n"
      "                      (default dense,ring,star,apb)\n"
      "  --hosts H           hosts (default 4; dense always uses one); under mpirun, the rank count\n"
      "  --anchor A          l_a (default apb: min(l_b/4, 8192); star: l_b)\n"
      "  --passing P         apb: l_p, KV pairs each host passes per KV head (default l_a/2)\n"
      "  --query-offset S    where the query sits in the anchor (default 0); in a list, apb's (and\n"
      "                      star's when --embed-query is given)\n"
      "  --embed-query 0|1   embed the query in the anchor (default apb 1, star 0)\n"
      "  --scorer NAME       retaining (default; needs heads) | random | uniform\n"
      "  --pool W            max-pool window over scores, odd (default 5 retaining, 1 otherwise)\n"
      "  --max-new-tokens N  greedy tokens after the query (default 8)\n"
      "  --ffn-chunk R       rows per MLP chunk (default 8192)\n"
      "  --balance           apb, star: each host holds virtual hosts h and 2H-1-h of a 2H-host run\n"
      "                      (default off)\n"
      "  --overlap 0|1|2     apb: how the passing block's all-gathers are hidden: 0 not at all\n"
      "                      (one attention call after them), 1 [A|B] attended while they run,\n"
      "                      then the local rows against P, merged by LSE, 2 the anchor rows\n"
      "                      attended while they run, then the local rows in one call (default 2);\n"
      "                      ulysses: nonzero pipelines the all-to-alls over head groups\n"
      "Execution:\n"
      "  --backend NAME      fast (default), naive (the oracle; slow), cuda-bf16, cuda-f32\n"
      "  --threads N         OpenMP threads (default: OMP_NUM_THREADS or every core)\n"
      "  --concurrent        simulated hosts run at once (default: one at a time, each using every\n"
      "                      thread, so per-host compute time is exact)\n"
      "  --gpus N            the hosts on N GPUs of this machine (devices 0..N-1), one thread each,\n"
      "                      through NCCL (docs/nccl.md); backend cuda-bf16 unless --backend cuda-f32;\n"
      "                      --hosts defaults to N\n"
      "Output:\n"
      "  --dump FILE         safetensors: hidden [n, E] (final, after the norm, document order),\n"
      "                      logits [V] of the last query token, generated [N] (I32), positions;\n"
      "                      one method only\n"
      "  --dump-layers       with --dump: layer{l}.host{h}.out [T_h, E] and .selected [Hkv, k]\n"
      "                      (--balance: .selected_v2 for the host's second block)\n"
      "  --json              a JSON summary on stdout instead of the table\n"
      "  --quiet             no progress on stderr\n"
      "  -h, --help          this text\n\n"
      "Under mpirun (mpirun -np H apb run ...) each process is one host and rank 0 prints and dumps;\n"
      "with --backend cuda-bf16|cuda-f32 each process takes the GPU of its local rank and the hosts\n"
      "talk through NCCL. --hosts, if given, must equal -np; dense (in the default list) needs -np 1;\n"
      "--dump-layers runs without mpirun. Every rank must get the same options, model and document\n"
      "(checked). A rank that fails ends every rank: rank 0 reports each message once, naming the ranks\n"
      "that gave it (none when all did), except for a failure inside a method's run, which the failing\n"
      "rank reports itself, naming its rank, before it ends the job (MPI_Abort).\n");
}

typedef struct run_cfg {
  const char *model_dir, *heads, *tokens_path, *dump, *backend;
  apb_preset preset;
  uint64_t seed;
  int64_t synthetic, q_len;
  apb_method methods[MAX_METHODS];
  int n_methods;
  apb_run_opts o;
  int threads, concurrent, dump_layers, json, quiet, hosts_given;
  int gpus;           /* --gpus N: hosts on N GPUs through NCCL (0: simulated hosts) */
} run_cfg;

/* ---------------------------------------------------------------- inputs */

/* A passkey document (deterministic in seed): filler drawn from the vocabulary, a needle of marker
 * tokens and 5 key tokens at 40% depth, and a query asking for it (marker tokens again). */
static int32_t *synthetic_doc(int64_t n, int64_t q_len, int V, uint64_t seed, int32_t **query) {
  int32_t *doc = malloc(sizeof(int32_t) * (size_t)n), *q = malloc(sizeof(int32_t) * (size_t)q_len);
  if (!doc || !q) {
    free(doc), free(q);
    return NULL;
  }
  apb_rng rng;
  apb_rng_seed(&rng, seed * 7919u + 17u);
  int32_t lo = V > 64 ? 16 : V > 1 ? 1 : 0, span = V - lo; /* span >= 1 for any V >= 1 */
  const int32_t keys = span < 10 ? span : 10;
  for (int64_t i = 0; i < n; i++) doc[i] = lo + (int32_t)apb_rng_below(&rng, (uint64_t)span);
  int32_t marker[4] = {1, 2, 3, 4};
  int64_t at = n * 2 / 5, key = 0;
  for (int64_t i = 0; i < 4 && at + i < n; i++) doc[at + i] = marker[i % 4] % V;
  for (int64_t i = 0; i < 5 && at + 4 + i < n; i++) doc[at + 4 + i] = lo + (int32_t)apb_rng_below(&rng, (uint64_t)keys), key++;
  for (int64_t i = 0; i < q_len; i++) q[i] = i < 4 ? marker[i] % V : lo + (int32_t)apb_rng_below(&rng, (uint64_t)span);
  *query = q;
  return doc;
}

static int read_tokens(const char *path, int64_t **ids, int64_t *n) {
  apb_error err = {0};
  apb_st_file *f = NULL;
  size_t len = strlen(path);
  if (len > 12 && strcmp(path + len - 12, ".safetensors") == 0) {
    *ids = NULL;
    apb_status st = apb_st_open(path, &f, &err);
    if (st) return cli_report(CMD, st, &err);
    const apb_st_tensor *t = apb_st_find(f, "tokens");
    if (!t && f->n == 1) t = &f->tensors[0];
    if (!t) {
      int nt = f->n;
      apb_st_close(f);
      return cli_fail(CMD, "%s: no tensor 'tokens' among its %d tensors; name the token tensor 'tokens'", path, nt);
    }
    *n = apb_st_numel(t);
    *ids = malloc(sizeof(int64_t) * (size_t)(*n ? *n : 1));
    if (!*ids) {
      apb_st_close(f);
      return cli_fail(CMD, "out of memory reading %s", path);
    }
    st = apb_st_read_i64(f, t, *ids, &err);
    apb_st_close(f);
    if (st) {
      free(*ids), *ids = NULL;
      return cli_report(CMD, st, &err);
    }
    return CLI_OK;
  }
  FILE *fp = fopen(path, "r");
  if (!fp) return cli_fail(CMD, "cannot open token file %s: %m; give one id per line or a .safetensors file", path);
  size_t cap = 1024;
  *n = 0;
  *ids = malloc(sizeof(int64_t) * cap);
  char line[256];
  int64_t lineno = 0;
  while (*ids && fgets(line, sizeof line, fp)) {
    lineno++;
    char *s = line, *end;
    if (!strchr(line, '\n') && ungetc(getc(fp), fp) != EOF) { /* the rest would read as another line */
      int frc = cli_fail(CMD, "%s:%lld: line longer than %d characters; give one token id per line", path,
                         (long long)lineno, (int)sizeof line - 2);
      fclose(fp), free(*ids), *ids = NULL;
      return frc;
    }
    while (*s == ' ' || *s == '\t') s++;
    if (*s == '\n' || *s == 0 || *s == '#') continue;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    while (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n') end++;
    if (end == s || *end || errno == ERANGE) {
      s[strcspn(s, "\r\n")] = 0;
      int frc = cli_fail(CMD, "%s:%lld: '%.40s' is not a token id (one integer per line)", path, (long long)lineno, s);
      fclose(fp), free(*ids), *ids = NULL;
      return frc;
    }
    if ((size_t)*n == cap) *ids = realloc(*ids, sizeof(int64_t) * (cap *= 2));
    if (*ids) (*ids)[(*n)++] = v;
  }
  int read_err = ferror(fp) ? (errno ? errno : EIO) : 0;
  fclose(fp);
  if (!*ids) return cli_fail(CMD, "out of memory reading %s", path);
  if (read_err) {
    free(*ids), *ids = NULL;
    return cli_fail(CMD, "cannot read token file %s: %s; give one id per line or a .safetensors file", path,
                    strerror(read_err));
  }
  return CLI_OK;
}

/* ---------------------------------------------------------------- dumps */

typedef struct dump_list {
  apb_st_entry *e;
  char **names;
  void **bufs;
  int n, cap;
} dump_list;

static int dump_add(dump_list *d, const char *name, apb_dtype dt, int ndim, const int64_t *shape, const void *data,
                    size_t bytes) {
  if (d->n == d->cap) {
    d->cap = d->cap ? 2 * d->cap : 64;
    d->e = realloc(d->e, sizeof *d->e * (size_t)d->cap);
    d->names = realloc(d->names, sizeof *d->names * (size_t)d->cap);
    d->bufs = realloc(d->bufs, sizeof *d->bufs * (size_t)d->cap);
    if (!d->e || !d->names || !d->bufs) return -1;
  }
  void *copy = malloc(bytes ? bytes : 1);
  char *nm = strdup(name);
  if (!copy || !nm) return free(copy), free(nm), -1;
  memcpy(copy, data, bytes);
  apb_st_entry *e = &d->e[d->n];
  memset(e, 0, sizeof *e);
  e->name = nm, e->dtype = dt, e->ndim = ndim, e->data = copy;
  for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
  d->names[d->n] = nm, d->bufs[d->n] = copy;
  d->n++;
  return 0;
}

static void dump_free(dump_list *d) {
  for (int i = 0; i < d->n; i++) free(d->names[i]), free(d->bufs[i]);
  free(d->e), free(d->names), free(d->bufs);
  memset(d, 0, sizeof *d);
}

typedef struct hook_state {
  dump_list *dl;
  int progress;
  int n_layers;
  int failed;
} hook_state;

static void hook_fn(void *user, const apb_hook_info *in) {
  hook_state *hs = user;
  if (strcmp(in->phase, "prefill") != 0) return;
  /* selected_v2: a balanced host's second virtual block (apb_hook_info) */
  int is_out = strcmp(in->stage, "layer_out") == 0, is_sel = strncmp(in->stage, "selected", 8) == 0;
  if (hs->progress && is_out)
    fprintf(stderr, "\r  host %d: layer %d/%d ", in->host, in->layer + 1, hs->n_layers);
  if (!hs->dl || !(is_out || is_sel)) return;
  char name[96];
  snprintf(name, sizeof name, "layer%d.host%d.%s", in->layer, in->host, is_out ? "out" : in->stage);
  size_t n = 1;
  for (int i = 0; i < in->ndim; i++) n *= (size_t)in->shape[i];
  if (is_sel) {
    int32_t *tmp = malloc(sizeof(int32_t) * (n ? n : 1));
    if (!tmp) return (void)(hs->failed = 1);
    for (size_t i = 0; i < n; i++) tmp[i] = (int32_t)in->data[i];
    if (dump_add(hs->dl, name, APB_DT_I32, in->ndim, in->shape, tmp, n * sizeof(int32_t))) hs->failed = 1;
    free(tmp);
  } else if (dump_add(hs->dl, name, APB_DT_F32, in->ndim, in->shape, in->data, n * sizeof(float))) {
    hs->failed = 1;
  }
}

/* ---------------------------------------------------------------- one method */

typedef struct method_result {
  apb_method m;
  int H;
  double wall_s, prefill_s, max_host_s;
  double compute_s; /* the slowest host's prefill minus its time blocked in collectives */
  double attn_max, attn_sum;
  int64_t bytes;
  float *logits;      /* [V] */
  int32_t *gen;       /* [G] */
  int64_t n_gen;
  float *hidden;      /* [n, E] document order, when dumping */
  int64_t n_hidden_rows;
} method_result;

static void result_free(method_result *r) {
  free(r->logits), free(r->gen), free(r->hidden);
  memset(r, 0, sizeof *r);
}

/* Fill mr from the per-host results (any host's logits and generated tokens; they are identical). */
static int collect(const run_cfg *c, const apb_model *m, const apb_plan *plan, apb_host_result *res, int H, method_result *mr,
                   double wall) {
  int V = m->cfg.vocab, E = m->cfg.hidden;
  mr->H = H;
  mr->wall_s = wall;
  for (int r = 0; r < H; r++) {
    double t = res[r].stats.prefill_s + res[r].stats.query_s + res[r].stats.decode_s;
    if (t > mr->max_host_s) mr->max_host_s = t;
    if (res[r].stats.prefill_s > mr->prefill_s) mr->prefill_s = res[r].stats.prefill_s;
    if (res[r].stats.prefill_s - res[r].stats.prefill_wait_s > mr->compute_s)
      mr->compute_s = res[r].stats.prefill_s - res[r].stats.prefill_wait_s;
    mr->attn_sum += res[r].stats.attn_flops;
    if (res[r].stats.attn_flops > mr->attn_max) mr->attn_max = res[r].stats.attn_flops;
    mr->bytes += res[r].stats.bytes_sent;
  }
  mr->logits = malloc(sizeof(float) * (size_t)V);
  mr->n_gen = res[H - 1].n_generated;
  mr->gen = malloc(sizeof(int32_t) * (size_t)(mr->n_gen ? mr->n_gen : 1));
  if (!mr->logits || !mr->gen) return cli_fail(CMD, "out of memory");
  memcpy(mr->logits, res[H - 1].logits, sizeof(float) * (size_t)V);
  if (mr->n_gen) memcpy(mr->gen, res[H - 1].generated, sizeof(int32_t) * (size_t)mr->n_gen); /* none: NULL */
  if (c->dump && res[0].hidden) {
    mr->n_hidden_rows = plan->n;
    mr->hidden = malloc(sizeof(float) * (size_t)plan->n * (size_t)E);
    if (!mr->hidden) return cli_fail(CMD, "out of memory for hidden states");
    for (int r = 0; r < H; r++)
      for (int64_t i = 0; i < res[r].n_rows; i++)
        memcpy(mr->hidden + (size_t)res[r].row_pos[i] * (size_t)E, res[r].hidden + (size_t)i * (size_t)E,
               sizeof(float) * (size_t)E);
  }
  return CLI_OK;
}

/* ---------------------------------------------------------------- GPUs through NCCL
 * --gpus N: the plan's hosts on devices 0..H-1 of this process (apb_nccl_execute). Its rank threads
 * call the hook at once, so the hook runs under a lock. Under mpirun with a CUDA backend, run_mpi
 * takes the GPU of the local rank and the MPI-bootstrapped NCCL communicator (apb_comm_nccl_mpi). */

typedef struct locked_hook {
  apb_hook_fn fn;
  void *user;
  pthread_mutex_t mu;
} locked_hook;

static void locked_hook_fn(void *user, const apb_hook_info *in) {
  locked_hook *lh = user;
  pthread_mutex_lock(&lh->mu);
  lh->fn(lh->user, in);
  pthread_mutex_unlock(&lh->mu);
}

static apb_status run_nccl(const apb_sim_opts *so, const apb_plan *plan, const apb_model *m, const int32_t *doc,
                           const int32_t *query, apb_host_result *res, apb_error *err) {
  locked_hook lh = {so->hook, so->hook_user, PTHREAD_MUTEX_INITIALIZER};
  apb_nccl_opts no = {.backend = so->backend, .hook = so->hook ? locked_hook_fn : NULL, .hook_user = &lh,
                      .want_hidden = so->want_hidden, .profile = so->profile};
  apb_status st = apb_nccl_execute(plan, m, &no, doc, query, res, NULL, err);
  pthread_mutex_destroy(&lh.mu);
  return st;
}

/* The device of this process under mpirun: its local rank (as the launcher says) modulo the devices
 * it can see, so that one GPU per process also works when the launcher hides the others. */
static int mpi_local_device(void) {
  const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                        "PMI_LOCAL_RANK"};
  int local = 0, nd = 0;
  for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
    const char *v = getenv(vars[i]);
    if (v && *v) {
      local = atoi(v);
      break;
    }
  }
  apb_error e = {0};
  if (apb_cuda_device_count(&nd, &e) == APB_OK && nd > 0) local %= nd;
  return local < 0 ? 0 : local;
}

/* Every method's plan before any runs, so that a refused one does not come after minutes of the others. */
static int check_plans(const run_cfg *c, const apb_model *m, int64_t n, const apb_comm *hc) {
  apb_plan *plan = malloc(sizeof *plan);
  if (!plan) return cli_fail(CMD, "out of memory");
  int rc = CLI_OK;
  for (int i = 0; !rc && i < c->n_methods; i++) {
    apb_error err = {0};
    apb_run_opts o = cli_method_opts(&c->o, c->methods[i], c->n_methods);
    apb_status st = apb_plan_make(&o, n, c->q_len, &m->cfg, m->scorer_width, plan, &err);
    if (st && hc) /* the plan's advice names --hosts, which the ranks are */
      rc = cli_fail(CMD, "%s on mpirun's %d ranks: %s (%s)", apb_method_name(c->methods[i]), hc->size, err.msg,
                    apb_status_str(st));
    else if (st)
      rc = cli_report(CMD, st, &err);
  }
  free(plan);
  return rc;
}

static int run_sim(const run_cfg *c, const apb_model *m, apb_method meth, const int32_t *doc, int64_t n,
                   const int32_t *query, method_result *mr, dump_list *dl) {
  apb_error err = {0};
  apb_run_opts o = cli_method_opts(&c->o, meth, c->n_methods);
  apb_plan *plan = malloc(sizeof *plan);
  if (!plan) return cli_fail(CMD, "out of memory");
  apb_status st = apb_plan_make(&o, n, c->q_len, &m->cfg, m->scorer_width, plan, &err);
  if (st) {
    free(plan);
    return cli_report(CMD, st, &err);
  }
  int H = plan->H;
  apb_host_result *res = calloc((size_t)H, sizeof *res);
  if (!res) return free(plan), cli_fail(CMD, "out of memory");
  hook_state hs = {dl, !c->quiet && !c->json && isatty(2), m->cfg.n_layers, 0};
  apb_sim_opts so = {.backend = c->backend, .cpu = {.threads = c->threads}, .concurrent = c->concurrent,
                     .hook = (hs.progress || dl) ? hook_fn : NULL, .hook_user = &hs, .want_hidden = c->dump != NULL};
  double t0 = cli_now();
  if (c->gpus)
    st = run_nccl(&so, plan, m, doc, query, res, &err);
  else
    st = apb_sim_execute(plan, m, &so, doc, query, res, NULL, &err);
  double wall = cli_now() - t0;
  if (hs.progress) fprintf(stderr, "\r%40s\r", "");
  int rc = st ? cli_report(CMD, st, &err) : CLI_OK;
  if (!rc && hs.failed) rc = cli_fail(CMD, "out of memory collecting --dump-layers");
  if (!rc) {
    mr->m = meth;
    rc = collect(c, m, plan, res, H, mr, wall);
  }
  for (int r = 0; r < H; r++) apb_host_result_free(&res[r]);
  free(res);
  free(plan);
  return rc;
}

/* Under mpirun: every rank's outcome of a step (its exit code and the message cli_capture kept), gathered
 * to every rank, so that all go on or all stop together (none waits in a collective for a rank that
 * gave up) and rank 0 reports each distinct message once, naming the ranks that gave it (all of them:
 * no rank named). Returns the largest exit code, the same on every rank; why is cleared. */
typedef struct rank_note {
  int32_t rc;
  char msg[508];
} rank_note;

static void rank_says(const apb_comm *hc, const char *msg) {
  fprintf(stderr, "apb " CMD ": rank %d of %d: %s\n", hc->rank, hc->size, msg);
}

/* A failure where the other ranks may be waiting for this one in a collective: say it, naming this
 * rank, and end the job (comm, the run's communicator, first when there is one). CLI_FAIL. */
static int rank_ends_job(apb_comm *hc, apb_comm *comm, apb_status st, const apb_error *err) {
  char line[sizeof err->msg + 32];
  snprintf(line, sizeof line, "%s (%s)", err->msg, apb_status_str(st));
  rank_says(hc, line);
  if (comm) comm->ops->abort(comm, err->msg);
  hc->ops->abort(hc, err->msg);
  return CLI_FAIL;
}

/* Every rank's `bytes` bytes of mine into all [size x bytes], rank by rank. */
static apb_status gather_same_size(apb_comm *hc, const void *mine, size_t bytes, void *all, apb_error *err) {
  size_t *b = malloc(sizeof *b * (size_t)hc->size);
  if (!b) return apb_error_set(err, APB_ENOMEM, "out of memory gathering from %d ranks", hc->size);
  for (int r = 0; r < hc->size; r++) b[r] = bytes;
  apb_status st = hc->ops->allgatherv(hc, mine, all, b, err);
  free(b);
  return st;
}

static int mpi_agree(apb_comm *hc, int rc, char *why) {
  int H = hc->size, worst = 0;
  rank_note mine, *all = malloc(sizeof *all * (size_t)H);
  memset(&mine, 0, sizeof mine);
  mine.rc = rc;
  if (rc) snprintf(mine.msg, sizeof mine.msg, "%s", why[0] ? why : "failed without a message");
  why[0] = 0;
  apb_error err = {0};
  apb_status st = all ? gather_same_size(hc, &mine, sizeof mine, all, &err)
                      : apb_error_set(&err, APB_ENOMEM, "out of memory gathering the ranks' outcomes");
  if (st) { /* the ranks can no longer agree: end the job */
    const size_t k = strlen(err.msg);
    if (rc) snprintf(err.msg + k, sizeof err.msg - k, "; before that: %.400s", mine.msg);
    free(all);
    return rank_ends_job(hc, NULL, st, &err);
  }
  for (int r = 0; r < H; r++) worst = all[r].rc > worst ? all[r].rc : worst;
  for (int r = 0; worst && hc->rank == 0 && r < H; r++) {
    if (!all[r].rc) continue;
    all[r].msg[sizeof all[r].msg - 1] = 0;
    int seen = 0, count = 0;
    for (int q = 0; q < r && !seen; q++) seen = all[q].rc && strcmp(all[q].msg, all[r].msg) == 0;
    if (seen) continue;
    char ranks[256];
    size_t k = 0;
    ranks[0] = 0;
    for (int q = r; q < H; q++)
      if (all[q].rc && strcmp(all[q].msg, all[r].msg) == 0) {
        if (k + 16 < sizeof ranks) k += (size_t)snprintf(ranks + k, sizeof ranks - k, "%s%d", count ? ", " : "", q);
        else if (k + 5 < sizeof ranks && ranks[k - 1] != '.') k += (size_t)snprintf(ranks + k, sizeof ranks - k, ", ...");
        count++;
      }
    if (count == H) fprintf(stderr, "apb " CMD ": %s\n", all[r].msg);
    else fprintf(stderr, "apb " CMD ": rank%s %s of %d: %s\n", count > 1 ? "s" : "", ranks, H, all[r].msg);
  }
  if (worst == CLI_USAGE && hc->rank == 0) fprintf(stderr, "Try 'apb " CMD " --help' for the options and their defaults.\n");
  free(all);
  return worst;
}

/* FNV-1a over 64-bit words (the fingerprints of mpi_same_inputs). */
static uint64_t fp_add(uint64_t h, uint64_t v) { return (h ^ v) * 1099511628211ull; }

static uint64_t fp_floats(uint64_t h, const float *x, size_t n) {
  for (size_t i = 0; x && i < n; i++) {
    uint32_t u;
    memcpy(&u, &x[i], sizeof u);
    h = fp_add(h, u);
  }
  return h;
}

/* Under mpirun every rank parses its own command line, loads its own model and reads its own document;
 * ranks that differ there would compute one run out of different inputs, unnoticed, or wait on each
 * other in collectives whose sizes disagree. Each rank compares fingerprints of the three with rank 0's
 * (the model: its sizes and a sample of its weights; the options: those that change the result). */
static int mpi_same_inputs(apb_comm *hc, const run_cfg *c, const apb_model *m, const int32_t *doc,
                           const int32_t *query, int64_t n) {
  const apb_run_opts *o = &c->o;
  const apb_model_config *mc = &m->cfg;
  uint64_t mine[3] = {1469598103934665603ull, 1469598103934665603ull, 1469598103934665603ull};
  const char *be = c->backend ? c->backend : "fast";
  for (const char *p = be; *p; p++) mine[0] = fp_add(mine[0], (unsigned char)*p);
  const int64_t opt[] = {c->n_methods, o->hosts, o->anchor, o->passing, o->query_offset, o->embed_query,
                         (int64_t)o->scorer, o->pool, (int64_t)o->seed, o->max_new_tokens, o->ffn_chunk,
                         o->balance, o->overlap, c->dump != NULL, c->q_len};
  for (size_t i = 0; i < sizeof opt / sizeof *opt; i++) mine[0] = fp_add(mine[0], (uint64_t)opt[i]);
  for (int i = 0; i < c->n_methods; i++) mine[0] = fp_add(mine[0], (uint64_t)c->methods[i]);
  const int64_t sizes[] = {mc->n_layers, mc->hidden, mc->ffn, mc->n_heads, mc->n_kv_heads, mc->head_dim, mc->vocab,
                           m->scorer_width, mc->tie_embeddings};
  for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) mine[1] = fp_add(mine[1], (uint64_t)sizes[i]);
  const size_t E = (size_t)mc->hidden, V = (size_t)mc->vocab, k = 4096;
  mine[1] = fp_floats(mine[1], m->embed, V * E < k ? V * E : k);
  mine[1] = fp_floats(mine[1], m->final_norm, E);
  for (int l = 0; l < mc->n_layers; l++) mine[1] = fp_floats(mine[1], m->layers[l].wqkv, k < E ? k : E);
  mine[2] = fp_add(fp_add(mine[2], (uint64_t)n), (uint64_t)c->q_len);
  for (int64_t i = 0; i < n; i++) mine[2] = fp_add(mine[2], (uint32_t)doc[i]);
  for (int64_t i = 0; i < c->q_len; i++) mine[2] = fp_add(mine[2], (uint32_t)query[i]);
  uint64_t *all = malloc(sizeof mine * (size_t)hc->size);
  apb_error err = {0};
  apb_status st = all ? gather_same_size(hc, mine, sizeof mine, all, &err)
                      : apb_error_set(&err, APB_ENOMEM, "out of memory comparing the ranks' inputs");
  int rc = CLI_OK;
  if (st) {
    rc = rank_ends_job(hc, NULL, st, &err);
  } else if (all[0] != mine[0]) {
    rc = cli_fail(CMD, "its options differ from rank 0's; give every rank the same command line");
  } else if (all[1] != mine[1]) {
    rc = cli_fail(CMD, "its model differs from rank 0's; give every rank the same --model directory, or --preset, "
                       "--seed and sizes");
  } else if (all[2] != mine[2]) {
    rc = cli_fail(CMD, "its document or query differs from rank 0's; give every rank the same --tokens file (or "
                       "--synthetic and --seed)");
  }
  free(all);
  return rc;
}

/* One process per host: every rank runs its host; every rank gathers hidden states, logits, stats (rank 0
 * prints them). hc: MPI's host-memory collectives (also beside NCCL). Returns the same code on every rank,
 * or ends the job (MPI_Abort) when a rank fails where the others may be waiting for it in a collective. */
static int run_mpi(const run_cfg *c, const apb_model *m, apb_method meth, const int32_t *doc, int64_t n,
                   const int32_t *query, method_result *mr, apb_comm *hc, char *why) {
  apb_error err = {0};
  apb_backend *be = NULL;
  apb_comm *comm = NULL;
  apb_bmodel *bm = NULL;
  apb_plan *plan = malloc(sizeof *plan);
  apb_host_result res = {0};
  size_t *b = NULL;
  double *figs = NULL;
  float *hid = NULL;
  int64_t *pos = NULL;
  int rc = CLI_OK;
  int cuda = c->backend && strncmp(c->backend, "cuda", 4) == 0;
  apb_status st = apb_backend_create(c->backend ? c->backend : "fast", cuda ? mpi_local_device() : 0,
                                     &(apb_cpu_opts){.threads = c->threads}, &be, &err);
  if (cuda) { /* every rank with its device before any joins NCCL */
    if (st) rc = cli_report(CMD, st, &err);
    if ((rc = mpi_agree(hc, rc, why))) goto done;
  }
  if (cuda && (st = apb_comm_nccl_mpi(be, &comm, &err))) {
    rc = rank_ends_job(hc, NULL, st, &err); /* the others may be inside apb_comm_nccl_mpi's collectives */
    goto done;
  }
  if (!st && !cuda) st = apb_comm_mpi(be, &comm, &err);
  apb_run_opts o = cli_method_opts(&c->o, meth, c->n_methods);
  o.hosts = meth == APB_METHOD_DENSE ? 1 : hc->size; /* cmd_run refused dense on several ranks */
  if (!st && !plan) st = apb_error_set(&err, APB_ENOMEM, "out of memory");
  if (!st) st = apb_plan_make(&o, n, c->q_len, &m->cfg, m->scorer_width, plan, &err);
  if (!st) st = apb_bmodel_create(be, m, &bm, &err);
  if (st) rc = cli_report(CMD, st, &err);
  if ((rc = mpi_agree(hc, rc, why))) goto done;
  apb_host_args a = {.plan = plan, .bm = bm, .be = be, .comm = comm, .doc = doc, .query = query,
                     .want_hidden = c->dump != NULL};
  double t0 = cli_now();
  st = apb_host_run(&a, &res, &err);
  if (!st) st = apb_nccl_sync(comm, &err); /* NCCL: every collective complete and sound */
  if (st) { /* the others may wait for this rank in a collective: end the job */
    rc = rank_ends_job(hc, comm, st, &err);
    goto done;
  }
  /* gather per-host figures and hidden rows to every rank (small next to the run) */
  int H = hc->size, E = m->cfg.hidden;
  b = calloc((size_t)H, sizeof *b);
  figs = calloc((size_t)H * 5, sizeof *figs);
  hid = c->dump ? malloc(sizeof(float) * (size_t)n * (size_t)E) : NULL;
  pos = c->dump ? malloc(sizeof(int64_t) * (size_t)n) : NULL;
  if (!b || !figs || (c->dump && (!hid || !pos))) rc = cli_fail(CMD, "out of memory gathering the hosts' results");
  if ((rc = mpi_agree(hc, rc, why))) goto done;
  double mine[5] = {res.stats.prefill_s, res.stats.prefill_s + res.stats.query_s + res.stats.decode_s,
                    res.stats.attn_flops, (double)res.stats.bytes_sent, res.stats.prefill_s - res.stats.prefill_wait_s};
  st = gather_same_size(hc, mine, sizeof mine, figs, &err);
  if (!st && c->dump) {
    for (int r = 0; r < H; r++) b[r] = (size_t)apb_plan_rows(plan, r) * sizeof(int64_t);
    st = hc->ops->allgatherv(hc, res.row_pos, pos, b, &err);
    for (int r = 0; r < H; r++) b[r] = b[r] / sizeof(int64_t) * (size_t)E * sizeof(float);
    if (!st) st = hc->ops->allgatherv(hc, res.hidden, hid, b, &err);
  }
  if (st) {
    rc = rank_ends_job(hc, NULL, st, &err);
    goto done;
  }
  mr->m = meth;
  mr->H = H;
  mr->wall_s = cli_now() - t0;
  for (int r = 0; r < H; r++) {
    const double *f = &figs[5 * r];
    if (f[0] > mr->prefill_s) mr->prefill_s = f[0];
    if (f[1] > mr->max_host_s) mr->max_host_s = f[1];
    mr->attn_sum += f[2];
    if (f[2] > mr->attn_max) mr->attn_max = f[2];
    mr->bytes += (int64_t)f[3];
    if (f[4] > mr->compute_s) mr->compute_s = f[4];
  }
  mr->logits = malloc(sizeof(float) * (size_t)m->cfg.vocab);
  mr->n_gen = res.n_generated;
  mr->gen = malloc(sizeof(int32_t) * (size_t)(res.n_generated ? res.n_generated : 1));
  if (!mr->logits || !mr->gen) {
    rc = cli_fail(CMD, "out of memory");
  } else {
    memcpy(mr->logits, res.logits, sizeof(float) * (size_t)m->cfg.vocab);
    if (res.n_generated) memcpy(mr->gen, res.generated, sizeof(int32_t) * (size_t)res.n_generated);
  }
  if (!rc && c->dump) {
    mr->n_hidden_rows = n;
    mr->hidden = malloc(sizeof(float) * (size_t)n * (size_t)E);
    if (!mr->hidden) rc = cli_fail(CMD, "out of memory");
    for (int64_t i = 0; !rc && i < n; i++)
      memcpy(mr->hidden + (size_t)pos[i] * (size_t)E, hid + (size_t)i * (size_t)E, sizeof(float) * (size_t)E);
  }
  rc = mpi_agree(hc, rc, why);
done:
  free(b), free(figs), free(hid), free(pos);
  apb_host_result_free(&res);
  if (bm) apb_bmodel_destroy(be, bm);
  if (comm) apb_comm_destroy(comm);
  if (be) apb_backend_destroy(be);
  free(plan);
  return rc;
}

/* ---------------------------------------------------------------- report */

static double rel_err(const float *a, const float *ref, int n) {
  double num = 0, den = 0;
  for (int i = 0; i < n; i++) {
    double d = (double)a[i] - (double)ref[i];
    num += d * d, den += (double)ref[i] * (double)ref[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double top1_agree(const method_result *a, const method_result *ref) {
  int64_t n = a->n_gen < ref->n_gen ? a->n_gen : ref->n_gen, same = 0;
  if (n == 0) return 1.0;
  for (int64_t i = 0; i < n; i++) same += a->gen[i] == ref->gen[i];
  return (double)same / (double)n;
}

/* serialized: simulated hosts taking turns (run_sim without --concurrent or --gpus) */
static void print_table(const run_cfg *c, const apb_model *m, int64_t n, const method_result *mr, int nm,
                        int serialized) {
  const method_result *ref = NULL;
  for (int i = 0; i < nm; i++)
    if (mr[i].m == APB_METHOD_DENSE) ref = &mr[i];
  int V = m->cfg.vocab;
  if (c->json) {
    printf("{\"document_tokens\": %lld, \"query_tokens\": %lld, \"layers\": %d, \"hidden\": %d, ",
           (long long)n, (long long)c->q_len, m->cfg.n_layers, m->cfg.hidden);
    cli_json_model(stdout, &m->cfg, m->scorer_width);
    printf(", \"methods\": [");
    for (int i = 0; i < nm; i++) {
      printf("%s{\"method\": \"%s\", \"hosts\": %d, \"wall_s\": %.6f, \"prefill_s\": %.6f, "
             "\"prefill_compute_s\": %.6f, \"slowest_host_s\": %.6f, \"attn_flops_max\": %.6g, "
             "\"attn_flops_sum\": %.6g, \"bytes\": %lld",
             i ? ", " : "", apb_method_name(mr[i].m), mr[i].H, mr[i].wall_s, mr[i].prefill_s, mr[i].compute_s,
             mr[i].max_host_s, mr[i].attn_max, mr[i].attn_sum, (long long)mr[i].bytes);
      if (ref) printf(", \"logits_rel_err\": %.6g, \"top1_agreement\": %.4f", rel_err(mr[i].logits, ref->logits, V),
                      top1_agree(&mr[i], ref));
      printf(", \"generated\": [");
      for (int64_t t = 0; t < mr[i].n_gen; t++) printf("%s%d", t ? ", " : "", mr[i].gen[t]);
      printf("]}");
    }
    printf("]}\n");
    return;
  }
  printf("apb run: %lld-token document + %lld-token query, %d layers, hidden %d, heads %d/%d x %d, ffn %d, vocab "
         "%d, backend %s\n\n",
         (long long)n, (long long)c->q_len, m->cfg.n_layers, m->cfg.hidden, m->cfg.n_heads, m->cfg.n_kv_heads,
         m->cfg.head_dim, m->cfg.ffn, m->cfg.vocab, c->backend ? c->backend : "fast");
  printf("%-8s %5s %9s %9s %9s %12s %12s %12s %14s %9s\n", "method", "hosts", "wall s", "prefill s", "compute s",
         "attn GF max", "attn GF sum", "comm MiB", "logits relerr", "top-1");
  for (int i = 0; i < nm; i++) {
    printf("%-8s %5d %9.3f %9.3f %9.3f %12.3f %12.3f %12.3f", apb_method_name(mr[i].m), mr[i].H, mr[i].wall_s,
           mr[i].prefill_s, mr[i].compute_s, mr[i].attn_max / 1e9, mr[i].attn_sum / 1e9,
           (double)mr[i].bytes / 1048576.0);
    if (ref)
      printf(" %14.3e %8.0f%%\n", rel_err(mr[i].logits, ref->logits, V), 100.0 * top1_agree(&mr[i], ref));
    else
      printf(" %14s %9s\n", "-", "-");
  }
  printf("\nprefill s: the slowest host's prefill, start to end. compute s: the largest prefill less the time\n"
         "its host was blocked in collectives%s\n",
         serialized ? "; the simulated hosts take turns, so a host waiting at an\n"
                      "all-gather also waits for the others' compute, and compute s is what one machine per host\n"
                      "would take, communication aside."
                    : ".");
  if (!ref) printf("\n(no dense run among the methods: nothing to compare against)\n");
  else printf("logits relerr: relative Frobenius error of the last query token's logits against dense;\n"
              "top-1: greedy tokens equal to dense's over %lld generated tokens.\n", (long long)ref->n_gen);
}

static int write_dump(const run_cfg *c, const apb_model *m, const method_result *mr, dump_list *dl) {
  int64_t shV[1] = {m->cfg.vocab}, shG[1] = {mr->n_gen}, shH[2] = {mr->n_hidden_rows, m->cfg.hidden};
  if (dump_add(dl, "logits", APB_DT_F32, 1, shV, mr->logits, sizeof(float) * (size_t)m->cfg.vocab) ||
      dump_add(dl, "generated", APB_DT_I32, 1, shG, mr->gen, sizeof(int32_t) * (size_t)mr->n_gen) ||
      (mr->hidden && dump_add(dl, "hidden", APB_DT_F32, 2, shH, mr->hidden,
                              sizeof(float) * (size_t)mr->n_hidden_rows * (size_t)m->cfg.hidden)))
    return cli_fail(CMD, "out of memory preparing --dump");
  const char *keys[] = {"method", "hosts"};
  char hosts[16];
  snprintf(hosts, sizeof hosts, "%d", mr->H);
  const char *vals[] = {apb_method_name(mr->m), hosts};
  apb_error err = {0};
  apb_status st = apb_st_write(c->dump, dl->n, dl->e, 2, keys, vals, &err);
  return st ? cli_report(CMD, st, &err) : CLI_OK;
}

/* ---------------------------------------------------------------- options */

#define RUN_HELPED (-1) /* run_prepare: --help was given */

/* The options, the model, the document and the query, and every method's plan (before any runs, so that
 * a refused one does not come after minutes of the others): *cp, *mp, *docp, *queryp and *np, which the
 * caller frees whatever the outcome. hc: under mpirun, MPI's collectives, whose ranks are the hosts. */
static int run_prepare(int argc, char **argv, const apb_comm *hc, run_cfg *cp, apb_model **mp, int32_t **docp,
                       int32_t **queryp, int64_t *np) {
  run_cfg c;
  memset(&c, 0, sizeof c);
  apb_run_opts_default(&c.o);
  c.o.hosts = 4;
  c.o.max_new_tokens = 8;
  c.preset = APB_PRESET_TINY;
  c.seed = 1;
  c.synthetic = 16384;
  c.q_len = 16;
  c.methods[0] = APB_METHOD_DENSE, c.methods[1] = APB_METHOD_RING, c.methods[2] = APB_METHOD_STAR,
  c.methods[3] = APB_METHOD_APB, c.n_methods = 4;
  enum { O_MODEL = 256, O_HEADS, O_PRESET, O_SEED, O_TOKENS, O_SYN, O_QLEN, O_METHOD, O_HOSTS, O_ANCHOR, O_PASSING,
         O_QOFF, O_EMBED, O_SCORER, O_POOL, O_NEW, O_FFNC, O_OVERLAP, O_BALANCE, O_BACKEND, O_THREADS, O_CONC, O_DUMP, O_DUMPL, O_JSON,
         O_QUIET, O_GPUS, O_SHAPE };
  static const struct option opts[] = {
      {"model", required_argument, 0, O_MODEL}, {"heads", required_argument, 0, O_HEADS},
      {"preset", required_argument, 0, O_PRESET}, {"seed", required_argument, 0, O_SEED},
      {"tokens", required_argument, 0, O_TOKENS}, {"synthetic", required_argument, 0, O_SYN},
      {"query-len", required_argument, 0, O_QLEN}, {"method", required_argument, 0, O_METHOD},
      {"hosts", required_argument, 0, O_HOSTS}, {"anchor", required_argument, 0, O_ANCHOR},
      {"passing", required_argument, 0, O_PASSING}, {"query-offset", required_argument, 0, O_QOFF},
      {"embed-query", required_argument, 0, O_EMBED}, {"scorer", required_argument, 0, O_SCORER},
      {"pool", required_argument, 0, O_POOL}, {"max-new-tokens", required_argument, 0, O_NEW},
      {"ffn-chunk", required_argument, 0, O_FFNC}, {"overlap", required_argument, 0, O_OVERLAP},
      {"balance", no_argument, 0, O_BALANCE}, {"backend", required_argument, 0, O_BACKEND},
      {"threads", required_argument, 0, O_THREADS}, {"concurrent", no_argument, 0, O_CONC},
      {"dump", required_argument, 0, O_DUMP}, {"dump-layers", no_argument, 0, O_DUMPL},
      {"json", no_argument, 0, O_JSON}, {"quiet", no_argument, 0, O_QUIET}, {"gpus", required_argument, 0, O_GPUS},
      {"help", no_argument, 0, 'h'}, CLI_SHAPE_OPTIONS(O_SHAPE),
      {0, 0, 0, 0}};
  const int64_t BIG = (int64_t)1 << 40;
  int ch, preset_given = 0, syn_given = 0, methods_given = 0;
  cli_shape shape = {0};
  while ((ch = cli_getopt(CMD, argc, argv, opts)) != -1) {
    int rc = 0;
    int64_t v = 0;
    switch (ch) {
    case O_MODEL: c.model_dir = optarg; break;
    case O_HEADS: c.heads = optarg; break;
    case O_PRESET:
      if (apb_preset_parse(optarg, &c.preset))
        return cli_usage(CMD, "--preset: unknown preset '%s' (tiny, small, llama3-8b-shape)", optarg);
      preset_given = 1;
      break;
    case O_SEED: rc = cli_parse_i64(CMD, "--seed", optarg, 0, INT64_MAX, &v), c.seed = (uint64_t)v; break;
    case O_TOKENS: c.tokens_path = optarg; break;
    case O_SYN: rc = cli_parse_i64(CMD, "--synthetic", optarg, 1, BIG, &c.synthetic), syn_given = 1; break;
    case O_QLEN: rc = cli_parse_i64(CMD, "--query-len", optarg, 1, 1 << 20, &c.q_len); break;
    case O_METHOD: rc = cli_parse_methods(CMD, "--method", optarg, c.methods, &c.n_methods), methods_given = 1; break;
    case O_HOSTS: rc = cli_parse_int(CMD, "--hosts", optarg, 1, APB_MAX_HOSTS, &c.o.hosts), c.hosts_given = 1; break;
    case O_ANCHOR: rc = cli_parse_i64(CMD, "--anchor", optarg, 0, BIG, &c.o.anchor); break;
    case O_PASSING: rc = cli_parse_i64(CMD, "--passing", optarg, 0, BIG, &c.o.passing); break;
    case O_QOFF: rc = cli_parse_i64(CMD, "--query-offset", optarg, 0, BIG, &c.o.query_offset); break;
    case O_EMBED: rc = cli_parse_int(CMD, "--embed-query", optarg, 0, 1, &c.o.embed_query); break;
    case O_SCORER:
      if (apb_scorer_parse(optarg, &c.o.scorer))
        return cli_usage(CMD, "--scorer: unknown scorer '%s' (retaining, random, uniform)", optarg);
      break;
    case O_POOL: rc = cli_parse_int(CMD, "--pool", optarg, 1, 1 << 20, &c.o.pool); break;
    case O_NEW: rc = cli_parse_i64(CMD, "--max-new-tokens", optarg, 0, 1 << 20, &c.o.max_new_tokens); break;
    case O_FFNC: rc = cli_parse_i64(CMD, "--ffn-chunk", optarg, 1, BIG, &c.o.ffn_chunk); break;
    case O_OVERLAP: rc = cli_parse_int(CMD, "--overlap", optarg, 0, 2, &c.o.overlap); break;
    case O_BALANCE: c.o.balance = 1; break;
    case O_BACKEND: c.backend = optarg; break;
    case O_THREADS: rc = cli_parse_int(CMD, "--threads", optarg, 1, 4096, &c.threads); break;
    case O_CONC: c.concurrent = 1; break;
    case O_DUMP: c.dump = optarg; break;
    case O_DUMPL: c.dump_layers = 1; break;
    case O_JSON: c.json = 1; break;
    case O_QUIET: c.quiet = 1; break;
    case O_GPUS: rc = cli_parse_int(CMD, "--gpus", optarg, 1, APB_MAX_HOSTS, &c.gpus); break;
    case 'h':
      if (!hc || hc->rank == 0) help();
      return RUN_HELPED;
    default:
      if (ch >= O_SHAPE && ch < O_SHAPE + CLI_SHAPE_COUNT) {
        rc = cli_parse_shape(CMD, ch - O_SHAPE, optarg, &shape);
        break;
      }
      return CLI_USAGE;
    }
    if (rc) return rc;
  }
  if (optind < argc) return cli_usage(CMD, "unexpected argument '%s'", argv[optind]);
  if (c.model_dir && preset_given) return cli_usage(CMD, "--model and --preset are exclusive; give one");
  if (c.heads && !c.model_dir) return cli_usage(CMD, "--heads goes with --model (presets carry their own heads)");
  if (c.model_dir && shape.any)
    return cli_usage(CMD, "the size options (--layers ... --scorer-width) change a generated preset; a --model "
                          "directory has its own config.json and retaining heads");
  if (c.tokens_path && syn_given) return cli_usage(CMD, "--tokens and --synthetic are exclusive; give one");
  if (c.dump && !*c.dump) return cli_usage(CMD, "--dump wants a file name, got ''");
  if (c.dump_layers && !c.dump) return cli_usage(CMD, "--dump-layers needs --dump FILE");
  if (c.dump_layers && hc)
    return cli_usage(CMD, "--dump-layers keeps every host's layers in one process: run without mpirun (the "
                          "simulated hosts compute bitwise what the ranks do), or drop --dump-layers");
  if (c.dump && c.n_methods != 1) return cli_usage(CMD, "--dump writes one run: give exactly one --method");
  if (c.gpus) {
    if (!c.backend) c.backend = "cuda-bf16";
    if (strncmp(c.backend, "cuda", 4) != 0)
      return cli_usage(CMD, "--gpus runs on the CUDA backend: --backend cuda-bf16 or cuda-f32, not '%s'", c.backend);
    if (c.hosts_given && c.o.hosts != c.gpus)
      return cli_usage(CMD, "--hosts %d with --gpus %d: each host is one GPU", c.o.hosts, c.gpus);
    if (c.concurrent) return cli_usage(CMD, "--concurrent is for simulated hosts; --gpus hosts always run at once");
    if (hc)
      return cli_usage(CMD, "--gpus is for one process; under mpirun each rank is one GPU (drop --gpus and give "
                            "--backend cuda-bf16 or cuda-f32)");
    c.o.hosts = c.gpus;
    setenv("NCCL_NVLS_ENABLE", "0", 0); /* NVLink multicast stays off on shared machines (docs/nccl.md) */
  }
  if (hc && c.hosts_given && c.o.hosts != hc->size)
    return cli_usage(CMD, "--hosts %d but mpirun started %d ranks, and each rank is one host: drop --hosts or give "
                          "mpirun -np %d", c.o.hosts, hc->size, c.o.hosts);
  if (hc) c.o.hosts = hc->size;
  for (int i = 0; hc && hc->size > 1 && i < c.n_methods; i++)
    if (c.methods[i] == APB_METHOD_DENSE)
      return cli_usage(CMD, "dense runs on one host and mpirun started %d ranks: give --method without dense%s, "
                            "or run dense without mpirun (or with -np 1)",
                       hc->size, methods_given ? "" : " (the default list dense,ring,star,apb has it)");
  cli_set_threads(c.threads);

  apb_error err = {0};
  apb_model *m = NULL;
  apb_status st;
  static char heads_in_dir[4096]; /* --model DIR without --heads: DIR's own retaining heads, as gen-model writes them */
  if (c.model_dir && !c.heads) {
    int k = snprintf(heads_in_dir, sizeof heads_in_dir, "%s/%s", c.model_dir, APB_HEADS_FILE);
    if (k > 0 && (size_t)k < sizeof heads_in_dir && access(heads_in_dir, F_OK) == 0) c.heads = heads_in_dir;
  }
  if (c.model_dir)
    st = apb_model_load(c.model_dir, c.heads, &m, &err);
  else { /* the preset, with the sizes the options changed */
    apb_model_config mc;
    int I = 0, rc2;
    char changed[256]; /* unused: the table's header line and --json print the model's sizes */
    apb_preset_config(c.preset, &mc, &I);
    const int on_cuda = c.backend && strncmp(c.backend, "cuda", 4) == 0;
    if ((rc2 = cli_apply_shape(CMD, &shape, on_cuda ? CLI_SHAPE_CUDA : 0, &mc, &I, changed, sizeof changed)))
      return rc2;
    st = apb_model_generate_config(&mc, I, c.seed, &m, &err);
  }
  if (st) return cli_report(CMD, st, &err);
  int32_t *doc = NULL, *query = NULL;
  int64_t n = 0;
  int rc = CLI_OK;
  if (c.tokens_path) {
    int64_t *ids = NULL, total = 0;
    rc = read_tokens(c.tokens_path, &ids, &total);
    if (!rc && total <= c.q_len)
      rc = cli_fail(CMD, "%s holds %lld tokens; with --query-len %lld the document would be empty", c.tokens_path,
                    (long long)total, (long long)c.q_len);
    if (!rc) {
      n = total - c.q_len;
      doc = malloc(sizeof(int32_t) * (size_t)n);
      query = malloc(sizeof(int32_t) * (size_t)c.q_len);
      if (!doc || !query) rc = cli_fail(CMD, "out of memory");
      for (int64_t i = 0; !rc && i < total; i++) {
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab) {
          rc = cli_fail(CMD, "%s: token %lld is %lld, outside the model's vocabulary [0, %d)", c.tokens_path,
                        (long long)i, (long long)ids[i], m->cfg.vocab);
          break;
        }
        if (i < n) doc[i] = (int32_t)ids[i];
        else query[i - n] = (int32_t)ids[i];
      }
    }
    free(ids);
  } else {
    n = c.synthetic;
  }
  *mp = m, *cp = c, *np = n;
  if (hc && c.backend && strncmp(c.backend, "cuda", 4) == 0) setenv("NCCL_NVLS_ENABLE", "0", 0);
  /* what apb_host_run would refuse, before a synthetic document of that length is made */
  if (!rc && n + c.q_len + c.o.max_new_tokens > (int64_t)INT32_MAX + 1)
    rc = cli_fail(CMD, "%lld document + %lld query + %lld new tokens: positions are int32, at most 2^31 tokens in "
                  "all; give a shorter document (--synthetic, --tokens), --query-len or --max-new-tokens",
                  (long long)n, (long long)c.q_len, (long long)c.o.max_new_tokens);
  if (!rc) rc = check_plans(&c, m, n, hc);
  if (!rc && !c.tokens_path) {
    doc = synthetic_doc(n, c.q_len, m->cfg.vocab, c.seed, &query);
    if (!doc) rc = cli_fail(CMD, "out of memory for a %lld-token document", (long long)n);
  }
  *docp = doc, *queryp = query;
  return rc;
}

int cmd_run(int argc, char **argv) {
  run_cfg c;
  memset(&c, 0, sizeof c);
  apb_model *m = NULL;
  int32_t *doc = NULL, *query = NULL;
  int64_t n = 0;
  apb_comm *hc = NULL; /* under mpirun: MPI's collectives; every message goes through mpi_agree */
  char why[512] = "";
  if (apb_mpi_detect()) {
    apb_error err = {0};
    apb_status st = apb_comm_mpi(NULL, &hc, &err);
    if (st) return cli_report(CMD, st, &err);
    cli_capture(why, sizeof why);
  }
  int rc = run_prepare(argc, argv, hc, &c, &m, &doc, &query, &n);
  if (hc) {
    int helped = rc == RUN_HELPED;
    rc = mpi_agree(hc, helped ? CLI_OK : rc, why);
    if (!rc && helped) rc = RUN_HELPED;
    if (!rc) rc = mpi_agree(hc, mpi_same_inputs(hc, &c, m, doc, query, n), why);
  }
  method_result mr[MAX_METHODS];
  memset(mr, 0, sizeof mr);
  dump_list dl = {0};
  int done = 0;
  for (int i = 0; !rc && i < c.n_methods; i++) {
    if (hc)
      rc = run_mpi(&c, m, c.methods[i], doc, n, query, &mr[i], hc, why);
    else
      rc = run_sim(&c, m, c.methods[i], doc, n, query, &mr[i], c.dump_layers ? &dl : NULL);
    done = i + 1;
  }
  const int ran = !rc; /* the same on every rank */
  if (ran && (!hc || hc->rank == 0)) {
    print_table(&c, m, n, mr, done, !hc && !c.gpus && !c.concurrent);
    fflush(stdout);
    if (c.dump) rc = write_dump(&c, m, &mr[0], &dl);
  }
  if (hc && ran) rc = mpi_agree(hc, rc, why); /* rank 0's table or dump */
  for (int i = 0; i < done; i++) result_free(&mr[i]);
  dump_free(&dl);
  free(doc), free(query);
  apb_model_free(m);
  if (hc) {
    cli_capture(NULL, 0);
    apb_comm_destroy(hc);
    apb_mpi_finalize();
  }
  return rc == RUN_HELPED ? CLI_OK : rc;
}
