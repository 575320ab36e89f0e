/* PLACEHOLDER: replaced by its owner before the first commit */
#include "apb/apb.h"
typedef int apb_placeholder_attn_naive;
