"""Acceptance tests: the four seed documents (/work/shared/seeds), rerun through fnn.

Every number below that is not computed here is one a seed prints. Tolerances:
- a torch tensor printed to 4 decimals: half a unit of the last digit (atol 5e-5);
- a float32 printed by numpy (seed 002) or as a Python float (seed 001's cost): the text is
  the shortest decimal that reads back as PyTorch's float32 result, so it names that float32
  exactly. Our kernels round differently (another summation order; on CUDA, Triton's float32
  exp and division are the approximate instructions), so a network output may differ by
  `f32_ulps` float32 ulps: 2 in the interpreter, 4 compiled. A loss computed from those
  outputs gets the slack those ulps can cause, |dloss/doutput| * ulps (float64 autograd),
  plus one ulp of its own rounding.
Beside the printed numbers, each seed's own model or formulas run here as the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL, assert_close
from torch import nn

import fnn
from fnn.cli import seed000_model
from fnn.data import seed000_data

F64_EPS = torch.finfo(torch.float64).eps
PRINTED_4DP = 5e-5  # half a unit in the 4th decimal: what torch's tensor printing rounds to


def f32_ulp(t: torch.Tensor | float) -> torch.Tensor:
    """Elementwise float32 spacing at |t| (the gap to the next float32 above), in float64."""
    a = torch.as_tensor(t).detach().cpu().float().abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor | float, ulps: float, what: str) -> None:
    """|actual - expected| <= ulps float32 ulps of expected, elementwise."""
    e = torch.as_tensor(expected, dtype=torch.float32).double()
    a = actual.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    off = (a - e).abs() / f32_ulp(e)
    worst = int(off.flatten().argmax())
    assert off.max().item() <= ulps, (
        f"{what}: {off.flatten()[worst].item():.2f} float32 ulps off at flat index {worst}: "
        f"got {a.flatten()[worst].item()!r}, expected {e.flatten()[worst].item()!r} (allowed {ulps})"
    )


def loss_slack(loss_fn, outputs: torch.Tensor, target: torch.Tensor, ulps: float) -> float:
    """How far `ulps` float32 ulps in each output can move loss_fn(outputs, target), plus one
    ulp of the loss's own rounding: sum |dloss/doutput| * ulps * ulp(output) + ulp(loss)."""
    o = outputs.detach().cpu().double().requires_grad_()
    loss = loss_fn(o, target.detach().cpu().double())
    loss.backward()
    return ((o.grad.abs() * ulps * f32_ulp(outputs)).sum() + f32_ulp(loss)).item()


@pytest.fixture
def f32_ulps(device) -> int:
    """Float32 ulps a network output may differ from PyTorch's (see the module docstring)."""
    return 2 if device.type == "cpu" else 4


# ---------------------------------------------------------------------------------------------
# Seed 001: 2-3-2-1 network (ReLU, ReLU, sigmoid), fixed weights, BCE, one Adam step
# ---------------------------------------------------------------------------------------------

SEED001_X = [[1.0, 2.0], [3.0, 4.0]]
SEED001_Y = [[0.0], [1.0]]
SEED001_WEIGHTS = [
    [[-1.0, 2.0], [3.0, 0.5], [-0.1, -4.0]],
    [[0.5, 1.0, -2.0], [0.7, 0.1, 0.3]],
    [[0.5, -0.3]],
]
SEED001_BIASES = [[1.0, -2.0, 0.3], [-4.0, 5.0], [0.1]]
SEED001_A3 = [[0.0911], [0.7446]]
SEED001_COST = 0.19522885978221893
# The gradients the seed prints after cost.backward() (layers 1 and 2; layer 3's are cut off).
SEED001_GRADS = {
    "layers.0.weight": [[-0.0249, -0.0396], [-0.1814, -0.2428], [0.0, 0.0]],
    "layers.0.bias": [-0.0147, -0.0614, 0.0],
    "layers.1.weight": [[-0.3831, -0.5747, 0.0], [0.1752, 0.3175, 0.0]],
    "layers.1.bias": [-0.0639, 0.0246],
}


