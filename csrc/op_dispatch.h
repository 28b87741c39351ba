// The dispatch of every launcher, CPU (csrc/cpu) and CUDA (csrc/cuda), from runtime values to template
// arguments: the dtype (the ops take float, double, half and bfloat16 and compute in
// A = at::opmath_type<scalar_t>: float, and double for double; the kernels' acc_t / acc_type are the same
// types) and flags (with_bool).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace augkd {

// Calls f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template argument
// (`decltype(flag)::value` inside f).
template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace augkd

// Runs the statements `...` once, for x's dtype, with scalar_t (the storage type) and A (the compute type)
// defined. `name` names the launcher in the error for an unsupported dtype.
#define AUGKD_DISPATCH_FLOATING(x, name, ...)                                               \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, [&] { \
    using A [[maybe_unused]] = at::opmath_type<scalar_t>;                                  \
    __VA_ARGS__                                                                            \
  })
