"""How a case is timed: warm-up, calibrated samples, interleaved repeats, medians.

Each sample runs one implementation's step `calls` times in a row and
divides: the per-call time of that sample. Repeats go round the
implementations in turn (and start from a different one each round), so a
slow drift of the machine (another process, clock changes) hits all of them
equally instead of whichever ran last. The reported time is the median
sample, which one disturbed sample does not move.

CPU samples use time.perf_counter. CUDA samples use CUDA events recorded
around the calls, after a synchronize, so they measure the device's work
rather than how fast the host queues it.

A run first stops glibc's malloc from handing freed memory back to the
kernel (keep_freed_memory_mapped): otherwise which implementation pays for
page faults on tensors of tens of megabytes depends on the order of calls.
"""

from __future__ import annotations

import ctypes
import gc
import math
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from ptfast.apps.bench.cases import Selection, Step


@dataclass(frozen=True)
class TimingSettings:
    """warmup_calls: untimed calls first (they also compile torch.compile's graphs).
    repeats: samples per implementation, whose median is reported.
    min_sample_s: each sample makes enough calls to last about this long,
    so that timer resolution and call overhead jitter do not dominate.
    """

    warmup_calls: int
    repeats: int
    min_sample_s: float
    max_calls_per_sample: int = 10_000


TIMING_SETTINGS: dict[Selection, TimingSettings] = {
    "smoke": TimingSettings(warmup_calls=1, repeats=1, min_sample_s=0.0, max_calls_per_sample=1),
    "quick": TimingSettings(warmup_calls=3, repeats=7, min_sample_s=0.02),
    "full": TimingSettings(warmup_calls=5, repeats=15, min_sample_s=0.05),
}


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one implementation: the median and every sample; and the warm-up's seconds."""

    median_s: float
    samples_s: tuple[float, ...]
    calls_per_sample: int
    warmup_s: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(step: Step, calls: int, device: torch.device) -> float:
    """Time `calls` back-to-back calls of `step` on `device`; seconds per call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    start_s = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start_s) / calls


def warm_up(steps: dict[str, Step], device: torch.device, calls: int) -> tuple[dict[str, float], dict[str, str]]:
    """Run each step `calls` times untimed: the seconds it took, and the error of each one that raised.

    The warm-up of "compile" is about torch.compile's compile time. A failure
    (torch.compile unable to compile a graph, an operator missing on this
    device) is reported for that implementation instead of ending the run.
    """
    seconds, errors = {}, {}
    for name, step in steps.items():
        start = time.perf_counter()
        try:
            for _ in range(calls):
                step()
            synchronize(device)
        except Exception as error:  # noqa: BLE001  (any failure is reported, not raised)
            errors[name] = describe_error(error)
        else:
            seconds[name] = time.perf_counter() - start
    return seconds, errors


def describe_error(error: BaseException) -> str:
    """The error's type and the first line of its message (compile errors run to pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def calls_per_sample(step: Step, device: torch.device, settings: TimingSettings) -> int:
    """Calls that make one sample last at least settings.min_sample_s."""
    if settings.min_sample_s <= 0:
        return 1
    once = max(seconds_per_call(step, 1, device), 1e-7)
    return max(1, min(settings.max_calls_per_sample, math.ceil(settings.min_sample_s / once)))


def time_interleaved(
    steps: dict[str, Step], device: torch.device, settings: TimingSettings
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Warm up, then time the implementations in interleaved repeats.

    Returns the timing of every implementation that ran and the error of
    every one that failed.
    """
    warmup_s, errors = warm_up(steps, device, settings.warmup_calls)
    working = {name: step for name, step in steps.items() if name not in errors}
    calls = {name: calls_per_sample(step, device, settings) for name, step in working.items()}
    samples: dict[str, list[float]] = {name: [] for name in working}
    names = list(working)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would only add noise to that implementation
    try:
        for repeat in range(settings.repeats):
            rotation = repeat % len(names) if names else 0
            for name in names[rotation:] + names[:rotation]:
                samples[name].append(seconds_per_call(working[name], calls[name], device))
    finally:
        if gc_was_enabled:
            gc.enable()
    timings = {
        name: Timing(statistics.median(values), tuple(values), calls[name], warmup_s[name])
        for name, values in samples.items()
    }
    return timings, errors


# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_MAPPED_BYTES = 1 << 30


def keep_freed_memory_mapped() -> bool:
    """Make glibc's malloc keep freed memory mapped for the rest of the process.

    By default glibc returns a large freed block to the kernel (unmapped, or
    cut off the top of the heap) under thresholds that it adapts as the
    process runs; the next allocation of that size then page-faults every
    page in again. Between interleaved implementations this falls on
    whichever happens to allocate after the other freed: a third of a
    256x32000 log_softmax forward+backward in some orders, none in others.
    Thresholds of 1 GiB keep the memory mapped for every implementation
    alike, as jemalloc or tcmalloc (the allocators PyTorch recommends for
    CPU work) do. Returns whether the setting applied (glibc only).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(option, KEEP_MAPPED_BYTES) == 1 for option in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))


def peak_gflops(device: torch.device) -> float | None:
    """The device's peak float32 rate at the run's thread count, the reference the report sets
    the blocks' GFLOP/s against: on the CPU, ptfast's register-only multiply-add kernel (best of
    5 runs of about 20 ms); None on CUDA, where no probe is run."""
    if device.type != "cpu":
        return None
    from ptfast import _C

    return _C._peak_fp32_gflops()


COPY_BYTES = 256 << 20


def copy_gigabytes_per_s(device: torch.device) -> float:
    """The device's copy bandwidth at the run's thread count, the reference the report sets
    memory-bound cases against: bytes read plus bytes written per second by `Tensor.copy_`
    between two 256 MiB tensors (beyond the caches), best of 5."""
    source = torch.ones(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # the pages of both are touched before timing
    best = math.inf
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * COPY_BYTES / best / 1e9
