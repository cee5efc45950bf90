// The CPU's peak float32 multiply-add rate, measured by a kernel that keeps
// every operand in registers: the reference ptfast-bench sets its GFLOP/s
// against (a GEMM's rate is no ceiling: MKL's sgemm reaches about 41% of
// this peak on AMD Zen 5).
#pragma once

#include "ops/cpu/isa_dispatch.h"

#include <cstdint>

namespace ptfast::cpu {

// Runs `iterations` rounds of independent vector multiply-adds on every
// thread of torch's pool and returns the float32 FLOPs done (2 per
// multiply-add per lane); the caller times it.
using PeakFlopsFn = double (*)(int64_t iterations);

extern IsaDispatch<PeakFlopsFn> peak_flops_stub;

// Float32 GFLOP/s of the best of `repeats` timed runs of about 20 ms each.
double peak_fp32_gflops(int repeats = 5);

}  // namespace ptfast::cpu
