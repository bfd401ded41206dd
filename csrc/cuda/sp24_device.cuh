// Device-only building blocks for the 2:4 kernels: 16-bit float conversions, cp.async,
// ldmatrix and mma.sp as inline PTX. No CUDA headers are included, so the same source
// builds under nvcc and under NVRTC (the run-time fallback) alike.

#ifndef NMKERN_SP24_DEVICE_CUH
#define NMKERN_SP24_DEVICE_CUH

#include "sp24_layout.cuh"

// Which sparse MMA instruction to emit (PTX ISA 9.7.14.6, "mma.sp / mma.sp::ordered_metadata"):
//   1: mma.sp::ordered_metadata (PTX ISA 8.5, CUDA 12.5+). The PTX ISA notes say plain mma.sp
//      "may have substantially reduced performance on some target architectures" and advise
//      the ordered form.
//   0: plain mma.sp (PTX ISA 7.1, CUDA 11.1+), for older nvcc / NVRTC.
// Both take the same operands (a, b, c, metadata e, selector f), the same fragment layout and
// the same selector meaning: for m16n8k32 f16/bf16, selector 0 reads the metadata of threads
// T0,T1 of each group of four, selector 1 that of T2,T3 (any other value is undefined). The one
// difference the ISA states: ::ordered_metadata requires the two 2-bit indices of each 4-chunk
// sorted in increasing order from the LSB (meaningful nibbles 0b0100, 0b1000, 0b1001, 0b1100,
// 0b1101, 0b1110; others undefined); plain mma.sp has no such requirement. compress_24 writes
// the kept positions in increasing order, so the same metadata is valid for both.
// setup.py (nvcc --version) and nmkern/_cuda.py (NVRTC version) pass the macro explicitly;
// without it, the compiler's version macros decide, and 1 where those are absent.
#ifndef NMKERN_SP_ORDERED_METADATA
#if defined(__CUDACC_VER_MAJOR__) && defined(__CUDACC_VER_MINOR__) && \
    (__CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 5))
#define NMKERN_SP_ORDERED_METADATA 0
#else
#define NMKERN_SP_ORDERED_METADATA 1
#endif
#endif

#if NMKERN_SP_ORDERED_METADATA
#define NMKERN_MMA_SP "mma.sp::ordered_metadata"
#else
#define NMKERN_MMA_SP "mma.sp"
#endif

namespace sp24 {

typedef unsigned short u16;
typedef unsigned int u32;

// fp16 / bf16 tags: conversions and the mma.sp instruction for each 16-bit input type.
struct F16 {
  static __device__ __forceinline__ float to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
  template <int SEL>
  static __device__ __forceinline__ void mma_sp(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
    asm volatile(
        NMKERN_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(SEL));
  }
};

struct BF16 {
  static __device__ __forceinline__ float to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }
  static __device__ __forceinline__ u16 from_float(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
  template <int SEL>
  static __device__ __forceinline__ void mma_sp(float (&d)[4], const u32 (&a)[4], const u32 (&b)[4], u32 e) {
    asm volatile(
        NMKERN_MMA_SP ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(SEL));
  }
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; valid == false writes 16 zero bytes (src-size 0).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

}  // namespace sp24

#endif  // NMKERN_SP24_DEVICE_CUH
