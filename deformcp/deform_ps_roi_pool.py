"""Deformable position-sensitive RoI pooling (Deformable ConvNets v1), forward and backward.

Dai et al., "Deformable Convolutional Networks", ICCV 2017, https://arxiv.org/abs/1703.06211. Semantics of
the original DCNv1 DeformablePSROIPooling operator (MXNet, and mmcv's DeformRoIPoolingFunction):
per-class, per-part offsets, samples not centred in their sub-bins, samples outside the image skipped and
not counted. Kernels: kernels/deform_ps_roi_pool.cu.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import numpy as np

from . import _bilinear, _kernels, _validate, _workspace, testing
from .roi_align import MAX_SAMPLES_PER_AXIS

FAMILY = "deform_ps_roi_pool"
_OFFSET_LAYOUT = "(K, 2·num_classes, part_size, part_size)"


class DeformPSRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_ps_roi_pool` (rois get none)."""

    input: Optional[object]
    offset: Optional[object]


class _Config(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    K: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    num_classes: int
    spatial_scale: float
    trans_std: float
    no_trans: bool

    @property
    def channels_each_class(self) -> int:
        return self.output_dim // self.num_classes

    @property
    def sizes(self) -> tuple:
        """The kernels' size arguments after N: K, C, H, W, C_out, P, S, G, num_classes, spp."""
        return (self.K, self.C, self.H, self.W, self.output_dim, self.pooled_size, self.part_size,
                self.group_size, self.num_classes, self.sample_per_part)


# --------------------------------------------------------------------------------------- arguments

def _positive(name: str, value, maximum: int = _validate.INT_MAX) -> int:
    return _validate.integer(name, value, maximum, minimum=1)


def _check(call, input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part,
           spatial_scale, trans_std, no_trans) -> _Config:
    _validate.floating("input", input, 4, "(N, C, H, W)")
    _validate.floating("rois", rois, 2, _validate.ROIS_LAYOUT)
    _validate.shape("rois", rois, (None, 5), _validate.ROIS_LAYOUT)
    no_trans = _validate.flag("no_trans", no_trans)
    output_dim = _positive("output_dim", output_dim)
    group_size = _positive("group_size", group_size)
    pooled_size = _positive("pooled_size", pooled_size)
    part_size = pooled_size if part_size is None else _positive("part_size", part_size)
    sample_per_part = _positive("sample_per_part", sample_per_part, MAX_SAMPLES_PER_AXIS)
    spatial_scale = _validate.real("spatial_scale", spatial_scale, positive=True)
    trans_std = _validate.real("trans_std", trans_std)
    N, C, H, W = input.shape
    K = rois.shape[0]
    if C != output_dim * group_size ** 2:
        raise ValueError(f"input: expected C = output_dim·group_size² = {output_dim}·{group_size}² = "
                         f"{output_dim * group_size ** 2} channels in (N, C, H, W), got shape {tuple(input.shape)}")
    num_classes = 1
    if offset is None:
        if not no_trans:
            raise ValueError(f"offset: expected an array {_OFFSET_LAYOUT} (None only with no_trans=True), got None")
    else:
        _validate.floating("offset", offset, offset.ndim if no_trans else 4, _OFFSET_LAYOUT)
        if not no_trans:  # with no_trans the offset is not read (mmcv passes an empty one): any shape
            _validate.shape("offset", offset, (K, None, part_size, part_size), _OFFSET_LAYOUT)
            if offset.shape[1] == 0 or offset.shape[1] % 2:
                raise ValueError(f"offset: expected an even, positive number 2·num_classes of channels in "
                                 f"{_OFFSET_LAYOUT}, got shape {tuple(offset.shape)}")
            num_classes = offset.shape[1] // 2
            if output_dim % num_classes:
                raise ValueError(f"output_dim: expected a multiple of num_classes = offset.shape[1] / 2 = "
                                 f"{num_classes}, got {output_dim}")
    _validate.same_dtype(input=input, rois=rois, offset=offset)
    _validate.output_fits("pooled_size", (K, output_dim, pooled_size, pooled_size), input.dtype)
    _validate.rois("rois", call, rois, input)
    return _Config(N, C, H, W, K, output_dim, group_size, pooled_size, part_size, sample_per_part, num_classes,
                   spatial_scale, trans_std, no_trans)


def _output_shape(input, rois, offset, output_dim, group_size, pooled_size, part_size=None, sample_per_part=4,
                  spatial_scale=1.0, trans_std=0.0, no_trans=False) -> tuple:
    """The shape of deform_ps_roi_pool's output, raising its argument errors."""
    call, arrays = _validate.prepare_boxes("rois", input=input, rois=rois, offset=offset)
    cfg = _check(call, *arrays, output_dim, group_size, pooled_size, part_size, sample_per_part, spatial_scale,
                 trans_std, no_trans)
    return (cfg.K, cfg.output_dim, cfg.pooled_size, cfg.pooled_size)


# ------------------------------------------------------------------------------------ NumPy path

def _round_half_away(x):
    """C's round(): half away from zero (NumPy's round is half to even). NaN and ±inf pass through."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(np.where(a - f >= 0.5, f + 1, f), x)


class _Samples(NamedTuple):
    """The samples of a chunk of RoIs, shape (k, num_classes, P, P, spp, spp) before the corner axis (4)."""

    rows: np.ndarray       # corner rows of _bilinear.pixels_last(input); the image's zero row where skipped
    weight: np.ndarray     # bilinear weight / count of the bin
    dx_rows: np.ndarray    # rows for the w-derivative: the zero row where skipped or w clamped
    dx: np.ndarray         # ∂weight/∂w / count
    dy_rows: np.ndarray
    dy: np.ndarray
    move_x: np.ndarray     # (k,) trans_std · roi_w: a sample's move per unit of Δx (0 for non-finite RoIs)
    move_y: np.ndarray


def _parts(cfg: _Config):
    """Part index and (clamped) group index of each bin row/column: floor(p·S/P), floor(p·G/P), exactly."""
    p = np.arange(cfg.pooled_size)
    return p * cfg.part_size // cfg.pooled_size, np.minimum(p * cfg.group_size // cfg.pooled_size,
                                                            cfg.group_size - 1)


@np.errstate(invalid="ignore", over="ignore")  # non-finite RoIs and offsets are masked out
def _samples(rois, offset, cfg: _Config, dtype) -> _Samples:
    k, nc, P, spp, S = len(rois), cfg.num_classes, cfg.pooled_size, cfg.sample_per_part, cfg.part_size
    H, W = cfg.H, cfg.W
    scale, half, trans_std = dtype.type(cfg.spatial_scale), dtype.type(0.5), dtype.type(cfg.trans_std)
    rois = rois.astype(dtype, copy=False)
    x1, y1, x2, y2 = (_round_half_away(rois[:, i]) for i in range(1, 5))
    start_w, start_h = x1 * scale - half, y1 * scale - half
    roi_w = ((x2 + dtype.type(1)) * scale - half) - start_w
    roi_h = ((y2 + dtype.type(1)) * scale - half) - start_h
    finite = np.isfinite(start_w) & np.isfinite(start_h) & np.isfinite(roi_w) & np.isfinite(roi_h)
    roi_w = np.where(roi_w > dtype.type(0.1), roi_w, dtype.type(0.1))
    roi_h = np.where(roi_h > dtype.type(0.1), roi_h, dtype.type(0.1))
    bin_w, bin_h = roi_w / dtype.type(P), roi_h / dtype.type(P)
    sub_w, sub_h = bin_w / dtype.type(spp), bin_h / dtype.type(spp)
    part = _parts(cfg)[0]
    if cfg.no_trans:
        trans_x = trans_y = np.zeros((k, 1, P, P), dtype)
    else:
        pairs = offset.astype(dtype, copy=False).reshape(k, nc, 2, S, S)[:, :, :, part[:, None], part[None, :]]
        trans_x, trans_y = pairs[:, :, 0] * trans_std, pairs[:, :, 1] * trans_std      # (k, nc, P, P)

    def per_roi(a):
        return a[:, None, None, None]

    p = np.arange(P, dtype=dtype)
    # the kernels' order of operations: (p·bin + start) + trans·size, then + i·sub
    wstart = (p[None, None, None, :] * per_roi(bin_w) + per_roi(start_w)) + trans_x * per_roi(roi_w)
    hstart = (p[None, None, :, None] * per_roi(bin_h) + per_roi(start_h)) + trans_y * per_roi(roi_h)
    i = np.arange(spp, dtype=dtype)
    shape = (k, nc, P, P, spp, spp)
    w = np.broadcast_to(wstart[..., None, None] + i * sub_w[:, None, None, None, None, None], shape)
    h = np.broadcast_to(hstart[..., None, None] + i[:, None] * sub_h[:, None, None, None, None, None], shape)
    counted = (w >= -half) & (w <= W - half) & (h >= -half) & (h <= H - half) & finite[:, None, None, None, None,
                                                                                         None]
    count = np.maximum(counted.sum(axis=(-2, -1), keepdims=True), 1).astype(dtype)
    free_x = (counted & (w > 0) & (w < W - 1))[..., None]
    free_y = (counted & (h > 0) & (h < H - 1))[..., None]
    outside = dtype.type(-2)  # makes _bilinear.corners skip the sample (zero row, weight 0)
    corners = _bilinear.corners(np.where(counted, np.clip(h, 0, H - 1), outside),
                                np.where(counted, np.clip(w, 0, W - 1), outside), H, W)
    image = rois[:, 0].astype(np.int64) * (H * W + 1)
    rows = corners.index + image[:, None, None, None, None, None, None]
    zero_row = (H * W + image)[:, None, None, None, None, None, None]
    count = count[..., None]
    return _Samples(rows=rows, weight=corners.weight / count,
                    dx_rows=np.where(free_x, rows, zero_row), dx=np.where(free_x, corners.dweight_dx, 0) / count,
                    dy_rows=np.where(free_y, rows, zero_row), dy=np.where(free_y, corners.dweight_dy, 0) / count,
                    move_x=np.where(finite, trans_std * roi_w, 0), move_y=np.where(finite, trans_std * roi_h, 0))


def _roi_chunks(cfg: _Config):
    """Ranges of RoIs of about _workspace.PS_ROI_SAMPLES_PER_CHUNK samples."""
    samples_per_roi = cfg.num_classes * cfg.pooled_size ** 2 * cfg.sample_per_part ** 2
    return _workspace.ranges(cfg.K, max(1, _workspace.PS_ROI_SAMPLES_PER_CHUNK // samples_per_roi))


def _groups(cfg: _Config):
    """(class, bin rows ph, bin columns pw, input channel slice) per (class, gh, gw): the bins that read one
    set of channels. Output channel ctop of class cl and bin (ph, pw) reads input channel ctop·G² + gh·G + gw;
    the groups partition both the output elements and the input channels, so they can run concurrently."""
    G, cec = cfg.group_size, cfg.channels_each_class
    group = _parts(cfg)[1]
    for cl, gh, gw in itertools.product(range(cfg.num_classes), range(G), range(G)):
        phs, pws = np.flatnonzero(group == gh), np.flatnonzero(group == gw)
        if len(phs) and len(pws):
            yield cl, phs, pws, slice(cl * cec * G * G + gh * G + gw, (cl + 1) * cec * G * G, G * G)


def _matrix(rows, values, cl, phs, pws, n_columns):
    """CSR matrix of the bins (k, ph, pw) of class cl: row = Σ over the bin's samples and corners."""
    select = (slice(None), cl, phs[:, None], pws[None, :])
    rows, values = rows[select], values[select]          # (k, |phs|, |pws|, spp, spp, 4)
    per_row = int(np.prod(rows.shape[3:]))
    n_rows = int(np.prod(rows.shape[:3]))
    return _bilinear.sparse_rows(values.reshape(-1), rows.reshape(-1), np.arange(0, n_rows * per_row + 1, per_row),
                                 n_columns)


def _group_grad(grad_output, cl, phs, pws, cfg: _Config):
    """grad_output of one group as rows (k, ph, pw) × the class's channels."""
    cec = cfg.channels_each_class
    g = grad_output[:, cl * cec:(cl + 1) * cec][:, :, phs[:, None], pws[None, :]]
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1).reshape(-1, cec))


