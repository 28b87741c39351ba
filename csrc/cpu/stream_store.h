// Streaming (non-temporal) stores for the memory-bound elementwise CPU kernels (mixup).
//
// Why: an ordinary store to a line that is not in cache first reads the line from memory (read for
// ownership), so writing N bytes of output moves 2N bytes. A streaming store writes whole lines
// without reading them. In the latent-mixup backward (4 streams read, 3 written) that is 10 units of
// traffic against 7; measured on a 2-core EPYC VM, a 26 MB-per-stream sweep ran 1.8x faster.
// The catch: streamed lines bypass the cache, so a consumer that would have found the output in cache
// reads it from memory instead. So they are used only when a call touches more than half the
// last-level cache: a sweep that large has evicted its first outputs by the time it ends, all the more
// as the LLC is shared with the other cores (glibc's memcpy takes its non-temporal path on a similar
// rule, at 3/4 of the cache share).
//
// What: `use_streaming_stores(bytes)` decides per call (AUGKD_CPU_STREAMING_STORES=auto|1|0 overrides);
// `rows_stay_aligned` says whether the row layout lets every full vector be a whole line;
// `for_each_span` sweeps rows, or the flat range when no coefficient depends on the row; `store_out(p, v, n, stream)` streams a full,
// aligned float vector and falls back to an ordinary store for everything else (partial vectors,
// other dtypes, ISAs without streaming stores). A thread's streamed stores are ordered by `stream_fence()`
// before its work item ends.
#pragma once

#include <immintrin.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cpu/vec_utils.h"

namespace augkd::cpu {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasStreamingStores = true;
#else
constexpr bool kHasStreamingStores = false;
#endif

// Bytes of the last-level cache (sysconf; 32 MiB when the C library cannot tell).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long l3 = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) : (int64_t{32} << 20);
  }();
  return bytes;
}

// Whether a call that reads and writes `footprint` bytes in all should stream its outputs.
inline bool use_streaming_stores(int64_t footprint) {
  // read on every call (a getenv per kernel launch is noise), so tests and benchmarks can flip it
  const char* v = std::getenv("AUGKD_CPU_STREAMING_STORES");
  const int mode = (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) ? -1 : (v[0] == '0' ? 0 : 1);
  if (!kHasStreamingStores || mode == 0) return false;
  return mode == 1 || 2 * footprint > last_level_cache_bytes();
}

// Streaming stores are weakly ordered: fence them before the work item that made them ends, so the
// parallel_for join publishes them like ordinary stores.
inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// Streaming pays only when every full vector it writes is a whole aligned line: a partial vector
// (the tail of a row whose length is not a multiple of the vector width) is an ordinary store into a
// line whose other half is streamed, and mixing the two on one line costs more than streaming saves
// (measured: 65536 x 100 latent mixup went 20% slower). torch's CPU allocator aligns every tensor
// base to 64 bytes, so rows of a multiple of W floats start aligned in every tensor at once.
template <int64_t W>
inline bool rows_stay_aligned(int64_t row_length) {
  return row_length % W == 0;
}

// The spans of a (rows, L) sweep: f(row, offset, length) for each row, or, when `flat` (no
// coefficient depends on the row), for blocks of the flat rows * L range: every block a whole number
// of vectors (aligned, for streaming) and large enough to amortise a task, split over the threads.
// Each task ends with stream_fence(stream).
template <int64_t W, typename F>
inline void for_each_span(int64_t rows, int64_t L, bool flat, bool stream, F&& f) {
  if (!flat || L == 0) {
    at::parallel_for(0, rows, row_grain(L), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i, i * L, L);
      stream_fence(stream);
    });
    return;
  }
  constexpr int64_t kBlock = 256 * W;
  const int64_t n = rows * L;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / kBlock), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * kBlock;
      f(off / L, off, std::min(kBlock, n - off));
    }
    stream_fence(stream);
  });
}

template <typename scalar_t>
inline void store_out(scalar_t* p, const Vec<acc_t<scalar_t>>& v, int64_t n, bool stream) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (stream && n == 16 && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
      _mm512_stream_ps(p, static_cast<__m512>(v));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if (stream && n == 8 && reinterpret_cast<uintptr_t>(p) % 32 == 0) {
      _mm256_stream_ps(p, static_cast<__m256>(v));
      return;
    }
#endif
  }
  store(p, v, n);
}

}  // namespace augkd::cpu
