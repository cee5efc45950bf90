// Argument checks that more than one operator makes. `op` names the operator
// in the message (e.g. "ptfast.log_softmax"), `name` the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace ptfast::ops {

// A floating-point dtype, as every ptfast operator computes in one.
void check_floating(const char* op, const at::Tensor& tensor, const char* name);

// float32 or float64: the dtypes the CPU kernels are compiled for.
void check_cpu_dtype(
    const char* op, const at::Tensor& tensor, const char* name);

}  // namespace ptfast::ops
