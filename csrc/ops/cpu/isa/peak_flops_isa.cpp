// The register-only multiply-add kernel behind peak_fp32_gflops (see
// csrc/ops/cpu/peak_flops.h). Compiled once per instruction set, so it runs
// the widest vectors the CPU has.
#include "ops/cpu/peak_flops.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <atomic>

namespace ptfast::cpu {
namespace {

// Independent accumulator chains: enough to cover a 4-cycle FMA latency on
// two FMA ports (8) with room to spare, few enough to stay in AVX2's 16
// vector registers with the two operands.
constexpr int kChains = 12;

double peak_flops(int64_t iterations) {
  using Vec = at::vec::Vectorized<float>;
  std::atomic<int64_t> threads{0};
  // An asm barrier would pin the values; instead the result is stored, so
  // the compiler cannot drop the chains.
  std::atomic<float> sink{0};
  at::parallel_for(
      0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t thread = begin; thread < end; ++thread) {
          threads.fetch_add(1, std::memory_order_relaxed);
          Vec acc[kChains];
          for (int c = 0; c < kChains; ++c) {
            acc[c] = Vec(0.001f * static_cast<float>(c + thread));
          }
          const Vec a(0.999999f);
          const Vec b(1e-7f);
          for (int64_t i = 0; i < iterations; ++i) {
            for (int c = 0; c < kChains; ++c) {
              acc[c] = at::vec::fmadd(acc[c], a, b);
            }
          }
          Vec total = acc[0];
          for (int c = 1; c < kChains; ++c) {
            total = total + acc[c];
          }
          float lanes[Vec::size()];
          total.store(lanes);
          sink.store(lanes[0], std::memory_order_relaxed);
        }
      });
  return 2.0 * Vec::size() * kChains * static_cast<double>(iterations) *
         static_cast<double>(threads.load());
}

}  // namespace

PTFAST_REGISTER_ISA_KERNEL(peak_flops_stub, &peak_flops);

}  // namespace ptfast::cpu
