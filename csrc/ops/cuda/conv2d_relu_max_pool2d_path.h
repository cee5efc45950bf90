// The rule that picks the direct or the vendor path of a CUDA call of the
// fused conv2d -> ReLU -> max_pool2d operator (the paths and the policy:
// ops/conv_block_path.h). Host code only, compiled into every build, so
// that the CPU test suite checks it and ptfast.backends.cuda can report it
// on a machine without a GPU.
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/conv_block_path.h"

namespace ptfast::cuda {

using ops::ConvBlockPass;
using ops::ConvBlockPath;

// kDirect or kVendor. The backward is always the vendor one (the dense
// conv-output gradient from the codes, then cuDNN's convolution_backward):
// ptfast has no direct CUDA backward. The forward follows the CUDA policy;
// under `auto` it is the vendor path, which cannot be slower than native
// (it replaces native's ReLU and pooling kernels by one and saves less), as
// long as no GPU measurement has shown where the direct forward wins.
ConvBlockPath choose_path(
    const ops::Conv2dReluMaxPool2dShape& shape,
    const ops::Conv2dReluMaxPool2dParams& params, ConvBlockPass pass);

}  // namespace ptfast::cuda
