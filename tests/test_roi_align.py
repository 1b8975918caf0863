"""roi_align (avg, max) and ps_roi_align: golden values, torchvision data, finite differences, backend
parity, special boxes, determinism, bad input."""
import itertools
import json
import pathlib

import numpy as np
import pytest

import deformcp
from deformcp import _workspace, testing

from conftest import assert_close, directional_derivative, noncontiguous, run_both, to_backend

TORCHVISION_DATA = pathlib.Path(__file__).with_name("data") / "torchvision_roi_align.npz"


def ramp(H, W, offset=1.0):
    """A 1×1×H×W image whose pixel (y, x) holds y·W + x + offset."""
    return (np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W) + offset)


# ------------------------------------------------------------------------------------------ golden values

@pytest.mark.parametrize("box, kwargs, expected", [
    # not aligned: box 0..3 is 3 pixels; one sample per bin at its centre (1.5, 1.5): 1.5·4 + 1.5 + 1
    ([0, 0, 0, 3, 3], dict(sampling_ratio=1), 8.5),
    # aligned shifts by -0.5: box 0.5..3.5 is the same region
    ([0, 0.5, 0.5, 3.5, 3.5], dict(sampling_ratio=1, aligned=True), 8.5),
    # 2×2 samples at 1 and 3: pixels (1,1), (1,3), (3,1), (3,3) → 6, 8, 14, 16
    ([0, 0, 0, 4, 4], dict(sampling_ratio=2), 11.0),
    # adaptive: ceil(4 / 1) = 4 samples per axis at 0.5, 1.5, 2.5, 3.5 (3.5 reads the last row/column)
    ([0, 0, 0, 4, 4], dict(sampling_ratio=-1), np.mean([[y * 4 + x + 1 for x in (0.5, 1.5, 2.5, 3)]
                                                        for y in (0.5, 1.5, 2.5, 3)])),
    # samples at -3 and -1 per axis: only (-1, -1) is inside [-1, H], clamped to pixel (0, 0); all 4 counted
    ([0, -4, -4, 0, 0], dict(sampling_ratio=2), 0.25),
    # a box entirely outside pools to 0
    ([0, 10, 10, 12, 12], dict(sampling_ratio=2), 0.0),
    # spatial_scale maps image coordinates to pixels: box 0..8 at scale 0.5 is 0..4
    ([0, 0, 0, 8, 8], dict(sampling_ratio=2, spatial_scale=0.5), 11.0),
    # max pooling: the largest of the four samples
    ([0, 0, 0, 4, 4], dict(sampling_ratio=2, pool_mode="max"), 16.0),
])
def test_roi_align_golden(box, kwargs, expected):
    out = deformcp.roi_align(ramp(4, 4), np.array([box], np.float64), 1, **kwargs)
    assert out.shape == (1, 1, 1, 1)
    assert out[0, 0, 0, 0] == pytest.approx(expected, abs=1e-12)


def test_max_pooling_counts_samples_outside_as_zero():
    """mmcv's max: samples outside the image read 0 and compete; such a winner passes no gradient."""
    negative = -ramp(4, 4)
    box = np.array([[0, -4, -4, 0, 0]], np.float64)  # samples (-3|-1, -3|-1): only (-1, -1) inside, value -1
    assert deformcp.roi_align(negative, box, 1, sampling_ratio=2, pool_mode="max")[0, 0, 0, 0] == 0.0
    grad = deformcp.roi_align_backward(np.ones((1, 1, 1, 1)), negative, box, 1, sampling_ratio=2, pool_mode="max")
    assert np.all(grad.input == 0)
    # with positive values the inside sample wins and takes the whole gradient, at pixel (0, 0)
    grad = deformcp.roi_align_backward(np.ones((1, 1, 1, 1)), ramp(4, 4), box, 1, sampling_ratio=2,
                                       pool_mode="max")
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(grad.input, expected)


def test_average_gradient_spreads_over_samples():
    # box 0..4, 2×2 samples at pixel centres (1|3, 1|3): each pixel gets 1/4
    grad = deformcp.roi_align_backward(np.ones((1, 1, 1, 1)), ramp(4, 4), np.array([[0, 0, 0, 4, 4.0]]), 1,
                                       sampling_ratio=2)
    expected = np.zeros((4, 4))
    expected[np.ix_([1, 3], [1, 3])] = 0.25
    np.testing.assert_allclose(grad.input[0, 0], expected, atol=1e-15)


