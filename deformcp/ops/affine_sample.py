"""The fused affine sampler: ``grid_sample(input, affine_grid(theta, size), ...)`` without the grid, forward and
backward (input and theta), for images and volumes.

Semantics: those of deformcp.affine_grid and deformcp.grid_sample (torch's). Kernels: kernels/spatial_transformer.cu
(``affine_sample*``: each location is made from theta where it is sampled; theta's gradient is reduced in the
kernels in a fixed order). NumPy path: deformcp.reference.affine_sample.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import affine_sample as reference
from . import spatial_transformer
from ._call import backward, forward
from ._spec import Case, OpSpec

FAMILY = spatial_transformer.FAMILY
#: Output locations a thread of the backward sums theta's gradient over (kernels' DEFORMCP_AFFINE_CHUNK).
CHUNK = 64


class AffineSampleGrads(NamedTuple):
    """Gradients of :func:`affine_sample`; a field is None where it was not asked for."""

    input: Optional[Array]
    theta: Optional[Array]


class AffineSampleConfig(NamedTuple):
    grid: spatial_transformer.AffineGridConfig      # the grid theta stands for (never made by the kernels)
    sample: spatial_transformer.GridSampleConfig    # input sampled at it

    @property
    def kernel(self) -> str:
        """The kernels' name prefix."""
        return "affine_sample_3d" if self.grid.volumetric else "affine_sample"


class _Grid(NamedTuple):
    """The shape and dtype of the grid that affine_grid would make: what grid_sample's checks read."""

    shape: tuple[int, ...]
    dtype: object

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _check_affine_sample(call: _dispatch.Call, input: Imported, theta: Imported, size: Optional[Sequence[int]],
                         mode: str, padding_mode: str, align_corners: bool) -> AffineSampleConfig:
    volumetric = len(getattr(input, "shape", ())) == 5
    layout = "(N, C, D, H, W)" if volumetric else "(N, C, H, W)"
    _validate.floating("input", input, 5 if volumetric else 4,
                       layout if volumetric else "(N, C, H, W) or, for volumes, (N, C, D, H, W)")
    _validate.floating("theta", theta, 3, "(N, 3, 4)" if volumetric else "(N, 2, 3)")
    _validate.same_dtype(input=input, theta=theta)
    expected = (3, 4) if volumetric else (2, 3)
    if tuple(theta.shape[1:]) != expected:
        raise ValueError(f"theta: expected shape (N, {expected[0]}, {expected[1]}) for input {layout} of shape "
                         f"{tuple(input.shape)}, got {tuple(theta.shape)}")
    if theta.shape[0] != input.shape[0]:
        raise ValueError(f"theta: expected batch size N = {input.shape[0]} (input's), got {theta.shape[0]} in shape "
                         f"{tuple(theta.shape)}")
    grid = spatial_transformer._check_affine_grid(call, theta, tuple(input.shape) if size is None else size,
                                                  align_corners)
    out_shape = (grid.D, grid.H, grid.W) if volumetric else (grid.H, grid.W)
    sample = spatial_transformer._check_grid_sample(call, input, _Grid((grid.N, *out_shape, len(out_shape)),
                                                                       theta.dtype), mode, padding_mode, align_corners)
    return AffineSampleConfig(grid, sample)


def _output(cfg: AffineSampleConfig) -> tuple[tuple[int, ...], str]:
    return spatial_transformer._grid_sample_output(cfg.sample)


def _kernels_forward(call: _dispatch.Call, input: Imported, theta: Imported, cfg: AffineSampleConfig) -> Imported:
    xp = call.xp
    input, theta = xp.ascontiguousarray(input), xp.ascontiguousarray(theta)
    out = _kernels.empty(xp, _output(cfg)[0], input.dtype)
    _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_forward", input.dtype, cfg.sample.points,
                    (input, theta, out), cfg.sample.sizes, cfg.sample.options)
    return out


def _kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, theta: Imported,
                      cfg: AffineSampleConfig, wanted: tuple[bool, bool],
                      deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    xp = call.xp
    want_input, want_theta = wanted
    grad_output, input, theta = (xp.ascontiguousarray(a) for a in (grad_output, input, theta))
    acc = _kernels.compute_dtype(input.dtype)  # 16-bit input: sums in float32
    N, points = cfg.sample.N, math.prod(cfg.sample.out_shape)
    chunks = -(-points // CHUNK)
    grad_input = xp.zeros(input.shape, acc) if want_input else None
    partial = _kernels.empty(xp, (N, chunks, theta.shape[1] * theta.shape[2]), acc) if want_theta else None
    scattered = None if deterministic else grad_input
    if scattered is not None or partial is not None:
        _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_backward", input.dtype, N * chunks,
                        (grad_output, input, theta, _kernels.NULL if scattered is None else scattered,
                         _kernels.NULL if partial is None else partial), cfg.sample.sizes, cfg.sample.options)
    if deterministic and grad_input is not None:
        _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_backward_input_deterministic", input.dtype,
                        cfg.sample.N * cfg.sample.C, (grad_output, theta, grad_input), cfg.sample.sizes,
                        cfg.sample.options)
    grad_theta = None
    if partial is not None:
        grad_theta = _kernels.empty(xp, theta.shape, theta.dtype)
        _kernels.launch(call.backend, FAMILY, "affine_sample_theta", theta.dtype, theta.size, (partial, grad_theta),
                        (N, chunks, partial.shape[2]))
    return None if grad_input is None else grad_input.astype(input.dtype, copy=False), grad_theta


