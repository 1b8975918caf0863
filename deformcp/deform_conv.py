"""Deformable convolution v1 and v2 (modulated), forward and backward for all five inputs.

Dai et al., "Deformable Convolutional Networks", ICCV 2017, https://arxiv.org/abs/1703.06211 (v1);
Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168 (v2, the mask). Semantics of torchvision.ops.deform_conv2d.
Kernels: kernels/deform_conv.cu (im2col, col2im, coordinate gradients) around a GEMM (cuBLAS through
CuPy on the GPU, NumPy's BLAS on the host backend).
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import numpy as np

from . import _bilinear, _dispatch, _kernels, _validate, _workspace, testing

FAMILY = "deform_conv"


class DeformConv2dGrads(NamedTuple):
    """Gradients of :func:`deform_conv2d`; None where an input is absent or its gradient not asked for."""

    input: Optional[object]
    offset: Optional[object]
    weight: Optional[object]
    bias: Optional[object]
    mask: Optional[object]


class _Geometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    C_out: int
    groups: int
    offset_groups: int
    kh: int
    kw: int
    Ho: int
    Wo: int
    stride: tuple
    padding: tuple
    dilation: tuple

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def sizes(self) -> tuple:
        """The kernels' DEFORM_CONV_SIZES, less the chunk (n0, n_chunk) inserted by the caller."""
        return (self.N, self.C, self.H, self.W, self.offset_groups, self.kh, self.kw, self.Ho, self.Wo)


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    try:
        pair = (operator.index(value),) * 2 if not isinstance(value, (tuple, list)) else tuple(
            operator.index(v) for v in value)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or min(pair) < minimum:
        raise ValueError(f"{name}: expected an int or a pair of ints ≥ {minimum}, got {value!r}")
    return pair


def _check(input, offset, weight, bias, mask, stride, padding, dilation) -> _Geometry:
    _validate.floating("input", input, 4, "(N, C, H, W)")
    _validate.floating("weight", weight, 4, "(C_out, C / groups, kh, kw)")
    _validate.floating("offset", offset, 4, "(N, 2·G·kh·kw, H_out, W_out)")
    if mask is not None:
        _validate.floating("mask", mask, 4, "(N, G·kh·kw, H_out, W_out)")
    if bias is not None:
        _validate.floating("bias", bias, 1, "(C_out,)")
    _validate.same_dtype(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    stride, padding, dilation = (_pair("stride", stride, 1), _pair("padding", padding, 0),
                                 _pair("dilation", dilation, 1))
    N, C, H, W = input.shape
    C_out, C_group, kh, kw = weight.shape
    if C == 0:
        raise ValueError(f"input: expected at least one channel in (N, C, H, W), got {tuple(input.shape)}")
    if C_out == 0 or C_group == 0 or C % C_group or C_out % (C // C_group or 1):
        raise ValueError(f"weight: expected C_out > 0 and in-channels C / groups > 0 dividing C = {C}, with C_out "
                         f"divisible by groups, got weight shape {tuple(weight.shape)}")
    groups = C // C_group
    if kh == 0 or kw == 0:
        raise ValueError(f"weight: expected a non-empty kernel (kh, kw), got {tuple(weight.shape)}")
    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"input: spatial size {(H, W)} with padding {padding} is smaller than the dilated "
                         f"kernel {(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}")
    K = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K):
        raise ValueError(f"offset: expected 2·G·kh·kw = a positive multiple of {2 * K} channels, "
                         f"got shape {tuple(offset.shape)}")
    G = offset.shape[1] // (2 * K)
    if C % G:
        raise ValueError(f"input: expected channels C = {C} divisible by the {G} offset groups given by offset's "
                         f"{offset.shape[1]} channels")
    _validate.shape("offset", offset, (N, 2 * G * K, Ho, Wo), "(N, 2·G·kh·kw, H_out, W_out)")
    if mask is not None:
        _validate.shape("mask", mask, (N, G * K, Ho, Wo), "(N, G·kh·kw, H_out, W_out)")
    if bias is not None:
        _validate.shape("bias", bias, (C_out,), "(C_out,)")
    return _Geometry(N, C, H, W, C_out, groups, G, kh, kw, Ho, Wo, stride, padding, dilation)


