"""RoIAlign (average and max pooling), position-sensitive RoIAlign and deformable RoI pooling, forward and
backward.

He et al., "Mask R-CNN", ICCV 2017, https://arxiv.org/abs/1703.06870. Average pooling and the
position-sensitive form follow torchvision.ops.roi_align / ps_roi_align; max pooling follows mmcv's
RoIAlign (pool_mode="max"). Deformable RoI pooling (Dai et al., "Deformable Convolutional Networks",
https://arxiv.org/abs/1703.06211; modulated: Zhu et al., "Deformable ConvNets v2", https://arxiv.org/abs/1811.11168)
follows mmcv.ops DeformRoIPool / ModulatedDeformRoIPool: RoIAlign's aligned geometry with each bin moved by
γ · RoI size · offset, times the mask. One family, as in kernels/roi_align.cu.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _bilinear, _kernels, _validate, _workspace, testing

FAMILY = "roi_align"
POOL_MODES = ("avg", "max")
#: Largest sampling_ratio accepted (samples per bin and axis).
MAX_SAMPLES_PER_AXIS = 1 << 16
#: A bin's samples along an axis are visited up to this index (the kernels' SAMPLE_INDEX_MAX, 2**62).
SAMPLE_INDEX_MAX = float(2**62)


class RoIAlignGrads(NamedTuple):
    """Gradients of :func:`roi_align` / :func:`ps_roi_align` (boxes get none, as in torchvision)."""

    input: Optional[object]


# --------------------------------------------------------------------------------------- arguments

def parse_roi_options(output_size, spatial_scale, sampling_ratio, aligned, pool_mode):
    """The RoIAlign ops' scalar arguments, checked: (PH, PW, spatial_scale, sampling_ratio, aligned)."""
    PH, PW = _validate.pair("output_size", output_size, minimum=1)
    spatial_scale = _validate.real("spatial_scale", spatial_scale, positive=True)
    # more samples than this per bin and axis would not fit any image's memory; the kernels take an int
    sampling_ratio = _validate.integer("sampling_ratio", sampling_ratio, maximum=MAX_SAMPLES_PER_AXIS)
    aligned = _validate.flag("aligned", aligned)
    _validate.choice("pool_mode", pool_mode, POOL_MODES)
    return PH, PW, spatial_scale, sampling_ratio, aligned


