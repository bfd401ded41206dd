// Element types of the nmkern CPU kernels (internal): fp32, bf16 and fp16 storage,
// always computed in fp32.
//
// Each trait E has T (the storage type: float or the raw 16 bits), to_f32 /
// from_f32 for one value (from_f32 rounds to nearest even, NaN stays NaN) and, in
// the SIMD builds, load8 / load4 (8 / 4 values widened to a __m256 / __m128) and
// bcast (one value broadcast to a __m256).
//   bf16 -> fp32 is the 16-bit pattern shifted up by 16 (vpmovzxwd + vpslld);
//   fp16 -> fp32 is F16C vcvtph2ps in the SIMD builds (every x86 CPU with AVX2 has
//   F16C, and the loader only picks those libraries on CPUs that have AVX2 + FMA),
//   a portable bit conversion in the generic build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(NMKERN_ISA_AVX2) || defined(NMKERN_ISA_AVX512)
#include <immintrin.h>
#define NMKERN_HAVE_F16C 1
#endif

namespace nmkern {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN instead of rounding into Inf.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 <-> binary32 without F16C (the generic library).
inline float f16_to_f32_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {                                                         // zero / subnormal: man * 2^-24
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t f32_to_f16_portable(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);  // NaN, quiet
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to Inf (and Inf itself)
  if (a >= 0x38800000u) {                       // normal half: rebias, round the 13 dropped bits
    const uint32_t r = a - (112u << 23);
    return sign | static_cast<uint16_t>((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  // Subnormal half (or zero): the value in units of 2^-24 (exact scaling), rounded to even.
  const float units = bits_to_f32(a) * 16777216.0f;
  return sign | static_cast<uint16_t>(std::nearbyint(units));
}

struct F32 {
  using T = float;
  static constexpr bool kIsF32 = true;
  static float to_f32(float v) { return v; }
  static float from_f32(float v) { return v; }
#ifdef NMKERN_HAVE_F16C
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static __m128 load4(const float* p) { return _mm_loadu_ps(p); }
  static __m256 bcast(const float* p) { return _mm256_broadcast_ss(p); }
#endif
};

struct BF16 {
  using T = uint16_t;
  static constexpr bool kIsF32 = false;
  static float to_f32(uint16_t v) { return bf16_to_f32(v); }
  static uint16_t from_f32(float v) { return f32_to_bf16(v); }
#ifdef NMKERN_HAVE_F16C
  static __m256 load8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m128 load4(const uint16_t* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
  static __m256 bcast(const uint16_t* p) { return _mm256_set1_ps(bf16_to_f32(*p)); }
#endif
};

struct F16 {
  using T = uint16_t;
  static constexpr bool kIsF32 = false;
#ifdef NMKERN_HAVE_F16C
  static float to_f32(uint16_t v) { return _cvtsh_ss(v); }
  static uint16_t from_f32(float v) {
    return static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static __m128 load4(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static __m256 bcast(const uint16_t* p) { return _mm256_set1_ps(_cvtsh_ss(*p)); }
#else
  static float to_f32(uint16_t v) { return f16_to_f32_portable(v); }
  static uint16_t from_f32(float v) { return f32_to_f16_portable(v); }
#endif
};

// Whether x[0, count) holds no NaN or Inf: no element whose exponent bits are all ones (fp32 0x7f800000,
// bf16 0x7f80, fp16 0x7c00). Branch-free over blocks of 256 elements (the compiler vectorises the inner
// loop), so a finite input is read once at memory speed.
template <class E>
inline bool all_finite(const typename E::T* x, int64_t count) {
  using U = std::conditional_t<E::kIsF32, uint32_t, uint16_t>;
  const U mask = E::kIsF32 ? U(0x7f800000u) : std::is_same_v<E, BF16> ? U(0x7f80u) : U(0x7c00u);
  for (int64_t i0 = 0; i0 < count; i0 += 256) {
    const int64_t i1 = count - i0 < 256 ? count : i0 + 256;
    U bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      U b;
      std::memcpy(&b, x + i, sizeof(U));  // the bits of one element (no aliasing of a float as an integer)
      bad |= static_cast<U>((b & mask) == mask);
    }
    if (bad) return false;
  }
  return true;
}

// dst[0, count) = src widened to fp32.
template <class E>
inline void widen(const typename E::T* src, float* dst, int64_t count) {
  int64_t i = 0;
#ifdef NMKERN_HAVE_F16C
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, E::load8(src + i));
#endif
  for (; i < count; ++i) dst[i] = E::to_f32(src[i]);
}

}  // namespace nmkern
