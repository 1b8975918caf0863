"""The NumPy path of the DCNv2 feature-mimicking loss: the float64 reference of kernels/mimic_loss.cu."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

from .._kernels import compute_dtype

if TYPE_CHECKING:
    from ..ops.mimic_loss import MimicLossConfig


class _Rows(NamedTuple):
    """Per-row quantities of the NumPy path (the kernels' mimic_row), all in the compute dtype."""

    zero: npt.NDArray[np.bool_]  # (K,) bool: either feature all zeros
    z: npt.NDArray[Any]          # (K,) 0, or NaN where a feature has a NaN or ±inf entry
    sa: npt.NDArray[Any]         # (K,) power-of-two scales
    sb: npt.NDArray[Any]
    a: npt.NDArray[Any]          # (K, D) scaled features
    b: npt.NDArray[Any]
    aa: npt.NDArray[Any]         # (K,) |a'|², |b'|², sqrt(|a'|²·|b'|²), cos (1 where zero, to divide safely)
    bb: npt.NDArray[Any]
    n: npt.NDArray[Any]
    cos: npt.NDArray[Any]        # (K,) 0 where zero


def _scale(m: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """2^-e with m = f·2^e, f in [0.5, 1), e clamped so that the scale is a normal number."""
    limit = 1022 if m.dtype == np.float64 else 126
    exponent = np.frexp(m)[1].astype(np.int32)
    scale: npt.NDArray[Any] = np.ldexp(np.ones_like(m), np.clip(-exponent, -limit, limit))
    return scale


@np.errstate(all="ignore")  # NaN and ±inf entries are valid input: they give NaN
def _rows(f_a: npt.NDArray[Any], f_b: npt.NDArray[Any]) -> _Rows:
    dtype = compute_dtype(f_a.dtype)
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


def mimic_loss(f_a: npt.NDArray[Any], f_b: npt.NDArray[Any], cfg: MimicLossConfig) -> npt.NDArray[Any]:
    """f_a, f_b (K, D) → the loss, a 0-d array."""
    r = _rows(f_a, f_b)
    losses = np.where(r.zero, 1 + r.z, 1 - r.cos)
    return np.asarray(np.sum(losses)).astype(f_a.dtype)


@np.errstate(all="ignore")
def mimic_loss_backward(grad_output: npt.NDArray[Any], f_a: npt.NDArray[Any], f_b: npt.NDArray[Any],
                        cfg: MimicLossConfig, wanted: tuple[bool, bool]) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """grad_output () → (grad_f_a, grad_f_b), None where not wanted."""
    want_a, want_b = wanted
    r = _rows(f_a, f_b)
    g = np.asarray(grad_output).astype(r.a.dtype)
    zero, zero_grad = r.zero[:, None], (g * r.z)[:, None]
    q = (1 / r.n)[:, None]
    grads: list[Optional[npt.NDArray[Any]]] = []
    for want, x, y, xx, s in ((want_a, r.a, r.b, r.aa, r.sa), (want_b, r.b, r.a, r.bb, r.sb)):
        if not want:
            grads.append(None)
            continue
        grad = (g * ((r.cos / xx)[:, None] * x - q * y)) * s[:, None]
        grads.append(np.where(zero, zero_grad, grad).astype(f_a.dtype))
    return tuple(grads)
