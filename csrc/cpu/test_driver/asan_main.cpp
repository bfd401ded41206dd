// Standalone driver for tests/test_cpu_asan.py: builds N:M row-tile and 1xN BSR
// weights in exactly-sized heap buffers (so AddressSanitizer sees any read past
// them), runs every kernel path on odd shapes and compares with a double
// reference. Exit status 0 = all matched; ASan aborts on any bad access.
// Every case also decodes the layout back (nmkern_*_decode, every start row) and must give the dense
// weight bit for bit. Every case runs the fp32, bf16 and fp16 entry points; the half ones get the
// weights, inputs and bias rounded to that dtype (the double reference uses the
// rounded values) and must land within about one output ulp of the reference.
//
// Not part of the library (setup.py compiles csrc/cpu/*.cpp only).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "elem.h"
#include "nmkern_cpu.h"

namespace {

std::mt19937 rng(1234);

float randf() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng); }

// Exactly sized heap copy (std::vector capacity may exceed its size).
template <typename T>
struct Exact {
  T* p;
  size_t n;
  explicit Exact(const std::vector<T>& v) : p(new T[v.empty() ? 1 : v.size()]), n(v.size()) {
    for (size_t i = 0; i < n; ++i) p[i] = v[i];
  }
  ~Exact() { delete[] p; }
};

int failures = 0;

enum Dt { kF32, kBF16, kF16 };
const char* const kDtName[] = {"f32", "bf16", "f16"};

uint16_t to_half(float v, Dt dt) { return dt == kBF16 ? nmkern::f32_to_bf16(v) : nmkern::f32_to_f16_portable(v); }
float from_half(uint16_t h, Dt dt) { return dt == kBF16 ? nmkern::bf16_to_f32(h) : nmkern::f16_to_f32_portable(h); }

// v rounded to dt in place (the values the half kernels see).
void round_to(std::vector<float>& v, Dt dt) {
  if (dt != kF32)
    for (auto& e : v) e = from_half(to_half(e, dt), dt);
}

std::vector<uint16_t> halves(const std::vector<float>& v, Dt dt) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = to_half(v[i], dt);
  return h;
}

// One kernel call on exactly sized copies of x, values and bias in dt; y comes back as fp32.
// call(x, values, bias, y) gets the buffers as void pointers.
template <typename Call>
int run_in(Dt dt, const std::vector<float>& x, const std::vector<float>& values, const std::vector<float>& bias,
           bool with_bias, std::vector<float>& y, Call call) {
  if (dt == kF32) {
    Exact<float> ex(x), ev(values), eb(bias), ey(y);
    const int rc = call(ex.p, values.empty() ? nullptr : ev.p, with_bias ? eb.p : nullptr, ey.p);
    for (size_t i = 0; i < y.size(); ++i) y[i] = ey.p[i];
    return rc;
  }
  Exact<uint16_t> ex(halves(x, dt)), ev(halves(values, dt)), eb(halves(bias, dt)), ey(halves(y, dt));
  const int rc = call(ex.p, values.empty() ? nullptr : ev.p, with_bias ? eb.p : nullptr, ey.p);
  for (size_t i = 0; i < y.size(); ++i) y[i] = from_half(ey.p[i], dt);
  return rc;
}

