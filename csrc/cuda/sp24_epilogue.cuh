// GEMM epilogue and split-K reduce: the index math and the 16-bit packing, shared by the kernel
// (sparse24_gemm.cu) and the host emulation (tests/cuda_host), which compiles this header with
// g++. Memory accesses go through callbacks, so the kernel keeps its vector loads / stores and the
// emulation can check every address (16-byte alignment, bounds) and model shared memory.
//
// T is a 16-bit float tag with static to_float(u16) and from_float(float) (sp24::F16 / BF16 on
// the device, a software conversion on the host).

#ifndef NMKERN_SP24_EPILOGUE_CUH
#define NMKERN_SP24_EPILOGUE_CUH

#include "sp24_layout.cuh"

namespace sp24 {

// Phase 1: float offset in the fp32 tile Cs[batch][w_row] (row stride EPI_STRIDE) of accumulator
// element i of lane `lane`, m16 tile t (W rows +16t), n8 tile j (batch rows +8j), warp (wn, wm).
// The tile is transposed (batch-major) so phase 2 reads 8 consecutive W rows = 8 outputs of one
// Y row.
template <class Cfg>
SP24_HD int epi_acc_offset(int wn, int wm, int t, int j, int lane, int i) {
  const int r = wn * 32 + t * 16 + acc_row(lane, i);
  const int c = wm * Cfg::WM + j * 8 + acc_col(lane, i);
  return c * Cfg::EPI_STRIDE + r;
}

// Phase 2, one thread: 8-wide chunks of the BM x BN tile, chunk id -> (batch row m, W row nc..nc+7).
//   tile8(off, v)        v[0..7] = Cs[off .. off+7]               (two 16-byte shared loads)
//   ws8(off, v)          ws[off .. off+7] = v                      (two 16-byte global stores)
//   bias8(off, bw)       bw[0..3] = 16 bytes of bias from element off (one 16-byte load)
//   y8(off, packed)      16 bytes to y from element off            (one 16-byte store)
// With split-K (to_ws) the fp32 partials of split z go to ws (splits, M, N) unrounded and the
// reduce adds bias; otherwise bias is added here and the sum rounded once to T.
// Chunks never straddle N: N % 32 == 0 and nc % 8 == 0, so "gn < N" covers all 8 columns.
template <class Cfg, class T, class Tile8, class Ws8, class Bias8, class Y8>
SP24_HD void epilogue_store(Tile8& tile8, Ws8& ws8, Bias8& bias8, Y8& y8, int tid, int n0, int m0, int M, int N,
                            int z, bool to_ws, bool has_bias) {
  constexpr int CHUNKS = Cfg::BM * Cfg::BN / 8;
  for (int id = tid; id < CHUNKS; id += Cfg::THREADS) {
    const int m = id / (Cfg::BN / 8);
    const int nc = (id % (Cfg::BN / 8)) * 8;
    const int gm = m0 + m, gn = n0 + nc;
    if (gm >= M || gn >= N) continue;
    float v[8];
    tile8(m * Cfg::EPI_STRIDE + nc, v);
    if (to_ws) {
      ws8(((long long)z * M + gm) * N + gn, v);
      continue;
    }
    if (has_bias) {
      unsigned bw[4];
      bias8(gn, bw);
      SP24_UNROLL
      for (int q = 0; q < 4; ++q) {  // little-endian: element 2q in the low half of word q
        v[2 * q] += T::to_float(static_cast<unsigned short>(bw[q] & 0xFFFFu));
        v[2 * q + 1] += T::to_float(static_cast<unsigned short>(bw[q] >> 16));
      }
    }
    unsigned packed[4];
    SP24_UNROLL
    for (int q = 0; q < 4; ++q)
      packed[q] = static_cast<unsigned>(T::from_float(v[2 * q])) |
                  (static_cast<unsigned>(T::from_float(v[2 * q + 1])) << 16);
    y8((long long)gm * N + gn, packed);
  }
}

// Split-K reduce, one thread of a grid-stride loop over float4 groups i (outputs 4i .. 4i+3):
//   ws4(off, v)    v[0..3] = ws[off .. off+3]    (one 16-byte load)
//   bias1(n)       bias element n (16 bits)
//   y4(off, lo, hi) y[off .. off+3] = the 4 packed outputs (one 8-byte store)
// M * N % 4 == 0 (N % 32 == 0), so a group never wraps a row: all 4 share bias n..n+3.
template <class T, class Ws4, class Bias1, class Y4>
SP24_HD void splitk_reduce_thread(Ws4& ws4, Bias1& bias1, Y4& y4, long long first, long long stride, int M, int N,
                                  int splits, bool has_bias) {
  const long long plane = (long long)M * N;
  const long long total4 = plane / 4;
  for (long long i = first; i < total4; i += stride) {
    float v[4];
    ws4(4 * i, v);
    for (int z = 1; z < splits; ++z) {
      float p[4];
      ws4(z * plane + 4 * i, p);
      v[0] += p[0]; v[1] += p[1]; v[2] += p[2]; v[3] += p[3];
    }
    const int n = static_cast<int>((i * 4) % N);
    if (has_bias) {
      SP24_UNROLL
      for (int q = 0; q < 4; ++q) v[q] += T::to_float(bias1(n + q));
    }
    const unsigned lo = static_cast<unsigned>(T::from_float(v[0])) | (static_cast<unsigned>(T::from_float(v[1])) << 16);
    const unsigned hi = static_cast<unsigned>(T::from_float(v[2])) | (static_cast<unsigned>(T::from_float(v[3])) << 16);
    y4(4 * i, lo, hi);
  }
}

}  // namespace sp24

#endif  // NMKERN_SP24_EPILOGUE_CUH
