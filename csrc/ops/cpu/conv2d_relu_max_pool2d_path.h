// Which implementation serves a CPU call of the fused
// conv2d -> ReLU -> max_pool2d operator:
//
//   direct  ptfast's own kernels compute the convolution and its gradients
//           (csrc/ops/cpu/isa/): fastest where channel counts are small;
//   vendor  ATen's convolution and convolution_backward (oneDNN) compute
//           them, and ptfast runs only the epilogue (ReLU, pooling, codes)
//           and the sparse-to-dense conv-output gradient.
//
// Both save the same tensors for backward (input, weight, 1-byte codes), so
// the memory advantage over the native composite holds on either, and the
// forward and the backward of one call may take different paths: the codes
// mean the same on both. `auto` picks by the measured rule in choose_path().
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"

#include <string_view>

namespace ptfast::cpu {

enum class ConvBlockPath : int { kAuto = 0, kDirect = 1, kVendor = 2 };

// The process-wide policy (ptfast.backends.cpu.conv_block), `auto` unless
// set; PTFAST_CPU_CONV_BLOCK gives its initial value.
ConvBlockPath conv_block_policy();
void set_conv_block_policy(ConvBlockPath path);

// "auto", "direct" or "vendor"; parse_conv_block_path returns false for any
// other name.
std::string_view conv_block_path_name(ConvBlockPath path);
bool parse_conv_block_path(std::string_view name, ConvBlockPath* path);

// The pass a path is chosen for.
enum class ConvBlockPass : int { kForward = 0, kBackward = 1 };

// kDirect or kVendor for a call in `dtype`: the policy, or under `auto` the
// measured rule.
ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& shape,
    const ops::Conv2dReluMaxPool2dParams& params, ConvBlockPass pass,
    at::ScalarType dtype);

// Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16, and AMX on
// the Xeons that have it), which oneDNN's bfloat16 convolutions use.
bool cpu_has_bfloat16_dot_products();

}  // namespace ptfast::cpu
