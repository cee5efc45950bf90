// Vectorised CPU forward of the fused conv2d -> ReLU -> max_pool2d operator.
// Compiled once per instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// One task per (image, block of output channels). The task computes those
// channels' conv planes in a thread-local buffer (never in a tensor), then
// max-pools them, writing the pooled value and the arg-max code of each
// window.
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/cpu/isa/conv2d_relu_max_pool2d_pooling.h"
#include "ops/cpu/isa/half_precision.h"
#include "ops/geometry.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// Output channels computed together: each input vector loaded feeds this
// many independent multiply-add chains (12 accumulators still fit AVX2's 16
// registers with the input vector and a broadcast weight).
constexpr int64_t kMaxChannelBlock = 12;
// Accumulators that fit the vector registers with room for the loads: two
// vectors of outputs per pass for 12 channels on AVX-512 (32 registers), one
// on AVX2 (16).
template <typename scalar_t>
constexpr int kPairedAccumulators =
    sizeof(at::vec::Vectorized<scalar_t>) >= 64 ? 24 : 12;

// The input of one image and group is staged once per kernel column kw as
// "shifted columns": shifted[kw][c][ih][ow] = padded_input[c][ih][ow *
// stride_w + kw * dilation_w], for every padded input row ih and conv column
// ow. Conv row oh then reads, for tap (kh, kw), row oh * stride_h + kh *
// dilation_h of shifted[kw], in the conv plane's own layout (row pitch
// conv_w): with stride_h == 1 one contiguous pass computes the whole plane,
// and no lane computes an output the pooling drops.
struct StagedLayout {
  int64_t padded_h;      // input rows including zero padding
  int64_t channel_size;  // padded_h * conv_w
  int64_t column_size;   // channels * channel_size, one kernel column
  int64_t plane_size;    // conv_h * conv_w, one conv plane
  int64_t plane_stride;  // plane_size and the pooling's -inf sentinel

  StagedLayout(
      const ops::Conv2dReluMaxPool2dShape& s,
      const ops::Conv2dReluMaxPool2dParams& p, int64_t channels)
      : padded_h(s.in_h + 2 * p.padding[0]),
        channel_size(padded_h * s.conv_w),
        column_size(channels * channel_size),
        plane_size(s.conv_h * s.conv_w),
        plane_stride(plane_size + 1) {}
};

// A contiguous run of conv outputs whose inputs are also contiguous.
struct Segment {
  int64_t source_offset;
  int64_t plane_offset;
  int64_t length;
};

// What the conv loop reads for one block of output channels: the staged
// shifted columns, the block's weights and biases.
template <typename scalar_t>
struct ConvBlockInputs {
  const scalar_t* source;      // staged shifted columns of the group
  int64_t channel_size;        // staged values per input channel
  int64_t channels;            // input channels of the group
  const scalar_t* weight;      // weight[j * weight_stride + c * taps + t]
  int64_t weight_stride;
  const scalar_t* bias;        // or null
  const int64_t* tap_offsets;  // staged offset of kernel tap t = kh * KW + kw
  int64_t taps;
};

// What the conv loop does with its sums before storing them: keeps them, or
// (a half-precision call, computed in float32) rounds them to the call's
// dtype in registers, so that ReLU and the pooling see the values native's
// conv2d in that dtype stores.
struct KeepSums {
  template <typename Vec>
  static Vec apply(const Vec& sums) {
    return sums;
  }
};

template <typename half_t>
struct RoundSumsTo {
  static at::vec::Vectorized<float> apply(
      const at::vec::Vectorized<float>& sums) {
    return rounded_to_half<half_t>(sums);
  }
};

