// Top-k KD loss: the per-row work on the k teacher entries, shared by the CPU kernel (csrc/cpu/topk_kd_loss.cpp),
// the CUDA kernels (kernels/topk_kd_loss.cuh) and their host emulation. Plain C++ (no CUDA headers needed):
// under nvcc the functions are __host__ __device__.
//
// The math is docs/ops-design.md section 4. Per row, with u = s / T over the full vocabulary (its max m_s and
// d_s = sum_j exp(u_j - m_s) come from the row sweep), the k teacher entries (idx_k, v_k) and e_k = v_k / T:
//   student:  a_k = u_{idx_k} - m_s,  log q_k = a_k - log d_s
//             bucket: q_r = (d_s - sum_k exp(a_k)) / d_s  (the student's mass outside the k indices)
//             reverse_kl + renormalize: log q~_k = a_k - log sum_k exp(a_k)   (student restricted to the k)
//   teacher:  renormalize: outcomes e_k;  bucket: outcomes e_k and e_r = log(1 - sum_k exp(v_k)) / T
//             (v are log-probabilities at temperature 1);  log p_o = e_o - m_t - log d_t over the outcomes
//   D = KL:   sum_o p_o (log p_o - log q_o)             (terms with p_o == 0 are 0)
//   D = RKL:  sum_o q_o (log q_o - log p_o)             (terms with q_o == 0 are 0; q~ for renormalize)
// Gradient dD/du_j = q_j * c_tail for a class j outside the k indices, with the per-row
//   c_tail = 1 (KL, renormalize), 1 - p_r / q_r (KL, bucket), log q_r - log p_r - D (RKL, bucket), 0 (RKL,
//   renormalize),
// and for j = idx_k:  q_j - p_k (KL),  q_j (log q_k - log p_k - D) (RKL, bucket),  q~_k (log q~_k - log p_k - D)
// (RKL, renormalize).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define AUGKD_TOPK_HD __host__ __device__ inline
#else
#define AUGKD_TOPK_HD inline
#endif

