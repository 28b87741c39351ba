// Registration of an op family's kernels, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) files: every
// family has a forward and a backward op (augkd::<family>_fwd / _bwd, schemas in csrc/schemas.cpp) and each
// backend implements them as augkd::<ns>::<family>_fwd_<ns> / _bwd_<ns>.
#pragma once

#include <torch/library.h>

// Inside TORCH_LIBRARY_IMPL(augkd, KEY, m): registers `family`'s forward and backward of namespace `ns`.
#define AUGKD_IMPL_FWD_BWD(m, family, ns)                   \
  m.impl(#family "_fwd", &augkd::ns::family##_fwd_##ns); \
  m.impl(#family "_bwd", &augkd::ns::family##_bwd_##ns)
