// The register path of the CPU backward of the fused conv2d -> ReLU ->
// max_pool2d operator: disjoint pooling windows with dilation_w == 1 (every
// MNIST and CIFAR-like block), whose sums stay in vector registers.
//
// A file of its own because it is a complete algorithm beside the general
// path (conv2d_relu_max_pool2d_backward_general.h), sharing nothing with it
// but the frame. Included by conv2d_relu_max_pool2d_backward_isa.cpp only,
// after the plan, staging and chunk frame it builds on (BackwardPlan,
// StagedPlane, weight_rows, run_in_chunks): so it is compiled once per
// instruction set, and it is not a standalone header.
#pragma once

#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"
#include "ops/geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// Accumulator vectors a kernel keeps in registers: AVX-512 has 32 vector
// registers, AVX2 16; the rest hold loads and the broadcast gradient.
template <typename scalar_t>
constexpr int kRegisterBudget =
    sizeof(at::vec::Vectorized<scalar_t>) >= 64 ? 24 : 12;

// Kernel rows whose sums fit the registers, for rows of `row_vectors`
// vectors (beyond 8 rows GCC keeps the accumulators on the stack).
template <typename scalar_t>
constexpr int max_register_rows(int64_t row_vectors) {
  return static_cast<int>(
      std::min<int64_t>(8, kRegisterBudget<scalar_t> / row_vectors));
}

// row + step, opaque to the optimiser: otherwise GCC hoists every kernel
// row's offset (kh * step) out of the loop over positions, into more
// values than the general registers hold, and reloads them from the stack
// (or vector registers) for every position.
template <typename scalar_t>
C10_ALWAYS_INLINE const scalar_t* next_row(const scalar_t* row, int64_t step) {
  row += step;
#if defined(__GNUC__)
  asm("" : "+r"(row));
#endif
  return row;
}

// Whether load_half reads half a vector on this instruction set.
template <typename scalar_t>
constexpr bool kHasHalfLoads = sizeof(at::vec::Vectorized<scalar_t>) == 64;

// The first half of the vector at `p`, zeros above it (AVX-512; elsewhere
// the whole vector). For rows that fit half a vector: a whole vector loaded
// at an unaligned address straddles two cache lines 15 times in 16, half
// of one 7 times in 16.
template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> load_half(const scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_zextps256_ps512(_mm256_loadu_ps(p));
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return _mm512_zextpd256_pd512(_mm256_loadu_pd(p));
  }
#endif
  return at::vec::Vectorized<scalar_t>::loadu(p);
}

// Up to kMaxRows kernel rows of kRowVectors vectors each, summed in
// registers. Loops run over the constant kMaxRows and skip rows past `rows`,
// so they unroll fully and every accumulator stays a register. kRows > 0
// fixes the number of rows (callers then pass kRows as `rows`, and the
// skips fold away); 0 takes any up to the register budget. kHalfRows: the
// rows fit half a vector, and fmadd reads only that half.
template <typename scalar_t, int kRowVectors, int kRows, bool kHalfRows = false>
struct RegisterRows {
  static_assert(!kHalfRows || kRowVectors == 1, "half rows are one vector");
  using Vec = at::vec::Vectorized<scalar_t>;
  static constexpr int kMaxRows =
      kRows > 0 ? kRows : max_register_rows<scalar_t>(kRowVectors);
  Vec acc[kMaxRows][kRowVectors];

