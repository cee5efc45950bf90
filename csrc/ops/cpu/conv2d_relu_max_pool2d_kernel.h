// Entry points of the vectorised CPU kernels of the fused
// conv2d -> ReLU -> max_pool2d operator (csrc/ops/cpu/isa/), one copy per
// instruction set. Tensors arrive validated and allocated, contiguous except
// where a comment says they are read by strides.
//
// The direct path computes the whole block (forward and backward) itself;
// the vendor path takes the convolution from ATen (oneDNN) and runs only the
// epilogue here (see conv2d_relu_max_pool2d_path.h for which path serves a
// call).
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/cpu/isa_dispatch.h"

namespace ptfast::cpu {

// The direct forward. Half-precision tensors (bfloat16, float16) are
// computed in float32 with the conv outputs rounded to their dtype before
// ReLU and pooling, as native's conv2d in that dtype stores them.
struct Conv2dReluMaxPool2dForwardArgs {
  const at::Tensor& input;   // (N, C, H, W)
  const at::Tensor& weight;  // (OC, C / groups, KH, KW)
  const at::Tensor& bias;    // (OC,) or undefined
  const at::Tensor& output;  // (N, OC, PH, PW), written
  const at::Tensor& codes;   // arg-max codes like output, or undefined
  const ops::Conv2dReluMaxPool2dShape& shape;
  const ops::Conv2dReluMaxPool2dParams& params;
};

struct Conv2dReluMaxPool2dBackwardArgs {
  const at::Tensor& grad_output;  // (N, OC, PH, PW)
  const at::Tensor& codes;        // arg-max codes from the forward
  const at::Tensor& input;
  const at::Tensor& weight;
  const at::Tensor& grad_input;   // written, or undefined if not needed
  const at::Tensor& grad_weight;  // written, or undefined if not needed
  const at::Tensor& grad_bias;    // written, or undefined if not needed
  const ops::Conv2dReluMaxPool2dShape& shape;
  const ops::Conv2dReluMaxPool2dParams& params;
  // Set when grad_weight is computed and `input` holds an inf or NaN, and
  // when grad_input is computed and `weight` does: the kernel sees that for
  // free while it stages them.
  bool* input_non_finite;
  bool* weight_non_finite;
};

// Roughly how many conv outputs make a task worth a thread of its own, for
// the vendor path's passes over whole conv planes (epilogue and gradient).
constexpr int64_t kGrainValues = 1 << 14;

// The vendor path's forward after ATen's convolution: ReLU, max-pooling
// and arg-max codes in one pass over the conv output.
struct Conv2dReluMaxPool2dEpilogueArgs {
  // (N, OC, conv_h, conv_w), bias included. The three are read and written
  // by strides: NCHW or channels-last, native's memory format for the call.
  const at::Tensor& conv;
  const at::Tensor& output;  // (N, OC, PH, PW), written
  const at::Tensor& codes;   // arg-max codes like output, or undefined
  const ops::Conv2dReluMaxPool2dShape& shape;
  const ops::Conv2dReluMaxPool2dParams& params;
};

using Conv2dReluMaxPool2dForwardFn =
    void (*)(const Conv2dReluMaxPool2dForwardArgs&);
using Conv2dReluMaxPool2dBackwardFn =
    void (*)(const Conv2dReluMaxPool2dBackwardArgs&);
using Conv2dReluMaxPool2dEpilogueFn =
    void (*)(const Conv2dReluMaxPool2dEpilogueArgs&);

extern IsaDispatch<Conv2dReluMaxPool2dForwardFn>
    conv2d_relu_max_pool2d_forward_stub;
extern IsaDispatch<Conv2dReluMaxPool2dBackwardFn>
    conv2d_relu_max_pool2d_backward_stub;
extern IsaDispatch<Conv2dReluMaxPool2dEpilogueFn>
    conv2d_relu_max_pool2d_epilogue_stub;

}  // namespace ptfast::cpu
