// What the forward and backward CPU kernels of the fused
// conv2d -> ReLU -> max_pool2d operator share. Included by the files of this
// folder only, each compiled once per instruction set.
#pragma once

#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"

#include <cstdint>

namespace ptfast::cpu {
namespace {

// Roughly how many multiply-adds make a task worth a thread of its own.
constexpr int64_t kGrainFlops = 1 << 15;

}  // namespace
}  // namespace ptfast::cpu
