// Host emulation of the augkd row kernels (kd_loss, uncertainty); build and run: tests/cuda_emulation/run.sh.
// Runs the row skeleton's __host__ __device__ per-thread code (kernels/row_reduce.cuh: sweep_range +
// the ops' visitors + state merges + row finalisation) for every "thread" of a group in turn, reduces
// with the butterfly order of warp_reduce / block_reduce (emul_common.h), and compares with a
// double-precision reference and (fp64, small C) finite differences.
// Not covered: the device intrinsics (__expf, __logf, __fdiv_rn) and the shuffles themselves.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "emul_common.h"
#include "kd_loss.cuh"
#include "uncertainty.cuh"

using namespace augkd::cuda;

// ---------------------------------------------------------------------------------------------------------
// KD
// ---------------------------------------------------------------------------------------------------------

struct KdCase {
  int64_t rows, cols;
  double T, alpha;
  bool t2, has_target;
  int fmt;
  int64_t ignore_index;
};

// The forward kernel in its layout, then the refine sweep (a warp per row for C <= 1024, else a block).
template <typename T, bool NEED1>
void emu_kd_fwd(const KdFwdParams<T>& p, int size, int64_t parts) {
  emu_row_reduce<KdFwdVisitor<T, NEED1>>(p, size, parts);
  emu_row_reduce<KdRefineVisitor<T>>(p, p.cols <= 1024 ? 32 : kTileThreads, 1);
}

// double reference of one row: returns loss, stats; the function of (s, t) used for finite differences.
// Computed in long double (64-bit mantissa). For a large T (tiny KL) the KL is taken as
// sum p_s phi(rho) (every term >= 0), elsewhere as sum p_t (log p_t - log p_s).
using LD = long double;
struct KdRef {
  double loss, m_s, lse_t, m_t, log_ds, log_dt, log_d1, kl, mu, lse_s, lse_1, log_d1_all;
};
LD phi_ref(LD x) {
  if (std::fabs(x) < 0.25L) {  // sum_{n>=2} (n - 1) / n! x^n
    LD term = x * x / 2, out = 0;  // term = x^n / n!
    for (int n = 2; n < 30; ++n) {
      out += term * (n - 1);
      term *= x / (n + 1);
    }
    return out;
  }
  return 1 + (x - 1) * std::exp(x);
}
KdRef kd_ref_row(const std::vector<double>& s, const std::vector<double>& t, int64_t y, const KdCase& c,
                 bool has_target) {
  const int64_t C = s.size();
  const LD T = c.T;
  std::vector<LD> v(C), a(C), b(C);
  LD ms = -INFINITY, mt = -INFINITY;
  for (int64_t j = 0; j < C; ++j) {
    v[j] = c.fmt == 2 ? std::log(static_cast<LD>(t[j])) : static_cast<LD>(t[j]);
    ms = std::fmax(ms, static_cast<LD>(s[j]));
    mt = std::fmax(mt, v[j]);
  }
  const LD cs = ms == -INFINITY ? 0 : ms, ct = mt == -INFINITY ? 0 : mt;
  LD ds = 0, dt = 0, d1 = 0;
  for (int64_t j = 0; j < C; ++j) {
    b[j] = (s[j] - cs) / T;
    a[j] = (v[j] - ct) / T;
    ds += std::exp(b[j]);
    dt += std::exp(a[j]);
    d1 += std::exp(s[j] - cs);
  }
  KdRef r;
  const LD log_ds = std::log(ds), log_dt = std::log(dt);
  r.m_s = static_cast<double>(ms);
  r.m_t = static_cast<double>(mt);
  r.log_ds = static_cast<double>(log_ds);
  r.log_dt = static_cast<double>(log_dt);
  r.log_d1 = (has_target && c.T != 1.0) ? static_cast<double>(std::log(d1)) : r.log_ds;
  r.lse_t = static_cast<double>(ct / T + log_dt);
  r.lse_s = static_cast<double>(cs / T + log_ds);
  r.lse_1 = static_cast<double>(cs + std::log(d1));
  r.log_d1_all = static_cast<double>(std::log(d1));
  LD kl = 0, kl_phi = 0, mu = 0;
  for (int64_t j = 0; j < C; ++j) {
    const LD lpt = a[j] - log_dt, lps = b[j] - log_ds;
    const LD pt = std::exp(lpt), ps = std::exp(lps);
    if (pt != 0) kl += pt * (lpt - lps);
    if (pt != 0 || std::isnan(a[j] - b[j])) mu += pt * (a[j] - b[j]);  // a NaN input makes mu NaN
    if (ps != 0 || pt != 0) kl_phi += pt == 0 ? ps : ps * phi_ref(lpt - lps);
  }
  const LD klv = c.T >= 100 ? kl_phi : kl;
  r.kl = static_cast<double>(klv);
  r.mu = static_cast<double>(mu);
  const LD cc = c.t2 ? T * T : 1.0L;
  LD loss = c.alpha != 0 ? c.alpha * cc * klv : 0.0L;
  if (has_target) {
    if (y == c.ignore_index) {
      loss = 0;
    } else if (y < 0 || y >= C) {
      loss = NAN;
    } else if (c.alpha != 1) {
      loss += (1 - static_cast<LD>(c.alpha)) * ((cs - s[y]) + std::log(d1));
    }
  }
  r.loss = static_cast<double>(loss);
  return r;
}


