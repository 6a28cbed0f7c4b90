"""Bad inputs: a ValueError or TypeError that names what is wrong, raised before anything is
launched, with the inputs left as they were.

The `no_launch` fixture replaces every Triton kernel of the `kernels` package and the ops
module fnn.functional dispatches to with stand-ins that fail the test when used: an error
raised after a launch would show up as that failure instead of the expected exception.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from triton.runtime.jit import KernelInterface

import fnn
import fnn.functional
import kernels.linear_act
import kernels.network  # loaded before no_launch patches: it imports names from kernels.linear_act
from fnn import reference
from kernels.checks import as_activation, check_linear_args
from kernels.launch import CachedLauncher


class _Launched(AssertionError):
    pass


class _NoKernel:
    """Stands in for a kernel (kernel[grid](...)) or an ops module (ops.name(...))."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise _Launched(f"kernel {self.name} was launched before the argument error")

    def __getattr__(self, attr):
        raise _Launched(f"{self.name}.{attr} was called before the argument error")

    def __call__(self, *args, **kwargs):
        raise _Launched(f"{self.name} was called before the argument error")


@pytest.fixture
def no_launch(monkeypatch):
    """Every Triton kernel in the loaded kernels.* modules, the ops module fnn.functional picks
    and the reference's op functions now fail the test when reached."""
    patched = []
    for modname, module in list(sys.modules.items()):
        if modname == "kernels" or modname.startswith("kernels."):
            for name, obj in list(vars(module).items()):
                launch_fn = isinstance(getattr(obj, "state", None), CachedLauncher)  # kernels.launch
                if isinstance(obj, KernelInterface) or launch_fn:
                    monkeypatch.setattr(module, name, _NoKernel(f"{modname}.{name}"))
                    patched.append(name)
    assert "linear_act_fwd_kernel" in patched and "_fwd" in patched, patched
    monkeypatch.setattr(fnn.functional, "_ops", lambda t: _NoKernel("fnn.functional._ops(...)"))
    for name in ("linear_act_forward", "linear_act_backward_input", "linear_act_backward_weight"):
        monkeypatch.setattr(reference, name, _NoKernel(f"fnn.reference.{name}"))
    return patched


def _raises(fn, exc, *fragments, inputs=()):
    """fn() raises `exc` whose message contains every fragment; `inputs` are unchanged."""
    before = [t.detach().clone() for t in inputs]
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"message {message!r} does not name {fragment!r}"
    for t, b in zip(inputs, before, strict=True):
        assert t.shape == b.shape and torch.equal(t.detach(), b), "an input was modified"
    return message


def _t(*shape, dtype=torch.float32, device="cpu", grad=True):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(grad and t.is_floating_point())


# Every way into the single-layer op: each must check before it launches.
ENTRIES = {
    "linear_act": lambda x, w, b, act: fnn.linear_act(x, w, b, act),
    "Function.apply": lambda x, w, b, act: fnn.LinearActFunction.apply(x, w, b, act),
    "fnn_forward": lambda x, w, b, act: fnn.fnn_forward(x, [w], [b], [act]),
    "launcher": lambda x, w, b, act: kernels.linear_act.linear_act_forward(x, w, b, act),
}


def _entry_ids():
    return list(ENTRIES)


@pytest.mark.parametrize("entry", _entry_ids())
def test_in_features_mismatch(entry, device, no_launch):
    x, w, b = _t(4, 3, device=device), _t(5, 2, device=device), _t(5, device=device)
    _raises(lambda: ENTRIES[entry](x, w, b, "sigmoid"), ValueError, "(4, 3)", "(5, 2)", inputs=(x, w, b))


@pytest.mark.parametrize("entry", _entry_ids())
def test_bias_wrong_size(entry, device, no_launch):
    x, w, b = _t(4, 3, device=device), _t(5, 3, device=device), _t(4, device=device)
    _raises(lambda: ENTRIES[entry](x, w, b, "relu"), ValueError, "bias", "(4,)", "(5,)", inputs=(x, w, b))
    b2 = _t(5, 1, device=device)
    _raises(lambda: ENTRIES[entry](x, w, b2, "relu"), ValueError, "bias", "(5, 1)", inputs=(x, w, b2))


