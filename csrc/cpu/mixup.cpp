// Mixup, CPU: augkd::latent_mixup_fwd/_bwd and augkd::pixel_mixup_fwd/_bwd (docs/ops-design.md section 3).
//
//   latent_mixup(z, m, psi, s) = z + (1 - s_i) m_ij (psi_ij - z_ij)           z, psi (B, L); m (B, L) or (1, L)
//     k = (1 - s_i) m_ij, dlt = psi - z:  grad_z = g (1 - k), grad_psi = g k,
//     grad_m = g (1 - s_i) dlt (summed over rows for a (1, L) mask), grad_s_i = -sum_j g m_ij dlt
//   pixel_mixup(g, r, s, mean, std) = (g + s_i (r - g) - mean_c) / std_c                 (B, C, H, W)
//     grad_g = go (1 - s_i) / std_c, grad_r = go s_i / std_c, grad_s_i = sum_{c,h,w} go (r - g) / std_c
// Elementwise sweeps, rows (or image planes) in parallel. The backward computes only the gradients its
// flags ask for (docs/ops-design.md: "needs-grad flags"). Reductions accumulate in acc_t and are combined
// in a fixed order (per-row sums; a (1, L) mask gradient is summed per chunk of rows, the chunks then added
// in order), so results do not depend on the thread count.
#include "cpu/vec_utils.h"  // first: see the note on warnings there
#include "cpu/stream_store.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>
#include <vector>

#include "op_checks.h"
#include "op_outputs.h"
#include "op_register.h"

