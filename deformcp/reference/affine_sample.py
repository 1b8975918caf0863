"""The NumPy path of affine_sample: the two-step form, deformcp.reference.spatial_transformer's affine_grid and
grid_sample (the float64 reference of kernels/spatial_transformer.cu's fused affine_sample kernels), in the compute
dtype throughout — the grid and its gradient are not rounded to a 16-bit dtype, as the kernels never store them.
``cfg`` is the op's checked configuration (deformcp.ops.affine_sample): its ``grid`` and ``sample`` parts."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy.typing as npt

from .._kernels import compute_dtype
from . import spatial_transformer

if TYPE_CHECKING:
    from ..ops.affine_sample import AffineSampleConfig


def _computed(*arrays: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], ...]:
    return tuple(a.astype(compute_dtype(a.dtype), copy=False) for a in arrays)


def affine_sample(input: npt.NDArray[Any], theta: npt.NDArray[Any], cfg: AffineSampleConfig) -> npt.NDArray[Any]:
    """input (N, C, *S) sampled at affine_grid(theta) → (N, C, *S_out)."""
    x, t = _computed(input, theta)
    out = spatial_transformer.grid_sample(x, spatial_transformer.affine_grid(t, cfg.grid), cfg.sample)
    return out.astype(input.dtype, copy=False)


def affine_sample_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], theta: npt.NDArray[Any],
                           cfg: AffineSampleConfig, wanted: tuple[bool, bool]
                           ) -> tuple[Optional[npt.NDArray[Any]], Optional[npt.NDArray[Any]]]:
    """(grad_input, grad_theta), None where not wanted: the grid's gradient, then affine_grid's backward."""
    want_input, want_theta = wanted
    g, x, t = _computed(grad_output, input, theta)
    grid = spatial_transformer.affine_grid(t, cfg.grid)
    grad_input, grad_grid = spatial_transformer.grid_sample_backward(g, x, grid, cfg.sample, (want_input, want_theta))
    grad_theta = None
    if grad_grid is not None:  # want_theta: grid_sample_backward's grid gradient is there exactly when wanted
        grad_theta = spatial_transformer.affine_grid_backward(grad_grid, t, cfg.grid, (True,))[0]
    return (None if grad_input is None else grad_input.astype(input.dtype, copy=False),
            None if grad_theta is None else grad_theta.astype(theta.dtype, copy=False))
