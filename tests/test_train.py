"""ptfast.apps.mnist (`ptfast-mnist`): smoke runs on tiny IDX files, --impl both, --save, offline, DDP."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptfast.apps.mnist import data
from ptfast.apps.mnist.cli import main
from ptfast.apps.mnist.distributed import process_group
from common_utils import tiny_dataset
from tutorial import Net

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("tiny-mnist"))


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


SUMMARY = re.compile(
    r"^(native|fused): test accuracy (\d+\.\d\d)% \((\d+)/(\d+)\), test loss (\d+\.\d+), "
    r"[\d.]+ s/epoch, \d+ images/s$",
    re.M,
)


@pytest.mark.slow
def test_module_entry_smoke_run(tiny):
    """`python -m ptfast.apps.mnist` as a user runs it: a few steps, exit 0, the summary line."""
    cmd = [sys.executable, "-m", "ptfast.apps.mnist", "--data-root", str(tiny), "--max-steps", "3", "--no-download"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    (summary,) = SUMMARY.findall(proc.stdout)
    assert summary[0] == "fused" and summary[3] == "50"


def test_impl_both_prints_the_table_and_matches(tiny, capsys):
    assert main(["--data-root", str(tiny), "--impl", "both", "--epochs", "2", "--max-steps", "5", "--no-download"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^impl\s+s/epoch\s+images/s\s+test loss\s+test accuracy$", out, re.M)
    rows = dict(
        (m.group(1), (float(m.group(2)), float(m.group(3))))
        for m in re.finditer(r"^(native|fused)\s+[\d.]+\s+\d+\s+(\d+\.\d{4})\s+(\d+\.\d\d)%$", out, re.M)
    )
    assert set(rows) == {"native", "fused"}
    # Same seed, same batches, same dropout masks: the two trainings agree up to rounding.
    assert rows["native"][0] == pytest.approx(rows["fused"][0], abs=2e-4)
    assert "fused vs native" in out
    assert [s[0] for s in SUMMARY.findall(out)] == ["native", "fused"]


@pytest.mark.parametrize("impl", ["fused", "native"])
def test_save_loads_into_the_tutorial_net(tiny, tmp_path, capsys, impl):
    path = tmp_path / "net.pt"
    argv = ["--data-root", str(tiny), "--impl", impl, "--max-steps", "4", "--no-download", "--save", str(path)]
    assert main(argv) == 0
    state = torch.load(path)
    net = Net()
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state)  # strict
    # The saved weights are the trained ones, not the initial ones.
    torch.manual_seed(1)
    assert not torch.equal(Net().conv1.weight, net.conv1.weight)
    out = capsys.readouterr().out
    (summary,) = SUMMARY.findall(out)
    # Evaluated by the tutorial's own Net on the test files, the saved model scores what the summary says.
    d = data.load("mnist", tiny, download_missing=False)
    with torch.no_grad():
        output = net.eval()(data.normalize(d.test_images))
    assert int((output.argmax(1) == d.test_labels).sum()) == int(summary[2])
    assert F.nll_loss(output, d.test_labels).item() == pytest.approx(float(summary[4]), abs=1e-4)


def test_cli_trains_exactly_the_plain_loop(tiny, tmp_path):
    """The CLI is pytorch/examples' loop and nothing else: its warm-up step and timing change no weight."""
    from ptfast.models import MnistCNN

    path = tmp_path / "cli.pt"
    assert main(["--data-root", str(tiny), "--max-steps", "3", "--no-download", "--save", str(path)]) == 0
    d = data.load("mnist", tiny, download_missing=False)
    torch.manual_seed(1)  # --seed 1
    net = MnistCNN(fused=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
    batches = data.Batches(d.train_images, d.train_labels, 64, shuffle=True, seed=1)
    batches.set_epoch(1)
    torch.manual_seed(2)  # epoch 1's dropout seed: seed + epoch
    net.train()
    for step, (x, target) in zip(range(3), batches):
        optimizer.zero_grad()
        F.nll_loss(net(x), target).backward()
        optimizer.step()
    saved = torch.load(path)
    for key, value in net.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_save_both_with_impl_placeholder(tiny, tmp_path):
    argv = ["--data-root", str(tiny), "--impl", "both", "--max-steps", "2", "--no-download",
            "--save", str(tmp_path / "{impl}.pt")]
    assert main(argv) == 0
    native, fused = torch.load(tmp_path / "native.pt"), torch.load(tmp_path / "fused.pt")
    for key in native:
        torch.testing.assert_close(native[key], fused[key], rtol=1e-4, atol=1e-5)


def test_training_learns_and_min_accuracy_gates(tiny, capsys):
    argv = ["--data-root", str(tiny), "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--no-download"]
    assert main(argv + ["--min-accuracy", "50"]) == 0
    accuracy = float(SUMMARY.findall(capsys.readouterr().out)[-1][1])
    assert accuracy >= 50
    assert main(argv + ["--max-steps", "1", "--min-accuracy", "100.01"]) == 3
    assert "below --min-accuracy" in capsys.readouterr().out


def test_adadelta_and_verbose_time_split(tiny, capsys):
    argv = ["--data-root", str(tiny), "--optimizer", "adadelta", "--epochs", "2", "--max-steps", "6", "--verbose",
            "--no-download", "--test-batch-size", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "adadelta lr 1.0" in out
    assert re.search(r"data \(index \+ normalise\) [\d.]+ s, compute \(forward \+ backward \+ step\) [\d.]+ s", out)
    assert "images decoded from IDX" in out
    assert len(SUMMARY.findall(out)) == 1


@pytest.mark.slow
def test_compile_smoke(tiny, capsys):
    argv = ["--data-root", str(tiny), "--max-steps", "2", "--no-download"]
    argv += ["--compile", "--compile-backend", "aot_eager"]
    assert main(argv) == 0
    assert "torch.compile" in capsys.readouterr().out


def _user_error(argv: list[str], capsys) -> str:
    """main(argv) must end as argparse ends on its own errors: status 2, `ptfast-mnist: error: ...`."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert err.startswith("usage: ptfast-mnist") and "ptfast-mnist: error: " in err, err
    assert "Traceback" not in err
    assert "epoch" not in out  # found before any training
    return err


def test_offline_message(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    err = _user_error(["--dataset", "fashion-mnist", "--data-root", str(empty), "--no-download"], capsys)
    for name in data.FILES.values():
        assert f"{name}.gz" in err
    assert str(empty / "FashionMNIST" / "raw") in err
    assert "apt-get install dataset-fashion-mnist" in err


def test_corrupt_data_is_a_user_error(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:-7] if "t10k-images" in f.name else f.read_bytes())
    err = _user_error(["--data-root", str(broken), "--no-download"], capsys)
    assert "t10k-images-idx3-ubyte.gz: corrupt or truncated gzip data" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_user_error(tiny, capsys):
    err = _user_error(["--data-root", str(tiny), "--device", "cuda", "--no-download"], capsys)
    assert "ptfast-mnist: error: --device cuda: CUDA is not available to this torch" in err


def test_unwritable_save_paths_are_user_errors_before_training(tiny, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for save, problem in [(tmp_path, "is a directory"), (a_file / "sub" / "net.pt", f"{a_file} is not a directory")]:
        err = _user_error(["--data-root", str(tiny), "--no-download", "--save", str(save)], capsys)
        assert f"ptfast-mnist: error: --save {save}: {problem}" in err


def test_unknown_compile_backend_is_a_user_error(tiny, capsys):
    err = _user_error(["--data-root", str(tiny), "--compile", "--compile-backend", "nope"], capsys)
    assert "--compile-backend 'nope': not a torch.compile backend; expected one of" in err and "inductor" in err


@pytest.mark.slow
def test_user_error_of_the_command_prints_no_traceback(tmp_path):
    """As a user runs it: `python -m ptfast.apps.mnist` with no dataset: argparse's error, status 2."""
    cmd = [sys.executable, "-m", "ptfast.apps.mnist", "--data-root", str(tmp_path), "--no-download"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: ptfast-mnist") and "ptfast-mnist: error: MNIST not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_arguments(capsys):
    _user_error(["--batch-size", "0"], capsys)
    _user_error(["--impl", "cudnn"], capsys)


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank saves its own weights; they must be equal and trained."""
    cmd = [
        # --standalone: torchrun picks a free port itself (no window for another process to take it).
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ptfast.apps.mnist",
        "--data-root", str(tiny), "--max-steps", "3", "--batch-size", "16", "--device", "cpu", "--no-download",
        "--save", str(tmp_path / "rank{rank}.pt"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 processes (DDP)" in proc.stdout
    # Only rank 0 prints the summary, with the test metrics reduced over both ranks' halves of the test set.
    (summary,) = SUMMARY.findall(proc.stdout)
    assert summary[3] == "50"
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == set(Net().state_dict())
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    torch.manual_seed(1)
    assert not torch.equal(Net().fc2.weight, rank0["fc2.weight"])


@pytest.mark.parametrize("leaving", ["normally", "on a user error", "on an exception", "on an interrupt"])
def test_every_rank_meets_at_a_barrier_before_destroying_the_process_group(monkeypatch, leaving):
    """A rank that tore down its group while another still worked made that one abort (SIGABRT)."""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    raised = {"normally": None, "on a user error": SystemExit(2), "on an exception": ValueError("bug"),
              "on an interrupt": KeyboardInterrupt()}[leaving]
    with pytest.raises(type(raised)) if raised else contextlib.nullcontext():
        with process_group("cpu") as (dist, device):
            assert (dist.rank, dist.world_size, device.type) == (1, 2, "cpu")
            if raised:
                raise raised
    # After an exception or an interrupt, the other ranks may never reach a barrier: only destroy.
    clean = leaving in ("normally", "on a user error")
    assert calls == (["init", "barrier", "destroy"] if clean else ["init", "destroy"])