// kVectors neighbouring vectors of conv outputs (`count` lanes in the last
// one) of kBlock output channels, starting at `source_offset` in the staged
// columns, stored at `dst` (channel j at dst + j * plane_stride). Each
// input vector loaded feeds kBlock multiply-adds and each broadcast weight
// kVectors; Sums (KeepSums, RoundSumsTo) treats the sums before the store.
// A function with plain parameters rather than a lambda: GCC reloaded a
// lambda's captures around every store.
template <int kBlock, int kVectors, typename Sums, typename scalar_t>
C10_ALWAYS_INLINE void conv_vectors(
    const ConvBlockInputs<scalar_t>& in, int64_t source_offset,
    scalar_t* dst, int64_t plane_stride, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc[kVectors][kBlock];
  for (int j = 0; j < kBlock; ++j) {
    const Vec initial(in.bias != nullptr ? in.bias[j] : scalar_t(0));
    for (int v = 0; v < kVectors; ++v) {
      acc[v][j] = initial;
    }
  }
  const scalar_t* src = in.source + source_offset;
  const int64_t taps = in.taps;
  for (int64_t c = 0; c < in.channels; ++c) {
    const scalar_t* w = in.weight + c * taps;
    for (int64_t t = 0; t < taps; ++t) {
      Vec x[kVectors];
      for (int v = 0; v < kVectors; ++v) {
        const scalar_t* at = src + in.tap_offsets[t] + v * Vec::size();
        x[v] = v + 1 < kVectors || count == Vec::size() ? Vec::loadu(at)
                                                        : Vec::loadu(at, count);
      }
      for (int j = 0; j < kBlock; ++j) {
        const Vec weight_j(w[j * in.weight_stride + t]);
        for (int v = 0; v < kVectors; ++v) {
          acc[v][j] = at::vec::fmadd(weight_j, x[v], acc[v][j]);
        }
      }
    }
    src += in.channel_size;
  }
  for (int j = 0; j < kBlock; ++j) {
    for (int v = 0; v < kVectors; ++v) {
      scalar_t* at = dst + j * plane_stride + v * Vec::size();
      const Vec sums = Sums::apply(acc[v][j]);
      if (v + 1 < kVectors || count == Vec::size()) {
        sums.store(at);
      } else {
        sums.store(at, count);
      }
    }
  }
}

// Computes kBlock conv planes (output channels oc0 .. oc0 + kBlock - 1 of a
// group) over one segment.
template <int kBlock, typename Sums, typename scalar_t>
void conv_segment(
    const ConvBlockInputs<scalar_t>& in, scalar_t* planes,
    int64_t plane_stride, const Segment& segment) {
  using Vec = at::vec::Vectorized<scalar_t>;
  scalar_t* dst = planes + segment.plane_offset;
  int64_t i = 0;
  if constexpr (2 * kBlock <= kPairedAccumulators<scalar_t>) {
    for (; i + 2 * Vec::size() <= segment.length; i += 2 * Vec::size()) {
      conv_vectors<kBlock, 2, Sums>(
          in, segment.source_offset + i, dst + i, plane_stride, Vec::size());
    }
  }
  for (; i < segment.length; i += Vec::size()) {
    conv_vectors<kBlock, 1, Sums>(
        in, segment.source_offset + i, dst + i, plane_stride,
        std::min<int64_t>(Vec::size(), segment.length - i));
  }
}

// Computes `block` consecutive conv planes of one group.
template <typename Sums, typename scalar_t>
void conv_planes(
    scalar_t* planes, const scalar_t* source, const scalar_t* weight,
    const scalar_t* bias, int64_t block, int64_t channels,
    const std::vector<int64_t>& tap_offsets, const StagedLayout& layout,
    const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const ConvBlockInputs<scalar_t> in{
      source, layout.channel_size, channels, weight, channels * taps,
      bias, tap_offsets.data(), taps};
  auto run = [&](const Segment& segment) {
    auto call = [&](auto block_size) {
      conv_segment<decltype(block_size)::value, Sums>(
          in, planes, layout.plane_stride, segment);
    };
    switch (block) {
      case 1: call(std::integral_constant<int, 1>{}); break;
      case 2: call(std::integral_constant<int, 2>{}); break;
      case 3: call(std::integral_constant<int, 3>{}); break;
      case 4: call(std::integral_constant<int, 4>{}); break;
      case 5: call(std::integral_constant<int, 5>{}); break;
      case 6: call(std::integral_constant<int, 6>{}); break;
      case 7: call(std::integral_constant<int, 7>{}); break;
      case 8: call(std::integral_constant<int, 8>{}); break;
      case 9: call(std::integral_constant<int, 9>{}); break;
      case 10: call(std::integral_constant<int, 10>{}); break;
      case 11: call(std::integral_constant<int, 11>{}); break;
      default: call(std::integral_constant<int, 12>{}); break;
    }
  };
  if (p.stride[0] == 1) {
    run({0, 0, layout.plane_size});
  } else {
    for (int64_t oh = 0; oh < s.conv_h; ++oh) {
      run({oh * p.stride[0] * s.conv_w, oh * s.conv_w, s.conv_w});
    }
  }
}

