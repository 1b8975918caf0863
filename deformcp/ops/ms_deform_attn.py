"""Multi-scale deformable attention: Deformable DETR's core op, its per-level point counts and nearest sampling
(RT-DETRv2, D-FINE), and DCNv4's FlashDeformAttn with the softmax fused in, forward and backward.

Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021,
https://arxiv.org/abs/2010.04159 (eq. 3); Lv et al., "RT-DETRv2", https://arxiv.org/abs/2407.17140; Xiong et
al., "Efficient Deformable ConvNets" (DCNv4), CVPR 2024, https://arxiv.org/abs/2401.06197.

Per query q and head m, ``out[q, m] = Σ_l Σ_p A[q, m, l, p] · V_l,m(x·W_l − 0.5, y·H_l − 0.5)``: V_l,m is level l
of head m of value, sampled bilinearly in pixel coordinates with zeros outside (exactly
``grid_sample(align_corners=False, padding_mode="zeros")`` on ``2·loc − 1``). Kernels: kernels/ms_deform_attn.cu.
NumPy path: deformcp.reference.ms_deform_attn.
"""
from __future__ import annotations

import itertools
from types import ModuleType
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from .. import _dispatch, _kernels, _validate
from .._types import Array, ArrayLike, Imported
from ..reference import ms_deform_attn as reference
from ._call import backward, forward
from ._spec import Case, IntSequence, LevelShapes, OpSpec

FAMILY = "ms_deform_attn"
METHODS = ("default", "discrete")
#: The kernels' sampling methods: the public ones, then "pixel" (DCNv3 and DCNv4: locations in pixels, zeros
#: outside the open (−1, H) × (−1, W); set by deformcp.ops.dcn, not an option of ms_deform_attn).
KERNEL_METHODS = (*METHODS, "pixel")


class MSDeformAttnGrads(NamedTuple):
    """Gradients of :func:`ms_deform_attn`; a field is None where it was not asked for."""

    value: Optional[Array]
    sampling_locations: Optional[Array]
    attention_weights: Optional[Array]


class FlashDeformAttnGrads(NamedTuple):
    """Gradients of :func:`flash_deform_attn`; a field is None where it was not asked for."""

    value: Optional[Array]
    sampling_loc_attn: Optional[Array]


class MSDeformAttnConfig(NamedTuple):
    """A checked call. The points of one (query, head) are T = ΣP_l, level-major; ``fused``: flash_deform_attn's
    packing (per head 2·T location values, then T logits soft-maxed in the op)."""

    N: int
    S: int
    M: int
    D: int
    Lq: int
    shapes: tuple[tuple[int, int], ...]  # (H_l, W_l) per level
    starts: tuple[int, ...]              # first row of each level in value's S axis
    points: tuple[int, ...]              # P_l per level
    method: str
    fused: bool

    @property
    def T(self) -> int:
        return sum(self.points)

    @property
    def strides(self) -> tuple[int, int, int]:
        """(location stride, weight stride, weight offset) of one (query, head) in the location and weight
        arrays: (2T, T, 0) for separate arrays, (3T, 3T, 2T) for flash_deform_attn's packed one."""
        T = self.T
        return (3 * T, 3 * T, 2 * T) if self.fused else (2 * T, T, 0)


# ---------------------------------------------------------------------------------------------- checks

