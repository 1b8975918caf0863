"""The NumPy path of multi-scale deformable attention (ms_deform_attn, flash_deform_attn): the float64 reference
of kernels/ms_deform_attn.cu. ``cfg`` is the op's checked configuration (deformcp.ops.ms_deform_attn).

The sparse bilinear formulation. value (N, S, M, D) is laid out per image and head, each followed by a zero row:
X (N·M·(S + 1), D). A query's sampling points become one sampling matrix row per head, holding its four corners'
bilinear weights times the point's attention weight (one corner, weight 1, for nearest sampling) at their rows of
X — the levels side by side in X's columns, a corner outside its level at the zero row — so the forward is
``S @ X`` and the value gradient ``S.T @ G``. The weights and locations get their gradients from each corner's
value dotted with the output gradient. Work is split into chunks of queries (a loop over levels inside, none
over queries or points), run on the thread pool; the value gradient adds the chunks' products in order, so every
result is deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _workspace
from .._kernels import compute_dtype
from . import _bilinear


class _Plan(NamedTuple):
    """The corners of a chunk's points, (B, M, T, k) with k = 4 (bilinear) or 1 (nearest)."""

    rows: np.ndarray        # rows of X (int64)
    weight: np.ndarray      # interpolation weights, 0 for corners outside
    dweight_dx: np.ndarray  # derivatives of the weights with respect to the normalised x and y (0 for nearest)
    dweight_dy: np.ndarray


@np.errstate(invalid="ignore", over="ignore")  # NaN and ±inf locations are valid input
def _plan(locations: np.ndarray, first_image: np.ndarray, cfg) -> _Plan:
    """The plan of locations (B, M, T, 2) whose queries belong to the images first_image (B,)."""
    B, M = locations.shape[:2]
    k = 1 if cfg.method == "discrete" else 4
    shape = (B, M, cfg.T, k)
    rows = np.empty(shape, np.int64)
    weight, dweight_dx, dweight_dy = (np.zeros(shape, locations.dtype) for _ in range(3))
    # X's row of pixel 0 of each (image, head): ((n·M + m)·(S + 1)); the zero row is S after it
    origin = ((first_image[:, None] * cfg.M + np.arange(M)) * (cfg.S + 1))[:, :, None, None]
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
    rows += origin
    return _Plan(rows, weight, dweight_dx, dweight_dy)


def _split(locations, weights, cfg, dtype):
    """(locations (N·Lq, M, T, 2), weights or logits (N·Lq, M, T)) in dtype: flash_deform_attn's packed array
    split, the others reshaped."""
    heads = (cfg.N * cfg.Lq, cfg.M)
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
    """value (N, S, M, D) → X (N·M·(S + 1), D): each image and head's pixels as rows, then a row of zeros."""
    N, S, M, D = value.shape
    X = np.empty((N, M, S + 1, D), dtype)
    X[:, :, S] = 0
    np.copyto(X[:, :, :S], value.transpose(0, 2, 1, 3))
    return X.reshape(N * M * (S + 1), D)