@pytest.mark.parametrize("entry", _entry_ids())
@pytest.mark.parametrize("wshape", [(5,), (2, 5, 3)], ids=["1d", "3d"])
def test_weight_not_2d(entry, wshape, device, no_launch):
    x, w = _t(4, 3, device=device), _t(*wshape, device=device)
    _raises(lambda: ENTRIES[entry](x, w, None, "tanh"), ValueError, "weight", str(wshape), inputs=(x, w))


@pytest.mark.parametrize("entry", _entry_ids())
def test_mixed_dtypes(entry, device, no_launch):
    x, w = _t(4, 3, device=device), _t(5, 3, dtype=torch.float64, device=device)
    _raises(
        lambda: ENTRIES[entry](x, w, None, "sigmoid"),
        TypeError,
        "torch.float32",
        "torch.float64",
        inputs=(x, w),
    )
    b = _t(5, dtype=torch.float16, device=device)
    w32 = _t(5, 3, device=device)
    _raises(
        lambda: ENTRIES[entry](x, w32, b, "sigmoid"), TypeError, "bias", "torch.float16", inputs=(x, w32, b)
    )


@pytest.mark.parametrize("entry", _entry_ids())
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_integer_tensors(entry, which, device, no_launch):
    tensors = {"x": _t(4, 3, device=device), "weight": _t(5, 3, device=device), "bias": _t(5, device=device)}
    tensors[which] = torch.arange(tensors[which].numel(), device=device).reshape(tensors[which].shape)
    x, w, b = tensors.values()
    _raises(lambda: ENTRIES[entry](x, w, b, "relu"), TypeError, which, "torch.int64", inputs=(x, w, b))


@pytest.mark.parametrize("entry", _entry_ids())
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_sparse_tensors(entry, which, device, no_launch):
    """fnn takes dense tensors: a sparse one is a TypeError naming it, on every backend (the
    reference's F.linear would take a sparse x, the kernels read strides and pointers)."""
    tensors = {"x": _t(4, 3, device=device), "weight": _t(5, 3, device=device), "bias": _t(5, device=device)}
    tensors[which] = tensors[which].detach().to_sparse()
    x, w, b = tensors.values()
    dense = [t for t in (x, w, b) if t.layout is torch.strided]
    _raises(lambda: ENTRIES[entry](x, w, b, "relu"), TypeError, which, "sparse", inputs=dense)


def test_sparse_inputs_of_the_modules_and_trainer(device, no_launch):
    xs = _t(5, 3, device=device, grad=False).to_sparse()
    ys = _t(5, 2, device=device, grad=False)
    x_ok, y_sparse = ys.new_ones(5, 3), ys.to_sparse()
    for fusion in ("layer", "network", "auto"):
        model = fnn.FNN([3, 4, 2], device=device, fusion=fusion)
        params = list(model.parameters())
        _raises(lambda m=model: m(xs), TypeError, "sparse", inputs=params)
        trainer = fnn.Trainer(model, loss="mse", lr=0.1)
        _raises(lambda t=trainer: t.step(xs, ys), TypeError, "x", "sparse", inputs=(ys, *params))
        _raises(lambda t=trainer: t.step(x_ok, y_sparse), TypeError, "y", "sparse", inputs=params)
    layer = fnn.FusedLinear(3, 4, device=device)
    _raises(lambda: layer(xs), TypeError, "sparse", inputs=list(layer.parameters()))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_sparse_parameters_of_a_later_layer(which, device, no_launch):
    """A sparse weight or bias after the first layer is refused, naming the layer, before any
    launch, through every network entry and an FNN under both fusions (before, the checks
    looked at layer 0's layouts only, and layer 1's launch failed inside Triton)."""
    x, w0 = _t(4, 3, device=device), _t(5, 3, device=device)
    w1, b1 = _t(2, 5, device=device, grad=False), _t(2, device=device, grad=False)
    dense = (x, w0)
    weights, biases = [w0, w1.to_sparse() if which == "weight" else w1], [None, b1]
    if which == "bias":
        biases[1] = b1.to_sparse()
    for entry in (fnn.fnn_forward, fnn.network.network_forward):
        call = lambda e=entry: e(x, weights, biases, ["relu", "tanh"])  # noqa: E731
        _raises(call, TypeError, "layer 1", which, "sparse", inputs=dense)
    for fusion in ("layer", "network"):
        model = fnn.FNN([3, 5, 2], device=device, fusion=fusion)
        sparse = getattr(model.layers[1], which).detach().to_sparse()
        setattr(model.layers[1], which, torch.nn.Parameter(sparse))
        _raises(lambda m=model: m(x), TypeError, "layer 1", which, "sparse", inputs=dense)


