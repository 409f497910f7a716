#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastad {

static Isa detect_hardware() {
  Isa best = Isa::generic;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(FASTAD_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
#endif
#if defined(FASTAD_HAVE_AVX512)
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16"))
    best = Isa::avx512;
#endif
#endif
  return best;
}

Isa supported_isa() {
  static const Isa isa = detect_hardware();
  return isa;
}

static Isa initial_isa() {
  Isa best = supported_isa();
  if (const char* env = std::getenv("FASTAD_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "generic")) want = Isa::generic;
    else if (!std::strcmp(env, "avx2")) want = Isa::avx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;  // can only lower
  }
  return best;
}

static std::atomic<int> g_isa{-1};

Isa cpu_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

bool set_cpu_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(supported_isa())) return false;
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace fastad
