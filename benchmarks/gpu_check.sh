#!/usr/bin/env bash
# One-call GPU check for a lent GPU machine with PyTorch (and pytest,
# hypothesis) but no network, within 8 minutes on an H100/H200:
#   1. builds ptfast in place for the visible GPU only, with the baseline CPU
#      kernels only (PTFAST_CPU_ISAS=DEFAULT);
#   2. runs the CUDA tests (--maxfail=50: one failure does not hide the rest;
#      not the CPU emulation of the CUDA kernels, which CI runs);
#   3. runs compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so
#      that it sees each allocation), initcheck and racecheck over one call of
#      each kernel (benchmarks/gpu_kernel_calls.py);
#   4. times a dozen named cases, ptfast vs eager vs torch.compile, each
#      case's result written as it finishes;
#   5. prints each step's time, the device and the results table last.
# Every step has its own time cap and log, so a run cut short still returns
# what it saw. Results go to $OUT when set (the device tool's output folder),
# else to benchmarks/results/gpu-check/.
#
#   bash benchmarks/gpu_check.sh            on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  on a CPU machine: the same steps
#       on the CPU (CPU build, CPU timings, sanitizers listed, not run), to
#       rehearse the script and time what can be timed without a GPU
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
results=$(realpath -m "${OUT:-benchmarks/results/gpu-check}")
mkdir -p "$results"
if [ "$dry_run" = 1 ] && [ -z "${PTFAST_GPU_CHECK_COPY:-}" ]; then
  # The baseline-only build must not replace this checkout's extension:
  # rehearse in a copy of the checkout's files (tracked and untracked).
  copy=$(mktemp -d)
  git ls-files -co --exclude-standard -z | tar -c --null -T - -f - | tar -x -C "$copy" -f -
  # ccache (where the compiler goes through it) hits across copies.
  PTFAST_GPU_CHECK_COPY=1 OUT=$results CCACHE_BASEDIR=$copy CCACHE_NOHASHDIR=true \
    bash "$copy/benchmarks/gpu_check.sh" --dry-run
  code=$?
  rm -rf "$copy"
  exit "$code"
fi
summary="$results/summary.txt"
: >"$summary"
export PYTHONUNBUFFERED=1 PTFAST_CPU_ISAS=DEFAULT MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$dry_run" = 1 ]; then
  export PTFAST_CUDA=0
  device=cpu
  build_cap=1200  # a 2-core CPU machine builds far slower than a GPU machine's 16 cores
else
  export PTFAST_CUDA=1
  device=cuda
  build_cap=210
fi
# Cases timed in step 4: the MNIST blocks, a CIFAR block, log_softmax from
# 10 to 32000 classes and the tutorial CNN's training step (13 cases).
BENCH_CASES="mnist1*N64,mnist2*N64,cifar2,log_softmax/*/4096x10,log_softmax/*/256x32000,mnist_cnn/train_step/N64"
status=0
step_start=$SECONDS

# step NAME: starts a step, and its clock.
step() {
  echo "== $1 ($(date +%T))" | tee -a "$summary"
  step_start=$SECONDS
}
took() { echo "   took $((SECONDS - step_start)) s" | tee -a "$summary"; }

step device
{
  if [ "$dry_run" = 1 ]; then
    echo "dry run on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  fi
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  git log -1 --format='commit %H %s' 2>/dev/null
} 2>&1 | tee "$results/device.txt" | tee -a "$summary"
if [ "$dry_run" = 0 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
took

step "build (cap $build_cap s)"
if ! timeout "$build_cap" python3 setup.py build_ext --inplace >"$results/build.log" 2>&1; then
  tail -30 "$results/build.log" | tee -a "$summary"
  echo "build failed or timed out" | tee -a "$summary"
  exit 1
fi
took

step "CUDA tests (cap 80 s)"
timeout 80 python3 -m pytest -q --maxfail=50 -k "cuda and not emulation" -p no:cacheprovider tests >"$results/tests.log" 2>&1
code=$?
tail -15 "$results/tests.log" | tee -a "$summary"
[ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1  # 5: nothing collected (the dry run's CPU)
took

for tool in memcheck initcheck racecheck; do
  step "compute-sanitizer $tool (cap 35 s)"
  command=(compute-sanitizer --tool "$tool" --error-exitcode 9 python3 benchmarks/gpu_kernel_calls.py)
  if [ "$dry_run" = 1 ] || ! command -v compute-sanitizer >/dev/null; then
    echo "   not run here: ${command[*]}" | tee -a "$summary"
    took
    continue
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ "$tool" = memcheck ] && echo 1 || echo 0) \
    timeout 35 "${command[@]}" >"$results/sanitizer-$tool.log" 2>&1
  code=$?
  echo "   exit $code, $(grep -c "^=========" "$results/sanitizer-$tool.log") report lines" | tee -a "$summary"
  tail -3 "$results/sanitizer-$tool.log" | tee -a "$summary"
  [ "$code" -eq 0 ] || status=1
  took
done

step "benchmarks (cap 75 s)"
timeout 75 python3 -m ptfast.apps.bench --device "$device" --only "$BENCH_CASES" --out "$results" \
  >"$results/bench.log" 2>&1 || status=1
grep -c "^\[" "$results/bench.log" | sed 's/^/   cases finished: /' | tee -a "$summary"
took

echo "== summary"
cat "$summary"
cat "$results/results.md" 2>/dev/null || tail -20 "$results/bench.log"
exit "$status"
