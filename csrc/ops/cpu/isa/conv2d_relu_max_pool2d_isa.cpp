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
#include <type_traits>
#include <vector>

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// Roughly how many multiply-adds make a task worth a thread of its own.
constexpr int64_t kGrainFlops = 1 << 15;
// Output channels computed together: each input vector loaded feeds this
// many independent multiply-add chains (12 accumulators still fit AVX2's 16
// registers with the input vector and a broadcast weight).
constexpr int64_t kMaxChannelBlock = 12;

// Geometry of the conv plane buffer of one output channel. With unit stride,
// row oh of the plane is stored at oh * padded_w, the pitch of the (padded)
// input, so one contiguous pass covers every row and a kernel tap is a fixed
// offset into the input; the columns between ow = conv_w and the next row are
// scratch the pooling never reads. With a vertical stride only, each conv row
// is its own pass; with a horizontal stride the scalar path is taken.
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

// A contiguous run of conv outputs whose inputs are also contiguous.
struct Segment {
  int64_t source_offset;
  int64_t plane_offset;
  int64_t length;
};

// Computes kBlock conv planes (output channels oc0 .. oc0 + kBlock - 1 of a
// group) over one segment, from zero-padded input planes `source`.
// `tap_offsets[t]` is the input offset of kernel tap t = kh * KW + kw.
template <typename scalar_t, int kBlock>
void conv_segment(
    scalar_t* planes, int64_t plane_stride, const scalar_t* source,
    int64_t channel_size, const scalar_t* weight, int64_t weight_stride,
    const scalar_t* bias, int64_t channels, const int64_t* tap_offsets,
    int64_t taps, const Segment& segment) {
  using Vec = at::vec::Vectorized<scalar_t>;
  auto compute = [&](int64_t i, int64_t count, auto full) {
    constexpr bool kFull = decltype(full)::value;
    Vec acc[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      acc[j] = Vec(bias != nullptr ? bias[j] : scalar_t(0));
    }
    const scalar_t* src = source + segment.source_offset + i;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* w = weight + c * taps;
      for (int64_t t = 0; t < taps; ++t) {
        const Vec x = kFull ? Vec::loadu(src + tap_offsets[t])
                            : Vec::loadu(src + tap_offsets[t], count);
        for (int j = 0; j < kBlock; ++j) {
          acc[j] = at::vec::fmadd(Vec(w[j * weight_stride + t]), x, acc[j]);
        }
      }
      src += channel_size;
    }
    scalar_t* dst = planes + segment.plane_offset + i;
    for (int j = 0; j < kBlock; ++j) {
      if (kFull) {
        acc[j].store(dst + j * plane_stride);
      } else {
        acc[j].store(dst + j * plane_stride, count);
      }
    }
  };
  int64_t i = 0;
  for (; i + Vec::size() <= segment.length; i += Vec::size()) {
    compute(i, Vec::size(), std::true_type{});
  }
  if (i < segment.length) {
    compute(i, segment.length - i, std::false_type{});
  }
}