def _levels(call: _dispatch.Call, value: Imported, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence]
            ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(shapes, starts) of the levels, checked against value (N, S, M, D): S = ΣH_l·W_l."""
    shapes = _validate.host_integers("spatial_shapes", spatial_shapes, call)
    if (not isinstance(shapes, tuple) or not shapes
            or any(not isinstance(row, tuple) or len(row) != 2 or any(isinstance(size, tuple) for size in row)
                   for row in shapes)):
        raise ValueError(f"spatial_shapes: expected L ≥ 1 rows (H_l, W_l), an (L, 2) array or a sequence of "
                         f"pairs, got {shapes!r}")
    if any(size < 1 or size > _validate.INT_MAX for row in shapes for size in row):
        raise ValueError(f"spatial_shapes: expected positive sizes (H_l, W_l) of at most {_validate.INT_MAX}, "
                         f"got {shapes}")
    # Python ints: an int64 running sum of sizes up to (2**31 - 1)**2 would wrap around
    starts = tuple(itertools.accumulate((h * w for h, w in shapes[:-1]), initial=0))
    total = starts[-1] + shapes[-1][0] * shapes[-1][1]
    if value.shape[1] != total:
        raise ValueError(f"value: expected S = ΣH_l·W_l = {total} rows (spatial_shapes {shapes}) in (N, S, M, D), "
                         f"got shape {tuple(value.shape)}")
    if level_start_index is not None:
        given = _validate.host_integers("level_start_index", level_start_index, call)
        if given != starts:
            raise ValueError(f"level_start_index: expected {starts} (the cumulative H_l·W_l of spatial_shapes "
                             f"{shapes}), got {given!r}")
    return shapes, starts


def _value(value: Imported) -> None:
    _validate.floating("value", value, 4, "(N, S, M, D)")
    if value.shape[2] == 0 or value.shape[3] == 0:
        raise ValueError(f"value: expected M ≥ 1 heads and D ≥ 1 channels in (N, S, M, D), "
                         f"got shape {tuple(value.shape)}")


def _batch_and_heads(name: str, x: Imported, value: Imported, layout: str) -> None:
    for axis, what in ((0, "batch size N"), (2, "number of heads M")):
        if x.shape[axis] != value.shape[axis]:
            raise ValueError(f"{name}: expected {what} = {value.shape[axis]} (value's) in {layout}, "
                             f"got shape {tuple(x.shape)}")


def _check_ms_deform_attn(call: _dispatch.Call, value: Imported, sampling_locations: Imported,
                          attention_weights: Imported, spatial_shapes: LevelShapes,
                          level_start_index: Optional[IntSequence], points_per_level: Optional[IntSequence],
                          method: str) -> MSDeformAttnConfig:
    _value(value)
    shapes, starts = _levels(call, value, spatial_shapes, level_start_index)
    L = len(shapes)
    if points_per_level is None:
        loc_layout, weight_layout = "(N, Lq, M, L, P, 2)", "(N, Lq, M, L, P)"
        _validate.floating("sampling_locations", sampling_locations, 6, loc_layout)
        _validate.floating("attention_weights", attention_weights, 5, weight_layout)
        if sampling_locations.shape[3] != L:
            raise ValueError(f"sampling_locations: expected L = {L} levels (spatial_shapes') in {loc_layout}, "
                             f"got shape {tuple(sampling_locations.shape)}")
        points = (sampling_locations.shape[4],) * L
    else:
        loc_layout, weight_layout = "(N, Lq, M, ΣP_l, 2)", "(N, Lq, M, ΣP_l)"
        points = _validate.sizes("points_per_level", points_per_level, L)
        _validate.floating("sampling_locations", sampling_locations, 5, loc_layout)
        _validate.floating("attention_weights", attention_weights, 4, weight_layout)
        if sampling_locations.shape[3] != sum(points):
            raise ValueError(f"points_per_level: expected the points of sampling_locations {loc_layout}, "
                             f"ΣP_l = {sampling_locations.shape[3]}, got {points} (sum {sum(points)})")
    if sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations: expected the last axis to hold (x, y), size 2, in {loc_layout}, "
                         f"got shape {tuple(sampling_locations.shape)}")
    _batch_and_heads("sampling_locations", sampling_locations, value, loc_layout)
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(f"attention_weights: expected shape {tuple(sampling_locations.shape[:-1])} "
                         f"(sampling_locations' without its last axis) for {weight_layout}, "
                         f"got {tuple(attention_weights.shape)}")
    _validate.same_dtype(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    _validate.choice("method", method, METHODS)
    return _config(value, sampling_locations, shapes, starts, points, method, fused=False)


def _check_flash_deform_attn(call: _dispatch.Call, value: Imported, sampling_loc_attn: Imported,
                             spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                             num_points: int) -> MSDeformAttnConfig:
    _value(value)
    shapes, starts = _levels(call, value, spatial_shapes, level_start_index)
    P = _validate.integer("num_points", num_points, minimum=1)
    layout = "(N, Lq, M, L·P·3)"
    _validate.floating("sampling_loc_attn", sampling_loc_attn, 4, layout)
    if sampling_loc_attn.shape[3] != 3 * len(shapes) * P:
        raise ValueError(f"sampling_loc_attn: expected L·P·3 = {3 * len(shapes) * P} values per head (L = "
                         f"{len(shapes)} levels, P = {P} points) in {layout}, got shape "
                         f"{tuple(sampling_loc_attn.shape)}")
    _batch_and_heads("sampling_loc_attn", sampling_loc_attn, value, layout)
    _validate.same_dtype(value=value, sampling_loc_attn=sampling_loc_attn)
    return _config(value, sampling_loc_attn, shapes, starts, (P,) * len(shapes), "default", fused=True)


def _config(value: Imported, locations: Imported, shapes: tuple[tuple[int, int], ...], starts: tuple[int, ...],
            points: Sequence[int], method: str, fused: bool) -> MSDeformAttnConfig:
    N, S, M, D = value.shape
    Lq = locations.shape[1]
    _validate.output_fits("sampling_locations", (N, Lq, M * D), value.dtype)
    return MSDeformAttnConfig(N, S, M, D, Lq, shapes, starts, tuple(points), method, fused)


def _output(cfg: MSDeformAttnConfig) -> tuple[tuple[int, ...], str]:
    return (cfg.N, cfg.Lq, cfg.M * cfg.D), "(N, Lq, M·D)"


# ------------------------------------------------------------------------------------------ kernel glue

def _launch_arguments(xp: ModuleType, cfg: MSDeformAttnConfig) -> tuple[Imported, tuple[int, ...], tuple[int, bool]]:
    """(level table, sizes, options) of every kernel of the family. The table has one row (H_l, W_l, start_l,
    P_l) per level, int64, on the arrays' device."""
    table = xp.asarray(np.array([(h, w, s, p) for (h, w), s, p in zip(cfg.shapes, cfg.starts, cfg.points)],
                                np.int64))
    sizes = (cfg.N, cfg.S, cfg.M, cfg.D, cfg.Lq, len(cfg.shapes), cfg.T, *cfg.strides)
    return table, sizes, (KERNEL_METHODS.index(cfg.method), cfg.fused)


