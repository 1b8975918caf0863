"""ms_deform_attn and flash_deform_attn: an independent NumPy formula and torch's grid_sample (mmcv's
multi_scale_deformable_attn_pytorch, RT-DETRv2's discrete branch) as anchors, golden values, finite differences,
backend parity on special inputs, non-finite locations, bad input."""
from typing import NamedTuple

import numpy as np
import pytest

import deformcp
from deformcp import testing

from conftest import assert_close, directional_derivative, noncontiguous, run_both, to_backend

DTYPES = testing.dtypes()


# ------------------------------------------------------------------------------------------------ set-ups

class Setup(NamedTuple):
    """One way to call the op: layout "levels" (N, Lq, M, L, P, 2), "points_per_level" (N, Lq, M, ΣP_l, 2) or
    "flash" (N, Lq, M, L·P·3); points: P_l per level."""

    shapes: tuple
    points: tuple
    layout: str = "levels"
    method: str = "default"

    @property
    def label(self) -> str:
        return f"{self.layout}-{self.method}-{'x'.join(f'{h}.{w}' for h, w in self.shapes)}-P{self.points}"

    @property
    def forward(self):
        return deformcp.flash_deform_attn if self.layout == "flash" else deformcp.ms_deform_attn

    @property
    def backward(self):
        return deformcp.flash_deform_attn_backward if self.layout == "flash" else deformcp.ms_deform_attn_backward

    @property
    def options(self) -> dict:
        options = {"spatial_shapes": self.shapes, "level_start_index": None}
        if self.layout == "flash":
            return {**options, "num_points": self.points[0]}
        ppl = self.points if self.layout == "points_per_level" else None
        return {**options, "points_per_level": ppl, "method": self.method}

    def arrays(self, rng, N=2, Lq=3, M=2, D=3, dtype="float64", locations=None) -> dict:
        """Fresh random arrays (as keyword arguments), locations in [-0.15, 1.15) unless given as (N, Lq, M, T, 2)."""
        L, T = len(self.shapes), sum(self.points)
        value = rng.standard_normal((N, sum(h * w for h, w in self.shapes), M, D))
        if locations is None:
            locations = rng.uniform(-0.15, 1.15, (N, Lq, M, T, 2))
        if self.layout == "flash":
            logits = 2 * rng.standard_normal((N, Lq, M, T))
            packed = np.concatenate([locations.reshape(N, Lq, M, 2 * T), logits], axis=-1)
            return {"value": value.astype(dtype), "sampling_loc_attn": packed.astype(dtype)}
        weights = rng.uniform(-1, 1, (N, Lq, M, T))
        if self.layout == "levels":
            locations, weights = locations.reshape(N, Lq, M, L, T // L, 2), weights.reshape(N, Lq, M, L, T // L)
        return {"value": value.astype(dtype), "sampling_locations": locations.astype(dtype),
                "attention_weights": weights.astype(dtype)}

    def grad_output(self, rng, arrays) -> np.ndarray:
        N, S, M, D = arrays["value"].shape
        Lq = _locations_of(arrays).shape[1]
        return rng.standard_normal((N, Lq, M * D)).astype(arrays["value"].dtype)


def _locations_of(arrays):
    return arrays.get("sampling_locations", arrays.get("sampling_loc_attn"))


def call(where, fn, setup: Setup, arrays: dict, *leading, **extra):
    """fn(*leading, **arrays, **setup.options) on the path `where` ("numpy", "host", "cuda"), NumPy arrays moved
    there, results brought back as NumPy arrays (a named tuple of them for a backward)."""
    moved = {k: to_backend(a, where) for k, a in arrays.items()}
    result = testing.run(where, fn, *(to_backend(a, where) for a in leading), **moved, **setup.options, **extra)
    if isinstance(result, tuple):
        return type(result)(*(None if g is None else testing.to_numpy(g) for g in result))
    return testing.to_numpy(result)


def run_setup(backend, fn, setup: Setup, arrays: dict, *leading, **extra):
    """conftest.run_both for keyword arrays: (backend's result, the NumPy path's), poisoned outputs, inputs
    checked unmodified."""
    names = list(arrays)

    def wrapper(*values):
        return fn(*values[:len(leading)], **dict(zip(names, values[len(leading):])), **setup.options, **extra)

    return run_both(backend, wrapper, *leading, *arrays.values())


LEVELS = ((3, 5), (1, 1), (4, 2))   # non-square both ways and a 1×1 level
SETUPS = [
    Setup(LEVELS, (2, 2, 2)),
    Setup(LEVELS, (3, 1, 2), "points_per_level"),
    Setup(LEVELS, (2, 2, 2), method="discrete"),
    Setup(LEVELS, (1, 3, 2), "points_per_level", "discrete"),
    Setup(LEVELS, (2, 2, 2), "flash"),
]
SETUP_IDS = [s.label for s in SETUPS]


# ------------------------------------------------------------------------ the formula, written independently

def _pixels_read(x, y, H, W, method):
    """Per pixel a point reads: (row, column, weight, ∂weight/∂x, ∂weight/∂y), x and y normalised. A non-finite
    point reads nothing; the bilinear weights' derivatives at an integer pixel coordinate are the right ones."""
    finite = np.isfinite(x) & np.isfinite(y)
    if method == "discrete":  # RT-DETRv2: ⌊x·W + 0.5⌋, ⌊y·H + 0.5⌋, each clamped to its own axis
        column = np.clip(np.floor(np.where(finite, x, 0) * W + 0.5), 0, W - 1).astype(np.int64)
        row = np.clip(np.floor(np.where(finite, y, 0) * H + 0.5), 0, H - 1).astype(np.int64)
        zero = np.zeros(x.shape)
        yield row, column, finite.astype(np.float64), zero, zero
        return
    with np.errstate(invalid="ignore", over="ignore"):
        px, py = x * W - 0.5, y * H - 0.5
        # a point that cannot reach the level (non-finite, or far outside) is moved to where it reads only zeros
        near = finite & (px > -3) & (px < W + 2) & (py > -3) & (py < H + 2)
    px, py = np.where(near, px, -5.0), np.where(near, py, -5.0)
    x0, y0 = np.floor(px), np.floor(py)
    fx, fy = px - x0, py - y0
    for dy, wy, dwy in ((0, 1 - fy, -1.0), (1, fy, 1.0)):
        for dx, wx, dwx in ((0, 1 - fx, -1.0), (1, fx, 1.0)):
            yield (y0 + dy).astype(np.int64), (x0 + dx).astype(np.int64), wy * wx, wy * dwx * W, dwy * wx * H


def formula(value, shapes, locations, weights, points, method="default", grad_output=None):
    """out[n, q, m] = Σ_l Σ_p A · V_l(x·W_l − 0.5, y·H_l − 0.5)[n, m], one level and one corner at a time, in
    float64; locations (N, Lq, M, T, 2), weights (N, Lq, M, T). Returns (out (N, Lq, M·D), (grad_value,
    grad_locations, grad_weights)) — gradients only with grad_output."""
    value, locations, weights = (np.asarray(a, np.float64) for a in (value, locations, weights))
    N, S, M, D = value.shape
    Lq = locations.shape[1]
    assert S == sum(h * w for h, w in shapes) and locations.shape[3] == sum(points)
    g = None if grad_output is None else np.asarray(grad_output, np.float64).reshape(N, Lq, M, 1, D)
    out = np.zeros((N, Lq, M, D))
    grad_value, grad_locations, grad_weights = np.zeros(value.shape), np.zeros(locations.shape), np.zeros(weights.shape)
    n, m = np.arange(N)[:, None, None, None], np.arange(M)[None, None, :, None]
    start = t = 0
    for (H, W), P in zip(shapes, points):
        image = value[:, start:start + H * W].reshape(N, H, W, M, D)
        grad_image = np.zeros(image.shape)
        x, y, a = locations[:, :, :, t:t + P, 0], locations[:, :, :, t:t + P, 1], weights[:, :, :, t:t + P]
        sample, d_dx, d_dy = (np.zeros((N, Lq, M, P, D)) for _ in range(3))
        for row, column, w, w_dx, w_dy in _pixels_read(x, y, H, W, method):
            inside = (row >= 0) & (row < H) & (column >= 0) & (column < W)
            at = (n, np.clip(row, 0, H - 1), np.clip(column, 0, W - 1), m)
            pixel = image[at] * inside[..., None]
            sample += w[..., None] * pixel
            d_dx += w_dx[..., None] * pixel
            d_dy += w_dy[..., None] * pixel
            if g is not None:
                np.add.at(grad_image, at, (inside * w * a)[..., None] * g)
        out += np.sum(a[..., None] * sample, axis=3)
        if g is not None:
            grad_weights[:, :, :, t:t + P] = np.sum(g * sample, axis=-1)
            grad_locations[:, :, :, t:t + P, 0] = a * np.sum(g * d_dx, axis=-1)
            grad_locations[:, :, :, t:t + P, 1] = a * np.sum(g * d_dy, axis=-1)
        grad_value[:, start:start + H * W] = grad_image.reshape(N, H * W, M, D)
        start, t = start + H * W, t + P
    return out.reshape(N, Lq, M * D), (grad_value, grad_locations, grad_weights)


def formula_for(setup: Setup, arrays: dict, grad_output=None):
    """formula() on a set-up's arrays: (out, gradients shaped as the op's Grads)."""
    value = arrays["value"]
    N, Lq, M = _locations_of(arrays).shape[:3]
    T = sum(setup.points)
    if setup.layout == "flash":
        packed = np.asarray(arrays["sampling_loc_attn"], np.float64)
        logits = packed[..., 2 * T:]
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        a = e / e.sum(axis=-1, keepdims=True)
        out, (g_value, g_loc, g_a) = formula(value, setup.shapes, packed[..., :2 * T].reshape(N, Lq, M, T, 2), a,
                                             setup.points, grad_output=grad_output)
        g_logits = a * (g_a - np.sum(a * g_a, axis=-1, keepdims=True))  # softmax's Jacobian
        return out, (g_value, np.concatenate([g_loc.reshape(N, Lq, M, 2 * T), g_logits], axis=-1))
    locations, weights = arrays["sampling_locations"], arrays["attention_weights"]
    out, (g_value, g_loc, g_w) = formula(value, setup.shapes, locations.reshape(N, Lq, M, T, 2),
                                         weights.reshape(N, Lq, M, T), setup.points, setup.method, grad_output)
    return out, (g_value, g_loc.reshape(locations.shape), g_w.reshape(weights.shape))


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_matches_the_formula(rng, setup):
    """The NumPy path against the formula written out here: float64 forward and every gradient."""
    arrays = setup.arrays(rng, N=2, Lq=5, M=3, D=4)
    grad_output = setup.grad_output(rng, arrays)
    expected, expected_grads = formula_for(setup, arrays, grad_output)
    np.testing.assert_allclose(setup.forward(**arrays, **setup.options), expected, rtol=1e-13, atol=1e-13)
    grads = setup.backward(grad_output, **arrays, **setup.options)
    assert grads._fields == (("value", "sampling_loc_attn") if setup.layout == "flash" else
                             ("value", "sampling_locations", "attention_weights"))
    for name, got, want in zip(grads._fields, grads, expected_grads):
        assert got.shape == arrays[name].shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    if setup.method == "discrete":
        assert np.all(grads.sampling_locations == 0) and np.any(grads.attention_weights != 0)


def test_flash_is_ms_deform_attn_of_the_softmax(rng):
    """flash_deform_attn(packed) = ms_deform_attn(locations, softmax(logits)): the packing order (per head the
    L·P (x, y) pairs level-major then point, then the L·P logits in the same order)."""
    N, Lq, M, L, P = 2, 3, 2, len(LEVELS), 2
    value = rng.standard_normal((N, 24, M, 5))
    locations = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2))
    logits = rng.standard_normal((N, Lq, M, L, P))
    packed = np.concatenate([locations.reshape(N, Lq, M, -1), logits.reshape(N, Lq, M, -1)], axis=-1)
    weights = np.exp(logits) / np.exp(logits).sum(axis=(3, 4), keepdims=True)
    np.testing.assert_allclose(deformcp.flash_deform_attn(value, LEVELS, None, packed, P),
                               deformcp.ms_deform_attn(value, LEVELS, None, locations, weights), rtol=1e-13)


