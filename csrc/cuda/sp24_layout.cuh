// 2:4 sparse layout helpers shared by the CUDA kernels and the host test program.
//
// Everything here is index arithmetic or bit manipulation, marked __host__ __device__
// under nvcc and plain inline under a host C++ compiler, so tests/cuda_host compiles
// this header with g++ and checks it against nmkern's reference on the CPU.
//
// Formats (see nmkern/reference/semi24.py for the Python reference):
//
//   values (N, K/2)   kept elements of every group of 4, in index order.
//   meta   (N, K/16)  int16, nibble per group = idx0 | idx1 << 2 (idx0 < idx1); group g of a
//                     16-column chunk sits at bits 4*(g%4). Stored in CUTLASS's SM80 order:
//                     rows permuted inside each 32-row block (r -> 4*(r%8) + (r%32)/8), the
//                     off-diagonal int16s of every 2x2 block swapped, then
//                     ColumnMajorInterleaved<2> (pairs of int16 columns, column-major).
//
// What mma.sp.m16n8k32 (f16/bf16) wants, from the PTX ISA "Matrix Fragments for sparse
// mma.m16n8k32 with .f16 and .bf16 types": a 32-bit metadata register per thread; with
// sparsity selector s, threads 4*g + 2*s + h (g = lane/4, h = 0 or 1) hold it: bits [15:0]
// cover row g and bits [31:16] row g + 8 of the 16 x 32 A tile, both for columns
// 16*h .. 16*h + 15.
//
// The CUTLASS order puts exactly that word at 32-bit index (k/32) * N + 32*(n/32) + lane
// for lane = 4*g + 2*s + h and the 32-row block starting at n: rows 0..15 of the block use
// selector 0 (lanes 4g, 4g+1), rows 16..31 selector 1 (lanes 4g+2, 4g+3). So one 32-bit
// load per lane feeds both m16 tiles of a 32-row block and no on-device reorder is needed.
// sp24_meta_word_for_lane() derives that index from the layout formula (not the other way
// round), and the host test checks the claim against an ISA-level emulation.

#ifndef NMKERN_SP24_LAYOUT_CUH
#define NMKERN_SP24_LAYOUT_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SP24_HD __host__ __device__ __forceinline__
#else
#define SP24_HD inline
#endif

// `#pragma unroll` for nvcc / NVRTC only: g++ -Wall (the host emulation) rejects unknown pragmas.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SP24_UNROLL _Pragma("unroll")
#else
#define SP24_UNROLL
#endif

