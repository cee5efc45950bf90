// Max-pooling of the conv planes the CPU forward of the fused
// conv2d -> ReLU -> max_pool2d operator computes, with the arg-max codes its
// backward reads. Included by conv2d_relu_max_pool2d_forward_isa.cpp only,
// so compiled once per instruction set.
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/cpu/isa/half_precision.h"
#include "ops/geometry.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

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

// Max-pooling follows max_pool2d: the first maximum of a window (in row-major
// tap order) wins, a NaN wins and the last NaN is kept. ReLU is applied to
// the maximum: relu(max(x)) == max(relu(x)), and the arg-max of x is the
// arg-max of relu(x) whenever that maximum is positive or NaN; otherwise no
// gradient flows through the window (code kNoGradient).
//
// Two ways to pool a plane, chosen once per call (PlanePooling, at the end):
// a row of windows at a time through lane permutes (PoolRowTable) where
// they apply, otherwise by gathers (PoolTable).

// Gathers: a vector of pooled outputs at a time, whatever the plane's width,
// each window tap gathered through an index table built once per call: no
// per-row work, and padding, ceil_mode and overlapping windows need no
// special case. Taps outside the conv plane (and the lanes past the last
// pooled output) read a -inf sentinel stored after the plane.
template <typename scalar_t>
struct PoolTable {
  using index_t = at::vec::int_same_size_t<scalar_t>;
  int64_t cells;         // pooled outputs of a plane
  int64_t padded_cells;  // rounded up to whole vectors
  int64_t taps;          // window size; tap t has arg-max code t + 1
  std::vector<index_t> index;  // (taps, padded_cells): conv-plane index

  PoolTable(
      const ops::Conv2dReluMaxPool2dShape& s,
      const ops::Conv2dReluMaxPool2dParams& p) {
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
// store, AVX2 by two packs (one 8-byte store for a whole vector); elsewhere
// the lanes go through memory.
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
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<int_t, int32_t> &&
                std::is_same_v<code_t, uint8_t>) {
    const __m256i lanes = values;
    const __m128i words = _mm_packus_epi32(
        _mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
    const __m128i bytes = _mm_packus_epi16(words, words);
    if (count == at::vec::Vectorized<int_t>::size()) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes), bytes);
      return;
    }
    uint8_t narrowed[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(narrowed), bytes);
    std::copy(narrowed, narrowed + count, codes);
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
    with_nan =
        with_nan | compare<Predicate::kUnordered>(values[i], values[i + 1]);
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

// Writes one vector of pooled outputs (`count` lanes; rounded to out_t, a
// half-precision output's type, where that differs from scalar_t) and, when
// `codes` is not null, their arg-max codes. `best` is the windows' maximum
// (NaN wins) over the `taps` window taps; value(t) gives tap t's values
// again. Without a NaN, the first tap equal to the maximum is where
// max_pool2d's scan stops; lanes holding a NaN take the scan itself.
template <typename scalar_t, typename code_t, typename out_t, typename TapValue>
C10_ALWAYS_INLINE void store_pooled(
    const at::vec::Vectorized<scalar_t>& best, int64_t taps,
    const TapValue& value, out_t* output, code_t* codes, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using CodeVec = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
  const Vec zero(0);
  const auto blocked = compare<Predicate::kLessEqual>(best, zero);
  const Vec pooled = keep_lanes(blocked, zero, best);
  if constexpr (std::is_same_v<out_t, scalar_t>) {
    pooled.store(output, count);
  } else {
    store_as_half(pooled, output, count);
  }
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
template <int kKeptTaps, typename scalar_t, typename out_t, typename code_t>
void pool_plane_by_gathers(
    const scalar_t* plane, const PoolTable<scalar_t>& table,
    out_t* output, code_t* codes) {
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

// Rows: where select_lanes exists, a pooled row is cut into chunks of
// size() windows; window tap (dy, dx) of a chunk reads one conv row, and the
// chunk's columns of that row span at most 2 * size() values, so two vector
// loads and one lane permute give the tap for the whole chunk (a gather
// costs a load per lane). Block 1's 2x2 windows over 24-wide conv rows are
// the case this is for.
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
  // were faster (block 2's 4-wide rows on AVX-512: 375 vs 440 us at batch
  // 64; on AVX2 they fill half a vector and both ways measured the same).
  static std::optional<PoolRowTable> build(
      const ops::Conv2dReluMaxPool2dShape& s,
      const ops::Conv2dReluMaxPool2dParams& p) {
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
template <
    int kKernel, bool kPaddedColumns, typename scalar_t, typename out_t,
    typename code_t>
void pool_plane_by_rows(
    const scalar_t* plane, const PoolRowTable<scalar_t>& table,
    out_t* output, code_t* codes) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using IndexVec =
      at::vec::Vectorized<typename PoolRowTable<scalar_t>::index_t>;
  constexpr int64_t kLanes = Vec::size();
  const Vec minus_infinity(-std::numeric_limits<scalar_t>::infinity());
  constexpr int kTaps = kKernel * kKernel;
  // Chunk by chunk, so that a chunk's permute indices and padding masks are
  // loaded once for all its pooled rows.
  for (int64_t chunk = 0; chunk < table.chunks; ++chunk) {
    IndexVec columns[kKernel];
    uint32_t inside[kKernel];
    for (int dx = 0; dx < kKernel; ++dx) {
      const int64_t lanes_at = dx * table.chunks + chunk;
      columns[dx] =
          IndexVec::loadu(table.lane_column.data() + lanes_at * kLanes);
      inside[dx] = table.lane_inside[lanes_at];
    }
    const scalar_t* chunk_plane = plane + table.chunk_begin[chunk];
    const int64_t count =
        std::min<int64_t>(kLanes, table.pooled_w - chunk * kLanes);
    for (int64_t ph = 0; ph < table.pooled_h; ++ph) {
      Vec kept[kTaps];
      for (int dy = 0; dy < kKernel; ++dy) {
        const int64_t row = table.row_offset[dy * table.pooled_h + ph];
        Vec low = minus_infinity;
        Vec high = minus_infinity;
        if (row >= 0) {
          low = Vec::loadu(chunk_plane + row);
          high = Vec::loadu(chunk_plane + row + kLanes);
        }
        for (int dx = 0; dx < kKernel; ++dx) {
          Vec v = select_lanes(low, columns[dx], high);
          if constexpr (kPaddedColumns) {
            v = keep_lanes(lanes_of<scalar_t>(inside[dx]), v, minus_infinity);
          }
          kept[dy * kKernel + dx] = v;
        }
      }
      const Vec best = maximum_of<kTaps>(kept);
      const int64_t pooled = ph * table.pooled_w + chunk * kLanes;
      store_pooled(
          best, kTaps, [&](int64_t t) { return kept[t]; }, output + pooled,
          codes != nullptr ? codes + pooled : nullptr, count);
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

  PlanePooling(
      const ops::Conv2dReluMaxPool2dShape& s,
      const ops::Conv2dReluMaxPool2dParams& p) {
    if constexpr (kHasSelectLanes<scalar_t>) {
      rows = PoolRowTable<scalar_t>::build(s, p);
      if (rows) {
        return;
      }
    }
    gathers.emplace(s, p);
  }

  // Pools one conv plane (followed by the -inf sentinel that gathers read
  // for taps outside it) into `output` (of scalar_t, or of the half type
  // the values are rounded to), and the arg-max codes into `codes` unless it
  // is null.
  template <typename out_t, typename code_t>
  void operator()(const scalar_t* plane, out_t* output, code_t* codes)
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

}  // namespace
}  // namespace ptfast::cpu
