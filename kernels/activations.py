"""Activation helpers for the kernels, in pairs: `act(z, ...)` and its delta `act_grad(g, s, ...)`
= g * act'(z), where s is what the forward saved: the OUTPUT y = act(z) wherever the derivative
can be read off it (sigmoid, relu, tanh, leaky_relu, elu, softplus), else the pre-activation z
(gelu, gelu_tanh, silu, and elu/softplus for the parameter values of kernels.checks.Activation
.saves). Parameters (negative_slope, alpha, beta, threshold) are runtime values in the
accumulator's dtype, never constexprs.

ACTIVATION codes match kernels.checks: ACTIVATIONS, plus ELU_FROM_Z (10) and SOFTPLUS_FROM_Z (11).
NaN and inf follow PyTorch: relu(NaN) = NaN, sigmoid(+-inf) = 1 / 0, tanh(+-inf) = +-1, ...

Accuracy (float32 within about 2 ulps of the exact value over the whole range): no formula
here cancels (tanh from expm1, gelu from erfc, softplus from log1p, sigmoid and silu from
exp(-|z|)), and the transcendental primitives below are accurate ones:
- compiled, CUDA's libdevice (`__nv_expf`, `__nv_expm1f`, `__nv_log1pf`, `__nv_erfcf`,
  `__nv_erfcxf` and their float64 forms: the libm PyTorch's CUDA kernels call), and IEEE
  division (`div_rn`). Triton's own float32 `tl.exp` is `ex2.approx` of a rounded product and
  its `/` is `div.full`, both several ulps off for some arguments;
- in Triton's interpreter, numpy evaluated in float64 and rounded once: numpy's float32 exp
  and log are up to 2.4 and 3.3 ulps off, which would hide the errors of the formulas.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _probe():
    pass


# Whether @triton.jit produces interpreted functions here (TRITON_INTERPRET=1 at import).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def device_fn(fn):
    """@triton.jit for the helpers below; in the interpreter they stay plain Python functions,
    run inside the calling kernel: every interpreted jit call patches triton.language anew, a
    cost the many small helpers here would multiply."""
    return fn if INTERPRETED else triton.jit(fn)

# The constants below are written as literals where they are used, not as module-level
# constexprs: a global that a kernel reads is one that Triton checks on every launch (its
# used_global_vals; about 0.1 us each here, on every launch of every kernel that reaches
# these helpers). A literal is folded as the constexpr was, in the dtype of its operand:
#   0.7071067811865476   1/sqrt(2)
#   0.3989422804014327   1/sqrt(2 pi)
#   0.5641895835477563   1/sqrt(pi)
#   1.5957691216057308   2 sqrt(2/pi)              (gelu_tanh)
#   0.07135481627260025  2 sqrt(2/pi) * 0.044715   (gelu_tanh)

# ---------------------------------------------------------------------------------------------
# Primitives: exp, expm1, log1p, erfc, erfcx (= exp(x^2) erfc(x)), division and fma, accurate in both
# modes (see above).
# ---------------------------------------------------------------------------------------------

if INTERPRETED:

    @device_fn
    def exp(x):
        return tl.exp(x.to(tl.float64)).to(x.dtype)

    @device_fn
    def expm1(x):
        # Kahan's trick in float64: (u - 1) * x / log(u) cancels the rounding of u = exp(x).
        d = x.to(tl.float64)
        u = tl.exp(d)
        um1 = u - 1
        safe = tl.where((um1 == 0) | (u == float("inf")) | (um1 == -1), 2, u)
        r = tl.where(um1 == 0, d, (safe - 1) * d / tl.log(safe))
        r = tl.where(u == float("inf"), u, tl.where(um1 == -1, -1, r))
        return r.to(x.dtype)

    @device_fn
    def log1p(x):
        # log(u) * x / (u - 1) with u = 1 + x, likewise exact to float64 rounding.
        d = x.to(tl.float64)
        u = 1 + d
        safe = tl.where((u == 1) | (u == float("inf")) | (u <= 0), 2, u)
        r = tl.where(u == 1, d, tl.log(safe) * d / (safe - 1))
        r = tl.where((u == float("inf")) | (u <= 0), tl.log(u), r)
        return r.to(x.dtype)

    @device_fn
    def erfc(x):
        # 1 - erf(x) below x = 2 (erfc(2) = 0.005: float64 keeps 1e-14 of it); above, Laplace's
        # continued fraction exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))),
        # 40 terms: 5e-14 relative at x = 2, better beyond.
        d = x.to(tl.float64)
        c = tl.maximum(d, 2)
        t = c
        for n in tl.static_range(40, 0, -1):
            t = c + (n / 2) / t
        tail = tl.exp(-c * c) * 0.5641895835477563 / t
        r = tl.where(d < 2, 1 - tl.erf(d), tail)
        return r.to(x.dtype)

    @device_fn
    def erfcx(x):
        # exp(x^2) erfc(x): the continued fraction above without its exp factor from x = 2 on.
        d = x.to(tl.float64)
        c = tl.maximum(d, 2)
        t = c
        for n in tl.static_range(40, 0, -1):
            t = c + (n / 2) / t
        small = tl.where(d < 2, d, 0)
        r = tl.where(d < 2, tl.exp(small * small) * (1 - tl.erf(small)), 0.5641895835477563 / t)
        return r.to(x.dtype)

    @device_fn
    def div(a, b):
        return a / b  # numpy: IEEE division (b is a tensor in every call)

    @device_fn
    def fma(a, b, c):
        # a * b + c rounded once. triton 3.6's interpreter multiplies and then adds (two
        # roundings), which undoes the error terms the formulas below carry. For float32 and
        # narrower operands the float64 product is exact, so one float64 sum and the cast back
        # round as an fma does (up to a double rounding, under 2^-29 relative).
        if a.dtype == tl.float64:
            return tl.fma(a, b, c)  # triton 3.9's interpreter rounds once; 3.6's twice
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(a.dtype)

else:

    @device_fn
    def exp(x):
        return libdevice.exp(x)

    @device_fn
    def expm1(x):
        return libdevice.expm1(x)

    @device_fn
    def log1p(x):
        return libdevice.log1p(x)

    @device_fn
    def erfc(x):
        return libdevice.erfc(x)

    @device_fn
    def erfcx(x):
        return libdevice.erfcx(x)

    @device_fn
    def fma(a, b, c):
        return tl.fma(a, b, c)

    @device_fn
    def div(a, b):
        if b.dtype == tl.float32:
            # `/` is div.full.f32 (2 ulps); one correction with the exact residual (an fma) brings
            # it within 1 ulp. div_rn (IEEE) would call a slow-path subroutine, and its calls
            # spill registers around them. Where the first quotient is not finite (b = 0,
            # overflow) the correction gives NaN: the first quotient stands.
            q = a / b
            q2 = q + fma(-q, b, a) / b
            return tl.where(q2 == q2, q2, q)
        else:
            return a / b


@device_fn
def param(p, DTYPE: tl.constexpr):
    """A float64 kernel argument as a DTYPE scalar (the interpreter passes a Python float)."""
    return tl.full((), p, tl.float64).to(DTYPE)


@device_fn
def _sig_pair(z):
    """(sigmoid(z), sigmoid(-z)) = (s, 1 - s), each without cancellation: exp(-|z|) only."""
    e = exp(-tl.abs(z))
    r = div(1, 1 + e)
    q = div(e, 1 + e)
    pos = z >= 0
    return tl.where(pos, r, q), tl.where(pos, q, r)


# ---------------------------------------------------------------------------------------------
# Activations whose derivative is read off the output y
# ---------------------------------------------------------------------------------------------


@device_fn
def sigmoid(z):
    # exp of a non-positive number only: no overflow for large |z|.
    s, _ = _sig_pair(z)
    return s


@device_fn
def sigmoid_grad(g, y):
    return g * (1 - y) * y


@device_fn
def tanh(z):
    # Nothing cancels (the former (1 - e)/(1 + e) lost up to 30 float32 ulps just above its
    # Taylor switch at 0.03): below |z| = 0.55, tanh|z| = -t / (2 + t) with t = expm1(-2|z|);
    # above, 1 - 2e / (1 + e) with e = exp(-2|z|) <= 1/3, whose subtraction keeps >= 1/2.
    a = tl.abs(z)
    t = expm1(-2 * tl.where(a < 0.55, a, 0))
    e = exp(-2 * a)
    r = tl.where(a < 0.55, div(-t, 2 + t), 1 - div(2 * e, 1 + e))
    return tl.where(z < 0, -r, r)


@device_fn
def tanh_grad(g, y):
    # (1 - y)(1 + y) rather than 1 - y^2: exact 1 - y where y is near 1.
    return g * ((1 - y) * (1 + y))


@device_fn
def relu(z):
    # `z < 0` is False for NaN, so NaN passes through as in torch.relu.
    return tl.where(z < 0, 0, z)


@device_fn
def relu_grad(g, y):
    # torch's threshold_backward: zero where y <= 0, pass-through elsewhere (NaN included).
    return tl.where(y <= 0, 0, g)


@device_fn
def leaky_relu(z, slope):
    # torch: z > 0 ? z : z * slope (NaN takes the second branch and stays NaN).
    return tl.where(z > 0, z, z * slope)


@device_fn
def leaky_relu_grad(g, s, slope):
    # s = y when slope >= 0 (then y > 0 exactly where z > 0), s = z otherwise: same rule.
    return tl.where(s > 0, g, g * slope)


@device_fn
def elu(z, alpha):
    # torch: z <= 0 ? alpha * expm1(z) : z (NaN takes the second branch).
    return tl.where(z > 0, z, alpha * expm1(tl.where(z > 0, 0, z)))


@device_fn
def elu_grad(g, y, alpha):
    # From y, alpha >= 0 (y > 0 exactly where z > 0): y <= 0 ? g (y + alpha) : g, as torch's
    # elu_backward(is_result=True); NaN gives g, as torch's from the input does.
    return tl.where(y <= 0, g * (y + alpha), g)


@device_fn
def elu_grad_z(g, z, alpha):
    # From z (alpha < 0, where y no longer tells z's sign): z <= 0 ? g alpha exp(z) : g.
    return tl.where(z <= 0, g * (alpha * exp(tl.where(z > 0, 0, z))), g)


@device_fn
def _scaled(z, beta):
    """(t, r): t = z * beta rounded, r = z * beta - t exactly (0 where t is infinite)."""
    t = z * beta
    r = fma(z, beta, -t)
    return t, tl.where(tl.abs(t) < float("inf"), r, 0)


@device_fn
def softplus(z, beta, threshold):
    # torch: beta z > threshold ? z : log1p(exp(beta z)) / beta (the test on the rounded
    # product, as torch's), written max(t, 0) + log1p(exp(-|t|)) with t = beta z, which neither
    # overflows nor cancels; the product's rounding r is put back (exp(-|t + r|) ~ e (1 -+ r)).
    t, r = _scaled(z, beta)
    e = exp(-tl.abs(t))
    e = fma(e, tl.where(t >= 0, -r, r), e)
    sp = tl.maximum(t, 0) + (tl.where(t > 0, r, 0) + log1p(e))
    return tl.where(t > threshold, z, div(sp, beta))


@device_fn
def softplus_grad(g, y, beta, threshold):
    # From y: 1 where beta y > threshold (torch's linear region; see kernels.checks
    # .SOFTPLUS_Y_THRESHOLD for why that is exact), else sigmoid(beta z) = 1 - exp(-beta y),
    # computed as -expm1(-beta y) so that small y keep their precision.
    t = y * beta
    return tl.where(t > threshold, g, g * -expm1(-t))


@device_fn
def softplus_grad_z(g, z, beta, threshold):
    # From z (small thresholds): as torch's softplus_backward, 1 or sigmoid(beta z).
    t, r = _scaled(z, beta)
    s, sc = _sig_pair(t)
    s = fma(r * sc, s, s)  # sigmoid(t + r) ~ s + r s (1 - s)
    return tl.where(t > threshold, g, g * s)


# ---------------------------------------------------------------------------------------------
# Activations whose derivative needs z (the forward saves Z)
# ---------------------------------------------------------------------------------------------


@device_fn
def _exp_half_sq(z):
    """exp(-z^2 / 2), with z^2's rounding put back (z^2 = p + r exactly): a plain exp(-z*z/2)
    is off by about z^2/2 ulps."""
    p = z * z
    r = fma(z, z, -p)
    e = exp(-0.5 * p)
    return fma(e, -0.5 * tl.where(p < float("inf"), r, 0), e)


@device_fn
def gelu(z):
    # z Phi(z) = z/2 erfc(-z/sqrt 2): no 1 + erf cancellation for negative z. Below z = -1,
    # erfc(x) = exp(-x^2) erfcx(x) with exp(-x^2) = exp(-z^2/2) computed from z itself, not
    # from the rounded x (whose rounding costs erfc about 2x^2 ulps).
    tail = _exp_half_sq(z) * erfcx(-tl.where(z < -1, z, -1) * 0.7071067811865476)
    return 0.5 * z * tl.where(z < -1, tail, erfc(-z * 0.7071067811865476))


@device_fn
def gelu_grad(g, z):
    # Phi(z) + z phi(z); below z = -1, exp(-z^2/2) (erfcx(x)/2 + z/sqrt(2 pi)), as in gelu.
    e = _exp_half_sq(z)
    tail = e * (0.5 * erfcx(-tl.where(z < -1, z, -1) * 0.7071067811865476) + z * 0.3989422804014327)
    return g * tl.where(z < -1, tail, 0.5 * erfc(-z * 0.7071067811865476) + z * (e * 0.3989422804014327))


@device_fn
def gelu_tanh(z):
    # z/2 (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3): no cancellation.
    s, _ = _sig_pair(z * (1.5957691216057308 + 0.07135481627260025 * (z * z)))
    return z * s


@device_fn
def gelu_tanh_grad(g, z):
    # d/dz z sigmoid(2u) = s + z s (1 - s) 2u'(z), 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 z^2).
    # z^2 is capped at 1e30 in the last factor: there s (1 - s) is 0, and 0 * inf would be NaN
    # (z = +-inf still gives NaN, from z * 0, as torch's does).
    z2 = z * z
    s, sc = _sig_pair(z * (1.5957691216057308 + 0.07135481627260025 * z2))
    return g * (s + z * (s * sc) * (1.5957691216057308 + 3 * 0.07135481627260025 * tl.minimum(z2, 1e30)))


@device_fn
def silu(z):
    # z sigmoid(z) = z / (1 + exp(-z)): three roundings (z e / (1 + e) would take four). Below
    # z = -87, where exp(-z) nears float32's overflow, (z h) h with h = exp(z/2): exp(z) itself
    # would be subnormal there, and silu(z) is not yet.
    h = exp(0.5 * tl.where(z < -87, z, 0))
    return tl.where(z < -87, (z * h) * h, div(z, 1 + exp(-tl.where(z < -87, 0, z))))


@device_fn
def silu_grad(g, z):
    # sigmoid(z) (1 + z (1 - sigmoid(z))), with e = exp(-|z|) and q + ql = 1 + e exactly.
    # z >= 0: 1/(1 + e) (1 + z e/(1 + e)), a sum of positive terms.
    # z < 0: s b, s = e/(1 + e), b = 1 + z/(1 + e), which cancels towards the root z = -1.28:
    # both quotients are carried with their remainders (fma) and 1 + e's rounding ql, so that
    # e's rounding, b's and the last fma's are the only errors left.
    e = exp(-tl.abs(z))
    q = 1 + e
    ql = e - (q - 1)
    pos = div(1, q) * (1 + div(z * e, q))
    s0 = div(e, q)
    cs = div(fma(-s0, q, e) - s0 * ql, q)  # s = s0 + cs
    t = div(z, q)
    b = (1 + t) + div(fma(-t, q, z) - t * ql, q)  # 1 + t is exact wherever b cancels
    neg = fma(s0, b, cs * b)
    return g * tl.where(z >= 0, pos, neg)


# ---------------------------------------------------------------------------------------------
# Dispatch on the constexpr code
# ---------------------------------------------------------------------------------------------


@device_fn
def apply_activation(z, ACTIVATION: tl.constexpr, a, b):
    """act(z) for the code ACTIVATION with parameters a, b (in z's dtype; see Activation.args)."""
    if ACTIVATION == 1:
        z = sigmoid(z)
    elif ACTIVATION == 2:
        z = relu(z)
    elif ACTIVATION == 3:
        z = tanh(z)
    elif ACTIVATION == 4:
        z = leaky_relu(z, a)
    elif ACTIVATION == 5 or ACTIVATION == 10:
        z = elu(z, a)
    elif ACTIVATION == 6 or ACTIVATION == 11:
        z = softplus(z, a, b)
    elif ACTIVATION == 7:
        z = gelu(z)
    elif ACTIVATION == 8:
        z = gelu_tanh(z)
    elif ACTIVATION == 9:
        z = silu(z)
    return z


@device_fn
def apply_delta(g, s, ACTIVATION: tl.constexpr, a, b):
    """g * act'(z) from s, the saved tensor (y, or z for the codes that save Z); identity
    returns g untouched (s is then never read)."""
    if ACTIVATION == 1:
        g = sigmoid_grad(g, s)
    elif ACTIVATION == 2:
        g = relu_grad(g, s)
    elif ACTIVATION == 3:
        g = tanh_grad(g, s)
    elif ACTIVATION == 4:
        g = leaky_relu_grad(g, s, a)
    elif ACTIVATION == 5:
        g = elu_grad(g, s, a)
    elif ACTIVATION == 6:
        g = softplus_grad(g, s, a, b)
    elif ACTIVATION == 7:
        g = gelu_grad(g, s)
    elif ACTIVATION == 8:
        g = gelu_tanh_grad(g, s)
    elif ACTIVATION == 9:
        g = silu_grad(g, s)
    elif ACTIVATION == 10:
        g = elu_grad_z(g, s, a)
    elif ACTIVATION == 11:
        g = softplus_grad_z(g, s, a, b)
    return g