def test_ps_roi_align_golden():
    # C = 2 = 1 output channel × (1 × 2) bins; bin (0, pw) reads channel pw
    x = np.concatenate([ramp(3, 4, 0.0), ramp(3, 4, 100.0)], axis=1)
    box = np.array([[0, 0.5, 0.5, 4.5, 2.5]])  # shifted by -0.5: x 0..4, y 0..2; bins 2 wide, 2 high
    out = deformcp.ps_roi_align(x, box, (1, 2), sampling_ratio=1)
    # one sample per bin at (y, x) = (1, 1) and (1, 3): channel 0 → 5, channel 1 → 100 + 7
    np.testing.assert_allclose(out, [[[[5.0, 107.0]]]], atol=1e-12)


def test_boxes_as_a_list_per_image(rng):
    x = rng.standard_normal((3, 4, 8, 9))
    per_image = [rng.uniform(0, 8, (2, 4)), np.zeros((0, 4)), rng.uniform(0, 8, (3, 4))]
    stacked = np.concatenate([np.concatenate([np.full((len(b), 1), i), b], axis=1) for i, b in enumerate(per_image)])
    np.testing.assert_array_equal(deformcp.roi_align(x, per_image, 3, aligned=True),
                                  deformcp.roi_align(x, stacked, 3, aligned=True))
    np.testing.assert_array_equal(deformcp.roi_align(x, [], 3).shape, (0, 4, 3, 3))


# ------------------------------------------------------------------------------- torchvision's own numbers

@pytest.mark.skipif(not TORCHVISION_DATA.exists(), reason="tests/data/torchvision_roi_align.npz not generated")
def test_matches_torchvision_reference_data():
    """Outputs and gradients torchvision 0.29 computed (benchmarks/torchvision_reference.py), on both CPU
    backends: boxes inside, across, outside, larger than the image, inverted, zero-size, edge samples."""
    data = np.load(TORCHVISION_DATA, allow_pickle=False)
    cases = json.loads(str(data["index"]))["cases"]
    assert len(cases) >= 20
    for case in cases:
        name = case["name"]
        arrays = {key: data[f"{name}.{key}"] for key in ("input", "boxes", "grad_output", "output", "grad_input")}
        kwargs = dict(output_size=tuple(case["output_size"]), spatial_scale=case["spatial_scale"],
                      sampling_ratio=case["sampling_ratio"])
        if case["op"] == "roi_align":
            kwargs["aligned"] = case["aligned"]
            forward, backward = deformcp.roi_align, deformcp.roi_align_backward
        else:
            forward, backward = deformcp.ps_roi_align, deformcp.ps_roi_align_backward
        for name_ in ("numpy", "host"):
            with deformcp.backend(name_):
                np.testing.assert_allclose(forward(arrays["input"], arrays["boxes"], **kwargs), arrays["output"],
                                           atol=1e-12, err_msg=f"{name} on {name_}")
                grad = backward(arrays["grad_output"], arrays["input"], arrays["boxes"], **kwargs).input
                np.testing.assert_allclose(grad, arrays["grad_input"], atol=1e-12, err_msg=f"{name} on {name_}")


@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision_when_installed(rng, aligned):
    torchvision = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 4, 9, 11))
    boxes = random_boxes(rng, 2, 9, 11, 16, negative_sizes=False)
    tx = torch.tensor(x, requires_grad=True)
    out = torchvision.ops.roi_align(tx, torch.tensor(boxes), (3, 4), 0.5, -1, aligned)
    grad_output = rng.standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_allclose(deformcp.roi_align(x, boxes, (3, 4), 0.5, -1, aligned), out.detach().numpy(),
                               atol=1e-12)
    np.testing.assert_allclose(deformcp.roi_align_backward(grad_output, x, boxes, (3, 4), 0.5, -1, aligned).input,
                               tx.grad.numpy(), atol=1e-12)


# --------------------------------------------------------------------------- finite differences (float64)

