// KD loss: forward (one online-softmax sweep per row, plus a second sweep for an ill-conditioned KL) and
// backward (recompute from the saved stats). The math is docs/ops-design.md section 1; each computation
// below repeats its formula.
//
//   u = s / T,  w = v / T,  v = t (teacher_format 0 logits, 1 log_probs) or log(t) (2 probs)
//   KL_i = sum_j p_t (log p_t - log p_s),  CE_i = logsumexp(s) - s_y,  c = T^2 or 1
//   loss_i = alpha c KL_i + (1 - alpha) CE_i   (no target: alpha c KL_i; 0 for ignored rows;
//                                               NaN for a non-ignored target outside [0, C))
// Every exponent is measured from a raw row maximum, a = (v - M_t) / T, b = (s - M_s) / T, so that
// a large common offset of the logits never rounds a logsumexp ("Precision" in the doc).
// stats (rows, 8) = [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L]: mu = E_pt[a - b] (one pass),
// L = log d_t - log d_s (refined), KL = mu - L (or the refined KL); the backward needs
// rho - KL = (a - b) - mu, which mu gives without cancelling two O(1) numbers.
// A term whose weight is exactly 0 (alpha == 0 for KL, alpha == 1 for CE) is left out, as in the
// torch reference, so an infinite KL or CE does not become 0 * inf = NaN.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"
#include "row_reduce.cuh"

namespace augkd::cuda {

enum TeacherFormat : int { kLogits = 0, kLogProbs = 1, kProbs = 2 };

enum KdStat : int { kMs = 0, kLseT, kMt, kLogDs, kLogDt, kLogD1, kMu, kL, kKdStats };

// The one-pass KL is kept when it exceeds this fraction of the magnitude of its terms; otherwise the
// refine kernel recomputes it (the same rule in every backend: augkd/ops/reference.py REFINE_RATIO).
constexpr double kRefineRatio = 1.0 / 64;
constexpr double kPhiSeriesMax = 0.25;

// Per-thread (then per-row) online state of one KD row.
template <typename A, bool NEED1>
struct KdState {
  A m_s, d_s;  // running max of s and d_s = sum_j exp((s_j - m_s) / T)
  A m_t, d_t;  // running max of v and d_t = sum_j exp((v_j - m_t) / T)
  A a;         // A = sum_j exp(a_j) (a_j - b_j), 0 where a_j == -inf
  A d_1;       // sum_j exp(s_j - m_s) (CE at temperature 1), used only when NEED1
  A inv_t;     // 1 / T (a parameter: merges need it)

  AUGKD_HD static KdState identity(A inv_t = A(0)) {
    return {neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0), A(0), inv_t};
  }
  AUGKD_HD KdState empty() const { return identity(inv_t); }

  // Re-measure the state from larger maxima M_s >= m_s, M_t >= m_t (raw logits):
  //   sh_s = (M_s - m_s) / T, sh_t = (M_t - m_t) / T, r = exp(-sh_t)
  //   A   <- r * (A + d_t * (sh_s - sh_t))
  //   d_t <- r * d_t,   d_s <- exp(-sh_s) * d_s,   d_1 <- exp(-(M_s - m_s)) * d_1
  // While m_t is still -inf, d_t and A are 0 (or NaN from a NaN input) and are kept as they are
  // (r = 0 in the doc's words; keeping them also keeps a NaN). The shifts are taken between centred
  // maxima (center_), so -inf -> finite never computes -inf - -inf.
  AUGKD_HD void rebase(A M_s, A M_t) {
    const A raw_s = center_(M_s) - center_(m_s);
    const A sh_s = raw_s * inv_t;
    const A sh_t = (center_(M_t) - center_(m_t)) * inv_t;
    if (m_t != neg_inf<A>()) {
      const A r = m_t == M_t ? A(1) : exp_(-sh_t);
      a = r * (a + d_t * (sh_s - sh_t));
      d_t = r * d_t;
    }
    if (m_s != M_s) {
      d_s = (m_s == neg_inf<A>() ? A(0) : exp_(-sh_s)) * d_s;
      if constexpr (NEED1) d_1 = (m_s == neg_inf<A>() ? A(0) : exp_(-raw_s)) * d_1;
    }
    m_s = M_s;
    m_t = M_t;
  }

  // A merge re-measures both states from the maxima of `top` with top's 1 / T (merge_state, reduce.cuh).
  AUGKD_HD void rebase(const KdState& top) {
    inv_t = top.inv_t;
    rebase(top.m_s, top.m_t);
  }

