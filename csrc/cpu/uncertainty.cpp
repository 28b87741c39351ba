// Uncertainty, CPU: augkd::uncertainty_fwd / augkd::uncertainty_bwd (docs/ops-design.md section 2).
//
// Per row, u = z / T, lse = logsumexp(u), p = softmax(u):
//   energy = -T lse,   entropy = -sum p log p = log d - S / d
// with the running maximum m, d = sum exp(u - m) and S = sum exp(u - m) (u - m) (0 where u == -inf),
// swept in blocks like the KD loss (block maximum first, then the sums from L1); when m rises by dm
// (r = exp(-dm)): S <- r (S - d dm), d <- r d.
// Backward (lse = -energy / T, H = entropy, p = exp(u - lse)):
//   grad_z = p (-gE - gH (u - lse + H) / T)                 (0 where p == 0)
#include "cpu/vec_utils.h"  // first: see the note on warnings there

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <tuple>

#include "op_checks.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cpu {
namespace {

template <typename scalar_t>
inline void uncertainty_fwd_row(const scalar_t* __restrict z, int64_t C, acc_t<scalar_t> inv_t,
                                acc_t<scalar_t>& lse, acc_t<scalar_t>& entropy) {
  using A = acc_t<scalar_t>;
  using V = Vec<A>;
  constexpr int64_t W = V::size();
  constexpr A kNegInf = neg_inf<A>();
  const V v_inv_t(inv_t), v_neg_inf(kNegInf);
  A mz = kNegInf, m = kNegInf, d = 0, S = 0;
  for (int64_t b0 = 0; b0 < C; b0 += kRowBlock) {
    const int64_t b1 = std::min(C, b0 + kRowBlock);
    V vm(kNegInf);
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) { vm = vmax(vm, load(z + j, n, kNegInf)); });
    mz = nan_max(mz, hmax(vm));
    const A new_m = mz * inv_t;  // max u = (max z) / T
    const A r = rescale(m, new_m);
    const A c = center(new_m);
    S = r * (S - d * (c - center(m)));
    d *= r;
    m = new_m;
    const V v_c(c);
    V vd(A(0)), vS(A(0));
    const int64_t ahead = b1 - b0;  // the next block's data, fetched while this one computes
    vec_loop<W>(b0, b1, [&](int64_t j, int64_t n) {
      prefetch(z + j + ahead);
      const V x = at::vec::fmsub(load(z + j, n, kNegInf), v_inv_t, v_c);  // u - m
      const V e = vexp(x);
      vd += e;
      vS += zero_where_eq(e * x, x, v_neg_inf);
    });
    d += hsum(vd);
    S += hsum(vS);
  }
  const A log_d = std::log(d);
  lse = m + log_d;
  entropy = log_d - S / d;
}

std::tuple<at::Tensor, at::Tensor> uncertainty_fwd_cpu(const at::Tensor& logits, double temperature) {
  checks::check_uncertainty_fwd(logits, temperature);
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor energy = row_output(logits, {B});
  at::Tensor entropy = row_output(logits, {B});
  AUGKD_CPU_DISPATCH(logits, "uncertainty_fwd_cpu", {
    const scalar_t* z_ptr = logits.const_data_ptr<scalar_t>();
    A* e_ptr = energy.mutable_data_ptr<A>();
    A* h_ptr = entropy.mutable_data_ptr<A>();
    const A T = static_cast<A>(temperature);
    const A inv_t = static_cast<A>(1.0 / temperature);
    for_each_row(B, C, [&](int64_t i) {
      A lse, h;
      uncertainty_fwd_row(z_ptr + i * C, C, inv_t, lse, h);
      e_ptr[i] = -T * lse;
      h_ptr[i] = h;
    });
  });
  return {energy, entropy};
}

at::Tensor uncertainty_bwd_cpu(const at::Tensor& grad_energy, const at::Tensor& grad_entropy,
                               const at::Tensor& logits, const at::Tensor& energy, const at::Tensor& entropy,
                               double temperature) {
  checks::check_uncertainty_bwd(grad_energy, grad_entropy, logits, energy, entropy, temperature);
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor grad = new_output_like(logits);
  AUGKD_CPU_DISPATCH(logits, "uncertainty_bwd_cpu", {
    const scalar_t* z_ptr = logits.const_data_ptr<scalar_t>();
    scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
    const A* ge_ptr = grad_energy.const_data_ptr<A>();
    const A* gh_ptr = grad_entropy.const_data_ptr<A>();
    const A* e_ptr = energy.const_data_ptr<A>();
    const A* h_ptr = entropy.const_data_ptr<A>();
    const A inv_t = static_cast<A>(1.0 / temperature);
    const V v_inv_t(inv_t), v_zero(A(0));
    for_each_row(B, C, [&](int64_t i) {
      const A lse = -e_ptr[i] * inv_t;
      const A b = -gh_ptr[i] * inv_t;               // on log p = u - lse
      const A a = -ge_ptr[i] + b * h_ptr[i];        // constant part
      const V v_lse(lse), v_a(a), v_b(b);
      const scalar_t* z = z_ptr + i * C;
      scalar_t* g = g_ptr + i * C;
      vec_loop<W>(0, C, [&](int64_t j, int64_t n) {
        const V lp = at::vec::fmsub(load(z + j, n, A(0)), v_inv_t, v_lse);  // log p
        const V p = vexp(lp);
        store(g + j, zero_where_eq(p * at::vec::fmadd(v_b, lp, v_a), p, v_zero), n);
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) { AUGKD_IMPL_FWD_BWD(m, uncertainty, cpu); }
