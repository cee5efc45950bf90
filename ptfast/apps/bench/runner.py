"""Running the cases: each case's setup, interleaved timing, and its result record."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ptfast.apps.bench.cases import Case
from ptfast.apps.bench.timing import TimingSettings, describe_error, time_interleaved


@dataclass
class CaseResult:
    """The times of one case on one device.

    times_s: median seconds per call per implementation that ran.
    samples_s: every sample's seconds per call, in the order taken.
    warmup_s: seconds of the warm-up calls; for "compile", about its compile time.
    errors: implementations that failed (e.g. torch.compile), with the error.
    skipped: why the whole case did not run (its setup failed), else None.
    flops: the case's FLOPs per call where counted (see Case.flops), else None.
    bytes_moved: bytes one call must read or write at the least, where counted (see
    Case.elements_moved), else None.
    """

    case: str
    family: str
    op: str
    shape: str
    device: str
    times_s: dict[str, float] = field(default_factory=dict)
    samples_s: dict[str, list[float]] = field(default_factory=dict)
    calls_per_sample: dict[str, int] = field(default_factory=dict)
    warmup_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    flops: int | None = None
    bytes_moved: int | None = None

    def gflops(self, implementation: str = "ptfast") -> float | None:
        """GFLOP/s of `implementation`; None where FLOPs are not counted or it did not run."""
        if self.flops is None or implementation not in self.times_s:
            return None
        return self.flops / self.times_s[implementation] / 1e9

    def gigabytes_per_s(self, implementation: str = "ptfast") -> float | None:
        """The bytes that must move per call over `implementation`'s time, in GB/s; None where not counted."""
        if self.bytes_moved is None or implementation not in self.times_s:
            return None
        return self.bytes_moved / self.times_s[implementation] / 1e9

    def speedup(self, baseline: str) -> float | None:
        """time(baseline) / time(ptfast): above 1 when ptfast is faster; None if either did not run."""
        if "ptfast" not in self.times_s or baseline not in self.times_s:
            return None
        return self.times_s[baseline] / self.times_s["ptfast"]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "speedup_vs_eager": self.speedup("eager"),
            "speedup_vs_compile": self.speedup("compile"),
            "ptfast_gflops": self.gflops(),
            "ptfast_gb_per_s": self.gigabytes_per_s(),
        }


def run_case(case: Case, device: torch.device, settings: TimingSettings, dtype: torch.dtype) -> CaseResult:
    """Set up and time one case; a case that cannot run is recorded as skipped, not raised."""
    bytes_moved = None if case.elements_moved is None else case.elements_moved * dtype.itemsize
    result = CaseResult(
        case.name, case.family, case.op, case.shape, device.type, flops=case.flops, bytes_moved=bytes_moved
    )
    try:
        steps = case.setup(device, dtype)
    except Exception as error:  # noqa: BLE001  (one broken case must not lose the others' numbers)
        result.skipped = f"setup failed: {describe_error(error)}"
        return result
    timings, result.errors = time_interleaved(steps, device, settings)
    for name, timing in timings.items():
        result.times_s[name] = timing.median_s
        result.samples_s[name] = list(timing.samples_s)
        result.calls_per_sample[name] = timing.calls_per_sample
        result.warmup_s[name] = timing.warmup_s
    return result


def run_cases(
    cases: list[Case],
    device: torch.device,
    settings: TimingSettings,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] = lambda line: None,
    finished: Callable[[CaseResult], None] = lambda result: None,
) -> list[CaseResult]:
    """Every case in order; `progress` gets one line and `finished` the result of each finished case."""
    results = []
    for index, case in enumerate(cases, 1):
        start = time.perf_counter()
        result = run_case(case, device, settings, dtype)
        results.append(result)
        status = f"skipped: {result.skipped}" if result.skipped else f"{time.perf_counter() - start:.1f} s"
        progress(f"[{index}/{len(cases)}] {device.type} {case.name}: {status}")
        finished(result)
    return results
