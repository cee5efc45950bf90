"""ptfast runs only with the torch it was compiled against, and says so."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptfast
from ptfast import _build_info
from ptfast._build_check import REBUILD, check_torch_version

PACKAGE = Path(ptfast.__file__).resolve().parent


def test_build_record_names_the_running_torch():
    # ptfast imported, so the check passed: the record is this torch's.
    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.CUDA_VERSION in (None, torch.version.cuda)


def test_same_torch_passes():
    check_torch_version("2.14.1+cu130", "2.14.1+cu130")


@pytest.mark.parametrize(
    "built, running",
    [("2.14.1+cu130", "2.13.0+cpu"), ("2.13.0", "2.14.1"), ("2.14.1+cu130", "2.14.1+cpu")],
    ids=["other-release", "no-local-labels", "other-local-label"],
)
def test_another_torch_raises_one_message_saying_how_to_rebuild(built, running):
    with pytest.raises(ImportError) as info:
        check_torch_version(built, running)
    message = str(info.value)
    assert message.startswith(f"ptfast: compiled against torch {built}, got torch {running}: ")
    assert f"`{REBUILD}`" in message
    assert message.endswith(f"or install torch {built}")


def copy_of_ptfast(tmp_path: Path, build_info: str | None) -> Path:
    """A copy of the imported ptfast package in tmp_path (the library linked, not
    copied) with `build_info` as its _build_info.py (None: none)."""
    copy = tmp_path / "ptfast"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.py"),
                    symlinks=True)
    for library in PACKAGE.glob("_C*.so"):
        (copy / library.name).symlink_to(library)
    if build_info is not None:
        (copy / "_build_info.py").write_text(build_info)
    return tmp_path


# An editable install's finder (setuptools' __editable__ module) would resolve
# ptfast's submodules in the installed checkout, past the copy: leave it out.
IMPORT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
try:
    import ptfast
except ImportError as error:
    print(error)
    print("ptfast._C loaded:", "ptfast._C" in sys.modules)
    sys.exit(1)
print("imported", ptfast.__file__)
"""


def import_ptfast_from(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", IMPORT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_against_another_torch_fails_before_loading_the_library(tmp_path):
    # The real import path, on a copy whose record names a torch that is not running.
    root = copy_of_ptfast(tmp_path, 'TORCH_VERSION = "2.99.0+fake"\nCUDA_VERSION = None\n')
    result = import_ptfast_from(root)
    assert result.returncode == 1, result.stdout + result.stderr
    message, loaded = result.stdout.splitlines()
    assert message == (
        f"ptfast: compiled against torch 2.99.0+fake, got torch {torch.__version__}: rebuild it against the "
        f"running torch in ptfast's source folder with `{REBUILD}` (add -e for an editable install), "
        "or install torch 2.99.0+fake"
    )
    assert loaded == "ptfast._C loaded: False"


def test_import_without_a_build_record_says_how_to_build(tmp_path):
    result = import_ptfast_from(copy_of_ptfast(tmp_path, None))
    assert result.returncode == 1, result.stdout + result.stderr
    message, loaded = result.stdout.splitlines()
    assert message.startswith("ptfast: `ptfast/_build_info.py`, written when ptfast._C is built, is missing: ")
    assert f"`{REBUILD}`" in message
    assert loaded == "ptfast._C loaded: False"


def test_import_of_the_copy_with_the_right_record_works(tmp_path):
    # The two tests above fail for the reason they check, not because the copy is broken.
    record = f'TORCH_VERSION = "{torch.__version__}"\nCUDA_VERSION = None\n'
    result = import_ptfast_from(copy_of_ptfast(tmp_path, record))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"imported {tmp_path / 'ptfast' / '__init__.py'}"


def installed_distribution() -> importlib.metadata.Distribution | None:
    """The installed distribution the imported ptfast comes from (None: imported from a source tree)."""
    try:
        dist = importlib.metadata.distribution("ptfast")
    except importlib.metadata.PackageNotFoundError:
        return None
    if Path(dist.locate_file("ptfast/__init__.py")).resolve() == PACKAGE / "__init__.py":
        return dist
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") and direct_url.get("url") == PACKAGE.parent.as_uri():
        return dist
    return None


def test_installed_metadata_requires_exactly_the_torch_built_against():
    dist = installed_distribution()
    if dist is None:
        pytest.skip("ptfast is imported from a source tree, not from an installed distribution")
    requirements = [r for r in dist.requires or [] if "extra ==" not in r]
    assert requirements == [f"torch=={importlib.metadata.version('torch')}"]
    assert dist.version == ptfast.__version__


@pytest.mark.parametrize("isas", ["AVX2", "DEFAULT,SSE9"])
def test_cpu_isa_subset_must_hold_default_and_known_names(isas):
    # benchmarks/gpu_check.sh builds the baseline copy only (PTFAST_CPU_ISAS=DEFAULT); a subset
    # without it would leave CPUs without a kernel, a misspelt one would be silently ignored.
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PTFAST_CPU_ISAS": isas, "PTFAST_CUDA": "0"}, timeout=120,
    )
    assert result.returncode != 0
    assert f"PTFAST_CPU_ISAS={isas}: a comma-separated subset of" in result.stderr