// Horizontal stride > 1: inputs of neighbouring outputs are not contiguous.
template <typename scalar_t>
void conv_plane_strided(
    scalar_t* plane, const scalar_t* source, const scalar_t* weight,
    scalar_t bias, int64_t channels, const PlaneLayout& layout,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  std::fill(plane, plane + layout.length, bias);
  const int64_t channel_size = layout.padded_h * layout.padded_w;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t oh = 0; oh < s.conv_h; ++oh) {
      scalar_t* out_row = plane + oh * layout.row_pitch;
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        const scalar_t* in_row = source + c * channel_size +
            (oh * p.stride[0] + kh * p.dilation[0]) * layout.padded_w;
        const scalar_t* taps = weight + (c * s.kernel_h + kh) * s.kernel_w;
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

// Computes `block` consecutive conv planes of one group.
template <typename scalar_t>
void conv_planes(
    scalar_t* planes, const scalar_t* source, const scalar_t* weight,
    const scalar_t* bias, int64_t block, int64_t channels,
    const std::vector<int64_t>& tap_offsets, const PlaneLayout& layout,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  const int64_t channel_size = layout.padded_h * layout.padded_w;
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t weight_stride = channels * taps;
  if (p.stride[1] != 1) {
    for (int64_t j = 0; j < block; ++j) {
      conv_plane_strided(
          planes + j * layout.length, source, weight + j * weight_stride,
          bias != nullptr ? bias[j] : scalar_t(0), channels, layout, s, p);
    }
    return;
  }
  auto run = [&](const Segment& segment) {
    auto call = [&](auto block_size) {
      conv_segment<scalar_t, decltype(block_size)::value>(
          planes, layout.length, source, channel_size, weight, weight_stride,
          bias, channels, tap_offsets.data(), taps, segment);
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
    run({0, 0, layout.length});
  } else {
    for (int64_t oh = 0; oh < s.conv_h; ++oh) {
      run({oh * p.stride[0] * layout.padded_w, oh * layout.row_pitch,
           s.conv_w});
    }
  }
}

// Max-pooling follows max_pool2d: the first maximum of a window wins, a NaN
// wins and the last NaN is kept. ReLU is applied to the maximum:
// relu(max(x)) == max(relu(x)), and the arg-max of x is the arg-max of
// relu(x) whenever that maximum is positive or NaN; otherwise no gradient
// flows through the window (code kNoGradient).
template <typename scalar_t, typename code_t>
void pool_cell(
    const scalar_t* plane, int64_t row_pitch, int64_t ph, int64_t pw,
    scalar_t* output, code_t* codes, const ops::ConvPoolShape& s,
    const ops::ConvPoolParams& p) {
  const geo::Window wh = geo::pool_window(
      ph, p.pool_kernel[0], p.pool_stride[0], p.pool_padding[0], s.conv_h);
  const geo::Window ww = geo::pool_window(
      pw, p.pool_kernel[1], p.pool_stride[1], p.pool_padding[1], s.conv_w);
  scalar_t best = -std::numeric_limits<scalar_t>::infinity();
  int64_t best_h = wh.begin;
  int64_t best_w = ww.begin;
  for (int64_t h = wh.begin; h < wh.end; ++h) {
    const scalar_t* row = plane + h * row_pitch;
    for (int64_t w = ww.begin; w < ww.end; ++w) {
      const scalar_t value = row[w];
      const bool take = value > best || std::isnan(value);
      best = take ? value : best;
      best_h = take ? h : best_h;
      best_w = take ? w : best_w;
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

// `count` lanes of plane values `step` apart (step 1 or 2), from `data`.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> load_every(
    const scalar_t* data, int64_t step, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (step == 1) {
    return Vec::loadu(data, count);
  }
  const int64_t needed = 2 * count - 1;
  const Vec low = Vec::loadu(data, std::min<int64_t>(needed, Vec::size()));
  const Vec high = needed > Vec::size()
      ? Vec::loadu(data + Vec::size(), needed - Vec::size())
      : Vec(0);
  return at::vec::deinterleave2(low, high).first;
}

// Pools `count` neighbouring windows of pooled row ph at once, one per lane;
// every window must lie inside the conv plane and pool_stride[1] be 1 or 2.
template <typename scalar_t, typename code_t>
void pool_cells_vectorized(
    const scalar_t* plane, int64_t row_pitch, int64_t ph, int64_t pw0,
    int64_t count, scalar_t* output, code_t* codes,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t origin_h = ph * p.pool_stride[0] - p.pool_padding[0];
  const int64_t origin_w = pw0 * p.pool_stride[1] - p.pool_padding[1];
  Vec best(-std::numeric_limits<scalar_t>::infinity());
  Vec code(0);
  for (int64_t dy = 0; dy < p.pool_kernel[0]; ++dy) {
    const scalar_t* row = plane + (origin_h + dy) * row_pitch + origin_w;
    for (int64_t dx = 0; dx < p.pool_kernel[1]; ++dx) {
      const Vec value = load_every(row + dx, p.pool_stride[1], count);
      const Vec take = (value > best) | value.isnan();
      best = Vec::blendv(best, value, take);
      code = Vec::blendv(
          code,
          Vec(static_cast<scalar_t>(
              geo::encode_argmax(dy, dx, p.pool_kernel[1]))),
          take);
    }
  }
  const Vec zero(0);
  const Vec blocked = best <= zero;
  const int64_t cell = ph * s.pooled_w + pw0;
  Vec::blendv(best, zero, blocked).store(output + cell, count);
  if (codes != nullptr) {
    scalar_t lanes[Vec::size()];
    Vec::blendv(code, Vec(geo::kNoGradient), blocked).store(lanes);
    for (int64_t lane = 0; lane < count; ++lane) {
      codes[cell + lane] = static_cast<code_t>(lanes[lane]);
    }
  }
}

// First and one-past-last pooled index whose window lies inside the conv
// output along one axis.
geo::TapRange interior_windows(
    int64_t kernel, int64_t stride, int64_t padding, int64_t conv_size,
    int64_t pooled_size) {
  const int64_t begin = (padding + stride - 1) / stride;
  const int64_t last = conv_size - kernel + padding;
  const int64_t end = last < 0 ? 0 : std::min(pooled_size, last / stride + 1);
  return {std::min(begin, end), end};
}

template <typename scalar_t, typename code_t>
void pool_plane(
    const scalar_t* plane, int64_t row_pitch, scalar_t* output, code_t* codes,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const geo::TapRange rows = interior_windows(
      p.pool_kernel[0], p.pool_stride[0], p.pool_padding[0], s.conv_h,
      s.pooled_h);
  const geo::TapRange cols = p.pool_stride[1] <= 2
      ? interior_windows(
            p.pool_kernel[1], p.pool_stride[1], p.pool_padding[1], s.conv_w,
            s.pooled_w)
      : geo::TapRange{0, 0};
  for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
    const bool vector_row = ph >= rows.begin && ph < rows.end;
    const int64_t vec_begin = vector_row ? cols.begin : s.pooled_w;
    const int64_t vec_end = vector_row ? cols.end : s.pooled_w;
    for (int64_t pw = 0; pw < vec_begin; ++pw) {
      pool_cell(plane, row_pitch, ph, pw, output, codes, s, p);
    }
    for (int64_t pw = vec_begin; pw < vec_end; pw += Vec::size()) {
      pool_cells_vectorized(
          plane, row_pitch, ph, pw,
          std::min<int64_t>(Vec::size(), vec_end - pw), output, codes, s, p);
    }
    for (int64_t pw = vec_end; pw < s.pooled_w; ++pw) {
      pool_cell(plane, row_pitch, ph, pw, output, codes, s, p);
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
          kh * p.dilation[0] * layout.padded_w + kw * p.dilation[1]);
    }
  }

  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const scalar_t* weight = a.weight.const_data_ptr<scalar_t>();
  const scalar_t* bias =
      a.bias.defined() ? a.bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* output = a.output.mutable_data_ptr<scalar_t>();
  code_t* codes =
      a.codes.defined() ? a.codes.mutable_data_ptr<code_t>() : nullptr;
  const int64_t weight_size = in_group * s.kernel_h * s.kernel_w;
  const int64_t pooled_size = s.pooled_h * s.pooled_w;
  const int64_t task_flops = block_size * weight_size * s.conv_h * s.conv_w;

  at::parallel_for(
      0, s.batch * blocks,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, task_flops)),
      [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> planes(block_size * layout.length);
        std::vector<scalar_t> staged(staged_size);
        int64_t staged_source = -1;  // (n * groups + group) held in `staged`
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks;
          const int64_t group = (task % blocks) / blocks_per_group;
          const int64_t first = group * out_group +
              (task % blocks_per_group) * block_size;
          const int64_t block =
              std::min(block_size, (group + 1) * out_group - first);
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
          conv_planes(
              planes.data(), source, weight + first * weight_size,
              bias != nullptr ? bias + first : nullptr, block, in_group,
              tap_offsets, layout, s, p);
          for (int64_t j = 0; j < block; ++j) {
            const int64_t plane_index = n * s.out_channels + first + j;
            pool_plane(
                planes.data() + j * layout.length, layout.row_pitch,
                output + plane_index * pooled_size,
                codes != nullptr ? codes + plane_index * pooled_size : nullptr,
                s, p);
          }
        }
      });
}

