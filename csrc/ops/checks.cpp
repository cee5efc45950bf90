// Argument checks that more than one operator makes.
#include "ops/checks.h"

#include <c10/util/Exception.h>

namespace ptfast::ops {

void check_floating(
    const char* op, const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_TYPE(
      at::isFloatingType(tensor.scalar_type()), op, ": `", name,
      "` must be a floating-point tensor, got ", tensor.scalar_type());
}

void check_cpu_dtype(
    const char* op, const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble,
      op, ": `", name, "` must be float32 or float64 on CPU, got ",
      tensor.scalar_type());
}

}  // namespace ptfast::ops
