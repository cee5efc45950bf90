"""The benchmark suite keeps working: both front ends run their smoke set (tiny shapes, one repeat).

Nothing here asserts a timing: these tests check that the cases set up and
run for every implementation, and that the report files are written.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptfast.apps.bench.cases import IMPLEMENTATIONS, SELECTIONS, all_cases, select_cases
from ptfast.apps.bench.cli import main
from ptfast.apps.bench.timing import keep_freed_memory_mapped

IS_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

REPOSITORY = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_cli_smoke_writes_the_report(tmp_path: Path):
    out = tmp_path / "results"
    result = _run([sys.executable, "-m", "ptfast.apps.bench", "--smoke", "--device", "cpu", "--out", str(out)], tmp_path)
    assert "vs eager" in result.stdout and "vs compile" in result.stdout

    document = json.loads((out / "results.json").read_text())
    assert document["selection"] == "smoke"
    assert document["machine"]["threads"] >= 1 and document["machine"]["torch_version"]
    assert {case["case"] for case in document["cases"]} == {case.name for case in all_cases("smoke")}
    for case in document["cases"]:
        assert case["device"] == "cpu"
        assert case["skipped"] is None, case
        # ptfast and eager always run; compile may fail on a machine without a compiler, and says so.
        assert {"ptfast", "eager"} <= set(case["times_s"]), case
        assert set(case["times_s"]) | set(case["errors"]) == set(IMPLEMENTATIONS), case
        assert all(time > 0 for time in case["times_s"].values())
        assert case["speedup_vs_eager"] > 0
    assert document["peak_gflops"]["cpu"] > 0
    assert document["freed_memory_kept_mapped"] == IS_GLIBC
    assert document["copy_gb_per_s"]["cpu"] > 0
    for case in document["cases"]:
        if case["family"] == "conv2d_relu_max_pool2d":
            assert case["flops"] > 0 and case["ptfast_gflops"] > 0, case
        else:
            assert case["flops"] is None and case["ptfast_gflops"] is None, case
        if case["family"] == "log_softmax":
            elements = 5 if case["op"] == "forward+backward" else 2
            assert case["bytes_moved"] == elements * 4 * math.prod(map(int, case["shape"].split()[0].split("x"))), case
            assert case["ptfast_gb_per_s"] > 0, case
        else:
            assert case["bytes_moved"] is None and case["ptfast_gb_per_s"] is None, case
    assert document["memory"], "no saved-for-backward measurement"
    for memory in document["memory"]:
        # The fused op saves uint8 codes where eager keeps the ReLU output and int64 indices.
        assert memory["saved"]["ptfast"]["beyond_arguments"] < memory["saved"]["eager"]["beyond_arguments"]

    markdown = (out / "results.md").read_text()
    assert "| case |" in markdown and "## CPU" in markdown and "rate (% of device)" in markdown
    if HAS_MATPLOTLIB:
        plots = list(out.glob("*.png"))
        assert plots and all(plot.stat().st_size > 0 for plot in plots)
        assert all(f"]({plot.name})" in markdown for plot in plots)


@pytest.mark.slow
def test_pytest_benchmarks_smoke(tmp_path: Path):
    env = {**os.environ, "PTFAST_BENCH_SET": "smoke"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPOSITORY / "benchmarks"), "--benchmark-disable", "-q",
         "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_selections_share_their_cases():
    """Quick is a subset of full; every case name is unique, so results and pytest ids are unambiguous."""
    names = {selection: [case.name for case in all_cases(selection)] for selection in SELECTIONS}
    for selection, selection_names in names.items():
        assert len(set(selection_names)) == len(selection_names), selection
    assert set(names["quick"]) < set(names["full"])


@pytest.mark.parametrize(
    "pattern, expected", [("log_softmax/inference", True), ("mnist1*N64", True), ("nothing", False)]
)
def test_only_pattern(pattern: str, expected: bool):
    assert bool(select_cases("quick", pattern=pattern)) == expected


def test_only_patterns_separated_by_commas():
    one = {case.name for case in select_cases("quick", pattern="mnist1*N64")}
    other = {case.name for case in select_cases("quick", pattern="log_softmax/inference")}
    both = {case.name for case in select_cases("quick", pattern="mnist1*N64, log_softmax/inference")}
    assert one and other and both == one | other


def test_results_are_written_after_each_case(tmp_path, monkeypatch):
    """A run killed after its first case (a GPU machine's time limit) still leaves that case's numbers."""
    from ptfast.apps.bench import cli, runner

    real_run_case = runner.run_case
    calls = []

    def run_case_then_die(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # what a timeout's SIGINT raises
        calls.append(1)
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(runner, "run_case", run_case_then_die)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--smoke", "--device", "cpu", "--only", "log_softmax", "--out", str(tmp_path)])
    document = json.loads((tmp_path / "results.json").read_text())
    assert [case["family"] for case in document["cases"]] == ["log_softmax"]
    assert "log_softmax/inference/8x10" in (tmp_path / "results.md").read_text()


def test_block_flops_count_the_convolutions():
    """2 FLOPs per multiply-add: MNIST block 1 at batch 1 is 10 channels x 24x24 outputs x 25 taps."""
    from ptfast.apps.bench.cases import block_shapes

    block1, block2 = (next(s for s in block_shapes("quick") if s.label == label and s.batch == 1)
                      for label in ("mnist1", "mnist2"))
    assert block1.conv_flops() == 2 * 10 * 24 * 24 * 25
    assert block1.forward_backward_flops() == 2 * block1.conv_flops()  # no input gradient
    assert block2.conv_flops() == 2 * 20 * 8 * 8 * 10 * 25
    assert block2.forward_backward_flops() == 3 * block2.conv_flops()
    inference = select_cases("quick", pattern="inference/mnist1 1->10 k5 28x28 N1")
    assert [case.flops for case in inference] == [block1.conv_flops()]


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2: what malloc holds, in bytes."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(not IS_GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="glibc 2.33's mallinfo2")
def test_freed_memory_stays_mapped_for_the_next_tensor():
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    assert keep_freed_memory_mapped()
    before = libc.mallinfo2()
    block = torch.empty(48 << 20, dtype=torch.uint8)
    allocated = libc.mallinfo2()
    del block
    freed = libc.mallinfo2()
    # By default glibc maps a 48 MB block on its own (hblkhd) and unmaps it
    # when freed; kept, it comes from the heap and stays there, free.
    assert allocated.hblkhd == before.hblkhd
    assert freed.arena == allocated.arena
    assert freed.fordblks >= 48 << 20


def _user_error(argv: list[str], capsys) -> str:
    """ptfast-bench's main(argv) must end as argparse ends on its own errors: status 2, `ptfast-bench: error: ...`."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ptfast-bench") and "ptfast-bench: error: " in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_user_error(capsys):
    err = _user_error(["--smoke", "--device", "cuda"], capsys)
    assert "ptfast-bench: error: --device cuda: CUDA is not available to this torch" in err


def test_only_matching_nothing_is_a_user_error(tmp_path, capsys):
    err = _user_error(["--smoke", "--device", "cpu", "--only", "nothing", "--out", str(tmp_path)], capsys)
    assert "ptfast-bench: error: --only 'nothing': no case matches" in err


def test_unwritable_out_is_a_user_error_before_the_run(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = _user_error(["--smoke", "--device", "cpu", "--out", str(a_file / "results")], capsys)
    assert f"ptfast-bench: error: --out {a_file / 'results'}: {a_file} is not a directory" in err
    assert "cases" not in err  # before the progress line of the run


def test_peak_probe_counts_its_flops():
    """One thread's measured peak lies between 1 GFLOP/s and what 2 FMA ports of 512 bits reach at 6 GHz:
    a probe whose loop the compiler dropped, or whose FLOP count is off by a factor, falls outside."""
    from ptfast import _C

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        gflops = _C._peak_fp32_gflops()
    finally:
        torch.set_num_threads(threads)
    assert 1 < gflops < 16 * 2 * 2 * 6


def test_gpu_check_script_parses_and_times_about_a_dozen_cases():
    script = REPOSITORY / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    pattern = next(line for line in script.read_text().splitlines() if line.startswith("BENCH_CASES="))
    cases = select_cases("quick", pattern=pattern.split("=", 1)[1].strip('"'))
    assert 10 <= len(cases) <= 14, [case.name for case in cases]


@pytest.mark.slow
def test_cli_dtype_runs_the_cases_in_it(tmp_path: Path):
    out = tmp_path / "bench"
    result = _run([sys.executable, "-m", "ptfast.apps.bench", "--smoke", "--device", "cpu", "--dtype", "bfloat16",
                   "--only", "log_softmax/inference/8x10", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "results.json").read_text())
    assert document["dtype"] == "bfloat16"
    assert [case["case"] for case in document["cases"]] == ["log_softmax/inference/8x10"]


def test_unknown_dtype_is_a_user_error(capsys):
    err = _user_error(["--smoke", "--device", "cpu", "--dtype", "float64"], capsys)
    assert "--dtype: invalid choice: 'float64'" in err
