"""`python -m fnn train`: seed 000's network trained with the fused layers."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import seed000_data
from .dispatch import backend
from .modules import FNN
from .trainer import Trainer


def describe_backend(device: torch.device) -> str:
    """A sentence naming what runs the kernels on `device`."""
    kind = backend(device)
    if kind == "triton":
        return f"compiled Triton kernels on {torch.cuda.get_device_name(device)}"
    if kind == "interpreter":
        return "Triton kernels in Triton's interpreter on the CPU (TRITON_INTERPRET=1)"
    return "the PyTorch reference on the CPU (fnn.reference; set TRITON_INTERPRET=1 to run the kernels)"


def seed000_model(seed: int, device: torch.device) -> FNN:
    """Seed 000's 2-32-1 sigmoid network without bias, weights drawn as the seed draws them:
    torch.manual_seed(seed); w1 = randn(2, 32); w2 = randn(32, 1) (in x out, hence the .T)."""
    torch.manual_seed(seed)
    w1, w2 = torch.randn(2, 32), torch.randn(32, 1)
    model = FNN([2, 32, 1], activation="sigmoid", bias=False, device=device)
    with torch.no_grad():
        model.layers[0].weight.copy_(w1.T)
        model.layers[1].weight.copy_(w2.T)
    return model


def train(
    epochs: int = 101,
    lr: float = 0.001,
    seed: int = 2,
    device: str = "auto",
    plot: str | None = "fnn_loss.png",
    progress: bool = True,
) -> list[float]:
    """Train seed 000's network by SGD on 0.5 * sum((y_hat - y)^2); return the mean
    cross-entropy of every epoch (the loss the seed prints), measured before its update."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    print(f"backend: {describe_backend(dev)}")
    x, y = (t.to(dev) for t in seed000_data())
    model = seed000_model(seed, dev)
    trainer = Trainer(model, loss="sse", lr=lr)
    history: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="training", unit="epoch", file=sys.stderr, leave=False)
    start = time.perf_counter()
    for epoch in range(epochs):
        with torch.no_grad():
            bce = torch.nn.functional.binary_cross_entropy(model(x), y).item()
        history.append(bce)
        if epoch % 20 == 0:
            line = f"Epoch {epoch} | Loss: {bce}"
            bar.write(line) if bar else print(line)
        trainer.step(x, y)  # one kernel launch on CUDA (fnn.Trainer)
        if bar:
            bar.update()
    if bar:
        bar.close()
    print(f"{epochs} epochs in {time.perf_counter() - start:.2f} s")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(epochs), history)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean cross-entropy")
        ax.set_title("fnn: seed 000's 2-32-1 network on Iris")
        fig.tight_layout()
        fig.savefig(plot)
        plt.close(fig)
        print(f"loss curve saved to {plot}")
    return history


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train seed 000's 2-32-1 network on two Iris classes")
    t.add_argument("--epochs", type=int, default=101, help="epochs (default 101)")
    t.add_argument("--lr", type=float, default=0.001, help="learning rate (default 0.001)")
    t.add_argument("--seed", type=int, default=2, help="torch.manual_seed for the weights (default 2)")
    t.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    t.add_argument("--plot", default="fnn_loss.png", help="PNG path of the loss curve (fnn_loss.png)")
    t.add_argument("--no-plot", action="store_true", help="do not save a plot")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    error = t.error  # a usage error of `train` shows train's usage line
    if args.epochs < 1:
        error("--epochs must be >= 1")
    if not 0 < args.lr < float("inf"):  # NaN fails this too
        error(f"--lr must be a finite number > 0, got {args.lr}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.manual_seed takes
        error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    plot = None
    if not args.no_plot:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            error(f"--plot must name a .png file, got {args.plot!r}")
        if not plot.parent.is_dir():
            error(f"--plot {args.plot}: no folder {str(plot.parent)!r}")
    if args.device != "auto":
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            error(f"--device {args.device}: no such CUDA device here")
    train(
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        plot=None if plot is None else str(plot),
        progress=not args.no_progress,
    )
    return 0
