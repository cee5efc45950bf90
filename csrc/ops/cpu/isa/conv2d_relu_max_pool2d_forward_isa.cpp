// Vectorised CPU forward of the fused conv2d -> ReLU -> max_pool2d operator.
// Compiled once per instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// One task per (image, block of output channels). The task computes those
// channels' conv planes in a thread-local buffer (never in a tensor), then
// max-pools them, writing the pooled value and the arg-max code of each
// window.
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/geometry.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

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
      const ops::ConvPoolShape& s, const ops::ConvPoolParams& p,
      int64_t channels)
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

// kVectors neighbouring vectors of conv outputs (`count` lanes in the last
// one) of kBlock output channels, starting at `source_offset` in the staged
// columns, stored at `dst` (channel j at dst + j * plane_stride). Each
// input vector loaded feeds kBlock multiply-adds and each broadcast weight
// kVectors. A function with plain parameters rather than a lambda: GCC
// reloaded a lambda's captures around every store.
template <int kBlock, int kVectors, typename scalar_t>
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
      if (v + 1 < kVectors || count == Vec::size()) {
        acc[v][j].store(at);
      } else {
        acc[v][j].store(at, count);
      }
    }
  }
}

// Computes kBlock conv planes (output channels oc0 .. oc0 + kBlock - 1 of a
// group) over one segment.
template <int kBlock, typename scalar_t>
void conv_segment(
    const ConvBlockInputs<scalar_t>& in, scalar_t* planes,
    int64_t plane_stride, const Segment& segment) {
  using Vec = at::vec::Vectorized<scalar_t>;
  scalar_t* dst = planes + segment.plane_offset;
  int64_t i = 0;
  if constexpr (2 * kBlock <= kPairedAccumulators<scalar_t>) {
    for (; i + 2 * Vec::size() <= segment.length; i += 2 * Vec::size()) {
      conv_vectors<kBlock, 2>(
          in, segment.source_offset + i, dst + i, plane_stride, Vec::size());
    }
  }
  for (; i < segment.length; i += Vec::size()) {
    conv_vectors<kBlock, 1>(
        in, segment.source_offset + i, dst + i, plane_stride,
        std::min<int64_t>(Vec::size(), segment.length - i));
  }
}

