// CPU dispatch-key kernels of the fused conv2d -> ReLU -> max_pool2d
// operator: validate, lay out and allocate, choose the direct or the vendor
// path (conv2d_relu_max_pool2d_path.h), then run the best vectorised copy of
// the kernels for this CPU (csrc/ops/cpu/isa/).
#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"
#include "ops/checks.h"
#include "ops/cpu/conv2d_relu_max_pool2d_path.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/col2im.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ptfast::cpu {

IsaDispatch<Conv2dReluMaxPool2dForwardFn> conv2d_relu_max_pool2d_forward_stub;
IsaDispatch<Conv2dReluMaxPool2dBackwardFn> conv2d_relu_max_pool2d_backward_stub;
IsaDispatch<Conv2dReluMaxPool2dEpilogueFn> conv2d_relu_max_pool2d_epilogue_stub;

namespace {

constexpr const char* kOp = "ptfast.conv2d_relu_max_pool2d";

// (N, OC, conv_h * conv_w) bool: conv outputs whose gradient is zero.
at::Tensor conv_positions_without_gradient(
    const at::Tensor& codes, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const at::Tensor code = codes.to(at::kLong);
  const at::Tensor position = (code - 1).clamp_min(0);
  const auto options = code.options();
  const at::Tensor oh =
      at::arange(s.pooled_h, options).view({1, 1, -1, 1}) * p.pool_stride[0] -
      p.pool_padding[0] + position.div(p.pool_kernel[1], "floor");
  const at::Tensor ow =
      at::arange(s.pooled_w, options).view({1, 1, 1, -1}) * p.pool_stride[1] -
      p.pool_padding[1] + position.remainder(p.pool_kernel[1]);
  const int64_t positions = s.conv_h * s.conv_w;
  // Windows without gradient scatter into one extra, discarded slot.
  const at::Tensor index =
      (oh * s.conv_w + ow)
          .masked_fill(code == geometry::kNoGradient, positions);
  at::Tensor has_gradient = at::zeros(
      {s.batch, s.out_channels, positions + 1}, options.dtype(at::kBool));
  has_gradient.scatter_(2, index.flatten(2), true);
  return has_gradient.narrow(2, 0, positions).logical_not();
}

// The sparse backward adds nothing for conv outputs that receive no gradient,
// while the native composite multiplies their zero gradient by the input
// (for grad_weight) and by the weight (for grad_input): 0 * inf and 0 * NaN
// make NaN there. This sets those entries to NaN, so that non-finite values
// propagate exactly as in native torch. Only called when `input` (for
// grad_weight) or `weight` (for grad_input) holds a non-finite value.
void propagate_non_finite_like_native(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& codes,
    const at::Tensor& grad_input, const at::Tensor& grad_weight,
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const int64_t taps = in_group * s.kernel_h * s.kernel_w;
  const std::array<int64_t, 2> kernel{s.kernel_h, s.kernel_w};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor idle =
      conv_positions_without_gradient(codes, s, p).to(input.scalar_type());
  for (int64_t g = 0; g < p.groups; ++g) {
    const at::Tensor idle_g = idle.narrow(1, g * out_group, out_group);
    if (grad_weight.defined()) {
      // (N, taps, positions): which taps of each conv output read a
      // non-finite input value.
      const at::Tensor bad_taps = at::im2col(
          at::isfinite(input.narrow(1, g * in_group, in_group))
              .logical_not()
              .to(input.scalar_type()),
          kernel, p.dilation, p.padding, p.stride);
      const at::Tensor reached =
          at::matmul(idle_g, bad_taps.transpose(1, 2)).sum(0) > 0;
      grad_weight.narrow(0, g * out_group, out_group)
          .view({out_group, taps})
          .masked_fill_(reached, nan);
    }
    if (grad_input.defined()) {
      const at::Tensor bad_weight =
          at::isfinite(weight.narrow(0, g * out_group, out_group)
                           .reshape({out_group, taps}))
              .logical_not()
              .to(input.scalar_type());
      // (N, taps, positions) -> (N, in_group, H, W): inputs that a
      // non-finite weight meets at a conv output without gradient.
      const at::Tensor reached =
          at::col2im(
              at::matmul(bad_weight.t(), idle_g), {s.in_h, s.in_w}, kernel,
              p.dilation, p.padding, p.stride) > 0;
      grad_input.narrow(1, g * in_group, in_group).masked_fill_(reached, nan);
    }
  }
}

// The layout each path's kernels read: the direct kernels index NCHW, the
// vendor path reads and writes by strides, so a channels-last call reaches
// ATen's convolution (and its output the epilogue) without a copy.
ops::KernelLayout kernel_layout(ConvBlockPath path) {
  return path == ConvBlockPath::kVendor ? ops::KernelLayout::kNative
                                        : ops::KernelLayout::kContiguous;
}

// Whether the vendor forward convolves a channels-last copy of an NCHW
// input. oneDNN's bfloat16 convolution of NCHW tensors reorders input and
// output to and from its blocked layout around every call, and that costs
// more than the copy: 2 threads, bfloat16 inference, NCHW / channels-last
// conv (copy and the epilogue's transposes included): VGG 64->128 k3 112x112
// 2.6x, CIFAR 32->64 k3 1.5x, MNIST block 2 N256 1.2x, VGG 256->256 k3 1.3x,
// AlexNet 64->192 k5 1.15x. From 4096 products per output the conv's own
// work hides the reorders (VGG 512->512 k3: 0.92x-0.97x) and the input stays
// NCHW. float32's NCHW convolution gains little that way (0.9x-1.1x), and
// float16 was not measured.
bool convolve_channels_last(const ops::ForwardTensors& t) {
  constexpr int64_t kChannelsLastBelowProducts = 4096;
  const auto& s = t.shape;
  const int64_t products =
      s.in_channels_per_group(t.params) * s.kernel_h * s.kernel_w;
  return t.input.scalar_type() == at::kBFloat16 &&
      products < kChannelsLastBelowProducts && t.input.is_contiguous() &&
      t.weight.is_contiguous() &&
      !t.input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The vendor forward: ATen's convolution (oneDNN), then the epilogue. The
// conv output is scratch, freed on return; it comes in native's memory
// format (channels-last for a channels-last input or weight), or
// channels-last for a bfloat16 call convolved that way
// (convolve_channels_last); the epilogue reads either as it is, and writes
// the output in native's format.
void vendor_forward(const ops::ForwardTensors& t) {
  const auto& p = t.params;
  const at::Tensor conv = at::convolution(
      convolve_channels_last(t)
          ? t.input.contiguous(at::MemoryFormat::ChannelsLast)
          : t.input,
      t.weight, t.bias, p.stride, p.padding, p.dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, p.groups);
  conv2d_relu_max_pool2d_epilogue_stub.get("conv2d_relu_max_pool2d_epilogue")(
      {conv, t.output, t.codes, t.shape, t.params});
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool with_codes) {
  ConvBlockPath path = ConvBlockPath::kDirect;
  const auto t = ops::prepare_forward(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
      pool_stride, pool_padding, ceil_mode, with_codes,
      [&](const ops::Conv2dReluMaxPool2dShape& s,
          const ops::Conv2dReluMaxPool2dParams& p) {
        path = choose_path(s, p, ConvBlockPass::kForward, input.scalar_type());
        return kernel_layout(path);
      });
  ops::check_cpu_dtype(kOp, t.input, "input");
  if (t.output.numel() == 0) {
    return ops::forward_result(t);
  }
  if (path == ConvBlockPath::kVendor) {
    vendor_forward(t);
  } else {
    conv2d_relu_max_pool2d_forward_stub.get("conv2d_relu_max_pool2d")(
        {t.input, t.weight, t.bias, t.output, t.codes, t.shape, t.params});
  }
  // The direct kernels write NCHW; for a channels-last call this copies the
  // pooled output (a quarter of the conv output or less) and the 1-byte codes.
  return ops::forward_result(t);
}

// The conv-output gradient the native composite forms: each pooled
// output's gradient at its window's arg-max, zero elsewhere (and wherever
// the code says ReLU blocked the window). Overlapping windows add in pooled
// row-major order, the order of max_pool2d's own backward, so the sums are
// bitwise the native ones. The codes were checked to name taps inside the
// conv plane (check_codes_name_taps).
//
// The three tensors share native's memory format but are read and written by
// their own strides, so NCHW and channels-last take the same code. An NCHW
// plane is zeroed here, by the thread that then adds into it; a plane with
// other strides arrives zeroed (its elements interleave with other planes').
template <typename scalar_t, typename code_t>
void conv_output_gradient_typed(
    const at::Tensor& grad_output, const at::Tensor& codes,
    const at::Tensor& grad_conv, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const int64_t plane_size = s.conv_h * s.conv_w;
  // Half-precision gradients add up in a float32 plane, rounded once.
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAccumulateApart = !std::is_same_v<acc_t, scalar_t>;
  const scalar_t* grad = grad_output.const_data_ptr<scalar_t>();
  const code_t* code = codes.const_data_ptr<code_t>();
  scalar_t* dense = grad_conv.mutable_data_ptr<scalar_t>();
  const auto gs = grad_output.strides();
  const auto cs = codes.strides();
  const auto ds = grad_conv.strides();
  const bool zero_planes = ds[3] == 1 && ds[2] == s.conv_w;
  at::parallel_for(
      0, s.batch * s.out_channels,
      std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, plane_size)),
      [&](int64_t begin, int64_t end) {
        std::vector<acc_t> sums(kAccumulateApart ? plane_size : 0);
        for (int64_t index = begin; index < end; ++index) {
          const int64_t n = index / s.out_channels;
          const int64_t channel = index % s.out_channels;
          scalar_t* plane = dense + n * ds[0] + channel * ds[1];
          // Where the sums go: the plane itself, by its strides, or (half
          // precision) a float32 plane, row-major, copied into it at the end.
          acc_t* sum_plane = nullptr;
          int64_t sum_h_stride = s.conv_w;
          int64_t sum_w_stride = 1;
          if constexpr (kAccumulateApart) {
            sum_plane = sums.data();
            std::fill(sums.begin(), sums.end(), acc_t(0));
          } else {
            sum_plane = plane;
            sum_h_stride = ds[2];
            sum_w_stride = ds[3];
            if (zero_planes) {
              std::fill(plane, plane + plane_size, scalar_t(0));
            }
          }
          const scalar_t* plane_grad = grad + n * gs[0] + channel * gs[1];
          const code_t* plane_code = code + n * cs[0] + channel * cs[1];
          for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
            for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
              const int64_t c =
                  static_cast<int64_t>(plane_code[ph * cs[2] + pw * cs[3]]);
              if (c == geometry::kNoGradient) {
                continue;
              }
              int64_t dy = 0;
              int64_t dx = 0;
              geometry::decode_argmax(c, p.pool_kernel[1], dy, dx);
              const int64_t oh = ph * p.pool_stride[0] - p.pool_padding[0] + dy;
              const int64_t ow = pw * p.pool_stride[1] - p.pool_padding[1] + dx;
              sum_plane[oh * sum_h_stride + ow * sum_w_stride] +=
                  static_cast<acc_t>(plane_grad[ph * gs[2] + pw * gs[3]]);
            }
          }
          if constexpr (kAccumulateApart) {
            for (int64_t oh = 0; oh < s.conv_h; ++oh) {
              for (int64_t ow = 0; ow < s.conv_w; ++ow) {
                plane[oh * ds[2] + ow * ds[3]] =
                    static_cast<scalar_t>(sums[oh * s.conv_w + ow]);
              }
            }
          }
        }
      });
}