# ------------------------------------------------------------------------------------ NumPy path

def _group_samples(offset, mask, g, geo: _Geometry, dtype):
    """Corners of every sample of offset group g for a chunk of images, rows ordered (image, p, tap):
    rows into _bilinear.pixels_last(chunk), the bilinear weights times the mask, the weights' derivatives
    times the mask, and the unmasked weights."""
    n, K, P = offset.shape[0], geo.taps, geo.Ho * geo.Wo
    (sh, sw), (ph, pw), (dh, dw) = geo.stride, geo.padding, geo.dilation
    off = offset.reshape(n, geo.offset_groups, K, 2, P)[:, g].astype(dtype, copy=False)
    base_y = (np.arange(geo.Ho) * sh - ph)[:, None, None, None] + (np.arange(geo.kh) * dh)[:, None]
    base_x = (np.arange(geo.Wo) * sw - pw)[:, None, None] + np.arange(geo.kw) * dw
    base_y = np.broadcast_to(base_y, (geo.Ho, geo.Wo, geo.kh, geo.kw)).reshape(P, K).astype(dtype)
    base_x = np.broadcast_to(base_x, (geo.Ho, geo.Wo, geo.kh, geo.kw)).reshape(P, K).astype(dtype)
    y = base_y + off[:, :, 0].transpose(0, 2, 1)        # (n, P, K)
    x = base_x + off[:, :, 1].transpose(0, 2, 1)
    with np.errstate(invalid="ignore"):
        c = _bilinear.corners(y, x, geo.H, geo.W)
    m = (np.ones((n, P, K), dtype) if mask is None else
         mask.reshape(n, geo.offset_groups, K, P)[:, g].astype(dtype, copy=False).transpose(0, 2, 1))[..., None]
    rows = c.index + (np.arange(n) * (geo.H * geo.W + 1)).reshape(n, 1, 1, 1)
    return rows, c.weight * m, c.dweight_dy * m, c.dweight_dx * m, c.weight


def _columns(images, offset, mask, geo: _Geometry, dtype):
    """Sampled columns of a chunk of n images: (n·P, K, C) in dtype."""
    n, K, P = images.shape[0], geo.taps, geo.Ho * geo.Wo
    Cg = geo.C // geo.offset_groups
    cols = np.empty((n * P, K, geo.C), dtype)
    for g in range(geo.offset_groups):
        rows, weight = _group_samples(offset, mask, g, geo, dtype)[:2]
        S = _bilinear.sampling_matrix(rows, weight, n * (geo.H * geo.W + 1))
        X = _bilinear.pixels_last(images[:, g * Cg:(g + 1) * Cg], dtype)
        cols[:, :, g * Cg:(g + 1) * Cg] = (S @ X).reshape(n * P, K, Cg)
    return cols


def _group_weight(weight, q, geo: _Geometry, dtype):
    """Weight of conv group q as (C_out / groups, K·C / groups), columns ordered (tap, channel)."""
    Cq_out = geo.C_out // geo.groups
    w = weight[q * Cq_out:(q + 1) * Cq_out].astype(dtype, copy=False)
    return w.reshape(Cq_out, w.shape[1], geo.taps).transpose(0, 2, 1).reshape(Cq_out, -1)


def _image_bytes(geo: _Geometry, dtype, backward: bool) -> int:
    """Scratch bytes per image: column buffers plus the sparse sampling matrices (NumPy path)."""
    P, K = geo.Ho * geo.Wo, geo.taps
    itemsize = np.dtype(dtype).itemsize
    # columns (and their gradient, or the product being written), corners and weights of the samples
    # (_group_samples holds about 256 bytes a sample at its peak), and the output block
    return P * K * (geo.C * itemsize * (3 if backward else 2) + 256) + P * geo.C_out * itemsize


