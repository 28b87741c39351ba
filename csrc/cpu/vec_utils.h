// Small vector helpers shared by the CPU kernels (csrc/cpu/*.cpp).
//
// Every kernel loads in the storage dtype and computes in acc_t = at::opmath_type<scalar_t> (float for
// float/half/bfloat16, double for double); `Vec<acc_t>` is at::vec::Vectorized<acc_t>, whose ISA
// (AVX-512 / AVX2 / scalar) is picked at compile time by the CPU_CAPABILITY_* macros set in setup.py.
#pragma once

// GCC reports -Wuninitialized / -Wmaybe-uninitialized inside its own AVX-512 intrinsic headers (the
// `__Y = __Y` idiom of _mm512_undefined_*) wherever at::vec code is inlined: noise. The kernels include
// this header first, so that the intrinsic headers are parsed with these off.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "op_dispatch.h"

namespace augkd::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr bool is_reduced_v = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// Lanes of one compute vector for inputs of type scalar_t.
template <typename scalar_t>
constexpr int64_t vec_width() {
  return Vec<acc_t<scalar_t>>::size();
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ----------------------------------------------------------------------------------------------------------
// Loads and stores: `n` lanes from p (n <= vec_width). Partial loads fill the unused lanes with `fill`
// (-inf for max/exp paths, 0 for sums); partial stores write n elements only. Call sites pass the width as
// a constant for the body of a loop and the remainder once for the tail, so the branch folds away.
// ----------------------------------------------------------------------------------------------------------

template <typename scalar_t>
inline Vec<acc_t<scalar_t>> load_full(const scalar_t* p) {
  if constexpr (is_reduced_v<scalar_t>) {
    Vec<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  } else {
    return Vec<scalar_t>::loadu(p);
  }
}

template <typename scalar_t>
inline Vec<acc_t<scalar_t>> load_part(const scalar_t* p, int64_t n, acc_t<scalar_t> fill) {
  using A = acc_t<scalar_t>;
  Vec<A> v;
  if constexpr (is_reduced_v<scalar_t>) {
    auto raw = Vec<scalar_t>::loadu(p, n);
    v = std::get<0>(at::vec::convert_to_float<scalar_t>(raw));
  } else {
    v = Vec<A>::loadu(p, n);
  }
  if (fill == A(0)) return v;  // loadu(p, n) zero-fills
  const Vec<A> lanes = Vec<A>::arange(A(0), A(1));
  return Vec<A>::blendv(Vec<A>(fill), v, lanes < Vec<A>(static_cast<A>(n)));
}

template <typename scalar_t>
inline Vec<acc_t<scalar_t>> load(const scalar_t* p, int64_t n, acc_t<scalar_t> fill = 0) {
  return n == vec_width<scalar_t>() ? load_full(p) : load_part(p, n, fill);
}

template <typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t<scalar_t>>& v, int64_t n) {
  constexpr int64_t W = vec_width<scalar_t>();
  if constexpr (is_reduced_v<scalar_t>) {
    // convert_from_float packs two float vectors; the low half holds v
    Vec<scalar_t> packed = at::vec::convert_from_float<scalar_t>(v, v);
    packed.store(p, static_cast<int>(n));
  } else {
    if (n == W) {
      v.store(p);
    } else {
      v.store(p, static_cast<int>(n));
    }
  }
}

// Prefetch hint for data the next block will read (the rows are contiguous, so "the next block" is just
// further on in memory, also across rows; a prefetch past the end of the tensor is harmless).
template <typename T>
inline void prefetch(const T* p) {
  __builtin_prefetch(static_cast<const void*>(p), 0, 3);
}

// Calls f(j, n) for j = begin, begin + W, ... with n = W (a compile-time constant at that call site, so
// loads/stores take their full-width path) and once more for the tail with 0 < n < W.
template <int64_t W, typename F>
inline void vec_loop(int64_t begin, int64_t end, F&& f) {
  int64_t j = begin;
  for (; j + W <= end; j += W) f(j, W);
  if (j < end) f(j, end - j);
}

// ----------------------------------------------------------------------------------------------------------
// Math
// ----------------------------------------------------------------------------------------------------------

// exp in acc precision that propagates NaN and maps -inf to 0; meant for arguments <= 0 (+ rounding) as in
// every softmax here (large positive arguments overflow to inf; +inf itself gives NaN).
// AVX-512: exp(x) = 2^n e^f with n = round(x log2 e), f = x - n ln2 (Cody-Waite split of ln2, so f is
// accurate), e^f by a degree-5 minimax polynomial on |f| <= ln2 / 2 (relative error about 1.7e-7, ~1.5 ulp),
// and 2^n applied with vscalefps (which underflows to 0 and keeps NaN). About 11 instructions.
// Other ISAs: Vectorized::exp_u20 (which clamps its argument, so NaN lanes are put back).
inline Vec<float> vexp(const Vec<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // e^-104 < 2^-149: clamps -inf and anything below to an argument that underflows to 0. With the
  // constant as first operand, vmaxps returns x itself when x is NaN.
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), v);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 p = _mm512_set1_ps(0.008290308527648449f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.041897963732481f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.1666763722896576f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.4999915063381195f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999997019767761f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
#else
  return Vec<float>::blendv(x.exp_u20(), x, x.isnan());
#endif
}
inline Vec<double> vexp(const Vec<double>& x) {
  return x.exp();
}

