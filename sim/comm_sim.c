/* sim/comm_sim.c: H hosts simulated as threads of one process (apb/sim.h, apb/comm.h).
 *
 * Every collective runs the same three steps on every rank: publish what this rank offers and wants
 * (a slot), a barrier, copy from the peers' published buffers into this rank's own buffers through its
 * own backend (host memcpy or a device copy), then a second barrier so that nobody reuses a buffer a
 * peer may still read. Before publishing, a rank syncs its backend so its send data is complete.
 * All ranks must call the same collectives in the same order; a rank that calls a different one, or
 * passes sizes that disagree with its peer's, gets APB_ECOMM naming both sides (checked after the
 * first barrier). Byte counts are logical: what the collective delivers to other ranks, whatever the
 * algorithm (allgather: own contribution x (H-1) sent), bytes copied to oneself are not counted.
 *
 * Serialized mode: the group's mutex is the run lock. A host holds it from apb_sim_host_begin to
 * apb_sim_host_end and releases it only inside pthread_cond_wait at a barrier, so one host computes
 * at a time. Concurrent mode takes the mutex only around barriers. Tested in tests/check_comm.c.
 */
#include "apb/sim.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct slot {
  apb_coll kind;
  int64_t seq;              /* collective sequence number on this rank */
  const void *send;
  void *recv;
  const size_t *bytes;      /* allgatherv: [H]; alltoallv: send sizes [H] */
  const size_t *rbytes;     /* alltoallv: receive sizes [H] */
  size_t sbytes, rbytes1;   /* sendrecv, bcast */
  int dst, src, root;
} slot;

struct apb_sim_group {
  int H;
  int serialized;
  double timeout_s;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived;
  uint64_t gen;
  int aborted;
  char why[256];
  slot *slots;              /* [H] */
  apb_backend **bes;        /* [H] */
  int live;                 /* comms not yet destroyed */
};

typedef struct sim_comm {
  apb_sim_group *g;
  int64_t seq;
} sim_comm;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void lock_if_concurrent(apb_sim_group *g) {
  if (!g->serialized) pthread_mutex_lock(&g->mu);
}
static void unlock_if_concurrent(apb_sim_group *g) {
  if (!g->serialized) pthread_mutex_unlock(&g->mu);
}

/* With g->mu held. */
static apb_status barrier_locked(apb_comm *c, apb_error *err) {
  sim_comm *sc = c->impl;
  apb_sim_group *g = sc->g;
  double t0 = now_s();
  apb_status st = APB_OK;
  if (g->aborted) {
    st = apb_error_set(err, APB_ECOMM, "host %d: the simulated group was aborted: %s", c->rank, g->why);
    goto out;
  }
  uint64_t gen = g->gen;
  if (++g->arrived == g->H) {
    g->arrived = 0;
    g->gen++;
    pthread_cond_broadcast(&g->cv);
  } else {
    while (gen == g->gen && !g->aborted) {
      if (g->timeout_s > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double waited = now_s() - t0, left = g->timeout_s - waited;
        if (left <= 0) {
          snprintf(g->why, sizeof g->why, "host %d waited %.1f s in a collective: a peer died or diverged",
                   c->rank, waited);
          g->aborted = 1;
          pthread_cond_broadcast(&g->cv);
          st = apb_error_set(err, APB_ETIMEOUT, "%s", g->why);
          goto out;
        }
        double step = left < 0.5 ? left : 0.5;
        ts.tv_sec += (time_t)step;
        ts.tv_nsec += (long)((step - (double)(time_t)step) * 1e9);
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&g->cv, &g->mu, &ts);
      } else {
        pthread_cond_wait(&g->cv, &g->mu);
      }
    }
    if (gen == g->gen && g->aborted)
      st = apb_error_set(err, APB_ECOMM, "host %d: the simulated group was aborted: %s", c->rank, g->why);
  }
out:
  c->stats.wait_s += now_s() - t0;
  return st;
}

static apb_status sync_be(apb_comm *c, apb_error *err) {
  apb_backend *be = ((sim_comm *)c->impl)->g->bes[c->rank];
  return be->ops->sync(be, err);
}

static apb_status copy_be(apb_comm *c, void *dst, const void *src, size_t n, apb_error *err) {
  if (n == 0 || dst == src) return APB_OK;
  apb_backend *be = ((sim_comm *)c->impl)->g->bes[c->rank];
  return be->ops->copy(be, dst, src, n, err);
}

