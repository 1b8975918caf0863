"""The NumPy path of map_coordinates and affine_transform (scipy.ndimage's conventions, orders 0, 1 and 3): the
float64 reference of kernels/ndimage.cu, vectorised over the points. ``cfg`` is the op's checked configuration
(deformcp.ops.ndimage).

Order 3 with ``prefilter`` samples SciPy's cubic B-spline coefficients (:func:`spline_coefficients`: "nearest" and
"grid-constant" input padded by :data:`PREPAD` first, then the recursive filter along each axis with the boundary
initialisation SciPy gives the mode); its input gradient goes through the exact transpose of those steps
(:func:`spline_coefficients_adjoint`).

Each point's taps are planned per axis (:func:`_axis_taps`: SciPy's folding of the coordinate by the mode, the
order's weights and their derivatives, the taps mapped into the input by the mode) and combined into flat
indices into an image followed by one cval element, which grid-constant taps outside the input read. The images of
a batch (the input's leading axes) share the taps. The forward gathers, the input gradient is a ``numpy.bincount``
of the weighted output gradient over those indices (a gather in a fixed order: deterministic), and the coordinate
gradient uses the same taps with the weights' derivatives, summed over the images in order.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeAlias

import numpy as np
import numpy.typing as npt

from .. import _workspace
from .._kernels import compute_dtype
from .._types import Imported
from . import _bilinear

if TYPE_CHECKING:
    from ..ops.ndimage import NdimageConfig

#: The cubic B-spline prefilter's pole, sqrt(3) − 2.
POLE = -0.267949192431122706472553658494127633
#: SciPy pads "nearest" ("edge") and "grid-constant" (cval) input by this much on every side before its prefilter.
PREPAD = 12
#: The prefilter's boundary initialisation for each mode, as SciPy's: the whole-sample symmetric ("mirror"), the
#: periodic ("wrap", period n) or the half-sample symmetric one ("reflect", with SciPy's causal initialisation,
#: which reads its partly accumulated first coefficient at the last term: not exactly symmetric).
FILTER_INIT = {"constant": "mirror", "mirror": "mirror", "wrap": "mirror", "grid-constant": "mirror",
               "grid-wrap": "wrap", "reflect": "reflect", "nearest": "reflect"}


class _Taps(NamedTuple):
    """The taps of every point, shape (P, T) with T = (order + 1)^ndim, in the kernels' order (axis 0 slowest)."""

    valid: npt.NDArray[np.bool_]  # (P,) False where the sample is cval
    # flat input index of each tap; input.size (the cval element) where it reads cval. The name hides tuple.index,
    # unused here.
    index: npt.NDArray[np.int64]  # type: ignore[assignment]
    weight: npt.NDArray[Any]      # product of the axes' weights
    dweight: list[npt.NDArray[Any]]  # per axis: the weight with that axis' factor replaced by its derivative


#: One axis' taps (:func:`_axis_taps`): valid (P,), tap indices, inside, weights and their derivatives (P, K).
_AxisTaps: TypeAlias = tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[Any],
                             npt.NDArray[Any]]
#: The gradients of a backward, None where not asked for.
_Gradients: TypeAlias = tuple[Optional[npt.NDArray[Any]], Optional[npt.NDArray[Any]]]


