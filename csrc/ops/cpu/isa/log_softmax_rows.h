// Serial CPU kernels of log_softmax and its backward over contiguous rows,
// the reduced dim being the last: along each row for long rows, across a
// block of rows (one row per vector lane) for short ones. Included by
// log_softmax_isa.cpp only, so compiled once per instruction set; its callers
// split the rows between threads, or bring another dim last first.
//
//   forward   y = (x - max) - log(sum(exp(x - max)))
//   backward  dx = dy - exp(y) * sum(dy)
//
// Long rows are bound by memory beyond the caches: the forward's sum pass
// prefetches the next row and the lines the output goes to, and rows too
// long for that to fit L2 take their maximum and sum in one read.
//
// The long-row forward and the backward also take bfloat16 and float16
// rows, computed in float32 vectors converted on load and store: one read
// of the half-precision tensors per pass, no float32 copy.
#pragma once

#include "ops/cpu/isa/half_precision.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace ptfast::cpu {
namespace {

// The vectors the kernels compute in for elements of scalar_t: float32 for
// half precision.
template <typename scalar_t>
using ComputeVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;

// data[0, count) for count up to the vector's size, zeros past it.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> load(const scalar_t* data, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return count == Vec::size() ? Vec::loadu(data) : Vec::loadu(data, count);
}

// Half precision: in float32. Overloads (this, store's and write_row's)
// rather than branches in the float32/float64 templates, which stay as they
// were: routing their loads and stores through shared wrappers moved where
// GCC contracts a multiply and a subtraction into an FMA, and float64
// gradients by an ulp.
template <typename half_t>
  requires is_half_precision_v<half_t>
at::vec::Vectorized<float> load(const half_t* data, int64_t count) {
  return load_as_float(data, count);
}

// out[0, count) = value's first `count` lanes, count up to its size.
template <typename scalar_t>
void store(
    const at::vec::Vectorized<scalar_t>& value, scalar_t* out, int64_t count) {
  value.store(out, count);
}

// Half precision: rounded from float32.
template <typename half_t>
  requires is_half_precision_v<half_t>
void store(
    const at::vec::Vectorized<float>& value, half_t* out, int64_t count) {
  store_as_half(value, out, count);
}

// The first `count` lanes from `data`, the others set to `fill`.
template <typename scalar_t>
ComputeVec<scalar_t> load_partial(
    const scalar_t* data, int64_t count, at::opmath_type<scalar_t> fill) {
  using Vec = ComputeVec<scalar_t>;
  return Vec::set(Vec(fill), load(data, count), count);
}

// The cache line at `address`, asked for ahead of its use: to be read (into
// L2, where it is read from twice more) or to be written.
inline void prefetch_for_read(const void* address) {
  __builtin_prefetch(address, 0, 2);
}
inline void prefetch_for_write(const void* address) {
  __builtin_prefetch(address, 1, 3);
}

// Stores `value` at `aligned`, a multiple of the vector's size, around the
// caches where the instruction set has streaming stores.
template <typename scalar_t>
void store_streaming(
    const at::vec::Vectorized<scalar_t>& value, scalar_t* aligned) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(aligned, value);
    return;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm512_stream_pd(aligned, value);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(aligned, value);
    return;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    _mm256_stream_pd(aligned, value);
    return;
  }
#endif
  value.store(aligned);
}

// Orders this thread's streaming stores before whatever it does next (the
// end of a parallel task), as they bypass the usual store ordering.
inline void finish_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Writes out[0, length) from value(i, count), the vector of elements
// [i, i + count). With `streaming`, the vectors aligned in `out` are streamed
// and the unaligned ends stored normally.
template <typename scalar_t, typename Value>
void write_row(
    scalar_t* out, int64_t length, bool streaming, const Value& value) {
  using Vec = at::vec::Vectorized<scalar_t>;
  int64_t i = 0;
  if (streaming) {
    const int64_t misaligned = static_cast<int64_t>(
        reinterpret_cast<uintptr_t>(out) % sizeof(Vec) / sizeof(scalar_t));
    i = std::min(length, misaligned == 0 ? 0 : Vec::size() - misaligned);
    if (i > 0) {
      value(0, i).store(out, i);
    }
    for (; i + Vec::size() <= length; i += Vec::size()) {
      store_streaming(value(i, Vec::size()), out + i);
    }
  } else {
    for (; i + Vec::size() <= length; i += Vec::size()) {
      value(i, Vec::size()).store(out + i);
    }
  }
  if (i < length) {
    value(i, length - i).store(out + i, length - i);
  }
}

