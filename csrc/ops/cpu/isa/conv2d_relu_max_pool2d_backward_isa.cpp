// Vectorised CPU backward of the fused conv2d -> ReLU -> max_pool2d operator.
// Compiled once per instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// Only the arg-max position of each window whose maximum is positive receives
// gradient, so both gradients are sums over those positions; the dense conv
// gradient is never formed. The image (and grad_input) are staged
// channels-last, (H, W, C), and the weight as (OC, KH, KW, C), so that a
// kernel row across the group's channels is one contiguous run.
//
// Two paths: disjoint pooling windows with dilation_w == 1 (every MNIST and
// CIFAR-like block) keep their sums in registers; anything else (overlapping
// windows, horizontal dilation, rows too wide for the registers) takes the
// general path, which updates the staged buffers position by position.
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// Images are split into chunks whose number depends only on the shapes:
// each chunk sums its weight gradient on its own and the chunks are added in
// order, so the result is the same for any number of threads. At most
// kMaxImageChunks chunks, each with at least kMinChunkPositions pooled
// outputs per channel, so that adding up the chunks' partial sums stays
// small next to the work.
constexpr int64_t kMaxImageChunks = 64;
constexpr int64_t kMinChunkPositions = 256;

// Sizes both backward paths derive from the arguments.
template <typename scalar_t>
struct BackwardPlan {
  int64_t in_group, out_group;
  int64_t kernel_size;  // KH * KW
  int64_t weight_size;  // C * KH * KW, one output channel's weights
  int64_t pooled;       // PH * PW
  // A kernel row across the group's channels, (KW, C), is `row_length`
  // contiguous values in the channels-last layouts; rows are stored
  // `row_pitch` apart, rounded up to whole vectors, so that interior
  // positions update them with full-width vector loads and stores (a masked
  // store would stall the next position's loads of the same row).
  int64_t row_length, row_pitch;
  int64_t padded_weight_size;  // KH * row_pitch
  int64_t chunk_images, chunks;
  // Per chunk: weight gradient (OC, KH, KW, C) then bias gradient (OC).
  int64_t partial_size;
  bool need_input, need_weight, need_bias;

  explicit BackwardPlan(const Conv2dReluMaxPool2dBackwardArgs& a) {
    using Vec = at::vec::Vectorized<scalar_t>;
    const auto& s = a.shape;
    in_group = s.in_channels_per_group(a.params);
    out_group = s.out_channels_per_group(a.params);
    kernel_size = s.kernel_h * s.kernel_w;
    weight_size = in_group * kernel_size;
    pooled = s.pooled_h * s.pooled_w;
    row_length = s.kernel_w * in_group;
    row_pitch = (row_length + Vec::size() - 1) / Vec::size() * Vec::size();
    padded_weight_size = s.kernel_h * row_pitch;
    const int64_t most_chunks = std::min(s.batch, kMaxImageChunks);
    chunk_images = std::max(
        (s.batch + most_chunks - 1) / most_chunks,
        (kMinChunkPositions + pooled - 1) / std::max<int64_t>(1, pooled));
    chunks = (s.batch + chunk_images - 1) / chunk_images;
    need_input = a.grad_input.defined();
    need_weight = a.grad_weight.defined();
    need_bias = a.grad_bias.defined();
    partial_size = need_weight || need_bias
        ? s.out_channels * (weight_size + 1)
        : 0;
  }
};

// Whether any of values[0, count) is inf or NaN: x - x is NaN exactly then.
template <typename scalar_t>
bool has_non_finite(const scalar_t* values, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec sum(0);
  int64_t i = 0;
  for (; i + Vec::size() <= count; i += Vec::size()) {
    const Vec v = Vec::loadu(values + i);
    sum += v - v;
  }
  scalar_t rest = 0;
  for (; i < count; ++i) {
    rest += values[i] - values[i];
  }
  scalar_t lanes[Vec::size()];
  sum.store(lanes);
  for (int64_t lane = 0; lane < Vec::size(); ++lane) {
    rest += lanes[lane];
  }
  return std::isnan(rest);
}