def _forward_numpy(input, offset, weight, bias, mask, geo: _Geometry):
    dtype = _kernels.compute_dtype(input.dtype)
    N, P, Cq, Cq_out = geo.N, geo.Ho * geo.Wo, geo.C // geo.groups, geo.C_out // geo.groups
    out = np.empty((N, geo.C_out, P), dtype)
    weights = [_group_weight(weight, q, geo, dtype) for q in range(geo.groups)]
    for n0, n1 in _workspace.batch_chunks(N, _image_bytes(geo, dtype, False), "deform_conv2d"):
        cols = _columns(input[n0:n1], offset[n0:n1], None if mask is None else mask[n0:n1], geo, dtype)
        for q in range(geo.groups):
            part = cols[:, :, q * Cq:(q + 1) * Cq].reshape((n1 - n0) * P, -1) @ weights[q].T
            out[n0:n1, q * Cq_out:(q + 1) * Cq_out] = part.reshape(n1 - n0, P, Cq_out).transpose(0, 2, 1)
        del cols, part  # before the next chunk allocates its own
    if bias is not None:
        out += bias.astype(dtype)[:, None]
    return out.reshape(N, geo.C_out, geo.Ho, geo.Wo).astype(input.dtype, copy=False)


def _backward_numpy(grad_output, input, offset, weight, bias, mask, geo: _Geometry, wanted):
    want_input, want_offset, want_weight, want_bias, want_mask = wanted
    dtype = _kernels.compute_dtype(input.dtype)
    N, K, P = geo.N, geo.taps, geo.Ho * geo.Wo
    G, Cg, Cq, Cq_out = geo.offset_groups, geo.C // geo.offset_groups, geo.C // geo.groups, geo.C_out // geo.groups
    weights = [_group_weight(weight, q, geo, dtype) for q in range(geo.groups)]
    grad_input = np.zeros(input.shape, dtype) if want_input else None
    grad_offset = np.empty(offset.shape, dtype) if want_offset else None
    grad_mask = np.empty(mask.shape, dtype) if want_mask else None
    grad_weight = [np.zeros_like(w) for w in weights] if want_weight else None
    for n0, n1 in _workspace.batch_chunks(N, _image_bytes(geo, dtype, True), "deform_conv2d_backward"):
        n = n1 - n0
        images, off, m = input[n0:n1], offset[n0:n1], None if mask is None else mask[n0:n1]
        G_out = grad_output[n0:n1].reshape(n, geo.C_out, P).transpose(0, 2, 1).reshape(n * P, geo.C_out)
        G_out = G_out.astype(dtype, copy=False)
        if want_weight:
            cols = _columns(images, off, m, geo, dtype)
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
            rows, weight_m, dy_m, dx_m, weight_plain = _group_samples(off, m, g, geo, dtype)
            columns = n * (geo.H * geo.W + 1)
            grad_g = np.ascontiguousarray(grad_cols[:, :, g * Cg:(g + 1) * Cg]).reshape(n * P * K, Cg)
            if want_input:
                S = _bilinear.sampling_matrix(rows, weight_m, columns)
                _bilinear.to_channels_first(S.T @ grad_g, grad_input[n0:n1, g * Cg:(g + 1) * Cg])
            if want_offset or want_mask:
                X = _bilinear.pixels_last(images[:, g * Cg:(g + 1) * Cg], dtype)

                def sample_dot(values):  # Σ_c (values-weighted sample of channel c) · grad_columns[..., c]
                    sampled = _bilinear.sampling_matrix(rows, values, columns) @ X
                    return np.vecdot(sampled, grad_g).reshape(n, P, K).transpose(0, 2, 1)

                if want_offset:
                    pair = grad_offset[n0:n1].reshape(n, G, K, 2, P)[:, g]
                    pair[:, :, 0] = sample_dot(dy_m)
                    pair[:, :, 1] = sample_dot(dx_m)
                if want_mask:
                    grad_mask[n0:n1].reshape(n, G, K, P)[:, g] = sample_dot(weight_plain)
    if want_weight:
        grad_weight = np.concatenate([w.reshape(Cq_out, K, Cq).transpose(0, 2, 1) for w in grad_weight]).reshape(
            weight.shape)
    grad_bias = grad_output.astype(dtype).sum(axis=(0, 2, 3)) if want_bias else None
    return tuple(None if g is None else g.astype(input.dtype, copy=False)
                 for g in (grad_input, grad_offset, grad_weight, grad_bias, grad_mask))


# ---------------------------------------------------------------------------------------- kernels

