// The op schemas, registered once. Backends add implementations with TORCH_LIBRARY_IMPL:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA). Every *_bwd op takes one "<input>_grad" flag per
// differentiable input: a gradient not asked for is neither computed nor allocated (an empty (0,) tensor
// is returned in its place), so a backward moves only the bytes the caller needs. The math behind each op is derived in
// docs/ops-design.md; the Triton backend registers the same signatures under augkd_triton.
#include <Python.h>
#include <torch/library.h>

// `import augkd._C` only needs to load this shared object; registration happens in static
// initialisers, so the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(augkd, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
      "int ignore_index, bool t2_scale, int teacher_format) -> (Tensor loss, Tensor stats)");
  m.def(
      "kd_loss_bwd(Tensor grad_loss, Tensor grad_lse_t, Tensor student, Tensor teacher, Tensor? target, "
      "Tensor stats, float temperature, float alpha, int ignore_index, bool t2_scale, int teacher_format, "
      "bool student_grad, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
  m.def("uncertainty_fwd(Tensor logits, float temperature) -> (Tensor energy, Tensor entropy)");
  m.def(
      "uncertainty_bwd(Tensor grad_energy, Tensor grad_entropy, Tensor logits, Tensor energy, "
      "Tensor entropy, float temperature) -> Tensor");
  m.def("latent_mixup_fwd(Tensor z, Tensor mask, Tensor psi, Tensor? s, float s_scalar) -> Tensor");
  m.def(
      "latent_mixup_bwd(Tensor grad_out, Tensor z, Tensor mask, Tensor psi, Tensor? s, float s_scalar, "
      "bool z_grad, bool mask_grad, bool psi_grad, bool s_grad) "
      "-> (Tensor grad_z, Tensor grad_mask, Tensor grad_psi, Tensor grad_s)");
  m.def(
      "pixel_mixup_fwd(Tensor generated, Tensor real, Tensor? s, float s_scalar, Tensor? mean, "
      "Tensor? std) -> Tensor");
  m.def(
      "pixel_mixup_bwd(Tensor grad_out, Tensor generated, Tensor real, Tensor? s, float s_scalar, "
      "Tensor? mean, Tensor? std, bool generated_grad, bool real_grad, bool s_grad) "
      "-> (Tensor grad_generated, Tensor grad_real, Tensor grad_s)");
  m.def(
      "topk_kd_loss_fwd(Tensor student, Tensor indices, Tensor values, Tensor? target, float temperature, "
      "float alpha, int ignore_index, bool t2_scale, int values_format, int tail, int divergence) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "topk_kd_loss_bwd(Tensor grad_loss, Tensor student, Tensor indices, Tensor values, Tensor? target, "
      "Tensor stats, float temperature, float alpha, int ignore_index, bool t2_scale, int values_format, "
      "int tail, int divergence) -> Tensor");
}

// Lets Python ask whether the CUDA kernels were compiled into this build.
TORCH_LIBRARY_FRAGMENT(augkd, m) {
  m.def("built_with_cuda() -> bool", []() -> bool {
#ifdef AUGKD_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

// The KD divergence family (docs/ops-design.md, "KD divergences"): divergence 0 kl, 1 reverse_kl, 2 jsd (beta
// weights the teacher in the mixture), 3 tvd. The backward takes the gradient on each row's divergence D and on
// its CE (stats columns 5 and 6), so the per-row parts the front-end returns are differentiable too.
TORCH_LIBRARY_FRAGMENT(augkd, m) {
  m.def(
      "kd_divergence_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
      "int ignore_index, bool t2_scale, int divergence, float beta) -> (Tensor loss, Tensor stats)");
  m.def(
      "kd_divergence_bwd(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor teacher, Tensor? target, "
      "Tensor stats, float temperature, int ignore_index, int divergence, float beta, bool student_grad, "
      "bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
}

// kd_loss_fwd and kd_loss_bwd of teacher logits in one sweep, the gradients written over the logits they come
// from (student when student_grad, teacher when teacher_grad): the row chunks of fused_linear_kd_loss, which
// need no logits after their gradients and so hold one buffer fewer. Not differentiable; CPU only (elsewhere
// the fused linear loss runs kd_loss_fwd / kd_loss_bwd).
TORCH_LIBRARY_FRAGMENT(augkd, m) {
  m.def(
      "kd_loss_grad_(Tensor(a!) student, Tensor(b!) teacher, Tensor? target, Tensor grad_loss, float temperature, "
      "float alpha, int ignore_index, bool t2_scale, bool student_grad, bool teacher_grad) -> Tensor loss");
}
