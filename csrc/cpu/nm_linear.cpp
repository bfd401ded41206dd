// N:M sparse linear (fp32, bf16, fp16): y = x @ W^T + bias with W in the row-tile
// layout of nmkern_cpu.h (8 rows interleaved per slot, ceil(log2 m)-bit in-group
// indices). Every kernel is templated on the element type E (elem.h) and
// accumulates in fp32; half x is widened to fp32 once (small batch: a K-float row
// copy; large batch: while transposing into panels), half weights are widened as
// they are read (small batch: one 8-value load + vpmovzxwd/vpslld or vcvtph2ps,
// so the kernel streams half the bytes of fp32) or per work chunk into an L2-sized
// fp32 scratch (large batch, where each weight is reused by every panel).
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
#include <atomic>
#include <type_traits>

#include "common.h"
#include "nmkern_cpu.h"

// Software prefetch distance (bytes) on the small-batch kernel's value stream.
// Measured at 4096x4096 2:4 batch 1, 2 threads, interleaved with dense F.linear:
// AVX2 build, 2-core AMD EPYC: ratio 0.79 / 0.81 without, 0.64 / 0.62 with 512 B (shared machine, two runs
// each). AVX-512 build, 2-core Xeon (AMX), 20 such layers called in turn (cold): fp32 0.65 / 0.65 with 0 and
// 512 B, 0.65 with 1 KiB, 0.60-0.61 with 2, 4 and 8 KiB; bf16 0.63 -> 0.59 with 2 KiB; warm layers (1024 and
// 4096 at 1 and 4 rows, 576 at 1 row) equal or better with 2 KiB.
#ifndef NMKERN_PREFETCH
#ifdef NMKERN_ISA_AVX512
#define NMKERN_PREFETCH 2048
#else
#define NMKERN_PREFETCH 512
#endif
#endif

namespace nmkern {
namespace {

template <class E>
struct NMArgs {
  using T = typename E::T;
  const T* x;
  int64_t batch, k;
  const T* values;
  const uint8_t* index_bytes;
  int64_t out_features;
  int n, m, bits;
  const T* bias;
  T* y;
  int nthreads;
  int64_t tiles() const { return ceil_div(out_features, 8); }
  int64_t slots() const { return k / m * n; }
  int64_t groups() const { return k / m; }
};

// Writes 8 rows (tile t) of output column c from acc[8], skipping padded rows.
template <class E>
inline void store_tile_column(const NMArgs<E>& a, int64_t t, int64_t c, const float* acc) {
  const int64_t r0 = t * 8;
  const int64_t rows = std::min<int64_t>(8, a.out_features - r0);
  typename E::T* yc = a.y + c * a.out_features + r0;
  for (int64_t l = 0; l < rows; ++l) yc[l] = E::from_f32(acc[l] + (a.bias ? E::to_f32(a.bias[r0 + l]) : 0.0f));
}

// ---------------------------------------------------------------- portable path
template <class E>
[[maybe_unused]] int nm_linear_generic(const NMArgs<E>& a) {
  const WidenedRows<E> x(a.x, a.batch * a.k);
  if (!x.p) return NMKERN_ENOMEM;
  const int64_t J = a.slots();
  const uint32_t mask = (1u << a.bits) - 1u;
  parallel_for(a.tiles(), std::max<int64_t>(1, a.tiles() / (16 * a.nthreads)), a.nthreads,
               [&](int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const typename E::T* vt = a.values + t * J * 8;
    const uint8_t* it = a.index_bytes + t * J * a.bits;
    for (int64_t c = 0; c < a.batch; ++c) {
      const float* xc = x.p + c * a.k;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = 0; j < J; ++j) {
        const uint32_t word = load_u32(it + j * a.bits);
        const float* xg = xc + (j / a.n) * a.m;
        for (int l = 0; l < 8; ++l) acc[l] += E::to_f32(vt[j * 8 + l]) * xg[(word >> (l * a.bits)) & mask];
      }
      store_tile_column(a, t, c, acc);
    }
  }
  });
  return NMKERN_OK;
}

