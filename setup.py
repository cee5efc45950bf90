"""Builds ptfast._C, the C++ extension holding the ptfast operators.

It compiles against the torch already installed, so install with
``pip install --no-build-isolation .`` (see README.md).

Every file in csrc/ops/cpu/isa/ is compiled once per instruction set
(DEFAULT, plus AVX2 and AVX512 on x86-64) and the copy matching the running
CPU is picked at run time, so one build is portable and fast everywhere;
see csrc/ops/cpu/isa_dispatch.h.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
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
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inlined into our kernels: without OpenMP they would
        # run on one thread. The loader resolves libgomp to torch's own copy.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return [
        CppExtension(
            "ptfast._C",
            COMMON_SOURCES,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            depends=sorted(str(p) for p in (ROOT / CSRC).rglob("*.h")),
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionWithIsaCopies},
)
