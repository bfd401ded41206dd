// 2:4 sparse GEMM on sparse tensor cores: Y = X W^T (+ bias).
//
//   X      (M, K)    fp16/bf16, row-major (contiguous)
//   W      (N, K)    2:4 sparse, given as values (N, K/2) + metadata (N, K/16) int16 in the
//                    CUTLASS SM80 layout of nmkern.compress_24 (see sp24_layout.cuh)
//   bias   (N,)      optional (nullptr = none), same dtype as X
//   Y      (M, N)    same dtype as X; fp32 accumulation
//
// mma.sp takes the sparse operand as A, so the kernel computes Y^T = W X^T: W rows are the
// mma M dimension, batch rows the N dimension; the epilogue transposes through shared memory
// so that Y is written row-major with 16-byte stores. Requirements (checked in Python):
// N % 32 == 0, K % 32 == 0 (the layout's own), 16-byte aligned pointers. M is free: rows
// past M are zero-filled on load and never stored; a K tail (K % 64 == 32) skips the last
// mma k32 step; whole warps beyond N skip their mma (their metadata would be zero-filled).
//
// Split-K: with gridDim.z > 1, block z covers k tiles [z*kt_per_split, ...) and writes fp32
// partial sums to ws (splits, M, N); nmkern_sp24_splitk_reduce_* adds them (+ bias).

#ifndef NMKERN_SPARSE24_GEMM_CU
#define NMKERN_SPARSE24_GEMM_CU

#include "sp24_device.cuh"
#include "sp24_layout.cuh"

namespace sp24 {

template <class Cfg, class T>
__device__ __forceinline__ void gemm_kernel(const u16* __restrict__ x, const u16* __restrict__ values,
                                            const u32* __restrict__ meta, const u16* __restrict__ bias,
                                            u16* __restrict__ y, float* __restrict__ ws, int M, int N, int K,
                                            int kt_per_split) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wn = warp % Cfg::WARPS_N;  // warp's 32-row slice of W
  const int wm = warp / Cfg::WARPS_N;  // warp's WM-row slice of the batch
  const int n0 = blockIdx.x * Cfg::BN;
  const int m0 = blockIdx.y * Cfg::BM;
  const int ktiles = (K + kBK - 1) / kBK;
  const int kt_begin = blockIdx.z * kt_per_split;
  const int kt_end = min(ktiles, kt_begin + kt_per_split);
  const int nkt = max(kt_end - kt_begin, 0);

  auto stage_ptr = [&](int s) { return smem + s * Cfg::STAGE_BYTES; };
  auto load = [&](int s, int kt) {
    unsigned char* base = stage_ptr(s);
    u16* As = reinterpret_cast<u16*>(base);
    u16* Bs = reinterpret_cast<u16*>(base + Cfg::A_BYTES);
    u32* Es = reinterpret_cast<u32*>(base + Cfg::A_BYTES + Cfg::B_BYTES);
    auto copy = [&](int op, int soff, long long goff, bool ok) {
      if (op == kOpA) cp_async16(As + soff, ok ? values + goff : values, ok);
      else if (op == kOpB) cp_async16(Bs + soff, ok ? x + goff : x, ok);
      else cp_async16(Es + soff, ok ? meta + goff : meta, ok);
    };
    load_stage<Cfg>(copy, tid, kt, n0, m0, M, N, K);
  };

  float acc[2][Cfg::NT][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][j][i] = 0.f;