// Computes `block` consecutive conv planes of one group.
template <typename scalar_t>
void conv_planes(
    scalar_t* planes, const scalar_t* source, const scalar_t* weight,
    const scalar_t* bias, int64_t block, int64_t channels,
    const std::vector<int64_t>& tap_offsets, const StagedLayout& layout,
    const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  const ConvBlockInputs<scalar_t> in{
      source, layout.channel_size, channels, weight, channels * taps,
      bias, tap_offsets.data(), taps};
  auto run = [&](const Segment& segment) {
    auto call = [&](auto block_size) {
      conv_segment<decltype(block_size)::value>(
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

// Max-pooling follows max_pool2d: the first maximum of a window (in row-major
// tap order) wins, a NaN wins and the last NaN is kept. ReLU is applied to
// the maximum: relu(max(x)) == max(relu(x)), and the arg-max of x is the
// arg-max of relu(x) whenever that maximum is positive or NaN; otherwise no
// gradient flows through the window (code kNoGradient).
//
// A plane is pooled a vector of pooled outputs at a time, whatever the
// plane's width, by gathering each window tap through an index table built
// once per call: no per-row work, and padding, ceil_mode and overlapping
// windows need no special case. Taps outside the conv plane (and the lanes
// past the last pooled output) read a -inf sentinel stored after the plane.
template <typename scalar_t>
struct PoolTable {
  using index_t = at::vec::int_same_size_t<scalar_t>;
  int64_t cells;         // pooled outputs of a plane
  int64_t padded_cells;  // rounded up to whole vectors
  int64_t taps;          // window size; tap t has arg-max code t + 1
  std::vector<index_t> index;  // (taps, padded_cells): conv-plane index

  PoolTable(const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const int64_t sentinel = s.conv_h * s.conv_w;
    TORCH_CHECK(
        sentinel < std::numeric_limits<index_t>::max(),
        "ptfast.conv2d_relu_max_pool2d: a conv output plane of ", sentinel,
        " values is too large for the CPU kernel");
    cells = s.pooled_h * s.pooled_w;
    padded_cells = (cells + Vec::size() - 1) / Vec::size() * Vec::size();
    taps = p.pool_kernel[0] * p.pool_kernel[1];
    index.assign(taps * padded_cells, static_cast<index_t>(sentinel));
    for (int64_t dy = 0; dy < p.pool_kernel[0]; ++dy) {
      for (int64_t dx = 0; dx < p.pool_kernel[1]; ++dx) {
        index_t* tap = index.data() +
            (geo::encode_argmax(dy, dx, p.pool_kernel[1]) - 1) * padded_cells;
        for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
          const int64_t oh = ph * p.pool_stride[0] - p.pool_padding[0] + dy;
          for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
            const int64_t ow = pw * p.pool_stride[1] - p.pool_padding[1] + dx;
            if (oh >= 0 && oh < s.conv_h && ow >= 0 && ow < s.conv_w) {
              tap[ph * s.pooled_w + pw] =
                  static_cast<index_t>(oh * s.conv_w + ow);
            }
          }
        }
      }
    }
  }
};

// codes[0, count) from the first `count` lanes of `values`, which hold codes
// (so they fit code_t). AVX-512 narrows 32-bit lanes to bytes in one masked
// store; elsewhere the lanes go through memory.
template <typename int_t, typename code_t>
C10_ALWAYS_INLINE void store_codes(
    const at::vec::Vectorized<int_t>& values, code_t* codes, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<int_t, int32_t> &&
                std::is_same_v<code_t, uint8_t>) {
    _mm512_mask_cvtepi32_storeu_epi8(
        codes, static_cast<__mmask16>((1u << count) - 1), values);
    return;
  }
#endif
  int_t lanes[at::vec::Vectorized<int_t>::size()];
  values.store(lanes);
  for (int64_t lane = 0; lane < count; ++lane) {
    codes[lane] = static_cast<code_t>(lanes[lane]);
  }
}

// Lane masks for the pooling's selects. AVX-512 keeps them in mask
// registers: at::vec's compares return vectors of all-ones lanes, which
// every blendv turns back into a mask, and for the pooling that round trip
// cost as much as the selects. Elsewhere they are at::vec's vector masks.
enum class Predicate { kEqual, kLessEqual, kUnordered };

#if defined(CPU_CAPABILITY_AVX512)
template <Predicate kPredicate>
constexpr int kAvx512Predicate = kPredicate == Predicate::kEqual ? _CMP_EQ_OQ
    : kPredicate == Predicate::kLessEqual                       ? _CMP_LE_OQ
                                                                : _CMP_UNORD_Q;

template <Predicate kPredicate>
C10_ALWAYS_INLINE __mmask16 compare(
    const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
  return _mm512_cmp_ps_mask(a, b, kAvx512Predicate<kPredicate>);
}
template <Predicate kPredicate>
C10_ALWAYS_INLINE __mmask8 compare(
    const at::vec::Vectorized<double>& a,
    const at::vec::Vectorized<double>& b) {
  return _mm512_cmp_pd_mask(a, b, kAvx512Predicate<kPredicate>);
}

template <typename Mask>
C10_ALWAYS_INLINE bool any_lane(Mask mask) {
  return mask != 0;
}

// The mask of the lanes whose bit is set in `bits`.
template <typename scalar_t>
C10_ALWAYS_INLINE auto lanes_of(uint32_t bits) {
  using Mask = std::conditional_t<std::is_same_v<scalar_t, float>, __mmask16,
                                  __mmask8>;
  return static_cast<Mask>(bits);
}

// The lanes of `values` set in `mask`, `fallback` elsewhere.
C10_ALWAYS_INLINE at::vec::Vectorized<float> keep_lanes(
    __mmask16 mask, const at::vec::Vectorized<float>& values,
    const at::vec::Vectorized<float>& fallback) {
  return _mm512_mask_blend_ps(mask, fallback, values);
}
C10_ALWAYS_INLINE at::vec::Vectorized<double> keep_lanes(
    __mmask8 mask, const at::vec::Vectorized<double>& values,
    const at::vec::Vectorized<double>& fallback) {
  return _mm512_mask_blend_pd(mask, fallback, values);
}

// `codes` with the lanes set in `mask` replaced by `code`.
C10_ALWAYS_INLINE at::vec::Vectorized<int32_t> set_lanes(
    __mmask16 mask, const at::vec::Vectorized<int32_t>& codes, int32_t code) {
  return _mm512_mask_mov_epi32(codes, mask, _mm512_set1_epi32(code));
}
C10_ALWAYS_INLINE at::vec::Vectorized<int64_t> set_lanes(
    __mmask8 mask, const at::vec::Vectorized<int64_t>& codes, int64_t code) {
  return _mm512_mask_mov_epi64(codes, mask, _mm512_set1_epi64(code));
}

C10_ALWAYS_INLINE at::vec::Vectorized<float> maximum_ignoring_nan(
    const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b) {
  return _mm512_max_ps(a, b);
}
C10_ALWAYS_INLINE at::vec::Vectorized<double> maximum_ignoring_nan(
    const at::vec::Vectorized<double>& a,
    const at::vec::Vectorized<double>& b) {
  return _mm512_max_pd(a, b);
}
#else
template <Predicate kPredicate, typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> compare(
    const at::vec::Vectorized<scalar_t>& a,
    const at::vec::Vectorized<scalar_t>& b) {
  if constexpr (kPredicate == Predicate::kEqual) {
    return a == b;
  } else if constexpr (kPredicate == Predicate::kLessEqual) {
    return a <= b;
  } else {
    return a.isnan() | b.isnan();
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE bool any_lane(const at::vec::Vectorized<scalar_t>& mask) {
  return mask.zero_mask() != (1 << at::vec::Vectorized<scalar_t>::size()) - 1;
}

template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> lanes_of(uint32_t bits) {
  using IntVec = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
  typename IntVec::value_type lane_bits[IntVec::size()];
  for (int lane = 0; lane < IntVec::size(); ++lane) {
    lane_bits[lane] = 1 << lane;
  }
  const IntVec lane_bit = IntVec::loadu(lane_bits);
  return at::vec::cast<scalar_t>(
      (IntVec(static_cast<typename IntVec::value_type>(bits)) & lane_bit) ==
      lane_bit);
}

template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> keep_lanes(
    const at::vec::Vectorized<scalar_t>& mask,
    const at::vec::Vectorized<scalar_t>& values,
    const at::vec::Vectorized<scalar_t>& fallback) {
  return at::vec::Vectorized<scalar_t>::blendv(fallback, values, mask);
}

template <typename scalar_t, typename int_t>
C10_ALWAYS_INLINE at::vec::Vectorized<int_t> set_lanes(
    const at::vec::Vectorized<scalar_t>& mask,
    const at::vec::Vectorized<int_t>& codes, int_t code) {
  static_assert(sizeof(scalar_t) == sizeof(int_t));
  return at::vec::Vectorized<int_t>::blendv(
      codes, at::vec::Vectorized<int_t>(code), at::vec::cast<int_t>(mask));
}

template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> maximum_ignoring_nan(
    const at::vec::Vectorized<scalar_t>& a,
    const at::vec::Vectorized<scalar_t>& b) {
  return at::vec::Vectorized<scalar_t>::blendv(a, b, b > a);
}
#endif

// The lanes' maximum over values[0, kCount), NaN wherever one of them is NaN,
// as a chain of at::vec::maximum gives, for one maximum per value and one
// compare per pair of values (at::vec::maximum checks every pair).
template <int kCount, typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> maximum_of(
    const at::vec::Vectorized<scalar_t>* values) {
  using Vec = at::vec::Vectorized<scalar_t>;
  static_assert(kCount >= 2);
  Vec best = values[0];
  auto with_nan = compare<Predicate::kUnordered>(values[0], values[kCount - 1]);
  for (int i = 1; i < kCount; ++i) {
    best = maximum_ignoring_nan(best, values[i]);
  }
  for (int i = 1; i + 1 < kCount; i += 2) {
    with_nan = with_nan | compare<Predicate::kUnordered>(values[i], values[i + 1]);
  }
  return keep_lanes(
      with_nan, Vec(std::numeric_limits<scalar_t>::quiet_NaN()), best);
}

// Lanes of the 2 * size() lanes of (low, high), chosen by `index`: one
// vpermt2ps / vpermt2pd on AVX-512; on AVX2 (float only) two vpermps and a
// blend on the index's bit 3. kHasSelectLanes says where it exists.
template <typename scalar_t>
constexpr bool kHasSelectLanes =
#if defined(CPU_CAPABILITY_AVX512)
    true;
#elif defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<scalar_t, float>;
#else
    false;
#endif

#if defined(CPU_CAPABILITY_AVX512)
C10_ALWAYS_INLINE at::vec::Vectorized<float> select_lanes(
    const at::vec::Vectorized<float>& low,
    const at::vec::Vectorized<int32_t>& index,
    const at::vec::Vectorized<float>& high) {
  return _mm512_permutex2var_ps(low, index, high);
}
C10_ALWAYS_INLINE at::vec::Vectorized<double> select_lanes(
    const at::vec::Vectorized<double>& low,
    const at::vec::Vectorized<int64_t>& index,
    const at::vec::Vectorized<double>& high) {
  return _mm512_permutex2var_pd(low, index, high);
}
#elif defined(CPU_CAPABILITY_AVX2)
C10_ALWAYS_INLINE at::vec::Vectorized<float> select_lanes(
    const at::vec::Vectorized<float>& low,
    const at::vec::Vectorized<int32_t>& index,
    const at::vec::Vectorized<float>& high) {
  const __m256i lane = index;
  return _mm256_blendv_ps(
      _mm256_permutevar8x32_ps(low, lane), _mm256_permutevar8x32_ps(high, lane),
      _mm256_castsi256_ps(_mm256_slli_epi32(lane, 28)));
}
#endif

// max_pool2d's own scan over the `taps` window taps (value(t) gives tap t):
// a larger value or a NaN takes over, so the last NaN wins. The code of
// the tap where each lane's scan ended, as scalar_t.
template <typename scalar_t, typename TapValue>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> scanned_codes(
    int64_t taps, const TapValue& value) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec code(geo::kNoGradient);
  Vec scan_best(-std::numeric_limits<scalar_t>::infinity());
  for (int64_t t = 0; t < taps; ++t) {
    const Vec v = value(t);
    const Vec take = (v > scan_best) | v.isnan();
    scan_best = Vec::blendv(scan_best, v, take);
    code = Vec::blendv(code, Vec(static_cast<scalar_t>(t + 1)), take);
  }
  return code;
}

// Writes one vector of pooled outputs (`count` lanes) and, when `codes` is
// not null, their arg-max codes. `best` is the windows' maximum (NaN wins)
// over the `taps` window taps; value(t) gives tap t's values again. Without
// a NaN, the first tap equal to the maximum is where max_pool2d's scan
// stops; lanes holding a NaN take the scan itself.
template <typename scalar_t, typename code_t, typename TapValue>
C10_ALWAYS_INLINE void store_pooled(
    const at::vec::Vectorized<scalar_t>& best, int64_t taps,
    const TapValue& value, scalar_t* output, code_t* codes, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using CodeVec = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
  const Vec zero(0);
  const auto blocked = compare<Predicate::kLessEqual>(best, zero);
  keep_lanes(blocked, zero, best).store(output, count);
  if (codes == nullptr) {
    return;
  }
  CodeVec code(geo::kNoGradient);
  if (!any_lane(compare<Predicate::kUnordered>(best, best))) {
    for (int64_t t = taps - 1; t >= 0; --t) {
      code = set_lanes(
          compare<Predicate::kEqual>(value(t), best), code,
          static_cast<typename CodeVec::value_type>(t + 1));
    }
  } else {
    code = at::vec::convert_to_int_of_same_size(
        scanned_codes<scalar_t>(taps, value));
  }
  store_codes(
      set_lanes(
          blocked, code,
          static_cast<typename CodeVec::value_type>(geo::kNoGradient)),
      codes, count);
}

// Pools one conv plane (followed by its -inf sentinel) through the gather
// table. With kKeptTaps > 0 the window has at most that many taps, held in
// registers between the maximum and the codes; with 0, any window, gathered
// again for the codes.
template <int kKeptTaps, typename scalar_t, typename code_t>
void pool_plane_by_gathers(
    const scalar_t* plane, const PoolTable<scalar_t>& table,
    scalar_t* output, code_t* codes) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using IndexVec = at::vec::Vectorized<typename PoolTable<scalar_t>::index_t>;
  static_assert(Vec::size() == IndexVec::size());
  for (int64_t cell = 0; cell < table.cells; cell += Vec::size()) {
    const auto tap = [&](int64_t t) {
      return at::vec::gather<sizeof(scalar_t)>(
          plane,
          IndexVec::loadu(table.index.data() + t * table.padded_cells + cell));
    };
    Vec best(-std::numeric_limits<scalar_t>::infinity());
    if constexpr (kKeptTaps > 0) {
      Vec kept[kKeptTaps];
#pragma GCC unroll 9
      for (int t = 0; t < kKeptTaps; ++t) {
        if (t < table.taps) {
          kept[t] = tap(t);
          best = at::vec::maximum(best, kept[t]);
        }
      }
      store_pooled(
          best, table.taps, [&](int64_t t) { return kept[t]; },
          output + cell, codes != nullptr ? codes + cell : nullptr,
          std::min<int64_t>(Vec::size(), table.cells - cell));
    } else {
      for (int64_t t = 0; t < table.taps; ++t) {
        best = at::vec::maximum(best, tap(t));
      }
      store_pooled(
          best, table.taps, tap, output + cell,
          codes != nullptr ? codes + cell : nullptr,
          std::min<int64_t>(Vec::size(), table.cells - cell));
    }
  }
}

// Pooling a row of windows at a time, where select_lanes exists: a pooled row is cut into
// chunks of size() windows; window tap (dy, dx) of a chunk reads one conv
// row, and the chunk's columns of that row span at most 2 * size() values,
// so two vector loads and one lane permute give the tap for the whole chunk
// (a gather costs a load per lane). Block 1's 2x2 windows over 24-wide conv
// rows are the case this is for.
template <typename scalar_t>
struct PoolRowTable {
  using Vec = at::vec::Vectorized<scalar_t>;
  using index_t = at::vec::int_same_size_t<scalar_t>;
  int64_t kernel;  // windows are kernel x kernel
  int64_t chunks;  // chunks per pooled row
  int64_t pooled_h, pooled_w;
  std::vector<int64_t> chunk_begin;  // (chunks): first conv column loaded
  // (kernel, chunks, size()): column - chunk_begin read by each window
  std::vector<index_t> lane_column;
  // (kernel, chunks): lanes whose column lies in the conv row (the others
  // are pool padding and read -inf). Lanes past the pooled row are not
  // stored and read any column of the row.
  std::vector<uint32_t> lane_inside;
  bool padded_columns;  // some stored lane reads pool padding
  // (kernel, pooled_h): offset of the conv row a window row reads, or -1
  // for pool padding.
  std::vector<int64_t> row_offset;

  // Nothing unless windows are 2x2 or 3x3 (the kernels compiled for rows),
  // each chunk spans at most 2 * size() columns and a pooled row fills at
  // least half a vector: below that, gathers of whole vectors of windows
  // were faster (block 2's 4-wide rows: 375 vs 440 us at batch 64).
  static std::optional<PoolRowTable> build(
      const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
    constexpr int64_t lanes = Vec::size();
    PoolRowTable table;
    table.kernel = p.pool_kernel[0];
    table.pooled_h = s.pooled_h;
    table.pooled_w = s.pooled_w;
    if (p.pool_kernel[1] != table.kernel ||
        (table.kernel != 2 && table.kernel != 3) || 2 * s.pooled_w < lanes) {
      return std::nullopt;
    }
    table.chunks = (s.pooled_w + lanes - 1) / lanes;
    table.padded_columns = false;
    table.lane_column.assign(table.kernel * table.chunks * lanes, 0);
    table.lane_inside.assign(table.kernel * table.chunks, 0);
    for (int64_t chunk = 0; chunk < table.chunks; ++chunk) {
      const int64_t begin = std::max<int64_t>(
          0, chunk * lanes * p.pool_stride[1] - p.pool_padding[1]);
      table.chunk_begin.push_back(begin);
      for (int64_t dx = 0; dx < table.kernel; ++dx) {
        for (int64_t lane = 0; lane < lanes; ++lane) {
          const int64_t pw = chunk * lanes + lane;
          const int64_t ow = pw * p.pool_stride[1] - p.pool_padding[1] + dx;
          const bool stored = pw < s.pooled_w;
          const bool inside = ow >= 0 && ow < s.conv_w;
          if (stored && inside && ow - begin >= 2 * lanes) {
            return std::nullopt;
          }
          table.padded_columns |= stored && !inside;
          if (stored && inside) {
            table.lane_column[(dx * table.chunks + chunk) * lanes + lane] =
                static_cast<index_t>(ow - begin);
          }
          if (inside || !stored) {
            table.lane_inside[dx * table.chunks + chunk] |= 1u << lane;
          }
        }
      }
    }
    for (int64_t dy = 0; dy < table.kernel; ++dy) {
      for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
        const int64_t oh = ph * p.pool_stride[0] - p.pool_padding[0] + dy;
        table.row_offset.push_back(
            oh >= 0 && oh < s.conv_h ? oh * s.conv_w : -1);
      }
    }
    return table;
  }
};