def random_boxes(rng, N, H, W, K, negative_sizes=True):
    """Boxes inside, across and outside a 2H×2W image (for spatial_scale 0.5), some of zero size and,
    unless negative_sizes is False, some with x2 < x1."""
    x1, y1 = rng.uniform(-10, 2 * W + 4, K), rng.uniform(-10, 2 * H + 4, K)
    w, h = rng.uniform(-3 if negative_sizes else 0, W, K), rng.uniform(-3 if negative_sizes else 0, H, K)
    w[::5] = 0.0
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + w, y1 + h], axis=1)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("trial", range(3))
def test_roi_align_finite_differences(rng, pool_mode, aligned, trial):
    x = rng.standard_normal((2, 3, 7, 8))
    boxes = random_boxes(rng, 2, 7, 8, 6)
    kwargs = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=int(rng.integers(-1, 4)), aligned=aligned,
                  pool_mode=pool_mode)
    grad_output = rng.standard_normal((6, 3, 2, 3))
    grad = deformcp.roi_align_backward(grad_output, x, boxes, **kwargs).input
    direction = rng.standard_normal(x.shape)
    numeric = directional_derivative(lambda v: np.sum(grad_output * deformcp.roi_align(v, boxes, **kwargs)),
                                     (x,), 0, direction)
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_ps_roi_align_finite_differences(rng):
    x = rng.standard_normal((2, 12, 7, 8))
    boxes = random_boxes(rng, 2, 7, 8, 5)
    grad_output = rng.standard_normal((5, 2, 2, 3))
    grad = deformcp.ps_roi_align_backward(grad_output, x, boxes, (2, 3), 0.5, 2).input
    direction = rng.standard_normal(x.shape)
    numeric = directional_derivative(lambda v: np.sum(grad_output * deformcp.ps_roi_align(v, boxes, (2, 3), 0.5, 2)),
                                     (x,), 0, direction)
    assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------ backends vs NumPy



def special_boxes(rng, N, H, W):
    """Boxes with NaN and ±inf coordinates, far outside, huge, and degenerate."""
    return np.array([
        [0, np.nan, 1, 4, 5], [1, 1, np.inf, 4, 5], [0, -np.inf, -np.inf, np.inf, np.inf],
        [1, -1e30, -1e30, 1e30, 1e30],          # huge: adaptive sampling would mean 1e29 samples a bin
        [0, 1e6, 1e6, 1e6 + 5, 1e6 + 5],        # far outside
        [1, 3, 3, 3, 3], [0, 5, 2, 1, 1],       # zero size, x2 < x1
        [0, -2 * W, -2 * H, 4 * W, 4 * H],      # larger than the image on every side
    ], np.float64)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_special_boxes(backend, rng, pool_mode, aligned):
    """NaN, inf, huge, far and degenerate boxes: defined output (0 for non-finite), the same on every
    backend, quickly (span-limited sampling), and no read outside the input (checked under ASan)."""
    x = rng.standard_normal((2, 3, 6, 5))
    boxes = special_boxes(rng, 2, 6, 5)
    kwargs = dict(output_size=(2, 2), sampling_ratio=-1, aligned=aligned, pool_mode=pool_mode)
    out, expected = run_both(backend, deformcp.roi_align, x, boxes, **kwargs)
    assert np.all(np.isfinite(expected))
    assert np.all(expected[:3] == 0) and np.all(expected[4] == 0)  # non-finite, far outside
    assert_close(out, expected, "float64")
    grad, expected_grad = run_both(backend, deformcp.roi_align_backward, rng.standard_normal(expected.shape), x,
                                   boxes, deterministic=True, **kwargs)
    assert np.all(np.isfinite(expected_grad.input))
    assert_close(grad.input, expected_grad.input, "float64")


def test_huge_box_equals_its_clipped_sampling(rng):
    """A box far larger than the image samples only where it overlaps (the skipped samples are zeros,
    still counted): compare with a box whose samples land at the same places, computed the long way."""
    x = rng.standard_normal((1, 2, 5, 6))
    # 3 bins of 40 px with sampling_ratio 40: samples 1 px apart, most of them outside the image
    box = np.array([[0, -55.5, -55.5, 64.5, 64.5]])
    out = deformcp.roi_align(x, box, 3, sampling_ratio=40, aligned=True)
    ys = -56 + np.arange(120) + 0.5   # every sample coordinate along an axis
    expected = np.zeros((2, 3, 3))
    for ph, pw in itertools.product(range(3), range(3)):
        for y in ys[40 * ph:40 * ph + 40]:
            for xx in ys[40 * pw:40 * pw + 40]:
                if -1 <= y <= 5 and -1 <= xx <= 6:
                    yc, xc = min(max(y, 0), 4), min(max(xx, 0), 5)
                    y0, x0 = int(yc), int(xc)
                    y1, x1 = min(y0 + 1, 4), min(x0 + 1, 5)
                    ly, lx = yc - y0, xc - x0
                    expected[:, ph, pw] += ((1 - ly) * (1 - lx) * x[0, :, y0, x0] + (1 - ly) * lx * x[0, :, y0, x1]
                                            + ly * (1 - lx) * x[0, :, y1, x0] + ly * lx * x[0, :, y1, x1])
    np.testing.assert_allclose(out[0], expected / 1600, atol=1e-14)