// Both backward paths index by the codes: a code that names no tap of its
// pooling window inside the conv output (only a caller of the raw op can
// pass one) raises an error here instead of reading or writing out of
// bounds. Every code must lie in [0, taps], checked by one reduction the
// compiler vectorises (a few microseconds for MNIST's N64 codes; at::aminmax
// took 75 us); only windows the conv plane clips (pool padding, ceil_mode)
// are then checked position by position.
template <typename code_t>
bool codes_name_taps(
    const at::Tensor& codes, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const code_t* data = codes.const_data_ptr<code_t>();  // dense
  const int64_t taps = p.pool_kernel[0] * p.pool_kernel[1];
  code_t low = 0;
  code_t high = 0;
  for (int64_t i = 0; i < codes.numel(); ++i) {
    low = std::min(low, data[i]);
    high = std::max(high, data[i]);
  }
  if (low < 0 || static_cast<int64_t>(high) > taps) {
    return false;
  }
  const auto clipped = [](int64_t pooled, int64_t axis, int64_t conv_size,
                          const ops::Conv2dReluMaxPool2dParams& q) {
    std::vector<int64_t> indices;
    for (int64_t i = 0; i < pooled; ++i) {
      const int64_t origin = i * q.pool_stride[axis] - q.pool_padding[axis];
      if (origin < 0 || origin + q.pool_kernel[axis] > conv_size) {
        indices.push_back(i);
      }
    }
    return indices;
  };
  const std::vector<int64_t> rows = clipped(s.pooled_h, 0, s.conv_h, p);
  const std::vector<int64_t> columns = clipped(s.pooled_w, 1, s.conv_w, p);
  const auto cs = codes.strides();
  const auto names_a_tap = [&](const code_t* plane, int64_t ph, int64_t pw) {
    const int64_t c = static_cast<int64_t>(plane[ph * cs[2] + pw * cs[3]]);
    if (c == geometry::kNoGradient) {
      return true;
    }
    int64_t dy = 0;
    int64_t dx = 0;
    geometry::decode_argmax(c, p.pool_kernel[1], dy, dx);
    const int64_t oh = ph * p.pool_stride[0] - p.pool_padding[0] + dy;
    const int64_t ow = pw * p.pool_stride[1] - p.pool_padding[1] + dx;
    return oh >= 0 && oh < s.conv_h && ow >= 0 && ow < s.conv_w;
  };
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t channel = 0; channel < s.out_channels; ++channel) {
      const code_t* plane = data + n * cs[0] + channel * cs[1];
      for (const int64_t ph : rows) {
        for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
          if (!names_a_tap(plane, ph, pw)) {
            return false;
          }
        }
      }
      for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
        for (const int64_t pw : columns) {
          if (!names_a_tap(plane, ph, pw)) {
            return false;
          }
        }
      }
    }
  }
  return true;
}

