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
#include "sp24_epilogue.cuh"
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

  // Pipeline callbacks for run_pipeline (sp24_layout.cuh), which holds the stage schedule.
  auto load = [&](int s, int kt) {
    u16* As = reinterpret_cast<u16*>(smem + stage_a_bytes<Cfg>(s));
    u16* Bs = reinterpret_cast<u16*>(smem + stage_b_bytes<Cfg>(s));
    u32* Es = reinterpret_cast<u32*>(smem + stage_e_bytes<Cfg>(s));
    auto copy = [&](int op, int soff, long long goff, bool ok) {
      if (op == kOpA) cp_async16(As + soff, ok ? values + goff : values, ok);
      else if (op == kOpB) cp_async16(Bs + soff, ok ? x + goff : x, ok);
      else cp_async16(Es + soff, ok ? meta + goff : meta, ok);
    };
    load_stage<Cfg>(copy, tid, kt, n0, m0, M, N, K);
  };
  auto commit = [] { cp_async_commit(); };
  auto wait = [](auto pending) { cp_async_wait<decltype(pending)::value>(); };
  auto sync = [] { __syncthreads(); };

  float acc[2][Cfg::NT][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][j][i] = 0.f;

  // Warp-uniform: does this warp own any valid W rows / batch rows?
  const bool warp_active = (n0 + wn * 32 < N) && (m0 + wm * Cfg::WM < M);

  auto compute = [&](int s, int kt) {
    const u16* As = reinterpret_cast<const u16*>(smem + stage_a_bytes<Cfg>(s));
    const u16* Bs = reinterpret_cast<const u16*>(smem + stage_b_bytes<Cfg>(s));
    const u32* Es = reinterpret_cast<const u32*>(smem + stage_e_bytes<Cfg>(s));
    const int k0 = kt * kBK;
    if (!warp_active) return;
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
  };
  run_pipeline<Cfg>(load, commit, wait, sync, compute, kt_begin, nkt);

  // Epilogue (sp24_epilogue.cuh): accumulators -> fp32 tile Cs[batch][w_row] in shared memory
  // (reusing the drained pipeline stages) -> 8-wide stores.
  float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) Cs[epi_acc_offset<Cfg>(wn, wm, t, j, lane, i)] = acc[t][j][i];
  __syncthreads();

  auto tile8 = [&](int off, float (&v)[8]) {
    const float4 lo = *reinterpret_cast<const float4*>(Cs + off);
    const float4 hi = *reinterpret_cast<const float4*>(Cs + off + 4);
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
    v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
  };
  auto ws8 = [&](long long off, const float (&v)[8]) {
    float4* dst = reinterpret_cast<float4*>(ws + off);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  };
  auto bias8 = [&](int off, u32 (&bw)[4]) {
    const uint4 braw = *reinterpret_cast<const uint4*>(bias + off);
    bw[0] = braw.x; bw[1] = braw.y; bw[2] = braw.z; bw[3] = braw.w;
  };
  auto y8 = [&](long long off, const u32 (&p)[4]) {
    *reinterpret_cast<uint4*>(y + off) = make_uint4(p[0], p[1], p[2], p[3]);
  };
  epilogue_store<Cfg, T>(tile8, ws8, bias8, y8, tid, n0, m0, M, N, blockIdx.z, gridDim.z > 1, bias != nullptr);
}

// Y = sum_z ws[z] (+ bias), 4 outputs per thread (sp24_epilogue.cuh); M * N % 4 == 0 because N % 32 == 0.
template <class T>
__device__ __forceinline__ void splitk_reduce(const float* __restrict__ ws, const u16* __restrict__ bias,
                                              u16* __restrict__ y, int M, int N, int splits) {
  auto ws4 = [&](long long off, float (&v)[4]) {
    const float4 s = *reinterpret_cast<const float4*>(ws + off);
    v[0] = s.x; v[1] = s.y; v[2] = s.z; v[3] = s.w;
  };
  auto bias1 = [&](int n) { return bias[n]; };
  auto y4 = [&](long long off, u32 lo, u32 hi) { *reinterpret_cast<uint2*>(y + off) = make_uint2(lo, hi); };
  splitk_reduce_thread<T>(ws4, bias1, y4, blockIdx.x * (long long)blockDim.x + threadIdx.x,
                          (long long)gridDim.x * blockDim.x, M, N, splits, bias != nullptr);
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