@pytest.mark.parametrize("entry", _entry_ids())
def test_unknown_activation(entry, device, no_launch):
    x, w = _t(4, 3, device=device), _t(5, 3, device=device)
    _raises(
        lambda: ENTRIES[entry](x, w, None, "mish"),
        ValueError,
        "'mish'",
        "identity",
        "relu",
        "sigmoid",
        "tanh",
        inputs=(x, w),
    )
    _raises(lambda: ENTRIES[entry](x, w, None, None), TypeError, "activation", "NoneType", inputs=(x, w))


@pytest.mark.parametrize("entry", _entry_ids())
def test_scalar_x(entry, device, no_launch):
    x, w = _t(device=device), _t(5, 1, device=device)
    _raises(lambda: ENTRIES[entry](x, w, None, "sigmoid"), ValueError, "x", "scalar", inputs=(x, w))


@pytest.mark.parametrize("entry", _entry_ids())
def test_non_tensor_inputs(entry, device, no_launch):
    x, w, b = _t(4, 3, device=device), _t(5, 3, device=device), _t(5, device=device)
    _raises(lambda: ENTRIES[entry]([[1.0, 2.0, 3.0]], w, b, "relu"), TypeError, "x", "list", inputs=(w, b))
    _raises(
        lambda: ENTRIES[entry](x, np.ones((5, 3), np.float32), b, "relu"),
        TypeError,
        "weight",
        "ndarray",
        inputs=(x, b),
    )
    _raises(lambda: ENTRIES[entry](x, w, 0.5, "relu"), TypeError, "bias", "float", inputs=(x, w))


def test_empty_weight_dimension(device, no_launch):
    x, w = _t(4, 0, device=device), _t(5, 0, device=device)
    _raises(lambda: fnn.linear_act(x, w, None, "sigmoid"), ValueError, "(5, 0)", inputs=(x, w))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_mixed_devices(which, no_launch):
    """A "meta" tensor stands in for a second device (no GPU needed)."""
    x, w, b = _t(4, 3), _t(5, 3), _t(5)
    if which == "weight":
        w = torch.empty((5, 3), device="meta")
    else:
        b = torch.empty((5,), device="meta")
    message = _raises(lambda: check_linear_args(x, w, b, "sigmoid"), ValueError, "cpu", "meta", which)
    assert "device" in message
    _raises(lambda: fnn.linear_act(x, w, b, "sigmoid"), ValueError, "cpu", "meta", inputs=(x,))
    _raises(lambda: fnn.fnn_forward(x, [w], [b], ["sigmoid"]), ValueError, "cpu", "meta", inputs=(x,))


# ---------------------------------------------------------------------------------------------
# Launchers of the backward kernels
# ---------------------------------------------------------------------------------------------


