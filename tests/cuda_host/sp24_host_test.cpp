// Host-side checks of csrc/cuda/sp24_layout.cuh and sp24_epilogue.cuh, compiled by
// tests/test_cuda_host_emulation.py with g++ (no GPU). Modes, each reading one binary file
// written by the Python test:
//
//   layout   <in>        decode CUTLASS-layout metadata with the header's helpers and rebuild the
//                        dense matrix; must equal nmkern.decompress_24 bit for bit. Also checks
//                        the per-lane metadata word the GEMM loads (meta_word_for_lane).
//   compress <in> <out>  run the prune-and-compress kernel's per-chunk logic (header helpers) on a
//                        dense matrix; writes values + metadata for a byte comparison in Python.
//   gemm     <in> <out>  emulate the GEMM kernel and the split-K reduce, block by block and warp
//                        by warp. Shared with the kernel (headers): the cp.async stage schedule
//                        (run_pipeline), the stage loader, every smem / ldmatrix / metadata /
//                        accumulator index, the epilogue (fp32 tile, 8-wide stores, bias unpack,
//                        16-bit packing) and the reduce. Emulated here from the PTX ISA: cp.async
//                        groups in flight, ldmatrix, mma.sp (written independently of the
//                        headers). Every cp.async / ldmatrix / vector access is checked for
//                        16-byte alignment and bounds. Writes Y (M x N, fp16/bf16 bits), which
//                        the test compares against a float64 matmul.
//   round    <in> <out>  the host fp32 -> fp16/bf16 rounding the emulated epilogue uses.
//
// Exit code 0 on success; on a failed check it prints "FAIL: ..." and exits 1. Compile-time
// NMKERN_EMU_* flags plant bugs for the negative controls (see "negative controls" below).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sp24_epilogue.cuh"
#include "sp24_layout.cuh"

using u16 = uint16_t;
using u32 = uint32_t;

// ---- 16-bit float decoding (software, exact) --------------------------------------------
static float half_to_float(u16 h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
  return sign ? -v : v;
}
static float bf16_to_float(u16 h) {
  u32 bits = static_cast<u32>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static bool g_bf16 = false;
static float to_float(u16 h) { return g_bf16 ? bf16_to_float(h) : half_to_float(h); }

// ---- tiny binary reader -------------------------------------------------------------------
struct Reader {
  std::vector<unsigned char> buf;
  size_t pos = 0;
  explicit Reader(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) { std::fprintf(stderr, "cannot open %s\n", path); std::exit(2); }
    unsigned char tmp[1 << 16];
    size_t n;
    while ((n = std::fread(tmp, 1, sizeof tmp, f)) > 0) buf.insert(buf.end(), tmp, tmp + n);
    std::fclose(f);
  }
  int64_t i64() { int64_t v; take(&v, 8); return v; }
  std::vector<u16> u16s(size_t n) { std::vector<u16> v(n); take(v.data(), 2 * n); return v; }
  void take(void* dst, size_t n) {
    if (pos + n > buf.size()) { std::fprintf(stderr, "input file too short\n"); std::exit(2); }
    std::memcpy(dst, buf.data() + pos, n);
    pos += n;
  }
};

static void write_file(const char* path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) { std::fprintf(stderr, "cannot write %s\n", path); std::exit(2); }
  std::fclose(f);
}

static int fail(const std::string& msg) {
  std::printf("FAIL: %s\n", msg.c_str());
  return 1;
}

