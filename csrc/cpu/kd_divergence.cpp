// KD divergence family, CPU: augkd::kd_divergence_fwd / augkd::kd_divergence_bwd (schemas in csrc/schemas.cpp;
// math in docs/ops-design.md, "KD divergences"; the per-class formulas are kernels/kd_divergence_math.h, shared
// with CUDA).
//
// Forward, rows in parallel, two sweeps per row:
//   1. blocks of kRowBlock classes (block maxima first, then the sums from L1, online across blocks):
//      m_s, d_s of u = s / T, m_t, d_t of v = t / T, E = d_t - d_s through expm1 (so L = log d_t - log d_s =
//      log1p(E / d_s) is accurate however close the rows are), and m_1, d_1 of s for CE when T != 1;
//   2. the divergence D and the backward sums S_s, S_t from rho_j = (v_j - m_t) - (u_j - m_s) - L.
// Backward, one sweep per row from the saved stats: grad_s = g_div / T dD/du + g_ce (p1 - onehot(y)),
// grad_t = g_div / T dD/dv (g_div, g_ce: the gradient on D and on CE per row, from the front-end).
#include "cpu/vec_utils.h"  // first: see the note on warnings there

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "divergence_checks.h"
#include "kd_divergence_math.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cpu {
namespace {

// expm1 of z in [-0.35, 0] by its Taylor series to z^9 (truncation < 1e-10 relative).
inline Vec<float> expm1_series(const Vec<float>& z) {
  using V = Vec<float>;
  V p(1.f / 362880.f);
  p = at::vec::fmadd(p, z, V(1.f / 40320.f));
  p = at::vec::fmadd(p, z, V(1.f / 5040.f));
  p = at::vec::fmadd(p, z, V(1.f / 720.f));
  p = at::vec::fmadd(p, z, V(1.f / 120.f));
  p = at::vec::fmadd(p, z, V(1.f / 24.f));
  p = at::vec::fmadd(p, z, V(1.f / 6.f));
  p = at::vec::fmadd(p, z, V(0.5f));
  p = at::vec::fmadd(p, z, V(1.f));
  return z * p;
}

// expm1 of x <= 0 (every argument here: distances to a maximum, -|rho|), fp32: the series for x > -0.35,
// exp(x) - 1 below (no cancellation there: |e^x - 1| > 0.29); NaN stays NaN, -inf gives -1. A few times
// cheaper than Sleef's expm1. fp64: Sleef's.
inline Vec<float> vexpm1_nonpos(const Vec<float>& x) {
  using V = Vec<float>;
  const V small = x > V(-0.35f);
  return V::blendv(vexp(x) - V(1.f), expm1_series(V::blendv(V(0.f), x, small)), small);
}
inline Vec<double> vexpm1_nonpos(const Vec<double>& x) {
  return x.expm1();
}
inline Vec<float> vexpm1_small(const Vec<float>& x) {
  return expm1_series(x);
}
inline Vec<double> vexpm1_small(const Vec<double>& x) {
  return x.expm1();
}

template <typename A>
struct VecOps {
  using V = Vec<A>;
  using M = Vec<A>;
  static V exp(const V& x) { return vexp(x); }
  static V expm1(const V& x) { return vexpm1_nonpos(x); }
  static V expm1_small(const V& x) { return vexpm1_small(x); }
  static V log1p(const V& x) { return x.log1p(); }
  static M le(const V& a, const V& b) { return a <= b; }
  static M lt(const V& a, const V& b) { return a < b; }
  static M eq(const V& a, const V& b) { return a == b; }
  static M and_(const M& a, const M& b) { return a & b; }
  static M or_(const M& a, const M& b) { return a | b; }
  static V sel(const M& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

template <typename A>
struct ScalarOps {
  using M = bool;
  static A exp(A x) { return std::exp(x); }
  static A expm1(A x) { return std::expm1(x); }
  static A expm1_small(A x) { return std::expm1(x); }
  static A log1p(A x) { return std::log1p(x); }
  static bool le(A a, A b) { return a <= b; }
  static bool lt(A a, A b) { return a < b; }
  static bool eq(A a, A b) { return a == b; }
  static bool and_(bool a, bool b) { return a && b; }
  static bool or_(bool a, bool b) { return a || b; }
  static A sel(bool m, A a, A b) { return m ? a : b; }
};

template <typename A>
struct RowStats {
  A ms, lds, mt, ldt, ell, m1, ld1;
};

// Sweep 1 of a row (see the file comment).
template <typename scalar_t, bool NEED1>
RowStats<acc_t<scalar_t>> sweep_stats(const scalar_t* __restrict s, const scalar_t* __restrict t, int64_t C,
                                      acc_t<scalar_t> inv_t) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  using O = VecOps<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = neg_inf<A>();
  const V v_inv_t(inv_t);
  A raw_s = kNegInf, raw_t = kNegInf, ms = kNegInf, mt = kNegInf, ds = 0, dt = 0, gap = 0, d1 = 0;
  for (int64_t b0 = 0; b0 < C; b0 += kRowBlock) {
    const int64_t b1 = std::min(C, b0 + kRowBlock);
    V vs(kNegInf), vt(kNegInf);
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      vs = vmax(vs, load(s + j, n, kNegInf));
      vt = vmax(vt, load(t + j, n, kNegInf));
    });
    const A new_raw_s = nan_max(raw_s, hmax(vs)), new_raw_t = nan_max(raw_t, hmax(vt));
    const A new_ms = new_raw_s * inv_t, new_mt = new_raw_t * inv_t;
    const A rs = rescale(ms, new_ms), rt = rescale(mt, new_mt);
    gap = div::rebase_gap<A>(gap, ds, rs, rt, (mt - new_mt) - (ms - new_ms), [](A x) { return std::expm1(x); });
    ds *= rs;
    dt *= rt;
    if constexpr (NEED1) d1 *= rescale(raw_s, new_raw_s);
    raw_s = new_raw_s;
    raw_t = new_raw_t;
    ms = new_ms;
    mt = new_mt;
    const V v_cs(center(ms)), v_ct(center(mt)), v_c1(center(raw_s));
    V vds(A(0)), vdt(A(0)), vgap(A(0)), vd1(A(0));
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      const V sv = load(s + j, n, kNegInf), tv = load(t + j, n, kNegInf);
      const V a = at::vec::fmsub(sv, v_inv_t, v_cs), b = at::vec::fmsub(tv, v_inv_t, v_ct);
      const V ea = vexp(a), eb = vexp(b);
      vds += ea;
      vdt += eb;
      vgap += div::gap_term<O, A>(ea, eb, div::log_ratio<O, A>(a, b));
      if constexpr (NEED1) vd1 += vexp(sv - v_c1);
    });
    ds += hsum(vds);
    dt += hsum(vdt);
    gap += hsum(vgap);
    if constexpr (NEED1) d1 += hsum(vd1);
  }
  RowStats<A> r;
  r.ms = ms;
  r.mt = mt;
  r.lds = std::log(ds);
  r.ldt = std::log(dt);
  r.ell = std::log1p(gap / ds);
  r.m1 = NEED1 ? raw_s : ms;
  r.ld1 = NEED1 ? std::log(d1) : r.lds;
  return r;
}

