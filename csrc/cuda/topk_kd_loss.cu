// CUDA implementation of augkd::topk_kd_loss_fwd / augkd::topk_kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 4, device code in kernels/topk_kd_loss.cuh and kernels/topk_kd.h).
//
// Launch layout
//   forward:  C <= 1024: one warp per row, kRowWarps rows per block; larger C: one block per row
//             (128..512 threads, about 4 vectors per thread); lane / thread 0 then works the k entries.
//   backward: a 2-D grid of (column tile, row) blocks writes the dense gradient, then one thread per row
//             overwrites its k teacher entries (a second launch on the same stream: ordered after the first).
// Everything runs on the current stream, with no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "row_launch.h"
#include "topk_checks.h"
#include "topk_kd_loss.cuh"

namespace augkd::cuda {
namespace {

template <typename A>
topk::TopkArgs<A> make_args(double temperature, int64_t k, int64_t cols, int64_t tail, int64_t divergence) {
  return {static_cast<A>(1.0 / temperature), k, cols, static_cast<int>(tail), static_cast<int>(divergence)};
}

std::tuple<at::Tensor, at::Tensor> topk_kd_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& indices,
                                                         const at::Tensor& values,
                                                         const std::optional<at::Tensor>& target,
                                                         double temperature, double alpha, int64_t ignore_index,
                                                         bool t2_scale, int64_t values_format, int64_t tail,
                                                         int64_t divergence) {
  checks::check_topk_inputs("topk_kd_loss", student, indices, values, target, temperature, alpha, values_format,
                            tail, divergence);
  check_cuda("topk_kd_loss", "student", student);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor s = aligned_input(student);
  const int64_t rows = s.size(0), cols = s.size(1), k = indices.size(1);
  const auto row_opts = s.options().dtype(checks::row_dtype(s.scalar_type()));
  at::Tensor loss = at::empty({rows}, row_opts);
  at::Tensor stats = at::empty({rows, topk::kStats}, row_opts);
  if (rows == 0) return {loss, stats};
  const double c = t2_scale ? temperature * temperature : 1.0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "augkd_topk_kd_loss_fwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    TopkFwdParams<scalar_t> p{};
    p.student = s.const_data_ptr<scalar_t>();
    p.idx = indices.const_data_ptr<int64_t>();
    p.val = values.const_data_ptr<A>();
    p.target = has_target ? target->const_data_ptr<int64_t>() : nullptr;
    p.loss = loss.mutable_data_ptr<A>();
    p.stats = stats.mutable_data_ptr<A>();
    p.rows = rows;
    p.cols = cols;
    p.k = k;
    p.ignore_index = ignore_index;
    p.alpha_c = static_cast<A>(alpha * c);
    p.one_minus_alpha = static_cast<A>(1.0 - alpha);
    p.use_kl = alpha != 0.0;
    p.use_ce = has_target && alpha != 1.0;
    p.args = make_args<A>(temperature, k, cols, tail, divergence);
    const FwdLayout lay = choose_fwd_layout(rows, cols, kVec<scalar_t>, 0, /*split=*/false);
    if (has_target && temperature != 1.0) {
      launch_row_reduce<TopkFwdOp<scalar_t, true>>(p, lay, s, stream);
    } else {
      launch_row_reduce<TopkFwdOp<scalar_t, false>>(p, lay, s, stream);
    }
  });
  return {loss, stats};
}

at::Tensor topk_kd_loss_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& indices,
                                 const at::Tensor& values, const std::optional<at::Tensor>& target,
                                 const at::Tensor& stats, double temperature, double alpha, int64_t ignore_index,
                                 bool t2_scale, int64_t values_format, int64_t tail, int64_t divergence) {
  checks::check_topk_kd_loss_bwd(grad_loss, student, indices, values, target, stats, temperature, alpha,
                                 values_format, tail, divergence);
  check_cuda("topk_kd_loss_bwd", "student", student);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor s = aligned_input(student);
  const int64_t rows = s.size(0), cols = s.size(1), k = indices.size(1);
  at::Tensor grad = at::empty(s.sizes(), s.options());
  if (rows == 0) return grad;
  const double c = t2_scale ? temperature * temperature : 1.0;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "augkd_topk_kd_loss_bwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    TopkBwdParams<scalar_t> p{};
    p.grad_loss = grad_loss.const_data_ptr<A>();
    p.student = s.const_data_ptr<scalar_t>();
    p.idx = indices.const_data_ptr<int64_t>();
    p.val = values.const_data_ptr<A>();
    p.target = has_target ? target->const_data_ptr<int64_t>() : nullptr;
    p.stats = stats.const_data_ptr<A>();
    p.grad = grad.mutable_data_ptr<scalar_t>();
    p.rows = rows;
    p.cols = cols;
    p.k = k;
    p.ignore_index = ignore_index;
    p.ks = alpha != 0.0 ? static_cast<A>(alpha * c / temperature) : A(0);
    p.kce = has_target && alpha != 1.0 ? static_cast<A>(1.0 - alpha) : A(0);
    p.args = make_args<A>(temperature, k, cols, tail, divergence);
    launch_row_sweep<TopkBwdOp<scalar_t>>(p, /*tile=*/true, stream);
    if (alpha != 0.0) {  // with alpha == 0 the dense kernel already wrote the k entries right
      const auto blocks = static_cast<unsigned>(std::min(ceil_div(rows, 128), kMaxGridX));
      topk_kd_loss_bwd_entries_kernel<scalar_t><<<blocks, 128, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) {
  m.impl("topk_kd_loss_fwd", &augkd::cuda::topk_kd_loss_fwd_cuda);
  m.impl("topk_kd_loss_bwd", &augkd::cuda::topk_kd_loss_bwd_cuda);
}