class Seed001Net(nn.Module):
    """The seed's NeuralNet: nn.Linear layers with F.relu, F.relu, F.sigmoid (prints dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2, 3)
        self.linear2 = nn.Linear(3, 2)
        self.linear3 = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = F.relu(self.linear1(x))
        a2 = F.relu(self.linear2(a1))
        return F.sigmoid(self.linear3(a2))


def seed001_models(device: torch.device) -> tuple[fnn.FNN, Seed001Net]:
    """fnn's network and the seed's, both holding the seed's fixed parameters."""
    ours = fnn.FNN([2, 3, 2, 1], activation=["relu", "relu", "sigmoid"], device=device)
    theirs = Seed001Net()
    with torch.no_grad():
        for layer, linear, w, b in zip(
            ours.layers,
            [theirs.linear1, theirs.linear2, theirs.linear3],
            SEED001_WEIGHTS,
            SEED001_BIASES,
            strict=True,
        ):
            for p in (layer.weight, linear.weight):
                p.copy_(torch.tensor(w))
            for p in (layer.bias, linear.bias):
                p.copy_(torch.tensor(b))
    return ours, theirs


def seed001_data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(SEED001_X, device=device), torch.tensor(SEED001_Y, device=device)


def test_seed001_forward_and_cost(device, f32_ulps):
    ours, theirs = seed001_models(device)
    x, y = seed001_data(device)
    a3 = ours(x)
    ref = theirs(x.cpu())
    assert a3.shape == (2, 1) and a3.dtype == torch.float32
    assert_close(a3, torch.tensor(SEED001_A3), rtol=0, atol=PRINTED_4DP, what="seed 001 A3 vs printed")
    assert_ulps(a3, ref, f32_ulps, "seed 001 A3 vs the seed's model")

    # The printed cost is PyTorch's float32 BCE of the seed's A3; ours is the same BCE of our
    # A3, so it may be off by what A3's ulps cause. "A couple of ulps" has to be counted on
    # A3, not on the cost: one ulp of A3[1] (0.7446) is 4 ulps of 0.195 and |dC/dA3[1]| is
    # 0.67, so it moves the cost by 2.7 of its ulps. (Measured in the interpreter: A3[1] one
    # ulp above PyTorch's, the cost 3 ulps above the printed value; the slack is 7 ulps.)
    cost = F.binary_cross_entropy(a3, y).item()
    slack = loss_slack(F.binary_cross_entropy, ref, y, f32_ulps)
    off = abs(cost - SEED001_COST)
    assert off <= slack, (
        f"seed 001 cost {cost!r} != printed {SEED001_COST!r}: off by {off:.3g} "
        f"({off / f32_ulp(SEED001_COST).item():.1f} float32 ulps), allowed {slack:.3g}"
    )