void compare(const char* what, Dt dt, const std::vector<double>& ref, const std::vector<float>& y) {
  double worst = 0, scale = 1e-6;
  for (size_t i = 0; i < y.size(); ++i) {
    worst = std::max(worst, std::fabs(ref[i] - y[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  // fp32: summation order; bf16 / fp16: one rounding of the result (half an ulp) plus that.
  const double rel = dt == kF32 ? 1e-4 : (dt == kBF16 ? 1.0 / 128 : 1.0 / 1024);
  if (!(worst <= rel * scale + 1e-5)) {
    std::printf("MISMATCH %s: max abs err %g (scale %g)\n", what, worst, scale);
    ++failures;
  }
}

// y (batch, rows) = x (batch, k) @ dense^T + bias, in double.
std::vector<double> reference(const std::vector<float>& dense, const std::vector<float>& x,
                              const std::vector<float>& bias, bool with_bias, int64_t rows, int64_t k, int64_t batch) {
  std::vector<double> ref(batch * rows);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      double s = with_bias ? bias[r] : 0.0;
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(dense[r * k + c]) * x[b * k + c];
      ref[b * rows + r] = s;
    }
  return ref;
}

// The decoders (nmkern_nm_decode / nmkern_bsr_decode) give back `dense` bit for bit: rows [row0, rows) into
// an exactly sized buffer, 1 and 2 threads, in the element size of dt (4 bytes fp32, 2 bytes bf16 / fp16).
template <typename Decode>
void check_decode(const char* kind, Dt dt, const std::vector<float>& dense, int64_t rows, int64_t k, int64_t row0,
                  Decode decode) {
  for (int threads : {1, 2}) {
    bool same = true;
    int rc;
    const int64_t count = (rows - row0) * k;
    if (dt == kF32) {
      Exact<float> out(std::vector<float>(count, NAN));
      rc = decode(4, row0, static_cast<void*>(out.p), threads);
      for (int64_t i = 0; i < count; ++i) same = same && std::memcmp(&out.p[i], &dense[row0 * k + i], 4) == 0;
    } else {
      Exact<uint16_t> out(std::vector<uint16_t>(count, 0xFFFF));
      rc = decode(2, row0, static_cast<void*>(out.p), threads);
      for (int64_t i = 0; i < count; ++i) same = same && out.p[i] == to_half(dense[row0 * k + i], dt);
    }
    if (rc != 0 || !same) {
      std::printf("FAIL %s decode %s rows %ld k %ld from row %ld threads %d: rc %d, %s\n", kind, kDtName[dt],
                  (long)rows, (long)k, (long)row0, threads, rc, same ? "values match" : "values differ");
      ++failures;
    }
  }
}

template <typename T>
std::vector<T> as_elems(const std::vector<float>& v, Dt dt) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = to_half(v[i], dt);
    return out;
  }
}

// rc of a kernel call: must be NMKERN_EUNSUPPORTED when `refuse` (then there is no output to compare), else OK.
bool returned_ok(const char* what, int rc, bool refuse) {
  const int want = refuse ? NMKERN_EUNSUPPORTED : NMKERN_OK;
  if (rc != want) {
    std::printf("FAIL %s: rc %d, expected %d\n", what, rc, want);
    ++failures;
  }
  return rc == NMKERN_OK && !refuse;
}

// Every kernel choice, and AUTO / AMX with the non-finite scan in front (NMKERN_FLAG_CHECK_FINITE).
constexpr int kAlgos[] = {NMKERN_ALGO_AUTO, NMKERN_ALGO_SMALL_BATCH, NMKERN_ALGO_LARGE_BATCH, NMKERN_ALGO_AMX,
                          NMKERN_FLAG_CHECK_FINITE, NMKERN_ALGO_AMX | NMKERN_FLAG_CHECK_FINITE};

// The scan refuses x with a NaN in its last element (NMKERN_ENONFINITE) and writes nothing to y.
template <typename Call>
void check_nan_refused(const char* kind, Dt dt, std::vector<float> x, int64_t y_size, Call call) {
  x.back() = NAN;
  std::vector<float> y(y_size, NAN);
  const int rc = call(x, y, 2, NMKERN_FLAG_CHECK_FINITE);
  const bool untouched = std::all_of(y.begin(), y.end(), [](float v) { return std::isnan(v); });
  if (rc != NMKERN_ENONFINITE || !untouched) {
    std::printf("FAIL %s %s NaN in x: rc %d (expected %d), y untouched %d\n", kind, kDtName[dt], rc,
                NMKERN_ENONFINITE, untouched);
    ++failures;
  }
}

void run_nm(Dt dt, int n, int m, int64_t rows, int64_t k, int64_t batch, bool with_bias) {
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  const int64_t tiles = (rows + 7) / 8, groups = k / m, slots = groups * n;
  std::vector<float> dense(rows * k, 0.0f), values(tiles * slots * 8, 0.0f);
  std::vector<uint8_t> index(tiles * slots * bits + 4, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int lane = 0; lane < 8; ++lane) {
        // choose n distinct ascending in-group positions
        std::vector<int> pos(m);
        for (int i = 0; i < m; ++i) pos[i] = i;
        std::shuffle(pos.begin(), pos.end(), rng);
        pos.resize(n);
        std::sort(pos.begin(), pos.end());
        const int64_t row = t * 8 + lane;
        for (int s = 0; s < n; ++s) {
          const int64_t j = g * n + s;
          const float v = row < rows ? randf() : 0.0f;
          values[(t * slots + j) * 8 + lane] = v;
          if (row < rows) dense[row * k + g * m + pos[s]] = v;
          const int64_t bit = static_cast<int64_t>(lane) * bits;
          const int64_t byte0 = (t * slots + j) * bits;
          uint32_t field = 0;
          for (int b = 0; b < bits; ++b) field |= static_cast<uint32_t>(index[byte0 + b]) << (8 * b);
          field |= static_cast<uint32_t>(pos[s]) << bit;
          for (int b = 0; b < bits; ++b) index[byte0 + b] = static_cast<uint8_t>(field >> (8 * b));
        }
      }
    }
  }
  round_to(values, dt);
  round_to(dense, dt);
  std::vector<float> x(batch * k), bias(rows);
  for (auto& v : x) v = randf();
  for (auto& v : bias) v = randf();
  round_to(x, dt);
  round_to(bias, dt);
  const std::vector<double> ref = reference(dense, x, bias, with_bias, rows, k, batch);
  Exact<uint8_t> ei(index);
  Exact<float> ev32(values);
  Exact<uint16_t> ev16(as_elems<uint16_t>(values, dt));
  for (int64_t row0 = 0; row0 < rows; row0 += 8)
    check_decode("nm", dt, dense, rows, k, row0, [&](int bytes, int64_t r0, void* out, int threads) {
      return nmkern_nm_decode(bytes == 4 ? static_cast<const void*>(ev32.p) : ev16.p, ei.p, bytes, rows, k, n, m, r0,
                              rows, out, threads);
    });
  // NMKERN_ALGO_AMX runs bf16 / fp16 2:4 / 1:4 with K % 32 == 0 where the CPU has AMX, and must refuse the rest.
  const bool amx = dt != kF32 && m == 4 && n <= 2 && k % 32 == 0 && nmkern_cpu_supports_amx_bf16();
  auto call = [&](const std::vector<float>& xs, std::vector<float>& y, int threads, int algo) {
    return run_in(dt, xs, values, bias, with_bias, y, [&](auto* xp, auto* vp, auto* bp, auto* yp) {
      if constexpr (std::is_same_v<std::remove_const_t<std::remove_pointer_t<decltype(xp)>>, float>)
        return nmkern_nm_linear_f32(xp, batch, k, vp, ei.p, rows, n, m, bp, yp, threads, algo);
      else
        return (dt == kBF16 ? nmkern_nm_linear_bf16 : nmkern_nm_linear_f16)(xp, batch, k, vp, ei.p, rows, n, m, bp,
                                                                          yp, threads, algo);
    });
  };
  for (int algo : kAlgos) {
    for (int threads : {1, 2}) {
      std::vector<float> y(batch * rows, NAN);
      const int rc = call(x, y, threads, algo);
      char what[192];
      std::snprintf(what, sizeof what, "nm %s %d:%d rows %ld k %ld batch %ld algo %#x threads %d", kDtName[dt], n, m,
                    (long)rows, (long)k, (long)batch, algo, threads);
      const bool refuse = (algo & ~NMKERN_FLAG_CHECK_FINITE) == NMKERN_ALGO_AMX && !amx;
      if (returned_ok(what, rc, refuse)) compare(what, dt, ref, y);
    }
  }
  check_nan_refused("nm", dt, x, batch * rows, call);
}

