"""The repository's shape: one pytest call collects everything; the library never imports the applications."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
    )


def test_one_pytest_call_collects_tests_and_benchmarks():
    """tests/ and benchmarks/ each have a conftest.py: helpers imported `from conftest` broke collection."""
    proc = _python("-m", "pytest", "tests", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "errors" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
    collected = proc.stdout.splitlines()
    assert any(line.startswith("tests/test_train.py::") for line in collected)
    assert any(line.startswith("benchmarks/test_bench_log_softmax.py::") for line in collected)


def test_quick_selection_leaves_out_the_slow_runs():
    proc = _python("-m", "pytest", "-m", "not slow", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = proc.stdout
    assert "tests/test_conv2d_relu_max_pool2d.py::" in selected  # testpaths: tests and benchmarks
    for slow in ("test_ddp_two_cpu_processes", "test_kernels_per_instruction_set", "test_fifty_sgd_steps",
                 "test_pytest_benchmarks_smoke", "benchmarks/test_bench_"):
        assert slow not in selected, slow


def test_the_library_never_imports_the_applications():
    """Importing ptfast (every public module) loads nothing of ptfast.apps, nor does ptfast name it."""
    code = (
        "import sys, ptfast, ptfast.functional, ptfast.nn, ptfast.models\n"
        "print(sorted(m for m in sys.modules if m.startswith('ptfast.apps')))"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    library = [p for p in (ROOT / "ptfast").rglob("*.py") if "apps" not in p.relative_to(ROOT / "ptfast").parts]
    assert library
    for path in library:
        assert "ptfast.apps" not in path.read_text(), path


README = (ROOT / "README.md").read_text()


def test_readme_sections_cited_in_the_code_exist():
    sources = "\n".join(p.read_text() for p in (ROOT / "ptfast").rglob("*.py"))
    cited = re.findall(r'README, "([^"]+)"', sources)
    assert cited
    for title in cited:
        assert f"\n## {title}\n" in README, title


def test_the_api_table_is_one_table():
    section = README.split("\n## API\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    table = section[: next(i for i, line in enumerate(section) if not line.startswith("|"))]
    for name in ("ptfast.conv2d_relu_max_pool2d(", "ptfast.log_softmax(", "ptfast.nn.Conv2dReLUMaxPool2d(",
                 "ptfast.nn.LogSoftmax(", "ptfast.fuse(model)", "ptfast.models.MnistCNN("):
        assert any(row.startswith(f"| `{name}") for row in table), name
    assert not any(line.startswith("|") for line in section[len(table):])


def test_the_tutorials_net_is_written_once():
    """examples/mnist_cnn.py writes it as the tutorial does; the tests load it from there."""
    from tutorial import Net

    sources = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "build" not in p.parts]
    defining = [p.relative_to(ROOT).as_posix() for p in sources if "\nclass Net(nn.Module):" in p.read_text()]
    assert defining == ["examples/mnist_cnn.py"]
    assert Net.__module__ == "example_mnist_cnn"


def test_modules_the_docs_run_exist():
    """Every `python -m X` / `torchrun ... -m X` in the READMEs and entry points names a module that exists."""
    import importlib.util
    import tomllib

    docs = README + (ROOT / "benchmarks" / "README.md").read_text()
    modules = set(re.findall(r"(?:python3? |torchrun .*?)-m (ptfast[\w.]*)", docs))
    assert {"ptfast.apps.mnist", "ptfast.apps.bench"} <= modules
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"ptfast-mnist", "ptfast-bench"}
    modules |= {target.split(":")[0] for target in scripts.values()}
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, module
