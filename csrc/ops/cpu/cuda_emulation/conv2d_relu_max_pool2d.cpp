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
#include "ops/cuda/conv2d_relu_max_pool2d_host.h"

#include <torch/library.h>

namespace ptfast::cuda {
namespace {

namespace cb = conv_block;

// The block size of the GPU launches; the grid-stride loop below covers
// every item whatever the split, as the GPU's does.
constexpr int kThreads = 256;

class EmulatedLaunch {
 public:
  explicit EmulatedLaunch(const at::Tensor& /*input*/) {}

  template <typename scalar_t, typename code_t, typename index_t>
  void epilogue(
      const cb::EpilogueArgs<scalar_t, code_t, index_t>& args,
      index_t items) const {
    run(items, [&](index_t item) { cb::epilogue_item(args, item); });
  }

  template <typename scalar_t, typename code_t, typename index_t>
  void conv_gradient(
      const cb::ConvGradientArgs<scalar_t, code_t, index_t>& args,
      index_t items) const {
    run(items, [&](index_t item) { cb::conv_gradient_item(args, item); });
  }

  template <typename scalar_t, typename code_t, typename index_t>
  void direct_forward(
      const cb::DirectForwardArgs<scalar_t, code_t, index_t>& args,
      index_t items) const {
    run(items, [&](index_t item) { cb::direct_forward_item(args, item); });
  }

 private:
  template <typename index_t, typename Body>
  static void run(index_t items, const Body& body) {
    emulate_launch(blocks_for(items, kThreads), kThreads, [&](ThreadIndex t) {
      cb::for_each_item(t, items, body);
    });
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(ptfast, m) {
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

TORCH_LIBRARY_IMPL(ptfast, CPU, m) {
  m.impl(
      "_cuda_emulated_conv2d_relu_max_pool2d_with_codes",
      &ops::ForwardKernels<&cb::forward<EmulatedLaunch>>::with_codes);
  m.impl(
      "_cuda_emulated_conv2d_relu_max_pool2d_backward",
      &cb::backward<EmulatedLaunch>);
}

}  // namespace ptfast::cuda
