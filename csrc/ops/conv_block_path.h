// The two implementations of the fused conv2d -> ReLU -> max_pool2d block
// that every backend has, and the process-wide policy that picks between
// them (ptfast.backends.cpu.conv_block, ptfast.backends.cuda.conv_block):
//
//   direct  ptfast's own kernels compute the convolution;
//   vendor  ATen's convolution (oneDNN on the CPU, cuDNN on CUDA) computes
//           it, and ptfast runs only the epilogue (ReLU, pooling, 1-byte
//           arg-max codes) and, in the backward, the conv-output gradient
//           from the codes before ATen's convolution_backward.
//
// Both save the same tensors for backward (input, weight, codes), so the
// memory advantage over the native composite holds on either, and the codes
// mean the same on both: the forward and the backward of one call may take
// different paths. `auto` leaves the choice to the backend's measured rule
// (cpu/conv2d_relu_max_pool2d_path.h, cuda/conv2d_relu_max_pool2d_path.h).
#pragma once

#include <c10/core/DeviceType.h>

#include <string_view>

namespace ptfast::ops {

enum class ConvBlockPath : int { kAuto = 0, kDirect = 1, kVendor = 2 };

// The pass a path is chosen for.
enum class ConvBlockPass : int { kForward = 0, kBackward = 1 };

// The policy of the CPU or the CUDA backend, `auto` unless set;
// PTFAST_CPU_CONV_BLOCK and PTFAST_CUDA_CONV_BLOCK give the initial values
// (read by ptfast.backends).
ConvBlockPath conv_block_policy(c10::DeviceType device);
void set_conv_block_policy(c10::DeviceType device, ConvBlockPath path);

// "auto", "direct" or "vendor"; parse_conv_block_path returns false for any
// other name.
std::string_view conv_block_path_name(ConvBlockPath path);
bool parse_conv_block_path(std::string_view name, ConvBlockPath* path);

}  // namespace ptfast::ops