inline Vec<float> vlog(const Vec<float>& x) {
  return x.log();
}
inline Vec<double> vlog(const Vec<double>& x) {
  return x.log();
}

// where(cond_equal(a, b), 0, x): zero the lanes where a == b (used as `where(p == 0, 0, ...)` and
// `where(w == -inf, 0, ...)`; NaN lanes compare unequal and keep their NaN).
template <typename A>
inline Vec<A> zero_where_eq(const Vec<A>& x, const Vec<A>& a, const Vec<A>& b) {
  return Vec<A>::blendv(x, Vec<A>(A(0)), a == b);
}

// Running maxima. vmax need not propagate NaN: a NaN that it drops still reaches the sums through vexp,
// and one that it keeps makes the whole row NaN, as it should. The scalar nan_max / hmax do propagate.
template <typename A>
inline A nan_max(A a, A b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<A>::quiet_NaN();
  return a > b ? a : b;
}
inline Vec<float> vmax(const Vec<float>& a, const Vec<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
inline Vec<double> vmax(const Vec<double>& a, const Vec<double>& b) {
  return at::vec::maximum(a, b);
}
template <typename A>
inline A hmax(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return at::vec::maximum(a, b); }, v);
}
template <typename A>
inline A hsum(const Vec<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vec<A>& a, Vec<A>& b) { return a + b; }, v);
}

// Online softmax bookkeeping. A running maximum m of a row prefix, its sum d = sum exp(x - m).
// `center(m)` is the shift used inside exp: m itself, or 0 while the maximum is still -inf (so no
// exp(-inf - -inf) appears; the -inf entries give exp(-inf) = 0 either way).
template <typename A>
inline A center(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}
// Factor that rescales sums taken against the old maximum to the new one: 0 while the old maximum was
// -inf (the sums are still 0), exp(old - new) otherwise (NaN if either is NaN).
template <typename A>
inline A rescale(A m_old, A m_new) {
  return m_old == neg_inf<A>() ? A(0) : std::exp(m_old - m_new);
}

// Calls f(std::integral_constant<unsigned, bits>{}) for a runtime bits < N: a small set of runtime flags
// (one bit each) becomes one template argument, so each combination compiles to its own loop.
template <unsigned N, typename F>
inline void with_bits(unsigned bits, F&& f) {
  TORCH_CHECK(bits < N, "with_bits: flag set ", bits, " out of range ", N);
  [&]<unsigned... I>(std::integer_sequence<unsigned, I...>) {
    ((bits == I ? (f(std::integral_constant<unsigned, I>{}), 0) : 0), ...);
  }(std::make_integer_sequence<unsigned, N>{});
}

// Rows per parallel_for task: small problems stay on one thread (about 32k elements per task).
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols));
}

// f(i) for every row i of a (rows, cols) array, rows in parallel (row_grain rows per task).
template <typename F>
inline void for_each_row(int64_t rows, int64_t cols, const F& f) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Classes swept per block in the row kernels: the block is read from memory once for its maxima, then
// re-read from L1 for the sums (a two-pass scheme per block, online across blocks).
constexpr int64_t kRowBlock = 2048;

// at::empty_like for a large output that the kernel is about to write in full. On Linux, outputs of at least
// 32 MiB are advised to use transparent huge pages (madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior,
// before the first touch). Blocks that large are fresh mmaps on every call (glibc never serves them from
// its heap), and their first write otherwise takes one page fault per 4 KiB, which in VMs can cost more
// than the kernel itself (torch's allocator does the same for all its allocations when
// THP_MEM_ALLOC_ENABLE=1). Smaller blocks are usually reused heap memory, where the hint only costs.
// AUGKD_CPU_NO_HUGEPAGES=1 turns the hint off.
inline at::Tensor new_output_like(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("AUGKD_CPU_NO_HUGEPAGES");
    return v == nullptr || v[0] == '\0' || v[0] == '0';
  }();
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = out.nbytes();
  if (enabled && bytes >= (size_t(32) << 20)) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace augkd::cpu

// AUGKD_DISPATCH_FLOATING (op_dispatch.h) with the CPU kernels' vector types as well: V = Vec<A> and
// W = its lanes.
#define AUGKD_CPU_DISPATCH(x, name, ...)                                                   \
  AUGKD_DISPATCH_FLOATING(x, name, using V [[maybe_unused]] = ::augkd::cpu::Vec<A>;        \
                          [[maybe_unused]] constexpr int64_t W = V::size(); __VA_ARGS__)
