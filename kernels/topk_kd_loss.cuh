// Top-k KD loss, CUDA device code: the student row sweep (online max / sum), the row finish on the k teacher
// entries (kernels/topk_kd.h, shared with the CPU kernel), the dense backward and the k-entry backward.
// Math: docs/ops-design.md section 4.
//   u = s / T,  m_s = max u,  d_s = sum exp(u - m_s);  with a CE term at T != 1 also m_1 = max s, d_1
//   loss = alpha c D + (1 - alpha) (m_1 + log d_1 - s_y)   (0 for ignored rows; NaN for a bad label or index)
//   grad_j = g (alpha c / T dD/du_j + (1 - alpha) (p1_j - [j == y]))
//     dD/du_j = q_j c_tail off the k indices (0 where q_j == 0), the entry formula of topk_kd.h on them.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"
#include "row_reduce.cuh"
#include "topk_kd.h"

namespace augkd::cuda {

// Online state of a student row: (m_s, d_s) over u = s / T and, with NEED1, (m_1, d_1) over s.
template <typename A, bool NEED1>
struct LseState {
  A m_s, d_s, m_1, d_1;

  AUGKD_HD static LseState identity() { return {neg_inf<A>(), A(0), neg_inf<A>(), A(0)}; }
  AUGKD_HD LseState empty() const { return identity(); }  // no parameters: every empty state is the same

  // Re-measure from larger maxima: d <- exp(m - M) d (0 while m was -inf; kept when the max did not move).
  AUGKD_HD void rebase(A M_s, A M_1) {
    d_s = rescale(m_s, M_s) * d_s;
    m_s = M_s;
    if constexpr (NEED1) {
      d_1 = rescale(m_1, M_1) * d_1;
      m_1 = M_1;
    }
  }

  AUGKD_HD void rebase(const LseState& top) { rebase(top.m_s, top.m_1); }

  // The fields that merges combine and lanes exchange (kernels/reduce.cuh); (m_1, d_1) only with NEED1.
  template <typename F>
  AUGKD_HD static void for_each_max(LseState& a, const LseState& b, F&& f) {
    f(a.m_s, b.m_s);
    if constexpr (NEED1) f(a.m_1, b.m_1);
  }
  template <typename F>
  AUGKD_HD static void for_each_sum(LseState& a, const LseState& b, F&& f) {
    f(a.d_s, b.d_s);
    if constexpr (NEED1) f(a.d_1, b.d_1);
  }
};

template <typename T>
struct TopkFwdParams {
  using A = acc_type<T>;
  const T* __restrict__ student;     // (rows, cols)
  const int64_t* __restrict__ idx;   // (rows, k)
  const A* __restrict__ val;         // (rows, k)
  const int64_t* __restrict__ target;  // (rows,) or nullptr
  A* __restrict__ loss;              // (rows,)
  A* __restrict__ stats;             // (rows, topk::kStats)
  int64_t rows, cols, k, ignore_index;
  A alpha_c, one_minus_alpha;
  bool use_kl, use_ce;
  topk::TopkArgs<A> args;
};

constexpr int kTopkUnroll = 4;

// The row's merged state -> loss and stats (one thread).
template <typename T, bool NEED1>
AUGKD_HD void topk_write_row(const TopkFwdParams<T>& p, int64_t row, const LseState<acc_type<T>, NEED1>& st) {
  using A = acc_type<T>;
  const T* s_row = p.student + row * p.cols;
  A* out = p.stats + row * topk::kStats;
  A m_t, log_dt, div, c_tail;
  const bool ok = topk::topk_finish(s_row, p.idx + row * p.k, p.val + row * p.k, st.m_s, st.d_s, p.args, m_t,
                                    log_dt, div, c_tail);
  if (!ok) div = quiet_nan<A>();  // an index outside [0, cols): a NaN row, nothing read out of bounds
  const A log_ds = log_(st.d_s);
  out[topk::kMs] = st.m_s;
  out[topk::kLogDs] = log_ds;
  out[topk::kMt] = m_t;
  out[topk::kLogDt] = log_dt;
  out[topk::kD] = div;
  out[topk::kCTail] = c_tail;
  A loss = p.use_kl ? p.alpha_c * div : A(0);
  A m1 = A(0), ld1 = A(0);
  if (p.target != nullptr) {
    m1 = NEED1 ? st.m_1 : st.m_s;
    ld1 = NEED1 ? log_(st.d_1) : log_ds;
    const int64_t y = p.target[row];
    if (y == p.ignore_index) {
      loss = A(0);
    } else if (y < 0 || y >= p.cols) {
      loss = quiet_nan<A>();
    } else if (p.use_ce) {
      loss += p.one_minus_alpha * ((m1 - static_cast<A>(s_row[y])) + ld1);  // CE = m_1 + log d_1 - s_y
    }
  }
  out[topk::kM1] = m1;
  out[topk::kLogD1] = ld1;
  p.loss[row] = loss;
}

// The forward row op (kernels/row_reduce.cuh): folds a row range of the student into an LseState; one warp
// or one block per row, no split mode (rank 0 then works the k entries in finish).
template <typename T, bool NEED1>
struct TopkFwdVisitor : RowVisitor<T, TopkFwdParams<T>, LseState<acc_type<T>, NEED1>, kTopkUnroll> {
  using A = acc_type<T>;
  using Params = TopkFwdParams<T>;
  using State = LseState<A, NEED1>;
  A inv_t;
  State st;