// ---- mode: layout ---------------------------------------------------------------------------
// Input: N, K, values (N*K/2 u16), meta (N*K/16 u16, stored order), dense (N*K u16).
static int run_layout(const char* path) {
  Reader r(path);
  const int N = static_cast<int>(r.i64()), K = static_cast<int>(r.i64());
  auto values = r.u16s(static_cast<size_t>(N) * K / 2);
  auto meta = r.u16s(static_cast<size_t>(N) * K / 16);
  auto dense = r.u16s(static_cast<size_t>(N) * K);
  // 1. The offsets are a permutation of the metadata array.
  std::vector<int> hits(meta.size(), 0);
  for (int row = 0; row < N; ++row)
    for (int c = 0; c < K / 16; ++c) {
      long long off = sp24::meta_offset(row, c, N);
      if (off < 0 || off >= static_cast<long long>(meta.size()) || hits[off]++)
        return fail("meta_offset is not a permutation at row " + std::to_string(row) + " col " + std::to_string(c));
    }
  // 2. Rebuild the dense matrix from values + decoded nibbles.
  for (int row = 0; row < N; ++row)
    for (int grp = 0; grp < K / 4; ++grp) {
      const u16 word = meta[sp24::meta_offset(row, grp / 4, N)];
      const unsigned nib = (word >> (4 * (grp % 4))) & 0xF;
      const int s0 = nib & 3, s1 = (nib >> 2) & 3;
      if (s0 >= s1) return fail("unordered metadata nibble at row " + std::to_string(row));
      u16 rebuilt[4] = {0, 0, 0, 0};
      rebuilt[s0] = values[static_cast<size_t>(row) * (K / 2) + 2 * grp];
      rebuilt[s1] = values[static_cast<size_t>(row) * (K / 2) + 2 * grp + 1];
      for (int i = 0; i < 4; ++i) {
        const u16 want = dense[static_cast<size_t>(row) * K + 4 * grp + i];
        // The dropped slots hold +0 in decompress_24's output.
        if (rebuilt[i] != want)
          return fail("dense mismatch at row " + std::to_string(row) + " col " + std::to_string(4 * grp + i));
      }
    }
  // 3. The word a lane loads holds the metadata the PTX ISA assigns to it (see the header).
  for (int row0 = 0; row0 < N; row0 += 32)
    for (int k32 = 0; k32 < K / 32; ++k32)
      for (int lane = 0; lane < 32; ++lane) {
        const long long w = sp24::meta_word_for_lane(row0, k32, lane, N);
        if (w != static_cast<long long>(k32) * N + row0 + lane)
          return fail("meta_word_for_lane is not the contiguous word the kernel loads");
        const int g = lane >> 2, s = (lane >> 1) & 1, h = lane & 1;
        const u16 lo = meta[2 * w], hi = meta[2 * w + 1];
        const u16 want_lo = meta[sp24::meta_offset(row0 + g + 16 * s, 2 * k32 + h, N)];
        const u16 want_hi = meta[sp24::meta_offset(row0 + g + 8 + 16 * s, 2 * k32 + h, N)];
        if (lo != want_lo || hi != want_hi) return fail("metadata word halves are not rows g and g + 8");
      }
  std::printf("OK layout N=%d K=%d\n", N, K);
  return 0;
}

// ---- mode: compress -------------------------------------------------------------------------
// Input: bf16 flag, N, K, dense (N*K u16). Output: values (N*K/2 u16) then meta (N*K/16 u16).
static int run_compress(const char* in, const char* out) {
  Reader r(in);
  g_bf16 = r.i64() != 0;
  const int N = static_cast<int>(r.i64()), K = static_cast<int>(r.i64());
  auto w = r.u16s(static_cast<size_t>(N) * K);
  std::vector<u16> values(static_cast<size_t>(N) * K / 2), meta(static_cast<size_t>(N) * K / 16);
  for (int row = 0; row < N; ++row)
    for (int c = 0; c < K / 16; ++c) {  // one device thread's work: a 16-column chunk
      unsigned meta16 = 0;
      for (int g = 0; g < 4; ++g) {
        const u16* grp = &w[static_cast<size_t>(row) * K + c * 16 + 4 * g];
        float v[4];
        for (int i = 0; i < 4; ++i) v[i] = to_float(grp[i]);
        unsigned keep;
        const unsigned nib = sp24::prune_group_nibble(v, &keep);
        const unsigned s0 = nib & 3, s1 = (nib >> 2) & 3;
        values[static_cast<size_t>(row) * (K / 2) + c * 8 + 2 * g] =
            ((keep >> s0) & 1u) ? sp24::select4(grp[0], grp[1], grp[2], grp[3], s0) : 0;
        values[static_cast<size_t>(row) * (K / 2) + c * 8 + 2 * g + 1] =
            ((keep >> s1) & 1u) ? sp24::select4(grp[0], grp[1], grp[2], grp[3], s1) : 0;
        meta16 |= nib << (4 * g);
      }
      meta[sp24::meta_offset(row, c, N)] = static_cast<u16>(meta16);
    }
  std::vector<u16> both(values);
  both.insert(both.end(), meta.begin(), meta.end());
  write_file(out, both.data(), both.size() * 2);
  std::printf("OK compress N=%d K=%d\n", N, K);
  return 0;
}

