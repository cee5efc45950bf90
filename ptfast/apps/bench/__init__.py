"""ptfast's benchmark suite: ptfast vs native eager PyTorch vs torch.compile, side by side.

    cases.py    what is timed: ops, shapes, the code of each implementation
    timing.py   how: warm-up, interleaved repeats, medians (CUDA events on GPU)
    memory.py   bytes saved for backward per block call; CUDA peak memory
    machine.py  the machine description stored with the results
    runner.py   runs cases into result records
    report.py   printed table, results.json, results.md, speedup plots
    cli.py      ``ptfast-bench`` / ``python -m ptfast.apps.bench``

The pytest-benchmark files under the repository's benchmarks/ use the same
cases, so shapes are defined once.
"""
