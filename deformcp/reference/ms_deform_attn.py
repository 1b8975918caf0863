"""The NumPy path of multi-scale deformable attention (ms_deform_attn, flash_deform_attn): the float64 reference
of kernels/ms_deform_attn.cu. ``cfg`` is the op's checked configuration (deformcp.ops.ms_deform_attn).

The sparse bilinear formulation. value (N, S, M, D) is laid out as one block per image and head, its S pixels as
rows and then a row of zeros: X (N, M, S + 1, D). For one image and head, a chunk of queries' sampling points
form a sampling matrix with one row per query holding its points' bilinear corner weights times their attention
weights (one corner, weight 1, for nearest sampling) at their rows of the block — the levels side by side, a
corner outside its level at the zero row — so the forward is ``A @ X[n, m]`` and the value gradient
``A.T @ G``. The weights and locations get their gradients from each corner's value dotted with the output
gradient. Work goes by chunks of one image's queries (a loop over levels and heads inside, none over queries
or points), on the thread pool: forward chunks all at once, backward chunks one image at a time each, adding
to the image's value gradient in order, so every result is deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear


class _Plan(NamedTuple):
    """The corners of a chunk's points, (M, B, T, k) with k = 4 (bilinear) or 1 (nearest)."""

    rows: np.ndarray        # rows of the head's block of X (int64): S, the zero row, for corners outside
    weight: np.ndarray      # interpolation weights, 0 for corners outside
    dweight_dx: np.ndarray  # derivatives of the weights with respect to the normalised x and y (0 for nearest)
    dweight_dy: np.ndarray


@np.errstate(invalid="ignore", over="ignore")  # NaN and ±inf locations are valid input
def _plan(locations: np.ndarray, cfg) -> _Plan:
    """The plan of locations (M, B, T, 2)."""
    M, B = locations.shape[:2]
    k = 1 if cfg.method == "discrete" else 4
    shape = (M, B, cfg.T, k)
    rows = np.empty(shape, np.int64)
    weight, dweight_dx, dweight_dy = (np.zeros(shape, locations.dtype) for _ in range(3))
    t0 = 0
    for (H, W), start, P in zip(cfg.shapes, cfg.starts, cfg.points):
        x, y = locations[:, :, t0:t0 + P, 0], locations[:, :, t0:t0 + P, 1]
        level = slice(t0, t0 + P)
        if k == 1:
            finite = np.isfinite(x) & np.isfinite(y)
            column = np.clip(np.floor(np.where(finite, x, 0) * W + 0.5), 0, W - 1).astype(np.int64)
            row = np.clip(np.floor(np.where(finite, y, 0) * H + 0.5), 0, H - 1).astype(np.int64)
            rows[:, :, level, 0] = np.where(finite, start + row * W + column, cfg.S)
            weight[:, :, level, 0] = finite
        else:
            c = _bilinear.corners(y * H - 0.5, x * W - 0.5, H, W, closed_below=True)
            rows[:, :, level] = np.where(c.index == H * W, cfg.S, start + c.index)
            weight[:, :, level] = c.weight
            dweight_dx[:, :, level] = c.dweight_dx * W
            dweight_dy[:, :, level] = c.dweight_dy * H
        t0 += P
    return _Plan(rows, weight, dweight_dx, dweight_dy)


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
    """Softmax over the last axis (a non-finite logit gives NaN for its whole head)."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _pixels(value: np.ndarray, dtype) -> np.ndarray:
    """value (N, S, M, D) → X (N, M, S + 1, D): each image and head's pixels as rows, then a row of zeros."""
    N, S, M, D = value.shape
    X = np.empty((N, M, S + 1, D), dtype)
    X[:, :, S] = 0
    np.copyto(X[:, :, :S], value.transpose(0, 2, 1, 3))
    return X