// ---- negative controls ------------------------------------------------------------------------
// Each flag plants one bug in the emulated kernel. tests/test_cuda_host_emulation.py builds the
// program once per flag and asserts that the GEMM check then FAILS, i.e. that it can see the bug:
//   NMKERN_EMU_BAD_SELECTOR  mma.sp sparsity selectors swapped (tile t reads the other lane pair)
//   NMKERN_EMU_BAD_META      the two 16-bit halves of the metadata word swapped (row g <-> g + 8)
//   NMKERN_EMU_BAD_B_ORDER   B registers 1 and 2 swapped (k 8..15 <-> k 16..23 of the k32 step)
//   NMKERN_EMU_EARLY_READ    cp.async.wait_group N leaves N + 1 groups pending (a missing wait:
//                            the stage computed on is still in flight)
//   NMKERN_EMU_MISALIGN      each stage's B region starts 8 bytes late (misaligned cp.async/ldmatrix)
// NMKERN_EMU_NO_INFLIGHT_CHECK turns off the explicit in-flight read check (the poison stays).
#ifdef NMKERN_EMU_BAD_SELECTOR
constexpr int kSelTile0 = 1, kSelTile1 = 0;
#else
constexpr int kSelTile0 = 0, kSelTile1 = 1;
#endif
#ifdef NMKERN_EMU_EARLY_READ
constexpr int kWaitSlack = 1;
#else
constexpr int kWaitSlack = 0;
#endif
#ifdef NMKERN_EMU_MISALIGN
constexpr int kBRegionSkew = 8;
#else
constexpr int kBRegionSkew = 0;
#endif

// A check of the emulated kernel failed: report and stop (exit 1, like a value mismatch).
[[noreturn]] static void die(const std::string& msg) {
  std::printf("FAIL: %s\n", msg.c_str());
  std::fflush(stdout);
  std::exit(1);
}

// ---- PTX ISA emulation (independent of the header) ------------------------------------------

// One block's dynamic shared memory, with cp.async modelled as in-flight groups (PTX ISA,
// cp.async / cp.async.commit_group / cp.async.wait_group): a copy's bytes are undefined until a
// wait_group completes its group. Here they read as 0xFF (NaN in fp16, bf16 and fp32, and the
// metadata nibble 0xF, which the mma.sp emulation rejects) and carry an in-flight mark: reading
// a marked byte stops the run with "in flight". Bytes never written also read 0xFF: the whole
// block's shared memory starts as NaN, and the epilogue tile is refilled with NaN before use.
struct Smem {
  struct Copy {
    int dst;
    unsigned char data[16];
  };
  std::vector<unsigned char> bytes, inflight;
  std::vector<Copy> open;                  // issued, not yet committed
  std::vector<std::vector<Copy>> groups;   // committed, oldest first
  explicit Smem(int n) : bytes(n, 0xFF), inflight(n, 0) {}