// Pools one conv plane a row of windows at a time (see PoolRowTable). The
// plane buffer has 2 * size() values of slack after it.
template <int kKernel, bool kPaddedColumns, typename scalar_t, typename code_t>
void pool_plane_by_rows(
    const scalar_t* plane, const PoolRowTable<scalar_t>& table,
    scalar_t* output, code_t* codes) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using IndexVec = at::vec::Vectorized<typename PoolRowTable<scalar_t>::index_t>;
  constexpr int64_t kLanes = Vec::size();
  const Vec minus_infinity(-std::numeric_limits<scalar_t>::infinity());
  constexpr int kTaps = kKernel * kKernel;
  for (int64_t ph = 0; ph < table.pooled_h; ++ph) {
    for (int64_t chunk = 0; chunk < table.chunks; ++chunk) {
      Vec kept[kTaps];
      for (int dy = 0; dy < kKernel; ++dy) {
        const int64_t row = table.row_offset[dy * table.pooled_h + ph];
        Vec low = minus_infinity;
        Vec high = minus_infinity;
        if (row >= 0) {
          low = Vec::loadu(plane + row + table.chunk_begin[chunk]);
          high = Vec::loadu(plane + row + table.chunk_begin[chunk] + kLanes);
        }
        for (int dx = 0; dx < kKernel; ++dx) {
          const int64_t lanes_at = dx * table.chunks + chunk;
          Vec v = select_lanes(
              low, IndexVec::loadu(table.lane_column.data() + lanes_at * kLanes),
              high);
          if constexpr (kPaddedColumns) {
            v = keep_lanes(
                lanes_of<scalar_t>(table.lane_inside[lanes_at]), v,
                minus_infinity);
          }
          kept[dy * kKernel + dx] = v;
        }
      }
      const Vec best = maximum_of<kTaps>(kept);
      const int64_t pooled = ph * table.pooled_w + chunk * kLanes;
      store_pooled(
          best, kTaps, [&](int64_t t) { return kept[t]; }, output + pooled,
          codes != nullptr ? codes + pooled : nullptr,
          std::min<int64_t>(kLanes, table.pooled_w - chunk * kLanes));
    }
  }
}

