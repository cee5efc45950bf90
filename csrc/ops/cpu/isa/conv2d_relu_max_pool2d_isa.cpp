// Vectorised CPU kernels of the fused conv2d -> ReLU -> max_pool2d operator.
// Compiled once per instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// Forward: one task per (image, output channel). The task computes that
// channel's conv plane in a thread-local buffer (never in a tensor), then
// max-pools it, writing the pooled value and the arg-max code of each window.
// Backward: only the arg-max position of each window whose maximum is
// positive receives gradient, so both gradients are sums over those
// positions; the dense conv gradient is never formed.
#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"
#include "ops/geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// Roughly how many multiply-adds make a task worth a thread of its own.
constexpr int64_t kGrainFlops = 1 << 15;
// Kernel taps of one kernel row applied per pass over the conv plane.
constexpr int64_t kTapsPerPass = 8;

// plane[i] += sum_j weights[j] * source[i + j * tap_step] for i < length.
// Keeps up to kTapsPerPass broadcast weights in registers so the plane is
// loaded and stored once per kernel row rather than once per tap.
template <typename scalar_t>
void accumulate_kernel_row(
    scalar_t* plane, const scalar_t* source, int64_t length,
    const scalar_t* weights, int64_t taps, int64_t tap_step) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t first = 0; first < taps; first += kTapsPerPass) {
    const int64_t count = std::min(kTapsPerPass, taps - first);
    Vec w[kTapsPerPass];
    for (int64_t j = 0; j < count; ++j) {
      w[j] = Vec(weights[first + j]);
    }
    const scalar_t* src = source + first * tap_step;
    int64_t i = 0;
    for (; i + Vec::size() <= length; i += Vec::size()) {
      Vec acc = Vec::loadu(plane + i);
      for (int64_t j = 0; j < count; ++j) {
        acc = at::vec::fmadd(w[j], Vec::loadu(src + i + j * tap_step), acc);
      }
      acc.store(plane + i);
    }
    if (i < length) {
      const int64_t rest = length - i;
      Vec acc = Vec::loadu(plane + i, rest);
      for (int64_t j = 0; j < count; ++j) {
        acc = at::vec::fmadd(
            w[j], Vec::loadu(src + i + j * tap_step, rest), acc);
      }
      acc.store(plane + i, rest);
    }
  }
}

// Geometry of the conv plane buffer of one task. With unit stride, row oh of
// the plane is stored at oh * padded_w, the same pitch as the (padded) input,
// so one contiguous pass covers every row; the columns between ow = conv_w
// and the next row are scratch that the pooling never reads.
struct PlaneLayout {
  int64_t padded_h, padded_w;  // input plane size including zero padding
  int64_t row_pitch;           // distance between conv rows in the buffer
  int64_t length;              // elements of the buffer that are computed
};

PlaneLayout plane_layout(
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  PlaneLayout layout{};
  layout.padded_h = s.in_h + 2 * p.padding[0];
  layout.padded_w = s.in_w + 2 * p.padding[1];
  if (p.stride[0] == 1 && p.stride[1] == 1) {
    layout.row_pitch = layout.padded_w;
    layout.length = (s.conv_h - 1) * layout.padded_w + s.conv_w;
  } else {
    layout.row_pitch = s.conv_w;
    layout.length = s.conv_h * s.conv_w;
  }
  return layout;
}