// dst[j] += alpha * src[j] for j < count.
template <typename scalar_t>
inline void axpy(
    scalar_t* dst, const scalar_t* src, scalar_t alpha, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec a(alpha);
  int64_t j = 0;
  for (; j + Vec::size() <= count; j += Vec::size()) {
    at::vec::fmadd(a, Vec::loadu(src + j), Vec::loadu(dst + j)).store(dst + j);
  }
  if (j < count) {
    const int64_t rest = count - j;
    at::vec::fmadd(a, Vec::loadu(src + j, rest), Vec::loadu(dst + j, rest))
        .store(dst + j, rest);
  }
}

// Whether any of values[0, count) is inf or NaN: x - x is NaN exactly then.
template <typename scalar_t>
bool has_non_finite(const scalar_t* values, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec sum(0);
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) {
    const Vec v = Vec::loadu(values + i);
    sum += v - v;
  }
  scalar_t rest = 0;
  for (; i < count; ++i) {
    rest += values[i] - values[i];
  }
  scalar_t lanes[Vec::size()];
  sum.store(lanes);
  for (int64_t lane = 0; lane < Vec::size(); ++lane) {
    rest += lanes[lane];
  }
  return std::isnan(rest);
}

// dst[j] += alpha * src[j] for j < count, a multiple of the vector width.
template <typename scalar_t>
inline void full_width_axpy(
    scalar_t* dst, const scalar_t* src, scalar_t alpha, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec a(alpha);
  for (int64_t j = 0; j < count; j += Vec::size()) {
    at::vec::fmadd(a, Vec::loadu(src + j), Vec::loadu(dst + j)).store(dst + j);
  }
}

