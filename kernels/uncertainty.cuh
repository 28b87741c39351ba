// Uncertainty: energy and softmax entropy per row, forward (one online sweep) and backward.
// The math is docs/ops-design.md section 2:
//   u = z / T,  lse = logsumexp(u),  p = softmax(u)
//   energy = -T * lse,  entropy H = -sum_j p_j log p_j = lse - sum_j p_j u_j
//   online, stable: S = sum_j exp(u_j - m) (u_j - m)  (0 where u_j == -inf)
//     when m rises by dm (r = exp(-dm)): S <- r (S - d dm),  d <- r d
//   entropy = log d - S / d
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

template <typename A>
struct EntropyState {
  A m;  // running max of u
  A d;  // d = sum_j exp(u_j - m)
  A s;  // S = sum_j exp(u_j - m) (u_j - m), 0 where u_j == -inf

  AUGKD_HD static EntropyState identity() { return {neg_inf<A>(), A(0), A(0)}; }
  AUGKD_HD EntropyState empty() const { return identity(); }

  // Re-measure from a larger maximum M >= m:  dm = M - m, r = exp(-dm),
  //   S <- r (S - d dm),  d <- r d.
  // While m is -inf, d and S are 0 (or NaN from a NaN input) and are kept as they are.
  AUGKD_HD void rebase(A M) {
    if (m != neg_inf<A>()) {
      const A r = rescale(m, M);
      s = r * (s - d * shift(m, M));
      d = r * d;
    }
    m = M;
  }

  AUGKD_HD void merge(const EntropyState& o) {
    const A M = max_(m, o.m);
    EntropyState b = o;
    b.rebase(M);
    rebase(M);
    d += b.d;
    s += b.s;
  }

  __device__ __forceinline__ EntropyState shfl_xor(int lane_mask) const {
    return {__shfl_xor_sync(kFullMask, m, lane_mask), __shfl_xor_sync(kFullMask, d, lane_mask),
            __shfl_xor_sync(kFullMask, s, lane_mask)};
  }
};

template <typename T>
struct UncFwdParams {
  using A = acc_type<T>;
  const T* __restrict__ logits;  // (rows, cols)
  A* __restrict__ energy;        // (rows,)
  A* __restrict__ entropy;       // (rows,)
  int64_t rows, cols;
  A temperature, inv_t;
};

template <typename T>
struct UncFwdVisitor {
  using A = acc_type<T>;
  const T* __restrict__ z_row;
  A inv_t;
  EntropyState<A> st;

  template <int N>
  struct Regs {
    A z[N];
  };

  template <int N>
  AUGKD_HD void load(int64_t j, Regs<N>& r) const {
    load_n<N>(z_row + j, r.z);
  }

  template <int N>
  AUGKD_HD void apply(int64_t, const Regs<N>& r) {
    A u[N];
    A cm = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      u[k] = r.z[k] * inv_t;  // u = z / T
      cm = max_(cm, u[k]);
    }
    const A M = max_(st.m, cm);
    if (M != st.m) st.rebase(M);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const bool masked = u[k] == neg_inf<A>();
      const A x = u[k] - st.m;                // u_j - m
      const A e = masked ? A(0) : exp_(x);    // exp(u_j - m), 0 for u_j == -inf
      st.d += e;                              // d += exp(u_j - m)
      st.s += masked ? A(0) : e * x;          // S += exp(u_j - m) (u_j - m)
    }
  }
};

constexpr int kUncUnroll = 4;     // one tensor: 4 x 16 bytes in flight per thread
constexpr int kUncBwdUnroll = 4;

// Turns the merged state of a whole row into its energy and entropy.
template <typename T>
AUGKD_HD void unc_write_row(const UncFwdParams<T>& p, int64_t row, const EntropyState<acc_type<T>>& st) {
  using A = acc_type<T>;
  const A log_d = log_(st.d);
  const A lse = st.m + log_d;              // lse = m + log d
  p.energy[row] = -p.temperature * lse;    // energy = -T lse
  p.entropy[row] = log_d - st.s / st.d;    // entropy = log d - S / d
}

