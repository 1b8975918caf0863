"""affine_grid and grid_sample: golden values, finite differences, backend parity, special values, bad input."""
import itertools
import tracemalloc

import numpy as np
import pytest

import deformcp
from deformcp import testing
from deformcp.ops.spatial_transformer import MODES, PADDING_MODES
from deformcp.reference import spatial_transformer as reference

from conftest import assert_close, directional_derivative, run_both, to_backend

CONFIGS = list(itertools.product(MODES, PADDING_MODES, (False, True)))
CONFIG_IDS = [f"{m}-{p}-{'align' if a else 'noalign'}" for m, p, a in CONFIGS]


def assert_finite_differences(loss, arrays, grads, rng):
    """Each gradient of loss(*arrays) along a random direction equals the central finite difference (float64)."""
    for index, grad in enumerate(grads):
        direction = rng.standard_normal(grad.shape)
        numeric = directional_derivative(loss, arrays, index, direction)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


# ------------------------------------------------------------------------------------------ golden values

U = np.array([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])  # (1, 1, 2, 3)


def sample_one(x, y, mode, padding_mode, align_corners, input=U):
    grid = np.array([[[[x, y]]]], dtype=input.dtype)
    return deformcp.grid_sample(input, grid, mode, padding_mode, align_corners)[0, 0, 0, 0]


@pytest.mark.parametrize("point, mode, padding, align, expected", [
    # align_corners=False: x = ((g + 1)·W − 1) / 2 → g = 0 is x = 1, y = 0.5: mean of U[0,1], U[1,1]
    ((0.0, 0.0), "bilinear", "zeros", False, 3.5),
    # g = -1 is x = y = -0.5: only corner (0, 0) is inside, with weight 0.5 · 0.5
    ((-1.0, -1.0), "bilinear", "zeros", False, 0.25),
    ((-1.0, -1.0), "bilinear", "border", False, 1.0),
    ((-1.0, -1.0), "bilinear", "reflection", False, 1.0),
    # align_corners=True: g = 1 is the last pixel's centre
    ((1.0, 1.0), "bilinear", "zeros", True, 6.0),
    # x = 2.5, y = 0.5: zeros keeps half of column 2; border clamps x to 2; reflection folds it to 1.5
    ((1.5, 0.0), "bilinear", "zeros", True, 0.5 * (0.5 * 3 + 0.5 * 6)),
    ((1.5, 0.0), "bilinear", "border", True, 0.5 * 3 + 0.5 * 6),
    ((1.5, 0.0), "bilinear", "reflection", True, (2 + 3 + 5 + 6) / 4),
    # x = 4 reflects about 2 to 0, then the second fold (about 0) is even: x = 0
    ((3.0, -1.0), "bilinear", "reflection", True, 1.0),
    # nearest rounds half to even: (x, y) = (1, 0.5) → (1, 0); (1.5, 0.5) → (2, 0)
    ((0.0, 0.0), "nearest", "zeros", True, 2.0),
    ((0.5, 0.0), "nearest", "zeros", True, 3.0),
    # x = y = -0.5 rounds to -0, inside the image
    ((-1.0, -1.0), "nearest", "zeros", False, 1.0),
    ((-2.0, 0.0), "nearest", "zeros", True, 0.0),  # x = -1: outside
    ((-2.0, 0.0), "nearest", "border", True, 1.0),
    # bicubic (Keys, A = -0.75) at a pixel centre reads that pixel; at x = 1, y = 0.5 (align_corners) the row taps
    # -1, 0, 1, 2 weigh -0.09375, 0.59375, 0.59375, -0.09375: zeros drops rows -1 and 2, border clamps them to the
    # nearest row, reflection folds them onto the other row
    ((-1.0, -1.0), "bicubic", "zeros", True, 1.0),
    ((0.0, 0.0), "bicubic", "zeros", True, 0.59375 * (2 + 5)),
    ((0.0, 0.0), "bicubic", "border", True, 0.5 * 2 + 0.5 * 5),
    ((0.0, 0.0), "bicubic", "reflection", True, 0.5 * 2 + 0.5 * 5),
])
def test_grid_sample_golden(point, mode, padding, align, expected):
    assert sample_one(*point, mode, padding, align) == pytest.approx(expected, abs=1e-15)


