"""DCNv3 (InternImage) and DCNv4 (FlashInternImage): deformable convolution's sampling, channels-last, per group
G of Cg channels, each output pixel summing its P kernel taps, moved by learned offsets and weighted by a learned
modulation (DCNv3: as given, the module soft-maxes it; DCNv4: unbounded, or soft-maxed with ``softmax``).

Wang et al., "InternImage: Exploring Large-Scale Vision Foundation Models with Deformable Convolutions", CVPR 2023,
https://arxiv.org/abs/2211.05778; Xiong et al., "Efficient Deformable ConvNets: Rethinking Dynamic and Sparse
Operator for Vision Applications" (DCNv4), CVPR 2024, https://arxiv.org/abs/2401.06197.

Tap p = i·k_h + j (i over the kernel's width, outer; j over its height) samples input bilinearly at pixel
x = (c_w − pad_w + w_out·s_w − c_w·scale) + (i·d_w + Δx)·scale, c_w = (d_w·(k_w − 1)) >> 1 (y likewise, with j),
with zeros outside the open (−1, H) × (−1, W), as InternImage's CUDA op. That is multi-scale deformable attention
over one level with the locations in pixels, so both run on its NumPy path and kernels
(deformcp.reference.dcn composes them; kernels/ms_deform_attn.cu's "pixel" method).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import dcn as reference
from . import ms_deform_attn as msda
from ._call import backward, forward
from ._spec import Case, OpSpec

#: The kernel family the ops run on: multi-scale deformable attention's.
FAMILY = msda.FAMILY


class DCNv3Grads(NamedTuple):
    """Gradients of :func:`dcnv3`; a field is None where it was not asked for."""

    input: Optional[Array]
    offset: Optional[Array]
    mask: Optional[Array]


class DCNv4Grads(NamedTuple):
    """Gradients of :func:`dcnv4`; a field is None where it was not asked for."""

    input: Optional[Array]
    offset_mask: Optional[Array]


class DCNConfig(NamedTuple):
    """A checked call: sizes, the kernel's geometry ((h, w) pairs), and the attention it runs as (``msda``)."""

    N: int
    H: int
    W: int
    G: int
    Cg: int
    Ho: int
    Wo: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    offset_scale: float
    remove_center: bool
    softmax: bool
    msda: msda.MSDeformAttnConfig

    @property
    def P(self) -> int:
        return self.kh * self.kw - self.remove_center


# ---------------------------------------------------------------------------------------------- checks