namespace sp24 {

// ---- tile geometry shared by kernel and host emulation -------------------------------
constexpr int kBK = 64;               // K elements per pipeline stage (two mma k32 steps)
constexpr int kBKC = kBK / 2;         // compressed (values) columns per stage
constexpr int kSmemPadHalves = 8;     // 16-byte row padding: conflict-free ldmatrix rows
constexpr int kStrideA = kBKC + kSmemPadHalves;  // values tile row stride, halves (80 B)
constexpr int kStrideB = kBK + kSmemPadHalves;   // X tile row stride, halves (144 B)
constexpr int kMetaWordsPerRowStage = kBK / 32;  // 32-bit metadata words per W row per stage
constexpr int kEpiPadFloats = 4;                 // fp32 epilogue tile padding (bank spread)

// ---- 2:4 metadata: logical -> CUTLASS storage ------------------------------------------

// Row position of logical row r after CUTLASS's permutation inside its 32-row block.
SP24_HD int meta_permuted_row(int r) { return (r / 32) * 32 + (r % 8) * 4 + (r % 32) / 8; }

// Flat int16 offset in the stored metadata of logical element (row r, int16 column c).
SP24_HD long long meta_offset(int r, int c, int rows) {
  int dr = meta_permuted_row(r);
  int shift = 0;
  if ((dr & 1) == 0 && (c & 1) == 1) shift = 1;    // top-right of a 2x2 block -> bottom-left
  if ((dr & 1) == 1 && (c & 1) == 0) shift = -1;   // bottom-left -> top-right
  dr += shift;
  int dc = c - shift;
  return (long long)(dc / 2) * (rows * 2) + (long long)dr * 2 + (dc % 2);
}

// 32-bit word index (into meta viewed as uint32) that lane `lane` loads for the mma.sp
// k32 step `k32` (columns 32*k32 .. 32*k32+31) of the 32-row block starting at row0.
// Derived from meta_offset: the word must hold row (row0 + g + 16*s) in its low half and
// row (row0 + g + 8 + 16*s) in its high half, int16 column 2*k32 + h.
SP24_HD long long meta_word_for_lane(int row0, int k32, int lane, int rows) {
  int g = lane >> 2, s = (lane >> 1) & 1, h = lane & 1;
  long long lo = meta_offset(row0 + g + 16 * s, 2 * k32 + h, rows);
  return lo / 2;  // lo is even; its partner (row + 8) lands at lo + 1 by construction
}

// ---- 2:4 pruning and nibbles -------------------------------------------------------------

// Non-zero pattern (bit i <=> element i != 0) -> nibble, or 0xF (itself an invalid mma.sp
// nibble) for > 2 non-zeros. Groups with fewer than two non-zeros use the slots torch's
// converter picks, so the bytes match. The 16-entry table is packed into one 64-bit
// constant (entry p at bits 4p) so that device code needs no local-memory array:
//   pattern 0000 0001 0010 0011 0100 0101 0110 0111 1000 1001 1010 1011 1100 1101 1110 1111
//   nibble     E    8    9    4    E    8    9    F    E    C    D    F    E    F    F    F
constexpr unsigned long long kNibbleTable = 0xFFFEFDCEF98E498EULL;
constexpr unsigned kBadNibble = 0xF;
SP24_HD unsigned nibble_of_pattern(unsigned pattern) {
  return static_cast<unsigned>((kNibbleTable >> (4 * (pattern & 15))) & 0xF);
}

// Element s (0..3) of a group held in four registers, without a dynamically indexed array
// (which would put the group in local memory on the device).
template <class V>
SP24_HD V select4(V v0, V v1, V v2, V v3, unsigned s) {
  return s == 0 ? v0 : (s == 1 ? v1 : (s == 2 ? v2 : v3));
}

// Keep-mask (bit i) of the two largest |a_i| of a group of 4; ties go to the lower index
// (the rank of i counts larger magnitudes and equal ones at lower indices).
SP24_HD unsigned top2_keep_mask(const float mag[4]) {
  unsigned keep = 0;
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
    for (int j = 0; j < 4; ++j) rank += (mag[j] > mag[i]) || (mag[j] == mag[i] && j < i);
    keep |= (rank < 2 ? 1u : 0u) << i;
  }
  return keep;
}

// Prune a group to 2:4 and encode it: returns the nibble; *keep gets the keep mask. The
// pruned group is w_i where kept, +0 elsewhere; its non-zero pattern picks the nibble
// (a kept -0.0 or 0.0 counts as zero, exactly like compress_24(apply_nm(w, 2, 4))).
SP24_HD unsigned prune_group_nibble(const float v[4], unsigned* keep) {
  float mag[4];
  for (int i = 0; i < 4; ++i) mag[i] = v[i] < 0.f ? -v[i] : v[i];
  unsigned k = top2_keep_mask(mag);
  unsigned pattern = 0;
  for (int i = 0; i < 4; ++i) pattern |= (((k >> i) & 1u) && v[i] != 0.f ? 1u : 0u) << i;
  *keep = k;
  return nibble_of_pattern(pattern);
}

// ---- GEMM thread -> data mappings (used by the kernel and by the host emulation) ----------

// ldmatrix.x4 address of a 16x16 (b16) tile: lanes 0-7 address matrix 0 (rows 0-7, cols 0-7),
// 8-15 matrix 1 (rows 8-15, cols 0-7), 16-23 matrix 2 (rows 0-7, cols 8-15), 24-31 matrix 3.
// Thread t then holds in register j: matrix j, row t/4, columns 2*(t%4), 2*(t%4)+1 - the
// compressed A fragment order of mma.sp m16n8k32 (reg0: row g, reg1: row g+8, reg2/3: +8 cols).
SP24_HD int ldsm_a_row(int lane) { return lane & 15; }
SP24_HD int ldsm_a_col(int lane) { return (lane >> 4) * 8; }