# ---------------------------------------------------------------------------------- anchor: torch, if present

def torch_anchor(torch, value, shapes, locations, weights, points, method):
    """mmcv's multi_scale_deformable_attn_pytorch (grid_sample per level), with RT-DETRv2's per-level point
    counts and its discrete branch — x clamped with W − 1 (RT-DETRv2 clamps both axes with H − 1). Tensors:
    value (N, S, M, D), locations (N, Lq, M, T, 2), weights (N, Lq, M, T)."""
    F = torch.nn.functional
    N, _, M, D = value.shape
    Lq, T = locations.shape[1], locations.shape[3]
    values = value.split([h * w for h, w in shapes], dim=1)
    per_level = locations.transpose(1, 2).flatten(0, 1).split(list(points), dim=2)  # (N·M, Lq, P_l, 2) each
    samples = []
    for (H, W), v, loc in zip(shapes, values, per_level):
        image = v.flatten(2).transpose(1, 2).reshape(N * M, D, H, W)
        if method == "default":
            samples.append(F.grid_sample(image, 2 * loc - 1, mode="bilinear", padding_mode="zeros",
                                         align_corners=False))
        else:
            coord = (loc * torch.tensor([W, H], dtype=loc.dtype) + 0.5).to(torch.int64)
            column, row = coord[..., 0].clamp(0, W - 1), coord[..., 1].clamp(0, H - 1)
            index = (row * W + column).reshape(N * M, 1, -1).expand(-1, D, -1)
            samples.append(image.flatten(2).gather(2, index).reshape(N * M, D, Lq, -1))
    a = weights.transpose(1, 2).reshape(N * M, 1, Lq, T)
    return (torch.cat(samples, dim=-1) * a).sum(-1).view(N, M * D, Lq).transpose(1, 2)


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_matches_torch(rng, setup):
    """Forward and autograd gradients of torch's formulation (float64)."""
    torch = pytest.importorskip("torch")
    arrays = setup.arrays(rng, N=2, Lq=4, M=2, D=3)
    tensors = {k: torch.tensor(a, requires_grad=True) for k, a in arrays.items()}
    N, Lq, M = _locations_of(arrays).shape[:3]
    T = sum(setup.points)
    if setup.layout == "flash":
        packed = tensors["sampling_loc_attn"]
        locations = packed[..., :2 * T].reshape(N, Lq, M, T, 2)
        weights = torch.softmax(packed[..., 2 * T:], dim=-1)
    else:
        locations = tensors["sampling_locations"].reshape(N, Lq, M, T, 2)
        weights = tensors["attention_weights"].reshape(N, Lq, M, T)
    out = torch_anchor(torch, tensors["value"], setup.shapes, locations, weights, setup.points, setup.method)
    grad_output = setup.grad_output(rng, arrays)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(setup.forward(**arrays, **setup.options), out.detach().numpy(), rtol=1e-13,
                               atol=1e-13)
    grads = setup.backward(grad_output, **arrays, **setup.options)
    for name, got in zip(grads._fields, grads):
        want = tensors[name].grad
        want = np.zeros(got.shape) if want is None else want.numpy()  # discrete: no path to the locations
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


