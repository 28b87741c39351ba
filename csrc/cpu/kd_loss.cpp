// KD loss, CPU: augkd::kd_loss_fwd / augkd::kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 1).
//
// Per row, with u = s / T, w = v / T (v = t for logits / log-probs, v = log t for probs):
//   p_s = softmax(u), p_t = softmax(w), KL = sum p_t (log p_t - log p_s), CE = logsumexp(s) - s_y
//   loss = alpha * c * KL + (1 - alpha) * CE      (c = T^2 if t2_scale; 0 for ignored rows)
// Forward: rows in parallel; each row is swept in blocks of kRowBlock classes. A block is read once for its
// maxima (max_j s, max_j t), then re-read from L1 for the sums against the updated running maxima:
//   d_s = sum exp(u - m_s), d_t = sum exp(w - m_t), d_1 = sum exp(s - m_1),
//   A   = sum exp(w - m_t) ((w - m_t) - (u - m_s))            (0 where w == -inf)
// and across blocks the online rules of the doc (A <- r (A + d_t (ds - dt)), d <- r d):
//   lse_s = m_s + log d_s, lse_t = m_t + log d_t, lse_1 = m_1 + log d_1, KL = A / d_t - log d_t + log d_s.
// Rows with C <= kRowBlock are therefore the plain two-pass scheme over a cached row. Pass 2 prefetches the
// next block (or row), so pass 1 of that block finds it in cache.
// Backward: one sweep per row recomputing log p_s = u - lse_s, log p_t = w - lse_t, p_1 = exp(s - lse_1):
//   grad_s = g (alpha c / T (p_s - p_t) + (1 - alpha) (p_1 - [j == y]))      (0 for ignored rows)
//   dL/dw  = g alpha c p_t (log p_t - log p_s - KL) [not ignored] + g_lse_t p_t   (0 where p_t == 0)
//   grad_t = dL/dw / T (logits, log-probs),  dL/dw / (T t) with 0 where t == 0 (probs)
// The target entry of grad_s is recomputed in scalar fp32 afterwards so that p_1_y - 1 is formed before the
// single rounding to the output dtype.
#include "cpu/vec_utils.h"  // first: see the note on warnings there

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "op_checks.h"

namespace augkd::cpu {
namespace {

constexpr int64_t kProbs = 2;  // teacher_format: 0 logits, 1 log-probs (same math), 2 probs

template <typename A>
struct KdParams {
  A inv_t;        // 1 / T
  A alpha;
  A c;            // T^2 or 1
  int64_t ignore_index;
  bool has_target;
};

// Forward of one row. Writes lse_s, lse_t, lse_1 (raw logsumexp(s), only when LSE1) and KL.
template <typename scalar_t, bool PROBS, bool LSE1>
inline void kd_fwd_row(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t C,
                       acc_t<scalar_t> inv_t, acc_t<scalar_t>& lse_s, acc_t<scalar_t>& lse_t,
                       acc_t<scalar_t>& lse_1, acc_t<scalar_t>& kl) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = neg_inf<A>();
  const V v_inv_t(inv_t);
  const V v_neg_inf(kNegInf);

  A m1 = kNegInf;    // running max of s (u's max is m1 / T: x -> x / T is monotone)
  A mtr = kNegInf;   // running max of the raw teacher values
  A mu = kNegInf, mw = kNegInf;
  A d_s = 0, d_t = 0, d_1 = 0, acc = 0;

  for (int64_t b0 = 0; b0 < C; b0 += kRowBlock) {
    const int64_t b1 = std::min(C, b0 + kRowBlock);
    // pass 1 over the block: maxima (a NaN either ends up in them or reaches the sums through vexp)
    V vms(kNegInf), vmt(kNegInf);
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      vms = vmax(vms, load(s + j, n, kNegInf));
      vmt = vmax(vmt, load(t + j, n, kNegInf));
    });
    const A new_m1 = nan_max(m1, hmax(vms));
    const A new_mtr = nan_max(mtr, hmax(vmt));
    const A new_mu = new_m1 * inv_t;
    const A new_mw = (PROBS ? std::log(new_mtr) : new_mtr) * inv_t;

