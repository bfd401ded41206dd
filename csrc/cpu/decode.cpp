// Decode the CPU layouts (nmkern_cpu.h) back to dense rows.
//
// Why: a packed layer keeps one resident weight form (issue #14, item 6). When it runs the
// native kernel at some batch sizes and dense GEMM at others (2048x2048 2:4 fp32 on a 2-core
// AMD EPYC: the kernel wins at 1 and 16 rows, dense at 256), the dense path decodes a slice of
// output rows at a time from the CPU layout into a small scratch buffer instead of keeping a
// dense copy of the weight (which would hold 1.9x the 2:4 layout's bytes). The decode only moves
// bits, so one routine per element size serves fp32 (4 bytes) and bf16 / fp16 (2 bytes).
#include <cstring>

#include "nmkern_cpu.h"
#include "parallel.h"

namespace nmkern {
namespace {

// Rows [row0, row1) of an N:M row-tile layout into out ((row1 - row0) x k, zero-filled here).
template <typename Word>
void nm_decode(const Word* values, const uint8_t* index, int64_t k, int n, int m, int64_t row0, int64_t row1,
               Word* out, int nthreads) {
  int bits = 1;
  while ((1 << bits) < m) ++bits;
  const int64_t slots = k / m * n;  // J kept slots per row
  const uint32_t lane_mask = (1u << bits) - 1;
  const int64_t tile0 = row0 / 8, tile1 = (row1 + 7) / 8;
  parallel_for(tile1 - tile0, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t t = tile0 + begin; t < tile0 + end; ++t) {
      const int64_t r_lo = std::max<int64_t>(row0, t * 8), r_hi = std::min<int64_t>(row1, t * 8 + 8);
      std::memset(out + (r_lo - row0) * k, 0, sizeof(Word) * (r_hi - r_lo) * k);
      const Word* tile_values = values + t * slots * 8;
      const uint8_t* tile_index = index + t * slots * bits;
      for (int64_t j = 0; j < slots; ++j) {
        uint32_t field = 0;  // 8 lanes of `bits` bits; the layout pads 4 bytes so this stays in bounds
        std::memcpy(&field, tile_index + j * bits, sizeof(field));
        const int64_t group_col = j / n * m;
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const int lane = static_cast<int>(r - t * 8);
          const uint32_t pos = (field >> (lane * bits)) & lane_mask;
          out[(r - row0) * k + group_col + pos] = tile_values[j * 8 + lane];
        }
      }
    }
  });
}

// Block rows [row0 / block, row1 / block) of a 1xN BSR layout into out ((row1 - row0) x k, zero-filled here).
template <typename Word, typename Col>
void bsr_decode(const Word* values, const int32_t* rowptr, const Col* col, int64_t k, int block, int64_t row0,
                int64_t row1, Word* out, int nthreads) {
  const int64_t br0 = row0 / block, br1 = row1 / block;
  parallel_for(br1 - br0, 1, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t br = br0 + begin; br < br0 + end; ++br) {
      Word* rows = out + (br * block - row0) * k;
      std::memset(rows, 0, sizeof(Word) * block * k);
      for (int64_t b = rowptr[br]; b < rowptr[br + 1]; ++b) {
        const int64_t c = static_cast<int64_t>(col[b]);
        for (int i = 0; i < block; ++i) rows[i * k + c] = values[b * block + i];
      }
    }
  });
}

bool elem_ok(int elem_bytes) { return elem_bytes == 2 || elem_bytes == 4; }

}  // namespace
}  // namespace nmkern

extern "C" int nmkern_nm_decode(const void* values, const uint8_t* index_bytes, int elem_bytes, int64_t rows,
                                int64_t k, int n, int m, int64_t row0, int64_t row1, void* out, int nthreads) {
  if (!values || !index_bytes || !out || !nmkern::elem_ok(elem_bytes) || m < 1 || m > 16 || n < 1 || n > m ||
      k < 1 || k % m || rows < 1 || row0 < 0 || row0 % 8 || row1 <= row0 || row1 > rows)
    return NMKERN_EBADARG;
  nthreads = std::max(1, nthreads);
  if (elem_bytes == 4)
    nmkern::nm_decode(static_cast<const uint32_t*>(values), index_bytes, k, n, m, row0, row1,
                      static_cast<uint32_t*>(out), nthreads);
  else
    nmkern::nm_decode(static_cast<const uint16_t*>(values), index_bytes, k, n, m, row0, row1,
                      static_cast<uint16_t*>(out), nthreads);
  return NMKERN_OK;
}

extern "C" int nmkern_bsr_decode(const void* values, const int32_t* rowptr, const void* col, int col_bytes,
                                 int elem_bytes, int64_t rows, int64_t k, int block, int64_t row0, int64_t row1,
                                 void* out, int nthreads) {
  if (!rowptr || !out || !nmkern::elem_ok(elem_bytes) || (col_bytes != 2 && col_bytes != 4) || block < 1 ||
      k < 1 || rows < 1 || rows % block || row0 < 0 || row0 % block || row1 <= row0 || row1 > rows || row1 % block)
    return NMKERN_EBADARG;
  const int64_t nnzb = rowptr[rows / block];
  if (nnzb > 0 && (!values || !col)) return NMKERN_EBADARG;
  nthreads = std::max(1, nthreads);
  auto run = [&](auto word) {
    using Word = decltype(word);
    const Word* vals = static_cast<const Word*>(values);
    Word* dst = static_cast<Word*>(out);
    if (col_bytes == 2)
      nmkern::bsr_decode(vals, rowptr, static_cast<const uint16_t*>(col), k, block, row0, row1, dst, nthreads);
    else
      nmkern::bsr_decode(vals, rowptr, static_cast<const int32_t*>(col), k, block, row0, row1, dst, nthreads);
  };
  if (elem_bytes == 4)
    run(uint32_t{});
  else
    run(uint16_t{});
  return NMKERN_OK;
}
