"""What the compile check compiles: calls of fnn's real code paths, as the project makes them.

`calls()` lists them (labels are what `python -m bench.compile --only` filters on):
- `case:NAME` (and `case:NAME VARIANT`): every case of the benchmark registry (bench.cases) at
  full size, its inputs built by bench.problems (left uninitialised: nothing is computed) and
  fnn called exactly as the benchmark calls it (forward, forward+backward or a training step,
  under the case's matmul precision), and so is each of the case's other fnn variants
  (`fnn_layer`, `fnn_network`, `fnn_tf32x3`);
- `seed:NNN ...`: the seeds' networks and shapes, as tests/test_seeds.py runs them;
- `grid:...`: a grid over dtype (float32 under "highest" and "high", float16, bfloat16,
  float64) x activation (every name in kernels.checks.ACTIVATIONS) x bias x odd shapes for
  fnn.linear_act, forward and backward (every gradient); FNN at padded widths 16..128 under
  both fusions; the Trainer on the network path with every loss, with and without momentum,
  with batches that fit one program and batches that take the second (reduce) launch, for
  two activation sets (the network kernels are compiled per set of activation codes):
  sigmoid alone, and the heavy and Z-saving codes; per-sample gradients (torch.func.vmap
  of grad) of an FNN in every dtype class.
  The grid is an all-pairs design (`all_pairs`): every pair of values of any two of its
  dimensions occurs in some call (dtype x shape and dtype x width in full; float16 and
  bfloat16 share one dtype class, see DTYPE_CLASSES), not the full product, which would
  mostly repeat the same kernels at many times the compile time.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .compilecheck import Call

# (label, torch dtype, float32 matmul precision)
DTYPES: tuple[tuple[str, torch.dtype, str], ...] = (
    ("fp32", torch.float32, "highest"),
    ("tf32", torch.float32, "high"),
    ("fp16", torch.float16, "highest"),
    ("bf16", torch.bfloat16, "highest"),
    ("fp64", torch.float64, "highest"),
)
# The grid pairs dtype classes with the other dimensions: float16 and bfloat16 make the same
# tiles and the same MMA shapes, so the class "half" takes them in turn (each still meets every
# other dimension, only not every shape or width).
DTYPE_CLASSES: tuple[tuple[str, ...], ...] = (("fp32",), ("tf32",), ("fp16", "bf16"), ("fp64",))
# (M, K, N): X (M, K), W (N, K)
ODD_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1),
    (3, 7, 256),
    (37, 19, 23),
    (123, 431, 17),
    (100, 2, 32),
)
# Networks by padded width P: sizes with odd and aligned input/output widths.
NETWORKS: dict[int, list[int]] = {
    16: [5, 16, 3],
    32: [32, 20, 32, 7],
    64: [33, 64, 50, 16],
    128: [128, 100, 128, 1],
}
# Width classes of the network grid: the small widths (cheap kernels, few registers) take turns.
WIDTH_CLASSES: tuple[tuple[int, ...], ...] = ((16, 32), (64,), (128,))
LOSSES = ("bce", "mse", "sse")
NETWORK_ROWS_MANY = 1024  # more rows than one program takes: the backward's second launch
# Activation sets of the network grid (the network kernels are compiled per set of activation
# codes): sigmoid alone, and the heavy and Z-saving codes (gelu, ELU_FROM_Z, silu,
# SOFTPLUS_FROM_Z), a different one per layer.
NETWORK_ACTS = ("sigmoid", "heavy")


def all_pairs(dims: dict[str, Sequence[Any]], full: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A small list of combinations in which every pair of values of any two dimensions
    occurs at least once. The dimensions named in `full` are taken in full product first,
    each such row completed with the other dimensions' values that cover the most pairs not
    yet covered; then, while pairs remain, the combination (in product order) that covers
    the most of them is added. Greedy and deterministic."""
    names = list(dims)
    idx = [list(range(len(dims[n]))) for n in names]
    combos = list(itertools.combinations(range(len(names)), 2))
    todo = {(a, va, b, vb) for a, b in combos for va in idx[a] for vb in idx[b]}

    def gain(c: tuple[int, ...]) -> int:
        return sum((a, c[a], b, c[b]) in todo for a, b in combos)

    fixed = [names.index(n) for n in full]
    rows: list[tuple[int, ...]] = []
    for base in itertools.product(*(idx[i] for i in fixed)) if fixed else []:
        options = [
            c for c in itertools.product(*idx) if all(c[i] == v for i, v in zip(fixed, base, strict=True))
        ]
        rows.append(max(options, key=gain))  # max keeps the first of equal gains
        todo -= {(a, rows[-1][a], b, rows[-1][b]) for a, b in combos}
    candidates = list(itertools.product(*idx))
    while todo:
        best = max(candidates, key=gain)
        rows.append(best)
        todo -= {(a, best[a], b, best[b]) for a, b in combos}
    return [{n: dims[n][i] for n, i in zip(names, row, strict=True)} for row in rows]


