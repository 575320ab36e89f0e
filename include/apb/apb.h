/* apb/apb.h: the whole public API of libapb (arXiv 2502.12085, as defined in docs/ and shared/APB.md).
 * Include this, or the one module header you need. Every exported symbol starts with apb_, every macro
 * and enum value with APB_. */
#ifndef APB_APB_H
#define APB_APB_H

#include "apb/status.h"
#include "apb/dtype.h"
#include "apb/rng.h"
#include "apb/compare.h"
#include "apb/safetensors.h"
#include "apb/attn.h"
#include "apb/cuda.h"
#include "apb/model.h"
#include "apb/backend.h"
#include "apb/comm.h"
#include "apb/sched.h"
#include "apb/sim.h"
#include "apb/cost.h"
#include "apb/nccl.h"

#define APB_VERSION_STRING "0.1.0"

#endif /* APB_APB_H */