/* Publish s, sync, first barrier, check that every rank is in the same collective. g->mu held. */
static apb_status begin(apb_comm *c, slot *s, apb_error *err) {
  sim_comm *sc = c->impl;
  apb_sim_group *g = sc->g;
  s->seq = sc->seq++;
  g->slots[c->rank] = *s;
  apb_status st = barrier_locked(c, err);
  if (st) return st;
  for (int r = 0; r < g->H; r++)
    if (g->slots[r].kind != s->kind || g->slots[r].seq != s->seq)
      return apb_error_set(err, APB_ECOMM,
                           "host %d is in %s #%lld while host %d is in %s #%lld: the hosts diverged", c->rank,
                           apb_coll_name(s->kind), (long long)s->seq, r, apb_coll_name(g->slots[r].kind),
                           (long long)g->slots[r].seq);
  return APB_OK;
}

/* Sync own copies, second barrier. */
static apb_status finish(apb_comm *c, apb_status st, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  if (st == APB_OK) st = sync_be(c, err);
  if (st != APB_OK && g->aborted) return st;
  if (st != APB_OK) {
    int k = snprintf(g->why, sizeof g->why, "host %d failed inside a collective: ", c->rank);
    const char *m = err ? err->msg : apb_status_str(st);
    if (k > 0 && (size_t)k < sizeof g->why) {
      size_t room = sizeof g->why - (size_t)k - 1, ml = strlen(m);
      memcpy(g->why + k, m, ml < room ? ml : room);
      g->why[(size_t)k + (ml < room ? ml : room)] = 0;
    }
    g->aborted = 1;
    pthread_cond_broadcast(&g->cv);
    return st;
  }
  apb_status st2 = barrier_locked(c, err);
  return st ? st : st2;
}

static apb_status sim_allgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  apb_status st = sync_be(c, err);
  if (st) return st;
  lock_if_concurrent(g);
  slot s = {.kind = APB_COLL_ALLGATHER, .send = send, .recv = recv, .bytes = bytes};
  st = begin(c, &s, err);
  size_t off = 0;
  for (int r = 0; st == APB_OK && r < g->H; r++) {
    if (g->slots[r].bytes[r] != bytes[r])
      st = apb_error_set(err, APB_ECOMM, "allgather: host %d contributes %zu bytes but host %d expects %zu",
                         r, g->slots[r].bytes[r], c->rank, bytes[r]);
    else
      st = copy_be(c, (char *)recv + off, g->slots[r].send, bytes[r], err);
    if (r != c->rank) c->stats.bytes_recv[APB_COLL_ALLGATHER] += (int64_t)bytes[r];
    off += bytes[r];
  }
  c->stats.calls[APB_COLL_ALLGATHER]++;
  c->stats.bytes_sent[APB_COLL_ALLGATHER] += (int64_t)bytes[c->rank] * (g->H - 1);
  st = finish(c, st, err);
  unlock_if_concurrent(g);
  return st;
}

static apb_status sim_iallgatherv(apb_comm *c, const void *send, void *recv, const size_t *bytes,
                                  apb_comm_req **req, apb_error *err) {
  *req = NULL; /* completes here: the simulator has nothing to overlap with */
  return sim_allgatherv(c, send, recv, bytes, err);
}

static apb_status sim_sendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                               int src, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  if (dst >= g->H || src >= g->H || dst < -1 || src < -1) /* -1: no peer */
    return apb_error_set(err, APB_EINVAL, "sendrecv: host %d names peer %d/%d of %d hosts (-1: none)", c->rank, dst,
                         src, g->H);
  apb_status st = sync_be(c, err);
  if (st) return st;
  lock_if_concurrent(g);
  slot s = {.kind = APB_COLL_SENDRECV, .send = send, .recv = recv, .sbytes = sbytes, .rbytes1 = rbytes,
            .dst = dst, .src = src};
  st = begin(c, &s, err);
  if (st == APB_OK && src >= 0) {
    const slot *p = &g->slots[src];
    if (p->dst != c->rank || p->sbytes != rbytes)
      st = apb_error_set(err, APB_ECOMM,
                         "sendrecv: host %d expects %zu bytes from host %d, which sends %zu bytes to host %d",
                         c->rank, rbytes, src, p->sbytes, p->dst);
    else
      st = copy_be(c, recv, p->send, rbytes, err);
    if (src != c->rank) c->stats.bytes_recv[APB_COLL_SENDRECV] += (int64_t)rbytes;
  }
  if (dst >= 0 && dst != c->rank) c->stats.bytes_sent[APB_COLL_SENDRECV] += (int64_t)sbytes;
  c->stats.calls[APB_COLL_SENDRECV]++;
  st = finish(c, st, err);
  unlock_if_concurrent(g);
  return st;
}

