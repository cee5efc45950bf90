// Vectorised CPU kernels of log_softmax and its backward. Compiled once per
// instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// The tensor is viewed as (outer, dim_size, inner). With dim last
// (inner == 1) the threads share the rows (log_softmax_rows.h). With fewer
// inner positions than a vector, slices of (dim_size, inner) are transposed,
// an L1-sized chunk at a time, into rows of the last dim, and back. Otherwise
// vectors of inner positions are reduced together along dim.
#include "ops/cpu/log_softmax_kernel.h"
#include "ops/cpu/isa/half_precision.h"
#include "ops/cpu/isa/log_softmax_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace ptfast::cpu {
namespace {

// Elements per parallel task, a few microseconds of work: enough to pay for
// waking a thread. At 2^15, tensors of 32K-64K elements ran on one thread
// where native splits them (from about 2K elements on): 2048x16 forward
// 0.73x and 1024x32 0.51x native on two threads; at 2^13 they are
// 1.1x-1.3x, and tensors near 8K elements stay at parity.
constexpr int64_t kGrainElements = 1 << 13;

// A backward's grad_input from this size up is written with streaming
// (non-temporal) stores: whole cache lines go to memory without first being
// read in, a third of the output pass's traffic, and the inputs stay cached.
// Smaller ones stay in cache for their consumer. The forward's output is
// stored normally: its backward (or the next layer) reads it soon.
constexpr int64_t kStreamingBytes = 24 << 20;

bool use_streaming_stores(const at::Tensor& grad_input) {
  return grad_input.nbytes() >= kStreamingBytes;
}

// Calls rows_fn(offset, row_count) for blocks of rows of the last dim
// (inner == 1) at element `offset`, in parallel.
template <typename RowsFn>
void for_each_block_of_rows(
    const ops::LogSoftmaxLayout& l, const RowsFn& rows_fn) {
  at::parallel_for(
      0, l.outer, std::max<int64_t>(1, kGrainElements / l.dim_size),
      [&](int64_t begin, int64_t end) {
        rows_fn(begin * l.dim_size, end - begin);
      });
}

// Bytes of (dim_size, inner) slices transposed together: with their
// transposed copies, they stay in L1 from the transpose through the passes
// over the rows and back.
constexpr int64_t kTransposedChunkBytes = 16 << 10;

// Whether the slices of `l` go through rows of the last dim: fewer inner
// positions than a vector, which the inner kernels would fill partly
// (4x100000x2 along dim 1: 2 of 16 lanes, 2.2x slower than native).
template <typename scalar_t>
bool transposes_to_rows(const ops::LogSoftmaxLayout& l) {
  return l.inner < at::vec::Vectorized<scalar_t>::size();
}

// The elements a chunk of slices holds.
template <typename scalar_t>
int64_t chunk_capacity(const ops::LogSoftmaxLayout& l) {
  return std::max<int64_t>(
      kTransposedChunkBytes / sizeof(scalar_t), l.dim_size * l.inner);
}

// Calls rows_fn(first_slice, slice_count, buffers, buffer_size) for chunks
// of whole slices, in parallel, with `buffer_count` scratch buffers of
// `buffer_size` elements (a chunk's, or the whole tensor's when smaller) per
// task, one after the other at `buffers` and left uninitialised: zeroing
// 48 KB took 3 us, as long as a 2x3x7 call. A slice larger than a chunk is
// a chunk of its own, in buffers of its size (from L2 or beyond).
template <typename scalar_t, typename RowsFn>
void for_each_chunk_of_slices(
    const ops::LogSoftmaxLayout& l, int buffer_count, const RowsFn& rows_fn) {
  const int64_t slice = l.dim_size * l.inner;
  const int64_t per_chunk = chunk_capacity<scalar_t>(l) / slice;
  const int64_t chunks = (l.outer + per_chunk - 1) / per_chunk;
  const int64_t buffer_size = std::min(per_chunk, l.outer) * slice;
  at::parallel_for(
      0, chunks, std::max<int64_t>(1, kGrainElements / (per_chunk * slice)),
      [&](int64_t begin, int64_t end) {
        const auto buffers = std::make_unique_for_overwrite<scalar_t[]>(
            buffer_count * buffer_size);
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t first = chunk * per_chunk;
          rows_fn(
              first, std::min(per_chunk, l.outer - first), buffers.get(),
              buffer_size);
        }
      });
}

