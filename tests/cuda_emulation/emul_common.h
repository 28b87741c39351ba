// Host-side helpers shared by the CUDA emulation programs (emul_rows.cu, emul_mixup.cu, emul_topk.cu,
// emul_divergence.cu): value conversions, the failure counter, and the row skeleton of kernels/row_reduce.cuh
// run on the host (every "thread" of a group in turn, reduced in the butterfly order of warp_reduce / block_reduce).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "load_store.cuh"  // augkd::cuda::acc_type
#include "row_reduce.cuh"

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

// Failures so far (each program prints "failures: N" at the end; tests/test_cuda_emulation.py reads it).
inline int failures = 0;

// got ~ want within tol relative to 1 + |want|; NaN matches NaN, an infinity the same infinity.
inline void check(const char* what, double got, double want, double tol) {
  const bool ok = (std::isnan(got) && std::isnan(want)) || (std::isinf(got) && got == want) ||
                  std::fabs(got - want) <= tol * (1 + std::fabs(want));
  if (!ok) {
    if (failures < 40) std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
    ++failures;
  }
}

inline int report_failures() {
  std::printf("failures: %d\n", failures);
  return failures != 0;
}

// main() of a program whose template <typename T> void run_all(std::mt19937&, const char* dtype) runs
// every case of one storage type: all four storage types from one seed, then the failure count.
#define AUGKD_EMULATION_MAIN(seed)           \
  int main() {                               \
    std::mt19937 rng(seed);                  \
    run_all<double>(rng, "f64");             \
    run_all<float>(rng, "f32");              \
    run_all<c10::Half>(rng, "f16");          \
    run_all<c10::BFloat16>(rng, "bf16");     \
    return report_failures();                \
  }

// The exchange of shfl_xor_state on the host: lane `mine`'s state with every field that for_each_field
// lists taken from lane `theirs` (a field it leaves out keeps this lane's value, as on the device).
template <typename S>
S emu_shfl(const S& mine, const S& theirs) {
  S o = mine;
  augkd::cuda::for_each_field(o, theirs, [](auto& x, auto y) { x = y; });
  return o;
}

// Emulated butterfly over 32 lanes: lane i merges lane i ^ off, all lanes in lock step.
template <typename S>
void emu_warp_reduce(std::vector<S>& lanes) {
  for (int off = 16; off > 0; off >>= 1) {
    std::vector<S> prev = lanes;
    for (int i = 0; i < 32; ++i) augkd::cuda::merge_state(lanes[i], emu_shfl(prev[i], prev[i ^ off]));
  }
}

// Emulated group reduction: size threads (32 = warp mode, else block mode); returns the state of rank 0.
template <typename S>
S emu_group_reduce(std::vector<S> st, int size) {
  const int nw = size / 32;
  std::vector<S> smem(nw);
  for (int w = 0; w < nw; ++w) {
    std::vector<S> lanes(st.begin() + 32 * w, st.begin() + 32 * w + 32);
    emu_warp_reduce(lanes);
    smem[w] = lanes[0];
  }
  if (size == 32) return smem[0];
  std::vector<S> lanes(32, st[0].empty());
  for (int i = 0; i < nw; ++i) lanes[i] = smem[i];
  emu_warp_reduce(lanes);
  return lanes[0];
}

// row_reduce_kernel (+ row_merge_kernel when parts > 1) of a forward row visitor V: `size` threads per
// row or part, each part of ceil(cols / parts) columns.
template <typename V>
void emu_row_reduce(const typename V::Params& p, int size, int64_t parts) {
  using namespace augkd::cuda;
  using S = typename V::State;
  const int64_t part_cols = parts > 1 ? ceil_div(p.cols, parts) : p.cols;
  std::vector<S> ws(p.rows * parts);
  for (int64_t row = 0; row < p.rows; ++row) {
    if (row_skip<V>(p, row)) continue;
    for (int64_t part = 0; part < parts; ++part) {
      const int64_t begin = part * part_cols;
      const int64_t end = std::min(p.cols, begin + part_cols);
      std::vector<S> st(size);
      for (int r = 0; r < size; ++r) st[r] = row_sweep_thread<V>(p, row, begin, end, r, size).st;
      ws[row * parts + part] = emu_group_reduce(st, size);
    }
    row_finish<V>(p, row, row_merge_parts<V>(row, parts, ws.data()), row_aux<V>(p, row));
  }
}

// row_sweep_kernel of a backward row visitor V: every row cut into tiles of p.tile columns, `size` threads each.
template <typename V>
void emu_row_sweep(const typename V::Params& p, int size) {
  using namespace augkd::cuda;
  for (int64_t row = 0; row < p.rows; ++row)
    for (int64_t begin = 0; begin < p.cols; begin += p.tile)
      for (int r = 0; r < size; ++r) row_sweep_thread<V>(p, row, begin, std::min(p.cols, begin + p.tile), r, size);
}
