"""The benchmark cases: what is timed, at which shapes, and the code of each implementation.

Both front ends, ``ptfast-bench`` (``ptfast.apps.bench.cli``) and the
pytest-benchmark files under ``benchmarks/``, take their cases from here, so
every shape is written down once.

A case's ``setup(device, dtype)`` draws fresh random inputs (never zeros: a
zero input would make ReLU and max-pool degenerate) and returns one
zero-argument callable per implementation:

    "ptfast"   ptfast's fused operators (or ``MnistCNN(fused=True)``)
    "eager"    the same computation in native PyTorch ops, run eagerly
    "compile"  that native code through ``torch.compile`` (default mode, whole
               graph, static shapes), compiled lazily on its first call, which
               the timing does during warm-up

The smoke set compiles with the "aot_eager" backend instead of inductor: it
still captures the whole graph and its backward, but skips inductor's C++
code generation, which takes over a minute on a cold cache and would only slow the
tests down.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import ptfast
from ptfast.models import MnistCNN

Implementation = Literal["ptfast", "eager", "compile"]
IMPLEMENTATIONS: tuple[Implementation, ...] = ("ptfast", "eager", "compile")

Selection = Literal["smoke", "quick", "full"]
SELECTIONS: tuple[Selection, ...] = ("smoke", "quick", "full")

COMPILE_BACKENDS: dict[Selection, str] = {"smoke": "aot_eager", "quick": "inductor", "full": "inductor"}

Step = Callable[[], object]
"""One timed call: a forward, a forward+backward or a training step."""

Build = Callable[[torch.device, torch.dtype, str], dict[str, Step]]
"""(device, dtype, compile backend) -> one step per implementation."""

FAMILIES = ("conv2d_relu_max_pool2d", "log_softmax", "mnist_cnn", "models")

# Seed of every input draw: reruns time the same numbers.
SEED = 0


@dataclass(frozen=True)
class Case:
    """One benchmark: an operation of an op family at one shape.

    ``name`` ("family/op/shape") identifies it in tables, results.json and
    pytest ids; ``build`` does the work of ``setup``.
    """

    family: str
    op: str
    shape: str
    build: Build = field(repr=False, compare=False)
    compile_backend: str = "inductor"
    flops: int | None = None
    """Floating-point operations one call stands for (2 per multiply-add), where counted."""
    elements_moved: int | None = None
    """Tensor elements one call must read or write at the least, where counted: the traffic a
    memory-bound op cannot avoid."""

    @property
    def name(self) -> str:
        return f"{self.family}/{self.op}/{self.shape}"

    def setup(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, Step]:
        """Fresh inputs on `device` and one callable per implementation.

        torch.compile's caches are reset first: every case compiles its own
        static-shape graph, and the per-function recompile limit of earlier
        cases cannot silently send this one back to eager.
        """
        torch._dynamo.reset()
        return self.build(torch.device(device), dtype, self.compile_backend)


def compile_native(function: Callable, backend: str) -> Callable:
    """`function` through torch.compile: default mode, one graph, shapes fixed per case."""
    return torch.compile(function, fullgraph=True, dynamic=False, backend=backend)


def _random(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """Standard-normal data, drawn on the CPU so every device times the same numbers."""
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def _no_grad(function: Callable[[], object]) -> Step:
    def step() -> object:
        with torch.no_grad():
            return function()

    return step


# --------------------------------------------------------------------------- conv2d + ReLU + max_pool2d


@dataclass(frozen=True)
class BlockShape:
    """A conv2d(k, stride, padding) + ReLU + max_pool2d(pool_kernel, pool_stride)
    block on an (N, C_in, H, H) input.

    ``input_requires_grad`` is False for a network's first block (its input
    is data) and True for later blocks, whose backward also computes grad_input.
    """

    label: str
    batch: int
    in_channels: int
    out_channels: int
    kernel: int
    size: int
    padding: int
    input_requires_grad: bool
    stride: int = 1
    pool_kernel: int = 2
    pool_stride: int = 2

    def describe(self) -> str:
        stride = f" s{self.stride}" if self.stride != 1 else ""
        pool = f" pool{self.pool_kernel}/{self.pool_stride}" if (self.pool_kernel, self.pool_stride) != (2, 2) else ""
        return (
            f"{self.label} {self.in_channels}->{self.out_channels} k{self.kernel}{stride} "
            f"{self.size}x{self.size}{pool} N{self.batch}"
        )

    def conv_flops(self) -> int:
        """FLOPs of the block's convolution, 2 per multiply-add (the ReLU and pooling are not counted)."""
        conv_size = (self.size + 2 * self.padding - self.kernel) // self.stride + 1
        multiply_adds = self.batch * self.out_channels * conv_size**2 * self.in_channels * self.kernel**2
        return 2 * multiply_adds

    def forward_backward_flops(self) -> int:
        """The dense-equivalent FLOPs of a forward and backward: the convolution, its weight
        gradient and, for a block whose input requires grad, its input gradient (each as many
        as the convolution)."""
        return self.conv_flops() * (3 if self.input_requires_grad else 2)

    def arguments(
        self, device: torch.device, dtype: torch.dtype, requires_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(input (N, C_in, H, H), weight (C_out, C_in, k, k), bias (C_out,)).

        Weights have nn.Conv2d's scale (1 / sqrt(fan_in)) so that about half
        of the conv outputs are positive, as in a trained network.
        """
        generator = torch.Generator().manual_seed(SEED)
        fan_in = self.in_channels * self.kernel * self.kernel
        input = _random((self.batch, self.in_channels, self.size, self.size), device, dtype, generator)
        weight = _random((self.out_channels, self.in_channels, self.kernel, self.kernel), device, dtype, generator)
        weight = weight / fan_in**0.5
        bias = _random((self.out_channels,), device, dtype, generator) / fan_in**0.5
        if requires_grad:
            input.requires_grad_(self.input_requires_grad)
            weight.requires_grad_()
            bias.requires_grad_()
        return input, weight, bias


def native_block(input: Tensor, weight: Tensor, bias: Tensor, shape: BlockShape) -> Tensor:
    """The native composite ptfast.conv2d_relu_max_pool2d fuses."""
    conv = F.conv2d(input, weight, bias, stride=shape.stride, padding=shape.padding)
    return F.max_pool2d(F.relu(conv), shape.pool_kernel, shape.pool_stride)


def fused_block(input: Tensor, weight: Tensor, bias: Tensor, shape: BlockShape) -> Tensor:
    return ptfast.conv2d_relu_max_pool2d(
        input, weight, bias, stride=shape.stride, padding=shape.padding,
        pool_kernel_size=shape.pool_kernel, pool_stride=shape.pool_stride,
    )


def block_forwards(shape: BlockShape, compile_backend: str) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """The block's forward per implementation, for (input, weight, bias)."""
    native = functools.partial(native_block, shape=shape)
    return {
        "ptfast": functools.partial(fused_block, shape=shape),
        "eager": native,
        "compile": compile_native(native, compile_backend),
    }


def _block_inference(shape: BlockShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        arguments = shape.arguments(device, dtype, requires_grad=False)
        return {
            name: _no_grad(functools.partial(forward, *arguments))
            for name, forward in block_forwards(shape, compile_backend).items()
        }

    return build


def _block_forward_backward(shape: BlockShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        arguments = shape.arguments(device, dtype, requires_grad=True)
        leaves = [t for t in arguments if t.requires_grad]
        with torch.no_grad():
            output_shape = native_block(*arguments, shape=shape).shape
        grad_output = _random(tuple(output_shape), device, dtype, torch.Generator().manual_seed(SEED + 1))

        def step(forward: Callable) -> Step:
            # autograd.grad returns fresh gradients instead of accumulating
            # into .grad, so no implementation pays for an extra add.
            return lambda: torch.autograd.grad(forward(*arguments), leaves, grad_output)

        return {name: step(forward) for name, forward in block_forwards(shape, compile_backend).items()}

    return build


def _mnist_block1(batch: int) -> BlockShape:
    return BlockShape("mnist1", batch, 1, 10, 5, 28, 0, input_requires_grad=False)


def _mnist_block2(batch: int) -> BlockShape:
    return BlockShape("mnist2", batch, 10, 20, 5, 12, 0, input_requires_grad=True)


# The blocks of AlexNet and VGG (ImageNet-sized, small batches): many
# channels, where the vendor path serves them
# (README, "Which path serves a block").
LARGE_BLOCKS = [
    BlockShape("alexnet1", 8, 3, 64, 11, 224, 2, input_requires_grad=False, stride=4, pool_kernel=3),
    BlockShape("alexnet2", 8, 64, 192, 5, 27, 2, input_requires_grad=True, pool_kernel=3),
    BlockShape("alexnet5", 8, 256, 256, 3, 13, 1, input_requires_grad=True, pool_kernel=3),
    BlockShape("vgg2", 2, 64, 128, 3, 112, 1, input_requires_grad=True),
    BlockShape("vgg3", 2, 256, 256, 3, 56, 1, input_requires_grad=True),
    BlockShape("vgg4", 2, 512, 512, 3, 28, 1, input_requires_grad=True),
    BlockShape("vgg5", 4, 512, 512, 3, 14, 1, input_requires_grad=True),
]


def block_shapes(selection: Selection) -> list[BlockShape]:
    """The tutorial's two blocks at batch 1, 64 (and 1024 in the full set), two CIFAR-like
    blocks at 64, and in the full set the AlexNet and VGG blocks."""
    if selection == "smoke":
        return [_mnist_block2(2)]
    batches = [1, 64, 1024] if selection == "full" else [1, 64]
    shapes = [block(n) for block in (_mnist_block1, _mnist_block2) for n in batches]
    shapes += [
        BlockShape("cifar1", 64, 3, 32, 3, 32, 1, input_requires_grad=False),
        BlockShape("cifar2", 64, 32, 64, 3, 16, 1, input_requires_grad=True),
    ]
    if selection == "full":
        shapes += LARGE_BLOCKS
    return shapes


def memory_case_name(shape: BlockShape) -> str:
    return f"conv2d_relu_max_pool2d/saved_for_backward/{shape.describe()}"


def memory_block_shapes(selection: Selection, pattern: str | None = None) -> list[BlockShape]:
    """The MNIST, AlexNet and VGG blocks of `selection` whose saved-for-backward bytes are
    reported (those whose memory_case_name matches `pattern`, as in select_cases)."""
    return [
        shape
        for shape in block_shapes(selection)
        if not shape.label.startswith("cifar") and name_matches(memory_case_name(shape), pattern)
    ]


# --------------------------------------------------------------------------- log_softmax


@dataclass(frozen=True)
class LogSoftmaxShape:
    """log_softmax over `dim` of a tensor of `size`."""

    size: tuple[int, ...]
    dim: int

    def describe(self) -> str:
        text = "x".join(map(str, self.size))
        return text if self.dim in (-1, len(self.size) - 1) else f"{text} dim{self.dim}"

    def elements_moved(self, backward: bool) -> int:
        """The forward reads x and writes y; the backward reads grad_output and y and writes grad_input."""
        return math.prod(self.size) * (5 if backward else 2)


def log_softmax_shapes(selection: Selection) -> list[LogSoftmaxShape]:
    """Classifier heads from 10 classes to a 32000-token vocabulary, and a segmentation map
    normalised over its channel dim (not the last one); the full set adds a shape per class of
    the kernel's paths: rows of 2 and 33, 100 and 256000 elements, one row of 1000000 (shared by
    the threads), a non-last dim with 2, 4 and 4096 inner positions."""
    if selection == "smoke":
        return [LogSoftmaxShape((8, 10), -1), LogSoftmaxShape((2, 3, 4, 4), 1)]
    shapes = [
        LogSoftmaxShape((64, 10), -1),
        LogSoftmaxShape((4096, 10), -1),
        LogSoftmaxShape((65536, 10), -1),
        LogSoftmaxShape((4096, 1000), -1),
        LogSoftmaxShape((256, 32000), -1),
        LogSoftmaxShape((16, 21, 64, 64), 1),
    ]
    if selection == "full":
        shapes += [
            LogSoftmaxShape((4096, 2), -1),
            LogSoftmaxShape((4096, 33), -1),
            LogSoftmaxShape((4096, 100), -1),
            LogSoftmaxShape((16, 256000), -1),
            LogSoftmaxShape((1, 1000000), -1),
            LogSoftmaxShape((512, 10, 2), 1),
            LogSoftmaxShape((64, 1000, 4), 1),
            LogSoftmaxShape((8, 10, 4096), 1),
        ]
    return shapes


def _native_log_softmax(input: Tensor, dim: int) -> Tensor:
    return F.log_softmax(input, dim)


def _log_softmax_forwards(shape: LogSoftmaxShape, compile_backend: str) -> dict[str, Callable[[Tensor], Tensor]]:
    native = functools.partial(_native_log_softmax, dim=shape.dim)
    return {
        "ptfast": functools.partial(ptfast.log_softmax, dim=shape.dim),
        "eager": native,
        "compile": compile_native(native, compile_backend),
    }


def _log_softmax_inference(shape: LogSoftmaxShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        input = _random(shape.size, device, dtype, torch.Generator().manual_seed(SEED))
        return {
            name: _no_grad(functools.partial(forward, input))
            for name, forward in _log_softmax_forwards(shape, compile_backend).items()
        }

    return build


def _log_softmax_forward_backward(shape: LogSoftmaxShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        generator = torch.Generator().manual_seed(SEED)
        input = _random(shape.size, device, dtype, generator).requires_grad_()
        grad_output = _random(shape.size, device, dtype, generator)

        def step(forward: Callable) -> Step:
            return lambda: torch.autograd.grad(forward(input), input, grad_output)

        return {name: step(forward) for name, forward in _log_softmax_forwards(shape, compile_backend).items()}

    return build


# --------------------------------------------------------------------------- the tutorial's CNN, end to end


def mnist_batches(selection: Selection) -> list[int]:
    if selection == "smoke":
        return [2]
    return [32, 64, 256, 1024] if selection == "full" else [32, 64, 256]


def _mnist_models(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """MnistCNN per implementation, all with the same initial weights."""
    models = {}
    for name, fused in (("ptfast", True), ("eager", False), ("compile", False)):
        torch.manual_seed(SEED)
        models[name] = MnistCNN(fused=fused).to(device, dtype)
    return models


def _mnist_data(batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(images (N, 1, 28, 28), labels (N,)) drawn at random."""
    generator = torch.Generator().manual_seed(SEED)
    images = _random((batch, 1, 28, 28), device, dtype, generator)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return images, labels


def _training_steps(
    models: dict[str, torch.nn.Module], images: Tensor, loss: Callable[[Tensor], Tensor],
    compile_backend: str, momentum: float,
) -> dict[str, Step]:
    """One SGD training step per implementation: zero the gradients, `loss` of the model's
    output on `images`, backward, step ("compile" runs its model through torch.compile)."""

    def step(name: str, model: torch.nn.Module) -> Step:
        model.train()
        forward = compile_native(model, compile_backend) if name == "compile" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)

        def train_step() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            value = loss(forward(images))
            value.backward()
            optimizer.step()
            return value

        return train_step

    return {name: step(name, model) for name, model in models.items()}


def _inference_steps(models: dict[str, torch.nn.Module], images: Tensor, compile_backend: str) -> dict[str, Step]:
    """One eval-mode, no-grad forward on `images` per implementation."""

    def step(name: str, model: torch.nn.Module) -> Step:
        model.eval()
        forward = compile_native(model, compile_backend) if name == "compile" else model
        return _no_grad(functools.partial(forward, images))

    return {name: step(name, model) for name, model in models.items()}


def _mnist_train_step(batch: int) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        images, labels = _mnist_data(batch, device, dtype)
        loss = functools.partial(F.nll_loss, target=labels)
        return _training_steps(_mnist_models(device, dtype), images, loss, compile_backend, momentum=0.5)

    return build


def _mnist_inference(batch: int) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        images, _ = _mnist_data(batch, device, dtype)
        return _inference_steps(_mnist_models(device, dtype), images, compile_backend)

    return build


# --------------------------------------------------------------------------- whole models through ptfast.fuse


class LeNet5(torch.nn.Module):
    """LeNet-5 on 28x28 images (the first convolution padded to 32x32), ReLU and
    max-pooling as usually written today, log-probabilities out: (N, 1, 28, 28) -> (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1 = torch.nn.Linear(16 * 5 * 5, 120)
        self.fc2 = torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


@dataclass(frozen=True)
class ModelShape:
    """A whole model, unmodified ("eager", "compile") and through ``ptfast.fuse`` ("ptfast"),
    on (batch, 3 or 1, size, size) random images; torchvision's models with random weights."""

    name: str
    batch: int
    channels: int
    size: int

    def describe(self) -> str:
        return f"{self.name} {self.size}x{self.size} N{self.batch}"

    def make(self) -> torch.nn.Module:
        if self.name == "lenet5":
            return LeNet5()
        import torchvision  # the torchvision models are benchmarked only where it is installed

        return getattr(torchvision.models, self.name)(weights=None)


MODEL_SHAPES = [
    ModelShape("lenet5", 64, 1, 28),
    ModelShape("alexnet", 4, 3, 224),
    ModelShape("vgg11", 2, 3, 224),
    ModelShape("squeezenet1_1", 4, 3, 224),
]


def model_shapes(selection: Selection) -> list[ModelShape]:
    """LeNet-5 in the quick set; with torchvision installed, AlexNet, VGG-11 and SqueezeNet 1.1 in the full set."""
    if selection == "smoke":
        return []
    shapes = [MODEL_SHAPES[0]]
    if selection == "full" and importlib.util.find_spec("torchvision") is not None:
        shapes += MODEL_SHAPES[1:]
    return shapes


def _models(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The model per implementation, all with the same initial weights."""
    torch.manual_seed(SEED)
    native = shape.make().to(device, dtype)
    return {"ptfast": ptfast.fuse(native), "eager": native, "compile": copy.deepcopy(native)}


def _model_images(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    images = _random((shape.batch, shape.channels, shape.size, shape.size), device, dtype, generator)
    labels = torch.randint(0, 10, (shape.batch,), generator=generator).to(device)
    return images, labels


def _model_train_step(shape: ModelShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        images, labels = _model_images(shape, device, dtype)
        # LeNet5 ends in log_softmax (fused by ptfast.fuse); torchvision's models give logits.
        loss = functools.partial(F.nll_loss if shape.name == "lenet5" else F.cross_entropy, target=labels)
        return _training_steps(_models(shape, device, dtype), images, loss, compile_backend, momentum=0.9)

    return build


def _model_inference(shape: ModelShape) -> Build:
    def build(device: torch.device, dtype: torch.dtype, compile_backend: str) -> dict[str, Step]:
        images, _ = _model_images(shape, device, dtype)
        return _inference_steps(_models(shape, device, dtype), images, compile_backend)

    return build


# --------------------------------------------------------------------------- selection


def all_cases(selection: Selection) -> list[Case]:
    """Every case of `selection`: "smoke" (tiny shapes, for tests), "quick" (no batch 1024) or "full"."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    backend = COMPILE_BACKENDS[selection]
    cases: list[Case] = []
    for shape in block_shapes(selection):
        cases += [
            Case("conv2d_relu_max_pool2d", "inference", shape.describe(), _block_inference(shape), backend,
                 flops=shape.conv_flops()),
            Case("conv2d_relu_max_pool2d", "forward+backward", shape.describe(), _block_forward_backward(shape),
                 backend, flops=shape.forward_backward_flops()),
        ]
    for shape in log_softmax_shapes(selection):
        cases += [
            Case("log_softmax", "inference", shape.describe(), _log_softmax_inference(shape), backend,
                 elements_moved=shape.elements_moved(backward=False)),
            Case("log_softmax", "forward+backward", shape.describe(), _log_softmax_forward_backward(shape), backend,
                 elements_moved=shape.elements_moved(backward=True)),
        ]
    for batch in mnist_batches(selection):
        cases += [
            Case("mnist_cnn", "train_step", f"N{batch}", _mnist_train_step(batch), backend),
            Case("mnist_cnn", "inference", f"N{batch}", _mnist_inference(batch), backend),
        ]
    for shape in model_shapes(selection):
        cases += [
            Case("models", "train_step", shape.describe(), _model_train_step(shape), backend),
            Case("models", "inference", shape.describe(), _model_inference(shape), backend),
        ]
    return cases


def name_matches(name: str, pattern: str | None) -> bool:
    """Whether `name` contains `pattern`, which may hold shell wildcards
    (e.g. "log_softmax/inference" or "mnist1*N64") and name several
    alternatives separated by commas ("mnist1*N64,log_softmax/inference/4096x10");
    None matches everything."""
    return pattern is None or any(
        fnmatch.fnmatchcase(name, f"*{alternative.strip()}*") for alternative in pattern.split(",")
    )


def select_cases(selection: Selection, family: str | None = None, pattern: str | None = None) -> list[Case]:
    """The cases of `selection`, of one `family` if given, whose name matches `pattern` if given."""
    return [
        case
        for case in all_cases(selection)
        if (family is None or case.family == family) and name_matches(case.name, pattern)
    ]