// (OC, C, KH, KW) -> (OC, KH, row_pitch) with (KW, C) rows, zero-padded;
// reports whether the weight holds an inf or NaN. A tensor, for the CPU
// allocator's 64-byte alignment: rows of whole vectors then never straddle
// a cache line, which halves the cost of their loads.
template <typename scalar_t>
at::Tensor weight_rows(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  const auto& s = a.shape;
  const scalar_t* weight = a.weight.const_data_ptr<scalar_t>();
  at::Tensor rows_tensor =
      at::zeros({s.out_channels * plan.padded_weight_size}, a.weight.options());
  scalar_t* rows = rows_tensor.mutable_data_ptr<scalar_t>();
  for (int64_t oc = 0; oc < s.out_channels; ++oc) {
    for (int64_t c = 0; c < plan.in_group; ++c) {
      for (int64_t k = 0; k < plan.kernel_size; ++k) {
        rows[oc * plan.padded_weight_size + (k / s.kernel_w) * plan.row_pitch +
             (k % s.kernel_w) * plan.in_group + c] =
            weight[(oc * plan.in_group + c) * plan.kernel_size + k];
      }
    }
  }
  *a.weight_non_finite = has_non_finite(rows, rows_tensor.numel());
  return rows_tensor;
}

// (C, H, W) -> (H + 2 * pad_h, W + 2 * pad_w, C), writing only the interior
// (the border of `dst` keeps whatever it holds), and back.
struct StagedPlane {
  int64_t channels, height, width, pad_h, pad_w;
  int64_t padded_w() const { return width + 2 * pad_w; }
  int64_t size() const { return (height + 2 * pad_h) * padded_w() * channels; }
};

// A buffer for a staged image or grad_input (zeros), with one row pitch of
// slack: full-width rows may run past the last pixel. Empty when not
// `needed`.
template <typename scalar_t>
std::vector<scalar_t> staged_buffer(
    const StagedPlane& staged, int64_t row_pitch, bool needed) {
  return std::vector<scalar_t>(needed ? staged.size() + row_pitch : 0);
}

// The staged offset of pixel (h, w) of the input.
inline int64_t staged_pixel(const StagedPlane& staged, int64_t h, int64_t w) {
  return ((h + staged.pad_h) * staged.padded_w() + w + staged.pad_w) *
      staged.channels;
}

// A pixel's channels (or one channel's pixels) are strided: gathered by
// vectors where they fit one, since a scalar loop is a load and a store per
// value.
template <typename scalar_t>
void to_channels_last(
    scalar_t* dst, const scalar_t* src, const StagedPlane& staged) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using IndexVec = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
  const int64_t channels = staged.channels;
  const int64_t plane = staged.height * staged.width;
  if (channels == 1) {
    for (int64_t h = 0; h < staged.height; ++h) {
      std::copy(
          src + h * staged.width, src + (h + 1) * staged.width,
          dst + staged_pixel(staged, h, 0));
    }
    return;
  }
  if (channels <= Vec::size()) {
    typename IndexVec::value_type lanes[IndexVec::size()] = {};
    for (int64_t c = 0; c < channels; ++c) {
      lanes[c] = static_cast<typename IndexVec::value_type>(c * plane);
    }
    const IndexVec index = IndexVec::loadu(lanes);
    for (int64_t h = 0; h < staged.height; ++h) {
      for (int64_t w = 0; w < staged.width; ++w) {
        at::vec::gather<sizeof(scalar_t)>(src + h * staged.width + w, index)
            .store(dst + staged_pixel(staged, h, w), channels);
      }
    }
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t h = 0; h < staged.height; ++h) {
      scalar_t* row = dst + staged_pixel(staged, h, 0) + c;
      const scalar_t* in = src + c * plane + h * staged.width;
      for (int64_t w = 0; w < staged.width; ++w) {
        row[w * channels] = in[w];
      }
    }
  }
}