def _channels_last(cache: dict, input, channels: slice, dtype):
    """_bilinear.pixels_last of a group's channels, kept across RoI chunks (each group is one thread's)."""
    X = cache.get(channels.start)
    if X is None:
        X = cache[channels.start] = _bilinear.pixels_last(input[:, channels], dtype)
    return X


def _forward_numpy(input, rois, offset, cfg: _Config):
    dtype = _kernels.compute_dtype(input.dtype)
    P, cec = cfg.pooled_size, cfg.channels_each_class
    out = np.zeros((cfg.K, P, P, cfg.output_dim), dtype)  # channels last, transposed at the end
    n_columns = cfg.N * (cfg.H * cfg.W + 1)
    groups = list(_groups(cfg))
    images = {}
    for k0, k1 in _roi_chunks(cfg):
        s = _samples(rois[k0:k1], None if cfg.no_trans else offset[k0:k1], cfg, dtype)

        def work(g0, g1):
            for cl, phs, pws, channels in groups[g0:g1]:
                X = _channels_last(images, input, channels, dtype)
                values = _matrix(s.rows, s.weight, cl, phs, pws, n_columns) @ X
                out[k0:k1, phs[:, None], pws[None, :], cl * cec:(cl + 1) * cec] = values.reshape(
                    k1 - k0, len(phs), len(pws), cec)

        _bilinear.for_each_chunk(work, _workspace.ranges(len(groups), 1))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(input.dtype, copy=False)


