// KD divergence family, CUDA device code: the row states, the forward row kernel and the backward tile kernel.
// The per-class math is kernels/kd_divergence_math.h (shared with the CPU kernel); this file holds only the
// sweeps and reductions around it. Math: docs/ops-design.md, "KD divergences".
//   sweep 1 (online): m_s, d_s of u = s / T, m_t, d_t of v = t / T, E = d_t - d_s, m_1, d_1 of s (CE, T != 1)
//   sweep 2: D, S_s, S_t from rho_j = (v_j - m_t) - (u_j - m_s) - L, L = log1p(E / d_s)
//   backward: grad_s = g_div / T dD/du + g_ce (p1 - onehot(y)),  grad_t = g_div / T dD/dv
#pragma once

#include "kd_divergence_math.h"
#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

// The operations policy of kd_divergence_math.h on device scalars.
template <typename A>
struct DivOps {
  using M = bool;
  AUGKD_HD static A exp(A x) { return exp_(x); }
  AUGKD_HD static A expm1(A x) { return expm1_(x); }
  AUGKD_HD static A expm1_small(A x) { return expm1_(x); }
  AUGKD_HD static A log1p(A x) { return log1p_(x); }
  AUGKD_HD static bool le(A a, A b) { return a <= b; }
  AUGKD_HD static bool lt(A a, A b) { return a < b; }
  AUGKD_HD static bool eq(A a, A b) { return a == b; }
  AUGKD_HD static bool and_(bool a, bool b) { return a && b; }
  AUGKD_HD static bool or_(bool a, bool b) { return a || b; }
  AUGKD_HD static A sel(bool m, A a, A b) { return m ? a : b; }
};

// Online state of sweep 1 (see the file comment).
template <typename A, bool NEED1>
struct DivState {
  A m_s, d_s, m_t, d_t, gap, m_1, d_1;

  AUGKD_HD static DivState identity() {
    return {neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0), neg_inf<A>(), A(0)};
  }
  AUGKD_HD DivState empty() const { return identity(); }

  AUGKD_HD void rebase(A M_s, A M_t, A M_1) {
    const A rs = rescale(m_s, M_s), rt = rescale(m_t, M_t);
    gap = div::rebase_gap<A>(gap, d_s, rs, rt, shift(m_s, M_s) - shift(m_t, M_t), [](A x) { return expm1_(x); });
    d_s *= rs;
    d_t *= rt;
    m_s = M_s;
    m_t = M_t;
    if constexpr (NEED1) {
      d_1 = rescale(m_1, M_1) * d_1;
      m_1 = M_1;
    }
  }

  AUGKD_HD void rebase(const DivState& top) { rebase(top.m_s, top.m_t, top.m_1); }

  // The fields that merges combine and lanes exchange (kernels/reduce.cuh); (m_1, d_1) only with NEED1.
  template <typename F>
  AUGKD_HD static void for_each_max(DivState& a, const DivState& b, F&& f) {
    f(a.m_s, b.m_s), f(a.m_t, b.m_t);
    if constexpr (NEED1) f(a.m_1, b.m_1);
  }
  template <typename F>
  AUGKD_HD static void for_each_sum(DivState& a, const DivState& b, F&& f) {
    f(a.d_s, b.d_s), f(a.d_t, b.d_t), f(a.gap, b.gap);
    if constexpr (NEED1) f(a.d_1, b.d_1);
  }
};

// The three sums of sweep 2.
template <typename A>
struct DivSums {
  A d, ss, st;
  AUGKD_HD static DivSums identity() { return {A(0), A(0), A(0)}; }
  AUGKD_HD DivSums empty() const { return identity(); }
  template <typename F>
  AUGKD_HD static void for_each_sum(DivSums& a, const DivSums& b, F&& f) {
    f(a.d, b.d), f(a.ss, b.ss), f(a.st, b.st);
  }
};

template <typename T>
struct DivFwdParams : PairRows<T> {
  using A = acc_type<T>;
  A* __restrict__ loss;                // (rows,)
  A* __restrict__ stats;               // (rows, div::kStats)
  A inv_t, alpha, c, beta;
};

// Sweep 1 over a row's range: per vector the maxima first, then the sums from those maxima.
constexpr int kDivUnroll = 2;