#ifdef NMKERN_HAVE_AVX2
// ------------------------------------------------------------ small-batch AVX2
// NT: n at compile time (0 = runtime a.n). NC: batch columns per pass (1..4).
// BIG: m > 8, so a group spans two registers and bit 3 of the index picks one.
// SMALLM: m <= 4: the group's x values are broadcast to both 128-bit lanes and
// the in-lane vpermilps (1 uop, 1-cycle latency on Zen 3) selects with index bits
// [1:0], so no masking is needed; larger m uses the cross-lane vpermps.
// ACC independent accumulator chains per column hide the 4-cycle FMA latency.
template <class E, int NT, int NC, bool BIG, bool SMALLM = false>
void nm_small_tile(const NMArgs<E>& a, const float* xp, int64_t xstride, int64_t t, int64_t c0) {
  constexpr int ACC = NT == 0 ? 1 : (NC == 1 ? 4 : (NC == 2 ? 2 : 1));
  constexpr int UG = NT == 0 ? 1 : std::max(1, ACC / NT);  // groups per unrolled step
  const int n = NT > 0 ? NT : a.n;
  const int m = a.m, bits = a.bits;
  const int64_t J = a.slots(), G = a.groups();
  const typename E::T* vt = a.values + t * J * 8;
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
      for (int p = 0; p < n * 8 * static_cast<int>(sizeof(typename E::T)); p += 64) _mm_prefetch(pv + p, _MM_HINT_T0);
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
      const __m256 w = E::load8(vt + j * 8);
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

// Calls tile(std::integral_constant<int, NC>, c0) over the batch in blocks of NC = 4 columns, then the 1-3 left.
template <class Tile>
inline void for_column_blocks(int64_t batch, Tile&& tile) {
  int64_t c = 0;
  for (; c + 4 <= batch; c += 4) tile(std::integral_constant<int, 4>{}, c);
  switch (batch - c) {
    case 3: tile(std::integral_constant<int, 3>{}, c); break;
    case 2: tile(std::integral_constant<int, 2>{}, c); break;
    case 1: tile(std::integral_constant<int, 1>{}, c); break;
    default: break;
  }
}

template <class E, int NT, bool BIG, bool SMALLM>
void nm_small_tile_columns(const NMArgs<E>& a, const float* xp, int64_t xstride, int64_t t) {
  for_column_blocks(a.batch, [&](auto nc, int64_t c) {
    nm_small_tile<E, NT, decltype(nc)::value, BIG, SMALLM>(a, xp + c * xstride, xstride, t, c);
  });
}

// bf16 2:4 and 1:4 (m = 4, 2-bit indices) take two slots per step. Slots j and j+1 are 16 contiguous bf16
// values (32 bytes) and 4 contiguous index bytes, so one 32-byte load and one 32-bit word serve 16 kept
// weights. Read as dwords, the 16 values widen without vpmovzxwd: shifted up by 16 they are the even rows
// (rows 0, 2, 4, 6 of slot j in dwords 0-3, of slot j+1 in dwords 4-7), masked to the high half the odd
// rows. The index word shifted by 4 * lane (+ 2 for the odd rows) puts each row's 2 bits where vpermilps
// reads them; it picks within each 128-bit half, which holds x of slot j's group in the low half and of
// slot j+1's in the high one (2:4: one group, broadcast; 1:4: groups g and g+1, one 8-float load). Per 16
// kept weights that is 5 shift/shuffle uops where two one-slot steps issue 8 (vpmovzxwd, vpslld, vpsrlvd,
// vpermilps each), on the two vector pipes of Zen 3 that run them. AVX2 build, 2-core AMD EPYC (Zen 3), one
// thread, against the one-slot path in the same process: 1 row, 2:4 0.81-0.92x (4096x4096, 576x576, 1536x576,
// 576x1536, 384x384, 1536x384), 1:4 0.72-0.86x; 4 rows 1:4 0.68-0.84x; 2:4 at 2-8 rows 0.94-1.08x (noise).
// Measured there only, so the AVX-512 build keeps the one-slot path.
#ifdef NMKERN_ISA_AVX512
constexpr bool kBf16Pairs = false;
#else
constexpr bool kBf16Pairs = true;
#endif

template <int NT, int NC>
void nm_small_tile_bf16_pairs(const NMArgs<BF16>& a, const float* xp, int64_t xstride, int64_t t, int64_t c0) {
  static_assert(NT == 1 || NT == 2, "2:4 and 1:4 only");
  const int64_t J = a.slots();
  const uint16_t* vt = a.values + t * J * 8;
  const uint8_t* it = a.index_bytes + t * J * 2;
  const __m256i shift_even = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i shift_odd = _mm256_add_epi32(shift_even, _mm256_set1_epi32(2));
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  constexpr int ACC = NC == 1 ? 2 : 1;  // at one column, 2 x 2 chains hide the 4-cycle FMA latency
  __m256 even[ACC][NC], odd[ACC][NC];
  for (int q = 0; q < ACC; ++q)
    for (int c = 0; c < NC; ++c) even[q][c] = odd[q][c] = _mm256_setzero_ps();

  // LAST: slot j alone (1:4 with an odd group count): its partner's half gets zero weights and zero x.
  auto pair = [&](auto last, int64_t j, int q) __attribute__((always_inline)) {
    constexpr bool LAST = decltype(last)::value;
#if NMKERN_PREFETCH > 0
    if (!LAST) _mm_prefetch(reinterpret_cast<const char*>(vt + j * 8) + NMKERN_PREFETCH, _MM_HINT_T0);
#endif
    const float* xg = xp + j / NT * 4;
    const __m256i word = _mm256_set1_epi32(static_cast<int>(load_u32(it + j * 2)));
    const __m256i iv_even = _mm256_srlv_epi32(word, shift_even), iv_odd = _mm256_srlv_epi32(word, shift_odd);
    const __m256i v = LAST ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vt + j * 8)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vt + j * 8));
    const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(v, high_half));
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const float* xc = xg + c * xstride;
      const __m256 x = LAST ? _mm256_zextps128_ps256(_mm_loadu_ps(xc))
                       : NT == 2 ? _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xc)) : _mm256_loadu_ps(xc);
      even[q][c] = _mm256_fmadd_ps(w_even, _mm256_permutevar_ps(x, iv_even), even[q][c]);
      odd[q][c] = _mm256_fmadd_ps(w_odd, _mm256_permutevar_ps(x, iv_odd), odd[q][c]);
    }
  };

  int64_t j = 0;
  for (; j + 2 * ACC <= J; j += 2 * ACC) {
#pragma GCC unroll 2
    for (int q = 0; q < ACC; ++q) pair(std::false_type{}, j + 2 * q, q);
  }
  for (; j + 2 <= J; j += 2) pair(std::false_type{}, j, 0);
  if (j < J) pair(std::true_type{}, j, 0);

  for (int c = 0; c < NC; ++c) {
    __m256 e = even[0][c], o = odd[0][c];
    for (int q = 1; q < ACC; ++q) e = _mm256_add_ps(e, even[q][c]), o = _mm256_add_ps(o, odd[q][c]);
    const __m128 rows_even = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));  // 0 2 4 6
    const __m128 rows_odd = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));   // 1 3 5 7
    alignas(16) float out[8];
    _mm_store_ps(out, _mm_unpacklo_ps(rows_even, rows_odd));
    _mm_store_ps(out + 4, _mm_unpackhi_ps(rows_even, rows_odd));
    store_tile_column(a, t, c0 + c, out);
  }
}