// conv plane = bias + sum over input channels and taps, from zero-padded
// input planes `source` (channels x padded_h x padded_w).
template <typename scalar_t>
void compute_conv_plane(
    scalar_t* plane, const scalar_t* source, const scalar_t* weight,
    scalar_t bias, int64_t channels, const PlaneLayout& layout,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  std::fill(plane, plane + layout.length, bias);
  const int64_t channel_size = layout.padded_h * layout.padded_w;
  const int64_t kh_step = p.dilation[0] * layout.padded_w;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      const scalar_t* taps = weight + (c * s.kernel_h + kh) * s.kernel_w;
      const scalar_t* rows = source + c * channel_size + kh * kh_step;
      if (p.stride[0] == 1 && p.stride[1] == 1) {
        accumulate_kernel_row(
            plane, rows, layout.length, taps, s.kernel_w, p.dilation[1]);
      } else if (p.stride[1] == 1) {
        for (int64_t oh = 0; oh < s.conv_h; ++oh) {
          accumulate_kernel_row(
              plane + oh * layout.row_pitch,
              rows + oh * p.stride[0] * layout.padded_w, s.conv_w, taps,
              s.kernel_w, p.dilation[1]);
        }
      } else {
        for (int64_t oh = 0; oh < s.conv_h; ++oh) {
          scalar_t* out_row = plane + oh * layout.row_pitch;
          const scalar_t* in_row = rows + oh * p.stride[0] * layout.padded_w;
          for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
            const scalar_t w = taps[kw];
            const scalar_t* in = in_row + kw * p.dilation[1];
            for (int64_t ow = 0; ow < s.conv_w; ++ow) {
              out_row[ow] += w * in[ow * p.stride[1]];
            }
          }
        }
      }
    }
  }
}

// Max-pools the conv plane with max_pool2d's semantics (first maximum wins,
// NaN wins and the last NaN is kept), then applies ReLU to the maximum:
// relu(max(x)) == max(relu(x)), and the arg-max of x is the arg-max of
// relu(x) whenever the maximum is positive or NaN.
template <typename scalar_t, typename code_t>
void pool_plane(
    const scalar_t* plane, int64_t row_pitch, scalar_t* output, code_t* codes,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
    const geo::Window wh = geo::pool_window(
        ph, p.pool_kernel[0], p.pool_stride[0], p.pool_padding[0], s.conv_h);
    for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
      const geo::Window ww = geo::pool_window(
          pw, p.pool_kernel[1], p.pool_stride[1], p.pool_padding[1], s.conv_w);
      scalar_t best = -std::numeric_limits<scalar_t>::infinity();
      int64_t best_h = wh.begin;
      int64_t best_w = ww.begin;
      for (int64_t h = wh.begin; h < wh.end; ++h) {
        const scalar_t* row = plane + h * row_pitch;
        for (int64_t w = ww.begin; w < ww.end; ++w) {
          const scalar_t value = row[w];
          if (value > best || std::isnan(value)) {
            best = value;
            best_h = h;
            best_w = w;
          }
        }
      }
      const int64_t cell = ph * s.pooled_w + pw;
      const bool blocked = best <= scalar_t(0);
      output[cell] = blocked ? scalar_t(0) : best;
      if (codes != nullptr) {
        codes[cell] = static_cast<code_t>(
            blocked ? geo::kNoGradient
                    : geo::encode_argmax(
                          best_h - wh.origin, best_w - ww.origin,
                          p.pool_kernel[1]));
      }
    }
  }
}

// Copies `channels` input planes into a zero-padded buffer.
template <typename scalar_t>
void stage_padded(
    scalar_t* staged, const scalar_t* input, int64_t channels,
    const PlaneLayout& layout, const ops::ConvPoolShape& s,
    const ops::ConvPoolParams& p) {
  std::fill(
      staged, staged + channels * layout.padded_h * layout.padded_w,
      scalar_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t h = 0; h < s.in_h; ++h) {
      std::memcpy(
          staged + (c * layout.padded_h + h + p.padding[0]) * layout.padded_w +
              p.padding[1],
          input + (c * s.in_h + h) * s.in_w, s.in_w * sizeof(scalar_t));
    }
  }
}

