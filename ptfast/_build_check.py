"""Refuse a torch other than the one ptfast._C was compiled against.

A C++ extension works only with the torch it was built against: against
another one it fails to load with an undefined symbol, or worse, loads and
misbehaves. setup.py records that torch in ptfast/_build_info.py (generated,
not in git); ``import ptfast`` calls :func:`check_torch_version` before it
loads ptfast._C.
"""

from __future__ import annotations

import torch

__all__ = ["REBUILD", "check_torch_version"]

# Run in ptfast's source folder; -e keeps an editable install editable.
REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def check_torch_version(built: str | None = None, running: str | None = None) -> None:
    """Raise ImportError unless `running` (default: torch.__version__) is the torch
    `built` (default: the one recorded in ptfast/_build_info.py) names."""
    if built is None:
        try:
            from ptfast._build_info import TORCH_VERSION as built
        except ImportError:
            raise ImportError(
                "ptfast: `ptfast/_build_info.py`, written when ptfast._C is built, is missing: ptfast "
                f"is not built, or was built before builds recorded their torch; build it in ptfast's "
                f"source folder with `{REBUILD}` (or `python setup.py build_ext --inplace` to run from there)"
            ) from None
    if running is None:
        running = torch.__version__
    if str(built) != str(running):
        raise ImportError(
            f"ptfast: compiled against torch {built}, got torch {running}: rebuild it against the "
            f"running torch in ptfast's source folder with `{REBUILD}` (add -e for an editable install), "
            f"or install torch {built}"
        )
