// Host+device bodies of the CUDA kernels of the fused
// conv2d -> ReLU -> max_pool2d operator: what one thread computes for one
// work item. conv2d_relu_max_pool2d_kernel.cu launches them on the GPU;
// csrc/ops/cpu/cuda_emulation/ runs the same functions on the CPU, so every
// index, bound and code convention here is checked on every CI run
// (launch.h says why).
//
// Four kernels:
//   epilogue       one item per pooled output: ReLU + max pooling of the
//                  vendor path's conv output, writing the pooled value and
//                  its 1-byte arg-max code;
//   conv_gradient  one item per conv output: the gradient the native
//                  composite sends into the convolution, gathered from the
//                  pooled gradients whose codes point at it (no atomics; the
//                  sum in pooled row-major order, max_pool2d's own order);
//   direct_forward one item per pooled output: the direct path's forward,
//                  which computes the window's conv values itself;
//   direct_forward_tiled  the direct forward for 2x2 and 3x3 pooling, a
//                  block per tile of pooled outputs with its input and
//                  weights staged in shared memory (three phases, below).
// The first three are one item per thread in a grid-stride loop, their
// bodies one overload set, compute_item(args, item), picked by the type of
// the arguments, so that one kernel template and one emulated loop run all
// three. Items run in the memory order of the tensor they write (NCHW or
// channels-last), so neighbouring threads write neighbouring addresses.
// Index arithmetic runs in index_t: int32_t whenever every tensor of the
// call has fewer than 2^31 elements (32-bit division is several times
// cheaper on the GPU), int64_t otherwise.
#pragma once