  AUGKD_HD static TopkFwdVisitor make(const Params& p, int64_t row) {
    return {{p.student + row * p.cols}, p.args.inv_t, State::identity()};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
    A m_raw = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) m_raw = max_(m_raw, r.x[k]);
    const A M_s = max_(st.m_s, m_raw * inv_t);  // max u = (max s) / T
    const A M_1 = NEED1 ? max_(st.m_1, m_raw) : st.m_1;
    if (M_s != st.m_s || M_1 != st.m_1) st.rebase(M_s, M_1);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const bool masked = r.x[k] == neg_inf<A>();
      st.d_s += masked ? A(0) : exp_(r.x[k] * inv_t - st.m_s);  // exp(u - m_s)
      if constexpr (NEED1) st.d_1 += masked ? A(0) : exp_(r.x[k] - st.m_1);  // exp(s - m_1)
    }
  }

  AUGKD_HD static void finish(const Params& p, int64_t row, const State& s) { topk_write_row<T, NEED1>(p, row, s); }
};

template <typename T>
struct TopkBwdParams {
  using A = acc_type<T>;
  const A* __restrict__ grad_loss;   // (rows,)
  const T* __restrict__ student;
  const int64_t* __restrict__ idx;
  const A* __restrict__ val;
  const int64_t* __restrict__ target;
  const A* __restrict__ stats;
  T* __restrict__ grad;
  int64_t rows, cols, k, ignore_index, tile;
  A ks;    // alpha c / T (0 when alpha == 0)
  A kce;   // 1 - alpha (0 without a CE term)
  topk::TopkArgs<A> args;
};

// The dense backward row op (row_sweep_kernel in kernels/row_reduce.cuh, tile mode): per-row factors.
template <typename T>
struct TopkBwdVisitor : RowVisitor<T, TopkBwdParams<T>, void, kTopkUnroll> {
  using A = acc_type<T>;
  using Params = TopkBwdParams<T>;
  T* __restrict__ g_row;
  A inv_t, m_s, log_ds, m_1, log_d1, c_tail, ks, k1;  // ks, k1 already times g (0 for ignored rows)
  int64_t y;
  bool bad;

  AUGKD_HD static TopkBwdVisitor make(const Params& p, int64_t row) {
    const A* st = p.stats + row * topk::kStats;
    const A g = p.grad_loss[row];
    int64_t y = -1;
    bool ignored = false, bad = false;
    if (p.target != nullptr) {
      y = p.target[row];
      ignored = y == p.ignore_index;
      bad = !ignored && (y < 0 || y >= p.cols);
    }
    const A ks = ignored ? A(0) : g * p.ks;
    const A k1 = ignored ? A(0) : g * p.kce;
    return {{p.student + row * p.cols}, p.grad + row * p.cols, p.args.inv_t, st[topk::kMs], st[topk::kLogDs],
            st[topk::kM1], st[topk::kLogD1], st[topk::kCTail], ks, k1, y, bad};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t j, const R& r) const {
    store_grads<R::kN>(g_row, j, [&](int k) {
      A d = A(0);
      if (ks != A(0)) {
        const A q = exp_((r.x[k] * inv_t - m_s) - log_ds);  // q_j = exp(u - m_s - log d_s)
        d = q == A(0) ? A(0) : ks * q * c_tail;             // off the k: dD/du = q c_tail
      }
      if (k1 != A(0)) {
        const A p1 = exp_((r.x[k] - m_1) - log_d1);         // p1_j = exp(s - m_1 - log d_1)
        d += k1 * (j + k == y ? p1 - A(1) : p1);            // formed in the compute type, rounded once
      }
      return bad ? quiet_nan<A>() : d;
    });
  }
};

// The k teacher entries of one row, overwritten with their exact gradient (after the dense kernel).
template <typename T>
AUGKD_HD void topk_bwd_entries_row(const TopkBwdParams<T>& p, int64_t row) {
  using A = acc_type<T>;
  const TopkBwdVisitor<T> v = TopkBwdVisitor<T>::make(p, row);
  if (v.ks == A(0) || v.bad) return;  // nothing but the dense terms (ignored row, alpha == 0, bad label)
  const int64_t* idx = p.idx + row * p.k;
  for (int64_t k = 0; k < p.k; ++k) {
    if (idx[k] < 0 || idx[k] >= p.cols) {  // a bad index: a NaN row, nothing written out of bounds
      for (int64_t j = 0; j < p.cols; ++j) v.g_row[j] = static_cast<T>(quiet_nan<A>());
      return;
    }
  }
  topk::topk_entry_grads(v.x_row, idx, p.val + row * p.k, p.stats + row * topk::kStats, p.args,
                         [&](int64_t k, A dd) {
                           const int64_t j = idx[k];
                           A r = v.ks * dd;
                           if (v.k1 != A(0)) {
                             const A p1 = exp_((static_cast<A>(v.x_row[j]) - v.m_1) - v.log_d1);
                             r += v.k1 * (j == v.y ? p1 - A(1) : p1);
                           }
                           v.g_row[j] = static_cast<T>(r);
                         });
}

// One thread per row (k is small next to the row sweeps).
template <typename T>
__global__ void topk_kd_loss_bwd_entries_kernel(const TopkBwdParams<T> p) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    topk_bwd_entries_row(p, row);
  }
}

}  // namespace augkd::cuda