def test_grid_sample_gradients_golden():
    # bilinear, zeros, align_corners=False at g = (0, 0): x = 1 exactly, y = 0.5.
    # d/dx (from the right): −0.5·U[0,1] + 0.5·U[0,2] − 0.5·U[1,1] + 0.5·U[1,2] = 1, dx/dg = W/2 = 1.5
    # d/dy: −U[0,1] + U[1,1] = 3, dy/dg = H/2 = 1
    grads = deformcp.grid_sample_backward(np.ones((1, 1, 1, 1)), U, np.zeros((1, 1, 1, 2)))
    np.testing.assert_allclose(grads.grid, [[[[1.5, 3.0]]]], atol=1e-15)
    np.testing.assert_allclose(grads.input, [[[[0, 0.5, 0], [0, 0.5, 0]]]], atol=1e-15)


def test_affine_grid_golden():
    theta = np.array([[[2.0, 0.0, 0.5], [0.0, 1.0, -1.0]]])
    x_free, y_free = np.array([-2 / 3, 0, 2 / 3]), np.array([-0.5, 0.5])   # pixel edges at ±1
    x_align, y_align = np.array([-1.0, 0, 1]), np.array([-1.0, 1])          # pixel centres at ±1
    for align, xs, ys in ((False, x_free, y_free), (True, x_align, y_align)):
        grid = deformcp.affine_grid(theta, (1, 4, 2, 3), align_corners=align)
        expected = np.stack(np.broadcast_arrays(2 * xs[None, :] + 0.5, ys[:, None] - 1), axis=-1)
        np.testing.assert_allclose(grid[0], expected, atol=1e-15)
    # a 1-pixel axis sits at 0
    np.testing.assert_allclose(deformcp.affine_grid(theta, (1, 1, 1, 1))[0, 0, 0], [0.5, -1.0], atol=1e-15)
    # grad_theta[r] = Σ grad[..., r] · [x, y, 1]: with grad = 1 and align_corners the x and y sums vanish
    grad = deformcp.affine_grid_backward(np.ones((1, 2, 3, 2)), theta, (1, 4, 2, 3), align_corners=True)
    np.testing.assert_allclose(grad.theta, [[[0, 0, 6], [0, 0, 6]]], atol=1e-15)


# ---------------------------------------------------------------------------- reference vs torch, if present