def _chunk_sizes(geo: _Geometry, n0: int, n1: int) -> tuple:
    return (*geo.sizes, n0, n1 - n0, *geo.stride, *geo.padding, *geo.dilation)


def _kernel_columns(call, input, offset, mask, geo: _Geometry, n0: int, n1: int):
    """The sampled columns (C·kh·kw, n·H_out·W_out) of images [n0, n1), in the compute dtype."""
    xp = call.xp
    columns = _kernels.empty(xp, (geo.C * geo.taps, (n1 - n0) * geo.Ho * geo.Wo), _kernels.compute_dtype(input.dtype))
    _kernels.launch(call.backend, FAMILY, "deform_conv_im2col", input.dtype, geo.C * (n1 - n0) * geo.Ho * geo.Wo,
                    (input, offset, _kernels.NULL if mask is None else mask, columns), _chunk_sizes(geo, n0, n1))
    return columns


def _forward_kernels(call, input, offset, weight, bias, mask, geo: _Geometry):
    """Columns, GEMMs and bias in the compute dtype (float32 for 16-bit input), rounded once at the end."""
    xp = call.xp
    input, offset = (xp.ascontiguousarray(a) for a in (input, offset))
    mask = None if mask is None else xp.ascontiguousarray(mask)
    dtype = _kernels.compute_dtype(input.dtype)
    N, P, Cq_out = geo.N, geo.Ho * geo.Wo, geo.C_out // geo.groups
    rows_q = geo.C // geo.groups * geo.taps
    out = _kernels.empty(xp, (N, geo.C_out, P), dtype)
    w = weight.reshape(geo.C_out, -1).astype(dtype, copy=False)
    per_image = (geo.C * geo.taps + geo.C_out) * P * dtype.itemsize  # columns and the product
    for n0, n1 in _workspace.batch_chunks(N, per_image, "deform_conv2d"):
        columns = _kernel_columns(call, input, offset, mask, geo, n0, n1)
        for q in range(geo.groups):
            part = w[q * Cq_out:(q + 1) * Cq_out] @ columns[q * rows_q:(q + 1) * rows_q]
            out[n0:n1, q * Cq_out:(q + 1) * Cq_out] = part.reshape(Cq_out, n1 - n0, P).transpose(1, 0, 2)
        del columns, part  # before the next chunk allocates its own
    if bias is not None:
        out += bias.astype(dtype)[:, None]
    return out.reshape(N, geo.C_out, geo.Ho, geo.Wo).astype(input.dtype, copy=False)


