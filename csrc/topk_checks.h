// Argument checks of the top-k KD ops (augkd::topk_kd_loss_fwd / _bwd), shared by the CPU and CUDA
// implementations; the helpers are those of op_checks.h. Header only, no backend headers.
#pragma once

#include "op_checks.h"
#include "topk_kd.h"

namespace augkd::checks {

// The parameters of augkd::topk_kd_loss_fwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_TOPK_KD_LOSS_FWD_PARAMS                                                              \
  const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,                  \
  const std::optional<at::Tensor>& target, double temperature, double alpha, int64_t ignore_index, \
  bool t2_scale, int64_t values_format, int64_t tail, int64_t divergence

// student (B, V) float, V >= 1; indices (B, k) int64, 1 <= k <= V; values (B, k) in the row dtype
// (fp32, fp64 for fp64 student); target None or (B,) int64.
inline void check_topk_inputs(const char* op, const at::Tensor& student, const at::Tensor& indices,
                              const at::Tensor& values, const std::optional<at::Tensor>& target, double temperature,
                              double alpha, int64_t values_format, int64_t tail, int64_t divergence) {
  check_class_matrix(op, "student", student, "(rows, vocabulary)");
  TORCH_CHECK(indices.defined(), op, ": teacher_indices must be a defined tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.size(1) >= 1 &&
                  indices.size(1) <= student.size(1),
              op, ": teacher_indices must have shape (", student.size(0), ", k) with 1 <= k <= ", student.size(1),
              ", got ", shape_str(indices.sizes()));
  check_dtype(op, "teacher_indices", indices, at::kLong);
  check_same_device(op, "teacher_indices", indices, "student", student);
  check_contiguous(op, "teacher_indices", indices);
  TORCH_CHECK(values.defined(), op, ": teacher_values must be a defined tensor");
  check_same_shape(op, "teacher_values", values, "teacher_indices", indices);
  check_dtype(op, "teacher_values", values, row_dtype(student.scalar_type()));
  check_same_device(op, "teacher_values", values, "student", student);
  check_contiguous(op, "teacher_values", values);
  if (present(target)) check_row_vector(op, "target", *target, student.size(0), at::kLong, "student", student);
  check_temperature(op, temperature);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK(values_format == topk::kLogits || values_format == topk::kLogProbs, op,
              ": values_format must be 0 (logits) or 1 (log_probs), got ", values_format);
  TORCH_CHECK(tail == topk::kRenormalize || tail == topk::kBucket, op,
              ": tail must be 0 (renormalize) or 1 (bucket), got ", tail);
  TORCH_CHECK(tail != topk::kBucket || values_format == topk::kLogProbs, op,
              ": tail=bucket needs teacher log-probabilities (values_format 1): logits of k classes do not "
              "give the mass of the others");
  TORCH_CHECK(divergence == topk::kKL || divergence == topk::kReverseKL, op,
              ": divergence must be 0 (kl) or 1 (reverse_kl), got ", divergence);
}

// Every teacher index is a class in [0, classes): a ValueError naming the first bad one. Reads the indices
// on the host: the CPU launchers only (GPU kernels give a NaN row instead of a device sync).
inline void check_topk_indices(const char* op, const at::Tensor& indices, int64_t classes) {
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK_VALUE(idx[i] >= 0 && idx[i] < classes, op, ": teacher_indices holds class index ", idx[i],
                      ", outside [0, ", classes, ")");
  }
}

// The parameters of augkd::topk_kd_loss_bwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_TOPK_KD_LOSS_BWD_PARAMS                                                           \
  const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& indices,            \
  const at::Tensor& values, const std::optional<at::Tensor>& target, const at::Tensor& stats,   \
  double temperature, double alpha, int64_t ignore_index, bool t2_scale, int64_t values_format, \
  int64_t tail, int64_t divergence

// Everything the backward checks, for the CPU and CUDA launchers alike.
inline void check_topk_kd_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& indices,
                                   const at::Tensor& values, const std::optional<at::Tensor>& target,
                                   const at::Tensor& stats, double temperature, double alpha, int64_t values_format,
                                   int64_t tail, int64_t divergence) {
  const char* op = "topk_kd_loss_bwd";
  check_topk_inputs(op, student, indices, values, target, temperature, alpha, values_format, tail, divergence);
  check_row_stats(op, stats, student, topk::kStats, "the forward's per-row statistics");
  check_row_grad(op, "grad_loss", grad_loss, student);
}

}  // namespace augkd::checks
