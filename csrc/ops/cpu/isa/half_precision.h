// Half-precision storage (bfloat16, float16) around float32 kernels: the CPU
// kernels compute in float32 and convert on the way in and out, as ATen's
// own CPU kernels do for these dtypes. Included by files under
// csrc/ops/cpu/isa/ only, so compiled once per instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace ptfast::cpu {
namespace {

template <typename scalar_t>
constexpr bool is_half_precision_v = std::is_same_v<scalar_t, c10::BFloat16> ||
                                     std::is_same_v<scalar_t, c10::Half>;

// dst[0, n) = float(src[0, n)).
template <typename half_t>
void half_to_float(const half_t* src, float* dst, int64_t n) {
  using HalfVec = at::vec::Vectorized<half_t>;
  using FloatVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
    const auto [low, high] =
        at::vec::convert_to_float<half_t>(HalfVec::loadu(src + i));
    low.store(dst + i);
    high.store(dst + i + FloatVec::size());
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// dst[0, n) = src[0, n) rounded to the nearest half_t (ties to even).
template <typename half_t>
void float_to_half(const float* src, half_t* dst, int64_t n) {
  using HalfVec = at::vec::Vectorized<half_t>;
  using FloatVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
    at::vec::convert_from_float<half_t>(
        FloatVec::loadu(src + i), FloatVec::loadu(src + i + FloatVec::size()))
        .store(dst + i);
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<half_t>(src[i]);
  }
}

// Rounds data[0, n) in place to the nearest half_t value, kept in float32:
// what storing a float32 result in half_t and reading it back gives.
template <typename half_t>
void round_to_half(float* data, int64_t n) {
  using HalfVec = at::vec::Vectorized<half_t>;
  using FloatVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
    const auto [low, high] =
        at::vec::convert_to_float<half_t>(at::vec::convert_from_float<half_t>(
            FloatVec::loadu(data + i),
            FloatVec::loadu(data + i + FloatVec::size())));
    low.store(data + i);
    high.store(data + i + FloatVec::size());
  }
  for (; i < n; ++i) {
    data[i] = static_cast<float>(static_cast<half_t>(data[i]));
  }
}

}  // namespace
}  // namespace ptfast::cpu
