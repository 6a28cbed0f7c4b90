"""Activation helpers for the kernels, in pairs: `act(z)` and `delta(g, y)` = g * act'(z),
the derivative taken from the OUTPUT y = act(z), so the pre-activation is never stored.

ACTIVATION codes match kernels.checks.ACTIVATIONS: 0 identity, 1 sigmoid, 2 relu, 3 tanh.
NaN and inf follow PyTorch: relu(NaN) = NaN, sigmoid(+-inf) = 1 / 0, tanh(+-inf) = +-1.
Constants are integers on purpose: a Python float literal is rounded to float32 by triton,
which would cost float64 its precision.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(z):
    # exp of a non-positive number only: no overflow for large |z|.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1 / (1 + e), e / (1 + e))


@triton.jit
def sigmoid_grad(g, y):
    return g * (1 - y) * y


@triton.jit
def tanh(z):
    a = tl.abs(z)
    t = tl.exp(-2 * a)
    big = (1 - t) / (1 + t)
    # Below |z| = 0.03 the quotient above cancels; the Taylor series to z^9 is exact there
    # to well under a float64 ulp. Coefficients -1/3, 2/15, -17/315, 62/2835 over 2835.
    z2 = a * a
    small = a + a * z2 * ((-945 + z2 * (378 + z2 * (-153 + z2 * 62))) / 2835)
    r = tl.where(a < 0.03, small, big)
    return tl.where(z < 0, -r, r)


@triton.jit
def tanh_grad(g, y):
    return g * (1 - y * y)


@triton.jit
def relu(z):
    # `z < 0` is False for NaN, so NaN passes through as in torch.relu.
    return tl.where(z < 0, 0, z)


@triton.jit
def relu_grad(g, y):
    # torch's threshold_backward: zero where y <= 0, pass-through elsewhere (NaN included).
    return tl.where(y <= 0, 0, g)


@triton.jit
def apply_activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = sigmoid(z)
    elif ACTIVATION == 2:
        z = relu(z)
    elif ACTIVATION == 3:
        z = tanh(z)
    return z


@triton.jit
def apply_delta(g, y, ACTIVATION: tl.constexpr):
    """g * act'(z) from y = act(z); identity returns g untouched (y is then never read)."""
    if ACTIVATION == 1:
        g = sigmoid_grad(g, y)
    elif ACTIVATION == 2:
        g = relu_grad(g, y)
    elif ACTIVATION == 3:
        g = tanh_grad(g, y)
    return g
