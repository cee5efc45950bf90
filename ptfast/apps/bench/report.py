"""Reading the results: the printed table, results.json, results.md and speedup plots.

A speedup is time(baseline) / time(ptfast): 2.0 means ptfast takes half the
baseline's time, below 1.0 means ptfast is slower. Baselines are native eager
PyTorch ("vs eager") and the same native code through torch.compile ("vs compile").
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from ptfast.apps.bench.cases import FAMILIES, IMPLEMENTATIONS
from ptfast.apps.bench.memory import MemoryResult
from ptfast.apps.bench.runner import CaseResult

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
BASELINES = ("eager", "compile")


def format_time(seconds: float | None) -> str:
    """'12.3 us', '4.56 ms', '1.23 s'; '-' for a time that was not measured."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            break
    value = seconds / scale
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_speedup(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def format_throughput(result: CaseResult, peak_gflops: float | None, copy_gb_per_s: float | None) -> str:
    """ptfast's rate and its share of what the device can do: '131 GFLOP/s (41%)' of the peak
    multiply-add rate for compute-bound cases, '18.2 GB/s (87%)' of the copy bandwidth for
    memory-bound ones; '-' where neither FLOPs nor bytes are counted."""
    for rate, unit, reference in (
        (result.gflops(), "GFLOP/s", peak_gflops),
        (result.gigabytes_per_s(), "GB/s", copy_gb_per_s),
    ):
        if rate is not None:
            share = f" ({100 * rate / reference:.0f}%)" if reference else ""
            return f"{rate:.3g} {unit}{share}"
    return "-"


def _case_rows(
    results: list[CaseResult], peak_gflops: float | None, copy_gb_per_s: float | None
) -> list[list[str]]:
    rows = []
    for result in results:
        if result.skipped:
            rows.append([result.case] + ["-"] * 6 + [f"skipped: {result.skipped}"])
            continue
        times = [format_time(result.times_s.get(name)) for name in IMPLEMENTATIONS]
        speedups = [format_speedup(result.speedup(baseline)) for baseline in BASELINES]
        notes = "; ".join(f"{name} failed: {error}" for name, error in result.errors.items())
        throughput = format_throughput(result, peak_gflops, copy_gb_per_s)
        rows.append([result.case, *times, *speedups, throughput, notes])
    return rows


CASE_HEADER = ["case", "ptfast", "eager", "compile", "vs eager", "vs compile", "ptfast rate (% of device)", "notes"]
RATE_NOTE = (
    "Rates: the conv blocks in GFLOP/s, 2 FLOPs per multiply-add of the block's convolution (forward+backward: "
    "also its weight gradient and, when the input requires grad, its input gradient, as dense convolutions), not "
    "the ReLU or pooling, as a share of the device's peak float32 multiply-add rate, measured in the same run by "
    "a register-only kernel ({peak} GFLOP/s); log_softmax in GB/s, the bytes it must move (forward: read x, write "
    "y; backward: read grad_output and y, write grad_input) over its time, as a share of the device's copy "
    "bandwidth, measured in the same run (Tensor.copy_ of 256 MiB, bytes read + written: {copy} GB/s)."
)


def _memory_rows(results: list[MemoryResult]) -> tuple[list[str], list[list[str]]]:
    """Saved bytes (total / beyond the arguments) per implementation, and CUDA peaks where measured."""
    with_peak = any(result.cuda_peak_bytes for result in results)
    header = ["case"] + [f"{name} saved (beyond args)" for name in IMPLEMENTATIONS]
    if with_peak:
        header += [f"{name} CUDA peak" for name in IMPLEMENTATIONS]
    header.append("notes")
    rows = []
    for result in results:
        row = [result.case]
        for name in IMPLEMENTATIONS:
            saved = result.saved.get(name)
            row.append(
                "-" if saved is None else f"{format_bytes(saved.total)} ({format_bytes(saved.beyond_arguments)})"
            )
        if with_peak:
            row += [format_bytes(result.cuda_peak_bytes.get(name)) for name in IMPLEMENTATIONS]
        row.append("; ".join(f"{name} failed: {error}" for name, error in result.errors.items()))
        rows.append(row)
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the name column left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 or i == len(cells) - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    alignment = ["---"] + ["---:"] * (len(header) - 2) + ["---"]
    lines = [header, alignment, *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in lines)


def _devices(results: list[CaseResult], memory: list[MemoryResult]) -> list[str]:
    return list(dict.fromkeys([r.device for r in results] + [m.device for m in memory]))


def text_report(document: dict[str, Any], results: list[CaseResult], memory: list[MemoryResult]) -> str:
    """The table printed at the end of a run: times and speedups per device, then memory."""
    parts = [
        f"Machine: {document['machine_summary']}",
        f"Set: {document['selection']}, {document['dtype']}, compile backend {document['compile_backend']}; "
        "median of interleaved repeats; speedup = baseline time / ptfast time",
    ]
    for device in _devices(results, memory):
        device_results = [r for r in results if r.device == device]
        if device_results:
            peak = document.get("peak_gflops", {}).get(device)
            copy = document.get("copy_gb_per_s", {}).get(device)
            parts += [
                "",
                f"== {device} (peak float32: {peak} GFLOP/s, copy: {copy} GB/s) ==",
                _text_table(CASE_HEADER, _case_rows(device_results, peak, copy)),
            ]
        device_memory = [m for m in memory if m.device == device]
        if device_memory:
            header, rows = _memory_rows(device_memory)
            parts += ["", f"== {device}: bytes saved for backward per block call ==", _text_table(header, rows)]
    return "\n".join(parts)


def markdown_report(
    document: dict[str, Any], results: list[CaseResult], memory: list[MemoryResult], plots: list[Path]
) -> str:
    """results.md: the same tables in markdown, headed by the machine, linking the plots."""
    machine = document["machine"]
    lines = [
        f"# ptfast benchmarks: {document['machine_summary']}",
        "",
        f"- CPU: {machine['cpu_model']}, torch CPU capability {machine['cpu_capability']}, "
        f"flags {', '.join(machine['cpu_flags']) or '-'}, {machine['threads']} threads "
        f"of {machine['logical_cpus']} logical CPUs",
        f"- GPU: {machine['gpu'] or 'none'}" + (f" (CUDA {machine['cuda_version']}, cuDNN convolutions "
                                                 f"{'in TF32' if machine.get('cudnn_tf32') else 'in full float32'})"
                                                 if machine["gpu"] else ""),
        f"- torch {machine['torch_version']}, ptfast {machine['ptfast_version']}, "
        f"Python {machine['python_version']}, {machine['os']}",
        f"- Set `{document['selection']}`, {document['dtype']}, torch.compile backend "
        f"`{document['compile_backend']}`, run {document['created']} (`{document['command']}`, "
        f"{document['elapsed_s']} s)",
        "",
        "Times are medians of interleaved repeats (seconds per call); speedup = baseline time / ptfast time, "
        "above 1.00x when ptfast is faster. *compile* is the native code through `torch.compile`. "
        "*inference* runs under `torch.no_grad()`."
        + (" glibc's malloc kept freed memory mapped (trim and mmap thresholds 1 GiB) for every implementation."
           if document.get("freed_memory_kept_mapped") else ""),
    ]
    for device in _devices(results, memory):
        device_results = [r for r in results if r.device == device]
        if device_results:
            peak = document.get("peak_gflops", {}).get(device)
            copy = document.get("copy_gb_per_s", {}).get(device)
            lines += [
                "",
                f"## {device.upper()}",
                "",
                _markdown_table(CASE_HEADER, _case_rows(device_results, peak, copy)),
                "",
                RATE_NOTE.format(peak=peak, copy=copy),
            ]
        device_memory = [m for m in memory if m.device == device]
        if device_memory:
            header, rows = _memory_rows(device_memory)
            lines += [
                "",
                f"### {device.upper()}: bytes saved for backward per block call",
                "",
                "Unique storages autograd keeps from forward to backward; in brackets those beyond the "
                "call's input, weight and bias.",
                "",
                _markdown_table(header, rows),
            ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{plot.stem}]({plot.name})" for plot in plots]
    return "\n".join(lines) + "\n"


def write_plots(results: list[CaseResult], out_dir: Path, machine_summary: str) -> list[Path]:
    """One PNG per device and op family: per op, grouped bars of the speedup vs eager and vs compile per shape.

    The y axis is logarithmic so that 2x faster and 2x slower are the same
    distance from the line at 1.0.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: the plots are only written to files
    import matplotlib.pyplot as plt

    paths = []
    for device in dict.fromkeys(r.device for r in results):
        for family in FAMILIES:
            family_results = [r for r in results if r.device == device and r.family == family and not r.skipped]
            ops = list(dict.fromkeys(r.op for r in family_results))
            if not ops:
                continue
            widest = max(sum(r.op == op for r in family_results) for op in ops)
            figure, axes = plt.subplots(
                len(ops), 1, figsize=(max(6.0, 1.2 * widest + 2), 3.8 * len(ops)), squeeze=False
            )
            for axis, op in zip(axes[:, 0], ops):
                _plot_op(axis, [r for r in family_results if r.op == op], op)
            figure.suptitle(f"ptfast {family} speedup on {device.upper()}\n{machine_summary}", fontsize=10)
            figure.tight_layout()
            path = out_dir / f"speedup-{device}-{family}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            paths.append(path)
    return paths


def _plot_op(axis: Any, results: list[CaseResult], op: str) -> None:
    """Bars grow up from the 1.0 line where ptfast is faster and down where it is slower."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    width = 0.38
    colors = {"eager": "#4C72B0", "compile": "#DD8452"}
    values = []
    for offset, baseline in zip((-width / 2, width / 2), BASELINES):
        for x, result in enumerate(results):
            speedup = result.speedup(baseline)
            if speedup is None:
                axis.text(x + offset, 1.0, "n/a", ha="center", va="bottom", fontsize=7)
                continue
            values.append(speedup)
            axis.bar(x + offset, speedup - 1.0, width, bottom=1.0, color=colors[baseline],
                     label=f"vs {baseline}" if not any(label == f"vs {baseline}"
                                                       for label in axis.get_legend_handles_labels()[1]) else None)
            axis.text(x + offset, speedup, f"{speedup:.2f}", ha="center",
                      va="bottom" if speedup >= 1 else "top", fontsize=7)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_yscale("log", base=2)
    axis.yaxis.set_major_locator(LogLocator(base=2))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axis.set_ylim(min([0.5, *values]) / 1.4, max([2.0, *values]) * 1.4)
    axis.set_xticks(range(len(results)))
    axis.set_xticklabels([textwrap.fill(result.shape, 14) for result in results], fontsize=7)
    axis.set_ylabel("speedup (log scale)")
    axis.set_title(f"{op}: baseline time / ptfast time (above 1 = ptfast faster)", fontsize=9)
    if values:
        axis.legend(loc="upper right", fontsize=8)
    axis.grid(axis="y", which="major", alpha=0.3)


def write_report(
    document: dict[str, Any],
    results: list[CaseResult],
    memory: list[MemoryResult],
    out_dir: Path,
    plots: bool = True,
) -> list[Path]:
    """results.json, results.md and the plots under `out_dir`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_paths = write_plots(results, out_dir, document["machine_summary"]) if plots else []
    json_path = out_dir / RESULTS_JSON
    json_path.write_text(
        json.dumps(
            {
                **document,
                "cases": [result.to_dict() for result in results],
                "memory": [result.to_dict() for result in memory],
                "plots": [path.name for path in plot_paths],
            },
            indent=2,
        )
        + "\n"
    )
    markdown_path = out_dir / RESULTS_MARKDOWN
    markdown_path.write_text(markdown_report(document, results, memory, plot_paths))
    return [json_path, markdown_path, *plot_paths]