// ldmatrix.x4 address for the B operand (X rows = batch, K contiguous): matrix j covers
// batch rows 0-7 and k 8j..8j+7, so register j holds B[k = 8j + 2q, 8j + 2q + 1][n = g].
SP24_HD int ldsm_b_row(int lane) { return lane & 7; }
SP24_HD int ldsm_b_col(int lane) { return (lane >> 3) * 8; }

// Accumulator element i (0..3) of an m16n8 tile: W row (D row) and batch column (D col).
SP24_HD int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
SP24_HD int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Smem offsets (in halves / 32-bit words / floats) inside one pipeline stage.
SP24_HD int smem_a(int row, int col) { return row * kStrideA + col; }
SP24_HD int smem_b(int row, int col) { return row * kStrideB + col; }
SP24_HD int smem_e(int bn, int k32, int row) { return k32 * bn + row; }


// ---- GEMM tile configurations ---------------------------------------------------------------
// Y^T = W X^T on mma.sp: W (N x K, 2:4) is the sparse A operand, X (M x K) the column-major B
// operand. A block owns BN = 32 * WARPS_N rows of W (output features) and BM = WARPS_M * WM
// rows of X (batch); a warp owns 32 W rows (two m16 tiles = one metadata word per lane, sparsity
// selectors 0 and 1) times WM batch rows (WM / 8 n8 tiles).
template <int WARPS_N_, int WARPS_M_, int WM_, int STAGES_>
struct GemmCfg {
  static constexpr int WARPS_N = WARPS_N_, WARPS_M = WARPS_M_, WM = WM_, STAGES = STAGES_;
  static constexpr int BN = 32 * WARPS_N;
  static constexpr int BM = WARPS_M * WM;
  static constexpr int THREADS = 32 * WARPS_N * WARPS_M;
  static constexpr int NT = WM / 8;  // n8 tiles per warp
  static constexpr int A_BYTES = BN * kStrideA * 2;
  static constexpr int B_BYTES = BM * kStrideB * 2;
  static constexpr int E_BYTES = BN * kMetaWordsPerRowStage * 4;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + E_BYTES;  // each part a multiple of 16
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int EPI_STRIDE = BN + kEpiPadFloats;  // fp32 tile [BM][BN + 4]
  static constexpr int EPI_BYTES = BM * EPI_STRIDE * 4;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(WM % 8 == 0, "WM is a multiple of the mma n8 tile");
};

// Decode-sized batches (M <= 64): 64 W rows x 16 batch rows, 2 warps, 4 stages in flight.
using CfgSmall = GemmCfg<2, 1, 16, 4>;
// Large batches: 128 x 128 tiles, 8 warps (4 along W rows x 2 along batch), 3 stages.
using CfgLarge = GemmCfg<4, 2, 64, 3>;

// Byte offsets of stage s's three regions in the dynamic shared memory: [A | B | E] per stage.
// Each region size is a multiple of 16 bytes, so every region starts 16-byte aligned (cp.async
// and ldmatrix need 16-byte aligned shared addresses).
template <class Cfg> SP24_HD int stage_a_bytes(int s) { return s * Cfg::STAGE_BYTES; }
template <class Cfg> SP24_HD int stage_b_bytes(int s) { return s * Cfg::STAGE_BYTES + Cfg::A_BYTES; }
template <class Cfg> SP24_HD int stage_e_bytes(int s) { return s * Cfg::STAGE_BYTES + Cfg::A_BYTES + Cfg::B_BYTES; }

// Operand tags for the stage loader's copy functor.
enum Operand { kOpA = 0, kOpB = 1, kOpE = 2 };

