// One skeleton for the row kernels (kd_loss, its refine sweep, uncertainty, topk_kd_loss): a forward
// row reduction in three layouts plus its split-mode merge, and a backward sweep over rows or
// (column tile, row) blocks. An op supplies only its per-row work, as an "op" struct of static members.
//
// Forward op (row_reduce_kernel, row_merge_kernel; inherit RowOpDefaults for the optional members):
//   using T, Params, State, Visitor;
//     Params: the kernel argument; has `int64_t rows, cols`.
//     State:  the partial state of a row (reduce.cuh: identity / empty / merge / shfl_xor).
//     Visitor: sweep_range's visitor (load_store.cuh) holding its State in a member `st`; its apply()
//              is the per-element state update.
//   static constexpr int kUnroll;                                 vectors per thread in flight
//   static const T* row_ptr(const Params&, int64_t row);          the row whose alignment sets the head
//   static Visitor visitor(const Params&, int64_t row);           the row's visitor, state = identity
//   static void finish(const Params&, int64_t row, const State&, const Aux&);
//                                                                 merged row state -> outputs (one thread)
//   optional: struct Aux; static Aux row_aux(const Params&, int64_t row);
//              per-row inputs of finish, read by rank 0 before the sweep so the loads overlap it
//              (default: none); static bool skip(const Params&, int64_t row): rows left alone (default: none).
// Backward op (row_sweep_kernel): T, Params (rows, cols, tile), kUnroll, row_ptr, visitor; the visitor's
//   apply() computes and stores the gradient of its elements (no state).
//
// The per-thread pieces (row_sweep_thread, row_merge_parts, row_finish) are __host__ __device__ so that
// tests/cuda_emulation runs every op through them on the host; the kernels add only the group layout
// (RowGroup) and the warp / block reductions.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

// The optional members of a forward op.
template <typename Params>
struct RowOpDefaults {
  struct Aux {};
  AUGKD_HD static Aux row_aux(const Params&, int64_t) { return {}; }
  AUGKD_HD static bool skip(const Params&, int64_t) { return false; }
};

// One thread's share of columns [begin, end) of a row, as its visitor left it (its state, for a forward op).
template <typename Op>
AUGKD_HD typename Op::Visitor row_sweep_thread(const typename Op::Params& p, int64_t row, int64_t begin,
                                               int64_t end, int rank, int size) {
  typename Op::Visitor v = Op::visitor(p, row);
  sweep_range<kVec<typename Op::T>, Op::kUnroll>(Op::row_ptr(p, row), begin, end, rank, size, v);
  return v;
}

// Split mode: the `parts` partial states of a row, ws[row * parts + k], folded in order (deterministic).
template <typename Op>
AUGKD_HD typename Op::State row_merge_parts(int64_t row, int64_t parts, const typename Op::State* ws) {
  typename Op::State st = ws[row * parts];
  for (int64_t k = 1; k < parts; ++k) st.merge(ws[row * parts + k]);
  return st;
}

// Forward: a group of threads per row (RowMode), its states merged by warp shuffles, then through shared
// memory; rank 0 writes the row (kWarp, kBlock) or its part's partial state to ws (kSplit).
template <typename Op, RowMode MODE>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
    row_reduce_kernel(const typename Op::Params p, int64_t part_cols, typename Op::State* ws) {
  using State = typename Op::State;
  __shared__ State smem[MODE == RowMode::kWarp ? 1 : kWarp];
  const RowGroup<MODE> grp(part_cols);
  for (int64_t row = grp.row0; row < p.rows; row += grp.stride) {
    if (Op::skip(p, row)) continue;  // the same for the whole group
    typename Op::Aux aux{};
    if (MODE != RowMode::kSplit && grp.rank == 0) aux = Op::row_aux(p, row);
    const State part = row_sweep_thread<Op>(p, row, grp.begin, grp.end(p.cols), grp.rank, grp.size).st;
    State st;
    if constexpr (MODE == RowMode::kWarp) {
      st = warp_reduce(part);
    } else {
      st = block_reduce(part, smem);
    }
    if (grp.rank == 0) {
      if constexpr (MODE == RowMode::kSplit) {
        ws[row * gridDim.x + blockIdx.x] = st;
      } else {
        Op::finish(p, row, st, aux);
      }
    }
  }
}

// Split mode, second step: one thread per row folds the row's partial states and writes the row.
template <typename Op>
__global__ void row_merge_kernel(const typename Op::Params p, int64_t parts,
                                 const typename Op::State* __restrict__ ws) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Op::finish(p, row, row_merge_parts<Op>(row, parts, ws), Op::row_aux(p, row));
  }
}

// Backward: TILE = true: blockIdx.x is a tile of p.tile columns, blockIdx.y (looping by gridDim.y) a row;
// the block's threads share the tile (many blocks per row: long rows with few rows still fill the GPU).
// TILE = false: one warp per row, blockDim = (32, kRowWarps), rows loop by gridDim.x * kRowWarps.
template <typename Op, bool TILE>
__global__ void __launch_bounds__(kTileThreads, 1) row_sweep_kernel(const typename Op::Params p) {
  const int rank = threadIdx.x;
  const int size = TILE ? blockDim.x : kWarp;
  const int64_t row0 = TILE ? blockIdx.y : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t stride = TILE ? gridDim.y : static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t begin = TILE ? static_cast<int64_t>(blockIdx.x) * p.tile : 0;
  const int64_t end = TILE ? min(p.cols, begin + p.tile) : p.cols;
  for (int64_t row = row0; row < p.rows; row += stride) row_sweep_thread<Op>(p, row, begin, end, rank, size);
}

}  // namespace augkd::cuda