def affine_sample(input: ArrayLike, theta: ArrayLike, size: Optional[Sequence[int]] = None, mode: str = "bilinear",
                  padding_mode: str = "zeros", align_corners: bool = False) -> Array:
    """``grid_sample(input, affine_grid(theta, size), mode, padding_mode, align_corners)`` without the grid.

    Args:
        input (array[N, C, H, W] or array[N, C, D, H, W]): the images, or volumes.
        theta (array[N, 2, 3] or array[N, 3, 4]): affine matrices mapping output to input coordinates, both
            normalised to [-1, 1] (:func:`deformcp.affine_grid`'s). Same dtype as input.
        size (sequence[int] of 4 or 5, or None): the output size (N, C, H_out, W_out) or (N, C, D_out, H_out,
            W_out); C is not used. Default: input's shape.
        mode, padding_mode, align_corners: as :func:`deformcp.grid_sample` (bicubic for images only).

    Returns:
        array[N, C, H_out, W_out] or array[N, C, D_out, H_out, W_out], input's dtype and framework.

    The kernels make each sampling location from theta where they sample it, so no grid (N·H_out·W_out·2 values)
    is ever stored, and the backward gives theta's gradient directly. Equal to the two-step form to rounding.

    >>> import numpy as np, deformcp
    >>> x = np.random.default_rng(0).random((1, 2, 5, 6))
    >>> theta = np.array([[[0.8, -0.3, 0.1], [0.3, 0.9, -0.2]]])
    >>> y = deformcp.affine_sample(x, theta)
    >>> bool(np.allclose(y, deformcp.grid_sample(x, deformcp.affine_grid(theta, x.shape))))
    True
    """
    return forward(AFFINE_SAMPLE, locals())


def affine_sample_backward(grad_output: ArrayLike, input: ArrayLike, theta: ArrayLike,
                           size: Optional[Sequence[int]] = None, mode: str = "bilinear", padding_mode: str = "zeros",
                           align_corners: bool = False, needs_input_grad: Sequence[bool] = (True, True),
                           deterministic: bool = False) -> AffineSampleGrads:
    """Gradients of :func:`affine_sample` with respect to input and theta.

    Args:
        grad_output (array, the output's shape): gradient of the loss with respect to the output.
        input, theta, size, mode, padding_mode, align_corners: as given to :func:`affine_sample`.
        needs_input_grad (pair of bool): which of (input, theta) to differentiate. Default: both.
        deterministic (bool): the input gradient as :func:`deformcp.grid_sample_backward`'s; theta's gradient is
            reduced in a fixed order on every backend (bitwise reproducible either way). Default: False.

    Returns:
        AffineSampleGrads: ``input`` and ``theta`` (their shapes), None where not asked for.
    """
    return AffineSampleGrads(*backward(AFFINE_SAMPLE, locals()))


def _inputs(volumetric: bool) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        if volumetric:
            theta = rng.standard_normal((2, 3, 4)) * 0.3 + [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
            return {"input": rng.standard_normal((2, 3, 4, 5, 6)), "theta": theta}
        theta = rng.standard_normal((2, 2, 3)) * 0.3 + [[1, 0, 0], [0, 1, 0]]
        return {"input": rng.standard_normal((2, 3, 7, 9)), "theta": theta}
    return make


AFFINE_SAMPLE = OpSpec(
    name="affine_sample", arrays=("input", "theta"), grads=AffineSampleGrads, check=_check_affine_sample,
    output=_output, reference=reference.affine_sample, reference_backward=reference.affine_sample_backward,
    kernels=_kernels_forward, kernels_backward=_kernels_backward, function=affine_sample,
    backward=affine_sample_backward, batch=("input", "theta"), batch_size="size",
    cases=tuple(Case(f"{'volume-' if volumetric else ''}{mode}-{padding}-align_corners={align}", _inputs(volumetric),
                     {"size": size, "mode": mode, "padding_mode": padding, "align_corners": align})
                for volumetric, size, mode, padding, align in (
                    (False, (2, 3, 6, 8), "bilinear", "zeros", False), (False, None, "bilinear", "border", True),
                    (False, (2, 3, 5, 4), "nearest", "reflection", False),
                    (False, (2, 3, 6, 5), "bicubic", "zeros", True),
                    (True, (2, 3, 3, 4, 5), "bilinear", "zeros", False),
                    (True, None, "nearest", "border", True))))

SPECS = (AFFINE_SAMPLE,)
