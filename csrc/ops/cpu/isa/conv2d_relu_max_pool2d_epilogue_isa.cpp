// The vendor path's forward epilogue: ReLU and max-pooling of a conv output
// that ATen's convolution (oneDNN) computed, writing the pooled output and
// the same arg-max codes the direct kernel writes. Compiled once per
// instruction set (see csrc/ops/cpu/isa_dispatch.h).
//
// One pass over the conv output: each plane is copied into a thread-local
// buffer that ends in the pooling's -inf sentinel and slack (the gathers
// read the sentinel for taps outside the plane, the row path loads two
// vectors past a row's start), then pooled by the code the direct forward
// uses, so both paths pick the same arg-max by construction. Half-precision
// conv outputs are pooled in float32 (see epilogue_typed).
#include "ops/cpu/isa/conv2d_relu_max_pool2d_common.h"
#include "ops/cpu/isa/conv2d_relu_max_pool2d_pooling.h"
#include "ops/cpu/isa/half_precision.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace ptfast::cpu {
namespace {

// A half-precision conv output (bfloat16, float16) is converted into the
// float32 buffer, and the pooled float32 values, which are conv outputs
// themselves, convert back exactly: ReLU, pooling and arg-max see the values
// native's half-precision conv2d stored, and pick as native's max_pool2d does.
template <typename scalar_t, typename code_t>
void epilogue_typed(const Conv2dReluMaxPool2dEpilogueArgs& a) {
  constexpr bool kHalf = is_half_precision_v<scalar_t>;
  using pool_t = std::conditional_t<kHalf, float, scalar_t>;
  const auto& s = a.shape;
  const int64_t plane_size = s.conv_h * s.conv_w;
  const int64_t pooled_size = s.pooled_h * s.pooled_w;
  const scalar_t* conv = a.conv.const_data_ptr<scalar_t>();
  scalar_t* output = a.output.mutable_data_ptr<scalar_t>();
  code_t* codes =
      a.codes.defined() ? a.codes.mutable_data_ptr<code_t>() : nullptr;
  const PlanePooling<pool_t> pool_plane(s, a.params);
  at::parallel_for(
      0, s.batch * s.out_channels,
      std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, plane_size)),
      [&](int64_t begin, int64_t end) {
        std::vector<pool_t> plane(
            plane_size + 1 + PlanePooling<pool_t>::kSlack);
        plane[plane_size] = -std::numeric_limits<pool_t>::infinity();
        std::vector<pool_t> pooled(kHalf ? pooled_size : 0);
        for (int64_t index = begin; index < end; ++index) {
          code_t* plane_codes =
              codes != nullptr ? codes + index * pooled_size : nullptr;
          if constexpr (kHalf) {
            half_to_float(conv + index * plane_size, plane.data(), plane_size);
            pool_plane(plane.data(), pooled.data(), plane_codes);
            float_to_half(
                pooled.data(), output + index * pooled_size, pooled_size);
          } else {
            std::memcpy(
                plane.data(), conv + index * plane_size,
                plane_size * sizeof(scalar_t));
            pool_plane(plane.data(), output + index * pooled_size, plane_codes);
          }
        }
      });
}

void conv2d_relu_max_pool2d_epilogue_kernel(
    const Conv2dReluMaxPool2dEpilogueArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, args.conv.scalar_type(),
      "conv2d_relu_max_pool2d_epilogue_cpu", [&] {
        ops::dispatch_code_type(
            ops::argmax_code_dtype(args.params),
            [&](auto code) { epilogue_typed<scalar_t, decltype(code)>(args); });
      });
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(
    conv2d_relu_max_pool2d_epilogue_stub,
    &conv2d_relu_max_pool2d_epilogue_kernel);

}  // namespace ptfast::cpu
