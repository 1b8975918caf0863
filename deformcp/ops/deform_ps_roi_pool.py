"""Deformable position-sensitive RoI pooling (Deformable ConvNets v1), forward and backward.

Dai et al., "Deformable Convolutional Networks", ICCV 2017, https://arxiv.org/abs/1703.06211. Semantics of
the original DCNv1 DeformablePSROIPooling operator (MXNet, and mmcv's DeformRoIPoolingFunction):
per-class, per-part offsets, samples not centred in their sub-bins, samples outside the image skipped and
not counted. Kernels: kernels/deform_ps_roi_pool.cu.
NumPy path: deformcp.reference.deform_ps_roi_pool.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import deform_ps_roi_pool as reference
from ._call import backward, forward
from ._spec import Case, OpSpec
from .roi_align import MAX_SAMPLES_PER_AXIS

FAMILY = "deform_ps_roi_pool"
_OFFSET_LAYOUT = "(K, 2·num_classes, part_size, part_size)"


class DeformPSRoIPoolGrads(NamedTuple):
    """Gradients of :func:`deform_ps_roi_pool` (rois get none)."""

    input: Optional[Array]
    offset: Optional[Array]


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
    def sizes(self) -> tuple[int, ...]:
        """The kernels' size arguments after N: K, C, H, W, C_out, P, S, G, num_classes, spp."""
        return (self.K, self.C, self.H, self.W, self.output_dim, self.pooled_size, self.part_size,
                self.group_size, self.num_classes, self.sample_per_part)


# --------------------------------------------------------------------------------------- arguments

def _positive(name: str, value: object, maximum: int = _validate.INT_MAX) -> int:
    return _validate.integer(name, value, maximum, minimum=1)


def _check(call: _dispatch.Call, input: Imported, rois: Imported, offset: Optional[Imported], output_dim: int,
           group_size: int, pooled_size: int, part_size: Optional[int], sample_per_part: int, spatial_scale: float,
           trans_std: float, no_trans: bool) -> _Config:
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


def _output(cfg: _Config) -> tuple[tuple[int, ...], str]:
    return (cfg.K, cfg.output_dim, cfg.pooled_size, cfg.pooled_size), "(K, output_dim, P, P)"


# ---------------------------------------------------------------------------------------- kernels

def _launch_forward(call: _dispatch.Call, input: Imported, rois: Imported, offset: Optional[Imported],
                    cfg: _Config) -> Imported:
    xp = call.xp
    input, rois = xp.ascontiguousarray(input), xp.ascontiguousarray(rois)
    offset = _kernels.NULL if cfg.no_trans else xp.ascontiguousarray(offset)
    out = _kernels.empty(xp, (cfg.K, cfg.output_dim, cfg.pooled_size, cfg.pooled_size), input.dtype)
    _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_forward", input.dtype, out.size,
                    (input, rois, offset, out), cfg.sizes, (cfg.no_trans,), (cfg.spatial_scale, cfg.trans_std))
    return out


def _launch_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, rois: Imported,
                     offset: Optional[Imported], cfg: _Config, wanted: tuple[bool, bool],
                     deterministic: bool) -> tuple[Optional[Imported], ...]:
    want_input, want_offset = wanted
    xp = call.xp
    grad_output, input, rois = (xp.ascontiguousarray(a) for a in (grad_output, input, rois))
    trans = _kernels.NULL if cfg.no_trans else xp.ascontiguousarray(offset)
    offset_kernel = want_offset and not cfg.no_trans and cfg.K > 0  # else the offset gradient is all zeros
    sums = _kernels.compute_dtype(input.dtype)  # scatter-added gradients are summed in float32 for 16-bit input
    grad_input = xp.zeros(input.shape, sums) if want_input else None
    grad_offset = None
    if want_offset:
        assert offset is not None  # wanted: asked for and present
        if deterministic and offset_kernel:  # the kernel writes every element
            grad_offset = _kernels.empty(xp, offset.shape, offset.dtype)
        else:
            grad_offset = xp.zeros(offset.shape, sums)
    options, reals = (cfg.no_trans,), (cfg.spatial_scale, cfg.trans_std)
    if cfg.K and (want_input or offset_kernel) and not deterministic:
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward", input.dtype, grad_output.size,
                        (grad_output, input, rois, trans, _kernels.NULL if grad_input is None else grad_input,
                         grad_offset if offset_kernel else _kernels.NULL), cfg.sizes, options, reals)
    if cfg.K and want_input and deterministic:
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward_input", input.dtype, cfg.N * cfg.C,
                        (grad_output, input, rois, trans, grad_input), (cfg.N, *cfg.sizes), options, reals)
    if offset_kernel and deterministic:
        assert grad_offset is not None  # allocated above: offset_kernel implies want_offset
        _kernels.launch(call.backend, FAMILY, "deform_ps_roi_pool_backward_offset", input.dtype,
                        grad_offset.size // 2, (grad_output, input, rois, trans, grad_offset), cfg.sizes, options,
                        reals)
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_offset))