def _check_common(input: Imported, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                  dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                  remove_center: bool, softmax: bool) -> DCNConfig:
    layout = "(N, H, W, G·Cg)"
    _validate.floating("input", input, 4, layout)
    kh, kw = (_validate.integer(name, value, minimum=1) for name, value in (("kernel_h", kernel_h),
                                                                             ("kernel_w", kernel_w)))
    sh, sw = (_validate.integer(name, value, minimum=1) for name, value in (("stride_h", stride_h),
                                                                             ("stride_w", stride_w)))
    ph, pw = (_validate.integer(name, value, minimum=0) for name, value in (("pad_h", pad_h), ("pad_w", pad_w)))
    dh, dw = (_validate.integer(name, value, minimum=1) for name, value in (("dilation_h", dilation_h),
                                                                             ("dilation_w", dilation_w)))
    G = _validate.integer("group", group, minimum=1)
    Cg = _validate.integer("group_channels", group_channels, minimum=1)
    scale = _validate.real("offset_scale", offset_scale)
    remove_center = _validate.flag("remove_center", remove_center)
    if remove_center and (kh != kw or kh % 2 == 0):
        raise ValueError(f"remove_center: expected an odd square kernel (a centre tap to remove), got kernel_h = "
                         f"{kh}, kernel_w = {kw}")
    N, H, W, C = input.shape
    if C != G * Cg:
        raise ValueError(f"input: expected G·Cg = {G}·{Cg} = {G * Cg} channels (group, group_channels) in {layout}, "
                         f"got shape {tuple(input.shape)}")
    if H < 1 or W < 1:
        raise ValueError(f"input: expected H ≥ 1 and W ≥ 1 in {layout}, got shape {tuple(input.shape)}")
    Ho, Wo = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1, (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input: expected H and W for which the output has H_out, W_out ≥ 1 (kernel {kh}×{kw}, "
                         f"dilation ({dh}, {dw}), padding ({ph}, {pw})), got shape {tuple(input.shape)}")
    _validate.output_fits("input", (N, Ho, Wo, C), input.dtype)
    P = kh * kw - remove_center
    attention = msda.MSDeformAttnConfig(N, H * W, G, Cg, Ho * Wo, ((H, W),), (0,), (P,), "pixel", softmax)
    return DCNConfig(N, H, W, G, Cg, Ho, Wo, kh, kw, (sh, sw), (ph, pw), (dh, dw), scale, remove_center, softmax,
                     attention)


def _per_pixel(name: str, x: Imported, cfg: DCNConfig, size: int, what: str) -> None:
    layout = f"(N, H_out, W_out, {what})"
    _validate.floating(name, x, 4, layout)
    _validate.shape(name, x, (cfg.N, cfg.Ho, cfg.Wo, size), layout)


def _check_dcnv3(call: _dispatch.Call, input: Imported, offset: Imported, mask: Imported, kernel_h: int,
                 kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                 dilation_w: int, group: int, group_channels: int, offset_scale: float,
                 remove_center: bool) -> DCNConfig:
    cfg = _check_common(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center, False)
    _per_pixel("offset", offset, cfg, cfg.G * cfg.P * 2, "G·P·2")
    _per_pixel("mask", mask, cfg, cfg.G * cfg.P, "G·P")
    _validate.same_dtype(input=input, offset=offset, mask=mask)
    return cfg


def _check_dcnv4(call: _dispatch.Call, input: Imported, offset_mask: Imported, kernel_h: int, kernel_w: int,
                 stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                 group_channels: int, offset_scale: float, remove_center: bool, softmax: bool) -> DCNConfig:
    cfg = _check_common(input, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center, _validate.flag("softmax", softmax))
    layout = "(N, H_out, W_out, P_pad)"
    _validate.floating("offset_mask", offset_mask, 4, layout)
    _validate.shape("offset_mask", offset_mask, (cfg.N, cfg.Ho, cfg.Wo, None), layout)
    if offset_mask.shape[3] < 3 * cfg.G * cfg.P:
        raise ValueError(f"offset_mask: expected P_pad ≥ 3·G·P = {3 * cfg.G * cfg.P} (G = {cfg.G} groups of P = "
                         f"{cfg.P} taps) in {layout}, got shape {tuple(offset_mask.shape)}")
    _validate.same_dtype(input=input, offset_mask=offset_mask)
    return cfg


def _output(cfg: DCNConfig) -> tuple[tuple[int, ...], str]:
    return (cfg.N, cfg.Ho, cfg.Wo, cfg.G * cfg.Cg), "(N, H_out, W_out, G·Cg)"


# ------------------------------------------------------------------------------------------ kernel glue

def _attention(call: _dispatch.Call) -> reference.Attention:
    return functools.partial(msda._forward_kernels, call)


def _attention_backward(call: _dispatch.Call, deterministic: bool) -> reference.AttentionBackward:
    def run(grad_output: Imported, value: Imported, locations: Imported, weights: Optional[Imported],
            cfg: msda.MSDeformAttnConfig, want_value: bool, want_locations: bool,
            want_weights: bool) -> tuple[Optional[Imported], ...]:
        return msda._backward_kernels(call, grad_output, value, locations, weights, cfg, want_value, want_locations,
                                      want_weights, deterministic)
    return run


def _dcnv3_kernels(call: _dispatch.Call, input: Imported, offset: Imported, mask: Imported, cfg: DCNConfig) -> Imported:
    pairs = offset.reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, cfg.P, 2)
    return reference.forward(call.xp, _attention(call), input, pairs, mask, cfg)


