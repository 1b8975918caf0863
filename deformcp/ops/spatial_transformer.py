"""Spatial Transformer Networks: the affine grid generator and the grid sampler, forward and backward.

Jaderberg et al., "Spatial Transformer Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02025.
Semantics are those of torch.nn.functional.affine_grid and grid_sample (2-D images and 3-D volumes). Kernels:
kernels/spatial_transformer.cu.
NumPy path: deformcp.reference.spatial_transformer.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import spatial_transformer as reference
from ._call import backward, forward
from ._spec import Case, OpSpec

FAMILY = "spatial_transformer"
MODES = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")


class AffineGridGrads(NamedTuple):
    """Gradients of :func:`affine_grid`."""

    theta: Optional[Array]


class GridSampleGrads(NamedTuple):
    """Gradients of :func:`grid_sample`; a field is None where it was not asked for."""

    input: Optional[Array]
    grid: Optional[Array]


# ---------------------------------------------------------------------------------------- affine_grid

class AffineGridConfig(NamedTuple):
    N: int
    D: int  # 1 for 2-D grids
    H: int
    W: int
    align_corners: bool
    volumetric: bool  # theta (N, 3, 4), a grid (N, D, H, W, 3)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.N, self.D, self.H, self.W) if self.volumetric else (self.N, self.H, self.W)

    @property
    def kernel(self) -> str:
        """The kernels' name prefix."""
        return "affine_grid_3d" if self.volumetric else "affine_grid"


def _check_affine_grid(call: _dispatch.Call, theta: Imported, size: Sequence[int], align_corners: bool
                       ) -> AffineGridConfig:
    _validate.floating("theta", theta, 3, "(N, 2, 3) or, for volumes, (N, 3, 4)")
    volumetric = tuple(theta.shape[1:]) == (3, 4)
    if not volumetric and tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"theta: expected shape (N, 2, 3) or, for volumes, (N, 3, 4), got {tuple(theta.shape)}")
    layout = "(N, C, D, H, W)" if volumetric else "(N, C, H, W)"
    size = _validate.sizes("size", size, 5 if volumetric else 4)
    if size[0] != theta.shape[0]:
        raise ValueError(f"size: expected N = {theta.shape[0]} (theta's batch) in size {layout}, got {size}")
    cfg = AffineGridConfig(size[0], size[2] if volumetric else 1, size[-2], size[-1],
                           _validate.flag("align_corners", align_corners), volumetric)
    _validate.output_fits("size", _affine_grid_output(cfg)[0], theta.dtype)
    return cfg


def _affine_grid_output(cfg: AffineGridConfig) -> tuple[tuple[int, ...], str]:
    if cfg.volumetric:
        return (cfg.N, cfg.D, cfg.H, cfg.W, 3), "(N, D, H, W, 3)"
    return (cfg.N, cfg.H, cfg.W, 2), "(N, H, W, 2)"


def _affine_grid_kernels(call: _dispatch.Call, theta: Imported, cfg: AffineGridConfig) -> Imported:
    xp = call.xp
    theta = xp.ascontiguousarray(theta)
    out = _kernels.empty(xp, _affine_grid_output(cfg)[0], theta.dtype)
    _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_forward", theta.dtype, cfg.N * cfg.D * cfg.H * cfg.W,
                    (theta, out), cfg.sizes, (cfg.align_corners,))
    return out


def _affine_grid_kernels_backward(call: _dispatch.Call, grad_output: Imported, theta: Imported, cfg: AffineGridConfig,
                                  wanted: tuple[bool], deterministic: bool) -> tuple[Imported]:
    xp = call.xp
    grad_output = xp.ascontiguousarray(grad_output)
    grad_theta = _kernels.empty(xp, theta.shape, theta.dtype)
    _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_backward", theta.dtype, theta.size,
                    (grad_output, grad_theta), cfg.sizes, (cfg.align_corners,))
    return (grad_theta,)