// Half precision: float32 values, rounded as they are stored; never
// streamed.
template <typename half_t, typename Value>
  requires is_half_precision_v<half_t>
void write_row(half_t* out, int64_t length, bool, const Value& value) {
  using Vec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec::size() <= length; i += Vec::size()) {
    store_as_half(value(i, Vec::size()), out + i, Vec::size());
  }
  if (i < length) {
    store_as_half(value(i, length - i), out + i, length - i);
  }
}

// e^x lane-wise. On AVX-512 float32, inlined: at::vec's exp calls Sleef out
// of line (the caller spills its vector registers around each call) and
// takes 1.6x the time. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
// Cephes' polynomial for e^r and vscalefps for 2^n: within 1.01 ulp of e^x
// over [-87.3, 0] (Sleef's u10: 0.98), checked at every 7th float. Below
// -87.33, where e^x is denormal, the result is 0 (off by at most 1.2e-38):
// the lanes are masked off, as denormal results cost microcode assists of
// ~100 cycles, and every row's masked tail holds -inf.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> exp(const at::vec::Vectorized<scalar_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Not below the normal range, or NaN (which propagates through).
    const __mmask16 normal =
        _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ);
    // min returns its second operand, x, where it is NaN.
    const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(88.75f), x);
    const __m512 n = _mm512_roundscale_ps(
        _mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), clamped);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
#endif
  return x.exp();
}

// The lane-wise maximum of a running maximum (never NaN) and `x`, where a NaN
// in `x` leaves the maximum as it was: one instruction, where the
// NaN-propagating at::vec::maximum costs three to four. The forward needs no
// NaN in its maxima: a NaN in a row makes that row's sum of exponentials,
// hence every output of the row, NaN, as native's NaN maximum does.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> max_ignoring_nan(
    const at::vec::Vectorized<scalar_t>& running,
    const at::vec::Vectorized<scalar_t>& x) {
  // clamp_min(a, b) is (a < b ? b : a) lane-wise: false where b is NaN.
  return at::vec::clamp_min(running, x);
}

// Forward rows shorter than two vectors are reduced across rows instead of
// along them: a block of Vec::size() rows is transposed in L1, one row per
// lane, so every maximum, exp and logarithm works on full vectors and no row
// pays a horizontal reduction. Along its length, a 10-element row filled 10
// of 16 lanes and paid two horizontal reductions: 4096x10 took 180 us, across
// 70 (AVX-512, one thread); 4096x20 105 and 88 us, 4096x32 (two full
// vectors) 85 and 101 us.
template <typename scalar_t>
constexpr int64_t kShortRow = 2 * at::vec::Vectorized<scalar_t>::size() - 1;

template <typename scalar_t>
void forward_rows_across(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  constexpr scalar_t kLowest = -std::numeric_limits<scalar_t>::infinity();
  // columns[j * kLanes + r]: element j of the block's row r. Lanes past a
  // last, partial block's rows keep finite values from before.
  alignas(64) scalar_t columns[kShortRow<scalar_t> * kLanes] = {};
  for (int64_t first = 0; first < rows; first += kLanes) {
    const int count = static_cast<int>(std::min(kLanes, rows - first));
    at::vec::transpose_mxn<scalar_t>(
        input + first * length, length, columns, kLanes, count, length);
    // Four independent maxima: one chain would wait on each maximum's
    // latency. The maximum does not depend on the order.
    Vec maxima[4] = {Vec(kLowest), Vec(kLowest), Vec(kLowest), Vec(kLowest)};
    for (int64_t j = 0; j < length; ++j) {
      maxima[j % 4] =
          max_ignoring_nan(maxima[j % 4], Vec::loadu(columns + j * kLanes));
    }
    const Vec max = max_ignoring_nan(
        max_ignoring_nan(maxima[0], maxima[1]),
        max_ignoring_nan(maxima[2], maxima[3]));
    Vec sum(0);
    for (int64_t j = 0; j < length; ++j) {
      sum += exp(Vec::loadu(columns + j * kLanes) - max);
    }
    const Vec log_sum = sum.log();
    for (int64_t j = 0; j < length; ++j) {
      scalar_t* column = columns + j * kLanes;
      ((Vec::loadu(column) - max) - log_sum).store(column);
    }
    at::vec::transpose_mxn<scalar_t>(
        columns, kLanes, output + first * length, length, length, count);
  }
}

