"""Memory of a fused block call: what autograd keeps for backward, and the CUDA peak.

The fused op's point is memory as much as time: it saves input, weight and
one uint8 arg-max code per pooled output, where the eager composite also
keeps the ReLU output (the size of the conv output) and int64 pooling indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ptfast.apps.bench.cases import BlockShape, block_forwards, memory_case_name
from ptfast.apps.bench.timing import describe_error, synchronize


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd saved for backward in one forward call, counting each storage once.

    total: every saved storage, the call's own arguments (input, weight, bias) included.
    beyond_arguments: the storages that are not the arguments', i.e. what the
    call adds to the memory a training step holds until backward.
    """

    total: int
    beyond_arguments: int


def saved_for_backward(forward: Callable[[], Tensor], arguments: Sequence[Tensor]) -> SavedBytes:
    """Run `forward` under saved-tensor hooks and add up the unique storages it saves.

    Storages, not tensors, are counted: two saved views of one buffer (an
    op saving its input and that input's reshape) cost the memory once.
    """
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    argument_storages = {argument.untyped_storage().data_ptr() for argument in arguments}
    return SavedBytes(
        total=sum(storages.values()),
        beyond_arguments=sum(size for pointer, size in storages.items() if pointer not in argument_storages),
    )


def cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated during `step`, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class MemoryResult:
    """Saved-for-backward bytes (and on CUDA the forward+backward peak) per implementation."""

    case: str
    device: str
    saved: dict[str, SavedBytes] = field(default_factory=dict)
    cuda_peak_bytes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_block_memory(
    shape: BlockShape, device: torch.device, compile_backend: str, dtype: torch.dtype = torch.float32
) -> MemoryResult:
    """Memory of one forward(+backward) of the block at `shape`, for every implementation."""
    torch._dynamo.reset()
    result = MemoryResult(case=memory_case_name(shape), device=device.type)
    arguments = shape.arguments(device, dtype, requires_grad=True)
    leaves = [t for t in arguments if t.requires_grad]
    for name, block in block_forwards(shape, compile_backend).items():

        def forward(block: Callable = block) -> Tensor:
            return block(*arguments)

        def forward_backward(forward: Callable[[], Tensor] = forward) -> None:
            output = forward()
            torch.autograd.grad(output, leaves, torch.ones_like(output))

        try:
            # The first call compiles torch.compile's graph, so that the
            # hooks then see only what the compiled forward saves.
            forward_backward()
            result.saved[name] = saved_for_backward(forward, arguments)
            if device.type == "cuda":
                result.cuda_peak_bytes[name] = cuda_peak_bytes(forward_backward, device)
        except Exception as error:  # noqa: BLE001  (reported per implementation)
            result.errors[name] = describe_error(error)
    return result
