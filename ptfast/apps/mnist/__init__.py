"""``ptfast-mnist``: train the tutorial's MNIST CNN on ptfast's fused kernels.

    cli.py           arguments and main: ``ptfast-mnist`` / ``python -m ptfast.apps.mnist``
    data.py          MNIST and Fashion-MNIST as whole tensors: the IDX reader, the batch iterator
    distributed.py   one process or one rank of a torchrun job: process group, device, reductions
    training.py      the training loop of pytorch/examples' MNIST, timed per epoch
    report.py        the side-by-side table, the summary lines, saving state dicts
"""