// Rows whose sums share vector logarithms (as native does): short rows would
// otherwise pay a whole vector log each. A group spans at most this many
// bytes of input, so that it is still in L1 for the output pass.
constexpr int64_t kGroupBytes = 16 << 10;
constexpr int64_t kMaxGroupRows = 64;

// The forward prefetches from this many bytes of tensor on: smaller ones are
// read from L2, where the prefetch instructions only cost issue slots.
constexpr int64_t kPrefetchBytes = 4 << 20;

template <typename scalar_t>
void forward_rows_along(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length,
    bool prefetch) {
  using Vec = ComputeVec<scalar_t>;
  using compute_t = at::opmath_type<scalar_t>;
  constexpr compute_t kLowest = -std::numeric_limits<compute_t>::infinity();
  const int64_t full = length - length % Vec::size();
  const int64_t rest = length - full;
  const int64_t group = std::clamp<int64_t>(
      kGroupBytes / (length * static_cast<int64_t>(sizeof(scalar_t))), 1,
      kMaxGroupRows);
  compute_t maxima[kMaxGroupRows];
  compute_t sums[kMaxGroupRows];
  for (int64_t first = 0; first < rows; first += group) {
    const int64_t count = std::min(group, rows - first);
    // Phase by phase over the group's rows: each row's maximum, then each
    // row's sum, is independent of the next row's, so their reductions
    // overlap instead of waiting on one another.
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* x = input + (first + r) * length;
      Vec max_v(kLowest);
      for (int64_t i = 0; i < full; i += Vec::size()) {
        max_v = max_ignoring_nan(max_v, load(x + i, Vec::size()));
      }
      if (rest > 0) {
        max_v = max_ignoring_nan(max_v, load_partial(x + full, rest, kLowest));
      }
      maxima[r] = at::vec::vec_reduce_all<compute_t>(
          [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_v);
    }
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* x = input + (first + r) * length;
      // This pass computes; the memory system meanwhile fetches the next
      // row and the lines this row's output goes to.
      const Vec max(maxima[r]);
      const scalar_t* next_x = first + r + 1 < rows ? x + length : nullptr;
      scalar_t* y = output + (first + r) * length;
      Vec sum_v(0);
      for (int64_t i = 0; i < full; i += Vec::size()) {
        if (prefetch) {
          if (next_x != nullptr) {
            prefetch_for_read(next_x + i);
          }
          prefetch_for_write(y + i);
        }
        sum_v += exp(load(x + i, Vec::size()) - max);
      }
      if (rest > 0) {
        sum_v += exp(load_partial(x + full, rest, kLowest) - max);
      }
      sums[r] = at::vec::vec_reduce_all<compute_t>(
          [](Vec& a, Vec& b) { return a + b; }, sum_v);
    }
    // Native takes the logarithm of its row sums with the vectorised log
    // too; std::log can differ in the last bit.
    for (int64_t r = 0; r < count; r += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), count - r);
      load(sums + r, n).log().store(sums + r, n);
    }
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* x = input + (first + r) * length;
      const Vec max(maxima[r]);
      const Vec log_sum(sums[r]);
      write_row(
          output + (first + r) * length, length, /*streaming=*/false,
          [&](int64_t i, int64_t n) {
            return (load(x + i, n) - max) - log_sum;
          });
    }
  }
}

