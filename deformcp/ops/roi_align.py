"""RoIAlign (average and max pooling), position-sensitive RoIAlign and deformable RoI pooling, forward and
backward.

He et al., "Mask R-CNN", ICCV 2017, https://arxiv.org/abs/1703.06870. Average pooling and the
position-sensitive form follow torchvision.ops.roi_align / ps_roi_align; max pooling follows mmcv's
RoIAlign (pool_mode="max"). Deformable RoI pooling (Dai et al., "Deformable Convolutional Networks",
https://arxiv.org/abs/1703.06211; modulated: Zhu et al., "Deformable ConvNets v2", https://arxiv.org/abs/1811.11168)
follows mmcv.ops DeformRoIPool / ModulatedDeformRoIPool: RoIAlign's aligned geometry with each bin moved by
γ · RoI size · offset, times the mask. One family, as in kernels/roi_align.cu.
NumPy path: deformcp.reference.roi_align.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import roi_align as reference
from ._call import backward, forward
from ._spec import Case, IntPair, OpSpec

FAMILY = "roi_align"
POOL_MODES = ("avg", "max")
#: Largest sampling_ratio accepted (samples per bin and axis).
MAX_SAMPLES_PER_AXIS = 1 << 16


class RoIAlignGrads(NamedTuple):
    """Gradients of :func:`roi_align` / :func:`ps_roi_align` (boxes get none, as in torchvision)."""

    input: Optional[Array]


# --------------------------------------------------------------------------------------- arguments

def parse_roi_options(output_size: IntPair, spatial_scale: float, sampling_ratio: int, aligned: bool,
                      pool_mode: str) -> tuple[int, int, float, int, bool]:
    """The RoIAlign ops' scalar arguments, checked: (PH, PW, spatial_scale, sampling_ratio, aligned)."""
    PH, PW = _validate.pair("output_size", output_size, minimum=1)
    spatial_scale = _validate.real("spatial_scale", spatial_scale, positive=True)
    # more samples than this per bin and axis would not fit any image's memory; the kernels take an int
    sampling_ratio = _validate.integer("sampling_ratio", sampling_ratio, maximum=MAX_SAMPLES_PER_AXIS)
    aligned = _validate.flag("aligned", aligned)
    _validate.choice("pool_mode", pool_mode, POOL_MODES)
    return PH, PW, spatial_scale, sampling_ratio, aligned


class RoIAlignConfig(NamedTuple):
    K: int
    C: int
    C_out: int
    PH: int
    PW: int
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    pool_mode: str
    position_sensitive: bool

    @property
    def options(self) -> tuple[int, bool, int, bool]:
        """The kernels' option arguments."""
        return (self.sampling_ratio, self.aligned, POOL_MODES.index(self.pool_mode), self.position_sensitive)


def _check(call: _dispatch.Call, input: Imported, rois: Imported, output_size: IntPair, spatial_scale: float,
           sampling_ratio: int, aligned: bool, pool_mode: str, position_sensitive: bool = False,
           boxes_name: str = "boxes") -> RoIAlignConfig:
    """Check the arguments of a RoIAlign op."""
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
    C_out = C // (PH * PW) if position_sensitive else C
    _validate.output_fits("output_size", (rois.shape[0], C_out, PH, PW), input.dtype)
    _validate.rois(boxes_name, call, rois, input)
    return RoIAlignConfig(rois.shape[0], C, C_out, PH, PW, spatial_scale, sampling_ratio, aligned, pool_mode,
                          position_sensitive)


def _check_ps(call: _dispatch.Call, input: Imported, boxes: Imported, output_size: IntPair, spatial_scale: float,
              sampling_ratio: int) -> RoIAlignConfig:
    """ps_roi_align's arguments: RoIAlign's, always aligned, averaged and position-sensitive."""
    return _check(call, input, boxes, output_size, spatial_scale, sampling_ratio, True, "avg", True)


def _output(cfg: RoIAlignConfig) -> tuple[tuple[int, ...], str]:
    return (cfg.K, cfg.C_out, cfg.PH, cfg.PW), "(K, C_out, PH, PW)"


# ---------------------------------------------------------------------------------------- kernels

