// One skeleton for the row kernels (kd_loss and its refine sweep, uncertainty, topk_kd_loss): a forward
// row reduction in three layouts (RowMode: a warp, a block or a split of blocks per row) with the split
// mode's merge, and a backward sweep over rows or (column tile, row) blocks. An op supplies only its
// per-row work as a row visitor V, which the skeleton reads through these members:
//
//   base RowVisitor<T, Params, State, kUnroll, INPUTS> (load_store.cuh), over one input row x or two rows
//     x, y of the same width: the loads (Regs, load, x_row: its alignment sets the vector head) and the
//     types: T the storage type; Params the kernel argument, with `int64_t rows, cols` (and `tile` for a
//     backward op); State a row's partial state (reduce.cuh: identity / empty / for_each_sum ...), void
//     for a backward op; kUnroll the vectors per thread in flight.
//   static V make(const Params&, int64_t row);    the row's visitor (a forward one with `st` = identity)
//   template <typename R> void apply(int64_t j, const R& r);   elements [j, j + R::kN): forward, the
//     per-element update of `st`; backward, compute and store the gradient
//   forward only:
//   static void finish(const Params&, int64_t row, const State&);   merged row -> outputs (one thread)
//   optional: struct Aux + static Aux row_aux(const Params&, int64_t row): per-row inputs of finish,
//     read by rank 0 before the sweep so their loads overlap it (finish then takes a const Aux& last);
//     static bool skip(const Params&, int64_t row): rows the kernel leaves alone.
//
// The per-thread pieces (row_sweep_thread, row_merge_parts, row_finish) are __host__ __device__ so that
// tests/cuda_emulation runs every op through them on the host; the kernels add only the group layout
// (RowGroup) and the warp / block reductions. Launchers: csrc/cuda/row_launch.h.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

template <typename V>
concept RowHasAux = requires(const typename V::Params& p) { V::row_aux(p, int64_t{0}); };

// The optional members of a forward visitor, with their defaults.
struct NoAux {};
template <typename V>
AUGKD_HD auto row_aux(const typename V::Params& p, int64_t row) {
  if constexpr (RowHasAux<V>) {
    return V::row_aux(p, row);
  } else {
    return NoAux{};
  }
}
template <typename V>
AUGKD_HD bool row_skip(const typename V::Params& p, int64_t row) {
  if constexpr (requires { V::skip(p, row); }) {
    return V::skip(p, row);
  } else {
    return false;
  }
}
template <typename V, typename Aux>
AUGKD_HD void row_finish(const typename V::Params& p, int64_t row, const typename V::State& st, const Aux& aux) {
  if constexpr (RowHasAux<V>) {
    V::finish(p, row, st, aux);
  } else {
    V::finish(p, row, st);
  }
}

// One thread's share of columns [begin, end) of a row, as its visitor left it (its state, for a forward op).
template <typename V>
AUGKD_HD V row_sweep_thread(const typename V::Params& p, int64_t row, int64_t begin, int64_t end, int rank,
                            int size) {
  V v = V::make(p, row);
  sweep_range<kVec<typename V::T>, V::kUnroll>(v.x_row, begin, end, rank, size, v);
  return v;
}

// Split mode: the `parts` partial states of a row, ws[row * parts + k], folded in order (deterministic).
template <typename V>
AUGKD_HD typename V::State row_merge_parts(int64_t row, int64_t parts, const typename V::State* ws) {
  typename V::State st = ws[row * parts];
  for (int64_t k = 1; k < parts; ++k) merge_state(st, ws[row * parts + k]);
  return st;
}

// Forward: a group of threads per row (RowMode), its states merged by warp shuffles, then through shared
// memory; rank 0 writes the row (kWarp, kBlock) or its part's partial state to ws (kSplit).
template <typename V, RowMode MODE>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
    row_reduce_kernel(const typename V::Params p, int64_t part_cols, typename V::State* ws) {
  using State = typename V::State;
  __shared__ State smem[MODE == RowMode::kWarp ? 1 : kWarp];
  const RowGroup<MODE> grp(part_cols);
  for (int64_t row = grp.row0; row < p.rows; row += grp.stride) {
    if (row_skip<V>(p, row)) continue;  // the same for the whole group
    decltype(row_aux<V>(p, row)) aux{};
    if (MODE != RowMode::kSplit && grp.rank == 0) aux = row_aux<V>(p, row);
    const State part = row_sweep_thread<V>(p, row, grp.begin, grp.end(p.cols), grp.rank, grp.size).st;
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
        row_finish<V>(p, row, st, aux);
      }
    }
  }
}

// Split mode, second step: one thread per row folds the row's partial states and writes the row.
template <typename V>
__global__ void row_merge_kernel(const typename V::Params p, int64_t parts, const typename V::State* __restrict__ ws) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    row_finish<V>(p, row, row_merge_parts<V>(row, parts, ws), row_aux<V>(p, row));
  }
}

// Backward: TILE = true: blockIdx.x is a tile of p.tile columns, blockIdx.y (looping by gridDim.y) a row;
// the block's threads share the tile (many blocks per row: long rows with few rows still fill the GPU).
// TILE = false: one warp per row, blockDim = (32, kRowWarps), rows loop by gridDim.x * kRowWarps.
template <typename V, bool TILE>
__global__ void __launch_bounds__(kTileThreads, 1) row_sweep_kernel(const typename V::Params p) {
  const int rank = threadIdx.x;
  const int size = TILE ? blockDim.x : kWarp;
  const int64_t row0 = TILE ? blockIdx.y : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t stride = TILE ? gridDim.y : static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t begin = TILE ? static_cast<int64_t>(blockIdx.x) * p.tile : 0;
  const int64_t end = TILE ? min(p.cols, begin + p.tile) : p.cols;
  for (int64_t row = row0; row < p.rows; row += stride) row_sweep_thread<V>(p, row, begin, end, rank, size);
}

}  // namespace augkd::cuda
