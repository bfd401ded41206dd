// N:M sparse linear in bf16 or fp16 on AMX-BF16 tiles (nmkern_nm_linear_bf16 / _f16 with NMKERN_ALGO_AMX,
// or AUTO from kAmxMinBatch rows on a CPU with AMX-BF16): y = x @ W^T + bias, W in the row-tile layout of
// nmkern_cpu.h with m = 4 and n = 1 or 2 (2:4, 1:4), K a multiple of 32.
//
// Why: on a Xeon with AMX, dense bf16 F.linear runs on the tile unit (4096x4096 at 256 rows: 5.2 ms,
// ~820 G multiply-adds/s on 2 cores), and the FMA kernels of nm_linear.cpp, which skip the zeros,
// reach ~8 multiply-adds per cycle per core: 2.5-10x slower than dense from 16 rows up. AMX cannot
// skip zeros, but it can multiply a weight decoded on the fly: the packed weight is read once
// (0.56x of the dense bytes for 2:4 bf16), expanded into an L2-resident strip of B tiles, and the
// tile unit does the multiply-adds at its dense rate.
//
// Per block of 16 output rows (two 8-row tiles of the layout):
// * decode: each group of 4 inputs becomes two 64-byte B-tile rows in the VNNI order tdpbf16ps
//   wants, row p holding W[o][4g + 2p], W[o][4g + 2p + 1] for the 16 rows o. The 16 (or 8) kept
//   values of each tile are one load; their 2-bit indices are spread over 16 dword lanes with
//   vpsrlvd, compared with the target column (vpcmpeqw) and the values moved into place with a
//   zero-masked vpermw per slot. Slots of a group hold distinct in-group indices (the layout
//   builder guarantees it), so at most one slot lands on a column.
// * multiply: A tiles are 16 rows of x by 32 inputs, copied once per call into 1 KiB blocks (pack_x),
//   the B tile is 32 decoded inputs of the 16 weight rows, C (16 x 16 fp32) accumulates over K; up
//   to four row blocks of x share each B tile load (tmm0-3 hold C, tmm4/5 A, tmm6 B).
//
// fp16 (P = 2 planes): this CPU has no AMX-FP16, and torch's dense fp16 runs on AVX512-FP16 FMAs
// (4096x4096 at 256 rows: ~25 ms, against ~5 ms for bf16 on AMX). Every fp16 value v is the exact sum
// of two bf16 values, hi + lo (fp16 keeps 11 significant bits, bf16 8, and bf16 has fp32's exponent
// range, so fp16 subnormals stay normal): x is split with hi rounded to nearest (|lo| <= 2^-9 |v|), the
// weight with hi truncated (|lo| < 2^-7 |v|, two uops cheaper in the decode). C accumulates
// hi_x.hi_w + hi_x.lo_w + lo_x.hi_w: three tile products, the dropped lo_x.lo_w is below 2^-16 of each
// product, against the 2^-11 of the fp16 rounding of y. NaN and Inf keep lo = 0, so they reach y as in
// dense. tmm4/5 then hold A hi / lo, tmm6/7 B hi / lo.
#include <algorithm>
#include <atomic>

#include "common.h"
#include "nmkern_cpu.h"

#if defined(NMKERN_ISA_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define NMKERN_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace nmkern {