def test_seed001_relu_at_zero_has_zero_derivative(device):
    """Z2[0, 0] = 0.5*4 + 1*2 - 2*0 - 4 is exactly 0: relu'(0) must be 0, as in PyTorch.

    The first two layers alone, with a gradient of 1 pushed into A2[0, 0] only: nothing may
    reach any parameter (relu'(1) = 1 would give layer 2's weight row 0 the value A1[0])."""
    w1, w2 = (torch.tensor(w) for w in SEED001_WEIGHTS[:2])
    b1, b2 = (torch.tensor(b) for b in SEED001_BIASES[:2])
    x, _ = seed001_data(torch.device("cpu"))
    assert F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)[0, 0].item() == 0.0
    net = fnn.FNN([2, 3, 2], activation="relu", device=device)
    with torch.no_grad():
        for layer, w, b in zip(net.layers, (w1, w2), (b1, b2), strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    a2 = net(x.to(device))
    assert a2[0, 0].item() == 0.0
    a2[0, 0].backward()
    for name, p in net.named_parameters():
        assert torch.count_nonzero(p.grad).item() == 0, f"seed 001: relu'(0) != 0 leaks into {name}.grad"


def test_seed001_gradients(device):
    ours, theirs = seed001_models(device)
    x, y = seed001_data(device)
    F.binary_cross_entropy(ours(x), y).backward()
    F.binary_cross_entropy(theirs(x.cpu()), y.cpu()).backward()
    named_theirs = dict(zip([n for n, _ in ours.named_parameters()], theirs.parameters(), strict=True))
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"seed 001: no gradient for {name}"
        if name in SEED001_GRADS:
            expected = torch.tensor(SEED001_GRADS[name])
            assert_close(p.grad, expected, rtol=0, atol=PRINTED_4DP, what=f"seed 001 {name}.grad vs printed")
        # atol 0: the seed's exact zeros (dead ReLUs, relu'(0)) must be exact zeros here too.
        assert_close(
            p.grad,
            named_theirs[name].grad,
            rtol=RTOL[torch.float32],
            atol=0,
            what=f"seed 001 {name}.grad vs the seed's model",
        )
    assert set(SEED001_GRADS) <= set(named_theirs)


def test_seed001_adam_step(device):
    ours, theirs = seed001_models(device)
    x, y = seed001_data(device)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.01)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=0.01)
    for model, opt, xx, yy in ((ours, opt_ours, x, y), (theirs, opt_theirs, x.cpu(), y.cpu())):
        opt.zero_grad()
        F.binary_cross_entropy(model(xx), yy).backward()
        opt.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert_close(p, q, rtol=RTOL[torch.float32], atol=0, what=f"seed 001 {name} after one Adam step")
    # The step did something: Adam's first step moves every parameter with a nonzero
    # gradient by about lr = 0.01.
    w1 = torch.tensor(SEED001_WEIGHTS[0])
    moved = (ours.layers[0].weight.detach().cpu() - w1).abs()
    assert_close(moved[:2], torch.full((2, 2), 0.01), rtol=1e-3, atol=0, what="seed 001 Adam step size")
    assert torch.equal(moved[2], torch.zeros(2)), "seed 001: a dead neuron's weights moved"


# ---------------------------------------------------------------------------------------------
# Seed 002: 2-2-2 sigmoid network with biases (Mazur's example), one SGD step at lr 0.5
# ---------------------------------------------------------------------------------------------

SEED002_INPUT = [0.05, 0.10]
SEED002_TARGET = [0.01, 0.99]
SEED002_WEIGHTS = [[[0.15, 0.20], [0.25, 0.30]], [[0.40, 0.45], [0.50, 0.55]]]
SEED002_BIASES = [[0.35, 0.35], [0.60, 0.60]]
# numpy-printed float32 values (shortest round-trip decimals).
SEED002_HIDDEN = [0.59327, 0.59688437]
SEED002_OUTPUT = [0.75136507, 0.7729285]
SEED002_ERROR = 0.2983711
SEED002_UPDATED = {
    "layers.0.weight": [[0.14978072, 0.19956143], [0.24975115, 0.2995023]],
    "layers.0.bias": [0.3456143, 0.34502286],
    "layers.1.weight": [[0.3589165, 0.40866616], [0.5113013, 0.56137013]],
    "layers.1.bias": [0.53075075, 0.61904913],
}
SEED002_ERROR_AFTER = 0.28047147
# Approach 2 of the seed prints torch tensors (4 decimals) after the same step.
SEED002_HIDDEN_AFTER = [0.5922, 0.5957]
SEED002_OUTPUT_AFTER = [0.7284, 0.7784]