  // The fields that merges combine and lanes exchange (inv_t is a parameter); d_1 only with NEED1.
  template <typename F>
  AUGKD_HD static void for_each_max(KdState& x, const KdState& y, F&& f) {
    f(x.m_s, y.m_s), f(x.m_t, y.m_t);
  }
  template <typename F>
  AUGKD_HD static void for_each_sum(KdState& x, const KdState& y, F&& f) {
    f(x.d_s, y.d_s), f(x.d_t, y.d_t), f(x.a, y.a);
    if constexpr (NEED1) f(x.d_1, y.d_1);
  }
};

// v = t for logits / log-probs (softmax is shift-invariant), log(t) for probs (log 0 = -inf: a masked class).
template <typename A>
AUGKD_HD A teacher_logit(A t, int fmt) {
  return fmt == kProbs ? log_(t) : t;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct KdFwdParams : PairRows<T> {
  using A = acc_type<T>;
  A* __restrict__ loss;            // (rows,)
  A* __restrict__ stats;           // (rows, 8): see KdStat
  A inv_t;            // 1 / T
  A alpha_c;          // alpha * c, c = T^2 if t2_scale else 1
  A one_minus_alpha;  // 1 - alpha
  bool use_kl;        // alpha != 0
  bool use_ce;        // target given and alpha != 1
  int fmt;            // teacher_format
};

constexpr int kKdUnroll = 2;  // vectors per thread in flight (two tensors: 4 x 16 bytes)

// Reads y and s_y of a row. No out-of-bounds read: s_y is read only for a target in [0, C).
template <typename T>
AUGKD_HD void kd_read_target(const KdFwdParams<T>& p, int64_t row, int64_t& y, acc_type<T>& s_y) {
  y = 0;
  s_y = acc_type<T>(0);
  if (p.target != nullptr) {
    y = p.target[row];
    if (y != p.ignore_index && y >= 0 && y < p.cols) s_y = static_cast<acc_type<T>>(p.student[row * p.cols + y]);
  }
}

// The loss of a row from its stats: alpha c KL + (1 - alpha) ((M_s - s_y) + log d_1) (CE without
// rounding a large logsumexp); 0 when ignored, NaN for a non-ignored target outside [0, C).
template <typename T>
AUGKD_HD acc_type<T> kd_row_loss(const KdFwdParams<T>& p, const acc_type<T>* st, acc_type<T> kl, int64_t y,
                                 acc_type<T> s_y) {
  using A = acc_type<T>;
  const A kl_term = p.use_kl ? p.alpha_c * kl : A(0);  // alpha * c * KL (left out when alpha == 0)
  if (p.target == nullptr) return kl_term;
  if (y == p.ignore_index) return A(0);
  if (y < 0 || y >= p.cols) return quiet_nan<A>();           // non-ignored target outside [0, C): NaN row
  return kl_term + (p.use_ce ? p.one_minus_alpha * ((st[kMs] - s_y) + st[kLogD1]) : A(0));
}

// Whether the one-pass KL = mu - L of a row is too close to the rounding of its terms (mu, log d_t,
// log d_s): then the refine sweep recomputes it. NaN and inf rows are kept as they are.
template <typename A>
AUGKD_HD bool kd_needs_refine(const A* st) {
  const A magnitude = abs_(st[kMu]) + abs_(st[kLogDt]) + abs_(st[kLogDs]) + A(1);
  return st[kMu] - st[kL] < magnitude * A(kRefineRatio);
}

// Turns the merged state of a whole row into its loss and stats.
template <typename T, bool NEED1>
AUGKD_HD void kd_write_row(const KdFwdParams<T>& p, int64_t row, const KdState<acc_type<T>, NEED1>& st, int64_t y,
                           acc_type<T> s_y) {
  using A = acc_type<T>;
  const A log_ds = log_(st.d_s);
  const A log_dt = log_(st.d_t);
  A* o = p.stats + row * kKdStats;
  o[kMs] = st.m_s;
  o[kLseT] = center_(st.m_t) * p.inv_t + log_dt;  // lse_t = M_t / T + log d_t (teacher energy)
  o[kMt] = st.m_t;
  o[kLogDs] = log_ds;
  o[kLogDt] = log_dt;
  o[kLogD1] = NEED1 ? log_(st.d_1) : log_ds;       // T == 1 (or no target): the CE's sum is d_s
  // mu = E_pt[a - b] = A / d_t; a NaN student (also where p_t = 0) reaches mu through log d_s
  o[kMu] = log_ds != log_ds ? log_ds : st.a / st.d_t;
  o[kL] = log_dt - log_ds;
  p.loss[row] = kd_row_loss(p, o, o[kMu] - o[kL], y, s_y);  // KL = mu - L (one pass)
}

// The forward row op (kernels/row_reduce.cuh): folds a row range into a KdState; x = student, y = teacher.
// NEED1: the CE needs its own logsumexp(s) (target given and T != 1).
template <typename T, bool NEED1>
struct KdFwdVisitor : RowVisitor<T, KdFwdParams<T>, KdState<acc_type<T>, NEED1>, kKdUnroll, 2> {
  using A = acc_type<T>;
  using Params = KdFwdParams<T>;
  using State = KdState<A, NEED1>;
  A inv_t;
  int fmt;
  State st;

  AUGKD_HD static KdFwdVisitor make(const Params& p, int64_t row) {
    return {{p.student + row * p.cols, p.teacher + row * p.cols}, p.inv_t, p.fmt, State::identity(p.inv_t)};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
    A v[N];
    A cm_s = neg_inf<A>(), cm_t = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = teacher_logit(r.y[k], fmt);             // v = t or log t
      cm_s = max_(cm_s, r.x[k]);
      cm_t = max_(cm_t, v[k]);
    }
    // Raise the running maxima to include this chunk (one rescale per chunk, rarely taken).
    const A M_s = max_(st.m_s, cm_s);
    const A M_t = max_(st.m_t, cm_t);
    if (M_s != st.m_s || M_t != st.m_t) st.rebase(M_s, M_t);
    const A cs = center_(st.m_s), ct = center_(st.m_t);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A xs = r.x[k] - cs;
      const A b = xs * inv_t;                                // b = (s_j - M_s) / T
      const A a = (v[k] - ct) * inv_t;                       // a = (v_j - M_t) / T
      const A e_t = exp_(a);                                 // exp(-inf) = 0: a masked class
      st.d_t += e_t;                                         // d_t += exp(a_j)
      st.d_s += exp_(b);                                     // d_s += exp(b_j)
      // A += exp(a_j) (a_j - b_j), 0 where a_j == -inf (b_j == -inf < a_j gives +inf: KL = inf)
      st.a += a == neg_inf<A>() ? A(0) : e_t * (a - b);
      if constexpr (NEED1) st.d_1 += exp_(xs);               // d_1 += exp(s_j - M_s)
    }
  }

  // The target and s_y, read by rank 0 before the sweep (the load overlaps it).
  struct Aux {
    int64_t y = 0;
    A s_y = A(0);
  };
  AUGKD_HD static Aux row_aux(const Params& p, int64_t row) {
    Aux x;
    kd_read_target(p, row, x.y, x.s_y);
    return x;
  }
  AUGKD_HD static void finish(const Params& p, int64_t row, const State& s, const Aux& x) {
    kd_write_row<T, NEED1>(p, row, s, x.y, x.s_y);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Refinement of an ill-conditioned KL (second sweep; docs/ops-design.md, "Precision"): with
// rho_j = (a_j - b_j) - L_hat,
//   S0 = sum_j (p_t,j - p_s,j)     (formed with expm1: about the rounding of L_hat)
//   S2 = sum_j p_s,j phi(rho_j),   phi(x) = 1 + (x - 1) e^x >= 0 (every term >= 0: nothing cancels)
//   KL = S2 / (1 + S0) + h(S0),  L = L_hat + log1p(S0),  h(x) = x / (1 + x) - log1p(x)
// exactly, for any L_hat. phi comes from its Taylor series for |x| <= 0.25, from p_s + p_t (x - 1) beyond.
// ---------------------------------------------------------------------------------------------------------

template <typename A>
struct RefineState {
  A s0, s2;
  AUGKD_HD static RefineState identity() { return {A(0), A(0)}; }
  AUGKD_HD RefineState empty() const { return identity(); }
  template <typename F>
  AUGKD_HD static void for_each_sum(RefineState& a, const RefineState& b, F&& f) {
    f(a.s0, b.s0), f(a.s2, b.s2);
  }
};

// phi(x) = x^2 sum_{n=2..12} (n - 1) / n! x^(n - 2)   (|x| <= 0.25)
template <typename A>
AUGKD_HD A phi_series(A x) {
  A q = A(1.0 / 43545600);
  q = q * x + A(1.0 / 3991680);
  q = q * x + A(1.0 / 403200);
  q = q * x + A(1.0 / 45360);
  q = q * x + A(1.0 / 5760);
  q = q * x + A(1.0 / 840);
  q = q * x + A(1.0 / 144);
  q = q * x + A(1.0 / 30);
  q = q * x + A(1.0 / 8);
  q = q * x + A(1.0 / 3);
  q = q * x + A(0.5);
  return x * x * q;
}

// x / (1 + x) - log1p(x) (<= 0), by its series near 0 where the closed form cancels.
template <typename A>
AUGKD_HD A h_term(A x) {
  if (abs_(x) < A(1e-3)) return x * x * (A(-0.5) + x * (A(2.0 / 3) - A(0.75) * x));
  return x / (A(1) + x) - log1p_(x);
}

// Writes the refined KL, L and the row's loss.
template <typename T>
AUGKD_HD void kd_refine_write(const KdFwdParams<T>& p, int64_t row, const RefineState<acc_type<T>>& r) {
  using A = acc_type<T>;
  A* st = p.stats + row * kKdStats;
  const A l_hat = st[kLogDt] - st[kLogDs];
  A kl = r.s2 / (A(1) + r.s0) + h_term(r.s0);
  kl = kl < A(0) ? A(0) : kl;  // rounding only (S2 >= 0, h ~ -S0^2 / 2); NaN stays NaN
  st[kL] = l_hat + log1p_(r.s0);
  int64_t y;
  A s_y;
  kd_read_target(p, row, y, s_y);
  p.loss[row] = kd_row_loss(p, st, kl, y, s_y);
}

// The refine row op: a second sweep over the rows whose one-pass KL is ill-conditioned (the others are
// skipped at once); x = student, y = teacher.
template <typename T>
struct KdRefineVisitor : RowVisitor<T, KdFwdParams<T>, RefineState<acc_type<T>>, kKdUnroll, 2> {
  using A = acc_type<T>;
  using Params = KdFwdParams<T>;
  using State = RefineState<A>;
  A inv_t, cs, ct, log_ds, log_dt, l_hat;
  int fmt;
  State st;

  AUGKD_HD static KdRefineVisitor make(const Params& p, int64_t row) {
    const A* s = p.stats + row * kKdStats;
    return {{p.student + row * p.cols, p.teacher + row * p.cols}, p.inv_t, center_(s[kMs]), center_(s[kMt]),
            s[kLogDs], s[kLogDt], s[kLogDt] - s[kLogDs], p.fmt, State::identity()};
  }

  template <typename R>
  AUGKD_HD void apply(int64_t, const R& r) {
    constexpr int N = R::kN;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A b = (r.x[k] - cs) * inv_t;
      const A a = (teacher_logit(r.y[k], fmt) - ct) * inv_t;
      const A p_s = exp_(b - log_ds);
      const A p_t = exp_(a - log_dt);
      if (p_s + p_t == A(0)) continue;                     // absent from both distributions
      const A rho = (a - b) - l_hat;                         // log p_t - log p_s
      // p_t - p_s = p_s expm1(rho) (rho <= 0) or -p_t expm1(-rho) (rho > 0)
      st.s0 += rho <= A(0) ? p_s * expm1_(rho) : -p_t * expm1_(-rho);
      if (abs_(rho) <= A(kPhiSeriesMax)) {
        st.s2 += p_s * phi_series(rho);                      // p_s phi(rho)
      } else {
        st.s2 += p_s + (p_t == A(0) ? A(0) : p_t * (rho - A(1)));  // p_s + p_t (rho - 1)
      }
    }
  }

  AUGKD_HD static bool skip(const Params& p, int64_t row) { return !kd_needs_refine(p.stats + row * kKdStats); }
  AUGKD_HD static void finish(const Params& p, int64_t row, const State& s) { kd_refine_write(p, row, s); }
};

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct KdBwdParams : PairRows<T> {
  using A = acc_type<T>;
  const A* __restrict__ grad_loss;   // (rows,)
  const A* __restrict__ grad_lse_t;  // (rows,)
  const A* __restrict__ stats;       // (rows, 8): see KdStat
  T* __restrict__ grad_student;      // or nullptr (not requested)
  T* __restrict__ grad_teacher;      // or nullptr
  int64_t tile;       // columns per block in tile mode
  A temperature;
  A inv_t;            // 1 / T
  A ks;               // alpha * c / T
  A alpha_c;          // alpha * c
  A kce;              // 1 - alpha
  bool use_kl;        // alpha != 0
  bool use_ce;        // target given and alpha != 1
  bool t_is_one;      // T == 1: p_1 = p_s
  int fmt;
};