#ifdef NMKERN_HAVE_AMX
namespace {

// Linux keeps the 8 KiB tile state off until a process asks for it (arch_prctl, kernel >= 5.16).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool amx_permitted() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bw")) return false;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: C (rows x 16 fp32), tmm4-5: A (rows x 32 bf16 of x), tmm6-7: B (16 input pairs x 16 rows).
void load_tile_config(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t < 6 ? rows : 16);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Word s of the 32 stored values of a group, in the order split_f16 leaves the fp16 planes in (vpackusdw
// works per 128-bit lane: lane L holds words 4L..4L+3 of the low half, then 4L..4L+3 of the high half).
constexpr int f16_plane_word(int s) { return s < 16 ? s / 4 * 8 + s % 4 : (s - 16) / 4 * 8 + 4 + s % 4; }

struct DecodeConsts {
  __m512i shift[2], base[2], column[2], three, three_pair;
  DecodeConsts(bool f16_planes) {
    alignas(64) uint32_t sh[2][16];
    alignas(64) uint16_t bs[2][32], col[2][32];
    for (int s = 0; s < 2; ++s)
      for (int d = 0; d < 16; ++d) sh[s][d] = 16 * s + 2 * (d % 8);  // slot s, lane d % 8 of tile d / 8
    for (int w = 0; w < 32; ++w) {  // word w of a B row: output row w / 2, input 2p + w % 2
      for (int s = 0; s < 2; ++s) {
        const int word = (w / 16) * 16 + s * 8 + (w / 2) % 8;
        bs[s][w] = static_cast<uint16_t>(f16_planes ? f16_plane_word(word) : word);
      }
      for (int p = 0; p < 2; ++p) col[p][w] = static_cast<uint16_t>(2 * p + w % 2);
    }
    for (int i = 0; i < 2; ++i) {
      shift[i] = _mm512_load_si512(sh[i]);
      base[i] = _mm512_load_si512(bs[i]);
      column[i] = _mm512_load_si512(col[i]);
    }
    three = _mm512_set1_epi32(3);
    three_pair = _mm512_set1_epi32(0x00030003);
  }
};

// lo = v - hi where hi's exponent is finite, else 0 (NaN and Inf stay in hi alone).
inline __m512 exact_rest(__m512 v, __m512i hi_bits) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(hi_bits, exponent), exponent);
  return _mm512_maskz_sub_ps(finite, v, _mm512_castsi512_ps(hi_bits));
}

// 32 fp16 words -> bf16 hi and lo planes (words in f16_plane_word order), hi = the top 16 bits of each
// fp32 value (truncated), lo = the exact rest (at most 3 significant bits, so its top 16 bits hold it).
inline void split_f16(__m512i src, __m512i* planes) {
  const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(src));
  const __m512 b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(src, 1));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i ha = _mm512_and_si512(_mm512_castps_si512(a), top), hb = _mm512_and_si512(_mm512_castps_si512(b), top);
  const __m512i la = _mm512_castps_si512(exact_rest(a, ha)), lb = _mm512_castps_si512(exact_rest(b, hb));
  planes[0] = _mm512_packus_epi32(_mm512_srli_epi32(ha, 16), _mm512_srli_epi32(hb, 16));
  planes[1] = _mm512_packus_epi32(_mm512_srli_epi32(la, 16), _mm512_srli_epi32(lb, 16));
}

// The stored values of one group of tiles t0 and t1 (t1 absent: zeros) as P source planes.
template <int P>
inline void load_planes(const uint16_t* v0, const uint16_t* v1, __m512i* planes) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0));
  const __m256i hi = v1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1)) : _mm256_setzero_si256();
  const __m512i src = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  if constexpr (P == 1)
    planes[0] = src;
  else
    split_f16(src, planes);
}

// 2:4: the 64 words of group g for the 16 rows of tiles t0 and t1, per plane (plane q at out + 512 q).
template <int P>
inline void decode_group_24(const DecodeConsts& dc, const uint16_t* v0, const uint16_t* v1, uint32_t w0,
                            uint32_t w1, uint16_t* out) {
  __m512i src[P];
  load_planes<P>(v0, v1, src);
  const __m512i fields = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(w0)), 0xFF00,
                                                static_cast<int>(w1));
  __m512i idx[2];
  for (int s = 0; s < 2; ++s) {
    const __m512i i = _mm512_and_si512(_mm512_srlv_epi32(fields, dc.shift[s]), dc.three);
    idx[s] = _mm512_or_si512(i, _mm512_slli_epi32(i, 16));  // both words of a row's dword
  }
  for (int p = 0; p < 2; ++p) {
    const __mmask32 at0 = _mm512_cmpeq_epi16_mask(idx[0], dc.column[p]);
    const __mmask32 at1 = _mm512_cmpeq_epi16_mask(idx[1], dc.column[p]);
    for (int q = 0; q < P; ++q) {
      const __m512i row = _mm512_maskz_permutexvar_epi16(at0, dc.base[0], src[q]);
      _mm512_store_si512(out + 512 * q + 32 * p, _mm512_mask_permutexvar_epi16(row, at1, dc.base[1], src[q]));
    }
  }
}

