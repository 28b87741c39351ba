// Anchor-masked latent mixup and pixel mixup, forward and backward. docs/ops-design.md section 3:
//   latent_mixup(z, mask, psi, s)   = z + (1 - s_i) m_ij (psi_ij - z_ij)
//   pixel_mixup(g, r, s, mean, std) = (g + s_i (r - g) - mean_c) / std_c
// Layout: a 2-D grid, blockIdx.x a tile of columns of a row, blockIdx.y a row (or a chunk of rows), so
// no kernel divides a flat index by the row length. VEC = kVec<T> (16-byte accesses) when every row
// start is 16-byte aligned in every tensor (aligned bases and a row length, and for pixel mixup an
// H*W, that is a multiple of VEC), else VEC = 1.
//
// Reductions (grad_s over a row, grad_mask over rows for a (1, L) mask) are deterministic: each warp
// (grad_s) or each row chunk (grad_mask) writes its partial sum to its own slot of an fp32 (fp64)
// workspace, and sum_partials_kernel adds the slots in a fixed order. No atomics.
#pragma once

#include "load_store.cuh"
#include "reduce.cuh"

namespace augkd::cuda {

constexpr int kMixThreads = 128;    // threads per block of the latent mixup kernels (a multiple of 32)
constexpr int kPixelThreads = 256;  // threads per block of the pixel mixup kernels

// ---------------------------------------------------------------------------------------------------------
// Latent mixup
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct LatentParams {
  using A = acc_type<T>;
  const T* __restrict__ grad_out;  // backward only
  const T* __restrict__ z;         // (rows, cols)
  const T* __restrict__ mask;      // (rows, cols) or (1, cols)
  const T* __restrict__ psi;       // (rows, cols)
  const T* __restrict__ s;         // (rows,) or nullptr: s_scalar
  // Backward outputs are nullptr when that gradient was not asked for (the *_grad schema flags).
  T* __restrict__ mix;             // forward output
  T* __restrict__ grad_z;          // backward
  T* __restrict__ grad_psi;        // backward
  T* __restrict__ grad_mask;       // backward, full mask only (nullptr for a (1, L) mask)
  A* __restrict__ ws_mask;         // backward, (1, L) mask: (row chunks, cols) partial column sums
  A* __restrict__ ws_s;            // backward, grad_s wanted: (col tiles * warps, rows) partial row sums
  int64_t rows, cols;
  int64_t rows_per_chunk;          // backward: rows per blockIdx.y
  bool mask_bcast;                 // mask is (1, L)
  A s_scalar;
};

template <typename T>
AUGKD_HD acc_type<T> row_s(const T* s, acc_type<T> s_scalar, int64_t row) {
  return s != nullptr ? static_cast<acc_type<T>>(s[row]) : s_scalar;
}

// Where a thread sits: block (bx, by) of a grid with gdy blocks along y, thread tx of bdx. The kernels
// pass the CUDA built-ins; a host emulation passes loop counters (every per-thread body below is
// __host__ __device__).
struct ThreadPos {
  int64_t bx, by, gdy;
  int tx, bdx;
};

__device__ __forceinline__ ThreadPos this_thread() {
  return {blockIdx.x, blockIdx.y, gridDim.y, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)};
}

// Per-row partial sums of the backward kernels: every thread of a warp calls it for the same (slot,
// row); lane 0 stores the warp's sum in ws[slot * rows + row] (one slot per warp and column tile).
template <typename A>
struct WarpRowSum {
  A* __restrict__ ws;
  int64_t rows;
  __device__ __forceinline__ void operator()(int64_t slot, int64_t row, A v) const {
    v = warp_reduce(SumState<A>{v}).v;
    if (threadIdx.x % kWarp == 0) ws[slot * rows + row] = v;
  }
};