// Slices [first, first + count) at `from` as rows of dim_size at `to`, or
// (`back`) the other way. A transpose_mxn call costs a whole 16x16 register
// transpose: for fewer than 4 inner positions, plain copies cost less.
template <typename scalar_t>
void transpose_slices(
    const ops::LogSoftmaxLayout& l, const scalar_t* from, scalar_t* to,
    int64_t count, bool back) {
  const int64_t slice = l.dim_size * l.inner;
  const int64_t from_rows = back ? l.inner : l.dim_size;
  const int64_t from_columns = back ? l.dim_size : l.inner;
  for (int64_t s = 0; s < count; ++s) {
    const scalar_t* source = from + s * slice;
    scalar_t* target = to + s * slice;
    if (l.inner < 4) {
      for (int64_t r = 0; r < from_rows; ++r) {
        for (int64_t c = 0; c < from_columns; ++c) {
          target[c * from_rows + r] = source[r * from_columns + c];
        }
      }
    } else {
      at::vec::transpose_mxn<scalar_t>(
          source, from_columns, target, from_rows, static_cast<int>(from_rows),
          static_cast<int>(from_columns));
    }
  }
}

template <typename scalar_t>
void forward_transposed(
    const scalar_t* input, scalar_t* output, const ops::LogSoftmaxLayout& l) {
  const int64_t slice = l.dim_size * l.inner;
  for_each_chunk_of_slices<scalar_t>(
      l, 1, [&](int64_t first, int64_t count, scalar_t* rows, int64_t) {
        transpose_slices(l, input + first * slice, rows, count, /*back=*/false);
        forward_rows(
            rows, rows, count * l.inner, l.dim_size,
            count * slice * sizeof(scalar_t));
        transpose_slices(l, rows, output + first * slice, count, /*back=*/true);
      });
}

// Whether the forward of a small-inner layout (transposes_to_rows) works
// along dim in place rather than through transposed rows: for short dims
// with at least 3 inner positions. A transpose_mxn call costs a whole 16x16
// register transpose per slice each way, which a short slice does not
// amortise (two threads: 64x3x7 along dim 1 0.48x native transposed, 1.22x
// along; 256x5x5 0.51x and 1.09x; 64x12x6 0.87x and 1.23x; 16x30x15 1.89x
// and 2.13x). Longer dims amortise it and sum in vector lanes, more
// accurately (64x64x8: 2.76x transposed, 2.43x along; 64x1000x4 3.62x and
// 1.69x), and fewer inner positions are copied, not transposed (512x10x2:
// 2.35x and 0.97x).
bool spreads_along_dim(const ops::LogSoftmaxLayout& l) {
  return l.dim_size <= 32 && l.inner >= 3;
}

