// The general path of the CPU backward of the fused conv2d -> ReLU ->
// max_pool2d operator: overlapping windows, horizontal dilation, rows too wide
// for the registers, updating the staged buffers position by position.
//
// A file of its own because it is a complete algorithm beside the register
// path (conv2d_relu_max_pool2d_backward_registers.h), sharing nothing with it
// but the frame. Included by conv2d_relu_max_pool2d_backward_isa.cpp only,
// after the plan, staging and chunk frame it builds on (BackwardPlan,
// StagedPlane, weight_rows, run_in_chunks): so it is compiled once per
// instruction set, and it is not a standalone header.
#pragma once

#include "ops/conv2d_relu_max_pool2d.h"
#include "ops/cpu/conv2d_relu_max_pool2d_kernel.h"
#include "ops/geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <vector>

namespace ptfast::cpu {
namespace {

namespace geo = ptfast::geometry;

// dst[j] += alpha * src[j] for j < count.
template <typename scalar_t>
inline void axpy(
    scalar_t* dst, const scalar_t* src, scalar_t alpha, int64_t count) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec a(alpha);
  int64_t j = 0;
  for (; j + Vec::size() <= count; j += Vec::size()) {
    at::vec::fmadd(a, Vec::loadu(src + j), Vec::loadu(dst + j)).store(dst + j);
  }
  if (j < count) {
    const int64_t rest = count - j;
    at::vec::fmadd(a, Vec::loadu(src + j, rest), Vec::loadu(dst + j, rest))
        .store(dst + j, rest);
  }
}

// A conv output that receives gradient, and the sum of the gradients of the
// pooled outputs whose arg-max it is.
template <typename scalar_t>
struct ActivePosition {
  int64_t oh, ow;
  scalar_t grad;
};

// The active conv positions of one (image, output channel) plane, in pooled
// order. When pooling windows overlap, one conv output can be the arg-max of
// several windows: it is listed once, at its first window, with the sum of
// their gradients taken in pooled order as max_pool2d's backward adds them,
// so the result matches native exactly (an inf input times g1 + g2 is not
// g1 * inf + g2 * inf).
template <typename scalar_t, typename code_t>
void collect_active_positions(
    const scalar_t* grad_output, const code_t* codes,
    const geo::PoolGeometry& pool, bool windows_overlap,
    std::vector<ActivePosition<scalar_t>>& active) {
  active.clear();
  for (int64_t ph = 0; ph < pool.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < pool.pooled_w; ++pw) {
      const int64_t cell = ph * pool.pooled_w + pw;
      const int64_t code = static_cast<int64_t>(codes[cell]);
      if (code == geo::kNoGradient) {
        continue;
      }
      int64_t dy = 0, dx = 0;
      geo::decode_argmax(code, pool.kernel_w, dy, dx);
      const int64_t oh = ph * pool.stride_h - pool.padding_h + dy;
      const int64_t ow = pw * pool.stride_w - pool.padding_w + dx;
      if (!windows_overlap) {
        active.push_back({oh, ow, grad_output[cell]});
        continue;
      }
      const auto gathered =
          geo::gather_gradient<scalar_t>(grad_output, codes, oh, ow, pool);
      if (gathered.first_window == cell) {
        active.push_back({oh, ow, gathered.sum});
      }
    }
  }
}

