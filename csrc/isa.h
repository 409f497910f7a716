// Runtime choice between the per-ISA builds of csrc/cpu/*_kernel.cpp.
#pragma once

namespace fastad {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// Best level that is both compiled in and supported by this CPU, lowered by the
// FASTAD_CPU_ISA environment variable (generic|avx2|avx512) when it is set.
Isa cpu_isa();
// Best level compiled in and supported by this CPU, ignoring any override.
Isa supported_isa();
// Lower (or restore) the level used from now on; returns false when `isa` is
// above supported_isa(). Tests use it to run every compiled variant.
bool set_cpu_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace fastad

#if defined(FASTAD_HAVE_AVX512)
#define FASTAD_IF_AVX512(...) __VA_ARGS__
#else
#define FASTAD_IF_AVX512(...)
#endif
#if defined(FASTAD_HAVE_AVX2)
#define FASTAD_IF_AVX2(...) __VA_ARGS__
#else
#define FASTAD_IF_AVX2(...)
#endif

// Declare a kernel entry point in every ISA namespace:
//   FASTAD_DECLARE_KERNEL(void my_kernel(const float*, int64_t));
#define FASTAD_DECLARE_KERNEL(decl)                 \
  namespace fastad {                                \
  namespace isa_generic { decl; }                   \
  FASTAD_IF_AVX2(namespace isa_avx2 { decl; })      \
  FASTAD_IF_AVX512(namespace isa_avx512 { decl; })  \
  }

// Call the variant of `fn` for the current CPU: FASTAD_DISPATCH_KERNEL(my_kernel, a, b)
#define FASTAD_DISPATCH_KERNEL(fn, ...)                                          \
  [&]() {                                                                        \
    switch (::fastad::cpu_isa()) {                                               \
      FASTAD_IF_AVX512(case ::fastad::Isa::avx512: return ::fastad::isa_avx512::fn(__VA_ARGS__);) \
      FASTAD_IF_AVX2(case ::fastad::Isa::avx2: return ::fastad::isa_avx2::fn(__VA_ARGS__);)       \
      default: return ::fastad::isa_generic::fn(__VA_ARGS__);                    \
    }                                                                            \
  }()