// a = u - m_s, b = v - m_t, q, p and rho of n classes at j.
template <typename scalar_t>
struct ClassView {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  V v_inv_t, v_cs, v_ct, v_lds, v_ldt, v_ell;
  ClassView(const RowStats<A>& r, A inv_t)
      : v_inv_t(inv_t), v_cs(center(r.ms)), v_ct(center(r.mt)), v_lds(r.lds), v_ldt(r.ldt), v_ell(r.ell) {}
  void at(const scalar_t* s, const scalar_t* t, int64_t j, int64_t n, V& q, V& p, V& rho) const {
    using O = VecOps<A>;
    constexpr A kNegInf = neg_inf<A>();
    const V a = at::vec::fmsub(load(s + j, n, kNegInf), v_inv_t, v_cs);
    const V b = at::vec::fmsub(load(t + j, n, kNegInf), v_inv_t, v_ct);
    q = vexp(a - v_lds);
    p = vexp(b - v_ldt);
    rho = div::log_ratio<O, A>(a, b) - v_ell;
  }
};

std::tuple<at::Tensor, at::Tensor> kd_divergence_fwd_cpu(AUGKD_KD_DIVERGENCE_FWD_PARAMS) {
  checks::check_divergence_inputs("kd_divergence", student, teacher, target, temperature, divergence, beta);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor loss = row_output(student, {B});
  at::Tensor stats = row_output(student, {B, div::kStats});
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);
  checks::check_labels("kd_divergence", target, C, ignore_index);
  const bool need1 = has_target && temperature != 1.0;

  AUGKD_CPU_DISPATCH(student, "kd_divergence_fwd_cpu", {
    using O = VecOps<A>;
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
    A* loss_ptr = loss.mutable_data_ptr<A>();
    A* st_ptr = stats.mutable_data_ptr<A>();
    const A inv_t = static_cast<A>(1.0 / temperature), b = static_cast<A>(beta), a = static_cast<A>(alpha);
    const A c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    div::with_divergence(divergence, [&](auto code) {
      constexpr int DIV = decltype(code)::value;
      with_bool(need1, [&](auto n1) {
        at::parallel_for(0, B, row_grain(2 * C), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t* s = s_ptr + i * C;
            const scalar_t* t = t_ptr + i * C;
            A* st = st_ptr + div::kStats * i;
            if (has_target && y_ptr[i] == ignore_index) {  // exactly 0, whatever the row holds
              for (int k = 0; k < div::kStats; ++k) st[k] = A(0);
              loss_ptr[i] = A(0);
              continue;
            }
            const RowStats<A> r = sweep_stats<scalar_t, decltype(n1)::value>(s, t, C, inv_t);
            const ClassView<scalar_t> view(r, inv_t);
            V vd(A(0)), vss(A(0)), vst(A(0));
            vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
              V q, p, rho;
              view.at(s, t, j, n, q, p, rho);
              div::forward_terms<O, A, DIV>(q, p, rho, b, vd, vss, vst);
            });
            const A d = hsum(vd);
            const A ce = has_target ? (r.m1 + r.ld1) - static_cast<A>(s[y_ptr[i]]) : A(0);
            st[div::kMs] = r.ms;
            st[div::kLogDs] = r.lds;
            st[div::kMt] = r.mt;
            st[div::kLogDt] = r.ldt;
            st[div::kL] = r.ell;
            st[div::kD] = d;
            st[div::kCE] = ce;
            st[div::kSs] = DIV == div::kReverseKL ? d : hsum(vss);
            st[div::kSt] = DIV == div::kKL ? d : hsum(vst);
            st[div::kM1] = r.m1;
            st[div::kLogD1] = r.ld1;
            // a term whose weight is exactly 0 is left out (an infinite D or CE must not give 0 * inf)
            A row_loss = a != A(0) ? a * c * d : A(0);
            if (has_target && a != A(1)) row_loss += (A(1) - a) * ce;
            loss_ptr[i] = row_loss;
          }
        });
      });
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_divergence_bwd_cpu(AUGKD_KD_DIVERGENCE_BWD_PARAMS) {
  checks::check_divergence_bwd(grad_div, grad_ce, student, teacher, target, stats, temperature, divergence, beta);
  const int64_t B = student.size(0), C = student.size(1);
  at::Tensor gs_out = student_grad ? new_output_like(student) : unused_grad(student);
  at::Tensor gt_out = teacher_grad ? new_output_like(teacher) : unused_grad(teacher);
  if (!student_grad && !teacher_grad) return {gs_out, gt_out};
  const bool has_target = checks::present(target);
  const int64_t* y_ptr = checks::data_or_null<int64_t>(target);

  AUGKD_CPU_DISPATCH(student, "kd_divergence_bwd_cpu", {
    using O = VecOps<A>;
    const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
    const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
    const A* gd_ptr = grad_div.const_data_ptr<A>();
    const A* gc_ptr = grad_ce.const_data_ptr<A>();
    const A* st_ptr = stats.const_data_ptr<A>();
    scalar_t* gs_ptr = student_grad ? gs_out.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_ptr = teacher_grad ? gt_out.mutable_data_ptr<scalar_t>() : nullptr;
    const A inv_t = static_cast<A>(1.0 / temperature), b = static_cast<A>(beta);
    // the teacher's gradient as a template flag: without it, its per-class terms are not computed at all
    with_bool(teacher_grad, [&](auto want_t) {
    div::with_divergence(divergence, [&](auto code) {
      constexpr int DIV = decltype(code)::value;
      constexpr bool WT = decltype(want_t)::value;
      at::parallel_for(0, B, row_grain(2 * C), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t* s = s_ptr + i * C;
          const scalar_t* t = t_ptr + i * C;
          scalar_t* gs = student_grad ? gs_ptr + i * C : nullptr;
          scalar_t* gt = teacher_grad ? gt_ptr + i * C : nullptr;
          const A* st = st_ptr + div::kStats * i;
          const int64_t y = has_target ? y_ptr[i] : int64_t(-1);
          const bool ignored = has_target && y == ignore_index;
          // a gradient weight of exactly 0 leaves its term out (no 0 * inf from an infinite D or CE)
          const A kd = ignored ? A(0) : gd_ptr[i] * inv_t;
          const A kc = (ignored || !has_target) ? A(0) : gc_ptr[i];
          const bool use_ce = kc != A(0) && student_grad;
          if (has_target && !ignored && (y < 0 || y >= C)) {  // invalid label: a NaN gradient row
            const V nan(std::numeric_limits<A>::quiet_NaN());
            vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
              if (gs) store(gs + j, nan, n);
              if (gt) store(gt + j, nan, n);
            });
            continue;
          }
          const RowStats<A> r{st[div::kMs], st[div::kLogDs], st[div::kMt], st[div::kLogDt], st[div::kL],
                              st[div::kM1], st[div::kLogD1]};
          const ClassView<scalar_t> view(r, inv_t);
          const A d = st[div::kD], ss = st[div::kSs], stt = st[div::kSt];
          const V v_kd(kd), v_kc(kc), v_m1(r.m1), v_ld1(r.ld1), zero(A(0));
          constexpr A kNegInf = neg_inf<A>();
          vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
            V gsv = zero, gtv = zero;
            if (kd != A(0)) {
              V q, p, rho, du, dv;
              view.at(s, t, j, n, q, p, rho);
              div::class_grads<O, A, DIV>(q, p, rho, b, d, ss, stt, du, dv);
              gsv = v_kd * du;
              if constexpr (WT) gtv = v_kd * dv;
            }
            if (use_ce) gsv = at::vec::fmadd(v_kc, vexp((load(s + j, n, kNegInf) - v_m1) - v_ld1), gsv);
            if (gs) store(gs + j, gsv, n);
            if constexpr (WT) store(gt + j, gtv, n);
          });
          if (use_ce) {  // the target entry: p1_y - 1 formed before the single rounding
            using SO = ScalarOps<A>;
            const A sy = static_cast<A>(s[y]), ty = static_cast<A>(t[y]);
            A g = kc * (std::exp((sy - r.m1) - r.ld1) - A(1));
            if (kd != A(0)) {
              const A a_y = sy * inv_t - center(r.ms), b_y = ty * inv_t - center(r.mt);
              const A q = std::exp(a_y - r.lds), p = std::exp(b_y - r.ldt);
              const A rho = div::log_ratio<SO, A>(a_y, b_y) - r.ell;
              A du, dv;
              div::class_grads<SO, A, DIV>(q, p, rho, b, d, ss, stt, du, dv);
              g += kd * du;
            }
            gs[y] = static_cast<scalar_t>(g);
          }
        }
      });
    });
    });
  });
  return {gs_out, gt_out};
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) { AUGKD_IMPL_FWD_BWD(m, kd_divergence, cpu); }