// How a call pools its conv planes: by rows where PoolRowTable applies,
// otherwise by gathers.
template <typename scalar_t>
struct PlanePooling {
  // Values a conv plane buffer needs after its last plane (the row path's
  // two-vector loads).
  static constexpr int64_t kSlack = 2 * at::vec::Vectorized<scalar_t>::size();

  std::optional<PoolRowTable<scalar_t>> rows;
  std::optional<PoolTable<scalar_t>> gathers;

  PlanePooling(const ops::ConvPoolShape& s, const ops::ConvPoolParams& p) {
    if constexpr (kHasSelectLanes<scalar_t>) {
      rows = PoolRowTable<scalar_t>::build(s, p);
      if (rows) {
        return;
      }
    }
    gathers.emplace(s, p);
  }

  // Pools one conv plane (followed by the -inf sentinel that gathers read
  // for taps outside it) into `output`, and the arg-max codes into `codes`
  // unless it is null.
  template <typename code_t>
  void operator()(const scalar_t* plane, scalar_t* output, code_t* codes)
      const {
    if constexpr (kHasSelectLanes<scalar_t>) {
      if (rows) {
        const auto by_rows = [&](auto kernel, auto padded_columns) {
          pool_plane_by_rows<kernel.value, padded_columns.value>(
              plane, *rows, output, codes);
        };
        using Two = std::integral_constant<int, 2>;
        using Three = std::integral_constant<int, 3>;
        if (rows->kernel == 2) {
          rows->padded_columns ? by_rows(Two{}, std::true_type{})
                               : by_rows(Two{}, std::false_type{});
        } else {
          rows->padded_columns ? by_rows(Three{}, std::true_type{})
                               : by_rows(Three{}, std::false_type{});
        }
        return;
      }
    }
    if (gathers->taps <= 4) {
      pool_plane_by_gathers<4>(plane, *gathers, output, codes);
    } else if (gathers->taps <= 9) {
      pool_plane_by_gathers<9>(plane, *gathers, output, codes);
    } else {
      pool_plane_by_gathers<0>(plane, *gathers, output, codes);
    }
  }
};

