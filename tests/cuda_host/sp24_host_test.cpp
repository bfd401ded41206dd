// Host-side checks of csrc/cuda/sp24_layout.cuh, compiled by tests/test_cuda_host_emulation.py
// with g++ (no GPU). Three modes, each reading one binary file written by the Python test:
//
//   layout   <in>        decode CUTLASS-layout metadata with the header's helpers and rebuild the
//                        dense matrix; must equal nmkern.decompress_24 bit for bit. Also checks
//                        the per-lane metadata word the GEMM loads (meta_word_for_lane).
//   compress <in> <out>  run the prune-and-compress kernel's per-chunk logic (header helpers) on a
//                        dense matrix; writes values + metadata for a byte comparison in Python.
//   gemm     <in> <out>  emulate the GEMM kernel block by block and warp by warp: the stage loader
//                        and every smem / ldmatrix / metadata / accumulator index come from the
//                        header; ldmatrix and mma.sp themselves are emulated from the PTX ISA
//                        fragment descriptions below (written independently of the header).
//                        Writes Y (M x N) as float32 for a comparison against a float64 matmul.
//
// Exit code 0 on success; on a failed check it prints the first mismatch and exits 1.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

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

// ---- PTX ISA emulation (independent of the header) ------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8j..8j+7 give the row addresses of matrix j; thread t
// receives in register j the two 16-bit elements at row t/4, columns 2*(t%4) and 2*(t%4)+1 of
// matrix j (lower column in the low half).
static void ldmatrix_x4_isa(const std::vector<u16>& smem, const int addr[32], u32 regs[32][4]) {
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < 4; ++j) {
      const int base = addr[8 * j + t / 4] + 2 * (t % 4);
      regs[t][j] = static_cast<u32>(smem[base]) | (static_cast<u32>(smem[base + 1]) << 16);
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
static bool mma_sp_isa(float d[32][4], const u32 a[32][4], const u32 b[32][4], const u32 e[32], int sel,
                       std::string* err) {
  float A[16][32] = {};
  float B[32][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r & 1), half = r >> 1;
      const u32 md = e[4 * g + 2 * sel + half];
      const unsigned bits16 = (row < 8 ? md : md >> 16) & 0xFFFF;
      const unsigned nib = (bits16 >> (4 * q)) & 0xF;
      const int i0 = nib & 3, i1 = (nib >> 2) & 3;
      if (i0 >= i1) { *err = "metadata nibble not ordered (invalid for .sp::ordered_metadata)"; return false; }
      const int base = 4 * q + 16 * half;
      A[row][base + i0] = to_float(static_cast<u16>(a[lane][r] & 0xFFFF));
      A[row][base + i1] = to_float(static_cast<u16>(a[lane][r] >> 16));
      B[2 * q + 8 * r][g] = to_float(static_cast<u16>(b[lane][r] & 0xFFFF));
      B[2 * q + 8 * r + 1][g] = to_float(static_cast<u16>(b[lane][r] >> 16));
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
      double s = 0;
      for (int k = 0; k < 32; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
      d[lane][i] += static_cast<float>(s);
    }
  }
  return true;
}