// (C, H, W) -> (H, W, C) and back, for one image and group.
template <typename scalar_t>
void to_channels_last(
    scalar_t* dst, const scalar_t* src, int64_t channels, int64_t plane) {
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < plane; ++i) {
      dst[i * channels + c] = src[c * plane + i];
    }
  }
}

template <typename scalar_t>
void from_channels_last(
    scalar_t* dst, const scalar_t* src, int64_t channels, int64_t plane) {
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < plane; ++i) {
      dst[c * plane + i] = src[i * channels + c];
    }
  }
}

// A conv output that receives gradient, and the sum of the gradients of the
// pooled outputs whose arg-max it is.
template <typename scalar_t>
struct ActivePosition {
  int64_t oh, ow;
  scalar_t grad;
};

// The active conv positions of one (image, output channel) plane, in pooled
// order. When pooling windows overlap, one conv output can be the arg-max of
// several windows: it is listed once, at its first window, with the sum of
// their gradients taken in pooled order as max_pool2d's backward adds them,
// so the result matches native exactly (an inf input times g1 + g2 is not
// g1 * inf + g2 * inf).
template <typename scalar_t, typename code_t>
void collect_active_positions(
    const scalar_t* grad_output, const code_t* codes,
    const std::vector<int64_t>& code_dy, const std::vector<int64_t>& code_dx,
    const geo::PoolGeometry& pool, bool windows_overlap,
    std::vector<ActivePosition<scalar_t>>& active) {
  active.clear();
  for (int64_t ph = 0; ph < pool.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < pool.pooled_w; ++pw) {
      const int64_t cell = ph * pool.pooled_w + pw;
      const int64_t code = static_cast<int64_t>(codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      const int64_t oh = ph * pool.stride_h - pool.padding_h + code_dy[code];
      const int64_t ow = pw * pool.stride_w - pool.padding_w + code_dx[code];
      if (!windows_overlap) {
        active.push_back({oh, ow, grad_output[cell]});
        continue;
      }
      const auto gathered = geo::gather_gradient<scalar_t>(
          grad_output, codes, oh, ow, pool);
      if (gathered.first_window == cell) {
        active.push_back({oh, ow, gathered.sum});
      }
    }
  }
}

// Images are split into at most kMaxImageChunks chunks whose number depends
// only on the batch size: each chunk sums its weight gradient on its own and
// the chunks are added in order, so the result is the same for any number of
// threads.
constexpr int64_t kMaxImageChunks = 64;
// Kernel rows whose weight-gradient sums may be held in registers.
constexpr int64_t kMaxRegisterRows = 8;