template <typename T>
void run_kd_case(const KdCase& c, std::mt19937& rng, int size, int64_t parts, int64_t tile, const char* tag,
                 int special, int misalign) {
  using A = acc_type<T>;
  const int64_t B = c.rows, C = c.cols;
  std::normal_distribution<double> nd(0.0, 3.0);
  // storage with a misalignment of `misalign` elements at the base (the launchers never pass one; the
  // emulation checks the head / tail split with row starts at all offsets)
  std::vector<T> s_store(B * C + 16), t_store(B * C + 16);
  T* s = s_store.data() + misalign;
  T* t = t_store.data() + misalign;
  std::vector<int64_t> y(B);
  std::uniform_int_distribution<int64_t> yd(0, C - 1);
  for (int64_t i = 0; i < B * C; ++i) {
    s[i] = from_double<T>(nd(rng));
    double tv = nd(rng);
    if (c.fmt == 1) tv = tv - 10;  // any shift: log-probs are logits shifted per row
    if (c.fmt == 2) tv = std::exp(tv / 3);  // unnormalised probabilities are fine for the math (softmax of log)
    t[i] = from_double<T>(tv);
  }
  for (int64_t b = 0; b < B; ++b) y[b] = yd(rng);
  if (special & 1) {  // masked teacher classes
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < C; j += 3) t[b * C + j] = from_double<T>(c.fmt == 2 ? 0.0 : -INFINITY);
  }
  if (special & 2 && B > 1) s[1 * C + C / 2] = from_double<T>(NAN);  // NaN row 1
  if (special & 4 && B > 2) y[2] = c.ignore_index;
  if (special & 8 && B > 3) y[3] = C + 5;  // out of range
  if (special & 16) {  // very large logits
    for (int64_t i = 0; i < B * C; ++i) s[i] = from_double<T>(static_cast<double>(static_cast<A>(s[i])) + 5000.0);
  }

  std::vector<A> loss(B), stats(B * kKdStats);
  KdFwdParams<T> p{};
  p.student = s;
  p.teacher = t;
  p.target = c.has_target ? y.data() : nullptr;
  p.loss = loss.data();
  p.stats = stats.data();
  p.rows = B;
  p.cols = C;
  p.ignore_index = c.ignore_index;
  p.inv_t = static_cast<A>(1.0 / c.T);
  const double cc = c.t2 ? c.T * c.T : 1.0;
  p.alpha_c = static_cast<A>(c.alpha * cc);
  p.one_minus_alpha = static_cast<A>(1.0 - c.alpha);
  p.use_kl = c.alpha != 0;
  p.use_ce = c.has_target && c.alpha != 1;
  p.fmt = c.fmt;
  const bool need1 = c.has_target && c.T != 1.0;
  if (need1) emu_kd_fwd<T, true>(p, size, parts);
  else emu_kd_fwd<T, false>(p, size, parts);

  // row b of s and t as the kernels read them, in double, and its reference
  auto ref_row = [&](int64_t b, std::vector<double>& sr, std::vector<double>& tr) {
    sr.resize(C);
    tr.resize(C);
    for (int64_t j = 0; j < C; ++j) {
      sr[j] = to_double(s[b * C + j]);
      tr[j] = to_double(t[b * C + j]);
    }
    return kd_ref_row(sr, tr, y[b], c, c.has_target);
  };
  // (large logits, special & 16, keep the same tolerance: the maxima and log-sums are kept apart)
  const double tol = sizeof(A) == 8 ? 1e-10 : 2e-4;
  char what[256];
  std::vector<double> gs_ref(B * C), gt_ref(B * C);
  std::vector<double> gl(B), gls(B);
  std::normal_distribution<double> gd(0.0, 1.0);
  for (int64_t b = 0; b < B; ++b) {
    gl[b] = gd(rng);
    gls[b] = gd(rng);
  }
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> sr, tr;
    const KdRef r = ref_row(b, sr, tr);
    std::snprintf(what, sizeof what, "%s kd loss row %ld", tag, (long)b);
    check(what, loss[b], r.loss, tol);
    const double want_stats[kKdStats] = {r.m_s, r.lse_t, r.m_t, r.log_ds, r.log_dt, r.log_d1, r.mu,
                                         r.log_dt - r.log_ds};
    const char* names[kKdStats] = {"M_s", "lse_t", "M_t", "log_ds", "log_dt", "log_d1", "mu", "L"};
    for (int k = 0; k < kKdStats; ++k) {
      std::snprintf(what, sizeof what, "%s kd %s row %ld", tag, names[k], (long)b);
      check(what, stats[b * kKdStats + k], want_stats[k], tol);
    }
    // large T: the loss T^2 KL (+ CE) relative (KL ~ 1 / T^2 is a difference of nearly equal terms)
    if (c.T >= 100 && std::isfinite(r.loss) && r.loss > 0) {
      std::snprintf(what, sizeof what, "%s kd loss (relative) row %ld", tag, (long)b);
      check(what, loss[b] / r.loss, 1.0, sizeof(A) == 8 ? 1e-11 : 1e-5);
    }

    // reference gradients by central differences of the double reference (loss and lse_t), only for
    // finite, smooth rows and double storage (to check the doc's formulas themselves)
    if (sizeof(T) == 8 && C <= 64 && !(special & 2) && !std::isnan(r.loss) && c.T >= 1e-3 && c.T <= 10) {
      for (int64_t j = 0; j < C; ++j) {
        const double h = 1e-6;
        auto f = [&](std::vector<double> ss, std::vector<double> tt) {
          KdRef q = kd_ref_row(ss, tt, y[b], c, c.has_target);
          return gl[b] * q.loss + gls[b] * q.lse_t;
        };
        std::vector<double> sp = sr, sm = sr;
        sp[j] += h;
        sm[j] -= h;
        gs_ref[b * C + j] = (f(sp, tr) - f(sm, tr)) / (2 * h);
        if (c.fmt == 2 && tr[j] == 0) {
          gt_ref[b * C + j] = 0;
        } else if (std::isinf(tr[j])) {
          gt_ref[b * C + j] = 0;
        } else {
          std::vector<double> tp = tr, tm = tr;
          const double ht = c.fmt == 2 ? h * tr[j] : h;
          tp[j] += ht;
          tm[j] -= ht;
          gt_ref[b * C + j] = (f(sr, tp) - f(sr, tm)) / (2 * ht);
        }
      }
    }
  }
  // backward
  std::vector<A> glA(B), glsA(B);
  for (int64_t b = 0; b < B; ++b) {
    glA[b] = static_cast<A>(gl[b]);
    glsA[b] = static_cast<A>(gls[b]);
  }
  std::vector<T> gs_store(B * C + 16), gt_store(B * C + 16);
  T* gs = gs_store.data() + misalign;
  T* gt = gt_store.data() + misalign;
  KdBwdParams<T> q{};
  q.grad_loss = glA.data();
  q.grad_lse_t = glsA.data();
  q.student = s;
  q.teacher = t;
  q.target = p.target;
  q.stats = stats.data();
  q.grad_student = gs;
  q.grad_teacher = gt;
  q.rows = B;
  q.cols = C;
  q.ignore_index = c.ignore_index;
  q.temperature = static_cast<A>(c.T);
  q.inv_t = static_cast<A>(1.0 / c.T);
  q.ks = static_cast<A>(c.alpha * cc / c.T);
  q.alpha_c = static_cast<A>(c.alpha * cc);
  q.kce = static_cast<A>(1.0 - c.alpha);
  q.use_kl = c.alpha != 0;
  q.use_ce = c.has_target && c.alpha != 1;
  q.t_is_one = c.T == 1.0;
  q.fmt = c.fmt;
  q.tile = tile;
  emu_row_sweep<KdBwdVisitor<T>>(q, size);
  // analytic reference in double from the doc formulas (all cases), and finite differences (double, small C)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> sr, tr;
    const KdRef r = ref_row(b, sr, tr);
    const bool ignored = c.has_target && y[b] == c.ignore_index;
    const bool bad = c.has_target && !ignored && (y[b] < 0 || y[b] >= C);
    const LD cs = r.m_s == -INFINITY ? 0 : r.m_s, ct = r.m_t == -INFINITY ? 0 : r.m_t;
    const LD TT = c.T;
    for (int64_t j = 0; j < C; ++j) {
      // centred, in long double: a = (v - M_t) / T, b = (s - M_s) / T
      const LD bb = (sr[j] - cs) / TT;
      const LD aa = ((c.fmt == 2 ? std::log(static_cast<LD>(tr[j])) : static_cast<LD>(tr[j])) - ct) / TT;
      const LD lps = bb - static_cast<LD>(r.log_ds), lpt = aa - static_cast<LD>(r.log_dt);
      const LD ps = std::exp(lps), pt = std::exp(lpt);
      const LD rho = lpt - lps;
      // p_s - p_t without cancellation (large T)
      const LD diff = (ps == 0 && pt == 0) ? 0 : (rho <= 0 ? -ps * std::expm1(rho) : pt * std::expm1(-rho));
      double d = 0;
      if (!ignored) {
        LD dd = 0;
        if (c.alpha != 0) dd += c.alpha * static_cast<LD>(cc) / TT * diff;
        if (c.has_target && c.alpha != 1)
          dd += (1 - static_cast<LD>(c.alpha)) * (std::exp(sr[j] - cs - static_cast<LD>(r.log_d1_all)) - (j == y[b] ? 1 : 0));
        d = bad ? NAN : static_cast<double>(gl[b] * dd);
      }
      LD dwl = gls[b] * pt;
      if (!ignored && c.alpha != 0) dwl += gl[b] * c.alpha * static_cast<LD>(cc) * (pt == 0 ? 0 : pt * ((aa - bb) - static_cast<LD>(r.mu)));
      const double dw = static_cast<double>(dwl);
      const double gtv = c.fmt == 2 ? (tr[j] == 0 ? 0 : dw / (c.T * tr[j])) : dw / c.T;
      // (a tiny T amplifies the rounding of log t and of the exponents by 1 / T, as in any fp64 code)
      const double gtol = sizeof(A) == 8 ? (c.T < 1e-3 ? 1e-6 : 1e-9) : 1e-4;
      // fp16 / bf16 outputs: one rounding of the fp32 value
      const double otol = sizeof(T) == 2 ? (std::is_same_v<T, c10::BFloat16> ? 1e-2 : 2e-3) : gtol;
      std::snprintf(what, sizeof what, "%s kd grad_s [%ld,%ld]", tag, (long)b, (long)j);
      check(what, static_cast<double>(static_cast<A>(gs[b * C + j])), d, otol);
      // mu = E_pt[a - b] comes from the one-pass sums: its rounding, eps |mu|, reaches grad_t scaled by
      // alpha c / T (large for a tiny T without t2_scale; torch's own fp32 error there is larger still)
      const double slack = 4 * std::numeric_limits<A>::epsilon() * std::fabs(c.alpha * cc / c.T) *
                           (std::fabs(r.mu) + 1) * static_cast<double>(pt) / (c.fmt == 2 && tr[j] != 0 ? tr[j] : 1.0);
      const double got_t = static_cast<double>(static_cast<A>(gt[b * C + j]));
      std::snprintf(what, sizeof what, "%s kd grad_t [%ld,%ld]", tag, (long)b, (long)j);
      check(what, std::fabs(got_t - gtv) <= slack ? gtv : got_t, gtv, otol);
      if (sizeof(T) == 8 && C <= 64 && !(special & 2) && !std::isnan(r.loss) && c.T >= 1e-3 && c.T <= 10) {
        std::snprintf(what, sizeof what, "%s kd FD grad_s [%ld,%ld]", tag, (long)b, (long)j);
        check(what, d, gs_ref[b * C + j], 1e-5);
        std::snprintf(what, sizeof what, "%s kd FD grad_t [%ld,%ld]", tag, (long)b, (long)j);
        check(what, gtv, gt_ref[b * C + j], 1e-5);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Uncertainty
// ---------------------------------------------------------------------------------------------------------

template <typename T>
void run_unc_case(int64_t B, int64_t C, double T_, std::mt19937& rng, int size, int64_t parts, int64_t tile,
                  const char* tag, int special, int misalign) {
  using A = acc_type<T>;
  std::normal_distribution<double> nd(0.0, 3.0);
  std::vector<T> z_store(B * C + 16);
  T* z = z_store.data() + misalign;
  for (int64_t i = 0; i < B * C; ++i) z[i] = from_double<T>(nd(rng));
  if (special & 1)
    for (int64_t i = 0; i < B * C; i += 3) z[i] = from_double<T>(-INFINITY);
  if (special & 2 && B > 1) z[C + C / 2] = from_double<T>(NAN);
  std::vector<A> energy(B), entropy(B);
  const UncInputs<T> in{z, B, C, static_cast<A>(T_), static_cast<A>(1.0 / T_)};
  UncFwdParams<T> p{in, energy.data(), entropy.data()};
  emu_row_reduce<UncFwdVisitor<T>>(p, size, parts);
  std::vector<A> ge(B), gh(B);
  std::normal_distribution<double> gd(0.0, 1.0);
  for (int64_t b = 0; b < B; ++b) {
    ge[b] = static_cast<A>(gd(rng));
    gh[b] = static_cast<A>(gd(rng));
  }
  std::vector<T> gz_store(B * C + 16);
  T* gz = gz_store.data() + misalign;
  UncBwdParams<T> q{in, energy.data(), entropy.data(), ge.data(), gh.data(), gz, tile};
  emu_row_sweep<UncBwdVisitor<T>>(q, size);
  const double tol = sizeof(A) == 8 ? 1e-10 : 2e-4;
  char what[256];
  for (int64_t b = 0; b < B; ++b) {
    double m = -INFINITY;
    std::vector<double> u(C);
    for (int64_t j = 0; j < C; ++j) {
      u[j] = static_cast<double>(static_cast<A>(z[b * C + j])) / T_;
      m = std::fmax(m, u[j]);
    }
    double d = 0;
    for (int64_t j = 0; j < C; ++j) d += u[j] == -INFINITY ? 0.0 : std::exp(u[j] - m);
    const double lse = m == -INFINITY ? (std::isnan(d) ? NAN : -INFINITY) : m + std::log(d);
    double H = 0;
    for (int64_t j = 0; j < C; ++j) {
      const double pj = std::exp(u[j] - lse);
      if (pj != 0) H -= pj * (u[j] - lse);
    }
    std::snprintf(what, sizeof what, "%s unc energy row %ld", tag, (long)b);
    check(what, energy[b], -T_ * lse, tol);
    std::snprintf(what, sizeof what, "%s unc entropy row %ld", tag, (long)b);
    check(what, entropy[b], H, tol);
    for (int64_t j = 0; j < C; ++j) {
      const double pj = std::exp(u[j] - lse);
      const double g = -static_cast<double>(ge[b]) * pj - (pj == 0 ? 0 : static_cast<double>(gh[b]) * pj * (u[j] - lse + H) / T_);
      const double otol = sizeof(T) == 2 ? (std::is_same_v<T, c10::BFloat16> ? 1e-2 : 2e-3) : (sizeof(A) == 8 ? 1e-9 : 1e-4);
      std::snprintf(what, sizeof what, "%s unc grad [%ld,%ld]", tag, (long)b, (long)j);
      check(what, static_cast<double>(static_cast<A>(gz[b * C + j])), g, otol);
    }
    // finite differences of (energy, entropy) in double
    if (sizeof(T) == 8 && C <= 64 && !(special & 2)) {
      auto f = [&](std::vector<double> uu) {
        double mm = -INFINITY;
        for (double x : uu) mm = std::fmax(mm, x);
        double dd = 0;
        for (double x : uu) dd += std::exp(x - mm);
        const double l = mm + std::log(dd);
        double h = 0;
        for (double x : uu) {
          const double pp = std::exp(x - l);
          if (pp != 0) h -= pp * (x - l);
        }
        return static_cast<double>(ge[b]) * (-T_ * l) + static_cast<double>(gh[b]) * h;
      };
      for (int64_t j = 0; j < C; ++j) {
        if (std::isinf(u[j])) continue;
        const double hh = 1e-6;
        std::vector<double> up = u, um = u;
        up[j] += hh / T_;
        um[j] -= hh / T_;
        const double fd = (f(up) - f(um)) / (2 * hh);
        std::snprintf(what, sizeof what, "%s unc FD grad [%ld,%ld]", tag, (long)b, (long)j);
        check(what, static_cast<double>(gz[b * C + j]), fd, 1e-5);
      }
    }
  }
}

template <typename T>
void run_all(std::mt19937& rng, const char* dt) {
  const int64_t Cs[] = {1, 2, 3, 7, 17, 64, 100, 1000, 1023, 1025, 4099, 20000};
  int idx = 0;
  for (int64_t C : Cs) {
    for (int special : {0, 1, 2 | 4 | 8, 16, 1 | 2 | 4 | 8}) {
      for (int mis : {0, 1}) {
        const int64_t B = 5;
        const int size = C <= 1024 ? 32 : 128 * ((idx % 4) + 1);
        const int64_t parts = C > 8192 ? 1 + (idx % 3) * 2 : 1;
        const int64_t tile = C <= 1024 ? C : 256 * kVec<T> * 4;
        const int fmt = idx % 3;
        // temperatures: 1 and 2.5, plus the extremes (tiny: one-hot softmaxes; huge: a KL ~ 1 / T^2)
        // (fp32 / fp64 storage only: the gradients of extreme T leave the fp16 range)
        const bool wide = sizeof(T) >= 4;
        const double T_ = (wide && idx % 7 == 3) ? 1e5 : (wide && idx % 7 == 6) ? 1e7
                          : (wide && idx % 11 == 2) ? 1e-9 : (idx % 4 == 0) ? 1.0 : 2.5;
        const double alpha = (idx % 5 == 0) ? 0.0 : (idx % 5 == 1 ? 1.0 : 0.7);
        KdCase c{B, C, T_, alpha, (idx % 2) == 0, (idx % 6) != 5, fmt, -100};
        char tag[160];
        std::snprintf(tag, sizeof tag, "[%s C=%ld sp=%d mis=%d size=%d parts=%ld fmt=%d T=%g a=%g tgt=%d]", dt, (long)C,
                      special, mis, size, (long)parts, fmt, T_, alpha, (int)c.has_target);
        if (!((special & 16) && fmt == 2)) run_kd_case<T>(c, rng, size, parts, tile, tag, special, mis);
        const double T_unc = (idx % 4 == 0) ? 1.0 : 2.5;
        if (!(special & 16)) run_unc_case<T>(B, C, T_unc, rng, size, parts, tile, tag, special, mis);
        ++idx;
      }
    }
  }
}

AUGKD_EMULATION_MAIN(1234)