template <typename CT>
void run_bsr(Dt dt, int block, int64_t rows, int64_t k, int64_t batch, double keep, bool with_bias) {
  const int64_t br = rows / block;
  std::vector<float> dense(rows * k, 0.0f), values;
  std::vector<int32_t> rowptr(br + 1, 0);
  std::vector<CT> col;
  std::bernoulli_distribution kept(keep);
  for (int64_t r = 0; r < br; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      if (!kept(rng)) continue;
      col.push_back(static_cast<CT>(c));
      for (int i = 0; i < block; ++i) {
        const float v = randf();
        values.push_back(v);
        dense[(r * block + i) * k + c] = v;
      }
    }
    rowptr[r + 1] = static_cast<int32_t>(col.size());
  }
  round_to(values, dt);
  round_to(dense, dt);
  std::vector<float> x(batch * k), bias(rows);
  for (auto& v : x) v = randf();
  for (auto& v : bias) v = randf();
  round_to(x, dt);
  round_to(bias, dt);
  const std::vector<double> ref = reference(dense, x, bias, with_bias, rows, k, batch);
  Exact<int32_t> erp(rowptr);
  Exact<CT> ec(col);
  const CT* cp = col.empty() ? nullptr : ec.p;
  const int64_t nnzb = static_cast<int64_t>(col.size());
  Exact<float> ev32(values);
  Exact<uint16_t> ev16(as_elems<uint16_t>(values, dt));
  for (int64_t row0 = 0; row0 < rows; row0 += block)
    check_decode("1xn", dt, dense, rows, k, row0, [&](int bytes, int64_t r0, void* out, int threads) {
      const void* vp = values.empty() ? nullptr : bytes == 4 ? static_cast<const void*>(ev32.p) : ev16.p;
      return nmkern_bsr_decode(vp, erp.p, cp, sizeof(CT), bytes, rows, k, block, r0, rows, out, threads);
    });
  const bool amx = false;  // NMKERN_ALGO_AMX is N:M only: 1xN must refuse it
  auto call = [&](const std::vector<float>& xs, std::vector<float>& y, int threads, int algo) {
    return run_in(dt, xs, values, bias, with_bias, y, [&](auto* xp, auto* vp, auto* bp, auto* yp) {
      if constexpr (std::is_same_v<std::remove_const_t<std::remove_pointer_t<decltype(xp)>>, float>)
        return nmkern_bsr_linear_f32(xp, batch, k, vp, erp.p, cp, sizeof(CT), nnzb, rows, block, bp, yp, threads,
                                     algo);
      else
        return (dt == kBF16 ? nmkern_bsr_linear_bf16 : nmkern_bsr_linear_f16)(
            xp, batch, k, vp, erp.p, cp, sizeof(CT), nnzb, rows, block, bp, yp, threads, algo);
    });
  };
  for (int algo : kAlgos) {
    for (int threads : {1, 2}) {
      std::vector<float> y(batch * rows, NAN);
      const int rc = call(x, y, threads, algo);
      char what[192];
      std::snprintf(what, sizeof what, "1x%d %s rows %ld k %ld batch %ld algo %#x threads %d col %zu B", block,
                    kDtName[dt], (long)rows, (long)k, (long)batch, algo, threads, sizeof(CT));
      const bool refuse = (algo & ~NMKERN_FLAG_CHECK_FINITE) == NMKERN_ALGO_AMX && !amx;
      if (returned_ok(what, rc, refuse)) compare(what, dt, ref, y);
    }
  }
  check_nan_refused("1xn", dt, x, batch * rows, call);
}

}  // namespace

