// KD loss, CPU: augkd::kd_loss_fwd / augkd::kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 1).
//
// Per row, with u = s / T, w = v / T (v = t for logits / log-probs, v = log t for probs):
//   p_s = softmax(u), p_t = softmax(w), KL = sum p_t (log p_t - log p_s), CE = logsumexp(s) - s_y
//   loss = alpha * c * KL + (1 - alpha) * CE      (c = T^2 if t2_scale; 0 for ignored rows)
// Every exponent is measured from a raw row maximum: a = (v - M_t) / T, b = (s - M_s) / T, so that a
// large common offset of the logits never rounds a logsumexp (docs/ops-design.md, "Precision").
// Forward: rows in parallel; each row is swept in blocks of kRowBlock classes. A block is read once for its
// maxima (max_j s, max_j v), then re-read from L1 for the sums against the updated running maxima:
//   d_s = sum exp(b), d_t = sum exp(a), d_1 = sum exp(s - M_s),
//   A   = sum exp(a) (a - b)            (0 where a == -inf)
// and across blocks the online rules of the doc (A <- r (A + d_t (shift_s - shift_t)), d <- r d).
// KL = A / d_t - log d_t + log d_s when that is well conditioned; otherwise (large T, nearly equal
// distributions) a second sweep computes it as sum p_s phi(rho) (kd_refine_row).
// stats = [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L]: mu = E_pt[a - b] = A / d_t (one pass),
// L = log d_t - log d_s (refined). KL = mu - L; the backward needs rho - KL = (a - b) - mu, which mu gives
// without the cancellation of two O(1) numbers (masked classes at a large T).
// Rows with C <= kRowBlock are therefore the plain two-pass scheme over a cached row. Pass 2 prefetches the
// next block (or row), so pass 1 of that block finds it in cache.
// Backward: one sweep per row recomputing p_s = exp(b - log d_s), p_t = exp(a - log d_t),
// rho = (a - b) - L, p_1 = exp(s - M_s - log d_1):
//   p_s - p_t = -p_s expm1(rho) (rho <= 0) or p_t expm1(-rho) (rho > 0)      (no cancellation at large T)
//   grad_s = g (alpha c / T (p_s - p_t) + (1 - alpha) (p_1 - [j == y]))      (0 for ignored rows)
//   dL/dw  = g alpha c p_t ((a - b) - mu) [not ignored] + g_lse_t p_t        (0 where p_t == 0)
//   grad_t = dL/dw / T (logits, log-probs),  dL/dw / (T t) with 0 where t == 0 (probs)
// The target entry of grad_s is recomputed in scalar precision afterwards so that p_1_y - 1 is formed
// before the single rounding to the output dtype.
#include "cpu/vec_utils.h"  // first: see the note on warnings there

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "op_checks.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cpu {
namespace {

constexpr int64_t kProbs = 2;  // teacher_format: 0 logits, 1 log-probs (same math), 2 probs
// The one-pass KL is kept when it exceeds this fraction of the magnitude of its terms (so its relative
// rounding error stays below ~64 roundings); otherwise a second sweep recomputes it (kd_refine_row).
// The same rule in every backend (augkd/ops/reference.py REFINE_RATIO).
constexpr double kRefineRatio = 1.0 / 64;

template <typename A>
struct KdParams {
  A inv_t;        // 1 / T
  A alpha;
  A c;            // T^2 or 1
  int64_t ignore_index;
  bool has_target;
};

// Per-row statistics of the forward (the columns of `stats`, see the header).
enum Stat : int { kMs = 0, kLseT, kMt, kLogDs, kLogDt, kLogD1, kMu, kL, kNumStats };

// phi(x) = x^2 (c_2 + c_3 x + ... + c_12 x^10), c_n = (n - 1) / n!: 1 + (x - 1) e^x for |x| <= 0.25.
template <typename A>
inline Vec<A> phi_series(const Vec<A>& x) {
  constexpr A c[] = {A(1.0 / 2), A(1.0 / 3), A(1.0 / 8), A(1.0 / 30), A(1.0 / 144), A(1.0 / 840),
                     A(1.0 / 5760), A(1.0 / 45360), A(1.0 / 403200), A(1.0 / 3991680), A(1.0 / 43545600)};
  Vec<A> p(c[10]);
  for (int k = 9; k >= 0; --k) p = at::vec::fmadd(p, x, Vec<A>(c[k]));
  return x * x * p;
}

// x / (1 + x) - log1p(x), by its series near 0 (where the closed form cancels).
template <typename A>
inline A h_term(A x) {
  if (std::abs(x) < A(1e-3)) return x * x * (A(-0.5) + x * (A(2.0 / 3) - A(0.75) * x));
  return x / (A(1) + x) - std::log1p(x);
}

// Second sweep of a row whose one-pass KL is ill-conditioned: with rho = (a - b) - L_hat,
//   S0 = sum (p_t - p_s) (from expm1: the rounding of L_hat), S2 = sum p_s phi(rho) (every term >= 0),
//   KL = S2 / (1 + S0) + h(S0), L = L_hat + log1p(S0)          (exact for any L_hat; docs "Precision").
// Returns the KL; writes the refined L into st.
template <typename scalar_t, bool PROBS>
inline acc_t<scalar_t> kd_refine_row(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t C,
                                     acc_t<scalar_t> inv_t, acc_t<scalar_t>* st) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  const A cms = center(st[kMs]), cmt = center(st[kMt]);
  const A log_ds = st[kLogDs], log_dt = st[kLogDt], l_hat = log_dt - log_ds;
  const V v_inv_t(inv_t), v_cms(cms), v_cmt(cmt), v_lds(log_ds), v_ldt(log_dt), v_lh(l_hat);
  const V v_zero(A(0)), v_one(A(1)), v_small(A(0.25));
  V vs0(A(0)), vs2(A(0));
  vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
    const V sv = load(s + j, n, neg_inf<A>());
    const V tv = load(t + j, n, PROBS ? A(0) : neg_inf<A>());
    const V b = (sv - v_cms) * v_inv_t;
    const V a = ((PROBS ? vlog(tv) : tv) - v_cmt) * v_inv_t;
    const V ps = vexp(b - v_lds);
    const V pt = vexp(a - v_ldt);
    const V both = ps + pt;  // == 0: the class is absent from both distributions
    const V rho = (a - b) - v_lh;
    const V e = (-rho.abs()).expm1();
    V t0 = V::blendv(-pt * e, ps * e, rho <= v_zero);  // p_t - p_s
    t0 = zero_where_eq(t0, both, v_zero);
    const V big = ps + zero_where_eq(pt * (rho - v_one), pt, v_zero);
    const V small_mask = rho.abs() <= v_small;
    const V rs = V::blendv(v_zero, rho, small_mask);
    V t2 = V::blendv(big, ps * phi_series(rs), small_mask);
    t2 = zero_where_eq(t2, both, v_zero);
    vs0 += t0;
    vs2 += t2;
  });
  const A s0 = hsum(vs0), s2 = hsum(vs2);
  const A kl = s2 / (A(1) + s0) + h_term(s0);
  st[kL] = l_hat + std::log1p(s0);
  return kl < A(0) ? A(0) : kl;  // rounding only (S2 >= 0, h ~ -S0^2 / 2); NaN stays NaN
}

