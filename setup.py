"""Builds ptfast._C, the C++ extension holding the ptfast operators.

``pip install .`` builds in an isolated environment holding the torch pinned
in pyproject.toml's [build-system]; ``pip install --no-build-isolation .``
builds against the torch already installed (faster: nothing to download).
Either way the extension works only with the torch it was compiled against,
so the build records that torch: the wheel requires exactly it
(``torch==<version>``, as torchvision's release wheels do), and
ptfast/_build_info.py, written next to ptfast._C, lets ``import ptfast``
refuse another torch with one clear message before loading ptfast._C.

ptfast._C is built for the running Python, not for the stable ABI: its eager
entries take tensors through torch's Python API (csrc/ptfast.cpp), which
saves about 1.4 us a call over torch.ops. A wheel is therefore per Python
version, as it already is per torch version.

Every file in csrc/ops/cpu/isa/ is compiled once per instruction set
(DEFAULT, plus AVX2 and AVX512 on x86-64) and the copy matching the running
CPU is picked at run time, so one build is portable and fast everywhere;
see csrc/ops/cpu/isa_dispatch.h. PTFAST_CPU_ISAS=DEFAULT builds the baseline
copy only (quicker, for GPU checks).

The CUDA kernels (csrc/**/*.cu) are built when the installed torch has CUDA
and nvcc is found; PTFAST_CUDA=1 forces them (e.g. to compile on a machine
without a GPU), PTFAST_CUDA=0 leaves them out. TORCH_CUDA_ARCH_LIST is
honoured; without it torch targets the visible GPU, or 8.0 and 9.0 (with PTX
for newer GPUs) when none is visible.
"""

from __future__ import annotations

import importlib.metadata
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
    # Only with --no-build-isolation: otherwise pip installs the torch pinned in
    # pyproject.toml's [build-system] before running this file.
    sys.exit(
        "ptfast compiles against torch, which this environment lacks: install torch first "
        "(`pip install -r requirements.txt`), or drop --no-build-isolation to build against "
        "the torch pinned in pyproject.toml"
    )

# The oldest torch ptfast builds against (the GPU check, benchmarks/gpu_check.sh,
# builds against 2.11 and runs the CUDA tests), and the ones CI tests (.ci/run:
# the suite on 2.14.1, the library's tests on 2.13.0). ptfast.fuse relies on
# torch.fx internals, so another torch deserves a run of the suite.
OLDEST_TORCH = "2.11"
TESTED_TORCHES = ("2.13.0", "2.14.1")
if torch.__version__ < OLDEST_TORCH:
    sys.exit(f"ptfast needs torch {OLDEST_TORCH} or later to build, got torch {torch.__version__}")
if torch.__version__.split("+")[0] not in TESTED_TORCHES:
    print(
        f"warning: building ptfast against torch {torch.__version__}; CI tests torch "
        f"{' and '.join(TESTED_TORCHES)}: run `python -m pytest` before relying on it",
        file=sys.stderr,
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
# PTFAST_CPU_ISAS=DEFAULT (a comma-separated subset) compiles fewer copies:
# a quicker build where only the GPU kernels matter (benchmarks/gpu_check.sh).
# The dispatch falls back to the best copy that was built.
if requested_isas := os.environ.get("PTFAST_CPU_ISAS"):
    unknown = set(requested_isas.split(",")) - set(ISA_FLAGS)
    if unknown or "DEFAULT" not in requested_isas.split(","):
        sys.exit(f"PTFAST_CPU_ISAS={requested_isas}: a comma-separated subset of {list(ISA_FLAGS)} holding DEFAULT")
    ISA_FLAGS = {isa: flags for isa, flags in ISA_FLAGS.items() if isa in requested_isas.split(",")}


def torch_requirement() -> str:
    """``torch==<the torch being built against>``, in the version pip knows it by.

    torch.__version__ may carry a local label (2.14.1+cu130) that the
    installed distribution's metadata lacks (2.14.1); pip matches the latter.
    """
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = torch.__version__
    if not torch.__version__.startswith(version):  # metadata of another torch than the one imported
        version = torch.__version__
    return f"torch=={version}"


def build_info(with_cuda: bool) -> str:
    """The text of ptfast/_build_info.py for a build against the running torch."""
    cuda = repr(torch.version.cuda) if with_cuda else "None"
    return (
        "# Written by setup.py when ptfast._C was built (not in git). ptfast/_build_check.py\n"
        "# compares it with the running torch before ptfast._C is loaded.\n"
        f'TORCH_VERSION = "{torch.__version__}"  # torch.__version__ at build time\n'
        f"CUDA_VERSION = {cuda}  # CUDA the kernels were compiled for; None: CPU kernels only\n"
    )


BUILD_INFO = "_build_info.py"


class BuildExtensionWithIsaCopies(BuildExtension):
    """BuildExtension that also compiles ISA_SOURCES once per instruction set
    and writes ptfast/_build_info.py next to ptfast._C."""

    def build_extension(self, ext):
        info_path = Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_INFO)
        info = build_info(with_cuda=any(source.endswith(".cu") for source in ext.sources))
        if not info_path.is_file() or info_path.read_text() != info:
            # setuptools relinks only when a source is newer than the library:
            # after a change of torch (or of CUDA on/off) nothing may be.
            self.force = True
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
        info_path.write_text(info)

    def copy_extensions_to_source(self):
        """In-place and editable builds: the library, its build record, and no stale library.

        Python imports ``_C.cpython-311-x86_64-linux-gnu.so`` ahead of ``_C.abi3.so``
        and ``_C.so``, so a library left by an older build (another Python, or
        the stable-ABI builds before) could shadow the new one or be shadowed by it.
        """
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
            package_dir = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            built = Path(self.build_lib, filename)
            self.copy_file(str(built.with_name(BUILD_INFO)), str(package_dir / BUILD_INFO), level=self.verbose)
            name = ext.name.rpartition(".")[2]
            for stale in [*package_dir.glob(f"{name}.*.so"), *package_dir.glob(f"{name}.so")]:
                if stale.name != built.name:
                    print(f"removing {stale} (left by an older build)", file=sys.stderr)
                    stale.unlink()


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
    # pyproject.toml declares dependencies dynamic: they are computed here.
    install_requires=[torch_requirement()],
)
