// N:M sparse linear (fp32): y = x @ W^T + bias with W in the row-tile layout of
// nmkern_cpu.h (8 rows interleaved per slot, ceil(log2 m)-bit in-group indices).
//
// Two kernels:
// * small batch (1..~8): x stays (B, K). For each group of m inputs one unaligned
//   load brings x[m*g .. m*g+8) into a register; per kept slot, one 32-bit load
//   holds the 8 rows' indices, vpsrlvd/vpand unpack them and vpermps picks the 8
//   matching x values, so 8 kept weights cost ~5 uops and no gather. This path is
//   bound by reading the packed weight (fp32 values + bits/32 of that in indices).
// * large batch: x is transposed into (K, 48)-panels; each kept w[o, k] is
//   broadcast and FMAs the contiguous x[k, 0:48) (6 vectors) into a 2-row x
//   6-vector register tile. K is blocked (64 inputs = 12 KiB of panel) so the
//   panel rows the 8 rows of a tile touch stay in L1.
#include <algorithm>

#include "common.h"
#include "nmkern_cpu.h"

// Software prefetch distance (bytes) on the small-batch kernel's value stream.
// Measured at 4096x4096 2:4 batch 1, 2 threads, interleaved with dense F.linear:
// ratio 0.79 / 0.81 without, 0.64 / 0.62 with 512 B (shared machine, two runs each).
#ifndef NMKERN_PREFETCH
#define NMKERN_PREFETCH 512
#endif

namespace nmkern {
namespace {

struct NMArgs {
  const float* x;
  int64_t batch, k;
  const float* values;
  const uint8_t* index_bytes;
  int64_t out_features;
  int n, m, bits;
  const float* bias;
  float* y;
  int nthreads;
  int64_t tiles() const { return ceil_div(out_features, 8); }
  int64_t slots() const { return k / m * n; }
  int64_t groups() const { return k / m; }
};

// Writes 8 rows (tile t) of output column c from acc[8], skipping padded rows.
inline void store_tile_column(const NMArgs& a, int64_t t, int64_t c, const float* acc) {
  const int64_t r0 = t * 8;
  const int64_t rows = std::min<int64_t>(8, a.out_features - r0);
  float* yc = a.y + c * a.out_features + r0;
  for (int64_t l = 0; l < rows; ++l) yc[l] = acc[l] + (a.bias ? a.bias[r0 + l] : 0.0f);
}

// ---------------------------------------------------------------- portable path
[[maybe_unused]] void nm_linear_generic(const NMArgs& a) {
  const int64_t J = a.slots();
  const uint32_t mask = (1u << a.bits) - 1u;
  parallel_for(a.tiles(), std::max<int64_t>(1, a.tiles() / (16 * a.nthreads)), a.nthreads,
               [&](int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* vt = a.values + t * J * 8;
    const uint8_t* it = a.index_bytes + t * J * a.bits;
    for (int64_t c = 0; c < a.batch; ++c) {
      const float* xc = a.x + c * a.k;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = 0; j < J; ++j) {
        const uint32_t word = load_u32(it + j * a.bits);
        const float* xg = xc + (j / a.n) * a.m;
        for (int l = 0; l < 8; ++l) acc[l] += vt[j * 8 + l] * xg[(word >> (l * a.bits)) & mask];
      }
      store_tile_column(a, t, c, acc);
    }
  }
  });
}

