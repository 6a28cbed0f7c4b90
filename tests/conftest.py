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


def _interpreter_rounds_bfloat16_to_nearest() -> None:
    """Triton's interpreter (3.6 to 3.9 at least) converts float32 to bfloat16 by truncation,
    where a GPU's conversion (cvt.rn) rounds to nearest, ties to even. Truncation errs one way
    only: sums of truncated values drift, and the bfloat16 accuracy tests (twice PyTorch's
    error) would measure the interpreter rather than the kernels. This makes the interpreter's
    default float32 -> bfloat16 conversion round as the GPU's does; an explicit other rounding
    mode (fp_downcast_rounding="rtz") still truncates."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    if getattr(convert, "rounds_bfloat16_to_nearest", False):
        return
    rtne = interpreter._ir.ROUNDING_MODE.RTNE

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype != tl.bfloat16 or rounding_mode not in (None, rtne):
            return convert(input, input_dtype, output_dtype, rounding_mode)
        bits = np.ascontiguousarray(input, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # a carry moves into the exponent
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = np.where(nan, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        return out.astype(np.uint16).reshape(np.shape(input))

    convert_float.rounds_bfloat16_to_nearest = True
    convert_float.truncating = convert  # the interpreter's own, for tests of fnn without this
    interpreter._convert_float = convert_float


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bfloat16_to_nearest()


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