static apb_status sim_isendrecv(apb_comm *c, const void *send, size_t sbytes, int dst, void *recv, size_t rbytes,
                                int src, apb_comm_req **req, apb_error *err) {
  *req = NULL;
  return sim_sendrecv(c, send, sbytes, dst, recv, rbytes, src, err);
}

static apb_status sim_alltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                const size_t *rbytes, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  apb_status st = sync_be(c, err);
  if (st) return st;
  lock_if_concurrent(g);
  slot s = {.kind = APB_COLL_ALLTOALL, .send = send, .recv = recv, .bytes = sbytes, .rbytes = rbytes};
  st = begin(c, &s, err);
  size_t roff = 0;
  for (int r = 0; st == APB_OK && r < g->H; r++) {
    const slot *p = &g->slots[r];
    size_t soff = 0;
    for (int d = 0; d < c->rank; d++) soff += p->bytes[d];
    if (p->bytes[c->rank] != rbytes[r])
      st = apb_error_set(err, APB_ECOMM, "alltoall: host %d sends %zu bytes to host %d, which expects %zu",
                         r, p->bytes[c->rank], c->rank, rbytes[r]);
    else
      st = copy_be(c, (char *)recv + roff, (const char *)p->send + soff, rbytes[r], err);
    if (r != c->rank) {
      c->stats.bytes_recv[APB_COLL_ALLTOALL] += (int64_t)rbytes[r];
      c->stats.bytes_sent[APB_COLL_ALLTOALL] += (int64_t)sbytes[r];
    }
    roff += rbytes[r];
  }
  c->stats.calls[APB_COLL_ALLTOALL]++;
  st = finish(c, st, err);
  unlock_if_concurrent(g);
  return st;
}

static apb_status sim_ialltoallv(apb_comm *c, const void *send, const size_t *sbytes, void *recv,
                                 const size_t *rbytes, apb_comm_req **req, apb_error *err) {
  *req = NULL;
  return sim_alltoallv(c, send, sbytes, recv, rbytes, err);
}

static apb_status sim_bcast(apb_comm *c, void *buf, size_t bytes, int root, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  if (root < 0 || root >= g->H)
    return apb_error_set(err, APB_EINVAL, "bcast: root %d is not a host of %d", root, g->H);
  apb_status st = sync_be(c, err);
  if (st) return st;
  lock_if_concurrent(g);
  slot s = {.kind = APB_COLL_BCAST, .send = buf, .recv = buf, .sbytes = bytes, .root = root};
  st = begin(c, &s, err);
  if (st == APB_OK) {
    const slot *p = &g->slots[root];
    if (p->sbytes != bytes || p->root != root)
      st = apb_error_set(err, APB_ECOMM, "bcast: host %d expects %zu bytes from root %d; root sends %zu (root %d)",
                         c->rank, bytes, root, p->sbytes, p->root);
    else if (c->rank != root) {
      st = copy_be(c, buf, p->send, bytes, err);
      c->stats.bytes_recv[APB_COLL_BCAST] += (int64_t)bytes;
    } else {
      c->stats.bytes_sent[APB_COLL_BCAST] += (int64_t)bytes * (g->H - 1);
    }
  }
  c->stats.calls[APB_COLL_BCAST]++;
  st = finish(c, st, err);
  unlock_if_concurrent(g);
  return st;
}

static apb_status sim_barrier(apb_comm *c, apb_error *err) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  apb_status st = sync_be(c, err);
  if (st) return st;
  lock_if_concurrent(g);
  slot s = {.kind = APB_COLL_BARRIER};
  st = begin(c, &s, err);
  c->stats.calls[APB_COLL_BARRIER]++;
  st = finish(c, st, err);
  unlock_if_concurrent(g);
  return st;
}

static apb_status sim_wait(apb_comm *c, apb_comm_req *req, apb_error *err) {
  (void)c, (void)req, (void)err;
  return APB_OK;
}

static void sim_destroy(apb_comm *c) {
  sim_comm *sc = c->impl;
  if (sc) {
    apb_sim_group *g = sc->g;
    g->live--;
    free(sc);
  }
  free(c);
}