def _expand_classes(rows: list[dict[str, Any]], key: str = "dtype") -> list[dict[str, Any]]:
    """Rows whose `key` is a class (a tuple), each class's members taken in turn; a dtype
    class member becomes its DTYPES entry."""
    by_tag = {d[0]: d for d in DTYPES}
    seen: dict[tuple[Any, ...], int] = {}
    for r in rows:
        cls = r[key]
        member = cls[seen.get(cls, 0) % len(cls)]
        r[key] = by_tag.get(member, member) if key == "dtype" else member
        seen[cls] = seen.get(cls, 0) + 1
    return rows


def _empty(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).requires_grad_(grad)


def _backward(y: torch.Tensor, gradient: str = "dense") -> None:
    """A dense incoming gradient (as a loss gives), or y.sum()'s stride-0 one."""
    if gradient == "sum":
        y.sum().backward()
    else:
        y.backward(torch.empty_like(y))


# ---------------------------------------------------------------------------------------------
# The benchmark registry
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _uninitialised_inputs() -> Iterator[None]:
    """bench.problems draws random inputs; here the same tensors (shape, dtype, layout) are
    left uninitialised, so a full-size case costs no time or memory."""
    from . import problems

    randn, rand = problems._randn, problems._rand
    problems._randn = lambda shape, gen, device, dtype, scale=1.0: torch.empty(
        shape, dtype=dtype, device=device
    )
    problems._rand = lambda shape, gen, device, dtype: torch.empty(shape, dtype=dtype, device=device)
    try:
        yield
    finally:
        problems._randn, problems._rand = randn, rand


def _registry_call(name: str, variant: str) -> Callable[[], object]:
    def run() -> object:
        from .cases import CASES
        from .problems import build

        case = CASES[name]
        with _uninitialised_inputs():
            problem = build(case, torch.device("cpu"), {"backend": "eager"}, l2_bytes=0, max_sets=1)
        return problem.run(variant)

    return run


# fnn variants of the registry the check does not run as cases, and why.
NOT_RUN = {
    "fnn_cublas_bwd": "its products are torch.mm, which would compute here on the CPU at full size; "
    "its Triton kernels are fnn's forward (case:NAME) and grid:delta_and_bias_grad",
}


def registry_calls() -> list[Call]:
    from .cases import CASES

    out = []
    for c in CASES.values():
        for v in c.fnn_variants:
            if v in NOT_RUN:
                continue
            label = f"case:{c.name}" if v == "fnn" else f"case:{c.name} {v}"
            out.append(Call(label, _registry_call(c.name, v), c.matmul_precision))
    return out


# ---------------------------------------------------------------------------------------------
# The seeds (tests/test_seeds.py)
# ---------------------------------------------------------------------------------------------


def seed_calls() -> list[Call]:
    import fnn

    def seed000(fusion: str, trainer: bool) -> None:
        from fnn.cli import seed000_model
        from fnn.data import seed000_data

        model = seed000_model(2, torch.device("cpu"))
        model.fusion = fusion
        x, y = seed000_data()
        if trainer:
            fnn.Trainer(model, loss="sse", lr=1e-3).step(x, y)
        else:
            (0.5 * ((model(x) - y) ** 2).sum()).backward()

    def seed001(fusion: str) -> None:
        model = fnn.FNN([2, 3, 2, 1], activation=["relu", "relu", "sigmoid"], fusion=fusion)
        _backward(model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])))  # BCE's gradient is dense

    def seed002(fusion: str) -> None:
        model = fnn.FNN([2, 2, 2], fusion=fusion)
        out = model(torch.tensor([0.05, 0.10]))  # 1-D: one sample
        (0.5 * ((out - torch.tensor([0.01, 0.99])) ** 2).sum()).backward()

    def seed003() -> None:
        neuron = fnn.FusedLinear(1, 1, dtype=torch.float64)
        y_hat = neuron(torch.tensor([1.001], dtype=torch.float64))
        ((y_hat - 1) ** 2).sum().backward()

    out = []
    for fusion in ("layer", "network"):
        out += [
            Call(f"seed:000 fwbw {fusion}", lambda f=fusion: seed000(f, False)),
            Call(f"seed:000 trainer sse {fusion}", lambda f=fusion: seed000(f, True)),
            Call(f"seed:001 fwbw {fusion}", lambda f=fusion: seed001(f)),
            Call(f"seed:002 fwbw 1-D {fusion}", lambda f=fusion: seed002(f)),
        ]
    out.append(Call("seed:003 FusedLinear(1,1) fp64 fwbw 1-D", seed003))
    return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _activations() -> list[str]:
    from kernels.checks import ACTIVATIONS

    return list(ACTIVATIONS)