  C10_ALWAYS_INLINE void zero() {
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
#pragma GCC unroll 6
      for (int r = 0; r < kRowVectors; ++r) {
        acc[kh][r] = Vec(0);
      }
    }
  }

  // acc[kh] += g * src[kh * row_step, ...) for kh < rows.
  C10_ALWAYS_INLINE void fmadd(
      const Vec& g, const scalar_t* src, int64_t row_step, int64_t rows) {
    const scalar_t* row = src;
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
      if (kh < rows) {
#pragma GCC unroll 6
        for (int r = 0; r < kRowVectors; ++r) {
          const Vec values =
              kHalfRows ? load_half(row) : Vec::loadu(row + r * Vec::size());
          acc[kh][r] = at::vec::fmadd(g, values, acc[kh][r]);
        }
      }
      row = next_row(row, row_step);
    }
  }

  // acc[kh] = src[kh * row_step, ...), full vectors, for kh < rows.
  C10_ALWAYS_INLINE void load(
      const scalar_t* src, int64_t row_step, int64_t rows) {
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
      if (kh < rows) {
#pragma GCC unroll 6
        for (int r = 0; r < kRowVectors; ++r) {
          acc[kh][r] = Vec::loadu(src + kh * row_step + r * Vec::size());
        }
      }
    }
  }

  // acc[kh] += g * src[kh * kRowVectors * Vec::size(), ...) for kh < rows:
  // rows packed back to back (the staged weight), so that every load's offset
  // is a constant.
  C10_ALWAYS_INLINE void fmadd_packed(
      const Vec& g, const scalar_t* src, int64_t rows) {
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
      if (kh < rows) {
#pragma GCC unroll 6
        for (int r = 0; r < kRowVectors; ++r) {
          acc[kh][r] = at::vec::fmadd(
              g, Vec::loadu(src + (kh * kRowVectors + r) * Vec::size()),
              acc[kh][r]);
        }
      }
    }
  }

  // dst[kh * row_step, ...) = acc[kh], full vectors, for kh < rows.
  C10_ALWAYS_INLINE void store(
      scalar_t* dst, int64_t row_step, int64_t rows) const {
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
      if (kh < rows) {
#pragma GCC unroll 6
        for (int r = 0; r < kRowVectors; ++r) {
          acc[kh][r].store(dst + kh * row_step + r * Vec::size());
        }
      }
    }
  }

  // dst[kh * row_step, ...) += acc[kh] for kh < rows: whole vectors when
  // `full_width`, else only the first `row_length` values of each row.
  C10_ALWAYS_INLINE void add_to(
      scalar_t* dst, int64_t row_step, int64_t rows, int64_t row_length,
      bool full_width) const {
#pragma GCC unroll 8
    for (int kh = 0; kh < kMaxRows; ++kh) {
      if (kh < rows) {
        scalar_t* row = dst + kh * row_step;
#pragma GCC unroll 6
        for (int r = 0; r < kRowVectors; ++r) {
          scalar_t* at = row + r * Vec::size();
          const int64_t lanes = row_length - r * Vec::size();
          if (full_width || lanes >= Vec::size()) {
            (Vec::loadu(at) + acc[kh][r]).store(at);
          } else {
            (Vec::loadu(at, lanes) + acc[kh][r]).store(at, lanes);
          }
        }
      }
    }
  }
};

// Whether the disjoint-window path can take these arguments.
template <typename scalar_t>
bool disjoint_windows_path_applies(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto& p = a.params;
  const int64_t row_vectors = plan.row_pitch / Vec::size();
  return p.pool_stride[0] >= p.pool_kernel[0] &&
         p.pool_stride[1] >= p.pool_kernel[1] && p.dilation[1] == 1 &&
         row_vectors <= 6 &&
         a.shape.kernel_h <= max_register_rows<scalar_t>(row_vectors);
}

// One entry of grad_input's work list: an output channel whose arg-max sits
// at a conv position, as the channel's staged weight rows and the gradient
// of the pooled output concerned.
template <typename scalar_t>
struct ChannelGradient {
  const scalar_t* weight_rows;  // (KH, row_pitch)
  scalar_t grad;
};

// Offsets into a staged (channels-last, padded) image or grad_input.
struct FieldGeometry {
  int64_t pooled_h, pooled_w;
  int64_t kernel_h;
  int64_t row_step;         // between the kernel rows of a receptive field
  int64_t conv_row_step;    // between the fields of neighbouring conv rows
  int64_t conv_col_step;    // and conv columns
  int64_t window_origin;    // of the field at pooled output (0, 0)'s origin
  int64_t window_row_step;  // between neighbouring pooled rows' origins
  int64_t window_col_step;  // and pooled columns'
};

// Adds the weight gradient of one output channel over one image to its
// (KH, row_pitch) rows `rows` (when not null), and returns the sum of its
// gradients (the bias gradient). Everything the loop reads is a parameter,
// so that the compiler keeps it in registers along with the sums.
template <
    typename scalar_t, typename code_t, int kRowVectors, int kRows,
    bool kHalfRows>
C10_ALWAYS_INLINE scalar_t plane_weight_gradient(
    const FieldGeometry g, const int64_t* code_field, const scalar_t* grads,
    const code_t* codes, const scalar_t* image, scalar_t* rows,
    int64_t row_pitch) {
  using Vec = at::vec::Vectorized<scalar_t>;
  RegisterRows<scalar_t, kRowVectors, kRows, kHalfRows> sums;
  const int64_t kernel_h = kRows > 0 ? kRows : g.kernel_h;
  if (rows != nullptr) {
    sums.load(rows, row_pitch, kernel_h);
  }
  scalar_t bias_sum = 0;
  for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
    const int64_t row_fields = g.window_origin + ph * g.window_row_step;
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      const int64_t cell = ph * g.pooled_w + pw;
      const int64_t code = static_cast<int64_t>(codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      const scalar_t grad = grads[cell];
      bias_sum += grad;
      if (rows != nullptr) {
        sums.fmadd(
            Vec(grad),
            image + row_fields + pw * g.window_col_step + code_field[code],
            g.row_step, kernel_h);
      }
    }
  }
  if (rows != nullptr) {
    sums.store(rows, row_pitch, kernel_h);
  }
  return bias_sum;
}