#include "ops/cuda/launch.h"
#include "ops/geometry.h"

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace ptfast::cuda::conv_block {

// Element strides of an (N, C, H, W) tensor.
template <typename index_t>
struct Strides {
  index_t n, c, h, w;

  C10_HOST_DEVICE index_t
  offset(index_t in, index_t ic, index_t ih, index_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// The (n, c, h, w) an item index of a launch over an (N, C, H, W) tensor
// stands for, in the tensor's memory order.
template <typename index_t>
struct Position {
  index_t n, c, h, w;
};

template <typename index_t>
C10_HOST_DEVICE inline Position<index_t> position_of(
    index_t item, index_t channels, index_t height, index_t width,
    bool channels_last) {
  Position<index_t> p{};
  if (channels_last) {
    p.c = item % channels;
    item /= channels;
    p.w = item % width;
    item /= width;
    p.h = item % height;
    p.n = item / height;
  } else {
    p.w = item % width;
    item /= width;
    p.h = item % height;
    item /= height;
    p.c = item % channels;
    p.n = item / channels;
  }
  return p;
}

// The pooling of a plane, with its sizes in index_t.
template <typename index_t>
struct Pool {
  index_t kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w;
  index_t pooled_h, pooled_w;
};

template <typename index_t>
Pool<index_t> make_pool(const geometry::PoolGeometry& g) {
  return {static_cast<index_t>(g.kernel_h),  static_cast<index_t>(g.kernel_w),
          static_cast<index_t>(g.stride_h),  static_cast<index_t>(g.stride_w),
          static_cast<index_t>(g.padding_h), static_cast<index_t>(g.padding_w),
          static_cast<index_t>(g.pooled_h),  static_cast<index_t>(g.pooled_w)};
}

using geometry::pool_window;
using geometry::Window;
using geometry::windows_containing;

// The running maximum of a pooling window with max_pool2d's rules: the first
// of equal values wins, a NaN wins over everything and the last NaN over
// earlier ones.
template <typename acc_t, typename index_t>
struct WindowMax {
  acc_t value = -std::numeric_limits<acc_t>::infinity();
  index_t h = 0, w = 0;

  C10_HOST_DEVICE void add(acc_t candidate, index_t ch, index_t cw) {
    if (candidate > value || candidate != candidate) {
      value = candidate;
      h = ch;
      w = cw;
    }
  }
};

// Writes a window's ReLU'd maximum and its arg-max code: 0 (kNoGradient)
// where the maximum is <= 0, since ReLU then passes no gradient to any
// position of the window.
template <typename scalar_t, typename code_t, typename acc_t, typename index_t>
C10_HOST_DEVICE inline void write_pooled(
    const WindowMax<acc_t, index_t>& best, const Window<index_t>& wh,
    const Window<index_t>& ww, index_t kernel_w, scalar_t* output,
    code_t* code) {
  const bool blocked = best.value <= acc_t(0);
  *output = static_cast<scalar_t>(blocked ? acc_t(0) : best.value);
  if (code != nullptr) {
    *code = static_cast<code_t>(
        blocked ? geometry::kNoGradient
                : geometry::encode_argmax(
                      best.h - wh.origin, best.w - ww.origin, kernel_w));
  }
}

// epilogue: the vendor path's ReLU + pooling, one item per pooled output.

template <typename scalar_t, typename code_t, typename index_t>
struct EpilogueArgs {
  const scalar_t* conv;  // (N, C, conv_h, conv_w), any strides
  Strides<index_t> conv_strides;
  scalar_t* output;  // (N, C, pooled_h, pooled_w)
  Strides<index_t> output_strides;
  code_t* codes;  // like output; nullptr when no codes are asked for
  Strides<index_t> code_strides;
  index_t channels, conv_h, conv_w;
  Pool<index_t> pool;
  bool channels_last;  // the output's memory order, which items follow
};

template <typename scalar_t, typename code_t, typename index_t>
C10_HOST_DEVICE inline void compute_item(
    const EpilogueArgs<scalar_t, code_t, index_t>& a, index_t item) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool<index_t>& g = a.pool;
  const Position<index_t> p =
      position_of(item, a.channels, g.pooled_h, g.pooled_w, a.channels_last);
  const Window<index_t> wh =
      pool_window(p.h, g.kernel_h, g.stride_h, g.padding_h, a.conv_h);
  const Window<index_t> ww =
      pool_window(p.w, g.kernel_w, g.stride_w, g.padding_w, a.conv_w);
  const scalar_t* plane =
      a.conv + a.conv_strides.offset(p.n, p.c, index_t(0), index_t(0));
  WindowMax<acc_t, index_t> best;
  best.h = wh.begin;
  best.w = ww.begin;
  for (index_t h = wh.begin; h < wh.end; ++h) {
    for (index_t w = ww.begin; w < ww.end; ++w) {
      best.add(
          static_cast<acc_t>(
              plane[h * a.conv_strides.h + w * a.conv_strides.w]),
          h, w);
    }
  }
  write_pooled(
      best, wh, ww, g.kernel_w,
      a.output + a.output_strides.offset(p.n, p.c, p.h, p.w),
      a.codes == nullptr ? static_cast<code_t*>(nullptr)
                         : a.codes + a.code_strides.offset(p.n, p.c, p.h, p.w));
}

// conv_gradient: the dense conv-output gradient, one item per conv output.

template <typename scalar_t, typename code_t, typename index_t>
struct ConvGradientArgs {
  const scalar_t* grad_output;  // (N, C, pooled_h, pooled_w)
  Strides<index_t> grad_output_strides;
  const code_t* codes;  // like grad_output
  Strides<index_t> code_strides;
  scalar_t* grad_conv;  // (N, C, conv_h, conv_w)
  Strides<index_t> grad_conv_strides;
  index_t channels, conv_h, conv_w;
  Pool<index_t> pool;
  bool channels_last;  // grad_conv's memory order, which items follow
};

template <typename scalar_t, typename code_t, typename index_t>
C10_HOST_DEVICE inline void compute_item(
    const ConvGradientArgs<scalar_t, code_t, index_t>& a, index_t item) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool<index_t>& g = a.pool;
  const Position<index_t> p =
      position_of(item, a.channels, a.conv_h, a.conv_w, a.channels_last);
  const geometry::IndexRange<index_t> rows =
      windows_containing(p.h, g.kernel_h, g.stride_h, g.padding_h, g.pooled_h);
  const geometry::IndexRange<index_t> cols =
      windows_containing(p.w, g.kernel_w, g.stride_w, g.padding_w, g.pooled_w);
  acc_t sum = 0;
  for (index_t ph = rows.begin; ph < rows.end; ++ph) {
    const index_t dy = p.h - (ph * g.stride_h - g.padding_h);
    for (index_t pw = cols.begin; pw < cols.end; ++pw) {
      const index_t dx = p.w - (pw * g.stride_w - g.padding_w);
      // Codes are compared, never used as an index: a code that names no
      // tap of its window (only a caller of the raw op can pass one) sends
      // its gradient nowhere instead of out of bounds.
      const auto code = static_cast<int64_t>(
          a.codes[a.code_strides.offset(p.n, p.c, ph, pw)]);
      if (code == geometry::encode_argmax(dy, dx, g.kernel_w)) {
        sum += static_cast<acc_t>(
            a.grad_output[a.grad_output_strides.offset(p.n, p.c, ph, pw)]);
      }
    }
  }
  a.grad_conv[a.grad_conv_strides.offset(p.n, p.c, p.h, p.w)] =
      static_cast<scalar_t>(sum);
}

// direct_forward: the direct path, one item per pooled output of a
// contiguous (NCHW) output; input and weight contiguous.

template <typename scalar_t, typename code_t, typename index_t>
struct DirectForwardArgs {
  const scalar_t* input;   // (N, C_in, in_h, in_w)
  const scalar_t* weight;  // (C_out, C_in / groups, kernel_h, kernel_w)
  const scalar_t* bias;    // (C_out) or nullptr
  scalar_t* output;        // (N, C_out, pooled_h, pooled_w)
  code_t* codes;           // like output, or nullptr
  index_t in_channels, in_h, in_w, out_channels;
  index_t in_group, out_group;  // channels per group
  index_t kernel_h, kernel_w, conv_h, conv_w;
  index_t stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
  Pool<index_t> pool;
};

// Conv output (n, oc, oh, ow) in acc_t, zero padding included as
// multiplications by 0 (the im2col convention the CPU kernels follow too).
template <typename scalar_t, typename code_t, typename index_t, typename acc_t>
C10_HOST_DEVICE inline acc_t direct_conv_at(
    const DirectForwardArgs<scalar_t, code_t, index_t>& a, index_t n,
    index_t oc, index_t oh, index_t ow) {
  const index_t group = oc / a.out_group;
  acc_t acc = a.bias != nullptr ? static_cast<acc_t>(a.bias[oc]) : acc_t(0);
  const scalar_t* w = a.weight + oc * a.in_group * a.kernel_h * a.kernel_w;
  for (index_t c = 0; c < a.in_group; ++c) {
    const scalar_t* x =
        a.input +
        ((n * a.in_channels + group * a.in_group + c) * a.in_h) * a.in_w;
    for (index_t kh = 0; kh < a.kernel_h; ++kh) {
      const index_t ih = oh * a.stride_h - a.padding_h + kh * a.dilation_h;
      const bool row_inside = ih >= 0 && ih < a.in_h;
      for (index_t kw = 0; kw < a.kernel_w; ++kw) {
        const index_t iw = ow * a.stride_w - a.padding_w + kw * a.dilation_w;
        const acc_t value = row_inside && iw >= 0 && iw < a.in_w
                                ? static_cast<acc_t>(x[ih * a.in_w + iw])
                                : acc_t(0);
        acc += value * static_cast<acc_t>(*w++);
      }
    }
  }
  return acc;
}

template <typename scalar_t, typename code_t, typename index_t>
C10_HOST_DEVICE inline void compute_item(
    const DirectForwardArgs<scalar_t, code_t, index_t>& a, index_t item) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pool<index_t>& g = a.pool;
  const Position<index_t> p = position_of(
      item, a.out_channels, g.pooled_h, g.pooled_w, /*channels_last=*/false);
  const Window<index_t> wh =
      pool_window(p.h, g.kernel_h, g.stride_h, g.padding_h, a.conv_h);
  const Window<index_t> ww =
      pool_window(p.w, g.kernel_w, g.stride_w, g.padding_w, a.conv_w);
  WindowMax<acc_t, index_t> best;
  best.h = wh.begin;
  best.w = ww.begin;
  for (index_t h = wh.begin; h < wh.end; ++h) {
    for (index_t w = ww.begin; w < ww.end; ++w) {
      // Rounded to scalar_t first, as the native conv output is.
      best.add(
          static_cast<acc_t>(static_cast<scalar_t>(
              direct_conv_at<scalar_t, code_t, index_t, acc_t>(
                  a, p.n, p.c, h, w))),
          h, w);
    }
  }
  write_pooled(
      best, wh, ww, g.kernel_w, a.output + item,
      a.codes == nullptr ? static_cast<code_t*>(nullptr) : a.codes + item);
}

