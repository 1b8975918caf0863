"""Spatial Transformer Networks: the affine grid generator and the grid sampler, forward and backward.

Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02025.
Semantics are those of torch.nn.functional.affine_grid and grid_sample (2-D). Kernels:
kernels/spatial_transformer.cu.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _bilinear, _dispatch, _kernels, _validate, _workspace, testing

FAMILY = "spatial_transformer"
MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")


class AffineGridGrads(NamedTuple):
    """Gradients of :func:`affine_grid`."""

    theta: Optional[object]


class GridSampleGrads(NamedTuple):
    """Gradients of :func:`grid_sample`; a field is None where it was not asked for."""

    input: Optional[object]
    grid: Optional[object]


# ---------------------------------------------------------------------------------------- affine_grid

def _check_affine_grid(theta, size):
    _validate.floating("theta", theta, 3, "(N, 2, 3)")
    _validate.shape("theta", theta, (None, 2, 3), "(N, 2, 3)")
    size = _validate.sizes("size", size, 4)
    if size[0] != theta.shape[0]:
        raise ValueError(f"size: expected N = {theta.shape[0]} (theta's batch) in size (N, C, H, W), "
                         f"got {size}")
    _validate.output_fits("size", (size[0], size[2], size[3], 2), theta.dtype)
    return size


def _base_grid(H: int, W: int, align_corners: bool, dtype) -> np.ndarray:
    """(H·W, 3) rows [x, y, 1]: affine_grid's normalised pixel coordinates."""
    def axis(n):
        if n <= 1:
            return np.zeros(n, dtype)
        return (2 * np.arange(n, dtype=dtype) - (n - 1)) / (n - 1 if align_corners else n)

    y, x = np.meshgrid(axis(H), axis(W), indexing="ij")
    return np.stack([x.ravel(), y.ravel(), np.ones(H * W, dtype)], axis=1)