def test_launchers_refuse_empty_layers_integers_and_mismatched_h(device, no_launch):
    """The checked launchers, as the registered ops call them: an empty layer in the weight
    gradient (before, db came back unwritten), integer tensors (before, an error from inside
    Triton), negative widths in the network kernels (before, accepted: zeros) and an H of
    another dtype than x for the network backward (before, not checked)."""
    from fnn import network_ops

    kn = kernels.network

    ops = kernels.linear_act
    dy, y = _t(4, 5, device=device, grad=False), _t(4, 5, device=device, grad=False)
    x0 = _t(4, 0, device=device, grad=False)
    _raises(lambda: ops.linear_act_backward_weight(dy, y, x0, "sigmoid", True), ValueError, "K=0")
    xi = torch.ones(4, 3, dtype=torch.int32, device=device)
    wi = torch.ones(5, 3, dtype=torch.int32, device=device)
    _raises(lambda: ops.linear_act_backward_weight(dy, y, xi, "sigmoid", True), TypeError, "torch.int32")
    _raises(lambda: ops.linear_act_backward_input(dy, y, wi, "sigmoid"), TypeError, "torch.int32")
    sizes, biased = [3, 4, 2], [True, True]
    x = _t(6, 3, device=device, grad=False)
    model = fnn.FNN(sizes, device=device)
    meta = network_ops.meta(sizes, [as_activation("sigmoid")] * 2, biased, device)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    act_params = network_ops.activation_params([as_activation("sigmoid")] * 2, x.dtype, device)
    forward_int = lambda: kn.network_forward(x.int(), flat, meta, sizes, biased, True, act_params)  # noqa: E731
    _raises(forward_int, TypeError, "int32")
    bad = [3, -1, -4, -1, 2]
    _raises(lambda: kn.network_forward(x, flat, meta, bad, [True] * 4, True, act_params), ValueError, ">= 1")
    h = torch.zeros(1, 6, kn.padded_width(sizes), dtype=torch.float64, device=device)
    dy2, y2 = _t(6, 2, device=device, grad=False), _t(6, 2, device=device, grad=False)
    _raises(
        lambda: kn.network_backward(dy2, y2, h, x, flat, meta, sizes, biased, True, act_params),
        TypeError, "h is torch.float64",
    )  # fmt: skip


def test_backward_launcher_arguments(device, no_launch):
    ops = kernels.linear_act
    dy, y, w, x = (
        _t(4, 5, device=device),
        _t(4, 5, device=device),
        _t(5, 3, device=device),
        _t(4, 3, device=device),
    )
    inputs = (dy, y, w, x)
    _raises(
        lambda: ops.linear_act_backward_input(dy, _t(4, 6, device=device), w, "sigmoid"),
        ValueError,
        "y",
        "(4, 6)",
        "(4, 5)",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_input(dy, y, w, "sigmoid", x=None, prev_activation="relu"),
        ValueError,
        "prev_activation",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_input(
            dy, y, w, "sigmoid", x=_t(4, 2, device=device), prev_activation="relu"
        ),
        ValueError,
        "x",
        "(4, 2)",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_input(dy.double(), y, w, "sigmoid"),
        TypeError,
        "dy",
        "torch.float64",
        "torch.float32",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_input(dy, y, w, "sigmoid", prev_activation="swish"),
        ValueError,
        "'swish'",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_weight(dy, y, _t(4, 3, 1, device=device), "sigmoid", True),
        ValueError,
        "x",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_weight(_t(3, 5, device=device), y, x, "sigmoid", True),
        ValueError,
        "dy",
        "(3, 5)",
        "(4, 5)",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_weight(dy, y.half(), x, "sigmoid", True),
        TypeError,
        "y",
        "torch.float16",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_backward_weight(dy, y, x, "sigmoid", True, split=0),
        ValueError,
        "split",
        inputs=inputs,
    )
    _raises(
        lambda: ops.linear_act_forward(_t(2, 4, 3, device=device), w, None, "sigmoid"),
        ValueError,
        "2-D",
        "(2, 4, 3)",
        inputs=inputs,
    )


def test_edited_layers_give_errors_that_say_what_is_wrong(device, no_launch):
    """model.layers is a ModuleList users may edit. An nn.Linear among the layers is a
    TypeError naming it (before, AttributeError: no `activation`); an emptied list a ValueError
    (before, IndexError, from print(model) too, which now still prints); a layer whose width
    does not chain a ValueError naming both layers (before, the message named an empty batch
    of the right width as if it were the caller's x)."""
    x = _t(5, 3, device=device, grad=False)
    for fusion in ("layer", "network"):
        linear = fnn.FNN([3, 4, 2], fusion=fusion, device=device)
        linear.layers.append(torch.nn.Linear(2, 2, device=device))
        _raises(lambda m=linear: m(x), TypeError, "layers[2] is a Linear", "fnn.FusedLinear", inputs=(x,))
        wide = fnn.FNN([3, 4, 2], fusion=fusion, device=device)
        wide.layers.append(fnn.FusedLinear(5, 1, device=device))
        why = ("layer 2", "in_features=5", "layer 1 has out_features=2")
        _raises(lambda m=wide: m(x), ValueError, *why, inputs=(x,))
        empty = fnn.FNN([3, 4, 2], fusion=fusion, device=device)
        del empty.layers[:]
        _raises(lambda m=empty: m(x), ValueError, "model.layers is empty", inputs=(x,))
        assert "invalid" in repr(empty) and "empty" in repr(empty)
    weights = [_t(4, 3, device=device), _t(2, 5, device=device)]
    forward = lambda: fnn.fnn_forward(x, weights, [None, None], ["tanh"] * 2)  # noqa: E731
    _raises(forward, ValueError, "layer 1", "in_features=5", "layer 0 has out_features=4")


