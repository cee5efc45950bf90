// The log_softmax CUDA kernels (csrc/ops/cuda/log_softmax_kernel.cu) run on
// the CPU: the same host rule picks the kernel and launch shape, and the same
// bodies (log_softmax_bodies.h) run thread by thread and phase by phase, with
// barriers as phase boundaries, shared memory as per-block vectors and warp
// shuffles in the GPU's order (launch.h). Private operators for the tests:
//   _cuda_emulated_log_softmax, _cuda_emulated_log_softmax_backward (CPU);
//   _cuda_log_softmax_kernel: the kernel the rule picks for a layout.
// Both plan for an H100 (kH100), whose launches they reproduce.
#include "ops/checks.h"
#include "ops/cuda/launch.h"
#include "ops/cuda/log_softmax_bodies.h"
#include "ops/log_softmax.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace ptfast::cuda::log_softmax {
namespace {

constexpr const char* kOp = "ptfast._cuda_emulated_log_softmax";

// The butterfly of every warp of a block, over one value a thread.
template <typename T, typename Combine>
void emulate_warp_butterflies(
    std::vector<T>& values, int width, const Combine& combine) {
  for (size_t warp = 0; warp < values.size(); warp += kWarp) {
    std::vector<T> lanes(values.begin() + warp, values.begin() + warp + kWarp);
    emulate_xor_shuffle(lanes, width, combine);
    std::copy(lanes.begin(), lanes.end(), values.begin() + warp);
  }
}

// The kernels' block_reduce after its threads' values: the butterflies, lane
// 0 of each warp storing its partial, a barrier, the fold every thread makes
// (the same for all, so computed once).
template <typename T, typename Combine>
T emulate_block_reduce(std::vector<T> values, const Combine& combine) {
  emulate_warp_butterflies(values, kWarp, combine);
  std::vector<T> partials;
  for (size_t warp = 0; warp < values.size(); warp += kWarp) {
    partials.push_back(values[warp]);
  }
  return fold_partials(
      partials.data(), static_cast<int>(partials.size()), combine);
}

// The kernels' combine_slices: the tree steps, each a phase.
template <typename T, typename Combine>
void emulate_combine_slices(
    std::vector<T>& shared, int64_t block, const LaunchPlan& plan,
    const Combine& combine) {
  for (int half = plan.dim_slices / 2; half > 0; half /= 2) {
    emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
      combine_slices_step(
          shared.data(), t.thread, plan.block_columns, half, combine);
    });
  }
}

template <typename scalar_t, typename index_t>
void forward_warp_rows(
    const scalar_t* input, scalar_t* output, int64_t rows, index_t length,
    const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = plan.row_lanes;
  std::vector<MaxSum<acc_t>> states(plan.threads);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    const ThreadIndex block_start{block, plan.blocks, 0, plan.threads};
    for (int64_t first = warp_rows_first(block_start, lanes); first < rows;
         first += warp_rows_stride(block_start, lanes)) {
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const int64_t row = first + t.thread / lanes;
        states[t.thread] = row < rows ? share_max_sum<false, false>(
                                            input + row * length, length,
                                            t.thread % lanes, lanes)
                                      : empty_max_sum<acc_t>();
      });
      emulate_warp_butterflies(states, lanes, MergeMaxSum{});
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const int64_t row = first + t.thread / lanes;
        if (row < rows) {
          write_share<false>(
              input + row * length, output + row * length, length,
              t.thread % lanes, lanes, ForwardOutput<acc_t>(states[t.thread]));
        }
      });
    }
  }
}

template <typename scalar_t, typename index_t, bool kVector, bool kShared>
void forward_block_row(
    const scalar_t* input, scalar_t* output, int64_t rows, index_t length,
    const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<MaxSum<acc_t>> states(plan.threads);
  std::vector<scalar_t> copy(kShared ? length : 0);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    for (int64_t row = block; row < rows; row += plan.blocks) {
      const scalar_t* x = input + row * length;
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        states[t.thread] = share_max_sum<kVector, kShared>(
            x, length, t.thread, t.threads, copy.data());
      });
      const ForwardOutput<acc_t> write(
          emulate_block_reduce(states, MergeMaxSum{}));
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        write_share<kVector>(
            kShared ? copy.data() : x, output + row * length, length, t.thread,
            t.threads, write);
      });
    }
  }
}

template <typename scalar_t, typename index_t>
void forward_columns(
    const scalar_t* input, scalar_t* output, const ops::LogSoftmaxLayout& l,
    const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t dim_size = l.dim_size, inner = l.inner;
  emulate_launch(plan.blocks, plan.threads, [&](ThreadIndex t) {
    for (int64_t column = t.global(); column < l.outer * l.inner;
         column += t.grid_threads()) {
      const int64_t start = column_start(l, column);
      const MaxSum<acc_t> s = column_max_sum(
          input + start, dim_size, inner, index_t(0), index_t(1));
      write_column(
          input + start, output + start, dim_size, inner, index_t(0),
          index_t(1), ForwardOutput<acc_t>(s));
    }
  });
}

