// Argument checks that more than one operator makes. `op` names the operator
// in the message (e.g. "ptfast.log_softmax"), `name` the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace ptfast::ops {

// A floating-point dtype, as every ptfast operator computes in one.
void check_floating(const char* op, const at::Tensor& tensor, const char* name);

// float32, float64, bfloat16 or float16: the dtypes the CPU kernels take
// (the half-precision ones computing in float32).
void check_cpu_dtype(
    const char* op, const at::Tensor& tensor, const char* name);

}  // namespace ptfast::ops