static const apb_comm_ops sim_ops = {
    .destroy = sim_destroy,
    .allgatherv = sim_allgatherv,
    .iallgatherv = sim_iallgatherv,
    .sendrecv = sim_sendrecv,
    .isendrecv = sim_isendrecv,
    .alltoallv = sim_alltoallv,
    .ialltoallv = sim_ialltoallv,
    .bcast = sim_bcast,
    .barrier = sim_barrier,
    .wait = sim_wait,
    .abort = apb_sim_abort,
};

apb_status apb_sim_group_create(int H, apb_backend *const *bes, int serialized, double timeout_s,
                                apb_sim_group **out, apb_comm **comms, apb_error *err) {
  *out = NULL;
  if (H < 1 || H > 4096) return apb_error_set(err, APB_EINVAL, "simulated hosts: %d is not in [1, 4096]", H);
  for (int r = 0; r < H; r++)
    if (!bes[r]) return apb_error_set(err, APB_EINVAL, "simulated hosts: host %d has no backend", r);
  apb_sim_group *g = calloc(1, sizeof *g);
  if (!g) return apb_error_set(err, APB_ENOMEM, "simulated hosts: out of memory");
  g->slots = calloc((size_t)H, sizeof *g->slots);
  g->bes = calloc((size_t)H, sizeof *g->bes);
  if (!g->slots || !g->bes) {
    free(g->slots), free(g->bes), free(g);
    return apb_error_set(err, APB_ENOMEM, "simulated hosts: out of memory");
  }
  g->H = H;
  g->serialized = serialized;
  g->timeout_s = timeout_s;
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->cv, NULL);
  for (int r = 0; r < H; r++) g->bes[r] = bes[r];
  for (int r = 0; r < H; r++) {
    apb_comm *c = calloc(1, sizeof *c);
    sim_comm *sc = calloc(1, sizeof *sc);
    if (!c || !sc) {
      free(c), free(sc);
      for (int q = 0; q < r; q++) apb_comm_destroy(comms[q]);
      apb_sim_group_destroy(g);
      return apb_error_set(err, APB_ENOMEM, "simulated hosts: out of memory");
    }
    sc->g = g;
    c->rank = r;
    c->size = H;
    c->name = "sim";
    c->ops = &sim_ops;
    c->impl = sc;
    comms[r] = c;
    g->live++;
  }
  *out = g;
  return APB_OK;
}

void apb_sim_group_destroy(apb_sim_group *g) {
  if (!g) return;
  pthread_mutex_destroy(&g->mu);
  pthread_cond_destroy(&g->cv);
  free(g->slots);
  free(g->bes);
  free(g);
}

void apb_sim_host_begin(apb_comm *c) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  if (g->serialized) pthread_mutex_lock(&g->mu);
}

void apb_sim_host_end(apb_comm *c) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  if (g->serialized) pthread_mutex_unlock(&g->mu);
}

void apb_sim_abort(apb_comm *c, const char *why) {
  apb_sim_group *g = ((sim_comm *)c->impl)->g;
  lock_if_concurrent(g);
  if (!g->aborted) {
    snprintf(g->why, sizeof g->why, "host %d aborted: %s", c->rank, why ? why : "(no reason given)");
    g->aborted = 1;
  }
  pthread_cond_broadcast(&g->cv);
  unlock_if_concurrent(g);
}

typedef struct run_arg {
  apb_comm *c;
  void (*fn)(int, void *);
  void *arg;
} run_arg;

static void *run_thread(void *p) {
  run_arg *ra = p;
  apb_sim_host_begin(ra->c);
  ra->fn(ra->c->rank, ra->arg);
  apb_sim_host_end(ra->c);
  return NULL;
}

apb_status apb_sim_run(int H, apb_comm *const *comms, void (*fn)(int rank, void *arg), void *arg, apb_error *err) {
  pthread_t *th = calloc((size_t)H, sizeof *th);
  run_arg *ra = calloc((size_t)H, sizeof *ra);
  if (!th || !ra) {
    free(th), free(ra);
    return apb_error_set(err, APB_ENOMEM, "simulated hosts: out of memory starting %d threads", H);
  }
  int started = 0;
  apb_status st = APB_OK;
  for (int r = 0; r < H; r++) {
    ra[r] = (run_arg){comms[r], fn, arg};
    int e = pthread_create(&th[r], NULL, run_thread, &ra[r]);
    if (e) {
      st = apb_error_set(err, APB_ENOMEM, "simulated hosts: pthread_create for host %d: %s", r, strerror(e));
      apb_sim_abort(comms[r], "a peer thread could not be started");
      break;
    }
    started++;
  }
  for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
  free(th);
  free(ra);
  return st;
}