  void check_range(int off, int n, const char* what) const {
    if (off < 0 || off + n > static_cast<int>(bytes.size()))
      die(std::string(what) + ": shared offset " + std::to_string(off) + " + " + std::to_string(n) +
          " outside the " + std::to_string(bytes.size()) + "-byte allocation");
  }
  void read(int off, void* dst, int n, const char* what) const {
    check_range(off, n, what);
#ifndef NMKERN_EMU_NO_INFLIGHT_CHECK  // (a test turns it off to show the NaN poison alone also fails)
    for (int i = 0; i < n; ++i)
      if (inflight[off + i])
        die(std::string(what) + " reads shared byte " + std::to_string(off + i) +
            " while a cp.async to it is in flight (no cp.async.wait_group covers it)");
#endif
    std::memcpy(dst, bytes.data() + off, n);
  }
  void write(int off, const void* src, int n, const char* what) {
    check_range(off, n, what);
    std::memcpy(bytes.data() + off, src, n);
  }
  void fill_nan(int off, int n) {
    check_range(off, n, "NaN fill");
    std::memset(bytes.data() + off, 0xFF, n);
  }
  // cp.async.cg.shared.global [dst], [src], 16, src_size (16, or 0 = zero fill).
  void cp_async16(int dst, const unsigned char* src) {
    if (dst % 16) die("cp.async shared address " + std::to_string(dst) + " is not 16-byte aligned");
    check_range(dst, 16, "cp.async");
    Copy c;
    c.dst = dst;
    if (src) std::memcpy(c.data, src, 16);
    else std::memset(c.data, 0, 16);
    open.push_back(c);
    std::memset(bytes.data() + dst, 0xFF, 16);  // old contents are gone, new ones not there yet
    std::memset(inflight.data() + dst, 1, 16);
  }
  void commit() {
    groups.push_back(open);
    open.clear();
  }
  void wait_group(int n) {
    while (static_cast<int>(groups.size()) > n) {
      for (const Copy& c : groups.front()) {
        std::memcpy(bytes.data() + c.dst, c.data, 16);
        std::memset(inflight.data() + c.dst, 0, 16);
      }
      groups.erase(groups.begin());
    }
  }
};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j
// (each row 8 x b16 = 16 bytes, 16-byte aligned); thread t receives in register j the two 16-bit
// elements at row t/4, columns 2*(t%4) and 2*(t%4)+1 of matrix j (lower column in the low half).
static void ldmatrix_x4_isa(const Smem& sm, const int addr[32], u32 regs[32][4]) {
  u16 rows[32][8];
  for (int l = 0; l < 32; ++l) {
    if (addr[l] % 16) die("ldmatrix row address " + std::to_string(addr[l]) + " (lane " + std::to_string(l) +
                          ") is not 16-byte aligned");
    sm.read(addr[l], rows[l], 16, "ldmatrix");
  }
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < 4; ++j) {
      const u16* row = rows[8 * j + t / 4];
      regs[t][j] = static_cast<u32>(row[2 * (t % 4)]) | (static_cast<u32>(row[2 * (t % 4) + 1]) << 16);
    }
}

