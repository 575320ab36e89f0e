/* sim/run.c: apb_sim_execute, a whole run with H simulated hosts in one process (apb/sim.h).
 *
 * Makes one backend per host and one shared copy of the weights (on host 0's backend; instances of
 * one kind share weights), a simulated group, and H threads that each call apb_host_run. A host that
 * fails aborts the group, so that the others return instead of waiting; the first failing host's
 * message is returned. Tested by tests/check_sched.c.
 */
#include <stdlib.h>
#include <string.h>

#include "apb/sim.h"

typedef struct exec_ctx {
  const apb_plan *plan;
  const apb_sim_opts *o;
  const apb_bmodel *bm;
  apb_backend **bes;
  apb_comm **comms;
  const int32_t *doc, *query;
  apb_host_result *res;
  apb_status *st;
  apb_error *errs;
} exec_ctx;

static void host_main(int rank, void *arg) {
  exec_ctx *x = arg;
  apb_host_args a = {.plan = x->plan, .bm = x->bm, .be = x->bes[rank], .comm = x->comms[rank], .doc = x->doc,
                     .query = x->query, .hook = x->o->hook, .hook_user = x->o->hook_user,
                     .want_hidden = x->o->want_hidden, .profile = x->o->profile};
  x->st[rank] = apb_host_run(&a, &x->res[rank], &x->errs[rank]);
  if (x->st[rank] != APB_OK) apb_sim_abort(x->comms[rank], x->errs[rank].msg);
}

apb_status apb_sim_execute(const apb_plan *plan, const apb_model *m, const apb_sim_opts *o, const int32_t *doc,
                           const int32_t *query, apb_host_result *res, apb_comm_stats *stats, apb_error *err) {
  int H = plan->H;
  apb_status st = APB_OK;
  apb_backend **bes = calloc((size_t)H, sizeof *bes);
  apb_comm **comms = calloc((size_t)H, sizeof *comms);
  apb_status *sts = calloc((size_t)H, sizeof *sts);
  apb_error *errs = calloc((size_t)H, sizeof *errs);
  apb_sim_group *g = NULL;
  apb_bmodel *bm = NULL;
  if (!bes || !comms || !sts || !errs) {
    st = apb_error_set(err, APB_ENOMEM, "simulated run: out of memory for %d hosts", H);
    goto done;
  }
  memset(res, 0, sizeof *res * (size_t)H);
  const char *kind = o->backend ? o->backend : "fast";
  for (int r = 0; r < H && !st; r++) st = apb_backend_create(kind, o->device, &o->cpu, &bes[r], err);
  if (!st) st = apb_bmodel_create(bes[0], m, &bm, err);
  if (!st) st = apb_sim_group_create(H, bes, !o->concurrent, o->timeout_s, &g, comms, err);
  if (st) goto done;
  exec_ctx x = {plan, o, bm, bes, comms, doc, query, res, sts, errs};
  st = apb_sim_run(H, comms, host_main, &x, err);
  for (int r = 0; r < H && !st; r++) /* the first host whose failure was not just the abort of another */
    if (sts[r] != APB_OK && sts[r] != APB_ECOMM && sts[r] != APB_ETIMEOUT)
      st = apb_error_set(err, sts[r], "%s", errs[r].msg);
  for (int r = 0; r < H && !st; r++)
    if (sts[r] != APB_OK) st = apb_error_set(err, sts[r], "%s", errs[r].msg);
  if (stats)
    for (int r = 0; r < H; r++) stats[r] = comms[r]->stats;
done:
  for (int r = 0; comms && r < H; r++)
    if (comms[r]) apb_comm_destroy(comms[r]);
  apb_sim_group_destroy(g);
  if (bm) apb_bmodel_destroy(bes[0], bm);
  for (int r = 0; bes && r < H; r++)
    if (bes[r]) apb_backend_destroy(bes[r]);
  if (st)
    for (int r = 0; r < H; r++) apb_host_result_free(&res[r]);
  free(bes);
  free(comms);
  free(sts);
  free(errs);
  return st;
}
