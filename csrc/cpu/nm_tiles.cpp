// Between packed N:M rows (nmkern_nm_pack's values and index words) and the CPU kernels' row-tile layout
// (nmkern_cpu.h), both ways, without a dense temporary.
//
// Why native: a packed layer that runs the CPU kernel keeps the row-tile layout as its one resident form and
// gets its packed indices back from it when saved (issue #14, item 6). The torch references
// (nmkern/reference/cpu_layouts.py) spread every slot's index into an int64 (8 bytes a kept weight, 2x the
// fp32 values) and took 34 ms + 14 ms of a 2048x2048 2:4 layer's 105 ms pack on a 2-core AMD EPYC.
#include <algorithm>
#include <atomic>
#include <cstring>

#include "nmkern_cpu.h"
#include "parallel.h"

namespace nmkern {
namespace {

struct TileShape {
  int64_t rows, slots, words_per_row;  // slots: J = k / m * n a row
  int n, m, bits, per_word;            // per_word = 32 / bits slots a word
  int64_t tiles() const { return (rows + 7) / 8; }
};

// The `bits`-byte little-endian field of slot j of tile t (8 lanes of `bits` bits).
inline uint32_t read_field(const uint8_t* index, const TileShape& s, int64_t t, int64_t j) {
  uint32_t field = 0;
  const uint8_t* p = index + (t * s.slots + j) * s.bits;
  for (int b = 0; b < s.bits; ++b) field |= static_cast<uint32_t>(p[b]) << (8 * b);
  return field;
}

// Tile t from packed rows; false when a packed position is >= m (a corrupt buffer: the kernels would read x
// outside the group). Rows past the last one (padding) get zero values and positions j % n.
template <typename Word>
bool tile_from_packed(const Word* values, const uint32_t* words, const TileShape& s, int64_t t, Word* tile_values,
                      uint8_t* index) {
  const uint32_t mask = (1u << s.bits) - 1u;
  bool ok = true;
  for (int64_t j = 0; j < s.slots; ++j) {
    uint32_t field = 0;
    for (int l = 0; l < 8; ++l) {
      const int64_t r = t * 8 + l;
      uint32_t pos = static_cast<uint32_t>(j % s.n);
      Word value = 0;
      if (r < s.rows) {
        pos = (words[r * s.words_per_row + j / s.per_word] >> (j % s.per_word * s.bits)) & mask;
        value = values[r * s.slots + j];
      }
      ok &= pos < static_cast<uint32_t>(s.m);
      tile_values[(t * s.slots + j) * 8 + l] = value;
      field |= pos << (l * s.bits);
    }
    uint8_t* p = index + (t * s.slots + j) * s.bits;
    for (int b = 0; b < s.bits; ++b) p[b] = static_cast<uint8_t>(field >> (8 * b));
  }
  return ok;
}

void words_from_tile(const uint8_t* index, const TileShape& s, int64_t t, uint32_t* words) {
  const uint32_t mask = (1u << s.bits) - 1u;
  const int64_t r0 = t * 8, r1 = std::min(s.rows, r0 + 8);
  std::memset(words + r0 * s.words_per_row, 0, sizeof(uint32_t) * (r1 - r0) * s.words_per_row);
  for (int64_t j = 0; j < s.slots; ++j) {
    const uint32_t field = read_field(index, s, t, j);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t pos = (field >> ((r - r0) * s.bits)) & mask;
      words[r * s.words_per_row + j / s.per_word] |= pos << (j % s.per_word * s.bits);
    }
  }
}

// The shape, or false for bad scalars (the entry points then return NMKERN_EBADARG without touching memory).
bool tile_shape(int64_t rows, int64_t k, int n, int m, int64_t words_per_row, TileShape& s) {
  if (rows < 1 || k < 1 || m < 2 || m > 16 || n < 1 || n >= m || k % m) return false;
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  s = TileShape{rows, k / m * n, words_per_row, n, m, bits, 32 / bits};
  return words_per_row == (s.slots + s.per_word - 1) / s.per_word;
}

}  // namespace
}  // namespace nmkern

extern "C" int nmkern_nm_tiles_from_packed(const void* values, const int32_t* words, int elem_bytes, int64_t rows,
                                           int64_t k, int n, int m, int64_t words_per_row, void* tile_values,
                                           uint8_t* index_bytes, int nthreads) {
  nmkern::TileShape s;
  if (!values || !words || !tile_values || !index_bytes || (elem_bytes != 2 && elem_bytes != 4) ||
      !nmkern::tile_shape(rows, k, n, m, words_per_row, s))
    return NMKERN_EBADARG;
  std::atomic<bool> ok{true};
  auto run = [&](auto word) {
    using Word = decltype(word);
    nmkern::parallel_for(s.tiles(), 16, std::max(1, nthreads), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        if (!nmkern::tile_from_packed(static_cast<const Word*>(values), reinterpret_cast<const uint32_t*>(words), s,
                                      t, static_cast<Word*>(tile_values), index_bytes))
          ok.store(false, std::memory_order_relaxed);
    });
  };
  if (elem_bytes == 4)
    run(uint32_t{});
  else
    run(uint16_t{});
  std::memset(index_bytes + s.tiles() * s.slots * s.bits, 0, 4);  // the pad a 32-bit load of the last slot reads
  return ok.load() ? NMKERN_OK : NMKERN_EBADARG;
}

extern "C" int nmkern_nm_words_from_tiles(const uint8_t* index_bytes, int64_t rows, int64_t k, int n, int m,
                                          int64_t words_per_row, int32_t* words, int nthreads) {
  nmkern::TileShape s;
  if (!index_bytes || !words || !nmkern::tile_shape(rows, k, n, m, words_per_row, s)) return NMKERN_EBADARG;
  nmkern::parallel_for(s.tiles(), 16, std::max(1, nthreads), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      nmkern::words_from_tile(index_bytes, s, t, reinterpret_cast<uint32_t*>(words));
  });
  return NMKERN_OK;
}