template <typename scalar_t, typename index_t>
void forward_columns_split_dim(
    const scalar_t* input, scalar_t* output, const ops::LogSoftmaxLayout& l,
    const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t dim_size = l.dim_size, inner = l.inner;
  const int64_t tiles = split_tiles(l, plan.block_columns);
  std::vector<MaxSum<acc_t>> slices(plan.threads);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    for (int64_t tile = block; tile < tiles; tile += plan.blocks) {
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const SplitColumn c =
            split_column(l, plan.block_columns, tile, t.thread);
        slices[t.thread] = c.valid
                               ? column_max_sum(
                                     input + c.start, dim_size, inner,
                                     index_t(c.slice), index_t(plan.dim_slices))
                               : empty_max_sum<acc_t>();
      });
      emulate_combine_slices(slices, block, plan, MergeMaxSum{});
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const SplitColumn c =
            split_column(l, plan.block_columns, tile, t.thread);
        if (c.valid) {
          write_column(
              input + c.start, output + c.start, dim_size, inner,
              index_t(c.slice), index_t(plan.dim_slices),
              ForwardOutput<acc_t>(slices[t.thread % plan.block_columns]));
        }
      });
    }
  }
}

template <typename scalar_t, typename index_t>
void backward_warp_rows(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    int64_t rows, index_t length, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = plan.row_lanes;
  std::vector<acc_t> sums(plan.threads);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    const ThreadIndex block_start{block, plan.blocks, 0, plan.threads};
    for (int64_t first = warp_rows_first(block_start, lanes); first < rows;
         first += warp_rows_stride(block_start, lanes)) {
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const int64_t row = first + t.thread / lanes;
        sums[t.thread] = row < rows ? share_sum<false, false>(
                                          grad_output + row * length, length,
                                          t.thread % lanes, lanes)
                                    : acc_t(0);
      });
      emulate_warp_butterflies(sums, lanes, Add{});
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const int64_t row = first + t.thread / lanes;
        if (row < rows) {
          const int64_t offset = row * length;
          write_share<false>(
              grad_output + offset, output + offset, grad_input + offset,
              length, t.thread % lanes, lanes,
              BackwardGradInput<acc_t>{sums[t.thread]});
        }
      });
    }
  }
}

template <typename scalar_t, typename index_t, bool kVector, bool kShared>
void backward_block_row(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    int64_t rows, index_t length, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> sums(plan.threads);
  std::vector<scalar_t> copy(kShared ? length : 0);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    for (int64_t row = block; row < rows; row += plan.blocks) {
      const int64_t offset = row * length;
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        sums[t.thread] = share_sum<kVector, kShared>(
            grad_output + offset, length, t.thread, t.threads, copy.data());
      });
      const BackwardGradInput<acc_t> write{emulate_block_reduce(sums, Add{})};
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        write_share<kVector>(
            kShared ? copy.data() : grad_output + offset, output + offset,
            grad_input + offset, length, t.thread, t.threads, write);
      });
    }
  }
}

template <typename scalar_t, typename index_t>
void backward_columns(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    const ops::LogSoftmaxLayout& l, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t dim_size = l.dim_size, inner = l.inner;
  emulate_launch(plan.blocks, plan.threads, [&](ThreadIndex t) {
    for (int64_t column = t.global(); column < l.outer * l.inner;
         column += t.grid_threads()) {
      const int64_t start = column_start(l, column);
      const acc_t sum = column_sum(
          grad_output + start, dim_size, inner, index_t(0), index_t(1));
      write_column(
          grad_output + start, output + start, grad_input + start, dim_size,
          inner, index_t(0), index_t(1), BackwardGradInput<acc_t>{sum});
    }
  });
}

template <typename scalar_t, typename index_t>
void backward_columns_split_dim(
    const scalar_t* grad_output, const scalar_t* output, scalar_t* grad_input,
    const ops::LogSoftmaxLayout& l, const LaunchPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t dim_size = l.dim_size, inner = l.inner;
  const int64_t tiles = split_tiles(l, plan.block_columns);
  std::vector<acc_t> slices(plan.threads);
  for (int64_t block = 0; block < plan.blocks; ++block) {
    for (int64_t tile = block; tile < tiles; tile += plan.blocks) {
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const SplitColumn c =
            split_column(l, plan.block_columns, tile, t.thread);
        slices[t.thread] = c.valid
                               ? column_sum(
                                     grad_output + c.start, dim_size, inner,
                                     index_t(c.slice), index_t(plan.dim_slices))
                               : acc_t(0);
      });
      emulate_combine_slices(slices, block, plan, Add{});
      emulate_block_phase(block, plan.blocks, plan.threads, [&](ThreadIndex t) {
        const SplitColumn c =
            split_column(l, plan.block_columns, tile, t.thread);
        if (c.valid) {
          write_column(
              grad_output + c.start, output + c.start, grad_input + c.start,
              dim_size, inner, index_t(c.slice), index_t(plan.dim_slices),
              BackwardGradInput<acc_t>{slices[t.thread % plan.block_columns]});
        }
      });
    }
  }
}

