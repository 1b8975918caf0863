"""Adversarial numerics on the host backend.

NaN, ±inf, ±1e30 and denormal (1e-310 in float64, 1e-40 in float32) offsets, grids, affine matrices, box
coordinates and features; boxes far outside the image; 1×1 inputs; deform_conv2d kernels larger than the
input (padded to be valid). Every op, forward and backward: the host backend (kernels/*.cu on the CPU) must
give the NumPy path's results — non-finite values in the same positions, the rest within
deformcp.testing.TOLERANCE — with every output element written (outputs are NaN-poisoned) and no input
modified (conftest.run_both), and the results must be defined: finite wherever the conventions (README) say
a non-finite coordinate samples 0.

Every test's name contains "host", so that tests/test_sanitizers.py runs this file under AddressSanitizer
and UBSan with ``-k host``.
"""
import itertools

import numpy as np
import pytest

import deformcp
from deformcp import _host, testing

from conftest import run_both

pytestmark = [
    pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found"),
    # The NumPy path warns on some of these inputs (inf − inf, inf · 0, overflow) although its results are
    # defined; test_numpy_path_box_geometry_raises_no_floating_point_error pins down the avoidable ones.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DTYPES = ("float32", "float64")
#: The smallest positive subnormal neighbourhood of each dtype.
DENORMAL = {"float32": 1e-40, "float64": 1e-310}


def specials(dtype) -> np.ndarray:
    """NaN, ±inf, ±1e30, ±denormal and ±0 in dtype (denormals checked to be subnormal, not flushed)."""
    tiny = DENORMAL[dtype]
    values = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, tiny, -tiny, 0.0, -0.0], dtype)
    assert 0 < abs(values[5]) < np.finfo(dtype).tiny
    return values


def sprinkle(a, rng, dtype, fraction):
    """a (float64) with about ``fraction`` of its elements replaced by special values, cast to dtype."""
    a = np.array(a, np.float64)
    flat = a.reshape(-1)
    where = rng.random(flat.size) < fraction
    flat[where] = rng.choice(specials(dtype).astype(np.float64), int(where.sum()))
    return a.astype(dtype)


def point_pairs(dtype, ordinary):
    """Every (x, y) pair of special and ordinary values, as an (n, 2) float64 array."""
    values = np.concatenate([specials(dtype).astype(np.float64), ordinary])
    return np.array(list(itertools.product(values, values)))


def check(actual, expected, dtype, finite=True):
    """actual equals expected as conftest.assert_close has it — NaN and ±inf in identical positions, the
    finite values within testing.TOLERANCE[dtype] in relative norm — with both scaled by their largest
    magnitude first, so that values near the largest float (gradients of denormal rows) do not overflow the
    norm. With finite, the reference must also be all finite."""
    actual = np.asarray(testing.to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    if finite:
        assert np.all(np.isfinite(expected)), "the NumPy path gave a non-finite result"
    assert actual.shape == expected.shape
    defined = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), defined, err_msg="non-finite positions differ")
    np.testing.assert_array_equal(actual[~defined], expected[~defined], err_msg="non-finite values differ")
    actual, expected = actual[defined], expected[defined]
    scale = max(np.abs(actual).max(initial=0), np.abs(expected).max(initial=0))
    if scale > 0:
        error = testing.relative_error(actual / scale, expected / scale)
        assert error <= testing.TOLERANCE[dtype], f"relative error {error:.3e}"


# ------------------------------------------------------------------------------------------ affine_grid

@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1), (3, 4)], ids=["1x1", "3x4"])
def test_host_affine_grid_special_theta(rng, dtype, align, size):
    """θ entries NaN, ±inf, ±1e30, denormal: the grid is θ·(x, y, 1) in IEEE arithmetic on both paths."""
    values = specials(dtype).astype(np.float64)
    theta = rng.standard_normal((len(values) + 1, 2, 3))
    for i, v in enumerate(values):       # theta i has the special value at entry i % 6, the last none
        theta[i].reshape(-1)[i % 6] = v
    theta = theta.astype(dtype)
    shape = (len(theta), 2, *size)
    out, expected = run_both("host", deformcp.affine_grid, theta, shape, align)
    check(out, expected, dtype, finite=False)
    grad_output = sprinkle(rng.standard_normal(expected.shape), rng, dtype, 0.05)
    grads, expected_grads = run_both("host", deformcp.affine_grid_backward, grad_output, theta, shape, align)
    check(grads.theta, expected_grads.theta, dtype, finite=False)