// Stages `channels` input planes as shifted columns (see StagedLayout).
// Only the values read from the input are written: the entries that come
// from the zero padding are the same for every image and stay 0 from the
// buffer's allocation.
template <typename scalar_t, typename input_t>
void stage_shifted_columns(
    scalar_t* staged, const input_t* input, int64_t channels,
    const StagedLayout& layout, const ops::Conv2dReluMaxPool2dShape& s,
    const ops::Conv2dReluMaxPool2dParams& p) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
    // Conv column ow reads input column ow * stride_w + first, which lies in
    // the input for ow in [ow_begin, ow_end).
    const int64_t first = kw * p.dilation[1] - p.padding[1];
    const int64_t ow_begin =
        std::min(s.conv_w, geo::ceil_div_nonneg(-first, p.stride[1]));
    const int64_t ow_end = std::max(
        ow_begin,
        std::min(s.conv_w, geo::ceil_div_nonneg(s.in_w - first, p.stride[1])));
    const int64_t width = ow_end - ow_begin;
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t* dst = staged + kw * layout.column_size +
          c * layout.channel_size + p.padding[0] * s.conv_w + ow_begin;
      const input_t* src =
          input + c * s.in_h * s.in_w + first + ow_begin * p.stride[1];
      if (p.stride[1] != 1) {
        for (int64_t ih = 0; ih < s.in_h; ++ih) {
          for (int64_t j = 0; j < width; ++j) {
            dst[ih * s.conv_w + j] =
                static_cast<scalar_t>(src[ih * s.in_w + j * p.stride[1]]);
          }
        }
      } else {
        // Rows are short (often one masked vector): inline, no memcpy call.
        const int64_t full = width - width % Vec::size();
        for (int64_t ih = 0; ih < s.in_h; ++ih) {
          const input_t* in = src + ih * s.in_w;
          scalar_t* out = dst + ih * s.conv_w;
          for (int64_t j = 0; j < full; j += Vec::size()) {
            load_as<scalar_t>(in + j, Vec::size()).store(out + j);
          }
          if (full < width) {
            load_as<scalar_t>(in + full, width - full)
                .store(out + full, width - full);
          }
        }
      }
    }
  }
}

