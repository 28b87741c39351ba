// Vectorised loads/stores of fp32 / fp64 / fp16 / bf16 rows, and the head / body / tail split of a
// range of a row into 16-byte-aligned vectors.
//
// Precision policy (docs/ops-design.md, "Conventions"): load in the storage dtype, compute in `acc_t`
// (fp32, fp64 for fp64 input), round once when storing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "reduce.cuh"  // AUGKD_HD

namespace augkd::cuda {

// Compute type of a storage type: fp32, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// Elements of T in one 16-byte vector: 4 fp32, 2 fp64, 8 fp16 / bf16.
template <typename T>
inline constexpr int kVec = static_cast<int>(16 / sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// Loads N consecutive elements starting at p into out[0..N) as acc_t. For N > 1, p must be aligned to
// N * sizeof(T) (one vector load); N == 1 is a plain scalar load.
template <int N, typename T, typename A>
AUGKD_HD void load_n(const T* __restrict__ p, A (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<A>(p[0]);
  } else {
    const AlignedVec<T, N> v = *reinterpret_cast<const AlignedVec<T, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<A>(v.val[k]);
  }
}

// Stores in[0..N) rounded to T at p (same alignment rule as load_n).
template <int N, typename T, typename A>
AUGKD_HD void store_n(T* __restrict__ p, const A (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    AlignedVec<T, N> v;
#pragma unroll
    for (int k = 0; k < N; ++k) v.val[k] = static_cast<T>(in[k]);
    *reinterpret_cast<AlignedVec<T, N>*>(p) = v;
  }
}

// The element loop of a backward visitor's apply: grad(k) is the gradient of element k of the N at j, in the
// compute type; the N are rounded and stored at g_row + j at once.
template <int N, typename T, typename F>
AUGKD_HD void store_grads(T* __restrict__ g_row, int64_t j, F&& grad) {
  acc_type<T> g[N];
#pragma unroll
  for (int k = 0; k < N; ++k) g[k] = grad(k);
  store_n<N>(g_row + j, g);
}

// The same for the gradients of two inputs: grad(k, gs, gt) sets both of element k; a row that is nullptr
// (a gradient not asked for) is not stored.
template <int N, typename T, typename F>
AUGKD_HD void store_grad_pair(T* __restrict__ gs_row, T* __restrict__ gt_row, int64_t j, F&& grad) {
  acc_type<T> gs[N], gt[N];
#pragma unroll
  for (int k = 0; k < N; ++k) grad(k, gs[k], gt[k]);
  if (gs_row != nullptr) store_n<N>(gs_row + j, gs);
  if (gt_row != nullptr) store_n<N>(gt_row + j, gt);
}

// Elements before the first 16-byte boundary at or after p (0 .. kVec<T> - 1). Every tensor that is
// walked together with p must have the same misalignment: the launchers make each base pointer
// 16-byte aligned (the caching allocator does; a sliced view is cloned), so that two rows of the same
// width start at the same offset modulo 16 bytes in every tensor.
template <typename T>
AUGKD_HD int64_t head_elems(const T* p) {
  const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15u);
  return mis == 0 ? 0 : (16 - mis) / static_cast<int64_t>(sizeof(T));
}

// Visits the range [begin, end) of a row with `rank` in [0, size) of a group of threads:
//   head: the few elements before the first 16-byte boundary, one element per thread (N = 1);
//   body: aligned vectors of VEC elements, U vectors per thread in flight at a time;
//   tail: the elements after the last full vector (N = 1).
// `ref` is the row start of one of the tensors walked (all share its alignment, see head_elems).
// The visitor F provides, for N in {1, VEC}:
//   template <int N> struct Regs;                               registers for N elements
//   template <int N> void load(int64_t j, Regs<N>& r);          read elements [j, j + N)
//   template <typename R> void apply(int64_t j, const R& r);   compute / write them (N = R::kN)
// Splitting load and apply lets U vectors be read before the first one is used.
template <int VEC, int U, typename T, typename F>
AUGKD_HD void sweep_range(const T* ref, int64_t begin, int64_t end, int rank, int size, F& f) {
  if (begin >= end) return;
  int64_t head = (VEC == 1) ? 0 : head_elems(ref + begin);
  if (head > end - begin) head = end - begin;
  const int64_t body = begin + head;
  const int64_t nvec = (end - body) / VEC;
  const int64_t tail = body + nvec * VEC;

  if (rank < head) {
    typename F::template Regs<1> r;
    f.template load<1>(begin + rank, r);
    f.apply(begin + rank, r);
  }
  int64_t v = rank;
  for (; v + static_cast<int64_t>(U - 1) * size < nvec; v += static_cast<int64_t>(U) * size) {
    typename F::template Regs<VEC> r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) f.template load<VEC>(body + (v + static_cast<int64_t>(k) * size) * VEC, r[k]);
#pragma unroll
    for (int k = 0; k < U; ++k) f.apply(body + (v + static_cast<int64_t>(k) * size) * VEC, r[k]);
  }
  for (; v < nvec; v += size) {
    typename F::template Regs<VEC> r;
    f.template load<VEC>(body + v * VEC, r);
    f.apply(body + v * VEC, r);
  }
  for (int64_t j = tail + rank; j < end; j += size) {
    typename F::template Regs<1> r;
    f.template load<1>(j, r);
    f.apply(j, r);
  }
}

// The inputs of the two-row ops' kernel arguments (kd_loss, kd_divergence: their Fwd / Bwd params derive
// from it): a student and a teacher matrix of the same shape and the optional labels.
template <typename T>
struct PairRows {
  const T* __restrict__ student;       // (rows, cols)
  const T* __restrict__ teacher;       // (rows, cols)
  const int64_t* __restrict__ target;  // (rows,) or nullptr
  int64_t rows, cols, ignore_index;
};

// Base of the row visitors (kernels/row_reduce.cuh) over one row x (INPUTS = 1; Regs: x[N]) or two rows
// x, y of the same width (INPUTS = 2; Regs: x[N], y[N]): the loads as acc_t, and the types the row
// skeleton reads (T, Params, State: void for a backward visitor, kUnroll). x_row is also the row whose
// alignment sets the head / body / tail split (head_elems).
template <typename Elem, typename P, typename S, int UNROLL, int INPUTS = 1>
struct RowVisitor {
  static_assert(INPUTS == 1 || INPUTS == 2, "a row visitor reads one or two rows");
  using T = Elem;
  using Params = P;
  using State = S;
  static constexpr int kUnroll = UNROLL;
  const T* __restrict__ x_row;
  const T* __restrict__ y_row = nullptr;
  template <int N>
  struct Regs {
    static constexpr int kN = N;
    acc_type<T> x[N];
    acc_type<T> y[INPUTS == 2 ? N : 1];
  };
  template <int N>
  AUGKD_HD void load(int64_t j, Regs<N>& r) const {
    load_n<N>(x_row + j, r.x);
    if constexpr (INPUTS == 2) load_n<N>(y_row + j, r.y);
  }
};

}  // namespace augkd::cuda