template <class E, int NT>
int nm_small_dispatch(const NMArgs<E>& a) {
  // Padded copy of x: the 8-wide loads of the last group (16-wide for m > 8) may
  // run up to 16 floats past K. Half x is widened here, once per call.
  const int64_t xstride = round_up(a.k + 16, 16);
  FloatBuf xp(a.batch * xstride);
  if (!xp.p) return NMKERN_ENOMEM;
  for (int64_t c = 0; c < a.batch; ++c) widen<E>(a.x + c * a.k, xp.p + c * xstride, a.k);
  const bool big = a.m > 8;
  // Dynamic chunks of tiles: on a shared machine a descheduled thread then holds
  // back one chunk, not half of the rows.
  const int64_t chunk = std::max<int64_t>(1, a.tiles() / (16 * a.nthreads));
  parallel_for(a.tiles(), chunk, a.nthreads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if constexpr (kBf16Pairs && std::is_same_v<E, BF16> && (NT == 1 || NT == 2)) {
        if (a.m == 4) {
          for_column_blocks(a.batch, [&](auto nc, int64_t c) {
            nm_small_tile_bf16_pairs<NT, decltype(nc)::value>(a, xp.p + c * xstride, xstride, t, c);
          });
          continue;
        }
      }
      if (big)
        nm_small_tile_columns<E, NT, true, false>(a, xp.p, xstride, t);
      else if (a.m <= 4)
        nm_small_tile_columns<E, NT, false, true>(a, xp.p, xstride, t);
      else
        nm_small_tile_columns<E, NT, false, false>(a, xp.p, xstride, t);
    }
  });
  return NMKERN_OK;
}

