"""ptfast.apps.mnist.data: the IDX reader, the dataset layouts, the offline message and the batch iterator."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from common_utils import write_dataset, write_idx
from ptfast.apps.mnist import data


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _labels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 10, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed + 1))


def _write(folder, n_train=40, n_test=12, compress=True):
    return write_dataset(
        folder, (_images(n_train), _labels(n_train)), (_images(n_test, 7), _labels(n_test, 7)), compress=compress
    )


# --- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_hand_written_uint8(tmp_path, compress):
    payload = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 2, 3) + bytes(range(12))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    t = data.read_idx(path)
    assert t.dtype == torch.uint8 and t.shape == (2, 2, 3)
    assert torch.equal(t, torch.arange(12, dtype=torch.uint8).reshape(2, 2, 3))


def test_read_idx_big_endian_values(tmp_path):
    values = [1, -2, 70000]
    path = tmp_path / "y"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + struct.pack(">iii", *values))
    assert data.read_idx(path).tolist() == values
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 2) + struct.pack(">ff", 1.5, -0.25))
    assert data.read_idx(path).tolist() == [1.5, -0.25]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_write_read_round_trip(tmp_path, dtype, compress):
    t = (torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    path = write_idx(tmp_path / "t", t, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    got = data.read_idx(path)
    assert got.dtype == dtype and torch.equal(got, t)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x00\x08", "too short"),
        (bytes([1, 0, 0x08, 1]) + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (bytes([0, 0, 0x08, 0]), "not an IDX file"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 10), "truncated header"),
        (bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 3) + bytes(5), "truncated: shape \\(2, 3\\)"),
        (bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + bytes(7), "needs 8 data bytes, found 7"),
        (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + bytes(3), "trailing bytes"),
    ],
    ids=["short", "magic", "type", "ndim0", "header", "truncated", "truncated-int32", "trailing"],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(data.IdxFormatError, match=match) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
    good = gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1000) + bytes(1000))
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(data.IdxFormatError, match="gzip"):
        data.read_idx(path)


# --- layouts and load -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, sub",
    [("mnist", ""), ("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("fashion-mnist", "")],
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_finds_each_layout(tmp_path, dataset, sub, compress):
    _write(tmp_path / sub if sub else tmp_path, compress=compress)
    d = data.load(dataset, tmp_path, download_missing=False)
    assert d.train_images.dtype == torch.uint8 and d.train_images.shape == (40, 28, 28)
    assert d.test_images.shape == (12, 28, 28)
    assert d.train_labels.dtype == torch.int64 and torch.equal(d.train_labels, _labels(40).long())
    assert torch.equal(d.test_images, _images(12, 7))
    assert all(p.name.endswith(".gz") == compress for p in d.files.values())


def test_layout_of_the_other_dataset_is_not_used(tmp_path):
    _write(tmp_path / "FashionMNIST" / "raw")
    assert data.find_files(tmp_path, "mnist") is None
    assert data.find_files(tmp_path, "fashion-mnist") is not None


def test_raw_preferred_over_gzip_and_torchvision_layout(tmp_path):
    # torchvision keeps both the .gz and the extracted file in <root>/MNIST/raw.
    raw = tmp_path / "MNIST" / "raw"
    _write(raw, compress=True)
    _write(raw, compress=False)
    files = data.find_files(tmp_path, "mnist")
    assert all(p.parent == raw and p.suffix != ".gz" for p in files.values())


def test_load_from_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    files = _write(folder)
    for p in files.values():
        p.chmod(0o444)
    folder.chmod(0o555)
    try:
        d = data.load("fashion-mnist", folder, download_missing=False)
        assert d.train_images.shape[0] == 40
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in files.values())
    finally:
        folder.chmod(0o755)


def test_load_rejects_inconsistent_files(tmp_path):
    write_dataset(tmp_path, (_images(5), _labels(4)), (_images(3), _labels(3)))
    with pytest.raises(data.IdxFormatError, match="5 images but .* 4 labels"):
        data.load("mnist", tmp_path, download_missing=False)
    bad_labels = torch.tensor([0, 1, 2, 10], dtype=torch.uint8)
    write_dataset(tmp_path, (_images(4), bad_labels), (_images(3), _labels(3)))
    with pytest.raises(data.IdxFormatError, match="labels must be 0..9"):
        data.load("mnist", tmp_path, download_missing=False)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("cifar", tmp_path)


# --- offline ----------------------------------------------------------------------------------


def _assert_offline_message(message: str, root, folder: str) -> None:
    for name in data.FILES.values():
        assert f"{name}.gz" in message
    assert str(root) in message
    assert str(root / folder / "raw") in message


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_offline_message_without_download(tmp_path, dataset, folder):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load(dataset, tmp_path, download_missing=False)
    message = str(info.value)
    _assert_offline_message(message, tmp_path, folder)
    assert "download disabled" in message
    assert ("dataset-fashion-mnist" in message) == (dataset == "fashion-mnist")


def test_offline_message_when_download_fails(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def no_network(root, train=True, download=False, **kwargs):
        calls.append((root, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("mnist", tmp_path)
    assert calls == [(str(tmp_path), True)]
    message = str(info.value)
    _assert_offline_message(message, tmp_path, "MNIST")
    assert "download failed" in message and "Name or service not known" in message


def test_download_into_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    def fake_download(root, train=True, download=False, **kwargs):
        # What torchvision leaves: the archives and the extracted files in <root>/FashionMNIST/raw.
        _write(tmp_path / "FashionMNIST" / "raw", compress=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    d = data.load("fashion-mnist", tmp_path)
    assert d.files["train_images"].parent == tmp_path / "FashionMNIST" / "raw"
    assert d.train_images.shape == (40, 28, 28)


# --- normalisation and batches ------------------------------------------------------------------


def test_normalize_matches_the_tutorial_transform():
    from PIL import Image
    import torchvision.transforms as transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    images = _images(16)
    images[0, 0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    want = torch.stack([transform(Image.fromarray(img.numpy(), mode="L")) for img in images])
    got = data.normalize(images)
    assert got.dtype == torch.float32 and got.shape == (16, 1, 28, 28)
    assert torch.equal(got, want)  # bit for bit
    assert got.min() == -1 and got.max() == 1


def test_batches_shuffle_per_epoch_and_cover_everything():
    images, labels = _images(100), _labels(100).long()
    b = data.Batches(images, labels, 32, shuffle=True, seed=3)
    assert len(b) == 4
    epoch1 = [(x, y) for x, y in b]
    assert [x.shape[0] for x, _ in epoch1] == [32, 32, 32, 4]
    order1 = b.indices()
    assert sorted(order1.tolist()) == list(range(100))
    assert torch.equal(epoch1[0][0], data.normalize(images[order1[:32]]))
    assert torch.equal(torch.cat([y for _, y in epoch1]), labels[order1])
    again = data.Batches(images, labels, 32, shuffle=True, seed=3)
    assert torch.equal(again.indices(), order1)  # seeded: the same order for native and fused
    b.set_epoch(1)
    assert not torch.equal(b.indices(), order1)


def test_batches_unshuffled_and_drop_last():
    images, labels = _images(10), _labels(10).long()
    b = data.Batches(images, labels, 4)
    assert torch.equal(torch.cat([y for _, y in b]), labels)
    d = data.Batches(images, labels, 4, drop_last=True)
    assert len(d) == 2 and [x.shape[0] for x, _ in d] == [4, 4]


@pytest.mark.parametrize("n", [10, 11])
def test_batches_shard_like_distributed_sampler(n):
    from torch.utils.data import DistributedSampler

    images, labels = _images(n), torch.arange(n)
    train = [data.Batches(images, labels, 2, shuffle=True, seed=5, rank=r, world_size=3) for r in range(3)]
    sampler = [DistributedSampler(range(n), num_replicas=3, rank=r, shuffle=True, seed=5) for r in range(3)]
    for epoch in (0, 1):
        for b, s in zip(train, sampler):
            b.set_epoch(epoch)
            s.set_epoch(epoch)
            assert b.indices().tolist() == list(s)
    assert len({len(b) for b in train}) == 1  # equal step counts: DDP needs them
    seen = torch.cat([torch.cat([y for _, y in b]) for b in train])
    assert set(seen.tolist()) == set(range(n))
    test = [data.Batches(images, labels, 2, rank=r, world_size=3) for r in range(3)]
    seen = torch.cat([torch.cat([y for _, y in b]) for b in test])
    assert sorted(seen.tolist()) == list(range(n))  # evaluation: each sample exactly once


def test_batches_validate():
    with pytest.raises(ValueError, match="batch_size"):
        data.Batches(_images(3), _labels(3), 0)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.Batches(_images(3), _labels(2), 1)


@pytest.mark.skipif(
    data.find_files(data.DEBIAN_FASHION_MNIST, "fashion-mnist") is None,
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist_as_installed():
    d = data.load("fashion-mnist", data.DEBIAN_FASHION_MNIST, download_missing=False)
    assert d.train_images.shape == (60000, 28, 28) and d.test_images.shape == (10000, 28, 28)
    assert torch.equal(torch.bincount(d.test_labels), torch.full((10,), 1000))