// ---- mode: gemm -----------------------------------------------------------------------------
// Input: bf16 flag, config (0 small, 1 large), splits, M, N, K, has_bias, x (M*K u16),
// values (N*K/2 u16), meta (N*K/16 u16), bias (N u16 if has_bias). Output: Y (M*N float32).
template <class Cfg>
static int emulate_gemm(int splits, int M, int N, int K, const std::vector<u16>& x, const std::vector<u16>& values,
                        const std::vector<u16>& meta, const std::vector<u16>* bias, std::vector<float>& y) {
  using namespace sp24;
  const int ktiles = (K + kBK - 1) / kBK;
  const int kt_per_split = (ktiles + splits - 1) / splits;
  std::vector<float> ws(static_cast<size_t>(splits) * M * N, 0.f);
  // Shared memory of one block, per stage, as the three typed regions the kernel carves out.
  std::vector<std::vector<u16>> As(Cfg::STAGES, std::vector<u16>(Cfg::A_BYTES / 2));
  std::vector<std::vector<u16>> Bs(Cfg::STAGES, std::vector<u16>(Cfg::B_BYTES / 2));
  std::vector<std::vector<u32>> Es(Cfg::STAGES, std::vector<u32>(Cfg::E_BYTES / 4));
  std::string err;
  for (int bz = 0; bz < splits; ++bz)
    for (int by = 0; by < (M + Cfg::BM - 1) / Cfg::BM; ++by)
      for (int bx = 0; bx < (N + Cfg::BN - 1) / Cfg::BN; ++bx) {
        const int n0 = bx * Cfg::BN, m0 = by * Cfg::BM;
        const int kt_begin = bz * kt_per_split;
        const int kt_end = std::min(ktiles, kt_begin + kt_per_split);
        const int nkt = std::max(kt_end - kt_begin, 0);
        auto load = [&](int s, int kt) {
          for (int tid = 0; tid < Cfg::THREADS; ++tid) {
            auto copy = [&](int op, int soff, long long goff, bool ok) {
              for (int i = 0; i < (op == kOpE ? 4 : 8); ++i) {  // 16 bytes
                if (op == kOpA) As[s].at(soff + i) = ok ? values.at(goff + i) : 0;
                else if (op == kOpB) Bs[s].at(soff + i) = ok ? x.at(goff + i) : 0;
                else Es[s].at(soff + i) = ok ? (static_cast<u32>(meta.at(2 * (goff + i))) |
                                                 (static_cast<u32>(meta.at(2 * (goff + i) + 1)) << 16))
                                              : 0;
              }
            };
            load_stage<Cfg>(copy, tid, kt, n0, m0, M, N, K);
          }
        };
        static float acc[Cfg::WARPS_N * Cfg::WARPS_M][2][Cfg::NT][32][4];
        std::memset(acc, 0, sizeof acc);
        for (int s = 0; s < Cfg::STAGES - 1; ++s)
          if (s < nkt) load(s, kt_begin + s);
        for (int it = 0; it < nkt; ++it) {
          const int next = it + Cfg::STAGES - 1;
          if (next < nkt) load(next % Cfg::STAGES, kt_begin + next);
          const int st = it % Cfg::STAGES;
          const int k0 = (kt_begin + it) * kBK;
          for (int warp = 0; warp < Cfg::WARPS_N * Cfg::WARPS_M; ++warp) {
            const int wn = warp % Cfg::WARPS_N, wm = warp / Cfg::WARPS_N;
            if (!((n0 + wn * 32 < N) && (m0 + wm * Cfg::WM < M))) continue;
            for (int kk = 0; kk < kMetaWordsPerRowStage; ++kk) {
              if (k0 + kk * 32 >= K) break;
              u32 e[32];
              for (int lane = 0; lane < 32; ++lane) e[lane] = Es[st][smem_e(Cfg::BN, kk, wn * 32 + lane)];
              u32 a[2][32][4];
              for (int t = 0; t < 2; ++t) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane)
                  addr[lane] = smem_a(wn * 32 + t * 16 + ldsm_a_row(lane), kk * 16 + ldsm_a_col(lane));
                ldmatrix_x4_isa(As[st], addr, a[t]);
              }
              for (int j = 0; j < Cfg::NT; ++j) {
                int addr[32];
                for (int lane = 0; lane < 32; ++lane)
                  addr[lane] = smem_b(wm * Cfg::WM + j * 8 + ldsm_b_row(lane), kk * 32 + ldsm_b_col(lane));
                u32 b[32][4];
                ldmatrix_x4_isa(Bs[st], addr, b);
                if (!mma_sp_isa(acc[warp][0][j], a[0], b, e, 0, &err) ||
                    !mma_sp_isa(acc[warp][1][j], a[1], b, e, 1, &err))
                  return fail(err);
              }
            }
          }
        }
        // Epilogue indices: accumulator element -> (W row, batch row) as the kernel writes them.
        for (int warp = 0; warp < Cfg::WARPS_N * Cfg::WARPS_M; ++warp) {
          const int wn = warp % Cfg::WARPS_N, wm = warp / Cfg::WARPS_N;
          for (int t = 0; t < 2; ++t)
            for (int j = 0; j < Cfg::NT; ++j)
              for (int lane = 0; lane < 32; ++lane)
                for (int i = 0; i < 4; ++i) {
                  const int gn = n0 + wn * 32 + t * 16 + acc_row(lane, i);
                  const int gm = m0 + wm * Cfg::WM + j * 8 + acc_col(lane, i);
                  if (gm < M && gn < N) ws[(static_cast<size_t>(bz) * M + gm) * N + gn] = acc[warp][t][j][lane][i];
                }
        }
      }
  y.assign(static_cast<size_t>(M) * N, 0.f);
  for (int z = 0; z < splits; ++z)
    for (size_t i = 0; i < y.size(); ++i) y[i] += ws[static_cast<size_t>(z) * M * N + i];
  if (bias)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) y[static_cast<size_t>(m) * N + n] += to_float((*bias)[n]);
  return 0;
}

static int run_gemm(const char* in, const char* out) {
  Reader r(in);
  g_bf16 = r.i64() != 0;
  const int cfg = static_cast<int>(r.i64()), splits = static_cast<int>(r.i64());
  const int M = static_cast<int>(r.i64()), N = static_cast<int>(r.i64()), K = static_cast<int>(r.i64());
  const bool has_bias = r.i64() != 0;
  auto x = r.u16s(static_cast<size_t>(M) * K);
  auto values = r.u16s(static_cast<size_t>(N) * K / 2);
  auto meta = r.u16s(static_cast<size_t>(N) * K / 16);
  std::vector<u16> bias;
  if (has_bias) bias = r.u16s(N);
  std::vector<float> y;
  const int rc = cfg == 0 ? emulate_gemm<sp24::CfgSmall>(splits, M, N, K, x, values, meta, has_bias ? &bias : nullptr, y)
                          : emulate_gemm<sp24::CfgLarge>(splits, M, N, K, x, values, meta, has_bias ? &bias : nullptr, y);
  if (rc) return rc;
  write_file(out, y.data(), y.size() * 4);
  std::printf("OK gemm cfg=%d splits=%d M=%d N=%d K=%d\n", cfg, splits, M, N, K);
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
  std::fprintf(stderr, "usage: %s configs | layout IN | compress IN OUT | gemm IN OUT\n", argv[0]);
  return 2;
}