# ------------------------------------------------------------------------------------------ golden values

# level 0: 2 × 4, level 1: 1 × 1, level 2: 4 × 2 (powers of two: the locations below are exact)
GOLDEN_SHAPES = ((2, 4), (1, 1), (4, 2))
V0 = np.array([[1.0, 2, 4, 8], [16, 32, 64, 128]])
V1 = 10.0
V2 = np.array([[3.0, 5], [7, 11], [13, 17], [19, 23]])
GOLDEN_VALUE = np.concatenate([V0.ravel(), [V1], V2.ravel()]).reshape(1, 17, 1, 1)


def golden(level, x, y, method="default", weight=1.0, where="numpy"):
    """(out, grads) for one point at (x, y) on one level (the other levels' points weigh 0), grad_output 1."""
    locations = np.full((1, 1, 1, 3, 1, 2), 0.5)
    locations[0, 0, 0, level, 0] = x, y
    weights = np.zeros((1, 1, 1, 3, 1))
    weights[0, 0, 0, level, 0] = weight
    setup = Setup(GOLDEN_SHAPES, (1, 1, 1), method=method)
    arrays = {"value": GOLDEN_VALUE, "sampling_locations": locations, "attention_weights": weights}
    out = call(where, deformcp.ms_deform_attn, setup, arrays)
    grads = call(where, deformcp.ms_deform_attn_backward, setup, arrays, np.ones((1, 1, 1)))
    return out[0, 0, 0], grads


@pytest.mark.parametrize("level, x, y, expected", [
    # pixel centres ((j + 0.5)/W, (i + 0.5)/H) read exactly the pixel
    *[(0, (j + 0.5) / 4, (i + 0.5) / 2, V0[i, j]) for i in range(2) for j in range(4)],
    *[(2, (j + 0.5) / 2, (i + 0.5) / 4, V2[i, j]) for i in range(4) for j in range(2)],
    (0, 0.5, 0.25, (2 + 4) / 2),                      # midway between columns 1 and 2 of row 0
    (0, 0.875, 0.5, (8 + 128) / 2),                   # midway between rows 0 and 1 of column 3
    (0, 0.5, 0.5, (2 + 4 + 32 + 64) / 4),             # midway between four pixels
    (0, 0.0, 0.25, 0.5 * 1),                          # the left edge: half of the border pixel
    (0, 1.0, 0.75, 0.5 * 128),                        # the right edge
    (0, 0.375, 1.0, 0.5 * 32),                        # the bottom edge
    (0, 0.0, 0.0, 0.25 * 1),                          # the top-left corner: a quarter
    (0, -1 / 16, 0.75, 0.25 * 16),                    # just outside: x = −0.75 px, column 0 weighs 0.25
    (0, 0.375, -1 / 8, 0.25 * 2),                     # just above: y = −0.75 px
    (2, 1.0 + 1 / 8, 0.625, 0.25 * 17),               # just right of a tall level: x = 1.75 px
    (0, -0.125, 0.25, 0.0),                           # x = −1 px: fully outside (closed at −1, weight 0)
    (0, -0.3, 0.25, 0.0),
    (0, 1.125, 0.25, 0.0),                            # x = W
    (0, 0.5, 1.5, 0.0),
    (0, 0.5, -0.25, 0.0),                             # y = −1 px
    (0, 2.0, 3.0, 0.0),
    # the 1×1 level
    (1, 0.5, 0.5, V1),
    (1, 0.75, 0.5, 0.75 * V1),                        # x = 0.25 px
    (1, 0.25, 0.25, 0.75 * 0.75 * V1),                # x = y = −0.25 px
    (1, 0.0, 0.0, 0.25 * V1),
    (1, 1.0, 1.0, 0.25 * V1),
    (1, 1.5, 0.5, 0.0),
    (1, 0.5, -0.5, 0.0),
])
def test_golden(any_backend, level, x, y, expected):
    out, _ = golden(level, x, y, where=any_backend)
    assert out == pytest.approx(expected, abs=1e-14)
    out, _ = golden(level, x, y, weight=-2.5, where=any_backend)  # attention weights as given, no softmax
    assert out == pytest.approx(-2.5 * expected, abs=1e-14)