def _forward_kernels(call: _dispatch.Call, value: Imported, locations: Imported, weights: Optional[Imported],
                     cfg: MSDeformAttnConfig) -> Imported:
    xp = call.xp
    value, locations = xp.ascontiguousarray(value), xp.ascontiguousarray(locations)
    weights = locations if cfg.fused else xp.ascontiguousarray(weights)
    out = _kernels.empty(xp, _output(cfg)[0], value.dtype)
    table, sizes, options = _launch_arguments(xp, cfg)
    _kernels.launch(call.backend, FAMILY, "ms_deform_attn_forward", value.dtype, cfg.N * cfg.Lq * cfg.M * cfg.D,
                    (value, table, locations, weights, out), sizes, options)
    return out


def _backward_kernels(call: _dispatch.Call, grad_output: Imported, value: Imported, locations: Imported,
                      weights: Optional[Imported], cfg: MSDeformAttnConfig, want_value: bool, want_locations: bool,
                      want_weights: bool, deterministic: bool
                      ) -> tuple[Optional[Imported], Optional[Imported], Optional[Imported]]:
    """(grad_value, grad_locations, grad_weights) — for flash_deform_attn grad_locations is the gradient of the
    packed array, logits included, and grad_weights None."""
    xp = call.xp
    acc = _kernels.compute_dtype(value.dtype)
    grad_output, value, locations = (xp.ascontiguousarray(a) for a in (grad_output, value, locations))
    weights = locations if cfg.fused else xp.ascontiguousarray(weights)
    table, sizes, options = _launch_arguments(xp, cfg)
    heads = cfg.N * cfg.Lq * cfg.M

    def launch(name: str, n: int, *arrays: object) -> None:
        _kernels.launch(call.backend, FAMILY, name, value.dtype, n, (*arrays,), sizes, options)

    def pointer(a: Optional[Imported]) -> object:
        return _kernels.NULL if a is None else a

    grad_value = xp.zeros(value.shape, acc) if want_value else None
    grad_locations = _kernels.empty(xp, locations.shape, value.dtype) if want_locations else None
    grad_weights = _kernels.empty(xp, (cfg.N, cfg.Lq, cfg.M, cfg.T), acc) if want_weights else None
    if grad_value is not None:
        if deterministic:
            launch("ms_deform_attn_backward_value_deterministic", cfg.N * cfg.M * cfg.D,
                   grad_output, table, locations, weights, grad_value)
        else:
            launch("ms_deform_attn_backward_value", heads * cfg.D, grad_output, table, locations, weights, grad_value)
    if grad_locations is not None or grad_weights is not None:
        launch("ms_deform_attn_backward_sampling", heads * cfg.T, grad_output, value, table, locations, weights,
               pointer(grad_locations), pointer(grad_weights))
    if cfg.fused and grad_locations is not None:
        launch("flash_deform_attn_backward_softmax", heads, table, locations, grad_weights, grad_locations)
        grad_weights = None
    cast = [None if g is None else g.astype(value.dtype, copy=False) for g in (grad_value, grad_weights)]
    return cast[0], grad_locations, cast[1]


