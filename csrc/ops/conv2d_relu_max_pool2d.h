// The fused conv2d -> ReLU -> max_pool2d operator: the argument checks and
// shape rules every backend (CPU, CUDA) shares.
#pragma once

#include "ops/geometry.h"

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/FunctionRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace ptfast::ops {

// The non-tensor arguments of the operator, each a (height, width) pair.
struct Conv2dReluMaxPool2dParams {
  std::array<int64_t, 2> stride;
  std::array<int64_t, 2> padding;
  std::array<int64_t, 2> dilation;
  int64_t groups;
  std::array<int64_t, 2> pool_kernel;
  std::array<int64_t, 2> pool_stride;
  std::array<int64_t, 2> pool_padding;
  bool ceil_mode;

  // Whether neighbouring pooling windows share conv outputs.
  bool pool_windows_overlap() const {
    return pool_stride[0] < pool_kernel[0] || pool_stride[1] < pool_kernel[1];
  }
};

// Every size a kernel needs, derived once from the tensors and the params.
struct Conv2dReluMaxPool2dShape {
  int64_t batch;
  int64_t in_channels;
  int64_t in_h, in_w;
  int64_t out_channels;
  int64_t kernel_h, kernel_w;
  int64_t conv_h, conv_w;
  int64_t pooled_h, pooled_w;

  int64_t in_channels_per_group(const Conv2dReluMaxPool2dParams& p) const {
    return in_channels / p.groups;
  }
  int64_t out_channels_per_group(const Conv2dReluMaxPool2dParams& p) const {
    return out_channels / p.groups;
  }
};

// The pooling part of the geometry, for geometry::gather_gradient.
geometry::PoolGeometry pool_geometry(
    const Conv2dReluMaxPool2dShape& shape,
    const Conv2dReluMaxPool2dParams& params);

// Validates the list arguments (two entries each, positive where required)
// and packs them. Errors name the offending argument.
Conv2dReluMaxPool2dParams make_conv2d_relu_max_pool2d_params(
    c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode);

// Validates the tensors against each other and the params, and returns the
// shape of the whole computation. Errors name the offending argument.
Conv2dReluMaxPool2dShape check_conv2d_relu_max_pool2d_inputs(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const Conv2dReluMaxPool2dParams& params);

// Validates the extra tensors the backward receives.
void check_conv2d_relu_max_pool2d_backward_inputs(
    const at::Tensor& grad_output, const at::Tensor& codes,
    const at::Tensor& input, const Conv2dReluMaxPool2dShape& shape,
    const Conv2dReluMaxPool2dParams& params);

// The memory format of native conv2d's output and of its input and weight
// gradients, which relu and max_pool2d keep: channels-last when the input or
// the weight suggests it (ATen's mkldnn/thnn_conv_use_channels_last), else
// contiguous. The fused op's output, codes and gradients all follow it.
at::MemoryFormat conv2d_relu_max_pool2d_memory_format(
    const at::Tensor& input, const at::Tensor& weight);

// How a backend's kernel wants the tensors laid out.
enum class KernelLayout {
  // Tensors made contiguous (NCHW), outputs allocated NCHW; the backend
  // returns forward_result / backward_result, which move the outputs into
  // native's memory format.
  kContiguous,
  // input, weight and bias as given (ATen's convolution reads any strides);
  // grad_output and codes made contiguous in native's memory format and the
  // outputs allocated in it. The kernel reads and writes by strides.
  kNative,
};

// What a backend's forward kernel works on: the validated arguments, the
// tensors laid out as the kernel asked and the outputs allocated.
struct ForwardTensors {
  Conv2dReluMaxPool2dParams params;
  Conv2dReluMaxPool2dShape shape;
  at::MemoryFormat memory_format;  // native's, for the results
  KernelLayout layout;
  at::Tensor input, weight, bias;  // bias undefined if none
  at::Tensor output;               // (N, OC, PH, PW)
  at::Tensor codes;                // like output, or undefined if not asked
};

// Chooses the kernel layout once the shape is known (the CPU backend picks
// its path from it).
using ChooseKernelLayout = c10::function_ref<KernelLayout(
    const Conv2dReluMaxPool2dShape&, const Conv2dReluMaxPool2dParams&)>;

ForwardTensors prepare_forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode, bool with_codes,
    ChooseKernelLayout choose_layout);

// The output and codes in native's memory format (a copy of the pooled
// output, a quarter of the conv output or less, after a kContiguous kernel).
std::tuple<at::Tensor, at::Tensor> forward_result(const ForwardTensors& t);

// The same for a backward kernel. The gradients stay undefined until
// allocate_gradients: the paths through ATen's convolution_backward get
// theirs from it, and an allocation of their own would only raise the
// step's peak memory by the size of the input.
struct BackwardTensors {
  Conv2dReluMaxPool2dParams params;
  Conv2dReluMaxPool2dShape shape;
  at::MemoryFormat memory_format;  // native's, for the results
  KernelLayout layout;
  std::array<bool, 3> output_mask;  // gradients wanted: input, weight, bias
  at::Tensor grad_output, codes, input, weight;
  at::Tensor grad_input, grad_weight, grad_bias;
};

BackwardTensors prepare_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask, ChooseKernelLayout choose_layout);

// Allocates (does not fill) the gradients t.output_mask asks for, in
// `dtype` and in the memory format of t.layout.
void allocate_gradients(BackwardTensors& t, at::ScalarType dtype);

// The gradients in native's memory format.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const BackwardTensors& t);

// A backend's forward, computing the arg-max codes only when asked.
using BackendForward = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode, bool with_codes);

// The kernels a backend registers for the public op and the op with codes,
// both from its one forward.
template <BackendForward forward>
struct ForwardKernels {
  static at::Tensor without_codes(
      const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
      c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
      c10::IntArrayRef pool_padding, bool ceil_mode) {
    return std::get<0>(forward(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode,
        /*with_codes=*/false));
  }

  static std::tuple<at::Tensor, at::Tensor> with_codes(
      const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
      c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
      c10::IntArrayRef pool_padding, bool ceil_mode) {
    return forward(
        input, weight, bias, stride, padding, dilation, groups,
        pool_kernel_size, pool_stride, pool_padding, ceil_mode,
        /*with_codes=*/true);
  }
};

// Calls through the dispatcher, for kernels that build on the ops.
at::Tensor conv2d_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode);

std::tuple<at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_with_codes(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::IntArrayRef pool_kernel_size, c10::IntArrayRef pool_stride,
    c10::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask);

// uint8 when every arg-max code of a pooling window fits, int32 otherwise.
at::ScalarType argmax_code_dtype(const Conv2dReluMaxPool2dParams& params);

// Runs fn(code_t{}) with the arg-max code type the forward chose. A plain
// template, for the CPU kernels and the CUDA ones (nvcc) alike.
template <typename Fn>
void dispatch_code_type(at::ScalarType code_type, const Fn& fn) {
  if (code_type == at::kByte) {
    fn(uint8_t{});
  } else {
    fn(int32_t{});
  }
}

}  // namespace ptfast::ops
