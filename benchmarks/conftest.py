"""pytest-benchmark front end to ptfast.apps.bench's cases.

Every test is one (case, implementation, device); tests are grouped by case
and device, so pytest-benchmark's table puts ptfast, eager and compile of a
shape side by side. The set of shapes is chosen with `--ptfast-set`
(smoke | quick | full; default: $PTFAST_BENCH_SET or quick).

Unlike ``ptfast-bench``, pytest-benchmark times one implementation after
the other, not interleaved; use ``ptfast-bench`` for the published numbers.
"""

from __future__ import annotations

import os

import pytest
import torch

from ptfast.apps.bench.cases import IMPLEMENTATIONS, SELECTIONS, Case, select_cases
from ptfast.apps.bench.timing import TIMING_SETTINGS, calls_per_sample, synchronize, warm_up


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ptfast-set",
        choices=SELECTIONS,
        default=os.environ.get("PTFAST_BENCH_SET", "quick"),
        help="which ptfast benchmark shapes to run: smoke (tiny, for tests), quick (default) or full",
    )


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `case` with the cases of the test module's FAMILY, and `implementation` and `device`."""
    if "case" in metafunc.fixturenames:
        cases = select_cases(metafunc.config.getoption("--ptfast-set"), family=metafunc.module.FAMILY)
        metafunc.parametrize("case", cases, ids=[case.name.split("/", 1)[1] for case in cases])
    if "implementation" in metafunc.fixturenames:
        metafunc.parametrize("implementation", IMPLEMENTATIONS)
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices())


@pytest.fixture
def measure(benchmark, request: pytest.FixtureRequest):
    """measure(case, implementation, device): warm up outside the timed region, then benchmark.pedantic."""
    settings = TIMING_SETTINGS[request.config.getoption("--ptfast-set")]

    def run(case: Case, implementation: str, device: str) -> None:
        device = torch.device(device)
        benchmark.group = f"{case.name} [{device.type}]"
        benchmark.extra_info.update(case=case.name, implementation=implementation, device=device.type)
        step = case.setup(device)[implementation]
        _, errors = warm_up({implementation: step}, device, settings.warmup_calls)
        if errors:
            # e.g. torch.compile failing on this machine: reported as a skip, like ptfast-bench does.
            pytest.skip(f"{implementation} failed: {errors[implementation]}")

        def synchronized_step() -> None:
            step()
            synchronize(device)  # so a CUDA call is timed to its end, not to its launch

        calls = 1 if benchmark.disabled else calls_per_sample(synchronized_step, device, settings)
        benchmark.pedantic(synchronized_step, rounds=settings.repeats, iterations=calls)

    return run
