"""The NumPy path of RoIAlign (average and max), PS-RoIAlign and deformable RoI pooling: the float64 reference
of kernels/roi_align.cu. ``cfg`` is the op's checked configuration (deformcp.ops.roi_align).

Average pooling (RoIAlign, PS-RoIAlign) is separable: a bin's mean over its regular grid of samples is
a_yᵀ · X · a_x / count, where a_y sums the bilinear row weights of the bin's y-samples and a_x the column
weights of its x-samples (:func:`_axis_weights`). Its matrix (:func:`_average_matrix`) has one entry per
touched pixel instead of 4 corners per sample — the per-sample matrix (:func:`_bin_matrix`, still used by
deformable RoI pooling) with its duplicates summed, built from per-axis samples only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import numpy.typing as npt
import scipy.sparse

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear

if TYPE_CHECKING:
    from ..ops.roi_align import DeformRoIPoolConfig, RoIAlignConfig

#: A bin's samples along an axis are visited up to this index (the kernels' SAMPLE_INDEX_MAX, 2**62).
SAMPLE_INDEX_MAX = float(2**62)


class _Samples(NamedTuple):
    """Every sample of a chunk of RoIs, in kernel order (RoI, ph, pw, iy, ix): its four bilinear corners as
    rows of _bilinear.pixels_last(input) and weights, the bin it belongs to, and what max pooling and the
    coordinate gradients need."""

    rows: npt.NDArray[np.int64]          # (S, 4)
    weights: npt.NDArray[Any]            # (S, 4)
    # (S, 4): ∂weights/∂y, 0 where roi_sample clamps y (kernels' roi_sample_coordinate_grad)
    dweight_dy: npt.NDArray[Any]
    dweight_dx: npt.NDArray[Any]         # (S, 4)
    per_bin: npt.NDArray[np.int64]       # (R,) samples computed per bin, R = K·PH·PW
    # (R,) divisor of the average (the kernels' name; it hides tuple.count, unused here)
    count: npt.NDArray[Any]  # type: ignore[assignment]
    order: npt.NDArray[np.float64]       # (S,) position iy·samples_x + ix of each sample within its bin
    zero_order: npt.NDArray[np.float64]  # (R,) position of the bin's first skipped (zero) sample; -1 if none
    finite: npt.NDArray[np.bool_]        # (R,) False for bins with a NaN or ±inf coordinate or shift


def _span(start: npt.NDArray[Any], step: npt.NDArray[Any], n: npt.NDArray[Any],
          size: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The kernels' sample_span, vectorised: [first, end) of the samples that can land in [-1, size]."""
    hi = np.where(n >= 1, n, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = (-1 - start) / step - 0.5, (size - start) / step - 0.5
    a, b = np.where(step < 0, b, a), np.where(step < 0, a, b)
    lo = np.maximum(np.floor(a) - 1, 0)
    top = np.minimum(np.floor(b) + 2, hi)
    moving = (step != 0) & (hi > 0)
    lo = np.where(moving, lo, 0)
    hi = np.where(moving, np.maximum(top, lo), hi)
    # clamped in floating point before the cast, as in the kernels (a span of 10**19 samples overflows int64)
    return (np.minimum(lo, SAMPLE_INDEX_MAX).astype(np.int64), np.minimum(hi, SAMPLE_INDEX_MAX).astype(np.int64))


class _RoIGrid(NamedTuple):
    """The kernels' roi_grid for every RoI, (K,) arrays."""

    start_y: npt.NDArray[Any]
    start_x: npt.NDArray[Any]
    roi_h: npt.NDArray[Any]
    roi_w: npt.NDArray[Any]
    bin_h: npt.NDArray[Any]
    bin_w: npt.NDArray[Any]
    samples_y: npt.NDArray[Any]
    samples_x: npt.NDArray[Any]
    count: npt.NDArray[Any]  # type: ignore[assignment]  # the kernels' name; it hides tuple.count, unused here
    finite: npt.NDArray[np.bool_]


@np.errstate(invalid="ignore", over="ignore")  # non-finite and overflowing boxes are masked by `finite`
def _geometry(rois: npt.NDArray[Any], PH: int, PW: int, spatial_scale: float, sampling_ratio: int, aligned: bool,
              dtype: np.dtype[Any]) -> _RoIGrid:
    scale = dtype.type(spatial_scale)
    offset = dtype.type(0.5 if aligned else 0)
    start_x = rois[:, 1] * scale - offset
    start_y = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - start_x
    roi_h = rois[:, 4] * scale - offset - start_y
    finite = np.isfinite(start_x) & np.isfinite(start_y) & np.isfinite(roi_w) & np.isfinite(roi_h)
    if not aligned:
        roi_w, roi_h = np.where(roi_w > 1, roi_w, 1), np.where(roi_h > 1, roi_h, 1)
    samples_y = np.full_like(roi_h, sampling_ratio) if sampling_ratio > 0 else np.ceil(roi_h / dtype.type(PH))
    samples_x = np.full_like(roi_w, sampling_ratio) if sampling_ratio > 0 else np.ceil(roi_w / dtype.type(PW))
    count = samples_y * samples_x
    return _RoIGrid(start_y, start_x, roi_h, roi_w, roi_h / dtype.type(PH), roi_w / dtype.type(PW), samples_y,
                    samples_x, np.where(count > 1, count, 1), finite)


@np.errstate(invalid="ignore", over="ignore", divide="ignore")  # non-finite RoIs and empty bins are masked out
def _samples(rois: npt.NDArray[Any], H: int, W: int, PH: int, PW: int, spatial_scale: float, sampling_ratio: int,
             aligned: bool, dtype: np.dtype[Any], shift: Optional[npt.NDArray[Any]] = None) -> _Samples:
    """Samples of every bin; ``shift`` (K, 2, PH, PW) moves bin (ph, pw)'s start by (Δx, Δy) pixels
    (deformable RoI pooling)."""
    K = len(rois)
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    shape = (K, PH, PW)
    start_y = np.broadcast_to(g.start_y[:, None, None], shape)
    start_x = np.broadcast_to(g.start_x[:, None, None], shape)
    finite = np.broadcast_to(g.finite[:, None, None], shape)
    if shift is not None:
        start_x, start_y = start_x + shift[:, 0], start_y + shift[:, 1]
        finite = finite & np.isfinite(shift[:, 0]) & np.isfinite(shift[:, 1])
    y_start = start_y + (np.arange(PH, dtype=dtype) * g.bin_h[:, None])[:, :, None]   # (K, PH, PW)
    x_start = start_x + (np.arange(PW, dtype=dtype) * g.bin_w[:, None])[:, None, :]
    per_roi = (slice(None), None, None)
    y_first, y_end = _span(y_start, (g.bin_h / g.samples_y)[per_roi], g.samples_y[per_roi], H)
    x_first, x_end = _span(x_start, (g.bin_w / g.samples_x)[per_roi], g.samples_x[per_roi], W)
    ny = np.where(finite, y_end - y_first, 0).reshape(-1)
    nx = np.where(finite, x_end - x_first, 0).reshape(-1)
    per_bin = ny * nx
    # enumerate the samples of every bin: bin id, and the index j of the sample within its bin
    bins = np.repeat(np.arange(K * PH * PW), per_bin)
    j = np.arange(len(bins)) - np.repeat(np.cumsum(per_bin) - per_bin, per_bin)
    k = bins // (PH * PW)
    iy = y_first.reshape(-1)[bins] + j // nx[bins]
    ix = x_first.reshape(-1)[bins] + j % nx[bins]
    y = y_start.reshape(-1)[bins] + (iy.astype(dtype) + dtype.type(0.5)) * g.bin_h[k] / g.samples_y[k]
    x = x_start.reshape(-1)[bins] + (ix.astype(dtype) + dtype.type(0.5)) * g.bin_w[k] / g.samples_x[k]
    # RoIAlign's read (kernels' roi_sample): zero outside [-1, H] × [-1, W], clamped into the image inside
    valid = (y >= -1) & (y <= H) & (x >= -1) & (x <= W)
    free_y, free_x = (y > 0) & (y < H - 1), (x > 0) & (x < W - 1)
    y = np.where(y <= 0, 0, np.where(y >= H - 1, H - 1, y)).astype(dtype)
    x = np.where(x <= 0, 0, np.where(x >= W - 1, W - 1, x)).astype(dtype)
    corners = _bilinear.corners(np.where(valid, y, -2), np.where(valid, x, -2), H, W)
    image = rois[k, 0].astype(np.int64)
    assert corners.dweight_dy is not None and corners.dweight_dx is not None  # computed: derivatives=True
    # skipped samples of a bin are zeros; the first of them in (iy, ix) order (kernels' zero_order)
    sy, sx = np.broadcast_to(g.samples_y[per_roi], shape), np.broadcast_to(g.samples_x[per_roi], shape)
    zero_order = np.select(
        [(y_first > 0) | (x_first > 0) | (y_end == y_first) | (x_end == x_first), x_end < sx, y_end < sy],
        [0.0, x_end.astype(np.float64), y_end * sx.astype(np.float64)], -1.0)
    zero_order = np.where((sy >= 1) & (sx >= 1), zero_order, -1.0)
    return _Samples(rows=corners.index + (image * (H * W + 1))[:, None], weights=corners.weight,
                    dweight_dy=corners.dweight_dy * free_y[:, None], dweight_dx=corners.dweight_dx * free_x[:, None],
                    per_bin=per_bin, count=np.repeat(g.count, PH * PW),
                    order=iy * g.samples_x[k].astype(np.float64) + ix, zero_order=zero_order.reshape(-1),
                    finite=finite.reshape(-1))


def _roi_chunks(rois: npt.NDArray[Any], H: int, W: int, PH: int, PW: int, spatial_scale: float, sampling_ratio: int,
                aligned: bool, dtype: np.dtype[Any], separable: bool = False) -> list[tuple[int, int]]:
    """Ranges of RoIs whose samples number about _workspace.ROI_SAMPLES_PER_CHUNK (a RoI is never split); with
    ``separable``, whose :func:`_average_matrix` entries number about ENTRIES_PER_SAMPLE times that."""
    if not len(rois):
        return []
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    if separable:
        cost = _separable_cost(g, H, W, PH, PW, dtype)
        return _workspace.cost_ranges(cost, ENTRIES_PER_SAMPLE * _workspace.ROI_SAMPLES_PER_CHUNK)
    with np.errstate(invalid="ignore", over="ignore"):
        span_y = np.minimum(np.where(g.samples_y >= 1, g.samples_y, 0), 2 * H + 6)
        span_x = np.minimum(np.where(g.samples_x >= 1, g.samples_x, 0), 2 * W + 6)
    estimate = np.where(g.finite, span_y * span_x * PH * PW, 0)
    return _workspace.cost_ranges(estimate, _workspace.ROI_SAMPLES_PER_CHUNK)


#: Entries of :func:`_average_matrix` per sample of ROI_SAMPLES_PER_CHUNK: as many as the per-sample matrix has
#: (4 corners). An entry takes about 40 bytes at the peak of its construction, a sample of :func:`_samples` about
#: 400; 8 instead of 4 made the 1000-box adaptive case one chunk instead of two and was not faster (~450 ms).
ENTRIES_PER_SAMPLE = 4


@np.errstate(invalid="ignore", over="ignore", divide="ignore")  # non-finite RoIs and empty bins are masked out
def _bin_starts(g: _RoIGrid, PH: int, PW: int, dtype: np.dtype[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(y_start (K, PH), x_start (K, PW)): where each bin starts, as in _samples."""
    return (g.start_y[:, None] + np.arange(PH, dtype=dtype) * g.bin_h[:, None],
            g.start_x[:, None] + np.arange(PW, dtype=dtype) * g.bin_w[:, None])


@np.errstate(invalid="ignore", over="ignore", divide="ignore")
def _separable_cost(g: _RoIGrid, H: int, W: int, PH: int, PW: int, dtype: np.dtype[Any]) -> npt.NDArray[np.float64]:
    """Per RoI, a bound on the entries of its :func:`_average_matrix` rows and on its per-axis samples."""
    total = np.zeros(len(g.finite))
    touched = []
    for start, bin_size, n, size in zip(_bin_starts(g, PH, PW, dtype), (g.bin_h, g.bin_w), (g.samples_y, g.samples_x),
                                        (H, W)):
        step = (bin_size / n)[:, None]
        first, end = _span(start, step, n[:, None], size)
        count = np.where(g.finite[:, None], end - first, 0).astype(np.float64)
        # the samples of a bin lie within (count − 1)·|step|: at most that + 2 pixels, 2 per sample
        pixels = np.minimum(2 * count, np.ceil(np.maximum(count - 1, 0) * np.abs(step)) + 2)
        touched.append(np.where(count > 0, pixels, 0).sum(axis=1))
        total += count.sum(axis=1)
    cost: npt.NDArray[np.float64] = total + touched[0] * touched[1]
    return cost


@np.errstate(invalid="ignore", over="ignore", divide="ignore")  # non-finite RoIs are masked by `finite`
def _axis_weights(start: npt.NDArray[Any], bin_size: npt.NDArray[Any], samples: npt.NDArray[Any],
                  finite: npt.NDArray[np.bool_], size: int,
                  dtype: np.dtype[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """One axis of the separable average: for bins start (K, P) of RoIs with bin_size, samples (K,), the sum
    over each bin's samples along the axis of their bilinear weights in RoIAlign's read (zero outside
    [−1, size], clamped into the image inside). Returns (indptr (K·P + 1,), pixel, weight): bin b touches
    pixel[indptr[b]:indptr[b + 1]] (ascending; corners of weight 0 included, as in _samples) with those
    weights (float64)."""
    K, P = start.shape
    first, end = _span(start, (bin_size / samples)[:, None], samples[:, None], size)
    n = np.where(finite[:, None] & (size > 0), end - first, 0).reshape(-1)
    b = np.repeat(np.arange(K * P), n)  # each sample's bin and index i along the axis
    i = _ragged_arange(first.reshape(-1), n)
    k = b // P
    y = start.reshape(-1)[b] + (i.astype(dtype) + dtype.type(0.5)) * bin_size[k] / samples[k]
    keep = (y >= -1) & (y <= size)
    b, y = b[keep], y[keep]
    y = np.where(y <= 0, 0, np.where(y >= size - 1, size - 1, y)).astype(dtype)
    low = np.floor(y)
    fraction = y - low
    low = low.astype(np.int64)
    upper = low < size - 1  # the upper corner is outside the image at the last row
    keys, inverse = np.unique(np.concatenate([b * size + low, (b * size + low + 1)[upper]]), return_inverse=True)
    weight = np.bincount(inverse, np.concatenate([1 - fraction, fraction[upper]]), minlength=len(keys))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // size, minlength=K * P))])
    return indptr, keys % size, weight


def _ragged_arange(starts: npt.NDArray[np.integer[Any]],
                   lengths: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Concatenated ranges [starts[i], starts[i] + lengths[i])."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())


@np.errstate(invalid="ignore", over="ignore", divide="ignore")  # non-finite RoIs are masked by `finite`
def _average_matrix(rois: npt.NDArray[Any], H: int, W: int, PH: int, PW: int, spatial_scale: float, sampling_ratio: int,
                    aligned: bool, dtype: np.dtype[Any], n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix of the average pooling of rois (K, 5), rows = bins (k, ph, pw), columns = rows of
    _bilinear.pixels_last(input): entry (r, c) of bin (k, ph, pw) is a_y[r]·a_x[c] / count (:func:`_axis_weights`).
    Equal to :func:`_bin_matrix` of :func:`_samples` with its duplicate entries summed."""
    K = len(rois)
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    y_start, x_start = _bin_starts(g, PH, PW, dtype)
    ptr_y, row, weight_y = _axis_weights(y_start, g.bin_h, g.samples_y, g.finite, H, dtype)
    ptr_x, column, weight_x = _axis_weights(x_start, g.bin_w, g.samples_x, g.finite, W, dtype)
    rows_per_bin, columns_per_bin = np.diff(ptr_y).reshape(K, PH, 1), np.diff(ptr_x).reshape(K, 1, PW)
    # one segment of entries per (bin, touched row), bins in (k, ph, pw) order: that row times the bin's columns
    n_rows = np.broadcast_to(rows_per_bin, (K, PH, PW)).reshape(-1)
    segment_y = _ragged_arange(np.broadcast_to(ptr_y[:-1].reshape(K, PH, 1), (K, PH, PW)).reshape(-1), n_rows)
    bin_of = np.repeat(np.arange(K * PH * PW), n_rows)
    k_of = bin_of // (PH * PW)
    segment_x = k_of * PW + bin_of % PW  # the bin's column axis bin (k, pw)
    n_columns_of = np.diff(ptr_x)[segment_x]
    base = rois[k_of, 0].astype(np.int64) * (H * W + 1) + row[segment_y] * W
    scale = weight_y[segment_y] / g.count[k_of].astype(np.float64)
    x = _ragged_arange(ptr_x[:-1][segment_x], n_columns_of)
    values = (np.repeat(scale, n_columns_of) * weight_x[x]).astype(dtype)
    indptr = np.concatenate([[0], np.cumsum((rows_per_bin * columns_per_bin).reshape(-1))])
    return _bilinear.sparse_rows(values, np.repeat(base, n_columns_of) + column[x], indptr, n_columns)


def _bin_matrix(s: _Samples, n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix of the average: row r = Σ over bin r's samples of their corner weights / count."""
    weights = s.weights / s.count[np.repeat(np.arange(len(s.per_bin)), s.per_bin)][:, None]
    indptr = np.concatenate([[0], np.cumsum(4 * s.per_bin)])
    return _bilinear.sparse_rows(weights.reshape(-1), s.rows.reshape(-1), indptr, n_columns)


def _max_winners(values: npt.NDArray[Any], s: _Samples) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """Max pooling over each bin's samples: (pooled (R, c), winning sample (R, c) or -1 for none)."""
    R, c = len(s.per_bin), values.shape[1]
    pooled = np.zeros((R, c), values.dtype)
    winner = np.full((R, c), -1, np.int64)
    full = np.flatnonzero(s.per_bin)
    starts = (np.cumsum(s.per_bin) - s.per_bin)[full]
    if len(full):
        best = np.maximum.reduceat(values, starts, axis=0)              # NaN propagates, as in `beats`
        best_each = np.repeat(best, s.per_bin[full], axis=0)
        is_best = (values == best_each) | (np.isnan(values) & np.isnan(best_each))
        first = np.where(is_best, np.arange(len(values))[:, None], len(values))
        pooled[full], winner[full] = best, np.minimum.reduceat(first, starts, axis=0)
    # the bin's first skipped sample (value 0) competes: it wins over a smaller or equal later best
    best_order = np.append(s.order, np.inf)[winner]  # winner -1 (none) reads the appended inf
    zero = s.zero_order[:, None]
    zero_wins = (zero >= 0) & ((winner < 0) | (0 > pooled) | ((pooled == 0) & (zero < best_order)))
    zero_wins &= s.finite[:, None]
    return np.where(zero_wins, 0, pooled), np.where(zero_wins | ~s.finite[:, None], -1, winner)


def roi_align(input: npt.NDArray[Any], rois: npt.NDArray[Any], cfg: RoIAlignConfig) -> npt.NDArray[Any]:
    """RoIAlign (or, with cfg.position_sensitive, PS-RoIAlign) of input over rois (K, 5) → (K, C_out, PH, PW)."""
    PH, PW, spatial_scale, sampling_ratio, aligned = cfg.PH, cfg.PW, cfg.spatial_scale, cfg.sampling_ratio, cfg.aligned
    pool_mode, position_sensitive = cfg.pool_mode, cfg.position_sensitive
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    K, bins = len(rois), PH * PW
    C_out = C // bins if position_sensitive else C
    out = np.zeros((K, C_out, PH, PW), dtype)
    n_columns = N * (H * W + 1)
    average = pool_mode == "avg"
    geometry = (H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    for k0, k1 in _roi_chunks(rois, *geometry, separable=average):
        if average:
            S = _average_matrix(rois[k0:k1], *geometry, n_columns)
        else:  # one row per sample
            s = _samples(rois[k0:k1], *geometry)
            S = _bilinear.sparse_rows(s.weights.reshape(-1), s.rows.reshape(-1), np.arange(0, 4 * len(s.rows) + 1, 4),
                                      n_columns)
        if position_sensitive:  # bin b = (ph, pw) reads input channels c·PH·PW + b

            def work_bins(b0: int, b1: int) -> None:
                for b in range(b0, b1):
                    out[k0:k1, :, b // PW, b % PW] = (S[np.arange(b, (k1 - k0) * bins, bins)]
                                                      @ _bilinear.pixels_last(input[:, b::bins], dtype))

            _bilinear.for_each_chunk(work_bins, _workspace.even_ranges(bins, _workspace.BIN_GROUPS))
            continue

        def work(c0: int, c1: int) -> None:
            values = S @ _bilinear.pixels_last(input[:, c0:c1], dtype)
            if pool_mode == "max":
                values = _max_winners(values, s)[0]
            out[k0:k1, c0:c1] = values.reshape(k1 - k0, PH, PW, c1 - c0).transpose(0, 3, 1, 2)

        _bilinear.for_each_chunk(work, _workspace.channel_blocks(C, n_columns, dtype.itemsize))
    return out.astype(input.dtype, copy=False)


def roi_align_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], rois: npt.NDArray[Any],
                       cfg: RoIAlignConfig, wanted: tuple[bool]) -> tuple[npt.NDArray[Any]]:
    """(grad_input,)."""
    PH, PW, spatial_scale, sampling_ratio, aligned = cfg.PH, cfg.PW, cfg.spatial_scale, cfg.sampling_ratio, cfg.aligned
    pool_mode, position_sensitive = cfg.pool_mode, cfg.position_sensitive
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    bins = PH * PW
    n_columns = N * (H * W + 1)
    grad = np.zeros((N, C, H, W), dtype)
    grad_output = grad_output.astype(dtype, copy=False)

    # rows (N·(H·W + 1), c) of a gradient, into grad[:, channels]
    def add_rows(rows: npt.NDArray[Any], channels: slice) -> None:
        c = rows.shape[1]
        grad[:, channels] += rows.reshape(N, H * W + 1, c)[:, :H * W].transpose(0, 2, 1).reshape(N, c, H, W)

    average = pool_mode == "avg"
    geometry = (H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    for k0, k1 in _roi_chunks(rois, *geometry, separable=average):
        g = grad_output[k0:k1]
        if average:
            S = _average_matrix(rois[k0:k1], *geometry, n_columns)
        else:
            s = _samples(rois[k0:k1], *geometry)
        if position_sensitive:

            def work_bins(b0: int, b1: int) -> None:
                for b in range(b0, b1):
                    add_rows(S[np.arange(b, (k1 - k0) * bins, bins)].T @ g[:, :, b // PW, b % PW],
                             slice(b, None, bins))

            _bilinear.for_each_chunk(work_bins, _workspace.even_ranges(bins, _workspace.BIN_GROUPS))
            continue
        G = g.transpose(0, 2, 3, 1).reshape((k1 - k0) * bins, C)
        if average:

            def work(c0: int, c1: int) -> None:
                add_rows(S.T @ np.ascontiguousarray(G[:, c0:c1]), slice(c0, c1))
        else:
            S = _bilinear.sparse_rows(s.weights.reshape(-1), s.rows.reshape(-1),
                                      np.arange(0, 4 * len(s.rows) + 1, 4), n_columns)

            def work(c0: int, c1: int) -> None:
                c = c1 - c0
                winner = _max_winners(S @ _bilinear.pixels_last(input[:, c0:c1], dtype), s)[1]
                has = winner >= 0
                bin_of, channel = np.nonzero(has)
                sample = winner[has]
                target = s.rows[sample] * c + channel[:, None]       # (hits, 4) into (N·(H·W + 1), c)
                contribution = s.weights[sample] * G[bin_of, c0 + channel][:, None]
                rows = np.bincount(target.reshape(-1), contribution.reshape(-1), minlength=n_columns * c)
                add_rows(rows.reshape(n_columns, c), slice(c0, c1))

        _bilinear.for_each_chunk(work, _workspace.channel_blocks(C, n_columns, dtype.itemsize))
    return (grad.astype(input.dtype, copy=False),)


def _shift(rois: npt.NDArray[Any], offset: npt.NDArray[Any], PH: int, PW: int, spatial_scale: float,
           sampling_ratio: int, gamma: float, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Pixel shift (K, 2, PH, PW) of every bin's start: γ · RoI size · offset (channel 0 = x)."""
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, True, dtype)
    scale = np.stack([g.roi_w, g.roi_h], axis=1)[:, :, None, None]
    shift: npt.NDArray[Any] = dtype.type(gamma) * scale * offset.astype(dtype)
    return shift


def deform_roi_pool(input: npt.NDArray[Any], rois: npt.NDArray[Any], offset: Optional[npt.NDArray[Any]],
                    mask: Optional[npt.NDArray[Any]], cfg: DeformRoIPoolConfig) -> npt.NDArray[Any]:
    """Deformable (modulated) RoI pooling → (K, C, PH, PW)."""
    PH, PW, spatial_scale, sampling_ratio, gamma = cfg.PH, cfg.PW, cfg.spatial_scale, cfg.sampling_ratio, cfg.gamma
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    out = np.zeros((len(rois), C, PH, PW), dtype)
    n_columns = N * (H * W + 1)
    geometry = (H, W, PH, PW, spatial_scale, sampling_ratio, True, dtype)
    if offset is not None and not np.any(offset):
        offset = None  # aligned RoIAlign (mmcv initialises the offsets to 0)
    for k0, k1 in _roi_chunks(rois, *geometry, separable=offset is None):
        if offset is None:
            S = _average_matrix(rois[k0:k1], *geometry, n_columns)
        else:
            shift = _shift(rois[k0:k1], offset[k0:k1], PH, PW, spatial_scale, sampling_ratio, gamma, dtype)
            S = _bin_matrix(_samples(rois[k0:k1], *geometry, shift), n_columns)

        def work(c0: int, c1: int) -> None:
            values = S @ _bilinear.pixels_last(input[:, c0:c1], dtype)
            out[k0:k1, c0:c1] = values.reshape(k1 - k0, PH, PW, c1 - c0).transpose(0, 3, 1, 2)

        _bilinear.for_each_chunk(work, _workspace.channel_blocks(C, n_columns, dtype.itemsize))
    if mask is not None:
        out *= mask.astype(dtype)
    return out.astype(input.dtype, copy=False)


def deform_roi_pool_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], rois: npt.NDArray[Any],
                             offset: Optional[npt.NDArray[Any]], mask: Optional[npt.NDArray[Any]],
                             cfg: DeformRoIPoolConfig, wanted: tuple[bool, bool, bool]
                             ) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """(grad_input, grad_offset, grad_mask), None where not wanted."""
    PH, PW, spatial_scale, sampling_ratio, gamma = cfg.PH, cfg.PW, cfg.spatial_scale, cfg.sampling_ratio, cfg.gamma
    want_input, want_offset, want_mask = wanted
    N, C, H, W = input.shape
    dtype = compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    K, bins, n_columns = len(rois), PH * PW, N * (H * W + 1)
    grad_input = np.zeros(input.shape, dtype) if want_input else None
    grad_offset = np.zeros((K, 2, PH, PW), dtype) if want_offset else None
    grad_mask = np.zeros((K, 1, PH, PW), dtype) if want_mask else None
    grad_pooled = grad_output.astype(dtype) * (1 if mask is None else mask.astype(dtype))
    for k0, k1 in _roi_chunks(rois, H, W, PH, PW, spatial_scale, sampling_ratio, True, dtype):
        shift = None if offset is None else _shift(rois[k0:k1], offset[k0:k1], PH, PW, spatial_scale, sampling_ratio,
                                                   gamma, dtype)
        s = _samples(rois[k0:k1], H, W, PH, PW, spatial_scale, sampling_ratio, True, dtype, shift)
        S = _bin_matrix(s, n_columns)
        # the coordinate derivatives of each bin's average, as matrices like S
        Dx, Dy = (_bin_matrix(s._replace(weights=d), n_columns) for d in (s.dweight_dx, s.dweight_dy))
        G = grad_pooled[k0:k1].transpose(0, 2, 3, 1).reshape((k1 - k0) * bins, C)
        G_plain = grad_output[k0:k1].astype(dtype).transpose(0, 2, 3, 1).reshape((k1 - k0) * bins, C)
        blocks = _workspace.channel_blocks(C, n_columns, dtype.itemsize)
        partial = np.zeros((len(blocks), 3, (k1 - k0) * bins), dtype)  # per block: Σ_c for x, y, mask

        def work(c0: int, c1: int) -> None:
            block = blocks.index((c0, c1))
            if grad_input is not None:
                rows = S.T @ np.ascontiguousarray(G[:, c0:c1])
                grad_input[:, c0:c1] += rows.reshape(N, H * W + 1, c1 - c0)[:, :H * W].transpose(0, 2, 1).reshape(
                    N, c1 - c0, H, W)
            if want_offset or want_mask:
                X = _bilinear.pixels_last(input[:, c0:c1], dtype)
                if want_offset:
                    partial[block, 0] = np.vecdot(Dx @ X, G[:, c0:c1])
                    partial[block, 1] = np.vecdot(Dy @ X, G[:, c0:c1])
                if want_mask:
                    partial[block, 2] = np.vecdot(S @ X, G_plain[:, c0:c1])

        _bilinear.for_each_chunk(work, blocks)
        total = partial.sum(axis=0).reshape(3, k1 - k0, PH, PW)  # blocks summed in a fixed order
        if grad_offset is not None and offset is not None:
            g = _geometry(rois[k0:k1], PH, PW, spatial_scale, sampling_ratio, True, dtype)
            finite = s.finite.reshape(-1, PH, PW)
            with np.errstate(invalid="ignore"):  # non-finite boxes: masked to 0 below
                grad_offset[k0:k1, 0] = np.where(finite, gamma * g.roi_w[:, None, None] * total[0], 0)
                grad_offset[k0:k1, 1] = np.where(finite, gamma * g.roi_h[:, None, None] * total[1], 0)
        if grad_mask is not None:
            grad_mask[k0:k1, 0] = total[2]
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_offset, grad_mask))