// One VEC-vector per thread per row: blockIdx.x covers blockDim.x * VEC columns; rows loop by gridDim.y.
template <typename T, int VEC>
AUGKD_HD void latent_mixup_fwd_thread(const LatentParams<T>& p, const ThreadPos& t) {
  using A = acc_type<T>;
  const int64_t c = (t.bx * t.bdx + t.tx) * VEC;
  if (c >= p.cols) return;  // VEC divides cols when VEC > 1, so [c, c + VEC) is inside the row
  for (int64_t row = t.by; row < p.rows; row += t.gdy) {
    const A one_minus_s = A(1) - row_s(p.s, p.s_scalar, row);
    const int64_t off = row * p.cols + c;
    const int64_t moff = p.mask_bcast ? c : off;
    A z[VEC], m[VEC], psi[VEC], o[VEC];
    load_n<VEC>(p.z + off, z);
    load_n<VEC>(p.mask + moff, m);
    load_n<VEC>(p.psi + off, psi);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = z[k] + one_minus_s * m[k] * (psi[k] - z[k]);  // z + (1-s) m (psi - z)
    store_n<VEC>(p.mix + off, o);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMixThreads) latent_mixup_fwd_kernel(const LatentParams<T> p) {
  latent_mixup_fwd_thread<T, VEC>(p, this_thread());
}

// blockIdx.x: blockDim.x * VEC columns; blockIdx.y: rows [y * rows_per_chunk, ...) looped in order.
//   k = (1 - s_i) m_ij, dlt = psi_ij - z_ij
//   grad_z = g (1 - k),  grad_psi = g k,  grad_mask = g (1 - s_i) dlt,  grad_s_i = -sum_j g m_ij dlt
// row_sum(slot, row, v) is called by every thread (active or not) for every row when ws_s is set.
template <typename T, int VEC, typename RowSum>
AUGKD_HD void latent_mixup_bwd_thread(const LatentParams<T>& p, const ThreadPos& t, const RowSum& row_sum) {
  using A = acc_type<T>;
  const int64_t c = (t.bx * t.bdx + t.tx) * VEC;
  const bool active = c < p.cols;  // inactive threads still take part in the warp sums
  const int64_t r_begin = t.by * p.rows_per_chunk;
  const int64_t r_end = p.rows < r_begin + p.rows_per_chunk ? p.rows : r_begin + p.rows_per_chunk;
  const int64_t slot = t.bx * (t.bdx / kWarp) + t.tx / kWarp;

  A col_acc[VEC];  // (1, L) mask: sum over this chunk's rows of g (1 - s_i) dlt
#pragma unroll
  for (int k = 0; k < VEC; ++k) col_acc[k] = A(0);
  // Only the streams a wanted gradient uses are read (uniform branches: the same for every thread).
  const bool want_gm = p.grad_mask != nullptr || p.ws_mask != nullptr;
  const bool need_dlt = want_gm || p.ws_s != nullptr;

  for (int64_t row = r_begin; row < r_end; ++row) {
    const A one_minus_s = A(1) - row_s(p.s, p.s_scalar, row);
    A row_acc = A(0);  // sum_j g m dlt over this thread's columns
    if (active) {
      const int64_t off = row * p.cols + c;
      const int64_t moff = p.mask_bcast ? c : off;
      A g[VEC], z[VEC], m[VEC], psi[VEC], gz[VEC], gp[VEC], gm[VEC];
      load_n<VEC>(p.grad_out + off, g);
      load_n<VEC>(p.mask + moff, m);
      if (need_dlt) {
        load_n<VEC>(p.z + off, z);
        load_n<VEC>(p.psi + off, psi);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[k] = psi[k] = A(0);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A kk = one_minus_s * m[k];       // k = (1 - s_i) m_ij
        const A dlt = psi[k] - z[k];           // dlt = psi - z
        gz[k] = g[k] * (A(1) - kk);            // grad_z = g (1 - k)
        gp[k] = g[k] * kk;                     // grad_psi = g k
        gm[k] = g[k] * one_minus_s * dlt;      // grad_mask = g (1 - s_i) dlt
        col_acc[k] += gm[k];
        row_acc += g[k] * m[k] * dlt;          // grad_s_i = -sum_j g m dlt (sign applied at the end)
      }
      if (p.grad_z != nullptr) store_n<VEC>(p.grad_z + off, gz);
      if (p.grad_psi != nullptr) store_n<VEC>(p.grad_psi + off, gp);
      if (p.grad_mask != nullptr) store_n<VEC>(p.grad_mask + off, gm);
    }
    if (p.ws_s != nullptr) row_sum(slot, row, row_acc);
  }
  if (p.ws_mask != nullptr && active) {
    A* dst = p.ws_mask + t.by * p.cols + c;
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = col_acc[k];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMixThreads) latent_mixup_bwd_kernel(const LatentParams<T> p) {
  latent_mixup_bwd_thread<T, VEC>(p, this_thread(), WarpRowSum<acc_type<T>>{p.ws_s, p.rows});
}

// ---------------------------------------------------------------------------------------------------------
// Pixel mixup
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct PixelParams {
  using A = acc_type<T>;
  const T* __restrict__ grad_out;    // backward only
  const T* __restrict__ gen;         // (rows, n), n = C * H * W
  const T* __restrict__ real;
  const T* __restrict__ s;           // (rows,) or nullptr: s_scalar
  const float* __restrict__ mean;    // (C,) fp32 or nullptr (0)
  const float* __restrict__ std;     // (C,) fp32 or nullptr (1)
  T* __restrict__ mix;               // forward output
  T* __restrict__ grad_gen;          // backward (nullptr: not wanted)
  T* __restrict__ grad_real;         // backward (nullptr: not wanted)
  A* __restrict__ ws_s;              // backward, grad_s wanted: (col tiles * warps, rows) partial row sums
  int64_t rows, n, hw, tile;         // tile: columns per blockIdx.x (a multiple of VEC)
  A s_scalar;
};

// blockIdx.x: columns [x * tile, (x + 1) * tile) of a row, blockDim.x * VEC at a time; rows loop by gridDim.y.
template <typename T, int VEC>
AUGKD_HD void pixel_mixup_fwd_thread(const PixelParams<T>& p, const ThreadPos& t) {
  using A = acc_type<T>;
  const int64_t begin = t.bx * p.tile;
  const int64_t end = p.n < begin + p.tile ? p.n : begin + p.tile;
  for (int64_t row = t.by; row < p.rows; row += t.gdy) {
    const A s = row_s(p.s, p.s_scalar, row);
    for (int64_t j = begin + static_cast<int64_t>(t.tx) * VEC; j < end; j += static_cast<int64_t>(t.bdx) * VEC) {
      const int64_t ch = j / p.hw;  // VEC divides H*W: the vector lies in one channel
      const A mean = p.mean != nullptr ? static_cast<A>(p.mean[ch]) : A(0);
      const A sd = p.std != nullptr ? static_cast<A>(p.std[ch]) : A(1);
      const int64_t off = row * p.n + j;
      A g[VEC], r[VEC], o[VEC];
      load_n<VEC>(p.gen + off, g);
      load_n<VEC>(p.real + off, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = (g[k] + s * (r[k] - g[k]) - mean) / sd;  // (g + s (r - g) - mean_c) / std_c
      store_n<VEC>(p.mix + off, o);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kPixelThreads) pixel_mixup_fwd_kernel(const PixelParams<T> p) {
  pixel_mixup_fwd_thread<T, VEC>(p, this_thread());
}

//   grad_generated = go (1 - s_i) / std_c,  grad_real = go s_i / std_c,  grad_s_i = sum go (r - g) / std_c
template <typename T, int VEC, typename RowSum>
AUGKD_HD void pixel_mixup_bwd_thread(const PixelParams<T>& p, const ThreadPos& t, const RowSum& row_sum) {
  using A = acc_type<T>;
  const int64_t begin = t.bx * p.tile;
  const int64_t end = p.n < begin + p.tile ? p.n : begin + p.tile;
  const int64_t slot = t.bx * (t.bdx / kWarp) + t.tx / kWarp;
  for (int64_t row = t.by; row < p.rows; row += t.gdy) {
    const A s = row_s(p.s, p.s_scalar, row);
    const A one_minus_s = A(1) - s;
    A row_acc = A(0);
    for (int64_t j = begin + static_cast<int64_t>(t.tx) * VEC; j < end; j += static_cast<int64_t>(t.bdx) * VEC) {
      const int64_t ch = j / p.hw;
      const A sd = p.std != nullptr ? static_cast<A>(p.std[ch]) : A(1);
      const int64_t off = row * p.n + j;
      A go[VEC], g[VEC], r[VEC], gg[VEC], gr[VEC];
      load_n<VEC>(p.grad_out + off, go);
      if (p.ws_s != nullptr) {  // generated and real are read only for grad_s
        load_n<VEC>(p.gen + off, g);
        load_n<VEC>(p.real + off, r);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) g[k] = r[k] = A(0);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gg[k] = go[k] * one_minus_s / sd;       // grad_generated = go (1 - s) / std_c
        gr[k] = go[k] * s / sd;                 // grad_real = go s / std_c
        row_acc += go[k] * (r[k] - g[k]) / sd;  // grad_s += go (r - g) / std_c
      }
      if (p.grad_gen != nullptr) store_n<VEC>(p.grad_gen + off, gg);
      if (p.grad_real != nullptr) store_n<VEC>(p.grad_real + off, gr);
    }
    if (p.ws_s != nullptr) row_sum(slot, row, row_acc);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kPixelThreads) pixel_mixup_bwd_kernel(const PixelParams<T> p) {
  pixel_mixup_bwd_thread<T, VEC>(p, this_thread(), WarpRowSum<acc_type<T>>{p.ws_s, p.rows});
}

// out[i] = sign * sum_{k < parts} ws[k * n + i], summed in order k = 0, 1, ... (deterministic).
template <typename T>
AUGKD_HD void sum_partials_at(const acc_type<T>* __restrict__ ws, int64_t parts, int64_t n, acc_type<T> sign,
                              T* __restrict__ out, int64_t i) {
  acc_type<T> acc = acc_type<T>(0);
  for (int64_t k = 0; k < parts; ++k) acc += ws[k * n + i];
  out[i] = static_cast<T>(sign * acc);
}

template <typename T>
__global__ void sum_partials_kernel(const acc_type<T>* __restrict__ ws, int64_t parts, int64_t n,
                                    acc_type<T> sign, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sum_partials_at<T>(ws, parts, n, sign, out, i);
  }
}

}  // namespace augkd::cuda