// mma.sp(::ordered_metadata).sync.aligned.m16n8k32.row.col.f32.{f16,bf16}: D = A * B + C with
// A 16x32 (2:4, compressed to 16x16), B 32x8, C/D 16x8 fp32. Per the PTX ISA:
//   A: reg r of lane (g = lane/4, q = lane%4) holds the two kept elements of row g + 8*(r&1),
//      4-column chunk starting at column 4q + 16*(r>>1); the metadata of the chunk is held by
//      lane 4g + 2*sel + (r>>1): bits [15:0] for row g, [31:16] for row g + 8, nibble q within,
//      each nibble = index of the first kept element | index of the second << 2 (ordered).
//   B: reg r of lane holds B[k = 2q + 8r + e][n = g], e = 0 (low half), 1 (high half).
//   C/D: element i of lane is row g + 8*(i>>1), column 2q + (i&1).
// Only the two B rows a nibble selects enter a product (the hardware gathers them), so a NaN
// in a B row that no kept A element selects does not reach D.
static void mma_sp_isa(float d[32][4], const u32 a[32][4], const u32 b[32][4], const u32 e[32], int sel) {
  float Av[16][16];  // kept values, compressed: row, 2 per 4-column chunk
  int Ak[16][16];    // their columns in the 32-wide A tile
  float B[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1), half = r >> 1;
      const u32 md = e[4 * g + 2 * sel + half];
      const unsigned bits16 = (row < 8 ? md : md >> 16) & 0xFFFF;
      const unsigned nib = (bits16 >> (4 * q)) & 0xF;
      const int i0 = nib & 3, i1 = (nib >> 2) & 3;
      if (i0 >= i1) die("metadata nibble not ordered (invalid for mma.sp::ordered_metadata)");
      const int chunk = q + 4 * half, base = 4 * chunk;
      Av[row][2 * chunk] = to_float(static_cast<u16>(a[lane][r] & 0xFFFF));
      Av[row][2 * chunk + 1] = to_float(static_cast<u16>(a[lane][r] >> 16));
      Ak[row][2 * chunk] = base + i0;
      Ak[row][2 * chunk + 1] = base + i1;
      B[2 * q + 8 * r][g] = to_float(static_cast<u16>(b[lane][r] & 0xFFFF));
      B[2 * q + 8 * r + 1][g] = to_float(static_cast<u16>(b[lane][r] >> 16));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
      double s = 0;
      for (int c = 0; c < 16; ++c) s += static_cast<double>(Av[row][c]) * B[Ak[row][c]][col];
      d[lane][i] += static_cast<float>(s);
    }
  }
}