// direct_forward_tiled: the direct path for 2x2 and 3x3 pooling windows. A
// block computes a tile of pooled outputs (one thread each) for
// kTiledChannels output channels of one group of one image. Per input
// channel of the group, the block first stages in shared memory the input
// rows and columns its windows read (zero outside the image: the padding
// taps multiply a 0, as in direct_conv_at) and the channels' weights for
// that input channel (phase 1), then every thread adds that channel's
// products to the conv values of its window, for all kTiledChannels
// channels at once (phase 2): an input value is read from global memory
// once per block rather than once per tap, window and channel. After the
// last input channel each thread pools its windows (phase 3). The sums run
// in direct_conv_at's order (bias, then channel, row, column), so both
// direct kernels give the same bits.

constexpr int kTiledChannels = 4;
constexpr int kTiledMaxThreads = 128;

template <typename scalar_t, typename index_t>
struct TiledForwardArgs {
  DirectForwardArgs<scalar_t, uint8_t, index_t> d;  // 2x2/3x3: uint8 codes
  index_t groups;
  index_t tile_h, tile_w;    // pooled outputs of a block (threads: product)
  index_t tiles_h, tiles_w;  // tiles of a pooled plane
  index_t channel_blocks;    // blocks of kTiledChannels per group
  index_t input_rows, input_cols;  // the staged input of one channel
};

