"""Train the tutorial's MNIST CNN with ptfast's fused kernels: ``ptfast-mnist`` / ``python -m ptfast.apps.mnist``.

The loop is the one of pytorch/examples' MNIST (the tutorial stops before
its training section): nll_loss on the network's log_softmax output, SGD
with momentum (or Adadelta with a per-epoch StepLR), a test pass each epoch.
The data comes from ptfast.apps.mnist.data: the IDX files decoded once, batches
gathered and normalised as whole tensors. A user error (a missing dataset, an
unwritable --save path, CUDA asked for but absent) ends as argparse's own do:
usage, ``ptfast-mnist: error: ...`` and exit status 2.

    python -m ptfast.apps.mnist --impl both --epochs 1        # native vs fused, side by side
    torchrun --nproc-per-node 4 -m ptfast.apps.mnist ...      # data-parallel (DDP)

Every run ends with a summary line per model, printed whatever the options
(seconds and images/s are for training, the test pass excluded):

    fused: test accuracy 72.13% (7213/10000), test loss 0.7062, 3.5 s/epoch, 17164 images/s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

import torch

import ptfast
from ptfast.apps.mnist import data as mnist_data
from ptfast.apps.mnist.distributed import Dist, load_dataset, process_group
from ptfast.apps.mnist.report import format_table, pil_pipeline_seconds, save_state_dict, summary_line
from ptfast.apps.mnist.training import IMPLS, train
from ptfast.apps.paths import write_problem

__all__ = ["build_parser", "main"]


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
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available to this torch")
    if args.compile and args.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        p.error(
            f"--compile-backend {args.compile_backend!r}: not a torch.compile backend; expected one of "
            + ", ".join(torch.compiler.list_backends())
        )
    if args.save is not None:
        problem = write_problem(Path(args.save), folder=False)
        if problem:
            p.error(f"--save {args.save}: {problem}")
    if args.lr is None:
        args.lr = 1.0 if args.optimizer == "adadelta" else 0.01
    if args.gamma is None:
        args.gamma = 0.7 if args.optimizer == "adadelta" else 1.0


def _fail(parser: argparse.ArgumentParser, dist: Dist, message: str) -> NoReturn:
    """End as argparse does for its own errors (exit status 2); under torchrun only rank 0 prints."""
    if dist.is_main:
        parser.error(message)
    parser.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``ptfast-mnist``: 0 when done, 3 below --min-accuracy; user errors exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    with process_group(args.device) as (dist, device):
        return _run(parser, args, dist, device)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, dist: Dist, device: torch.device) -> int:
    def say(message: str) -> None:
        if dist.is_main:
            print(message, flush=True)

    t0 = time.perf_counter()
    try:
        dataset = load_dataset(args.dataset, args.data_root, not args.no_download, dist)
    except (mnist_data.DatasetNotFoundError, mnist_data.IdxFormatError) as e:
        _fail(parser, dist, str(e))
    load_seconds = time.perf_counter() - t0
    if device.type != "cpu":
        dataset = dataset.to(device)
    if args.verbose:
        n = sum(t.shape[0] for t in (dataset.train_images, dataset.test_images))
        say(
            f"data: {args.dataset}, {n} images decoded from IDX into uint8 tensors on {device} in "
            f"{load_seconds:.2f} s ({dataset.files['train_images'].parent})"
        )
        pil = pil_pipeline_seconds(dataset.train_images) if dist.is_main else None
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
            try:
                path = save_state_dict(result, args.save, args.impl, dist)
            except OSError as e:  # e.g. the disk filled up during training
                _fail(parser, dist, f"--save {args.save}: {e.strerror or e}")
            if path is not None and (dist.is_main or "{rank}" in args.save):
                print(f"saved {result.impl} state dict to {path}", flush=True)
    if len(results) > 1:
        say("")
        say(format_table(results))
    for result in results:
        say(summary_line(result))
    if args.min_accuracy is not None:
        low = [r for r in results if not r.final.accuracy >= args.min_accuracy]
        if low:
            say(
                "below --min-accuracy "
                f"{args.min_accuracy:g}%: " + ", ".join(f"{r.impl} {r.final.accuracy:.2f}%" for r in low)
            )
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