def affine_grid(theta: ArrayLike, size: Sequence[int], align_corners: bool = False) -> Array:
    """Sampling grid of a batch of affine transforms: ``(x_s, y_s) = theta · (x_t, y_t, 1)``, or for volumes
    ``(x_s, y_s, z_s) = theta · (x_t, y_t, z_t, 1)``.

    Args:
        theta (array[N, 2, 3] or array[N, 3, 4]): affine matrices mapping output (target) to input (source)
            coordinates, both normalised to [-1, 1].
        size (sequence[int] of 4 or 5): the output size (N, C, H, W), or (N, C, D, H, W) with theta (N, 3, 4);
            C is not used.
        align_corners (bool): if True, -1 and 1 are the centres of the corner pixels; if False, their
            outer edges, so the grid is resolution-independent. Default: False.

    Returns:
        array[N, H, W, 2] or array[N, D, H, W, 3]: the grid, last axis (x, y) or (x, y, z) — ready for
        :func:`grid_sample`.

    Same as torch.nn.functional.affine_grid for 4-D and 5-D sizes. Jaderberg et al., "Spatial Transformer
    Networks", NeurIPS 2015, https://arxiv.org/abs/1506.02025 (eq. 1).

    >>> import numpy as np, deformcp
    >>> theta = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])   # identity
    >>> grid = deformcp.affine_grid(theta, (1, 3, 4, 5))
    >>> grid.shape
    (1, 4, 5, 2)
    >>> print(grid[0, 0, 0], grid[0, -1, -1])                     # (x, y) of the corner pixels' centres
    [-0.8  -0.75] [0.8  0.75]

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(AFFINE_GRID, locals())


def affine_grid_backward(grad_output: ArrayLike, theta: ArrayLike, size: Sequence[int],
                         align_corners: bool = False) -> AffineGridGrads:
    """Gradient of :func:`affine_grid` with respect to theta.

    Args:
        grad_output (array[N, H, W, 2] or array[N, D, H, W, 3]): gradient of the loss with respect to the grid.
        theta (array[N, 2, 3] or array[N, 3, 4]), size, align_corners: as given to :func:`affine_grid`.

    Returns:
        AffineGridGrads: ``theta`` (theta's shape). Deterministic on every backend.
    """
    return AffineGridGrads(*backward(AFFINE_GRID, locals()))


# ---------------------------------------------------------------------------------------- grid_sample

class GridSampleConfig(NamedTuple):
    N: int
    C: int
    shape: tuple[int, ...]      # the input's spatial shape: (H, W), or (D, H, W) for volumes
    out_shape: tuple[int, ...]  # the output's: (H_out, W_out) or (D_out, H_out, W_out)
    mode: str
    padding_mode: str
    align_corners: bool

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.N, self.C, *self.shape, *self.out_shape)

    @property
    def points(self) -> int:
        """Output locations: N · Π out_shape."""
        return self.N * math.prod(self.out_shape)

    @property
    def kernel(self) -> str:
        """The kernels' name prefix."""
        return "grid_sample_3d" if len(self.shape) == 3 else "grid_sample"

    @property
    def options(self) -> tuple[int, int, bool]:
        """The kernels' option arguments."""
        return (MODES.index(self.mode), PADDING_MODES.index(self.padding_mode), self.align_corners)


def _check_grid_sample(call: _dispatch.Call, input: Imported, grid: Imported, mode: str, padding_mode: str,
                       align_corners: bool) -> GridSampleConfig:
    volumetric = len(getattr(input, "shape", ())) == 5
    layout, grid_layout, axes = (("(N, C, D, H, W)", "(N, D_out, H_out, W_out, 3)", "(x, y, z)") if volumetric
                                 else ("(N, C, H, W)", "(N, H_out, W_out, 2)", "(x, y)"))
    _validate.floating("input", input, 5 if volumetric else 4, layout if volumetric else "(N, C, H, W) or, for "
                       "volumes, (N, C, D, H, W)")
    if volumetric and len(getattr(grid, "shape", (0,) * 5)) != 5:
        raise ValueError(f"grid: expected a 5-D array {grid_layout} for input {layout} of shape "
                         f"{tuple(input.shape)}, got shape {tuple(grid.shape)}")
    _validate.floating("grid", grid, 5 if volumetric else 4, grid_layout)
    d = len(input.shape) - 2
    if grid.shape[-1] != d:
        raise ValueError(f"grid: expected the last axis to hold {axes}, size {d}, in {grid_layout}, "
                         f"got shape {tuple(grid.shape)}")
    if grid.shape[0] != input.shape[0]:
        raise ValueError(f"grid: expected batch size N = {input.shape[0]} (input's), "
                         f"got {grid.shape[0]} in shape {tuple(grid.shape)}")
    if 0 in input.shape[2:]:
        raise ValueError(f"input: expected non-empty spatial size in {layout}, got {tuple(input.shape)}")
    _validate.same_dtype(input=input, grid=grid)
    _validate.choice("mode", mode, MODES)
    _validate.choice("padding_mode", padding_mode, PADDING_MODES)
    align_corners = _validate.flag("align_corners", align_corners)
    N, C = input.shape[:2]
    return GridSampleConfig(N, C, tuple(input.shape[2:]), tuple(grid.shape[1:-1]), mode, padding_mode, align_corners)


def _grid_sample_output(cfg: GridSampleConfig) -> tuple[tuple[int, ...], str]:
    if len(cfg.shape) == 3:
        return (cfg.N, cfg.C, *cfg.out_shape), "(N, C, D_out, H_out, W_out)"
    return (cfg.N, cfg.C, *cfg.out_shape), "(N, C, H_out, W_out)"


def _grid_sample_kernels(call: _dispatch.Call, input: Imported, grid: Imported, cfg: GridSampleConfig) -> Imported:
    xp = call.xp
    input, grid = xp.ascontiguousarray(input), xp.ascontiguousarray(grid)
    out = _kernels.empty(xp, _grid_sample_output(cfg)[0], input.dtype)
    _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_forward", input.dtype, cfg.points, (input, grid, out),
                    cfg.sizes, cfg.options)
    return out