template <typename scalar_t, typename code_t>
void forward_typed(const ConvPoolForwardArgs& a) {
  const auto& s = a.shape;
  const auto& p = a.params;
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const PlaneLayout layout = plane_layout(s, p);
  const bool padded = p.padding[0] > 0 || p.padding[1] > 0;
  const int64_t staged_size =
      padded ? in_group * layout.padded_h * layout.padded_w : 0;

  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const scalar_t* weight = a.weight.const_data_ptr<scalar_t>();
  const scalar_t* bias =
      a.bias.defined() ? a.bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* output = a.output.mutable_data_ptr<scalar_t>();
  code_t* codes =
      a.codes.defined() ? a.codes.mutable_data_ptr<code_t>() : nullptr;
  const int64_t weight_size = in_group * s.kernel_h * s.kernel_w;
  const int64_t pooled_size = s.pooled_h * s.pooled_w;
  const int64_t task_flops = weight_size * s.conv_h * s.conv_w;

  at::parallel_for(
      0, s.batch * s.out_channels,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, task_flops)),
      [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> plane(layout.length);
        std::vector<scalar_t> staged(staged_size);
        int64_t staged_source = -1;  // (n * groups + group) held in `staged`
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / s.out_channels;
          const int64_t oc = task % s.out_channels;
          const int64_t group = oc / out_group;
          const scalar_t* source =
              input + (n * s.in_channels + group * in_group) * s.in_h * s.in_w;
          if (padded) {
            const int64_t key = n * p.groups + group;
            if (key != staged_source) {
              stage_padded(staged.data(), source, in_group, layout, s, p);
              staged_source = key;
            }
            source = staged.data();
          }
          compute_conv_plane(
              plane.data(), source, weight + oc * weight_size,
              bias != nullptr ? bias[oc] : scalar_t(0), in_group, layout, s,
              p);
          pool_plane(
              plane.data(), layout.row_pitch, output + task * pooled_size,
              codes != nullptr ? codes + task * pooled_size : nullptr, s, p);
        }
      });
}

// Calls fn(n, oc, oh, ow, grad) for every pooled output of image n and output
// channel oc whose gradient reaches the conv output, in a fixed order.
template <typename scalar_t, typename code_t, typename Fn>
void for_each_active_position(
    const scalar_t* grad_output, const code_t* codes, int64_t n, int64_t oc,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p, const Fn& fn) {
  const int64_t offset = (n * s.out_channels + oc) * s.pooled_h * s.pooled_w;
  for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
      const int64_t cell = offset + ph * s.pooled_w + pw;
      const int64_t code = static_cast<int64_t>(codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      int64_t dy = 0;
      int64_t dx = 0;
      geo::decode_argmax(code, p.pool_kernel[1], dy, dx);
      fn(ph * p.pool_stride[0] - p.pool_padding[0] + dy,
         pw * p.pool_stride[1] - p.pool_padding[1] + dx, grad_output[cell]);
    }
  }
}

