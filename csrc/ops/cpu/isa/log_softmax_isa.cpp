// Vectorised CPU kernels of log_softmax and its backward. Compiled once per
// instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// The tensor is viewed as (outer, dim_size, inner). When dim is the last one
// (inner == 1) each row is reduced along its length, a row shorter than a
// vector being one masked vector; otherwise a vector of `inner` positions is
// reduced together along dim.
//
//   forward   y = (x - max) - log(sum(exp(x - max)))
//   backward  dx = dy - exp(y) * sum(dy)
//
// Both are bound by memory on rows beyond the caches: each pass over a row
// prefetches what the next pass or row needs.
#include "ops/cpu/log_softmax_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace ptfast::cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

// The first `count` lanes from `data`, the others set to `fill`.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> load_partial(
    const scalar_t* data, int64_t count, scalar_t fill) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return Vec::set(Vec(fill), Vec::loadu(data, count), count);
}

// A backward's grad_input from this size up is written with streaming
// (non-temporal) stores: whole cache lines go to memory without first being
// read in, a third of the output pass's traffic, and the inputs stay cached.
// Smaller ones stay in cache for their consumer. The forward's output is
// stored normally: its backward (or the next layer) reads it soon.
constexpr int64_t kStreamingBytes = 24 << 20;

bool use_streaming_stores(const at::Tensor& grad_input) {
  return grad_input.nbytes() >= kStreamingBytes;
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

// data[0, count) for count up to the vector's size, zeros past it.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> load(const scalar_t* data, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return count == Vec::size() ? Vec::loadu(data) : Vec::loadu(data, count);
}

// Rows whose sums share one vector logarithm (as native does): short rows
// would otherwise pay a whole vector log each. A group spans at most this many
// bytes of input, so that it is still in L1 for the output pass.
constexpr int64_t kGroupBytes = 16 << 10;

template <typename scalar_t>
void forward_last_dim(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr scalar_t kLowest = -std::numeric_limits<scalar_t>::infinity();
  const int64_t full = length - length % Vec::size();
  const int64_t rest = length - full;
  const int64_t group = std::clamp<int64_t>(
      kGroupBytes / (length * static_cast<int64_t>(sizeof(scalar_t))), 1,
      Vec::size());
  at::parallel_for(
      0, rows, std::max<int64_t>(1, kGrainElements / length),
      [&](int64_t begin, int64_t end) {
        scalar_t maxima[Vec::size()];
        scalar_t sums[Vec::size()];
        for (int64_t first = begin; first < end; first += group) {
          const int64_t count = std::min(group, end - first);
          for (int64_t r = 0; r < count; ++r) {
            const scalar_t* x = input + (first + r) * length;
            Vec max_v(kLowest);
            for (int64_t i = 0; i < full; i += Vec::size()) {
              max_v = at::vec::maximum(max_v, Vec::loadu(x + i));
            }
            if (rest > 0) {
              max_v = at::vec::maximum(
                  max_v, load_partial(x + full, rest, kLowest));
            }
            maxima[r] = at::vec::vec_reduce_all<scalar_t>(
                [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_v);
            // This pass computes; the memory system meanwhile fetches the
            // next row and the lines this row's output goes to.
            const Vec max(maxima[r]);
            const scalar_t* next_x = first + r + 1 < end ? x + length : nullptr;
            scalar_t* y = output + (first + r) * length;
            Vec sum_v(0);
            for (int64_t i = 0; i < full; i += Vec::size()) {
              if (next_x != nullptr) {
                prefetch_for_read(next_x + i);
              }
              prefetch_for_write(y + i);
              sum_v += (Vec::loadu(x + i) - max).exp();
            }
            if (rest > 0) {
              sum_v += (load_partial(x + full, rest, kLowest) - max).exp();
            }
            sums[r] = at::vec::vec_reduce_all<scalar_t>(
                [](Vec& a, Vec& b) { return a + b; }, sum_v);
          }
          // Native takes the logarithm of its row sums with the vectorised
          // log too; std::log can differ in the last bit.
          load(sums, count).log().store(sums, count);
          for (int64_t r = 0; r < count; ++r) {
            const scalar_t* x = input + (first + r) * length;
            const Vec max(maxima[r]);
            const Vec log_sum(sums[r]);
            write_row(output + (first + r) * length, length,
                      /*streaming=*/false, [&](int64_t i, int64_t n) {
                        return (load(x + i, n) - max) - log_sum;
                      });
          }
        }
      });
}

// Vectors of inner positions reduced together along dim by one forward
// task: independent chains hide the latency of maximum() and exp().
constexpr int kInnerVectors = 4;

template <typename scalar_t>
void forward_inner(
    const scalar_t* input, scalar_t* output, ops::LogSoftmaxLayout l) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr scalar_t kLowest = -std::numeric_limits<scalar_t>::infinity();
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
          // Lanes of vector v: the first count[v] (possibly 0) are inside.
          int64_t count[kInnerVectors];
          for (int v = 0; v < kInnerVectors; ++v) {
            count[v] = std::clamp<int64_t>(
                l.inner - j - v * Vec::size(), 0, Vec::size());
          }
          const auto load = [&](int64_t d, int v) {
            const scalar_t* at = x + d * l.inner + v * Vec::size();
            if (count[v] == Vec::size()) {
              return Vec::loadu(at);
            }
            return count[v] > 0 ? Vec::loadu(at, count[v]) : Vec(0);
          };
          Vec max[kInnerVectors];
          Vec sum[kInnerVectors];
          for (int v = 0; v < kInnerVectors; ++v) {
            max[v] = Vec(kLowest);
            sum[v] = Vec(0);
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int v = 0; v < kInnerVectors; ++v) {
              max[v] = at::vec::maximum(max[v], load(d, v));
            }
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int v = 0; v < kInnerVectors; ++v) {
              sum[v] += (load(d, v) - max[v]).exp();
            }
          }
          Vec log_sum[kInnerVectors];
          for (int v = 0; v < kInnerVectors; ++v) {
            log_sum[v] = sum[v].log();
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            for (int v = 0; v < kInnerVectors; ++v) {
              if (count[v] > 0) {
                ((load(d, v) - max[v]) - log_sum[v])
                    .store(y + d * l.inner + v * Vec::size(), count[v]);
              }
            }
          }
        }
      });
}