// Rows from this many bytes on are read from memory once for their maximum
// and sum: a row this long, the next row prefetched and the output's lines
// no longer fit a core's L2 (1-2 MiB) together, and the three-pass forward
// read 16x256000 back from memory for its output pass: 1.15x-1.24x eager
// (2 threads, Xeon), 1.74x-1.82x in one read. Rows of 128 KiB (256x32000)
// stay with the three passes, which fit: 1.8x eager, 1.6x in one read.
constexpr int64_t kLongRowBytes = 256 << 10;
// Elements of a long row whose maximum, then exponentials, are computed
// together: the chunk is read from memory once and again from L1.
constexpr int64_t kLongRowChunk = 2048;
// From this tensor size on (twice the two cores' L2), the one-read forward
// streams its output past the caches: the backward would not find it cached
// anyway, and its lines are not read in first. 2 threads, vs eager:
// 16x256000 inference 1.36x-1.45x stored, 1.74x-1.82x streamed, 8x500000
// forward+backward 0.90x and 1.20x; below it the backward reads a stored
// output from cache: 1x65536 forward+backward 1.24x stored, 0.89x streamed.
constexpr int64_t kStreamedOutputBytes = 8 << 20;

// Elements of a long row reduced on their own, then combined in order: the
// same parts whether one thread takes the whole row or, for fewer rows than
// threads, several threads share it, so the result does not depend on the
// thread count.
constexpr int64_t kLongRowPart = 1 << 16;

// The parts of a long row of `length`, and where part `part` starts and how
// long it is.
inline int64_t long_row_parts(int64_t length) {
  return (length + kLongRowPart - 1) / kLongRowPart;
}
struct LongRowPart {
  int64_t begin;
  int64_t length;
};
inline LongRowPart long_row_part(int64_t length, int64_t part) {
  const int64_t begin = part * kLongRowPart;
  return {begin, std::min(kLongRowPart, length - begin)};
}

// The maximum of part of a row (never NaN) and the sum of e^(x - max) over
// it, 0 where every element is -inf.
template <typename compute_t>
struct RowPartial {
  compute_t max;
  compute_t sum;
};

// One part of a long row in one read, chunk by chunk. Each chunk's
// exponentials are taken against the largest element so far; when a chunk
// raises it, the sum so far is rescaled by e^(old - new) (a few times per
// part, ~1 ulp each). An element of -inf adds e^-inf = 0 against any finite
// maximum, so chunks are skipped until one holds a larger element; a NaN or
// +inf element makes the sum NaN, as native's sum(exp(x - max)) does. The
// next chunk is prefetched while a chunk's exponentials are computed.
template <typename scalar_t>
RowPartial<at::opmath_type<scalar_t>> long_row_partial(
    const scalar_t* x, int64_t length) {
  using Vec = ComputeVec<scalar_t>;
  using compute_t = at::opmath_type<scalar_t>;
  constexpr compute_t kLowest = -std::numeric_limits<compute_t>::infinity();
  compute_t max = kLowest;
  Vec sum_v(0);
  for (int64_t begin = 0; begin < length; begin += kLongRowChunk) {
    const int64_t end = std::min(length, begin + kLongRowChunk);
    // The vector at i in [begin, end), -inf past the part's end.
    auto chunk_vector = [&](int64_t i) {
      return i + Vec::size() <= end ? load(x + i, Vec::size())
                                    : load_partial(x + i, end - i, kLowest);
    };
    Vec chunk_max_v(kLowest);
    for (int64_t i = begin; i < end; i += Vec::size()) {
      chunk_max_v = max_ignoring_nan(chunk_max_v, chunk_vector(i));
    }
    const compute_t chunk_max = at::vec::vec_reduce_all<compute_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, chunk_max_v);
    if (chunk_max > max) {
      if (max != kLowest) {
        sum_v = sum_v * exp(Vec(max - chunk_max));
      }
      max = chunk_max;
    }
    if (max == kLowest) {
      continue;
    }
    const Vec max_v(max);
    const int64_t ahead = std::min(length, end + kLongRowChunk) - end;
    for (int64_t i = begin; i < end; i += Vec::size()) {
      if (i - begin < ahead) {
        prefetch_for_read(x + kLongRowChunk + i);
      }
      sum_v += exp(chunk_vector(i) - max_v);
    }
  }
  return {
      max,
      max == kLowest ? compute_t(0)
                     : at::vec::vec_reduce_all<compute_t>(
                           [](Vec& a, Vec& b) { return a + b; }, sum_v)};
}