def _dcnv3_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, offset: Imported,
                            mask: Imported, cfg: DCNConfig, wanted: tuple[bool, bool, bool],
                            deterministic: bool) -> tuple[Optional[Imported], ...]:
    pairs = offset.reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, cfg.P, 2)
    grad_input, grad_pairs, grad_mask = reference.backward(call.xp, _attention_backward(call, deterministic),
                                                           grad_output, input, pairs, mask, cfg, *wanted)
    return (grad_input, None if grad_pairs is None else grad_pairs.reshape(offset.shape),
            None if grad_mask is None else grad_mask.reshape(mask.shape))


def _dcnv4_kernels(call: _dispatch.Call, input: Imported, offset_mask: Imported, cfg: DCNConfig) -> Imported:
    pairs, mask = reference.split(offset_mask, cfg)
    return reference.forward(call.xp, _attention(call), input, pairs, mask, cfg)


def _dcnv4_kernels_backward(call: _dispatch.Call, grad_output: Imported, input: Imported, offset_mask: Imported,
                            cfg: DCNConfig, wanted: tuple[bool, bool],
                            deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    want_input, want_offset_mask = wanted
    pairs, mask = reference.split(offset_mask, cfg)
    grad_input, grad_pairs, grad_mask = reference.backward(
        call.xp, _attention_backward(call, deterministic), grad_output, input, pairs, mask, cfg, want_input,
        want_offset_mask, want_offset_mask)
    return grad_input, (reference.offset_mask_gradient(call.xp, grad_pairs, grad_mask, offset_mask, cfg)
                        if want_offset_mask else None)


# --------------------------------------------------------------------------------------------- functions

def dcnv3(input: ArrayLike, offset: ArrayLike, mask: ArrayLike, kernel_h: int, kernel_w: int, stride_h: int,
          stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False) -> Array:
    """InternImage's DCNv3 core op, ``DCNv3Function.apply`` without its im2col_step: per group g and tap p,
    ``out[n, h, w, g·Cg + c] = Σ_p mask[n, h, w, g·P + p] · input_g,c(x_p, y_p)``.

    Args:
        input (array[N, H, W, G·Cg]): channels-last, G groups of Cg channels.
        offset (array[N, H_out, W_out, G·P·2]): per group, per tap, (Δx, Δy) in pixels (times offset_scale).
        mask (array[N, H_out, W_out, G·P]): the taps' modulation, used as given (InternImage's module applies the
            softmax).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w (int): the kernel's geometry;
            H_out = (H + 2·pad_h − (dilation_h·(kernel_h − 1) + 1)) // stride_h + 1, W_out likewise.
        group, group_channels (int): G and Cg.
        offset_scale (float): scales the kernel's tap offsets and the learned ones alike.
        remove_center (bool): drop the centre tap (P = k_h·k_w − 1; odd square kernels). Default: False.

    Returns:
        array[N, H_out, W_out, G·Cg], input's dtype and framework.

    Tap p = i·k_h + j (i over the kernel's width, outer) samples bilinearly at pixel
    x = (c_w − pad_w + w_out·s_w − c_w·scale) + (i·d_w + Δx)·scale, c_w = (d_w·(k_w − 1)) >> 1, y likewise with j,
    and reads 0 outside the open (−1, H) × (−1, W) (InternImage's CUDA op; its pure-PyTorch reference swaps pad_h
    and pad_w). A NaN or ±inf offset samples 0. Any batch size. https://arxiv.org/abs/2211.05778.

    >>> import numpy as np, deformcp
    >>> x = np.arange(2 * 3 * 4.0).reshape(1, 3, 4, 2)                  # N, H, W, G·Cg: 2 groups of 1
    >>> offset, mask = np.zeros((1, 3, 4, 2 * 9 * 2)), np.zeros((1, 3, 4, 2 * 9))
    >>> mask[..., 4], mask[..., 9 + 4] = 1, 1                           # each group's centre tap (i = j = 1)
    >>> y = deformcp.dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1, 1.0)
    >>> bool(np.array_equal(y, x))                                      # zero offsets, centre taps: the input
    True
    """
    return forward(DCNV3, locals())


def dcnv3_backward(grad_output: ArrayLike, input: ArrayLike, offset: ArrayLike, mask: ArrayLike, kernel_h: int,
                   kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int,
                   dilation_w: int, group: int, group_channels: int, offset_scale: float, remove_center: bool = False,
                   needs_input_grad: Sequence[bool] = (True, True, True), deterministic: bool = False) -> DCNv3Grads:
    """Gradients of :func:`dcnv3` with respect to input, offset and mask.

    Args:
        grad_output (array[N, H_out, W_out, G·Cg]); the other arguments as given to :func:`dcnv3`.
        needs_input_grad (triple of bool): which of (input, offset, mask). Default: all.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the input gradient with atomics;
            True gives each (image, group, channel) to one thread: bitwise identical run to run. The NumPy path
            is always deterministic. Default: False.

    Returns:
        DCNv3Grads: ``input``, ``offset`` and ``mask``, shaped as given, None where not asked for. At an integer
        pixel coordinate the bilinear weights' derivative is taken from the right; a tap at or beyond −1 (or at H,
        W) samples 0 and has offset gradient 0.
    """
    return DCNv3Grads(*backward(DCNV3, locals()))


def dcnv4(input: ArrayLike, offset_mask: ArrayLike, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
          pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False, softmax: bool = False) -> Array:
    """DCNv4's core op: :func:`dcnv3`'s sampling with the offsets and the modulation in one array.

    Args:
        input (array[N, H, W, G·Cg]): channels-last.
        offset_mask (array[N, H_out, W_out, P_pad]): per group a block of 3P numbers, the P (Δx, Δy) pairs then the
            P modulation scalars; groups back to back, then padding up to P_pad ≥ 3·G·P (DCNv4's modules use
            ceil(3·G·P / 8)·8), which is not read.
        kernel_h, ..., offset_scale, remove_center: as :func:`dcnv3`.
        softmax (bool): soft-max each group's P modulation scalars (over the taps) inside the op; False uses them
            unbounded, as DCNv4 does. Default: False.

    Returns:
        array[N, H_out, W_out, G·Cg]. https://arxiv.org/abs/2401.06197.
    """
    return forward(DCNV4, locals())


def dcnv4_backward(grad_output: ArrayLike, input: ArrayLike, offset_mask: ArrayLike, kernel_h: int, kernel_w: int,
                   stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                   group_channels: int, offset_scale: float, remove_center: bool = False, softmax: bool = False,
                   needs_input_grad: Sequence[bool] = (True, True), deterministic: bool = False) -> DCNv4Grads:
    """Gradients of :func:`dcnv4` with respect to input and offset_mask (0 in its padding).

    Args:
        grad_output (array[N, H_out, W_out, G·Cg]); the other arguments as given to :func:`dcnv4`.
        needs_input_grad (pair of bool): which of (input, offset_mask). Default: both.
        deterministic (bool): as :func:`dcnv3_backward`.

    Returns:
        DCNv4Grads: ``input`` and ``offset_mask``, shaped as given, None where not asked for.
    """
    return DCNv4Grads(*backward(DCNV4, locals()))


# ------------------------------------------------------------------------------------------------- specs

#: Parity geometries: a plain 3×3; a non-square kernel with stride, dilation and pad_h ≠ pad_w and a scale; the
#: centre removed.
_GEOMETRIES: dict[str, dict[str, Any]] = {
    "3x3": dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1, dilation_w=1,
                offset_scale=1.0, remove_center=False),
    "2x3-stride(2,1)-pad(1,2)-dilation(1,2)-scale0.5": dict(kernel_h=2, kernel_w=3, stride_h=2, stride_w=1, pad_h=1,
                                                            pad_w=2, dilation_h=1, dilation_w=2, offset_scale=0.5,
                                                            remove_center=False),
    "3x3-remove_center": dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
                              dilation_w=1, offset_scale=1.0, remove_center=True),
}
_N, _H, _W, _G, _CG = 2, 5, 6, 2, 3


