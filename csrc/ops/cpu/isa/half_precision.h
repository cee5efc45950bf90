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
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
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

#if defined(CPU_CAPABILITY_AVX512)
// round_to_half<BFloat16> with VCVTNEPS2BF16 (round to nearest even, NaN
// kept): three instructions a vector where the generic conversion takes a
// dozen. The instruction flushes denormal inputs to zero, which a positive
// conv output must not become (ReLU would block its window): vectors that
// hold one take the generic path.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline int64_t
round_to_bfloat16_avx512_bf16(float* data, int64_t n) {
  const __m512 smallest_normal =
      _mm512_set1_ps(std::numeric_limits<float>::min());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 value = _mm512_loadu_ps(data + i);
    const __mmask16 denormal =
        _mm512_cmp_ps_mask(_mm512_abs_ps(value), smallest_normal, _CMP_LT_OQ) &
        _mm512_cmp_ps_mask(value, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    if (denormal != 0) {
      for (int64_t j = i; j < i + 16; ++j) {
        data[j] = static_cast<float>(static_cast<c10::BFloat16>(data[j]));
      }
      continue;
    }
    const __m256i rounded =
        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(value));
    _mm512_storeu_ps(
        data + i, _mm512_castsi512_ps(
                      _mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
  }
  return i;
}
#endif

// Rounds data[0, n) in place to the nearest half_t value, kept in float32:
// what storing a float32 result in half_t and reading it back gives.
template <typename half_t>
void round_to_half(float* data, int64_t n) {
  using HalfVec = at::vec::Vectorized<half_t>;
  using FloatVec = at::vec::Vectorized<float>;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
    if (has_avx512_bf16()) {
      i = round_to_bfloat16_avx512_bf16(data, n);
    }
  }
#endif
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
