// Standalone driver for tests/test_cpu_asan.py: builds N:M row-tile and 1xN BSR
// weights in exactly-sized heap buffers (so AddressSanitizer sees any read past
// them), runs every kernel path on odd shapes and compares with a double
// reference. Exit status 0 = all matched; ASan aborts on any bad access.
//
// Not part of the library (setup.py compiles csrc/cpu/*.cpp only).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

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

void compare(const char* what, const std::vector<double>& ref, const float* y, size_t count) {
  double worst = 0, scale = 1e-6;
  for (size_t i = 0; i < count; ++i) {
    worst = std::max(worst, std::fabs(ref[i] - y[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  if (worst > 1e-4 * scale + 1e-5) {
    std::printf("MISMATCH %s: max abs err %g (scale %g)\n", what, worst, scale);
    ++failures;
  }
}

void run_nm(int n, int m, int64_t rows, int64_t k, int64_t batch, bool with_bias) {
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
  std::vector<float> x(batch * k), bias(rows);
  for (auto& v : x) v = randf();
  for (auto& v : bias) v = randf();
  std::vector<double> ref(batch * rows);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      double s = with_bias ? bias[r] : 0.0;
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(dense[r * k + c]) * x[b * k + c];
      ref[b * rows + r] = s;
    }
  Exact<float> ex(x), ev(values), eb(bias);
  Exact<uint8_t> ei(index);
  for (int algo = 0; algo <= 2; ++algo) {
    std::vector<float> yv(batch * rows, NAN);
    Exact<float> ey(yv);
    for (int threads : {1, 2}) {
      int rc = nmkern_nm_linear_f32(ex.p, batch, k, ev.p, ei.p, rows, n, m, with_bias ? eb.p : nullptr, ey.p,
                                    threads, algo);
      char what[160];
      std::snprintf(what, sizeof what, "nm %d:%d rows %ld k %ld batch %ld algo %d threads %d", n, m, (long)rows,
                    (long)k, (long)batch, algo, threads);
      if (rc != 0) {
        std::printf("FAIL %s: rc %d\n", what, rc);
        ++failures;
      }
      compare(what, ref, ey.p, ey.n);
    }
  }
}

template <typename CT>
void run_bsr(int block, int64_t rows, int64_t k, int64_t batch, double keep, bool with_bias) {
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
  std::vector<float> x(batch * k), bias(rows);
  for (auto& v : x) v = randf();
  for (auto& v : bias) v = randf();
  std::vector<double> ref(batch * rows);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      double s = with_bias ? bias[r] : 0.0;
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(dense[r * k + c]) * x[b * k + c];
      ref[b * rows + r] = s;
    }
  Exact<float> ex(x), ev(values), eb(bias);
  Exact<int32_t> erp(rowptr);
  Exact<CT> ec(col);
  for (int algo = 0; algo <= 2; ++algo) {
    std::vector<float> yv(batch * rows, NAN);
    Exact<float> ey(yv);
    for (int threads : {1, 2}) {
      int rc = nmkern_bsr_linear_f32(ex.p, batch, k, values.empty() ? nullptr : ev.p, erp.p,
                                     col.empty() ? nullptr : ec.p, static_cast<int>(sizeof(CT)),
                                     static_cast<int64_t>(col.size()), rows, block, with_bias ? eb.p : nullptr, ey.p,
                                     threads, algo);
      char what[160];
      std::snprintf(what, sizeof what, "1x%d rows %ld k %ld batch %ld algo %d threads %d col %zu B", block, (long)rows,
                    (long)k, (long)batch, algo, threads, sizeof(CT));
      if (rc != 0) {
        std::printf("FAIL %s: rc %d\n", what, rc);
        ++failures;
      }
      compare(what, ref, ey.p, ey.n);
    }
  }
}

}  // namespace

int main() {
  std::printf("isa %s\n", nmkern_cpu_isa());
  const int nm_cases[][2] = {{2, 4}, {1, 4}, {1, 2}, {2, 3}, {3, 8}, {5, 16}, {7, 12}};
  const int64_t shapes[][3] = {{13, 48, 1}, {9, 96, 3}, {17, 48, 26}, {5, 144, 49}, {8, 48, 7}};
  for (auto& nm : nm_cases)
    for (auto& s : shapes) {
      const int64_t k = (s[1] + nm[1] - 1) / nm[1] * nm[1];
      run_nm(nm[0], nm[1], s[0], k, s[2], (s[0] + s[2]) % 2 == 0);
    }
  for (int block : {1, 2, 3, 4, 8, 16}) {
    run_bsr<uint16_t>(block, block * 3, 37, 1, 0.3, true);
    run_bsr<uint16_t>(block, block * 5, 61, 7, 0.5, false);
    run_bsr<uint16_t>(block, block * 2, 29, 50, 0.25, true);
    run_bsr<int32_t>(block, block * 3, 45, 26, 0.4, false);
  }
  run_bsr<uint16_t>(4, 8, 16, 3, 0.0, true);  // no blocks at all
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
