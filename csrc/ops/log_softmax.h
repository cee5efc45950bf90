// log_softmax and its backward, called through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace ptfast::ops {

at::Tensor log_softmax(const at::Tensor& self, int64_t dim);

at::Tensor log_softmax_backward(
    const at::Tensor& grad_output, const at::Tensor& output, int64_t dim);

}  // namespace ptfast::ops
