// The vendor path's forward epilogue: ReLU and max-pooling of a conv output
// that ATen's convolution (oneDNN) computed, writing the pooled output and
// the same arg-max codes the direct kernel writes. Compiled once per
// instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// One pass over the conv output. NCHW: each plane is copied into a
// thread-local buffer that ends in the pooling's -inf sentinel and slack (the
// gathers read the sentinel for taps outside the plane, the row path loads
// two vectors past a row's start), then pooled by the code the direct forward
// uses. Channels-last: pooled straight from the pixels, a vector of channels
// per tap, through the same store_pooled. Either way both paths pick the same
// arg-max by construction. Half-precision conv outputs are pooled in float32
// (see epilogue_typed).
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/cpu/isa/conv2d_relu_max_pool2d_pooling.h"
#include "ops/cpu/isa/half_precision.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ptfast::cpu {
namespace {

// Pools `channels` neighbouring channels of a channels-last conv output (a
// plane's pixel p at conv + p * pixel_stride, its channels contiguous), a
// vector of channels at a time: each window tap is one vector load at the
// pixel PoolTable names, -inf for its sentinel (taps outside the plane), and
// store_pooled applies the same arg-max rule as the plane pooling. Pooled
// cell `cell`, channel j goes to pooled[cell * pooled_stride + j], its code
// to codes[cell * codes_stride + j] (codes may be null).
template <typename pool_t, typename scalar_t, typename out_t, typename code_t>
void pool_channels_last(
    const scalar_t* conv, int64_t pixel_stride, int64_t channels,
    const PoolTable<pool_t>& table, int64_t plane_size, out_t* pooled,
    int64_t pooled_stride, code_t* codes, int64_t codes_stride) {
  using Vec = at::vec::Vectorized<pool_t>;
  const Vec lowest(-std::numeric_limits<pool_t>::infinity());
  for (int64_t cell = 0; cell < table.cells; ++cell) {
    for (int64_t c = 0; c < channels; c += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), channels - c);
      const auto tap = [&](int64_t t) {
        const int64_t pixel = table.index[t * table.padded_cells + cell];
        return pixel == plane_size
            ? lowest
            : load_as<pool_t>(conv + pixel * pixel_stride + c, count);
      };
      Vec best = lowest;
      for (int64_t t = 0; t < table.taps; ++t) {
        best = at::vec::maximum(best, tap(t));
      }
      store_pooled(
          best, table.taps, tap, pooled + cell * pooled_stride + c,
          codes != nullptr ? codes + cell * codes_stride + c : nullptr, count);
    }
  }
}

