// Per-class math of the KD divergence family (augkd::kd_divergence_fwd / _bwd; docs/ops-design.md, "KD
// divergences"), shared by the CPU kernel (vectors of at::vec) and the CUDA kernel (scalars on the device).
//
// Every function is a template over an operations policy O and a value type V (a vector or a scalar):
//   O::M                              the mask type of a comparison of V
//   O::exp, O::expm1, O::log1p        on V (expm1 of arguments <= 0; expm1_small: of [-1/4, 0] only)
//   O::le(a, b), O::lt, O::eq         comparisons -> M;  O::and_, O::or_ on M
//   O::sel(m, a, b)                   m ? a : b, lane by lane
// and over the divergence code DIV (kKL, kReverseKL, kJSD, kTVD), so each loop compiles to its own code.
//
// Notation per class j: q = student probability, p = teacher probability, rho = log p - log q,
// x = expm1(-|rho|) in [-1, 0]; the "base" is the larger of p and q (q when rho <= 0, else p).
//   kl:          base q: k(x)       base p: j(x)          k(x) = (1 + x) log1p(x) - x,  j(x) = x - log1p(x)
//   reverse_kl:  base q: j(x)       base p: k(x)
//   jsd:         base q: F_b(x)     base p: F_(1-b)(x)    F_w(x) = w k(x) - k(w x)
//   tvd:         -x / 2 on either base
// D = sum_j base_j f_j (a class absent from both, base 0, adds 0). k and j of x = expm1(-|rho|) use
// log1p(x) = -|rho| (k_rho, j_rho); only the k(w x) of the JSD takes log1p. The backward needs per class
//   dD/du_j = q_j (g_j - sum_i q_i g_i),  g = dD/dq,   and   dD/dv_j = p_j (h_j - sum_i p_i h_i),  h = dD/dp
// whose sums are forward by-products (S_s, S_t below).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define AUGKD_DIV_HD __host__ __device__ __forceinline__
#else
#define AUGKD_DIV_HD inline
#endif

