// Helpers shared by the nmkern CPU kernels (internal; not part of the C ABI).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "elem.h"
#include "parallel.h"

#if defined(NMKERN_ISA_AVX2) || defined(NMKERN_ISA_AVX512)
#include <immintrin.h>
#define NMKERN_HAVE_AVX2 1
#endif

namespace nmkern {

// Batch columns per x panel in the large-batch kernels: 3 AVX vectors, so a
// 4-row x 3-vector register tile uses 12 of the 16 ymm registers.
constexpr int kPanel = 24;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned float scratch, zero-filled; p == nullptr on allocation failure.
struct FloatBuf {
  float* p = nullptr;
  explicit FloatBuf(int64_t count) {
    size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 16) * 4, 64));
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (p) std::memset(p, 0, bytes);
  }
  ~FloatBuf() { std::free(p); }
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
};

// Rows of x as fp32: the input itself for fp32, else a widened copy (p == nullptr on
// allocation failure).
template <class E>
struct WidenedRows {
  FloatBuf buf;
  const float* p = nullptr;
  WidenedRows(const typename E::T* x, int64_t count) : buf(E::kIsF32 ? 0 : count) {
    if constexpr (E::kIsF32) {
      p = x;
    } else if (buf.p) {
      widen<E>(x, buf.p, count);
      p = buf.p;
    }
  }
};

// nm_linear_amx.cpp: the AMX kernel, bf16 or (f16) fp16 split into bf16 planes (NMKERN_EUNSUPPORTED
// without AMX in this library).
bool amx_bf16_usable();
bool amx_nm_shape_supported(int64_t k, int n, int m);
int nm_linear_amx(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values, const uint8_t* index_bytes,
                  int64_t out_features, int n, bool f16, const uint16_t* bias, uint16_t* y, int nthreads);

inline int resolve_threads(int nthreads) { return nthreads > 0 ? nthreads : omp_get_max_threads(); }

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// x (B, K) row-major -> panels: panel p holds batch columns [P*p, P*p + width) as a
// (K, W) row-major block, W = width rounded up to 8 (zero-padded columns), at
// xt + p * K * P (P = panel, the full panel width). Column order inside a panel
// row is the batch order. Half inputs are widened to fp32 on the way.
template <class E>
inline void transpose_to_panels(const typename E::T* x, int64_t batch, int64_t k, float* xt, int nthreads,
                                int64_t panel = kPanel) {
  const int64_t kPanel = panel;
  const int64_t panels = ceil_div(batch, kPanel);
  const int64_t kblocks = ceil_div(k, 256);
  parallel_for(panels * kblocks, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / kblocks, k0 = item % kblocks * 256;
      const int64_t b0 = p * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, batch - b0);
      const int64_t w = round_up(width, 8);
      float* dst = xt + p * k * kPanel;
      const int64_t k1 = std::min<int64_t>(k, k0 + 256);
      for (int64_t kk = k0; kk < k1; ++kk) {
        float* row = dst + kk * w;
        for (int64_t c = 0; c < width; ++c) row[c] = E::to_f32(x[(b0 + c) * k + kk]);
        for (int64_t c = width; c < w; ++c) row[c] = 0.0f;
      }
    }
  });
}

}  // namespace nmkern
