// Host emulation of the KD divergence kernels (kernels/kd_divergence.cuh): the per-thread sweeps of a block, the
// butterfly merges of the online state (DivState) and of the sums, the row finish as the forward kernel writes it,
// and the backward over column tiles, against a direct double-precision computation of the plain formulas.
// Build and run: tests/cuda_emulation/run.sh. Keep the launch arithmetic in step with csrc/cuda/kd_divergence.cu.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "emul_common.h"
#include "kd_divergence.cuh"

using namespace augkd::cuda;
namespace dv = augkd::div;

// The plain formulas in double: D, and dD/du, dD/dv per class.
static void reference(const std::vector<double>& s, const std::vector<double>& t, double temp, int div, double beta,
                      double& d, std::vector<double>& du, std::vector<double>& dv) {
  const size_t C = s.size();
  auto log_softmax = [&](const std::vector<double>& x) {
    double m = -INFINITY, sum = 0;
    for (double v : x) m = std::max(m, v / temp);
    for (double v : x) sum += std::exp(v / temp - m);
    std::vector<double> out(C);
    for (size_t j = 0; j < C; ++j) out[j] = x[j] / temp - m - std::log(sum);
    return out;
  };
  const std::vector<double> lq = log_softmax(s), lp = log_softmax(t);
  std::vector<double> q(C), p(C), m(C);
  for (size_t j = 0; j < C; ++j) {
    q[j] = std::exp(lq[j]);
    p[j] = std::exp(lp[j]);
    m[j] = beta * p[j] + (1 - beta) * q[j];
  }
  d = 0;
  double ss = 0, st = 0;
  for (size_t j = 0; j < C; ++j) {
    if (div == dv::kKL) d += p[j] == 0 ? 0 : p[j] * (lp[j] - lq[j]);
    if (div == dv::kReverseKL) d += q[j] == 0 ? 0 : q[j] * (lq[j] - lp[j]);
    if (div == dv::kJSD) {
      d += (p[j] == 0 ? 0 : beta * p[j] * std::log(p[j] / m[j])) + (q[j] == 0 ? 0 : (1 - beta) * q[j] * std::log(q[j] / m[j]));
      ss += q[j] == 0 ? 0 : q[j] * std::log(m[j] / q[j]);
      st += p[j] == 0 ? 0 : p[j] * std::log(m[j] / p[j]);
    }
    if (div == dv::kTVD) {
      d += 0.5 * std::fabs(p[j] - q[j]);
      const double sg = p[j] > q[j] ? 1 : (p[j] < q[j] ? -1 : 0);
      ss += q[j] * sg;
      st += p[j] * sg;
    }
  }
  du.assign(C, 0);
  dv.assign(C, 0);
  for (size_t j = 0; j < C; ++j) {
    const double sg = p[j] > q[j] ? 1 : (p[j] < q[j] ? -1 : 0);
    if (div == dv::kKL) {
      du[j] = q[j] - p[j];
      dv[j] = p[j] == 0 ? 0 : p[j] * (lp[j] - lq[j] - d);
    } else if (div == dv::kReverseKL) {
      du[j] = q[j] == 0 ? 0 : q[j] * (lq[j] - lp[j] - d);
      dv[j] = p[j] - q[j];
    } else if (div == dv::kJSD) {
      du[j] = q[j] == 0 ? 0 : (1 - beta) * q[j] * (ss - std::log(m[j] / q[j]));
      dv[j] = p[j] == 0 ? 0 : beta * p[j] * (st - std::log(m[j] / p[j]));
    } else {
      du[j] = 0.5 * q[j] * (ss - sg);
      dv[j] = 0.5 * p[j] * (sg - st);
    }
  }
}