def seed002_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed's getMSE: 0.5 * sum((out - target)^2) (nn.MSELoss's mean, for 2 outputs)."""
    return (0.5 * (out - target) ** 2).sum()


def test_seed002_forward_sgd_step(device, f32_ulps):
    model = fnn.FNN([2, 2, 2], device=device)
    assert model.activations == ["sigmoid", "sigmoid"]
    with torch.no_grad():
        for layer, w, b in zip(model.layers, SEED002_WEIGHTS, SEED002_BIASES, strict=True):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    x = torch.tensor(SEED002_INPUT, device=device)  # 1-D: one sample, as the seed's approach 2
    target = torch.tensor(SEED002_TARGET, device=device)

    hidden = model.layers[0](x)
    out = model(x)
    assert out.shape == (2,) and hidden.shape == (2,)
    assert_ulps(hidden, SEED002_HIDDEN, f32_ulps, "seed 002 hidden layer")
    assert_ulps(out, SEED002_OUTPUT, f32_ulps, "seed 002 output layer")
    error = seed002_error(out, target)
    slack = loss_slack(seed002_error, torch.tensor(SEED002_OUTPUT), target, f32_ulps)
    assert abs(error.item() - SEED002_ERROR) <= slack, f"seed 002 error {error.item()!r} != {SEED002_ERROR}"

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    error.backward()
    opt.step()
    for name, p in model.named_parameters():
        # p - 0.5 * grad: the gradient's few ulps are far below an ulp of p.
        assert_ulps(p, torch.tensor(SEED002_UPDATED[name]), f32_ulps, f"seed 002 updated {name}")

    out = model(x)
    # The updated weights' own ulps reach the new outputs too: 2 more ulps for them.
    slack = loss_slack(seed002_error, out, target, f32_ulps + 2)
    for what, loss_fn in (("total error (approach 1)", seed002_error), ("MSELoss (approach 2)", F.mse_loss)):
        err = loss_fn(out, target).item()
        assert abs(err - SEED002_ERROR_AFTER) <= slack, (
            f"seed 002 {what} after the step: {err!r} != printed {SEED002_ERROR_AFTER}"
        )
    assert_close(
        model.layers[0](x),
        torch.tensor(SEED002_HIDDEN_AFTER),
        rtol=0,
        atol=PRINTED_4DP,
        what="seed 002 hidden layer after the step",
    )
    assert_close(
        out,
        torch.tensor(SEED002_OUTPUT_AFTER),
        rtol=0,
        atol=PRINTED_4DP,
        what="seed 002 output after the step",
    )


# ---------------------------------------------------------------------------------------------
# Seed 003: one neuron, chain rule as local x upstream derivatives, float64
# ---------------------------------------------------------------------------------------------


def test_seed003_single_neuron_float64(device):
    # The seed's tensors: w = tensor(2.), b = tensor(-2.) (float32 scalars), first_x = [1.001]
    # float64, first_y = tensor(1); w * x + b promotes to float64.
    w, b = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.tensor([1.001], dtype=torch.float64)
    y = torch.tensor(1)

    neuron = fnn.FusedLinear(1, 1, device=device, dtype=torch.float64)
    with torch.no_grad():
        neuron.weight.fill_(w.item())
        neuron.bias.fill_(b.item())
    y_hat = neuron(x.to(device))
    assert y_hat.shape == (1,) and y_hat.dtype == torch.float64
    assert_close(
        y_hat,
        torch.tensor([0.5005], dtype=torch.float64),
        rtol=0,
        atol=PRINTED_4DP,
        what="seed 003 y_hat vs printed",
    )
    # Same formula as torch.sigmoid (1 / (1 + exp(-z))) on an exactly computed z = 0.002:
    # bit-identical on the CPU; CUDA's exp comes from another library, so allow 2 ulps there.
    z = w * x + b  # the seed's linear_fn
    sig_tol = 0.0 if device.type == "cpu" else 2 * F64_EPS
    assert_close(y_hat, torch.sigmoid(z), rtol=sig_tol, atol=0, what="seed 003 y_hat vs torch.sigmoid")

    # The seed's J has dJ/dsigma = sum(2 * (y_hat - y)): J = sum((y_hat - y)^2).
    ((y_hat - y.to(device)) ** 2).sum().backward()
    dj_dw, dj_db = neuron.weight.grad.reshape(1), neuron.bias.grad
    assert_close(
        dj_dw,
        torch.tensor([-0.2500], dtype=torch.float64),
        rtol=0,
        atol=PRINTED_4DP,
        what="seed 003 dJ/dw vs printed",
    )
    assert_close(
        dj_db,
        torch.tensor([-0.2497], dtype=torch.float64),
        rtol=0,
        atol=PRINTED_4DP,
        what="seed 003 dJ/db vs printed",
    )

    # The seed's chain rule, its own functions, float64.
    y_hat_seed = torch.sigmoid(z)
    dj_dsig = torch.sum(2 * (y_hat_seed - y))  # delta_J_delta_sigma
    dsig_dz = torch.sigmoid(z) * (1 - torch.sigmoid(z))  # delta_sigma_delta
    dz_dw, dz_db = x, 1  # delta_z_delta_w, delta_z_delta_b
    dj_dz = dsig_dz * dj_dsig
    assert dj_dz.dtype == torch.float64
    assert_close(dj_dw, dz_dw * dj_dz, rtol=RTOL[torch.float64], atol=0, what="seed 003 dJ/dw vs chain rule")
    assert_close(dj_db, dz_db * dj_dz, rtol=RTOL[torch.float64], atol=0, what="seed 003 dJ/db vs chain rule")


# ---------------------------------------------------------------------------------------------
# Seed 000: 2-32-1 sigmoid network without bias, manual backprop, 101 epochs of SGD
# ---------------------------------------------------------------------------------------------

SEED000_EPOCHS = 101
SEED000_LR = 0.001
# The mean BCE the seeds README reports for today's PyTorch (torch.manual_seed(2) no longer
# draws the weights the seed printed 0.9228 with).
SEED000_BCE = {0: 1.6548656, 100: 0.7387635}


class Seed000Manual:
    """Seed 000's FNN class, transcribed: weights in x out, manual backprop, `w -= lr * grad`."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self.w1 = w1.clone()  # 2 x 32
        self.w2 = w2.clone()  # 32 x 1

    def sigmoid(self, s: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-s))

    def sigmoid_first_order_derivative(self, s: torch.Tensor) -> torch.Tensor:
        return s * (1 - s)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.y1 = torch.matmul(X, self.w1)
        self.y2 = self.sigmoid(self.y1)
        self.y3 = torch.matmul(self.y2, self.w2)
        return self.sigmoid(self.y3)

    def backward(self, X: torch.Tensor, l: torch.Tensor, y4: torch.Tensor) -> None:  # noqa: E741
        dC_dy4 = y4 - l
        y4_delta = dC_dy4 * self.sigmoid_first_order_derivative(y4)
        dC_dw2 = torch.matmul(torch.t(self.y2), y4_delta)
        y2_delta = torch.matmul(y4_delta, torch.t(self.w2)) * self.sigmoid_first_order_derivative(self.y2)
        dC_dw1 = torch.matmul(torch.t(X), y2_delta)
        self.w1 -= self.learning_rate * dC_dw1
        self.w2 -= self.learning_rate * dC_dw2

    def train(self, X: torch.Tensor, l: torch.Tensor) -> None:  # noqa: E741
        self.backward(X, l, self.forward(X))


