"""The training loop of pytorch/examples' MNIST (the tutorial stops before its training section).

nll_loss on the network's log_softmax output, SGD with momentum (or Adadelta
with a per-epoch StepLR), a test pass each epoch; one untimed warm-up step
first, then per-epoch times of the training alone (and, with --verbose, of
data and compute apart), reduced over the ranks of a torchrun job.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptfast.apps.mnist import data as mnist_data
from ptfast.apps.mnist.distributed import Dist, all_reduce, sync
from ptfast.models import MnistCNN

__all__ = ["IMPLS", "EpochStats", "TrainResult", "train"]

IMPLS = ("native", "fused")


@dataclass
class EpochStats:
    """One epoch over all ranks: training steps, images and loss; test loss and accuracy; times."""

    epoch: int
    steps: int
    images: int  # over all ranks
    seconds: float  # training wall time, slowest rank
    train_loss: float
    test_loss: float
    correct: int
    total: int
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    test_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else float("nan")


@dataclass
class TrainResult:
    """One implementation's run: its epochs' stats and the trained module (unwrapped from DDP/compile)."""

    impl: str
    epochs: list[EpochStats] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def final(self) -> EpochStats:
        return self.epochs[-1]

    @property
    def seconds_per_epoch(self) -> float:
        return sum(e.seconds for e in self.epochs) / len(self.epochs)

    @property
    def images_per_second(self) -> float:
        seconds = sum(e.seconds for e in self.epochs)
        return sum(e.images for e in self.epochs) / seconds if seconds > 0 else float("nan")


def _build_model(impl: str, args: argparse.Namespace, device: torch.device, dist: Dist):
    """(the model to call, the plain module whose state dict is saved)."""
    torch.manual_seed(args.seed)
    net = MnistCNN(fused=impl == "fused").to(device)
    model: nn.Module = net
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    return model, net


def _warm_up(model: nn.Module, net: nn.Module, batches: mnist_data.Batches, device: torch.device) -> float:
    """One untimed training forward and backward and one eval forward, so that one-time costs (lazy
    initialisation, kernel selection, torch.compile, DDP's first step) stay out of the timed epochs.

    No optimizer step is taken, the gradients are dropped and the RNG state is restored: training
    goes on exactly as without it. Returns the seconds it took.
    """
    start = time.perf_counter()
    x, target = next(iter(batches))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        F.nll_loss(model(x), target).backward()
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.eval()
            model(x)
    sync(device)
    return time.perf_counter() - start


def _optimizer(args: argparse.Namespace, params):
    if args.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=args.lr)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False, file=sys.stderr)


def _train_epoch(model, optimizer, batches, device, args, steps_left, bar_desc, show_bar):
    """One epoch (or until steps_left runs out): (steps, images, loss_sum, seconds, data_seconds, compute_seconds)."""
    model.train()
    total = len(batches) if steps_left is None else min(len(batches), steps_left)
    verbose = args.verbose
    steps = images = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    data_s = compute_s = 0.0
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps, window_images, window_start = 0, 0, time.perf_counter()
    it = iter(batches)
    bar = _progress(None, total, bar_desc, show_bar)
    sync(device)
    start = mark = time.perf_counter()
    while steps < total:
        x, target = next(it)
        if verbose:
            sync(device)
            now = time.perf_counter()
            data_s += now - mark
            mark = now
        optimizer.zero_grad(set_to_none=True)
        output = model(x)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        steps += 1
        images += x.shape[0]
        loss_sum += loss.detach() * x.shape[0]
        if verbose:
            sync(device)
            now = time.perf_counter()
            compute_s += now - mark
            mark = now
        if bar is not None:
            window_loss += loss.detach()
            window_steps += 1
            window_images += x.shape[0]
            if steps % 10 == 0 or steps == total:
                # The only host-device sync of the loop without --verbose: one per 10 steps, for the bar.
                now = time.perf_counter()
                rate = window_images / (now - window_start)
                bar.set_postfix({"loss": f"{float(window_loss) / window_steps:.4f}", "images/s": f"{rate:.0f}"})
                window_loss.zero_()
                window_steps, window_images, window_start = 0, 0, now
            bar.update(1)
    sync(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return steps, images, float(loss_sum), seconds, data_s, compute_s


@torch.no_grad()
def _evaluate(model, batches, device) -> tuple[float, int, int]:
    """(summed nll loss, correct, count) over this rank's share of the test set."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, target in batches:
        output = model(x)
        loss_sum += F.nll_loss(output, target, reduction="sum").double()
        correct += (output.argmax(dim=1) == target).sum()
        count += x.shape[0]
    return float(loss_sum), int(correct), count


def _dropout_seed(seed: int, epoch: int, dist: Dist) -> int:
    """Seed of the global RNG (dropout masks) for `epoch`: equal for native and fused, distinct per rank."""
    return (seed + epoch) * dist.world_size + dist.rank


def train(
    impl: str,
    args: argparse.Namespace,
    dataset: mnist_data.MnistData,
    device: torch.device,
    dist: Dist,
    say: Callable[[str], None],
) -> TrainResult:
    """Build `impl`'s model from args.seed and train it; the result holds the per-epoch stats and the module."""
    model, net = _build_model(impl, args, device, dist)
    optimizer = _optimizer(args, net.parameters())
    scheduler = None
    if args.gamma != 1.0:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    train_batches = mnist_data.Batches(
        dataset.train_images, dataset.train_labels, args.batch_size, shuffle=True, seed=args.seed,
        device=device, rank=dist.rank, world_size=dist.world_size,
    )
    test_batches = mnist_data.Batches(
        dataset.test_images, dataset.test_labels, args.test_batch_size, device=device,
        rank=dist.rank, world_size=dist.world_size,
    )
    warm_up_seconds = _warm_up(model, net, train_batches, device)
    if args.verbose:
        say(f"[{impl}] warm-up (one untimed step{', torch.compile' if args.compile else ''}): {warm_up_seconds:.2f} s")
    show_bar = dist.is_main and not args.no_progress and sys.stderr.isatty()
    result = TrainResult(impl, model=net)
    steps_done = 0
    for epoch in range(1, args.epochs + 1):
        train_batches.set_epoch(epoch)
        torch.manual_seed(_dropout_seed(args.seed, epoch, dist))
        steps_left = None if args.max_steps is None else args.max_steps - steps_done
        steps, images, loss_sum, seconds, data_s, compute_s = _train_epoch(
            model, optimizer, train_batches, device, args, steps_left, f"{impl} epoch {epoch}", show_bar
        )
        steps_done += steps
        if scheduler is not None:
            scheduler.step()
        t0 = time.perf_counter()
        test_loss, correct, count = _evaluate(model, test_batches, device)
        sync(device)
        test_s = time.perf_counter() - t0
        images_all, loss_all, test_loss_all, correct_all, count_all = all_reduce(
            [images, loss_sum, test_loss, correct, count], dist, device
        )
        slowest = torch.distributed.ReduceOp.MAX if dist.enabled else None
        seconds_max, data_max, compute_max, test_max = all_reduce(
            [seconds, data_s, compute_s, test_s], dist, device, slowest
        )
        stats = EpochStats(
            epoch, steps, int(images_all), seconds_max, loss_all / max(images_all, 1),
            test_loss_all / max(count_all, 1), int(correct_all), int(count_all), data_max, compute_max, test_max,
        )  # fmt: skip
        result.epochs.append(stats)
        say(
            f"[{impl}] epoch {epoch}: train loss {stats.train_loss:.4f}, test loss {stats.test_loss:.4f}, "
            f"accuracy {stats.accuracy:.2f}% ({stats.correct}/{stats.total}), {stats.seconds:.1f} s, "
            f"{stats.images_per_second:.0f} images/s"
        )
        if args.verbose:
            say(
                f"[{impl}] epoch {epoch} time: data (index + normalise) {stats.data_seconds:.2f} s, "
                f"compute (forward + backward + step) {stats.compute_seconds:.2f} s; "
                f"test pass {stats.test_seconds:.2f} s"
            )
        if args.max_steps is not None and steps_done >= args.max_steps:
            break
    return result
