// 2:4 prune-and-compress: dense W (N, K) fp16/bf16 -> values (N, K/2) + metadata (N, K/16)
// int16 in the CUTLASS SM80 layout, byte-identical to
// nmkern.compress_24(nmkern.apply_nm(W, 2, 4)). Each thread owns one 16-column chunk of one
// row: it prunes its four groups (two largest |w|, ties to the lower index), writes 8 kept
// values as one 16-byte store and one int16 of metadata at its CUTLASS position.
// Requirements (checked in Python): N % 32 == 0, K % 32 == 0, finite input, 16-byte aligned.

#ifndef NMKERN_COMPRESS24_CU
#define NMKERN_COMPRESS24_CU

#include "sp24_device.cuh"
#include "sp24_layout.cuh"

namespace sp24 {

template <class T>
__device__ __forceinline__ void prune_compress(const u16* __restrict__ w, u16* __restrict__ values,
                                               u16* __restrict__ meta, int N, int K) {
  const int chunks_per_row = K / 16;
  const long long total = (long long)N * chunks_per_row;
  for (long long id = blockIdx.x * (long long)blockDim.x + threadIdx.x; id < total;
       id += (long long)gridDim.x * blockDim.x) {
    const int r = static_cast<int>(id / chunks_per_row);
    const int c = static_cast<int>(id % chunks_per_row);
    const uint4* src = reinterpret_cast<const uint4*>(w + (long long)r * K + c * 16);
    const uint4 p0 = src[0], p1 = src[1];
    const u32 words[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
    u16 raw[16];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      raw[2 * i] = static_cast<u16>(words[i] & 0xFFFFu);
      raw[2 * i + 1] = static_cast<u16>(words[i] >> 16);
    }
    u32 meta16 = 0;
    u16 kept[8];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = T::to_float(raw[4 * g + i]);
      unsigned keep;
      const unsigned nib = prune_group_nibble(v, &keep);
      const int s0 = nib & 3, s1 = (nib >> 2) & 3;
      // Pruned group: w where kept, +0 elsewhere (what apply_nm writes).
      const u16* grp = raw + 4 * g;  // compile-time offset: stays in registers
      kept[2 * g] = ((keep >> s0) & 1u) ? select4(grp[0], grp[1], grp[2], grp[3], s0) : static_cast<u16>(0);
      kept[2 * g + 1] = ((keep >> s1) & 1u) ? select4(grp[0], grp[1], grp[2], grp[3], s1) : static_cast<u16>(0);
      meta16 |= nib << (4 * g);
    }
    uint4 out;
    out.x = kept[0] | (static_cast<u32>(kept[1]) << 16);
    out.y = kept[2] | (static_cast<u32>(kept[3]) << 16);
    out.z = kept[4] | (static_cast<u32>(kept[5]) << 16);
    out.w = kept[6] | (static_cast<u32>(kept[7]) << 16);
    *reinterpret_cast<uint4*>(values + (long long)r * (K / 2) + c * 8) = out;
    meta[meta_offset(r, c, N)] = static_cast<u16>(meta16);
  }
}

}  // namespace sp24

extern "C" __global__ void nmkern_sp24_prune_compress_f16(const unsigned short* w, unsigned short* values,
                                                          unsigned short* meta, int N, int K) {
  sp24::prune_compress<sp24::F16>(w, values, meta, N, K);
}
extern "C" __global__ void nmkern_sp24_prune_compress_bf16(const unsigned short* w, unsigned short* values,
                                                           unsigned short* meta, int N, int K) {
  sp24::prune_compress<sp24::BF16>(w, values, meta, N, K);
}

#endif  // NMKERN_COMPRESS24_CU