# ------------------------------------------------------------------------------------------ public

def deform_ps_roi_pool(input: ArrayLike, rois: ArrayLike, offset: Optional[ArrayLike], output_dim: int,
                       group_size: int, pooled_size: int, part_size: Optional[int] = None, sample_per_part: int = 4,
                       spatial_scale: float = 1.0, trans_std: float = 0.0, no_trans: bool = False) -> Array:
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

    >>> import numpy as np, deformcp
    >>> rng = np.random.default_rng(0)
    >>> x = rng.random((2, 3 * 7 * 7, 32, 32), np.float32)
    >>> rois = np.array([[0, 2, 3, 20, 18], [1, 0, 0, 31, 31]], np.float32)
    >>> offset = 0.1 * rng.standard_normal((2, 2, 7, 7), np.float32)
    >>> deformcp.deform_ps_roi_pool(x, rois, offset, 3, 7, 7, trans_std=0.1).shape
    (2, 3, 7, 7)

    Every rule in full, with the border cases: docs/conventions.md.
    """
    return forward(DEFORM_PS_ROI_POOL, locals())


def deform_ps_roi_pool_backward(grad_output: ArrayLike, input: ArrayLike, rois: ArrayLike,
                                offset: Optional[ArrayLike], output_dim: int, group_size: int, pooled_size: int,
                                part_size: Optional[int] = None, sample_per_part: int = 4, spatial_scale: float = 1.0,
                                trans_std: float = 0.0, no_trans: bool = False,
                                needs_input_grad: Sequence[bool] = (True, True),
                                deterministic: bool = False) -> DeformPSRoIPoolGrads:
    """Gradients of :func:`deform_ps_roi_pool` with respect to input and offset.

    Args:
        grad_output (array[K, output_dim, P, P]): gradient of the loss with respect to the output.
        input, rois, offset and the options: as given to :func:`deform_ps_roi_pool`.
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
    return DeformPSRoIPoolGrads(*backward(DEFORM_PS_ROI_POOL, locals()))


# ------------------------------------------------------------------------------------------- spec

def _random_rois(rng: np.random.Generator, N: int, H: int, W: int, K: int,
                 inside_left_top: bool = False) -> npt.NDArray[np.float64]:
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


def _case(output_dim: int, G: int, P: int, S: int, spp: int, classes: int, no_trans: bool) -> Case:
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        N, H, W, K = 2, 9, 11, 10
        return {"input": rng.standard_normal((N, output_dim * G * G, H, W)),
                "rois": _random_rois(rng, N, H, W, K, inside_left_top=no_trans),
                "offset": rng.standard_normal((K, 2 * classes, S, S))}

    options = dict(output_dim=output_dim, group_size=G, pooled_size=P, part_size=S, sample_per_part=spp,
                   spatial_scale=CHECK_SCALE, trans_std=0.25, no_trans=no_trans)
    label = f"dim{output_dim}-G{G}-P{P}-S{S}-spp{spp}-classes{classes}" + ("-no_trans" if no_trans else "")
    return Case(label, make, options)


DEFORM_PS_ROI_POOL = OpSpec(
    name="deform_ps_roi_pool", arrays=("input", "rois", "offset"), grads=DeformPSRoIPoolGrads, check=_check,
    output=_output, reference=reference.deform_ps_roi_pool, reference_backward=reference.deform_ps_roi_pool_backward,
    kernels=_launch_forward, kernels_backward=_launch_backward, function=deform_ps_roi_pool,
    backward=deform_ps_roi_pool_backward, boxes="rois",
    cases=(_case(2, 3, 3, 3, 2, 1, False),
           _case(4, 2, 3, 2, 3, 2, False),   # two classes, G < P, S < P
           _case(3, 1, 4, 5, 1, 3, False),   # three classes, G = 1, S > P
           _case(2, 4, 3, 3, 4, 1, False),   # G > P
           _case(2, 2, 4, 4, 2, 1, True),
           _case(1, 3, 3, 2, 3, 1, True)))

SPECS = (DEFORM_PS_ROI_POOL,)
