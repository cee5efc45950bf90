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
      tensor.scalar_type() == at::kFloat ||
          tensor.scalar_type() == at::kDouble ||
          tensor.scalar_type() == at::kBFloat16 ||
          tensor.scalar_type() == at::kHalf,
      op, ": `", name,
      "` must be float32, float64, bfloat16 or float16 on CPU, got ",
      tensor.scalar_type());
}

}  // namespace ptfast::ops