def _ms_kernels_backward(call: _dispatch.Call, grad_output: Imported, value: Imported, sampling_locations: Imported,
                         attention_weights: Imported, cfg: MSDeformAttnConfig, wanted: tuple[bool, bool, bool],
                         deterministic: bool) -> tuple[Optional[Imported], Optional[Imported], Optional[Imported]]:
    grad_value, grad_locations, grad_weights = _backward_kernels(call, grad_output, value, sampling_locations,
                                                                 attention_weights, cfg, *wanted, deterministic)
    return grad_value, grad_locations, None if grad_weights is None else grad_weights.reshape(attention_weights.shape)


def _flash_kernels(call: _dispatch.Call, value: Imported, sampling_loc_attn: Imported,
                   cfg: MSDeformAttnConfig) -> Imported:
    return _forward_kernels(call, value, sampling_loc_attn, None, cfg)


def _flash_kernels_backward(call: _dispatch.Call, grad_output: Imported, value: Imported, sampling_loc_attn: Imported,
                            cfg: MSDeformAttnConfig, wanted: tuple[bool, bool],
                            deterministic: bool) -> tuple[Optional[Imported], Optional[Imported]]:
    want_value, want_packed = wanted
    grad_value, grad_packed, _ = _backward_kernels(call, grad_output, value, sampling_loc_attn, None, cfg,
                                                   want_value, want_packed, want_packed, deterministic)
    return grad_value, grad_packed


# --------------------------------------------------------------------------------------------- functions

def ms_deform_attn(value: ArrayLike, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                   sampling_locations: ArrayLike, attention_weights: ArrayLike,
                   points_per_level: Optional[IntSequence] = None, method: str = "default") -> Array:
    """Multi-scale deformable attention: ``out[n, q, m] = Σ_l Σ_p A[n, q, m, l, p] · V_l(x·W_l − 0.5,
    y·H_l − 0.5)[n, m]``, Deformable DETR's ``MSDeformAttnFunction``.

    Args:
        value (array[N, S, M, D]): the L levels' features, concatenated level-major along S, each level
            row-major (H_l, W_l), M heads of D channels.
        spatial_shapes (array[L, 2] of int, or sequence of L pairs): (H_l, W_l) per level; S = ΣH_l·W_l. An
            array is read on the host (from a GPU: one device→host copy); a Python sequence needs none.
        level_start_index (array[L] of int, sequence or None): the first row of each level in S, checked
            against spatial_shapes; None computes it.
        sampling_locations (array[N, Lq, M, L, P, 2]): normalised (x, y), [0, 1] spanning each level's image
            (its outer edges); or (N, Lq, M, ΣP_l, 2), level-major, with ``points_per_level``.
        attention_weights (array[N, Lq, M, L, P] or [N, Lq, M, ΣP_l]): used as given (no softmax).
        points_per_level (sequence of L int or None): P_l per level (RT-DETRv2, D-FINE). Default: None, the
            same P for every level.
        method (str): "default": bilinear at pixel (x·W_l − 0.5, y·H_l − 0.5) with zeros outside the level
            (corners outside read 0), exactly ``grid_sample(align_corners=False, padding_mode="zeros")`` on
            ``2·loc − 1``; "discrete": RT-DETRv2's nearest sampling, pixel ``(⌊x·W_l + 0.5⌋, ⌊y·H_l + 0.5⌋)``,
            each clamped to its own axis (0 ≤ column < W_l, 0 ≤ row < H_l). Default: "default".

    Returns:
        array[N, Lq, M·D], value's dtype and framework.

    A NaN or ±inf location samples 0 (and gets gradient 0); a non-finite attention weight makes its query and
    head's output non-finite (NaN or ±inf: which one may differ between backends). Any batch size (no
    ``im2col_step``). https://arxiv.org/abs/2010.04159 (eq. 3).

    >>> import numpy as np, deformcp
    >>> rng = np.random.default_rng(0)
    >>> shapes = [(32, 32), (16, 16)]
    >>> value = rng.random((2, 32 * 32 + 16 * 16, 8, 32))
    >>> locations = rng.random((2, 100, 8, 2, 4, 2))
    >>> weights = rng.random((2, 100, 8, 2, 4))
    >>> out = deformcp.ms_deform_attn(value, shapes, None, locations, weights)
    >>> out.shape
    (2, 100, 256)
    >>> ones = np.ones_like(value)                                   # constant value: out = Σ weights
    >>> bool(np.allclose(deformcp.ms_deform_attn(ones, shapes, None, 0.5 + 0 * locations, weights)[..., 0],
    ...                  weights.sum(axis=(3, 4))[..., 0]))
    True
    """
    return forward(MS_DEFORM_ATTN, locals())


