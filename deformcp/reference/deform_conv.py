"""The NumPy path of deformable convolution v1/v2: the float64 reference of kernels/deform_conv.cu.
``geo`` is the op's checked geometry (deformcp.ops.deform_conv)."""
from __future__ import annotations

import numpy as np

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear


def _group_samples(offset, mask, g, geo, dtype, r0: int):
    """Corners of every sample of offset group g for a chunk: images offset.shape[0], output rows [r0, r0 +
    offset.shape[2]) (offset and mask are the chunk's slices), rows ordered (image, p, tap): rows into
    _bilinear.pixels_last(chunk's images), the bilinear weights times the mask, the weights' derivatives times
    the mask, and the unmasked weights. Tap positions are integers in int64 until they are added to Δy, Δx."""
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
        c = _bilinear.corners(y, x, geo.H, geo.W)
    m = (np.ones((n, P, K), dtype) if mask is None else
         mask.reshape(n, geo.offset_groups, K, P)[:, g].astype(dtype, copy=False).transpose(0, 2, 1))[..., None]
    rows = c.index + (np.arange(n) * (geo.H * geo.W + 1)).reshape(n, 1, 1, 1)
    return rows, c.weight * m, c.dweight_dy * m, c.dweight_dx * m, c.weight


def _columns(images, offset, mask, geo, dtype, r0: int):
    """Sampled columns of a chunk (n images, output rows [r0, r0 + offset.shape[2])): (n·Pc, K, C) in dtype."""
    n, K, P = images.shape[0], geo.taps, offset.shape[2] * geo.Wo
    Cg = geo.C // geo.offset_groups
    cols = np.empty((n * P, K, geo.C), dtype)
    for g in range(geo.offset_groups):
        rows, weight = _group_samples(offset, mask, g, geo, dtype, r0)[:2]
        S = _bilinear.sampling_matrix(rows, weight, n * (geo.H * geo.W + 1))
        X = _bilinear.pixels_last(images[:, g * Cg:(g + 1) * Cg], dtype)
        cols[:, :, g * Cg:(g + 1) * Cg] = (S @ X).reshape(n * P, K, Cg)
    return cols


def _chunk(a, n0, n1, r0, r1):
    """Images [n0, n1), output rows [r0, r1) of an (N, channels, Ho, Wo) array; None stays None."""
    return None if a is None else a[n0:n1, :, r0:r1]


def _group_weight(weight, q, geo, dtype):
    """Weight of conv group q as (C_out / groups, K·C / groups), columns ordered (tap, channel)."""
    Cq_out = geo.C_out // geo.groups
    w = weight[q * Cq_out:(q + 1) * Cq_out].astype(dtype, copy=False)
    return w.reshape(Cq_out, w.shape[1], geo.taps).transpose(0, 2, 1).reshape(Cq_out, -1)


