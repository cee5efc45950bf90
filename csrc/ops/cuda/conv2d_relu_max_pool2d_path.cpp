// The choice between the direct and the vendor path of the CUDA fused
// conv2d -> ReLU -> max_pool2d operator (see the header).
#include "ops/cuda/conv2d_relu_max_pool2d_path.h"

namespace ptfast::cuda {

ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& /*shape*/,
    const ops::Conv2dReluMaxPool2dParams& /*params*/, ConvBlockPass pass) {
  const ConvBlockPath forced = ops::conv_block_policy(c10::DeviceType::CUDA);
  if (pass == ConvBlockPass::kBackward || forced == ConvBlockPath::kAuto) {
    return ConvBlockPath::kVendor;
  }
  return forced;
}

}  // namespace ptfast::cuda
