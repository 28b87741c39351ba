// Argument checks of the KD divergence ops (augkd::kd_divergence_fwd / _bwd), shared by the CPU and CUDA
// implementations; the helpers are those of op_checks.h. Header only, no backend headers.
#pragma once

#include "kd_divergence_math.h"
#include "op_checks.h"

namespace augkd::checks {

// The parameters of augkd::kd_divergence_fwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_KD_DIVERGENCE_FWD_PARAMS                                                                   \
  const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,         \
  double temperature, double alpha, int64_t ignore_index, bool t2_scale, int64_t divergence, double beta

// student (B, V) float, teacher the same shape / dtype / device, target None or (B,) int64, a known
// divergence code, beta in [0, 1].
inline void check_divergence_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& target, double temperature,
                                    int64_t divergence, double beta) {
  check_kd_loss_inputs(op, student, teacher, target, temperature, 0.0, 0);
  TORCH_CHECK(divergence >= div::kKL && divergence <= div::kTVD, op,
              ": divergence must be 0 (kl), 1 (reverse_kl), 2 (jsd) or 3 (tvd), got ", divergence);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, op, ": beta must be in [0, 1], got ", beta);
}

// The parameters of augkd::kd_divergence_bwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_KD_DIVERGENCE_BWD_PARAMS                                                          \
  const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,             \
  const at::Tensor& teacher, const std::optional<at::Tensor>& target, const at::Tensor& stats,  \
  double temperature, int64_t ignore_index, int64_t divergence, double beta, bool student_grad, \
  bool teacher_grad

inline void check_divergence_bwd(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                                 const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                                 const at::Tensor& stats, double temperature, int64_t divergence, double beta) {
  const char* op = "kd_divergence_bwd";
  check_divergence_inputs(op, student, teacher, target, temperature, divergence, beta);
  check_pair_bwd_rows(op, student, {"grad_div", grad_div}, {"grad_ce", grad_ce}, stats, div::kStats,
                      "the forward's per-row statistics");
}

}  // namespace augkd::checks