def _workspace_bytes(geo, dtype, backward: bool) -> tuple[int, int]:
    """Scratch bytes of the NumPy path (per output row, per image): column buffers and the sparse sampling
    matrices per row, a channels-last copy of one offset group's channels per image."""
    K, itemsize = geo.taps, np.dtype(dtype).itemsize
    # per row: columns (and their gradient, or the product being written), corners and weights of the samples
    # (_group_samples holds about 256 bytes a sample at its peak), and the output block (or its gradient)
    per_row = geo.Wo * K * (geo.C * itemsize * (3 if backward else 2) + 256) + geo.Wo * geo.C_out * itemsize
    return per_row, (geo.H * geo.W + 1) * (geo.C // geo.offset_groups) * itemsize


def deform_conv2d(input, offset, weight, bias, mask, geo):
    """The output (N, C_out, H_out, W_out), in chunks of images or output rows."""
    dtype = compute_dtype(input.dtype)
    N, Wo, Cq, Cq_out = geo.N, geo.Wo, geo.C // geo.groups, geo.C_out // geo.groups
    out = np.empty((N, geo.C_out, geo.Ho, Wo), dtype)
    weights = [_group_weight(weight, q, geo, dtype) for q in range(geo.groups)]
    per_row, per_image = _workspace_bytes(geo, dtype, False)
    for n0, n1, r0, r1 in _workspace.chunks(N, geo.Ho, per_row, "deform_conv2d", per_image):
        n, n_rows = n1 - n0, r1 - r0
        cols = _columns(input[n0:n1], _chunk(offset, n0, n1, r0, r1), _chunk(mask, n0, n1, r0, r1), geo, dtype, r0)
        for q in range(geo.groups):
            part = cols[:, :, q * Cq:(q + 1) * Cq].reshape(n * n_rows * Wo, -1) @ weights[q].T
            out[n0:n1, q * Cq_out:(q + 1) * Cq_out, r0:r1] = part.reshape(n, n_rows, Wo, Cq_out).transpose(0, 3, 1, 2)
        del cols, part  # before the next chunk allocates its own
    if bias is not None:
        out += bias.astype(dtype)[:, None, None]
    return out.astype(input.dtype, copy=False)


def deform_conv2d_backward(grad_output, input, offset, weight, bias, mask, geo, wanted):
    """The five gradients in chunks. Chunks within one image add their input gradients into it one after
    another, and every chunk adds into the weight gradient: those two sums depend on the chunks (rounding);
    the offset and mask gradients of an output do not."""
    want_input, want_offset, want_weight, want_bias, want_mask = wanted
    dtype = compute_dtype(input.dtype)
    N, K, Ho, Wo, HW = geo.N, geo.taps, geo.Ho, geo.Wo, geo.H * geo.W
    G, Cg, Cq, Cq_out = geo.offset_groups, geo.C // geo.offset_groups, geo.C // geo.groups, geo.C_out // geo.groups
    weights = [_group_weight(weight, q, geo, dtype) for q in range(geo.groups)]
    grad_input = np.zeros(input.shape, dtype) if want_input else None
    grad_offset = np.empty(offset.shape, dtype) if want_offset else None
    grad_mask = np.empty(mask.shape, dtype) if want_mask else None
    grad_weight = [np.zeros_like(w) for w in weights] if want_weight else None
    per_row, per_image = _workspace_bytes(geo, dtype, True)
    for n0, n1, r0, r1 in _workspace.chunks(N, Ho, per_row, "deform_conv2d_backward", per_image):
        n, n_rows = n1 - n0, r1 - r0
        P = n_rows * Wo
        images, off, m = input[n0:n1], _chunk(offset, n0, n1, r0, r1), _chunk(mask, n0, n1, r0, r1)
        G_out = _chunk(grad_output, n0, n1, r0, r1).reshape(n, geo.C_out, P).transpose(0, 2, 1).reshape(
            n * P, geo.C_out).astype(dtype, copy=False)
        if want_weight:
            cols = _columns(images, off, m, geo, dtype, r0)
            for q in range(geo.groups):
                grad_weight[q] += G_out[:, q * Cq_out:(q + 1) * Cq_out].T @ cols[:, :, q * Cq:(q + 1) * Cq].reshape(
                    n * P, -1)
            del cols
        if not (want_input or want_offset or want_mask):
            continue
        grad_cols = np.empty((n * P, K, geo.C), dtype)
        for q in range(geo.groups):
            grad_cols[:, :, q * Cq:(q + 1) * Cq] = (G_out[:, q * Cq_out:(q + 1) * Cq_out] @ weights[q]).reshape(
                n * P, K, Cq)
        for g in range(G):
            rows, weight_m, dy_m, dx_m, weight_plain = _group_samples(off, m, g, geo, dtype, r0)
            columns = n * (HW + 1)
            grad_g = np.ascontiguousarray(grad_cols[:, :, g * Cg:(g + 1) * Cg]).reshape(n * P * K, Cg)
            if want_input:
                S = _bilinear.sampling_matrix(rows, weight_m, columns)
                pixels = (S.T @ grad_g).reshape(n, HW + 1, Cg)[:, :HW].transpose(0, 2, 1)
                grad_input[n0:n1, g * Cg:(g + 1) * Cg] += pixels.reshape(n, Cg, geo.H, geo.W)
                del S, pixels
            if want_offset or want_mask:
                X = _bilinear.pixels_last(images[:, g * Cg:(g + 1) * Cg], dtype)

                def sample_dot(values):  # Σ_c (values-weighted sample of channel c) · grad_columns[..., c]
                    sampled = _bilinear.sampling_matrix(rows, values, columns) @ X
                    return np.vecdot(sampled, grad_g).reshape(n, n_rows, Wo, K).transpose(0, 3, 1, 2)

                if want_offset:
                    pair = grad_offset.reshape(N, G, K, 2, Ho, Wo)[n0:n1, g, :, :, r0:r1]
                    pair[:, :, 0] = sample_dot(dy_m)
                    pair[:, :, 1] = sample_dot(dx_m)
                if want_mask:
                    grad_mask.reshape(N, G, K, Ho, Wo)[n0:n1, g, :, r0:r1] = sample_dot(weight_plain)
    if want_weight:
        grad_weight = np.concatenate([w.reshape(Cq_out, K, Cq).transpose(0, 2, 1) for w in grad_weight]).reshape(
            weight.shape)
    grad_bias = grad_output.astype(dtype).sum(axis=(0, 2, 3)) if want_bias else None
    return tuple(None if g is None else g.astype(input.dtype, copy=False)
                 for g in (grad_input, grad_offset, grad_weight, grad_bias, grad_mask))