// The epilogue of a channels-last conv output (pixels of contiguous
// channels, as oneDNN writes it for a channels-last call): pooled straight
// from it, kChannels channels per task, so that each pixel's cache lines
// are read whole, once. The pooled output and codes are written in place
// when they are channels-last (half-precision values rounded as they are
// stored); otherwise through a (cell, channel) buffer, transposed into the
// NCHW planes. Pointers and strides come from epilogue_typed (without
// arg-max, codes is null and ks are the output's strides).
template <typename scalar_t, typename code_t>
void epilogue_channels_last(
    const Conv2dReluMaxPool2dEpilogueArgs& a, const scalar_t* conv,
    scalar_t* output, code_t* codes, at::IntArrayRef cs, at::IntArrayRef os,
    at::IntArrayRef ks) {
  constexpr bool kHalf = is_half_precision_v<scalar_t>;
  using pool_t = std::conditional_t<kHalf, float, scalar_t>;
  constexpr int64_t kChannels = 64 / sizeof(scalar_t);
  const auto& s = a.shape;
  const int64_t plane_size = s.conv_h * s.conv_w;
  const int64_t cells = s.pooled_h * s.pooled_w;
  const auto cells_in_rows = [&](at::IntArrayRef st) {
    return st[1] == 1 && st[2] == s.pooled_w * st[3];
  };
  const auto planes = [&](at::IntArrayRef st) {
    return st[3] == 1 && st[2] == s.pooled_w;
  };
  const bool output_in_place = cells_in_rows(os);
  const bool codes_in_place = codes != nullptr && cells_in_rows(ks);
  const PoolTable<pool_t> table(s, a.params);
  const int64_t tasks_per_image = (s.out_channels + kChannels - 1) / kChannels;
  at::parallel_for(
      0, s.batch * tasks_per_image,
      std::max<int64_t>(
          1, kGrainValues / std::max<int64_t>(1, plane_size * kChannels)),
      [&](int64_t begin, int64_t end) {
        std::vector<pool_t> values(output_in_place ? 0 : cells * kChannels);
        std::vector<code_t> cell_codes(
            codes == nullptr || codes_in_place ? 0 : cells * kChannels);
        // Half precision into NCHW planes: transposed, then converted.
        std::vector<pool_t> plane_values(
            kHalf && planes(os) ? cells * kChannels : 0);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / tasks_per_image;
          const int64_t c0 = task % tasks_per_image * kChannels;
          const int64_t channels = std::min(kChannels, s.out_channels - c0);
          scalar_t* out = output + n * os[0] + c0 * os[1];
          code_t* code =
              codes != nullptr ? codes + n * ks[0] + c0 * ks[1] : nullptr;
          code_t* pooled_codes = nullptr;
          if (code != nullptr) {
            pooled_codes = codes_in_place ? code : cell_codes.data();
          }
          const scalar_t* pixels = conv + n * cs[0] + c0 * cs[1];
          const int64_t codes_stride = codes_in_place ? ks[3] : kChannels;
          if (output_in_place) {
            pool_channels_last(
                pixels, cs[3], channels, table, plane_size, out, os[3],
                pooled_codes, codes_stride);
          } else {
            pool_channels_last(
                pixels, cs[3], channels, table, plane_size, values.data(),
                kChannels, pooled_codes, codes_stride);
            if (planes(os)) {
              // (cell, channel) -> (channel, cell): the pooled planes.
              if constexpr (kHalf) {
                at::vec::transpose_mxn<pool_t>(
                    values.data(), kChannels, plane_values.data(), cells,
                    static_cast<int>(cells), static_cast<int>(channels));
                for (int64_t j = 0; j < channels; ++j) {
                  float_to_half(
                      plane_values.data() + j * cells, out + j * os[1], cells);
                }
              } else {
                at::vec::transpose_mxn<pool_t>(
                    values.data(), kChannels, out, os[1],
                    static_cast<int>(cells), static_cast<int>(channels));
              }
            } else {
              for (int64_t cell = 0; cell < cells; ++cell) {
                scalar_t* out_cell = out + cell / s.pooled_w * os[2] +
                    cell % s.pooled_w * os[3];
                for (int64_t j = 0; j < channels; ++j) {
                  out_cell[j * os[1]] =
                      static_cast<scalar_t>(values[cell * kChannels + j]);
                }
              }
            }
          }
          if (code != nullptr && !codes_in_place) {
            for (int64_t cell = 0; cell < cells; ++cell) {
              code_t* code_cell = code + cell / s.pooled_w * ks[2] +
                  cell % s.pooled_w * ks[3];
              for (int64_t j = 0; j < channels; ++j) {
                code_cell[j * ks[1]] = cell_codes[cell * kChannels + j];
              }
            }
          }
        }
      });
}

