// Small host-side helpers shared by the CUDA launchers (csrc/cuda/*.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "load_store.cuh"  // PairRows
#include "op_checks.h"     // checks::data_or_null
#include "reduce.cuh"      // RowMode

namespace augkd::cuda {

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // gridDim.y limit (the kernels loop over the rest)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

inline bool aligned16(const at::Tensor& x) {
  return (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15u) == 0;
}

// The kernels read and write 16-byte vectors and need every tensor of a launch to start on a 16-byte
// boundary (then two rows of the same width share their misalignment in every tensor). Fresh
// allocations are aligned; a view with a storage offset is copied (rare: the front-end passes
// contiguous tensors, usually whole allocations).
inline at::Tensor aligned_input(const at::Tensor& x) {
  return aligned16(x) ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Layout of a forward row kernel (kernels/row_reduce.cuh), see RowMode:
//   C <= kWarpRowMaxCols                 one warp per row;
//   fewer rows than 2 x the SM count     each row split into parts of >= kMinSplitCols columns, so
//   (and `split`)                        that about 2 blocks per SM run (partial states + merge);
//   otherwise                            one block per row.
// Block sizes give each thread about 4 vectors of the row (or part): 128 .. kMaxRowThreads threads.
constexpr int64_t kWarpRowMaxCols = 1024;
constexpr int64_t kMinSplitCols = 8192;

struct FwdLayout {
  RowMode mode;
  int threads;        // per block (kBlock, kSplit)
  int64_t parts;      // kSplit: parts per row
  int64_t part_cols;  // kSplit: columns per part (a multiple of the vector width)
};

inline FwdLayout choose_fwd_layout(int64_t rows, int64_t cols, int64_t vec, int64_t sm_count, bool split = true) {
  if (cols <= kWarpRowMaxCols) return {RowMode::kWarp, kWarp * kRowWarps, 1, cols};
  int64_t parts = 1;
  if (split && rows < 2 * sm_count) parts = std::min(ceil_div(2 * sm_count, rows), cols / kMinSplitCols);
  int64_t part_cols = cols;
  if (parts > 1) {
    part_cols = ceil_div(ceil_div(cols, parts), vec) * vec;
    parts = ceil_div(cols, part_cols);
  }
  const int64_t want = next_pow2(ceil_div(part_cols, vec * 4));
  const int threads = static_cast<int>(std::clamp<int64_t>(want, 128, kMaxRowThreads));
  return {parts > 1 ? RowMode::kSplit : RowMode::kBlock, threads, std::max<int64_t>(parts, 1), part_cols};
}

// The inputs of a two-row op's kernel argument (kd_loss, kd_divergence): s and t (aligned_input) and the
// optional labels.
template <typename T>
void set_pair_rows(PairRows<T>& p, const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& target,
                   int64_t ignore_index) {
  p.student = s.const_data_ptr<T>();
  p.teacher = t.const_data_ptr<T>();
  p.target = checks::data_or_null<int64_t>(target);
  p.rows = s.size(0);
  p.cols = s.size(1);
  p.ignore_index = ignore_index;
}

inline const at::Tensor& check_cuda(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernels, got ", x.device());
  return x;
}

// What a launcher sets up once its arguments are checked: x (the argument `name` of `op`) is a CUDA
// tensor, its device is current while the scope lives, and the kernels go to that device's current stream.
struct CudaScope {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  CudaScope(const char* op, const char* name, const at::Tensor& x)
      : guard(check_cuda(op, name, x).device()), stream(at::cuda::getCurrentCUDAStream()) {}
};

}  // namespace augkd::cuda
