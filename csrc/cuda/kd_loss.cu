// CUDA implementation of augkd::kd_loss_fwd / augkd::kd_loss_bwd (schemas in csrc/schemas.cpp, math in
// docs/ops-design.md section 1, kernels in kernels/kd_loss.cuh).
//
// Launch layout (choose_fwd_layout in launch_utils.h, RowMode in kernels/reduce.cuh; the kernels are those
// of the row skeleton, kernels/row_reduce.cuh, launched by csrc/cuda/row_launch.h)
//   forward:  C <= 1024: one warp per row, kRowWarps rows per block;
//             fewer rows than 2 x SMs: each row split into parts (one block each) whose partial online
//             states go to a workspace, then one thread per row merges them in order;
//             otherwise one block per row. Per-thread states are merged by warp shuffles, then through
//             shared memory; 128..512 threads per block (about 4 vectors per thread).
//   refine:   after the forward, a second sweep over the rows whose one-pass KL is ill-conditioned
//             (kd_needs_refine; the other rows return at once): one warp per row for C <= 1024, else one
//             block per row.
//   backward: C <= 1024: one warp per row; larger C: a 2-D grid of (column tile, row) blocks.
// Everything runs on the current stream, with no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "kd_loss.cuh"
#include "op_checks.h"
#include "op_dispatch.h"
#include "op_outputs.h"
#include "op_register.h"
#include "row_launch.h"

namespace augkd::cuda {
namespace {

// The forward in its layout, then the refine sweep (a warp per row for C <= 1024, else a block).
template <typename T, bool NEED1>
void launch_kd_fwd(const KdFwdParams<T>& p, const FwdLayout& lay, const at::Tensor& like, cudaStream_t stream) {
  launch_row_reduce<KdFwdVisitor<T, NEED1>>(p, lay, like, stream);
  const FwdLayout refine{p.cols <= kWarpRowMaxCols ? RowMode::kWarp : RowMode::kBlock, kTileThreads, 1, p.cols};
  launch_row_reduce<KdRefineVisitor<T>>(p, refine, like, stream);
}

// KdFwdParams or KdBwdParams (P) with the inputs and scalars they share, set alike for the forward and
// backward; the rest zero.
template <typename T, template <typename> class P>
P<T> kd_params(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& target,
               double temperature, double alpha, int64_t ignore_index, bool t2_scale, int64_t teacher_format) {
  using A = acc_type<T>;
  P<T> p{};
  set_pair_rows<T>(p, s, t, target, ignore_index);
  p.inv_t = static_cast<A>(1.0 / temperature);
  p.alpha_c = static_cast<A>(alpha * (t2_scale ? temperature * temperature : 1.0));
  p.use_kl = alpha != 0.0;
  p.use_ce = checks::present(target) && alpha != 1.0;
  p.fmt = static_cast<int>(teacher_format);
  return p;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(AUGKD_KD_LOSS_FWD_PARAMS) {
  checks::check_kd_loss_fwd(student, teacher, target, temperature, alpha, teacher_format);
  const CudaScope scope("kd_loss", "student", student);
  const bool has_target = checks::present(target);
  const at::Tensor s = aligned_input(student);
  const at::Tensor t = aligned_input(teacher);
  const int64_t rows = s.size(0);
  const int64_t cols = s.size(1);
  at::Tensor loss = row_output(s, {rows});
  at::Tensor stats = row_output(s, {rows, kKdStats});
  if (rows == 0) return {loss, stats};

  const bool need1 = has_target && temperature != 1.0;  // the CE needs its own sum d_1
  const int64_t sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  AUGKD_DISPATCH_FLOATING(s, "augkd_kd_loss_fwd_cuda", {
    auto p = kd_params<scalar_t, KdFwdParams>(s, t, target, temperature, alpha, ignore_index, t2_scale, teacher_format);
    p.loss = loss.mutable_data_ptr<A>();
    p.stats = stats.mutable_data_ptr<A>();
    p.one_minus_alpha = static_cast<A>(1.0 - alpha);
    const FwdLayout lay = choose_fwd_layout(rows, cols, kVec<scalar_t>, sm_count);
    with_bool(need1, [&](auto n1) { launch_kd_fwd<scalar_t, decltype(n1)::value>(p, lay, s, scope.stream); });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cuda(AUGKD_KD_LOSS_BWD_PARAMS) {
  checks::check_kd_loss_bwd(grad_loss, grad_lse_t, student, teacher, target, stats, temperature, alpha,
                            teacher_format);
  const CudaScope scope("kd_loss_bwd", "student", student);
  const at::Tensor s = aligned_input(student);
  const at::Tensor t = aligned_input(teacher);
  const int64_t rows = s.size(0);
  const int64_t cols = s.size(1);
  // Requested gradients are fresh (hence aligned) contiguous tensors; the others are empty (0,) tensors.
  at::Tensor grad_student = student_grad ? at::empty(s.sizes(), s.options()) : unused_grad(s);
  at::Tensor grad_teacher = teacher_grad ? at::empty(t.sizes(), t.options()) : unused_grad(t);
  if (rows == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};

  const double c = t2_scale ? temperature * temperature : 1.0;

  AUGKD_DISPATCH_FLOATING(s, "augkd_kd_loss_bwd_cuda", {
    auto p = kd_params<scalar_t, KdBwdParams>(s, t, target, temperature, alpha, ignore_index, t2_scale, teacher_format);
    p.grad_loss = grad_loss.const_data_ptr<A>();
    p.grad_lse_t = grad_lse_t.const_data_ptr<A>();
    p.stats = stats.const_data_ptr<A>();
    p.grad_student = student_grad ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_teacher = teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    p.temperature = static_cast<A>(temperature);
    p.ks = static_cast<A>(alpha * c / temperature);
    p.kce = static_cast<A>(1.0 - alpha);
    p.t_is_one = temperature == 1.0;
    launch_row_sweep<KdBwdVisitor<scalar_t>>(p, cols > kWarpRowMaxCols, scope.stream);
  });
  return {grad_student, grad_teacher};
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) { AUGKD_IMPL_FWD_BWD(m, kd_loss, cuda); }