// ------------------------------------------------------------ large-batch AVX2
// Calls f(std::integral_constant<int, NT>, std::integral_constant<int, BITS>): n at compile time for 1, 2 and 4
// (NT 0: runtime), and for 2:4 / 1:4 the 2-bit index width too (BITS 0: runtime), which the large-batch kernels
// need to decode indices without shifts by a register (see nm_large_rows_zmm).
template <class F>
inline void with_compile_time_n_bits(int n, int bits, F&& f) {
  using std::integral_constant;
  if (bits == 2 && n == 1) return f(integral_constant<int, 1>{}, integral_constant<int, 2>{});
  if (bits == 2 && n == 2) return f(integral_constant<int, 2>{}, integral_constant<int, 2>{});
  switch (n) {
    case 1: return f(integral_constant<int, 1>{}, integral_constant<int, 0>{});
    case 2: return f(integral_constant<int, 2>{}, integral_constant<int, 0>{});
    case 4: return f(integral_constant<int, 4>{}, integral_constant<int, 0>{});
    default: return f(integral_constant<int, 0>{}, integral_constant<int, 0>{});
  }
}

// Panel width of the N:M large-batch kernel: 48 batch columns = 6 vectors, so a
// 2-row x 6-vector register tile (12 accumulators) amortizes one index decode
// and one broadcast over 6 FMAs; batch tails use 4 rows x <= 3 vectors.
constexpr int kPanelNM = 48;

// R rows (lanes lane0 .. lane0+R-1) of one tile, groups [g0, g1), V vectors of
// batch. NT: n at compile time (0 = runtime n_rt). BITS: the index bit width at compile time (0 = runtime
// bits_rt), as in the AVX-512 build below: 2:4 fp32, 1 thread, Zen 3, against a runtime width in the same
// process: 32 rows 0.87-0.91x (384x384, 1536x384, 384x1536, 2048x2048), 304 rows 0.93-1.0x.
template <int V, int NT, int R, int BITS>
inline void nm_large_rows(const float* __restrict panel, const float* __restrict vt, const uint8_t* __restrict it,
                          int64_t g0, int64_t g1, int n_rt, int m, int bits_rt, int lane0, float* __restrict acc_io) {
  const int n = NT > 0 ? NT : n_rt, bits = BITS > 0 ? BITS : bits_rt;
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

#ifdef __AVX512F__
// The avx512 library: the same kernel with 16-wide vectors, all 8 rows of the tile at once
// (8 x VZ accumulators, VZ <= 3: at most 24 of the 32 zmm registers), so one index word
// decode and one 64-byte x load per FMA serve 16 batch columns instead of 8. Measured at
// 4096x4096 batch 256, 1 thread, min of 7 (Xeon, shared machine), avx2 vs avx512 library:
// bf16 2:4 194 -> 126 ms, 1:4 79 -> 62 ms; fp32 2:4 220 -> 146 ms, 1:4 110 -> 80 ms.
// BITS: the index bit width at compile time (0 = runtime bits_rt). With a runtime width GCC emitted ~7 scalar
// uops per kept weight (shifts by cl, k-register moves) that the FMAs waited on: 2:4 fp32 1536x384 at 32 rows,
// 1 thread, 345 -> 310 us with BITS = 2.
template <int VZ, int NT, int BITS>
inline void nm_large_rows_zmm(const float* __restrict panel, const float* __restrict vt,
                              const uint8_t* __restrict it, int64_t g0, int64_t g1, int n_rt, int m, int bits_rt,
                              float* __restrict acc_io) {
  const int n = NT > 0 ? NT : n_rt, bits = BITS > 0 ? BITS : bits_rt;
  constexpr int W = 16 * VZ, R = 8;
  __m512 acc[R][VZ];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VZ; ++v) acc[r][v] = _mm512_loadu_ps(acc_io + r * W + 16 * v);
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t g = g0; g < g1; ++g) {
    const float* xg = panel + g * m * W;
#pragma GCC unroll 4
    for (int s = 0; s < (NT > 0 ? NT : n); ++s) {
      const int64_t j = g * n + s;
      const uint32_t word = load_u32(it + j * bits);
      const float* wj = vt + j * 8;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float* xr = xg + ((word >> (r * bits)) & mask) * W;
        const __m512 wb = _mm512_set1_ps(wj[r]);
#pragma GCC unroll 3
        for (int v = 0; v < VZ; ++v) acc[r][v] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xr + 16 * v), acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < VZ; ++v) _mm512_storeu_ps(acc_io + r * W + 16 * v, acc[r][v]);
}
#endif