// The forward with fewer inner positions than a vector, without transposes:
// each (slice, inner position)'s maximum along dim by scalar compares (NaN
// ignored, as max_ignoring_nan), spread over the slice's elements;
// exp(x - max) in one contiguous pass of full vectors over the chunk; its
// sums along dim by scalar adds, their logarithms vectorised (native's),
// spread; then (x - max) - log_sum in one more pass. `output` may be
// `input`: only the last pass writes it.
template <typename scalar_t>
void forward_small_inner(
    const scalar_t* input, scalar_t* output, const ops::LogSoftmaxLayout& l) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t slice = l.dim_size * l.inner;
  for_each_chunk_of_slices<scalar_t>(
      l, 3,
      [&](int64_t first, int64_t count, scalar_t* buffers, int64_t capacity) {
        const int64_t offset = first * slice;
        const int64_t n = count * slice;
        const scalar_t* x = input + offset;
        scalar_t* max_spread = buffers;
        // exp(x - max), then the spread log_sum.
        scalar_t* work = buffers + capacity;
        scalar_t* columns = buffers + 2 * capacity;  // count * inner values
        scalar_t column[Vec::size()];
        for (int64_t s = 0; s < count; ++s) {
          const scalar_t* xs = x + s * slice;
          std::fill_n(
              column, l.inner, -std::numeric_limits<scalar_t>::infinity());
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int64_t j = 0; j < l.inner; ++j) {
              const scalar_t v = xs[d * l.inner + j];
              column[j] = v > column[j] ? v : column[j];
            }
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            std::copy_n(column, l.inner, max_spread + s * slice + d * l.inner);
          }
        }
        write_row(work, n, /*streaming=*/false, [&](int64_t i, int64_t k) {
          return exp(load(x + i, k) - load(max_spread + i, k));
        });
        for (int64_t s = 0; s < count; ++s) {
          std::fill_n(column, l.inner, scalar_t(0));
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int64_t j = 0; j < l.inner; ++j) {
              column[j] += work[s * slice + d * l.inner + j];
            }
          }
          std::copy_n(column, l.inner, columns + s * l.inner);
        }
        for (int64_t r = 0; r < count * l.inner; r += Vec::size()) {
          const int64_t k = std::min<int64_t>(Vec::size(), count * l.inner - r);
          load(columns + r, k).log().store(columns + r, k);
        }
        for (int64_t s = 0; s < count; ++s) {
          for (int64_t d = 0; d < l.dim_size; ++d) {
            std::copy_n(
                columns + s * l.inner, l.inner, work + s * slice + d * l.inner);
          }
        }
        write_row(
            output + offset, n, /*streaming=*/false, [&](int64_t i, int64_t k) {
              return (load(x + i, k) - load(max_spread + i, k)) -
                     load(work + i, k);
            });
      });
}

// The backward with fewer inner positions than a vector needs no transpose:
// each (slice, inner position)'s sum of grad_output by scalar adds, spread
// over the slice's elements, then one contiguous pass of full vectors over
// the chunk (as the short-row backward), summing along dim in native's
// order. Through transposed rows (three transposes per slice), 256x8x7
// along dim 1 ran at 0.76x eager's speed.
template <typename scalar_t>
void backward_small_inner(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    const ops::LogSoftmaxLayout& l) {
  const int64_t slice = l.dim_size * l.inner;
  for_each_chunk_of_slices<scalar_t>(
      l, 1, [&](int64_t first, int64_t count, scalar_t* spread, int64_t) {
        const int64_t offset = first * slice;
        scalar_t sums[at::vec::Vectorized<scalar_t>::size()];
        for (int64_t s = 0; s < count; ++s) {
          const scalar_t* dy = grad_output + offset + s * slice;
          std::fill_n(sums, l.inner, scalar_t(0));
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int64_t j = 0; j < l.inner; ++j) {
              sums[j] += dy[d * l.inner + j];
            }
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            std::copy_n(sums, l.inner, spread + s * slice + d * l.inner);
          }
        }
        write_row(
            grad_input + offset, count * slice, /*streaming=*/false,
            [&](int64_t i, int64_t n) {
              return load(grad_output + offset + i, n) -
                     exp(load(output + offset + i, n)) * load(spread + i, n);
            });
      });
}

// Vectors of inner positions reduced together along dim by one forward
// task: independent chains hide the latency of maximum() and exp().
constexpr int kInnerVectors = 4;

// One forward task: kVectors vectors of inner positions at `x`, the last
// holding `last_count` of them, reduced along dim together. The count is a
// constant so that a task narrower than four vectors (16 to 63 inner
// positions in float32 on AVX-512) computes no empty vector: with four,
// 16x30x16 along dim 1 paid four exps per element and ran at 0.58x eager.
template <int kVectors, typename scalar_t>
void forward_inner_task(
    const scalar_t* x, scalar_t* y, const ops::LogSoftmaxLayout& l,
    int64_t last_count) {
  using Vec = ComputeVec<scalar_t>;
  using compute_t = at::opmath_type<scalar_t>;
  constexpr compute_t kLowest = -std::numeric_limits<compute_t>::infinity();
  const auto count = [&](int v) {
    return v + 1 < kVectors ? Vec::size() : last_count;
  };
  const auto load = [&](int64_t d, int v) {
    return cpu::load(x + d * l.inner + v * Vec::size(), count(v));
  };
  Vec max[kVectors];
  Vec sum[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    max[v] = Vec(kLowest);
    sum[v] = Vec(0);
  }
  for (int64_t d = 0; d < l.dim_size; ++d) {
    for (int v = 0; v < kVectors; ++v) {
      max[v] = max_ignoring_nan(max[v], load(d, v));
    }
  }
  for (int64_t d = 0; d < l.dim_size; ++d) {
    for (int v = 0; v < kVectors; ++v) {
      sum[v] += exp(load(d, v) - max[v]);
    }
  }
  Vec log_sum[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    log_sum[v] = sum[v].log();
  }
  for (int64_t d = 0; d < l.dim_size; ++d) {
    for (int v = 0; v < kVectors; ++v) {
      store(
          (load(d, v) - max[v]) - log_sum[v], y + d * l.inner + v * Vec::size(),
          count(v));
    }
  }
}

