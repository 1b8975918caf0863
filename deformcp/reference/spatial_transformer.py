"""The NumPy path of the Spatial Transformer ops (affine_grid, grid_sample): the float64 reference of
kernels/spatial_transformer.cu. ``cfg`` is the op's checked configuration (deformcp.ops.spatial_transformer).

grid_sample reads images padded with PAD zero pixels on every side (:func:`padded`), its sample coordinates clamped
to [-PAD, size] first: every corner of a bilinear sample with -1 ≤ x < W and -1 ≤ y < H is a pixel of the padded
image (0 outside the image), and a sample the clamp moved reads only zeros, as it should. A chunk's samples are then
planned (:func:`plan`) as flat pixel indices and weights, with no mask per corner. Two formulations read a plan:
the direct gather of each sample's pixels from the channels-first images (:func:`sample`, :func:`scatter`), for
nearest sampling and for few channels (DIRECT_MAX_CHANNELS), and the sparse sampling matrix S against the
channels-last images (S @ X, S.T @ G: _bilinear), whose cost of building is shared by many channels. Both add a
sample's corner products in the same order. Chunks run on the thread pool (_bilinear.for_each_chunk); the backward
adds an image's chunks into its input gradient in order, so results do not depend on the threads.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeAlias, Union, overload

import numpy as np
import numpy.typing as npt

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear

if TYPE_CHECKING:
    import scipy.sparse

    from ..ops.spatial_transformer import AffineGridConfig, GridSampleConfig

#: Channels up to which grid_sample's NumPy path samples bilinearly by the direct gather, above which by the
#: sparse matrix. Measured on the 2-core AMD EPYC VM, one thread, float32, CPU time of direct ÷ sparse, forward /
#: forward+backward: 8×C×56×56: C = 4 0.40 / 0.69, C = 8 0.66 / 0.96, C = 12 0.97 / 1.15, C = 16 1.23 / 1.15,
#: C = 24 1.31 / 1.31; 2×C×128×128: C = 8 0.99 / 0.97, C = 12 1.12 / 1.05; 32×C×28×28: C = 8 1.03 / 1.01,
#: C = 12 1.19 / 1.14. Nearest sampling always gathers directly: 0.5–0.9× the sparse product's time at every C from
#: 1 to 128 (8×C×56×56 and 1×C×256×256).
DIRECT_MAX_CHANNELS = 8
#: Bytes of one chunk of samples on the direct path (an estimate: their plan, and their pixels' values, products
#: and results). Of 0.25, 1, 4 and 16 MiB, 4 MiB was within 20 % of the fastest for each of 32×1×28×28, 8×3×56×56,
#: 1×3×1024×1024 and 1×1×2048×2048 (one thread, forward and forward+backward); smaller chunks cost NumPy's
#: per-call time, larger ones give the thread pool fewer chunks.
POINT_CHUNK_BYTES = 4 << 20
#: grid_sample's NumPy path keeps the plans of its last forward on a grid of at most PLAN_CACHE_POINTS points (at
#: most 8 MiB, with a copy of the grid): a backward on a bitwise-equal grid and the same options (autograd's, after
#: its forward) reads them instead of planning again.
PLAN_CACHE_POINTS = 1 << 16
#: A chunk of grid_sample's points (n0, n1, p0, p1), as the workers get it (*chunk): images [n0, n1), points
#: [p0, p1) of each.
_Chunk: TypeAlias = tuple[int, ...]
# ((options, direct), grid copy, {chunk: Plan})
_last_plans: tuple[tuple[object, ...], Optional[npt.NDArray[Any]], dict[_Chunk, Plan]] = ((), None, {})


def _base_axis(n: int, align_corners: bool, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """(n,) normalised coordinates of the pixels along one axis of affine_grid's base grid."""
    if n <= 1:
        return np.zeros(n, dtype)
    return (2 * np.arange(n, dtype=dtype) - (n - 1)) / (n - 1 if align_corners else n)