def _sizes(geometry: dict[str, Any]) -> tuple[int, int, int]:
    """(H_out, W_out, P) of a parity geometry."""
    g = geometry
    Ho = (_H + 2 * g["pad_h"] - (g["dilation_h"] * (g["kernel_h"] - 1) + 1)) // g["stride_h"] + 1
    Wo = (_W + 2 * g["pad_w"] - (g["dilation_w"] * (g["kernel_w"] - 1) + 1)) // g["stride_w"] + 1
    return Ho, Wo, g["kernel_h"] * g["kernel_w"] - g["remove_center"]


def _dcnv3_inputs(geometry: dict[str, Any]) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    """Offsets of up to a few pixels (taps inside, across and outside the borders), modulation of both signs."""
    Ho, Wo, P = _sizes(geometry)

    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        return {"input": rng.standard_normal((_N, _H, _W, _G * _CG)),
                "offset": rng.normal(0, 1.5, (_N, Ho, Wo, _G * P * 2)),
                "mask": rng.uniform(-1, 1, (_N, Ho, Wo, _G * P))}
    return make


def _dcnv4_inputs(geometry: dict[str, Any],
                  padding: int) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    Ho, Wo, P = _sizes(geometry)

    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        blocks = np.concatenate([rng.normal(0, 1.5, (_N, Ho, Wo, _G, 2 * P)), rng.uniform(-1, 1, (_N, Ho, Wo, _G, P))],
                                axis=-1).reshape(_N, Ho, Wo, 3 * _G * P)
        pad = rng.standard_normal((_N, Ho, Wo, padding))   # never read: its values must not matter
        return {"input": rng.standard_normal((_N, _H, _W, _G * _CG)),
                "offset_mask": np.concatenate([blocks, pad], axis=-1)}
    return make


