// Argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) implementations of the augkd ops.
// Every check raises a TORCH_CHECK (c10::Error -> RuntimeError in Python) whose message starts with the
// op name and names the argument and what was expected, e.g.
//   "kd_loss: teacher must have the same shape as student (4, 10), got (4, 11)".
// The schemas and the math are in docs/ops-design.md. The front-end (augkd/ops) makes inputs contiguous
// and casts them, so these checks reject what the kernels cannot take instead of converting.
//
// Header only, no backend headers: it is included from .cpp and .cu files alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

namespace augkd::checks {

// "(4, 10)", "(4,)", "()" -- Python's way of writing a shape.
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) os << ", ";
    os << sizes[i];
  }
  if (sizes.size() == 1) os << ',';
  os << ')';
  return os.str();
}

// Whether an optional tensor argument was given (None arrives as an empty optional or an undefined tensor).
inline bool present(const std::optional<at::Tensor>& x) { return x.has_value() && x->defined(); }

// The data of an optional tensor argument, nullptr when it was not given.
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& x) {
  return present(x) ? x->const_data_ptr<T>() : nullptr;
}

// The dtypes the kernels are instantiated for.
inline bool is_kernel_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// dtype of per-row outputs / stats / row gradients for a given input dtype: fp64 for fp64, fp32 otherwise.
inline c10::ScalarType row_dtype(c10::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(is_kernel_float(x.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous (shape ", shape_str(x.sizes()),
              ", strides ", shape_str(x.strides()), "); the front-end calls .contiguous()");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& x, int64_t dim, const char* what) {
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must be ", dim, "-D ", what, ", got shape ",
              shape_str(x.sizes()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", x.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(x.sizes() == ref.sizes(), op, ": ", name, " must have the same shape as ", ref_name, " ",
              shape_str(ref.sizes()), ", got ", shape_str(x.sizes()));
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ", ref_name,
              " (", ref.scalar_type(), "), got ", x.scalar_type());
}

// `x` must be defined, contiguous, and have the shape, dtype and device of `ref` (its partner input).
inline void check_like(const char* op, const char* name, const at::Tensor& x, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a defined tensor");
  check_same_shape(op, name, x, ref_name, ref);
  check_same_dtype(op, name, x, ref_name, ref);
  check_same_device(op, name, x, ref_name, ref);
  check_contiguous(op, name, x);
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& x, c10::ScalarType want) {
  TORCH_CHECK(x.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ", x.scalar_type());
}

// A (rows,) vector on ref's device, contiguous, of dtype `want`.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& x, int64_t rows,
                             c10::ScalarType want, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == rows, op, ": ", name, " must have shape (", rows, ",) (one per row of ",
              ref_name, "), got ", shape_str(x.sizes()));
  check_dtype(op, name, x, want);
  check_same_device(op, name, x, ref_name, ref);
  check_contiguous(op, name, x);
}

// x: a (rows, classes) float matrix with at least one class, contiguous; `what` names its dimensions.
inline void check_class_matrix(const char* op, const char* name, const at::Tensor& x,
                               const char* what = "(rows, classes)") {
  check_float_input(op, name, x);
  check_dim(op, name, x, 2, what);
  TORCH_CHECK(x.size(1) >= 1, op, ": ", name, " must have at least one class, got shape ", shape_str(x.sizes()));
  check_contiguous(op, name, x);
}

// A per-row gradient a backward takes: a (rows,) vector in student's row dtype, on its device, contiguous.
inline void check_row_grad(const char* op, const char* name, const at::Tensor& grad, const at::Tensor& student) {
  check_row_vector(op, name, grad, student.size(0), row_dtype(student.scalar_type()), "student", student);
}

