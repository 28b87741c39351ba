// Math helpers, the online-softmax rescaling primitives, and warp / block reductions of partial states.
//
// Online softmax (docs/ops-design.md, section 1 "One pass with online softmax"): a partial sum
// d = sum_j exp(x_j - m) is measured from its running maximum m. Moving it to a larger maximum M
// multiplies it by r = exp(m - M); while m is still -inf (every x seen so far was -inf, or the part
// is empty) the sum is 0 and r must be 0, never exp(-inf - -inf) = NaN. Merging two partial states is
// the same rescaling applied to both sides, then a sum: merge(a, b) = rebase(a, M) + rebase(b, M).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace augkd::cuda {

// Everything that is not a kernel or a shuffle is __host__ __device__, so that a host program can run
// the same per-thread code (sweeps, merges, finalisation) to check the algorithm without a GPU.
#define AUGKD_HD __host__ __device__ __forceinline__

// exp / log of the compute type. We compile with --use_fast_math: for fp32 the device exp is the
// ex2.approx-based __expf (about 2 ulp plus an error growing with |x|; here x is a distance to the
// running maximum or to a logsumexp, so x <= 0 and large |x| only occurs for terms that are
// negligible next to exp(0) = 1), which is well inside the tolerance of these losses; log is __logf
// (lg2.approx). fp64 uses the full-precision exp / log (fast math does not touch double). The host
// versions (emulation only) are std::exp / std::log.
#ifdef __CUDA_ARCH__
#define AUGKD_DEVICE_OR_HOST(device_fn, host_fn) device_fn
#else
#define AUGKD_DEVICE_OR_HOST(device_fn, host_fn) host_fn
#endif
AUGKD_HD float exp_(float x) { return AUGKD_DEVICE_OR_HOST(__expf, std::exp)(x); }
AUGKD_HD double exp_(double x) { return std::exp(x); }
AUGKD_HD float log_(float x) { return AUGKD_DEVICE_OR_HOST(__logf, std::log)(x); }
AUGKD_HD double log_(double x) { return std::log(x); }
AUGKD_HD float abs_(float x) { return std::fabs(x); }
AUGKD_HD double abs_(double x) { return std::fabs(x); }
// expm1 / log1p at full precision (fast math maps no intrinsic onto them); used where a small difference
// must not cancel (docs/ops-design.md, "Precision").
AUGKD_HD float expm1_(float x) { return ::expm1f(x); }
AUGKD_HD double expm1_(double x) { return ::expm1(x); }
AUGKD_HD float log1p_(float x) { return ::log1pf(x); }
AUGKD_HD double log1p_(double x) { return ::log1p(x); }
// max that ignores a NaN operand (fmax): NaN never becomes a running maximum; a NaN input still
// reaches the sums through exp(NaN - m) = NaN, so the row stays NaN.
AUGKD_HD float max_(float a, float b) { return std::fmax(a, b); }
AUGKD_HD double max_(double a, double b) { return std::fmax(a, b); }
// Correctly rounded division (the fast-math '/' is approximate); used once per row.
AUGKD_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
AUGKD_HD double div_rn(double a, double b) { return a / b; }

template <typename A>
AUGKD_HD A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}
template <typename A>
AUGKD_HD A quiet_nan() {
  return std::numeric_limits<A>::quiet_NaN();
}

// r = exp(m_old - m_new) to move a partial sum from max m_old to max m_new >= m_old;
// 1 when the maximum did not move (also -inf -> -inf), 0 when m_old == -inf < m_new.
template <typename A>
AUGKD_HD A rescale(A m_old, A m_new) {
  if (m_old == m_new) return A(1);
  return m_old == neg_inf<A>() ? A(0) : exp_(m_old - m_new);
}

// dm = m_new - m_old, 0 when the maximum did not move (so -inf -> -inf gives 0, not NaN).
template <typename A>
AUGKD_HD A shift(A m_old, A m_new) {
  return m_old == m_new ? A(0) : m_new - m_old;
}

// The shift used for a running maximum m inside exp((x - shift) / T): m itself, or 0 while m is still -inf
// (so no -inf - -inf appears; the -inf entries give exp(-inf) = 0 either way).
template <typename A>
AUGKD_HD A center_(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}

// ---------------------------------------------------------------------------------------------------------
// Reductions of a partial state. A state type S provides:
//   static S identity();                 the empty state
//   S empty() const;                     the empty state with this state's parameters (e.g. 1 / T)
//   static void for_each_sum(S& a, const S& b, F&& f);   f(a.x, b.x) for each sum x of the state
// and an online state (sums measured from running maxima) also:
//   static void for_each_max(S& a, const S& b, F&& f);   f(a.m, b.m) for each running maximum m
//   void rebase(const S& top);           re-measure the sums from top's maxima (each >= this state's)
// The fields those list are the ones merged and exchanged between lanes; any other field is a parameter
// (e.g. 1 / T), the same in every lane.
// ---------------------------------------------------------------------------------------------------------

