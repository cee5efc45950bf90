#include "ops/cpu/peak_flops.h"

#include <algorithm>
#include <chrono>

namespace ptfast::cpu {

IsaDispatch<PeakFlopsFn> peak_flops_stub;

double peak_fp32_gflops(int repeats) {
  const auto run = peak_flops_stub.get("peak_fp32_gflops");
  const auto seconds = [&](int64_t iterations, double* flops) {
    const auto start = std::chrono::steady_clock::now();
    *flops = run(iterations);
    return std::chrono::duration<double>(
               std::chrono::steady_clock::now() - start)
        .count();
  };
  double flops = 0;
  int64_t iterations = 1 << 12;
  while (seconds(iterations, &flops) < 0.02 &&
         iterations < (int64_t{1} << 30)) {
    iterations *= 2;
  }
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const double elapsed = seconds(iterations, &flops);
    best = std::max(best, flops / elapsed / 1e9);
  }
  return best;
}

}  // namespace ptfast::cpu
