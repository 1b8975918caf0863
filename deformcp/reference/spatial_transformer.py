"""The NumPy path of the Spatial Transformer ops (affine_grid, grid_sample): the float64 reference of
kernels/spatial_transformer.cu. ``cfg`` is the op's checked configuration (deformcp.ops.spatial_transformer)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear


def _base_grid(H: int, W: int, align_corners: bool, dtype) -> np.ndarray:
    """(H·W, 3) rows [x, y, 1]: affine_grid's normalised pixel coordinates."""
    def axis(n):
        if n <= 1:
            return np.zeros(n, dtype)
        return (2 * np.arange(n, dtype=dtype) - (n - 1)) / (n - 1 if align_corners else n)

    y, x = np.meshgrid(axis(H), axis(W), indexing="ij")
    return np.stack([x.ravel(), y.ravel(), np.ones(H * W, dtype)], axis=1)


def affine_grid(theta, cfg):
    """theta (N, 2, 3) → grid (N, H, W, 2)."""
    N, H, W = cfg.N, cfg.H, cfg.W
    if N == 0:  # no base grid to build
        return np.empty((0, H, W, 2), theta.dtype)
    dtype = compute_dtype(theta.dtype)
    base = _base_grid(H, W, cfg.align_corners, dtype)
    grid = base @ theta.astype(dtype).transpose(0, 2, 1)
    return grid.reshape(N, H, W, 2).astype(theta.dtype, copy=False)


def affine_grid_backward(grad_output, theta, cfg, wanted):
    """grad_output (N, H, W, 2) → (grad_theta (N, 2, 3),)."""
    N, H, W = cfg.N, cfg.H, cfg.W
    if N == 0:
        return (np.empty((0, 2, 3), theta.dtype),)
    dtype = compute_dtype(theta.dtype)
    base = _base_grid(H, W, cfg.align_corners, dtype)
    g = grad_output.astype(dtype).reshape(N, H * W, 2)
    return ((g.transpose(0, 2, 1) @ base).astype(theta.dtype, copy=False),)


def _source_coordinate(g, size: int, padding_mode: str, align_corners: bool):
    """Pixel coordinate sampled for normalised grid values g along an axis of `size` pixels, and its
    derivative with respect to g (the kernels' grid_source_coordinate)."""
    if align_corners:
        x, d = (g + 1) / 2 * (size - 1), (size - 1) / 2
    else:
        x, d = ((g + 1) * size - 1) / 2, size / 2
    d = np.full_like(x, d)
    if padding_mode == "reflection":
        twice_low, twice_high = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        if twice_low == twice_high:
            x, d = np.zeros_like(x), np.zeros_like(d)
        else:
            low, span = twice_low / 2, (twice_high - twice_low) / 2
            distance = x - low
            sign = np.where(distance < 0, -1, 1).astype(x.dtype)
            distance = np.abs(distance)
            extra = np.fmod(distance, span)
            even = np.fmod(np.floor(distance / span), 2) == 0
            x = np.where(even, extra + low, span - extra + low)
            d = d * np.where(even, sign, -sign)
    if padding_mode != "zeros":
        low, high = x <= 0, x >= size - 1
        x = np.where(low, 0, np.where(high, size - 1, x)).astype(d.dtype)
        d = np.where(low | high, 0, d)
    return x, d


class _SamplingPlan(NamedTuple):
    """Where each grid location reads (NumPy path): k = 4 (bilinear) or 1 (nearest) rows of
    _bilinear.pixels_last(chunk of images) per location, weights and their derivatives."""

    rows: np.ndarray                  # (N, H_out·W_out, k)
    weight: np.ndarray                # (N, H_out·W_out, k)
    dweight_dy: Optional[np.ndarray]  # (N, H_out·W_out, k); None for nearest
    dweight_dx: Optional[np.ndarray]
    dx_dg: np.ndarray                 # (N, H_out·W_out): derivatives of the source coordinates wrt grid
    dy_dg: np.ndarray


