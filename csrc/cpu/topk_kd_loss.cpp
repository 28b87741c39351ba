// Top-k KD loss, CPU: augkd::topk_kd_loss_fwd / augkd::topk_kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 4; the work on the k teacher entries is kernels/topk_kd.h, shared with CUDA).
//
// Forward, rows in parallel: one sweep over the student row in blocks of kRowBlock classes (block max first,
// then the sums from L1, online across blocks) for m_s = max u, d_s = sum exp(u - m_s) (u = s / T) and, when
// the CE term needs them apart (T != 1), m_1 = max s, d_1 = sum exp(s - m_1); then the k gathered entries.
//   loss = alpha c D + (1 - alpha) (m_1 + log d_1 - s_y)      (c = T^2 if t2_scale; 0 for ignored rows)
// Backward, one sweep per row, then the k entries overwritten:
//   grad_s_j = g (alpha c / T dD/du_j + (1 - alpha) (p1_j - [j == y])),  p1_j = exp(s_j - m_1 - log d_1)
//   dD/du_j = q_j c_tail off the k indices (0 where q_j == 0), the entry formula of topk_kd.h on them.
#include "cpu/vec_utils.h"  // first: see the note on warnings there

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "op_outputs.h"
#include "op_register.h"
#include "topk_checks.h"
#include "topk_kd.h"

namespace augkd::cpu {
namespace {

using topk::TopkArgs;

// The row sweep: m_s = max u (u = s / T), d_s = sum exp(u - m_s); with NEED1 also m_1 = max s,
// d_1 = sum exp(s - m_1).
template <typename scalar_t, bool NEED1>
inline void topk_sweep_row(const scalar_t* __restrict s, int64_t C, acc_t<scalar_t> inv_t, acc_t<scalar_t>& m_s,
                           acc_t<scalar_t>& d_s, acc_t<scalar_t>& m_1, acc_t<scalar_t>& d_1) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = neg_inf<A>();
  const V v_inv_t(inv_t);
  A mraw = kNegInf, mu = kNegInf, du = 0, d1 = 0;
  for (int64_t b0 = 0; b0 < C; b0 += kRowBlock) {
    const int64_t b1 = std::min(C, b0 + kRowBlock);
    V vm(kNegInf);
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) { vm = vmax(vm, load(s + j, n, kNegInf)); });
    const A new_raw = nan_max(mraw, hmax(vm));
    const A new_mu = new_raw * inv_t;  // max u = (max s) / T
    du *= rescale(mu, new_mu);
    if constexpr (NEED1) d1 *= rescale(mraw, new_raw);
    mraw = new_raw;
    mu = new_mu;
    const V v_cu(center(mu)), v_c1(center(mraw));
    V vdu(A(0)), vd1(A(0));
    const int64_t ahead = b1 - b0;
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      prefetch(s + j + ahead);
      const V sv = load(s + j, n, kNegInf);
      vdu += vexp(at::vec::fmsub(sv, v_inv_t, v_cu));  // exp(u - m_s)
      if constexpr (NEED1) vd1 += vexp(sv - v_c1);     // exp(s - m_1)
    });
    du += hsum(vdu);
    if constexpr (NEED1) d1 += hsum(vd1);
  }
  m_s = mu;
  d_s = du;
  m_1 = NEED1 ? mraw : A(0);
  d_1 = NEED1 ? d1 : A(0);
}

std::tuple<at::Tensor, at::Tensor> topk_kd_loss_fwd_cpu(AUGKD_TOPK_KD_LOSS_FWD_PARAMS) {
  checks::check_topk_inputs("topk_kd_loss", student, indices, values, target, temperature, alpha, values_format,
                            tail, divergence);
  const int64_t B = student.size(0), C = student.size(1), K = indices.size(1);
  at::Tensor loss = row_output(student, {B});
  at::Tensor stats = row_output(student, {B, topk::kStats});
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);
  const int64_t* idx_ptr = indices.const_data_ptr<int64_t>();
  // Reading the indices and labels costs no device sync here: bad ones raise the front-end's ValueError.
  checks::check_topk_indices("topk_kd_loss", indices, C);
  checks::check_labels("topk_kd_loss", target, C, ignore_index);
  const bool need1 = has_target && temperature != 1.0;

  AUGKD_CPU_DISPATCH(student, "topk_kd_loss_fwd_cpu", {
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const A* v_ptr = values.const_data_ptr<A>();
    A* loss_ptr = loss.mutable_data_ptr<A>();
    A* st_ptr = stats.mutable_data_ptr<A>();
    const TopkArgs<A> args{static_cast<A>(1.0 / temperature), K, C, static_cast<int>(tail),
                           static_cast<int>(divergence)};
    const A a = static_cast<A>(alpha);
    const A c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    with_bool(need1, [&](auto n1) {
      for_each_row(B, C, [&](int64_t i) {
        const scalar_t* s = s_ptr + i * C;
        A* st = st_ptr + topk::kStats * i;
        A m_s, d_s, m_1, d_1;
        topk_sweep_row<scalar_t, decltype(n1)::value>(s, C, args.inv_t, m_s, d_s, m_1, d_1);
        A m_t, log_dt, div, c_tail;
        topk::topk_finish(s, idx_ptr + i * K, v_ptr + i * K, m_s, d_s, args, m_t, log_dt, div, c_tail);
        st[topk::kMs] = m_s;
        st[topk::kLogDs] = std::log(d_s);
        st[topk::kM1] = has_target ? (decltype(n1)::value ? m_1 : m_s) : A(0);
        st[topk::kLogD1] = has_target ? (decltype(n1)::value ? std::log(d_1) : st[topk::kLogDs]) : A(0);
        st[topk::kMt] = m_t;
        st[topk::kLogDt] = log_dt;
        st[topk::kD] = div;
        st[topk::kCTail] = c_tail;
        // a term whose weight is exactly 0 is left out (an infinite D or CE must not give 0 * inf)
        A row_loss = a != A(0) ? a * c * div : A(0);
        if (has_target) {
          const int64_t y = y_ptr[i];
          if (y == ignore_index) {
            row_loss = A(0);
          } else if (a != A(1)) {
            row_loss += (A(1) - a) * (st[topk::kM1] + st[topk::kLogD1] - static_cast<A>(s[y]));
          }
        }
        loss_ptr[i] = row_loss;
      });
    });
  });
  return {loss, stats};
}

