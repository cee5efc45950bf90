// log_softmax and its backward: calls through the dispatcher, and the
// argument checks and allocation shared by the backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ptfast::ops {

at::Tensor log_softmax(const at::Tensor& self, int64_t dim);

at::Tensor _log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim);

// Checks shared by every backend. Each returns `dim` wrapped into
// [0, rank), a 0-d tensor counting as one element as in torch; errors name
// the offending argument.
int64_t check_log_softmax_input(const at::Tensor& self, int64_t dim);

int64_t check_log_softmax_backward_input(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim);

// A contiguous tensor as the kernels view it: (outer, dim_size, inner), with
// `dim` in the middle. A 0-d tensor is (1, 1, 1).
struct LogSoftmaxLayout {
  int64_t outer, dim_size, inner;
};

// What a backend's forward kernel works on: the validated arguments, the
// input made contiguous and the output allocated.
struct LogSoftmaxTensors {
  int64_t dim;  // wrapped into [0, rank)
  LogSoftmaxLayout layout;
  at::Tensor input;   // contiguous
  at::Tensor output;  // like input
};

LogSoftmaxTensors prepare_log_softmax(const at::Tensor& self, int64_t dim);

// The same for a backward kernel.
struct LogSoftmaxBackwardTensors {
  int64_t dim;  // wrapped into [0, rank)
  LogSoftmaxLayout layout;
  at::Tensor grad_output, output;  // contiguous
  at::Tensor grad_input;           // like output
};

LogSoftmaxBackwardTensors prepare_log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim);

}  // namespace ptfast::ops