def _backward_numpy(grad_output, input, rois, offset, cfg: _Config, want_input, want_offset):
    dtype = _kernels.compute_dtype(input.dtype)
    K, P, S, nc = cfg.K, cfg.pooled_size, cfg.part_size, cfg.num_classes
    n_columns = cfg.N * (cfg.H * cfg.W + 1)
    grad_output = grad_output.astype(dtype, copy=False)
    grad_input = np.zeros(input.shape, dtype) if want_input else None
    want_offset = want_offset and not cfg.no_trans
    # per bin: Σ_channels grad_output · ∂(bin value)/∂(sample shift), along x and y
    shift_x = np.zeros((K, nc, P, P), dtype) if want_offset else None
    shift_y = np.zeros((K, nc, P, P), dtype) if want_offset else None
    move_x = np.zeros(K, dtype)
    move_y = np.zeros(K, dtype)
    groups = list(_groups(cfg))
    images = {}
    for k0, k1 in _roi_chunks(cfg):
        s = _samples(rois[k0:k1], None if cfg.no_trans else offset[k0:k1], cfg, dtype)
        move_x[k0:k1], move_y[k0:k1] = s.move_x, s.move_y

        def work(g0, g1):
            for cl, phs, pws, channels in groups[g0:g1]:
                G_rows = _group_grad(grad_output[k0:k1], cl, phs, pws, cfg)
                if want_input:
                    rows = _matrix(s.rows, s.weight, cl, phs, pws, n_columns).T @ G_rows
                    view = grad_input[:, channels]
                    view += rows.reshape(cfg.N, cfg.H * cfg.W + 1, -1)[:, :-1].transpose(0, 2, 1).reshape(view.shape)
                if want_offset:
                    X = _channels_last(images, input, channels, dtype)
                    for shift, rows, values in ((shift_x, s.dx_rows, s.dx), (shift_y, s.dy_rows, s.dy)):
                        d = np.vecdot(_matrix(rows, values, cl, phs, pws, n_columns) @ X, G_rows)
                        shift[k0:k1, cl, phs[:, None], pws[None, :]] = d.reshape(k1 - k0, len(phs), len(pws))

        _bilinear.for_each_chunk(work, _workspace.ranges(len(groups), 1))
    grad_offset = None
    if want_offset:
        # the bins of one part share its offset pair: sum them (bincount: a NaN stays in its own part)
        part = _parts(cfg)[0]
        target = ((np.arange(K)[:, None, None, None] * nc + np.arange(nc)[:, None, None]) * S
                  + part[:, None]) * S + part
        target = np.broadcast_to(target, (K, nc, P, P)).reshape(-1)
        grad_offset = np.empty((K, nc, 2, S, S), dtype)
        for axis, shift, move in ((0, shift_x, move_x), (1, shift_y, move_y)):
            summed = np.bincount(target, shift.reshape(-1), minlength=K * nc * S * S).reshape(K, nc, S, S)
            with np.errstate(invalid="ignore"):  # an overflowed move times a zero sum: 0, as in the kernels
                grad_offset[:, :, axis] = np.where(summed == 0, 0, summed * move[:, None, None, None])
        grad_offset = grad_offset.reshape(K, 2 * nc, S, S).astype(input.dtype)
    elif offset is not None:
        grad_offset = np.zeros(offset.shape, input.dtype)
    return (None if grad_input is None else grad_input.astype(input.dtype, copy=False)), grad_offset


