"""Deformable ConvNets v2's feature-mimicking loss, forward and backward.

Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168, section 3.3: the features an R-CNN head computes on each RoI of the
deformable network are pulled towards those of the same RoI cropped from the image, by
``L = Σ_b [1 − cos(f_a(b), f_b(b))]`` over the RoIs b. Kernels: kernels/mimic_loss.cu.
NumPy path: deformcp.reference.mimic_loss.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import mimic_loss as reference
from ._call import backward, forward
from ._spec import Case, OpSpec

FAMILY = "mimic_loss"
LAYOUT = "(K, D)"


class MimicLossGrads(NamedTuple):
    """Gradients of :func:`mimic_loss`; a field is None where it was not asked for."""

    f_a: Optional[Array]
    f_b: Optional[Array]


class MimicLossConfig(NamedTuple):
    K: int
    D: int


def _check(call: _dispatch.Call, f_a: Imported, f_b: Imported) -> MimicLossConfig:
    _validate.floating("f_a", f_a, 2, LAYOUT)
    _validate.floating("f_b", f_b, 2, LAYOUT)
    _validate.shape("f_b", f_b, tuple(f_a.shape), f"{LAYOUT}, f_a's shape")
    _validate.same_dtype(f_a=f_a, f_b=f_b)
    return MimicLossConfig(*f_a.shape)


def _output(cfg: MimicLossConfig) -> tuple[tuple[int, ...], str]:
    return (), "() (the loss is a scalar)"


def _kernels_forward(call: _dispatch.Call, f_a: Imported, f_b: Imported, cfg: MimicLossConfig) -> Imported:
    xp = call.xp
    f_a, f_b = xp.ascontiguousarray(f_a), xp.ascontiguousarray(f_b)
    losses = _kernels.empty(xp, (cfg.K,), _kernels.compute_dtype(f_a.dtype))
    _kernels.launch(call.backend, FAMILY, "mimic_loss_rows", f_a.dtype, cfg.K, (f_a, f_b, losses), (cfg.K, cfg.D))
    return xp.asarray(xp.sum(losses)).astype(f_a.dtype)


def _kernels_backward(call: _dispatch.Call, grad_output: Imported, f_a: Imported, f_b: Imported, cfg: MimicLossConfig,
                      wanted: tuple[bool, bool], deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    xp = call.xp
    want_a, want_b = wanted
    f_a, f_b = xp.ascontiguousarray(f_a), xp.ascontiguousarray(f_b)
    grad_output = xp.ascontiguousarray(xp.asarray(grad_output).reshape(1))
    grad_a = _kernels.empty(xp, (cfg.K, cfg.D), f_a.dtype) if want_a else None
    grad_b = _kernels.empty(xp, (cfg.K, cfg.D), f_a.dtype) if want_b else None
    if (want_a or want_b) and cfg.D > 0:
        _kernels.launch(call.backend, FAMILY, "mimic_loss_backward", f_a.dtype, cfg.K,
                        (grad_output, f_a, f_b, _kernels.NULL if grad_a is None else grad_a,
                         _kernels.NULL if grad_b is None else grad_b), (cfg.K, cfg.D))
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------- the op

def mimic_loss(f_a: ArrayLike, f_b: ArrayLike) -> Array:
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

    >>> import numpy as np, deformcp
    >>> f_a = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    >>> f_b = np.array([[0.0, 3.0], [2.0, 4.0], [5.0, 6.0]])
    >>> float(deformcp.mimic_loss(f_a, f_b))     # orthogonal 1 + parallel 0 + zero row 1
    2.0

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(MIMIC_LOSS, locals())


def mimic_loss_backward(grad_output: ArrayLike, f_a: ArrayLike, f_b: ArrayLike,
                        needs_input_grad: Sequence[bool] = (True, True)) -> MimicLossGrads:
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

    >>> import numpy as np, deformcp
    >>> f_a, f_b = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 1.0], [5.0, 6.0]])
    >>> g = deformcp.mimic_loss_backward(np.array(1.0), f_a, f_b)   # g.f_a, g.f_b: (K, D)
    >>> print(g.f_a)                                                 # the zero row gets 0
    [[ 0.         -0.70710678]
     [ 0.          0.        ]]
    """
    return MimicLossGrads(*backward(MIMIC_LOSS, locals()))


# ------------------------------------------------------------------------------------------- spec

def _check_inputs(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
    """Random features with an all-zero row in each input (the zero-norm rule) and one row scaled far
    from 1 (the power-of-two scaling)."""
    f_a, f_b = rng.standard_normal((2, 9, 37))
    f_a[3] = 0
    f_b[5] = 0
    f_a[7] *= 1e3
    return {"f_a": f_a, "f_b": f_b}


MIMIC_LOSS = OpSpec(
    name="mimic_loss", arrays=("f_a", "f_b"), grads=MimicLossGrads, check=_check, output=_output,
    reference=reference.mimic_loss, reference_backward=reference.mimic_loss_backward, kernels=_kernels_forward,
    kernels_backward=_kernels_backward, function=mimic_loss, backward=mimic_loss_backward,
    cases=(Case("zero-rows-and-scaled-rows", _check_inputs, {}),))

SPECS = (MIMIC_LOSS,)
