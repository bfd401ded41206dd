// 1xN block-sparse linear (fp32, bf16, fp16): y = x @ W^T + bias, W stored as BSR
// with (N, 1) blocks (N consecutive output rows share one input column). Templated
// on the element type E (elem.h), fp32 accumulation: half x is widened once per
// call, half weights as they are loaded (small batch) or per work chunk into an
// fp32 scratch that every panel then reuses (large batch).
//
// * small batch: per block, the N weights are one vector and x[b, col] one
//   broadcast: an N-wide FMA per block (N = 4: 128-bit, N = 8: 256-bit), four
//   independent accumulators to hide the FMA latency.
// * large batch: x is transposed into (K, 24)-panels; a block is an N x 24
//   outer product: the 3 panel vectors of row `col` are loaded once and shared by
//   up to 4 rows of the block (a 4 x 3 register tile).
#include <algorithm>
#include <atomic>

#include "common.h"
#include "nmkern_cpu.h"

// Software prefetch distance (bytes) on the 1x4 small-batch value stream.
#ifndef NMKERN_BSR_PREFETCH
#define NMKERN_BSR_PREFETCH 512
#endif

namespace nmkern {
namespace {

template <class E, typename CT>
struct BSRArgs {
  using T = typename E::T;
  const T* x;
  int64_t batch, k;
  const T* values;
  const int32_t* rowptr;
  const CT* col;
  int64_t out_features;
  int block;
  const T* bias;
  T* y;
  int nthreads;
  const float* xf = nullptr;  // x as fp32 (B, K), set by bsr_run for the small-batch kernels
  int64_t block_rows() const { return out_features / block; }
};

template <class E, typename CT>
inline void store_rows(const BSRArgs<E, CT>& a, int64_t c, int64_t row0, const float* acc, int rows) {
  typename E::T* yc = a.y + c * a.out_features + row0;
  for (int r = 0; r < rows; ++r) yc[r] = E::from_f32(acc[r] + (a.bias ? E::to_f32(a.bias[row0 + r]) : 0.0f));
}

// ---------------------------------------------------------------- portable path
// Any block size; accumulates in chunks of 16 rows of the block.
template <class E, typename CT>
void bsr_small_generic_row(const BSRArgs<E, CT>& a, int64_t br) {
  const int N = a.block;
  const int64_t b0 = a.rowptr[br], b1 = a.rowptr[br + 1];
  for (int64_t c = 0; c < a.batch; ++c) {
    const float* xc = a.xf + c * a.k;
    for (int r0 = 0; r0 < N; r0 += 16) {
      const int rows = std::min(16, N - r0);
      float acc[16] = {0};
      for (int64_t b = b0; b < b1; ++b) {
        const float xv = xc[a.col[b]];
        const typename E::T* w = a.values + b * N + r0;
        for (int r = 0; r < rows; ++r) acc[r] += E::to_f32(w[r]) * xv;
      }
      store_rows(a, c, br * N + r0, acc, rows);
    }
  }
}

#ifdef NMKERN_HAVE_AVX2
// ------------------------------------------------------------ small-batch AVX2
template <class E, typename CT>
void bsr_small_row_n4(const BSRArgs<E, CT>& a, int64_t br) {
  const int64_t b0 = a.rowptr[br], b1 = a.rowptr[br + 1];
  const typename E::T* vals = a.values;
  const CT* col = a.col;
  for (int64_t c = 0; c < a.batch; ++c) {
    const float* xc = a.xf + c * a.k;
    __m128 s0 = _mm_setzero_ps(), s1 = _mm_setzero_ps(), s2 = _mm_setzero_ps(), s3 = _mm_setzero_ps();
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4) {
#if NMKERN_BSR_PREFETCH > 0
      // 4 blocks = one 64-byte line of fp32 values (half a line of half ones);
      // fetch NMKERN_BSR_PREFETCH bytes ahead.
      _mm_prefetch(reinterpret_cast<const char*>(vals + 4 * b) + NMKERN_BSR_PREFETCH, _MM_HINT_T0);
#endif
      s0 = _mm_fmadd_ps(E::load4(vals + 4 * b), _mm_broadcast_ss(xc + col[b]), s0);
      s1 = _mm_fmadd_ps(E::load4(vals + 4 * b + 4), _mm_broadcast_ss(xc + col[b + 1]), s1);
      s2 = _mm_fmadd_ps(E::load4(vals + 4 * b + 8), _mm_broadcast_ss(xc + col[b + 2]), s2);
      s3 = _mm_fmadd_ps(E::load4(vals + 4 * b + 12), _mm_broadcast_ss(xc + col[b + 3]), s3);
    }
    for (; b < b1; ++b) s0 = _mm_fmadd_ps(E::load4(vals + 4 * b), _mm_broadcast_ss(xc + col[b]), s0);
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3)));
    store_rows(a, c, br * 4, out, 4);
  }
}