// The visitors read the student row as x and the teacher row as y (RowVisitor, kernels/load_store.cuh).
template <typename T, bool NEED1>
struct DivStatsVisitor : RowVisitor<T, DivFwdParams<T>, DivState<acc_type<T>, NEED1>, kDivUnroll, 2> {
  using A = acc_type<T>;
  using O = DivOps<A>;
  A inv_t;
  DivState<A, NEED1> st;

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
    A ms = neg_inf<A>(), mt = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      ms = max_(ms, r.x[k]);
      mt = max_(mt, r.y[k]);
    }
    const A M_s = max_(st.m_s, ms * inv_t), M_t = max_(st.m_t, mt * inv_t);
    const A M_1 = NEED1 ? max_(st.m_1, ms) : st.m_1;
    if (M_s != st.m_s || M_t != st.m_t || M_1 != st.m_1) st.rebase(M_s, M_t, M_1);
    const A cs = center_(st.m_s), ct = center_(st.m_t), c1 = center_(st.m_1);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A a = r.x[k] * inv_t - cs, b = r.y[k] * inv_t - ct;
      const A ea = exp_(a), eb = exp_(b);
      st.d_s += ea;
      st.d_t += eb;
      st.gap += div::gap_term<O, A>(ea, eb, div::log_ratio<O, A>(a, b));
      if constexpr (NEED1) st.d_1 += exp_(r.x[k] - c1);
    }
  }
};

// The per-class view of a finished row: q, p and rho at class j.
template <typename A>
struct DivRow {
  A inv_t, cs, ct, log_ds, log_dt, ell;
  template <typename O>
  AUGKD_HD void at(A s, A t, A& q, A& p, A& rho) const {
    const A a = s * inv_t - cs, b = t * inv_t - ct;
    q = exp_(a - log_ds);
    p = exp_(b - log_dt);
    rho = div::log_ratio<O, A>(a, b) - ell;
  }
};

template <typename T, int DIV>
struct DivSumsVisitor : RowVisitor<T, DivFwdParams<T>, DivSums<acc_type<T>>, kDivUnroll, 2> {
  using A = acc_type<T>;
  using O = DivOps<A>;
  DivRow<A> row;
  A beta;
  DivSums<A> sums;

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A q, p, rho;
      row.template at<O>(r.x[k], r.y[k], q, p, rho);
      div::forward_terms<O, A, DIV>(q, p, rho, beta, sums.d, sums.ss, sums.st);
    }
  }
};

constexpr int kDivThreads = 256;

// One block per row (rows loop by gridDim.x): sweep 1, a block reduction, sweep 2, a block reduction, and
// thread 0 writes the row.
template <typename T, int DIV, bool NEED1>
__global__ void __launch_bounds__(kDivThreads) kd_divergence_fwd_kernel(const DivFwdParams<T> p) {
  using A = acc_type<T>;
  __shared__ DivState<A, NEED1> smem1[kWarp];
  __shared__ DivSums<A> smem2[kWarp];
  __shared__ A shared_row[6];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* s_row = p.student + row * p.cols;
    const T* t_row = p.teacher + row * p.cols;
    A* out = p.stats + row * div::kStats;
    const int64_t y = p.target != nullptr ? p.target[row] : int64_t(-1);
    if (p.target != nullptr && y == p.ignore_index) {  // exactly 0, whatever the row holds
      if (threadIdx.x < div::kStats) out[threadIdx.x] = A(0);
      if (threadIdx.x == 0) p.loss[row] = A(0);
      continue;
    }
    DivStatsVisitor<T, NEED1> v1{{s_row, t_row}, p.inv_t, DivState<A, NEED1>::identity()};
    sweep_range<kVec<T>, kDivUnroll>(s_row, 0, p.cols, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                                     v1);
    const DivState<A, NEED1> st = block_reduce(v1.st, smem1);
    if (threadIdx.x == 0) {
      shared_row[0] = st.m_s;
      shared_row[1] = log_(st.d_s);
      shared_row[2] = st.m_t;
      shared_row[3] = log_(st.d_t);
      shared_row[4] = log1p_(div_rn(st.gap, st.d_s));
      shared_row[5] = NEED1 ? st.m_1 : st.m_s;
      out[div::kLogD1] = NEED1 ? log_(st.d_1) : shared_row[1];
    }
    __syncthreads();
    const DivRow<A> r{p.inv_t, center_(shared_row[0]), center_(shared_row[2]), shared_row[1], shared_row[3],
                      shared_row[4]};
    DivSumsVisitor<T, DIV> v2{{s_row, t_row}, r, p.beta, DivSums<A>::identity()};
    sweep_range<kVec<T>, kDivUnroll>(s_row, 0, p.cols, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                                     v2);
    const DivSums<A> sums = block_reduce(v2.sums, smem2);
    if (threadIdx.x == 0) {
      const A d = sums.d;
      A ce = A(0);
      if (p.target != nullptr) {
        ce = (y < 0 || y >= p.cols) ? quiet_nan<A>()
                                    : (shared_row[5] + out[div::kLogD1]) - static_cast<A>(s_row[y]);
      }
      out[div::kMs] = shared_row[0];
      out[div::kLogDs] = shared_row[1];
      out[div::kMt] = shared_row[2];
      out[div::kLogDt] = shared_row[3];
      out[div::kL] = shared_row[4];
      out[div::kD] = d;
      out[div::kCE] = ce;
      out[div::kSs] = DIV == div::kReverseKL ? d : sums.ss;
      out[div::kSt] = DIV == div::kKL ? d : sums.st;
      out[div::kM1] = shared_row[5];
      // a term whose weight is exactly 0 is left out (an infinite D or CE must not give 0 * inf)
      A loss = p.alpha != A(0) ? p.alpha * p.c * d : A(0);
      if (p.target != nullptr && p.alpha != A(1)) loss += (A(1) - p.alpha) * ce;
      p.loss[row] = loss;
    }
    __syncthreads();  // shared_row is rewritten by the next row
  }
}