template <typename scalar_t>
void forward_inner(
    const scalar_t* input, scalar_t* output, ops::LogSoftmaxLayout l) {
  using Vec = ComputeVec<scalar_t>;
  constexpr int64_t kWidth = kInnerVectors * Vec::size();
  const int64_t chunks = (l.inner + kWidth - 1) / kWidth;
  at::parallel_for(
      0, l.outer * chunks,
      std::max<int64_t>(1, kGrainElements / (l.dim_size * kWidth)),
      [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o = task / chunks;
          const int64_t j = (task % chunks) * kWidth;
          const scalar_t* x = input + o * l.dim_size * l.inner + j;
          scalar_t* y = output + o * l.dim_size * l.inner + j;
          const int64_t width = std::min(kWidth, l.inner - j);
          const int64_t vectors = (width + Vec::size() - 1) / Vec::size();
          const int64_t last_count = width - (vectors - 1) * Vec::size();
          switch (vectors) {
            case 1:
              forward_inner_task<1>(x, y, l, last_count);
              break;
            case 2:
              forward_inner_task<2>(x, y, l, last_count);
              break;
            case 3:
              forward_inner_task<3>(x, y, l, last_count);
              break;
            default:
              forward_inner_task<kInnerVectors>(x, y, l, last_count);
          }
        }
      });
}

// Columns of the inner dimension handled together by one backward task: long
// contiguous runs per dim index keep the hardware prefetcher busy, and a
// task's rows (dim x 6 KB) stay in L2 from the sum pass to the output pass.
constexpr int64_t kInnerBlock = 1536;

template <typename scalar_t>
void backward_inner(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    ops::LogSoftmaxLayout l, bool streaming) {
  const int64_t blocks = (l.inner + kInnerBlock - 1) / kInnerBlock;
  at::parallel_for(
      0, l.outer * blocks,
      std::max<int64_t>(1, kGrainElements / (l.dim_size * kInnerBlock)),
      [&](int64_t begin, int64_t end) {
        using compute_t = at::opmath_type<scalar_t>;
        compute_t sums[kInnerBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o = task / blocks;
          const int64_t j0 = (task % blocks) * kInnerBlock;
          const int64_t width = std::min(kInnerBlock, l.inner - j0);
          const int64_t offset = o * l.dim_size * l.inner + j0;
          std::fill(sums, sums + width, compute_t(0));
          for (int64_t d = 0; d < l.dim_size; ++d) {
            const scalar_t* dy = grad_output + offset + d * l.inner;
            write_row(
                sums, width, /*streaming=*/false,
                [&](int64_t j, int64_t count) {
                  return load(sums + j, count) + load(dy + j, count);
                });
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            const int64_t at = offset + d * l.inner;
            write_row(
                grad_input + at, width, streaming,
                [&](int64_t j, int64_t count) {
                  return load(grad_output + at + j, count) -
                         exp(load(output + at + j, count)) *
                             load(sums + j, count);
                });
          }
        }
        if (streaming) {
          finish_streaming_stores();
        }
      });
}

// Whether `rows` rows of `length` are fewer long rows than threads, which
// share each row's parts rather than leave threads idle.
template <typename scalar_t>
bool few_long_rows(int64_t rows, int64_t length) {
  return is_long_row<scalar_t>(length) && rows < at::get_num_threads();
}

