// CUDA implementation of augkd::kd_divergence_fwd / augkd::kd_divergence_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md "KD divergences", device code in kernels/kd_divergence.cuh and kernels/kd_divergence_math.h).
//
// Launch layout
//   forward:  one block of kDivThreads per row (rows loop by gridDim.x): two sweeps, each with a block reduction.
//   backward: a 2-D grid of (column tile, row) blocks, each element written once from the row's stats.
// Everything runs on the current stream, with no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "divergence_checks.h"
#include "kd_divergence.cuh"
#include "launch_utils.h"
#include "op_dispatch.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> kd_divergence_fwd_cuda(AUGKD_KD_DIVERGENCE_FWD_PARAMS) {
  checks::check_divergence_inputs("kd_divergence", student, teacher, target, temperature, divergence, beta);
  const CudaScope scope("kd_divergence", "student", student);
  const bool has_target = checks::present(target);
  const at::Tensor s = aligned_input(student), t = aligned_input(teacher);
  const int64_t rows = s.size(0);
  at::Tensor loss = row_output(s, {rows});
  at::Tensor stats = row_output(s, {rows, div::kStats});
  if (rows == 0) return {loss, stats};
  const auto blocks = static_cast<unsigned>(std::min(rows, kMaxGridX));

  AUGKD_DISPATCH_FLOATING(s, "augkd_kd_divergence_fwd_cuda", {
    DivFwdParams<scalar_t> p{};
    set_pair_rows<scalar_t>(p, s, t, target, ignore_index);
    p.loss = loss.mutable_data_ptr<A>();
    p.stats = stats.mutable_data_ptr<A>();
    p.inv_t = static_cast<A>(1.0 / temperature);
    p.alpha = static_cast<A>(alpha);
    p.c = static_cast<A>(t2_scale ? temperature * temperature : 1.0);
    p.beta = static_cast<A>(beta);
    div::with_divergence(divergence, [&](auto code) {
      with_bool(has_target && temperature != 1.0, [&](auto n1) {
        kd_divergence_fwd_kernel<scalar_t, decltype(code)::value, decltype(n1)::value>
            <<<blocks, kDivThreads, 0, scope.stream>>>(p);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_divergence_bwd_cuda(AUGKD_KD_DIVERGENCE_BWD_PARAMS) {
  checks::check_divergence_bwd(grad_div, grad_ce, student, teacher, target, stats, temperature, divergence, beta);
  const CudaScope scope("kd_divergence_bwd", "student", student);
  const at::Tensor s = aligned_input(student), t = aligned_input(teacher);
  const int64_t rows = s.size(0), cols = s.size(1);
  at::Tensor gs = student_grad ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor gt = teacher_grad ? at::empty(t.sizes(), t.options()) : unused_grad(t);
  if (rows == 0 || (!student_grad && !teacher_grad)) return {gs, gt};

  AUGKD_DISPATCH_FLOATING(s, "augkd_kd_divergence_bwd_cuda", {
    DivBwdParams<scalar_t> p{};
    p.grad_div = grad_div.const_data_ptr<A>();
    p.grad_ce = grad_ce.const_data_ptr<A>();
    set_pair_rows<scalar_t>(p, s, t, target, ignore_index);
    p.stats = stats.const_data_ptr<A>();
    p.grad_s = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_t = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    p.tile = static_cast<int64_t>(kTileThreads) * kVec<scalar_t> * 4;
    p.inv_t = static_cast<A>(1.0 / temperature);
    p.beta = static_cast<A>(beta);
    const dim3 grid(static_cast<unsigned>(ceil_div(cols, p.tile)), static_cast<unsigned>(std::min(rows, kMaxGridY)));
    div::with_divergence(divergence, [&](auto code) {
      kd_divergence_bwd_kernel<scalar_t, decltype(code)::value><<<grid, kTileThreads, 0, scope.stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gs, gt};
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) { AUGKD_IMPL_FWD_BWD(m, kd_divergence, cuda); }
