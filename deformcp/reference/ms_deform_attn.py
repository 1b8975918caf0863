"""The NumPy path of multi-scale deformable attention (ms_deform_attn, flash_deform_attn): the float64 reference
of kernels/ms_deform_attn.cu. ``cfg`` is the op's checked configuration (deformcp.ops.ms_deform_attn).

The sparse bilinear formulation, reading value in place: one image's value (S, M, D) is the matrix V (S·M, D),
a row per (pixel, head). A chunk of one image's queries has one sampling matrix with a row per (query, head),
holding its points' bilinear corner weights times their attention weights (one corner, weight 1, for nearest
sampling) at the corners' rows of V — all levels at once; a corner outside its level is clamped into it with
weight 0 — so the forward is ``A @ V`` (A converted to CSC first: the product then reads V's rows in order,
about twice as fast once V is out of L2) and the value gradient ``A.T @ G``. Weights and locations get their
gradients from each corner's value dotted with the output gradient. Chunks run on the thread pool: in the
forward all at once, in the backward one image at a time each, adding to the image's value gradient in order,
so every result is deterministic.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear

if TYPE_CHECKING:
    from ..ops.ms_deform_attn import MSDeformAttnConfig


class _Plan(NamedTuple):
    """The corners of a chunk's points (B queries, M heads, T points). Corner (i, j) is row y_i and column x_j
    of the point's level, (i, j) = (0, 0), (0, 1), (1, 0), (1, 1) for bilinear sampling, (0, 0) alone for
    nearest; its weight is wy[i] · wx[j]."""

    rows: npt.NDArray[np.integer[Any]]  # (B, M, corners, T): each corner's row of V (clamped into the level)
    wy: npt.NDArray[Any]  # (2 or 1, B, M, T): weight of the point's row y_i (0 outside, or not sampled)
    wx: npt.NDArray[Any]  # (2 or 1, B, M, T): weight of the point's column x_j
    # (B, M, T) bool each: whether row y_i is read (inside the level, the point sampled)
    in_y: tuple[npt.NDArray[np.bool_], ...]
    in_x: tuple[npt.NDArray[np.bool_], ...]  # (B, M, T) bool each: whether column x_j is inside the level


def _point_levels(cfg: MSDeformAttnConfig
                  ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(H, W, start) of each point's level, (T,) int64 each."""
    def per_point(values: Sequence[int]) -> npt.NDArray[np.int64]:
        return np.repeat(np.array(values, np.int64), cfg.points)

    return per_point([h for h, _ in cfg.shapes]), per_point([w for _, w in cfg.shapes]), per_point(cfg.starts)