namespace augkd::div {

constexpr int kKL = 0;
constexpr int kReverseKL = 1;
constexpr int kJSD = 2;
constexpr int kTVD = 3;

// Columns of the per-row stats: the two maxima and log-sums of the tempered rows, L = log d_t - log d_s (formed
// accurately), the divergence D, the hard-label CE, the two backward sums, and the maximum and log-sum of the
// untempered student for CE when T != 1.
constexpr int kMs = 0, kLogDs = 1, kMt = 2, kLogDt = 3, kL = 4, kD = 5, kCE = 6, kSs = 7, kSt = 8, kM1 = 9,
              kLogD1 = 10;
constexpr int kStats = 11;

// Host side: f(std::integral_constant<int, code>{}) for a runtime divergence code (one instantiation each).
template <typename F>
void with_divergence(int64_t code, F&& f) {
  switch (code) {
    case kKL: f(std::integral_constant<int, kKL>{}); break;
    case kReverseKL: f(std::integral_constant<int, kReverseKL>{}); break;
    case kJSD: f(std::integral_constant<int, kJSD>{}); break;
    default: f(std::integral_constant<int, kTVD>{}); break;
  }
}

// |x| at or below which k and j come from their series (all terms of one sign, nothing cancels); fp32 sums
// to x^9, fp64 to x^19 (the next term is under one rounding at |x| = kSeriesMax).
constexpr double kSeriesMax = 0.125;
template <typename A>
constexpr int series_terms() {
  return sizeof(A) == 8 ? 19 : 9;
}

// y^2 sum_{n=2..N} c(n) y^(n-2), c(n) = 1 / (n (n - 1)) (K) or 1 / n (J), by Horner.
template <typename A, bool K, typename V>
AUGKD_DIV_HD V series(V y) {
  constexpr int N = series_terms<A>();
  V poly = V(A(1) / A(K ? N * (N - 1) : N));
#pragma unroll
  for (int n = N - 1; n >= 2; --n) poly = poly * y + V(A(1) / A(K ? n * (n - 1) : n));
  return y * y * poly;
}

// k(x) = (1 + x) log1p(x) - x on [-1, 0], given l = log1p(x) (the caller needs it too); k(-1) = 1.
template <typename O, typename A, typename V>
AUGKD_DIV_HD V k_log(V x, V l) {
  const V y = V(A(0)) - x;
  const auto small = O::le(y, V(A(kSeriesMax)));
  const auto edge = O::eq(x, V(A(-1)));
  const V s = series<A, true>(O::sel(small, y, V(A(0))));
  const V closed = (V(A(1)) + x) * O::sel(edge, V(A(0)), l) - x;
  return O::sel(small, s, closed);
}

// k(x) for x = expm1(-r), r = |rho| >= 0: log1p(x) = -r exactly, so k = -x - r (1 + x) (0 where 1 + x == 0).
// (Where x is within a rounding of -1, r beyond ~17 in fp32, log1p(x) itself would be far off.)
template <typename O, typename A, typename V>
AUGKD_DIV_HD V k_rho(V x, V r) {
  const V y = V(A(0)) - x;
  const auto small = O::le(y, V(A(kSeriesMax)));
  const V s = series<A, true>(O::sel(small, y, V(A(0))));
  const V e = V(A(1)) + x;
  const V re = O::sel(O::or_(small, O::eq(e, V(A(0)))), V(A(0)), r * e);
  return O::sel(small, s, y - re);
}

// j(x) = x - log1p(x) = x + r for x = expm1(-r), r >= 0 (+inf at r = inf).
template <typename O, typename A, typename V>
AUGKD_DIV_HD V j_rho(V x, V r) {
  const V y = V(A(0)) - x;
  const auto small = O::le(y, V(A(kSeriesMax)));
  const V s = series<A, false>(O::sel(small, y, V(A(0))));
  return O::sel(small, s, x + r);
}

// b - a for the tempered, max-shifted teacher b and student a; 0 where both are -inf (absent from both).
template <typename O, typename A, typename V>
AUGKD_DIV_HD V log_ratio(V a, V b) {
  const V ninf = V(-std::numeric_limits<A>::infinity());
  return O::sel(O::and_(O::eq(a, ninf), O::eq(b, ninf)), V(A(0)), b - a);
}

// One class's share of d_t - d_s = sum_j (e^b_j - e^a_j) (ea = e^a, eb = e^b, diff = log_ratio(a, b)): while
// |b - a| <= 1/4, e^a expm1(b - a) or -e^b expm1(a - b), so that nothing cancels when the rows are close (large T);
// beyond, eb - ea itself (|e^b - e^a| >= 0.22 max(e^a, e^b): no cancellation). O::expm1_small needs to be
// accurate on [-1/4, 0] only.
template <typename O, typename A, typename V>
AUGKD_DIV_HD V gap_term(V ea, V eb, V diff) {
  const V zero = V(A(0));
  const auto neg = O::le(diff, zero);
  const V z = O::sel(neg, diff, zero - diff);
  const auto far = O::lt(z, V(A(-0.25)));
  const V em = O::expm1_small(O::sel(far, zero, z));
  return O::sel(far, eb - ea, O::sel(neg, ea * em, zero - eb * em));
}

// The divergence term of one class and its two sums for the backward (added to d, ss, st).
template <typename O, typename A, int DIV, typename V>
AUGKD_DIV_HD void forward_terms(V q, V p, V rho, A beta, V& d, V& ss, V& st) {
  const V zero = V(A(0));
  const auto neg = O::le(rho, zero);
  const V r = O::sel(neg, zero - rho, rho);
  const V x = O::expm1(zero - r);
  const V base = O::sel(neg, q, p);
  const auto absent = O::eq(base, zero);
  V f;
  if constexpr (DIV == kKL) {
    f = O::sel(neg, k_rho<O, A>(x, r), j_rho<O, A>(x, r));
  } else if constexpr (DIV == kReverseKL) {
    f = O::sel(neg, j_rho<O, A>(x, r), k_rho<O, A>(x, r));
  } else if constexpr (DIV == kJSD) {
    const V w = O::sel(neg, V(beta), V(A(1) - beta));
    // S_s = sum q log(m / q), S_t = sum p log(m / p), m = beta p + (1 - beta) q:
    //   rho <= 0: log(m / q) = log1p(beta x),                 log(m / p) = log1p(beta x) - rho
    //   rho >  0: log(m / q) = rho + log1p((1 - beta) x),     log(m / p) = log1p((1 - beta) x)
    const V wx = w * x;
    const V lw = O::log1p(wx);
    f = w * k_rho<O, A>(x, r) - k_log<O, A>(wx, lw);
    const V wq = O::sel(neg, lw, rho + lw), wp = O::sel(neg, lw - rho, lw);
    ss = ss + O::sel(O::eq(q, zero), zero, q * wq);
    st = st + O::sel(O::eq(p, zero), zero, p * wp);
  } else {
    f = V(A(-0.5)) * x;
    // S_s = sum q sign(rho), S_t = sum p sign(rho)
    const V sg = O::sel(O::lt(zero, rho), V(A(1)), O::sel(O::lt(rho, zero), V(A(-1)), zero));
    ss = ss + q * sg;
    st = st + p * sg;
  }
  d = d + O::sel(absent, zero, base * f);
}

// dD/du_j and dD/dv_j (u = s / T, v = t / T) of one class from the row's D and sums (du: student, dv: teacher).
template <typename O, typename A, int DIV, typename V>
AUGKD_DIV_HD void class_grads(V q, V p, V rho, A beta, A d, A ss, A st, V& du, V& dv) {
  const V zero = V(A(0));
  const auto neg = O::le(rho, zero);
  if constexpr (DIV == kKL || DIV == kReverseKL) {
    // q - p = -q x (rho <= 0) or p x (rho > 0), x = expm1(-|rho|)
    const V x = O::expm1(O::sel(neg, rho, zero - rho));
    const V q_minus_p = O::sel(neg, zero - q * x, p * x);
    if constexpr (DIV == kKL) {  // g = -p / q: du = q - p;  h = rho + 1: dv = p (rho - D)
      du = q_minus_p;
      dv = O::sel(O::eq(p, zero), zero, p * (rho - V(d)));
    } else {  // g = 1 - rho: du = q (-rho - D);  h = -q / p: dv = p - q
      du = O::sel(O::eq(q, zero), zero, q * (zero - rho - V(d)));
      dv = zero - q_minus_p;
    }
  } else if constexpr (DIV == kJSD) {
    // g = (1 - beta) log(q / m): du = (1 - beta) q (S_s - log(m / q)); dv = beta p (S_t - log(m / p))
    const V x = O::expm1(O::sel(neg, rho, zero - rho));
    const V w = O::sel(neg, V(beta), V(A(1) - beta));
    const V lw = O::log1p(w * x);
    const V wq = O::sel(neg, lw, rho + lw), wp = O::sel(neg, lw - rho, lw);
    du = O::sel(O::eq(q, zero), zero, V(A(1) - beta) * q * (V(ss) - wq));
    dv = O::sel(O::eq(p, zero), zero, V(beta) * p * (V(st) - wp));
  } else {
    // g = -sign(rho) / 2: du = q (S_s - sign) / 2;  h = sign / 2: dv = p (sign - S_t) / 2
    const V sg = O::sel(O::lt(zero, rho), V(A(1)), O::sel(O::lt(rho, zero), V(A(-1)), zero));
    du = V(A(0.5)) * q * (V(ss) - sg);
    dv = V(A(0.5)) * p * (sg - V(st));
  }
}

// Moves E = d_t - d_s (each sum taken from its own running maximum) to new maxima: with r_s = e^(m_s - m_s'),
// r_t = e^(m_t - m_t'),  E' = r_t d_t - r_s d_s = r_t E + r_s expm1(log r_t - log r_s) d_s  (no cancellation
// while the maxima move by small steps, as at large T). ds_old == 0: E = d_t; r_t == 0: d_t was 0.
template <typename A, typename Expm1>
AUGKD_DIV_HD A rebase_gap(A e, A ds_old, A rs, A rt, A log_rt_minus_log_rs, Expm1 expm1_fn) {
  if (ds_old == A(0)) return rt * e;
  if (rt == A(0)) return -rs * ds_old;
  return rt * e + rs * expm1_fn(log_rt_minus_log_rs) * ds_old;
}

}  // namespace augkd::div