// N a multiple of 8: 256-bit vectors, two blocks in flight.
template <class E, typename CT>
void bsr_small_row_n8k(const BSRArgs<E, CT>& a, int64_t br) {
  const int N = a.block;
  const int64_t b0 = a.rowptr[br], b1 = a.rowptr[br + 1];
  for (int64_t c = 0; c < a.batch; ++c) {
    const float* xc = a.xf + c * a.k;
    for (int r0 = 0; r0 < N; r0 += 8) {
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      int64_t b = b0;
      for (; b + 2 <= b1; b += 2) {
        s0 = _mm256_fmadd_ps(E::load8(a.values + b * N + r0), _mm256_broadcast_ss(xc + a.col[b]), s0);
        s1 = _mm256_fmadd_ps(E::load8(a.values + (b + 1) * N + r0), _mm256_broadcast_ss(xc + a.col[b + 1]),
                             s1);
      }
      if (b < b1)
        s0 = _mm256_fmadd_ps(E::load8(a.values + b * N + r0), _mm256_broadcast_ss(xc + a.col[b]), s0);
      alignas(32) float out[8];
      _mm256_store_ps(out, _mm256_add_ps(s0, s1));
      store_rows(a, c, br * N + r0, out, 8);
    }
  }
}

// ------------------------------------------------------------ large-batch AVX2
// RG rows (r0 .. r0+RG) of a block row, its `count` blocks at vals (fp32) / col,
// V vectors of batch.
template <int V, int RG, typename CT>
inline void bsr_large_rows(const float* panel, const float* vals, const CT* col, int64_t count, int N, int r0,
                           float* out) {
  constexpr int W = 8 * V;
  __m256 acc[RG][V];
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < count; ++b) {
    const float* xr = panel + static_cast<int64_t>(col[b]) * W;
    const float* w = vals + b * N + r0;
    __m256 xv[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) xv[v] = _mm256_load_ps(xr + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      const __m256 wb = _mm256_broadcast_ss(w + r);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(wb, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int v = 0; v < V; ++v) _mm256_store_ps(out + r * W + 8 * v, acc[r][v]);
}

template <int V, typename CT>
inline void bsr_large_rows_v(const float* panel, const float* vals, const CT* col, int64_t count, int N, int r0,
                             int rg, float* out) {
  switch (rg) {
    case 4: bsr_large_rows<V, 4>(panel, vals, col, count, N, r0, out); break;
    case 3: bsr_large_rows<V, 3>(panel, vals, col, count, N, r0, out); break;
    case 2: bsr_large_rows<V, 2>(panel, vals, col, count, N, r0, out); break;
    default: bsr_large_rows<V, 1>(panel, vals, col, count, N, r0, out); break;
  }
}

template <class E, typename CT>
int bsr_large(const BSRArgs<E, CT>& a) {
  const int64_t panels = ceil_div(a.batch, kPanel);
  FloatBuf xt(panels * a.k * kPanel);
  if (!xt.p) return NMKERN_ENOMEM;
  transpose_to_panels<E>(a.x, a.batch, a.k, xt.p, a.nthreads);
  const int N = a.block;
  const int64_t BR = a.block_rows();
  // Block rows per work chunk: ~128 KiB of packed weight, re-read from L2 per panel.
  const int64_t nnzb = a.rowptr[BR];
  const int64_t row_bytes = std::max<int64_t>(1, nnzb * (N * 4 + static_cast<int64_t>(sizeof(CT))) / BR);
  int64_t chunk = std::max<int64_t>(1, (128 << 10) / row_bytes);
  chunk = std::min(chunk, std::max<int64_t>(1, ceil_div(BR, 4 * a.nthreads)));
  const int64_t chunks = ceil_div(BR, chunk);
  int64_t most_blocks = 0;  // of any chunk: the size of the fp32 scratch for half values
  for (int64_t ch = 0; !E::kIsF32 && ch < chunks; ++ch)
    most_blocks = std::max<int64_t>(most_blocks, a.rowptr[std::min(BR, (ch + 1) * chunk)] - a.rowptr[ch * chunk]);
  std::atomic<int> err{NMKERN_OK};
  parallel_for(chunks, 1, a.nthreads, [&](int64_t ch_begin, int64_t ch_end) {
  FloatBuf wide(most_blocks * N);
  if (!wide.p) {
    err.store(NMKERN_ENOMEM);
    return;
  }
  for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
    alignas(32) float out[4 * kPanel];
    const int64_t br0 = ch * chunk, br1 = std::min(BR, br0 + chunk);
    const int64_t base = a.rowptr[br0];
    const float* vals;  // values of blocks [base, rowptr[br1]) as fp32
    if constexpr (E::kIsF32) {
      vals = a.values + base * N;
    } else {
      widen<E>(a.values + base * N, wide.p, (a.rowptr[br1] - base) * N);
      vals = wide.p;
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t c0 = p * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, a.batch - c0);
      const int V = static_cast<int>(round_up(width, 8) / 8);
      const int64_t W = 8 * V;
      const float* panel = xt.p + p * a.k * kPanel;
      for (int64_t br = br0; br < br1; ++br) {
        const int64_t b0 = a.rowptr[br], count = a.rowptr[br + 1] - b0;
        const float* bv0 = vals + (b0 - base) * N;
        for (int r0 = 0; r0 < N; r0 += 4) {
          const int rg = std::min(4, N - r0);
          if (V == 3)
            bsr_large_rows_v<3>(panel, bv0, a.col + b0, count, N, r0, rg, out);
          else if (V == 2)
            bsr_large_rows_v<2>(panel, bv0, a.col + b0, count, N, r0, rg, out);
          else
            bsr_large_rows_v<1>(panel, bv0, a.col + b0, count, N, r0, rg, out);
          // Column by column, as nm_large (nm_linear.cpp) and for the same reason: row by row, stores O floats
          // apart share L1 sets when O * 4 is a multiple of 4 KiB.
          for (int64_t c = 0; c < width; ++c) {
            float column[4];
            for (int r = 0; r < rg; ++r) column[r] = out[r * W + c];
            store_rows(a, c0 + c, br * N + r0, column, rg);
          }
        }
      }
    }
  }
  });
  return err.load();
}
#endif  // NMKERN_HAVE_AVX2