// Row layouts: see RowMode (reduce.cuh).
template <typename T, RowMode MODE>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
    uncertainty_fwd_kernel(const UncFwdParams<T> p, int64_t part_cols, EntropyState<acc_type<T>>* ws) {
  using A = acc_type<T>;
  using State = EntropyState<A>;
  __shared__ State smem[MODE == RowMode::kWarp ? 1 : kWarp];
  const RowGroup<MODE> grp(part_cols);

  for (int64_t row = grp.row0; row < p.rows; row += grp.stride) {
    const T* z_row = p.logits + row * p.cols;
    UncFwdVisitor<T> v{z_row, p.inv_t, State::identity()};
    sweep_range<kVec<T>, kUncUnroll>(z_row, grp.begin, grp.end(p.cols), grp.rank, grp.size, v);
    State st;
    if constexpr (MODE == RowMode::kWarp) {
      st = warp_reduce(v.st);
    } else {
      st = block_reduce(v.st, smem);
    }
    if (grp.rank == 0) {
      if constexpr (MODE == RowMode::kSplit) {
        ws[row * gridDim.x + blockIdx.x] = st;
      } else {
        unc_write_row(p, row, st);
      }
    }
  }
}

// Split mode, second step: one thread per row folds the row's partial states in order.
template <typename T>
__global__ void uncertainty_fwd_merge_kernel(const UncFwdParams<T> p, int64_t parts,
                                             const EntropyState<acc_type<T>>* __restrict__ ws) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    EntropyState<acc_type<T>> st = ws[row * parts];
    for (int64_t k = 1; k < parts; ++k) st.merge(ws[row * parts + k]);
    unc_write_row(p, row, st);
  }
}

template <typename T>
struct UncBwdParams {
  using A = acc_type<T>;
  const A* __restrict__ grad_energy;   // (rows,)
  const A* __restrict__ grad_entropy;  // (rows,)
  const T* __restrict__ logits;
  const A* __restrict__ energy;        // (rows,)
  const A* __restrict__ entropy;       // (rows,)
  T* __restrict__ grad_logits;
  int64_t rows, cols, tile;
  A temperature, inv_t;
};

template <typename T>
struct UncBwdVisitor {
  using A = acc_type<T>;
  const T* __restrict__ z_row;
  T* __restrict__ gz_row;
  A inv_t, lse, h, g_e, g_h;

  template <int N>
  struct Regs {
    A z[N];
  };

  template <int N>
  AUGKD_HD void load(int64_t j, Regs<N>& r) const {
    load_n<N>(z_row + j, r.z);
  }

  template <int N>
  AUGKD_HD void apply(int64_t j, const Regs<N>& r) const {
    A gz[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A u = r.z[k] * inv_t;          // u = z / T
      const A p = exp_(u - lse);           // p = exp(u - lse)
      // grad_z = -gE p - gH p (u - lse + H) / T; the entropy term is 0 where p == 0 (u may be -inf)
      const A dh = p == A(0) ? A(0) : g_h * p * (u - lse + h) * inv_t;
      gz[k] = -g_e * p - dh;
    }
    store_n<N>(gz_row + j, gz);
  }
};

// TILE / warp-per-row layout as kd_loss_bwd_kernel.
template <typename T, bool TILE>
__global__ void __launch_bounds__(kTileThreads, 1) uncertainty_bwd_kernel(const UncBwdParams<T> p) {
  const int rank = threadIdx.x;
  const int size = TILE ? blockDim.x : kWarp;
  const int64_t row0 = TILE ? blockIdx.y : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t stride = TILE ? gridDim.y : static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t begin = TILE ? static_cast<int64_t>(blockIdx.x) * p.tile : 0;
  const int64_t end = TILE ? min(p.cols, begin + p.tile) : p.cols;

  for (int64_t row = row0; row < p.rows; row += stride) {
    const int64_t off = row * p.cols;
    // lse = -energy / T (correctly rounded: the energy was stored as -T * lse)
    UncBwdVisitor<T> v{p.logits + off, p.grad_logits + off, p.inv_t,
                       div_rn(-p.energy[row], p.temperature), p.entropy[row],
                       p.grad_energy[row], p.grad_entropy[row]};
    sweep_range<kVec<T>, kUncBwdUnroll>(p.logits + off, begin, end, rank, size, v);
  }
}

}  // namespace augkd::cuda