template <typename scalar_t, typename code_t>
void backward_typed(const ConvPoolBackwardArgs& a) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const int64_t weight_size = in_group * s.kernel_h * s.kernel_w;
  const int64_t plane_size = s.in_h * s.in_w;
  const scalar_t* grad_output = a.grad_output.const_data_ptr<scalar_t>();
  const code_t* codes = a.codes.const_data_ptr<code_t>();
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const scalar_t* weight = a.weight.const_data_ptr<scalar_t>();
  const int64_t task_flops =
      out_group * s.pooled_h * s.pooled_w * weight_size;

  if (a.grad_input.defined()) {
    // One task per (image, group): it owns that slice of grad_input.
    scalar_t* grad_input = a.grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(
        0, s.batch * p.groups,
        std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, task_flops)),
        [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t n = task / p.groups;
            const int64_t group = task % p.groups;
            scalar_t* grad_slice = grad_input +
                (n * s.in_channels + group * in_group) * plane_size;
            for (int64_t oc = group * out_group; oc < (group + 1) * out_group;
                 ++oc) {
              const scalar_t* w = weight + oc * weight_size;
              for_each_active_position(
                  grad_output, codes, n, oc, s, p,
                  [&](int64_t oh, int64_t ow, scalar_t grad) {
                    const auto rows = geo::valid_taps(
                        oh, s.kernel_h, p.stride[0], p.padding[0],
                        p.dilation[0], s.in_h);
                    const auto cols = geo::valid_taps(
                        ow, s.kernel_w, p.stride[1], p.padding[1],
                        p.dilation[1], s.in_w);
                    const int64_t ih0 = oh * p.stride[0] - p.padding[0];
                    const int64_t iw0 = ow * p.stride[1] - p.padding[1];
                    for (int64_t c = 0; c < in_group; ++c) {
                      for (int64_t kh = rows.begin; kh < rows.end; ++kh) {
                        scalar_t* dst = grad_slice + c * plane_size +
                            (ih0 + kh * p.dilation[0]) * s.in_w + iw0;
                        const scalar_t* taps =
                            w + (c * s.kernel_h + kh) * s.kernel_w;
                        for (int64_t kw = cols.begin; kw < cols.end; ++kw) {
                          dst[kw * p.dilation[1]] += grad * taps[kw];
                        }
                      }
                    }
                  });
            }
          }
        });
  }

  if (a.grad_weight.defined() || a.grad_bias.defined()) {
    // One task per output channel: it owns that channel's weight and bias
    // gradient and sums over images in order, so the result does not depend
    // on the number of threads.
    scalar_t* grad_weight = a.grad_weight.defined()
        ? a.grad_weight.mutable_data_ptr<scalar_t>()
        : nullptr;
    scalar_t* grad_bias = a.grad_bias.defined()
        ? a.grad_bias.mutable_data_ptr<scalar_t>()
        : nullptr;
    at::parallel_for(
        0, s.out_channels,
        std::max<int64_t>(
            1, kGrainFlops / std::max<int64_t>(1, task_flops * s.batch)),
        [&](int64_t begin, int64_t end) {
          std::vector<acc_t> weight_sum(weight_size);
          for (int64_t oc = begin; oc < end; ++oc) {
            const int64_t group = oc / out_group;
            std::fill(weight_sum.begin(), weight_sum.end(), acc_t(0));
            acc_t bias_sum = 0;
            for (int64_t n = 0; n < s.batch; ++n) {
              const scalar_t* image = input +
                  (n * s.in_channels + group * in_group) * plane_size;
              for_each_active_position(
                  grad_output, codes, n, oc, s, p,
                  [&](int64_t oh, int64_t ow, scalar_t grad) {
                    bias_sum += grad;
                    if (grad_weight == nullptr) {
                      return;
                    }
                    const auto rows = geo::valid_taps(
                        oh, s.kernel_h, p.stride[0], p.padding[0],
                        p.dilation[0], s.in_h);
                    const auto cols = geo::valid_taps(
                        ow, s.kernel_w, p.stride[1], p.padding[1],
                        p.dilation[1], s.in_w);
                    const int64_t ih0 = oh * p.stride[0] - p.padding[0];
                    const int64_t iw0 = ow * p.stride[1] - p.padding[1];
                    for (int64_t c = 0; c < in_group; ++c) {
                      for (int64_t kh = rows.begin; kh < rows.end; ++kh) {
                        const scalar_t* src = image + c * plane_size +
                            (ih0 + kh * p.dilation[0]) * s.in_w + iw0;
                        acc_t* dst = weight_sum.data() +
                            (c * s.kernel_h + kh) * s.kernel_w;
                        for (int64_t kw = cols.begin; kw < cols.end; ++kw) {
                          dst[kw] += acc_t(grad) * acc_t(src[kw * p.dilation[1]]);
                        }
                      }
                    }
                  });
            }
            if (grad_weight != nullptr) {
              std::copy(
                  weight_sum.begin(), weight_sum.end(),
                  grad_weight + oc * weight_size);
            }
            if (grad_bias != nullptr) {
              grad_bias[oc] = static_cast<scalar_t>(bias_sum);
            }
          }
        });
  }
}

// Runs fn<code_t>() with the arg-max code type the forward chose.
template <typename Fn>
void dispatch_code_type(at::ScalarType code_type, const Fn& fn) {
  if (code_type == at::kByte) {
    fn(uint8_t{});
  } else {
    fn(int32_t{});
  }
}

void conv_pool_forward(const ConvPoolForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(
      args.input.scalar_type(), "conv2d_relu_max_pool2d_cpu", [&] {
        dispatch_code_type(
            ops::argmax_code_dtype(args.params), [&](auto code) {
              forward_typed<scalar_t, decltype(code)>(args);
            });
      });
}

void conv_pool_backward(const ConvPoolBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(
      args.input.scalar_type(), "conv2d_relu_max_pool2d_backward_cpu", [&] {
        dispatch_code_type(args.codes.scalar_type(), [&](auto code) {
          backward_typed<scalar_t, decltype(code)>(args);
        });
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(conv_pool_forward_stub, &conv_pool_forward);
PTFAST_REGISTER_ISA_KERNEL(conv_pool_backward_stub, &conv_pool_backward);

}  // namespace ptfast::cpu