# ---------------------------------------------------------------------------------------- kernels

def _launch_forward(call, input, rois, offset, cfg: _Config):
    xp = call.xp
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    offset = _kernels.NULL if cfg.no_trans else xp.ascontiguousarray(offset)
    out = _kernels.empty(xp, (cfg.K, cfg.output_dim, cfg.pooled_size, cfg.pooled_size), input.dtype)
    _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_forward", input.dtype, out.size,
                    (input, rois, offset, out), cfg.sizes, (cfg.no_trans,), (cfg.spatial_scale, cfg.trans_std))
    return out


def _launch_backward(call, grad_output, input, rois, offset, cfg: _Config, want_input, want_offset, deterministic):
    xp = call.xp
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    trans = _kernels.NULL if cfg.no_trans else xp.ascontiguousarray(offset)
    offset_kernel = want_offset and not cfg.no_trans and cfg.K > 0  # else the offset gradient is all zeros
    sums = _kernels.compute_dtype(input.dtype)  # scatter-added gradients are summed in float32 for 16-bit input
    grad_input = xp.zeros(input.shape, sums) if want_input else None
    if deterministic and offset_kernel:  # the kernel writes every element
        grad_offset = _kernels.empty(xp, offset.shape, offset.dtype)
    else:
        grad_offset = xp.zeros(offset.shape, sums) if want_offset else None
    options, reals = (cfg.no_trans,), (cfg.spatial_scale, cfg.trans_std)
    if cfg.K and (want_input or offset_kernel) and not deterministic:
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward", input.dtype, grad_output.size,
                        (grad_output, input, rois, trans, _kernels.NULL if grad_input is None else grad_input,
                         grad_offset if offset_kernel else _kernels.NULL), cfg.sizes, options, reals)
    if cfg.K and want_input and deterministic:
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward_input", input.dtype, cfg.N * cfg.C,
                        (grad_output, input, rois, trans, grad_input), (cfg.N, *cfg.sizes), options, reals)
    if offset_kernel and deterministic:
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward_offset", input.dtype,
                        grad_offset.size // 2, (grad_output, input, rois, trans, grad_offset), cfg.sizes, options,
                        reals)
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_offset))