def _bad_op_calls():
    """(what, call) pairs: bad calls of every registered per-layer op (torch.ops.fnn.*)."""
    ops = torch.ops.fnn
    dy, y, w, x = _t(4, 5, grad=False), _t(4, 5, grad=False), _t(5, 3, grad=False), _t(4, 3, grad=False)
    wide = _t(80, 80, grad=False)
    xw, dyw = _t(4, 80, grad=False), _t(4, 80, grad=False)
    return {
        "forward, x 3-D": lambda: ops.linear_act_forward(_t(2, 4, 3, grad=False), w, None, "sigmoid"),
        "forward, x int32": lambda: ops.linear_act_forward(x.int(), w, None, "sigmoid"),
        "forward, bias shape": lambda: ops.linear_act_forward(x, w, _t(4, grad=False), "sigmoid"),
        "forward, unknown activation": lambda: ops.linear_act_forward(x, w, None, "swish"),
        "forward_z, weight dtype": lambda: ops.linear_act_forward_z(x, w.double(), None, "gelu"),
        "backward_input, y shape": lambda: ops.linear_act_backward_input(
            dy, _t(4, 6, grad=False), w, "sigmoid", None, "identity"
        ),
        "backward_input, prev without x": lambda: ops.linear_act_backward_input(
            dy, y, w, "sigmoid", None, "relu"
        ),
        "backward_input, weight int32": lambda: ops.linear_act_backward_input(
            dy, y, w.int(), "sigmoid", None, "identity"
        ),
        "backward_weight, K=0": lambda: ops.linear_act_backward_weight(
            dy, y, _t(4, 0, grad=False), "sigmoid", True, None
        ),
        "backward_weight, dy dtype": lambda: ops.linear_act_backward_weight(
            dy.double(), y, x, "sigmoid", True, None
        ),
        "backward_weight, split 0": lambda: ops.linear_act_backward_weight(dy, y, x, "sigmoid", True, 0),
        "backward_weight, rows 3 of 4": lambda: ops.linear_act_backward_weight(
            dy, y, x, "sigmoid", True, None, rows=3
        ),
        "backward, wider than the fused tile": lambda: ops.linear_act_backward(
            dyw, _t(4, 80, grad=False), wide, xw, "sigmoid", True
        ),
        "backward, x shape": lambda: ops.linear_act_backward(dy, y, w, _t(4, 2, grad=False), "sigmoid", True),
    }


def test_registered_ops_refuse_bad_calls_alike_on_every_backend(monkeypatch, no_launch):
    """A bad call of a registered op fails the same way (type and message) on the CPU reference
    backend as on the kernels' (the interpreter here), before the reference computes anything.
    Before, the reference ran unchecked: PyTorch's error, or a result of the wrong shape."""
    for name in ("linear_act_forward_z", "linear_act_backward"):
        monkeypatch.setattr(reference, name, _NoKernel(f"fnn.reference.{name}"))
    calls = _bad_op_calls()
    errors = {}
    for backend_env in ("1", None):
        if backend_env is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", backend_env)
        assert fnn.backend("cpu") == ("interpreter" if backend_env else "reference")
        for what, call in calls.items():
            with pytest.raises((ValueError, TypeError)) as info:
                call()
            errors.setdefault(what, []).append((type(info.value), str(info.value)))
    for what, (kernel_error, reference_error) in errors.items():
        assert kernel_error == reference_error, (what, kernel_error, reference_error)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[3], []], ids=["one", "none"])
def test_fnn_needs_two_sizes(sizes):
    _raises(lambda: fnn.FNN(sizes), ValueError, "two sizes", str(sizes))


