// Library identity and cpuid queries (every ISA variant exports them; the Python
// loader asks the generic library which variant the running CPU can execute).
#include <atomic>

#include "nmkern_cpu.h"
#include "parallel.h"

namespace {
std::atomic<int> g_threading{0};
}

namespace nmkern {
Threading threading_mode() { return static_cast<Threading>(g_threading.load(std::memory_order_relaxed)); }
}  // namespace nmkern

extern "C" int nmkern_cpu_set_threading(int mode) {
  if (mode != 0 && mode != 1) return NMKERN_EBADARG;
  g_threading.store(mode);
  return NMKERN_OK;
}

extern "C" int nmkern_cpu_get_threading(void) { return g_threading.load(); }

extern "C" int nmkern_cpu_abi_version(void) { return NMKERN_CPU_ABI_VERSION; }

extern "C" const char* nmkern_cpu_isa(void) {
#if defined(NMKERN_ISA_AVX512)
  return "avx512";
#elif defined(NMKERN_ISA_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// __builtin_cpu_supports checks both the cpuid bit and that the OS saves the wide
// registers (XGETBV), so a true answer means the instructions may run.
extern "C" int nmkern_cpu_supports_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
  return 0;
#endif
}

extern "C" int nmkern_cpu_supports_avx512(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
             ? 1
             : 0;
#else
  return 0;
#endif
}