// Forward of one row: fills st[0 .. kNumStats) (lse_t from M_t / T + log d_t; log d_1 only when LSE1) and
// returns the KL.
template <typename scalar_t, bool PROBS, bool LSE1>
inline acc_t<scalar_t> kd_fwd_row(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t C,
                       acc_t<scalar_t> inv_t, acc_t<scalar_t>* st) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = neg_inf<A>();
  const V v_inv_t(inv_t);
  const V v_neg_inf(kNegInf);

  A ms = kNegInf;   // running max of s (b = (s - M_s) / T; also the shift of the CE's sum)
  A mt = kNegInf;   // running max of v
  A d_s = 0, d_t = 0, d_1 = 0, acc = 0;

  for (int64_t b0 = 0; b0 < C; b0 += kRowBlock) {
    const int64_t b1 = std::min(C, b0 + kRowBlock);
    // pass 1 over the block: maxima (a NaN either ends up in them or reaches the sums through vexp)
    V vms(kNegInf), vmt(kNegInf);
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      vms = vmax(vms, load(s + j, n, kNegInf));
      vmt = vmax(vmt, load(t + j, n, kNegInf));
    });
    const A new_ms = nan_max(ms, hmax(vms));
    const A new_mtr = hmax(vmt);
    const A new_mt = nan_max(mt, PROBS ? std::log(new_mtr) : new_mtr);

    // rescale the sums of the earlier blocks to the new maxima
    const A cs = center(new_ms), ct = center(new_mt);
    const A shift_s = (cs - center(ms)) * inv_t, shift_t = (ct - center(mt)) * inv_t;
    const A r_s = ms == kNegInf ? A(0) : std::exp(-shift_s);
    const A r_t = mt == kNegInf ? A(0) : std::exp(-shift_t);
    acc = r_t * (acc + d_t * (shift_s - shift_t));
    d_t *= r_t;
    d_s *= r_s;
    if constexpr (LSE1) d_1 *= ms == kNegInf ? A(0) : std::exp(-(cs - center(ms)));
    ms = new_ms;
    mt = new_mt;

    // pass 2 over the (cached) block: sums against the new maxima
    const V v_cs(cs), v_ct(ct);
    V vds(A(0)), vdt(A(0)), vd1(A(0)), vacc(A(0));
    const int64_t ahead = b1 - b0;  // the next block's data, fetched while this one computes
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      prefetch(s + j + ahead);
      prefetch(t + j + ahead);
      const V sv = load(s + j, n, kNegInf);
      const V tv = load(t + j, n, PROBS ? A(0) : kNegInf);
      const V xs = sv - v_cs;
      const V xb = xs * v_inv_t;                                      // b
      const V xa = ((PROBS ? vlog(tv) : tv) - v_ct) * v_inv_t;       // a
      const V es = vexp(xb);
      const V et = vexp(xa);
      vds += es;
      vdt += et;
      vacc += zero_where_eq(et * (xa - xb), xa, v_neg_inf);
      if constexpr (LSE1) vd1 += vexp(xs);
    });
    d_s += hsum(vds);
    d_t += hsum(vdt);
    acc += hsum(vacc);
    if constexpr (LSE1) d_1 += hsum(vd1);
  }
  const A log_ds = std::log(d_s), log_dt = std::log(d_t);
  const A mean_delta = acc / d_t;  // E_pt[a - b]
  const A kl = mean_delta - log_dt + log_ds;
  st[kMs] = ms;
  st[kMt] = mt;
  st[kLseT] = center(mt) * inv_t + log_dt;
  st[kLogDs] = log_ds;
  st[kLogDt] = log_dt;
  st[kLogD1] = LSE1 ? std::log(d_1) : log_ds;
  st[kMu] = std::isnan(log_ds) ? log_ds : mean_delta;  // a NaN student (also where p_t = 0) reaches mu
  st[kL] = log_dt - log_ds;
  // one-pass KL: a difference of terms of this size; keep it when the rounding is far below the result
  const A magnitude = std::abs(mean_delta) + std::abs(log_dt) + std::abs(log_ds) + A(1);
  if (kl < magnitude * A(kRefineRatio)) return kd_refine_row<scalar_t, PROBS>(s, t, C, inv_t, st);
  return kl;
}

