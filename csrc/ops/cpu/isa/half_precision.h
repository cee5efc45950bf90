// Half-precision storage (bfloat16, float16) around float32 kernels: the CPU
// kernels compute in float32 and convert on the way in and out, as ATen's
// own CPU kernels do for these dtypes. Included by files under
// csrc/ops/cpu/isa/ only, so compiled once per instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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

#if defined(CPU_CAPABILITY_AVX512)
// Whether the CPU converts float32 to bfloat16 in one instruction
// (AVX512-BF16: Cooper Lake and later Xeons, AMD Zen 4 and 5).
inline bool has_avx512_bf16() {
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
}

// The bfloat16 bits of 16 float32 lanes, as at::vec's conversion (torch's
// .to(torch.bfloat16)) rounds them: with VCVTNEPS2BF16 where the CPU has it,
// one instruction where at::vec's takes a dozen. That instruction flushes
// denormal inputs to zero and keeps a NaN's sign and payload, where torch
// keeps bfloat16 denormals and writes every NaN as 0xffff: vectors holding
// either take at::vec's conversion.
inline __m256i bfloat16_bits(__m512 value) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet, denormal, SNaN
  if (has_avx512_bf16() && _mm512_fpclass_ps_mask(value, kNanOrDenormal) == 0) {
    __m256i bits;
    // Inline assembly, not _mm512_cvtneps_pbh: the intrinsic needs the
    // avx512bf16 target, and GCC does not inline such a function into the
    // kernels, compiled without it, that call this once a vector.
    asm("vcvtneps2bf16 %1, %0" : "=v"(bits) : "v"(value));
    return bits;
  }
  return at::vec::cvtfp32_bf16(value);
}
#endif

// The float32 vector of data[0, count), count up to its size, zeros past it.
template <typename half_t>
at::vec::Vectorized<float> load_as_float(const half_t* data, int64_t count) {
  using FloatVec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i bits =
      count == FloatVec::size()
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data))
          : _mm256_maskz_loadu_epi16((1u << count) - 1, data);
  if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    return _mm512_cvtph_ps(bits);
  }
#else
  FloatVec value;
  if (count == FloatVec::size()) {
    at::vec::load_to_float<half_t>(data, value);
  } else {
    value = std::get<0>(at::vec::convert_to_float<half_t>(
        at::vec::Vectorized<half_t>::loadu(data, count)));
  }
  return value;
#endif
}

// `count` (at most a vector's) values of `src` as a vector of their compute
// type scalar_t: half-precision values are converted to float32.
template <typename scalar_t, typename input_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> load_as(
    const input_t* src, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, input_t>) {
    return at::vec::Vectorized<scalar_t>::loadu(src, count);
  } else {
    return load_as_float(src, count);
  }
}

// dst[0, count) = value's first `count` lanes rounded to half_t (ties to
// even), bit for bit as torch's .to(dtype) converts them.
template <typename half_t>
void store_as_half(
    const at::vec::Vectorized<float>& value, half_t* dst, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  __m256i bits;
  if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
    bits = bfloat16_bits(value);
  } else {
    bits =
        _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  if (count == at::vec::Vectorized<float>::size()) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bits);
  } else {
    _mm256_mask_storeu_epi16(dst, (1u << count) - 1, bits);
  }
#else
  at::vec::convert_from_float<half_t>(value, value).store(dst, count);
#endif
}

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
  // The rest (every value of a short array) a float32 vector at a time.
  for (; i < n; i += FloatVec::size()) {
    const int64_t count = std::min<int64_t>(FloatVec::size(), n - i);
    load_as_float(src + i, count).store(dst + i, count);
  }
}

// dst[0, n) = src[0, n) rounded to the nearest half_t (ties to even).
template <typename half_t>
void float_to_half(const float* src, half_t* dst, int64_t n) {
  using HalfVec = at::vec::Vectorized<half_t>;
  using FloatVec = at::vec::Vectorized<float>;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // A float32 vector at a time, for store_as_half's one-instruction
  // bfloat16 conversion.
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    store_as_half(FloatVec::loadu(src + i), dst + i, FloatVec::size());
  }
#endif
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
// ATen's conversions (VCVTPS2PH where the CPU has it). The AVX-512 and AVX2
// bodies are the same arithmetic written twice in intrinsics: through
// at::vec's integer vectors (a variable shift, NaN lanes as a vector mask
// converted back for the blend) MNIST block 1 in bfloat16 lost 10% in this
// conv-loop epilogue.
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