constexpr int kBwdUnroll = 2;

// The backward row op (row_sweep_kernel in kernels/row_reduce.cuh); x = student, y = teacher.
template <typename T>
struct KdBwdVisitor : RowVisitor<T, KdBwdParams<T>, void, kBwdUnroll, 2> {
  using A = acc_type<T>;
  using Params = KdBwdParams<T>;
  KdBwdParams<T> p;  // a copy: the compiler reads the fields from the parameter space
  T* __restrict__ gs_row;  // nullptr when not requested
  T* __restrict__ gt_row;
  A cs, ct, log_ds, log_dt, log_d1, mu, lc, g, g_lse;  // centred maxima, stats, upstream grads
  int64_t y;
  bool ignored;  // y == ignore_index: no student grad, no KL grad for the teacher
  bool bad;      // non-ignored target outside [0, C): the loss row is NaN, so is its student grad

  // The visitor of row `row`: its pointers, saved stats, upstream grads and target.
  AUGKD_HD static KdBwdVisitor make(const Params& p, int64_t row) {
    const int64_t off = row * p.cols;
    const A* st = p.stats + row * kKdStats;
    KdBwdVisitor v{{p.student + off, p.teacher + off}, p,
                   p.grad_student ? p.grad_student + off : nullptr,
                   p.grad_teacher ? p.grad_teacher + off : nullptr,
                   center_(st[kMs]), center_(st[kMt]), st[kLogDs], st[kLogDt], st[kLogD1], st[kMu], st[kL],
                   p.grad_loss[row], p.grad_lse_t[row], -1, false, false};
    if (p.target != nullptr) {
      v.y = p.target[row];
      v.ignored = v.y == p.ignore_index;
      v.bad = !v.ignored && (v.y < 0 || v.y >= p.cols);
    }
    return v;
  }