def _launch_forward(call: _dispatch.Call, input: Imported, rois: Imported, cfg: RoIAlignConfig) -> Imported:
    xp = call.xp
    N, C, H, W = input.shape
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    out = _kernels.empty(xp, _output(cfg)[0], input.dtype)
    _kernels.launch(call.backend, FAMILY, "roi_align_forward", input.dtype, out.size, (input, rois, out),
                    (cfg.K, C, H, W, cfg.C_out, cfg.PH, cfg.PW), cfg.options, (cfg.spatial_scale,))
    return out


def _launch_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, rois: Imported,
                     cfg: RoIAlignConfig, wanted: tuple[bool], deterministic: bool) -> tuple[Imported]:
    xp = call.xp
    N, C, H, W = input.shape
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype))  # summed in float32 for 16-bit input
    if cfg.K:
        _kernels.launch(call.backend, FAMILY, "roi_align_backward", input.dtype,
                        N * C if deterministic else grad_output.size, (grad_output, input, rois, grad_input),
                        (N, cfg.K, C, H, W, cfg.C_out, cfg.PH, cfg.PW), cfg.options + (deterministic,),
                        (cfg.spatial_scale,))
    return (grad_input.astype(input.dtype, copy=False),)


# ------------------------------------------------------------------------------------------ public

def roi_align(input: ArrayLike, boxes: ArrayLike, output_size: IntPair, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, pool_mode: str = "avg") -> Array:
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

    >>> import numpy as np, deformcp
    >>> x = np.random.default_rng(0).random((2, 16, 32, 32), np.float32)
    >>> boxes = np.array([[0, 2.0, 3.0, 20.0, 18.5], [1, 0.0, 0.0, 31.0, 31.0]], np.float32)
    >>> deformcp.roi_align(x, boxes, 7, sampling_ratio=2, aligned=True).shape
    (2, 16, 7, 7)
    >>> ramp = np.arange(16.0).reshape(1, 1, 4, 4)                # value = 4·row + column
    >>> deformcp.roi_align(ramp, np.array([[0, 0.0, 0.0, 4.0, 4.0]]), 1, aligned=True)[0, 0]   # its mean
    array([[7.5]])

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(ROI_ALIGN, locals())

def roi_align_backward(grad_output: ArrayLike, input: ArrayLike, boxes: ArrayLike, output_size: IntPair,
                       spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                       pool_mode: str = "avg", deterministic: bool = False) -> RoIAlignGrads:
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
    return RoIAlignGrads(*backward(ROI_ALIGN, locals()))

