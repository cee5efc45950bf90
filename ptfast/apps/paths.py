"""Checks the commands make on output paths before they start, so that a bad path is a usage error
at once and not a traceback after a long run."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_problem"]


def write_problem(path: Path, *, folder: bool) -> str | None:
    """Why `path` (a file, or a folder when `folder`) cannot be written, e.g. 'is a directory'; None if it can."""
    if not folder and path.is_dir():
        return "is a directory"
    existing = path if folder else path.parent
    while not existing.exists():  # writing creates the missing folders: the first existing one decides
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
