// The host side of the CUDA fused conv2d -> ReLU -> max_pool2d operator:
// checks, path choice, layouts, ATen's convolution and convolution_backward,
// and which kernel runs over how many items. Written once as templates over
// a `Launch` policy, so the CPU emulation (csrc/ops/cpu/cuda_emulation/)
// runs this very code with the kernel bodies executed on the CPU, and the
// .cu with them launched on the GPU. A Launch is constructed from the call's
// input after the argument checks (the GPU one holds the device guard) and
// provides
//   items(args, items): a grid-stride launch of compute_item(args, item)
//     over [0, items), for the epilogue, conv_gradient and direct_forward
//     bodies (template <typename Args, typename index_t>);
//   direct_forward_tiled<scalar_t, PKH, PKW, KH, KW>(args, TiledLaunchShape):
//     the tiled direct forward, one block per tile.
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/cuda/conv2d_relu_max_pool2d_bodies.h"
#include "ops/cuda/conv2d_relu_max_pool2d_path.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <tuple>

namespace ptfast::cuda::conv_block {

// The direct kernel indexes NCHW; the vendor path reads and writes by
// strides, so a channels-last call reaches cuDNN without a copy.
inline ops::KernelLayout kernel_layout(ConvBlockPath path) {
  return path == ConvBlockPath::kVendor ? ops::KernelLayout::kNative
                                        : ops::KernelLayout::kContiguous;
}

// Runs fn(index_t{}) with int32_t when every tensor of the call has fewer
// than 2^31 elements (each offset then fits), int64_t otherwise.
template <typename Fn>
void dispatch_index_type(std::initializer_list<int64_t> numels, const Fn& fn) {
  int64_t largest = 0;
  for (const int64_t numel : numels) {
    largest = std::max(largest, numel);
  }
  if (largest <= std::numeric_limits<int32_t>::max()) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

template <typename index_t>
Strides<index_t> strides_of(const at::Tensor& t) {
  return {
      static_cast<index_t>(t.stride(0)), static_cast<index_t>(t.stride(1)),
      static_cast<index_t>(t.stride(2)), static_cast<index_t>(t.stride(3))};
}

inline bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         !t.is_contiguous(at::MemoryFormat::Contiguous);
}

template <typename Launch>
void vendor_forward(const ops::ForwardTensors& t, const Launch& launch) {
  const auto& p = t.params;
  const auto& s = t.shape;
  // Scratch, freed on return; in native's memory format (cuDNN's choice for
  // these input and weight strides), which the epilogue reads as it is.
  const at::Tensor conv = at::convolution(
      t.input, t.weight, t.bias, p.stride, p.padding, p.dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, p.groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(),
      "conv2d_relu_max_pool2d_epilogue_cuda", [&] {
        ops::dispatch_code_type(ops::argmax_code_dtype(p), [&](auto code) {
          using code_t = decltype(code);
          dispatch_index_type({conv.numel()}, [&](auto index) {
            using index_t = decltype(index);
            const EpilogueArgs<scalar_t, code_t, index_t> args{
                conv.const_data_ptr<scalar_t>(),
                strides_of<index_t>(conv),
                t.output.mutable_data_ptr<scalar_t>(),
                strides_of<index_t>(t.output),
                t.codes.defined() ? t.codes.mutable_data_ptr<code_t>()
                                  : nullptr,
                t.codes.defined() ? strides_of<index_t>(t.codes)
                                  : Strides<index_t>{},
                static_cast<index_t>(s.out_channels),
                static_cast<index_t>(s.conv_h),
                static_cast<index_t>(s.conv_w),
                make_pool<index_t>(ops::pool_geometry(s, p)),
                is_channels_last(t.output)};
            launch.items(args, static_cast<index_t>(t.output.numel()));
          });
        });
      });
}

// How the tiled direct forward covers a call (see direct_forward_tiled in
// the bodies): tiles of up to kTiledMaxThreads pooled outputs, 16 wide at
// most, one block per tile, group and kTiledChannels output channels.
struct TiledLaunchShape {
  int64_t tile_h, tile_w, tiles_h, tiles_w, channel_blocks;
  int64_t input_rows, input_cols;  // the staged input of one channel
  int64_t blocks, threads, shared_bytes;
};

// The tiled kernel serves square 2x2 and 3x3 pooling windows when every
// tensor of the call fits 32-bit offsets and the staged input and weights
// fit the 48 KB of shared memory every GPU gives a block without opting in;
// the per-output kernel serves every other call.
inline std::optional<TiledLaunchShape> tiled_launch_shape(
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p, at::ScalarType dtype) {
  constexpr int64_t kSharedBytes = 48 * 1024;
  const int64_t pool = p.pool_kernel[0];
  if (pool != p.pool_kernel[1] || (pool != 2 && pool != 3)) {
    return std::nullopt;
  }
  const int64_t largest = std::max(
      {s.batch * s.in_channels * s.in_h * s.in_w,
       s.batch * s.out_channels * s.pooled_h * s.pooled_w,
       s.out_channels * s.in_channels_per_group(p) * s.kernel_h * s.kernel_w});
  if (largest > std::numeric_limits<int32_t>::max()) {
    return std::nullopt;
  }
  TiledLaunchShape l{};
  l.tile_w = std::min<int64_t>(s.pooled_w, 16);
  l.tile_h = std::min<int64_t>(s.pooled_h, kTiledMaxThreads / l.tile_w);
  l.tiles_h = (s.pooled_h + l.tile_h - 1) / l.tile_h;
  l.tiles_w = (s.pooled_w + l.tile_w - 1) / l.tile_w;
  l.channel_blocks =
      (s.out_channels_per_group(p) + kTiledChannels - 1) / kTiledChannels;
  // The conv outputs the tile's windows cover, then the input they read.
  const int64_t conv_rows = (l.tile_h - 1) * p.pool_stride[0] + pool;
  const int64_t conv_cols = (l.tile_w - 1) * p.pool_stride[1] + pool;
  l.input_rows =
      (conv_rows - 1) * p.stride[0] + (s.kernel_h - 1) * p.dilation[0] + 1;
  l.input_cols =
      (conv_cols - 1) * p.stride[1] + (s.kernel_w - 1) * p.dilation[1] + 1;
  const int64_t acc_size = dtype == at::kDouble ? 8 : 4;  // opmath_type
  l.shared_bytes = acc_size * (l.input_rows * l.input_cols +
                               kTiledChannels * s.kernel_h * s.kernel_w);
  l.blocks = s.batch * p.groups * l.channel_blocks * l.tiles_h * l.tiles_w;
  l.threads = l.tile_h * l.tile_w;
  if (l.shared_bytes > kSharedBytes ||
      l.blocks > std::numeric_limits<int32_t>::max()) {
    return std::nullopt;
  }
  return l;
}

// Runs fn(pool, kernel) with the tiled kernel's compile-time sizes as
// std::integral_constant: the square pooling window (2 or 3) and the
// square conv kernel when it is 5x5 or 3x3 (0: read at run time).
template <typename Fn>
void dispatch_tiled_sizes(
    int64_t pool, int64_t kernel_h, int64_t kernel_w, const Fn& fn) {
  const auto with_pool = [&](auto pool_size) {
    if (kernel_h == 5 && kernel_w == 5) {
      fn(pool_size, std::integral_constant<int, 5>{});
    } else if (kernel_h == 3 && kernel_w == 3) {
      fn(pool_size, std::integral_constant<int, 3>{});
    } else {
      fn(pool_size, std::integral_constant<int, 0>{});
    }
  };
  if (pool == 2) {
    with_pool(std::integral_constant<int, 2>{});
  } else {
    with_pool(std::integral_constant<int, 3>{});
  }
}

// The direct forward kernel a call runs, named for the tests: "tiled
// pool PxP kernel KxK" (K = 0: run-time size) or "per output".
inline std::string direct_forward_kernel_name(
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p, at::ScalarType dtype) {
  if (!tiled_launch_shape(s, p, dtype)) {
    return "per output";
  }
  std::string name;
  dispatch_tiled_sizes(
      p.pool_kernel[0], s.kernel_h, s.kernel_w, [&](auto pool, auto kernel) {
        name = "tiled pool " + std::to_string(pool()) + "x" +
               std::to_string(pool()) + " kernel " + std::to_string(kernel()) +
               "x" + std::to_string(kernel());
      });
  return name;
}

template <typename scalar_t, typename code_t, typename index_t>
DirectForwardArgs<scalar_t, code_t, index_t> make_direct_forward_args(
    const ops::ForwardTensors& t) {
  const auto& p = t.params;
  const auto& s = t.shape;
  const auto i = [](int64_t v) { return static_cast<index_t>(v); };
  return {
      t.input.const_data_ptr<scalar_t>(),
      t.weight.const_data_ptr<scalar_t>(),
      t.bias.defined() ? t.bias.const_data_ptr<scalar_t>() : nullptr,
      t.output.mutable_data_ptr<scalar_t>(),
      t.codes.defined() ? t.codes.mutable_data_ptr<code_t>() : nullptr,
      i(s.in_channels),
      i(s.in_h),
      i(s.in_w),
      i(s.out_channels),
      i(s.in_channels_per_group(p)),
      i(s.out_channels_per_group(p)),
      i(s.kernel_h),
      i(s.kernel_w),
      i(s.conv_h),
      i(s.conv_w),
      i(p.stride[0]),
      i(p.stride[1]),
      i(p.padding[0]),
      i(p.padding[1]),
      i(p.dilation[0]),
      i(p.dilation[1]),
      make_pool<index_t>(ops::pool_geometry(s, p))};
}

template <typename Launch>
void direct_forward(const ops::ForwardTensors& t, const Launch& launch) {
  const auto& p = t.params;
  const auto& s = t.shape;
  const auto tiled = tiled_launch_shape(s, p, t.input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(),
      "conv2d_relu_max_pool2d_direct_cuda", [&] {
        if (tiled) {
          const auto i = [](int64_t v) { return static_cast<int32_t>(v); };
          const TiledForwardArgs<scalar_t, int32_t> args{
              make_direct_forward_args<scalar_t, uint8_t, int32_t>(t),
              i(p.groups),
              i(tiled->tile_h),
              i(tiled->tile_w),
              i(tiled->tiles_h),
              i(tiled->tiles_w),
              i(tiled->channel_blocks),
              i(tiled->input_rows),
              i(tiled->input_cols)};
          dispatch_tiled_sizes(
              p.pool_kernel[0], s.kernel_h, s.kernel_w,
              [&](auto pool, auto kernel) {
                launch.template direct_forward_tiled<
                    scalar_t, pool(), pool(), kernel(), kernel()>(args, *tiled);
              });
          return;
        }
        ops::dispatch_code_type(ops::argmax_code_dtype(p), [&](auto code) {
          using code_t = decltype(code);
          dispatch_index_type(
              {t.input.numel(), t.output.numel(), t.weight.numel()},
              [&](auto index) {
                using index_t = decltype(index);
                launch.items(
                    make_direct_forward_args<scalar_t, code_t, index_t>(t),
                    static_cast<index_t>(t.output.numel()));
              });
        });
      });
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode, bool with_codes) {
  ConvBlockPath path = ConvBlockPath::kVendor;
  const ops::ForwardTensors t = ops::prepare_forward(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
      pool_stride, pool_padding, ceil_mode, with_codes,
      [&](const ops::Conv2dReluMaxPool2dShape& s,
          const ops::Conv2dReluMaxPool2dParams& p) {
        path = choose_path(s, p, ConvBlockPass::kForward);
        return kernel_layout(path);
      });
  if (t.output.numel() == 0) {
    return ops::forward_result(t);
  }
  const Launch launch(t.input);
  if (path == ConvBlockPath::kVendor) {
    vendor_forward(t, launch);
  } else {
    direct_forward(t, launch);
  }
  return ops::forward_result(t);
}

// The backward of both paths: the dense conv-output gradient the native
// composite forms (each pooled gradient at its window's arg-max, zero
// elsewhere and where ReLU blocked the window), then ATen's
// convolution_backward (cuDNN) for exactly the gradients asked for. A conv
// output without gradient meets the input and weight there as a 0, so
// NaN and inf propagate as in native torch.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const at::Tensor& codes, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  ops::BackwardTensors t = ops::prepare_backward(
      grad_output, input, weight, codes, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, ceil_mode, output_mask,
      [&](const ops::Conv2dReluMaxPool2dShape& s,
          const ops::Conv2dReluMaxPool2dParams& p) {
        return kernel_layout(choose_path(s, p, ConvBlockPass::kBackward));
      });
  const auto& s = t.shape;
  const auto& p = t.params;
  if (s.batch == 0) {
    ops::allocate_gradients(t, t.input.scalar_type());
    for (at::Tensor* grad : {&t.grad_weight, &t.grad_bias}) {
      if (grad->defined()) {
        grad->zero_();
      }
    }
    return ops::backward_result(t);
  }
  const Launch launch(t.input);
  const std::array<int64_t, 4> conv_sizes{
      s.batch, s.out_channels, s.conv_h, s.conv_w};
  const at::Tensor grad_conv = at::empty(
      conv_sizes, t.grad_output.options().memory_format(t.memory_format));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.grad_output.scalar_type(),
      "conv2d_relu_max_pool2d_conv_gradient_cuda", [&] {
        ops::dispatch_code_type(t.codes.scalar_type(), [&](auto code) {
          using code_t = decltype(code);
          dispatch_index_type({grad_conv.numel()}, [&](auto index) {
            using index_t = decltype(index);
            const ConvGradientArgs<scalar_t, code_t, index_t> args{
                t.grad_output.const_data_ptr<scalar_t>(),
                strides_of<index_t>(t.grad_output),
                t.codes.const_data_ptr<code_t>(),
                strides_of<index_t>(t.codes),
                grad_conv.mutable_data_ptr<scalar_t>(),
                strides_of<index_t>(grad_conv),
                static_cast<index_t>(s.out_channels),
                static_cast<index_t>(s.conv_h),
                static_cast<index_t>(s.conv_w),
                make_pool<index_t>(ops::pool_geometry(s, p)),
                is_channels_last(grad_conv)};
            launch.items(args, static_cast<index_t>(grad_conv.numel()));
          });
        });
      });
  const std::array<int64_t, 1> bias_sizes{s.out_channels};
  // convolution_backward returns its gradients in native's memory format.
  return at::convolution_backward(
      grad_conv, t.input, t.weight,
      output_mask[2] ? at::OptionalIntArrayRef(bias_sizes)
                     : at::OptionalIntArrayRef(),
      p.stride, p.padding, p.dilation, /*transposed=*/false,
      /*output_padding=*/{0, 0}, p.groups, output_mask);
}

}  // namespace ptfast::cuda::conv_block
