// Entry points of the vectorised CPU kernels of log_softmax
// (csrc/ops/cpu/isa/), one copy per instruction set. Tensors arrive
// validated, contiguous and allocated, with their layout.
#pragma once

#include "ops/cpu/isa_dispatch.h"
#include "ops/log_softmax.h"

#include <ATen/core/Tensor.h>

namespace ptfast::cpu {

using LogSoftmaxForwardFn = void (*)(const ops::LogSoftmaxTensors&);
using LogSoftmaxBackwardFn = void (*)(const ops::LogSoftmaxBackwardTensors&);

extern IsaDispatch<LogSoftmaxForwardFn> log_softmax_forward_stub;
extern IsaDispatch<LogSoftmaxBackwardFn> log_softmax_backward_stub;

}  // namespace ptfast::cpu