def affine_grid(theta, size, align_corners=False):
    """Sampling grid of a batch of 2-D affine transforms: ``(x_s, y_s) = theta · (x_t, y_t, 1)``.

    Args:
        theta (array[N, 2, 3]): affine matrices mapping output (target) to input (source) coordinates,
            both normalised to [-1, 1].
        size (sequence[int] of 4): the output size (N, C, H, W); only N, H and W are used.
        align_corners (bool): if True, -1 and 1 are the centres of the corner pixels; if False, their
            outer edges, so the grid is resolution-independent. Default: False.

    Returns:
        array[N, H, W, 2]: the grid, last axis (x, y) — ready for :func:`grid_sample`.

    Same as torch.nn.functional.affine_grid for 4-D sizes. Jaderberg et al., "Spatial Transformer
    Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02025 (eq. 1).

    >>> theta = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])   # identity
    >>> grid = deformcp.affine_grid(theta, (1, 3, 4, 5))          # (1, 4, 5, 2)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    call = _dispatch.prepare(theta=theta)
    (theta,) = call.arrays
    N, _, H, W = _check_affine_grid(theta, size)
    align_corners = _validate.flag("align_corners", align_corners)
    with call.device:
        if call.backend == "numpy" and N == 0:  # no base grid to build
            out = np.empty((0, H, W, 2), theta.dtype)
        elif call.backend == "numpy":
            dtype = _kernels.compute_dtype(theta.dtype)
            base = _base_grid(H, W, align_corners, dtype)
            grid = base @ theta.astype(dtype).transpose(0, 2, 1)
            out = grid.reshape(N, H, W, 2).astype(theta.dtype, copy=False)
        else:
            xp = call.xp
            theta = xp.ascontiguousarray(theta)
            out = _kernels.empty(xp, (N, H, W, 2), theta.dtype)
            _kernels.launch(call.backend, FAMILY, "affine_grid_forward", theta.dtype, N * H * W,
                            (theta, out), (N, H, W), (align_corners,))
    return call.export(out)


def affine_grid_backward(grad_output, theta, size, align_corners=False):
    """Gradient of :func:`affine_grid` with respect to theta.

    Args:
        grad_output (array[N, H, W, 2]): gradient of the loss with respect to the grid.
        theta (array[N, 2, 3]), size, align_corners: as given to :func:`affine_grid`.

    Returns:
        AffineGridGrads: ``theta`` (array[N, 2, 3]). Deterministic on every backend.
    """
    call = _dispatch.prepare(grad_output=grad_output, theta=theta)
    grad_output, theta = call.arrays
    N, _, H, W = _check_affine_grid(theta, size)
    align_corners = _validate.flag("align_corners", align_corners)
    _validate.grad_output(grad_output, (N, H, W, 2), "(N, H, W, 2)", theta=theta)
    with call.device:
        if call.backend == "numpy" and N == 0:
            grad_theta = np.empty((0, 2, 3), theta.dtype)
        elif call.backend == "numpy":
            dtype = _kernels.compute_dtype(theta.dtype)
            base = _base_grid(H, W, align_corners, dtype)
            g = grad_output.astype(dtype).reshape(N, H * W, 2)
            grad_theta = (g.transpose(0, 2, 1) @ base).astype(theta.dtype, copy=False)
        else:
            xp = call.xp
            grad_output = xp.ascontiguousarray(grad_output)
            grad_theta = _kernels.empty(xp, (N, 2, 3), theta.dtype)
            _kernels.launch(call.backend, FAMILY, "affine_grid_backward", theta.dtype, N * 6,
                            (grad_output, grad_theta), (N, H, W), (align_corners,))
    return AffineGridGrads(call.export(grad_theta))


# ---------------------------------------------------------------------------------------- grid_sample

def _check_grid_sample(input, grid, mode, padding_mode, align_corners) -> bool:
    _validate.floating("input", input, 4, "(N, C, H, W)")
    _validate.floating("grid", grid, 4, "(N, H_out, W_out, 2)")
    if grid.shape[3] != 2:
        raise ValueError(f"grid: expected the last axis to hold (x, y), size 2, in (N, H_out, W_out, 2), "
                         f"got shape {tuple(grid.shape)}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid: expected batch size N = {input.shape[0]} (input's), "
                         f"got {grid.shape[0]} in shape {tuple(grid.shape)}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input: expected non-empty spatial size H, W in (N, C, H, W), "
                         f"got {tuple(input.shape)}")
    _validate.same_dtype(input=input, grid=grid)
    _validate.choice("mode", mode, MODES)
    _validate.choice("padding_mode", padding_mode, PADDING_MODES)
    return _validate.flag("align_corners", align_corners)


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


def _grid_sample_numpy(input, grid, mode, padding_mode, align_corners):
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
    chunks = _workspace.image_chunks(N, C, H, W, dtype.itemsize)
    plan = _sampling_plan(grid.astype(dtype, copy=False), H, W, mode, padding_mode, align_corners,
                          chunks[0][1] if chunks else 1)
    out = np.empty((N, C) + grid.shape[1:3], dtype)

    def work(a, b):
        S = _bilinear.sampling_matrix(plan.rows[a:b], plan.weight[a:b], (b - a) * (H * W + 1))
        _bilinear.to_channels_first(S @ _bilinear.pixels_last(input[a:b], dtype), out[a:b])

    _bilinear.for_each_chunk(work, chunks)
    return out.astype(input.dtype, copy=False)


def _grid_sample_backward_numpy(grad_output, input, grid, mode, padding_mode, align_corners, want_input,
                                want_grid):
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
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
    return (None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_grid))


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Sample ``input`` at the normalised locations of ``grid``: ``V = Σ_nm U_nm k(x_s − m) k(y_s − n)``.

    Args:
        input (array[N, C, H, W]): the images.
        grid (array[N, H_out, W_out, 2]): sampling locations, last axis (x, y), normalised so that -1 and
            1 are the left/top and right/bottom of the image (see align_corners). Same dtype as input.
        mode (str): "bilinear" (k(d) = max(0, 1 − |d|)) or "nearest" (round half to even).
            Default: "bilinear".
        padding_mode (str): what locations outside the image read. "zeros": 0 (bilinear corners outside
            the image read 0); "border": the coordinate is clamped to the image; "reflection": it is
            reflected at the border (at the corner pixels' centres with align_corners, else their edges),
            then clamped. Default: "zeros".
        align_corners (bool): True: x = (g + 1) / 2 · (W − 1), -1 and 1 are the corner pixels' centres;
            False: x = ((g + 1) · W − 1) / 2, they are the corner pixels' outer edges. Default: False.

    Returns:
        array[N, C, H_out, W_out], input's dtype and framework.

    A grid value that is NaN samples 0 (and gets gradient 0) in every padding mode; ±inf samples 0 with
    zeros and reflection padding and the border pixel with border padding. Same as
    torch.nn.functional.grid_sample for 4-D input. Jaderberg et al., "Spatial Transformer Networks",
    NeurIPS 2015, https://arxiv.org/abs/1506.02025 (eq. 5, the bilinear kernel).

    >>> x = np.random.rand(1, 3, 8, 8)
    >>> theta = np.array([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])     # zoom in 2×
    >>> out = deformcp.grid_sample(x, deformcp.affine_grid(theta, x.shape))

    Every rule in full, with the border cases: docs/conventions.md.
    """
    call = _dispatch.prepare(input=input, grid=grid)
    input, grid = call.arrays
    align_corners = _check_grid_sample(input, grid, mode, padding_mode, align_corners)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    with call.device:
        if call.backend == "numpy":
            out = _grid_sample_numpy(input, grid, mode, padding_mode, align_corners)
        else:
            xp = call.xp
            input, grid = xp.ascontiguousarray(input), xp.ascontiguousarray(grid)
            out = _kernels.empty(xp, (N, C, Ho, Wo), input.dtype)
            _kernels.launch(call.backend, FAMILY, "grid_sample_forward", input.dtype, N * Ho * Wo,
                            (input, grid, out), (N, C, H, W, Ho, Wo),
                            (MODES.index(mode), PADDING_MODES.index(padding_mode), align_corners))
    return call.export(out)


