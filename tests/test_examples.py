"""examples/: each script runs (small sizes, a few seconds each) and learns what it should."""

from __future__ import annotations

import sys

import pytest

from common_utils import EXAMPLES, load_example, tiny_dataset


def _run(name: str, argv: list[str]):
    """Run examples/<name>.py's main(argv) the way `python examples/<name>.py ARGV` does."""
    return load_example(name).main(argv)


def test_every_example_is_tested():
    tested = {"linear_regression", "logistic_regression", "softmax_regression", "mnist_cnn"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_linear_regression(capsys):
    loss, error = _run("linear_regression", ["--samples", "200", "--steps", "150"])
    assert loss < 0.01 and error < 0.05
    assert "linear regression: final MSE" in capsys.readouterr().out


def test_logistic_regression(capsys):
    loss, accuracy = _run("logistic_regression", ["--samples", "300", "--steps", "100"])
    assert accuracy > 0.9
    assert "training accuracy" in capsys.readouterr().out


def test_softmax_regression_uses_ptfast_log_softmax(capsys, monkeypatch):
    import ptfast

    calls = []
    real = ptfast.log_softmax
    monkeypatch.setattr(ptfast, "log_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, accuracy = _run("softmax_regression", ["--samples", "300", "--steps", "60"])
    assert accuracy > 0.9 and calls
    assert "softmax regression: final NLL" in capsys.readouterr().out


def test_mnist_cnn(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", n_train=256, n_test=50)
    argv = ["--data-root", str(root), "--epochs", "3", "--batch-size", "16", "--lr", "0.05"]
    loss, accuracy = _run("mnist_cnn", argv)
    out = capsys.readouterr().out
    assert "Test set: Average loss" in out and "/50 (" in out
    assert accuracy >= 0.5  # the tiny set's classes are easy: training did something


@pytest.mark.slow
def test_examples_run_as_scripts(tmp_path):
    """One real `python examples/x.py` run, as the docstrings say."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "softmax_regression.py"), "--samples", "100", "--steps", "10"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "softmax regression" in proc.stdout
