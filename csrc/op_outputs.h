// Outputs the CPU (csrc/cpu) and CUDA (csrc/cuda) launchers allocate alike. Header only, no backend headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "op_checks.h"

namespace augkd {

// Per-row outputs and stats of `shape` on like's device, in the row dtype (fp32; fp64 for fp64 input).
inline at::Tensor row_output(const at::Tensor& like, c10::IntArrayRef shape) {
  return at::empty(shape, like.options().dtype(checks::row_dtype(like.scalar_type())));
}

// A gradient output the caller did not ask for: not computed, an empty (0,) tensor in its place.
inline at::Tensor unused_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace augkd