at::Tensor emulated_log_softmax(const at::Tensor& self, int64_t dim) {
  const auto t = ops::prepare_log_softmax(self, dim);
  ops::check_cpu_dtype(kOp, t.input, "self");
  const ops::LogSoftmaxLayout& l = t.layout;
  const LaunchPlan plan = plan_launch(l, t.input.element_size(), kH100);
  if (plan.kernel == Kernel::kNone) {
    return t.output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.input.scalar_type(),
      "_cuda_emulated_log_softmax", [&] {
        const scalar_t* x = t.input.const_data_ptr<scalar_t>();
        scalar_t* y = t.output.mutable_data_ptr<scalar_t>();
        with_index_type(t.input.numel(), [&](auto index) {
          using index_t = decltype(index);
          switch (plan.kernel) {
            case Kernel::kWarpRows:
              forward_warp_rows(x, y, l.outer, index_t(l.dim_size), plan);
              break;
            case Kernel::kBlockRowShared:
            case Kernel::kBlockRowStreamed:
              with_block_row_flags(
                  use_vector_access({x, y}, l.dim_size, sizeof(scalar_t)), plan,
                  [&](auto vector, auto shared) {
                    forward_block_row<
                        scalar_t, index_t, decltype(vector)::value,
                        decltype(shared)::value>(
                        x, y, l.outer, index_t(l.dim_size), plan);
                  });
              break;
            case Kernel::kColumns:
              forward_columns<scalar_t, index_t>(x, y, l, plan);
              break;
            case Kernel::kColumnsSplitDim:
              forward_columns_split_dim<scalar_t, index_t>(x, y, l, plan);
              break;
            case Kernel::kNone:
              break;
          }
        });
      });
  return t.output;
}

at::Tensor emulated_log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim) {
  const auto t = ops::prepare_log_softmax_backward(grad_output, output, dim);
  ops::check_cpu_dtype(kOp, t.output, "output");
  const ops::LogSoftmaxLayout& l = t.layout;
  const LaunchPlan plan = plan_launch(l, t.output.element_size(), kH100);
  if (plan.kernel == Kernel::kNone) {
    return t.grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t.output.scalar_type(),
      "_cuda_emulated_log_softmax_backward", [&] {
        const scalar_t* dy = t.grad_output.const_data_ptr<scalar_t>();
        const scalar_t* y = t.output.const_data_ptr<scalar_t>();
        scalar_t* dx = t.grad_input.mutable_data_ptr<scalar_t>();
        with_index_type(t.output.numel(), [&](auto index) {
          using index_t = decltype(index);
          switch (plan.kernel) {
            case Kernel::kWarpRows:
              backward_warp_rows(dy, y, dx, l.outer, index_t(l.dim_size), plan);
              break;
            case Kernel::kBlockRowShared:
            case Kernel::kBlockRowStreamed:
              with_block_row_flags(
                  use_vector_access({dy, y, dx}, l.dim_size, sizeof(scalar_t)),
                  plan, [&](auto vector, auto shared) {
                    backward_block_row<
                        scalar_t, index_t, decltype(vector)::value,
                        decltype(shared)::value>(
                        dy, y, dx, l.outer, index_t(l.dim_size), plan);
                  });
              break;
            case Kernel::kColumns:
              backward_columns<scalar_t, index_t>(dy, y, dx, l, plan);
              break;
            case Kernel::kColumnsSplitDim:
              backward_columns_split_dim<scalar_t, index_t>(dy, y, dx, l, plan);
              break;
            case Kernel::kNone:
              break;
          }
        });
      });
  return t.grad_input;
}

std::string log_softmax_kernel_name(
    int64_t outer, int64_t dim_size, int64_t inner, int64_t element_size) {
  TORCH_CHECK(
      outer >= 0 && dim_size >= 0 && inner >= 0,
      "ptfast._cuda_log_softmax_kernel: "
      "`outer`, `dim_size` and `inner` must be >= 0, got ",
      outer, ", ", dim_size, ", ", inner);
  TORCH_CHECK(
      element_size == 2 || element_size == 4 || element_size == 8,
      "ptfast._cuda_log_softmax_kernel: `element_size` must be 2, 4 or 8, got ",
      element_size);
  return kernel_name(
      plan_launch({outer, dim_size, inner}, element_size, kH100));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def("_cuda_emulated_log_softmax(Tensor self, int dim) -> Tensor");
  m.def(
      "_cuda_emulated_log_softmax_backward(Tensor grad_output, Tensor output, "
      "int dim) "
      "-> Tensor");
  m.def(
      "_cuda_log_softmax_kernel(int outer, int dim_size, int inner, int "
      "element_size) -> str");
}

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl("_cuda_emulated_log_softmax", &emulated_log_softmax);
  m.impl("_cuda_emulated_log_softmax_backward", &emulated_log_softmax_backward);
}

TORCH_LIBRARY_IMPL(ptfast, CompositeExplicitAutograd, m) {
  m.impl("_cuda_log_softmax_kernel", &log_softmax_kernel_name);
}

}  // namespace ptfast::cuda::log_softmax
