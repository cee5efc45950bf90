"""Fixtures and run-wide settings; the helpers are in common_utils.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

import ptfast
from common_utils import DEVICES

# torch.compile's on-disk caches are per user, shared by every checkout and torch build: a
# cached graph of a ptfast op since renamed fails to load ("no attribute
# 'conv2d_relu_max_pool2d_with_indices'" after a rename). Each test session compiles afresh.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptfast-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# Native float32 convolutions on CUDA may use TF32; the comparisons need full float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=["direct", "vendor"], scope="module")
def conv_block(request) -> str:
    """Runs every test of a module on each CPU path of the fused block (ptfast.backends.cpu.conv_block)."""
    with ptfast.backends.cpu.flags(conv_block=request.param):
        yield request.param
