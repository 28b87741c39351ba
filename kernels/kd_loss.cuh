// KD loss: forward (one online-softmax sweep per row) and backward (recompute from the saved stats).
// The math is docs/ops-design.md section 1; each computation below repeats its formula.
//
//   u = s / T,  w = v / T,  v = t (teacher_format 0 logits, 1 log_probs) or log(t) (2 probs)
//   KL_i = sum_j p_t (log p_t - log p_s),  CE_i = logsumexp(s) - s_y,  c = T^2 or 1
//   loss_i = alpha c KL_i + (1 - alpha) CE_i   (no target: alpha c KL_i; 0 for ignored rows;
//                                               NaN for a non-ignored target outside [0, C))
// A term whose weight is exactly 0 (alpha == 0 for KL, alpha == 1 for CE) is left out, as in the
// torch reference, so an infinite KL or CE does not become 0 * inf = NaN.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

enum TeacherFormat : int { kLogits = 0, kLogProbs = 1, kProbs = 2 };

// Per-thread (then per-row) online state of one KD row.
template <typename A, bool NEED1>
struct KdState {
  A m_s, d_s;  // running max of u and d_s = sum_j exp(u_j - m_s)
  A m_t, d_t;  // running max of w and d_t = sum_j exp(w_j - m_t)
  A a;         // A = sum_j exp(w_j - m_t) * ((w_j - m_t) - (u_j - m_s)), 0 where w_j == -inf
  A m_1, d_1;  // online softmax of s itself (CE at temperature 1), used only when NEED1

