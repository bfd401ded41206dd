// nmkern CPU kernels: plain C ABI, called through ctypes from nmkern/_cpu.py.
//
// Every entry point takes raw pointers plus sizes; nmkern/_cpu.py validates shapes,
// dtypes and contiguity before calling, and the kernels re-check the scalar
// arguments (returning NMKERN_EBADARG instead of touching memory) as a second line.
//
// Packed layouts (built in Python by nmkern/reference/cpu_layouts.py):
//
// N:M "row-tile" layout (n kept of every m along K, m <= 16):
//   rows are cut into tiles of 8 consecutive rows (the last tile zero-padded);
//   J = K / m * n kept slots per row. For tile t, slot j, lane l (row 8t+l):
//     values[(t * J + j) * 8 + l]                      fp32, bf16 or fp16
//     index bits: bits = ceil(log2 m) (1..4); the 8 lanes of slot j of tile t are
//       one little-endian bit field of 8*bits bits starting at byte
//       t * J * bits + j * bits, lane l at bit l * bits; the buffer carries 4
//       trailing pad bytes so a 32-bit load of the last slot stays in bounds.
//   The in-group index of slot j is the kept column minus m * (j / n).
//   Why: one 256-bit load gives one kept weight of 8 rows, and one 32-bit load
//   gives their 8 indices, which vpermps turns into the 8 matching x values.
//
// 1xN block layout (BSR, blocks of N consecutive output rows x 1 input column):
//   rowptr int32 [O/N + 1], col (uint16 when K <= 65536, else int32) [nnzb],
//   values [nnzb][N] (fp32, bf16 or fp16); columns ascending within a block row.
//
// Half precision (the _bf16 / _f16 entry points): x, values, bias and y are all
// 16-bit (raw bf16 / IEEE binary16 bits, uint16_t), in the same layouts; products
// are accumulated in fp32 and y is rounded to nearest even once at the end.
#pragma once

#include <cstdint>

// 2: the _bf16 / _f16 linear entry points. 3: nmkern_nm_decode / nmkern_bsr_decode.
// 4: NMKERN_ALGO_AMX, nmkern_cpu_supports_amx_bf16, NMKERN_EUNSUPPORTED.
// 5: NMKERN_FLAG_CHECK_FINITE, NMKERN_ENONFINITE.
// 6: nmkern_nm_mask, nmkern_nm_pack, nmkern_nm_tiles_from_packed, nmkern_nm_words_from_tiles, NMKERN_DTYPE_*.
#define NMKERN_CPU_ABI_VERSION 6

#define NMKERN_OK 0
#define NMKERN_EBADARG 1
#define NMKERN_ENOMEM 2
#define NMKERN_EUNSUPPORTED 3  // NMKERN_ALGO_AMX asked of a library, CPU, dtype or shape without it
#define NMKERN_ENONFINITE 4    // NMKERN_FLAG_CHECK_FINITE was set and x holds a NaN or an Inf (y not written)

// Kernel choice for the linear entry points.
#define NMKERN_ALGO_AUTO 0
#define NMKERN_ALGO_SMALL_BATCH 1  // x read in (B, K) order; best for batch 1..~8
#define NMKERN_ALGO_LARGE_BATCH 2  // x transposed into (K, batch-tile) panels; batch >= ~8
// bf16 N:M with m = 4, n <= 2, K % 32 == 0 on AMX-BF16 (nm_linear_amx.cpp): the weight decoded per
// 16 output rows into tiles. AUTO picks it from 8 rows where it is usable.
#define NMKERN_ALGO_AMX 3
// OR'ed into algo: scan x first and return NMKERN_ENONFINITE when it holds a NaN or an Inf. Why: a sparse
// kernel never multiplies x by the weights it dropped, so a NaN there would not reach y as it does through
// dense 0 * NaN; the caller then runs the dense op instead. The scan reads x once (B x K elements, 8-32 per
// vector compare), where the caller's own torch reduction cost ~5 us per call even at 1 row.
#define NMKERN_FLAG_CHECK_FINITE 0x100
// Element types, where an entry point takes any of them (nmkern_nm_mask).
#define NMKERN_DTYPE_F32 0
#define NMKERN_DTYPE_BF16 1
#define NMKERN_DTYPE_F16 2

