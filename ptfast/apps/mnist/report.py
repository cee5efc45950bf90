"""What ``ptfast-mnist`` prints and writes: the side-by-side table, the summary lines, state dicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from ptfast.apps.mnist.distributed import Dist
from ptfast.apps.mnist.training import TrainResult

__all__ = ["format_table", "pil_pipeline_seconds", "save_state_dict", "summary_line"]


def summary_line(result: TrainResult) -> str:
    """The line every run ends with, per model, whatever the options."""
    f = result.final
    return (
        f"{result.impl}: test accuracy {f.accuracy:.2f}% ({f.correct}/{f.total}), test loss {f.test_loss:.4f}, "
        f"{result.seconds_per_epoch:.1f} s/epoch, {result.images_per_second:.0f} images/s"
    )


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


def save_state_dict(result: TrainResult, path_template: str, impl_choice: str, dist: Dist) -> Path | None:
    """Save `result`'s trained state dict (on the CPU) where --save says; the path, or None if this
    process does not save it ('{impl}' and '{rank}' in the template: see --save's help)."""
    path = Path(path_template.replace("{impl}", result.impl).replace("{rank}", str(dist.rank)))
    if "{rank}" not in path_template and not dist.is_main:
        return None
    if impl_choice == "both" and "{impl}" not in path_template and result.impl != "fused":
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    torch.save(state, path)
    return path


def pil_pipeline_seconds(images: torch.Tensor, samples: int = 256) -> float | None:
    """Seconds per sample of the tutorial's per-sample transform (uint8 -> PIL -> ToTensor -> Normalize)
    on `images`, uint8 (N, H, W); None without torchvision and PIL."""
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