def test_golden_gradients(any_backend):
    # x = 1.5 px, y = 0 px on level 0, weight 2. ∂/∂x: 2·(V0[0, 2] − V0[0, 1])·W = 16; ∂/∂y from the right:
    # 2·(row 1 − row 0 at x = 1.5)·H = 2·(48 − 3)·2 = 180; the weight's: the sample, 3; value: 2·0.5 at (0, 1)
    # and (0, 2), row 1 weighs 0
    out, grads = golden(0, 0.5, 0.25, weight=2.0, where=any_backend)
    assert out == pytest.approx(6.0, abs=1e-14)
    np.testing.assert_allclose(grads.sampling_locations[0, 0, 0, 0, 0], [16.0, 180.0], atol=1e-12)
    assert grads.attention_weights[0, 0, 0, 0, 0] == pytest.approx(3.0, abs=1e-14)
    expected_value = np.zeros(17)
    expected_value[[1, 2]] = 1.0
    np.testing.assert_allclose(grads.value.ravel(), expected_value, atol=1e-14)
    # x = −1 px exactly reads 0 · column 0, with column 0's derivative from the right: 2·V0[0, 0]·W = 8, as
    # grid_sample; no y derivative (column 0 weighs 0) and nothing for value
    out, grads = golden(0, -0.125, 0.25, weight=2.0, where=any_backend)
    assert out == 0
    np.testing.assert_allclose(grads.sampling_locations[0, 0, 0, 0, 0], [8.0, 0.0], atol=1e-12)
    assert grads.attention_weights[0, 0, 0, 0, 0] == 0
    np.testing.assert_array_equal(grads.value, 0)
    # the 1×1 level at x = y = 0.25 px: ∂/∂x = 2·V1·(−0.75)·W = −15 (the pixel is the lower corner)
    _, grads = golden(1, 0.75, 0.75, weight=2.0, where=any_backend)
    np.testing.assert_allclose(grads.sampling_locations[0, 0, 0, 1, 0], [-15.0, -15.0], atol=1e-12)
    np.testing.assert_allclose(grads.value.ravel()[8], 2 * 0.75 * 0.75, atol=1e-14)


@pytest.mark.parametrize("level, x, y, expected", [
    (0, 0.3, 0.2, V0[0, 1]),     # ⌊1.2 + 0.5⌋ = 1, ⌊0.4 + 0.5⌋ = 0
    (0, 0.45, 0.3, V0[1, 2]),    # ⌊1.8 + 0.5⌋ = 2, ⌊0.6 + 0.5⌋ = 1
    (0, 0.125, 0.2, V0[0, 1]),   # x·W = 0.5, column 0's centre for bilinear sampling, is column 1 here
    (0, 0.9, 0.2, V0[0, 3]),     # column ⌊4.1⌋ = 4 clamped to W − 1 = 3 (RT-DETRv2's H − 1 = 1 would read 2)
    (0, -0.3, 1.4, V0[1, 0]),    # clamped below and above
    (0, 1e30, -1e30, V0[0, 3]),  # huge but finite: clamped
    (2, 0.3, 0.9, V2[3, 1]),     # a tall level: row ⌊4.1⌋ clamped to H − 1 = 3
    (2, 2.0, 0.1, V2[0, 1]),     # column ⌊4.5⌋ clamped to W − 1 = 1 (RT-DETRv2 would clamp with 3)
    (1, 5.0, -3.0, V1),          # a 1×1 level: every finite location
    (0, np.nan, 0.5, 0.0),       # non-finite: nothing
    (2, 0.5, np.inf, 0.0),
])
def test_golden_discrete(any_backend, level, x, y, expected):
    out, grads = golden(level, x, y, "discrete", weight=2.0, where=any_backend)
    assert out == 2 * expected
    np.testing.assert_array_equal(grads.sampling_locations, 0)
    assert grads.attention_weights[0, 0, 0, level, 0] == expected
    assert grads.value.sum() == (2.0 if expected else 0.0) and np.count_nonzero(grads.value) == (expected != 0)


# ------------------------------------------------------------------------------- finite differences (float64)

def locations_away_from_kinks(rng, lead, shapes, points):
    """(*lead, T, 2) normalised locations whose pixel coordinates keep 0.05 away from every integer (where the
    bilinear weights, the support's ends and the discrete rounding have kinks or steps), some outside."""
    columns = []
    for (H, W), P in zip(shapes, points):
        pixel = rng.integers(-2, [W + 1, H + 1], (*lead, P, 2)) + rng.uniform(0.05, 0.95, (*lead, P, 2))
        columns.append((pixel + 0.5) / np.array([W, H]))
    return np.concatenate(columns, axis=-2)


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_finite_differences(any_backend, rng, setup):
    N, Lq, M = 2, 3, 2
    arrays = setup.arrays(rng, N, Lq, M, D=3,
                          locations=locations_away_from_kinks(rng, (N, Lq, M), setup.shapes, setup.points))
    grad_output = setup.grad_output(rng, arrays)
    grads = call(any_backend, setup.backward, setup, arrays, grad_output)
    names = list(arrays)

    def loss(*values):
        return np.sum(grad_output * call(any_backend, setup.forward, setup, dict(zip(names, values))))

    for index, name in enumerate(names):
        grad = getattr(grads, name)
        direction = rng.standard_normal(grad.shape)
        numeric = directional_derivative(loss, list(arrays.values()), index, direction)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8), name