// 1:4: groups g and g + 1 at once (128 words). Decoded one group at a time like 2:4, one slot per row
// left half of a zmm empty; here the two groups' values fill it (16 consecutive words per tile) and one
// 32-bit index word per tile holds both groups' fields (bits 0-15 group g, 16-31 group g + 1), so a shift
// and a mask give every row's index for both groups, one per word. Per group: 2 vpcmpeqw + 2 vpermw on
// port 5 and ~4 other uops, against ~6 port-5 uops one group at a time (1:4 at 16 rows: ~3% faster).
template <int P>
inline void decode_group_pair_14(const DecodeConsts& dc, const uint16_t* v0, const uint16_t* v1, uint32_t w0,
                                 uint32_t w1, uint16_t* out) {
  __m512i src[P];  // words: tile * 16 + 8 h + row (remapped for fp16 planes)
  load_planes<P>(v0, v1, src);
  const __m512i fields = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(w0)), 0xFF00,
                                                static_cast<int>(w1));
  // word 0 of lane d: row d's index in group g; word 1: in group g + 1
  const __m512i both = _mm512_and_si512(_mm512_srlv_epi32(fields, dc.shift[0]), dc.three_pair);
  const __m512i idx[2] = {_mm512_mask_blend_epi16(0xAAAAAAAAu, both, _mm512_slli_epi32(both, 16)),
                          _mm512_mask_blend_epi16(0x55555555u, both, _mm512_srli_epi32(both, 16))};
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 2; ++p) {
      const __mmask32 at = _mm512_cmpeq_epi16_mask(idx[h], dc.column[p]);
      for (int q = 0; q < P; ++q)
        _mm512_store_si512(out + 512 * q + 64 * h + 32 * p, _mm512_maskz_permutexvar_epi16(at, dc.base[h], src[q]));
    }
}

struct AmxArgs {
  const uint16_t* xp;  // x packed by pack_x: P planes of xplane words each
  int64_t batch, k, rows;  // rows: x rows per A tile (16, or batch when batch < 16)
  int64_t xplane;
  const uint16_t* values;
  const uint8_t* index_bytes;
  int64_t out_features;
  const uint16_t* bias;
  uint16_t* y;
  int64_t ktiles() const { return k / 32; }
  int64_t xblocks() const { return ceil_div(batch, rows); }
};

// 16 fp32 -> bf16 exactly as f32_to_bf16 (elem.h): round to nearest even, NaN stays a quiet NaN.
inline __m256i bf16x16_from_f32(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

// 16 bf16 -> fp32 (exact: the bits shifted up by 16).
inline __m512 f32_from_bf16x16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 32 inputs of one row of x into its A-tile rows: bf16 copied; fp16 split into hi (rounded to nearest
// even) and the exact rest, written plane words apart.
template <int P>
inline void pack_x_row(const uint16_t* src, uint16_t* dst, int64_t plane) {
  if constexpr (P == 1) {
    std::memcpy(dst, src, 64);
  } else {
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * h)));
      const __m256i hi = bf16x16_from_f32(v);
      const __m512i hi_bits = _mm512_castps_si512(f32_from_bf16x16(hi));
      const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(exact_rest(v, hi_bits)), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * h), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + plane + 16 * h), _mm512_cvtepi32_epi16(lo));
    }
  }
}

// x (batch, K) -> A tiles [plane][row block][K / 32][rows][32], rows zero-padded: each tile is 1 KiB (or
// rows x 64 B) of consecutive bytes. Loading the tiles straight from x, 16 rows 8 KiB apart
// (K = 4096) fall into one L1 set: 4096x4096 2:4 at 256 rows ran at 2.0x dense that way.
template <int P>
void pack_x(const uint16_t* x, int64_t batch, int64_t k, int64_t rows, int64_t plane, uint16_t* xp, int nthreads) {
  const int64_t kt_count = k / 32, blocks = ceil_div(batch, rows);
  parallel_for(blocks, 1, nthreads, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t kt = 0; kt < kt_count; ++kt) {
        uint16_t* dst = xp + (b * kt_count + kt) * rows * 32;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = b * rows + r;
          if (row < batch) {
            pack_x_row<P>(x + row * k + kt * 32, dst + r * 32, plane);
          } else {
            for (int q = 0; q < P; ++q) std::memset(dst + q * plane + r * 32, 0, 64);
          }
        }
      }
  });
}