namespace augkd::cpu {
namespace {

using checks::present;

// s_i as acc_t: from the tensor when given, else the scalar.
template <typename scalar_t>
struct MixS {
  const scalar_t* ptr;
  acc_t<scalar_t> scalar;
  acc_t<scalar_t> operator()(int64_t i) const { return ptr ? static_cast<acc_t<scalar_t>>(ptr[i]) : scalar; }
};

template <typename scalar_t>
MixS<scalar_t> mix_s(const std::optional<at::Tensor>& s, double s_scalar) {
  return {checks::data_or_null<scalar_t>(s), static_cast<acc_t<scalar_t>>(s_scalar)};
}

// ------------------------------------------------------------------------------------------------------------
// latent mixup
// ------------------------------------------------------------------------------------------------------------

at::Tensor latent_mixup_fwd_cpu(const at::Tensor& z, const at::Tensor& mask, const at::Tensor& psi,
                                const std::optional<at::Tensor>& s, double s_scalar) {
  checks::check_latent_mixup_fwd(z, mask, psi, s);
  const int64_t B = z.size(0), L = z.size(1);
  const bool row_mask = mask.size(0) == B;
  at::Tensor out = new_output_like(z);
  AUGKD_CPU_DISPATCH(z, "latent_mixup_fwd_cpu", {
    const scalar_t* z_ptr = z.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mask.const_data_ptr<scalar_t>();
    const scalar_t* p_ptr = psi.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    const auto s_of = mix_s<scalar_t>(s, s_scalar);
    const bool flat = !present(s) && row_mask;  // nothing depends on the row: one flat sweep
    const bool stream = use_streaming_stores(static_cast<int64_t>(z.nbytes() * 3 + mask.nbytes())) &&
                        (flat || rows_stay_aligned<W>(L));
    for_each_span<W>(B, L, flat, stream, [&](int64_t i, int64_t off, int64_t len) {
      const V k(A(1) - s_of(i));
      const scalar_t* mr = m_ptr + (row_mask ? off : 0);
      vec_loop<W>(0, len, [&](int64_t j, int64_t n) {
        const V zv = load(z_ptr + off + j, n);
        const V dlt = load(p_ptr + off + j, n) - zv;
        store_out(o_ptr + off + j, at::vec::fmadd(k * load(mr + j, n), dlt, zv), n, stream);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_mixup_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& mask, const at::Tensor& psi,
    const std::optional<at::Tensor>& s, double s_scalar, bool z_grad, bool mask_grad, bool psi_grad,
    bool s_grad) {
  checks::check_latent_mixup_bwd(grad_out, z, mask, psi, s);
  const int64_t B = z.size(0), L = z.size(1);
  const bool row_mask = mask.size(0) == B;
  const bool want_s = s_grad && present(s);
  at::Tensor grad_z = z_grad ? new_output_like(z) : unused_grad(z);
  at::Tensor grad_psi = psi_grad ? new_output_like(psi) : unused_grad(psi);
  at::Tensor grad_mask = mask_grad ? new_output_like(mask) : unused_grad(mask);
  at::Tensor grad_s = want_s ? at::empty_like(*s) : unused_grad(z);

  // (1, L) mask: rows are cut into a number of chunks that depends on B and L only; each chunk sums its
  // rows into its own acc_t row of `partial`, and the chunk rows are then added in order.
  const bool shared_sum = mask_grad && !row_mask;
  const int64_t n_chunks =
      shared_sum ? std::clamp<int64_t>(B * L / 65536, 1, std::min<int64_t>(64, std::max<int64_t>(B, 1))) : 1;
  const int64_t chunk_rows = (B + n_chunks - 1) / std::max<int64_t>(n_chunks, 1);

  AUGKD_CPU_DISPATCH(z, "latent_mixup_bwd_cpu", {
    const scalar_t* go_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z_ptr = z.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mask.const_data_ptr<scalar_t>();
    const scalar_t* p_ptr = psi.const_data_ptr<scalar_t>();
    scalar_t* gz_ptr = z_grad ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp_ptr = psi_grad ? grad_psi.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gm_ptr = mask_grad ? grad_mask.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gs_ptr = want_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
    const auto s_of = mix_s<scalar_t>(s, s_scalar);
    // bytes read (g, z, psi, mask) and written (the wanted B x L gradients)
    const int64_t n_out = (z_grad ? 1 : 0) + (psi_grad ? 1 : 0) + (mask_grad && row_mask ? 1 : 0);
    const bool flat = !present(s) && row_mask;  // nothing depends on the row (no grad_s, no shared sum)
    const bool stream = use_streaming_stores(static_cast<int64_t>(z.nbytes()) * (3 + n_out) +
                                             static_cast<int64_t>(mask.nbytes())) &&
                        (flat || rows_stay_aligned<W>(L));

    // One span of row i (the whole row, or with `flat` a block of the flat range): writes the wanted
    // grad_z / grad_psi entries; grad_mask into gm (scalar_t, row mask) or, with SHARED (a (1, L) mask
    // whose gradient is wanted), adds it into acc (acc_t); returns -sum_j g m dlt when WANT_S. Which
    // outputs are wanted is a compile-time set (WANT bits), so each combination gets a loop that loads
    // and stores only what it uses: the sweep is memory-bound, every stream skipped is time saved.
    auto do_span = [&](int64_t i, int64_t off, int64_t len, auto want, A* acc) -> A {
      constexpr unsigned BITS = decltype(want)::value;
      constexpr bool GZ = BITS & 1u, GM = BITS & 2u, GP = BITS & 4u, WS = BITS & 8u, SHARED = BITS & 16u;
      constexpr bool NEED_M = GZ || GP || WS, NEED_DLT = GM || WS;
      const A one_minus_s = A(1) - s_of(i);
      const V v_oms(one_minus_s);
      const scalar_t* mr = m_ptr + (row_mask ? off : 0);  // a (1, L) mask is read by every row
      V vsum(A(0));
      vec_loop<W>(0, len, [&](int64_t j, int64_t n) {
        const V g = load(go_ptr + off + j, n);
        V m(A(0)), dlt(A(0));
        if constexpr (NEED_M) m = load(mr + j, n);
        if constexpr (NEED_DLT) {
          const V zv = load(z_ptr + off + j, n);
          dlt = load(p_ptr + off + j, n) - zv;
        }
        if constexpr (GZ || GP) {
          const V gk = g * v_oms * m;  // g k, k = (1 - s) m
          if constexpr (GP) store_out(gp_ptr + off + j, gk, n, stream);
          if constexpr (GZ) store_out(gz_ptr + off + j, g - gk, n, stream);
        }
        if constexpr (NEED_DLT) {
          const V gdlt = g * dlt;
          if constexpr (GM && SHARED) {
            const V prev = V::loadu(acc + j, n);
            at::vec::fmadd(gdlt, v_oms, prev).store(acc + j, n);
          } else if constexpr (GM) {
            store_out(gm_ptr + off + j, gdlt * v_oms, n, stream);
          }
          if constexpr (WS) vsum = at::vec::fmadd(gdlt, m, vsum);
        }
      });
      if constexpr (WS) return -hsum(vsum);
      return A(0);
    };

    const unsigned bits = (z_grad ? 1u : 0u) | (mask_grad ? 2u : 0u) | (psi_grad ? 4u : 0u) |
                          (want_s ? 8u : 0u) | (shared_sum ? 16u : 0u);
    with_bits<32>(bits, [&](auto want) {
      constexpr unsigned BITS = decltype(want)::value;
      if constexpr ((BITS & 16u) && !(BITS & 2u)) {
        // unreachable: a shared sum is only set up for a wanted grad_mask
      } else if constexpr (!(BITS & 16u)) {
        for_each_span<W>(B, L, flat, stream, [&](int64_t i, int64_t off, int64_t len) {
          const A r = do_span(i, off, len, want, nullptr);
          if constexpr (BITS & 8u) gs_ptr[i] = static_cast<scalar_t>(r);
        });
      } else {
        std::vector<A> partial(static_cast<size_t>(n_chunks * L), A(0));
        at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            A* acc = partial.data() + c * L;
            const int64_t r1 = std::min(B, (c + 1) * chunk_rows);
            for (int64_t i = c * chunk_rows; i < r1; ++i) {
              const A r = do_span(i, i * L, L, want, acc);
              if constexpr (BITS & 8u) gs_ptr[i] = static_cast<scalar_t>(r);
            }
          }
          stream_fence(stream);
        });
        at::parallel_for(0, L, 16384, [&](int64_t j0, int64_t j1) {
          vec_loop<W>(j0, j1, [&](int64_t j, int64_t n) {
            V sum = V::loadu(partial.data() + j, n);
            for (int64_t c = 1; c < n_chunks; ++c) sum += V::loadu(partial.data() + c * L + j, n);
            store(gm_ptr + j, sum, n);
          });
        });
      }
    });
  });
  return {grad_z, grad_mask, grad_psi, grad_s};
}

// ------------------------------------------------------------------------------------------------------------
// pixel mixup
// ------------------------------------------------------------------------------------------------------------

// Per channel: mean_c (0 when None) and 1 / std_c (1 when None).
struct ChannelNorm {
  const float* mean;
  const float* std;
  double mean_of(int64_t c) const { return mean ? mean[c] : 0.0; }
  double inv_std_of(int64_t c) const { return std ? 1.0 / std[c] : 1.0; }
};

ChannelNorm channel_norm(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  return {checks::data_or_null<float>(mean),
          checks::data_or_null<float>(std_dev)};
}

at::Tensor pixel_mixup_fwd_cpu(const at::Tensor& generated, const at::Tensor& real,
                               const std::optional<at::Tensor>& s, double s_scalar,
                               const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std_dev) {
  checks::check_pixel_mixup_fwd(generated, real, s, mean, std_dev);
  const int64_t B = generated.size(0), C = generated.size(1);
  const int64_t HW = generated.size(2) * generated.size(3);
  at::Tensor out = new_output_like(generated);
  const ChannelNorm norm = channel_norm(mean, std_dev);
  AUGKD_CPU_DISPATCH(generated, "pixel_mixup_fwd_cpu", {
    const scalar_t* g_ptr = generated.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = real.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    const auto s_of = mix_s<scalar_t>(s, s_scalar);
    const bool stream = use_streaming_stores(static_cast<int64_t>(generated.nbytes()) * 3) &&
                        rows_stay_aligned<W>(HW);
    at::parallel_for(0, B * C, row_grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C;
        const V v_s(s_of(p / C));
        const V v_inv(static_cast<A>(norm.inv_std_of(c)));
        const V v_shift(static_cast<A>(-norm.mean_of(c) * norm.inv_std_of(c)));
        const int64_t off = p * HW;
        vec_loop<W>(0, HW, [&](int64_t j, int64_t n) {
          const V gv = load(g_ptr + off + j, n);
          const V mixed = at::vec::fmadd(v_s, load(r_ptr + off + j, n) - gv, gv);
          store_out(o_ptr + off + j, at::vec::fmadd(mixed, v_inv, v_shift), n, stream);
        });
      }
      stream_fence(stream);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_mixup_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& generated, const at::Tensor& real,
    const std::optional<at::Tensor>& s, double s_scalar, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& std_dev, bool generated_grad, bool real_grad, bool s_grad) {
  checks::check_pixel_mixup_bwd(grad_out, generated, real, s, mean, std_dev);
  const int64_t B = generated.size(0), C = generated.size(1);
  const int64_t HW = generated.size(2) * generated.size(3);
  const bool want_s = s_grad && present(s);
  at::Tensor grad_g = generated_grad ? new_output_like(generated) : unused_grad(generated);
  at::Tensor grad_r = real_grad ? new_output_like(real) : unused_grad(real);
  at::Tensor grad_s = want_s ? at::empty_like(*s) : unused_grad(generated);
  const ChannelNorm norm = channel_norm(mean, std_dev);
  AUGKD_CPU_DISPATCH(generated, "pixel_mixup_bwd_cpu", {
    const scalar_t* go_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = generated.const_data_ptr<scalar_t>();
    const scalar_t* r_ptr = real.const_data_ptr<scalar_t>();
    scalar_t* gg_ptr = generated_grad ? grad_g.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gr_ptr = real_grad ? grad_r.mutable_data_ptr<scalar_t>() : nullptr;
    const auto s_of = mix_s<scalar_t>(s, s_scalar);
    // per-plane sums of go (r - g) / std_c, added per image in channel order below
    std::vector<A> plane_sum(want_s ? static_cast<size_t>(B * C) : 0);
    const unsigned bits = (generated_grad ? 1u : 0u) | (real_grad ? 2u : 0u) | (want_s ? 4u : 0u);
    // The wanted outputs (WANT bits) are a compile-time set: each combination loads and stores only
    // the streams it uses (grad_generated alone reads go and writes one tensor).
    with_bits<8>(bits, [&](auto want) {
      constexpr unsigned BITS = decltype(want)::value;
      constexpr bool GG = BITS & 1u, GR = BITS & 2u, WS = BITS & 4u;
      // bytes read (go; generated and real for grad_s) and written
      const int64_t streams = 1 + (GG ? 1 : 0) + (GR ? 1 : 0) + (WS ? 2 : 0);
      const bool stream = use_streaming_stores(static_cast<int64_t>(generated.nbytes()) * streams) &&
                          rows_stay_aligned<W>(HW);
      at::parallel_for(0, B * C, row_grain(HW), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const A s_i = s_of(p / C);
          const A inv_std = static_cast<A>(norm.inv_std_of(p % C));
          const V v_kr(s_i * inv_std), v_kg((A(1) - s_i) * inv_std);
          const int64_t off = p * HW;
          V vsum(A(0));
          vec_loop<W>(0, HW, [&](int64_t j, int64_t n) {
            const V go = load(go_ptr + off + j, n);
            if constexpr (GG) store_out(gg_ptr + off + j, go * v_kg, n, stream);
            if constexpr (GR) store_out(gr_ptr + off + j, go * v_kr, n, stream);
            if constexpr (WS) {
              vsum = at::vec::fmadd(go, load(r_ptr + off + j, n) - load(g_ptr + off + j, n), vsum);
            }
          });
          if constexpr (WS) plane_sum[p] = hsum(vsum) * inv_std;
        }
        stream_fence(stream);
      });
    });
    if (want_s) {
      scalar_t* gs_ptr = grad_s.mutable_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        A sum = 0;
        for (int64_t c = 0; c < C; ++c) sum += plane_sum[b * C + c];
        gs_ptr[b] = static_cast<scalar_t>(sum);
      }
    }
  });
  return {grad_g, grad_r, grad_s};
}

}  // namespace
}  // namespace augkd::cpu

TORCH_LIBRARY_IMPL(augkd, CPU, m) {
  AUGKD_IMPL_FWD_BWD(m, latent_mixup, cpu);
  AUGKD_IMPL_FWD_BWD(m, pixel_mixup, cpu);
}
