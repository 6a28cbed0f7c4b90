"""Modules: they hold parameters and call the autograd Functions, nothing more."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd import forward_ad

from kernels.checks import Activation, check_activation

from .dispatch import autocast_for, autocast_on
from .functional import (
    _layers_ok,
    _linear_ok,
    _traced_transform,
    backend,
    fnn_forward,
    has_tangents,
    linear_act,
    run_layers,
    run_program,
)
from .network import check_fusion, flatten_parameters, fnn_network_forward, resolve_fusion
from .plan import must_call, parameters, plan

_any_autocast = torch._C._is_any_autocast_enabled
_STRIDED = torch.strided


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class FusedLinear(nn.Module):
    """`act(x @ weight^T + bias)` in one fused kernel: nn.Linear followed by its activation.

    `activation`: a name (torch's default parameters) or an fnn.Activation; `.activation` holds
    the name when every parameter is the default, else the Activation.
    Backward (fnn.LinearActFunction), with D = dY * act'(Z) read off the saved output (or the
    saved Z for gelu, gelu_tanh, silu, ...): dx = D weight, dweight = D^T x, dbias = sum over
    rows of D.
    Parameters are laid out and initialised as in nn.Linear (`weight` (out, in), `bias`
    (out,)), so an nn.Linear's state_dict loads into it (see also `from_linear`, `fnn.fuse`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | Activation = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_size(in_features, "in_features")
        self.out_features = _check_size(out_features, "out_features")
        self.activation = check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | Activation = "sigmoid") -> FusedLinear:
        """`activation(linear(x))` as one FusedLinear that shares `linear`'s Parameter objects
        (no copy: optimizers holding them keep working, and training one trains the other)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        fused = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            activation=activation,
            device="meta",  # placeholders, replaced by linear's parameters below
        )
        fused.weight = linear.weight
        if linear.bias is not None:
            fused.bias = linear.bias
        return fused.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """act(x @ weight^T + bias) through fnn.linear_act (fused kernel, fused backward)."""
        return linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


class FNN(nn.Module):
    """A feed-forward network of FusedLinear layers, run as one autograd node.

    Forward h_l = act_l(h_{l-1} W_l^T + b_l); backward (fnn.FNNFunction) with
    D_l = dh_l * act_l'(h_l): dW_l = D_l^T h_{l-1}, db_l = sum over rows of D_l, dh_{l-1} = D_l W_l.
    `sizes` lists the widths, input first: `FNN([2, 32, 1])` has layers 2->32 and 32->1.
    `activation` is one activation for every layer or a list with one per layer; each is a
    name or an fnn.Activation (e.g. `["gelu", fnn.Activation("leaky_relu", negative_slope=0.2)]`).
    The backward chains the layers' kernels, each layer's delta computed in the epilogue of
    the next layer's input-gradient kernel.

    A layer with a hook of its own (forward, forward-pre or backward), or a weight that
    torch.nn.utils.parametrize computes, makes the FNN call its layers one by one, as an
    nn.Sequential of them would.

    `fusion`: "layer" runs one fused kernel per layer (as above); "network" runs the whole
    network in one kernel per direction (fnn.network; every width must be <= 128, else
    ValueError); "auto" picks per call (fnn.network.resolve_fusion: a provisional,
    unmeasured heuristic). Under torch.autocast the "network" path falls back to "layer".
    Both paths serve every activation and parameter value, and save the same kind of tensor
    per layer (its output, or its Z where the activation saves Z: see fnn.Activation).

    The parameters are contiguous views of one flat buffer that the FNN owns, every weight
    then every bias (`flatten_parameters`, as nn.RNN's flat weights): the network kernels read
    it as it is. `to()`, `cuda()`, `double()`, `copy.deepcopy` and `torch.load` flatten
    again; where the parameters have been replaced otherwise, the network path concatenates
    them for each call (one `torch.cat`) until `flatten_parameters()` is called (the fused
    `fnn.Trainer` calls it).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Activation | Sequence[str | Activation] = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fusion: str = "auto",
    ) -> None:
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"FNN needs at least two sizes (input and output), got {sizes}")
        for i, s in enumerate(sizes):
            _check_size(s, f"sizes[{i}]")
        n_layers = len(sizes) - 1
        if isinstance(activation, (str, Activation)):
            activations = [activation] * n_layers
        elif isinstance(activation, Sequence):
            activations = list(activation)
        else:
            raise TypeError(
                "FNN activation must be a name, an fnn.Activation or a list of them, "
                f"got {type(activation).__name__}"
            )
        if len(activations) != n_layers:
            raise ValueError(
                f"FNN with sizes {sizes} has {n_layers} layers, but {len(activations)} "
                f"activations were given: {activations}"
            )
        self.layers = nn.ModuleList(
            FusedLinear(i, o, bias=bias, activation=a, device=device, dtype=dtype)
            for i, o, a in zip(sizes[:-1], sizes[1:], activations, strict=True)
        )
        self.fusion = check_fusion(fusion, sizes)
        self._flat: torch.Tensor | None = None
        self.flatten_parameters()

    def flatten_parameters(self) -> bool:
        """Make the parameters contiguous views of one new flat buffer of this module, in the
        whole-network kernels' layout (every layer's weight row-major, then every bias), with
        their current values. The Parameter objects stay the same (their `.data` is pointed
        at the buffer), so optimizers and hooks holding them are unaffected. Does nothing where
        they already are such views. Returns whether they are now; False, changing nothing,
        for parameters that are not plain tensors of a real device (FSDP's DTensors, meta),
        of mixed dtypes or devices, tied between layers, or while torch.compile traces."""
        return flatten_parameters(self)

    def _apply(self, fn, recurse=True):
        # to(), cuda(), double(), ... give the parameters new storage: flatten them again.
        out = super()._apply(fn, recurse)
        flatten_parameters(self)
        return out

    def __setstate__(self, state: dict) -> None:
        # Unpickled (torch.load) or deep-copied: flatten again unless the parameters still are
        # views of the unpickled flat buffer (torch.save stores their shared storage once).
        super().__setstate__(state)
        self.__dict__.setdefault("_flat", None)
        flatten_parameters(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_fnn_plan", None)  # the call plan (fnn.plan) refers to the layers: made again
        return state

    @property
    def sizes(self) -> list[int]:
        if torch.compiler.is_compiling():  # the weights' widths, as the plan's (in_features may be stale)
            return [self.layers[0].weight.shape[1]] + [layer.weight.shape[0] for layer in self.layers]
        return list(plan(self).sizes)

    @property
    def activations(self) -> list[str | Activation]:
        """Each layer's activation: its name, or its fnn.Activation when a parameter differs
        from the default."""
        return [layer.activation for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        p = plan(self)  # sizes, activations, flags: made once (fnn.plan)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FNN input must be a torch.Tensor, got {type(x).__name__}")
        if x.layout is not _STRIDED:
            raise TypeError(f"FNN input is a {x.layout} tensor; fnn takes dense (torch.strided) tensors")
        n_in = p.sizes[0]
        if x.dim() == 0 or x.shape[-1] != n_in:
            raise ValueError(
                f"FNN with sizes {list(p.sizes)} expects inputs of width {n_in} "
                f"(shape (..., {n_in})), got shape {tuple(x.shape)}"
            )
        if p.calls_layers():  # a layer's hooks run only if the layer is called
            return self._call_layers(x)
        if forward_ad._current_level >= 0 and has_tangents((x, *p.parameters())):
            return fnn_forward(x, *parameters(p), p.acts)  # forward mode: layer by layer
        fusion = p.fusion
        if fusion == "layer":
            mode = "layer"
        elif fusion == "network" and p.fits:
            mode = "network"
        else:
            mode = resolve_fusion(fusion, p.sizes, x.device)  # "auto" (or a bad value: raises)
        if (
            mode == "network"
            and backend(x.device) != "reference"
            and not autocast_on(x)  # under autocast FNN runs per layer
        ):
            return fnn_network_forward(self, x, p)
        if not _any_autocast():
            y = run_program(x, p)  # the usual eager call: the plan's launch program (fnn.programs)
            if y is not None:
                return y
        weights, biases = parameters(p)
        if not _any_autocast() and _linear_ok(x, weights[0], biases[0]) and _layers_ok(weights, biases):
            return run_layers(x, weights, biases, p.acts, p)  # checked: the Function, or inference
        return fnn_forward(x, weights, biases, p.acts)  # autocast casts first; bad arguments raise

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward while torch.compile traces: plain attribute reads (no cached plan)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FNN input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.sizes[0]:
            raise ValueError(
                f"FNN with sizes {self.sizes} expects inputs of width {self.sizes[0]} "
                f"(shape (..., {self.sizes[0]})), got shape {tuple(x.shape)}"
            )
        if any(must_call(layer) for layer in self.layers):
            return self._call_layers(x)
        weights = [layer.weight for layer in self.layers]
        biases = [layer.bias for layer in self.layers]
        mode = resolve_fusion(self.fusion, self.sizes, x.device)
        if (
            mode == "network"
            and backend(x.device) != "reference"
            and not autocast_for(x.device.type)
            and not _traced_transform((x, *weights, *biases))
        ):
            return fnn_network_forward(self, x)
        return fnn_forward(x, weights, biases, self.activations)

    def _call_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The layers called one by one (each a FusedLinear: its kernel, its hooks)."""
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        try:
            sizes = self.sizes
        except (TypeError, ValueError) as e:  # model.layers edited into no network: still printable
            return f"invalid ({e}), fusion={self.fusion!r}"
        return f"sizes={sizes}, fusion={self.fusion!r}"
