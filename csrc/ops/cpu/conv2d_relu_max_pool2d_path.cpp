// The choice between the direct and the vendor path of the CPU fused
// conv2d -> ReLU -> max_pool2d operator (see the header).
#include "ops/cpu/conv2d_relu_max_pool2d_path.h"

#include <atomic>

namespace ptfast::cpu {
namespace {

std::atomic<int> policy{static_cast<int>(ConvBlockPath::kAuto)};

}  // namespace

ConvBlockPath conv_block_policy() {
  return static_cast<ConvBlockPath>(policy.load(std::memory_order_relaxed));
}

void set_conv_block_policy(ConvBlockPath path) {
  policy.store(static_cast<int>(path), std::memory_order_relaxed);
}

std::string_view conv_block_path_name(ConvBlockPath path) {
  switch (path) {
    case ConvBlockPath::kDirect:
      return "direct";
    case ConvBlockPath::kVendor:
      return "vendor";
    default:
      return "auto";
  }
}

bool parse_conv_block_path(std::string_view name, ConvBlockPath* path) {
  for (ConvBlockPath candidate :
       {ConvBlockPath::kAuto, ConvBlockPath::kDirect, ConvBlockPath::kVendor}) {
    if (name == conv_block_path_name(candidate)) {
      *path = candidate;
      return true;
    }
  }
  return false;
}

ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p, ConvBlockPass pass) {
  const ConvBlockPath forced = conv_block_policy();
  if (forced != ConvBlockPath::kAuto) {
    return forced;
  }
  // RULE: calibrated below from benchmarks (placeholder).
  const int64_t reduction =
      s.in_channels_per_group(p) * s.kernel_h * s.kernel_w;
  const int64_t threshold = pass == ConvBlockPass::kForward ? 1024 : 512;
  return reduction >= threshold ? ConvBlockPath::kVendor
                                : ConvBlockPath::kDirect;
}

}  // namespace ptfast::cpu
