"""DCNv3 and DCNv4 as multi-scale deformable attention over one level (deformcp.ops.dcn): value the input
(N, H·W, G, Cg), a query per output pixel, a head per group, a point per kernel tap, the locations in pixels
(the attention's "pixel" method). The composition is written once, for any array namespace ``xp``, and runs on
either implementation of the attention: its NumPy path (here) or its kernels (deformcp.ops.dcn). ``cfg`` is the
op's checked configuration, ``cfg.msda`` the attention's.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import numpy.typing as npt

from .._kernels import compute_dtype
from .._types import Imported
from . import ms_deform_attn as msda

if TYPE_CHECKING:
    from ..ops.dcn import DCNConfig
    from ..ops.ms_deform_attn import MSDeformAttnConfig

#: attention(value, locations, weights, cfg.msda) → output: the attention's NumPy path or its kernels
Attention = Callable[[Imported, Imported, Optional[Imported], "MSDeformAttnConfig"], Imported]
#: attention_backward(grad_output, value, locations, weights, cfg.msda, want_value, want_locations, want_weights)
#: → (grad_value, grad_locations, grad_weights), None where not wanted
AttentionBackward = Callable[[Imported, Imported, Imported, Optional[Imported], "MSDeformAttnConfig", bool, bool, bool],
                             tuple[Optional[Imported], ...]]


def pixel_locations(xp: ModuleType, pairs: Imported, cfg: DCNConfig, dtype: np.dtype[Any]) -> Imported:
    """pairs (N, H_out, W_out, G, P, 2) of (Δx, Δy) → the taps' pixel coordinates (N, H_out·W_out, G, P, 2) in
    dtype, with InternImage's arithmetic: x = (c_w − pad_w + w_out·s_w − c_w·scale) + (i·d_w + Δx)·scale,
    c_w = (d_w·(k_w − 1)) >> 1, y likewise; tap p = i·k_h + j (the kernel's width index i outer, its height index
    j inner), the centre left out with remove_center."""
    (sh, sw), (ph, pw), (dh, dw) = cfg.stride, cfg.padding, cfg.dilation
    ch, cw = (dh * (cfg.kh - 1)) >> 1, (dw * (cfg.kw - 1)) >> 1
    scale = dtype.type(cfg.offset_scale)
    taps = [(i, j) for i in range(cfg.kw) for j in range(cfg.kh)
            if not (cfg.remove_center and (i, j) == (cfg.kw // 2, cfg.kh // 2))]
    tap_x = xp.asarray(np.array([i * dw for i, _ in taps], dtype))
    tap_y = xp.asarray(np.array([j * dh for _, j in taps], dtype))
    start_x = xp.asarray((np.arange(cfg.Wo) * sw + (cw - pw)).astype(dtype) - dtype.type(cw) * scale)
    start_y = xp.asarray((np.arange(cfg.Ho) * sh + (ch - ph)).astype(dtype) - dtype.type(ch) * scale)
    pairs = pairs.astype(dtype, copy=False)
    x = start_x[:, None, None] + (tap_x + pairs[..., 0]) * scale
    y = start_y[:, None, None, None] + (tap_y + pairs[..., 1]) * scale
    return xp.stack([x, y], axis=-1).reshape(cfg.N, cfg.Ho * cfg.Wo, cfg.G, cfg.P, 2)


def split(offset_mask: Imported, cfg: DCNConfig) -> tuple[Imported, Imported]:
    """DCNv4's offset_mask (N, H_out, W_out, P_pad) → its (Δx, Δy) pairs (N, H_out, W_out, G, P, 2) and modulation
    (N, H_out, W_out, G, P): per group 2P offsets then P mask values, groups back to back, padding after."""
    blocks = offset_mask[..., :cfg.G * 3 * cfg.P].reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, 3 * cfg.P)
    return blocks[..., :2 * cfg.P].reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, cfg.P, 2), blocks[..., 2 * cfg.P:]


def _operands(xp: ModuleType, input: Imported, pairs: Imported, mask: Imported,
              cfg: DCNConfig) -> tuple[Imported, Imported, Optional[Imported]]:
    """The attention's arrays in the compute dtype: value (N, H·W, G, Cg), and the locations and the weights, or
    (softmax) the two packed per head as [2P locations, P logits]."""
    dtype = compute_dtype(input.dtype)
    value = input.reshape(cfg.N, cfg.H * cfg.W, cfg.G, cfg.Cg).astype(dtype, copy=False)
    locations = pixel_locations(xp, pairs, cfg, dtype)
    weights = mask.reshape(cfg.N, cfg.Ho * cfg.Wo, cfg.G, cfg.P).astype(dtype, copy=False)
    if cfg.softmax:
        heads = (cfg.N, cfg.Ho * cfg.Wo, cfg.G)
        return value, xp.concatenate([locations.reshape(*heads, 2 * cfg.P), weights], axis=-1), None
    return value, locations, weights


def forward(xp: ModuleType, attention: Attention, input: Imported, pairs: Imported, mask: Imported,
            cfg: DCNConfig) -> Imported:
    """(N, H_out, W_out, G·Cg) in input's dtype: attention(value, locations, weights, cfg.msda) run on the operands
    of :func:`_operands`."""
    out = attention(*_operands(xp, input, pairs, mask, cfg), cfg.msda)
    return out.reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G * cfg.Cg).astype(input.dtype, copy=False)


def backward(xp: ModuleType, attention_backward: AttentionBackward, grad_output: Imported, input: Imported,
             pairs: Imported, mask: Imported, cfg: DCNConfig, want_input: bool, want_offset: bool,
             want_mask: bool) -> tuple[Optional[Imported], ...]:
    """(grad_input, grad_pairs (N, H_out, W_out, G, P, 2), grad_mask (N, H_out, W_out, G, P)) in input's dtype,
    None where not wanted, from attention_backward(grad_output, value, locations, weights, cfg.msda, want_value,
    want_locations, want_weights) → (grad_value, grad_locations, grad_weights)."""
    value, locations, weights = _operands(xp, input, pairs, mask, cfg)
    grad_output = grad_output.reshape(cfg.N, cfg.Ho * cfg.Wo, cfg.G * cfg.Cg).astype(value.dtype, copy=False)
    # with softmax the locations' gradient is the packed array's, logits included (the weights' on the way)
    want_packed = cfg.softmax and (want_offset or want_mask)
    grad_value, grad_locations, grad_weights = attention_backward(
        grad_output, value, locations, weights, cfg.msda, want_input, want_offset or want_packed,
        want_mask or want_packed)
    heads = (cfg.N, cfg.Ho, cfg.Wo, cfg.G)
    grad_pairs = grad_mask = None
    if grad_locations is not None:
        grad_locations = grad_locations.reshape(*heads, (3 if cfg.softmax else 2) * cfg.P)
        if want_offset:  # d(location)/d(offset) = offset_scale
            grad_pairs = (grad_locations[..., :2 * cfg.P] * cfg.offset_scale).reshape(*heads, cfg.P, 2)
        if cfg.softmax and want_mask:
            grad_mask = grad_locations[..., 2 * cfg.P:]
    if grad_weights is not None:
        grad_mask = grad_weights.reshape(*heads, cfg.P)
    grad_input = None if grad_value is None else grad_value.reshape(input.shape)
    return tuple(None if g is None else g.astype(input.dtype, copy=False) for g in (grad_input, grad_pairs, grad_mask))


def dcnv3(input: npt.NDArray[Any], offset: npt.NDArray[Any], mask: npt.NDArray[Any],
          cfg: DCNConfig) -> npt.NDArray[Any]:
    pairs = offset.reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, cfg.P, 2)
    out: npt.NDArray[Any] = forward(np, msda.forward, input, pairs, mask, cfg)  # NumPy arrays in, NumPy out
    return out


def dcnv3_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], offset: npt.NDArray[Any],
                   mask: npt.NDArray[Any], cfg: DCNConfig, wanted: tuple[bool, bool, bool]
                   ) -> tuple[Optional[npt.NDArray[Any]], ...]:
    pairs = offset.reshape(cfg.N, cfg.Ho, cfg.Wo, cfg.G, cfg.P, 2)
    grad_input, grad_pairs, grad_mask = backward(np, msda.backward, grad_output, input, pairs, mask, cfg,
                                                 *wanted)
    return (grad_input, None if grad_pairs is None else grad_pairs.reshape(offset.shape),
            None if grad_mask is None else grad_mask.reshape(mask.shape))


def dcnv4(input: npt.NDArray[Any], offset_mask: npt.NDArray[Any], cfg: DCNConfig) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = forward(np, msda.forward, input, *split(offset_mask, cfg), cfg)
    return out


def offset_mask_gradient(xp: ModuleType, grad_pairs: Optional[Imported], grad_mask: Optional[Imported],
                         offset_mask: Imported, cfg: DCNConfig) -> Imported:
    """The gradient of offset_mask (its padding's 0) from those of its pairs and modulation (None: 0)."""
    grad = xp.zeros(offset_mask.shape, offset_mask.dtype)
    pairs, mask = split(grad, cfg)
    if grad_pairs is not None:
        pairs[...] = grad_pairs
    if grad_mask is not None:
        mask[...] = grad_mask
    return grad


def dcnv4_backward(grad_output: npt.NDArray[Any], input: npt.NDArray[Any], offset_mask: npt.NDArray[Any],
                   cfg: DCNConfig, wanted: tuple[bool, bool]) -> tuple[Optional[npt.NDArray[Any]], ...]:
    want_input, want_offset_mask = wanted
    grad_input, grad_pairs, grad_mask = backward(np, msda.backward, grad_output, input,
                                                 *split(offset_mask, cfg), cfg, want_input, want_offset_mask,
                                                 want_offset_mask)
    return grad_input, (offset_mask_gradient(np, grad_pairs, grad_mask, offset_mask, cfg) if want_offset_mask
                        else None)
