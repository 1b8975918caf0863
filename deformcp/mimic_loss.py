"""Deformable ConvNets v2's feature-mimicking loss, forward and backward.

Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168, section 3.3: the features an R-CNN head computes on each RoI of the
deformable network are pulled towards those of the same RoI cropped from the image, by
``L = Σ_b [1 − cos(f_a(b), f_b(b))]`` over the RoIs b. Kernels: kernels/mimic_loss.cu.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _dispatch, _kernels, _validate, testing

FAMILY = "mimic_loss"
LAYOUT = "(K, D)"


class MimicLossGrads(NamedTuple):
    """Gradients of :func:`mimic_loss`; a field is None where it was not asked for."""

    f_a: Optional[object]
    f_b: Optional[object]


def _check(f_a, f_b) -> None:
    _validate.floating("f_a", f_a, 2, LAYOUT)
    _validate.floating("f_b", f_b, 2, LAYOUT)
    _validate.shape("f_b", f_b, tuple(f_a.shape), f"{LAYOUT}, f_a's shape")
    _validate.same_dtype(f_a=f_a, f_b=f_b)


def _output_shape(f_a, f_b) -> tuple:
    """The shape of mimic_loss's output, (), raising its argument errors."""
    call = _dispatch.prepare(f_a=f_a, f_b=f_b)
    _check(*call.arrays)
    return ()


# ----------------------------------------------------------------------------------------- NumPy path

class _Rows(NamedTuple):
    """Per-row quantities of the NumPy path (the kernels' mimic_row), all in the compute dtype."""

    zero: np.ndarray       # (K,) bool: either feature all zeros
    z: np.ndarray          # (K,) 0, or NaN where a feature has a NaN or ±inf entry
    sa: np.ndarray         # (K,) power-of-two scales
    sb: np.ndarray
    a: np.ndarray          # (K, D) scaled features
    b: np.ndarray
    aa: np.ndarray         # (K,) |a'|², |b'|², sqrt(|a'|²·|b'|²), cos (1 where zero, to divide safely)
    bb: np.ndarray
    n: np.ndarray
    cos: np.ndarray        # (K,) 0 where zero


def _scale(m: np.ndarray) -> np.ndarray:
    """2^-e with m = f·2^e, f in [0.5, 1), e clamped so that the scale is a normal number."""
    limit = 1022 if m.dtype == np.float64 else 126
    exponent = np.frexp(m)[1].astype(np.int32)
    return np.ldexp(np.ones_like(m), np.clip(-exponent, -limit, limit))


@np.errstate(all="ignore")  # NaN and ±inf entries are valid input: they give NaN
def _rows(f_a, f_b) -> _Rows:
    dtype = _kernels.compute_dtype(f_a.dtype)
    a, b = f_a.astype(dtype), f_b.astype(dtype)
    ma = np.max(np.abs(a), axis=1, initial=0)  # keeps NaN, like the kernels' row max
    mb = np.max(np.abs(b), axis=1, initial=0)
    zero = (ma == 0) | (mb == 0)
    z = (ma + mb) * dtype.type(0)
    sa, sb = _scale(ma), _scale(mb)
    a *= sa[:, None]
    b *= sb[:, None]
    dot, aa, bb = (np.einsum("kd,kd->k", x, y) for x, y in ((a, b), (a, a), (b, b)))
    n = np.sqrt(aa * bb)
    one = dtype.type(1)
    cos = np.where(zero, dtype.type(0), dot / np.where(zero, one, n))
    return _Rows(zero, z, sa, sb, a, b, np.where(zero, one, aa), np.where(zero, one, bb), np.where(zero, one, n), cos)


def _forward_numpy(f_a, f_b):
    r = _rows(f_a, f_b)
    losses = np.where(r.zero, 1 + r.z, 1 - r.cos)
    return np.asarray(np.sum(losses)).astype(f_a.dtype)


@np.errstate(all="ignore")
def _backward_numpy(grad_output, f_a, f_b, want_a, want_b):
    r = _rows(f_a, f_b)
    g = grad_output.astype(r.a.dtype)
    zero, zero_grad = r.zero[:, None], (g * r.z)[:, None]
    q = (1 / r.n)[:, None]
    grads = []
    for wanted, x, y, xx, s in ((want_a, r.a, r.b, r.aa, r.sa), (want_b, r.b, r.a, r.bb, r.sb)):
        if not wanted:
            grads.append(None)
            continue
        grad = (g * ((r.cos / xx)[:, None] * x - q * y)) * s[:, None]
        grads.append(np.where(zero, zero_grad, grad).astype(f_a.dtype))
    return grads


# --------------------------------------------------------------------------------------------- the op

