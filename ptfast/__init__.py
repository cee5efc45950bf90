"""ptfast: fused, verified CPU/CUDA kernels for PyTorch.

    ptfast.conv2d_relu_max_pool2d   conv2d + bias + ReLU + max_pool2d in one op
    ptfast.log_softmax              log_softmax
    ptfast.nn                       the same as drop-in modules
    ptfast.fuse                     rewrite a model's conv/ReLU/max-pool chains and log_softmax to them (torch.fx)
    ptfast.models                   ready-made models (MnistCNN)
    ptfast.backends                 settings, e.g. which CPU path serves the fused block

The operators are also reachable as ``torch.ops.ptfast.*``.
"""

import torch  # noqa: F401  (loads libtorch, which ptfast._C links against)

from ptfast._build_check import check_torch_version

# Before loading ptfast._C: compiled against another torch, it may not even load.
check_torch_version()

from ptfast import _C  # noqa: F401  (loads the library that registers the operators)
from ptfast import _fake  # noqa: F401  (registers their fake implementations)
from ptfast import _vmap  # noqa: F401  (registers their batching rules)
from ptfast import backends, nn
from ptfast.functional import conv2d_relu_max_pool2d, log_softmax
from ptfast._fuse import FuseError, fuse
from ptfast import models

__version__ = "0.1.0"

__all__ = ["conv2d_relu_max_pool2d", "log_softmax", "nn", "backends", "fuse", "FuseError", "models", "__version__"]