// Where a block's tile sits.
template <typename index_t>
struct Tile {
  index_t n, group, first_channel,
      channels;      // channels: valid, <= kTiledChannels
  index_t ph0, pw0;  // first pooled output
  index_t ih0, iw0;  // input position of the staged tile's (0, 0)
};

template <typename scalar_t, typename index_t>
C10_HOST_DEVICE inline Tile<index_t> tile_of_block(
    const TiledForwardArgs<scalar_t, index_t>& a, int64_t block) {
  const auto& d = a.d;
  Tile<index_t> t{};
  index_t rest = static_cast<index_t>(block);
  const index_t tile_x = rest % a.tiles_w;
  rest /= a.tiles_w;
  const index_t tile_y = rest % a.tiles_h;
  rest /= a.tiles_h;
  const index_t channel_block = rest % a.channel_blocks;
  rest /= a.channel_blocks;
  t.group = rest % a.groups;
  t.n = rest / a.groups;
  const index_t in_group_channel = channel_block * kTiledChannels;
  t.first_channel = t.group * d.out_group + in_group_channel;
  const index_t left = d.out_group - in_group_channel;
  t.channels = left < kTiledChannels ? left : index_t(kTiledChannels);
  t.ph0 = tile_y * a.tile_h;
  t.pw0 = tile_x * a.tile_w;
  t.ih0 =
      (t.ph0 * d.pool.stride_h - d.pool.padding_h) * d.stride_h - d.padding_h;
  t.iw0 =
      (t.pw0 * d.pool.stride_w - d.pool.padding_w) * d.stride_w - d.padding_w;
  return t;
}

