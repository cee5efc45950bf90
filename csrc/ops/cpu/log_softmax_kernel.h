// Entry points of the vectorised CPU kernels of log_softmax
// (csrc/ops/cpu/isa/), one copy per instruction set. Tensors arrive
// contiguous and allocated; `dim` is wrapped.
#pragma once

#include "ops/cpu/isa_dispatch.h"

#include <ATen/core/Tensor.h>

namespace ptfast::cpu {

using LogSoftmaxForwardFn = void (*)(
    const at::Tensor& input, const at::Tensor& output, int64_t dim);
using LogSoftmaxBackwardFn = void (*)(
    const at::Tensor& grad_output, const at::Tensor& output,
    const at::Tensor& grad_input, int64_t dim);

extern IsaDispatch<LogSoftmaxForwardFn> log_softmax_forward_stub;
extern IsaDispatch<LogSoftmaxBackwardFn> log_softmax_backward_stub;

}  // namespace ptfast::cpu