def _check(call, input, rois, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive,
           boxes_name="boxes"):
    """Check the arguments of a RoIAlign op: (PH, PW, spatial_scale, sampling_ratio, aligned)."""
    _validate.floating("input", input, 4, "(N, C, H, W)")
    _validate.floating(boxes_name, rois, 2, _validate.ROIS_LAYOUT)
    _validate.shape(boxes_name, rois, (None, 5), _validate.ROIS_LAYOUT)
    _validate.same_dtype(input=input, **{boxes_name: rois})
    PH, PW, spatial_scale, sampling_ratio, aligned = parse_roi_options(output_size, spatial_scale, sampling_ratio,
                                                                       aligned, pool_mode)
    N, C, H, W = input.shape
    if position_sensitive and C % (PH * PW):
        raise ValueError(f"input: expected channels C divisible by output_size {PH}×{PW} = {PH * PW} for "
                         f"position-sensitive pooling, got C = {C}")
    _validate.output_fits("output_size", (len(rois), C // (PH * PW) if position_sensitive else C, PH, PW),
                          input.dtype)
    _validate.rois(boxes_name, call, rois, input)
    return PH, PW, spatial_scale, sampling_ratio, aligned


def _arguments(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive,
               **others):
    """Import and check a forward's (or, with grad_output in others, a backward's) arguments: (call, input,
    rois, others' arrays, (PH, PW, spatial_scale, sampling_ratio, aligned))."""
    call, (input, rois, *arrays) = _validate.prepare_boxes("boxes", input=input, boxes=boxes, **others)
    options = _check(call, input, rois, output_size, spatial_scale, sampling_ratio, aligned, pool_mode,
                     position_sensitive)
    return call, input, rois, dict(zip(others, arrays)), options


def _output_shape(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, pool_mode="avg",
                  position_sensitive=False) -> tuple:
    """The shape of roi_align's output (ps_roi_align's with position_sensitive), raising its argument errors."""
    _, input, rois, _, (PH, PW, *_) = _arguments(input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                                                 pool_mode, position_sensitive)
    C = input.shape[1]
    return (len(rois), C // (PH * PW) if position_sensitive else C, PH, PW)


# ------------------------------------------------------------------------------------ NumPy path

class _Samples(NamedTuple):
    """Every sample of a chunk of RoIs, in kernel order (RoI, ph, pw, iy, ix): its four bilinear corners as
    rows of _bilinear.pixels_last(input) and weights, the bin it belongs to, and what max pooling and the
    coordinate gradients need."""

    rows: np.ndarray            # (S, 4) int64
    weights: np.ndarray         # (S, 4)
    dweight_dy: np.ndarray      # (S, 4): ∂weights/∂y, 0 where roi_sample clamps y (kernels' roi_sample_coordinate_grad)
    dweight_dx: np.ndarray      # (S, 4)
    per_bin: np.ndarray         # (R,) samples computed per bin, R = K·PH·PW
    count: np.ndarray           # (R,) divisor of the average
    order: np.ndarray           # (S,) position iy·samples_x + ix of each sample within its bin
    zero_order: np.ndarray      # (R,) position of the bin's first skipped (zero) sample; -1 if none
    finite: np.ndarray          # (R,) False for bins with a NaN or ±inf coordinate or shift


def _span(start, step, n, size):
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

    start_y: np.ndarray
    start_x: np.ndarray
    roi_h: np.ndarray
    roi_w: np.ndarray
    bin_h: np.ndarray
    bin_w: np.ndarray
    samples_y: np.ndarray
    samples_x: np.ndarray
    count: np.ndarray
    finite: np.ndarray


@np.errstate(invalid="ignore", over="ignore")  # non-finite and overflowing boxes are masked by `finite`
def _geometry(rois, PH, PW, spatial_scale, sampling_ratio, aligned, dtype) -> _RoIGrid:
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
def _samples(rois, H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype, shift=None) -> _Samples:
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


def _roi_chunks(rois, H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype):
    """Ranges of RoIs whose samples number about _workspace.ROI_SAMPLES_PER_CHUNK (a RoI is never split)."""
    if not len(rois):
        return []
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        span_y = np.minimum(np.where(g.samples_y >= 1, g.samples_y, 0), 2 * H + 6)
        span_x = np.minimum(np.where(g.samples_x >= 1, g.samples_x, 0), 2 * W + 6)
    estimate = np.where(g.finite, span_y * span_x * PH * PW, 0)
    return _workspace.cost_ranges(estimate, _workspace.ROI_SAMPLES_PER_CHUNK)


def _bin_matrix(s: _Samples, n_columns: int):
    """CSR matrix of the average: row r = Σ over bin r's samples of their corner weights / count."""
    weights = s.weights / s.count[np.repeat(np.arange(len(s.per_bin)), s.per_bin)][:, None]
    indptr = np.concatenate([[0], np.cumsum(4 * s.per_bin)])
    return _bilinear.sparse_rows(weights.reshape(-1), s.rows.reshape(-1), indptr, n_columns)


def _max_winners(values, s: _Samples):
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


def _forward_numpy(input, rois, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive):
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    K, bins = len(rois), PH * PW
    C_out = C // bins if position_sensitive else C
    out = np.zeros((K, C_out, PH, PW), dtype)
    n_columns = N * (H * W + 1)
    for k0, k1 in _roi_chunks(rois, H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype):
        s = _samples(rois[k0:k1], H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
        if position_sensitive:  # bin b = (ph, pw) reads input channels c·PH·PW + b
            S_all = _bin_matrix(s, n_columns)

            def work(b0, b1):
                for b in range(b0, b1):
                    S = S_all[np.arange(b, (k1 - k0) * bins, bins)]
                    out[k0:k1, :, b // PW, b % PW] = S @ _bilinear.pixels_last(input[:, b::bins], dtype)

            _bilinear.for_each_chunk(work, _workspace.even_ranges(bins, _workspace.BIN_GROUPS))
            continue
        S = _bin_matrix(s, n_columns) if pool_mode == "avg" else _bilinear.sparse_rows(
            s.weights.reshape(-1), s.rows.reshape(-1), np.arange(0, 4 * len(s.rows) + 1, 4), n_columns)

        def work(c0, c1):
            values = S @ _bilinear.pixels_last(input[:, c0:c1], dtype)
            if pool_mode == "max":
                values = _max_winners(values, s)[0]
            out[k0:k1, c0:c1] = values.reshape(k1 - k0, PH, PW, c1 - c0).transpose(0, 3, 1, 2)

        _bilinear.for_each_chunk(work, _workspace.channel_blocks(C, n_columns, dtype.itemsize))
    return out.astype(input.dtype, copy=False)


def _backward_numpy(grad_output, input, rois, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode,
                    position_sensitive):
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    bins = PH * PW
    n_columns = N * (H * W + 1)
    grad = np.zeros((N, C, H, W), dtype)
    grad_output = grad_output.astype(dtype, copy=False)

    def add_rows(rows, channels):  # rows (N·(H·W + 1), c) of a gradient, into grad[:, channels]
        c = rows.shape[1]
        grad[:, channels] += rows.reshape(N, H * W + 1, c)[:, :H * W].transpose(0, 2, 1).reshape(N, c, H, W)

    for k0, k1 in _roi_chunks(rois, H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype):
        s = _samples(rois[k0:k1], H, W, PH, PW, spatial_scale, sampling_ratio, aligned, dtype)
        g = grad_output[k0:k1]
        if position_sensitive:
            S_all = _bin_matrix(s, n_columns)

            def work(b0, b1):
                for b in range(b0, b1):
                    S = S_all[np.arange(b, (k1 - k0) * bins, bins)]
                    add_rows(S.T @ g[:, :, b // PW, b % PW], slice(b, None, bins))

            _bilinear.for_each_chunk(work, _workspace.even_ranges(bins, _workspace.BIN_GROUPS))
            continue
        G = g.transpose(0, 2, 3, 1).reshape((k1 - k0) * bins, C)
        if pool_mode == "avg":
            S = _bin_matrix(s, n_columns)

            def work(c0, c1):
                add_rows(S.T @ np.ascontiguousarray(G[:, c0:c1]), slice(c0, c1))
        else:
            S = _bilinear.sparse_rows(s.weights.reshape(-1), s.rows.reshape(-1),
                                      np.arange(0, 4 * len(s.rows) + 1, 4), n_columns)

            def work(c0, c1):
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
    return grad.astype(input.dtype, copy=False)


# ---------------------------------------------------------------------------------------- kernels

def _launch_forward(call, input, rois, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode,
                    position_sensitive):
    xp = call.xp
    N, C, H, W = input.shape
    K = len(rois)
    C_out = C // (PH * PW) if position_sensitive else C
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    out = _kernels.empty(xp, (K, C_out, PH, PW), input.dtype)
    _kernels.launch(call.backend, FAMILY, "roi_align_forward", input.dtype, out.size, (input, rois, out),
                    (K, C, H, W, C_out, PH, PW),
                    (sampling_ratio, aligned, POOL_MODES.index(pool_mode), position_sensitive), (spatial_scale,))
    return out


def _launch_backward(call, grad_output, input, rois, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode,
                     position_sensitive, deterministic):
    xp = call.xp
    N, C, H, W = input.shape
    K = len(rois)
    C_out = C // (PH * PW) if position_sensitive else C
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype))  # summed in float32 for 16-bit input
    if K:
        _kernels.launch(call.backend, FAMILY, "roi_align_backward", input.dtype,
                        N * C if deterministic else grad_output.size, (grad_output, input, rois, grad_input),
                        (N, K, C, H, W, C_out, PH, PW),
                        (sampling_ratio, aligned, POOL_MODES.index(pool_mode), position_sensitive, deterministic),
                        (spatial_scale,))
    return grad_input.astype(input.dtype, copy=False)


# ------------------------------------------------------------------------------------------ public

def _run_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive):
    call, input, rois, _, (PH, PW, spatial_scale, sampling_ratio, aligned) = _arguments(
        input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive)
    with call.device:
        run = _forward_numpy if call.backend == "numpy" else (
            lambda *a: _launch_forward(call, *a))
        out = run(input, rois, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive)
    return call.export(out)


def _run_backward(grad_output, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode,
                  position_sensitive, deterministic):
    call, input, rois, arrays, (PH, PW, spatial_scale, sampling_ratio, aligned) = _arguments(
        input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, position_sensitive,
        grad_output=grad_output)
    grad_output = arrays["grad_output"]
    deterministic = _validate.flag("deterministic", deterministic)
    C_out = input.shape[1] // (PH * PW) if position_sensitive else input.shape[1]
    _validate.grad_output(grad_output, (len(rois), C_out, PH, PW), "(K, C_out, PH, PW)", input=input)
    with call.device:
        if call.backend == "numpy":
            grad = _backward_numpy(grad_output, input, rois, PH, PW, spatial_scale, sampling_ratio, aligned,
                                   pool_mode, position_sensitive)
        else:
            grad = _launch_backward(call, grad_output, input, rois, PH, PW, spatial_scale, sampling_ratio, aligned,
                                    pool_mode, position_sensitive, deterministic)
    return RoIAlignGrads(call.export(grad))


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, pool_mode="avg"):
    """Pool each box of ``input`` to a fixed ``output_size`` grid by bilinear sampling (RoIAlign).

    Args:
        input (array[N, C, H, W]): feature maps.
        boxes (array[K, 5] or list of array[L, 4]): [batch_index, x1, y1, x2, y2] in input-image
            coordinates, or one [x1, y1, x2, y2] array per image. Same dtype as input; batch indices must
            be integers in [0, N).
        output_size (int or pair of int): (PH, PW) bins per box.
        spatial_scale (float): maps box coordinates to feature-map pixels (e.g. 1/16). Default: 1.0.
        sampling_ratio (int): samples per bin along each axis; ≤ 0 means ceil(bin size) per axis,
            per box (adaptive). Default: -1.
        aligned (bool): shift boxes by −0.5 pixel so that pixel centres sit at integers (Detectron2's
            ROIAlignV2); if False a box is at least 1×1 pixel. Default: False.
        pool_mode (str): "avg" (torchvision) averages the samples of a bin, dividing by their count;
            "max" (mmcv) takes the largest sample, and its gradient goes to that sample only.
            Default: "avg".

    Returns:
        array[K, C, PH, PW].

    A bin of box k starts at (x1·spatial_scale − offset + pw·bin_w, ...); its samples sit at
    (i + 0.5)·bin/samples within it. A sample outside [−1, H] × [−1, W] reads 0 but is counted; inside,
    coordinates in [−1, 0] read row/column 0. A box with a NaN or ±inf coordinate pools to 0 and gets no
    gradient; a bin without samples pools to 0; max pooling: NaN wins, ties go to the first sample.

    >>> x = np.random.rand(2, 16, 32, 32).astype(np.float32)
    >>> boxes = np.array([[0, 2.0, 3.0, 20.0, 18.5], [1, 0.0, 0.0, 31.0, 31.0]], np.float32)
    >>> deformcp.roi_align(x, boxes, 7, sampling_ratio=2, aligned=True).shape
    (2, 16, 7, 7)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return _run_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode, False)


def roi_align_backward(grad_output, input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                       aligned=False, pool_mode="avg", deterministic=False):
    """Gradient of :func:`roi_align` with respect to input.

    Args:
        grad_output (array[K, C, PH, PW]): gradient of the loss with respect to the output.
        input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode: as given to
            :func:`roi_align`.
        deterministic (bool): on the host and CUDA backends, False scatter-adds with atomics (fast; float
            sums may differ in the last bits between runs); True gives each input plane to one thread,
            which visits its bins in a fixed order: bitwise identical run to run. The NumPy path is always
            deterministic. Default: False.

    Returns:
        RoIAlignGrads: ``input`` (array[N, C, H, W]).
    """
    return _run_backward(grad_output, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, pool_mode,
                         False, deterministic)


def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1):
    """Position-sensitive RoIAlign (R-FCN's pooling with RoIAlign sampling), as torchvision.ops.ps_roi_align.

    Args:
        input (array[N, C, H, W]): C must be a multiple of PH·PW.
        boxes, output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`; boxes are always
            shifted by −0.5 pixel (aligned) and not enlarged.

    Returns:
        array[K, C / (PH·PW), PH, PW]: output channel c of bin (ph, pw) averages input channel
        (c·PH + ph)·PW + pw over the bin. A bin without samples pools to 0 (torchvision divides by zero).

    Dai et al., "R-FCN", NeurIPS 2016, https://arxiv.org/abs/1605.06409.

    >>> x = np.random.rand(1, 2 * 3 * 3, 16, 16)
    >>> deformcp.ps_roi_align(x, np.array([[0, 1.0, 1.0, 12.0, 9.0]]), 3).shape
    (1, 2, 3, 3)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return _run_forward(input, boxes, output_size, spatial_scale, sampling_ratio, True, "avg", True)


def ps_roi_align_backward(grad_output, input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1,
                          deterministic=False):
    """Gradient of :func:`ps_roi_align` with respect to input; ``deterministic`` as in
    :func:`roi_align_backward`. Returns RoIAlignGrads(input)."""
    return _run_backward(grad_output, input, boxes, output_size, spatial_scale, sampling_ratio, True, "avg", True,
                         deterministic)


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _random_boxes(rng, N, H, W, K):
    """Boxes in, across and outside the image, some degenerate; image coordinates for spatial_scale 0.5."""
    x1, y1 = rng.uniform(-8, 2 * W, K), rng.uniform(-8, 2 * H, K)
    w, h = rng.uniform(0, W, K), rng.uniform(0, H, K)
    w[::7] = 0.0  # zero-size boxes
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64)


def _roi_inputs(rng, options, channels=6):
    return {"input": rng.standard_normal((2, channels, 9, 11)), "boxes": _random_boxes(rng, 2, 9, 11, 12)}


testing.register(testing.OpCheck(
    name="roi_align",
    make_inputs=_roi_inputs,
    forward=roi_align,
    backward=roi_align_backward,
    options=tuple(dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=ratio, aligned=aligned,
                       pool_mode=mode)
                  for mode in POOL_MODES for aligned in (False, True) for ratio in (-1, 2))))

testing.register(testing.OpCheck(
    name="ps_roi_align",
    make_inputs=lambda rng, options: _roi_inputs(rng, options, channels=2 * 3 * 4),
    forward=ps_roi_align,
    backward=ps_roi_align_backward,
    options=tuple(dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=ratio) for ratio in (-1, 2))))

# ------------------------------------------------------------------------------- deformable RoI pooling

class DeformRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_roi_pool`; None where an input is absent or not asked for."""

    input: Optional[object]
    offset: Optional[object]
    mask: Optional[object]


def _check_deform(input, rois, offset, mask, PH, PW, gamma):
    K = len(rois)
    for name, array, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if array is not None:
            layout = f"(K, {channels}, PH, PW)"
            _validate.floating(name, array, 4, layout)
            _validate.shape(name, array, (K, channels, PH, PW), layout)
    _validate.same_dtype(input=input, offset=offset, mask=mask)
    return _validate.real("gamma", gamma)


def _deform_arguments(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, **others):
    """Import and check a forward's (or, with grad_output in others, a backward's) arguments: (call, input,
    rois, offset, mask, others' arrays, (PH, PW, spatial_scale, sampling_ratio, gamma))."""
    call, (input, rois, *arrays, offset, mask) = _validate.prepare_boxes("rois", input=input, rois=rois, **others,
                                                                         offset=offset, mask=mask)
    PH, PW, spatial_scale, sampling_ratio, _ = _check(call, input, rois, output_size, spatial_scale, sampling_ratio,
                                                      True, "avg", False, "rois")
    gamma = _check_deform(input, rois, offset, mask, PH, PW, gamma)
    return call, input, rois, offset, mask, dict(zip(others, arrays)), (PH, PW, spatial_scale, sampling_ratio, gamma)


def _deform_output_shape(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                  mask=None) -> tuple:
    """The shape of deform_roi_pool's output, raising its argument errors."""
    _, input, rois, *_, (PH, PW, _, _, _) = _deform_arguments(input, rois, offset, output_size, spatial_scale,
                                                       sampling_ratio, gamma, mask)
    return (len(rois), input.shape[1], PH, PW)


def _shift(rois, offset, PH, PW, spatial_scale, sampling_ratio, gamma, dtype):
    """Pixel shift (K, 2, PH, PW) of every bin's start: γ · RoI size · offset (channel 0 = x)."""
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, True, dtype)
    scale = np.stack([g.roi_w, g.roi_h], axis=1)[:, :, None, None]
    return dtype.type(gamma) * scale * offset.astype(dtype)


def _deform_forward_numpy(input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma):
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
    rois = rois.astype(dtype)
    out = np.zeros((len(rois), C, PH, PW), dtype)
    n_columns = N * (H * W + 1)
    for k0, k1 in _roi_chunks(rois, H, W, PH, PW, spatial_scale, sampling_ratio, True, dtype):
        shift = None if offset is None else _shift(rois[k0:k1], offset[k0:k1], PH, PW, spatial_scale, sampling_ratio,
                                                   gamma, dtype)
        S = _bin_matrix(_samples(rois[k0:k1], H, W, PH, PW, spatial_scale, sampling_ratio, True, dtype, shift),
                        n_columns)

        def work(c0, c1):
            values = S @ _bilinear.pixels_last(input[:, c0:c1], dtype)
            out[k0:k1, c0:c1] = values.reshape(k1 - k0, PH, PW, c1 - c0).transpose(0, 3, 1, 2)

        _bilinear.for_each_chunk(work, _workspace.channel_blocks(C, n_columns, dtype.itemsize))
    if mask is not None:
        out *= mask.astype(dtype)
    return out.astype(input.dtype, copy=False)


def _deform_backward_numpy(grad_output, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma,
                           wanted):
    want_input, want_offset, want_mask = wanted
    N, C, H, W = input.shape
    dtype = _kernels.compute_dtype(input.dtype)
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

        def work(c0, c1):
            block = blocks.index((c0, c1))
            if want_input:
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
        if want_offset and offset is not None:
            g = _geometry(rois[k0:k1], PH, PW, spatial_scale, sampling_ratio, True, dtype)
            finite = s.finite.reshape(-1, PH, PW)
            with np.errstate(invalid="ignore"):  # non-finite boxes: masked to 0 below
                grad_offset[k0:k1, 0] = np.where(finite, gamma * g.roi_w[:, None, None] * total[0], 0)
                grad_offset[k0:k1, 1] = np.where(finite, gamma * g.roi_h[:, None, None] * total[1], 0)
        if want_mask:
            grad_mask[k0:k1, 0] = total[2]
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_offset, grad_mask))