template <typename scalar_t>
void from_channels_last(
    scalar_t* dst, const scalar_t* src, const StagedPlane& staged) {
  using Vec = at::vec::Vectorized<scalar_t>;
  using IndexVec = at::vec::Vectorized<at::vec::int_same_size_t<scalar_t>>;
  const int64_t channels = staged.channels;
  const int64_t plane = staged.height * staged.width;
  if (channels == 1) {
    for (int64_t h = 0; h < staged.height; ++h) {
      const scalar_t* row = src + staged_pixel(staged, h, 0);
      std::copy(row, row + staged.width, dst + h * staged.width);
    }
    return;
  }
  // Lane l reads pixel w + l of the row (lanes past the row re-read the
  // row's first pixel and are not stored).
  const auto pixel_index = [&](int64_t count) {
    typename IndexVec::value_type lanes[IndexVec::size()] = {};
    for (int64_t lane = 0; lane < count; ++lane) {
      lanes[lane] =
          static_cast<typename IndexVec::value_type>(lane * channels);
    }
    return IndexVec::loadu(lanes);
  };
  const IndexVec full_index = pixel_index(Vec::size());
  const IndexVec tail_index = pixel_index(staged.width % Vec::size());
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t h = 0; h < staged.height; ++h) {
      const scalar_t* row = src + staged_pixel(staged, h, 0) + c;
      scalar_t* out = dst + c * plane + h * staged.width;
      int64_t w = 0;
      for (; w + Vec::size() <= staged.width; w += Vec::size()) {
        at::vec::gather<sizeof(scalar_t)>(row + w * channels, full_index)
            .store(out + w);
      }
      if (w < staged.width) {
        at::vec::gather<sizeof(scalar_t)>(row + w * channels, tail_index)
            .store(out + w, staged.width - w);
      }
    }
  }
}

// Adds one image's weight gradient, (out_group, KH, row_pitch) with (KW, C)
// rows, to a chunk's partial sums of the group's output channels.
template <typename scalar_t, typename acc_t>
void add_weight_rows(
    acc_t* partial, const scalar_t* rows, int64_t row_count,
    const BackwardPlan<scalar_t>& plan) {
  for (int64_t row = 0; row < row_count; ++row) {
    for (int64_t k = 0; k < plan.row_length; ++k) {
      partial[row * plan.row_length + k] += rows[row * plan.row_pitch + k];
    }
  }
}

// Per chunk of images: its weight gradient (OC, KH, KW, C) then its bias
// gradient (OC), in the accumulation type. Each chunk's slice is zeroed by
// the thread that fills it, in parallel and where it is used.
template <typename acc_t>
class ChunkPartials {
 public:
  ChunkPartials(int64_t chunks, int64_t size)
      : size_(size), values_(new acc_t[chunks * size]) {}

  acc_t* start(int64_t chunk) {
    acc_t* partial = values_.get() + chunk * size_;
    std::fill(partial, partial + size_, acc_t(0));
    return partial;
  }
  const acc_t* operator[](int64_t chunk) const {
    return values_.get() + chunk * size_;
  }

 private:
  int64_t size_;
  std::unique_ptr<acc_t[]> values_;
};

