// Runtime selection between copies of a CPU kernel compiled for different
// instruction sets.
//
// setup.py compiles every file in csrc/ops/cpu/isa/ once per instruction set
// (DEFAULT, and AVX2 / AVX512 on x86-64), defining CPU_CAPABILITY and
// CPU_CAPABILITY_<ISA> as ATen does, so at::vec::Vectorized takes the width of
// that instruction set. Each copy registers its entry point in an IsaDispatch
// table; the caller gets the best copy the running CPU supports, following
// torch's own choice (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable).
#pragma once

#include <c10/util/Exception.h>

namespace ptfast::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsas = 3;

// The best instruction set that torch uses on this CPU.
Isa current_isa();

template <typename Fn>
struct IsaDispatch {
  // Zero-initialised at load time, before any registration runs.
  Fn table[kNumIsas];

  Fn get(const char* name) const {
    for (int isa = static_cast<int>(current_isa()); isa >= 0; --isa) {
      if (table[isa] != nullptr) {
        return table[isa];
      }
    }
    TORCH_CHECK(false, "ptfast: no CPU kernel was compiled for ", name);
  }
};

#if defined(CPU_CAPABILITY_AVX512)
constexpr Isa kCompiledIsa = Isa::kAvx512;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr Isa kCompiledIsa = Isa::kAvx2;
#else
constexpr Isa kCompiledIsa = Isa::kDefault;
#endif

// Used at namespace scope in a file under csrc/ops/cpu/isa/: registers `fn`
// as this translation unit's copy of `stub`.
#define PTFAST_REGISTER_ISA_KERNEL(stub, fn)                            \
  static const bool stub##_registered = [] {                            \
    stub.table[static_cast<int>(::ptfast::cpu::kCompiledIsa)] = (fn); \
    return true;                                                        \
  }()

}  // namespace ptfast::cpu