void check_codes_name_taps(
    const at::Tensor& codes, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  bool valid = true;
  ops::dispatch_code_type(codes.scalar_type(), [&](auto code) {
    valid = codes_name_taps<decltype(code)>(codes, s, p);
  });
  TORCH_CHECK(
      valid,
      "ptfast.conv2d_relu_max_pool2d: `codes` holds a code that names no tap "
      "of its pooling window inside the conv output (codes must come from "
      "_conv2d_relu_max_pool2d_with_codes with the same arguments)");
}

// The vendor backward: the dense conv-output gradient, then ATen's
// convolution_backward (oneDNN) for exactly the gradients asked for. Like
// native eager, its weight and bias gradients are the same from run to run
// but may differ in the last bits with the number of threads: oneDNN splits
// their reduction over the batch by thread (README, "Limits").
std::tuple<at::Tensor, at::Tensor, at::Tensor> vendor_backward(
    const ops::BackwardTensors& t, std::array<bool, 3> output_mask) {
  const auto& s = t.shape;
  const auto& p = t.params;
  // In native's memory format, the one convolution_backward computes in: a
  // channels-last call reaches oneDNN without a copy.
  const std::array<int64_t, 4> conv_sizes{
      s.batch, s.out_channels, s.conv_h, s.conv_w};
  const auto options = t.grad_output.options().memory_format(t.memory_format);
  at::Tensor grad_conv = t.memory_format == at::MemoryFormat::Contiguous
                             ? at::empty(conv_sizes, options)
                             : at::zeros(conv_sizes, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.grad_output.scalar_type(),
      "conv2d_relu_max_pool2d_conv_gradient", [&] {
        ops::dispatch_code_type(t.codes.scalar_type(), [&](auto code) {
          conv_output_gradient_typed<scalar_t, decltype(code)>(
              t.grad_output, t.codes, grad_conv, s, p);
        });
      });
  const std::array<int64_t, 1> bias_sizes{s.out_channels};
  return at::convolution_backward(
      grad_conv, t.input, t.weight,
      output_mask[2] ? at::OptionalIntArrayRef(bias_sizes)
                     : at::OptionalIntArrayRef(),
      p.stride, p.padding, p.dilation, /*transposed=*/false,
      /*output_padding=*/{0, 0}, p.groups, output_mask);
}