// Task `task` of the threads sharing long rows of `length` cut in `parts`:
// part task % parts of row task / parts, its first element in the tensor and
// its length.
inline LongRowPart long_row_task(int64_t length, int64_t parts, int64_t task) {
  const LongRowPart part = long_row_part(length, task % parts);
  return {task / parts * length + part.begin, part.length};
}

// Fewer rows of at least kLongRowBytes than threads (a batch of one over a
// large vocabulary): the threads share each row's parts, first their
// partials, then, once each row's are combined, their outputs. The parts and
// their order are forward_long_rows's, so the results are the same on any
// number of threads. One thread per row left the other idle: 1x1000000
// inference ran at 0.90x torch.compile, which splits the row.
template <typename scalar_t>
void forward_few_long_rows(
    const scalar_t* x, scalar_t* y, int64_t rows, int64_t length,
    bool streaming) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t parts = long_row_parts(length);
  const auto extent = [&](int64_t task) {
    return long_row_task(length, parts, task);
  };
  std::vector<RowPartial<compute_t>> partials(rows * parts);
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [offset, count] = extent(task);
      partials[task] = long_row_partial(x + offset, count);
    }
  });
  std::vector<RowOffsets<compute_t>> offsets(rows);
  for (int64_t row = 0; row < rows; ++row) {
    offsets[row] =
        combined_partials<scalar_t>(partials.data() + row * parts, parts);
  }
  // The same split of tasks between threads as above: each thread writes
  // the parts it read, from its L2.
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [offset, count] = extent(task);
      write_long_row(
          x + offset, y + offset, count, offsets[task / parts], streaming);
    }
    if (streaming) {
      finish_streaming_stores();
    }
  });
}

// The kernels on contiguous data laid out as `l`, in place or not.
template <typename scalar_t>
void forward_contiguous(
    const scalar_t* x, scalar_t* y, const ops::LogSoftmaxLayout& l) {
  if (l.inner == 1) {
    const int64_t bytes = l.outer * l.dim_size * sizeof(scalar_t);
    if (few_long_rows<scalar_t>(l.outer, l.dim_size)) {
      forward_few_long_rows(
          x, y, l.outer, l.dim_size, bytes >= kStreamedOutputBytes);
      return;
    }
    at::parallel_for(
        0, l.outer, std::max<int64_t>(1, kGrainElements / l.dim_size),
        [&](int64_t begin, int64_t end) {
          const int64_t offset = begin * l.dim_size;
          forward_rows(x + offset, y + offset, end - begin, l.dim_size, bytes);
        });
  } else if (transposes_to_rows<scalar_t>(l)) {
    if (spreads_along_dim(l)) {
      forward_small_inner(x, y, l);
    } else {
      forward_transposed(x, y, l);
    }
  } else {
    forward_inner(x, y, l);
  }
}

// The backward's counterpart of forward_few_long_rows: the threads share
// each row's parts, first their sums of grad_output, then, once each row's
// are added in backward_rows's order, their grad_input. One thread per row
// left the other idle: 1x8388608 float32 ran at 0.93x native.
template <typename scalar_t>
void backward_few_long_rows(
    const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows,
    int64_t length, bool streaming) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t parts = long_row_parts(length);
  const auto extent = [&](int64_t task) {
    return long_row_task(length, parts, task);
  };
  std::vector<compute_t> part_sums(rows * parts);
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [offset, count] = extent(task);
      part_sums[task] = grad_sum(dy + offset, count);
    }
  });
  std::vector<compute_t> sums(rows, 0);
  for (int64_t task = 0; task < rows * parts; ++task) {
    sums[task / parts] += part_sums[task];
  }
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const auto [offset, count] = extent(task);
      write_backward_row(
          dy + offset, y + offset, dx + offset, count, sums[task / parts],
          streaming);
    }
    if (streaming) {
      finish_streaming_stores();
    }
  });
}