def test_fnn_bad_sizes():
    _raises(lambda: fnn.FNN([3, 0, 1]), ValueError, "sizes[1]", "0")
    _raises(lambda: fnn.FNN([3, 2.5, 1]), TypeError, "sizes[1]", "float")


def test_fnn_activation_list_wrong_length():
    _raises(
        lambda: fnn.FNN([2, 3, 1], activation=["relu"]), ValueError, "[2, 3, 1]", "2 layers", "1 activations"
    )
    _raises(lambda: fnn.FNN([2, 3, 1], activation=["relu", "tanh", "sigmoid"]), ValueError, "3 activations")
    _raises(lambda: fnn.FNN([2, 3, 1], activation=["relu", "mish"]), ValueError, "'mish'", "tanh")


def test_fnn_input_checks(device, no_launch):
    model = fnn.FNN([3, 4, 2], device=device)
    params = [p for p in model.parameters()]
    x = _t(5, 4, device=device)
    _raises(lambda: model(x), ValueError, "(5, 4)", "width 3", inputs=(x, *params))
    x0 = _t(device=device)
    _raises(lambda: model(x0), ValueError, "()", inputs=(x0, *params))
    _raises(lambda: model([[1.0, 2.0, 3.0]]), TypeError, "list", inputs=params)
    x64 = _t(5, 3, dtype=torch.float64, device=device)
    _raises(lambda: model(x64), TypeError, "torch.float64", "torch.float32", inputs=(x64, *params))
    xi = torch.ones((5, 3), dtype=torch.int32, device=device)
    _raises(lambda: model(xi), TypeError, "torch.int32", inputs=(xi, *params))


def test_fnn_forward_layer_checks(device, no_launch):
    x = _t(6, 3, device=device)
    w0, w1, b1 = _t(4, 3, device=device), _t(2, 5, device=device), _t(2, device=device)
    inputs = (x, w0, w1, b1)
    _raises(
        lambda: fnn.fnn_forward(x, [w0, w1], [None, b1], ["relu", "tanh"]),
        ValueError,
        "layer 1",
        "(2, 5)",
        inputs=inputs,
    )
    _raises(
        lambda: fnn.fnn_forward(x, [w0], [None, b1], ["relu"]),
        ValueError,
        "1 weights",
        "2 biases",
        inputs=inputs,
    )
    _raises(lambda: fnn.fnn_forward(x, [], [], []), ValueError, "0 weights", inputs=inputs)
    w1_64 = _t(2, 4, dtype=torch.float64, device=device)
    _raises(
        lambda: fnn.fnn_forward(x, [w0, w1_64], [None, None], ["relu", "tanh"]),
        TypeError,
        "layer 1",
        "torch.float64",
        inputs=inputs,
    )


@pytest.mark.parametrize("args", [(0, 3), (3, 0), (-1, 3)], ids=["in0", "out0", "neg"])
def test_fused_linear_bad_features(args):
    name = "in_features" if args[0] < 1 else "out_features"
    _raises(lambda: fnn.FusedLinear(*args), ValueError, name, str(min(args)))


def test_fused_linear_bad_arguments(device, no_launch):
    _raises(lambda: fnn.FusedLinear(3.0, 2), TypeError, "in_features", "float")
    _raises(lambda: fnn.FusedLinear(3, 2, activation="hardswish"), ValueError, "'hardswish'", "sigmoid")
    layer = fnn.FusedLinear(3, 2, device=device)
    x = _t(4, 5, device=device)
    _raises(lambda: layer(x), ValueError, "(4, 5)", "in_features=3", inputs=(x, layer.weight, layer.bias))


def test_no_launch_fixture_catches_a_launch(device, no_launch):
    """The stand-ins do fail when a kernel is reached (valid inputs, so it launches)."""
    x, w = _t(4, 3, device=device), _t(5, 3, device=device)
    with pytest.raises(_Launched):
        kernels.linear_act.linear_act_forward(x, w, None, "sigmoid")
    with pytest.raises(_Launched):
        fnn.linear_act(x, w, None, "sigmoid")


def test_fnn_activation_of_the_wrong_type():
    message = "FNN activation must be a name, an fnn.Activation or a list of them, got int"
    with pytest.raises(TypeError, match=message):
        fnn.FNN([2, 3], activation=3)
