"""deform_roi_pool (plain and modulated): relations to RoIAlign, finite differences, backend parity, special
inputs, determinism, bad input."""
import numpy as np
import pytest
from test_roi_align import random_boxes

import deformcp
from deformcp import testing

from conftest import assert_close, directional_derivative, run_both, to_backend


def inside_boxes(rng, N, H, W, K):
    """Boxes well inside an H×W image (spatial_scale 1)."""
    x1, y1 = rng.uniform(1, W / 2, K), rng.uniform(1, H / 2, K)
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + rng.uniform(2, W / 2 - 1, K),
                     y1 + rng.uniform(2, H / 2 - 1, K)], axis=1)


def test_without_offset_it_is_aligned_roi_align(rng):
    x = rng.standard_normal((2, 3, 9, 11))
    rois = random_boxes(rng, 2, 9, 11, 12, negative_sizes=False)
    for backend in ("numpy", "host"):
        with deformcp.backend(backend):
            expected = deformcp.roi_align(x, rois, (3, 4), 0.5, 2, aligned=True)
            np.testing.assert_array_equal(deformcp.deform_roi_pool(x, rois, None, (3, 4), 0.5, 2), expected)
            zero = np.zeros((12, 2, 3, 4))
            np.testing.assert_allclose(deformcp.deform_roi_pool(x, rois, zero, (3, 4), 0.5, 2), expected, atol=1e-15)
            mask = rng.uniform(0, 1, (12, 1, 3, 4))
            np.testing.assert_allclose(deformcp.deform_roi_pool(x, rois, zero, (3, 4), 0.5, 2, mask=mask),
                                       expected * mask, atol=1e-15)


def test_offset_moves_the_bins_by_gamma_times_the_roi_size(rng):
    """Δx = 1 / (γ · roi_w) moves every bin one pixel right: RoIAlign of the box moved one pixel."""
    x = rng.standard_normal((1, 2, 10, 12))
    rois = np.array([[0, 2.0, 3.0, 8.0, 7.0], [0, 1.0, 1.0, 5.0, 9.0]])
    gamma = 0.1
    offset = np.zeros((2, 2, 2, 3))
    offset[:, 0] = 1 / (gamma * (rois[:, 3] - rois[:, 1]))[:, None, None]   # aligned: roi_w = x2 − x1
    offset[:, 1] = -2 / (gamma * (rois[:, 4] - rois[:, 2]))[:, None, None]  # two pixels up
    moved = rois + np.array([0, 1, -2, 1, -2])
    np.testing.assert_allclose(deformcp.deform_roi_pool(x, rois, offset, (2, 3), 1.0, 2, gamma),
                               deformcp.roi_align(x, moved, (2, 3), 1.0, 2, aligned=True), atol=1e-12)


def test_matches_mmcv_formula_on_a_single_bin():
    """One bin, one sample (sampling_ratio 1): the sample sits at the shifted bin centre."""
    x = np.arange(30, dtype=np.float64).reshape(1, 1, 5, 6)
    rois = np.array([[0, 1.5, 0.5, 4.5, 3.5]])          # aligned start (1, 0), size 3 × 3
    offset = np.array([[[[0.5]], [[1.0]]]])              # Δx = 0.5 → +0.15 px·… with γ = 1: +1.5 px, Δy: +3 px
    out = deformcp.deform_roi_pool(x, rois, offset, 1, 1.0, 1, gamma=1.0)
    # sample at x = 1 + 1.5 + 1.5 = 4, y = 0 + 3 + 1.5 = 4.5 → y ≥ H − 1 = 4 clamps to row 4: pixel (4, 4) = 28
    assert out[0, 0, 0, 0] == pytest.approx(28.0)
    grads = deformcp.deform_roi_pool_backward(np.ones((1, 1, 1, 1)), x, rois, offset, 1, 1.0, 1, gamma=1.0)
    # clamped in y: no y gradient; in x the slope along row 4 is 1 per pixel, times γ·roi_w = 3
    np.testing.assert_allclose(grads.offset[0, :, 0, 0], [3.0, 0.0], atol=1e-12)
    expected_input = np.zeros_like(x)
    expected_input[0, 0, 4, 4] = 1.0
    np.testing.assert_allclose(grads.input, expected_input, atol=1e-15)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("trial", range(3))