// nmkern_nm_mask then nmkern_nm_pack on exactly sized buffers: tie-heavy values (-2..2, both zeros), so the
// mask must keep exactly n a group, the masked matrix must pack, unpack to itself, and the unmasked matrix
// (whole groups non-zero) must be refused at its first group.
template <typename Word>
void run_mask_pack(Dt dt, int n, int m, int64_t rows, int64_t k) {
  std::vector<float> w(rows * k);
  for (auto& e : w) e = static_cast<float>(static_cast<int>(randf() * 2.5f));
  w[0] = -0.0f;
  std::vector<Word> bits(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if constexpr (sizeof(Word) == 4) bits[i] = nmkern::f32_to_bits(w[i]);
    else bits[i] = to_half(w[i], dt);
  }
  const int dtype = dt == kF32 ? NMKERN_DTYPE_F32 : (dt == kBF16 ? NMKERN_DTYPE_BF16 : NMKERN_DTYPE_F16);
  Exact<Word> ew(bits);
  Exact<uint8_t> keep(std::vector<uint8_t>(w.size(), 7));
  if (!returned_ok("nm_mask", nmkern_nm_mask(ew.p, dtype, rows * k / m, n, m, keep.p, 0, 2), false)) return;
  std::vector<Word> masked(bits);
  for (int64_t g = 0; g < rows * k / m; ++g) {
    int kept = 0;
    for (int i = 0; i < m; ++i) {
      kept += keep.p[g * m + i];
      if (!keep.p[g * m + i]) masked[g * m + i] = 0;
    }
    if (kept != n) ++failures, std::printf("FAIL nm_mask %s %d:%d group %lld keeps %d\n", kDtName[dt], n, m,
                                            static_cast<long long>(g), kept);
  }
  int bits_per = 1;
  while ((1 << bits_per) < m) ++bits_per;
  const int64_t slots = k / m * n, per_word = 32 / bits_per, words = (slots + per_word - 1) / per_word;
  Exact<Word> em(masked), values(std::vector<Word>(rows * slots));
  Exact<int32_t> idx(std::vector<int32_t>(rows * words));
  int64_t first = 0;
  const int elem = static_cast<int>(sizeof(Word));
  if (!returned_ok("nm_pack", nmkern_nm_pack(em.p, elem, rows, k, n, m, values.p, idx.p, words, &first, 2), false))
    return;
  std::vector<Word> back(rows * k, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < slots; ++s) {
      const uint32_t word = static_cast<uint32_t>(idx.p[r * words + s / per_word]);
      const int64_t pos = (word >> (s % per_word * bits_per)) & ((1u << bits_per) - 1);
      back[r * k + s / n * m + pos] = values.p[r * slots + s];
    }
  const bool same = first == -1 && std::equal(back.begin(), back.end(), masked.begin(), [](Word a, Word b) {
    return static_cast<Word>(a << 1) == static_cast<Word>(b << 1);  // a dropped -0.0 comes back as +0.0
  });
  if (!same) ++failures, std::printf("FAIL nm_pack %s %d:%d round trip (first %lld)\n", kDtName[dt], n, m,
                                     static_cast<long long>(first));
  // The row-tile layout from the packed rows must decode to the masked matrix and give the words back.
  const int64_t tiles = (rows + 7) / 8;
  Exact<Word> tile_values(std::vector<Word>(tiles * slots * 8));
  Exact<uint8_t> index(std::vector<uint8_t>(tiles * slots * bits_per + 4));
  Exact<int32_t> words_back(std::vector<int32_t>(rows * words));
  Exact<Word> decoded(std::vector<Word>(rows * k));
  const bool tiled =
      returned_ok("nm_tiles_from_packed", nmkern_nm_tiles_from_packed(values.p, idx.p, elem, rows, k, n, m, words,
                                                                      tile_values.p, index.p, 2), false) &&
      returned_ok("nm_words_from_tiles", nmkern_nm_words_from_tiles(index.p, rows, k, n, m, words, words_back.p, 2),
                  false) &&
      returned_ok("nm_decode", nmkern_nm_decode(tile_values.p, index.p, elem, rows, k, n, m, 0, rows, decoded.p, 2),
                  false);
  if (!tiled || !std::equal(idx.p, idx.p + rows * words, words_back.p) ||
      !std::equal(decoded.p, decoded.p + rows * k, back.begin()))
    ++failures, std::printf("FAIL nm_tiles %s %d:%d rows %lld\n", kDtName[dt], n, m, static_cast<long long>(rows));
  std::vector<Word> dense(rows * k, static_cast<Word>(dt == kF32 ? 0x3f800000u : to_half(1.0f, dt)));
  Exact<Word> ed(dense);
  nmkern_nm_pack(ed.p, elem, rows, k, n, m, values.p, idx.p, words, &first, 2);
  if (first != 0) ++failures, std::printf("FAIL nm_pack %s %d:%d overfull at %lld\n", kDtName[dt], n, m,
                                          static_cast<long long>(first));
}

