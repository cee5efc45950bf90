"""The machine a benchmark ran on, recorded with its results.

Times mean nothing without the CPU, the instruction set torch dispatches
to, the thread count, the GPU and the software versions that produced them.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass

import torch

import ptfast

# /proc/cpuinfo flags that decide which kernels run fast: vector width and
# the matrix/dot-product extensions oneDNN and inductor use.
NOTABLE_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): the ISA torch's and ptfast's kernels use
    cpu_flags: tuple[str, ...]
    logical_cpus: int
    threads: int  # torch.get_num_threads() during the run
    gpu: str | None  # name of CUDA device 0 when CUDA was benchmarked
    cuda_version: str | None
    # torch.backends.cudnn.allow_tf32 when CUDA was benchmarked: cuDNN's convolutions in TF32, native's
    # and ptfast's vendor path's alike (the direct CUDA forward computes in full float32)
    cudnn_tf32: bool | None
    torch_version: str
    ptfast_version: str
    python_version: str
    os: str

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for table headers, e.g. "Intel Xeon Processor (AVX512, 2 threads), torch 2.14.1"."""
        text = f"{self.cpu_model} ({self.cpu_capability}, {self._threads_text()})"
        if self.gpu:
            tf32 = "TF32" if self.cudnn_tf32 else "no TF32"
            text += f", {self.gpu} (CUDA {self.cuda_version}, cuDNN convolutions with {tf32})"
        return f"{text}, torch {self.torch_version}"

    def _threads_text(self) -> str:
        return f"{self.threads} thread" + ("s" if self.threads != 1 else "")

    def slug(self) -> str:
        """A directory name for the results: CPU model and threads, plus the GPU if one was used."""
        parts = [_slugify(self.cpu_model), self._threads_text().replace(" ", "")]
        if self.gpu:
            parts.append(_slugify(self.gpu))
        return "-".join(parts)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def describe_machine(gpu: bool) -> Machine:
    """This machine; `gpu`: whether CUDA is benchmarked (then its device 0 is described)."""
    cpuinfo = _cpuinfo()
    flags = set(cpuinfo.get("flags", "").split())
    cpu_model = cpuinfo.get("model name") or platform.processor() or platform.machine()
    return Machine(
        cpu_model=re.sub(r"\s+", " ", cpu_model),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=tuple(flag for flag in NOTABLE_CPU_FLAGS if flag in flags),
        logical_cpus=os.cpu_count() or 1,
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if gpu else None,
        cuda_version=torch.version.cuda if gpu else None,
        cudnn_tf32=torch.backends.cudnn.allow_tf32 if gpu else None,
        torch_version=torch.__version__,
        ptfast_version=ptfast.__version__,
        python_version=platform.python_version(),
        os=platform.platform(),
    )