def linear_grid_calls() -> list[Call]:
    """fnn.linear_act forward and backward (dX, dW, db): all pairs of dtype x activation x
    bias x shape x incoming-gradient layout."""
    import fnn

    def run(dtype: torch.dtype, act: str, bias: bool, shape: tuple[int, int, int], gradient: str) -> None:
        m, k, n = shape
        x, w = _empty(m, k, dtype=dtype, grad=True), _empty(n, k, dtype=dtype, grad=True)
        b = _empty(n, dtype=dtype, grad=True) if bias else None
        _backward(fnn.linear_act(x, w, b, act), gradient)

    rows = _expand_classes(
        all_pairs(
            {
                "dtype": DTYPE_CLASSES,
                "shape": ODD_SHAPES,
                "activation": _activations(),
                "bias": (True, False),
                "gradient": ("dense", "sum"),
            },
            full=("dtype", "shape"),
        )
    )
    out = []
    for r in rows:
        (tag, dtype, precision), (m, k, n) = r["dtype"], r["shape"]
        label = (
            f"grid:linear_act {tag} {r['activation']} {'bias' if r['bias'] else 'nobias'} "
            f"{m}x{k}x{n} {r['gradient']}"
        )
        args = (dtype, r["activation"], r["bias"], r["shape"], r["gradient"])
        out.append(Call(label, lambda a=args: run(*a), precision))
    return out


def delta_sum_calls() -> list[Call]:
    """kernels.linear_act.delta_and_bias_grad (the bench's fnn_cublas_bwd: D in the layer's
    dtype and db's partials in one pass) in every dtype, with and without db, at
    fwbw_large_bf16's (M, N) and an odd one, for the activations that save Y, Z and nothing."""
    from kernels.linear_act import delta_and_bias_grad

    out = []
    for (tag, dtype, precision), act, bias, (m, n) in zip(
        DTYPES,
        ("sigmoid", "gelu", "relu", "tanh", "identity"),
        (True, False, True, True, False),
        ((8192, 4096), (37, 23), (8192, 4096), (123, 17), (100, 32)),
        strict=True,
    ):

        def run(dtype=dtype, act=act, bias=bias, m=m, n=n) -> None:
            delta_and_bias_grad(_empty(m, n, dtype=dtype), _empty(m, n, dtype=dtype), act, bias)

        label = f"grid:delta_and_bias_grad {tag} {act} {'bias' if bias else 'nobias'} {m}x{n}"
        out.append(Call(label, run, precision))
    return out


def _network(
    p: int, dtype: torch.dtype, bias: bool, fusion: str, acts: Sequence[str] | str | None = None
) -> Any:
    import fnn

    sizes = NETWORKS[p]
    if acts == "heavy":
        heavy = [fnn.Activation("gelu"), fnn.Activation("elu", alpha=-1.0), fnn.Activation("silu"),
                 fnn.Activation("softplus", threshold=1.0)]  # fmt: skip
        activation = [heavy[i % len(heavy)] for i in range(len(sizes) - 1)]
    else:
        activation = list(acts) if acts is not None else "sigmoid"
    return fnn.FNN(sizes, activation=activation, bias=bias, fusion=fusion, dtype=dtype)


def _network_rows(p: int, dtype: torch.dtype, batch: str) -> int:
    """Rows for a batch that fits one program of the network backward (the most it takes:
    one launch), or that takes several (two launches, the second the reduce kernel). Both
    are multiples of 16, so that the forward of either is the same specialization."""
    if batch == "many":
        return NETWORK_ROWS_MANY
    from kernels.network import SINGLE_PROGRAM_ROWS

    return SINGLE_PROGRAM_ROWS