def mimic_loss(f_a, f_b):
    """Feature-mimicking loss of Deformable ConvNets v2: ``L = Σ_k [1 − cos(f_a[k], f_b[k])]``.

    Args:
        f_a (array[K, D]): one feature vector per row (RoI), e.g. the R-CNN head's features of the
            deformable network.
        f_b (array[K, D]): the features to mimic, row for row (e.g. of the RoI cropped from the image).
            Same shape and dtype as f_a.

    Returns:
        array[()]: the loss summed over the K rows, a 0-d array of f_a's dtype and framework (0 for K = 0).

    ``cos(a, b) = a·b / sqrt(|a|²·|b|²)``, per row in float64 for float64 input and in float32 otherwise;
    each row is first scaled by a power of two (exact), so any finite magnitudes work. Rules:

    - a row where either feature is all zeros has no direction: its cos is taken as 0, so it adds 1 to
      the loss and gets gradient 0 (:func:`mimic_loss_backward`);
    - a NaN or ±inf entry makes the loss NaN, also where the other feature of its row is all zeros;
    - cos is not clamped: rounding may put a nearly parallel row a few ulps below 0 (identical rows give
      exactly 0).

    The host and CUDA backends compute one row per thread and sum the rows with the array library's sum,
    so results are deterministic. Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results",
    CVPR 2019, https://arxiv.org/abs/1811.11168 (section 3.3).

    >>> f_a = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    >>> f_b = np.array([[0.0, 3.0], [2.0, 4.0], [5.0, 6.0]])
    >>> float(deformcp.mimic_loss(f_a, f_b))     # orthogonal 1 + parallel 0 + zero row 1
    2.0

    Every rule in full, with the border cases: docs/conventions.md.
    """
    call = _dispatch.prepare(f_a=f_a, f_b=f_b)
    f_a, f_b = call.arrays
    _check(f_a, f_b)
    K, D = f_a.shape
    with call.device:
        if call.backend == "numpy":
            out = _forward_numpy(f_a, f_b)
        else:
            xp = call.xp
            f_a, f_b = xp.ascontiguousarray(f_a), xp.ascontiguousarray(f_b)
            losses = _kernels.empty(xp, (K,), _kernels.compute_dtype(f_a.dtype))
            _kernels.launch(call.backend, FAMILY, "mimic_loss_rows", f_a.dtype, K, (f_a, f_b, losses), (K, D))
            out = xp.asarray(xp.sum(losses)).astype(f_a.dtype)
    return call.export(out)


def mimic_loss_backward(grad_output, f_a, f_b, needs_input_grad=(True, True)):
    """Gradients of :func:`mimic_loss` with respect to f_a and f_b.

    Args:
        grad_output (array[()]): gradient of the outer loss with respect to the mimic loss: a 0-d array
            (shape ()) of f_a's dtype.
        f_a, f_b (array[K, D]): as given to :func:`mimic_loss`.
        needs_input_grad (pair of bool): which of (f_a, f_b) to differentiate. Default: both.

    Returns:
        MimicLossGrads: ``f_a`` and ``f_b`` (array[K, D] each), None where not asked for:
        ``∂L/∂a_k = g · (cos_k · a_k / |a_k|² − b_k / (|a_k| |b_k|))`` and symmetrically for b, with
        g = grad_output. A row where either feature is all zeros gets gradient 0 in both (its cos is
        taken as 0, a constant); a row with a NaN or ±inf entry gets NaN. Deterministic on every backend
        (each row's gradients are written by one thread, no atomics).

    >>> g = deformcp.mimic_loss_backward(np.array(1.0), f_a, f_b)   # g.f_a, g.f_b: (K, D)
    """
    call = _dispatch.prepare(grad_output=grad_output, f_a=f_a, f_b=f_b)
    grad_output, f_a, f_b = call.arrays
    _check(f_a, f_b)
    want_a, want_b = _validate.needs_grad(needs_input_grad, MimicLossGrads._fields)
    _validate.grad_output(grad_output, (), "() (the loss is a scalar)", f_a=f_a)
    K, D = f_a.shape
    with call.device:
        if call.backend == "numpy":
            grad_a, grad_b = _backward_numpy(np.asarray(grad_output), f_a, f_b, want_a, want_b)
        else:
            xp = call.xp
            f_a, f_b = xp.ascontiguousarray(f_a), xp.ascontiguousarray(f_b)
            grad_output = xp.ascontiguousarray(xp.asarray(grad_output).reshape(1))
            grad_a = _kernels.empty(xp, (K, D), f_a.dtype) if want_a else None
            grad_b = _kernels.empty(xp, (K, D), f_a.dtype) if want_b else None
            if (want_a or want_b) and D > 0:
                _kernels.launch(call.backend, FAMILY, "mimic_loss_backward", f_a.dtype, K,
                                (grad_output, f_a, f_b, _kernels.NULL if grad_a is None else grad_a,
                                 _kernels.NULL if grad_b is None else grad_b), (K, D))
    return MimicLossGrads(*(None if g is None else call.export(g) for g in (grad_a, grad_b)))


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _check_inputs(rng, options):
    """Random features with an all-zero row in each input (the zero-norm rule) and one row scaled far
    from 1 (the power-of-two scaling)."""
    f_a, f_b = rng.standard_normal((2, 9, 37))
    f_a[3] = 0
    f_b[5] = 0
    f_a[7] *= 1e3
    return {"f_a": f_a, "f_b": f_b}


testing.register(testing.OpCheck(
    name="mimic_loss",
    make_inputs=_check_inputs,
    forward=mimic_loss,
    backward=mimic_loss_backward,
    options=({},)))