  AUGKD_HD static KdState identity() {
    return {neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0), neg_inf<A>(), A(0)};
  }

  // Re-measure the state from larger maxima M_s >= m_s, M_t >= m_t, M_1 >= m_1:
  //   dt = M_t - m_t, ds = M_s - m_s, r = exp(-dt)
  //   A   <- r * (A + d_t * (ds - dt))
  //   d_t <- r * d_t,   d_s <- exp(-ds) * d_s,   d_1 <- exp(-(M_1 - m_1)) * d_1
  // While m_t is still -inf, d_t and A are 0 (or NaN from a NaN input) and are kept as they are
  // (r = 0 in the doc's words; keeping them also keeps a NaN). shift/rescale return 0 / 1 when a
  // maximum did not move, so -inf -> -inf never computes -inf - -inf.
  AUGKD_HD void rebase(A M_s, A M_t, A M_1) {
    const A ds = shift(m_s, M_s);
    const A dt = shift(m_t, M_t);
    if (m_t != neg_inf<A>()) {
      const A r = rescale(m_t, M_t);
      a = r * (a + d_t * (ds - dt));
      d_t = r * d_t;
    }
    d_s = rescale(m_s, M_s) * d_s;
    m_s = M_s;
    m_t = M_t;
    if constexpr (NEED1) {
      d_1 = rescale(m_1, M_1) * d_1;
      m_1 = M_1;
    }
  }

  // Merging two partial states is the same rescaling applied to both, then a sum.
  AUGKD_HD void merge(const KdState& o) {
    const A M_s = max_(m_s, o.m_s);
    const A M_t = max_(m_t, o.m_t);
    const A M_1 = NEED1 ? max_(m_1, o.m_1) : m_1;
    KdState b = o;
    b.rebase(M_s, M_t, M_1);
    rebase(M_s, M_t, M_1);
    d_s += b.d_s;
    d_t += b.d_t;
    a += b.a;
    if constexpr (NEED1) d_1 += b.d_1;
  }

  __device__ __forceinline__ KdState shfl_xor(int m) const {
    KdState o;
    o.m_s = __shfl_xor_sync(kFullMask, m_s, m);
    o.d_s = __shfl_xor_sync(kFullMask, d_s, m);
    o.m_t = __shfl_xor_sync(kFullMask, m_t, m);
    o.d_t = __shfl_xor_sync(kFullMask, d_t, m);
    o.a = __shfl_xor_sync(kFullMask, a, m);
    if constexpr (NEED1) {
      o.m_1 = __shfl_xor_sync(kFullMask, m_1, m);
      o.d_1 = __shfl_xor_sync(kFullMask, d_1, m);
    } else {
      o.m_1 = m_1;
      o.d_1 = d_1;
    }
    return o;
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
struct KdFwdParams {
  using A = acc_type<T>;
  const T* __restrict__ student;   // (rows, cols)
  const T* __restrict__ teacher;   // (rows, cols)
  const int64_t* __restrict__ target;  // (rows,) or nullptr
  A* __restrict__ loss;            // (rows,)
  A* __restrict__ stats;           // (rows, 4): lse_s, lse_t, lse_1, KL
  int64_t rows, cols, ignore_index;
  A inv_t;            // 1 / T
  A alpha_c;          // alpha * c, c = T^2 if t2_scale else 1
  A one_minus_alpha;  // 1 - alpha
  bool use_kl;        // alpha != 0
  bool use_ce;        // target given and alpha != 1
  int fmt;            // teacher_format
};

// Folds a row range into a KdState (see sweep_range for the load/apply protocol).
template <typename T, bool NEED1>
struct KdFwdVisitor {
  using A = acc_type<T>;
  const T* __restrict__ s_row;
  const T* __restrict__ t_row;
  A inv_t;
  int fmt;
  KdState<A, NEED1> st;

  template <int N>
  struct Regs {
    A s[N];
    A t[N];
  };

  template <int N>
  AUGKD_HD void load(int64_t j, Regs<N>& r) const {
    load_n<N>(s_row + j, r.s);
    load_n<N>(t_row + j, r.t);
  }

  template <int N>
  AUGKD_HD void apply(int64_t, const Regs<N>& r) {
    A u[N], w[N];
    A cm_s = neg_inf<A>(), cm_t = neg_inf<A>(), cm_1 = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k) {
      u[k] = r.s[k] * inv_t;                         // u = s / T
      w[k] = teacher_logit(r.t[k], fmt) * inv_t;     // w = v / T
      cm_s = max_(cm_s, u[k]);
      cm_t = max_(cm_t, w[k]);
      if constexpr (NEED1) cm_1 = max_(cm_1, r.s[k]);
    }
    // Raise the running maxima to include this chunk (one rescale per chunk, rarely taken).
    const A M_s = max_(st.m_s, cm_s);
    const A M_t = max_(st.m_t, cm_t);
    const A M_1 = NEED1 ? max_(st.m_1, cm_1) : st.m_1;
    if (M_s != st.m_s || M_t != st.m_t || (NEED1 && M_1 != st.m_1)) st.rebase(M_s, M_t, M_1);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const bool w_masked = w[k] == neg_inf<A>();
      const bool u_masked = u[k] == neg_inf<A>();
      const A e_t = w_masked ? A(0) : exp_(w[k] - st.m_t);   // exp(w_j - m_t), 0 for w_j == -inf
      const A e_s = u_masked ? A(0) : exp_(u[k] - st.m_s);   // exp(u_j - m_s), 0 for u_j == -inf
      st.d_t += e_t;                                         // d_t += exp(w_j - m_t)
      st.d_s += e_s;                                         // d_s += exp(u_j - m_s)
      // u_j - m_s, written -inf for u_j == -inf (m_s may still be -inf: never -inf - -inf)
      const A lu = u_masked ? neg_inf<A>() : u[k] - st.m_s;
      // A += exp(w_j - m_t) * ((w_j - m_t) - (u_j - m_s)), 0 where w_j == -inf
      st.a += w_masked ? A(0) : e_t * ((w[k] - st.m_t) - lu);
      if constexpr (NEED1) {
        st.d_1 += r.s[k] == neg_inf<A>() ? A(0) : exp_(r.s[k] - st.m_1);  // d_1 += exp(s_j - m_1)
      }
    }
  }
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

// Turns the merged state of a whole row into its loss and stats.
template <typename T, bool NEED1>
AUGKD_HD void kd_write_row(const KdFwdParams<T>& p, int64_t row, const KdState<acc_type<T>, NEED1>& st, int64_t y,
                           acc_type<T> s_y) {
  using A = acc_type<T>;
  const A log_ds = log_(st.d_s);
  const A log_dt = log_(st.d_t);
  const A lse_s = st.m_s + log_ds;                 // lse_s = m_s + log d_s
  const A lse_t = st.m_t + log_dt;                 // lse_t = m_t + log d_t
  const A kl = st.a / st.d_t - log_dt + log_ds;    // KL = A / d_t - log d_t + log d_s
  A lse_1 = A(0);                                  // lse_1 = 0 when target is None
  if (p.target != nullptr) {
    if constexpr (NEED1) {
      lse_1 = st.m_1 + log_(st.d_1);               // lse_1 = logsumexp(s) = m_1 + log d_1
    } else {
      lse_1 = lse_s;                               // T == 1: logsumexp(s) = lse_s
    }
  }
  A loss;
  const A kl_term = p.use_kl ? p.alpha_c * kl : A(0);  // alpha * c * KL (left out when alpha == 0)
  if (p.target == nullptr) {
    loss = kl_term;
  } else if (y == p.ignore_index) {
    loss = A(0);
  } else if (y < 0 || y >= p.cols) {
    loss = quiet_nan<A>();                         // non-ignored target outside [0, C): NaN row
  } else {
    // + (1 - alpha) * CE, CE = lse_1 - s_y (left out when alpha == 1)
    loss = kl_term + (p.use_ce ? p.one_minus_alpha * (lse_1 - s_y) : A(0));
  }
  p.loss[row] = loss;
  A* st_row = p.stats + row * 4;
  st_row[0] = lse_s;
  st_row[1] = lse_t;
  st_row[2] = lse_1;
  st_row[3] = kl;
}