// The direct backward, in the dtype of `t`'s tensors (float32 or float64),
// into gradients it allocates.
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward(
    ops::BackwardTensors t) {
  ops::allocate_gradients(t, t.input.scalar_type());
  bool input_non_finite = false;
  bool weight_non_finite = false;
  conv2d_relu_max_pool2d_backward_stub.get("_conv2d_relu_max_pool2d_backward")(
      {t.grad_output, t.codes, t.input, t.weight, t.grad_input, t.grad_weight,
       t.grad_bias, t.shape, t.params, &input_non_finite, &weight_non_finite});
  if (input_non_finite || weight_non_finite) {
    propagate_non_finite_like_native(
        t.input, t.weight, t.codes,
        weight_non_finite ? t.grad_input : at::Tensor(),
        input_non_finite ? t.grad_weight : at::Tensor(), t.shape, t.params);
  }
  return {t.grad_input, t.grad_weight, t.grad_bias};
}

// A half-precision backward on the direct path runs the float32 kernel on
// converted copies and rounds the gradients once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_half(
    const ops::BackwardTensors& t) {
  ops::BackwardTensors f = t;
  for (at::Tensor* tensor : {&f.grad_output, &f.input, &f.weight}) {
    *tensor = tensor->to(at::kFloat);
  }
  auto grads = direct_backward(f);
  const auto rounded = [&](const at::Tensor& grad) {
    return grad.defined() ? grad.to(t.input.scalar_type()) : grad;
  };
  return {
      rounded(std::get<0>(grads)), rounded(std::get<1>(grads)),
      rounded(std::get<2>(grads))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  ConvBlockPath path = ConvBlockPath::kDirect;
  auto t = ops::prepare_backward(
      grad_output, input, weight, codes, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask,
      [&](const ops::Conv2dReluMaxPool2dShape& s,
          const ops::Conv2dReluMaxPool2dParams& p) {
        path = choose_path(s, p, ConvBlockPass::kBackward, input.scalar_type());
        return kernel_layout(path);
      });
  ops::check_cpu_dtype(kOp, t.input, "input");
  if (t.shape.batch == 0) {
    ops::allocate_gradients(t, t.input.scalar_type());
    for (at::Tensor* grad : {&t.grad_weight, &t.grad_bias}) {
      if (grad->defined()) {
        grad->zero_();
      }
    }
    return ops::backward_result(t);
  }
  check_codes_name_taps(t.codes, t.shape, t.params);
  if (path == ConvBlockPath::kVendor) {
    // convolution_backward returns its gradients in native's memory format.
    return vendor_backward(t, output_mask);
  }
  std::tie(t.grad_input, t.grad_weight, t.grad_bias) =
      at::isReducedFloatingType(t.input.scalar_type()) ? direct_backward_half(t)
                                                       : direct_backward(t);
  // The direct kernels write NCHW: a channels-last call copies its gradients
  // (the size of input and weight) into native's format.
  return ops::backward_result(t);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl(
      "conv2d_relu_max_pool2d", &ops::ForwardKernels<&forward>::without_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&forward>::with_codes);
  m.impl(
      "_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cpu);
}

}  // namespace ptfast::cpu