// Stages `channels` input planes as shifted columns (see StagedLayout).
// Only the values read from the input are written: the entries that come
// from the zero padding are the same for every image and stay 0 from the
// buffer's allocation.
template <typename scalar_t>
void stage_shifted_columns(
    scalar_t* staged, const scalar_t* input, int64_t channels,
    const StagedLayout& layout, const ops::ConvPoolShape& s,
    const ops::ConvPoolParams& p) {
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
      const scalar_t* src =
          input + c * s.in_h * s.in_w + first + ow_begin * p.stride[1];
      if (p.stride[1] != 1) {
        for (int64_t ih = 0; ih < s.in_h; ++ih) {
          for (int64_t j = 0; j < width; ++j) {
            dst[ih * s.conv_w + j] = src[ih * s.in_w + j * p.stride[1]];
          }
        }
      } else {
        // Rows are short (often one masked vector): inline, no memcpy call.
        const int64_t full = width - width % Vec::size();
        for (int64_t ih = 0; ih < s.in_h; ++ih) {
          const scalar_t* in = src + ih * s.in_w;
          scalar_t* out = dst + ih * s.conv_w;
          for (int64_t j = 0; j < full; j += Vec::size()) {
            Vec::loadu(in + j).store(out + j);
          }
          if (full < width) {
            Vec::loadu(in + full, width - full).store(out + full, width - full);
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename code_t>
void forward_typed(const ConvPoolForwardArgs& a) {
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
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks;
          const int64_t group = (task % blocks) / blocks_per_group;
          const int64_t first = group * out_group +
              (task % blocks_per_group) * block_size;
          const int64_t block =
              std::min(block_size, (group + 1) * out_group - first);
          const int64_t key = n * p.groups + group;
          if (key != staged_source) {
            stage_shifted_columns(
                staged.data(),
                input +
                    (n * s.in_channels + group * in_group) * s.in_h * s.in_w,
                in_group, layout, s, p);
            staged_source = key;
          }
          conv_planes(
              planes.data(), staged.data(), weight + first * weight_size,
              bias != nullptr ? bias + first : nullptr, block, in_group,
              tap_offsets, layout, s, p);
          for (int64_t j = 0; j < block; ++j) {
            const int64_t plane_index = n * s.out_channels + first + j;
            pool_plane(
                planes.data() + j * layout.plane_stride,
                output + plane_index * pooled_size,
                codes != nullptr ? codes + plane_index * pooled_size : nullptr);
          }
        }
      });
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

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(conv_pool_forward_stub, &conv_pool_forward);

}  // namespace ptfast::cpu
