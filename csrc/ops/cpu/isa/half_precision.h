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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

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

// `sums` rounded to the nearest half_t value (ties to even), kept in float32:
// what storing them in half_t and reading them back gives, in registers.
// bfloat16 by integer arithmetic on the bits (exact for denormals, which
// VCVTNEPS2BF16 would flush to zero), NaN kept as it is; float16 through
// ATen's conversions (VCVTPS2PH where the CPU has it).
template <typename half_t>
C10_ALWAYS_INLINE at::vec::Vectorized<float> rounded_to_half(
    const at::vec::Vectorized<float>& sums) {
  if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 value = sums;
    const __m512i bits = _mm512_castps_si512(value);
    const __m512i lowest_kept_bit =
        _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_and_si512(
        _mm512_add_epi32(
            bits, _mm512_add_epi32(lowest_kept_bit, _mm512_set1_epi32(0x7FFF))),
        _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
    return _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q),
        _mm512_castsi512_ps(rounded), value);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 value = sums;
    const __m256i bits = _mm256_castps_si256(value);
    const __m256i lowest_kept_bit =
        _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_and_si256(
        _mm256_add_epi32(
            bits, _mm256_add_epi32(lowest_kept_bit, _mm256_set1_epi32(0x7FFF))),
        _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
    return _mm256_blendv_ps(
        _mm256_castsi256_ps(rounded), value,
        _mm256_cmp_ps(value, value, _CMP_UNORD_Q));
#endif
  }
  return std::get<0>(at::vec::convert_to_float<half_t>(
      at::vec::convert_from_float<half_t>(sums, sums)));
}

}  // namespace
}  // namespace ptfast::cpu