template <typename scalar_t>
void backward_contiguous(
    const scalar_t* dy, const scalar_t* y, scalar_t* dx,
    const ops::LogSoftmaxLayout& l, bool streaming) {
  if (l.inner == 1 && few_long_rows<scalar_t>(l.outer, l.dim_size)) {
    backward_few_long_rows(dy, y, dx, l.outer, l.dim_size, streaming);
  } else if (l.inner == 1) {
    at::parallel_for(
        0, l.outer, std::max<int64_t>(1, kGrainElements / l.dim_size),
        [&](int64_t begin, int64_t end) {
          const int64_t offset = begin * l.dim_size;
          backward_rows(
              dy + offset, y + offset, dx + offset, end - begin, l.dim_size,
              streaming);
        });
  } else if (transposes_to_rows<scalar_t>(l)) {
    backward_small_inner(dy, y, dx, l);
  } else {
    backward_inner(dy, y, dx, l, streaming);
  }
}

// Half precision (bfloat16, float16). Along the last dim (the forward of
// rows longer than kShortRow<float>, every backward) and with at least a
// float32 vector of inner positions, the kernels run on the half-precision
// data itself: they load float32 vectors from it and round what they store
// (ComputeVec, load and store in log_softmax_rows.h). Through float32 copies
// the conversions cost three more passes over L2, and bfloat16's rounding a
// dozen instructions a vector: 256x32000 bfloat16 ran at 0.96x native
// forward and 0.94x forward and backward, 16x256000 at 0.95x and 0.81x (two
// threads). The other layouts go through the float32 kernels' transposes
// and spread copies: chunks of whole slices are converted into float32
// buffers that stay in L2, the float32 kernels run on the buffers (their
// at::parallel_for runs inline inside this one's tasks), and the results are
// rounded back: one read and one write of the half-precision tensors, as
// native. A slice larger than a chunk is a chunk of its own (from L2 or
// beyond); with fewer such slices than threads the whole tensor is converted
// instead, so that the threads still share the work.
constexpr int64_t kHalfChunkElements = 1 << 14;

// Whether to convert the whole tensor rather than chunks: fewer slices than
// threads, each larger than a chunk, would leave threads idle.
bool converts_whole_tensor(const ops::LogSoftmaxLayout& l) {
  return l.dim_size * l.inner > kHalfChunkElements &&
         l.outer < at::get_num_threads();
}

// Calls chunk_fn(first_slice, slice_count, buffers) for chunks of whole
// slices, in parallel, with `buffer_count` float32 buffers of a chunk each.
template <typename ChunkFn>
void for_each_half_chunk(
    const ops::LogSoftmaxLayout& l, int buffer_count, const ChunkFn& chunk_fn) {
  const int64_t slice = l.dim_size * l.inner;
  const int64_t per_chunk =
      std::min(l.outer, std::max<int64_t>(1, kHalfChunkElements / slice));
  const int64_t chunks = (l.outer + per_chunk - 1) / per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const auto buffers = std::make_unique_for_overwrite<float[]>(
        buffer_count * per_chunk * slice);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * per_chunk;
      chunk_fn(first, std::min(per_chunk, l.outer - first), buffers.get());
    }
  });
}

// Whole-tensor conversions, shared by the threads.
template <typename From, typename To, typename ConvertFn>
void convert_in_parallel(
    const From* src, To* dst, int64_t n, const ConvertFn& convert) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
    convert(src + begin, dst + begin, end - begin);
  });
}

template <typename half_t>
void forward_half(const half_t* x, half_t* y, const ops::LogSoftmaxLayout& l) {
  const int64_t slice = l.dim_size * l.inner;
  if (l.inner == 1 && few_long_rows<half_t>(l.outer, l.dim_size)) {
    forward_few_long_rows(x, y, l.outer, l.dim_size, /*streaming=*/false);
    return;
  }
  if (l.inner == 1 && l.dim_size > kShortRow<float>) {
    const int64_t bytes = l.outer * l.dim_size * sizeof(half_t);
    const bool long_rows = is_long_row<half_t>(l.dim_size);
    for_each_block_of_rows(l, [&](int64_t offset, int64_t rows) {
      if (long_rows) {
        forward_long_rows(
            x + offset, y + offset, rows, l.dim_size, /*streaming=*/false);
      } else {
        forward_rows_along(
            x + offset, y + offset, rows, l.dim_size, bytes >= kPrefetchBytes);
      }
    });
    return;
  }
  if (l.inner > 1 && !transposes_to_rows<float>(l)) {
    forward_inner(x, y, l);
    return;
  }
  if (converts_whole_tensor(l)) {
    const auto buffer =
        std::make_unique_for_overwrite<float[]>(l.outer * slice);
    convert_in_parallel(
        x, buffer.get(), l.outer * slice, half_to_float<half_t>);
    forward_contiguous<float>(buffer.get(), buffer.get(), l);
    convert_in_parallel(
        buffer.get(), y, l.outer * slice, float_to_half<half_t>);
    return;
  }
  for_each_half_chunk(l, 1, [&](int64_t first, int64_t count, float* buffer) {
    const int64_t n = count * slice;
    half_to_float(x + first * slice, buffer, n);
    forward_contiguous<float>(buffer, buffer, {count, l.dim_size, l.inner});
    float_to_half(buffer, y + first * slice, n);
  });
}

