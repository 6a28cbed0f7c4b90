"""fnn: fused linear + activation layers for PyTorch, written in Triton.

    y = fnn.linear_act(x, weight, bias, activation="sigmoid")   # act(F.linear(x, weight, bias))
    model = fnn.FNN([2, 32, 1], bias=False)                     # a network of FusedLinear layers
    layer = fnn.FusedLinear(8, 8, activation=fnn.Activation("leaky_relu", negative_slope=0.2))
"""

from kernels.checks import Activation

from . import ops, reference
from .convert import fuse
from .functional import FNNFunction, LinearActFunction, backend, fnn_forward, linear_act, linear_sigmoid
from .modules import FNN, FusedLinear
from .trainer import Trainer

__all__ = [
    "Activation",
    "FNN",
    "FNNFunction",
    "FusedLinear",
    "LinearActFunction",
    "Trainer",
    "backend",
    "fnn_forward",
    "fuse",
    "linear_act",
    "linear_sigmoid",
    "ops",
    "reference",
]
__version__ = "0.1.0"