def _deform_launch_forward(call, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma):
    xp = call.xp
    N, C, H, W = input.shape
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    offset = _kernels.NULL if offset is None else xp.ascontiguousarray(offset)
    mask = _kernels.NULL if mask is None else xp.ascontiguousarray(mask)
    out = _kernels.empty(xp, (len(rois), C, PH, PW), input.dtype)
    _kernels.launch(call.backend, FAMILY, "deform_roi_pool_forward", input.dtype, out.size,
                    (input, rois, offset, mask, out), (len(rois), C, H, W, PH, PW), (sampling_ratio,),
                    (spatial_scale, gamma))
    return out


def _deform_launch_backward(call, grad_output, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma,
                     wanted, deterministic):
    want_input, want_offset, want_mask = wanted
    xp = call.xp
    N, C, H, W = input.shape
    K = len(rois)
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    offset_arg = _kernels.NULL if offset is None else xp.ascontiguousarray(offset)
    mask_arg = _kernels.NULL if mask is None else xp.ascontiguousarray(mask)
    grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype)) if want_input else None  # float32 sums
    grad_offset = _kernels.empty(xp, (K, 2, PH, PW), input.dtype) if want_offset else None
    grad_mask = _kernels.empty(xp, (K, 1, PH, PW), input.dtype) if want_mask else None
    if want_input and K:
        _kernels.launch(call.backend, FAMILY, "deform_roi_pool_backward", input.dtype,
                        N * C if deterministic else grad_output.size,
                        (grad_output, rois, offset_arg, mask_arg, grad_input), (N, K, C, H, W, PH, PW),
                        (sampling_ratio, deterministic), (spatial_scale, gamma))
    if want_offset or want_mask:
        _kernels.launch(call.backend, FAMILY, "deform_roi_pool_backward_offset", input.dtype, K * PH * PW,
                        (grad_output, input, rois, offset_arg, mask_arg,
                         _kernels.NULL if grad_offset is None else grad_offset,
                         _kernels.NULL if grad_mask is None else grad_mask), (K, C, H, W, PH, PW),
                        (sampling_ratio,), (spatial_scale, gamma))
    return None if grad_input is None else grad_input.astype(input.dtype, copy=False), grad_offset, grad_mask