// Sorts one image's (conv position, output channel) pairs by position for
// grad_input: with disjoint windows a position is the arg-max of at most one
// window per channel, so position i's pairs fit pairs[i * out_group, ...),
// in channel order, and counts[i] says how many there are (counts must be
// zero on entry). `cell_position[cell]` is the conv position of each pooled
// output's window origin, `code_position[code]` the arg-max's offset from it.
template <typename scalar_t, typename code_t>
void group_pairs_by_position(
    const code_t* codes, const scalar_t* grads, int64_t out_group,
    int64_t pooled, const int64_t* cell_position, const int64_t* code_position,
    const scalar_t* weight_rows, int64_t padded_weight_size, int64_t* counts,
    ChannelGradient<scalar_t>* pairs) {
  for (int64_t j = 0; j < out_group; ++j) {
    const code_t* channel_codes = codes + j * pooled;
    const scalar_t* channel_grads = grads + j * pooled;
    const scalar_t* rows = weight_rows + j * padded_weight_size;
    for (int64_t cell = 0; cell < pooled; ++cell) {
      const int64_t code = static_cast<int64_t>(channel_codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      const int64_t position = cell_position[cell] + code_position[code];
      pairs[position * out_group + counts[position]++] = {
          rows, channel_grads[cell]};
    }
  }
}

// Adds to the staged grad_input, for each conv position, the weight rows of
// the channels whose arg-max it is times their gradients, summed in
// registers first; grouped as group_pairs_by_position leaves them.
template <typename scalar_t, int kRowVectors, int kRows>
void add_input_gradient(
    const FieldGeometry g, int64_t conv_h, int64_t conv_w,
    const int64_t* counts, const ChannelGradient<scalar_t>* pairs,
    int64_t out_group, int64_t row_length, scalar_t* grad_image) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t kernel_h = kRows > 0 ? kRows : g.kernel_h;
  for (int64_t oh = 0; oh < conv_h; ++oh) {
    for (int64_t ow = 0; ow < conv_w; ++ow) {
      const int64_t position = oh * conv_w + ow;
      const int64_t count = counts[position];
      if (count == 0) {
        continue;
      }
      const ChannelGradient<scalar_t>* first = pairs + position * out_group;
      RegisterRows<scalar_t, kRowVectors, kRows> sums;
      sums.zero();
      bool finite = true;
      for (int64_t k = 0; k < count; ++k) {
        sums.fmadd_packed(Vec(first[k].grad), first[k].weight_rows, kernel_h);
        finite &= std::isfinite(first[k].grad);
      }
      // The padding lanes of the weight rows are 0, so a finite sum leaves
      // the values past a row unchanged; grad * 0 is NaN for an infinite
      // grad, which must not spill over.
      sums.add_to(
          grad_image + oh * g.conv_row_step + ow * g.conv_col_step, g.row_step,
          kernel_h, row_length, finite);
    }
  }
}

// With disjoint windows each conv output is the arg-max of at most one
// pooled output per channel. The image and grad_input are staged with the
// conv padding, so every receptive field lies inside them (a tap in the
// padding reads 0, and its grad_input lands in the padding, which is
// dropped):
// - grad_weight of output channel oc: for each of its arg-max positions,
//   grad * receptive field, summed in registers over the channel's plane;
// - grad_input: for each conv position, the weight rows of every channel
//   whose arg-max it is, times that channel's grad, summed in registers and
//   added to the staged grad_input once per position.
template <
    typename scalar_t, typename code_t, int kRowVectors, int kRows,
    bool kHalfRows = false>