// The forward's per-row statistics a backward takes back: a (rows, width) matrix in student's row dtype, on
// its device, contiguous; `what` says what the columns hold.
inline void check_row_stats(const char* op, const at::Tensor& stats, const at::Tensor& student, int64_t width,
                            const char* what) {
  const int64_t rows = student.size(0);
  TORCH_CHECK(stats.defined(), op, ": stats must be a defined tensor");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == width, op, ": stats must have shape (",
              rows, ", ", width, ") (", what, "), got ", shape_str(stats.sizes()));
  check_dtype(op, "stats", stats, row_dtype(student.scalar_type()));
  check_same_device(op, "stats", stats, "student", student);
  check_contiguous(op, "stats", stats);
}

// An upstream gradient of a per-row output, with the name the op gives it.
struct NamedGrad {
  const char* name;
  const at::Tensor& grad;
};

// The per-row tensors of the backward of a two-output row op (kd_loss, kd_divergence): the two upstream
// gradients, then the forward's stats (check_row_stats).
inline void check_pair_bwd_rows(const char* op, const at::Tensor& student, const NamedGrad& g1, const NamedGrad& g2,
                                const at::Tensor& stats, int64_t width, const char* what) {
  check_row_grad(op, g1.name, g1.grad, student);
  check_row_grad(op, g2.name, g2.grad, student);
  check_row_stats(op, stats, student, width, what);
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": temperature must be a finite number > 0, got ", temperature);
}

// Every label is ignore_index or a class in [0, classes): a ValueError naming the first bad one. Reads the
// labels on the host: the CPU launchers only (GPU kernels give a NaN row instead of a device sync).
inline void check_labels(const char* op, const std::optional<at::Tensor>& target, int64_t classes,
                         int64_t ignore_index) {
  const int64_t* y = data_or_null<int64_t>(target);
  for (int64_t i = 0; y != nullptr && i < target->numel(); ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < classes), op, ": target holds class index ",
                      y[i], ", outside [0, ", classes, ") (and not ignore_index=", ignore_index, ")");
  }
}

// ---------------------------------------------------------------------------------------------------------
// KD loss
// ---------------------------------------------------------------------------------------------------------

// The temperatures kd_loss accepts (augkd/ops/reference.py TEMPERATURE_RANGE): inside, every backend is
// accurate against float64; outside, T^2, 1/T or the KL leave the fp32 range for ordinary logits.
constexpr double kKdMinTemperature = 1e-15;
constexpr double kKdMaxTemperature = 1e10;

// Columns of the kd_loss stats: [M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L] (docs/ops-design.md).
constexpr int64_t kKdStats = 8;

// student (B, C) float, C >= 1; teacher same shape/dtype/device; target None or (B,) int64.
inline void check_kd_loss_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                 const std::optional<at::Tensor>& target, double temperature, double alpha,
                                 int64_t teacher_format) {
  check_class_matrix(op, "student", student);
  check_like(op, "teacher", teacher, "student", student);
  if (present(target)) check_row_vector(op, "target", *target, student.size(0), at::kLong, "student", student);
  check_temperature(op, temperature);
  TORCH_CHECK_VALUE(temperature >= kKdMinTemperature && temperature <= kKdMaxTemperature, op,
                    ": temperature must be in [", kKdMinTemperature, ", ", kKdMaxTemperature,
                    "] (the range tested against float64), got ", temperature);
  TORCH_CHECK(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  TORCH_CHECK(teacher_format >= 0 && teacher_format <= 2, op,
              ": teacher_format must be 0 (logits), 1 (log_probs) or 2 (probs), got ", teacher_format);
}

// The parameters of augkd::kd_loss_fwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_KD_LOSS_FWD_PARAMS                                                                 \
  const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target, \
  double temperature, double alpha, int64_t ignore_index, bool t2_scale, int64_t teacher_format

inline void check_kd_loss_fwd(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& target, double temperature, double alpha,
                              int64_t teacher_format) {
  check_kd_loss_inputs("kd_loss", student, teacher, target, temperature, alpha, teacher_format);
}

// The parameters of augkd::kd_loss_bwd (csrc/schemas.cpp), as both backends' implementations take them.
#define AUGKD_KD_LOSS_BWD_PARAMS                                                                 \
  const at::Tensor& grad_loss, const at::Tensor& grad_lse_t, const at::Tensor& student,          \
  const at::Tensor& teacher, const std::optional<at::Tensor>& target, const at::Tensor& stats,   \
  double temperature, double alpha, int64_t ignore_index, bool t2_scale, int64_t teacher_format, \
  bool student_grad, bool teacher_grad

// grad_loss, grad_lse_t: (B,) in the row dtype (fp32; fp64 for fp64 input); stats (B, 8) row dtype.
inline void check_kd_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad_lse_t, const at::Tensor& student,
                              const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                              const at::Tensor& stats, double temperature, double alpha, int64_t teacher_format) {
  const char* op = "kd_loss_bwd";
  check_kd_loss_inputs(op, student, teacher, target, temperature, alpha, teacher_format);
  check_pair_bwd_rows(op, student, {"grad_loss", grad_loss}, {"grad_lse_t", grad_lse_t}, stats, kKdStats,
                      "[M_s, lse_t, M_t, log d_s, log d_t, log d_1, mu, L] per row, from kd_loss_fwd");
}

