// CUDA implementation of augkd::uncertainty_fwd / augkd::uncertainty_bwd (schemas in csrc/schemas.cpp,
// math in docs/ops-design.md section 2, kernels in kernels/uncertainty.cuh on the row skeleton of
// kernels/row_reduce.cuh). Same launch layout as csrc/cuda/kd_loss.cu: a warp per row for C <= 1024,
// else a block per row (forward) or a 2-D grid of (column tile, row) blocks (backward). Current stream,
// no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "op_checks.h"
#include "op_dispatch.h"
#include "op_outputs.h"
#include "op_register.h"
#include "row_launch.h"
#include "uncertainty.cuh"

namespace augkd::cuda {
namespace {

// The inputs that the forward and the backward kernels share (UncInputs), set alike for both.
template <typename T>
void set_unc_inputs(UncInputs<T>& p, const at::Tensor& z, double temperature) {
  p.logits = z.const_data_ptr<T>();
  p.rows = z.size(0);
  p.cols = z.size(1);
  p.temperature = static_cast<acc_type<T>>(temperature);
  p.inv_t = static_cast<acc_type<T>>(1.0 / temperature);
}

std::tuple<at::Tensor, at::Tensor> uncertainty_fwd_cuda(const at::Tensor& logits, double temperature) {
  checks::check_uncertainty_fwd(logits, temperature);
  const CudaScope scope("uncertainty", "logits", logits);
  const at::Tensor z = aligned_input(logits);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  at::Tensor energy = row_output(z, {rows});
  at::Tensor entropy = row_output(z, {rows});
  if (rows == 0) return {energy, entropy};
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  AUGKD_DISPATCH_FLOATING(z, "augkd_uncertainty_fwd_cuda", {
    UncFwdParams<scalar_t> p{};
    set_unc_inputs<scalar_t>(p, z, temperature);
    p.energy = energy.mutable_data_ptr<A>();
    p.entropy = entropy.mutable_data_ptr<A>();
    const FwdLayout lay = choose_fwd_layout(rows, cols, kVec<scalar_t>, sm_count);
    launch_row_reduce<UncFwdVisitor<scalar_t>>(p, lay, z, scope.stream);
  });
  return {energy, entropy};
}

at::Tensor uncertainty_bwd_cuda(const at::Tensor& grad_energy, const at::Tensor& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& energy, const at::Tensor& entropy,
                                double temperature) {
  checks::check_uncertainty_bwd(grad_energy, grad_entropy, logits, energy, entropy, temperature);
  const CudaScope scope("uncertainty_bwd", "logits", logits);
  const at::Tensor z = aligned_input(logits);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  at::Tensor grad = at::empty(z.sizes(), z.options());
  if (rows == 0) return grad;

  AUGKD_DISPATCH_FLOATING(z, "augkd_uncertainty_bwd_cuda", {
    UncBwdParams<scalar_t> p{};
    set_unc_inputs<scalar_t>(p, z, temperature);
    p.grad_energy = grad_energy.const_data_ptr<A>();
    p.grad_entropy = grad_entropy.const_data_ptr<A>();
    p.energy = energy.const_data_ptr<A>();
    p.entropy = entropy.const_data_ptr<A>();
    p.grad_logits = grad.mutable_data_ptr<scalar_t>();
    launch_row_sweep<UncBwdVisitor<scalar_t>>(p, cols > kWarpRowMaxCols, scope.stream);
  });
  return grad;
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) { AUGKD_IMPL_FWD_BWD(m, uncertainty, cuda); }