template <typename T>
struct DivBwdParams : PairRows<T> {
  using A = acc_type<T>;
  const A* __restrict__ grad_div;      // (rows,)
  const A* __restrict__ grad_ce;       // (rows,)
  const A* __restrict__ stats;
  T* __restrict__ grad_s;              // nullptr when not asked for
  T* __restrict__ grad_t;              // nullptr when not asked for
  int64_t tile;
  A inv_t, beta;
};

template <typename T, int DIV>
struct DivBwdVisitor : RowVisitor<T, DivBwdParams<T>, void, kDivUnroll, 2> {
  using A = acc_type<T>;
  using O = DivOps<A>;
  T* __restrict__ gs_row;
  T* __restrict__ gt_row;
  DivRow<A> row;
  A beta, d, ss, st, kd, kc, m_1, log_d1;
  int64_t y;

  template <typename R>
  AUGKD_HD void apply(int64_t j, const R& r) const {
    store_grad_pair<R::kN>(gs_row, gt_row, j, [&](int k, A& gs, A& gt) {
      gs = A(0);
      gt = A(0);
      if (kd != A(0)) {  // a gradient weight of exactly 0 leaves its term out (no 0 * inf)
        A q, p, rho, du, dv;
        row.template at<O>(r.x[k], r.y[k], q, p, rho);
        div::class_grads<O, A, DIV>(q, p, rho, beta, d, ss, st, du, dv);
        gs = kd * du;
        gt = kd * dv;
      }
      if (kc != A(0)) {
        const A p1 = exp_((r.x[k] - m_1) - log_d1);
        gs += kc * (j + k == y ? p1 - A(1) : p1);
      }
    });
  }
};

// blockIdx.x: a tile of p.tile columns, blockIdx.y (looping by gridDim.y): a row.
template <typename T, int DIV>
__global__ void __launch_bounds__(kTileThreads) kd_divergence_bwd_kernel(const DivBwdParams<T> p) {
  using A = acc_type<T>;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.tile;
  const int64_t end = min(p.cols, begin + p.tile);
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const A* st = p.stats + row * div::kStats;
    const int64_t y = p.target != nullptr ? p.target[row] : int64_t(-1);
    const bool ignored = p.target != nullptr && y == p.ignore_index;
    const bool bad = p.target != nullptr && !ignored && (y < 0 || y >= p.cols);
    const A nan = quiet_nan<A>();
    DivBwdVisitor<T, DIV> v{{p.student + row * p.cols, p.teacher + row * p.cols},
                            p.grad_s != nullptr ? p.grad_s + row * p.cols : nullptr,
                            p.grad_t != nullptr ? p.grad_t + row * p.cols : nullptr,
                            DivRow<A>{p.inv_t, center_(st[div::kMs]), center_(st[div::kMt]), st[div::kLogDs],
                                      st[div::kLogDt], st[div::kL]},
                            p.beta,
                            st[div::kD],
                            st[div::kSs],
                            st[div::kSt],
                            ignored ? A(0) : (bad ? nan : p.grad_div[row] * p.inv_t),
                            (ignored || p.target == nullptr) ? A(0) : (bad ? nan : p.grad_ce[row]),
                            st[div::kM1],
                            st[div::kLogD1],
                            y};
    sweep_range<kVec<T>, kDivUnroll>(v.x_row, begin, end, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x),
                                     v);
  }
}

}  // namespace augkd::cuda