// The backward visits, for each image and group, every pooled output whose
// arg-max code lets gradient through. The conv output (oh, ow) it came from
// read, for kernel row kh, the input row ih0 + kh * dilation_h over columns
// iw0 + kw * dilation_w; with the image staged channels-last (H, W, C), the
// taps [kw_begin, kw_end) of that row across all C channels of the group are
// one contiguous run when dilation_w == 1, and C-long runs otherwise. The
// weight (and its gradient) is held as (OC, KH, KW, C) to match, so each
// kernel row is one axpy for grad_input and one for grad_weight.
template <typename scalar_t, typename code_t>
void backward_typed(const ConvPoolBackwardArgs& a) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const int64_t in_group = s.in_channels_per_group(p);
  const int64_t out_group = s.out_channels_per_group(p);
  const int64_t kernel_size = s.kernel_h * s.kernel_w;
  const int64_t weight_size = in_group * kernel_size;
  const int64_t plane = s.in_h * s.in_w;
  const int64_t pooled = s.pooled_h * s.pooled_w;
  const bool need_input = a.grad_input.defined();
  const bool need_weight = a.grad_weight.defined();
  const bool need_bias = a.grad_bias.defined();

  const scalar_t* grad_output = a.grad_output.const_data_ptr<scalar_t>();
  const code_t* codes = a.codes.const_data_ptr<code_t>();
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const scalar_t* weight = a.weight.const_data_ptr<scalar_t>();

  using Vec = at::vec::Vectorized<scalar_t>;
  // A kernel row across the group's channels, (KW, C), is `row_length`
  // contiguous values in the channels-last layouts; rows are stored
  // `row_pitch` apart, rounded up to whole vectors, so that interior
  // positions update them with full-width vector loads and stores (a masked
  // store would stall the next position's loads of the same row).
  const int64_t row_length = s.kernel_w * in_group;
  const int64_t row_pitch = (row_length + Vec::size() - 1) / Vec::size() * Vec::size();
  const int64_t padded_weight_size = s.kernel_h * row_pitch;

  // (OC, C, KH, KW) -> (OC, KH, row_pitch) with (KW, C) rows, zero-padded.
  std::vector<scalar_t> weight_cl(
      need_input ? s.out_channels * padded_weight_size : 0, scalar_t(0));
  for (int64_t oc = 0; need_input && oc < s.out_channels; ++oc) {
    for (int64_t c = 0; c < in_group; ++c) {
      for (int64_t k = 0; k < kernel_size; ++k) {
        weight_cl[oc * padded_weight_size + (k / s.kernel_w) * row_pitch +
                  (k % s.kernel_w) * in_group + c] =
            weight[(oc * in_group + c) * kernel_size + k];
      }
    }
  }

  // arg-max code -> (dy, dx), decoded once.
  const int64_t window = p.pool_kernel[0] * p.pool_kernel[1];
  std::vector<int64_t> code_dy(window + 1), code_dx(window + 1);
  for (int64_t code = 1; code <= window; ++code) {
    geo::decode_argmax(code, p.pool_kernel[1], code_dy[code], code_dx[code]);
  }

  const int64_t register_rows = need_weight && p.dilation[1] == 1 &&
          row_length <= Vec::size() && s.kernel_h <= kMaxRegisterRows
      ? s.kernel_h
      : 0;

  const geo::PoolGeometry pool = ops::pool_geometry(s, p);
  const bool windows_overlap = p.pool_stride[0] < p.pool_kernel[0] ||
      p.pool_stride[1] < p.pool_kernel[1];
  const bool all_interior =
      !windows_overlap && p.padding[0] == 0 && p.padding[1] == 0;

  const int64_t chunks = std::min(s.batch, kMaxImageChunks);
  const int64_t chunk_images = (s.batch + chunks - 1) / chunks;
  const int64_t used_chunks = (s.batch + chunk_images - 1) / chunk_images;
  // Per chunk: weight gradient (OC, KH, KW, C) then bias gradient (OC).
  const int64_t partial_size =
      need_weight || need_bias ? s.out_channels * (weight_size + 1) : 0;
  std::vector<acc_t> partials(used_chunks * partial_size, acc_t(0));
  std::vector<uint8_t> non_finite(used_chunks, 0);

  const int64_t chunk_flops = chunk_images * s.out_channels * pooled * weight_size;
  at::parallel_for(
      0, used_chunks,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, chunk_flops)),
      [&](int64_t begin, int64_t end) {
        // Slack of one row pitch: full-width rows may run past the last pixel.
        std::vector<scalar_t> image_cl(
            need_weight ? in_group * plane + row_pitch : 0, scalar_t(0));
        std::vector<scalar_t> grad_cl(
            need_input ? in_group * plane + row_pitch : 0);
        std::vector<scalar_t> image_weight_grad(
            need_weight ? out_group * padded_weight_size : 0);
        std::vector<ActivePosition<scalar_t>> active;
        active.reserve(pooled);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          acc_t* partial = partials.data() + chunk * partial_size;
          const int64_t n_end = std::min(s.batch, (chunk + 1) * chunk_images);
          for (int64_t n = chunk * chunk_images; n < n_end; ++n) {
            for (int64_t group = 0; group < p.groups; ++group) {
              const int64_t slice =
                  (n * s.in_channels + group * in_group) * plane;
              if (need_weight) {
                to_channels_last(image_cl.data(), input + slice, in_group, plane);
                non_finite[chunk] |= has_non_finite(image_cl.data(), in_group * plane);
                std::fill(
                    image_weight_grad.begin(), image_weight_grad.end(),
                    scalar_t(0));
              }
              if (need_input) {
                std::fill(grad_cl.begin(), grad_cl.end(), scalar_t(0));
              }
              for (int64_t j = 0; j < out_group; ++j) {
                const int64_t oc = group * out_group + j;
                const int64_t offset = (n * s.out_channels + oc) * pooled;
                const scalar_t* w = weight_cl.data() + oc * padded_weight_size;
                scalar_t* gw = image_weight_grad.data() + j * padded_weight_size;
                // When a kernel row across the group's channels fits in one
                // vector, the weight gradient of fully interior receptive
                // fields is summed in registers, one vector per kernel row,
                // rather than read and written back for every position.
                // Loops over kh < kMaxRegisterRows unroll fully, so that
                // row_sums lives in registers.
                Vec row_sums[kMaxRegisterRows];
                for (int64_t kh = 0; kh < kMaxRegisterRows; ++kh) {
                  row_sums[kh] = Vec(0);
                }
                scalar_t bias_sum = 0;
                // One arg-max position's contribution; `interior` when its
                // whole receptive field lies inside the input.
                const auto visit = [&](int64_t oh, int64_t ow, scalar_t grad,
                                       bool interior,
                                       const geo::TapRange& rows,
                                       const geo::TapRange& cols) {
                  const int64_t ih0 = oh * p.stride[0] - p.padding[0];
                  const int64_t iw0 = ow * p.stride[1] - p.padding[1];
                  const bool weight_in_registers =
                      need_weight && register_rows > 0 && interior;
                  if (weight_in_registers) {
                    const Vec g(grad);
                    const scalar_t* field =
                        image_cl.data() + (ih0 * s.in_w + iw0) * in_group;
                    const int64_t row_step = p.dilation[0] * s.in_w * in_group;
#pragma GCC unroll 8
                    for (int64_t kh = 0; kh < kMaxRegisterRows; ++kh) {
                      if (kh < register_rows) {
                        row_sums[kh] = at::vec::fmadd(
                            g, Vec::loadu(field + kh * row_step, row_length),
                            row_sums[kh]);
                      }
                    }
                    if (!need_input) {
                      return;
                    }
                  }
                  // Whole kernel rows at full vector width: the padding lanes
                  // of a weight row are 0, so the grad_input values past the
                  // row get + grad * 0 (a finite grad leaves them unchanged),
                  // and the padding lanes of a weight-gradient row collect
                  // values that are never read.
                  if (interior && p.dilation[1] == 1 &&
                      (!need_input || std::isfinite(grad))) {
                    const int64_t row_step = p.dilation[0] * s.in_w * in_group;
                    const int64_t field = (ih0 * s.in_w + iw0) * in_group;
                    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
                      const int64_t pixel = field + kh * row_step;
                      if (need_input) {
                        full_width_axpy(
                            grad_cl.data() + pixel, w + kh * row_pitch, grad,
                            row_pitch);
                      }
                      if (need_weight && !weight_in_registers) {
                        full_width_axpy(
                            gw + kh * row_pitch, image_cl.data() + pixel, grad,
                            row_pitch);
                      }
                    }
                    return;
                  }
                  // Contiguous runs per kernel row: all valid taps at once
                  // when dilation_w == 1, else one tap at a time.
                  const int64_t run_taps =
                      p.dilation[1] == 1 ? cols.end - cols.begin : 1;
                  for (int64_t kh = rows.begin; kh < rows.end; ++kh) {
                    const int64_t ih = ih0 + kh * p.dilation[0];
                    for (int64_t kw = cols.begin; kw < cols.end;
                         kw += run_taps) {
                      const int64_t pixel =
                          (ih * s.in_w + iw0 + kw * p.dilation[1]) * in_group;
                      const int64_t tap = kh * row_pitch + kw * in_group;
                      const int64_t length = run_taps * in_group;
                      if (need_input) {
                        axpy(grad_cl.data() + pixel, w + tap, grad, length);
                      }
                      if (need_weight && !weight_in_registers) {
                        axpy(gw + tap, image_cl.data() + pixel, grad, length);
                      }
                    }
                  }
                };
                const geo::TapRange all_rows{0, s.kernel_h};
                const geo::TapRange all_cols{0, s.kernel_w};
                if (all_interior) {
                  // No conv padding and no overlapping windows: every
                  // position is interior and belongs to one window, so visit
                  // the codes directly.
                  for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
                    for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
                      const int64_t cell = offset + ph * s.pooled_w + pw;
                      const int64_t code = static_cast<int64_t>(codes[cell]);
                      if (code == geo::kNoGradient) {
                        continue;
                      }
                      const scalar_t grad = grad_output[cell];
                      bias_sum += grad;
                      if (need_input || need_weight) {
                        visit(
                            ph * p.pool_stride[0] - p.pool_padding[0] +
                                code_dy[code],
                            pw * p.pool_stride[1] - p.pool_padding[1] +
                                code_dx[code],
                            grad, true, all_rows, all_cols);
                      }
                    }
                  }
                } else {
                  collect_active_positions(
                      grad_output + offset, codes + offset, code_dy, code_dx,
                      pool, windows_overlap, active);
                  for (const auto& position : active) {
                    bias_sum += position.grad;
                    if (!need_input && !need_weight) {
                      continue;
                    }
                    const auto rows = geo::valid_taps(
                        position.oh, s.kernel_h, p.stride[0], p.padding[0],
                        p.dilation[0], s.in_h);
                    const auto cols = geo::valid_taps(
                        position.ow, s.kernel_w, p.stride[1], p.padding[1],
                        p.dilation[1], s.in_w);
                    visit(
                        position.oh, position.ow, position.grad,
                        rows.begin == 0 && rows.end == s.kernel_h &&
                            cols.begin == 0 && cols.end == s.kernel_w,
                        rows, cols);
                  }
                }
                for (int64_t kh = 0; kh < register_rows; ++kh) {
                  scalar_t* dst = gw + kh * row_pitch;  // flushed once per plane
                  (Vec::loadu(dst, row_length) + row_sums[kh])
                      .store(dst, row_length);
                }
                if (need_bias) {
                  partial[s.out_channels * weight_size + oc] += bias_sum;
                }
              }
              if (need_input) {
                from_channels_last(
                    a.grad_input.mutable_data_ptr<scalar_t>() + slice,
                    grad_cl.data(), in_group, plane);
              }
              if (need_weight) {
                acc_t* dst = partial + group * out_group * weight_size;
                for (int64_t row = 0; row < out_group * s.kernel_h; ++row) {
                  for (int64_t k = 0; k < row_length; ++k) {
                    dst[row * row_length + k] +=
                        image_weight_grad[row * row_pitch + k];
                  }
                }
              }
            }
          }
        }
      });

  *a.input_non_finite = std::any_of(
      non_finite.begin(), non_finite.end(), [](uint8_t flag) { return flag; });
  if (!need_weight && !need_bias) {
    return;
  }
  // Sum the chunks in order, then (OC, KH, KW, C) -> (OC, C, KH, KW).
  std::vector<acc_t> total(partial_size, acc_t(0));
  for (int64_t chunk = 0; chunk < used_chunks; ++chunk) {
    const acc_t* partial = partials.data() + chunk * partial_size;
    for (int64_t k = 0; k < partial_size; ++k) {
      total[k] += partial[k];
    }
  }
  if (need_weight) {
    scalar_t* grad_weight = a.grad_weight.mutable_data_ptr<scalar_t>();
    for (int64_t oc = 0; oc < s.out_channels; ++oc) {
      for (int64_t c = 0; c < in_group; ++c) {
        for (int64_t k = 0; k < kernel_size; ++k) {
          grad_weight[(oc * in_group + c) * kernel_size + k] =
              static_cast<scalar_t>(
                  total[oc * weight_size + k * in_group + c]);
        }
      }
    }
  }
  if (need_bias) {
    scalar_t* grad_bias = a.grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t oc = 0; oc < s.out_channels; ++oc) {
      grad_bias[oc] =
          static_cast<scalar_t>(total[s.out_channels * weight_size + oc]);
    }
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