def ps_roi_align(input: ArrayLike, boxes: ArrayLike, output_size: IntPair, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> Array:
    """Position-sensitive RoIAlign (R-FCN's pooling with RoIAlign sampling), as torchvision.ops.ps_roi_align.

    Args:
        input (array[N, C, H, W]): C must be a multiple of PH·PW.
        boxes, output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`; boxes are always
            shifted by −0.5 pixel (aligned) and not enlarged.

    Returns:
        array[K, C / (PH·PW), PH, PW]: output channel c of bin (ph, pw) averages input channel
        (c·PH + ph)·PW + pw over the bin. A bin without samples pools to 0 (torchvision divides by zero).

    Dai et al., "R-FCN", NeurIPS 2016, https://arxiv.org/abs/1605.06409.

    >>> import numpy as np, deformcp
    >>> x = np.random.default_rng(0).random((1, 2 * 3 * 3, 16, 16))
    >>> deformcp.ps_roi_align(x, np.array([[0, 1.0, 1.0, 12.0, 9.0]]), 3).shape
    (1, 2, 3, 3)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(PS_ROI_ALIGN, locals())

def ps_roi_align_backward(grad_output: ArrayLike, input: ArrayLike, boxes: ArrayLike, output_size: IntPair,
                          spatial_scale: float = 1.0, sampling_ratio: int = -1,
                          deterministic: bool = False) -> RoIAlignGrads:
    """Gradient of :func:`ps_roi_align` with respect to input; ``deterministic`` as in
    :func:`roi_align_backward`. Returns RoIAlignGrads(input)."""
    return RoIAlignGrads(*backward(PS_ROI_ALIGN, locals()))


# ------------------------------------------------------------------------------- deformable RoI pooling

class DeformRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_roi_pool`; None where an input is absent or not asked for."""

    input: Optional[Array]
    offset: Optional[Array]
    mask: Optional[Array]


class DeformRoIPoolConfig(NamedTuple):
    K: int
    C: int
    PH: int
    PW: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float


def _check_deform(call: _dispatch.Call, input: Imported, rois: Imported, offset: Optional[Imported],
                  mask: Optional[Imported], output_size: IntPair, spatial_scale: float, sampling_ratio: int,
                  gamma: float) -> DeformRoIPoolConfig:
    roi = _check(call, input, rois, output_size, spatial_scale, sampling_ratio, True, "avg", boxes_name="rois")
    K, PH, PW = roi.K, roi.PH, roi.PW
    for name, array, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if array is not None:
            layout = f"(K, {channels}, PH, PW)"
            _validate.floating(name, array, 4, layout)
            _validate.shape(name, array, (K, channels, PH, PW), layout)
    _validate.same_dtype(input=input, offset=offset, mask=mask)
    gamma = _validate.real("gamma", gamma)
    return DeformRoIPoolConfig(K, roi.C, PH, PW, roi.spatial_scale, roi.sampling_ratio, gamma)


def _deform_output(cfg: DeformRoIPoolConfig) -> tuple[tuple[int, ...], str]:
    return (cfg.K, cfg.C, cfg.PH, cfg.PW), "(K, C, PH, PW)"


def _deform_launch_forward(call: _dispatch.Call, input: Imported, rois: Imported, offset: Optional[Imported],
                           mask: Optional[Imported], cfg: DeformRoIPoolConfig) -> Imported:
    xp = call.xp
    N, C, H, W = input.shape
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    offset = _kernels.NULL if offset is None else xp.ascontiguousarray(offset)
    mask = _kernels.NULL if mask is None else xp.ascontiguousarray(mask)
    out = _kernels.empty(xp, _deform_output(cfg)[0], input.dtype)
    _kernels.launch(call.backend, FAMILY, "deform_roi_pool_forward", input.dtype, out.size,
                    (input, rois, offset, mask, out), (cfg.K, C, H, W, cfg.PH, cfg.PW), (cfg.sampling_ratio,),
                    (cfg.spatial_scale, cfg.gamma))
    return out


def _deform_launch_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, rois: Imported,
                            offset: Optional[Imported], mask: Optional[Imported], cfg: DeformRoIPoolConfig,
                            wanted: tuple[bool, bool, bool], deterministic: bool
                            ) -> tuple[Optional[Imported], Optional[Imported], Optional[Imported]]:
    want_input, want_offset, want_mask = wanted
    xp = call.xp
    N, C, H, W = input.shape
    K, PH, PW = cfg.K, cfg.PH, cfg.PW
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    offset_arg = _kernels.NULL if offset is None else xp.ascontiguousarray(offset)
    mask_arg = _kernels.NULL if mask is None else xp.ascontiguousarray(mask)
    grad_input = xp.zeros(input.shape, _kernels.compute_dtype(input.dtype)) if want_input else None  # float32 sums
    grad_offset = _kernels.empty(xp, (K, 2, PH, PW), input.dtype) if want_offset else None
    grad_mask = _kernels.empty(xp, (K, 1, PH, PW), input.dtype) if want_mask else None
    reals = (cfg.spatial_scale, cfg.gamma)
    if want_input and K:
        _kernels.launch(call.backend, FAMILY, "deform_roi_pool_backward", input.dtype,
                        N * C if deterministic else grad_output.size,
                        (grad_output, rois, offset_arg, mask_arg, grad_input), (N, K, C, H, W, PH, PW),
                        (cfg.sampling_ratio, deterministic), reals)
    if want_offset or want_mask:
        _kernels.launch(call.backend, FAMILY, "deform_roi_pool_backward_offset", input.dtype, K * PH * PW,
                        (grad_output, input, rois, offset_arg, mask_arg,
                         _kernels.NULL if grad_offset is None else grad_offset,
                         _kernels.NULL if grad_mask is None else grad_mask), (K, C, H, W, PH, PW),
                        (cfg.sampling_ratio,), reals)
    return None if grad_input is None else grad_input.astype(input.dtype, copy=False), grad_offset, grad_mask


def deform_roi_pool(input: ArrayLike, rois: ArrayLike, offset: Optional[ArrayLike] = None, output_size: IntPair = 7,
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                    mask: Optional[ArrayLike] = None) -> Array:
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

    >>> import numpy as np, deformcp
    >>> x = np.random.default_rng(0).random((1, 8, 16, 16), np.float32)
    >>> rois = np.array([[0, 2.0, 2.0, 12.0, 10.0]], np.float32)
    >>> offset = np.zeros((1, 2, 3, 3), np.float32)
    >>> y = deformcp.deform_roi_pool(x, rois, offset, 3, sampling_ratio=2)
    >>> y.shape
    (1, 8, 3, 3)
    >>> aligned = deformcp.roi_align(x, rois, 3, sampling_ratio=2, aligned=True)   # zero offsets: RoIAlign
    >>> bool(np.allclose(y, aligned))
    True

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(DEFORM_ROI_POOL, locals())