def affine_grid(theta: npt.NDArray[Any], cfg: AffineGridConfig) -> npt.NDArray[Any]:
    """theta (N, 2, 3) → grid (N, H, W, 2): (θ_r0 · x + θ_r1 · y) + θ_r2, in the kernels' order. The terms are
    made per column and per row, and added as complex numbers x + iy, which NumPy adds part by part: one
    broadcast sum writes the (x, y) pairs. Volumes: :func:`_affine_grid_3d`."""
    if cfg.volumetric:
        return _affine_grid_3d(theta, cfg)
    N, H, W = cfg.N, cfg.H, cfg.W
    if N == 0:  # no base grid to build
        return np.empty((0, H, W, 2), theta.dtype)
    dtype = compute_dtype(theta.dtype)
    t = theta.astype(dtype, copy=False)
    pair = np.dtype(np.complex64 if dtype == np.float32 else np.complex128)
    x = np.multiply(_base_axis(W, cfg.align_corners, dtype)[:, None], t[:, None, :, 0], order="C").view(pair)
    y = np.multiply(_base_axis(H, cfg.align_corners, dtype)[:, None], t[:, None, :, 1], order="C").view(pair)
    grid: npt.NDArray[Any] = np.add(x[:, None, :, 0], y, order="C")  # (N, 1, W) + (N, H, 1)
    grid += np.ascontiguousarray(t[:, :, 2]).view(pair)[:, :, None]
    return grid.view(dtype).reshape(N, H, W, 2).astype(theta.dtype, copy=False)


def _affine_grid_3d(theta: npt.NDArray[Any], cfg: AffineGridConfig) -> npt.NDArray[Any]:
    """theta (N, 3, 4) → grid (N, D, H, W, 3): ((θ_r0 · x + θ_r1 · y) + θ_r2 · z) + θ_r3, in the kernels' order."""
    dtype = compute_dtype(theta.dtype)
    t = theta.astype(dtype, copy=False)
    x, y, z = (_base_axis(n, cfg.align_corners, dtype)[:, None] * t[:, None, :, axis]  # (N, n, 3)
               for axis, n in enumerate((cfg.W, cfg.H, cfg.D)))
    grid: npt.NDArray[Any] = x[:, None, None] + y[:, None, :, None] + z[:, :, None, None] + t[:, None, None, None, :, 3]
    return grid.astype(theta.dtype, copy=False)


def affine_grid_backward(grad_output: npt.NDArray[Any], theta: npt.NDArray[Any], cfg: AffineGridConfig,
                         wanted: tuple[bool]) -> tuple[npt.NDArray[Any]]:
    """grad_output (N, H, W, 2) → (grad_theta (N, 2, 3),): Σ over the grid of grad_output · (x, y, 1). One product
    sums over the rows, weighted by 1 and by y, then the columns are summed, weighted by x and by 1. Volumes:
    grad_output (N, D, H, W, 3) → (N, 3, 4), Σ of grad_output · (x, y, z, 1)."""
    if cfg.volumetric:
        dtype = compute_dtype(theta.dtype)
        g = grad_output.astype(dtype, copy=False)
        x, y, z = (_base_axis(n, cfg.align_corners, dtype) for n in (cfg.W, cfg.H, cfg.D))
        terms = [np.einsum("ndhwr,w->nr", g, x), np.einsum("ndhwr,h->nr", g, y), np.einsum("ndhwr,d->nr", g, z),
                 g.sum(axis=(1, 2, 3))]
        return (np.stack(terms, axis=-1).astype(theta.dtype, copy=False),)
    N, H, W = cfg.N, cfg.H, cfg.W
    if N == 0:
        return (np.empty((0, 2, 3), theta.dtype),)
    dtype = compute_dtype(theta.dtype)
    rows = np.stack([np.ones(H, dtype), _base_axis(H, cfg.align_corners, dtype)])
    over_rows = (rows @ grad_output.astype(dtype, copy=False).reshape(N, H, W * 2)).reshape(N, 2, W, 2)
    x = _base_axis(W, cfg.align_corners, dtype) @ over_rows[:, 0]
    y, one = over_rows[:, 1].sum(axis=1), over_rows[:, 0].sum(axis=1)
    return (np.stack([x, y, one], axis=-1).astype(theta.dtype, copy=False),)


# ---------------------------------------------------------------------------------------- grid_sample