#ifdef NMKERN_HAVE_AVX2
// ------------------------------------------------------------ small-batch AVX2
// NT: n at compile time (0 = runtime a.n). NC: batch columns per pass (1..4).
// BIG: m > 8, so a group spans two registers and bit 3 of the index picks one.
// SMALLM: m <= 4: the group's x values are broadcast to both 128-bit lanes and
// the in-lane vpermilps (1 uop, 1-cycle latency on Zen 3) selects with index bits
// [1:0], so no masking is needed; larger m uses the cross-lane vpermps.
// ACC independent accumulator chains per column hide the 4-cycle FMA latency.
template <int NT, int NC, bool BIG, bool SMALLM = false>
void nm_small_tile(const NMArgs& a, const float* xp, int64_t xstride, int64_t t, int64_t c0) {
  constexpr int ACC = NT == 0 ? 1 : (NC == 1 ? 4 : (NC == 2 ? 2 : 1));
  constexpr int UG = NT == 0 ? 1 : std::max(1, ACC / NT);  // groups per unrolled step
  const int n = NT > 0 ? NT : a.n;
  const int m = a.m, bits = a.bits;
  const int64_t J = a.slots(), G = a.groups();
  const float* vt = a.values + t * J * 8;
  const uint8_t* it = a.index_bytes + t * J * bits;
  const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  __m256 acc[ACC][NC];
  for (int q = 0; q < ACC; ++q)
    for (int c = 0; c < NC; ++c) acc[q][c] = _mm256_setzero_ps();

  auto group = [&](int64_t g, int u) __attribute__((always_inline)) {
    const float* xg = xp + g * m;
#if NMKERN_PREFETCH > 0
    {
      const char* pv = reinterpret_cast<const char*>(vt + g * n * 8) + NMKERN_PREFETCH;
      for (int p = 0; p < n * 32; p += 64) _mm_prefetch(pv + p, _MM_HINT_T0);
    }
#endif
    __m256 xl[NC], xh[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      if (SMALLM) {
        // m = 2 repeats the pair 4 times: bit 1 of the index (the next lane's bit)
        // then picks the same pair again, so it needs no mask either.
        xl[c] = m == 2 ? _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(xg + c * xstride)))
                       : _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xg + c * xstride));
      } else {
        xl[c] = _mm256_loadu_ps(xg + c * xstride);
        if (BIG) xh[c] = _mm256_loadu_ps(xg + c * xstride + 8);
      }
    }
#pragma GCC unroll 8
    for (int s = 0; s < (NT > 0 ? NT : n); ++s) {
      const int64_t j = g * n + s;
      const __m256i word = _mm256_set1_epi32(static_cast<int>(load_u32(it + j * bits)));
      const __m256i iv = SMALLM ? _mm256_srlv_epi32(word, shifts) : _mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask);
      const __m256 w = _mm256_loadu_ps(vt + j * 8);
      const int q = NT > 0 ? (u * NT + s) % ACC : 0;
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
        __m256 xs = SMALLM ? _mm256_permutevar_ps(xl[c], iv) : _mm256_permutevar8x32_ps(xl[c], iv);
        if (BIG) {
          const __m256 hi = _mm256_permutevar8x32_ps(xh[c], iv);
          xs = _mm256_blendv_ps(xs, hi, _mm256_castsi256_ps(_mm256_slli_epi32(iv, 28)));
        }
        acc[q][c] = _mm256_fmadd_ps(w, xs, acc[q][c]);
      }
    }
  };

  int64_t g = 0;
  for (; g + UG <= G; g += UG) {
#pragma GCC unroll 8
    for (int u = 0; u < UG; ++u) group(g + u, u);
  }
  for (; g < G; ++g) group(g, 0);

  for (int c = 0; c < NC; ++c) {
    __m256 s = acc[0][c];
    for (int q = 1; q < ACC; ++q) s = _mm256_add_ps(s, acc[q][c]);
    alignas(32) float out[8];
    _mm256_store_ps(out, s);
    store_tile_column(a, t, c0 + c, out);
  }
}

template <int NT, bool BIG, bool SMALLM>
void nm_small_tile_columns(const NMArgs& a, const float* xp, int64_t xstride, int64_t t) {
  int64_t c = 0;
  for (; c + 4 <= a.batch; c += 4) nm_small_tile<NT, 4, BIG, SMALLM>(a, xp + c * xstride, xstride, t, c);
  switch (a.batch - c) {
    case 3: nm_small_tile<NT, 3, BIG, SMALLM>(a, xp + c * xstride, xstride, t, c); break;
    case 2: nm_small_tile<NT, 2, BIG, SMALLM>(a, xp + c * xstride, xstride, t, c); break;
    case 1: nm_small_tile<NT, 1, BIG, SMALLM>(a, xp + c * xstride, xstride, t, c); break;
    default: break;
  }
}