def ms_deform_attn_backward(grad_output: ArrayLike, value: ArrayLike, spatial_shapes: LevelShapes,
                            level_start_index: Optional[IntSequence], sampling_locations: ArrayLike,
                            attention_weights: ArrayLike, points_per_level: Optional[IntSequence] = None,
                            method: str = "default", needs_input_grad: Sequence[bool] = (True, True, True),
                            deterministic: bool = False) -> MSDeformAttnGrads:
    """Gradients of :func:`ms_deform_attn` with respect to value, sampling_locations and attention_weights.

    Args:
        grad_output (array[N, Lq, M·D]): gradient of the loss with respect to the output.
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points_per_level, method:
            as given to :func:`ms_deform_attn`.
        needs_input_grad (triple of bool): which of (value, sampling_locations, attention_weights). Default: all.
        deterministic (bool): on the host and CUDA backends, False scatter-adds the value gradient with atomics;
            True gives each (image, head, channel) to one thread, which adds queries and points in order:
            bitwise identical run to run. The NumPy path is always deterministic. Default: False.

    Returns:
        MSDeformAttnGrads: ``value``, ``sampling_locations`` and ``attention_weights``, shaped as given, None
        where not asked for. The location gradient is 0 with method "discrete" and at non-finite locations; at
        an integer pixel coordinate the bilinear weights' derivative is taken from the right, as in grid_sample.
    """
    return MSDeformAttnGrads(*backward(MS_DEFORM_ATTN, locals()))


def flash_deform_attn(value: ArrayLike, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                      sampling_loc_attn: ArrayLike, num_points: int) -> Array:
    """DCNv4's FlashDeformAttn: :func:`ms_deform_attn` with locations and attention logits in one array, the
    softmax over each head's L·P points done inside the op.

    Args:
        value (array[N, S, M, D]), spatial_shapes, level_start_index: as :func:`ms_deform_attn`.
        sampling_loc_attn (array[N, Lq, M, L·P·3]): per head, L·P normalised (x, y) pairs, level-major then point,
            then the L·P attention logits in the same order.
        num_points (int): P, the points per level (any P ≥ 1, any L).

    Returns:
        array[N, Lq, M·D]. A NaN or +inf logit makes its head's output NaN; a −inf logit gets weight 0. https://arxiv.org/abs/2401.06197.
    """
    return forward(FLASH_DEFORM_ATTN, locals())


