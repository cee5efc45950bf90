#!/usr/bin/env bash
# One-call GPU check for a fresh GPU machine that has PyTorch (and pytest,
# hypothesis, matplotlib) but no network, e.g. the lent H100/H200:
#   1. builds ptfast in place against that machine's torch, for the visible GPU;
#   2. runs the CUDA tests (the device-parametrised suite and tests/test_cuda.py);
#   3. runs compute-sanitizer memcheck and racecheck over one small call of each
#      kernel, where the machine's runtime supports it;
#   4. runs the GPU benchmarks (ptfast vs eager vs torch.compile);
#   5. prints device, driver, torch and the results table last.
# Results go to $OUT when set (the device tool's output folder), else to
# benchmarks/results/gpu-check/. Budget: under 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
results=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PTFAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} | tee "$results/device.txt"

echo "== build"
start=$SECONDS
if ! python3 setup.py build_ext --inplace >"$results/build.log" 2>&1; then
  tail -40 "$results/build.log"
  echo "build failed" >&2
  exit 1
fi
echo "built in $((SECONDS - start)) s"

echo "== CUDA tests"
timeout 240 python3 -m pytest -q -x -k "cuda" -p no:cacheprovider tests 2>&1 | tee "$results/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 benchmarks/gpu_kernel_calls.py >"$results/sanitizer-$tool.log" 2>&1
    code=$?
    echo "$tool: exit $code ($(grep -c "=========" "$results/sanitizer-$tool.log") report lines)"
    tail -3 "$results/sanitizer-$tool.log"
    [ "$code" -eq 0 ] || status=1
  done
else
  echo "compute-sanitizer not found: skipped"
fi

echo "== benchmarks"
timeout 240 python3 -m ptfast.apps.bench --device cuda --out "$results" >"$results/bench.log" 2>&1 || status=1

echo "== summary"
cat "$results/device.txt"
cat "$results/results.md" 2>/dev/null || tail -20 "$results/bench.log"
exit "$status"