// The parameters of augkd::kd_loss_grad_ (csrc/schemas.cpp): kd_loss_fwd then kd_loss_bwd of teacher logits,
// the gradients written over the logits (student_grad / teacher_grad), no teacher-energy gradient.
#define AUGKD_KD_LOSS_GRAD_PARAMS                                                                               \
  at::Tensor& student, at::Tensor& teacher, const std::optional<at::Tensor>& target, const at::Tensor& grad_loss, \
  double temperature, double alpha, int64_t ignore_index, bool t2_scale, bool student_grad, bool teacher_grad

// As kd_loss_fwd with teacher logits, plus grad_loss (B,) in the row dtype; student and teacher distinct.
inline void check_kd_loss_grad(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, const at::Tensor& grad_loss,
                               double temperature, double alpha) {
  const char* op = "kd_loss_grad_";
  check_kd_loss_inputs(op, student, teacher, target, temperature, alpha, 0);
  check_row_grad(op, "grad_loss", grad_loss, student);
  TORCH_CHECK(student.numel() == 0 || student.data_ptr() != teacher.data_ptr(), op,
              ": student and teacher must be different tensors (each takes its own gradient in place)");
}

// ---------------------------------------------------------------------------------------------------------
// Uncertainty
// ---------------------------------------------------------------------------------------------------------

inline void check_uncertainty_fwd(const at::Tensor& logits, double temperature) {
  const char* op = "uncertainty";
  check_class_matrix(op, "logits", logits);
  check_temperature(op, temperature);
}

// grad_energy, grad_entropy, energy, entropy: (B,) in the row dtype.
inline void check_uncertainty_bwd(const at::Tensor& grad_energy, const at::Tensor& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& energy, const at::Tensor& entropy,
                                  double temperature) {
  const char* op = "uncertainty_bwd";
  check_class_matrix(op, "logits", logits);
  check_temperature(op, temperature);
  const int64_t rows = logits.size(0);
  const auto rdt = row_dtype(logits.scalar_type());
  check_row_vector(op, "grad_energy", grad_energy, rows, rdt, "logits", logits);
  check_row_vector(op, "grad_entropy", grad_entropy, rows, rdt, "logits", logits);
  check_row_vector(op, "energy", energy, rows, rdt, "logits", logits);
  check_row_vector(op, "entropy", entropy, rows, rdt, "logits", logits);
}

// ---------------------------------------------------------------------------------------------------------
// Mixup
// ---------------------------------------------------------------------------------------------------------

// s: None (use s_scalar) or a (B,) tensor with the dtype and device of ref.
inline void check_mix_s(const char* op, const std::optional<at::Tensor>& s, int64_t rows, const char* ref_name,
                        const at::Tensor& ref) {
  if (present(s)) check_row_vector(op, "s", *s, rows, ref.scalar_type(), ref_name, ref);
}

