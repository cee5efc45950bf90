// The CUDA fused conv2d -> ReLU -> max_pool2d operator run on the CPU: the
// host code of csrc/ops/cuda/conv2d_relu_max_pool2d_host.h with a Launch
// that runs the kernel bodies over every item of each launch instead of
// launching them (csrc/ops/cuda/launch.h says why). ATen's convolution and
// convolution_backward are the CPU's here and cuDNN's on the GPU; the
// kernels around them are the same code.
//
// Private ops for the test suite, same schemas as the real ones:
//   _cuda_emulated_conv2d_relu_max_pool2d_with_codes
//   _cuda_emulated_conv2d_relu_max_pool2d_backward
// and, for the tests to check which direct kernel a call exercises,
//   _cuda_conv2d_relu_max_pool2d_direct_kernel
#include "ops/cuda/conv2d_relu_max_pool2d_host.h"

#include <torch/library.h>

#include <string>
#include <vector>

namespace ptfast::cuda {
namespace {

namespace cb = conv_block;

// The block size of the GPU launches; the grid-stride loop below covers
// every item whatever the split, as the GPU's does.
constexpr int kThreads = 256;

class EmulatedLaunch {
 public:
  explicit EmulatedLaunch(const at::Tensor& /*input*/) {}

  // items_kernel: the grid-stride loop over every thread of the launch.
  template <typename Args, typename index_t>
  void items(const Args& args, index_t items) const {
    emulate_launch(blocks_for(items, kThreads), kThreads, [&](ThreadIndex t) {
      cb::for_each_item(
          t, items, [&](index_t item) { cb::compute_item(args, item); });
    });
  }

  // Phase by phase, as direct_forward_tiled_kernel runs them between its
  // barriers; each thread's sums live across the phases as its registers do.
  template <typename scalar_t, int PKH, int PKW, int KH, int KW>
  void direct_forward_tiled(
      const cb::TiledForwardArgs<scalar_t, int32_t>& args,
      const cb::TiledLaunchShape& shape) const {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> shared(shape.shared_bytes / sizeof(acc_t));
    acc_t* tile_input = shared.data();
    acc_t* tile_weight = tile_input + args.input_rows * args.input_cols;
    std::vector<cb::TiledSums<acc_t, PKH, PKW>> sums(shape.threads);
    const int threads = static_cast<int>(shape.threads);
    for (int64_t block = 0; block < shape.blocks; ++block) {
      const cb::Tile<int32_t> tile = cb::tile_of_block(args, block);
      const auto phase = [&](const auto& body) {
        emulate_block_phase(block, shape.blocks, threads, body);
      };
      phase([&](ThreadIndex t) { cb::start_tile(args, tile, sums[t.thread]); });
      for (int32_t c = 0; c < args.d.in_group; ++c) {
        phase([&](ThreadIndex t) {
          cb::stage_input_channel(args, tile, c, t, tile_input, tile_weight);
        });
        phase([&](ThreadIndex t) {
          cb::accumulate_input_channel<KH, KW>(
              args, tile, t, tile_input, tile_weight, sums[t.thread]);
        });
      }
      phase([&](ThreadIndex t) {
        cb::finish_tile(args, tile, t, sums[t.thread]);
      });
    }
  }
};

// The direct forward kernel a CUDA call with these arguments runs (see
// direct_forward_kernel_name), so the tests can check they cover each.
std::string direct_forward_kernel(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode) {
  const auto params = ops::make_conv2d_relu_max_pool2d_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  const auto shape = ops::check_conv2d_relu_max_pool2d_inputs(
      input, weight, std::nullopt, params);
  return cb::direct_forward_kernel_name(shape, params, input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
  m.def(
      "_cuda_conv2d_relu_max_pool2d_direct_kernel(Tensor input, "
      "Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int[2] pool_kernel_size, int[2] pool_stride, "
      "int[2] pool_padding, bool ceil_mode) -> str");
  m.def(
      "_cuda_emulated_conv2d_relu_max_pool2d_with_codes(Tensor input, "
      "Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int[2] pool_kernel_size, "
      "int[2] pool_stride, int[2] pool_padding, bool ceil_mode) "
      "-> (Tensor, Tensor)");
  m.def(
      "_cuda_emulated_conv2d_relu_max_pool2d_backward(Tensor grad_output, "
      "Tensor input, Tensor weight, Tensor codes, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int[2] pool_kernel_size, "
      "int[2] pool_stride, int[2] pool_padding, bool ceil_mode, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ptfast, CompositeExplicitAutograd, m) {
  m.impl("_cuda_conv2d_relu_max_pool2d_direct_kernel", &direct_forward_kernel);
}

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl(
      "_cuda_emulated_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&cb::forward<EmulatedLaunch>>::with_codes);
  m.impl(
      "_cuda_emulated_conv2d_relu_max_pool2d_backward",
      &cb::backward<EmulatedLaunch>);
}

}  // namespace ptfast::cuda
