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
// general path, which updates the staged buffers position by position. Each
// path is its own file (conv2d_relu_max_pool2d_backward_registers.h and
// conv2d_relu_max_pool2d_backward_general.h); this one holds what they share
// (the plan, the staging, the frame over chunks of images), the choice
// between them and the registration.
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zeros.h>

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

}  // namespace
}  // namespace ptfast::cpu

// The two paths, each in its own file, build on the plan, staging and chunk
// frame above.
#include "ops/cpu/isa/conv2d_relu_max_pool2d_backward_general.h"
#include "ops/cpu/isa/conv2d_relu_max_pool2d_backward_registers.h"

namespace ptfast::cpu {
namespace {

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