template <typename T, int DIV, bool NEED1>
void run_case(int64_t cols, double temp, double beta, double scale, std::mt19937& rng, const char* tag) {
  using A = acc_type<T>;
  std::normal_distribution<double> nd(0, scale);
  std::vector<T> s(cols), t(cols);
  std::vector<double> sd(cols), td(cols);
  for (int64_t j = 0; j < cols; ++j) {
    s[j] = from_double<T>(nd(rng));
    t[j] = from_double<T>(nd(rng));
    sd[j] = to_double(s[j]);
    td[j] = to_double(t[j]);
  }
  if (cols > 8) {  // a class absent from both, and one the teacher masks (not for reverse KL: infinite)
    s[3] = t[3] = from_double<T>(-INFINITY);
    sd[3] = td[3] = -INFINITY;
    if (DIV != dv::kReverseKL) {
      t[5] = from_double<T>(-INFINITY);
      td[5] = -INFINITY;
    }
  }
  // forward: the block's threads over the row (kDivThreads), as kd_divergence_fwd_kernel does
  const int threads = kDivThreads;
  const A inv_t = static_cast<A>(1.0 / temp);
  std::vector<DivState<A, NEED1>> part(threads);
  for (int r = 0; r < threads; ++r) {
    DivStatsVisitor<T, NEED1> v{{s.data(), t.data()}, inv_t, DivState<A, NEED1>::identity()};
    sweep_range<kVec<T>, kDivUnroll>(s.data(), 0, cols, r, threads, v);
    part[r] = v.st;
  }
  const DivState<A, NEED1> st = emu_group_reduce(part, threads);
  const A log_ds = std::log(st.d_s), log_dt = std::log(st.d_t), ell = std::log1p(st.gap / st.d_s);
  const DivRow<A> row{inv_t, center_(st.m_s), center_(st.m_t), log_ds, log_dt, ell};
  std::vector<DivSums<A>> sums(threads);
  for (int r = 0; r < threads; ++r) {
    DivSumsVisitor<T, DIV> v{{s.data(), t.data()}, row, static_cast<A>(beta), DivSums<A>::identity()};
    sweep_range<kVec<T>, kDivUnroll>(s.data(), 0, cols, r, threads, v);
    sums[r] = v.sums;
  }
  const DivSums<A> tot = emu_group_reduce(sums, threads);
  double d_ref;
  std::vector<double> du_ref, dv_ref;
  reference(sd, td, temp, DIV, beta, d_ref, du_ref, dv_ref);
  const double tol = sizeof(A) == 8 ? 1e-9 : 2e-4;
  char what[160];
  std::snprintf(what, sizeof what, "%s D", tag);
  check(what, tot.d, d_ref, tol);
  // backward over column tiles, gradient weight 1 on D (kd = 1 / T), no CE
  const A ss = DIV == dv::kReverseKL ? tot.d : tot.ss, stt = DIV == dv::kKL ? tot.d : tot.st;
  std::vector<T> gs(cols), gt(cols);
  const int64_t tile = static_cast<int64_t>(kTileThreads) * kVec<T> * 4;
  for (int64_t begin = 0; begin < cols; begin += tile) {
    const int64_t end = std::min(cols, begin + tile);
    for (int r = 0; r < kTileThreads; ++r) {
      DivBwdVisitor<T, DIV> v{{s.data(), t.data()}, gs.data(), gt.data(), row, static_cast<A>(beta), tot.d, ss, stt,
                              inv_t, A(0), A(0), A(0), int64_t(-1)};
      sweep_range<kVec<T>, kDivUnroll>(s.data(), begin, end, r, kTileThreads, v);
    }
  }
  double gmax = 0;
  for (int64_t j = 0; j < cols; ++j) gmax = std::max(gmax, std::max(std::fabs(du_ref[j]), std::fabs(dv_ref[j])));
  for (int64_t j = 0; j < cols; ++j) {
    std::snprintf(what, sizeof what, "%s grad_s[%lld]", tag, static_cast<long long>(j));
    check(what, to_double(gs[j]) * temp / (1 + gmax), du_ref[j] / (1 + gmax), tol);
    std::snprintf(what, sizeof what, "%s grad_t[%lld]", tag, static_cast<long long>(j));
    check(what, to_double(gt[j]) * temp / (1 + gmax), dv_ref[j] / (1 + gmax), tol);
  }
}

template <int DIV>
void run_divergence(std::mt19937& rng) {
  char tag[96];
  for (int64_t cols : {7, 40, 3001}) {
    for (double temp : {0.3, 2.0, 1000.0}) {
      std::snprintf(tag, sizeof tag, "div=%d C=%lld T=%g fp32", DIV, static_cast<long long>(cols), temp);
      run_case<float, DIV, false>(cols, temp, 0.3, 2.0, rng, tag);
      std::snprintf(tag, sizeof tag, "div=%d C=%lld T=%g fp64", DIV, static_cast<long long>(cols), temp);
      run_case<double, DIV, true>(cols, temp, 0.7, 2.0, rng, tag);
    }
  }
}

int main() {
  std::mt19937 rng(0);
  run_divergence<dv::kKL>(rng);
  run_divergence<dv::kReverseKL>(rng);
  run_divergence<dv::kJSD>(rng);
  run_divergence<dv::kTVD>(rng);
  std::printf("kd_divergence emulation: ");
  return report_failures();
}