DCNV3 = OpSpec(
    name="dcnv3", arrays=("input", "offset", "mask"), grads=DCNv3Grads, check=_check_dcnv3, output=_output,
    reference=reference.dcnv3, reference_backward=reference.dcnv3_backward, kernels=_dcnv3_kernels,
    kernels_backward=_dcnv3_kernels_backward, function=dcnv3, backward=dcnv3_backward,
    batch=("input", "offset", "mask"),
    cases=tuple(Case(label, _dcnv3_inputs(g), {**g, "group": _G, "group_channels": _CG})
                for label, g in _GEOMETRIES.items()))

DCNV4 = OpSpec(
    name="dcnv4", arrays=("input", "offset_mask"), grads=DCNv4Grads, check=_check_dcnv4, output=_output,
    reference=reference.dcnv4, reference_backward=reference.dcnv4_backward, kernels=_dcnv4_kernels,
    kernels_backward=_dcnv4_kernels_backward, function=dcnv4, backward=dcnv4_backward,
    batch=("input", "offset_mask"),
    cases=tuple(Case(f"{label}-softmax={softmax}-padding={padding}", _dcnv4_inputs(g, padding),
                     {**g, "group": _G, "group_channels": _CG, "softmax": softmax})
                for (label, g), softmax, padding in zip(_GEOMETRIES.items(), (False, True, False), (0, 2, 5))))

SPECS = (DCNV3, DCNV4)
