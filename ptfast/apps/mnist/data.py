"""MNIST and Fashion-MNIST as whole tensors: an IDX reader and a batch iterator.

The tutorial loads MNIST with ``torchvision.datasets.MNIST`` and a
``DataLoader`` that turns every sample into a PIL image, then into a tensor,
then normalises it, one sample at a time. For a network this small that
per-sample pipeline costs as much as the training step. Here the four IDX
files are decoded once into one uint8 tensor per split (kept on the training
device when it is a GPU), and each batch is gathered by index and normalised
as a whole, with exactly the tutorial's arithmetic::

    ToTensor() + Normalize((0.5,), (0.5,))  ==  (x / 255 - 0.5) / 0.5   (float32)

    load("mnist", "./data")              -> MnistData (uint8 images, int64 labels)
    Batches(images, labels, 64, ...)     -> iterable of (B, 1, 28, 28) float32, (B,) int64
"""

from __future__ import annotations

import gzip
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "FILES",
    "Batches",
    "DatasetNotFoundError",
    "IdxFormatError",
    "MnistData",
    "download",
    "find_files",
    "load",
    "normalize",
    "read_idx",
    "shard",
]

# Where Debian's package `dataset-fashion-mnist` puts the four .gz files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# --dataset name -> (torchvision class name, which is also its folder under the root; what to call it).
DATASETS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "Fashion-MNIST"),
}

# The file names both datasets use, without the optional ".gz".
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type code -> (torch dtype, bytes per element). Values are big-endian.
_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}

_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """A file is not a well-formed IDX file (bad magic, wrong size, unreadable gzip)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are neither on disk nor downloadable; the message says what goes where."""


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> Tensor:
    """The tensor stored in an IDX file, raw or gzip-compressed (told apart by content, not name).

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, each
    dimension as a big-endian uint32, then the values, big-endian, C order.
    The file must hold exactly that many values; anything else raises
    IdxFormatError naming the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_TYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x0000TTDD with type "
            f"TT one of {', '.join(f'{c:02x}' for c in _IDX_TYPES)} and DD >= 1 dimensions)"
        )
    dtype, itemsize = _IDX_TYPES[code]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(raw)} bytes; {ndim} dimensions need {header})")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(shape) * itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: {what}: shape {tuple(shape)} of {dtype} needs {expected} data bytes, found {found}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header, count=expected)
    if itemsize > 1 and sys.byteorder == "little":
        # Big-endian on disk: reverse each value's bytes.
        data = data.view(-1, itemsize).flip(-1).contiguous().view(-1)
    return data.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Finding, downloading and loading the dataset
# ---------------------------------------------------------------------------------------------


def candidate_dirs(root: str | os.PathLike, dataset: str) -> list[Path]:
    """Folders searched, in order: the root itself, torchvision's ``<root>/<Class>/raw``, ``<root>/<Class>``."""
    folder = DATASETS[dataset][0]
    root = Path(root)
    return [root, root / folder / "raw", root / folder]


def find_files(root: str | os.PathLike, dataset: str = "mnist") -> dict[str, Path] | None:
    """The four IDX files of `dataset` under `root`, or None when no searched folder holds all four.

    Each file may be raw (``train-images-idx3-ubyte``) or gzip
    (``train-images-idx3-ubyte.gz``); raw is preferred when both are there.
    """
    _check_dataset(dataset)
    for folder in candidate_dirs(root, dataset):
        found = {}
        for key, name in FILES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(FILES):
            return found
    return None


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _missing_message(root: Path, dataset: str, reason: str) -> str:
    folder, title = DATASETS[dataset]
    dirs = "\n".join(f"    {d}" for d in candidate_dirs(root, dataset))
    names = "\n".join(f"    {name}.gz  (or {name}, uncompressed)" for name in FILES.values())
    lines = [
        f"{title} not found under {root} ({reason}).",
        "Put these four IDX files (from the dataset's official site or any mirror)",
        names,
        "in one of these folders:",
        dirs,
        "or pass --data-root pointing at the folder that holds them.",
    ]
    mirrors = _mirrors(folder)
    if mirrors:
        lines.append(f"torchvision downloads them from: {', '.join(mirrors)}")
    if dataset == "fashion-mnist":
        lines.append(
            f"On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in {DEBIAN_FASHION_MNIST};"
            f" then use --data-root {DEBIAN_FASHION_MNIST}"
            + (" (it is installed on this machine)." if Path(DEBIAN_FASHION_MNIST).is_dir() else ".")
        )
    return "\n".join(lines)