def _grid_sample_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, grid: Imported,
                                  cfg: GridSampleConfig, wanted: tuple[bool, bool],
                                  deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    xp = call.xp
    want_input, want_grid = wanted
    grad_output, input, grid = (xp.ascontiguousarray(a) for a in (grad_output, input, grid))
    grad_input = grad_grid = None
    if want_input:  # summed in float32 for 16-bit input
        grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype))
    if want_grid:
        grad_grid = _kernels.empty(xp, grid.shape, grid.dtype)
    scattered = None if deterministic or grad_input is None else grad_input
    if scattered is not None or grad_grid is not None:
        _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_backward", input.dtype, cfg.points,
                        (grad_output, input, grid, _kernels.NULL if scattered is None else scattered,
                         _kernels.NULL if grad_grid is None else grad_grid), cfg.sizes, cfg.options)
    if deterministic and grad_input is not None:
        _kernels.launch(call.backend, FAMILY, f"{cfg.kernel}_backward_input_deterministic", input.dtype,
                        cfg.N * cfg.C, (grad_output, grid, grad_input), cfg.sizes, cfg.options)
    if grad_input is not None:
        grad_input = grad_input.astype(input.dtype, copy=False)
    return grad_input, grad_grid


def grid_sample(input: ArrayLike, grid: ArrayLike, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> Array:
    """Sample ``input`` at the normalised locations of ``grid``: ``V = Σ_nm U_nm k(x_s − m) k(y_s − n)``.

    Args:
        input (array[N, C, H, W]): the images.
        grid (array[N, H_out, W_out, 2]): sampling locations, last axis (x, y), normalised so that -1 and
            1 are the left/top and right/bottom of the image (see align_corners). Same dtype as input.
        mode (str): "bilinear" (k(d) = max(0, 1 − abs(d))), "nearest" (round half to even) or "bicubic"
            (Keys' cubic convolution with A = −0.75 over the 4×4 pixels around the location, as torch; for
            volumes tricubic, 4×4×4, which torch lacks).
            Default: "bilinear".
        padding_mode (str): what locations outside the image read. "zeros": 0 (bilinear corners and
            bicubic taps outside the image read 0); "border": the coordinate is clamped to the image;
            "reflection": it is reflected at the border (at the corner pixels' centres with align_corners,
            else their edges), then clamped. Bicubic sampling pads each of its 16 taps, not the location,
            as torch does. Default: "zeros".
        align_corners (bool): True: x = (g + 1) / 2 · (W − 1), -1 and 1 are the corner pixels' centres;
            False: x = ((g + 1) · W − 1) / 2, they are the corner pixels' outer edges. Default: False.

    Returns:
        array[N, C, H_out, W_out], input's dtype and framework.

    A grid value that is NaN samples 0 (and gets gradient 0) in every mode and padding mode; ±inf samples 0
    with zeros and reflection padding and the border pixels with border padding. Same as
    torch.nn.functional.grid_sample for 4-D input. Jaderberg et al., "Spatial Transformer Networks",
    NeurIPS 2015, https://arxiv.org/abs/1506.02025 (eq. 5, the bilinear kernel).

    >>> import numpy as np, deformcp
    >>> x = np.random.default_rng(0).random((1, 3, 8, 8))
    >>> theta = np.array([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])     # zoom in 2×
    >>> out = deformcp.grid_sample(x, deformcp.affine_grid(theta, x.shape))
    >>> out.shape
    (1, 3, 8, 8)
    >>> identity = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # samples every pixel's centre
    >>> bool(np.allclose(deformcp.grid_sample(x, deformcp.affine_grid(identity, x.shape)), x))
    True

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(GRID_SAMPLE, locals())


def grid_sample_backward(grad_output: ArrayLike, input: ArrayLike, grid: ArrayLike, mode: str = "bilinear",
                         padding_mode: str = "zeros", align_corners: bool = False,
                         needs_input_grad: Sequence[bool] = (True, True),
                         deterministic: bool = False) -> GridSampleGrads:
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
        by the padding (bilinear), and at NaN locations. The bilinear weights' derivative at an integer coordinate
        is taken from the right (the cell whose lower corner it is), as in PyTorch.

    """
    return GridSampleGrads(*backward(GRID_SAMPLE, locals()))


# ------------------------------------------------------------------------------------------- specs

def _align_options(**fixed: object) -> tuple[dict[str, object], ...]:
    return tuple(dict(fixed, align_corners=a) for a in (False, True))


def _grid_sample_inputs(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
    return {"input": rng.standard_normal((2, 3, 7, 9)), "grid": rng.uniform(-1.2, 1.2, (2, 5, 6, 2))}


def _grid_sample_volume_inputs(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
    return {"input": rng.standard_normal((2, 3, 4, 5, 6)), "grid": rng.uniform(-1.2, 1.2, (2, 3, 4, 5, 3))}


AFFINE_GRID = OpSpec(
    name="affine_grid", arrays=("theta",), grads=AffineGridGrads, check=_check_affine_grid,
    output=_affine_grid_output, reference=reference.affine_grid, reference_backward=reference.affine_grid_backward,
    kernels=_affine_grid_kernels, kernels_backward=_affine_grid_kernels_backward, function=affine_grid,
    backward=affine_grid_backward, batch=("theta",), batch_size="size",
    cases=tuple(Case(f"align_corners={o['align_corners']}", lambda rng: {"theta": rng.standard_normal((3, 2, 3))},
                     o) for o in _align_options(size=(3, 2, 5, 7)))
    + tuple(Case(f"volume-align_corners={o['align_corners']}", lambda rng: {"theta": rng.standard_normal((3, 3, 4))},
                 o) for o in _align_options(size=(3, 2, 4, 5, 6))))

GRID_SAMPLE = OpSpec(
    name="grid_sample", arrays=("input", "grid"), grads=GridSampleGrads, check=_check_grid_sample,
    output=_grid_sample_output, reference=reference.grid_sample, reference_backward=reference.grid_sample_backward,
    kernels=_grid_sample_kernels, kernels_backward=_grid_sample_kernels_backward, function=grid_sample,
    backward=grid_sample_backward, batch=("input", "grid"),
    cases=tuple(Case(f"{mode}-{padding_mode}-align_corners={o['align_corners']}", _grid_sample_inputs, o)
                for mode in MODES for padding_mode in PADDING_MODES
                for o in _align_options(mode=mode, padding_mode=padding_mode))
    + tuple(Case(f"volume-{mode}-{padding}-align_corners={align}", _grid_sample_volume_inputs,
                 {"mode": mode, "padding_mode": padding, "align_corners": align})
            for mode, padding, align in (("bilinear", "zeros", False), ("bilinear", "border", True),
                                         ("bilinear", "reflection", False), ("nearest", "reflection", True),
                                         ("bicubic", "zeros", True), ("bicubic", "reflection", False))))

SPECS = (AFFINE_GRID, GRID_SAMPLE)