// Backward of one row. gs / gt: grad rows (written when SG / TG). gs may be s and gt may be t (kd_loss_grad_
// writes the gradients over the logits): every element is read before the same element is written, and the
// target entry's inputs are read before the sweep.
template <typename scalar_t, bool PROBS, bool SG, bool TG, bool P1>
inline void kd_bwd_row(const scalar_t* s, const scalar_t* t, scalar_t* gs, scalar_t* gt, int64_t C,
                       const KdParams<acc_t<scalar_t>>& prm, acc_t<scalar_t> g, acc_t<scalar_t> g_lse_t,
                       const acc_t<scalar_t>* st, int64_t y) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  const bool ignored = prm.has_target && y == prm.ignore_index;
  const bool y_valid = y >= 0 && y < C;
  const A s_y = y_valid ? static_cast<A>(s[y]) : A(0);
  const A t_y = y_valid ? static_cast<A>(t[y]) : A(1);
  const A cms = center(st[kMs]), cmt = center(st[kMt]);
  const A log_ds = st[kLogDs], log_dt = st[kLogDt], log_d1 = st[kLogD1], mu = st[kMu], lc = st[kL];
  const A ks = ignored ? A(0) : g * prm.alpha * prm.c * prm.inv_t;               // on (p_s - p_t)
  const A k1 = (ignored || !prm.has_target) ? A(0) : g * (A(1) - prm.alpha);     // on (p_1 - onehot)
  const A kt = g * prm.alpha * prm.c;                                             // on dKL/dw
  const bool student = SG && !ignored;
  if (SG && ignored) {
    vec_loop<W>(0, C, [&](int64_t j, int64_t n) { store(gs + j, V(A(0)), n); });
  }
  if (SG && !ignored && prm.has_target && (y < 0 || y >= C)) {  // invalid label: a NaN gradient row
    vec_loop<W>(0, C, [&](int64_t j, int64_t n) { store(gs + j, V(std::numeric_limits<A>::quiet_NaN()), n); });
    if (!TG) return;
  }
  const bool kl_term = prm.alpha != A(0);  // alpha == 0 leaves the KL term out of both gradients
  // an ignored row's teacher gets only the energy's gradient: none (0, whatever the row holds) without one
  const bool teacher_kl = !ignored && kl_term;
  if (!student && !TG) return;
  if (!student && TG && !teacher_kl && g_lse_t == A(0)) {
    vec_loop<W>(0, C, [&](int64_t j, int64_t n) { store(gt + j, V(A(0)), n); });
    return;
  }

  const V v_inv_t(prm.inv_t), v_cms(cms), v_cmt(cmt), v_lds(log_ds), v_ldt(log_dt), v_ld1(log_d1), v_lc(lc);
  const V v_mu(mu), v_ks(ks), v_k1(k1), v_kt(kt), v_glt(g_lse_t), v_zero(A(0));
  vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
    const V sv = load(s + j, n, A(0));
    const V tv = load(t + j, n, A(1));
    const V xs = sv - v_cms;
    const V b = xs * v_inv_t;
    const V a = ((PROBS ? vlog(tv) : tv) - v_cmt) * v_inv_t;
    const V ps = vexp(b - v_lds);
    const V pt = vexp(a - v_ldt);
    const V delta = a - b;
    const V rho = delta - v_lc;  // log p_t - log p_s, accurate to the rounding of a and b
    if (SG && student && (y >= 0 || !prm.has_target) && (y < C || !prm.has_target)) {
      V r = v_zero;
      if (kl_term) {
        const V e = (-rho.abs()).expm1();
        V diff = V::blendv(pt * e, -ps * e, rho <= v_zero);  // p_s - p_t
        diff = zero_where_eq(diff, ps + pt, v_zero);          // absent from both: 0, not expm1(NaN)
        r = v_ks * diff;
      }
      if (k1 != A(0)) {
        const V p1 = P1 ? vexp(xs - v_ld1) : ps;
        r = at::vec::fmadd(v_k1, p1, r);
      }
      store(gs + j, r, n);
    }
    if constexpr (TG) {
      V dw = g_lse_t != A(0) ? v_glt * pt : v_zero;
      // dKL/dw = p_t (rho - KL) = p_t ((a - b) - mu)
      if (teacher_kl) dw = at::vec::fmadd(v_kt, zero_where_eq(pt * (delta - v_mu), pt, v_zero), dw);
      V r = dw * v_inv_t;
      if constexpr (PROBS) r = zero_where_eq(r / tv, tv, v_zero);
      store(gt + j, r, n);
    }
  });

  // target entry: recompute in acc precision with the -1 before the single rounding
  if (SG && student && k1 != A(0) && y_valid) {
    const A xs = s_y - cms;
    const A b = xs * prm.inv_t;
    const A ty = t_y;
    const A a = ((PROBS ? std::log(ty) : ty) - cmt) * prm.inv_t;
    const A ps = std::exp(b - log_ds);
    const A pt = std::exp(a - log_dt);
    const A rho = (a - b) - lc;
    A diff = rho <= A(0) ? -ps * std::expm1(rho) : pt * std::expm1(-rho);
    if (ps + pt == A(0)) diff = A(0);
    const A p1 = P1 ? std::exp(xs - log_d1) : ps;
    gs[y] = static_cast<scalar_t>((kl_term ? ks * diff : A(0)) + k1 * (p1 - A(1)));
  }
}