# ------------------------------------------------------------------------------------------ grid_sample

@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_grid_sample_special_grid(rng, dtype, mode, padding, align):
    """Every (x, y) pair of NaN, ±inf, ±1e30, ±denormal, ±0 and ordinary grid values, over a 5×4 and a
    1×1 image: finite results (NaN samples 0 and gets no gradient), equal on both paths."""
    pairs = point_pairs(dtype, [0.3, -0.999, 1.0])            # 144 points
    grid = np.stack([pairs.reshape(12, 12, 2), pairs[::-1].reshape(12, 12, 2)]).astype(dtype)
    for H, W in ((5, 4), (1, 1)):
        x = rng.standard_normal((2, 3, H, W)).astype(dtype)
        kwargs = dict(mode=mode, padding_mode=padding, align_corners=align)
        out, expected = run_both("host", deformcp.grid_sample, x, grid, **kwargs)
        check(out, expected, dtype)
        grad_output = rng.standard_normal(expected.shape).astype(dtype)
        for deterministic in (False, True):
            grads, expected_grads = run_both("host", deformcp.grid_sample_backward, grad_output, x, grid, **kwargs,
                                             deterministic=deterministic)
            check(grads.input, expected_grads.input, dtype)
            check(grads.grid, expected_grads.grid, dtype)
            assert np.all(expected_grads.grid[np.isnan(grid).any(axis=-1)] == 0)   # NaN: no gradient


# ---------------------------------------------------------------------------------------- boxes, RoIs

def special_boxes(dtype, N, H, W):
    """Each coordinate special in turn (the others ordinary), all four special, far outside, huge, denormal
    and degenerate boxes, and one ordinary box."""
    rows = []
    for v in specials(dtype).astype(np.float64):
        for j in range(1, 5):
            box = [len(rows) % N, 0.5, 0.5, W - 1.0, H - 1.5]
            box[j] = v
            rows.append(box)
        rows.append([len(rows) % N, v, v, v, v])
    tiny = DENORMAL[dtype]
    rows += [
        [0, 1e6, 1e6, 1e6 + 5, 1e6 + 5], [1 % N, -1e6, -1e6, -1e6 + 3, -1e6 + 3],    # far outside
        [0, -1e30, -1e30, 1e30, 1e30], [1 % N, 1e30, 1e30, -1e30, -1e30],           # huge, inverted
        [0, -1e30, 0.5, 1e30, 1.5], [0, 0.5, -1e30, 1.5, 1e30],                     # huge along one axis
        [0, -2.0 * W, -2.0 * H, 4.0 * W, 4.0 * H],                                  # around the image
        [1 % N, tiny, tiny, tiny, tiny], [0, -tiny, -tiny, W - tiny, H - tiny],     # denormal corners
        [0, W - 1.0, H - 1.0, W - 1.0, H - 1.0], [1 % N, W + 0.5, H + 0.5, W + 0.5, H + 0.5],  # points
        [0, 0.7, 0.2, W - 0.9, H - 0.4],
    ]
    return np.array(rows, np.float64).astype(dtype)


IMAGES = [(2, 6, 5), (1, 1, 1)]      # (N, H, W): an ordinary image and a 1×1 one
IMAGE_IDS = ["6x5", "1x1"]