// z, psi (B, L) same dtype/device; mask (B, L) or (1, L) same dtype; s None or (B,); grad_out (when given) like z.
inline void check_latent_mixup(const char* op, const at::Tensor* grad_out, const at::Tensor& z, const at::Tensor& mask,
                               const at::Tensor& psi, const std::optional<at::Tensor>& s) {
  check_float_input(op, "z", z);
  check_dim(op, "z", z, 2, "(rows, latent)");
  check_contiguous(op, "z", z);
  check_like(op, "psi", psi, "z", z);
  TORCH_CHECK(mask.defined(), op, ": mask must be a defined tensor");
  TORCH_CHECK(mask.dim() == 2 && (mask.size(0) == z.size(0) || mask.size(0) == 1) && mask.size(1) == z.size(1), op,
              ": mask must have shape ", shape_str(z.sizes()), " or (1, ", z.size(1), "), got ",
              shape_str(mask.sizes()));
  check_same_dtype(op, "mask", mask, "z", z);
  check_same_device(op, "mask", mask, "z", z);
  check_contiguous(op, "mask", mask);
  check_mix_s(op, s, z.size(0), "z", z);
  if (grad_out != nullptr) {
    check_like(op, "grad_out", *grad_out, "z", z);
  }
}

inline void check_latent_mixup_fwd(const at::Tensor& z, const at::Tensor& mask, const at::Tensor& psi,
                                   const std::optional<at::Tensor>& s) {
  check_latent_mixup("latent_mixup", nullptr, z, mask, psi, s);
}

inline void check_latent_mixup_bwd(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& mask,
                                   const at::Tensor& psi, const std::optional<at::Tensor>& s) {
  check_latent_mixup("latent_mixup_bwd", &grad_out, z, mask, psi, s);
}

// mean / std: None or (C,) float32 on generated's device.
inline void check_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& v,
                                 const at::Tensor& generated) {
  if (!present(v)) return;
  const int64_t channels = generated.size(1);
  TORCH_CHECK(v->dim() == 1 && v->size(0) == channels, op, ": ", name, " must have shape (", channels,
              ",) (one per channel of generated ", shape_str(generated.sizes()), "), got ", shape_str(v->sizes()));
  check_dtype(op, name, *v, at::kFloat);
  check_same_device(op, name, *v, "generated", generated);
  check_contiguous(op, name, *v);
}

// generated, real (B, C, H, W) same dtype/device; s None or (B,); mean/std None or (C,) fp32.
inline void check_pixel_mixup(const char* op, const at::Tensor* grad_out, const at::Tensor& generated,
                              const at::Tensor& real, const std::optional<at::Tensor>& s,
                              const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  check_float_input(op, "generated", generated);
  check_dim(op, "generated", generated, 4, "(batch, channels, height, width)");
  check_contiguous(op, "generated", generated);
  check_like(op, "real", real, "generated", generated);
  check_mix_s(op, s, generated.size(0), "generated", generated);
  check_channel_vector(op, "mean", mean, generated);
  check_channel_vector(op, "std", std_dev, generated);
  if (grad_out != nullptr) {
    check_like(op, "grad_out", *grad_out, "generated", generated);
  }
}

inline void check_pixel_mixup_fwd(const at::Tensor& generated, const at::Tensor& real,
                                  const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& mean,
                                  const std::optional<at::Tensor>& std_dev) {
  check_pixel_mixup("pixel_mixup", nullptr, generated, real, s, mean, std_dev);
}

inline void check_pixel_mixup_bwd(const at::Tensor& grad_out, const at::Tensor& generated, const at::Tensor& real,
                                  const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& mean,
                                  const std::optional<at::Tensor>& std_dev) {
  check_pixel_mixup("pixel_mixup_bwd", &grad_out, generated, real, s, mean, std_dev);
}

}  // namespace augkd::checks
