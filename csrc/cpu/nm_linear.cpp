// N:M sparse linear (fp32): y = x @ W^T + bias with W in the row-tile layout of
// nmkern_cpu.h (8 rows interleaved per slot, ceil(log2 m)-bit in-group indices).
//
// Two kernels:
// * small batch (1..~8): x stays (B, K). For each group of m inputs one unaligned
//   load brings x[m*g .. m*g+8) into a register; per kept slot, one 32-bit load
//   holds the 8 rows' indices, vpsrlvd/vpand unpack them and vpermps picks the 8
//   matching x values, so 8 kept weights cost ~5 uops and no gather. This path is
//   bound by reading the packed weight (fp32 values + bits/32 of that in indices).
// * large batch: x is transposed into (K, 24)-panels; each kept w[o, k] is
//   broadcast and FMAs the contiguous x[k, 0:24) (3 vectors) into a 4-row x
//   3-vector register tile. K is blocked (128 inputs = 12 KiB of panel) so the
//   panel rows the 8 rows of a tile touch stay in L1.
#include <algorithm>

#include "common.h"
#include "nmkern_cpu.h"

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
#pragma omp parallel for num_threads(a.nthreads) schedule(static)
  for (int64_t t = 0; t < a.tiles(); ++t) {
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
}

#ifdef NMKERN_HAVE_AVX2
// ------------------------------------------------------------ small-batch AVX2
// NT: n at compile time (0 = runtime a.n). NC: batch columns per pass (1..4).
// BIG: m > 8, so a group spans two registers and bit 3 of the index picks one.
// ACC independent accumulator chains per column hide the 4-cycle FMA latency.
template <int NT, int NC, bool BIG>
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
    __m256 xl[NC], xh[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      xl[c] = _mm256_loadu_ps(xg + c * xstride);
      if (BIG) xh[c] = _mm256_loadu_ps(xg + c * xstride + 8);
    }
#pragma GCC unroll 8
    for (int s = 0; s < (NT > 0 ? NT : n); ++s) {
      const int64_t j = g * n + s;
      const __m256i word = _mm256_set1_epi32(static_cast<int>(load_u32(it + j * bits)));
      const __m256i iv = _mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask);
      const __m256 w = _mm256_loadu_ps(vt + j * 8);
      const int q = NT > 0 ? (u * NT + s) % ACC : 0;
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
        __m256 xs = _mm256_permutevar8x32_ps(xl[c], iv);
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

template <int NT, bool BIG>
void nm_small_tile_columns(const NMArgs& a, const float* xp, int64_t xstride, int64_t t) {
  int64_t c = 0;
  for (; c + 4 <= a.batch; c += 4) nm_small_tile<NT, 4, BIG>(a, xp + c * xstride, xstride, t, c);
  switch (a.batch - c) {
    case 3: nm_small_tile<NT, 3, BIG>(a, xp + c * xstride, xstride, t, c); break;
    case 2: nm_small_tile<NT, 2, BIG>(a, xp + c * xstride, xstride, t, c); break;
    case 1: nm_small_tile<NT, 1, BIG>(a, xp + c * xstride, xstride, t, c); break;
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
#pragma omp parallel for num_threads(a.nthreads) schedule(static)
  for (int64_t t = 0; t < a.tiles(); ++t) {
    if (big)
      nm_small_tile_columns<NT, true>(a, xp.p, xstride, t);
    else
      nm_small_tile_columns<NT, false>(a, xp.p, xstride, t);
  }
  return NMKERN_OK;
}

// ------------------------------------------------------------ large-batch AVX2
// Rows 4*half .. 4*half+3 of one tile, groups [g0, g1), V vectors of batch.
template <int V>
inline void nm_large_rows(const float* panel, const float* vt, const uint8_t* it, int64_t g0, int64_t g1, int n,
                          int m, int bits, int half, float* acc_io) {
  constexpr int W = 8 * V;
  __m256 acc[4][V];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_load_ps(acc_io + r * W + 8 * v);
  const uint32_t mask = (1u << bits) - 1u;
  const int hshift = half * 4 * bits;
  for (int64_t g = g0; g < g1; ++g) {
    const float* xg = panel + g * m * W;
    for (int s = 0; s < n; ++s) {
      const int64_t j = g * n + s;
      const uint32_t word = load_u32(it + j * bits) >> hshift;
      const float* wj = vt + j * 8 + half * 4;
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const float* xr = xg + ((word >> (r * bits)) & mask) * W;
        const __m256 wb = _mm256_broadcast_ss(wj + r);
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(wb, _mm256_load_ps(xr + 8 * v), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v) _mm256_store_ps(acc_io + r * W + 8 * v, acc[r][v]);
}

int nm_large(const NMArgs& a) {
  const int64_t panels = ceil_div(a.batch, kPanel);
  FloatBuf xt(panels * a.k * kPanel);
  if (!xt.p) return NMKERN_ENOMEM;
  transpose_to_panels(a.x, a.batch, a.k, xt.p, a.nthreads);

  const int64_t J = a.slots(), G = a.groups(), tiles = a.tiles();
  // Tiles per work chunk: ~128 KiB of packed weight, re-read from L2 for every panel.
  const int64_t tile_bytes = J * (8 * 4 + a.bits);
  int64_t chunk = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(tile_bytes, 1));
  chunk = std::min(chunk, std::max<int64_t>(1, ceil_div(tiles, 4 * a.nthreads)));
  const int64_t chunks = ceil_div(tiles, chunk);
  const int64_t gblock = std::max(1, 128 / a.m);  // 128 inputs x 24 columns x 4 B = 12 KiB of panel
  int err = NMKERN_OK;

#pragma omp parallel num_threads(a.nthreads)
  {
    FloatBuf acc(chunk * 8 * kPanel);
    if (!acc.p) {
#pragma omp atomic write
      err = NMKERN_ENOMEM;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      if (!acc.p) continue;
      const int64_t t0 = ch * chunk, t1 = std::min(tiles, t0 + chunk);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t b0 = p * kPanel;
        const int64_t width = std::min<int64_t>(kPanel, a.batch - b0);
        const int V = static_cast<int>(round_up(width, 8) / 8);
        const int64_t W = 8 * V;
        const float* panel = xt.p + p * a.k * kPanel;
        std::memset(acc.p, 0, (t1 - t0) * 8 * W * sizeof(float));
        for (int64_t g0 = 0; g0 < G; g0 += gblock) {
          const int64_t g1 = std::min(G, g0 + gblock);
          for (int64_t t = t0; t < t1; ++t) {
            const float* vt = a.values + t * J * 8;
            const uint8_t* it = a.index_bytes + t * J * a.bits;
            for (int half = 0; half < 2; ++half) {
              float* out = acc.p + ((t - t0) * 8 + half * 4) * W;
              if (V == 3)
                nm_large_rows<3>(panel, vt, it, g0, g1, a.n, a.m, a.bits, half, out);
              else if (V == 2)
                nm_large_rows<2>(panel, vt, it, g0, g1, a.n, a.m, a.bits, half, out);
              else
                nm_large_rows<1>(panel, vt, it, g0, g1, a.n, a.m, a.bits, half, out);
            }
          }
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
  }
  return err;
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