def _backward_kernels(call, grad_output, input, offset, weight, bias, mask, geo: _Geometry, wanted, deterministic):
    """Columns, their gradient, the GEMMs and the input, weight and bias gradients' sums in the compute dtype
    (float32 for 16-bit input), rounded once at the end."""
    xp = call.xp
    want_input, want_offset, want_weight, want_bias, want_mask = wanted
    grad_output, input, offset = (xp.ascontiguousarray(a) for a in (grad_output, input, offset))
    mask = None if mask is None else xp.ascontiguousarray(mask)
    dtype = _kernels.compute_dtype(input.dtype)
    N, P, Cq_out = geo.N, geo.Ho * geo.Wo, geo.C_out // geo.groups
    rows_q = geo.C // geo.groups * geo.taps
    w = weight.reshape(geo.C_out, -1).astype(dtype, copy=False)
    grad_input = xp.zeros(input.shape, dtype) if want_input else None
    grad_offset = _kernels.empty(xp, offset.shape, offset.dtype) if want_offset else None
    grad_mask = _kernels.empty(xp, mask.shape, mask.dtype) if want_mask else None
    grad_w = xp.zeros(w.shape, dtype) if want_weight else None
    per_image = 2 * geo.C * geo.taps * P * dtype.itemsize
    for n0, n1 in _workspace.batch_chunks(N, per_image, "deform_conv2d_backward"):
        g_out = grad_output[n0:n1].reshape(n1 - n0, geo.C_out, P).transpose(1, 0, 2).reshape(geo.C_out, -1)
        g_out = xp.ascontiguousarray(g_out, dtype)
        sizes = _chunk_sizes(geo, n0, n1)
        if want_weight:
            columns = _kernel_columns(call, input, offset, mask, geo, n0, n1)
            for q in range(geo.groups):
                grad_w[q * Cq_out:(q + 1) * Cq_out] += (g_out[q * Cq_out:(q + 1) * Cq_out]
                                                        @ columns[q * rows_q:(q + 1) * rows_q].T)
            del columns
        if not (want_input or want_offset or want_mask):
            continue
        grad_columns = xp.empty((geo.C * geo.taps, (n1 - n0) * P), dtype)
        for q in range(geo.groups):
            grad_columns[q * rows_q:(q + 1) * rows_q] = (w[q * Cq_out:(q + 1) * Cq_out].T
                                                         @ g_out[q * Cq_out:(q + 1) * Cq_out])
        null_mask = _kernels.NULL if mask is None else mask
        if want_input:
            work = (n1 - n0) * geo.C * (1 if deterministic else P)
            _kernels.launch(call.backend, FAMILY, "deform_conv_col2im", input.dtype, work,
                            (offset, null_mask, grad_columns, grad_input), sizes, (deterministic,))
        if want_offset or want_mask:
            _kernels.launch(call.backend, FAMILY, "deform_conv_col2im_coord", input.dtype,
                            (n1 - n0) * geo.offset_groups * geo.taps * P,
                            (input, offset, null_mask, grad_columns,
                             _kernels.NULL if grad_offset is None else grad_offset,
                             _kernels.NULL if grad_mask is None else grad_mask), sizes)
    grad_weight = grad_w.reshape(weight.shape) if want_weight else None
    grad_bias = grad_output.sum(axis=(0, 2, 3), dtype=dtype) if want_bias else None
    return tuple(None if g is None else g.astype(input.dtype, copy=False)
                 for g in (grad_input, grad_offset, grad_weight, grad_bias, grad_mask))


# ------------------------------------------------------------------------------------------ public

