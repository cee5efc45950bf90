// The Python module ptfast._C. Importing it loads this library, whose static
// initialisers register the ptfast operators with the dispatcher; every op is
// reachable through torch.ops.ptfast. The module itself holds:
//
// - the eager entries of the two public ops. torch.ops' binding converts each
//   argument by the schema into a boxed stack and back, about 1.4 us a call
//   (as much as the whole of torch.log_softmax on a small tensor); these take
//   the tensors through pybind11 and call the same dispatcher ops unboxed,
//   ptfast.functional uses
//   them for plain tensors in eager mode and torch.ops everywhere else
//   (compilers, tensor subclasses, __torch_function__ modes), so both reach
//   the same kernels and autograd;
// - the process-wide settings that are not arguments of an op
//   (ptfast.backends), the path a block call would take on a device, and the
//   peak-rate probe of ptfast-bench.
#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/conv_block_path.h"
#include "ops/cpu/conv2d_relu_max_pool2d_path.h"
#include "ops/cpu/peak_flops.h"
#include "ops/cuda/conv2d_relu_max_pool2d_path.h"
#include "ops/log_softmax.h"

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace py = pybind11;

namespace {

// The backend a device name ("cpu" or "cuda") names.
c10::DeviceType backend_device(const std::string& name) {
  if (name == "cpu") {
    return c10::DeviceType::CPU;
  }
  if (name == "cuda") {
    return c10::DeviceType::CUDA;
  }
  throw py::value_error(
      "ptfast.backends: `device` must be 'cpu' or 'cuda', got '" + name + "'");
}

std::string get_conv_block(const std::string& device) {
  return std::string(
      ptfast::ops::conv_block_path_name(
          ptfast::ops::conv_block_policy(backend_device(device))));
}

void set_conv_block(const std::string& device, const py::object& value) {
  const c10::DeviceType device_type = backend_device(device);
  ptfast::ops::ConvBlockPath path = ptfast::ops::ConvBlockPath::kAuto;
  if (!py::isinstance<py::str>(value) ||
      !ptfast::ops::parse_conv_block_path(value.cast<std::string>(), &path)) {
    throw py::value_error(
        "ptfast.backends." + device +
        ": `conv_block` must be 'auto', 'direct' or 'vendor', got " +
        py::repr(value).cast<std::string>());
  }
  ptfast::ops::set_conv_block_policy(device_type, path);
}

// "direct" or "vendor": the path a block call with these arguments takes on
// `device` now (its forward, or its backward). Only shapes (and on the CPU
// the dtype) are read, so meta tensors do.
std::string conv_block_path(
    const std::string& device, const at::Tensor& input,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, bool ceil_mode,
    bool backward) {
  const c10::DeviceType device_type = backend_device(device);
  HANDLE_TH_ERRORS
  const auto params = ptfast::ops::make_conv2d_relu_max_pool2d_params(
      stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, ceil_mode);
  const auto shape = ptfast::ops::check_conv2d_relu_max_pool2d_inputs(
      input, weight, std::nullopt, params);
  const auto pass = backward ? ptfast::ops::ConvBlockPass::kBackward
                             : ptfast::ops::ConvBlockPass::kForward;
  return std::string(
      ptfast::ops::conv_block_path_name(
          device_type == c10::DeviceType::CPU
              ? ptfast::cpu::choose_path(
                    shape, params, pass, input.scalar_type())
              : ptfast::cuda::choose_path(shape, params, pass)));
  END_HANDLE_TH_ERRORS_PYBIND
}

// The GIL is released around the op, as torch's own bindings do; errors
// become the Python exceptions torch.ops would raise (TypeError, ValueError,
// IndexError, ...), warnings Python warnings.
at::Tensor eager_log_softmax(const at::Tensor& self, int64_t dim) {
  HANDLE_TH_ERRORS
  const py::gil_scoped_release no_gil;
  return ptfast::ops::log_softmax(self, dim);
  END_HANDLE_TH_ERRORS_PYBIND
}

at::Tensor eager_conv2d_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, bool ceil_mode) {
  HANDLE_TH_ERRORS
  const py::gil_scoped_release no_gil;
  return ptfast::ops::conv2d_relu_max_pool2d(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size,
      pool_stride, pool_padding, ceil_mode);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def(
      "_log_softmax", &eager_log_softmax,
      "ptfast::log_softmax(self, dim) without torch.ops' boxing.");
  m.def(
      "_conv2d_relu_max_pool2d", &eager_conv2d_relu_max_pool2d,
      "ptfast::conv2d_relu_max_pool2d(...) without torch.ops' boxing.");
  m.def(
      "_get_conv_block", &get_conv_block,
      "The conv-block path policy of a device: 'auto', 'direct' or 'vendor'.");
  m.def("_set_conv_block", &set_conv_block, "Sets a device's policy.");
  m.def(
      "_conv_block_path", &conv_block_path,
      "The path ('direct' or 'vendor') a block call takes on a device.");
  m.def(
      "_peak_fp32_gflops", [] { return ptfast::cpu::peak_fp32_gflops(); },
      py::call_guard<py::gil_scoped_release>(),
      "The CPU's peak float32 rate on torch's threads, for ptfast-bench.");
}