template <int NT>
int nm_small_dispatch(const NMArgs& a) {
  // Padded copy of x: the 8-wide loads of the last group (16-wide for m > 8) may
  // run up to 16 floats past K.
  const int64_t xstride = round_up(a.k + 16, 16);
  FloatBuf xp(a.batch * xstride);
  if (!xp.p) return NMKERN_ENOMEM;
  for (int64_t c = 0; c < a.batch; ++c) std::memcpy(xp.p + c * xstride, a.x + c * a.k, a.k * sizeof(float));
  const bool big = a.m > 8;
  // Dynamic chunks of tiles: on a shared machine a descheduled thread then holds
  // back one chunk, not half of the rows.
  const int64_t chunk = std::max<int64_t>(1, a.tiles() / (16 * a.nthreads));
  parallel_for(a.tiles(), chunk, a.nthreads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (big)
        nm_small_tile_columns<NT, true, false>(a, xp.p, xstride, t);
      else if (a.m <= 4)
        nm_small_tile_columns<NT, false, true>(a, xp.p, xstride, t);
      else
        nm_small_tile_columns<NT, false, false>(a, xp.p, xstride, t);
    }
  });
  return NMKERN_OK;
}

// ------------------------------------------------------------ large-batch AVX2
// Panel width of the N:M large-batch kernel: 48 batch columns = 6 vectors, so a
// 2-row x 6-vector register tile (12 accumulators) amortizes one index decode
// and one broadcast over 6 FMAs; batch tails use 4 rows x <= 3 vectors.
constexpr int kPanelNM = 48;

// R rows (lanes lane0 .. lane0+R-1) of one tile, groups [g0, g1), V vectors of
// batch. NT: n at compile time (0 = runtime n_rt).
template <int V, int NT, int R>
inline void nm_large_rows(const float* __restrict panel, const float* __restrict vt, const uint8_t* __restrict it,
                          int64_t g0, int64_t g1, int n_rt, int m, int bits, int lane0, float* __restrict acc_io) {
  const int n = NT > 0 ? NT : n_rt;
  constexpr int W = 8 * V;
  __m256 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_load_ps(acc_io + r * W + 8 * v);
  const uint32_t mask = (1u << bits) - 1u;
  const int lshift = lane0 * bits;
  for (int64_t g = g0; g < g1; ++g) {
    const float* xg = panel + g * m * W;
#pragma GCC unroll 8
    for (int s = 0; s < (NT > 0 ? NT : n); ++s) {
      const int64_t j = g * n + s;
      const uint32_t word = load_u32(it + j * bits) >> lshift;
      const float* wj = vt + j * 8 + lane0;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float* xr = xg + ((word >> (r * bits)) & mask) * W;
        const __m256 wb = _mm256_broadcast_ss(wj + r);
#pragma GCC unroll 6
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(wb, _mm256_load_ps(xr + 8 * v), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm256_store_ps(acc_io + r * W + 8 * v, acc[r][v]);
}

template <int V>
inline void nm_large_tile(const float* panel, const float* vt, const uint8_t* it, int64_t g0, int64_t g1, int n,
                          int m, int bits, float* acc_io) {
  constexpr int R = V >= 4 ? 2 : 4;
  for (int lane0 = 0; lane0 < 8; lane0 += R) {
    float* out = acc_io + lane0 * 8 * V;
    switch (n) {
      case 1: nm_large_rows<V, 1, R>(panel, vt, it, g0, g1, n, m, bits, lane0, out); break;
      case 2: nm_large_rows<V, 2, R>(panel, vt, it, g0, g1, n, m, bits, lane0, out); break;
      case 4: nm_large_rows<V, 4, R>(panel, vt, it, g0, g1, n, m, bits, lane0, out); break;
      default: nm_large_rows<V, 0, R>(panel, vt, it, g0, g1, n, m, bits, lane0, out); break;
    }
  }
}

using NMLargeTileFn = void (*)(const float*, const float*, const uint8_t*, int64_t, int64_t, int, int, int, float*);
constexpr NMLargeTileFn kNMLargeTile[7] = {nullptr,          nm_large_tile<1>, nm_large_tile<2>, nm_large_tile<3>,
                                           nm_large_tile<4>, nm_large_tile<5>, nm_large_tile<6>};

int nm_large(const NMArgs& a) {
  const int64_t panels = ceil_div(a.batch, kPanelNM);
  FloatBuf xt(panels * a.k * kPanelNM);
  if (!xt.p) return NMKERN_ENOMEM;
  transpose_to_panels(a.x, a.batch, a.k, xt.p, a.nthreads, kPanelNM);

  const int64_t J = a.slots(), G = a.groups(), tiles = a.tiles();
  // Tiles per work chunk: ~128 KiB of packed weight, re-read from L2 for every panel.
  const int64_t tile_bytes = J * (8 * 4 + a.bits);
  int64_t chunk = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(tile_bytes, 1));
  chunk = std::min(chunk, std::max<int64_t>(1, ceil_div(tiles, 4 * a.nthreads)));
  const int64_t chunks = ceil_div(tiles, chunk);
  // K block: 64 inputs x 48 columns x 4 B = 12 KiB of panel stays in L1 while the
  // chunk's tiles run over it.
  const int64_t gblock = std::max(1, 64 / a.m);
  std::atomic<int> err{NMKERN_OK};

  parallel_for(chunks, 1, a.nthreads, [&](int64_t ch_begin, int64_t ch_end) {
    FloatBuf acc(chunk * 8 * kPanelNM);
    if (!acc.p) {
      err.store(NMKERN_ENOMEM);
      return;
    }
    for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
      const int64_t t0 = ch * chunk, t1 = std::min(tiles, t0 + chunk);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t b0 = p * kPanelNM;
        const int64_t width = std::min<int64_t>(kPanelNM, a.batch - b0);
        const int V = static_cast<int>(round_up(width, 8) / 8);
        const int64_t W = 8 * V;
        const float* panel = xt.p + p * a.k * kPanelNM;
        const NMLargeTileFn fn = kNMLargeTile[V];
        std::memset(acc.p, 0, (t1 - t0) * 8 * W * sizeof(float));
        for (int64_t g0 = 0; g0 < G; g0 += gblock) {
          const int64_t g1 = std::min(G, g0 + gblock);
          for (int64_t t = t0; t < t1; ++t)
            fn(panel, a.values + t * J * 8, a.index_bytes + t * J * a.bits, g0, g1, a.n, a.m, a.bits,
               acc.p + (t - t0) * 8 * W);
        }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t rows = std::min<int64_t>(8, a.out_features - t * 8);
          for (int64_t l = 0; l < rows; ++l) {
            const int64_t row = t * 8 + l;
            const float b = a.bias ? a.bias[row] : 0.0f;
            const float* src = acc.p + ((t - t0) * 8 + l) * W;
            for (int64_t c = 0; c < width; ++c) a.y[(b0 + c) * a.out_features + row] = src[c] + b;
          }
        }
      }
    }
  });
  return err.load();
}
#endif  // NMKERN_HAVE_AVX2

}  // namespace
}  // namespace nmkern

