"""fnn.fuse and FusedLinear.from_linear: existing nn.Linear + activation models become fused
ones with the same parameters, outputs, gradients and state_dict keys."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_fused_like_original
from torch import nn

import fnn


class _Block(nn.Module):
    """A custom module holding a Sequential, to check fuse looks inside any module."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.skip = nn.Linear(8, 8)  # outside any Sequential: left alone

    def forward(self, x):
        return self.mlp(x) + self.skip(x)


class _MyLinear(nn.Linear):
    """A subclass may change forward: fuse must not replace it."""


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True)),  # nested, in-place ReLU
        _Block(),
        nn.Linear(8, 8),  # followed by a Linear: not fused
        nn.Linear(8, 8, bias=False),
        nn.Sigmoid(),  # fused with the bias-free Linear before it
        _MyLinear(8, 8),
        nn.Tanh(),  # after a subclass: not fused
        nn.ReLU(),  # after an activation: not fused
        nn.Linear(8, 3),
        nn.Tanh(),  # the last pair of the Sequential: fused
    ).double()


def _fused_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, fnn.FusedLinear)]


def test_fuse_replaces_exactly_the_linear_activation_pairs():
    model = _model()
    assert fnn.fuse(model) is model, "fuse works in place and returns its argument"
    assert _fused_paths(model) == ["0.0", "1.mlp.0", "3", "8"]
    acts = {name: m.activation for name, m in model.named_modules() if isinstance(m, fnn.FusedLinear)}
    assert acts == {"0.0": "relu", "1.mlp.0": "tanh", "3": "sigmoid", "8": "tanh"}
    for name in ("0.1", "1.mlp.1", "4", "9"):
        assert type(model.get_submodule(name)) is nn.Identity, name
    assert type(model[2]) is nn.Linear and type(model[5]) is _MyLinear and type(model[1].skip) is nn.Linear
    assert type(model[6]) is nn.Tanh and type(model[7]) is nn.ReLU
    assert fnn.fuse(model) is model and _fused_paths(model) == ["0.0", "1.mlp.0", "3", "8"], "idempotent"


def test_fuse_leaves_what_it_cannot_express(device):
    """Pairs fuse would change stay as they are: a Linear whose weight a hook recomputes
    (torch.nn.utils.weight_norm, spectral_norm: before, fuse raised and left the model half
    converted), a Linear or activation with a hook of its own (a fused pair never calls
    them), an empty Linear. The rest of the model still fuses, and computes what it did."""
    torch.manual_seed(2)
    with pytest.warns(FutureWarning):  # weight_norm is deprecated, still used
        normed = nn.utils.weight_norm(nn.Linear(5, 6))
    hooked_linear, hooked_act = nn.Linear(6, 6), nn.Tanh()
    seen = []
    hooked_linear.register_forward_hook(lambda m, i, o: seen.append("linear"))
    hooked_act.register_forward_pre_hook(lambda m, i: seen.append("act"))
    model = nn.Sequential(
        nn.Linear(5, 5), nn.ReLU(),  # fused
        normed, nn.Tanh(),
        nn.utils.spectral_norm(nn.Linear(6, 6)), nn.Sigmoid(),
        hooked_linear, nn.ReLU(),
        nn.Linear(6, 6), hooked_act,
        nn.Linear(6, 0), nn.Tanh(),
        nn.Linear(0, 3), nn.Sigmoid(),
    ).double().to(device)  # fmt: skip
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    want = model(x)
    assert fnn.fuse(model) is model
    assert _fused_paths(model) == ["0"]
    kept = [type(m).__name__ for m in model][2:]
    assert kept == [
        "Linear", "Tanh", "Linear", "Sigmoid", "Linear", "ReLU",
        "Linear", "Tanh", "Linear", "Tanh", "Linear", "Sigmoid",
    ]  # fmt: skip
    seen.clear()
    assert_close(model(x), want, 1e-12, 1e-12, "partly fused model")
    assert seen == ["linear", "act"], seen


def test_fused_model_has_the_same_outputs_and_gradients(device):
    original = _model().to(device)
    fused = fnn.fuse(copy.deepcopy(original))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64).to(device)
    dy = torch.randn(4, 6, 3, generator=g, dtype=torch.float64).to(device)
    assert_fused_like_original(original, fused, x, dy, "fused")


def test_state_dict_keys_load_both_ways():
    original = _model()
    fused = fnn.fuse(_model())
    assert list(fused.state_dict()) == list(original.state_dict())
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)
    original.load_state_dict(fused.state_dict())  # strict: every key matches
    for (k, a), b in zip(original.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    fused.load_state_dict(_model().state_dict())


def test_fuse_shares_parameters_so_an_existing_optimizer_keeps_working():
    model = _model()
    linear = model[8]
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fnn.fuse(model)
    assert model[8].weight is linear.weight and model[8].bias is linear.bias
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    before = model[8].weight.detach().clone()
    model(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(model[8].weight, before), "the optimizer built before fuse updated nothing"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh", "identity"])
def test_from_linear(device, bias, activation):
    torch.manual_seed(2)
    linear = nn.Linear(6, 4, bias=bias, device=device, dtype=torch.float64).eval()
    fused = fnn.FusedLinear.from_linear(linear, activation)
    assert fused.weight is linear.weight and fused.bias is linear.bias
    assert (fused.in_features, fused.out_features, fused.activation) == (6, 4, activation)
    assert not fused.training, "from_linear keeps the training flag"
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "identity": lambda z: z}
    assert_close(fused(x), act[activation](linear(x)), rtol=1e-12, atol=1e-12, what="from_linear output")


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        fnn.FusedLinear.from_linear(nn.Conv1d(2, 2, 1), "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        fnn.FusedLinear.from_linear(nn.Linear(2, 2), "mish")
    with pytest.raises(TypeError, match="nn.Module"):
        fnn.fuse([nn.Linear(2, 2), nn.ReLU()])