def test_finite_differences(rng, modulated, trial):
    x = rng.standard_normal((2, 3, 12, 14))
    rois = inside_boxes(rng, 2, 12, 14, 4)
    offset = rng.uniform(-0.5, 0.5, (4, 2, 2, 3))
    mask = rng.uniform(0, 1, (4, 1, 2, 3)) if modulated else None
    kwargs = dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=1, gamma=0.1)
    grad_output = rng.standard_normal((4, 3, 2, 3))
    grads = deformcp.deform_roi_pool_backward(grad_output, x, rois, offset, mask=mask, **kwargs)
    names = ["input", "offset"] + (["mask"] if modulated else [])
    values = {"input": x, "offset": offset, "mask": mask}

    def loss(*args):
        v = dict(values, **dict(zip(names, args)))
        return np.sum(grad_output * deformcp.deform_roi_pool(v["input"], rois, v["offset"], mask=v["mask"], **kwargs))

    for index, name in enumerate(names):
        direction = rng.standard_normal(values[name].shape)
        numeric = directional_derivative(loss, [values[n] for n in names], index, direction)
        assert np.sum(getattr(grads, name) * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9), name


def test_special_inputs(backend, rng):
    """NaN/inf offsets and boxes pool to 0 with no gradient; boxes outside; K = 0."""
    x = rng.standard_normal((2, 3, 7, 6))
    rois = random_boxes(rng, 2, 7, 6, 8)
    rois[0, 1] = np.nan
    rois[1, 3] = np.inf
    offset = rng.standard_normal((8, 2, 2, 2))
    offset[2, 0, 0, 0], offset[3, 1, 1, 1], offset[4, 0, 1, 0] = np.nan, np.inf, 1e30
    mask = rng.uniform(0, 1, (8, 1, 2, 2))
    out, expected = run_both(backend, deformcp.deform_roi_pool, x, rois, offset, 2, 0.5, 2, mask=mask)
    assert np.all(np.isfinite(expected)) and np.all(expected[:2] == 0) and np.all(expected[2, :, 0, 0] == 0)
    assert_close(out, expected, "float64")
    grads, expected_grads = run_both(backend, deformcp.deform_roi_pool_backward, rng.standard_normal(expected.shape), x,
                                     rois, offset, 2, 0.5, 2, mask=mask)
    for got, want in zip(grads, expected_grads):
        assert np.all(np.isfinite(want))
        assert_close(got, want, "float64")
    out, expected = run_both(backend, deformcp.deform_roi_pool, x, np.zeros((0, 5)), np.zeros((0, 2, 2, 2)), 2)
    assert out.shape == expected.shape == (0, 3, 2, 2)


def test_deterministic_backward_is_bitwise_reproducible(backend, rng):
    x = rng.standard_normal((2, 6, 16, 16)).astype(np.float32)
    rois = np.concatenate([inside_boxes(rng, 2, 16, 16, 40)] * 3).astype(np.float32)
    offset = rng.standard_normal((120, 2, 7, 7)).astype(np.float32)
    grad_output = rng.standard_normal((120, 6, 7, 7)).astype(np.float32)
    runs = [testing.run(backend, deformcp.deform_roi_pool_backward, *(to_backend(a, backend) for a in (
        grad_output, x, rois, offset)), 7, 1.0, 2, deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            if a is not None:
                np.testing.assert_array_equal(testing.to_numpy(a), testing.to_numpy(b))


def test_rejects_bad_input(rng):
    x, rois = rng.standard_normal((2, 3, 8, 8)), np.array([[0, 1.0, 1, 5, 5], [1, 0, 0, 3, 3]])
    cases = [
        (ValueError, r"offset: expected shape \(2, 2, 3, 3\) for \(K, 2, PH, PW\), got \(2, 1, 3, 3\)",
         lambda: deformcp.deform_roi_pool(x, rois, np.zeros((2, 1, 3, 3)), 3)),
        (ValueError, r"mask: expected shape \(2, 1, 3, 3\) for \(K, 1, PH, PW\), got \(2, 1, 3, 2\)",
         lambda: deformcp.deform_roi_pool(x, rois, None, 3, mask=np.zeros((2, 1, 3, 2)))),
        (ValueError, r"gamma: expected a finite number, got nan",
         lambda: deformcp.deform_roi_pool(x, rois, None, 3, gamma=float("nan"))),
        (TypeError, r"expected arrays of one dtype: input is float64, offset is float32",
         lambda: deformcp.deform_roi_pool(x, rois, np.zeros((2, 2, 3, 3), np.float32), 3)),
        (ValueError, r"rois: expected batch indices \(column 0\) that are integers in \[0, 2\), got 5.0 in row 1",
         lambda: deformcp.deform_roi_pool(x, np.array([[0, 1.0, 1, 5, 5], [5, 0, 0, 3, 3]]), None, 3)),
        (ValueError, r"grad_output: expected shape \(2, 3, 3, 3\) for \(K, C, PH, PW\), got \(2, 3, 2, 2\)",
         lambda: deformcp.deform_roi_pool_backward(np.zeros((2, 3, 2, 2)), x, rois, None, 3)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
