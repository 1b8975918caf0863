"""The NumPy path of multi-scale deformable attention (ms_deform_attn, flash_deform_attn): the float64 reference
of kernels/ms_deform_attn.cu. ``cfg`` is the op's checked configuration (deformcp.ops.ms_deform_attn).

The sparse bilinear formulation. value (N, S, M, D) is laid out per image as one block per head, its S pixels as
rows and then a row of zeros: X (N, M·(S + 1), D). A chunk of one image's queries has one sampling matrix with a
row per (query, head), holding its points' bilinear corner weights times their attention weights (one corner,
weight 1, for nearest sampling) at their rows of the head's block — all levels at once, a corner outside its
level at the zero row — so the forward is ``A @ X[n]`` and the value gradient ``A.T @ G``. The weights and
locations get their gradients from each corner's value dotted with the output gradient. Chunks run on the
thread pool: in the forward all at once, in the backward one image at a time each, adding to the image's value
gradient in order, so every result is deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear


class _Plan(NamedTuple):
    """The corners of a chunk's points, (B, M, T, k) with k = 4 (bilinear) or 1 (nearest)."""

    rows: np.ndarray        # rows of the image's X (int64): the head's zero row for corners outside
    weight: np.ndarray      # interpolation weights, 0 for corners outside
    dweight_dx: np.ndarray  # derivatives of the weights with respect to the normalised x and y (0 for nearest)
    dweight_dy: np.ndarray


def _point_levels(cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, start) of each point's level, (T,) int64 each."""
    def per_point(values):
        return np.repeat(np.array(values, np.int64), cfg.points)

    return per_point([h for h, _ in cfg.shapes]), per_point([w for _, w in cfg.shapes]), per_point(cfg.starts)


@np.errstate(invalid="ignore", over="ignore")  # NaN and ±inf locations are valid input
def _plan(locations: np.ndarray, cfg, derivatives: bool) -> _Plan:
    """The plan of locations (B, M, T, 2), every level at once (the weights' derivatives None without
    ``derivatives``, or 0 for nearest sampling)."""
    M = locations.shape[1]
    H, W, start = _point_levels(cfg)
    Hf, Wf = H.astype(locations.dtype), W.astype(locations.dtype)  # scaling in the locations' dtype
    x, y = locations[..., 0], locations[..., 1]
    zero_row = cfg.S
    if cfg.method == "discrete":
        finite = np.isfinite(x) & np.isfinite(y)
        column = np.clip(np.floor(np.where(finite, x, 0) * Wf + 0.5), 0, W - 1).astype(np.int64)
        row = np.clip(np.floor(np.where(finite, y, 0) * Hf + 0.5), 0, H - 1).astype(np.int64)
        pixel = np.where(finite, start + row * W + column, zero_row)[..., None]
        weight = finite[..., None].astype(locations.dtype)
        dweight_dx = dweight_dy = np.zeros_like(weight) if derivatives else None
    else:
        c = _bilinear.corners(y * Hf - 0.5, x * Wf - 0.5, H, W, closed_below=True, derivatives=derivatives)
        pixel = np.where(c.index == (H * W)[:, None], zero_row, start[:, None] + c.index)
        weight, dweight_dx, dweight_dy = c.weight, c.dweight_dx, c.dweight_dy
        if derivatives:  # per pixel → per normalised coordinate
            dweight_dx, dweight_dy = dweight_dx * Wf[:, None], dweight_dy * Hf[:, None]
    head_block = (np.arange(M) * (cfg.S + 1))[:, None, None]
    return _Plan(pixel + head_block, weight, dweight_dx, dweight_dy)


def _split(locations, weights, cfg, dtype):
    """(locations (N, Lq, M, T, 2), weights or logits (N, Lq, M, T)) in dtype: flash_deform_attn's packed array
    split, the others reshaped."""
    heads = (cfg.N, cfg.Lq, cfg.M)
    if cfg.fused:
        packed = locations.reshape(*heads, 3 * cfg.T).astype(dtype, copy=False)
        return packed[..., :2 * cfg.T].reshape(*heads, cfg.T, 2), packed[..., 2 * cfg.T:]
    return (locations.reshape(*heads, cfg.T, 2).astype(dtype, copy=False),
            weights.reshape(*heads, cfg.T).astype(dtype, copy=False))


@np.errstate(invalid="ignore", over="ignore")
def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (a NaN or +inf logit gives NaN for its whole head, −inf weight 0)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _pixels(value: np.ndarray, dtype) -> np.ndarray:
    """value (N, S, M, D) → X (N, M·(S + 1), D): each image's heads' pixels as rows, each head's then a zero row."""
    N, S, M, D = value.shape
    X = np.empty((N, M, S + 1, D), dtype)
    X[:, :, S] = 0
    np.copyto(X[:, :, :S], value.transpose(0, 2, 1, 3))
    return X.reshape(N, M * (S + 1), D)


