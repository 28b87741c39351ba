// Host emulation of the mixup kernels (the per-thread bodies in kernels/mixup.cuh), with the launch
// arithmetic of csrc/cuda/mixup.cu copied, against a double reference. Build and run:
// tests/cuda_emulation/run.sh. Keep the grid arithmetic here in step with csrc/cuda/mixup.cu.
#include <cmath>
#include <cstdio>
#include <random>
#include <tuple>
#include <vector>

#include "emul_common.h"
#include "mixup.cuh"

using namespace augkd::cuda;
// Every thread of a (gx, gy) grid of `threads`-thread blocks, in turn.
template <typename F>
void for_each_thread(int64_t gx, int64_t gy, int threads, F f) {
  for (int64_t bx = 0; bx < gx; ++bx)
    for (int64_t by = 0; by < gy; ++by)
      for (int tx = 0; tx < threads; ++tx) f(ThreadPos{bx, by, gy, tx, threads});
}

template <typename A>
struct HostRowSum {
  std::vector<A>* ws;
  int64_t rows;
  void operator()(int64_t slot, int64_t row, A v) const { (*ws)[slot * rows + row] += v; }
};


// `want`: which gradients the backward is asked for (the schema's *_grad flags), bits z=1, mask=2,
// psi=4, s=8. An unwanted gradient gets a nullptr; its host buffer keeps a sentinel that is checked.
constexpr double kSentinel = 1234.5;