@np.errstate(invalid="ignore", over="ignore")  # NaN and ±inf locations are valid input
def _plan(locations: npt.NDArray[Any], cfg: MSDeformAttnConfig) -> _Plan:
    """The plan of locations (B, M, T, 2), every level at once."""
    B, M, T = locations.shape[:3]
    H, W, start = _point_levels(cfg)
    index = np.int32 if cfg.S * M < 2**31 else np.int64
    H, W, start = H.astype(index), W.astype(index), start.astype(index)
    Hf, Wf = H.astype(locations.dtype), W.astype(locations.dtype)  # scaling in the locations' dtype
    head = np.arange(M, dtype=index)[:, None]
    x, y = locations[..., 0], locations[..., 1]
    if cfg.method == "discrete":  # nearest pixel, clamped per axis; a non-finite location reads nothing
        finite = np.isfinite(x) & np.isfinite(y)
        column = np.clip(np.floor(np.where(finite, x, 0) * Wf + 0.5), 0, W - 1).astype(index)
        row = np.clip(np.floor(np.where(finite, y, 0) * Hf + 0.5), 0, H - 1).astype(index)
        rows = ((start + row * W + column) * M + head)[:, :, None]
        weight = finite[None].astype(locations.dtype)
        return _Plan(rows, weight, np.ones_like(weight), (finite,), (finite,))
    if cfg.method == "pixel":  # DCNv3, DCNv4: pixel coordinates as given, sampled where -1 < y < H, -1 < x < W
        sampled = (y > -1) & (x > -1) & (y < H) & (x < W)
    else:  # pixel coordinates; sampled where -1 <= y < H and -1 <= x < W (at exactly -1: torch's grid_sample)
        y, x = y * Hf - 0.5, x * Wf - 0.5
        sampled = (y >= -1) & (x >= -1) & (y < H) & (x < W)
    y, x = np.where(sampled, y, 0), np.where(sampled, x, 0)
    fy, fx = np.floor(y), np.floor(x)
    ly, lx = y - fy, x - fx
    y0, x0 = fy.astype(index), fx.astype(index)
    in_y = (sampled & (y0 >= 0), sampled & (y0 < H - 1))  # rows y0 and y0 + 1 inside the level
    in_x = (x0 >= 0, x0 < W - 1)
    wy, wx = np.empty((2, B, M, T), ly.dtype), np.empty((2, B, M, T), lx.dtype)
    for w, fraction, inside in ((wy, ly, in_y), (wx, lx, in_x)):
        np.multiply(1 - fraction, inside[0], out=w[0])
        np.multiply(fraction, inside[1], out=w[1])
    row_start = [(start + np.maximum(y0, 0) * W) * M + head, (start + np.minimum(y0 + 1, H - 1) * W) * M + head]
    column = [np.maximum(x0, 0) * M, np.minimum(x0 + 1, W - 1) * M]
    rows = np.empty((B, M, 4, T), index)
    for c in range(4):
        np.add(row_start[c // 2], column[c % 2], out=rows[:, :, c])
    return _Plan(rows, wy, wx, in_y, in_x)


def _split(locations: npt.NDArray[Any], weights: Optional[npt.NDArray[Any]], cfg: MSDeformAttnConfig,
           dtype: np.dtype[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(locations (N, Lq, M, T, 2), weights or logits (N, Lq, M, T)) in dtype: flash_deform_attn's packed array
    split, the others reshaped."""
    heads = (cfg.N, cfg.Lq, cfg.M)
    if cfg.fused:
        packed = locations.reshape(*heads, 3 * cfg.T).astype(dtype, copy=False)
        return packed[..., :2 * cfg.T].reshape(*heads, cfg.T, 2), packed[..., 2 * cfg.T:]
    assert weights is not None  # separate arrays (ms_deform_attn): only the packed one comes without weights
    return (locations.reshape(*heads, cfg.T, 2).astype(dtype, copy=False),
            weights.reshape(*heads, cfg.T).astype(dtype, copy=False))


@np.errstate(invalid="ignore", over="ignore")
def _softmax(logits: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Softmax over the last axis (a NaN or +inf logit gives NaN for its whole head, −inf weight 0)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    softmax: npt.NDArray[Any] = shifted / shifted.sum(axis=-1, keepdims=True)
    return softmax


def _query_ranges(cfg: MSDeformAttnConfig, chunk_bytes: int) -> list[tuple[int, int]]:
    """Ranges of one image's Lq queries, each about chunk_bytes of plan (about 32 bytes a corner)."""
    per_query = max(1, cfg.M * cfg.T * 4 * 32)  # T = 0 (no points): one range
    return _workspace.ranges(cfg.Lq, max(1, chunk_bytes // per_query))


def _matrix(plan: _Plan, weights: npt.NDArray[Any], rows: npt.NDArray[np.integer[Any]],
            n_columns: int) -> scipy.sparse.csr_matrix:
    """The chunk's sampling matrix (weights (B, M, T): the attention weights): a row per (query, head), its corners'
    weights at the columns ``rows`` (B, M, k, T): the plan's, or those with the corners not read moved to a column
    of their own (:func:`_read`)."""
    B, M, k, T = rows.shape
    values = np.empty(rows.shape, weights.dtype)
    weighted_wy = plan.wy * weights
    for c in range(k):
        np.multiply(weighted_wy[c // 2], plan.wx[c % 2], out=values[:, :, c])
    return _bilinear.sampling_matrix(rows.reshape(B * M, k * T), values.reshape(B * M, k * T), n_columns)


def _read(plan: _Plan) -> npt.NDArray[np.bool_]:
    """(B, M, k, T) bool: whether each corner is read (inside its level, its point sampled)."""
    inside: npt.NDArray[np.bool_] = np.empty(plan.rows.shape, bool)
    for c in range(inside.shape[2]):
        np.logical_and(plan.in_y[c // 2], plan.in_x[c % 2], out=inside[:, :, c])
    return inside


def _corner_dots(V: npt.NDArray[Any], rows: npt.NDArray[np.integer[Any]], G: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """dots (B, M, k, T): row rows[b, m, c, t] of V (an image's) dotted with G[b·M + m]. Gathered in blocks of
    about MSDA_GATHER_BYTES into one reused buffer, so that the corner values stay in cache."""
    shape = rows.shape
    heads, D = shape[0] * shape[1], V.shape[1]
    rows = rows.reshape(heads, -1)
    dots = np.empty((*rows.shape, 1), V.dtype)
    step = max(1, _workspace.MSDA_GATHER_BYTES // max(1, rows.shape[1] * D * V.itemsize))
    buffer = np.empty((min(step, heads), rows.shape[1], D), V.dtype)
    for h0, h1 in _workspace.ranges(heads, step):
        gathered = np.take(V, rows[h0:h1], axis=0, out=buffer[:h1 - h0], mode="clip")
        np.matmul(gathered, G[h0:h1, :, None], out=dots[h0:h1])
    return dots.reshape(shape)


def _images(value: npt.NDArray[Any], cfg: MSDeformAttnConfig, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """value (N, S, M, D) as N matrices V (S·M, D) in dtype (a view where it already is one)."""
    return np.ascontiguousarray(value, dtype).reshape(cfg.N, cfg.S * cfg.M, cfg.D)


def forward(value: npt.NDArray[Any], locations: npt.NDArray[Any], weights: Optional[npt.NDArray[Any]],
            cfg: MSDeformAttnConfig) -> npt.NDArray[Any]:
    """(N, Lq, M·D) from value and either locations (…, T, 2) and weights (…, T), or the packed array."""
    dtype = compute_dtype(value.dtype)
    V = _images(value, cfg, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
    out = np.empty((cfg.N, cfg.Lq, cfg.M * cfg.D), dtype)

    def work(n: int, q0: int, q1: int) -> None:
        plan = _plan(locations[n, q0:q1], cfg)
        a = weights[n, q0:q1]
        chunk = (_matrix(plan, a, plan.rows, V.shape[1]).tocsc() @ V[n]).reshape(q1 - q0, cfg.M, cfg.D)
        if not np.isfinite(chunk).all():
            # perhaps a NaN or inf in V met with weight 0 at a corner that is not read: read a zero row there instead,
            # but in heads with a non-finite attention weight, which are not finite either way (weight · 0 is NaN)
            V_read = np.concatenate([V[n], np.zeros((1, cfg.D), dtype)])
            A = _matrix(plan, a, np.where(_read(plan), plan.rows, V.shape[1]), len(V_read))
            exact = (A @ V_read).reshape(chunk.shape)
            chunk = np.where(np.isfinite(a).all(axis=-1)[..., None], exact, chunk)
        out[n, q0:q1] = chunk.reshape(q1 - q0, cfg.M * cfg.D)

    chunks = [(n, q0, q1) for n in range(cfg.N) for q0, q1 in _query_ranges(cfg, _workspace.MSDA_CHUNK_BYTES)]
    _bilinear.for_each_chunk(work, chunks)
    return out.astype(value.dtype, copy=False)


def backward(grad_output: npt.NDArray[Any], value: npt.NDArray[Any], locations: npt.NDArray[Any],
             weights: Optional[npt.NDArray[Any]], cfg: MSDeformAttnConfig, want_value: bool, want_locations: bool,
             want_weights: bool) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """(grad_value, grad_locations, grad_weights), None where not wanted; for flash_deform_attn grad_locations
    is the packed array's gradient (locations and logits) and grad_weights None."""
    N, M, D, T = cfg.N, cfg.M, cfg.D, cfg.T
    dtype = compute_dtype(value.dtype)
    V = _images(value, cfg, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
        want_weights = want_locations
    G = grad_output.astype(dtype, copy=False).reshape(N, cfg.Lq * M, D)
    grad_V = np.zeros(V.shape, dtype) if want_value else None
    # flash_deform_attn: the packed array's gradient, its locations' part written in place
    grad_packed = np.zeros((N, cfg.Lq, M, 3 * T), dtype) if cfg.fused and want_locations else None
    grad_locations = (None if not want_locations else np.zeros((N, cfg.Lq, M, T, 2), dtype) if grad_packed is None
                      else grad_packed[..., :2 * T].reshape(N, cfg.Lq, M, T, 2))
    grad_weights = np.zeros((N, cfg.Lq, M, T), dtype) if want_weights else None
    bilinear = cfg.method != "discrete"
    H, W, _ = _point_levels(cfg)
    # pixels per unit of the normalised y and x (1 where the locations are in pixels)
    Hf, Wf = (np.ones_like(H, dtype), np.ones_like(W, dtype)) if cfg.method == "pixel" else (H.astype(dtype),
                                                                                          W.astype(dtype))

    def image(n: int) -> None:
        for q0, q1 in _query_ranges(cfg, _workspace.MSDA_BACKWARD_CHUNK_BYTES):
            plan = _plan(locations[n, q0:q1], cfg)
            a = weights[n, q0:q1]
            G_chunk = G[n, q0 * M:q1 * M]
            read = _read(plan)
            # chunk after chunk, in order: deterministic; corners not read add to a column dropped
            if grad_V is not None:
                A = _matrix(plan, a, np.where(read, plan.rows, V.shape[1]), V.shape[1] + 1)
                grad_V[n] += (A.T @ G_chunk)[:-1]
            if not (want_locations or want_weights):
                continue
            # (B, M, k, T): corner (i, j) at k = 2·i + j, 0 where it is not read
            v = np.where(read, _corner_dots(V[n], plan.rows, G_chunk), 0)
            if not bilinear:  # nearest: the location gradient is 0
                if grad_weights is not None:
                    grad_weights[n, q0:q1] = plan.wy[0] * v[:, :, 0]
                continue
            (wy0, wy1), (wx0, wx1), (v00, v01, v10, v11) = plan.wy, plan.wx, v.transpose(2, 0, 1, 3)
            if grad_weights is not None:
                grad_weights[n, q0:q1] = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
            # a corner's weight changes by ±(the other axis' weight) a pixel; 0 where not read
            if grad_locations is not None:
                grad_locations[n, q0:q1, ..., 0] = (wy0 * (v01 - v00) + wy1 * (v11 - v10)) * a * Wf
                grad_locations[n, q0:q1, ..., 1] = (wx0 * (v10 - v00) + wx1 * (v11 - v01)) * a * Hf

    if want_value or want_locations or want_weights:
        _bilinear.for_each_chunk(image, [(n,) for n in range(N)])
    grad_value = None if grad_V is None else grad_V.reshape(value.shape)
    if grad_packed is not None:  # flash_deform_attn's, wanted
        assert grad_weights is not None  # wanted with the locations'
        # softmax backward: dL/dlogit = a ⊙ (g − Σ a·g)
        grad_packed[..., 2 * T:] = weights * (grad_weights - (weights * grad_weights).sum(axis=-1, keepdims=True))
        grad_locations, grad_weights = grad_packed, None
    return tuple(None if g is None else np.ascontiguousarray(g).astype(value.dtype, copy=False)
                 for g in (grad_value, grad_locations, grad_weights))


def ms_deform_attn(value: npt.NDArray[Any], sampling_locations: npt.NDArray[Any], attention_weights: npt.NDArray[Any],
                   cfg: MSDeformAttnConfig) -> npt.NDArray[Any]:
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) or (N, Lq, M, ΣP, 2), attention_weights
    shaped as the locations without their last axis → (N, Lq, M·D)."""
    return forward(value, sampling_locations, attention_weights, cfg)


def ms_deform_attn_backward(grad_output: npt.NDArray[Any], value: npt.NDArray[Any],
                            sampling_locations: npt.NDArray[Any], attention_weights: npt.NDArray[Any],
                            cfg: MSDeformAttnConfig, wanted: tuple[bool, bool, bool]
                            ) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """(grad_value, grad_sampling_locations, grad_attention_weights), None where not wanted."""
    grad_value, grad_locations, grad_weights = backward(grad_output, value, sampling_locations, attention_weights,
                                                        cfg, *wanted)
    return (grad_value, None if grad_locations is None else grad_locations.reshape(sampling_locations.shape),
            None if grad_weights is None else grad_weights.reshape(attention_weights.shape))


def flash_deform_attn(value: npt.NDArray[Any], sampling_loc_attn: npt.NDArray[Any],
                      cfg: MSDeformAttnConfig) -> npt.NDArray[Any]:
    """value (N, S, M, D), sampling_loc_attn (N, Lq, M, L·P·3) → (N, Lq, M·D)."""
    return forward(value, sampling_loc_attn, None, cfg)


def flash_deform_attn_backward(grad_output: npt.NDArray[Any], value: npt.NDArray[Any],
                               sampling_loc_attn: npt.NDArray[Any], cfg: MSDeformAttnConfig,
                               wanted: tuple[bool, bool]) -> tuple[Optional[npt.NDArray[Any]], ...]:
    """(grad_value, grad_sampling_loc_attn), None where not wanted."""
    want_value, want_packed = wanted
    grad_value, grad_packed, _ = backward(grad_output, value, sampling_loc_attn, None, cfg, want_value, want_packed,
                                          False)
    return grad_value, None if grad_packed is None else grad_packed.reshape(sampling_loc_attn.shape)