@pytest.mark.parametrize("align", [False, True])
def test_grid_gradient_at_minus_one_is_taken_from_the_right(any_backend, rng, align):
    """A zeros-padded bilinear sample at exactly x = -1 (or y = -1) reads 0 · column 0, and its derivative is the
    one from the right, column 0's values: torch's grid_sample. Sizes where the grid values are exact."""
    H, W = (3, 5) if align else (4, 4)
    x = rng.standard_normal((1, 2, H, W))
    to_grid = (lambda p, n: 2 * p / (n - 1) - 1) if align else (lambda p, n: (2 * p + 1) / n - 1)
    grid = np.array([[[[to_grid(-1, W), to_grid(1, H)], [to_grid(2, W), to_grid(-1, H)]]]])
    grad_output = rng.standard_normal((1, 2, 1, 2))
    x_, grid_, grad_output_ = (to_backend(a, any_backend) for a in (x, grid, grad_output))
    out = testing.to_numpy(testing.run(any_backend, deformcp.grid_sample, x_, grid_, align_corners=align))
    grads = testing.run(any_backend, deformcp.grid_sample_backward, grad_output_, x_, grid_, align_corners=align)
    grads = grads._replace(**{k: testing.to_numpy(v) for k, v in grads._asdict().items()})
    np.testing.assert_array_equal(out, 0)
    dx_dg, dy_dg = ((W - 1) / 2, (H - 1) / 2) if align else (W / 2, H / 2)
    # x = -1, y = 1: d/dx = column 0 at row 1; d/dy = 0 (the weight of column 0 is 0)
    # x = 2, y = -1: d/dy = row 0 at column 2; d/dx = 0
    expected = [[[[grad_output[0, :, 0, 0] @ x[0, :, 1, 0] * dx_dg, 0.0],
                  [0.0, grad_output[0, :, 0, 1] @ x[0, :, 0, 2] * dy_dg]]]]
    np.testing.assert_allclose(grads.grid, expected, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(grads.input, 0)  # weight 0 everywhere


def test_nearest_reads_the_right_pixel_past_2_to_the_24_pixels(any_backend, rng):
    """4500 × 4500 float32: y · W + x passes 2**24, where float32 cannot hold every integer."""
    H = W = 4500
    x = np.zeros((1, 1, H, W), np.float32)
    pixels = [(4499, 4498), (4498, 4499), (3729, 4497), (4499, 4499)]  # flat indices odd and above 2**24
    for y, xx in pixels:
        x[0, 0, y, xx] = rng.uniform(1, 2)
    x[0, 0, 4499, 4497] = x[0, 0, 4499, 4499] = -5.0  # the float32 neighbours of the odd flat indices
    grid = np.array([[[[2 * xx / (W - 1) - 1, 2 * y / (H - 1) - 1] for y, xx in pixels]]], np.float32)
    x_, grid_ = to_backend(x, any_backend), to_backend(grid, any_backend)
    out = testing.to_numpy(testing.run(any_backend, deformcp.grid_sample, x_, grid_, "nearest", "zeros", True))
    expected = [x[0, 0, y, xx] for y, xx in pixels]
    np.testing.assert_array_equal(out[0, 0, 0], expected)
    grad_output = np.arange(1, len(pixels) + 1, dtype=np.float32).reshape(1, 1, 1, -1)
    grads = testing.run(any_backend, deformcp.grid_sample_backward, to_backend(grad_output, any_backend), x_, grid_,
                        "nearest", "zeros", True, needs_input_grad=(True, False))
    grad_input = testing.to_numpy(grads.input)
    np.testing.assert_array_equal(np.flatnonzero(grad_input), sorted(y * W + xx for y, xx in pixels))
    np.testing.assert_array_equal(grad_input.reshape(-1)[[y * W + xx for y, xx in pixels]], grad_output.ravel())


def test_affine_grid_of_an_empty_batch_allocates_nothing(any_backend):
    """N = 0 with a tall H × W: nothing to compute, no base grid (the NumPy path built one: 8 GiB for
    H = 2**30; here 2**22 rows, 96 MiB, which tracemalloc sees)."""
    theta = to_backend(np.zeros((0, 2, 3)), any_backend)
    grad_output = to_backend(np.zeros((0, 2**22, 1, 2)), any_backend)
    tracemalloc.start()
    try:
        grid = testing.run(any_backend, deformcp.affine_grid, theta, (0, 3, 2**22, 1))
        grads = testing.run(any_backend, deformcp.affine_grid_backward, grad_output, theta, (0, 3, 2**22, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grid.shape == (0, 2**22, 1, 2) and grads.theta.shape == (0, 2, 3)
    assert peak < 2**20


@pytest.mark.parametrize("mode, padding, align", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch(rng, mode, padding, align):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((2, 3, 5, 6))
    theta = rng.standard_normal((2, 2, 3))
    grid = deformcp.affine_grid(theta, (2, 3, 4, 7), align)
    np.testing.assert_allclose(
        grid, F.affine_grid(torch.tensor(theta), (2, 3, 4, 7), align_corners=align).numpy(), atol=1e-14)
    grid = rng.uniform(-2.5, 2.5, (2, 4, 7, 2))
    tx, tgrid = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
    out = F.grid_sample(tx, tgrid, mode, padding, align)
    grad_output = rng.standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(deformcp.grid_sample(x, grid, mode, padding, align), out.detach().numpy(),
                               atol=1e-13)
    grads = deformcp.grid_sample_backward(grad_output, x, grid, mode, padding, align)
    np.testing.assert_allclose(grads.input, tx.grad.numpy(), atol=1e-13)
    np.testing.assert_allclose(grads.grid, tgrid.grad.numpy(), atol=1e-13)


VOLUME_CONFIGS = [c for c in CONFIGS if c[0] != "bicubic"]


@pytest.mark.parametrize("mode, padding, align", VOLUME_CONFIGS, ids=[f"{m}-{p}-{a}" for m, p, a in VOLUME_CONFIGS])
def test_volumes_match_torch(any_backend, rng, mode, padding, align):
    """5-D affine_grid and grid_sample (trilinear, nearest) against torch's, forward and every gradient, on every
    backend (deterministic too)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    theta = rng.standard_normal((2, 3, 4))
    ttheta = torch.tensor(theta, requires_grad=True)
    expected_grid = F.affine_grid(ttheta, (2, 3, 4, 5, 6), align_corners=align)
    grad_grid = rng.standard_normal(expected_grid.shape)
    expected_grid.backward(torch.tensor(grad_grid))
    x, grid = rng.standard_normal((2, 3, 5, 4, 6)), rng.uniform(-1.5, 1.5, (2, 4, 5, 6, 3))
    tx, tgrid = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
    out = F.grid_sample(tx, tgrid, mode, padding, align)
    grad_output = rng.standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    with deformcp.backend(any_backend):
        arrays = [to_backend(a, any_backend) for a in (theta, grad_grid, x, grid, grad_output)]
        results = [deformcp.affine_grid(arrays[0], (2, 3, 4, 5, 6), align),
                   deformcp.affine_grid_backward(arrays[1], arrays[0], (2, 3, 4, 5, 6), align).theta,
                   deformcp.grid_sample(arrays[2], arrays[3], mode, padding, align),
                   *deformcp.grid_sample_backward(arrays[4], arrays[2], arrays[3], mode, padding, align),
                   deformcp.grid_sample_backward(arrays[4], arrays[2], arrays[3], mode, padding, align,
                                                 deterministic=True).input]
    expected = [expected_grid, ttheta.grad, out, tx.grad, tgrid.grad, tx.grad]
    for got, want in zip(results, expected):
        np.testing.assert_allclose(testing.to_numpy(got), want.detach().numpy(), atol=1e-12)


def test_volume_golden():
    """Trilinear at the centre of a 2×2×2 volume (align_corners: g = 0 is x = y = z = 0.5): the mean of the eight
    voxels; with its gradient 0.5 · (upper face − lower face) per axis, times (size − 1) / 2 = 0.5."""
    x = np.arange(8.0).reshape(1, 1, 2, 2, 2)  # value = 4z + 2y + x
    out = deformcp.grid_sample(x, np.zeros((1, 1, 1, 1, 3)), align_corners=True)
    assert out.shape == (1, 1, 1, 1, 1) and out.item() == 3.5
    grads = deformcp.grid_sample_backward(np.ones_like(out), x, np.zeros((1, 1, 1, 1, 3)), align_corners=True)
    np.testing.assert_allclose(grads.grid.ravel(), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(grads.input.ravel(), np.full(8, 0.125))


@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("align", [False, True])
def test_volume_finite_differences(rng, padding, align):
    x = rng.standard_normal((2, 2, 3, 4, 5))
    g = grid_away_from_kinks(rng, (2, 3, 4, 2), 4, 5, align)  # (x, y) away from kinks, then z
    z = grid_away_from_kinks(rng, (2, 3, 4, 2), 3, 3, align)[..., :1]  # D = 3
    grid = np.concatenate([g, z], axis=-1)
    grad_output = rng.standard_normal((2, 2, 3, 4, 2))
    grads = deformcp.grid_sample_backward(grad_output, x, grid, "bilinear", padding, align)

    def loss(x, grid):
        return np.sum(grad_output * deformcp.grid_sample(x, grid, "bilinear", padding, align))

    assert_finite_differences(loss, (x, grid), grads, rng)


@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("align", [False, True])
def test_tricubic(any_backend, rng, padding, align):
    """Tricubic sampling (volumes, mode "bicubic"; no anchor has it): of a volume constant along z, at z inside
    the volume with border padding, it is the bicubic sample of the slice (the z weights sum to 1); and its
    gradients are the forward's, by finite differences (float64), on every backend."""
    sl = rng.standard_normal((2, 3, 5, 6))
    volume = np.repeat(sl[:, :, None], 4, axis=2)
    grid = np.concatenate([grid_away_from_kinks(rng, (2, 3, 4), 5, 6, align),
                           grid_away_from_kinks(rng, (2, 3, 4), 4, 4, align)[..., :1]], axis=-1)[:, None]
    if padding == "border":
        np.testing.assert_allclose(deformcp.grid_sample(volume, grid, "bicubic", "border", align)[:, :, 0],
                                   deformcp.grid_sample(sl, grid[:, 0, ..., :2], "bicubic", "border", align),
                                   atol=1e-14)
    x = rng.standard_normal((2, 2, 4, 5, 6))
    grad_output = rng.standard_normal((2, 2, 1, 3, 4))
    moved = [to_backend(a, any_backend) for a in (grad_output, x, grid)]
    with deformcp.backend(any_backend):
        grads = [testing.to_numpy(g) for g in deformcp.grid_sample_backward(*moved, "bicubic", padding, align)]

    def loss(x, grid):
        return np.sum(grad_output * deformcp.grid_sample(x, grid, "bicubic", padding, align))

    assert_finite_differences(loss, (x, grid), grads, rng)


def test_volume_bad_input(rng):
    x, grid = rng.standard_normal((2, 3, 4, 4, 4)), rng.uniform(-1, 1, (2, 3, 3, 3, 3))
    cases = [
        (ValueError, r"grid: expected a 5-D array \(N, D_out, H_out, W_out, 3\) for input \(N, C, D, H, W\)",
         lambda: deformcp.grid_sample(x, grid[..., 0, :])),
        (ValueError, r"grid: expected the last axis to hold \(x, y, z\), size 3",
         lambda: deformcp.grid_sample(x, grid[..., :2])),
        (ValueError, r"size: expected 5 integers, got 4",
         lambda: deformcp.affine_grid(np.zeros((2, 3, 4)), (2, 1, 4, 4))),
        (ValueError, r"size: expected 4 integers, got 5",
         lambda: deformcp.affine_grid(np.zeros((2, 2, 3)), (2, 1, 4, 4, 4))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


# ------------------------------------------------------------------------------- finite differences (float64)

def grid_away_from_kinks(rng, shape, H, W, align):
    """Normalised grid whose pixel coordinates keep 0.05 away from every half-integer: the bilinear
    weights, the clamps and the reflections are all smooth there."""
    def axis(size, count):
        x = rng.integers(-2 * size, 4 * size, count) / 2 + rng.uniform(0.05, 0.45, count)
        return 2 * x / (size - 1) - 1 if align else (2 * x + 1) / size - 1

    n = int(np.prod(shape))
    return np.stack([axis(W, n), axis(H, n)], axis=-1).reshape(*shape, 2)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("padding", PADDING_MODES)
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("trial", range(3))
def test_grid_sample_finite_differences(rng, mode, padding, align, trial):
    x = rng.standard_normal((2, 3, 4, 5))
    grid = grid_away_from_kinks(rng, (2, 3, 6), 4, 5, align)
    grad_output = rng.standard_normal((2, 3, 3, 6))
    grads = deformcp.grid_sample_backward(grad_output, x, grid, mode, padding, align)

    def loss(x, grid):
        return np.sum(grad_output * deformcp.grid_sample(x, grid, mode, padding, align))

    assert_finite_differences(loss, (x, grid), grads, rng)


@pytest.mark.parametrize("align", [False, True])
def test_affine_grid_finite_differences(rng, align):
    theta = rng.standard_normal((3, 2, 3))
    grad_output = rng.standard_normal((3, 4, 5, 2))
    grad = deformcp.affine_grid_backward(grad_output, theta, (3, 1, 4, 5), align).theta
    direction = rng.standard_normal(theta.shape)
    # affine_grid is linear in theta, so the central difference is exact for any step: a unit step keeps
    # its rounding error near 1e-16·|loss| (a 1e-6 step magnifies it to ~1e-10·|loss|, more than 1e-8 of
    # a small derivative)
    numeric = directional_derivative(
        lambda t: np.sum(grad_output * deformcp.affine_grid(t, (3, 1, 4, 5), align)), (theta,), 0, direction,
        step=1.0)
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-8)


def test_nearest_has_no_grid_gradient(rng):
    grads = deformcp.grid_sample_backward(rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 4, 4)),
                                          rng.uniform(-1, 1, (1, 3, 3, 2)), mode="nearest")
    assert np.all(grads.grid == 0) and np.any(grads.input != 0)


# ------------------------------------------------------------------------------------ backends vs NumPy

@pytest.mark.parametrize("mode, padding, align", CONFIGS, ids=CONFIG_IDS)
def test_deterministic_backward(backend, rng, mode, padding, align):
    """deterministic=True: the same gradients as the NumPy path, bitwise identical from run to run."""
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 20, 20, 2)).astype(np.float32)  # many locations per pixel
    grad_output = rng.standard_normal((2, 3, 20, 20)).astype(np.float32)
    grads, expected = run_both(backend, deformcp.grid_sample_backward, grad_output, x, grid, mode, padding, align,
                               deterministic=True)
    for got, want in zip(grads, expected):
        assert_close(got, want, "float32")
    again = testing.run(backend, deformcp.grid_sample_backward, *(to_backend(a, backend) for a in (
        grad_output, x, grid)), mode, padding, align, deterministic=True)
    for first, second in zip(grads, again):
        np.testing.assert_array_equal(testing.to_numpy(first), testing.to_numpy(second))


@pytest.mark.parametrize("shape, grid_shape", [
    ((0, 3, 5, 5), (0, 4, 4, 2)),   # batch 0
    ((2, 0, 5, 5), (2, 4, 4, 2)),   # no channels
    ((2, 3, 5, 5), (2, 0, 4, 2)),   # empty output
])
def test_empty(backend, rng, shape, grid_shape):
    x, grid = rng.standard_normal(shape), rng.uniform(-1, 1, grid_shape)
    out, expected = run_both(backend, deformcp.grid_sample, x, grid)
    assert out.shape == expected.shape == (shape[0], shape[1], *grid_shape[1:3])
    grads, expected = run_both(backend, deformcp.grid_sample_backward, rng.standard_normal(expected.shape), x, grid)
    assert grads.input.shape == x.shape and grads.grid.shape == grid.shape
    assert_close(grads.input, expected.input, "float64")
    theta = rng.standard_normal((shape[0], 2, 3))
    grid, expected = run_both(backend, deformcp.affine_grid, theta, (shape[0], 1, 3, 4))
    assert grid.shape == expected.shape == (shape[0], 3, 4, 2)


# --------------------------------------------------------------------------- non-finite grid values

SPECIAL = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.3, -0.7])