#ifdef __cplusplus
extern "C" {
#endif

int nmkern_cpu_abi_version(void);
// Which instruction set this library was compiled for: "avx512", "avx2" or "generic".
const char* nmkern_cpu_isa(void);
// cpuid: 1 if the running CPU (and OS) support the instruction set, else 0.
int nmkern_cpu_supports_avx2(void);
int nmkern_cpu_supports_avx512(void);
// 1 if this library has the AMX kernel and the CPU and OS let it run (cpuid AMX-TILE and AMX-BF16,
// and Linux granted the tile state to this process: the first call asks for it), else 0.
int nmkern_cpu_supports_amx_bf16(void);
// Threading: 0 = nmkern's work-claiming pool (the initial mode; the caller never waits for
// a worker that has not started), 1 = OpenMP parallel for (what nmkern/_cpu.py picks when
// the library shares torch's OpenMP runtime). Returns 0 or EBADARG.
int nmkern_cpu_set_threading(int mode);
int nmkern_cpu_get_threading(void);

// y (B, O) = x (B, K) @ W^T + bias, W in the N:M row-tile layout above.
// bias may be NULL. nthreads <= 0 uses the OpenMP default.
int nmkern_nm_linear_f32(const float* x, int64_t batch, int64_t k, const float* values, const uint8_t* index_bytes,
                         int64_t out_features, int n, int m, const float* bias, float* y, int nthreads, int algo);

// y (B, O) = x (B, K) @ W^T + bias, W in the 1xN BSR layout above (col_bytes 2 or 4).
int nmkern_bsr_linear_f32(const float* x, int64_t batch, int64_t k, const float* values, const int32_t* rowptr,
                          const void* col, int col_bytes, int64_t nnzb, int64_t out_features, int block,
                          const float* bias, float* y, int nthreads, int algo);

// The same two linears in bf16 and fp16 (fp32 accumulation).
int nmkern_nm_linear_bf16(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values,
                          const uint8_t* index_bytes, int64_t out_features, int n, int m, const uint16_t* bias,
                          uint16_t* y, int nthreads, int algo);
int nmkern_nm_linear_f16(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values,
                         const uint8_t* index_bytes, int64_t out_features, int n, int m, const uint16_t* bias,
                         uint16_t* y, int nthreads, int algo);
int nmkern_bsr_linear_bf16(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values, const int32_t* rowptr,
                           const void* col, int col_bytes, int64_t nnzb, int64_t out_features, int block,
                           const uint16_t* bias, uint16_t* y, int nthreads, int algo);
int nmkern_bsr_linear_f16(const uint16_t* x, int64_t batch, int64_t k, const uint16_t* values, const int32_t* rowptr,
                          const void* col, int col_bytes, int64_t nnzb, int64_t out_features, int block,
                          const uint16_t* bias, uint16_t* y, int nthreads, int algo);

// Dense rows [row0, row1) of a layout above, into out ((row1 - row0) x k, row-major; every element
// written: zeros where the layout keeps nothing). elem_bytes: 4 (fp32) or 2 (bf16 / fp16); the values are
// copied bit for bit. N:M: row0 a multiple of 8 (a tile), row1 <= rows. 1xN: row0 and row1 multiples of
// block; col_bytes 2 or 4 as above. The layout is trusted (nmkern/_cpu.py built or checked it).
int nmkern_nm_decode(const void* values, const uint8_t* index_bytes, int elem_bytes, int64_t rows, int64_t k, int n,
                     int m, int64_t row0, int64_t row1, void* out, int nthreads);
int nmkern_bsr_decode(const void* values, const int32_t* rowptr, const void* col, int col_bytes, int elem_bytes,
                      int64_t rows, int64_t k, int block, int64_t row0, int64_t row1, void* out, int nthreads);

// N:M magnitude mask (nm_mask.cpp): w holds groups x m consecutive elements of dtype (NMKERN_DTYPE_*);
// keep[g * m + i] = 1 for the n largest |w| of group g, else 0: larger first, ties to the lower index,
// every NaN above every number (a stable descending sort's order). flags: NMKERN_FLAG_CHECK_FINITE
// returns NMKERN_ENONFINITE when w holds a NaN or an Inf (keep is still written, in that order).
int nmkern_nm_mask(const void* w, int dtype, int64_t groups, int n, int m, uint8_t* keep, int flags, int nthreads);
// Pack a rows x k N:M-sparse matrix (nm_pack.cpp): each group of m along k keeps its non-zeros plus, when
// it has fewer than n, its lowest-index zeros, ascending; values (rows x k/m*n, elem_bytes 4 or 2, copied
// bit for bit) and int32 words (rows x words_per_row): slot s of a row is bits s % per_word * b of word
// s / per_word, b = ceil(log2 m) bits a slot, per_word = 32 / b. *first_overfull = -1, or the smallest
// row * (k/m) + group of a group holding more than n non-zeros (then values and words are incomplete).
int nmkern_nm_pack(const void* w, int elem_bytes, int64_t rows, int64_t k, int n, int m, void* values,
                   int32_t* words, int64_t words_per_row, int64_t* first_overfull, int nthreads);
// The N:M row-tile layout above from packed rows (nm_tiles.cpp): values (rows x J, elem_bytes 4 or 2) and words
// (rows x words_per_row) as nmkern_nm_pack writes them, into tile_values (tiles x J x 8) and index_bytes
// (tiles x J x bits + 4 zero pad bytes). The last tile's padding rows get zero values and positions j % n.
// NMKERN_EBADARG also when a packed position is >= m (the layout is then unusable).
int nmkern_nm_tiles_from_packed(const void* values, const int32_t* words, int elem_bytes, int64_t rows, int64_t k,
                                int n, int m, int64_t words_per_row, void* tile_values, uint8_t* index_bytes,
                                int nthreads);
// The packed words (rows x words_per_row, unused bits zero) of a row-tile layout's index bytes: the inverse.
int nmkern_nm_words_from_tiles(const uint8_t* index_bytes, int64_t rows, int64_t k, int n, int m,
                               int64_t words_per_row, int32_t* words, int nthreads);
#ifdef __cplusplus
}
#endif