def flash_deform_attn_backward(grad_output: ArrayLike, value: ArrayLike, spatial_shapes: LevelShapes,
                               level_start_index: Optional[IntSequence], sampling_loc_attn: ArrayLike, num_points: int,
                               needs_input_grad: Sequence[bool] = (True, True),
                               deterministic: bool = False) -> FlashDeformAttnGrads:
    """Gradients of :func:`flash_deform_attn` with respect to value and sampling_loc_attn (locations and logits).

    Args:
        grad_output (array[N, Lq, M·D]); the other arguments as given to :func:`flash_deform_attn`.
        needs_input_grad (pair of bool): which of (value, sampling_loc_attn). Default: both.
        deterministic (bool): as :func:`ms_deform_attn_backward`.

    Returns:
        FlashDeformAttnGrads: ``value`` (array[N, S, M, D]) and ``sampling_loc_attn`` (array[N, Lq, M, L·P·3]),
        None where not asked for.
    """
    return FlashDeformAttnGrads(*backward(FLASH_DEFORM_ATTN, locals()))


# ------------------------------------------------------------------------------------------------- specs

#: Parity levels: non-square, a 1×1 level, and one taller than wide.
_SHAPES = ((5, 7), (1, 1), (4, 3))


def _case_value(rng: np.random.Generator, N: int = 2, M: int = 2, D: int = 3) -> npt.NDArray[np.float64]:
    return rng.standard_normal((N, sum(h * w for h, w in _SHAPES), M, D))


def _ms_inputs(points_per_level: Optional[tuple[int, ...]] = None
               ) -> Callable[[np.random.Generator], dict[str, npt.NDArray[np.float64]]]:
    def make(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
        N, Lq, M, L = 2, 4, 2, len(_SHAPES)
        points = (N, Lq, M, sum(points_per_level)) if points_per_level else (N, Lq, M, L, 2)
        return {"value": _case_value(rng, N, M), "sampling_locations": rng.uniform(-0.15, 1.15, points + (2,)),
                "attention_weights": rng.uniform(-1, 1, points)}
    return make


def _flash_inputs(rng: np.random.Generator) -> dict[str, npt.NDArray[np.float64]]:
    N, Lq, M, L, P = 2, 4, 2, len(_SHAPES), 2
    locations = rng.uniform(-0.15, 1.15, (N, Lq, M, 2 * L * P))
    logits = 2 * rng.standard_normal((N, Lq, M, L * P))
    return {"value": _case_value(rng, N, M), "sampling_loc_attn": np.concatenate([locations, logits], axis=-1)}


def _ms_case(label: str, points_per_level: Optional[tuple[int, ...]] = None, method: str = "default",
             level_start_index: Optional[tuple[int, ...]] = None) -> Case:
    return Case(label, _ms_inputs(points_per_level),
                {"spatial_shapes": _SHAPES, "level_start_index": level_start_index,
                 "points_per_level": points_per_level, "method": method})


MS_DEFORM_ATTN = OpSpec(
    name="ms_deform_attn", arrays=("value", "sampling_locations", "attention_weights"), grads=MSDeformAttnGrads,
    check=_check_ms_deform_attn, output=_output, reference=reference.ms_deform_attn,
    reference_backward=reference.ms_deform_attn_backward, kernels=_forward_kernels,
    kernels_backward=_ms_kernels_backward, function=ms_deform_attn, backward=ms_deform_attn_backward,
    batch=("value", "sampling_locations", "attention_weights"),
    cases=(_ms_case("default", level_start_index=(0, 35, 36)),
           _ms_case("points_per_level", points_per_level=(3, 1, 2)),
           _ms_case("discrete", method="discrete"),
           _ms_case("discrete-points_per_level", points_per_level=(1, 2, 3), method="discrete")))

FLASH_DEFORM_ATTN = OpSpec(
    name="flash_deform_attn", arrays=("value", "sampling_loc_attn"), grads=FlashDeformAttnGrads,
    check=_check_flash_deform_attn, output=_output, reference=reference.flash_deform_attn,
    reference_backward=reference.flash_deform_attn_backward, kernels=_flash_kernels,
    kernels_backward=_flash_kernels_backward, function=flash_deform_attn, backward=flash_deform_attn_backward,
    batch=("value", "sampling_loc_attn"),
    cases=(Case("P=2", _flash_inputs, {"spatial_shapes": _SHAPES, "level_start_index": None, "num_points": 2}),))

SPECS = (MS_DEFORM_ATTN, FLASH_DEFORM_ATTN)