// Sums the chunks' partials in order into grad_weight (OC, KH, KW, C ->
// OC, C, KH, KW) and grad_bias, output channels in parallel.
template <typename scalar_t, typename acc_t>
void write_weight_and_bias_gradients(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan, const ChunkPartials<acc_t>& partials) {
  const auto& s = a.shape;
  const int64_t bias_offset = s.out_channels * plan.weight_size;
  scalar_t* grad_weight =
      plan.need_weight ? a.grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_bias =
      plan.need_bias ? a.grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t channel_work = plan.chunks * plan.weight_size;
  at::parallel_for(
      0, s.out_channels,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, channel_work)),
      [&](int64_t begin, int64_t end) {
        std::vector<acc_t> total(plan.weight_size);
        for (int64_t oc = begin; oc < end; ++oc) {
          std::fill(total.begin(), total.end(), acc_t(0));
          acc_t bias = 0;
          for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
            const acc_t* partial = partials[chunk];
            if (grad_weight != nullptr) {
              for (int64_t k = 0; k < plan.weight_size; ++k) {
                total[k] += partial[oc * plan.weight_size + k];
              }
            }
            bias += partial[bias_offset + oc];
          }
          if (grad_weight != nullptr) {
            for (int64_t c = 0; c < plan.in_group; ++c) {
              for (int64_t k = 0; k < plan.kernel_size; ++k) {
                grad_weight[(oc * plan.in_group + c) * plan.kernel_size + k] =
                    static_cast<scalar_t>(total[k * plan.in_group + c]);
              }
            }
          }
          if (grad_bias != nullptr) {
            grad_bias[oc] = static_cast<scalar_t>(bias);
          }
        }
      });
}

// The frame both paths share: chunks of images in parallel, each thread
// with its own buffers (`make_buffers()`), `image(buffers, partial, n,
// group)` for each image and group of a chunk, returning whether the input
// it staged holds an inf or NaN, and `finish_chunk(buffers, partial)` after
// a chunk's images; then the chunks' sums into grad_weight and grad_bias.
template <
    typename scalar_t, typename MakeBuffers, typename Image,
    typename FinishChunk>
void run_in_chunks(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan, const MakeBuffers& make_buffers,
    const Image& image, const FinishChunk& finish_chunk) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  ChunkPartials<acc_t> partials(plan.chunks, plan.partial_size);
  std::vector<uint8_t> non_finite(plan.chunks, 0);
  const int64_t chunk_flops = plan.chunk_images * s.out_channels *
      plan.pooled * plan.weight_size;
  at::parallel_for(
      0, plan.chunks,
      std::max<int64_t>(1, kGrainFlops / std::max<int64_t>(1, chunk_flops)),
      [&](int64_t begin, int64_t end) {
        auto buffers = make_buffers();
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          acc_t* partial = partials.start(chunk);
          const int64_t n_end =
              std::min(s.batch, (chunk + 1) * plan.chunk_images);
          for (int64_t n = chunk * plan.chunk_images; n < n_end; ++n) {
            for (int64_t group = 0; group < a.params.groups; ++group) {
              non_finite[chunk] |= image(buffers, partial, n, group);
            }
          }
          finish_chunk(buffers, partial);
        }
      });
  *a.input_non_finite = std::any_of(
      non_finite.begin(), non_finite.end(), [](uint8_t flag) { return flag; });
  if (plan.need_weight || plan.need_bias) {
    write_weight_and_bias_gradients(a, plan, partials);
  }
}