namespace augkd::topk {

enum Tail : int { kRenormalize = 0, kBucket = 1 };
enum Divergence : int { kKL = 0, kReverseKL = 1 };
enum ValuesFormat : int { kLogits = 0, kLogProbs = 1 };

// Per-row statistics saved by the forward, in this order (stats has shape (rows, kStats)). Each logsumexp is
// kept as its max and its log-sum apart, so that u - m is formed before the (small) log-sum is subtracted.
enum Stat : int { kMs = 0, kLogDs, kM1, kLogD1, kMt, kLogDt, kD, kCTail, kStats };

template <typename A>
AUGKD_TOPK_HD A inf_() {
  return std::numeric_limits<A>::infinity();
}

template <typename A>
AUGKD_TOPK_HD A nan_() {
  return std::numeric_limits<A>::quiet_NaN();
}

template <typename A>
struct TopkArgs {
  A inv_t;
  int64_t k, cols;
  int tail, divergence;
};

// log(1 - S) of the teacher's missing mass, -inf when S >= 1 (a teacher whose k entries hold all the mass).
template <typename A>
AUGKD_TOPK_HD A log_missing(A sum_p) {
  return sum_p >= A(1) ? -inf_<A>() : std::log1p(-sum_p);
}

// Row finish of the forward: from the sweep's (m_s, d_s) and the row's k entries, the teacher's (m_t,
// log d_t), D and c_tail. Returns false when an index is outside [0, cols) (the caller writes a NaN row;
// nothing out of bounds is read). T: student storage type, A: compute type.
template <typename T, typename A>
AUGKD_TOPK_HD bool topk_finish(const T* s_row, const int64_t* idx, const A* val, A m_s, A d_s,
                               const TopkArgs<A>& a, A& m_t, A& log_dt, A& div, A& c_tail) {
  const A log_ds = std::log(d_s);
  // teacher outcomes: max, missing mass
  A mt = -inf_<A>(), sum_p = 0;
  for (int64_t k = 0; k < a.k; ++k) {
    if (idx[k] < 0 || idx[k] >= a.cols) return false;
    const A e = val[k] * a.inv_t;
    mt = e > mt ? e : mt;
    if (a.tail == kBucket) sum_p += std::exp(val[k]);
  }
  const A e_r = a.tail == kBucket ? log_missing(sum_p) * a.inv_t : -inf_<A>();
  mt = e_r > mt ? e_r : mt;
  A dt = 0, sum_q = 0, ma = -inf_<A>();
  for (int64_t k = 0; k < a.k; ++k) {
    dt += std::exp(val[k] * a.inv_t - mt);
    const A ak = static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s;
    sum_q += std::exp(ak);
    ma = ak > ma ? ak : ma;
  }
  if (e_r != -inf_<A>()) dt += std::exp(e_r - mt);
  const A ldt = std::log(dt);
  // the student's log-mass over the k indices (reverse KL, renormalize): log sum_k exp(a_k)
  A sa = 0;
  if (a.divergence == kReverseKL && a.tail == kRenormalize) {
    for (int64_t k = 0; k < a.k; ++k) sa += std::exp(static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s - ma);
  }
  const A log_sa = ma + std::log(sa);
  A d = 0;
  for (int64_t k = 0; k < a.k; ++k) {
    const A ak = static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s;
    const A lp = val[k] * a.inv_t - mt - ldt;
    if (a.divergence == kKL) {
      const A p = std::exp(lp);
      if (p != A(0)) d += p * (lp - (ak - log_ds));                 // p (log p - log q)
    } else {
      const A lq = a.tail == kRenormalize ? ak - log_sa : ak - log_ds;
      const A q = std::exp(lq);
      if (q != A(0)) d += q * (lq - lp);                          // q (log q - log p)
    }
  }
  A ct = a.divergence == kKL ? A(1) : A(0);
  if (a.tail == kBucket) {
    const A tail_d = d_s - sum_q;  // the student's mass outside the k, in units of exp(m_s)
    const A lq_r = (tail_d > A(0) ? std::log(tail_d) : -inf_<A>()) - log_ds;
    const A lp_r = e_r - mt - ldt;
    const A p_r = std::exp(lp_r), q_r = std::exp(lq_r);
    if (a.divergence == kKL) {
      if (p_r != A(0)) d += p_r * (lp_r - lq_r);
      ct = A(1) - p_r / q_r;
    } else {
      if (q_r != A(0)) d += q_r * (lq_r - lp_r);
      ct = lq_r - lp_r;  // minus D below, once D is complete
    }
  }
  if (a.divergence == kReverseKL && a.tail == kBucket) ct -= d;
  m_t = mt;
  log_dt = ldt;
  div = d;
  c_tail = ct;
  return true;
}

// dD/du at the k teacher entries of a row (see the header comment), written through out(k, value).
template <typename T, typename A, typename Out>
AUGKD_TOPK_HD void topk_entry_grads(const T* s_row, const int64_t* idx, const A* val, const A* st,
                                    const TopkArgs<A>& a, Out&& out) {
  const A m_s = st[kMs], log_ds = st[kLogDs], mt = st[kMt], ldt = st[kLogDt], d = st[kD];
  A log_sa = 0;
  if (a.divergence == kReverseKL && a.tail == kRenormalize) {
    A ma = -inf_<A>();
    for (int64_t k = 0; k < a.k; ++k) {
      const A ak = static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s;
      ma = ak > ma ? ak : ma;
    }
    A sa = 0;
    for (int64_t k = 0; k < a.k; ++k) sa += std::exp(static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s - ma);
    log_sa = ma + std::log(sa);
  }
  for (int64_t k = 0; k < a.k; ++k) {
    const A ak = static_cast<A>(s_row[idx[k]]) * a.inv_t - m_s;
    const A lp = val[k] * a.inv_t - mt - ldt;
    A g;
    if (a.divergence == kKL) {
      g = std::exp(ak - log_ds) - std::exp(lp);                    // q_j - p_k
    } else {
      const A lq = a.tail == kRenormalize ? ak - log_sa : ak - log_ds;
      const A q = std::exp(lq);
      g = q == A(0) ? A(0) : q * (lq - lp - d);                    // q (log q - log p - D)
    }
    out(k, g);
  }
}

}  // namespace augkd::topk