@pytest.mark.parametrize("mode, padding, align", CONFIGS, ids=CONFIG_IDS)
def test_nonfinite_grid(backend, rng, mode, padding, align):
    x = rng.standard_normal((1, 2, 4, 5))
    grid = np.stack(np.meshgrid(SPECIAL, SPECIAL), axis=-1)[None]
    out, expected = run_both(backend, deformcp.grid_sample, x, grid, mode, padding, align)
    assert np.all(np.isfinite(expected))
    assert_close(out, expected, "float64")
    nan_row = expected[0, :, 0, :]  # y = NaN
    assert np.all(nan_row == 0) and np.all(expected[0, :, :, 0] == 0)  # NaN samples 0 in every mode
    if padding != "border":
        assert np.all(expected[0, :, 1:3, :] == 0)  # y = ±inf
    else:  # ±inf clamps to the first / last row, as a far finite y does (x = 0.3, say, is finite)
        y_inf = deformcp.grid_sample(x, np.array([[[[0.3, 1e6], [0.3, -1e6]]]]), mode, padding, align)
        np.testing.assert_array_equal(expected[0, :, 1:3, 5], y_inf[0, :, 0, :])
    grad_output = rng.standard_normal(expected.shape)
    grads, expected_grads = run_both(backend, deformcp.grid_sample_backward, grad_output, x, grid, mode, padding,
                                     align)
    for got, want in zip(grads, expected_grads):
        assert np.all(np.isfinite(want))
        assert_close(got, want, "float64")