// ---------------------------------------------------------------------------
// Disjoint pooling windows, dilation_w == 1.

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
C10_ALWAYS_INLINE const scalar_t* next_row(
    const scalar_t* row, int64_t step) {
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
template <typename scalar_t, int kRowVectors, int kRows,
          bool kHalfRows = false>
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
          const Vec values = kHalfRows ? load_half(row)
                                       : Vec::loadu(row + r * Vec::size());
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
template <typename scalar_t, typename code_t, int kRowVectors, int kRows,
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
    int64_t pooled, const int64_t* cell_position,
    const int64_t* code_position, const scalar_t* weight_rows,
    int64_t padded_weight_size, int64_t* counts,
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
        sums.fmadd_packed(
            Vec(first[k].grad), first[k].weight_rows, kernel_h);
        finite &= std::isfinite(first[k].grad);
      }
      // The padding lanes of the weight rows are 0, so a finite sum leaves
      // the values past a row unchanged; grad * 0 is NaN for an infinite
      // grad, which must not spill over.
      sums.add_to(
          grad_image + oh * g.conv_row_step + ow * g.conv_col_step,
          g.row_step, kernel_h, row_length, finite);
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
            plan.need_weight ? s.out_channels * plan.padded_weight_size : 0,
            0),
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
        const int64_t first_plane =
            n * s.out_channels + group * plan.out_group;
        const scalar_t* plane_grads =
            grad_output + first_plane * plan.pooled;
        const code_t* plane_codes = codes + first_plane * plan.pooled;
        if (plan.need_weight) {
          to_channels_last(b.image_cl.data(), input + slice, staged);
          staged_non_finite =
              has_non_finite(b.image_cl.data(), staged.size());
        }
        if (plan.need_weight || plan.need_bias) {
          for (int64_t j = 0; j < plan.out_group; ++j) {
            const int64_t oc = group * plan.out_group + j;
            const scalar_t bias_sum = plane_weight_gradient<
                scalar_t, code_t, kRowVectors, kRows, kHalfRows>(
                    g, code_field.data(), plane_grads + j * plan.pooled,
                    plane_codes + j * plan.pooled, b.image_cl.data(),
                    plan.need_weight ? b.chunk_weight_grad.data() +
                            oc * plan.padded_weight_size
                                     : nullptr,
                    plan.row_pitch);
            if (plan.need_bias) {
              partial[s.out_channels * plan.weight_size + oc] +=
                  bias_sum;
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
            a.grad_input.mutable_data_ptr<scalar_t>() + slice,
            b.grad_cl.data(), staged);
        return staged_non_finite;
      },
      [&](Buffers& b, acc_t* partial) {
        if (plan.need_weight) {
          add_weight_rows(
              partial, b.chunk_weight_grad.data(),
              s.out_channels * s.kernel_h, plan);
          std::fill(
              b.chunk_weight_grad.begin(), b.chunk_weight_grad.end(), 0);
        }
      });
}

// ---------------------------------------------------------------------------
// General path: overlapping windows, horizontal dilation, wide rows.

// dst[j] += alpha * src[j] for j < count.
template <typename scalar_t>
inline void axpy(
    scalar_t* dst, const scalar_t* src, scalar_t alpha, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec a(alpha);
  int64_t j = 0;
  for (; j + Vec::size() <= count; j += Vec::size()) {
    at::vec::fmadd(a, Vec::loadu(src + j), Vec::loadu(dst + j)).store(dst + j);
  }
  if (j < count) {
    const int64_t rest = count - j;
    at::vec::fmadd(a, Vec::loadu(src + j, rest), Vec::loadu(dst + j, rest))
        .store(dst + j, rest);
  }
}

// A conv output that receives gradient, and the sum of the gradients of the
// pooled outputs whose arg-max it is.
template <typename scalar_t>
struct ActivePosition {
  int64_t oh, ow;
  scalar_t grad;
};

// The active conv positions of one (image, output channel) plane, in pooled
// order. When pooling windows overlap, one conv output can be the arg-max of
// several windows: it is listed once, at its first window, with the sum of
// their gradients taken in pooled order as max_pool2d's backward adds them,
// so the result matches native exactly (an inf input times g1 + g2 is not
// g1 * inf + g2 * inf).
template <typename scalar_t, typename code_t>
void collect_active_positions(
    const scalar_t* grad_output, const code_t* codes,
    const geo::PoolGeometry& pool, bool windows_overlap,
    std::vector<ActivePosition<scalar_t>>& active) {
  active.clear();
  for (int64_t ph = 0; ph < pool.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < pool.pooled_w; ++pw) {
      const int64_t cell = ph * pool.pooled_w + pw;
      const int64_t code = static_cast<int64_t>(codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      int64_t dy = 0, dx = 0;
      geo::decode_argmax(code, pool.kernel_w, dy, dx);
      const int64_t oh = ph * pool.stride_h - pool.padding_h + dy;
      const int64_t ow = pw * pool.stride_w - pool.padding_w + dx;
      if (!windows_overlap) {
        active.push_back({oh, ow, grad_output[cell]});
        continue;
      }
      const auto gathered = geo::gather_gradient<scalar_t>(
          grad_output, codes, oh, ow, pool);
      if (gathered.first_window == cell) {
        active.push_back({oh, ow, gathered.sum});
      }
    }
  }
}