# ------------------------------------------------------------------------------------------ public

def deform_ps_roi_pool(input, rois, offset, output_dim, group_size, pooled_size, part_size=None, sample_per_part=4,
                       spatial_scale=1.0, trans_std=0.0, no_trans=False):
    """Deformable position-sensitive RoI pooling (Deformable ConvNets v1), as the original operator.

    Args:
        input (array[N, C, H, W]): score maps, C = output_dim · group_size².
        rois (array[K, 5] or list of array[L, 4]): [batch_index, x1, y1, x2, y2] in input-image
            coordinates, or one [x1, y1, x2, y2] array per image (as in :func:`roi_align`); same dtype as
            input; batch indices must be integers in [0, N). Corners are rounded to integers (half away
            from zero, like C's round) and the box is inclusive: x2 + 1 is its right edge.
        offset (array[K, 2·num_classes, part_size, part_size] or None): normalised offsets per RoI, class
            and part; channel 2·cls is Δx and 2·cls + 1 is Δy (note: the opposite order to deform_conv2d).
            num_classes = offset.shape[1] / 2 must divide output_dim. Not read with ``no_trans`` (may then
            be None, or any array, e.g. mmcv's empty one).
        output_dim (int): output channels.
        group_size (int): G, position-sensitive groups per axis.
        pooled_size (int): P, bins per axis.
        part_size (int): S, offset parts per axis. Default: pooled_size.
        sample_per_part (int): samples per bin along each axis. Default: 4.
        spatial_scale (float): maps RoI coordinates to feature-map pixels (e.g. 1/16). Default: 1.0.
        trans_std (float): scale of the offsets. Default: 0.0.
        no_trans (bool): plain position-sensitive pooling, no offsets (num_classes = 1). Default: False.

    Returns:
        array[K, output_dim, P, P].

    Per output (k, ctop, ph, pw): start = round(x1)·spatial_scale − 0.5, end = (round(x2) + 1)·spatial_scale
    − 0.5, roi_w = max(end − start, 0.1) (likewise y), bin = roi / P, sub_bin = bin / sample_per_part; the
    class is ctop / (output_dim / num_classes), the part (ph·S / P, pw·S / P) (integer division: exact, where
    the original's float arithmetic picks part 12 for bin 13 at P = S = 22); Δ = offset·trans_std;
    wstart = pw·bin_w + start_w + Δx·roi_w. Samples (ih, iw) in [0, sample_per_part)² sit at
    (hstart + ih·sub_bin_h, wstart + iw·sub_bin_w) — not centred. A sample outside
    [−0.5, H − 0.5] × [−0.5, W − 0.5] is skipped and not counted; inside, it is clamped to [0, H − 1] ×
    [0, W − 1] and read bilinearly from input channel (ctop·G + gh)·G + gw, gh = min(ph·G / P, G − 1)
    (likewise gw). The bin averages its counted samples, 0 if none. A RoI with a NaN or ±inf coordinate
    pools to 0 and gets no gradient; a NaN or ±inf offset (or trans_std·offset) moves its samples to NaN
    or ±inf, where they are skipped.

    Dai et al., "Deformable Convolutional Networks", ICCV 2017, https://arxiv.org/abs/1703.06211 (section
    2.2, deformable position-sensitive RoI pooling).

    >>> x = np.random.rand(2, 3 * 7 * 7, 32, 32).astype(np.float32)
    >>> rois = np.array([[0, 2, 3, 20, 18], [1, 0, 0, 31, 31]], np.float32)
    >>> offset = 0.1 * np.random.randn(2, 2, 7, 7).astype(np.float32)
    >>> deformcp.deform_ps_roi_pool(x, rois, offset, 3, 7, 7, trans_std=0.1).shape
    (2, 3, 7, 7)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    call, (input, rois, offset) = _validate.prepare_boxes("rois", input=input, rois=rois, offset=offset)
    cfg = _check(call, input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part,
                 spatial_scale, trans_std, no_trans)
    with call.device:
        if call.backend == "numpy":
            out = _forward_numpy(input, rois, offset, cfg)
        else:
            out = _launch_forward(call, input, rois, offset, cfg)
    return call.export(out)


def deform_ps_roi_pool_backward(grad_output, input, rois, offset, output_dim, group_size, pooled_size,
                                part_size=None, sample_per_part=4, spatial_scale=1.0, trans_std=0.0, no_trans=False,
                                needs_input_grad=(True, True), deterministic=False):
    """Gradients of :func:`deform_ps_roi_pool` with respect to input and offset.

    Args:
        grad_output (array[K, output_dim, P, P]): gradient of the loss with respect to the output.
        input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part,
            spatial_scale, trans_std, no_trans: as given to :func:`deform_ps_roi_pool`.
        needs_input_grad (pair of bool): which of (input, offset) to compute. Default: both.
        deterministic (bool): on the host and CUDA backends, False scatter-adds with atomics (float sums may
            differ in the last bits between runs); True gives each input plane, and each offset pair, to one
            thread that adds its bins in a fixed order: bitwise identical run to run. The NumPy path is
            always deterministic. Default: False.

    Returns:
        DeformPSRoIPoolGrads: ``input`` (array[N, C, H, W]) and ``offset`` (array of offset's shape; zeros
        with ``no_trans``; None where not asked for or where offset is None).

    The input gradient sends grad / count along the bilinear weights of every counted sample. The offset
    gradient is the exact derivative of the forward: ∂/∂Δx = trans_std·roi_w·Σ_samples ∂value/∂w ·
    grad / count, summed over the bins (channels of the class, bins of the part) that share the offset,
    where ∂value/∂w is 0 where w was clamped (w ≤ 0 or w ≥ W − 1) and the bilinear derivative taken from
    the right at integer coordinates otherwise (likewise y). This deliberately differs from the original
    CUDA code, which evaluates the derivative at the clamped point (non-zero at the border) and interpolates
    between floor and ceil (zero at integer coordinates): deformcp's gradient matches finite differences.
    Samples crossing the image border (count changing) are not differentiable and contribute nothing.
    """
    call, (grad_output, input, rois, offset) = _validate.prepare_boxes("rois", grad_output=grad_output, input=input,
                                                                       rois=rois, offset=offset)
    cfg = _check(call, input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part,
                 spatial_scale, trans_std, no_trans)
    want_input, want_offset = _validate.needs_grad(needs_input_grad, DeformPSRoIPoolGrads._fields)
    want_offset = want_offset and offset is not None
    deterministic = _validate.flag("deterministic", deterministic)
    P = cfg.pooled_size
    _validate.grad_output(grad_output, (cfg.K, cfg.output_dim, P, P), "(K, output_dim, P, P)", input=input)
    with call.device:
        if call.backend == "numpy":
            grads = _backward_numpy(grad_output, input, rois, offset, cfg, want_input, want_offset)
        else:
            grads = _launch_backward(call, grad_output, input, rois, offset, cfg, want_input, want_offset,
                                     deterministic)
    grad_input, grad_offset = grads
    return DeformPSRoIPoolGrads(None if grad_input is None else call.export(grad_input),
                                None if not want_offset else call.export(grad_offset))


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _random_rois(rng, N, H, W, K, inside_left_top=False):
    """RoIs in image coordinates for spatial_scale 1/√5 (feature map 2.2× smaller): in, across and outside
    the image, some degenerate. With inside_left_top, x1, y1 ≥ 0: without offsets, a sample can then sit
    exactly on the left/top border only at −0.5 (exact in every precision), so that no count depends on
    the last bit of a coordinate and every dtype compares with the float64 reference."""
    low = 0 if inside_left_top else -8
    x1, y1 = rng.uniform(low, 2.2 * W, K), rng.uniform(low, 2.2 * H, K)
    w, h = rng.uniform(-2, 2.2 * W, K), rng.uniform(-2, 2.2 * H, K)
    w[::5] = 0.0
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1)


CHECK_SCALE = 1 / 5 ** 0.5


def _check_inputs(rng, options):
    N, H, W, K = 2, 9, 11, 10
    G, S = options["group_size"], options["part_size"]
    return {"input": rng.standard_normal((N, options["output_dim"] * G * G, H, W)),
            "rois": _random_rois(rng, N, H, W, K, inside_left_top=options["no_trans"]),
            "offset": rng.standard_normal((K, 2 * options["num_classes"], S, S))}


def _check_forward(input, rois, offset, num_classes, **options):
    return deform_ps_roi_pool(input, rois, offset, **options)


def _check_backward(grad_output, input, rois, offset, num_classes, **options):
    return deform_ps_roi_pool_backward(grad_output, input, rois, offset, **options)


testing.register(testing.OpCheck(
    name="deform_ps_roi_pool",
    make_inputs=_check_inputs,
    forward=_check_forward,
    backward=_check_backward,
    options=tuple(dict(output_dim=2 * classes, num_classes=classes, group_size=G, pooled_size=P, part_size=S,
                       sample_per_part=spp, spatial_scale=CHECK_SCALE, trans_std=0.25, no_trans=no_trans)
                  for no_trans, G, P, S, spp, classes in ((False, 3, 3, 3, 2, 1), (False, 2, 3, 2, 3, 2),
                                                          (True, 3, 4, 4, 2, 1)))))