def network_grid_calls() -> list[Call]:
    """FNN(fusion="network") and fnn.Trainer on the network path, for every dtype class x
    width class (64, 128, and 16 or 32 in turn): each row runs an inference forward
    (no_grad), a forward+backward, and one Trainer step, its flags (bias, input gradient,
    loss, momentum, batch of one program or several) chosen so that every pair of values of
    any two dimensions occurs in some row."""
    import fnn

    def run(
        p: int, dtype: torch.dtype, bias: bool, dx: bool, loss: str, momentum: float, batch: str, acts: str
    ) -> None:
        rows, (n_in, n_out) = _network_rows(p, dtype, batch), (NETWORKS[p][0], NETWORKS[p][-1])
        model = _network(p, dtype, bias, "network", None if acts == "sigmoid" else acts)
        with torch.no_grad():
            model(_empty(rows, n_in, dtype=dtype))
        _backward(model(_empty(rows, n_in, dtype=dtype, grad=dx)))
        if loss == "bce" and acts != "sigmoid":  # the fused bce step wants a sigmoid output layer
            model.layers[-1].activation = "sigmoid"
        target = torch.full((rows, n_out), 0.5, dtype=dtype)
        fnn.Trainer(model, loss=loss, lr=1e-3, momentum=momentum).step(
            _empty(rows, n_in, dtype=dtype), target
        )

    rows = _expand_classes(
        _expand_classes(
            all_pairs(
                {
                    "dtype": DTYPE_CLASSES,
                    "P": WIDTH_CLASSES,
                    "loss": LOSSES,
                    "bias": (True, False),
                    "dx": (True, False),
                    "momentum": (0.0, 0.9),
                    "batch": ("one", "many"),
                    "acts": NETWORK_ACTS,
                },
                full=("dtype", "P"),
            )
        ),
        "P",
    )
    out = []
    for r in rows:
        tag, dtype, precision = r["dtype"]
        label = (
            f"grid:network {tag} P={r['P']} {'bias' if r['bias'] else 'nobias'} "
            f"{'dx' if r['dx'] else 'nodx'} {r['batch']}-program, trainer {r['loss']} "
            f"momentum={r['momentum']:g} {r['acts']}"
        )
        args = (r["P"], dtype, r["bias"], r["dx"], r["loss"], r["momentum"], r["batch"], r["acts"])
        out.append(Call(label, lambda a=args: run(*a), precision))
    return out


def layer_grid_calls() -> list[Call]:
    """FNN(fusion="layer"), forward+backward of two layers (the parameters' gradients, as in
    training): every dtype class and every width once, mixed activations (the backward
    chains act'_prev in the second layer's input-gradient kernel). bfloat16 stands for the
    half class here: the NOTES cases run float16 networks on this path."""
    acts = _activations()
    widths = list(NETWORKS)
    by_tag = {d[0]: d for d in DTYPES}
    out = []
    for i, (tag, dtype, precision) in enumerate(by_tag[c[-1]] for c in DTYPE_CLASSES):
        p = widths[i % len(widths)]
        sizes = [NETWORKS[p][0], p, NETWORKS[p][-1]]
        layer_acts = [acts[(i + j) % len(acts)] for j in range(2)]
        bias = i % 2 == 0

        def run(sizes=sizes, dtype=dtype, layer_acts=layer_acts, bias=bias) -> None:
            import fnn

            model = fnn.FNN(sizes, activation=layer_acts, bias=bias, fusion="layer", dtype=dtype)
            _backward(model(_empty(NETWORK_ROWS_MANY, sizes[0], dtype=dtype)))

        label = f"grid:fnn layer {tag} {'-'.join(map(str, sizes))} {'/'.join(layer_acts)} fwbw"
        out.append(Call(label, run, precision))
    return out


def per_sample_calls() -> list[Call]:
    """torch.func.vmap(grad) of an FNN's loss over shared parameters (per-sample gradients),
    whose weight gradients are the kernels' row slices (`rows`), with samples of one row (a
    slice of 1 row, which Triton specializes) and of 3: every dtype class, a width the fused
    backward serves and one it does not."""
    import fnn

    by_tag = {d[0]: d for d in DTYPES}
    out = []
    for i, (tag, dtype, precision) in enumerate(by_tag[c[-1]] for c in DTYPE_CLASSES):
        for p, rows in ((16, 1), (64 if dtype is torch.float64 else 128, 3)):
            sizes = [NETWORKS[p][0], p, NETWORKS[p][-1]]
            acts = ["tanh", "gelu"] if i % 2 else ["relu", "sigmoid"]

            def run(sizes=sizes, dtype=dtype, acts=acts, rows=rows) -> None:
                model = fnn.FNN(sizes, activation=acts, dtype=dtype)
                params = {k: v.detach() for k, v in model.named_parameters()}

                def loss(params, x):
                    return torch.func.functional_call(model, params, (x,)).sum()

                x = _empty(NETWORK_ROWS_MANY // rows, rows, sizes[0], dtype=dtype)
                torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

            shape = "-".join(map(str, sizes))
            label = f"grid:per-sample grads {tag} {shape} {'/'.join(acts)} {rows}-row samples"
            out.append(Call(label, run, precision))
    return out


def calls(only: Sequence[str] = ()) -> list[Call]:
    """Every call of the coverage, or those whose label contains one of `only`."""
    everything = (
        registry_calls()
        + delta_sum_calls()
        + seed_calls()
        + linear_grid_calls()
        + network_grid_calls()
        + layer_grid_calls()
        + per_sample_calls()
    )
    if only:
        everything = [c for c in everything if any(s in c.label for s in only)]
    return everything