at::Tensor topk_kd_loss_bwd_cpu(AUGKD_TOPK_KD_LOSS_BWD_PARAMS) {
  checks::check_topk_kd_loss_bwd(grad_loss, student, indices, values, target, stats, temperature, alpha,
                                 values_format, tail, divergence);
  const int64_t B = student.size(0), C = student.size(1), K = indices.size(1);
  at::Tensor grad = new_output_like(student);
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);
  const int64_t* idx_ptr = indices.const_data_ptr<int64_t>();
  checks::check_topk_indices("topk_kd_loss_bwd", indices, C);  // the k entries are written at these indices

  AUGKD_CPU_DISPATCH(student, "topk_kd_loss_bwd_cpu", {
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const A* v_ptr = values.const_data_ptr<A>();
    const A* g_ptr = grad_loss.const_data_ptr<A>();
    const A* st_ptr = stats.const_data_ptr<A>();
    scalar_t* gs_ptr = grad.mutable_data_ptr<scalar_t>();
    const TopkArgs<A> args{static_cast<A>(1.0 / temperature), K, C, static_cast<int>(tail),
                           static_cast<int>(divergence)};
    const A c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    const bool use_kl = alpha != 0.0, use_ce = has_target && alpha != 1.0;
    for_each_row(B, C, [&](int64_t i) {
      const scalar_t* s = s_ptr + i * C;
      scalar_t* gs = gs_ptr + i * C;
      const A* st = st_ptr + topk::kStats * i;
      const int64_t y = has_target ? y_ptr[i] : int64_t(-1);
      const bool ignored = has_target && y == ignore_index;
      const A g = g_ptr[i];
      const A ks = (ignored || !use_kl) ? A(0) : g * static_cast<A>(alpha) * c * args.inv_t;  // on dD/du
      const A k1 = (ignored || !use_ce) ? A(0) : g * static_cast<A>(1.0 - alpha);          // on p1 - onehot
      const A m1 = st[topk::kM1], ld1 = st[topk::kLogD1];
      if (has_target && !ignored && (y < 0 || y >= C)) {  // invalid label: a NaN gradient row
        vec_loop<W>(0, C, [&](int64_t j, int64_t n) { store(gs + j, V(std::numeric_limits<A>::quiet_NaN()), n); });
        return;
      }
      // u - m_s first, then - log d_s (and s - m_1, then - log d_1): no large sum m + log d is rounded
      const V v_inv_t(args.inv_t), v_ms(st[topk::kMs]), v_lds(st[topk::kLogDs]), v_ct(st[topk::kCTail]);
      const V v_m1(m1), v_ld1(ld1), v_ks(ks), v_k1(k1), v_zero(A(0));
      // off the k indices: ks q_j c_tail (0 where q_j == 0) + k1 p1_j
      vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
        const V sv = load(s + j, n, A(0));
        V r = v_zero;
        if (ks != A(0)) {
          const V q = vexp(at::vec::fmsub(sv, v_inv_t, v_ms) - v_lds);
          r = zero_where_eq(v_ks * q * v_ct, q, v_zero);
        }
        if (k1 != A(0)) r = at::vec::fmadd(v_k1, vexp((sv - v_m1) - v_ld1), r);
        store(gs + j, r, n);
      });
      const auto p1 = [&](int64_t j) { return std::exp((static_cast<A>(s[j]) - m1) - ld1); };
      // the target entry: p1_y - 1 formed before the single rounding
      if (k1 != A(0)) {
        const A q = std::exp((static_cast<A>(s[y]) * args.inv_t - st[topk::kMs]) - st[topk::kLogDs]);
        const A dd = ks != A(0) && q != A(0) ? ks * q * st[topk::kCTail] : A(0);
        gs[y] = static_cast<scalar_t>(dd + k1 * (p1(y) - A(1)));
      }
      // the k teacher entries: their exact gradient (the CE part included)
      if (ks != A(0)) {
        const int64_t* idx = idx_ptr + i * K;
        topk::topk_entry_grads(s, idx, v_ptr + i * K, st, args, [&](int64_t k, A dd) {
          const int64_t j = idx[k];
          A r = ks * dd;
          if (k1 != A(0)) r += k1 * (j == y ? p1(j) - A(1) : p1(j));
          gs[j] = static_cast<scalar_t>(r);
        });
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) { AUGKD_IMPL_FWD_BWD(m, topk_kd_loss, cpu); }