// Issue the 16-byte copies of one pipeline stage (k tile kt) for thread tid. copy(op,
// smem_offset, global_offset, valid): offsets in elements of that operand (halves for A and
// B, 32-bit words for E); valid == false means "fill 16 zero bytes". Global layouts: values
// (N, K/2) halves, x (M, K) halves, meta viewed as uint32 words (word k32 * N + row).
// K % 32 == 0 and N % 32 == 0 (compress_24's constraints), so a chunk is never partly valid.
template <class Cfg, class Copy>
SP24_HD void load_stage(Copy& copy, int tid, int kt, int n0, int m0, int M, int N, int K) {
  constexpr int A_CHUNKS = Cfg::BN * (kBKC / 8);  // 4 chunks of 8 halves per W row
  for (int id = tid; id < A_CHUNKS; id += Cfg::THREADS) {
    int row = id / (kBKC / 8), c = id % (kBKC / 8);
    bool ok = (n0 + row < N) && (kt * kBK + c * 16 < K);
    copy(kOpA, smem_a(row, c * 8), (long long)(n0 + row) * (K / 2) + kt * kBKC + c * 8, ok);
  }
  constexpr int B_CHUNKS = Cfg::BM * (kBK / 8);  // 8 chunks of 8 halves per X row
  for (int id = tid; id < B_CHUNKS; id += Cfg::THREADS) {
    int row = id / (kBK / 8), c = id % (kBK / 8);
    bool ok = (m0 + row < M) && (kt * kBK + c * 8 < K);
    copy(kOpB, smem_b(row, c * 8), (long long)(m0 + row) * K + kt * kBK + c * 8, ok);
  }
  constexpr int E_CHUNKS = kMetaWordsPerRowStage * Cfg::BN / 4;  // 4 words per chunk
  for (int id = tid; id < E_CHUNKS; id += Cfg::THREADS) {
    int k32 = id / (Cfg::BN / 4), w = (id % (Cfg::BN / 4)) * 4;
    int gk32 = kt * kMetaWordsPerRowStage + k32;
    bool ok = (gk32 * 32 < K) && (n0 + w < N);
    copy(kOpE, smem_e(Cfg::BN, k32, w), (long long)gk32 * N + n0 + w, ok);
  }
}

// Compile-time cp.async.wait_group depth, as a tag type (the PTX operand is an immediate).
template <int N>
struct Pending {
  static constexpr int value = N;
};

// The cp.async pipeline of one block, as one thread runs it (the host emulation runs it once for
// the whole block: every call below is block-uniform). Callbacks:
//   load(stage, kt)   issue this thread's 16-byte cp.async copies of k tile kt into slot `stage`
//   commit()          cp.async.commit_group (also when nothing was issued: keeps the count fixed)
//   wait(Pending<N>)  cp.async.wait_group N: all but the newest N committed groups have landed
//   sync()            __syncthreads
//   compute(stage, kt) the mma steps on slot `stage`, which holds k tile kt
// Before iteration `it`, STAGES - 1 + it groups are committed (one per slot load, empty or not);
// waiting until STAGES - 2 remain pending completes the oldest it + 1, i.e. tile it. The barrier
// then (a) publishes every thread's copies of tile it and (b) guarantees all warps left compute
// on slot (it - 1) % STAGES, which the load right after it overwrites with tile it + STAGES - 1.
template <class Cfg, class Load, class Commit, class Wait, class Sync, class Compute>
SP24_HD void run_pipeline(Load& load, Commit& commit, Wait& wait, Sync& sync, Compute& compute, int kt_begin,
                          int nkt) {
  SP24_UNROLL
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < nkt) load(s, kt_begin + s);
    commit();
  }
  for (int it = 0; it < nkt; ++it) {
    wait(Pending<Cfg::STAGES - 2>{});
    sync();
    const int next = it + Cfg::STAGES - 1;
    if (next < nkt) load(next % Cfg::STAGES, kt_begin + next);
    commit();
    compute(it % Cfg::STAGES, kt_begin + it);
  }
  // Drain (the trailing groups are empty) and let every warp finish reading the stages: the
  // epilogue's fp32 tile reuses the same shared memory from byte 0.
  wait(Pending<0>{});
  sync();
}

}  // namespace sp24

#endif  // NMKERN_SP24_LAYOUT_CUH
