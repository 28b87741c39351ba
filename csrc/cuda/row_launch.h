// Launchers of the row skeleton (kernels/row_reduce.cuh), shared by the row ops' CUDA files (kd_loss,
// uncertainty, topk_kd_loss): the grid and block of each RowMode, the split mode's workspace and merge,
// and the backward's tile / warp-per-row choice. Every launch is checked (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launch_utils.h"
#include "row_reduce.cuh"

namespace augkd::cuda {

// The forward of a row op in layout `lay` (choose_fwd_layout). kSplit allocates the partial states of
// every (row, part) on `like`'s device, then one thread per row merges them in order.
template <typename V>
void launch_row_reduce(const typename V::Params& p, const FwdLayout& lay, const at::Tensor& like,
                       cudaStream_t stream) {
  using State = typename V::State;
  switch (lay.mode) {
    case RowMode::kWarp: {
      const auto blocks = static_cast<unsigned>(std::min(ceil_div(p.rows, kRowWarps), kMaxGridX));
      row_reduce_kernel<V, RowMode::kWarp><<<blocks, dim3(kWarp, kRowWarps), 0, stream>>>(p, p.cols, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case RowMode::kBlock: {
      const auto blocks = static_cast<unsigned>(std::min(p.rows, kMaxGridX));
      row_reduce_kernel<V, RowMode::kBlock><<<blocks, lay.threads, 0, stream>>>(p, p.cols, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    case RowMode::kSplit: {
      const auto bytes = static_cast<int64_t>(p.rows * lay.parts * sizeof(State));
      at::Tensor ws = at::empty({bytes}, like.options().dtype(at::kByte));
      State* ws_ptr = reinterpret_cast<State*>(ws.mutable_data_ptr());
      const dim3 grid(static_cast<unsigned>(lay.parts), static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
      row_reduce_kernel<V, RowMode::kSplit><<<grid, lay.threads, 0, stream>>>(p, lay.part_cols, ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto blocks = static_cast<unsigned>(std::min(ceil_div(p.rows, 128), kMaxGridX));
      row_merge_kernel<V><<<blocks, 128, 0, stream>>>(p, lay.parts, ws_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
  }
}

// Columns per block of the backward's tile mode: about 4 vectors per thread.
template <typename T>
constexpr int64_t bwd_tile_cols() {
  return static_cast<int64_t>(kTileThreads) * kVec<T> * 4;
}

// The backward sweep of a row op: a 2-D grid of (column tile, row) blocks when `tile` (long rows), else
// one warp per row. Sets p.tile.
template <typename V>
void launch_row_sweep(typename V::Params p, bool tile, cudaStream_t stream) {
  if (tile) {
    p.tile = bwd_tile_cols<typename V::T>();
    const dim3 grid(static_cast<unsigned>(ceil_div(p.cols, p.tile)),
                    static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
    row_sweep_kernel<V, true><<<grid, kTileThreads, 0, stream>>>(p);
  } else {
    p.tile = p.cols;
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(p.rows, kRowWarps), kMaxGridX));
    row_sweep_kernel<V, false><<<blocks, dim3(kWarp, kRowWarps), 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace augkd::cuda