// A half-precision conv output (bfloat16, float16) is converted into the
// float32 buffer, and the pooled float32 values, which are conv outputs
// themselves, convert back exactly: ReLU, pooling and arg-max see the values
// native's half-precision conv2d stored, and pick as native's max_pool2d does.
template <typename scalar_t, typename code_t>
void epilogue_typed(const Conv2dReluMaxPool2dEpilogueArgs& a) {
  constexpr bool kHalf = is_half_precision_v<scalar_t>;
  using pool_t = std::conditional_t<kHalf, float, scalar_t>;
  const auto& s = a.shape;
  const int64_t plane_size = s.conv_h * s.conv_w;
  const int64_t pooled_size = s.pooled_h * s.pooled_w;
  const scalar_t* conv = a.conv.const_data_ptr<scalar_t>();
  scalar_t* output = a.output.mutable_data_ptr<scalar_t>();
  code_t* codes =
      a.codes.defined() ? a.codes.mutable_data_ptr<code_t>() : nullptr;
  // By strides: the conv output and the pooled output are NCHW or
  // channels-last (native's memory format for the call).
  const auto cs = a.conv.strides();
  const auto os = a.output.strides();
  const auto ks = codes != nullptr ? a.codes.strides() : os;
  const bool conv_planes = cs[3] == 1 && cs[2] == s.conv_w;
  if (!conv_planes && cs[1] == 1 && cs[2] == s.conv_w * cs[3]) {
    epilogue_channels_last(a, conv, output, codes, cs, os, ks);
    return;
  }
  // The pooling writes the output's planes itself (rounding half-precision
  // values as it stores them) when they are NCHW; otherwise it writes a
  // buffer, copied out after.
  const bool pooled_planes =
      os[3] == 1 && os[2] == s.pooled_w && ks[3] == 1 && ks[2] == s.pooled_w;
  const PlanePooling<pool_t> pool_plane(s, a.params);
  const int64_t buffer_size = plane_size + 1 + PlanePooling<pool_t>::kSlack;
  // Other strides (those that size-1 dimensions leave between NCHW and
  // channels-last): up to kBlock neighbouring channels are gathered at once,
  // so each cache line of the conv output is read once.
  constexpr int64_t kBlock = 16;
  const int64_t block = conv_planes && pooled_planes ? 1 : kBlock;
  at::parallel_for(
      0, s.batch * s.out_channels,
      std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, plane_size)),
      [&](int64_t begin, int64_t end) {
        std::vector<pool_t> planes(block * buffer_size);
        for (int64_t j = 0; j < block; ++j) {
          planes[j * buffer_size + plane_size] =
              -std::numeric_limits<pool_t>::infinity();
        }
        std::vector<pool_t> pooled(pooled_planes ? 0 : block * pooled_size);
        std::vector<code_t> pooled_codes(
            pooled_planes ? 0 : block * pooled_size);
        for (int64_t index = begin; index < end;) {
          const int64_t n = index / s.out_channels;
          const int64_t c0 = index % s.out_channels;
          const int64_t channels =
              std::min({block, s.out_channels - c0, end - index});
          const scalar_t* source = conv + n * cs[0] + c0 * cs[1];
          if (conv_planes) {
            for (int64_t j = 0; j < channels; ++j) {
              if constexpr (kHalf) {
                half_to_float(
                    source + j * cs[1], planes.data() + j * buffer_size,
                    plane_size);
              } else {
                std::memcpy(
                    planes.data() + j * buffer_size, source + j * cs[1],
                    plane_size * sizeof(scalar_t));
              }
            }
          } else {
            for (int64_t h = 0; h < s.conv_h; ++h) {
              for (int64_t w = 0; w < s.conv_w; ++w) {
                const scalar_t* pixel = source + h * cs[2] + w * cs[3];
                pool_t* target = planes.data() + h * s.conv_w + w;
                for (int64_t j = 0; j < channels; ++j) {
                  target[j * buffer_size] =
                      static_cast<pool_t>(pixel[j * cs[1]]);
                }
              }
            }
          }
          scalar_t* out = output + n * os[0] + c0 * os[1];
          code_t* code =
              codes != nullptr ? codes + n * ks[0] + c0 * ks[1] : nullptr;
          for (int64_t j = 0; j < channels; ++j) {
            const pool_t* plane = planes.data() + j * buffer_size;
            code_t* plane_code = nullptr;
            if (code != nullptr) {
              plane_code = pooled_planes
                               ? code + j * ks[1]
                               : pooled_codes.data() + j * pooled_size;
            }
            if (pooled_planes) {
              pool_plane(plane, out + j * os[1], plane_code);
            } else {
              pool_plane(plane, pooled.data() + j * pooled_size, plane_code);
            }
          }
          if (!pooled_planes) {
            for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
              for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
                const int64_t cell = ph * s.pooled_w + pw;
                scalar_t* out_cell = out + ph * os[2] + pw * os[3];
                for (int64_t j = 0; j < channels; ++j) {
                  out_cell[j * os[1]] =
                      static_cast<scalar_t>(pooled[j * pooled_size + cell]);
                }
                if (code != nullptr) {
                  code_t* code_cell = code + ph * ks[2] + pw * ks[3];
                  for (int64_t j = 0; j < channels; ++j) {
                    code_cell[j * ks[1]] = pooled_codes[j * pooled_size + cell];
                  }
                }
              }
            }
          }
          index += channels;
        }
      });
}

void conv2d_relu_max_pool2d_epilogue_kernel(
    const Conv2dReluMaxPool2dEpilogueArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, args.conv.scalar_type(),
      "conv2d_relu_max_pool2d_epilogue_cpu", [&] {
        ops::dispatch_code_type(
            ops::argmax_code_dtype(args.params),
            [&](auto code) { epilogue_typed<scalar_t, decltype(code)>(args); });
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(
    conv2d_relu_max_pool2d_epilogue_stub,
    &conv2d_relu_max_pool2d_epilogue_kernel);

}  // namespace ptfast::cpu