void backward_disjoint_windows(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const StagedPlane staged{
      plan.in_group, s.in_h, s.in_w, p.padding[0], p.padding[1]};
  FieldGeometry g{};
  g.pooled_h = s.pooled_h;
  g.pooled_w = s.pooled_w;
  g.kernel_h = s.kernel_h;
  g.row_step = p.dilation[0] * staged.padded_w() * plan.in_group;
  g.conv_row_step = p.stride[0] * staged.padded_w() * plan.in_group;
  g.conv_col_step = p.stride[1] * plan.in_group;
  g.window_row_step = p.pool_stride[0] * g.conv_row_step;
  g.window_col_step = p.pool_stride[1] * g.conv_col_step;
  g.window_origin = -p.pool_padding[0] * g.conv_row_step -
                    p.pool_padding[1] * g.conv_col_step;
  // Per arg-max code: its field's offset from the window origin's, and its
  // conv position's.
  const int64_t window = p.pool_kernel[0] * p.pool_kernel[1];
  std::vector<int64_t> code_field(window + 1, 0);
  std::vector<int64_t> code_position(window + 1, 0);
  for (int64_t code = 1; code <= window; ++code) {
    int64_t dy = 0, dx = 0;
    geo::decode_argmax(code, p.pool_kernel[1], dy, dx);
    code_field[code] = dy * g.conv_row_step + dx * g.conv_col_step;
    code_position[code] = dy * s.conv_w + dx;
  }
  const int64_t positions = s.conv_h * s.conv_w;
  std::vector<int64_t> cell_position(plan.pooled);
  for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < s.pooled_w; ++pw) {
      cell_position[ph * s.pooled_w + pw] =
          (ph * p.pool_stride[0] - p.pool_padding[0]) * s.conv_w +
          pw * p.pool_stride[1] - p.pool_padding[1];
    }
  }

  const scalar_t* grad_output = a.grad_output.const_data_ptr<scalar_t>();
  const code_t* codes = a.codes.const_data_ptr<code_t>();
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const at::Tensor weight_tensor =
      plan.need_input ? weight_rows(a, plan) : at::Tensor();
  const scalar_t* weight =
      plan.need_input ? weight_tensor.const_data_ptr<scalar_t>() : nullptr;
  // One thread's buffers. The padding border of image_cl stays 0.
  struct Buffers {
    std::vector<scalar_t> image_cl, grad_cl;
    // A chunk's weight gradient, (OC, KH, row_pitch), summed in scalar_t
    // over its few images and added to the partials once.
    std::vector<scalar_t> chunk_weight_grad;
    // grad_input's work list, grouped by conv position.
    std::vector<int64_t> position_count;
    std::vector<ChannelGradient<scalar_t>> channel_grads;
  };
  const auto make_buffers = [&] {
    return Buffers{
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_weight),
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_input),
        std::vector<scalar_t>(
            plan.need_weight ? s.out_channels * plan.padded_weight_size : 0, 0),
        std::vector<int64_t>(plan.need_input ? positions : 0),
        std::vector<ChannelGradient<scalar_t>>(
            plan.need_input ? plan.out_group * positions : 0)};
  };
  run_in_chunks(
      a, plan, make_buffers,
      [&](Buffers& b, acc_t* partial, int64_t n, int64_t group) {
        bool staged_non_finite = false;
        const int64_t slice =
            (n * s.in_channels + group * plan.in_group) * s.in_h * s.in_w;
        const int64_t first_plane = n * s.out_channels + group * plan.out_group;
        const scalar_t* plane_grads = grad_output + first_plane * plan.pooled;
        const code_t* plane_codes = codes + first_plane * plan.pooled;
        if (plan.need_weight) {
          to_channels_last(b.image_cl.data(), input + slice, staged);
          staged_non_finite = has_non_finite(b.image_cl.data(), staged.size());
        }
        if (plan.need_weight || plan.need_bias) {
          for (int64_t j = 0; j < plan.out_group; ++j) {
            const int64_t oc = group * plan.out_group + j;
            const scalar_t bias_sum = plane_weight_gradient<
                scalar_t, code_t, kRowVectors, kRows, kHalfRows>(
                g, code_field.data(), plane_grads + j * plan.pooled,
                plane_codes + j * plan.pooled, b.image_cl.data(),
                plan.need_weight
                    ? b.chunk_weight_grad.data() + oc * plan.padded_weight_size
                    : nullptr,
                plan.row_pitch);
            if (plan.need_bias) {
              partial[s.out_channels * plan.weight_size + oc] += bias_sum;
            }
          }
        }
        if (!plan.need_input) {
          return staged_non_finite;
        }
        std::fill(b.position_count.begin(), b.position_count.end(), 0);
        group_pairs_by_position(
            plane_codes, plane_grads, plan.out_group, plan.pooled,
            cell_position.data(), code_position.data(),
            weight + group * plan.out_group * plan.padded_weight_size,
            plan.padded_weight_size, b.position_count.data(),
            b.channel_grads.data());
        std::fill(b.grad_cl.begin(), b.grad_cl.end(), scalar_t(0));
        add_input_gradient<scalar_t, kRowVectors, kRows>(
            g, s.conv_h, s.conv_w, b.position_count.data(),
            b.channel_grads.data(), plan.out_group, plan.row_length,
            b.grad_cl.data());
        from_channels_last(
            a.grad_input.mutable_data_ptr<scalar_t>() + slice, b.grad_cl.data(),
            staged);
        return staged_non_finite;
      },
      [&](Buffers& b, acc_t* partial) {
        if (plan.need_weight) {
          add_weight_rows(
              partial, b.chunk_weight_grad.data(), s.out_channels * s.kernel_h,
              plan);
          std::fill(b.chunk_weight_grad.begin(), b.chunk_weight_grad.end(), 0);
        }
      });
}

}  // namespace
}  // namespace ptfast::cpu