// A row's loss from its KL and forward stats: alpha c KL + (1 - alpha) CE; 0 for an ignored row, NaN for a label
// outside [0, C). A term whose weight is exactly 0 is left out (an infinite KL or CE must not give 0 * inf).
template <typename scalar_t>
inline acc_t<scalar_t> kd_row_loss(acc_t<scalar_t> kl, const acc_t<scalar_t>* st, const scalar_t* s, int64_t C,
                                   acc_t<scalar_t> a, acc_t<scalar_t> c, int64_t y, bool has_target,
                                   int64_t ignore_index) {
  using A = acc_t<scalar_t>;
  A row_loss = a != A(0) ? a * c * kl : A(0);
  if (has_target) {
    if (y == ignore_index) {
      row_loss = A(0);
    } else if (y < 0 || y >= C) {
      row_loss = std::numeric_limits<A>::quiet_NaN();  // invalid label: a NaN row, no OOB read
    } else if (a != A(1)) {
      // CE = (M_s - s_y) + log d_1: no rounding of a large logsumexp
      row_loss += (A(1) - a) * ((st[kMs] - static_cast<A>(s[y])) + st[kLogD1]);
    }
  }
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(AUGKD_KD_LOSS_FWD_PARAMS) {
  checks::check_kd_loss_fwd(student, teacher, target, temperature, alpha, teacher_format);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor loss = row_output(student, {B});
  at::Tensor stats = row_output(student, {B, kNumStats});
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);
  const bool lse1_separate = has_target && temperature != 1.0;
  // On the CPU a bad label can be reported without a device sync: raise the front-end's ValueError here
  // (the Python check is skipped for this backend; GPU kernels give a NaN row instead).
  checks::check_labels("kd_loss", target, C, ignore_index);

  AUGKD_CPU_DISPATCH(student, "kd_loss_fwd_cpu", {
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
    A* loss_ptr = loss.mutable_data_ptr<A>();
    A* stats_ptr = stats.mutable_data_ptr<A>();
    const A inv_t = static_cast<A>(1.0 / temperature);
    const A a = static_cast<A>(alpha);
    const A c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    with_bool(teacher_format == kProbs, [&](auto probs) {
      with_bool(lse1_separate, [&](auto lse1) {
        for_each_row(B, C, [&](int64_t i) {
          const scalar_t* s = s_ptr + i * C;
          A* st = stats_ptr + kNumStats * i;
          const A kl =
              kd_fwd_row<scalar_t, decltype(probs)::value, decltype(lse1)::value>(s, t_ptr + i * C, C, inv_t, st);
          loss_ptr[i] = kd_row_loss(kl, st, s, C, a, c, has_target ? y_ptr[i] : int64_t(-1), has_target,
                                    ignore_index);
        });
      });
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cpu(AUGKD_KD_LOSS_BWD_PARAMS) {
  checks::check_kd_loss_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
                            teacher_format);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor grad_s = student_grad ? new_output_like(student) : unused_grad(student);
  at::Tensor grad_t = teacher_grad ? new_output_like(teacher) : unused_grad(teacher);
  if (!student_grad && !teacher_grad) return {grad_s, grad_t};
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);

  AUGKD_CPU_DISPATCH(student, "kd_loss_bwd_cpu", {
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
    scalar_t* gs_ptr = student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_ptr = teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    const A* g_ptr = grad_loss.const_data_ptr<A>();
    const A* glt_ptr = grad_lse_t.const_data_ptr<A>();
    const A* st_ptr = stats.const_data_ptr<A>();
    const KdParams<A> prm{static_cast<A>(1.0 / temperature), static_cast<A>(alpha),
                          static_cast<A>(t2_scale ? temperature * temperature : 1.0), ignore_index, has_target};
    const bool p1_separate = has_target && temperature != 1.0 && alpha != 1.0;
    with_bool(teacher_format == kProbs, [&](auto probs) {
      with_bool(student_grad, [&](auto sg) {
        with_bool(teacher_grad, [&](auto tg) {
          with_bool(p1_separate && student_grad, [&](auto p1) {
            for_each_row(B, C, [&](int64_t i) {
              kd_bwd_row<scalar_t, decltype(probs)::value, decltype(sg)::value, decltype(tg)::value,
                         decltype(p1)::value>(s_ptr + i * C, t_ptr + i * C, sg ? gs_ptr + i * C : nullptr,
                                              tg ? gt_ptr + i * C : nullptr, C, prm, g_ptr[i], glt_ptr[i],
                                              st_ptr + kNumStats * i, has_target ? y_ptr[i] : int64_t(-1));
            });
          });
        });
      });
    });
  });
  return {grad_s, grad_t};
}

// kd_loss_fwd and kd_loss_bwd of teacher logits in one sweep over the rows, the gradients written over the logits
// (csrc/schemas.cpp). Each row's backward follows its forward while the row is still in cache, so the logits
// are read from memory once, and no gradient buffer is allocated. The same row functions as the two ops: the
// losses and gradients are theirs bit for bit.
at::Tensor kd_loss_grad_cpu(AUGKD_KD_LOSS_GRAD_PARAMS) {
  checks::check_kd_loss_grad(student, teacher, target, grad_loss, temperature, alpha);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor loss = row_output(student, {B});
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);
  // before any write: a bad label must not leave half-overwritten logits behind
  checks::check_labels("kd_loss", target, C, ignore_index);
  const bool lse1_separate = has_target && temperature != 1.0;
  const bool p1_separate = lse1_separate && alpha != 1.0 && student_grad;

  AUGKD_CPU_DISPATCH(student, "kd_loss_grad_cpu", {
    scalar_t* s_ptr = student.mutable_data_ptr<scalar_t>();
    scalar_t* t_ptr = teacher.mutable_data_ptr<scalar_t>();
    const A* g_ptr = grad_loss.const_data_ptr<A>();
    A* loss_ptr = loss.mutable_data_ptr<A>();
    const KdParams<A> prm{static_cast<A>(1.0 / temperature), static_cast<A>(alpha),
                          static_cast<A>(t2_scale ? temperature * temperature : 1.0), ignore_index, has_target};
    with_bool(lse1_separate, [&](auto lse1) {
      with_bool(student_grad, [&](auto sg) {
        with_bool(teacher_grad, [&](auto tg) {
          with_bool(p1_separate, [&](auto p1) {
            constexpr bool LSE1 = decltype(lse1)::value, SG = decltype(sg)::value, TG = decltype(tg)::value;
            [[maybe_unused]] constexpr bool P1 = decltype(p1)::value;
            for_each_row(B, C, [&](int64_t i) {
              scalar_t* s = s_ptr + i * C;
              scalar_t* t = t_ptr + i * C;
              const int64_t y = has_target ? y_ptr[i] : int64_t(-1);
              A st[kNumStats];
              const A kl = kd_fwd_row<scalar_t, false, LSE1>(s, t, C, prm.inv_t, st);
              loss_ptr[i] = kd_row_loss(kl, st, s, C, prm.alpha, prm.c, y, has_target, ignore_index);
              if constexpr (SG || TG) kd_bwd_row<scalar_t, false, SG, TG, P1>(s, t, s, t, C, prm, g_ptr[i], A(0), st, y);
            });
          });
        });
      });
    });
  });
  return loss;
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) {
  AUGKD_IMPL_FWD_BWD(m, kd_loss, cpu);
  m.impl("kd_loss_grad_", &augkd::cpu::kd_loss_grad_cpu);
}