int main() {
  std::printf("isa %s amx %d\n", nmkern_cpu_isa(), nmkern_cpu_supports_amx_bf16());
  const int nm_cases[][2] = {{2, 4}, {1, 4}, {1, 2}, {2, 3}, {3, 8}, {5, 16}, {7, 12}};
  // {21, 64, 70}: more than 64 rows, so AMX takes its strip path; {9, 96, 3}: its fused path. {11, 52, 2}: 1:4
  // with 13 groups, so the bf16 two-slot small-batch kernel ends on one slot alone (at the buffer's end).
  const int64_t shapes[][3] = {{13, 48, 1}, {9, 96, 3}, {17, 48, 26}, {5, 144, 49}, {8, 48, 7}, {21, 64, 70},
                               {11, 52, 2}};
  for (Dt dt : {kF32, kBF16, kF16}) {
    for (auto& nm : nm_cases)
      for (auto& s : shapes) {
        const int64_t k = (s[1] + nm[1] - 1) / nm[1] * nm[1];
        run_nm(dt, nm[0], nm[1], s[0], k, s[2], (s[0] + s[2]) % 2 == 0);
      }
    for (int block : {1, 2, 3, 4, 8, 16}) {
      run_bsr<uint16_t>(dt, block, block * 3, 37, 1, 0.3, true);
      run_bsr<uint16_t>(dt, block, block * 5, 61, 7, 0.5, false);
      run_bsr<uint16_t>(dt, block, block * 2, 29, 50, 0.25, true);
      run_bsr<int32_t>(dt, block, block * 3, 45, 26, 0.4, false);
    }
    run_bsr<uint16_t>(dt, 4, 8, 16, 3, 0.0, true);  // no blocks at all
    for (auto& nm : nm_cases)
      for (int64_t rows : {1, 7, 300}) {
        if (dt == kF32)
          run_mask_pack<uint32_t>(dt, nm[0], nm[1], rows, nm[1] * 5);
        else
          run_mask_pack<uint16_t>(dt, nm[0], nm[1], rows, nm[1] * 5);
      }
  }
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
