// CUDA implementation of augkd::kd_divergence_fwd / augkd::kd_divergence_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md "KD divergences", device code in kernels/kd_divergence.cuh and kernels/kd_divergence_math.h).
//
// Launch layout
//   forward:  one block of kDivThreads per row (rows loop by gridDim.x): two sweeps, each with a block reduction.
//   backward: a 2-D grid of (column tile, row) blocks, each element written once from the row's stats.
// Everything runs on the current stream, with no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "divergence_checks.h"
#include "kd_divergence.cuh"
#include "launch_utils.h"

namespace augkd::cuda {
namespace {

template <typename F>
void with_divergence(int64_t code, F&& f) {
  switch (code) {
    case div::kKL: f(std::integral_constant<int, div::kKL>{}); break;
    case div::kReverseKL: f(std::integral_constant<int, div::kReverseKL>{}); break;
    case div::kJSD: f(std::integral_constant<int, div::kJSD>{}); break;
    default: f(std::integral_constant<int, div::kTVD>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor> kd_divergence_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& target,
                                                          double temperature, double alpha, int64_t ignore_index,
                                                          bool t2_scale, int64_t divergence, double beta) {
  checks::check_divergence_inputs("kd_divergence", student, teacher, target, temperature, divergence, beta);
  check_cuda("kd_divergence", "student", student);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor s = aligned_input(student), t = aligned_input(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  const auto row_opts = s.options().dtype(checks::row_dtype(s.scalar_type()));
  at::Tensor loss = at::empty({rows}, row_opts);
  at::Tensor stats = at::empty({rows, div::kStats}, row_opts);
  if (rows == 0) return {loss, stats};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(std::min(rows, kMaxGridX));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "augkd_kd_divergence_fwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    DivFwdParams<scalar_t> p{};
    p.student = s.const_data_ptr<scalar_t>();
    p.teacher = t.const_data_ptr<scalar_t>();
    p.target = has_target ? target->const_data_ptr<int64_t>() : nullptr;
    p.loss = loss.mutable_data_ptr<A>();
    p.stats = stats.mutable_data_ptr<A>();
    p.rows = rows;
    p.cols = cols;
    p.ignore_index = ignore_index;
    p.inv_t = static_cast<A>(1.0 / temperature);
    p.alpha = static_cast<A>(alpha);
    p.c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    p.beta = static_cast<A>(beta);
    with_divergence(divergence, [&](auto code) {
      constexpr int DIV = decltype(code)::value;
      if (has_target && temperature != 1.0) {
        kd_divergence_fwd_kernel<scalar_t, DIV, true><<<blocks, kDivThreads, 0, stream>>>(p);
      } else {
        kd_divergence_fwd_kernel<scalar_t, DIV, false><<<blocks, kDivThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_divergence_bwd_cuda(const at::Tensor& grad_div, const at::Tensor& grad_ce,
                                                          const at::Tensor& student, const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& target,
                                                          const at::Tensor& stats, double temperature,
                                                          int64_t ignore_index, int64_t divergence, double beta,
                                                          bool student_grad, bool teacher_grad) {
  checks::check_divergence_bwd(grad_div, grad_ce, student, teacher, target, stats, temperature, divergence, beta);
  check_cuda("kd_divergence_bwd", "student", student);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_target = target.has_value() && target->defined();
  const at::Tensor s = aligned_input(student), t = aligned_input(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  at::Tensor gs = student_grad ? at::empty(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor gt = teacher_grad ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());
  if (rows == 0 || (!student_grad && !teacher_grad)) return {gs, gt};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "augkd_kd_divergence_bwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    DivBwdParams<scalar_t> p{};
    p.grad_div = grad_div.const_data_ptr<A>();
    p.grad_ce = grad_ce.const_data_ptr<A>();
    p.student = s.const_data_ptr<scalar_t>();
    p.teacher = t.const_data_ptr<scalar_t>();
    p.target = has_target ? target->const_data_ptr<int64_t>() : nullptr;
    p.stats = stats.const_data_ptr<A>();
    p.grad_s = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_t = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    p.rows = rows;
    p.cols = cols;
    p.ignore_index = ignore_index;
    p.tile = static_cast<int64_t>(kTileThreads) * kVec<scalar_t> * 4;
    p.inv_t = static_cast<A>(1.0 / temperature);
    p.beta = static_cast<A>(beta);
    const dim3 grid(static_cast<unsigned>(ceil_div(cols, p.tile)), static_cast<unsigned>(std::min(rows, kMaxGridY)));
    with_divergence(divergence, [&](auto code) {
      kd_divergence_bwd_kernel<scalar_t, decltype(code)::value><<<grid, kTileThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gs, gt};
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) {
  m.impl("kd_divergence_fwd", &augkd::cuda::kd_divergence_fwd_cuda);
  m.impl("kd_divergence_bwd", &augkd::cuda::kd_divergence_bwd_cuda);
}
