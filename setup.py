"""Builds ptfast._C, the C++ extension holding the ptfast operators.

It compiles against the torch already installed, so install with
``pip install --no-build-isolation .`` (see README.md).

Every file in csrc/ops/cpu/isa/ is compiled once per instruction set
(DEFAULT, plus AVX2 and AVX512 on x86-64) and the copy matching the running
CPU is picked at run time, so one build is portable and fast everywhere;
see csrc/ops/cpu/isa_dispatch.h.

The CUDA kernels (csrc/**/*.cu) are built when the installed torch has CUDA
and nvcc is found; PTFAST_CUDA=1 forces them (e.g. to compile on a machine
without a GPU), PTFAST_CUDA=0 leaves them out. TORCH_CUDA_ARCH_LIST is
honoured; without it torch targets the visible GPU, or 8.0 and 9.0 (with PTX
for newer GPUs) when none is visible.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

# torch guesses CUDA_HOME from the nvcc found on PATH, which may be a wrapper
# outside the toolkit; the toolkit's standard location is the better guess.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and Path("/usr/local/cuda").is_dir():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ModuleNotFoundError:
    sys.exit(
        "ptfast compiles against your installed torch: run "
        "`pip install -r requirements.txt` and then "
        "`pip install --no-build-isolation .`"
    )

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"

ISA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("ops/cpu/isa/*.cpp"))
COMMON_SOURCES = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / CSRC).rglob("*.cpp") if str(p.relative_to(ROOT)) not in ISA_SOURCES
)
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).rglob("*.cu"))


def build_cuda() -> bool:
    """Whether to compile the CUDA kernels (see the module docstring)."""
    requested = os.environ.get("PTFAST_CUDA", "")
    if requested == "0":
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if requested == "1":
        if not available:
            sys.exit(
                "PTFAST_CUDA=1, but the CUDA build needs a CUDA build of torch and the CUDA toolkit "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return available

# Flags per instruction set, as torch compiles its own CPU kernels. Objects
# are linked DEFAULT first, so where copies of an inline function differ the
# linker keeps the one that runs on any CPU.
if platform.machine().lower() in {"x86_64", "amd64"}:
    ISA_FLAGS = {
        "DEFAULT": [],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    }
else:
    ISA_FLAGS = {"DEFAULT": []}


class BuildExtensionWithIsaCopies(BuildExtension):
    """BuildExtension that also compiles ISA_SOURCES once per instruction set."""

    def build_extension(self, ext):
        objects = []
        for isa, flags in ISA_FLAGS.items():
            defines = [f"-DCPU_CAPABILITY={isa}"]
            if isa != "DEFAULT":
                defines.append(f"-DCPU_CAPABILITY_{isa}")
            objects += self.compiler.compile(
                ISA_SOURCES,
                output_dir=os.path.join(self.build_temp, isa),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"] + defines + flags, "nvcc": []},
                depends=ext.depends,
            )
        ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


def extensions() -> list:
    cxx_flags = ["-O3", "-fno-math-errno"]
    nvcc_flags = ["-O3", "-lineinfo"]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inlined into our kernels: without OpenMP they would
        # run on one thread. The loader resolves libgomp to torch's own copy.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = build_cuda()
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    extension = CUDAExtension if with_cuda else CppExtension
    return [
        extension(
            "ptfast._C",
            COMMON_SOURCES + (CUDA_SOURCES if with_cuda else []),
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            depends=sorted(str(p) for p in (ROOT / CSRC).rglob("*.h")),
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionWithIsaCopies},
)
