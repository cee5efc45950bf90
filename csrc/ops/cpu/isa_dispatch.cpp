#include "ops/cpu/isa_dispatch.h"

#include <ATen/Version.h>

#include <string>

namespace ptfast::cpu {

Isa current_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability.find("AVX512") != std::string::npos) {
      return Isa::kAvx512;
    }
    if (capability.find("AVX2") != std::string::npos) {
      return Isa::kAvx2;
    }
    return Isa::kDefault;
  }();
  return isa;
}

}  // namespace ptfast::cpu