def _chunks(cfg, dtype, gather: bool) -> list[tuple[int, int]]:
    """Ranges of the N·Lq queries, each about MSDA_CHUNK_BYTES of plan (four 8-byte arrays per corner) and, with
    gather, of gathered corner values."""
    per_corner = 32 + (cfg.D * np.dtype(dtype).itemsize if gather else 0)
    per_query = cfg.M * cfg.T * 4 * per_corner
    return _workspace.ranges(cfg.N * cfg.Lq, max(1, _workspace.MSDA_CHUNK_BYTES // per_query))


def _first_image(a: int, b: int, cfg) -> np.ndarray:
    return np.arange(a, b) // cfg.Lq


def _matrix(plan: _Plan, weights: np.ndarray, cfg, column0: int, columns: int):
    """The chunk's sampling matrix: rows (query, head), columns [column0, column0 + columns) of X."""
    B, M, T, k = plan.rows.shape
    values = plan.weight * weights[..., None]
    return _bilinear.sampling_matrix((plan.rows - column0).reshape(B * M, T * k), values.reshape(B * M, T * k),
                                     columns)


def forward(value, locations, weights, cfg):
    """(N, Lq, M·D) from value and either locations (…, T, 2) and weights (…, T), or the packed array."""
    dtype = compute_dtype(value.dtype)
    X = _pixels(value, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    if cfg.fused:
        weights = _softmax(weights)
    out = np.empty((cfg.N * cfg.Lq * cfg.M, cfg.D), dtype)

    def work(a, b):
        plan = _plan(locations[a:b], _first_image(a, b, cfg), cfg)
        out[a * cfg.M:b * cfg.M] = _matrix(plan, weights[a:b], cfg, 0, X.shape[0]) @ X

    _bilinear.for_each_chunk(work, _chunks(cfg, dtype, gather=False))
    return out.reshape(cfg.N, cfg.Lq, cfg.M * cfg.D).astype(value.dtype, copy=False)


def backward(grad_output, value, locations, weights, cfg, want_value, want_locations, want_weights):
    """(grad_value, grad_locations, grad_weights), None where not wanted; for flash_deform_attn grad_locations
    is the packed array's gradient (locations and logits) and grad_weights None."""
    N, S, M, D, T = cfg.N, cfg.S, cfg.M, cfg.D, cfg.T
    dtype = compute_dtype(value.dtype)
    X = _pixels(value, dtype)
    locations, weights = _split(locations, weights, cfg, dtype)
    logits = weights if cfg.fused else None
    if cfg.fused:
        weights = _softmax(logits)
        want_weights = want_locations
    G = grad_output.astype(dtype, copy=False).reshape(N * cfg.Lq * M, D)
    chunks = _chunks(cfg, dtype, gather=want_locations or want_weights)
    want_sampling = want_locations or want_weights
    grad_locations = np.zeros((N * cfg.Lq, M, T, 2), dtype) if want_locations else None
    grad_weights = np.zeros((N * cfg.Lq, M, T), dtype) if want_weights else None
    partial_value = {}

    def work(a, b):
        plan = _plan(locations[a:b], _first_image(a, b, cfg), cfg)
        G_chunk = G[a * M:b * M]
        if want_value:  # columns of the chunk's images only
            n0, n1 = a // cfg.Lq, (b - 1) // cfg.Lq + 1
            column0, columns = n0 * M * (S + 1), (n1 - n0) * M * (S + 1)
            partial_value[a] = (column0, _matrix(plan, weights[a:b], cfg, column0, columns).T @ G_chunk)
        if want_sampling:
            # each corner's value dotted with its (query, head)'s output gradient
            k = plan.rows.shape[-1]
            corners = X.take(plan.rows.reshape(-1), axis=0).reshape((b - a) * M, T * k, D)
            dots = np.matmul(corners, G_chunk[:, :, None]).reshape(b - a, M, T, k)
            if grad_weights is not None:
                grad_weights[a:b] = np.vecdot(dots, plan.weight)
            if grad_locations is not None and cfg.method != "discrete":
                scale = weights[a:b]
                grad_locations[a:b, ..., 0] = np.vecdot(dots, plan.dweight_dx) * scale
                grad_locations[a:b, ..., 1] = np.vecdot(dots, plan.dweight_dy) * scale

    if want_value or want_sampling:
        _bilinear.for_each_chunk(work, chunks)
    grad_value = None
    if want_value:
        total = np.zeros((N * M * (S + 1), D), dtype)
        for a, _ in chunks:  # in order: deterministic
            column0, part = partial_value[a]
            total[column0:column0 + part.shape[0]] += part
        grad_value = total.reshape(N, M, S + 1, D)[:, :, :S].transpose(0, 2, 1, 3)
    if cfg.fused and want_locations:
        # softmax backward: dL/dlogit = a ⊙ (g − Σ a·g)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(axis=-1, keepdims=True))
        packed = np.concatenate([grad_locations.reshape(N * cfg.Lq, M, 2 * T), grad_logits], axis=-1)
        grad_locations, grad_weights = packed, None
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