  template <typename R>
  AUGKD_HD void apply(int64_t j, const R& r) const {
    store_grad_pair<R::kN>(gs_row, gt_row, j, [&](int k, A& gs, A& gt) {
      const A xs = r.x[k] - cs;
      const A b = xs * p.inv_t;                                      // b = (s - M_s) / T
      const A a = (teacher_logit(r.y[k], p.fmt) - ct) * p.inv_t;     // a = (v - M_t) / T
      const A p_s = exp_(b - log_ds);                                // p_s = exp(b - log d_s)
      const A p_t = exp_(a - log_dt);                                // p_t = exp(a - log d_t)
      const A delta = a - b;
      const A rho = delta - lc;                                      // log p_t - log p_s
      if (gs_row != nullptr) {
        A d = A(0);
        if (!ignored) {
          // d loss / d s_j = alpha c / T (p_s - p_t) + (1 - alpha) (p_1 - [j == y])
          if (p.use_kl) {
            // p_s - p_t = -p_s expm1(rho) (rho <= 0) or p_t expm1(-rho): no cancellation at large T
            A diff = rho <= A(0) ? -p_s * expm1_(rho) : p_t * expm1_(-rho);
            if (p_s + p_t == A(0)) diff = A(0);                      // absent from both
            d = p.ks * diff;
          }
          if (p.use_ce) {
            const A p_1 = p.t_is_one ? p_s : exp_(xs - log_d1);      // p_1 = exp(s - M_s - log d_1)
            // p_1 - [j == y] formed in the compute type, rounded once at the store
            d += p.kce * (j + k == y ? p_1 - A(1) : p_1);
          }
          d = bad ? quiet_nan<A>() : g * d;                  // grad_student = g * d loss / d s
        }
        gs = d;
      }
      if (gt_row != nullptr) {
        // grad_lse_t * d lse_t / d w = grad_lse_t p_t; an ignored row without an energy gradient gets 0
        A dw = g_lse == A(0) ? A(0) : g_lse * p_t;
        if (!ignored && p.use_kl) {
          // d KL / d w_j = p_t (log p_t - log p_s - KL) = p_t ((a - b) - mu), 0 where p_t == 0
          const A dkl = p_t == A(0) ? A(0) : p_t * (delta - mu);
          dw += g * p.alpha_c * dkl;                         // + g alpha c dKL/dw
        }
        if (p.fmt == kProbs) {
          // w = log(t) / T: grad_t = dL/dw / (T t), 0 where t == 0 (an absent class) or where nothing
          // flows (an ignored row, whatever t holds)
          gt = (r.y[k] == A(0) || dw == A(0)) ? A(0) : dw / (p.temperature * r.y[k]);
        } else {
          gt = dw * p.inv_t;                              // w = t / T: grad_t = dL/dw / T
        }
      }
    });
  }
};

}  // namespace augkd::cuda