def _query_ranges(cfg) -> list[tuple[int, int]]:
    """Ranges of one image's Lq queries, each about MSDA_CHUNK_BYTES of plan (four 8-byte values per corner)."""
    per_query = max(1, cfg.M * cfg.T * 4 * 32)  # T = 0 (no points): one range
    return _workspace.ranges(cfg.Lq, max(1, _workspace.MSDA_CHUNK_BYTES // per_query))


def _matrix(plan: _Plan, weights: np.ndarray, m: int, columns: int):
    """Head m's sampling matrix: rows the chunk's queries, columns the rows of the head's block of X."""
    _, B, T, k = plan.rows.shape
    values = plan.weight[m] * weights[m][..., None]
    return _bilinear.sampling_matrix(plan.rows[m].reshape(B, T * k), values.reshape(B, T * k), columns)


def _corner_dots(X, rows, G):
    """dots (B, T, k): row rows[b, t, c] of X (a head's block) dotted with G[b]. Gathered in blocks of about
    MSDA_GATHER_BYTES into one reused buffer, so that the corner values stay in cache."""
    B, T, k = rows.shape
    D = X.shape[1]
    rows = rows.reshape(B, T * k)
    dots = np.empty((B, T * k), X.dtype)
    step = max(1, _workspace.MSDA_GATHER_BYTES // max(1, T * k * D * X.itemsize))
    buffer = np.empty((min(step, B), T * k, D), X.dtype)
    for b0, b1 in _workspace.ranges(B, step):
        gathered = np.take(X, rows[b0:b1], axis=0, out=buffer[:b1 - b0], mode="clip")
        np.vecdot(gathered, G[b0:b1, None, :], out=dots[b0:b1])
    return dots.reshape(B, T, k)


def forward(value, locations, weights, cfg):
    """(N, Lq, M·D) from value and either locations (…, T, 2) and weights (…, T), or the packed array."""
    dtype = compute_dtype(value.dtype)
    X = _pixels(value, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
    out = np.empty((cfg.N, cfg.Lq, cfg.M, cfg.D), dtype)

    def work(n, q0, q1):
        plan = _plan(locations[n, q0:q1].transpose(1, 0, 2, 3), cfg)
        chunk_weights = weights[n, q0:q1].transpose(1, 0, 2)
        for m in range(cfg.M):
            out[n, q0:q1, m] = _matrix(plan, chunk_weights, m, cfg.S + 1) @ X[n, m]

    _bilinear.for_each_chunk(work, [(n, q0, q1) for n in range(cfg.N) for q0, q1 in _query_ranges(cfg)])
    return out.reshape(cfg.N, cfg.Lq, cfg.M * cfg.D).astype(value.dtype, copy=False)


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
    G = grad_output.astype(dtype, copy=False).reshape(N, cfg.Lq, M, D)
    grad_X = np.zeros((N, M, S + 1, D), dtype) if want_value else None
    grad_locations = np.zeros((N, cfg.Lq, M, T, 2), dtype) if want_locations else None
    grad_weights = np.zeros((N, cfg.Lq, M, T), dtype) if want_weights else None
    bilinear = cfg.method != "discrete"

    def image(n):
        for q0, q1 in _query_ranges(cfg):
            plan = _plan(locations[n, q0:q1].transpose(1, 0, 2, 3), cfg)
            chunk_weights = weights[n, q0:q1].transpose(1, 0, 2)
            for m in range(M):
                G_head = G[n, q0:q1, m]
                if want_value:  # chunk after chunk, in order: deterministic
                    grad_X[n, m] += _matrix(plan, chunk_weights, m, S + 1).T @ G_head
                if not (want_locations or want_weights):
                    continue
                dots = _corner_dots(X[n, m], plan.rows[m], G_head)
                if want_weights:
                    grad_weights[n, q0:q1, m] = np.vecdot(dots, plan.weight[m])
                if want_locations and bilinear:
                    grad_locations[n, q0:q1, m, :, 0] = np.vecdot(dots, plan.dweight_dx[m]) * chunk_weights[m]
                    grad_locations[n, q0:q1, m, :, 1] = np.vecdot(dots, plan.dweight_dy[m]) * chunk_weights[m]

    if want_value or want_locations or want_weights:
        _bilinear.for_each_chunk(image, [(n,) for n in range(N)])
    grad_value = None if grad_X is None else grad_X[:, :, :S].transpose(0, 2, 1, 3)
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