template <int V>
inline void nm_large_tile(const float* panel, const float* vt, const uint8_t* it, int64_t g0, int64_t g1, int n,
                          int m, int bits, float* acc_io) {
#ifdef __AVX512F__
  if constexpr (V % 2 == 0) {  // panel widths 16, 32, 48: whole zmm vectors
    with_compile_time_n_bits(n, bits, [&](auto nt, auto bt) {
      nm_large_rows_zmm<V / 2, decltype(nt)::value, decltype(bt)::value>(panel, vt, it, g0, g1, n, m, bits, acc_io);
    });
    return;
  }
#endif
  constexpr int R = V >= 4 ? 2 : 4;
  with_compile_time_n_bits(n, bits, [&](auto nt, auto bt) {
    for (int lane0 = 0; lane0 < 8; lane0 += R)
      nm_large_rows<V, decltype(nt)::value, R, decltype(bt)::value>(panel, vt, it, g0, g1, n, m, bits, lane0,
                                                                    acc_io + lane0 * 8 * V);
  });
}

using NMLargeTileFn = void (*)(const float*, const float*, const uint8_t*, int64_t, int64_t, int, int, int, float*);
constexpr NMLargeTileFn kNMLargeTile[7] = {nullptr,          nm_large_tile<1>, nm_large_tile<2>, nm_large_tile<3>,
                                           nm_large_tile<4>, nm_large_tile<5>, nm_large_tile<6>};