@np.errstate(invalid="ignore")  # NaN and ±inf grid values are valid input
def _sampling_plan(grid, H, W, mode, padding_mode, align_corners, images_per_chunk) -> _SamplingPlan:
    """The plan of grid (N, H_out, W_out, 2) over N images of H×W pixels, processed in chunks of
    images_per_chunk images. Built for the whole batch at once: many small NumPy calls per chunk
    would cost more than the work."""
    N = grid.shape[0]
    grid = grid.reshape(N, grid.shape[1] * grid.shape[2], 2)
    x, dx_dg = _source_coordinate(grid[..., 0], W, padding_mode, align_corners)
    y, dy_dg = _source_coordinate(grid[..., 1], H, padding_mode, align_corners)
    image_start = (np.arange(N) % images_per_chunk * (H * W + 1)).reshape(N, 1, 1)
    if mode == "nearest":
        ry, rx = np.rint(y), np.rint(x)
        inside = (ry >= 0) & (ry < H) & (rx >= 0) & (rx < W)
        # the flat index in integers: ry · W + rx in float32 is off by one past 2**24 pixels
        ry, rx = (np.where(inside, r, 0).astype(np.int64) for r in (ry, rx))
        index = np.where(inside, ry * W + rx, H * W)[..., None]
        return _SamplingPlan(index + image_start, inside[..., None].astype(grid.dtype), None, None, dx_dg, dy_dg)
    c = _bilinear.corners(y, x, H, W, closed_below=True)
    return _SamplingPlan(c.index + image_start, c.weight, c.dweight_dy, c.dweight_dx, dx_dg, dy_dg)


def grid_sample(input, grid, cfg):
    """input (N, C, H, W) sampled at grid (N, H_out, W_out, 2) → (N, C, H_out, W_out)."""
    mode, padding_mode, align_corners = cfg.mode, cfg.padding_mode, cfg.align_corners
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    chunks = _workspace.image_chunks(N, C, H, W, dtype.itemsize)
    plan = _sampling_plan(grid.astype(dtype, copy=False), H, W, mode, padding_mode, align_corners,
                          chunks[0][1] if chunks else 1)
    out = np.empty((N, C) + grid.shape[1:3], dtype)

    def work(a, b):
        S = _bilinear.sampling_matrix(plan.rows[a:b], plan.weight[a:b], (b - a) * (H * W + 1))
        _bilinear.to_channels_first(S @ _bilinear.pixels_last(input[a:b], dtype), out[a:b])

    _bilinear.for_each_chunk(work, chunks)
    return out.astype(input.dtype, copy=False)


def grid_sample_backward(grad_output, input, grid, cfg, wanted):
    """(grad_input, grad_grid), None where not wanted."""
    mode, padding_mode, align_corners = cfg.mode, cfg.padding_mode, cfg.align_corners
    want_input, want_grid = wanted
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    chunks = _workspace.image_chunks(N, C, H, W, dtype.itemsize)
    plan = _sampling_plan(grid.astype(dtype, copy=False), H, W, mode, padding_mode, align_corners,
                          chunks[0][1] if chunks else 1)
    grad_input = np.empty(input.shape, dtype) if want_input else None
    grad_grid = np.zeros(grid.shape, dtype) if want_grid else None
    want_grid = want_grid and mode == "bilinear"  # nearest: the grid gradient is 0

    def work(a, b):
        locations = plan.rows.shape[1]
        P = (b - a) * locations
        G = grad_output[a:b].reshape(b - a, C, locations).transpose(0, 2, 1).reshape(P, C)
        G = G.astype(dtype, copy=False)
        if want_input:
            S = _bilinear.sampling_matrix(plan.rows[a:b], plan.weight[a:b], (b - a) * (H * W + 1))
            _bilinear.to_channels_first(S.T @ G, grad_input[a:b])
        if want_grid:
            # each corner's value dotted with the location's output gradient, then the weights' derivatives
            X = _bilinear.pixels_last(input[a:b], dtype)
            corners = X.take(plan.rows[a:b].reshape(-1), axis=0).reshape(P, 4, C)
            corner_dots = np.matmul(corners, G[:, :, None]).reshape(P, 4)  # matmul: the fastest (P, 4) here
            gx = np.vecdot(corner_dots, plan.dweight_dx[a:b].reshape(P, 4)) * plan.dx_dg[a:b].reshape(P)
            gy = np.vecdot(corner_dots, plan.dweight_dy[a:b].reshape(P, 4)) * plan.dy_dg[a:b].reshape(P)
            grad_grid[a:b] = np.stack([gx, gy], axis=-1).reshape(grad_grid[a:b].shape)

    if want_input or want_grid:
        _bilinear.for_each_chunk(work, chunks)
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_grid))


