"""``ptfast-bench`` (also ``python -m ptfast.apps.bench``): time ptfast against eager and compiled PyTorch.

    ptfast-bench                 quick set, CPU (+ CUDA when visible), about 3 minutes on 2 cores
    ptfast-bench --full          every shape, batch 1024 included
    ptfast-bench --only log_softmax --device cpu
    ptfast-bench --smoke --out /tmp/bench   tiny shapes, one repeat: checks the suite runs
    ptfast-bench --dtype bfloat16 --only "mnist*"   half precision, against native in the same dtype

Prints a table of times and speedups, and writes results.json, results.md
and speedup-<device>-<family>.png to --out (default
benchmarks/results/<machine>/ under the current directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import shlex
import sys
import time
from pathlib import Path

import torch

from ptfast.apps.bench.cases import COMPILE_BACKENDS, Selection, memory_block_shapes, select_cases
from ptfast.apps.bench.machine import describe_machine
from ptfast.apps.bench.memory import MemoryResult, measure_block_memory
from ptfast.apps.bench.report import text_report, write_report
from ptfast.apps.bench.runner import CaseResult, run_cases
from ptfast.apps.bench.timing import TIMING_SETTINGS, copy_gigabytes_per_s, keep_freed_memory_mapped, peak_gflops
from ptfast.apps.paths import write_problem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptfast-bench",
        description="Time ptfast's fused ops against native eager PyTorch and torch.compile, side by side.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full", action="store_true", help="every shape (batch 1024 included); the default is the quick set"
    )
    size.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one repeat: checks that the suite runs (for tests)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], default="auto",
        help="auto (default): CPU, and CUDA too when a GPU is visible",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="directory for results.json, results.md and the plots (default: benchmarks/results/<machine>)",
    )
    parser.add_argument(
        "--only", metavar="PATTERN", default=None,
        help='run only cases whose name contains PATTERN (shell wildcards allowed; several separated by commas), '
        'e.g. "log_softmax" or "mnist1*N64,log_softmax/inference"',
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="float32",
        help="dtype of every case's tensors and models, ptfast and native alike (default float32); "
        "the default --out then ends in -<dtype>",
    )
    return parser


# The dtypes --dtype takes: every one that both ops take on CPU and CUDA.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def selection_of(args: argparse.Namespace) -> Selection:
    return "full" if args.full else "smoke" if args.smoke else "quick"


def devices_of(args: argparse.Namespace) -> list[torch.device]:
    """The devices for --device; the caller has checked that CUDA is there for 'cuda'."""
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return [torch.device("cpu")]
    if args.device == "cuda":
        return [torch.device("cuda")]
    return [torch.device("cpu"), torch.device("cuda")]


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``ptfast-bench``: 0 when the report is written; user errors exit with status 2, as argparse's own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    selection = selection_of(args)
    devices = devices_of(args)
    settings = TIMING_SETTINGS[selection]
    dtype = DTYPES[args.dtype]
    # Fix the thread count for the whole run (eager, ptfast's OpenMP and
    # inductor's generated code all follow it) and record it.
    torch.set_num_threads(torch.get_num_threads())
    freed_memory_kept_mapped = keep_freed_memory_mapped()
    machine = describe_machine(gpu=any(device.type == "cuda" for device in devices))
    default_dir = machine.slug() if dtype == torch.float32 else f"{machine.slug()}-{args.dtype}"
    out_dir = args.out if args.out is not None else Path("benchmarks") / "results" / default_dir
    if problem := write_problem(out_dir, folder=True):
        parser.error(f"--out {out_dir}: {problem}")
    cases = select_cases(selection, pattern=args.only)
    memory_shapes = memory_block_shapes(selection, pattern=args.only)
    if not cases and not memory_shapes:
        parser.error(f"--only {args.only!r}: no case matches")
    _progress(f"ptfast-bench: {len(cases)} cases, {selection} set, on {', '.join(d.type for d in devices)}; "
              f"{machine.describe()}")

    start = time.perf_counter()
    results: list[CaseResult] = []
    memory: list[MemoryResult] = []
    peak: dict[str, float | None] = {}
    copy_bandwidth: dict[str, float] = {}
    command = shlex.join(["ptfast-bench", *(sys.argv[1:] if argv is None else argv)])

    def document_now() -> dict:
        return {
            "schema_version": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "selection": selection,
            "dtype": str(dtype).removeprefix("torch."),
            "compile_backend": COMPILE_BACKENDS[selection],
            "timing": dataclasses.asdict(settings),
            "elapsed_s": round(time.perf_counter() - start, 1),
            "machine": machine.to_dict(),
            "machine_summary": machine.describe(),
            "peak_gflops": peak,
            "copy_gb_per_s": copy_bandwidth,
            "freed_memory_kept_mapped": freed_memory_kept_mapped,
        }

    def finished(result: CaseResult) -> None:
        # A run cut short (a time limit on a lent GPU) still leaves every finished case's numbers.
        results.append(result)
        write_report(document_now(), results, memory, out_dir, plots=False)

    for device in devices:
        device_peak = peak_gflops(device)
        peak[device.type] = None if device_peak is None else round(device_peak, 1)
        copy_bandwidth[device.type] = round(copy_gigabytes_per_s(device), 1)
        run_cases(cases, device, settings, dtype, progress=_progress, finished=finished)
        for shape in memory_shapes:
            memory.append(measure_block_memory(shape, device, COMPILE_BACKENDS[selection], dtype))
    document = document_now()
    print(text_report(document, results, memory))
    with_plots = importlib.util.find_spec("matplotlib") is not None
    if not with_plots:
        _progress("ptfast-bench: matplotlib is not installed (pip install 'ptfast[bench]'): no plots")
    written = write_report(document, results, memory, out_dir, plots=with_plots)
    print(f"\nWrote {', '.join(str(path) for path in written)} ({document['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