template <class E, typename CT>
int bsr_run(BSRArgs<E, CT> a, int algo) {
#ifdef NMKERN_HAVE_AVX2
  if (algo == NMKERN_ALGO_AUTO) algo = a.batch <= 4 ? NMKERN_ALGO_SMALL_BATCH : NMKERN_ALGO_LARGE_BATCH;
  if (algo == NMKERN_ALGO_LARGE_BATCH) return bsr_large(a);
#else
  (void)algo;
#endif
  const WidenedRows<E> xw(a.x, a.batch * a.k);
  if (!xw.p) return NMKERN_ENOMEM;
  a.xf = xw.p;
#ifdef NMKERN_HAVE_AVX2
  const int N = a.block;
  // Dynamic chunks: a descheduled thread on a shared machine holds back one chunk.
  const int64_t chunk = std::max<int64_t>(1, a.block_rows() / (16 * a.nthreads));
  parallel_for(a.block_rows(), chunk, a.nthreads, [&](int64_t r0, int64_t r1) {
    for (int64_t br = r0; br < r1; ++br) {
      if (N == 4)
        bsr_small_row_n4(a, br);
      else if (N % 8 == 0)
        bsr_small_row_n8k(a, br);
      else
        bsr_small_generic_row(a, br);
    }
  });
  return NMKERN_OK;
#else
  parallel_for(a.block_rows(), std::max<int64_t>(1, a.block_rows() / (16 * a.nthreads)), a.nthreads,
               [&](int64_t r0, int64_t r1) {
                 for (int64_t br = r0; br < r1; ++br) bsr_small_generic_row(a, br);
               });
  return NMKERN_OK;
#endif
}

}  // namespace
}  // namespace nmkern

