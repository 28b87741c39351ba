// Argument checks of the KD divergence ops (augkd::kd_divergence_fwd / _bwd), shared by the CPU and CUDA
// implementations; the helpers are those of op_checks.h. Header only, no backend headers.
#pragma once

#include "kd_divergence_math.h"
#include "op_checks.h"

namespace augkd::checks {

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

inline void check_divergence_bwd(const at::Tensor& grad_div, const at::Tensor& grad_ce, const at::Tensor& student,
                                 const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                                 const at::Tensor& stats, double temperature, int64_t divergence, double beta) {
  const char* op = "kd_divergence_bwd";
  check_divergence_inputs(op, student, teacher, target, temperature, divergence, beta);
  check_row_grad(op, "grad_div", grad_div, student);
  check_row_grad(op, "grad_ce", grad_ce, student);
  check_row_stats(op, stats, student, div::kStats, "the forward's per-row statistics");
}

}  // namespace augkd::checks
