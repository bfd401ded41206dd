// N:M magnitude mask: in every group of m consecutive elements, keep the n largest |w|.
//
// Why native: the torch reference (nmkern/reference/nm_mask.py) sorts every group with a stable
// descending torch.sort. Packing four 2048x2048 fp32 layers spent 0.6 s of 1.2 s in torch.sort on a
// 2-core AMD EPYC, and CPU training recomputes the mask every step (SR-STE).
//
// The order is the reference's: larger |w| first, ties to the lower index, NaN above every number
// (torch.sort's descending order; all NaNs tie). |w| of an IEEE number (fp32, bf16, fp16) is its bit
// pattern with the sign cleared, and those patterns order as unsigned integers do, Inf below every NaN,
// so one routine per element size serves all three dtypes and needs no float compare.
#include <algorithm>
#include <atomic>

#include "nmkern_cpu.h"
#include "parallel.h"

namespace nmkern {
namespace {

template <typename Word>
struct MagnitudeKey {
  static constexpr Word kSign = static_cast<Word>(Word{1} << (8 * sizeof(Word) - 1));
  // Inf: all exponent bits set, mantissa zero (fp32 0x7f800000, bf16 0x7f80, fp16 0x7c00).
  Word inf;
  explicit MagnitudeKey(int elem_bytes, bool bf16)
      : inf(static_cast<Word>(elem_bytes == 4 ? 0x7f800000u : (bf16 ? 0x7f80u : 0x7c00u))) {}
  // |w| as an unsigned key; every NaN maps to Inf + 1 so NaNs tie as torch.sort has them.
  Word operator()(Word bits) const {
    const Word mag = static_cast<Word>(bits & static_cast<Word>(~kSign));
    return mag > inf ? static_cast<Word>(inf + 1) : mag;
  }
};

// keep[i] = 1 for the n elements of a group that a stable descending sort puts first: rank i by the
// elements above it plus the equal ones before it (m <= 16: at most 256 compares a group). MT: m at
// compile time (0: runtime m_rt), so the loops over a group of 4 or 8 unroll (2048x2048 fp32 2:4, 2 threads,
// Zen 3: 13.5 ms with a runtime m, 5.9 ms with m = 4 at compile time).
template <typename Word, int MT>
void mask_groups(const Word* w, int64_t g0, int64_t g1, int n, int m_rt, const MagnitudeKey<Word>& key,
                 uint8_t* keep, bool& nonfinite) {
  const int m = MT > 0 ? MT : m_rt;
  Word k[16];
  for (int64_t g = g0; g < g1; ++g) {
    const Word* wg = w + g * m;
    for (int i = 0; i < m; ++i) {
      k[i] = key(wg[i]);
      nonfinite |= k[i] >= key.inf;
    }
    for (int i = 0; i < m; ++i) {
      int rank = 0;
      for (int j = 0; j < m; ++j) rank += (k[j] > k[i]) | ((k[j] == k[i]) & (j < i));
      keep[g * m + i] = rank < n;
    }
  }
}

template <typename Word>
int nm_mask(const Word* w, int64_t groups, int n, int m, bool bf16, uint8_t* keep, bool check_finite,
            int nthreads) {
  const MagnitudeKey<Word> key(sizeof(Word), bf16);
  std::atomic<bool> any_nonfinite{false};
  // 4096 groups (16-64 KiB of w) per claim: enough work to amortise a claim, small enough to balance.
  parallel_for(groups, 4096, nthreads, [&](int64_t begin, int64_t end) {
    bool nonfinite = false;
    if (m == 4)
      mask_groups<Word, 4>(w, begin, end, n, m, key, keep, nonfinite);
    else if (m == 8)
      mask_groups<Word, 8>(w, begin, end, n, m, key, keep, nonfinite);
    else
      mask_groups<Word, 0>(w, begin, end, n, m, key, keep, nonfinite);
    if (nonfinite) any_nonfinite.store(true, std::memory_order_relaxed);
  });
  return check_finite && any_nonfinite.load() ? NMKERN_ENONFINITE : NMKERN_OK;
}

}  // namespace
}  // namespace nmkern

extern "C" int nmkern_nm_mask(const void* w, int dtype, int64_t groups, int n, int m, uint8_t* keep, int flags,
                              int nthreads) {
  if (!w || !keep || groups < 1 || m < 2 || m > 16 || n < 1 || n >= m ||
      (dtype != NMKERN_DTYPE_F32 && dtype != NMKERN_DTYPE_BF16 && dtype != NMKERN_DTYPE_F16) ||
      (flags & ~NMKERN_FLAG_CHECK_FINITE))
    return NMKERN_EBADARG;
  nthreads = std::max(1, nthreads);
  const bool check = flags & NMKERN_FLAG_CHECK_FINITE;
  if (dtype == NMKERN_DTYPE_F32)
    return nmkern::nm_mask(static_cast<const uint32_t*>(w), groups, n, m, false, keep, check, nthreads);
  return nmkern::nm_mask(static_cast<const uint16_t*>(w), groups, n, m, dtype == NMKERN_DTYPE_BF16, keep, check,
                         nthreads);
}
