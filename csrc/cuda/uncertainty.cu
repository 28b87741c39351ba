// CUDA implementation of augkd::uncertainty_fwd / augkd::uncertainty_bwd (schemas in csrc/schemas.cpp,
// math in docs/ops-design.md section 2, kernels in kernels/uncertainty.cuh on the row skeleton of
// kernels/row_reduce.cuh). Same launch layout as csrc/cuda/kd_loss.cu: a warp per row for C <= 1024, else a block per row (forward) or a 2-D grid of
// (column tile, row) blocks (backward). Current stream, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "op_checks.h"
#include "row_launch.h"
#include "uncertainty.cuh"

namespace augkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> uncertainty_fwd_cuda(const at::Tensor& logits, double temperature) {
  checks::check_uncertainty_fwd(logits, temperature);
  check_cuda("uncertainty", "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = aligned_input(logits);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  const auto row_opts = z.options().dtype(checks::row_dtype(z.scalar_type()));
  at::Tensor energy = at::empty({rows}, row_opts);
  at::Tensor entropy = at::empty({rows}, row_opts);
  if (rows == 0) return {energy, entropy};
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "augkd_uncertainty_fwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    UncFwdParams<scalar_t> p{};
    p.logits = z.const_data_ptr<scalar_t>();
    p.energy = energy.mutable_data_ptr<A>();
    p.entropy = entropy.mutable_data_ptr<A>();
    p.rows = rows;
    p.cols = cols;
    p.temperature = static_cast<A>(temperature);
    p.inv_t = static_cast<A>(1.0 / temperature);
    launch_row_reduce<UncFwdOp<scalar_t>>(p, choose_fwd_layout(rows, cols, kVec<scalar_t>, sm_count), z, stream);
  });
  return {energy, entropy};
}

at::Tensor uncertainty_bwd_cuda(const at::Tensor& grad_energy, const at::Tensor& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& energy, const at::Tensor& entropy,
                                double temperature) {
  checks::check_uncertainty_bwd(grad_energy, grad_entropy, logits, energy, entropy, temperature);
  check_cuda("uncertainty_bwd", "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = aligned_input(logits);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  at::Tensor grad = at::empty(z.sizes(), z.options());
  if (rows == 0) return grad;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "augkd_uncertainty_bwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    UncBwdParams<scalar_t> p{};
    p.grad_energy = grad_energy.const_data_ptr<A>();
    p.grad_entropy = grad_entropy.const_data_ptr<A>();
    p.logits = z.const_data_ptr<scalar_t>();
    p.energy = energy.const_data_ptr<A>();
    p.entropy = entropy.const_data_ptr<A>();
    p.grad_logits = grad.mutable_data_ptr<scalar_t>();
    p.rows = rows;
    p.cols = cols;
    p.temperature = static_cast<A>(temperature);
    p.inv_t = static_cast<A>(1.0 / temperature);
    launch_row_sweep<UncBwdOp<scalar_t>>(p, cols > kWarpRowMaxCols, stream);
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) {
  m.impl("uncertainty_fwd", &augkd::cuda::uncertainty_fwd_cuda);
  m.impl("uncertainty_bwd", &augkd::cuda::uncertainty_bwd_cuda);
}