// What a row's output subtracts from its elements: y = (x - max) - log_sum.
template <typename compute_t>
struct RowOffsets {
  compute_t max;
  compute_t log_sum;
};

// A row's offsets from its parts' partials, in order. A row of -inf only
// gets a NaN sum, as native's does.
template <typename scalar_t>
RowOffsets<at::opmath_type<scalar_t>> combined_partials(
    const RowPartial<at::opmath_type<scalar_t>>* parts, int64_t count) {
  using Vec = ComputeVec<scalar_t>;
  using compute_t = at::opmath_type<scalar_t>;
  constexpr compute_t kLowest = -std::numeric_limits<compute_t>::infinity();
  compute_t max = kLowest;
  for (int64_t i = 0; i < count; ++i) {
    max = std::max(max, parts[i].max);
  }
  if (max == kLowest) {
    return {max, std::numeric_limits<compute_t>::quiet_NaN()};
  }
  // Scalars through the vector functions: the exp the parts use, and the
  // vectorised logarithm the other rows take.
  auto first_lane = [](const Vec& v) {
    compute_t lanes[Vec::size()];
    v.store(lanes);
    return lanes[0];
  };
  compute_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (parts[i].max != kLowest) {
      sum += parts[i].sum * first_lane(exp(Vec(parts[i].max - max)));
    }
  }
  return {max, first_lane(Vec(sum).log())};
}

// y[0, length) = (x - max) - log_sum, with `streaming` around the caches.
template <typename scalar_t>
void write_long_row(
    const scalar_t* x, scalar_t* y, int64_t length,
    const RowOffsets<at::opmath_type<scalar_t>>& row, bool streaming) {
  using Vec = ComputeVec<scalar_t>;
  const Vec max_v(row.max);
  const Vec log_sum(row.log_sum);
  write_row(y, length, streaming, [&](int64_t i, int64_t n) {
    return (load(x + i, n) - max_v) - log_sum;
  });
}

// The forward of rows of at least kLongRowBytes, each by one thread: the
// partials of its parts in one read, then the output pass, which reads the
// row from L2.
template <typename scalar_t>
void forward_long_rows(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length,
    bool streaming) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t parts = long_row_parts(length);
  std::vector<RowPartial<compute_t>> partials(parts);
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* x = input + row * length;
    for (int64_t part = 0; part < parts; ++part) {
      const LongRowPart extent = long_row_part(length, part);
      partials[part] = long_row_partial(x + extent.begin, extent.length);
    }
    write_long_row(
        x, output + row * length, length,
        combined_partials<scalar_t>(partials.data(), parts), streaming);
  }
  if (streaming) {
    finish_streaming_stores();
  }
}

// log_softmax of `rows` contiguous rows of `length`, part of a tensor of
// `tensor_bytes`. `output` may be `input`.
template <typename scalar_t>
void forward_rows(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length,
    int64_t tensor_bytes) {
  if (length == 1) {
    // (x - max) - log(sum) with max = x and sum = exp(0) = 1, NaN for an
    // infinite or NaN x, as native computes it; as one elementwise pass.
    write_row(output, rows, /*streaming=*/false, [&](int64_t i, int64_t n) {
      const auto x = load(input + i, n);
      return x - x;
    });
  } else if (length <= kShortRow<scalar_t>) {
    forward_rows_across(input, output, rows, length);
  } else if (length * static_cast<int64_t>(sizeof(scalar_t)) >=
             kLongRowBytes) {
    forward_long_rows(
        input, output, rows, length, tensor_bytes >= kStreamedOutputBytes);
  } else {
    forward_rows_along(
        input, output, rows, length, tensor_bytes >= kPrefetchBytes);
  }
}

// Rows per block of the short-row backward: their sums and the sums spread
// over their elements stay in L1.
constexpr int64_t kShortBackwardBlockRows = 256;

