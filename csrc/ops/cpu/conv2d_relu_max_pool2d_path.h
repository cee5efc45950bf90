// The measured rule that picks the direct or the vendor path of a CPU call
// of the fused conv2d -> ReLU -> max_pool2d operator (the paths and the
// policy: ops/conv_block_path.h). The direct kernels live in
// csrc/ops/cpu/isa/; the vendor path runs oneDNN through ATen.
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/conv_block_path.h"

namespace ptfast::cpu {

using ops::ConvBlockPass;
using ops::ConvBlockPath;

// kDirect or kVendor for a call in `dtype`: the CPU policy, or under `auto`
// the measured rule.
ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& shape,
    const ops::Conv2dReluMaxPool2dParams& params, ConvBlockPass pass,
    at::ScalarType dtype);

// Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16, and AMX on
// the Xeons that have it), which oneDNN's bfloat16 convolutions use.
bool cpu_has_bfloat16_dot_products();

}  // namespace ptfast::cpu
