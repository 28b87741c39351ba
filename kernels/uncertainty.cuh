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
#include "row_reduce.cuh"

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

  AUGKD_HD void rebase(const EntropyState& top) { rebase(top.m); }

  // The fields that merges combine and lanes exchange (kernels/reduce.cuh).
  template <typename F>
  AUGKD_HD static void for_each_max(EntropyState& a, const EntropyState& b, F&& f) {
    f(a.m, b.m);
  }
  template <typename F>
  AUGKD_HD static void for_each_sum(EntropyState& a, const EntropyState& b, F&& f) {
    f(a.d, b.d), f(a.s, b.s);
  }
};

// What the forward and the backward kernels both read.
template <typename T>
struct UncInputs {
  const T* __restrict__ logits;  // (rows, cols)
  int64_t rows, cols;
  acc_type<T> temperature, inv_t;
};

template <typename T>
struct UncFwdParams : UncInputs<T> {
  acc_type<T>* __restrict__ energy;   // (rows,)
  acc_type<T>* __restrict__ entropy;  // (rows,)
};

template <typename T>
struct UncBwdParams : UncInputs<T> {
  const acc_type<T>* __restrict__ energy;        // (rows,) from the forward
  const acc_type<T>* __restrict__ entropy;       // (rows,)
  const acc_type<T>* __restrict__ grad_energy;   // (rows,)
  const acc_type<T>* __restrict__ grad_entropy;  // (rows,)
  T* __restrict__ grad_logits;
  int64_t tile;
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

// The forward row op (kernels/row_reduce.cuh): folds a row range of z into an EntropyState.
template <typename T>
struct UncFwdVisitor : RowVisitor<T, UncFwdParams<T>, EntropyState<acc_type<T>>, kUncUnroll> {
  using A = acc_type<T>;
  using Params = UncFwdParams<T>;
  using State = EntropyState<A>;
  A inv_t;
  State st;

  AUGKD_HD static UncFwdVisitor make(const Params& p, int64_t row) {
    return {{p.logits + row * p.cols}, p.inv_t, State::identity()};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
    A u[N];
    A cm = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      u[k] = r.x[k] * inv_t;  // u = z / T
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

  AUGKD_HD static void finish(const Params& p, int64_t row, const State& s) { unc_write_row(p, row, s); }
};

// The backward row op (row_sweep_kernel in kernels/row_reduce.cuh).
template <typename T>
struct UncBwdVisitor : RowVisitor<T, UncBwdParams<T>, void, kUncBwdUnroll> {
  using A = acc_type<T>;
  using Params = UncBwdParams<T>;
  T* __restrict__ gz_row;
  A inv_t, lse, h, g_e, g_h;

  // lse = -energy / T (correctly rounded: the energy was stored as -T * lse)
  AUGKD_HD static UncBwdVisitor make(const Params& p, int64_t row) {
    const int64_t off = row * p.cols;
    return {{p.logits + off}, p.grad_logits + off, p.inv_t, div_rn(-p.energy[row], p.temperature),
            p.entropy[row], p.grad_energy[row], p.grad_entropy[row]};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t j, const R& r) const {
    store_grads<R::kN>(gz_row, j, [&](int k) {
      const A u = r.x[k] * inv_t;          // u = z / T
      const A p = exp_(u - lse);           // p = exp(u - lse)
      // grad_z = -gE p - gH p (u - lse + H) / T; the entropy term is 0 where p == 0 (u may be -inf)
      const A dh = p == A(0) ? A(0) : g_h * p * (u - lse + h) * inv_t;
      return -g_e * p - dh;
    });
  }
};

}  // namespace augkd::cuda
