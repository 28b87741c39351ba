// CUDA implementation of augkd::latent_mixup_{fwd,bwd} and augkd::pixel_mixup_{fwd,bwd} (schemas in
// csrc/schemas.cpp, math in docs/ops-design.md section 3, kernels in kernels/mixup.cuh).
//
// Launch layout: 2-D grids, blockIdx.x a tile of columns, blockIdx.y a row (forward, pixel backward) or
// a chunk of rows (latent backward). Reductions go through small fp32 (fp64) workspaces and a second
// kernel that sums the partials in a fixed order: deterministic, no atomics, no host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "launch_utils.h"
#include "mixup.cuh"
#include "op_checks.h"
#include "op_dispatch.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cuda {
namespace {

constexpr int kPixelVecsPerThread = 4;  // pixel tiles: kPixelThreads * VEC * 4 columns
constexpr int64_t kLatentMaxChunks = 1024;
constexpr int64_t kLatentMinRowsPerChunk = 8;

template <typename T>
void launch_sum_partials(const at::Tensor& ws, int64_t parts, int64_t n, double sign, at::Tensor& out,
                         cudaStream_t stream) {
  using A = acc_type<T>;
  const auto blocks = static_cast<unsigned>(std::min(ceil_div(n, 256), kMaxGridX));
  sum_partials_kernel<T><<<blocks, 256, 0, stream>>>(ws.const_data_ptr<A>(), parts, n, static_cast<A>(sign),
                                                     out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Latent mixup
// ---------------------------------------------------------------------------------------------------------

at::Tensor latent_mixup_fwd_cuda(const at::Tensor& z_in, const at::Tensor& mask_in, const at::Tensor& psi_in,
                                 const std::optional<at::Tensor>& s, double s_scalar) {
  checks::check_latent_mixup_fwd(z_in, mask_in, psi_in, s);
  const CudaScope scope("latent_mixup", "z", z_in);
  const at::Tensor z = aligned_input(z_in);
  const at::Tensor mask = aligned_input(mask_in);
  const at::Tensor psi = aligned_input(psi_in);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  at::Tensor out = at::empty(z.sizes(), z.options());
  if (z.numel() == 0) return out;

  AUGKD_DISPATCH_FLOATING(z, "augkd_latent_mixup_fwd_cuda", {
    LatentParams<scalar_t> p{};
    p.z = z.const_data_ptr<scalar_t>();
    p.mask = mask.const_data_ptr<scalar_t>();
    p.psi = psi.const_data_ptr<scalar_t>();
    p.s = checks::data_or_null<scalar_t>(s);
    p.mix = out.mutable_data_ptr<scalar_t>();
    p.rows = rows;
    p.cols = cols;
    p.mask_bcast = mask.size(0) == 1 && rows != 1;
    p.s_scalar = static_cast<A>(s_scalar);
    constexpr int V = kVec<scalar_t>;
    const bool vec = cols % V == 0;
    const int64_t per_block = static_cast<int64_t>(kMixThreads) * (vec ? V : 1);
    const dim3 grid(static_cast<unsigned>(ceil_div(cols, per_block)), static_cast<unsigned>(std::min(rows, kMaxGridY)));
    if (vec) {
      latent_mixup_fwd_kernel<scalar_t, V><<<grid, kMixThreads, 0, scope.stream>>>(p);
    } else {
      latent_mixup_fwd_kernel<scalar_t, 1><<<grid, kMixThreads, 0, scope.stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_mixup_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& z_in, const at::Tensor& mask_in, const at::Tensor& psi_in,
    const std::optional<at::Tensor>& s, double s_scalar, bool z_grad, bool mask_grad, bool psi_grad,
    bool s_grad) {
  checks::check_latent_mixup_bwd(grad_out_in, z_in, mask_in, psi_in, s);
  const CudaScope scope("latent_mixup_bwd", "z", z_in);
  const at::Tensor go = aligned_input(grad_out_in);
  const at::Tensor z = aligned_input(z_in);
  const at::Tensor mask = aligned_input(mask_in);
  const at::Tensor psi = aligned_input(psi_in);
  const int64_t rows = z.size(0);
  const int64_t cols = z.size(1);
  const bool has_s = s_grad && checks::present(s);  // grad_s wanted (s itself is read whenever given)
  // A (1, L) mask with a single row of z is just a full mask.
  const bool bcast = mask.size(0) == 1 && rows != 1;

  // A gradient not asked for is an empty (0,) tensor and a nullptr for the kernel.
  at::Tensor grad_z = z_grad ? at::empty(z.sizes(), z.options()) : unused_grad(z);
  at::Tensor grad_psi = psi_grad ? at::empty(psi.sizes(), psi.options()) : unused_grad(z);
  at::Tensor grad_mask = mask_grad ? at::empty(mask.sizes(), mask.options()) : unused_grad(z);
  at::Tensor grad_s = has_s ? at::empty({rows}, s->options()) : unused_grad(z);
  if (z.numel() == 0) {  // sums over nothing
    grad_mask.zero_();
    grad_s.zero_();
    return {grad_z, grad_mask, grad_psi, grad_s};
  }

  AUGKD_DISPATCH_FLOATING(z, "augkd_latent_mixup_bwd_cuda", {
    constexpr int V = kVec<scalar_t>;
    const bool vec = cols % V == 0;
    const int64_t n_tiles = ceil_div(cols, static_cast<int64_t>(kMixThreads) * (vec ? V : 1));
    int64_t n_chunks = std::min(ceil_div(rows, kLatentMinRowsPerChunk), kLatentMaxChunks);
    const int64_t rows_per_chunk = ceil_div(rows, n_chunks);
    n_chunks = ceil_div(rows, rows_per_chunk);
    const int64_t slots = n_tiles * (kMixThreads / kWarp);
    const auto ws_opts = z.options().dtype(checks::row_dtype(z.scalar_type()));
    const bool sum_mask = bcast && mask_grad;
    at::Tensor ws_mask = sum_mask ? at::empty({n_chunks, cols}, ws_opts) : at::Tensor();
    at::Tensor ws_s = has_s ? at::empty({slots, rows}, ws_opts) : at::Tensor();

    LatentParams<scalar_t> p{};
    p.grad_out = go.const_data_ptr<scalar_t>();
    p.z = z.const_data_ptr<scalar_t>();
    p.mask = mask.const_data_ptr<scalar_t>();
    p.psi = psi.const_data_ptr<scalar_t>();
    p.s = checks::data_or_null<scalar_t>(s);
    p.grad_z = z_grad ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_psi = psi_grad ? grad_psi.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_mask = mask_grad && !bcast ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr;
    p.ws_mask = sum_mask ? ws_mask.mutable_data_ptr<A>() : nullptr;
    p.ws_s = has_s ? ws_s.mutable_data_ptr<A>() : nullptr;
    p.rows = rows;
    p.cols = cols;
    p.rows_per_chunk = rows_per_chunk;
    p.mask_bcast = bcast;
    p.s_scalar = static_cast<A>(s_scalar);
    const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(n_chunks));
    if (vec) {
      latent_mixup_bwd_kernel<scalar_t, V><<<grid, kMixThreads, 0, scope.stream>>>(p);
    } else {
      latent_mixup_bwd_kernel<scalar_t, 1><<<grid, kMixThreads, 0, scope.stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_mask (1, L) = sum over row chunks; grad_s_i = -sum over column slots of sum_j g m dlt
    if (sum_mask) launch_sum_partials<scalar_t>(ws_mask, n_chunks, cols, 1.0, grad_mask, scope.stream);
    if (has_s) launch_sum_partials<scalar_t>(ws_s, slots, rows, -1.0, grad_s, scope.stream);
  });
  return {grad_z, grad_mask, grad_psi, grad_s};
}

// ---------------------------------------------------------------------------------------------------------
// Pixel mixup
// ---------------------------------------------------------------------------------------------------------

template <typename T>
PixelParams<T> pixel_params(const at::Tensor& gen, const at::Tensor& real, const std::optional<at::Tensor>& s,
                            double s_scalar, const std::optional<at::Tensor>& mean,
                            const std::optional<at::Tensor>& std_dev, bool vec) {
  PixelParams<T> p{};
  p.gen = gen.const_data_ptr<T>();
  p.real = real.const_data_ptr<T>();
  p.s = checks::data_or_null<T>(s);
  p.mean = checks::data_or_null<float>(mean);
  p.std = checks::data_or_null<float>(std_dev);
  p.rows = gen.size(0);
  p.n = gen.numel() / gen.size(0);
  p.hw = gen.size(2) * gen.size(3);
  p.tile = static_cast<int64_t>(kPixelThreads) * (vec ? kVec<T> : 1) * kPixelVecsPerThread;
  p.s_scalar = static_cast<acc_type<T>>(s_scalar);
  return p;
}

at::Tensor pixel_mixup_fwd_cuda(const at::Tensor& generated, const at::Tensor& real_in,
                                const std::optional<at::Tensor>& s, double s_scalar,
                                const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  checks::check_pixel_mixup_fwd(generated, real_in, s, mean, std_dev);
  const CudaScope scope("pixel_mixup", "generated", generated);
  const at::Tensor gen = aligned_input(generated);
  const at::Tensor real = aligned_input(real_in);
  at::Tensor out = at::empty(gen.sizes(), gen.options());
  if (gen.numel() == 0) return out;

  AUGKD_DISPATCH_FLOATING(gen, "augkd_pixel_mixup_fwd_cuda", {
    constexpr int V = kVec<scalar_t>;
    const bool vec = (gen.size(2) * gen.size(3)) % V == 0;  // a vector never straddles two channels
    PixelParams<scalar_t> p = pixel_params<scalar_t>(gen, real, s, s_scalar, mean, std_dev, vec);
    p.mix = out.mutable_data_ptr<scalar_t>();
    const dim3 grid(static_cast<unsigned>(ceil_div(p.n, p.tile)), static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
    if (vec) {
      pixel_mixup_fwd_kernel<scalar_t, V><<<grid, kPixelThreads, 0, scope.stream>>>(p);
    } else {
      pixel_mixup_fwd_kernel<scalar_t, 1><<<grid, kPixelThreads, 0, scope.stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_mixup_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& generated, const at::Tensor& real_in,
    const std::optional<at::Tensor>& s, double s_scalar, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& std_dev, bool generated_grad, bool real_grad, bool s_grad) {
  checks::check_pixel_mixup_bwd(grad_out_in, generated, real_in, s, mean, std_dev);
  const CudaScope scope("pixel_mixup_bwd", "generated", generated);
  const at::Tensor go = aligned_input(grad_out_in);
  const at::Tensor gen = aligned_input(generated);
  const at::Tensor real = aligned_input(real_in);
  const int64_t rows = gen.size(0);
  const bool has_s = s_grad && checks::present(s);  // grad_s wanted
  at::Tensor grad_gen = generated_grad ? at::empty(gen.sizes(), gen.options()) : unused_grad(gen);
  at::Tensor grad_real = real_grad ? at::empty(real.sizes(), real.options()) : unused_grad(gen);
  at::Tensor grad_s = has_s ? at::empty({rows}, s->options()) : unused_grad(gen);
  if (gen.numel() == 0) {
    grad_s.zero_();
    return {grad_gen, grad_real, grad_s};
  }

  AUGKD_DISPATCH_FLOATING(gen, "augkd_pixel_mixup_bwd_cuda", {
    constexpr int V = kVec<scalar_t>;
    const bool vec = (gen.size(2) * gen.size(3)) % V == 0;
    PixelParams<scalar_t> p = pixel_params<scalar_t>(gen, real, s, s_scalar, mean, std_dev, vec);
    const int64_t n_tiles = ceil_div(p.n, p.tile);
    const int64_t slots = n_tiles * (kPixelThreads / kWarp);
    at::Tensor ws_s = has_s ? at::empty({slots, rows}, gen.options().dtype(checks::row_dtype(gen.scalar_type())))
                            : at::Tensor();
    p.grad_out = go.const_data_ptr<scalar_t>();
    p.grad_gen = generated_grad ? grad_gen.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_real = real_grad ? grad_real.mutable_data_ptr<scalar_t>() : nullptr;
    p.ws_s = has_s ? ws_s.mutable_data_ptr<A>() : nullptr;
    const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(std::min(rows, kMaxGridY)));
    if (vec) {
      pixel_mixup_bwd_kernel<scalar_t, V><<<grid, kPixelThreads, 0, scope.stream>>>(p);
    } else {
      pixel_mixup_bwd_kernel<scalar_t, 1><<<grid, kPixelThreads, 0, scope.stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_s_i = sum_{c,h,w} go (r - g) / std_c
    if (has_s) launch_sum_partials<scalar_t>(ws_s, slots, rows, 1.0, grad_s, scope.stream);
  });
  return {grad_gen, grad_real, grad_s};
}

}  // namespace
}  // namespace augkd::cuda

TORCH_LIBRARY_IMPL(augkd, CUDA, m) {
  AUGKD_IMPL_FWD_BWD(m, latent_mixup, cuda);
  AUGKD_IMPL_FWD_BWD(m, pixel_mixup, cuda);
}
