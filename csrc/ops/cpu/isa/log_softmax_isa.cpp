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
#include "ops/cpu/log_softmax_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

namespace ptfast::cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

struct Layout {
  int64_t outer, dim_size, inner;
};

Layout layout_of(const at::Tensor& tensor, int64_t dim) {
  const auto sizes = tensor.sizes();
  Layout layout{1, tensor.dim() == 0 ? 1 : sizes[dim], 1};
  for (int64_t d = 0; d < dim; ++d) {
    layout.outer *= sizes[d];
  }
  for (int64_t d = dim + 1; d < tensor.dim(); ++d) {
    layout.inner *= sizes[d];
  }
  return layout;
}

// The first `count` lanes from `data`, the others set to `fill`.
template <typename scalar_t>
at::vec::Vectorized<scalar_t> load_partial(
    const scalar_t* data, int64_t count, scalar_t fill) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return Vec::set(Vec(fill), Vec::loadu(data, count), count);
}

template <typename scalar_t>
void forward_last_dim(
    const scalar_t* input, scalar_t* output, int64_t rows, int64_t length) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr scalar_t kLowest = -std::numeric_limits<scalar_t>::infinity();
  const int64_t full = length - length % Vec::size();
  const int64_t rest = length - full;
  at::parallel_for(
      0, rows, std::max<int64_t>(1, kGrainElements / length),
      [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* x = input + row * length;
          scalar_t* y = output + row * length;
          Vec max_v(kLowest);
          for (int64_t i = 0; i < full; i += Vec::size()) {
            max_v = at::vec::maximum(max_v, Vec::loadu(x + i));
          }
          if (rest > 0) {
            max_v = at::vec::maximum(
                max_v, load_partial(x + full, rest, kLowest));
          }
          const Vec max = Vec(at::vec::vec_reduce_all<scalar_t>(
              [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_v));
          Vec sum_v(0);
          for (int64_t i = 0; i < full; i += Vec::size()) {
            sum_v += (Vec::loadu(x + i) - max).exp();
          }
          if (rest > 0) {
            sum_v += (load_partial(x + full, rest, kLowest) - max).exp();
          }
          const Vec log_sum = Vec(std::log(at::vec::vec_reduce_all<scalar_t>(
              [](Vec& a, Vec& b) { return a + b; }, sum_v)));
          for (int64_t i = 0; i < full; i += Vec::size()) {
            ((Vec::loadu(x + i) - max) - log_sum).store(y + i);
          }
          if (rest > 0) {
            ((Vec::loadu(x + full, rest) - max) - log_sum).store(y + full, rest);
          }
        }
      });
}

// Vectors of inner positions reduced together along dim by one forward
// task: independent chains hide the latency of maximum() and exp().
constexpr int kInnerVectors = 4;

template <typename scalar_t>
void forward_inner(const scalar_t* input, scalar_t* output, Layout l) {
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
    int64_t rows, int64_t length) {
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
          Vec sum_v(0);
          for (int64_t i = 0; i < full; i += Vec::size()) {
            sum_v += Vec::loadu(dy + i);
          }
          if (rest > 0) {
            sum_v += Vec::loadu(dy + full, rest);
          }
          const Vec sum = Vec(at::vec::vec_reduce_all<scalar_t>(
              [](Vec& a, Vec& b) { return a + b; }, sum_v));
          for (int64_t i = 0; i < full; i += Vec::size()) {
            (Vec::loadu(dy + i) - Vec::loadu(y + i).exp() * sum).store(dx + i);
          }
          if (rest > 0) {
            (Vec::loadu(dy + full, rest) -
             Vec::loadu(y + full, rest).exp() * sum)
                .store(dx + full, rest);
          }
        }
      });
}

// Columns of the inner dimension handled together by one backward task: long
// contiguous runs per dim index keep the hardware prefetcher busy.
constexpr int64_t kInnerBlock = 512;

template <typename scalar_t>
void backward_inner(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    Layout l) {
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
            for (int64_t j = 0; j < width; j += Vec::size()) {
              const int64_t count = std::min<int64_t>(Vec::size(), width - j);
              (Vec::loadu(sums + j, count) + Vec::loadu(dy + j, count))
                  .store(sums + j, count);
            }
          }
          for (int64_t d = 0; d < l.dim_size; ++d) {
            const int64_t at = offset + d * l.inner;
            for (int64_t j = 0; j < width; j += Vec::size()) {
              const int64_t count = std::min<int64_t>(Vec::size(), width - j);
              (Vec::loadu(grad_output + at + j, count) -
               Vec::loadu(output + at + j, count).exp() *
                   Vec::loadu(sums + j, count))
                  .store(grad_input + at + j, count);
            }
          }
        }
      });
}

void log_softmax_forward(
    const at::Tensor& input, const at::Tensor& output, int64_t dim) {
  const Layout l = layout_of(input, dim);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "log_softmax_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      forward_last_dim(x, y, l.outer, l.dim_size);
    } else {
      forward_inner(x, y, l);
    }
  });
}

void log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& grad_input, int64_t dim) {
  const Layout l = layout_of(output, dim);
  AT_DISPATCH_FLOATING_TYPES(
      output.scalar_type(), "log_softmax_backward_cpu", [&] {
        const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = output.const_data_ptr<scalar_t>();
        scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
        if (l.inner == 1) {
          backward_last_dim(dy, y, dx, l.outer, l.dim_size);
        } else {
          backward_inner(dy, y, dx, l);
        }
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(log_softmax_forward_stub, &log_softmax_forward);
PTFAST_REGISTER_ISA_KERNEL(log_softmax_backward_stub, &log_softmax_backward);

}  // namespace ptfast::cpu