// float -> fp16 / bf16, round to nearest even (cvt.rn.f16.f32 / cvt.rn.bf16.f32), in software.
static u16 float_to_half(float f) {
  u32 x;
  std::memcpy(&x, &f, 4);
  const u32 sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<u16>(sign | 0x7E00u);  // NaN
  if (ax >= 0x477FF000u) return static_cast<u16>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal, in units of 2^-24 (exact scaling)
    float v;
    std::memcpy(&v, &ax, 4);
    return static_cast<u16>(sign | static_cast<u32>(std::nearbyint(v * 16777216.0f)));  // 1024 = min normal
  }
  const u32 m = ax - (112u << 23);  // rebias the exponent 127 -> 15
  u32 r = m >> 13;
  const u32 rem = m & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is correct
  return static_cast<u16>(sign | r);
}
static u16 float_to_bf16(float f) {
  u32 x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<u16>(((x >> 16) & 0x8000u) | 0x7FC0u);
  return static_cast<u16>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// The 16-bit type tag the shared epilogue / reduce (sp24_epilogue.cuh) take: sp24::F16 / BF16
// on the device, software conversions here.
struct HostT {
  static float to_float(u16 h) { return ::to_float(h); }
  static u16 from_float(float f) { return g_bf16 ? float_to_bf16(f) : float_to_half(f); }
};

// ---- mode: gemm -----------------------------------------------------------------------------
// Input: bf16 flag, config (0 small, 1 large), splits (gridDim.z), kt_per_split, reduce blocks,
// reduce threads, M, N, K, has_bias, x (M*K u16), values (N*K/2 u16), meta (N*K/16 u16), bias
// (N u16 if has_bias). Output: Y (M*N u16), written only through the kernel's epilogue (splits
// == 1) or the split-K reduce; it starts as NaN, so an output nobody writes fails the comparison.
struct Gemm {
  int splits, kt_per_split, red_blocks, red_threads, M, N, K;
  const std::vector<u16>& x;
  const std::vector<u16>& values;
  const std::vector<u16>& meta;
  const std::vector<u16>* bias;
};

// Global memory reads of a cp.async source or a vector load: `elem_off` elements of `elem`
// bytes from a 16-byte aligned base (the launcher passes 16-byte aligned tensors).
static const unsigned char* global_at(const void* base, size_t total_bytes, long long elem_off, int elem,
                                      int n, const char* what) {
  const long long byte = elem_off * elem;
  if (byte % n) die(std::string(what) + ": global byte offset " + std::to_string(byte) + " is not " +
                    std::to_string(n) + "-byte aligned");
  if (byte < 0 || byte + n > static_cast<long long>(total_bytes))
    die(std::string(what) + ": global byte offset " + std::to_string(byte) + " out of bounds");
  return static_cast<const unsigned char*>(base) + byte;
}

template <class Cfg>
static void emulate_gemm(const Gemm& p, std::vector<u16>& y) {
  using namespace sp24;
  const int M = p.M, N = p.N, K = p.K;
  const int ktiles = (K + kBK - 1) / kBK;
  const bool to_ws = p.splits > 1;
  std::vector<float> ws(to_ws ? static_cast<size_t>(p.splits) * M * N : 0, NAN);
  y.assign(static_cast<size_t>(M) * N, 0xFFFF);  // NaN in fp16 and bf16
  constexpr int WARPS = Cfg::WARPS_N * Cfg::WARPS_M;
  static float acc[WARPS][2][Cfg::NT][32][4];
  for (int bz = 0; bz < p.splits; ++bz)
    for (int by = 0; by < (M + Cfg::BM - 1) / Cfg::BM; ++by)
      for (int bx = 0; bx < (N + Cfg::BN - 1) / Cfg::BN; ++bx) {
        const int n0 = bx * Cfg::BN, m0 = by * Cfg::BM;
        const int kt_begin = bz * p.kt_per_split;
        const int kt_end = std::min(ktiles, kt_begin + p.kt_per_split);
        const int nkt = std::max(kt_end - kt_begin, 0);
        Smem sm(Cfg::SMEM_BYTES);
        std::memset(acc, 0, sizeof acc);
        const int b_skew = kBRegionSkew;  // 0 unless NMKERN_EMU_MISALIGN

        // run_pipeline callbacks for the whole block (each is block-uniform in the kernel).
        auto load = [&](int s, int kt) {
          for (int tid = 0; tid < Cfg::THREADS; ++tid) {
            auto copy = [&](int op, int soff, long long goff, bool ok) {
              if (op == kOpA)
                sm.cp_async16(stage_a_bytes<Cfg>(s) + 2 * soff,
                              ok ? global_at(p.values.data(), 2 * p.values.size(), goff, 2, 16, "cp.async A") : nullptr);
              else if (op == kOpB)
                sm.cp_async16(stage_b_bytes<Cfg>(s) + b_skew + 2 * soff,
                              ok ? global_at(p.x.data(), 2 * p.x.size(), goff, 2, 16, "cp.async B") : nullptr);
              else
                sm.cp_async16(stage_e_bytes<Cfg>(s) + 4 * soff,
                              ok ? global_at(p.meta.data(), 2 * p.meta.size(), goff, 4, 16, "cp.async E") : nullptr);
            };
            load_stage<Cfg>(copy, tid, kt, n0, m0, M, N, K);
          }
        };
        auto commit = [&] { sm.commit(); };
        auto wait = [&](auto pending) { sm.wait_group(decltype(pending)::value + kWaitSlack); };
        // Warps run one after another here, so a barrier reorders nothing in the emulation.
        auto sync = [] {};
        auto compute = [&](int s, int kt) {
          const int k0 = kt * kBK;
          for (int warp = 0; warp < WARPS; ++warp) {
            const int wn = warp % Cfg::WARPS_N, wm = warp / Cfg::WARPS_N;
            if (!((n0 + wn * 32 < N) && (m0 + wm * Cfg::WM < M))) continue;  // the kernel's warp_active
            for (int kk = 0; kk < kMetaWordsPerRowStage; ++kk) {
              if (k0 + kk * 32 >= K) break;
              u32 e[32];
              for (int lane = 0; lane < 32; ++lane) {
                sm.read(stage_e_bytes<Cfg>(s) + 4 * smem_e(Cfg::BN, kk, wn * 32 + lane), &e[lane], 4, "metadata load");
#ifdef NMKERN_EMU_BAD_META
                e[lane] = (e[lane] >> 16) | (e[lane] << 16);
#endif
              }
              u32 a[2][32][4];
              for (int t = 0; t < 2; ++t) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane)
                  addr[lane] = stage_a_bytes<Cfg>(s) +
                               2 * smem_a(wn * 32 + t * 16 + ldsm_a_row(lane), kk * 16 + ldsm_a_col(lane));
                ldmatrix_x4_isa(sm, addr, a[t]);
              }
              for (int j = 0; j < Cfg::NT; ++j) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane)
                  addr[lane] = stage_b_bytes<Cfg>(s) + b_skew +
                               2 * smem_b(wm * Cfg::WM + j * 8 + ldsm_b_row(lane), kk * 32 + ldsm_b_col(lane));
                u32 b[32][4];
                ldmatrix_x4_isa(sm, addr, b);
#ifdef NMKERN_EMU_BAD_B_ORDER
                for (int lane = 0; lane < 32; ++lane) std::swap(b[lane][1], b[lane][2]);
#endif
                mma_sp_isa(acc[warp][0][j], a[0], b, e, kSelTile0);
                mma_sp_isa(acc[warp][1][j], a[1], b, e, kSelTile1);
              }
            }
          }
        };
        run_pipeline<Cfg>(load, commit, wait, sync, compute, kt_begin, nkt);
        if (!sm.open.empty()) die("cp.async copies issued but never committed to a group");

        // Epilogue phase 1: every warp (idle ones too, as in the kernel) stores its accumulators
        // into the fp32 tile, which overlays the drained stages; NaN first, so a tile element
        // that phase 1 misses and phase 2 reads shows up in Y.
        sm.fill_nan(0, Cfg::EPI_BYTES);
        for (int warp = 0; warp < WARPS; ++warp) {
          const int wn = warp % Cfg::WARPS_N, wm = warp / Cfg::WARPS_N;
          for (int t = 0; t < 2; ++t)
            for (int j = 0; j < Cfg::NT; ++j)
              for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < 4; ++i) {
                  const int off = epi_acc_offset<Cfg>(wn, wm, t, j, lane, i);
                  if (off < 0 || 4 * off + 4 > Cfg::EPI_BYTES) die("epilogue tile store outside the tile");
                  sm.write(4 * off, &acc[warp][t][j][lane][i], 4, "epilogue tile store");
                }
        }
        // Phase 2, thread by thread, through the shared helper.
        auto tile8 = [&](int off, float (&v)[8]) {
          for (int h = 0; h < 2; ++h) {  // two 16-byte ld.shared.v4.f32
            const int byte = 4 * (off + 4 * h);
            if (byte % 16) die("epilogue tile load at shared byte " + std::to_string(byte) + " is not 16-byte aligned");
            if (byte + 16 > Cfg::EPI_BYTES) die("epilogue tile load outside the tile");
            sm.read(byte, v + 4 * h, 16, "epilogue tile load");
          }
        };
        auto ws8 = [&](long long off, const float (&v)[8]) {
          for (int h = 0; h < 2; ++h) {
            const long long o = off + 4 * h;
            global_at(ws.data(), 4 * ws.size(), o, 4, 16, "split-K partial store");
            std::memcpy(&ws[o], v + 4 * h, 16);
          }
        };
        auto bias8 = [&](int off, u32 (&bw)[4]) {
          std::memcpy(bw, global_at(p.bias->data(), 2 * p.bias->size(), off, 2, 16, "bias load"), 16);
        };
        auto y8 = [&](long long off, const u32 (&pk)[4]) {
          global_at(y.data(), 2 * y.size(), off, 2, 16, "Y store");
          std::memcpy(&y[off], pk, 16);
        };
        for (int tid = 0; tid < Cfg::THREADS; ++tid)
          epilogue_store<Cfg, HostT>(tile8, ws8, bias8, y8, tid, n0, m0, M, N, bz, to_ws, p.bias != nullptr);
      }
  if (!to_ws) return;
  // Split-K reduce kernel: every thread of the launcher's grid, in its grid-stride loop.
  auto ws4 = [&](long long off, float (&v)[4]) {
    std::memcpy(v, global_at(ws.data(), 4 * ws.size(), off, 4, 16, "reduce partial load"), 16);
  };
  auto bias1 = [&](int n) { return *reinterpret_cast<const u16*>(global_at(p.bias->data(), 2 * p.bias->size(), n, 2, 2, "reduce bias load")); };
  auto y4 = [&](long long off, u32 lo, u32 hi) {
    global_at(y.data(), 2 * y.size(), off, 2, 8, "reduce Y store");
    const u32 w[2] = {lo, hi};
    std::memcpy(&y[off], w, 8);
  };
  const long long nthreads = static_cast<long long>(p.red_blocks) * p.red_threads;
  for (long long g = 0; g < nthreads; ++g)
    splitk_reduce_thread<HostT>(ws4, bias1, y4, g, nthreads, M, N, p.splits, p.bias != nullptr);
}

