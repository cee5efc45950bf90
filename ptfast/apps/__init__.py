"""Applications built on ptfast: the ``ptfast-mnist`` trainer and the ``ptfast-bench`` benchmark.

    ptfast.apps.mnist   ``ptfast-mnist`` / ``python -m ptfast.apps.mnist``: train the tutorial's CNN
    ptfast.apps.bench   ``ptfast-bench`` / ``python -m ptfast.apps.bench``: ptfast vs eager vs torch.compile
    ptfast.apps.paths   the output-path checks both commands make before they start

They ship with the library so that the commands work from a wheel, but the
library (``ptfast`` and its other modules) never imports them.
"""
