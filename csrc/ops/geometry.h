// Index and window arithmetic shared by every backend of the fused
// conv2d -> ReLU -> max_pool2d operator.
//
// Everything here is a pure function of integers, marked host+device so that
// the CPU kernels, the CUDA kernels and the argument checks all agree on one
// definition of "output size", "pooling window" and "arg-max code". The CPU
// test-suite therefore exercises this arithmetic even where no GPU is present.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ptfast::geometry {

// Output length of a convolution along one axis, as at::conv2d computes it.
// Returns a value < 1 when the (dilated) kernel does not fit the padded input.
C10_HOST_DEVICE inline int64_t conv_output_size(
    int64_t input_size, int64_t kernel, int64_t stride, int64_t padding,
    int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t padded = input_size + 2 * padding;
  if (padded < span) {
    return 0;
  }
  return (padded - span) / stride + 1;
}

// Output length of max pooling along one axis (dilation 1), as
// at::max_pool2d computes it: with ceil_mode a last, partial window is kept
// only if it starts inside the input or its left padding.
C10_HOST_DEVICE inline int64_t pool_output_size(
    int64_t input_size, int64_t kernel, int64_t stride, int64_t padding,
    bool ceil_mode) {
  const int64_t numerator =
      input_size + 2 * padding - kernel + (ceil_mode ? stride - 1 : 0);
  if (numerator < 0) {
    return 0;
  }
  int64_t size = numerator / stride + 1;
  if (ceil_mode && (size - 1) * stride >= input_size + padding) {
    --size;
  }
  return size;
}

// A pooling window over the conv output, clipped to it. `origin` is where the
// unclipped window starts (it may be negative because of pool padding): the
// arg-max code of a window is relative to that origin, so decoding needs no
// clipping information. In any signed index type: the CUDA kernels use
// int32_t where the tensors allow it.
template <typename index_t>
struct Window {
  index_t origin;
  index_t begin;  // first valid conv-output index, inclusive
  index_t end;    // last valid conv-output index, exclusive
};

template <typename index_t>
C10_HOST_DEVICE inline Window<index_t> pool_window(
    index_t pooled_index, index_t kernel, index_t stride, index_t padding,
    index_t conv_size) {
  const index_t origin = pooled_index * stride - padding;
  const index_t end = origin + kernel < conv_size ? origin + kernel : conv_size;
  return {origin, origin > 0 ? origin : index_t(0), end};
}

// The arg-max code stored by the forward for each pooled output:
//   0                   the window's maximum is <= 0, so ReLU blocks every
//                       gradient through it;
//   1 + dy * kernel_w + dx  the maximum sits at (origin_h + dy, origin_w + dx)
//                       and receives the pooled output's gradient.
// A code fits in uint8 when kernel_h * kernel_w < 255.
constexpr int64_t kNoGradient = 0;

C10_HOST_DEVICE inline bool argmax_code_fits_uint8(
    int64_t kernel_h, int64_t kernel_w) {
  return kernel_h * kernel_w < 255;
}

C10_HOST_DEVICE inline int64_t encode_argmax(
    int64_t dy, int64_t dx, int64_t kernel_w) {
  return 1 + dy * kernel_w + dx;
}

C10_HOST_DEVICE inline void decode_argmax(
    int64_t code, int64_t kernel_w, int64_t& dy, int64_t& dx) {
  dy = (code - 1) / kernel_w;
  dx = (code - 1) % kernel_w;
}

// Pooled indices [begin, end) whose window contains conv-output index
// `conv_index`: those with origin <= conv_index < origin + kernel.
template <typename index_t>
struct IndexRange {
  index_t begin;
  index_t end;
};

template <typename index_t>
C10_HOST_DEVICE inline index_t floor_div(index_t a, index_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename index_t>
C10_HOST_DEVICE inline IndexRange<index_t> windows_containing(
    index_t conv_index, index_t kernel, index_t stride, index_t padding,
    index_t pooled_size) {
  // index * stride - padding <= conv_index
  const index_t last = floor_div(conv_index + padding, stride);
  // index * stride - padding + kernel > conv_index
  const index_t first = floor_div(conv_index + padding - kernel, stride) + 1;
  return {
      first > 0 ? first : index_t(0),
      last + 1 < pooled_size ? last + 1 : pooled_size};
}

// The pooling of one (image, channel) plane of conv outputs.
struct PoolGeometry {
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t padding_h, padding_w;
  int64_t pooled_h, pooled_w;
};

template <typename acc_t>
struct GatheredGradient {
  acc_t sum;             // gradient reaching the conv output
  int64_t first_window;  // first pooled index whose arg-max it is, or -1
};

// The gradient reaching conv output (oh, ow) of one plane: the sum, in pooled
// order as max_pool2d's backward adds them, of the gradients of the pooled
// outputs whose arg-max code points at it. `grad_output` and `codes` are the
// plane's pooled values, row-major.
template <typename acc_t, typename scalar_t, typename code_t>
C10_HOST_DEVICE inline GatheredGradient<acc_t> gather_gradient(
    const scalar_t* grad_output, const code_t* codes, int64_t oh, int64_t ow,
    const PoolGeometry& g) {
  const IndexRange<int64_t> rows =
      windows_containing(oh, g.kernel_h, g.stride_h, g.padding_h, g.pooled_h);
  const IndexRange<int64_t> cols =
      windows_containing(ow, g.kernel_w, g.stride_w, g.padding_w, g.pooled_w);
  GatheredGradient<acc_t> result{acc_t(0), -1};
  for (int64_t ph = rows.begin; ph < rows.end; ++ph) {
    const int64_t dy = oh - (ph * g.stride_h - g.padding_h);
    for (int64_t pw = cols.begin; pw < cols.end; ++pw) {
      const int64_t dx = ow - (pw * g.stride_w - g.padding_w);
      const int64_t cell = ph * g.pooled_w + pw;
      if (static_cast<int64_t>(codes[cell]) ==
          encode_argmax(dy, dx, g.kernel_w)) {
        result.sum += static_cast<acc_t>(grad_output[cell]);
        if (result.first_window < 0) {
          result.first_window = cell;
        }
      }
    }
  }
  return result;
}

// Kernel taps k in [begin, end) for which the input index
// output_index * stride - padding + k * dilation lies in [0, input_size).
struct TapRange {
  int64_t begin;
  int64_t end;
};

C10_HOST_DEVICE inline int64_t ceil_div_nonneg(int64_t a, int64_t b) {
  return a <= 0 ? 0 : (a + b - 1) / b;
}

C10_HOST_DEVICE inline TapRange valid_taps(
    int64_t output_index, int64_t kernel, int64_t stride, int64_t padding,
    int64_t dilation, int64_t input_size) {
  const int64_t first_input = output_index * stride - padding;
  if (dilation == 1) {
    const int64_t begin = first_input < 0 ? -first_input : 0;
    const int64_t limit = input_size - first_input;
    return {begin, limit < kernel ? limit : kernel};
  }
  // first_input + k * dilation >= 0  <=>  k >= ceil(-first_input / dilation)
  const int64_t begin = ceil_div_nonneg(-first_input, dilation);
  // first_input + k * dilation < input_size
  //   <=>  k < ceil((input_size - first_input) / dilation)
  const int64_t limit = ceil_div_nonneg(input_size - first_input, dilation);
  return {begin, limit < kernel ? limit : kernel};
}

}  // namespace ptfast::geometry