template <typename S>
concept OnlineState = requires(S& a, const S& top) { a.rebase(top); };

// f(a.x, b.x) for every field x of the state: the maxima (online states), then the sums.
template <typename S, typename F>
AUGKD_HD void for_each_field(S& a, const S& b, F&& f) {
  if constexpr (OnlineState<S>) S::for_each_max(a, b, f);
  S::for_each_sum(a, b, f);
}

// a <- merge(a, o), commutative bitwise. Sums add; an online state is first re-measured on both sides
// from the larger of each maximum (the top of this file): merge(a, o) = rebase(a, M) + rebase(o, M).
template <typename S>
AUGKD_HD void merge_state(S& a, const S& o) {
  if constexpr (OnlineState<S>) {
    S top = a;
    S::for_each_max(top, o, [](auto& x, auto y) { x = max_(x, y); });
    S b = o;
    b.rebase(top);
    a.rebase(top);
    S::for_each_sum(a, b, [](auto& x, auto y) { x += y; });
  } else {
    S::for_each_sum(a, o, [](auto& x, auto y) { x += y; });
  }
}

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRowWarps = 8;          // rows per block in the warp-per-row layout of the row kernels
constexpr int kMaxRowThreads = 512;   // largest block of a forward row kernel (__launch_bounds__: at most
                                      // 128 registers per thread, so a block always fits an SM)
constexpr int kTileThreads = 256;     // block of the backward (column tile, row) kernels

// The state of lane (lane ^ lane_mask): each of its fields shuffled (for_each_field), the parameters kept.
template <typename S>
__device__ __forceinline__ S shfl_xor_state(const S& s, int lane_mask) {
  S o = s;
  for_each_field(o, s, [lane_mask](auto& x, auto y) { x = __shfl_xor_sync(kFullMask, y, lane_mask); });
  return o;
}

// Butterfly over a full warp: every lane ends with the merge of all 32 lanes (the lanes may differ in
// the last bit where the compiler contracts a*b + c into an fma with the operands swapped, so callers
// read lane 0). The order of the merges is fixed, so the result is deterministic run to run.
template <typename S>
__device__ __forceinline__ S warp_reduce(S s) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) merge_state(s, shfl_xor_state(s, off));
  return s;
}

// Block-wide reduction (blockDim.x a multiple of 32, <= 1024; blockDim.y == 1). The result is valid in
// warp 0 (all of its lanes). `smem` holds 32 states; the leading __syncthreads makes it safe to call
// in a loop (the previous call's readers are done before this call's writers start).
template <typename S>
__device__ __forceinline__ S block_reduce(S s, S* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  s = warp_reduce(s);
  __syncthreads();
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < nwarps ? smem[lane] : s.empty();
    s = warp_reduce(s);
  }
  return s;
}

// Row layouts of the forward row kernels (kd_loss and uncertainty):
enum class RowMode : int {
  kWarp,   // one warp per row, blockDim = (32, kRowWarps); rows loop by gridDim.x * kRowWarps
  kBlock,  // one block per row (blockDim.x a multiple of 32); rows loop by gridDim.x
  kSplit,  // blockIdx.x = a part of `part_cols` columns of a row, blockIdx.y = the row (looping by
           // gridDim.y); each block writes its partial state to ws[row * gridDim.x + part], and a
           // merge kernel folds the parts of a row in order. For a few long rows.
};

// Threads of a group and the rows / columns one group works on.
template <RowMode MODE>
struct RowGroup {
  int rank, size;
  int64_t row0, stride, begin, part_cols;
  __device__ __forceinline__ explicit RowGroup(int64_t part_cols_) {
    rank = threadIdx.x;
    size = MODE == RowMode::kWarp ? kWarp : blockDim.x;
    part_cols = part_cols_;
    if constexpr (MODE == RowMode::kWarp) {
      row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
      stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
      begin = 0;
    } else if constexpr (MODE == RowMode::kBlock) {
      row0 = blockIdx.x;
      stride = gridDim.x;
      begin = 0;
    } else {
      row0 = blockIdx.y;
      stride = gridDim.y;
      begin = static_cast<int64_t>(blockIdx.x) * part_cols;
    }
  }
  __device__ __forceinline__ int64_t end(int64_t cols) const {
    return MODE == RowMode::kSplit ? min(cols, begin + part_cols) : cols;
  }
};

// Plain sums (mixup reductions).
template <typename A>
struct SumState {
  A v;
  AUGKD_HD static SumState identity() { return {A(0)}; }
  AUGKD_HD SumState empty() const { return identity(); }
  template <typename F>
  AUGKD_HD static void for_each_sum(SumState& a, const SumState& b, F&& f) {
    f(a.v, b.v);
  }
};

}  // namespace augkd::cuda
