"""The NumPy path of deformable position-sensitive RoI pooling: the float64 reference of
kernels/deform_ps_roi_pool.cu. ``cfg`` is the op's checked configuration (deformcp.ops.deform_ps_roi_pool)."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional

import numpy as np
import numpy.typing as npt
import scipy.sparse

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear

if TYPE_CHECKING:
    from ..ops.deform_ps_roi_pool import _Config


def _round_half_away(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """C's round(): half away from zero (NumPy's round is half to even). NaN and ±inf pass through."""
    a = np.abs(x)
    f = np.floor(a)
    rounded: npt.NDArray[Any] = np.copysign(np.where(a - f >= 0.5, f + 1, f), x)
    return rounded


class _Samples(NamedTuple):
    """The samples of a chunk of RoIs, shape (k, num_classes, P, P, spp, spp) before the corner axis (4)."""

    rows: npt.NDArray[np.int64]     # corner rows of _bilinear.pixels_last(input); the image's zero row where skipped
    weight: npt.NDArray[Any]        # bilinear weight / count of the bin
    dx_rows: npt.NDArray[np.int64]  # rows for the w-derivative: the zero row where skipped or w clamped
    dx: npt.NDArray[Any]            # ∂weight/∂w / count
    dy_rows: npt.NDArray[np.int64]
    dy: npt.NDArray[Any]
    move_x: npt.NDArray[Any]        # (k,) trans_std · roi_w: a sample's move per unit of Δx (0 for non-finite RoIs)
    move_y: npt.NDArray[Any]


def _parts(cfg: _Config) -> tuple[npt.NDArray[np.integer[Any]], npt.NDArray[np.integer[Any]]]:
    """Part index and (clamped) group index of each bin row/column: floor(p·S/P), floor(p·G/P), exactly."""
    p = np.arange(cfg.pooled_size)
    return p * cfg.part_size // cfg.pooled_size, np.minimum(p * cfg.group_size // cfg.pooled_size,
                                                            cfg.group_size - 1)


@np.errstate(invalid="ignore", over="ignore")  # non-finite RoIs and offsets are masked out
def _samples(rois: npt.NDArray[Any], offset: Optional[npt.NDArray[Any]], cfg: _Config,
             dtype: np.dtype[Any]) -> _Samples:
    """The samples of rois (k, 5), moved by their offset (k, 2·num_classes, S, S), or not where it is None."""
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
    if offset is None:  # no_trans
        trans_x = trans_y = np.zeros((k, 1, P, P), dtype)
    else:
        pairs = offset.astype(dtype, copy=False).reshape(k, nc, 2, S, S)[:, :, :, part[:, None], part[None, :]]
        trans_x, trans_y = pairs[:, :, 0] * trans_std, pairs[:, :, 1] * trans_std      # (k, nc, P, P)

    def per_roi(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
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
    assert corners.dweight_dx is not None and corners.dweight_dy is not None  # computed: derivatives=True
    image = rois[:, 0].astype(np.int64) * (H * W + 1)
    rows = corners.index + image[:, None, None, None, None, None, None]
    zero_row = (H * W + image)[:, None, None, None, None, None, None]
    count = count[..., None]
    return _Samples(rows=rows, weight=corners.weight / count,
                    dx_rows=np.where(free_x, rows, zero_row), dx=np.where(free_x, corners.dweight_dx, 0) / count,
                    dy_rows=np.where(free_y, rows, zero_row), dy=np.where(free_y, corners.dweight_dy, 0) / count,
                    move_x=np.where(finite, trans_std * roi_w, 0), move_y=np.where(finite, trans_std * roi_h, 0))


def _roi_chunks(cfg: _Config) -> list[tuple[int, int]]:
    """Ranges of RoIs of about _workspace.PS_ROI_SAMPLES_PER_CHUNK samples."""
    samples_per_roi = cfg.num_classes * cfg.pooled_size ** 2 * cfg.sample_per_part ** 2
    return _workspace.ranges(cfg.K, max(1, _workspace.PS_ROI_SAMPLES_PER_CHUNK // samples_per_roi))


def _groups(cfg: _Config) -> Iterator[tuple[int, npt.NDArray[np.intp], npt.NDArray[np.intp], slice]]:
    """(class, bin rows ph, bin columns pw, input channel slice) per (class, gh, gw): the bins that read one
    set of channels. Output channel ctop of class cl and bin (ph, pw) reads input channel ctop·G² + gh·G + gw;
    the groups partition both the output elements and the input channels, so they can run concurrently."""
    G, cec = cfg.group_size, cfg.channels_each_class
    group = _parts(cfg)[1]
    for cl, gh, gw in itertools.product(range(cfg.num_classes), range(G), range(G)):
        phs, pws = np.flatnonzero(group == gh), np.flatnonzero(group == gw)
        if len(phs) and len(pws):
            yield cl, phs, pws, slice(cl * cec * G * G + gh * G + gw, (cl + 1) * cec * G * G, G * G)


def _matrix(rows: npt.NDArray[np.int64], values: npt.NDArray[Any], cl: int, phs: npt.NDArray[np.intp],
            pws: npt.NDArray[np.intp], n_columns: int) -> scipy.sparse.csr_matrix:
    """CSR matrix of the bins (k, ph, pw) of class cl: row = Σ over the bin's samples and corners."""
    select = (slice(None), cl, phs[:, None], pws[None, :])
    rows, values = rows[select], values[select]          # (k, |phs|, |pws|, spp, spp, 4)
    per_row = int(np.prod(rows.shape[3:]))
    n_rows = int(np.prod(rows.shape[:3]))
    return _bilinear.sparse_rows(values.reshape(-1), rows.reshape(-1), np.arange(0, n_rows * per_row + 1, per_row),
                                 n_columns)


