"""`python -m fnn train`: the command line, run in-process through fnn.cli.main and once
as a real `python -m fnn` subprocess.

The losses it prints are checked against seed 000's training written out in plain PyTorch
(autograd on 0.5 * sum((y_hat - y)^2), `w -= lr * grad`), so --lr and --seed are checked
by their effect, not only by being accepted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL

from fnn.cli import describe_backend, main
from fnn.data import seed000_data

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSS_LINE = re.compile(r"^Epoch (\d+) \| Loss: (\S+)$", re.MULTILINE)


def plain_torch_bce(epochs: int, lr: float, seed: int) -> list[float]:
    """Seed 000's training in plain PyTorch: the mean BCE of every epoch, before its update."""
    torch.manual_seed(seed)
    w1 = torch.randn(2, 32).requires_grad_()
    w2 = torch.randn(32, 1).requires_grad_()
    x, y = seed000_data()
    history = []
    for _ in range(epochs):
        y_hat = torch.sigmoid(torch.sigmoid(x @ w1) @ w2)
        history.append(F.binary_cross_entropy(y_hat.detach(), y).item())
        (0.5 * ((y_hat - y) ** 2).sum()).backward()
        with torch.no_grad():
            for w in (w1, w2):
                w -= lr * w.grad
                w.grad = None
    return history


def printed_losses(out: str) -> dict[int, float]:
    return {int(epoch): float(loss) for epoch, loss in LOSS_LINE.findall(out)}


def assert_losses(out: str, expected: list[float], epochs: list[int], what: str) -> None:
    got = printed_losses(out)
    assert sorted(got) == epochs, f"{what}: printed epochs {sorted(got)}, expected {epochs}\n{out}"
    for e in epochs:
        assert abs(got[e] - expected[e]) <= RTOL[torch.float32] * abs(expected[e]), (
            f"{what}: epoch {e} loss {got[e]!r}, plain PyTorch gives {expected[e]!r}"
        )


def assert_png(path: Path) -> None:
    assert path.is_file(), f"no plot written at {path}"
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_train_end_to_end(tmp_path, capsys, device):
    png = tmp_path / "loss.png"
    assert main(["train", "--epochs", "21", "--plot", str(png), "--device", device.type]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"backend: {describe_backend(device)}"
    if device.type == "cpu":  # conftest sets TRITON_INTERPRET=1 on machines without CUDA
        assert "interpreter" in lines[0], lines[0]
    else:
        assert "compiled Triton kernels" in lines[0], lines[0]
    assert_losses(out, plain_torch_bce(21, 0.001, 2), [0, 20], "default run")
    assert "21 epochs in " in out
    assert f"loss curve saved to {png}" in out
    assert "training" in err, "no progress bar on stderr"
    assert_png(png)


def test_backend_line_follows_triton_interpret(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in describe_backend(cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "reference" in describe_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "reference" in describe_backend(cpu)


def test_train_on_reference_backend(capsys, monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take fnn.reference; the losses are the same."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["train", "--epochs", "21", "--no-plot", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"backend: {describe_backend(torch.device('cpu'))}"
    assert "reference" in out.splitlines()[0]
    assert_losses(out, plain_torch_bce(21, 0.001, 2), [0, 20], "reference backend")
    assert err == "", f"--no-progress still wrote to stderr: {err!r}"


def test_no_plot_writes_nothing(tmp_path, capsys, monkeypatch, device):
    monkeypatch.chdir(tmp_path)  # the default --plot is fnn_loss.png in the working directory
    assert main(["train", "--epochs", "1", "--no-plot", "--no-progress", "--device", device.type]) == 0
    out, _ = capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    assert "saved" not in out
    assert_losses(out, plain_torch_bce(1, 0.001, 2), [0], "--no-plot")


def test_default_plot_path(tmp_path, capsys, monkeypatch, device):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--no-progress", "--device", device.type]) == 0
    assert "loss curve saved to fnn_loss.png" in capsys.readouterr().out
    assert_png(tmp_path / "fnn_loss.png")


def test_lr_is_used(capsys, device):
    lr = 0.05
    argv = ["train", "--epochs", "21", "--lr", str(lr), "--no-plot", "--no-progress", "--device", device.type]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    expected = plain_torch_bce(21, lr, 2)
    assert_losses(out, expected, [0, 20], f"--lr {lr}")
    # The learning rate matters by far more than the tolerance at epoch 20.
    default = plain_torch_bce(21, 0.001, 2)
    assert abs(expected[20] - default[20]) > 1e-2 * default[20]


def test_seed_is_used(capsys, device):
    argv = ["train", "--epochs", "1", "--seed", "7", "--no-plot", "--no-progress", "--device", device.type]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    expected = plain_torch_bce(1, 0.001, 7)
    assert_losses(out, expected, [0], "--seed 7")
    default = plain_torch_bce(1, 0.001, 2)
    assert abs(printed_losses(out)[0] - default[0]) > 1e-2 * default[0], "--seed 7 gives seed 2's loss"


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_rejects_nonpositive_epochs(epochs, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", epochs, "--no-plot"])
    assert exc.value.code not in (0, None)
    out, err = capsys.readouterr()
    assert "--epochs must be >= 1" in err
    assert "Epoch" not in out, "training started before the arguments were checked"


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan", "inf"])
def test_rejects_bad_lr(lr, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--no-plot", "--lr", lr])
    assert exc.value.code not in (0, None)
    out, err = capsys.readouterr()
    assert "--lr must be" in err
    assert "Epoch" not in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", str(2**64)], "--seed must be in"),
        (["--seed", str(-(2**63) - 1)], "--seed must be in"),
        (["--plot", "curve.jpg"], "--plot must name a .png file"),
        (["--plot", "curve"], "--plot must name a .png file"),
        (["--plot", "no/such/folder/curve.png"], "no folder"),
    ],
)
def test_rejects_bad_seed_and_plot_before_training(args, message, capsys):
    """A seed torch.manual_seed refuses, or a plot it could not write as that PNG file, is a
    usage error of `train` before any training (before, the plot's failed after it)."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", *args])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and "usage: python -m fnn train" in err
    assert "Epoch" not in out


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "meta"])
def test_rejects_bad_device(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--no-plot", "--device", bad])
    assert exc.value.code not in (0, None)
    assert "--device" in capsys.readouterr().err


def test_rejects_missing_cuda_device(capsys):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 without CUDA)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "1", "--no-plot", "--device", missing])
    assert exc.value.code not in (0, None)
    assert "no such CUDA device" in capsys.readouterr().err


def test_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code not in (0, None)


def test_module_entry_point(tmp_path):
    """`python -m fnn train` in a fresh interpreter, kernels in Triton's interpreter.

    --device cpu: with TRITON_INTERPRET=1 triton interprets every kernel, which on a CUDA
    machine would otherwise be handed CUDA tensors."""
    png = tmp_path / "curve.png"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "fnn", "train", "--epochs", "3", "--no-progress", "--plot", str(png)]
    proc = subprocess.run(
        [*cmd, "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    first = proc.stdout.splitlines()[0]
    assert first.startswith("backend: ") and "interpreter" in first, first
    assert_losses(proc.stdout, plain_torch_bce(3, 0.001, 2), [0], "python -m fnn train")
    assert "3 epochs in " in proc.stdout
    assert_png(png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
