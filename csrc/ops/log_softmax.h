// log_softmax and its backward: calls through the dispatcher, and the
// argument checks shared by the backends.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace ptfast::ops
