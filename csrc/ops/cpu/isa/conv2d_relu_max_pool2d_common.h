// What the forward and backward CPU kernels of the fused
// conv2d -> ReLU -> max_pool2d operator share. Included by the files of this
// folder only, each compiled once per instruction set.
#pragma once

#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ptfast::cpu {
namespace {

// Roughly how many multiply-adds make a task worth a thread of its own.
constexpr int64_t kGrainFlops = 1 << 15;

// Runs fn(code_t{}) with the arg-max code type the forward chose.
template <typename Fn>
void dispatch_code_type(at::ScalarType code_type, const Fn& fn) {
  if (code_type == at::kByte) {
    fn(uint8_t{});
  } else {
    fn(int32_t{});
  }
}

}  // namespace
}  // namespace ptfast::cpu