def deform_roi_pool_backward(grad_output: ArrayLike, input: ArrayLike, rois: ArrayLike,
                             offset: Optional[ArrayLike] = None, output_size: IntPair = 7, spatial_scale: float = 1.0,
                             sampling_ratio: int = 0, gamma: float = 0.1, mask: Optional[ArrayLike] = None,
                             needs_input_grad: Sequence[bool] = (True, True, True),
                             deterministic: bool = False) -> DeformRoIPoolGrads:
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
    return DeformRoIPoolGrads(*backward(DEFORM_ROI_POOL, locals()))


# ------------------------------------------------------------------------------------------- specs

def _random_boxes(rng: np.random.Generator, N: int, H: int, W: int, K: int) -> npt.NDArray[np.float64]:
    """Boxes in, across and outside the image, some degenerate; image coordinates for spatial_scale 0.5."""
    x1, y1 = rng.uniform(-8, 2 * W, K), rng.uniform(-8, 2 * H, K)
    w, h = rng.uniform(0, W, K), rng.uniform(0, H, K)
    w[::7] = 0.0  # zero-size boxes
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1).astype(np.float64)


def _roi_inputs(channels: int) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    return lambda rng: {"input": rng.standard_normal((2, channels, 9, 11)), "boxes": _random_boxes(rng, 2, 9, 11, 12)}


def _pool_inputs(offset: bool, modulated: bool) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        K = 10
        arrays = {"input": rng.standard_normal((2, 5, 9, 11)), "rois": _random_boxes(rng, 2, 9, 11, K)}
        if offset:
            arrays["offset"] = rng.standard_normal((K, 2, 3, 4))
        if modulated:
            arrays["mask"] = rng.uniform(0, 1, (K, 1, 3, 4))
        return arrays
    return make


ROI_ALIGN = OpSpec(
    name="roi_align", arrays=("input", "boxes"), grads=RoIAlignGrads, check=_check, output=_output,
    reference=reference.roi_align, reference_backward=reference.roi_align_backward, kernels=_launch_forward,
    kernels_backward=_launch_backward, function=roi_align, backward=roi_align_backward, boxes="boxes",
    cases=tuple(Case(f"{mode}-aligned={aligned}-sampling_ratio={ratio}", _roi_inputs(6),
                     dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=ratio, aligned=aligned,
                          pool_mode=mode))
                for mode in POOL_MODES for aligned in (False, True) for ratio in (-1, 0, 1, 3)))

PS_ROI_ALIGN = OpSpec(
    name="ps_roi_align", arrays=("input", "boxes"), grads=RoIAlignGrads, check=_check_ps, output=_output,
    reference=reference.roi_align, reference_backward=reference.roi_align_backward, kernels=_launch_forward,
    kernels_backward=_launch_backward, function=ps_roi_align, backward=ps_roi_align_backward, boxes="boxes",
    cases=tuple(Case(f"sampling_ratio={ratio}", _roi_inputs(2 * 3 * 4),
                     dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=ratio)) for ratio in (-1, 0, 2)))

_POOL_OPTIONS = dict(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=2, gamma=0.1)

DEFORM_ROI_POOL = OpSpec(
    name="deform_roi_pool", arrays=("input", "rois", "offset", "mask"), grads=DeformRoIPoolGrads,
    check=_check_deform, output=_deform_output, reference=reference.deform_roi_pool,
    reference_backward=reference.deform_roi_pool_backward, kernels=_deform_launch_forward,
    kernels_backward=_deform_launch_backward, function=deform_roi_pool, backward=deform_roi_pool_backward,
    boxes="rois", cases=(Case("plain", _pool_inputs(False, False), _POOL_OPTIONS),
                         Case("offset", _pool_inputs(True, False), _POOL_OPTIONS),
                         Case("offset-mask", _pool_inputs(True, True), _POOL_OPTIONS)))

SPECS = (ROI_ALIGN, PS_ROI_ALIGN, DEFORM_ROI_POOL)