static int run_gemm(const char* in, const char* out) {
  Reader r(in);
  g_bf16 = r.i64() != 0;
  const int cfg = static_cast<int>(r.i64());
  int hdr[8];  // splits, kt_per_split, reduce blocks, reduce threads, M, N, K, has_bias
  for (int& h : hdr) h = static_cast<int>(r.i64());
  const int M = hdr[4], N = hdr[5], K = hdr[6];
  const bool has_bias = hdr[7] != 0;
  auto x = r.u16s(static_cast<size_t>(M) * K);
  auto values = r.u16s(static_cast<size_t>(N) * K / 2);
  auto meta = r.u16s(static_cast<size_t>(N) * K / 16);
  std::vector<u16> bias;
  if (has_bias) bias = r.u16s(N);
  const Gemm p{hdr[0], hdr[1], hdr[2], hdr[3], M, N, K, x, values, meta, has_bias ? &bias : nullptr};
  std::vector<u16> y;
  if (cfg == 0) emulate_gemm<sp24::CfgSmall>(p, y);
  else emulate_gemm<sp24::CfgLarge>(p, y);
  write_file(out, y.data(), y.size() * 2);
  std::printf("OK gemm cfg=%d splits=%d M=%d N=%d K=%d\n", cfg, p.splits, M, N, K);
  return 0;
}

