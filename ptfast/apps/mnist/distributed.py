"""One process, or one rank of a torchrun job: the process group, the device, reductions over ranks.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, more than one process)
the trainer joins a process group (gloo on CPU, nccl on CUDA); otherwise every
function here is the single-process identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ptfast.apps.mnist import data as mnist_data

__all__ = ["Dist", "all_reduce", "load_dataset", "process_group", "sync"]


@dataclass
class Dist:
    """Where this process stands: one process, or one rank of a torchrun job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve_device(choice: str, dist: Dist) -> torch.device:
    """The device for ``--device`` auto|cpu|cuda; the caller has checked that CUDA is there for 'cuda'."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(device_choice: str) -> Iterator[tuple[Dist, torch.device]]:
    """This process's place and device; under torchrun, a member of the process group within the block.

    Leaving the block, every rank meets the others at a barrier and only then destroys the group:
    a rank that tore its connections down while another was still saving or printing could make
    that one abort ("terminate called without an active exception"). A rank leaving on an
    exception or an interrupt skips the barrier (the others may never reach it; torchrun stops
    them) but still destroys its group.
    """
    if not _launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Dist(), _resolve_device(device_choice, Dist())
        return
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = _resolve_device(device_choice, dist)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    clean = False
    try:
        yield dist, device
        clean = True
    except SystemExit:
        clean = True  # a user error ends every rank alike (the dataset's verdict is broadcast)
        raise
    finally:
        try:
            if clean:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def all_reduce(values: Sequence[float], dist: Dist, device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) `values` over the ranks; as they are with one process."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_dataset(dataset: str, root: str, download: bool, dist: Dist) -> mnist_data.MnistData:
    """Load the dataset; under torchrun only rank 0 downloads, and the others wait for its verdict.

    Raises DatasetNotFoundError or IdxFormatError on every rank when rank 0 could not load it.
    """
    if not dist.enabled:
        return mnist_data.load(dataset, root, download_missing=download)
    loaded, error = None, None
    if dist.is_main:
        try:
            loaded = mnist_data.load(dataset, root, download_missing=download)
        except (mnist_data.DatasetNotFoundError, mnist_data.IdxFormatError) as e:
            error = f"{type(e).__name__}\n{e}"
    verdict = [error]
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        kind, _, message = verdict[0].partition("\n")
        raise (mnist_data.IdxFormatError if kind == "IdxFormatError" else mnist_data.DatasetNotFoundError)(message)
    return loaded if loaded is not None else mnist_data.load(dataset, root, download_missing=False)
