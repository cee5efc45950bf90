// The process-wide direct/vendor policy of each backend (see the header).
#include "ops/conv_block_path.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace ptfast::ops {
namespace {

std::atomic<int> cpu_policy{static_cast<int>(ConvBlockPath::kAuto)};
std::atomic<int> cuda_policy{static_cast<int>(ConvBlockPath::kAuto)};

std::atomic<int>& policy_of(c10::DeviceType device) {
  TORCH_CHECK(
      device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA,
      "ptfast.backends: `device` must be cpu or cuda, got ", device);
  return device == c10::DeviceType::CPU ? cpu_policy : cuda_policy;
}

}  // namespace

ConvBlockPath conv_block_policy(c10::DeviceType device) {
  return static_cast<ConvBlockPath>(
      policy_of(device).load(std::memory_order_relaxed));
}

void set_conv_block_policy(c10::DeviceType device, ConvBlockPath path) {
  policy_of(device).store(static_cast<int>(path), std::memory_order_relaxed);
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

}  // namespace ptfast::ops
