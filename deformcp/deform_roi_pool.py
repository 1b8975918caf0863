"""Deformable RoI pooling (Deformable ConvNets v1) and its modulated form (v2), forward and backward.

Dai et al., "Deformable Convolutional Networks", https://arxiv.org/abs/1703.06211 (offsets); Zhu et al.,
"Deformable ConvNets v2", https://arxiv.org/abs/1811.11168 (the modulation mask). Semantics of mmcv.ops
DeformRoIPool / ModulatedDeformRoIPool: RoIAlign's aligned geometry with each bin moved by
γ · RoI size · offset. Kernels: kernels/roi_align.cu (deform_roi_pool_*).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _bilinear, _kernels, _validate, _workspace, testing
from .roi_align import _bin_matrix, _check, _geometry, _random_boxes, _roi_chunks, _samples

FAMILY = "roi_align"


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


def _arguments(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, **others):
    """Import and check a forward's (or, with grad_output in others, a backward's) arguments: (call, input,
    rois, offset, mask, others' arrays, (PH, PW, spatial_scale, sampling_ratio, gamma))."""
    call, (input, rois, *arrays, offset, mask) = _validate.prepare_boxes("rois", input=input, rois=rois, **others,
                                                                         offset=offset, mask=mask)
    PH, PW, spatial_scale, sampling_ratio, _ = _check(call, input, rois, output_size, spatial_scale, sampling_ratio,
                                                      True, "avg", False, "rois")
    gamma = _check_deform(input, rois, offset, mask, PH, PW, gamma)
    return call, input, rois, offset, mask, dict(zip(others, arrays)), (PH, PW, spatial_scale, sampling_ratio, gamma)


def _output_shape(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                  mask=None) -> tuple:
    """The shape of deform_roi_pool's output, raising its argument errors."""
    _, input, rois, *_, (PH, PW, _, _, _) = _arguments(input, rois, offset, output_size, spatial_scale,
                                                       sampling_ratio, gamma, mask)
    return (len(rois), input.shape[1], PH, PW)


def _shift(rois, offset, PH, PW, spatial_scale, sampling_ratio, gamma, dtype):
    """Pixel shift (K, 2, PH, PW) of every bin's start: γ · RoI size · offset (channel 0 = x)."""
    g = _geometry(rois, PH, PW, spatial_scale, sampling_ratio, True, dtype)
    scale = np.stack([g.roi_w, g.roi_h], axis=1)[:, :, None, None]
    return dtype.type(gamma) * scale * offset.astype(dtype)


def _forward_numpy(input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma):
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


def _backward_numpy(grad_output, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma, wanted):
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


def _launch_forward(call, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma):
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


def _launch_backward(call, grad_output, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma,
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
    call, input, rois, offset, mask, _, (PH, PW, spatial_scale, sampling_ratio, gamma) = _arguments(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask)
    with call.device:
        if call.backend == "numpy":
            out = _forward_numpy(input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma)
        else:
            out = _launch_forward(call, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio, gamma)
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
    call, input, rois, offset, mask, arrays, (PH, PW, spatial_scale, sampling_ratio, gamma) = _arguments(
        input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, grad_output=grad_output)
    grad_output = arrays["grad_output"]
    wanted = _validate.needs_grad(needs_input_grad, DeformRoIPoolGrads._fields)
    wanted = tuple(w and a is not None for w, a in zip(wanted, (input, offset, mask)))
    deterministic = _validate.flag("deterministic", deterministic)
    _validate.grad_output(grad_output, (len(rois), input.shape[1], PH, PW), "(K, C, PH, PW)", input=input)
    with call.device:
        if call.backend == "numpy":
            grads = _backward_numpy(grad_output, input, rois, offset, mask, PH, PW, spatial_scale, sampling_ratio,
                                    gamma, wanted)
        else:
            grads = _launch_backward(call, grad_output, input, rois, offset, mask, PH, PW, spatial_scale,
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