// For each image and group, every active conv position (oh, ow) read, for
// kernel row kh, the input row ih0 + kh * dilation_h over columns
// iw0 + kw * dilation_w: in the channels-last image the valid taps of that
// row across the group's channels are one contiguous run when
// dilation_w == 1, and C-long runs otherwise, so each run is one axpy for
// grad_input and one for grad_weight.
template <typename scalar_t, typename code_t>
void backward_general(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const StagedPlane staged{plan.in_group, s.in_h, s.in_w, 0, 0};
  const scalar_t* grad_output = a.grad_output.const_data_ptr<scalar_t>();
  const code_t* codes = a.codes.const_data_ptr<code_t>();
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const at::Tensor weight_tensor =
      plan.need_input ? weight_rows(a, plan) : at::Tensor();
  const scalar_t* weight =
      plan.need_input ? weight_tensor.const_data_ptr<scalar_t>() : nullptr;
  const geo::PoolGeometry pool = ops::pool_geometry(s, p);
  const bool windows_overlap = p.pool_stride[0] < p.pool_kernel[0] ||
      p.pool_stride[1] < p.pool_kernel[1];
  // One thread's buffers.
  struct Buffers {
    std::vector<scalar_t> image_cl, grad_cl, image_weight_grad;
    std::vector<ActivePosition<scalar_t>> active;
  };
  const auto make_buffers = [&] {
    Buffers b{
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_weight),
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_input),
        std::vector<scalar_t>(
            plan.need_weight ? plan.out_group * plan.padded_weight_size : 0),
        {}};
    b.active.reserve(plan.pooled);
    return b;
  };
  run_in_chunks(
      a, plan, make_buffers,
      [&](Buffers& b, acc_t* partial, int64_t n, int64_t group) {
        bool staged_non_finite = false;
        const int64_t slice =
            (n * s.in_channels + group * plan.in_group) * s.in_h * s.in_w;
        if (plan.need_weight) {
          to_channels_last(b.image_cl.data(), input + slice, staged);
          staged_non_finite =
              has_non_finite(b.image_cl.data(), staged.size());
          std::fill(
              b.image_weight_grad.begin(), b.image_weight_grad.end(),
              scalar_t(0));
        }
        if (plan.need_input) {
          std::fill(b.grad_cl.begin(), b.grad_cl.end(), scalar_t(0));
        }
        for (int64_t j = 0; j < plan.out_group; ++j) {
          const int64_t oc = group * plan.out_group + j;
          const int64_t offset = (n * s.out_channels + oc) * plan.pooled;
          const scalar_t* w =
              plan.need_input
              ? weight + oc * plan.padded_weight_size
              : nullptr;
          scalar_t* gw = plan.need_weight
              ? b.image_weight_grad.data() + j * plan.padded_weight_size
              : nullptr;
          collect_active_positions(
              grad_output + offset, codes + offset, pool,
              windows_overlap, b.active);
          scalar_t bias_sum = 0;
          for (const auto& position : b.active) {
            bias_sum += position.grad;
            if (!plan.need_input && !plan.need_weight) {
              continue;
            }
            const auto rows = geo::valid_taps(
                position.oh, s.kernel_h, p.stride[0], p.padding[0],
                p.dilation[0], s.in_h);
            const auto cols = geo::valid_taps(
                position.ow, s.kernel_w, p.stride[1], p.padding[1],
                p.dilation[1], s.in_w);
            const int64_t ih0 = position.oh * p.stride[0] - p.padding[0];
            const int64_t iw0 = position.ow * p.stride[1] - p.padding[1];
            // Contiguous runs per kernel row: all valid taps at once
            // when dilation_w == 1, else one tap at a time.
            const int64_t run_taps =
                p.dilation[1] == 1 ? cols.end - cols.begin : 1;
            for (int64_t kh = rows.begin; kh < rows.end; ++kh) {
              const int64_t ih = ih0 + kh * p.dilation[0];
              for (int64_t kw = cols.begin; kw < cols.end;
                   kw += run_taps) {
                const int64_t pixel =
                    (ih * s.in_w + iw0 + kw * p.dilation[1]) *
                    plan.in_group;
                const int64_t tap =
                    kh * plan.row_pitch + kw * plan.in_group;
                const int64_t length = run_taps * plan.in_group;
                if (plan.need_input) {
                  axpy(b.grad_cl.data() + pixel, w + tap, position.grad,
                       length);
                }
                if (plan.need_weight) {
                  axpy(gw + tap, b.image_cl.data() + pixel, position.grad,
                       length);
                }
              }
            }
          }
          if (plan.need_bias) {
            partial[s.out_channels * plan.weight_size + oc] += bias_sum;
          }
        }
        if (plan.need_input) {
          from_channels_last(
              a.grad_input.mutable_data_ptr<scalar_t>() + slice,
              b.grad_cl.data(), staged);
        }
        if (plan.need_weight) {
          add_weight_rows(
              partial + group * plan.out_group * plan.weight_size,
              b.image_weight_grad.data(), plan.out_group * s.kernel_h,
              plan);
        }
        return staged_non_finite;
      },
      [](Buffers&, acc_t*) {});
}