def _query_ranges(cfg) -> list[tuple[int, int]]:
    """Ranges of one image's Lq queries, each about MSDA_CHUNK_BYTES of plan (four 8-byte values per corner)."""
    per_query = max(1, cfg.M * cfg.T * 4 * 32)  # T = 0 (no points): one range
    return _workspace.ranges(cfg.Lq, max(1, _workspace.MSDA_CHUNK_BYTES // per_query))


def _matrix(plan: _Plan, weights: np.ndarray, columns: int):
    """The chunk's sampling matrix: a row per (query, head), columns the rows of the image's X."""
    B, M, T, k = plan.rows.shape
    values = plan.weight * weights[..., None]
    return _bilinear.sampling_matrix(plan.rows.reshape(B * M, T * k), values.reshape(B * M, T * k), columns)


def _corner_dots(X, rows, G):
    """dots (B, M, T, k): row rows[b, m, t, c] of X (an image's) dotted with G[b·M + m]. Gathered in blocks of
    about MSDA_GATHER_BYTES into one reused buffer, so that the corner values stay in cache."""
    shape = rows.shape
    heads, D = shape[0] * shape[1], X.shape[1]
    rows = rows.reshape(heads, -1)
    dots = np.empty(rows.shape, X.dtype)
    step = max(1, _workspace.MSDA_GATHER_BYTES // max(1, rows.shape[1] * D * X.itemsize))
    buffer = np.empty((min(step, heads), rows.shape[1], D), X.dtype)
    for h0, h1 in _workspace.ranges(heads, step):
        gathered = np.take(X, rows[h0:h1], axis=0, out=buffer[:h1 - h0], mode="clip")
        np.vecdot(gathered, G[h0:h1, None, :], out=dots[h0:h1])
    return dots.reshape(shape)


def forward(value, locations, weights, cfg):
    """(N, Lq, M·D) from value and either locations (…, T, 2) and weights (…, T), or the packed array."""
    dtype = compute_dtype(value.dtype)
    X = _pixels(value, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
    out = np.empty((cfg.N, cfg.Lq, cfg.M * cfg.D), dtype)

    def work(n, q0, q1):
        plan = _plan(locations[n, q0:q1], cfg, derivatives=False)
        out[n, q0:q1] = (_matrix(plan, weights[n, q0:q1], X.shape[1]) @ X[n]).reshape(q1 - q0, cfg.M * cfg.D)

    _bilinear.for_each_chunk(work, [(n, q0, q1) for n in range(cfg.N) for q0, q1 in _query_ranges(cfg)])
    return out.astype(value.dtype, copy=False)


def backward(grad_output, value, locations, weights, cfg, want_value, want_locations, want_weights):
    """(grad_value, grad_locations, grad_weights), None where not wanted; for flash_deform_attn grad_locations
    is the packed array's gradient (locations and logits) and grad_weights None."""
    N, S, M, D, T = cfg.N, cfg.S, cfg.M, cfg.D, cfg.T
    dtype = compute_dtype(value.dtype)
    X = _pixels(value, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
        want_weights = want_locations
    G = grad_output.astype(dtype, copy=False).reshape(N, cfg.Lq * M, D)
    grad_X = np.zeros(X.shape, dtype) if want_value else None
    grad_locations = np.zeros((N, cfg.Lq, M, T, 2), dtype) if want_locations else None
    grad_weights = np.zeros((N, cfg.Lq, M, T), dtype) if want_weights else None
    bilinear = cfg.method != "discrete"

    def image(n):
        for q0, q1 in _query_ranges(cfg):
            plan = _plan(locations[n, q0:q1], cfg, derivatives=want_locations and bilinear)
            chunk_weights = weights[n, q0:q1]
            G_chunk = G[n, q0 * M:q1 * M]
            if want_value:  # chunk after chunk, in order: deterministic
                grad_X[n] += _matrix(plan, chunk_weights, X.shape[1]).T @ G_chunk
            if not (want_locations or want_weights):
                continue
            dots = _corner_dots(X[n], plan.rows, G_chunk)
            if want_weights:
                grad_weights[n, q0:q1] = np.vecdot(dots, plan.weight)
            if want_locations and bilinear:
                grad_locations[n, q0:q1, ..., 0] = np.vecdot(dots, plan.dweight_dx) * chunk_weights
                grad_locations[n, q0:q1, ..., 1] = np.vecdot(dots, plan.dweight_dy) * chunk_weights

    if want_value or want_locations or want_weights:
        _bilinear.for_each_chunk(image, [(n,) for n in range(N)])
    grad_value = None if grad_X is None else grad_X.reshape(N, M, S + 1, D)[:, :, :S].transpose(0, 2, 1, 3)
    if cfg.fused and want_locations:
        # softmax backward: dL/dlogit = a ⊙ (g − Σ a·g)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(axis=-1, keepdims=True))
        grad_locations = np.concatenate([grad_locations.reshape(N, cfg.Lq, M, 2 * T), grad_logits], axis=-1)
        grad_weights = None
    return tuple(None if g is None else np.ascontiguousarray(g).astype(value.dtype, copy=False)
                 for g in (grad_value, grad_locations, grad_weights))


def ms_deform_attn(value, sampling_locations, attention_weights, cfg):
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) or (N, Lq, M, ΣP, 2), attention_weights
    shaped as the locations without their last axis → (N, Lq, M·D)."""
    return forward(value, sampling_locations, attention_weights, cfg)


def ms_deform_attn_backward(grad_output, value, sampling_locations, attention_weights, cfg, wanted):
    """(grad_value, grad_sampling_locations, grad_attention_weights), None where not wanted."""
    grad_value, grad_locations, grad_weights = backward(grad_output, value, sampling_locations, attention_weights,
                                                        cfg, *wanted)
    return (grad_value, None if grad_locations is None else grad_locations.reshape(sampling_locations.shape),
            None if grad_weights is None else grad_weights.reshape(attention_weights.shape))


def flash_deform_attn(value, sampling_loc_attn, cfg):
    """value (N, S, M, D), sampling_loc_attn (N, Lq, M, L·P·3) → (N, Lq, M·D)."""
    return forward(value, sampling_loc_attn, None, cfg)


def flash_deform_attn_backward(grad_output, value, sampling_loc_attn, cfg, wanted):
    """(grad_value, grad_sampling_loc_attn), None where not wanted."""
    want_value, want_packed = wanted
    grad_value, grad_packed, _ = backward(grad_output, value, sampling_loc_attn, None, cfg, want_value, want_packed,
                                          False)
    return grad_value, None if grad_packed is None else grad_packed.reshape(sampling_loc_attn.shape)