// ---- mode: round: the host float -> fp16 / bf16 conversion the emulated epilogue uses ----------
// Input: bf16 flag, n, n float32. Output: n u16, for a bitwise comparison with torch's .to().
static int run_round(const char* in, const char* out) {
  Reader r(in);
  g_bf16 = r.i64() != 0;
  const size_t n = static_cast<size_t>(r.i64());
  std::vector<float> f(n);
  r.take(f.data(), 4 * n);
  std::vector<u16> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = HostT::from_float(f[i]);
  write_file(out, h.data(), 2 * n);
  return 0;
}

// ---- mode: configs: tile geometry for the Python launcher to cross-check --------------------
template <class Cfg>
static void print_cfg(const char* name) {
  std::printf("%s BN=%d BM=%d THREADS=%d STAGES=%d SMEM=%d\n", name, Cfg::BN, Cfg::BM, Cfg::THREADS, Cfg::STAGES,
              Cfg::SMEM_BYTES);
}

int main(int argc, char** argv) {
  if (argc >= 2 && !std::strcmp(argv[1], "configs")) {
    print_cfg<sp24::CfgSmall>("small");
    print_cfg<sp24::CfgLarge>("large");
    return 0;
  }
  if (argc >= 3 && !std::strcmp(argv[1], "layout")) return run_layout(argv[2]);
  if (argc >= 4 && !std::strcmp(argv[1], "compress")) return run_compress(argv[2], argv[3]);
  if (argc >= 4 && !std::strcmp(argv[1], "gemm")) return run_gemm(argv[2], argv[3]);
  if (argc >= 4 && !std::strcmp(argv[1], "round")) return run_round(argv[2], argv[3]);
  std::fprintf(stderr, "usage: %s configs | layout IN | compress IN OUT | gemm IN OUT | round IN OUT\n", argv[0]);
  return 2;
}
