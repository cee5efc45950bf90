"""Train the tutorial's MNIST CNN with ptfast's fused kernels: ``ptfast-mnist`` / ``python -m ptfast.train``.

The loop is the one of pytorch/examples' MNIST (the tutorial stops before
its training section): nll_loss on the network's log_softmax output, SGD
with momentum (or Adadelta with a per-epoch StepLR), a test pass each epoch.
The data comes from ptfast.data: the IDX files decoded once, batches
gathered and normalised as whole tensors.

    python -m ptfast.train --impl both --epochs 1        # native vs fused, side by side
    torchrun --nproc-per-node 4 -m ptfast.train ...      # data-parallel (DDP)

Every run ends with a summary line per model, printed whatever the options
(seconds and images/s are for training, the test pass excluded):

    fused: test accuracy 72.13% (7213/10000), test loss 0.7062, 3.5 s/epoch, 17164 images/s
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import ptfast
from ptfast import data as mnist_data
from ptfast.models import MnistCNN

__all__ = ["main", "build_parser", "TrainResult"]

IMPLS = ("native", "fused")


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptfast-mnist",
        description="Train the tutorial's MNIST CNN with ptfast's fused kernels (or natively, or both "
        "side by side). Data-parallel when launched by torchrun.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(mnist_data.DATASETS), default="mnist", help="(default: mnist)")
    g.add_argument(
        "--data-root",
        default="./data",
        metavar="DIR",
        help="folder holding the four IDX files (raw or .gz), directly or in torchvision's DIR/MNIST/raw or "
        "DIR/FashionMNIST/raw; downloaded there with torchvision when missing (default: ./data)",
    )
    g.add_argument("--no-download", action="store_true", help="never download; fail with instructions instead")

    g = p.add_argument_group("model and training")
    g.add_argument(
        "--impl",
        choices=(*IMPLS, "both"),
        default="fused",
        help="fused: ptfast.models.MnistCNN(fused=True) (default); native: the tutorial's Net as it is; "
        "both: native then fused from the same seed, then a side-by-side table",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto: cuda if available)"
    )
    g.add_argument("--epochs", type=int, default=10, help="(default: 10)")
    g.add_argument("--batch-size", type=int, default=64, help="per process (default: 64)")
    g.add_argument("--test-batch-size", type=int, default=1000, help="(default: 1000)")
    g.add_argument("--optimizer", choices=("sgd", "adadelta"), default="sgd", help="(default: sgd)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.01 for sgd, 1.0 for adadelta)")
    g.add_argument("--momentum", type=float, default=0.5, help="SGD momentum (default: 0.5)")
    g.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="learning-rate decay per epoch (default: 0.7 for adadelta, none for sgd)",
    )
    g.add_argument("--seed", type=int, default=1, help="(default: 1)")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument(
        "--compile-backend", default="inductor", metavar="NAME", help="torch.compile backend (default: inductor)"
    )
    g.add_argument(
        "--max-steps", type=int, default=None, metavar="N", help="stop after N training steps in all (smoke runs)"
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--save",
        metavar="PATH",
        default=None,
        help="save the trained state dict (it loads into the tutorial's Net); with --impl both the fused model's. "
        "'{impl}' in PATH becomes native/fused (both are saved), '{rank}' the process rank (every rank saves)",
    )
    g.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        metavar="PERCENT",
        help="exit with status 3 when a model's final test accuracy is below PERCENT (for CI)",
    )
    g.add_argument(
        "--verbose", "-v", action="store_true", help="per-epoch time split: data (index + normalise) vs compute"
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bars (off anyway when stderr is not a terminal)"
    )
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "test_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "adadelta" else 0.01
    if args.gamma is None:
        args.gamma = 0.7 if args.optimizer == "adadelta" else 1.0


# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------


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
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: CUDA is not available to this torch")
        device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _setup(choice: str) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    if not _launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(), _resolve_device(choice, Dist())
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = _resolve_device(choice, dist)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist, device


def _all_reduce(values: Sequence[float], dist: Dist, device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) `values` over the ranks; as they are with one process."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _load_data(args: argparse.Namespace, dist: Dist) -> mnist_data.MnistData:
    """Load the dataset; under torchrun only rank 0 downloads, and the others wait for its verdict."""
    if not dist.enabled:
        return mnist_data.load(args.dataset, args.data_root, download_missing=not args.no_download)
    loaded, error = None, None
    if dist.is_main:
        try:
            loaded = mnist_data.load(args.dataset, args.data_root, download_missing=not args.no_download)
        except (mnist_data.DatasetNotFoundError, mnist_data.IdxFormatError) as e:
            error = f"{type(e).__name__}\n{e}"
    verdict = [error]
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        kind, _, message = verdict[0].partition("\n")
        raise (mnist_data.IdxFormatError if kind == "IdxFormatError" else mnist_data.DatasetNotFoundError)(message)
    return loaded if loaded is not None else mnist_data.load(args.dataset, args.data_root, download_missing=False)


def _pil_pipeline_seconds(images: torch.Tensor, samples: int = 256) -> float | None:
    """Seconds per sample of the tutorial's per-sample transform: uint8 -> PIL -> ToTensor -> Normalize."""
    try:
        import torchvision.transforms as transforms
        from PIL import Image
    except ImportError:
        return None
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    sample = images[:samples].cpu()
    start = time.perf_counter()
    for img in sample:
        transform(Image.fromarray(img.numpy(), mode="L"))  # what torchvision.datasets.MNIST.__getitem__ does
    return (time.perf_counter() - start) / max(len(sample), 1)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class EpochStats:
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

    def summary(self) -> str:
        f = self.final
        return (
            f"{self.impl}: test accuracy {f.accuracy:.2f}% ({f.correct}/{f.total}), test loss {f.test_loss:.4f}, "
            f"{self.seconds_per_epoch:.1f} s/epoch, {self.images_per_second:.0f} images/s"
        )


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
    _sync(device)
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
    _sync(device)
    start = mark = time.perf_counter()
    while steps < total:
        x, target = next(it)
        if verbose:
            _sync(device)
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
            _sync(device)
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
    _sync(device)
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
    say,
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
        _sync(device)
        test_s = time.perf_counter() - t0
        images_all, loss_all, test_loss_all, correct_all, count_all = _all_reduce(
            [images, loss_sum, test_loss, correct, count], dist, device
        )
        slowest = torch.distributed.ReduceOp.MAX if dist.enabled else None
        seconds_max, data_max, compute_max, test_max = _all_reduce(
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


def format_table(results: Sequence[TrainResult]) -> str:
    """The side-by-side table of --impl both."""
    rows = [("impl", "s/epoch", "images/s", "test loss", "test accuracy")]
    for r in results:
        f = r.final
        rows.append(
            (r.impl, f"{r.seconds_per_epoch:.2f}", f"{r.images_per_second:.0f}", f"{f.test_loss:.4f}",
             f"{f.accuracy:.2f}%")
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    by_impl = {r.impl: r for r in results}
    if "native" in by_impl and "fused" in by_impl:
        speedup = by_impl["native"].seconds_per_epoch / by_impl["fused"].seconds_per_epoch
        lines.append(f"fused vs native: {speedup:.2f}x the speed")
    return "\n".join(lines)


def _save(result: TrainResult, path_template: str, args: argparse.Namespace, dist: Dist) -> Path | None:
    path = Path(path_template.replace("{impl}", result.impl).replace("{rank}", str(dist.rank)))
    if "{rank}" not in path_template and not dist.is_main:
        return None
    if args.impl == "both" and "{impl}" not in path_template and result.impl != "fused":
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save(state, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    dist, device = _setup(args.device)

    def say(message: str) -> None:
        if dist.is_main:
            print(message, flush=True)

    try:
        t0 = time.perf_counter()
        try:
            dataset = _load_data(args, dist)
        except (mnist_data.DatasetNotFoundError, mnist_data.IdxFormatError) as e:
            if dist.is_main:
                print(f"ptfast-mnist: {e}", file=sys.stderr, flush=True)
            return 1
        load_seconds = time.perf_counter() - t0
        if device.type != "cpu":
            dataset = dataset.to(device)
        if args.verbose:
            n = sum(t.shape[0] for t in (dataset.train_images, dataset.test_images))
            say(
                f"data: {args.dataset}, {n} images decoded from IDX into uint8 tensors on {device} in "
                f"{load_seconds:.2f} s ({dataset.files['train_images'].parent})"
            )
            pil = _pil_pipeline_seconds(dataset.train_images) if dist.is_main else None
            if pil is not None:
                say(
                    f"data: for comparison, torchvision's per-sample pipeline (PIL image, ToTensor, Normalize) "
                    f"would take about {pil * len(dataset.train_images):.1f} s per epoch on these "
                    f"{len(dataset.train_images)} training images, before batching"
                )
        say(
            f"ptfast {ptfast.__version__}, torch {torch.__version__}: {args.dataset} on {device}"
            + (f" x {dist.world_size} processes (DDP)" if dist.enabled else "")
            + f", batch size {args.batch_size}, {args.optimizer} lr {args.lr}"
            + (f" momentum {args.momentum}" if args.optimizer == "sgd" else "")
            + (", torch.compile" if args.compile else "")
        )
        impls = IMPLS if args.impl == "both" else (args.impl,)
        results = [train(impl, args, dataset, device, dist, say) for impl in impls]
        if args.save is not None:
            for result in results:
                path = _save(result, args.save, args, dist)
                if path is not None and (dist.is_main or "{rank}" in args.save):
                    print(f"saved {result.impl} state dict to {path}", flush=True)
        if len(results) > 1:
            say("")
            say(format_table(results))
        for result in results:
            say(result.summary())
        if args.min_accuracy is not None:
            low = [r for r in results if not r.final.accuracy >= args.min_accuracy]
            if low:
                say(
                    "below --min-accuracy "
                    f"{args.min_accuracy:g}%: " + ", ".join(f"{r.impl} {r.final.accuracy:.2f}%" for r in low)
                )
                return 3
        return 0
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