extern "C" int nmkern_nm_linear_f32(const float* x, int64_t batch, int64_t k, const float* values,
                                    const uint8_t* index_bytes, int64_t out_features, int n, int m,
                                    const float* bias, float* y, int nthreads, int algo) {
  using namespace nmkern;
  if (!x || !values || !index_bytes || !y || batch < 1 || k < 1 || out_features < 1) return NMKERN_EBADARG;
  if (m < 2 || m > 16 || n < 1 || n >= m || k % m != 0) return NMKERN_EBADARG;
  if (algo < NMKERN_ALGO_AUTO || algo > NMKERN_ALGO_LARGE_BATCH) return NMKERN_EBADARG;
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  NMArgs a{x, batch, k, values, index_bytes, out_features, n, m, bits, bias, y, resolve_threads(nthreads)};
#ifdef NMKERN_HAVE_AVX2
  if (algo == NMKERN_ALGO_AUTO) algo = batch <= 8 ? NMKERN_ALGO_SMALL_BATCH : NMKERN_ALGO_LARGE_BATCH;
  if (algo == NMKERN_ALGO_LARGE_BATCH) return nm_large(a);
  switch (n) {
    case 1: return nm_small_dispatch<1>(a);
    case 2: return nm_small_dispatch<2>(a);
    case 4: return nm_small_dispatch<4>(a);
    default: return nm_small_dispatch<0>(a);
  }
#else
  (void)algo;
  nm_linear_generic(a);
  return NMKERN_OK;
#endif
}
