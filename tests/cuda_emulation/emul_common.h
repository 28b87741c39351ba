// Host-side helpers shared by the CUDA emulation programs (emul_rows.cu, emul_mixup.cu, emul_topk.cu).
#pragma once

#include <cstdint>

#include "load_store.cuh"  // augkd::cuda::acc_type

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A double as the storage type T, rounded through float as the kernels' callers would store it.
template <typename T>
T from_double(double x) {
  return static_cast<T>(static_cast<float>(x));
}
template <>
inline double from_double<double>(double x) {
  return x;
}

template <typename T>
double to_double(T x) {
  return static_cast<double>(static_cast<augkd::cuda::acc_type<T>>(x));
}
