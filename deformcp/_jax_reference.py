"""affine_grid, grid_sample and affine_sample written in jax.numpy, from deformcp's conventions: the form JAX
differentiates to any order. deformcp.jax computes values and gradients with deformcp's kernels; its forward-mode
tangents (``jax.jvp``, ``jax.jacfwd``) and the derivatives of its gradients (``jax.hessian``) are JAX's derivatives
of these functions.

grid_sample reads each sample's corners (bilinear) or nearest pixel from the images padded with zeros, the pixel
coordinates clamped to [-PAD, size] (NaN to -PAD) as the NumPy path does (deformcp.reference.spatial_transformer),
so that every sample outside the image reads zeros; a corner's weight is a product of ``t`` and ``1 − t`` per axis
with ``t`` the coordinate's distance from its floor: the kernels' weights and their derivatives (from the right
at integer coordinates). The padding modes are the kernels' selections, so that their derivatives are the
kernels' (0 where the coordinate is clamped). Bicubic sampling has no form here.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ._kernels import compute_dtype

PAD = 2  # zero pixels around the images, on every side


def _base_axis(n: int, align_corners: bool, dtype: Any) -> jax.Array:
    """(n,) normalised coordinates of the pixels along one axis (deformcp.reference.spatial_transformer's)."""
    if n <= 1:
        return jnp.zeros(n, dtype)
    return (2 * jnp.arange(n, dtype=dtype) - (n - 1)) / (n - 1 if align_corners else n)


def affine_grid(theta: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
    """theta (N, 2, 3) → (N, H, W, 2), or (N, 3, 4) → (N, D, H, W, 3): Σ_j θ_rj · (x, y, (z), 1)_j."""
    dtype = compute_dtype(theta.dtype)
    t = theta.astype(dtype)
    spatial = tuple(size[2:])
    d = len(spatial)

    def column(j: int) -> jax.Array:
        """θ_rj for every r, shaped (N, 1, …, 1, d) to broadcast over the spatial axes."""
        return t[:, :, j].reshape(t.shape[0], *([1] * d), d)

    grid = jnp.zeros((t.shape[0], *spatial, d), dtype)
    for j, n in enumerate(spatial[::-1]):  # x over W, y over H, (z over D)
        shape = [1] * d
        shape[d - 1 - j] = n
        grid = grid + _base_axis(n, align_corners, dtype).reshape(1, *shape, 1) * column(j)
    grid = grid + column(d)
    return grid.astype(theta.dtype)


def _source_coordinate(g: jax.Array, size: int, padding_mode: str, align_corners: bool) -> jax.Array:
    """Pixel coordinate of normalised grid values g over an axis of ``size`` pixels, after the padding mode."""
    x = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
    if padding_mode == "reflection":
        twice_low, twice_high = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        low, span = twice_low / 2, (twice_high - twice_low) / 2
        if span == 0:  # align_corners over a 1-pixel axis: always that pixel
            return jnp.zeros_like(x)
        distance = x - low
        distance = distance * jnp.where(distance < 0, -1, 1).astype(x.dtype)
        extra = jnp.fmod(distance, span)
        even = jnp.fmod(jnp.floor(distance / span), 2) == 0
        x = jnp.where(even, extra + low, span - extra + low)
    if padding_mode != "zeros":
        x = jnp.where(x <= 0, 0, jnp.where(x >= size - 1, size - 1, x)).astype(x.dtype)
    return x


def grid_sample(input: jax.Array, grid: jax.Array, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> jax.Array:
    """input (N, C, H, W) and grid (N, H_out, W_out, 2) → (N, C, H_out, W_out); volumes (N, C, D, H, W) and
    (N, D_out, H_out, W_out, 3). Bilinear (trilinear) or nearest."""
    if mode not in ("bilinear", "nearest"):
        raise NotImplementedError(f"deformcp.jax.grid_sample: forward-mode differentiation (jax.jvp, jax.jacfwd, "
                                  f"jax.hessian) is supported for mode 'bilinear' and 'nearest', got mode {mode!r}")
    dtype = compute_dtype(input.dtype)
    N, C, *spatial = input.shape
    d = len(spatial)
    points = grid.shape[1:-1]
    padded = jnp.pad(input.astype(dtype), [(0, 0), (0, 0)] + [(PAD, PAD)] * d).reshape(N, C, -1)
    padded_shape = [n + 2 * PAD for n in spatial]
    strides = [math.prod(padded_shape[d - k:]) for k in range(d)]  # of x, y, (z): the grid's components' order
    coordinates = []
    for k, n in enumerate(spatial[::-1]):
        x = _source_coordinate(grid[..., k].reshape(N, -1).astype(dtype), n, padding_mode, align_corners)
        coordinates.append(jnp.where(jnp.isnan(x), -PAD, jnp.where(x < -PAD, -PAD, jnp.where(x > n, n, x))))

    def read(corner: Sequence[jax.Array]) -> jax.Array:
        """(N, C, P): the padded images at the integer pixel coordinates ``corner`` (x, y, (z)), each (N, P)."""
        index = sum((c.astype(jnp.int32) + PAD) * s for c, s in zip(corner, strides))
        gathered: jax.Array = jax.vmap(lambda image, i: image[:, i])(padded, index)
        return gathered

    if mode == "nearest":
        out = read([jnp.round(x) for x in coordinates])  # half to even
    else:
        lower = [jnp.floor(x) for x in coordinates]
        fraction = [x - f for x, f in zip(coordinates, lower)]
        out = jnp.zeros((N, C, math.prod(points)), dtype)
        for upper in itertools.product((0, 1), repeat=d):
            weight = jnp.ones_like(fraction[0])
            for t, u in zip(fraction, upper):
                weight = weight * (t if u else 1 - t)
            out = out + weight[:, None] * read([f + u for f, u in zip(lower, upper)])
    return out.reshape(N, C, *points).astype(input.dtype)


def affine_sample(input: jax.Array, theta: jax.Array, size: Optional[Sequence[int]] = None, mode: str = "bilinear",
                  padding_mode: str = "zeros", align_corners: bool = False) -> jax.Array:
    """grid_sample(input, affine_grid(theta, size or input's shape))."""
    grid = affine_grid(theta, tuple(input.shape) if size is None else size, align_corners)
    return grid_sample(input, grid, mode, padding_mode, align_corners)


#: The ops written here, by name.
FUNCTIONS: dict[str, Callable[..., jax.Array]] = {"affine_grid": affine_grid, "grid_sample": grid_sample,
                                                  "affine_sample": affine_sample}
