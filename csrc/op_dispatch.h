// The dtype dispatch of every launcher, CPU (csrc/cpu) and CUDA (csrc/cuda): the ops take float, double,
// half and bfloat16 and compute in A = at::opmath_type<scalar_t> (float, and double for double; the
// kernels' acc_t / acc_type are the same types).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

// Runs the statements `...` once, for x's dtype, with scalar_t (the storage type) and A (the compute type)
// defined. `name` names the launcher in the error for an unsupported dtype.
#define AUGKD_DISPATCH_FLOATING(x, name, ...)                                               \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, [&] { \
    using A [[maybe_unused]] = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__                                                                            \
  })