def _group_grad(grad_output: npt.NDArray[Any], cl: int, phs: npt.NDArray[np.intp], pws: npt.NDArray[np.intp],
                cfg: _Config) -> npt.NDArray[Any]:
    """grad_output of one group as rows (k, ph, pw) × the class's channels."""
    cec = cfg.channels_each_class
    g = grad_output[:, cl * cec:(cl + 1) * cec][:, :, phs[:, None], pws[None, :]]
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1).reshape(-1, cec))


def _channels_last(cache: dict[int, npt.NDArray[Any]], input: npt.NDArray[Any], channels: slice,
                   dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """_bilinear.pixels_last of a group's channels, kept across RoI chunks (each group is one thread's)."""
    X = cache.get(channels.start)
    if X is None:
        X = cache[channels.start] = _bilinear.pixels_last(input[:, channels], dtype)
    return X


def deform_ps_roi_pool(input: npt.NDArray[Any], rois: npt.NDArray[Any], offset: Optional[npt.NDArray[Any]],
                       cfg: _Config) -> npt.NDArray[Any]:
    """The output (K, output_dim, P, P)."""
    dtype = compute_dtype(input.dtype)
    P, cec = cfg.pooled_size, cfg.channels_each_class
    out = np.zeros((cfg.K, P, P, cfg.output_dim), dtype)  # channels last, transposed at the end
    n_columns = cfg.N * (cfg.H * cfg.W + 1)
    groups = list(_groups(cfg))
    images: dict[int, npt.NDArray[Any]] = {}
    trans = None if cfg.no_trans else offset  # not read with no_trans
    for k0, k1 in _roi_chunks(cfg):
        s = _samples(rois[k0:k1], None if trans is None else trans[k0:k1], cfg, dtype)

        def work(g0: int, g1: int) -> None:
            for cl, phs, pws, channels in groups[g0:g1]:
                X = _channels_last(images, input, channels, dtype)
                values = _matrix(s.rows, s.weight, cl, phs, pws, n_columns) @ X
                out[k0:k1, phs[:, None], pws[None, :], cl * cec:(cl + 1) * cec] = values.reshape(
                    k1 - k0, len(phs), len(pws), cec)

        _bilinear.for_each_chunk(work, _workspace.ranges(len(groups), 1))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)).astype(input.dtype, copy=False)


def deform_ps_roi_pool_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], rois: npt.NDArray[Any],
                                offset: Optional[npt.NDArray[Any]], cfg: _Config, wanted: tuple[bool, bool]
                                ) -> tuple[Optional[npt.NDArray[Any]], Optional[npt.NDArray[Any]]]:
    """(grad_input, grad_offset), None where not wanted; the offset gradient is 0 with no_trans."""
    want_input, want_offset = wanted
    dtype = compute_dtype(input.dtype)
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
    images: dict[int, npt.NDArray[Any]] = {}
    trans = None if cfg.no_trans else offset  # not read with no_trans
    for k0, k1 in _roi_chunks(cfg):
        s = _samples(rois[k0:k1], None if trans is None else trans[k0:k1], cfg, dtype)
        move_x[k0:k1], move_y[k0:k1] = s.move_x, s.move_y

        def work(g0: int, g1: int) -> None:
            for cl, phs, pws, channels in groups[g0:g1]:
                G_rows = _group_grad(grad_output[k0:k1], cl, phs, pws, cfg)
                if grad_input is not None:
                    rows = _matrix(s.rows, s.weight, cl, phs, pws, n_columns).T @ G_rows
                    view = grad_input[:, channels]
                    view += rows.reshape(cfg.N, cfg.H * cfg.W + 1, -1)[:, :-1].transpose(0, 2, 1).reshape(view.shape)
                if shift_x is not None and shift_y is not None:  # want_offset
                    X = _channels_last(images, input, channels, dtype)
                    for shift, rows, values in ((shift_x, s.dx_rows, s.dx), (shift_y, s.dy_rows, s.dy)):
                        d = np.vecdot(_matrix(rows, values, cl, phs, pws, n_columns) @ X, G_rows)
                        shift[k0:k1, cl, phs[:, None], pws[None, :]] = d.reshape(k1 - k0, len(phs), len(pws))

        _bilinear.for_each_chunk(work, _workspace.ranges(len(groups), 1))
    grad_offset: Optional[npt.NDArray[Any]] = None
    if shift_x is not None and shift_y is not None:  # want_offset
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