// NEED1: the CE needs its own logsumexp(s) (target given and T != 1).
template <typename T, RowMode MODE, bool NEED1>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
    kd_loss_fwd_kernel(const KdFwdParams<T> p, int64_t part_cols, KdState<acc_type<T>, NEED1>* ws) {
  using A = acc_type<T>;
  using State = KdState<A, NEED1>;
  __shared__ State smem[MODE == RowMode::kWarp ? 1 : kWarp];
  const RowGroup<MODE> grp(part_cols);

  for (int64_t row = grp.row0; row < p.rows; row += grp.stride) {
    const T* s_row = p.student + row * p.cols;
    const T* t_row = p.teacher + row * p.cols;

    // Rank 0 reads the target and s_y first, so the load overlaps the sweep.
    int64_t y = 0;
    A s_y = A(0);
    if (MODE != RowMode::kSplit && grp.rank == 0) kd_read_target(p, row, y, s_y);

    KdFwdVisitor<T, NEED1> v{s_row, t_row, p.inv_t, p.fmt, State::identity()};
    sweep_range<kVec<T>, kKdUnroll>(s_row, grp.begin, grp.end(p.cols), grp.rank, grp.size, v);
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
        kd_write_row<T, NEED1>(p, row, st, y, s_y);
      }
    }
  }
}