def _fold(c: npt.NDArray[Any], n: int, mode: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """SciPy's map_coordinate for the folding modes (mirror, reflect, wrap, grid-wrap): coordinates outside
    [0, n − 1] folded back, and dc'/dc (±1; 0 where n is 1)."""
    neg, pos = c < 0, c > n - 1
    if n <= 1:
        outside = neg | pos
        return np.where(outside, 0, c), np.where(outside, 0, 1).astype(c.dtype)
    one = np.ones_like(c)
    if mode == "mirror":
        s2 = 2 * n - 2
        cn = s2 * np.floor(-c / s2) + c
        low = cn <= 1 - n
        neg_c, neg_s = np.where(low, cn + s2, -cn), np.where(low, one, -one)
        cp = c - s2 * np.floor(c / s2)
        high = cp >= n
        pos_c, pos_s = np.where(high, s2 - cp, cp), np.where(high, -one, one)
    elif mode == "reflect":
        s2 = 2 * n
        cn = np.where(c < -s2, s2 * np.floor(-c / s2) + c, c)
        low = cn < -n
        neg_c, neg_s = np.where(low, cn + s2, -cn - 1), np.where(low, one, -one)
        cp = c - s2 * np.floor(c / s2)
        high = cp >= n
        pos_c, pos_s = np.where(high, s2 - cp - 1, cp), np.where(high, -one, one)
    elif mode == "wrap":
        s = n - 1
        neg_c, pos_c, neg_s = c + s * (np.floor(-c / s) + 1), c - s * np.floor(c / s), one
        pos_s = one
    else:  # grid-wrap
        neg_c, pos_c, neg_s = c + n * (np.trunc((-1 - c) / n) + 1), c - n * np.floor(c / n), one
        pos_s = one
    return np.where(neg, neg_c, np.where(pos, pos_c, c)), np.where(neg, neg_s, np.where(pos, pos_s, one))


def _tap_index(i: npt.NDArray[Any], n: int, mode: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Tap indices mapped into [0, n − 1] as SciPy maps them (constant and wrap: mirror), and whether each is
    inside (False: grid-constant's cval)."""
    inside = (i >= 0) & (i < n)
    if mode == "grid-constant":
        return np.where(inside, i, 0), inside
    if n <= 1:
        return np.zeros_like(i), np.ones_like(inside)
    if mode == "nearest":
        return np.clip(i, 0, n - 1), np.ones_like(inside)
    if mode == "grid-wrap":
        return i % n, np.ones_like(inside)
    period = 2 * n if mode == "reflect" else 2 * n - 2  # reflect: d c b a | a b c d; mirror: d c b | a b c d
    j = i % period
    return np.where(j >= n, period - j - (mode == "reflect"), j), np.ones_like(inside)


def _cubic(t: npt.NDArray[Any]) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]:
    """The cubic B-spline's four weights at t = c − floor(c) ∈ [0, 1) (SciPy's arithmetic, the last one 1 − the
    others) and their derivatives in t."""
    z = 1 - t
    w0, w1, w2 = z * z * z / 6, (t * t * (t - 2) * 3 + 4) / 6, (z * z * (z - 2) * 3 + 4) / 6
    return [w0, w1, w2, 1 - w0 - w1 - w2], [-z * z / 2, t * (1.5 * t - 2), -z * (1.5 * z - 2), t * t / 2]


@np.errstate(invalid="ignore", over="ignore")
def _axis_taps(c: npt.NDArray[Any], n: int, order: int, mode: str) -> _AxisTaps:
    """One axis: (valid (P,), tap indices (P, K), inside (P, K), weights (P, K), their derivatives (P, K)),
    K = order + 1; the kernels' ndimage_axis_setup."""
    valid = np.isfinite(c)
    slope = np.ones_like(c)
    if mode == "constant":
        valid &= (c >= 0) & (c <= n - 1)
    elif mode in ("nearest", "grid-constant"):
        reach = order // 2 + 2  # beyond it every tap is outside the input
        far = (c < -reach) | (c > n - 1 + reach)
        if mode == "grid-constant":
            valid &= ~far
        else:
            c = np.where(far, np.where(c < 0, -reach, n - 1 + reach), c)
            slope = np.where(far, 0, slope)
    else:
        c, slope = _fold(c, n, mode)
        c = np.clip(c, -1, n)
    c = np.where(valid, c, 0)
    start = np.floor(c + 0.5) if order == 0 else np.floor(c)
    t = c - start
    if order == 0:
        weight, dweight = np.ones_like(c)[:, None], np.zeros_like(c)[:, None]
    elif order == 1:
        weight, dweight = np.stack([1 - t, t], axis=1), np.stack([-slope, slope], axis=1)
    else:
        start = start - 1
        weights, derivatives = _cubic(t)
        weight, dweight = np.stack(weights, axis=1), np.stack(derivatives, axis=1) * slope[:, None]
    index, inside = _tap_index(start.astype(np.int64)[:, None] + np.arange(order + 1), n, mode)
    if mode == "grid-constant":
        valid &= inside.any(axis=1)
    return valid, index, inside, weight, dweight


def _taps(coordinates: npt.NDArray[Any], shape: tuple[int, ...], order: int, mode: str) -> _Taps:
    """coordinates (ndim, P) in the compute dtype → every point's taps over an input of ``shape``."""
    ndim, P = coordinates.shape
    K = order + 1
    axes = [_axis_taps(coordinates[a], n, order, mode) for a, n in enumerate(shape)]
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]

    def spread(a: int, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        # (P, K) of axis a → (P, 1, .., K, .., 1), K at position 1 + a
        return x.reshape((P,) + (1,) * a + (K,) + (1,) * (ndim - 1 - a))

    index = sum(spread(a, ax[1] * strides[a]) for a, ax in enumerate(axes))
    inside = functools.reduce(np.logical_and, [spread(a, ax[2]) for a, ax in enumerate(axes)])
    weights = [spread(a, ax[3]) for a, ax in enumerate(axes)]
    weight = functools.reduce(np.multiply, weights)
    dweight = []
    for a, ax in enumerate(axes):
        factors = weights[:a] + [spread(a, ax[4])] + weights[a + 1:]
        dweight.append(np.broadcast_to(functools.reduce(np.multiply, factors), (P,) + (K,) * ndim)
                       .reshape(P, K ** ndim))
    size = int(np.prod(shape))
    index = np.broadcast_to(np.where(inside, index, size), (P,) + (K,) * ndim).reshape(P, K ** ndim)
    valid = functools.reduce(np.logical_and, [ax[0] for ax in axes])
    return _Taps(valid, index, np.broadcast_to(weight, (P,) + (K,) * ndim).reshape(P, K ** ndim), dweight)


def _with_cval(values: npt.NDArray[Any], cval: float, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """values (B, *sampled axes) as (B, volume + 1) in dtype: each image flattened, then one cval element (what
    grid-constant taps outside read)."""
    flat = values.astype(dtype, copy=False).reshape(values.shape[0], math.prod(values.shape[1:]))
    return np.concatenate([flat, np.full((flat.shape[0], 1), cval, dtype)], axis=1)


# ------------------------------------------------------------------------------------------ the spline prefilter

def filter_constants(n: int, init: str) -> tuple[float, float, float, float, float, float, float]:
    """The boundary initialisations of the prefilter of a line of n ≥ 2 (kernels/ndimage.cu's
    ndimage_filter_setup): the causal pass starts from c_0 = α·Σ_{j ≤ n−2} z^j c_j + β·Σ_{j ≥ 1} z^(n−1−j) c_j
    + γ·c_(n−1) + δ·c_0, the anticausal one from c_(n−1) = ρ·c_(n−1) + σ·c_(n−2) + τ·Σ_{j ≤ n−2} z^(j+1) c_j;
    → (α, β, γ, δ, ρ, σ, τ)."""
    z = POLE
    zn1, zn = z ** (n - 1), z ** n
    if init == "mirror":
        d = 1 - zn1 * zn1
        return 1 / d, zn1 / d, 0.0, 0.0, z / (z * z - 1), z * z / (z * z - 1), 0.0
    if init == "wrap":
        d = 1 - zn
        return 0.0, z / d, 0.0, 1 / d, z / (zn - 1), 0.0, z / (zn - 1)
    e, f = z / (1 - zn * zn), 1 + zn * zn1  # reflect: SciPy's sum reads c_0 again at its last term
    return e * f, e * f * zn, e * zn1, 1.0, z / (z - 1), 0.0, 0.0


def _filter_weights(n: int, init: str, dtype: np.dtype[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(h, k) (n,): the causal pass starts from h @ c, the anticausal one from k @ c."""
    alpha, beta, gamma, delta, rho, sigma, tau = filter_constants(n, init)
    j = np.arange(n)
    z = POLE
    h = np.where(j <= n - 2, alpha * z ** j, 0) + np.where(j >= 1, beta * z ** (n - 1.0 - j), 0)
    h[n - 1] += gamma
    h[0] += delta
    k = np.where(j <= n - 2, tau * z ** (j + 1.0), 0)
    k[n - 1] += rho
    k[n - 2] += sigma
    return h.astype(dtype), k.astype(dtype)


def _recursion(c: npt.NDArray[Any], reverse: bool = False) -> npt.NDArray[Any]:
    """y_i = c_i + z·y_(i−1) along axis 0 (reverse: y_i = c_i + z·y_(i+1))."""
    from scipy.signal import lfilter
    x = c[::-1] if reverse else c
    y: npt.NDArray[Any] = lfilter([1.0], [1.0, -POLE], x, axis=0).astype(c.dtype, copy=False)
    return y[::-1] if reverse else y


def _filter_axis(c: npt.NDArray[Any], init: str, transpose: bool) -> npt.NDArray[Any]:
    """The prefilter (or its transpose) along axis 0 of c (n, L), n ≥ 2: gain, causal initialisation and pass,
    anticausal initialisation and pass (SciPy's apply_filter; the transpose runs the transposed steps in reverse)."""
    from scipy.signal import lfilter
    z, n = POLE, c.shape[0]
    h, k = _filter_weights(n, init, c.dtype)
    gain = c.dtype.type((1 - z) * (1 - 1 / z))
    if not transpose:
        c = c * gain
        c[0] = h @ c
        c = _recursion(c)
        c[n - 1] = k @ c
        # c_i = z·(c_(i+1) − c_i) from i = n − 2 down: the reversed line filtered from its first element
        r = c[::-1]
        tail = lfilter([-z], [1.0, -z], r[1:], axis=0, zi=z * r[:1])[0].astype(c.dtype, copy=False)
        return np.concatenate([r[:1], tail])[::-1]
    y = _recursion(c)
    c = np.concatenate([-z * y[:n - 1], y[n - 1:]]).astype(c.dtype, copy=False)
    t, c[n - 1] = c[n - 1].copy(), 0
    c = _recursion(c + k[:, None] * t, reverse=True)
    t, c[0] = c[0].copy(), 0
    out: npt.NDArray[Any] = (c + h[:, None] * t) * gain
    return out


def _filter(c: npt.NDArray[Any], mode: str, transpose: bool) -> npt.NDArray[Any]:
    """The prefilter along every sampled axis of c (B, *sampled axes) (the transpose: the axes in reverse order);
    lines of one element are left as they are, as SciPy leaves them."""
    axes = range(c.ndim - 1, 0, -1) if transpose else range(1, c.ndim)
    for axis in axes:
        if c.shape[axis] > 1:
            lines = np.moveaxis(c, axis, 0)
            out = _filter_axis(lines.reshape(lines.shape[0], -1), FILTER_INIT[mode], transpose)
            c = np.moveaxis(out.reshape(lines.shape), 0, axis)
    return np.ascontiguousarray(c)


def pad(xp: Any, x: Imported, npad: int, mode: str, cval: float) -> Imported:
    """x (B, *sampled axes) padded by npad on both sides of each sampled axis as SciPy pads before its prefilter:
    "nearest" by the edge values, "grid-constant" by cval (namespace xp)."""
    if npad == 0:
        return x
    widths = [(0, 0)] + [(npad, npad)] * (x.ndim - 1)
    if mode == "nearest":
        return xp.pad(x, widths, mode="edge")
    return xp.pad(x, widths, mode="constant", constant_values=cval)


def pad_adjoint(xp: Any, g: Imported, npad: int, mode: str) -> Imported:
    """The transpose of :func:`pad`'s linear part: the border cropped, for "nearest" after adding each padded
    slab onto the edge it copies (namespace xp)."""
    if npad == 0:
        return g
    if mode == "nearest":
        for axis in range(1, g.ndim):
            g = xp.moveaxis(g, axis, 0)
            inner = g[npad:-npad].copy()
            inner[0] += xp.sum(g[:npad], axis=0)
            inner[-1] += xp.sum(g[-npad:], axis=0)
            g = xp.moveaxis(inner, 0, axis)
        return g
    return g[(slice(None),) + (slice(npad, -npad),) * (g.ndim - 1)]


def spline_coefficients(input: npt.NDArray[Any], cfg: NdimageConfig) -> npt.NDArray[Any]:
    """SciPy's cubic spline coefficients of input (B, *shape) in its dtype: padded by cfg.npad, then filtered."""
    return _filter(pad(np, input, cfg.npad, cfg.mode, cfg.cval), cfg.mode, transpose=False)


def spline_coefficients_adjoint(grad: npt.NDArray[Any], cfg: NdimageConfig) -> npt.NDArray[Any]:
    """The transpose of :func:`spline_coefficients`' linear part: grad (B, *padded shape) → (B, *shape)."""
    return np.ascontiguousarray(pad_adjoint(np, _filter(grad, cfg.mode, transpose=True), cfg.npad, cfg.mode))


def _coefficients(input: npt.NDArray[Any], cfg: NdimageConfig, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """What the taps read in dtype, (B, *sampled axes): the spline coefficients of input when cfg prefilters, else
    input."""
    input = input.astype(dtype, copy=False).reshape((cfg.images, *cfg.shape))
    return spline_coefficients(input, cfg) if cfg.prefiltered else input


def _sampled(coordinates: npt.NDArray[Any], cfg: NdimageConfig, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """coordinates (ndim, ...) as (ndim, P) in dtype, shifted into the padded coefficients."""
    c = coordinates.astype(dtype, copy=False).reshape(len(cfg.shape), math.prod(coordinates.shape[1:]))
    return c + dtype.type(cfg.npad) if cfg.npad else c


def _point_ranges(P: int, images: int, cfg: NdimageConfig) -> list[tuple[int, int]]:
    """Chunks of the P points whose taps (index, weight, derivatives, a value per image) take about
    NDIMAGE_CHUNK_BYTES."""
    per_point = (cfg.order + 1) ** len(cfg.shape) * 8 * (3 + len(cfg.shape) + images)
    return _workspace.ranges(P, max(1, _workspace.NDIMAGE_CHUNK_BYTES // per_point))


def sample(input: npt.NDArray[Any], coordinates: npt.NDArray[Any], cfg: NdimageConfig) -> npt.NDArray[Any]:
    """input (*batch, *shape), coordinates (ndim, *out) in any float dtype → (*batch, *out) in input's dtype. The
    points in chunks on the thread pool."""
    dtype = compute_dtype(input.dtype)
    values = _coefficients(input, cfg, dtype)
    images = _with_cval(values, cfg.cval, dtype)  # (B, volume + 1)
    c = _sampled(coordinates, cfg, dtype)
    out = np.empty((len(images), c.shape[1]), dtype)

    def work(p0: int, p1: int) -> None:
        taps = _taps(c[:, p0:p1], values.shape[1:], cfg.order, cfg.mode)
        gathered = images[:, taps.index]  # (B, points, T)
        out[:, p0:p1] = np.where(taps.valid, np.sum(taps.weight * gathered, axis=2), dtype.type(cfg.cval))

    _bilinear.for_each_chunk(work, _point_ranges(c.shape[1], len(images), cfg))
    return out.reshape(cfg.batch + tuple(coordinates.shape[1:])).astype(input.dtype)


def _add_at(target: npt.NDArray[Any], index: npt.NDArray[Any], weights: npt.NDArray[Any]) -> None:
    """target[index] += weights, repeated indices added in order: a bincount over the span the indices cover
    where it is compact, else numpy.add.at."""
    if index.size == 0:
        return
    low, high = int(index.min()), int(index.max())
    if high - low < 8 * index.size:
        target[low:high + 1] += np.bincount(index - low, weights, minlength=high - low + 1)
    else:
        np.add.at(target, index, weights)


def sample_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], coordinates: npt.NDArray[Any],
                    cfg: NdimageConfig, want_input: bool, want_coordinates: bool) -> _Gradients:
    """→ (grad_input in input's dtype or None, grad_coordinates (ndim, P) in the compute dtype or None)."""
    dtype = compute_dtype(input.dtype)
    values = _coefficients(input, cfg, dtype)
    images = _with_cval(values, cfg.cval, dtype)  # (B, volume + 1)
    B, size = images.shape[0], images.shape[1] - 1
    c = _sampled(coordinates, cfg, dtype)
    G = grad_output.astype(dtype, copy=False).reshape(B, c.shape[1])
    # image b's element i at b·(size + 1) + i; the chunks added in order: deterministic
    grad_flat = np.zeros(B * (size + 1), dtype) if want_input else None
    grad_coordinates = np.empty(c.shape, dtype) if want_coordinates else None
    for p0, p1 in _point_ranges(c.shape[1], B, cfg):
        taps = _taps(c[:, p0:p1], values.shape[1:], cfg.order, cfg.mode)
        g = np.where(taps.valid, G[:, p0:p1], 0)  # (B, points)
        if grad_flat is not None:
            index = taps.index + (size + 1) * np.arange(B).reshape(B, 1, 1)
            _add_at(grad_flat, index.ravel(), (taps.weight * g[:, :, None]).ravel())
        if grad_coordinates is not None:
            tapped = np.zeros(taps.index.shape, dtype)  # (points, T): Σ_b value · g, the images in order
            for b in range(B):
                tapped += images[b][taps.index] * g[b][:, None]
            grad_coordinates[:, p0:p1] = [np.sum(d * tapped, axis=1) for d in taps.dweight]
    grad_input = None
    if grad_flat is not None:
        grad_input = grad_flat.reshape(B, size + 1)[:, :size].reshape(values.shape)
        if cfg.prefiltered:
            grad_input = spline_coefficients_adjoint(grad_input, cfg)
        grad_input = grad_input.astype(input.dtype).reshape(input.shape)
    return grad_input, grad_coordinates


# ----------------------------------------------------------------------------------------- map_coordinates

def map_coordinates(input: npt.NDArray[Any], coordinates: npt.NDArray[Any], cfg: NdimageConfig) -> npt.NDArray[Any]:
    return sample(input, coordinates, cfg)


def map_coordinates_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], coordinates: npt.NDArray[Any],
                             cfg: NdimageConfig, wanted: tuple[bool, bool]) -> _Gradients:
    want_input, want_coordinates = wanted
    grad_input, grad_coordinates = sample_backward(grad_output, input, coordinates, cfg, want_input,
                                                   want_coordinates)
    if grad_coordinates is not None:
        grad_coordinates = grad_coordinates.reshape(coordinates.shape).astype(coordinates.dtype)
    return grad_input, grad_coordinates


# ----------------------------------------------------------------------------------------- affine_transform

def transform(xp: Any, matrix: Imported, offset: Imported, ndim: int, dtype: np.dtype[Any]) -> Imported:
    """SciPy's forms of (matrix, offset) as one (ndim, ndim + 1) array [M | shift] in dtype (namespace xp): a
    diagonal (ndim,), a matrix (ndim, ndim) with offset () or (ndim,), or homogeneous (ndim, ndim + 1) and
    (ndim + 1, ndim + 1), whose last column is the shift (offset ignored). ValueError where a homogeneous
    matrix's bottom row is not [0, …, 0, 1], as SciPy requires (read on the host: the one check on values, made
    here, where every run starts, not in the argument checks, which deformcp.torch and deformcp.jax run on
    stand-ins without values)."""
    matrix, offset = matrix.astype(dtype), offset.astype(dtype)
    if matrix.ndim == 2 and matrix.shape[1] == ndim + 1:
        if matrix.shape[0] == ndim + 1:
            row = [float(v) for v in matrix[ndim].tolist()]
            if row != [0.0] * ndim + [1.0]:
                raise ValueError(f"matrix: expected the bottom row {[0] * ndim + [1]} of a homogeneous "
                                 f"({ndim + 1}, {ndim + 1}) matrix, got {row}")
        return xp.ascontiguousarray(matrix[:ndim])
    m = xp.diag(matrix) if matrix.ndim == 1 else matrix
    shift = xp.broadcast_to(offset, (ndim,))
    return xp.ascontiguousarray(xp.concatenate([m, shift[:, None]], axis=1))


def transform_gradients(xp: Any, grad: Imported, matrix: Imported, offset: Imported) -> tuple[Imported, Imported]:
    """The gradient of [M | shift] (ndim, ndim + 1) as the gradients of matrix and offset in their forms and
    dtypes (offset's is 0 where a homogeneous matrix ignores it)."""
    ndim = grad.shape[0]
    if matrix.ndim == 2 and matrix.shape[1] == ndim + 1:
        grad_matrix = grad
        if matrix.shape[0] == ndim + 1:
            grad_matrix = xp.concatenate([grad, xp.zeros((1, ndim + 1), grad.dtype)])
        grad_offset = xp.zeros(offset.shape, grad.dtype)
    else:
        grad_matrix = xp.diag(grad[:, :ndim]) if matrix.ndim == 1 else grad[:, :ndim]
        grad_offset = grad[:, ndim] if offset.ndim == 1 else xp.asarray(xp.sum(grad[:, ndim]))
    return grad_matrix.astype(matrix.dtype), grad_offset.astype(offset.dtype)


def _output_index(axis: int, out_shape: tuple[int, ...], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """The output index along one axis, shaped to broadcast over out_shape."""
    shape = [1] * len(out_shape)
    shape[axis] = out_shape[axis]
    return np.arange(out_shape[axis], dtype=dtype).reshape(shape)


def affine_coordinates(t: npt.NDArray[Any], out_shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """[M | shift] (ndim, ndim + 1) → coordinates (ndim, *out_shape): Σ_l o_l · M[h, l] + shift[h], summed in
    SciPy's order (the kernels' ndimage_affine_coordinates)."""
    ndim = len(out_shape)
    o = [_output_index(axis, out_shape, t.dtype) for axis in range(ndim)]
    rows = []
    for h in range(ndim):
        c = o[0] * t[h, 0]
        for axis in range(1, ndim):
            c = c + o[axis] * t[h, axis]
        rows.append(np.broadcast_to(c + t[h, ndim], out_shape))
    return np.stack(rows)


def affine_transform(input: npt.NDArray[Any], matrix: npt.NDArray[Any], offset: npt.NDArray[Any],
                     cfg: NdimageConfig) -> npt.NDArray[Any]:
    t = transform(np, matrix, offset, len(cfg.shape), compute_dtype(input.dtype))
    return sample(input, affine_coordinates(t, cfg.out_shape), cfg)


def affine_transform_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], matrix: npt.NDArray[Any],
                              offset: npt.NDArray[Any], cfg: NdimageConfig, wanted: tuple[bool, bool, bool]
                              ) -> tuple[Optional[npt.NDArray[Any]], Optional[npt.NDArray[Any]],
                                         Optional[npt.NDArray[Any]]]:
    want_input, want_matrix, want_offset = wanted
    dtype = compute_dtype(input.dtype)
    ndim = len(cfg.shape)
    t = transform(np, matrix, offset, ndim, dtype)
    grad_input, gc = sample_backward(grad_output, input, affine_coordinates(t, cfg.out_shape), cfg, want_input,
                                     want_matrix or want_offset)
    if gc is None:
        return grad_input, None, None
    gc = gc.astype(np.float64).reshape((ndim,) + tuple(cfg.out_shape))  # reduced in float64, as the kernels
    grad = np.empty((ndim, ndim + 1))
    for axis, n in enumerate(cfg.out_shape):
        others = tuple(b + 1 for b in range(ndim) if b != axis)
        grad[:, axis] = np.sum(gc, axis=others) @ np.arange(n, dtype=np.float64)
    grad[:, ndim] = np.sum(gc.reshape(ndim, math.prod(gc.shape[1:])), axis=1)
    grad_matrix, grad_offset = transform_gradients(np, grad, matrix, offset)
    return grad_input, grad_matrix if want_matrix else None, grad_offset if want_offset else None