    // rescale the sums of the earlier blocks to the new maxima
    const A r_s = rescale(mu, new_mu);
    const A r_t = rescale(mw, new_mw);
    const A cu = center(new_mu), cw = center(new_mw);
    acc = r_t * (acc + d_t * ((cu - center(mu)) - (cw - center(mw))));
    d_t *= r_t;
    d_s *= r_s;
    A c1 = 0;
    if constexpr (LSE1) {
      d_1 *= rescale(m1, new_m1);
      c1 = center(new_m1);
    }
    m1 = new_m1;
    mtr = new_mtr;
    mu = new_mu;
    mw = new_mw;

    // pass 2 over the (cached) block: sums against the new maxima
    const V v_cu(cu), v_cw(cw), v_c1(c1);
    V vds(A(0)), vdt(A(0)), vd1(A(0)), vacc(A(0));
    const int64_t ahead = b1 - b0;  // the next block's data, fetched while this one computes
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      prefetch(s + j + ahead);
      prefetch(t + j + ahead);
      const V sv = load(s + j, n, kNegInf);
      const V tv = load(t + j, n, PROBS ? A(0) : kNegInf);
      const V xu = at::vec::fmsub(sv, v_inv_t, v_cu);                     // u - m_s
      const V xw = at::vec::fmsub(PROBS ? vlog(tv) : tv, v_inv_t, v_cw);  // w - m_t
      const V es = vexp(xu);
      const V et = vexp(xw);
      vds += es;
      vdt += et;
      vacc += zero_where_eq(et * (xw - xu), xw, v_neg_inf);
      if constexpr (LSE1) vd1 += vexp(sv - v_c1);
    });
    d_s += hsum(vds);
    d_t += hsum(vdt);
    acc += hsum(vacc);
    if constexpr (LSE1) d_1 += hsum(vd1);
  }
  const A log_ds = std::log(d_s), log_dt = std::log(d_t);
  lse_s = mu + log_ds;
  lse_t = mw + log_dt;
  lse_1 = LSE1 ? m1 + std::log(d_1) : A(0);
  kl = acc / d_t - log_dt + log_ds;
}