// B tile kt of output block nb (tiles t0 = 2 nb and t0 + 1 of the layout) into out (512 words per
// plane): groups 8 kt .. 8 kt + 7, group g's 64 words at 64 (g - 8 kt).
template <int N, int P>
inline void decode_btile(const AmxArgs& a, const DecodeConsts& dc, int64_t nb, int64_t kt, uint16_t* out) {
  const int64_t J = a.k / 4 * N, tiles = ceil_div(a.out_features, 8);
  const int64_t t0 = 2 * nb, t1 = t0 + 1;
  const uint16_t* v0 = a.values + t0 * J * 8;
  const uint16_t* v1 = t1 < tiles ? a.values + t1 * J * 8 : nullptr;
  const uint8_t* i0 = a.index_bytes + t0 * J * 2;
  const uint8_t* i1 = a.index_bytes + t1 * J * 2;  // read only when tile t1 exists
  if constexpr (N == 1) {
    for (int64_t g = 8 * kt; g < 8 * kt + 8; g += 2)
      decode_group_pair_14<P>(dc, v0 + g * 8, v1 ? v1 + g * 8 : nullptr, load_u32(i0 + g * 2),
                              v1 ? load_u32(i1 + g * 2) : 0u, out + (g - 8 * kt) * 64);
  } else {
    for (int64_t g = 8 * kt; g < 8 * kt + 8; ++g)
      decode_group_24<P>(dc, v0 + g * 16, v1 ? v1 + g * 16 : nullptr, load_u32(i0 + g * 4),
                         v1 ? load_u32(i1 + g * 4) : 0u, out + (g - 8 * kt) * 64);
  }
}

// C tile C += A.B for one row block: bf16 one product (A in tmm4 or tmm5 by block parity, so that the
// next block's load overlaps, B in tmm6); fp16 the three products of the hi / lo planes (A hi tmm4, lo
// tmm5; B hi tmm6, lo tmm7). GCC's tile intrinsics paste their register numbers as text: literals only.
#define NMKERN_TILE_PRODUCTS(C, A)          \
  if constexpr (P == 1) {                   \
    _tile_loadd(A, a_tile, 64);             \
    _tile_dpbf16ps(C, A, 6);                \
  } else {                                  \
    _tile_loadd(4, a_tile, 64);             \
    _tile_loadd(5, a_tile + xplane, 64);    \
    _tile_dpbf16ps(C, 4, 6);                \
    _tile_dpbf16ps(C, 4, 7);                \
    _tile_dpbf16ps(C, 5, 6);                \
  }

template <int C, int P>
inline void tile_products(const uint16_t* a_tile, int64_t xplane) {
  if constexpr (C == 0) {
    NMKERN_TILE_PRODUCTS(0, 4)
  } else if constexpr (C == 1) {
    NMKERN_TILE_PRODUCTS(1, 5)
  } else if constexpr (C == 2) {
    NMKERN_TILE_PRODUCTS(2, 4)
  } else {
    NMKERN_TILE_PRODUCTS(3, 5)
  }
}
#undef NMKERN_TILE_PRODUCTS

// C tiles of NB row blocks xb0 .. xb0 + NB - 1 for output block nb over the whole K, stored to cbuf.
// FUSED: each B tile is decoded into btile (two tiles of P planes, in L1) just before its use; else btile
// is the block's decoded strip (K / 32 tiles of P planes), shared by several passes.
template <int N, int NB, bool FUSED, int P>
void multiply_pass(const AmxArgs& a, const DecodeConsts& dc, int64_t nb, int64_t xb0, uint16_t* btile, float* cbuf) {
  const int64_t kts = a.ktiles(), tile_words = a.rows * 32;
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NB > 2) _tile_zero(2);
  if (NB > 3) _tile_zero(3);
  // FUSED: B tile kt + 1 is decoded into the other half of btile before tile kt is loaded, so the tile load
  // does not wait for the stores just made (bf16 1:4 at 16 rows, 4096x4096: 0.72 -> 0.69 ms, three runs).
  if constexpr (FUSED) decode_btile<N, P>(a, dc, nb, 0, btile);
  for (int64_t kt = 0; kt < kts; ++kt) {
    const uint16_t* b = btile + kt * 512 * P;
    if constexpr (FUSED) {
      b = btile + (kt & 1) * 512 * P;
      if (kt + 1 < kts) decode_btile<N, P>(a, dc, nb, kt + 1, btile + ((kt + 1) & 1) * 512 * P);
    }
    _tile_loadd(6, b, 64);
    if constexpr (P == 2) _tile_loadd(7, b + 512, 64);
    const uint16_t* xk = a.xp + (xb0 * kts + kt) * tile_words;
    const int64_t next = kts * tile_words;  // the same K tile of the next row block
    tile_products<0, P>(xk, a.xplane);
    if constexpr (NB > 1) tile_products<1, P>(xk + next, a.xplane);
    if constexpr (NB > 2) tile_products<2, P>(xk + 2 * next, a.xplane);
    if constexpr (NB > 3) tile_products<3, P>(xk + 3 * next, a.xplane);
  }
  _tile_stored(0, cbuf, 64);
  if (NB > 1) _tile_stored(1, cbuf + 256, 64);
  if (NB > 2) _tile_stored(2, cbuf + 512, 64);
  if (NB > 3) _tile_stored(3, cbuf + 768, 64);
}

