/* lib/comm.c: what every communicator shares (apb/comm.h): names, destruction, byte totals.
 * The implementations live in sim/comm_sim.c, sim/comm_mpi.c and gpu/comm_nccl.c. */
#include "apb/comm.h"

void apb_comm_destroy(apb_comm *c) {
  if (c && c->ops && c->ops->destroy) c->ops->destroy(c);
}

const char *apb_coll_name(apb_coll k) {
  switch (k) {
  case APB_COLL_ALLGATHER: return "allgather";
  case APB_COLL_SENDRECV: return "sendrecv";
  case APB_COLL_ALLTOALL: return "alltoall";
  case APB_COLL_BCAST: return "bcast";
  case APB_COLL_BARRIER: return "barrier";
  case APB_COLL_COUNT: break;
  }
  return "?";
}

int64_t apb_comm_bytes_sent(const apb_comm *c) {
  int64_t s = 0;
  for (int k = 0; k < APB_COLL_COUNT; k++) s += c->stats.bytes_sent[k];
  return s;
}