def grid_sample_backward(grad_output, input, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False, needs_input_grad=(True, True), deterministic=False):
    """Gradients of :func:`grid_sample` with respect to input and grid.

    Args:
        grad_output (array[N, C, H_out, W_out]): gradient of the loss with respect to the output.
        input, grid, mode, padding_mode, align_corners: as given to :func:`grid_sample`.
        needs_input_grad (pair of bool): which of (input, grid) to differentiate. Default: both.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the input gradient with
            atomics (float sums may differ in the last bits between runs); True gives each input plane
            to one thread, which adds the output locations in order: bitwise identical run to run. The
            NumPy path is always deterministic. Default: False.

    Returns:
        GridSampleGrads: ``input`` (array[N, C, H, W]) and ``grid`` (array[N, H_out, W_out, 2]), None
        where not asked for. The grid gradient is 0 for mode "nearest", where a coordinate is clamped
        by the padding, and at NaN locations. The bilinear weights' derivative at an integer coordinate
        is taken from the right (the cell whose lower corner it is), as in PyTorch.

    """
    call = _dispatch.prepare(grad_output=grad_output, input=input, grid=grid)
    grad_output, input, grid = call.arrays
    align_corners = _check_grid_sample(input, grid, mode, padding_mode, align_corners)
    want_input, want_grid = _validate.needs_grad(needs_input_grad, GridSampleGrads._fields)
    deterministic = _validate.flag("deterministic", deterministic)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    _validate.grad_output(grad_output, (N, C, Ho, Wo), "(N, C, H_out, W_out)", input=input)
    grad_input = grad_grid = None
    with call.device:
        if call.backend == "numpy":
            grad_input, grad_grid = _grid_sample_backward_numpy(grad_output, input, grid, mode, padding_mode,
                                                                align_corners, want_input, want_grid)
        else:
            xp = call.xp
            grad_output, input, grid = (xp.ascontiguousarray(a) for a in (grad_output, input, grid))
            if want_input:  # summed in float32 for 16-bit input
                grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype))
            if want_grid:
                grad_grid = _kernels.empty(xp, grid.shape, grid.dtype)
            options = (MODES.index(mode), PADDING_MODES.index(padding_mode), align_corners)
            scattered = None if deterministic or grad_input is None else grad_input
            if scattered is not None or grad_grid is not None:
                _kernels.launch(call.backend, FAMILY, "grid_sample_backward", input.dtype, N * Ho * Wo,
                                (grad_output, input, grid, _kernels.NULL if scattered is None else scattered,
                                 _kernels.NULL if grad_grid is None else grad_grid), (N, C, H, W, Ho, Wo), options)
            if deterministic and grad_input is not None:
                _kernels.launch(call.backend, FAMILY, "grid_sample_backward_input_deterministic", input.dtype,
                                N * C, (grad_output, grid, grad_input), (N, C, H, W, Ho, Wo), options)
            if grad_input is not None:
                grad_input = grad_input.astype(input.dtype, copy=False)
    return GridSampleGrads(*(None if g is None else call.export(g) for g in (grad_input, grad_grid)))


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _align_options(**fixed):
    return tuple(dict(fixed, align_corners=a) for a in (False, True))


testing.register(testing.OpCheck(
    name="affine_grid",
    make_inputs=lambda rng, options: {"theta": rng.standard_normal((options["size"][0], 2, 3))},
    forward=affine_grid,
    backward=affine_grid_backward,
    options=_align_options(size=(3, 2, 5, 7))))

testing.register(testing.OpCheck(
    name="grid_sample",
    make_inputs=lambda rng, options: {"input": rng.standard_normal((2, 3, 7, 9)),
                                      "grid": rng.uniform(-1.2, 1.2, (2, 5, 6, 2))},
    forward=grid_sample,
    backward=grid_sample_backward,
    options=tuple(o for mode in MODES for padding_mode in PADDING_MODES
                  for o in _align_options(mode=mode, padding_mode=padding_mode))))