def test_noncontiguous_and_empty(backend, rng):
    x = rng.standard_normal((2, 4, 6, 7))
    boxes = random_boxes(rng, 2, 6, 7, 5)
    with deformcp.backend("numpy" if backend == "cuda" else backend):
        out = deformcp.roi_align(noncontiguous(to_backend(x, backend)), noncontiguous(to_backend(boxes, backend)), 2)
    assert_close(out, deformcp.roi_align(x, boxes, 2), "float64")
    for shape, K in (((2, 4, 6, 7), 0), ((0, 4, 6, 7), 0), ((2, 0, 6, 7), 3)):
        x = rng.standard_normal(shape)
        b = random_boxes(rng, 2, 6, 7, K) if K else np.zeros((0, 5))
        out, expected = run_both(backend, deformcp.roi_align, x, b, (2, 3))
        assert out.shape == expected.shape == (K, shape[1], 2, 3)
        grad, _ = run_both(backend, deformcp.roi_align_backward, np.zeros(expected.shape), x, b, (2, 3))
        assert grad.input.shape == shape and not np.any(testing.to_numpy(grad.input))


def test_deterministic_backward_is_bitwise_reproducible(backend, rng):
    x = rng.standard_normal((2, 8, 20, 20)).astype(np.float32)
    boxes = np.concatenate([random_boxes(rng, 2, 20, 20, 64)] * 3).astype(np.float32)  # overlapping scatters
    grad_output = rng.standard_normal((192, 8, 7, 7)).astype(np.float32)
    runs = [testing.to_numpy(testing.run(backend, deformcp.roi_align_backward, *(to_backend(a, backend) for a in (
        grad_output, x, boxes)), 7, 0.5, 2, True, deterministic=True).input) for _ in range(3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


# -------------------------------------------------------------- separable average against per-sample rows

def mixed_boxes(rng, N, H, W, K, spatial_scale):
    """random_boxes' kinds (inside, across, outside, zero-size, inverted) plus tiny (sub-pixel) and large
    boxes, NaN / ±inf / huge ones, and half-pixel coordinates (samples on integers: corners of weight 0)."""
    boxes = random_boxes(rng, N, H, W, K)
    boxes[1::6, 3:] = boxes[1::6, 1:3] + rng.uniform(0, 0.7, (len(boxes[1::6]), 2)) / spatial_scale  # tiny
    boxes[2::6, 1:] = np.round(boxes[2::6, 1:] * 2) / 2
    special = np.array([[0, np.nan, 1, 4, 5], [1, 1, np.inf, 4, 5], [0, -1e30, -1e30, 1e30, 1e30],
                        [1, -3 * W, -3 * H, 5 * W, 5 * H], [0, 0, 0, W / spatial_scale, H / spatial_scale]])
    return np.concatenate([boxes, special])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 5])