// A thread's conv values: [channel][dy * PKW + dx] of its pooling window.
template <typename acc_t, int PKH, int PKW>
struct TiledSums {
  acc_t conv[kTiledChannels][PKH * PKW];
};

template <typename scalar_t, typename index_t, typename acc_t, int PKH, int PKW>
C10_HOST_DEVICE inline void start_tile(
    const TiledForwardArgs<scalar_t, index_t>& a, const Tile<index_t>& t,
    TiledSums<acc_t, PKH, PKW>& sums) {
  PTFAST_UNROLL
  for (int ch = 0; ch < kTiledChannels; ++ch) {
    const acc_t bias = a.d.bias != nullptr && ch < t.channels
                           ? static_cast<acc_t>(a.d.bias[t.first_channel + ch])
                           : acc_t(0);
    PTFAST_UNROLL
    for (int k = 0; k < PKH * PKW; ++k) {
      sums.conv[ch][k] = bias;
    }
  }
}

// Phase 1 for input channel `c` of the group: this thread's share of the
// staging.
template <typename scalar_t, typename index_t, typename acc_t>
C10_HOST_DEVICE inline void stage_input_channel(
    const TiledForwardArgs<scalar_t, index_t>& a, const Tile<index_t>& t,
    index_t c, const ThreadIndex& thread, acc_t* tile_input,
    acc_t* tile_weight) {
  const auto& d = a.d;
  const scalar_t* x =
      d.input +
      ((t.n * d.in_channels + t.group * d.in_group + c) * d.in_h) * d.in_w;
  const index_t staged = a.input_rows * a.input_cols;
  for (index_t i = thread.thread; i < staged; i += thread.threads) {
    const index_t ih = t.ih0 + i / a.input_cols;
    const index_t iw = t.iw0 + i % a.input_cols;
    tile_input[i] = ih >= 0 && ih < d.in_h && iw >= 0 && iw < d.in_w
                        ? static_cast<acc_t>(x[ih * d.in_w + iw])
                        : acc_t(0);
  }
  const index_t taps = d.kernel_h * d.kernel_w;
  for (index_t i = thread.thread; i < kTiledChannels * taps;
       i += thread.threads) {
    const index_t ch = i / taps;
    tile_weight[i] =
        ch < t.channels
            ? static_cast<acc_t>(
                  d.weight
                      [((t.first_channel + ch) * d.in_group + c) * taps +
                       i % taps])
            : acc_t(0);
  }
}

// Phase 2: this thread's window gets the staged channel's products. KH and
// KW are the conv kernel's size when known at compile time (5x5, 3x3), 0
// otherwise.
template <
    int KH, int KW, typename scalar_t, typename index_t, typename acc_t,
    int PKH, int PKW>
