// CUDA implementation of augkd::topk_kd_loss_fwd / augkd::topk_kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 4, device code in kernels/topk_kd_loss.cuh and kernels/topk_kd.h).
//
// Launch layout
//   forward:  C <= 1024: one warp per row, kRowWarps rows per block; larger C: one block per row
//             (128..512 threads, about 4 vectors per thread); lane / thread 0 then works the k entries.
//   backward: a 2-D grid of (column tile, row) blocks writes the dense gradient, then one thread per row
//             overwrites its k teacher entries (a second launch on the same stream: ordered after the first).
// Everything runs on the current stream, with no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "op_dispatch.h"
#include "op_outputs.h"
#include "op_register.h"
#include "row_launch.h"
#include "topk_checks.h"
#include "topk_kd_loss.cuh"

namespace augkd::cuda {
namespace {

// TopkFwdParams or TopkBwdParams (P) with the inputs they share, set alike for the forward and backward; the
// rest zero.
template <typename T, template <typename> class P>
P<T> topk_params(const at::Tensor& s, const at::Tensor& indices, const at::Tensor& values,
                 const std::optional<at::Tensor>& target, double temperature, int64_t ignore_index, int64_t tail,
                 int64_t divergence) {
  using A = acc_type<T>;
  P<T> p{};
  p.student = s.const_data_ptr<T>();
  p.idx = indices.const_data_ptr<int64_t>();
  p.val = values.const_data_ptr<A>();
  p.target = checks::data_or_null<int64_t>(target);
  p.rows = s.size(0);
  p.cols = s.size(1);
  p.k = indices.size(1);
  p.ignore_index = ignore_index;
  p.args = {static_cast<A>(1.0 / temperature), p.k, p.cols, static_cast<int>(tail), static_cast<int>(divergence)};
  return p;
}

std::tuple<at::Tensor, at::Tensor> topk_kd_loss_fwd_cuda(AUGKD_TOPK_KD_LOSS_FWD_PARAMS) {
  checks::check_topk_inputs("topk_kd_loss", student, indices, values, target, temperature, alpha, values_format,
                            tail, divergence);
  const CudaScope scope("topk_kd_loss", "student", student);
  const bool has_target = checks::present(target);
  const at::Tensor s = aligned_input(student);
  const int64_t rows = s.size(0), cols = s.size(1);
  at::Tensor loss = row_output(s, {rows});
  at::Tensor stats = row_output(s, {rows, topk::kStats});
  if (rows == 0) return {loss, stats};
  const double c = t2_scale ? temperature * temperature : 1.0;

  AUGKD_DISPATCH_FLOATING(s, "augkd_topk_kd_loss_fwd_cuda", {
    auto p = topk_params<scalar_t, TopkFwdParams>(s, indices, values, target, temperature, ignore_index, tail,
                                                   divergence);
    p.loss = loss.mutable_data_ptr<A>();
    p.stats = stats.mutable_data_ptr<A>();
    p.alpha_c = static_cast<A>(alpha * c);
    p.one_minus_alpha = static_cast<A>(1.0 - alpha);
    p.use_kl = alpha != 0.0;
    p.use_ce = has_target && alpha != 1.0;
    const FwdLayout lay = choose_fwd_layout(rows, cols, kVec<scalar_t>, 0, /*split=*/false);
    with_bool(has_target && temperature != 1.0, [&](auto n1) {
      launch_row_reduce<TopkFwdVisitor<scalar_t, decltype(n1)::value>>(p, lay, s, scope.stream);
    });
  });
  return {loss, stats};
}

at::Tensor topk_kd_loss_bwd_cuda(AUGKD_TOPK_KD_LOSS_BWD_PARAMS) {
  checks::check_topk_kd_loss_bwd(grad_loss, student, indices, values, target, stats, temperature, alpha,
                                 values_format, tail, divergence);
  const CudaScope scope("topk_kd_loss_bwd", "student", student);
  const bool has_target = checks::present(target);
  const at::Tensor s = aligned_input(student);
  const int64_t rows = s.size(0);
  at::Tensor grad = at::empty(s.sizes(), s.options());
  if (rows == 0) return grad;
  const double c = t2_scale ? temperature * temperature : 1.0;

  AUGKD_DISPATCH_FLOATING(s, "augkd_topk_kd_loss_bwd_cuda", {
    auto p = topk_params<scalar_t, TopkBwdParams>(s, indices, values, target, temperature, ignore_index, tail,
                                                   divergence);
    p.grad_loss = grad_loss.const_data_ptr<A>();
    p.stats = stats.const_data_ptr<A>();
    p.grad = grad.mutable_data_ptr<scalar_t>();
    p.ks = alpha != 0.0 ? static_cast<A>(alpha * c / temperature) : A(0);
    p.kce = has_target && alpha != 1.0 ? static_cast<A>(1.0 - alpha) : A(0);
    launch_row_sweep<TopkBwdVisitor<scalar_t>>(p, /*tile=*/true, scope.stream);
    if (alpha != 0.0) {  // with alpha == 0 the dense kernel already wrote the k entries right
      const auto blocks = static_cast<unsigned>(std::min(ceil_div(rows, 128), kMaxGridX));
      topk_kd_loss_bwd_entries_kernel<scalar_t><<<blocks, 128, 0, scope.stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) { AUGKD_IMPL_FWD_BWD(m, topk_kd_loss, cuda); }