@pytest.mark.parametrize("ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_host_roi_align_special_boxes(rng, image, dtype, pool_mode, aligned, ratio):
    N, H, W = image
    x = rng.standard_normal((N, 3, H, W)).astype(dtype)
    boxes = special_boxes(dtype, N, H, W)
    kwargs = dict(output_size=(2, 3), spatial_scale=0.8, sampling_ratio=ratio, aligned=aligned, pool_mode=pool_mode)
    out, expected = run_both("host", deformcp.roi_align, x, boxes, **kwargs)
    check(out, expected, dtype)
    assert np.all(expected[~np.isfinite(boxes[:, 1:]).all(axis=1)] == 0)    # a non-finite box pools to 0
    grad_output = rng.standard_normal(expected.shape).astype(dtype)
    for deterministic in (False, True):
        grad, expected_grad = run_both("host", deformcp.roi_align_backward, grad_output, x, boxes, **kwargs,
                                       deterministic=deterministic)
        check(grad.input, expected_grad.input, dtype)


@pytest.mark.parametrize("ratio", [-1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_host_ps_roi_align_special_boxes(rng, image, dtype, ratio):
    N, H, W = image
    x = rng.standard_normal((N, 2 * 2 * 3, H, W)).astype(dtype)
    boxes = special_boxes(dtype, N, H, W)
    out, expected = run_both("host", deformcp.ps_roi_align, x, boxes, (2, 3), 0.8, ratio)
    check(out, expected, dtype)
    grad_output = rng.standard_normal(expected.shape).astype(dtype)
    for deterministic in (False, True):
        grad, expected_grad = run_both("host", deformcp.ps_roi_align_backward, grad_output, x, boxes, (2, 3), 0.8,
                                       ratio, deterministic)
        check(grad.input, expected_grad.input, dtype)


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align", "deform_roi_pool"])
@pytest.mark.parametrize("box, dtype", [([0, np.inf, np.inf, np.inf, np.inf], "float64"),
                                        ([0, -1e30, -1e30, 1e30, 1e30], "float32")], ids=["inf", "1e30"])
def test_numpy_path_box_geometry_raises_no_floating_point_error(op, box, dtype):
    x = np.ones((1, 4, 4, 4), dtype)
    boxes = np.array([box], dtype)
    call = {"roi_align": lambda: deformcp.roi_align(x, boxes, 2),
            "ps_roi_align": lambda: deformcp.ps_roi_align(x, boxes, 2),
            "deform_roi_pool": lambda: deformcp.deform_roi_pool(x, boxes, None, 2)}[op]
    expected = call()   # warnings ignored: the defined result
    with np.errstate(invalid="raise", over="raise"):
        out = call()
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_host_deform_roi_pool_special_boxes_and_offsets(rng, image, dtype, modulated):
    """Special boxes with ordinary offsets, then ordinary boxes with special offsets: a non-finite box or
    offset makes its bin 0 with no gradient."""
    N, H, W = image
    x = rng.standard_normal((N, 3, H, W)).astype(dtype)
    special = special_boxes(dtype, N, H, W)
    ordinary = np.tile(special[-1:], (len(special), 1))
    ordinary[:, 0] = np.arange(len(special)) % N
    for boxes, offset in ((special, rng.standard_normal((len(special), 2, 2, 3)).astype(dtype)),
                          (ordinary, sprinkle(rng.standard_normal((len(special), 2, 2, 3)), rng, dtype, 0.3))):
        mask = rng.uniform(0, 1, (len(boxes), 1, 2, 3)).astype(dtype) if modulated else None
        kwargs = dict(output_size=(2, 3), spatial_scale=0.8, sampling_ratio=2, gamma=0.25, mask=mask)
        out, expected = run_both("host", deformcp.deform_roi_pool, x, boxes, offset, **kwargs)
        check(out, expected, dtype)
        grad_output = rng.standard_normal(expected.shape).astype(dtype)
        for deterministic in (False, True):
            grads, expected_grads = run_both("host", deformcp.deform_roi_pool_backward, grad_output, x, boxes,
                                             offset, **kwargs, deterministic=deterministic)
            for name in ("input", "offset", "mask"):
                if getattr(expected_grads, name) is not None:
                    check(getattr(grads, name), getattr(expected_grads, name), dtype)


@pytest.mark.parametrize("trans_std", [0.0, 0.3])
@pytest.mark.parametrize("no_trans", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_host_deform_ps_roi_pool_special_rois_and_offsets(rng, image, dtype, no_trans, trans_std):
    """Special RoIs with ordinary offsets, then ordinary RoIs with special offsets (with trans_std 0,
    0·inf is NaN: those samples are skipped)."""
    N, H, W = image
    x = rng.standard_normal((N, 4 * 2 * 2, H, W)).astype(dtype)
    special = special_boxes(dtype, N, H, W)
    ordinary = np.tile(special[-1:], (len(special), 1))
    ordinary[:, 0] = np.arange(len(special)) % N
    kwargs = dict(output_dim=4, group_size=2, pooled_size=3, part_size=2, sample_per_part=2, spatial_scale=0.8,
                  trans_std=trans_std, no_trans=no_trans)
    for rois, offset in ((special, rng.standard_normal((len(special), 2 * 2, 2, 2)).astype(dtype)),
                         (ordinary, sprinkle(rng.standard_normal((len(special), 2 * 2, 2, 2)), rng, dtype, 0.3))):
        out, expected = run_both("host", deformcp.deform_ps_roi_pool, x, rois, offset, **kwargs)
        check(out, expected, dtype)
        grad_output = rng.standard_normal(expected.shape).astype(dtype)
        for deterministic in (False, True):
            grads, expected_grads = run_both("host", deformcp.deform_ps_roi_pool_backward, grad_output, x, rois,
                                             offset, **kwargs, deterministic=deterministic)
            check(grads.input, expected_grads.input, dtype)
            check(grads.offset, expected_grads.offset, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_deform_ps_roi_pool_trans_std_times_roi_size_overflows(rng, dtype):
    """trans_std · roi_w beyond the largest float (1e30 · 1e30 in float32, 1e300 · 1e30 in float64): every
    offset moves its samples to ±inf, where they are skipped; forward and input gradient agree."""
    x = rng.standard_normal((1, 4 * 2 * 2, 6, 5)).astype(dtype)
    rois = np.array([[0, 0.5, 0.5, 1e30, 4.5], [0, 0.5, 0.5, 3.0, 1e30]], dtype)
    offset = (rng.uniform(0.5, 1.0, (2, 2 * 2, 2, 2)) * rng.choice([-1, 1], (2, 4, 2, 2))).astype(dtype)
    kwargs = dict(output_dim=4, group_size=2, pooled_size=3, part_size=2, sample_per_part=2,
                  trans_std=1e30 if dtype == "float32" else 1e300)
    out, expected = run_both("host", deformcp.deform_ps_roi_pool, x, rois, offset, **kwargs)
    check(out, expected, dtype)
    grad_output = rng.standard_normal(expected.shape).astype(dtype)
    for deterministic in (False, True):
        grads, expected_grads = run_both("host", deformcp.deform_ps_roi_pool_backward, grad_output, x, rois, offset,
                                         **kwargs, deterministic=deterministic)
        check(grads.input, expected_grads.input, dtype)
        check(grads.offset, expected_grads.offset, dtype)


# ---------------------------------------------------------------------------------------- deform_conv2d

CONV_CONFIGS = {   # (N, C, H, W), (C_out, kh, kw), offset groups, stride, padding, dilation
    "5x6-k3": ((2, 4, 5, 6), (3, 3, 3), 2, (1, 1), (1, 1), (1, 1)),
    "1x1-k3": ((2, 2, 1, 1), (3, 3, 3), 1, (1, 1), (1, 1), (1, 1)),
    "1x1-k1": ((1, 1, 1, 1), (1, 1, 1), 1, (1, 1), (0, 0), (1, 1)),
    "2x3-k5x4-dilated": ((2, 2, 2, 3), (2, 5, 4), 2, (1, 1), (2, 2), (1, 2)),
    "3x2-k7-strided": ((1, 3, 3, 2), (2, 7, 7), 1, (2, 3), (4, 3), (1, 1)),
}


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONV_CONFIGS)
def test_host_deform_conv2d_special_offsets(rng, config, dtype, modulated):
    """Offsets NaN, ±inf, ±1e30, ±denormal and ±0 (a third of them), on ordinary, 1×1 and smaller-than-the-
    kernel inputs: the samples are 0 with zero gradient, and everything else is as on the NumPy path."""
    (N, C, H, W), (C_out, kh, kw), G, stride, padding, dilation = CONV_CONFIGS[config]
    Ho = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wo = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    assert Ho >= 1 and Wo >= 1
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    offset = sprinkle(1.5 * rng.standard_normal((N, 2 * G * kh * kw, Ho, Wo)), rng, dtype, 0.35)
    weight = rng.standard_normal((C_out, C, kh, kw)).astype(dtype)
    bias = rng.standard_normal(C_out).astype(dtype)
    mask = rng.uniform(0, 1, (N, G * kh * kw, Ho, Wo)).astype(dtype) if modulated else None
    conv = dict(stride=stride, padding=padding, dilation=dilation, mask=mask)
    out, expected = run_both("host", deformcp.deform_conv2d, x, offset, weight, bias, **conv)
    check(out, expected, dtype)
    grad_output = rng.standard_normal(expected.shape).astype(dtype)
    for deterministic in (False, True):
        grads, expected_grads = run_both("host", deformcp.deform_conv2d_backward, grad_output, x, offset, weight,
                                         bias, **conv, deterministic=deterministic)
        for name, got, want in zip(grads._fields, grads, expected_grads):
            assert (got is None) == (want is None), name
            if want is not None:
                check(got, want, dtype)
        off = expected_grads.offset.reshape(N, G, kh * kw, 2, Ho, Wo)
        bad = ~np.isfinite(offset.reshape(N, G, kh * kw, 2, Ho, Wo)).all(axis=3, keepdims=True)
        assert np.all(off[np.broadcast_to(bad, off.shape)] == 0)


# ------------------------------------------------------------------------------------------- mimic_loss

@pytest.mark.parametrize("dtype", DTYPES)
def test_host_mimic_loss_special_features(rng, dtype):
    """Rows of denormals, of ±1e30, mixed 1e30 and denormal, ±0, and rows with NaN or ±inf (NaN rows,
    defined): the same on both paths; and the 1×1 case."""
    tiny, D = DENORMAL[dtype], 5
    base = rng.standard_normal((2, 14, D))
    f_a, f_b = base
    f_a[0], f_b[0] = tiny * np.sign(f_a[0]), tiny * np.sign(f_b[0])     # denormal rows
    f_a[1] *= 1e30                                                       # huge against ordinary
    f_a[2], f_b[2] = 1e30 * np.sign(f_a[2]), 1e30 * np.sign(f_b[2])      # huge against huge
    f_a[3, 0], f_a[3, 1:] = 1e30, tiny                                   # mixed magnitudes in one row
    f_a[4], f_b[5] = 0.0, -0.0                                           # zero rows
    f_a[6] = tiny * f_a[6]                                               # denormal against ordinary
    f_a[7, 1], f_b[8, 2], f_a[9, 3] = np.nan, np.inf, -np.inf            # NaN rows
    f_a[10], f_b[10, 0] = 0.0, np.nan                                    # NaN beats the zero-row rule
    f_a[11, 0], f_b[11, 0] = np.inf, np.inf
    f_a, f_b = f_a.astype(dtype), f_b.astype(dtype)
    assert 0 < abs(f_a[0, 0]) < np.finfo(dtype).tiny
    for a, b in ((f_a, f_b), (f_a[:1, :1], f_b[:1, :1]), (f_a[4:5, :1], f_b[4:5, :1])):
        out, expected = run_both("host", deformcp.mimic_loss, a, b)
        check(out, expected, dtype, finite=len(a) == 1)
        for g in (1.0, -1e30, tiny):
            grad_output = np.asarray(g, dtype)
            grads, expected_grads = run_both("host", deformcp.mimic_loss_backward, grad_output, a, b)
            # The gradient of a denormal row against an ordinary one is of the order of 1 / |row|: beyond the
            # largest float, so it overflows, and its few finite entries are differences of overflowing
            # terms (ill-conditioned: the two paths' last-bit differences in |a|, |b| and a·b grow to ~1e-5
            # in float32). Those rows only have to agree on where they are NaN.
            overflowed = np.isinf(expected_grads.f_a).any(axis=1) | np.isinf(expected_grads.f_b).any(axis=1)
            for got, want in ((grads.f_a, expected_grads.f_a), (grads.f_b, expected_grads.f_b)):
                check(got[~overflowed], want[~overflowed], dtype, finite=False)
                np.testing.assert_array_equal(np.isnan(got[overflowed]), np.isnan(want[overflowed]))
            # NaN exactly in the rows with a NaN or ±inf entry
            rows_ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
            for grad in (expected_grads.f_a, expected_grads.f_b):
                np.testing.assert_array_equal(np.isnan(grad).any(axis=1), ~rows_ok)


# ------------------------------------------------------------------ ms_deform_attn, flash_deform_attn

#: Levels of value's S axis: non-square, 1×1 and wider than tall (S = 27).
ATTENTION_LEVELS = ((5, 4), (1, 1), (2, 3))


def attention_locations(dtype, L, N=2, M=2):
    """Every (x, y) pair of special and ordinary normalised locations (13 × 13 of them) in every level, as
    (N, Lq = 13, M, L, P = 13, 2): each level, head and image holds all of them, in another order."""
    pairs = point_pairs(dtype, [0.3, -0.2, 1.0, 0.5]).reshape(13, 13, 2)
    levels = [np.roll(pairs, shift, axis=(0, 1)) for shift in range(N * M * L)]
    return np.stack(levels).reshape(N, M, L, 13, 13, 2).transpose(0, 3, 1, 2, 4, 5).astype(dtype)


def check_attention(fn, backward, value, arrays, options, dtype, rng, finite=True):
    """fn(value, ATTENTION_LEVELS, None, *arrays, **options) and its backward (atomic and deterministic) on both
    paths, checked; returns the NumPy path's (output, gradients)."""
    out, expected = run_both("host", fn, value, ATTENTION_LEVELS, None, *arrays, **options)
    check(out, expected, dtype, finite)
    grad_output = rng.standard_normal(expected.shape).astype(dtype)
    for deterministic in (False, True):
        grads, expected_grads = run_both("host", backward, grad_output, value, ATTENTION_LEVELS, None, *arrays,
                                         **options, deterministic=deterministic)
        for got, want in zip(grads, expected_grads):
            check(got, want, dtype, finite)
    return expected, expected_grads


@pytest.mark.parametrize("layout", ["levels", "points_per_level"])
@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_ms_deform_attn_special_locations(rng, dtype, method, layout):
    """Locations NaN, ±inf, ±1e30, ±denormal, ±0 and ordinary, every (x, y) pair in every level (a 1×1 one among
    them), bilinear and nearest: finite results, equal on both paths; a non-finite location gets no gradient
    (nor does its weight: it samples 0)."""
    L = len(ATTENTION_LEVELS)
    value = rng.standard_normal((2, 27, 2, 3)).astype(dtype)
    locations = attention_locations(dtype, L)
    options = dict(method=method)
    if layout == "points_per_level":  # the 1×1 level without points, the others with all 13 · 13 pairs
        locations = locations[:, :, :, [0, 2]].reshape(2, 13, 2, 26, 2)
        options["points_per_level"] = (13, 0, 13)
    weights = rng.uniform(-1, 1, locations.shape[:-1]).astype(dtype)
    _, grads = check_attention(deformcp.ms_deform_attn, deformcp.ms_deform_attn_backward, value,
                               (locations, weights), options, dtype, rng)
    bad = ~np.isfinite(locations).all(axis=-1)
    assert np.all(grads.sampling_locations[bad] == 0) and np.all(grads.attention_weights[bad] == 0)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_ms_deform_attn_special_weights_and_values(rng, dtype, method):
    """Attention weights NaN, ±1e30, ±denormal and ±0 among ordinary ones (a NaN weight makes its output NaN, and
    the value gradient of the pixels it reads), and value rows of 1e30 and denormals: the same on both paths.
    (±inf weights: see test_host_ms_deform_attn_infinite_weights.)"""
    value = rng.standard_normal((2, 27, 2, 3))
    value[0, 3], value[1, 20, 1] = 1e30, DENORMAL[dtype]
    locations = rng.uniform(-0.2, 1.2, (2, 13, 2, 3, 4, 2)).astype(dtype)
    weights = rng.uniform(-1, 1, locations.shape[:-1])
    flat = weights.reshape(-1)
    where = rng.random(flat.size) < 0.15
    finite_specials = [v for v in specials(dtype).astype(np.float64) if not np.isinf(v)]
    flat[where] = rng.choice(finite_specials, int(where.sum()))
    check_attention(deformcp.ms_deform_attn, deformcp.ms_deform_attn_backward, value.astype(dtype),
                    (locations, weights.astype(dtype)), {"method": method}, dtype, rng, finite=False)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_ms_deform_attn_unread_non_finite_values(rng, dtype, method):
    """NaN and inf value pixels that no point reads (each level's first pixel, where the NumPy path clamps the
    corners of points outside their level or with a non-finite location), and NaN output gradients of queries that
    sample nothing: every result finite and the same on both paths."""
    value = rng.standard_normal((2, 27, 2, 3))
    starts = np.cumsum([0] + [h * w for h, w in ATTENTION_LEVELS])[:-1]
    value[0, starts], value[1, starts] = np.nan, np.inf
    locations = np.full((2, 13, 2, 3, 4, 2), np.nan)  # not sampled
    if method == "default":  # outside every level (nearest sampling clamps these into the level)
        locations[:, :, :, :, ::2] = rng.uniform(1.5, 3, (2, 13, 2, 3, 2, 2))
    locations[:, :7, :, 0] = rng.uniform(0.6, 0.9, (2, 7, 2, 4, 2))  # level 0, away from its first pixel
    weights = rng.uniform(-1, 1, locations.shape[:-1])
    arrays = (locations.astype(dtype), weights.astype(dtype))
    out, expected = run_both("host", deformcp.ms_deform_attn, value.astype(dtype), ATTENTION_LEVELS, None, *arrays,
                             method=method)
    check(out, expected, dtype)
    grad_output = rng.standard_normal(expected.shape)
    grad_output[:, 7:] = np.nan  # queries 7…12 sample nothing
    grads, expected_grads = run_both("host", deformcp.ms_deform_attn_backward, grad_output.astype(dtype),
                                     value.astype(dtype), ATTENTION_LEVELS, None, *arrays, method=method)
    for got, want in zip(grads, expected_grads):
        check(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_ms_deform_attn_infinite_weights(rng, dtype):
    """An infinite attention weight makes its (query, head) output non-finite on both paths — which non-finite
    value (±inf or NaN) is not defined: the kernels compute weight · sample (as mmcv), the NumPy path folds the
    weight into the sampling matrix (inf · 0 at zero-weight corners is NaN) — and leaves every other output
    as it is."""
    value = rng.standard_normal((1, 27, 1, 2)).astype(dtype)
    locations = rng.uniform(0, 1, (1, 20, 1, 3, 1, 2)).astype(dtype)
    infinite = rng.random((1, 20, 1, 3, 1)) < 0.3
    weights = np.where(infinite, np.inf, rng.uniform(-1, 1, (1, 20, 1, 3, 1))).astype(dtype)
    out, expected = run_both("host", deformcp.ms_deform_attn, value, ATTENTION_LEVELS, None, locations, weights)
    touched = infinite.any(axis=(3, 4)).reshape(1, 20, 1).repeat(2, axis=2)   # (N, Lq, M·D)
    assert not np.isfinite(out[touched]).any() and not np.isfinite(expected[touched]).any()
    check(out[~touched], expected[~touched], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_flash_deform_attn_special_locations_and_logits(rng, dtype):
    """Special locations (every pair, every level) with ordinary logits: finite, equal on both paths, no gradient
    for a non-finite location. Then ordinary locations with logits NaN, ±inf, ±1e30, ±denormal, ±0, the same on
    both paths: a head with a NaN or +inf logit is NaN, one with finite logits finite (1e30 dominates its
    softmax). (A -inf logit among finite ones gets weight 0 on both paths.)"""
    L, P = len(ATTENTION_LEVELS), 13
    value = rng.standard_normal((2, 27, 2, 3)).astype(dtype)
    locations = attention_locations(dtype, L).reshape(2, 13, 2, 2 * L * P)
    logits = 2 * rng.standard_normal((2, 13, 2, L * P))
    options = dict(num_points=P)
    packed = np.concatenate([locations, logits.astype(dtype)], axis=-1)
    _, grads = check_attention(deformcp.flash_deform_attn, deformcp.flash_deform_attn_backward, value, (packed,),
                               options, dtype, rng)
    bad = ~np.isfinite(locations.reshape(2, 13, 2, L * P, 2)).all(axis=-1)
    assert np.all(grads.sampling_loc_attn[..., :2 * L * P].reshape(2, 13, 2, L * P, 2)[bad] == 0)
    ordinary = rng.uniform(-0.2, 1.2, locations.shape)
    packed = np.concatenate([ordinary, logits], axis=-1)
    packed[..., 2 * L * P:] = sprinkle(logits, rng, dtype, 0.02)
    packed = packed.astype(dtype)
    out, _ = check_attention(deformcp.flash_deform_attn, deformcp.flash_deform_attn_backward, value, (packed,),
                             options, dtype, rng, finite=False)
    logits = packed[..., 2 * L * P:]
    nan_heads = (np.isnan(logits) | (logits == np.inf)).any(axis=-1)
    finite_heads = np.isfinite(logits).all(axis=-1)
    out = out.reshape(2, 13, 2, 3)
    assert nan_heads.any() and finite_heads.any()
    assert np.all(np.isnan(out[nan_heads])) and np.all(np.isfinite(out[finite_heads]))


def test_sample_span_of_a_huge_box_is_clamped_before_the_integer_cast():
    """A box 10**20 samples wide along x: the span's ends (5·10**19) used to be cast to int64 (undefined
    behaviour in the kernels, INT64_MIN on the NumPy path); both clamp to SAMPLE_INDEX_MAX first."""
    from deformcp.reference.roi_align import SAMPLE_INDEX_MAX, _span

    with np.errstate(invalid="raise"):
        first, end = _span(np.array([-5e19, 0.5]), np.array([1.0, 0.5]), np.array([1e20, 4.0]), 6)
    np.testing.assert_array_equal(first, [SAMPLE_INDEX_MAX, 0])
    np.testing.assert_array_equal(end, [SAMPLE_INDEX_MAX, 4])


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_host_roi_align_boxes_of_10_to_the_19_samples(rng, pool_mode):
    """Boxes whose sample spans pass 2**63 (run under UBSan's float-cast-overflow by the sanitizer tests)."""
    x = rng.standard_normal((1, 2, 5, 6))
    boxes = np.array([[0, -5e19, 0.5, 5e19, 3.5], [0, 1e19, 0.5, 3e19, 3.5], [0, 0.5, -5e19, 3.5, 5e19]])
    out, expected = run_both("host", deformcp.roi_align, x, boxes, (1, 2), 1.0, -1, True, pool_mode)
    check(out, expected, "float64")
    grad_output = rng.standard_normal(expected.shape)
    grad, expected_grad = run_both("host", deformcp.roi_align_backward, grad_output, x, boxes, (1, 2), 1.0, -1, True,
                                   pool_mode)
    check(grad.input, expected_grad.input, "float64")