@pytest.fixture(scope="module")
def seed000_runs(device):
    """Both trainings, once per module (101 epochs in the interpreter take ~10 s):
    (fnn's losses, fnn's model, the seed's losses, the seed's model)."""
    X, y = seed000_data()

    # The seed's loop, on the CPU as it was written.
    torch.manual_seed(2)
    manual = Seed000Manual(torch.randn(2, 32), torch.randn(32, 1), SEED000_LR)
    manual_losses = []
    for _ in range(SEED000_EPOCHS):
        y_hat = manual.forward(X)
        bce = -(y * torch.log(y_hat) + (1 - y) * torch.log(1 - y_hat))
        manual_losses.append(torch.mean(bce).item())
        manual.train(X, y)

    # fnn: autograd through the fused kernels, SGD on 0.5 * sum((y_hat - y)^2).
    model = seed000_model(2, device)
    xd, yd = X.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=SEED000_LR)
    losses = []
    for _ in range(SEED000_EPOCHS):
        y_hat = model(xd)
        losses.append(F.binary_cross_entropy(y_hat.detach(), yd).item())
        opt.zero_grad()
        (0.5 * ((y_hat - yd) ** 2).sum()).backward()
        opt.step()
    return losses, model, manual_losses, manual


def test_seed000_data_matches_sklearn():
    """fnn.data ships the seed's data: Iris, first two features, rows L2-normalised
    (sklearn's preprocessing.normalize), the rows of classes 0 and 1 (the first 100)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="seed 000 prepares its data with sklearn")
    preprocessing = pytest.importorskip("sklearn.preprocessing", reason="seed 000 uses sklearn")
    iris = datasets.load_iris()
    X = torch.tensor(preprocessing.normalize(iris.data[:, :2]), dtype=torch.float)
    y = torch.tensor(iris.target.reshape(-1, 1), dtype=torch.float)
    X = X[: y[y < 2].size()[0]]
    y = y[: y[y < 2].size()[0]]
    ours_x, ours_y = seed000_data()
    assert ours_x.dtype == X.dtype and ours_y.dtype == y.dtype
    assert torch.equal(ours_x, X), "seed000_data's X differs from the seed's preparation"
    assert torch.equal(ours_y, y), "seed000_data's y differs from the seed's preparation"


def test_seed000_initial_weights_are_the_seeds():
    model = seed000_model(2, torch.device("cpu"))
    torch.manual_seed(2)
    w1, w2 = torch.randn(2, 32), torch.randn(32, 1)
    assert [layer.bias for layer in model.layers] == [None, None]
    assert model.activations == ["sigmoid", "sigmoid"]
    assert torch.equal(model.layers[0].weight.detach(), w1.T)
    assert torch.equal(model.layers[1].weight.detach(), w2.T)


def test_seed000_training_matches_manual_backprop(seed000_runs):
    losses, model, manual_losses, manual = seed000_runs
    assert len(losses) == len(manual_losses) == SEED000_EPOCHS
    assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(manual_losses, dtype=torch.float64),
        rtol=RTOL[torch.float32],
        atol=0,
        what="seed 000 mean BCE per epoch, fnn vs manual",
    )
    assert_close(
        model.layers[0].weight,
        manual.w1.T,
        rtol=RTOL[torch.float32],
        atol=0,
        what="seed 000 w1 after 101 epochs",
    )
    assert_close(
        model.layers[1].weight,
        manual.w2.T,
        rtol=RTOL[torch.float32],
        atol=0,
        what="seed 000 w2 after 101 epochs",
    )
    # Training moved the weights (else the comparison above would be vacuous).
    torch.manual_seed(2)
    w1 = torch.randn(2, 32)
    assert (manual.w1 - w1).abs().max().item() > 1e-3


def test_seed000_reported_losses(seed000_runs):
    losses, _, manual_losses, _ = seed000_runs
    for epoch, expected in SEED000_BCE.items():
        for what, got in (("fnn", losses[epoch]), ("the seed's loop", manual_losses[epoch])):
            assert abs(got - expected) <= 1e-6 * expected, (
                f"seed 000 epoch {epoch} mean BCE from {what}: {got!r}, the README reports {expected}"
            )
    assert losses[100] < losses[0]