def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution: ``y(p) = Σ_k w_k · x(p + p_k + Δp_k) · Δm_k`` (+ bias).

    v1 (Dai et al. 2017, https://arxiv.org/abs/1703.06211) without ``mask``; v2 (Zhu et al. 2019,
    https://arxiv.org/abs/1811.11168) with it. Same as torchvision.ops.deform_conv2d.

    Args:
        input (array[N, C, H, W]): input images.
        offset (array[N, 2·G·kh·kw, H_out, W_out]): sampling offsets; channel g·2·kh·kw + 2k is Δy and
            the next Δx of kernel tap k = i·kw + j in offset group g; input channel c belongs to offset
            group c // (C / G).
        weight (array[C_out, C / groups, kh, kw]): convolution weights; groups = C / weight.shape[1].
        bias (array[C_out] or None): added to every output. Default: None.
        stride, padding, dilation (int or pair of int): as in a regular convolution. Defaults: 1, 0, 1.
        mask (array[N, G·kh·kw, H_out, W_out] or None): modulation scalars of v2, channel g·kh·kw + k.
            Default: None.

    Returns:
        array[N, C_out, H_out, W_out] with H_out = (H + 2·pad_h − (dil_h·(kh − 1) + 1)) // stride_h + 1.

    Tap k of output (h, w) samples y = h·stride_h − pad_h + i·dil_h + Δy (x likewise). A sample with
    y ≤ −1, y ≥ H, x ≤ −1 or x ≥ W is 0 (NaN and ±inf too); otherwise it is bilinear with the corners
    outside the image reading 0. The batch is processed in chunks under :func:`deformcp.workspace_limit`.

    >>> x = np.random.rand(2, 8, 10, 10).astype(np.float32)
    >>> w = np.random.rand(16, 8, 3, 3).astype(np.float32)
    >>> offset = np.random.randn(2, 2 * 9, 10, 10).astype(np.float32)
    >>> deformcp.deform_conv2d(x, offset, w, padding=1).shape
    (2, 16, 10, 10)
    """
    call = _dispatch.prepare(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    input, offset, weight, bias, mask = call.arrays
    geo = _check(input, offset, weight, bias, mask, stride, padding, dilation)
    with call.device:
        if call.backend == "numpy":
            out = _forward_numpy(input, offset, weight, bias, mask, geo)
        else:
            out = _forward_kernels(call, input, offset, weight, bias, mask, geo)
    return call.export(out)


def deform_conv2d_backward(grad_output, input, offset, weight, bias=None, stride=1, padding=0, dilation=1,
                           mask=None, needs_input_grad=(True, True, True, True, True), deterministic=False):
    """Gradients of :func:`deform_conv2d` for input, offset, weight, bias and mask.

    Args:
        grad_output (array[N, C_out, H_out, W_out]): gradient of the loss with respect to the output.
        input, offset, weight, bias, stride, padding, dilation, mask: as given to :func:`deform_conv2d`.
        needs_input_grad (five bools): which of (input, offset, weight, bias, mask) to differentiate.
            Default: all.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the input gradient with
            atomics; True gives each input plane to one thread (bitwise reproducible). The offset, mask,
            weight and bias gradients never use atomics; the NumPy path is deterministic. Default: False.

    Returns:
        DeformConv2dGrads(input, offset, weight, bias, mask): None for an absent bias or mask and for
        gradients not asked for.

    The offset gradient is the derivative of the bilinear sample: at an integer coordinate it is taken
    from the right (the cell whose lower corner the sample is on); it is 0 where the sample is 0, i.e. at
    y ≤ −1 and y ≥ H (x likewise), and for NaN or ±inf offsets — so exactly at y = −1 the gradient is 0,
    and just above it the lower corners (row −1) read 0 while row 0 counts.
    """
    call = _dispatch.prepare(grad_output=grad_output, input=input, offset=offset, weight=weight, bias=bias,
                             mask=mask)
    grad_output, input, offset, weight, bias, mask = call.arrays
    geo = _check(input, offset, weight, bias, mask, stride, padding, dilation)
    wanted = _validate.needs_grad(needs_input_grad, DeformConv2dGrads._fields)
    wanted = tuple(w and a is not None for w, a in zip(wanted, (input, offset, weight, bias, mask)))
    deterministic = _validate.flag("deterministic", deterministic)
    _validate.floating("grad_output", grad_output, 4, "(N, C_out, H_out, W_out)")
    _validate.shape("grad_output", grad_output, (geo.N, geo.C_out, geo.Ho, geo.Wo), "(N, C_out, H_out, W_out)")
    _validate.same_dtype(grad_output=grad_output, input=input)
    with call.device:
        if call.backend == "numpy":
            grads = _backward_numpy(grad_output, input, offset, weight, bias, mask, geo, wanted)
        else:
            grads = _backward_kernels(call, grad_output, input, offset, weight, bias, mask, geo, wanted,
                                      deterministic)
    return DeformConv2dGrads(*(None if g is None else call.export(g) for g in grads))


# ------------------------------------------------------------------------ parity checks (deformcp.testing)

def _conv_inputs(rng, options):
    """The irregular configuration: kernel 3×2, stride 2×1, padding 1×0, dilation 2×1, groups 2, offset
    groups 3, offsets of a few pixels."""
    N, C, H, W, C_out, G, kh, kw = 2, 6, 9, 8, 4, 3, 3, 2
    Ho, Wo = (H + 2 - (2 * 2 + 1)) // 2 + 1, (W - (kw - 1) - 1) + 1
    arrays = {"input": rng.standard_normal((N, C, H, W)), "offset": 2 * rng.standard_normal((N, 2 * G * kh * kw, Ho, Wo)),
              "weight": rng.standard_normal((C_out, C // 2, kh, kw)), "bias": rng.standard_normal(C_out)}
    if options["modulated"]:
        arrays["mask"] = rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo))
    return arrays


def _check_forward(modulated, **arrays):
    return deform_conv2d(**arrays, stride=(2, 1), padding=(1, 0), dilation=(2, 1))


def _check_backward(grad_output, modulated, **arrays):
    return deform_conv2d_backward(grad_output, **arrays, stride=(2, 1), padding=(1, 0), dilation=(2, 1))


testing.register(testing.OpCheck(name="deform_conv2d", make_inputs=_conv_inputs, forward=_check_forward,
                                 backward=_check_backward, options=({"modulated": False}, {"modulated": True})))
