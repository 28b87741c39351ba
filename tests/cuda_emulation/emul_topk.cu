// Host emulation of the top-k KD kernels (kernels/topk_kd_loss.cuh): the per-thread sweeps, the butterfly
// merges of a warp / block, the row finish, the dense backward over column tiles and the k-entry backward,
// against a direct double-precision computation. Build and run: tests/cuda_emulation/run.sh.
// Keep the launch arithmetic here in step with csrc/cuda/topk_kd_loss.cu.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "emul_common.h"
#include "topk_kd_loss.cuh"

using namespace augkd::cuda;
namespace tk = augkd::topk;

template <typename T, bool NEED1>
void run_case(int64_t rows, int64_t cols, int64_t k, double temp, double alpha, int tail, int div, bool target,
              std::mt19937& rng, const char* tag) {
  using A = acc_type<T>;
  std::normal_distribution<double> nd(0, 2);
  std::vector<T> s(rows * cols);
  std::vector<int64_t> idx(rows * k), y(rows);
  std::vector<A> val(rows * k);
  std::vector<double> sd(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) {
    s[i] = from_double<T>(nd(rng));
    sd[i] = to_double(s[i]);
  }
  if (cols > 3) {  // a masked class off the k entries
    s[cols - 1] = from_double<T>(-INFINITY);
    sd[cols - 1] = -INFINITY;
  }
  for (int64_t r = 0; r < rows; ++r) {
    // teacher: k distinct classes (a stride walk) with log-probabilities holding mass 0.9 (bucket: 0.1 missing)
    std::vector<double> logit(k);
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < k; ++j) mx = std::max(mx, logit[j] = nd(rng));
    for (int64_t j = 0; j < k; ++j) sum += std::exp(logit[j] - mx);
    for (int64_t j = 0; j < k; ++j) {
      idx[r * k + j] = (r * 7 + j * 5) % (cols - (cols > 3 ? 1 : 0));
      val[r * k + j] = static_cast<A>(logit[j] - mx - std::log(sum) + std::log(0.9));
    }
    y[r] = r % 3 == 2 ? -100 : (r * 11) % cols;
    if (y[r] == cols - 1 && cols > 3) y[r] = 0;
  }
  // the inputs both parameter blocks share, set alike (as set_topk_inputs in csrc/cuda/topk_kd_loss.cu)
  auto set_inputs = [&](auto& q) {
    q.student = s.data();
    q.idx = idx.data();
    q.val = val.data();
    q.target = target ? y.data() : nullptr;
    q.rows = rows;
    q.cols = cols;
    q.k = k;
    q.ignore_index = -100;
    q.args = {static_cast<A>(1 / temp), k, cols, tail, div};
  };
  // forward, with the launcher's layout
  std::vector<A> loss(rows), stats(rows * tk::kStats);
  TopkFwdParams<T> p{};
  set_inputs(p);
  p.loss = loss.data();
  p.stats = stats.data();
  p.alpha_c = static_cast<A>(alpha * temp * temp);
  p.one_minus_alpha = static_cast<A>(1 - alpha);
  p.use_kl = alpha != 0;
  p.use_ce = target && alpha != 1;
  emu_row_reduce<TopkFwdVisitor<T, NEED1>>(p, cols <= 1024 ? 32 : 128, 1);
  // backward: dense tiles, then the k entries
  std::vector<A> gl(rows);
  for (auto& g : gl) g = static_cast<A>(0.5 + std::fabs(nd(rng)) * 0.25);
  std::vector<T> grad(rows * cols);
  TopkBwdParams<T> b{};
  set_inputs(b);
  b.grad_loss = gl.data();
  b.stats = stats.data();
  b.grad = grad.data();
  b.ks = alpha != 0 ? static_cast<A>(alpha * temp) : A(0);
  b.kce = target && alpha != 1 ? static_cast<A>(1 - alpha) : A(0);
  b.tile = static_cast<int64_t>(kTileThreads) * kVec<T> * 4;
  emu_row_sweep<TopkBwdVisitor<T>>(b, kTileThreads);
  if (alpha != 0)
    for (int64_t r = 0; r < rows; ++r) topk_bwd_entries_row(b, r);

  // reference: the same formulas in double, from a plain two-pass logsumexp
  const double tol = sizeof(T) == 8 ? 1e-9 : (sizeof(T) == 4 ? 2e-4 : 3e-2);
  for (int64_t r = 0; r < rows; ++r) {
    const double* sr = sd.data() + r * cols;
    double ms = -INFINITY, m1 = -INFINITY;
    for (int64_t j = 0; j < cols; ++j) {
      ms = std::max(ms, sr[j] / temp);
      m1 = std::max(m1, sr[j]);
    }
    double ds = 0, d1 = 0;
    for (int64_t j = 0; j < cols; ++j) {
      ds += std::exp(sr[j] / temp - ms);
      d1 += std::exp(sr[j] - m1);
    }
    std::vector<double> vd(k);
    for (int64_t j = 0; j < k; ++j) vd[j] = val[r * k + j];
    double mt, ldt, dv, ct;
    const tk::TopkArgs<double> a{1 / temp, k, cols, tail, div};
    tk::topk_finish(sr, idx.data() + r * k, vd.data(), ms, ds, a, mt, ldt, dv, ct);
    const bool ign = target && y[r] == -100;
    double want = ign ? 0 : (alpha != 0 ? alpha * temp * temp * dv : 0);
    if (target && !ign && alpha != 1) want += (1 - alpha) * (m1 + std::log(d1) - sr[y[r]]);
    check(tag, loss[r], want, tol);
    // gradient
    std::vector<double> g(cols);
    const double lse1 = m1 + std::log(d1);
    for (int64_t j = 0; j < cols; ++j) {
      const double q = std::exp(sr[j] / temp - ms - std::log(ds));
      g[j] = alpha != 0 ? alpha * temp * (q == 0 ? 0 : q * ct) : 0;
    }
    const double st[tk::kStats] = {ms, std::log(ds), m1, std::log(d1), mt, ldt, dv, ct};
    if (alpha != 0)
      tk::topk_entry_grads(sr, idx.data() + r * k, vd.data(), st, a,
                           [&](int64_t kk, double dd) { g[idx[r * k + kk]] = alpha * temp * dd; });
    for (int64_t j = 0; j < cols; ++j) {
      if (target && alpha != 1) g[j] += (1 - alpha) * (std::exp(sr[j] - lse1) - (j == y[r] ? 1 : 0));
      const double want_g = ign ? 0 : gl[r] * g[j];
      check(tag, to_double(grad[r * cols + j]), want_g, tol);
    }
  }
}

int main() {
  std::mt19937 rng(7);
  for (int tail = 0; tail < 2; ++tail)
    for (int div = 0; div < 2; ++div) {
      run_case<float, true>(5, 37, 6, 2.0, 0.5, tail, div, true, rng, "f32 small T=2");
      run_case<float, false>(4, 3001, 64, 1.0, 0.3, tail, div, true, rng, "f32 block T=1");
      run_case<double, true>(3, 2050, 9, 3.0, 0.7, tail, div, true, rng, "f64 block");
      run_case<double, false>(3, 50, 4, 1.5, 1.0, tail, div, false, rng, "f64 no target");
      run_case<c10::BFloat16, true>(3, 1500, 16, 2.0, 0.5, tail, div, true, rng, "bf16");
      run_case<float, true>(3, 40, 5, 2.0, 0.0, tail, div, true, rng, "f32 alpha=0");
    }
  return report_failures();
}