def _mirrors(folder: str) -> list[str]:
    """Where torchvision downloads the dataset from (nothing if torchvision is missing)."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return []
    return list(getattr(getattr(tvd, folder, None), "mirrors", []) or [])


def download(root: str | os.PathLike, dataset: str) -> None:
    """Download `dataset` into ``<root>/<Class>/raw`` with torchvision, as the tutorial does.

    Raises DatasetNotFoundError with the offline instructions when torchvision
    is missing or every mirror fails.
    """
    root = Path(root)
    folder, _ = DATASETS[dataset]
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetNotFoundError(_missing_message(root, dataset, f"torchvision is not installed: {e}")) from e
    cls = getattr(tvd, folder)
    try:
        # The constructor downloads train and test files and extracts them into <root>/<Class>/raw.
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001  (any failure: no network, a mirror down, a bad checksum)
        reason = f"the download failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise DatasetNotFoundError(_missing_message(root, dataset, reason)) from e


@dataclass
class MnistData:
    """A dataset's two splits: images uint8 (N, 28, 28), labels int64 (N,)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    files: dict[str, Path]

    def to(self, device: torch.device | str) -> "MnistData":
        return MnistData(*(t.to(device) for t in self.tensors()), files=self.files)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.train_images, self.train_labels, self.test_images, self.test_labels


def _check_split(images: Tensor, labels: Tensor, files: dict[str, Path], split: str) -> None:
    img, lab = files[f"{split}_images"], files[f"{split}_labels"]
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise IdxFormatError(f"{img}: expected uint8 images (N, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise IdxFormatError(f"{lab}: expected uint8 labels (N,), got {labels.dtype} {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(f"{img} holds {images.shape[0]} images but {lab} holds {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) > 9:
        raise IdxFormatError(f"{lab}: labels must be 0..9, found {int(labels.max())}")


def load(
    dataset: str = "mnist",
    root: str | os.PathLike = "./data",
    *,
    download_missing: bool = True,
    device: torch.device | str | None = None,
) -> MnistData:
    """Read `dataset` from `root` (layouts: see find_files), downloading it first if missing and allowed.

    Files are only read, never written or decompressed to disk, so a
    read-only folder such as Debian's works as it is.
    """
    _check_dataset(dataset)
    root = Path(root).expanduser()
    files = find_files(root, dataset)
    if files is None:
        if not download_missing:
            raise DatasetNotFoundError(_missing_message(root, dataset, "download disabled"))
        download(root, dataset)
        files = find_files(root, dataset)
        if files is None:
            raise DatasetNotFoundError(_missing_message(root, dataset, "the download left no usable files"))
    tensors = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        _check_split(tensors[f"{split}_images"], tensors[f"{split}_labels"], files, split)
    data = MnistData(
        tensors["train_images"],
        tensors["train_labels"].long(),
        tensors["test_images"],
        tensors["test_labels"].long(),
        files=files,
    )
    return data if device is None else data.to(device)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, H, W) -> float32 (B, 1, H, W): ToTensor() then Normalize((0.5,), (0.5,)), bit for bit."""
    return images.unsqueeze(1).to(torch.float32).div_(255).sub_(0.5).div_(0.5)


def shard(order: Tensor, rank: int, world_size: int, pad: bool) -> Tensor:
    """This rank's part of `order`, as torch.utils.data.DistributedSampler splits it.

    With `pad` (training), the order is first extended with its own head to a
    multiple of world_size so every rank runs the same number of steps; without
    it (evaluation), every index is seen exactly once.
    """
    if world_size == 1:
        return order
    if pad:
        total = math.ceil(len(order) / world_size) * world_size
        extra = total - len(order)
        if extra:
            order = torch.cat([order, order.repeat(math.ceil(extra / max(len(order), 1)))[:extra]])
    return order[rank::world_size]


def _as_wide_rows(images: Tensor) -> Tensor:
    """`images` (N, ...) uint8 as (N, K) rows of the widest integer type that divides a row.

    Gathering a batch of 28x28 uint8 images moves 784 bytes per row either way,
    but as 98 int64 values it is one small copy; as 784 uint8 values torch
    splits it across threads, which on a busy CPU can cost milliseconds a batch.
    """
    rows = images.contiguous().view(images.shape[0], -1)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if rows.shape[1] % size == 0 and rows.shape[1] > 0:
            return rows.view(dtype)
    return rows


class Batches:
    """Batches of (normalised images, labels) from whole uint8 tensors.

    Each epoch's order is a permutation from a torch.Generator seeded with
    ``seed + epoch`` (set with set_epoch, as for DistributedSampler), the same
    on every rank, then split among ranks. Batches are gathered by index on the
    images' device, moved to `device` and normalised there.

    Shapes: images (N, H, W) uint8, labels (N,) int64; yields (B, 1, H, W)
    float32 and (B,) int64 on `device`.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self._rows = _as_wide_rows(images)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.device = torch.device(device) if device is not None else images.device
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = self.images.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return shard(order, self.rank, self.world_size, pad=self.shuffle)

    @property
    def num_samples(self) -> int:
        n = self.images.shape[0]
        if self.world_size == 1:
            per_rank = n
        elif self.shuffle:
            per_rank = math.ceil(n / self.world_size)
        else:
            per_rank = len(range(self.rank, n, self.world_size))
        return per_rank - per_rank % self.batch_size if self.drop_last else per_rank

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices().to(self.images.device)
        for start in range(0, self.num_samples - (self.batch_size - 1 if self.drop_last else 0), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self._rows.index_select(0, idx).view(torch.uint8).view(-1, *self.images.shape[1:])
            x = x.to(self.device, non_blocking=True)
            y = self.labels.index_select(0, idx).to(self.device, non_blocking=True)
            yield normalize(x), y