template <typename half_t>
void backward_half(
    const half_t* dy, const half_t* y, half_t* dx,
    const ops::LogSoftmaxLayout& l) {
  const int64_t slice = l.dim_size * l.inner;
  if (l.inner == 1 && few_long_rows<half_t>(l.outer, l.dim_size)) {
    backward_few_long_rows(dy, y, dx, l.outer, l.dim_size, /*streaming=*/false);
    return;
  }
  if (l.inner == 1) {
    for_each_block_of_rows(l, [&](int64_t offset, int64_t rows) {
      backward_rows(
          dy + offset, y + offset, dx + offset, rows, l.dim_size,
          /*streaming=*/false);
    });
    return;
  }
  if (!transposes_to_rows<float>(l)) {
    backward_inner(dy, y, dx, l, /*streaming=*/false);
    return;
  }
  if (converts_whole_tensor(l)) {
    const int64_t n = l.outer * slice;
    const auto buffers = std::make_unique_for_overwrite<float[]>(2 * n);
    float* grad = buffers.get();
    float* out = grad + n;
    convert_in_parallel(dy, grad, n, half_to_float<half_t>);
    convert_in_parallel(y, out, n, half_to_float<half_t>);
    backward_contiguous<float>(grad, out, grad, l, /*streaming=*/false);
    convert_in_parallel(grad, dx, n, float_to_half<half_t>);
    return;
  }
  const auto run = [&](int64_t first, int64_t count, float* grad, float* out) {
    const int64_t n = count * slice;
    half_to_float(dy + first * slice, grad, n);
    half_to_float(y + first * slice, out, n);
    backward_contiguous<float>(
        grad, out, grad, {count, l.dim_size, l.inner}, /*streaming=*/false);
    float_to_half(grad, dx + first * slice, n);
  };
  const int64_t per_chunk =
      std::min(l.outer, std::max<int64_t>(1, kHalfChunkElements / slice));
  for_each_half_chunk(l, 2, [&](int64_t first, int64_t count, float* buffers) {
    run(first, count, buffers, buffers + per_chunk * slice);
  });
}

void log_softmax_forward(const ops::LogSoftmaxTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.input.scalar_type(), "log_softmax_cpu", [&] {
        const scalar_t* x = t.input.const_data_ptr<scalar_t>();
        scalar_t* y = t.output.mutable_data_ptr<scalar_t>();
        if constexpr (is_half_precision_v<scalar_t>) {
          forward_half(x, y, t.layout);
        } else {
          forward_contiguous(x, y, t.layout);
        }
      });
}

void log_softmax_backward(const ops::LogSoftmaxBackwardTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, t.output.scalar_type(),
      "log_softmax_backward_cpu", [&] {
        const scalar_t* dy = t.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = t.output.const_data_ptr<scalar_t>();
        scalar_t* dx = t.grad_input.mutable_data_ptr<scalar_t>();
        if constexpr (is_half_precision_v<scalar_t>) {
          backward_half(dy, y, dx, t.layout);
        } else {
          backward_contiguous(
              dy, y, dx, t.layout, use_streaming_stores(t.grad_input));
        }
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(log_softmax_forward_stub, &log_softmax_forward);
PTFAST_REGISTER_ISA_KERNEL(log_softmax_backward_stub, &log_softmax_backward);

}  // namespace ptfast::cpu