// The forward in the tensors' dtype data_t, its conv sums treated by Sums
// (see forward_typed).
template <typename data_t, typename code_t, typename Sums>
void forward_with_sums(const Conv2dReluMaxPool2dForwardArgs& a) {
  using scalar_t = at::opmath_type<data_t>;
  constexpr bool kHalf = !std::is_same_v<scalar_t, data_t>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const StagedLayout layout(s, p, in_group);
  // Output channels of a group split into equal blocks of at most
  // kMaxChannelBlock; a task is one block of one image.
  const int64_t blocks_per_group =
      (out_group + kMaxChannelBlock - 1) / kMaxChannelBlock;
  const int64_t block_size =
      (out_group + blocks_per_group - 1) / blocks_per_group;
  const int64_t blocks = p.groups * blocks_per_group;

  std::vector<int64_t> tap_offsets;
  for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
      tap_offsets.push_back(
          kw * layout.column_size + kh * p.dilation[0] * s.conv_w);
    }
  }

  const data_t* input = a.input.const_data_ptr<data_t>();
  const data_t* weight_data = a.weight.const_data_ptr<data_t>();
  const data_t* bias_data =
      a.bias.defined() ? a.bias.const_data_ptr<data_t>() : nullptr;
  data_t* output = a.output.mutable_data_ptr<data_t>();
  code_t* codes =
      a.codes.defined() ? a.codes.mutable_data_ptr<code_t>() : nullptr;
  const int64_t weight_size = in_group * s.kernel_h * s.kernel_w;
  const int64_t pooled_size = s.pooled_h * s.pooled_w;
  const int64_t task_flops = block_size * weight_size * s.conv_h * s.conv_w;
  const PlanePooling<scalar_t> pool_plane(s, p);

  at::parallel_for(
      0, s.batch * blocks,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, task_flops)),
      [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> planes(
            block_size * layout.plane_stride + PlanePooling<scalar_t>::kSlack);
        for (int64_t j = 0; j < block_size; ++j) {
          planes[j * layout.plane_stride + layout.plane_size] =
              -std::numeric_limits<scalar_t>::infinity();
        }
        std::vector<scalar_t> staged(s.kernel_w * layout.column_size, 0);
        int64_t staged_source = -1;  // (n * groups + group) held in `staged`
        // Weights and bias in the compute type. Half precision converts each
        // block's on the thread's first task of it, into the thread's own
        // buffer: converted once per call by one thread, they moved from
        // that core's cache to the others' on every call (MNIST block 2 N1
        // on two threads: 0.85x -> 0.97x of float32).
        const scalar_t* weight = nullptr;
        const scalar_t* bias = nullptr;
        const int64_t weight_numel = a.weight.numel();
        std::unique_ptr<scalar_t[]> converted;  // written before it is read
        std::vector<bool> block_converted;
        if constexpr (kHalf) {
          converted.reset(new scalar_t[weight_numel + s.out_channels]);
          block_converted.assign(blocks, false);
          weight = converted.get();
          bias = bias_data != nullptr ? weight + weight_numel : nullptr;
        } else {
          weight = weight_data;
          bias = bias_data;
        }
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks;
          const int64_t group = (task % blocks) / blocks_per_group;
          const int64_t first = group * out_group +
              (task % blocks_per_group) * block_size;
          const int64_t block =
              std::min(block_size, (group + 1) * out_group - first);
          if constexpr (kHalf) {
            if (!block_converted[task % blocks]) {
              half_to_float(
                  weight_data + first * weight_size,
                  converted.get() + first * weight_size, block * weight_size);
              if (bias_data != nullptr) {
                half_to_float(
                    bias_data + first, converted.get() + weight_numel + first,
                    block);
              }
              block_converted[task % blocks] = true;
            }
          }
          const int64_t key = n * p.groups + group;
          if (key != staged_source) {
            stage_shifted_columns(
                staged.data(),
                input +
                    (n * s.in_channels + group * in_group) * s.in_h * s.in_w,
                in_group, layout, s, p);
            staged_source = key;
          }
          conv_planes<Sums>(
              planes.data(), staged.data(), weight + first * weight_size,
              bias != nullptr ? bias + first : nullptr, block, in_group,
              tap_offsets, layout, s, p);
          const int64_t first_plane = n * s.out_channels + first;
          for (int64_t j = 0; j < block; ++j) {
            const int64_t plane_index = first_plane + j;
            pool_plane(
                planes.data() + j * layout.plane_stride,
                output + plane_index * pooled_size,
                codes != nullptr ? codes + plane_index * pooled_size : nullptr);
          }
        }
      });
}

// The forward in the tensors' dtype data_t. A half-precision call (bfloat16,
// float16) computes in float32, as native's CPU kernels do: the input is
// converted while it is staged, the weights once per call, and the pooling
// rounds each vector it stores to the output. With arg-max codes the conv
// sums are also rounded to data_t in registers before ReLU and pooling, so
// that the arg-max rule sees native's values (ties included). Without codes
// that rounding would change nothing: rounding to nearest never reverses an
// order and keeps 0, so the rounded maximum of the ReLU'd window is the
// maximum of the rounded ReLU'd values, and only the pooled values, a
// quarter of the sums for 2x2 windows, are rounded.
template <typename data_t, typename code_t>
void forward_typed(const Conv2dReluMaxPool2dForwardArgs& a) {
  if constexpr (is_half_precision_v<data_t>) {
    if (a.codes.defined()) {
      forward_with_sums<data_t, code_t, RoundSumsTo<data_t>>(a);
      return;
    }
  }
  forward_with_sums<data_t, code_t, KeepSums>(a);
}

void conv2d_relu_max_pool2d_forward_kernel(
    const Conv2dReluMaxPool2dForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, args.input.scalar_type(),
      "conv2d_relu_max_pool2d_cpu", [&] {
        ops::dispatch_code_type(
            ops::argmax_code_dtype(args.params),
            [&](auto code) { forward_typed<scalar_t, decltype(code)>(args); });
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(
    conv2d_relu_max_pool2d_forward_stub,
    &conv2d_relu_max_pool2d_forward_kernel);

}  // namespace ptfast::cpu