template <typename T>
void latent_case(int64_t B, int64_t L, bool bcast_mask, bool has_s, unsigned want, std::mt19937& rng,
                 const char* tag) {
  using A = acc_type<T>;
  std::normal_distribution<double> nd(0, 1);
  std::uniform_real_distribution<double> ud(0, 1);
  const int64_t mrows = bcast_mask ? 1 : B;
  std::vector<T> z(B * L), psi(B * L), go(B * L), mask(mrows * L), s(B);
  for (auto& x : z) x = from_double<T>(nd(rng));
  for (auto& x : psi) x = from_double<T>(nd(rng));
  for (auto& x : go) x = from_double<T>(nd(rng));
  for (auto& x : mask) x = from_double<T>(ud(rng) < 0.5 ? 0.0 : ud(rng));
  for (auto& x : s) x = from_double<T>(ud(rng));
  const double s_scalar = 0.3;
  const bool bcast = mrows == 1 && B != 1;
  constexpr int V = kVec<T>;
  const bool vec = L % V == 0;
  const int VV = vec ? V : 1;

  // forward
  std::vector<T> out(B * L);
  LatentParams<T> p{};
  p.z = z.data();
  p.mask = mask.data();
  p.psi = psi.data();
  p.s = has_s ? s.data() : nullptr;
  p.mix = out.data();
  p.rows = B;
  p.cols = L;
  p.mask_bcast = bcast;
  p.s_scalar = static_cast<A>(s_scalar);
  {
    const int64_t gx = ceil_div(L, static_cast<int64_t>(kMixThreads) * VV), gy = std::min<int64_t>(B, 65535);
    for_each_thread(gx, gy, kMixThreads, [&](const ThreadPos& t) {
      if (vec) latent_mixup_fwd_thread<T, V>(p, t);
      else latent_mixup_fwd_thread<T, 1>(p, t);
    });
  }
  // backward (launch arithmetic of latent_mixup_bwd_cuda)
  const int64_t n_tiles = ceil_div(L, static_cast<int64_t>(kMixThreads) * VV);
  int64_t n_chunks = std::min(ceil_div(B, 8), int64_t{1024});
  const int64_t rows_per_chunk = ceil_div(B, n_chunks);
  n_chunks = ceil_div(B, rows_per_chunk);
  const int64_t slots = n_tiles * (kMixThreads / kWarp);
  const bool w_z = want & 1u, w_m = want & 2u, w_p = want & 4u, w_s = (want & 8u) && has_s;
  std::vector<A> ws_mask(bcast && w_m ? n_chunks * L : 0), ws_s(w_s ? slots * B : 0, A(0));
  const T sentinel = from_double<T>(kSentinel);
  std::vector<T> gz(B * L, sentinel), gp(B * L, sentinel), gm(mrows * L, sentinel), gs(B, sentinel);
  LatentParams<T> q = p;
  q.grad_out = go.data();
  q.grad_z = w_z ? gz.data() : nullptr;
  q.grad_psi = w_p ? gp.data() : nullptr;
  q.grad_mask = w_m && !bcast ? gm.data() : nullptr;
  q.ws_mask = w_m && bcast ? ws_mask.data() : nullptr;
  q.ws_s = w_s ? ws_s.data() : nullptr;
  q.rows_per_chunk = rows_per_chunk;
  HostRowSum<A> rs{&ws_s, B};
  for_each_thread(n_tiles, n_chunks, kMixThreads, [&](const ThreadPos& t) {
    if (vec) latent_mixup_bwd_thread<T, V>(q, t, rs);
    else latent_mixup_bwd_thread<T, 1>(q, t, rs);
  });
  if (bcast && w_m)
    for (int64_t i = 0; i < L; ++i) sum_partials_at<T>(ws_mask.data(), n_chunks, L, A(1), gm.data(), i);
  if (w_s)
    for (int64_t i = 0; i < B; ++i) sum_partials_at<T>(ws_s.data(), slots, B, A(-1), gs.data(), i);

  const double tol = sizeof(T) == 2 ? (std::is_same_v<T, c10::BFloat16> ? 1e-2 : 2e-3) : (sizeof(T) == 8 ? 1e-12 : 1e-5);
  char what[200];
  std::vector<double> gm_ref(mrows * L, 0.0), gs_ref(B, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L; ++j) {
      const double sv = has_s ? to_double(s[b]) : s_scalar;
      const int64_t mi = (mrows == 1 ? 0 : b) * L + j;
      const double zz = to_double(z[b * L + j]), m = to_double(mask[mi]), ps = to_double(psi[b * L + j]),
                   g = to_double(go[b * L + j]);
      const double o = zz + (1 - sv) * m * (ps - zz);
      std::snprintf(what, sizeof what, "%s latent out [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(out[b * L + j]), o, tol);
      const double k = (1 - sv) * m;
      std::snprintf(what, sizeof what, "%s latent grad_z [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(gz[b * L + j]), w_z ? g * (1 - k) : kSentinel, tol);
      std::snprintf(what, sizeof what, "%s latent grad_psi [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(gp[b * L + j]), w_p ? g * k : kSentinel, tol);
      gm_ref[mi] += g * (1 - sv) * (ps - zz);
      gs_ref[b] -= g * m * (ps - zz);
    }
  for (size_t i = 0; i < gm_ref.size(); ++i) {
    std::snprintf(what, sizeof what, "%s latent grad_mask [%ld]", tag, (long)i);
    check(what, to_double(gm[i]), w_m ? gm_ref[i] : kSentinel, tol * 10);
  }
  for (int64_t b = 0; b < B; ++b) {
    std::snprintf(what, sizeof what, "%s latent grad_s [%ld]", tag, (long)b);
    check(what, to_double(gs[b]), w_s ? gs_ref[b] : kSentinel, tol * 10);
  }
}

template <typename T>
void pixel_case(int64_t B, int64_t C, int64_t H, int64_t W, bool has_s, bool norm, unsigned want, std::mt19937& rng,
                const char* tag) {
  // want bits: generated=1, real=2, s=4
  using A = acc_type<T>;
  std::normal_distribution<double> nd(0, 1);
  std::uniform_real_distribution<double> ud(0, 1);
  const int64_t n = C * H * W, hw = H * W;
  std::vector<T> g(B * n), r(B * n), go(B * n), s(B);
  std::vector<float> mean(C), sd(C);
  for (auto& x : g) x = from_double<T>(nd(rng));
  for (auto& x : r) x = from_double<T>(nd(rng));
  for (auto& x : go) x = from_double<T>(nd(rng));
  for (auto& x : s) x = from_double<T>(ud(rng));
  for (auto& x : mean) x = static_cast<float>(nd(rng));
  for (auto& x : sd) x = static_cast<float>(0.5 + ud(rng));
  const double s_scalar = 0.6;
  constexpr int V = kVec<T>;
  const bool vec = hw % V == 0;
  PixelParams<T> p{};
  p.gen = g.data();
  p.real = r.data();
  p.s = has_s ? s.data() : nullptr;
  p.mean = norm ? mean.data() : nullptr;
  p.std = norm ? sd.data() : nullptr;
  p.rows = B;
  p.n = n;
  p.hw = hw;
  p.tile = static_cast<int64_t>(kPixelThreads) * (vec ? V : 1) * 4;
  p.s_scalar = static_cast<A>(s_scalar);
  const bool w_g = want & 1u, w_r = want & 2u, w_s = (want & 4u) && has_s;
  const T sentinel = from_double<T>(kSentinel);
  std::vector<T> out(B * n), gg(B * n, sentinel), gr(B * n, sentinel), gs(B, sentinel);
  p.mix = out.data();
  const int64_t n_tiles = ceil_div(n, p.tile), gy = std::min<int64_t>(B, 65535);
  for_each_thread(n_tiles, gy, kPixelThreads, [&](const ThreadPos& t) {
    if (vec) pixel_mixup_fwd_thread<T, V>(p, t);
    else pixel_mixup_fwd_thread<T, 1>(p, t);
  });
  const int64_t slots = n_tiles * (kPixelThreads / kWarp);
  std::vector<A> ws(w_s ? slots * B : 0, A(0));
  PixelParams<T> q = p;
  q.grad_out = go.data();
  q.grad_gen = w_g ? gg.data() : nullptr;
  q.grad_real = w_r ? gr.data() : nullptr;
  q.ws_s = w_s ? ws.data() : nullptr;
  HostRowSum<A> rs{&ws, B};
  for_each_thread(n_tiles, gy, kPixelThreads, [&](const ThreadPos& t) {
    if (vec) pixel_mixup_bwd_thread<T, V>(q, t, rs);
    else pixel_mixup_bwd_thread<T, 1>(q, t, rs);
  });
  if (w_s)
    for (int64_t i = 0; i < B; ++i) sum_partials_at<T>(ws.data(), slots, B, A(1), gs.data(), i);

  const double tol = sizeof(T) == 2 ? (std::is_same_v<T, c10::BFloat16> ? 1e-2 : 2e-3) : (sizeof(T) == 8 ? 1e-12 : 1e-5);
  char what[200];
  for (int64_t b = 0; b < B; ++b) {
    const double sv = has_s ? to_double(s[b]) : s_scalar;
    double gs_ref = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ch = j / hw;
      const double mu = norm ? mean[ch] : 0.0, st = norm ? sd[ch] : 1.0;
      const double gv = to_double(g[b * n + j]), rv = to_double(r[b * n + j]), gov = to_double(go[b * n + j]);
      std::snprintf(what, sizeof what, "%s pixel out [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(out[b * n + j]), (gv + sv * (rv - gv) - mu) / st, tol);
      std::snprintf(what, sizeof what, "%s pixel grad_gen [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(gg[b * n + j]), w_g ? gov * (1 - sv) / st : kSentinel, tol);
      std::snprintf(what, sizeof what, "%s pixel grad_real [%ld,%ld]", tag, (long)b, (long)j);
      check(what, to_double(gr[b * n + j]), w_r ? gov * sv / st : kSentinel, tol);
      gs_ref += gov * (rv - gv) / st;
    }
    std::snprintf(what, sizeof what, "%s pixel grad_s [%ld]", tag, (long)b);
    check(what, to_double(gs[b]), w_s ? gs_ref : kSentinel, sizeof(T) == 4 ? 1e-4 : tol * 10);
  }
}

template <typename T>
void run_all(std::mt19937& rng, const char* dt) {
  char tag[128];
  for (int64_t B : {1, 3, 40}) {
    for (int64_t L : {1, 5, 8, 64, 100, 512, 1030, 2048}) {
      for (int bc = 0; bc < 2; ++bc)
        for (int hs = 0; hs < 2; ++hs) {
          // every gradient, plus every proper subset of the flags at a few widths
          for (unsigned want = 1; want < 16; ++want) {
            if (want != 15 && L != 5 && L != 100) continue;
            std::snprintf(tag, sizeof tag, "[%s B=%ld L=%ld bcast=%d s=%d want=%u]", dt, (long)B, (long)L, bc, hs,
                          want);
            latent_case<T>(B, L, bc, hs, want, rng, tag);
          }
        }
    }
    for (auto [C, H, W] : {std::tuple<int64_t, int64_t, int64_t>{3, 8, 8}, {3, 7, 5}, {1, 1, 1}, {3, 32, 33}, {2, 64, 64}}) {
      for (int hs = 0; hs < 2; ++hs)
        for (int nm = 0; nm < 2; ++nm)
          for (unsigned want = 1; want < 8; ++want) {
            if (want != 7 && H != 7) continue;
            std::snprintf(tag, sizeof tag, "[%s B=%ld C=%ld H=%ld W=%ld s=%d norm=%d want=%u]", dt, (long)B, (long)C,
                          (long)H, (long)W, hs, nm, want);
            pixel_case<T>(B, C, H, W, hs, nm, want, rng, tag);
          }
    }
  }
}

AUGKD_EMULATION_MAIN(7)
