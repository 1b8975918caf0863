"""The NumPy path of deformable convolution v1/v2: the float64 reference of kernels/deform_conv.cu.
``geo`` is the op's checked geometry (deformcp.ops.deform_conv).

The work runs in chunks that fit the workspace limit (_workspace.chunks), each chunk as a few tasks on the
pool (_bilinear.for_each_chunk), each task in blocks of output rows or whole images whose columns are about
_workspace.DEFORM_CONV_BLOCK_BYTES. A block samples its columns (a sparse product, rows (image, position, tap),
channels last) and multiplies them by the weight while they are in cache, BLAS at one thread per task."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import numpy.typing as npt

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear

if TYPE_CHECKING:
    from ..ops.deform_conv import _Geometry


def _group_samples(offset: npt.NDArray[Any], mask: Optional[npt.NDArray[Any]], g: int, geo: _Geometry,
                   dtype: np.dtype[Any], r0: int, derivatives: bool
                   ) -> tuple[npt.NDArray[np.int64], _bilinear.Corners, Optional[npt.NDArray[Any]]]:
    """Corners of every sample of offset group g for a block: images offset.shape[0], output rows [r0, r0 +
    offset.shape[2]) (offset and mask are the block's slices), rows ordered (image, p, tap): rows into
    _bilinear.pixels_last(block's images), the bilinear corners (_bilinear.Corners; the weights' derivatives
    where asked for) and the mask (n, P, K, 1; None without one). Tap positions are integers in int64 until they
    are added to Δy, Δx."""
    n, K, P = offset.shape[0], geo.taps, offset.shape[2] * geo.Wo
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    off = offset.reshape(n, geo.offset_groups, K, 2, P)[:, g].astype(dtype, copy=False)
    rows_y = np.arange(r0, r0 + offset.shape[2], dtype=np.int64)
    base_y = (rows_y * sh - ph)[:, None, None, None] + (np.arange(geo.kh, dtype=np.int64) * dh)[:, None]
    base_x = (np.arange(geo.Wo, dtype=np.int64) * sw - pw)[:, None, None] + np.arange(geo.kw, dtype=np.int64) * dw
    shape = (len(rows_y), geo.Wo, geo.kh, geo.kw)
    base_y = np.broadcast_to(base_y, shape).reshape(P, K).astype(dtype)
    base_x = np.broadcast_to(base_x, shape).reshape(P, K).astype(dtype)
    y = base_y + off[:, :, 0].transpose(0, 2, 1)        # (n, P, K)
    x = base_x + off[:, :, 1].transpose(0, 2, 1)
    with np.errstate(invalid="ignore"):
        c = _bilinear.corners(y, x, geo.H, geo.W, derivatives=derivatives)
    m = None if mask is None else mask.reshape(n, geo.offset_groups, K, P)[:, g].astype(
        dtype, copy=False).transpose(0, 2, 1)[..., None]
    rows = c.index if n == 1 else c.index + (np.arange(n) * (geo.H * geo.W + 1)).reshape(n, 1, 1, 1)
    return rows, c, m


def _masked(weight: npt.NDArray[Any], m: Optional[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """The bilinear weights times the mask (n, P, K, 1), or unchanged without one."""
    return weight if m is None else weight * m


def _samples(rows: npt.NDArray[np.int64], weight: npt.NDArray[Any], X: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The samples (rows.shape[:-1] flattened, X's channels): the sparse product with X."""
    samples: npt.NDArray[Any] = _bilinear.sampling_matrix(rows, weight, X.shape[0]) @ X
    return samples


def _blocks(geo: _Geometry, n: int, r0: int, r1: int, itemsize: int) -> list[tuple[int, int, int, int]]:
    """Blocks (i0, i1, ra, rb) of a chunk of n images and output rows [r0, r1): images [i0, i1) of the chunk,
    output rows [ra, rb); whole images when one image's columns fit the block size, else rows of one image. The
    block size is at most 1/(8·tasks) of the workspace limit, so that the running blocks (a few column-sized
    arrays each) stay within it too."""
    block_bytes = min(_workspace.DEFORM_CONV_BLOCK_BYTES,
                      _workspace.get_workspace_limit() // (8 * _workspace.DEFORM_CONV_TASKS))
    rows = max(1, block_bytes // (geo.Wo * geo.taps * geo.C * itemsize))
    if r1 - r0 == geo.Ho and rows >= geo.Ho:
        return [(a, b, 0, geo.Ho) for a, b in _workspace.ranges(n, rows // geo.Ho)]
    pieces = -(-(r1 - r0) // rows)
    return [(i, i + 1, r0 + a, r0 + b) for i in range(n) for a, b in _workspace.even_ranges(r1 - r0, pieces)]


def _tasks(blocks: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    """The pool's tasks over a chunk's blocks: (task index, first block, end block), consecutive blocks."""
    return [(t, a, b) for t, (a, b) in enumerate(_workspace.even_ranges(len(blocks), _workspace.DEFORM_CONV_TASKS))]


def _group_weight(weight: npt.NDArray[Any], q: int, geo: _Geometry, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """Weight of conv group q as (C_out / groups, K·C / groups), columns ordered (tap, channel)."""
    Cq_out = geo.C_out // geo.groups
    w = weight[q * Cq_out:(q + 1) * Cq_out].astype(dtype, copy=False)
    return np.ascontiguousarray(w.reshape(Cq_out, w.shape[1], geo.taps).transpose(0, 2, 1).reshape(Cq_out, -1))


def _view(a: npt.NDArray[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """``a`` reshaped without a copy (ValueError where it would need one): a view to write into."""
    view = a.view()
    view.shape = shape
    return view


def _pixels(input: npt.NDArray[Any], n0: int, n1: int, geo: _Geometry, dtype: np.dtype[Any]) -> list[npt.NDArray[Any]]:
    """Per offset group, the chunk's images channels-last with a zero row each (_bilinear.pixels_last)."""
    Cg = geo.C // geo.offset_groups
    return [_bilinear.pixels_last(input[n0:n1, g * Cg:(g + 1) * Cg], dtype) for g in range(geo.offset_groups)]


def _add_transposed(target: npt.NDArray[Any], rows: npt.NDArray[Any], step: int) -> None:
    """target (C, P) += rows[:P] (rows (≥ P, C): channels-last pixels), step pixels at a time (transposed in
    cache)."""
    for a, b in _workspace.ranges(target.shape[1], step):
        target[:, a:b] += rows[a:b].T


def _workspace_bytes(geo: _Geometry, dtype: np.dtype[Any], backward: bool) -> tuple[int, int]:
    """The chunks' budget (per output row, per image), that of the path that held a chunk's columns at once,
    so that the chunks stay as they were: per row two column-sized buffers (backward three), 256 bytes a sample
    and the output block; per image one offset group's pixels channels-last. A chunk now holds less: every
    group's pixels, the backward's column gradient and sampling plan (about a third of its budget) and each
    running task's block (a few MiB)."""
    K, itemsize = geo.taps, np.dtype(dtype).itemsize
    per_row = geo.Wo * K * (geo.C * itemsize * (3 if backward else 2) + 256) + geo.Wo * geo.C_out * itemsize
    return per_row, (geo.H * geo.W + 1) * (geo.C // geo.offset_groups) * itemsize


def deform_conv2d(input: npt.NDArray[Any], offset: npt.NDArray[Any], weight: npt.NDArray[Any],
                  bias: Optional[npt.NDArray[Any]], mask: Optional[npt.NDArray[Any]], geo: _Geometry
                  ) -> npt.NDArray[Any]:
    """The output (N, C_out, H_out, W_out), in chunks of images or output rows."""
    dtype = compute_dtype(input.dtype)
    N, Wo, G, groups = geo.N, geo.Wo, geo.offset_groups, geo.groups
    Cg, Cq, Cq_out, HW1 = geo.C // G, geo.C // groups, geo.C_out // groups, geo.H * geo.W + 1
    out = np.empty((N, geo.C_out, geo.Ho, Wo), dtype)
    weights = [_group_weight(weight, q, geo, dtype) for q in range(groups)]
    bias = None if bias is None else bias.astype(dtype)[:, None]
    per_row, per_image = _workspace_bytes(geo, dtype, False)
    images: Optional[tuple[int, int]] = None
    X: list[npt.NDArray[Any]] = []
    for n0, n1, r0, r1 in _workspace.chunks(N, geo.Ho, per_row, "deform_conv2d", per_image):
        if images != (n0, n1):  # row chunks of one image share its pixels
            images, X = (n0, n1), _pixels(input, n0, n1, geo, dtype)
        blocks = _blocks(geo, n1 - n0, r0, r1, dtype.itemsize)

        def block(i0: int, i1: int, ra: int, rb: int) -> None:
            n, P = i1 - i0, (rb - ra) * Wo
            off, m = offset[n0 + i0:n0 + i1, :, ra:rb], None if mask is None else mask[n0 + i0:n0 + i1, :, ra:rb]
            cols: npt.NDArray[Any]  # one offset group's samples, else filled group by group
            if G > 1:
                cols = np.empty((n * P, geo.taps, geo.C), dtype)
            for g in range(G):
                rows, c, m_g = _group_samples(off, m, g, geo, dtype, ra, False)
                sampled = _samples(rows, _masked(c.weight, m_g), X[g][i0 * HW1:i1 * HW1])
                if G == 1:
                    cols = sampled.reshape(n * P, geo.taps, geo.C)
                else:
                    cols[:, :, g * Cg:(g + 1) * Cg] = sampled.reshape(n * P, geo.taps, Cg)
            for q in range(groups):
                target = _view(out[n0 + i0:n0 + i1, q * Cq_out:(q + 1) * Cq_out, ra:rb], (n, Cq_out, P))
                cols_q = cols[:, :, q * Cq:(q + 1) * Cq].reshape(n, P, -1)
                np.matmul(weights[q], cols_q.transpose(0, 2, 1), out=target)
                if bias is not None:
                    target += bias[q * Cq_out:(q + 1) * Cq_out]

        def task(t: int, a: int, b: int) -> None:
            for i in range(a, b):
                block(*blocks[i])

        _bilinear.for_each_chunk(task, _tasks(blocks))
    return out.astype(input.dtype, copy=False)


def deform_conv2d_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], offset: npt.NDArray[Any],
                           weight: npt.NDArray[Any], bias: Optional[npt.NDArray[Any]], mask: Optional[npt.NDArray[Any]],
                           geo: _Geometry, wanted: tuple[bool, bool, bool, bool, bool]
                           ) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """The five gradients in chunks. Chunks within one image add their input gradients into it one after
    another, and the tasks' weight gradients add up in order: those two sums depend on the chunks (rounding),
    not on the threads; the offset and mask gradients of an output do not."""
    want_input, want_offset, want_weight, want_bias, want_mask = wanted
    dtype = compute_dtype(input.dtype)
    N, K, Ho, Wo, HW = geo.N, geo.taps, geo.Ho, geo.Wo, geo.H * geo.W
    G, groups, HW1 = geo.offset_groups, geo.groups, HW + 1
    Cg, Cq, Cq_out = geo.C // G, geo.C // groups, geo.C_out // groups
    weights = [_group_weight(weight, q, geo, dtype) for q in range(groups)]
    grad_input = np.zeros(input.shape, dtype) if want_input else None
    grad_offset = np.empty(offset.shape, dtype) if want_offset else None
    grad_mask = np.empty(mask.shape, dtype) if want_mask and mask is not None else None
    grad_weights = [np.zeros_like(w) for w in weights] if want_weight else []  # one a conv group
    per_row, per_image = _workspace_bytes(geo, dtype, True)
    images: Optional[tuple[int, int]] = None
    X: list[npt.NDArray[Any]] = []
    for n0, n1, r0, r1 in _workspace.chunks(N, Ho, per_row, "deform_conv2d_backward", per_image):
        n_chunk, P_chunk = n1 - n0, (r1 - r0) * Wo
        if images != (n0, n1):
            images, X = (n0, n1), _pixels(input, n0, n1, geo, dtype)
        blocks = _blocks(geo, n_chunk, r0, r1, dtype.itemsize)
        tasks = _tasks(blocks)
        # for the input gradient, the chunk's column gradient and sampling plan (corner rows into X, weights)
        grad_cols = np.empty((n_chunk * P_chunk, K, geo.C), dtype) if want_input else None
        plan = [(np.empty((n_chunk * P_chunk, K, 4), np.int64), np.empty((n_chunk * P_chunk, K, 4), dtype))
                for _ in range(G)] if want_input else []
        partials = [[np.empty_like(w) for w in weights] for _ in tasks] if want_weight else []  # one a task

        def block(task: int, first: bool, i0: int, i1: int, ra: int, rb: int) -> None:
            n, P, rows_b = i1 - i0, (rb - ra) * Wo, rb - ra
            start = i0 * P_chunk + (ra - r0) * Wo   # the block's first position in the chunk's arrays
            off, m = offset[n0 + i0:n0 + i1, :, ra:rb], None if mask is None else mask[n0 + i0:n0 + i1, :, ra:rb]
            g_out = grad_output[n0 + i0:n0 + i1, :, ra:rb].reshape(n, geo.C_out, P).astype(dtype, copy=False)
            samples = [_group_samples(off, m, g, geo, dtype, ra, want_offset) for g in range(G)]
            Xb = [X[g][i0 * HW1:i1 * HW1] for g in range(G)]
            # the unmasked samples where the mask gradient needs them; the columns where the weight gradient does
            plain = [_samples(rows, c.weight, x) for (rows, c, _), x in zip(samples, Xb)] if want_mask else []
            if want_weight:
                cols: npt.NDArray[Any]  # one offset group's columns, else filled group by group
                if G > 1:
                    cols = np.empty((n * P, K, geo.C), dtype)
                for g, (rows, c, m_g) in enumerate(samples):
                    values = (plain[g] * m_g.reshape(-1, 1) if want_mask and m_g is not None else
                              _samples(rows, _masked(c.weight, m_g), Xb[g]))
                    if G == 1:
                        cols = values.reshape(n * P, K, geo.C)
                    else:
                        cols[:, :, g * Cg:(g + 1) * Cg] = values.reshape(n * P, K, Cg)
                for q in range(groups):
                    cols_q = cols[:, :, q * Cq:(q + 1) * Cq].reshape(n, P, -1)
                    for j in range(n):
                        product = g_out[j, q * Cq_out:(q + 1) * Cq_out] @ cols_q[j]
                        if first and j == 0:
                            partials[task][q][...] = product
                        else:
                            partials[task][q] += product
            if not (want_input or want_offset or want_mask):
                return
            gcols = grad_cols[start:start + n * P] if grad_cols is not None else np.empty((n * P, K, geo.C), dtype)
            for q in range(groups):
                product = np.matmul(g_out[:, q * Cq_out:(q + 1) * Cq_out].transpose(0, 2, 1), weights[q],
                                    out=_view(gcols, (n, P, K * geo.C)) if groups == 1 else None)
                if groups > 1:
                    gcols[:, :, q * Cq:(q + 1) * Cq] = product.reshape(n * P, K, Cq)
            for g, (rows, c, m_g) in enumerate(samples):
                gg = np.ascontiguousarray(gcols[:, :, g * Cg:(g + 1) * Cg]).reshape(n * P * K, Cg)
                if want_input:
                    plan[g][0][start:start + n * P] = (rows + i0 * HW1).reshape(n * P, K, 4)
                    plan[g][1][start:start + n * P] = _masked(c.weight, m_g).reshape(n * P, K, 4)
                if grad_offset is not None:  # each sample's derivatives in y and x, dotted with its column gradient
                    assert c.dweight_dy is not None and c.dweight_dx is not None  # asked for: want_offset
                    slopes = _masked(np.stack([c.dweight_dy, c.dweight_dx], axis=3), None if m_g is None else m_g[
                        ..., None])
                    derivatives = _samples(np.stack([rows, rows], axis=3), slopes, Xb[g])
                    dots = np.vecdot(derivatives.reshape(n * P * K, 2, Cg), gg[:, None])
                    grad_offset.reshape(N, G, K, 2, Ho, Wo)[n0 + i0:n0 + i1, g, :, :, ra:rb] = dots.reshape(
                        n, rows_b, Wo, K, 2).transpose(0, 3, 4, 1, 2)
                if grad_mask is not None:
                    grad_mask.reshape(N, G, K, Ho, Wo)[n0 + i0:n0 + i1, g, :, ra:rb] = np.vecdot(
                        plain[g], gg).reshape(n, rows_b, Wo, K).transpose(0, 3, 1, 2)

        def task(t: int, a: int, b: int) -> None:
            for i in range(a, b):
                block(t, i == a, *blocks[i])

        _bilinear.for_each_chunk(task, tasks)
        for partial in partials:
            for q in range(groups):
                grad_weights[q] += partial[q]
        step = max(1, _workspace.TRANSPOSE_BLOCK_BYTES // (Cg * dtype.itemsize))
        if grad_input is None or grad_cols is None:  # no input gradient wanted
            continue
        for g in range(G):  # the column gradient scattered onto the pixels, image by image
            gg = np.ascontiguousarray(grad_cols[:, :, g * Cg:(g + 1) * Cg]).reshape(n_chunk, P_chunk * K, Cg)
            corner_rows, corner_weights = (a.reshape(n_chunk, P_chunk * K, 4) for a in plan[g])

            def scatter(i0: int, i1: int) -> None:  # each pixel adds its samples' terms in the order of the samples
                for i in range(i0, i1):
                    S = _bilinear.sampling_matrix(corner_rows[i] - i * HW1, corner_weights[i], HW1)
                    _add_transposed(_view(grad_input[n0 + i, g * Cg:(g + 1) * Cg], (Cg, HW)), S.T @ gg[i], step)

            _bilinear.for_each_chunk(scatter, _workspace.even_ranges(n_chunk, _workspace.DEFORM_CONV_TASKS))
    grad_weight = np.concatenate([w.reshape(Cq_out, K, Cq).transpose(0, 2, 1) for w in grad_weights]).reshape(
        weight.shape) if want_weight else None
    grad_bias = grad_output.astype(dtype, copy=False).sum(axis=(0, 2, 3)) if want_bias else None
    return tuple(None if g is None else g.astype(input.dtype, copy=False)
                 for g in (grad_input, grad_offset, grad_weight, grad_bias, grad_mask))
