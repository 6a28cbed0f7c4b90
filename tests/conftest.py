"""Test setup: without a CUDA device, the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when the
kernels are defined), hence here, before any test module imports kernels.
"""

import hashlib
import os
import tempfile
from pathlib import Path

# torch.compile's on-disk caches (inductor, AOTAutograd) can hand a graph compiled against
# another version of fnn's registered ops to this one (seen: a call with the argument count
# of another branch's schema). Key the cache directory on the files that register the ops,
# so a changed schema never meets a stale graph, while kernel changes keep the cache warm.
_ROOT = Path(__file__).resolve().parents[1]
_SOURCE = b"".join((_ROOT / "fnn" / f).read_bytes() for f in ("ops.py", "network_ops.py"))
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "torchinductor_fnn_" + hashlib.sha1(_SOURCE).hexdigest()[:12]),
)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.memory  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so an element left unwritten fails the test."""
    kernels.memory.POISON = True
    yield
    kernels.memory.POISON = False


@pytest.fixture
def fp32_matmul_precision():
    """The test starts at "highest" (F.linear and the kernels in IEEE float32, for the float32
    tolerances); the global setting is restored afterwards, whatever the test changed it to.
    Modules that need it for every test say `pytestmark = pytest.mark.usefixtures(...)`."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