  // Warp-uniform: does this warp own any valid W rows / batch rows?
  const bool warp_active = (n0 + wn * 32 < N) && (m0 + wm * Cfg::WM < M);

#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < nkt) load(s, kt_begin + s);
    cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    {
      const int next = it + Cfg::STAGES - 1;
      if (next < nkt) load(next % Cfg::STAGES, kt_begin + next);
      cp_async_commit();
    }
    const unsigned char* base = stage_ptr(it % Cfg::STAGES);
    const u16* As = reinterpret_cast<const u16*>(base);
    const u16* Bs = reinterpret_cast<const u16*>(base + Cfg::A_BYTES);
    const u32* Es = reinterpret_cast<const u32*>(base + Cfg::A_BYTES + Cfg::B_BYTES);
    const int k0 = (kt_begin + it) * kBK;
    if (warp_active) {
#pragma unroll
      for (int kk = 0; kk < kMetaWordsPerRowStage; ++kk) {
        if (k0 + kk * 32 >= K) break;  // K tail: only the first k32 step of the last tile
        const u32 e = Es[smem_e(Cfg::BN, kk, wn * 32 + lane)];
        u32 a[2][4];
#pragma unroll
        for (int t = 0; t < 2; ++t)
          ldmatrix_x4(a[t], As + smem_a(wn * 32 + t * 16 + ldsm_a_row(lane), kk * 16 + ldsm_a_col(lane)));
#pragma unroll
        for (int j = 0; j < Cfg::NT; ++j) {
          u32 b[4];
          ldmatrix_x4(b, Bs + smem_b(wm * Cfg::WM + j * 8 + ldsm_b_row(lane), kk * 32 + ldsm_b_col(lane)));
          T::template mma_sp<0>(acc[0][j], a[0], b, e);  // W rows 0..15 of the 32-row block
          T::template mma_sp<1>(acc[1][j], a[1], b, e);  // W rows 16..31
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: accumulators -> fp32 tile Cs[batch][w_row] in shared memory -> 8-wide stores.
  float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wn * 32 + t * 16 + acc_row(lane, i);
        const int c = wm * Cfg::WM + j * 8 + acc_col(lane, i);
        Cs[c * Cfg::EPI_STRIDE + r] = acc[t][j][i];
      }
  __syncthreads();

  constexpr int CHUNKS = Cfg::BM * Cfg::BN / 8;
  for (int id = tid; id < CHUNKS; id += Cfg::THREADS) {
    const int m = id / (Cfg::BN / 8);
    const int nc = (id % (Cfg::BN / 8)) * 8;
    const int gm = m0 + m, gn = n0 + nc;
    if (gm >= M || gn >= N) continue;
    const float4 lo = *reinterpret_cast<const float4*>(Cs + m * Cfg::EPI_STRIDE + nc);
    const float4 hi = *reinterpret_cast<const float4*>(Cs + m * Cfg::EPI_STRIDE + nc + 4);
    if (gridDim.z > 1) {
      float4* dst = reinterpret_cast<float4*>(ws + ((long long)blockIdx.z * M + gm) * N + gn);
      dst[0] = lo;
      dst[1] = hi;
      continue;
    }
    float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    if (bias != nullptr) {
      const uint4 braw = *reinterpret_cast<const uint4*>(bias + gn);
      const u32 bw[4] = {braw.x, braw.y, braw.z, braw.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[2 * q] += T::to_float(static_cast<u16>(bw[q] & 0xFFFFu));
        v[2 * q + 1] += T::to_float(static_cast<u16>(bw[q] >> 16));
      }
    }
    u32 packed[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
      packed[q] = static_cast<u32>(T::from_float(v[2 * q])) | (static_cast<u32>(T::from_float(v[2 * q + 1])) << 16);
    *reinterpret_cast<uint4*>(y + (long long)gm * N + gn) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// Y = sum_z ws[z] (+ bias), 4 outputs per thread; M * N % 4 == 0 because N % 32 == 0.
template <class T>
__device__ __forceinline__ void splitk_reduce(const float* __restrict__ ws, const u16* __restrict__ bias,
                                              u16* __restrict__ y, int M, int N, int splits) {
  const long long total4 = (long long)M * N / 4;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total4;
       i += (long long)gridDim.x * blockDim.x) {
    float4 s = reinterpret_cast<const float4*>(ws)[i];
    for (int z = 1; z < splits; ++z) {
      const float4 p = reinterpret_cast<const float4*>(ws + (long long)z * M * N)[i];
      s.x += p.x; s.y += p.y; s.z += p.z; s.w += p.w;
    }
    float v[4] = {s.x, s.y, s.z, s.w};
    const int n = static_cast<int>((i * 4) % N);
    if (bias != nullptr) {
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] += T::to_float(bias[n + q]);
    }
    const u32 lo = static_cast<u32>(T::from_float(v[0])) | (static_cast<u32>(T::from_float(v[1])) << 16);
    const u32 hi = static_cast<u32>(T::from_float(v[2])) | (static_cast<u32>(T::from_float(v[3])) << 16);
    reinterpret_cast<uint2*>(y)[i] = make_uint2(lo, hi);
  }
}

}  // namespace sp24

#define NMKERN_SP24_GEMM_ENTRY(NAME, CFG, TYPE)                                                         \
  extern "C" __global__ void __launch_bounds__(CFG::THREADS)                                             \
      NAME(const unsigned short* x, const unsigned short* values, const unsigned int* meta,              \
           const unsigned short* bias, unsigned short* y, float* ws, int M, int N, int K, int kt_per_split) { \
    sp24::gemm_kernel<CFG, TYPE>(x, values, meta, bias, y, ws, M, N, K, kt_per_split);                  \
  }

NMKERN_SP24_GEMM_ENTRY(nmkern_sp24_gemm_small_f16, sp24::CfgSmall, sp24::F16)
NMKERN_SP24_GEMM_ENTRY(nmkern_sp24_gemm_small_bf16, sp24::CfgSmall, sp24::BF16)
NMKERN_SP24_GEMM_ENTRY(nmkern_sp24_gemm_large_f16, sp24::CfgLarge, sp24::F16)
NMKERN_SP24_GEMM_ENTRY(nmkern_sp24_gemm_large_bf16, sp24::CfgLarge, sp24::BF16)

extern "C" __global__ void nmkern_sp24_splitk_reduce_f16(const float* ws, const unsigned short* bias,
                                                         unsigned short* y, int M, int N, int splits) {
  sp24::splitk_reduce<sp24::F16>(ws, bias, y, M, N, splits);
}
extern "C" __global__ void nmkern_sp24_splitk_reduce_bf16(const float* ws, const unsigned short* bias,
                                                          unsigned short* y, int M, int N, int splits) {
  sp24::splitk_reduce<sp24::BF16>(ws, bias, y, M, N, splits);
}

#endif  // NMKERN_SPARSE24_GEMM_CU
