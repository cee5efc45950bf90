// The choice between the direct and the vendor path of the CPU fused
// conv2d -> ReLU -> max_pool2d operator (see the header).
#include "ops/cpu/conv2d_relu_max_pool2d_path.h"

#include <ATen/Parallel.h>

namespace ptfast::cpu {

bool cpu_has_bfloat16_dot_products() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p, ConvBlockPass pass,
    at::ScalarType dtype) {
  const ConvBlockPath forced = ops::conv_block_policy(c10::DeviceType::CPU);
  if (forced != ConvBlockPath::kAuto) {
    return forced;
  }
  const int64_t products = s.in_channels_per_group(p) * s.kernel_h * s.kernel_w;
  // Half precision (README, "Half precision on the CPU"; a Xeon with AMX).
  // bfloat16 on a CPU with bfloat16 dot products: oneDNN's convolution beats
  // the direct kernels (which compute in float32) from about 150 products
  // per output in the forward (16 -> 32, 3x3, N64: 1.7x) and 250-290 in the
  // backward (10 -> 20, 5x5: direct 1.3x faster; 32 -> 64, 3x3: vendor
  // 1.6x), given enough work to pay for oneDNN's per-call cost. In the
  // forward that work is counted as oneDNN's AMX kernels do it: in tiles of
  // 16 output channels (MNIST block 2's 20 channels fill 20 of 32 lanes),
  // and per thread, since the per-call cost does not shrink with threads.
  // Measured (benchmarks/NOTES.md, vendor time / direct time, 1 thread and
  // 2), the paths cross at 2^23 multiply-adds per thread: 32 -> 64 k3 N2
  // (2^23.2) 0.79 and 1.18, 16 -> 32 k3 N7 (2^23.0) 1.08 and 1.60, N14 0.64
  // and 0.76; MNIST block 2 N64 (2^23.6 in tiles) 0.88-1.03 and 1.04-1.16,
  // N128 0.85 and 0.89-0.95. The backward keeps the plain count, 2^24.
  // float16: oneDNN has no fast float16 convolution without AMX-FP16
  // (10 -> 20, 5x5: 4x slower forward than direct), and ATen's float16
  // convolution_backward is 100x-250x slower than the direct backward, which
  // therefore serves every float16 backward. Below these thresholds (and on
  // other CPUs) the float32 rule applies.
  constexpr double kBfloat16ForwardVendorFromMultiplyAddsPerThread = 1 << 23;
  constexpr int64_t kBfloat16BackwardVendorFromMultiplyAdds = int64_t{1} << 24;
  constexpr int64_t kAmxTileChannels = 16;
  if (dtype == at::kBFloat16 && cpu_has_bfloat16_dot_products()) {
    const int64_t multiply_adds =
        s.batch * s.out_channels * s.conv_h * s.conv_w * products;
    if (pass == ConvBlockPass::kForward) {
      const int64_t out_group = s.out_channels_per_group(p);
      const int64_t tile_channels =
          (out_group + kAmxTileChannels - 1) / kAmxTileChannels *
          kAmxTileChannels;
      const double tile_multiply_adds_per_thread =
          static_cast<double>(multiply_adds) * out_group / tile_channels /
          at::get_num_threads();
      if (products >= 128 &&
          tile_multiply_adds_per_thread >=
              kBfloat16ForwardVendorFromMultiplyAddsPerThread) {
        return ConvBlockPath::kVendor;
      }
    } else if (
        products >= 256 &&
        multiply_adds >= kBfloat16BackwardVendorFromMultiplyAdds) {
      return ConvBlockPath::kVendor;
    }
  } else if (dtype == at::kHalf && pass == ConvBlockPass::kBackward) {
    return ConvBlockPath::kDirect;
  }
  // The direct kernels win by far where each conv output sums few products
  // (the MNIST, LeNet and CIFAR-input blocks: 3.5x-8x eager), and lose
  // where it sums many: oneDNN's convolution is register-blocked over input
  // channels, the direct kernels are not. Measured (benchmarks/NOTES.md,
  // "Direct or vendor"), the two cross between 288 products per output
  // (32 -> 64 channels, 3x3: direct 1.5x-2x faster in both passes) and 400
  // (16 -> 32, 5x5: vendor 1.2x-1.4x faster); between 320 and 600 they are
  // within 30% of each other, and the vendor path is preferred there
  // because it cannot fall behind native.
  constexpr int64_t kVendorFromProducts = 320;
  if (products >= kVendorFromProducts) {
    return ConvBlockPath::kVendor;
  }
  // Overlapping pooling windows send the direct backward down its general
  // path, which updates the staged gradients position by position: 2x-2.9x
  // slower than the vendor backward on SqueezeNet's and AlexNet's 3x3/2
  // pooling, even with 27 products per output, while the direct forward
  // stays 1.3x-4x faster.
  if (pass == ConvBlockPass::kBackward && p.pool_windows_overlap()) {
    return ConvBlockPath::kVendor;
  }
  return ConvBlockPath::kDirect;
}

}  // namespace ptfast::cpu