def _source_coordinate(g: npt.NDArray[Any], size: npt.NDArray[Any], padding_mode: str, align_corners: bool
                       ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Pixel coordinates sampled for normalised grid values g (2, k), rows x and y, overwritten, over an image of
    ``size`` (2, 1) [[W], [H]] in g's dtype, and their derivatives with respect to g, (2, 1) or (2, k) (the kernels'
    grid_source_coordinate)."""
    x = g
    x += 1
    if align_corners:
        x /= 2
        x *= size - 1
        d = (size - 1) / 2
    else:
        x *= size
        x -= 1
        x /= 2
        d = size / 2
    return _pad(x, d, size, padding_mode, align_corners)


@overload
def _pad(x: npt.NDArray[Any], d: npt.NDArray[Any], size: npt.NDArray[Any], padding_mode: str, align_corners: bool
         ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
@overload
def _pad(x: npt.NDArray[Any], d: float, size: npt.NDArray[Any], padding_mode: str, align_corners: bool
         ) -> tuple[npt.NDArray[Any], Union[npt.NDArray[Any], float]]: ...
def _pad(x: npt.NDArray[Any], d: Union[npt.NDArray[Any], float], size: npt.NDArray[Any], padding_mode: str,
         align_corners: bool) -> tuple[npt.NDArray[Any], Union[npt.NDArray[Any], float]]:
    """Pixel coordinates x over an image of ``size`` pixels (broadcasting) after the padding mode (reflected, then
    clamped), and d times the padding's derivative (the kernels' grid_source_coordinate, cubic_tap)."""
    if padding_mode == "reflection":
        twice_low, twice_high = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
        low, span = twice_low / 2, (twice_high - twice_low) / 2
        distance = x - low
        sign = np.where(distance < 0, -1, 1).astype(x.dtype)
        distance = np.abs(distance)
        extra = np.fmod(distance, span)
        even = np.fmod(np.floor(distance / span), 2) == 0
        x = np.where(even, extra + low, span - extra + low)
        d = d * np.where(even, sign, -sign)
        one_pixel = span == 0  # align_corners over a 1-pixel axis: always that pixel
        x, d = np.where(one_pixel, 0, x), np.where(one_pixel, 0, d)
    if padding_mode != "zeros":
        below, above = x <= 0, x >= size - 1
        x = np.where(below, 0, np.where(above, size - 1, x)).astype(x.dtype)
        d = np.where(below | above, 0, d).astype(x.dtype)
    return x, d


#: Zero pixels around each image on grid_sample's NumPy path (:func:`padded`), on every side: two, so that the
#: corners of a sample clamped to -PAD or to size are all zeros.
PAD = 2


def padded(images: npt.NDArray[Any], dtype: np.dtype[Any], channels_last: bool) -> npt.NDArray[Any]:
    """(n, C, *S) images (S: (H, W), or (D, H, W) for volumes) in dtype with PAD zero pixels on every side, each
    image's Π(S + 2·PAD) pixels flat: (C, n·Π(S + 2·PAD)), or with channels_last (n·Π(S + 2·PAD), C)."""
    n, C, *S = images.shape
    inner, full = tuple(slice(PAD, s + PAD) for s in S), tuple(s + 2 * PAD for s in S)
    if channels_last:
        X = np.zeros((n, *full, C), dtype)
        np.copyto(X[(slice(None), *inner)], np.moveaxis(images, 1, -1))
        return X.reshape(-1, C)
    X = np.zeros((C, n, *full), dtype)
    np.copyto(X[(slice(None), slice(None), *inner)], images.swapaxes(0, 1))
    return X.reshape(C, -1)


def interior(X: npt.NDArray[Any], out: npt.NDArray[Any], channels_last: bool) -> None:
    """Write :func:`padded` images X without their borders into out (n, C, *S)."""
    n, C, *S = out.shape
    inner, full = tuple(slice(PAD, s + PAD) for s in S), tuple(s + 2 * PAD for s in S)
    if channels_last:
        np.copyto(out, np.moveaxis(X.reshape(n, *full, C)[(slice(None), *inner)], -1, 1))
    else:
        np.copyto(out, X.reshape(C, n, *full)[(slice(None), slice(None), *inner)].swapaxes(0, 1))