def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None):
    """Deformable RoI pooling: RoIAlign whose bins move by learned offsets, ``y(k) = Σ_j x(p_kj + Δp_k)·Δm_k / n_k``.

    Args:
        input (array[N, C, H, W]): feature maps.
        rois (array[K, 5] or list of array[L, 4]): [batch_index, x1, y1, x2, y2] in input-image
            coordinates, as in :func:`roi_align`.
        offset (array[K, 2, PH, PW] or None): bin offsets, channel 0 = Δx and channel 1 = Δy (the opposite
            order to deform_conv2d), in units of γ · RoI width / height. None: no shift (plain aligned
            RoIAlign). Default: None.
        output_size (int or pair of int): (PH, PW). Default: 7.
        spatial_scale (float): box coordinates to feature-map pixels. Default: 1.0.
        sampling_ratio (int): samples per bin and axis; ≤ 0: ceil(bin size). Default: 0.
        gamma (float): offset scale γ. Default: 0.1.
        mask (array[K, 1, PH, PW] or None): modulation scalars multiplying each pooled bin (v2).
            Default: None.

    Returns:
        array[K, C, PH, PW].

    RoIAlign's geometry with the −0.5 shift and no size clamp (mmcv's); bin (ph, pw) starts at
    x1·scale − 0.5 + γ·roi_w·Δx + pw·bin_w (and likewise y). Samples outside [−1, H] × [−1, W] read 0 but
    are counted. A NaN or ±inf box or offset makes the bin pool to 0 with no gradient. Same as
    mmcv.ops.deform_roi_pool (times the mask for ModulatedDeformRoIPool).

    >>> x = np.random.rand(1, 8, 16, 16).astype(np.float32)
    >>> rois = np.array([[0, 2.0, 2.0, 12.0, 10.0]], np.float32)
    >>> offset = np.zeros((1, 2, 3, 3), np.float32)
    >>> deformcp.deform_roi_pool(x, rois, offset, 3, sampling_ratio=2).shape
    (1, 8, 3, 3)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    call, input, rois, offset, mask, _, (PH, PW, spatial_scale, sampling_ratio, gamma) = _deform_arguments(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask)
    with call.device:
        if call.backend == "numpy":
            out = _deform_forward_numpy(input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma)
        else:
            out = _deform_launch_forward(call, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma)
    return call.export(out)


def deform_roi_pool_backward(grad_output, input, rois, offset=None, output_size=7, spatial_scale=1.0,
                             sampling_ratio=0, gamma=0.1, mask=None, needs_input_grad=(True, True, True),
                             deterministic=False):
    """Gradients of :func:`deform_roi_pool` for input, offset and mask.

    Args:
        grad_output (array[K, C, PH, PW]): gradient of the loss with respect to the output.
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask: as given to
            :func:`deform_roi_pool`.
        needs_input_grad (three bools): which of (input, offset, mask) to differentiate. Default: all.
        deterministic (bool): the input gradient on the host and CUDA backends: False scatter-adds with
            atomics; True gives each input plane to one thread (bitwise reproducible). The offset and mask
            gradients are always deterministic (one thread per bin). Default: False.

    Returns:
        DeformRoIPoolGrads(input, offset, mask); None for an absent offset or mask.

    The offset gradient is the exact derivative of the forward: where RoIAlign clamps a sample into the
    image (y ≤ 0 or y ≥ H − 1) the sample does not move with the offset, so it contributes 0 (mmcv's
    kernel evaluates the bilinear slope at the clamped point instead).
    """
    call, input, rois, offset, mask, arrays, (PH, PW, spatial_scale, sampling_ratio, gamma) = _deform_arguments(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, grad_output=grad_output)
    grad_output = arrays["grad_output"]
    wanted = _validate.needs_grad(needs_input_grad, DeformRoIPoolGrads._fields)
    wanted = tuple(w and a is not None for w, a in zip(wanted, (input, offset, mask)))
    deterministic = _validate.flag("deterministic", deterministic)
    _validate.grad_output(grad_output, (len(rois), input.shape[1], PH, PW), "(K, C, PH, PW)", input=input)
    with call.device:
        if call.backend == "numpy":
            grads = _deform_backward_numpy(grad_output, input, rois, offset, mask, PH, PW, spatial_scale,
                                           sampling_ratio, gamma, wanted)
        else:
            grads = _deform_launch_backward(call, grad_output, input, rois, offset, mask, PH, PW, spatial_scale,
                                     sampling_ratio, gamma, wanted, deterministic)
    return DeformRoIPoolGrads(*(None if g is None else call.export(g) for g in grads))


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _pool_inputs(rng, options):
    K = 10
    arrays = {"input": rng.standard_normal((2, 5, 9, 11)), "rois": _random_boxes(rng, 2, 9, 11, K),
              "offset": rng.standard_normal((K, 2, 3, 4))}
    if options["modulated"]:
        arrays["mask"] = rng.uniform(0, 1, (K, 1, 3, 4))
    return arrays


def _pool_forward(modulated, **arrays):
    return deform_roi_pool(**arrays, output_size=(3, 4), spatial_scale=0.5, sampling_ratio=2, gamma=0.1)


def _pool_backward(grad_output, modulated, **arrays):
    return deform_roi_pool_backward(grad_output, **arrays, output_size=(3, 4), spatial_scale=0.5, sampling_ratio=2,
                                    gamma=0.1)


testing.register(testing.OpCheck(name="deform_roi_pool", make_inputs=_pool_inputs, forward=_pool_forward,
                                 backward=_pool_backward, options=({"modulated": False}, {"modulated": True})))