// Backward of one row. gs / gt: grad rows (written when SG / TG).
template <typename scalar_t, bool PROBS, bool SG, bool TG, bool P1>
inline void kd_bwd_row(const scalar_t* __restrict s, const scalar_t* __restrict t, scalar_t* __restrict gs,
                       scalar_t* __restrict gt, int64_t C, const KdParams<acc_t<scalar_t>>& prm,
                       acc_t<scalar_t> g, acc_t<scalar_t> g_lse_t, const acc_t<scalar_t>* st, int64_t y) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  const bool ignored = prm.has_target && y == prm.ignore_index;
  const A lse_s = st[0], lse_t = st[1], lse_1 = st[2], kl = st[3];
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
  if (!student && !TG) return;

  const V v_inv_t(prm.inv_t), v_lse_s(lse_s), v_lse_t(lse_t), v_lse_1(lse_1), v_kl(kl);
  const V v_ks(ks), v_k1(k1), v_kt(kt), v_glt(g_lse_t), v_zero(A(0));
  vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
    const V sv = load(s + j, n, A(0));
    const V tv = load(t + j, n, A(1));
    const V lps = at::vec::fmsub(sv, v_inv_t, v_lse_s);                      // log p_s
    const V lpt = at::vec::fmsub(PROBS ? vlog(tv) : tv, v_inv_t, v_lse_t);   // log p_t
    const V ps = vexp(lps);
    const V pt = vexp(lpt);
    if (SG && student && (y >= 0 || !prm.has_target) && (y < C || !prm.has_target)) {
      V r = kl_term ? v_ks * (ps - pt) : v_zero;
      if (k1 != A(0)) {
        const V p1 = P1 ? vexp(sv - v_lse_1) : ps;
        r = at::vec::fmadd(v_k1, p1, r);
      }
      store(gs + j, r, n);
    }
    if constexpr (TG) {
      V dw = v_glt * pt;
      if (!ignored && kl_term) dw = at::vec::fmadd(v_kt, zero_where_eq(pt * (lpt - lps - v_kl), pt, v_zero), dw);
      V r = dw * v_inv_t;
      if constexpr (PROBS) r = zero_where_eq(r / tv, tv, v_zero);
      store(gt + j, r, n);
    }
  });

  // target entry: recompute in acc precision with the -1 before the single rounding
  if (SG && student && k1 != A(0) && y >= 0 && y < C) {
    const A sy = static_cast<A>(s[y]);
    const A ty = static_cast<A>(t[y]);
    const A ps = std::exp(sy * prm.inv_t - lse_s);
    const A pt = std::exp((PROBS ? std::log(ty) : ty) * prm.inv_t - lse_t);
    const A p1 = P1 ? std::exp(sy - lse_1) : ps;
    gs[y] = static_cast<scalar_t>((kl_term ? ks * (ps - pt) : A(0)) + k1 * (p1 - A(1)));
  }
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, double temperature,
                                                   double alpha, int64_t ignore_index, bool t2_scale,
                                                   int64_t teacher_format) {
  checks::check_kd_loss_fwd(student, teacher, target, temperature, alpha, teacher_format);
  const int64_t B = student.size(0), C = student.size(1);
  const auto row_opts = student.options().dtype(checks::row_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({B}, row_opts);
  at::Tensor stats = at::empty({B, 4}, row_opts);
  const bool has_target = target.has_value() && target->defined();
  const int64_t* y_ptr = has_target ? target->const_data_ptr<int64_t>() : nullptr;
  const bool lse1_separate = has_target && temperature != 1.0;
  // On the CPU a bad label can be reported without a device sync: raise the front-end's ValueError here
  // (the Python check is skipped for this backend; GPU kernels give a NaN row instead).
  for (int64_t i = 0; has_target && i < B; ++i) {
    const int64_t y = y_ptr[i];
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < C), "kd_loss: target holds class index ", y,
                      ", outside [0, ", C, ") (and not ignore_index=", ignore_index, ")");
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
    A* loss_ptr = loss.mutable_data_ptr<A>();
    A* stats_ptr = stats.mutable_data_ptr<A>();
    const A inv_t = static_cast<A>(1.0 / temperature);
    const A a = static_cast<A>(alpha);
    const A c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    with_bool(teacher_format == kProbs, [&](auto probs) {
      with_bool(lse1_separate, [&](auto lse1) {
        at::parallel_for(0, B, row_grain(C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t* s = s_ptr + i * C;
            A lse_s, lse_t, lse_1, kl;
            kd_fwd_row<scalar_t, decltype(probs)::value, decltype(lse1)::value>(s, t_ptr + i * C, C, inv_t, lse_s,
                                                                                lse_t, lse_1, kl);
            // a term whose weight is exactly 0 is left out (an infinite KL or CE must not give 0 * inf)
            A row_loss = a != A(0) ? a * c * kl : A(0);
            if (has_target) {
              if (!decltype(lse1)::value) lse_1 = lse_s;  // T == 1
              const int64_t y = y_ptr[i];
              if (y == ignore_index) {
                row_loss = A(0);
              } else if (y < 0 || y >= C) {
                row_loss = std::numeric_limits<A>::quiet_NaN();  // invalid label: a NaN row, no OOB read
              } else if (a != A(1)) {
                row_loss += (A(1) - a) * (lse_1 - static_cast<A>(s[y]));
              }
            }
            loss_ptr[i] = row_loss;
            A* st = stats_ptr + 4 * i;
            st[0] = lse_s;
            st[1] = lse_t;
            st[2] = lse_1;
            st[3] = kl;
          }
        });
      });
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_lse_t,
                                                   const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, const at::Tensor& stats,
                                                   double temperature, double alpha, int64_t ignore_index,
                                                   bool t2_scale, int64_t teacher_format, bool student_grad,
                                                   bool teacher_grad) {
  checks::check_kd_loss_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
                            teacher_format);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor grad_s = student_grad ? new_output_like(student) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? new_output_like(teacher) : at::empty({0}, teacher.options());
  if (!student_grad && !teacher_grad) return {grad_s, grad_t};
  const bool has_target = target.has_value() && target->defined();
  const int64_t* y_ptr = has_target ? target->const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
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
            at::parallel_for(0, B, row_grain(C), [&](int64_t begin, int64_t end) {
              for (int64_t i = begin; i < end; ++i) {
                kd_bwd_row<scalar_t, decltype(probs)::value, decltype(sg)::value, decltype(tg)::value,
                           decltype(p1)::value>(s_ptr + i * C, t_ptr + i * C, sg ? gs_ptr + i * C : nullptr,
                                                tg ? gt_ptr + i * C : nullptr, C, prm, g_ptr[i], glt_ptr[i],
                                                st_ptr + 4 * i, has_target ? y_ptr[i] : int64_t(-1));
              }
            });
          });
        });
      });
    });
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) {
  m.impl("kd_loss_fwd", &augkd::cpu::kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &augkd::cpu::kd_loss_bwd_cpu);
}