# ------------------------------------------------------------------------------------ backends vs NumPy

def _compare(backend, setup, arrays, rng, dtype="float64", **extra):
    """Forward and backward on backend against the NumPy path (run_both: poisoned outputs, inputs unmodified);
    returns the NumPy path's (out, grads)."""
    out, expected = run_setup(backend, setup.forward, setup, arrays)
    assert out.shape == expected.shape and testing.to_numpy(out).dtype == expected.dtype
    assert_close(out, expected, dtype)
    grad_output = setup.grad_output(rng, arrays)
    grads, expected_grads = run_setup(backend, setup.backward, setup, arrays, grad_output, **extra)
    for name, got, want in zip(expected_grads._fields, grads, expected_grads):
        assert got.shape == want.shape == arrays[name].shape, name
        assert_close(got, want, dtype)
    return expected, expected_grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_every_dtype(backend, rng, setup, dtype):
    arrays = setup.arrays(rng, N=2, Lq=5, M=2, D=4, dtype=dtype)
    _compare(backend, setup, arrays, rng, dtype)


SPECIAL = [  # (label, set-up, sizes N, Lq, M, D)
    ("N=0", Setup(LEVELS, (2, 2, 2)), (0, 3, 2, 3)),
    ("Lq=0", Setup(LEVELS, (2, 2, 2)), (2, 0, 2, 3)),
    ("Lq=0-flash", Setup(LEVELS, (1, 1, 1), "flash"), (2, 0, 2, 3)),
    ("N=0-discrete", Setup(LEVELS, (1, 2, 0), "points_per_level", "discrete"), (0, 2, 2, 3)),
    ("one-level", Setup(((6, 5),), (4,)), (2, 3, 2, 3)),
    ("one-level-flash", Setup(((6, 5),), (3,), "flash"), (2, 3, 2, 3)),
    ("only-1x1", Setup(((1, 1),), (3,)), (2, 3, 2, 3)),
    ("1x1-levels", Setup(((1, 1), (1, 1)), (2, 3), "points_per_level"), (1, 4, 3, 2)),
    ("wide-tall", Setup(((1, 9), (9, 1), (2, 7)), (2, 2, 2)), (2, 3, 2, 3)),
    ("wide-tall-discrete", Setup(((1, 9), (9, 1), (2, 7)), (2, 2, 2), method="discrete"), (2, 3, 2, 3)),
    ("a level with no points", Setup(LEVELS, (2, 0, 3), "points_per_level"), (2, 3, 2, 3)),
    ("large-D", Setup(LEVELS, (1, 1, 1)), (1, 2, 2, 300)),
    ("large-D-flash", Setup(LEVELS, (1, 1, 1), "flash"), (1, 2, 1, 260)),
    ("many-heads", Setup(LEVELS, (2, 2, 2)), (1, 2, 9, 1)),
    ("many-levels-points", Setup(((3, 2), (2, 2), (1, 2), (1, 1), (5, 3)), (5, 5, 5, 5, 5)), (1, 2, 2, 2)),
]