class Plan(NamedTuple):
    """Where the k samples of a chunk read in :func:`padded` images, and with what weights."""

    # (q, k) flat indices of the pixels each sample reads: q = m^d taps over d axes, the last coordinate's outermost
    # (bilinear: m = 2, the corners (y0, x0), (y0, x1), (y1, x0), (y1, x1), (z0, y0, x0), … for volumes; bicubic:
    # m = 4), or the nearest pixel (q = 1). The name hides tuple.index, unused here.
    index: npt.NDArray[Any]  # type: ignore[assignment]
    weight: Optional[npt.NDArray[Any]]           # (q, k) weights of the taps; None: nearest, weight 1
    axis_weight: Optional[npt.NDArray[Any]]      # (d, m, k) [x; y; (z)] × tap weights, whose products are weight
    axis_derivative: Optional[npt.NDArray[Any]]  # (d, m, k) or (d, m, 1): their derivatives wrt the pixel
                                                 # coordinates
    slope: npt.NDArray[Any]                      # (d, 1) or (d, k) derivatives of the pixel coordinates (x; y; (z))
                                                 # wrt the grid


@np.errstate(invalid="ignore")  # NaN and ±inf grid values are valid input
def plan(grid: npt.NDArray[Any], first_image: int, shape: tuple[int, ...], mode: str, padding_mode: str,
         align_corners: bool) -> Plan:
    """The plan of grid (n, k, d), the points of images first_image … first_image + n − 1 of the padded images of
    spatial shape ``shape`` ((H, W), or (D, H, W) for volumes, d = 3).

    A bilinear sample is zero unless -1 ≤ x < W and -1 ≤ y < H (NaN and ±inf fall in "unless"); at exactly -1
    it reads 0 · the first row (column), whose weight's derivative is taken from the right: torch's rule, and the
    kernels' bilinear_setup. A nearest sample rounds half to even and is zero outside the image. Coordinates are
    clamped to [-PAD, size] (NaN to -PAD) first: the samples that the clamp moves read only the zeros around the
    image, so no sample needs a mask. Bicubic: :func:`_cubic_plan`."""
    n, k, d = grid.shape
    size = np.array(shape[::-1], grid.dtype)[:, None]  # [[W], [H], ([D])]
    g = grid.reshape(n * k, d).T.copy()  # C order: the ufuncs' inner loops then run along the points
    x, slope = _source_coordinate(g, size, "zeros" if mode == "bicubic" else padding_mode, align_corners)
    if mode == "bicubic":
        return _cubic_plan(x, slope, shape, _image_starts(first_image, n, k, shape), padding_mode, align_corners)
    np.clip(x, -PAD, size, out=x)
    np.copyto(x, -PAD, where=np.isnan(x))
    if mode == "nearest":
        i = np.rint(x).astype(np.int64)  # the flat index in integers: exact past 2**24 pixels
        return Plan(_flat_index(i, first_image, n, shape)[None], None, None, None, slope)
    lower = np.floor(x)
    i = lower.astype(np.int64)
    upper = np.subtract(x, lower, out=x)  # the weight of the upper corner along each axis
    axis_weight = np.stack((1 - upper, upper), axis=1)
    index = _flat_index(i, first_image, n, shape) + _padded(shape).corners[:, None]
    return Plan(index, _tap_combinations(axis_weight, np.multiply), axis_weight, _bilinear_derivative(d, x.dtype),
                slope)