template <int N, bool FUSED, int P>
void multiply_blocks(const AmxArgs& a, const DecodeConsts& dc, int64_t nb, int64_t xb0, int blocks, uint16_t* btile,
                     float* cbuf) {
  switch (blocks) {
    case 1: multiply_pass<N, 1, FUSED, P>(a, dc, nb, xb0, btile, cbuf); break;
    case 2: multiply_pass<N, 2, FUSED, P>(a, dc, nb, xb0, btile, cbuf); break;
    case 3: multiply_pass<N, 3, FUSED, P>(a, dc, nb, xb0, btile, cbuf); break;
    default: multiply_pass<N, 4, FUSED, P>(a, dc, nb, xb0, btile, cbuf); break;
  }
}

// y rows of row blocks xb0 .. (up to 4 blocks) for output block nb, from the C tiles in cbuf, plus bias,
// rounded to bf16 (P = 1) or fp16 16 columns at a time (against a scalar loop, 4096x4096 1:4, two runs
// side by side: 0.55 -> 0.52x dense at 64 rows, 1.03 -> 0.99x at 256).
template <int P>
inline void store_blocks(const AmxArgs& a, int64_t nb, int64_t xb0, const float* cbuf) {
  const int64_t o0 = nb * 16, cols = std::min<int64_t>(16, a.out_features - o0);
  const int64_t r0 = xb0 * a.rows, rows = std::min<int64_t>(4 * a.rows, a.batch - r0);
  const __mmask16 keep = static_cast<__mmask16>((1u << cols) - 1u);
  __m512 bias = _mm512_setzero_ps();
  if (a.bias) {
    const __m256i b = _mm256_maskz_loadu_epi16(keep, a.bias + o0);
    bias = P == 1 ? f32_from_bf16x16(b) : _mm512_cvtph_ps(b);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = cbuf + (r / a.rows) * 256 + (r % a.rows) * 16;
    const __m512 v = _mm512_add_ps(_mm512_load_ps(cr), bias);
    const __m256i out =
        P == 1 ? bf16x16_from_f32(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(a.y + (r0 + r) * a.out_features + o0, keep, out);
  }
}

// Strips of this many output blocks are decoded and kept together (~768 KiB of the 2 MiB L2), so
// that each 4-block slice of packed x is loaded from L2 once per strip group, not once per block:
// 4096x4096 2:4 at 256 rows, one strip at a time: 1.8x dense (x re-read from L3 per block).
inline int64_t strip_group(int64_t k, int planes) {
  return std::clamp<int64_t>((768 << 10) / (k * 32 * planes), 1, 8);
}

// Output blocks [nb0, nb1) for every row of x. Up to 4 row blocks (64 rows) take one pass per output
// block that decodes each B tile right before use; more rows decode a group of strips once and make a
// pass per 4 row blocks and output block.
template <int N, int P>
void output_blocks(const AmxArgs& a, const DecodeConsts& dc, int64_t nb0, int64_t nb1, uint16_t* strips,
                   float* cbuf) {
  const int64_t xblocks = a.xblocks();
  if (xblocks <= 4) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      multiply_blocks<N, true, P>(a, dc, nb, 0, static_cast<int>(xblocks), strips, cbuf);
      store_blocks<P>(a, nb, 0, cbuf);
    }
    return;
  }
  const int64_t group = strip_group(a.k, P), strip_words = a.k * 16 * P;
  for (int64_t g0 = nb0; g0 < nb1; g0 += group) {
    const int64_t g1 = std::min(nb1, g0 + group);
    for (int64_t nb = g0; nb < g1; ++nb)
      for (int64_t kt = 0; kt < a.ktiles(); ++kt)
        decode_btile<N, P>(a, dc, nb, kt, strips + (nb - g0) * strip_words + kt * 512 * P);
    for (int64_t xb0 = 0; xb0 < xblocks; xb0 += 4) {
      const int blocks = static_cast<int>(std::min<int64_t>(4, xblocks - xb0));
      for (int64_t nb = g0; nb < g1; ++nb) {
        multiply_blocks<N, false, P>(a, dc, nb, xb0, blocks, strips + (nb - g0) * strip_words, cbuf);
        store_blocks<P>(a, nb, xb0, cbuf);
      }
    }
  }
}