# ------------------------------------------------------------ the NumPy path's two formulations and its chunks

def grid_with_special_values(rng, shape, H, W, align, huge=True):
    """grid_away_from_kinks with about one value in eight NaN, ±inf or (huge) ±1e30."""
    grid = grid_away_from_kinks(rng, shape, H, W, align)
    special = rng.random(grid.shape) < 0.125
    grid[special] = rng.choice([np.nan, np.inf, -np.inf] + [1e30, -1e30] * huge, int(special.sum()))
    return grid


def numpy_path(x, grid, grad_output, mode, padding, align):
    """Output and both gradients on the NumPy path."""
    return (deformcp.grid_sample(x, grid, mode, padding, align),
            *deformcp.grid_sample_backward(grad_output, x, grid, mode, padding, align))


@pytest.mark.parametrize("mode, padding, align", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("split", ["whole batch", "images in two chunks", "every image in pieces"])
def test_direct_and_sparse_formulations_agree(rng, monkeypatch, mode, padding, align, split):
    """The direct gather (few channels) and the sparse matrix (many) on the same inputs: the same output and gradients
    to rounding in float64 (grid values NaN, ±inf, ±1e30 included), and in float32 each within float32's tolerance of
    float64 (NaN and ±inf: where reflection takes 1e30 depends on the dtype's rounding); batches in one chunk, or each
    image's points split over several (the backward adds an image's chunks in order)."""
    N, C, H, W = 3, 5, 6, 7
    x = rng.standard_normal((N, C, H, W))
    grad_output = rng.standard_normal((N, C, 4, 9))
    grids = {huge: grid_with_special_values(rng, (N, 4, 9), H, W, align, huge) for huge in (True, False)}
    if split == "images in two chunks":  # (bilinear float64: 80 points a chunk; images 0-1 and 2)
        monkeypatch.setattr(reference, "POINT_CHUNK_BYTES", 80 * (160 + 3 * 4 * C * 8))
        monkeypatch.setattr(deformcp._workspace, "IMAGE_CHUNK_BYTES", 2 * C * (H * W + 1) * 8)
    elif split != "whole batch":
        monkeypatch.setattr(reference, "POINT_CHUNK_BYTES", 1000)  # a few points a chunk
        monkeypatch.setattr(deformcp._workspace, "IMAGE_CHUNK_BYTES", 1)  # one image a chunk
    results = {}
    for formulation, direct_max_channels in (("direct", C), ("sparse", C - 1)):
        monkeypatch.setattr(reference, "DIRECT_MAX_CHANNELS", direct_max_channels)
        for dtype, huge in (("float64", True), ("float64", False), ("float32", False)):
            arrays = (a.astype(dtype) for a in (x, grids[huge], grad_output))
            results[formulation, dtype, huge] = numpy_path(*arrays, mode, padding, align)
    names = ("output", "grad input", "grad grid")
    for huge in (True, False):
        for got, want, name in zip(results["direct", "float64", huge], results["sparse", "float64", huge], names):
            assert np.all(np.isfinite(want)), name
            assert testing.relative_error(got, want) <= 1e-12, name
    for formulation in ("direct", "sparse"):
        for got, want, name in zip(results[formulation, "float32", False], results[formulation, "float64", False],
                                   names):
            assert got.dtype == np.float32, name
            assert_close(got, want, "float32")


@pytest.mark.parametrize("formulation", ["direct", "sparse"])
def test_threads_do_not_change_results_of_either_formulation(rng, monkeypatch, formulation):
    """Points of one image split over chunks that run on the thread pool: bitwise the same as one thread."""
    monkeypatch.setattr(reference, "DIRECT_MAX_CHANNELS", 3 if formulation == "direct" else 2)
    monkeypatch.setattr(reference, "POINT_CHUNK_BYTES", 20000)
    monkeypatch.setattr(deformcp._workspace, "IMAGE_CHUNK_BYTES", 1)
    x = rng.standard_normal((3, 3, 30, 40))
    grid = rng.uniform(-1.1, 1.1, (3, 25, 35, 2))
    grad_output = rng.standard_normal((3, 3, 25, 35))
    threaded = numpy_path(x, grid, grad_output, "bilinear", "zeros", False)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    serial = numpy_path(x, grid, grad_output, "bilinear", "zeros", False)
    for a, b in zip(threaded, serial):
        np.testing.assert_array_equal(a, b)


def test_backward_plans_again_for_a_grid_changed_after_the_forward(rng, monkeypatch):
    """The backward reads the last forward's plans only for a grid equal to that forward's bit for bit: changed in
    place, of another dtype, or another grid, it plans again (checked against a NumPy path that keeps no plans)."""
    x = rng.standard_normal((2, 3, 5, 6))
    grad_output = rng.standard_normal((2, 3, 4, 4))
    grid = rng.uniform(-1.2, 1.2, (2, 4, 4, 2))
    grid[1, 2, 3] = rng.uniform(-0.5, 0, 2)  # the point changed below: inside the image before and after
    deformcp.grid_sample(x, grid)
    kept = deformcp.grid_sample_backward(grad_output, x, grid)
    grid[1, 2, 3, 0] += 0.5   # after the forward, in place
    changed = deformcp.grid_sample_backward(grad_output, x, grid)
    deformcp.grid_sample(x.astype(np.float32), grid.astype(np.float32))
    after_float32 = deformcp.grid_sample_backward(grad_output, x, grid)
    monkeypatch.setattr(reference, "PLAN_CACHE_POINTS", 0)  # nothing kept from here on
    monkeypatch.setattr(reference, "_last_plans", ((), None, {}))
    for got, grid_then in ((changed, grid), (after_float32, grid)):
        for a, b in zip(got, deformcp.grid_sample_backward(grad_output, x, grid_then)):
            np.testing.assert_array_equal(a, b)
    grid[1, 2, 3, 0] -= 0.5
    for a, b in zip(kept, deformcp.grid_sample_backward(grad_output, x, grid)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(kept.grid, changed.grid)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    x, grid = rng.standard_normal((2, 3, 4, 4)), rng.uniform(-1, 1, (2, 3, 3, 2))
    cases = [
        (ValueError, r"input: expected a 4-D array \(N, C, H, W\) or, for volumes, \(N, C, D, H, W\), "
                     r"got shape \(3, 4, 4\)",
         lambda: deformcp.grid_sample(x[0], grid)),
        (ValueError, r"grid: expected batch size N = 2 \(input's\), got 1",
         lambda: deformcp.grid_sample(x, grid[:1])),
        (ValueError, r"grid: expected the last axis to hold \(x, y\), size 2.*got shape \(2, 3, 3, 3\)",
         lambda: deformcp.grid_sample(x, np.zeros((2, 3, 3, 3)))),
        (TypeError, r"input: expected a floating-point array .*got dtype int64",
         lambda: deformcp.grid_sample(x.astype(np.int64), grid)),
        (TypeError, r"grid: expected a floating-point array .*got dtype complex128",
         lambda: deformcp.grid_sample(x, grid.astype(complex))),
        (TypeError, r"expected arrays of one dtype: input is float32, grid is float64",
         lambda: deformcp.grid_sample(x.astype(np.float32), grid)),
        (ValueError, r"mode: expected one of \('bilinear', 'nearest', 'bicubic'\), got 'area'",
         lambda: deformcp.grid_sample(x, grid, mode="area")),
        (ValueError, r"padding_mode: expected one of \('zeros', 'border', 'reflection'\), got 'circular'",
         lambda: deformcp.grid_sample(x, grid, padding_mode="circular")),
        (TypeError, r"align_corners: expected a bool, got NoneType None",
         lambda: deformcp.grid_sample(x, grid, align_corners=None)),
        (ValueError, r"input: expected non-empty spatial size in \(N, C, H, W\), got \(2, 3, 0, 4\)",
         lambda: deformcp.grid_sample(np.zeros((2, 3, 0, 4)), grid)),
        (TypeError, r"input: expected an array .*got builtins.str", lambda: deformcp.grid_sample("x", grid)),
        (ValueError, r"grad_output: expected shape \(2, 3, 3, 3\) for \(N, C, H_out, W_out\), got \(2, 3, 3, 4\)",
         lambda: deformcp.grid_sample_backward(np.zeros((2, 3, 3, 4)), x, grid)),
        (ValueError, r"needs_input_grad: expected 2 bools for \('input', 'grid'\)",
         lambda: deformcp.grid_sample_backward(np.zeros((2, 3, 3, 3)), x, grid, needs_input_grad=(True,))),
        (ValueError, r"theta: expected shape \(N, 2, 3\) or, for volumes, \(N, 3, 4\), got \(2, 3, 3\)",
         lambda: deformcp.affine_grid(np.zeros((2, 3, 3)), (2, 1, 4, 4))),
        (ValueError, r"size: expected 4 integers, got 5",
         lambda: deformcp.affine_grid(np.zeros((2, 2, 3)), (2, 1, 4, 4, 4))),
        (ValueError, r"size: expected non-negative sizes, got \(2, 1, -4, 4\)",
         lambda: deformcp.affine_grid(np.zeros((2, 2, 3)), (2, 1, -4, 4))),
        (ValueError, r"size: expected N = 2 \(theta's batch\)",
         lambda: deformcp.affine_grid(np.zeros((2, 2, 3)), (3, 1, 4, 4))),
        (TypeError, r"size: expected a sequence of 4 integers, got \(2, 1, 4.5, 4\)",
         lambda: deformcp.affine_grid(np.zeros((2, 2, 3)), (2, 1, 4.5, 4))),
        (ValueError, r"grad_output: expected shape \(2, 4, 4, 2\) for \(N, H, W, 2\), got \(2, 4, 4, 3\)",
         lambda: deformcp.affine_grid_backward(np.zeros((2, 4, 4, 3)), np.zeros((2, 2, 3)), (2, 1, 4, 4))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_host_backend_rejects_bad_input_too(rng):
    with deformcp.backend("host"), pytest.raises(ValueError, match="mode: expected one of"):
        deformcp.grid_sample(rng.standard_normal((1, 1, 2, 2)), np.zeros((1, 1, 1, 2)), mode="area")


@pytest.mark.parametrize("mode, padding, align", CONFIGS, ids=CONFIG_IDS)
def test_nonfinite_input_read_like_the_kernels(backend, rng, mode, padding, align):
    """A NaN or inf pixel reaches exactly the samples whose corners inside the image include it."""
    x = rng.standard_normal((1, 2, 4, 5))
    x[0, 0, 1, 2], x[0, 1, 3, 4], x[0, 1, 0, 0] = np.nan, np.inf, -np.inf
    # pixel-aligned points (zero-weight corners), points just outside the image, the NaN pixel's centre
    grid = np.concatenate([rng.integers(-3, 4, (1, 6, 6, 2)) / 3.0, rng.uniform(-1.6, 1.6, (1, 6, 6, 2))], axis=1)
    grid[0, 0, 0] = (0.0, -1 / 3) if align else (0.0, -0.25)  # (x, y) = (2, 1)
    out, expected = run_both(backend, deformcp.grid_sample, x, grid, mode, padding, align)
    assert np.isnan(expected[0, 0, 0, 0])
    assert_close(out, expected, "float64")


def test_numpy_path_threads_do_not_change_results(rng, monkeypatch):
    """Chunks of images run on a thread pool; one thread must give bitwise the same results."""
    x = rng.standard_normal((6, 64, 40, 40))  # about 0.8 MB an image: one image a chunk
    grid = rng.uniform(-1.1, 1.1, (6, 30, 30, 2))
    grad_output = rng.standard_normal((6, 64, 30, 30))
    threaded = deformcp.grid_sample(x, grid), *deformcp.grid_sample_backward(grad_output, x, grid)
    monkeypatch.setenv("DEFORMCP_NUM_THREADS", "1")
    serial = deformcp.grid_sample(x, grid), *deformcp.grid_sample_backward(grad_output, x, grid)
    for a, b in zip(threaded, serial):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 0])
def test_affine_grid_of_a_size_no_array_can_hold_names_size(batch):
    """H = W = 2**31 - 1: NumPy refuses the output's shape (even with N = 0); the error names size."""
    side = 2**31 - 1
    with pytest.raises(ValueError, match=r"^size: expected an output that fits in memory"):
        deformcp.affine_grid(np.zeros((batch, 2, 3)), (batch, 1, side, side))