@functools.lru_cache(maxsize=None)
def _bilinear_derivative(d: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """(d, 2, 1): the bilinear weights' derivatives along each of d axes, (1 − t, t) → (−1, 1) (read only)."""
    derivative = np.array([-1, 1], dtype)[None, :, None].repeat(d, axis=0)
    derivative.flags.writeable = False
    return derivative


def _tap_combinations(per_axis: npt.NDArray[Any], combine: np.ufunc) -> npt.NDArray[Any]:
    """(m^d, k): ``combine`` (np.multiply for weights, np.add for offsets, np.logical_and for masks) of the d axes'
    (m, k) values per tap (d, m, k) over every combination of taps, the last axis's taps outermost."""
    combined: npt.NDArray[Any] = per_axis[-1]
    for values in per_axis[-2::-1]:
        combined = combine(combined[:, None], values[None, :]).reshape(-1, combined.shape[-1])
    return combined


class _Padded(NamedTuple):
    """The flat layout of padded images of one spatial shape."""

    strides: tuple[int, ...]   # of x, y, (z)
    image: int                 # pixels of one padded image
    origin: int                # flat index of pixel (0, …, 0) in the first padded image
    corners: npt.NDArray[Any]  # (2^d,) int64 offsets of a bilinear sample's corners from its lower one, last axis
                               # outermost


@functools.lru_cache(maxsize=64)
def _padded(shape: tuple[int, ...]) -> _Padded:
    """The layout of padded images of spatial shape ``shape`` (array order); cached: a call's fixed cost."""
    full = [s + 2 * PAD for s in shape[::-1]]  # x first
    strides = tuple(int(np.prod(full[:axis])) for axis in range(len(full)))
    corners = np.array(list(itertools.product((0, 1), repeat=len(full))))[:, ::-1] @ np.array(strides)
    return _Padded(strides, int(np.prod(full)), PAD * sum(strides), corners.astype(np.int64))


def _cubic_weights(t: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Keys' cubic convolution weights (A = −0.75, as torch) of the taps floor(x) − 1 … floor(x) + 2 at
    t = x − floor(x) (any shape), and their derivatives with respect to t: two arrays (4, *t.shape)."""
    a, d0, d1, d2 = -0.75, t + 1, t, 1 - t
    d3 = d2 + 1
    weight = np.stack([((a * d0 - 5 * a) * d0 + 8 * a) * d0 - 4 * a, ((a + 2) * d1 - (a + 3)) * d1 * d1 + 1,
                       ((a + 2) * d2 - (a + 3)) * d2 * d2 + 1, ((a * d3 - 5 * a) * d3 + 8 * a) * d3 - 4 * a])
    derivative = np.stack([(3 * a * d0 - 10 * a) * d0 + 8 * a, (3 * (a + 2) * d1 - 2 * (a + 3)) * d1,
                           -((3 * (a + 2) * d2 - 2 * (a + 3)) * d2), -((3 * a * d3 - 10 * a) * d3 + 8 * a)])
    return weight.astype(t.dtype, copy=False), derivative.astype(t.dtype, copy=False)


@np.errstate(invalid="ignore")
def _cubic_plan(x: npt.NDArray[Any], slope: npt.NDArray[Any], shape: tuple[int, ...], starts: npt.NDArray[Any],
                padding_mode: str, align_corners: bool) -> Plan:
    """The bicubic (tricubic for volumes) plan at pixel coordinates x (d, k) [x; y; (z)], not padded, of the padded
    images of spatial shape ``shape`` whose pixel (0, …, 0) is at the flat indices starts (k,): the taps
    floor(x) − 1 … floor(x) + 2 per axis, each padded by the padding mode (torch's rule; the kernels'
    cubic_axis_setup). A tap outside the image, and every tap of a sample at a NaN coordinate (or ±inf but with
    border padding, where a coordinate beyond the taps' reach reads the border pixels), reads a zero pixel of the
    padding."""
    size = np.array(shape[::-1], x.dtype)[:, None]
    if padding_mode == "border":
        np.clip(x, -2, size + 1, out=x)  # NaN stays NaN
    sampled = np.isfinite(x).all(axis=0)
    x = np.where(sampled, x, 0)
    base = np.floor(x)
    axis_weight, axis_derivative = (w.transpose(1, 0, 2) for w in _cubic_weights(x - base))  # (d, 4, k)
    taps, _ = _pad(base[:, None] + np.arange(-1, 3, dtype=x.dtype)[:, None], 0, size[:, :, None], padding_mode,
                   align_corners)
    inside = (taps >= 0) & (taps <= size[:, :, None] - 1)  # NaN: False
    offsets = np.where(inside, taps, 0).astype(np.int64) * np.array(_padded(shape).strides)[:, None, None]
    index = _tap_combinations(offsets, np.add) + starts
    read = _tap_combinations(inside, np.logical_and) & sampled
    first = starts - _padded(shape).origin  # the padded image's first pixel: a zero
    np.copyto(index, first, where=~read)
    return Plan(index, _tap_combinations(axis_weight, np.multiply), axis_weight, axis_derivative, slope)


def _image_starts(first_image: int, n: int, k: int, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Flat indices (n·k,) of pixel (0, …, 0) of each point's padded image, k points of n images from first_image on."""
    layout = _padded(shape)
    return np.repeat(first_image * layout.image + layout.origin + np.arange(n) * layout.image, k)


def _flat_index(i: npt.NDArray[Any], first_image: int, n: int, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Flat indices (n·k,) of the pixels i (d, n·k) [x; y; (z)] in n padded images from first_image on."""
    layout = _padded(shape)
    index: npt.NDArray[Any] = i[0] * layout.strides[0] if layout.strides[0] != 1 else i[0].copy()
    for axis in range(1, len(layout.strides)):
        index += i[axis] * layout.strides[axis]
    first = first_image * layout.image + layout.origin  # where pixel (0, …, 0) of the first image is
    if n == 1:
        index += first
        return index
    index.reshape(n, -1)[...] += first + np.arange(n).reshape(n, 1) * layout.image
    return index


def gather(X: npt.NDArray[Any], plan: Plan) -> npt.NDArray[Any]:
    """The values (C, q, k) that the samples read from the padded images X (C, ·)."""
    return X.take(plan.index, axis=1, mode="wrap")  # "wrap" skips the bounds check: the plan's are inside


def sample(X: npt.NDArray[Any], plan: Plan) -> npt.NDArray[Any]:
    """The samples (C, k) of the padded images X (C, ·)."""
    values = gather(X, plan)
    if plan.weight is None:
        return values[:, 0]
    samples: npt.NDArray[Any] = (values * plan.weight).sum(axis=1)  # the corners added in order, as S @ X does
    return samples


def scatter(grad_X: npt.NDArray[Any], plan: Plan, G: npt.NDArray[Any]) -> None:
    """Add the samples' gradients G (C, k) into the padded images' gradient grad_X (C, ·), in order."""
    values = G[:, None] if plan.weight is None else G[:, None] * plan.weight  # (C, q, k)
    index = plan.index.reshape(-1)
    for grad, value in zip(grad_X, values):  # np.add.at is fast for 1-D arrays only
        np.add.at(grad, index, value.reshape(-1))


def grid_gradient(dots: npt.NDArray[Any], plan: Plan, out: npt.NDArray[Any]) -> None:
    """Write the grid's gradient into out (k, d), from each tap's values dotted with the output gradient,
    dots (m^d, k): a tap's weight's derivative along an axis is that axis's weight's derivative times the other
    axes' weights."""
    assert plan.axis_weight is not None and plan.axis_derivative is not None  # not a nearest plan
    d, m = plan.axis_weight.shape[:2]
    taps = dots.reshape((m,) * d + (-1,))  # the last coordinate's taps outermost
    for axis in range(d):
        summed = taps
        for other in reversed(range(d)):  # the outermost tap axis first
            factor = (plan.axis_derivative if other == axis else plan.axis_weight)[other]
            summed = (summed * factor.reshape((m,) + (1,) * (summed.ndim - 2) + factor.shape[-1:])).sum(axis=0)
        np.multiply(summed, plan.slope[axis], out=out[:, axis])


def sampling_matrix(plan: Plan, n_columns: int) -> scipy.sparse.csr_matrix:
    """A bilinear plan as a CSR matrix over the rows of channels-last padded images (the sparse formulation)."""
    assert plan.weight is not None  # not a nearest plan: those are sampled directly
    return _bilinear.sampling_matrix(plan.index.T, plan.weight.T, n_columns)


def point_chunks(N: int, P: int, per_point: int) -> list[tuple[int, int, int, int]]:
    """Chunks (n0, n1, p0, p1), images [n0, n1) and points [p0, p1) of each, of at most about POINT_CHUNK_BYTES at
    per_point bytes a point and near-equal: whole images where one fits, else ranges of one image's points."""
    points = max(1, POINT_CHUNK_BYTES // per_point)
    if P <= points:
        return [(n0, n1, 0, P) for n0, n1 in _workspace.even_ranges(N, max(1, -(-N * P // points)))]
    return [(n, n + 1, p0, p1) for n in range(N) for p0, p1 in _workspace.even_ranges(P, -(-P // points))]


class _Setup(NamedTuple):
    """What both passes of grid_sample's NumPy path start from."""

    grid: npt.NDArray[Any]  # (N, P, d) in the compute dtype
    dtype: np.dtype[Any]    # the compute dtype
    direct: bool            # the direct gather (nearest, few channels), else the sparse matrix
    # (n0, n1, p0, p1): images [n0, n1), points [p0, p1) of each (all of them: sparse)
    chunks: list[tuple[int, int, int, int]]
    # the images' spatial shape, mode, padding_mode, align_corners for plan()
    options: tuple[tuple[int, ...], str, str, bool]

    def plan(self, chunk: _Chunk, known: dict[_Chunk, Plan], keep: Optional[dict[_Chunk, Plan]] = None) -> Plan:
        """The plan of a chunk: known[chunk] where there is one, else made now, and put in keep where given and the
        grid has at most PLAN_CACHE_POINTS points."""
        found = known.get(chunk)
        if found is None:
            n0, n1, p0, p1 = chunk  # the direct path's padded images are the whole batch, the sparse path's the chunk's
            found = plan(self.grid[n0:n1, p0:p1], n0 if self.direct else 0, *self.options)
            if keep is not None and self.grid.shape[0] * self.grid.shape[1] <= PLAN_CACHE_POINTS:
                keep[chunk] = found
        return found


def _setup(input: npt.NDArray[Any], grid: npt.NDArray[Any], cfg: GridSampleConfig) -> _Setup:
    N, C, *shape = input.shape
    dtype = compute_dtype(input.dtype)
    grid = grid.reshape(N, math.prod(grid.shape[1:-1]), len(shape)).astype(dtype, copy=False)
    direct = cfg.mode == "nearest" or C <= DIRECT_MAX_CHANNELS
    P = grid.shape[1]
    pixels = {"nearest": 1, "bilinear": 2, "bicubic": 4}[cfg.mode] ** len(shape)  # read per sample and channel
    chunks = (point_chunks(N, P, 40 * max(4, pixels) + 3 * pixels * C * dtype.itemsize) if direct
              else [(n0, n1, 0, P) for n0, n1 in _workspace.image_chunks(N, C, 1, math.prod(shape), dtype.itemsize)])
    return _Setup(grid, dtype, direct, chunks, (tuple(shape), cfg.mode, cfg.padding_mode, cfg.align_corners))


def _known_plans(s: _Setup) -> dict[_Chunk, Plan]:
    """The last forward's plans where its options and grid are s's, bit for bit; else none."""
    options, grid, plans = _last_plans
    if options != (s.options, s.direct) or grid is None or grid.shape != s.grid.shape or grid.dtype != s.grid.dtype:
        return {}
    bits = f"i{grid.dtype.itemsize}"
    return plans if np.array_equal(grid.view(bits), s.grid.view(bits)) else {}


def _keep_plans(s: _Setup, plans: dict[_Chunk, Plan]) -> None:
    """Keep a forward's plans (all of its chunks', or none) for the next backward."""
    global _last_plans
    if len(plans) == len(s.chunks):
        _last_plans = ((s.options, s.direct), s.grid.copy(), plans)


def grid_sample(input: npt.NDArray[Any], grid: npt.NDArray[Any], cfg: GridSampleConfig) -> npt.NDArray[Any]:
    """input (N, C, *S) sampled at grid (N, *S_out, d) → (N, C, *S_out); S: (H, W), or (D, H, W) with d = 3."""
    N, C = input.shape[:2]
    out_shape = (N, C, *grid.shape[1:-1])
    s = _setup(input, grid, cfg)
    out = np.empty((N, C, s.grid.shape[1]), s.dtype)
    if out.size == 0:
        return out.reshape(out_shape).astype(input.dtype)
    plans: dict[_Chunk, Plan] = {}  # kept for the next backward
    if s.direct:
        X = padded(input, s.dtype, channels_last=False)

        def work(*chunk: int) -> None:
            n0, n1, p0, p1 = chunk
            samples = sample(X, s.plan(chunk, {}, plans))
            out[n0:n1, :, p0:p1] = samples.reshape(C, n1 - n0, p1 - p0).transpose(1, 0, 2)
    else:
        def work(*chunk: int) -> None:
            X = padded(input[chunk[0]:chunk[1]], s.dtype, channels_last=True)
            S = sampling_matrix(s.plan(chunk, {}, plans), X.shape[0])
            _bilinear.to_channels_first(S @ X, out[chunk[0]:chunk[1]])

    _bilinear.for_each_chunk(work, s.chunks)
    _keep_plans(s, plans)
    return out.reshape(out_shape).astype(input.dtype, copy=False)


def grid_sample_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], grid: npt.NDArray[Any],
                         cfg: GridSampleConfig, wanted: tuple[bool, bool]) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """(grad_input, grad_grid), None where not wanted."""
    want_input, want_grid = wanted
    N, C = input.shape[:2]
    s = _setup(input, grid, cfg)
    grad_output = grad_output.reshape(N, C, s.grid.shape[1])
    grad_input = np.zeros(input.shape, s.dtype) if want_input else None
    grad_grid = np.zeros(s.grid.shape, s.dtype) if want_grid else None
    want_grid = want_grid and cfg.mode != "nearest"  # nearest: the grid gradient is 0
    if (want_input or want_grid) and grad_output.size:
        (_direct_backward if s.direct else _sparse_backward)(s, _known_plans(s), grad_output, input, grad_input,
                                                             grad_grid if want_grid else None)
    return tuple(None if g is None else g.reshape(shape).astype(input.dtype, copy=False)
                 for g, shape in ((grad_input, input.shape), (grad_grid, grid.shape)))


def _direct_backward(s: _Setup, known: dict[_Chunk, Plan], grad_output: npt.NDArray[Any], input: npt.NDArray[Any],
                     grad_input: Optional[npt.NDArray[Any]], grad_grid: Optional[npt.NDArray[Any]]) -> None:
    """The direct formulation's gradients, written into grad_input and grad_grid (None: not wanted). The input
    gradient of an image is added chunk by chunk in order: images run in parallel, each one's chunks in turn."""
    N, C, *shape = input.shape
    X = padded(input, s.dtype, channels_last=False) if grad_grid is not None else None
    grad_X = np.zeros((C, N * _padded(tuple(shape)).image), s.dtype) if grad_input is not None else None

    def work(*chunk: int) -> None:
        n0, n1, p0, p1 = chunk
        p = s.plan(chunk, known)
        G = grad_output[n0:n1, :, p0:p1].transpose(1, 0, 2).reshape(C, -1).astype(s.dtype, copy=False)
        if grad_X is not None:
            scatter(grad_X, p, G)
        if X is not None and grad_grid is not None:
            dots = (gather(X, p) * G[:, None]).sum(axis=0)
            grid_gradient(dots, p, grad_grid[n0:n1, p0:p1].reshape(-1, len(shape)))

    def same_images(*chunks: _Chunk) -> None:
        for chunk in chunks:
            work(*chunk)

    groups = [tuple(group) for _, group in itertools.groupby(s.chunks, lambda chunk: chunk[:2])]
    _bilinear.for_each_chunk(same_images, groups)
    if grad_input is not None and grad_X is not None:
        interior(grad_X, grad_input, channels_last=False)


def _sparse_backward(s: _Setup, known: dict[_Chunk, Plan], grad_output: npt.NDArray[Any], input: npt.NDArray[Any],
                     grad_input: Optional[npt.NDArray[Any]], grad_grid: Optional[npt.NDArray[Any]]) -> None:
    """The sparse formulation's gradients, written into grad_input and grad_grid (None: not wanted)."""
    C = input.shape[1]

    def work(*chunk: int) -> None:
        a, b = chunk[:2]
        p = s.plan(chunk, known)
        G = grad_output[a:b].transpose(0, 2, 1).reshape(-1, C).astype(s.dtype, copy=False)
        X = padded(input[a:b], s.dtype, channels_last=True)
        if grad_input is not None:
            interior(sampling_matrix(p, X.shape[0]).T @ G, grad_input[a:b], channels_last=True)
        if grad_grid is not None:
            dots = np.vecdot(X.take(p.index, axis=0), G)  # (4, k): each corner's values · G
            grid_gradient(dots, p, grad_grid[a:b].reshape(-1, grad_grid.shape[-1]))

    _bilinear.for_each_chunk(work, s.chunks)