template <int N, int P>
int run_amx(const AmxArgs& a, int nthreads) {
  const DecodeConsts dc(P == 2);
  const int64_t nblocks = ceil_div(a.out_features, 16);
  // Two B tiles (fused) or a group of strips of K/32 tiles each, P planes.
  const size_t strip_bytes = static_cast<size_t>(a.xblocks() <= 4 ? 2048 * P : strip_group(a.k, P) * a.k * 32 * P);
  std::atomic<int> err{NMKERN_OK};
  parallel_for(nblocks, std::max<int64_t>(1, nblocks / (8 * nthreads)), nthreads, [&](int64_t b0, int64_t b1) {
    uint16_t* strips = static_cast<uint16_t*>(std::aligned_alloc(64, strip_bytes));
    float* cbuf = static_cast<float*>(std::aligned_alloc(64, 4 * 256 * sizeof(float)));
    if (!strips || !cbuf) {
      err.store(NMKERN_ENOMEM);
    } else {
      load_tile_config(static_cast<int>(a.rows));
      output_blocks<N, P>(a, dc, b0, b1, strips, cbuf);
      _tile_release();
    }
    std::free(strips);
    std::free(cbuf);
  });
  return err.load();
}

template <int P>
int amx_linear(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values, const uint8_t* index_bytes,
               int64_t out_features, int n, const uint16_t* bias, uint16_t* y, int nthreads) {
  const int64_t rows = std::min<int64_t>(16, batch), plane = round_up(batch, rows) * k;
  uint16_t* xp = static_cast<uint16_t*>(std::aligned_alloc(64, static_cast<size_t>(plane * 2 * P)));
  if (!xp) return NMKERN_ENOMEM;
  pack_x<P>(x, batch, k, rows, plane, xp, nthreads);
  const AmxArgs a{xp, batch, k, rows, plane, values, index_bytes, out_features, bias, y};
  const int rc = n == 1 ? run_amx<1, P>(a, nthreads) : run_amx<2, P>(a, nthreads);
  std::free(xp);
  return rc;
}

}  // namespace

bool amx_bf16_usable() { return amx_permitted(); }

int nm_linear_amx(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values, const uint8_t* index_bytes,
                  int64_t out_features, int n, bool f16, const uint16_t* bias, uint16_t* y, int nthreads) {
  return f16 ? amx_linear<2>(x, batch, k, values, index_bytes, out_features, n, bias, y, nthreads)
             : amx_linear<1>(x, batch, k, values, index_bytes, out_features, n, bias, y, nthreads);
}
#else
bool amx_bf16_usable() { return false; }

int nm_linear_amx(const uint16_t*, int64_t, int64_t, const uint16_t*, const uint8_t*, int64_t, int, bool,
                  const uint16_t*, uint16_t*, int) {
  return NMKERN_EUNSUPPORTED;
}
#endif

bool amx_nm_shape_supported(int64_t k, int n, int m) { return m == 4 && (n == 1 || n == 2) && k % 32 == 0; }

}  // namespace nmkern

extern "C" int nmkern_cpu_supports_amx_bf16(void) { return nmkern::amx_bf16_usable() ? 1 : 0; }