C10_HOST_DEVICE inline void accumulate_input_channel(
    const TiledForwardArgs<scalar_t, index_t>& a, const Tile<index_t>& t,
    const ThreadIndex& thread, const acc_t* tile_input,
    const acc_t* tile_weight, TiledSums<acc_t, PKH, PKW>& sums) {
  const auto& d = a.d;
  const index_t ph = t.ph0 + thread.thread / a.tile_w;
  const index_t pw = t.pw0 + thread.thread % a.tile_w;
  if (ph >= d.pool.pooled_h || pw >= d.pool.pooled_w) {
    return;
  }
  const index_t kernel_h = KH > 0 ? index_t(KH) : d.kernel_h;
  const index_t kernel_w = KW > 0 ? index_t(KW) : d.kernel_w;
  PTFAST_UNROLL
  for (int dy = 0; dy < PKH; ++dy) {
    const index_t oh = ph * d.pool.stride_h - d.pool.padding_h + dy;
    if (oh < 0 || oh >= d.conv_h) {
      continue;
    }
    PTFAST_UNROLL
    for (int dx = 0; dx < PKW; ++dx) {
      const index_t ow = pw * d.pool.stride_w - d.pool.padding_w + dx;
      if (ow < 0 || ow >= d.conv_w) {
        continue;
      }
      const acc_t* row =
          tile_input + (oh * d.stride_h - d.padding_h - t.ih0) * a.input_cols +
          (ow * d.stride_w - d.padding_w - t.iw0);
      PTFAST_UNROLL
      for (index_t kh = 0; kh < kernel_h; ++kh) {
        PTFAST_UNROLL
        for (index_t kw = 0; kw < kernel_w; ++kw) {
          const acc_t value =
              row[kh * d.dilation_h * a.input_cols + kw * d.dilation_w];
          const index_t tap = kh * kernel_w + kw;
          PTFAST_UNROLL
          for (int ch = 0; ch < kTiledChannels; ++ch) {
            sums.conv[ch][dy * PKW + dx] +=
                value * tile_weight[ch * kernel_h * kernel_w + tap];
          }
        }
      }
    }
  }
}

// Phase 3: pool this thread's windows and write them.
template <typename scalar_t, typename index_t, typename acc_t, int PKH, int PKW>
C10_HOST_DEVICE inline void finish_tile(
    const TiledForwardArgs<scalar_t, index_t>& a, const Tile<index_t>& t,
    const ThreadIndex& thread, const TiledSums<acc_t, PKH, PKW>& sums) {
  const auto& d = a.d;
  const Pool<index_t>& g = d.pool;
  const index_t ph = t.ph0 + thread.thread / a.tile_w;
  const index_t pw = t.pw0 + thread.thread % a.tile_w;
  if (ph >= g.pooled_h || pw >= g.pooled_w) {
    return;
  }
  const Window<index_t> wh =
      pool_window(ph, g.kernel_h, g.stride_h, g.padding_h, d.conv_h);
  const Window<index_t> ww =
      pool_window(pw, g.kernel_w, g.stride_w, g.padding_w, d.conv_w);
  PTFAST_UNROLL
  for (int ch = 0; ch < kTiledChannels; ++ch) {
    if (ch >= t.channels) {
      break;
    }
    WindowMax<acc_t, index_t> best;
    best.h = wh.begin;
    best.w = ww.begin;
    // Compile-time positions in the window keep the sums in registers.
    PTFAST_UNROLL
    for (int dy = 0; dy < PKH; ++dy) {
      const index_t h = wh.origin + dy;
      if (h < wh.begin || h >= wh.end) {
        continue;
      }
      PTFAST_UNROLL
      for (int dx = 0; dx < PKW; ++dx) {
        const index_t w = ww.origin + dx;
        if (w < ww.begin || w >= ww.end) {
          continue;
        }
        // Rounded to scalar_t first, as the native conv output is.
        best.add(
            static_cast<acc_t>(
                static_cast<scalar_t>(sums.conv[ch][dy * PKW + dx])),
            h, w);
      }
    }
    const index_t out =
        ((t.n * d.out_channels + t.first_channel + ch) * g.pooled_h + ph) *
            g.pooled_w +
        pw;
    write_pooled(
        best, wh, ww, g.kernel_w, d.output + out,
        d.codes == nullptr ? static_cast<uint8_t*>(nullptr) : d.codes + out);
  }
}

// A grid-stride loop: the items [0, items) this thread takes.
template <typename index_t, typename Fn>
C10_HOST_DEVICE inline void for_each_item(
    const ThreadIndex& thread, index_t items, const Fn& fn) {
  for (int64_t item = thread.global(); item < items;
       item += thread.grid_threads()) {
    fn(static_cast<index_t>(item));
  }
}

}  // namespace ptfast::cuda::conv_block