@pytest.mark.parametrize("label, setup, sizes", SPECIAL, ids=[s[0] for s in SPECIAL])
def test_special_sizes(backend, rng, label, setup, sizes):
    N, Lq, M, D = sizes
    arrays = setup.arrays(rng, N, Lq, M, D)
    expected, expected_grads = _compare(backend, setup, arrays, rng)
    assert expected.shape == (N, Lq, M * D)
    grad_output = setup.grad_output(rng, arrays)
    out, grads = formula_for(setup, arrays, grad_output)
    np.testing.assert_allclose(expected, out, rtol=1e-12, atol=1e-13)
    for name, got, want in zip(expected_grads._fields, setup.backward(grad_output, **arrays, **setup.options), grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("layout", ["levels", "points_per_level"])
def test_no_points_at_all_give_zeros(any_backend, rng, layout):
    """P = 0 (every P_l = 0 with points_per_level, which takes zeros): each output is an empty sum, 0 (as mmcv's
    formulation gives), value's gradient 0, the other gradients empty."""
    setup = Setup(LEVELS, (0, 0, 0), layout)
    arrays = setup.arrays(rng, N=2, Lq=3, M=2, D=3)
    grad_output = setup.grad_output(rng, arrays)
    with testing.poisoned_outputs():
        out = call(any_backend, setup.forward, setup, arrays)
        grads = call(any_backend, setup.backward, setup, arrays, grad_output)
    np.testing.assert_array_equal(out, np.zeros((2, 3, 6)))
    np.testing.assert_array_equal(grads.value, np.zeros(arrays["value"].shape))
    assert grads.sampling_locations.shape == arrays["sampling_locations"].shape
    assert grads.attention_weights.shape == arrays["attention_weights"].shape


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_noncontiguous_inputs(any_backend, rng, setup):
    """Strided and transposed views give the contiguous arrays' results, and the kernels the NumPy path's."""
    arrays = setup.arrays(rng, N=2, Lq=4, M=3, D=5)
    grad_output = setup.grad_output(rng, arrays)
    expected, expected_grads = formula_for(setup, arrays, grad_output)
    views = {name: noncontiguous(a) for name, a in arrays.items()}
    views["value"] = np.ascontiguousarray(arrays["value"].transpose(2, 0, 3, 1)).transpose(1, 3, 0, 2)  # (M, N, D, S)
    assert not any(v.flags.c_contiguous for v in views.values())
    with testing.poisoned_outputs():
        out = call(any_backend, setup.forward, setup, views)
        grads = call(any_backend, setup.backward, setup, views, noncontiguous(grad_output))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    for name, got, want in zip(grads._fields, grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("setup", [SETUPS[0], SETUPS[3], SETUPS[4]], ids=[SETUP_IDS[0], SETUP_IDS[3], SETUP_IDS[4]])
def test_deterministic_backward_is_bitwise_reproducible(backend, rng, setup):
    """Many queries on small levels (many points per pixel): deterministic=True gives the NumPy path's
    gradients, bitwise the same from run to run; deterministic=False the same within rounding."""
    arrays = setup.arrays(rng, N=2, Lq=64, M=2, D=8, dtype="float32")
    grad_output = setup.grad_output(rng, arrays)
    first, expected = run_setup(backend, setup.backward, setup, arrays, grad_output, deterministic=True)
    again = call(backend, setup.backward, setup, arrays, grad_output, deterministic=True)
    atomic = call(backend, setup.backward, setup, arrays, grad_output, deterministic=False)
    for name, a, b, c, want in zip(expected._fields, first, again, atomic, expected):
        assert_close(a, want, "float32")
        assert_close(c, want, "float32")
        np.testing.assert_array_equal(testing.to_numpy(a), b, err_msg=name)


@pytest.mark.parametrize("setup", [SETUPS[1], SETUPS[4]], ids=[SETUP_IDS[1], SETUP_IDS[4]])
def test_backward_computes_only_what_is_asked(any_backend, rng, setup):
    """Every needs_input_grad subset: the gradients asked for equal the full backward's, the others are None."""
    arrays = setup.arrays(rng, N=2, Lq=3, M=2, D=3)
    grad_output = setup.grad_output(rng, arrays)
    full = setup.backward(grad_output, **arrays, **setup.options)
    n = len(full)
    for needs in np.ndindex(*(2,) * n):
        needs = tuple(bool(k) for k in needs)
        with testing.poisoned_outputs():
            grads = call(any_backend, setup.backward, setup, arrays, grad_output, needs_input_grad=needs)
        for name, got, want, asked in zip(full._fields, grads, full, needs):
            if asked:
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=f"{name} {needs}")
            else:
                assert got is None, f"{name} {needs}"


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_inputs_unmodified_and_outputs_new(any_backend, rng, setup):
    arrays = setup.arrays(rng, N=2, Lq=3, M=2, D=3)
    grad_output = setup.grad_output(rng, arrays)
    before = {name: a.copy() for name, a in arrays.items()}
    moved = {name: to_backend(a, any_backend) for name, a in arrays.items()}
    moved_grad_output = to_backend(grad_output, any_backend)
    out = testing.run(any_backend, setup.forward, **moved, **setup.options)
    grads = testing.run(any_backend, setup.backward, moved_grad_output, **moved, **setup.options)
    for name, a in moved.items():
        np.testing.assert_array_equal(testing.to_numpy(a), before[name], err_msg=name)
    np.testing.assert_array_equal(testing.to_numpy(moved_grad_output), grad_output)
    for result in (out, *grads):
        for given in (moved_grad_output, *moved.values()):
            if isinstance(result, np.ndarray):
                assert not np.shares_memory(result, given)
            else:  # CuPy
                assert result.data.ptr != given.data.ptr


# --------------------------------------------------------------------------- non-finite sampling locations

NONFINITE = [(np.nan, 0.5), (0.5, np.nan), (np.inf, 0.5), (0.3, -np.inf), (-np.inf, np.inf), (np.nan, np.inf)]
HUGE = [(1e30, 0.5), (0.5, -1e30), (-1e30, 1e30)]  # finite: outside (bilinear) or clamped (discrete)


@pytest.mark.parametrize("setup", [SETUPS[0], SETUPS[3], SETUPS[4]], ids=[SETUP_IDS[0], SETUP_IDS[3], SETUP_IDS[4]])
def test_nonfinite_locations(backend, rng, setup):
    """A NaN or ±inf coordinate: the point adds nothing to the output or to value's gradient, and its location
    gradient is 0; huge finite ones are ordinary points. The host backend equals the NumPy path (and runs
    under the sanitizers: no out-of-range float → int cast)."""
    N, Lq, M, T = 2, 4, 2, sum(setup.points)
    locations = rng.uniform(-0.1, 1.1, (N, Lq, M, T, 2))
    flat = locations.reshape(-1, 2)
    chosen = rng.choice(len(flat), len(NONFINITE) + len(HUGE), replace=False)
    flat[chosen] = NONFINITE + HUGE
    bad = ~np.isfinite(locations).all(axis=-1)
    arrays = setup.arrays(rng, N, Lq, M, D=3, locations=locations)
    expected, expected_grads = _compare(backend, setup, arrays, rng)
    grad_output = setup.grad_output(rng, arrays)
    expected_grads = setup.backward(grad_output, **arrays, **setup.options)
    assert np.all(np.isfinite(expected)) and all(np.all(np.isfinite(g)) for g in expected_grads)
    out, grads = formula_for(setup, arrays, grad_output)
    np.testing.assert_allclose(expected, out, rtol=1e-12, atol=1e-13)
    for name, got, want in zip(expected_grads._fields, expected_grads, grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    if setup.layout == "flash":
        packed_grad = expected_grads.sampling_loc_attn[..., :2 * T].reshape(N, Lq, M, T, 2)
        assert np.all(packed_grad[bad] == 0)
        return
    grad_locations = expected_grads.sampling_locations.reshape(N, Lq, M, T, 2)
    assert np.all(grad_locations[bad] == 0)
    assert np.all(expected_grads.attention_weights.reshape(N, Lq, M, T)[bad] == 0)
    # the same call with those points' weights 0 (and their locations finite): the same output and value gradient
    quiet = dict(arrays)
    quiet["attention_weights"] = np.where(bad.reshape(arrays["attention_weights"].shape), 0.0,
                                          arrays["attention_weights"])
    quiet["sampling_locations"] = np.where(bad[..., None], 0.5, locations).reshape(arrays["sampling_locations"].shape)
    np.testing.assert_allclose(expected, setup.forward(**quiet, **setup.options), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(expected_grads.value, setup.backward(grad_output, **quiet, **setup.options).value,
                               rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    setup = Setup(LEVELS, (2, 2, 2))
    arrays = setup.arrays(rng, N=2, Lq=3, M=2, D=3)
    v, loc, w = arrays["value"], arrays["sampling_locations"], arrays["attention_weights"]
    loc_ppl, w_ppl = loc.reshape(2, 3, 2, 6, 2), w.reshape(2, 3, 2, 6)
    packed = rng.uniform(size=(2, 3, 2, 18))
    go = np.zeros((2, 3, 6))

    def ms(value=v, shapes=LEVELS, starts=None, locations=loc, weights=w, **options):
        return lambda: deformcp.ms_deform_attn(value, shapes, starts, locations, weights, **options)

    def flash(value=v, shapes=LEVELS, starts=None, sampling=packed, P=2):
        return lambda: deformcp.flash_deform_attn(value, shapes, starts, sampling, P)

    cases = [
        (ValueError, r"^value: expected S = ΣH_l·W_l = 24 rows .*got shape \(2, 23, 2, 3\)", ms(value=v[:, :23])),
        (ValueError, r"^value: expected S = ΣH_l·W_l = 25 rows", ms(shapes=((3, 5), (1, 2), (4, 2)))),
        (ValueError, r"^value: expected a 4-D array \(N, S, M, D\)", ms(value=v[0])),
        (ValueError, r"^value: expected M ≥ 1 heads and D ≥ 1 channels", ms(value=v[..., :0])),
        (ValueError, r"^level_start_index: expected \(0, 15, 16\) .*got \(0, 15, 17\)", ms(starts=(0, 15, 17))),
        (ValueError, r"^level_start_index: expected \(0, 15, 16\)", ms(starts=np.array([0, 16, 17]))),
        (ValueError, r"^level_start_index: expected \(0, 15, 16\) .*got \(0, 15\)", ms(starts=[0, 15])),
        (TypeError, r"^level_start_index: expected an integer array, got dtype float64",
         ms(starts=np.array([0.0, 15, 16]))),
        (ValueError, r"^sampling_locations: expected number of heads M = 2 \(value's\)",
         ms(locations=loc[:, :, :1], weights=w[:, :, :1])),
        (ValueError, r"^attention_weights: expected shape \(2, 3, 2, 3, 2\) .*got \(2, 3, 1, 3, 2\)",
         ms(weights=w[:, :, :1])),
        (ValueError, r"^sampling_locations: expected batch size N = 2 \(value's\)", ms(locations=loc[:1],
                                                                                       weights=w[:1])),
        (ValueError, r"^attention_weights: expected shape \(2, 3, 2, 3, 2\) .*got \(1, 3, 2, 3, 2\)",
         ms(weights=w[:1])),
        (ValueError, r"^attention_weights: expected shape .*got \(2, 2, 2, 3, 2\)", ms(weights=w[:, :2])),
        (ValueError, r"^sampling_locations: expected L = 3 levels \(spatial_shapes'\)",
         ms(locations=loc[:, :, :, :2], weights=w[:, :, :, :2])),
        (ValueError, r"^attention_weights: expected shape \(2, 3, 2, 3, 2\) .*got \(2, 3, 2, 3, 1\)",
         ms(weights=w[..., :1])),
        (ValueError, r"^sampling_locations: expected the last axis to hold \(x, y\), size 2",
         ms(locations=np.concatenate([loc, loc[..., :1]], axis=-1))),
        (ValueError, r"^sampling_locations: expected the last axis to hold \(x, y\), size 2",
         ms(locations=loc[..., :1])),
        (ValueError, r"^sampling_locations: expected a 6-D array", ms(locations=loc_ppl, weights=w_ppl)),
        (ValueError, r"^points_per_level: expected the points of sampling_locations .*ΣP_l = 6, got \(1, 2, 2\)",
         ms(locations=loc_ppl, weights=w_ppl, points_per_level=(1, 2, 2))),
        (ValueError, r"^points_per_level: expected 3 integers, got 2",
         ms(locations=loc_ppl, weights=w_ppl, points_per_level=(4, 2))),
        (ValueError, r"^points_per_level: expected non-negative sizes",
         ms(locations=loc_ppl, weights=w_ppl, points_per_level=(-1, 5, 2))),
        (TypeError, r"^points_per_level: expected a sequence of 3 integers, got \(True, 3, 2\)",
         ms(locations=loc_ppl, weights=w_ppl, points_per_level=(True, 3, 2))),
        (TypeError, r"^points_per_level: expected a sequence of 3 integers", ms(
            locations=loc_ppl, weights=w_ppl, points_per_level=(2.0, 2, 2))),
        (ValueError, r"^sampling_locations: expected a 5-D array", ms(points_per_level=(2, 2, 2))),
        (TypeError, r"^spatial_shapes\[1\]: expected integers, got bool True", ms(shapes=((3, 5), (True, 1), (4, 2)))),
        (TypeError, r"^spatial_shapes\[0\]: expected integers, got float 3.0", ms(shapes=((3.0, 5), (1, 1), (4, 2)))),
        (TypeError, r"^spatial_shapes: expected an integer array, got dtype float64",
         ms(shapes=np.array(LEVELS, np.float64))),
        (TypeError, r"^spatial_shapes: expected an integer array, got dtype bool", ms(shapes=np.ones((3, 2), bool))),
        (ValueError, r"^spatial_shapes: expected positive sizes", ms(shapes=((3, 5), (0, 1), (4, 2)))),
        (ValueError, r"^spatial_shapes: expected positive sizes", ms(shapes=((3, 5), (1, 1), (-4, -2)))),
        (ValueError, r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)", ms(shapes=())),
        (ValueError, r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)", ms(shapes=(3, 5))),
        (ValueError, r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)", ms(shapes=np.array([[3, 5, 1]] * 3))),
        (TypeError, r"^spatial_shapes: expected an integer array or a sequence of ints, got int", ms(shapes=36)),
        (ValueError, r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)", ms(shapes=np.ones((1, 2, 2), np.int64))),
        (ValueError, r"^spatial_shapes: expected L ≥ 1 rows \(H_l, W_l\)", ms(shapes=[(2, (3,))])),
        (ValueError, r"^spatial_shapes: expected positive sizes \(H_l, W_l\) of at most 2147483647",
         ms(shapes=((3, 5), (1, 1), (4, 2**31)))),
        # S past int64 (no wrap-around in the level starts): still the value check
        (ValueError, r"^value: expected S = ΣH_l·W_l = 18446744056529682436 rows",
         ms(shapes=((2**31 - 1, 2**31 - 1),) * 4, locations=loc[:, :, :, :1].repeat(4, axis=3),
            weights=w[:, :, :, :1].repeat(4, axis=3))),
        (ValueError, r"^method: expected one of \('default', 'discrete'\), got 'nearest'", ms(method="nearest")),
        (ValueError, r"^method: expected one of \('default', 'discrete'\), got 'bilinear'", ms(method="bilinear")),
        (TypeError, r"^expected arrays of one dtype: value is float32", ms(value=v.astype(np.float32))),
        (TypeError, r"^attention_weights: expected a floating-point array", ms(weights=w.astype(np.int64))),
        (ValueError, r"^sampling_loc_attn: expected L·P·3 = 18 values per head .*got shape \(2, 3, 2, 17\)",
         flash(sampling=packed[..., :17])),
        (ValueError, r"^sampling_loc_attn: expected L·P·3 = 36 values per head \(L = 3 levels, P = 4 points\)",
         flash(P=4)),
        (ValueError, r"^sampling_loc_attn: expected L·P·3 = 9 values", flash(P=1)),
        (ValueError, r"^num_points: expected a positive int, got 0", flash(P=0)),
        (TypeError, r"^num_points: expected an int, got bool True", flash(P=True)),
        (TypeError, r"^num_points: expected an int, got float 2.0", flash(P=2.0)),
        (ValueError, r"^sampling_loc_attn: expected number of heads M = 2", flash(sampling=packed[:, :, :1])),
        (ValueError, r"^sampling_loc_attn: expected batch size N = 2", flash(sampling=packed[:1])),
        (ValueError, r"^sampling_loc_attn: expected a 4-D array", flash(sampling=packed[..., None])),
        (ValueError, r"^value: expected S = ΣH_l·W_l = 24 rows", flash(value=v[:, 1:])),
        (ValueError, r"^level_start_index: expected \(0, 15, 16\)", flash(starts=(0, 15, 15))),
        (ValueError, r"^grad_output: expected shape \(2, 3, 6\) for \(N, Lq, M·D\), got \(2, 3, 5\)",
         lambda: deformcp.ms_deform_attn_backward(go[..., :5], v, LEVELS, None, loc, w)),
        (ValueError, r"^needs_input_grad: expected 3 bools for \('value', 'sampling_locations', 'attention_weights'\)",
         lambda: deformcp.ms_deform_attn_backward(go, v, LEVELS, None, loc, w, needs_input_grad=(True, True))),
        (ValueError, r"^needs_input_grad: expected 2 bools for \('value', 'sampling_loc_attn'\)",
         lambda: deformcp.flash_deform_attn_backward(go, v, LEVELS, None, packed, 2, needs_input_grad=(True,) * 3)),
        (TypeError, r"^deterministic: expected a bool, got int 1",
         lambda: deformcp.flash_deform_attn_backward(go, v, LEVELS, None, packed, 2, deterministic=1)),
        (ValueError, r"^method: expected one of",
         lambda: deformcp.ms_deform_attn_backward(go, v, LEVELS, None, loc, w, method="linear")),
    ]
    for error, message, bad_call in cases:
        with pytest.raises(error, match=message):
            bad_call()


def test_host_backend_rejects_bad_input_too(rng):
    arrays = SETUPS[0].arrays(rng, N=1, Lq=2, M=1, D=2)
    with deformcp.backend("host"), pytest.raises(ValueError, match=r"^level_start_index: expected \(0, 15, 16\)"):
        deformcp.ms_deform_attn(arrays["value"], LEVELS, (0, 15, 17), arrays["sampling_locations"],
                                arrays["attention_weights"])


SHAPE_FORMS = {
    "tuple": lambda torch: LEVELS,
    "list of lists": lambda torch: [list(row) for row in LEVELS],
    "list of tuples": lambda torch: list(LEVELS),
    "numpy int64": lambda torch: np.array(LEVELS),
    "numpy int32": lambda torch: np.array(LEVELS, np.int32),
    "numpy uint8": lambda torch: np.array(LEVELS, np.uint8),
    "numpy int64 scalars": lambda torch: tuple(tuple(np.int64(s) for s in row) for row in LEVELS),
    "torch": lambda torch: torch.tensor(LEVELS),
}


@pytest.mark.parametrize("form", list(SHAPE_FORMS))
def test_spatial_shapes_forms_give_the_same_result(any_backend, rng, form):
    """spatial_shapes (and level_start_index) as a NumPy array, a list of lists, a tuple or a torch tensor:
    bitwise the same result."""
    torch = pytest.importorskip("torch") if form == "torch" else None
    setup = Setup(LEVELS, (1, 2, 1), "points_per_level")
    arrays = setup.arrays(rng, N=2, Lq=3, M=2, D=3)
    grad_output = setup.grad_output(rng, arrays)
    reference = call(any_backend, setup.forward, setup, arrays)
    reference_grads = call(any_backend, setup.backward, setup, arrays, grad_output)
    shapes = SHAPE_FORMS[form](torch)
    starts = torch.tensor([0, 15, 16]) if torch else np.array([0, 15, 16]) if "numpy" in form else [0, 15, 16]
    for level_start_index in (None, starts):
        options = {"spatial_shapes": shapes, "level_start_index": level_start_index}
        moved = {k: to_backend(a, any_backend) for k, a in arrays.items()}
        out = testing.run(any_backend, setup.forward, **moved, **options, points_per_level=setup.points)
        grads = testing.run(any_backend, setup.backward, to_backend(grad_output, any_backend), **moved, **options,
                            points_per_level=setup.points)
        np.testing.assert_array_equal(testing.to_numpy(out), reference)
        for got, want in zip(grads, reference_grads):
            np.testing.assert_array_equal(testing.to_numpy(got), want)