def test_separable_average_matrix_equals_the_per_sample_matrix(rng, dtype, aligned, sampling_ratio):
    """The average's matrix built from per-axis weights (a_y[r]·a_x[c] / count) equals the per-sample matrix
    (4 corners a sample) with its duplicates summed, entry for entry, with the same touched pixels (so NaN in
    the input reaches the same bins)."""
    from deformcp.reference import roi_align as module
    N, H, W, spatial_scale = 2, int(rng.integers(1, 13)), int(rng.integers(1, 13)), float(rng.choice([1, 0.5]))
    PH, PW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    rois = mixed_boxes(rng, N, H, W, 24, spatial_scale).astype(dtype)
    geometry = (H, W, PH, PW, spatial_scale, sampling_ratio, aligned, np.dtype(dtype))
    n_columns = N * (H * W + 1)
    old = module._bin_matrix(module._samples(rois, *geometry), n_columns)
    new = module._average_matrix(rois, *geometry, n_columns)
    assert new.dtype == old.dtype == np.dtype(dtype)
    np.testing.assert_allclose(new.toarray(), old.toarray(), rtol=0, atol=1e-15 if dtype == "float64" else 1e-6)
    old.sum_duplicates()
    image_zero_rows = old.indices % (H * W + 1) == H * W   # corners outside the image: weight 0, read 0
    touched_old = {(r, c) for r, c, zero in zip(np.repeat(np.arange(old.shape[0]), np.diff(old.indptr)),
                                                old.indices, image_zero_rows) if not zero}
    touched_new = set(zip(np.repeat(np.arange(new.shape[0]), np.diff(new.indptr)), new.indices))
    assert touched_new == touched_old
    assert new.nnz <= old.nnz


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("aligned", [False, True])
def test_average_pooling_equals_the_per_sample_reference(rng, dtype, aligned):
    """roi_align avg and its gradient (per-image box lists, NaN pixels, empty boxes) against the per-sample
    matrix in float64; deterministic."""
    from deformcp.reference import _bilinear
    from deformcp.reference import roi_align as module
    N, C, H, W = 3, 4, int(rng.integers(5, 16)), int(rng.integers(5, 16))
    x = rng.standard_normal((N, C, H, W))
    sampling_ratio = int(rng.choice([-1, 0, 2]))
    per_image = [mixed_boxes(rng, N, H, W, 12, 0.5)[:, 1:], np.zeros((0, 4)), mixed_boxes(rng, N, H, W, 6, 0.5)[:, 1:]]
    if dtype == "float32":  # off the half-pixel lattice: a sample exactly at −1 (RoIAlign's border, where the value
        # jumps) would fall on either side of it in float32's arithmetic
        per_image = [b + rng.uniform(-1e-3, 1e-3, b.shape) for b in per_image]
    rois = np.concatenate([np.concatenate([np.full((len(b), 1), i), b], axis=1) for i, b in enumerate(per_image)])
    kwargs = dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    grad_output = rng.standard_normal((len(rois), C, 3, 2))
    rois = rois.astype(dtype).astype(np.float64)  # the reference on the boxes as the dtype holds them
    S = module._bin_matrix(module._samples(rois, H, W, 3, 2, 0.5, sampling_ratio, aligned, np.dtype(np.float64)),
                           N * (H * W + 1))
    read = S.indices[S.indices < H * W]  # pixels of image 0 that some sample reads (a corner of weight 0 too)
    x[0, 1].flat[rng.choice(read)] = np.nan
    expected = (S @ _bilinear.pixels_last(x, np.float64)).reshape(-1, 3, 2, C).transpose(0, 3, 1, 2)
    expected_grad = (S.T @ grad_output.transpose(0, 2, 3, 1).reshape(-1, C)).reshape(N, H * W + 1, C)
    expected_grad = expected_grad[:, :H * W].transpose(0, 2, 1).reshape(N, C, H, W)
    cast = [a.astype(dtype) for a in per_image]
    out = deformcp.roi_align(x.astype(dtype), cast, **kwargs)
    assert np.isnan(expected).any()
    assert_close(out, expected, dtype)
    grads = [deformcp.roi_align_backward(grad_output.astype(dtype), x.astype(dtype), cast, **kwargs).input
             for _ in range(2)]
    assert_close(grads[0], expected_grad, dtype)
    np.testing.assert_array_equal(grads[1], grads[0])
    np.testing.assert_array_equal(deformcp.roi_align(x.astype(dtype), cast, **kwargs), out)
    assert deformcp.roi_align(x, np.zeros((0, 5)), **kwargs).shape == (0, C, 3, 2)


# ------------------------------------------------------------------------------------------- bad input