template <class E>
int nm_large(const NMArgs<E>& a) {
  const int64_t panels = ceil_div(a.batch, kPanelNM);
  FloatBuf xt(panels * a.k * kPanelNM);
  if (!xt.p) return NMKERN_ENOMEM;
  transpose_to_panels<E>(a.x, a.batch, a.k, xt.p, a.nthreads, kPanelNM);

  const int64_t J = a.slots(), G = a.groups(), tiles = a.tiles();
  // Tiles per work chunk: ~128 KiB of packed weight, re-read from L2 for every panel
  // (fp32 bytes: a half chunk is widened into that much scratch once per chunk). With a
  // single panel nothing is re-read and the chunk's tiles share each K block of x in L1, so
  // the chunk grows to 1 MiB (a 4096-wide 2:4 tile is 69 KiB: 128 KiB left one tile per K
  // block; 4096x4096 2:4 bf16 batch 16, 1 thread, AVX-512: 16.6 -> 10.7 ms).
  const int64_t tile_bytes = J * (8 * 4 + a.bits);
  const int64_t budget = panels == 1 ? (1 << 20) : (128 << 10);
  int64_t chunk = std::max<int64_t>(1, budget / std::max<int64_t>(tile_bytes, 1));
  chunk = std::min(chunk, std::max<int64_t>(1, ceil_div(tiles, 4 * a.nthreads)));
  const int64_t chunks = ceil_div(tiles, chunk);
  // K block: 64 inputs x 48 columns x 4 B = 12 KiB of panel stays in L1 while the
  // chunk's tiles run over it.
  const int64_t gblock = std::max(1, 64 / a.m);
  std::atomic<int> err{NMKERN_OK};

  parallel_for(chunks, 1, a.nthreads, [&](int64_t ch_begin, int64_t ch_end) {
    FloatBuf acc(chunk * 8 * kPanelNM);
    FloatBuf wide(E::kIsF32 ? 0 : chunk * J * 8);
    if (!acc.p || !wide.p) {
      err.store(NMKERN_ENOMEM);
      return;
    }
    for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
      const int64_t t0 = ch * chunk, t1 = std::min(tiles, t0 + chunk);
      const float* wv;  // values of tiles [t0, t1) as fp32
      if constexpr (E::kIsF32) {
        wv = a.values + t0 * J * 8;
      } else {
        widen<E>(a.values + t0 * J * 8, wide.p, (t1 - t0) * J * 8);
        wv = wide.p;
      }
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
            fn(panel, wv + (t - t0) * J * 8, a.index_bytes + t * J * a.bits, g0, g1, a.n, a.m, a.bits,
               acc.p + (t - t0) * 8 * W);
        }
        // y column by column: row by row, the stores of one output row run O floats apart, and where O * 4
        // bytes is a multiple of the 4 KiB L1 set period (O = 1536, 6144) a 32-row panel's lines shared one or
        // two L1 sets and evicted each other on every pass (32 rows, 1 thread, 2:4 fp32: 1536x384 620 -> 345
        // us, 6144x96 1727 -> 555 us; 56% of the 6144x96 call was these stores).
        for (int64_t t = t0; t < t1; ++t) {
          const float* tile_acc = acc.p + (t - t0) * 8 * W;
          for (int64_t c = 0; c < width; ++c) {
            float column[8];
            for (int l = 0; l < 8; ++l) column[l] = tile_acc[l * W + c];
            store_tile_column(a, t, b0 + c, column);
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

namespace nmkern {
namespace {

// AUTO runs the AMX kernel from this many rows (bf16 or fp16, where it is usable): at 4096x4096 on a 2-thread
// Xeon bf16 beats the FMA kernels from 8 rows (2:4 0.67 vs 1.33x dense, 1:4 0.51 vs 0.79x; at 4 rows 1:4 loses);
// fp16 ties them at 8 rows (2:4 0.57 both, 1:4 0.40 vs 0.36x) and wins from 16 (0.49 vs 1.12x, 0.33 vs 0.75x).
constexpr int64_t kAmxMinBatch = 8;

template <class E>
int nm_linear_run(const typename E::T* x, int64_t batch, int64_t k, const typename E::T* values,
                  const uint8_t* index_bytes, int64_t out_features, int n, int m, const typename E::T* bias,
                  typename E::T* y, int nthreads, int algo) {
  if (!x || !values || !index_bytes || !y || batch < 1 || k < 1 || out_features < 1) return NMKERN_EBADARG;
  if (m < 2 || m > 16 || n < 1 || n >= m || k % m != 0) return NMKERN_EBADARG;
  const bool check_finite = (algo & NMKERN_FLAG_CHECK_FINITE) != 0;
  algo &= ~NMKERN_FLAG_CHECK_FINITE;
  if (algo < NMKERN_ALGO_AUTO || algo > NMKERN_ALGO_AMX) return NMKERN_EBADARG;
  if (check_finite && !all_finite<E>(x, batch * k)) return NMKERN_ENONFINITE;
  if constexpr (!E::kIsF32) {
    const bool amx = amx_nm_shape_supported(k, n, m) && amx_bf16_usable();
    if (algo == NMKERN_ALGO_AMX && !amx) return NMKERN_EUNSUPPORTED;
    if (algo == NMKERN_ALGO_AMX || (algo == NMKERN_ALGO_AUTO && amx && batch >= kAmxMinBatch))
      return nm_linear_amx(x, batch, k, values, index_bytes, out_features, n, std::is_same_v<E, F16>, bias, y,
                           resolve_threads(nthreads));
  } else if (algo == NMKERN_ALGO_AMX) {
    return NMKERN_EUNSUPPORTED;
  }
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  NMArgs<E> a{x, batch, k, values, index_bytes, out_features, n, m, bits, bias, y, resolve_threads(nthreads)};
#ifdef NMKERN_HAVE_AVX2
  if (algo == NMKERN_ALGO_AUTO) algo = batch <= 8 ? NMKERN_ALGO_SMALL_BATCH : NMKERN_ALGO_LARGE_BATCH;
  if (algo == NMKERN_ALGO_LARGE_BATCH) return nm_large(a);
  switch (n) {
    case 1: return nm_small_dispatch<E, 1>(a);
    case 2: return nm_small_dispatch<E, 2>(a);
    case 4: return nm_small_dispatch<E, 4>(a);
    default: return nm_small_dispatch<E, 0>(a);
  }
#else
  (void)algo;
  return nm_linear_generic(a);
#endif
}

}  // namespace
}  // namespace nmkern

// The C entry points (declared in nmkern_cpu.h), one per element type.
#define NMKERN_NM_LINEAR_ENTRY(SUFFIX, E, T)                                                                       \
  extern "C" int nmkern_nm_linear_##SUFFIX(const T* x, int64_t batch, int64_t k, const T* values,                  \
                                           const uint8_t* index_bytes, int64_t out_features, int n, int m,         \
                                           const T* bias, T* y, int nthreads, int algo) {                          \
    return nmkern::nm_linear_run<nmkern::E>(x, batch, k, values, index_bytes, out_features, n, m, bias, y,        \
                                            nthreads, algo);                                                       \
  }

NMKERN_NM_LINEAR_ENTRY(f32, F32, float)
NMKERN_NM_LINEAR_ENTRY(bf16, BF16, uint16_t)
NMKERN_NM_LINEAR_ENTRY(f16, F16, uint16_t)
