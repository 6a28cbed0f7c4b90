"""Packaging and habits: the wheel carries the kernels, the data file and py.typed; every public
name has a docstring (the computing ones with their backward maths) and type hints."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fnn

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels_data_and_py_typed(tmp_path):
    """Build the wheel from a copy of the source (so the checkout gets no build/ or egg-info)
    and read its file list."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ROOT.iterdir():  # every top-level package, whichever pyproject.toml lists
        if (pkg / "__init__.py").is_file() and pkg.name != "tests":
            shutil.copytree(pkg, src / pkg.name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", "dist"]
    done = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = (src / "dist").glob("fnn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {"fnn/py.typed", "fnn/data/iris.csv"}
    for package in ("fnn", "kernels"):  # every module of both packages
        expected |= {p.relative_to(src).as_posix() for p in (src / package).rglob("*.py")}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert "kernels/linear_act.py" in names and "fnn/ops.py" in names
    assert not any(n.startswith("tests/") for n in names), "tests are not part of the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fnn = fnn.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# Names whose docstring must give the backward maths as well as the forward.
COMPUTING = {"FNN", "FNNFunction", "FusedLinear", "LinearActFunction", "fnn_forward", "fuse",
             "linear_act", "linear_sigmoid"}


@pytest.mark.parametrize("name", fnn.__all__)
def test_public_name_has_docstring(name):
    obj = getattr(fnn, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.split()) >= 5, f"fnn.{name} has no real docstring: {doc!r}"
    if name in COMPUTING:
        low = doc.lower()
        assert "backward" in low or "gradient" in low, f"fnn.{name}'s docstring lacks the backward maths"
        assert "^t" in low, f"fnn.{name}'s docstring lacks a formula (x W^T ...)"


def _annotated(fn, what: str) -> None:
    sig = inspect.signature(fn)
    bare = [p for p in sig.parameters.values() if p.name not in ("self", "cls", "ctx")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is p.empty]
    assert not bare, f"{what}: parameters without type hints: {[p.name for p in bare]}"
    assert sig.return_annotation is not sig.empty, f"{what}: no return type hint"


@pytest.mark.parametrize("name", sorted(n for n in fnn.__all__ if callable(getattr(fnn, n))))
def test_public_api_has_type_hints(name):
    obj = getattr(fnn, name)
    if inspect.isclass(obj):
        methods = ["__init__", "forward", "from_linear"]
        if issubclass(obj, torch.autograd.Function):
            methods = ["forward"]
        for m in methods:
            if m in vars(obj):
                fn = inspect.getattr_static(obj, m)
                fn = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
                _annotated(fn, f"fnn.{name}.{m}")
    else:
        _annotated(obj, f"fnn.{name}")