namespace nmkern {
namespace {

template <class E>
int bsr_linear_run(const typename E::T* x, int64_t batch, int64_t k, const typename E::T* values,
                   const int32_t* rowptr, const void* col, int col_bytes, int64_t nnzb, int64_t out_features, int block,
                   const typename E::T* bias, typename E::T* y, int nthreads, int algo) {
  if (!x || !rowptr || !y || batch < 1 || k < 1 || out_features < 1 || block < 1 || nnzb < 0) return NMKERN_EBADARG;
  if (out_features % block != 0 || (nnzb > 0 && (!values || !col))) return NMKERN_EBADARG;
  const bool check_finite = (algo & NMKERN_FLAG_CHECK_FINITE) != 0;
  algo &= ~NMKERN_FLAG_CHECK_FINITE;
  if (algo == NMKERN_ALGO_AMX) return NMKERN_EUNSUPPORTED;  // N:M only (nm_linear_amx.cpp)
  if (algo < NMKERN_ALGO_AUTO || algo > NMKERN_ALGO_LARGE_BATCH) return NMKERN_EBADARG;
  if (rowptr[0] != 0 || rowptr[out_features / block] != nnzb) return NMKERN_EBADARG;
  if (check_finite && !all_finite<E>(x, batch * k)) return NMKERN_ENONFINITE;
  const int nt = resolve_threads(nthreads);
  if (col_bytes == 2) {
    if (k > 65536) return NMKERN_EBADARG;
    return bsr_run(BSRArgs<E, uint16_t>{x, batch, k, values, rowptr, static_cast<const uint16_t*>(col), out_features,
                                        block, bias, y, nt}, algo);
  }
  if (col_bytes == 4)
    return bsr_run(BSRArgs<E, int32_t>{x, batch, k, values, rowptr, static_cast<const int32_t*>(col), out_features,
                                       block, bias, y, nt}, algo);
  return NMKERN_EBADARG;
}

}  // namespace
}  // namespace nmkern

// The C entry points (declared in nmkern_cpu.h), one per element type.
#define NMKERN_BSR_LINEAR_ENTRY(SUFFIX, E, T)                                                                      \
  extern "C" int nmkern_bsr_linear_##SUFFIX(const T* x, int64_t batch, int64_t k, const T* values,                 \
                                            const int32_t* rowptr, const void* col, int col_bytes, int64_t nnzb,   \
                                            int64_t out_features, int block, const T* bias, T* y, int nthreads,    \
                                            int algo) {                                                            \
    return nmkern::bsr_linear_run<nmkern::E>(x, batch, k, values, rowptr, col, col_bytes, nnzb, out_features,     \
                                             block, bias, y, nthreads, algo);                                      \
  }

NMKERN_BSR_LINEAR_ENTRY(f32, F32, float)
NMKERN_BSR_LINEAR_ENTRY(bf16, BF16, uint16_t)
NMKERN_BSR_LINEAR_ENTRY(f16, F16, uint16_t)