// The backward of rows shorter than a vector: each row's sum of grad_output
// by scalar adds, spread over the row's elements, then one contiguous pass
// of full vectors over the block. Along rows, each row paid a horizontal
// reduction and an exp on a mostly empty vector (float64 4096x2: 270 us).
template <typename scalar_t>
void backward_short_rows(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    int64_t rows, int64_t length) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t block_rows =
      std::min<int64_t>(kShortBackwardBlockRows, std::max<int64_t>(rows, 1));
  std::vector<compute_t> spread(block_rows * length);
  for (int64_t first = 0; first < rows; first += block_rows) {
    const int64_t count = std::min(block_rows, rows - first);
    const int64_t offset = first * length;
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* dy = grad_output + offset + r * length;
      compute_t sum = 0;
      for (int64_t j = 0; j < length; ++j) {
        sum += static_cast<compute_t>(dy[j]);
      }
      std::fill_n(spread.data() + r * length, length, sum);
    }
    write_row(
        grad_input + offset, count * length, /*streaming=*/false,
        [&](int64_t i, int64_t n) {
          return load(grad_output + offset + i, n) -
                 exp(load(output + offset + i, n)) * load(spread.data() + i, n);
        });
  }
}

// The sum of dy[0, length), length at least a vector, in one vector (in
// native's order).
template <typename scalar_t>
at::opmath_type<scalar_t> grad_sum(const scalar_t* dy, int64_t length) {
  using Vec = ComputeVec<scalar_t>;
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t full = length - length % Vec::size();
  Vec sum_v(0);
  for (int64_t i = 0; i < full; i += Vec::size()) {
    sum_v += load(dy + i, Vec::size());
  }
  if (full < length) {
    sum_v += load(dy + full, length - full);
  }
  return at::vec::vec_reduce_all<compute_t>(
      [](Vec& a, Vec& b) { return a + b; }, sum_v);
}

// Whether rows of `length` are long rows (see kLongRowBytes), whose sums
// the backward takes part by part.
template <typename scalar_t>
bool is_long_row(int64_t length) {
  return length * static_cast<int64_t>(sizeof(scalar_t)) >= kLongRowBytes;
}

// dx[0, length) = dy - exp(y) * sum, with `streaming` around the caches.
template <typename scalar_t>
void write_backward_row(
    const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t length,
    at::opmath_type<scalar_t> sum, bool streaming) {
  using Vec = ComputeVec<scalar_t>;
  const Vec sum_v(sum);
  write_row(dx, length, streaming, [&](int64_t i, int64_t count) {
    return load(dy + i, count) - exp(load(y + i, count)) * sum_v;
  });
}

// The backward of `rows` contiguous rows of `length`. `grad_input` may be
// `grad_output`. Along rows of any length: with one reduction, the
// transposes of a block cost more than they save (4096x10: 151 against
// 139 us). A long row's sum adds its parts' sums (long_row_part) in order,
// as backward_few_long_rows does when threads share the row. No software
// prefetch: the hardware prefetcher follows the three sequential streams,
// and prefetching y and dx during the sum pass evicted the lines of dy that
// the output pass reads again (4096x1000: 26 against 34 GB/s).
template <typename scalar_t>
void backward_rows(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    int64_t rows, int64_t length, bool streaming) {
  using compute_t = at::opmath_type<scalar_t>;
  if (length < ComputeVec<scalar_t>::size()) {
    backward_short_rows(grad_output, output, grad_input, rows, length);
    return;
  }
  const bool long_rows = is_long_row<scalar_t>(length);
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* dy = grad_output + row * length;
    compute_t sum = 0;
    if (long_rows) {
      for (int64_t part = 0; part < long_row_parts(length); ++part) {
        const LongRowPart extent = long_row_part(length, part);
        sum += grad_sum(dy + extent.begin, extent.length);
      }
    } else {
      sum = grad_sum(dy, length);
    }
    write_backward_row(
        dy, output + row * length, grad_input + row * length, length, sum,
        streaming);
  }
  if (streaming) {
    finish_streaming_stores();
  }
}

}  // namespace
}  // namespace ptfast::cpu