// For each image and group, every active conv position (oh, ow) read, for
// kernel row kh, the input row ih0 + kh * dilation_h over columns
// iw0 + kw * dilation_w: in the channels-last image the valid taps of that
// row across the group's channels are one contiguous run when
// dilation_w == 1, and C-long runs otherwise, so each run is one axpy for
// grad_input and one for grad_weight.
template <typename scalar_t, typename code_t>
void backward_general(
    const Conv2dReluMaxPool2dBackwardArgs& a,
    const BackwardPlan<scalar_t>& plan) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto& s = a.shape;
  const auto& p = a.params;
  const StagedPlane staged{plan.in_group, s.in_h, s.in_w, 0, 0};
  const scalar_t* grad_output = a.grad_output.const_data_ptr<scalar_t>();
  const code_t* codes = a.codes.const_data_ptr<code_t>();
  const scalar_t* input = a.input.const_data_ptr<scalar_t>();
  const at::Tensor weight_tensor =
      plan.need_input ? weight_rows(a, plan) : at::Tensor();
  const scalar_t* weight =
      plan.need_input ? weight_tensor.const_data_ptr<scalar_t>() : nullptr;
  const geo::PoolGeometry pool = ops::pool_geometry(s, p);
  const bool windows_overlap = p.pool_windows_overlap();
  // One thread's buffers.
  struct Buffers {
    std::vector<scalar_t> image_cl, grad_cl, image_weight_grad;
    std::vector<ActivePosition<scalar_t>> active;
  };
  const auto make_buffers = [&] {
    Buffers b{
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_weight),
        staged_buffer<scalar_t>(staged, plan.row_pitch, plan.need_input),
        std::vector<scalar_t>(
            plan.need_weight ? plan.out_group * plan.padded_weight_size : 0),
        {}};
    b.active.reserve(plan.pooled);
    return b;
  };
  run_in_chunks(
      a, plan, make_buffers,
      [&](Buffers& b, acc_t* partial, int64_t n, int64_t group) {
        bool staged_non_finite = false;
        const int64_t slice =
            (n * s.in_channels + group * plan.in_group) * s.in_h * s.in_w;
        if (plan.need_weight) {
          to_channels_last(b.image_cl.data(), input + slice, staged);
          staged_non_finite = has_non_finite(b.image_cl.data(), staged.size());
          std::fill(
              b.image_weight_grad.begin(), b.image_weight_grad.end(),
              scalar_t(0));
        }
        if (plan.need_input) {
          std::fill(b.grad_cl.begin(), b.grad_cl.end(), scalar_t(0));
        }
        for (int64_t j = 0; j < plan.out_group; ++j) {
          const int64_t oc = group * plan.out_group + j;
          const int64_t offset = (n * s.out_channels + oc) * plan.pooled;
          const scalar_t* w =
              plan.need_input ? weight + oc * plan.padded_weight_size : nullptr;
          scalar_t* gw = plan.need_weight ? b.image_weight_grad.data() +
                                                j * plan.padded_weight_size
                                          : nullptr;
          collect_active_positions(
              grad_output + offset, codes + offset, pool, windows_overlap,
              b.active);
          scalar_t bias_sum = 0;
          for (const auto& position : b.active) {
            bias_sum += position.grad;
            if (!plan.need_input && !plan.need_weight) {
              continue;
            }
            const auto rows = geo::valid_taps(
                position.oh, s.kernel_h, p.stride[0], p.padding[0],
                p.dilation[0], s.in_h);
            const auto cols = geo::valid_taps(
                position.ow, s.kernel_w, p.stride[1], p.padding[1],
                p.dilation[1], s.in_w);
            const int64_t ih0 = position.oh * p.stride[0] - p.padding[0];
            const int64_t iw0 = position.ow * p.stride[1] - p.padding[1];
            // Contiguous runs per kernel row: all valid taps at once
            // when dilation_w == 1, else one tap at a time.
            const int64_t run_taps =
                p.dilation[1] == 1 ? cols.end - cols.begin : 1;
            for (int64_t kh = rows.begin; kh < rows.end; ++kh) {
              const int64_t ih = ih0 + kh * p.dilation[0];
              for (int64_t kw = cols.begin; kw < cols.end; kw += run_taps) {
                const int64_t pixel =
                    (ih * s.in_w + iw0 + kw * p.dilation[1]) * plan.in_group;
                const int64_t tap = kh * plan.row_pitch + kw * plan.in_group;
                const int64_t length = run_taps * plan.in_group;
                if (plan.need_input) {
                  axpy(
                      b.grad_cl.data() + pixel, w + tap, position.grad, length);
                }
                if (plan.need_weight) {
                  axpy(
                      gw + tap, b.image_cl.data() + pixel, position.grad,
                      length);
                }
              }
            }
          }
          if (plan.need_bias) {
            partial[s.out_channels * plan.weight_size + oc] += bias_sum;
          }
        }
        if (plan.need_input) {
          from_channels_last(
              a.grad_input.mutable_data_ptr<scalar_t>() + slice,
              b.grad_cl.data(), staged);
        }
        if (plan.need_weight) {
          add_weight_rows(
              partial + group * plan.out_group * plan.weight_size,
              b.image_weight_grad.data(), plan.out_group * s.kernel_h, plan);
        }
        return staged_non_finite;
      },
      [](Buffers&, acc_t*) {});
}

}  // namespace
}  // namespace ptfast::cpu