// Split mode, second step: one thread per row folds the row's `parts` partial states in order
// (deterministic) and writes the loss and stats.
template <typename T, bool NEED1>
__global__ void kd_loss_fwd_merge_kernel(const KdFwdParams<T> p, int64_t parts,
                                         const KdState<acc_type<T>, NEED1>* __restrict__ ws) {
  using A = acc_type<T>;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    KdState<A, NEED1> st = ws[row * parts];
    for (int64_t k = 1; k < parts; ++k) st.merge(ws[row * parts + k]);
    int64_t y;
    A s_y;
    kd_read_target(p, row, y, s_y);
    kd_write_row<T, NEED1>(p, row, st, y, s_y);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct KdBwdParams {
  using A = acc_type<T>;
  const A* __restrict__ grad_loss;   // (rows,)
  const A* __restrict__ grad_lse_t;  // (rows,)
  const T* __restrict__ student;
  const T* __restrict__ teacher;
  const int64_t* __restrict__ target;  // or nullptr
  const A* __restrict__ stats;       // (rows, 4): lse_s, lse_t, lse_1, KL
  T* __restrict__ grad_student;      // or nullptr (not requested)
  T* __restrict__ grad_teacher;      // or nullptr
  int64_t rows, cols, ignore_index;
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

template <typename T>
struct KdBwdVisitor {
  using A = acc_type<T>;
  KdBwdParams<T> p;  // a copy: the compiler reads the fields from the parameter space
  const T* __restrict__ s_row;
  const T* __restrict__ t_row;
  T* __restrict__ gs_row;  // nullptr when not requested
  T* __restrict__ gt_row;
  A lse_s, lse_t, lse_1, kl, g, g_lse;
  int64_t y;
  bool ignored;  // y == ignore_index: no student grad, no KL grad for the teacher
  bool bad;      // non-ignored target outside [0, C): the loss row is NaN, so is its student grad

  template <int N>
  struct Regs {
    A s[N];
    A t[N];
  };

  template <int N>
  AUGKD_HD void load(int64_t j, Regs<N>& r) const {
    load_n<N>(s_row + j, r.s);
    load_n<N>(t_row + j, r.t);
  }

  template <int N>
  AUGKD_HD void apply(int64_t j, const Regs<N>& r) const {
    A gs[N], gt[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A u = r.s[k] * p.inv_t;                          // u = s / T
      const A w = teacher_logit(r.t[k], p.fmt) * p.inv_t;    // w = v / T
      const A log_ps = u - lse_s;                            // log p_s = u - lse_s
      const A log_pt = w - lse_t;                            // log p_t = w - lse_t
      const A p_s = exp_(log_ps);
      const A p_t = exp_(log_pt);
      if (gs_row != nullptr) {
        A d = A(0);
        if (!ignored) {
          // d loss / d s_j = alpha c / T (p_s - p_t) + (1 - alpha) (p_1 - [j == y])
          if (p.use_kl) d = p.ks * (p_s - p_t);
          if (p.use_ce) {
            const A p_1 = p.t_is_one ? p_s : exp_(r.s[k] - lse_1);   // p_1 = exp(s - lse_1)
            // p_1 - [j == y] formed in the compute type, rounded once at the store
            d += p.kce * (j + k == y ? p_1 - A(1) : p_1);
          }
          d = bad ? quiet_nan<A>() : g * d;                  // grad_student = g * d loss / d s
        }
        gs[k] = d;
      }
      if (gt_row != nullptr) {
        A dw = g_lse * p_t;                                  // grad_lse_t * d lse_t / d w = grad_lse_t p_t
        if (!ignored && p.use_kl) {
          // d KL / d w_j = p_t (log p_t - log p_s - KL), 0 where p_t == 0
          const A dkl = p_t == A(0) ? A(0) : p_t * (log_pt - log_ps - kl);
          dw += g * p.alpha_c * dkl;                         // + g alpha c dKL/dw
        }
        if (p.fmt == kProbs) {
          // w = log(t) / T: grad_t = dL/dw / (T t), 0 where t == 0
          gt[k] = r.t[k] == A(0) ? A(0) : dw / (p.temperature * r.t[k]);
        } else {
          gt[k] = dw * p.inv_t;                              // w = t / T: grad_t = dL/dw / T
        }
      }
    }
    if (gs_row != nullptr) store_n<N>(gs_row + j, gs);
    if (gt_row != nullptr) store_n<N>(gt_row + j, gt);
  }
};

constexpr int kBwdUnroll = 2;

// The visitor of row `row`: its pointers, saved stats, upstream grads and target (the kernel below and
// the host emulation in tests/cuda_emulation build it the same way, here).
template <typename T>
AUGKD_HD KdBwdVisitor<T> kd_bwd_visitor(const KdBwdParams<T>& p, int64_t row) {
  const int64_t off = row * p.cols;
  KdBwdVisitor<T> v{p, p.student + off, p.teacher + off,
                    p.grad_student ? p.grad_student + off : nullptr,
                    p.grad_teacher ? p.grad_teacher + off : nullptr,
                    p.stats[row * 4 + 0], p.stats[row * 4 + 1], p.stats[row * 4 + 2], p.stats[row * 4 + 3],
                    p.grad_loss[row], p.grad_lse_t[row], -1, false, false};
  if (p.target != nullptr) {
    v.y = p.target[row];
    v.ignored = v.y == p.ignore_index;
    v.bad = !v.ignored && (v.y < 0 || v.y >= p.cols);
  }
  return v;
}

// TILE = true: blockIdx.x is a tile of p.tile columns, blockIdx.y (looping by gridDim.y) a row; the
// block's threads share the tile (many blocks per row: long rows with few rows still fill the GPU).
// TILE = false: one warp per row, blockDim = (32, kRowWarps), rows loop with gridDim.x * kRowWarps.
template <typename T, bool TILE>
__global__ void __launch_bounds__(kTileThreads, 1) kd_loss_bwd_kernel(const KdBwdParams<T> p) {
  using A = acc_type<T>;
  const int rank = threadIdx.x;
  const int size = TILE ? blockDim.x : kWarp;
  const int64_t row0 = TILE ? blockIdx.y : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t stride = TILE ? gridDim.y : static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t begin = TILE ? static_cast<int64_t>(blockIdx.x) * p.tile : 0;
  const int64_t end = TILE ? min(p.cols, begin + p.tile) : p.cols;

  for (int64_t row = row0; row < p.rows; row += stride) {
    KdBwdVisitor<T> v = kd_bwd_visitor(p, row);
    sweep_range<kVec<T>, kBwdUnroll>(p.student + row * p.cols, begin, end, rank, size, v);
  }
}

}  // namespace augkd::cuda