def test_rejects_bad_input(rng):
    x, boxes = rng.standard_normal((2, 4, 5, 5)), np.array([[0, 1.0, 1, 3, 3], [1, 0, 0, 2, 2]])
    cases = [
        (ValueError, r"boxes: expected shape \(\*, 5\) for \(K, 5\) \[batch_index, x1, y1, x2, y2\], got \(2, 4\)",
         lambda: deformcp.roi_align(x, boxes[:, 1:], 2)),
        (ValueError, r"boxes: expected a 2-D array", lambda: deformcp.roi_align(x, boxes[0], 2)),
        (ValueError, r"boxes: expected batch indices \(column 0\) that are integers in \[0, 2\), got 2.0 in row 1",
         lambda: deformcp.roi_align(x, np.array([[0, 1.0, 1, 3, 3], [2, 0, 0, 2, 2]]), 2)),
        (ValueError, r"boxes: expected batch indices .* got 0.5 in row 0",
         lambda: deformcp.roi_align(x, np.array([[0.5, 1.0, 1, 3, 3]]), 2)),
        (ValueError, r"boxes: expected batch indices .* got nan in row 0",
         lambda: deformcp.roi_align(x, np.array([[np.nan, 1.0, 1, 3, 3]]), 2)),
        (ValueError, r"boxes: expected batch indices .* got -1.0 in row 0",
         lambda: deformcp.roi_align(x, np.array([[-1, 1.0, 1, 3, 3]]), 2)),
        (ValueError, r"output_size: expected a positive int or a pair of positive ints, got \(2, 0\)",
         lambda: deformcp.roi_align(x, boxes, (2, 0))),
        (ValueError, r"output_size: expected a positive int .* got -1", lambda: deformcp.roi_align(x, boxes, -1)),
        (TypeError, r"output_size: expected an int or a pair of ints, got 2.5",
         lambda: deformcp.roi_align(x, boxes, 2.5)),
        (ValueError, r"spatial_scale: expected a finite positive number, got 0",
         lambda: deformcp.roi_align(x, boxes, 2, spatial_scale=0)),
        (TypeError, r"sampling_ratio: expected an int, got float 2.0",
         lambda: deformcp.roi_align(x, boxes, 2, sampling_ratio=2.0)),
        (ValueError, r"pool_mode: expected one of \('avg', 'max'\), got 'sum'",
         lambda: deformcp.roi_align(x, boxes, 2, pool_mode="sum")),
        (TypeError, r"aligned: expected a bool", lambda: deformcp.roi_align(x, boxes, 2, aligned=1)),
        (TypeError, r"expected arrays of one dtype: input is float64, boxes is float32",
         lambda: deformcp.roi_align(x, boxes.astype(np.float32), 2)),
        (TypeError, r"boxes: expected a floating-point array .*got dtype int64",
         lambda: deformcp.roi_align(x, boxes.astype(np.int64), 2)),
        (ValueError, r"input: expected channels C divisible by output_size 2×2 = 4 for position-sensitive "
                     r"pooling, got C = 6", lambda: deformcp.ps_roi_align(rng.standard_normal((2, 6, 5, 5)), boxes, 2)),
        (ValueError, r"boxes\[1\]: expected shape \(\*, 4\) for \(L, 4\)",
         lambda: deformcp.roi_align(x, [boxes[:, 1:], boxes], 2)),
        (ValueError, r"boxes: expected at most N = 2 per-image arrays \(input's batch\), got 3",
         lambda: deformcp.roi_align(x, [boxes[:, 1:]] * 3, 2)),
        (ValueError, r"grad_output: expected shape \(2, 4, 2, 2\) for \(K, C_out, PH, PW\), got \(2, 4, 3, 3\)",
         lambda: deformcp.roi_align_backward(np.zeros((2, 4, 3, 3)), x, boxes, 2)),
        (TypeError, r"deterministic: expected a bool",
         lambda: deformcp.roi_align_backward(np.zeros((2, 4, 2, 2)), x, boxes, 2, deterministic="yes")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_numpy_path_chunks_do_not_change_results(rng, monkeypatch, pool_mode):
    """RoIs are processed in chunks of about ROI_SAMPLES_PER_CHUNK samples (bounding memory) and channels in
    blocks; tiny chunks must give the same numbers as one chunk."""
    from deformcp.reference import roi_align as module
    x = rng.standard_normal((2, 5, 9, 7))
    boxes = random_boxes(rng, 2, 9, 7, 12)
    grad_output = rng.standard_normal((12, 5, 2, 3))
    kwargs = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=-1, pool_mode=pool_mode)
    whole = deformcp.roi_align(x, boxes, **kwargs), deformcp.roi_align_backward(grad_output, x, boxes, **kwargs).input
    monkeypatch.setattr(_workspace, "ROI_SAMPLES_PER_CHUNK", 10)
    assert len(module._roi_chunks(boxes, 9, 7, 2, 3, 0.5, -1, False, np.dtype(np.float64),
                                  separable=pool_mode == "avg")) > 3
    chunked = deformcp.roi_align(x, boxes, **kwargs), deformcp.roi_align_backward(grad_output, x, boxes, **kwargs).input
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=0, atol=1e-14)