// Kernel rows of one vector, kRows of them; read as half vectors where
// they fit one (a single input channel).
template <typename scalar_t, typename code_t, int kRows>
void backward_one_vector_rows(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if constexpr (kHasHalfLoads<scalar_t>) {
    if (plan.row_length <= Vec::size() / 2) {
      backward_disjoint_windows<scalar_t, code_t, 1, kRows, true>(a, plan);
      return;
    }
  }
  backward_disjoint_windows<scalar_t, code_t, 1, kRows>(a, plan);
}

template <typename scalar_t, typename code_t>
void backward_typed(const Conv2dReluMaxPool2dBackwardArgs& a) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const BackwardPlan<scalar_t> plan(a);
  if (!disjoint_windows_path_applies(a, plan)) {
    backward_general<scalar_t, code_t>(a, plan);
    return;
  }
  const int64_t row_vectors = plan.row_pitch / Vec::size();
  // Rows of one vector spend most of their time per position: for the
  // common 3x3 and 5x5 kernels their row count is a constant.
  if (row_vectors == 1 && a.shape.kernel_h == 5) {
    backward_one_vector_rows<scalar_t, code_t, 5>(a, plan);
    return;
  }
  if (row_vectors == 1 && a.shape.kernel_h == 3) {
    backward_one_vector_rows<scalar_t, code_t, 3>(a, plan);
    return;
  }
  if (row_vectors == 4 && a.shape.kernel_h == 5) {
    backward_disjoint_windows<scalar_t, code_t, 4, 5>(a, plan);
    return;
  }
  switch (row_vectors) {
    case 1: backward_disjoint_windows<scalar_t, code_t, 1, 0>(a, plan); break;
    case 2: backward_disjoint_windows<scalar_t, code_t, 2, 0>(a, plan); break;
    case 3: backward_disjoint_windows<scalar_t, code_t, 3, 0>(a, plan); break;
    case 4: backward_disjoint_windows<scalar_t, code_t, 4, 0>(a, plan); break;
    case 5: backward_disjoint_windows<scalar_t, code_t, 5, 0>(a, plan); break;
    default: backward_disjoint_windows<scalar_t, code_t, 6, 0>(a, plan); break;
  }
}

void conv2d_relu_max_pool2d_backward_kernel(
    const Conv2dReluMaxPool2dBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(
      args.input.scalar_type(), "conv2d_relu_max_pool2d_backward_cpu", [&] {
        ops::dispatch_code_type(args.codes.scalar_type(), [&](auto code) {
          backward_typed<scalar_t, decltype(code)>(args);
        });
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(
    conv2d_relu_max_pool2d_backward_stub,
    &conv2d_relu_max_pool2d_backward_kernel);

}  // namespace ptfast::cpu