template <typename scalar_t>
void backward_last_dim(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    int64_t rows, int64_t length, bool streaming) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t full = length - length % Vec::size();
  const int64_t rest = length - full;
  at::parallel_for(
      0, rows, std::max<int64_t>(1, kGrainElements / length),
      [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* dy = grad_output + row * length;
          const scalar_t* y = output + row * length;
          scalar_t* dx = grad_input + row * length;
          // The sum waits on dy's loads; meanwhile the lines of y and dx
          // that the next pass reads and writes are fetched.
          Vec sum_v(0);
          for (int64_t i = 0; i < full; i += Vec::size()) {
            prefetch_for_read(y + i);
            if (!streaming) {
              prefetch_for_write(dx + i);
            }
            sum_v += Vec::loadu(dy + i);
          }
          if (rest > 0) {
            sum_v += Vec::loadu(dy + full, rest);
          }
          const Vec sum = Vec(at::vec::vec_reduce_all<scalar_t>(
              [](Vec& a, Vec& b) { return a + b; }, sum_v));
          write_row(dx, length, streaming, [&](int64_t i, int64_t count) {
            return load(dy + i, count) - load(y + i, count).exp() * sum;
          });
        }
        if (streaming) {
          finish_streaming_stores();
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
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t blocks = (l.inner + kInnerBlock - 1) / kInnerBlock;
  at::parallel_for(
      0, l.outer * blocks,
      std::max<int64_t>(1, kGrainElements / (l.dim_size * kInnerBlock)),
      [&](int64_t begin, int64_t end) {
        scalar_t sums[kInnerBlock];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o = task / blocks;
          const int64_t j0 = (task % blocks) * kInnerBlock;
          const int64_t width = std::min(kInnerBlock, l.inner - j0);
          const int64_t offset = o * l.dim_size * l.inner + j0;
          std::fill(sums, sums + width, scalar_t(0));
          for (int64_t d = 0; d < l.dim_size; ++d) {
            const scalar_t* dy = grad_output + offset + d * l.inner;
            write_row(sums, width, /*streaming=*/false,
                      [&](int64_t j, int64_t count) {
                        return load(sums + j, count) + load(dy + j, count);
                      });
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            const int64_t at = offset + d * l.inner;
            write_row(grad_input + at, width, streaming,
                      [&](int64_t j, int64_t count) {
                        return load(grad_output + at + j, count) -
                            load(output + at + j, count).exp() *
                                load(sums + j, count);
                      });
          }
        }
        if (streaming) {
          finish_streaming_stores();
        }
      });
}

void log_softmax_forward(const ops::LogSoftmaxTensors& t) {
  const ops::LogSoftmaxLayout& l = t.layout;
  AT_DISPATCH_FLOATING_TYPES(t.input.scalar_type(), "log_softmax_cpu", [&] {
    const scalar_t* x = t.input.const_data_ptr<scalar_t>();
    scalar_t* y = t.output.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      forward_last_dim(x, y, l.outer, l.dim_size);
    } else {
      forward_inner(x, y, l);
    }
  });
}

void log_softmax_backward(const ops::LogSoftmaxBackwardTensors& t) {
  const ops::LogSoftmaxLayout& l = t.layout;
  AT_DISPATCH_FLOATING_TYPES(
      t.output.scalar_type(), "log_softmax_backward_cpu", [&] {
        const scalar_t* dy = t.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = t.output.const_data_ptr<scalar_t>();
        scalar_t* dx = t.grad_input.mutable_data_ptr<scalar_t>();
        if (l.inner == 1) {
          backward_last_dim(
              dy, y, dx, l.outer, l.dim_size,
              use_streaming_stores(t.grad_input));
        } else {
          backward_inner(dy, y, dx, l, use_streaming_stores(t.grad_input));
        }
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(log_softmax_forward_stub, &log_softmax_forward);
PTFAST_REGISTER_ISA_KERNEL(log_softmax_backward_stub, &log_softmax_backward);

}  // namespace ptfast::cpu
